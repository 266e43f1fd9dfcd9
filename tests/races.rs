//! Checks made while a workload runs must never make a checkpoint fail: only its state once
//! frozen counts. `wl-churn` opens and closes files, maps and unmaps memory, starts threads,
//! forks children and makes socket pairs in tight loops; 200 `checkpoint --leave-running` in
//! a row must all succeed (it used to fail about one time in four with "readlink
//! (/proc/PID/fd/N): No such file or directory"), the workload must pass its own checks
//! throughout, and a kill and restore at the end must bring it back churning. And errors say
//! what really happened: a permission error is not "no process with PID N".

mod common;

use common::*;
use std::time::Duration;

const ROUNDS: usize = 200;

#[test]
fn a_churning_process_checkpoints_every_time() {
    let mut wl = start("wl-churn", &[]);
    let _guard = KillOnDrop(wl.pid);
    wl.pipes.expect_pass("verify", "before the checkpoints");
    let dir = scratch("races-churn");
    let img = dir.join("churn.img");
    let pid = wl.pid.to_string();
    let args = [
        "checkpoint",
        pid.as_str(),
        "-o",
        img.to_str().expect("utf8"),
        "--leave-running",
    ];
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let out = run_stasis(&args);
        if !out.status.success() {
            failures.push(format!(
                "round {round}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let _ = std::fs::remove_file(&img);
        if round % 50 == 49 {
            wl.pipes
                .expect_pass("verify", &format!("after {} checkpoints", round + 1));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {ROUNDS} checkpoints failed: {failures:#?}",
        failures.len()
    );
    // Killed and restored, it churns on. Its children of the moment (in the image, born
    // after any listing the test could make) come to this test to be reaped.
    stasis_ok(&args[..4]);
    wl.child.wait().expect("reap original");
    let tree: Vec<i32> = inspect(&img)["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter_map(|p| p["pid"].as_i64())
        .map(|p| p as i32)
        .collect();
    reap_orphans(&tree);
    let (mut r, mut pipes) = restore(&img, false);
    std::thread::sleep(Duration::from_millis(300));
    pipes.expect_pass("verify", "after kill and restore");
    pipes.expect_pass("check", "at the end");
    assert!(r.wait().expect("stasis restore").success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stasis that may not look at its target (run as `nobody` against a process of root)
/// says so: permission denied, not "no process".
#[test]
fn a_permission_error_is_reported_as_one() {
    use std::os::unix::process::CommandExt;
    let wl = start("wl-sleep", &[]);
    let _guard = KillOnDrop(wl.pid);
    // A copy of stasis everybody may run (the checkout may sit under a private directory).
    let bin = std::env::temp_dir().join(format!("stasis-races-bin-{}", std::process::id()));
    std::fs::create_dir_all(&bin).expect("bin dir");
    let copy = bin.join("stasis");
    std::fs::copy(stasis(), &copy).expect("copy stasis");
    for (p, mode) in [(&bin, 0o755), (&copy, 0o755)] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
    let out = std::process::Command::new(&copy)
        .args(["checkpoint", &wl.pid.to_string(), "-o", "/tmp/never.img"])
        .uid(65534)
        .gid(65534)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run stasis as nobody");
    let _ = std::fs::remove_dir_all(&bin);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail: {err}");
    assert!(
        !err.contains("no process with PID"),
        "a process that exists is not missing: {err}"
    );
    assert!(
        err.contains("Permission denied") || err.contains("not permitted"),
        "the error must name the permission problem: {err}"
    );
    assert!(running_untraced(wl.pid));
}

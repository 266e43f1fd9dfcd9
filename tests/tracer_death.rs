//! stasis killed in the middle of a checkpoint: the workload must run on as if nothing had
//! happened (its registers, signal mask, memory, queued signals), no cgroup may stay frozen,
//! and a normal checkpoint and restore of it must work afterwards.
//!
//! stasis is killed with SIGKILL after a sweep of delays (and a few random ones), and at
//! named points through failpoints (stasis built with `--features stasis/failpoints`, as
//! scripts/test does; without it those points are skipped, saying so). The workload,
//! wl-survivor, checks its own memory and signal mask continuously in several threads (and
//! children) and counts the real-time signals it queues to itself.

mod common;

use common::*;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// When stasis is killed.
#[derive(Debug, Clone)]
enum Kill {
    /// SIGKILL from the test after this long.
    After(Duration),
    /// stasis kills itself at this failpoint (a FAILPOINTS value).
    At(&'static str),
    /// Not killed: stasis runs with this FAILPOINTS value (sleeps only) and completes.
    Slowed(&'static str),
}

/// Delays of the time sweep on a large process: its pages phase (a kill in the few
/// milliseconds of injection is what the failpoints aim at precisely), plus a random one.
fn sweep() -> Vec<Kill> {
    let mut v: Vec<Kill> = [150u64, 250, 400, 600]
        .iter()
        .map(|&ms| Kill::After(Duration::from_millis(ms)))
        .collect();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(7);
    v.push(Kill::After(Duration::from_micros(
        150_000 + nanos % 450_000,
    )));
    v
}

/// Failpoints every checkpoint passes, in order: a process frozen (every thread stopped),
/// between two of its injected syscalls, its injection done, progress of the pages
/// phase, the image committed (before the processes are killed or resumed).
const POINTS: [&str; 9] = [
    "frozen-process=return",
    "between-injected-syscalls=return",
    "between-injected-syscalls=6*off->return",
    "between-injected-syscalls=25*off->return",
    "injected-process=return",
    "pages-progress=return",
    "pages-progress=12*off->return",
    "pages-progress=40*off->return",
    "image-committed=return",
];

/// Runs `stasis checkpoint PID` and kills it as `kill` says; returns whether stasis died
/// before finishing (false: it completed first).
fn checkpoint_killed(pid: i32, img: &Path, leave_running: bool, kill: &Kill) -> bool {
    let mut cmd = Command::new(stasis());
    cmd.args(["checkpoint", &pid.to_string(), "-o"]).arg(img);
    if leave_running {
        cmd.arg("--leave-running");
    }
    if let Kill::At(fp) | Kill::Slowed(fp) = kill {
        cmd.env("FAILPOINTS", fp);
    }
    // Its own process group: the test kills it alone, by PID.
    cmd.process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("running stasis checkpoint");
    if let Kill::After(d) = kill {
        std::thread::sleep(*d);
        // SAFETY: kill takes no pointers; the pid is our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    }
    let st = child.wait().expect("waiting for stasis");
    match kill {
        Kill::At(fp) => assert_eq!(
            st.signal(),
            Some(libc::SIGKILL),
            "stasis did not die at failpoint {fp}: {st}"
        ),
        Kill::Slowed(fp) => assert!(st.success(), "stasis failed with {fp}: {st}"),
        Kill::After(_) => {}
    }
    st.signal() == Some(libc::SIGKILL)
}

/// Waits until the kernel has detached `pid` from the dead stasis.
fn wait_untraced(pid: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running_untraced(pid) {
        assert!(
            Instant::now() < deadline,
            "{what}: pid {pid} is still traced, stopped or gone"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A cgroup2 cgroup of the test's own (removed on drop), or None where there is none.
struct OwnCgroup(PathBuf);

impl OwnCgroup {
    fn make(test: &str) -> Option<OwnCgroup> {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let root = mounts.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            post.starts_with("cgroup2 ")
                .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
        })?;
        let dir = root.join(format!("stasis-test-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        dir.join("cgroup.freeze").exists().then_some(OwnCgroup(dir))
    }

    fn frozen(&self) -> bool {
        let events = std::fs::read_to_string(self.0.join("cgroup.events")).unwrap_or_default();
        let freeze = std::fs::read_to_string(self.0.join("cgroup.freeze")).unwrap_or_default();
        freeze.trim() != "0" || events.lines().any(|l| l.trim() == "frozen 1")
    }

    /// Makes `cmd`'s child join the cgroup before it execs.
    fn join(&self, cmd: &mut Command) {
        join_cgroups_before_exec(cmd, &[self.0.join("cgroup.procs")]);
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.freeze"), "0");
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes a scratch directory when dropped (a failing test too).
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills stasis at every point of `kills` during checkpoints of a wl-survivor started with
/// `args`, checks the workload after each, then checkpoints and restores it normally.
fn survive(test: &str, args: &[&str], kills: &[(Kill, bool)], cgroup: Option<&OwnCgroup>) {
    let dir = scratch(test);
    let _cleanup = RemoveDir(dir.clone());
    let spawn = || match cgroup {
        Some(cg) => start_with("wl-survivor", args, |c| cg.join(c)),
        None => start("wl-survivor", args),
    };
    let mut wl = spawn();
    let mut guard = KillOnDrop(wl.pid);
    for (i, (kill, leave_running)) in kills.iter().enumerate() {
        let what = format!("{test}: kill {i} {kill:?} (leave_running {leave_running})");
        // Shown with a failure (the harness keeps a failing test's output).
        eprintln!("{what}");
        let img = dir.join(format!("{i}.img"));
        let tree = descendants(wl.pid);
        let died = checkpoint_killed(wl.pid, &img, *leave_running, kill);
        if let Some(cg) = cgroup {
            let deadline = Instant::now() + Duration::from_secs(5);
            while cg.frozen() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(!cg.frozen(), "{what}: the cgroup stayed frozen");
        }
        let alive = std::fs::read_to_string(format!("/proc/{}/stat", wl.pid))
            .is_ok_and(|s| !s.contains(") Z "));
        if !alive {
            // Only a committed image lets stasis kill it (the default, without
            // --leave-running): the workload then comes back from that image.
            assert!(
                !leave_running && img.exists(),
                "{what}: the workload died (stasis died: {died})"
            );
            let _ = wl.child.wait();
            reap_orphans(&tree);
            let (mut r, mut p) = restore(&img, true);
            assert!(
                r.wait().expect("restore").success(),
                "{what}: restore failed"
            );
            p.expect_pass(
                "verify",
                &format!("{what}: restored from the committed image"),
            );
            p.send("check");
            let _ = p.expect_line(&["PASS ", "FAIL "]);
            reap_orphans(&[wl.pid]);
            wl = spawn();
            guard = KillOnDrop(wl.pid);
            continue;
        }
        wait_untraced(wl.pid, &what);
        for c in descendants(wl.pid) {
            wait_untraced(c, &what);
        }
        wl.pipes.expect_pass("verify", &what);
        let _ = std::fs::remove_file(&img);
    }
    // A normal checkpoint and restore still work.
    let img = dir.join("final.img");
    let tree = descendants(wl.pid);
    stasis_ok(&[
        "checkpoint",
        &wl.pid.to_string(),
        "-o",
        img.to_str().expect("utf-8"),
    ]);
    let _ = wl.child.wait();
    reap_orphans(&tree);
    let (mut r, mut p) = restore(&img, false);
    p.expect_pass("check", &format!("{test}: after the final restore"));
    assert!(r.wait().expect("restore").success());
    std::mem::forget(guard);
    reap_orphans(&[wl.pid]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_large_process_runs_on_when_stasis_dies_during_its_checkpoint() {
    let mut kills: Vec<(Kill, bool)> = Vec::new();
    if failpoints_built("a_large_process_runs_on_when_stasis_dies_during_its_checkpoint") {
        for fp in POINTS {
            kills.push((Kill::At(fp), true));
            kills.push((Kill::At(fp), false));
        }
    }
    for k in sweep() {
        kills.push((k.clone(), true));
        kills.push((k, false));
    }
    survive(
        "death-large",
        &["--mib", "256", "--threads", "2", "--signals"],
        &kills,
        None,
    );
}

#[test]
fn a_tree_with_threads_runs_on_when_stasis_dies_during_its_checkpoint() {
    let test = "a_tree_with_threads_runs_on_when_stasis_dies_during_its_checkpoint";
    if !failpoints_built(test) {
        return;
    }
    // The root, then each child: frozen, mid-injection, injected; then the pages.
    let kills: Vec<(Kill, bool)> = [
        "frozen-process=1*off->return",
        "frozen-process=2*off->return",
        "between-injected-syscalls=40*off->return",
        "between-injected-syscalls=45*off->return",
        "injected-process=1*off->return",
        "injected-process=2*off->return",
        "pages-progress=3*off->return",
        "image-committed=return",
    ]
    .iter()
    .enumerate()
    .map(|(i, &fp)| (Kill::At(fp), i % 2 == 0))
    .collect();
    survive(
        "death-tree",
        &[
            "--mib",
            "48",
            "--threads",
            "2",
            "--children",
            "2",
            "--signals",
        ],
        &kills,
        None,
    );
}

#[test]
fn a_tree_in_its_own_cgroup_is_never_left_frozen_when_stasis_dies() {
    let test = "a_tree_in_its_own_cgroup_is_never_left_frozen_when_stasis_dies";
    let Some(cg) = OwnCgroup::make("tracer-death") else {
        skip(test, "no cgroup2 hierarchy with cgroup.freeze here");
        return;
    };
    if !failpoints_built(test) {
        return;
    }
    // Killed while the cgroup is frozen (only the guard can thaw it), then later.
    let kills: Vec<(Kill, bool)> = [
        ("preseize-frozen=return", true),
        ("preseize-frozen=return", false),
        ("frozen-process=1*off->return", true),
        ("injected-process=1*off->return", false),
        ("pages-progress=2*off->return", true),
    ]
    .iter()
    .map(|&(fp, leave)| (Kill::At(fp), leave))
    .collect();
    survive(
        "death-cgroup",
        &[
            "--mib",
            "32",
            "--threads",
            "2",
            "--children",
            "1",
            "--signals",
        ],
        &kills,
        Some(&cg),
    );
}

#[test]
fn a_signal_taken_while_being_seized_is_neither_lost_nor_delivered_twice() {
    let test = "a_signal_taken_while_being_seized_is_neither_lost_nor_delivered_twice";
    if !failpoints_built(test) {
        return;
    }
    // stasis sleeps between seizing each thread and interrupting it, so the running thread
    // takes one of the signals queued every millisecond (a signal-delivery stop: the kernel
    // has already taken it out of the queue); then it dies at a later point, or completes.
    const SEIZE: &str = "seized-thread=sleep(30)";
    let kills: Vec<(Kill, bool)> = [
        (
            Kill::At("seized-thread=sleep(30);frozen-process=return"),
            true,
        ),
        (
            Kill::At("seized-thread=sleep(30);frozen-process=return"),
            false,
        ),
        (
            Kill::At("seized-thread=sleep(30);between-injected-syscalls=return"),
            true,
        ),
        (
            Kill::At("seized-thread=sleep(30);injected-process=return"),
            false,
        ),
        (
            Kill::At("seized-thread=sleep(30);image-committed=return"),
            true,
        ),
        (Kill::Slowed(SEIZE), true),
        (Kill::Slowed(SEIZE), false),
    ]
    .into_iter()
    .collect();
    survive(
        "death-seize-signal",
        &["--mib", "8", "--threads", "2", "--signals"],
        &kills,
        None,
    );
}

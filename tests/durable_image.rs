//! When the image is made durable, relative to what happens to the workload: a checkpoint
//! that kills the workload kills it only once its image is synced and in place; one that
//! leaves it running resumes it first, as soon as every page is out of it, and syncs the
//! image while it runs (its frozen time does not include the device's).
//!
//! stasis is held inside the sync (FAILPOINTS="image-syncing=sleep(N)", a build with
//! `--features stasis/failpoints`, as scripts/test does) while the test looks at the
//! workload.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// MiB of data the workload holds: the image is at least this large once its pages are out.
const MIB: u64 = 16;

fn partial(img: &Path) -> PathBuf {
    let mut p = img.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Starts `stasis checkpoint PID -o IMG [extra]` held for `hold_ms` in the image's sync.
fn checkpoint_held(pid: i32, img: &Path, extra: &[&str], hold_ms: u64) -> Child {
    Command::new(stasis())
        .args(["checkpoint", &pid.to_string(), "-o"])
        .arg(img)
        .args(extra)
        .env("FAILPOINTS", format!("image-syncing=sleep({hold_ms})"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("running stasis checkpoint")
}

/// Waits until every page is written (the partial image holds the workload's data) while
/// stasis still runs; panics if stasis finishes first.
fn wait_pages_written(stasis: &mut Child, img: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            stasis.try_wait().expect("try_wait").is_none(),
            "{what}: stasis finished before its pages were seen written"
        );
        let len = std::fs::metadata(partial(img)).map_or(0, |m| m.len());
        if len >= MIB << 20 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: pages not written in 30 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Asserts that the image is not in place yet, then that stasis succeeds and leaves it
/// committed (in place, no partial file).
fn assert_commits_only_now(stasis: &mut Child, img: &Path) {
    assert!(!img.exists(), "the image is in place before it was synced");
    assert!(
        stasis.wait().expect("stasis").success(),
        "stasis checkpoint failed"
    );
    assert!(
        img.exists() && !partial(img).exists(),
        "the image was not committed"
    );
}

#[test]
fn leave_running_resumes_the_workload_before_its_image_is_synced() {
    let test = "leave_running_resumes_the_workload_before_its_image_is_synced";
    if !failpoints_built(test) {
        return;
    }
    let mut wl = start("wl-survivor", &["--mib", "16", "--threads", "1"]);
    let _guard = KillOnDrop(wl.pid);
    let dir = scratch("durable-leave");
    let img = dir.join("leave.img");
    let mut st = checkpoint_held(wl.pid, &img, &["--leave-running"], 4000);
    wait_pages_written(&mut st, &img, test);
    // stasis now sits in the sync (4 s): the workload must already run, untraced.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !running_untraced(wl.pid) {
        assert!(
            st.try_wait().expect("try_wait").is_none() && Instant::now() < deadline,
            "the workload was not resumed before its image was synced"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    wl.pipes
        .expect_pass("verify", "the workload while its image is synced");
    assert!(
        st.try_wait().expect("try_wait").is_none(),
        "stasis finished its sync before the workload had answered (held 4 s)"
    );
    assert_commits_only_now(&mut st, &img);
    // The original ends (its PIDs are the image's), and the image restores.
    wl.pipes
        .expect_pass("check", "the workload after the checkpoint");
    let _ = wl.child.wait();
    let (mut r, mut p) = restore(&img, false);
    p.expect_pass(
        "check",
        "restored from the image synced while the workload ran",
    );
    assert!(r.wait().expect("restore").success());
}

#[test]
fn a_killed_workload_dies_only_after_its_image_is_synced_and_in_place() {
    let test = "a_killed_workload_dies_only_after_its_image_is_synced_and_in_place";
    if !failpoints_built(test) {
        return;
    }
    let wl = start("wl-survivor", &["--mib", "16", "--threads", "1"]);
    let guard = KillOnDrop(wl.pid);
    let dir = scratch("durable-kill");
    let img = dir.join("kill.img");
    let mut st = checkpoint_held(wl.pid, &img, &[], 1500);
    wait_pages_written(&mut st, &img, test);
    // In the sync: the workload is alive (frozen), and its image not yet in place.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        st.try_wait().expect("try_wait").is_none(),
        "stasis finished its sync within 300 ms (held 1.5 s)"
    );
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", wl.pid)).unwrap_or_default();
    assert!(
        !stat.is_empty() && !stat.contains(") Z "),
        "the workload died before its image was synced: {stat:?}"
    );
    assert_commits_only_now(&mut st, &img);
    let mut child = wl.child;
    let _ = child.wait();
    std::mem::forget(guard);
    let (mut r, mut p) = restore(&img, false);
    p.expect_pass("verify", "restored after the synced checkpoint");
    p.send("check");
    let _ = p.expect_line(&["PASS ", "FAIL "]);
    assert!(r.wait().expect("restore").success());
}

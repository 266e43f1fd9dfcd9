//! Files restored as they were (issue 14): POSIX, flock and OFD locks and leases taken again
//! by their owners, signal owners (F_SETOWN_EX, F_SETSIG, O_ASYNC), a periodic timerfd that
//! had expired unread, memfd and deleted files with their mode, owner and times, a file
//! unlinked but linked elsewhere, and times of open and mapped files left alone. Each is
//! checked by the workload itself, locks from a process that shares nothing with it.

mod common;

use common::*;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// Removes a test's scratch directory and the files its workload (`pid`) made in the temp
/// directory; if the test failed, also kills the workload (it may still be running).
struct Leftovers {
    dir: PathBuf,
    pid: i32,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut tree = descendants(self.pid);
            tree.push(self.pid);
            for &p in &tree {
                kill(p);
            }
            reap_orphans(&tree);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        let tmp = std::env::temp_dir();
        let mine = format!("-{}-", self.pid);
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("stasis-wl-") && name.contains(&mine) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[test]
fn locks_leases_signal_owners_and_timerfd_survive_two_rounds() {
    init();
    round_trip("wl-locks", &[], &[]);
}

#[test]
fn file_modes_owners_times_and_links_survive_two_rounds() {
    init();
    round_trip("wl-fileattrs", &[], &[]);
}

/// A lock someone else took while the workload was away makes the restore fail, naming it,
/// before the workload runs; once it is given up the restore succeeds.
#[test]
fn a_lock_taken_by_someone_else_fails_the_restore() {
    init();
    let dir = scratch("locks-taken");
    let mut wl = start("wl-locks", &[]);
    let _leftovers = Leftovers {
        dir: dir.clone(),
        pid: wl.pid,
    };
    wl.pipes.expect_pass("verify", "before checkpoint");
    let pid = wl.pid.to_string();
    let img = dir.join("1.img");
    let imgs = img.to_str().expect("utf8");
    let tmp = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
    let p_path = format!("{tmp}/stasis-wl-locks-{pid}-P");
    stasis_ok(&["checkpoint", &pid, "-o", imgs]);
    wl.child.wait().expect("reap original");
    // The workload removes its files only when it exits after a check: P is still there.
    let p = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p_path)
        .expect("open P");
    // SAFETY: an all-zero flock is valid; fcntl on our own fd.
    let rc = unsafe {
        let mut l: libc::flock = std::mem::zeroed();
        l.l_type = libc::F_WRLCK as i16;
        l.l_whence = libc::SEEK_SET as i16;
        l.l_start = 0;
        l.l_len = 1;
        libc::fcntl(p.as_raw_fd(), libc::F_SETLK, &l)
    };
    assert_eq!(rc, 0, "taking the lock in the test");
    let out = stasis_fails(
        &["restore", imgs, "--detach"],
        4,
        "POSIX write lock on bytes 0..100",
    );
    assert!(out.contains("fd 10"), "the error names the fd: {out}");
    assert!(
        !running_untraced(wl.pid),
        "the workload must not run after a failed restore"
    );
    drop(p);
    let (mut r, mut pipes) = restore(&img, false);
    pipes.expect_pass("check", "after restore");
    assert!(r.wait().expect("stasis restore").success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A child blocked in F_SETLKW and flock on its parent's locks is blocked again after
/// restore (its call restarts and finds the locks held) and gets each lock once the parent
/// gives it up.
#[test]
fn a_child_waiting_for_a_lock_waits_again_after_restore() {
    init();
    let dir = scratch("lockwait");
    let mut wl = start("wl-lockwait", &[]);
    let _leftovers = Leftovers {
        dir: dir.clone(),
        pid: wl.pid,
    };
    wl.pipes.expect_pass("verify", "before checkpoint");
    let pid = wl.pid.to_string();
    let img = dir.join("1.img");
    let imgs = img.to_str().expect("utf8");
    let tree = descendants(wl.pid);
    stasis_ok(&["checkpoint", &pid, "-o", imgs]);
    wl.child.wait().expect("reap original");
    reap_orphans(&tree);
    let (mut r, mut pipes) = restore(&img, false);
    pipes.expect_pass("verify", "after restore");
    pipes.expect_pass("check", "after restore");
    assert!(r.wait().expect("stasis restore").success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A description whose signals go to a process outside the tree cannot be restored as it
/// was: the checkpoint is refused naming the process, the fd and the owner, and the workload
/// runs on untouched.
#[test]
fn a_signal_owner_outside_the_tree_is_refused() {
    init();
    let dir = scratch("owner-outside");
    let mut wl = start("wl-locks", &["--owner-outside"]);
    let _leftovers = Leftovers {
        dir: dir.clone(),
        pid: wl.pid,
    };
    let pid = wl.pid.to_string();
    let img = dir.join("1.img");
    let imgs = img.to_str().expect("utf8");
    let me = std::process::id();
    let err = stasis_fails(
        &["checkpoint", &pid, "-o", imgs],
        4,
        &format!("fd 11 sends its signals (F_SETOWN) to process {me}"),
    );
    assert!(err.contains(&pid), "the error names the process: {err}");
    wl.pipes
        .expect_pass("check", "after the refused checkpoint");
    wl.child.wait().expect("reap workload");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A checkpoint that leaves the workload running changes nothing it can see of its files:
/// reading a deleted file's contents must not give it a new access time.
#[test]
fn a_checkpoint_leaves_the_times_of_files_alone() {
    init();
    let dir = scratch("fileattrs-leave");
    let mut wl = start("wl-fileattrs", &[]);
    let _leftovers = Leftovers {
        dir: dir.clone(),
        pid: wl.pid,
    };
    let pid = wl.pid.to_string();
    let img = dir.join("1.img");
    let imgs = img.to_str().expect("utf8");
    stasis_ok(&["checkpoint", &pid, "--leave-running", "-o", imgs]);
    wl.pipes
        .expect_pass("check", "after a --leave-running checkpoint");
    wl.child.wait().expect("reap workload");
    let _ = std::fs::remove_dir_all(&dir);
}

//! Process trees that are a whole pid namespace: `unshare --pid --fork PROGRAM`, its root
//! (PID 1 inside) found from outside, its stdin/stdout pipes of the test.

use super::{clean, descendants, init, workload, Pipes};
use std::io::BufReader;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Stdio};

/// A wl-pidns tree under `unshare --pid --fork`.
pub struct NsTree {
    /// The unshare process (our child); it ends when the tree's root does.
    pub unshare: Child,
    /// The tree's root (PID 1 inside) as we see it, and a pidfd of it: it is unshare's
    /// child, not ours, so only the pidfd is sure to name it once it may have died.
    pub root: i32,
    pub root_fd: OwnedFd,
    pub pipes: Pipes,
}

impl Drop for NsTree {
    fn drop(&mut self) {
        // Killing a namespace's init ends every process in it.
        // SAFETY: pidfd_send_signal on a pidfd we own, no siginfo.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.root_fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        let _ = self.unshare.wait();
    }
}

pub fn pidfd_of(pid: i32) -> OwnedFd {
    // SAFETY: pidfd_open takes no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        fd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: pidfd_open just returned this fd; we own it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Starts `unshare --pid --fork UNSHARE_ARGS... WORKLOAD` (PID 1 of a new namespace) and
/// finds its root from outside.
pub fn start_in_ns(program: &str, unshare_args: &[&str], tag: &str) -> NsTree {
    let tag = format!("pidns{}{tag}", std::process::id());
    // The workload's data file, left behind when the test kills the workload.
    super::cleanup::remove_at_exit(
        &std::env::temp_dir().join(format!("stasis-wl-pidns-{tag}.dat")),
    );
    let wl = workload(program);
    let argv = [wl.as_os_str(), "--tag".as_ref(), tag.as_ref()];
    let (t, ready) = spawn_in_ns(unshare_args, &argv, &tag, "READY ");
    assert_eq!(ready, "READY 1");
    t
}

/// Starts `unshare --pid --fork UNSHARE_ARGS... ARGV...` (STASIS_WL_TAG=`tag`), waits for
/// its first line starting with `ready` (or FAIL), and finds its root from outside.
pub fn spawn_in_ns(
    unshare_args: &[&str],
    argv: &[&std::ffi::OsStr],
    tag: &str,
    ready: &str,
) -> (NsTree, String) {
    init();
    let mut unshare = clean("unshare")
        .args(["--pid", "--fork"])
        .args(unshare_args)
        .args(argv)
        .env("STASIS_WL_TAG", tag)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("unshare");
    let mut pipes = Pipes {
        stdin: unshare.stdin.take().expect("stdin"),
        stdout: BufReader::new(unshare.stdout.take().expect("stdout")),
    };
    let line = pipes.expect_line(&[ready, "FAIL "]);
    let root = ns_init_below(unshare.id() as i32);
    let t = NsTree {
        unshare,
        root,
        root_fd: pidfd_of(root),
        pipes,
    };
    (t, line)
}

/// The descendant of `pid` that is PID 1 of a pid namespace below ours.
pub fn ns_init_below(pid: i32) -> i32 {
    descendants(pid)
        .into_iter()
        .find(|&d| is_ns_init(d))
        .expect("a pid namespace's init")
}

/// Whether host PID `pid` is PID 1 of a pid namespace below ours (its last NSpid is 1).
pub fn is_ns_init(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .is_some_and(|ids| {
                ids.split_whitespace().count() > 1 && ids.split_whitespace().last() == Some("1")
            })
    })
}

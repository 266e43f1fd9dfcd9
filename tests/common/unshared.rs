//! A process of the test's own in a new namespace (`unshare --net sleep 1000`, ...), and
//! threads of the test that join that namespace.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process in a namespace of its own: `unshare --NS sleep 1000`, killed (by PID) and
/// reaped when dropped.
pub struct Unshared {
    child: Child,
    pub pid: i32,
    /// The namespace's name as unshare(1) and /proc/PID/ns name it: "net", "ipc", "uts".
    ns: &'static str,
}

/// The setns(2) type of namespace `ns`.
fn clone_flag(ns: &str) -> libc::c_int {
    match ns {
        "net" => libc::CLONE_NEWNET,
        "ipc" => libc::CLONE_NEWIPC,
        "uts" => libc::CLONE_NEWUTS,
        _ => panic!("no setns type for namespace {ns:?}"),
    }
}

/// The identity (device, inode) of a namespace file such as /proc/PID/ns/net.
pub fn ns_id(path: &str) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {path}: {e}"));
    (m.dev(), m.ino())
}

/// Moves the calling thread into namespace `file` of kind `ns` ("net", "ipc", ...). Only
/// this thread moves: call it on a thread that ends soon.
pub fn enter(file: &File, ns: &str) {
    // SAFETY: setns(2) on a valid fd; it changes a namespace of the calling thread only.
    let rc = unsafe { libc::setns(file.as_raw_fd(), clone_flag(ns)) };
    assert_eq!(rc, 0, "setns {ns}: {}", io::Error::last_os_error());
}

impl Unshared {
    pub fn new(ns: &'static str) -> Unshared {
        clone_flag(ns);
        let child = Command::new("unshare")
            .args([&format!("--{ns}"), "sleep", "1000"])
            .stdin(Stdio::null())
            .spawn()
            .expect("starting unshare sleep");
        let pid = child.id() as i32;
        let unshared = Unshared { child, pid, ns };
        // unshare(1) execs sleep once it is in its new namespace.
        let ours = ns_id(&format!("/proc/thread-self/ns/{ns}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns_id(&unshared.ns_path()) == ours {
            assert!(
                Instant::now() < deadline,
                "pid {pid} never left our {ns} ns"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        unshared
    }

    /// /proc/PID/ns/NS.
    pub fn ns_path(&self) -> String {
        format!("/proc/{}/ns/{}", self.pid, self.ns)
    }

    /// The namespace file, open.
    pub fn ns_file(&self) -> File {
        let path = self.ns_path();
        File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"))
    }

    /// Runs `f` on a thread that has joined this namespace (sockets it makes, SysV IPC
    /// objects it makes, live in there).
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let (file, ns) = (self.ns_file(), self.ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&file, ns);
                f()
            })
            .join()
            .expect("thread in the namespace")
        })
    }
}

impl Drop for Unshared {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

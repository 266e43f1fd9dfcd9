//! Small process-level system calls: signals, PID checks, the kernel's own facts.

use crate::error::{Result, RuntimeError};
use std::io;

/// Starts writeback of `len` bytes of `file` at `offset` (sync_file_range with
/// SYNC_FILE_RANGE_WRITE) without waiting for it: dirty pages of a file being written go to
/// the device while the rest is still being produced, so a final fsync finds little left.
pub fn start_writeback(file: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range takes no pointers; the fd is open for the call's duration.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `sig` to process `pid`.
pub fn kill(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: kill takes no pointers.
    if unsafe { libc::kill(pid, sig) } == -1 {
        return Err(RuntimeError::last_os("kill", format!("pid {pid}")));
    }
    Ok(())
}

/// Sends `sig` to thread `tid` of thread group `tgid`.
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> Result<()> {
    // SAFETY: tgkill takes no pointers.
    if unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) } == -1 {
        return Err(RuntimeError::last_os(
            "tgkill",
            format!("pid {tgid} tid {tid}"),
        ));
    }
    Ok(())
}

/// Who holds a PID right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidUse {
    Free,
    /// A process holds it (its comm and state letter from /proc).
    Taken {
        comm: String,
        state: char,
    },
}

/// Whether `pid` is free in this PID namespace (no process, no zombie).
pub fn pid_use(pid: i32) -> PidUse {
    match crate::procfs::read_stat(pid) {
        Ok(st) => PidUse::Taken {
            comm: st.comm,
            state: st.state,
        },
        Err(_) => {
            // SAFETY: kill with signal 0 only checks for existence.
            let rc = unsafe { libc::kill(pid, 0) };
            if rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
                PidUse::Taken {
                    comm: String::from("?"),
                    state: '?',
                }
            } else {
                PidUse::Free
            }
        }
    }
}

/// /proc/sys/kernel/pid_max.
pub fn pid_max() -> Result<i32> {
    let path = "/proc/sys/kernel/pid_max";
    let text = crate::procfs::read_text(path)?;
    text.trim().parse().map_err(|_| RuntimeError::Parse {
        path: path.into(),
        what: format!("not a number: {text:?}"),
    })
}

/// The kernel release (uname -r) and host name.
pub fn uname() -> (String, String) {
    // SAFETY: utsname is plain old data; all-zero is valid.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return (String::new(), String::new());
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (field(&u.release), field(&u.nodename))
}

/// XCR0 of this CPU: the xstate components the OS enabled.
pub fn xcr0() -> u64 {
    let leaf1 = std::arch::x86_64::__cpuid(1);
    if leaf1.ecx & (1 << 27) == 0 {
        return 0; // no OSXSAVE
    }
    // SAFETY: OSXSAVE is set, so XGETBV is allowed in user mode.
    unsafe { std::arch::x86_64::_xgetbv(0) }
}

const TERMINATION_SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// The set of [`TERMINATION_SIGNALS`].
fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain old data; sigemptyset initializes it and sigaddset adds to
    // this local.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in TERMINATION_SIGNALS {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Blocks SIGINT, SIGTERM, SIGHUP and SIGQUIT in the calling thread (and threads it starts)
/// until dropped. Used while a process is held stopped with injected registers: dying then
/// would let the kernel detach it mid-injection. A signal that arrives meanwhile stays
/// pending and takes effect once the guard is dropped, after the process is safe again.
pub struct TerminationSignalsBlocked {
    old: libc::sigset_t,
}

impl TerminationSignalsBlocked {
    pub fn new() -> Result<Self> {
        let set = termination_set();
        // SAFETY: sigset_t is plain old data; pthread_sigmask fills it.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: set and old are valid sigset_t values owned by this frame.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
        if rc != 0 {
            return Err(RuntimeError::sys(
                "pthread_sigmask",
                "termination signals",
                io::Error::from_raw_os_error(rc),
            ));
        }
        Ok(TerminationSignalsBlocked { old })
    }
}

impl Drop for TerminationSignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: old is the mask saved by new(); restoring it takes no other pointers.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

/// The blocked termination signal waiting for this process, if any (see
/// [`TerminationSignalsBlocked`]), without consuming it.
pub fn termination_pending() -> Option<i32> {
    // SAFETY: set is a valid sigset_t owned by this frame, filled by sigpending.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        if libc::sigpending(&mut set) != 0 {
            return None;
        }
        TERMINATION_SIGNALS
            .into_iter()
            .find(|s| libc::sigismember(&set, *s) == 1)
    }
}

/// Consumes a pending termination signal (so unblocking does not kill us), returning it.
pub fn take_termination_signal() -> Option<i32> {
    let sig = termination_pending()?;
    // SAFETY: set is a valid sigset_t holding only `sig`; the zero timeout never blocks.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
    }
    Some(sig)
}

/// setns(fd, nstype) on the calling thread; `path` names the namespace file in errors.
pub fn setns(fd: i32, nstype: i32, path: &std::path::Path) -> Result<()> {
    // SAFETY: setns takes an fd and a flag, no pointers.
    if unsafe { libc::setns(fd, nstype) } != 0 {
        return Err(RuntimeError::last_os("setns", path.display().to_string()));
    }
    Ok(())
}

/// Waits for our child `pid` to exit, passing SIGINT, SIGTERM, SIGHUP and SIGQUIT that
/// reach us on to it meanwhile. Returns its exit code (128+N if killed by signal N).
pub fn wait_forwarding(pid: i32) -> Result<i32> {
    let _blocked = TerminationSignalsBlocked::new()?;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child with a local status.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            if libc::WIFEXITED(status) {
                return Ok(libc::WEXITSTATUS(status));
            }
            if libc::WIFSIGNALED(status) {
                return Ok(128 + libc::WTERMSIG(status));
            }
            continue;
        }
        if r == -1 {
            return Err(RuntimeError::last_os("waitpid", format!("pid {pid}")));
        }
        let set = termination_set();
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 50_000_000,
        };
        // SAFETY: a local sigset_t and timespec; sigtimedwait waits up to 50 ms for one of
        // the blocked termination signals.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
        if sig > 0 {
            let _ = kill(pid, sig);
        }
    }
}

/// Opens /proc/PID/ns/KIND.
pub fn open_ns(pid: i32, kind: &str) -> Result<std::fs::File> {
    let path = format!("/proc/{pid}/ns/{kind}");
    std::fs::File::open(&path).map_err(|e| RuntimeError::sys("open", path, e))
}

/// Runs `f` on a short-lived thread of its own that has first joined namespace `ns` of type
/// `nstype` (setns). uts, ipc and net namespaces belong to each thread: the rest of this
/// process stays where it is, and threads `f` starts are in `ns` too. `what` names the
/// namespace in errors.
pub fn in_namespace<T: Send>(
    ns: std::os::fd::BorrowedFd<'_>,
    nstype: i32,
    what: &str,
    f: impl FnOnce() -> T + Send,
) -> Result<T> {
    use std::os::fd::AsRawFd;
    let fd = ns.as_raw_fd();
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            // SAFETY: setns takes no pointers; it changes only this thread's namespace.
            if unsafe { libc::setns(fd, nstype) } != 0 {
                return Err(RuntimeError::last_os("setns", what));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| RuntimeError::Unsupported(format!("a thread working in {what} panicked")))?
    })
}

/// [`in_namespace`] for namespace `kind` ("uts", "ipc", "net") of process `pid`.
pub fn in_namespace_of<T: Send>(pid: i32, kind: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    use std::os::fd::AsFd;
    let nstype = match kind {
        "uts" => libc::CLONE_NEWUTS,
        "ipc" => libc::CLONE_NEWIPC,
        "net" => libc::CLONE_NEWNET,
        _ => {
            return Err(RuntimeError::Unsupported(format!(
                "joining a {kind} namespace from a thread"
            )))
        }
    };
    let ns = open_ns(pid, kind)?;
    in_namespace(ns.as_fd(), nstype, &format!("/proc/{pid}/ns/{kind}"), f)
}

/// The host name in the UTS namespace of `pid`.
pub fn hostname_of(pid: i32) -> Result<String> {
    in_namespace_of(pid, "uts", || uname().1)
}

/// The calling thread is in the network namespace of another process until dropped (a
/// network namespace is per thread; sockets it creates and netlink queries it makes belong
/// to that namespace, and threads it starts inherit it).
pub struct InNetns {
    old: std::fs::File,
}

impl InNetns {
    pub fn enter(pid: i32) -> Result<Self> {
        Self::enter_file(&open_ns(pid, "net")?, &format!("/proc/{pid}/ns/net"))
    }

    /// Enters the namespace of an open namespace file (`what` names it in errors).
    pub fn enter_file(ns: &std::fs::File, what: &str) -> Result<Self> {
        use std::os::fd::AsRawFd;
        let path = "/proc/thread-self/ns/net";
        let old = std::fs::File::open(path).map_err(|e| RuntimeError::sys("open", path, e))?;
        setns(
            ns.as_raw_fd(),
            libc::CLONE_NEWNET,
            std::path::Path::new(what),
        )?;
        Ok(InNetns { old })
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on an fd we own; going back to the namespace we came from.
        unsafe { libc::setns(self.old.as_raw_fd(), libc::CLONE_NEWNET) };
    }
}

/// Runs `f` on a thread of its own whose root directory is `root` and whose working
/// directory is `cwd` inside it ("/" if that does not exist): the thread stops sharing its
/// filesystem context with the process (unshare(CLONE_FS)) first, so nothing else changes.
/// For path operations whose path must stay exactly as given but resolve as under another
/// root: binding a unix socket to its old name, which also keeps the name within the
/// 108 bytes of sun_path however long `root` is.
pub fn with_root<T: Send>(
    root: &std::path::Path,
    cwd: &str,
    f: impl FnOnce() -> T + Send,
) -> Result<T> {
    use std::os::unix::ffi::OsStrExt;
    let bad = |what: &str| RuntimeError::Unsupported(format!("{what} holds a NUL byte"));
    let c_root = std::ffi::CString::new(root.as_os_str().as_bytes()).map_err(|_| bad("root"))?;
    let c_cwd = std::ffi::CString::new(cwd).map_err(|_| bad("working directory"))?;
    let name = root.display().to_string();
    let target = &name;
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            // SAFETY: unshare(CLONE_FS) takes no pointers and affects only this thread.
            if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
                return Err(RuntimeError::last_os("unshare(CLONE_FS)", target));
            }
            // SAFETY: valid C strings; this thread's filesystem context is its own now.
            unsafe {
                if libc::chroot(c_root.as_ptr()) != 0 {
                    return Err(RuntimeError::last_os("chroot", target));
                }
                if libc::chdir(c_cwd.as_ptr()) != 0 && libc::chdir(c"/".as_ptr()) != 0 {
                    return Err(RuntimeError::last_os("chdir", target));
                }
            }
            Ok(f())
        })
        .join()
        .map_err(|_| {
            RuntimeError::Unsupported(format!("a thread working under {target} panicked"))
        })?
    })
}

/// [`in_namespace`] for the network namespace `net`: sockets made there are that
/// namespace's.
pub fn in_net_namespace<T: Send>(
    net: std::os::fd::BorrowedFd<'_>,
    f: impl FnOnce() -> T + Send,
) -> Result<T> {
    in_namespace(net, libc::CLONE_NEWNET, "another network namespace", f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_root_changes_only_its_own_thread() {
        let dir = std::env::temp_dir().join(format!("stasis-with-root-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("inside")).unwrap();
        std::fs::write(dir.join("inside/marker"), b"x").unwrap();
        let seen = with_root(&dir, "/inside", || {
            (
                std::path::Path::new("/inside/marker").exists(),
                std::path::Path::new("marker").exists(),
            )
        })
        .unwrap();
        assert_eq!(seen, (true, true));
        // The process's own root is untouched.
        assert!(std::path::Path::new("/proc/self").exists());
        assert!(dir.join("inside/marker").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Creating a container's first process: clone3 into new namespaces, prepare itself
//! ([`super::setup`]), then wait for the parent's go before it execs the command (`stasis
//! run`) or simply holds the namespaces open (restore builds the tree inside them).
//!
//! Two pipes connect parent and child. The child reports on `status` (close-on-exec): a
//! failed step as (index, errno), or READY once it is prepared; a successful exec closes it
//! with nothing more. It waits on `go`: a byte lets it continue, end-of-file (the parent is
//! gone, or gave up) makes it exit without running anything.

use super::setup::Op;
use super::ContainerError;
use crate::spawn::CloneArgs;
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const READY: u32 = u32::MAX;

/// What the child does once its parent says go.
#[derive(Debug, Clone)]
pub enum Then {
    /// execve the first of `paths` that exists (a PATH search done in advance).
    Exec {
        paths: Vec<CString>,
        argv: Vec<CString>,
        envp: Vec<CString>,
    },
    /// Keep the namespaces alive until the parent closes `go`, then exit 0.
    Hold,
}

/// How to start the container's first process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// CLONE_NEW* flags.
    pub namespaces: u64,
    pub ops: Vec<Op>,
    pub then: Then,
    /// Fds to become the child's 0, 1 and 2 (None: keep the parent's).
    pub stdio: [Option<RawFd>; 3],
}

/// A container process started by [`start`], prepared and waiting for [`Child::go`]. Dropped
/// before that, it is killed and reaped.
pub struct Child {
    pub pid: i32,
    go: Option<OwnedFd>,
    status: Option<OwnedFd>,
    ops: Vec<String>,
    done: bool,
}

fn pipe() -> Result<(OwnedFd, OwnedFd), ContainerError> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two c_ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(ContainerError::Sys(crate::RuntimeError::last_os(
            "pipe2",
            "container start",
        )));
    }
    // SAFETY: pipe2 just returned these two fds; we own them.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts the container's first process in new namespaces and waits until it has prepared
/// itself. Errors name the step that failed in the child.
pub fn start(launch: &Launch) -> Result<Child, ContainerError> {
    let (status_rd, status_wr) = pipe()?;
    let (go_rd, go_wr) = pipe()?;
    let args = CloneArgs {
        flags: launch.namespaces,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // Pointer arrays for execve, made before the fork.
    let (argv, envp): (Vec<*const libc::c_char>, Vec<*const libc::c_char>) = match &launch.then {
        Then::Exec { argv, envp, .. } => (
            argv.iter()
                .map(|a| a.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect(),
            envp.iter()
                .map(|a| a.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect(),
        ),
        Then::Hold => (Vec::new(), Vec::new()),
    };
    // SAFETY: args lives across the call. The child branch below runs only raw system calls
    // on data prepared before the fork and never returns.
    let rc = unsafe { crate::spawn::clone3(&args) };
    if rc < 0 {
        return Err(ContainerError::Sys(crate::RuntimeError::last_os(
            "clone3",
            "new container namespaces",
        )));
    }
    if rc == 0 {
        // SAFETY: we are the new child; see child_main.
        unsafe {
            // The parent's ends: with them open here the pipes would never report
            // end-of-file.
            libc::close(status_rd.as_raw_fd());
            libc::close(go_wr.as_raw_fd());
            child_main(
                launch,
                status_wr.as_raw_fd(),
                go_rd.as_raw_fd(),
                &argv,
                &envp,
            )
        }
    }
    drop(status_wr);
    drop(go_rd);
    let mut child = Child {
        pid: rc as i32,
        go: Some(go_wr),
        status: Some(status_rd),
        ops: launch.ops.iter().map(Op::describe).collect(),
        done: false,
    };
    match child.read_status()? {
        Some((READY, _)) => Ok(child),
        Some((step, errno)) => Err(child.failure(step, errno)),
        None => Err(ContainerError::Start {
            pid: child.pid,
            step: "preparing".into(),
            err: std::io::Error::other("it exited without a report"),
        }),
    }
}

impl Child {
    fn read_status(&mut self) -> Result<Option<(u32, i32)>, ContainerError> {
        let Some(fd) = self.status.as_ref() else {
            return Ok(None);
        };
        let mut f =
            std::fs::File::from(fd.try_clone().map_err(|e| {
                ContainerError::Sys(crate::RuntimeError::sys("dup", "status pipe", e))
            })?);
        let mut buf = [0u8; 8];
        let mut got = 0;
        while got < buf.len() {
            match f.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(ContainerError::Sys(crate::RuntimeError::sys(
                        "read",
                        "container status pipe",
                        e,
                    )))
                }
            }
        }
        if got < buf.len() {
            return Ok(None);
        }
        let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
        Ok(Some((step, errno)))
    }

    fn failure(&self, step: u32, errno: i32) -> ContainerError {
        let what = self
            .ops
            .get(step as usize)
            .cloned()
            .unwrap_or_else(|| "exec of the command".to_string());
        ContainerError::Start {
            pid: self.pid,
            step: what,
            err: std::io::Error::from_raw_os_error(errno),
        }
    }

    /// Lets a [`Then::Exec`] child exec its command; returns once the exec succeeded. (A
    /// [`Then::Hold`] child is ended by [`Child::release_hold`] instead.)
    pub fn go(&mut self) -> Result<(), ContainerError> {
        if let Some(go) = self.go.take() {
            let mut f = std::fs::File::from(go);
            std::io::Write::write_all(&mut f, b"g").map_err(|e| {
                ContainerError::Sys(crate::RuntimeError::sys(
                    "write",
                    format!("go to container process {}", self.pid),
                    e,
                ))
            })?;
        }
        match self.read_status()? {
            None => {
                self.done = true;
                Ok(())
            }
            Some((step, errno)) => Err(self.failure(step, errno)),
        }
    }

    /// The process belongs to the caller from now on (it is not killed on drop).
    pub fn keep(mut self) {
        self.done = true;
    }

    /// Ends a holder: it exits by itself once `go` is closed; we reap it.
    pub fn release_hold(mut self) {
        self.go = None;
        self.done = true;
        let mut st = 0;
        // SAFETY: waitpid on our own child, local status.
        unsafe { libc::waitpid(self.pid, &mut st, 0) };
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.done {
            // SAFETY: our own child, by PID; then reap it.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                let mut st = 0;
                libc::waitpid(self.pid, &mut st, 0);
            }
        }
    }
}

/// The child: run the steps, report, wait for go, then exec or hold.
///
/// # Safety
/// Must run in the freshly cloned child; only raw system calls on prepared data.
unsafe fn child_main(
    launch: &Launch,
    status: RawFd,
    go: RawFd,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    let report = |step: u32, errno: i32| {
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&step.to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        // SAFETY: a local buffer of 8 bytes.
        unsafe { libc::write(status, buf.as_ptr().cast(), buf.len()) };
    };
    for (i, op) in launch.ops.iter().enumerate() {
        // SAFETY: we are the fresh child (this function's contract).
        if let Err(errno) = unsafe { op.run() } {
            report(i as u32, errno);
            // SAFETY: leaving the child without running the parent's exit handlers.
            unsafe { libc::_exit(127) };
        }
    }
    report(READY, 0);
    if let Then::Hold = launch.then {
        // A holder keeps nothing of its parent's but the pipe it waits on (an inherited
        // lock or pipe end would otherwise live as long as it does).
        // SAFETY: close_range takes no pointers; `go` is kept.
        unsafe {
            if go > 0 {
                libc::syscall(libc::SYS_close_range, 0u32, (go - 1) as u32, 0u32);
            }
            libc::syscall(libc::SYS_close_range, (go + 1) as u32, u32::MAX, 0u32);
        }
    }
    let mut byte = 0u8;
    // SAFETY: one byte into a local.
    let n = unsafe { libc::read(go, (&mut byte as *mut u8).cast(), 1) };
    let Then::Exec { paths, .. } = &launch.then else {
        // SAFETY: as above.
        unsafe { libc::_exit(0) };
    };
    if n != 1 {
        // SAFETY: as above; the parent gave up.
        unsafe { libc::_exit(127) };
    }
    // SAFETY: plain fd and signal-mask calls on local data.
    unsafe {
        for (target, fd) in launch.stdio.iter().enumerate() {
            if let Some(fd) = fd {
                libc::dup2(*fd, target as i32);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // Nothing of ours but standard I/O reaches the container (an fd the caller left
        // open without close-on-exec would otherwise leak in, and a checkpoint would find
        // a pipe to the outside).
        close_all_from(3);
    }
    let mut errno = libc::ENOENT;
    for p in paths {
        // SAFETY: NUL-terminated path and pointer arrays made before the fork.
        unsafe { libc::execve(p.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        // SAFETY: reads this thread's errno.
        let e = unsafe { *libc::__errno_location() };
        if e != libc::ENOENT && e != libc::ENOTDIR {
            errno = e;
        }
    }
    report(launch.ops.len() as u32, errno);
    // SAFETY: as above.
    unsafe { libc::_exit(127) }
}

/// Candidate paths for `cmd`: itself if it has a '/', else each directory of the default
/// container PATH.
pub fn exec_paths(cmd: &str) -> Vec<CString> {
    let candidates: Vec<String> = if cmd.contains('/') {
        vec![cmd.to_string()]
    } else {
        DEFAULT_PATH
            .split(':')
            .map(|d| format!("{d}/{cmd}"))
            .collect()
    };
    candidates
        .into_iter()
        .filter_map(|c| CString::new(c).ok())
        .collect()
}

/// PATH inside a container.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Marks every fd from `first` up close-on-exec (close_range with CLOSE_RANGE_CLOEXEC).
pub fn close_all_from(first: u32) {
    // SAFETY: close_range takes no pointers; it only sets flags on this process's fds.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
}

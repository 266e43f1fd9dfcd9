//! A guard process that undoes what stasis did to a workload if stasis dies.
//!
//! stasis may be killed (SIGKILL, the OOM killer, a crash) while it holds a workload in a
//! state the workload cannot leave on its own: a frozen cgroup stays frozen for ever. Before
//! making such a change, stasis forks a guard that holds the read end of a pipe; stasis keeps
//! the write end. When the change is undone, [`Guard::disarm`] writes a "done" byte and the
//! guard exits doing nothing. If the write end closes without that byte (stasis died, or the
//! guard was dropped without being disarmed), the guard writes the prepared undo values into
//! their files (e.g. "0" into cgroup.freeze) and exits.
//!
//! stasis is multi-threaded, so the forked child runs only async-signal-safe code: every
//! path and value is prepared before the fork, and the child uses raw read/open/write/
//! close/_exit only (no allocation, no locks, no Rust runtime).

use crate::error::{Result, RuntimeError};
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// The "done" byte.
const DONE: u8 = b'd';

/// A running guard process; see the module documentation.
pub struct Guard {
    child: i32,
    done: Option<OwnedFd>,
}

/// One undo action: write `data` into the existing file at `path`.
struct Undo {
    path: CString,
    data: Vec<u8>,
}

impl Guard {
    /// Forks a guard that, unless disarmed, writes each `(path, data)` in order when stasis's
    /// end of its pipe closes.
    pub fn arm(undo: &[(&Path, &[u8])]) -> Result<Guard> {
        let undo: Vec<Undo> = undo
            .iter()
            .map(|(p, d)| {
                use std::os::unix::ffi::OsStrExt;
                CString::new(p.as_os_str().as_bytes())
                    .map(|path| Undo {
                        path,
                        data: d.to_vec(),
                    })
                    .map_err(|_| RuntimeError::Unsupported(format!("path {p:?} holds a NUL")))
            })
            .collect::<Result<_>>()?;
        let mut fds = [0i32; 2];
        // SAFETY: fds has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(RuntimeError::last_os("pipe2", "guard"));
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child only calls async-signal-safe functions (guard_main) and never
        // returns into Rust code of the parent's threads.
        let child = unsafe { libc::fork() };
        if child < 0 {
            return Err(RuntimeError::last_os("fork", "guard"));
        }
        if child == 0 {
            // SAFETY: we are the freshly forked child; guard_main never returns.
            unsafe { guard_main(read.as_raw_fd(), &undo) }
        }
        drop(read);
        Ok(Guard {
            child,
            done: Some(write),
        })
    }

    /// The guard's process ID.
    pub fn pid(&self) -> i32 {
        self.child
    }

    /// Tells the guard that everything was undone, and waits for it to exit.
    pub fn disarm(mut self) -> Result<()> {
        if let Some(fd) = self.done.take() {
            // SAFETY: writes one byte from a valid buffer to our own pipe end.
            let n = unsafe { libc::write(fd.as_raw_fd(), [DONE].as_ptr().cast(), 1) };
            if n != 1 {
                return Err(RuntimeError::last_os("write", "guard pipe"));
            }
        }
        self.reap();
        Ok(())
    }

    fn reap(&mut self) {
        self.done = None;
        if self.child > 0 {
            let mut status = 0;
            loop {
                // SAFETY: status is a valid out pointer; the child is ours.
                let rc = unsafe { libc::waitpid(self.child, &mut status, libc::__WALL) };
                if rc != -1 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    break;
                }
            }
            self.child = 0;
        }
    }
}

impl Drop for Guard {
    /// Dropped armed (an unexpected path), the guard undoes: closing the pipe without the
    /// "done" byte is exactly what stasis's death does.
    fn drop(&mut self) {
        self.reap();
    }
}

/// The guard's whole life. Async-signal-safe calls only.
///
/// # Safety
/// Only to be called in a child just forked by [`Guard::arm`].
unsafe fn guard_main(read: i32, undo: &[Undo]) -> ! {
    // SAFETY: raw, async-signal-safe system calls on plain values and on buffers prepared
    // before the fork; nothing allocates or takes a lock.
    unsafe {
        // Signals aimed at stasis's process group (Ctrl-C, a hangup) must not take the
        // guard along: it ends when the pipe says so.
        let mut ign: libc::sigaction = std::mem::zeroed();
        ign.sa_sigaction = libc::SIG_IGN;
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGPIPE,
            libc::SIGTSTP,
            libc::SIGTTIN,
            libc::SIGTTOU,
        ] {
            libc::sigaction(sig, &ign, std::ptr::null_mut());
        }
        // Nothing else of stasis's stays open here (its write end of the pipe above all,
        // and the standard streams a caller may wait on).
        let close_range = |first: u32, last: u32| {
            libc::syscall(libc::SYS_close_range, first, last, 0u32);
        };
        if read > 0 {
            close_range(0, read as u32 - 1);
        }
        close_range(read as u32 + 1, u32::MAX);
        let mut byte = 0u8;
        loop {
            let n = libc::read(read, (&mut byte as *mut u8).cast(), 1);
            if n == 1 && byte == DONE {
                libc::_exit(0);
            }
            if n == 0 {
                break;
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if n < 0 {
                break;
            }
        }
        for u in undo {
            let fd = libc::open(u.path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, u.data.as_ptr().cast(), u.data.len());
                libc::close(fd);
            }
        }
        libc::_exit(0)
    }
}

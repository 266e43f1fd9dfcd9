//! Taking back the file locks, leases and signal owners of the image, by syscalls injected
//! into the process that held them, once every process of the tree is built and before any
//! runs. Then nothing of the restore opens or closes a file any more: a close of any fd of
//! a file drops the process's POSIX locks on it, and an open breaks a lease. Locks and
//! leases come first, for the whole tree ([`Pass::Locks`]); signal owners after them
//! ([`Pass::Owners`]), since taking a lease makes its taker the description's owner. A lock
//! someone else holds now fails the restore, naming it, before anything runs.

use crate::error::RestoreError;
use stasis_image::proto::{self, FdKind, LockKind};
use stasis_runtime::files::{OwnerEx, F_SETOWN_EX, F_SETSIG};
use stasis_runtime::inject::Injector;
use stasis_runtime::memory;

/// Which half of the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// POSIX, OFD and flock locks, and leases.
    Locks,
    /// O_ASYNC, F_SETSIG and F_SETOWN_EX.
    Owners,
}

/// The process being finished: its injector, its PID as the restorer sees it, and scratch
/// memory in it (at least 64 bytes) for the structures the calls read.
pub struct Target<'a> {
    pub inj: &'a mut Injector,
    pub pid: i32,
    pub scratch: u64,
}

impl Target<'_> {
    fn poke(&self, bytes: &[u8]) -> Result<u64, RestoreError> {
        memory::write_remote(self.pid, &[(self.scratch, bytes.len())], bytes).map_err(|cause| {
            RestoreError::Apply {
                pid: self.pid,
                cause,
            }
        })?;
        Ok(self.scratch)
    }

    /// One injected call; Err(errno) if it failed.
    fn call(&mut self, nr: libc::c_long, args: &[u64]) -> Result<Result<u64, i32>, RestoreError> {
        let pid = self.pid;
        let rc = self
            .inj
            .raw(nr, args)
            .map_err(|cause| RestoreError::Apply { pid, cause })?;
        Ok(if (-4095..0).contains(&rc) {
            Err(-rc as i32)
        } else {
            Ok(rc as u64)
        })
    }
}

fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// What a lock is, for messages.
fn describe(l: &proto::FileLock) -> String {
    let ty = if l.r#type == libc::F_WRLCK as u32 {
        "write"
    } else {
        "read"
    };
    let range = if l.len == 0 {
        format!("bytes {} to the end of the file", l.start)
    } else {
        format!("bytes {}..{}", l.start, l.start.saturating_add(l.len))
    };
    match l.kind() {
        LockKind::Posix => format!("POSIX {ty} lock on {range}"),
        LockKind::Ofd => format!("OFD {ty} lock on {range}"),
        LockKind::Flock => format!("flock {ty} lock"),
        LockKind::Lease => format!("{ty} lease"),
        LockKind::Unspecified => "lock of no kind".into(),
    }
}

/// `struct flock` as fcntl reads it (x86-64: 32 bytes).
fn flock_bytes(l: &proto::FileLock) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    b.extend_from_slice(&(l.r#type as i16).to_ne_bytes());
    b.extend_from_slice(&(libc::SEEK_SET as i16).to_ne_bytes());
    b.extend_from_slice(&[0u8; 4]);
    b.extend_from_slice(&(l.start as i64).to_ne_bytes());
    b.extend_from_slice(&(l.len as i64).to_ne_bytes());
    // l_pid: must be 0 for OFD locks.
    b.extend_from_slice(&0i32.to_ne_bytes());
    b.extend_from_slice(&[0u8; 4]);
    b
}

/// Does `pass` for process `p` (of the image's processes `procs`, in image order).
pub fn take(
    t: &mut Target<'_>,
    procs: &[&proto::Process],
    p: &proto::Process,
    pass: Pass,
) -> Result<(), RestoreError> {
    for f in p.fds.iter().filter(|f| f.kind() != FdKind::Inherited) {
        match pass {
            Pass::Locks => {
                for l in &f.locks {
                    take_lock(t, p, f, l)?;
                }
            }
            Pass::Owners => set_owner(t, procs, p, f)?,
        }
    }
    Ok(())
}

fn take_lock(
    t: &mut Target<'_>,
    p: &proto::Process,
    f: &proto::Fd,
    l: &proto::FileLock,
) -> Result<(), RestoreError> {
    let fd = f.fd as u64;
    let write = l.r#type == libc::F_WRLCK as u32;
    let rc = match l.kind() {
        LockKind::Posix | LockKind::Ofd => {
            let cmd = if l.kind() == LockKind::Posix {
                libc::F_SETLK
            } else {
                libc::F_OFD_SETLK
            };
            let at = t.poke(&flock_bytes(l))?;
            t.call(libc::SYS_fcntl, &[fd, cmd as u64, at])?
        }
        LockKind::Flock => {
            let op = if write { libc::LOCK_EX } else { libc::LOCK_SH } | libc::LOCK_NB;
            t.call(libc::SYS_flock, &[fd, op as u64])?
        }
        LockKind::Lease => {
            let ty = if write { libc::F_WRLCK } else { libc::F_RDLCK };
            t.call(libc::SYS_fcntl, &[fd, libc::F_SETLEASE as u64, ty as u64])?
        }
        LockKind::Unspecified => {
            return Err(RestoreError::Invalid(format!(
                "process {}: fd {} has a lock of no kind",
                p.pid, f.fd
            )))
        }
    };
    rc.map(|_| ()).map_err(|errno| {
        let why = match errno {
            libc::EAGAIN | libc::EACCES => {
                " (another process holds a conflicting lock or has the file open)"
            }
            _ => "",
        };
        RestoreError::Unsupported(format!(
            "process {}: fd {} ({}): its {} cannot be taken again: {}{why}",
            p.pid,
            f.fd,
            f.path,
            describe(l),
            errno_text(errno)
        ))
    })
}

fn set_owner(
    t: &mut Target<'_>,
    procs: &[&proto::Process],
    p: &proto::Process,
    f: &proto::Fd,
) -> Result<(), RestoreError> {
    let fd = f.fd as u64;
    let failed = |what: &str, errno: i32| {
        RestoreError::Unsupported(format!(
            "process {}: fd {}: {what}: {}",
            p.pid,
            f.fd,
            errno_text(errno)
        ))
    };
    if f.flags & libc::O_ASYNC as u32 != 0 {
        let fl = t
            .call(libc::SYS_fcntl, &[fd, libc::F_GETFL as u64])?
            .map_err(|e| failed("F_GETFL", e))?;
        if fl & libc::O_ASYNC as u64 == 0 {
            t.call(
                libc::SYS_fcntl,
                &[fd, libc::F_SETFL as u64, fl | libc::O_ASYNC as u64],
            )?
            .map_err(|e| failed("setting O_ASYNC", e))?;
        }
    }
    let Some(o) = &f.owner else {
        return Ok(());
    };
    if o.signal != 0 {
        t.call(libc::SYS_fcntl, &[fd, F_SETSIG as u64, o.signal as u64])?
            .map_err(|e| failed(&format!("F_SETSIG({})", o.signal), e))?;
    }
    if o.process == 0 {
        return Ok(());
    }
    let invalid = || {
        RestoreError::Invalid(format!(
            "process {}: fd {}: its signal owner is process #{} (thread #{}), which the image \
             does not hold",
            p.pid, f.fd, o.process, o.thread
        ))
    };
    let q = procs
        .get(o.process as usize - 1)
        .filter(|q| !q.zombie || o.r#type == 2)
        .ok_or_else(invalid)?;
    let pid = match o.r#type {
        0 => q.threads.get(o.thread as usize).ok_or_else(invalid)?.tid as i32,
        2 => q.pgid as i32,
        _ => q.pid as i32,
    };
    let ex = OwnerEx {
        kind: o.r#type,
        pid,
    };
    let mut bytes = Vec::with_capacity(8);
    bytes.extend_from_slice(&ex.kind.to_ne_bytes());
    bytes.extend_from_slice(&ex.pid.to_ne_bytes());
    let at = t.poke(&bytes)?;
    t.call(libc::SYS_fcntl, &[fd, F_SETOWN_EX as u64, at])?
        .map_err(|e| failed(&format!("F_SETOWN_EX(type {}, {pid})", o.r#type), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_flock_matches_the_kernel_layout() {
        let l = proto::FileLock {
            kind: LockKind::Ofd as i32,
            r#type: libc::F_WRLCK as u32,
            start: 10,
            len: 0,
        };
        let b = flock_bytes(&l);
        assert_eq!(b.len(), std::mem::size_of::<libc::flock>());
        // SAFETY: libc::flock is plain data of exactly this size.
        let f: libc::flock = unsafe { std::ptr::read_unaligned(b.as_ptr().cast()) };
        assert_eq!(
            (f.l_type as i32, f.l_whence as i32),
            (libc::F_WRLCK, libc::SEEK_SET)
        );
        assert_eq!((f.l_start, f.l_len, f.l_pid), (10, 0, 0));
    }

    #[test]
    fn messages_name_the_lock() {
        let l = proto::FileLock {
            kind: LockKind::Posix as i32,
            r#type: libc::F_RDLCK as u32,
            start: 0,
            len: 2,
        };
        assert_eq!(describe(&l), "POSIX read lock on bytes 0..2");
    }
}

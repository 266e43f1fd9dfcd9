//! Open files of another process: comparing descriptions (kcmp), taking a copy of one
//! (pidfd_getfd), and reading what sits in a pipe without consuming it (tee).

use crate::error::{Result, RuntimeError};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const KCMP_FILE: libc::c_long = 0;
const KCMP_VM: libc::c_long = 1;
const KCMP_FILES: libc::c_long = 2;

/// What two processes may share besides single files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    /// One address space (clone(CLONE_VM) without CLONE_THREAD, as vfork leaves it).
    AddressSpace,
    /// One fd table (clone(CLONE_FILES) without CLONE_THREAD).
    FdTable,
}

/// kcmp(2): whether the kernel objects `kind` of two processes (and indexes) are one.
fn kcmp(pid1: i32, pid2: i32, kind: libc::c_long, idx: (i32, i32), what: String) -> Result<bool> {
    // SAFETY: kcmp takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, kind, idx.0, idx.1) };
    if r < 0 {
        return Err(RuntimeError::last_os("kcmp", what));
    }
    Ok(r == 0)
}

/// Whether processes `pid1` and `pid2` share `what`.
pub fn share(pid1: i32, pid2: i32, what: Shared) -> Result<bool> {
    let kind = match what {
        Shared::AddressSpace => KCMP_VM,
        Shared::FdTable => KCMP_FILES,
    };
    let target = format!("pids {pid1} and {pid2} ({what:?})");
    kcmp(pid1, pid2, kind, (0, 0), target)
}

/// Whether fd `fd1` of `pid1` and fd `fd2` of `pid2` are one open file description.
pub fn same_description(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> Result<bool> {
    let target = format!("KCMP_FILE pid {pid1} fd {fd1} / pid {pid2} fd {fd2}");
    kcmp(pid1, pid2, KCMP_FILE, (fd1, fd2), target)
}

/// A copy (in this process) of fd `fd` of process `pid`: the same open file description.
pub fn take_copy(pid: i32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes no pointers; the result is a new fd we own.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return Err(RuntimeError::last_os("pidfd_open", format!("pid {pid}")));
    }
    // SAFETY: pidfd was just returned and is owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: pidfd_getfd takes no pointers; the result is a new fd we own.
    let fd_copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if fd_copy < 0 {
        return Err(RuntimeError::last_os(
            "pidfd_getfd",
            format!("pid {pid} fd {fd}"),
        ));
    }
    // SAFETY: as above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd_copy as i32) })
}

/// The capacity of pipe `fd` (either end).
pub fn pipe_size(fd: &OwnedFd, what: &str) -> Result<u32> {
    // SAFETY: fcntl on an fd we own; no pointers.
    let size = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if size < 0 {
        return Err(RuntimeError::last_os("F_GETPIPE_SZ", what));
    }
    Ok(size as u32)
}

/// The capacity of pipe `fd` (a read end) and a copy of the bytes in its buffer; the pipe is
/// unchanged.
pub fn pipe_contents(fd: &OwnedFd, what: &str) -> Result<(u32, Vec<u8>)> {
    let raw = fd.as_raw_fd();
    let size = pipe_size(fd, what)? as libc::c_int;
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to a local.
    if unsafe { libc::ioctl(raw, libc::FIONREAD, &mut queued) } < 0 {
        return Err(RuntimeError::last_os("ioctl(FIONREAD)", what));
    }
    if queued <= 0 {
        return Ok((size as u32, Vec::new()));
    }
    let mut ends = [0i32; 2];
    // SAFETY: ends is a valid array of two c_ints for pipe2 to fill.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(RuntimeError::last_os("pipe2", what));
    }
    // SAFETY: pipe2 just returned these fds; we own them.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    // As many buffer slots as the source, so one tee takes everything. Checked: a smaller
    // copy would silently lose the tail.
    // SAFETY: fcntl on our own pipe.
    if unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, size) } < size {
        return Err(RuntimeError::last_os(
            "F_SETPIPE_SZ (copying a pipe buffer)",
            what,
        ));
    }
    // SAFETY: tee between two pipes; no pointers.
    let n = unsafe {
        libc::tee(
            raw,
            wr.as_raw_fd(),
            queued as usize,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(RuntimeError::last_os("tee", what));
    }
    if n != queued as isize {
        return Err(RuntimeError::Protocol {
            op: "tee",
            pid: 0,
            what: format!("{what}: copied {n} of the {queued} buffered bytes"),
        });
    }
    let mut data = vec![0u8; queued as usize];
    let mut done = 0;
    while done < data.len() {
        // SAFETY: reads into the unfilled part of a live buffer.
        let r = unsafe {
            libc::read(
                rd.as_raw_fd(),
                data[done..].as_mut_ptr().cast(),
                data.len() - done,
            )
        };
        if r <= 0 {
            return Err(RuntimeError::last_os("read (pipe copy)", what));
        }
        done += r as usize;
    }
    Ok((size as u32, data))
}

/// Whether every end of the other kind is closed (everywhere in the system): for a read end,
/// no writer is left (POLLHUP); for a write end, no reader (POLLERR).
pub fn pipe_peer_closed(fd: &OwnedFd, reading: bool, what: &str) -> Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: polls one pollfd on the stack without waiting.
    if unsafe { libc::poll(&mut p, 1, 0) } < 0 {
        return Err(RuntimeError::last_os("poll", what));
    }
    let bit = if reading {
        libc::POLLHUP
    } else {
        libc::POLLERR
    };
    Ok(p.revents & bit != 0)
}

/// The path (as /proc links show it to this process) of the file a watch of process `pid`
/// names by file handle: the handle is opened with open_by_handle_at on a mount of its
/// filesystem (`sdev` as the kernel encodes it) that `pid` sees, reached through its root.
pub fn path_of_handle(pid: i32, sdev: u64, handle_type: i32, handle: &[u8]) -> Result<String> {
    let what = format!("file handle on device {}:{}", sdev >> 20, sdev & 0xfffff);
    let want = format!("{}:{}", sdev >> 20, sdev & 0xfffff);
    let info = format!("/proc/{pid}/mountinfo");
    let mountinfo =
        std::fs::read_to_string(&info).map_err(|e| RuntimeError::sys("read", &info, e))?;
    let mount = mountinfo
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&want.as_str()))
        .and_then(|f| {
            f.get(4)
                .map(|m| format!("/proc/{pid}/root{}", m.trim_end_matches('/')))
        })
        .ok_or_else(|| RuntimeError::Protocol {
            op: "open_by_handle_at",
            pid: 0,
            what: format!("{what}: no mount of that device is visible"),
        })?;
    let c = std::ffi::CString::new(mount.clone()).map_err(|_| RuntimeError::Protocol {
        op: "open_by_handle_at",
        pid: 0,
        what: format!("mount point {mount:?} holds NUL"),
    })?;
    // SAFETY: c is a valid C string; the result is a new fd we own.
    let mfd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if mfd < 0 {
        return Err(RuntimeError::last_os("open", mount));
    }
    // SAFETY: mfd was just opened and is owned by nobody else.
    let mfd = unsafe { OwnedFd::from_raw_fd(mfd) };
    // struct file_handle: u32 handle_bytes, i32 handle_type, then the bytes.
    let mut fh = Vec::with_capacity(8 + handle.len());
    fh.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
    fh.extend_from_slice(&handle_type.to_ne_bytes());
    fh.extend_from_slice(handle);
    // SAFETY: fh is a valid struct file_handle of handle_bytes = handle.len().
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mfd.as_raw_fd(),
            fh.as_mut_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(RuntimeError::last_os("open_by_handle_at", what));
    }
    // SAFETY: fd was just returned and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| RuntimeError::sys("readlink", what.clone(), e))?;
    Ok(path.to_string_lossy().into_owned())
}

/// fcntl commands the libc crate lacks on this target (asm-generic/fcntl.h).
pub const F_SETSIG: i32 = 10;
pub const F_GETSIG: i32 = 11;
pub const F_SETOWN_EX: i32 = 15;
pub const F_GETOWN_EX: i32 = 16;

/// `struct f_owner_ex` of F_GETOWN_EX/F_SETOWN_EX: F_OWNER_TID (0), F_OWNER_PID (1) or
/// F_OWNER_PGRP (2), and the id.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct OwnerEx {
    pub kind: i32,
    pub pid: i32,
}

/// Who gets the signals of open file description `fd` (F_GETOWN_EX: type and pid, in this
/// process's pid namespace; pid 0 for none) and which signal (F_GETSIG; 0 is SIGIO).
pub fn signal_owner(fd: &OwnedFd, what: &str) -> Result<(i32, i32, i32)> {
    let mut owner = OwnerEx::default();
    // SAFETY: F_GETOWN_EX writes one struct f_owner_ex to a local.
    if unsafe { libc::fcntl(fd.as_raw_fd(), F_GETOWN_EX, &mut owner) } < 0 {
        return Err(RuntimeError::last_os("fcntl(F_GETOWN_EX)", what));
    }
    // SAFETY: fcntl(F_GETSIG) takes no pointers.
    let sig = unsafe { libc::fcntl(fd.as_raw_fd(), F_GETSIG) };
    if sig < 0 {
        return Err(RuntimeError::last_os("fcntl(F_GETSIG)", what));
    }
    Ok((owner.kind, owner.pid, sig))
}

/// timerfd_gettime(2) of timerfd `fd`: (remaining ns, interval ns). Unlike fdinfo, which
/// shows 0 left for a periodic timer that expired and was not read since, this moves such a
/// timer on to its next expiry (counting the missed ones in its ticks, as a read would).
pub fn timerfd_time(fd: &OwnedFd, what: &str) -> Result<(u64, u64)> {
    let mut its = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
    };
    // SAFETY: timerfd_gettime writes one itimerspec to a local.
    if unsafe { libc::timerfd_gettime(fd.as_raw_fd(), &mut its) } < 0 {
        return Err(RuntimeError::last_os("timerfd_gettime", what));
    }
    let ns = |t: libc::timespec| (t.tv_sec as u64) * 1_000_000_000 + t.tv_nsec as u64;
    Ok((ns(its.it_value), ns(its.it_interval)))
}

/// A file handle (name_to_handle_at) of the file open at `fd`: (handle type, bytes).
pub fn file_handle(fd: &OwnedFd, what: &str) -> Result<(i32, Vec<u8>)> {
    const MAX_HANDLE_SZ: usize = 128;
    // struct file_handle: u32 handle_bytes, i32 handle_type, then the bytes.
    let mut buf = vec![0u8; 8 + MAX_HANDLE_SZ];
    buf[..4].copy_from_slice(&(MAX_HANDLE_SZ as u32).to_ne_bytes());
    let mut mount_id: libc::c_int = 0;
    // SAFETY: buf is a file_handle with room for MAX_HANDLE_SZ bytes; mount_id is a local;
    // the empty path with AT_EMPTY_PATH names `fd` itself.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr(),
            &mut mount_id as *mut libc::c_int,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(RuntimeError::last_os("name_to_handle_at", what));
    }
    let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let kind = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    let bytes = buf.get(8..8 + len).unwrap_or_default().to_vec();
    Ok((kind, bytes))
}

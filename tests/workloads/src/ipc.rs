//! Raw fork, pipe and line I/O for the multi-process workloads (`wl-tree`, `wl-pidns`): every
//! call is the plain syscall, errors become messages naming it, and reads are bounded.

use std::time::Instant;

use crate::sys;

/// Both ends of a pipe.
#[derive(Clone, Copy)]
pub struct Pipe {
    /// Read end.
    pub r: i32,
    /// Write end.
    pub w: i32,
}

/// fork(2): the child's pid, 0 in the child.
pub fn fork() -> Result<i32, String> {
    // SAFETY: every process of the tree is single-threaded when it forks.
    sys::cvt(unsafe { libc::fork() }, "fork")
}

/// _exit(2): ends a forked child without running the exit handlers it inherited.
pub fn exit(code: i32) -> ! {
    // SAFETY: _exit ends a child without running exit handlers inherited from its parent.
    unsafe { libc::_exit(code) }
}

/// Closes an fd this process owns and no longer uses.
pub fn close(fd: i32) {
    // SAFETY: closes an fd this process owns and no longer uses.
    unsafe { libc::close(fd) };
}

/// kill(2).
pub fn kill(pid: i32, sig: i32) -> Result<(), String> {
    // SAFETY: kill takes no pointers.
    sys::cvt(
        unsafe { libc::kill(pid, sig) },
        &format!("kill({pid}, {sig})"),
    )
    .map(drop)
}

/// getppid(2).
pub fn getppid() -> i32 {
    // SAFETY: getppid cannot fail.
    unsafe { libc::getppid() }
}

/// pipe(2), blocking, not close-on-exec.
pub fn pipe() -> Result<Pipe, String> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two fds.
    sys::cvt(unsafe { libc::pipe(fds.as_mut_ptr()) }, "pipe")?;
    Ok(Pipe {
        r: fds[0],
        w: fds[1],
    })
}

/// Bytes buffered in a pipe (`FIONREAD`: reads nothing).
pub fn pipe_bytes(fd: i32) -> Result<usize, String> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD stores one int into `n`.
    let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    sys::cvt(rc, &format!("ioctl(fd {fd}, FIONREAD)"))?;
    Ok(n as usize)
}

/// Waits until `fd` is readable (EINTR retried), at most until `deadline`.
pub fn wait_readable(fd: i32, deadline: Instant) -> Result<(), String> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("timed out waiting for data on fd {fd}"));
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as i32) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 && sys::errno() != libc::EINTR {
            return Err(sys::os_err(&format!("poll(fd {fd})")));
        }
    }
}

/// Reads one line, a byte per `read` (nothing past it is consumed); `Ok(None)` at EOF.
pub fn read_line(
    fd: i32,
    deadline: Option<Instant>,
    eintr: &mut u32,
) -> Result<Option<String>, String> {
    let mut line = Vec::new();
    loop {
        if let Some(d) = deadline {
            wait_readable(fd, d)?;
        }
        let mut b = 0u8;
        // SAFETY: reads at most one byte into the local `b`.
        let n = unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) };
        match n {
            0 if line.is_empty() => return Ok(None),
            0 => return Err(format!("EOF in the middle of a line on fd {fd}")),
            1 if b == b'\n' => return Ok(Some(String::from_utf8_lossy(&line).into_owned())),
            1 => line.push(b),
            _ if sys::errno() == libc::EINTR => *eintr += 1,
            _ if sys::errno() == libc::EAGAIN => {}
            _ => return Err(sys::os_err(&format!("read(fd {fd})"))),
        }
    }
}

/// Reads exactly `n` bytes, waiting at most until `deadline`.
pub fn read_exact(fd: i32, n: usize, deadline: Instant) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; n];
    let mut got = 0;
    while got < n {
        wait_readable(fd, deadline).map_err(|e| format!("{e} (after {got} of {n} bytes)"))?;
        // SAFETY: the pointer and length describe the unfilled tail of `out`.
        let r = unsafe { libc::read(fd, out[got..].as_mut_ptr().cast(), n - got) };
        if r == 0 {
            return Err(format!("EOF on fd {fd} after {got} of {n} bytes"));
        }
        if r < 0 && ![libc::EINTR, libc::EAGAIN].contains(&sys::errno()) {
            return Err(sys::os_err(&format!(
                "read(fd {fd}) after {got} of {n} bytes"
            )));
        }
        got += r.max(0) as usize;
    }
    Ok(out)
}

/// `pread` of up to `len` bytes at `off` (fewer at the end of the file).
pub fn pread(fd: i32, len: usize, off: i64) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` holds `len` writable bytes.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), len, off) };
    sys::cvt_long(n as i64, &format!("pread(fd {fd}, {len}, {off})"))?;
    buf.truncate(n as usize);
    Ok(buf)
}

/// Closes every fd but 0, 1, 2 and `keep`.
pub fn keep_only(keep: &[i32]) {
    let mut k: Vec<u32> = keep.iter().map(|&f| f as u32).chain([0, 1, 2]).collect();
    k.sort_unstable();
    k.dedup();
    let mut from = 0u32;
    for fd in k.into_iter().chain([u32::MAX]) {
        if fd > from {
            // SAFETY: closes only fds this process does not use.
            unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) };
        }
        from = fd.saturating_add(1);
    }
}

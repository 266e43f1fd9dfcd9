//! Small wrappers around raw syscalls that turn failures into messages naming the call.

use std::ffi::CString;
use std::io;
use std::path::PathBuf;

/// The current `errno` value.
pub fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `"<what>: <strerror(errno)>"` for the current `errno`.
pub fn os_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

/// Turns a `-1`-on-error return value into `Err("<what>: <errno>")`.
pub fn cvt(ret: libc::c_int, what: &str) -> Result<libc::c_int, String> {
    if ret == -1 {
        Err(os_err(what))
    } else {
        Ok(ret)
    }
}

/// Like [`cvt`] for `ssize_t`/`off_t`/`long` results.
pub fn cvt_long(ret: i64, what: &str) -> Result<i64, String> {
    if ret == -1 {
        Err(os_err(what))
    } else {
        Ok(ret)
    }
}

/// The pid from the raw `getpid` syscall (never a cached value).
pub fn getpid_raw() -> i32 {
    // SAFETY: getpid takes no arguments and cannot fail.
    let pid = unsafe { libc::syscall(libc::SYS_getpid) };
    pid as i32
}

/// The tid from the raw `gettid` syscall.
pub fn gettid_raw() -> i32 {
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    tid as i32
}

/// Writes all of `bytes` to `fd`. `EINTR` is an error, not retried.
pub fn write_all(fd: libc::c_int, mut bytes: &[u8]) -> Result<(), String> {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe the live slice `bytes`.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            return Err(os_err(&format!("write(fd {fd})")));
        }
        if n == 0 {
            return Err(format!("write(fd {fd}) returned 0"));
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// Writes one line (a `\n` is appended) to stdout with a raw `write`. If stdout is gone there
/// is nobody to report to, so the process exits with status 3.
pub fn out_line(line: &str) {
    let mut s = String::with_capacity(line.len() + 1);
    s.push_str(line);
    s.push('\n');
    if let Err(e) = write_all(1, s.as_bytes()) {
        let _ = write_all(
            2,
            format!("stasis workload: cannot write to stdout: {e}\n").as_bytes(),
        );
        std::process::exit(3);
    }
}

/// `$TMPDIR`, or `/tmp` if unset or empty.
pub fn tmp_dir() -> PathBuf {
    match std::env::var_os("TMPDIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from("/tmp"),
    }
}

/// A path as a `CString`, or a message if it contains a NUL byte.
pub fn cpath(path: &std::path::Path) -> Result<CString, String> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("path {path:?} contains NUL"))
}

/// `clock_gettime(clock)` through libc (the vDSO path), as nanoseconds.
pub fn clock_ns(clock: libc::clockid_t) -> Result<i128, String> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    cvt(r, &format!("clock_gettime({clock})"))?;
    Ok(ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128)
}

/// `clock_gettime(clock)` by the raw syscall (bypassing the vDSO), as nanoseconds.
pub fn clock_ns_syscall(clock: libc::clockid_t) -> Result<i128, String> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the syscall takes (clockid, *timespec).
    let r = unsafe {
        libc::syscall(
            libc::SYS_clock_gettime,
            clock,
            &mut ts as *mut libc::timespec,
        )
    };
    cvt_long(r, &format!("syscall clock_gettime({clock})"))?;
    Ok(ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128)
}

/// `fcntl(fd, cmd)` for the query commands (`F_GETFL`, `F_GETFD`).
pub fn fcntl_get(fd: libc::c_int, cmd: libc::c_int, what: &str) -> Result<libc::c_int, String> {
    // SAFETY: F_GETFL/F_GETFD take no third argument and touch no memory.
    let r = unsafe { libc::fcntl(fd, cmd) };
    cvt(r, &format!("fcntl(fd {fd}, {what})"))
}

/// `lseek(fd, off, whence)`.
pub fn lseek(fd: libc::c_int, off: i64, whence: libc::c_int) -> Result<i64, String> {
    // SAFETY: lseek touches no memory of ours.
    let r = unsafe { libc::lseek(fd, off, whence) };
    cvt_long(r, &format!("lseek(fd {fd}, {off}, {whence})"))
}

/// `fstat(fd)`.
pub fn fstat(fd: libc::c_int) -> Result<libc::stat, String> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer.
    let r = unsafe { libc::fstat(fd, &mut st) };
    cvt(r, &format!("fstat(fd {fd})"))?;
    Ok(st)
}

/// The page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p <= 0 {
        4096
    } else {
        p as usize
    }
}

/// Sleeps with `nanosleep`; `Err` carries the errno name if it did not return 0.
pub fn nanosleep_ms(ms: u64) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as libc::time_t,
        tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
    };
    let mut rem = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both pointers are valid timespecs.
    let r = unsafe { libc::nanosleep(&ts, &mut rem) };
    if r == 0 {
        Ok(())
    } else {
        Err(os_err(&format!("nanosleep({ms} ms) returned {r}")))
    }
}

/// Forks; the child runs `f` and `_exit`s with its result. Returns the child's pid. Only
/// for single-threaded workloads.
pub fn fork_run(f: impl FnOnce() -> i32) -> Result<i32, String> {
    // SAFETY: the caller is single-threaded, so the child is a consistent copy; it runs
    // `f` and _exits without returning into the parent's code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_err("fork"));
    }
    if pid == 0 {
        let code = f();
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(code) };
    }
    Ok(pid)
}

//! `wl-locks`: file locks, a lease, signal owners and a periodic timerfd, each checked from
//! the outside after restore.
//!
//! Set-up, in `$TMPDIR`: file P at fd 10 with a POSIX write lock on bytes 0..100 and a POSIX
//! read lock from byte 200 to the end of the file; file F at fd 11 with a flock write lock
//! and file G at fd 12 with a flock read lock; file O at fd 13 with an OFD write lock on bytes
//! 50..60; file L at fd 14 (read-only) with a read lease whose break signal is SIGUSR2
//! (F_SETSIG); a pipe (read end fd 15, write end fd 16) whose read end is O_ASYNC with owner
//! this process (F_SETOWN) and signal SIGUSR1 (F_SETSIG); fd 10 also has F_SETOWN_EX to this
//! thread (F_OWNER_TID); a timerfd at fd 17 firing every 100 ms (from 100 ms), left unread so
//! that it has expired with ticks pending whenever it is checkpointed. SIGUSR1 and SIGUSR2 are
//! blocked, so their arrival is read with sigtimedwait.
//!
//! With `--owner-outside`, fd 11's signal owner is the workload's parent (outside any tree
//! checkpointed from the workload): the checkpoint must be refused.
//!
//! Checks (repeatable): a child process (forked for the check, opening the files by path, so
//! it shares no lock with this process) must see: F_GETLK on P report the write lock on 0..100
//! and the read lock from 200 held by this pid, and nothing on 100..200; flock(LOCK_NB) on F
//! fail for a read lock, on G succeed for a read lock and fail for a write lock; F_OFD_GETLK
//! and F_GETLK on O report the write lock (pid -1); opening L for writing (O_NONBLOCK) fail
//! with EWOULDBLOCK (the lease holds). Then this process must receive SIGUSR2 with si_fd 14
//! (the lease break), gives the lease up and takes it again; /proc/locks must name this pid
//! for the flock and POSIX locks; a byte written into the pipe must raise SIGUSR1 with si_fd
//! 15; F_GETOWN_EX of fd 10 must be (F_OWNER_TID, this tid); the timerfd must still be armed
//! with a 100 ms interval, have ticks to read, and fire again within a second.

use stasis_workloads::{sys, Ctx, Report, Spec};
use std::ffi::CString;
use std::os::unix::fs::MetadataExt;

const P: i32 = 10;
const F: i32 = 11;
const G: i32 = 12;
const O: i32 = 13;
const L: i32 = 14;
const PIPE_RD: i32 = 15;
const PIPE_WR: i32 = 16;
const T: i32 = 17;
const F_SETSIG: i32 = 10;
const F_SETOWN_EX: i32 = 15;
const F_GETOWN_EX: i32 = 16;
const F_OWNER_TID: i32 = 0;

struct Files {
    p: CString,
    f: CString,
    g: CString,
    o: CString,
    l: CString,
    f_ino: u64,
    p_ino: u64,
}

fn err(what: &str) -> String {
    sys::os_err(what)
}

fn flock_of(ty: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = ty as i16;
    l.l_whence = libc::SEEK_SET as i16;
    l.l_start = start;
    l.l_len = len;
    l
}

fn open_at(path: &CString, flags: i32, fd: i32) -> Result<(), String> {
    // SAFETY: path is a valid C string; dup2/close on fds we own.
    unsafe {
        let f = libc::open(path.as_ptr(), flags | libc::O_CREAT, 0o644);
        if f < 0 || libc::dup2(f, fd) != fd {
            return Err(err(&format!("open {path:?} at fd {fd}")));
        }
        libc::close(f);
    }
    Ok(())
}

fn setup(ctx: &mut Ctx) -> Result<Files, String> {
    let dir = sys::tmp_dir();
    let pid = sys::getpid_raw();
    let path = |n: &str| dir.join(format!("stasis-wl-locks-{pid}-{n}"));
    for n in ["P", "F", "G", "O", "L"] {
        ctx.remove_at_exit(path(n));
    }
    let c = |n: &str| sys::cpath(&path(n));
    let files = Files {
        p: c("P")?,
        f: c("F")?,
        g: c("G")?,
        o: c("O")?,
        l: c("L")?,
        f_ino: 0,
        p_ino: 0,
    };
    open_at(&files.p, libc::O_RDWR, P)?;
    open_at(&files.f, libc::O_RDWR, F)?;
    open_at(&files.g, libc::O_RDWR, G)?;
    open_at(&files.o, libc::O_RDWR, O)?;
    open_at(&files.l, libc::O_RDONLY, L)?;
    // SAFETY: plain syscalls on fds this function opened; structs are locals.
    unsafe {
        sys::cvt(
            libc::fcntl(P, libc::F_SETLK, &flock_of(libc::F_WRLCK, 0, 100)),
            "POSIX write lock",
        )?;
        sys::cvt(
            libc::fcntl(P, libc::F_SETLK, &flock_of(libc::F_RDLCK, 200, 0)),
            "POSIX read lock",
        )?;
        sys::cvt(libc::flock(F, libc::LOCK_EX | libc::LOCK_NB), "flock F")?;
        sys::cvt(libc::flock(G, libc::LOCK_SH | libc::LOCK_NB), "flock G")?;
        sys::cvt(
            libc::fcntl(O, libc::F_OFD_SETLK, &flock_of(libc::F_WRLCK, 50, 10)),
            "OFD lock",
        )?;
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        sys::cvt(
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
            "sigprocmask",
        )?;
        sys::cvt(
            libc::fcntl(L, libc::F_SETLEASE, libc::F_RDLCK),
            "F_SETLEASE",
        )?;
        sys::cvt(libc::fcntl(L, F_SETSIG, libc::SIGUSR2), "F_SETSIG lease")?;
        let mut ends = [0i32; 2];
        sys::cvt(libc::pipe(ends.as_mut_ptr()), "pipe")?;
        if libc::dup2(ends[0], PIPE_RD) != PIPE_RD || libc::dup2(ends[1], PIPE_WR) != PIPE_WR {
            return Err(err("dup2 pipe"));
        }
        libc::close(ends[0]);
        libc::close(ends[1]);
        sys::cvt(libc::fcntl(PIPE_RD, libc::F_SETOWN, pid), "F_SETOWN")?;
        sys::cvt(
            libc::fcntl(PIPE_RD, F_SETSIG, libc::SIGUSR1),
            "F_SETSIG pipe",
        )?;
        let fl = libc::fcntl(PIPE_RD, libc::F_GETFL);
        sys::cvt(
            libc::fcntl(
                PIPE_RD,
                libc::F_SETFL,
                fl | libc::O_ASYNC | libc::O_NONBLOCK,
            ),
            "O_ASYNC",
        )?;
        let own = [F_OWNER_TID, sys::gettid_raw()];
        sys::cvt(libc::fcntl(P, F_SETOWN_EX, own.as_ptr()), "F_SETOWN_EX")?;
        let t = libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK);
        if t < 0 || libc::dup2(t, T) != T {
            return Err(err("timerfd"));
        }
        libc::close(t);
        let its = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            },
            it_value: libc::timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            },
        };
        sys::cvt(
            libc::timerfd_settime(T, 0, &its, std::ptr::null_mut()),
            "timerfd_settime",
        )?;
    }
    // Expired, unread.
    sys::nanosleep_ms(250)?;
    let ino = |p: &CString| {
        std::fs::metadata(p.to_str().unwrap_or_default())
            .map(|m| m.ino())
            .map_err(|e| e.to_string())
    };
    Ok(Files {
        f_ino: ino(&files.f)?,
        p_ino: ino(&files.p)?,
        ..files
    })
}

/// What a process that shares nothing with this one sees of the locks: failures, one per
/// line. Runs in a forked child that only opens the files by path.
fn outsider_view(files: &Files, holder: i32) -> Vec<String> {
    let mut bad = Vec::new();
    // SAFETY: plain syscalls on fds opened here and local structs.
    unsafe {
        let p = libc::open(files.p.as_ptr(), libc::O_RDWR);
        let mut l = flock_of(libc::F_WRLCK, 10, 1);
        libc::fcntl(p, libc::F_GETLK, &mut l);
        if (l.l_type as i32, l.l_pid, l.l_start, l.l_len) != (libc::F_WRLCK, holder, 0, 100) {
            bad.push(format!(
                "P write lock: F_GETLK saw type {} pid {} range {}+{}",
                l.l_type, l.l_pid, l.l_start, l.l_len
            ));
        }
        let mut l = flock_of(libc::F_WRLCK, 5000, 1);
        libc::fcntl(p, libc::F_GETLK, &mut l);
        if (l.l_type as i32, l.l_pid, l.l_start, l.l_len) != (libc::F_RDLCK, holder, 200, 0) {
            bad.push(format!(
                "P read lock to EOF: F_GETLK saw type {} pid {} range {}+{}",
                l.l_type, l.l_pid, l.l_start, l.l_len
            ));
        }
        let mut l = flock_of(libc::F_WRLCK, 100, 100);
        libc::fcntl(p, libc::F_GETLK, &mut l);
        if l.l_type as i32 != libc::F_UNLCK {
            bad.push(format!("P bytes 100..200: locked (type {})", l.l_type));
        }
        let f = libc::open(files.f.as_ptr(), libc::O_RDWR);
        if libc::flock(f, libc::LOCK_SH | libc::LOCK_NB) == 0 {
            bad.push("F: flock write lock is not held".into());
        }
        let g = libc::open(files.g.as_ptr(), libc::O_RDWR);
        if libc::flock(g, libc::LOCK_SH | libc::LOCK_NB) != 0 {
            bad.push(format!("G: a shared flock was refused: {}", err("flock")));
        }
        libc::flock(g, libc::LOCK_UN);
        if libc::flock(g, libc::LOCK_EX | libc::LOCK_NB) == 0 {
            bad.push("G: flock read lock is not held".into());
        }
        let o = libc::open(files.o.as_ptr(), libc::O_RDWR);
        let mut l = flock_of(libc::F_RDLCK, 55, 1);
        libc::fcntl(o, libc::F_OFD_GETLK, &mut l);
        if (l.l_type as i32, l.l_pid, l.l_start, l.l_len) != (libc::F_WRLCK, -1, 50, 10) {
            bad.push(format!(
                "O: F_OFD_GETLK saw type {} pid {} range {}+{}",
                l.l_type, l.l_pid, l.l_start, l.l_len
            ));
        }
        let lf = libc::open(files.l.as_ptr(), libc::O_WRONLY | libc::O_NONBLOCK);
        if lf >= 0 {
            bad.push("L: opened for writing although a read lease is held".into());
        } else if sys::errno() != libc::EWOULDBLOCK {
            bad.push(err("L: open for writing failed otherwise"));
        }
    }
    bad
}

/// Runs [`outsider_view`] in a forked child; its failures.
fn from_outside(files: &Files) -> Result<Vec<String>, String> {
    let holder = sys::getpid_raw();
    let mut ends = [0i32; 2];
    // SAFETY: ends is a valid array for pipe.
    sys::cvt(unsafe { libc::pipe(ends.as_mut_ptr()) }, "pipe")?;
    // SAFETY: the workload is single-threaded; the child only computes, writes and exits.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(err("fork"));
    }
    if child == 0 {
        let text = outsider_view(files, holder).join("; ");
        let _ = sys::write_all(ends[1], text.as_bytes());
        // SAFETY: leaves the child at once.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: closing our copy of the write end; reading into a local buffer; reaping the
    // child we forked.
    unsafe {
        libc::close(ends[1]);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = libc::read(ends[0], buf.as_mut_ptr().cast(), buf.len());
            if n <= 0 {
                break;
            }
            out.extend_from_slice(&buf[..n as usize]);
        }
        libc::close(ends[0]);
        let mut st = 0;
        libc::waitpid(child, &mut st, 0);
        let text = String::from_utf8_lossy(&out).into_owned();
        Ok(if text.is_empty() {
            Vec::new()
        } else {
            vec![text]
        })
    }
}

/// Waits up to 2 s for blocked signal `sig`; its si_fd.
fn wait_signal(sig: i32) -> Result<i32, String> {
    // SAFETY: set and info are locals of plain C types.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        let mut info: libc::siginfo_t = std::mem::zeroed();
        let ts = libc::timespec {
            tv_sec: 2,
            tv_nsec: 0,
        };
        if libc::sigtimedwait(&set, &mut info, &ts) != sig {
            return Err(err(&format!("waiting for signal {sig}")));
        }
        // siginfo_t of SIGPOLL: si_band (long) then si_fd (int), after the 16-byte header.
        let raw = (&info as *const libc::siginfo_t).cast::<u8>();
        Ok(std::ptr::read_unaligned(raw.add(24).cast::<i32>()))
    }
}

/// Whether /proc/locks names `pid` for a lock of `kind` on inode `ino`.
fn proc_locks_names(kind: &str, ino: u64, pid: i32) -> Result<bool, String> {
    let text = std::fs::read_to_string("/proc/locks").map_err(|e| e.to_string())?;
    Ok(text.lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        w.get(1) == Some(&kind)
            && w.get(4) == Some(&pid.to_string().as_str())
            && w.get(5).is_some_and(|d| d.ends_with(&format!(":{ino}")))
    }))
}

fn check(r: &mut Report, files: &Files) {
    let pid = sys::getpid_raw();
    if let Some(bad) = r.ok(from_outside(files)) {
        for b in bad {
            r.fail(format!("seen from another process: {b}"));
        }
    }
    r.eq(
        "lease break signal si_fd",
        Ok(L),
        wait_signal(libc::SIGUSR2),
    );
    // SAFETY: fcntl on our own fds; the owner struct is a local array.
    unsafe {
        // Give the lease up (the breaker is gone) and take it again.
        libc::fcntl(L, libc::F_SETLEASE, libc::F_UNLCK);
        r.eq(
            "lease taken again",
            0,
            libc::fcntl(L, libc::F_SETLEASE, libc::F_RDLCK),
        );
        r.eq(
            "F_GETLEASE",
            libc::F_RDLCK,
            libc::fcntl(L, libc::F_GETLEASE),
        );
        // Giving a lease up forgets the description's F_SETSIG.
        libc::fcntl(L, F_SETSIG, libc::SIGUSR2);
        let mut own = [-1i32, -1];
        libc::fcntl(P, F_GETOWN_EX, own.as_mut_ptr());
        r.eq("fd 10 F_GETOWN_EX", [F_OWNER_TID, sys::gettid_raw()], own);
    }
    r.eq(
        "/proc/locks names us for the flock",
        Ok(true),
        proc_locks_names("FLOCK", files.f_ino, pid),
    );
    r.eq(
        "/proc/locks names us for the POSIX locks",
        Ok(true),
        proc_locks_names("POSIX", files.p_ino, pid),
    );
    r.ok(sys::write_all(PIPE_WR, b"x"));
    r.eq(
        "pipe SIGIO (F_SETSIG SIGUSR1) si_fd",
        Ok(PIPE_RD),
        wait_signal(libc::SIGUSR1),
    );
    let mut b = [0u8; 16];
    // SAFETY: reads into a local buffer from our non-blocking pipe.
    unsafe { libc::read(PIPE_RD, b.as_mut_ptr().cast(), b.len()) };
    check_timer(r);
}

fn check_timer(r: &mut Report) {
    // SAFETY: timerfd calls on our own fd with local structs.
    unsafe {
        let mut its: libc::itimerspec = std::mem::zeroed();
        libc::timerfd_gettime(T, &mut its);
        r.eq(
            "timerfd interval",
            (0, 100_000_000),
            (its.it_interval.tv_sec, its.it_interval.tv_nsec),
        );
        r.ensure(its.it_value.tv_sec > 0 || its.it_value.tv_nsec > 0, || {
            "timerfd is disarmed".into()
        });
        let mut ticks = 0u64;
        let n = libc::read(T, (&mut ticks as *mut u64).cast(), 8);
        r.ensure(n == 8 && ticks >= 1, || {
            format!("timerfd had no ticks to read (read {n}, ticks {ticks})")
        });
        let mut p = libc::pollfd {
            fd: T,
            events: libc::POLLIN,
            revents: 0,
        };
        r.eq("timerfd fires again", 1, libc::poll(&mut p, 1, 1000));
    }
}

fn main() {
    let mut ctx = Ctx::start(
        "wl-locks",
        &Spec {
            flags: &["--owner-outside"],
            values: &[],
        },
    );
    let files = setup(&mut ctx);
    if ctx.args.flag("--owner-outside") {
        // The file's signals go to whoever started us, outside the checkpointed tree.
        // SAFETY: fcntl(F_SETOWN) on our own fd takes no pointers.
        let rc = unsafe { libc::fcntl(F, libc::F_SETOWN, libc::getppid()) };
        let rc = sys::cvt(rc, "F_SETOWN(parent)").map(|_| ());
        ctx.setup(rc);
    }
    let files = ctx.setup(files);
    ctx.ready();
    loop {
        let cmd = ctx.read_blocking();
        ctx.respond(cmd, |r| check(r, &files));
    }
}

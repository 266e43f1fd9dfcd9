//! `wl-lockwait`: a child blocked on its parent's locks.
//!
//! Set-up, in `$TMPDIR`: the parent holds a POSIX write lock on bytes 0..10 of file W (fd 10)
//! and a flock write lock on file V (fd 11), then forks a child that opens W and V itself and
//! waits for them: first in fcntl(F_SETLKW) on W's bytes 0..10, then in flock(LOCK_EX) on V,
//! writing `p` and then `f` into a pipe (read end fd 12 in the parent, non-blocking) as it
//! gets each; then it sleeps.
//!
//! `verify` (repeatable): the child has reported nothing (still blocked, as it must be while
//! the parent holds both locks). `check` (once): the same, then the parent gives up the POSIX
//! lock and the child must report `p` within 2 s (and not `f`), then the parent gives up
//! the flock and the child must report `f`. A restore that lost the parent's locks lets the
//! child through at once; one that lost the child's wait leaves it never reporting.

use stasis_workloads::{sys, Cmd, Ctx, Report, Spec};

const W: i32 = 10;
const V: i32 = 11;
const RD: i32 = 12;

fn flock_of(ty: i32) -> libc::flock {
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = ty as i16;
    l.l_whence = libc::SEEK_SET as i16;
    l.l_start = 0;
    l.l_len = 10;
    l
}

fn setup(ctx: &mut Ctx) -> Result<i32, String> {
    let dir = sys::tmp_dir();
    let pid = sys::getpid_raw();
    let w = dir.join(format!("stasis-wl-lockwait-{pid}-W"));
    let v = dir.join(format!("stasis-wl-lockwait-{pid}-V"));
    ctx.remove_at_exit(w.clone());
    ctx.remove_at_exit(v.clone());
    let (wc, vc) = (sys::cpath(&w)?, sys::cpath(&v)?);
    // SAFETY: plain syscalls on fds made here; structs and buffers are locals. The child
    // runs only raw syscalls and never returns.
    unsafe {
        let open = |c: &std::ffi::CString, at: i32| -> Result<(), String> {
            let f = libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o644);
            if f < 0 || libc::dup2(f, at) != at {
                return Err(sys::os_err("open"));
            }
            libc::close(f);
            Ok(())
        };
        open(&wc, W)?;
        open(&vc, V)?;
        sys::cvt(
            libc::fcntl(W, libc::F_SETLK, &flock_of(libc::F_WRLCK)),
            "POSIX lock",
        )?;
        sys::cvt(libc::flock(V, libc::LOCK_EX | libc::LOCK_NB), "flock")?;
        let mut ends = [0i32; 2];
        sys::cvt(libc::pipe2(ends.as_mut_ptr(), libc::O_NONBLOCK), "pipe")?;
        let child = libc::fork();
        if child < 0 {
            return Err(sys::os_err("fork"));
        }
        if child == 0 {
            libc::close(ends[0]);
            let wfd = libc::open(wc.as_ptr(), libc::O_RDWR);
            if libc::fcntl(wfd, libc::F_SETLKW, &flock_of(libc::F_WRLCK)) == 0 {
                libc::write(ends[1], b"p".as_ptr().cast(), 1);
            }
            let vfd = libc::open(vc.as_ptr(), libc::O_RDWR);
            if libc::flock(vfd, libc::LOCK_EX) == 0 {
                libc::write(ends[1], b"f".as_ptr().cast(), 1);
            }
            loop {
                libc::pause();
            }
        }
        libc::close(ends[1]);
        if libc::dup2(ends[0], RD) != RD {
            return Err(sys::os_err("dup2"));
        }
        libc::close(ends[0]);
        // Let the child reach its wait.
        sys::nanosleep_ms(200)?;
        Ok(child)
    }
}

/// What the child has reported so far (non-blocking).
fn reported() -> String {
    let mut buf = [0u8; 16];
    // SAFETY: reads into a local buffer from our non-blocking pipe.
    let n = unsafe { libc::read(RD, buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return String::new();
    }
    String::from_utf8_lossy(&buf[..n as usize]).into_owned()
}

/// Waits up to 2 s for the child to report something.
fn next_report() -> String {
    for _ in 0..200 {
        let r = reported();
        if !r.is_empty() {
            return r;
        }
        let _ = sys::nanosleep_ms(10);
    }
    String::new()
}

fn check(r: &mut Report, once: bool, child: i32) {
    r.eq(
        "child reports while the parent holds both locks",
        String::new(),
        reported(),
    );
    if !once {
        return;
    }
    // SAFETY: fcntl/flock on our own fds with a local struct.
    unsafe { libc::fcntl(W, libc::F_SETLK, &flock_of(libc::F_UNLCK)) };
    r.eq(
        "child after the POSIX lock is given up",
        "p".to_string(),
        next_report(),
    );
    // SAFETY: as above.
    unsafe { libc::flock(V, libc::LOCK_UN) };
    r.eq(
        "child after the flock is given up",
        "f".to_string(),
        next_report(),
    );
    // SAFETY: kills and reaps the child this process forked.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
}

fn main() {
    let mut ctx = Ctx::start("wl-lockwait", &Spec::default());
    let child = setup(&mut ctx);
    let child = ctx.setup(child);
    ctx.ready();
    loop {
        let cmd = ctx.read_blocking();
        let once = cmd == Cmd::Check;
        ctx.respond(cmd, |r| check(r, once, child));
    }
}

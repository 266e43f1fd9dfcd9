//! `wl-sleep`: blocked in `nanosleep` most of the time.
//!
//! stdin is set `O_NONBLOCK` before `READY`; the loop is `nanosleep(300 ms)`, then one
//! non-blocking `read(0)` (EAGAIN or a command). Each `nanosleep` must return 0 (an `EINTR`
//! means the restorer did not restart it, e.g. it turned `-ERESTART_RESTARTBLOCK` into a bare
//! `restart_syscall` without the kernel's restart block) and must have lasted at least 300 ms
//! by `CLOCK_MONOTONIC` (a restart that re-sleeps the full time is fine; a restorer that
//! returns early, or a monotonic clock that jumped backwards, is not). These failures are
//! sticky. The check also verifies fd 0 still has `O_NONBLOCK` (if it were lost the loop
//! would block in `read` instead of sleeping).

use stasis_workloads::{sys, Ctx, Spec};

const SLEEP_MS: u64 = 300;

fn main() {
    let mut ctx = Ctx::start("wl-sleep", &Spec::default());
    ctx.set_stdin_nonblocking();
    ctx.ready();
    let mut sleeps: u64 = 0;
    let mut longest: i128 = 0;
    loop {
        let t0 = sys::clock_ns(libc::CLOCK_MONOTONIC);
        let res = sys::nanosleep_ms(SLEEP_MS);
        let t1 = sys::clock_ns(libc::CLOCK_MONOTONIC);
        sleeps += 1;
        match (res, t0, t1) {
            (Err(e), _, _) => ctx.note(format!("nanosleep #{sleeps}: {e} (expected 0)")),
            (Ok(()), Ok(a), Ok(b)) => {
                let slept = b - a;
                longest = longest.max(slept);
                if slept < i128::from(SLEEP_MS) * 1_000_000 {
                    ctx.note(format!(
                        "nanosleep #{sleeps} of {SLEEP_MS} ms returned 0 after only {slept} ns (CLOCK_MONOTONIC)"
                    ));
                }
            }
            (Ok(()), Err(e), _) | (Ok(()), _, Err(e)) => ctx.note(e),
        }
        while let Some(cmd) = ctx.poll_nonblocking() {
            ctx.respond(cmd, |r| {
                if let Some(now) = r.ok(sys::fcntl_get(0, libc::F_GETFL, "F_GETFL")) {
                    r.ensure(now & libc::O_NONBLOCK != 0, || {
                        format!("fd 0 lost O_NONBLOCK: F_GETFL {now:#x}")
                    });
                }
                r.info(format!(
                    "{sleeps} nanosleeps of {SLEEP_MS} ms, longest {} ms",
                    longest / 1_000_000
                ));
            });
        }
    }
}

//! `wl-state`: per-process kernel state beyond memory and registers.
//!
//! Sets up, then checks after restore: a sigaltstack (breaks if not restored: `sigaltstack`
//! reports it disabled); interval timers REAL/VIRTUAL/PROF with their intervals, and their
//! remaining time carried across (the CPU-time timers already ran ~300 ms before READY, so a
//! restorer that re-arms them at their initial value is caught); nice 7 and SCHED_BATCH;
//! oom_score_adj 321; no_new_privs; dumpable 0; and pending signals: a blocked SIGUSR1 sent
//! to the process (shared queue), a blocked SIGUSR2 sent to the thread (private queue), and
//! two queued SIGRTMIN+5 with values 4242 and 4243 (siginfo kept, order kept). `verify` only
//! looks at the pending set; `check` also dequeues them and compares their siginfo.

use stasis_workloads::{Cmd, Ctx, Spec};
use std::time::{Duration, Instant};

const ALTSTACK_SIZE: usize = 64 * 1024;
const REAL_VALUE: u64 = 600;
const REAL_INTERVAL: u64 = 7;
const VIRT_VALUE: u64 = 800;
const PROF_VALUE: u64 = 900;
const PROF_INTERVAL: u64 = 3;
const BURN: Duration = Duration::from_millis(300);

fn itimer(which: libc::c_int) -> Result<(u64, u64), String> {
    // SAFETY: itimerval is plain old data; the kernel fills it.
    let mut v: libc::itimerval = unsafe { std::mem::zeroed() };
    // SAFETY: v is valid for the call.
    if unsafe { libc::getitimer(which, &mut v) } != 0 {
        return Err(format!(
            "getitimer({which}): {}",
            std::io::Error::last_os_error()
        ));
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Ok((us(v.it_interval), us(v.it_value)))
}

fn set_itimer(which: libc::c_int, interval_s: u64, value_s: u64) -> Result<(), String> {
    let tv = |s: u64| libc::timeval {
        tv_sec: s as libc::time_t,
        tv_usec: 0,
    };
    let v = libc::itimerval {
        it_interval: tv(interval_s),
        it_value: tv(value_s),
    };
    // SAFETY: v is a valid itimerval; the old value is not asked for.
    if unsafe { libc::setitimer(which, &v, std::ptr::null_mut()) } != 0 {
        return Err(format!(
            "setitimer({which}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn errno_str(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn setup(alt: *mut u8) -> Result<(), String> {
    // SAFETY: every call below gets valid pointers to locals or to the leaked altstack buffer.
    unsafe {
        let ss = libc::stack_t {
            ss_sp: alt.cast(),
            ss_flags: 0,
            ss_size: ALTSTACK_SIZE,
        };
        if libc::sigaltstack(&ss, std::ptr::null_mut()) != 0 {
            return Err(errno_str("sigaltstack"));
        }
        // CPU timers must not fire while the test runs: ignore their signals.
        libc::signal(libc::SIGVTALRM, libc::SIG_IGN);
        libc::signal(libc::SIGPROF, libc::SIG_IGN);
        libc::signal(libc::SIGALRM, libc::SIG_IGN);
        set_itimer(libc::ITIMER_REAL, REAL_INTERVAL, REAL_VALUE)?;
        set_itimer(libc::ITIMER_VIRTUAL, 0, VIRT_VALUE)?;
        set_itimer(libc::ITIMER_PROF, PROF_INTERVAL, PROF_VALUE)?;
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < BURN {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        if libc::setpriority(libc::PRIO_PROCESS, 0, 7) != 0 {
            return Err(errno_str("setpriority"));
        }
        let p = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_BATCH, &p) != 0 {
            return Err(errno_str("sched_setscheduler"));
        }
        std::fs::write("/proc/self/oom_score_adj", "321")
            .map_err(|e| format!("oom_score_adj: {e}"))?;
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(errno_str("PR_SET_NO_NEW_PRIVS"));
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(errno_str("PR_SET_DUMPABLE"));
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGRTMIN() + 5] {
            libc::sigaddset(&mut set, s);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(errno_str("sigprocmask"));
        }
        let pid = libc::getpid();
        libc::kill(pid, libc::SIGUSR1);
        libc::syscall(
            libc::SYS_tgkill,
            pid,
            libc::syscall(libc::SYS_gettid),
            libc::SIGUSR2,
        );
        for v in [4242, 4243] {
            let val = libc::sigval {
                sival_ptr: v as *mut libc::c_void,
            };
            if libc::sigqueue(pid, libc::SIGRTMIN() + 5, val) != 0 {
                return Err(errno_str("sigqueue"));
            }
        }
    }
    Ok(())
}

fn check(r: &mut stasis_workloads::Report, dequeue: bool) {
    // SAFETY: all pointers are to locals valid for each call.
    unsafe {
        let mut ss: libc::stack_t = std::mem::zeroed();
        if libc::sigaltstack(std::ptr::null(), &mut ss) == 0 {
            r.eq("sigaltstack size", ALTSTACK_SIZE, ss.ss_size);
            r.eq("sigaltstack flags", 0, ss.ss_flags);
        } else {
            r.fail(errno_str("sigaltstack"));
        }
        if let Some((interval, value)) = r.ok(itimer(libc::ITIMER_REAL)) {
            r.eq("ITIMER_REAL interval", REAL_INTERVAL * 1_000_000, interval);
            r.ensure(
                value > 0 && value <= REAL_VALUE * 1_000_000 - BURN.as_micros() as u64,
                || {
                    format!(
                        "ITIMER_REAL remaining {value} us, expected <= {}s - 300ms",
                        REAL_VALUE
                    )
                },
            );
        }
        for (which, name, val, interval) in [
            (libc::ITIMER_VIRTUAL, "ITIMER_VIRTUAL", VIRT_VALUE, 0),
            (libc::ITIMER_PROF, "ITIMER_PROF", PROF_VALUE, PROF_INTERVAL),
        ] {
            if let Some((i, v)) = r.ok(itimer(which)) {
                r.eq(&format!("{name} interval"), interval * 1_000_000, i);
                // ~300 ms of CPU were used before READY: re-armed at the initial value fails.
                let max = val * 1_000_000 - 250_000;
                r.ensure(v > 0 && v <= max, || {
                    format!("{name} remaining {v} us, expected 1..={max}")
                });
            }
        }
        *libc::__errno_location() = 0;
        r.eq("nice", 7, libc::getpriority(libc::PRIO_PROCESS, 0));
        r.eq(
            "scheduling policy",
            libc::SCHED_BATCH,
            libc::sched_getscheduler(0),
        );
        match std::fs::read_to_string("/proc/self/oom_score_adj") {
            Ok(s) => r.eq("oom_score_adj", "321", s.trim()),
            Err(e) => r.fail(format!("oom_score_adj: {e}")),
        }
        r.eq(
            "no_new_privs",
            1,
            libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0),
        );
        r.eq(
            "dumpable",
            0,
            libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0),
        );
        let mut pending: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut pending);
        for (s, name) in [
            (libc::SIGUSR1, "SIGUSR1"),
            (libc::SIGUSR2, "SIGUSR2"),
            (libc::SIGRTMIN() + 5, "SIGRTMIN+5"),
        ] {
            r.eq(
                &format!("{name} pending"),
                1,
                libc::sigismember(&pending, s),
            );
        }
        if !dequeue {
            return;
        }
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let mut one: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut one);
        libc::sigaddset(&mut one, libc::SIGRTMIN() + 5);
        for expect in [4242usize, 4243] {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let got = libc::sigtimedwait(&one, &mut info, &ts);
            r.eq("queued SIGRTMIN+5", libc::SIGRTMIN() + 5, got);
            r.eq("SIGRTMIN+5 si_code", libc::SI_QUEUE, info.si_code);
            r.eq(
                "SIGRTMIN+5 si_value",
                expect,
                info.si_value().sival_ptr as usize,
            );
            r.eq("SIGRTMIN+5 sender", libc::getpid(), info.si_pid());
        }
        r.eq(
            "no third SIGRTMIN+5",
            -1,
            libc::sigtimedwait(&one, std::ptr::null_mut(), &ts),
        );
        for s in [libc::SIGUSR1, libc::SIGUSR2] {
            libc::sigemptyset(&mut one);
            libc::sigaddset(&mut one, s);
            r.eq(
                "pending signal dequeued",
                s,
                libc::sigtimedwait(&one, std::ptr::null_mut(), &ts),
            );
        }
    }
}

fn main() {
    let mut ctx = Ctx::start("wl-state", &Spec::default());
    let alt = Box::leak(vec![0u8; ALTSTACK_SIZE].into_boxed_slice()).as_mut_ptr();
    let r = setup(alt);
    ctx.setup(r);
    ctx.ready();
    loop {
        let cmd = ctx.read_blocking();
        let dequeue = matches!(cmd, Cmd::Check);
        ctx.respond(cmd, |r| check(r, dequeue));
    }
}

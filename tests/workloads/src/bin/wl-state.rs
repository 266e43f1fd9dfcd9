//! `wl-state`: per-process kernel state beyond memory and registers.
//!
//! Sets up, then checks after restore: a sigaltstack (breaks if not restored: `sigaltstack`
//! reports it disabled); interval timers REAL/VIRTUAL/PROF with their intervals, and their
//! remaining time carried across (the CPU-time timers already ran >= 100 ms before READY, so a
//! restorer that re-arms them at their initial value is caught); nice 7 and SCHED_BATCH;
//! oom_score_adj 321; no_new_privs; dumpable 0; personality ADDR_NO_RANDOMIZE; glibc's rseq
//! area still registered with the kernel; and pending signals: a blocked SIGUSR1 sent
//! to the process (shared queue), a blocked SIGUSR2 sent to the thread (private queue), and
//! two queued SIGRTMIN+5 with values 4242 and 4243 (siginfo kept, order kept). `verify` only
//! looks at the pending set; `check` also dequeues them and compares their siginfo.
//! POSIX timers: ids 0, 2 and 3 (1 was deleted, so a restorer creating timers linearly gets
//! the ids wrong): a CLOCK_MONOTONIC timer signalling SIGRTMIN+7 with value 77, a
//! CLOCK_REALTIME SIGEV_NONE timer with a 2 s interval, and a CLOCK_PROCESS_CPUTIME_ID timer
//! that already used >= 100 ms; each is checked by id for interval, remaining time, and (in
//! /proc/self/timers) its signal, value, notification and clock.

use stasis_workloads::{Cmd, Ctx, Spec};

const ALTSTACK_SIZE: usize = 64 * 1024;
const REAL_VALUE: u64 = 600;
const REAL_INTERVAL: u64 = 7;
const VIRT_VALUE: u64 = 800;
const PROF_VALUE: u64 = 900;
const PROF_INTERVAL: u64 = 3;

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

const TIMER_SIGNAL_VALUE: u64 = 77;

/// timer_create(2) through the raw syscall, so ids are the kernel's.
fn timer_create(
    clock: libc::clockid_t,
    notify: i32,
    signo: i32,
    value: u64,
) -> Result<i32, String> {
    let mut sev = [0u8; 64];
    sev[0..8].copy_from_slice(&value.to_ne_bytes());
    sev[8..12].copy_from_slice(&signo.to_ne_bytes());
    sev[12..16].copy_from_slice(&notify.to_ne_bytes());
    let mut id: i32 = -1;
    // SAFETY: sev is a 64-byte struct sigevent, id a valid out pointer.
    if unsafe {
        libc::syscall(
            libc::SYS_timer_create,
            clock,
            sev.as_ptr(),
            &mut id as *mut i32,
        )
    } != 0
    {
        return Err(errno_str("timer_create"));
    }
    Ok(id)
}

fn timer_settime(id: i32, interval_s: u64, value_s: u64) -> Result<(), String> {
    let its: [u64; 4] = [interval_s, 0, value_s, 0];
    // SAFETY: its is a struct itimerspec; the old value is not asked for.
    if unsafe { libc::syscall(libc::SYS_timer_settime, id, 0, its.as_ptr(), 0usize) } != 0 {
        return Err(errno_str("timer_settime"));
    }
    Ok(())
}

/// (interval ns, remaining ns) of a timer.
fn timer_gettime(id: i32) -> Result<(u64, u64), String> {
    let mut its = [0u64; 4];
    // SAFETY: its is a struct itimerspec for the kernel to fill.
    if unsafe { libc::syscall(libc::SYS_timer_gettime, id, its.as_mut_ptr()) } != 0 {
        return Err(errno_str(&format!("timer_gettime({id})")));
    }
    Ok((
        its[0] * 1_000_000_000 + its[1],
        its[2] * 1_000_000_000 + its[3],
    ))
}

fn make_timers() -> Result<(), String> {
    let t0 = timer_create(
        libc::CLOCK_MONOTONIC,
        libc::SIGEV_SIGNAL,
        libc::SIGRTMIN() + 7,
        TIMER_SIGNAL_VALUE,
    )?;
    let t1 = timer_create(libc::CLOCK_MONOTONIC, libc::SIGEV_NONE, 0, 0)?;
    let t2 = timer_create(libc::CLOCK_REALTIME, libc::SIGEV_NONE, 0, 0)?;
    let t3 = timer_create(
        libc::CLOCK_PROCESS_CPUTIME_ID,
        libc::SIGEV_SIGNAL,
        libc::SIGRTMIN() + 8,
        0,
    )?;
    if (t0, t1, t2, t3) != (0, 1, 2, 3) {
        return Err(format!("timer ids {t0} {t1} {t2} {t3}, expected 0 1 2 3"));
    }
    // SAFETY: deleting our own timer id 1.
    if unsafe { libc::syscall(libc::SYS_timer_delete, t1) } != 0 {
        return Err(errno_str("timer_delete"));
    }
    timer_settime(t0, 0, 500)?;
    timer_settime(t2, 2, 400)?;
    timer_settime(t3, 0, 700)
}

fn check_timers(r: &mut stasis_workloads::Report, ready: &AtReady) {
    // Remaining time only ever shrinks: a restorer that re-arms a timer at its initial
    // value (or loses it) is caught; every timer had already run before READY.
    for (k, (id, interval_s)) in [(0, 0u64), (2, 2), (3, 0)].into_iter().enumerate() {
        if let Some((i, v)) = r.ok(timer_gettime(id)) {
            r.eq(
                &format!("timer {id} interval"),
                interval_s * 1_000_000_000,
                i,
            );
            // Slack: CPU clocks are read with tick granularity (4 ms here); a timer re-armed at
            // its initial value is still >= 90 ms over (READY came >= 100 ms after arming).
            let max = ready.posix[k] + 10_000_000;
            r.ensure(v > 0 && v <= max, || {
                format!(
                    "timer {id} remaining {v} ns, expected 1..={max} (its value at READY + 10 ms)"
                )
            });
        }
    }
    r.ensure(timer_gettime(1).is_err(), || {
        "deleted timer id 1 exists again".into()
    });
    match std::fs::read_to_string("/proc/self/timers") {
        Ok(text) => {
            let pid = std::process::id();
            let rt7 = libc::SIGRTMIN() + 7;
            let rt8 = libc::SIGRTMIN() + 8;
            for want in [
                format!("ID: 0\nsignal: {rt7}/{TIMER_SIGNAL_VALUE:016x}\nnotify: signal/pid.{pid}\nClockID: {}", libc::CLOCK_MONOTONIC),
                format!("ID: 2\nsignal: 0/0000000000000000\nnotify: none/pid.{pid}\nClockID: {}", libc::CLOCK_REALTIME),
                // The kernel shows this process's CPU clock in its internal encoding:
                // MAKE_PROCESS_CPUCLOCK(0, CPUCLOCK_SCHED) = (!0 << 3) | 2 = -6.
                format!("ID: 3\nsignal: {rt8}/0000000000000000\nnotify: signal/pid.{pid}\nClockID: -6"),
            ] {
                r.ensure(text.contains(&want), || format!("/proc/self/timers lacks {want:?} in {text:?}"));
            }
        }
        Err(e) => r.fail(format!("/proc/self/timers: {e}")),
    }
}

/// The capability lines of /proc/self/status.
fn cap_lines() -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("status: {e}"))?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("Cap"))
        .map(str::to_string)
        .collect())
}

/// Drops CAP_NET_RAW from the bounding set and CAP_SYS_TIME from the effective set, adds
/// CAP_NET_BIND_SERVICE to the inheritable and ambient sets, sets SECBIT_NO_SETUID_FIXUP.
fn change_caps() -> Result<(), String> {
    const NET_BIND_SERVICE: u32 = 10;
    const NET_RAW: u64 = 13;
    const SYS_TIME: u32 = 25;
    // SAFETY: every pointer is to a local array valid for its call.
    unsafe {
        if libc::prctl(libc::PR_CAPBSET_DROP, NET_RAW, 0, 0, 0) != 0 {
            return Err(errno_str("PR_CAPBSET_DROP"));
        }
        let mut hdr = [0x2008_0522u32, 0];
        let mut data = [0u32; 6];
        if libc::syscall(libc::SYS_capget, hdr.as_mut_ptr(), data.as_mut_ptr()) != 0 {
            return Err(errno_str("capget"));
        }
        data[0] &= !(1 << SYS_TIME); // effective
        data[2] |= 1 << NET_BIND_SERVICE; // inheritable
        if libc::syscall(libc::SYS_capset, hdr.as_mut_ptr(), data.as_ptr()) != 0 {
            return Err(errno_str("capset"));
        }
        if libc::prctl(47, 2, NET_BIND_SERVICE as u64, 0, 0) != 0 {
            return Err(errno_str("PR_CAP_AMBIENT_RAISE"));
        }
        if libc::prctl(libc::PR_SET_SECUREBITS, 1 << 2, 0, 0, 0) != 0 {
            return Err(errno_str("PR_SET_SECUREBITS"));
        }
    }
    Ok(())
}

extern "C" {
    /// glibc's rseq area: offset from the thread pointer, and size (0: not registered).
    static __rseq_offset: isize;
    static __rseq_size: u32;
}

/// Whether the kernel has this thread's glibc rseq area registered: unregistering with the
/// exact area, size and signature succeeds only then (it is registered again at once).
fn rseq_registered() -> Result<bool, String> {
    const RSEQ_SIG: u64 = 0x5305_3053;
    // SAFETY: reading two glibc-exported constants; fs:0 holds the thread pointer on x86_64;
    // rseq(2) only reads the arguments.
    unsafe {
        let size = __rseq_size;
        if size == 0 {
            return Ok(true); // glibc does not use rseq here: nothing to check
        }
        let tp: u64;
        std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly));
        let area = (tp as i64 + __rseq_offset as i64) as u64;
        let len = size.max(32) as u64;
        if libc::syscall(libc::SYS_rseq, area, len, 1u64, RSEQ_SIG) != 0 {
            return Ok(false);
        }
        if libc::syscall(libc::SYS_rseq, area, len, 0u64, RSEQ_SIG) != 0 {
            return Err(errno_str("rseq re-register"));
        }
    }
    Ok(true)
}

fn errno_str(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn setup(alt: *mut u8) -> Result<Vec<String>, String> {
    change_caps()?;
    let caps = cap_lines()?;
    setup_rest(alt)?;
    Ok(caps)
}

fn setup_rest(alt: *mut u8) -> Result<(), String> {
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
        make_timers()?;
        // Burn CPU until the CPU-time timers themselves show 100 ms used (a fixed amount of
        // wall time, or even of rusage time, is not that on a loaded machine).
        let mut x = 0u64;
        loop {
            let virt = itimer(libc::ITIMER_VIRTUAL)?.1;
            let prof = itimer(libc::ITIMER_PROF)?.1;
            let t3 = timer_gettime(3)?.1;
            if virt + 100_000 <= VIRT_VALUE * 1_000_000
                && prof + 100_000 <= PROF_VALUE * 1_000_000
                && t3 + 100_000_000 <= 700 * 1_000_000_000
            {
                break;
            }
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
        // ADDR_NO_RANDOMIZE: a personality flag a restorer must carry over.
        if libc::personality(0x0040000) == -1 {
            return Err(errno_str("personality"));
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
        for s in [
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGRTMIN() + 5,
            libc::SIGRTMIN() + 7,
            libc::SIGRTMIN() + 8,
        ] {
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

/// Remaining times at READY: (REAL, VIRTUAL, PROF in us; POSIX timers 0, 2, 3 in ns).
#[derive(Clone, Copy)]
struct AtReady {
    itimers: [u64; 3],
    posix: [u64; 3],
}

fn at_ready() -> Result<AtReady, String> {
    Ok(AtReady {
        itimers: [
            itimer(libc::ITIMER_REAL)?.1,
            itimer(libc::ITIMER_VIRTUAL)?.1,
            itimer(libc::ITIMER_PROF)?.1,
        ],
        posix: [
            timer_gettime(0)?.1,
            timer_gettime(2)?.1,
            timer_gettime(3)?.1,
        ],
    })
}

fn check(r: &mut stasis_workloads::Report, dequeue: bool, caps: &[String], ready: &AtReady) {
    check_timers(r, ready);
    if let Some(now) = r.ok(cap_lines()) {
        r.eq("capability sets", caps, &now[..]);
    }
    // SAFETY: prctl(PR_GET_SECUREBITS) takes no pointers.
    r.eq("securebits", 1 << 2, unsafe {
        libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0)
    });
    // SAFETY: all pointers are to locals valid for each call.
    unsafe {
        let mut ss: libc::stack_t = std::mem::zeroed();
        if libc::sigaltstack(std::ptr::null(), &mut ss) == 0 {
            r.eq("sigaltstack size", ALTSTACK_SIZE, ss.ss_size);
            r.eq("sigaltstack flags", 0, ss.ss_flags);
        } else {
            r.fail(errno_str("sigaltstack"));
        }
        for (k, (which, name, interval)) in [
            (libc::ITIMER_REAL, "ITIMER_REAL", REAL_INTERVAL),
            (libc::ITIMER_VIRTUAL, "ITIMER_VIRTUAL", 0),
            (libc::ITIMER_PROF, "ITIMER_PROF", PROF_INTERVAL),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some((i, v)) = r.ok(itimer(which)) {
                r.eq(&format!("{name} interval"), interval * 1_000_000, i);
                let max = ready.itimers[k] + 10_000; // tick granularity, as above
                r.ensure(v > 0 && v <= max, || {
                    format!(
                        "{name} remaining {v} us, expected 1..={max} (its value at READY + 10 ms)"
                    )
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
        r.eq_hex("personality", 0x0040000, libc::personality(0xffff_ffff));
        if let Some(reg) = r.ok(rseq_registered()) {
            r.eq("rseq registered", true, reg);
        }
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
    let caps = ctx.setup(r);
    let ready = ctx.setup(at_ready());
    ctx.ready();
    loop {
        let cmd = ctx.read_blocking();
        let dequeue = matches!(cmd, Cmd::Check);
        ctx.respond(cmd, |r| check(r, dequeue, &caps, &ready));
    }
}

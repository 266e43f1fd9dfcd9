//! `wl-signal`: signal dispositions, masks and delivery.
//!
//! Before `READY`: SIGUSR1 and SIGUSR2 get `SA_RESTART|SA_SIGINFO` handlers with specific
//! `sa_mask`s ({SIGUSR2, SIGTERM} and {SIGHUP, SIGALRM}), SIGINT is set to `SIG_IGN`,
//! SIGRTMIN+3 is blocked; with `--pending` one SIGRTMIN+3 is also raised while blocked and
//! stays pending. Then every disposition (signals 1..64) is recorded as the kernel reports it.
//!
//! Checks: every `sigaction` (handler, flags incl. `SA_RESTORER`, mask, restorer) equals the
//! recorded one (breaks if the restorer did not restore sigactions: handlers reset to
//! `SIG_DFL`, and Rust's `SIGPIPE` ignore is lost too); the blocked mask is unchanged; the
//! pending set is exactly {SIGRTMIN+3} with `--pending`, else empty (breaks if pending signals
//! were dropped); `raise(SIGUSR1)` and `raise(SIGUSR2)` run the handlers, whose siginfo has the
//! right `si_signo`, `si_code == SI_TKILL` and `si_pid`, and whose signal mask during the
//! handler is blocked ∪ sa_mask ∪ {signal}; finally `raise(SIGINT)` must be ignored (if the
//! disposition were lost the process would die instead of answering).
//!
//! The harness may also send SIGUSR1/SIGUSR2 at any time (e.g. while the restored process is
//! blocked in `read`, which must then restart thanks to `SA_RESTART`); they are counted.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

use stasis_workloads::{sys, Ctx, Report, Spec};

static COUNT_USR1: AtomicU64 = AtomicU64::new(0);
static COUNT_USR2: AtomicU64 = AtomicU64::new(0);
static LAST_SIGNO: AtomicI32 = AtomicI32::new(0);
static LAST_CODE: AtomicI32 = AtomicI32::new(0);
static LAST_PID: AtomicI32 = AtomicI32::new(0);
static LAST_MASK: AtomicU64 = AtomicU64::new(0);

const SI_TKILL: i32 = -6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Action {
    handler: usize,
    flags: i32,
    mask: u64,
    restorer: usize,
}

fn bit(sig: i32) -> u64 {
    1u64 << (sig - 1)
}

fn set_bits(set: &libc::sigset_t) -> u64 {
    let mut bits = 0;
    for s in 1..=64 {
        // SAFETY: `set` is a valid, initialized sigset_t.
        if unsafe { libc::sigismember(set, s) } == 1 {
            bits |= bit(s);
        }
    }
    bits
}

fn make_set(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is valid storage; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid, writable storage for a sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in sigs {
        // SAFETY: as above; `s` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _uc: *mut libc::c_void) {
    // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo_t.
    let (signo, code, pid) = unsafe { ((*info).si_signo, (*info).si_code, (*info).si_pid()) };
    // SAFETY: an all-zero sigset_t is valid storage; sigprocmask fills it (async-signal-safe).
    let mut cur: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a null new set only queries the mask into `cur`.
    unsafe { libc::sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur) };
    LAST_SIGNO.store(signo, Ordering::SeqCst);
    LAST_CODE.store(code, Ordering::SeqCst);
    LAST_PID.store(pid, Ordering::SeqCst);
    LAST_MASK.store(set_bits(&cur), Ordering::SeqCst);
    if sig == libc::SIGUSR1 {
        COUNT_USR1.fetch_add(1, Ordering::SeqCst);
    } else {
        COUNT_USR2.fetch_add(1, Ordering::SeqCst);
    }
}

fn query(sig: i32) -> Result<Action, String> {
    // SAFETY: an all-zero sigaction is valid storage for the kernel's answer.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only queries into `old`.
    let r = unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
    sys::cvt(r, &format!("sigaction({sig}, NULL, &old)"))?;
    Ok(Action {
        handler: old.sa_sigaction,
        flags: old.sa_flags,
        mask: set_bits(&old.sa_mask),
        restorer: old.sa_restorer.map_or(0, |f| f as usize),
    })
}

fn install(sig: i32, handler: usize, flags: i32, mask: &[i32]) -> Result<(), String> {
    // SAFETY: an all-zero sigaction is a valid starting value.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler;
    act.sa_flags = flags;
    act.sa_mask = make_set(mask);
    // SAFETY: `act` is fully initialized; the handler (if any) is an async-signal-safe
    // extern "C" fn with the SA_SIGINFO signature.
    let r = unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) };
    sys::cvt(r, &format!("sigaction({sig})"))?;
    Ok(())
}

fn blocked() -> Result<u64, String> {
    // SAFETY: an all-zero sigset_t is valid storage.
    let mut cur: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a null new set only queries the mask.
    let r = unsafe { libc::sigprocmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur) };
    sys::cvt(r, "sigprocmask(query)")?;
    Ok(set_bits(&cur))
}

fn pending() -> Result<u64, String> {
    // SAFETY: an all-zero sigset_t is valid storage.
    let mut cur: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cur` is valid, writable storage.
    let r = unsafe { libc::sigpending(&mut cur) };
    sys::cvt(r, "sigpending")?;
    Ok(set_bits(&cur))
}

fn raise(sig: i32) -> Result<(), String> {
    // SAFETY: raising a signal whose disposition this program controls.
    let r = unsafe { libc::raise(sig) };
    if r != 0 {
        return Err(sys::os_err(&format!("raise({sig})")));
    }
    Ok(())
}

fn setup(pend: bool) -> Result<(Vec<(i32, Action)>, u64), String> {
    let rt3 = libc::SIGRTMIN() + 3;
    let h =
        on_signal as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
    let fl = libc::SA_RESTART | libc::SA_SIGINFO;
    install(libc::SIGUSR1, h, fl, &[libc::SIGUSR2, libc::SIGTERM])?;
    install(libc::SIGUSR2, h, fl, &[libc::SIGHUP, libc::SIGALRM])?;
    install(libc::SIGINT, libc::SIG_IGN, 0, &[])?;
    let set = make_set(&[rt3]);
    // SAFETY: `set` is a valid sigset_t.
    let r = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    sys::cvt(r, "sigprocmask(SIG_BLOCK, SIGRTMIN+3)")?;
    if pend {
        raise(rt3)?;
    }
    let mut actions = Vec::new();
    for s in 1..=64 {
        if s == libc::SIGKILL || s == libc::SIGSTOP {
            continue;
        }
        // glibc refuses its internal signals (32, 33) with EINVAL: skip those.
        if let Ok(a) = query(s) {
            actions.push((s, a));
        }
    }
    Ok((actions, blocked()?))
}

fn check(actions: &[(i32, Action)], mask0: u64, pend: bool, pid: i32, r: &mut Report) {
    let rt3 = libc::SIGRTMIN() + 3;
    for &(s, a) in actions {
        if let Some(now) = r.ok(query(s)) {
            r.eq(&format!("sigaction of signal {s}"), a, now);
        }
    }
    if let Some(m) = r.ok(blocked()) {
        r.eq_hex("blocked signal mask", mask0, m);
        r.eq_hex("blocked signal mask at READY", bit(rt3), mask0);
    }
    if let Some(p) = r.ok(pending()) {
        r.eq_hex("pending signals", if pend { bit(rt3) } else { 0 }, p);
    }
    let cases = [
        (
            libc::SIGUSR1,
            &COUNT_USR1,
            bit(libc::SIGUSR2) | bit(libc::SIGTERM),
        ),
        (
            libc::SIGUSR2,
            &COUNT_USR2,
            bit(libc::SIGHUP) | bit(libc::SIGALRM),
        ),
    ];
    for (sig, counter, sa_mask) in cases {
        let before = counter.load(Ordering::SeqCst);
        if r.ok(raise(sig)).is_none() {
            continue;
        }
        r.eq(
            &format!("handler runs for raise({sig})"),
            before + 1,
            counter.load(Ordering::SeqCst),
        );
        r.eq("handler si_signo", sig, LAST_SIGNO.load(Ordering::SeqCst));
        r.eq(
            "handler si_code",
            SI_TKILL,
            LAST_CODE.load(Ordering::SeqCst),
        );
        r.eq("handler si_pid", pid, LAST_PID.load(Ordering::SeqCst));
        r.eq_hex(
            &format!("signal mask inside the signal {sig} handler"),
            mask0 | sa_mask | bit(sig),
            LAST_MASK.load(Ordering::SeqCst),
        );
    }
    if let Some(m) = r.ok(blocked()) {
        r.eq_hex("blocked signal mask after the handlers", mask0, m);
    }
    match query(libc::SIGINT) {
        Ok(a) if a.handler == libc::SIG_IGN => {
            // Would kill the process if SIGINT were not ignored.
            r.ok(raise(libc::SIGINT));
        }
        _ => r.fail("SIGINT is not SIG_IGN (not raising it)"),
    }
}

fn main() {
    let mut ctx = Ctx::start(
        "wl-signal",
        &Spec {
            flags: &["--pending"],
            values: &[],
        },
    );
    let pend = ctx.args.flag("--pending");
    let s = setup(pend);
    let (actions, mask0) = ctx.setup(s);
    ctx.ready();
    let pid = ctx.ready_pid();
    let mut raised = 0u64;
    ctx.serve_blocking(|r| {
        check(&actions, mask0, pend, pid, r);
        raised += 1;
        let (u1, u2) = (
            COUNT_USR1.load(Ordering::SeqCst),
            COUNT_USR2.load(Ordering::SeqCst),
        );
        r.info(format!(
            "SIGUSR1 handled {u1} times, SIGUSR2 {u2} times ({} from outside)",
            (u1 + u2).saturating_sub(2 * raised)
        ));
    })
}

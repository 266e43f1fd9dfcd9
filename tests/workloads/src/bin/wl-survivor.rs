//! `wl-survivor`: a workload that keeps checking itself while it runs, for tests that kill
//! stasis in the middle of a checkpoint (tests/tracer_death.rs). Whatever stasis leaves in
//! it when it dies must be something it can run on.
//!
//! Arguments: `--mib N` (default 64) of pattern data; `--threads T` (default 2) worker
//! threads; `--children C` (default 0) forked children, each with a copy of the data and a
//! worker loop of its own; `--signals` a sender thread that queues SIGRTMIN to the process
//! every millisecond (a real-time signal: every one sent must arrive exactly once).
//!
//! Every worker (main included, between polls of stdin) walks its share of the data against
//! the pattern, checks that its signal mask is still exactly the one set at start (SIGUSR2
//! blocked, nothing else), and counts its rounds. Registers left pointing into stasis's
//! injection (or a mask of all signals blocked) crash or fail it; a page changed fails it.
//! `verify`/`check`: every worker made progress since the last check and found nothing
//! wrong, every child answers the same way, and (`--signals`) once sending stops, the
//! handler has seen exactly as many signals as were queued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stasis_workloads::pattern;
use stasis_workloads::peer::{answer, fork_peer, Peer};
use stasis_workloads::{sys, Ctx, Report, Spec};

static RECEIVED: AtomicU64 = AtomicU64::new(0);
static SENT: AtomicU64 = AtomicU64::new(0);
/// Whether the sender thread queues signals (its lock is held while it sends one).
static SENDING: Mutex<bool> = Mutex::new(true);

extern "C" fn on_rt(_: libc::c_int) {
    RECEIVED.fetch_add(1, Ordering::SeqCst);
}

/// The data, shared read-only by the workers.
#[derive(Clone, Copy)]
struct Data {
    ptr: *const u64,
    words: usize,
    key: u64,
}

// SAFETY: the mapping is never unmapped nor written after setup.
unsafe impl Send for Data {}
// SAFETY: as above.
unsafe impl Sync for Data {}

impl Data {
    fn slice(&self) -> &[u64] {
        // SAFETY: ptr/words describe a live mapping filled before any worker started.
        unsafe { std::slice::from_raw_parts(self.ptr, self.words) }
    }
}

/// The mask every thread must have: SIGUSR2 alone.
fn expected_mask() -> u64 {
    1 << (libc::SIGUSR2 - 1)
}

fn current_mask() -> u64 {
    let mut old: libc::sigset_t = unsafe_zeroed();
    // SAFETY: a null new set only reads the mask into `old`.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut old) };
    let mut bits = 0u64;
    for s in 1..=64 {
        // SAFETY: old is an initialised sigset_t.
        if unsafe { libc::sigismember(&old, s) } == 1 {
            bits |= 1 << (s - 1);
        }
    }
    bits
}

fn unsafe_zeroed() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data.
    unsafe { std::mem::zeroed() }
}

/// One worker's state: rounds done and the first thing found wrong.
#[derive(Default)]
struct Worker {
    rounds: AtomicU64,
    failure: Mutex<Option<String>>,
}

/// Checks pages [from, to) of the data and the mask; returns what is wrong.
fn check_part(d: &Data, from: usize, to: usize) -> Option<String> {
    let s = &d.slice()[from..to];
    for (i, &w) in s.iter().enumerate() {
        let exp = pattern::word(d.key, from + i);
        if w != exp {
            return Some(format!(
                "data word {} (page {}) is {w:#x}, expected {exp:#x}",
                from + i,
                (from + i) / 512
            ));
        }
    }
    let m = current_mask();
    (m != expected_mask())
        .then(|| format!("signal mask is {m:#x}, expected {:#x}", expected_mask()))
}

/// A worker's endless loop over its share [from, to), in 1 MiB steps.
fn work(d: Data, from: usize, to: usize, me: &Worker) -> ! {
    let mut at = from;
    loop {
        let end = (at + (1 << 17)).min(to);
        if let Some(e) = check_part(&d, at, end) {
            me.failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(e);
        }
        at = if end >= to { from } else { end };
        me.rounds.fetch_add(1, Ordering::SeqCst);
        // SAFETY: sched_yield takes no arguments.
        unsafe { libc::sched_yield() };
    }
}

fn main() {
    let mut ctx = Ctx::start(
        "wl-survivor",
        &Spec {
            flags: &["--signals"],
            values: &["--mib", "--threads", "--children"],
        },
    );
    let mib = ctx.args.num("--mib", 64);
    let mib = ctx.setup(mib) as usize;
    let nthreads = ctx.args.num("--threads", 2);
    let nthreads = ctx.setup(nthreads) as usize;
    let nchildren = ctx.args.num("--children", 0);
    let nchildren = ctx.setup(nchildren) as usize;
    let signals = ctx.args.flag("--signals");
    let words = mib.max(1) << 17;
    // SAFETY: a fresh private anonymous mapping at a kernel-chosen address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            words * 8,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = sys::os_err("mmap");
        ctx.fail_exit(&format!("setup: {e}"));
    }
    // SAFETY: the mapping is words*8 bytes, writable, and only referenced here.
    pattern::fill(
        unsafe { std::slice::from_raw_parts_mut(p.cast::<u64>(), words) },
        ctx.seed,
    );
    let mut mask = unsafe_zeroed();
    // SAFETY: mask is a valid sigset_t for these calls.
    unsafe {
        libc::sigemptyset(&mut mask);
        libc::sigaddset(&mut mask, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_SETMASK, &mask, std::ptr::null_mut());
    }
    let data = Data {
        ptr: p.cast(),
        words,
        key: ctx.seed,
    };
    let children: Vec<Peer> = (0..nchildren).map(|_| fork_child(&mut ctx, data)).collect();
    if signals {
        // SAFETY: a zeroed sigaction with a plain handler and SA_RESTART.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_rt as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(libc::SIGRTMIN(), &sa, std::ptr::null_mut());
        }
        std::thread::spawn(|| loop {
            {
                // Held across the check, the send and the count: check_signals sees every
                // signal it counts sent, and none sent after it stopped the sender.
                let sending = SENDING.lock().unwrap_or_else(|e| e.into_inner());
                if *sending {
                    let val = libc::sigval {
                        sival_ptr: std::ptr::null_mut(),
                    };
                    // SAFETY: sigqueue to ourselves with a plain value.
                    if unsafe { libc::sigqueue(libc::getpid(), libc::SIGRTMIN(), val) } == 0 {
                        SENT.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        });
        ctx.threads += 1;
    }
    let workers: Vec<Arc<Worker>> = (0..nthreads).map(|_| Arc::default()).collect();
    let share = words / nthreads.max(1);
    for (i, w) in workers.iter().enumerate() {
        let w = Arc::clone(w);
        let (from, to) = (
            i * share,
            if i + 1 == nthreads {
                words
            } else {
                (i + 1) * share
            },
        );
        std::thread::spawn(move || work(data, from, to, &w));
    }
    ctx.threads += nthreads as u64;
    ctx.set_stdin_nonblocking();
    ctx.ready();
    let main = Worker::default();
    let mut last: Vec<u64> = vec![0; nthreads + 1];
    let mut at = 0;
    loop {
        let end = (at + (1 << 15)).min(words);
        if let Some(e) = check_part(&data, at, end) {
            main.failure
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(e);
        }
        at = if end >= words { 0 } else { end };
        main.rounds.fetch_add(1, Ordering::SeqCst);
        let Some(cmd) = ctx.poll_nonblocking() else {
            let _ = sys::nanosleep_ms(1);
            continue;
        };
        ctx.respond(cmd, |r| {
            let all: Vec<&Worker> = std::iter::once(&main)
                .chain(workers.iter().map(|w| &**w))
                .collect();
            // Progress: every worker keeps running (a thread left stopped or dead does not).
            std::thread::sleep(Duration::from_millis(50));
            for (i, w) in all.iter().enumerate() {
                let n = w.rounds.load(Ordering::SeqCst);
                r.ensure(n > last[i], || {
                    format!("worker {i} made no progress ({n} rounds)")
                });
                last[i] = n;
                if let Some(e) = w.failure.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    r.fail(format!("worker {i}: {e}"));
                }
            }
            for (i, c) in children.iter().enumerate() {
                if let Err(e) = c.ask() {
                    r.fail(format!("child {i} (pid {}): {e}", c.pid));
                }
            }
            if signals {
                check_signals(r);
            }
        });
    }
}

/// Stops sending, waits for every queued signal to arrive, and starts again.
fn check_signals(r: &mut Report) {
    *SENDING.lock().unwrap_or_else(|e| e.into_inner()) = false;
    let sent = SENT.load(Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(3);
    while RECEIVED.load(Ordering::SeqCst) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let got = RECEIVED.load(Ordering::SeqCst);
    r.eq("SIGRTMIN received vs queued", sent, got);
    r.info(format!("{sent} signals queued and received"));
    *SENDING.lock().unwrap_or_else(|e| e.into_inner()) = true;
}

/// A forked child checking its own copy of the data, asked over its pipes.
fn fork_child(ctx: &mut Ctx, d: Data) -> Peer {
    fork_peer(ctx, |cmd, res| {
        // SAFETY: fcntl on our own pipe.
        unsafe { libc::fcntl(cmd, libc::F_SETFL, libc::O_NONBLOCK) };
        let mut bad: Vec<String> = Vec::new();
        let mut at = 0;
        loop {
            let end = (at + (1 << 15)).min(d.words);
            if let Some(e) = check_part(&d, at, end) {
                if bad.is_empty() {
                    bad.push(e);
                }
            }
            at = if end >= d.words { 0 } else { end };
            let mut b = [0u8; 1];
            // SAFETY: reads one byte from our nonblocking command pipe.
            match unsafe { libc::read(cmd, b.as_mut_ptr().cast(), 1) } {
                1 => {
                    let _ = sys::write_all(res, answer(&bad).as_bytes());
                }
                0 => return, // the parent is gone
                _ => {}
            }
            let _ = sys::nanosleep_ms(1);
        }
    })
}

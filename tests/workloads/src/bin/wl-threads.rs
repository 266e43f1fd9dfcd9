//! `wl-threads`: a process with four threads of its own.
//!
//! Each worker thread: has a name (`wl-t0`..`wl-t3`), a thread-local value and 1 MiB (or
//! `--mib` per thread) of memory in its own pattern, a distinct blocked signal mask, its own
//! sigaltstack; workers 0 and 1 wait in a futex (condition variable), 2 and 3 sleep in
//! nanosleep loops. On every check each worker verifies, from inside itself: gettid() is the
//! tid it had at READY, its name (/proc/thread-self/comm), its TLS value, its memory, its
//! mask, its sigaltstack, and its own real/effective uid and gid (raw syscalls: credentials
//! are per thread in the kernel, so a restorer that sets them only in the main thread is
//! caught when the workload runs as another user). The main thread checks that the set of
//! tids in /proc/self/task is exactly the one at READY.

use stasis_workloads::{Ctx, Spec};
use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

const WORKERS: usize = 4;

thread_local! {
    static TLS: Cell<u64> = const { Cell::new(0) };
}

#[derive(Default)]
struct Shared {
    /// Incremented by the main thread to ask every worker to check itself.
    round: u64,
    /// Failures reported by workers in the current round.
    failures: Vec<String>,
    /// Workers that answered in the current round.
    answered: usize,
    /// Tid of each worker at READY.
    tids: [i32; WORKERS],
    ready: usize,
}

fn raw(nr: libc::c_long) -> i64 {
    // SAFETY: argument-less getter syscalls.
    unsafe { libc::syscall(nr) }
}

fn altstack() -> (usize, usize) {
    // SAFETY: stack_t is plain old data filled by the kernel.
    let mut ss: libc::stack_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid out pointer.
    unsafe { libc::sigaltstack(std::ptr::null(), &mut ss) };
    (ss.ss_sp as usize, ss.ss_size)
}

fn blocked_has(sig: i32) -> bool {
    // SAFETY: set is filled by pthread_sigmask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set);
        libc::sigismember(&set, sig) == 1
    }
}

fn worker(i: usize, seed: u64, mib: usize, shared: Arc<(Mutex<Shared>, Condvar)>, ids: (u32, u32)) {
    let name = std::ffi::CString::new(format!("wl-t{i}")).unwrap_or_default();
    // SAFETY: prctl(PR_SET_NAME) reads a NUL-terminated string.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    let tls = stasis_workloads::pattern::key(seed, &[i as u64, 77]);
    TLS.with(|t| t.set(tls));
    let mut mem = vec![0u64; mib * 131072];
    let k = stasis_workloads::pattern::key(seed, &[i as u64]);
    stasis_workloads::pattern::fill(&mut mem, k);
    let sig = libc::SIGRTMIN() + 10 + i as i32;
    // SAFETY: blocking one signal in this thread only; the altstack buffer is leaked.
    let alt = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let size = 32768 + i * 4096;
        let buf = Box::leak(vec![0u8; size].into_boxed_slice());
        let ss = libc::stack_t {
            ss_sp: buf.as_mut_ptr().cast(),
            ss_flags: 0,
            ss_size: size,
        };
        libc::sigaltstack(&ss, std::ptr::null_mut());
        (buf.as_ptr() as usize, size)
    };
    let tid = raw(libc::SYS_gettid) as i32;
    let (lock, cv) = &*shared;
    let mut seen_round = 0;
    {
        let Ok(mut s) = lock.lock() else { return };
        s.tids[i] = tid;
        s.ready += 1;
        cv.notify_all();
    }
    loop {
        // Workers 0, 1 park in a futex wait; 2, 3 poll in nanosleep.
        let round = if i < 2 {
            let Ok(mut s) = lock.lock() else { return };
            while s.round == seen_round {
                s = match cv.wait(s) {
                    Ok(s) => s,
                    Err(_) => return,
                };
            }
            s.round
        } else {
            loop {
                std::thread::sleep(Duration::from_millis(20));
                let Ok(s) = lock.lock() else { return };
                if s.round != seen_round {
                    break s.round;
                }
            }
        };
        seen_round = round;
        let mut fails = Vec::new();
        let mut eq = |what: &str, want: String, got: String| {
            if want != got {
                fails.push(format!("thread {i}: {what}: expected {want}, got {got}"));
            }
        };
        eq("tid", tid.to_string(), raw(libc::SYS_gettid).to_string());
        let comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap_or_default();
        eq("name", format!("wl-t{i}"), comm.trim().to_string());
        eq("TLS", tls.to_string(), TLS.with(|t| t.get()).to_string());
        let bad = stasis_workloads::pattern::first_mismatch(&mem, k);
        eq(
            "memory",
            "intact".into(),
            bad.map_or("intact".into(), |b| format!("{b:?}")),
        );
        eq(
            "blocked signal",
            "true".into(),
            blocked_has(sig).to_string(),
        );
        eq(
            "sigaltstack",
            format!("{alt:?}"),
            format!("{:?}", altstack()),
        );
        eq("uid", ids.0.to_string(), raw(libc::SYS_getuid).to_string());
        eq(
            "euid",
            ids.0.to_string(),
            raw(libc::SYS_geteuid).to_string(),
        );
        eq("gid", ids.1.to_string(), raw(libc::SYS_getgid).to_string());
        let Ok(mut s) = lock.lock() else { return };
        s.failures.extend(fails);
        s.answered += 1;
        cv.notify_all();
    }
}

fn task_tids() -> Vec<i32> {
    let mut t: Vec<i32> = std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    t.sort_unstable();
    t
}

fn main() {
    let spec = Spec {
        flags: &[],
        values: &["--mib"],
    };
    let mut ctx = Ctx::start("wl-threads", &spec);
    let mib = ctx.args.num("--mib", 1);
    let mib = ctx.setup(mib) as usize;
    let seed = ctx.seed;
    // SAFETY: argument-less getters.
    let ids = unsafe { (libc::getuid(), libc::getgid()) };
    let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
    for i in 0..WORKERS {
        let sh = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("wl-t{i}"))
            .spawn(move || worker(i, seed, mib, sh, ids))
            .map(drop)
            .unwrap_or_else(|e| ctx_fail(&e.to_string()));
    }
    let (lock, cv) = &*shared;
    let mut main_tids = Vec::new();
    if let Ok(mut s) = lock.lock() {
        while s.ready < WORKERS {
            s = cv.wait(s).unwrap_or_else(|_| ctx_fail("a worker panicked"));
        }
        main_tids = s.tids.to_vec();
    }
    main_tids.push(raw(libc::SYS_gettid) as i32);
    main_tids.sort_unstable();
    ctx.threads = (WORKERS + 1) as u64;
    ctx.ready();
    loop {
        let cmd = ctx.read_blocking();
        let mut fails = Vec::new();
        if let Ok(mut s) = lock.lock() {
            s.round += 1;
            s.answered = 0;
            s.failures.clear();
            cv.notify_all();
            while s.answered < WORKERS {
                let (g, t) = cv
                    .wait_timeout(s, Duration::from_secs(20))
                    .unwrap_or_else(|_| ctx_fail("a worker panicked"));
                s = g;
                if t.timed_out() {
                    fails.push(format!("only {} of {WORKERS} threads answered", s.answered));
                    break;
                }
            }
            fails.extend(s.failures.iter().cloned());
        }
        let tids_now = task_tids();
        ctx.respond(cmd, |r| {
            r.eq("thread ids", &main_tids, &tids_now);
            for f in &fails {
                r.fail(f.clone());
            }
        });
    }
}

fn ctx_fail(msg: &str) -> ! {
    println!("FAIL wl-threads: setup: {msg}");
    std::process::exit(1);
}

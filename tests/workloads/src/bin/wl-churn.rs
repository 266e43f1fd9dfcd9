//! `wl-churn`: a process whose fds, mappings, threads, children and sockets change all the
//! time, for checkpoints that must only ever count its state once frozen.
//!
//! Five churner threads run from before `READY` until exit, each in a tight loop:
//! - fds: opens its own scratch file (`$TMPDIR/stasis-wl-churn-<pid>-<tag>.dat`, 4096 bytes
//!   of a pattern) and /dev/null, reads the file back through the new fd, closes both;
//! - maps: maps 64 KiB anonymous memory, writes a pattern, reads it back, unmaps it;
//! - threads: starts a thread that returns a value derived from its argument, joins it;
//! - children: forks a child that exits at once with status 7, and reaps it;
//! - sockets: makes a UDP socket, binds it to 127.0.0.1 port 0, checks it got a port, closes
//!   it (one fd at a time: a socket pair would pass through a half-closed state, which a
//!   checkpoint refuses, rightly, whenever it freezes the process there).
//!
//! Every result is checked (file contents, memory contents, the thread's value, the child's
//! status, the socket's port); a failure is sticky and named. On `check`/`verify` the main
//! thread waits (up to 5 s) until every churner has made progress since the previous command
//! (a churner stuck after a restore fails), pauses every churner at the top of its loop (nothing of theirs is open or
//! alive then, so the process has exactly 6 threads), reports the counts in an `INFO` line,
//! and lets them go on.

use stasis_workloads::{pattern, sys, Ctx, Spec};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const CHURNERS: usize = 5;
const NAMES: [&str; CHURNERS] = ["fds", "maps", "threads", "children", "sockets"];
const FILE_LEN: usize = 4096;
const MAP_LEN: usize = 64 * 1024;

static PAUSE: AtomicBool = AtomicBool::new(false);
static PAUSED: AtomicU64 = AtomicU64::new(0);
static COUNTS: [AtomicU64; CHURNERS] = [const { AtomicU64::new(0) }; CHURNERS];
static FAILURES: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn fail(msg: String) {
    if let Ok(mut f) = FAILURES.lock() {
        if f.len() < 20 {
            f.push(msg);
        }
    }
}

/// Waits at the top of a churner's loop while the main thread checks.
fn pause_point() {
    if PAUSE.load(SeqCst) {
        PAUSED.fetch_add(1, SeqCst);
        while PAUSE.load(SeqCst) {
            std::thread::sleep(Duration::from_micros(200));
        }
        PAUSED.fetch_sub(1, SeqCst);
    }
}

fn churn(i: usize, mut step: impl FnMut() -> Result<(), String>) {
    loop {
        pause_point();
        if let Err(e) = step() {
            fail(format!("{} churner: {e}", NAMES[i]));
            // A broken churner stops churning (its failure is reported).
            loop {
                pause_point();
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        COUNTS[i].fetch_add(1, SeqCst);
    }
}

fn fds_step(path: &std::ffi::CString, want: &[u8]) -> Result<(), String> {
    // SAFETY: valid C strings; the fds are ours and closed below.
    let (f, n) = unsafe {
        (
            libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC),
            libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC),
        )
    };
    let r = (|| {
        sys::cvt(f, "open scratch file")?;
        sys::cvt(n, "open /dev/null")?;
        let mut got = vec![0u8; FILE_LEN];
        // SAFETY: reads into a buffer of FILE_LEN bytes.
        let k = unsafe { libc::pread(f, got.as_mut_ptr().cast(), FILE_LEN, 0) };
        if k != FILE_LEN as isize || got != want {
            return Err(format!(
                "read {k} bytes of the scratch file, not its contents"
            ));
        }
        sys::write_all(n, b"x")
    })();
    // SAFETY: closing fds opened above (a failed open gave -1, which close rejects).
    unsafe {
        libc::close(f);
        libc::close(n);
    }
    r
}

fn maps_step(round: u64) -> Result<(), String> {
    // SAFETY: a fresh private anonymous mapping, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MAP_LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(sys::os_err("mmap"));
    }
    // SAFETY: the mapping is MAP_LEN bytes, writable, and only this thread knows it.
    let words = unsafe { std::slice::from_raw_parts_mut(p.cast::<u64>(), MAP_LEN / 8) };
    for (j, w) in words.iter_mut().enumerate() {
        *w = round ^ (j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    let bad = words
        .iter()
        .enumerate()
        .position(|(j, &w)| w != round ^ (j as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    // SAFETY: unmapping the mapping made above; `words` is not used after this.
    unsafe { libc::munmap(p, MAP_LEN) };
    match bad {
        Some(j) => Err(format!("word {j} of a fresh mapping changed")),
        None => Ok(()),
    }
}

fn threads_step(round: u64) -> Result<(), String> {
    let t = std::thread::Builder::new()
        .spawn(move || round.wrapping_mul(3) + 1)
        .map_err(|e| format!("spawn: {e}"))?;
    match t.join() {
        Ok(v) if v == round.wrapping_mul(3) + 1 => Ok(()),
        Ok(v) => Err(format!("a thread returned {v}")),
        Err(_) => Err("a thread panicked".into()),
    }
}

fn children_step() -> Result<(), String> {
    // SAFETY: the child only calls _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: leaving the child at once, without running anything of the parent's.
        unsafe { libc::_exit(7) };
    }
    sys::cvt(pid, "fork")?;
    let mut status = 0;
    loop {
        // SAFETY: status is a valid c_int; pid is our child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if sys::errno() != libc::EINTR {
            return Err(sys::os_err(&format!("waitpid({pid})")));
        }
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 7 {
        return Err(format!(
            "child {pid} ended with status {status:#x}, not exit 7"
        ));
    }
    Ok(())
}

fn sockets_step() -> Result<(), String> {
    // SAFETY: socket(2) takes no pointers; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    sys::cvt(fd, "socket(AF_INET, SOCK_DGRAM)")?;
    let r = (|| {
        // SAFETY: an all-zero sockaddr_in is valid; fields are set below.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: addr is a valid sockaddr_in of `len` bytes.
        let rc = unsafe { libc::bind(fd, std::ptr::addr_of!(addr).cast(), len) };
        sys::cvt(rc, "bind to 127.0.0.1:0")?;
        let mut got_len = len;
        // SAFETY: addr and got_len are valid for getsockname to fill.
        let rc =
            unsafe { libc::getsockname(fd, std::ptr::addr_of_mut!(addr).cast(), &mut got_len) };
        sys::cvt(rc, "getsockname")?;
        if addr.sin_port == 0 {
            return Err("a bound UDP socket has port 0".into());
        }
        Ok(())
    })();
    // SAFETY: closing the socket made above.
    unsafe { libc::close(fd) };
    r
}

fn main() {
    let mut ctx = Ctx::start("wl-churn", &Spec::default());
    let path = sys::tmp_dir().join(format!(
        "stasis-wl-churn-{}-{}.dat",
        ctx.ready_pid(),
        ctx.tag
    ));
    let contents: Vec<u8> = (0..FILE_LEN).map(|i| pattern::byte(ctx.seed, i)).collect();
    let written = std::fs::write(&path, &contents).map_err(|e| format!("write {path:?}: {e}"));
    ctx.setup(written);
    ctx.remove_at_exit(path.clone());
    let cpath = sys::cpath(&path);
    let cpath = ctx.setup(cpath);
    let spawned = (|| -> std::io::Result<()> {
        let b = |i: usize| std::thread::Builder::new().name(format!("churn-{}", NAMES[i]));
        b(0).spawn(move || churn(0, || fds_step(&cpath, &contents)))?;
        let mut r1 = 0u64;
        b(1).spawn(move || {
            churn(1, || {
                r1 += 1;
                maps_step(r1)
            })
        })?;
        let mut r2 = 0u64;
        b(2).spawn(move || {
            churn(2, || {
                r2 += 1;
                threads_step(r2)
            })
        })?;
        b(3).spawn(move || churn(3, children_step))?;
        b(4).spawn(move || churn(4, sockets_step))?;
        Ok(())
    })();
    ctx.setup(spawned.map_err(|e| format!("starting the churners: {e}")));
    ctx.threads = 1 + CHURNERS as u64;
    ctx.ready();
    let mut last = [0u64; CHURNERS];
    loop {
        let cmd = ctx.read_blocking();
        let deadline = Instant::now() + Duration::from_secs(5);
        while (0..CHURNERS).any(|i| COUNTS[i].load(SeqCst) <= last[i]) && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        PAUSE.store(true, SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while PAUSED.load(SeqCst) < CHURNERS as u64 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
        let paused = PAUSED.load(SeqCst);
        let counts: Vec<u64> = COUNTS.iter().map(|c| c.load(SeqCst)).collect();
        let failures = FAILURES.lock().map(|f| f.clone()).unwrap_or_default();
        ctx.respond(cmd, |r| {
            r.eq("churners paused for the check", CHURNERS as u64, paused);
            for f in failures {
                r.fail(f);
            }
            for i in 0..CHURNERS {
                r.ensure(counts[i] > last[i], || {
                    format!("the {} churner made no progress ({})", NAMES[i], counts[i])
                });
            }
            r.info(format!("rounds {:?} of {NAMES:?}", counts));
        });
        last.copy_from_slice(&counts);
        PAUSE.store(false, SeqCst);
    }
}

//! `wl-writer`: writes memory all the time; the live-migration (pre-copy) workload.
//!
//! Arguments: `--mib N` (default 64) is one anonymous private mapping of N MiB, seen as 4 KiB
//! pages of 512 words; `--rate R` (default 16) is the MiB/s written in total while running (0:
//! nothing is written after set-up); `--threads T` (default 2) writer threads, each owning an
//! equal contiguous slice of the pages.
//!
//! Set-up writes every page once with generation 0, so all of the memory is resident. A page
//! of generation g holds `page | g << 32` in word 0 and `pattern::word(key(seed, [page, g]),
//! i)` in word i (1..512). A generation table (one `AtomicU32` per page, its own heap
//! allocation) holds each page's current generation, and each writer counts its writes. A
//! writer picks pseudo-random pages of its slice (xorshift, seeded per thread) and rewrites
//! the whole page with the next generation, first the page, then the table entry. It is paced
//! to its share of the rate: every ~1 ms (`nanosleep`) it writes the pages due for the time
//! since its last round, carrying fractions over, so the long-run rate is exact; a backlog of
//! more than 100 ms (a frozen or starved process) is dropped rather than written in one burst.
//! A ticker thread loops `nanosleep(1 ms)` + `clock_gettime(CLOCK_MONOTONIC)` and keeps the
//! longest gap between two ticks, not counting gaps that overlap a check: across a checkpoint
//! or a migration this is the time the process was stopped (its downtime). stdin is
//! `O_NONBLOCK` and the main thread polls it every ~10 ms.
//!
//! A check pauses the writers (each acknowledges between two page writes; if they have not
//! all done so within 10 s the check fails), then verifies every page: a page that reads all
//! zeros (a lost page: breaks if a page was never transferred, or was dropped or remapped),
//! word 0 naming another page (a misplaced page), a generation older than the table's (a lost
//! write: breaks if a page dirtied after it was copied was not sent again, i.e. dirty tracking
//! missed it) or newer than it (a lost table update), and any other word that differs from
//! the pattern of (page, generation) (a torn or corrupted page: breaks if a page was copied
//! while being written and never re-sent, or if bytes were damaged on the way). The first
//! few bad pages are reported by page and word, then how many there were. The generations
//! of each writer's slice must add up to that writer's count of writes (breaks if writes or
//! table updates were lost or duplicated). Failures of the threads' `nanosleep` (anything but
//! 0, e.g. an `EINTR` the restorer did not restart) or a `CLOCK_MONOTONIC` that went
//! backwards are sticky; fd 0 must still have `O_NONBLOCK`. Every check prints
//! `INFO wl-writer: pages=P writes=W max_gap_us=G rate_mib=R threads=T`, W being all writes
//! since start and G the longest tick gap since the previous check (then reset); the writers
//! then resume.

use stasis_workloads::report::Report;
use stasis_workloads::{pattern, sys, Ctx, Spec};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Bytes in one page of the layout (whatever the system page size).
const PAGE_BYTES: usize = 4096;
/// Words in one page.
const WORDS: usize = PAGE_BYTES / 8;
/// Pages in one MiB.
const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_BYTES as u64;
/// The writers' and the ticker's sleep between rounds.
const TICK_MS: u64 = 1;
/// The main thread's sleep between stdin polls.
const POLL_MS: u64 = 10;
/// How long a check waits for every writer to acknowledge the pause.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most time a writer catches up on after a gap (a larger backlog is dropped).
const MAX_BACKLOG_NS: i128 = 100_000_000;
/// Bad pages reported one by one; the rest are counted.
const SHOWN_PAGES: usize = 8;
/// Sticky thread failures kept.
const MAX_FAILS: usize = 64;

/// A writer's count of page writes, on its own cache line.
#[repr(align(64))]
#[derive(Default)]
struct Counter(AtomicU64);

/// The pause handshake between the main thread and the writers.
#[derive(Default)]
struct Park {
    /// Set by a check; writers stop before their next page write.
    paused: bool,
    /// Writers waiting for the pause to end.
    parked: usize,
}

/// Everything the threads share.
struct Shared {
    /// Address of the mapping (`pages * PAGE_BYTES` bytes, never unmapped).
    base: usize,
    pages: usize,
    seed: u64,
    /// The current generation of each page.
    gens: Vec<AtomicU32>,
    /// Page writes per writer thread.
    writes: Vec<Counter>,
    /// Fast-path copy of `Park::paused`.
    pause: AtomicBool,
    /// Incremented when a pause starts and when it ends (odd while paused): the ticker
    /// ignores gaps during which it changed.
    epoch: AtomicU64,
    park: Mutex<Park>,
    cv: Condvar,
    /// The longest tick gap since the last check, in ns.
    max_gap_ns: AtomicU64,
    /// Sticky failures seen by the threads.
    fails: Mutex<Vec<String>>,
}

impl Shared {
    /// Records a sticky failure seen by a thread.
    fn fail(&self, msg: String) {
        if let Ok(mut f) = self.fails.lock() {
            if f.len() < MAX_FAILS {
                f.push(msg);
            }
        }
    }

    /// `CLOCK_MONOTONIC` in ns; a failure is recorded and gives `None`.
    fn mono(&self, who: &str) -> Option<i128> {
        match sys::clock_ns(libc::CLOCK_MONOTONIC) {
            Ok(t) => Some(t),
            Err(e) => {
                self.fail(format!("{who}: {e}"));
                None
            }
        }
    }

    /// Called by a writer that saw `pause`: acknowledges it and waits until it ends.
    /// False if the lock is poisoned (the thread then ends, which the thread count catches).
    fn park(&self) -> bool {
        let Ok(mut g) = self.park.lock() else {
            return false;
        };
        if !g.paused {
            return true;
        }
        g.parked += 1;
        self.cv.notify_all();
        while g.paused {
            g = match self.cv.wait(g) {
                Ok(g) => g,
                Err(_) => return false,
            };
        }
        g.parked -= 1;
        true
    }

    /// Stops the writers: returns once all `n` have acknowledged, or fails after
    /// [`PAUSE_TIMEOUT`].
    fn pause(&self, n: usize) -> Result<(), String> {
        let mut g = self
            .park
            .lock()
            .map_err(|_| "the pause lock is poisoned".to_string())?;
        g.paused = true;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while g.parked < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "only {} of {n} writer threads acknowledged the pause within {} s; memory not verified",
                    g.parked,
                    PAUSE_TIMEOUT.as_secs()
                ));
            }
            g = match self.cv.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(_) => return Err("the pause lock is poisoned".to_string()),
            };
        }
        Ok(())
    }

    /// Lets the writers go on.
    fn resume(&self) {
        if let Ok(mut g) = self.park.lock() {
            g.paused = false;
            self.pause.store(false, Ordering::SeqCst);
            self.epoch.fetch_add(1, Ordering::SeqCst);
            self.cv.notify_all();
        }
    }

    /// The writes counted by all writers.
    fn total_writes(&self) -> u64 {
        self.writes
            .iter()
            .map(|c| c.0.load(Ordering::Acquire))
            .sum()
    }
}

/// The pattern key of `page` at generation `gen`.
fn page_key(seed: u64, page: usize, gen: u32) -> u64 {
    pattern::key(seed, &[page as u64, u64::from(gen)])
}

/// Word 0 of `page` at generation `gen`.
fn header(page: usize, gen: u32) -> u64 {
    page as u64 | (u64::from(gen) << 32)
}

/// Fills `buf` (one page) with the contents of `page` at generation `gen`.
fn fill_page(buf: &mut [u64], seed: u64, page: usize, gen: u32) {
    let k = page_key(seed, page, gen);
    for (i, w) in buf.iter_mut().enumerate().skip(1) {
        *w = pattern::word(k, i);
    }
    buf[0] = header(page, gen);
}

/// The first word (1..) of `buf` that differs from `page` at generation `gen`.
fn body_mismatch(buf: &[u64], seed: u64, page: usize, gen: u32) -> Option<(usize, u64, u64)> {
    let k = page_key(seed, page, gen);
    (1..buf.len()).find_map(|i| {
        let e = pattern::word(k, i);
        (buf[i] != e).then_some((i, e, buf[i]))
    })
}

/// What is wrong with `buf`, the contents of `page` whose table generation is `gen`.
fn check_page(buf: &[u64], seed: u64, page: usize, gen: u32) -> Option<String> {
    if pattern::first_nonzero(buf).is_none() {
        return Some(format!(
            "page {page} reads all zeros (a lost page; the table says generation {gen})"
        ));
    }
    let w0 = buf[0];
    let (idx, g) = (w0 & 0xffff_ffff, (w0 >> 32) as u32);
    if idx != page as u64 {
        return Some(format!(
            "page {page} word 0: expected {:#018x}, got {w0:#018x}, which names page {idx} generation {g} (a misplaced page)",
            header(page, gen)
        ));
    }
    if g != gen {
        let what = if g < gen {
            "older than the table: a lost write"
        } else {
            "newer than the table: a lost table update"
        };
        let body = match body_mismatch(buf, seed, page, g) {
            None => "the rest of the page matches that generation".to_string(),
            Some((i, ..)) => format!("the rest of the page differs from it at word {i}"),
        };
        return Some(format!(
            "page {page} holds generation {g}, the table says {gen} ({what}); {body}"
        ));
    }
    let (i, e, got) = body_mismatch(buf, seed, page, gen)?;
    let hint = if gen > 0 && body_mismatch(buf, seed, page, gen - 1).is_none() {
        format!(" (words 1.. are generation {}: a torn write)", gen - 1)
    } else {
        String::new()
    };
    Some(format!(
        "page {page} (generation {gen}) word {i}: expected {e:#018x}, got {got:#018x}{hint}"
    ))
}

/// Verifies every page against the table and each writer's slice sum against its counter.
/// Only called while every writer is parked.
fn verify(sh: &Shared, slices: &[(usize, usize)], r: &mut Report) {
    // SAFETY: the mapping is `pages * WORDS` words, readable and never unmapped; every
    // writer is parked (the pause handshake went through the mutex, so their writes are
    // visible) and no thread writes it until `resume`.
    let mem = unsafe { std::slice::from_raw_parts(sh.base as *const u64, sh.pages * WORDS) };
    let mut bad = 0usize;
    for (page, buf) in mem.chunks_exact(WORDS).enumerate() {
        let gen = sh.gens[page].load(Ordering::Acquire);
        if let Some(msg) = check_page(buf, sh.seed, page, gen) {
            bad += 1;
            if bad <= SHOWN_PAGES {
                r.fail(msg);
            }
        }
    }
    if bad > SHOWN_PAGES {
        r.fail(format!(
            "{} more bad pages ({bad} of {} in all)",
            bad - SHOWN_PAGES,
            sh.pages
        ));
    }
    for (t, &(first, len)) in slices.iter().enumerate() {
        let sum: u64 = sh.gens[first..first + len]
            .iter()
            .map(|g| u64::from(g.load(Ordering::Acquire)))
            .sum();
        let writes = sh.writes[t].0.load(Ordering::Acquire);
        r.eq(
            &format!(
                "writer {t} (pages {first}..{}): sum of page generations vs its writes",
                first + len
            ),
            writes,
            sum,
        );
    }
}

/// One xorshift64 step.
fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Writer `t`: rewrites random pages of `first..first + len` at `pps` pages per second.
fn writer(sh: Arc<Shared>, t: usize, first: usize, len: usize, pps: u64) {
    let who = format!("writer {t}");
    let mut x = pattern::splitmix64(sh.seed ^ (t as u64 + 1)) | 1;
    // Pages due, in units of 1e-9 page (pps * ns).
    let mut credit: u128 = 0;
    let mut last = sh.mono(&who);
    loop {
        if sh.pause.load(Ordering::Acquire) {
            if !sh.park() {
                return;
            }
            // Time spent paused is not owed.
            last = sh.mono(&who);
        }
        if let Err(e) = sys::nanosleep_ms(TICK_MS) {
            sh.fail(format!("{who}: {e} (expected 0)"));
        }
        let Some(now) = sh.mono(&who) else { continue };
        let dt = last.map_or(0, |l| (now - l).clamp(0, MAX_BACKLOG_NS));
        last = Some(now);
        credit += u128::from(pps) * dt as u128;
        let due = credit / 1_000_000_000;
        credit -= due * 1_000_000_000;
        for _ in 0..due {
            if sh.pause.load(Ordering::Acquire) {
                if !sh.park() {
                    return;
                }
                last = sh.mono(&who);
            }
            let page = first + (xorshift(&mut x) % len as u64) as usize;
            let gen = sh.gens[page].load(Ordering::Relaxed).wrapping_add(1);
            // SAFETY: `page` is in this writer's slice, inside the mapping; no other thread
            // touches the slice while this writer runs (the main thread reads it only while
            // every writer is parked).
            let buf = unsafe {
                std::slice::from_raw_parts_mut((sh.base as *mut u64).add(page * WORDS), WORDS)
            };
            fill_page(buf, sh.seed, page, gen);
            sh.gens[page].store(gen, Ordering::Release);
            sh.writes[t].0.fetch_add(1, Ordering::Release);
        }
    }
}

/// The ticker: records the longest gap between two consecutive 1 ms ticks.
fn ticker(sh: Arc<Shared>) {
    let mut prev: Option<(i128, u64)> = None;
    loop {
        if let Err(e) = sys::nanosleep_ms(TICK_MS) {
            sh.fail(format!("ticker: {e} (expected 0)"));
        }
        let Some(now) = sh.mono("ticker") else {
            continue;
        };
        let epoch = sh.epoch.load(Ordering::SeqCst);
        if let Some((p, pe)) = prev {
            // Only gaps with no pause starting or ending in them, outside any pause.
            if epoch == pe && epoch.is_multiple_of(2) {
                let gap = now - p;
                if gap < 0 {
                    sh.fail(format!(
                        "ticker: CLOCK_MONOTONIC went backwards by {} ns",
                        -gap
                    ));
                } else {
                    let gap = u64::try_from(gap).unwrap_or(u64::MAX);
                    sh.max_gap_ns.fetch_max(gap, Ordering::Relaxed);
                }
            }
        }
        prev = Some((now, epoch));
    }
}

/// The arguments: (MiB, rate in MiB/s, pages, writer threads), all within bounds.
fn sizes(ctx: &Ctx) -> Result<(u64, u64, usize, usize), String> {
    let mib = ctx.args.num("--mib", 64)?;
    let rate = ctx.args.num("--rate", 16)?;
    let threads = ctx.args.num("--threads", 2)?;
    let pages = mib.saturating_mul(PAGES_PER_MIB);
    if mib == 0 || pages > u64::from(u32::MAX) {
        return Err(format!(
            "--mib {mib} must be at least 1 and under {} (page numbers are 32 bits)",
            (u64::from(u32::MAX) + 1) / PAGES_PER_MIB
        ));
    }
    let pages = usize::try_from(pages).map_err(|_| format!("--mib {mib} is too large"))?;
    if pages.checked_mul(PAGE_BYTES).is_none() {
        return Err(format!("--mib {mib} is too large"));
    }
    let max_threads = pages.min(1024);
    if threads == 0 || threads > max_threads as u64 {
        return Err(format!("--threads {threads} must be 1..={max_threads}"));
    }
    if rate > 1 << 30 {
        return Err(format!("--rate {rate} is too large"));
    }
    Ok((mib, rate, pages, threads as usize))
}

fn main() {
    let mut ctx = Ctx::start(
        "wl-writer",
        &Spec {
            flags: &[],
            values: &["--mib", "--rate", "--threads"],
        },
    );
    let sizes = sizes(&ctx);
    let (mib, rate, pages, threads) = ctx.setup(sizes);
    let bytes = pages * PAGE_BYTES;
    // SAFETY: a fresh private anonymous mapping at a kernel-chosen address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        let e = sys::os_err(&format!("mmap {mib} MiB"));
        ctx.fail_exit(&format!("setup: {e}"));
    }
    let seed = ctx.seed;
    {
        // SAFETY: the mapping is `bytes` long, writable, never unmapped, and no other thread
        // exists yet; this reference ends before the writers start.
        let mem = unsafe { std::slice::from_raw_parts_mut(p.cast::<u64>(), pages * WORDS) };
        for (page, buf) in mem.chunks_exact_mut(WORDS).enumerate() {
            fill_page(buf, seed, page, 0);
        }
    }
    let sh = Arc::new(Shared {
        base: p as usize,
        pages,
        seed,
        gens: (0..pages).map(|_| AtomicU32::new(0)).collect(),
        writes: (0..threads).map(|_| Counter::default()).collect(),
        pause: AtomicBool::new(false),
        epoch: AtomicU64::new(0),
        park: Mutex::new(Park::default()),
        cv: Condvar::new(),
        max_gap_ns: AtomicU64::new(0),
        fails: Mutex::new(Vec::new()),
    });
    let slices: Vec<(usize, usize)> = (0..threads)
        .map(|t| {
            let first = t * pages / threads;
            (first, (t + 1) * pages / threads - first)
        })
        .collect();
    let total_pps = rate * PAGES_PER_MIB;
    let per = total_pps / threads as u64;
    let extra = (total_pps % threads as u64) as usize;
    for (t, &(first, len)) in slices.iter().enumerate() {
        let pps = per + u64::from(t < extra);
        let s = Arc::clone(&sh);
        let r = std::thread::Builder::new()
            .name(format!("wl-w{t}"))
            .spawn(move || writer(s, t, first, len, pps));
        if let Err(e) = r {
            ctx.fail_exit(&format!("setup: spawn writer {t}: {e}"));
        }
    }
    let s = Arc::clone(&sh);
    let r = std::thread::Builder::new()
        .name("wl-tick".into())
        .spawn(move || ticker(s));
    if let Err(e) = r {
        ctx.fail_exit(&format!("setup: spawn ticker: {e}"));
    }
    ctx.threads = threads as u64 + 2;
    ctx.set_stdin_nonblocking();
    ctx.ready();
    loop {
        if let Err(e) = sys::nanosleep_ms(POLL_MS) {
            ctx.note(format!("main thread: {e} (expected 0)"));
        }
        while let Some(cmd) = ctx.poll_nonblocking() {
            let paused = sh.pause(threads);
            let gap_us = sh.max_gap_ns.swap(0, Ordering::Relaxed) / 1000;
            let fails: Vec<String> = match sh.fails.lock() {
                Ok(f) => f.clone(),
                Err(_) => vec!["the failure list lock is poisoned".to_string()],
            };
            ctx.respond(cmd, |r| {
                for f in fails {
                    r.fail(f);
                }
                match paused {
                    Ok(()) => verify(&sh, &slices, r),
                    Err(e) => r.fail(e),
                }
                if let Some(now) = r.ok(sys::fcntl_get(0, libc::F_GETFL, "F_GETFL")) {
                    r.ensure(now & libc::O_NONBLOCK != 0, || {
                        format!("fd 0 lost O_NONBLOCK: F_GETFL {now:#x}")
                    });
                }
                r.info(format!(
                    "pages={pages} writes={} max_gap_us={gap_us} rate_mib={rate} threads={threads}",
                    sh.total_writes()
                ));
            });
            sh.resume();
        }
    }
}

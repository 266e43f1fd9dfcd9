//! `wl-writer`: writes memory all the time; the live-migration (pre-copy) workload.
//!
//! Arguments: `--mib N` (default 64) is one anonymous private mapping of N MiB, seen as 4 KiB
//! pages of 512 words; `--rate R` (default 16) is the MiB/s written in total while running (0:
//! nothing is written after set-up); `--threads T` (default 2) writer threads, each owning an
//! equal contiguous slice of the pages; `--churn` (off by default) adds a churner thread that
//! changes the process's mappings all the time (below).
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
//! With `--churn`, for a migrator that must follow mappings created, removed, moved, grown or
//! replaced between its rounds, a churner thread keeps a table of up to 8 churn regions,
//! private anonymous read/write mappings of 4..64 pages (sizes and choices from its own
//! xorshift). Paced like the writers at 200 steps/s (one every ~5 ms), each step picks one
//! action at random: create a region (`mmap`, every page written); unmap one (`munmap`);
//! replace one in place (`mmap(MAP_FIXED)` over it, every page written anew); move one
//! (`mremap(MREMAP_MAYMOVE|MREMAP_FIXED)` onto a `PROT_NONE` placeholder mapped where the
//! kernel chose); grow one by 1..16 pages up to 128 (`mremap` in place, else with
//! `MREMAP_MAYMOVE`; the new pages written); rewrite 1..4 random pages of one; or
//! `madvise(MADV_DONTNEED)` a run of 1..4 pages of one, which then read zero (with no region
//! it creates one, with 8 it unmaps one instead of creating, and at 128 pages it rewrites
//! instead of growing). A region page of generation g holds `id << 32 | g` in word 0 (region
//! ids are never reused) and `pattern::word(key(seed, [CHURN_SALT, id, page, g]), i)` in word
//! i; each write to a region uses its next generation. The table (the churner's heap memory)
//! holds each live region's id, address and, per page, the generation it holds or "zero", with
//! the number of actions applied to the region and the last few of them. The churner
//! acknowledges a check's pause like a writer, between two steps. A failed system call is a
//! sticky failure naming the step, the action and the region, which is then forgotten (left as
//! it is and no longer checked).
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
//!
//! With `--churn` the check also verifies every live churn region: it must be mapped `rw-p`
//! over its whole range in `/proc/self/maps` (breaks if a region created, moved or grown since
//! a round was not mapped on the other side, or with other protections; its pages are then not
//! read), and each of its pages must match the table: data where the table says zero (breaks
//! if a page dropped by `MADV_DONTNEED`, or the old contents of a replaced region, came back),
//! all zeros where it says a generation (a lost page: a page of a new, replaced, moved or
//! grown region, or a rewritten page, was not transferred), word 0 naming another region (a
//! region's pages were left at, or put back at, an old address: a move, unmap or replace was
//! not followed), an older generation (a lost write: dirty tracking did not follow the region
//! through a move, grow or replace) or a newer one (a lost table update), and any other word
//! that differs (a corrupted page, or one holding another page of the region, which is then
//! named). Each bad region is reported once, by id, address, size, number of actions and the
//! last few (`what@step`), with its first bad page in full and the numbers of the others. The
//! `INFO` line then ends with ` churn_regions=N churn_steps=S`: the live churn regions and the
//! churn steps since start.

use stasis_workloads::report::Report;
use stasis_workloads::{maps, pattern, sys, Ctx, Spec};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
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
/// The most churn regions alive at once.
const CHURN_REGIONS: usize = 8;
/// Pages of a new churn region: `CHURN_MIN_PAGES..=CHURN_NEW_PAGES`.
const CHURN_MIN_PAGES: usize = 4;
const CHURN_NEW_PAGES: usize = 64;
/// The most pages one grow adds.
const CHURN_GROW_PAGES: usize = 16;
/// The most pages a churn region grows to.
const CHURN_MAX_PAGES: usize = 128;
/// The most pages one rewrite or `MADV_DONTNEED` touches.
const CHURN_FEW_PAGES: usize = 4;
/// Churn steps per second (one every ~5 ms).
const CHURN_STEPS_PER_S: u64 = 200;
/// Actions remembered per churn region, for failure messages.
const CHURN_LOG: usize = 4;
/// Mixed into the churner's xorshift seed and its pages' pattern keys ("churn").
const CHURN_SALT: u64 = 0x6368_7572_6e00_0000;

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
    /// The churn table (`--churn` only): changed by the churner, one step at a time, and
    /// read by a check only while the churner is parked.
    churn: Option<Mutex<Churn>>,
    /// Churn steps since start, and live churn regions, as of the churner's last step.
    churn_steps: AtomicU64,
    churn_regions: AtomicUsize,
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

    /// Stops the writers (and the churner): returns once all `n` (`who`) have acknowledged,
    /// or fails after [`PAUSE_TIMEOUT`].
    fn pause(&self, n: usize, who: &str) -> Result<(), String> {
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
                    "only {} of {n} {who} acknowledged the pause within {} s; memory not verified",
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

/// Runs `act` `per_s` times a second, paced in ~1 ms rounds: each round does what is due
/// for the time since the one before (fractions carried over, at most [`MAX_BACKLOG_NS`]
/// after a gap). Parks between two acts while a check pauses the threads (time spent
/// paused is not owed); returns when `act` says stop or the process is ending.
fn paced(sh: &Shared, who: &str, per_s: u64, mut act: impl FnMut() -> bool) {
    // Acts due, in units of 1e-9 act (per_s * ns).
    let mut credit: u128 = 0;
    let mut last = sh.mono(who);
    loop {
        if sh.pause.load(Ordering::Acquire) {
            if !sh.park() {
                return;
            }
            last = sh.mono(who);
        }
        if let Err(e) = sys::nanosleep_ms(TICK_MS) {
            sh.fail(format!("{who}: {e} (expected 0)"));
        }
        let Some(now) = sh.mono(who) else { continue };
        let dt = last.map_or(0, |l| (now - l).clamp(0, MAX_BACKLOG_NS));
        last = Some(now);
        credit += u128::from(per_s) * dt as u128;
        let due = credit / 1_000_000_000;
        credit -= due * 1_000_000_000;
        for _ in 0..due {
            if sh.pause.load(Ordering::Acquire) {
                if !sh.park() {
                    return;
                }
                last = sh.mono(who);
            }
            if !act() {
                return;
            }
        }
    }
}

/// Writer `t`: rewrites random pages of `first..first + len` at `pps` pages per second.
fn writer(sh: Arc<Shared>, t: usize, first: usize, len: usize, pps: u64) {
    let who = format!("writer {t}");
    let mut x = pattern::splitmix64(sh.seed ^ (t as u64 + 1)) | 1;
    paced(&sh, &who, pps, || {
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
        true
    });
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

/// What a churn step does.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    Create,
    Unmap,
    Replace,
    Move,
    Grow,
    Rewrite,
    Discard,
}

/// One churn region: a private anonymous read/write mapping that only the churner changes.
struct Region {
    /// Never reused: a page of an older region found here names it.
    id: u32,
    /// Address of the mapping, `pages.len() * PAGE_BYTES` bytes.
    addr: usize,
    /// What each page holds: `Some(g)`, generation g; `None`, zeros.
    pages: Vec<Option<u32>>,
    /// The newest generation written to the region.
    gen: u32,
    /// Actions applied to the region, its creation included.
    actions: u64,
    /// The last few of them: (churn step, what).
    log: VecDeque<(u64, &'static str)>,
}

/// The churner's table of live regions.
#[derive(Default)]
struct Churn {
    regions: Vec<Region>,
    /// The id of the next region created.
    next_id: u32,
    /// Steps taken since start.
    steps: u64,
}

/// The pattern key of page `page` of churn region `id` at generation `gen`.
fn churn_key(seed: u64, id: u32, page: usize, gen: u32) -> u64 {
    pattern::key(
        seed,
        &[CHURN_SALT, u64::from(id), page as u64, u64::from(gen)],
    )
}

/// Word 0 of a page of churn region `id` at generation `gen`.
fn churn_header(id: u32, gen: u32) -> u64 {
    (u64::from(id) << 32) | u64::from(gen)
}

/// The first word (1..) of `buf` that differs from page `page` of region `id` at `gen`.
fn churn_mismatch(
    buf: &[u64],
    seed: u64,
    id: u32,
    page: usize,
    gen: u32,
) -> Option<(usize, u64, u64)> {
    let k = churn_key(seed, id, page, gen);
    (1..buf.len()).find_map(|i| {
        let e = pattern::word(k, i);
        (buf[i] != e).then_some((i, e, buf[i]))
    })
}

/// `mmap` of `len` bytes of private anonymous memory with `prot`, where the kernel chooses.
fn map_new(len: usize, prot: libc::c_int) -> Result<usize, String> {
    // SAFETY: a fresh mapping at a kernel-chosen address; it replaces nothing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(sys::os_err(&format!("mmap({} pages)", len / PAGE_BYTES)));
    }
    Ok(p as usize)
}

/// A uniform pseudo-random number below `n` (> 0).
fn below(x: &mut u64, n: usize) -> usize {
    (xorshift(x) % n as u64) as usize
}

impl Region {
    /// The region's length in bytes.
    fn bytes(&self) -> usize {
        self.pages.len() * PAGE_BYTES
    }

    /// Records an action applied at churn step `step`.
    fn note(&mut self, step: u64, what: &'static str) {
        self.actions += 1;
        if self.log.len() == CHURN_LOG {
            self.log.pop_front();
        }
        self.log.push_back((step, what));
    }

    /// `id N at 0x.. (P pages; A actions, last: what@step ..)`, for messages.
    fn describe(&self) -> String {
        let last: Vec<String> = self
            .log
            .iter()
            .map(|(step, what)| format!("{what}@{step}"))
            .collect();
        format!(
            "churn region {} at {:#x} ({} pages; {} actions, last: {})",
            self.id,
            self.addr,
            self.pages.len(),
            self.actions,
            last.join(" ")
        )
    }

    /// Writes page `page` with generation `gen` and records it.
    fn write(&mut self, seed: u64, page: usize, gen: u32) {
        // Indexing first also bounds `page`.
        self.pages[page] = Some(gen);
        // SAFETY: `page` is below `pages.len()`, so the page lies inside the region's mapping,
        // which is read/write and which only the churner touches (a check reads it only while
        // the churner is parked).
        let buf = unsafe {
            std::slice::from_raw_parts_mut((self.addr as *mut u64).add(page * WORDS), WORDS)
        };
        let k = churn_key(seed, self.id, page, gen);
        for (i, w) in buf.iter_mut().enumerate().skip(1) {
            *w = pattern::word(k, i);
        }
        buf[0] = churn_header(self.id, gen);
    }

    /// Writes every page of `pages` with the region's next generation.
    fn write_new(&mut self, seed: u64, pages: impl IntoIterator<Item = usize>) {
        self.gen = self.gen.wrapping_add(1);
        for page in pages {
            self.write(seed, page, self.gen);
        }
    }

    /// Unmaps the region (which the caller then drops from the table).
    fn unmap(&self) -> Result<(), String> {
        // SAFETY: the range is exactly the region's own mapping, which nothing but the table
        // refers to, and the region leaves the table.
        let r = unsafe { libc::munmap(self.addr as *mut libc::c_void, self.bytes()) };
        sys::cvt(
            r,
            &format!("munmap({:#x}, {} pages)", self.addr, self.pages.len()),
        )
        .map(drop)
    }

    /// Maps a fresh mapping over the region (`MAP_FIXED`) and writes all of it anew.
    fn replace(&mut self, seed: u64) -> Result<(), String> {
        // SAFETY: `MAP_FIXED` replaces exactly the region's own mapping, which nothing but
        // the table refers to; the table is updated below.
        let p = unsafe {
            libc::mmap(
                self.addr as *mut libc::c_void,
                self.bytes(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(sys::os_err(&format!("mmap(MAP_FIXED at {:#x})", self.addr)));
        }
        if p as usize != self.addr {
            return Err(format!(
                "mmap(MAP_FIXED at {:#x}) returned {p:?}",
                self.addr
            ));
        }
        self.write_new(seed, 0..self.pages.len());
        Ok(())
    }

    /// Moves the region (`MREMAP_FIXED`) onto a `PROT_NONE` placeholder mapped for it.
    fn move_away(&mut self) -> Result<(), String> {
        let len = self.bytes();
        let dst = map_new(len, libc::PROT_NONE).map_err(|e| format!("placeholder: {e}"))?;
        // SAFETY: moves the region's own mapping onto `dst`, a placeholder just mapped for it
        // (`MREMAP_FIXED` replaces it); nothing but the table refers to either range, and the
        // table is updated below.
        let p = unsafe {
            libc::mremap(
                self.addr as *mut libc::c_void,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                dst as *mut libc::c_void,
            )
        };
        if p == libc::MAP_FAILED {
            let e = sys::os_err(&format!(
                "mremap({:#x}, MREMAP_FIXED to {dst:#x})",
                self.addr
            ));
            // SAFETY: the placeholder is ours and nothing refers to it.
            let r = unsafe { libc::munmap(dst as *mut libc::c_void, len) };
            return match sys::cvt(r, "munmap(placeholder)") {
                Ok(_) => Err(e),
                Err(e2) => Err(format!("{e}; {e2}")),
            };
        }
        if p as usize != dst {
            return Err(format!(
                "mremap({:#x}, MREMAP_FIXED to {dst:#x}) returned {p:?}",
                self.addr
            ));
        }
        self.addr = dst;
        Ok(())
    }

    /// Grows the region by `add` pages (in place if the kernel can, else moved) and writes
    /// the new pages. True if it moved.
    fn grow(&mut self, seed: u64, add: usize) -> Result<bool, String> {
        let (old, n) = (self.bytes(), self.pages.len());
        let new = (n + add) * PAGE_BYTES;
        // SAFETY: resizes the region's own mapping without moving it: the kernel only grows
        // it into free address space. The table is updated below.
        let mut p = unsafe { libc::mremap(self.addr as *mut libc::c_void, old, new, 0) };
        let moved = p == libc::MAP_FAILED;
        if moved {
            if sys::errno() != libc::ENOMEM {
                return Err(sys::os_err(&format!(
                    "mremap({:#x}, {n} -> {} pages)",
                    self.addr,
                    n + add
                )));
            }
            // SAFETY: resizes the region's own mapping, moving it where the kernel chooses;
            // the table is updated below.
            p = unsafe {
                libc::mremap(
                    self.addr as *mut libc::c_void,
                    old,
                    new,
                    libc::MREMAP_MAYMOVE,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(sys::os_err(&format!(
                    "mremap({:#x}, {n} -> {} pages, MREMAP_MAYMOVE)",
                    self.addr,
                    n + add
                )));
            }
        }
        self.addr = p as usize;
        self.pages.resize(n + add, None);
        self.write_new(seed, n..n + add);
        Ok(moved)
    }

    /// Discards `count` pages from `first` (`MADV_DONTNEED`): they read zero afterwards.
    fn discard(&mut self, first: usize, count: usize) -> Result<(), String> {
        let end = first + count;
        // Indexing first also bounds the run.
        self.pages[first..end].fill(None);
        // SAFETY: the run lies inside the region's own private anonymous mapping, which only
        // the churner touches; its pages read zero afterwards, as the table now says.
        let r = unsafe {
            libc::madvise(
                (self.addr + first * PAGE_BYTES) as *mut libc::c_void,
                count * PAGE_BYTES,
                libc::MADV_DONTNEED,
            )
        };
        sys::cvt(r, &format!("madvise(pages {first}..{end}, MADV_DONTNEED)")).map(drop)
    }
}

/// Rewrites 1..=[`CHURN_FEW_PAGES`] random pages of `r` with its next generation.
fn rewrite_some(r: &mut Region, seed: u64, x: &mut u64) {
    let count = 1 + below(x, CHURN_FEW_PAGES);
    let pages: Vec<usize> = (0..count).map(|_| below(x, r.pages.len())).collect();
    r.write_new(seed, pages);
}

/// One churn step: one random action on the table and on the mappings.
fn churn_step(c: &mut Churn, seed: u64, x: &mut u64) -> Result<(), String> {
    let step = c.steps;
    c.steps += 1;
    let n = c.regions.len();
    let action = match below(x, 7) {
        _ if n == 0 => Action::Create,
        0 if n < CHURN_REGIONS => Action::Create,
        0 | 1 => Action::Unmap,
        2 => Action::Replace,
        3 => Action::Move,
        4 => Action::Grow,
        5 => Action::Rewrite,
        _ => Action::Discard,
    };
    if action == Action::Create {
        let pages = CHURN_MIN_PAGES + below(x, CHURN_NEW_PAGES - CHURN_MIN_PAGES + 1);
        let addr = map_new(pages * PAGE_BYTES, libc::PROT_READ | libc::PROT_WRITE)
            .map_err(|e| format!("step {step}: create: {e}"))?;
        let mut r = Region {
            id: c.next_id,
            addr,
            pages: vec![None; pages],
            gen: 0,
            actions: 0,
            log: VecDeque::with_capacity(CHURN_LOG),
        };
        c.next_id = c.next_id.wrapping_add(1);
        for page in 0..pages {
            r.write(seed, page, 0);
        }
        r.note(step, "create");
        c.regions.push(r);
        return Ok(());
    }
    let i = below(x, n);
    let r = &mut c.regions[i];
    let done = match action {
        Action::Unmap => r.unmap().map(|()| "unmap"),
        Action::Replace => r.replace(seed).map(|()| "replace"),
        Action::Move => r.move_away().map(|()| "move"),
        Action::Grow if r.pages.len() < CHURN_MAX_PAGES => {
            let add = 1 + below(x, CHURN_GROW_PAGES.min(CHURN_MAX_PAGES - r.pages.len()));
            r.grow(seed, add)
                .map(|moved| if moved { "grow(moved)" } else { "grow" })
        }
        Action::Discard => {
            let first = below(x, r.pages.len());
            let count = (1 + below(x, CHURN_FEW_PAGES)).min(r.pages.len() - first);
            r.discard(first, count).map(|()| "dontneed")
        }
        // Rewrite, or grow of a region that is already as large as it gets.
        _ => {
            rewrite_some(r, seed, x);
            Ok("rewrite")
        }
    };
    match done {
        Ok(what) => {
            r.note(step, what);
            if action == Action::Unmap {
                c.regions.remove(i);
            }
            Ok(())
        }
        Err(e) => {
            let r = c.regions.remove(i);
            Err(format!(
                "step {step}: {}: {e}; the region is no longer checked",
                r.describe()
            ))
        }
    }
}

/// What is wrong with `buf`, page `page` of region `r` (by the table).
fn check_churn_page(buf: &[u64], seed: u64, r: &Region, page: usize) -> Option<String> {
    let w0 = buf[0];
    let (id, g) = ((w0 >> 32) as u32, w0 as u32);
    let Some(gen) = r.pages[page] else {
        let (i, w) = pattern::first_nonzero(buf)?;
        let got = if id == r.id && churn_mismatch(buf, seed, id, page, g).is_none() {
            format!("holds its generation {g} (a discarded page came back)")
        } else {
            format!("word {i} is {w:#018x}")
        };
        return Some(format!(
            "should read zero (discarded with MADV_DONTNEED) but {got}"
        ));
    };
    if pattern::first_nonzero(buf).is_none() {
        return Some(format!(
            "reads all zeros, the table says generation {gen} (a lost page)"
        ));
    }
    if id != r.id {
        return Some(format!(
            "word 0: expected {:#018x}, got {w0:#018x}, which names churn region {id} \
             generation {g} (a page of another region: a move, unmap or replace not followed)",
            churn_header(r.id, gen)
        ));
    }
    if g != gen {
        let what = if g < gen {
            "older than the table: a lost write"
        } else {
            "newer than the table: a lost table update"
        };
        let body = match churn_mismatch(buf, seed, id, page, g) {
            None => "the rest of the page matches that generation".to_string(),
            Some((i, ..)) => format!("the rest of the page differs from it at word {i}"),
        };
        return Some(format!(
            "holds generation {g}, the table says {gen} ({what}); {body}"
        ));
    }
    let (i, e, got) = churn_mismatch(buf, seed, id, page, gen)?;
    let hint = (0..r.pages.len())
        .find(|&q| {
            q != page && r.pages[q] == Some(gen) && churn_mismatch(buf, seed, id, q, gen).is_none()
        })
        .map_or(String::new(), |q| {
            format!(" (it holds page {q}'s contents: a misplaced page)")
        });
    Some(format!(
        "(generation {gen}) word {i}: expected {e:#018x}, got {got:#018x}{hint}"
    ))
}

/// Whether `[start, start + len)` is all mapped `rw-p` in `maps`.
fn mapped_rw(maps: &[maps::MapEntry], start: usize, len: usize) -> Result<(), String> {
    let end = start + len;
    let mut at = start;
    while at < end {
        match maps::containing(maps, at) {
            None => return Err(format!("nothing mapped at {at:#x} (a lost mapping)")),
            Some(m) if m.perms != "rw-p" => {
                return Err(format!(
                    "{:#x}-{:#x} is mapped {}, expected rw-p",
                    m.start, m.end, m.perms
                ))
            }
            Some(m) => at = m.end,
        }
    }
    Ok(())
}

/// Verifies every live churn region against the table; one failure per bad region (there
/// are at most [`CHURN_REGIONS`]), naming its first bad page and listing the others. Only
/// called while the churner is parked.
fn verify_churn(sh: &Shared, churn: &Mutex<Churn>, r: &mut Report) {
    let Ok(c) = churn.lock() else {
        r.fail("the churn table lock is poisoned");
        return;
    };
    let Some(maps) = r.ok(maps::read_maps()) else {
        return;
    };
    for reg in &c.regions {
        if let Err(e) = mapped_rw(&maps, reg.addr, reg.bytes()) {
            r.fail(format!("{}: {e}; its pages are not read", reg.describe()));
            continue;
        }
        // SAFETY: the region is mapped read/write over its whole range (just checked), only
        // the churner changes it, and the churner is parked (the pause handshake and the
        // table's lock went through mutexes, so its writes are visible) until `resume`.
        let mem =
            unsafe { std::slice::from_raw_parts(reg.addr as *const u64, reg.pages.len() * WORDS) };
        let mut first = None;
        let mut others = Vec::new();
        for (page, buf) in mem.chunks_exact(WORDS).enumerate() {
            if let Some(msg) = check_churn_page(buf, sh.seed, reg, page) {
                match first {
                    None => first = Some(format!("page {page}: {msg}")),
                    Some(_) => others.push(page.to_string()),
                }
            }
        }
        let Some(first) = first else {
            continue;
        };
        let more = match others.len() {
            0 => String::new(),
            n if n <= SHOWN_PAGES => format!("; also bad: pages {}", others.join(" ")),
            n => format!(
                "; also bad: pages {} and {} more",
                others[..SHOWN_PAGES].join(" "),
                n - SHOWN_PAGES
            ),
        };
        r.fail(format!("{}: {first}{more}", reg.describe()));
    }
}

/// The churner: changes the churn regions at [`CHURN_STEPS_PER_S`] steps per second.
fn churner(sh: Arc<Shared>) {
    let who = "churner";
    let Some(churn) = &sh.churn else {
        return;
    };
    let mut x = pattern::splitmix64(sh.seed ^ CHURN_SALT) | 1;
    paced(&sh, who, CHURN_STEPS_PER_S, || {
        // Never held while parked: a check takes it once the churner is parked.
        let Ok(mut c) = churn.lock() else {
            return false;
        };
        if let Err(e) = churn_step(&mut c, sh.seed, &mut x) {
            sh.fail(format!("{who}: {e}"));
        }
        sh.churn_regions.store(c.regions.len(), Ordering::Release);
        sh.churn_steps.store(c.steps, Ordering::Release);
        true
    });
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
            flags: &["--churn"],
            values: &["--mib", "--rate", "--threads"],
        },
    );
    let sizes = sizes(&ctx);
    let (mib, rate, pages, threads) = ctx.setup(sizes);
    let churn = ctx.args.flag("--churn");
    if churn && sys::page_size() != PAGE_BYTES {
        ctx.fail_exit(&format!(
            "setup: --churn needs {PAGE_BYTES}-byte pages, the system's are {} bytes",
            sys::page_size()
        ));
    }
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
        churn: churn.then(|| Mutex::new(Churn::default())),
        churn_steps: AtomicU64::new(0),
        churn_regions: AtomicUsize::new(0),
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
    if churn {
        let s = Arc::clone(&sh);
        let r = std::thread::Builder::new()
            .name("wl-churner".into())
            .spawn(move || churner(s));
        if let Err(e) = r {
            ctx.fail_exit(&format!("setup: spawn churner: {e}"));
        }
    }
    ctx.threads = threads as u64 + 2 + u64::from(churn);
    // The threads a check pauses.
    let (parked, who) = if churn {
        (threads + 1, "writer and churner threads")
    } else {
        (threads, "writer threads")
    };
    ctx.set_stdin_nonblocking();
    ctx.ready();
    loop {
        if let Err(e) = sys::nanosleep_ms(POLL_MS) {
            ctx.note(format!("main thread: {e} (expected 0)"));
        }
        while let Some(cmd) = ctx.poll_nonblocking() {
            let paused = sh.pause(parked, who);
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
                    Ok(()) => {
                        verify(&sh, &slices, r);
                        if let Some(c) = &sh.churn {
                            verify_churn(&sh, c, r);
                        }
                    }
                    Err(e) => r.fail(e),
                }
                if let Some(now) = r.ok(sys::fcntl_get(0, libc::F_GETFL, "F_GETFL")) {
                    r.ensure(now & libc::O_NONBLOCK != 0, || {
                        format!("fd 0 lost O_NONBLOCK: F_GETFL {now:#x}")
                    });
                }
                let mut info = format!(
                    "pages={pages} writes={} max_gap_us={gap_us} rate_mib={rate} threads={threads}",
                    sh.total_writes()
                );
                if churn {
                    info.push_str(&format!(
                        " churn_regions={} churn_steps={}",
                        sh.churn_regions.load(Ordering::Acquire),
                        sh.churn_steps.load(Ordering::Acquire)
                    ));
                }
                r.info(info);
            });
            sh.resume();
        }
    }
}

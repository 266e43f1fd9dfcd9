//! `wl-memory`: many VMAs with distinct deterministic patterns.
//!
//! Layout (all inside one reservation, every item separated by a `PROT_NONE` guard page):
//! 24 anonymous private regions (4 KiB .. 8 MiB; four of them sparse: only every Nth page
//! written, the rest never touched), a read-only region, a `MAP_SHARED|MAP_ANONYMOUS` region
//! and a `MAP_PRIVATE` mapping of a temp file at file offset 8 pages. Outside it: an 8 MiB heap
//! `Vec`, 4096 small `malloc`ed objects, a 512 KiB stack array at the bottom of a 24-deep
//! recursion (each frame holds its own pattern), and with `--alias` a second view of the shared
//! region (`mremap` with old size 0).
//!
//! What breaks each check if state is lost: any page not dumped or restored at the wrong
//! address reads zero or another pattern (content checks name region, page, word); a sparse
//! page that was never touched but is restored with data, or a dumper that stores pages it
//! should skip at the wrong place, breaks the zero check; a restorer that merges or splits
//! VMAs, or forgets the final `mprotect`, breaks the exact `/proc/self/maps` checks; a
//! file mapping restored as anonymous memory reads zero in never-touched pages, one restored
//! from the file only loses the modified pages, one mapped `MAP_SHARED` writes the changes
//! into the file (the file is re-read and checked); a wrong `brk` breaks the raw brk check and
//! later heap growth (fresh allocations are made and checked after each check); a shared
//! region restored as two private copies breaks the `--alias` write-through check.

use std::hint::black_box;
use std::path::PathBuf;

use stasis_workloads::maps::{self, MapEntry};
use stasis_workloads::pattern::{self, key};
use stasis_workloads::{sys, Ctx, Report, Spec};

/// Region sizes in KiB at the default size (sum 50564 KiB).
const BASE_KIB: [usize; 24] = [
    4, 8, 12, 20, 32, 64, 100, 128, 256, 512, 768, 1024, 1536, 2048, 2048, 3072, 4096, 4096, 6144,
    8192, 8192, 8192, 4, 16,
];
/// Sparse regions: (index, stride): only pages `p % stride == 0` are written.
const SPARSE: [(usize, usize); 4] = [(12, 5), (16, 16), (19, 3), (20, 64)];

const ID_ANON: u64 = 1;
const ID_RO: u64 = 2;
const ID_SHARED: u64 = 3;
const ID_FILE: u64 = 4;
const ID_FILE_MOD: u64 = 5;
const ID_FILE_PART: u64 = 6;
const ID_HEAP: u64 = 7;
const ID_SMALL: u64 = 8;
const ID_STACK: u64 = 9;
const ID_BIG: u64 = 10;
const ID_FRESH: u64 = 11;

const RO_PAGES: usize = 16;
const SHARED_PAGES: usize = 256;
const FILE_PAGES: usize = 72;
const FILE_MAP_OFFSET_PAGES: usize = 8;
const FILE_MAP_PAGES: usize = 64;
/// Words of a partially modified file page that are rewritten.
const PART_WORDS: std::ops::Range<usize> = 13..21;
const PARTIAL_PAGE: usize = 10;
const HEAP_WORDS: usize = 1 << 20;
const SMALL_OBJECTS: usize = 4096;
const DEPTH: usize = 24;
const BIG_WORDS: usize = 65536;

struct Anon {
    addr: usize,
    pages: usize,
    stride: usize,
}

struct State {
    ps: usize,
    seed: u64,
    anon: Vec<Anon>,
    guards: Vec<usize>,
    ro: usize,
    shared: usize,
    alias: Option<usize>,
    file: usize,
    file_path: PathBuf,
    heap: Vec<u64>,
    small: Vec<Box<[u8]>>,
    start_brk: usize,
}

/// What a mapped file page should contain.
#[derive(Clone, Copy, PartialEq)]
enum FilePage {
    Modified,
    Partial,
    Read,
    Untouched,
}

fn file_page_kind(i: usize) -> FilePage {
    if i == PARTIAL_PAGE {
        FilePage::Partial
    } else {
        match i % 4 {
            1 => FilePage::Modified,
            2 => FilePage::Read,
            _ => FilePage::Untouched,
        }
    }
}

fn page<'a>(addr: usize, ps: usize, p: usize) -> &'a [u64] {
    // SAFETY: callers pass pages of mappings made by this program that stay mapped and
    // readable for the life of the process; the address is page-aligned.
    unsafe { std::slice::from_raw_parts((addr + p * ps) as *const u64, ps / 8) }
}

fn page_mut<'a>(addr: usize, ps: usize, p: usize) -> &'a mut [u64] {
    // SAFETY: callers pass pages of writable mappings made by this program that stay mapped
    // for the life of the process; no other reference to the page is live while it is used.
    unsafe { std::slice::from_raw_parts_mut((addr + p * ps) as *mut u64, ps / 8) }
}

fn mmap_fixed(
    addr: usize,
    len: usize,
    prot: i32,
    flags: i32,
    fd: i32,
    off: i64,
    what: &str,
) -> Result<(), String> {
    // SAFETY: MAP_FIXED only replaces pages of our own PROT_NONE reservation (callers pass
    // addresses inside it), which nothing references.
    let p = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            flags | libc::MAP_FIXED,
            fd,
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(sys::os_err(&format!(
            "mmap {what} at {addr:#x} len {len:#x}"
        )));
    }
    if p as usize != addr {
        return Err(format!(
            "mmap {what}: asked {addr:#x}, got {:#x}",
            p as usize
        ));
    }
    Ok(())
}

fn check_page(what: &str, p: usize, words: &[u64], k: u64) -> Result<(), String> {
    match pattern::first_mismatch(words, k) {
        None => Ok(()),
        Some((i, e, g)) => Err(format!(
            "{what} page {p} word {i}: expected {e:#018x}, got {g:#018x}"
        )),
    }
}

fn check_zero(what: &str, p: usize, words: &[u64]) -> Result<(), String> {
    match pattern::first_nonzero(words) {
        None => Ok(()),
        Some((i, g)) => Err(format!(
            "{what} page {p} (never touched) word {i}: expected 0, got {g:#018x}"
        )),
    }
}

fn file_page_content(seed: u64, ps: usize, k: usize) -> Vec<u64> {
    let mut v = vec![0u64; ps / 8];
    pattern::fill(&mut v, key(seed, &[ID_FILE, k as u64]));
    v
}

fn setup(ctx: &mut Ctx) -> Result<State, String> {
    let ps = sys::page_size();
    let seed = ctx.seed;
    let mut pages: Vec<usize> = BASE_KIB.iter().map(|k| (k * 1024).div_ceil(ps)).collect();
    if let Some(v) = ctx.args.value("--mib") {
        let mib: usize = v
            .parse()
            .map_err(|_| format!("--mib needs an integer, got {v:?}"))?;
        let base: usize = BASE_KIB.iter().sum();
        pages = BASE_KIB
            .iter()
            .map(|k| ((k * mib * 1024 / base).div_ceil(ps / 1024)).max(1))
            .collect();
    }
    let items = pages.len() + 3;
    let total = pages.iter().sum::<usize>() + RO_PAGES + SHARED_PAGES + FILE_MAP_PAGES + items + 1;
    // SAFETY: a fresh PROT_NONE reservation at a kernel-chosen address touches nothing else.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total * ps,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(sys::os_err("mmap reservation"));
    }
    let mut cur = base as usize;
    let mut guards = vec![cur];
    cur += ps;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let priv_anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;

    let mut anon = Vec::new();
    for (i, &n) in pages.iter().enumerate() {
        let stride = SPARSE.iter().find(|s| s.0 == i).map_or(1, |s| s.1);
        mmap_fixed(
            cur,
            n * ps,
            rw,
            priv_anon,
            -1,
            0,
            &format!("anon region {i}"),
        )?;
        if stride > 1 {
            // SAFETY: advice on our own fresh mapping; only affects huge-page use.
            let r =
                unsafe { libc::madvise(cur as *mut libc::c_void, n * ps, libc::MADV_NOHUGEPAGE) };
            sys::cvt(r, "madvise(MADV_NOHUGEPAGE)")?;
        }
        for p in (0..n).step_by(stride) {
            pattern::fill(
                page_mut(cur, ps, p),
                key(seed, &[ID_ANON, i as u64, p as u64]),
            );
        }
        anon.push(Anon {
            addr: cur,
            pages: n,
            stride,
        });
        cur += n * ps;
        guards.push(cur);
        cur += ps;
    }

    let ro = cur;
    mmap_fixed(ro, RO_PAGES * ps, rw, priv_anon, -1, 0, "read-only region")?;
    for p in 0..RO_PAGES {
        pattern::fill(page_mut(ro, ps, p), key(seed, &[ID_RO, p as u64]));
    }
    // SAFETY: changes protection of our own mapping; no references to it are live.
    let r = unsafe { libc::mprotect(ro as *mut libc::c_void, RO_PAGES * ps, libc::PROT_READ) };
    sys::cvt(r, "mprotect(read-only region, PROT_READ)")?;
    cur += RO_PAGES * ps;
    guards.push(cur);
    cur += ps;

    let shared = cur;
    mmap_fixed(
        shared,
        SHARED_PAGES * ps,
        rw,
        libc::MAP_SHARED | libc::MAP_ANONYMOUS,
        -1,
        0,
        "shared region",
    )?;
    for p in 0..SHARED_PAGES {
        pattern::fill(page_mut(shared, ps, p), key(seed, &[ID_SHARED, p as u64]));
    }
    cur += SHARED_PAGES * ps;
    guards.push(cur);
    cur += ps;

    let alias = if ctx.args.flag("--alias") {
        // SAFETY: mremap with old_size 0 on a shared mapping creates a second view of the same
        // pages at a new kernel-chosen address; the original stays.
        let a = unsafe {
            libc::mremap(
                shared as *mut libc::c_void,
                0,
                SHARED_PAGES * ps,
                libc::MREMAP_MAYMOVE,
            )
        };
        if a == libc::MAP_FAILED {
            return Err(sys::os_err("mremap(shared, 0, ..) alias"));
        }
        Some(a as usize)
    } else {
        None
    };

    // The file: FILE_PAGES pages of pattern, mapped from page FILE_MAP_OFFSET_PAGES.
    let file_path = sys::tmp_dir().join(format!(
        "stasis-wl-memory-{}-{}.dat",
        sys::getpid_raw(),
        ctx.tag
    ));
    let mut content = Vec::with_capacity(FILE_PAGES * ps);
    for k in 0..FILE_PAGES {
        for w in file_page_content(seed, ps, k) {
            content.extend_from_slice(&w.to_ne_bytes());
        }
    }
    std::fs::write(&file_path, &content).map_err(|e| format!("write {file_path:?}: {e}"))?;
    ctx.remove_at_exit(file_path.clone());
    let cp = sys::cpath(&file_path)?;
    // SAFETY: `cp` is a valid NUL-terminated path.
    let fd = unsafe { libc::open(cp.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    let fd = sys::cvt(fd, &format!("open {file_path:?}"))?;
    let file = cur;
    let r = mmap_fixed(
        file,
        FILE_MAP_PAGES * ps,
        rw,
        libc::MAP_PRIVATE,
        fd,
        (FILE_MAP_OFFSET_PAGES * ps) as i64,
        "file mapping",
    );
    // SAFETY: closing our own fd; the mapping keeps the file.
    unsafe { libc::close(fd) };
    r?;
    cur += FILE_MAP_PAGES * ps;
    guards.push(cur);
    let mut sink = 0u64;
    for i in 0..FILE_MAP_PAGES {
        match file_page_kind(i) {
            FilePage::Modified => {
                pattern::fill(page_mut(file, ps, i), key(seed, &[ID_FILE_MOD, i as u64]))
            }
            FilePage::Partial => {
                let pg = page_mut(file, ps, i);
                for j in PART_WORDS {
                    pg[j] = pattern::word(key(seed, &[ID_FILE_PART]), j);
                }
            }
            FilePage::Read => {
                sink = page(file, ps, i)
                    .iter()
                    .fold(sink, |a, &w| a.wrapping_add(w))
            }
            FilePage::Untouched => {}
        }
    }
    black_box(sink);

    let mut heap = vec![0u64; HEAP_WORDS];
    pattern::fill(&mut heap, key(seed, &[ID_HEAP]));
    let mut small = Vec::with_capacity(SMALL_OBJECTS);
    for i in 0..SMALL_OBJECTS {
        let len = 16 + (pattern::splitmix64(i as u64) % 497) as usize;
        let k = key(seed, &[ID_SMALL, i as u64]);
        let b: Box<[u8]> = (0..len).map(|j| pattern::byte(k, j)).collect();
        small.push(b);
    }
    let start_brk = start_brk()?;

    Ok(State {
        ps,
        seed,
        anon,
        guards,
        ro,
        shared,
        alias,
        file,
        file_path,
        heap,
        small,
        start_brk,
    })
}

fn check_memory(st: &State, r: &mut Report) {
    let (ps, seed) = (st.ps, st.seed);
    let mut touched = 0usize;
    for (i, a) in st.anon.iter().enumerate() {
        for p in 0..a.pages {
            let what = format!("anon region {i} ({} pages)", a.pages);
            let res = if p % a.stride == 0 {
                touched += 1;
                check_page(
                    &what,
                    p,
                    page(a.addr, ps, p),
                    key(seed, &[ID_ANON, i as u64, p as u64]),
                )
            } else {
                check_zero(&what, p, page(a.addr, ps, p))
            };
            if let Err(e) = res {
                r.fail(e);
                break;
            }
        }
    }
    for p in 0..RO_PAGES {
        if let Err(e) = check_page(
            "read-only region",
            p,
            page(st.ro, ps, p),
            key(seed, &[ID_RO, p as u64]),
        ) {
            r.fail(e);
            break;
        }
    }
    for p in 0..SHARED_PAGES {
        if let Err(e) = check_page(
            "shared region",
            p,
            page(st.shared, ps, p),
            key(seed, &[ID_SHARED, p as u64]),
        ) {
            r.fail(e);
            break;
        }
    }
    if let Some(alias) = st.alias {
        for p in 0..SHARED_PAGES {
            if let Err(e) = check_page(
                "shared alias",
                p,
                page(alias, ps, p),
                key(seed, &[ID_SHARED, p as u64]),
            ) {
                r.fail(e);
                break;
            }
        }
        // Write through the alias, read through the original, put the word back.
        let a = page_mut(alias, ps, 7);
        let old = a[3];
        a[3] = !old;
        let seen = black_box(page(st.shared, ps, 7)[3]);
        page_mut(alias, ps, 7)[3] = old;
        r.eq_hex("shared region word written through its alias", !old, seen);
    }
    let mut bad_file_pages = Vec::new();
    for i in 0..FILE_MAP_PAGES {
        let pg = page(st.file, ps, i);
        let file_k = key(seed, &[ID_FILE, (FILE_MAP_OFFSET_PAGES + i) as u64]);
        let what = "file mapping";
        let res = match file_page_kind(i) {
            FilePage::Modified => check_page(
                "file mapping (modified)",
                i,
                pg,
                key(seed, &[ID_FILE_MOD, i as u64]),
            ),
            FilePage::Partial => {
                let mut want: Vec<u64> = (0..ps / 8).map(|j| pattern::word(file_k, j)).collect();
                for j in PART_WORDS {
                    want[j] = pattern::word(key(seed, &[ID_FILE_PART]), j);
                }
                match pg.iter().zip(&want).position(|(g, e)| g != e) {
                    None => Ok(()),
                    Some(j) => Err(format!(
                        "file mapping (partly modified) page {i} word {j}: expected {:#018x}, got {:#018x}",
                        want[j], pg[j]
                    )),
                }
            }
            FilePage::Read => check_page("file mapping (read only)", i, pg, file_k),
            FilePage::Untouched => check_page(&format!("{what} (never touched)"), i, pg, file_k),
        };
        if let Err(e) = res {
            bad_file_pages.push(e);
        }
    }
    // At most three messages, so later checks still show up in the FAIL line.
    for e in bad_file_pages.iter().take(3) {
        r.fail(e.clone());
    }
    if bad_file_pages.len() > 3 {
        r.fail(format!(
            "{} more file mapping pages differ",
            bad_file_pages.len() - 3
        ));
    }
    match std::fs::read(&st.file_path) {
        Err(e) => r.fail(format!("read {:?}: {e}", st.file_path)),
        Ok(data) if data.len() != FILE_PAGES * ps => r.fail(format!(
            "{:?}: expected {} bytes, got {}",
            st.file_path,
            FILE_PAGES * ps,
            data.len()
        )),
        Ok(data) => {
            for k in 0..FILE_PAGES {
                let want = file_page_content(seed, ps, k);
                let got: Vec<u64> = data[k * ps..(k + 1) * ps]
                    .chunks_exact(8)
                    .map(|c| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect();
                if got != want {
                    r.fail(format!(
                        "file {:?} page {k} changed on disk (private mapping written through?)",
                        st.file_path
                    ));
                    break;
                }
            }
        }
    }
    if let Some((i, e, g)) = pattern::first_mismatch(&st.heap, key(seed, &[ID_HEAP])) {
        r.fail(format!(
            "heap Vec word {i}: expected {e:#018x}, got {g:#018x}"
        ));
    }
    for (i, b) in st.small.iter().enumerate() {
        let k = key(seed, &[ID_SMALL, i as u64]);
        let len = 16 + (pattern::splitmix64(i as u64) % 497) as usize;
        if b.len() != len {
            r.fail(format!(
                "small object {i}: expected length {len}, got {}",
                b.len()
            ));
            break;
        }
        if let Some(j) = b
            .iter()
            .enumerate()
            .position(|(j, &x)| x != pattern::byte(k, j))
        {
            r.fail(format!(
                "small object {i} byte {j}: expected {:#04x}, got {:#04x}",
                pattern::byte(k, j),
                b[j]
            ));
            break;
        }
    }
    check_brk(st, r);
    r.info(format!(
        "{} anonymous regions, {touched} pattern pages, {} guard pages checked",
        st.anon.len(),
        st.guards.len()
    ));
}

/// `start_brk` from `/proc/self/stat` (field 47).
fn start_brk() -> Result<usize, String> {
    let s = std::fs::read_to_string("/proc/self/stat")
        .map_err(|e| format!("read /proc/self/stat: {e}"))?;
    // Fields after the parenthesised comm start at field 3.
    let rest = s
        .rsplit_once(')')
        .map(|x| x.1)
        .ok_or("unparsable /proc/self/stat")?;
    rest.split_whitespace()
        .nth(47 - 3)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no start_brk in /proc/self/stat: {s:?}"))
}

/// The kernel's program break must match the one glibc cached (in restored memory), the
/// `[heap]` VMA must end there, and `start_brk` must be unchanged: breaks if the restorer
/// did not set the mm's brk fields (`PR_SET_MM`), after which heap growth goes wrong.
fn check_brk(st: &State, r: &mut Report) {
    // SAFETY: brk(0) only queries the current program break.
    let brk = unsafe { libc::syscall(libc::SYS_brk, 0usize) } as usize;
    // SAFETY: sbrk(0) returns glibc's cached break without changing anything.
    let cached = unsafe { libc::sbrk(0) } as usize;
    r.eq_hex(
        "program break: kernel brk(0) vs glibc's cached sbrk(0)",
        cached,
        brk,
    );
    if let Some(sb) = r.ok(start_brk()) {
        r.eq_hex("start_brk (/proc/self/stat)", st.start_brk, sb);
    }
    if let Some(m) = r.ok(maps::read_maps()) {
        if let Some(h) = maps::named(&m, "[heap]") {
            r.eq_hex("[heap] end vs brk", brk.next_multiple_of(st.ps), h.end);
        }
    }
}

fn check_maps(st: &State, m: &[MapEntry], r: &mut Report) {
    let ps = st.ps;
    for (i, a) in st.anon.iter().enumerate() {
        if let Err(e) = maps::check_exact(
            m,
            &format!("anon region {i}"),
            a.addr,
            a.addr + a.pages * ps,
            "rw-p",
        ) {
            r.fail(e);
        }
    }
    let checks = [
        ("read-only region", st.ro, RO_PAGES, "r--p"),
        ("shared region", st.shared, SHARED_PAGES, "rw-s"),
        ("file mapping", st.file, FILE_MAP_PAGES, "rw-p"),
    ];
    for (what, addr, n, perms) in checks {
        if let Err(e) = maps::check_exact(m, what, addr, addr + n * ps, perms) {
            r.fail(e);
        }
    }
    if let Some(alias) = st.alias {
        if let Err(e) =
            maps::check_exact(m, "shared alias", alias, alias + SHARED_PAGES * ps, "rw-s")
        {
            r.fail(e);
        }
    }
    if let Some(f) = maps::containing(m, st.file) {
        r.eq(
            "file mapping path",
            st.file_path.to_string_lossy().as_ref(),
            f.path.as_str(),
        );
        r.eq_hex(
            "file mapping offset",
            (FILE_MAP_OFFSET_PAGES * ps) as u64,
            f.offset,
        );
    }
    for (i, &g) in st.guards.iter().enumerate() {
        match maps::containing(m, g) {
            None => r.fail(format!(
                "guard page {i} at {g:#x}: not mapped, expected ---p"
            )),
            Some(e) if e.perms != "---p" => r.fail(format!(
                "guard page {i} at {g:#x}: expected ---p, got {} ({:#x}-{:#x})",
                e.perms, e.start, e.end
            )),
            Some(_) => {}
        }
    }
}

/// Allocates fresh heap memory (small and large) and checks it: the allocator still works.
fn check_fresh_heap(seed: u64, round: u64, r: &mut Report) {
    let k = key(seed, &[ID_FRESH, round]);
    let boxes: Vec<Box<[u8; 200]>> = (0..2000)
        .map(|i| Box::new([pattern::byte(k, i); 200]))
        .collect();
    let mut big = vec![0u64; 1 << 18];
    pattern::fill(&mut big, k);
    for (i, b) in boxes.iter().enumerate() {
        if b.iter().any(|&x| x != pattern::byte(k, i)) {
            r.fail(format!(
                "freshly allocated small object {i} lost its content"
            ));
            break;
        }
    }
    if pattern::first_mismatch(black_box(&big), k).is_some() {
        r.fail("freshly allocated 2 MiB Vec lost its content");
    }
}

struct Frame<'a> {
    data: [u64; 32],
    depth: usize,
    parent: Option<&'a Frame<'a>>,
}

#[inline(never)]
fn descend(depth: usize, parent: Option<&Frame<'_>>, st: &State, ctx: &mut Ctx) -> ! {
    let mut f = Frame {
        data: [0; 32],
        depth,
        parent,
    };
    pattern::fill(&mut f.data, key(st.seed, &[ID_STACK, depth as u64]));
    let f = black_box(f);
    if depth == 0 {
        bottom(&f, st, ctx)
    } else {
        descend(depth - 1, Some(&f), st, ctx)
    }
}

#[inline(never)]
fn bottom(frames: &Frame<'_>, st: &State, ctx: &mut Ctx) -> ! {
    let mut big = [0u64; BIG_WORDS];
    pattern::fill(&mut big, key(st.seed, &[ID_BIG]));
    black_box(&mut big);
    let big_addr = big.as_ptr() as usize;
    ctx.ready();
    let mut round = 0u64;
    ctx.serve_blocking(|r| {
        round += 1;
        let mut n = 0;
        let mut f = Some(frames);
        while let Some(fr) = f {
            if let Some((i, e, g)) =
                pattern::first_mismatch(&fr.data, key(st.seed, &[ID_STACK, fr.depth as u64]))
            {
                r.fail(format!(
                    "stack frame at depth {} word {i}: expected {e:#018x}, got {g:#018x}",
                    fr.depth
                ));
            }
            n += 1;
            f = fr.parent;
        }
        r.eq("stack frames in the chain", DEPTH + 1, n);
        if let Some((i, e, g)) = pattern::first_mismatch(black_box(&big), key(st.seed, &[ID_BIG])) {
            r.fail(format!(
                "512 KiB stack array word {i}: expected {e:#018x}, got {g:#018x}"
            ));
        }
        check_memory(st, r);
        if let Some(m) = r.ok(maps::read_maps()) {
            check_maps(st, &m, r);
            match maps::containing(&m, big_addr) {
                Some(e) if e.path == "[stack]" => {}
                other => r.fail(format!(
                    "stack array at {big_addr:#x} is not in [stack]: {:?}",
                    other.map(|e| (e.start, e.end, e.path.clone()))
                )),
            }
        }
        check_fresh_heap(st.seed, round, r);
    })
}

fn main() {
    let mut ctx = Ctx::start(
        "wl-memory",
        &Spec {
            flags: &["--alias"],
            values: &["--mib"],
        },
    );
    let st = setup(&mut ctx);
    let st = ctx.setup(st);
    descend(DEPTH, None, &st, &mut ctx)
}

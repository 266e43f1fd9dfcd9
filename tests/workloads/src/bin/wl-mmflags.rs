//! `wl-mmflags`: memory state beyond contents: the flags and kinds of mappings.
//!
//! Each region sits in its own slot of one reservation (slots separated by `PROT_NONE`
//! gaps, so nothing merges). Set up, then checked after restore:
//! - `mlock`ed region, a `MAP_LOCKED` one and an `mlock2(MLOCK_ONFAULT)` one: VmFlags `lo`
//!   (and `lf`), and `VmLck` in /proc/self/status covers them;
//! - `MADV_WIPEONFORK` (`wf`): a forked child reads zeros where the parent keeps its data;
//!   `MADV_DONTFORK` (`dc`): the region is not mapped in a forked child; `MADV_DONTDUMP`
//!   (`dd`), `MADV_HUGEPAGE` (`hg`), `MADV_NOHUGEPAGE` (`nh`), `MADV_SEQUENTIAL` (`sr`),
//!   `MADV_RANDOM` (`rr`), `MADV_MERGEABLE` (`mg`, when KSM is built in), `MAP_NORESERVE`
//!   (`nr`), `MAP_DROPPABLE` (`dp`, kernel 6.11+; a forked child reads zeros);
//!   every region's set of these flags must be exactly what it was (none gained or lost);
//! - an `mseal`ed region (`sl`, kernel 6.10+);
//! - `MADV_GUARD_INSTALL` guard pages (kernel 6.13+) in the middle of a filled region: the
//!   other pages keep their data, pagemap still reports the guards (bit 58, 6.15+), and a
//!   forked child touching one dies of SIGSEGV;
//! - a `MAP_PRIVATE` mapping of a memfd (whose fd stays open): pages the process wrote keep
//!   its private data, pages it only read or never touched follow the memfd, which is
//!   written through its fd during the check (and written back afterwards);
//! - a file opened `O_RDWR`, mapped `MAP_SHARED` read-only and read-write (its fd closed):
//!   `mprotect(PROT_WRITE)` of the read-only view succeeds and writes reach the other view;
//!   a file opened `O_RDONLY` mapped `MAP_SHARED` read-only: `mprotect(PROT_WRITE)` still
//!   fails with EACCES;
//! - `PR_SET_THP_DISABLE`: `PR_GET_THP_DISABLE` still answers 1.

use stasis_workloads::pattern::{self, key};
use stasis_workloads::{sys, Ctx, Report, Spec};
use std::os::fd::AsRawFd;

/// The VmFlags codes compared exactly per region.
const WATCHED: [&str; 13] = [
    "lo", "lf", "wf", "dc", "dd", "hg", "nh", "sr", "rr", "mg", "nr", "dp", "sl",
];
const SLOT_PAGES: usize = 16;
const REGION_PAGES: usize = 8;
const MADV_GUARD_INSTALL: i32 = 102;
const MAP_DROPPABLE: i32 = 0x08;
const MLOCK_ONFAULT: u64 = 1;
const SYS_MSEAL: libc::c_long = 462;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: i32 = 1 << 3;
const MEMBARRIER_REGISTER_PRIVATE_EXPEDITED: i32 = 1 << 4;
const GUARDS: std::ops::Range<usize> = 2..4;
/// memfd pages the process writes privately; the others it reads (2, 3) or never touches.
const MEMFD_WRITTEN: [usize; 2] = [0, 1];
const MEMFD_PAGES: usize = 8;

struct Region {
    what: &'static str,
    /// Its slot, which keys its data pattern.
    slot: u64,
    addr: usize,
    flags: Vec<&'static str>,
    /// Its data is checked (not for droppable memory, which the kernel may drop).
    filled: bool,
}

struct State {
    ps: usize,
    seed: u64,
    regions: Vec<Region>,
    wipe: Vec<usize>,
    dontfork: usize,
    guard: Option<usize>,
    memfd: std::fs::File,
    memfd_map: usize,
    /// (shared, private) mappings of a memfd no fd holds.
    memfd2: (usize, usize),
    rw_views: (usize, usize),
    ro_view: usize,
    /// A shared read-only mapping of a deleted file opened read-only.
    deleted_view: usize,
    files: Vec<std::path::PathBuf>,
    infos: Vec<&'static str>,
}

fn errno_of(r: i64, what: &str) -> Result<i64, String> {
    if r < 0 {
        Err(sys::os_err(what))
    } else {
        Ok(r)
    }
}

fn mmap_at(addr: usize, len: usize, prot: i32, flags: i32, fd: i32) -> Result<usize, String> {
    // SAFETY: MAP_FIXED only replaces pages of this program's own PROT_NONE reservation.
    let p = unsafe { libc::mmap(addr as _, len, prot, flags | libc::MAP_FIXED, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(sys::os_err(&format!("mmap at {addr:#x} flags {flags:#x}")));
    }
    Ok(p as usize)
}

fn words<'a>(addr: usize, ps: usize, page: usize) -> &'a mut [u64] {
    // SAFETY: callers pass pages of readable (and, when written, writable) mappings this
    // program made and keeps; no other reference to the page is live.
    unsafe { std::slice::from_raw_parts_mut((addr + page * ps) as *mut u64, ps / 8) }
}

fn madvise(addr: usize, len: usize, advice: i32, what: &str) -> Result<(), String> {
    // SAFETY: the range is a mapping of this program's own.
    let r = unsafe { libc::madvise(addr as _, len, advice) };
    errno_of(r as i64, what).map(|_| ())
}

fn fill(r: &Region, ps: usize, seed: u64) {
    for p in 0..REGION_PAGES {
        pattern::fill(words(r.addr, ps, p), key(seed, &[r.slot + 1, p as u64]));
    }
}

fn tmp_file(
    ctx: &mut Ctx,
    name: &str,
    pages: usize,
    ps: usize,
) -> Result<std::path::PathBuf, String> {
    let path = sys::tmp_dir().join(format!("wl-mmflags-{}-{name}", std::process::id()));
    let mut data = vec![0u64; pages * ps / 8];
    pattern::fill(&mut data, key(ctx.seed, &[77, name.len() as u64]));
    let bytes: Vec<u8> = data.iter().flat_map(|w| w.to_ne_bytes()).collect();
    std::fs::write(&path, bytes).map_err(|e| format!("write {}: {e}", path.display()))?;
    ctx.remove_at_exit(path.clone());
    Ok(path)
}

fn map_file(
    path: &std::path::Path,
    write: bool,
    views: &[(usize, i32)],
    ps: usize,
) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    for &(addr, prot) in views {
        mmap_at(addr, 2 * ps, prot, libc::MAP_SHARED, f.as_raw_fd())?;
    }
    Ok(()) // the fd is closed: only the mappings hold the file
}

fn setup(ctx: &mut Ctx) -> Result<State, String> {
    let ps = sys::page_size();
    let seed = ctx.seed;
    let slots = 24;
    // SAFETY: a fresh PROT_NONE reservation at a kernel-chosen address.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            slots * SLOT_PAGES * ps,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(sys::os_err("mmap reservation"));
    }
    let slot = |i: usize| base as usize + i * SLOT_PAGES * ps;
    let len = REGION_PAGES * ps;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    let mut regions = Vec::new();
    let mut infos: Vec<&'static str> = Vec::new();
    let mut add = |what, i: usize, extra: i32, flags: Vec<&'static str>| -> Result<usize, String> {
        let a = mmap_at(slot(i), len, rw, anon | extra, -1)?;
        regions.push(Region {
            what,
            slot: i as u64,
            addr: a,
            flags,
            filled: true,
        });
        Ok(a)
    };
    add("plain", 0, 0, vec![])?;
    let locked = add("mlock", 1, 0, vec!["lo"])?;
    add("MAP_LOCKED", 2, libc::MAP_LOCKED, vec!["lo"])?;
    let onfault = add("mlock2(ONFAULT)", 3, 0, vec!["lo", "lf"])?;
    let wipe = add("wipeonfork", 4, 0, vec!["wf"])?;
    let dontfork = add("dontfork", 5, 0, vec!["dc"])?;
    let dontdump = add("dontdump", 6, 0, vec!["dd"])?;
    let huge = add("hugepage", 7, 0, vec!["hg"])?;
    let nohuge = add("nohugepage", 8, 0, vec!["nh"])?;
    let seq = add("sequential", 9, 0, vec!["sr"])?;
    let rand = add("random", 10, 0, vec!["rr"])?;
    add("noreserve", 11, libc::MAP_NORESERVE, vec!["nr"])?;
    let merge = add("mergeable", 12, 0, vec!["mg"])?;
    let guard = add("guarded", 13, 0, vec![])?;
    let sealed = add("sealed", 21, 0, vec!["sl"])?;
    for r in &regions {
        fill(r, ps, seed);
    }
    // SAFETY: mlock/mlock2 on this program's own mappings.
    errno_of(unsafe { libc::mlock(locked as _, len) } as i64, "mlock")?;
    // SAFETY: as above.
    let r = unsafe { libc::syscall(libc::SYS_mlock2, onfault, len, MLOCK_ONFAULT) };
    errno_of(r, "mlock2(MLOCK_ONFAULT)")?;
    madvise(wipe, len, libc::MADV_WIPEONFORK, "MADV_WIPEONFORK")?;
    madvise(dontfork, len, libc::MADV_DONTFORK, "MADV_DONTFORK")?;
    madvise(dontdump, len, libc::MADV_DONTDUMP, "MADV_DONTDUMP")?;
    madvise(huge, len, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE")?;
    madvise(nohuge, len, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")?;
    madvise(seq, len, libc::MADV_SEQUENTIAL, "MADV_SEQUENTIAL")?;
    madvise(rand, len, libc::MADV_RANDOM, "MADV_RANDOM")?;
    if madvise(merge, len, libc::MADV_MERGEABLE, "MADV_MERGEABLE").is_err() {
        infos.push("MADV_MERGEABLE unsupported (no KSM): not checked");
        regions.retain(|r| r.addr != merge);
    }
    // SAFETY: mseal of our own mapping, which stays as it is from now on.
    if unsafe { libc::syscall(SYS_MSEAL, sealed, len, 0) } != 0 {
        infos.push("mseal unsupported (kernel < 6.10): not checked");
        regions.retain(|r| r.addr != sealed);
    }
    let mut wipes = vec![wipe];
    // SAFETY: MAP_FIXED into our own reservation.
    let dp = unsafe {
        libc::mmap(
            slot(14) as _,
            len,
            rw,
            MAP_DROPPABLE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if dp != libc::MAP_FAILED {
        regions.push(Region {
            what: "droppable",
            slot: 14,
            addr: dp as usize,
            flags: vec!["wf", "dd", "nr", "dp"],
            filled: false,
        });
        words(dp as usize, ps, 0)[0] = 1;
        wipes.push(dp as usize);
    } else {
        infos.push("MAP_DROPPABLE unsupported (kernel < 6.11): not checked");
    }
    let guard = if ctx.args.flag("--no-guards") {
        infos.push("--no-guards: no guard pages");
        None
    } else if madvise(
        guard + GUARDS.start * ps,
        GUARDS.len() * ps,
        MADV_GUARD_INSTALL,
        "MADV_GUARD_INSTALL",
    )
    .is_ok()
    {
        Some(guard)
    } else {
        infos.push("MADV_GUARD_INSTALL unsupported (kernel < 6.13): not checked");
        None
    };
    // The memfd, mapped privately.
    let name = std::ffi::CString::new("wl-mmflags").map_err(|e| e.to_string())?;
    // SAFETY: name is a valid C string.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    let fd = errno_of(fd as i64, "memfd_create")? as i32;
    // SAFETY: fd was just created and is owned by this File from now on.
    let memfd: std::fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    write_memfd(&memfd, ps, seed, 0)?;
    let memfd_map = mmap_at(slot(15), MEMFD_PAGES * ps, rw, libc::MAP_PRIVATE, fd)?;
    for p in MEMFD_WRITTEN {
        pattern::fill(words(memfd_map, ps, p), key(seed, &[40, p as u64]));
    }
    let _ = std::hint::black_box(words(memfd_map, ps, 2)[0] + words(memfd_map, ps, 3)[5]);
    // A second memfd held only by its mappings: one shared, one private.
    // SAFETY: name is a valid C string.
    let fd2 = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    let fd2 = errno_of(fd2 as i64, "memfd_create")? as i32;
    // SAFETY: fd2 was just created; the File closes it at the end of set-up.
    let memfd2: std::fs::File = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd2) };
    write_memfd(&memfd2, ps, seed, 0)?;
    let shared2 = mmap_at(slot(19), MEMFD_PAGES * ps, rw, libc::MAP_SHARED, fd2)?;
    let private2 = mmap_at(slot(20), MEMFD_PAGES * ps, rw, libc::MAP_PRIVATE, fd2)?;
    drop(memfd2);
    for p in MEMFD_WRITTEN {
        pattern::fill(words(private2, ps, p), key(seed, &[40, p as u64]));
    }
    // Shared file views.
    let rw_path = tmp_file(ctx, "rw", 2, ps)?;
    map_file(
        &rw_path,
        true,
        &[(slot(16), libc::PROT_READ), (slot(17), rw)],
        ps,
    )?;
    let ro_path = tmp_file(ctx, "readonly", 2, ps)?;
    map_file(&ro_path, false, &[(slot(18), libc::PROT_READ)], ps)?;
    // A deleted file, opened read-only, mapped shared: only the mapping holds it.
    let gone = tmp_file(ctx, "deleted", 2, ps)?;
    map_file(&gone, false, &[(slot(22), libc::PROT_READ)], ps)?;
    std::fs::remove_file(&gone).map_err(|e| format!("unlink {}: {e}", gone.display()))?;
    // SAFETY: prctl without pointers.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    errno_of(r as i64, "prctl(PR_SET_THP_DISABLE)")?;
    // SAFETY: membarrier without pointers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            MEMBARRIER_REGISTER_PRIVATE_EXPEDITED,
            0,
            0,
        )
    };
    errno_of(r, "membarrier(REGISTER_PRIVATE_EXPEDITED)")?;
    // Last: every mapping made from now on comes locked (on fault).
    // SAFETY: mlockall without pointers.
    let r = unsafe { libc::mlockall(libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    errno_of(r as i64, "mlockall(MCL_FUTURE | MCL_ONFAULT)")?;
    Ok(State {
        ps,
        seed,
        regions,
        wipe: wipes,
        dontfork,
        guard,
        memfd,
        memfd_map,
        rw_views: (slot(16), slot(17)),
        ro_view: slot(18),
        deleted_view: slot(22),
        memfd2: (shared2, private2),
        files: vec![rw_path, ro_path],
        infos,
    })
}

/// Writes generation `gen`'s pattern into every page of the memfd through its fd.
fn write_memfd(f: &std::fs::File, ps: usize, seed: u64, gen: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    for p in 0..MEMFD_PAGES {
        let mut w = vec![0u64; ps / 8];
        pattern::fill(&mut w, key(seed, &[41, gen, p as u64]));
        let b: Vec<u8> = w.iter().flat_map(|x| x.to_ne_bytes()).collect();
        f.write_all_at(&b, (p * ps) as u64)
            .map_err(|e| format!("pwrite memfd page {p}: {e}"))?;
    }
    Ok(())
}

/// (start, VmFlags) of every mapping in /proc/self/smaps.
fn smaps_flags() -> Result<Vec<(usize, usize, Vec<String>)>, String> {
    let text =
        std::fs::read_to_string("/proc/self/smaps").map_err(|e| format!("read smaps: {e}"))?;
    let mut out = Vec::new();
    let mut cur = None;
    for line in text.lines() {
        if let Some(f) = line.strip_prefix("VmFlags:") {
            if let Some((s, e)) = cur.take() {
                out.push((s, e, f.split_whitespace().map(str::to_string).collect()));
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((s, e)) = range.split_once('-') {
                if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16))
                {
                    cur = Some((s, e));
                }
            }
        }
    }
    Ok(out)
}

/// Runs `f` in a forked child; returns its raw wait status.
fn in_child(f: impl FnOnce() -> i32) -> Result<i32, String> {
    let pid = sys::fork_run(f)?;
    let mut st = 0;
    // SAFETY: st is a valid c_int.
    if unsafe { libc::waitpid(pid, &mut st, 0) } != pid {
        return Err(sys::os_err("waitpid"));
    }
    Ok(st)
}

fn check(s: &State, r: &mut Report) {
    let ps = s.ps;
    for i in &s.infos {
        r.info(*i);
    }
    let Some(smaps) = r.ok(smaps_flags()) else {
        return;
    };
    let len = REGION_PAGES * ps;
    for reg in &s.regions {
        let Some((st, en, flags)) = smaps.iter().find(|m| m.0 <= reg.addr && reg.addr < m.1) else {
            r.fail(format!("{} region {:#x} is not mapped", reg.what, reg.addr));
            continue;
        };
        r.eq(
            &format!("{} region bounds", reg.what),
            (reg.addr, reg.addr + len),
            (*st, *en),
        );
        let got: Vec<&str> = WATCHED
            .iter()
            .copied()
            .filter(|w| flags.iter().any(|f| f == w))
            .collect();
        let mut want = reg.flags.clone();
        want.sort_by_key(|w| WATCHED.iter().position(|x| x == w));
        r.eq(
            &format!("{} region VmFlags (of {WATCHED:?})", reg.what),
            want,
            got,
        );
        if reg.filled {
            for p in 0..REGION_PAGES {
                if s.guard == Some(reg.addr) && GUARDS.contains(&p) {
                    continue;
                }
                if let Some((w, e, g)) = pattern::first_mismatch(
                    words(reg.addr, ps, p),
                    key(s.seed, &[reg.slot + 1, p as u64]),
                ) {
                    r.fail(format!(
                        "{} page {p} word {w}: expected {e:#x}, got {g:#x}",
                        reg.what
                    ));
                }
            }
        }
    }
    if let Some(lck) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("VmLck:").and_then(|v| {
                    v.trim()
                        .trim_end_matches(" kB")
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
            })
        })
    {
        // Two whole locked regions and the touched pages of the on-fault one.
        r.ensure(lck >= 2 * len / 1024, || {
            format!("VmLck is {lck} kB, below the {} kB locked", 2 * len / 1024)
        });
    } else {
        r.fail("no VmLck in /proc/self/status");
    }
    check_fork(s, r);
    check_memfd(s, r);
    check_files(s, r);
    // SAFETY: prctl without pointers.
    let thp = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
    r.eq("PR_GET_THP_DISABLE", 1, thp);
    // SAFETY: membarrier without pointers; it fails with EPERM unless registered.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0) };
    r.eq(
        "membarrier(PRIVATE_EXPEDITED) after REGISTER_PRIVATE_EXPEDITED (errno)",
        0,
        if rc == 0 { 0 } else { sys::errno() },
    );
    check_lock_future(ps, r);
}

/// After mlockall(MCL_FUTURE | MCL_ONFAULT) a new mapping comes locked on fault.
fn check_lock_future(ps: usize, r: &mut Report) {
    // SAFETY: a fresh mapping at a kernel-chosen address, unmapped again below.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            ps,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if at == libc::MAP_FAILED {
        r.fail(sys::os_err("mmap of a fresh page"));
        return;
    }
    let a = at as usize;
    if let Some(maps) = r.ok(smaps_flags()) {
        let flags: Vec<&str> = maps
            .iter()
            .find(|m| m.0 <= a && a < m.1)
            .map(|m| {
                m.2.iter()
                    .map(String::as_str)
                    .filter(|f| ["lo", "lf"].contains(f))
                    .collect()
            })
            .unwrap_or_default();
        r.eq(
            "VmFlags of a page mapped after mlockall(MCL_FUTURE | MCL_ONFAULT)",
            vec!["lo", "lf"],
            flags,
        );
    }
    // SAFETY: unmaps only the page mapped above.
    unsafe { libc::munmap(at, ps) };
}

fn check_fork(s: &State, r: &mut Report) {
    let ps = s.ps;
    for &w in &s.wipe {
        let st = in_child(|| i32::from(words(w, ps, 0).iter().any(|&x| x != 0)));
        if let Some(st) = r.ok(st) {
            r.eq(
                &format!("child's view of wipe-on-fork memory at {w:#x} is zero (exit status)"),
                0,
                st,
            );
        }
    }
    let d = s.dontfork;
    let st = in_child(|| {
        let mut v = [0u8; 1];
        // SAFETY: mincore on an address range; ENOMEM if it is not mapped.
        let rc = unsafe { libc::mincore(d as _, ps, v.as_mut_ptr()) };
        i32::from(!(rc == -1 && sys::errno() == libc::ENOMEM))
    });
    if let Some(st) = r.ok(st) {
        r.eq("dont-fork region absent in a child (exit status)", 0, st);
    }
    let Some(g) = s.guard else { return };
    if let Some(pm) = r.ok(std::fs::File::open("/proc/self/pagemap").map_err(|e| e.to_string())) {
        use std::os::unix::fs::FileExt;
        for p in GUARDS {
            let mut b = [0u8; 8];
            let at = ((g / ps + p) * 8) as u64;
            if pm.read_exact_at(&mut b, at).is_ok() {
                r.ensure(u64::from_ne_bytes(b) & (1 << 58) != 0, || {
                    format!("guard page {p}: pagemap bit 58 (guard region) is clear")
                });
            }
        }
    }
    let st = in_child(|| {
        // SAFETY: a read of a guard page: the child is meant to die of SIGSEGV here.
        let v = unsafe { std::ptr::read_volatile((g + GUARDS.start * ps) as *const u64) };
        i32::from(std::hint::black_box(v) == 0) + 10
    });
    if let Some(st) = r.ok(st) {
        r.ensure(
            libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGSEGV,
            || format!("a child touching a guard page did not die of SIGSEGV (status {st:#x})"),
        );
    }
}

/// Checks a private mapping of a memfd whose contents are generation `gen`: the pages the
/// process wrote hold its own data, the others the memfd's.
fn check_private_view(s: &State, r: &mut Report, what: &str, map: usize, gen: u64) {
    for p in 0..MEMFD_PAGES {
        let k = if MEMFD_WRITTEN.contains(&p) {
            key(s.seed, &[40, p as u64])
        } else {
            key(s.seed, &[41, gen, p as u64])
        };
        if let Some((w, e, g)) = pattern::first_mismatch(words(map, s.ps, p), k) {
            r.fail(format!(
                "{what}, page {p}, memfd generation {gen}: word {w}: expected {e:#x}, got {g:#x}"
            ));
        }
    }
}

fn check_memfd(s: &State, r: &mut Report) {
    let what = "private mapping of a memfd written through its fd";
    check_private_view(s, r, what, s.memfd_map, 0);
    if r.ok(write_memfd(&s.memfd, s.ps, s.seed, 1)).is_some() {
        check_private_view(s, r, what, s.memfd_map, 1);
    }
    let _ = r.ok(write_memfd(&s.memfd, s.ps, s.seed, 0));
    let (sh, pr) = s.memfd2;
    let what = "private mapping of a memfd (held by mappings only) written through a shared one";
    for gen in [0u64, 1, 0] {
        for p in 0..MEMFD_PAGES {
            pattern::fill(words(sh, s.ps, p), key(s.seed, &[41, gen, p as u64]));
        }
        check_private_view(s, r, what, pr, gen);
    }
}

fn mprotect(addr: usize, len: usize, prot: i32) -> i32 {
    // SAFETY: mprotect of a mapping this program made.
    if unsafe { libc::mprotect(addr as _, len, prot) } == 0 {
        0
    } else {
        sys::errno()
    }
}

fn check_files(s: &State, r: &mut Report) {
    let ps = s.ps;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    let (ro_view, rw_view) = s.rw_views;
    let e = mprotect(ro_view, 2 * ps, rw);
    r.eq(
        "mprotect(PROT_WRITE) of the read-only view of a file opened O_RDWR (errno)",
        0,
        e,
    );
    if e == 0 {
        let v = words(ro_view, ps, 1);
        v[3] = !v[3];
        r.eq_hex(
            "a write through the re-protected view seen in the other view",
            v[3],
            words(rw_view, ps, 1)[3],
        );
        v[3] = !v[3];
        r.eq(
            "mprotect back to PROT_READ",
            0,
            mprotect(ro_view, 2 * ps, libc::PROT_READ),
        );
    }
    for (what, view) in [("a file", s.ro_view), ("a deleted file", s.deleted_view)] {
        let e = mprotect(view, 2 * ps, rw);
        r.eq(
            &format!("mprotect(PROT_WRITE) of {what} opened O_RDONLY (errno)"),
            libc::EACCES,
            e,
        );
        if e == 0 {
            mprotect(view, 2 * ps, libc::PROT_READ);
        }
    }
    for f in &s.files {
        r.ensure(f.exists(), || format!("{} is gone", f.display()));
    }
}

fn main() {
    let spec = Spec {
        flags: &["--no-guards"],
        ..Spec::default()
    };
    let mut ctx = Ctx::start("wl-mmflags", &spec);
    let r = setup(&mut ctx);
    let state = ctx.setup(r);
    ctx.ready();
    ctx.serve_blocking(|r| check(&state, r));
}

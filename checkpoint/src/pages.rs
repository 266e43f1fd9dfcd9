//! Streaming a stopped process's memory into the image.
//!
//! [`plan`] walks pagemap to find the pages worth saving (never-touched pages are skipped;
//! of a private file mapping only the pages the process modified; shared anonymous memory
//! through /proc/PID/map_files, once per object). [`dump`] reads them in large batches with
//! process_vm_readv (or /proc/PID/mem for mappings without read permission), drops zero
//! pages, hashes and compresses each batch on the reading thread, and hands it to one writer
//! thread that only writes, so reading, encoding and writing overlap.

use crate::error::CheckpointError;
use crate::Progress;
use stasis_image::proto::{self, RunKind, SpaceKind, VmaKind};
use stasis_image::{ChunkEncoder, Compression, EncodedChunk, ImageWriter, WriteStats};
use stasis_runtime::memory::{
    self, Pagemap, ProcMem, PM_FILE_OR_SHARED, PM_GUARD, PM_PRESENT, PM_SWAPPED,
};
use stasis_runtime::PAGE_SIZE;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex};

/// Pages per raw chunk (4 MiB): raw chunks are mapped on restore, and each costs a pad to
/// align it, so they are large.
pub const CHUNK_PAGES: u64 = 1024;

/// Pages per zstd chunk (1 MiB): each reader holds a chunk and its compressed copy, so the
/// chunk size sets the peak RSS (1 GiB on 2 cores: 22 MiB, against 57 MiB with 4 MiB chunks,
/// near the 64 MiB limit and growing with the core count). Checkpoint and restore times were
/// within the run-to-run noise of 4 MiB chunks (medians of 3 x 3 runs).
pub const ZSTD_CHUNK_PAGES: u64 = 256;

/// Pages per chunk for images written with `compression`.
fn chunk_pages(compression: Compression) -> u64 {
    match compression {
        Compression::None => CHUNK_PAGES,
        Compression::Zstd(_) => ZSTD_CHUNK_PAGES,
    }
}

/// How a segment's bytes are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadVia {
    /// process_vm_readv at the address.
    Readv,
    /// /proc/PID/mem (mappings without PROT_READ).
    ProcMem,
    /// pread of the shared memory object (index into `DumpPlan::objects`).
    Object(usize),
    /// A VM's guest memory (addresses are guest-physical), from [`DumpPlan::guest`].
    Guest,
}

/// Where a VM's guest memory is read from.
pub enum GuestSource {
    /// Straight out of the (paused) VMM process, where guest address 0 is mapped at `host`.
    Vmm { pid: i32, host: u64 },
    /// A copy taken while the guest ran (guest address = offset).
    Staged(Vec<u8>),
}

/// Consecutive pages to save.
#[derive(Debug, Clone)]
struct Segment {
    space: SpaceKind,
    space_id: u64,
    /// Address within the space (virtual address, or offset in a shared object).
    addr: u64,
    pages: u64,
    via: ReadVia,
}

/// What to save.
pub struct DumpPlan {
    segments: Vec<Segment>,
    /// Process spaces whose image id differs from the PID they are read through (a tree in
    /// its own pid namespace): host PID → PID recorded in the image.
    process_ids: BTreeMap<u64, u64>,
    objects: Vec<(String, File)>,
    /// The VM and the source of `ReadVia::Guest` segments.
    guest: Option<(String, GuestSource)>,
    pub pages_total: u64,
    pub pages_skipped: u64,
}

/// Finds the pages to save of every process, each shared memory object and ghost file once.
pub fn plan(
    procs: &[proto::Process],
    ghosts: &crate::ghosts::Ghosts,
) -> Result<DumpPlan, CheckpointError> {
    let mut segments = Vec::new();
    let mut skipped = 0;
    // shmem_id → (a process mapping it, its mappings of it).
    let mut shared: BTreeMap<u64, (i32, Vec<&proto::Vma>)> = BTreeMap::new();
    for process in procs.iter().filter(|p| !p.zombie) {
        let pid = process.pid as i32;
        skipped += plan_process(pid, process, &mut segments, &mut shared)?;
    }
    let mut objects = Vec::new();
    for (id, (pid, vmas)) in shared {
        let first = vmas[0];
        let path = format!("/proc/{pid}/map_files/{:x}-{:x}", first.start, first.end);
        let end = vmas
            .iter()
            .map(|v| v.pgoff + (v.end - v.start))
            .max()
            .unwrap_or(0);
        add_object(
            &mut segments,
            &mut objects,
            SpaceKind::SharedMemory,
            id,
            path,
            end,
        )?;
    }
    add_ghosts(ghosts, &mut segments, &mut objects)?;
    let pages_total = segments.iter().map(|s| s.pages).sum();
    Ok(DumpPlan {
        segments,
        process_ids: BTreeMap::new(),
        objects,
        guest: None,
        pages_total,
        pages_skipped: skipped,
    })
}

impl DumpPlan {
    /// Saves the `ranges` ((guest-physical address, pages), ascending) of a VM's memory as
    /// page space GUEST 0.
    pub fn guest(vm: &str, ranges: &[(u64, u64)], source: GuestSource) -> DumpPlan {
        let segments: Vec<Segment> = ranges
            .iter()
            .map(|&(addr, pages)| Segment {
                space: SpaceKind::Guest,
                space_id: 0,
                addr,
                pages,
                via: ReadVia::Guest,
            })
            .collect();
        DumpPlan {
            pages_total: segments.iter().map(|s| s.pages).sum(),
            segments,
            process_ids: BTreeMap::new(),
            objects: Vec::new(),
            guest: Some((vm.to_string(), source)),
            pages_skipped: 0,
        }
    }

    /// Records process spaces under other ids than the PIDs they are read through: host
    /// PID → image PID (identical pairs may be left out).
    pub fn set_process_ids(&mut self, ids: BTreeMap<u64, u64>) {
        self.process_ids = ids;
    }

    /// The id space `space_id` of kind `space` has in the image.
    fn image_space_id(&self, space: SpaceKind, space_id: u64) -> u64 {
        match space {
            SpaceKind::Process => self.process_ids.get(&space_id).copied().unwrap_or(space_id),
            _ => space_id,
        }
    }
}

/// Plans one process's private pages; notes its shared objects. Returns pages skipped.
fn plan_process<'a>(
    pid: i32,
    process: &'a proto::Process,
    segments: &mut Vec<Segment>,
    shared: &mut BTreeMap<u64, (i32, Vec<&'a proto::Vma>)>,
) -> Result<u64, CheckpointError> {
    let pagemap = Pagemap::open(pid)?;
    let mut skipped = 0;
    let mut entries = Vec::new();
    // Pages that went ahead in pre-copy rounds are not in the image.
    for vma in process.vmas.iter().filter(|v| !v.precopied) {
        let kind = vma.kind();
        let keep_file_pages = match kind {
            VmaKind::AnonPrivate => true,
            VmaKind::FilePrivate => false,
            VmaKind::AnonShared => {
                shared
                    .entry(vma.shmem_id)
                    .or_insert_with(|| (pid, Vec::new()))
                    .1
                    .push(vma);
                continue;
            }
            _ => continue,
        };
        let via = if vma.prot & libc::PROT_READ as u32 != 0 {
            ReadVia::Readv
        } else {
            ReadVia::ProcMem
        };
        pagemap.read(vma.start, vma.end, &mut entries)?;
        let mut run: Option<Segment> = None;
        for (i, e) in entries.iter().enumerate() {
            let addr = vma.start + i as u64 * PAGE_SIZE;
            // A guard page (reported as swapped) has no contents: vmas.guards has it.
            let wanted = e & PM_GUARD == 0
                && (e & PM_SWAPPED != 0
                    || (e & PM_PRESENT != 0 && (keep_file_pages || e & PM_FILE_OR_SHARED == 0)));
            if !wanted {
                skipped += 1;
                if let Some(r) = run.take() {
                    segments.push(r);
                }
                continue;
            }
            match &mut run {
                Some(r) if r.addr + r.pages * PAGE_SIZE == addr => r.pages += 1,
                _ => {
                    if let Some(r) = run.take() {
                        segments.push(r);
                    }
                    run = Some(Segment {
                        space: SpaceKind::Process,
                        space_id: pid as u64,
                        addr,
                        pages: 1,
                        via,
                    });
                }
            }
        }
        segments.extend(run);
    }
    Ok(skipped)
}

/// Contents of ghost files (deleted while open, memfds), page by page.
fn add_ghosts(
    ghosts: &crate::ghosts::Ghosts,
    segments: &mut Vec<Segment>,
    objects: &mut Vec<(String, File)>,
) -> Result<(), CheckpointError> {
    for (id, path) in &ghosts.sources {
        let size = ghosts
            .files
            .iter()
            .find(|g| g.id == *id)
            .map(|g| g.size)
            .unwrap_or(0);
        let end = (size + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        add_object(
            segments,
            objects,
            SpaceKind::File,
            *id as u64,
            path.clone(),
            end,
        )?;
    }
    Ok(())
}

/// Plans the populated pages of [0, end) of a file-like object (a shared memory object or a
/// ghost file, opened through /proc at `path`) as segments of `space`/`id`.
fn add_object(
    segments: &mut Vec<Segment>,
    objects: &mut Vec<(String, File)>,
    space: SpaceKind,
    id: u64,
    path: String,
    end: u64,
) -> Result<(), CheckpointError> {
    let file = crate::ghosts::open_quietly(&path)?;
    for (off, len) in data_ranges(&file, &path, end)? {
        segments.push(Segment {
            space,
            space_id: id,
            addr: off,
            pages: len / PAGE_SIZE,
            via: ReadVia::Object(objects.len()),
        });
    }
    objects.push((path, file));
    Ok(())
}

/// Page-aligned ranges of [0, end) of a shmem file that hold data (SEEK_DATA/SEEK_HOLE).
fn data_ranges(file: &File, path: &str, end: u64) -> Result<Vec<(u64, u64)>, CheckpointError> {
    use std::os::fd::AsRawFd;
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < end {
        // SAFETY: lseek on an fd we own; no pointers.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(CheckpointError::Io(format!("lseek(SEEK_DATA) {path}"), e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            let e = std::io::Error::last_os_error();
            return Err(CheckpointError::Io(format!("lseek(SEEK_HOLE) {path}"), e));
        }
        let start = (data as u64) & !(PAGE_SIZE - 1);
        let stop = ((hole as u64).min(end) + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        if stop > start {
            out.push((start, stop - start));
        }
        pos = stop.max(pos + PAGE_SIZE);
    }
    Ok(out)
}

/// One batch of pages read: their runs and the DATA pages.
struct Batch {
    space: SpaceKind,
    space_id: u64,
    runs: Vec<proto::PageRun>,
    data: Vec<u8>,
}

/// A batch hashed and compressed on its reading thread, handed to the writer thread.
struct Encoded {
    space: SpaceKind,
    space_id: u64,
    runs: Vec<proto::PageRun>,
    chunk: EncodedChunk,
}

/// Reads the planned pages and writes them as chunks; finishes the image.
pub fn dump<W: Write + Send>(
    plan: &DumpPlan,
    mut writer: ImageWriter<W>,
    progress: Progress<'_>,
) -> Result<(W, WriteStats), CheckpointError> {
    let total = plan.pages_total * PAGE_SIZE;
    // /proc/PID/mem of each process with mappings it cannot read through readv.
    let mut procmem: BTreeMap<u64, ProcMem> = BTreeMap::new();
    for seg in plan.segments.iter().filter(|s| s.via == ReadVia::ProcMem) {
        if let std::collections::btree_map::Entry::Vacant(e) = procmem.entry(seg.space_id) {
            e.insert(ProcMem::open(seg.space_id as i32)?);
        }
    }
    let groups = batches(&plan.segments, chunk_pages(writer.compression()));
    // Readers (process_vm_readv + zero check + hash + compression) feed one writer; the
    // image's page index is sorted on open, so chunk order does not matter.
    let readers = reader_count(
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        writer.compression(),
    )
    .min(groups.len().max(1));
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    // Buffers (page data, compressed data) the writer gives back for the readers to reuse.
    let pool: Mutex<Vec<(Vec<u8>, Vec<u8>)>> = Mutex::new(Vec::new());
    let compression = writer.compression();
    // Set by a failing reader: the writer must then not finish the image, or a stream would
    // carry a complete-looking image with pages missing.
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Encoded>(readers + 1);
        let pool_ref = &pool;
        let failed_ref = &failed;
        let writer_thread = scope.spawn(move || -> Result<(W, WriteStats), CheckpointError> {
            for batch in rx {
                writer.write_encoded_chunk(
                    batch.space,
                    plan.image_space_id(batch.space, batch.space_id),
                    &batch.runs,
                    &batch.chunk,
                )?;
                if let Ok(mut p) = pool_ref.lock() {
                    p.push(batch.chunk.into_buffers());
                }
            }
            if failed_ref.load(Ordering::SeqCst) {
                return Err(CheckpointError::Io(
                    "image writer".into(),
                    std::io::Error::other("reading pages failed; image left unfinished"),
                ));
            }
            Ok(writer.finish()?)
        });
        let reader_threads: Vec<_> = (0..readers)
            .map(|_| {
                let tx = tx.clone();
                let (groups, next, done, procmem) = (&groups, &next, &done, &procmem);
                scope.spawn(move || -> Result<(), CheckpointError> {
                    let mut encoder = ChunkEncoder::new(compression)?;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(group) = groups.get(i) else {
                            return Ok(());
                        };
                        if let Some(sig) = stasis_runtime::sys::termination_pending() {
                            failed_ref.store(true, Ordering::SeqCst);
                            next.store(usize::MAX / 2, Ordering::Relaxed);
                            return Err(CheckpointError::Interrupted(sig));
                        }
                        let pages: u64 = group.iter().map(|s| s.pages).sum();
                        let len = (pages * PAGE_SIZE) as usize;
                        let (mut buf, zbuf) = pool_ref
                            .lock()
                            .ok()
                            .and_then(|mut p| p.pop())
                            .unwrap_or_default();
                        buf.resize(len, 0);
                        if let Err(e) = read_group(plan, procmem, group, &mut buf) {
                            failed_ref.store(true, Ordering::SeqCst);
                            next.store(usize::MAX / 2, Ordering::Relaxed);
                            return Err(e);
                        }
                        let batch = compact(group, buf);
                        let encoded = encoder.encode(batch.data, zbuf).inspect_err(|_| {
                            failed_ref.store(true, Ordering::SeqCst);
                            next.store(usize::MAX / 2, Ordering::Relaxed);
                        })?;
                        let encoded = Encoded {
                            space: batch.space,
                            space_id: batch.space_id,
                            runs: batch.runs,
                            chunk: encoded,
                        };
                        if tx.send(encoded).is_err() {
                            return Ok(()); // the writer failed; its error is reported below
                        }
                        let d = done.fetch_add(len as u64, Ordering::Relaxed) + len as u64;
                        progress(d, total);
                    }
                })
            })
            .collect();
        drop(tx);
        let mut read_result = Ok(());
        for r in reader_threads {
            let r = r.join().map_err(|_| {
                CheckpointError::Io(
                    "page reader thread".into(),
                    std::io::Error::other("panicked"),
                )
            })?;
            if read_result.is_ok() {
                read_result = r;
            }
        }
        let written = writer_thread.join().map_err(|_| {
            CheckpointError::Io(
                "image writer thread".into(),
                std::io::Error::other("panicked"),
            )
        })?;
        read_result?;
        written
    })
}

/// How many threads read pages beside the one writer, on a machine with `cores` cores.
///
/// Raw pages leave the writer as much work as a reader (the page cache's allocation and copy
/// against process_vm_readv's copy and the hash), so the readers get one core fewer than the
/// machine has: on 2 cores one reader beat two by 6-8% in the pages phase of 1 GiB (401
/// against 425-435 ms, medians of 9), as the threads no longer take turns on a core.
/// Compression makes a reader several times slower than the writer, so it gets every core.
fn reader_count(cores: usize, compression: Compression) -> usize {
    let cores = cores.max(1);
    match compression {
        Compression::None => cores - 1,
        Compression::Zstd(_) => cores,
    }
    .clamp(1, 4)
}

/// Splits segments into groups of at most `chunk_pages` pages of one space and read method.
fn batches(segments: &[Segment], chunk_pages: u64) -> Vec<Vec<Segment>> {
    let mut out: Vec<Vec<Segment>> = Vec::new();
    let mut cur: Vec<Segment> = Vec::new();
    let mut cur_pages = 0;
    for seg in segments {
        let mut seg = seg.clone();
        while seg.pages > 0 {
            let compatible = cur.first().is_none_or(|f| {
                f.space == seg.space && f.space_id == seg.space_id && f.via == seg.via
            });
            if !compatible || cur_pages == chunk_pages {
                out.push(std::mem::take(&mut cur));
                cur_pages = 0;
            }
            let take = seg.pages.min(chunk_pages - cur_pages);
            cur.push(Segment {
                pages: take,
                ..seg.clone()
            });
            cur_pages += take;
            seg.addr += take * PAGE_SIZE;
            seg.pages -= take;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn read_group(
    plan: &DumpPlan,
    procmem: &BTreeMap<u64, ProcMem>,
    group: &[Segment],
    buf: &mut [u8],
) -> Result<(), CheckpointError> {
    // For process memory, the space id is the pid.
    let pid = group[0].space_id as i32;
    match group[0].via {
        ReadVia::Readv => {
            let remote: Vec<memory::Remote> = group
                .iter()
                .map(|s| (s.addr, (s.pages * PAGE_SIZE) as usize))
                .collect();
            memory::read_remote(pid, &remote, buf)?;
        }
        ReadVia::ProcMem => {
            let mem = procmem.get(&group[0].space_id).ok_or_else(|| {
                CheckpointError::Io("/proc/PID/mem".into(), std::io::Error::other("not open"))
            })?;
            let mut at = 0;
            for s in group {
                let len = (s.pages * PAGE_SIZE) as usize;
                mem.read(s.addr, &mut buf[at..at + len])?;
                at += len;
            }
        }
        ReadVia::Guest => read_guest(plan.guest.as_ref(), group, buf)?,
        ReadVia::Object(i) => {
            let (path, file) = &plan.objects[i];
            let mut at = 0;
            for s in group {
                let len = (s.pages * PAGE_SIZE) as usize;
                read_zero_filled(file, &mut buf[at..at + len], s.addr)
                    .map_err(|e| CheckpointError::Io(format!("read {path} at {:#x}", s.addr), e))?;
                at += len;
            }
        }
    }
    Ok(())
}

/// Reads guest memory segments back to back into `buf`.
fn read_guest(
    guest: Option<&(String, GuestSource)>,
    group: &[Segment],
    buf: &mut [u8],
) -> Result<(), CheckpointError> {
    let name = guest.map_or("", |g| g.0.as_str());
    let outside = |addr: u64| CheckpointError::Vm {
        name: name.to_string(),
        what: format!("guest page {addr:#x} is outside guest memory"),
    };
    match guest.map(|g| &g.1) {
        Some(GuestSource::Vmm { pid, host }) => {
            let remote: Vec<memory::Remote> = group
                .iter()
                .map(|s| (host + s.addr, (s.pages * PAGE_SIZE) as usize))
                .collect();
            memory::read_remote(*pid, &remote, buf).map_err(|e| CheckpointError::Vm {
                name: name.to_string(),
                what: format!("reading guest memory at {:#x}: {e}", group[0].addr),
            })?;
        }
        Some(GuestSource::Staged(staged)) => {
            let mut at = 0;
            for s in group {
                let len = (s.pages * PAGE_SIZE) as usize;
                let from = usize::try_from(s.addr).map_err(|_| outside(s.addr))?;
                let src = staged
                    .get(from..from + len)
                    .ok_or_else(|| outside(s.addr))?;
                buf[at..at + len].copy_from_slice(src);
                at += len;
            }
        }
        None => return Err(outside(group[0].addr)),
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `off`; bytes past the end of the file (its last page is
/// usually partial) read as zero.
fn read_zero_filled(file: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

/// Turns a read buffer into runs: zero pages become ZERO runs and are squeezed out of the
/// data; neighbouring pages of the same kind merge into one run.
fn compact(group: &[Segment], buf: Vec<u8>) -> Batch {
    let (runs, buf) = compact_runs(group.iter().map(|s| (s.addr, s.pages)), buf);
    Batch {
        space: group[0].space,
        space_id: group[0].space_id,
        runs,
        data: buf,
    }
}

/// The runs of `buf`, which holds the pages of `ranges` ((address, pages), ascending) back
/// to back: zero pages become ZERO runs and are squeezed out of the returned data.
pub(crate) fn compact_runs(
    ranges: impl Iterator<Item = (u64, u64)>,
    mut buf: Vec<u8>,
) -> (Vec<proto::PageRun>, Vec<u8>) {
    let ps = PAGE_SIZE as usize;
    let mut runs: Vec<proto::PageRun> = Vec::new();
    let mut write = 0usize;
    let mut read = 0usize;
    for (start, pages) in ranges {
        for p in 0..pages {
            let addr = start + p * PAGE_SIZE;
            let Some(page) = buf.get(read..read + ps) else {
                break;
            };
            let zero = memory::is_zero(page);
            let kind = if zero { RunKind::Zero } else { RunKind::Data };
            if !zero {
                if write != read {
                    buf.copy_within(read..read + ps, write);
                }
                write += ps;
            }
            read += ps;
            match runs.last_mut() {
                Some(r) if r.kind() == kind && r.vaddr + r.pages * PAGE_SIZE == addr => {
                    r.pages += 1
                }
                _ => runs.push(proto::PageRun {
                    vaddr: addr,
                    pages: 1,
                    kind: kind as i32,
                }),
            }
        }
    }
    buf.truncate(write);
    (runs, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(addr: u64, pages: u64) -> Segment {
        Segment {
            space: SpaceKind::Process,
            space_id: 1,
            addr,
            pages,
            via: ReadVia::Readv,
        }
    }

    #[test]
    fn raw_pages_leave_the_writer_a_core() {
        assert_eq!(reader_count(1, Compression::None), 1);
        assert_eq!(reader_count(2, Compression::None), 1);
        assert_eq!(reader_count(2, Compression::Zstd(3)), 2);
        assert_eq!(reader_count(8, Compression::None), 4);
        assert_eq!(reader_count(0, Compression::Zstd(3)), 1);
    }

    #[test]
    fn batches_split_at_chunk_size() {
        let b = batches(&[seg(0, CHUNK_PAGES + 10), seg(1 << 30, 5)], CHUNK_PAGES);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].iter().map(|s| s.pages).sum::<u64>(), CHUNK_PAGES);
        assert_eq!(b[1].len(), 2);
        assert_eq!(b[1][0].addr, CHUNK_PAGES * PAGE_SIZE);
    }

    #[test]
    fn compact_drops_zero_pages() {
        let mut buf = vec![0u8; 4 * 4096];
        buf[4096] = 1;
        buf[3 * 4096 + 7] = 2;
        let b = compact(&[seg(0x10000, 4)], buf);
        let kinds: Vec<_> = b
            .runs
            .iter()
            .map(|r| (r.vaddr, r.pages, r.kind()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0x10000, 1, RunKind::Zero),
                (0x11000, 1, RunKind::Data),
                (0x12000, 1, RunKind::Zero),
                (0x13000, 1, RunKind::Data)
            ]
        );
        assert_eq!(b.data.len(), 2 * 4096);
        assert_eq!(b.data[0], 1);
        assert_eq!(b.data[4096 + 7], 2);
    }
}

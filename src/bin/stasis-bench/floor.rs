//! The kernel's floor under a raw checkpoint, measured in the same runs as stasis and CRIU
//! (with `--criu`): what one pass of each step a stasis checkpoint cannot skip costs on this
//! machine, for the same number of bytes.
//!
//! - write: the bytes written once into a new file in the bench's `--dir` (4 MiB writes from
//!   memory already filled), one thread: the page cache's allocation and copy. A file takes
//!   one writer at a time (tmpfs holds the inode lock across a write), so this is a floor for
//!   a single-file image however many threads there are.
//! - read: process_vm_readv of the bytes into a 4 MiB buffer, one thread (pinning the pages
//!   and copying them), through the same call stasis reads a stopped process with.
//! - hash: [`ChunkEncoder`] on 4 MiB chunks, raw (blake3, the image format's chunk hash).
//!
//! - fsync (an image dir on a disk only): the fsync of that file after the write, the
//!   device's share of a durable image.
//!
//! CRIU pays read (as vmsplice's pinning, without the copy) and write; stasis pays all three,
//! spread over the machine's cores, and on a disk the fsync (it may overlap the other passes:
//! stasis starts writeback while it writes). So no stasis checkpoint can beat
//! max(write + fsync, (write + read + hash) / cores): the "floor" column.

use stasis_image::{ChunkEncoder, Compression};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

const PIECE: usize = 4 << 20;

/// One run's three passes, milliseconds.
#[derive(Default)]
pub struct Samples {
    pub write: Vec<f64>,
    pub read: Vec<f64>,
    pub hash: Vec<f64>,
    pub fsync: Vec<f64>,
}

/// Measures the three passes over `src` once and adds them to `s`.
pub fn one_run(src: &[u8], dir: &Path, durable: bool, s: &mut Samples) -> Result<(), String> {
    let path = dir.join(format!("stasis-bench-floor-{}", std::process::id()));
    let write = write_pass(src, &path, durable);
    let _ = std::fs::remove_file(&path);
    let (write, fsync) = write?;
    s.write.push(write);
    s.fsync.push(fsync);
    s.read.push(read_pass(src)?);
    s.hash.push(hash_pass(src)?);
    Ok(())
}

/// The write pass, and (`durable`) the fsync after it; milliseconds.
fn write_pass(src: &[u8], path: &Path, durable: bool) -> Result<(f64, f64), String> {
    let t = Instant::now();
    let mut f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    for piece in src.chunks(PIECE) {
        f.write_all(piece)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let write = t.elapsed().as_secs_f64() * 1000.0;
    if !durable {
        return Ok((write, 0.0));
    }
    let t = Instant::now();
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))?;
    Ok((write, t.elapsed().as_secs_f64() * 1000.0))
}

fn read_pass(src: &[u8]) -> Result<f64, String> {
    let mut buf = vec![0u8; PIECE];
    let me = std::process::id() as i32;
    let t = Instant::now();
    for piece in src.chunks(PIECE) {
        let remote = [(piece.as_ptr() as u64, piece.len())];
        stasis_runtime::memory::read_remote(me, &remote, &mut buf[..piece.len()])
            .map_err(|e| format!("process_vm_readv of our own memory: {e}"))?;
    }
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    std::hint::black_box(&buf);
    Ok(ms)
}

fn hash_pass(src: &[u8]) -> Result<f64, String> {
    let mut enc = ChunkEncoder::new(Compression::None).map_err(|e| e.to_string())?;
    let (mut raw, mut out) = (Vec::with_capacity(PIECE), Vec::new());
    let mut ns = 0u128;
    for piece in src.chunks(PIECE) {
        raw.clear();
        raw.extend_from_slice(piece);
        // Only the encoding is timed, not the copy into its buffer.
        let t = Instant::now();
        let chunk = enc.encode(raw, out).map_err(|e| e.to_string())?;
        ns += t.elapsed().as_nanos();
        let chunk = std::hint::black_box(chunk);
        (raw, out) = chunk.into_buffers();
    }
    Ok(ns as f64 / 1e6)
}

/// The floor of a raw stasis checkpoint on `cores` cores, from the passes' medians (fsync 0
/// where the image is not on a disk).
pub fn floor(write: f64, read: f64, hash: f64, fsync: f64, cores: usize) -> f64 {
    (write + fsync).max((write + read + hash) / cores.max(1) as f64)
}

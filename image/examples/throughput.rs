//! Write + verify throughput of raw (and zstd) images. Prints only.
//!
//! `cargo run --release -p stasis-image --example throughput [MiB]` (default 256).

use std::time::Instant;

use stasis_image::proto::{self, PageRun, RunKind, SpaceKind};
use stasis_image::{verify_stream, Compression, Image, ImageError, ImageWriter};

const CHUNK_PAGES: u64 = 1024; // 4 MiB chunks

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for w in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

fn mib_s(bytes: u64, secs: f64) -> String {
    format!("{:.0} MiB/s", bytes as f64 / (1 << 20) as f64 / secs)
}

fn run(total_mib: u64, compression: Compression, dir: &std::path::Path) -> Result<(), ImageError> {
    let mut data = vec![0u8; (CHUNK_PAGES * 4096) as usize];
    if compression == Compression::None {
        fill(&mut data, 7);
    } else {
        // Half noise, half compressible.
        let half = data.len() / 2;
        fill(&mut data[..half], 7);
    }
    let chunks = total_mib * (1 << 20) / data.len() as u64;
    let path = dir.join(format!("bench-{compression}.img"));
    let file = std::fs::File::create(&path).map_err(|e| ImageError::File {
        op: "creating",
        path: path.clone(),
        err: e,
    })?;
    let t = Instant::now();
    let mut w = ImageWriter::new(file, &proto::Inventory::default(), compression)?;
    for i in 0..chunks {
        let runs = [PageRun {
            vaddr: i * CHUNK_PAGES * 4096,
            pages: CHUNK_PAGES,
            kind: RunKind::Data as i32,
        }];
        w.write_chunk(SpaceKind::Process, 1, &runs, &data)?;
    }
    let (_, stats) = w.finish()?;
    let write = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let img = Image::open(&path)?;
    let open = t.elapsed().as_secs_f64();
    let t = Instant::now();
    img.verify()?;
    let verify = t.elapsed().as_secs_f64();
    let t = Instant::now();
    img.verify()?;
    let verify2 = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let f = std::fs::File::open(&path).map_err(|e| ImageError::File {
        op: "opening",
        path: path.clone(),
        err: e,
    })?;
    verify_stream(std::io::BufReader::with_capacity(1 << 20, f))?;
    let stream = t.elapsed().as_secs_f64();
    let raw = stats.raw_bytes;
    println!(
        "{compression:>7}: {} MiB raw -> {} MiB stored, image {} MiB",
        raw >> 20,
        stats.stored_bytes >> 20,
        stats.image_bytes >> 20
    );
    println!(
        "  write          {:>8.1} ms  {}",
        write * 1e3,
        mib_s(raw, write)
    );
    println!("  open           {:>8.1} ms", open * 1e3);
    println!(
        "  verify (mmap)  {:>8.1} ms  {}",
        verify * 1e3,
        mib_s(raw, verify)
    );
    println!(
        "  verify again   {:>8.1} ms  {}",
        verify2 * 1e3,
        mib_s(raw, verify2)
    );
    println!(
        "  verify_stream  {:>8.1} ms  {}",
        stream * 1e3,
        mib_s(raw, stream)
    );
    let _ = std::fs::remove_file(&path);
    Ok(())
}

fn main() -> Result<(), ImageError> {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let dir = std::env::temp_dir();
    // Bare blake3 for reference.
    let mut buf = vec![0u8; 256 << 20];
    fill(&mut buf, 3);
    let t = Instant::now();
    let h1 = blake3::hash(&buf);
    let one = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let h2 = blake3::Hasher::new().update_rayon(&buf).finalize();
    let all = t.elapsed().as_secs_f64();
    assert_eq!(h1, h2);
    println!(
        "blake3 256 MiB in memory: 1 thread {}, rayon ({} threads) {}",
        mib_s(256 << 20, one),
        rayon::current_num_threads(),
        mib_s(256 << 20, all)
    );
    drop(buf);
    run(mib, Compression::None, &dir)?;
    run(mib.min(256), Compression::Zstd(3), &dir)?;
    Ok(())
}

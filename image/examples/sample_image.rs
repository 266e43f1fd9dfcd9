//! Writes a small sample image (two processes, raw/zstd/zero/parent chunks) to the given path,
//! for trying `stasis image inspect` / `verify` and for seeding the fuzzer.
//!
//! `cargo run -p stasis-image --example sample_image -- OUT.img [none|zstd|zstd:LEVEL]`

use stasis_image::proto::{self, PageRun, RunKind, SpaceKind};
use stasis_image::{Compression, ImageError, ImageWriter};

fn run(vaddr: u64, pages: u64, kind: RunKind) -> PageRun {
    PageRun {
        vaddr,
        pages,
        kind: kind as i32,
    }
}

fn main() -> Result<(), ImageError> {
    let mut args = std::env::args().skip(1);
    let path = std::path::PathBuf::from(args.next().unwrap_or_else(|| "sample.img".into()));
    let compression: Compression = args.next().as_deref().unwrap_or("zstd").parse()?;
    let file = std::fs::File::create(&path).map_err(|e| ImageError::File {
        op: "creating",
        path: path.clone(),
        err: e,
    })?;
    let inv = proto::Inventory {
        tool: "stasis-image sample".into(),
        kind: proto::WorkloadKind::ProcessTree as i32,
        root_pid: 100,
        parent: Some(proto::ParentRef {
            image_id: "00000000000000000000000000000000".into(),
            path_hint: "parent.img".into(),
        }),
        ..Default::default()
    };
    let mut w = ImageWriter::new(file, &inv, compression)?;
    for pid in [100u32, 101] {
        w.write_process(&proto::Process {
            pid,
            ppid: 1,
            comm: format!("sample{pid}"),
            threads: vec![proto::Thread {
                tid: pid,
                regs: Some(proto::X86Regs {
                    rip: 0x401000,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            vmas: vec![proto::Vma {
                start: 0x10000,
                end: 0x20000,
                prot: 3,
                kind: proto::VmaKind::AnonPrivate as i32,
                name: "[heap]".into(),
                ..Default::default()
            }],
            ..Default::default()
        })?;
    }
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let pattern = vec![0x42u8; 8192];
    w.write_chunk(
        SpaceKind::Process,
        100,
        &[
            run(0x10000, 1, RunKind::Data),
            run(0x11000, 2, RunKind::Zero),
        ],
        &noise,
    )?;
    w.write_chunk(
        SpaceKind::Process,
        100,
        &[run(0x14000, 2, RunKind::Data)],
        &pattern,
    )?;
    w.write_chunk(
        SpaceKind::Process,
        101,
        &[run(0x10000, 4, RunKind::Parent)],
        &[],
    )?;
    let (_, stats) = w.finish()?;
    println!("{}: {} bytes", path.display(), stats.image_bytes);
    Ok(())
}

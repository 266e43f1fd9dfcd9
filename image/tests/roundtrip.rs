//! Write images, read them back every way, compare.

mod common;

use std::borrow::Cow;
use std::io::Write;

use common::*;
use stasis_image::proto::{self, Encoding, RunKind, SpaceKind};
use stasis_image::{
    inspect, verify_stream, Compression, Image, ImageError, ImageWriter, Record, StreamReader,
};

type R = Result<(), ImageError>;

fn check_image(img: &Image, compression: Compression, parent: bool) -> R {
    let inv = img.inventory();
    assert_eq!(inv.format_major, 1);
    assert_eq!(inv.page_size, 4096);
    assert_eq!(inv.compression, compression.to_string());
    assert_eq!(inv.image_id.len(), 32);
    assert_eq!(inv.hostname, "testhost");
    assert_eq!(img.processes(), &sample_processes()[..]);

    let expected = sample_chunks(parent);
    assert_eq!(img.chunks().len(), expected.len());
    // Chunks are written in two halves around the processes; order is preserved.
    for (c, e) in img.chunks().iter().zip(&expected) {
        assert_eq!((c.space, c.space_id), (e.space, e.space_id));
        assert_eq!(c.runs, e.runs);
        let data = img.chunk_data(c)?;
        assert_eq!(&*data, &e.data[..]);
        match (&data, c.encoding) {
            (Cow::Borrowed(_), Encoding::Raw) | (Cow::Owned(_), Encoding::Zstd) => {}
            other => panic!("unexpected data ownership {:?}", other.1),
        }
        if c.encoding == Encoding::Raw && c.data_len > 0 {
            let off = img.raw_data_offset(c).unwrap_or(1);
            assert_eq!(off % 4096, 0, "raw data at {off} not aligned");
        } else {
            assert_eq!(img.raw_data_offset(c), None);
        }
        if compression == Compression::None {
            assert_eq!(c.encoding, Encoding::Raw);
        }
        // Every page of every run is found, with the right contents.
        let mut data_page = 0u64;
        for (ri, r) in e.runs.iter().enumerate() {
            for p in 0..r.pages {
                let va = r.vaddr + p * PAGE + 123;
                let loc = img.find_page(e.space, e.space_id, va);
                let loc = loc.unwrap_or_else(|| panic!("page {va:#x} not found"));
                assert_eq!((loc.chunk, loc.run), (c.index, ri));
                assert_eq!(loc.kind as i32, r.kind);
                if r.kind == RunKind::Data as i32 {
                    let d = loc.data_offset.unwrap_or(u64::MAX);
                    assert_eq!(d, data_page * PAGE);
                    if let Some(fo) = loc.file_offset {
                        assert_eq!(fo, c.data_offset + d);
                    }
                    data_page += 1;
                } else {
                    assert_eq!(loc.data_offset, None);
                }
            }
        }
    }
    // Holes and other spaces are not found.
    assert!(img
        .find_page(SpaceKind::Process, 100, 0x7f00_0000_5000)
        .is_none());
    assert!(img.find_page(SpaceKind::Process, 100, 0).is_none());
    assert!(img.find_page(SpaceKind::Process, 100, u64::MAX).is_none());
    assert!(img
        .find_page(SpaceKind::Process, 999, 0x7f00_0000_0000)
        .is_none());
    assert!(img.find_page(SpaceKind::Guest, 0, 0).is_none());

    let structure = img.verify_structure()?;
    for c in img.chunks() {
        img.verify_chunk(c)?;
    }
    let report = img.verify()?;
    assert_eq!(structure, report);
    assert_eq!(report.processes, 2);
    assert_eq!(report.chunks, expected.len() as u64);
    assert_eq!(report.file_bytes, img.file_len());
    assert_eq!(report.frames, img.frame_count());

    let ins = inspect::report(img);
    let json = serde_json::to_string_pretty(&ins).unwrap_or_default();
    assert!(json.contains("\"rip\": \"0x0000555555551000\""), "{json}");
    assert!(json.contains("ANON_PRIVATE"));
    let text = ins.to_string();
    println!("{text}");
    assert!(text.contains("process 100 (proc100)"), "{text}");
    assert!(text.contains("[heap]"));
    assert!(text.contains("/tmp/log"));
    Ok(())
}

fn check_stream(bytes: &[u8], parent: bool) -> R {
    let mut s = StreamReader::new(bytes)?;
    let mut procs = vec![];
    let mut chunks = vec![];
    let mut saw = (false, false, false);
    while let Some(rec) = s.next_record()? {
        match rec {
            Record::Inventory(i) => {
                assert!(!saw.0);
                assert_eq!(i.root_pid, 100);
                saw.0 = true;
            }
            Record::Process(p) => procs.push(p),
            Record::Chunk { chunk, data } => chunks.push((chunk, data)),
            Record::Index(_) => saw.1 = true,
            Record::End => saw.2 = true,
        }
    }
    assert_eq!(saw, (true, true, true));
    assert!(s.next_record()?.is_none());
    assert_eq!(procs, sample_processes());
    let expected = sample_chunks(parent);
    assert_eq!(chunks.len(), expected.len());
    for ((c, d), e) in chunks.iter().zip(&expected) {
        assert_eq!(c.runs, e.runs);
        assert_eq!(d, &e.data);
    }
    let r = verify_stream(bytes)?;
    assert_eq!(r.file_bytes, bytes.len() as u64);
    Ok(())
}

#[test]
fn round_trip_all_ways() -> R {
    for compression in [
        Compression::None,
        Compression::Zstd(3),
        Compression::Zstd(-3),
    ] {
        for parent in [false, true] {
            let bytes = sample_image(compression, parent);
            let img = Image::from_bytes(bytes.clone())?;
            assert!(!img.is_mapped());
            check_image(&img, compression, parent)?;

            let dir = tempfile::tempdir().map_err(|e| ImageError::Io {
                op: "tempdir",
                offset: 0,
                err: e,
            })?;
            let path = dir.path().join("x.img");
            std::fs::write(&path, &bytes).map_err(|e| ImageError::Io {
                op: "write",
                offset: 0,
                err: e,
            })?;
            let mapped = Image::open(&path)?;
            assert!(mapped.is_mapped());
            check_image(&mapped, compression, parent)?;

            check_stream(&bytes, parent)?;
        }
    }
    Ok(())
}

#[test]
fn zstd_actually_compresses_and_falls_back_to_raw() -> R {
    let bytes = sample_image(Compression::Zstd(3), false);
    let img = Image::from_bytes(bytes)?;
    let enc: Vec<Encoding> = img.chunks().iter().map(|c| c.encoding).collect();
    // Noise chunks stay raw, patterned ones compress, empty data is raw.
    assert_eq!(
        enc,
        [
            Encoding::Raw,
            Encoding::Zstd,
            Encoding::Raw,
            Encoding::Zstd,
            Encoding::Raw
        ]
    );
    Ok(())
}

/// A sink that is Write but not Seek.
struct Sink(Vec<u8>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Short writes, to exercise write_all.
        let n = buf.len().min(1000);
        self.0.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn writer_on_non_seekable_sink_and_pipe() -> R {
    let chunks = sample_chunks(false);
    let mut w = ImageWriter::new(Sink(vec![]), &inventory(false), Compression::None)?;
    for c in &chunks {
        w.write_chunk(c.space, c.space_id, &c.runs, &c.data)?;
    }
    let (sink, stats) = w.finish()?;
    assert_eq!(stats.image_bytes, sink.0.len() as u64);
    assert_eq!(stats.chunks, chunks.len() as u64);
    Image::from_bytes(sink.0.clone())?.verify()?;

    // A real pipe: writer thread on one end, StreamReader on the other.
    let (reader, writer) = std::io::pipe().map_err(|e| ImageError::Io {
        op: "pipe",
        offset: 0,
        err: e,
    })?;
    let t = std::thread::spawn(move || -> Result<u64, ImageError> {
        let mut w = ImageWriter::new(writer, &inventory(false), Compression::Zstd(1))?;
        w.write_process(&process(100, 2))?;
        for c in &chunks {
            w.write_chunk(c.space, c.space_id, &c.runs, &c.data)?;
        }
        Ok(w.finish()?.1.image_bytes)
    });
    let report = verify_stream(reader)?;
    let written = t.join().map_err(|_| ImageError::InvalidInput {
        op: "join",
        reason: "writer thread panicked".into(),
    })??;
    assert_eq!(report.file_bytes, written);
    assert_eq!(report.processes, 1);
    Ok(())
}

#[test]
fn stats_and_alignment_overhead() -> R {
    let mut w = ImageWriter::new(Vec::new(), &inventory(false), Compression::None)?;
    let mut pads = 0;
    for i in 0..50u64 {
        let before = w.bytes_written();
        let n = 1 + i % 7;
        let runs = [
            run(i << 20, n, RunKind::Data),
            run((i << 20) + (n + 1) * PAGE, i % 3 + 1, RunKind::Zero),
        ];
        let s = w.write_chunk(SpaceKind::Process, 1, &runs, &pages(n, i, false))?;
        assert_eq!(s.data_pages, n);
        assert_eq!(s.zero_pages, i % 3 + 1);
        assert_eq!(s.stored_bytes, n * PAGE);
        let overhead = w.bytes_written() - before - n * PAGE;
        // <= one PAD frame (< 4096 + 64) + two frame headers + the record.
        assert!(overhead < 4096 + 64 + 128 + 200, "overhead {overhead}");
        pads += overhead;
    }
    let (bytes, stats) = w.finish()?;
    assert_eq!(stats.chunks, 50);
    let img = Image::from_bytes(bytes)?;
    for c in img.chunks() {
        assert_eq!(c.data_offset % 4096, 0);
    }
    let r = img.verify()?;
    assert!(r.pad_bytes > 0 && r.pad_bytes < pads);
    Ok(())
}

#[test]
fn writer_rejects_bad_chunks() -> R {
    let mut w = ImageWriter::new(Vec::new(), &inventory(false), Compression::None)?;
    let d1 = pages(1, 1, false);
    let bad: Vec<(Vec<proto::PageRun>, &[u8])> = vec![
        (vec![], &[]),
        (vec![run(0x1000, 1, RunKind::Data)], &[]),
        (vec![run(0x1000, 1, RunKind::Parent)], &[]),
        (vec![run(0x1001, 1, RunKind::Data)], &d1),
        (
            vec![run(0x2000, 1, RunKind::Data), run(0x1000, 1, RunKind::Zero)],
            &d1,
        ),
        (
            vec![run(0x1000, 2, RunKind::Zero), run(0x2000, 1, RunKind::Data)],
            &d1,
        ),
        (vec![run(0, 16385, RunKind::Data)], &d1),
    ];
    for (runs, data) in &bad {
        let e = w.write_chunk(SpaceKind::Process, 1, runs, data);
        assert!(
            matches!(e, Err(ImageError::InvalidInput { .. })),
            "{runs:?}: {e:?}"
        );
    }
    w.write_chunk(SpaceKind::Process, 1, &[run(0x1000, 4, RunKind::Zero)], &[])?;
    let overlap = w.write_chunk(SpaceKind::Process, 1, &[run(0x3000, 1, RunKind::Data)], &d1);
    assert!(overlap.is_err());
    // Another space may use the same addresses.
    w.write_chunk(SpaceKind::Process, 2, &[run(0x3000, 1, RunKind::Data)], &d1)?;
    let unspecified = w.write_chunk(
        SpaceKind::Unspecified,
        2,
        &[run(0x3000, 1, RunKind::Zero)],
        &[],
    );
    assert!(unspecified.is_err());
    let (bytes, _) = w.finish()?;
    Image::from_bytes(bytes)?.verify()?;
    Ok(())
}

/// A sink that fails after `left` bytes.
struct Failing {
    left: usize,
}

impl Write for Failing {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("disk full"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn writer_io_error_poisons() -> R {
    let mut w = ImageWriter::new(
        Failing { left: 300_000 },
        &inventory(false),
        Compression::None,
    )?;
    let data = pages(64, 1, false);
    let mut failed = false;
    for i in 0..10u64 {
        match w.write_chunk(
            SpaceKind::Process,
            1,
            &[run(i << 20, 64, RunKind::Data)],
            &data,
        ) {
            Ok(_) => assert!(!failed, "write succeeded after a failure"),
            Err(ImageError::Io { .. }) if !failed => failed = true,
            Err(ImageError::WriterFailed { .. }) if failed => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(failed);
    assert!(w.write_process(&process(1, 1)).is_err());
    assert!(w.finish().is_err());
    Ok(())
}

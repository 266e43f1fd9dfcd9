//! Hand-crafted hostile images: bad magic, newer versions, unknown kinds, huge lengths, records
//! that break the chunk rules, broken sequencing. Each must be a clear error.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use prost::Message;
use stasis_image::frame::{encode_file_header, FrameKind};
use stasis_image::proto::{self, Encoding, RunKind, SpaceKind};
use stasis_image::{verify_stream, Compression, Image, ImageError, StreamReader};

/// Records the largest single allocation, to prove hostile lengths are never allocated.
struct Tracking;
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only records the requested size.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

fn both_err(bytes: &[u8]) -> (String, String) {
    let a = match Image::from_bytes(bytes.to_vec()).and_then(|i| i.verify()) {
        Ok(_) => panic!("Image accepted a hostile image"),
        Err(e) => e.to_string(),
    };
    let b = match verify_stream(bytes) {
        Ok(_) => panic!("stream accepted a hostile image"),
        Err(e) => e.to_string(),
    };
    (a, b)
}

fn builder() -> RawBuilder {
    RawBuilder::new(&inventory(false))
}

#[test]
fn valid_raw_builder_image_is_accepted() -> Result<(), ImageError> {
    // Sanity check of the hand builder, so the hostile tests below fail for their own reason.
    let mut b = builder();
    b.process(&process(100, 1));
    let d = pages(2, 1, false);
    b.chunk(
        &raw_record(100, vec![run(0x1000, 2, RunKind::Data)], &d),
        &d,
        true,
    );
    let img = b.finish();
    Image::from_bytes(img.clone())?.verify()?;
    verify_stream(&img[..])?;
    Ok(())
}

#[test]
fn wrong_magic() {
    let mut img = sample_image(Compression::None, false);
    img[0] = b'X';
    let (a, b) = both_err(&img);
    assert!(a.contains("bad magic at offset 0"), "{a}");
    assert!(b.contains("bad magic"), "{b}");
    assert!(matches!(
        Image::from_bytes(b"not an image at all".to_vec()),
        Err(ImageError::Truncated { .. })
    ));
}

fn with_version(img: &mut [u8], major: u16, minor: u16) {
    img[8..10].copy_from_slice(&major.to_le_bytes());
    img[10..12].copy_from_slice(&minor.to_le_bytes());
    let check = blake3::hash(&img[..56]);
    img[56..64].copy_from_slice(&check.as_bytes()[..8]);
}

#[test]
fn newer_major_rejected_newer_minor_accepted() -> Result<(), ImageError> {
    let mut img = sample_image(Compression::None, false);
    with_version(&mut img, 2, 0);
    let (a, b) = both_err(&img);
    assert!(
        a.contains("image format 2.0 is newer than this stasis supports (1.x"),
        "{a}"
    );
    assert!(b.contains("image format 2.0 is newer"), "{b}");
    with_version(&mut img, 0, 5);
    both_err(&img);
    with_version(&mut img, 1, 3);
    let i = Image::from_bytes(img.clone())?;
    assert_eq!(i.version(), (1, 3));
    i.verify()?;
    verify_stream(&img[..])?;
    Ok(())
}

#[test]
fn nonzero_reserved_in_file_header() {
    let mut img = sample_image(Compression::None, false);
    img[40] = 1;
    let check = blake3::hash(&img[..56]);
    img[56..64].copy_from_slice(&check.as_bytes()[..8]);
    let (a, _) = both_err(&img);
    assert!(a.contains("nonzero flags or reserved"), "{a}");
}

#[test]
fn unknown_frame_kind() {
    let mut b = builder();
    let at = b.pos();
    b.buf.extend_from_slice(&frame(99, b"whatever"));
    b.frames += 1;
    let img = b.finish();
    let (a, s) = both_err(&img);
    let want = format!("frame at offset {at}: unknown frame kind 99");
    assert_eq!(a, want);
    assert_eq!(s, want);
}

#[test]
fn huge_lengths_rejected_without_allocating() {
    let huge = 1u64 << 40;
    for kind in [
        FrameKind::Process,
        FrameKind::PageData,
        FrameKind::Index,
        FrameKind::Pad,
    ] {
        // Stream: a frame header claiming 2^40 bytes right after the inventory.
        let mut b = builder();
        let at = b.pos();
        b.buf
            .extend_from_slice(&frame_with_len(kind as u32, &[], huge));
        let e = verify_stream(&b.buf[..]).err().map(|e| e.to_string());
        let limit = kind.max_len();
        let want = format!("record length {huge} at offset {at} ({kind}) exceeds limit {limit}");
        assert_eq!(e.as_deref(), Some(want.as_str()));
    }
    // Random access: an INDEX frame claiming 2^40 bytes, reached through END.
    let mut b = builder();
    let index_at = b.pos();
    b.buf
        .extend_from_slice(&frame_with_len(FrameKind::Index as u32, &[], huge));
    let end = stasis_image::frame::EndPayload {
        index_offset: index_at,
        frames: 3,
    };
    b.buf
        .extend_from_slice(&frame(FrameKind::End as u32, &end.encode()));
    let e = Image::from_bytes(b.buf.clone())
        .err()
        .map(|e| e.to_string());
    assert!(
        e.as_deref()
            .is_some_and(|e| e.contains("record length 1099511627776")),
        "{e:?}"
    );
    // A protobuf field claiming a huge length inside a valid frame.
    let mut bogus = vec![0x3a]; // field 7 (threads), wire type 2
    bogus.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01]); // varint 2^42
    let mut b = builder();
    b.push(FrameKind::Process as u32, &bogus);
    let img = b.finish();
    let (a, s) = both_err(&img);
    assert!(a.contains("protobuf decode failed"), "{a}");
    assert!(s.contains("protobuf decode failed"), "{s}");
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < 1 << 30,
        "an allocation of {largest} bytes happened"
    );
}

fn chunk_err(rec: proto::PageChunk, data: &[u8], align: bool) -> String {
    let mut b = builder();
    b.chunk(&rec, data, align);
    let img = b.finish();
    let (a, s) = both_err(&img);
    assert_eq!(a, s, "random access and stream disagree");
    a
}

#[test]
fn hostile_chunk_records() {
    let d = pages(2, 1, false);
    let d1 = pages(1, 1, false);
    let cases: Vec<(proto::PageChunk, &[u8], &str)> = vec![
        (
            raw_record(
                1,
                vec![run(0x5000, 1, RunKind::Data), run(0x1000, 1, RunKind::Data)],
                &d,
            ),
            &d,
            "runs must ascend",
        ),
        (
            raw_record(
                1,
                vec![run(0x1000, 2, RunKind::Data), run(0x2000, 1, RunKind::Zero)],
                &d,
            ),
            &d,
            "overlaps",
        ),
        (
            raw_record(1, vec![run(0x1000, 3, RunKind::Data)], &d),
            &d,
            "raw_len 8192 does not match 3 data pages",
        ),
        (
            raw_record(1, vec![run(0x1001, 2, RunKind::Data)], &d),
            &d,
            "not page aligned",
        ),
        (
            raw_record(
                1,
                vec![run(0x1000, 0, RunKind::Data), run(0x1000, 2, RunKind::Data)],
                &d,
            ),
            &d,
            "zero pages",
        ),
        (raw_record(1, vec![], &[]), &[], "no runs"),
        (
            raw_record(
                1,
                vec![
                    run(0x1000, 1, RunKind::Data),
                    run(0x2000, 1, RunKind::Parent),
                ],
                &d1,
            ),
            &d1,
            "names no parent",
        ),
        (
            raw_record(1, vec![run(!0xfff, 2, RunKind::Zero)], &[]),
            &[],
            "overflows",
        ),
        (
            raw_record(1, vec![run(0, 1 << 15, RunKind::Data)], &[]),
            &[],
            "limit 67108864",
        ),
    ];
    for (rec, data, want) in cases {
        let e = chunk_err(rec, data, true);
        assert!(
            e.contains("(PAGE_CHUNK)") && e.contains(want),
            "want {want:?}: {e}"
        );
    }

    // Bad enum values, hash length, encodings.
    let mut r = raw_record(1, vec![run(0x1000, 2, RunKind::Data)], &d);
    r.space = 42;
    assert!(chunk_err(r, &d, true).contains("invalid space kind 42"));
    let mut r = raw_record(1, vec![run(0x1000, 2, RunKind::Data)], &d);
    r.encoding = 9;
    assert!(chunk_err(r, &d, true).contains("invalid encoding 9"));
    let mut r = raw_record(1, vec![run(0x1000, 2, RunKind::Data)], &d);
    r.raw_hash.pop();
    assert!(chunk_err(r, &d, true).contains("raw_hash is 31 bytes"));
    let mut r = raw_record(1, vec![run(0x1000, 2, RunKind::Data)], &d);
    r.stored_len = 5;
    assert!(chunk_err(r, &d, true).contains("stored_len 5 differs"));
    let mut r = raw_record(1, vec![run(0x1000, 2, RunKind::Data)], &d);
    r.encoding = Encoding::Zstd as i32;
    assert!(chunk_err(r, &d, true).contains("zstd chunk must be non-empty and smaller"));
}

#[test]
fn hostile_data_frames() {
    let d = pages(2, 1, false);
    // Raw data not page aligned.
    let e = chunk_err(
        raw_record(1, vec![run(0x1000, 2, RunKind::Data)], &d),
        &d,
        false,
    );
    assert!(
        e.contains("(PAGE_DATA): raw page data at offset") && e.contains("not 4096-aligned"),
        "{e}"
    );
    // Raw data whose hash differs from raw_hash (frame hash itself is right).
    let other = pages(2, 9, false);
    let e = chunk_err(
        raw_record(1, vec![run(0x1000, 2, RunKind::Data)], &d),
        &other,
        true,
    );
    assert!(e.contains("payload hash differs from raw_hash"), "{e}");
    // zstd payload that decodes to other data than raw_hash says.
    let z = zstd::bulk::compress(&vec![1u8; 8192], 3).unwrap_or_default();
    let rec = proto::PageChunk {
        space: SpaceKind::Process as i32,
        space_id: 1,
        runs: vec![run(0x1000, 2, RunKind::Data)],
        encoding: Encoding::Zstd as i32,
        raw_len: 8192,
        stored_len: z.len() as u64,
        raw_hash: blake3::hash(&[2u8; 8192]).as_bytes().to_vec(),
    };
    let e = chunk_err(rec.clone(), &z, false);
    assert!(e.contains("decoded page data hash mismatch"), "{e}");
    // zstd payload that decodes to more bytes than raw_len.
    let z2 = zstd::bulk::compress(&vec![1u8; 12288], 3).unwrap_or_default();
    let rec2 = proto::PageChunk {
        stored_len: z2.len() as u64,
        ..rec.clone()
    };
    let e = chunk_err(rec2, &z2, false);
    assert!(e.contains("zstd decode failed"), "{e}");
    // Garbage zstd.
    let garbage = vec![0x55u8; 100];
    let rec3 = proto::PageChunk {
        stored_len: 100,
        ..rec
    };
    let e = chunk_err(rec3, &garbage, false);
    assert!(e.contains("zstd decode failed"), "{e}");
}

#[test]
fn sequencing_errors() {
    let d = pages(1, 1, false);
    let rec = raw_record(1, vec![run(0x1000, 1, RunKind::Data)], &d);
    let rec_bytes = rec.encode_to_vec();

    // PAGE_CHUNK not followed by PAGE_DATA.
    let mut b = builder();
    b.push(FrameKind::PageChunk as u32, &rec_bytes);
    b.process(&process(1, 1));
    let (a, s) = both_err(&b.finish());
    assert!(
        s.contains("expected PAGE_DATA right after PAGE_CHUNK"),
        "{s}"
    );
    assert!(!a.is_empty());

    // PAGE_DATA without a chunk.
    let mut b = builder();
    b.push(FrameKind::PageData as u32, &d);
    let (_, s) = both_err(&b.finish());
    assert!(s.contains("unexpected PAGE_DATA frame"), "{s}");

    // Two inventories.
    let mut b = builder();
    b.push(
        FrameKind::Inventory as u32,
        &inventory(false).encode_to_vec(),
    );
    let (_, s) = both_err(&b.finish());
    assert!(s.contains("unexpected INVENTORY frame"), "{s}");

    // First frame not an inventory.
    let mut img = encode_file_header().to_vec();
    img.extend_from_slice(&frame(
        FrameKind::Process as u32,
        &process(1, 1).encode_to_vec(),
    ));
    assert!(verify_stream(&img[..])
        .is_err_and(|e| e.to_string().contains("INVENTORY as the first frame")));

    // Nonzero PAD.
    let mut b = builder();
    b.push(FrameKind::Pad as u32, &[0, 0, 1]);
    let (a, s) = both_err(&b.finish());
    assert!(a.contains("PAD payload has nonzero bytes"), "{a}");
    assert!(s.contains("PAD payload has nonzero bytes"), "{s}");

    // A process missing from the index.
    let mut b = builder();
    b.push(FrameKind::Process as u32, &process(1, 1).encode_to_vec());
    let (a, s) = both_err(&b.finish());
    assert!(a.contains("index does not match"), "{a}");
    assert!(s.contains("index does not match"), "{s}");

    // Two chunks covering the same page.
    let mut b = builder();
    b.chunk(&rec, &d, true);
    b.chunk(&rec, &d, true);
    let (a, s) = both_err(&b.finish());
    assert!(
        a.contains("overlapping pages") || a.contains("overlap an earlier chunk"),
        "{a}"
    );
    assert!(s.contains("overlap an earlier chunk"), "{s}");

    // END with a wrong frame count.
    let mut img = builder().finish();
    let n = img.len();
    let mut end = [0u8; 32];
    end.copy_from_slice(&img[n - 32..]);
    end[8] += 1;
    img.truncate(n - 96);
    img.extend_from_slice(&frame(FrameKind::End as u32, &end));
    let (a, s) = both_err(&img);
    assert!(a.contains("END counts 4 frames, the image has 3"), "{a}");
    assert_eq!(a, s);

    // Index entry that lies about where a chunk's data is.
    let mut b = builder();
    b.chunk(&rec, &d, true);
    if let Some(c) = b.index.chunks.first_mut() {
        c.raw_len = 0;
    }
    let (a, s) = both_err(&b.finish());
    assert!(a.contains("does not match its frames"), "{a}");
    assert!(s.contains("index does not match"), "{s}");
}

#[test]
fn stream_reader_stops_at_end_and_reports_position() -> Result<(), ImageError> {
    let img = sample_image(Compression::None, false);
    let mut with_tail = img.clone();
    with_tail.extend_from_slice(b"next message on the socket");
    let mut s = StreamReader::new(&with_tail[..])?;
    while s.next_record()?.is_some() {}
    assert_eq!(s.position(), img.len() as u64);
    let rest = s.into_inner();
    assert_eq!(rest, b"next message on the socket");
    Ok(())
}

//! Truncated and bit-flipped images: always an error, never a panic, from every reader.

mod common;

use common::*;
use stasis_image::{verify_stream, Compression, Image, StreamReader};

/// Every reader path; true when all of them fail.
fn all_reject(bytes: &[u8]) -> Result<(), String> {
    if let Ok(img) = Image::from_bytes(bytes.to_vec()) {
        if img.verify().is_ok() {
            return Err("Image::from_bytes + verify accepted it".into());
        }
        // The split form (structure first, then each chunk's data, as a VM restore that maps
        // page data does) must reject it too.
        if img.verify_structure().is_ok()
            && img.chunks().iter().all(|c| img.verify_chunk(c).is_ok())
        {
            return Err("verify_structure + verify_chunk accepted it".into());
        }
        // inspect and chunk_data must not panic either.
        let _ = stasis_image::inspect::report(&img).to_string();
        for c in img.chunks() {
            let _ = img.chunk_data(c);
        }
    }
    if verify_stream(bytes).is_ok() {
        return Err("verify_stream accepted it".into());
    }
    // Reading records one by one must end in an error too.
    match StreamReader::new(bytes) {
        Err(_) => {}
        Ok(mut s) => loop {
            match s.next_record() {
                Err(_) => break,
                Ok(None) => {
                    // Sequential reader stops at END; the only acceptable way to get here is
                    // trailing garbage after a valid END, which verify_stream caught.
                    break;
                }
                Ok(Some(_)) => {}
            }
        },
    }
    Ok(())
}

fn small_images() -> Vec<Vec<u8>> {
    vec![
        sample_image(Compression::None, false),
        sample_image(Compression::Zstd(3), true),
    ]
}

#[test]
fn truncation_at_every_frame_boundary() {
    for img in small_images() {
        let offsets = frame_offsets(&img);
        assert_eq!(offsets.last(), Some(&img.len()));
        for &off in &offsets[..offsets.len() - 1] {
            for cut in [off, off + 1, off + 63, off + 64, off + 65] {
                if cut < img.len() {
                    if let Err(e) = all_reject(&img[..cut]) {
                        panic!("truncated at {cut}: {e}");
                    }
                }
            }
        }
        for cut in [0, 1, 63, 64, 65, img.len() - 96, img.len() - 1] {
            if let Err(e) = all_reject(&img[..cut]) {
                panic!("truncated at {cut}: {e}");
            }
        }
    }
}

#[test]
fn truncation_at_random_offsets() {
    let mut x = 0x1234_5678_9abc_def1u64;
    for img in small_images() {
        for _ in 0..400 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let cut = (x % img.len() as u64) as usize;
            if let Err(e) = all_reject(&img[..cut]) {
                panic!("truncated at {cut}: {e}");
            }
        }
    }
}

#[test]
fn trailing_bytes_rejected() {
    for img in small_images() {
        let mut longer = img.clone();
        longer.push(0);
        assert!(verify_stream(&longer[..]).is_err());
        // Random access finds END at len-96: one extra byte shifts it.
        assert!(Image::from_bytes(longer).is_err());
    }
}

/// A small image with every frame kind: PAD, raw data, zstd data, empty data, parent runs.
fn tiny_image() -> Vec<u8> {
    use stasis_image::proto::{RunKind, SpaceKind};
    let build = || -> Result<Vec<u8>, stasis_image::ImageError> {
        let mut w =
            stasis_image::ImageWriter::new(Vec::new(), &inventory(true), Compression::Zstd(1))?;
        w.write_process(&process(100, 1))?;
        let runs = [
            run(0x1000, 1, RunKind::Data),
            run(0x2000, 1, RunKind::Parent),
        ];
        w.write_chunk(SpaceKind::Process, 100, &runs, &pages(1, 1, false))?;
        w.write_chunk(
            SpaceKind::Process,
            100,
            &[run(0x8000, 2, RunKind::Data)],
            &pages(2, 2, true),
        )?;
        w.write_chunk(
            SpaceKind::Process,
            100,
            &[run(0x10000, 3, RunKind::Zero)],
            &[],
        )?;
        Ok(w.finish()?.0)
    };
    build().unwrap_or_else(|e| panic!("tiny image: {e}"))
}

#[test]
fn every_single_byte_flip_is_detected() {
    let img = tiny_image();
    assert!(img.len() < 16 << 10, "tiny image is {} bytes", img.len());
    let mut bad = img.clone();
    for i in 0..img.len() {
        // Alternate low and high bit so both kinds of flips are covered.
        let mask = if i % 2 == 0 { 0x01u8 } else { 0x80 };
        bad[i] ^= mask;
        let img_ok = Image::from_bytes(bad.clone())
            .and_then(|m| m.verify())
            .is_ok();
        let split_ok = Image::from_bytes(bad.clone()).is_ok_and(|m| {
            m.verify_structure().is_ok() && m.chunks().iter().all(|c| m.verify_chunk(c).is_ok())
        });
        let stream_ok = verify_stream(&bad[..]).is_ok();
        assert!(
            !img_ok && !stream_ok && !split_ok,
            "flip {mask:#x} at byte {i} of {} undetected",
            img.len()
        );
        bad[i] ^= mask;
    }
}

#[test]
fn flips_in_metadata_of_sample_images_are_detected() {
    // Exhaustive over everything but page payloads (those are covered by the tiny image).
    for img in small_images() {
        let opened = Image::from_bytes(img.clone()).unwrap_or_else(|e| panic!("{e}"));
        let in_data = |i: usize| {
            opened.chunks().iter().any(|c| {
                let (s, l) = (c.data_offset as usize, c.data_len as usize);
                i >= s + 8 && i + 8 < s + l
            })
        };
        let mut bad = img.clone();
        for i in (0..img.len()).filter(|&i| !in_data(i)) {
            bad[i] ^= 0x10;
            if let Err(e) = all_reject(&bad) {
                panic!("flip at byte {i} of {} undetected: {e}", img.len());
            }
            bad[i] ^= 0x10;
        }
    }
}

/// Poor man's fuzzing on stable: random multi-byte mutations, splices and cuts of valid images.
/// Every reader must return an error (never panic, never accept).
#[test]
fn random_mutations_are_rejected() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n.max(1) as u64) as usize
    };
    let images = [tiny_image(), sample_image(Compression::Zstd(3), false)];
    for i in 0..600 {
        let img = &images[i % images.len()];
        let mut bad = img.clone();
        match rnd(4) {
            0 => {
                for _ in 0..1 + rnd(8) {
                    let at = rnd(bad.len());
                    bad[at] = rnd(256) as u8;
                }
            }
            1 => {
                let at = rnd(bad.len());
                let n = 1 + rnd(100);
                bad.splice(at..at, std::iter::repeat_n(rnd(256) as u8, n));
            }
            2 => {
                let at = rnd(bad.len());
                let n = (1 + rnd(200)).min(bad.len() - at);
                bad.drain(at..at + n);
            }
            _ => {
                // Copy one region of the image over another (frame-shaped garbage).
                let (a, b) = (rnd(bad.len()), rnd(bad.len()));
                let n = (1 + rnd(300)).min(bad.len() - a.max(b));
                let src = img[a..a + n].to_vec();
                bad[b..b + n].copy_from_slice(&src);
            }
        }
        if bad == *img {
            continue;
        }
        if let Err(e) = all_reject(&bad) {
            panic!("mutation {i} accepted: {e}");
        }
    }
}

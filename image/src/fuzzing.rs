//! The body of the fuzz target `read_image` (image/fuzz), kept in the crate so that the
//! stable test suite runs the very same code over the committed corpus and over mutated
//! images (tests/fuzz_regression.rs): a reader change that panics on a known input fails CI.

use crate::{inspect, verify_stream, Image, StreamReader};

/// Arbitrary bytes through every reader: random access (open, verify, chunk data, page
/// lookup, inspect) and the stream reader. Must never panic.
pub fn read_image(data: &[u8]) {
    if let Ok(img) = Image::from_bytes(data.to_vec()) {
        let _ = img.verify();
        let _ = img.corrupt_chunks();
        let report = inspect::report(&img);
        let _ = report.to_string();
        let _ = serde_json::to_string(&report);
        for c in img.chunks() {
            let _ = img.chunk_data(c);
            let _ = img.raw_data_offset(c);
            let _ = img.find_page(c.space, c.space_id, c.vaddr_start);
        }
    }
    if let Ok(mut s) = StreamReader::new(data) {
        while let Ok(Some(_)) = s.next_record() {}
    }
    let _ = verify_stream(data);
}

/// Offsets of the frame headers of `img`, walked by their lengths from the file header on,
/// as far as they lead (a hostile length ends the walk).
pub fn frame_offsets(img: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut at = crate::frame::FILE_HEADER_LEN;
    while img.len().saturating_sub(at) >= crate::frame::FRAME_HEADER_LEN {
        out.push(at);
        let mut len = [0u8; 8];
        len.copy_from_slice(&img[at + 16..at + 24]);
        let next = usize::try_from(u64::from_le_bytes(len))
            .ok()
            .and_then(|l| (at + crate::frame::FRAME_HEADER_LEN).checked_add(l));
        match next {
            Some(n) if n <= img.len() => at = n,
            _ => break,
        }
    }
    out
}

/// Deterministic mutations of an image, each named: truncations at (and just after) every
/// frame boundary, one flipped bit every `len / 200` bytes, each frame's length field set
/// huge, zero or off by a page, END pointing nowhere, bytes after END. Inputs for the fuzz
/// targets' regression tests (which must not panic on any of them).
pub fn mutations(img: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let frames = frame_offsets(img);
    for &at in &frames {
        for cut in [at, at + 1, at + 63] {
            if cut < img.len() {
                out.push((format!("truncated at {cut}"), img[..cut].to_vec()));
            }
        }
    }
    let stride = (img.len() / 200).max(1);
    for i in (0..img.len()).step_by(stride) {
        let mut m = img.to_vec();
        m[i] ^= 1 << (i % 8);
        out.push((format!("bit {} of byte {i} flipped", i % 8), m));
    }
    for &at in &frames {
        let mut len = [0u8; 8];
        len.copy_from_slice(&img[at + 16..at + 24]);
        let len = u64::from_le_bytes(len);
        for huge in [
            u64::MAX,
            1 << 40,
            1 << 32,
            len + 4096,
            len.wrapping_sub(1),
            0,
        ] {
            let mut m = img.to_vec();
            m[at + 16..at + 24].copy_from_slice(&huge.to_le_bytes());
            out.push((format!("frame at {at}: length {huge}"), m));
        }
    }
    if img.len() >= 32 {
        // END's payload: index offset, frame count, 16 zero bytes.
        let end = img.len() - 32;
        for (field, at) in [("index offset", end), ("frame count", end + 8)] {
            let mut m = img.to_vec();
            m[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
            out.push((format!("END {field} huge"), m));
        }
    }
    let mut m = img.to_vec();
    m.extend_from_slice(&[0x5a; 100]);
    out.push(("bytes after END".into(), m));
    out.push(("the image twice".into(), [img, img].concat()));
    out
}

/// Fewer inputs than this in a committed corpus means it was lost.
pub const MIN_CORPUS: usize = 20;

/// Every file of a corpus directory with its bytes, sorted by name; an error names the
/// directory (missing, unreadable, or holding fewer than [`MIN_CORPUS`] files).
pub fn corpus(dir: &std::path::Path) -> Result<Vec<(std::path::PathBuf, Vec<u8>)>, String> {
    let read = || -> std::io::Result<Vec<(std::path::PathBuf, Vec<u8>)>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let bytes = std::fs::read(&path)?;
            files.push((path, bytes));
        }
        files.sort();
        Ok(files)
    };
    let files = read().map_err(|e| format!("corpus {}: {e}", dir.display()))?;
    if files.len() < MIN_CORPUS {
        return Err(format!(
            "corpus {} holds {} inputs, fewer than {MIN_CORPUS}: it was lost",
            dir.display(),
            files.len()
        ));
    }
    Ok(files)
}

//! The body of the fuzz target `validate_image` (restore/fuzz), kept in the crate so that the
//! stable test suite runs the very same code over the committed corpus and over mutated
//! images (tests/fuzz_regression.rs): a validation change that panics on a known input fails
//! CI.
//!
//! A hostile image is one whose author computed its hashes: hashes catch damage, not intent.
//! [`validate_image`] re-hashes whatever it is given (the file header's check, and each
//! frame's payload hash and header check, walking the frames by their lengths) so that
//! mutations reach what lies behind the hashes: the records' decoding (from a map and from a
//! stream), the image crate's structure checks, and this crate's checks of the processes and
//! the VM that run before restore touches anything.

use crate::{validate, vm, Options};
use stasis_image::frame::{FILE_HEADER_LEN, FRAME_HEADER_LEN};
use stasis_image::{verify_stream, Image, StreamReader};

/// Bytes a header's check value covers (the first 56).
const CHECKED: usize = 56;

fn check(bytes: &mut [u8], at: usize) {
    let h = blake3::hash(&bytes[at..at + CHECKED]);
    bytes[at + CHECKED..at + CHECKED + 8].copy_from_slice(&h.as_bytes()[..8]);
}

/// Makes every hash in `b` right, as far as its frames can be walked.
pub fn rehash(b: &mut [u8]) {
    if b.len() < FILE_HEADER_LEN {
        return;
    }
    check(b, 0);
    let mut at = FILE_HEADER_LEN;
    while b.len() - at >= FRAME_HEADER_LEN {
        let mut len = [0u8; 8];
        len.copy_from_slice(&b[at + 16..at + 24]);
        let len = u64::from_le_bytes(len);
        let start = at + FRAME_HEADER_LEN;
        let Some(end) = usize::try_from(len).ok().and_then(|l| start.checked_add(l)) else {
            break;
        };
        if end > b.len() {
            break;
        }
        let h = blake3::hash(&b[start..end]);
        b[at + 24..at + 56].copy_from_slice(h.as_bytes());
        check(b, at);
        at = end;
    }
}

/// Re-hashes `data` and runs every reader and every validation restore does before it
/// changes anything. Must never panic.
pub fn validate_image(data: &[u8]) {
    let mut bytes = data.to_vec();
    rehash(&mut bytes);
    if let Ok(mut s) = StreamReader::new(&bytes[..]) {
        while let Ok(Some(_)) = s.next_record() {}
    }
    let _ = verify_stream(&bytes[..]);
    let Ok(img) = Image::from_bytes(bytes) else {
        return;
    };
    let _ = img.verify_structure();
    for c in img.chunks() {
        let _ = img.verify_chunk(c);
        let _ = img.chunk_data(c);
        let _ = img.find_page(c.space, c.space_id, c.vaddr_start);
    }
    let _ = stasis_image::inspect::report(&img).to_string();
    if let Some(v) = vm::vm_of(&img) {
        let _ = vm::snapshot_of(v);
    }
    let _ = validate::security(&img);
    let opts = Options::default();
    if let Ok(procs) = validate::processes(&img) {
        let ghosts = validate::ghost_files(&procs);
        for p in &procs {
            let _ = validate::process(&img, p, &ghosts, &opts);
        }
        let _ = validate::unix_pairs(&procs, &opts);
    }
}

//! The two fuzz targets' bodies (`stasis_image::fuzzing::read_image`,
//! `stasis_restore::fuzzing::validate_image`) run on the stable toolchain inside the normal
//! test run: over both committed corpora (small hostile inputs) and over deterministic
//! mutations of an image a real checkpoint writes here (truncations at every frame boundary,
//! bit flips at a fixed stride, length fields set huge). None may panic. The real image is
//! written to a scratch directory and removed; it is never committed.

mod common;

use common::*;
use std::path::{Path, PathBuf};

fn corpus(dir: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    stasis_image::fuzzing::corpus(&dir).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs both targets on `bytes`; a panic names the input.
fn both_targets(what: &str, bytes: &[u8]) {
    let ran = std::panic::catch_unwind(|| {
        stasis_image::fuzzing::read_image(bytes);
        stasis_restore::fuzzing::validate_image(bytes);
    });
    assert!(ran.is_ok(), "a fuzz target panicked on {what}");
}

#[test]
fn both_fuzz_targets_survive_both_corpora() {
    for dir in [
        "image/fuzz/corpus/read_image",
        "restore/fuzz/corpus/validate_image",
    ] {
        for (f, bytes) in corpus(dir) {
            both_targets(&f.display().to_string(), &bytes);
        }
    }
}

#[test]
fn both_fuzz_targets_survive_mutations_of_a_real_image() {
    let (_, real) = sleeper_image("fuzzreg");
    // The unmutated image passes every check the targets make (so the mutations start from
    // something that goes all the way through).
    stasis_image::Image::from_bytes(real.clone())
        .and_then(|i| i.verify())
        .expect("the real image verifies");
    both_targets("the real image", &real);
    let mutations = stasis_image::fuzzing::mutations(&real);
    assert!(mutations.len() > 200, "only {} mutations", mutations.len());
    for (what, m) in &mutations {
        both_targets(what, m);
    }
}

//! A hostile image is one whose author computed its hashes: hashes catch damage, not intent.
//! The target re-hashes whatever the fuzzer made, then runs every reader and every check
//! restore makes before it touches anything. Any panic is a bug. The body lives in the crate
//! (`stasis_restore::fuzzing`) so that the stable test suite runs it over the corpus
//! (corpus/validate_image) too. Seed it with real images (see README).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| stasis_restore::fuzzing::validate_image(data));

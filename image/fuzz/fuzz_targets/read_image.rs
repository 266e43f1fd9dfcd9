//! Arbitrary bytes through every reader: random access (open, verify, chunk data, page lookup,
//! inspect) and the stream reader. Any panic is a bug. The body lives in the crate
//! (`stasis_image::fuzzing`) so that the stable test suite runs it over the corpus
//! (corpus/read_image) too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| stasis_image::fuzzing::read_image(data));

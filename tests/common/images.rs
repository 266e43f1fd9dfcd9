//! Real images for tests that then take them apart: written by a checkpoint here, read into
//! memory, the file removed (real images are never kept or committed).

use super::{scratch, start, stasis_ok};
use std::path::PathBuf;

/// A scratch directory (see [`scratch`]) removed when dropped, also when the test fails.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new(test: &str) -> ScratchDir {
        ScratchDir(scratch(test))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Checkpoints (and so kills) a fresh `wl-sleep`, reaps it, and returns its PID (free again)
/// and the image's bytes.
pub fn sleeper_image(test: &str) -> (i32, Vec<u8>) {
    let dir = ScratchDir::new(test);
    let mut wl = start("wl-sleep", &[]);
    let img = dir.0.join("real.img");
    stasis_ok(&[
        "checkpoint",
        &wl.pid.to_string(),
        "-o",
        img.to_str().expect("utf8"),
    ]);
    wl.child.wait().expect("reap the original");
    let bytes = std::fs::read(&img).expect("read the image");
    (wl.pid, bytes)
}

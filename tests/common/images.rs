//! Real images for tests that then take them apart: written by a checkpoint here, read into
//! memory, the file removed (real images are never kept or committed).

use super::{scratch, start, stasis_ok};

/// Checkpoints (and so kills) a fresh `wl-sleep`, reaps it, and returns its PID (free again)
/// and the image's bytes.
pub fn sleeper_image(test: &str) -> (i32, Vec<u8>) {
    let dir = scratch(test);
    let mut wl = start("wl-sleep", &[]);
    let img = dir.join("real.img");
    stasis_ok(&[
        "checkpoint",
        &wl.pid.to_string(),
        "-o",
        img.to_str().expect("utf8"),
    ]);
    wl.child.wait().expect("reap the original");
    let bytes = std::fs::read(&img).expect("read the image");
    let _ = std::fs::remove_dir_all(&dir);
    (wl.pid, bytes)
}

//! What stasis says about bad and missing images: `image inspect` checks what it shows,
//! `image verify` calls a truncated file truncated, `restore` gives one message naming the
//! file and the reason, a missing file is a failure (1), not a bad image (3), and
//! `image verify --json` answers in JSON also when the image is bad.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FAILED: i32 = 1;
const BAD_IMAGE: i32 = 3;

/// A real image (of wl-sleep, killed), written once for the tests of this file.
fn good_image() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| sleeper_image("imgerr-good").1)
}

/// A scratch file holding `bytes`; removed with its directory when dropped.
struct ImageFile {
    _dir: ScratchDir,
    path: PathBuf,
}

impl ImageFile {
    fn new(test: &str, bytes: &[u8]) -> ImageFile {
        let dir = ScratchDir::new(test);
        let path = dir.0.join("x.img");
        std::fs::write(&path, bytes).expect("write the image");
        ImageFile { _dir: dir, path }
    }

    fn arg(&self) -> &str {
        self.path.to_str().expect("utf8")
    }
}

/// The offset of a byte in the first chunk's page data (from `image inspect --json`).
fn page_byte(img: &ImageFile) -> usize {
    let out = stasis_ok(&["image", "inspect", "--json", img.arg()]);
    let rep: Value = serde_json::from_str(&out).expect("inspect json");
    let chunk = rep["chunks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["stored_len"].as_u64() > Some(0)))
        .expect("a chunk with data")
        .clone();
    chunk["data_offset"].as_u64().expect("data offset") as usize + 100
}

fn flipped(bytes: &[u8], at: usize) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v[at] ^= 0x40;
    v
}

#[test]
fn inspect_names_corrupt_chunks_and_exits_3() {
    let good = ImageFile::new("imgerr-inspect-good", good_image());
    let at = page_byte(&good);
    let out = run_stasis(&["image", "inspect", "--json", good.arg()]);
    assert!(out.status.success());
    let rep: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(rep["corrupt"], serde_json::json!([]), "a good image");

    let bad = ImageFile::new("imgerr-inspect-bad", &flipped(good_image(), at));
    let out = run_stasis(&["image", "inspect", bad.arg()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(BAD_IMAGE), "{err}");
    assert!(
        err.contains("PAGE_DATA") && err.contains("hash mismatch") && err.contains(bad.arg()),
        "the corrupt chunk must be named: {err}"
    );
    assert!(!out.stdout.is_empty(), "what can be read is still shown");
    let out = run_stasis(&["image", "inspect", "--json", bad.arg()]);
    assert_eq!(out.status.code(), Some(BAD_IMAGE));
    let rep: Value = serde_json::from_slice(&out.stdout).expect("json of a corrupt image");
    let corrupt = rep["corrupt"].as_array().expect("corrupt list");
    assert_eq!(corrupt.len(), 1, "{corrupt:?}");
}

#[test]
fn verify_calls_a_truncated_file_truncated() {
    let good = good_image();
    let frames = stasis_image::fuzzing::frame_offsets(good);
    let mut cuts: Vec<usize> = frames.iter().flat_map(|&f| [f, f + 10]).collect();
    cuts.extend([good.len() / 2, good.len() - 1, good.len() - 100, 64 + 96]);
    for cut in cuts {
        if cut >= good.len() {
            continue;
        }
        let img = ImageFile::new("imgerr-trunc", &good[..cut]);
        let out = run_stasis(&["image", "verify", img.arg()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(BAD_IMAGE), "cut at {cut}: {err}");
        assert!(
            err.contains("truncated") && !err.contains("bad magic"),
            "cut at {cut} of {}: {err}",
            good.len()
        );
    }
}

#[test]
fn restore_gives_one_message_naming_the_file_and_the_reason() {
    let good = ImageFile::new("imgerr-restore-good", good_image());
    let at = page_byte(&good);
    drop(good);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("hash mismatch", flipped(good_image(), at)),
        ("truncated", good_image()[..good_image().len() / 2].to_vec()),
    ];
    for (reason, bytes) in cases {
        let img = ImageFile::new("imgerr-restore", &bytes);
        let out = run_stasis(&["restore", img.arg()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(BAD_IMAGE), "{err}");
        assert_eq!(err.lines().count(), 1, "one message: {err}");
        assert!(
            err.contains(&format!("image {} is invalid", img.arg())),
            "the file must be named: {err}"
        );
        assert_eq!(err.matches(reason).count(), 1, "said once: {err}");
        assert_eq!(err.matches("invalid").count(), 1, "said once: {err}");
    }
}

#[test]
fn a_missing_file_is_a_failure_not_a_bad_image() {
    let path = "/nonexistent-stasis-dir/missing.img";
    for args in [
        vec!["restore", path],
        vec!["image", "verify", path],
        vec!["image", "inspect", path],
    ] {
        let out = run_stasis(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(FAILED), "{args:?}: {err}");
        assert!(err.contains(path) && err.contains("No such file"), "{err}");
    }
    assert!(!Path::new(path).exists());
}

#[test]
fn verify_json_answers_in_json_for_a_bad_image() {
    let good = ImageFile::new("imgerr-json-good", good_image());
    let out = run_stasis(&["image", "verify", "--json", good.arg()]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["frames"].as_u64() > Some(3), "{v}");

    let bad = ImageFile::new("imgerr-json-bad", &good_image()[..good_image().len() - 7]);
    let out = run_stasis(&["image", "verify", "--json", bad.arg()]);
    assert_eq!(out.status.code(), Some(BAD_IMAGE));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json of a bad image");
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["file"], bad.arg(), "{v}");
    let e = v["error"].as_str().expect("error text");
    assert!(e.contains("truncated"), "{v}");

    let out = run_stasis(&["image", "verify", "--json", "/nonexistent-stasis.img"]);
    assert_eq!(out.status.code(), Some(FAILED));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json of a missing file");
    assert_eq!(v["ok"], false, "{v}");
}

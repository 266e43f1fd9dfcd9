//! The tests' own hygiene: what tests/common makes (scratch directories) is gone when the
//! test process has exited, also after a failing test, and the removal never reaches
//! through a mount point.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Set for the copy of this binary that plays the failing test.
const CHILD: &str = "STASIS_CLEANUP_CHILD";

/// Run only inside the child process: makes a scratch directory, prints its path, and fails.
#[test]
fn child_makes_a_scratch_dir_and_fails() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let dir = common::scratch("cleanup-child");
    std::fs::write(dir.join("data"), vec![1u8; 1 << 20]).expect("write");
    println!("SCRATCH {}", dir.display());
    panic!("failing on purpose");
}

#[test]
fn scratch_dirs_are_removed_when_a_failing_test_process_exits() {
    let out = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "child_makes_a_scratch_dir_and_fails",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(101),
        "the child must fail: {stdout}"
    );
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SCRATCH "))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no scratch dir printed: {stdout}"));
    assert!(dir.starts_with(std::env::temp_dir()), "{dir:?}");
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

/// A bind mount inside a scratch directory is left alone, and what it shows is kept.
#[test]
fn removal_does_not_reach_through_a_mount_point() {
    let dir = common::scratch("cleanup-mount");
    let (tree, keep) = (dir.join("tree"), dir.join("keep"));
    std::fs::create_dir_all(tree.join("mnt")).expect("mkdir");
    std::fs::create_dir_all(&keep).expect("mkdir");
    std::fs::write(keep.join("precious"), "x").expect("write");
    std::fs::write(tree.join("junk"), "x").expect("write");
    let mounted = Command::new("mount")
        .arg("--bind")
        .arg(&keep)
        .arg(tree.join("mnt"))
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        common::skip(
            module_path!(),
            "cannot bind-mount (needs root and mount(8))",
        );
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let guard = Unmount(tree.join("mnt"));
    common::cleanup::remove_tree_one_fs(&tree);
    assert!(!tree.join("junk").exists(), "the tree itself is removed");
    assert!(
        Path::new(&keep.join("precious")).exists(),
        "a file seen through the bind mount was removed"
    );
    assert!(tree.join("mnt/precious").exists(), "the mount is left");
    drop(guard);
}

//! What a test process leaves on the machine is removed when it exits, also when tests
//! failed: the test harness ends through exit(3) either way (it returns from main, or calls
//! `process::exit(101)`), so an atexit(3) handler runs after every test of the binary.
//!
//! - Scratch directories ([`super::scratch`]) and other paths given to [`remove_at_exit`]
//!   are removed, without crossing into another file system (a bind mount left inside one
//!   is left alone, never emptied).
//! - The shared things the product makes and keeps for every later container, the `stasis`
//!   cgroup parents (one per hierarchy) and the `stasis0` bridge, are removed if they did not
//!   exist when this process first ran stasis (see [`register`]) and nothing uses them any
//!   more: a cgroup parent only while it is empty (rmdir fails on one with a child cgroup in
//!   it), the bridge only while no port (a container's veth) is joined to it.
//!
//! The `inet stasis` nft table is the product's to remove (with its last lock);
//! scripts/test reports one left behind.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, Once, OnceLock};

/// The bridge `--net bridge` containers are joined to by default.
pub const BRIDGE: &str = "stasis0";

static PATHS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// What existed before this process ran stasis for the first time.
struct Before {
    bridge: bool,
    parents: Vec<PathBuf>,
}

static BEFORE: OnceLock<Before> = OnceLock::new();

/// Notes what exists now (once per process) and arranges for the cleanup at exit. Called by
/// every helper that runs stasis or makes something (stasis(), init(), scratch()), so it
/// runs before this process makes anything.
pub fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = BEFORE.set(Before {
            bridge: bridge_exists(),
            parents: cgroup_parents()
                .into_iter()
                .filter(|p| p.exists())
                .collect(),
        });
        // SAFETY: atexit(3) with a plain extern "C" function of no arguments that never
        // unwinds (it catches every panic).
        unsafe { libc::atexit(at_exit) };
    });
}

/// Removes `path` (a directory tree or a file) when this process exits.
pub fn remove_at_exit(path: &Path) {
    register();
    let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    if !paths.iter().any(|p| p == path) {
        paths.push(path.to_path_buf());
    }
}

extern "C" fn at_exit() {
    let _ = std::panic::catch_unwind(cleanup_now);
}

/// Everything [`at_exit`] does, callable early (a test that wants to check it).
pub fn cleanup_now() {
    let paths = std::mem::take(&mut *PATHS.lock().unwrap_or_else(|e| e.into_inner()));
    for p in paths {
        remove_tree_one_fs(&p);
    }
    let Some(before) = BEFORE.get() else {
        return;
    };
    for p in cgroup_parents() {
        if !before.parents.contains(&p) {
            // Fails (EBUSY) while a cgroup is left below it: then it is still in use.
            let _ = std::fs::remove_dir(&p);
        }
    }
    if !before.bridge && bridge_exists() && bridge_ports().is_some_and(|n| n == 0) {
        let _ = quiet("ip", &["link", "del", BRIDGE]);
    }
}

/// `stasis` below the root of every cgroup hierarchy mounted here.
pub fn cgroup_parents() -> Vec<PathBuf> {
    cgroup_roots()
        .into_iter()
        .map(|r| r.join(super::CGROUP_PARENT))
        .collect()
}

/// The root of every cgroup hierarchy mounted here.
pub fn cgroup_roots() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount = left.split_whitespace().nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(mount))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn quiet(program: &str, args: &[&str]) -> Option<std::process::Output> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
}

/// Whether the bridge exists.
pub fn bridge_exists() -> bool {
    Path::new("/sys/class/net").join(BRIDGE).exists()
}

/// How many interfaces are joined to the bridge (None if that cannot be read).
pub fn bridge_ports() -> Option<usize> {
    let dir = Path::new("/sys/class/net").join(BRIDGE).join("brif");
    std::fs::read_dir(dir).ok().map(|d| d.count())
}

/// Every mount point of this mount namespace.
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .collect()
}

/// rm -r --one-file-system: symbolic links are removed, not followed, and a mount point (a
/// bind mount of the same file system too) is neither entered nor removed.
pub fn remove_tree_one_fs(path: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() {
        let _ = std::fs::remove_file(path);
        return;
    }
    let mounts = mount_points();
    if mounts.iter().any(|m| m == path) {
        return;
    }
    remove_dir_on(path, meta.dev(), &mounts);
}

fn remove_dir_on(dir: &Path, dev: u64, mounts: &[PathBuf]) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            let mounted = || mounts.contains(&p);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() && m.dev() == dev && !mounted() => {
                    remove_dir_on(&p, dev, mounts)
                }
                Ok(m) if m.is_dir() => {} // a mount point: left as it is
                Ok(_) => {
                    let _ = std::fs::remove_file(&p);
                }
                Err(_) => {}
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

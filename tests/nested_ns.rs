//! A process of a tree in namespaces or cgroups other than its root's. Restore creates every
//! process in the namespaces of the root, so a child with its own mount, network, UTS or IPC
//! namespace is refused at checkpoint, by name, before anything changes (it used to come back
//! inside its parent's, its isolation silently gone). Cgroups are restored: every process
//! goes back into the cgroups it was in (cgroup2 and v1), and a restore whose cgroup does not
//! exist is refused before anything is created, naming it.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

/// `sh` (the tree's root) with one child, `unshare FLAG sleep 1000` (which execs sleep in a
/// namespace of its own); returns the root and the sleeper's PID.
fn tree_with(unshare_flag: &str, dir: &Path) -> (Child, i32) {
    let (child, line) = start_ready(
        "unshare \"$0\" sleep 1000 & echo ready $!; read x; kill $!",
        &[unshare_flag.as_ref()],
        dir,
    );
    let sleeper = line
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("ready PID");
    // Running in its namespace once unshare has become sleep.
    assert!(
        wait_for_tree(child.id() as i32, &["sleep"], 1),
        "the sleeper did not start"
    );
    (child, sleeper)
}

fn refused(flag: &str, what: &str, kind: &str) {
    if !have("unshare") {
        return;
    }
    init();
    let dir = scratch(&format!("nested{flag}"));
    let (child, sleeper) = tree_with(flag, &dir);
    let root = child.id() as i32;
    let _guard = (KillOnDrop(root), KillOnDrop(sleeper));
    let img = dir.join("refused.img");
    let err = stasis_fails(
        &[
            "checkpoint",
            &root.to_string(),
            "-o",
            img.to_str().expect("utf8"),
        ],
        4,
        &format!("{what} namespace of its own"),
    );
    assert!(
        err.contains(&format!("process {sleeper} (sleep)")) && err.contains(&format!("{kind}:[")),
        "the refusal must name the process and the namespace: {err}"
    );
    assert!(!img.exists(), "a refused checkpoint leaves no image");
    assert!(running_untraced(root) && running_untraced(sleeper));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn child_in_its_own_mount_namespace_is_refused() {
    refused("--mount", "mount", "mnt");
}

#[test]
fn child_in_its_own_network_namespace_is_refused() {
    refused("--net", "network", "net");
}

#[test]
fn child_in_its_own_uts_namespace_is_refused() {
    refused("--uts", "UTS (host name)", "uts");
}

#[test]
fn child_in_its_own_ipc_namespace_is_refused() {
    refused("--ipc", "IPC", "ipc");
}

/// A tree whose root itself has a namespace of its own (and is no container or pid
/// namespace init) would come back in the restorer's: refused too.
#[test]
fn root_in_its_own_network_namespace_is_refused() {
    if !have("unshare") {
        return;
    }
    init();
    let dir = scratch("nested-root-net");
    let (child, _) = start_ready("echo ready; exec unshare --net sleep 1000", &[], &dir);
    let root = child.id() as i32;
    let _guard = KillOnDrop(root);
    // The root is sleep in its own network namespace once unshare has exec'd it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{root}/comm")).unwrap_or_default() != "sleep\n" {
        assert!(std::time::Instant::now() < deadline, "sleep did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let img = dir.join("root.img");
    let err = stasis_fails(
        &[
            "checkpoint",
            &root.to_string(),
            "-o",
            img.to_str().expect("utf8"),
        ],
        4,
        "network namespace of its own",
    );
    assert!(err.contains(&format!("process {root} (sleep)")), "{err}");
    assert!(!img.exists() && running_untraced(root));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A cgroup of this test in one hierarchy (cgroup2 or a v1 one), removed when dropped.
struct TestCgroup {
    dir: PathBuf,
    /// The path as /proc/PID/cgroup shows it.
    rel: String,
}

impl TestCgroup {
    fn new(root: &str, name: &str) -> Option<TestCgroup> {
        let rel = format!("/stasis-test-{name}-{}", std::process::id());
        let dir = PathBuf::from(root).join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).ok()?;
        Some(TestCgroup { dir, rel })
    }

    fn join(&self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("join cgroup");
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Emptied by the test's processes dying first (guards declared after this one).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Lines of /proc/PID/cgroup.
fn cgroup_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default()
}

/// The cgroup2 mount and a v1 hierarchy's mount (pids) where this host has them; a test
/// cgroup in each.
fn test_cgroups(name: &str) -> Vec<TestCgroup> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in mounts.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mp = left.split_whitespace().nth(4).unwrap_or_default();
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or_default();
        let options = r.nth(1).unwrap_or_default();
        let v1_pids = fstype == "cgroup" && options.split(',').any(|o| o == "pids");
        if fstype == "cgroup2" || v1_pids {
            if let Some(c) = TestCgroup::new(mp, &format!("{name}{}", out.len())) {
                out.push(c);
            }
        }
    }
    out
}

/// `sh` (the root) with a child `sleep 1000`; the sleeper is moved into `cgroups`. Neither
/// keeps the pipe of its first line open (a restore's output then ends when stasis does).
fn tree_in(cgroups: &[TestCgroup], dir: &Path) -> (Child, i32) {
    let (child, line) = start_ready(
        "sleep 1000 >/dev/null & echo ready $!; exec >/dev/null; wait",
        &[],
        dir,
    );
    let sleeper: i32 = line
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("ready PID");
    for c in cgroups {
        c.join(sleeper);
    }
    (child, sleeper)
}

fn checkpoint_kill(mut child: Child, img: &Path) {
    let root = child.id() as i32;
    let tree = descendants(root);
    stasis_ok(&[
        "checkpoint",
        &root.to_string(),
        "-o",
        img.to_str().expect("utf8"),
    ]);
    child.wait().expect("reap original");
    reap_orphans(&tree);
}

#[test]
fn processes_come_back_in_their_cgroups() {
    init();
    let cgroups = test_cgroups("back");
    if cgroups.is_empty() {
        common::skip(
            "nested_ns cgroups",
            "no cgroup2 or v1 pids hierarchy to make a cgroup in",
        );
        return;
    }
    let dir = scratch("nested-cgroups");
    let (child, sleeper) = tree_in(&cgroups, &dir);
    let root = child.id() as i32;
    let _guard = (KillOnDrop(root), KillOnDrop(sleeper));
    let before = cgroup_of(sleeper);
    for c in &cgroups {
        assert!(before.contains(&format!(":{}\n", c.rel)), "{before}");
    }
    let img = dir.join("cg.img");
    checkpoint_kill(child, &img);
    let (mut r, _pipes) = restore(&img, true);
    assert!(r.wait().expect("restore").success(), "restore failed");
    let after = cgroup_of(sleeper);
    assert_eq!(after, before, "the sleeper must be back in its cgroups");
    assert_eq!(
        cgroup_of(root),
        cgroup_of(std::process::id() as i32),
        "the root must be back in its own (this test's) cgroups"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_cgroup_refuses_the_restore_before_anything_is_created() {
    init();
    let mut cgroups = test_cgroups("gone");
    if cgroups.is_empty() {
        common::skip(
            "nested_ns cgroups",
            "no cgroup2 or v1 pids hierarchy to make a cgroup in",
        );
        return;
    }
    let dir = scratch("nested-cgroup-gone");
    let (child, sleeper) = tree_in(&cgroups, &dir);
    let root = child.id() as i32;
    let _guard = (KillOnDrop(root), KillOnDrop(sleeper));
    let img = dir.join("gone.img");
    checkpoint_kill(child, &img);
    let gone = cgroups.remove(0);
    let (gone_dir, gone_rel) = (gone.dir.clone(), gone.rel.clone());
    drop(gone);
    assert!(
        !gone_dir.exists(),
        "could not remove {}",
        gone_dir.display()
    );
    let err = stasis_fails(
        &["restore", img.to_str().expect("utf8"), "--detach"],
        4,
        &gone_rel,
    );
    assert!(
        err.contains(&format!("process {sleeper} (sleep)")) && err.contains("does not exist"),
        "the refusal must name the process and its cgroup: {err}"
    );
    for p in [root, sleeper] {
        assert!(
            !Path::new(&format!("/proc/{p}")).exists(),
            "a refused restore must create nothing (PID {p} exists)"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

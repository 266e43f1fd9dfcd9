//! Whole pid namespaces: a tree whose root is PID 1 of its own pid namespace (as a
//! container's init is) is checkpointed with the PIDs it sees there and restored into a fresh
//! pid namespace, where it keeps them all and cannot collide with the host's PIDs; the new
//! namespace can join other namespaces and cgroups first, and the image's paths can be
//! found under another root.
//!
//! The trees are `unshare --pid --fork wl-pidns`: R (PID 1) → A (2, own group) → A1 (3),
//! R → B (4, own session) → B1 (5); see tests/workloads/src/bin/wl-pidns.rs. Every test kills
//! and reaps only what it started, by PID.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

/// (ns pid, ns ppid, ns pgid, ns sid) of a process.
type Ids = (i32, i32, i32, i32);

/// The [`Ids`] of every process of a wl-pidns tree; the root's group and session lie
/// outside its namespace (0).
const LAYOUT: [Ids; 5] = [
    (1, 0, 0, 0),
    (2, 1, 2, 0),
    (3, 2, 2, 0),
    (4, 1, 4, 4),
    (5, 4, 4, 4),
];

/// A restored tree whose root is our child (or was reparented to us): killed and reaped
/// when dropped unless [`Restored::finish`] ended it. Its PID cannot be reused before we
/// reap it, so killing it by PID is safe.
struct Restored {
    root: i32,
    pipes: Pipes,
    reaped: bool,
}

impl Restored {
    /// Sends `check` (the tree ends) and reaps the root, which must exit 0.
    fn finish(mut self, what: &str) {
        self.pipes.expect_pass("check", what);
        self.reaped = true;
        let st = reap(self.root);
        assert!(
            libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
            "{what}: {st:#x}"
        );
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if !self.reaped {
            kill(self.root);
            let mut status = 0;
            // SAFETY: waitpid on our own child with a local status.
            unsafe { libc::waitpid(self.root, &mut status, 0) };
        }
    }
}

/// The last entries (the process's own view) of NSpid, NSpgid, NSsid, and PPid, of host
/// PID `pid`.
fn ns_ids(pid: i32) -> Option<Ids> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let last = |key: &str| -> Option<i32> {
        let line = status.lines().find_map(|l| l.strip_prefix(key))?;
        line.split_whitespace().last()?.parse().ok()
    };
    Some((
        last("NSpid:")?,
        last("PPid:")?,
        last("NSpgid:")?,
        last("NSsid:")?,
    ))
}

/// Host PID → (ns pid, ns ppid, ns pgid, ns sid) of `root` and its descendants, read from
/// outside (NSpid and friends).
fn layout_of(root: i32) -> (Vec<Ids>, BTreeMap<i32, i32>) {
    let hosts: Vec<i32> = std::iter::once(root).chain(descendants(root)).collect();
    let ids: Vec<(i32, Ids)> = hosts
        .iter()
        .filter_map(|&h| Some((h, ns_ids(h)?)))
        .collect();
    let ns_of: BTreeMap<i32, i32> = ids.iter().map(|(h, i)| (*h, i.0)).collect();
    let mut out: Vec<Ids> = ids
        .iter()
        .map(|(h, (pid, ppid, pgid, sid))| {
            let ppid = if *h == root {
                0
            } else {
                ns_of.get(ppid).copied().unwrap_or(-1)
            };
            (*pid, ppid, *pgid, *sid)
        })
        .collect();
    out.sort_unstable();
    (out, ns_of)
}

/// Asserts the tree rooted at host PID `root` has exactly the wl-pidns layout.
fn assert_layout(root: i32, what: &str) {
    let (got, _) = layout_of(root);
    assert_eq!(
        got,
        LAYOUT.to_vec(),
        "{what}: the tree's pids as seen from outside"
    );
}

/// The host PID of the process of `root`'s tree that is `ns_pid` in it.
fn host_of(root: i32, ns_pid: i32) -> i32 {
    let (_, ns_of) = layout_of(root);
    ns_of
        .iter()
        .find_map(|(h, n)| (*n == ns_pid).then_some(*h))
        .unwrap_or_else(|| panic!("no process {ns_pid} in the tree of {root}"))
}

/// Starts `unshare --pid --fork wl-pidns` and finds its root from outside.
fn start_ns(tag: &str) -> NsTree {
    start_in_ns("wl-pidns", &[], tag)
}

/// Sends `verify` and returns the INFO line, asserting the answer is PASS.
fn verify_info(pipes: &mut Pipes, what: &str) -> String {
    pipes.send("verify");
    let info = pipes.expect_line(&["INFO ", "PASS ", "FAIL "]);
    let answer = pipes.expect_line(&["PASS ", "FAIL "]);
    assert!(answer.starts_with("PASS "), "{what}: {answer} ({info})");
    info
}

/// `stasis restore --detach`: the root it printed (as we see it; reparented to us).
fn restore_detached(img: &Path) -> Restored {
    let (mut r, mut p) = restore(img, true);
    let line = p.expect_line(&[""]);
    let root: i32 = line.trim().parse().expect("the restored root's pid");
    assert!(
        r.wait().expect("stasis restore").success(),
        "restore failed"
    );
    Restored {
        root,
        pipes: p,
        reaped: false,
    }
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two c_ints for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 just returned these two fds; we own them.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Restores `img` in this process with `opts`, the restored stdin and stdout new pipes.
fn restore_here(img: &Path, mut opts: stasis_restore::Options) -> Restored {
    let (cmd_r, cmd_w) = pipe();
    let (out_r, out_w) = pipe();
    opts.inherit_fds.insert(0, cmd_r.as_raw_fd());
    opts.inherit_fds.insert(1, out_w.as_raw_fd());
    let image = stasis_image::Image::open(img).expect("open image");
    let stats = stasis_restore::restore_tree(&image, &opts).expect("restore");
    assert!(stats.warnings.is_empty(), "{:?}", stats.warnings);
    Restored {
        root: stats.pid,
        pipes: Pipes {
            stdin: ChildStdin::from(cmd_w),
            stdout: BufReader::new(ChildStdout::from(out_r)),
        },
        reaped: false,
    }
}

/// Starts `program args...` with no stdio and no inherited fds.
fn spawn_quiet(program: &str, args: &[&str]) -> Child {
    clean(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// A process holding namespaces for a test: `unshare FLAGS... sleep 1000` (or a shell that
/// ends in `exec sleep 1000`), killed and reaped when dropped.
struct Holder(Child);

impl Holder {
    fn start(args: &[&str]) -> Holder {
        let child = spawn_quiet("unshare", args);
        let pid = child.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "sleep\n"
        {
            assert!(Instant::now() < deadline, "the holder never ran sleep");
            std::thread::sleep(Duration::from_millis(5));
        }
        Holder(child)
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn ns(&self, kind: &str) -> OwnedFd {
        File::open(format!("/proc/{}/ns/{kind}", self.pid()))
            .expect("open namespace")
            .into()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `stasis checkpoint PID -o IMG EXTRA...`, which must succeed.
fn checkpoint(pid: i32, img: &Path, extra: &[&str]) {
    let pid = pid.to_string();
    let mut args = vec!["checkpoint", &pid, "-o", img.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    stasis_ok(&args);
}

/// Options that only have the new pid namespace join `namespaces`.
fn joining(namespaces: Vec<OwnedFd>) -> stasis_restore::Options {
    stasis_restore::Options {
        pid_namespace: Some(stasis_restore::PidNamespace {
            join: namespaces,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Checkpoints (kill) a fresh wl-pidns tree into `dir/NAME.img` after one verify.
fn checkpointed_tree(dir: &Path, tag: &str) -> PathBuf {
    let mut t = start_ns(tag);
    verify_info(&mut t.pipes, "before checkpoint");
    let img = dir.join(format!("{tag}.img"));
    checkpoint(t.root, &img, &[]);
    drop(t);
    img
}

#[test]
fn a_whole_pid_namespace_keeps_its_pids_through_two_restores() {
    let dir = scratch("pidns-twice");
    let mut t = start_ns("twice");
    assert_layout(t.root, "original");
    let info = verify_info(&mut t.pipes, "before checkpoint");
    assert!(info.contains("ids R=1 A=2"), "{info}");
    let img1 = dir.join("1.img");
    let img1s = img1.to_str().expect("utf8");
    checkpoint(t.root, &img1, &[]);
    let st = t.unshare.wait().expect("unshare");
    assert!(!st.success(), "the original tree was killed");

    let v = inspect(&img1);
    assert_eq!(v["inventory"]["pid_namespace"], true, "{}", v["inventory"]);
    assert_eq!(v["inventory"]["root_pid"], 1);
    let mut pids: Vec<i64> = v["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter_map(|p| p["pid"].as_i64())
        .collect();
    pids.sort_unstable();
    assert_eq!(pids, vec![1, 2, 3, 4, 5], "the PIDs the tree saw");
    let text = stasis_ok(&["image", "inspect", img1s]);
    assert!(text.contains("root pid 1 (a whole pid namespace"), "{text}");

    let mut r1 = restore_detached(&img1);
    assert_layout(r1.root, "first restore");
    let info = verify_info(&mut r1.pipes, "after the first restore");
    assert!(info.contains("ids R=1 A=2 A1=3 B=4 B1=5"), "{info}");

    // The restored tree is a whole namespace again.
    let img2 = dir.join("2.img");
    checkpoint(r1.root, &img2, &[]);
    r1.reaped = true;
    reap(r1.root);
    let (mut r2, mut p2) = restore(&img2, false);
    p2.expect_pass("check", "after the second restore");
    let st = r2.wait().expect("stasis restore");
    assert!(st.success(), "the twice-restored tree ended with {st}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_copy_runs_beside_the_original_without_colliding() {
    let dir = scratch("pidns-copy");
    let mut t = start_ns("copy");
    verify_info(&mut t.pipes, "before checkpoint");
    let img = dir.join("c.img");
    checkpoint(t.root, &img, &["--leave-running"]);
    assert!(running_untraced(t.root), "the original runs on");
    let mut copy = restore_detached(&img);
    assert_ne!(copy.root, t.root);
    assert_layout(copy.root, "the copy");
    assert_layout(t.root, "the original");
    verify_info(&mut t.pipes, "the original, beside its copy");
    verify_info(&mut copy.pipes, "the copy, beside its original");
    copy.finish("the copy");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_new_namespace_joins_a_uts_namespace_held_elsewhere() {
    let dir = scratch("pidns-uts");
    let name = format!("stasis-uts-{}", std::process::id());
    let holder = Holder::start(&[
        "--uts",
        "sh",
        "-c",
        &format!("hostname {name} && exec sleep 1000"),
    ]);
    let img = checkpointed_tree(&dir, "uts");
    let mut r = restore_here(&img, joining(vec![holder.ns("uts")]));
    assert_layout(r.root, "restored into the holder's uts namespace");
    let info = verify_info(&mut r.pipes, "in the joined uts namespace");
    assert!(info.contains(&format!("uts={name}")), "{info}");
    let link = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/uts")).expect("ns link");
    for pid in std::iter::once(r.root).chain(descendants(r.root)) {
        assert_eq!(link(pid), link(holder.pid()), "process {pid}");
    }
    r.finish("in the joined uts namespace");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fresh_proc_in_a_joined_mount_namespace_shows_the_new_pid_namespace() {
    let dir = scratch("pidns-proc");
    let holder = Holder::start(&["--mount", "--propagation", "private", "sleep", "1000"]);
    let img = checkpointed_tree(&dir, "proc");
    let holder_root = PathBuf::from(format!("/proc/{}/root", holder.pid()));
    let opts = stasis_restore::Options {
        pid_namespace: Some(stasis_restore::PidNamespace {
            join: vec![holder.ns("mnt")],
            mount_proc: true,
            ..Default::default()
        }),
        root: Some(holder_root.clone()),
        ..Default::default()
    };
    let mut r = restore_here(&img, opts);
    assert_layout(r.root, "restored with its own /proc");
    let info = verify_info(&mut r.pipes, "with its own /proc");
    assert!(info.contains("proc_self=1"), "{info}");
    // That /proc is the new namespace's, seen through the holder's mount namespace; ours
    // is untouched.
    let comm = std::fs::read_to_string(holder_root.join("proc/4/comm")).expect("its /proc");
    assert_eq!(comm.trim(), "wl-pidns");
    let ours = std::fs::read_link("/proc/self").expect("our /proc");
    assert_eq!(ours, PathBuf::from(std::process::id().to_string()));
    let mnt = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("ns link");
    assert_eq!(mnt(r.root), mnt(holder.pid()));
    r.finish("with its own /proc");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A cgroup directory of this test in the first writable hierarchy (removed when dropped).
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn make(name: &str) -> Option<TestCgroup> {
        [
            "/sys/fs/cgroup/pids",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup",
        ]
        .iter()
        .map(|h| Path::new(h).join(name))
        .find(|d| std::fs::create_dir(d).is_ok() && d.join("cgroup.procs").exists())
        .map(TestCgroup)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Empty only once its last process is reaped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.0).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn the_whole_tree_is_in_the_given_cgroups() {
    let name = format!("stasis-test-pidns-{}", std::process::id());
    let Some(cg) = TestCgroup::make(&name) else {
        common::skip(
            module_path!(),
            &format!("no cgroup hierarchy to make {name} in"),
        );
        return;
    };
    let dir = scratch("pidns-cgroup");
    let img = checkpointed_tree(&dir, "cgroup");
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cg.0.join("cgroup.procs"))
        .expect("open cgroup.procs");
    let opts = stasis_restore::Options {
        pid_namespace: Some(stasis_restore::PidNamespace {
            cgroup_procs: vec![procs.into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let r = restore_here(&img, opts);
    assert_layout(r.root, "restored into a cgroup");
    let tail = format!(":/{name}");
    for pid in std::iter::once(r.root).chain(descendants(r.root)) {
        let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
        assert!(
            cgroups.lines().any(|l| l.ends_with(&tail)),
            "process {pid} is not in {}: {cgroups}",
            cg.0.display()
        );
    }
    r.finish("in its cgroup");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_process_in_a_nested_pid_namespace_is_refused_by_name() {
    init();
    // sh is PID 1 of a namespace; the inner unshare makes another inside it for sleep.
    let script = "unshare --pid --fork sleep 1000 & wait";
    let mut outer = spawn_quiet("unshare", &["--pid", "--fork", "sh", "-c", script]);
    let unshare = outer.id() as i32;
    assert!(
        wait_for_tree(unshare, &["sleep"], 1),
        "the nested sleep never ran"
    );
    // sh, the outer namespace's init.
    let sh = ns_init_below(unshare);
    let sleep = descendants(sh)
        .into_iter()
        .find(|&d| std::fs::read_to_string(format!("/proc/{d}/comm")).is_ok_and(|c| c == "sleep\n"))
        .expect("sleep");
    let err = checkpoint_refused(sh, "pidns-nested", "nested inside the tree's");
    assert!(err.contains(&format!("process {sleep} (sleep)")), "{err}");
    assert!(
        running_untraced(sh) && running_untraced(sleep),
        "the tree runs on"
    );
    kill(sh);
    let _ = outer.wait();
}

#[test]
fn a_process_of_another_namespace_that_is_not_its_init_is_refused() {
    let t = start_ns("notinit");
    let a = host_of(t.root, 2);
    let err = checkpoint_refused(a, "pidns-notinit", "not that namespace's init");
    assert!(
        err.contains(&format!("process {a} is PID 2 of a pid namespace")),
        "{err}"
    );
    assert!(running_untraced(a), "A runs on");
}

/// Asserts `stasis checkpoint PID` is refused (exit 4) mentioning `needle`, leaving no
/// image; returns its error output.
fn checkpoint_refused(pid: i32, test: &str, needle: &str) -> String {
    let dir = scratch(test);
    let out = dir.join("x.img");
    let args = [
        "checkpoint",
        &pid.to_string(),
        "-o",
        out.to_str().expect("utf8"),
    ];
    let err = stasis_fails(&args, 4, needle);
    assert!(!out.exists(), "no image is left behind");
    let _ = std::fs::remove_dir_all(&dir);
    err
}

const UNIX_LISTENER_PY: &str = r#"
import os, socket, sys
p = os.path.join(sys.argv[1], "srv.sock")
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind(p)
l.listen(2)
print("ready", flush=True)
sys.stdin.readline()
l.settimeout(20)
a, _ = l.accept()
print("unix", a.recv(10).decode(), l.getsockname() == p, flush=True)
"#;

/// A unix listener is bound to exactly its old name when the image's paths resolve under
/// a root whose path is too long for sun_path with the name under it.
#[test]
fn a_unix_socket_is_bound_under_a_root_too_long_for_sun_path() {
    use std::io::{Read, Write};
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("pidns-longroot");
    let long = dir.join("r".repeat(120));
    std::os::unix::fs::symlink("/", &long).expect("symlink");
    let sock = dir.join("srv.sock");
    assert!(
        long.join(sock.strip_prefix("/").expect("absolute"))
            .as_os_str()
            .len()
            > 108
    );
    let (child, _) = start_ready(
        "exec python3 -c \"$0\" \"$1\"",
        &[UNIX_LISTENER_PY.as_ref(), dir.as_ref()],
        &dir,
    );
    let mut child = child;
    let pid = child.id() as i32;
    let img = dir.join("u.img");
    checkpoint(pid, &img, &[]);
    child.wait().expect("reap the original");
    let opts = stasis_restore::Options {
        root: Some(long),
        ..Default::default()
    };
    let mut r = restore_here(&img, opts);
    assert_eq!(r.root, pid);
    r.pipes.send("go");
    let mut c = std::os::unix::net::UnixStream::connect(&sock).expect("connect");
    c.write_all(b"hi").expect("send");
    let mut out = String::new();
    r.pipes.stdout.read_to_string(&mut out).expect("output");
    assert_eq!(out.trim(), "unix hi True");
    r.reaped = true;
    let st = reap(r.root);
    assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0, "{st:#x}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Workloads run as PID 1 of a namespace with its own /proc (in a mount namespace of its
/// own) come back with the ids they saw, in a joined mount namespace with a fresh /proc of
/// the new pid namespace: threads and their ids (wl-threads); POSIX timers aimed at threads
/// and pending signals (wl-state); deleted files and memfds, mapped and open (wl-ghost);
/// and wl-tree's zombies, stopped child, orphan and shared anonymous memory. The shared
/// objects are mapped from fds the processes kept, since their /proc cannot show the
/// restorer.
#[test]
fn workloads_with_their_own_proc_keep_their_ids_and_state() {
    for program in ["wl-threads", "wl-state", "wl-ghost", "wl-tree"] {
        let dir = scratch(&format!("pidns-{program}"));
        let mut t = start_in_ns(program, &["--mount-proc"], program);
        t.pipes
            .expect_pass("verify", &format!("{program} before checkpoint"));
        let img = dir.join("t.img");
        checkpoint(t.root, &img, &[]);
        drop(t);
        let holder = Holder::start(&["--mount", "--propagation", "private", "sleep", "1000"]);
        let opts = stasis_restore::Options {
            pid_namespace: Some(stasis_restore::PidNamespace {
                join: vec![holder.ns("mnt")],
                mount_proc: true,
                ..Default::default()
            }),
            root: Some(PathBuf::from(format!("/proc/{}/root", holder.pid()))),
            ..Default::default()
        };
        let mut r = restore_here(&img, opts);
        let what = format!("{program} restored");
        r.pipes.expect_pass("verify", &what);
        r.finish(&what);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A restore into a new pid namespace that fails once the tree exists (its root cannot
/// enter a cgroup) kills and reaps everything it made.
#[test]
fn a_failed_restore_into_a_pid_namespace_leaves_nothing_behind() {
    let dir = scratch("pidns-fail");
    let img = checkpointed_tree(&dir, "fail");
    // The new processes are forks of this thread: they carry its name until restored.
    let me = std::fs::read_to_string("/proc/thread-self/comm").expect("comm");
    let not_writable = File::open("/dev/null").expect("/dev/null");
    let opts = stasis_restore::Options {
        pid_namespace: Some(stasis_restore::PidNamespace {
            cgroup_procs: vec![not_writable.into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let image = stasis_image::Image::open(&img).expect("open image");
    let err = stasis_restore::restore_tree(&image, &opts).expect_err("the cgroup is refused");
    assert!(err.to_string().contains("entering cgroup #0"), "{err}");
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|d| {
            d.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter(|d| std::fs::read_to_string(d.path().join("comm")).is_ok_and(|c| c == me))
        .map(|d| d.file_name().to_string_lossy().into_owned())
        .filter(|p| *p != std::process::id().to_string())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?} ({me:?})");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process that joined the namespace from outside (as `docker exec` does) is a child of
/// a process outside the tree: the tree is refused rather than saved without it.
#[test]
fn a_process_that_joined_the_namespace_from_outside_is_refused() {
    let t = start_ns("joined");
    let target = t.root.to_string();
    let args = ["--target", &target, "--pid", "--", "sleep", "1000"];
    let mut nsenter = spawn_quiet("nsenter", &args);
    assert!(
        wait_for_tree(nsenter.id() as i32, &["sleep"], 1),
        "nsenter never ran sleep"
    );
    let err = checkpoint_refused(t.root, "pidns-joined", "joined the namespace from outside");
    assert!(
        err.contains("(sleep) is in the tree's pid namespace (as PID 6)"),
        "{err}"
    );
    assert!(running_untraced(t.root), "the tree runs on");
    // The namespace's end takes the joined process with it.
    drop(t);
    let _ = nsenter.wait();
}

const SOCKETS_PY: &str = r#"
import socket, sys
l = socket.socket()
l.bind(("0.0.0.0", int(sys.argv[1])))
l.listen(4)
a, b = socket.socketpair()
a.sendall(b"queued")
name = b"\0" + sys.argv[2].encode()
u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
u.bind(name)
u.listen(1)
print("ready", flush=True)
sys.stdin.readline()
b.settimeout(10)
print("listening", l.getsockname()[1], b.recv(10).decode(), u.getsockname() == name, flush=True)
"#;

/// A tree with a network namespace of its own is checkpointed with its unix sockets (looked
/// up in its namespace), and with a network namespace to join, the sockets the restorer
/// makes for the tree are that namespace's: its TCP listener and its unix listener on an
/// abstract name are there and not in ours, and its socket pair still holds its bytes.
#[test]
fn sockets_are_made_in_the_joined_network_namespace() {
    if !have("python3") {
        return;
    }
    let dir = scratch("pidns-net");
    let port = free_port().to_string();
    let tag = format!("pidns{}net", std::process::id());
    let argv = [
        "python3".as_ref(),
        "-c".as_ref(),
        SOCKETS_PY.as_ref(),
        port.as_ref(),
        tag.as_ref(),
    ];
    let (t, _) = spawn_in_ns(&["--net"], &argv, &tag, "ready");
    let img = dir.join("n.img");
    checkpoint(t.root, &img, &[]);
    drop(t);
    let holder = Holder::start(&["--net", "sleep", "1000"]);
    let mut r = restore_here(&img, joining(vec![holder.ns("net")]));
    let hex_port = format!(":{:04X}", port.parse::<u16>().expect("port"));
    let listening = |table: String| {
        std::fs::read_to_string(&table)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .any(|f| f.len() > 3 && f[1].ends_with(&hex_port) && f[3] == "0A")
    };
    assert!(
        listening(format!("/proc/{}/net/tcp", holder.pid())),
        "not in the joined namespace"
    );
    assert!(
        !listening("/proc/self/net/tcp".into()),
        "in the restorer's namespace"
    );
    let abstract_name = |table: String| {
        let text = std::fs::read_to_string(&table).unwrap_or_default();
        text.lines().any(|l| l.ends_with(&format!(" @{tag}")))
    };
    assert!(abstract_name(format!("/proc/{}/net/unix", holder.pid())));
    assert!(!abstract_name("/proc/self/net/unix".into()));
    let net = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns link");
    assert_eq!(net(r.root), net(holder.pid()));
    r.pipes.send("go");
    assert_eq!(
        r.pipes.expect_line(&["listening"]),
        format!("listening {port} queued True")
    );
    r.reaped = true;
    let st = reap(r.root);
    assert!(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0, "{st:#x}");
    let _ = std::fs::remove_dir_all(&dir);
}

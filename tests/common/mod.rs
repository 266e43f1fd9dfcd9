//! Shared helpers of the end-to-end tests: run stasis and the self-checking workloads of
//! tests/workloads, and talk to them over their stdin/stdout pipes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

pub mod cleanup;
pub mod hosts;
pub mod images;
pub mod linux_guest;
pub mod nstree;
pub mod pki;
pub mod programs;
pub mod unshared;
pub mod vmm;
#[allow(unused_imports)]
pub use images::*;
#[allow(unused_imports)]
pub use nstree::*;
#[allow(unused_imports)]
pub use programs::*;
#[allow(unused_imports)]
pub use unshared::*;
#[allow(unused_imports)]
pub use vmm::*;

/// The parent of the product's container cgroups below each hierarchy's root.
pub const CGROUP_PARENT: &str = "stasis";

/// The stasis binary under test.
pub fn stasis() -> &'static str {
    cleanup::register();
    env!("CARGO_BIN_EXE_stasis")
}

/// Becomes a child subreaper once, so processes restored with --detach (orphaned when
/// `stasis restore` exits) are reparented to this test process and can be reaped by PID.
pub fn init() {
    cleanup::register();
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes no pointers.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
    });
}

/// Path of a workload binary. The workloads package is (re)built once per test binary when
/// run under cargo, so a test never runs a stale workload (cargo test does not rebuild
/// another package's binaries by itself).
pub fn workload(name: &str) -> PathBuf {
    let dir = Path::new(stasis())
        .parent()
        .expect("target dir")
        .to_path_buf();
    let path = dir.join(name);
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").ok();
        if cargo.is_none() && path.exists() {
            return;
        }
        let mut cmd = Command::new(cargo.unwrap_or_else(|| "cargo".into()));
        cmd.args(["build", "--quiet", "-p", "stasis-workloads", "--bins"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("running cargo build for the workloads");
        assert!(st.success(), "building stasis-workloads failed");
    });
    assert!(
        path.exists(),
        "workload {} not found at {}",
        name,
        path.display()
    );
    path
}

/// A scratch directory for one test, removed when the test process exits (see
/// [`cleanup`]), whether its tests passed or not.
pub fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("stasis-test-{}-{}", test, std::process::id()));
    cleanup::remove_tree_one_fs(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    cleanup::remove_at_exit(&d);
    d
}

/// The two pipes a workload talks over.
pub struct Pipes {
    pub stdin: ChildStdin,
    pub stdout: BufReader<ChildStdout>,
}

impl Pipes {
    pub fn send(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("writing to workload stdin");
        self.stdin.flush().expect("flush");
    }

    /// The next line that starts with one of `prefixes` (others are skipped), with a bound.
    pub fn expect_line(&mut self, prefixes: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {prefixes:?}"
            );
            let mut line = String::new();
            let n = self
                .stdout
                .read_line(&mut line)
                .expect("reading workload stdout");
            assert!(
                n > 0,
                "workload stdout closed while waiting for {prefixes:?}"
            );
            let line = line.trim_end().to_string();
            if prefixes.iter().any(|p| line.starts_with(p)) {
                return line;
            }
        }
    }

    /// Sends a command and asserts the workload answers PASS.
    pub fn expect_pass(&mut self, command: &str, what: &str) {
        self.send(command);
        let line = self.expect_line(&["PASS ", "FAIL "]);
        assert!(line.starts_with("PASS "), "{what}: {line}");
    }
}

/// A workload started directly by the test.
pub struct Workload {
    pub child: Child,
    pub pid: i32,
    pub pipes: Pipes,
    pub tag: String,
}

/// Starts a workload with `--tag` and STASIS_WL_TAG and waits for READY.
pub fn start(name: &str, args: &[&str]) -> Workload {
    start_with(name, args, |_| {})
}

/// Like [`start`], letting the caller adjust the command (credentials, cwd, ...).
pub fn start_with(name: &str, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Workload {
    start_program(&workload(name), name, args, adjust)
}

/// Like [`start_with`] for a workload run as another user (`nobody`): the binary is run from
/// a copy in a directory everybody may enter, since the checkout may sit under a private
/// one (mktemp -d makes it 0700).
pub fn start_as_other_user(
    name: &str,
    args: &[&str],
    adjust: impl FnOnce(&mut Command),
) -> Workload {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("stasis-shared-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create shared bin dir");
    cleanup::remove_at_exit(&dir);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let copy = dir.join(name);
    if !copy.exists() {
        // Copied under a temporary name and renamed, so a parallel test never runs a
        // half-written binary.
        let tmp = dir.join(format!("{name}.{:?}", std::thread::current().id()));
        std::fs::copy(workload(name), &tmp).expect("copy workload");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::rename(&tmp, &copy).expect("rename workload copy");
    }
    start_program(&copy, name, args, adjust)
}

fn start_program(
    program: &Path,
    name: &str,
    args: &[&str],
    adjust: impl FnOnce(&mut Command),
) -> Workload {
    init();
    let tag = format!("t{}x{}", std::process::id(), name.len() * 7919 + args.len());
    let mut cmd = Command::new(program);
    adjust(&mut cmd);
    let mut child = cmd
        .args(["--tag", &tag])
        .args(args)
        .env("STASIS_WL_TAG", &tag)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting workload");
    let pid = child.id() as i32;
    let mut pipes = Pipes {
        stdin: child.stdin.take().expect("stdin"),
        stdout: BufReader::new(child.stdout.take().expect("stdout")),
    };
    let ready = pipes.expect_line(&["READY ", "FAIL "]);
    assert_eq!(ready, format!("READY {pid}"), "{name} did not get ready");
    Workload {
        child,
        pid,
        pipes,
        tag,
    }
}

/// Runs stasis with arguments; returns its output.
pub fn run_stasis(args: &[&str]) -> Output {
    Command::new(stasis())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running stasis")
}

/// Runs stasis and asserts it exits with `code`; returns stdout.
pub fn stasis_ok(args: &[&str]) -> String {
    let out = run_stasis(args);
    assert!(
        out.status.success(),
        "stasis {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Asserts stasis exits with `code` and its stderr mentions `needle`.
pub fn stasis_fails(args: &[&str], code: i32, needle: &str) -> String {
    let out = run_stasis(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stasis {args:?}: {err}");
    assert!(
        err.contains(needle),
        "stasis {args:?}: expected {needle:?} in: {err}"
    );
    err
}

/// `stasis restore IMAGE [--detach]` whose stdin/stdout (and so the restored process's) are
/// new pipes held by the test.
pub fn restore(image: &Path, detach: bool) -> (Child, Pipes) {
    let mut cmd = Command::new(stasis());
    cmd.arg("restore").arg(image);
    if detach {
        cmd.arg("--detach");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("running stasis restore");
    let pipes = Pipes {
        stdin: child.stdin.take().expect("stdin"),
        stdout: BufReader::new(child.stdout.take().expect("stdout")),
    };
    (child, pipes)
}

/// Waits for a process this test is the parent (or subreaper) of; returns its raw status.
pub fn reap(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: status is a valid c_int.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(
        rc,
        pid,
        "waitpid({pid}): {}",
        std::io::Error::last_os_error()
    );
    status
}

/// Whether `pid` is alive, not stopped, and not traced.
pub fn running_untraced(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    let state = field("State:");
    field("TracerPid:") == "0"
        && !state.starts_with('T')
        && !state.starts_with('t')
        && !state.starts_with('Z')
}

/// Kills (SIGKILL) the process it holds when dropped, so a failing test leaves nothing
/// running behind it (a restored server detached from stasis, say).
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill(self.0);
        reap_orphans(&[self.0]);
    }
}

/// Kills and reaps a process the test owns.
pub fn kill(pid: i32) {
    // SAFETY: kill takes no pointers; pid is a process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Says that and why a test is skipped (all of it, or a part: then `why` says "in part"),
/// where the suite's log shows it: eprintln! output of a passing test is captured and
/// dropped by the harness, a write to the standard error stream itself is not.
///
/// The line is `SKIPPED BINARY::TEST: WHY`, naming the running test (the harness names each
/// test's thread after it), whatever `test` says; a `test` that is not the test's or the
/// binary's name (a program, "postgres") goes into the reason unless the reason names it
/// already. scripts/test counts these
/// lines, so one test says `SKIPPED` once: a second call from the same test says "also".
pub fn skip(test: &str, why: &str) {
    use std::io::Write;
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let bin = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .map(|f| match f.rsplit_once('-') {
            Some((name, hash)) if hash.bytes().all(|b| b.is_ascii_hexdigit()) => name.to_string(),
            _ => f,
        })
        .unwrap_or_default();
    let thread = std::thread::current();
    let running = thread.name().filter(|n| *n != "main");
    let name = match running {
        Some(r) => format!("{bin}::{r}"),
        None if test == bin => bin.clone(),
        None => format!("{bin}::{test}"),
    };
    let why = if test == bin || why.contains(test) || running.is_none_or(|r| r.ends_with(test)) {
        why.to_string()
    } else {
        format!("{test}: {why}")
    };
    let first = {
        let mut said = SAID.lock().unwrap_or_else(|e| e.into_inner());
        let first = !said.contains(&name);
        if first {
            said.push(name.clone());
        }
        first
    };
    // One write, so the line is not torn by the harness's own output.
    let line = if first {
        format!("SKIPPED {name}: {why}\n")
    } else {
        format!("also skipped in {name}: {why}\n")
    };
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Whether `program --version` runs; says why the test is skipped if not.
pub fn have(program: &str) -> bool {
    have_with(program, "--version")
}

/// Whether `program version_flag` runs (nginx knows only -v); says why the test is skipped
/// if not.
pub fn have_with(program: &str, version_flag: &str) -> bool {
    let ok = Command::new(program)
        .arg(version_flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip(program, &format!("{program} is not available"));
    }
    ok
}

/// Every descendant of `pid` (as /proc shows them now).
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let tasks = std::fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten();
        for t in tasks.flatten() {
            let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in text.split_whitespace() {
                if let Ok(c) = c.parse() {
                    out.push(c);
                    todo.push(c);
                }
            }
        }
    }
    out
}

/// Reaps processes of a killed tree that come back to this test (a subreaper) as orphans,
/// so their PIDs are free for the restore; waits a bounded time for each.
pub fn reap_orphans(pids: &[i32]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for &p in pids {
        while std::time::Instant::now() < deadline {
            let mut status = 0;
            // SAFETY: status is a valid c_int; p was a process of the test's tree.
            let r = unsafe { libc::waitpid(p, &mut status, libc::WNOHANG | libc::__WALL) };
            if r == p || !Path::new(&format!("/proc/{p}")).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

/// Checkpoints (kill) → restore --detach → verify → checkpoint (kill) → restore → check.
/// Every workload is taken through this: two checkpoints and restores in a row.
pub fn round_trip(name: &str, args: &[&str], extra_ckpt: &[&str]) {
    let dir = scratch(&format!(
        "{name}{}",
        extra_ckpt.join("").replace(['-', ':'], "")
    ));
    let mut wl = start(name, args);
    wl.pipes.expect_pass("verify", "before checkpoint");
    let pid = wl.pid.to_string();
    let img1 = dir.join("1.img");
    let img1s = img1.to_str().expect("utf8");
    let mut ckpt: Vec<&str> = vec!["checkpoint", &pid, "-o", img1s];
    ckpt.extend_from_slice(extra_ckpt);
    let tree = descendants(wl.pid);
    stasis_ok(&ckpt);
    wl.child.wait().expect("reap original");
    reap_orphans(&tree);
    stasis_ok(&["image", "verify", img1s]);

    let (mut r1, mut p1) = restore(&img1, true);
    let pid_line = p1.expect_line(&[&pid]);
    assert_eq!(pid_line, pid);
    assert!(
        r1.wait().expect("stasis restore").success(),
        "restore --detach failed"
    );
    p1.expect_pass("verify", "after first restore");

    let img2 = dir.join("2.img");
    let img2s = img2.to_str().expect("utf8");
    let mut ckpt: Vec<&str> = vec!["checkpoint", &pid, "-o", img2s];
    ckpt.extend_from_slice(extra_ckpt);
    let tree = descendants(wl.pid);
    stasis_ok(&ckpt);
    reap(wl.pid);
    reap_orphans(&tree);

    let (mut r2, mut p2) = restore(&img2, false);
    p2.expect_pass("check", "after second restore");
    let st = r2.wait().expect("stasis restore");
    assert!(st.success(), "stasis restore exited with {st}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether stasis was built with failpoints (says so and skips those points if not).
pub fn failpoints_built(test: &str) -> bool {
    use std::os::unix::process::ExitStatusExt;
    // A build without the feature ignores FAILPOINTS: ask stasis to die at a point every
    // checkpoint passes, on a small process of our own, and see whether it did.
    let mut wl = start("wl-survivor", &["--mib", "1", "--threads", "1"]);
    let dir = scratch(&format!("{test}-probe"));
    let img = dir.join("probe.img");
    let st = Command::new(stasis())
        .args(["checkpoint", &wl.pid.to_string(), "--leave-running", "-o"])
        .arg(&img)
        .env("FAILPOINTS", "frozen-process=return")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running stasis");
    wl.pipes.expect_pass("verify", "probe workload");
    wl.pipes.send("check");
    let _ = wl.child.wait();
    let built = st.signal() == Some(libc::SIGKILL);
    if !built {
        skip(
            test,
            "stasis was built without --features stasis/failpoints: the failpoint kills are not run",
        );
    }
    built
}

/// Makes `cmd`'s child join the cgroups whose `cgroup.procs` files are `procs_files` before
/// it execs (it writes "0" into each).
pub fn join_cgroups_before_exec(cmd: &mut Command, procs_files: &[PathBuf]) {
    use std::os::unix::process::CommandExt;
    let files: Vec<std::ffi::CString> = procs_files
        .iter()
        .map(|p| {
            std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in a path")
        })
        .collect();
    // SAFETY: runs between fork and exec; open, write and close are async-signal-safe and
    // the paths were built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for f in &files {
                let fd = libc::open(f.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
            Ok(())
        });
    }
}

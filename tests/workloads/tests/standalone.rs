//! Runs every workload without any checkpoint: READY, `verify`, `check` must give PASS and
//! exit 0. Also proves some checks fail when state is changed behind the workload's back, and
//! exercises the protocol's error paths.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

const TAG: &str = "abc123";
const TIMEOUT: Duration = Duration::from_secs(120);

struct Wl {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    pid: u32,
}

fn bin(name: &str) -> &'static str {
    match name {
        "wl-memory" => env!("CARGO_BIN_EXE_wl-memory"),
        "wl-regs" => env!("CARGO_BIN_EXE_wl-regs"),
        "wl-sleep" => env!("CARGO_BIN_EXE_wl-sleep"),
        "wl-pipe-read" => env!("CARGO_BIN_EXE_wl-pipe-read"),
        "wl-vdso" => env!("CARGO_BIN_EXE_wl-vdso"),
        "wl-signal" => env!("CARGO_BIN_EXE_wl-signal"),
        "wl-files" => env!("CARGO_BIN_EXE_wl-files"),
        "wl-counter" => env!("CARGO_BIN_EXE_wl-counter"),
        "wl-tree" => env!("CARGO_BIN_EXE_wl-tree"),
        other => panic!("unknown workload {other}"),
    }
}

fn tmpdir(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("standalone-{test}"));
    // Leftovers of a crashed earlier run would look like leaked temp files.
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create test tmpdir");
    d
}

impl Wl {
    fn start(name: &'static str, extra: &[&str], tmp: &Path) -> Wl {
        let mut child = Command::new(bin(name))
            .args(["--tag", TAG])
            .args(extra)
            .env("STASIS_WL_TAG", TAG)
            .env("TMPDIR", tmp)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let mut wl = Wl {
            name,
            child,
            stdin,
            lines: rx,
            pid: 0,
        };
        let ready = wl
            .next_line()
            .unwrap_or_else(|| panic!("{name}: no READY line"));
        let pid: u32 = ready
            .strip_prefix("READY ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{name}: expected READY <pid>, got {ready:?}"));
        assert_eq!(pid, wl.child.id(), "{name}: READY pid");
        wl.pid = pid;
        wl
    }

    fn next_line(&mut self) -> Option<String> {
        self.lines.recv_timeout(TIMEOUT).ok()
    }

    fn send(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(cmd.as_bytes()).expect("write command");
        stdin.flush().expect("flush command");
    }

    /// Sends `cmd` and returns the PASS/FAIL line, skipping INFO and count lines.
    fn command(&mut self, cmd: &str) -> String {
        self.send(cmd);
        loop {
            let line = self
                .next_line()
                .unwrap_or_else(|| panic!("{}: no answer to {cmd:?}", self.name));
            if line.starts_with("PASS ") || line.starts_with("FAIL ") {
                return line;
            }
            assert!(
                line.starts_with("INFO ") || line.starts_with("count "),
                "{}: unexpected line {line:?}",
                self.name
            );
        }
    }

    fn wait(mut self) -> i32 {
        drop(self.stdin.take());
        let st = self.child.wait().expect("wait");
        st.code().unwrap_or(-1)
    }
}

fn pass_twice(name: &'static str, extra: &[&str]) {
    let tmp = tmpdir(&format!("{name}{}", extra.join("")));
    let mut wl = Wl::start(name, extra, &tmp);
    assert_eq!(wl.command("verify\n"), format!("PASS {name}"));
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(wl.command("verify\n"), format!("PASS {name}"));
    assert_eq!(wl.command("check\n"), format!("PASS {name}"));
    assert_eq!(wl.wait(), 0, "{name}: exit status");
    let left: Vec<_> = std::fs::read_dir(&tmp).expect("read tmpdir").collect();
    assert!(left.is_empty(), "{name} left temp files: {left:?}");
}

#[test]
fn memory() {
    pass_twice("wl-memory", &[]);
}

#[test]
fn memory_alias_small() {
    pass_twice("wl-memory", &["--alias", "--mib", "4"]);
}

#[test]
fn regs() {
    pass_twice("wl-regs", &[]);
}

#[test]
fn regs_sse_only() {
    pass_twice("wl-regs", &["--sse-only"]);
}

#[test]
fn sleep() {
    pass_twice("wl-sleep", &[]);
}

#[test]
fn pipe_read() {
    pass_twice("wl-pipe-read", &[]);
}

#[test]
fn vdso() {
    pass_twice("wl-vdso", &[]);
}

#[test]
fn signal() {
    pass_twice("wl-signal", &[]);
}

#[test]
fn signal_pending() {
    pass_twice("wl-signal", &["--pending"]);
}

#[test]
fn files() {
    pass_twice("wl-files", &[]);
}

#[test]
fn counter() {
    pass_twice("wl-counter", &[]);
}

#[test]
fn counter_quiet_mib() {
    pass_twice("wl-counter", &["--quiet", "--mib", "64"]);
}

/// An outside SIGUSR1 while blocked in read: the handler runs, the read restarts.
#[test]
fn signal_from_outside_restarts_read() {
    let tmp = tmpdir("signal-outside");
    let mut wl = Wl::start("wl-signal", &[], &tmp);
    let r = Command::new("kill")
        .args(["-USR1", &wl.pid.to_string()])
        .status()
        .expect("run kill");
    assert!(r.success());
    std::thread::sleep(Duration::from_millis(100));
    wl.send("verify\n");
    let info = wl.next_line().expect("INFO line");
    assert!(info.contains("(1 from outside)"), "{info}");
    assert_eq!(wl.next_line().expect("PASS"), "PASS wl-signal");
    assert_eq!(wl.command("check\n"), "PASS wl-signal");
    assert_eq!(wl.wait(), 0);
}

/// The file under a MAP_PRIVATE mapping changes: pages never written must show it.
#[test]
fn memory_detects_changed_file_pages() {
    let tmp = tmpdir("memory-negative");
    let mut wl = Wl::start("wl-memory", &["--mib", "2"], &tmp);
    let file = tmp.join(format!("stasis-wl-memory-{}-{TAG}.dat", wl.pid));
    let mut data = std::fs::read(&file).expect("read mapped file");
    for b in &mut data {
        *b = !*b;
    }
    // Rewrite in place: truncating would also drop the private copies of written pages.
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open mapped file")
        .write_all_at(&data, 0)
        .expect("rewrite mapped file");
    let line = wl.command("check\n");
    assert!(line.starts_with("FAIL wl-memory: "), "{line}");
    assert!(line.contains("never touched"), "{line}");
    assert!(line.contains("changed on disk"), "{line}");
    assert!(!line.contains("(modified)"), "{line}");
    assert_eq!(wl.wait(), 1);
}

/// The rw file is truncated behind the workload's back.
#[test]
fn files_detects_truncation() {
    let tmp = tmpdir("files-negative");
    let mut wl = Wl::start("wl-files", &[], &tmp);
    let file = tmp.join(format!("stasis-wl-files-{}-{TAG}-rw.dat", wl.pid));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open rw file")
        .set_len(100)
        .expect("truncate");
    let line = wl.command("check\n");
    assert!(line.starts_with("FAIL wl-files: "), "{line}");
    assert!(line.contains("size of"), "{line}");
    assert_eq!(wl.wait(), 1);
}

#[test]
fn protocol_errors() {
    let tmp = tmpdir("protocol");
    let mut wl = Wl::start("wl-pipe-read", &[], &tmp);
    let line = wl.command("bogus\n");
    assert!(
        line.starts_with("FAIL wl-pipe-read: unknown command"),
        "{line}"
    );
    assert_eq!(wl.wait(), 1);

    let mut wl = Wl::start("wl-vdso", &[], &tmp);
    drop(wl.stdin.take());
    let line = wl.next_line().expect("FAIL on EOF");
    assert!(line.contains("EOF"), "{line}");
    assert_eq!(wl.wait(), 1);

    let out = Command::new(bin("wl-sleep"))
        .arg("--nope")
        .stdin(Stdio::null())
        .output()
        .expect("run wl-sleep");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("FAIL wl-sleep: bad arguments"));

    let out = Command::new(bin("wl-sleep"))
        .args(["--tag", "x"])
        .env("STASIS_WL_TAG", "y")
        .stdin(Stdio::null())
        .output()
        .expect("run wl-sleep");
    assert_eq!(out.status.code(), Some(2));
}

/// Sends `cmd` to wl-tree; returns the PASS/FAIL line and the pids of its first-check
/// `INFO wl-tree: pids R=.. A=.. ..` line (empty if there is none).
fn tree_command(wl: &mut Wl, cmd: &str) -> (String, Vec<(String, i32)>) {
    wl.send(cmd);
    let mut pids = Vec::new();
    loop {
        let line = wl.next_line().expect("an answer from wl-tree");
        if let Some(list) = line.strip_prefix("INFO wl-tree: pids ") {
            pids = list
                .split(' ')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').expect("NAME=PID");
                    (k.to_string(), v.parse().expect("a pid"))
                })
                .collect();
        } else if line.starts_with("PASS ") || line.starts_with("FAIL ") {
            return (line, pids);
        } else {
            assert!(line.starts_with("INFO "), "unexpected line {line:?}");
        }
    }
}

/// Every process of the tree is gone (within a few seconds): its pid is free or reused by a
/// process that is not a wl-tree.
fn assert_tree_gone(pids: &[(String, i32)]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for (name, pid) in pids {
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if !comm.starts_with("wl-tree") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "wl-tree process {name} (pid {pid}, {}) is still there",
                comm.trim()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The process tree: PASS on two `verify`s and a `check`, and nothing of it left after.
#[test]
fn tree() {
    let tmp = tmpdir("wl-tree");
    let mut wl = Wl::start("wl-tree", &[], &tmp);
    let (line, pids) = tree_command(&mut wl, "verify\n");
    assert_eq!(line, "PASS wl-tree");
    let names: Vec<&str> = pids.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(names, ["R", "A", "A1", "B", "B1", "O1", "S", "Z", "K"]);
    assert_eq!(pids[0].1 as u32, wl.pid);
    assert_eq!(tree_command(&mut wl, "verify\n").0, "PASS wl-tree");
    assert_eq!(tree_command(&mut wl, "check\n").0, "PASS wl-tree");
    assert_eq!(wl.wait(), 0, "wl-tree exit status");
    assert_tree_gone(&pids);
    let left: Vec<_> = std::fs::read_dir(&tmp).expect("read tmpdir").collect();
    assert!(left.is_empty(), "wl-tree left temp files: {left:?}");
}

/// Broken from outside: S continued, extra bytes in the A1→B1 pipe, O1 killed. The check
/// names each, and the tree still goes away.
#[test]
fn tree_detects_broken_state() {
    let tmp = tmpdir("wl-tree-negative");
    let mut wl = Wl::start("wl-tree", &[], &tmp);
    let (line, pids) = tree_command(&mut wl, "verify\n");
    assert_eq!(line, "PASS wl-tree");
    let pid = |n: &str| pids.iter().find(|p| p.0 == n).expect("pid in INFO").1;
    // The pipe A1 and B1 share above fd 2 is P3 (already read once, so empty); a writer
    // opened through /proc puts 5 bytes into it.
    let links = |p: i32| -> Vec<(PathBuf, PathBuf)> {
        std::fs::read_dir(format!("/proc/{p}/fd"))
            .expect("list fds")
            .map(|e| e.expect("fd entry").path())
            .filter(|path| !path.ends_with("0") && !path.ends_with("1") && !path.ends_with("2"))
            .filter_map(|path| std::fs::read_link(&path).ok().map(|l| (path, l)))
            .collect()
    };
    let a1 = links(pid("A1"));
    let (p3, _) = links(pid("B1"))
        .into_iter()
        .find(|(_, l)| l.to_string_lossy().starts_with("pipe:") && a1.iter().any(|x| &x.1 == l))
        .expect("a pipe shared by A1 and B1");
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(&p3)
        .expect("open P3");
    w.write_all(b"extra").expect("write into P3");
    drop(w);
    // SAFETY: plain kill(2) on pids of the tree this test started.
    unsafe {
        assert_eq!(libc::kill(pid("S"), libc::SIGCONT), 0);
        assert_eq!(libc::kill(pid("O1"), libc::SIGKILL), 0);
    }
    std::thread::sleep(Duration::from_millis(100));
    let (line, _) = tree_command(&mut wl, "check\n");
    assert!(line.starts_with("FAIL wl-tree: "), "{line}");
    let s = format!(
        "S (pid {}) state (/proc/{0}/stat): expected 'T', got 'S'",
        pid("S")
    );
    assert!(line.contains(&s), "{line}");
    let b1 = format!(
        "B1 (pid {}): P3 (pipe from A1): bytes buffered: expected 0, got 5",
        pid("B1")
    );
    assert!(line.contains(&b1), "{line}");
    assert!(
        line.contains(&format!("O1 (pid {}): ", pid("O1"))),
        "{line}"
    );
    assert_eq!(wl.wait(), 1, "wl-tree exit status");
    assert_tree_gone(&pids);
}

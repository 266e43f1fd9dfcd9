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

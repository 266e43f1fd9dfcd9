//! Programs nobody here wrote, checkpointed mid-work and restored, must finish exactly as an
//! uninterrupted run does.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};

const PY: &str = "import sys, hashlib\n\
h = hashlib.sha256()\n\
data = {i: str(i) * 10 for i in range(200000)}\n\
print('ready', flush=True)\n\
sys.stdin.readline()\n\
for k in sorted(data): h.update(data[k].encode())\n\
print('digest', h.hexdigest(), len(data), flush=True)\n";

/// Runs `python3 -c code` uninterrupted: waits for its first line (`ready_line`), says go,
/// and returns everything it prints after that.
fn reference_run(code: &str, ready_line: &str) -> String {
    let (mut child, mut out) = start_python(code, ready_line);
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"go\n")
        .expect("write");
    let mut rest = String::new();
    out.read_to_string(&mut rest).expect("read");
    child.wait().expect("reap");
    rest
}

/// Starts `python3 -c code` and waits for its first line, which must be `ready_line`.
fn start_python(code: &str, ready_line: &str) -> (std::process::Child, impl Read) {
    let mut child = clean("python3")
        .args(["-c", code])
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    assert_eq!(line.trim(), ready_line);
    (child, out)
}

/// Checkpoints (kill) a started python, restores it, runs `before_go` with its pid, says go,
/// and returns its output.
fn checkpoint_restore_go(
    py: std::process::Child,
    img: &std::path::Path,
    before_go: impl FnOnce(u32),
) -> String {
    let pid = py.id();
    let (r, mut pipes) = checkpoint_and_restore(py, img);
    before_go(pid);
    pipes.send("go");
    output_of(r, pipes)
}

#[test]
fn cpython_finishes_with_the_same_result() {
    if !have("python3") {
        return;
    }
    init();
    let expected = reference_run(PY, "ready");
    let dir = scratch("cpython");
    let (py, _out) = start_python(PY, "ready");
    let got = checkpoint_restore_go(py, &dir.join("py.img"), |_| {});
    assert_eq!(got, expected, "restored CPython computed something else");
    assert!(got.starts_with("digest "), "{got}");
}

#[test]
fn coreutils_sleep_restarts_and_exits_zero() {
    init();
    let dir = scratch("sleep");
    let img = dir.join("sleep.img");
    let mut s = clean("sleep").arg("1").spawn().expect("sleep");
    std::thread::sleep(std::time::Duration::from_millis(300));
    stasis_ok(&[
        "checkpoint",
        &s.id().to_string(),
        "-o",
        img.to_str().expect("utf8"),
    ]);
    s.wait().expect("reap");
    let t = std::time::Instant::now();
    let (mut r, _pipes) = restore(&img, false);
    let st = r.wait().expect("restore");
    assert!(st.success(), "restored sleep exited with {st}");
    // The interrupted nanosleep was issued again rather than failing with EINTR.
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(500),
        "sleep returned early"
    );
}

#[test]
fn cat_blocked_in_read_echoes_after_restore() {
    init();
    let dir = scratch("cat");
    let img = dir.join("cat.img");
    let mut c = clean("cat").spawn().expect("cat");
    let mut cin = c.stdin.take().expect("stdin");
    let mut cout = BufReader::new(c.stdout.take().expect("stdout"));
    cin.write_all(b"before\n").expect("write");
    let mut line = String::new();
    cout.read_line(&mut line).expect("read");
    assert_eq!(line, "before\n");
    stasis_ok(&[
        "checkpoint",
        &c.id().to_string(),
        "-o",
        img.to_str().expect("utf8"),
    ]);
    c.wait().expect("reap");
    let (mut r, mut pipes) = restore(&img, false);
    pipes.send("after");
    let mut line = String::new();
    pipes.stdout.read_line(&mut line).expect("read");
    assert_eq!(line, "after\n");
    drop(pipes);
    assert!(
        r.wait().expect("restore").success(),
        "cat should exit 0 at EOF"
    );
}

const PY_THREADS: &str = r#"
import sys, threading, hashlib
results = {}
go = threading.Event()
def worker(i):
    h = hashlib.sha256()
    local = [str(j * (i + 1)) for j in range(100000)]
    go.wait()
    for x in local:
        h.update(x.encode())
    results[i] = h.hexdigest()
ts = [threading.Thread(target=worker, args=(i,), name=f'worker-{i}') for i in range(4)]
for t in ts:
    t.start()
print('ready', threading.active_count(), flush=True)
sys.stdin.readline()
go.set()
for t in ts:
    t.join()
print('result', sorted(results.items()), flush=True)
"#;

#[test]
fn multithreaded_cpython_finishes_with_the_same_result() {
    if !have("python3") {
        return;
    }
    init();
    let expected = reference_run(PY_THREADS, "ready 5");
    let dir = scratch("pythreads");
    let (py, _out) = start_python(PY_THREADS, "ready 5");
    let tids = |pid: u32| -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new(); // not (yet) there
        };
        let mut t: Vec<String> = dir
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        t.sort();
        t
    };
    let before = tids(py.id());
    assert_eq!(before.len(), 5);
    let got = checkpoint_restore_go(py, &dir.join("py.img"), |pid| {
        // Every thread is back with its own id before the workers are released.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while tids(pid) != before {
            assert!(
                std::time::Instant::now() < deadline,
                "threads {:?} != {before:?}",
                tids(pid)
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    });
    assert_eq!(got, expected, "restored threads computed something else");
}

#[test]
fn the_readme_demo_carries_on_from_the_same_count() {
    let out = run_stasis(&["demo", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "stasis demo failed ({}): {err}",
        out.status
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("demo --json");
    assert_eq!(v["continued"], true, "{v}");
    let before = v["last_count_before"].as_u64().expect("count");
    assert!(before > 0, "{v}");
    assert_eq!(v["first_count_after"].as_u64(), Some(before + 1), "{v}");
}

//! An established TCP connection with both ends in the tree (a client and its server on
//! loopback, parent and child) across `checkpoint --tcp-established`, kill and restore: the
//! network lock holds four elements for one 4-tuple seen from both sockets, and the restore
//! must unlock them all (it used to delete the same element twice, fail the whole unlock,
//! warn and exit 0 with the connection blocked for ever). A restore that cannot unlock fails,
//! kills what it made, and leaves the lock and the image for another try.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// The client (the root) forks the server, and they talk over one loopback connection:
/// before "ready" 50 rounds, then three requests and 64 KiB of bulk data whose answers (with
/// the server's acknowledgement of the bulk data) wait unread in the client's receive queue.
/// After "go" (on stdin) the client checks those answers, and 200 more rounds of 1-4 KiB each way run; every read has a timeout, so a connection
/// left locked fails instead of hanging. Prints "ok" only if both sides saw everything.
const PAIR_PY: &str = r#"
import os, socket, sys, hashlib
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
l = socket.socket(fam)
l.bind((sys.argv[1], 0))
l.listen(1)
port = l.getsockname()[1]
BULK = bytes((i * 7) % 251 for i in range(65536))

def body(n):
    return hashlib.sha256(str(n).encode()).hexdigest().encode() * (32 + n % 96)

def recv_exact(s, n):
    out = b""
    while len(out) < n:
        d = s.recv(n - len(out))
        if not d:
            raise SystemExit("EOF after %d of %d bytes" % (len(out), n))
        out += d
    return out

def line(s):
    out = b""
    while not out.endswith(b"\n"):
        d = s.recv(1)
        if not d:
            raise SystemExit("EOF in a line")
        out += d
    return out

child = os.fork()
if child == 0:
    c, _ = l.accept()
    l.close()
    c.settimeout(30)
    while True:
        req = line(c)
        if req == b"bulk\n":
            if recv_exact(c, len(BULK)) != BULK:
                os._exit(3)
            c.sendall(b"bulk ok\n")
            continue
        if req == b"bye\n":
            os._exit(0)
        n = int(req)
        if recv_exact(c, len(body(n))) != body(n):
            os._exit(4)
        c.sendall(b"%d\n" % (n * 3) + body(n * 3))
l.close()
c = socket.create_connection((sys.argv[1], port), timeout=30)

def ask(n):
    c.sendall(b"%d\n" % n + body(n))

def answer(n):
    if line(c) != b"%d\n" % (n * 3) or recv_exact(c, len(body(n * 3))) != body(n * 3):
        raise SystemExit("wrong answer to %d" % n)

for n in range(50):
    ask(n)
    answer(n)
for n in range(50, 53):
    ask(n)
c.sendall(b"bulk\n" + BULK)
print("ready", port, child, flush=True)
sys.stdin.readline()
try:
    for n in range(50, 53):
        answer(n)
    if line(c) != b"bulk ok\n":
        raise SystemExit("bulk not acknowledged")
    for n in range(100, 300):
        ask(n)
        answer(n)
    c.sendall(b"bye\n")
    _, st = os.waitpid(child, 0)
    if st != 0:
        raise SystemExit("the server exited with status %d" % st)
except socket.timeout:
    raise SystemExit("timed out: the connection is still locked")
print("ok", flush=True)
"#;

fn can_run() -> bool {
    have("python3") && have("nft")
}

/// The nft table of the network lock as `nft list table inet stasis` shows it ("" if none).
fn table() -> String {
    Command::new("nft")
        .args(["list", "table", "inet", "stasis"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

/// Unlocks, when dropped, whatever the network lock still holds of the connection on `port`
/// (only a failing test leaves anything), so a failure leaves no lock behind.
struct UnlockOnDrop(u16);

impl Drop for UnlockOnDrop {
    fn drop(&mut self) {
        let t = table();
        let mine = format!(". {} ", self.0);
        let mut script = String::new();
        for set in ["conn4", "conn6"] {
            let Some(block) = t
                .split(&format!("set {set} {{"))
                .nth(1)
                .and_then(|b| b.split("elements = {").nth(1))
                .and_then(|b| b.split('}').next())
            else {
                continue;
            };
            for e in block
                .split(',')
                .map(str::trim)
                .filter(|e| e.contains(&mine))
            {
                script.push_str(&format!("delete element inet stasis {set} {{ {e} }}\n"));
            }
        }
        if script.is_empty() {
            return;
        }
        let child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn();
        if let Ok(mut child) = child {
            if let Some(mut stdin) = child.stdin.take() {
                use std::io::Write;
                let _ = stdin.write_all(script.as_bytes());
            }
            let _ = child.wait();
        }
    }
}

/// Starts the pair on `host`; returns it, its port and the server's PID.
fn start_pair(host: &str, dir: &Path) -> (Child, u16, i32) {
    let (child, line) = start_ready(
        "exec python3 -c \"$0\" \"$1\"",
        &[PAIR_PY.as_ref(), host.as_ref()],
        dir,
    );
    let field = |i: usize| line.split_whitespace().nth(i).and_then(|p| p.parse().ok());
    let (Some(port), Some(server)) = (field(1), field(2)) else {
        panic!("the pair said {line:?}, not \"ready PORT CHILD\"");
    };
    (child, port as u16, server)
}

/// Checkpoints (kill) the pair with --tcp-established; reaps it; returns the image.
fn checkpoint_kill(mut child: Child, dir: &Path, port: u16) -> PathBuf {
    let pid = child.id() as i32;
    let tree = descendants(pid);
    let img = dir.join("pair.img");
    let stats = checkpoint_stats(pid, &img, &["--tcp-established"]);
    assert_eq!(
        stats["tcp_connections"], 2,
        "two sockets, one connection: {stats}"
    );
    child.wait().expect("reap original");
    reap_orphans(&tree);
    assert!(
        table().contains(&format!(". {port} ")),
        "the connection must stay locked until restored: {}",
        table()
    );
    img
}

/// Says "go" to a restored pair and requires its "ok" and a successful exit.
fn finish(r: Child, mut pipes: Pipes) {
    pipes.send("go");
    let out = output_of(r, pipes);
    assert!(out.contains("ok"), "the pair said {out:?}");
}

/// Our port is in no element left; and the table is gone unless somebody else (another
/// test running beside this one) still holds a lock in it.
fn assert_unlocked(port: u16) {
    let t = table();
    assert!(
        !t.contains(&format!(". {port} ")),
        "the restore must unlock the connection: {t}"
    );
    assert!(
        t.is_empty() || t.contains("elements"),
        "the last unlock must remove the empty table: {t}"
    );
}

fn pair_survives(host: &str, test: &str) {
    if !can_run() {
        common::skip(
            test,
            "needs python3 and nft (Debian packages python3, nftables)",
        );
        return;
    }
    init();
    let dir = scratch(test);
    let (child, port, _) = start_pair(host, &dir);
    let _root = KillOnDrop(child.id() as i32);
    let _unlock = UnlockOnDrop(port);
    let img = checkpoint_kill(child, &dir, port);
    let (r, pipes) = restore(&img, false);
    // The restored tree runs only once its connection is unlocked.
    finish(r, pipes);
    assert_unlocked(port);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ipv4_pair_on_loopback_talks_both_ways_after_restore() {
    pair_survives("127.0.0.1", "tcp-loopback4");
}

#[test]
fn ipv6_pair_on_loopback_talks_both_ways_after_restore() {
    pair_survives("::1", "tcp-loopback6");
}

/// An `nft` that always fails, first on the PATH of a restore: the unlock fails.
fn failing_nft(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    let nft = bin.join("nft");
    std::fs::write(
        &nft,
        "#!/bin/sh\ncat >/dev/null\necho 'nft: simulated failure' >&2\nexit 1\n",
    )
    .expect("nft");
    std::fs::set_permissions(&nft, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

/// A restore whose unlock fails exits non-zero saying so, runs nothing (the processes it
/// made are killed), and leaves the lock and the image: the next restore works.
#[test]
fn a_restore_that_cannot_unlock_fails_and_can_be_retried() {
    if !can_run() {
        common::skip(
            "tcp-loopback-unlock-fails",
            "needs python3 and nft (Debian packages python3, nftables)",
        );
        return;
    }
    init();
    let dir = scratch("tcp-loopback-fail");
    let (child, port, server) = start_pair("127.0.0.1", &dir);
    let pid = child.id() as i32;
    let _root = KillOnDrop(pid);
    let _unlock = UnlockOnDrop(port);
    let img = checkpoint_kill(child, &dir, port);
    let path = format!(
        "{}:{}",
        failing_nft(&dir).display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(stasis())
        .args(["restore", img.to_str().expect("utf8"), "--detach"])
        .env("PATH", path)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running stasis restore");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "restore must fail: {err}");
    assert!(
        err.contains("could not be let back onto the network") && err.contains("simulated"),
        "the error must say what failed: {err}"
    );
    // Nothing of the failed restore runs (its server, orphaned when the restorer killed
    // the root, comes to this test to be reaped), and the connection is still locked.
    reap_orphans(&[pid, server]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for p in [pid, server] {
        while std::path::Path::new(&format!("/proc/{p}")).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the failed restore left PID {p} behind"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    assert!(
        table().contains(&format!(". {port} ")),
        "a failed restore must leave the connection locked: {}",
        table()
    );
    let (r, pipes) = restore(&img, false);
    finish(r, pipes);
    assert_unlocked(port);
    let _ = std::fs::remove_dir_all(&dir);
}

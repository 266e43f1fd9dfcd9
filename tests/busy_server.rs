//! A busy server checkpointed with `--leave-running --tcp-established` while 16 clients hammer
//! it: every checkpoint must succeed and no client may see an error. Connections waiting in
//! the listener's accept queue used to make about half of such checkpoints fail; now new
//! connections are held (their SYNs dropped by the network lock, so clients retransmit them)
//! until the queue has drained and the tree is frozen with it empty. A kill and restore under
//! the same load loses no request either.

mod common;

use common::*;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One process, one thread: accepts a connection, reads a line "ping N", answers "pong N"
/// after a short pause (so connections queue up behind it), closes, accepts the next.
const SERVER_PY: &str = r#"
import socket, time
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", 0))
l.listen(64)
print("ready", l.getsockname()[1], flush=True)
while True:
    c, _ = l.accept()
    c.settimeout(30)
    data = b""
    while not data.endswith(b"\n"):
        d = c.recv(100)
        if not d:
            break
        data += d
    time.sleep(0.001)
    c.sendall(data.replace(b"ping", b"pong"))
    c.close()
"#;

const CLIENTS: usize = 16;
const CHECKPOINTS: usize = 20;

#[test]
fn a_busy_server_checkpoints_every_time_without_a_failed_request() {
    if !(have("python3") && have("nft")) {
        common::skip(
            "busy_server",
            "needs python3 and nft (Debian packages python3, nftables)",
        );
        return;
    }
    init();
    let dir = scratch("busy-server");
    let (mut child, line) = start_ready("exec python3 -c \"$0\"", &[SERVER_PY.as_ref()], &dir);
    let pid = child.id() as i32;
    let _server = KillOnDrop(pid);
    let port: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("ready PORT");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(SeqCst) {
                    n += 1;
                    let r = (|| -> std::io::Result<()> {
                        let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
                        c.set_read_timeout(Some(Duration::from_secs(30)))?;
                        writeln!(c, "ping {k}.{n}")?;
                        let mut got = String::new();
                        c.read_to_string(&mut got)?;
                        if got != format!("pong {k}.{n}\n") {
                            return Err(std::io::Error::other(format!("answer {got:?}")));
                        }
                        Ok(())
                    })();
                    match r {
                        Ok(()) => {
                            done.fetch_add(1, SeqCst);
                        }
                        Err(e) => failed
                            .lock()
                            .expect("failures")
                            .push(format!("client {k} request {n}: {e}")),
                    }
                }
            })
        })
        .collect();
    let wait_for = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.load(SeqCst) < n {
            assert!(Instant::now() < deadline, "the server stopped answering");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for(200);
    let img = dir.join("busy.img");
    let mut refused = Vec::new();
    for round in 0..CHECKPOINTS {
        let out = run_stasis(&[
            "checkpoint",
            &pid.to_string(),
            "-o",
            img.to_str().expect("utf8"),
            "--leave-running",
            "--tcp-established",
        ]);
        if !out.status.success() {
            refused.push(format!(
                "checkpoint {round}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let _ = std::fs::remove_file(&img);
        // Clients get through between checkpoints.
        wait_for(done.load(SeqCst) + 20);
    }
    // Killed and restored under load: new connections stay held from the checkpoint until
    // the restored server runs, established ones are locked and rebuilt; nobody sees an
    // error, and the restore lets everything through again.
    let out = run_stasis(&[
        "checkpoint",
        &pid.to_string(),
        "-o",
        img.to_str().expect("utf8"),
        "--tcp-established",
    ]);
    assert!(
        out.status.success(),
        "checkpoint (kill): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    child.wait().expect("reap the original server");
    let (mut r, _pipes) = restore(&img, true);
    assert!(
        r.wait().expect("restore --detach").success(),
        "restore failed"
    );
    wait_for(done.load(SeqCst) + 200);
    let held = std::process::Command::new("nft")
        .args(["list", "set", "inet", "stasis", "hold"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    assert!(
        !held.contains(&port.to_string()),
        "the restore must let new connections through again: {held}"
    );
    stop.store(true, SeqCst);
    for c in clients {
        c.join().expect("client thread");
    }
    let failed = failed.lock().expect("failures").clone();
    assert!(
        refused.is_empty() && failed.is_empty(),
        "{} of {CHECKPOINTS} checkpoints failed: {refused:#?}\n{} of {} requests failed: {:#?}",
        refused.len(),
        failed.len(),
        done.load(SeqCst) + failed.len() as u64,
        &failed[..failed.len().min(10)]
    );
    assert!(running_untraced(pid));
    let _ = std::fs::remove_dir_all(&dir);
}

//! Established TCP connections (`checkpoint --tcp-established`): a client outside the tree
//! keeps its one connection to a server inside it across checkpoint, kill and restore, and
//! every byte in both directions arrives exactly once, with no reconnect. The connection is
//! locked off the network (nftables) from the checkpoint until the restore.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Accepts one connection, sends BLOB_MIB MiB of a pattern (blocking while the client does
/// not read), then echoes everything until EOF. The listener stays open beside it.
const ECHO_PY: &str = r#"
import socket, sys
host = sys.argv[1]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
l = socket.socket(fam)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((host, 0))
l.listen(4)
print("ready", l.getsockname()[1], flush=True)
c, _ = l.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
c.sendall(bytes(range(256)) * (int(sys.argv[2]) * 4096))
while True:
    d = c.recv(65536)
    if not d:
        break
    c.sendall(d)
print("echoed to EOF", c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), flush=True)
"#;

const BLOB_MIB: usize = 4;

fn blob() -> Vec<u8> {
    (0..=255u8)
        .cycle()
        .take(BLOB_MIB << 20)
        .collect::<Vec<u8>>()
}

/// Starts the echo server on `host` and connects to it; returns it, the client and the port.
fn echo_server(host: &str, dir: &std::path::Path) -> (std::process::Child, TcpStream, u16) {
    let (child, line) = start_ready(
        "exec python3 -c \"$0\" \"$1\" \"$2\"",
        &[
            ECHO_PY.as_ref(),
            host.as_ref(),
            BLOB_MIB.to_string().as_ref(),
        ],
        dir,
    );
    let port: u16 = line
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .expect("ready PORT");
    let c = TcpStream::connect((host, port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    // Accepted once the blob starts to flow (not waiting in the listener's queue).
    c.peek(&mut [0u8; 1]).expect("the server's first byte");
    (child, c, port)
}

/// The client's half: reads the whole blob, then checks that `sent` (already sent) and a few
/// more rounds come back exactly once.
fn finish_client(c: &mut TcpStream, sent: &[u8]) {
    let mut got = vec![0u8; BLOB_MIB << 20];
    c.read_exact(&mut got)
        .expect("the blob, on the same connection");
    assert!(got == blob(), "the blob arrived changed");
    let mut echo = vec![0u8; sent.len()];
    c.read_exact(&mut echo).expect("the echo of what was sent");
    assert!(echo == sent, "the echo of what was sent before differs");
    for round in 0..20u32 {
        let msg = format!("round {round} ").repeat(100);
        c.write_all(msg.as_bytes()).expect("send a round");
        let mut back = vec![0u8; msg.len()];
        c.read_exact(&mut back).expect("its echo");
        assert_eq!(back, msg.as_bytes(), "round {round}");
    }
}

/// Lines of the nft set holding locked IPv4 or IPv6 connections (empty if none).
fn locked(v6: bool) -> String {
    let set = if v6 { "conn6" } else { "conn4" };
    std::process::Command::new("nft")
        .args(["list", "set", "inet", "stasis", set])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

fn can_lock() -> bool {
    have("python3") && have("nft")
}

/// What the image records of the connection: (bytes unacknowledged, bytes unread), from
/// inspect's "tcp A <-> B, N bytes unacknowledged (U unsent), M bytes unread".
fn queues(img: &std::path::Path) -> (u64, u64) {
    let v = inspect(img);
    let socket = v["processes"][0]["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .find(|f| f["kind"] == "TCP_ESTABLISHED")
        .and_then(|f| f["socket"].as_str().map(str::to_string))
        .expect("a TCP_ESTABLISHED fd");
    let parts: Vec<&str> = socket.split(", ").collect();
    let first = |i: usize| -> u64 {
        parts
            .get(i)
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("queue {i} of {socket:?}"))
    };
    (first(1), first(2))
}

fn connection_survives(host: &str) {
    if !can_lock() {
        common::skip(
            host,
            "needs python3 and nft (Debian packages python3, nftables)",
        );
        return;
    }
    init();
    let v6 = host.contains(':');
    let dir = scratch(if v6 { "tcp6" } else { "tcp4" });
    let (child, mut c, port) = echo_server(host, &dir);
    let pid = child.id() as i32;
    let _server = KillOnDrop(pid);
    // The server is blocked sending the blob; what we send now waits in its receive queue.
    let sent: Vec<u8> = (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect();
    c.write_all(&sent).expect("send");
    std::thread::sleep(Duration::from_millis(300));
    let img = dir.join("tcp.img");
    let out = stasis_ok(&[
        "checkpoint",
        &pid.to_string(),
        "-o",
        img.to_str().expect("utf8"),
        "--tcp-established",
        "--json",
    ]);
    let stats: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(stats["tcp_connections"], 1, "{out}");
    let mut child = child;
    child.wait().expect("reap original");
    let local = c.local_addr().expect("local").port();
    assert!(
        locked(v6).contains(&format!("{port} . ")) && locked(v6).contains(&format!("{local}")),
        "the connection must stay locked until restored: {}",
        locked(v6)
    );
    // Sent while the server is gone: without the lock its host would answer with a reset.
    let mut sent = sent;
    let gap = b"sent while nobody was there".repeat(10);
    c.write_all(&gap).expect("send during the gap");
    sent.extend_from_slice(&gap);
    std::thread::sleep(Duration::from_millis(100));
    let (unacked, unread) = queues(&img);
    assert!(
        unacked > 0 && unread > 0,
        "both queues must hold data: {unacked} {unread}"
    );
    let (mut r, _pipes) = restore(&img, true);
    assert!(r.wait().expect("restore --detach").success());
    assert!(
        !locked(v6).contains(&format!("{local}")),
        "the restore must unlock the connection: {}",
        locked(v6)
    );
    finish_client(&mut c, &sent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ipv4_connection_survives_checkpoint_kill_restore() {
    connection_survives("127.0.0.1");
}

#[test]
fn ipv6_connection_survives_checkpoint_kill_restore() {
    connection_survives("::1");
}

/// With --leave-running the server goes on at once on its connection, which is unlocked.
#[test]
fn connection_goes_on_after_leave_running() {
    if !can_lock() {
        common::skip(
            "tcp",
            "needs python3 and nft (Debian packages python3, nftables)",
        );
        return;
    }
    init();
    let dir = scratch("tcp-leave");
    let (child, mut c, _port) = echo_server("127.0.0.1", &dir);
    let _server = KillOnDrop(child.id() as i32);
    let sent = b"before the checkpoint".repeat(100);
    c.write_all(&sent).expect("send");
    std::thread::sleep(Duration::from_millis(200));
    let img = dir.join("leave.img");
    stasis_ok(&[
        "checkpoint",
        &child.id().to_string(),
        "-o",
        img.to_str().expect("utf8"),
        "--tcp-established",
        "--leave-running",
    ]);
    let local = c.local_addr().expect("local").port();
    assert!(
        !locked(false).contains(&format!("{local}")),
        "a running workload's connection must not stay locked"
    );
    finish_client(&mut c, &sent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without --tcp-established the connection is refused by name, and nothing is disturbed.
#[test]
fn connection_without_flag_is_refused_and_left_working() {
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("tcp-refused");
    let (child, mut c, port) = echo_server("127.0.0.1", &dir);
    let _server = KillOnDrop(child.id() as i32);
    let img = dir.join("refused.img");
    let err = stasis_fails(
        &[
            "checkpoint",
            &child.id().to_string(),
            "-o",
            img.to_str().expect("utf8"),
        ],
        4,
        "--tcp-established",
    );
    let local = c.local_addr().expect("local").port();
    assert!(
        err.contains(&format!("127.0.0.1:{port} -> 127.0.0.1:{local}")),
        "the error must name the connection: {err}"
    );
    assert!(!img.exists());
    assert!(running_untraced(child.id() as i32));
    finish_client(&mut c, b"");
    let _ = std::fs::remove_dir_all(&dir);
}

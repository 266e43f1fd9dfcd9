//! Sockets: unix socket pairs with their queues and fds in flight, TCP and unix listeners bound again, and a
//! real server (python3 -m http.server) serving after checkpoint, kill and restore.

mod common;

use common::*;
use std::io::Read;
use std::process::Command;

const SOCKETPAIR_PY: &str = r#"
import os, socket, sys
s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
q1, q2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
A, B = b"alpha" * 100, b"beta" * 50
s1.sendall(A); s2.sendall(B)
for m in (b"one", b"two", b"three"): d1.send(m)
d2.send(b"back")
for m in (b"q1", b"q22"): q1.send(m)
pid = os.fork()
if pid == 0:
    s1.close(); d1.close(); q1.close()
    for x in (s2, d2, q2): x.settimeout(10)
    got = b""
    while len(got) < len(A) + 2:
        more = s2.recv(4096)
        if not more: break
        got += more
    ok = got == A + b"GO"
    ok = ok and [d2.recv(100) for _ in range(3)] == [b"one", b"two", b"three"]
    ok = ok and [q2.recv(100) for _ in range(2)] == [b"q1", b"q22"]
    d2.setblocking(False); q2.setblocking(False)
    for extra in (d2, q2):
        try:
            extra.recv(100); ok = False
        except BlockingIOError:
            pass
    s2.sendall(b"OK" if ok else b"NO")
    os._exit(0)
s2.close(); d2.close(); q2.close()
for x in (s1, d1): x.settimeout(20)
print("ready", flush=True)
sys.stdin.readline()
s1.sendall(b"GO")
got = b""
while len(got) < len(B) + 2:
    more = s1.recv(4096)
    if not more: break
    got += more
back = d1.recv(100)
os.waitpid(pid, 0)
print("B", got[:len(B)] == B, "child", got[len(B):].decode(), "back", back.decode(), flush=True)
"#;

/// Stream, datagram and seqpacket socket pairs split between a parent and its child, with
/// data queued in both directions: after the restore every byte and message arrives once.
#[test]
fn unix_socket_pairs_keep_their_queues() {
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("socketpair");
    let (child, _) = start_ready("exec python3 -c \"$0\"", &[SOCKETPAIR_PY.as_ref()], &dir);
    let got = checkpoint_go(child, &dir.join("sp.img"));
    assert_eq!(got.trim(), "B True child OK back back");
    let _ = std::fs::remove_dir_all(&dir);
}

const IN_FLIGHT_PY: &str = r#"
import array, fcntl, os, socket, sys
def rights(*fds):
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
s1, s2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
d1, d2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
q1, q2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
r, w = os.pipe()
gr, gw = os.pipe()
for name in ("t1", "t2", "kept"):
    with open(name, "wb") as f:
        f.write(b"0123456789abcdef")
kept = os.open("kept", os.O_RDONLY); os.lseek(kept, 2, 0)
t1 = os.open("t1", os.O_RDONLY); os.lseek(t1, 4, 0)
t2 = os.open("t2", os.O_RDWR); os.lseek(t2, 8, 0)
# Its own pipe write end and a file it then closes, with bytes before and after on the
# stream: the fds must come with "F" and not with "head".
s1.sendall(b"head")
s1.sendmsg([b"F"], rights(w, t1))
s1.sendall(b"tail")
d1.send(b"plain")
d1.sendmsg([b"dg"], rights(w, t2))
q1.sendmsg([b"sq"], rights(kept))
os.close(t1); os.close(t2)
pid = os.fork()
if pid == 0:
    s1.close(); d1.close(); q1.close()
    for fd in (w, r, gw, kept): os.close(fd)
    os.read(gr, 1)
    for x in (s2, d2, q2): x.settimeout(10)
    def recv(sock, n):
        data, anc, _, _ = sock.recvmsg(n, socket.CMSG_SPACE(4 * 8))
        fds = []
        for _, _, raw in anc:
            a = array.array("i"); a.frombytes(raw[:len(raw) - len(raw) % 4]); fds += list(a)
        return data, fds
    h, hf = recv(s2, 4); f, ff = recv(s2, 100); t, tf = recv(s2, 100)
    p, pf = recv(d2, 100); g, gf = recv(d2, 100)
    q, qf = recv(q2, 100)
    checks = [
        h == b"head" and not hf and f == b"F" and len(ff) == 2 and t == b"tail" and not tf,
        p == b"plain" and not pf and g == b"dg" and len(gf) == 2,
        q == b"sq" and len(qf) == 1,
    ]
    if all(checks):
        os.write(ff[0], b"S"); os.write(gf[0], b"D")
        checks += [
            os.read(ff[1], 4) == b"4567",
            os.read(gf[1], 4) == b"89ab",
            fcntl.fcntl(gf[1], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR,
            os.read(qf[0], 3) == b"234",
        ]
    print("child", "".join("1" if c else "0" for c in checks), flush=True)
    os._exit(0)
os.close(gr)
s2.close(); d2.close(); q2.close()
print("ready", flush=True)
sys.stdin.readline()
os.write(gw, b"g")
_, st = os.waitpid(pid, 0)
os.close(w)
print("parent", st, os.read(r, 10).decode(), os.lseek(kept, 0, os.SEEK_CUR), flush=True)
"#;

/// Fds in flight (SCM_RIGHTS) on stream, datagram and seqpacket pairs, not yet received by
/// the child: the parent's own pipe write end and kept file (one description with its fds),
/// and files it closed after sending. After the restore the child receives the same bytes
/// with the same fds at the same point, writes through the pipe, reads the files at their
/// offsets, and the parent sees the kept file's shared offset move.
#[test]
fn unix_sockets_keep_fds_in_flight() {
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("inflight");
    let (child, _) = start_ready("exec python3 -c \"$0\"", &[IN_FLIGHT_PY.as_ref()], &dir);
    let img = dir.join("if.img");
    let (r, mut pipes) = checkpoint_and_restore(child, &img);
    // The image names them: three descriptions the tree holds, two files nobody does.
    let v = inspect(&img);
    let in_flight: Vec<serde_json::Value> = v["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .flat_map(|p| p["unix_pairs"].as_array().into_iter().flatten())
        .flat_map(|u| {
            let q = |k: &str| u[k].as_array().cloned().unwrap_or_default();
            [q("queued_for_id"), q("queued_for_peer")].concat()
        })
        .flat_map(|m| m["in_flight"].as_array().cloned().unwrap_or_default())
        .collect();
    let held = in_flight.iter().filter(|f| f["desc_id"] != 0).count();
    let paths: Vec<&str> = in_flight
        .iter()
        .filter_map(|f| f["file"]["path"].as_str())
        .collect();
    assert_eq!(held, 3, "{in_flight:?}");
    assert_eq!(paths.len(), 2, "{in_flight:?}");
    assert!(paths
        .iter()
        .all(|p| p.ends_with("/t1") || p.ends_with("/t2")));
    pipes.send("go");
    let got = output_of(r, pipes);
    assert_eq!(got.trim(), "child 1111111\nparent 0 SD 5");
    let _ = std::fs::remove_dir_all(&dir);
}

const LISTENER_PY: &str = r#"
import socket, struct, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 300000)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 7))
bufs = srv.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
srv.bind(("127.0.0.1", 0))
srv.listen(7)
print("ready", srv.getsockname()[1], flush=True)
sys.stdin.readline()
srv.settimeout(20)
c, _ = srv.accept()
c.settimeout(20)
data = c.recv(100)
c.sendall(data.upper())
c.close()
print("served", data.decode(),
      srv.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0,
      srv.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0,
      srv.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == bufs,
      struct.unpack("ii", srv.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)), flush=True)
"#;

/// A TCP listener (no connection waiting) comes back bound to its port with its options
/// (including buffer size and linger) and accepts a new client.
#[test]
fn tcp_listener_is_bound_again_and_accepts() {
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("listener");
    let (child, line) = start_ready("exec python3 -c \"$0\"", &[LISTENER_PY.as_ref()], &dir);
    let port: u16 = line
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .expect("ready PORT");
    let got = checkpoint_go_with(child, &dir.join("l.img"), || {
        use std::io::Write;
        let mut client = connect_retry(port);
        client.write_all(b"hello").expect("send");
        let mut echoed = String::new();
        client.read_to_string(&mut echoed).expect("recv");
        assert_eq!(echoed, "HELLO");
    });
    assert_eq!(got.trim(), "served hello True True True (1, 7)");
    let _ = std::fs::remove_dir_all(&dir);
}

const UNIX_LISTENER_PY: &str = r#"
import socket, sys
path = sys.argv[1]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(3)
abstract = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
abstract.bind(b"\0" + path.encode())
abstract.listen(2)
print("ready", flush=True)
sys.stdin.readline()
out = []
for s in (srv, abstract):
    s.settimeout(20)
    c, _ = s.accept()
    c.settimeout(20)
    out.append(c.recv(100).decode())
    c.sendall(b"ok")
    c.close()
print("served", *out, flush=True)
"#;

/// Unix listeners on a path and on an abstract name come back bound (the stale socket file
/// the dead original left is replaced) and accept new clients.
#[test]
fn unix_listeners_are_bound_again_and_accept() {
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("unixlisten");
    let path = dir.join("srv.sock");
    let script = "exec python3 -c \"$0\" \"$1\"";
    let (child, _) = start_ready(script, &[UNIX_LISTENER_PY.as_ref(), path.as_ref()], &dir);
    let talk = |addr: &str, ty: i32| -> String {
        let code = format!(
            "import socket,sys,time\n\
             s=socket.socket(socket.AF_UNIX,{ty})\n\
             a=sys.argv[1]\n\
             a=b'\\0'+a[1:].encode() if a.startswith('@') else a\n\
             for i in range(2000):\n\
             \x20   try:\n\
             \x20       s.connect(a); break\n\
             \x20   except OSError: time.sleep(0.01)\n\
             s.send(b'hi{ty}')\n\
             print(s.recv(10).decode())\n"
        );
        let out = Command::new("python3")
            .args(["-c", &code, addr])
            .output()
            .expect("client");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let p = path.to_str().expect("utf8");
    let got = checkpoint_go_with(child, &dir.join("u.img"), || {
        assert_eq!(talk(p, libc::SOCK_STREAM), "ok");
        assert_eq!(talk(&format!("@{p}"), libc::SOCK_SEQPACKET), "ok");
    });
    assert_eq!(got.trim(), "served hi1 hi5");
    let _ = std::fs::remove_dir_all(&dir);
}

const UNIX_CONNECTED_PY: &str = r#"
import os, socket, sys
p = os.path.join(sys.argv[1], "gone.sock")
l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
l.bind(p)
l.listen(2)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
c.connect(p)
a, _ = l.accept()
os.unlink(p)
c.sendall(b"to-server")
a.sendall(b"to-client")
print("ready", flush=True)
sys.stdin.readline()
for s in (a, c):
    s.settimeout(20)
ok1 = a.recv(100) == b"to-server"
ok2 = c.recv(100) == b"to-client"
c.sendall(b"more")
ok3 = a.recv(100) == b"more"
print("unix", ok1, ok2, ok3, l.getsockname() == p, not os.path.exists(p), flush=True)
"#;

/// A connection accepted from a unix listener (both ends in the tree, data queued both
/// ways) carries on, and a listener whose path was unlinked keeps its name without the file.
#[test]
fn unix_connections_and_unlinked_names_survive() {
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("unixconn");
    let script = "exec python3 -c \"$0\" \"$1\"";
    let (child, _) = start_ready(script, &[UNIX_CONNECTED_PY.as_ref(), dir.as_ref()], &dir);
    let img = dir.join("c.img");
    let (r, mut pipes) = checkpoint_and_restore(child, &img);
    let listening = inspect(&img)["processes"][0]["fds"]
        .as_array()
        .expect("fds")
        .iter()
        .filter_map(|f| f["socket"].as_str().map(str::to_string))
        .find(|s| s.starts_with("unix listening"))
        .expect("a listener");
    assert!(listening.ends_with("(deleted)"), "{listening}");
    pipes.send("go");
    assert_eq!(output_of(r, pipes).trim(), "unix True True True True True");
    let _ = std::fs::remove_dir_all(&dir);
}

const UNIX_DGRAM_PY: &str = r#"
import os, socket, sys
p = os.path.join(sys.argv[1], "dgram.sock")
srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
srv.bind(p)
hidden = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
hidden.bind(b"\0stasis-dgram-" + str(os.getpid()).encode())
cli = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
print("ready", flush=True)
sys.stdin.readline()
srv.settimeout(20); hidden.settimeout(20)
cli.sendto(b"to-path", p)
cli.sendto(b"to-abstract", hidden.getsockname())
print("dgram", srv.recv(100).decode(), hidden.recv(100).decode(),
      srv.getsockname() == p, flush=True)
"#;

/// Unconnected datagram unix sockets come back: one bound to a path, one to an abstract
/// name, and an unbound one that names its destination in each sendto.
#[test]
fn unix_datagram_sockets_are_bound_again() {
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("unixdgram");
    let script = "exec python3 -c \"$0\" \"$1\"";
    let (child, _) = start_ready(script, &[UNIX_DGRAM_PY.as_ref(), dir.as_ref()], &dir);
    let got = checkpoint_go(child, &dir.join("d.img"));
    assert_eq!(got.trim(), "dgram to-path to-abstract True");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The multithreaded `python3 -m http.server` (a real server nobody here wrote), having
/// served a request, is checkpointed, killed and restored, and serves the file again.
#[test]
fn python_http_server_serves_after_restore() {
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("httpserver");
    let body = "stasis was here\n".repeat(1000);
    std::fs::write(dir.join("page.txt"), &body).expect("write page");
    // Port 0 is not offered by http.server: take a free one from the kernel.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut cmd = shell(
        "exec python3 -u -m http.server --bind 127.0.0.1 \"$0\"",
        &dir,
    );
    cmd.arg(port.to_string());
    let mut child = cmd.spawn().expect("http.server");
    let before = http_get(port, "/page.txt");
    assert!(
        before.ends_with(&body),
        "served before: {}",
        &before[..before.len().min(200)]
    );
    let img = dir.join("http.img");
    // The thread that served the request may still hold its connection for a moment; a
    // checkpoint then is refused (leaving the server running) and is simply tried again.
    let pid = child.id().to_string();
    let args = [
        "checkpoint",
        pid.as_str(),
        "-o",
        img.to_str().expect("utf8"),
    ];
    for attempt in 0.. {
        let out = run_stasis(&args);
        if out.status.success() {
            break;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            attempt < 100 && out.status.code() == Some(4) && err.contains("socket"),
            "checkpoint of http.server: {err}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait().expect("reap original");
    let (mut r, _pipes) = restore(&img, true);
    let _server = KillOnDrop(child.id() as i32);
    assert!(r.wait().expect("restore --detach").success());
    let after = http_get(port, "/page.txt");
    assert!(
        after.starts_with("HTTP/1.0 200"),
        "{}",
        &after[..after.len().min(200)]
    );
    assert!(
        after.ends_with(&body),
        "the restored server served something else"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

const UDP_PY: &str = r#"
import socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0))
peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
peer.bind(("127.0.0.1", 0))
peer.connect(srv.getsockname())
print("ready", srv.getsockname()[1], flush=True)
sys.stdin.readline()
srv.settimeout(20)
peer.settimeout(20)
data, addr = srv.recvfrom(100)
srv.sendto(data.upper(), addr)
peer.send(b"from-peer")
got, addr2 = srv.recvfrom(100)
print("udp", data.decode(), got.decode(), addr2 == peer.getsockname(),
      srv.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0, flush=True)
"#;

/// Bound and connected UDP sockets come back on their ports: a client's datagram reaches
/// the restored server, and its connected peer still sends from the same address.
#[test]
fn udp_sockets_are_bound_and_connected_again() {
    if !have("python3") {
        return;
    }
    init();
    let dir = scratch("udp");
    let (child, line) = start_ready("exec python3 -c \"$0\"", &[UDP_PY.as_ref()], &dir);
    let port: u16 = line
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .expect("ready PORT");
    let got = checkpoint_go_with(child, &dir.join("udp.img"), || {
        let c = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        c.set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .expect("timeout");
        // The server may still be coming back: send until it answers.
        let mut buf = [0u8; 16];
        let mut answer = None;
        for _ in 0..100 {
            c.send_to(b"ping", ("127.0.0.1", port)).expect("send");
            if let Ok((n, _)) = c.recv_from(&mut buf) {
                answer = Some(String::from_utf8_lossy(&buf[..n]).to_string());
                break;
            }
        }
        assert_eq!(answer.as_deref(), Some("PING"));
    });
    // The first datagram to arrive is the one answered; a retry may arrive later unread.
    assert!(got.starts_with("udp ping from-peer True True"), "{got}");
    let _ = std::fs::remove_dir_all(&dir);
}

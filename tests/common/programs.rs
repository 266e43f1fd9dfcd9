//! Helpers for tests that run real programs (shells, python, servers) as process trees.

use super::*;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

/// A command whose child keeps only standard I/O (the test runner may leak other fds), with
/// stdin and stdout piped and stderr discarded.
pub fn clean(program: &str) -> Command {
    let mut c = Command::new(program);
    // SAFETY: the closure runs between fork and exec and only calls close_range, which is
    // async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    c
}

/// `sh -c script` in `dir` with only standard I/O open, stdin closed, stdout piped.
pub fn shell(script: &str, dir: &Path) -> Command {
    let mut c = clean("sh");
    c.args(["-c", script]).current_dir(dir).stdin(Stdio::null());
    c
}

/// Waits until `pid` has at least `n` descendants whose command is one of `comms`.
pub fn wait_for_tree(pid: i32, comms: &[&str], n: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let found = descendants(pid)
            .into_iter()
            .filter(|d| {
                let comm = std::fs::read_to_string(format!("/proc/{d}/comm")).unwrap_or_default();
                comms.contains(&comm.trim())
            })
            .count();
        if found >= n {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// `stasis image inspect --json` of `img`.
pub fn inspect(img: &Path) -> serde_json::Value {
    let out = stasis_ok(&["image", "inspect", "--json", img.to_str().expect("utf8")]);
    serde_json::from_str(&out).expect("inspect json")
}

/// (processes, bytes buffered in the image's pipes).
pub fn tree_facts(img: &Path) -> (usize, u64) {
    let v = inspect(img);
    let procs = v["processes"].as_array().expect("processes");
    let buffered = procs
        .iter()
        .flat_map(|p| p["pipes"].as_array().into_iter().flatten())
        .map(|x| x["buffered"].as_u64().unwrap_or(0))
        .sum();
    (procs.len(), buffered)
}

/// Checkpoints (kill) the tree of `child`, reaps what it leaves behind with this test (a
/// subreaper), and starts `stasis restore` of it, whose stdio are the returned pipes.
pub fn checkpoint_and_restore(mut child: Child, img: &Path) -> (Child, Pipes) {
    let tree = descendants(child.id() as i32);
    stasis_ok(&[
        "checkpoint",
        &child.id().to_string(),
        "-o",
        img.to_str().expect("utf8"),
    ]);
    child.wait().expect("reap original");
    reap_orphans(&tree);
    restore(img, false)
}

/// Everything the restored tree prints until it exits; it must exit successfully.
pub fn output_of(mut r: Child, mut pipes: Pipes) -> String {
    let mut got = String::new();
    pipes
        .stdout
        .read_to_string(&mut got)
        .expect("read restored output");
    let st = r.wait().expect("stasis restore");
    assert!(st.success(), "restored tree exited with {st}");
    got
}

/// Checkpoints (kill) the tree of `child`, restores it, and returns what it then prints.
pub fn checkpoint_kill_restore(child: Child, img: &Path) -> String {
    let (r, pipes) = checkpoint_and_restore(child, img);
    output_of(r, pipes)
}

/// Starts `sh -c script ARGS...` in `dir` (stdin piped) and waits for its first line, which
/// must start with "ready"; returns the child and that line.
pub fn start_ready(script: &str, args: &[&std::ffi::OsStr], dir: &Path) -> (Child, String) {
    let mut cmd = shell(script, dir);
    cmd.args(args).stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("starting the program");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    assert!(line.starts_with("ready"), "the program said {line:?}");
    (child, line.trim().to_string())
}

/// Checkpoints (kill) the tree of a program started by [`start_ready`], restores it, says
/// "go" on its stdin, and returns everything it prints until it exits (successfully).
pub fn checkpoint_go(child: Child, img: &Path) -> String {
    checkpoint_go_with(child, img, || {})
}

/// Like [`checkpoint_go`], running `during` (a client, say) after "go" while the restored
/// program runs.
pub fn checkpoint_go_with(child: Child, img: &Path, during: impl FnOnce()) -> String {
    let (r, mut pipes) = checkpoint_and_restore(child, img);
    pipes.send("go");
    during();
    output_of(r, pipes)
}

/// A connection to 127.0.0.1:`port`, retried while a restore running beside the test brings
/// the listener back; reads time out after 20 s.
pub fn connect_retry(port: u16) -> std::net::TcpStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    let c = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(e) if Instant::now() >= deadline => panic!("connect to port {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    c
}

/// GET `path` from 127.0.0.1:`port` with HTTP/1.0, retrying the connect while the server is
/// being restored; returns the whole response.
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::Write;
    let mut c = connect_retry(port);
    write!(c, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("response");
    out
}

/// A TCP port on 127.0.0.1 that is free now, for servers that must be told their port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Connections a server holds on its local `port` (as /proc/net/tcp and tcp6 show them):
/// (state, bytes not yet acknowledged by the peer) of each socket being set up, established
/// or half-closed by the peer. Listeners and TIME_WAIT leftovers, which no fd holds, are
/// not counted.
pub fn server_connections(port: u16) -> Vec<(u8, u64)> {
    const ESTABLISHED: u8 = 0x01;
    const SYN_RECV: u8 = 0x03;
    const CLOSE_WAIT: u8 = 0x08;
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(queues)) = (f.get(1), f.get(3), f.get(4)) else {
                continue;
            };
            let lport = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let state = u8::from_str_radix(state, 16).unwrap_or(0);
            let tx = queues
                .split(':')
                .next()
                .and_then(|q| u64::from_str_radix(q, 16).ok())
                .unwrap_or(0);
            if lport == Some(port) && [ESTABLISHED, SYN_RECV, CLOSE_WAIT].contains(&state) {
                out.push((state, tx));
            }
        }
    }
    out
}

/// Waits (bounded) until the server on `port` holds no connection.
pub fn wait_no_connections(port: u16) {
    wait_connections(port, 0);
}

/// Waits (bounded) until the server on `port` holds `n` connections: those of clients
/// that have finished are let go.
pub fn wait_connections(port: u16, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while server_connections(port).len() != n {
        assert!(
            Instant::now() < deadline,
            "the server on port {port} holds {:?}, not {n} connections",
            server_connections(port)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `stasis checkpoint PID -o IMG EXTRA...` of an idle server. A server that has just let a
/// client go may still hold the connection for a moment; the checkpoint is then refused
/// (exit 4, leaving the server running) and is simply tried again, a bounded number of times.
pub fn checkpoint_idle(pid: i32, img: &Path, extra: &[&str]) {
    let pid = pid.to_string();
    let mut args = vec![
        "checkpoint",
        pid.as_str(),
        "-o",
        img.to_str().expect("utf8"),
    ];
    args.extend_from_slice(extra);
    for attempt in 0.. {
        let out = run_stasis(&args);
        if out.status.success() {
            return;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            attempt < 100 && out.status.code() == Some(4) && err.contains("socket"),
            "stasis {args:?} ({}): {err}",
            out.status
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to `limit` for a child (or orphan handed to this subreaper) to exit; returns
/// its raw wait status, or None if it is still running.
pub fn wait_exit(pid: i32, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: status is a valid c_int; pid is a process of this test.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        if r == pid {
            return Some(status);
        }
        assert!(
            r == 0,
            "waitpid({pid}): {}",
            std::io::Error::last_os_error()
        );
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills (SIGKILL) a process and every descendant it has at that moment when dropped, each
/// by PID through [`KillOnDrop`]: the root first, so its children come to this test (a
/// subreaper) and are reaped here. For servers that fork workers (nginx).
pub struct KillTreeOnDrop(pub i32);

impl Drop for KillTreeOnDrop {
    fn drop(&mut self) {
        let tree = descendants(self.0);
        let guards: Vec<KillOnDrop> = std::iter::once(self.0)
            .chain(tree)
            .map(KillOnDrop)
            .collect();
        drop(guards);
    }
}

/// `stasis checkpoint PID -o IMG EXTRA... --json`, which must succeed; returns its stats.
pub fn checkpoint_stats(pid: i32, img: &Path, extra: &[&str]) -> serde_json::Value {
    let pid = pid.to_string();
    let mut args = vec![
        "checkpoint",
        &pid,
        "-o",
        img.to_str().expect("utf8"),
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = stasis_ok(&args);
    serde_json::from_str(&out).expect("checkpoint --json")
}

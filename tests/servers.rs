//! Real servers from Debian packages (redis-server, nginx) checkpointed, killed and restored:
//! idle (no client connected at the checkpoint), and with a client whose TCP connection is
//! carried across the checkpoint (`--tcp-established`) and used on afterwards.
//!
//! Each server runs in the test's scratch directory on a free 127.0.0.1 port and is killed
//! by PID when its test ends, pass or fail.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

/// Keys in the redis data set.
const KEYS: usize = 5000;

/// Size of the file nginx serves.
const BIG: u64 = 64 << 20;

/// How long a restored server may take to come back, or a client to hear from it.
const LIMIT: Duration = Duration::from_secs(60);

/// The value of key `key:I` in the data set (a few bytes to a few hundred).
fn value(i: usize) -> String {
    format!("value-{i}-{}", "stasis".repeat(i % 50))
}

/// One redis command in RESP.
fn resp(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

/// Sends `args` on `c` and reads an answer of exactly `expect.len()` bytes.
fn resp_call(c: &mut std::net::TcpStream, args: &[&str], expect: &str) {
    c.write_all(&resp(args)).expect("send to redis");
    let mut got = vec![0u8; expect.len()];
    c.read_exact(&mut got).expect("redis answer");
    assert_eq!(String::from_utf8_lossy(&got), expect, "redis {args:?}");
}

/// Starts redis-server in `dir` on a free port, without persistence, and waits until it
/// answers PING. The guard kills it by PID.
fn start_redis(dir: &Path) -> (Child, u16, KillOnDrop) {
    let port = free_port();
    let mut cmd = clean("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let child = cmd.spawn().expect("starting redis-server");
    let guard = KillOnDrop(child.id() as i32);
    resp_call(&mut connect_retry(port), &["PING"], "+PONG\r\n");
    (child, port, guard)
}

/// Loads the data set (KEYS keys, pipelined on one connection that is then closed) and
/// waits until the server has let that connection go.
fn load_data_set(port: u16) {
    let mut c = connect_retry(port);
    let mut batch = Vec::new();
    for i in 0..KEYS {
        batch.extend(resp(&["SET", &format!("key:{i}"), &value(i)]));
    }
    c.write_all(&batch).expect("send the data set");
    let mut replies = vec![0u8; 5 * KEYS];
    c.read_exact(&mut replies).expect("replies to SET");
    assert_eq!(replies, b"+OK\r\n".repeat(KEYS), "loading the data set");
    resp_call(&mut c, &["DBSIZE"], &format!(":{KEYS}\r\n"));
    drop(c);
    wait_no_connections(port);
}

/// The sorted names of the threads of `pid`.
fn thread_names(pid: i32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect();
    names.sort();
    names
}

/// The Uid: line of `pid`.
fn uids(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or_default()
        .to_string()
}

/// `stasis restore IMG --detach`, bounded; asserts it succeeded and printed `pid`.
fn restore_detached(img: &Path, pid: i32) {
    let (procs, _) = tree_facts(img);
    let size = std::fs::metadata(img).map(|m| m.len()).unwrap_or(0);
    eprintln!("restoring PID {pid}: {procs} processes, {size} bytes of image");
    let (r, mut pipes) = restore(img, true);
    let status = wait_exit(r.id() as i32, LIMIT).expect("stasis restore --detach hangs");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "stasis restore --detach failed (wait status {status:#x})"
    );
    assert_eq!(pipes.expect_line(&[""]), pid.to_string());
}

/// Checkpoints `pid` with --tcp-established (kill), reaps it and the rest of its tree
/// (`tree`), and restores it detached.
fn checkpoint_established_restore(child: &mut Child, tree: &[i32], img: &Path) {
    let pid = child.id() as i32;
    stasis_ok(&[
        "checkpoint",
        &pid.to_string(),
        "-o",
        img.to_str().expect("utf8"),
        "--tcp-established",
    ]);
    child.wait().expect("reap original");
    reap_orphans(tree);
    restore_detached(img, pid);
}

/// An interactive program held across a checkpoint (redis-cli on a pipe, which runs each
/// line as it arrives and prints each answer at once): one line in, one line out, every
/// read bounded. Its stderr goes to the same pipe, so an error is the answer a test sees.
struct Session {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    buf: Vec<u8>,
}

impl Session {
    /// `redis-cli -p PORT`, connected at once and kept connected.
    fn redis_cli(port: u16, dir: &Path) -> Session {
        let mut cmd = shell("exec redis-cli -p \"$0\" 2>&1", dir);
        cmd.arg(port.to_string())
            .env("REDISCLI_HISTFILE", "/dev/null")
            .stdin(Stdio::piped());
        let mut child = cmd.spawn().expect("starting redis-cli");
        Session {
            stdin: child.stdin.take().expect("stdin"),
            stdout: child.stdout.take().expect("stdout"),
            child,
            buf: Vec::new(),
        }
    }

    /// Sends one command line and returns the one-line answer.
    fn ask(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").expect("write to redis-cli");
        self.stdin.flush().expect("flush");
        self.line(line)
    }

    fn line(&mut self, what: &str) -> String {
        let deadline = Instant::now() + LIMIT;
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                return String::from_utf8_lossy(&line).trim_end().to_string();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no answer to {what:?}");
            let mut pfd = libc::pollfd {
                fd: self.stdout.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: pfd is one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            if n <= 0 {
                continue;
            }
            let mut chunk = [0u8; 4096];
            let got = self.stdout.read(&mut chunk).expect("read redis-cli");
            assert!(got > 0, "redis-cli exited while answering {what:?}");
            self.buf.extend_from_slice(&chunk[..got]);
        }
    }

    /// The id and client address redis gives this connection: both stay the same only if
    /// it is the same connection (a reconnect gets a new id and, mostly, a new port).
    fn identity(&mut self) -> String {
        let info = self.ask("CLIENT INFO");
        let pick = |k: &str| {
            info.split_whitespace()
                .find(|f| f.starts_with(k))
                .unwrap_or_else(|| panic!("no {k} in CLIENT INFO: {info}"))
                .to_string()
        };
        format!("{} {}", pick("id="), pick("addr="))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        kill(self.child.id() as i32);
        let _ = self.child.wait();
    }
}

/// redis-server with a data set and no client is checkpointed, killed and restored: it comes
/// back with every thread, answers on its port, and still has the data set.
#[test]
fn redis_keeps_its_data_set_across_checkpoint_kill_restore() {
    if !have("redis-server") {
        return;
    }
    init();
    let dir = scratch("redis-idle");
    let (mut child, port, _server) = start_redis(&dir);
    let pid = child.id() as i32;
    load_data_set(port);
    let threads = thread_names(pid);

    let img = dir.join("redis.img");
    checkpoint_idle(pid, &img, &[]);
    child.wait().expect("reap original");
    restore_detached(&img, pid);

    assert!(
        running_untraced(pid),
        "restored redis-server is not running"
    );
    assert_eq!(thread_names(pid), threads, "threads of the restored redis");
    let mut c = connect_retry(port);
    resp_call(&mut c, &["DBSIZE"], &format!(":{KEYS}\r\n"));
    for i in [0, 1, 49, 1234, KEYS - 1] {
        let v = value(i);
        resp_call(
            &mut c,
            &["GET", &format!("key:{i}")],
            &format!("${}\r\n{v}\r\n", v.len()),
        );
    }
    resp_call(&mut c, &["SET", "after", "restore"], "+OK\r\n");
    resp_call(&mut c, &["GET", "after"], "$7\r\nrestore\r\n");
    resp_call(&mut c, &["DBSIZE"], &format!(":{}\r\n", KEYS + 1));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A redis-cli session connected to redis-server stays connected across checkpoint, kill and
/// restore of the server: on the same connection it reads the data set and writes new keys.
#[test]
fn redis_cli_session_survives_checkpoint_kill_restore() {
    if !have("redis-server") || !have("redis-cli") {
        return;
    }
    init();
    let dir = scratch("redis-session");
    let (mut child, port, _server) = start_redis(&dir);
    load_data_set(port);
    let mut cli = Session::redis_cli(port, &dir);
    assert_eq!(cli.ask("GET key:7"), value(7));
    let who = cli.identity();
    wait_connections(port, 1);

    checkpoint_established_restore(&mut child, &[], &dir.join("redis.img"));

    assert_eq!(cli.identity(), who, "redis-cli reconnected");
    assert_eq!(cli.ask("DBSIZE"), KEYS.to_string());
    for i in [0, 7, 49, 2500, KEYS - 1] {
        assert_eq!(cli.ask(&format!("GET key:{i}")), value(i), "key:{i}");
    }
    assert_eq!(cli.ask("SET after restore"), "OK");
    assert_eq!(cli.ask("GET after"), "restore");
    assert_eq!(cli.ask("DBSIZE"), (KEYS + 1).to_string());
    assert_eq!(cli.identity(), who, "redis-cli reconnected");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The big file a test wrote; removed when the test ends, pass or fail (the rest of the
/// scratch directory, logs and images, is kept when a test fails).
struct BigFile(std::path::PathBuf);

impl Drop for BigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes BIG bytes of known, incompressible content to `path`; returns their hash.
fn write_big_file(path: &Path) -> (BigFile, blake3::Hash) {
    let file = BigFile(path.to_path_buf());
    let mut out = std::fs::File::create(path).expect("create big file");
    let mut xof = blake3::Hasher::new()
        .update(b"stasis servers test")
        .finalize_xof();
    let mut hash = blake3::Hasher::new();
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..BIG / chunk.len() as u64 {
        xof.fill(&mut chunk);
        out.write_all(&chunk).expect("write big file");
        hash.update(&chunk);
    }
    (file, hash.finalize())
}

/// Whether every directory above and including `dir` may be entered by anybody (so
/// nginx's workers, running as nobody, reach the files in it).
fn reachable_by_all(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    dir.ancestors()
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// Starts nginx (master and two workers, in the foreground) serving `dir`/www on a free
/// port, with every path it writes inside `dir`; returns the master, the port, the workers
/// and a guard that kills the whole tree by PID.
fn start_nginx(dir: &Path) -> (Child, u16, Vec<i32>, KillTreeOnDrop) {
    let port = free_port();
    let d = dir.to_str().expect("utf8");
    // Workers run as nobody, as nginx runs in the wild, unless the scratch directory sits
    // somewhere nobody may not enter.
    let user = if reachable_by_all(dir) {
        ""
    } else {
        eprintln!("nginx: {d} is not reachable by nobody: workers run as root");
        "user root root;"
    };
    let conf = format!(
        "{user}
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {d}/www;
        location = /status {{ stub_status; }}
    }}
}}
"
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("write nginx.conf");
    let mut cmd = clean("nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .args(["-g", "daemon off; master_process on;"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let child = cmd.spawn().expect("starting nginx");
    let master = child.id() as i32;
    let guard = KillTreeOnDrop(master);
    assert!(
        wait_for_tree(master, &["nginx"], 2),
        "nginx did not start its two workers: {}",
        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
    );
    let mut workers = descendants(master);
    workers.sort();
    assert_eq!(workers.len(), 2, "nginx workers {workers:?}");
    // A worker names itself once it has set itself up (dropped to nobody, made its epoll).
    let deadline = Instant::now() + LIMIT;
    for w in &workers {
        while !std::fs::read_to_string(format!("/proc/{w}/cmdline"))
            .unwrap_or_default()
            .starts_with("nginx: worker process")
        {
            assert!(Instant::now() < deadline, "nginx worker {w} did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    drop(connect_retry(port));
    (child, port, workers, guard)
}

/// An HTTP/1.0 download of /big.bin, read at the pace the test chooses, hashed as it comes.
struct Download {
    stream: std::net::TcpStream,
    hash: blake3::Hasher,
    got: u64,
}

impl Download {
    /// Sends the request and reads the response head, which must announce BIG bytes.
    fn start(port: u16) -> Download {
        let mut stream = connect_retry(port);
        stream
            .write_all(b"GET /big.bin HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .expect("send request");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert!(head.len() < 4096, "response head too long");
            stream.read_exact(&mut byte).expect("response head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {BIG}\r\n")),
            "{head}"
        );
        Download {
            stream,
            hash: blake3::Hasher::new(),
            got: 0,
        }
    }

    /// Reads at most `max` bytes of the body; returns how many came.
    fn read_some(&mut self, max: usize) -> usize {
        let mut buf = vec![0u8; max];
        let n = self.stream.read(&mut buf).expect("read body");
        self.hash.update(&buf[..n]);
        self.got += n as u64;
        n
    }

    /// Reads the rest of the body; asserts its length and hash.
    fn finish(mut self, expect: &blake3::Hash) {
        while self.read_some(1 << 20) > 0 {}
        assert_eq!(self.got, BIG, "body length");
        assert_eq!(&self.hash.finalize(), expect, "body hash");
    }
}

/// The inodes of the shared anonymous mappings (nginx's shared memory zone) of `pid`.
fn shared_zones(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" rw-s ") && l.contains("/dev/zero"))
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .collect()
}

/// Asserts master and workers map the same shared memory.
fn assert_one_shared_zone(master: i32, workers: &[i32]) {
    let zones = shared_zones(master);
    assert!(!zones.is_empty(), "nginx master maps no shared memory");
    for w in workers {
        assert_eq!(shared_zones(*w), zones, "shared memory of worker {w}");
    }
}

/// The requests nginx has served (this one included), as stub_status counts them in the
/// shared memory every worker adds to.
fn nginx_requests(port: u16) -> u64 {
    let page = http_get(port, "/status");
    let mut lines = page
        .lines()
        .skip_while(|l| !l.starts_with("server accepts"));
    lines
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("stub_status page: {page}"))
}

/// Asserts the restored nginx is its old tree (master and the same workers, running, with
/// the same credentials, one shared memory zone with the counts from before the checkpoint,
/// `requests` then), serves the file again, and shuts down gracefully on SIGQUIT (which the
/// master passes to its workers over their socketpair channels).
fn check_restored_nginx(
    master: i32,
    workers: &[i32],
    worker_uids: &[String],
    port: u16,
    file: &blake3::Hash,
    requests: u64,
    guard: KillTreeOnDrop,
) {
    let mut now = descendants(master);
    now.sort();
    assert_eq!(now, workers, "the restored master's workers");
    for (w, u) in workers.iter().zip(worker_uids) {
        assert!(running_untraced(*w), "worker {w} is not running");
        assert_eq!(&uids(*w), u, "credentials of worker {w}");
    }
    assert_one_shared_zone(master, workers);
    for _ in 0..3 {
        Download::start(port).finish(file);
    }
    assert_eq!(nginx_requests(port), requests + 4, "requests served");
    wait_no_connections(port);
    kill_with(master, libc::SIGQUIT);
    let status = wait_exit(master, LIMIT).expect("nginx did not quit on SIGQUIT");
    // The master is reaped: its PID is not this test's to kill any more. Its workers should
    // have been reaped by it; any left came to this test and are killed.
    std::mem::forget(guard);
    let left: Vec<KillOnDrop> = workers
        .iter()
        .filter(|w| Path::new(&format!("/proc/{w}")).exists())
        .map(|&w| KillOnDrop(w))
        .collect();
    assert!(left.is_empty(), "workers outlived their master");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "nginx quit with wait status {status:#x}"
    );
}

/// Sends `sig` to a process this test started.
fn kill_with(pid: i32, sig: i32) {
    // SAFETY: kill takes no pointers; pid is a process this test started (restored).
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// nginx (master and two workers: epoll, eventfd, shared memory, socketpair channels,
/// workers as nobody) having served a 64 MiB file with sendfile, no client connected, is
/// checkpointed, killed and restored; the same tree serves the file again and quits cleanly.
#[test]
fn nginx_serves_again_after_checkpoint_kill_restore() {
    if !have_with("nginx", "-v") {
        return;
    }
    init();
    let dir = scratch("nginx-idle");
    std::fs::create_dir_all(dir.join("www")).expect("www");
    let (_big, file) = write_big_file(&dir.join("www/big.bin"));
    let (mut child, port, workers, guard) = start_nginx(&dir);
    let master = child.id() as i32;
    let worker_uids: Vec<String> = workers.iter().map(|&w| uids(w)).collect();
    Download::start(port).finish(&file);
    assert_one_shared_zone(master, &workers);
    let requests = nginx_requests(port);
    wait_no_connections(port);

    let img = dir.join("nginx.img");
    checkpoint_idle(master, &img, &[]);
    child.wait().expect("reap original");
    reap_orphans(&workers);
    restore_detached(&img, master);

    check_restored_nginx(master, &workers, &worker_uids, port, &file, requests, guard);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client downloading a 64 MiB file from nginx, slowly, keeps its connection across
/// checkpoint, kill and restore of the server and finishes the download on it: every byte
/// arrives once, in order.
#[test]
fn nginx_download_survives_checkpoint_kill_restore() {
    if !have_with("nginx", "-v") {
        return;
    }
    init();
    let dir = scratch("nginx-download");
    std::fs::create_dir_all(dir.join("www")).expect("www");
    let (_big, file) = write_big_file(&dir.join("www/big.bin"));
    let (mut child, port, workers, guard) = start_nginx(&dir);
    let master = child.id() as i32;
    let worker_uids: Vec<String> = workers.iter().map(|&w| uids(w)).collect();

    let mut download = Download::start(port);
    while download.got < 4 << 20 {
        download.read_some(16 << 10);
        std::thread::sleep(Duration::from_millis(1));
    }
    // The worker has filled the socket buffers and waits for the client to read on.
    std::thread::sleep(Duration::from_millis(100));
    let requests = nginx_requests(port);
    wait_connections(port, 1);
    eprintln!(
        "nginx holds {:?} (state, unacknowledged bytes) at the checkpoint",
        server_connections(port)
    );

    checkpoint_established_restore(&mut child, &workers, &dir.join("nginx.img"));

    download.finish(&file);
    check_restored_nginx(master, &workers, &worker_uids, port, &file, requests, guard);
    let _ = std::fs::remove_dir_all(&dir);
}

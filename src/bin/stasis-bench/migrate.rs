//! `stasis-bench --migrate`: live migration between two network namespaces joined by a
//! veth pair (two "hosts" on this machine), with mutual TLS and with --insecure.
//!
//! For each size, the demo VM (guest memory filled, then written slowly) is migrated from
//! host A to host B and back, `--runs` times per transport; medians of total time, rounds,
//! bytes sent and downtime. In the same run, the floor: sending as many bytes once over the
//! same transport (plain TCP, or TLS with the same certificates) from A to B, and every
//! total is also shown as a ratio to it.
//!
//! STASIS_BENCH_VERBOSE=1 prints each migration's own figures (`stasis migrate --json`).
//!
//! First, a process (see [`process`]) at 0, 16 and 64 MiB/s of writes, its downtime as
//! stasis sees it and as the process itself does. Then the VM, whose downtime here is
//! stasis's: from the pause until the destination said the guest runs (the guest's own
//! clock cannot show it: its TSC is restored with it). The redis container is not measured
//! yet.

use super::{median, vm, Args};
use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "migrate/process.rs"]
mod process;

#[path = "../../../tests/common/pki.rs"]
#[allow(dead_code)]
mod pki;

const PORT: u16 = 47100;

/// Two network namespaces joined by a veth pair, each a "host" with its own state dir.
struct Hosts {
    tag: String,
    dir: PathBuf,
}

impl Hosts {
    fn ns(&self, side: char) -> String {
        format!("stasis-bench-{side}-{}", self.tag)
    }

    fn ip(side: char) -> &'static str {
        if side == 'a' {
            "10.203.77.1"
        } else {
            "10.203.77.2"
        }
    }

    fn state(&self, side: char) -> PathBuf {
        self.dir.join(format!("state-{side}"))
    }

    fn new(dir: &Path) -> Result<Hosts, String> {
        let tag = std::process::id().to_string();
        let h = Hosts {
            tag: tag.clone(),
            dir: dir.join(format!("stasis-bench-migrate-{tag}")),
        };
        std::fs::create_dir_all(&h.dir).map_err(|e| format!("{}: {e}", h.dir.display()))?;
        let (va, vb) = (format!("sba{tag}"), format!("sbb{tag}"));
        for side in ['a', 'b'] {
            cmd("ip", &["netns", "add", &h.ns(side)])?;
        }
        cmd(
            "ip",
            &[
                "link",
                "add",
                &va,
                "netns",
                &h.ns('a'),
                "type",
                "veth",
                "peer",
                "name",
                &vb,
                "netns",
                &h.ns('b'),
            ],
        )?;
        for (side, dev) in [('a', &va), ('b', &vb)] {
            let ns = h.ns(side);
            let addr = format!("{}/24", Hosts::ip(side));
            cmd("ip", &["-n", &ns, "addr", "add", &addr, "dev", dev])?;
            cmd("ip", &["-n", &ns, "link", "set", dev, "up"])?;
            cmd("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(h)
    }

    /// `stasis --state-dir STATE(side) ARGS` in `side`'s network namespace (nsenter, not `ip
    /// netns exec`, which would remount /sys without this host's cgroup mounts: a process
    /// tree could not be restored in its cgroups).
    fn stasis(&self, side: char, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.ns(side)))
            .arg(super::bin_dir().join("stasis"))
            .arg("--state-dir")
            .arg(self.state(side))
            .args(args);
        c
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for side in ['a', 'b'] {
            let _ = self.stasis(side, &["vm", "stop", "bench-mig"]).output();
            let _ = cmd("ip", &["netns", "del", &self.ns(side)]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cmd(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ok(mut cmd: Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The transport: --insecure, or mutual TLS with these files per side.
#[derive(Clone)]
struct Transport {
    name: &'static str,
    /// (cert, key) per side and the CA; None: --insecure.
    tls: Option<([(PathBuf, PathBuf); 2], PathBuf)>,
}

impl Transport {
    fn args(&self, side: char) -> Vec<String> {
        match &self.tls {
            None => vec!["--insecure".into()],
            Some((files, ca)) => {
                let (cert, key) = &files[usize::from(side == 'b')];
                vec![
                    "--tls-cert".into(),
                    cert.display().to_string(),
                    "--tls-key".into(),
                    key.display().to_string(),
                    "--tls-ca".into(),
                    ca.display().to_string(),
                ]
            }
        }
    }
}

/// A receiver on `side`, stopped when dropped; the peak RSS its workers reported (MiB);
/// with [`receiver_with_stdio`], its standard input and output (the workloads it restores
/// inherit them).
struct Receiver(
    std::process::Child,
    std::sync::mpsc::Receiver<f64>,
    Option<process::Stdio>,
);

impl Receiver {
    /// The peak RSS the worker of the last migration reported (MiB), waiting a little.
    fn peak_mib(&self) -> f64 {
        self.1
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or(f64::NAN)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the receiver this bench started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// The MiB in a worker's "peak RSS of the receiving process N.N MiB: its own M.M MiB, ..."
/// line: its own, without the workload's memory it held.
fn peak_of(line: &str) -> Option<f64> {
    let mib_after = |key: &str| -> Option<f64> {
        let rest = line.split(key).nth(1)?;
        let mut it = rest.split_whitespace();
        let n: f64 = it.next()?.parse().ok()?;
        Some(match it.next()?.trim_end_matches([')', ',', ':']) {
            "B" => n / 1048576.0,
            "KiB" => n / 1024.0,
            "MiB" => n,
            "GiB" => n * 1024.0,
            _ => return None,
        })
    };
    mib_after(": its own ").or_else(|| mib_after("peak RSS of the receiving process "))
}

fn receiver(h: &Hosts, side: char, t: &Transport) -> Result<Receiver, String> {
    receiver_with_stdio(h, side, t, false)
}

/// A receiver on `side`; with `stdio`, the trees it restores inherit its standard input
/// and output, pipes of this bench ([`Receiver::2`]).
fn receiver_with_stdio(
    h: &Hosts,
    side: char,
    t: &Transport,
    stdio: bool,
) -> Result<Receiver, String> {
    let listen = format!("{}:{PORT}", Hosts::ip(side));
    let mut args = vec!["receive", "--listen", &listen];
    if stdio {
        args.push("--inherit-stdio");
    }
    let sec = t.args(side);
    args.extend(sec.iter().map(String::as_str));
    let mut child = h
        .stasis(side, &args)
        .stdin(if stdio { Stdio::piped() } else { Stdio::null() })
        .stdout(if stdio { Stdio::piped() } else { Stdio::null() })
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let pipes = match stdio {
        true => Some(process::Stdio::of(&mut child)?),
        false => None,
    };
    let err = child.stderr.take().ok_or("no stderr")?;
    let mut lines = std::io::BufReader::new(err).lines().map_while(Result::ok);
    let mut seen = String::new();
    while !seen.contains("listening on") {
        let line = lines.next().ok_or_else(|| format!("receiver: {seen}"))?;
        seen += &line;
        seen.push('\n');
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let verbose = std::env::var_os("STASIS_BENCH_VERBOSE").is_some();
    std::thread::spawn(move || {
        for line in lines {
            if verbose {
                eprintln!("receiver: {line}");
            }
            if let Some(mib) = peak_of(&line) {
                let _ = tx.send(mib);
            }
        }
    });
    Ok(Receiver(child, rx, pipes))
}

fn counter(h: &Hosts, side: char) -> u64 {
    ok(h.stasis(side, &["vm", "ps", "--json"])).map_or(0, |t| vm::counter_in(&t, "bench-mig"))
}

#[derive(Default)]
struct Samples {
    total: Vec<f64>,
    downtime: Vec<f64>,
    rounds: Vec<f64>,
    mib_sent: Vec<f64>,
    floor: Vec<f64>,
    /// The parts of the downtime: pause and last round and state sent; built there; resumed.
    transfer: Vec<f64>,
    build: Vec<f64>,
    resume: Vec<f64>,
    /// The receiving worker's peak RSS, MiB.
    peak_rss: Vec<f64>,
}

/// Sends `bytes` from host A to a sink on host B over `t`; milliseconds from the connect
/// to the sink's last byte.
fn floor(h: &Hosts, t: &Transport, bytes: u64) -> Result<f64, String> {
    let ns_b =
        std::fs::File::open(format!("/run/netns/{}", h.ns('b'))).map_err(|e| e.to_string())?;
    let ns_a =
        std::fs::File::open(format!("/run/netns/{}", h.ns('a'))).map_err(|e| e.to_string())?;
    let addr = format!("{}:{}", Hosts::ip('b'), PORT + 1);
    let server = t.tls.as_ref().map(|(files, ca)| {
        let f = stasis_migrate::tls::TlsFiles {
            cert: files[1].0.clone(),
            key: files[1].1.clone(),
            ca: ca.clone(),
        };
        stasis_migrate::tls::server_config(&f)
    });
    let client = t.tls.as_ref().map(|(files, ca)| {
        let f = stasis_migrate::tls::TlsFiles {
            cert: files[0].0.clone(),
            key: files[0].1.clone(),
            ca: ca.clone(),
        };
        stasis_migrate::tls::client_config(&f)
    });
    let server = server.transpose().map_err(|e| e.to_string())?;
    let client = client.transpose().map_err(|e| e.to_string())?;
    let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let sink_addr = addr.clone();
    let sink = std::thread::spawn(move || -> Result<Instant, String> {
        enter(&ns_b)?;
        let l = TcpListener::bind(&sink_addr).map_err(|e| e.to_string())?;
        let _ = tx.send(Ok(()));
        let (tcp, peer) = l.accept().map_err(|e| e.to_string())?;
        let mut conn: Box<dyn Read> = match server {
            Some(cfg) => Box::new(
                stasis_migrate::tls::accept(tcp, &peer.to_string(), cfg)
                    .map_err(|e| e.to_string())?,
            ),
            None => Box::new(tcp),
        };
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            let n = conn.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("the sender stopped after {got} bytes"));
            }
            got += n as u64;
        }
        Ok(Instant::now())
    });
    rx.recv().map_err(|e| e.to_string())??;
    // The sender keeps its end open until the sink has everything: closed with unread data
    // (TLS session tickets), it would reset the connection.
    type Sent = (Instant, Box<dyn Write + Send>);
    let sender = std::thread::spawn(move || -> Result<Sent, String> {
        enter(&ns_a)?;
        let t0 = Instant::now();
        let tcp = TcpStream::connect(&addr).map_err(|e| e.to_string())?;
        let mut conn: Box<dyn Write + Send> = match client {
            Some(cfg) => Box::new(
                stasis_migrate::tls::connect(tcp, Hosts::ip('b'), cfg)
                    .map_err(|e| e.to_string())?,
            ),
            None => Box::new(tcp),
        };
        let buf: Vec<u8> = (0..1usize << 20).map(|i| (i * 31 + 7) as u8).collect();
        let mut sent = 0u64;
        while sent < bytes {
            conn.write_all(&buf).map_err(|e| e.to_string())?;
            sent += buf.len() as u64;
        }
        conn.flush().map_err(|e| e.to_string())?;
        Ok((t0, conn))
    });
    let (t0, conn) = sender.join().map_err(|_| "the sender panicked")??;
    let end = sink.join().map_err(|_| "the sink panicked")??;
    drop(conn);
    Ok(end.duration_since(t0).as_secs_f64() * 1000.0)
}

/// Moves the calling thread into the network namespace `ns`.
fn enter(ns: &std::fs::File) -> Result<(), String> {
    // SAFETY: setns on an open namespace file; affects only this thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn field(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_u64().map_or(f64::NAN, |n| n as f64)
}

/// Migrates the VM from `from` to the other side once over `t`.
fn one_migration(
    h: &Hosts,
    from: char,
    t: &Transport,
    max_downtime: Option<u64>,
    s: &mut Samples,
) -> Result<(), String> {
    let to = if from == 'a' { 'b' } else { 'a' };
    let rx = receiver(h, to, t)?;
    let r = migrate_json(h, from, t, "bench-mig", max_downtime)?;
    s.total.push(field(&r, "total_us") / 1000.0);
    s.downtime.push(field(&r, "downtime_us") / 1000.0);
    s.transfer.push(field(&r, "transfer_us") / 1000.0);
    s.build.push(field(&r, "build_us") / 1000.0);
    s.resume.push(field(&r, "resume_us") / 1000.0);
    s.rounds
        .push(r["rounds"].as_array().map_or(0, Vec::len) as f64);
    let sent = field(&r, "page_bytes") + field(&r, "image_bytes");
    s.mib_sent.push(sent / f64::from(1u32 << 20));
    s.peak_rss.push(rx.peak_mib());
    let c = counter(h, to);
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(h, to) <= c {
        if Instant::now() > deadline {
            return Err("the migrated guest makes no progress".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `stasis migrate TARGET --json` from `from` to the receiver on the other side over `t`;
/// its report (printed too with STASIS_BENCH_VERBOSE).
fn migrate_json(
    h: &Hosts,
    from: char,
    t: &Transport,
    target: &str,
    max_downtime: Option<u64>,
) -> Result<serde_json::Value, String> {
    let to = if from == 'a' { 'b' } else { 'a' };
    let url = format!("tcp://{}:{PORT}", Hosts::ip(to));
    let mut args = vec!["migrate", target, "--to", &url, "--json"];
    let sec = t.args(from);
    args.extend(sec.iter().map(String::as_str));
    let limit = max_downtime.map(|m| m.to_string());
    if let Some(m) = &limit {
        args.extend(["--max-downtime", m]);
    }
    let out = ok(h.stasis(from, &args))?;
    let r: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    if std::env::var_os("STASIS_BENCH_VERBOSE").is_some() {
        eprintln!("{r}");
    }
    Ok(r)
}

fn one_size(h: &Hosts, mib: u64, t: &Transport, args: &Args) -> Result<Samples, String> {
    let mem = format!("{mib}m");
    ok(h.stasis('a', &vm::demo_run_args("bench-mig", &mem)))?;
    vm::wait_filled(mib, 120, || counter(h, 'a'))?;
    let mut s = Samples::default();
    let mut at = 'a';
    for _ in 0..args.runs {
        s.floor.push(floor(h, t, mib << 20)?);
        one_migration(h, at, t, args.max_downtime, &mut s)?;
        at = if at == 'a' { 'b' } else { 'a' };
    }
    let stop = ok(h.stasis(at, &["vm", "stop", "bench-mig", "--json"]))?;
    let v: serde_json::Value = serde_json::from_str(&stop).map_err(|e| e.to_string())?;
    if v["errors"] != 0 {
        return Err(format!("the guest failed its checks: {stop}"));
    }
    Ok(s)
}

/// Runs the migration benchmark; false if a run failed.
pub fn run(args: &Args) -> bool {
    let kvm = Path::new("/dev/kvm").exists();
    let go = || -> Result<(), String> {
        let h = Hosts::new(&args.dir)?;
        let ca = pki::Pki::new(&h.dir, "bench-ca");
        let a = ca.issue("a", &format!("IP:{}", Hosts::ip('a')));
        let b = ca.issue("b", &format!("IP:{}", Hosts::ip('b')));
        let transports = [
            Transport {
                name: "insecure",
                tls: None,
            },
            Transport {
                name: "mTLS",
                tls: Some(([(a.cert, a.key), (b.cert, b.key)], ca.ca.clone())),
            },
        ];
        process::header(args.runs);
        for &mib in &args.sizes {
            for t in &transports {
                process::rows(&h, mib, t, args)?;
            }
        }
        println!();
        if !kvm {
            println!("VM migration: skipped: /dev/kvm does not exist on this host");
            return Ok(());
        }
        println!(
            "Live migration of the demo VM between two network namespaces (veth), {} runs each, medians; downtime as stasis sees it (pause to running there); floor: as many bytes sent once over the same transport",
            args.runs
        );
        println!(
            "{:>8} {:>9} | {:>9} {:>6} {:>9} {:>7} ({:>8} {:>6} {:>6}) | {:>9} {:>6} | {:>7}",
            "memory",
            "transport",
            "total ms",
            "rounds",
            "MiB sent",
            "down ms",
            "transfer",
            "build",
            "resume",
            "floor ms",
            "x",
            "rx RSS"
        );
        for &mib in &args.sizes {
            for t in &transports {
                let mut s = one_size(&h, mib, t, args)?;
                let (total, fl) = (median(&mut s.total), median(&mut s.floor));
                println!(
                    "{:>4} MiB {:>9} | {:>9.1} {:>6.1} {:>9.1} {:>7.1} ({:>8.1} {:>6.1} {:>6.1}) | {:>9.1} {:>6.2} | {:>7.1}",
                    mib,
                    t.name,
                    total,
                    median(&mut s.rounds),
                    median(&mut s.mib_sent),
                    median(&mut s.downtime),
                    median(&mut s.transfer),
                    median(&mut s.build),
                    median(&mut s.resume),
                    fl,
                    total / fl,
                    median(&mut s.peak_rss)
                );
            }
        }
        Ok(())
    };
    match go() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("stasis-bench: migration: {e}");
            false
        }
    }
}

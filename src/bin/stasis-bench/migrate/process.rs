//! The process rows of `stasis-bench --migrate`: a pid-namespace tree of one process,
//! `wl-writer` (two threads rewriting random pages of its memory at a set rate, checking
//! every page afterwards), moved from host A to host B and back, `--runs` times per write
//! rate and transport. Downtime is shown twice: as stasis sees it (freeze until the
//! destination said it runs) and as the workload does (the longest gap between its own 1 ms
//! ticks, which includes the time it takes to be scheduled again).

use super::{field, floor, median, migrate_json, receiver_with_stdio, Hosts, Transport};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout};
use std::time::{Duration, Instant};

/// The write rates measured, MiB/s.
pub const RATES: [u64; 3] = [0, 16, 64];

/// A workload's standard input and output.
pub struct Stdio {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Stdio {
    /// Takes `child`'s piped standard input and output.
    pub fn of(child: &mut Child) -> Result<Stdio, String> {
        Ok(Stdio {
            stdin: child.stdin.take().ok_or("no stdin")?,
            stdout: BufReader::new(child.stdout.take().ok_or("no stdout")?),
        })
    }

    /// The next line starting with one of `prefixes` (others are skipped).
    fn line(&mut self, prefixes: &[&str]) -> Result<String, String> {
        loop {
            let mut l = String::new();
            match self.stdout.read_line(&mut l) {
                Ok(0) => return Err("the workload's output ended".into()),
                Ok(_) if prefixes.iter().any(|p| l.starts_with(p)) => {
                    return Ok(l.trim_end().to_string())
                }
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// wl-writer's check, which must pass; its INFO line.
    fn verify(&mut self) -> Result<String, String> {
        self.stdin
            .write_all(b"verify\n")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("asking the workload: {e}"))?;
        let info = self.line(&["INFO ", "PASS ", "FAIL "])?;
        let answer = self.line(&["PASS ", "FAIL "])?;
        if !answer.starts_with("PASS ") {
            return Err(format!("the workload failed its check: {answer} ({info})"));
        }
        Ok(info)
    }
}

/// The value of `key=` in wl-writer's INFO line.
fn info_value(info: &str, key: &str) -> Option<f64> {
    info.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// A wl-writer tree: the `ip netns exec unshare` process, and the tree's root
/// (PID 1 inside) once moved.
struct Writer {
    launcher: Child,
    root: i32,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Killing a namespace's init ends its namespace; the root is ours (started here).
        // SAFETY: kill(2) on a PID this bench started.
        unsafe { libc::kill(self.root, libc::SIGKILL) };
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
    }
}

/// Starts `wl-writer --mib MIB --rate RATE --threads 2` as PID 1 of a new pid namespace,
/// and waits until its memory is written.
fn start(mib: u64, rate: u64) -> Result<(Writer, Stdio), String> {
    let wl = super::super::bin_dir().join("wl-writer");
    let (m, r) = (mib.to_string(), rate.to_string());
    // Started here, as an operator's process would be (`ip netns exec` would give it a
    // mount namespace of its own, without this host's cgroup mounts).
    let mut launcher = std::process::Command::new("unshare")
        .args(["--pid", "--fork"])
        .arg(&wl)
        .args([
            "--tag",
            "bench-writer",
            "--mib",
            &m,
            "--rate",
            &r,
            "--threads",
            "2",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", wl.display()))?;
    let mut io = Stdio::of(&mut launcher)?;
    let mut w = Writer { launcher, root: 0 };
    io.line(&["READY ", "FAIL "])
        .and_then(|l| match l.starts_with("READY ") {
            true => Ok(()),
            false => Err(l),
        })?;
    let children = format!("/proc/{0}/task/{0}/children", w.launcher.id());
    w.root = std::fs::read_to_string(&children)
        .ok()
        .and_then(|c| c.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no tree below {children}"))?;
    Ok((w, io))
}

#[derive(Default)]
struct Samples {
    total: Vec<f64>,
    rounds: Vec<f64>,
    mib_sent: Vec<f64>,
    downtime: Vec<f64>,
    /// The longest gap in the workload's own timeline, ms.
    gap: Vec<f64>,
    transfer: Vec<f64>,
    build: Vec<f64>,
    floor: Vec<f64>,
    peak_rss: Vec<f64>,
}

/// Moves the writer from `from` to the other side once over `t`; `io` is its standard I/O,
/// replaced by the receiving side's.
fn one_migration(
    h: &Hosts,
    from: char,
    t: &Transport,
    w: &mut Writer,
    io: &mut Stdio,
    max_downtime: Option<u64>,
    s: &mut Samples,
) -> Result<(), String> {
    let to = if from == 'a' { 'b' } else { 'a' };
    // Resets its longest gap, so the next one spans the migration.
    io.verify()?;
    let mut rx = receiver_with_stdio(h, to, t, true)?;
    let r = migrate_json(h, from, t, &w.root.to_string(), max_downtime)?;
    w.root = r["destination_pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| format!("no destination_pid in {r}"))?;
    *io = rx.2.take().ok_or("the receiver's standard I/O")?;
    s.peak_rss.push(rx.peak_mib());
    // Runs there, every page as it was: and how long it saw itself stopped.
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let info = io.verify()?;
    s.gap
        .push(info_value(&info, "max_gap_us").unwrap_or(f64::NAN) / 1000.0);
    s.total.push(field(&r, "total_us") / 1000.0);
    s.downtime.push(field(&r, "downtime_us") / 1000.0);
    s.transfer.push(field(&r, "transfer_us") / 1000.0);
    s.build.push(field(&r, "build_us") / 1000.0);
    s.rounds
        .push(r["rounds"].as_array().map_or(0, Vec::len) as f64);
    let sent = field(&r, "page_bytes") + field(&r, "image_bytes");
    s.mib_sent.push(sent / f64::from(1u32 << 20));
    Ok(())
}

/// The rows for a `mib` MiB process, every rate, over `t`.
pub fn rows(h: &Hosts, mib: u64, t: &Transport, args: &super::Args) -> Result<(), String> {
    for rate in RATES {
        let (mut w, mut io) = start(mib, rate)?;
        let mut s = Samples::default();
        let mut at = 'a';
        for _ in 0..args.runs {
            s.floor.push(floor(h, t, mib << 20)?);
            one_migration(h, at, t, &mut w, &mut io, args.max_downtime, &mut s)?;
            at = if at == 'a' { 'b' } else { 'a' };
        }
        let total = median(&mut s.total);
        let fl = median(&mut s.floor);
        let sent = median(&mut s.mib_sent);
        println!(
            "{:>4} MiB {:>3} MiB/s {:>9} | {:>9.1} {:>6.1} {:>9.1} {:>5.2} | {:>7.1} {:>7.1} ({:>8.1} {:>6.1}) | {:>9.1} {:>6.2} | {:>7.1}",
            mib,
            rate,
            t.name,
            total,
            median(&mut s.rounds),
            sent,
            sent / mib as f64,
            median(&mut s.downtime),
            median(&mut s.gap),
            median(&mut s.transfer),
            median(&mut s.build),
            fl,
            total / fl,
            median(&mut s.peak_rss)
        );
    }
    Ok(())
}

/// The table's header.
pub fn header(runs: usize) {
    println!(
        "Live migration of a pid-namespace tree (wl-writer: 2 threads rewriting random pages at the rate shown), A to B and back, {runs} runs each, medians; down: as stasis sees it; gap: the longest pause in the workload's own 1 ms ticks"
    );
    println!(
        "{:>8} {:>9} {:>9} | {:>9} {:>6} {:>9} {:>5} | {:>7} {:>7} ({:>8} {:>6}) | {:>9} {:>6} | {:>7}",
        "memory",
        "writes",
        "transport",
        "total ms",
        "rounds",
        "MiB sent",
        "x mem",
        "down ms",
        "gap ms",
        "transfer",
        "build",
        "floor ms",
        "x",
        "rx RSS"
    );
}

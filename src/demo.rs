//! `stasis demo`: a counter is started, checkpointed, killed, restored, and shown to carry on
//! from the same count.

use crate::report;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use stasis_checkpoint::FileSink;
use stasis_image::{Compression, Image};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The counter workload: prints `count N` every 100 ms, forever.
pub fn counter() -> Result<i32> {
    // Drop whatever descriptors the caller's environment leaked to us: the demo workload
    // holds only standard I/O.
    // SAFETY: close_range takes no pointers; fds 3 and up are not used by this function.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let mut out = std::io::stdout().lock();
    let mut n: u64 = 0;
    loop {
        n += 1;
        if writeln!(out, "count {n}")
            .and_then(|_| out.flush())
            .is_err()
        {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Serialize)]
struct DemoReport {
    pid: i32,
    image: String,
    last_count_before: u64,
    first_count_after: u64,
    continued: bool,
    checkpoint: stasis_checkpoint::Stats,
    restore: stasis_restore::Stats,
}

/// Reads `count N` lines from `reader` on a thread, forwarding the numbers.
fn follow(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<u64> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if let Some(n) = line.strip_prefix("count ").and_then(|n| n.parse().ok()) {
                if tx.send(n).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

fn show(
    rx: &mpsc::Receiver<u64>,
    for_how_long: Duration,
    json: bool,
    tag: &str,
) -> Option<(u64, u64)> {
    let end = Instant::now() + for_how_long;
    let mut first = None;
    let mut last = None;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(n) => {
                if !json {
                    crate::outln!("  {tag} | count {n}");
                }
                first.get_or_insert(n);
                last = Some(n);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    Some((first?, last?))
}

pub fn run(json: bool) -> Result<i32> {
    let exe = std::env::current_exe().context("finding the stasis executable")?;
    let dir = std::env::temp_dir().join(format!("stasis-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let image_path = dir.join("counter.img");

    let mut child = Command::new(&exe)
        .arg("__demo-counter")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the demo counter")?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().context("counter stdout")?;
    if !json {
        crate::outln!("started counter, PID {pid}");
    }
    let rx = follow(stdout);
    let (_, last_shown) = show(&rx, Duration::from_millis(1200), json, "original")
        .context("the counter printed nothing")?;

    if !json {
        crate::outln!("checkpointing PID {pid} into {} ...", image_path.display());
    }
    let mut sink = FileSink::create(&image_path)?;
    let opts = stasis_checkpoint::Options {
        leave_running: false,
        compression: Compression::None,
        tcp_established: false,
        ..Default::default()
    };
    let mut tree = stasis_workload::TreeSource::process_tree(pid, &opts);
    let cstats = match stasis_workload::checkpoint(&mut tree, &mut sink, false, &|_, _| {})? {
        stasis_workload::Report::Tree(s) => s,
        stasis_workload::Report::Vm(_) => bail!("PID {pid} was checkpointed as a VM"),
    };
    // stasis reaped it already when it is both tracer and parent; otherwise reap it here.
    let _ = child.wait();
    // Everything the original printed before it was killed.
    let last_before = rx.iter().last().unwrap_or(last_shown);
    if !json {
        crate::outln!(
            "  checkpointed and killed: frozen {}, {} pages stored, image {}",
            report::ms(cstats.frozen_us),
            cstats.pages_data,
            report::bytes(cstats.image_bytes)
        );
        crate::outln!("  last count printed by the original: {last_before}");
        crate::outln!("restoring from {} ...", image_path.display());
    }

    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two c_ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these fds; we own them.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let image = Image::open(&image_path)?;
    let mut ropts = stasis_restore::Options::default();
    ropts.inherit_fds.insert(1, wr.as_raw_fd());
    let rstats = stasis_restore::restore_tree(&image, &ropts)?;
    drop(wr);
    let rx = follow(std::fs::File::from(rd));
    let shown = show(&rx, Duration::from_millis(1200), json, "restored");
    stasis_runtime::sys::kill(pid, libc::SIGKILL)?;
    let _ = stasis_restore::wait_exit(pid);
    let (first_after, _) = shown.context("the restored counter printed nothing")?;
    let continued = first_after == last_before + 1;
    let rep = DemoReport {
        pid,
        image: image_path.display().to_string(),
        last_count_before: last_before,
        first_count_after: first_after,
        continued,
        checkpoint: cstats,
        restore: rstats,
    };
    let _ = std::fs::remove_dir_all(&dir);
    if json {
        report::json(&rep)?;
    } else {
        crate::outln!(
            "  restored PID {pid} in {} (image verified in {})",
            report::ms(rep.restore.total_us),
            report::ms(rep.restore.verify_us)
        );
        if continued {
            crate::outln!(
                "OK: the restored counter carried on from {last_before} to {first_after}"
            );
        } else {
            crate::outln!("FAILED: the original stopped at {last_before} but the restored one printed {first_after}");
        }
    }
    Ok(if continued { 0 } else { 1 })
}

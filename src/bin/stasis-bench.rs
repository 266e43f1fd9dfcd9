//! `stasis-bench`: checkpoint/restore timings against a baseline measured in the same run.
//!
//! For each memory size, a `wl-counter --mib N` process holding N MiB of non-zero random data
//! is checkpointed (killed), checkpointed with --leave-running (frozen time), and restored
//! until it runs again, with raw and zstd page data. The image lives in /dev/shm (page cache),
//! or in `--dir`; a dir on a disk gets the disk rows of [`disk`] (synced file system before
//! each timed run, CRIU's dump with and without syncing its image, the fsync in the floor).
//! The baseline copies the same amount of memory into freshly allocated memory: these VMs
//! give out fresh memory slowly and erratically, so every figure is also shown as a ratio to
//! the baseline's median from the same run (measured once before each run of each row).
//! Every restored process checks its own data.
//!
//! Also a process with 4 threads x 16 MiB (wl-threads) and a tree of 10 processes x 8 MiB
//! (wl-counter --procs 10), unless --no-threads / --no-tree.
//!
//! And VMs of each size running the demo guest (see [`vm`]), unless --no-vms.
//!
//! With --criu PATH, each run of a process-size row with raw pages also checkpoints and
//! restores the same workload with that CRIU binary, and a second table shows CRIU's medians
//! and stasis/CRIU ratios (see [`criu`]).
//!
//! With --migrate, only live migration between two network namespaces (see [`migrate`]).
//!
//! Usage: stasis-bench [--sizes 256,1024] [--runs 5] [--dir /dev/shm] [--no-threads] [--no-tree]
//! [--no-vms] [--criu /path/to/criu] [--migrate]

#[path = "stasis-bench/criu.rs"]
mod criu;
#[path = "stasis-bench/disk.rs"]
mod disk;
#[path = "stasis-bench/floor.rs"]
mod floor;
#[path = "stasis-bench/migrate.rs"]
mod migrate;
#[path = "stasis-bench/vm.rs"]
mod vm;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    sizes: Vec<u64>,
    runs: usize,
    dir: PathBuf,
    threads: bool,
    tree: bool,
    vms: bool,
    criu: Option<PathBuf>,
    migrate: bool,
    /// --max-downtime for the migrations (ms; None: stasis's default).
    max_downtime: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        sizes: vec![256, 1024],
        runs: 5,
        dir: PathBuf::from("/dev/shm"),
        threads: true,
        tree: true,
        vms: true,
        criu: None,
        migrate: false,
        max_downtime: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut val = || it.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--sizes" => {
                a.sizes = val()?
                    .split(',')
                    .map(|s| s.parse().map_err(|_| format!("bad size {s}")))
                    .collect::<Result<_, _>>()?
            }
            "--runs" => a.runs = val()?.parse().map_err(|_| "bad --runs".to_string())?,
            "--dir" => a.dir = PathBuf::from(val()?),
            "--no-threads" => a.threads = false,
            "--no-tree" => a.tree = false,
            "--no-vms" => a.vms = false,
            "--criu" => a.criu = Some(PathBuf::from(val()?)),
            "--migrate" => a.migrate = true,
            "--max-downtime" => {
                a.max_downtime = Some(val()?.parse().map_err(|_| "bad --max-downtime")?)
            }
            "-h" | "--help" => {
                println!("usage: stasis-bench [--sizes 256,1024] [--runs 5] [--dir /dev/shm] [--no-threads] [--no-tree] [--no-vms] [--criu /path/to/criu]");
                println!("       stasis-bench --migrate [--sizes 1024] [--runs 5] [--dir /dev/shm] [--max-downtime MS]: live migration only");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Copies `mib` MiB from a filled source into freshly mapped memory; milliseconds.
fn baseline(mib: u64, src: &[u8]) -> f64 {
    let len = (mib << 20) as usize;
    let t = Instant::now();
    let mut dst: Vec<u8> = Vec::with_capacity(len);
    // SAFETY: the capacity is len; copy_nonoverlapping initializes all len bytes before
    // set_len, and src holds at least len bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr(), len);
        dst.set_len(len);
    }
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    std::hint::black_box(&dst);
    ms
}

struct Workload {
    child: Child,
    pid: i32,
}

/// A workload the bench runs: its binary and arguments, and the MiB of data it holds.
struct Case {
    label: String,
    bin: &'static str,
    args: Vec<String>,
    mib: u64,
    /// Also measured with CRIU (the process-size rows) when --criu is given.
    criu: bool,
}

fn start_workload(case: &Case) -> Result<Workload, String> {
    let mut child = Command::new(bin_dir().join(case.bin))
        .args(&case.args)
        .args(["--tag", "bench"])
        .env("STASIS_WL_TAG", "bench")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {} (build the workspace first): {e}", case.bin))?;
    let mut line = String::new();
    let out = child.stdout.as_mut().ok_or("no stdout")?;
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let pid = line
        .trim()
        .strip_prefix("READY ")
        .and_then(|p| p.parse().ok())
        .ok_or(format!("{} said {line:?}", case.bin))?;
    Ok(Workload { child, pid })
}

/// Runs stasis; returns (wall ms, ru_maxrss KiB, stdout).
fn stasis(args: &[&str], stdin: Stdio, stdout: Stdio) -> Result<(f64, i64, String), String> {
    let mut cmd = Command::new(bin_dir().join("stasis"));
    cmd.args(args).stdin(stdin).stdout(stdout);
    run_timed(cmd)
}

/// Runs `cmd` (its stdin and stdout set by the caller) until it exits; returns (wall ms from
/// the spawn, ru_maxrss KiB, stdout), or an error with its stderr if it failed.
fn run_timed(mut cmd: Command) -> Result<(f64, i64, String), String> {
    let t = Instant::now();
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: rusage is plain old data; status and ru are valid for the call.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; pid is our child.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    if rc != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("{cmd:?} failed: {err}"));
    }
    Ok((ms, ru.ru_maxrss, out))
}

/// A pipe: (read end, write end), close-on-exec.
fn pipe() -> Result<(std::fs::File, std::fs::File), String> {
    let mut f = [0i32; 2];
    // SAFETY: f is valid for pipe2.
    if unsafe { libc::pipe2(f.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 returned these fds and we own them.
    Ok(unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(f[0]),
            std::fs::File::from_raw_fd(f[1]),
        )
    })
}

fn json_u64(text: &str, key: &str) -> f64 {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v[key].as_u64())
        .map(|v| v as f64)
        .unwrap_or(f64::NAN)
}

fn reap(pid: i32) {
    let mut st = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut st, 0) };
}

/// Reaps the processes of a finished or killed tree that came back to us (we are a
/// subreaper): their PIDs must be free for the next restore. Bounded.
fn reap_orphans() {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut st = 0;
        // SAFETY: waitpid with a valid status pointer; every child here is the bench's own.
        let r = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG | libc::__WALL) };
        if r > 0 {
            continue;
        }
        if r < 0 || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[derive(Default)]
struct Samples {
    checkpoint: Vec<f64>,
    frozen: Vec<f64>,
    restore: Vec<f64>,
    size_mib: Vec<f64>,
    rss_mib: Vec<f64>,
}

/// One run of a row; `disk`: the image dir when it is on a disk (synced before each timed
/// checkpoint, see [`disk`]).
fn one_run(
    case: &Case,
    compress: &str,
    img: &Path,
    disk: Option<&Path>,
    s: &mut Samples,
) -> Result<(), String> {
    let imgs = img.to_str().ok_or("path")?;
    let settle = || disk.inspect(|d| disk::settle(d));
    // Frozen time of --leave-running.
    let mut w = start_workload(case)?;
    let pid = w.pid.to_string();
    let checkpoint = |extra: &[&str]| {
        let mut args = vec![
            "checkpoint",
            pid.as_str(),
            "-o",
            imgs,
            "--compress",
            compress,
            "--json",
        ];
        args.extend_from_slice(extra);
        stasis(&args, Stdio::null(), Stdio::piped())
    };
    settle();
    let (_, _, out) = checkpoint(&["--leave-running"])?;
    s.frozen.push(json_u64(&out, "frozen_us") / 1000.0);
    // Freeing the old image inside the next checkpoint's commit would be charged to it.
    let _ = std::fs::remove_file(img);
    // Let the workload's interrupted 100 ms nanosleep finish: a task still inside the
    // restart_syscall that resuming left it in cannot be checkpointed with its remaining
    // time (the kernel's restart block is not readable), and comes back with EINTR.
    std::thread::sleep(Duration::from_millis(150));
    // Checkpoint and kill.
    settle();
    let (ms, _, out) = checkpoint(&[])?;
    let _ = w.child.wait();
    reap_orphans();
    s.checkpoint.push(ms);
    // stasis's own peak RSS (wait4's figure would include the killed target's).
    s.rss_mib.push(json_u64(&out, "peak_rss_kib") / 1024.0);
    if std::env::var_os("STASIS_BENCH_VERBOSE").is_some() {
        eprintln!("{out}");
    }
    s.size_mib.push(
        std::fs::metadata(img)
            .map(|m| m.len() as f64 / 1048576.0)
            .unwrap_or(f64::NAN),
    );
    // Restore until it runs (--detach returns once the process runs), then let it check.
    let (rd, wr) = pipe()?;
    let (out_rd, out_wr) = pipe()?;
    let (ms, _, _) = stasis(
        &["restore", imgs, "--detach"],
        Stdio::from(rd),
        Stdio::from(out_wr),
    )?;
    s.restore.push(ms);
    await_pass(wr, out_rd, &|_| false)?;
    reap(w.pid);
    reap_orphans();
    let _ = std::fs::remove_file(img);
    Ok(())
}

/// Sends `check` to a restored workload (its stdin's write end) and waits for its `PASS`
/// (on its stdout's read end), skipping other lines. A `FAIL` line that `tolerate` accepts
/// counts as passed and returns true.
fn await_pass(
    mut wr: std::fs::File,
    out_rd: std::fs::File,
    tolerate: &dyn Fn(&str) -> bool,
) -> Result<bool, String> {
    writeln!(wr, "check").map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(out_rd);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 || Instant::now() > deadline
        {
            return Err("restored workload went away without answering".into());
        }
        if line.starts_with("PASS ") {
            return Ok(false);
        }
        if line.starts_with("FAIL ") {
            if tolerate(&line) {
                return Ok(true);
            }
            return Err(format!("restored process failed its check: {line}"));
        }
    }
}

/// One row of the CRIU table: the same runs' baseline and stasis medians, and CRIU's and the
/// floor's samples.
struct CriuRow {
    label: String,
    baseline: f64,
    checkpoint: f64,
    restore: f64,
    criu: criu::Samples,
    floor: floor::Samples,
}

/// The CRIU table: CRIU's medians from the same runs, and stasis/CRIU (target <= 0.80); then
/// the floor under a raw checkpoint (see `floor`). `durable`: the image dir is on a disk,
/// where CRIU's row also shows its dump followed by the fsync of its image files ("+sync").
fn print_criu(path: &Path, version: &str, rows: Vec<CriuRow>, durable: bool) {
    println!();
    println!(
        "CRIU {version} ({}), same runs, raw pages; x = ratio to the baseline median; stasis/CRIU target <= 0.80",
        path.display()
    );
    if durable {
        println!("On a disk CRIU leaves its image unsynced: +sync is its dump and then the fsync of its image files, what a durable image costs it");
    }
    println!(
        "{:>14} | {:>9} | {:>10} {:>6} | {:>9} | {:>10} {:>6} | {:>11} {:>11} {:>11} | {:>9}",
        "workload",
        "baseline",
        "checkpoint",
        "x",
        "+sync",
        "restore",
        "x",
        "ckpt s/CRIU",
        "s/CRIU+sync",
        "rest s/CRIU",
        "image MiB"
    );
    let mut eintr = 0;
    let mut runs = 0;
    let mut floors = Vec::new();
    for row in rows {
        let CriuRow {
            label,
            baseline: b,
            checkpoint: c,
            restore: r,
            criu: mut cs,
            floor: mut fs,
        } = row;
        eintr += cs.eintr;
        runs += cs.restore.len();
        // Per run, so the median is of whole durable dumps (paired before `median` sorts
        // the dump times in place).
        let mut synced: Vec<f64> = cs
            .checkpoint
            .iter()
            .zip(&cs.sync)
            .map(|(d, s)| d + s)
            .collect();
        let cc = median(&mut cs.checkpoint);
        let cr = median(&mut cs.restore);
        let (plus_sync, ratio_sync) = match durable {
            true => {
                let m = median(&mut synced);
                (format!("{m:.1}"), format!("{:.2}", c / m))
            }
            false => ("-".into(), "-".into()),
        };
        println!(
            "{:>14} | {:>9.1} | {:>10.1} {:>6.2} | {:>9} | {:>10.1} {:>6.2} | {:>11.2} {:>11} {:>11.2} | {:>9.1}",
            label,
            b,
            cc,
            cc / b,
            plus_sync,
            cr,
            cr / b,
            c / cc,
            ratio_sync,
            r / cr,
            median(&mut cs.size_mib)
        );
        floors.push(FloorRow {
            label,
            write: median(&mut fs.write),
            read: median(&mut fs.read),
            hash: median(&mut fs.hash),
            fsync: median(&mut fs.fsync),
            criu: cc,
            stasis: c,
        });
    }
    print_floor(floors, durable);
    if eintr > 0 {
        println!(
            "({eintr} of {runs} CRIU restores resumed the workload's nanosleep with EINTR, as CRIU does for a task in restart_syscall; all its other checks passed)"
        );
    }
}

/// One row of the floor table: the passes', CRIU's and stasis's checkpoint medians.
struct FloorRow {
    label: String,
    write: f64,
    read: f64,
    hash: f64,
    fsync: f64,
    criu: f64,
    stasis: f64,
}

/// The floor table (see `floor`); `durable` adds the fsync pass.
fn print_floor(rows: Vec<FloorRow>, durable: bool) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!();
    let fsync = match durable {
        true => " and fsync (of that file)",
        false => "",
    };
    println!(
        "Floor of a raw checkpoint on {cores} cores, same runs: one pass of write (into a new file in the image dir){fsync}, read (process_vm_readv) and hash (blake3); floor = max(write+fsync, (write+read+hash)/cores)"
    );
    println!(
        "{:>14} | {:>7} {:>7} {:>7} {:>7} | {:>7} | {:>9} {:>9} | {:>11} {:>11}",
        "workload",
        "write",
        "fsync",
        "read",
        "hash",
        "floor",
        "0.8xCRIU",
        "stasis",
        "stasis/floor",
        "CRIU/floor"
    );
    for r in rows {
        let f = floor::floor(r.write, r.read, r.hash, r.fsync, cores);
        println!(
            "{:>14} | {:>7.1} {:>7.1} {:>7.1} {:>7.1} | {:>7.1} | {:>9.1} {:>9.1} | {:>11.2} {:>11.2}",
            r.label,
            r.write,
            r.fsync,
            r.read,
            r.hash,
            f,
            0.8 * r.criu,
            r.stasis,
            r.stasis / f,
            r.criu / f
        );
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("stasis-bench: {e}");
            std::process::exit(2);
        }
    };
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes no pointers. Detached restored processes
    // are reparented to us so we can reap them.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if args.migrate {
        std::process::exit(if migrate::run(&args) { 0 } else { 1 });
    }
    let img = args
        .dir
        .join(format!("stasis-bench-{}.img", std::process::id()));
    let criu_version = match args.criu.as_deref().map(criu::version).transpose() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("stasis-bench: --criu: {e}");
            std::process::exit(2);
        }
    };
    let durable = match disk::on_disk(&args.dir) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("stasis-bench: --dir: {e}");
            std::process::exit(2);
        }
    };
    println!("stasis-bench: {} runs each, image in {}; times in ms, medians; x = ratio to the baseline median", args.runs, args.dir.display());
    if durable {
        println!("The image dir is on a disk: each timed checkpoint starts with its file system synced; stasis's checkpoint (kill) includes the fsync of its image before the kill, its --leave-running resumes the workload first and syncs after (frozen excludes it)");
    }
    println!(
        "{:>14} {:>5} | {:>9} | {:>10} {:>6} | {:>9} | {:>10} {:>6} | {:>9} {:>9}",
        "workload",
        "pages",
        "baseline",
        "checkpoint",
        "x",
        "frozen",
        "restore",
        "x",
        "image MiB",
        "RSS MiB"
    );
    let mut cases: Vec<Case> = args
        .sizes
        .iter()
        .map(|&mib| Case {
            label: format!("{mib} MiB"),
            bin: "wl-counter",
            args: vec!["--mib".into(), mib.to_string(), "--quiet".into()],
            mib,
            criu: true,
        })
        .collect();
    if args.threads {
        cases.push(Case {
            label: "4 thr x 16 MiB".into(),
            bin: "wl-threads",
            args: vec!["--mib".into(), "16".into()],
            mib: 64,
            criu: false,
        });
    }
    if args.tree {
        cases.push(Case {
            label: "10 proc x 8 MiB".into(),
            bin: "wl-counter",
            args: vec![
                "--mib".into(),
                "8".into(),
                "--procs".into(),
                "10".into(),
                "--quiet".into(),
            ],
            mib: 80,
            criu: false,
        });
    }
    let mut failed = false;
    let max = cases.iter().map(|c| c.mib).max().unwrap_or(1);
    let src: Vec<u8> = (0..(max << 20) as usize)
        .map(|i| (i * 31 + 7) as u8)
        .collect();
    let mut criu_rows = Vec::new();
    for case in &cases {
        for compress in ["none", "zstd"] {
            let mut s = Samples::default();
            let criu_path = args
                .criu
                .as_deref()
                .filter(|_| case.criu && compress == "none");
            let mut cs = criu::Samples::default();
            let mut fs = floor::Samples::default();
            let mut criu_ok = true;
            // Measured before each run, so the baseline sees the same machine state (other
            // load, free memory) as the run it is compared with.
            let mut base = Vec::new();
            for i in 0..args.runs {
                base.push(baseline(case.mib, &src));
                // CRIU runs in the same loop, first in every other run, so that neither tool
                // always follows the other's freeing of its image and process.
                let mut run_criu = |cs: &mut criu::Samples, fs: &mut floor::Samples| {
                    if let (Some(path), true) = (criu_path, criu_ok) {
                        let r = criu::one_run(path, case, &args.dir, durable, cs).and_then(|()| {
                            floor::one_run(
                                &src[..(case.mib << 20) as usize],
                                &args.dir,
                                durable,
                                fs,
                            )
                        });
                        if let Err(e) = r {
                            eprintln!("stasis-bench: {}, CRIU: {e}", case.label);
                            failed = true;
                            criu_ok = false;
                        }
                    }
                };
                if i % 2 == 1 {
                    run_criu(&mut cs, &mut fs);
                }
                let disk = durable.then_some(args.dir.as_path());
                if let Err(e) = one_run(case, compress, &img, disk, &mut s) {
                    eprintln!("stasis-bench: {}, {compress}: {e}", case.label);
                    failed = true;
                    break;
                }
                if i % 2 == 0 {
                    run_criu(&mut cs, &mut fs);
                }
            }
            let b = median(&mut base);
            let c = median(&mut s.checkpoint);
            let r = median(&mut s.restore);
            if criu_path.is_some() {
                criu_rows.push(CriuRow {
                    label: case.label.clone(),
                    baseline: b,
                    checkpoint: c,
                    restore: r,
                    criu: cs,
                    floor: fs,
                });
            }
            println!(
                "{:>14} {:>5} | {:>9.1} | {:>10.1} {:>6.2} | {:>9.1} | {:>10.1} {:>6.2} | {:>9.1} {:>9.1}",
                case.label,
                compress,
                b,
                c,
                c / b,
                median(&mut s.frozen),
                r,
                r / b,
                median(&mut s.size_mib),
                median(&mut s.rss_mib)
            );
        }
    }
    if let (Some(path), Some(version)) = (&args.criu, &criu_version) {
        print_criu(path, version, criu_rows, durable);
    }
    if args.vms {
        let base = |mib: u64| {
            let mut v: Vec<f64> = (0..args.runs).map(|_| baseline(mib, &src)).collect();
            median(&mut v)
        };
        failed |= !vm::run(&args, &img, &base);
    }
    let _ = std::fs::remove_file(&img);
    if failed {
        std::process::exit(1);
    }
}

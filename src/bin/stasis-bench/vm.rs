//! The VM part of stasis-bench: the demo guest in VMs of each size fills its memory, then
//! writes slowly (a delay loop between steps); then a --leave-running snapshot (pause and
//! total time), a stop-the-world snapshot (total), and a restore until the guest runs again
//! ("restore") and until the restore is confirmed: every page hash of the image checked,
//! beside the running guest ("confirmed").

use super::{median, stasis, Args};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Delay-loop iterations between the guest's steps once its memory is filled.
const STEP_DELAY: &str = "200000";

/// `vm run` arguments of the demo VM `name` with `mem` of memory, detached, writing slowly
/// once its memory is filled (see [`wait_filled`]).
pub fn demo_run_args<'a>(name: &'a str, mem: &'a str) -> [&'a str; 11] {
    [
        "vm",
        "run",
        "--name",
        name,
        "--memory",
        mem,
        "--guest",
        "demo",
        "--detach",
        "--step-delay",
        STEP_DELAY,
    ]
}

/// Waits (at most `secs`) until the demo guest of `mib` MiB has written every page of its
/// work memory once, as `counter` reports.
pub fn wait_filled(mib: u64, secs: u64, counter: impl Fn() -> u64) -> Result<(), String> {
    let pages = work_pages(mib);
    let deadline = Instant::now() + Duration::from_secs(secs);
    while counter() < pages {
        if Instant::now() > deadline {
            return Err(format!("the guest did not fill its memory within {secs} s"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The pages of work memory of a demo guest of `mib` MiB (all but its first MiB).
fn work_pages(mib: u64) -> u64 {
    ((mib << 20) - (1 << 20)) / 4096
}

/// The counter of VM `name` in the text of `stasis vm ps --json` (0 if it is not there).
pub fn counter_in(ps_json: &str, name: &str) -> u64 {
    serde_json::from_str::<serde_json::Value>(ps_json)
        .ok()
        .and_then(|v| {
            v.as_array()?
                .iter()
                .find(|r| r["name"] == name)
                .and_then(|r| r["counter"].as_u64())
        })
        .unwrap_or(0)
}

#[derive(Default)]
struct VmSamples {
    pause: Vec<f64>,
    live_total: Vec<f64>,
    snapshot: Vec<f64>,
    restore: Vec<f64>,
    confirmed: Vec<f64>,
}

fn ok(args: &[&str]) -> Result<String, String> {
    stasis(args, Stdio::null(), Stdio::piped()).map(|(_, _, out)| out)
}

fn field(text: &str, path: &[&str]) -> f64 {
    let mut v = serde_json::from_str::<serde_json::Value>(text).unwrap_or_default();
    for p in path {
        v = v[*p].take();
    }
    v.as_u64().map(|v| v as f64).unwrap_or(f64::NAN)
}

fn counter(state: &str, name: &str) -> u64 {
    ok(&["--state-dir", state, "vm", "ps", "--json"]).map_or(0, |t| counter_in(&t, name))
}

fn one_run(mib: u64, img: &Path, state: &str, s: &mut VmSamples) -> Result<(), String> {
    let name = "bench-vm";
    let mem = format!("{mib}m");
    let img = img.display().to_string();
    let live = format!("{img}.live");
    let mut run = vec!["--state-dir", state];
    run.extend(demo_run_args(name, &mem));
    ok(&run)?;
    wait_filled(mib, 60, || counter(state, name))?;
    let pages = work_pages(mib);
    let out = ok(&[
        "--state-dir",
        state,
        "checkpoint",
        name,
        "-o",
        &live,
        "--leave-running",
        "--json",
    ])?;
    s.pause.push(field(&out, &["pause_us"]) / 1000.0);
    s.live_total.push(field(&out, &["total_us"]) / 1000.0);
    let out = ok(&[
        "--state-dir",
        state,
        "checkpoint",
        name,
        "-o",
        &img,
        "--json",
    ])?;
    s.snapshot.push(field(&out, &["total_us"]) / 1000.0);
    let out = ok(&["--state-dir", state, "restore", &img, "--detach", "--json"])?;
    s.restore.push(field(&out, &["running_us"]) / 1000.0);
    s.confirmed.push(field(&out, &["total_us"]) / 1000.0);
    std::thread::sleep(Duration::from_millis(200));
    let stop = ok(&["--state-dir", state, "vm", "stop", name, "--json"])?;
    let _ = std::fs::remove_file(&live);
    let _ = std::fs::remove_file(&img);
    if field(&stop, &["errors"]) != 0.0 || field(&stop, &["counter"]) < pages as f64 {
        return Err(format!("the restored guest failed its checks: {stop}"));
    }
    Ok(())
}

/// Runs the VM benchmark for each size; false if a run failed.
pub fn run(args: &Args, img: &Path, base_ms: &dyn Fn(u64) -> f64) -> bool {
    if !Path::new("/dev/kvm").exists() {
        println!("VMs: skipped: /dev/kvm does not exist on this host");
        return true;
    }
    let state = args
        .dir
        .join(format!("stasis-bench-vms-{}", std::process::id()));
    let state = state.display().to_string();
    println!();
    println!(
        "VMs (demo guest, raw pages; targets: pause <= 20 ms, restore-to-running <= 20 ms for 1 GiB)"
    );
    println!(
        "{:>8} | {:>9} | {:>8} {:>10} | {:>9} {:>6} | {:>9} {:>6} {:>9}",
        "memory", "baseline", "pause", "live total", "snapshot", "x", "restore", "x", "confirmed"
    );
    let mut good = true;
    for &mib in &args.sizes {
        let b = base_ms(mib);
        let mut s = VmSamples::default();
        for _ in 0..args.runs {
            if let Err(e) = one_run(mib, img, &state, &mut s) {
                eprintln!("stasis-bench: VM {mib} MiB: {e}");
                let _ = ok(&["--state-dir", &state, "vm", "stop", "bench-vm"]);
                good = false;
                break;
            }
        }
        let (snap, rest) = (median(&mut s.snapshot), median(&mut s.restore));
        println!(
            "{:>4} MiB | {:>9.1} | {:>8.2} {:>10.1} | {:>9.1} {:>6.2} | {:>9.2} {:>6.2} {:>9.1}",
            mib,
            b,
            median(&mut s.pause),
            median(&mut s.live_total),
            snap,
            snap / b,
            rest,
            rest / b,
            median(&mut s.confirmed)
        );
    }
    let _ = std::fs::remove_dir_all(&state);
    good
}

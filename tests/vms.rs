//! KVM VMs end to end: the built-in demo guest detached and in the foreground, its reports
//! checked by the VMM, the console, a clean stop, and `--kernel` refused on a host without
//! hardware virtualization; demo VMs of several vCPUs, snapshotted and restored.

mod common;

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Whether KVM is usable here; says why not when it is not.
fn have_kvm(test: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    common::skip(test, "/dev/kvm does not exist on this host");
    false
}

fn host_has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| {
            t.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

struct Env {
    state: PathBuf,
}

impl Env {
    fn new(test: &str) -> Env {
        Env {
            state: common::scratch(test),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(common::stasis())
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .output()
            .expect("running stasis")
    }

    /// stasis with this state directory, its standard streams piped.
    fn command(&self) -> Command {
        let mut c = Command::new(common::stasis());
        c.arg("--state-dir")
            .arg(&self.state)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "stasis {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ps(&self) -> Vec<Value> {
        let v: Value = serde_json::from_str(&self.ok(&["vm", "ps", "--json"])).expect("ps json");
        v.as_array().cloned().unwrap_or_default()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A VM a failed test left behind: kill its VMM by the PID its record names.
        if let Ok(dir) = std::fs::read_dir(self.state.join("vms")) {
            for e in dir.flatten() {
                if e.path().extension().is_some_and(|x| x == "json") {
                    let rec: Option<Value> = std::fs::read(e.path())
                        .ok()
                        .and_then(|t| serde_json::from_slice(&t).ok());
                    if let Some(pid) = rec.and_then(|r| r["pid"].as_i64()) {
                        // SAFETY: kill takes no pointers; the pid is the VMM this test started.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

#[test]
fn demo_guest_detached_ps_console_stop() {
    if !have_kvm("demo_guest_detached_ps_console_stop") {
        return;
    }
    let env = Env::new("vm-detached");
    let out = env.ok(&[
        "vm", "run", "--name", "demo1", "--memory", "64m", "--guest", "demo", "--detach",
    ]);
    assert_eq!(out.trim(), "demo1");
    let started = Instant::now();
    let first = loop {
        let rows = env.ps();
        assert_eq!(rows.len(), 1, "{rows:?}");
        if rows[0]["counter"].as_u64().unwrap_or(0) > 0 {
            break rows[0].clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no report: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(2));
    let second = env.ps()[0].clone();
    eprintln!("ps: {second}");
    assert_eq!(second["name"], "demo1");
    assert_eq!(second["state"], "running");
    assert_eq!(second["errors"], 0, "{second}");
    assert!(
        second["counter"].as_u64() > first["counter"].as_u64(),
        "the counter did not increase: {first} then {second}"
    );
    let console = env.ok(&["vm", "console", "demo1", "--no-follow"]);
    assert!(console.contains("stasis demo guest up"), "{console:?}");

    let pid = second["pid"].as_i64().expect("pid") as i32;
    let stop: Value =
        serde_json::from_str(&env.ok(&["vm", "stop", "demo1", "--json"])).expect("stop json");
    assert_eq!(stop["state"], "stopped", "{stop}");
    assert_eq!(stop["errors"], 0, "{stop}");
    assert!(stop["counter"].as_u64() >= second["counter"].as_u64());
    assert!(env.ps().is_empty(), "the record is gone");
    assert!(!env.state.join("vms/demo1.json").exists());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true),
        "the VMM {pid} has exited"
    );
    let again = env.run(&["vm", "stop", "demo1"]);
    assert_eq!(
        again.status.code(),
        Some(4),
        "stopping a stopped VM is refused"
    );
}

#[test]
fn demo_guest_foreground_with_a_step_limit() {
    if !have_kvm("demo_guest_foreground_with_a_step_limit") {
        return;
    }
    let env = Env::new("vm-foreground");
    let steps = 1_000_000u64;
    let out = env.run(&[
        "vm",
        "run",
        "--name",
        "fg",
        "--memory",
        "64m",
        "--guest",
        "demo",
        "--steps",
        &steps.to_string(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rep: Value = serde_json::from_slice(&out.stdout).expect("report json");
    eprintln!("report: {rep}");
    assert_eq!(rep["state"], "shutdown");
    assert_eq!(rep["counter"].as_u64(), Some(steps));
    assert_eq!(rep["errors"], 0);
    assert!(rep["reports"].as_u64() > Some(1));
    // Without --json the console is on standard output.
    let out = env.run(&[
        "vm", "run", "--name", "fg", "--memory", "8m", "--guest", "demo", "--steps", "1000",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("stasis demo guest up"));
    assert!(env.ps().is_empty());
}

#[test]
fn kernel_boot_without_hardware_virtualization_is_refused() {
    if host_has_hw_virt() {
        common::skip(
            "kernel_boot_without_hardware_virtualization_is_refused",
            "this host has VMX/SVM, so --kernel is not refused for lack of it",
        );
        return;
    }
    eprintln!("checking the refusal of --kernel: this host's CPU has no VMX/SVM");
    let env = Env::new("vm-kernel");
    let out = env.run(&[
        "vm",
        "run",
        "--name",
        "k",
        "--memory",
        "64m",
        "--kernel",
        "/nonexistent/bzImage",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("no VMX or SVM") && err.contains("PVM"),
        "{err}"
    );
    assert!(env.ps().is_empty());
}

/// A VM image path in the test's scratch directory.
fn image(env: &Env, name: &str) -> String {
    env.state.join(name).display().to_string()
}

fn json_of(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: json: {e}"))
}

fn counter_of(env: &Env, name: &str) -> u64 {
    env.ps()
        .iter()
        .find(|r| r["name"] == name)
        .and_then(|r| r["counter"].as_u64())
        .unwrap_or(0)
}

/// Starts a detached 16 MiB demo VM and waits for its first report.
fn start_demo(env: &Env, name: &str) {
    run_demo(env, name, "16m", &[]);
    wait_running(env, name);
}

/// Starts a detached demo guest with `memory` and the `extra` arguments of `vm run`.
fn run_demo(env: &Env, name: &str, memory: &str, extra: &[&str]) {
    let mut args = vec![
        "vm", "run", "--name", name, "--memory", memory, "--guest", "demo", "--detach",
    ];
    args.extend_from_slice(extra);
    env.ok(&args);
}

/// Waits until the VM has made its first report.
fn wait_running(env: &Env, name: &str) {
    let started = Instant::now();
    while counter_of(env, name) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} never reported"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn vm_snapshot_restore_twice_runs_on_without_a_gap() {
    if !have_kvm("vm_snapshot_restore_twice_runs_on_without_a_gap") {
        return;
    }
    let env = Env::new("vm-snap-twice");
    let steps = 6_000_000u64;
    run_demo(&env, "s", "16m", &["--steps", &steps.to_string()]);
    wait_running(&env, "s");
    let (img1, img2) = (image(&env, "s1.img"), image(&env, "s2.img"));
    let c1 = json_of(
        &env.run(&["checkpoint", "s", "-o", &img1, "--json"]),
        "checkpoint 1",
    );
    eprintln!("checkpoint 1: {c1}");
    assert_eq!(c1["vm"], "stopped");
    assert!(
        env.ps().is_empty(),
        "the VM was stopped after the checkpoint"
    );
    let r1 = json_of(
        &env.run(&["restore", &img1, "--detach", "--json"]),
        "restore 1",
    );
    assert_eq!(r1["record"]["name"], "s");
    let before = counter_of(&env, "s");
    // Bounded, not a fixed sleep: on a busy machine the guest may take a while to report.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter_of(&env, "s") <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(counter_of(&env, "s") > before, "the restored guest runs");
    let c2 = json_of(
        &env.run(&[
            "checkpoint",
            "s",
            "-o",
            &img2,
            "--compress",
            "zstd",
            "--json",
        ]),
        "checkpoint 2",
    );
    eprintln!("checkpoint 2: {c2}");
    let out = env.run(&["restore", &img2, "--json"]);
    let r2 = json_of(&out, "restore 2 (foreground)");
    let rep = &r2["report"];
    eprintln!("final report: {rep}");
    assert_eq!(rep["state"], "shutdown", "{rep}");
    assert_eq!(rep["counter"].as_u64(), Some(steps), "{rep}");
    assert_eq!(rep["errors"], 0, "{rep}");
    assert!(env.ps().is_empty());
}

#[test]
fn vm_leave_running_snapshot_restored_beside_the_original() {
    if !have_kvm("vm_leave_running_snapshot_restored_beside_the_original") {
        return;
    }
    let c = leave_running_beside("vm-snap-live", &[]);
    assert_eq!(c["staged"], true, "{c}");
    assert!(c["staging_limit"].as_u64() > Some(16 << 20), "{c}");
    assert!(c["precopy_us"].as_u64() > Some(0), "{c}");
}

/// Over the staging limit the guest stays paused while its memory is written, and still
/// runs on afterwards.
#[test]
fn vm_leave_running_over_the_staging_limit_pauses_and_runs_on() {
    if !have_kvm("vm_leave_running_over_the_staging_limit_pauses_and_runs_on") {
        return;
    }
    let c = leave_running_beside("vm-snap-unstaged", &["--staging-limit", "1M"]);
    assert_eq!(c["staged"], false, "{c}");
    assert_eq!(c["staging_limit"].as_u64(), Some(1 << 20), "{c}");
    assert_eq!(c["precopy_us"].as_u64(), Some(0), "{c}");
    assert!(
        c["pages_resident"].as_u64() > Some(256),
        "more than 1 MiB resident: {c}"
    );
}

/// The dirty log a snapshot turned on is turned off again when that snapshot goes away
/// before pausing the VM (it failed, or its process died), and only one snapshot at a time
/// may track the VM's dirty pages.
#[test]
fn vm_dirty_log_of_a_vanished_snapshot_is_turned_off() {
    if !have_kvm("vm_dirty_log_of_a_vanished_snapshot_is_turned_off") {
        return;
    }
    use stasis_runtime::container::StateDir;
    use stasis_runtime::kvm::vmm;
    let env = Env::new("vm-dirty-owner");
    start_demo(&env, "d");
    let state = StateDir::new(&env.state);
    let (session, _) = vmm::dirty_log_start(&state, "d").expect("dirty-log start");
    vmm::dirty_log_fetch(&state, "d").expect("fetch while the session lives");
    let second = vmm::dirty_log_start(&state, "d");
    assert!(
        second
            .as_ref()
            .is_err_and(|e| e.to_string().contains("already tracking")),
        "a second snapshot must be refused: {:?}",
        second.map(|_| ())
    );
    drop(session);
    let started = Instant::now();
    while vmm::dirty_log_fetch(&state, "d").is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the dirty log stayed on after its session closed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // A new snapshot may start again, and works.
    let img = image(&env, "after.img");
    let c = json_of(
        &env.run(&["checkpoint", "d", "-o", &img, "--leave-running", "--json"]),
        "checkpoint --leave-running after the vanished session",
    );
    assert_eq!(c["vm"], "running", "{c}");
    assert_eq!(c["staged"], true, "{c}");
    let rep = json_of(&env.run(&["vm", "stop", "d", "--json"]), "vm stop");
    assert_eq!(rep["errors"], 0, "{rep}");
}

/// Snapshots a running 16 MiB demo guest with `checkpoint --leave-running` and `extra`,
/// restores the image beside it as "copy", and checks both run on without errors; returns
/// the checkpoint's statistics.
fn leave_running_beside(test: &str, extra: &[&str]) -> Value {
    let env = Env::new(test);
    start_demo(&env, "orig");
    let img = image(&env, "live.img");
    let mut args = vec![
        "checkpoint",
        "orig",
        "-o",
        &img,
        "--leave-running",
        "--json",
    ];
    args.extend_from_slice(extra);
    let c = json_of(&env.run(&args), "checkpoint --leave-running");
    eprintln!("checkpoint: {c}");
    assert_eq!(c["vm"], "running");
    assert!(c["pause_us"].as_u64() > Some(0));
    assert!(c["pause_us"].as_u64() <= c["total_us"].as_u64());
    let before = counter_of(&env, "orig");
    assert!(before > 0, "the original still runs");
    let r = json_of(
        &env.run(&["restore", &img, "--name", "copy", "--detach", "--json"]),
        "restore --name copy",
    );
    assert_eq!(r["record"]["name"], "copy");
    wait_running(&env, "copy");
    let copy_start = counter_of(&env, "copy");
    std::thread::sleep(Duration::from_secs(1));
    let rows = env.ps();
    eprintln!("both: {rows:?}");
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(r["errors"], 0, "{r}");
        assert_eq!(r["state"], "running", "{r}");
    }
    assert!(counter_of(&env, "copy") > copy_start, "the copy runs on");
    for name in ["orig", "copy"] {
        let rep = json_of(&env.run(&["vm", "stop", name, "--json"]), "vm stop");
        eprintln!("{name}: {rep}");
        assert_eq!(rep["errors"], 0, "{rep}");
        assert!(rep["counter"].as_u64() > Some(0));
    }
    assert!(env.ps().is_empty());
    c
}

#[test]
fn vm_corrupt_image_and_other_memory_size_are_refused() {
    if !have_kvm("vm_corrupt_image_and_other_memory_size_are_refused") {
        return;
    }
    let env = Env::new("vm-snap-bad");
    start_demo(&env, "b");
    let img = image(&env, "b.img");
    env.ok(&["checkpoint", "b", "-o", &img]);

    let out = env.run(&["restore", &img, "--memory", "32m"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("memory size must be the same"), "{err}");
    assert!(env.ps().is_empty(), "nothing started");

    let inspect: Value =
        serde_json::from_str(&env.ok(&["image", "inspect", &img, "--json"])).expect("inspect");
    let last = inspect["chunks"]
        .as_array()
        .and_then(|c| c.last())
        .expect("chunks")
        .clone();
    let at = |key: &str| last[key].as_u64().expect("offset") as usize;
    let corrupt = |file: &str, offset: usize| {
        let mut bytes = std::fs::read(&img).expect("read image");
        bytes[offset] ^= 0x40;
        let bad = image(&env, file);
        std::fs::write(&bad, &bytes).expect("write corrupt image");
        bad
    };
    let refused = |args: &[&str], after_start: bool| {
        let out = env.run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
        assert_eq!(
            err.contains("failed verification after the guest started"),
            after_start,
            "{args:?}: {err}"
        );
        assert!(env.ps().is_empty(), "{args:?}: a VM was left behind");
        assert!(!env.state.join("vms/b.json").exists(), "{args:?}");
    };
    // A flipped bit in guest memory: by default the guest starts on the mapped pages and is
    // stopped and removed when their hash check fails; --verify-first never starts it.
    let bad_data = corrupt("bad-data.img", at("data_offset") + 100);
    refused(&["restore", &bad_data, "--detach"], true);
    refused(&["restore", &bad_data, "--json"], true);
    refused(&["restore", &bad_data, "--detach", "--verify-first"], false);
    // A flipped bit in a chunk's record is found before anything starts.
    let bad_meta = corrupt("bad-meta.img", at("chunk_offset") + 40);
    refused(&["restore", &bad_meta, "--detach"], false);
    // The intact image still restores, with its memory checked beside the guest.
    let out = env.ok(&["restore", &img, "--detach", "--json"]);
    let stats: Value = serde_json::from_str(&out).expect("restore stats");
    assert_eq!(stats["verify"], "beside", "{out}");
    assert!(
        stats["running_us"].as_u64() <= stats["total_us"].as_u64(),
        "{out}"
    );
    wait_running(&env, "b");
    env.ok(&["vm", "stop", "b"]);
}

/// Each vCPU's counter of the VM `name` as `vm ps --json` shows it (empty if not running);
/// checks that the top-level counter is their sum and that no report was wrong.
fn vcpu_counters(env: &Env, name: &str) -> Vec<u64> {
    let Some(row) = env.ps().into_iter().find(|r| r["name"] == name) else {
        return Vec::new();
    };
    assert_eq!(row["errors"], 0, "{row}");
    let counters: Vec<u64> = row["per_vcpu"]
        .as_array()
        .map(|v| v.iter().filter_map(|c| c["counter"].as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(
        row["counter"].as_u64(),
        Some(counters.iter().sum::<u64>()),
        "{row}"
    );
    counters
}

/// Waits until every vCPU of `name` has reported, then until every one has moved on from
/// there (each vCPU runs, not just some); returns the later counters.
fn wait_all_progress(env: &Env, name: &str, vcpus: usize) -> Vec<u64> {
    let started = Instant::now();
    let mut first = vcpu_counters(env, name);
    while first.len() != vcpus || first.contains(&0) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: not every vCPU reported: {first:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
        first = vcpu_counters(env, name);
    }
    loop {
        let now = vcpu_counters(env, name);
        if now.len() == vcpus && now.iter().zip(&first).all(|(n, f)| n > f) {
            return now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: not every vCPU progressed: {first:?} then {now:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Each vCPU's counter in an image, from its report devices.
fn image_counters(env: &Env, img: &str, vcpus: usize) -> Vec<u64> {
    let v: Value =
        serde_json::from_str(&env.ok(&["image", "inspect", img, "--json"])).expect("inspect");
    let vm = &v["inventory"]["vm"];
    assert_eq!(vm["vcpus"].as_array().map(Vec::len), Some(vcpus), "{vm}");
    for (i, c) in vm["vcpus"].as_array().into_iter().flatten().enumerate() {
        assert_eq!(c["id"].as_u64(), Some(i as u64), "{vm}");
    }
    let devs = vm["report_devices"].as_array().cloned().unwrap_or_default();
    assert_eq!(devs.len(), vcpus, "{vm}");
    devs.iter()
        .map(|d| {
            assert_eq!(d["errors"].as_u64().unwrap_or(0), 0, "{d}");
            d["counter"].as_u64().unwrap_or(0)
        })
        .collect()
}

#[test]
fn vcpus_out_of_range_are_refused() {
    let env = Env::new("vm-vcpus-range");
    for n in ["0", "9"] {
        let out = env.run(&[
            "vm", "run", "--name", "r", "--memory", "16m", "--guest", "demo", "--vcpus", n,
            "--detach",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "--vcpus {n}: {err}");
        assert!(err.contains(&format!("--vcpus {n}")), "{err}");
        assert!(err.contains("1 to 8"), "{err}");
        assert!(env.ps().is_empty(), "--vcpus {n}: nothing started");
    }
}

#[test]
fn four_vcpus_run_and_snapshot_twice_without_a_gap() {
    if !have_kvm("four_vcpus_run_and_snapshot_twice_without_a_gap") {
        return;
    }
    const N: usize = 4;
    let env = Env::new("vm-vcpus-snap");
    let steps = 4_000_000u64;
    run_demo(
        &env,
        "m",
        "16m",
        &["--vcpus", "4", "--steps", &steps.to_string()],
    );
    wait_all_progress(&env, "m", N);
    let (img1, img2) = (image(&env, "m1.img"), image(&env, "m2.img"));

    // 1: the VM stops with its checkpoint; every vCPU is restored and goes on from its own
    // counter (the VMM's model of each vCPU counts any gap, repeat or bad checksum as an
    // error, which vcpu_counters checks is 0).
    let c1 = json_of(
        &env.run(&["checkpoint", "m", "-o", &img1, "--json"]),
        "cp 1",
    );
    assert_eq!(c1["vm"], "stopped", "{c1}");
    assert!(
        env.ps().is_empty(),
        "the VM was stopped after the checkpoint"
    );
    let saved1 = image_counters(&env, &img1, N);
    json_of(
        &env.run(&["restore", &img1, "--detach", "--json"]),
        "restore 1",
    );
    let now = wait_all_progress(&env, "m", N);
    for (i, (n, s)) in now.iter().zip(&saved1).enumerate() {
        assert!(
            n > s,
            "vCPU {i} went on from its image: {saved1:?} then {now:?}"
        );
    }

    // 2: the VM runs on beside its checkpoint; the image, restored in the foreground, runs
    // every vCPU to its step limit, each slice of memory then checked against its model.
    let c2 = json_of(
        &env.run(&["checkpoint", "m", "-o", &img2, "--leave-running", "--json"]),
        "cp 2",
    );
    assert_eq!(c2["vm"], "running", "{c2}");
    let saved2 = image_counters(&env, &img2, N);
    for (i, (a, b)) in saved1.iter().zip(&saved2).enumerate() {
        assert!(
            b > a,
            "vCPU {i} moved between the images: {saved1:?} then {saved2:?}"
        );
    }
    wait_all_progress(&env, "m", N);
    let rep = json_of(&env.run(&["vm", "stop", "m", "--json"]), "vm stop");
    assert_eq!(rep["errors"], 0, "{rep}");
    let r2 = json_of(&env.run(&["restore", &img2, "--json"]), "restore 2");
    let rep = &r2["report"];
    eprintln!("final report: {rep}");
    assert_eq!(rep["state"], "shutdown", "{rep}");
    assert_eq!(rep["errors"], 0, "{rep}");
    assert_eq!(rep["counter"].as_u64(), Some(steps * N as u64), "{rep}");
    let per = rep["per_vcpu"].as_array().cloned().unwrap_or_default();
    assert_eq!(per.len(), N, "{rep}");
    for (i, v) in per.iter().enumerate() {
        assert_eq!(v["index"].as_u64(), Some(i as u64), "{rep}");
        assert_eq!(v["counter"].as_u64(), Some(steps), "vCPU {i}: {rep}");
        assert_eq!(v["errors"], 0, "vCPU {i}: {rep}");
    }
    assert!(env.ps().is_empty());
}

/// Whether `child` exits within `limit`; if not it is killed (it is this test's own).
fn exits_within(child: &mut std::process::Child, limit: Duration) -> bool {
    let started = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// What the test guest's /init prints once Linux has booted into it.
const BOOT_MARKER: &str = "STASIS-LINUX-GUEST-UP";

/// The test guest's /init: print the marker on the serial console, then reset through the
/// keyboard controller (reboot=k). `poweroff -f` would not end it: without ACPI a PC
/// kernel cannot power off and halts forever, so the guest reboots, which ends the VM.
fn init_script() -> String {
    format!(
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
         /bin/busybox echo {BOOT_MARKER} > /dev/ttyS0\n/bin/busybox reboot -f\n"
    )
}

#[test]
fn real_debian_kernel_parses_and_lays_out_in_256_mib() {
    use stasis_runtime::kvm::linux::{self, bzimage::BzImage, layout, tables};
    use stasis_runtime::kvm::memory::GuestMemory;
    let kernel = match common::linux_guest::debian_kernel() {
        Ok(k) => k,
        Err(why) => {
            common::skip("real_debian_kernel_parses_and_lays_out_in_256_mib", &why);
            return;
        }
    };
    eprintln!("kernel: {}", kernel.display());
    let bytes = std::fs::read(&kernel).expect("read the kernel");
    let img = BzImage::parse(&bytes).expect("a Debian kernel is a bzImage");
    let h = img.header;
    eprintln!("setup header: {h:?}");
    assert!(h.version >= 0x020c, "protocol {:#x}", h.version);
    assert_ne!(h.xloadflags & 1, 0, "64-bit entry");
    assert!(h.relocatable);
    assert!(h.cmdline_size >= 255);
    assert!(
        h.init_size as usize > img.kernel.len(),
        "init_size covers decompression"
    );
    assert!(h.syssize <= img.kernel.len() as u64);

    let initrd = common::linux_guest::initramfs(&init_script()).expect("initramfs");
    let cmdline = "console=ttyS0 reboot=k panic=-1";
    let mem = GuestMemory::new("lx", 256 << 20).expect("guest memory");
    let l = layout::plan(
        &h,
        img.kernel.len() as u64,
        mem.size(),
        Some(initrd.len() as u64),
        cmdline.len(),
    )
    .expect("it fits in 256 MiB");
    eprintln!("layout: {l:?}");
    assert_eq!(l.entry, 0x10_0200);
    assert_eq!(l.run, h.pref_address.max(0x20_0000));
    let (ia, is) = l.initrd.expect("initrd placed");
    assert!(ia >= l.kernel_end && ia.is_multiple_of(4096) && ia + is <= 256 << 20);
    layout::write(&mem, &img, &l, Some(&initrd), cmdline).expect("write the layout");
    let mut head = vec![0u8; 4096];
    assert!(mem.read(l.load, &mut head));
    assert_eq!(
        head,
        img.kernel[..4096],
        "the protected-mode kernel is at 1 MiB"
    );
    let mut magic = [0u8; 4];
    assert!(mem.read(layout::ZERO_PAGE_ADDR + 0x202, &mut magic));
    assert_eq!(&magic, b"HdrS");
    assert_eq!(
        mem.read_u64(layout::ZERO_PAGE_ADDR + 0x218)
            .map(|v| v as u32),
        Some(ia as u32),
        "ramdisk_image"
    );
    assert_eq!(
        mem.read_u64(tables::PD_ADDR + 8),
        Some((2 << 20) | 0x83),
        "identity 2 MiB pages"
    );
    // Too little memory and too long a command line are refused by check, naming the file.
    let e = linux::check("lx", &kernel, None, cmdline, 32 << 20)
        .expect_err("32 MiB is too small")
        .to_string();
    assert!(
        e.contains("vmlinuz") && e.contains("needs guest memory"),
        "{e}"
    );
    let e = linux::check("lx", &kernel, None, &"y".repeat(5000), 256 << 20)
        .expect_err("too long")
        .to_string();
    assert!(e.contains("command line is 5000 bytes"), "{e}");
}

#[test]
fn debian_kernel_boots_to_init_and_resets_cleanly() {
    let test = "debian_kernel_boots_to_init_and_resets_cleanly";
    if stasis_runtime::kvm::hardware_virtualization().is_none() {
        common::skip(
            test,
            "this host's CPU has no VMX/SVM, so /dev/kvm (if any) is a software virtualizer \
             (PVM) that cannot boot a stock Linux kernel",
        );
        return;
    }
    if !have_kvm(test) {
        return;
    }
    let kernel = match common::linux_guest::debian_kernel() {
        Ok(k) => k,
        Err(why) => {
            common::skip(test, &why);
            return;
        }
    };
    let env = Env::new("vm-linux");
    let initrd = env.state.join("initrd.cpio");
    std::fs::write(
        &initrd,
        common::linux_guest::initramfs(&init_script()).expect("initramfs"),
    )
    .expect("write the initramfs");
    let mut child = env
        .command()
        .args(["vm", "run", "--name", "lx", "--memory", "256m", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .args(["--cmdline", "console=ttyS0 reboot=k panic=-1", "--json"])
        .spawn()
        .expect("stasis vm run --kernel");
    if !exits_within(&mut child, Duration::from_secs(120)) {
        let log = std::fs::read_to_string(env.state.join("vms/lx.log")).unwrap_or_default();
        panic!("the guest did not end within 120 s; console:\n{log}");
    }
    let out = child.wait_with_output().expect("output");
    let log = std::fs::read_to_string(env.state.join("vms/lx.log")).unwrap_or_default();
    eprintln!("console:\n{log}");
    let rep = json_of(&out, "vm run --kernel");
    eprintln!("report: {rep}");
    assert!(log.contains(BOOT_MARKER), "the guest's /init ran");
    assert_eq!(rep["state"], "shutdown", "{rep}");
    assert!(
        rep["end"].as_str().is_some_and(|e| e.contains("reset")),
        "{rep}"
    );
    assert!(env.ps().is_empty());
}

#[test]
fn console_input_reaches_the_guests_serial_receiver() {
    if !have_kvm("console_input_reaches_the_guests_serial_receiver") {
        return;
    }
    let env = Env::new("vm-console-in");
    start_demo(&env, "c");
    let mut console = env
        .command()
        .args(["vm", "console", "c"])
        .spawn()
        .expect("stasis vm console");
    {
        use std::io::Write;
        let mut stdin = console.stdin.take().expect("stdin");
        // Ctrl-] detaches; what follows it is not sent.
        stdin
            .write_all(b"hello\x1dnot sent")
            .expect("write to the console");
    }
    assert!(
        exits_within(&mut console, Duration::from_secs(10)),
        "the console did not detach on Ctrl-]"
    );
    let out = console.wait_with_output().expect("console output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("detached"), "{err}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stasis demo guest up"),
        "the console showed the log"
    );
    // The demo guest never reads its UART: the bytes wait in the receive FIFO.
    let queued = || {
        env.ps()
            .first()
            .and_then(|r| r["serial_rx"].as_u64())
            .unwrap_or(0)
    };
    let started = Instant::now();
    while queued() != 5 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "serial_rx is {}, not 5",
            queued()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And they are part of a snapshot.
    let img = image(&env, "c.img");
    env.ok(&["checkpoint", "c", "-o", &img, "--leave-running"]);
    let inspect = env.ok(&["image", "inspect", &img]);
    assert!(inspect.contains("5 bytes queued"), "{inspect}");
    env.ok(&["vm", "stop", "c"]);
}

/// Everything of a Linux boot but KVM_RUN, on whatever /dev/kvm this host has: irqchip and
/// PIT, the boot vCPU's CPUID, MSRs, FPU, LAPIC, long-mode sregs and registers.
#[test]
fn debian_kernel_boot_vcpu_is_set_up() {
    use stasis_runtime::kvm::linux;
    use stasis_runtime::kvm::vm::Vm;
    let test = "debian_kernel_boot_vcpu_is_set_up";
    if !have_kvm(test) {
        return;
    }
    let kernel = match common::linux_guest::debian_kernel() {
        Ok(k) => k,
        Err(why) => {
            common::skip(test, &why);
            return;
        }
    };
    let mut vm = Vm::create("lx", 256 << 20).expect("create the VM");
    vm.create_irqchip().expect("irqchip and PIT");
    let vcpu = vm.create_vcpu(0).expect("vCPU");
    let l = linux::load(&vm, &vcpu, &kernel, None, "console=ttyS0").expect("load");
    let regs = vcpu.get_regs().expect("regs");
    let sregs = vcpu.get_sregs().expect("sregs");
    assert_eq!(regs.rip, l.entry);
    assert_eq!(regs.rsi, linux::layout::ZERO_PAGE_ADDR);
    assert_eq!(sregs.cs.selector, 0x10);
    assert_eq!(sregs.cs.l, 1);
    assert_eq!(sregs.ds.selector, 0x18);
    assert_eq!(sregs.cr3, linux::tables::PML4_ADDR);
    assert_eq!(sregs.efer & 0x500, 0x500, "LME and LMA");
    let lapic = vcpu.get_lapic().expect("lapic");
    let lvt0 = u32::from_le_bytes([0x350, 0x351, 0x352, 0x353].map(|i| lapic.regs[i] as u8));
    assert_eq!(lvt0 & 0x700, 0x700, "LINT0 is ExtINT");
}

#[test]
fn vm_with_irqchip_and_pit_snapshot_restores() {
    if !have_kvm("vm_with_irqchip_and_pit_snapshot_restores") {
        return;
    }
    let env = Env::new("vm-irqchip");
    run_demo(&env, "q", "16m", &["--irqchip"]);
    wait_running(&env, "q");
    let img = image(&env, "q.img");
    env.ok(&["checkpoint", "q", "-o", &img, "--leave-running"]);
    let inspect = env.ok(&["image", "inspect", &img]);
    assert!(inspect.contains("irqchip yes, PIT yes"), "{inspect}");
    let at_snapshot = {
        let v: Value =
            serde_json::from_str(&env.ok(&["image", "inspect", &img, "--json"])).expect("json");
        v["inventory"]["vm"]["report_device"]["counter"]
            .as_u64()
            .expect("the counter at the snapshot")
    };
    env.ok(&["vm", "stop", "q"]);
    env.ok(&["restore", &img, "--detach"]);
    let started = Instant::now();
    while counter_of(&env, "q") <= at_snapshot {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the restored guest never ran on from {at_snapshot}: {:?}",
            env.ps()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stop: Value = serde_json::from_str(&env.ok(&["vm", "stop", "q", "--json"])).expect("stop");
    assert_eq!(stop["errors"], 0, "{stop}");
    // Its irqchip came back: a second snapshot of the restored VM has one again.
    env.ok(&["restore", &img, "--detach"]);
    wait_running(&env, "q");
    let img2 = image(&env, "q2.img");
    env.ok(&["checkpoint", "q", "-o", &img2]);
    let inspect = env.ok(&["image", "inspect", &img2]);
    assert!(inspect.contains("irqchip yes, PIT yes"), "{inspect}");
}

#[test]
fn vm_leave_running_precopy_rounds_keep_memory_exact() {
    if !have_kvm("vm_leave_running_precopy_rounds_keep_memory_exact") {
        return;
    }
    let env = Env::new("vm-precopy");
    let steps = 40_000u64;
    run_demo(
        &env,
        "p",
        "32m",
        &[
            "--steps",
            &steps.to_string(),
            "--report-every",
            "1024",
            "--step-delay",
            "200000",
        ],
    );
    // Past one pass over its memory, so every page has been written once.
    let started = Instant::now();
    while counter_of(&env, "p") < 10_000 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            env.ps()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let img = image(&env, "p.img");
    let c = json_of(
        &env.run(&["checkpoint", "p", "-o", &img, "--leave-running", "--json"]),
        "checkpoint --leave-running",
    );
    eprintln!("checkpoint: {c}");
    assert!(c["precopy_rounds"].as_u64() >= Some(1), "{c}");
    assert!(c["pages_recopied"].as_u64() > Some(0), "{c}");
    let at = counter_of(&env, "p");
    assert!(
        at < steps,
        "the original finished before the snapshot: {at}"
    );
    env.ok(&["vm", "stop", "p"]);
    // The copy runs to its last step; the VMM then checks every work page against its model
    // of the guest, so a page the rounds missed shows up as an error.
    let r = json_of(
        &env.run(&["restore", &img, "--json"]),
        "restore (foreground)",
    );
    let rep = &r["report"];
    eprintln!("report: {rep}");
    assert_eq!(rep["state"], "shutdown", "{rep}");
    assert_eq!(rep["counter"].as_u64(), Some(steps), "{rep}");
    assert_eq!(rep["errors"], 0, "{rep}");
}

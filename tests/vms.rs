//! KVM VMs end to end: the built-in demo guest detached and in the foreground, its reports
//! checked by the VMM, the console, a clean stop, and `--kernel` refused on a host without
//! hardware virtualization.

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
    eprintln!("{test}: skipped: /dev/kvm does not exist on this host");
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
        eprintln!(
            "kernel_boot_without_hardware_virtualization_is_refused: skipped: this host has \
             VMX/SVM, so --kernel is not refused for lack of it"
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
    env.ok(&[
        "vm",
        "run",
        "--name",
        "s",
        "--memory",
        "16m",
        "--guest",
        "demo",
        "--detach",
        "--steps",
        &steps.to_string(),
    ]);
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
    std::thread::sleep(Duration::from_millis(300));
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
    let env = Env::new("vm-snap-live");
    env.ok(&[
        "vm", "run", "--name", "orig", "--memory", "16m", "--guest", "demo", "--detach",
    ]);
    wait_running(&env, "orig");
    let img = image(&env, "live.img");
    let c = json_of(
        &env.run(&[
            "checkpoint",
            "orig",
            "-o",
            &img,
            "--leave-running",
            "--json",
        ]),
        "checkpoint --leave-running",
    );
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
}

#[test]
fn vm_corrupt_image_and_other_memory_size_are_refused() {
    if !have_kvm("vm_corrupt_image_and_other_memory_size_are_refused") {
        return;
    }
    let env = Env::new("vm-snap-bad");
    env.ok(&[
        "vm", "run", "--name", "b", "--memory", "16m", "--guest", "demo", "--detach",
    ]);
    wait_running(&env, "b");
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

//! The first hour of a new user: the help says what exists and describes every option, the
//! README's container example works as written, a dead container's log is kept, numbers and
//! messages read as meant, options that do not apply are usage errors (2), a restored VM in
//! the foreground says it runs, VM logs are only the VM's, and a restore that waits for a
//! PID says why.

mod common;

use common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const USAGE: i32 = 2;

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The subcommands a help text lists (without "help").
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

/// The argument entries of a help text without a description.
fn undescribed(help: &str) -> Vec<String> {
    let lines: Vec<&str> = help.lines().collect();
    let mut out = Vec::new();
    let mut in_args = false;
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("Arguments:") || l.starts_with("Options:") {
            in_args = true;
            continue;
        }
        if !l.starts_with(' ') {
            in_args = false;
            continue;
        }
        let entry = l.trim_start();
        let indent = l.len() - entry.len();
        if !in_args || indent > 6 || !(entry.starts_with('-') || entry.starts_with('<')) {
            continue;
        }
        // "  -o, --output <OUTPUT>  Image file ..." or the description on the next lines.
        let same_line = entry.split("  ").filter(|p| !p.trim().is_empty()).count() > 1;
        let next_line = lines.get(i + 1).is_some_and(|n| {
            let t = n.trim_start();
            !t.is_empty() && n.len() - t.len() > indent + 2
        });
        if !same_line && !next_line {
            out.push(entry.to_string());
        }
    }
    out
}

#[test]
fn help_says_what_exists_and_describes_every_option() {
    let top = stasis_ok(&["--help"]);
    assert!(
        !top.contains("restore and live-migrate"),
        "live migration does not exist yet: {top}"
    );
    assert!(top.contains("not there yet"), "{top}");
    let restore = stasis_ok(&["restore", "--help"]);
    assert!(!restore.contains("Recreate a process"), "{restore}");
    assert!(
        restore.contains("container") && restore.contains("VM"),
        "{restore}"
    );
    let mut missing = Vec::new();
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = stasis_ok(&args);
        for entry in undescribed(&help) {
            if !entry.starts_with("-h, --help") && !entry.starts_with("-V, --version") {
                missing.push(format!("{}: {entry}", path.join(" ")));
            }
        }
        for sub in subcommands(&help) {
            let mut p = path.clone();
            p.push(sub);
            todo.push(p);
        }
    }
    assert!(
        missing.is_empty(),
        "options without a description: {missing:#?}"
    );
}

#[test]
fn state_dir_is_only_where_it_is_used() {
    let top = stasis_ok(&["--help"]);
    assert!(top.contains("--state-dir"), "{top}");
    let verify = stasis_ok(&["image", "verify", "--help"]);
    assert!(!verify.contains("--state-dir"), "{verify}");
    let out = run_stasis(&["image", "verify", "--state-dir", "/tmp", "x.img"]);
    assert_eq!(out.status.code(), Some(USAGE));
}

#[test]
fn vm_run_without_a_guest_names_both_choices() {
    let out = run_stasis(&["vm", "run", "--name", "x", "--memory", "64m"]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(USAGE), "{err}");
    assert!(err.contains("--guest") && err.contains("--kernel"), "{err}");
}

/// A process image (of wl-sleep) in `dir`.
fn process_image(dir: &Path) -> PathBuf {
    let img = dir.join("p.img");
    std::fs::write(&img, sleeper_image("fh-usage-img").1).expect("write the image");
    img
}

#[test]
fn options_that_do_not_fit_the_image_are_usage_errors() {
    let dir = ScratchDir::new("fh-usage");
    let img = process_image(&dir.0);
    let imgs = img.to_str().expect("utf8");
    for (flag, value) in [
        ("--name", Some("copy")),
        ("--memory", Some("64m")),
        ("--verify-first", None),
    ] {
        let mut args = vec!["restore", imgs, flag];
        args.extend(value);
        let out = run_stasis(&args);
        let (_, err) = text(&out);
        assert_eq!(out.status.code(), Some(USAGE), "{args:?}: {err}");
        assert!(err.contains(flag) && err.contains("process tree"), "{err}");
    }
    let out = run_stasis(&[
        "checkpoint",
        "1",
        "-o",
        "/dev/null",
        "--staging-limit",
        "1G",
    ]);
    assert_eq!(out.status.code(), Some(USAGE), "{}", text(&out).1);
}

#[test]
fn restore_says_why_it_waits_for_a_pid() {
    let dir = ScratchDir::new("fh-pidwait");
    let mut wl = start("wl-sleep", &[]);
    let pid = wl.pid;
    let img = dir.0.join("w.img");
    stasis_ok(&[
        "checkpoint",
        &pid.to_string(),
        "-o",
        img.to_str().expect("utf8"),
    ]);
    // The original stays an unreaped zombie for a while: restore must wait, and say so.
    let reaper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1200));
        wl.child.wait().expect("reap")
    });
    let out = Command::new(stasis())
        .args(["restore", "--detach", img.to_str().expect("utf8")])
        .stdin(Stdio::null())
        .output()
        .expect("run stasis restore");
    reaper.join().expect("reaper");
    let (stdout, err) = text(&out);
    // The restored workload (ours) is ended when the test ends, pass or fail.
    let _restored = out.status.success().then(|| KillOnDrop(pid));
    assert!(out.status.success(), "{err}");
    assert_eq!(stdout.lines().next(), Some(pid.to_string().as_str()));
    let needle = format!("waiting for PID {pid} to be released by its parent");
    assert_eq!(err.matches(&needle).count(), 1, "said once: {err}");
}

// ---- containers ----

/// The busybox root filesystem from scripts/mkrootfs, as the README makes it (no extra
/// files), in `dir` (removed with it); None (skipped) when it cannot be built here.
fn rootfs(dir: &Path) -> Option<PathBuf> {
    let root = dir.join("rootfs");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mkrootfs");
    let out = Command::new("bash").arg(&script).arg(&root).output().ok()?;
    if !out.status.success() {
        skip(
            "containers of the first hour",
            &format!(
                "scripts/mkrootfs failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        );
        return None;
    }
    Some(root)
}

/// A state directory and the containers started in it, removed at the end (also on failure).
struct Containers {
    state: PathBuf,
    names: Vec<String>,
}

impl Containers {
    fn new(test: &str) -> Containers {
        init();
        Containers {
            state: scratch(test),
            names: Vec::new(),
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(stasis())
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running stasis")
    }

    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        let t = text(&out);
        assert!(out.status.success(), "stasis {args:?}: {}", t.1);
        t
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = self.run(&["rm", "--force", n]);
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

fn http_get(addr: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

#[test]
fn the_readme_container_example_works_as_written() {
    let mut c = Containers::new("fh-readme");
    let Some(root) = rootfs(&c.state) else { return };
    let name = format!("web{}", std::process::id() % 100000);
    c.names.push(name.clone());
    let rootfs = root.to_str().expect("utf8");
    // As in the README (with a name of its own).
    let (out, _) = c.ok(&[
        "run", "--name", &name, "--rootfs", rootfs, "--net", "bridge", "--memory", "64m", "--cpus",
        "0.5", "--pids", "100", "-d", "--", "httpd", "-f", "-p", "8080", "-h", "/www",
    ]);
    assert_eq!(out.trim(), name);
    let ps: Value = serde_json::from_str(&c.ok(&["ps", "--json"]).0).expect("ps json");
    let row = ps
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == name.as_str()))
        .unwrap_or_else(|| panic!("{name} is not running (httpd exited?): {ps}"))
        .clone();
    let ip = row["ip"]
        .as_str()
        .expect("ip")
        .split('/')
        .next()
        .expect("addr");
    let addr = format!("{ip}:8080");
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        if let Some(p) = http_get(&addr).filter(|p| p.contains("200")) {
            break p;
        }
        assert!(Instant::now() < deadline, "no page from {addr}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(page.contains("Hello from a stasis container"), "{page}");

    // stats: "no limit" is "max" (null in JSON), never 2^64-1.
    let (stats, _) = c.ok(&["stats", &name]);
    assert!(!stats.contains("18446744073709551615"), "{stats}");
    let (json, _) = c.ok(&["stats", &name, "--json"]);
    assert!(!json.contains("18446744073709551615"), "{json}");
    serde_json::from_str::<Value>(&json).expect("stats json");

    // set: text without --json, the record with it.
    let (set, _) = c.ok(&["set", &name, "--memory", "128m", "--cpus", "1"]);
    assert!(!set.contains('{'), "{set}");
    assert!(
        set.contains("memory 128.0 MiB") && set.contains("cpus 1"),
        "{set}"
    );
    let (set, _) = c.ok(&["set", &name, "--pids", "200", "--json"]);
    serde_json::from_str::<Value>(&set).expect("set --json");

    // checkpoint names the container, not a PID.
    let img = c.state.join("web.img");
    let (ck, _) = c.ok(&["checkpoint", &name, "-o", img.to_str().expect("utf8")]);
    assert!(
        ck.contains(&format!("container {name}")) && !ck.contains("PID"),
        "{ck}"
    );
    let (r, _) = c.ok(&["restore", img.to_str().expect("utf8"), "--detach"]);
    assert_eq!(r.trim(), name);
    c.ok(&["stop", &name, "--timeout", "2"]);
}

#[test]
fn a_dead_containers_log_is_kept_and_ps_says_where() {
    let mut c = Containers::new("fh-deadlog");
    let Some(root) = rootfs(&c.state) else { return };
    let name = format!("dies{}", std::process::id() % 100000);
    c.names.push(name.clone());
    let rootfs = root.to_str().expect("utf8");
    c.ok(&[
        "run",
        "--name",
        &name,
        "--rootfs",
        rootfs,
        "-d",
        "--",
        "sh",
        "-c",
        "echo the reason it ended; exit 3",
    ]);
    let log = c.state.join(format!("containers/{name}.log"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        let (_, err) = c.ok(&["ps"]);
        if err.contains(&name) {
            break err;
        }
        assert!(Instant::now() < deadline, "{name} did not end");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        err.contains(log.to_str().expect("utf8")),
        "ps must say where: {err}"
    );
    let kept = std::fs::read_to_string(&log).expect("the log is kept");
    assert!(kept.contains("the reason it ended"), "{kept}");
    assert!(!c.state.join(format!("containers/{name}.json")).exists());
}

// ---- VMs ----

fn have_kvm(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    skip(test, "/dev/kvm does not exist on this host");
    false
}

/// A VM state directory; every VMM its records name is killed at the end.
struct Vms(PathBuf);

impl Vms {
    fn cmd(&self) -> Command {
        let mut c = Command::new(stasis());
        c.arg("--state-dir").arg(&self.0).stdin(Stdio::null());
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd().args(args).output().expect("stasis");
        let (o, e) = text(&out);
        assert!(out.status.success(), "stasis {args:?}: {e}");
        o
    }

    /// Starts the demo VM `name` detached and waits until it has counted.
    fn demo(&self, name: &str) {
        self.ok(&[
            "vm", "run", "--name", name, "--memory", "64m", "--guest", "demo", "-d",
        ]);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ps: Value = serde_json::from_str(&self.ok(&["vm", "ps", "--json"])).expect("json");
            let counted = ps.as_array().is_some_and(|r| {
                r.iter()
                    .any(|r| r["name"] == name && r["counter"].as_u64() > Some(0))
            });
            if counted {
                return;
            }
            assert!(Instant::now() < deadline, "VM {name} does not count: {ps}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vms {
    fn drop(&mut self) {
        kill_vmms(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_refused_duplicate_vm_run_leaves_the_running_vms_log_alone() {
    if !have_kvm("a_refused_duplicate_vm_run_leaves_the_running_vms_log_alone") {
        return;
    }
    let vms = Vms(scratch("fh-vmdup"));
    vms.demo("dup");
    let log = vms.0.join("vms/dup.log");
    let before = std::fs::read_to_string(&log).expect("the VM's log");
    for detach in [true, false] {
        let mut args = vec![
            "vm", "run", "--name", "dup", "--memory", "64m", "--guest", "demo",
        ];
        if detach {
            args.push("-d");
        }
        let out = vms.cmd().args(&args).output().expect("stasis");
        assert_eq!(out.status.code(), Some(4), "{}", text(&out).1);
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = std::fs::read_to_string(&log).expect("the VM's log");
    assert!(
        !after.contains("stasis:"),
        "the refusal went into the VM's log: {after}"
    );
    assert!(after.starts_with(&before));
    vms.ok(&["vm", "stop", "dup"]);
}

#[test]
fn a_restored_vm_in_the_foreground_says_it_runs_and_a_failed_one_leaves_no_log() {
    if !have_kvm("a_restored_vm_in_the_foreground_says_it_runs_and_a_failed_one_leaves_no_log") {
        return;
    }
    let vms = Vms(scratch("fh-vmfg"));
    vms.demo("fg");
    let img = vms.0.join("fg.img");
    let imgs = img.to_str().expect("utf8");
    vms.ok(&["checkpoint", "fg", "-o", imgs]);

    // A corrupt page: the guest starts beside the check, fails it, and is removed with
    // everything it had, its log too.
    let rep: Value =
        serde_json::from_str(&vms.ok(&["image", "inspect", "--json", imgs])).expect("json");
    let chunk = rep["chunks"]
        .as_array()
        .and_then(|c| c.iter().rev().find(|c| c["stored_len"].as_u64() > Some(0)))
        .expect("a chunk with data")
        .clone();
    let mut bytes = std::fs::read(&img).expect("read");
    bytes[chunk["data_offset"].as_u64().expect("offset") as usize + 100] ^= 0x40;
    let bad = vms.0.join("bad.img");
    std::fs::write(&bad, &bytes).expect("write");
    let out = vms
        .cmd()
        .args(["restore", bad.to_str().expect("utf8"), "--detach"])
        .output()
        .expect("stasis");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out).1);
    assert!(
        !vms.0.join("vms/fg.log").exists(),
        "a failed restore left its log"
    );

    // The good image in the foreground: it says so while the VM runs.
    let mut child = vms
        .cmd()
        .args(["restore", imgs])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stasis restore");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // The first line that says it (a warning may come before it).
    let deadline = Instant::now() + Duration::from_secs(20);
    let said = std::iter::from_fn(|| {
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    })
    .find(|l| l.contains("restored VM"));
    let running = vms
        .cmd()
        .args(["vm", "ps", "--json"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("\"fg\""))
        .unwrap_or(false);
    let _ = vms.cmd().args(["vm", "stop", "fg"]).output();
    let _ = child.wait();
    let said = said.expect("no word that the restored VM runs while it runs");
    assert!(said.contains("restored VM fg"), "{said}");
    assert!(running, "the VM should run when that is said");
}

//! `stasis migrate` to `stasis receive` between two simulated hosts (two network namespaces
//! joined by a veth pair, each with its own state directory): a process tree that is a whole
//! pid namespace (wl-pidns, self-checking) moves and passes its checks on the destination;
//! every failure before the commit leaves it running on the source and nothing on the
//! destination; a commit that is never confirmed leaves the source stopped, never running
//! beside the destination's copy.

mod common;

use common::hosts::{Host, TwoHosts};
use common::{NsTree, Pipes};
use std::io::BufReader;
use std::path::PathBuf;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

fn start_tree(tag: &str) -> NsTree {
    common::start_in_ns("wl-pidns", &[], &format!("mig{tag}"))
}

/// `verify` must pass (wl-pidns prints an INFO line first).
fn verify(pipes: &mut Pipes, what: &str) {
    pipes.send("verify");
    let info = pipes.expect_line(&["INFO ", "PASS ", "FAIL "]);
    let answer = pipes.expect_line(&["PASS ", "FAIL "]);
    assert!(answer.starts_with("PASS "), "{what}: {answer} ({info})");
}

/// Whether `pid` exists and is not a zombie; its state letter if so.
fn state_of(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(") ")?.1.chars().next()?;
    (state != 'Z').then_some(state)
}

fn alive(pid: i32) -> bool {
    state_of(pid).is_some()
}

/// `stasis receive` on host `host`, its standard input and output pipes of the test (the
/// trees it restores inherit them), its log in a file.
struct Receiver {
    child: Child,
    pipes: Pipes,
    url: String,
    log: PathBuf,
    incoming: PathBuf,
}

impl Receiver {
    fn start(host: &Host, failpoints: Option<&str>) -> Receiver {
        Self::start_with(host, failpoints, &["--insecure".into()])
    }

    /// With `security`: --insecure, or the --tls-* options.
    fn start_with(host: &Host, failpoints: Option<&str>, security: &[String]) -> Receiver {
        let port = 40000 + std::process::id() % 20000;
        let listen = format!("{}:{port}", host.ip);
        std::fs::create_dir_all(&host.state).expect("state dir");
        let log = host.state.join("receive.log");
        let mut args = vec!["receive", "--listen", &listen, "--inherit-stdio"];
        args.extend(["--timeout", "20"]);
        args.extend(security.iter().map(String::as_str));
        let mut cmd = host.stasis(&args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if let Some(f) = failpoints {
            cmd.env("FAILPOINTS", f);
        }
        let mut child = cmd.spawn().expect("stasis receive");
        let pipes = Pipes {
            stdin: child.stdin.take().expect("stdin"),
            stdout: BufReader::new(child.stdout.take().expect("stdout")),
        };
        let rx = Receiver {
            child,
            pipes,
            url: format!("tcp://{listen}"),
            log,
            incoming: host.state.join("incoming"),
        };
        rx.wait_log("listening on");
        rx
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until its log says `what`.
    fn wait_log(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains(what) {
            assert!(
                Instant::now() < deadline,
                "the receiver never said {what:?}: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Images left under its state directory.
    fn images_left(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.incoming)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // SIGTERM: it stops accepting and finishes what is under way.
        // SAFETY: kill takes no pointers; the pid is the receiver this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `stasis migrate ROOT --to URL --insecure --json` on host `host`.
fn migrate(host: &Host, root: i32, url: &str, failpoints: Option<&str>) -> Output {
    migrate_with(host, root, url, failpoints, &["--insecure".into()])
}

/// Like [`migrate`] with `security` instead of --insecure.
fn migrate_with(
    host: &Host,
    root: i32,
    url: &str,
    failpoints: Option<&str>,
    security: &[String],
) -> Output {
    let mut args = vec!["--json", "--timeout", "20"];
    args.extend(security.iter().map(String::as_str));
    run_migrate(host, &root.to_string(), url, &args, failpoints)
}

/// `stasis migrate TARGET --to URL ARGS...` on `host`, with FAILPOINTS if given.
fn run_migrate(
    host: &Host,
    target: &str,
    url: &str,
    args: &[&str],
    failpoints: Option<&str>,
) -> Output {
    let mut all = vec!["migrate", target, "--to", url];
    all.extend_from_slice(args);
    let mut cmd = host.stasis(&all);
    if let Some(f) = failpoints {
        cmd.env("FAILPOINTS", f);
    }
    cmd.output().expect("stasis migrate")
}

/// Copies of `tree` that are not `tree` (what a destination left behind): processes with
/// its command line (which carries its test's own tag, so the trees that other tests move
/// meanwhile do not count) outside it.
fn other_wl_pidns(tree: &NsTree) -> Vec<i32> {
    let ours: Vec<i32> = common::descendants(tree.unshare.id() as i32);
    let cmdline = |p: i32| std::fs::read(format!("/proc/{p}/cmdline")).ok();
    let Some(its) = cmdline(tree.root).filter(|c| !c.is_empty()) else {
        panic!("the tree's root {} has no command line", tree.root)
    };
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| cmdline(p).as_ref() == Some(&its))
        .filter(|p| alive(*p) && !ours.contains(p))
        .collect()
}

/// Waits (bounded) until the destination holds nothing: no process, no image.
fn wait_destination_empty(rx: &Receiver, tree: &NsTree) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (procs, images) = (other_wl_pidns(tree), rx.images_left());
        if procs.is_empty() && images.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the destination kept processes {procs:?} and images {images:?}: {}",
            rx.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_pid_namespace_tree_moves_to_the_other_host_and_passes_its_checks() {
    let hosts = TwoHosts::new("migrate-moves");
    let mut rx = Receiver::start(&hosts.b, None);
    let mut tree = start_tree("moves");
    verify(&mut tree.pipes, "before the migration");
    let out = migrate(&hosts.a, tree.root, &rx.url, None);
    assert!(out.status.success(), "migrate: {}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("migrate --json");
    eprintln!("migrate: {r}");
    let dest = r["destination_pid"].as_i64().expect("destination_pid") as i32;
    assert!(r["downtime_us"].as_u64() > Some(0), "{r}");
    assert_eq!(r["checkpoint"]["process"], "killed", "{r}");
    // The source's copy is gone (its unshare ends with it), the destination's runs.
    let _ = tree.unshare.wait();
    assert!(!alive(tree.root), "the source's copy runs on");
    rx.wait_log("migration received");
    verify(&mut rx.pipes, "on the destination");
    verify(&mut rx.pipes, "on the destination, again");
    assert!(rx.images_left().is_empty(), "{:?}", rx.images_left());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&rx.incoming).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode.ok(), Some(0o700), "where received images are kept");
    common::kill(dest);
    common::reap(dest);
}

#[test]
fn with_no_receiver_nothing_is_frozen() {
    let hosts = TwoHosts::new("migrate-noreceiver");
    let mut tree = start_tree("norx");
    let url = format!("tcp://{}:9", hosts.b.ip);
    let out = migrate(&hosts.a, tree.root, &url, None);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("no receiver"), "{}", stderr(&out));
    assert!(common::running_untraced(tree.root));
    verify(&mut tree.pipes, "after a migration with no receiver");
}

#[test]
fn a_receiver_killed_while_holding_it_leaves_the_source_running_and_nothing_behind() {
    const TEST: &str =
        "a_receiver_killed_while_holding_it_leaves_the_source_running_and_nothing_behind";
    if !common::failpoints_built(TEST) {
        return;
    }
    let hosts = TwoHosts::new("migrate-rxdies");
    let rx = Receiver::start(&hosts.b, Some("receive-held=return"));
    let mut tree = start_tree("rxdies");
    let out = migrate(&hosts.a, tree.root, &rx.url, None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("waiting for the destination to hold it"),
        "{}",
        stderr(&out)
    );
    assert!(
        common::running_untraced(tree.root),
        "the source was not resumed"
    );
    assert_untracked(tree.root);
    verify(&mut tree.pipes, "after the receiver died");
    wait_destination_empty(&rx, &tree);
}

/// No mapping of `pid` is registered for write-protect tracking any more (VmFlags `uw`): a
/// migration that gave up removed its dirty tracking.
fn assert_untracked(pid: i32) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let tracked: Vec<&str> = smaps
        .lines()
        .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw"))
        .collect();
    assert!(tracked.is_empty(), "still tracked: {tracked:?}");
}

/// A destination that stalls (it holds the tree but says nothing for longer than the
/// source waits): the source gives up at its --timeout and runs on; the destination,
/// finding the source gone once it wakes, discards its copy.
#[test]
fn a_stalled_destination_is_given_up_on_and_the_source_runs_on() {
    const TEST: &str = "a_stalled_destination_is_given_up_on_and_the_source_runs_on";
    if !common::failpoints_built(TEST) {
        return;
    }
    let hosts = TwoHosts::new("migrate-stall");
    let rx = Receiver::start(&hosts.b, Some("receive-held=sleep(4000)"));
    let mut tree = start_tree("stall");
    let started = Instant::now();
    let root = tree.root.to_string();
    let out = run_migrate(
        &hosts.a,
        &root,
        &rx.url,
        &["--insecure", "--timeout", "1"],
        None,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("waiting for the destination to hold it"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the source waited {:?} for a stalled destination",
        started.elapsed()
    );
    assert!(
        common::running_untraced(tree.root),
        "the source was not resumed"
    );
    verify(&mut tree.pipes, "after the destination stalled");
    rx.wait_log("discarded before it ran");
    wait_destination_empty(&rx, &tree);
}

#[test]
fn a_source_killed_before_the_commit_runs_on_and_the_destination_discards_its_copy() {
    const TEST: &str =
        "a_source_killed_before_the_commit_runs_on_and_the_destination_discards_its_copy";
    if !common::failpoints_built(TEST) {
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    let hosts = TwoHosts::new("migrate-srcdies");
    let rx = Receiver::start(&hosts.b, None);
    let mut tree = start_tree("srcdies");
    let out = migrate(
        &hosts.a,
        tree.root,
        &rx.url,
        Some("migrate-before-commit=return"),
    );
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{}", stderr(&out));
    verify(&mut tree.pipes, "after its migrator died");
    assert!(common::running_untraced(tree.root));
    rx.wait_log("discarded before it ran");
    wait_destination_empty(&rx, &tree);
}

#[test]
fn a_commit_never_confirmed_leaves_the_source_stopped_not_running_beside_the_copy() {
    const TEST: &str =
        "a_commit_never_confirmed_leaves_the_source_stopped_not_running_beside_the_copy";
    if !common::failpoints_built(TEST) {
        return;
    }
    let hosts = TwoHosts::new("migrate-unsettled");
    let mut rx = Receiver::start(&hosts.b, Some("receive-resumed=return"));
    let tree = start_tree("unsettled");
    let out = migrate(&hosts.a, tree.root, &rx.url, None);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    let root = tree.root.to_string();
    assert!(
        err.contains(&format!("kill -KILL {root}")) && err.contains(&format!("kill -CONT {root}")),
        "{err}"
    );
    // Stopped, not running, and nobody's tracee.
    let deadline = Instant::now() + Duration::from_secs(5);
    while state_of(tree.root) != Some('T') {
        assert!(
            Instant::now() < deadline,
            "source state {:?}",
            state_of(tree.root)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The destination's copy runs (it was resumed before its worker died).
    verify(&mut rx.pipes, "the destination's copy");
    let dest = other_wl_pidns(&tree)
        .into_iter()
        .find(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| {
                s.lines()
                    .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1"))
            })
        })
        .expect("the destination's root");
    // Settled as the message says: the destination runs it, so the source's copy ends.
    common::kill(tree.root);
    drop(tree);
    common::kill(dest);
    common::reap(dest);
}

/// The --tls-* options for a certificate of `pki` and the CA the peer must chain to.
fn tls_args(issued: &common::pki::Issued, ca: &std::path::Path) -> Vec<String> {
    let s = |p: &std::path::Path| p.display().to_string();
    vec![
        "--tls-cert".into(),
        s(&issued.cert),
        "--tls-key".into(),
        s(&issued.key),
        "--tls-ca".into(),
        s(ca),
    ]
}

#[test]
fn with_mutual_tls_only_a_peer_with_a_valid_certificate_gets_through() {
    let hosts = TwoHosts::new("migrate-tls");
    let pki = common::pki::Pki::new(&hosts.a.state.join(".."), "ca");
    let rogue = common::pki::Pki::new(&hosts.a.state.join(".."), "rogue-ca");
    let server = pki.issue("receiver", &format!("IP:{}", hosts.b.ip));
    let client = pki.issue("source", "DNS:source");
    let intruder = rogue.issue("intruder", "DNS:source");
    let mut rx = Receiver::start_with(&hosts.b, None, &tls_args(&server, &pki.ca));
    let mut tree = start_tree("tls");

    // A certificate from another CA, and no certificate at all: dropped before anything
    // was frozen (exit 4), the tree runs on, nothing is left on the destination.
    let refused = [
        (
            "a certificate from another CA",
            tls_args(&intruder, &pki.ca),
        ),
        ("plain TCP", vec!["--insecure".to_string()]),
    ];
    for (what, security) in refused {
        let out = migrate_with(&hosts.a, tree.root, &rx.url, None, &security);
        assert_eq!(out.status.code(), Some(4), "{what}: {}", stderr(&out));
        assert!(
            common::running_untraced(tree.root),
            "{what}: the tree was touched"
        );
        verify(&mut tree.pipes, what);
        wait_destination_empty(&rx, &tree);
    }
    rx.wait_log("TLS handshake");
    eprintln!("receiver: {}", rx.log());

    let out = migrate_with(
        &hosts.a,
        tree.root,
        &rx.url,
        None,
        &tls_args(&client, &pki.ca),
    );
    assert!(
        out.status.success(),
        "migrate over mutual TLS: {}",
        stderr(&out)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("migrate --json");
    let dest = r["destination_pid"].as_i64().expect("destination_pid") as i32;
    let _ = tree.unshare.wait();
    rx.wait_log("migration received");
    verify(&mut rx.pipes, "on the destination, over mutual TLS");
    common::kill(dest);
    common::reap(dest);
}

/// Whether KVM is usable here; says why not when it is not.
fn have_kvm(test: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    common::skip(test, "/dev/kvm does not exist on this host");
    false
}

/// `stasis ARGS... --json` on `host`, which must succeed; its JSON.
fn json_on(host: &Host, args: &[&str]) -> serde_json::Value {
    let out = host.stasis(args).arg("--json").output().expect("stasis");
    assert!(out.status.success(), "stasis {args:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// The row of VM `name` in `vm ps` on `host`.
fn vm_row(host: &Host, name: &str) -> Option<serde_json::Value> {
    json_on(host, &["vm", "ps"])
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)
        .cloned()
}

/// Waits (bounded) until VM `name` on `host` reports a counter above `from`; returns it.
fn vm_progress(host: &Host, name: &str, from: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = vm_row(host, name);
        let c = row
            .as_ref()
            .and_then(|r| r["counter"].as_u64())
            .unwrap_or(0);
        if c > from {
            assert_eq!(
                row.map(|r| r["errors"].clone()),
                Some(0.into()),
                "VM {name}"
            );
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "VM {name} makes no progress: {row:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the VMMs a test started on either host (also when it fails).
struct Vmms<'a>(&'a TwoHosts);

impl Drop for Vmms<'_> {
    fn drop(&mut self) {
        common::kill_vmms(&self.0.a.state);
        common::kill_vmms(&self.0.b.state);
    }
}

fn start_vm(host: &Host, name: &str) {
    start_vm_with(host, name, &["--memory", "16m"]);
}

/// Starts the demo VM `name` on `host` with `args` (its memory, its vCPUs).
fn start_vm_with(host: &Host, name: &str, args: &[&str]) {
    let mut run = vec!["vm", "run", "--name", name, "--guest", "demo", "--detach"];
    run.extend_from_slice(args);
    let out = host.stasis(&run).output().expect("stasis vm run");
    assert!(out.status.success(), "vm run: {}", stderr(&out));
    vm_progress(host, name, 0);
}

/// A VM with 4 vCPUs writing all the time moves over in pre-copy rounds (its memory sent
/// while it runs, the last round while paused, its state without memory) and runs on its
/// received memory; its model checks every page. It then moves back in one stop-and-copy
/// round with its memory compressed in the image.
#[test]
fn a_vm_moves_to_the_other_host_and_its_guest_carries_on_without_an_error() {
    const TEST: &str = "a_vm_moves_to_the_other_host_and_its_guest_carries_on_without_an_error";
    if !have_kvm(TEST) {
        return;
    }
    let hosts = TwoHosts::new("migrate-vm");
    let _vmms = Vmms(&hosts);
    let rx = Receiver::start(&hosts.b, None);
    start_vm_with(&hosts.a, "mig", &["--memory", "64m", "--vcpus", "4"]);
    let out = run_migrate(&hosts.a, "mig", &rx.url, &["--insecure", "--json"], None);
    assert!(out.status.success(), "migrate: {}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("migrate --json");
    eprintln!("migrate: {r}");
    assert_eq!(r["precopy"], "kvm-dirty-log", "{r}");
    let rounds = r["rounds"].as_array().cloned().unwrap_or_default();
    assert!(rounds.len() >= 2, "pre-copy and a last round: {r}");
    let frozen: Vec<bool> = rounds.iter().map(|x| x["frozen"] == true).collect();
    assert_eq!(frozen.iter().filter(|f| **f).count(), 1, "{r}");
    assert_eq!(
        frozen.last(),
        Some(&true),
        "the last round is the frozen one: {r}"
    );
    assert!(rounds[0]["bytes"].as_u64() > Some(1 << 20), "{r}");
    // Its memory went in rounds: the state is small, and nothing was copied twice for it.
    assert!(r["image_bytes"].as_u64() < Some(256 << 10), "{r}");
    assert_eq!(r["checkpoint"]["pages_data"], 0, "{r}");
    assert_eq!(r["checkpoint"]["vm"], "stopped", "{r}");
    assert!(
        vm_row(&hosts.a, "mig").is_none(),
        "the source's VM is still there"
    );
    let c = vm_progress(&hosts.b, "mig", 0);
    vm_progress(&hosts.b, "mig", c);
    wait_images_gone(&rx);

    // And back, frozen at once, its memory in the image, compressed as asked.
    let back = Receiver::start(&hosts.a, None);
    let args = [
        "--insecure",
        "--json",
        "--max-rounds",
        "0",
        "--compress",
        "zstd",
    ];
    let out = run_migrate(&hosts.b, "mig", &back.url, &args, None);
    assert!(out.status.success(), "migrate back: {}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("migrate --json");
    eprintln!("migrate back: {r}");
    assert_eq!(r["precopy"], "none: --max-rounds 0", "{r}");
    assert_eq!(r["page_bytes"], 0, "{r}");
    let compression = r["checkpoint"]["compression"].as_str().unwrap_or_default();
    assert!(compression.starts_with("zstd"), "{r}");
    assert!(r["checkpoint"]["pages_data"].as_u64() > Some(0), "{r}");
    let c = vm_progress(&hosts.a, "mig", 0);
    vm_progress(&hosts.a, "mig", c);
    let rep = json_on(&hosts.a, &["vm", "stop", "mig"]);
    assert_eq!(rep["errors"], 0, "{rep}");
    wait_images_gone(&back);
}

/// A guest that writes slowly leaves most of the memory it received untouched, so its VMM
/// has not mapped those pages (until its next report reads them all): moved on again at
/// once, every page must still go (the pages are found in its memory file, not in what the
/// VMM has mapped), and its model checks every page.
#[test]
fn a_vm_moved_twice_keeps_the_memory_it_never_touched_in_between() {
    const TEST: &str = "a_vm_moved_twice_keeps_the_memory_it_never_touched_in_between";
    if !have_kvm(TEST) {
        return;
    }
    let hosts = TwoHosts::new("migrate-vm-twice");
    let _vmms = Vmms(&hosts);
    let rx = Receiver::start(&hosts.b, None);
    let back = Receiver::start(&hosts.a, None);
    start_vm_with(
        &hosts.a,
        "slow",
        &["--memory", "16m", "--step-delay", "200000"],
    );
    // Filled once (15 MiB of work pages), then written a page at a time.
    let filled = (15 << 20) / 4096;
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm_progress(&hosts.a, "slow", 0) < filled {
        assert!(
            Instant::now() < deadline,
            "the guest did not fill its memory"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // On again at once: no report in between (the VMM reads every page for one).
    for (from, rx) in [(&hosts.a, &rx), (&hosts.b, &back)] {
        let out = run_migrate(from, "slow", &rx.url, &["--insecure", "--json"], None);
        assert!(out.status.success(), "migrate: {}", stderr(&out));
    }
    let c = vm_progress(&hosts.a, "slow", 0);
    vm_progress(&hosts.a, "slow", c);
    let rep = json_on(&hosts.a, &["vm", "stop", "slow"]);
    assert_eq!(rep["errors"], 0, "{rep}");
}

/// --bandwidth holds the rounds that run beside the workload down to its rate, and
/// --max-rounds ends them even when the expected downtime (--max-downtime 0) is never met.
#[test]
fn pre_copy_rounds_keep_to_the_bandwidth_and_round_limits() {
    const TEST: &str = "pre_copy_rounds_keep_to_the_bandwidth_and_round_limits";
    if !have_kvm(TEST) {
        return;
    }
    let hosts = TwoHosts::new("migrate-vm-limits");
    let _vmms = Vmms(&hosts);
    let rx = Receiver::start(&hosts.b, None);
    start_vm(&hosts.a, "lim");
    let args = [
        "--insecure",
        "--json",
        "--bandwidth",
        "32M",
        "--max-rounds",
        "2",
        "--max-downtime",
        "0",
    ];
    let out = run_migrate(&hosts.a, "lim", &rx.url, &args, None);
    assert!(out.status.success(), "migrate: {}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("migrate --json");
    eprintln!("migrate: {r}");
    let rounds = r["rounds"].as_array().cloned().unwrap_or_default();
    assert_eq!(rounds.len(), 3, "two rounds and the frozen one: {r}");
    assert!(
        r["switchover"]
            .as_str()
            .unwrap_or_default()
            .contains("--max-rounds"),
        "{r}"
    );
    let first = rounds[0]["rate"].as_u64().unwrap_or(u64::MAX);
    assert!(
        first <= (32 << 20) * 11 / 10,
        "the first round went at {first} bytes/s"
    );
    let c = vm_progress(&hosts.b, "lim", 0);
    vm_progress(&hosts.b, "lim", c);
    let rep = json_on(&hosts.b, &["vm", "stop", "lim"]);
    assert_eq!(rep["errors"], 0, "{rep}");
    wait_images_gone(&rx);
}

/// Ctrl-C on the source during the pre-copy rounds: the migration is abandoned, naming the
/// signal; the VM runs on here with its dirty tracking off, and the destination keeps
/// nothing.
#[test]
fn ctrl_c_on_the_source_during_pre_copy_leaves_the_vm_running_and_nothing_there() {
    const TEST: &str =
        "ctrl_c_on_the_source_during_pre_copy_leaves_the_vm_running_and_nothing_there";
    if !have_kvm(TEST) {
        return;
    }
    let hosts = TwoHosts::new("migrate-vm-sigint");
    let _vmms = Vmms(&hosts);
    let rx = Receiver::start(&hosts.b, None);
    start_vm_with(&hosts.a, "int", &["--memory", "64m"]);
    // Once the guest has written 8 MiB, a first round held down to 4 MiB/s takes at least
    // 2 s: the signal below always comes before the freeze.
    let deadline = Instant::now() + Duration::from_secs(20);
    while vm_progress(&hosts.a, "int", 0) < 2048 {
        assert!(Instant::now() < deadline, "the guest does not write");
        std::thread::sleep(Duration::from_millis(20));
    }
    let args = [
        "migrate",
        "int",
        "--to",
        &rx.url,
        "--insecure",
        "--bandwidth",
        "4M",
    ];
    let child = hosts
        .a
        .stasis(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stasis migrate");
    std::thread::sleep(Duration::from_millis(800));
    // SAFETY: kill(2) on the child this test spawned (nsenter exec'd stasis in place).
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = Instant::now();
    let out = child.wait_with_output().expect("wait for stasis migrate");
    let err = stderr(&out);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the interrupted migration took {:?} to end",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(128 + libc::SIGINT), "{err}");
    assert!(err.contains("interrupted by signal 2"), "{err}");
    let row = vm_row(&hosts.a, "int").expect("the source's VM");
    assert_eq!(row["state"], "running", "{row}");
    let c = vm_progress(&hosts.a, "int", 0);
    vm_progress(&hosts.a, "int", c);
    assert!(vm_row(&hosts.b, "int").is_none(), "the destination kept it");
    wait_images_gone(&rx);
    // Its dirty log is off again: a checkpoint that tracks it can start.
    let img = hosts.a.state.join("int.img");
    let img = img.to_str().expect("utf8");
    json_on(
        &hosts.a,
        &["checkpoint", "int", "-o", img, "--leave-running"],
    );
    let rep = json_on(&hosts.a, &["vm", "stop", "int"]);
    assert_eq!(rep["errors"], 0, "{rep}");
}

/// Waits (bounded) until the receiver's incoming directory is empty.
fn wait_images_gone(rx: &Receiver) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !rx.images_left().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", rx.images_left());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_vm_whose_commit_is_never_confirmed_stays_paused_until_settled() {
    const TEST: &str = "a_vm_whose_commit_is_never_confirmed_stays_paused_until_settled";
    if !have_kvm(TEST) || !common::failpoints_built(TEST) {
        return;
    }
    let hosts = TwoHosts::new("migrate-vm-unsettled");
    let _vmms = Vmms(&hosts);
    let rx = Receiver::start(&hosts.b, Some("receive-resumed=return"));
    start_vm(&hosts.a, "mig");
    let started = Instant::now();
    let out = run_migrate(
        &hosts.a,
        "mig",
        &rx.url,
        &["--insecure", "--timeout", "60"],
        None,
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    // The lost acknowledgement is noticed when the worker's connection closes, not after a
    // timeout (the VMM it started must not hold that connection open).
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the source waited {:?}",
        started.elapsed()
    );
    assert!(
        err.contains("stasis vm stop mig") && err.contains("stasis vm resume mig"),
        "{err}"
    );
    // Paused on the source, and it stays so: no progress while the destination's runs.
    let row = vm_row(&hosts.a, "mig").expect("the source's VM");
    assert_eq!(row["state"], "paused", "{row}");
    let c = vm_progress(&hosts.b, "mig", 0);
    vm_progress(&hosts.b, "mig", c);
    let still = vm_row(&hosts.a, "mig").expect("the source's VM");
    assert_eq!(still["counter"], row["counter"], "a paused VM ran: {still}");
    // Settled as the message says: the destination runs it.
    let rep = json_on(&hosts.a, &["vm", "stop", "mig"]);
    assert_eq!(rep["errors"], 0, "{rep}");
    assert!(vm_row(&hosts.a, "mig").is_none());
    json_on(&hosts.b, &["vm", "stop", "mig"]);
}

#[test]
fn a_destination_whose_cpu_lacks_a_feature_is_refused_before_anything_is_frozen() {
    let hosts = TwoHosts::new("migrate-cpu");
    // The destination's CPU as one without a feature this one has.
    let ours = stasis_runtime::procfs::cpu_flags("/proc/cpuinfo").expect("cpu flags");
    let gone = ours.last().cloned().expect("a flag");
    let theirs: Vec<&str> = ours
        .iter()
        .map(String::as_str)
        .filter(|f| *f != gone)
        .collect();
    std::fs::create_dir_all(&hosts.b.state).expect("state dir");
    let cpuinfo = hosts.b.state.join("cpuinfo");
    std::fs::write(
        &cpuinfo,
        format!("processor\t: 0\nflags\t\t: {}\n", theirs.join(" ")),
    )
    .expect("cpuinfo");
    let extra = [
        "--insecure".to_string(),
        "--cpuinfo".into(),
        cpuinfo.display().to_string(),
    ];
    let rx = Receiver::start_with(&hosts.b, None, &extra);
    let mut tree = start_tree("cpu");
    let out = migrate(&hosts.a, tree.root, &rx.url, None);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("lacks a feature") && err.ends_with(&format!("{gone}; nothing was changed\n")),
        "{err}"
    );
    assert!(common::running_untraced(tree.root));
    verify(&mut tree.pipes, "after a refusal for the CPU");
    wait_destination_empty(&rx, &tree);
}

/// Removes the test's containers on both hosts (also when it fails).
struct Containers<'a>(&'a TwoHosts, &'a [&'a str]);

impl Drop for Containers<'_> {
    fn drop(&mut self) {
        for host in [&self.0.a, &self.0.b] {
            for name in self.1 {
                let _ = host.stasis(&["rm", "-f", name]).output();
            }
        }
    }
}

/// The counter a container's shell loop last wrote into `file`.
fn count_in(file: &std::path::Path) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits (bounded) until the counter in `file` passes `from`; returns it.
fn count_past(file: &std::path::Path, from: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = count_in(file);
        if c > from {
            return c;
        }
        assert!(Instant::now() < deadline, "the counter stays at {c}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_bridged_container_moves_with_its_address_and_its_memory() {
    let hosts = TwoHosts::new("migrate-container");
    let _rm = Containers(&hosts, &["mc"]);
    let rx = Receiver::start(&hosts.b, None);
    let file = hosts.a.state.join("..").join("count");
    // The shell's own variable counts: a copy that lost its memory would start again at 1.
    let script = format!(
        "i=0; while true; do i=$((i+1)); echo $i > {}; sleep 0.02; done",
        file.display()
    );
    let run = [
        "run", "--name", "mc", "--net", "bridge", "--detach", "--", "/bin/sh", "-c", &script,
    ];
    let out = hosts.a.stasis(&run).output().expect("stasis run");
    assert!(out.status.success(), "run: {}", stderr(&out));
    let before = count_past(&file, 5);
    let ps_a = json_on(&hosts.a, &["ps"]);
    let ip = ps_a[0]["ip"].clone();
    assert!(ip.is_string(), "{ps_a}");

    let out = run_migrate(
        &hosts.a,
        "mc",
        &rx.url,
        // Its own name: each host has its own cgroup parent (see common::hosts).
        &["--insecure", "--json"],
        None,
    );
    assert!(out.status.success(), "migrate: {}", stderr(&out));
    let after = count_past(&file, before);
    assert!(
        after > before,
        "the counter went back from {before} to {after}"
    );
    // Gone from the source (record, cgroup, veth), running on the destination at its address.
    assert_eq!(json_on(&hosts.a, &["ps"]), serde_json::json!([]));
    let ps_b = json_on(&hosts.b, &["ps"]);
    assert_eq!(ps_b[0]["name"], "mc", "{ps_b}");
    let cg = ps_b[0]["cgroup"].as_str().unwrap_or_default();
    assert_eq!(cg, format!("{}/mc", hosts.b.cgroup_parent), "{ps_b}");
    assert_eq!(ps_b[0]["ip"], ip, "{ps_b}");
    count_past(&file, after);
    wait_images_gone(&rx);
}

/// `stasis run --name NAME --detach [EXTRA...] -- /bin/sh -c 'while :; do sleep 1; done'` on
/// `host`, which must succeed.
fn run_idle_container(host: &Host, name: &str, extra: &[&str]) {
    let mut args = vec!["run", "--name", name, "--detach"];
    args.extend_from_slice(extra);
    args.extend(["--", "/bin/sh", "-c", "while :; do sleep 1; done"]);
    let out = host.stasis(&args).output().expect("stasis run");
    assert!(out.status.success(), "run {name}: {}", stderr(&out));
}

/// The busybox root file system (scripts/mkrootfs) in a directory `name` beside `host`'s
/// state; None (the caller's part is skipped, saying why) where it cannot be built.
fn build_rootfs(host: &Host, name: &str) -> Option<PathBuf> {
    let root = host.state.join("..").join(format!("{name}-{}", host.ip));
    let built = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/mkrootfs"))
        .arg(&root)
        .output()
        .expect("scripts/mkrootfs");
    if !built.status.success() {
        common::skip("the root file system part", &stderr(&built));
        return None;
    }
    Some(root.canonicalize().expect("the root file system's path"))
}

/// A container with a root file system of its own, on hosts that share no storage: its
/// files go along, whole while it runs, then what it changed until the freeze (files made,
/// rewritten and removed all the time by the container, which checks that its files agree
/// with its memory at every step) into the destination's own directory. A root file system
/// of that name already there is refused first, the container running on.
#[test]
fn a_container_moves_with_its_root_file_system_copied() {
    const TEST: &str = "a_container_moves_with_its_root_file_system_copied";
    if !common::failpoints_built(TEST) {
        return;
    }
    let hosts = TwoHosts::new("migrate-rootfs");
    let _rm = Containers(&hosts, &["copied"]);
    let rx = Receiver::start(&hosts.b, None);
    let Some(root) = build_rootfs(&hosts.a, "rootfs") else {
        return;
    };
    let root_s = root.display().to_string();
    // Memory (j) and files (/data) must agree at every step, across the move. Each file
    // f<j> lives five steps (100 ms): some that the first copy sends are always removed
    // before the freeze (the failpoint below holds it 500 ms), whichever it finds.
    let script = "mkdir -p /data; j=0; echo 0 > /data/count; touch /data/f0; \
                  while :; do \
                    [ \"$(cat /data/count)\" = \"$j\" ] || echo \"count $j\" >> /data/errors; \
                    [ -e /data/f$j ] || echo \"f$j\" >> /data/errors; \
                    j=$((j+1)); echo $j > /data/count; touch /data/f$j; rm -f /data/f$((j-5)); \
                    sleep 0.02; \
                  done";
    let args = [
        "run", "--name", "copied", "--detach", "--rootfs", &root_s, "--", "/bin/sh", "-c", script,
    ];
    let out = hosts.a.stasis(&args).output().expect("stasis run");
    assert!(out.status.success(), "run: {}", stderr(&out));
    let count = |r: &std::path::Path| {
        std::fs::read_to_string(r.join("data/count"))
            .ok()
            .and_then(|c| c.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&root) < 5 {
        assert!(Instant::now() < deadline, "the container does not count");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A root file system of that name already on the destination is refused before
    // anything is frozen: the container counts on here, nothing of it is there.
    let taken = hosts.b.state.join("rootfs/copied");
    std::fs::create_dir_all(&taken).expect("a root file system in the way");
    std::fs::write(taken.join("mine"), "the destination's own").expect("its file");
    let out = run_migrate(&hosts.a, "copied", &rx.url, &["--insecure"], None);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("a root file system for copied exists here"),
        "{err}"
    );
    let at = count(&root);
    while count(&root) <= at {
        assert!(
            Instant::now() < deadline,
            "the refused container stopped counting"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(containers_on(&hosts.b).is_empty());
    assert_eq!(
        std::fs::read_to_string(taken.join("mine")).expect("its file"),
        "the destination's own"
    );
    std::fs::remove_dir_all(&taken).expect("clear the way");
    let out = run_migrate(
        &hosts.a,
        "copied",
        &rx.url,
        &["--insecure", "--json"],
        Some("migrate-rootfs-copied=sleep(500)"),
    );
    assert!(out.status.success(), "migrate: {}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("migrate --json");
    eprintln!("migrate: {r}");
    let fs = &r["rootfs"];
    assert!(fs["entries"].as_u64() > Some(50), "{r}");
    assert!(fs["changed"].as_u64() >= Some(2), "{r}");
    assert!(fs["removed"].as_u64() >= Some(1), "{r}");
    assert_eq!(containers_on(&hosts.b), ["copied"]);
    assert!(containers_on(&hosts.a).is_empty());
    // It runs on its own copy there, the files and its memory in step.
    let copy = hosts.b.state.join("rootfs/copied");
    let at = count(&copy);
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&copy) < at + 10 {
        assert!(
            Instant::now() < deadline,
            "the moved container does not count on"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let errors = std::fs::read_to_string(copy.join("data/errors")).unwrap_or_default();
    assert!(errors.is_empty(), "its files and memory disagree: {errors}");
    let stale = std::fs::read_to_string(root.join("data/count")).unwrap_or_default();
    assert!(
        count(&copy) > stale.trim().parse().unwrap_or(0),
        "the source's files moved on"
    );
}

/// A receiver killed while it holds a container whose root file system it received (moved
/// to where the container would use it): the source runs on, and nothing of the copy is
/// left there, files and cgroup included.
#[test]
fn a_receiver_killed_holding_a_container_leaves_none_of_its_files() {
    const TEST: &str = "a_receiver_killed_holding_a_container_leaves_none_of_its_files";
    if !common::failpoints_built(TEST) {
        return;
    }
    let hosts = TwoHosts::new("migrate-rootfs-killed");
    let _rm = Containers(&hosts, &["held", "held2"]);
    let rx = Receiver::start(&hosts.b, Some("receive-held=return"));
    let Some(root) = build_rootfs(&hosts.a, "rootfs") else {
        return;
    };
    let root_s = root.display().to_string();
    run_idle_container(&hosts.a, "held", &["--rootfs", &root_s]);
    let out = run_migrate(
        &hosts.a,
        "held",
        &rx.url,
        &["--insecure", "--name", "held2"],
        None,
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        containers_on(&hosts.a),
        ["held"],
        "the source does not run on"
    );
    assert!(containers_on(&hosts.b).is_empty());
    wait_images_gone(&rx);
    let copy = hosts.b.state.join("rootfs/held2");
    assert!(
        !copy.exists(),
        "its root file system was left at {}",
        copy.display()
    );
    for root in common::cleanup::cgroup_roots() {
        let cg = root.join(&hosts.b.cgroup_parent).join("held2");
        assert!(!cg.exists(), "its cgroup was left: {}", cg.display());
    }
}

/// The names in `stasis ps` on `host`.
fn containers_on(host: &Host) -> Vec<String> {
    json_on(host, &["ps"])
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_workload_is_refused_when_its_name_is_taken_and_shared_storage_is_used_in_place() {
    const TEST: &str =
        "a_workload_is_refused_when_its_name_is_taken_and_shared_storage_is_used_in_place";
    let hosts = TwoHosts::new("migrate-refusals");
    let _rm = Containers(&hosts, &["rooted", "rooted2"]);
    let _vmms = Vmms(&hosts);
    let rx = Receiver::start(&hosts.b, None);
    // A name taken on the destination (VMs: two containers of one name would share a cgroup
    // on this one machine).
    if have_kvm(TEST) {
        start_vm(&hosts.a, "dup");
        start_vm(&hosts.b, "dup");
        let out = run_migrate(&hosts.a, "dup", &rx.url, &["--insecure"], None);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(4), "{err}");
        assert!(err.contains("a VM named dup runs here"), "{err}");
        // A flag that cannot apply is refused, not ignored.
        let args = ["--insecure", "--tcp-established"];
        let out = run_migrate(&hosts.a, "dup", &rx.url, &args, None);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("--tcp-established"),
            "{}",
            stderr(&out)
        );
        let c = vm_progress(&hosts.a, "dup", 0);
        vm_progress(&hosts.a, "dup", c);
    }

    // A cgroup parent that is not a plain relative path is a usage error.
    for bad in ["../evil", "/abs", "a//b"] {
        let args = [
            "run",
            "--name",
            "bad",
            "--cgroup-parent",
            bad,
            "--",
            "/bin/true",
        ];
        let mut c = std::process::Command::new(common::stasis());
        c.arg("--state-dir").arg(&hosts.a.state).args(args);
        let out = c.output().expect("stasis run");
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains("cgroup parent"), "{}", stderr(&out));
    }

    // A root file system of its own on shared storage is used where it is.
    let Some(root) = build_rootfs(&hosts.a, "rootfs") else {
        return;
    };
    let root_s = root.display().to_string();
    run_idle_container(&hosts.a, "rooted", &["--rootfs", &root_s]);
    assert!(containers_on(&hosts.a).contains(&"rooted".to_string()));
    let out = run_migrate(
        &hosts.a,
        "rooted",
        &rx.url,
        &["--name", "rooted2", "--insecure", "--shared-storage"],
        None,
    );
    assert!(
        out.status.success(),
        "with --shared-storage: {}",
        stderr(&out)
    );
    assert_eq!(containers_on(&hosts.b), ["rooted2"]);
    assert!(containers_on(&hosts.a).is_empty());
}

/// Whether this kernel tracks the writes of processes (userfaultfd write-protect in async
/// mode and PAGEMAP_SCAN, 6.7+); says why the test is skipped if not.
fn have_process_tracking(test: &str) -> bool {
    match stasis_runtime::write_tracking::support() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("{test}: skipped: {why}");
            false
        }
    }
}

/// `verify` of wl-writer must pass; returns its INFO line.
fn verify_writer(pipes: &mut Pipes, what: &str) -> String {
    pipes.send("verify");
    let info = pipes.expect_line(&["INFO ", "PASS ", "FAIL "]);
    let answer = pipes.expect_line(&["PASS ", "FAIL "]);
    assert!(answer.starts_with("PASS "), "{what}: {answer} ({info})");
    info
}

/// The value of `key=` in wl-writer's INFO line.
fn info_value(info: &str, key: &str) -> u64 {
    info.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {info}"))
}

#[test]
fn a_tree_writing_all_the_time_moves_in_pre_copy_rounds_and_loses_no_write() {
    let test = "a_tree_writing_all_the_time_moves_in_pre_copy_rounds_and_loses_no_write";
    // (It also makes, removes, moves and grows mappings all the time.)
    if !have_process_tracking(test) {
        return;
    }
    let hosts = TwoHosts::new("migrate-precopy");
    let mut rx = Receiver::start(&hosts.b, None);
    // Two writer threads rewrite random pages of 64 MiB at 16 MiB/s, all the time.
    let tag = format!("writer{}", std::process::id());
    let wl = common::workload("wl-writer");
    let argv: Vec<&std::ffi::OsStr> = vec![
        wl.as_os_str(),
        "--tag".as_ref(),
        tag.as_ref(),
        "--mib".as_ref(),
        "64".as_ref(),
        "--rate".as_ref(),
        "16".as_ref(),
        "--threads".as_ref(),
        "2".as_ref(),
        // A thread that makes, removes, replaces, moves and grows mappings all the time:
        // the rounds follow them.
        "--churn".as_ref(),
    ];
    let (mut tree, _) = common::spawn_in_ns(&[], &argv, &tag, "READY ");
    verify_writer(&mut tree.pipes, "before the migration");
    std::thread::sleep(Duration::from_millis(300));
    // Held before the commit for a while, so the tracking is seen in place (the same check
    // finds none after a migration that gave up: assert_untracked).
    let hold = common::failpoints_built(test).then_some("migrate-before-commit=sleep(600)");
    let mut cmd = hosts.a.stasis(&[
        "migrate",
        &tree.root.to_string(),
        "--to",
        &rx.url,
        "--json",
        "--timeout",
        "20",
        "--insecure",
    ]);
    if let Some(f) = hold {
        cmd.env("FAILPOINTS", f);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("stasis migrate");
    let mut seen_tracked = false;
    while hold.is_some() && !seen_tracked && alive(tree.root) {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", tree.root));
        seen_tracked = smaps.is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw"))
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("stasis migrate");
    assert!(out.status.success(), "migrate: {}", stderr(&out));
    assert!(
        hold.is_none() || seen_tracked,
        "the source's memory was never seen tracked (VmFlags uw)"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("migrate --json");
    eprintln!("migrate: {r}");
    assert_eq!(r["precopy"], "uffd-wp", "{r}");
    let rounds = r["rounds"].as_array().expect("rounds");
    assert!(rounds.len() >= 2, "a live round and the frozen one: {r}");
    // The first round took the memory while it ran; the frozen one only what was written
    // since the round before; the image none of it.
    let first = rounds[0]["bytes"].as_u64().unwrap_or(0);
    let last = rounds[rounds.len() - 1]["bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(first >= 64 << 20, "{r}");
    assert!(last < 16 << 20, "{r}");
    assert!(
        r["checkpoint"]["pages_precopied"].as_u64() >= Some(16384),
        "{r}"
    );
    assert!(r["image_bytes"].as_u64() < Some(8 << 20), "{r}");
    let dest = r["destination_pid"].as_i64().expect("destination_pid") as i32;
    let _ = tree.unshare.wait();
    assert!(!alive(tree.root), "the source's copy runs on");
    rx.wait_log("migration received");
    assert_no_receiver_regions(dest);
    // Every page holds the last write the table recorded, and the writes go on.
    let info = verify_writer(&mut rx.pipes, "on the destination");
    std::thread::sleep(Duration::from_millis(300));
    let again = verify_writer(&mut rx.pipes, "on the destination, again");
    assert!(
        info_value(&again, "writes") > info_value(&info, "writes")
            && info_value(&again, "churn_steps") > info_value(&info, "churn_steps"),
        "it stopped writing or changing its mappings: {info} / {again}"
    );
    eprintln!(
        "downtime as stasis saw it {} us; the longest gap in the workload's own timeline {} us",
        r["downtime_us"],
        info_value(&info, "max_gap_us")
    );
    common::kill(dest);
    common::reap(dest);
}

/// The restored process maps nothing where the receiver held its pre-copied memory
/// (`stasis_runtime::anon_region`, 16-64 TiB): every region became one of its mappings or
/// was let go of.
fn assert_no_receiver_regions(pid: i32) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let left: Vec<&str> = maps
        .lines()
        .filter(|l| {
            let start = l
                .split('-')
                .next()
                .and_then(|a| u64::from_str_radix(a, 16).ok());
            start.is_some_and(|a| (0x1000_0000_0000..0x4000_0000_0000).contains(&a))
        })
        .collect();
    assert!(
        left.is_empty(),
        "regions left in the restored process: {left:?}"
    );
}

/// A pid-namespace tree of `program` (its scratch file `scratch`, named by its tag, removed
/// at exit), moved from host A to host B in pre-copy rounds: the receiver (whose pipes it
/// now has), the hosts, the migration's report and the copy's PID there, which maps nothing
/// in the receiver's range. Passes its check before.
struct PreCopied {
    rx: Receiver,
    report: serde_json::Value,
    dest: i32,
    _hosts: TwoHosts,
}

fn move_in_pre_copy(hosts_tag: &str, program: &str, scratch: &str) -> PreCopied {
    let hosts = TwoHosts::new(hosts_tag);
    let rx = Receiver::start(&hosts.b, None);
    let tag = format!("{hosts_tag}{}", std::process::id());
    common::cleanup::remove_at_exit(&std::env::temp_dir().join(scratch.replace("{tag}", &tag)));
    let wl = common::workload(program);
    let argv: Vec<&std::ffi::OsStr> = vec![wl.as_os_str(), "--tag".as_ref(), tag.as_ref()];
    let (mut tree, _) = common::spawn_in_ns(&[], &argv, &tag, "READY ");
    verify(&mut tree.pipes, "before the migration");
    let out = migrate(&hosts.a, tree.root, &rx.url, None);
    assert!(out.status.success(), "migrate: {}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("migrate --json");
    assert_eq!(report["precopy"], "uffd-wp", "{report}");
    let dest = report["destination_pid"].as_i64().expect("destination_pid") as i32;
    let _ = tree.unshare.wait();
    rx.wait_log("migration received");
    assert_no_receiver_regions(dest);
    PreCopied {
        rx,
        report,
        dest,
        _hosts: hosts,
    }
}

#[test]
fn a_tree_of_many_kinds_of_mapping_comes_back_with_exactly_its_mappings_after_pre_copy() {
    let test =
        "a_tree_of_many_kinds_of_mapping_comes_back_with_exactly_its_mappings_after_pre_copy";
    if !have_process_tracking(test) {
        return;
    }
    // wl-memory: two dozen private regions (some sparse), a read-only one, a shared one, a
    // private file mapping, a deep stack; its check compares /proc/self/maps exactly. Its
    // mapped file is named with its PID, 1 in its namespace.
    let mut m = move_in_pre_copy("migrate-maps", "wl-memory", "stasis-wl-memory-1-{tag}.dat");
    let r = &m.report;
    assert!(r["checkpoint"]["pages_precopied"].as_u64() > Some(0), "{r}");
    verify(&mut m.rx.pipes, "on the destination");
    common::kill(m.dest);
    common::reap(m.dest);
}

#[test]
fn a_tree_moved_on_again_goes_in_pre_copy_rounds_from_its_restored_copy() {
    let test = "a_tree_moved_on_again_goes_in_pre_copy_rounds_from_its_restored_copy";
    if !have_process_tracking(test) {
        return;
    }
    let hosts = TwoHosts::new("migrate-twice");
    let mut rx = Receiver::start(&hosts.b, None);
    let mut back = Receiver::start(&hosts.a, None);
    let tag = format!("twice{}", std::process::id());
    let wl = common::workload("wl-writer");
    let argv: Vec<&std::ffi::OsStr> = vec![
        wl.as_os_str(),
        "--tag".as_ref(),
        tag.as_ref(),
        "--mib".as_ref(),
        "32".as_ref(),
        "--churn".as_ref(),
    ];
    let (mut tree, _) = common::spawn_in_ns(&[], &argv, &tag, "READY ");
    verify_writer(&mut tree.pipes, "before the migrations");
    let mut root = tree.root;
    // There, and back from the copy restored there (its memory came as huge pages, its
    // mappings from the receiver's regions).
    for (from, to) in [(&hosts.a, &mut rx), (&hosts.b, &mut back)] {
        let out = migrate(from, root, &to.url, None);
        assert!(out.status.success(), "migrate: {}", stderr(&out));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("migrate --json");
        assert_eq!(r["precopy"], "uffd-wp", "{r}");
        assert!(
            r["checkpoint"]["pages_precopied"].as_u64() >= Some(8192),
            "{r}"
        );
        root = r["destination_pid"].as_i64().expect("destination_pid") as i32;
        to.wait_log("migration received");
        assert_no_receiver_regions(root);
        verify_writer(&mut to.pipes, "after a migration");
    }
    let _ = tree.unshare.wait();
    common::kill(root);
    common::reap(root);
}

#[test]
fn a_tree_whose_children_and_mappings_come_and_go_moves_in_pre_copy_rounds() {
    let test = "a_tree_whose_children_and_mappings_come_and_go_moves_in_pre_copy_rounds";
    if !have_process_tracking(test) {
        return;
    }
    // wl-churn forks children that exit at once, maps and unmaps memory, starts threads and
    // opens files all the time: processes appear and vanish between the rounds. Its
    // scratch file is named before it is READY (PID 0 then).
    let mut m = move_in_pre_copy("migrate-churn", "wl-churn", "stasis-wl-churn-0-{tag}.dat");
    verify(&mut m.rx.pipes, "on the destination");
    verify(&mut m.rx.pipes, "on the destination, again");
    common::kill(m.dest);
    common::reap(m.dest);
}

//! The workload interface (stasis-workload) used directly, as live migration and the kernel
//! update use it: a verb a kind of workload cannot do, or one out of order, is an error that
//! names the workload and the verb and changes nothing; freeze, resume and the checkpoint
//! sequence work on a real process tree and a real VM.

mod common;

use stasis_checkpoint::{FileSink, ImageSink, Options};
use stasis_runtime::container::StateDir;
use stasis_workload::{BuildOptions, Go, Report, Restored, Source, Verb, WorkloadError};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(") ")?.1.chars().next()? != 'Z'))
        .unwrap_or(false)
}

fn assert_refused(r: Result<(), WorkloadError>, verb: Verb, who: &str, reason: &str) {
    let e = r.expect_err("the verb was refused");
    let text = e.to_string();
    let right_verb = matches!(
        &e,
        WorkloadError::Unsupported { verb: v, .. } | WorkloadError::OutOfOrder { verb: v, .. }
            if *v == verb
    );
    assert!(right_verb, "{verb:?}: {e:?}");
    assert!(
        text.contains(who) && text.contains(reason),
        "{verb:?}: {text:?} names neither {who:?} nor {reason:?}"
    );
}

/// How to build a VM detached under `name`, from its image and `memory` received apart.
fn detached_vm(name: &str, memory: Option<Arc<std::fs::File>>) -> BuildOptions<'_> {
    BuildOptions {
        name: Some(name),
        tree: stasis_restore::Options::default(),
        vm_memory: None,
        vm_detach: true,
        vm_quiet: true,
        vm_verify_first: true,
        started: Instant::now(),
        memory,
    }
}

/// A page sink that takes nothing.
struct Nowhere;

impl stasis_workload::PageSink for Nowhere {
    fn pages(&mut self, addr: u64, _data: &[u8]) -> std::io::Result<()> {
        panic!("pages at {addr:#x} were sent")
    }
}

#[test]
fn a_process_tree_refuses_what_it_cannot_do_and_runs_on_untouched() {
    common::init();
    let mut wl = common::start("wl-counter", &["--quiet", "--mib", "4"]);
    let who = format!("PID {}", wl.pid);
    let mut src = stasis_workload::TreeSource::process_tree(wl.pid, &Options::default());
    let round = src.copy_round(&mut Nowhere).map(|_| ());
    assert_refused(round, Verb::CopyRound, &who, "not started");
    // Nothing but freeze fits a workload that runs.
    assert_refused(src.resume(), Verb::Resume, &who, "not frozen");
    assert_refused(src.discard(), Verb::Discard, &who, "not frozen");
    let mut sink = Vec::new();
    let mut sink = stasis_checkpoint::StreamSink::new(&mut sink);
    let wrote = src.write_state(&mut sink, &|_, _| {});
    assert_refused(wrote, Verb::WriteState, &who, "not frozen");
    drop(sink);
    assert!(common::running_untraced(wl.pid), "refusals touched it");

    src.freeze().expect("freeze");
    assert!(!common::running_untraced(wl.pid), "frozen, it still runs");
    assert_refused(src.freeze(), Verb::Freeze, &who, "frozen already");
    // Never ended before a copy of it exists.
    assert_refused(src.discard(), Verb::Discard, &who, "no copy");
    assert!(alive(wl.pid), "a refused discard ended it");
    src.resume().expect("resume");
    assert!(common::running_untraced(wl.pid), "resumed, it does not run");
    wl.pipes.expect_pass("check", "after freeze and resume");
    common::kill(wl.pid);
    let _ = wl.child.wait();
}

/// What a tracked tree's rounds hand their sink.
#[derive(Default)]
struct Recorded {
    processes: Vec<i32>,
    mappings: Vec<(u64, u64)>,
    bytes: u64,
}

impl stasis_workload::PageSink for Recorded {
    fn pages(&mut self, _addr: u64, data: &[u8]) -> std::io::Result<()> {
        self.bytes += data.len() as u64;
        Ok(())
    }

    fn process(&mut self, pid: i32) -> std::io::Result<()> {
        self.processes.push(pid);
        Ok(())
    }

    fn ranges(
        &mut self,
        kind: stasis_checkpoint::Ranges,
        ranges: &[(u64, u64)],
    ) -> std::io::Result<()> {
        if kind == stasis_checkpoint::Ranges::Mappings {
            self.mappings = ranges.to_vec();
        }
        Ok(())
    }
}

/// Whether any mapping of `pid` is still registered for write-protect tracking.
fn tracked(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/smaps")).is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw"))
    })
}

#[test]
fn a_tracked_process_tree_sends_its_memory_then_what_it_wrote_and_runs_on_untracked() {
    const TEST: &str =
        "a_tracked_process_tree_sends_its_memory_then_what_it_wrote_and_runs_on_untracked";
    if let Err(why) = stasis_runtime::write_tracking::support() {
        eprintln!("{TEST}: skipped: {why}");
        return;
    }
    common::init();
    let dir = common::scratch("workload-tracked");
    let mut wl = common::start("wl-counter", &["--quiet", "--mib", "4"]);
    let who = format!("PID {}", wl.pid);
    let mut src = stasis_workload::TreeSource::process_tree(wl.pid, &Options::default());
    let t = src.start_dirty_tracking().expect("tracking");
    assert_eq!(t.method, "uffd-wp");
    let again = src.start_dirty_tracking().map(|_| ());
    assert_refused(again, Verb::StartDirtyTracking, &who, "tracked already");
    // Its memory first, then only what it wrote since (a counter, not its data).
    let mut first = Recorded::default();
    src.copy_round(&mut first).expect("first round");
    assert_eq!(first.processes, vec![wl.pid]);
    assert!(
        !first.mappings.is_empty() && first.bytes >= 4 << 20,
        "{}",
        first.bytes
    );
    // (Its mappings are registered by the first round, as they are then.)
    assert!(tracked(wl.pid), "no mapping of it is tracked");
    let mut second = Recorded::default();
    src.copy_round(&mut second).expect("second round");
    assert!(second.bytes < 1 << 20, "{} bytes again", second.bytes);
    src.freeze().expect("freeze");
    let mut last = Recorded::default();
    src.copy_round(&mut last).expect("the last round");
    let more = src.copy_round(&mut Recorded::default()).map(|_| ());
    assert_refused(more, Verb::CopyRound, &who, "last round");
    // Its image holds none of the pages that went ahead: restored anywhere but on a
    // receiver that holds them, it is refused, naming a mapping.
    let img = dir.join("tracked.img");
    let mut sink = FileSink::create(&img).expect("image file");
    src.write_state(&mut sink, &|_, _| {}).expect("state");
    sink.commit().expect("commit");
    src.resume().expect("resume");
    assert!(!tracked(wl.pid), "resumed, it is still tracked");
    wl.pipes.expect_pass("check", "after the rounds and resume");
    common::kill(wl.pid);
    let _ = wl.child.wait();
    let out = Command::new(common::stasis())
        .args(["restore", img.to_str().expect("utf8")])
        .output()
        .expect("stasis restore");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "restored without its pages: {err}");
    assert!(err.contains("pre-copy rounds"), "{err}");
}

#[test]
fn the_checkpoint_sequence_of_a_process_tree_restores() {
    common::init();
    let dir = common::scratch("workload-seq");
    let mut wl = common::start("wl-counter", &["--quiet", "--mib", "8", "--procs", "2"]);
    wl.pipes.expect_pass("verify", "before the checkpoint");
    let pid = wl.pid;
    let tree = common::descendants(pid);
    let img = dir.join("tree.img");
    let mut sink = FileSink::create(&img).expect("image file");
    let mut src = stasis_workload::TreeSource::process_tree(pid, &Options::default());
    let report = stasis_workload::checkpoint(&mut src, &mut sink, false, &|_, _| {})
        .expect("checkpoint through the interface");
    let Report::Tree(s) = report else {
        panic!("a process tree reported as a VM")
    };
    eprintln!("checkpoint: {s:?}");
    assert_eq!(s.process, "killed");
    assert_eq!(s.processes, 2);
    assert!(s.pages_data >= 2 * 8 * 256, "{s:?}");
    assert!(s.commit_us > 0 && s.kill_us > 0, "{s:?}");
    // Committed before the kill: the image is whole, and for its owner's eyes only (it
    // holds the workload's memory).
    common::stasis_ok(&["image", "verify", img.to_str().expect("utf8")]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&img).map(|m| m.permissions().mode() & 0o777);
    assert_eq!(mode.ok(), Some(0o600), "the image's mode");
    // Killed, and reaped by its tracer (this test is also its parent).
    let _ = wl.child.wait();
    common::reap_orphans(&tree);
    assert!(!alive(pid), "the original runs on after its discard");
    let (mut r, mut p) = common::restore(&img, false);
    p.expect_pass("check", "after the restore");
    assert!(r.wait().expect("stasis restore").success());
}

/// Build options for a process tree whose standard input and output are new pipes; returns
/// them, and the pipe ends the tree gets (closed here once it is built).
fn tree_build_options() -> (BuildOptions<'static>, common::Pipes, [OwnedFd; 2]) {
    let (r_in, w_in) = std::io::pipe().expect("pipe");
    let (r_out, w_out) = std::io::pipe().expect("pipe");
    let mut tree = stasis_restore::Options::default();
    tree.inherit_fds.insert(0, r_in.as_raw_fd());
    tree.inherit_fds.insert(1, w_out.as_raw_fd());
    let opts = BuildOptions {
        name: None,
        tree,
        vm_memory: None,
        vm_detach: false,
        vm_quiet: false,
        vm_verify_first: false,
        started: Instant::now(),
        memory: None,
    };
    let pipes = common::Pipes {
        stdin: OwnedFd::from(w_in).into(),
        stdout: std::io::BufReader::new(OwnedFd::from(r_out).into()),
    };
    (opts, pipes, [r_in.into(), w_out.into()])
}

fn open_image(path: &Path) -> Arc<stasis_image::Image> {
    Arc::new(stasis_image::Image::open(path).expect("open image"))
}

/// The receiving side: a tree built from an image is held whole and stopped until the
/// workflow decides; discarded, nothing of it is left (and the image can be built again);
/// resumed, it runs on and passes its checks.
#[test]
fn a_tree_built_from_an_image_is_held_stopped_then_discarded_or_resumed() {
    common::init();
    let dir = common::scratch("workload-build");
    let mut wl = common::start("wl-counter", &["--quiet", "--mib", "4"]);
    wl.pipes.expect_pass("verify", "before the checkpoint");
    let pid = wl.pid;
    let img = dir.join("tree.img");
    let mut sink = FileSink::create(&img).expect("image file");
    let mut src = stasis_workload::TreeSource::process_tree(pid, &Options::default());
    stasis_workload::checkpoint(&mut src, &mut sink, false, &|_, _| {}).expect("checkpoint");
    let _ = wl.child.wait();
    let state = StateDir::new(dir.join("state"));

    // Seen while held: (its PID, whether it ran).
    let seen: Arc<Mutex<Vec<(i32, bool)>>> = Arc::default();
    let decide = |go: Go| -> stasis_workload::OnHeld {
        let seen = seen.clone();
        Arc::new(move |h: &stasis_workload::Held| {
            seen.lock()
                .expect("lock")
                .push((h.pid, common::running_untraced(h.pid)));
            go.clone()
        })
    };
    let (opts, _pipes, ends) = tree_build_options();
    let discard = Go::Discard("the test discards it".into());
    let built = stasis_workload::build(&state, open_image(&img), &img, opts, Some(decide(discard)));
    drop(ends);
    let err = built.expect_err("a discarded build is an error");
    assert!(
        matches!(
            err,
            WorkloadError::Restore(stasis_restore::RestoreError::Discarded(_))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("the test discards it"), "{err}");
    let held = seen.lock().expect("lock").clone();
    assert_eq!(
        held,
        vec![(pid, false)],
        "held once, stopped, under its PID"
    );
    assert!(!alive(pid), "a discarded tree left its root behind");
    common::stasis_ok(&["image", "verify", img.to_str().expect("utf8")]);

    let (opts, mut pipes, ends) = tree_build_options();
    let built = stasis_workload::build(
        &state,
        open_image(&img),
        &img,
        opts,
        Some(decide(Go::Resume)),
    );
    drop(ends);
    let Restored::Tree(stats) = built.expect("build, hold, resume") else {
        panic!("a process tree came back as something else")
    };
    assert_eq!(stats.pid, pid);
    assert_eq!(seen.lock().expect("lock").len(), 2);
    pipes.expect_pass("check", "after being held and resumed");
    common::kill(pid);
    common::reap(pid);
}

/// A VM answers every verb: tracked while it runs, its memory copied round by round into
/// a page sink, paused, the last round sent, its state written without memory, discarded
/// once its copy exists; built from the state and the memory it runs on; a held build is
/// discarded or resumed.
#[test]
fn a_vm_answers_every_verb_and_its_image_restores_beside_it() {
    const TEST: &str = "a_vm_answers_every_verb_and_its_image_restores_beside_it";
    if !std::path::Path::new("/dev/kvm").exists() {
        common::skip(TEST, "/dev/kvm does not exist on this host");
        return;
    }
    let state = common::scratch("workload-vm");
    struct Vmms(std::path::PathBuf);
    impl Drop for Vmms {
        fn drop(&mut self) {
            common::kill_vmms(&self.0);
        }
    }
    let _vmms = Vmms(state.clone());
    let stasis = |args: &[&str]| {
        let out = Command::new(common::stasis())
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .output()
            .expect("running stasis");
        assert!(
            out.status.success(),
            "stasis {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    let run = [
        "vm", "run", "--name", "orig", "--memory", "16m", "--guest", "demo", "--detach",
    ];
    stasis(&run);
    let counter = |name: &str| {
        stasis(&["vm", "ps", "--json"])
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["name"] == name).cloned())
            .and_then(|r| r["counter"].as_u64())
            .unwrap_or(0)
    };
    let wait_progress = |name: &str, from: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while counter(name) <= from {
            assert!(Instant::now() < deadline, "VM {name} makes no progress");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_progress("orig", 0);

    let sd = StateDir::new(&state);
    let opts = stasis_checkpoint::vm::VmCheckpointOptions::default();
    let mut src = stasis_workload::VmSource::open(&sd, "orig", opts).expect("open the VM");
    assert_refused(src.discard(), Verb::Discard, "VM orig", "no copy");
    // Its memory goes round by round into a memfd, as a migration receiver keeps it.
    let tracked = src.start_dirty_tracking().expect("start dirty tracking");
    assert_eq!(tracked.extent, 16 << 20, "{tracked:?}");
    let mem = stasis_runtime::kvm::memory::memory_file("test", tracked.extent).expect("memfd");
    let mut pages = stasis_checkpoint::FilePages(&mem);
    let first = src.copy_round(&mut pages).expect("first round");
    wait_progress("orig", counter("orig"));
    let second = src.copy_round(&mut pages).expect("second round");
    eprintln!("rounds: {first:?} {second:?}");
    assert!(
        first.pages * 4096 >= tracked.resident && first.pages > 0,
        "the first round copies the resident memory: {first:?} {tracked:?}"
    );
    assert!(second.pages > 0, "the guest wrote nothing between rounds");
    src.freeze().expect("pause");
    assert!(
        !src.captured(),
        "its memory went to a sink: the paused VM is not held by stasis"
    );
    let img = state.join("vm.img");
    let mut sink = FileSink::create(&img).expect("image file");
    let early = src.write_state(&mut sink, &|_, _| {});
    assert_refused(early, Verb::WriteState, "orig", "last round");
    let last = src.copy_round(&mut pages).expect("the last round, paused");
    eprintln!("last round: {last:?}");
    let again = src.copy_round(&mut pages).map(|_| ());
    assert_refused(again, Verb::CopyRound, "orig", "sent already");
    src.write_state(&mut sink, &|_, _| {})
        .expect("write the state");
    sink.commit().expect("commit");
    src.committed(0);
    let Report::Vm(s) = src.report() else {
        panic!("a VM reported as a process tree")
    };
    eprintln!("checkpoint: {s:?}");
    assert_eq!(s.pages_data, 0, "the state image holds guest memory: {s:?}");
    assert!(s.precopy_rounds >= 1, "{s:?}");
    src.discard()
        .expect("discard the original once its copy exists");
    assert!(
        !sd.vms().file_path("orig", "json").exists(),
        "the discarded VM keeps its record"
    );

    // Built from its state and the memory the rounds sent, it runs on where it was.
    let mem = Arc::new(mem);
    let opts = detached_vm("copy", Some(mem.clone()));
    let built = stasis_workload::build(&sd, open_image(&img), &img, opts, None);
    assert!(matches!(built, Ok(Restored::Vm(_))), "{built:?}");
    wait_progress("copy", 0);
    // Memory received apart is refused with an image that holds memory of its own.
    let full = state.join("full.img");
    let full_arg = full.to_str().expect("utf8");
    stasis(&[
        "checkpoint",
        "copy",
        "-o",
        full_arg,
        "--leave-running",
        "--json",
    ]);
    let opts = detached_vm("twice", Some(mem));
    let refused = stasis_workload::build(&sd, open_image(&full), &full, opts, None);
    let text = format!("{:?}", refused.map(|_| ()));
    assert!(text.contains("received apart"), "{text}");
    let img = full;
    // Built and held: no vCPU thread runs until the decision. Discarded, nothing is left;
    // resumed, it runs beside the others.
    let vcpus_seen: Arc<Mutex<Vec<usize>>> = Arc::default();
    for go in [Go::Discard("the test discards it".into()), Go::Resume] {
        let opts = BuildOptions {
            name: Some("held"),
            tree: stasis_restore::Options::default(),
            vm_memory: None,
            vm_detach: true,
            vm_quiet: true,
            vm_verify_first: false,
            started: Instant::now(),
            memory: None,
        };
        let seen = vcpus_seen.clone();
        let decide: stasis_workload::OnHeld = Arc::new(move |h: &stasis_workload::Held| {
            let vcpus = std::fs::read_dir(format!("/proc/{}/task", h.pid))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("vcpu"))
                })
                .count();
            seen.lock().expect("lock").push(vcpus);
            go.clone()
        });
        let built = stasis_workload::build(&sd, open_image(&img), &img, opts, Some(decide));
        let rows = stasis(&["vm", "ps", "--json"]);
        let names: Vec<&str> = rows
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["name"].as_str())
            .collect();
        match built {
            Err(WorkloadError::Restore(stasis_restore::RestoreError::Discarded(why))) => {
                assert!(why.contains("the test discards it"), "{why}");
                assert!(
                    !names.contains(&"held"),
                    "a discarded VM is listed: {names:?}"
                );
            }
            Ok(Restored::Vm(_)) => {
                assert!(
                    names.contains(&"held"),
                    "a resumed VM is not listed: {names:?}"
                );
                wait_progress("held", 0);
            }
            other => panic!("build of a held VM: {other:?}"),
        }
    }
    assert_eq!(
        *vcpus_seen.lock().expect("lock"),
        vec![0, 0],
        "vCPUs ran while held"
    );
    for name in ["copy", "held"] {
        let rep = stasis(&["vm", "stop", name, "--json"]);
        assert_eq!(rep["errors"], 0, "{name}: {rep}");
    }
}

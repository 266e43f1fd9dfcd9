//! Command-line interface (clap).

use crate::{containers, demo, exit, report, vms};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde::Serialize;
use stasis_checkpoint::{FileSink, StreamSink};
use stasis_image::{Compression, Image};
use std::io::IsTerminal;
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Exit codes:
  0  success (restore without --detach: the restored process's own exit status)
  1  the operation failed; the workload was left as it was
  2  usage error
  3  the image is corrupt, truncated or not a stasis image
  4  refused before anything changed: no such process or container, PID or name in use, or an
     unsupported feature; a migration the receiver refused or could not be reached for
  5  a migration committed but the destination never confirmed: the source is left stopped;
     the message says how to settle it
  128+N  checkpoint interrupted by signal N (Ctrl-C: 130); the process was left as it was";

const ABOUT: &str = "Checkpoint and restore Linux workloads: process trees, containers and small \
KVM VMs";

const LONG_ABOUT: &str = "\
Checkpoint and restore Linux workloads: process trees, containers and small KVM VMs.

stasis freezes a workload, writes everything it is into one image file, and recreates it from
that file later or elsewhere on this machine. It also runs the containers and VMs it saves,
and moves process trees, containers and VMs live to another host (`stasis migrate` to a
`stasis receive`, over mutual TLS; one stop-and-copy round today). Rebootless kernel updates are
planned, not there yet.";

/// The command line.
#[derive(Parser)]
#[command(
    name = "stasis",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// Where containers and VMs are recorded, given before the command (also
    /// STASIS_STATE_DIR). Used by run, ps, stats, exec, set, freeze, thaw, stop, rm, vm, and
    /// checkpoint/restore of containers and VMs.
    #[arg(long, env = "STASIS_STATE_DIR", default_value = stasis_runtime::container::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Save a running process tree, container or VM into an image file (like `criu dump`).
    ///
    /// The workload is stopped (ptrace, its cgroup's freezer, or the VMM), its registers,
    /// memory, files and signal state are written to the image, and only once the image is
    /// completely written and synced is it killed (default). With --leave-running it runs on
    /// as soon as every page is written out of it, while the image is synced. If anything
    /// fails, it is resumed exactly as it was.
    Checkpoint {
        /// PID of the process tree's root, or the name of a container or a VM.
        #[arg(value_name = "PID|NAME")]
        target: String,
        /// Image file to write ("-" streams it to standard output).
        #[arg(short, long)]
        output: PathBuf,
        /// Let the process run on after the checkpoint instead of killing it (resumed
        /// before the image is synced: its frozen time does not include the disk's).
        #[arg(long)]
        leave_running: bool,
        /// Keep established TCP connections (as criu's --tcp-established): their packets
        /// are dropped by an nftables lock while they are read with TCP_REPAIR, and stay
        /// locked from the kill until `stasis restore` rebuilds them, so the peer sees only
        /// a pause. Without it a tree holding a connection is refused.
        #[arg(long)]
        tcp_established: bool,
        /// Page data encoding: none (raw, page-aligned, mappable) or zstd[:LEVEL].
        #[arg(long, default_value = "none")]
        compress: Compression,
        /// A VM with --leave-running: the most memory (e.g. 512M, 2G, max) stasis may take
        /// for the copy of guest memory that lets the guest run while its image is written.
        /// A guest with more resident memory stays paused until the image is written, then
        /// runs on. Default: half of MemAvailable.
        #[arg(long, value_name = "SIZE")]
        staging_limit: Option<String>,
        /// Print statistics as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a process tree (with its original PIDs), a container or a VM from an image.
    ///
    /// The whole image is verified and the PIDs checked free before anything is created.
    /// Without --detach stasis waits for the restored workload and exits with its status;
    /// standard input/output that was a terminal or pipe is taken from stasis's own.
    Restore {
        /// Image file (of a process tree, a container or a VM).
        image: PathBuf,
        /// Leave the restored workload running and exit (prints its PID or name).
        #[arg(short, long)]
        detach: bool,
        /// A container or VM image: restore it under this name (default: the name it had). A
        /// container gets fresh namespaces, so it can run beside the original.
        #[arg(long)]
        name: Option<String>,
        /// A VM image: the memory size the restored VM must have (refused if the image's
        /// differs).
        #[arg(long, value_name = "SIZE")]
        memory: Option<String>,
        /// A VM image: check every page hash before the guest starts. By default the image's
        /// structure and metadata are checked first, the guest starts on pages mapped from
        /// the image, and their hashes are checked while it runs; the restore succeeds only
        /// once they all match, and a mismatch stops and removes the VM (exit 3).
        #[arg(long)]
        verify_first: bool,
        /// A container image: its cgroup goes below this cgroup in every hierarchy
        /// (default: stasis), e.g. to keep two stasis instances on one host apart.
        #[arg(long, value_name = "PATH")]
        cgroup_parent: Option<String>,
        /// Print statistics as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Look into image files.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Start a container: CMD as PID 1 of new pid, mount, uts, ipc and net namespaces, in
    /// its own cgroup with the given limits, pivoted into --rootfs if given.
    ///
    /// Without --detach stasis waits for it, passes Ctrl-C and SIGTERM on to it, removes it
    /// when it exits and exits with its status.
    Run(containers::RunArgs),
    /// List running containers (the records of dead ones are removed; their logs are kept).
    Ps {
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// CPU, memory, pids and I/O of a container, from its cgroup.
    Stats {
        /// The container's name.
        name: String,
        /// Print the statistics as JSON ("no limit" is null).
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a running container (all its namespaces and its cgroup).
    Exec {
        /// The container's name.
        name: String,
        /// The command and its arguments, after "--".
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Change a running container's limits live; only the limits given change.
    Set {
        /// The container's name.
        name: String,
        #[command(flatten)]
        limits: containers::LimitArgs,
        /// Print the container's record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Freeze every process of a container (cgroup freezer).
    Freeze {
        /// The container's name.
        name: String,
    },
    /// Thaw a frozen container.
    Thaw {
        /// The container's name.
        name: String,
    },
    /// Stop a container: SIGTERM to its init, SIGKILL to all after --timeout; then remove it.
    Stop {
        /// The container's name.
        name: String,
        /// Seconds to wait after SIGTERM.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Remove a container's record, cgroup and network (a running one only with --force).
    Rm {
        /// The container's name.
        name: String,
        /// Remove it even if it runs (its processes are killed).
        #[arg(short, long)]
        force: bool,
    },
    /// KVM virtual machines: run, ps, stop, console.
    #[command(subcommand)]
    Vm(vms::VmCommand),
    /// Run the built-in demo: a counter is checkpointed, killed, restored, and carries on.
    Demo {
        /// Print the demo's results as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move a running process tree, container or VM to another host (like CRIU's page-server
    /// migration, with the destination's copy held and verified before the source lets go).
    ///
    /// The workload is frozen here, its image streams to the receiver, which verifies it,
    /// builds it and holds it stopped; only then does this side commit, and only once the
    /// destination says it runs is the copy here killed. Any failure before the commit
    /// resumes it here as it was (exit 1, or 4 if refused before anything was frozen); a
    /// commit never confirmed leaves it stopped here and says how to settle it (exit 5).
    Migrate(crate::migration::MigrateArgs),
    /// Accept migrations (long-running; logs to standard error; see contrib/stasis-receive.service).
    ///
    /// Each migration runs in a worker process of its own: the image is stored under the
    /// state directory, checked like any image `restore` reads, built and held stopped until
    /// the source commits, then resumed. Nothing is left of one that fails or is aborted.
    Receive(crate::migration::ReceiveArgs),
    /// One received migration (internal; its connection on fd 3).
    #[command(hide = true, name = "receive-worker")]
    ReceiveWorker(crate::migration::WorkerArgs),
    /// The demo's counter workload (internal).
    #[command(hide = true, name = "__demo-counter")]
    DemoCounter,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Show everything in an image: processes, registers, mappings, fds, pages, chunks.
    ///
    /// Every chunk of page data is hash-checked too: corrupt ones are named on standard error
    /// (and under "corrupt" in the JSON) and stasis exits with 3.
    Inspect {
        /// Image file.
        image: PathBuf,
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every byte of an image (headers, hashes, index); exit 3 with the reason if bad.
    Verify {
        /// Image file, or "-" to read a stream from standard input.
        image: PathBuf,
        /// Print the result as JSON ({"ok": false, "error": ...} for a bad image).
        #[arg(long)]
        json: bool,
    },
}

/// Runs the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    let state = stasis_runtime::container::StateDir::new(&cli.state_dir);
    match cli.command {
        Command::Checkpoint {
            target,
            output,
            leave_running,
            tcp_established,
            compress,
            staging_limit,
            json,
        } => {
            let is_vm = stasis_workload::is_vm(&state, &target);
            let staging_limit = match (staging_limit, is_vm) {
                (Some(l), false) => {
                    return Err(exit::usage(format!(
                        "--staging-limit {l}: {target} is not a VM (the limit is for VM snapshots)"
                    )))
                }
                (l, _) => l
                    .as_deref()
                    .map(stasis_runtime::cgroups::parse_size)
                    .transpose()
                    .context("--staging-limit")?,
            };
            let opts = stasis_workload::SourceOptions {
                tree: stasis_checkpoint::Options {
                    leave_running,
                    compression: compress,
                    tcp_established,
                    ..Default::default()
                },
                vm: stasis_checkpoint::vm::VmCheckpointOptions {
                    leave_running,
                    compression: compress,
                    staging_limit,
                },
            };
            checkpoint(&state, &target, output, &opts, json)
        }
        Command::Restore {
            image,
            detach,
            name,
            memory,
            verify_first,
            cgroup_parent,
            json,
        } => restore(
            &state,
            image,
            RestoreFlags {
                detach,
                name,
                memory,
                verify_first,
                cgroup_parent,
                json,
            },
        ),
        Command::Image(ImageCommand::Inspect { image, json }) => inspect(image, json),
        Command::Image(ImageCommand::Verify { image, json }) => verify(&image, json),
        Command::Demo { json } => demo::run(json),
        Command::Run(a) => containers::run(&state, a),
        Command::Ps { json } => containers::ps(&state, json),
        Command::Stats { name, json } => containers::stats(&state, &name, json),
        Command::Exec { name, command } => {
            Ok(stasis_runtime::container::exec(&state, &name, &command)
                .with_context(|| format!("exec in container {name}"))?)
        }
        Command::Set { name, limits, json } => containers::set(&state, &name, &limits, json),
        Command::Freeze { name } => {
            stasis_runtime::container::freeze(&state, &name)
                .with_context(|| format!("freezing container {name}"))?;
            crate::outln!("{name}");
            Ok(exit::OK)
        }
        Command::Thaw { name } => {
            stasis_runtime::container::thaw(&state, &name)
                .with_context(|| format!("thawing container {name}"))?;
            crate::outln!("{name}");
            Ok(exit::OK)
        }
        Command::Stop { name, timeout } => containers::stop(&state, &name, timeout),
        Command::Rm { name, force } => {
            stasis_runtime::container::remove(&state, &name, force)
                .with_context(|| format!("removing container {name}"))?;
            crate::outln!("{name}");
            Ok(exit::OK)
        }
        Command::Vm(cmd) => vms::command(&state, cmd),
        Command::Migrate(a) => crate::migration::migrate(&state, a),
        Command::Receive(a) => crate::migration::receive(&state, a),
        Command::ReceiveWorker(a) => crate::migration::worker(&state, a),
        Command::DemoCounter => demo::counter(),
    }
}

fn checkpoint(
    state: &stasis_runtime::container::StateDir,
    target: &str,
    output: PathBuf,
    opts: &stasis_workload::SourceOptions,
    json: bool,
) -> Result<i32> {
    let leave_running = opts.tree.leave_running;
    let mut w = stasis_workload::open(state, target, opts)?;
    let to_stdout = output.as_os_str() == "-";
    if to_stdout && w.kind() == stasis_workload::Kind::Vm {
        anyhow::bail!("VM {target}: a VM image must go to a file (-o PATH), not a stream");
    }
    let bar = report::progress_bar(json || to_stdout, "checkpoint");
    let progress = report::follow(&bar);
    let checkpointed = if to_stdout {
        if std::io::stdout().is_terminal() {
            bail!("refusing to write an image to a terminal; redirect standard output");
        }
        let out = std::os::fd::AsFd::as_fd(&std::io::stdout())
            .try_clone_to_owned()
            .context("duplicating standard output")?;
        let mut sink = StreamSink::new(std::fs::File::from(out));
        stasis_workload::checkpoint(w.as_mut(), &mut sink, leave_running, &progress)
    } else {
        let mut sink =
            FileSink::create(&output).with_context(|| format!("creating {}", output.display()))?;
        stasis_workload::checkpoint(w.as_mut(), &mut sink, leave_running, &progress)
    };
    bar.finish_and_clear();
    let report = checkpointed.with_context(|| format!("checkpointing {}", w.describe()))?;
    let stats = match report {
        stasis_workload::Report::Vm(stats) => {
            return vms::checkpointed(&stats, &output, &opts.vm, json);
        }
        stasis_workload::Report::Tree(stats) => stats,
    };
    if json {
        report::json(&stats)?;
    } else if !to_stdout {
        let what = match w.kind() {
            stasis_workload::Kind::Container => format!("container {target}"),
            _ => format!("PID {}", stats.pid),
        };
        crate::outln!(
            "checkpointed {what} into {} ({}), {} {}",
            output.display(),
            report::bytes(stats.image_bytes),
            if what.starts_with("PID") {
                "process"
            } else {
                "container"
            },
            stats.process
        );
        if stats.tcp_connections > 0 {
            crate::outln!(
                "  {} established TCP connections kept{}",
                stats.tcp_connections,
                if leave_running {
                    ""
                } else {
                    " (locked off the network until restored)"
                }
            );
        }
        crate::outln!(
            "  frozen {}  (freeze {}), total {}",
            report::ms(stats.frozen_us),
            report::ms(stats.freeze_us),
            report::ms(stats.total_us)
        );
        crate::outln!(
            "  pages: {} stored, {} zero, {} never touched; {} raw -> {} stored ({})",
            stats.pages_data,
            stats.pages_zero,
            stats.pages_skipped,
            report::bytes(stats.bytes_raw),
            report::bytes(stats.bytes_stored),
            stats.compression
        );
    }
    Ok(exit::OK)
}

#[derive(Serialize)]
struct RestoreReport {
    #[serde(flatten)]
    stats: stasis_restore::Stats,
    container: Option<containers::Listed>,
    detached: bool,
    exit_status: Option<i32>,
}

/// What `stasis restore` was asked for besides the image.
struct RestoreFlags {
    detach: bool,
    name: Option<String>,
    memory: Option<String>,
    verify_first: bool,
    cgroup_parent: Option<String>,
    json: bool,
}

fn restore(
    state: &stasis_runtime::container::StateDir,
    path: PathBuf,
    flags: RestoreFlags,
) -> Result<i32> {
    let started = std::time::Instant::now();
    let RestoreFlags {
        detach,
        name,
        memory,
        verify_first,
        cgroup_parent,
        json,
    } = flags;
    let image = open_image(&path)?;
    let kind = stasis_workload::destination::kind_of(&image);
    let not_for = |flag: String, for_what: &str| {
        let kind = match kind {
            stasis_workload::Kind::Container => "a container image",
            _ => "an image of a process tree",
        };
        exit::usage(format!(
            "{flag} is for {for_what}, but {} is {kind}",
            path.display()
        ))
    };
    if kind != stasis_workload::Kind::Vm {
        if let Some(m) = memory {
            return Err(not_for(format!("--memory {m}"), "VM images"));
        }
        if verify_first {
            return Err(not_for("--verify-first".into(), "VM images"));
        }
    }
    if let (stasis_workload::Kind::ProcessTree, Some(n)) = (kind, &name) {
        return Err(not_for(format!("--name {n}"), "container and VM images"));
    }
    if let Some(p) = &cgroup_parent {
        if kind != stasis_workload::Kind::Container {
            return Err(not_for(format!("--cgroup-parent {p}"), "container images"));
        }
        stasis_runtime::container::check_cgroup_parent(p)
            .map_err(|e| exit::usage(e.to_string()))?;
    }
    let opts = stasis_workload::BuildOptions {
        name: name.as_deref(),
        tree: stasis_restore::Options {
            container_cgroup_parent: cgroup_parent,
            ..Default::default()
        },
        vm_memory: memory
            .as_deref()
            .map(stasis_runtime::cgroups::parse_size)
            .transpose()
            .context("--memory")?,
        vm_detach: detach,
        vm_quiet: json,
        vm_verify_first: verify_first,
        started,
        memory: None,
    };
    let image = std::sync::Arc::new(image);
    let restored = stasis_workload::build(state, image, &path, opts, None)
        .map_err(|e| restore_error(&path, e))?;
    let (stats, container) = match restored {
        stasis_workload::Restored::Vm(stats) => return vms::restored(&stats, json),
        stasis_workload::Restored::Tree(stats) => (stats, None),
        stasis_workload::Restored::Container(stats, rec) => (stats, Some(rec)),
    };
    let pid = stats.pid;
    for w in &stats.warnings {
        eprintln!("stasis: warning: {w}");
    }
    if detach {
        if json {
            report::json(&RestoreReport {
                stats,
                container: container.as_ref().map(containers::Listed::from),
                detached: true,
                exit_status: None,
            })?;
        } else if let Some(rec) = &container {
            crate::outln!("{}", rec.name);
        } else {
            crate::outln!("{pid}");
        }
        return Ok(exit::OK);
    }
    if !json {
        eprintln!(
            "stasis: restored PID {pid} in {} (verify {}); waiting for it to exit",
            report::ms(stats.total_us),
            report::ms(stats.verify_us)
        );
    }
    // A container in the foreground is like `stasis run`'s: Ctrl-C and SIGTERM reach its
    // init instead of leaving it behind without stasis.
    let status = match &container {
        Some(_) => stasis_runtime::sys::wait_forwarding(pid)?,
        None => stasis_restore::wait_exit(pid)?,
    };
    if let Some(rec) = &container {
        // `stasis stop` may have removed it already.
        match stasis_runtime::container::remove(state, &rec.name, true) {
            Ok(()) | Err(stasis_runtime::container::ContainerError::NoSuch(_)) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("removing container {} after it exited", rec.name))
            }
        }
    }
    if json {
        report::json(&RestoreReport {
            container: container.as_ref().map(containers::Listed::from),
            stats,
            detached: false,
            exit_status: Some(status),
        })?;
    }
    Ok(status)
}

/// One message naming the image and the reason: "image PATH is invalid: ..." for a bad
/// image, "restoring PATH: ..." otherwise (the exit code still follows the error's kind).
fn restore_error(path: &std::path::Path, e: stasis_workload::WorkloadError) -> anyhow::Error {
    use stasis_restore::RestoreError;
    let e = match e {
        stasis_workload::WorkloadError::Restore(e) => e,
        e => return anyhow::Error::new(e).context(format!("restoring {}", path.display())),
    };
    match e {
        RestoreError::Image(e) => bad_image(path, e),
        RestoreError::Invalid(what) => {
            anyhow::Error::new(exit::bad_image(what)).context(invalid_msg(path))
        }
        e => anyhow::Error::new(e).context(format!("restoring {}", path.display())),
    }
}

fn invalid_msg(path: &std::path::Path) -> String {
    if path.as_os_str() == "-" {
        return "the image on standard input is invalid".into();
    }
    format!("image {} is invalid", path.display())
}

/// An image error as "image PATH is invalid: <what and where>", or (a file that cannot be
/// opened or read) as the I/O error naming the file.
fn bad_image(path: &std::path::Path, e: stasis_image::ImageError) -> anyhow::Error {
    match e {
        e @ stasis_image::ImageError::File { .. } => e.into(),
        e => anyhow::Error::new(e).context(invalid_msg(path)),
    }
}

/// The image's contents, and every chunk of page data checked: a corrupt chunk is named and
/// makes the exit code 3, after everything that could be read was shown.
fn inspect(path: PathBuf, json: bool) -> Result<i32> {
    #[derive(Serialize)]
    struct Inspected {
        #[serde(flatten)]
        report: stasis_image::inspect::InspectReport,
        /// What does not check, each naming its offset (empty: all is well).
        corrupt: Vec<String>,
    }
    let image = open_image(&path)?;
    let mut corrupt: Vec<String> = image
        .verify_structure()
        .err()
        .map(|e| e.to_string())
        .into_iter()
        .collect();
    corrupt.extend(image.corrupt_chunks().iter().map(|e| e.to_string()));
    let rep = stasis_image::inspect::report(&image);
    if json {
        report::json(&Inspected {
            report: rep,
            corrupt: corrupt.clone(),
        })?;
    } else {
        report::out(&rep.to_string());
    }
    if corrupt.is_empty() {
        return Ok(exit::OK);
    }
    for c in &corrupt {
        eprintln!("stasis: image {} is corrupt: {c}", path.display());
    }
    Err(exit::bad_image(format!(
        "{} of its frames do not check (listed above); what was shown of them is not to be \
         trusted",
        corrupt.len()
    )))
    .context(invalid_msg(&path))
}

/// What `image verify --json` prints.
#[derive(Serialize)]
struct Verified {
    file: String,
    ok: bool,
    #[serde(flatten)]
    report: Option<stasis_image::VerifyReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn verify(path: &std::path::Path, json: bool) -> Result<i32> {
    let checked = verify_report(path);
    if !json {
        let rep = checked?;
        crate::outln!(
            "{}: OK ({} frames, {} bytes)",
            path.display(),
            rep.frames,
            rep.file_bytes
        );
        return Ok(exit::OK);
    }
    let (report, error, code) = match checked {
        Ok(rep) => (Some(rep), None, exit::OK),
        Err(e) => {
            let code = exit::code_for(&e);
            (None, Some(format!("{e:#}")), code)
        }
    };
    let failed = error.is_some();
    report::json(&Verified {
        file: path.display().to_string(),
        ok: !failed,
        report,
        error: error.clone(),
    })?;
    if let Some(e) = error {
        eprintln!("stasis: error: {e}");
    }
    Ok(code)
}

/// Verifies the image at `path` ("-": a stream on standard input).
fn verify_report(path: &std::path::Path) -> Result<stasis_image::VerifyReport> {
    if path.as_os_str() == "-" {
        // A stream (e.g. `stasis checkpoint PID -o - | stasis image verify -`).
        return stasis_image::verify_stream(std::io::BufReader::with_capacity(
            1 << 20,
            std::io::stdin().lock(),
        ))
        .map_err(|e| bad_image(path, e));
    }
    let image = open_image(path)?;
    let mut rep = image.verify().map_err(|e| bad_image(path, e))?;
    rep.file_bytes = image.file_len();
    Ok(rep)
}

/// Opens an image; a corrupt one is reported as "image PATH is invalid: <what and where>".
pub(crate) fn open_image(path: &std::path::Path) -> Result<Image> {
    Image::open(path).map_err(|e| bad_image(path, e))
}

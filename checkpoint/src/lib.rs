//! Checkpoint: freeze → collect → write.
//!
//! Turns a live process tree into the image model: [`tree`] seizes and stops every thread of
//! every process (walking the children of each frozen process) and guarantees all are
//! resumed exactly as they were if anything fails; [`collect`] reads each process's registers,
//! memory layout, files and signal state; [`descs`] finds the open file descriptions and pipes
//! the processes share and saves the bytes sitting in pipes; [`pages`] streams the memory
//! into the image writer. Only after the image is completely written and committed (synced)
//! are the processes killed; let run on (`leave_running`), they are resumed once every page is
//! written out of them, and the image is synced while they run.

pub mod collect;
pub mod container;
pub mod descs;
pub mod error;
pub mod fds;
pub mod freeze;
pub mod ghosts;
pub mod locks;
pub mod membership;
pub mod mmflags;
pub mod pages;
pub mod pidns;
pub mod seccomp;
pub mod sink;
pub mod sockets;
pub mod tcp;
pub mod tree;
pub mod vm;
pub mod vmas;

pub use error::CheckpointError;
pub use sink::{FileSink, ImageSink, StreamSink};

use serde::Serialize;
use stasis_image::{Compression, ImageWriter};
use std::time::Instant;

/// How to checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Let the process run on after the checkpoint instead of killing it.
    pub leave_running: bool,
    pub compression: Compression,
    /// Keep established TCP connections (locked off the network, read with TCP_REPAIR);
    /// without it a tree holding one is refused.
    pub tcp_established: bool,
    /// Set when the tree is a container's (see [`container`]): carried in the inventory.
    pub container: Option<stasis_image::proto::Container>,
    /// (st_dev, st_ino) of a file that standard output/error may point to and that belongs
    /// to the runtime rather than the workload (a container's log): such fds are recorded
    /// as inherited, and restore gives them the new log.
    pub stdio_log: Option<(u64, u64)>,
}

/// Measurements of one checkpoint (all times in microseconds).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// PID of the root process.
    pub pid: i32,
    pub processes: u64,
    pub threads: u64,
    /// How the tree was stopped: its cgroup's freezer, or "ptrace" (seized process by
    /// process, each frozen before its children are listed).
    pub freezer: String,
    /// Seize until the process was stopped.
    pub freeze_us: u64,
    /// Stopped until it was resumed or killed.
    pub frozen_us: u64,
    pub total_us: u64,
    pub vmas: u64,
    pub fds: u64,
    /// Established TCP connections kept (TCP_REPAIR).
    pub tcp_connections: u64,
    /// Pages written with their contents.
    pub pages_data: u64,
    /// Present pages that were all zero (recorded, not stored).
    pub pages_zero: u64,
    /// Pages never touched (not present, not recorded).
    pub pages_skipped: u64,
    pub bytes_raw: u64,
    pub bytes_stored: u64,
    pub image_bytes: u64,
    pub compression: String,
    /// "killed" or "running".
    pub process: String,
    /// Time spent collecting state, streaming pages, committing the image, and killing.
    pub collect_us: u64,
    pub pages_us: u64,
    pub commit_us: u64,
    pub kill_us: u64,
    /// Peak resident memory of this (the checkpointing) process, KiB (VmHWM).
    pub peak_rss_kib: u64,
}

/// Peak resident set size of this process in KiB (VmHWM), 0 if unknown.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Progress reports: (bytes of memory done, bytes to do).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// Checkpoints the process tree rooted at `pid` into `sink`. On success the image is
/// committed, and then every process is killed (default); with `leave_running` every process
/// is resumed once its pages are written out, before the commit (an error committing then
/// leaves them running). On failure every process is resumed exactly as it was, and nothing
/// is left behind in the sink.
pub fn checkpoint_tree<S: ImageSink>(
    pid: i32,
    opts: &Options,
    mut sink: S,
    progress: Progress<'_>,
) -> Result<Stats, CheckpointError> {
    let t0 = Instant::now();
    let kind = collect::precheck(pid)?;
    if kind == pidns::RootKind::Ours && opts.container.is_none() {
        pidns::check_root_namespaces(pid)?;
    }
    // Declared before `frozen` so it is dropped after it: a Ctrl-C during the checkpoint
    // takes effect only once the process has been resumed or killed.
    let _signals = stasis_runtime::sys::TerminationSignalsBlocked::new()?;
    // Declared before `frozen`, so released after the tree is resumed: new connections to
    // the tree's listeners wait until then, and the tree is frozen with their queues empty.
    let hold = match opts.tcp_established {
        true => tcp::Hold::start(pid, &tree::members(pid))?,
        false => None,
    };
    let mut frozen = match &hold {
        Some(h) => h.freeze_drained(|| tree::FrozenTree::freeze(pid))?,
        None => tree::FrozenTree::freeze(pid)?,
    };
    let freeze_us = t0.elapsed().as_micros() as u64;
    let t_frozen = Instant::now();

    let result = (|| -> Result<(Stats, S, Option<tcp::Repaired>), CheckpointError> {
        let tc = Instant::now();
        let pids = pidns::PidView::of(&frozen, pid, kind)?;
        let mut ghosts = ghosts::Ghosts::default();
        let mut procs = Vec::with_capacity(frozen.procs.len() + frozen.zombies.len());
        for f in frozen.procs.iter_mut() {
            procs.push(collect::collect_process(f, &mut ghosts)?);
        }
        let host_shm = vmas::check_sysv_namespace(&procs, opts.container.is_some())?;
        if opts.container.is_none() {
            vmas::check_sysv_attaches(&procs, &host_shm)?;
        }
        membership::record(&mut procs)?;
        procs.extend(frozen.zombies.iter().map(tree::Zombie::to_proto));
        // A detached container's standard I/O leads only to its log.
        descs::link(
            &mut procs,
            opts.container.is_some() && opts.stdio_log.is_some(),
        )?;
        if let Some(log) = opts.stdio_log {
            fds::inherit_log(&mut procs, log);
        }
        // Ghost files belong to the tree; the root's record carries them.
        procs[0].ghost_files = ghosts.files.clone();
        // Last before writing: from here the connections are off the network.
        let repaired = tcp::repair(&mut procs, opts.tcp_established)?;
        let mut plan = pages::plan(&procs, &ghosts)?;
        // Everything above looks at the processes by host PID; the image holds the PIDs
        // they see.
        plan.set_process_ids(pids.process_ids(&procs));
        pids.translate(&mut procs)?;
        let collect_us = tc.elapsed().as_micros() as u64;
        let tp = Instant::now();
        let mut inventory =
            collect::inventory(pids.image_pid(pid)?, pids.is_namespace(), &opts.compression);
        inventory.host_sysv_shm = host_shm.iter().map(container::shm_to_proto).collect();
        if let (Some(h), false) = (&hold, opts.leave_running) {
            inventory.held_ports = h.ports().iter().map(|&p| u32::from(p)).collect();
        }
        if let Some(c) = &opts.container {
            // Its IPC namespace's objects, read now that nothing in it runs.
            let ipc = stasis_runtime::sysvipc::capture(pid)?;
            vmas::check_sysv_attaches(&procs, &ipc.shm)?;
            inventory.kind = stasis_image::proto::WorkloadKind::Container as i32;
            inventory.container = Some(stasis_image::proto::Container {
                ipc: Some(container::ipc_to_proto(&ipc)),
                ..c.clone()
            });
        }
        sink.write_behind(!opts.leave_running);
        let mut writer = ImageWriter::new(sink, &inventory, opts.compression)?;
        for p in &procs {
            writer.write_process(p)?;
        }
        // A failpoint for tests at every progress report of the pages phase.
        let report = |done: u64, total: u64| {
            stasis_runtime::failpoints::hit("pages-progress");
            progress(done, total)
        };
        let dumped = pages::dump(&plan, writer, &report)?;
        let (mut sink, ws) = dumped;
        if let Some(sig) = stasis_runtime::sys::termination_pending() {
            return Err(CheckpointError::Interrupted(sig));
        }
        let pages_us = tp.elapsed().as_micros() as u64;
        // Killed only once the image is durable; left running, it is resumed first (every
        // page is already out of it) and the image is synced while it runs.
        let commit_us = match opts.leave_running {
            true => 0,
            false => commit(&mut sink)?,
        };
        let stats = Stats {
            pid,
            processes: procs.len() as u64,
            freezer: frozen
                .freezer
                .clone()
                .unwrap_or_else(|| "ptrace".to_string()),
            threads: procs.iter().map(|p| p.threads.len() as u64).sum(),
            vmas: procs.iter().map(|p| p.vmas.len() as u64).sum(),
            fds: procs.iter().map(|p| p.fds.len() as u64).sum(),
            tcp_connections: repaired.as_ref().map_or(0, |r| r.count() as u64),
            pages_data: ws.data_pages,
            pages_zero: ws.zero_pages,
            pages_skipped: plan.pages_skipped,
            bytes_raw: ws.raw_bytes,
            bytes_stored: ws.stored_bytes,
            image_bytes: ws.image_bytes,
            compression: opts.compression.to_string(),
            collect_us,
            pages_us,
            commit_us,
            ..Default::default()
        };
        Ok((stats, sink, repaired))
    })();

    match result {
        Ok((mut stats, mut sink, repaired)) => {
            if opts.leave_running {
                // Out of repair mode before the processes can touch their sockets.
                if let Some(r) = repaired {
                    r.release_running();
                }
                frozen.resume()?;
                stats.frozen_us = t_frozen.elapsed().as_micros() as u64;
                drop(hold);
                // Runs on if this fails; the partial image is removed with the sink.
                stats.commit_us = commit(&mut sink)?;
                stats.process = "running".into();
            } else {
                let tk = Instant::now();
                frozen.kill()?;
                // Closed in repair mode, only now that no process holds them; they stay
                // locked until restored.
                if let Some(r) = repaired {
                    r.release_killed();
                }
                // New connections wait for the restored listeners.
                if let Some(h) = hold {
                    h.keep();
                }
                stats.kill_us = tk.elapsed().as_micros() as u64;
                stats.frozen_us = t_frozen.elapsed().as_micros() as u64;
                stats.process = "killed".into();
            }
            stats.peak_rss_kib = peak_rss_kib();
            stats.freeze_us = freeze_us;
            stats.total_us = t0.elapsed().as_micros() as u64;
            Ok(stats)
        }
        Err(e) => {
            // The sink is dropped uncommitted (a file sink removes its temporary file).
            let resumed = frozen.resume();
            // A Ctrl-C that stopped us is reported, not left pending to kill us on unblock.
            let e = match stasis_runtime::sys::take_termination_signal() {
                Some(sig) => CheckpointError::Interrupted(sig),
                None => e,
            };
            if let Err(resume_err) = resumed {
                return Err(CheckpointError::ResumeFailed {
                    pid,
                    cause: Box::new(e),
                    resume: resume_err,
                });
            }
            Err(e)
        }
    }
}

/// Makes the image durable and visible under its name; returns how long that took (us).
fn commit<S: ImageSink>(sink: &mut S) -> Result<u64, CheckpointError> {
    let tm = Instant::now();
    // Tests hold stasis here (FAILPOINTS="image-syncing=sleep(N)") to see the workload's state
    // while its image is being synced.
    stasis_runtime::failpoints::hit("image-syncing");
    sink.commit()
        .map_err(|e| CheckpointError::Io("commit image".into(), e))?;
    stasis_runtime::failpoints::hit("image-committed");
    Ok(tm.elapsed().as_micros() as u64)
}

//! Checkpoint: freeze → collect → write.
//!
//! Turns a live process into the image model: [`freeze`] seizes and stops it and guarantees
//! it is resumed exactly as it was if anything fails; [`collect`] reads its registers, memory
//! layout, files and signal state; [`pages`] streams its memory into the image writer. Only
//! after the image is completely written and committed (synced) is the process killed or let
//! run on.

pub mod collect;
pub mod error;
pub mod fds;
pub mod freeze;
pub mod ghosts;
pub mod pages;
pub mod sink;
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
}

/// Measurements of one checkpoint (all times in microseconds).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub pid: i32,
    /// Seize until the process was stopped.
    pub freeze_us: u64,
    /// Stopped until it was resumed or killed.
    pub frozen_us: u64,
    pub total_us: u64,
    pub vmas: u64,
    pub fds: u64,
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

/// Checkpoints one process into `sink`. On success the image is committed, and then the
/// process is killed (default) or resumed (`leave_running`). On failure the process is
/// resumed exactly as it was, and nothing is left behind in the sink.
pub fn checkpoint_process<S: ImageSink>(
    pid: i32,
    opts: &Options,
    sink: S,
    progress: Progress<'_>,
) -> Result<Stats, CheckpointError> {
    let t0 = Instant::now();
    collect::precheck(pid)?;
    // Declared before `frozen` so it is dropped after it: a Ctrl-C during the checkpoint
    // takes effect only once the process has been resumed or killed.
    let _signals = stasis_runtime::sys::TerminationSignalsBlocked::new()?;
    let mut frozen = freeze::Frozen::freeze(pid)?;
    let freeze_us = t0.elapsed().as_micros() as u64;
    let t_frozen = Instant::now();

    let result = (|| -> Result<(Stats, S), CheckpointError> {
        let tc = Instant::now();
        let mut ghosts = ghosts::Ghosts::default();
        let process = collect::collect_process(&mut frozen, &mut ghosts)?;
        let plan = pages::plan(pid, &process, &ghosts)?;
        let collect_us = tc.elapsed().as_micros() as u64;
        let tp = Instant::now();
        let inventory = collect::inventory(pid, &opts.compression);
        let mut writer = ImageWriter::new(sink, &inventory, opts.compression)?;
        writer.write_process(&process)?;
        let dumped = pages::dump(pid, &plan, writer, progress)?;
        let (mut sink, ws) = dumped;
        if let Some(sig) = stasis_runtime::sys::termination_pending() {
            return Err(CheckpointError::Interrupted(sig));
        }
        let pages_us = tp.elapsed().as_micros() as u64;
        let tm = Instant::now();
        sink.commit()
            .map_err(|e| CheckpointError::Io("commit image".into(), e))?;
        let commit_us = tm.elapsed().as_micros() as u64;
        let stats = Stats {
            pid,
            vmas: process.vmas.len() as u64,
            fds: process.fds.len() as u64,
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
        Ok((stats, sink))
    })();

    match result {
        Ok((mut stats, _sink)) => {
            if opts.leave_running {
                frozen.resume()?;
                stats.process = "running".into();
            } else {
                let tk = Instant::now();
                frozen.kill()?;
                stats.kill_us = tk.elapsed().as_micros() as u64;
                stats.process = "killed".into();
            }
            stats.peak_rss_kib = peak_rss_kib();
            stats.freeze_us = freeze_us;
            stats.frozen_us = t_frozen.elapsed().as_micros() as u64;
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

//! Checkpoint: freeze → collect → write.
//!
//! Turns a live process tree into the image model: [`tree`] seizes and stops every thread of
//! every process (walking the children of each frozen process) and guarantees all are
//! resumed exactly as they were if anything fails; [`collect`] reads each process's registers,
//! memory layout, files and signal state; [`descs`] finds the open file descriptions and pipes
//! the processes share and saves the bytes sitting in pipes; [`pages`] streams the memory
//! into the image writer. [`session`] and [`container::ContainerSession`] expose those steps
//! one at a time; [`vm`] does the same for VMs. The sequences (when to commit, resume or
//! kill) belong to the workload interface (`stasis-workload`).

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
pub mod precopy;
pub mod seccomp;
pub mod session;
pub mod sink;
pub mod sockets;
pub mod tcp;
pub mod tree;
pub mod vm;
pub mod vmas;

pub use error::CheckpointError;
pub use session::TreeSession;
pub use sink::{FilePages, FileSink, ImageSink, PageSink, Ranges, StreamSink};

use serde::Serialize;
use stasis_image::Compression;

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
    /// Pages of mappings that went ahead in pre-copy rounds (not in the image; their
    /// mappings' size).
    pub pages_precopied: u64,
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

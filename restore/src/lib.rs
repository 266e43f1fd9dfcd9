//! Restore: read → validate → plan → apply → resume.
//!
//! [`validate`] checks the whole image and this machine (every hash, every PID is free, the
//! files exist, the CPU and vDSO match) before anything is created. [`ghosts`] and [`shmem`]
//! recreate deleted files and shared anonymous memory once for the tree; [`plan`] prepares
//! the open file descriptions the processes share (files, pipes refilled with their bytes)
//! and the tree's shape, sessions and groups. [`apply`] forks the tree with its original PIDs
//! (clone3 set_tid, each parent forking its own children), replaces each address space
//! through injected syscalls, writes the pages, restores signal state, rseq and registers,
//! and lets every process run only once all are built. A failure at any point kills
//! everything created; the image is never modified.

pub mod apply;
pub mod error;
pub mod events;
pub mod ghosts;
pub mod pages;
pub mod plan;
pub mod shmem;
pub mod validate;

pub use error::RestoreError;

use serde::Serialize;
use stasis_image::Image;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How to restore.
#[derive(Debug, Clone)]
pub struct Options {
    /// Standard I/O fds the image marks as inherited: image fd → this process's fd to pass.
    /// Fds not listed get this process's fd of the same number.
    pub inherit_fds: BTreeMap<u32, i32>,
    /// How long to wait for the original PID to be released (a killed original may still be
    /// an unreaped zombie for a few seconds).
    pub pid_wait: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            inherit_fds: BTreeMap::new(),
            pid_wait: Duration::from_secs(10),
        }
    }
}

/// Measurements of one restore (microseconds).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// PID of the root process.
    pub pid: i32,
    pub processes: u64,
    /// Checking every byte of the image.
    pub verify_us: u64,
    /// Waiting for the original PID to be released.
    pub pid_wait_us: u64,
    /// From the start until the process runs again.
    pub total_us: u64,
    pub vmas: u64,
    pub pages_written: u64,
    pub bytes_written: u64,
    /// Established TCP connections rebuilt (TCP_REPAIR) and unlocked.
    pub tcp_connections: u64,
    /// Things that went wrong after the tree was running again (it runs on regardless).
    pub warnings: Vec<String>,
}

/// Restores the process tree of `image`. Returns when every process runs again (the root is
/// our child; the caller waits for it or leaves it).
pub fn restore_tree(image: &Image, opts: &Options) -> Result<Stats, RestoreError> {
    let t0 = Instant::now();
    let procs = validate::processes(image)?;
    let pid = procs[0].pid as i32;
    let tv = Instant::now();
    image.verify().map_err(RestoreError::Image)?;
    let verify_us = tv.elapsed().as_micros() as u64;
    let ghost_files = validate::ghost_files(&procs);
    for p in &procs {
        validate::process(image, p, &ghost_files)?;
    }
    validate::unix_pairs(&procs)?;
    let ghosts = ghosts::recreate(image, &procs)?;
    let shmem = shmem::recreate(image, &procs)?;
    let plan = plan::plan(&procs, opts, &ghosts, &shmem)?;
    let tw = Instant::now();
    for p in &procs {
        validate::wait_pid_free(p.pid as i32, opts.pid_wait)?;
        for t in p.threads.iter().skip(1) {
            validate::wait_pid_free(t.tid as i32, opts.pid_wait)?;
        }
    }
    let pid_wait_us = tw.elapsed().as_micros() as u64;
    let written = apply::apply(image, &procs, plan, &ghosts, &shmem)?;
    // The connections run again: let their packets through (a checkpoint that killed the
    // tree left them locked).
    let tcp = tcp_tuples(&procs);
    let mut warnings = Vec::new();
    if let Err(e) = stasis_runtime::netlock::unlock(&tcp) {
        warnings.push(format!(
            "the restored TCP connections may still be locked off the network: {e}"
        ));
    }
    Ok(Stats {
        tcp_connections: tcp.len() as u64,
        warnings,
        pid,
        processes: procs.len() as u64,
        verify_us,
        pid_wait_us,
        total_us: t0.elapsed().as_micros() as u64,
        vmas: procs.iter().map(|p| p.vmas.len() as u64).sum(),
        pages_written: written.pages,
        bytes_written: written.bytes,
    })
}

/// Local and peer address of every TCP connection of the tree, once each.
fn tcp_tuples(procs: &[&stasis_image::proto::Process]) -> Vec<stasis_runtime::netlock::Tuple> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for p in procs {
        for (f, c) in p.fds.iter().filter_map(|f| Some((f, f.tcp.as_ref()?))) {
            let local = events::socket_addr(p, &c.ip, c.port);
            let peer = events::socket_addr(p, &c.peer_ip, c.peer_port);
            if let (Ok(l), Ok(r), true) = (local, peer, seen.insert(f.socket_id)) {
                out.push((l, r));
            }
        }
    }
    out
}

/// Waits for a restored child to exit; returns its exit code (128+signal if killed).
pub fn wait_exit(pid: i32) -> Result<i32, RestoreError> {
    loop {
        match stasis_runtime::ptrace::wait_stop(pid)? {
            stasis_runtime::ptrace::Stop::Exited(code) => return Ok(code),
            stasis_runtime::ptrace::Stop::Killed(sig) => return Ok(128 + sig),
            _ => continue,
        }
    }
}

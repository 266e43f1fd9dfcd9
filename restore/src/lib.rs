//! Restore: read → validate → plan → apply → resume.
//!
//! [`validate`] checks the whole image and this machine (every hash, the PID is free, the
//! files exist, the CPU and vDSO match) before anything is created. [`plan`] decides the new
//! process's fds, limits and the trampoline address. [`apply`] forks it with its original PID
//! (clone3 set_tid), replaces its address space through injected syscalls, writes its pages,
//! restores signal state, rseq and registers, and lets it run. A failure at any point kills
//! the half-built process; the image is never modified.

pub mod apply;
pub mod error;
pub mod ghosts;
pub mod pages;
pub mod plan;
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
    pub pid: i32,
    /// Checking every byte of the image.
    pub verify_us: u64,
    /// Waiting for the original PID to be released.
    pub pid_wait_us: u64,
    /// From the start until the process runs again.
    pub total_us: u64,
    pub vmas: u64,
    pub pages_written: u64,
    pub bytes_written: u64,
}

/// Restores the single process of `image`. Returns when it runs (it is our child; the caller
/// waits for it or leaves it).
pub fn restore_process(image: &Image, opts: &Options) -> Result<Stats, RestoreError> {
    let t0 = Instant::now();
    let process = validate::single_process(image)?;
    let pid = process.pid as i32;
    let tv = Instant::now();
    image.verify().map_err(RestoreError::Image)?;
    let verify_us = tv.elapsed().as_micros() as u64;
    validate::process(image, process)?;
    let ghosts = ghosts::recreate(image, process)?;
    let plan = plan::plan(process, opts, &ghosts)?;
    let tw = Instant::now();
    for t in &process.threads {
        validate::wait_pid_free(t.tid as i32, opts.pid_wait)?;
    }
    let pid_wait_us = tw.elapsed().as_micros() as u64;
    let written = apply::apply(image, process, &plan, &ghosts)?;
    Ok(Stats {
        pid,
        verify_us,
        pid_wait_us,
        total_us: t0.elapsed().as_micros() as u64,
        vmas: process.vmas.len() as u64,
        pages_written: written.pages,
        bytes_written: written.bytes,
    })
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

//! Snapshots from the VMM's side: pausing every vCPU and handing out their state, KVM's dirty
//! log of guest memory, and starting a VM from a saved state.
//!
//! Who writes the image: stasis, not the VMM. The VMM only pauses, reports state and dirty
//! pages, and resumes or stops; stasis reads guest memory straight out of the VMM's address
//! space (process_vm_readv at [`Paused::mem_host_addr`]), which works whether that memory is
//! the memfd or, after a restore, image pages mapped MAP_PRIVATE. So the VMM needs no image
//! code, and a checkpoint that fails on the stasis side leaves the VM running as it was
//! (the VMM resumes when the control connection closes without a `stop`).
//!
//! Control protocol (version 1, on the VM's socket, one line each way):
//! - `dirty-log start`: KVM_MEM_LOG_DIRTY_PAGES on slot 0 (pre-copy begins); answers a
//!   status report.
//! - `dirty-log fetch` (while logging): answers a [`Dirty`], the pages written since the
//!   last fetch or `dirty-log start` (each pre-copy round copies those while the guest runs).
//! - `pause`: kicks every vCPU out of KVM_RUN, completes their pending I/O, saves every
//!   vCPU's state, then the VM and device state and (when logging) the dirty pages since the
//!   last fetch, and answers a
//!   [`Paused`]. The connection stays open: the next line is `resume` (answered with a
//!   [`Resumed`]) or `stop` (the VM is torn down and its record removed; answered with the
//!   final status report). A closed connection, a timeout or anything else resumes.

use super::memory::GuestMemory;
use super::report::ReportState;
use super::serial::SerialState;
use super::state::{VcpuState, VmState};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The state of a paused VM (everything but its memory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub version: u32,
    pub name: String,
    pub guest: String,
    /// Bytes of guest memory (one slot at guest-physical 0).
    pub memory: u64,
    /// vCPU i at index i.
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialState,
    /// Each vCPU's report device, in vCPU order (one per vCPU).
    pub reports: Vec<ReportState>,
}

/// The answer to `pause`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    pub snapshot: VmSnapshot,
    /// The VMM process and where guest memory is mapped in it.
    pub pid: i32,
    pub mem_host_addr: u64,
    /// Pages written since `dirty-log start`, as (first page, pages) runs of guest-physical
    /// page numbers; None when the dirty log was not on.
    pub dirty: Option<Vec<(u64, u64)>>,
    /// Microseconds the VMM took to pause and save state (kick, KVM_GET_*, dirty log).
    pub pause_us: u64,
}

/// The answer to `dirty-log fetch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dirty {
    /// Pages written since the last fetch (or `dirty-log start`), as (first page, pages).
    pub runs: Vec<(u64, u64)>,
}

/// The answer to `resume`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    /// Microseconds the vCPU was out of KVM_RUN.
    pub paused_us: u64,
}

/// Fills a new VM's memory from a snapshot (maps or copies pages); runs in the VMM process
/// before the vCPU does.
pub type MemoryFill = dyn Fn(&str, &GuestMemory) -> Result<(), String> + Send + Sync;

/// Checks, while the restored guest already runs, what `fill` mapped without reading (the
/// image's page data hashes). An error stops the VM before its restore is confirmed.
pub type DeferredCheck = dyn Fn() -> Result<(), String> + Send + Sync;

/// A VM to start from a snapshot instead of booting.
#[derive(Clone)]
pub struct Restore {
    pub snapshot: VmSnapshot,
    pub fill: Arc<MemoryFill>,
    pub check: Option<Arc<DeferredCheck>>,
}

impl std::fmt::Debug for Restore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Restore")
            .field("name", &self.snapshot.name)
            .field("memory", &self.snapshot.memory)
            .finish()
    }
}

/// Turns KVM's dirty bitmap (bit i of word w = page 64w+i) into runs of pages.
pub fn dirty_runs(bitmap: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let i = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            let page = w as u64 * 64 + i;
            match runs.last_mut() {
                Some((start, n)) if *start + *n == page => *n += 1,
                _ => runs.push((page, 1)),
            }
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_to_runs() {
        assert!(dirty_runs(&[0, 0]).is_empty());
        assert_eq!(dirty_runs(&[0b1101]), vec![(0, 1), (2, 2)]);
        assert_eq!(dirty_runs(&[1 << 63, 1]), vec![(63, 2)]);
        assert_eq!(dirty_runs(&[u64::MAX, u64::MAX]), vec![(0, 128)]);
    }
}

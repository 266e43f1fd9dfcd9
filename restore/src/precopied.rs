//! Memory that went ahead of its image: a migration's pre-copy rounds sent the pages of a
//! tree's private anonymous mappings while it ran, and the receiver wrote them into regions
//! of its own memory ([`AnonRegion`]), one per mapping. The image marks those mappings
//! `precopied` and holds none of their pages.
//!
//! Every process of the tree is forked from the restorer and so inherits every region
//! (copy-on-write, nothing copied). Each keeps its own regions while its address space is
//! cleared, and moves each into place with mremap: the pages become its mapping's without
//! being copied. Once the restorer lets go of its regions the pages are the process's alone,
//! and its first write to each takes it over without a copy. A mapping that cannot be moved
//! (a stack that grows down, MAP_NORESERVE or MAP_DROPPABLE memory, memory the process
//! keeps from huge pages, or a region that lies where the process has a mapping of its own)
//! is made as usual and its pages copied in.

use crate::error::RestoreError;
use stasis_image::proto::{self, VmaKind};
use stasis_runtime::anon_region::AnonRegion;
use std::collections::BTreeMap;

/// The pre-copied memory of a tree: image PID → its mappings'.
#[derive(Debug, Default)]
pub struct Precopied {
    pub procs: BTreeMap<i32, Vec<PrecopiedMapping>>,
}

/// One mapping's pages, held in this process.
#[derive(Debug)]
pub struct PrecopiedMapping {
    /// The mapping [start, end) in the process.
    pub start: u64,
    pub end: u64,
    /// Its contents (end - start bytes), zero where nothing was sent.
    pub region: AnonRegion,
    /// The runs [start, end) of addresses that were sent (the rest reads zero).
    pub data: Vec<(u64, u64)>,
}

impl Precopied {
    /// The held pages of process `pid`'s mapping [start, end), if any.
    pub fn mapping(&self, pid: i32, start: u64, end: u64) -> Option<&PrecopiedMapping> {
        self.procs
            .get(&pid)?
            .iter()
            .find(|m| m.start == start && m.end == end)
    }

    /// The regions process `p` keeps while its address space is cleared, to move into place:
    /// none if one of them lies where `p` has a mapping (its pages are copied then).
    pub fn kept(&self, p: &proto::Process) -> Vec<(u64, u64)> {
        let Some(held) = self.procs.get(&(p.pid as i32)) else {
            return Vec::new();
        };
        // Only the regions of mappings the image says went ahead and that are moved into
        // place: any other is not the process's (one whose pages are copied is read from
        // the restorer's copy, and must not stay mapped in the process).
        let regions: Vec<(u64, u64)> = held
            .iter()
            .filter(|m| {
                p.vmas
                    .iter()
                    .any(|v| v.precopied && v.start == m.start && v.end == m.end && movable(p, v))
            })
            .map(|m| (m.region.addr(), m.region.addr() + m.region.len()))
            .collect();
        let clash = regions
            .iter()
            .any(|&(s, e)| p.vmas.iter().any(|v| v.start < e && s < v.end));
        if clash {
            Vec::new()
        } else {
            regions
        }
    }
}

/// Refuses an image that marks mappings of `p` precopied without their pages held here,
/// or marks any mapping but a private anonymous one so.
pub fn check(p: &proto::Process, held: Option<&Precopied>) -> Result<(), RestoreError> {
    for v in p.vmas.iter().filter(|v| v.precopied) {
        if v.kind() != VmaKind::AnonPrivate {
            return Err(RestoreError::Invalid(format!(
                "process {}: mapping {:#x}-{:#x} ({:?}) is marked pre-copied; only private \
                 anonymous memory can be",
                p.pid,
                v.start,
                v.end,
                v.kind()
            )));
        }
        if held
            .and_then(|h| h.mapping(p.pid as i32, v.start, v.end))
            .is_none()
        {
            return Err(RestoreError::Invalid(format!(
                "process {}: the pages of mapping {:#x}-{:#x} went ahead of the image in \
                 pre-copy rounds, and they are not held here (an image of a migration restores \
                 only on its receiver)",
                p.pid, v.start, v.end
            )));
        }
    }
    Ok(())
}

/// Whether `v`'s held pages may be moved into place: a plain private anonymous mapping
/// (what the region itself is), made no other way, in which huge pages are allowed (the
/// receiver makes blocks sent whole huge pages, see `stasis_migrate::process_pages`).
pub fn movable(p: &proto::Process, v: &proto::Vma) -> bool {
    let plain =
        crate::mmflags::anon_private_flags(v) == (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    plain && p.thp_disabled == 0 && !v.vm_flags.iter().any(|f| f == "nh")
}

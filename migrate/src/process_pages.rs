//! The destination's side of a process tree's pre-copy rounds: each process's private
//! anonymous mappings, as the source lists them, are held in regions of the receiving
//! worker's own memory, and the pages of each round are written into them. The restore
//! moves each region into its process without copying it (see
//! [`stasis_restore::precopied`]).
//!
//! Everything here comes from the peer: processes, mappings and bytes are bounded, every
//! range is checked to lie inside what was announced, and nothing is written outside a
//! region.

use crate::protocol::{RANGES_MAPPINGS, RANGES_ZERO};
use stasis_restore::{Precopied, PrecopiedMapping};
use stasis_runtime::anon_region::{AnonRegion, PMD_SIZE};
use std::collections::BTreeMap;

const PAGE: u64 = 4096;
/// The highest user address on x86_64 (4-level paging).
const TASK_SIZE: u64 = 0x7fff_ffff_f000;
/// The most processes whose pages are held.
const MAX_PROCESSES: usize = 4096;
/// The most mappings held of one process (the kernel's default vm.max_map_count).
const MAX_MAPPINGS: usize = 65530;

/// One mapping's region and which of its pages were sent.
struct Held {
    start: u64,
    end: u64,
    region: AnonRegion,
    /// One bit per page: sent (and not zeroed since).
    sent: Vec<u64>,
    /// The offset of the region's first whole 2 MiB block, and per block the pages sent
    /// in it and whether it was collapsed into a huge page (see [`Held::collapse_full`]).
    first_block: u64,
    blocks: Vec<(u16, bool)>,
}

/// Pages in a 2 MiB block.
const BLOCK_PAGES: u16 = (PMD_SIZE / PAGE) as u16;

impl Held {
    fn new(start: u64, end: u64, region: AnonRegion) -> Held {
        let words = ((end - start) / PAGE).div_ceil(64) as usize;
        let blocks: Vec<u64> = region.blocks().collect();
        Held {
            start,
            end,
            first_block: blocks.first().copied().unwrap_or(u64::MAX),
            blocks: vec![(0, false); blocks.len()],
            region,
            sent: vec![0; words],
        }
    }

    /// The whole block page `page` (of the region) lies in, if any.
    fn block_of(&self, page: u64) -> Option<usize> {
        let off = (page * PAGE).checked_sub(self.first_block)?;
        let i = (off / PMD_SIZE) as usize;
        (i < self.blocks.len()).then_some(i)
    }

    fn mark(&mut self, start: u64, end: u64, on: bool) {
        for page in (start - self.start) / PAGE..(end - self.start) / PAGE {
            let (word, bit) = ((page / 64) as usize, page % 64);
            let Some(w) = self.sent.get_mut(word) else {
                continue;
            };
            let was = *w & (1 << bit) != 0;
            if on {
                *w |= 1 << bit;
            } else {
                *w &= !(1 << bit);
            }
            if was != on {
                if let Some(b) = self.block_of(page) {
                    let (n, collapsed) = &mut self.blocks[b];
                    *n = if on { *n + 1 } else { *n - 1 };
                    // A huge page partly given back is split by the kernel.
                    *collapsed &= on;
                }
            }
        }
    }

    /// Makes each whole 2 MiB block of [start, end) whose every page was sent one huge
    /// page, once: the restored process inherits, moves and is charged for it as one
    /// entry instead of 512 (fork and mremap of 1 GiB of small pages take ~15 ms while the
    /// workload is down). Only blocks sent whole: memory the workload never had stays
    /// unallocated.
    fn collapse_full(&mut self, start: u64, end: u64) {
        if self.blocks.is_empty() {
            return;
        }
        // The blocks [start, end) reaches into.
        let from = (start - self.start).saturating_sub(self.first_block) / PMD_SIZE;
        let to = (end - self.start)
            .saturating_sub(self.first_block)
            .div_ceil(PMD_SIZE);
        for i in from as usize..(to as usize).min(self.blocks.len()) {
            if self.blocks[i] == (BLOCK_PAGES, false) {
                self.blocks[i].1 = true;
                let _ = self.region.collapse(self.first_block + i as u64 * PMD_SIZE);
            }
        }
    }

    /// The runs [start, end) of pages sent.
    fn runs(&self) -> Vec<(u64, u64)> {
        let pages = (self.end - self.start) / PAGE;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for page in 0..pages {
            let on = self
                .sent
                .get((page / 64) as usize)
                .is_some_and(|w| w & (1 << (page % 64)) != 0);
            if !on {
                continue;
            }
            let addr = self.start + page * PAGE;
            match runs.last_mut() {
                Some(r) if r.1 == addr => r.1 += PAGE,
                _ => runs.push((addr, addr + PAGE)),
            }
        }
        runs
    }
}

/// The pages of a tree's processes received so far.
pub struct ProcessPages {
    procs: BTreeMap<i32, Vec<Held>>,
    current: Option<i32>,
    /// Bytes of all regions (what the peer may make this worker hold).
    bytes: u64,
    limit: u64,
}

impl ProcessPages {
    /// Holds at most `limit` bytes of regions.
    pub fn new(limit: u64) -> Self {
        ProcessPages {
            procs: BTreeMap::new(),
            current: None,
            bytes: 0,
            limit,
        }
    }

    /// Bytes of all regions held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What follows is of process `pid`.
    pub fn process(&mut self, pid: i32) -> Result<(), String> {
        if pid <= 0 {
            return Err(format!("pages of process {pid}"));
        }
        if !self.procs.contains_key(&pid) && self.procs.len() >= MAX_PROCESSES {
            return Err(format!("pages of more than {MAX_PROCESSES} processes"));
        }
        self.procs.entry(pid).or_default();
        self.current = Some(pid);
        Ok(())
    }

    fn held(&mut self) -> Result<(i32, &mut Vec<Held>), String> {
        let pid = self
            .current
            .ok_or("ranges or pages sent before any process was named")?;
        let held = self
            .procs
            .get_mut(&pid)
            .ok_or("ranges or pages of a process not named")?;
        Ok((pid, held))
    }

    /// A ranges frame (see [`crate::protocol::ranges_of`]: ascending, apart, aligned).
    pub fn ranges(&mut self, op: u8, ranges: Vec<(u64, u64)>) -> Result<(), String> {
        match op {
            RANGES_MAPPINGS => self.mappings(ranges),
            RANGES_ZERO => {
                let (pid, held) = self.held()?;
                for (s, e) in ranges {
                    let h = containing(held, s, e).ok_or_else(|| outside(pid, s, e))?;
                    h.region
                        .zero(s - h.start, e - s)
                        .map_err(|err| format!("zeroing {s:#x}-{e:#x} of process {pid}: {err}"))?;
                    h.mark(s, e, false);
                }
                Ok(())
            }
            _ => Err(format!("ranges of unknown kind {op}")),
        }
    }

    /// The current process's mappings are `list` now.
    fn mappings(&mut self, list: Vec<(u64, u64)>) -> Result<(), String> {
        let limit = self.limit;
        let mut bytes = self.bytes;
        let (pid, held) = self.held()?;
        if list.len() > MAX_MAPPINGS || list.last().is_some_and(|&(_, e)| e > TASK_SIZE) {
            return Err(format!(
                "{} mappings of process {pid}, or one past the top of user memory",
                list.len()
            ));
        }
        // Nothing changes unless the whole list can be held.
        let kept = |h: &Held| list.binary_search(&(h.start, h.end)).is_ok();
        let dropped: u64 = held
            .iter()
            .filter(|h| !kept(h))
            .map(|h| h.end - h.start)
            .sum();
        let mut fresh = Vec::new();
        for &(s, e) in &list {
            if held.iter().any(|h| h.start == s && h.end == e) {
                continue;
            }
            bytes = bytes.saturating_add(e - s);
            if bytes.saturating_sub(dropped) > limit {
                return Err(format!(
                    "the workload is larger than this receiver takes ({limit} bytes)"
                ));
            }
            let region = AnonRegion::like(e - s, s)
                .map_err(|err| format!("holding mapping {s:#x}-{e:#x} of process {pid}: {err}"))?;
            fresh.push(Held::new(s, e, region));
        }
        held.retain(|h| kept(h));
        held.extend(fresh);
        held.sort_by_key(|h| h.start);
        self.bytes = bytes - dropped;
        Ok(())
    }

    /// Pages at `addr` of the current process.
    pub fn pages(&mut self, addr: u64, data: &[u8]) -> Result<(), String> {
        let (pid, held) = self.held()?;
        let end = addr
            .checked_add(data.len() as u64)
            .ok_or_else(|| outside(pid, addr, u64::MAX))?;
        let h = containing(held, addr, end).ok_or_else(|| outside(pid, addr, end))?;
        let off = (addr - h.start) as usize;
        let to = h
            .region
            .as_mut_slice()
            .get_mut(off..off + data.len())
            .ok_or_else(|| outside(pid, addr, end))?;
        to.copy_from_slice(data);
        h.mark(addr, end, true);
        h.collapse_full(addr, end);
        Ok(())
    }

    /// What the restore takes.
    pub fn finish(self) -> Precopied {
        let procs = self
            .procs
            .into_iter()
            .map(|(pid, held)| {
                let mappings = held
                    .into_iter()
                    .map(|h| PrecopiedMapping {
                        start: h.start,
                        end: h.end,
                        data: h.runs(),
                        region: h.region,
                    })
                    .collect();
                (pid, mappings)
            })
            .collect();
        Precopied { procs }
    }
}

fn containing(held: &mut [Held], start: u64, end: u64) -> Option<&mut Held> {
    held.iter_mut()
        .find(|h| h.start <= start && end <= h.end && start < end)
}

fn outside(pid: i32, start: u64, end: u64) -> String {
    format!("pages {start:#x}-{end:#x} of process {pid} lie outside every mapping it announced")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_land_in_announced_mappings_only_and_zero_ranges_clear_them() {
        let mut p = ProcessPages::new(64 * PAGE);
        assert!(p.pages(0x10000, &[1; 4096]).is_err(), "no process named");
        p.process(7).expect("process");
        assert!(
            p.pages(0x10000, &[1; 4096]).is_err(),
            "no mapping announced"
        );
        p.ranges(
            RANGES_MAPPINGS,
            vec![(0x10000, 0x14000), (0x20000, 0x21000)],
        )
        .expect("mappings");
        assert_eq!(p.bytes(), 5 * PAGE);
        p.pages(0x11000, &[1; 8192]).expect("inside");
        assert!(p.pages(0x13000, &[1; 8192]).is_err(), "runs past the end");
        assert!(p.pages(0x1f000, &[1; 4096]).is_err(), "between mappings");
        p.ranges(RANGES_ZERO, vec![(0x12000, 0x13000)])
            .expect("zero");
        assert!(p.ranges(RANGES_ZERO, vec![(0x30000, 0x31000)]).is_err());
        // Past the limit, and a mapping replaced by another starts zero.
        assert!(p
            .ranges(RANGES_MAPPINGS, vec![(0x100000, 0x100000 + 65 * PAGE)])
            .is_err());
        p.ranges(RANGES_MAPPINGS, vec![(0x10000, 0x14000)])
            .expect("one dropped");
        assert_eq!(p.bytes(), 4 * PAGE);
        let held = p.finish();
        let m = held.mapping(7, 0x10000, 0x14000).expect("held");
        assert_eq!(m.data, vec![(0x11000, 0x12000)]);
        assert_eq!(m.region.as_slice()[0x1000], 1);
        assert_eq!(m.region.as_slice()[0x2000], 0);
        assert!(held.mapping(7, 0x20000, 0x21000).is_none());
    }

    #[test]
    fn blocks_sent_whole_are_counted_and_partly_zeroed_ones_no_longer() {
        let mut p = ProcessPages::new(64 << 20);
        p.process(3).expect("process");
        // 3 MiB from 1 MiB on: one whole 2 MiB block at 2 MiB.
        p.ranges(RANGES_MAPPINGS, vec![(0x100000, 0x400000)])
            .expect("mappings");
        let page = vec![7u8; 4096];
        for a in (0x100000..0x400000).step_by(4096) {
            p.pages(a, &page).expect("pages");
        }
        let h = &p.procs[&3][0];
        assert_eq!(h.blocks, vec![(BLOCK_PAGES, true)]);
        p.ranges(RANGES_ZERO, vec![(0x300000, 0x301000)])
            .expect("zero");
        assert_eq!(p.procs[&3][0].blocks, vec![(BLOCK_PAGES - 1, false)]);
        let held = p.finish();
        let m = held.mapping(3, 0x100000, 0x400000).expect("held");
        assert_eq!(m.data, vec![(0x100000, 0x300000), (0x301000, 0x400000)]);
        assert!(m.region.as_slice()[0x1fffff] == 7 && m.region.as_slice()[0x200000] == 0);
    }
}

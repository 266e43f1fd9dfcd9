//! Pre-copy of a process tree's memory while it runs: each process's private anonymous
//! mappings are tracked with userfaultfd write-protect in async mode and scanned with
//! PAGEMAP_SCAN ([`stasis_runtime::write_tracking`]); each round sends what was written since
//! the round before into a [`PageSink`], and the last round, frozen, what was written since
//! the one before it.
//!
//! The tree is stopped once, briefly, to make each process a userfaultfd (injected, taken
//! out with pidfd_getfd and closed again in the process). From then on it runs; every round
//! follows its mappings as they are now: a mapping made, moved, resized or replaced since is
//! registered and sent whole (its copy on the other side starts from zero), one that is gone
//! is dropped. A process whose tracking fails (it exec'd, it uses userfaultfd on that
//! memory itself, ...) or that appeared after the start is left out: its memory goes in the
//! image as usual. After the last round, [`TreeTracking::covered`] says which mappings went
//! whole; the image marks exactly those (and only if the kernel still shows them tracked,
//! VmFlags `uw`) `precopied` and leaves their pages out.
//!
//! Dropping the tracking closes the userfaultfds: the kernel removes the registrations and
//! the write protection, and the processes run on as before.

use crate::error::CheckpointError;
use crate::sink::{PageSink, Ranges};
use crate::vm::Round;
use stasis_image::proto::{self, VmaKind};
use stasis_runtime::procfs::{self, MapEntry};
use stasis_runtime::write_tracking::{self, WriteTracker, Written};
use stasis_runtime::{memory, PAGE_SIZE};
use std::collections::BTreeMap;
use std::time::Instant;

/// Bytes read from a process and handed to the sink at once.
const PIECE: usize = 1 << 20;
/// Ranges read at once (the kernel's IOV_MAX).
const BATCH_RANGES: usize = 1024;
/// Zero ranges handed to the sink at once (well within a frame).
const ZERO_BATCH: usize = 65536;

/// The tracked memory of a process tree (see the module documentation).
pub struct TreeTracking {
    procs: Vec<Tracked>,
    /// After the last round: host PID → the mappings whose pages went whole.
    covered: Option<BTreeMap<i32, Vec<(u64, u64)>>>,
    buf: Vec<u8>,
    /// Processes left out at the start, and why (for the report).
    pub left_out: Vec<String>,
}

/// One process's tracking.
struct Tracked {
    pid: i32,
    /// Its PID as the image names it.
    image_pid: i32,
    tracker: WriteTracker,
    /// The mappings registered and sent whole once, ascending.
    ranges: Vec<(u64, u64)>,
    /// The list the sink was last told (None: never).
    told: Option<Vec<(u64, u64)>>,
    /// Tracking it failed: nothing more is sent, its mappings are settled as none.
    dropped: bool,
}

/// Whether the pre-copy rounds follow mapping `m`: private anonymous memory the process can
/// read and write (what else it maps goes in the image).
fn trackable(m: &MapEntry) -> bool {
    let anon = m.inode == 0
        && (m.name.is_empty()
            || m.name == "[heap]"
            || m.name == "[stack]"
            || m.name.starts_with("[anon:"));
    anon && !m.shared && m.read && m.write
}

impl TreeTracking {
    /// Stops the tree rooted at `root` for as long as it takes to give each process a
    /// userfaultfd, and lets it run on. Its memory is tracked from the first round on.
    pub fn start(root: i32) -> Result<Self, CheckpointError> {
        write_tracking::support().map_err(|why| CheckpointError::unsupported(root, why))?;
        let kind = crate::pidns::root_kind(root)?;
        let mut tree = crate::tree::FrozenTree::freeze(root)?;
        let mut procs = Vec::new();
        let mut left_out = Vec::new();
        for f in tree.procs.iter_mut() {
            let pid = f.pid();
            match inject(f, kind) {
                Ok((tracker, image_pid)) => procs.push(Tracked {
                    pid,
                    image_pid,
                    tracker,
                    ranges: Vec::new(),
                    told: None,
                    dropped: false,
                }),
                Err(e) => left_out.push(format!("process {pid}: {e}")),
            }
        }
        tree.resume()?;
        Ok(TreeTracking {
            procs,
            covered: None,
            buf: vec![0; PIECE],
            left_out,
        })
    }

    /// Copies one round into `to`: while the tree runs, or (`frozen`) the last round, after
    /// which [`TreeTracking::covered`] holds.
    pub fn round(&mut self, to: &mut dyn PageSink, frozen: bool) -> Result<Round, CheckpointError> {
        let t = Instant::now();
        let mut pages = 0;
        let mut covered = BTreeMap::new();
        for p in self.procs.iter_mut() {
            if !p.dropped {
                match p.plan(frozen) {
                    Ok(plan) => pages += p.send(plan, to, &mut self.buf, frozen)?,
                    Err(_) => p.dropped = true,
                }
            }
            if p.dropped {
                // Its copies on the other side are of no use any more.
                if p.told.as_ref().is_none_or(|t| !t.is_empty()) {
                    to.process(p.image_pid).map_err(sink_err)?;
                    to.ranges(Ranges::Mappings, &[]).map_err(sink_err)?;
                    p.told = Some(Vec::new());
                }
                continue;
            }
            if frozen {
                covered.insert(p.pid, p.ranges.clone());
            }
        }
        if frozen {
            self.covered = Some(covered);
        }
        Ok(Round {
            pages,
            us: t.elapsed().as_micros() as u64,
        })
    }

    /// After the last round: host PID → the mappings whose pages went whole in the rounds.
    pub fn covered(&self) -> Option<&BTreeMap<i32, Vec<(u64, u64)>>> {
        self.covered.as_ref()
    }
}

/// Gives frozen process `f` a userfaultfd and a tracker; returns them with its image PID.
fn inject(
    f: &mut crate::freeze::Frozen,
    kind: crate::pidns::RootKind,
) -> Result<(WriteTracker, i32), CheckpointError> {
    let pid = f.pid();
    let maps = procfs::read_maps(pid)?;
    let vdso = maps
        .iter()
        .find(|m| m.name == "[vdso]")
        .ok_or_else(|| CheckpointError::unsupported(pid, "the process has no [vdso] mapping"))?;
    let (_, syscall_ip) = crate::collect::vdso_facts(pid, vdso)?;
    let uffd = {
        let mut inj = f.injector(pid, syscall_ip)?;
        write_tracking::inject_userfaultfd(&mut inj, pid)
    };
    let put_back = f.put_back();
    let uffd = uffd?;
    put_back?;
    let image_pid = match kind {
        crate::pidns::RootKind::Ours => pid,
        _ => procfs::read_status(pid)?.own_pid().ok_or_else(|| {
            CheckpointError::unsupported(pid, format!("/proc/{pid}/status has no NSpid"))
        })?,
    };
    Ok((WriteTracker::new(pid, uffd)?, image_pid))
}

/// What one round sends of a process.
struct Plan {
    /// Its mappings after this round.
    ranges: Vec<(u64, u64)>,
    /// Ranges that read zero (mappings sent whole from zero: new, or replaced).
    zero: Vec<(u64, u64)>,
    /// Page ranges to send.
    send: Vec<(u64, u64)>,
}

impl Tracked {
    /// Follows its mappings as they are now and finds what to send. An error here means
    /// tracking it failed (it is dropped, not the migration).
    fn plan(&mut self, frozen: bool) -> Result<Plan, CheckpointError> {
        let maps = procfs::read_maps(self.pid)?;
        let mut plan = Plan {
            ranges: Vec::new(),
            zero: Vec::new(),
            send: Vec::new(),
        };
        for m in maps.iter().filter(|m| trackable(m)) {
            let r = (m.start, m.end);
            if self.ranges.binary_search(&r).is_ok() {
                let written = self.tracker.take_written(r.0, r.1, &mut plan.send)?;
                // (A page given back since it was sent, MADV_DONTNEED, counts as written:
                // it is sent again, as the zeros it reads now.)
                if written == Written::Ranges {
                    plan.ranges.push(r);
                    continue;
                }
            }
            // New, or not what was tracked there: registered and sent whole, from zero. Not
            // any more while frozen (it goes in the image).
            if frozen || self.tracker.track(r.0, r.1).is_err() {
                continue;
            }
            plan.zero.push(r);
            self.tracker.resident(r.0, r.1, &mut plan.send)?;
            plan.ranges.push(r);
        }
        self.ranges.clone_from(&plan.ranges);
        Ok(plan)
    }

    /// Sends `plan` into `to`; returns the pages sent. A page that cannot be read while it
    /// runs (unmapped meanwhile) drops its mapping from the tracked ones: the next round
    /// sees what is there now.
    fn send(
        &mut self,
        plan: Plan,
        to: &mut dyn PageSink,
        buf: &mut [u8],
        frozen: bool,
    ) -> Result<u64, CheckpointError> {
        to.process(self.image_pid).map_err(sink_err)?;
        if self.told.as_ref() != Some(&plan.ranges) {
            to.ranges(Ranges::Mappings, &plan.ranges)
                .map_err(sink_err)?;
            self.told = Some(plan.ranges.clone());
        }
        for batch in plan.zero.chunks(ZERO_BATCH) {
            to.ranges(Ranges::Zero, batch).map_err(sink_err)?;
        }
        let mut pages = 0;
        for batch in batches(&plan.send, buf.len()) {
            let len: usize = batch.iter().map(|r| r.1).sum();
            match memory::read_remote(self.pid, &batch, &mut buf[..len]) {
                Ok(()) => {
                    let mut at = 0;
                    for &(addr, n) in &batch {
                        to.pages(addr, &buf[at..at + n]).map_err(sink_err)?;
                        at += n;
                    }
                    pages += len as u64 / PAGE_SIZE;
                }
                Err(err) if frozen => return Err(err.into()),
                // Something was unmapped meanwhile: its mapping is sent whole next time
                // (or dropped, if it is gone).
                Err(_) => {
                    for &(addr, n) in &batch {
                        let end = addr + n as u64;
                        match memory::read_remote(self.pid, &[(addr, n)], &mut buf[..n]) {
                            Ok(()) => {
                                to.pages(addr, &buf[..n]).map_err(sink_err)?;
                                pages += n as u64 / PAGE_SIZE;
                            }
                            Err(_) => self.ranges.retain(|&(rs, re)| re <= addr || end <= rs),
                        }
                    }
                }
            }
        }
        Ok(pages)
    }
}

/// The page ranges `send`, cut into pieces of at most `most` bytes and grouped into batches
/// of at most `most` bytes and [`BATCH_RANGES`] ranges: one read each.
fn batches(send: &[(u64, u64)], most: usize) -> Vec<Vec<(u64, usize)>> {
    let mut out: Vec<Vec<(u64, usize)>> = Vec::new();
    let mut cur: Vec<(u64, usize)> = Vec::new();
    let mut bytes = 0;
    for &(s, e) in send {
        let mut at = s;
        while at < e {
            let n = ((e - at) as usize).min(most);
            if bytes + n > most || cur.len() == BATCH_RANGES {
                out.push(std::mem::take(&mut cur));
                bytes = 0;
            }
            cur.push((at, n));
            bytes += n;
            at += n as u64;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn sink_err(e: std::io::Error) -> CheckpointError {
    CheckpointError::Io("sending pages of a pre-copy round".into(), e)
}

/// Marks the mappings of `procs` (host PIDs, as collected) whose pages went whole in the
/// rounds (`covered`) `precopied`, if the kernel still shows them tracked (VmFlags `uw`):
/// the image leaves their pages out.
pub fn mark(procs: &mut [proto::Process], covered: &BTreeMap<i32, Vec<(u64, u64)>>) -> u64 {
    let mut pages = 0;
    for p in procs.iter_mut() {
        let Some(c) = covered.get(&(p.pid as i32)) else {
            continue;
        };
        for v in p.vmas.iter_mut() {
            let tracked = v.vm_flags.iter().any(|f| f == "uw");
            if v.kind() == VmaKind::AnonPrivate
                && tracked
                && c.binary_search(&(v.start, v.end)).is_ok()
            {
                v.precopied = true;
                pages += (v.end - v.start) / PAGE_SIZE;
            }
        }
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_read_in_batches_of_bounded_bytes_and_ranges() {
        let p = PAGE_SIZE;
        let b = batches(&[(0, 3 * p), (10 * p, 11 * p)], 2 * p as usize);
        let want: Vec<Vec<(u64, usize)>> = vec![
            vec![(0, 2 * p as usize)],
            vec![(2 * p, p as usize), (10 * p, p as usize)],
        ];
        assert_eq!(b, want);
        let many: Vec<(u64, u64)> = (0..2000).map(|i| (2 * i * p, (2 * i + 1) * p)).collect();
        let b = batches(&many, 1 << 30);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![1024, 976]);
    }
}

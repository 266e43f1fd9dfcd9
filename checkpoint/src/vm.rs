//! Checkpointing a KVM VM: its VMM pauses every vCPU and hands over the vCPUs', VM and device
//! state (see `stasis_runtime::kvm::snapshot`); stasis reads guest memory out of the VMM's
//! address space with process_vm_readv and writes the image (memory as page space GUEST:
//! zero pages recorded, not stored; chunks hashed, optionally compressed).
//!
//! Without `leave_running` the VM stays paused while its memory is written; once the image
//! is committed (synced) the VMM is told to stop, which removes its record. If anything
//! fails first, the VM is resumed as it was.
//!
//! With `leave_running` the pause covers only what must be consistent: KVM's dirty log is
//! turned on, all resident memory is copied into a staging buffer while the guest runs,
//! then the pages written meanwhile are copied again, round after round, while that set
//! shrinks; then the vCPU is paused, only the pages written since the last round are
//! copied, and the guest runs on while the image is written from the staging buffer.
//! The staging buffer holds the guest's resident memory, so it is bounded (by default half
//! of MemAvailable): a guest with more resident memory stays paused while its memory is
//! written, as without `leave_running`, and runs on once the image is committed.

use crate::error::CheckpointError;
use crate::pages::{DumpPlan, GuestSource};
use crate::sink::{ImageSink, PageSink};
use stasis_image::proto;
use stasis_image::{Compression, ImageWriter};
use stasis_runtime::container::StateDir;
use stasis_runtime::kvm::snapshot::VmSnapshot;
use stasis_runtime::kvm::vmm;
use stasis_runtime::memory::{self, Pagemap, PM_PRESENT, PM_SWAPPED};
use stasis_runtime::PAGE_SIZE;
use std::time::{Duration, Instant};

/// At most this many pre-copy rounds after the first full copy.
const MAX_PRECOPY_ROUNDS: u64 = 6;
/// Pre-copy stops once a round found at most this many pages written (4 MiB: a few
/// milliseconds to copy while paused).
const PAUSE_COPY_PAGES: u64 = 1024;

/// Measurements of one VM checkpoint (times in microseconds).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VmStats {
    pub name: String,
    pub memory: u64,
    /// The vCPU out of KVM_RUN: from the pause request until it ran again (leave_running)
    /// or until the image was committed (otherwise).
    pub pause_us: u64,
    /// Of which the VMM's own part: kick, state save, dirty log.
    pub vmm_pause_us: u64,
    /// Copying memory while the guest ran (leave_running).
    pub precopy_us: u64,
    /// Rounds of copying the pages written during the previous one, after the first.
    pub precopy_rounds: u64,
    /// Pages those rounds copied again.
    pub pages_recopied: u64,
    pub total_us: u64,
    pub pages_resident: u64,
    /// Pages written during the pre-copy, copied again while paused.
    pub pages_dirty: u64,
    pub pages_data: u64,
    pub pages_zero: u64,
    pub bytes_raw: u64,
    pub bytes_stored: u64,
    pub image_bytes: u64,
    pub compression: String,
    /// "stopped" or "running".
    pub vm: String,
    /// Whether guest memory was staged so the guest could run while the image was written
    /// (leave_running); false when its resident memory exceeded `staging_limit`.
    pub staged: bool,
    /// The most memory staging could take (leave_running), bytes.
    pub staging_limit: u64,
}

/// How to checkpoint a VM.
#[derive(Debug, Clone, Copy, Default)]
pub struct VmCheckpointOptions {
    /// Let the VM run on afterwards instead of stopping it.
    pub leave_running: bool,
    pub compression: Compression,
    /// With `leave_running`: the most memory (bytes) the copy of guest memory that lets the
    /// guest run while its image is written may take. None: half of MemAvailable.
    pub staging_limit: Option<u64>,
}

fn vm_err(name: &str, what: impl Into<String>) -> CheckpointError {
    CheckpointError::Vm {
        name: name.to_string(),
        what: what.into(),
    }
}

/// The dirty log of a VM whose memory is being copied while it runs, and where the copy
/// goes.
struct Tracking {
    /// Held until the pause takes the log; dropped first, it turns the log off again.
    log: vmm::DirtyLogSession,
    /// The VMM process and where guest memory is mapped in it.
    pid: i32,
    host: u64,
    /// Where the rounds copy to: Some, this staging copy of guest memory (a checkpoint that
    /// lets the VM run while its image is written); None, the caller's [`PageSink`] (a
    /// migration's connection). Holds every range in `copied`.
    staging: Option<Vec<u8>>,
    /// The resident memory ((gpa, pages)) the first round copies (taken by it); later
    /// rounds copy what the dirty log says was written since the round before.
    resident: Option<Vec<(u64, u64)>>,
    /// Ranges copied so far, merged.
    copied: Vec<(u64, u64)>,
    /// Rounds copied so far.
    rounds: u64,
}

/// A paused VM: its state and how to let it go.
struct Pause {
    /// None once the VM runs again (it was resumed with its state captured).
    session: Option<vmm::PauseSession>,
    paused: stasis_runtime::kvm::snapshot::Paused,
    /// Guest memory ranges ((gpa, pages)) the image holds.
    ranges: Vec<(u64, u64)>,
    /// A copy of those ranges, when the VM may run while its image is written.
    staging: Option<Vec<u8>>,
    /// When the rounds went to a caller's sink: what the last round, while paused, sends.
    sent: Option<LastRound>,
    at: Instant,
}

/// The pages written since the last round before the pause, which the last round sends.
struct LastRound {
    /// (gpa, pages), ascending.
    pending: Vec<(u64, u64)>,
    done: bool,
}

/// A VM being checkpointed, one step at a time (see the module documentation): tracked and
/// copied while it runs ([`VmSession::start_dirty_tracking`], [`VmSession::copy_round`]),
/// paused ([`VmSession::freeze`]), written ([`VmSession::write`]), then resumed or stopped.
/// Dropped while paused, the VM resumes.
pub struct VmSession {
    state: StateDir,
    name: String,
    opts: VmCheckpointOptions,
    start: Instant,
    stats: VmStats,
    tracking: Option<Tracking>,
    pause: Option<Pause>,
}

/// One round of copying changed memory while the workload runs.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Round {
    /// Pages copied.
    pub pages: u64,
    pub us: u64,
}

impl VmSession {
    /// A session for the running VM `name` (nothing is done to it yet).
    pub fn open(
        state: &StateDir,
        name: &str,
        opts: VmCheckpointOptions,
    ) -> Result<Self, CheckpointError> {
        vmm::running(state, name).map_err(|e| vm_err(name, e.to_string()))?;
        Ok(VmSession {
            state: state.clone(),
            name: name.to_string(),
            opts,
            start: Instant::now(),
            stats: VmStats {
                name: name.to_string(),
                compression: opts.compression.to_string(),
                ..Default::default()
            },
            tracking: None,
            pause: None,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What has been measured so far.
    pub fn stats(&self) -> &VmStats {
        &self.stats
    }

    /// Turns on KVM's dirty log and lists the resident memory for the first round (no
    /// write after this is missed); the rounds go to the sink [`VmSession::copy_round`] is
    /// given, and the image [`VmSession::write`] writes then holds no guest memory. Returns
    /// the resident memory, bytes.
    pub fn start_dirty_tracking(&mut self) -> Result<u64, CheckpointError> {
        if self.pause.is_some() || self.tracking.is_some() {
            return Err(vm_err(
                &self.name,
                "dirty tracking starts while the VM runs, once",
            ));
        }
        let (log, rep) = vmm::dirty_log_start(&self.state, &self.name)?;
        let ranges = resident_ranges(&self.name, rep.pid, rep.mem_host_addr, rep.memory)?;
        let resident: u64 = ranges.iter().map(|r| r.1).sum();
        self.tracking = Some(Tracking {
            log,
            pid: rep.pid,
            host: rep.mem_host_addr,
            staging: None,
            resident: Some(ranges),
            copied: Vec::new(),
            rounds: 0,
        });
        self.stats.memory = rep.memory;
        Ok(resident.saturating_mul(PAGE_SIZE))
    }

    /// Turns dirty tracking off again (a migration that gave up before the pause).
    pub fn stop_tracking(&mut self) {
        self.tracking = None;
    }

    /// Sends what changed since the last round (all resident memory, the first time) into
    /// `to` while the VM runs; once it is paused, the last round: what changed since the
    /// round before the pause.
    pub fn copy_round(&mut self, to: &mut dyn PageSink) -> Result<Round, CheckpointError> {
        let name = self.name.clone();
        let began = Instant::now();
        if let Some(p) = self.pause.as_mut() {
            let last = match p.sent.as_mut() {
                Some(last) if !last.done => last,
                Some(_) => return Err(vm_err(&name, "its last round was sent already")),
                None => return Err(vm_err(&name, "paused without dirty tracking: no round")),
            };
            send_ranges(
                &name,
                p.paused.pid,
                p.paused.mem_host_addr,
                &last.pending,
                to,
            )?;
            last.done = true;
            let pages = last.pending.iter().map(|r| r.1).sum();
            return Ok(Round {
                pages,
                us: micros(began.elapsed()),
            });
        }
        let t = self
            .tracking
            .as_mut()
            .ok_or_else(|| vm_err(&name, "a round needs dirty tracking started"))?;
        if t.staging.is_some() {
            return Err(vm_err(&name, "its rounds go to its own staging copy"));
        }
        let ranges = next_round(&self.state, &name, t)?;
        send_ranges(&name, t.pid, t.host, &ranges, to)?;
        Ok(self.count_round(&ranges, began))
    }

    /// Copies what changed since the last round (all resident memory, the first time) into
    /// the staging copy while the VM runs.
    fn stage_round(&mut self) -> Result<Round, CheckpointError> {
        let name = self.name.clone();
        let began = Instant::now();
        let t = self
            .tracking
            .as_mut()
            .ok_or_else(|| vm_err(&name, "a round needs dirty tracking started"))?;
        let ranges = next_round(&self.state, &name, t)?;
        let staging = t
            .staging
            .as_mut()
            .ok_or_else(|| vm_err(&name, "its rounds go to a sink, not a staging copy"))?;
        copy_ranges(&name, t.pid, t.host, &ranges, staging)?;
        Ok(self.count_round(&ranges, began))
    }

    /// Counts a round that copied `ranges` (the first, of resident memory, is not counted
    /// as a re-copy).
    fn count_round(&mut self, ranges: &[(u64, u64)], began: Instant) -> Round {
        let pages: u64 = ranges.iter().map(|r| r.1).sum();
        let mut first = false;
        if let Some(t) = self.tracking.as_mut() {
            t.copied = merge(&t.copied, ranges);
            first = t.rounds == 0;
            t.rounds += 1;
        }
        if !first {
            self.stats.precopy_rounds += 1;
            self.stats.pages_recopied += pages;
        }
        let us = micros(began.elapsed());
        self.stats.precopy_us += us;
        Round { pages, us }
    }

    /// Pauses the VM. Left running (`leave_running`) with resident memory within the
    /// staging limit, its memory is first copied while it runs, round after round, and the
    /// pause copies only what changed since: the whole state is then captured
    /// ([`VmSession::captured`]) and the VM may run on while its image is written.
    pub fn freeze(&mut self) -> Result<(), CheckpointError> {
        if self.pause.is_some() {
            return Err(vm_err(&self.name, "it is paused already"));
        }
        if self.opts.leave_running && self.tracking.is_none() {
            self.stats.staging_limit = match self.opts.staging_limit {
                Some(limit) => limit,
                None => stasis_runtime::procfs::mem_available()? / 2,
            };
            let resident = self.start_dirty_tracking()?;
            self.stats.staged = resident <= self.stats.staging_limit;
            if let (true, Some(t)) = (self.stats.staged, self.tracking.as_mut()) {
                t.staging = Some(vec![0u8; usize_of(&self.name, self.stats.memory)?]);
            }
            if !self.stats.staged {
                // Turned off again: the VM is paused while its memory is written.
                self.tracking = None;
            } else {
                // Another round while it is worth it: the last one copied more than a pause
                // copies quickly, fewer than the one before, and the round limit is not
                // reached.
                let mut before = u64::MAX;
                loop {
                    let pages = self.stage_round()?.pages;
                    if pages >= before
                        || pages <= PAUSE_COPY_PAGES
                        || self.stats.precopy_rounds >= MAX_PRECOPY_ROUNDS
                    {
                        break;
                    }
                    before = pages;
                }
            }
        }
        let (session, paused) = vmm::pause(&self.state, &self.name)?;
        let at = Instant::now();
        self.stats.memory = paused.snapshot.memory;
        self.stats.vmm_pause_us = paused.pause_us;
        let mut sent = None;
        let (ranges, staging) = match self.tracking.take() {
            Some(mut t) => {
                drop(t.log);
                let dirty = paused.dirty.clone().unwrap_or_default();
                self.stats.pages_dirty = dirty.iter().map(|r| r.1).sum();
                let mut bytes: Vec<(u64, u64)> =
                    dirty.iter().map(|&(p, n)| (p * PAGE_SIZE, n)).collect();
                if let Some(resident) = t.resident.take() {
                    // Tracked, but never copied: all of it goes now.
                    bytes = merge(&resident, &bytes);
                }
                match t.staging.take() {
                    Some(mut staging) => {
                        self.stats.staged = true;
                        let copied = copy_ranges(
                            &self.name,
                            paused.pid,
                            paused.mem_host_addr,
                            &bytes,
                            &mut staging,
                        );
                        if let Err(e) = copied {
                            // Dropping the session resumes the VM.
                            drop(session);
                            return Err(e);
                        }
                        (merge(&t.copied, &bytes), Some(staging))
                    }
                    None => {
                        let all = merge(&t.copied, &bytes);
                        sent = Some(LastRound {
                            pending: bytes,
                            done: false,
                        });
                        (all, None)
                    }
                }
            }
            None => (
                resident_ranges(
                    &self.name,
                    paused.pid,
                    paused.mem_host_addr,
                    paused.snapshot.memory,
                )?,
                None,
            ),
        };
        self.stats.pages_resident = ranges.iter().map(|r| r.1).sum();
        self.pause = Some(Pause {
            session: Some(session),
            paused,
            ranges,
            staging,
            sent,
            at,
        });
        Ok(())
    }

    /// Paused after rounds sent to a sink: whether the last round is still to be sent
    /// (Some(true)), was sent (Some(false)); None otherwise.
    pub fn last_round_pending(&self) -> Option<bool> {
        self.pause
            .as_ref()
            .and_then(|p| p.sent.as_ref())
            .map(|last| !last.done)
    }

    /// Whether the paused VM's whole state (memory included) is held by this session, so
    /// the VM may run again before its image is written.
    pub fn captured(&self) -> bool {
        self.pause.as_ref().is_some_and(|p| p.staging.is_some())
    }

    /// Writes the image of the VM as it was paused into `sink` (not committed). When its
    /// memory went to a [`PageSink`] round by round, the image holds none (refused until the
    /// last round is sent).
    pub fn write<S: ImageSink>(&mut self, sink: S) -> Result<S, CheckpointError> {
        let name = self.name.clone();
        let p = self
            .pause
            .as_mut()
            .ok_or_else(|| vm_err(&name, "its image is written once it is paused"))?;
        let ranges = match &p.sent {
            Some(last) if !last.done => {
                return Err(vm_err(&name, "its last round is sent before its state"))
            }
            Some(_) => Vec::new(),
            None => p.ranges.clone(),
        };
        let compression = self.opts.compression;
        let mut inventory = crate::collect::inventory(0, false, &compression);
        inventory.kind = proto::WorkloadKind::Vm as i32;
        inventory.vm = Some(vm_to_proto(&p.paused.snapshot));
        let writer = ImageWriter::new(sink, &inventory, compression)?;
        let source = match p.staging.take() {
            Some(buf) => GuestSource::Staged(buf),
            None => GuestSource::Vmm {
                pid: p.paused.pid,
                host: p.paused.mem_host_addr,
            },
        };
        let plan = DumpPlan::guest(&name, &ranges, source);
        let (sink, ws) = crate::pages::dump(&plan, writer, &|_, _| {})?;
        let s = &mut self.stats;
        s.pages_data = ws.data_pages;
        s.pages_zero = ws.zero_pages;
        s.bytes_raw = ws.raw_bytes;
        s.bytes_stored = ws.stored_bytes;
        s.image_bytes = ws.image_bytes;
        Ok(sink)
    }

    fn pause_session(&mut self) -> Result<(vmm::PauseSession, Instant, u64), CheckpointError> {
        let name = self.name.clone();
        let p = self
            .pause
            .as_mut()
            .ok_or_else(|| vm_err(&name, "it is not paused"))?;
        let session = p
            .session
            .take()
            .ok_or_else(|| vm_err(&name, "it runs again already"))?;
        Ok((session, p.at, p.paused.pause_us))
    }

    /// Lets the paused VM run on.
    pub fn resume(&mut self) -> Result<VmStats, CheckpointError> {
        let (session, at, vmm_us) = self.pause_session()?;
        let resumed = session.resume()?;
        self.stats.pause_us = match self.stats.staged {
            true => resumed.paused_us,
            false => micros(at.elapsed()) + vmm_us,
        };
        self.stats.vm = "running".into();
        Ok(self.finish())
    }

    /// Leaves the paused VM paused after this process is gone, until `stasis vm resume` or
    /// `stasis vm stop` settles it (a migration whose outcome is unknown).
    pub fn stay_paused(&mut self) -> Result<(), CheckpointError> {
        let (session, _, _) = self.pause_session()?;
        session.stay()?;
        self.stats.vm = "paused".into();
        Ok(())
    }

    /// Stops the paused VM (only once its image is committed); its VMM removes its record.
    pub fn stop(&mut self) -> Result<VmStats, CheckpointError> {
        let (session, at, vmm_us) = self.pause_session()?;
        session.stop(Duration::from_secs(10))?;
        self.stats.pause_us = micros(at.elapsed()) + vmm_us;
        self.stats.vm = "stopped".into();
        Ok(self.finish())
    }

    /// Records that the checkpoint ended now (its image committed).
    pub fn end(&mut self) {
        self.stats.total_us = micros(self.start.elapsed());
    }

    fn finish(&mut self) -> VmStats {
        self.end();
        self.stats.clone()
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn usize_of(name: &str, v: u64) -> Result<usize, CheckpointError> {
    usize::try_from(v).map_err(|_| vm_err(name, format!("{v} does not fit in memory")))
}

/// The pages of guest memory worth reading, as (guest-physical address, pages), ascending:
/// of the memfd only pages that were ever written (an unwritten page of a memfd is zero);
/// of image pages a restore mapped MAP_PRIVATE, all of them; of anonymous memory (their
/// copies-on-write), the pages present or swapped.
fn resident_ranges(
    name: &str,
    pid: i32,
    host: u64,
    size: u64,
) -> Result<Vec<(u64, u64)>, CheckpointError> {
    let end = host
        .checked_add(size)
        .ok_or_else(|| vm_err(name, "guest memory address overflows"))?;
    let pagemap = Pagemap::open(pid)?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |gpa: u64, pages: u64| match out.last_mut() {
        Some((s, n)) if *s + *n * PAGE_SIZE == gpa => *n += pages,
        _ => out.push((gpa, pages)),
    };
    let mut entries = Vec::new();
    for m in stasis_runtime::procfs::read_maps(pid)? {
        let (lo, hi) = (m.start.max(host), m.end.min(end));
        if lo >= hi {
            continue;
        }
        if m.name.starts_with("/memfd:") {
            // Guest memory is a memfd: its pages ever written, mapped in the VMM or not
            // (memory a migration received is written by the receiver, and the guest may
            // not have touched it since).
            let path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
            let at = |v: u64| m.offset + (v - m.start);
            let written = std::fs::File::open(&path)
                .and_then(|f| memory::data_extents(&f, at(lo), at(hi)))
                .map_err(|e| vm_err(name, format!("the pages written in {path}: {e}")))?;
            for (s, e) in written {
                let s = s - s % PAGE_SIZE;
                push(s - m.offset + m.start - host, (e - s).div_ceil(PAGE_SIZE));
            }
            continue;
        }
        if m.inode != 0 {
            push(lo - host, (hi - lo) / PAGE_SIZE);
            continue;
        }
        pagemap.read(lo, hi, &mut entries)?;
        for (i, e) in entries.iter().enumerate() {
            if e & (PM_PRESENT | PM_SWAPPED) != 0 {
                push(lo - host + i as u64 * PAGE_SIZE, 1);
            }
        }
    }
    Ok(out)
}

/// Reads guest memory at `gpa` out of the VMM into `out`.
fn read_guest(
    name: &str,
    pid: i32,
    host: u64,
    gpa: u64,
    out: &mut [u8],
) -> Result<(), CheckpointError> {
    memory::read_remote(pid, &[(host + gpa, out.len())], out)
        .map_err(|e| vm_err(name, format!("reading guest memory at {gpa:#x}: {e}")))
}

/// Copies the ranges ((gpa, pages)) of guest memory into `staging` at their addresses.
fn copy_ranges(
    name: &str,
    pid: i32,
    host: u64,
    ranges: &[(u64, u64)],
    staging: &mut [u8],
) -> Result<(), CheckpointError> {
    for (at, n) in pieces(ranges, 4 << 20) {
        let (o, len) = (usize_of(name, at)?, usize_of(name, n)?);
        let dst = staging
            .get_mut(o..o + len)
            .ok_or_else(|| vm_err(name, format!("page {at:#x} outside guest memory")))?;
        read_guest(name, pid, host, at, dst)?;
    }
    Ok(())
}

/// The ranges ((gpa, pages)) as pieces of at most `step` bytes: (gpa, bytes).
fn pieces(ranges: &[(u64, u64)], step: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    ranges.iter().flat_map(move |&(gpa, pages)| {
        let end = gpa + pages * PAGE_SIZE;
        (gpa..end)
            .step_by(usize::try_from(step).unwrap_or(usize::MAX))
            .map(move |at| (at, (end - at).min(step)))
    })
}

/// The ranges ((gpa in bytes, pages)) the next round copies: the resident memory the first
/// time, then what the dirty log says was written since the round before.
fn next_round(
    state: &StateDir,
    name: &str,
    t: &mut Tracking,
) -> Result<Vec<(u64, u64)>, CheckpointError> {
    Ok(match t.resident.take() {
        Some(resident) => resident,
        None => vmm::dirty_log_fetch(state, name)?
            .iter()
            .map(|&(p, n)| (p * PAGE_SIZE, n))
            .collect(),
    })
}

/// Sends the ranges ((gpa, pages)) of guest memory into `to`, a few MiB at a time.
fn send_ranges(
    name: &str,
    pid: i32,
    host: u64,
    ranges: &[(u64, u64)],
    to: &mut dyn PageSink,
) -> Result<(), CheckpointError> {
    let mut buf = Vec::new();
    for (at, n) in pieces(ranges, 2 << 20) {
        buf.resize(usize_of(name, n)?, 0);
        read_guest(name, pid, host, at, &mut buf)?;
        to.pages(at, &buf)
            .map_err(|e| vm_err(name, format!("sending guest memory at {at:#x}: {e}")))?;
    }
    Ok(())
}

/// The union of two ascending range lists ((gpa, pages)), ascending and merged.
fn merge(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut all: Vec<(u64, u64)> = a
        .iter()
        .chain(b)
        .map(|&(s, n)| (s, s + n * PAGE_SIZE))
        .collect();
    all.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in all {
        match out.last_mut() {
            Some((_, pe)) if s <= *pe => *pe = (*pe).max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter()
        .map(|(s, e)| (s, (e - s) / PAGE_SIZE))
        .collect()
}

/// The image record of a paused VM's state.
pub fn vm_to_proto(s: &VmSnapshot) -> proto::Vm {
    let vcpus = s
        .vcpus
        .iter()
        .map(|c| {
            let sum = c.summary();
            proto::Vcpu {
                id: c.id,
                regs: c.regs.clone(),
                sregs: c.sregs.clone(),
                fpu: c.fpu.clone(),
                xsave: c.xsave.clone(),
                xcrs: c.xcrs.clone(),
                debugregs: c.debugregs.clone(),
                lapic: c.lapic.clone(),
                events: c.events.clone(),
                mp_state: c.mp_state.clone(),
                msrs: c
                    .msrs
                    .iter()
                    .map(|m| proto::VcpuMsr {
                        index: m.index,
                        value: m.value,
                    })
                    .collect(),
                msrs_unreadable: c.msrs_unreadable.clone(),
                rip: sum.rip,
                rsp: sum.rsp,
                rflags: sum.rflags,
                cr0: sum.cr0,
                cr3: sum.cr3,
                cr4: sum.cr4,
                efer: sum.efer,
                cs: u32::from(sum.cs),
            }
        })
        .collect();
    let se = &s.serial;
    let reports: Vec<proto::VmReportDevice> = s
        .reports
        .iter()
        .map(|r| proto::VmReportDevice {
            latch: r.latch.to_vec(),
            pages: r.pages,
            counter: r.counter,
            checksum: r.checksum,
            every: r.every,
            limit: r.limit,
            reports: r.reports,
            errors: r.errors,
            base: r.base,
        })
        .collect();
    proto::Vm {
        name: s.name.clone(),
        guest: s.guest.clone(),
        memory_size: s.memory,
        memory: vec![proto::VmMemoryRange {
            slot: 0,
            guest_phys_addr: 0,
            size: s.memory,
        }],
        vcpus,
        irqchip: s.vm.irqchip,
        pit: s.vm.pit,
        irqchips: s.vm.chips.clone(),
        pit_state: s.vm.pit_state.clone(),
        clock: s.vm.clock.clone(),
        serial: Some(proto::VmSerial {
            base: u32::from(se.base),
            ier: u32::from(se.ier),
            lcr: u32::from(se.lcr),
            mcr: u32::from(se.mcr),
            scr: u32::from(se.scr),
            fcr: u32::from(se.fcr),
            dll: u32::from(se.dll),
            dlm: u32::from(se.dlm),
            rx: se.rx.clone(),
            transmitted: se.transmitted,
        }),
        report: reports.first().cloned(),
        vcpu_reports: reports,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_come_in_pieces_of_at_most_a_step() {
        let p = PAGE_SIZE;
        let got: Vec<_> = pieces(&[(0, 5), (10 * p, 1)], 2 * p).collect();
        assert_eq!(
            got,
            vec![(0, 2 * p), (2 * p, 2 * p), (4 * p, p), (10 * p, p)]
        );
    }

    #[test]
    fn merges_ranges() {
        let p = PAGE_SIZE;
        assert_eq!(
            merge(&[(0, 2), (5 * p, 1)], &[(p, 3)]),
            vec![(0, 4), (5 * p, 1)]
        );
        assert_eq!(merge(&[], &[(p, 1)]), vec![(p, 1)]);
    }
}

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
use crate::sink::ImageSink;
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

/// Checkpoints the running VM `name` into `sink`.
pub fn checkpoint_vm<S: ImageSink>(
    state: &StateDir,
    name: &str,
    opts: VmCheckpointOptions,
    sink: S,
) -> Result<VmStats, CheckpointError> {
    let VmCheckpointOptions {
        leave_running,
        compression,
        ..
    } = opts;
    let start = Instant::now();
    let mut stats = VmStats {
        name: name.to_string(),
        compression: compression.to_string(),
        ..Default::default()
    };
    // With leave_running the dirty log goes on before the resident pages are listed (no
    // write in between is missed), and that one list also decides whether staging fits.
    let mut to_stage = None;
    if leave_running {
        stats.staging_limit = match opts.staging_limit {
            Some(limit) => limit,
            None => stasis_runtime::procfs::mem_available()? / 2,
        };
        // Held until the pause takes the log; dropped first (over the limit, or on an
        // error), it turns the log off again.
        let (dirty_log, rep) = vmm::dirty_log_start(state, name)?;
        let ranges = resident_ranges(name, rep.pid, rep.mem_host_addr, rep.memory)?;
        let resident: u64 = ranges.iter().map(|r| r.1).sum();
        stats.staged = resident.saturating_mul(PAGE_SIZE) <= stats.staging_limit;
        if stats.staged {
            to_stage = Some((dirty_log, rep, ranges));
        }
    }
    let (session, paused, staging, ranges) = if let Some((dirty_log, rep, ranges)) = to_stage {
        let mut staging = vec![0u8; usize_of(name, rep.memory)?];
        let t = Instant::now();
        copy_ranges(name, rep.pid, rep.mem_host_addr, &ranges, &mut staging)?;
        // Pages written since are copied again while the guest runs, as long as that
        // shrinks the set the pause has to copy.
        let mut recopied: Vec<(u64, u64)> = Vec::new();
        let mut last = u64::MAX;
        while stats.precopy_rounds < MAX_PRECOPY_ROUNDS && last > PAUSE_COPY_PAGES {
            let dirty = vmm::dirty_log_fetch(state, name)?;
            let pages: u64 = dirty.iter().map(|r| r.1).sum();
            let bytes: Vec<(u64, u64)> = dirty.iter().map(|&(p, n)| (p * PAGE_SIZE, n)).collect();
            copy_ranges(name, rep.pid, rep.mem_host_addr, &bytes, &mut staging)?;
            recopied = merge(&recopied, &bytes);
            stats.precopy_rounds += 1;
            stats.pages_recopied += pages;
            if pages >= last {
                break;
            }
            last = pages;
        }
        let ranges = merge(&ranges, &recopied);
        stats.precopy_us = micros(t.elapsed());
        let (session, paused) = vmm::pause(state, name)?;
        drop(dirty_log);
        let dirty = paused.dirty.clone().unwrap_or_default();
        stats.pages_dirty = dirty.iter().map(|r| r.1).sum();
        let dirty_bytes: Vec<(u64, u64)> = dirty.iter().map(|&(p, n)| (p * PAGE_SIZE, n)).collect();
        let copied = copy_ranges(
            name,
            paused.pid,
            paused.mem_host_addr,
            &dirty_bytes,
            &mut staging,
        );
        let resumed = session.resume()?;
        copied?;
        stats.pause_us = resumed.paused_us;
        (None, paused, Some(staging), merge(&ranges, &dirty_bytes))
    } else {
        let (session, paused) = vmm::pause(state, name)?;
        // Dropping the session on an error below resumes the VM.
        let snap = &paused.snapshot;
        let ranges = resident_ranges(name, paused.pid, paused.mem_host_addr, snap.memory)?;
        (Some(session), paused, None, ranges)
    };
    stats.memory = paused.snapshot.memory;
    stats.vmm_pause_us = paused.pause_us;
    stats.pages_resident = ranges.iter().map(|r| r.1).sum();
    let t_pause = Instant::now();

    let mut inventory = crate::collect::inventory(0, false, &compression);
    inventory.kind = proto::WorkloadKind::Vm as i32;
    inventory.vm = Some(vm_to_proto(&paused.snapshot));
    let writer = ImageWriter::new(sink, &inventory, compression)?;
    let source = match staging {
        Some(buf) => GuestSource::Staged(buf),
        None => GuestSource::Vmm {
            pid: paused.pid,
            host: paused.mem_host_addr,
        },
    };
    let plan = DumpPlan::guest(name, &ranges, source);
    let (mut sink, ws) = crate::pages::dump(&plan, writer, &|_, _| {})?;
    sink.commit()
        .map_err(|e| CheckpointError::Io(format!("VM {name}: commit image"), e))?;
    stats.vm = "running".into();
    if let Some(session) = session {
        if leave_running {
            session.resume()?;
        } else {
            session.stop(Duration::from_secs(10))?;
            stats.vm = "stopped".into();
        }
        stats.pause_us = micros(t_pause.elapsed()) + paused.pause_us;
    }
    stats.pages_data = ws.data_pages;
    stats.pages_zero = ws.zero_pages;
    stats.bytes_raw = ws.raw_bytes;
    stats.bytes_stored = ws.stored_bytes;
    stats.image_bytes = ws.image_bytes;
    stats.total_us = micros(start.elapsed());
    Ok(stats)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn usize_of(name: &str, v: u64) -> Result<usize, CheckpointError> {
    usize::try_from(v).map_err(|_| vm_err(name, format!("{v} does not fit in memory")))
}

/// The pages of guest memory worth reading, as (guest-physical address, pages), ascending:
/// of the memfd only pages that were ever touched (present or swapped: an untouched page of
/// a memfd is zero); of image pages a restore mapped MAP_PRIVATE, all of them.
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
        let anonymous = m.inode == 0 || m.name.starts_with("/memfd:");
        if !anonymous {
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
    const STEP: u64 = 4 << 20;
    for &(gpa, pages) in ranges {
        let (mut at, end) = (gpa, gpa + pages * PAGE_SIZE);
        while at < end {
            let n = (end - at).min(STEP);
            let (o, len) = (usize_of(name, at)?, usize_of(name, n)?);
            let dst = staging
                .get_mut(o..o + len)
                .ok_or_else(|| vm_err(name, format!("page {at:#x} outside guest memory")))?;
            read_guest(name, pid, host, at, dst)?;
            at += n;
        }
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
    fn merges_ranges() {
        let p = PAGE_SIZE;
        assert_eq!(
            merge(&[(0, 2), (5 * p, 1)], &[(p, 3)]),
            vec![(0, 4), (5 * p, 1)]
        );
        assert_eq!(merge(&[], &[(p, 1)]), vec![(p, 1)]);
    }
}

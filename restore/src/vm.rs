//! Restoring a KVM VM from an image: the image's structure (every frame, every metadata
//! hash) and the VM record are checked against its memory chunks before anything starts;
//! then a fresh VMM process gets the saved state (`stasis_runtime::kvm::snapshot::Restore`).
//! Its guest memory is filled in the VMM before the vCPU runs: raw page-aligned chunks are
//! mapped from the image file MAP_PRIVATE (no copy; the guest's writes stay private), zstd
//! chunks are decompressed into place (hash-checked as they are read), and zero pages are
//! left as the fresh memfd has them.
//!
//! The mapped chunks' hashes are checked while the guest already runs (hashing a gigabyte
//! takes longer than the whole rest of the restore): the restore is confirmed only once
//! they match, and a mismatch stops and removes the new VM, leaving the image as it was.
//! `verify_first` checks every hash before the guest starts instead.

use crate::error::RestoreError;
use stasis_image::proto::{self, Encoding, RunKind, SpaceKind};
use stasis_image::{Image, PAGE_SIZE};
use stasis_runtime::container::StateDir;
use stasis_runtime::kvm::demo;
use stasis_runtime::kvm::memory::GuestMemory;
use stasis_runtime::kvm::report::ReportState;
use stasis_runtime::kvm::serial::SerialState;
use stasis_runtime::kvm::snapshot::{DeferredCheck, Restore, VmSnapshot};
use stasis_runtime::kvm::state::{Msr, VcpuState, VmState};
use stasis_runtime::kvm::vm::WORK_ADDR;
use stasis_runtime::kvm::vmm::{self, Guest, VmConfig, VmRecord, VmReport};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

const PAGE: u64 = PAGE_SIZE as u64;
/// A chunk with more DATA runs than this is copied rather than mapped run by run (each
/// mapping costs a VMA; a fragmented gigabyte would exhaust vm.max_map_count).
const MAX_MAPPED_RUNS: usize = 16;

/// The VM record of a VM image.
pub fn vm_of(image: &Image) -> Option<&proto::Vm> {
    let inv = image.inventory();
    (inv.kind == proto::WorkloadKind::Vm as i32)
        .then_some(inv.vm.as_ref())
        .flatten()
}

/// How a VM restore went (times in microseconds).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VmRestoreStats {
    pub name: String,
    pub memory: u64,
    /// "first" (every hash before the guest ran) or "beside" (mapped pages' hashes checked
    /// while it ran).
    pub verify: &'static str,
    /// Checking the image before the VMM started.
    pub verify_us: u64,
    /// From the start of the restore until the VMM said the vCPU runs.
    pub running_us: u64,
    /// From the start of the restore until it was confirmed: the guest runs and every hash
    /// of the image matched (a foreground VM: when it started).
    pub total_us: u64,
    pub chunks_mapped: u64,
    pub chunks_copied: u64,
    pub pages_data: u64,
    pub pages_zero: u64,
    /// The record of the detached VM.
    pub record: Option<VmRecord>,
    /// The final report of a VM run in the foreground.
    pub report: Option<VmReport>,
}

fn invalid(what: impl Into<String>) -> RestoreError {
    RestoreError::Invalid(what.into())
}

fn u8_of(what: &str, v: u32) -> Result<u8, RestoreError> {
    u8::try_from(v).map_err(|_| invalid(format!("VM serial {what} {v} is not a byte")))
}

/// The runtime's snapshot from the image record, every size checked.
pub fn snapshot_of(vm: &proto::Vm) -> Result<VmSnapshot, RestoreError> {
    let vcpus = vm
        .vcpus
        .iter()
        .map(|c| VcpuState {
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
                .map(|m| Msr {
                    index: m.index,
                    value: m.value,
                })
                .collect(),
            msrs_unreadable: c.msrs_unreadable.clone(),
        })
        .collect::<Vec<_>>();
    for c in &vcpus {
        c.check(&vm.name)
            .map_err(|e| invalid(format!("vCPU {}: {e}", c.id)))?;
    }
    let se = vm
        .serial
        .as_ref()
        .ok_or_else(|| invalid(format!("VM {}: no serial device state", vm.name)))?;
    for (i, c) in vcpus.iter().enumerate() {
        if usize::try_from(c.id).ok() != Some(i) {
            return Err(invalid(format!(
                "VM {}: vCPU {i} of the image is numbered {}",
                vm.name, c.id
            )));
        }
    }
    // Images written before multi-vCPU support have only `report`, of their one vCPU.
    let reports: Vec<&proto::VmReportDevice> = if vm.vcpu_reports.is_empty() {
        vm.report.iter().collect()
    } else {
        vm.vcpu_reports.iter().collect()
    };
    if reports.len() != vcpus.len() {
        return Err(invalid(format!(
            "VM {}: {} report devices for {} vCPUs",
            vm.name,
            reports.len(),
            vcpus.len()
        )));
    }
    let reports = reports
        .into_iter()
        .map(|r| report_state(vm, r))
        .collect::<Result<Vec<_>, _>>()?;
    let vm_state = VmState {
        irqchip: vm.irqchip,
        pit: vm.pit,
        chips: vm.irqchips.clone(),
        pit_state: vm.pit_state.clone(),
        clock: vm.clock.clone(),
    };
    vm_state
        .check(&vm.name)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(VmSnapshot {
        version: vmm::VERSION,
        name: vm.name.clone(),
        guest: vm.guest.clone(),
        memory: vm.memory_size,
        vcpus,
        vm: vm_state,
        serial: SerialState {
            base: u16::try_from(se.base)
                .map_err(|_| invalid(format!("serial base port {}", se.base)))?,
            ier: u8_of("ier", se.ier)?,
            lcr: u8_of("lcr", se.lcr)?,
            mcr: u8_of("mcr", se.mcr)?,
            scr: u8_of("scr", se.scr)?,
            fcr: u8_of("fcr", se.fcr)?,
            dll: u8_of("dll", se.dll)?,
            dlm: u8_of("dlm", se.dlm)?,
            rx: se.rx.clone(),
            transmitted: se.transmitted,
        },
        reports,
    })
}

/// One vCPU's report device from its record; its work slice must lie in guest memory.
fn report_state(vm: &proto::Vm, r: &proto::VmReportDevice) -> Result<ReportState, RestoreError> {
    let latch: [u32; 4] = r
        .latch
        .as_slice()
        .try_into()
        .map_err(|_| invalid(format!("report device latch has {} words", r.latch.len())))?;
    let base = if r.base == 0 { WORK_ADDR } else { r.base };
    let end = r.pages.checked_mul(4096).and_then(|n| n.checked_add(base));
    if base < WORK_ADDR || end.is_none_or(|e| e > vm.memory_size) {
        return Err(invalid(format!(
            "VM {}: a report device's work slice ({} pages at {:#x}) is outside guest memory",
            vm.name, r.pages, r.base
        )));
    }
    Ok(ReportState {
        latch,
        base: r.base,
        pages: r.pages,
        counter: r.counter,
        checksum: r.checksum,
        every: r.every,
        limit: r.limit,
        reports: r.reports,
        errors: r.errors,
    })
}

/// Checks the record's memory against its chunks: one range, slot 0 at 0, of the recorded
/// size; every chunk is GUEST slot 0 and inside it.
fn check_memory(image: &Image, vm: &proto::Vm) -> Result<(), RestoreError> {
    let size = vm.memory_size;
    if size == 0 || !size.is_multiple_of(2 << 20) {
        return Err(invalid(format!(
            "VM {}: memory size {size} is not a positive multiple of 2 MiB",
            vm.name
        )));
    }
    match vm.memory.as_slice() {
        [r] if r.slot == 0 && r.guest_phys_addr == 0 && r.size == size => {}
        other => {
            return Err(invalid(format!(
                "VM {}: memory ranges {other:?} disagree with its memory size {size}",
                vm.name
            )))
        }
    }
    for c in image.chunks() {
        if c.space != SpaceKind::Guest || c.space_id != 0 {
            return Err(invalid(format!(
                "VM {}: chunk at offset {} is {} {}, not guest memory slot 0",
                vm.name,
                c.chunk_offset,
                c.space.as_str_name(),
                c.space_id
            )));
        }
        if c.vaddr_end > size {
            return Err(invalid(format!(
                "VM {}: chunk at offset {} covers guest {:#x}..{:#x}, beyond its {size} bytes",
                vm.name, c.chunk_offset, c.vaddr_start, c.vaddr_end
            )));
        }
    }
    let n = vm.vcpus.len();
    if !(1..=demo::MAX_VCPUS as usize).contains(&n) {
        return Err(RestoreError::Unsupported(format!(
            "VM {}: {n} vCPUs; this VMM runs 1 to {}",
            vm.name,
            demo::MAX_VCPUS
        )));
    }
    Ok(())
}

/// What to put where in guest memory, decided before the VMM starts.
enum Fill {
    /// Map `len` bytes of the image file at `offset` over guest `gpa` (from chunk `chunk`).
    Map {
        chunk: usize,
        gpa: u64,
        offset: u64,
        len: u64,
    },
    /// Copy a chunk's decoded data's DATA runs (its index in the image).
    Copy { chunk: usize },
}

fn plan_fill(image: &Image) -> (Vec<Fill>, u64, u64) {
    let mut fills = Vec::new();
    let (mut mapped, mut copied) = (0, 0);
    for c in image.chunks() {
        let data_runs = c
            .runs
            .iter()
            .filter(|r| r.kind == RunKind::Data as i32)
            .count();
        if data_runs == 0 {
            continue;
        }
        if c.encoding != Encoding::Raw || data_runs > MAX_MAPPED_RUNS {
            fills.push(Fill::Copy { chunk: c.index });
            copied += 1;
            continue;
        }
        mapped += 1;
        let mut at = c.data_offset;
        for r in c.runs.iter().filter(|r| r.kind == RunKind::Data as i32) {
            fills.push(Fill::Map {
                chunk: c.index,
                gpa: r.vaddr,
                offset: at,
                len: r.pages * PAGE,
            });
            at += r.pages * PAGE;
        }
    }
    (fills, mapped, copied)
}

/// Writes one chunk's DATA runs into guest memory.
fn copy_chunk(image: &Image, index: usize, mem: &GuestMemory) -> Result<(), String> {
    let c = image
        .chunks()
        .get(index)
        .ok_or_else(|| format!("chunk {index} vanished"))?;
    let data = image.chunk_data(c).map_err(|e| e.to_string())?;
    let mut at = 0usize;
    for r in c.runs.iter().filter(|r| r.kind == RunKind::Data as i32) {
        let len = usize::try_from(r.pages * PAGE).map_err(|e| e.to_string())?;
        let src = data
            .get(at..at + len)
            .ok_or_else(|| format!("chunk at offset {} is short", c.chunk_offset))?;
        if !mem.write(r.vaddr, src) {
            return Err(format!("pages at {:#x} are outside guest memory", r.vaddr));
        }
        at += len;
    }
    Ok(())
}

/// What `stasis restore` of a VM image was asked for.
pub struct VmRestoreOptions<'a> {
    /// Run under this name instead of the image's.
    pub name: Option<&'a str>,
    /// The memory size the new VM must have (refused if the image's differs).
    pub memory: Option<u64>,
    pub detach: bool,
    /// Foreground: keep the console off standard output.
    pub quiet: bool,
    /// Check every hash of the image before the guest starts (slower, never runs the guest
    /// on unchecked pages).
    pub verify_first: bool,
    /// When the restore began (the time origin of the stats; before the image was opened).
    pub started: Instant,
    /// Called once the VM is built and before its guest runs (detached only; see
    /// [`crate::Hold`]).
    pub hold: Option<&'a crate::Hold>,
    /// Guest memory that came apart from the image (a migration's pre-copy rounds), as a
    /// file of exactly its size: the VM runs on it, and the image must hold no memory.
    pub memory_file: Option<Arc<File>>,
}

/// Verifies the image, then starts the VM from it.
pub fn restore_vm(
    image: Arc<Image>,
    path: &Path,
    state: &StateDir,
    opts: &VmRestoreOptions<'_>,
) -> Result<VmRestoreStats, RestoreError> {
    let start = opts.started;
    if opts.hold.is_some() && !opts.detach {
        return Err(RestoreError::Unsupported(
            "a VM held before its guest runs must run detached".into(),
        ));
    }
    let vm = vm_of(&image)
        .ok_or_else(|| invalid("not a VM image (no VM record)"))?
        .clone();
    if opts.verify_first {
        image.verify()?;
    } else {
        image.verify_structure()?;
    }
    let verify_us = start.elapsed().as_micros() as u64;
    check_memory(&image, &vm)?;
    let mut snapshot = snapshot_of(&vm)?;
    if let Some(m) = opts.memory {
        if m != vm.memory_size {
            return Err(RestoreError::Unsupported(format!(
                "VM {}: the image holds {} MiB of guest memory; restoring it into a VM of \
                 {} MiB (--memory) is refused: the memory size must be the same",
                vm.name,
                vm.memory_size >> 20,
                m >> 20
            )));
        }
    }
    let name = opts.name.unwrap_or(&vm.name).to_string();
    snapshot.name = name.clone();
    let file = Arc::new(File::open(path).map_err(|e| {
        RestoreError::Unsupported(format!("VM {name}: opening {}: {e}", path.display()))
    })?);
    let (fills, mapped, copied) = plan_fill(&image);
    let adopt = match &opts.memory_file {
        Some(f) => Some(precopied(&name, &image, f, vm.memory_size)?),
        None => None,
    };
    let check = (!opts.verify_first).then(|| deferred_check(image.clone(), &fills));
    let fill_image = image.clone();
    let fill = move |vm_name: &str, mem: &GuestMemory| -> Result<(), String> {
        if let Some(f) = &adopt {
            mem.adopt(vm_name, f).map_err(|e| e.to_string())?;
        }
        for f in &fills {
            match *f {
                Fill::Map {
                    gpa, offset, len, ..
                } => mem
                    .map_private(vm_name, gpa, &*file, offset, len)
                    .map_err(|e| e.to_string())?,
                Fill::Copy { chunk } => copy_chunk(&fill_image, chunk, mem)?,
            }
        }
        Ok(())
    };
    let cfg = VmConfig {
        name: name.clone(),
        memory: vm.memory_size,
        vcpus: u32::try_from(snapshot.vcpus.len())
            .map_err(|_| invalid(format!("VM {name}: too many vCPUs")))?,
        guest: Guest::Demo,
        report_every: snapshot.reports.first().map_or(1, |r| r.every),
        steps: snapshot.reports.first().map_or(0, |r| r.limit),
        step_delay: 0,
        irqchip: vm.irqchip,
        restore: Some(Restore {
            snapshot,
            fill: Arc::new(fill),
            check,
        }),
    };
    let mut stats = VmRestoreStats {
        name: name.clone(),
        memory: vm.memory_size,
        verify: if opts.verify_first { "first" } else { "beside" },
        verify_us,
        chunks_mapped: mapped,
        chunks_copied: copied,
        pages_data: image.chunks().iter().map(|c| c.data_pages).sum(),
        pages_zero: image.chunks().iter().map(|c| c.zero_pages).sum(),
        ..Default::default()
    };
    if opts.detach {
        // The hold's own error, if it discarded the VM.
        let refused = std::cell::RefCell::new(None);
        let decide = |pid: i32| {
            let held = crate::Held { pid, processes: 1 };
            match opts.hold.map(|h| (h.0)(&held)) {
                Some(Err(e)) => {
                    *refused.borrow_mut() = Some(e);
                    false
                }
                _ => true,
            }
        };
        let hold = opts.hold.map(|_| &decide as &dyn Fn(i32) -> bool);
        let d = match vmm::run_detached(state, &cfg, hold) {
            Ok(d) => d,
            Err(e) => return Err(refused.take().unwrap_or(RestoreError::Vm(e))),
        };
        stats.total_us = start.elapsed().as_micros() as u64;
        stats.running_us = d.running_at.duration_since(start).as_micros() as u64;
        stats.record = Some(d.record);
    } else {
        stats.total_us = start.elapsed().as_micros() as u64;
        stats.running_us = stats.total_us;
        stats.report = Some(vmm::run_foreground(state, &cfg, opts.quiet)?);
    }
    Ok(stats)
}

/// Memory received apart from `image`, checked to be usable as the VM's: the image holds
/// none of its own and the file is exactly guest memory's size.
fn precopied(
    name: &str,
    image: &Image,
    file: &Arc<File>,
    size: u64,
) -> Result<Arc<File>, RestoreError> {
    if image.chunks().iter().any(|c| c.data_pages > 0) {
        return Err(invalid(format!(
            "VM {name}: the image holds guest memory, and memory was received apart from it"
        )));
    }
    let len = file
        .metadata()
        .map_err(|e| RestoreError::Unsupported(format!("VM {name}: received memory: {e}")))?
        .len();
    if len != size {
        return Err(invalid(format!(
            "VM {name}: {len} bytes of memory were received for {size} bytes of guest memory"
        )));
    }
    Ok(file.clone())
}

/// The hash check of every chunk the fill maps rather than reads, on every core but one
/// (the guest runs on that one meanwhile).
fn deferred_check(image: Arc<Image>, fills: &[Fill]) -> Arc<DeferredCheck> {
    let mut chunks: Vec<usize> = fills
        .iter()
        .filter_map(|f| match f {
            Fill::Map { chunk, .. } => Some(*chunk),
            Fill::Copy { .. } => None,
        })
        .collect();
    chunks.dedup();
    Arc::new(move || {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get().saturating_sub(1))
            .clamp(1, 4);
        let next = AtomicUsize::new(0);
        let check = || -> Result<(), String> {
            while let Some(&i) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                let c = image
                    .chunks()
                    .get(i)
                    .ok_or_else(|| format!("chunk {i} vanished"))?;
                image.verify_chunk(c).map_err(|e| {
                    next.store(usize::MAX / 2, Ordering::Relaxed);
                    format!(
                        "guest memory {:#x}..{:#x} (chunk at offset {}): {e}",
                        c.vaddr_start, c.vaddr_end, c.chunk_offset
                    )
                })?;
            }
            Ok(())
        };
        std::thread::scope(|s| {
            let helpers: Vec<_> = (1..threads).map(|_| s.spawn(check)).collect();
            let mut result = check();
            for h in helpers {
                let r = h
                    .join()
                    .unwrap_or_else(|_| Err("a check thread panicked".into()));
                result = result.and(r);
            }
            result
        })
    })
}

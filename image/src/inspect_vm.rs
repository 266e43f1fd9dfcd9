//! The VM part of `stasis image inspect`: what the machine had, its vCPUs' main registers
//! and its devices (the raw KVM structures stay out of the report; their sizes show).

use crate::proto;
use serde::Serialize;
use std::fmt;

/// A VM image's machine.
#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    pub name: String,
    pub guest: String,
    pub memory_size: u64,
    pub memory: Vec<proto::VmMemoryRange>,
    pub irqchip: bool,
    pub pit: bool,
    pub clock: bool,
    pub vcpus: Vec<VcpuReport>,
    pub serial: Option<proto::VmSerial>,
    /// vCPU 0's report device (the only one of images written before multi-vCPU support).
    pub report_device: Option<proto::VmReportDevice>,
    /// Every vCPU's report device, in vCPU order.
    pub report_devices: Vec<proto::VmReportDevice>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VcpuReport {
    pub id: u32,
    pub rip: String,
    pub rsp: String,
    pub rflags: String,
    pub cs: String,
    pub cr0: String,
    pub cr3: String,
    pub cr4: String,
    pub efer: String,
    pub msrs: usize,
    pub msrs_unreadable: Vec<u32>,
    pub xsave_bytes: usize,
    pub lapic: bool,
}

impl VmReport {
    pub fn of(vm: &proto::Vm) -> Self {
        let h = |v: u64| format!("{v:#x}");
        VmReport {
            name: vm.name.clone(),
            guest: vm.guest.clone(),
            memory_size: vm.memory_size,
            memory: vm.memory.clone(),
            irqchip: vm.irqchip,
            pit: vm.pit,
            clock: !vm.clock.is_empty(),
            vcpus: vm
                .vcpus
                .iter()
                .map(|c| VcpuReport {
                    id: c.id,
                    rip: h(c.rip),
                    rsp: h(c.rsp),
                    rflags: h(c.rflags),
                    cs: h(u64::from(c.cs)),
                    cr0: h(c.cr0),
                    cr3: h(c.cr3),
                    cr4: h(c.cr4),
                    efer: h(c.efer),
                    msrs: c.msrs.len(),
                    msrs_unreadable: c.msrs_unreadable.clone(),
                    xsave_bytes: c.xsave.len(),
                    lapic: !c.lapic.is_empty(),
                })
                .collect(),
            serial: vm.serial.clone(),
            report_device: vm.report.clone(),
            report_devices: if vm.vcpu_reports.is_empty() {
                vm.report.iter().cloned().collect()
            } else {
                vm.vcpu_reports.clone()
            },
        }
    }
}

impl fmt::Display for VmReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        writeln!(
            f,
            "  vm           {} (guest {}), {} MiB; irqchip {}, PIT {}, clock {}",
            self.name,
            self.guest,
            self.memory_size >> 20,
            yes(self.irqchip),
            yes(self.pit),
            yes(self.clock)
        )?;
        for m in &self.memory {
            writeln!(
                f,
                "  memory       slot {} at guest {:#x}, {} MiB",
                m.slot,
                m.guest_phys_addr,
                m.size >> 20
            )?;
        }
        for c in &self.vcpus {
            writeln!(
                f,
                "  vcpu {}       rip {} rsp {} rflags {} cs {} cr0 {} cr3 {} cr4 {} efer {}",
                c.id, c.rip, c.rsp, c.rflags, c.cs, c.cr0, c.cr3, c.cr4, c.efer
            )?;
            writeln!(
                f,
                "               {} MSRs ({} unreadable), xsave {} bytes, lapic {}",
                c.msrs,
                c.msrs_unreadable.len(),
                c.xsave_bytes,
                yes(c.lapic)
            )?;
        }
        if let Some(s) = &self.serial {
            writeln!(
                f,
                "  serial       16550 at {:#x}: lcr {:#x} ier {:#x} mcr {:#x}, {} bytes queued, {} sent",
                s.base,
                s.lcr,
                s.ier,
                s.mcr,
                s.rx.len(),
                s.transmitted
            )?;
        }
        for (i, r) in self.report_devices.iter().enumerate() {
            writeln!(
                f,
                "  report dev {i} counter {} checksum {:#018x}, every {} steps, limit {}, {} reports, {} errors",
                r.counter, r.checksum, r.every, r.limit, r.reports, r.errors
            )?;
        }
        Ok(())
    }
}

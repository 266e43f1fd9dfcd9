//! Saving and setting back a vCPU's and a VM's KVM state: every register set KVM exposes
//! (regs, sregs, fpu, xsave, xcrs, debug regs, lapic), every MSR KVM lists
//! (KVM_GET_MSR_INDEX_LIST), vCPU events and MP state; and the VM's clock, and with an
//! in-kernel irqchip the PICs, the IOAPIC and the PIT.
//!
//! The register sets are kept as the bytes of KVM's own structures (the kernel ABI, stable
//! across kernels), so nothing is lost in translation; [`VcpuState::summary`] decodes the
//! few registers a human wants to see. Bytes read back are length-checked against the
//! structure before use.

use super::KvmError;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// KVM structures that are plain integers and arrays of them: every bit pattern is a
/// valid value, so they can be copied to and from bytes.
///
/// # Safety
/// Implement only for `#[repr(C)]` types made solely of integers (and arrays/unions of
/// integers) with no invariants.
pub unsafe trait Pod: Default {}

// SAFETY: each of these kvm-bindings types is a #[repr(C)] struct of integers, arrays and
// unions of integers, generated from the kernel's UAPI headers.
unsafe impl Pod for kvm_regs {}
// SAFETY: as above.
unsafe impl Pod for kvm_sregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_fpu {}
// SAFETY: as above.
unsafe impl Pod for kvm_xsave {}
// SAFETY: as above.
unsafe impl Pod for kvm_xcrs {}
// SAFETY: as above.
unsafe impl Pod for kvm_debugregs {}
// SAFETY: as above.
unsafe impl Pod for kvm_lapic_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_vcpu_events {}
// SAFETY: as above.
unsafe impl Pod for kvm_mp_state {}
// SAFETY: as above.
unsafe impl Pod for kvm_clock_data {}
// SAFETY: as above (its union is of integer arrays and integer structs).
unsafe impl Pod for kvm_irqchip {}
// SAFETY: as above.
unsafe impl Pod for kvm_pit_state2 {}

/// The bytes of a KVM structure.
pub fn to_bytes<T: Pod>(v: &T) -> Vec<u8> {
    let mut out = vec![0u8; std::mem::size_of::<T>()];
    // SAFETY: `out` has exactly size_of::<T>() bytes; T is Pod (plain integers), so reading
    // its bytes is defined; the regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping((v as *const T).cast::<u8>(), out.as_mut_ptr(), out.len())
    };
    out
}

/// A KVM structure from its bytes; None unless `b` has exactly its size.
pub fn from_bytes<T: Pod>(b: &[u8]) -> Option<T> {
    if b.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: `b` has exactly size_of::<T>() bytes (checked above) and any bit pattern is a
    // valid T (Pod); `v` is a distinct local.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), b.len()) };
    Some(v)
}

/// One MSR's index and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    pub index: u32,
    pub value: u64,
}

/// Everything KVM holds about one vCPU, as KVM structure bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u32,
    pub regs: Vec<u8>,
    pub sregs: Vec<u8>,
    pub fpu: Vec<u8>,
    pub xsave: Vec<u8>,
    pub xcrs: Vec<u8>,
    pub debugregs: Vec<u8>,
    /// Empty when the VM has no in-kernel local APIC (no irqchip).
    pub lapic: Vec<u8>,
    pub events: Vec<u8>,
    pub mp_state: Vec<u8>,
    pub msrs: Vec<Msr>,
    /// MSRs KVM listed but refused to read (left out of `msrs`).
    pub msrs_unreadable: Vec<u32>,
}

/// The registers a person looks at first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RegsSummary {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cs: u16,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// MSRs read per KVM_GET_MSRS call.
const MSR_BATCH: usize = 64;

fn msrs_of(vm: &str, entries: &[kvm_msr_entry]) -> Result<Msrs, KvmError> {
    Msrs::from_entries(entries).map_err(|e| KvmError::invalid(vm, format!("MSR list: {e:?}")))
}

impl VcpuState {
    /// Reads all of `vcpu`'s state (it must not be in KVM_RUN).
    pub fn save(vm: &str, kvm: &Kvm, vcpu: &VcpuFd, id: u32) -> Result<Self, KvmError> {
        let io = |op| move |e| KvmError::ioctl(vm, op, e);
        let regs = vcpu.get_regs().map_err(io("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(io("KVM_GET_SREGS"))?;
        let fpu = vcpu.get_fpu().map_err(io("KVM_GET_FPU"))?;
        let xsave = vcpu.get_xsave().map_err(io("KVM_GET_XSAVE"))?;
        let xcrs = vcpu.get_xcrs().map_err(io("KVM_GET_XCRS"))?;
        let debugregs = vcpu.get_debug_regs().map_err(io("KVM_GET_DEBUGREGS"))?;
        // Without an in-kernel irqchip there is no local APIC to read (ENXIO).
        let lapic = vcpu.get_lapic().map(|l| to_bytes(&l)).unwrap_or_default();
        let events = vcpu.get_vcpu_events().map_err(io("KVM_GET_VCPU_EVENTS"))?;
        let mp_state = vcpu.get_mp_state().map_err(io("KVM_GET_MP_STATE"))?;
        let list = kvm
            .get_msr_index_list()
            .map_err(io("KVM_GET_MSR_INDEX_LIST"))?;
        let indices = list.as_slice().to_vec();
        let (msrs, msrs_unreadable) = read_msrs(vm, vcpu, &indices)?;
        Ok(VcpuState {
            id,
            regs: to_bytes(&regs),
            sregs: to_bytes(&sregs),
            fpu: to_bytes(&fpu),
            xsave: to_bytes(&xsave),
            xcrs: to_bytes(&xcrs),
            debugregs: to_bytes(&debugregs),
            lapic,
            events: to_bytes(&events),
            mp_state: to_bytes(&mp_state),
            msrs,
            msrs_unreadable,
        })
    }

    /// Checks every structure's size (before anything is created from it).
    pub fn check(&self, vm: &str) -> Result<(), KvmError> {
        fn size<T: Pod>(vm: &str, what: &str, b: &[u8], optional: bool) -> Result<(), KvmError> {
            if (optional && b.is_empty()) || b.len() == std::mem::size_of::<T>() {
                return Ok(());
            }
            Err(KvmError::invalid(
                vm,
                format!(
                    "vCPU {what} is {} bytes, KVM's structure is {}",
                    b.len(),
                    std::mem::size_of::<T>()
                ),
            ))
        }
        size::<kvm_regs>(vm, "regs", &self.regs, false)?;
        size::<kvm_sregs>(vm, "sregs", &self.sregs, false)?;
        size::<kvm_fpu>(vm, "fpu", &self.fpu, false)?;
        size::<kvm_xsave>(vm, "xsave", &self.xsave, false)?;
        size::<kvm_xcrs>(vm, "xcrs", &self.xcrs, false)?;
        size::<kvm_debugregs>(vm, "debugregs", &self.debugregs, false)?;
        size::<kvm_lapic_state>(vm, "lapic", &self.lapic, true)?;
        size::<kvm_vcpu_events>(vm, "vcpu events", &self.events, false)?;
        size::<kvm_mp_state>(vm, "mp state", &self.mp_state, false)
    }

    /// Sets the state back into a fresh vCPU, in the order KVM needs: sregs (modes) before
    /// regs, fpu then xsave (which supersedes it), xcrs, debug regs, MSRs, lapic, events
    /// (pending exceptions/NMIs, which depend on the modes), MP state last. Returns the
    /// MSRs KVM refused to set that do not already hold their saved value.
    pub fn restore(&self, vm: &str, vcpu: &VcpuFd) -> Result<Vec<u32>, KvmError> {
        self.check(vm)?;
        let bad = |what: &str| KvmError::invalid(vm, format!("vCPU {what}: wrong size"));
        let io = |op| move |e| KvmError::ioctl(vm, op, e);
        let sregs: kvm_sregs = from_bytes(&self.sregs).ok_or_else(|| bad("sregs"))?;
        vcpu.set_sregs(&sregs).map_err(io("KVM_SET_SREGS"))?;
        let regs: kvm_regs = from_bytes(&self.regs).ok_or_else(|| bad("regs"))?;
        vcpu.set_regs(&regs).map_err(io("KVM_SET_REGS"))?;
        let fpu: kvm_fpu = from_bytes(&self.fpu).ok_or_else(|| bad("fpu"))?;
        vcpu.set_fpu(&fpu).map_err(io("KVM_SET_FPU"))?;
        let xsave: kvm_xsave = from_bytes(&self.xsave).ok_or_else(|| bad("xsave"))?;
        // SAFETY: a plain kvm_xsave (4 KiB region, no trailing flexible array), as
        // KVM_GET_XSAVE returned it; KVM checks its contents.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(io("KVM_SET_XSAVE"))?;
        let xcrs: kvm_xcrs = from_bytes(&self.xcrs).ok_or_else(|| bad("xcrs"))?;
        vcpu.set_xcrs(&xcrs).map_err(io("KVM_SET_XCRS"))?;
        let dr: kvm_debugregs = from_bytes(&self.debugregs).ok_or_else(|| bad("debugregs"))?;
        vcpu.set_debug_regs(&dr).map_err(io("KVM_SET_DEBUGREGS"))?;
        let refused = write_msrs(vm, vcpu, &self.msrs)?;
        // A refused MSR that already holds the saved value lost nothing (KVM refuses writes
        // of some paravirtual MSRs the guest never enabled, even of their reset value).
        let (now, _) = read_msrs(vm, vcpu, &refused)?;
        let refused: Vec<u32> = refused
            .into_iter()
            .filter(|i| {
                let saved = self.msrs.iter().find(|m| m.index == *i).map(|m| m.value);
                now.iter().find(|m| m.index == *i).map(|m| m.value) != saved
            })
            .collect();
        if !self.lapic.is_empty() {
            let lapic: kvm_lapic_state = from_bytes(&self.lapic).ok_or_else(|| bad("lapic"))?;
            vcpu.set_lapic(&lapic).map_err(io("KVM_SET_LAPIC"))?;
        }
        let events: kvm_vcpu_events = from_bytes(&self.events).ok_or_else(|| bad("events"))?;
        vcpu.set_vcpu_events(&events)
            .map_err(io("KVM_SET_VCPU_EVENTS"))?;
        let mp: kvm_mp_state = from_bytes(&self.mp_state).ok_or_else(|| bad("mp state"))?;
        vcpu.set_mp_state(mp).map_err(io("KVM_SET_MP_STATE"))?;
        Ok(refused)
    }

    /// The main registers, decoded (zeros where the bytes are malformed).
    pub fn summary(&self) -> RegsSummary {
        let r: kvm_regs = from_bytes(&self.regs).unwrap_or_default();
        let s: kvm_sregs = from_bytes(&self.sregs).unwrap_or_default();
        RegsSummary {
            rip: r.rip,
            rsp: r.rsp,
            rflags: r.rflags,
            cs: s.cs.selector,
            cr0: s.cr0,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
        }
    }
}

/// Reads the listed MSRs in batches; an MSR KVM refuses ends a batch early and is noted.
fn read_msrs(vm: &str, vcpu: &VcpuFd, indices: &[u32]) -> Result<(Vec<Msr>, Vec<u32>), KvmError> {
    let mut got = Vec::with_capacity(indices.len());
    let mut refused = Vec::new();
    let mut i = 0;
    while i < indices.len() {
        let batch: Vec<kvm_msr_entry> = indices[i..(i + MSR_BATCH).min(indices.len())]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msrs_of(vm, &batch)?;
        let n = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| KvmError::ioctl(vm, "KVM_GET_MSRS", e))?;
        got.extend(msrs.as_slice().iter().take(n).map(|e| Msr {
            index: e.index,
            value: e.data,
        }));
        if n < batch.len() {
            refused.push(batch[n].index);
        }
        i += n + usize::from(n < batch.len());
    }
    Ok((got, refused))
}

/// Writes MSRs in batches; returns those KVM refused.
pub(crate) fn write_msrs(vm: &str, vcpu: &VcpuFd, all: &[Msr]) -> Result<Vec<u32>, KvmError> {
    let mut refused = Vec::new();
    let mut i = 0;
    while i < all.len() {
        let batch: Vec<kvm_msr_entry> = all[i..(i + MSR_BATCH).min(all.len())]
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.value,
                ..Default::default()
            })
            .collect();
        let n = vcpu
            .set_msrs(&msrs_of(vm, &batch)?)
            .map_err(|e| KvmError::ioctl(vm, "KVM_SET_MSRS", e))?;
        if n < batch.len() {
            refused.push(batch[n].index);
        }
        i += n + usize::from(n < batch.len());
    }
    Ok(refused)
}

/// The VM-wide state: what the VM has, and the clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// Whether the VM has an in-kernel irqchip (PIC/IOAPIC) and PIT (a Linux guest's VM
    /// has both, the demo guest's neither unless asked).
    pub irqchip: bool,
    pub pit: bool,
    /// KVM_GET_IRQCHIP's struct kvm_irqchip for the master PIC, the slave PIC and the
    /// IOAPIC, in that order; empty without an irqchip.
    pub chips: Vec<Vec<u8>>,
    /// KVM_GET_PIT2's struct kvm_pit_state2; empty without a PIT.
    pub pit_state: Vec<u8>,
    /// KVM_GET_CLOCK's kvm_clock_data, empty if KVM refused it.
    pub clock: Vec<u8>,
}

/// One irqchip KVM_GET_IRQCHIP knows: its id, name, and the ioctls as errors name them.
struct Chip {
    id: u32,
    what: &'static str,
    get: &'static str,
    set: &'static str,
}

/// The irqchips in the order [`VmState::chips`] holds them.
const CHIPS: [Chip; 3] = [
    Chip {
        id: KVM_IRQCHIP_PIC_MASTER,
        what: "master PIC",
        get: "KVM_GET_IRQCHIP (master PIC)",
        set: "KVM_SET_IRQCHIP (master PIC)",
    },
    Chip {
        id: KVM_IRQCHIP_PIC_SLAVE,
        what: "slave PIC",
        get: "KVM_GET_IRQCHIP (slave PIC)",
        set: "KVM_SET_IRQCHIP (slave PIC)",
    },
    Chip {
        id: KVM_IRQCHIP_IOAPIC,
        what: "IOAPIC",
        get: "KVM_GET_IRQCHIP (IOAPIC)",
        set: "KVM_SET_IRQCHIP (IOAPIC)",
    },
];

impl VmState {
    pub fn save(vm: &str, fd: &VmFd, irqchip: bool) -> Result<Self, KvmError> {
        let mut chips = Vec::new();
        let mut pit_state = Vec::new();
        if irqchip {
            for c in &CHIPS {
                let mut chip = kvm_irqchip {
                    chip_id: c.id,
                    ..Default::default()
                };
                fd.get_irqchip(&mut chip)
                    .map_err(|e| KvmError::ioctl(vm, c.get, e))?;
                chips.push(to_bytes(&chip));
            }
            let pit = fd
                .get_pit2()
                .map_err(|e| KvmError::ioctl(vm, "KVM_GET_PIT2", e))?;
            pit_state = to_bytes(&pit);
        }
        Ok(VmState {
            irqchip,
            pit: irqchip,
            chips,
            pit_state,
            clock: fd.get_clock().map(|c| to_bytes(&c)).unwrap_or_default(),
        })
    }

    /// Checks the sizes and the pairing of the saved structures (irqchip and PIT together,
    /// as this VMM creates them).
    pub fn check(&self, vm: &str) -> Result<(), KvmError> {
        let bad = |what: String| Err(KvmError::invalid(vm, what));
        if self.irqchip != self.pit {
            return bad(format!(
                "the snapshot has {} irqchip but {} PIT; this VMM creates both or neither",
                if self.irqchip { "an" } else { "no" },
                if self.pit { "a" } else { "no" }
            ));
        }
        let chips = if self.irqchip { CHIPS.len() } else { 0 };
        if self.chips.len() != chips {
            return bad(format!(
                "the snapshot has {} irqchip states, expected {chips}",
                self.chips.len()
            ));
        }
        for (c, b) in CHIPS.iter().zip(&self.chips) {
            match from_bytes::<kvm_irqchip>(b) {
                Some(chip) if chip.chip_id == c.id => {}
                _ => return bad(format!("{} state: wrong size or chip", c.what)),
            }
        }
        if self.pit && from_bytes::<kvm_pit_state2>(&self.pit_state).is_none()
            || !self.pit && !self.pit_state.is_empty()
        {
            return bad("PIT state: wrong size".into());
        }
        if !self.clock.is_empty() && from_bytes::<kvm_clock_data>(&self.clock).is_none() {
            return bad("VM clock: wrong size".into());
        }
        Ok(())
    }

    /// Sets the irqchip, PIT and clock back (only the clock's time: the flags KVM reports
    /// are not inputs). The VM must have been given its irqchip before its vCPUs.
    pub fn restore(&self, vm: &str, fd: &VmFd) -> Result<(), KvmError> {
        self.check(vm)?;
        for (c, b) in CHIPS.iter().zip(&self.chips) {
            let chip: kvm_irqchip =
                from_bytes(b).ok_or_else(|| KvmError::invalid(vm, format!("{} state", c.what)))?;
            fd.set_irqchip(&chip)
                .map_err(|e| KvmError::ioctl(vm, c.set, e))?;
        }
        if self.pit {
            let pit: kvm_pit_state2 =
                from_bytes(&self.pit_state).ok_or_else(|| KvmError::invalid(vm, "PIT state"))?;
            fd.set_pit2(&pit)
                .map_err(|e| KvmError::ioctl(vm, "KVM_SET_PIT2", e))?;
        }
        if self.clock.is_empty() {
            return Ok(());
        }
        let saved: kvm_clock_data =
            from_bytes(&self.clock).ok_or_else(|| KvmError::invalid(vm, "VM clock: wrong size"))?;
        let clock = kvm_clock_data {
            clock: saved.clock,
            ..Default::default()
        };
        fd.set_clock(&clock)
            .map_err(|e| KvmError::ioctl(vm, "KVM_SET_CLOCK", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with an irqchip and PIT on this host's KVM, or None (and why) without one.
    fn vm_with_irqchip(name: &str) -> Option<super::super::vm::Vm> {
        // Straight to standard error: the harness drops eprintln! output of passing tests.
        let skip = |why: String| {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {name}: {why}");
        };
        if !std::path::Path::new("/dev/kvm").exists() {
            skip("/dev/kvm does not exist".into());
            return None;
        }
        let mut vm = match super::super::vm::Vm::create(name, 4 << 20) {
            Ok(vm) => vm,
            Err(e) => {
                skip(format!("no VM: {e}"));
                return None;
            }
        };
        if let Err(e) = vm.create_irqchip() {
            skip(format!("no in-kernel irqchip: {e}"));
            return None;
        }
        Some(vm)
    }

    #[test]
    fn irqchip_and_pit_state_go_into_a_fresh_vm() {
        let Some(a) = vm_with_irqchip("irqchip-a") else {
            return;
        };
        // Distinctive state: the master PIC's mask and vector base, PIT channel 0's count
        // and mode.
        let mut pic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        a.fd.get_irqchip(&mut pic).expect("get PIC");
        // SAFETY: chip 0 is a PIC: KVM filled the union's pic member.
        let mut p = unsafe { pic.chip.pic };
        p.imr = 0xfa;
        p.irq_base = 0x30;
        pic.chip.pic = p;
        a.fd.set_irqchip(&pic).expect("set PIC");
        let mut pit = a.fd.get_pit2().expect("get PIT");
        pit.channels[0].count = 0x1234;
        pit.channels[0].mode = 2;
        a.fd.set_pit2(&pit).expect("set PIT");

        let saved = VmState::save("irqchip-a", &a.fd, true).expect("save");
        assert_eq!(saved.chips.len(), 3);
        saved.check("irqchip-a").expect("check");
        let Some(b) = vm_with_irqchip("irqchip-b") else {
            return;
        };
        saved.restore("irqchip-b", &b.fd).expect("restore");
        let again = VmState::save("irqchip-b", &b.fd, true).expect("save again");
        assert_eq!(
            again.chips, saved.chips,
            "PIC and IOAPIC state carried over"
        );
        let pit_b: kvm_pit_state2 = from_bytes(&again.pit_state).expect("PIT bytes");
        assert_eq!(pit_b.channels[0].count, 0x1234);
        assert_eq!(pit_b.channels[0].mode, 2);
        let chip: kvm_irqchip = from_bytes(&again.chips[0]).expect("PIC bytes");
        // SAFETY: chip 0 is a PIC.
        assert_eq!(unsafe { chip.chip.pic }.imr, 0xfa);

        // Sizes and pairing are checked before anything is set.
        let mut bad = saved.clone();
        bad.chips.pop();
        assert!(bad.check("t").is_err());
        let mut bad = saved.clone();
        bad.pit = false;
        assert!(bad.check("t").is_err());
        let mut bad = saved;
        bad.pit_state.truncate(8);
        assert!(bad.restore("irqchip-b", &b.fd).is_err());
    }

    #[test]
    fn bytes_round_trip_and_size_checks() {
        let r = kvm_regs {
            rip: 0x1234,
            rsp: 99,
            ..Default::default()
        };
        let b = to_bytes(&r);
        assert_eq!(b.len(), std::mem::size_of::<kvm_regs>());
        assert_eq!(from_bytes::<kvm_regs>(&b).map(|x| x.rip), Some(0x1234));
        assert!(from_bytes::<kvm_regs>(&b[1..]).is_none());
        let s = VcpuState {
            regs: b,
            ..Default::default()
        };
        assert_eq!(s.summary().rsp, 99);
        assert!(s.check("t").is_err(), "empty sregs are refused");
    }
}

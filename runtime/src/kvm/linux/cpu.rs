//! The boot vCPU of a Linux guest: 64-bit mode at startup_64 with RSI at the zero page
//! (the 64-bit boot protocol), the conventional reset values of the MSRs and FPU that a
//! firmware would leave, and the local APIC's LINT0/LINT1 wired as on a PC (ExtINT from the
//! PIC, NMI). KVM_SET_CPUID2 with the host's supported CPUID is done when the vCPU is
//! created ([`crate::kvm::vm::Vm::create_vcpu`]).

use super::layout::{Layout, STACK_TOP, ZERO_PAGE_ADDR};
use super::tables::{self, GDT_ADDR, PML4_ADDR, SEL_CODE, SEL_DATA, SEL_TSS};
use crate::kvm::state::{write_msrs, Msr};
use crate::kvm::vm::{self, Vm};
use crate::kvm::KvmError;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_MISC_ENABLE: fast string operations on.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs on, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Local APIC register offsets of LVT LINT0 and LINT1, and the delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The MSRs a kernel expects from firmware at boot.
pub fn boot_msrs() -> Vec<Msr> {
    let zero = [
        MSR_IA32_SYSENTER_CS,
        MSR_IA32_SYSENTER_ESP,
        MSR_IA32_SYSENTER_EIP,
        MSR_STAR,
        MSR_CSTAR,
        MSR_KERNEL_GS_BASE,
        MSR_SYSCALL_MASK,
        MSR_LSTAR,
        MSR_IA32_TSC,
    ];
    let mut msrs: Vec<Msr> = zero.iter().map(|&index| Msr { index, value: 0 }).collect();
    msrs.push(Msr {
        index: MSR_IA32_MISC_ENABLE,
        value: MISC_ENABLE_FAST_STRING,
    });
    msrs.push(Msr {
        index: MSR_MTRR_DEF_TYPE,
        value: MTRR_ENABLE_WB,
    });
    msrs
}

/// `reg` with its delivery mode (bits 8-10) set to `mode`.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Sets up the boot vCPU to enter the kernel laid out as `l` says.
pub fn setup_boot_vcpu(vm: &Vm, vcpu: &VcpuFd, l: &Layout) -> Result<(), KvmError> {
    let name = vm.name.as_str();
    let io = |op| move |e| KvmError::ioctl(name, op, e);
    let refused = write_msrs(name, vcpu, &boot_msrs())?;
    if !refused.is_empty() {
        eprintln!("stasis: VM {name}: KVM refused to set the boot MSRs {refused:x?}");
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(io("KVM_SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(io("KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let b = &mut lapic.regs[off..off + 4];
        let reg = u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
        for (d, s) in b
            .iter_mut()
            .zip(with_delivery_mode(reg, mode).to_le_bytes())
        {
            *d = s as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(io("KVM_SET_LAPIC"))?;
    let tss = vm::flat_segment(SEL_TSS, 0xb, 0, 0);
    vm::set_long_mode(
        name,
        vcpu,
        &vm::LongMode {
            code: SEL_CODE,
            data: SEL_DATA,
            tr: kvm_segment {
                limit: 0x67,
                s: 0,
                g: 0,
                ..tss
            },
            gdt_base: GDT_ADDR,
            gdt_limit: (tables::GDT_ENTRIES * 8 - 1) as u16,
            cr0: vm::CR0_PE | vm::CR0_ET | vm::CR0_PG,
            cr3: PML4_ADDR,
        },
    )?;
    let regs = kvm_regs {
        rip: l.entry,
        rsi: ZERO_PAGE_ADDR,
        rsp: STACK_TOP,
        rbp: STACK_TOP,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(io("KVM_SET_REGS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes() {
        assert_eq!(
            with_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(with_delivery_mode(0x0000_0700, APIC_MODE_NMI), 0x0000_0400);
        let msrs = boot_msrs();
        assert!(msrs
            .iter()
            .any(|m| m.index == MSR_MTRR_DEF_TYPE && m.value == 0x806));
    }
}

//! Creating a VM: its memory slot, its vCPUs and the 64-bit environment the VMM builds for
//! the guest instead of the guest's own (slow, emulated under PVM) ring-0 code.
//!
//! Guest-physical layout of the low 1 MiB (identity mapped, like all of memory):
//!
//! | address   | what |
//! |-----------|------|
//! | 0x1000    | GDT: null, kernel code 0x08, kernel data 0x10, user data 0x1b, user code 0x23, TSS 0x28 |
//! | 0x2000    | PML4; 0x3000 PDPT; 0x4000..0x7fff page directories (2 MiB pages, user-accessible) |
//! | 0x8000    | TSS with an all-open I/O permission bitmap (ring-3 port I/O; see below) |
//! | 0xb000    | ring-0 stack, top at 0xf000 |
//! | 0x10000   | guest code |
//! | 0x20000   | ring-3 stack, top at 0x30000 |
//! | 0x100000  | the rest: the demo guest's work area |

use super::memory::GuestMemory;
use super::KvmError;
use kvm_bindings::{
    kvm_pit_config, kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

pub const GDT_ADDR: u64 = 0x1000;
pub const PML4_ADDR: u64 = 0x2000;
pub const PDPT_ADDR: u64 = 0x3000;
pub const PD_ADDR: u64 = 0x4000;
pub const TSS_ADDR: u64 = 0x8000;
/// The TSS's limit: 0x68 bytes of TSS, the 8 KiB I/O bitmap and its terminating 0xff byte.
pub const TSS_LIMIT: u32 = 0x68 + 8192;
/// Page directories fit between PD_ADDR and the TSS: 4 of them, 4 GiB.
pub const MAX_MEMORY: u64 = 4 << 30;
pub const RING0_STACK_TOP: u64 = 0xf000;
pub const CODE_ADDR: u64 = 0x10000;
pub const CODE_MAX: u64 = 0x10000;
pub const RING3_STACK_TOP: u64 = 0x30000;
/// Start of the memory the guest's workload owns.
pub const WORK_ADDR: u64 = 0x100000;

pub const SEL_KERNEL_CS: u16 = 0x08;
pub const SEL_KERNEL_DS: u16 = 0x10;
pub const SEL_USER_DS: u16 = 0x18 | 3;
pub const SEL_USER_CS: u16 = 0x20 | 3;
pub const SEL_TSS: u16 = 0x28;

/// RFLAGS bit 1 (always set) and IOPL=3.
pub const RFLAGS_IOPL3: u64 = 0x2 | (3 << 12);

pub const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A VM with its memory, before any vCPU runs.
pub struct Vm {
    pub name: String,
    kvm: Kvm,
    pub fd: VmFd,
    pub mem: GuestMemory,
    /// Whether it has an in-kernel irqchip and PIT ([`Vm::create_irqchip`]).
    pub irqchip: bool,
}

impl Vm {
    /// Opens /dev/kvm, creates the VM and registers `mem_size` bytes of memory at 0.
    pub fn create(name: &str, mem_size: u64) -> Result<Vm, KvmError> {
        if !(2 << 20..=MAX_MEMORY).contains(&mem_size) {
            return Err(KvmError::invalid(
                name,
                format!(
                    "memory {} MiB: this VMM takes 2 MiB to {} MiB",
                    mem_size >> 20,
                    MAX_MEMORY >> 20
                ),
            ));
        }
        let kvm = Kvm::new().map_err(|e| KvmError::ioctl(name, "open /dev/kvm", e))?;
        let fd = kvm
            .create_vm()
            .map_err(|e| KvmError::ioctl(name, "KVM_CREATE_VM", e))?;
        let mem = GuestMemory::new(name, mem_size)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem.size(),
            userspace_addr: mem.host_addr(),
        };
        // SAFETY: the region is the live mapping of `mem`, which the Vm owns and drops only
        // after the VM fd (field order), so KVM never sees it unmapped.
        unsafe { fd.set_user_memory_region(region) }
            .map_err(|e| KvmError::ioctl(name, "KVM_SET_USER_MEMORY_REGION", e))?;
        Ok(Vm {
            name: name.to_string(),
            kvm,
            fd,
            mem,
            irqchip: false,
        })
    }

    /// The /dev/kvm handle (for system ioctls such as KVM_GET_MSR_INDEX_LIST).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Turns KVM's dirty page logging of slot 0 on or off (KVM_MEM_LOG_DIRTY_PAGES); safe
    /// while the vCPU runs.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), KvmError> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: 0,
            memory_size: self.mem.size(),
            userspace_addr: self.mem.host_addr(),
        };
        // SAFETY: the same live mapping of `self.mem` as registered in create(); only the
        // flags change.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| KvmError::ioctl(&self.name, "KVM_SET_USER_MEMORY_REGION (dirty log)", e))
    }

    /// The pages written since logging started or since the last call, as a bitmap.
    pub fn dirty_log(&self) -> Result<Vec<u64>, KvmError> {
        let size = usize::try_from(self.mem.size())
            .map_err(|_| KvmError::invalid(&self.name, "memory size overflows usize"))?;
        self.fd
            .get_dirty_log(0, size)
            .map_err(|e| KvmError::ioctl(&self.name, "KVM_GET_DIRTY_LOG", e))
    }

    /// Creates vCPU `id` with the host's supported CPUID (KVM refuses long mode to a vCPU
    /// whose CPUID lacks it).
    pub fn create_vcpu(&self, id: u64) -> Result<VcpuFd, KvmError> {
        let vcpu = self
            .fd
            .create_vcpu(id)
            .map_err(|e| KvmError::ioctl(&self.name, "KVM_CREATE_VCPU", e))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| KvmError::ioctl(&self.name, "KVM_GET_SUPPORTED_CPUID", e))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| KvmError::ioctl(&self.name, "KVM_SET_CPUID2", e))?;
        Ok(vcpu)
    }

    /// Writes the GDT, TSS and identity page tables (2 MiB pages over all of memory, user
    /// accessible) into guest memory.
    pub fn build_tables(&self) -> Result<(), KvmError> {
        let mut gdt = [0u64; 7];
        gdt[1] = 0x00af_9a00_0000_ffff; // kernel code, 64-bit, DPL 0
        gdt[2] = 0x00cf_9200_0000_ffff; // kernel data
        gdt[3] = 0x00cf_f200_0000_ffff; // user data, DPL 3
        gdt[4] = 0x00af_fa00_0000_ffff; // user code, 64-bit, DPL 3
        let (lo, hi) = tss_descriptor(TSS_ADDR, TSS_LIMIT);
        gdt[5] = lo;
        gdt[6] = hi;
        let mut ok = true;
        for (i, d) in gdt.iter().enumerate() {
            ok &= self.mem.write_u64(GDT_ADDR + 8 * i as u64, *d);
        }
        // The TSS: RSP0 (used if the guest ever enters ring 0 from ring 3) and an I/O
        // permission bitmap right after it, all zero (every port open to ring 3), ended by
        // 0xff. PVM runs ring 3 with IOPL 0 whatever RFLAGS says, so the bitmap is what
        // lets the ring-3 workload do port I/O.
        ok &= self.mem.write_u64(TSS_ADDR + 4, RING0_STACK_TOP);
        ok &= self.mem.write(TSS_ADDR + 0x66, &0x68u16.to_le_bytes());
        ok &= self.mem.write(TSS_ADDR + u64::from(TSS_LIMIT), &[0xff]);
        // Present | writable | user.
        const PRW_USER: u64 = 0x7;
        const PAGE_2M: u64 = 1 << 7;
        ok &= self.mem.write_u64(PML4_ADDR, PDPT_ADDR | PRW_USER);
        let two_mib = self.mem.size() / (2 << 20);
        for pd in 0..two_mib.div_ceil(512) {
            ok &= self
                .mem
                .write_u64(PDPT_ADDR + 8 * pd, (PD_ADDR + 0x1000 * pd) | PRW_USER);
        }
        for i in 0..two_mib {
            ok &= self
                .mem
                .write_u64(PD_ADDR + 8 * i, (i << 21) | PRW_USER | PAGE_2M);
        }
        if ok {
            Ok(())
        } else {
            Err(KvmError::invalid(
                &self.name,
                "memory too small for the GDT and page tables",
            ))
        }
    }

    /// Puts `vcpu` in 64-bit ring 0 with the VMM's GDT, TSS and page tables.
    pub fn enter_long_mode(&self, vcpu: &VcpuFd) -> Result<(), KvmError> {
        let tss = flat_segment(SEL_TSS, 0xb, 0, 0);
        set_long_mode(
            &self.name,
            vcpu,
            &LongMode {
                code: SEL_KERNEL_CS,
                data: SEL_KERNEL_DS,
                tr: kvm_segment {
                    base: TSS_ADDR,
                    limit: TSS_LIMIT,
                    s: 0,
                    g: 0,
                    ..tss
                },
                gdt_base: GDT_ADDR,
                gdt_limit: 7 * 8 - 1,
                cr0: CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG,
                cr3: PML4_ADDR,
            },
        )
    }

    /// Gives the VM an in-kernel irqchip (PIC, IOAPIC, local APICs) and PIT, as a Linux
    /// guest needs; before any vCPU is created. KVM_SET_TSS_ADDR puts the three pages VMX
    /// needs for real mode just below the BIOS area at the top of 4 GiB, out of guest RAM.
    pub fn create_irqchip(&mut self) -> Result<(), KvmError> {
        self.fd
            .set_tss_address(0xfffb_d000)
            .map_err(|e| KvmError::ioctl(&self.name, "KVM_SET_TSS_ADDR", e))?;
        self.fd
            .create_irq_chip()
            .map_err(|e| KvmError::ioctl(&self.name, "KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(|e| KvmError::ioctl(&self.name, "KVM_CREATE_PIT2", e))?;
        self.irqchip = true;
        Ok(())
    }
}

/// A flat 4 GiB segment (base 0, page granular) with DPL from the selector's RPL.
pub fn flat_segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: (selector & 3) as u8,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// What a vCPU entering 64-bit mode is given: its selectors (flat code and data), TR, GDT,
/// CR0 and page tables.
pub struct LongMode {
    pub code: u16,
    pub data: u16,
    pub tr: kvm_segment,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub cr0: u64,
    pub cr3: u64,
}

/// Sets `vcpu`'s segments and control registers for 64-bit mode as `m` says (no IDT:
/// the guest loads its own before it enables interrupts).
pub fn set_long_mode(vm: &str, vcpu: &VcpuFd, m: &LongMode) -> Result<(), KvmError> {
    let mut s = vcpu
        .get_sregs()
        .map_err(|e| KvmError::ioctl(vm, "KVM_GET_SREGS", e))?;
    s.cs = flat_segment(m.code, 0xb, 1, 0);
    let data = flat_segment(m.data, 0x3, 0, 1);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = m.tr;
    s.ldt = kvm_segment {
        unusable: 1,
        present: 0,
        s: 0,
        type_: 0x2,
        ..flat_segment(0, 0x2, 0, 0)
    };
    s.gdt.base = m.gdt_base;
    s.gdt.limit = m.gdt_limit;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = m.cr0;
    s.cr3 = m.cr3;
    s.cr4 = CR4_PAE;
    s.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&s)
        .map_err(|e| KvmError::ioctl(vm, "KVM_SET_SREGS", e))
}

/// The two words of a 64-bit available-TSS descriptor.
fn tss_descriptor(base: u64, limit: u32) -> (u64, u64) {
    let limit = u64::from(limit);
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    (lo, base >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tss_descriptor_fields() {
        let (lo, hi) = tss_descriptor(0x1234_5678_9abc, 0x67);
        assert_eq!(lo & 0xffff, 0x67);
        assert_eq!((lo >> 16) & 0xff_ffff, 0x78_9abc);
        assert_eq!((lo >> 40) & 0xff, 0x89);
        assert_eq!((lo >> 56) & 0xff, 0x56);
        assert_eq!(hi, 0x1234);
    }
}

//! Booting a Linux bzImage with the 64-bit boot protocol (Documentation/arch/x86/boot.rst):
//! the VMM parses the setup header ([`bzimage`]), plans where everything goes in guest
//! memory ([`layout`]), writes the kernel, initrd, command line, zero page ([`boot_params`]),
//! GDT and identity page tables ([`tables`]), and starts the boot vCPU at startup_64 in long
//! mode ([`cpu`]). Everything that can be refused is refused by [`check`], before a VM exists.
//!
//! Needs VMX or SVM: under PVM a stock kernel cannot boot (see [`super::hardware_virtualization`]).

pub mod boot_params;
pub mod bzimage;
pub mod cpu;
pub mod layout;
pub mod tables;

use super::vm::Vm;
use super::KvmError;
use bzimage::BzImage;
use kvm_ioctls::VcpuFd;
use layout::Layout;
use std::path::Path;

/// Why a kernel, initrd or command line cannot be booted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootError {
    #[error("not a bzImage: {0}")]
    NotBzImage(String),
    #[error(
        "boot protocol {}.{:02}: this VMM boots protocol 2.12 or later (the 64-bit entry point)",
        .0 >> 8,
        .0 & 0xff
    )]
    OldProtocol(u16),
    #[error("the kernel has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")]
    No64BitEntry,
    #[error(
        "the kernel needs guest memory up to {need:#x} ({} MiB) to decompress and run; the VM has {} MiB",
        need.div_ceil(1 << 20),
        have >> 20
    )]
    KernelTooBig { need: u64, have: u64 },
    #[error(
        "the initrd ({size} bytes) does not fit between the kernel's end {low:#x} and {high:#x} \
         (the top of memory or the kernel's initrd_addr_max)"
    )]
    InitrdTooBig { size: u64, low: u64, high: u64 },
    #[error("the command line is {len} bytes; the kernel takes at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error(
        "memory {} MiB: a Linux guest takes at most {} MiB here (above is the MMIO hole of the \
         local APIC and IOAPIC)",
        .0 >> 20,
        layout::MAX_MEMORY >> 20
    )]
    MemoryTooLarge(u64),
    #[error("guest memory: cannot write the {0}")]
    Write(&'static str),
}

fn boot_err(vm: &str, file: &Path, err: BootError) -> KvmError {
    KvmError::Boot {
        vm: vm.to_string(),
        file: file.to_path_buf(),
        err,
    }
}

fn read(vm: &str, path: &Path) -> Result<Vec<u8>, KvmError> {
    std::fs::read(path).map_err(|e| KvmError::sys(vm, format!("read {}", path.display()), e))
}

fn file_len(vm: &str, path: &Path) -> Result<u64, KvmError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| KvmError::sys(vm, format!("stat {}", path.display()), e))
}

/// The layout of `kernel` (already read) in `mem_size` bytes with an initrd of `initrd_len`
/// bytes and `cmdline`; the errors name the file they are about.
fn plan_for(
    vm: &str,
    kernel_path: &Path,
    kernel: &[u8],
    initrd: Option<(&Path, u64)>,
    cmdline: &str,
    mem_size: u64,
) -> Result<Layout, KvmError> {
    let img = BzImage::parse(kernel).map_err(|e| boot_err(vm, kernel_path, e))?;
    layout::plan(
        &img.header,
        img.kernel.len() as u64,
        mem_size,
        initrd.map(|(_, len)| len),
        cmdline.len(),
    )
    .map_err(|e| match (&e, initrd) {
        (BootError::InitrdTooBig { .. }, Some((p, _))) => boot_err(vm, p, e),
        _ => boot_err(vm, kernel_path, e),
    })
}

/// Checks that `kernel` (with `initrd` and `cmdline`) boots in `mem_size` bytes, without
/// creating anything.
pub fn check(
    vm: &str,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    mem_size: u64,
) -> Result<Layout, KvmError> {
    let bytes = read(vm, kernel)?;
    let initrd = match initrd {
        Some(p) => Some((p, file_len(vm, p)?)),
        None => None,
    };
    plan_for(vm, kernel, &bytes, initrd, cmdline, mem_size)
}

/// Loads `kernel`, `initrd` and `cmdline` into `vm`'s memory and sets `vcpu` (the boot
/// vCPU) to enter the kernel at startup_64. The VM must have its irqchip (see
/// [`Vm::create_irqchip`]).
pub fn load(
    vm: &Vm,
    vcpu: &VcpuFd,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<Layout, KvmError> {
    let name = vm.name.as_str();
    let bytes = read(name, kernel)?;
    let initrd_bytes = initrd.map(|p| read(name, p)).transpose()?;
    let sized = initrd.zip(initrd_bytes.as_ref().map(|b| b.len() as u64));
    let layout = plan_for(name, kernel, &bytes, sized, cmdline, vm.mem.size())?;
    let img = BzImage::parse(&bytes).map_err(|e| boot_err(name, kernel, e))?;
    layout::write(&vm.mem, &img, &layout, initrd_bytes.as_deref(), cmdline)
        .map_err(|e| boot_err(name, kernel, e))?;
    cpu::setup_boot_vcpu(vm, vcpu, &layout)?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_vm_and_the_file() {
        let dir = std::env::temp_dir().join(format!("stasis-linux-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let not = dir.join("notakernel");
        std::fs::write(&not, vec![0u8; 4096]).expect("write");
        let e = check("vm1", &not, None, "console=ttyS0", 256 << 20)
            .expect_err("not a bzImage")
            .to_string();
        assert!(e.contains("vm1") && e.contains("notakernel") && e.contains("not a bzImage"));
        let k = dir.join("bzImage");
        std::fs::write(&k, bzimage::tests::synthetic(1 << 20)).expect("write");
        assert!(check("vm1", &k, None, "console=ttyS0", 256 << 20).is_ok());
        let long = "x".repeat(3000);
        let e = check("vm1", &k, None, &long, 256 << 20)
            .expect_err("too long")
            .to_string();
        assert!(
            e.contains("3000 bytes") && e.contains("at most 2047"),
            "{e}"
        );
        let big = dir.join("initrd.img");
        std::fs::File::create(&big)
            .and_then(|f| f.set_len(250 << 20))
            .expect("sparse initrd");
        let e = check("vm1", &k, Some(&big), "", 256 << 20)
            .expect_err("initrd too big")
            .to_string();
        assert!(
            e.contains("initrd.img") && e.contains("does not fit"),
            "{e}"
        );
        let missing = dir.join("missing");
        assert!(check("vm1", &missing, None, "", 256 << 20).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

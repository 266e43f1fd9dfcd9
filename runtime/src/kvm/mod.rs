//! A small KVM virtual machine monitor: one VM per process, its guest memory in a memfd,
//! vCPUs in 64-bit long mode set up by the VMM ([`vm`]), the vCPU run loop ([`vcpu`]) on one
//! thread per vCPU ([`threads`]), a
//! 16550 serial console ([`serial`]), the demo guest's report device ([`report`]), the
//! built-in demo guest ([`demo`]), the Linux bzImage loader ([`linux`]), the console client
//! ([`console`]) and the VMM process with its control socket ([`vmm`]).
//!
//! The VMM is written for two kinds of host: those with VMX/SVM, where KVM runs any guest,
//! and those whose /dev/kvm is PVM (a software virtualizer: ring 0 of the guest is emulated
//! instruction by instruction, ring 3 runs natively, no interrupts for a guest that is not
//! PVM-aware). The demo guest runs on both: the VMM sets up long mode and page tables
//! itself, and the guest's only ring-0 instruction is the `iretq` into its ring-3 workload.

pub mod console;
pub mod demo;
pub mod linux;
pub mod memory;
pub mod report;
pub mod serial;
pub mod snapshot;
pub mod state;
pub mod threads;
pub mod vcpu;
pub mod vm;
pub mod vmm;

use std::path::PathBuf;

/// Errors of the VMM, naming the VM and the failing operation.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// A KVM ioctl failed.
    #[error("VM {vm}: {op}: {err}")]
    Ioctl {
        vm: String,
        op: &'static str,
        err: std::io::Error,
    },
    /// A system call other than a KVM ioctl failed.
    #[error("VM {vm}: {op}: {err}")]
    Sys {
        vm: String,
        op: String,
        err: std::io::Error,
    },
    /// The configuration asked for cannot be run.
    #[error("VM {vm}: {what}")]
    Invalid { vm: String, what: String },
    /// This host cannot do what was asked, and why.
    #[error("VM {vm}: {what}")]
    Unsupported { vm: String, what: String },
    /// A VM built and held before its guest ran was discarded, as its starter asked.
    #[error("VM {vm}: discarded before its guest ran")]
    Discarded { vm: String },
    /// The guest did something the VMM does not handle.
    #[error("VM {vm}: the guest stopped: {what}")]
    Guest { vm: String, what: String },
    /// The image a VM was restored from failed the check that ran beside the guest.
    #[error(
        "VM {vm}: its image failed verification after the guest started, so the VM was \
         stopped and removed (the image is unchanged): {what}"
    )]
    Unverified { vm: String, what: String },
    #[error("VM {0:?} already exists and is running")]
    Exists(String),
    #[error("no such VM {0:?}")]
    NoSuch(String),
    /// Talking to a VM's VMM over its control socket failed.
    #[error("VM {vm}: control socket {path}: {what}")]
    Control {
        vm: String,
        path: PathBuf,
        what: String,
    },
    /// A kernel, initrd or command line that cannot be booted, and the file it is about.
    #[error("VM {vm}: {}: {err}", file.display())]
    Boot {
        vm: String,
        file: PathBuf,
        err: linux::BootError,
    },
    #[error(transparent)]
    State(#[from] crate::container::ContainerError),
}

impl KvmError {
    pub(crate) fn ioctl(vm: &str, op: &'static str, err: kvm_ioctls::Error) -> Self {
        KvmError::Ioctl {
            vm: vm.to_string(),
            op,
            err: std::io::Error::from_raw_os_error(err.errno()),
        }
    }

    pub(crate) fn sys(vm: &str, op: impl Into<String>, err: std::io::Error) -> Self {
        KvmError::Sys {
            vm: vm.to_string(),
            op: op.into(),
            err,
        }
    }

    pub(crate) fn invalid(vm: &str, what: impl Into<String>) -> Self {
        KvmError::Invalid {
            vm: vm.to_string(),
            what: what.into(),
        }
    }
}

/// Hardware virtualization of the host CPU, from the flags in /proc/cpuinfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HwVirt {
    Vmx,
    Svm,
}

/// Whether the host CPU has VMX or SVM (None: /dev/kvm, if present, is a software
/// virtualizer such as PVM, which cannot boot a stock Linux kernel).
pub fn hardware_virtualization() -> Option<HwVirt> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    hw_virt_in(&text)
}

fn hw_virt_in(cpuinfo: &str) -> Option<HwVirt> {
    crate::procfs::cpu_flags_in(cpuinfo)
        .iter()
        .find_map(|f| match f.as_str() {
            "vmx" => Some(HwVirt::Vmx),
            "svm" => Some(HwVirt::Svm),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_hardware_virtualization() {
        let vmx = "processor\t: 0\nflags\t\t: fpu vme de vmx sse\n";
        assert_eq!(hw_virt_in(vmx), Some(HwVirt::Vmx));
        assert_eq!(hw_virt_in("flags : fpu svm\n"), Some(HwVirt::Svm));
        assert_eq!(hw_virt_in("flags : fpu vmxe hypervisor\n"), None);
        assert_eq!(hw_virt_in("processor : 0\n"), None);
    }
}

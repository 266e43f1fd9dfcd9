//! The vCPU run loop: KVM_RUN until the guest shuts down or the VMM is asked to stop,
//! handling port I/O for the serial console and the report device.
//!
//! Stopping: whoever wants the vCPU out of KVM_RUN sets the stop flag and sends the vCPU
//! thread [`KICK_SIGNAL`] (a no-op handler installed without SA_RESTART, so KVM_RUN returns
//! EINTR) until the thread has left the loop; sending it repeatedly closes the race with a
//! thread that checked the flag just before entering KVM_RUN.

use super::console::lock;
use super::report::{ReportDevice, SHUTDOWN_PORT};
use super::serial::Serial;
use super::KvmError;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the no-op [`KICK_SIGNAL`] handler (idempotent).
pub fn install_kick_handler() -> Result<(), std::io::Error> {
    install_handler(KICK_SIGNAL, on_kick)
}

/// Installs `handler` (which must be async-signal-safe) for `sig`, without SA_RESTART so
/// blocking calls such as KVM_RUN return EINTR.
pub fn install_handler(
    sig: libc::c_int,
    handler: extern "C" fn(libc::c_int),
) -> Result<(), std::io::Error> {
    // SAFETY: a zeroed sigaction with the given handler and an empty mask; the caller
    // passes an async-signal-safe handler.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One vCPU's demo workload as its report device last saw it.
#[derive(Debug, Default)]
pub struct VcpuStatus {
    pub counter: AtomicU64,
    pub checksum: AtomicU64,
    pub reports: AtomicU64,
    pub errors: AtomicU64,
}

impl VcpuStatus {
    /// Publishes what `dev` has seen.
    pub fn publish(&self, dev: &ReportDevice) {
        let (counter, checksum) = dev.last();
        self.counter.store(counter, Ordering::Relaxed);
        self.checksum.store(checksum, Ordering::Relaxed);
        self.reports.store(dev.reports, Ordering::Relaxed);
        self.errors.store(dev.errors, Ordering::Relaxed);
    }
}

/// What the VM is doing and has done, shared between the vCPU threads and the control
/// socket.
#[derive(Debug, Default)]
pub struct VmStatus {
    /// One per vCPU, in vCPU order.
    pub vcpus: Vec<VcpuStatus>,
    pub serial_bytes: AtomicU64,
    pub exits: AtomicU64,
    /// Microseconds from the first KVM_RUN to the guest's first port I/O (its ring-0 setup
    /// and the entry to ring 3), 0 until then.
    pub setup_us: AtomicU64,
    /// Where guest memory is mapped in the VMM.
    pub mem_host_addr: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl VmStatus {
    /// The status of a VM with `vcpus` vCPUs, before any runs.
    pub fn new(vcpus: usize) -> Self {
        VmStatus {
            vcpus: (0..vcpus).map(|_| VcpuStatus::default()).collect(),
            ..Default::default()
        }
    }

    /// Publishes what a vCPU's report device has seen, its last error included.
    pub fn take_report(&self, dev: &ReportDevice) {
        let Some(v) = usize::try_from(dev.index)
            .ok()
            .and_then(|i| self.vcpus.get(i))
        else {
            return;
        };
        v.publish(dev);
        if dev.errors > 0 {
            if let Ok(mut e) = self.last_error.lock() {
                e.clone_from(&dev.last_error);
            }
        }
    }
}

/// The i8042 keyboard controller's command port; 0xfe written to it resets the machine.
pub const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// The devices on the guest's I/O ports, as one vCPU's thread sees them.
pub struct Devices {
    /// Shared with the other vCPUs and the control socket, which queues console input.
    pub serial: Arc<Mutex<Serial>>,
    /// This vCPU's own.
    pub report: ReportDevice,
    /// A Linux guest: KVM_EXIT_SHUTDOWN (a triple fault, which is how `reboot=t` resets)
    /// ends it cleanly rather than as a failure.
    pub linux: bool,
}

/// Why the run loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The guest wrote this code to the shutdown port.
    Shutdown(u8),
    /// The guest halted.
    Halted,
    /// The VMM was asked to stop.
    Stopped,
    /// The VMM asked the vCPU to pause (for a snapshot); it may run again.
    Paused,
    /// The guest reset the machine, which ends the VM (this VMM does not reboot).
    Reset(&'static str),
}

/// Runs `vcpu` until it ends (see [`Ended`]) or fails.
pub fn run(
    vm: &str,
    vcpu: &mut VcpuFd,
    dev: &mut Devices,
    status: &VmStatus,
    stop: &AtomicBool,
    pause: &AtomicBool,
) -> Result<Ended, KvmError> {
    let start = Instant::now();
    let mut first_io = status.setup_us.load(Ordering::Relaxed) == 0;
    loop {
        if stop.load(Ordering::SeqCst) {
            return Ok(Ended::Stopped);
        }
        if pause.load(Ordering::SeqCst) {
            return Ok(Ended::Paused);
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(KvmError::ioctl(vm, "KVM_RUN", e)),
        };
        status.exits.fetch_add(1, Ordering::Relaxed);
        if first_io && matches!(exit, VcpuExit::IoOut(..) | VcpuExit::IoIn(..)) {
            first_io = false;
            let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
            status.setup_us.store(us.max(1), Ordering::Relaxed);
        }
        match exit {
            VcpuExit::IoOut(port, data) => {
                let mut serial = lock(&dev.serial);
                if serial.handles(port) {
                    for b in data {
                        serial.write(port, *b);
                    }
                    status
                        .serial_bytes
                        .store(serial.transmitted, Ordering::Relaxed);
                } else if port == I8042_COMMAND && data.first() == Some(&I8042_RESET) {
                    return Ok(Ended::Reset("i8042 reset (0xfe to port 0x64)"));
                } else if ReportDevice::handles(port) {
                    let committed = dev.report.write(port, data);
                    if committed || dev.report.errors > 0 {
                        status.take_report(&dev.report);
                    }
                } else if port == SHUTDOWN_PORT {
                    return Ok(Ended::Shutdown(data.first().copied().unwrap_or(0)));
                }
                // Other ports: ignored, as on a PC with nothing there.
            }
            VcpuExit::IoIn(port, data) => {
                let mut serial = lock(&dev.serial);
                if serial.handles(port) {
                    for b in data.iter_mut() {
                        *b = serial.read(port);
                    }
                } else {
                    data.fill(0xff);
                }
            }
            VcpuExit::Hlt => return Ok(Ended::Halted),
            VcpuExit::Shutdown if dev.linux => {
                return Ok(Ended::Reset("triple fault or shutdown (KVM_EXIT_SHUTDOWN)"))
            }
            VcpuExit::Shutdown => {
                return Err(KvmError::Guest {
                    vm: vm.to_string(),
                    what: format!("triple fault (KVM_EXIT_SHUTDOWN) {}", where_(vcpu)),
                })
            }
            VcpuExit::InternalError => {
                return Err(KvmError::Guest {
                    vm: vm.to_string(),
                    what: format!(
                        "KVM internal error (KVM_EXIT_INTERNAL_ERROR), an instruction KVM \
                         cannot emulate? {}",
                        where_(vcpu)
                    ),
                })
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Err(KvmError::Guest {
                    vm: vm.to_string(),
                    what: format!("entry failed: hardware reason {reason:#x} on cpu {cpu}"),
                })
            }
            other => {
                return Err(KvmError::Guest {
                    vm: vm.to_string(),
                    what: format!("unhandled exit {other:?}"),
                })
            }
        }
    }
}

/// Where the vCPU is, for error messages.
fn where_(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "at rip {:#x} (cs {:#x}, rsp {:#x}, rflags {:#x}, cr0 {:#x}, cr3 {:#x}, efer {:#x})",
            r.rip, s.cs.selector, r.rsp, r.rflags, s.cr0, s.cr3, s.efer
        ),
        _ => "(registers unreadable)".into(),
    }
}

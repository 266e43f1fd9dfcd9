//! The VMM's vCPU threads: one per vCPU, each running [`vcpu::run`] with its own report
//! device, and the control loop's handle on all of them together.
//!
//! Pausing (for a snapshot) is all or nothing: the pause flag is raised and every thread
//! still in KVM_RUN is kicked until each has left it, completed its pending I/O and saved
//! its state; only then is anything handed out. If one cannot pause (it ended, or saving
//! failed), the others are resumed once every one of them has stopped, so no command is
//! left queued for a thread that never paused. Resuming releases them all.
//!
//! Ending: a vCPU that writes the shutdown port ends its own thread and leaves the others
//! running (each demo vCPU stops at its own step limit); the VM has shut down once all have.
//! A vCPU that ends any other way (an error, a halt, a reset, a stop) stops the whole VM.

use super::report::ReportState;
use super::state::VcpuState;
use super::vcpu::{self, Devices, Ended, VmStatus};
use super::vm::Vm;
use super::KvmError;
use kvm_ioctls::VcpuFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What one vCPU thread hands over once paused.
pub struct SavedVcpu {
    pub vcpu: VcpuState,
    pub report: ReportState,
    /// When it started saving (out of KVM_RUN).
    pub at: Instant,
}

/// What the control loop tells a paused vCPU thread.
enum VcpuCommand {
    Resume,
    Stop,
}

type Paused = (usize, Result<SavedVcpu, KvmError>);

/// Every vCPU thread of a VM.
pub struct VcpuThreads {
    name: String,
    handles: Vec<JoinHandle<Result<Ended, KvmError>>>,
    cmds: Vec<mpsc::Sender<VcpuCommand>>,
    paused_rx: mpsc::Receiver<Paused>,
    paused_tx: mpsc::Sender<Paused>,
    /// Set to stop the VM (by the control loop, or by a vCPU that ended).
    pub stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
}

/// On a vCPU thread, out of KVM_RUN: completes the I/O the last exit left pending (a
/// KVM_RUN with immediate_exit, so RIP is past the `in`/`out`), then saves its state.
fn save_paused(
    vm: &Vm,
    vcpu: &mut VcpuFd,
    devices: &Devices,
    index: u32,
) -> Result<SavedVcpu, KvmError> {
    let at = Instant::now();
    vcpu.set_kvm_immediate_exit(1);
    let flushed = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match flushed {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
        Err(e) => return Err(KvmError::ioctl(&vm.name, "KVM_RUN (immediate exit)", e)),
        Ok(()) => {
            return Err(KvmError::Guest {
                vm: vm.name.clone(),
                what: format!("KVM_RUN with immediate_exit entered the guest on vCPU {index}"),
            })
        }
    }
    Ok(SavedVcpu {
        vcpu: VcpuState::save(&vm.name, vm.kvm(), vcpu, index)?,
        report: devices.report.state(),
        at,
    })
}

impl VcpuThreads {
    /// A set with no threads yet, sharing `stop` with the control loop.
    pub fn new(name: &str, stop: Arc<AtomicBool>) -> Self {
        let (paused_tx, paused_rx) = mpsc::channel();
        VcpuThreads {
            name: name.to_string(),
            handles: Vec::new(),
            cmds: Vec::new(),
            paused_rx,
            paused_tx,
            stop,
            pause: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Starts vCPU `vcpu` (the next index) on a thread of its own, with its own `devices`.
    pub fn spawn(
        &mut self,
        vm: &Arc<Vm>,
        mut vcpu: VcpuFd,
        mut devices: Devices,
        status: &Arc<VmStatus>,
    ) -> Result<(), KvmError> {
        let index = devices.report.index;
        let (cmd_tx, cmd_rx) = mpsc::channel::<VcpuCommand>();
        let (vm, status, stop, pause) = (
            vm.clone(),
            status.clone(),
            self.stop.clone(),
            self.pause.clone(),
        );
        let paused_tx = self.paused_tx.clone();
        let slot = usize::try_from(index).unwrap_or(usize::MAX);
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let r = loop {
                    let r = vcpu::run(&vm.name, &mut vcpu, &mut devices, &status, &stop, &pause);
                    if !matches!(r, Ok(Ended::Paused)) {
                        break r;
                    }
                    let _ = paused_tx.send((slot, save_paused(&vm, &mut vcpu, &devices, index)));
                    match cmd_rx.recv() {
                        Ok(VcpuCommand::Resume) => continue,
                        Ok(VcpuCommand::Stop) | Err(_) => break Ok(Ended::Stopped),
                    }
                };
                if let Ok(Ended::Shutdown(_)) = r {
                    // This vCPU stopped right after its last report: all of its slice must
                    // be what its model says (no other vCPU writes there).
                    let model = *devices.report.model();
                    if let Some(p) = model.check_memory(&vm.mem, devices.report.base()) {
                        devices.report.error(format!(
                            "guest memory: vCPU {index}'s work page {p} differs from the model \
                             at counter {}",
                            model.counter
                        ));
                        status.take_report(&devices.report);
                    }
                } else {
                    stop.store(true, Ordering::SeqCst);
                }
                drop(vcpu);
                drop(vm);
                r
            })
            .map_err(|e| KvmError::sys(&self.name, format!("spawn vCPU thread {index}"), e))?;
        self.handles.push(handle);
        self.cmds.push(cmd_tx);
        Ok(())
    }

    /// Whether every vCPU thread has ended.
    pub fn all_finished(&self) -> bool {
        self.handles.iter().all(JoinHandle::is_finished)
    }

    fn kick(h: &JoinHandle<Result<Ended, KvmError>>) {
        // SAFETY: the thread has not been joined (self holds its handle, and a finished
        // thread's pthread_t stays valid until join); the signal's handler is a no-op.
        unsafe { libc::pthread_kill(h.as_pthread_t(), vcpu::KICK_SIGNAL) };
    }

    /// Kicks every thread out of KVM_RUN (to see the stop flag).
    pub fn kick_all(&self) {
        self.handles.iter().for_each(Self::kick);
    }

    /// Pauses every vCPU and returns their saved states in vCPU order, or why not (then
    /// every vCPU runs on as before).
    pub fn pause_all(&self) -> Result<Vec<SavedVcpu>, KvmError> {
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got: Vec<Option<Result<SavedVcpu, KvmError>>> =
            self.handles.iter().map(|_| None).collect();
        loop {
            let pending: Vec<usize> = (0..got.len())
                .filter(|&i| got[i].is_none() && !self.handles[i].is_finished())
                .collect();
            if pending.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                // A vCPU that does not leave KVM_RUN cannot be paused or trusted to resume
                // in step with the others: stop the VM rather than leave it half paused.
                self.stop.store(true, Ordering::SeqCst);
                self.resume_those(&got);
                return Err(KvmError::Guest {
                    vm: self.name.clone(),
                    what: format!("vCPUs {pending:?} did not leave KVM_RUN within 10 s"),
                });
            }
            for &i in &pending {
                Self::kick(&self.handles[i]);
            }
            if let Ok((i, r)) = self.paused_rx.recv_timeout(Duration::from_micros(500)) {
                if let Some(slot) = got.get_mut(i) {
                    *slot = Some(r);
                }
            }
        }
        let ended: Vec<usize> = (0..got.len()).filter(|&i| got[i].is_none()).collect();
        let failed = got.iter().position(|r| matches!(r, Some(Err(_))));
        if ended.is_empty() && failed.is_none() {
            return Ok(got.into_iter().flatten().flatten().collect());
        }
        self.resume_those(&got);
        match failed.and_then(|i| got.into_iter().nth(i)).flatten() {
            Some(Err(e)) => Err(e),
            _ => Err(KvmError::Guest {
                vm: self.name.clone(),
                what: format!("the guest's vCPUs {ended:?} ended before they could be paused"),
            }),
        }
    }

    /// Resumes the threads that paused (those in `got`).
    fn resume_those(&self, got: &[Option<Result<SavedVcpu, KvmError>>]) {
        self.pause.store(false, Ordering::SeqCst);
        for (i, r) in got.iter().enumerate() {
            if r.is_some() {
                let _ = self.cmds[i].send(VcpuCommand::Resume);
            }
        }
    }

    /// Lets every (paused) vCPU run on.
    pub fn resume_all(&self) {
        self.pause.store(false, Ordering::SeqCst);
        for c in &self.cmds {
            let _ = c.send(VcpuCommand::Resume);
        }
    }

    /// Ends every (paused) vCPU thread.
    pub fn stop_paused(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in &self.cmds {
            let _ = c.send(VcpuCommand::Stop);
        }
    }

    /// Waits for every thread; how the VM ended: the first vCPU's error, else a reset, a
    /// halt or a stop if any vCPU ended so, else (all shut down) vCPU 0's shutdown code.
    pub fn join(self) -> Result<Ended, KvmError> {
        let mut ends = Vec::with_capacity(self.handles.len());
        for (i, h) in self.handles.into_iter().enumerate() {
            ends.push(h.join().unwrap_or_else(|_| {
                Err(KvmError::Guest {
                    vm: self.name.clone(),
                    what: format!("the thread of vCPU {i} panicked"),
                })
            }));
        }
        let rank = |e: &Result<Ended, KvmError>| match e {
            Err(_) => 0,
            Ok(Ended::Reset(_)) => 1,
            Ok(Ended::Halted) => 2,
            Ok(Ended::Stopped | Ended::Paused) => 3,
            Ok(Ended::Shutdown(_)) => 4,
        };
        let first = (0..ends.len()).min_by_key(|&i| rank(&ends[i]));
        match first {
            Some(i) => ends.swap_remove(i),
            None => Ok(Ended::Stopped),
        }
    }
}

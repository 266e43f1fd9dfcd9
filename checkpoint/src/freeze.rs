//! Holding a process stopped, and giving it back exactly as it was.

use crate::error::CheckpointError;
use stasis_runtime::inject::Injector;
use stasis_runtime::ptrace::{self, Regs, ResumeIn, Stop};
use stasis_runtime::{sys, RuntimeError};

/// A process seized and stopped by us. Dropped without [`Frozen::kill`] or
/// [`Frozen::resume`], it is resumed as it was.
pub struct Frozen {
    pid: i32,
    regs: Regs,
    sigmask: u64,
    /// Signals (siginfo) whose delivery stops were suppressed; queued again on resume, or
    /// saved as pending in the image.
    deferred: Vec<Vec<u8>>,
    /// Registers or mask were changed (injection) and must be put back.
    touched: bool,
    done: bool,
}

impl Frozen {
    /// Seizes `pid` and stops it.
    pub fn freeze(pid: i32) -> Result<Self, CheckpointError> {
        let deferred = ptrace::seize_and_stop(pid, libc::PTRACE_O_TRACESYSGOOD).map_err(|e| {
            // A failed seize leaves nothing to undo, except a seize that succeeded before
            // the stop failed: detach then.
            let _ = ptrace::detach(pid, 0);
            match e.errno() {
                Some(libc::ESRCH) => CheckpointError::NoSuchProcess(pid),
                Some(libc::EPERM) => CheckpointError::unsupported(
                    pid,
                    "ptrace is not permitted (already traced by a debugger, or not ours to trace)",
                ),
                _ => e.into(),
            }
        })?;
        let regs = ptrace::get_regs(pid);
        let sigmask = ptrace::get_sigmask(pid);
        let (regs, sigmask) = match (regs, sigmask) {
            (Ok(r), Ok(m)) => (r, m),
            (Err(e), _) | (_, Err(e)) => {
                let _ = ptrace::detach(pid, 0);
                return Err(e.into());
            }
        };
        Ok(Frozen {
            pid,
            regs,
            sigmask,
            deferred,
            touched: false,
            done: false,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Registers at the moment of the stop.
    pub fn regs(&self) -> &Regs {
        &self.regs
    }

    /// Blocked signal mask at the moment of the stop.
    pub fn sigmask(&self) -> u64 {
        self.sigmask
    }

    /// An injector running syscalls through the `syscall` instruction at `syscall_ip`.
    /// All signals are blocked in the tracee while it is used.
    pub fn injector(&mut self, syscall_ip: u64) -> Result<Injector, CheckpointError> {
        self.touched = true;
        ptrace::set_sigmask(self.pid, !0)?;
        Ok(Injector::new(self.pid, syscall_ip)?)
    }

    /// Records signals an injector suppressed, to be queued again on resume.
    pub fn defer_signals(&mut self, sigs: Vec<Vec<u8>>) {
        self.deferred.extend(sigs);
    }

    /// Signals taken out of the queue while stopping or injecting (their siginfo).
    pub fn deferred(&self) -> &[Vec<u8>] {
        &self.deferred
    }

    /// Puts registers and mask back, queues suppressed signals again, and detaches.
    pub fn resume(&mut self) -> Result<(), RuntimeError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        if self.touched {
            let regs = ptrace::rewind_interrupted_syscall(&self.regs, ResumeIn::SameTask);
            ptrace::set_regs(self.pid, &regs)?;
            ptrace::set_sigmask(self.pid, self.sigmask)?;
        }
        // Queued again as plain signals (the kernel does not let another process forge
        // their original siginfo).
        for info in std::mem::take(&mut self.deferred) {
            sys::tgkill(self.pid, self.pid, ptrace::siginfo_signo(&info))?;
        }
        ptrace::detach(self.pid, 0)
    }

    /// Kills the process (only once its image is committed) and waits until it is gone.
    pub fn kill(&mut self) -> Result<(), RuntimeError> {
        self.done = true;
        sys::kill(self.pid, libc::SIGKILL)?;
        loop {
            match ptrace::wait_stop(self.pid) {
                Ok(Stop::Killed(_)) | Ok(Stop::Exited(_)) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.errno() == Some(libc::ECHILD) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = self.resume();
    }
}

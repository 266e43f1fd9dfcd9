//! Running system calls inside a stopped tracee.
//!
//! The tracee's registers are pointed at a `syscall` instruction that already exists in its
//! address space (in the vDSO at checkpoint, in the restorer's trampoline page at restore);
//! PTRACE_SYSCALL then stops it at syscall entry and exit, and the result is read from rax.
//! No code is written into the tracee. `orig_rax` is set to -1 so the kernel's syscall-restart
//! logic never rewrites the injected registers. At checkpoint, the thread gets its own
//! registers and signal mask back after every call ([`Injector::putting_back`]).

use crate::error::{Result, RuntimeError};
use crate::ptrace::{self, Regs, Stop};

/// Runs syscalls in a tracee that is in a ptrace stop.
pub struct Injector {
    pid: i32,
    syscall_ip: u64,
    base: Regs,
    /// Signals (their siginfo) whose delivery stops were suppressed while injecting.
    deferred: Vec<Vec<u8>>,
    /// Registers and signal mask put back after every call (see [`Injector::putting_back`]).
    put_back: Option<(Regs, u64)>,
}

impl Injector {
    /// `syscall_ip` is the address of a `syscall` instruction (0f 05) mapped executable in the
    /// tracee. The tracee's current registers are the template for every injected call.
    pub fn new(pid: i32, syscall_ip: u64) -> Result<Self> {
        let base = ptrace::get_regs(pid)?;
        Ok(Injector {
            pid,
            syscall_ip,
            base,
            deferred: Vec::new(),
            put_back: None,
        })
    }

    /// Like [`Injector::new`] for a live process whose tracer may die at any moment: all
    /// signals are blocked only while each call runs, and after each call the thread gets
    /// `regs` and `sigmask` back, so between calls it is always in a state it can run on
    /// (the kernel detaches the tracees of a tracer that dies, and they run on at once).
    /// What is left is the time one call takes to run.
    pub fn putting_back(pid: i32, syscall_ip: u64, regs: Regs, sigmask: u64) -> Result<Self> {
        let mut inj = Self::new(pid, syscall_ip)?;
        inj.put_back = Some((regs, sigmask));
        Ok(inj)
    }

    /// The tracee's pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Signals suppressed while injecting (the caller decides whether to queue them again).
    pub fn take_deferred(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.deferred)
    }

    /// Runs one syscall and returns its raw result (a negative errno on failure). The tracee
    /// is left in that syscall's exit stop, where a caller may set final registers (restore
    /// does so after the trampoline's own munmap).
    pub fn raw(&mut self, nr: libc::c_long, args: &[u64]) -> Result<i64> {
        if self.put_back.is_some() {
            ptrace::set_sigmask(self.pid, !0)?;
        }
        let ran = self
            .enter(nr, args)
            .and_then(|()| self.step_to_syscall_stop("syscall exit"))
            .and_then(|()| ptrace::get_regs(self.pid));
        if let Some((regs, mask)) = self.put_back {
            ptrace::set_regs(self.pid, &regs)?;
            ptrace::set_sigmask(self.pid, mask)?;
        }
        crate::failpoints::hit("between-injected-syscalls");
        Ok(ran?.rax as i64)
    }

    /// Runs one syscall; a negative result becomes an error naming `name`.
    pub fn call(&mut self, name: &'static str, nr: libc::c_long, args: &[u64]) -> Result<u64> {
        let rc = self.raw(nr, args)?;
        if (-4095..0).contains(&rc) {
            return Err(RuntimeError::sys(
                name,
                format!("injected into pid {}", self.pid),
                std::io::Error::from_raw_os_error(-rc as i32),
            ));
        }
        Ok(rc as u64)
    }

    /// Maps `len` bytes of private anonymous read-write memory in the tracee (a scratch area
    /// for an injected call's arguments); `name` names the call in errors.
    pub fn mmap_anon(&mut self, name: &'static str, len: u64) -> Result<u64> {
        self.call(
            name,
            libc::SYS_mmap,
            &[
                0,
                len,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )
    }

    fn enter(&mut self, nr: libc::c_long, args: &[u64]) -> Result<()> {
        let mut regs = self.base;
        regs.rip = self.syscall_ip;
        regs.rax = nr as u64;
        regs.orig_rax = u64::MAX;
        let slots = [
            &mut regs.rdi,
            &mut regs.rsi,
            &mut regs.rdx,
            &mut regs.r10,
            &mut regs.r8,
            &mut regs.r9,
        ];
        // Unused argument registers are zero: some calls (prctl) insist on it.
        for (i, slot) in slots.into_iter().enumerate() {
            *slot = args.get(i).copied().unwrap_or(0);
        }
        ptrace::set_regs(self.pid, &regs)?;
        self.step_to_syscall_stop("syscall entry")?;
        let at = ptrace::get_regs(self.pid)?;
        if at.orig_rax != nr as u64 {
            return Err(RuntimeError::Protocol {
                op: "inject syscall",
                pid: self.pid,
                what: format!(
                    "stopped at entry of syscall {} instead of {nr} (ip {:#x})",
                    at.orig_rax as i64, at.rip
                ),
            });
        }
        Ok(())
    }

    fn step_to_syscall_stop(&mut self, what: &str) -> Result<()> {
        ptrace::resume_to_syscall(self.pid)?;
        loop {
            match ptrace::wait_stop(self.pid)? {
                Stop::Syscall => return Ok(()),
                Stop::Signal(sig) => {
                    self.deferred
                        .push(ptrace::stopped_signal_info(self.pid, sig)?);
                    ptrace::resume_to_syscall(self.pid)?;
                }
                Stop::EventStop(_) => ptrace::resume_to_syscall(self.pid)?,
                // An injected clone3 of a thread reports the new thread first.
                Stop::Event(libc::PTRACE_EVENT_CLONE, _) => ptrace::resume_to_syscall(self.pid)?,
                Stop::Exited(code) => {
                    return Err(self.died(what, format!("exited with status {code}")))
                }
                Stop::Killed(sig) => {
                    return Err(self.died(what, format!("was killed by signal {sig}")))
                }
                Stop::Event(ev, _) => {
                    return Err(self.died(what, format!("reported ptrace event {ev}")))
                }
            }
        }
    }

    fn died(&self, what: &str, how: String) -> RuntimeError {
        RuntimeError::Protocol {
            op: "inject syscall",
            pid: self.pid,
            what: format!("tracee {how} while waiting for {what}"),
        }
    }
}

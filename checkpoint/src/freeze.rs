//! Holding a process stopped (every thread), and giving it back exactly as it was.

use crate::error::CheckpointError;
use stasis_runtime::inject::Injector;
use stasis_runtime::ptrace::{self, Regs, ResumeIn, Stop};
use stasis_runtime::{procfs, sys, RuntimeError};
use std::collections::{BTreeMap, BTreeSet};

/// Most threads one process may have for a checkpoint.
pub const MAX_THREADS: usize = 1024;

/// How long killed threads may take to die.
const KILL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One stopped thread.
pub struct StoppedThread {
    pub tid: i32,
    pub regs: Regs,
    pub sigmask: u64,
    /// Registers or mask were changed (injection) and must be put back.
    touched: bool,
}

/// A process whose threads are all seized and stopped by us. Dropped without
/// [`Frozen::kill`] or [`Frozen::resume`], it is resumed as it was.
pub struct Frozen {
    pid: i32,
    threads: Vec<StoppedThread>,
    /// (tid, siginfo) of signals whose delivery stops were suppressed; queued again on
    /// resume, or saved as pending in the image.
    deferred: Vec<(i32, Vec<u8>)>,
    /// Stopped by job control before we came: it must be stopped again when we leave.
    stopped: bool,
    /// The signal that stopped it (when `stopped`).
    stop_signal: i32,
    done: bool,
}

fn seize_error(pid: i32, e: RuntimeError) -> CheckpointError {
    match e.errno() {
        Some(libc::ESRCH) => CheckpointError::NoSuchProcess(pid),
        Some(libc::EPERM) => CheckpointError::unsupported(
            pid,
            "ptrace is not permitted (already traced by a debugger, or not ours to trace)",
        ),
        _ => e.into(),
    }
}

impl Frozen {
    /// Seizes and stops every thread of `pid`, again and again until no new thread appears
    /// (a running thread may create threads while others are being stopped).
    pub fn freeze(pid: i32) -> Result<Self, CheckpointError> {
        Self::freeze_with(pid, &mut PreSeized::default())
    }

    /// Like [`Frozen::freeze`]; threads in `pre` are already seized and interrupted (while
    /// their cgroup was frozen) and only waited for.
    pub fn freeze_with(pid: i32, pre: &mut PreSeized) -> Result<Self, CheckpointError> {
        let stopped = pre.stopped.contains(&pid)
            || procfs::read_stat(pid)
                .map(|s| s.state == 'T')
                .unwrap_or(false);
        let mut frozen = Frozen {
            pid,
            threads: Vec::new(),
            deferred: Vec::new(),
            stopped,
            stop_signal: libc::SIGSTOP,
            done: false,
        };
        let mut seen = BTreeSet::new();
        loop {
            let tids = procfs::read_tids(pid).map_err(|_| CheckpointError::NoSuchProcess(pid))?;
            let new: Vec<i32> = tids.into_iter().filter(|t| !seen.contains(t)).collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                seen.insert(tid);
                if seen.len() > MAX_THREADS {
                    return Err(CheckpointError::unsupported(
                        pid,
                        format!("it has more than {MAX_THREADS} threads"),
                    ));
                }
                let stop = if pre.tids.remove(&tid).is_some() {
                    ptrace::wait_interrupted_sig(tid)
                } else {
                    ptrace::seize_and_stop_sig(tid, libc::PTRACE_O_TRACESYSGOOD)
                };
                match stop {
                    Ok((infos, sig)) => {
                        if tid == pid && stopped && is_stop_signal(sig) {
                            frozen.stop_signal = sig;
                        }
                        frozen.deferred.extend(infos.into_iter().map(|i| (tid, i)))
                    }
                    // A thread that exited meanwhile needs nothing.
                    Err(e) if e.errno() == Some(libc::ESRCH) && tid != pid => continue,
                    Err(e) => {
                        let _ = ptrace::detach(tid, 0);
                        return Err(seize_error(pid, e));
                    }
                }
                let regs = ptrace::get_regs(tid)?;
                let sigmask = ptrace::get_sigmask(tid)?;
                frozen.threads.push(StoppedThread {
                    tid,
                    regs,
                    sigmask,
                    touched: false,
                });
            }
        }
        frozen.threads.sort_by_key(|t| (t.tid != pid, t.tid));
        if frozen.threads.first().map(|t| t.tid) != Some(pid) {
            return Err(CheckpointError::unsupported(
                pid,
                "its main thread has exited",
            ));
        }
        Ok(frozen)
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The stopped threads, main thread first.
    pub fn threads(&self) -> &[StoppedThread] {
        &self.threads
    }

    /// Whether job control had stopped the process before it was frozen.
    pub fn was_stopped(&self) -> bool {
        self.stopped
    }

    /// The signal that job-control-stopped it (SIGSTOP if it was not stopped).
    pub fn stop_signal(&self) -> i32 {
        self.stop_signal
    }

    /// An injector running syscalls in thread `tid` through the `syscall` instruction at
    /// `syscall_ip`. All signals are blocked in that thread while it is used.
    pub fn injector(&mut self, tid: i32, syscall_ip: u64) -> Result<Injector, CheckpointError> {
        let t = self
            .threads
            .iter_mut()
            .find(|t| t.tid == tid)
            .ok_or_else(|| {
                CheckpointError::unsupported(self.pid, format!("thread {tid} is not stopped"))
            })?;
        t.touched = true;
        ptrace::set_sigmask(tid, !0)?;
        Ok(Injector::new(tid, syscall_ip)?)
    }

    /// Records signals an injector in thread `tid` suppressed.
    pub fn defer_signals(&mut self, tid: i32, sigs: Vec<Vec<u8>>) {
        self.deferred.extend(sigs.into_iter().map(|s| (tid, s)));
    }

    /// Signals taken out of the queues while stopping or injecting: (tid, siginfo).
    pub fn deferred(&self) -> &[(i32, Vec<u8>)] {
        &self.deferred
    }

    /// Puts registers and masks back, queues suppressed signals again, and detaches.
    pub fn resume(&mut self) -> Result<(), RuntimeError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let mut first_err = None;
        // Injection ran it out of its job-control stop: queue SIGSTOP before detaching so
        // it stops again before running any of its own code.
        if self.stopped {
            if let Err(e) = sys::kill(self.pid, libc::SIGSTOP) {
                first_err.get_or_insert(e);
            }
        }
        for t in &self.threads {
            let r = (|| {
                if t.touched {
                    // A job-control-stopped task gets its registers back untouched: the
                    // queued SIGSTOP takes it through the kernel's own signal path, whose
                    // restart logic rewinds an interrupted syscall when it is continued.
                    // Rewinding here as well would leave it stopped on the edge of
                    // restart_syscall, a state a later checkpoint could not restore.
                    let regs = if self.stopped {
                        t.regs
                    } else {
                        ptrace::rewind_interrupted_syscall(&t.regs, ResumeIn::SameTask)
                    };
                    ptrace::set_regs(t.tid, &regs)?;
                    ptrace::set_sigmask(t.tid, t.sigmask)?;
                }
                // Queued again as plain signals (the kernel does not let another process
                // forge their original siginfo).
                for (tid, info) in self.deferred.iter().filter(|(tid, _)| *tid == t.tid) {
                    sys::tgkill(self.pid, *tid, ptrace::siginfo_signo(info))?;
                }
                ptrace::detach(t.tid, 0)
            })();
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Sends SIGKILL (only once its image is committed); [`Frozen::kill`] then waits.
    pub fn signal_kill(&mut self) -> Result<(), RuntimeError> {
        self.done = true;
        match sys::kill(self.pid, libc::SIGKILL) {
            // Already gone: a pid namespace's init took it along.
            Err(e) if e.errno() == Some(libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    /// Kills the process (only once its image is committed) and waits until every thread
    /// is gone, in whatever order they go: the last thread of a pid namespace's init waits
    /// until its other threads are collected (by us, their tracer), so waiting for it first
    /// would wait forever.
    pub fn kill(&mut self) -> Result<(), RuntimeError> {
        self.signal_kill()?;
        let mut left: Vec<i32> = self.threads.iter().map(|t| t.tid).collect();
        let deadline = std::time::Instant::now() + KILL_TIMEOUT;
        while !left.is_empty() {
            let mut failed = None;
            left.retain(|&tid| match ptrace::try_wait_stop(tid) {
                Ok(Some(Stop::Killed(_))) | Ok(Some(Stop::Exited(_))) => false,
                Ok(_) => true,
                Err(e) if e.errno() == Some(libc::ECHILD) => false,
                Err(e) if e.errno() == Some(libc::EINTR) => true,
                Err(e) => {
                    failed.get_or_insert(e);
                    false
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
            if left.is_empty() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(RuntimeError::Protocol {
                    op: "kill checkpointed process",
                    pid: self.pid,
                    what: format!("threads {left:?} did not die within {KILL_TIMEOUT:?}"),
                });
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        Ok(())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = self.resume();
    }
}

/// Whether `sig` is one of the signals that job-control-stop a process.
pub fn is_stop_signal(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

/// Threads seized and interrupted while their cgroup was frozen, not yet waited for. Dropped
/// with threads left in it, those are waited for, given back the signals held up while they
/// stopped, and detached.
#[derive(Default)]
pub struct PreSeized {
    /// tid → its process.
    pub tids: BTreeMap<i32, i32>,
    /// Processes job control had stopped before the freeze.
    pub stopped: BTreeSet<i32>,
}

impl Drop for PreSeized {
    fn drop(&mut self) {
        for (&tid, &tgid) in &self.tids {
            if let Ok(infos) = ptrace::wait_interrupted(tid) {
                for info in infos {
                    let _ = sys::tgkill(tgid, tid, ptrace::siginfo_signo(&info));
                }
            }
            let _ = ptrace::detach(tid, 0);
        }
    }
}

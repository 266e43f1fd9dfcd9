//! Holding a process stopped (every thread), and giving it back exactly as it was.

use crate::error::CheckpointError;
use stasis_runtime::inject::Injector;
use stasis_runtime::ptrace::{self, Regs, ResumeIn, Stop};
use stasis_runtime::{procfs, seccomp, sys, RuntimeError};
use std::collections::{BTreeMap, BTreeSet};

/// Most threads one process may have for a checkpoint.
pub const MAX_THREADS: usize = 1024;

/// The ptrace options every thread is seized with.
pub const SEIZE_OPTIONS: libc::c_int = libc::PTRACE_O_TRACESYSGOOD;

/// How long killed threads may take to die.
const KILL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// One stopped thread.
pub struct StoppedThread {
    pub tid: i32,
    pub regs: Regs,
    pub sigmask: u64,
    /// Its seccomp mode (0 none, 1 strict, 2 filter), read once it was stopped; its
    /// filters are suspended for our injected syscalls while it is seized.
    pub seccomp: u32,
    /// Registers or mask were changed (injection) and must be put back.
    touched: bool,
}

/// A process whose threads are all seized and stopped by us. Dropped without
/// [`Frozen::kill`] or [`Frozen::resume`], it is resumed as it was.
pub struct Frozen {
    pid: i32,
    threads: Vec<StoppedThread>,
    /// (tid, siginfo) of signals whose delivery stops were suppressed while injecting
    /// (signals a blocked mask cannot hold off); queued again on resume, or saved as
    /// pending in the image.
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

/// Whether seizing and stopping thread `tid` of `pid` failed because it exited: ESRCH, an
/// exit seen while waiting for it to stop, or EPERM from a thread that is already dead
/// (ptrace refuses a task whose exit_state is set).
fn thread_gone(pid: i32, tid: i32, e: &RuntimeError) -> bool {
    let dead = || {
        procfs::read_text(&format!("/proc/{pid}/task/{tid}/stat"))
            .ok()
            .and_then(|t| {
                t.rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .chars()
                    .next()
            })
            .is_none_or(|state| matches!(state, 'Z' | 'X' | 'x'))
    };
    match e.errno() {
        Some(libc::ESRCH) => true,
        Some(libc::EPERM) => dead(),
        _ => matches!(e, RuntimeError::Protocol { op: "seize", what, .. }
            if what.contains("exited") || what.contains("killed")),
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
            let tids = procfs::read_tids(pid).map_err(|e| CheckpointError::from_proc(pid, e))?;
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
                    ptrace::wait_interrupted(tid)
                } else {
                    ptrace::seize_and_stop(tid, SEIZE_OPTIONS)
                };
                match stop {
                    // A stop signal here: the process is in a job-control stop, one it was
                    // in before, or one a stop signal delivered while seizing began.
                    Ok(sig) if is_stop_signal(sig) => {
                        frozen.stopped = true;
                        if tid == pid {
                            frozen.stop_signal = sig;
                        }
                    }
                    Ok(_) => {}
                    // A thread that exited meanwhile (before it was seized, or while it was
                    // being stopped) needs nothing.
                    Err(e) if tid != pid && thread_gone(pid, tid, &e) => continue,
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
                    seccomp: 0,
                    touched: false,
                });
            }
        }
        // Only now that no thread of it runs (TSYNC lets one thread install filters in
        // all): injected syscalls must never meet the workload's seccomp filters.
        for t in frozen.threads.iter_mut() {
            t.seccomp = suspend_seccomp(pid, t.tid)?;
            t.regs.rip = rseq_abort_ip(pid, t.tid, &t.regs).unwrap_or(t.regs.rip);
        }
        stasis_runtime::failpoints::hit("frozen-process");
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
    /// `syscall_ip`. All signals are blocked in that thread while each call runs; between
    /// calls it has its own registers (rewound as [`Frozen::resume`] does) and signal mask,
    /// so if stasis dies, the kernel lets it run on as it was.
    pub fn injector(&mut self, tid: i32, syscall_ip: u64) -> Result<Injector, CheckpointError> {
        let stopped = self.stopped;
        let t = self
            .threads
            .iter_mut()
            .find(|t| t.tid == tid)
            .ok_or_else(|| {
                CheckpointError::unsupported(self.pid, format!("thread {tid} is not stopped"))
            })?;
        t.touched = true;
        let regs = runnable_regs(t, stopped);
        ptrace::set_regs(tid, &regs)?;
        Ok(Injector::putting_back(tid, syscall_ip, regs, t.sigmask)?)
    }

    /// Puts back, right after a process's injected syscalls, what injection changed in its
    /// threads (registers, rewound as [`Frozen::resume`] does, and signal masks): from then
    /// on every thread is in a state it can run on if stasis dies and the kernel detaches it.
    pub fn put_back(&mut self) -> Result<(), RuntimeError> {
        let mut first_err = None;
        for t in self.threads.iter_mut().filter(|t| t.touched) {
            match put_back_thread(t, self.stopped) {
                Ok(()) => t.touched = false,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Queues the signals suppressed in thread `tid` again, now, with their original siginfo:
    /// rt_tgsigqueueinfo injected into the thread itself (the kernel lets a thread queue any
    /// siginfo to itself), through the 128-byte scratch slot at `slot`. They stay pending
    /// (blocked while injecting) and are saved as pending with the rest of the queue; if
    /// stasis dies they are delivered as if nothing had happened. SIGSTOP, which cannot be
    /// blocked, is left for [`Frozen::resume`].
    pub fn requeue_deferred(
        &mut self,
        tid: i32,
        inj: &mut Injector,
        slot: u64,
    ) -> Result<(), CheckpointError> {
        if !self.deferred.iter().any(|(d, _)| *d == tid) {
            return Ok(());
        }
        let pid = self.pid;
        let own = |t: i32| -> Result<u64, CheckpointError> {
            let path = format!("/proc/{pid}/task/{t}/status");
            let status = procfs::parse_status(&path, &procfs::read_text(&path)?)?;
            status
                .own_pid()
                .map(|p| p as u64)
                .ok_or_else(|| CheckpointError::unsupported(pid, format!("{path} has no NSpid")))
        };
        let (ns_tgid, ns_tid) = (own(pid)?, own(tid)?);
        let mut keep = Vec::new();
        let mut failed = None;
        for (d, info) in std::mem::take(&mut self.deferred) {
            let sig = ptrace::siginfo_signo(&info);
            if failed.is_some() || d != tid || sig == libc::SIGSTOP || sig == libc::SIGKILL {
                keep.push((d, info));
                continue;
            }
            let queued = stasis_runtime::memory::write_remote(tid, &[(slot, info.len())], &info)
                .and_then(|()| {
                    inj.call(
                        "rt_tgsigqueueinfo(suppressed signal)",
                        libc::SYS_rt_tgsigqueueinfo,
                        &[ns_tgid, ns_tid, sig as u64, slot],
                    )
                });
            if let Err(e) = queued {
                // Not queued: resume() sends it, or the image records it, as before.
                keep.push((d, info));
                failed = Some(e);
            }
        }
        self.deferred = keep;
        failed.map_or(Ok(()), |e| Err(e.into()))
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
                    put_back_thread(t, self.stopped)?;
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

/// The registers a stopped thread is given back, to run on from any stop.
fn runnable_regs(t: &StoppedThread, job_stopped: bool) -> Regs {
    // A job-control-stopped task gets its registers back untouched: it is continued through
    // the kernel's own signal path (the SIGSTOP resume() queues, or the group stop the
    // kernel puts it back into if stasis dies), whose restart logic rewinds an interrupted
    // syscall when it is continued. Rewinding here as well would leave it stopped on the
    // edge of restart_syscall, a state a later checkpoint could not restore.
    if job_stopped {
        t.regs
    } else {
        ptrace::rewind_interrupted_syscall(&t.regs, ResumeIn::SameTask)
    }
}

/// Registers and signal mask of a thread as it can run on them.
fn put_back_thread(t: &StoppedThread, job_stopped: bool) -> Result<(), RuntimeError> {
    ptrace::set_regs(t.tid, &runnable_regs(t, job_stopped))?;
    ptrace::set_sigmask(t.tid, t.sigmask)
}

/// Where a thread stopped inside an rseq critical section goes on: the kernel aborts the
/// section (jumps to its abort handler) when the thread returns to user mode after being
/// scheduled out, which a stopped thread was. Injected syscalls would make the kernel see the
/// injection's ip instead and just clear the section pointer, so the thread would resume
/// inside it unaborted; the abort is done here instead, as the kernel would (and as CRIU
/// does). None: not in a critical section (or nothing readable to tell).
fn rseq_abort_ip(pid: i32, tid: i32, regs: &Regs) -> Option<u64> {
    let rseq = ptrace::get_rseq(tid).ok()??;
    // struct rseq: cpu_id_start u32, cpu_id u32, rseq_cs u64, ...
    let mut word = [0u8; 8];
    stasis_runtime::memory::read_remote(pid, &[(rseq.abi_pointer + 8, 8)], &mut word).ok()?;
    let cs = u64::from_ne_bytes(word);
    if cs == 0 {
        return None;
    }
    // struct rseq_cs: version u32, flags u32, start_ip, post_commit_offset, abort_ip (u64).
    let mut desc = [0u8; 32];
    stasis_runtime::memory::read_remote(pid, &[(cs, 32)], &mut desc).ok()?;
    let field = |o: usize| desc[o..o + 8].try_into().ok().map(u64::from_ne_bytes);
    let (start, len, abort) = (field(8)?, field(16)?, field(24)?);
    let inside = regs.rip >= start && regs.rip - start < len;
    (inside && (regs.orig_rax as i64) < 0).then_some(abort)
}

/// Reads the seccomp mode of a stopped thread and, if it has one, has its filters (or its
/// strict mode) suspended for our injected syscalls (PTRACE_O_SUSPEND_SECCOMP; the kernel
/// lifts that when we detach, or when stasis dies). Refused before anything is injected
/// where that is not possible.
fn suspend_seccomp(pid: i32, tid: i32) -> Result<u32, CheckpointError> {
    let mode = seccomp::mode(pid, tid)?.mode;
    if mode == 0 {
        return Ok(0);
    }
    ptrace::set_options(tid, SEIZE_OPTIONS | seccomp::PTRACE_O_SUSPEND_SECCOMP).map_err(|e| {
        let what = if mode == seccomp::MODE_STRICT {
            "strict mode"
        } else {
            "filter mode"
        };
        CheckpointError::unsupported(
            pid,
            format!(
                "thread {tid} runs in seccomp {what}, and its filters cannot be suspended for \
                 stasis's injected syscalls (PTRACE_O_SUSPEND_SECCOMP needs CAP_SYS_ADMIN and \
                 a kernel built with CONFIG_CHECKPOINT_RESTORE): {e}"
            ),
        )
    })?;
    Ok(mode)
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
/// with threads left in it, those are waited for (a signal they take meanwhile is delivered)
/// and detached.
#[derive(Default)]
pub struct PreSeized {
    /// tid → its process.
    pub tids: BTreeMap<i32, i32>,
    /// Processes job control had stopped before the freeze.
    pub stopped: BTreeSet<i32>,
}

impl Drop for PreSeized {
    fn drop(&mut self) {
        for &tid in self.tids.keys() {
            let _ = ptrace::wait_interrupted(tid);
            let _ = ptrace::detach(tid, 0);
        }
    }
}

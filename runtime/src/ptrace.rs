//! ptrace: seize, interrupt, wait for stops, registers, xstate, signal mask, rseq.
//!
//! One `unsafe` libc call per wrapper, each naming the request in its error.

use crate::error::{Result, RuntimeError};
use std::io;

/// General-purpose registers as the kernel's struct user_regs_struct.
pub type Regs = libc::user_regs_struct;

/// ptrace requests libc does not name.
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
/// ELF note type of the x86 extended state regset.
pub const NT_X86_XSTATE: libc::c_int = 0x202;
/// Largest xstate buffer we accept (AMX tiles make it ~11 KiB).
const XSTATE_MAX: usize = 16384;

/// rseq registration of a thread, as PTRACE_GET_RSEQ_CONFIGURATION reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RseqConfig {
    pub abi_pointer: u64,
    pub abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

/// What `wait_stop` observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// PTRACE_EVENT_STOP: an interrupt (SIGTRAP) or group stop (the stopping signal).
    EventStop(i32),
    /// Another ptrace event (event number, signal).
    Event(i32, i32),
    /// Syscall-enter or syscall-exit stop (PTRACE_O_TRACESYSGOOD).
    Syscall,
    /// Signal-delivery stop for this signal.
    Signal(i32),
    /// The tracee exited with this code.
    Exited(i32),
    /// The tracee was killed by this signal.
    Killed(i32),
}

fn check(op: &'static str, pid: i32, rc: libc::c_long) -> Result<libc::c_long> {
    if rc == -1 {
        Err(RuntimeError::sys(
            op,
            format!("pid {pid}"),
            io::Error::last_os_error(),
        ))
    } else {
        Ok(rc)
    }
}

/// PTRACE_SEIZE with the given options (PTRACE_O_*).
pub fn seize(pid: i32, options: libc::c_int) -> Result<()> {
    // SAFETY: PTRACE_SEIZE takes no pointers; addr is ignored, data carries the options.
    let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0usize, options as usize) };
    check("ptrace(PTRACE_SEIZE)", pid, rc).map(drop)
}

/// PTRACE_INTERRUPT: asks a seized tracee to enter a ptrace stop.
pub fn interrupt(pid: i32) -> Result<()> {
    // SAFETY: PTRACE_INTERRUPT takes no pointers.
    let rc = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0usize, 0usize) };
    check("ptrace(PTRACE_INTERRUPT)", pid, rc).map(drop)
}

/// Waits for the next state change of `pid` (a tracee or child) and decodes it.
pub fn wait_stop(pid: i32) -> Result<Stop> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: status is a valid, writable c_int for the duration of the call.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if rc == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(RuntimeError::sys("waitpid", format!("pid {pid}"), e));
        }
        break;
    }
    Ok(decode_status(status))
}

/// Like [`wait_stop`] without blocking: None if `pid` has nothing to report yet.
pub fn try_wait_stop(pid: i32) -> Result<Option<Stop>> {
    let mut status: libc::c_int = 0;
    // SAFETY: status is a valid, writable c_int for the duration of the call.
    let rc = unsafe { libc::waitpid(pid, &mut status, libc::__WALL | libc::WNOHANG) };
    match rc {
        -1 => Err(RuntimeError::sys(
            "waitpid",
            format!("pid {pid}"),
            io::Error::last_os_error(),
        )),
        0 => Ok(None),
        _ => Ok(Some(decode_status(status))),
    }
}

/// Decodes a waitpid status word of a tracee.
pub fn decode_status(status: libc::c_int) -> Stop {
    if libc::WIFEXITED(status) {
        return Stop::Exited(libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        return Stop::Killed(libc::WTERMSIG(status));
    }
    let sig = libc::WSTOPSIG(status);
    let event = status >> 16;
    if event == libc::PTRACE_EVENT_STOP {
        Stop::EventStop(sig)
    } else if event != 0 {
        Stop::Event(event, sig)
    } else if sig == libc::SIGTRAP | 0x80 {
        Stop::Syscall
    } else {
        Stop::Signal(sig)
    }
}

/// PTRACE_GETREGS.
pub fn get_regs(pid: i32) -> Result<Regs> {
    // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
    let mut regs: Regs = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes exactly one user_regs_struct to the pointer.
    let rc = unsafe { libc::ptrace(libc::PTRACE_GETREGS, pid, 0usize, &mut regs as *mut Regs) };
    check("ptrace(PTRACE_GETREGS)", pid, rc)?;
    Ok(regs)
}

/// PTRACE_SETREGS.
pub fn set_regs(pid: i32, regs: &Regs) -> Result<()> {
    // SAFETY: the kernel reads one user_regs_struct from the pointer.
    let rc = unsafe { libc::ptrace(libc::PTRACE_SETREGS, pid, 0usize, regs as *const Regs) };
    check("ptrace(PTRACE_SETREGS)", pid, rc).map(drop)
}

/// PTRACE_GETREGSET NT_X86_XSTATE: the full extended state (x87, SSE, AVX, ...).
pub fn get_xstate(pid: i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: iov describes `buf`, which lives across the call; the kernel shrinks iov_len.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            pid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    check("ptrace(PTRACE_GETREGSET, NT_X86_XSTATE)", pid, rc)?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// PTRACE_SETREGSET NT_X86_XSTATE.
pub fn set_xstate(pid: i32, xstate: &[u8]) -> Result<()> {
    let mut copy = xstate.to_vec();
    let mut iov = libc::iovec {
        iov_base: copy.as_mut_ptr().cast(),
        iov_len: copy.len(),
    };
    // SAFETY: iov describes `copy`, which lives across the call; the kernel only reads it.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            pid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    check("ptrace(PTRACE_SETREGSET, NT_X86_XSTATE)", pid, rc).map(drop)
}

/// PTRACE_GETSIGMASK: the blocked signal mask (bit n-1 = signal n).
pub fn get_sigmask(pid: i32) -> Result<u64> {
    let mut mask: u64 = 0;
    // SAFETY: addr is the size of the mask (8), data points to a u64 the kernel fills.
    let rc = unsafe { libc::ptrace(PTRACE_GETSIGMASK as _, pid, 8usize, &mut mask as *mut u64) };
    check("ptrace(PTRACE_GETSIGMASK)", pid, rc)?;
    Ok(mask)
}

/// PTRACE_SETSIGMASK.
pub fn set_sigmask(pid: i32, mask: u64) -> Result<()> {
    // SAFETY: addr is the size of the mask (8), data points to a u64 the kernel reads.
    let rc = unsafe { libc::ptrace(PTRACE_SETSIGMASK as _, pid, 8usize, &mask as *const u64) };
    check("ptrace(PTRACE_SETSIGMASK)", pid, rc).map(drop)
}

/// PTRACE_GET_RSEQ_CONFIGURATION; `None` when the thread has no rseq registered.
pub fn get_rseq(pid: i32) -> Result<Option<RseqConfig>> {
    let mut conf = RseqConfig::default();
    // SAFETY: addr is the size of the struct; the kernel writes at most that many bytes.
    let rc = unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION as _,
            pid,
            std::mem::size_of::<RseqConfig>(),
            &mut conf as *mut RseqConfig,
        )
    };
    check("ptrace(PTRACE_GET_RSEQ_CONFIGURATION)", pid, rc)?;
    Ok((conf.abi_pointer != 0).then_some(conf))
}

/// PTRACE_CONT, delivering `sig` (0 for none).
pub fn cont(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: no pointers; data is the signal number.
    let rc = unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0usize, sig as usize) };
    check("ptrace(PTRACE_CONT)", pid, rc).map(drop)
}

/// PTRACE_SYSCALL: resume until the next syscall entry or exit.
pub fn resume_to_syscall(pid: i32) -> Result<()> {
    // SAFETY: no pointers.
    let rc = unsafe { libc::ptrace(libc::PTRACE_SYSCALL, pid, 0usize, 0usize) };
    check("ptrace(PTRACE_SYSCALL)", pid, rc).map(drop)
}

/// PTRACE_DETACH, delivering `sig` (0 for none).
pub fn detach(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: no pointers; data is the signal number.
    let rc = unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0usize, sig as usize) };
    check("ptrace(PTRACE_DETACH)", pid, rc).map(drop)
}

/// Seizes `pid` and brings it into an interrupt stop (see [`wait_interrupted`]); returns the
/// signal of that stop.
pub fn seize_and_stop(pid: i32, options: libc::c_int) -> Result<i32> {
    seize(pid, options)?;
    // A test can hold stasis here (FAILPOINTS="seized-thread=sleep(30)") so that the
    // seized, still running, tracee takes a signal before it is interrupted.
    crate::failpoints::hit("seized-thread");
    interrupt(pid)?;
    wait_interrupted(pid)
}

/// Waits until a task seized and interrupted by us stops, and returns the signal of the
/// PTRACE_EVENT_STOP: SIGTRAP for an interrupt, the signal that stopped it (SIGSTOP,
/// SIGTSTP, ...) for a task in a job-control stop.
///
/// A signal the task takes first (a signal-delivery stop: the kernel has already taken it
/// out of its queue) is delivered as the kernel would have without us, siginfo and all: the
/// interrupt stops the task once its handler frame is set up (as CRIU does).
/// Nothing of it is held only in stasis's memory, where it would be lost if stasis died.
pub fn wait_interrupted(pid: i32) -> Result<i32> {
    loop {
        match wait_stop(pid)? {
            Stop::EventStop(sig) => return Ok(sig),
            Stop::Signal(sig) => {
                cont(pid, sig)?;
                // The kernel keeps an interrupt asked for during this stop pending, but a
                // stop it entered after the request answered that request: ask again, so
                // it cannot run on. A second trap this may leave pending is taken by the
                // injector (it steps over event stops) or cleared by the detach.
                interrupt(pid)?;
            }
            Stop::Exited(code) => {
                return Err(RuntimeError::Protocol {
                    op: "seize",
                    pid,
                    what: format!("process exited with status {code} while being stopped"),
                })
            }
            Stop::Killed(sig) => {
                return Err(RuntimeError::Protocol {
                    op: "seize",
                    pid,
                    what: format!("process was killed by signal {sig} while being stopped"),
                })
            }
            other => {
                return Err(RuntimeError::Protocol {
                    op: "seize",
                    pid,
                    what: format!("unexpected stop {other:?}"),
                })
            }
        }
    }
}

/// Kernel-internal restart codes an interrupted syscall leaves in rax.
pub const ERESTARTSYS: i64 = 512;
pub const ERESTARTNOINTR: i64 = 513;
pub const ERESTARTNOHAND: i64 = 514;
pub const ERESTART_RESTARTBLOCK: i64 = 516;

/// Whom the registers will be resumed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeIn {
    /// The same task that was interrupted: its restart block is intact, so
    /// -ERESTART_RESTARTBLOCK continues through restart_syscall (remaining time kept).
    SameTask,
    /// A new task (restore): there is no restart block, so the original syscall is issued again.
    NewTask,
}

/// Rewinds registers of a task stopped inside an interrupted syscall so that, resumed from
/// any kind of stop, it re-executes the syscall instead of seeing a -ERESTART* code.
/// Registers of a task that was not in a syscall are returned unchanged.
pub fn rewind_interrupted_syscall(regs: &Regs, resume_in: ResumeIn) -> Regs {
    let mut r = *regs;
    if (r.orig_rax as i64) < 0 {
        return r;
    }
    match -(r.rax as i64) {
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
            r.rax = r.orig_rax;
            r.rip -= 2;
            r.orig_rax = u64::MAX;
        }
        ERESTART_RESTARTBLOCK => {
            r.rax = match resume_in {
                ResumeIn::SameTask => libc::SYS_restart_syscall as u64,
                ResumeIn::NewTask => r.orig_rax,
            };
            r.rip -= 2;
            r.orig_rax = u64::MAX;
        }
        _ => {}
    }
    r
}

/// Size of the kernel's siginfo_t.
pub const SIGINFO_SIZE: usize = 128;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;

#[repr(C)]
struct PeekSiginfoArgs {
    off: u64,
    flags: u32,
    nr: i32,
}

/// PTRACE_GETSIGINFO: the siginfo of the signal of a signal-delivery stop.
pub fn get_siginfo(pid: i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; SIGINFO_SIZE];
    // SAFETY: the kernel writes one siginfo_t (128 bytes) into buf.
    let rc = unsafe { libc::ptrace(libc::PTRACE_GETSIGINFO, pid, 0usize, buf.as_mut_ptr()) };
    check("ptrace(PTRACE_GETSIGINFO)", pid, rc)?;
    Ok(buf)
}

/// PTRACE_PEEKSIGINFO: the queued signals of the thread (`shared` false) or of the whole
/// process (`shared` true), oldest first, without dequeuing them.
pub fn peek_siginfo(pid: i32, shared: bool) -> Result<Vec<Vec<u8>>> {
    const BATCH: usize = 32;
    let mut out = Vec::new();
    let mut buf = vec![0u8; SIGINFO_SIZE * BATCH];
    loop {
        let args = PeekSiginfoArgs {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: BATCH as i32,
        };
        // SAFETY: args is a valid ptrace_peeksiginfo_args; buf holds nr siginfo_t slots.
        let rc = unsafe {
            libc::ptrace(
                PTRACE_PEEKSIGINFO as _,
                pid,
                &args as *const PeekSiginfoArgs,
                buf.as_mut_ptr(),
            )
        };
        let n = check("ptrace(PTRACE_PEEKSIGINFO)", pid, rc)? as usize;
        if n == 0 {
            return Ok(out);
        }
        out.extend(
            buf.chunks(SIGINFO_SIZE)
                .take(n.min(BATCH))
                .map(<[u8]>::to_vec),
        );
        if out.len() > 1 << 16 {
            return Err(RuntimeError::Unsupported(format!(
                "pid {pid} has more than 65536 queued signals"
            )));
        }
    }
}

/// The siginfo of the signal `sig` a tracee is in a signal-delivery stop for, so it can be
/// suppressed now and queued again later (its si_signo forced to `sig`).
pub fn stopped_signal_info(pid: i32, sig: i32) -> Result<Vec<u8>> {
    let mut info = get_siginfo(pid)?;
    if siginfo_signo(&info) != sig {
        info[..4].copy_from_slice(&sig.to_ne_bytes());
    }
    Ok(info)
}

/// The signal number of a raw siginfo_t.
pub fn siginfo_signo(info: &[u8]) -> i32 {
    info.get(..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .unwrap_or(0)
}

/// PTRACE_SETOPTIONS.
pub fn set_options(pid: i32, options: libc::c_int) -> Result<()> {
    // SAFETY: no pointers; data carries the options.
    let rc = unsafe { libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0usize, options as usize) };
    check("ptrace(PTRACE_SETOPTIONS)", pid, rc).map(drop)
}

/// get_robust_list(2) of thread `tid`: (head address, length).
pub fn get_robust_list(tid: i32) -> Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: u64 = 0;
    // SAFETY: head and len are valid out pointers for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            tid,
            &mut head as *mut u64,
            &mut len as *mut u64,
        )
    };
    check("get_robust_list", tid, rc)?;
    Ok((head, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rax: i64, orig: i64) -> Regs {
        // SAFETY: user_regs_struct is plain old data.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.rax = rax as u64;
        r.orig_rax = orig as u64;
        r.rip = 0x1002;
        r
    }

    #[test]
    fn rewinds_restartable_syscalls() {
        let r = rewind_interrupted_syscall(&regs(-ERESTARTSYS, 0), ResumeIn::NewTask);
        assert_eq!((r.rax, r.rip, r.orig_rax as i64), (0, 0x1000, -1));
        let r = rewind_interrupted_syscall(&regs(-ERESTART_RESTARTBLOCK, 35), ResumeIn::SameTask);
        assert_eq!(r.rax, libc::SYS_restart_syscall as u64);
        let r = rewind_interrupted_syscall(&regs(-ERESTART_RESTARTBLOCK, 35), ResumeIn::NewTask);
        assert_eq!((r.rax, r.rip), (35, 0x1000));
    }

    #[test]
    fn leaves_other_states_alone() {
        let r = rewind_interrupted_syscall(&regs(-4, 0), ResumeIn::NewTask);
        assert_eq!(r.rip, 0x1002);
        let r = rewind_interrupted_syscall(&regs(-ERESTARTSYS, -1), ResumeIn::NewTask);
        assert_eq!(r.rip, 0x1002);
    }
}

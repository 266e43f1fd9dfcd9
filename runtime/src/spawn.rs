//! Creating a process with a chosen PID that prepares itself for restore.
//!
//! `clone3` with `set_tid` forks the caller into the wanted PID. The child runs only raw
//! system calls on data prepared before the fork (no allocation: the parent may have other
//! threads holding allocator locks): it blocks all signals, asks to die with its parent,
//! sets its rlimits, umask and cwd, builds its fd table, maps a trampoline page holding a
//! `syscall` instruction at an address that is free in the target's layout, reports on a
//! pipe and waits to be seized. The restorer then replaces its address space through
//! injected syscalls (see [`crate::inject`]).

use crate::error::{Result, RuntimeError};
use crate::ptrace;
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Where an fd of the new process comes from.
#[derive(Debug, Clone)]
pub enum FdSource {
    /// open(path, flags), then lseek to offset.
    Open {
        path: CString,
        flags: i32,
        offset: u64,
    },
    /// A duplicate of this (the restorer's) fd, given these file status flags
    /// (O_APPEND, O_NONBLOCK, ... as F_SETFL sets them).
    Inherit(i32, i32),
}

/// One fd of the new process.
#[derive(Debug, Clone)]
pub struct FdPlan {
    pub target: i32,
    pub source: FdSource,
    pub cloexec: bool,
}

/// What the child sets up before it is seized.
#[derive(Debug, Clone)]
pub struct ChildPlan {
    /// (RLIMIT_*, soft, hard).
    pub rlimits: Vec<(u32, u64, u64)>,
    pub umask: u32,
    pub cwd: CString,
    pub fds: Vec<FdPlan>,
    /// Page-aligned address of the trampoline: one executable page holding `syscall`,
    /// followed by `scratch_len` bytes of read-write scratch memory.
    pub trampoline: u64,
    pub scratch_len: u64,
}

impl ChildPlan {
    /// Total bytes of the trampoline mapping (code page + scratch).
    pub fn trampoline_len(&self) -> u64 {
        crate::PAGE_SIZE + self.scratch_len
    }
}

/// A child created by [`spawn`], seized and stopped, ready for injection.
pub struct Spawned {
    pub pid: i32,
    /// The fd number the control pipe has in the child (close it by injection).
    pub ctl_fd: i32,
}

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// The child's report: step 0 means ready.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Report {
    step: u32,
    index: u32,
    errno: i32,
    pad: u32,
}

const STEP_READY: u32 = 0;
const STEP_SIGMASK: u32 = 1;
const STEP_RLIMIT: u32 = 2;
const STEP_CHDIR: u32 = 3;
const STEP_OPEN: u32 = 4;
const STEP_LSEEK: u32 = 5;
const STEP_DUPFD: u32 = 6;
const STEP_DUP3: u32 = 7;
const STEP_MMAP: u32 = 8;
const STEP_MPROTECT: u32 = 9;
const STEP_PDEATHSIG: u32 = 10;
const STEP_CTLFD: u32 = 11;
const STEP_SETFL: u32 = 12;

/// Forks a child with PID `pid` that carries out `plan`, seizes it and stops it.
/// On any failure the child is killed and reaped and the error names the failing step.
pub fn spawn(pid: i32, plan: &ChildPlan) -> Result<Spawned> {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two c_ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(RuntimeError::last_os("pipe2", "restore control pipe"));
    }
    // SAFETY: pipe2 just returned these two fds; we own them.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let max_target = plan.fds.iter().map(|f| f.target).max().unwrap_or(-1);
    let ctl_min = max_target.max(2) + 1;

    let set_tid: [libc::pid_t; 1] = [pid];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM forks; args and set_tid live across the call. The child
    // branch below only runs raw syscalls on memory prepared before the fork and never returns.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if rc == -1 {
        let e = std::io::Error::last_os_error();
        return Err(RuntimeError::sys(
            "clone3(set_tid)",
            format!("pid {pid}"),
            e,
        ));
    }
    if rc == 0 {
        child_main(plan, wr.as_raw_fd(), ctl_min, max_target);
    }
    let child = rc as i32;
    drop(wr);
    let result = (|| {
        ptrace::seize(child, libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL)?;
        let report = read_report(child, rd)?;
        if report.step != STEP_READY {
            return Err(describe_failure(child, plan, &report));
        }
        ptrace::interrupt(child)?;
        loop {
            match ptrace::wait_stop(child)? {
                ptrace::Stop::EventStop(_) => break,
                ptrace::Stop::Signal(_) => ptrace::cont(child, 0)?,
                other => {
                    return Err(RuntimeError::Protocol {
                        op: "restore: stop new process",
                        pid: child,
                        what: format!("unexpected {other:?}"),
                    })
                }
            }
        }
        Ok(Spawned {
            pid: child,
            ctl_fd: report.index as i32,
        })
    })();
    if result.is_err() {
        kill_and_reap(child);
    }
    result
}

/// Kills a child this process created and reaps it.
pub fn kill_and_reap(pid: i32) {
    // SAFETY: kill and waitpid take no pointers we own beyond a local status.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        while libc::waitpid(pid, &mut status, libc::__WALL) == -1
            && *libc::__errno_location() == libc::EINTR
        {}
    }
}

fn read_report(pid: i32, rd: OwnedFd) -> Result<Report> {
    let mut file = File::from(rd);
    let mut buf = [0u8; std::mem::size_of::<Report>()];
    match file.read_exact(&mut buf) {
        Ok(()) => {}
        Err(e) => {
            return Err(RuntimeError::Protocol {
                op: "restore: prepare new process",
                pid,
                what: format!("it exited before reporting ({e})"),
            })
        }
    }
    // SAFETY: Report is repr(C) plain old data of exactly buf's size.
    Ok(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<Report>()) })
}

fn describe_failure(pid: i32, plan: &ChildPlan, r: &Report) -> RuntimeError {
    let err = std::io::Error::from_raw_os_error(r.errno);
    let fd_name = |i: u32| -> String {
        match plan.fds.get(i as usize) {
            Some(FdPlan {
                target,
                source: FdSource::Open { path, .. },
                ..
            }) => format!("fd {target} ({})", path.to_string_lossy()),
            Some(FdPlan {
                target,
                source: FdSource::Inherit(from, _),
                ..
            }) => format!("fd {target} (inherited from restorer fd {from})"),
            None => format!("fd #{i}"),
        }
    };
    let what = match r.step {
        STEP_SIGMASK => format!("blocking signals: {err}"),
        STEP_RLIMIT => {
            let (res, soft, hard) = plan
                .rlimits
                .get(r.index as usize)
                .copied()
                .unwrap_or_default();
            format!("setrlimit({res}, soft {soft}, hard {hard}): {err} (raising a hard limit needs CAP_SYS_RESOURCE)")
        }
        STEP_CHDIR => format!("chdir({}): {err}", plan.cwd.to_string_lossy()),
        STEP_OPEN => format!("open {}: {err}", fd_name(r.index)),
        STEP_LSEEK => format!("lseek {}: {err}", fd_name(r.index)),
        STEP_DUPFD => format!("placing {}: {err}", fd_name(r.index)),
        STEP_DUP3 => format!("dup3 into {}: {err}", fd_name(r.index)),
        STEP_MMAP => format!("mapping trampoline at {:#x}: {err}", plan.trampoline),
        STEP_MPROTECT => format!("mprotect trampoline: {err}"),
        STEP_PDEATHSIG => format!("prctl(PR_SET_PDEATHSIG): {err}"),
        STEP_CTLFD => format!("moving control pipe: {err}"),
        STEP_SETFL => format!("setting file status flags of {}: {err}", fd_name(r.index)),
        s => format!("step {s}: {err}"),
    };
    kill_and_reap(pid);
    RuntimeError::Protocol {
        op: "restore: prepare new process",
        pid,
        what,
    }
}

/// The child side. Only raw syscalls on pre-built data; never returns.
fn child_main(plan: &ChildPlan, wr: i32, ctl_min: i32, max_target: i32) -> ! {
    // SAFETY: everything below is a direct syscall on memory that was valid before the fork
    // and stays valid in the child's copy; the function ends in _exit or an endless pause.
    unsafe {
        let fail = |ctl: i32, step: u32, index: u32| -> ! {
            let r = Report {
                step,
                index,
                errno: *libc::__errno_location(),
                pad: 0,
            };
            libc::write(
                ctl,
                (&r as *const Report).cast(),
                std::mem::size_of::<Report>(),
            );
            libc::_exit(127);
        };
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        if libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut()) != 0 {
            fail(wr, STEP_SIGMASK, 0);
        }
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(wr, STEP_PDEATHSIG, 0);
        }
        // The control pipe moves above every target fd so building the table cannot clobber it.
        let ctl = libc::fcntl(wr, libc::F_DUPFD_CLOEXEC, ctl_min);
        if ctl < 0 {
            fail(wr, STEP_CTLFD, 0);
        }
        for (i, &(res, soft, hard)) in plan.rlimits.iter().enumerate() {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(res as _, &lim) != 0 {
                fail(ctl, STEP_RLIMIT, i as u32);
            }
        }
        libc::umask(plan.umask as libc::mode_t);
        if libc::chdir(plan.cwd.as_ptr()) != 0 {
            fail(ctl, STEP_CHDIR, 0);
        }
        // Open every fd at a temporary number above the control pipe, then move them.
        let mut temps = [0i32; 4096];
        if plan.fds.len() > temps.len() {
            *libc::__errno_location() = libc::EMFILE;
            fail(ctl, STEP_DUPFD, temps.len() as u32);
        }
        for (i, f) in plan.fds.iter().enumerate() {
            let src = match &f.source {
                FdSource::Open {
                    path,
                    flags,
                    offset,
                } => {
                    let fd = libc::open(path.as_ptr(), *flags & !libc::O_CLOEXEC, 0);
                    if fd < 0 {
                        fail(ctl, STEP_OPEN, i as u32);
                    }
                    if *offset != 0 && libc::lseek(fd, *offset as libc::off_t, libc::SEEK_SET) < 0 {
                        fail(ctl, STEP_LSEEK, i as u32);
                    }
                    fd
                }
                FdSource::Inherit(from, status) => {
                    if libc::fcntl(*from, libc::F_SETFL, *status) < 0 {
                        fail(ctl, STEP_SETFL, i as u32);
                    }
                    *from
                }
            };
            let tmp = libc::fcntl(src, libc::F_DUPFD, ctl + 1);
            if tmp < 0 {
                fail(ctl, STEP_DUPFD, i as u32);
            }
            temps[i] = tmp;
        }
        for (i, f) in plan.fds.iter().enumerate() {
            let flags = if f.cloexec { libc::O_CLOEXEC } else { 0 };
            if libc::dup3(temps[i], f.target, flags) < 0 {
                fail(ctl, STEP_DUP3, i as u32);
            }
        }
        for fd in 0..=max_target {
            if !plan.fds.iter().any(|f| f.target == fd) {
                libc::close(fd);
            }
        }
        if ctl > max_target + 1 {
            libc::syscall(libc::SYS_close_range, max_target + 1, ctl - 1, 0);
        }
        libc::syscall(libc::SYS_close_range, ctl + 1, u32::MAX, 0);
        let len = plan.trampoline_len() as usize;
        let addr = libc::mmap(
            plan.trampoline as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        );
        if addr == libc::MAP_FAILED || addr as u64 != plan.trampoline {
            fail(ctl, STEP_MMAP, 0);
        }
        // syscall; int3
        let code = addr.cast::<u8>();
        *code = 0x0f;
        *code.add(1) = 0x05;
        *code.add(2) = 0xcc;
        if libc::mprotect(
            addr,
            crate::PAGE_SIZE as usize,
            libc::PROT_READ | libc::PROT_EXEC,
        ) != 0
        {
            fail(ctl, STEP_MPROTECT, 0);
        }
        let r = Report {
            step: STEP_READY,
            index: ctl as u32,
            errno: 0,
            pad: 0,
        };
        libc::write(
            ctl,
            (&r as *const Report).cast(),
            std::mem::size_of::<Report>(),
        );
        libc::close(ctl);
        loop {
            libc::pause();
        }
    }
}

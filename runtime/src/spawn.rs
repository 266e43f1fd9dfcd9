//! Creating a process tree with chosen PIDs that prepares itself for restore.
//!
//! `clone3` with `set_tid` forks the caller into the root's PID; every process then forks its
//! own children the same way, so parents, sessions and process groups come out right. Each
//! process runs only raw system calls on data prepared before the first fork (no allocation:
//! the restorer may have other threads holding allocator locks). A process blocks all
//! signals, asks to die with its parent, becomes a session or group leader if it was one,
//! forks its children (a zombie child exits at once with its status), builds its fd table
//! from the open file descriptions the restorer prepared (inherited through every fork),
//! sets its rlimits, umask and cwd, maps a trampoline page holding a `syscall` instruction,
//! reports on a shared pipe and waits to be seized. The restorer then replaces each address
//! space through injected syscalls (see [`crate::inject`]).
//!
//! With [`TreeSpec::pid_ns`] the root is cloned into a new pid namespace instead, where it is
//! PID 1; it joins the namespaces and cgroups it is given before it forks anything, and its
//! descendants get their PIDs inside that namespace. Their host PIDs (which the restorer
//! needs for ptrace, /proc and kill) are read from the kernel once all have reported: the
//! root's from clone3, the others' from /proc children lists and NSpid
//! ([`crate::pidns::tree_by_own_pid`]).

use crate::error::{Result, RuntimeError};
use crate::ptrace;
use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// One fd of a new process: a duplicate of the restorer's fd `desc` (an open file
/// description prepared before the fork, inherited by every process of the tree).
#[derive(Debug, Clone)]
pub struct FdPlan {
    pub target: i32,
    pub desc: i32,
    pub cloexec: bool,
}

/// How a zombie of the tree ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// What one process of the tree sets up before it is seized.
#[derive(Debug, Clone)]
pub struct ProcSpec {
    pub pid: i32,
    /// Indexes (into [`TreeSpec::procs`]) of the children it forks, in order.
    pub children: Vec<usize>,
    /// setsid(): it leads its own session.
    pub setsid: bool,
    /// setpgid(0, pgid) when it differs from the group it inherits.
    pub pgid: Option<i32>,
    pub subreaper: bool,
    /// Set for a zombie: it exits at once, and its parent waits until it is dead.
    pub exit: Option<Exit>,
    /// (RLIMIT_*, soft, hard).
    pub rlimits: Vec<(u32, u64, u64)>,
    pub umask: u32,
    pub cwd: CString,
    pub fds: Vec<FdPlan>,
    /// It shares its parent's fd table (clone(CLONE_FILES)): it leaves the table alone and
    /// its parent builds it.
    pub share_files: bool,
}

/// The whole tree; `procs[0]` is the root.
#[derive(Debug, Clone)]
pub struct TreeSpec {
    pub procs: Vec<ProcSpec>,
    /// Page-aligned address of the trampoline: one executable page holding `syscall`,
    /// followed by `scratch_len` bytes of read-write scratch memory. Free in every process's
    /// target layout and in the restorer's.
    pub trampoline: u64,
    pub scratch_len: u64,
    /// Fds of the restorer, above every target fd, that every process keeps open at the same
    /// numbers until the restorer closes them by injection: objects the processes map but
    /// cannot reach by a path (shared memory, ghost files). Sorted.
    pub keep_fds: Vec<i32>,
    /// Create the root as PID 1 of a new pid namespace, entering these first.
    pub pid_ns: Option<NewPidNs>,
}

/// What the root of a tree made in a new pid namespace enters, in this order, right after it
/// is cloned and before it forks anything. The fds are the restorer's (inherited; closed in
/// the new processes with everything else they do not keep).
#[derive(Debug, Clone, Default)]
pub struct NewPidNs {
    /// Namespace fds to setns into.
    pub join: Vec<i32>,
    /// mount("proc", "/proc", "proc", MS_NOSUID|MS_NODEV|MS_NOEXEC) after joining.
    pub mount_proc: bool,
    /// cgroup.procs fds (open for writing) to write "0" into.
    pub cgroup_procs: Vec<i32>,
}

impl TreeSpec {
    /// Total bytes of the trampoline mapping (code page + scratch).
    pub fn trampoline_len(&self) -> u64 {
        crate::PAGE_SIZE + self.scratch_len
    }
}

/// A process created by [`spawn_tree`], seized and stopped, ready for injection.
#[derive(Debug, Clone, Copy)]
pub struct Spawned {
    /// Its PID as the restorer sees it (for ptrace, /proc, kill).
    pub pid: i32,
    /// Its PID as it sees it (the spec's; differs from `pid` in a new pid namespace).
    pub ns_pid: i32,
    /// The fd number the control pipe has in it (close it by injection); -1 for a process
    /// sharing its parent's fd table, which has none of its own.
    pub ctl_fd: i32,
}

/// Every process of a tree created by [`spawn_tree`]. Dropped without [`SpawnedTree::release`],
/// the whole tree is killed and reaped.
pub struct SpawnedTree {
    /// Live processes (not zombies), in tree order.
    pub procs: Vec<Spawned>,
    /// Host PID of the root.
    root: i32,
    released: bool,
    /// Whether the caller was a child subreaper before (it is put back so).
    was_subreaper: bool,
}

impl SpawnedTree {
    /// The root's PID as the restorer sees it.
    pub fn root(&self) -> i32 {
        self.root
    }

    /// Kills the whole tree and reaps it, with `threads` (thread ids of its processes that
    /// the caller created and traces): all are collected in whatever order they die, since
    /// a pid namespace's init cannot finish dying before its traced children and threads
    /// are collected.
    pub fn kill(mut self, threads: &[i32]) {
        let mut pids: Vec<i32> = self.procs.iter().map(|p| p.pid).collect();
        pids.extend_from_slice(threads);
        kill_tree(self.root, &pids);
        self.released = true;
        set_subreaper(self.was_subreaper);
    }

    /// The tree now belongs to the caller (it detaches and lets it run).
    pub fn release(mut self) {
        self.released = true;
        set_subreaper(self.was_subreaper);
    }
}

impl Drop for SpawnedTree {
    fn drop(&mut self) {
        if !self.released {
            let pids: Vec<i32> = self.procs.iter().map(|p| p.pid).collect();
            kill_tree(self.root, &pids);
            set_subreaper(self.was_subreaper);
        }
    }
}

/// clone3(2): the child's PID in the parent, 0 in the child, -1 with errno on failure.
///
/// # Safety
/// Forks the calling process: everything `args` points to must live across the call, and
/// the caller's child branch must not return into code that assumes the parent's threads.
pub(crate) unsafe fn clone3(args: &CloneArgs) -> i64 {
    // SAFETY: the caller keeps args (and what it points to) valid across the call.
    unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    }
}

/// `struct clone_args` of clone3(2).
#[repr(C)]
#[derive(Default)]
pub(crate) struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// A process's report: step 0 means ready.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Report {
    proc_index: u32,
    step: u32,
    index: u32,
    errno: i32,
}

const STEP_READY: u32 = 0;
const STEP_SIGMASK: u32 = 1;
const STEP_RLIMIT: u32 = 2;
const STEP_CHDIR: u32 = 3;
const STEP_DUP3: u32 = 7;
const STEP_MMAP: u32 = 8;
const STEP_MPROTECT: u32 = 9;
const STEP_PDEATHSIG: u32 = 10;
const STEP_CTLFD: u32 = 11;
const STEP_SETSID: u32 = 13;
const STEP_SETPGID: u32 = 14;
const STEP_SUBREAPER: u32 = 15;
const STEP_CLONE: u32 = 16;
const STEP_ZOMBIE: u32 = 17;
const STEP_SETNS: u32 = 18;
const STEP_MOUNT_PROC: u32 = 19;
const STEP_CGROUP: u32 = 20;

fn set_subreaper(on: bool) {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes no pointers.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, on as libc::c_ulong, 0, 0, 0) };
}

fn is_subreaper() -> bool {
    let mut on: libc::c_int = 0;
    // SAFETY: PR_GET_CHILD_SUBREAPER writes one int to the pointer.
    let rc = unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut on as *mut libc::c_int) };
    rc == 0 && on != 0
}

/// Creates the tree of `spec`, seizes every live process and stops it. On any failure
/// everything created is killed and reaped, and the error names the process and the step.
pub fn spawn_tree(spec: &TreeSpec) -> Result<SpawnedTree> {
    let root = spec
        .procs
        .first()
        .ok_or_else(|| RuntimeError::Protocol {
            op: "restore: create process tree",
            pid: 0,
            what: "the tree is empty".into(),
        })?
        .pid;
    if spec.keep_fds.windows(2).any(|w| w[0] >= w[1]) {
        return Err(RuntimeError::Protocol {
            op: "restore: create process tree",
            pid: root,
            what: "the fds to keep are not sorted".into(),
        });
    }
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid array of two c_ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(RuntimeError::last_os("pipe2", "restore control pipe"));
    }
    // SAFETY: pipe2 just returned these two fds; we own them.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let max_target = spec
        .procs
        .iter()
        .flat_map(|p| p.fds.iter().map(|f| f.target))
        .max()
        .unwrap_or(-1)
        .max(2);
    if spec.keep_fds.first().is_some_and(|&k| k <= max_target) {
        return Err(RuntimeError::Protocol {
            op: "restore: create process tree",
            pid: root,
            what: format!("an fd to keep is not above every target fd ({max_target})"),
        });
    }
    // Orphans of a failed restore come back to us to be reaped, not to a slow init (in a new
    // pid namespace they go to its init, our child).
    let was_subreaper = is_subreaper();
    set_subreaper(true);
    // SAFETY: forks; the child branch only runs raw syscalls on memory prepared before the
    // fork and never returns.
    let rc = unsafe {
        match spec.pid_ns {
            // PID 1 of the new namespace; its host PID is the kernel's choice.
            Some(_) => clone_with_pid(0, libc::CLONE_NEWPID as u64),
            None => clone_with_pid(root, 0),
        }
    };
    if rc < 0 {
        set_subreaper(was_subreaper);
        let call = if spec.pid_ns.is_some() {
            "clone3(CLONE_NEWPID)"
        } else {
            "clone3(set_tid)"
        };
        return Err(RuntimeError::sys(
            call,
            format!("pid {root}"),
            std::io::Error::from_raw_os_error(-rc as i32),
        ));
    }
    if rc == 0 {
        // SAFETY: we are the new root process; see child_main.
        unsafe { child_main(spec, 0, wr.as_raw_fd(), max_target) };
    }
    drop(wr);
    let host_root = rc as i32;
    let mut tree = SpawnedTree {
        procs: Vec::new(),
        root: host_root,
        released: false,
        was_subreaper,
    };
    let reports = read_reports(rd)?;
    // Host PIDs: the same as the spec's, or in a new pid namespace as the kernel tells.
    let hosts = match spec.pid_ns {
        Some(_) => crate::pidns::tree_by_own_pid(host_root, spec.procs.len() + 1)?,
        None => spec.procs.iter().map(|p| (p.pid, p.pid)).collect(),
    };
    // Tree order (parents before children), as in the spec.
    let mut ready: Vec<&Report> = reports.iter().filter(|r| r.step == STEP_READY).collect();
    ready.sort_by_key(|r| r.proc_index);
    tree.procs = ready
        .iter()
        .filter_map(|r| {
            let p = spec.procs.get(r.proc_index as usize)?;
            Some(Spawned {
                pid: *hosts.get(&p.pid)?,
                ns_pid: p.pid,
                ctl_fd: if p.share_files { -1 } else { r.index as i32 },
            })
        })
        .collect();
    if let Some(bad) = reports.iter().find(|r| r.step != STEP_READY) {
        return Err(describe_failure(spec, bad));
    }
    let live = spec.procs.iter().filter(|p| p.exit.is_none()).count();
    if tree.procs.is_empty() {
        return Err(RuntimeError::Protocol {
            op: "restore: prepare new process",
            pid: host_root,
            what: "it exited before reporting".into(),
        });
    }
    if tree.procs.len() != live {
        return Err(RuntimeError::Protocol {
            op: "restore: prepare process tree",
            pid: host_root,
            what: format!(
                "{} of {live} processes reported ready and are in the tree; the others died",
                tree.procs.len()
            ),
        });
    }
    // Every signal is blocked in the new processes: only SIGKILL could come first.
    for s in &tree.procs {
        ptrace::seize_and_stop(s.pid, libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL)?;
    }
    Ok(tree)
}

/// clone3 with set_tid = [pid] (none for pid 0) and `flags`: 0 in the child, the pid (in
/// the caller's namespace) in the parent, -errno on failure.
///
/// # Safety
/// Forks the calling process; the caller's child branch must not return into code that
/// assumes the parent's threads exist.
unsafe fn clone_with_pid(pid: i32, flags: u64) -> i64 {
    let set_tid: [libc::pid_t; 1] = [pid];
    let args = CloneArgs {
        flags,
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if pid == 0 { 0 } else { set_tid.as_ptr() as u64 },
        set_tid_size: u64::from(pid != 0),
        ..Default::default()
    };
    // SAFETY: args and set_tid live across the call; the caller handles the child.
    let rc = unsafe { clone3(&args) };
    if rc < 0 {
        // SAFETY: reads this thread's errno.
        -(unsafe { *libc::__errno_location() }) as i64
    } else {
        rc
    }
}

/// Kills a tree this process created (the root, and by PDEATHSIG or directly every process
/// in `pids`) and reaps what comes back to us, waiting a bounded time.
pub fn kill_tree(root: i32, pids: &[i32]) {
    // SAFETY: kill takes no pointers; these pids are processes we created and still trace
    // or parent (a failed clone3 never puts its pid in the list).
    unsafe {
        libc::kill(root, libc::SIGKILL);
        for &p in pids {
            libc::kill(p, libc::SIGKILL);
        }
    }
    let mut left: Vec<i32> = std::iter::once(root).chain(pids.iter().copied()).collect();
    left.sort_unstable();
    left.dedup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|&p| {
            let mut status = 0;
            // SAFETY: waitpid on a pid we created, with a local status.
            let r = unsafe { libc::waitpid(p, &mut status, libc::WNOHANG | libc::__WALL) };
            if r == p {
                // A tracee reports its death to us first; as its (sub)reaper we may also
                // collect it once more.
                // SAFETY: as above.
                unsafe { libc::waitpid(p, &mut status, libc::WNOHANG | libc::__WALL) };
                return false;
            }
            r == 0 || std::path::Path::new(&format!("/proc/{p}")).exists()
        });
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How long the new processes may take to prepare themselves.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads reports until every process has closed the control pipe (bounded).
fn read_reports(rd: OwnedFd) -> Result<Vec<Report>> {
    let mut file = File::from(rd);
    let mut all = Vec::new();
    let deadline = Instant::now() + PREPARE_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one pollfd on the stack.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(60_000) as libc::c_int) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RuntimeError::sys("poll", "restore control pipe", e));
        }
        if n == 0 {
            return Err(RuntimeError::Protocol {
                op: "restore: prepare process tree",
                pid: 0,
                what: format!(
                    "the new processes did not all report within {}s",
                    PREPARE_TIMEOUT.as_secs()
                ),
            });
        }
        let mut buf = [0u8; 4096];
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => all.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(RuntimeError::sys("read", "restore control pipe", e)),
        }
    }
    let size = std::mem::size_of::<Report>();
    Ok(all
        .chunks_exact(size)
        // SAFETY: Report is repr(C) plain old data of exactly the chunk's size.
        .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<Report>()) })
        .collect())
}

fn describe_failure(spec: &TreeSpec, r: &Report) -> RuntimeError {
    let err = std::io::Error::from_raw_os_error(r.errno);
    let Some(p) = spec.procs.get(r.proc_index as usize) else {
        return RuntimeError::Protocol {
            op: "restore: prepare process tree",
            pid: 0,
            what: format!("a process reported step {}: {err}", r.step),
        };
    };
    let fd_name = |i: u32| -> String {
        match p.fds.get(i as usize) {
            Some(f) => format!("fd {} (from restorer fd {})", f.target, f.desc),
            None => format!("fd #{i}"),
        }
    };
    let child = |i: u32| spec.procs.get(i as usize).map_or(0, |c| c.pid).to_string();
    let what = match r.step {
        STEP_SIGMASK => format!("blocking signals: {err}"),
        STEP_RLIMIT => {
            let (res, soft, hard) = p.rlimits.get(r.index as usize).copied().unwrap_or_default();
            format!("setrlimit({res}, soft {soft}, hard {hard}): {err} (raising a hard limit needs CAP_SYS_RESOURCE)")
        }
        STEP_CHDIR => format!("chdir({}): {err}", p.cwd.to_string_lossy()),
        STEP_DUP3 => format!("dup3 into {}: {err}", fd_name(r.index)),
        STEP_MMAP => format!("mapping trampoline at {:#x}: {err}", spec.trampoline),
        STEP_MPROTECT => format!("mprotect trampoline: {err}"),
        STEP_PDEATHSIG => format!("prctl(PR_SET_PDEATHSIG): {err}"),
        STEP_CTLFD => format!("moving control pipe: {err}"),
        STEP_SETSID => format!("setsid: {err}"),
        STEP_SETPGID => format!(
            "setpgid to process group {}: {err}",
            p.pgid.unwrap_or_default()
        ),
        STEP_SUBREAPER => format!("prctl(PR_SET_CHILD_SUBREAPER): {err}"),
        STEP_CLONE => format!("clone3 of child {} with its pid: {err}", child(r.index)),
        STEP_ZOMBIE => format!("waiting for zombie child {} to exit: {err}", child(r.index)),
        STEP_SETNS => format!("joining namespace #{} (setns): {err}", r.index),
        STEP_MOUNT_PROC => format!("mounting a new proc at /proc: {err}"),
        STEP_CGROUP => format!("entering cgroup #{} (writing cgroup.procs): {err}", r.index),
        s => format!("step {s}: {err}"),
    };
    RuntimeError::Protocol {
        op: "restore: prepare new process",
        pid: p.pid,
        what,
    }
}

/// The new process `idx` of the tree. Only raw syscalls on pre-built data; never returns.
///
/// # Safety
/// Must run in a freshly forked child whose memory is a copy of the restorer's.
unsafe fn child_main(spec: &TreeSpec, idx: usize, wr: i32, max_target: i32) -> ! {
    let p = &spec.procs[idx];
    // SAFETY: everything below is a direct syscall on memory that was valid before the fork
    // and stays valid in the child's copy; the function ends in _exit or an endless pause.
    unsafe {
        let report = |ctl: i32, step: u32, index: u32, errno: i32| {
            let r = Report {
                proc_index: idx as u32,
                step,
                index,
                errno,
            };
            libc::write(
                ctl,
                (&r as *const Report).cast(),
                std::mem::size_of::<Report>(),
            );
        };
        let fail = |ctl: i32, step: u32, index: u32| -> ! {
            report(ctl, step, index, *libc::__errno_location());
            libc::_exit(127);
        };
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        if libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut()) != 0 {
            fail(wr, STEP_SIGMASK, 0);
        }
        let parent = libc::getppid();
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
        if idx != 0 && libc::getppid() != parent {
            libc::_exit(127); // the parent died before PDEATHSIG was armed
        }
        if let (0, Some(ns)) = (idx, &spec.pid_ns) {
            if let Some((step, index)) = enter_namespaces(ns) {
                fail(wr, step, index);
            }
        }
        if p.setsid && libc::setsid() < 0 {
            fail(wr, STEP_SETSID, 0);
        }
        if let Some(pgid) = p.pgid {
            // The group's leader may be a relative still on its way to creating it.
            let mut tries = 0;
            while libc::setpgid(0, pgid) != 0 {
                tries += 1;
                if *libc::__errno_location() != libc::EPERM || tries > 10_000 {
                    fail(wr, STEP_SETPGID, 0);
                }
                libc::sched_yield();
            }
        }
        // A zombie exits as soon as it is in its session and group.
        if let Some(exit) = p.exit {
            match exit {
                Exit::Code(c) => libc::_exit(c),
                Exit::Signal(sig) => {
                    // No core file: a zombie's status is all that is wanted.
                    let none = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    libc::setrlimit(libc::RLIMIT_CORE, &none);
                    libc::signal(sig, libc::SIG_DFL);
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, sig);
                    libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                    libc::kill(libc::getpid(), sig);
                    libc::_exit(128 + sig);
                }
            }
        }
        if p.subreaper && libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0 {
            fail(wr, STEP_SUBREAPER, 0);
        }
        for &c in &p.children {
            let child = &spec.procs[c];
            // A child sharing our fd table tells us on its own pipe when it is done with the
            // table as it is now (it has reported on `wr`), before we rebuild it.
            let mut sync = [-1i32; 2];
            if child.share_files && libc::pipe2(sync.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                fail(wr, STEP_CLONE, c as u32);
            }
            let flags = if child.share_files {
                libc::CLONE_FILES as u64
            } else {
                0
            };
            let rc = clone_with_pid(child.pid, flags);
            if rc == 0 {
                SYNC_FD.store(sync[1], std::sync::atomic::Ordering::Relaxed);
                child_main(spec, c, wr, max_target);
            }
            if rc < 0 {
                *libc::__errno_location() = -rc as i32;
                fail(wr, STEP_CLONE, c as u32);
            }
            if child.share_files {
                let mut b = 0u8;
                libc::read(sync[0], (&mut b as *mut u8).cast(), 1);
                libc::close(sync[0]);
                libc::close(sync[1]);
            }
            // The parent sets the child's group too, so a later sibling can join it.
            if let (Some(pgid), false) = (child.pgid, child.setsid) {
                libc::setpgid(child.pid, pgid);
            }
            if child.exit.is_some() {
                // Dead, not reaped; the SIGCHLD it sent is not part of the image.
                let mut info: libc::siginfo_t = std::mem::zeroed();
                if libc::waitid(
                    libc::P_PID,
                    child.pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                ) != 0
                {
                    fail(wr, STEP_ZOMBIE, c as u32);
                }
                let mut chld: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut chld);
                libc::sigaddset(&mut chld, libc::SIGCHLD);
                let zero = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                libc::sigtimedwait(&chld, std::ptr::null_mut(), &zero);
            }
        }
        if p.share_files {
            // Everything but the fd table is ours; the table is our parent's to build.
            if let Some((step, index)) = own_setup(spec, p) {
                fail(wr, step, index);
            }
            report(wr, STEP_READY, 0, 0);
            let sync = SYNC_FD.load(std::sync::atomic::Ordering::Relaxed);
            libc::write(sync, b"s".as_ptr().cast(), 1);
            loop {
                libc::pause();
            }
        }
        // The control pipe moves above every target fd so building the table cannot clobber it.
        let ctl = libc::fcntl(wr, libc::F_DUPFD_CLOEXEC, max_target + 1);
        if ctl < 0 {
            fail(wr, STEP_CTLFD, 0);
        }
        for (i, f) in p.fds.iter().enumerate() {
            let flags = if f.cloexec { libc::O_CLOEXEC } else { 0 };
            if libc::dup3(f.desc, f.target, flags) < 0 {
                fail(ctl, STEP_DUP3, i as u32);
            }
        }
        for fd in 0..=max_target {
            if !p.fds.iter().any(|f| f.target == fd) {
                libc::close(fd);
            }
        }
        // Close everything above the targets but the control pipe and the fds to keep.
        close_above(max_target, ctl, &spec.keep_fds);
        if let Some((step, index)) = own_setup(spec, p) {
            fail(ctl, step, index);
        }
        report(ctl, STEP_READY, ctl as u32, 0);
        libc::close(ctl);
        loop {
            libc::pause();
        }
    }
}

/// Closes every fd above `max_target` except `ctl` and `keep` (sorted, all above
/// `max_target`, none equal to `ctl`).
///
/// # Safety
/// As [`child_main`]: raw syscalls only, in the new process.
unsafe fn close_above(max_target: i32, ctl: i32, keep: &[i32]) {
    let close = |lo: i32, hi: u32| {
        if lo >= 0 && lo as u32 <= hi {
            // SAFETY: close_range takes no pointers.
            unsafe { libc::syscall(libc::SYS_close_range, lo as u32, hi, 0) };
        }
    };
    let mut lo = max_target + 1;
    let mut ctl_left = true;
    for &k in keep {
        if ctl_left && ctl < k {
            close(lo, ctl as u32 - 1);
            lo = ctl + 1;
            ctl_left = false;
        }
        close(lo, k as u32 - 1);
        lo = k + 1;
    }
    if ctl_left {
        close(lo, ctl as u32 - 1);
        lo = lo.max(ctl + 1);
    }
    close(lo, u32::MAX);
}

/// What the root of a new pid namespace enters first: the namespaces to join, a proc of
/// its own at /proc, its cgroups. Returns the failed (step, index), errno set.
///
/// # Safety
/// As [`child_main`]: raw syscalls only, in the new root.
unsafe fn enter_namespaces(ns: &NewPidNs) -> Option<(u32, u32)> {
    // SAFETY: direct syscalls on memory valid in the child's copy.
    unsafe {
        for (i, &fd) in ns.join.iter().enumerate() {
            if libc::setns(fd, 0) != 0 {
                return Some((STEP_SETNS, i as u32));
            }
        }
        if ns.mount_proc {
            let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            if libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                flags,
                std::ptr::null(),
            ) != 0
            {
                return Some((STEP_MOUNT_PROC, 0));
            }
        }
        for (i, &fd) in ns.cgroup_procs.iter().enumerate() {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Some((STEP_CGROUP, i as u32));
            }
        }
    }
    None
}

/// Write end of the pipe on which a process sharing its parent's fd table says it is done
/// with the table (set in that child right after the fork; each process has its own copy).
static SYNC_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// What every process sets up for itself: rlimits, umask, cwd and the trampoline.
///
/// # Safety
/// As [`child_main`]: raw syscalls only, in the new process.
/// Returns the failed (step, index), errno set.
unsafe fn own_setup(spec: &TreeSpec, p: &ProcSpec) -> Option<(u32, u32)> {
    // SAFETY: direct syscalls on memory valid in the child's copy.
    unsafe {
        for (i, &(res, soft, hard)) in p.rlimits.iter().enumerate() {
            let lim = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(res as _, &lim) != 0 {
                return Some((STEP_RLIMIT, i as u32));
            }
        }
        libc::umask(p.umask as libc::mode_t);
        if libc::chdir(p.cwd.as_ptr()) != 0 {
            return Some((STEP_CHDIR, 0));
        }
        let len = spec.trampoline_len() as usize;
        let addr = libc::mmap(
            spec.trampoline as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        );
        if addr == libc::MAP_FAILED || addr as u64 != spec.trampoline {
            return Some((STEP_MMAP, 0));
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
            return Some((STEP_MPROTECT, 0));
        }
    }
    None
}

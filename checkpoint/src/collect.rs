//! Collecting a stopped process's state into an image `Process` record.

use crate::error::CheckpointError;
use crate::freeze::Frozen;
use crate::pidns::RootKind;
use crate::{fds, vmas};
use stasis_image::{proto, Compression};
use stasis_runtime::inject::Injector;
use stasis_runtime::procfs::{self, MapEntry};
use stasis_runtime::{memory, ptrace, sys, RuntimeError};

/// Checks, before touching the process, that it exists and is something we can handle;
/// returns where its pid namespace stands.
pub fn precheck(pid: i32) -> Result<RootKind, CheckpointError> {
    if pid <= 0 {
        return Err(CheckpointError::NoSuchProcess(pid));
    }
    let status = procfs::read_status(pid).map_err(|e| CheckpointError::from_proc(pid, e))?;
    if status.tgid != pid {
        return Err(CheckpointError::unsupported(
            pid,
            format!(
                "{pid} is a thread of process {}, not a process",
                status.tgid
            ),
        ));
    }
    if pid == std::process::id() as i32 {
        return Err(CheckpointError::unsupported(
            pid,
            "stasis cannot checkpoint itself",
        ));
    }
    if status.state == 'Z' {
        return Err(CheckpointError::unsupported(pid, "the process is a zombie"));
    }
    check_threads(pid, status.threads)?;
    let kind = crate::pidns::root_kind(pid)?;
    // The whole tree as it is now: its namespaces first, then its files (unsupported ones
    // are refused before freezing; collect() checks again while frozen).
    let members = crate::tree::members(pid);
    crate::pidns::check_tree(kind, &members)?;
    crate::pidns::check_namespaces(pid, &members)?;
    if kind != RootKind::Ours {
        crate::pidns::check_whole(pid, &members)?;
    }
    for &p in &members {
        if p != pid && procfs::read_stat(p).map_or(true, |s| s.state == 'Z') {
            continue; // gone, or a zombie (nothing open)
        }
        precheck_fds(p)?;
    }
    Ok(kind)
}

/// The files of running process `pid`, checked for kinds that cannot be checkpointed. The
/// process changes them meanwhile (an fd closed between listing and reading it, a socket
/// gone before it is looked up): only a refusal seen twice in a row counts, and any other
/// error is left to the check of the frozen process, whose state is the one that counts. A
/// listener's queue is left to it too: it may drain (see crate::tcp::Hold).
fn precheck_fds(pid: i32) -> Result<(), CheckpointError> {
    let mut refusal = None;
    for _ in 0..2 {
        match fds::collect_fds(pid, &mut crate::ghosts::Ghosts::default()) {
            Err(CheckpointError::Unsupported { what, .. })
                if what.contains(fds::WAITING_TO_BE_ACCEPTED) =>
            {
                return Ok(())
            }
            Err(e @ CheckpointError::Unsupported { .. }) => refusal = Some(e),
            _ => return Ok(()),
        }
    }
    refusal.map_or(Ok(()), Err)
}

fn check_threads(pid: i32, threads: u64) -> Result<(), CheckpointError> {
    if threads as usize > crate::freeze::MAX_THREADS {
        return Err(CheckpointError::unsupported(
            pid,
            format!(
                "it has {threads} threads; at most {} are supported",
                crate::freeze::MAX_THREADS
            ),
        ));
    }
    Ok(())
}

/// The inventory of an image taken now, of the tree whose root is recorded as `pid`
/// (`pid_namespace`: the tree is a whole pid namespace; see crate::pidns).
pub fn inventory(pid: i32, pid_namespace: bool, compression: &Compression) -> proto::Inventory {
    let (kernel_release, hostname) = sys::uname();
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    proto::Inventory {
        format_major: stasis_image::FORMAT_MAJOR as u32,
        format_minor: stasis_image::FORMAT_MINOR as u32,
        tool: format!("stasis {}", env!("CARGO_PKG_VERSION")),
        created_unix_ns: created,
        kind: proto::WorkloadKind::ProcessTree as i32,
        kernel_release,
        hostname,
        page_size: 4096,
        root_pid: pid as u32,
        compression: compression.to_string(),
        xcr0: sys::xcr0(),
        pid_namespace,
        ..Default::default()
    }
}

/// Collects everything about the stopped process except page contents. `maps`: its
/// mappings with their VmFlags, if they were read since it was stopped (see
/// [`SmapsAhead`]).
pub fn collect_process(
    frozen: &mut Frozen,
    ghosts: &mut crate::ghosts::Ghosts,
    maps: Option<Vec<MapEntry>>,
) -> Result<proto::Process, CheckpointError> {
    let pid = frozen.pid();
    let status = procfs::read_status(pid)?;
    check_threads(pid, status.threads)?;
    let stat = procfs::read_stat(pid)?;
    let maps = match maps {
        Some(m) => m,
        None => procfs::read_smaps_flags(pid)?,
    };
    let mut vmas = vmas::classify(pid, &maps, ghosts)?;
    crate::mmflags::find_guards(pid, &mut vmas)?;
    let fds = fds::collect_fds(pid, ghosts)?;

    let vdso = maps.iter().find(|m| m.name == "[vdso]");
    let (vdso_hash, syscall_ip) = match vdso {
        Some(v) => vdso_facts(pid, v)?,
        None => {
            return Err(CheckpointError::unsupported(
                pid,
                "the process has no [vdso] mapping (booted with vdso=0?)",
            ))
        }
    };

    let timers = procfs::read_timers(pid)?;
    if timers.len() > MAX_TIMERS {
        return Err(CheckpointError::unsupported(
            pid,
            format!(
                "it has {} POSIX timers; at most {MAX_TIMERS} are supported",
                timers.len()
            ),
        ));
    }
    // Whatever the injection did to the threads is put back at once, not at the end: if
    // stasis dies during the long pages phase, the process runs on as it was.
    let q = query_by_injection(frozen, syscall_ip, &status, &timers)
        .and_then(|q| crate::mmflags::query(frozen, syscall_ip).map(|m| (q, m)));
    let put_back = frozen.put_back();
    let (q, mmq) = q?;
    put_back?;
    stasis_runtime::failpoints::hit("injected-process");
    let (loginuid, audit_sessionid) = crate::mmflags::audit_ids(pid)?;
    let shared_pending = ptrace::peek_siginfo(pid, true)?;
    let mut threads = Vec::with_capacity(frozen.threads().len());
    for (i, t) in frozen.threads().iter().enumerate() {
        let tid = t.tid;
        let mut pending = ptrace::peek_siginfo(tid, false)?;
        // Signals taken out of the queue while stopping count as pending for the thread.
        pending.extend(
            frozen
                .deferred()
                .iter()
                .filter(|(d, _)| *d == tid)
                .map(|(_, s)| s.clone()),
        );
        let (robust_list, robust_list_len) = ptrace::get_robust_list(tid)?;
        let name = procfs::read_text(&format!("/proc/{pid}/task/{tid}/comm"))?;
        let per = &q.threads[i];
        let (seccomp_mode, seccomp_filters) = crate::seccomp::collect(pid, tid, t.seccomp)?;
        threads.push(proto::Thread {
            seccomp_mode,
            seccomp_filters,
            tid: tid as u32,
            regs: Some(regs_to_proto(&regs_for_image(pid, &t.regs))),
            xstate: ptrace::get_xstate(tid)?,
            sigmask: t.sigmask,
            rseq: ptrace::get_rseq(tid)?.map(|r| proto::Rseq {
                abi_pointer: r.abi_pointer,
                abi_size: r.abi_size,
                flags: r.flags,
                signature: r.signature,
            }),
            name: name.trim_end_matches('\n').to_string(),
            sigaltstack: Some(per.sigaltstack),
            pending: pending_records(pending),
            clear_child_tid: per.clear_child_tid,
            robust_list,
            robust_list_len,
        });
    }

    let rlimits = procfs::read_limits(pid)?
        .into_iter()
        .map(|l| proto::Rlimit {
            resource: l.resource,
            soft: l.soft,
            hard: l.hard,
        })
        .collect();
    let auxv = procfs::read_bytes(&format!("/proc/{pid}/auxv"))?;
    let exe_path = procfs::read_link(&format!("/proc/{pid}/exe"))?;
    if exe_path.ends_with(" (deleted)") {
        return Err(CheckpointError::unsupported(
            pid,
            format!("its executable {exe_path} was deleted"),
        ));
    }
    let cwd = procfs::read_link(&format!("/proc/{pid}/cwd"))?;
    let root = procfs::read_link(&format!("/proc/{pid}/root"))?;
    let cmdline = procfs::split_nul(&procfs::read_bytes(&format!("/proc/{pid}/cmdline"))?);
    Ok(proto::Process {
        pid: pid as u32,
        ppid: stat.ppid as u32,
        pgid: stat.pgrp as u32,
        sid: stat.session as u32,
        comm: stat.comm.clone(),
        exe_path,
        threads,
        mm: Some(proto::MmState {
            start_code: stat.start_code,
            end_code: stat.end_code,
            start_data: stat.start_data,
            end_data: stat.end_data,
            start_brk: stat.start_brk,
            brk: q.brk,
            start_stack: stat.start_stack,
            arg_start: stat.arg_start,
            arg_end: stat.arg_end,
            env_start: stat.env_start,
            env_end: stat.env_end,
            auxv,
        }),
        vmas,
        fds,
        sigactions: q.sigactions,
        rlimits,
        umask: status.umask,
        cwd,
        root,
        personality: procfs::read_personality(pid)?,
        vdso_hash: vdso_hash.to_vec(),
        creds: Some(proto::Credentials {
            uids: status.uids.clone(),
            gids: status.gids.clone(),
            groups: status.groups.clone(),
            cap_inheritable: status.cap_inh,
            cap_permitted: status.cap_prm,
            cap_effective: status.cap_eff,
            cap_bounding: status.cap_bnd,
            cap_ambient: status.cap_amb,
            securebits: q.securebits,
        }),
        cmdline,
        itimers: q.itimers,
        sched: Some(sched_state(pid, stat.nice)?),
        oom_score_adj: read_oom_score_adj(pid)?,
        no_new_privs: q.no_new_privs,
        security_recorded: vec![
            proto::SecurityState::Credentials as i32,
            proto::SecurityState::NoNewPrivs as i32,
            proto::SecurityState::Seccomp as i32,
        ],
        dumpable: q.dumpable,
        shared_pending: pending_records(shared_pending),
        posix_timers: q.posix_timers,
        stopped: frozen.was_stopped(),
        stop_signal: if frozen.was_stopped() {
            frozen.stop_signal() as u32
        } else {
            0
        },
        child_subreaper: q.child_subreaper,
        pdeathsig: q.pdeathsig,
        thp_disabled: mmq.thp_disable,
        mlockall_future: mmq.mlockall_future,
        membarrier_registrations: mmq.membarrier,
        loginuid,
        audit_sessionid,
        ..Default::default()
    })
}

/// POSIX timers whose state fits the scratch page area used to query them.
const MAX_TIMERS: usize = 384;

fn pending_records(infos: Vec<Vec<u8>>) -> Vec<proto::PendingSignal> {
    infos
        .into_iter()
        .map(|info| proto::PendingSignal {
            signo: ptrace::siginfo_signo(&info) as u32,
            siginfo: info,
        })
        .collect()
}

fn sched_state(pid: i32, nice: i64) -> Result<proto::SchedState, CheckpointError> {
    // SAFETY: sched_getscheduler takes no pointers.
    let policy = unsafe { libc::sched_getscheduler(pid) };
    if policy < 0 {
        return Err(RuntimeError::last_os("sched_getscheduler", format!("pid {pid}")).into());
    }
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: param is a valid sched_param for the kernel to fill.
    if unsafe { libc::sched_getparam(pid, &mut param) } != 0 {
        return Err(RuntimeError::last_os("sched_getparam", format!("pid {pid}")).into());
    }
    Ok(proto::SchedState {
        nice: nice as i32,
        policy: policy as u32,
        priority: param.sched_priority as u32,
    })
}

fn read_oom_score_adj(pid: i32) -> Result<i32, CheckpointError> {
    let path = format!("/proc/{pid}/oom_score_adj");
    let text = procfs::read_text(&path)?;
    text.trim().parse().map_err(|_| {
        CheckpointError::Runtime(RuntimeError::Parse {
            path,
            what: format!("not a number: {text:?}"),
        })
    })
}

/// What a thread reported about itself.
struct PerThread {
    sigaltstack: proto::SigAltStack,
    clear_child_tid: u64,
}

/// What injected syscalls reported.
struct Injected {
    sigactions: Vec<proto::SigAction>,
    brk: u64,
    /// Per thread, in Frozen::threads order.
    threads: Vec<PerThread>,
    itimers: Vec<proto::Itimer>,
    no_new_privs: bool,
    dumpable: u32,
    posix_timers: Vec<proto::PosixTimer>,
    securebits: u32,
    child_subreaper: bool,
    pdeathsig: u32,
}

/// The blake3 hash of the vDSO text and the address of a `syscall` instruction in it.
pub(crate) fn vdso_facts(pid: i32, vdso: &MapEntry) -> Result<([u8; 32], u64), CheckpointError> {
    let mut text = vec![0u8; vdso.len() as usize];
    memory::read_remote(pid, &[(vdso.start, text.len())], &mut text)?;
    let hash = *blake3::hash(&text).as_bytes();
    let at = text
        .windows(2)
        .position(|w| w == [0x0f, 0x05])
        .ok_or_else(|| CheckpointError::unsupported(pid, "no syscall instruction in its [vdso]"))?;
    Ok((hash, vdso.start + at as u64))
}

/// Signals whose actions are queried: those caught or ignored, and SIGCHLD (whose flags
/// matter even with SIG_DFL).
fn signals_to_query(status: &procfs::Status) -> Vec<u32> {
    (1..=64u32)
        .filter(|s| {
            let bit = 1u64 << (s - 1);
            *s == libc::SIGCHLD as u32 || (status.sig_cgt | status.sig_ign) & bit != 0
        })
        .collect()
}

/// Reads what only the process itself can ask the kernel by injecting syscalls: a scratch
/// page is mapped; rt_sigaction(sig, NULL, scratch) fills it; brk(0), sigaltstack,
/// getitimer and prctl report the rest; the scratch page is unmapped again, leaving the
/// address space as it was.
fn query_by_injection(
    frozen: &mut Frozen,
    syscall_ip: u64,
    status: &procfs::Status,
    timers: &[procfs::TimerInfo],
) -> Result<Injected, CheckpointError> {
    const SCRATCH_LEN: u64 = 65536;
    const TIMERS_AT: u64 = 4096;
    const SIGACTION_SIZE: u64 = 32;
    const ITIMERS_AT: u64 = 2304;
    const PRCTL_AT: u64 = 2432;
    let pid = frozen.pid();
    let mut inj = frozen.injector(pid, syscall_ip)?;
    let scratch = inj.mmap_anon("mmap(scratch)", SCRATCH_LEN)?;
    let result = (|| -> Result<_, RuntimeError> {
        let sigs = signals_to_query(status);
        for &sig in &sigs {
            let slot = scratch + (sig as u64 - 1) % 64 * SIGACTION_SIZE;
            inj.call(
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                &[sig as u64, 0, slot, 8],
            )?;
        }
        let brk = inj.call("brk(0)", libc::SYS_brk, &[0])?;
        for which in 0..3u64 {
            inj.call(
                "getitimer",
                libc::SYS_getitimer,
                &[which, scratch + ITIMERS_AT + which * 32],
            )?;
        }
        let no_new_privs = inj.call(
            "prctl(PR_GET_NO_NEW_PRIVS)",
            libc::SYS_prctl,
            &[libc::PR_GET_NO_NEW_PRIVS as u64],
        )?;
        let securebits = inj.call(
            "prctl(PR_GET_SECUREBITS)",
            libc::SYS_prctl,
            &[libc::PR_GET_SECUREBITS as u64],
        )?;
        let dumpable = inj.call(
            "prctl(PR_GET_DUMPABLE)",
            libc::SYS_prctl,
            &[libc::PR_GET_DUMPABLE as u64],
        )?;
        inj.call(
            "prctl(PR_GET_CHILD_SUBREAPER)",
            libc::SYS_prctl,
            &[libc::PR_GET_CHILD_SUBREAPER as u64, scratch + PRCTL_AT],
        )?;
        inj.call(
            "prctl(PR_GET_PDEATHSIG)",
            libc::SYS_prctl,
            &[libc::PR_GET_PDEATHSIG as u64, scratch + PRCTL_AT + 8],
        )?;
        for (i, t) in timers.iter().enumerate() {
            inj.call(
                "timer_gettime",
                libc::SYS_timer_gettime,
                &[t.id as u64, scratch + TIMERS_AT + i as u64 * 32],
            )?;
        }
        let mut raw = vec![0u8; SCRATCH_LEN as usize];
        memory::read_remote(pid, &[(scratch, raw.len())], &mut raw)?;
        let word =
            |off: usize| u64::from_ne_bytes(raw[off..off + 8].try_into().unwrap_or_default());
        let actions = sigs
            .iter()
            .map(|&sig| {
                let off = ((sig as usize - 1) % 64) * SIGACTION_SIZE as usize;
                proto::SigAction {
                    signo: sig,
                    handler: word(off),
                    flags: word(off + 8),
                    restorer: word(off + 16),
                    mask: word(off + 24),
                }
            })
            .collect();
        let usecs = |off: usize| word(off) * 1_000_000 + word(off + 8);
        let itimers = (0..3usize)
            .map(|which| {
                let off = ITIMERS_AT as usize + which * 32;
                proto::Itimer {
                    which: which as u32,
                    interval_us: usecs(off),
                    value_us: usecs(off + 16),
                }
            })
            .filter(|t| t.value_us != 0)
            .collect();
        let nsecs = |off: usize| word(off) * 1_000_000_000 + word(off + 8);
        let posix_timers = timers
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let off = TIMERS_AT as usize + i * 32;
                proto::PosixTimer {
                    id: t.id,
                    clock_id: t.clock_id,
                    notify: t.notify,
                    signo: t.signo,
                    sigval: t.sigval,
                    notify_tid: if t.notify & libc::SIGEV_THREAD_ID != 0 {
                        t.notify_pid
                    } else {
                        0
                    },
                    interval_ns: nsecs(off),
                    value_ns: nsecs(off + 16),
                }
            })
            .collect();
        Ok(Injected {
            securebits: securebits as u32,
            posix_timers,
            sigactions: actions,
            brk,
            threads: Vec::new(),
            itimers,
            no_new_privs: no_new_privs == 1,
            dumpable: dumpable as u32,
            child_subreaper: word(PRCTL_AT as usize) as u32 != 0,
            pdeathsig: word(PRCTL_AT as usize + 8) as u32,
        })
    })();
    let per_thread = match &result {
        Ok(_) => query_threads(frozen, &mut inj, syscall_ip, scratch),
        Err(_) => Ok(Vec::new()),
    };
    frozen.defer_signals(pid, inj.take_deferred());
    let requeued = match (&result, &per_thread) {
        (Ok(_), Ok(_)) => frozen.requeue_deferred(pid, &mut inj, scratch + SIGINFO_SLOT),
        _ => Ok(()),
    };
    let unmap = inj.call("munmap(scratch)", libc::SYS_munmap, &[scratch, SCRATCH_LEN]);
    frozen.defer_signals(pid, inj.take_deferred());
    let mut out = result?;
    out.threads = per_thread?;
    requeued?;
    unmap?;
    Ok(out)
}

/// Where in the scratch area a suppressed signal's siginfo is put to be queued again (past
/// the per-thread area of query_threads, 16 KiB + MAX_THREADS * 32).
const SIGINFO_SLOT: u64 = 65536 - 128;

/// Asks every thread for what only it can tell (its sigaltstack and clear-child-tid
/// address), each through an injector of its own, into the scratch area at 16 KiB.
fn query_threads(
    frozen: &mut Frozen,
    main: &mut Injector,
    syscall_ip: u64,
    scratch: u64,
) -> Result<Vec<PerThread>, CheckpointError> {
    const PER_AT: u64 = 16384;
    const PER_SIZE: u64 = 32;
    let pid = frozen.pid();
    let tids: Vec<i32> = frozen.threads().iter().map(|t| t.tid).collect();
    let ask = |inj: &mut Injector, slot: u64| -> Result<(), RuntimeError> {
        inj.call("sigaltstack", libc::SYS_sigaltstack, &[0, slot])?;
        inj.call(
            "prctl(PR_GET_TID_ADDRESS)",
            libc::SYS_prctl,
            &[libc::PR_GET_TID_ADDRESS as u64, slot + 24],
        )?;
        Ok(())
    };
    for (i, &tid) in tids.iter().enumerate() {
        let slot = scratch + PER_AT + i as u64 * PER_SIZE;
        if tid == pid {
            ask(main, slot)?;
        } else {
            let mut inj = frozen.injector(tid, syscall_ip)?;
            let r = ask(&mut inj, slot);
            frozen.defer_signals(tid, inj.take_deferred());
            r?;
            frozen.requeue_deferred(tid, &mut inj, scratch + SIGINFO_SLOT)?;
            frozen.defer_signals(tid, inj.take_deferred());
        }
    }
    let mut raw = vec![0u8; tids.len() * PER_SIZE as usize];
    memory::read_remote(pid, &[(scratch + PER_AT, raw.len())], &mut raw)?;
    Ok(raw
        .chunks_exact(PER_SIZE as usize)
        .map(|c| {
            let w = |o: usize| u64::from_ne_bytes(c[o..o + 8].try_into().unwrap_or_default());
            PerThread {
                sigaltstack: proto::SigAltStack {
                    sp: w(0),
                    flags: w(8) as u32,
                    size: w(16),
                },
                clear_child_tid: w(24),
            }
        })
        .collect())
}

/// Registers as a new task can resume them. A thread caught on the edge of
/// `restart_syscall` (rax = its number, at a `syscall` instruction, not inside a syscall)
/// depends on a restart block only this task has; in the image, the interrupted call
/// returns EINTR instead, as CRIU does.
fn regs_for_image(pid: i32, r: &ptrace::Regs) -> ptrace::Regs {
    let mut out = *r;
    if r.orig_rax as i64 == -1 && r.rax == libc::SYS_restart_syscall as u64 {
        let mut insn = [0u8; 2];
        if memory::read_remote(pid, &[(r.rip, 2)], &mut insn).is_ok() && insn == [0x0f, 0x05] {
            out.rax = (-libc::EINTR) as u64;
            out.rip += 2;
        }
    }
    out
}

pub(crate) fn regs_to_proto(r: &ptrace::Regs) -> proto::X86Regs {
    proto::X86Regs {
        r15: r.r15,
        r14: r.r14,
        r13: r.r13,
        r12: r.r12,
        rbp: r.rbp,
        rbx: r.rbx,
        r11: r.r11,
        r10: r.r10,
        r9: r.r9,
        r8: r.r8,
        rax: r.rax,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        orig_rax: r.orig_rax,
        rip: r.rip,
        cs: r.cs,
        eflags: r.eflags,
        rsp: r.rsp,
        ss: r.ss,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
        ds: r.ds,
        es: r.es,
        fs: r.fs,
        gs: r.gs,
    }
}

/// The mappings of a frozen tree's processes with their VmFlags, read on a few threads of
/// their own from the moment the tree is stopped: /proc/PID/smaps walks every page table of
/// a process (~25 ms for 1 GiB), and meanwhile a migration sends its last round.
pub struct SmapsAhead(Vec<ReadAhead>);

type ReadAhead = std::thread::JoinHandle<Vec<(i32, Result<Vec<MapEntry>, RuntimeError>)>>;

/// Threads reading ahead.
const SMAPS_THREADS: usize = 4;

impl SmapsAhead {
    /// Starts reading the mappings of `pids` (stopped: they cannot change them).
    pub fn start(pids: &[i32]) -> SmapsAhead {
        let n = pids.len().clamp(1, SMAPS_THREADS);
        SmapsAhead(
            (0..n)
                .map(|i| {
                    let mine: Vec<i32> = pids.iter().copied().skip(i).step_by(n).collect();
                    std::thread::spawn(move || {
                        mine.into_iter()
                            .map(|pid| (pid, procfs::read_smaps_flags(pid)))
                            .collect()
                    })
                })
                .collect(),
        )
    }

    /// Everything read, by PID (what failed is left out: read again). Waits for the
    /// readers, so nothing reads a process's mappings once injection into the tree begins.
    pub fn finish(self) -> std::collections::BTreeMap<i32, Vec<MapEntry>> {
        self.0
            .into_iter()
            .filter_map(|h| h.join().ok())
            .flatten()
            .filter_map(|(pid, r)| Some((pid, r.ok()?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rax: u64, orig: i64, rip: u64) -> ptrace::Regs {
        // SAFETY: user_regs_struct is plain old data.
        let mut r: ptrace::Regs = unsafe { std::mem::zeroed() };
        r.rax = rax;
        r.orig_rax = orig as u64;
        r.rip = rip;
        r
    }

    #[test]
    fn restart_syscall_edge_becomes_eintr_in_the_image() {
        static SYSCALL: [u8; 2] = [0x0f, 0x05];
        let pid = std::process::id() as i32;
        let at = SYSCALL.as_ptr() as u64;
        let r = regs_for_image(pid, &regs(libc::SYS_restart_syscall as u64, -1, at));
        assert_eq!((r.rax as i64, r.rip), (-(libc::EINTR as i64), at + 2));
        // Inside a syscall, or elsewhere: unchanged.
        let r = regs_for_image(pid, &regs(libc::SYS_restart_syscall as u64, 35, at));
        assert_eq!(r.rip, at);
        static OTHER: [u8; 2] = [0x90, 0x90];
        let r = regs_for_image(
            pid,
            &regs(libc::SYS_restart_syscall as u64, -1, OTHER.as_ptr() as u64),
        );
        assert_eq!(r.rax, libc::SYS_restart_syscall as u64);
    }
}

//! Collecting a stopped process's state into an image `Process` record.

use crate::error::CheckpointError;
use crate::freeze::Frozen;
use crate::{fds, vmas};
use stasis_image::{proto, Compression};
use stasis_runtime::procfs::{self, MapEntry};
use stasis_runtime::{memory, ptrace, sys, RuntimeError};

/// Checks, before touching the process, that it exists and is something we can handle.
pub fn precheck(pid: i32) -> Result<(), CheckpointError> {
    if pid <= 0 {
        return Err(CheckpointError::NoSuchProcess(pid));
    }
    let status = procfs::read_status(pid).map_err(|_| CheckpointError::NoSuchProcess(pid))?;
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
    // Refuse unsupported files before freezing; collect() checks again while frozen.
    fds::collect_fds(pid)?;
    Ok(())
}

fn check_threads(pid: i32, threads: u64) -> Result<(), CheckpointError> {
    if threads != 1 {
        return Err(CheckpointError::unsupported(
            pid,
            format!("it has {threads} threads; multithreaded processes are not supported yet"),
        ));
    }
    Ok(())
}

/// The inventory of an image taken now.
pub fn inventory(pid: i32, compression: &Compression) -> proto::Inventory {
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
        ..Default::default()
    }
}

/// Collects everything about the stopped process except page contents.
pub fn collect_process(frozen: &mut Frozen) -> Result<proto::Process, CheckpointError> {
    let pid = frozen.pid();
    let status = procfs::read_status(pid)?;
    check_threads(pid, status.threads)?;
    let stat = procfs::read_stat(pid)?;
    let maps = procfs::read_smaps_flags(pid)?;
    let vmas = vmas::classify(pid, &maps)?;
    let fds = fds::collect_fds(pid)?;

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

    let regs = *frozen.regs();
    let sigmask = frozen.sigmask();
    let xstate = ptrace::get_xstate(pid)?;
    let rseq = ptrace::get_rseq(pid)?;
    let (sigactions, brk) = query_by_injection(frozen, syscall_ip, &status)?;

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
    let thread = proto::Thread {
        tid: pid as u32,
        regs: Some(regs_to_proto(&regs)),
        xstate,
        sigmask,
        rseq: rseq.map(|r| proto::Rseq {
            abi_pointer: r.abi_pointer,
            abi_size: r.abi_size,
            flags: r.flags,
            signature: r.signature,
        }),
        name: stat.comm.clone(),
    };
    Ok(proto::Process {
        pid: pid as u32,
        ppid: stat.ppid as u32,
        pgid: stat.pgrp as u32,
        sid: stat.session as u32,
        comm: stat.comm.clone(),
        exe_path,
        threads: vec![thread],
        mm: Some(proto::MmState {
            start_code: stat.start_code,
            end_code: stat.end_code,
            start_data: stat.start_data,
            end_data: stat.end_data,
            start_brk: stat.start_brk,
            brk,
            start_stack: stat.start_stack,
            arg_start: stat.arg_start,
            arg_end: stat.arg_end,
            env_start: stat.env_start,
            env_end: stat.env_end,
            auxv,
        }),
        vmas,
        fds,
        sigactions,
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
        }),
        cmdline,
    })
}

/// The blake3 hash of the vDSO text and the address of a `syscall` instruction in it.
fn vdso_facts(pid: i32, vdso: &MapEntry) -> Result<([u8; 32], u64), CheckpointError> {
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

/// Reads sigactions and the program break by injecting syscalls: a scratch page is mapped,
/// rt_sigaction(sig, NULL, scratch) fills it, brk(0) reports the break, and the scratch
/// page is unmapped again, leaving the address space as it was.
fn query_by_injection(
    frozen: &mut Frozen,
    syscall_ip: u64,
    status: &procfs::Status,
) -> Result<(Vec<proto::SigAction>, u64), CheckpointError> {
    const SIGACTION_SIZE: u64 = 32;
    let pid = frozen.pid();
    let mut inj = frozen.injector(syscall_ip)?;
    let scratch = inj.call(
        "mmap(scratch)",
        libc::SYS_mmap,
        &[
            0,
            4096,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
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
        let mut raw = vec![0u8; 4096];
        memory::read_remote(pid, &[(scratch, 4096)], &mut raw)?;
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
        Ok((actions, brk))
    })();
    let unmap = inj.call("munmap(scratch)", libc::SYS_munmap, &[scratch, 4096]);
    frozen.defer_signals(inj.take_deferred());
    let out = result?;
    unmap?;
    Ok(out)
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

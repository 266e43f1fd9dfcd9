//! seccomp filters and strict mode of restored threads.
//!
//! Validated with the rest of the image, before anything is created: a malformed filter is
//! an image error. Installed in each thread by injected seccomp(SECCOMP_SET_MODE_FILTER)
//! calls in their original order (oldest first), while the restorer still holds the
//! credentials to do so; every thread is set PTRACE_O_SUSPEND_SECCOMP first, so what is
//! injected afterwards (credentials, the final munmap) never meets the filters. The
//! kernel lifts the suspension when the restorer detaches. Threads whose filter chains are
//! all the same get them through one thread with SECCOMP_FILTER_FLAG_TSYNC, so they share
//! them as the originals did (a later TSYNC of the workload's own then still works).

use crate::error::RestoreError;
use stasis_image::proto;
use stasis_runtime::inject::Injector;
use stasis_runtime::seccomp::{self, BPF_MAXINSNS, INSN_SIZE, MAX_FILTERS};
use stasis_runtime::{memory, ptrace, RuntimeError};

const SECCOMP_SET_MODE_FILTER: u64 = 1;
const SECCOMP_FILTER_FLAG_TSYNC: u64 = 1;
/// The kernel's bound on the instructions of all filters of a thread (each filter counts
/// 4 more): MAX_INSNS_PER_PATH.
const MAX_INSNS_PER_PATH: usize = 32768;

/// Checks the seccomp state of every thread of `p`.
pub fn validate(p: &proto::Process) -> Result<(), RestoreError> {
    let invalid = |tid: u32, what: String| {
        RestoreError::Invalid(format!("process {}: thread {tid}: seccomp: {what}", p.pid))
    };
    for t in &p.threads {
        match (t.seccomp_mode, t.seccomp_filters.is_empty()) {
            (0 | seccomp::MODE_STRICT, true) | (seccomp::MODE_FILTER, false) => {}
            (mode, _) => {
                return Err(invalid(
                    t.tid,
                    format!(
                        "mode {mode} with {} filters (mode 2 needs filters, modes 0 and 1 none)",
                        t.seccomp_filters.len()
                    ),
                ))
            }
        }
        if t.seccomp_filters.len() > MAX_FILTERS {
            return Err(invalid(
                t.tid,
                format!("{} filters; at most {MAX_FILTERS}", t.seccomp_filters.len()),
            ));
        }
        let mut path = 0;
        for (i, f) in t.seccomp_filters.iter().enumerate() {
            let n = f.insns.len() / INSN_SIZE;
            if f.insns.len() % INSN_SIZE != 0 || n == 0 || n > BPF_MAXINSNS {
                return Err(invalid(
                    t.tid,
                    format!(
                        "filter {i} is {} bytes: not 1..={BPF_MAXINSNS} instructions of \
                         {INSN_SIZE} bytes",
                        f.insns.len()
                    ),
                ));
            }
            if f.flags & !seccomp::SECCOMP_FILTER_FLAG_LOG != 0 {
                return Err(invalid(
                    t.tid,
                    format!("filter {i} has unknown flags {:#x}", f.flags),
                ));
            }
            path += n + 4;
        }
        if path > MAX_INSNS_PER_PATH {
            return Err(invalid(
                t.tid,
                format!(
                    "its filters have {path} instructions in all; at most {MAX_INSNS_PER_PATH}"
                ),
            ));
        }
    }
    Ok(())
}

/// Whether any thread of `p` has a seccomp mode to restore.
pub fn any(p: &proto::Process) -> bool {
    p.threads.iter().any(|t| t.seccomp_mode != 0)
}

/// Installs the seccomp state of every thread of `p`: `injectors` are the threads' own, in
/// image order (main first), each in a syscall stop; `options` are the ptrace options the
/// restorer set, to which PTRACE_O_SUSPEND_SECCOMP is added.
pub fn install(
    p: &proto::Process,
    injectors: &mut [&mut Injector],
    options: libc::c_int,
) -> Result<(), RuntimeError> {
    if !any(p) {
        return Ok(());
    }
    for inj in injectors.iter() {
        ptrace::set_options(inj.pid(), options | seccomp::PTRACE_O_SUSPEND_SECCOMP)?;
    }
    let first = &p.threads[0];
    let shared = p.threads.len() > 1
        && first.seccomp_mode == seccomp::MODE_FILTER
        && p.threads.iter().all(|t| {
            t.seccomp_mode == first.seccomp_mode && t.seccomp_filters == first.seccomp_filters
        });
    for (i, t) in p.threads.iter().enumerate() {
        let Some(inj) = injectors.get_mut(i) else {
            break;
        };
        if shared && i > 0 {
            break; // synchronised from the main thread
        }
        match t.seccomp_mode {
            seccomp::MODE_FILTER => {
                let extra = if shared { SECCOMP_FILTER_FLAG_TSYNC } else { 0 };
                for f in &t.seccomp_filters {
                    install_filter(inj, f, extra)?;
                }
            }
            seccomp::MODE_STRICT => {
                inj.call(
                    "prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT)",
                    libc::SYS_prctl,
                    &[libc::PR_SET_SECCOMP as u64, seccomp::MODE_STRICT as u64],
                )?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// One filter into the thread of `inj`, through a page mapped for it and unmapped again.
fn install_filter(
    inj: &mut Injector,
    f: &proto::SeccompFilter,
    extra_flags: u64,
) -> Result<(), RuntimeError> {
    let len = (16 + f.insns.len()).next_multiple_of(4096) as u64;
    let at = inj.mmap_anon("mmap(seccomp filter)", len)?;
    // struct sock_fprog { unsigned short len; struct sock_filter *filter; }, then the program.
    let mut buf = Vec::with_capacity(16 + f.insns.len());
    buf.extend_from_slice(&((f.insns.len() / INSN_SIZE) as u64).to_ne_bytes());
    buf.extend_from_slice(&(at + 16).to_ne_bytes());
    buf.extend_from_slice(&f.insns);
    let r = memory::write_remote(inj.pid(), &[(at, buf.len())], &buf).and_then(|()| {
        inj.call(
            "seccomp(SECCOMP_SET_MODE_FILTER)",
            libc::SYS_seccomp,
            &[SECCOMP_SET_MODE_FILTER, f.flags | extra_flags, at],
        )
    });
    let unmapped = inj.call("munmap(seccomp filter)", libc::SYS_munmap, &[at, len]);
    let rc = r?;
    unmapped?;
    if extra_flags & SECCOMP_FILTER_FLAG_TSYNC != 0 && rc != 0 {
        return Err(RuntimeError::Protocol {
            op: "seccomp(SECCOMP_FILTER_FLAG_TSYNC)",
            pid: inj.pid(),
            what: format!("thread {rc} could not be synchronised"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(mode: u32, filters: Vec<proto::SeccompFilter>) -> proto::Process {
        proto::Process {
            pid: 7,
            threads: vec![proto::Thread {
                tid: 7,
                seccomp_mode: mode,
                seccomp_filters: filters,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn filter(insns: usize, flags: u64) -> proto::SeccompFilter {
        proto::SeccompFilter {
            insns: vec![0; insns * INSN_SIZE],
            flags,
        }
    }

    #[test]
    fn accepts_what_a_checkpoint_writes() {
        assert!(validate(&process(0, vec![])).is_ok());
        assert!(validate(&process(1, vec![])).is_ok());
        let log = seccomp::SECCOMP_FILTER_FLAG_LOG;
        assert!(validate(&process(2, vec![filter(4, 0), filter(BPF_MAXINSNS, log)])).is_ok());
    }

    #[test]
    fn refuses_malformed_filters() {
        let bad = [
            process(2, vec![]),
            process(0, vec![filter(4, 0)]),
            process(1, vec![filter(4, 0)]),
            process(3, vec![]),
            process(2, vec![filter(0, 0)]),
            process(2, vec![filter(BPF_MAXINSNS + 1, 0)]),
            process(2, vec![filter(4, 1)]),
            process(
                2,
                vec![proto::SeccompFilter {
                    insns: vec![0; 12],
                    flags: 0,
                }],
            ),
            process(2, (0..MAX_FILTERS + 1).map(|_| filter(1, 0)).collect()),
            process(2, (0..9).map(|_| filter(BPF_MAXINSNS, 0)).collect()),
        ];
        for p in &bad {
            assert!(
                matches!(validate(p), Err(RestoreError::Invalid(_))),
                "accepted {:?}",
                p.threads[0].seccomp_mode
            );
        }
    }
}

//! What the new process sets up itself, and where the trampoline goes.

use crate::error::RestoreError;
use crate::Options;
use stasis_image::proto::{self, FdKind};
use stasis_runtime::procfs;
use stasis_runtime::spawn::{ChildPlan, FdPlan, FdSource};
use std::ffi::CString;

/// File status flags F_SETFL can change.
const SETFL_MASK: u32 =
    (libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT | libc::O_NOATIME) as u32;

/// Scratch memory after the trampoline's code page.
pub const SCRATCH_LEN: u64 = 64 * 1024;

/// Builds the child's plan: limits, umask, cwd, fds and a trampoline address that is free
/// both in the target's layout and in ours (the child starts as a copy of us).
pub fn plan(
    p: &proto::Process,
    opts: &Options,
    ghosts: &crate::ghosts::Recreated,
) -> Result<ChildPlan, RestoreError> {
    let cstr = |s: &str, what: &str| {
        CString::new(s)
            .map_err(|_| RestoreError::Invalid(format!("{what} {s:?} contains a NUL byte")))
    };
    let ours = procfs::read_limits(std::process::id() as i32)?;
    let mut rlimits = Vec::new();
    for l in &p.rlimits {
        if let Some(o) = ours.iter().find(|o| o.resource == l.resource) {
            if l.hard > o.hard {
                return Err(RestoreError::Unsupported(format!(
                    "process {}: resource limit {} has hard limit {} but stasis runs with {} \
                     (raising it needs CAP_SYS_RESOURCE)",
                    p.pid,
                    l.resource,
                    fmt_limit(l.hard),
                    fmt_limit(o.hard)
                )));
            }
        }
        if l.soft > l.hard {
            return Err(RestoreError::Invalid(format!(
                "process {}: resource limit {} soft {} > hard {}",
                p.pid, l.resource, l.soft, l.hard
            )));
        }
        rlimits.push((l.resource, l.soft, l.hard));
    }
    let mut fds = Vec::new();
    for f in &p.fds {
        let cloexec = f.flags & libc::O_CLOEXEC as u32 != 0;
        let source = match f.kind() {
            FdKind::Regular if f.ghost_id != 0 => FdSource::Open {
                path: cstr(&ghosts.path_for(f.ghost_id)?, "ghost file path")?,
                flags: (f.flags & !(libc::O_CLOEXEC as u32)) as i32,
                offset: f.offset,
            },
            FdKind::Regular | FdKind::CharDevice => FdSource::Open {
                path: cstr(&f.path, "file path")?,
                flags: (f.flags & !(libc::O_CLOEXEC as u32)) as i32,
                offset: f.offset,
            },
            FdKind::Inherited => {
                let from = opts.inherit_fds.get(&f.fd).copied().unwrap_or(f.fd as i32);
                // SAFETY: fcntl(F_GETFD) on any integer only inspects our fd table.
                if unsafe { libc::fcntl(from, libc::F_GETFD) } < 0 {
                    return Err(RestoreError::Unsupported(format!(
                        "process {}: fd {} was {} and should be inherited from stasis's fd {from}, \
                         which is not open",
                        p.pid, f.fd, f.inherited_from
                    )));
                }
                FdSource::Inherit(from, (f.flags & SETFL_MASK) as i32)
            }
            FdKind::Unspecified => {
                return Err(RestoreError::Invalid(format!(
                    "process {}: fd {} has no kind",
                    p.pid, f.fd
                )))
            }
        };
        if f.fd > 1 << 20 {
            return Err(RestoreError::Invalid(format!(
                "process {}: fd number {} is implausible",
                p.pid, f.fd
            )));
        }
        fds.push(FdPlan {
            target: f.fd as i32,
            source,
            cloexec,
        });
    }
    if fds.len() > 4096 {
        return Err(RestoreError::Unsupported(format!(
            "process {} has {} fds; at most 4096 are supported yet",
            p.pid,
            fds.len()
        )));
    }
    let len = stasis_runtime::PAGE_SIZE + SCRATCH_LEN;
    let trampoline = find_trampoline(p, len)?;
    Ok(ChildPlan {
        rlimits,
        umask: p.umask,
        cwd: cstr(&p.cwd, "working directory")?,
        fds,
        trampoline,
        scratch_len: SCRATCH_LEN,
    })
}

fn fmt_limit(v: u64) -> String {
    if v == u64::MAX {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// A `len`-byte range free in the target's mappings and in ours, preferring low addresses
/// above 4 GiB (away from both the executable and the mmap area).
fn find_trampoline(p: &proto::Process, len: u64) -> Result<u64, RestoreError> {
    let mut busy: Vec<(u64, u64)> = p.vmas.iter().map(|v| (v.start, v.end)).collect();
    for m in procfs::read_maps(std::process::id() as i32)? {
        busy.push((m.start, m.end));
    }
    busy.sort_unstable();
    let guard = 1 << 20; // keep clear of neighbours (stack guard gaps)
    let mut candidate: u64 = 1 << 32;
    for &(s, e) in &busy {
        if e + guard <= candidate {
            continue;
        }
        if s >= candidate + len + guard {
            break;
        }
        candidate = (e + guard + 0xffff) & !0xffff;
    }
    if candidate + len > crate::validate::TASK_SIZE {
        return Err(RestoreError::Unsupported(
            "no free address range for the restore trampoline".into(),
        ));
    }
    Ok(candidate)
}

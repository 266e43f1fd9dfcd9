//! Memory state beyond page contents, put back by injected syscalls: flags a mapping is made
//! with (MAP_DROPPABLE, MAP_NORESERVE), madvise flags, and, once the contents are written
//! and the protections final, guard pages, mlock, mseal, mlockall(MCL_FUTURE),
//! PR_SET_THP_DISABLE and membarrier registrations.

use crate::error::RestoreError;
use stasis_image::proto::{self, VmaKind};
use stasis_runtime::memory::MADV_GUARD_INSTALL;
use stasis_runtime::PAGE_SIZE;

/// VmFlags codes set again by madvise right after the mapping is made.
const ADVICE: [(&str, i32); 8] = [
    ("dd", libc::MADV_DONTDUMP),
    ("dc", libc::MADV_DONTFORK),
    ("wf", libc::MADV_WIPEONFORK),
    ("hg", libc::MADV_HUGEPAGE),
    ("nh", libc::MADV_NOHUGEPAGE),
    ("sr", libc::MADV_SEQUENTIAL),
    ("rr", libc::MADV_RANDOM),
    ("mg", libc::MADV_MERGEABLE),
];

/// mmap's MAP_DROPPABLE (6.11+): private anonymous memory the kernel may drop under
/// pressure (VmFlags `dp`; it implies `wf`, `dd` and `nr`).
const MAP_DROPPABLE: u64 = 0x08;
const MLOCK_ONFAULT: u64 = 1;
/// mseal(2) (6.10+; VmFlags `sl`).
const SYS_MSEAL: libc::c_long = 462;
const MCL_FUTURE: u32 = 2;
const MCL_ONFAULT: u32 = 4;
/// membarrier(2) REGISTER_* commands, each re-made when the image lists it.
const MEMBARRIER_REGISTER: [u32; 4] = [1 << 2, 1 << 4, 1 << 6, 1 << 8];

/// A syscall injected into the process being built: (name, number, arguments) → result.
pub type Call<'a> = dyn FnMut(&'static str, libc::c_long, &[u64]) -> Result<u64, RestoreError> + 'a;

fn has(v: &proto::Vma, code: &str) -> bool {
    v.vm_flags.iter().any(|f| f == code)
}

fn special(v: &proto::Vma) -> bool {
    matches!(
        v.kind(),
        VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall
    )
}

/// The mmap flags of a private anonymous mapping (without MAP_FIXED_NOREPLACE).
pub fn anon_private_flags(v: &proto::Vma) -> u64 {
    let mut flags = if has(v, "dp") {
        MAP_DROPPABLE
    } else {
        libc::MAP_PRIVATE as u64
    };
    flags |= libc::MAP_ANONYMOUS as u64;
    if has(v, "gd") {
        flags |= libc::MAP_GROWSDOWN as u64;
    }
    if has(v, "nr") {
        flags |= libc::MAP_NORESERVE as u64;
    }
    flags
}

/// The open(2) access mode of the file behind a shared file mapping: the kernel allows
/// mprotect(PROT_WRITE) later (VmFlags `mw`, VM_MAYWRITE) only if the file was opened for
/// writing, so it is opened so again (a private mapping may always become writable).
pub fn shared_file_access(v: &proto::Vma) -> i32 {
    if has(v, "mw") || v.prot & libc::PROT_WRITE as u32 != 0 {
        libc::O_RDWR
    } else {
        libc::O_RDONLY
    }
}

/// madvise flags of `v`, right after it is mapped.
pub fn advise(v: &proto::Vma, call: &mut Call) -> Result<(), RestoreError> {
    if special(v) {
        return Ok(());
    }
    let len = v.end - v.start;
    for (code, advice) in ADVICE {
        if has(v, code) {
            call("madvise", libc::SYS_madvise, &[v.start, len, advice as u64])?;
        }
    }
    Ok(())
}

/// After the contents and final protections: guard pages (before mlock, which they refuse),
/// locked mappings, then the process-wide state.
pub fn after_contents(p: &proto::Process, call: &mut Call) -> Result<(), RestoreError> {
    for v in p.vmas.iter().filter(|v| !special(v)) {
        for g in &v.guards {
            let end = g
                .pages
                .checked_mul(PAGE_SIZE)
                .and_then(|l| g.start.checked_add(l));
            if g.start < v.start || end.is_none_or(|e| e > v.end) {
                return Err(RestoreError::Invalid(format!(
                    "process {}: guard pages at {:#x} lie outside mapping {:#x}-{:#x}",
                    p.pid, g.start, v.start, v.end
                )));
            }
            call(
                "madvise(MADV_GUARD_INSTALL)",
                libc::SYS_madvise,
                &[g.start, g.pages * PAGE_SIZE, MADV_GUARD_INSTALL as u64],
            )?;
        }
    }
    for v in p.vmas.iter().filter(|v| !special(v) && has(v, "lo")) {
        let len = v.end - v.start;
        if has(v, "lf") {
            call(
                "mlock2(MLOCK_ONFAULT)",
                libc::SYS_mlock2,
                &[v.start, len, MLOCK_ONFAULT],
            )?;
        } else {
            call("mlock", libc::SYS_mlock, &[v.start, len])?;
        }
    }
    // Sealed last among the mappings: nothing may change them afterwards.
    for v in p.vmas.iter().filter(|v| !special(v) && has(v, "sl")) {
        call("mseal", SYS_MSEAL, &[v.start, v.end - v.start, 0])?;
    }
    if p.thp_disabled != 0 {
        call(
            "prctl(PR_SET_THP_DISABLE)",
            libc::SYS_prctl,
            &[
                libc::PR_SET_THP_DISABLE as u64,
                1,
                u64::from(p.thp_disabled & 2),
            ],
        )?;
    }
    for cmd in MEMBARRIER_REGISTER {
        if p.membarrier_registrations & cmd != 0 {
            call(
                "membarrier(REGISTER)",
                libc::SYS_membarrier,
                &[u64::from(cmd), 0, 0],
            )?;
        }
    }
    Ok(())
}

/// mlockall(MCL_FUTURE) last: every mapping made after it (the restorer makes none) is
/// locked.
pub fn lock_future(p: &proto::Process, call: &mut Call) -> Result<(), RestoreError> {
    if p.mlockall_future & MCL_FUTURE != 0 {
        call(
            "mlockall(MCL_FUTURE)",
            libc::SYS_mlockall,
            &[u64::from(p.mlockall_future & (MCL_FUTURE | MCL_ONFAULT))],
        )?;
    }
    Ok(())
}

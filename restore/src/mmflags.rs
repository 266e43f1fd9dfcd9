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

/// Checks, before anything is created, what this module will apply: guard pages inside
/// their page-aligned mappings, and only known bits in the process-wide fields.
pub fn validate(p: &proto::Process) -> Result<(), RestoreError> {
    let invalid = |what: String| Err(RestoreError::Invalid(format!("process {}: {what}", p.pid)));
    for v in &p.vmas {
        for g in &v.guards {
            let end = g
                .pages
                .checked_mul(PAGE_SIZE)
                .and_then(|l| g.start.checked_add(l));
            if g.start < v.start
                || !g.start.is_multiple_of(PAGE_SIZE)
                || end.is_none_or(|e| e > v.end)
            {
                return invalid(format!(
                    "guard pages at {:#x} lie outside mapping {:#x}-{:#x}",
                    g.start, v.start, v.end
                ));
            }
        }
    }
    let known_membarrier: u32 = MEMBARRIER_REGISTER.iter().sum();
    if p.membarrier_registrations & !known_membarrier != 0 {
        return invalid(format!(
            "unknown membarrier registrations {:#x}",
            p.membarrier_registrations
        ));
    }
    if p.mlockall_future & !(MCL_FUTURE | MCL_ONFAULT) != 0 || p.thp_disabled > 3 {
        return invalid(format!(
            "unknown mlockall flags {:#x} or THP setting {}",
            p.mlockall_future, p.thp_disabled
        ));
    }
    let stop = p.stop_signal as i32;
    if p.stop_signal != 0
        && !matches!(
            stop,
            libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
        )
    {
        return invalid(format!("{} is not a stop signal", p.stop_signal));
    }
    Ok(())
}

/// After the contents and final protections: guard pages (before mlock, which they refuse),
/// locked mappings, then the process-wide state.
pub fn after_contents(p: &proto::Process, call: &mut Call) -> Result<(), RestoreError> {
    for v in p.vmas.iter().filter(|v| !special(v)) {
        for g in &v.guards {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(flags: &[&str]) -> proto::Vma {
        proto::Vma {
            start: 0x10000,
            end: 0x14000,
            kind: VmaKind::AnonPrivate as i32,
            vm_flags: flags.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn mapping_flags_follow_vmflags() {
        let private = libc::MAP_PRIVATE as u64 | libc::MAP_ANONYMOUS as u64;
        assert_eq!(anon_private_flags(&vma(&["rd", "wr"])), private);
        let dp = anon_private_flags(&vma(&["wf", "dd", "nr", "dp"]));
        assert_eq!(dp & 0x0f, MAP_DROPPABLE);
        assert_ne!(dp & libc::MAP_NORESERVE as u64, 0);
        let shared_ro = proto::Vma {
            prot: libc::PROT_READ as u32,
            ..vma(&["rd", "mr", "sh"])
        };
        assert_eq!(shared_file_access(&shared_ro), libc::O_RDONLY);
        let may_write = proto::Vma {
            prot: libc::PROT_READ as u32,
            ..vma(&["rd", "mr", "mw", "sh"])
        };
        assert_eq!(shared_file_access(&may_write), libc::O_RDWR);
    }

    #[test]
    fn validation_rejects_stray_guards_and_unknown_bits() {
        let mut p = proto::Process {
            pid: 9,
            vmas: vec![vma(&[])],
            ..Default::default()
        };
        assert!(validate(&p).is_ok());
        p.vmas[0].guards = vec![proto::PageRange {
            start: 0x13000,
            pages: 2,
        }];
        assert!(validate(&p).is_err());
        p.vmas[0].guards[0].pages = 1;
        assert!(validate(&p).is_ok());
        p.stop_signal = libc::SIGKILL as u32;
        assert!(validate(&p).is_err());
        p.stop_signal = libc::SIGTSTP as u32;
        p.membarrier_registrations = 1;
        assert!(validate(&p).is_err());
    }
}

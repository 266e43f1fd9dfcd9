//! Classifying a process's mappings into image VMAs (and refusing the ones we cannot keep).

use crate::error::CheckpointError;
use crate::ghosts::{is_ghost_link, Ghosts};
use stasis_image::proto::{self, VmaKind};
use stasis_runtime::procfs::{self, MapEntry};
use std::os::unix::fs::MetadataExt;

/// VmFlags codes restore re-applies (mmap flags, madvise, mlock, mseal, the access mode of
/// a shared file); others are informational.
pub const KEPT_FLAGS: [&str; 15] = [
    "gd", "dd", "dc", "wf", "hg", "nh", "sr", "rr", "mg", "nr", "dp", "lo", "lf", "sl", "mw",
];

/// Classifies every mapping; an unsupported one is an error naming it.
pub fn classify(
    pid: i32,
    maps: &[MapEntry],
    ghosts: &mut Ghosts,
) -> Result<Vec<proto::Vma>, CheckpointError> {
    let root = crate::fds::process_root(pid)?;
    maps.iter()
        .map(|m| classify_one((pid, &root), m, ghosts))
        .collect()
}

/// Classifies mapping `m` of process `pid`, whose root directory is `root`.
fn classify_one(
    (pid, root): (i32, &str),
    m: &MapEntry,
    ghosts: &mut Ghosts,
) -> Result<proto::Vma, CheckpointError> {
    let mut ghost_id = 0;
    let unsupported = |why: &str| {
        CheckpointError::unsupported(
            pid,
            format!("mapping {:#x}-{:#x} {:?}: {why}", m.start, m.end, m.name),
        )
    };
    if m.has_flag("ss") {
        return Err(unsupported(
            "a shadow stack (x86 CET user shadow stack) cannot be restored",
        ));
    }
    if m.has_flag("ht") {
        return Err(unsupported("hugetlb memory cannot be restored"));
    }
    let (kind, file) = match m.name.as_str() {
        "[vdso]" => (VmaKind::Vdso, None),
        "[vvar]" => (VmaKind::Vvar, None),
        "[vvar_vclock]" => (VmaKind::VvarVclock, None),
        "[vsyscall]" => (VmaKind::Vsyscall, None),
        "[heap]" | "[stack]" | "" if !m.shared => (VmaKind::AnonPrivate, None),
        n if n.starts_with("[anon:") && !m.shared => (VmaKind::AnonPrivate, None),
        "/dev/zero (deleted)" if m.shared => (VmaKind::AnonShared, None),
        n if n.starts_with("[anon_shmem:") && m.shared => (VmaKind::AnonShared, None),
        // Checked against the captured IPC namespace later (check_sysv_*).
        n if n.starts_with("/SYSV") && m.shared => (VmaKind::SysvShm, None),
        n if is_ghost_link(n) => {
            let proc_path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
            ghost_id = ghosts.register(pid, &proc_path, n)?;
            let kind = if m.shared {
                VmaKind::FileShared
            } else {
                VmaKind::FilePrivate
            };
            (kind, None)
        }
        n if n.starts_with('/') => {
            // The path as the process sees it, which may be under another root.
            let meta = std::fs::metadata(procfs::path_in_root(pid, root, n))
                .map_err(|e| unsupported(&format!("cannot stat the mapped file: {e}")))?;
            if !meta.is_file() {
                return Err(unsupported(
                    "only regular files can be mapped (a device or special file is mapped)",
                ));
            }
            let dev = meta.dev();
            let (maj, min) = (libc::major(dev), libc::minor(dev));
            if meta.ino() != m.inode || maj != m.dev_major || min != m.dev_minor {
                return Err(unsupported(
                    "the file at this path was replaced since it was mapped",
                ));
            }
            let kind = if m.shared {
                VmaKind::FileShared
            } else {
                VmaKind::FilePrivate
            };
            (kind, Some(file_id(&meta)))
        }
        _ => return Err(unsupported("unknown kind of special mapping")),
    };
    let path = if file.is_some() {
        m.name.clone()
    } else {
        String::new()
    };
    Ok(proto::Vma {
        start: m.start,
        end: m.end,
        prot: m.prot(),
        kind: kind as i32,
        pgoff: m.offset,
        path,
        file,
        vm_flags: m.vm_flags.clone(),
        name: m.name.clone(),
        shmem_id: if kind == VmaKind::AnonShared {
            m.inode
        } else {
            0
        },
        ghost_id,
        // Marked by a migration whose rounds sent them (see TreeSession::write).
        precopied: false,
        // A SysV segment's inode number is its id.
        sysv_shmid: if kind == VmaKind::SysvShm {
            u32::try_from(m.inode).map_err(|_| unsupported("segment id out of range"))?
        } else {
            0
        },
        // Found by crate::mmflags::find_guards.
        guards: Vec::new(),
    })
}

/// Where the System V segments a tree has attached live, checked before anything changes.
/// A container's are in its own IPC namespace, captured into the image with it. A plain
/// tree's are in the host's (stasis's own) namespace: they are kept by reference, like
/// shared files, and returned (no contents); one removed while attached ends with its
/// processes, so it is refused. `procs` are by host PID.
pub fn check_sysv_namespace(
    procs: &[proto::Process],
    container: bool,
) -> Result<Vec<stasis_runtime::sysvipc::ShmSegment>, CheckpointError> {
    let own = stasis_runtime::pidns::ns_id(std::process::id() as i32, "ipc")?;
    let mut tree_ns = None;
    let mut host = Vec::new();
    for p in procs {
        for v in p.vmas.iter().filter(|v| v.kind() == VmaKind::SysvShm) {
            let pid = p.pid as i32;
            let refuse = |why: String| {
                CheckpointError::unsupported(
                    pid,
                    format!("mapping {:#x}-{:#x} {:?}: {why}", v.start, v.end, v.name),
                )
            };
            let ns = stasis_runtime::pidns::ns_id(pid, "ipc")?;
            if *tree_ns.get_or_insert(ns) != ns {
                return Err(refuse(
                    "System V shared memory of a second IPC namespace in the tree".into(),
                ));
            }
            if container {
                if ns == own {
                    return Err(refuse(
                        "the container shares stasis's IPC namespace, whose System V \
                         shared memory it cannot take along"
                            .into(),
                    ));
                }
                continue;
            }
            if ns != own {
                return Err(refuse(
                    "System V shared memory of an IPC namespace other than the host's is \
                     kept only for containers (stasis run)"
                        .into(),
                ));
            }
            let id = v.sysv_shmid as i32;
            if host
                .iter()
                .any(|s: &stasis_runtime::sysvipc::ShmSegment| s.perm.id == id)
            {
                continue;
            }
            let seg = stasis_runtime::sysvipc::shm_segment(id)?
                .ok_or_else(|| refuse(format!("System V segment {id} is gone")))?;
            if seg.perm.mode & stasis_runtime::sysvipc::SHM_DEST != 0 {
                return Err(refuse(format!(
                    "System V segment {id} was removed while attached: it ends with its \
                     processes, and only a container's own segments are saved with it"
                )));
            }
            host.push(seg);
        }
    }
    Ok(host)
}

/// Every System V mapping must be part of a whole attach of a captured segment: the
/// mappings of one attach (split by mprotect) run without a gap from offset 0 to the end of
/// the segment (its size rounded up to pages).
pub fn check_sysv_attaches(
    procs: &[proto::Process],
    shm: &[stasis_runtime::sysvipc::ShmSegment],
) -> Result<(), CheckpointError> {
    for p in procs {
        let refuse = |v: &proto::Vma, why: String| {
            CheckpointError::unsupported(
                p.pid as i32,
                format!("mapping {:#x}-{:#x} {:?}: {why}", v.start, v.end, v.name),
            )
        };
        // (segment, base, end so far) of the attach being followed.
        let mut open: Option<(u32, u64, u64)> = None;
        let close = |open: Option<(u32, u64, u64)>,
                     v: &proto::Vma|
         -> Result<(), CheckpointError> {
            let Some((id, base, end)) = open else {
                return Ok(());
            };
            let seg = shm
                .iter()
                .find(|s| s.perm.id >= 0 && s.perm.id as u32 == id)
                .ok_or_else(|| {
                    refuse(
                        v,
                        format!("segment {id} is not among the tree's saved segments"),
                    )
                })?;
            let whole = seg.size.div_ceil(4096) * 4096;
            if end - base != whole {
                return Err(refuse(
                    v,
                    format!("only part of segment {id} ({whole} bytes) is mapped: partly detached attachments are not supported"),
                ));
            }
            Ok(())
        };
        for v in p.vmas.iter().filter(|v| v.kind() == VmaKind::SysvShm) {
            let base = v.start.checked_sub(v.pgoff);
            match (open, base) {
                (Some((id, b, end)), Some(base)) if id == v.sysv_shmid && b == base && end == v.start => {
                    open = Some((id, b, v.end));
                }
                (_, Some(base)) if v.pgoff == 0 => {
                    close(open, v)?;
                    open = Some((v.sysv_shmid, base, v.end));
                }
                _ => {
                    return Err(refuse(
                        v,
                        "the start of this attachment is unmapped: partly detached attachments are not supported".into(),
                    ))
                }
            }
        }
        if let Some(v) = p.vmas.iter().rev().find(|v| v.kind() == VmaKind::SysvShm) {
            close(open, v)?;
        }
    }
    Ok(())
}

/// Identity of a file from its metadata.
pub fn file_id(meta: &std::fs::Metadata) -> proto::FileId {
    proto::FileId {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        mode: meta.mode(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stasis_runtime::sysvipc::{IpcPerm, ShmSegment};

    fn seg(id: i32, size: u64) -> ShmSegment {
        ShmSegment {
            perm: IpcPerm {
                id,
                mode: 0o600,
                ..Default::default()
            },
            size,
            data: Vec::new(),
            attached: 1,
        }
    }

    fn vma(start: u64, pages: u64, id: u32, pgoff: u64) -> proto::Vma {
        proto::Vma {
            start,
            end: start + pages * 4096,
            kind: VmaKind::SysvShm as i32,
            pgoff,
            sysv_shmid: id,
            ..Default::default()
        }
    }

    fn check(vmas: Vec<proto::Vma>) -> Result<(), CheckpointError> {
        let p = proto::Process {
            pid: 7,
            vmas,
            ..Default::default()
        };
        // Segment 1: 3 pages + 100 bytes (4 pages mapped); segment 2: one page.
        check_sysv_attaches(&[p], &[seg(1, 3 * 4096 + 100), seg(2, 4096)])
    }

    #[test]
    fn whole_attachments_in_pieces_pass() {
        let base = 0x7f00_0000_0000;
        // Segment 1 split in three by mprotect, again whole elsewhere, then segment 2.
        let pieces = vec![
            vma(base, 1, 1, 0),
            vma(base + 0x1000, 1, 1, 0x1000),
            vma(base + 0x2000, 2, 1, 0x2000),
            vma(base + 0x4000, 4, 1, 0),
            vma(base + 0x8000, 1, 2, 0),
        ];
        assert!(check(pieces).is_ok());
    }

    #[test]
    fn partly_detached_or_unknown_segments_are_refused() {
        let base = 0x7f00_0000_0000;
        // The last page unmapped.
        assert!(check(vec![vma(base, 3, 1, 0)]).is_err());
        // The first page unmapped.
        assert!(check(vec![vma(base + 0x1000, 3, 1, 0x1000)]).is_err());
        // A gap in the middle.
        assert!(check(vec![vma(base, 1, 1, 0), vma(base + 0x2000, 2, 1, 0x2000)]).is_err());
        // A segment the image does not hold.
        assert!(check(vec![vma(base, 1, 9, 0)]).is_err());
    }
}

//! Classifying a process's mappings into image VMAs (and refusing the ones we cannot keep).

use crate::error::CheckpointError;
use crate::ghosts::{is_ghost_link, Ghosts};
use stasis_image::proto::{self, VmaKind};
use stasis_runtime::procfs::{self, MapEntry};
use std::os::unix::fs::MetadataExt;

/// VmFlags codes restore re-applies with madvise/mmap flags; others are informational.
pub const KEPT_FLAGS: [&str; 7] = ["gd", "dd", "dc", "wf", "hg", "nh", "lo"];

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
    let (kind, file) = match m.name.as_str() {
        "[vdso]" => (VmaKind::Vdso, None),
        "[vvar]" => (VmaKind::Vvar, None),
        "[vvar_vclock]" => (VmaKind::VvarVclock, None),
        "[vsyscall]" => (VmaKind::Vsyscall, None),
        "[heap]" | "[stack]" | "" if !m.shared => (VmaKind::AnonPrivate, None),
        n if n.starts_with("[anon:") && !m.shared => (VmaKind::AnonPrivate, None),
        "/dev/zero (deleted)" if m.shared => (VmaKind::AnonShared, None),
        n if n.starts_with("[anon_shmem:") && m.shared => (VmaKind::AnonShared, None),
        n if n.starts_with("/SYSV") => {
            return Err(unsupported("System V shared memory is not supported yet"))
        }
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
    })
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

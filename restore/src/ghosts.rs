//! Recreating ghost files (deleted while open, memfds) before the process is built. They are
//! held open by stasis: fds of the tree reopen them through /proc/<stasis>/fd/N, which works
//! for files that have no name, and the processes that map one inherit stasis's fd of it
//! (see plan::Plan::ghost_fds), since the /proc they see may not show stasis at all.

use crate::error::RestoreError;
use stasis_image::proto::{self, RunKind, SpaceKind};
use stasis_image::Image;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// Ghost files recreated and held open for the restore.
#[derive(Default)]
pub struct Recreated {
    files: Vec<(u32, File)>,
}

impl Recreated {
    /// A path that opens ghost `id` from stasis (or any process seeing stasis's /proc).
    pub fn path_for(&self, id: u32) -> Result<String, RestoreError> {
        Ok(format!("/proc/{}/fd/{}", std::process::id(), self.fd(id)?))
    }

    /// Stasis's fd of ghost `id` (open for reading and writing).
    pub fn fd(&self, id: u32) -> Result<i32, RestoreError> {
        let (_, f) =
            self.files.iter().find(|(i, _)| *i == id).ok_or_else(|| {
                RestoreError::Invalid(format!("ghost file {id} is not in the image"))
            })?;
        Ok(f.as_raw_fd())
    }
}

/// Recreates every ghost file of the processes (each once) with its contents and seals; a
/// deleted file is made at its old path under `opts`'s root.
pub fn recreate(
    image: &Image,
    procs: &[&proto::Process],
    opts: &crate::Options,
) -> Result<Recreated, RestoreError> {
    let mut out = Recreated::default();
    for g in procs.iter().flat_map(|p| p.ghost_files.iter()) {
        if out.files.iter().any(|(id, _)| *id == g.id) {
            continue;
        }
        let file = if g.memfd {
            memfd(g)?
        } else {
            unlinked_file(g, &opts.host_path(&g.path))?
        };
        let what = |e: std::io::Error| {
            RestoreError::Unsupported(format!("recreating ghost file {}: {e}", g.path))
        };
        file.set_len(g.size).map_err(what)?;
        for chunk in image
            .chunks()
            .iter()
            .filter(|c| c.space == SpaceKind::File && c.space_id == g.id as u64)
        {
            let data = image.chunk_data(chunk)?;
            let mut at = 0usize;
            for run in &chunk.runs {
                if run.kind() != RunKind::Data {
                    continue;
                }
                let len = (run.pages * 4096) as usize;
                let bytes = data.get(at..at + len).ok_or_else(|| {
                    RestoreError::Invalid(format!("chunk {} is shorter than its runs", chunk.index))
                })?;
                // Pages are whole; the file may end inside the last one.
                let keep = g.size.saturating_sub(run.vaddr).min(len as u64) as usize;
                file.write_all_at(&bytes[..keep], run.vaddr).map_err(what)?;
                at += len;
            }
        }
        set_attrs(&file, g).map_err(what)?;
        if g.memfd && g.seals != 0 {
            // SAFETY: fcntl(F_ADD_SEALS) on an fd we own takes no pointers.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, g.seals as libc::c_int) }
                != 0
            {
                return Err(what(std::io::Error::last_os_error()));
            }
        }
        out.files.push((g.id, file));
    }
    Ok(out)
}

fn memfd(g: &proto::GhostFile) -> Result<File, RestoreError> {
    let name = CString::new(g.path.as_str())
        .map_err(|_| RestoreError::Invalid(format!("memfd name {:?} holds NUL", g.path)))?;
    // SAFETY: name is a valid C string; memfd_create returns a new fd we then own.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(RestoreError::Unsupported(format!(
            "memfd_create({}): {}",
            g.path,
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// A file at its old path (`at`, the path as the restorer reaches it), unlinked at once (so
/// /proc shows "PATH (deleted)" as before); if that path is taken again, an unnamed file
/// (O_TMPFILE) in the same directory.
fn unlinked_file(g: &proto::GhostFile, at: &std::path::Path) -> Result<File, RestoreError> {
    let mode = g.mode & 0o7777;
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(at)
    {
        Ok(f) => {
            std::fs::remove_file(at).map_err(|e| {
                RestoreError::Unsupported(format!("unlinking recreated {}: {e}", g.path))
            })?;
            Ok(f)
        }
        Err(_) => {
            let dir = at.parent().unwrap_or(std::path::Path::new("/"));
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .mode(mode)
                .custom_flags(libc::O_TMPFILE)
                .open(dir)
                .map_err(|e| {
                    RestoreError::Unsupported(format!("recreating deleted file {}: {e}", g.path))
                })
        }
    }
}

/// Gives the recreated file the owner, mode and times the old one had (a memfd is made 0777
/// and a file created here gets the restorer's owner and umask). The owner first: chown
/// clears set-id bits. The times last, after every write.
fn set_attrs(file: &File, g: &proto::GhostFile) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    let check = |rc: libc::c_int| {
        if rc != 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    if g.has_attrs {
        // SAFETY: fchown on an fd we own takes no pointers.
        check(unsafe { libc::fchown(fd, g.uid, g.gid) })?;
    }
    // SAFETY: fchmod on an fd we own takes no pointers.
    check(unsafe { libc::fchmod(fd, (g.mode & 0o7777) as libc::mode_t) })?;
    if g.has_attrs {
        let ts = |ns: i64| libc::timespec {
            tv_sec: ns.div_euclid(1_000_000_000) as libc::time_t,
            tv_nsec: ns.rem_euclid(1_000_000_000) as libc::c_long,
        };
        let times = [ts(g.atime_ns), ts(g.mtime_ns)];
        // SAFETY: times is an array of two timespecs, as futimens reads.
        check(unsafe { libc::futimens(fd, times.as_ptr()) })?;
    }
    Ok(())
}

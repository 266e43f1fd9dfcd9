//! Files that have no name any more: regular files deleted while open, and memfds. Their
//! contents go into the image; restore recreates them.

use crate::error::CheckpointError;
use stasis_image::proto;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

/// Whether a /proc link text names a ghost file.
pub fn is_ghost_link(link: &str) -> bool {
    link.starts_with("/memfd:") || (link.starts_with('/') && link.ends_with(" (deleted)"))
}

/// The ghost files of one process, each registered once per inode.
#[derive(Default)]
pub struct Ghosts {
    pub files: Vec<proto::GhostFile>,
    /// (ghost id, a /proc path that opens it).
    pub sources: Vec<(u32, String)>,
    by_inode: HashMap<(u64, u64), u32>,
}

impl Ghosts {
    /// Registers the file reachable at `proc_path` (/proc/PID/fd/N or
    /// /proc/PID/map_files/A-B), whose link text is `link`; returns its id.
    pub fn register(
        &mut self,
        pid: i32,
        proc_path: &str,
        link: &str,
    ) -> Result<u32, CheckpointError> {
        let meta = std::fs::metadata(proc_path)
            .map_err(|e| CheckpointError::Io(format!("stat {proc_path}"), e))?;
        if !meta.is_file() {
            return Err(CheckpointError::unsupported(
                pid,
                format!("{link} is a deleted special file, which is not supported"),
            ));
        }
        if let Some(id) = self.by_inode.get(&(meta.dev(), meta.ino())) {
            return Ok(*id);
        }
        let id = self.files.len() as u32 + 1;
        let base = link.strip_suffix(" (deleted)").unwrap_or(link);
        let (memfd, path) = match base.strip_prefix("/memfd:") {
            Some(name) => (true, name.to_string()),
            None => (false, base.to_string()),
        };
        let seals = if memfd { seals_of(proc_path)? } else { 0 };
        self.files.push(proto::GhostFile {
            id,
            path,
            memfd,
            size: meta.size(),
            mode: meta.mode(),
            seals,
            uid: meta.uid(),
            gid: meta.gid(),
            atime_ns: meta.atime() * 1_000_000_000 + meta.atime_nsec(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            has_attrs: true,
        });
        self.sources.push((id, proc_path.to_string()));
        self.by_inode.insert((meta.dev(), meta.ino()), id);
        Ok(id)
    }
}

fn seals_of(proc_path: &str) -> Result<u32, CheckpointError> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(proc_path)
        .map_err(|e| CheckpointError::Io(format!("open {proc_path}"), e))?;
    // SAFETY: fcntl(F_GET_SEALS) on an fd we own takes no pointers.
    let seals = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(CheckpointError::Io(
            format!("F_GET_SEALS {proc_path}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(seals as u32)
}

/// Opens a file-like object (a ghost file or shared memory, through /proc) for reading its
/// contents without changing its access time, which the workload could see (it runs on
/// after a --leave-running checkpoint). O_NOATIME needs the file's owner or CAP_FOWNER;
/// without them it is opened plainly.
pub fn open_quietly(path: &str) -> Result<std::fs::File, CheckpointError> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags: i32| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
    };
    open(libc::O_NOATIME)
        .or_else(|e| match e.raw_os_error() {
            Some(libc::EPERM) => open(0),
            _ => Err(e),
        })
        .map_err(|e| CheckpointError::Io(format!("open {path}"), e))
}

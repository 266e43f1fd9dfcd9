//! Parsers for the /proc files stasis reads about a process.
//!
//! Each parser takes the file's text so it can be unit-tested on fixed input; the `read_*`
//! functions fetch the text for a live PID.

mod cpuinfo;
mod fd;
mod limits;
mod maps;
mod meminfo;
mod stat;
mod status;
mod timers;

pub use cpuinfo::{cpu_flags, cpu_flags_in};
pub use fd::{
    parse_event_info, read_event_info, read_fd_target, read_fdinfo, EventInfo, FdInfo, InotifyMark,
};
pub use limits::{parse_limits, read_limits, Limit};
pub use maps::{
    first_smaps_flags, parse_maps, parse_smaps_flags, read_maps, read_smaps_flags, MapEntry,
};
pub use meminfo::{mem_available, parse_mem_available};
pub use stat::{parse_stat, read_stat, Stat};
pub use status::{parse_status, read_status, Status};
pub use timers::{parse_timers, read_timers, TimerInfo};

use crate::error::{Result, RuntimeError};

/// Reads a whole /proc file as bytes.
pub fn read_bytes(path: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| RuntimeError::sys("read", path, e))
}

/// Reads a whole /proc file as UTF-8 text (lossy: paths may hold any bytes).
pub fn read_text(path: &str) -> Result<String> {
    Ok(String::from_utf8_lossy(&read_bytes(path)?).into_owned())
}

/// The target of a /proc symlink (cwd, root, exe, fd/N).
pub fn read_link(path: &str) -> Result<String> {
    std::fs::read_link(path)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|e| RuntimeError::sys("readlink", path, e))
}

/// Where stasis reaches `path`, a path of process `pid` as its /proc links show it, when the
/// process's root directory is `root` (as /proc/PID/root shows it): under /proc/PID/root,
/// with `root` taken off. A link names a file relative to stasis's root when stasis can reach
/// it from there, and otherwise (another mount namespace) relative to the root of the
/// file's mount namespace; either way this resolves it as the process does. A path outside
/// `root` (opened before a chroot) is returned as it is.
pub fn path_in_root(pid: i32, root: &str, path: &str) -> String {
    let rest = if root == "/" {
        path.strip_prefix('/').map(|_| path)
    } else {
        path.strip_prefix(root)
            .filter(|r| r.is_empty() || r.starts_with('/'))
    };
    match rest {
        Some(rest) => format!("/proc/{pid}/root{rest}"),
        None => path.to_string(),
    }
}

/// Thread ids of a process, from /proc/PID/task.
pub fn read_tids(pid: i32) -> Result<Vec<i32>> {
    let path = format!("/proc/{pid}/task");
    let dir = std::fs::read_dir(&path).map_err(|e| RuntimeError::sys("readdir", &path, e))?;
    let mut tids = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|e| RuntimeError::sys("readdir", &path, e))?;
        if let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            tids.push(tid);
        }
    }
    tids.sort_unstable();
    Ok(tids)
}

/// The NUL-separated strings of /proc/PID/cmdline or environ.
pub fn split_nul(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// /proc/PID/personality (hex).
pub fn read_personality(pid: i32) -> Result<u32> {
    let path = format!("/proc/{pid}/personality");
    let text = read_text(&path)?;
    u32::from_str_radix(text.trim(), 16).map_err(|e| RuntimeError::Parse {
        path,
        what: e.to_string(),
    })
}

pub(crate) fn parse_err(path: &str, what: impl Into<String>) -> RuntimeError {
    RuntimeError::Parse {
        path: path.to_string(),
        what: what.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_under_the_process_root() {
        assert_eq!(path_in_root(7, "/", "/etc/hosts"), "/proc/7/root/etc/hosts");
        assert_eq!(
            path_in_root(7, "/srv/c", "/srv/c/etc/x"),
            "/proc/7/root/etc/x"
        );
        assert_eq!(path_in_root(7, "/srv/c", "/srv/c"), "/proc/7/root");
        // Outside its root, or a relative name: as it is.
        assert_eq!(path_in_root(7, "/srv/c", "/srv/cx/y"), "/srv/cx/y");
        assert_eq!(path_in_root(7, "/", "rel/sock"), "rel/sock");
    }
}

//! /proc/PID/fd and /proc/PID/fdinfo.

use super::{parse_err, read_link, read_text};
use crate::error::Result;

/// The fields of /proc/PID/fdinfo/N that stasis uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FdInfo {
    pub pos: u64,
    /// f_flags in octal in the file, including O_CLOEXEC of the fd.
    pub flags: u32,
    pub mnt_id: u64,
    pub ino: u64,
}

/// Reads /proc/PID/fdinfo/FD.
pub fn read_fdinfo(pid: i32, fd: i32) -> Result<FdInfo> {
    let path = format!("/proc/{pid}/fdinfo/{fd}");
    let text = read_text(&path)?;
    let mut info = FdInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key {
            "pos" => info.pos = value.parse().map_err(|_| parse_err(&path, "bad pos"))?,
            "flags" => {
                info.flags =
                    u32::from_str_radix(value, 8).map_err(|_| parse_err(&path, "bad flags"))?
            }
            "mnt_id" => info.mnt_id = value.parse().map_err(|_| parse_err(&path, "bad mnt_id"))?,
            "ino" => info.ino = value.parse().map_err(|_| parse_err(&path, "bad ino"))?,
            _ => {}
        }
    }
    Ok(info)
}

/// Where /proc/PID/fd/FD points ("/path", "pipe:[123]", "socket:[4]", "anon_inode:[eventfd]").
pub fn read_fd_target(pid: i32, fd: i32) -> Result<String> {
    read_link(&format!("/proc/{pid}/fd/{fd}"))
}

//! An image directory on a disk (`--dir` not on tmpfs): there stasis's checkpoint includes
//! making its image durable (fsync before the workload is killed), CRIU's does not, and
//! dirty pages one run leaves behind would be written back during the next run's timing.
//! So on a disk every run starts with the file system synced (untimed), CRIU's row also shows
//! what syncing its image files costs after its dump ("+sync"), and the floor gains the
//! fsync of its written bytes (the device's share).

use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;

/// Whether `dir` is on a file system with a device under it (not tmpfs or ramfs).
pub fn on_disk(dir: &Path) -> Result<bool, String> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: NUL in path", dir.display()))?;
    // SAFETY: statfs writes one struct statfs into `st`; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; both pointers are valid for the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!(
            "statfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        ));
    }
    let kind = st.f_type as i64;
    Ok(kind != TMPFS_MAGIC && kind != RAMFS_MAGIC)
}

/// Writes back everything dirty on `dir`'s file system (syncfs), so a timed run does not pay
/// for what an earlier one left.
pub fn settle(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        // SAFETY: syncfs takes an open fd and no pointers.
        unsafe { libc::syncfs(d.as_raw_fd()) };
    }
}

/// fsyncs every file in `dir` and the directory itself (what CRIU would have to do to leave
/// a durable image); milliseconds.
pub fn sync_files(dir: &Path) -> Result<f64, String> {
    let t = Instant::now();
    let err = |e: std::io::Error| format!("syncing {}: {e}", dir.display());
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        if entry.file_type().map_err(err)?.is_file() {
            std::fs::File::open(entry.path())
                .and_then(|f| f.sync_all())
                .map_err(err)?;
        }
    }
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(err)?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

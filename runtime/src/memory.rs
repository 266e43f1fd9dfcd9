//! Reading and writing another process's memory: pagemap, process_vm_readv/writev and
//! /proc/PID/mem (which can reach PROT_NONE and read-only mappings).

use crate::error::{Result, RuntimeError};
use crate::PAGE_SIZE;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Most iovecs one process_vm_* call takes (UIO_MAXIOV).
pub const IOV_MAX: usize = 1024;

/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAPPED: u64 = 1 << 62;
pub const PM_FILE_OR_SHARED: u64 = 1 << 61;
pub const PM_EXCLUSIVE: u64 = 1 << 56;
pub const PM_SOFT_DIRTY: u64 = 1 << 55;
/// A MADV_GUARD_INSTALL guard page (PM_GUARD_REGION, kernel 6.15+).
pub const PM_GUARD: u64 = 1 << 58;

/// What this kernel tells about MADV_GUARD_INSTALL guard pages (probed once, on a mapping
/// of stasis's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardSupport {
    /// No guard pages: madvise(MADV_GUARD_INSTALL) is unknown (before 6.13).
    None,
    /// Guard pages exist, but pagemap does not report them (6.13, 6.14).
    Unreported,
    /// pagemap reports them (PM_GUARD); `flagged`: smaps marks every mapping that may hold
    /// some with VmFlags `gu`, so only those need a pagemap scan.
    Reported { flagged: bool },
}

/// madvise advice that installs guard pages.
pub const MADV_GUARD_INSTALL: i32 = 102;

/// Probes (once per process) how guard pages show on this kernel.
pub fn guard_support() -> GuardSupport {
    static ONCE: std::sync::OnceLock<GuardSupport> = std::sync::OnceLock::new();
    *ONCE.get_or_init(probe_guards)
}

fn probe_guards() -> GuardSupport {
    let len = 2 * PAGE_SIZE as usize;
    // SAFETY: a fresh private anonymous mapping at an address the kernel picks.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return GuardSupport::Unreported;
    }
    let start = at as u64;
    let guard = start + PAGE_SIZE;
    // SAFETY: the second page of the mapping just made, which nothing else uses.
    let result =
        if unsafe { libc::madvise(guard as *mut libc::c_void, 4096, MADV_GUARD_INSTALL) } != 0 {
            GuardSupport::None
        } else {
            let pid = std::process::id() as i32;
            let mut entries = Vec::new();
            let reported = Pagemap::open(pid)
                .and_then(|pm| pm.read(guard, guard + PAGE_SIZE, &mut entries))
                .is_ok()
                && entries.first().is_some_and(|e| e & PM_GUARD != 0);
            let flagged = crate::procfs::read_smaps_flags(pid).is_ok_and(|maps| {
                maps.iter()
                    .any(|m| m.start <= guard && guard < m.end && m.has_flag("gu"))
            });
            if reported {
                GuardSupport::Reported { flagged }
            } else {
                GuardSupport::Unreported
            }
        };
    // SAFETY: unmaps only the probe mapping made above.
    unsafe { libc::munmap(at, len) };
    result
}

/// /proc/PID/pagemap, open for repeated lookups.
pub struct Pagemap {
    file: File,
    path: String,
}

impl Pagemap {
    /// Opens /proc/PID/pagemap.
    pub fn open(pid: i32) -> Result<Self> {
        let path = format!("/proc/{pid}/pagemap");
        let file = File::open(&path).map_err(|e| RuntimeError::sys("open", &path, e))?;
        Ok(Pagemap { file, path })
    }

    /// Reads the entries for pages [start, end) into `out` (cleared first).
    pub fn read(&self, start: u64, end: u64, out: &mut Vec<u64>) -> Result<()> {
        let pages = ((end - start) / PAGE_SIZE) as usize;
        out.clear();
        out.resize(pages, 0);
        // SAFETY: a Vec<u64> of `pages` entries is exactly pages*8 initialized bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), pages * 8) };
        let mut done = 0;
        while done < bytes.len() {
            let off = (start / PAGE_SIZE) * 8 + done as u64;
            match self.file.read_at(&mut bytes[done..], off) {
                Ok(0) => {
                    return Err(RuntimeError::sys(
                        "read",
                        format!("{} at {off:#x}", self.path),
                        io::ErrorKind::UnexpectedEof.into(),
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RuntimeError::sys("read", &self.path, e)),
            }
        }
        Ok(())
    }
}

/// A remote range (address, length).
pub type Remote = (u64, usize);

fn remote_iovecs(remote: &[Remote]) -> Vec<libc::iovec> {
    remote
        .iter()
        .map(|&(addr, len)| libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: len,
        })
        .collect()
}

/// Direction of a process_vm_* transfer.
#[derive(Clone, Copy)]
enum Dir {
    Read,
    Write,
}

/// Moves bytes between `local` (contiguous) and the remote ranges, in order, in batches of
/// IOV_MAX ranges. A partial transfer is an error naming the first byte not moved.
fn transfer(pid: i32, remote: &[Remote], local: *mut u8, dir: Dir) -> Result<()> {
    let op = match dir {
        Dir::Read => "process_vm_readv",
        Dir::Write => "process_vm_writev",
    };
    let mut done_ranges = 0;
    let mut done_bytes = 0;
    while done_ranges < remote.len() {
        let batch = &remote[done_ranges..remote.len().min(done_ranges + IOV_MAX)];
        let len: usize = batch.iter().map(|r| r.1).sum();
        let riov = remote_iovecs(batch);
        let liov = libc::iovec {
            // In bounds: callers pass a buffer of at least the sum of all
            // remote lengths, so done_bytes + len stays inside it.
            iov_base: local.wrapping_add(done_bytes).cast(),
            iov_len: len,
        };
        // SAFETY: liov covers `len` bytes of the caller's buffer (writable for reads, only
        // read by the kernel for writes); riov are remote addresses the kernel checks
        // against the target's address space.
        let n = unsafe {
            match dir {
                Dir::Read => {
                    libc::process_vm_readv(pid, &liov, 1, riov.as_ptr(), riov.len() as _, 0)
                }
                Dir::Write => {
                    libc::process_vm_writev(pid, &liov, 1, riov.as_ptr(), riov.len() as _, 0)
                }
            }
        };
        if n < 0 {
            return Err(RuntimeError::last_os(
                op,
                format!("pid {pid} at {:#x}", batch[0].0),
            ));
        }
        if n as usize != len {
            let at = first_unreached(batch, n as usize);
            return Err(RuntimeError::sys(
                op,
                format!("pid {pid} at {at:#x} (moved {n} of {len} bytes)"),
                io::Error::from_raw_os_error(libc::EFAULT),
            ));
        }
        done_ranges += batch.len();
        done_bytes += len;
    }
    Ok(())
}

fn check_len(op: &'static str, remote: &[Remote], local: usize) -> Result<()> {
    let total: usize = remote.iter().map(|r| r.1).sum();
    if total != local {
        return Err(RuntimeError::Unsupported(format!(
            "{op}: {local} local bytes for {total} remote bytes"
        )));
    }
    Ok(())
}

/// Reads the remote ranges, in order, into `local` (whose length must be their sum).
pub fn read_remote(pid: i32, remote: &[Remote], local: &mut [u8]) -> Result<()> {
    check_len("process_vm_readv", remote, local.len())?;
    transfer(pid, remote, local.as_mut_ptr(), Dir::Read)
}

/// Writes `local` into the remote ranges, in order (its length must be their sum).
pub fn write_remote(pid: i32, remote: &[Remote], local: &[u8]) -> Result<()> {
    check_len("process_vm_writev", remote, local.len())?;
    transfer(pid, remote, local.as_ptr() as *mut u8, Dir::Write)
}

fn first_unreached(batch: &[Remote], mut n: usize) -> u64 {
    for &(addr, len) in batch {
        if n < len {
            return addr + n as u64;
        }
        n -= len;
    }
    0
}

/// /proc/PID/mem: reaches mappings process_vm_* cannot (PROT_NONE, read-only).
pub struct ProcMem {
    file: File,
    path: String,
}

impl ProcMem {
    /// Opens /proc/PID/mem for reading and writing.
    pub fn open(pid: i32) -> Result<Self> {
        let path = format!("/proc/{pid}/mem");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| RuntimeError::sys("open", &path, e))?;
        Ok(ProcMem { file, path })
    }

    /// Reads exactly `buf.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, addr)
            .map_err(|e| RuntimeError::sys("read", format!("{} at {addr:#x}", self.path), e))
    }

    /// Writes all of `buf` at `addr`.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<()> {
        self.file
            .write_all_at(buf, addr)
            .map_err(|e| RuntimeError::sys("write", format!("{} at {addr:#x}", self.path), e))
    }
}

/// Whether every byte of `page` is zero (fast path: word compare).
pub fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned middle.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && tail.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0)
}

/// The extents ([start, end) offsets) of `file` between `from` and `to` that hold data
/// (SEEK_DATA/SEEK_HOLE): on a memfd or tmpfs file, the pages ever written, resident or
/// swapped, whether or not any process has them mapped.
pub fn data_extents(file: &File, from: u64, to: u64) -> io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |pos: u64, whence: i32| -> io::Result<Option<u64>> {
        let pos = libc::off_t::try_from(pos).map_err(io::Error::other)?;
        // SAFETY: lseek takes no pointers.
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        let Some(data) = seek(at, libc::SEEK_DATA)?.filter(|&d| d < to) else {
            break;
        };
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(to).min(to);
        out.push((data, hole));
        at = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_own_memory() {
        let pid = std::process::id() as i32;
        let src = vec![7u8; 8192];
        let mut dst = vec![0u8; 8192];
        let remote = [
            (src.as_ptr() as u64, 4096),
            (src.as_ptr() as u64 + 4096, 4096),
        ];
        read_remote(pid, &remote, &mut dst).unwrap();
        assert_eq!(src, dst);
        let target = vec![0u8; 4096];
        write_remote(pid, &[(target.as_ptr() as u64, 4096)], &[9u8; 4096]).unwrap();
        assert!(std::hint::black_box(&target).iter().all(|b| *b == 9));
    }

    #[test]
    fn bad_address_is_named() {
        let pid = std::process::id() as i32;
        let mut dst = vec![0u8; 4096];
        let err = read_remote(pid, &[(8, 4096)], &mut dst).unwrap_err();
        assert!(err.to_string().contains("0x8"), "{err}");
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        assert!(!is_zero(&p[1..]));
    }

    #[test]
    fn pagemap_sees_touched_page() {
        let pm = Pagemap::open(std::process::id() as i32).unwrap();
        let v = vec![1u8; 3 * 4096];
        let start = (v.as_ptr() as u64 + 4095) & !4095;
        let mut out = Vec::new();
        pm.read(start, start + 4096, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert!(out[0] & PM_PRESENT != 0);
    }
}

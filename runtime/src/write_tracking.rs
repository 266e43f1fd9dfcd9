//! Tracking which pages a process writes: userfaultfd write-protect in async mode
//! (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, 6.7+) and the PAGEMAP_SCAN ioctl on
//! /proc/PID/pagemap (6.7+). Soft-dirty is the older way, but many kernels are built without
//! it.
//!
//! The userfaultfd is made inside the target ([`inject_userfaultfd`]) so that it belongs to the
//! target's mm; every ioctl is then issued from this process. In async mode a write to a
//! write-protected page never blocks and queues no message: the kernel only drops the page's
//! uffd-wp bit, and PAGEMAP_SCAN reports the page as written until it is protected again.
//! Pages never populated count too (WP_UNPOPULATED leaves markers in their empty entries).
//! A write to a protected transparent huge page splits its mapping, so writes are reported
//! per 4 KiB page. Track a range before copying it, so that no write falls in between.
//!
//! Registration lasts as long as the userfaultfd: dropping the [`WriteTracker`] (or the exit
//! of this process) closes the last reference, and the kernel's userfaultfd release
//! unregisters every range and removes its write protection, so the target is left as it
//! was. Only the mappings given to [`WriteTracker::track`] are tracked: a mapping made later
//! (mmap, the new place of an mremap, MAP_FIXED over a tracked range) is not, so compare the
//! maps between rounds and track the new ones.

use crate::error::{Result, RuntimeError};
use crate::memory::{PM_PRESENT, PM_SWAPPED};
use crate::PAGE_SIZE;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: i32 = 1;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PAGE_IS_WPALLOWED: u64 = 1 << 0;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// page_region entries filled per PAGEMAP_SCAN call.
const REGIONS_PER_SCAN: usize = 512;

/// _IOWR(ty, nr, size) of asm-generic/ioctl.h.
const fn iowr(ty: u8, nr: u8, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | ((ty as u64) << 8) | nr as u64
}
const UFFDIO_API: u64 = iowr(0xAA, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0xAA, 0x00, size_of::<UffdioRegister>());
const UFFDIO_WRITEPROTECT: u64 = iowr(0xAA, 0x06, size_of::<UffdioWriteprotect>());
const PAGEMAP_SCAN: u64 = iowr(b'f', 16, size_of::<PmScanArg>());
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610 && UFFDIO_API == 0xc018_aa3f);

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// ioctl(fd, req, arg), retried on EINTR; returns the ioctl's non-negative result.
///
/// # Safety
/// `req` must be a request whose argument is a pointer to a `T` (of the size `req` encodes),
/// and any pointers inside `*arg` must be valid for what the request does with them.
unsafe fn ioctl<T>(fd: &impl AsRawFd, req: u64, arg: &mut T) -> io::Result<i32> {
    loop {
        // SAFETY: the caller vouches that `req` takes a `*mut T`; `arg` is an exclusive borrow
        // that outlives the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req as libc::Ioctl, arg as *mut T) };
        if rc >= 0 {
            return Ok(rc);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

const UFFD_FLAGS: i32 = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;

/// A userfaultfd of this process's own mm (for the probe and tests).
fn own_userfaultfd() -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd takes no pointers; the result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, UFFD_FLAGS) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The first feature write tracking needs that `features` (UFFDIO_API's answer) lacks.
fn missing_feature(features: u64) -> Option<String> {
    [
        (UFFD_FEATURE_WP_ASYNC, "UFFD_FEATURE_WP_ASYNC (kernel 6.7+)"),
        (
            UFFD_FEATURE_WP_UNPOPULATED,
            "UFFD_FEATURE_WP_UNPOPULATED (kernel 6.5+)",
        ),
    ]
    .into_iter()
    .find(|(bit, _)| features & bit == 0)
    .map(|(_, name)| format!("userfaultfd lacks {name}"))
}

/// Whether this kernel can track writes this way (probed once): `Err` names what is missing.
pub fn support() -> std::result::Result<(), String> {
    static ONCE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    ONCE.get_or_init(probe).clone()
}

fn probe() -> std::result::Result<(), String> {
    let uffd = own_userfaultfd().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no userfaultfd (CONFIG_USERFAULTFD)".to_string(),
        _ => format!("userfaultfd(): {e}"),
    })?;
    // Features 0 asks for nothing and is answered with everything the kernel has.
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a struct uffdio_api, which UffdioApi is.
    unsafe { ioctl(&uffd, UFFDIO_API, &mut api) }.map_err(|e| format!("UFFDIO_API: {e}"))?;
    if let Some(missing) = missing_feature(api.features) {
        return Err(missing);
    }
    let pagemap =
        File::open("/proc/self/pagemap").map_err(|e| format!("opening /proc/self/pagemap: {e}"))?;
    // One page anywhere: the kernel only has to know the call (holes are skipped).
    let mut regions = [PageRegion::default(); 1];
    let mut arg = scan_arg(0x10000, 0x11000, &mut regions);
    arg.category_anyof_mask = PAGE_IS_PRESENT;
    arg.return_mask = PAGE_IS_PRESENT;
    // SAFETY: PAGEMAP_SCAN takes a struct pm_scan_arg; vec points at `regions`, vec_len long.
    match unsafe { ioctl(&pagemap, PAGEMAP_SCAN, &mut arg) } {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
            Err("PAGEMAP_SCAN is not supported (kernel 6.7+)".to_string())
        }
        Err(e) => Err(format!("PAGEMAP_SCAN on /proc/self/pagemap: {e}")),
    }
}

/// A pm_scan_arg over [start, end) filling `regions`, asking for nothing yet.
fn scan_arg(start: u64, end: u64, regions: &mut [PageRegion]) -> PmScanArg {
    PmScanArg {
        size: size_of::<PmScanArg>() as u64,
        flags: 0,
        start,
        end,
        walk_end: 0,
        vec: regions.as_mut_ptr() as u64,
        vec_len: regions.len() as u64,
        max_pages: 0,
        category_inverted: 0,
        category_mask: 0,
        category_anyof_mask: 0,
        return_mask: 0,
    }
}

/// A userfaultfd made inside the stopped process `inj` drives (an injected
/// `userfaultfd(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)`), copied into this process with
/// pidfd_getfd and closed again in the target, so the target's fd table is as it was. The
/// file belongs to the target's mm. `pid` is the target's thread-group leader.
pub fn inject_userfaultfd(inj: &mut crate::inject::Injector, pid: i32) -> Result<OwnedFd> {
    let fd = inj.call("userfaultfd", libc::SYS_userfaultfd, &[UFFD_FLAGS as u64])?;
    let copy = crate::files::take_copy(pid, fd as i32);
    let closed = inj.call("close", libc::SYS_close, &[fd]);
    let copy = copy?;
    closed?;
    Ok(copy)
}

/// What [`WriteTracker::take_written`] found.
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// All of the range that is mapped is tracked: its written pages were appended and
    /// protected again.
    Ranges,
    /// Some of the range is mapped but not tracked (its mapping was replaced by mmap
    /// MAP_FIXED, or never tracked). Nothing was appended and nothing protected again.
    /// Track it and copy it whole, in that order, so that later writes show next time
    /// ([`WriteTracker::track`] over parts still tracked is harmless, but protects them
    /// again, so copy those too).
    NotTracked,
}

/// Write tracking of one process's mm. Dropping it ends the tracking (see the module doc).
pub struct WriteTracker {
    pid: i32,
    uffd: OwnedFd,
    pagemap: File,
    regions: Vec<PageRegion>,
}

impl WriteTracker {
    /// Takes `uffd` (a userfaultfd of process `pid`'s mm, not yet through UFFDIO_API), enables
    /// WP_ASYNC | WP_UNPOPULATED on it and opens /proc/PID/pagemap.
    pub fn new(pid: i32, uffd: OwnedFd) -> Result<Self> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a struct uffdio_api, which UffdioApi is.
        if let Err(e) = unsafe { ioctl(&uffd, UFFDIO_API, &mut api) } {
            // EINVAL is also the answer to a second UFFDIO_API: blame the kernel only if the
            // probe does.
            if let (Some(libc::EINVAL), Err(why)) = (e.raw_os_error(), support()) {
                return Err(RuntimeError::Unsupported(format!(
                    "tracking writes of pid {pid}: {why}"
                )));
            }
            let target = format!("userfaultfd of pid {pid}");
            return Err(RuntimeError::sys("ioctl(UFFDIO_API)", target, e));
        }
        let path = format!("/proc/{pid}/pagemap");
        let pagemap = File::open(&path).map_err(|e| RuntimeError::sys("open", &path, e))?;
        Ok(WriteTracker {
            pid,
            uffd,
            pagemap,
            regions: vec![PageRegion::default(); REGIONS_PER_SCAN],
        })
    }

    /// The tracked process.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Registers [start, end) (page-aligned, mapped) for write-protect tracking and
    /// write-protects all of it: from now on a write to any page of it, populated or not, is
    /// reported by the next [`WriteTracker::take_written`]. Fails with EBUSY if another
    /// userfaultfd (the process's own) has registered some of it, EPERM for a shared mapping
    /// the process cannot write.
    pub fn track(&mut self, start: u64, end: u64) -> Result<()> {
        let range = UffdioRange {
            start,
            len: end.saturating_sub(start),
        };
        let mut reg = UffdioRegister {
            range,
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a struct uffdio_register, which UffdioRegister is.
        unsafe { ioctl(&self.uffd, UFFDIO_REGISTER, &mut reg) }
            .map_err(|e| RuntimeError::sys("ioctl(UFFDIO_REGISTER)", self.target(start, end), e))?;
        // Registering protects nothing: populated pages would all read as written.
        let mut wp = UffdioWriteprotect {
            range,
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a struct uffdio_writeprotect, which
        // UffdioWriteprotect is.
        unsafe { ioctl(&self.uffd, UFFDIO_WRITEPROTECT, &mut wp) }.map_err(|e| {
            RuntimeError::sys("ioctl(UFFDIO_WRITEPROTECT)", self.target(start, end), e)
        })?;
        Ok(())
    }

    /// Appends to `out` the page ranges (start, end) of [start, end) written since they were
    /// protected (by `track` or the previous call), and protects them again in the same step.
    /// A page emptied since (MADV_DONTNEED) counts as written: it reads as zeros now. Holes
    /// (unmapped parts) are skipped; a mapped part that is not tracked makes it
    /// [`Written::NotTracked`].
    ///
    /// PM_SCAN_CHECK_WPASYNC is not used: it fails the whole call with EPERM at the first
    /// untracked mapping, after the pages before it were already protected again, so their
    /// writes would be lost without a word on how far it got. Instead a first scan, which
    /// the kernel answers from the mappings' flags alone, looks for untracked mappings, and
    /// the second skips any. A mapping replaced between the two shows in the next call (in
    /// a process that is stopped, nothing can be).
    pub fn take_written(
        &mut self,
        start: u64,
        end: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<Written> {
        let untracked = self.scan("PAGEMAP_SCAN (untracked)", start, end, 0, |a| {
            a.category_inverted = PAGE_IS_WPALLOWED;
            a.category_mask = PAGE_IS_WPALLOWED;
        })?;
        if !untracked.is_empty() {
            return Ok(Written::NotTracked);
        }
        // Exactly these masks take the kernel's fast path, which counts every entry without
        // the uffd-wp bit (an empty one too) as written.
        let written = self.scan(
            "PAGEMAP_SCAN (written)",
            start,
            end,
            PM_SCAN_WP_MATCHING,
            |a| {
                a.category_mask = PAGE_IS_WRITTEN;
                a.return_mask = PAGE_IS_WRITTEN;
            },
        )?;
        let first = out.len();
        for r in written {
            push_merged(out, first, r.start, r.end);
        }
        Ok(Written::Ranges)
    }

    /// Appends to `out` the ranges of [start, end) whose pages are present (including the
    /// shared zero page that a read of untouched anonymous memory maps) or swapped out.
    ///
    /// PAGEMAP_SCAN counts the markers that write protection (and MADV_GUARD_INSTALL) leaves
    /// in empty entries as swapped; those pages are read from /proc/PID/pagemap, where a
    /// marker has swap type 31 (SWP_PTE_MARKER), and left out. That needs CAP_SYS_ADMIN
    /// (without it pagemap hides swap types, and every such page counts as swapped).
    pub fn resident(&mut self, start: u64, end: u64, out: &mut Vec<(u64, u64)>) -> Result<()> {
        self.resident_pages(start, end, true, out)
    }

    /// Like [`WriteTracker::resident`] without the shared zero page: the pages of [start,
    /// end) that hold data (all others read as zeros).
    pub fn resident_data(&mut self, start: u64, end: u64, out: &mut Vec<(u64, u64)>) -> Result<()> {
        self.resident_pages(start, end, false, out)
    }

    fn resident_pages(
        &mut self,
        start: u64,
        end: u64,
        zero_page: bool,
        out: &mut Vec<(u64, u64)>,
    ) -> Result<()> {
        let found = self.scan("PAGEMAP_SCAN (resident)", start, end, 0, |arg| {
            arg.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
            arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO;
        })?;
        let first = out.len();
        for r in found {
            if r.categories & PAGE_IS_PRESENT == 0 {
                self.push_unmarked(r.start, r.end, out, first)?;
            } else if zero_page || r.categories & PAGE_IS_PFNZERO == 0 {
                push_merged(out, first, r.start, r.end);
            }
        }
        Ok(())
    }

    /// Runs PAGEMAP_SCAN over [start, end) as often as the bounded output needs and returns
    /// the regions found, in order. `ask` sets the categories.
    fn scan(
        &mut self,
        op: &'static str,
        start: u64,
        end: u64,
        flags: u64,
        ask: impl Fn(&mut PmScanArg),
    ) -> Result<Vec<PageRegion>> {
        let mut found = Vec::new();
        let mut at = start;
        while at < end {
            let mut arg = scan_arg(at, end, &mut self.regions);
            arg.flags = flags;
            ask(&mut arg);
            // SAFETY: PAGEMAP_SCAN takes a struct pm_scan_arg; vec points at self.regions,
            // vec_len entries, borrowed exclusively for the call.
            let n = unsafe { ioctl(&self.pagemap, PAGEMAP_SCAN, &mut arg) }
                .map_err(|e| RuntimeError::sys(op, self.target(at, end), e))?;
            found.extend(self.regions.iter().take(n as usize));
            if arg.walk_end <= at {
                return Err(RuntimeError::Protocol {
                    op,
                    pid: self.pid,
                    what: format!("the scan of [{at:#x}, {end:#x}) made no progress"),
                });
            }
            at = arg.walk_end;
        }
        Ok(found)
    }

    /// Appends the pages of [start, end) whose pagemap entries hold a page (present or
    /// swapped) rather than nothing or a PTE marker.
    fn push_unmarked(
        &self,
        start: u64,
        end: u64,
        out: &mut Vec<(u64, u64)>,
        first: usize,
    ) -> Result<()> {
        const SWP_PTE_MARKER: u64 = 31;
        const PAGES_PER_READ: u64 = 4096;
        let mut buf = vec![0u8; (PAGES_PER_READ * 8) as usize];
        let mut at = start;
        while at < end {
            let stop = end.min(at + PAGES_PER_READ * PAGE_SIZE);
            let bytes = &mut buf[..((stop - at) / PAGE_SIZE * 8) as usize];
            self.pagemap
                .read_exact_at(bytes, at / PAGE_SIZE * 8)
                .map_err(|e| RuntimeError::sys("read pagemap", self.target(at, stop), e))?;
            for (i, raw) in bytes.chunks_exact(8).enumerate() {
                let mut entry = [0u8; 8];
                entry.copy_from_slice(raw);
                let entry = u64::from_ne_bytes(entry);
                let marker = entry & 0x1f == SWP_PTE_MARKER;
                if entry & PM_PRESENT != 0 || (entry & PM_SWAPPED != 0 && !marker) {
                    let page = at + i as u64 * PAGE_SIZE;
                    push_merged(out, first, page, page + PAGE_SIZE);
                }
            }
            at = stop;
        }
        Ok(())
    }

    fn target(&self, start: u64, end: u64) -> String {
        format!("pid {} [{start:#x}, {end:#x})", self.pid)
    }
}

/// Appends [start, end) to `out`, extending the last range if it ends at `start` and was
/// appended by this call (index `first` on).
fn push_merged(out: &mut Vec<(u64, u64)>, first: usize, start: u64, end: u64) {
    match out[first..].last_mut() {
        Some(last) if last.1 == start => last.1 = end,
        _ => out.push((start, end)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{inject::Injector, procfs, ptrace};

    /// An anonymous private read-write mapping, unmapped on drop.
    struct Area {
        start: u64,
        pages: u64,
        /// What to munmap: the whole mapping, of which [start, start + pages) is a part.
        mapped: (u64, usize),
    }

    impl Area {
        fn new(pages: u64) -> Area {
            Self::aligned(pages, PAGE_SIZE)
        }

        /// `pages` pages starting at a multiple of `align`.
        fn aligned(pages: u64, align: u64) -> Area {
            let len = (pages * PAGE_SIZE + align - PAGE_SIZE) as usize;
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
            assert_ne!(at, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
            Area {
                start: (at as u64).next_multiple_of(align),
                pages,
                mapped: (at as u64, len),
            }
        }

        fn page(&self, i: u64) -> u64 {
            assert!(i < self.pages);
            self.start + i * PAGE_SIZE
        }

        fn end(&self) -> u64 {
            self.start + self.pages * PAGE_SIZE
        }

        fn write(&self, i: u64) {
            // SAFETY: a page of this mapping, which is ours and read-write.
            unsafe { std::ptr::write_volatile(self.page(i) as *mut u8, 1) };
        }

        fn read(&self, i: u64) -> u8 {
            // SAFETY: a page of this mapping, which is ours and readable.
            unsafe { std::ptr::read_volatile(self.page(i) as *const u8) }
        }

        fn madvise(&self, first: u64, pages: u64, advice: i32) {
            // SAFETY: pages of this mapping, which is ours.
            let rc = unsafe {
                libc::madvise(
                    self.page(first) as *mut libc::c_void,
                    (pages * PAGE_SIZE) as usize,
                    advice,
                )
            };
            assert_eq!(rc, 0, "madvise: {}", io::Error::last_os_error());
        }

        /// Address ranges as page-index ranges.
        fn pages(&self, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
            let index = |a: u64| (a - self.start) / PAGE_SIZE;
            ranges.iter().map(|&(s, e)| (index(s), index(e))).collect()
        }
    }

    impl Drop for Area {
        fn drop(&mut self) {
            // SAFETY: unmaps only this mapping.
            unsafe { libc::munmap(self.mapped.0 as *mut libc::c_void, self.mapped.1) };
        }
    }

    /// A tracker of this test process, or None (and why) if the kernel cannot track writes.
    fn own_tracker() -> Option<WriteTracker> {
        if let Err(why) = support() {
            eprintln!("skipped: {why}");
            return None;
        }
        let fd = own_userfaultfd().expect("userfaultfd");
        Some(WriteTracker::new(std::process::id() as i32, fd).expect("WriteTracker::new"))
    }

    /// take_written over all of `a`, as page indices.
    fn written(t: &mut WriteTracker, a: &Area) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let found = t.take_written(a.start, a.end(), &mut out);
        assert_eq!(found.expect("take_written"), Written::Ranges);
        a.pages(&out)
    }

    fn resident(t: &mut WriteTracker, a: &Area) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        t.resident(a.start, a.end(), &mut out).expect("resident");
        a.pages(&out)
    }

    #[test]
    fn reports_exactly_the_pages_written() {
        let Some(mut t) = own_tracker() else { return };
        let a = Area::new(64);
        for i in [0, 1, 3, 20, 33] {
            a.write(i);
        }
        t.track(a.start, a.end()).expect("track");
        assert_eq!(written(&mut t, &a), []);
        for i in [3, 10, 11, 40] {
            a.write(i);
        }
        assert_eq!(written(&mut t, &a), [(3, 4), (10, 12), (40, 41)]);
        assert_eq!(written(&mut t, &a), [], "protected again");
        let populated = [(0, 2), (3, 4), (10, 12), (20, 21), (33, 34), (40, 41)];
        assert_eq!(resident(&mut t, &a), populated);

        // Reading untouched memory maps the zero page write-protected: not a write.
        assert_eq!(a.read(50), 0);
        assert_eq!(written(&mut t, &a), []);
        // A page emptied by MADV_DONTNEED changed (to zeros), and is no longer resident.
        a.madvise(20, 1, libc::MADV_DONTNEED);
        assert_eq!(written(&mut t, &a), [(20, 21)]);
        let data = [(0, 2), (3, 4), (10, 12), (33, 34), (40, 41)];
        let mut out = Vec::new();
        t.resident_data(a.start, a.end(), &mut out)
            .expect("resident_data");
        assert_eq!(a.pages(&out), data);
        let mut with_zero_page = data.to_vec();
        with_zero_page.push((50, 51));
        assert_eq!(resident(&mut t, &a), with_zero_page);
        // A part of the range: only what is inside it.
        a.write(0);
        a.write(12);
        let mut out = Vec::new();
        let found = t.take_written(a.page(8), a.page(16), &mut out);
        assert_eq!(found.expect("take_written"), Written::Ranges);
        assert_eq!(a.pages(&out), [(12, 13)]);
        assert_eq!(written(&mut t, &a), [(0, 1)]);

        // A fresh mapping over pages 44..52 is not tracked, and is reported as such; the
        // writes around it are reported as usual.
        // SAFETY: MAP_FIXED over pages of this test's own mapping.
        let at = unsafe {
            libc::mmap(
                a.page(44) as *mut libc::c_void,
                (8 * PAGE_SIZE) as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        assert_eq!(at as u64, a.page(44));
        for i in [5, 46, 60] {
            a.write(i);
        }
        let mut out = vec![(1, 2)];
        let found = t.take_written(a.start, a.end(), &mut out);
        assert_eq!(found.expect("take_written"), Written::NotTracked);
        assert_eq!(out, [(1, 2)], "nothing appended");
        // Nothing was taken either: the parts around it still have their writes.
        let mut out = Vec::new();
        for (s, e) in [(a.start, a.page(44)), (a.page(52), a.end())] {
            let found = t.take_written(s, e, &mut out);
            assert_eq!(found.expect("take_written"), Written::Ranges);
        }
        assert_eq!(a.pages(&out), [(5, 6), (60, 61)]);
        t.track(a.page(44), a.page(52))
            .expect("track the new mapping");
        assert_eq!(written(&mut t, &a), []);
        a.write(46);
        assert_eq!(written(&mut t, &a), [(46, 47)]);
        // Tracking a tracked range again is harmless (and protects it again).
        a.write(7);
        t.track(a.start, a.end()).expect("track again");
        assert_eq!(written(&mut t, &a), []);
        a.write(8);
        assert_eq!(written(&mut t, &a), [(8, 9)]);

        // Closing the userfaultfd takes the protection away: no uffd-wp bits, no markers.
        drop(t);
        let pagemap = crate::memory::Pagemap::open(std::process::id() as i32).expect("pagemap");
        let mut entries = Vec::new();
        pagemap
            .read(a.start, a.end(), &mut entries)
            .expect("read pagemap");
        const PM_UFFD_WP: u64 = 1 << 57;
        let protected: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i] & PM_UFFD_WP != 0)
            .collect();
        assert_eq!(protected, [] as [usize; 0]);
    }

    #[test]
    fn scans_past_a_full_output_vector() {
        let Some(mut t) = own_tracker() else { return };
        // Every other page of 4 * 512: four times what one PAGEMAP_SCAN call returns.
        let regions = 4 * REGIONS_PER_SCAN as u64;
        let a = Area::new(2 * regions + 1);
        t.track(a.start, a.end()).expect("track");
        let odd: Vec<(u64, u64)> = (0..regions).map(|i| (2 * i + 1, 2 * i + 2)).collect();
        for &(i, _) in &odd {
            a.write(i);
        }
        assert_eq!(written(&mut t, &a), odd);
        assert_eq!(resident(&mut t, &a), odd);
        assert_eq!(written(&mut t, &a), []);
    }

    #[test]
    fn a_write_to_a_huge_page_reports_that_page_only() {
        let Some(mut t) = own_tracker() else { return };
        let huge = 512;
        let a = Area::aligned(2 * huge, huge * PAGE_SIZE);
        a.madvise(0, 2 * huge, libc::MADV_HUGEPAGE);
        for i in 0..2 * huge {
            a.write(i);
        }
        let mut regions = [PageRegion::default(); 4];
        let mut arg = scan_arg(a.start, a.end(), &mut regions);
        arg.category_anyof_mask = 1 << 6; // PAGE_IS_HUGE
        arg.return_mask = 1 << 6;
        // SAFETY: PAGEMAP_SCAN takes a struct pm_scan_arg; vec points at `regions`.
        let n = unsafe { ioctl(&t.pagemap, PAGEMAP_SCAN, &mut arg) }.expect("PAGEMAP_SCAN");
        eprintln!("huge pages in use: {}", n > 0);
        t.track(a.start, a.end()).expect("track");
        assert_eq!(written(&mut t, &a), []);
        // A write to a write-protected huge page splits it (async mode): 4 KiB granularity.
        a.write(7);
        a.write(600);
        let mut out = Vec::new();
        let found = t.take_written(a.start, a.page(300), &mut out);
        assert_eq!(found.expect("take_written"), Written::Ranges);
        assert_eq!(a.pages(&out), [(7, 8)]);
        assert_eq!(written(&mut t, &a), [(600, 601)]);
        a.write(8);
        assert_eq!(written(&mut t, &a), [(8, 9)]);
    }

    /// Asks the child of [`child_main`] to exit.
    const EXIT: u8 = 0xff;

    /// A child that, for each byte it reads from `cmd[0]`, writes to that page of `area` and
    /// answers on `ack[1]`; it exits on [`EXIT`] or when the parent's end is closed.
    /// Async-signal-safe calls only.
    fn child_main(cmd: [i32; 2], ack: [i32; 2], area: u64) -> ! {
        // The child's copies of the parent's ends, so that it sees EOF.
        close(&[cmd[1], ack[0]]);
        let mut byte = 0u8;
        loop {
            // SAFETY: reads one byte into a local.
            let n = unsafe { libc::read(cmd[0], (&mut byte as *mut u8).cast(), 1) };
            if n == 1 && byte != EXIT {
                // SAFETY: a page of the area the parent mapped before forking.
                unsafe { std::ptr::write_volatile((area + byte as u64 * PAGE_SIZE) as *mut u8, 1) };
                // SAFETY: writes one byte from a local.
                unsafe { libc::write(ack[1], (&byte as *const u8).cast(), 1) };
            } else if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // SAFETY: ends the forked child without running the parent's exit handlers.
                unsafe { libc::_exit(0) };
            }
        }
    }

    fn close(fds: &[i32]) {
        for &fd in fds {
            // SAFETY: a pipe end this test made and no longer uses.
            unsafe { libc::close(fd) };
        }
    }

    fn fds(pid: i32) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("read /proc/PID/fd")
            .map(|e| {
                e.expect("fd entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_injected_userfaultfd_tracks_another_process() {
        if let Err(why) = support() {
            eprintln!("skipped: {why}");
            return;
        }
        let a = Area::new(16);
        let (mut cmd, mut ack) = ([0i32; 2], [0i32; 2]);
        // SAFETY: each array has room for the two descriptors pipe2 returns.
        let piped = unsafe {
            libc::pipe2(cmd.as_mut_ptr(), libc::O_CLOEXEC) == 0
                && libc::pipe2(ack.as_mut_ptr(), libc::O_CLOEXEC) == 0
        };
        assert!(piped, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: the child only makes async-signal-safe calls and never returns.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", io::Error::last_os_error());
        if child == 0 {
            child_main(cmd, ack, a.start);
        }
        close(&[cmd[0], ack[1]]);
        let ask = |page: u8| {
            let mut back = 0u8;
            // SAFETY: one-byte transfers from and to locals over our own pipes.
            let ok = unsafe {
                libc::write(cmd[1], (&page as *const u8).cast(), 1) == 1
                    && libc::read(ack[0], (&mut back as *mut u8).cast(), 1) == 1
            };
            assert!(ok && back == page, "child did not answer");
        };
        ask(1); // it runs, and page 1 is populated before tracking

        let before = fds(child);
        ptrace::seize_and_stop(child, libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL)
            .expect("seize");
        let vdso = procfs::read_maps(child)
            .expect("maps")
            .into_iter()
            .find(|m| m.name == "[vdso]")
            .expect("[vdso]");
        // SAFETY: the vDSO is mapped readable in this process too (the child is its fork).
        let text =
            unsafe { std::slice::from_raw_parts(vdso.start as *const u8, vdso.len() as usize) };
        let at = text
            .windows(2)
            .position(|w| w == [0x0f, 0x05])
            .expect("syscall in [vdso]");
        let regs = ptrace::get_regs(child).expect("regs");
        let mask = ptrace::get_sigmask(child).expect("sigmask");
        let mut inj =
            Injector::putting_back(child, vdso.start + at as u64, regs, mask).expect("injector");
        let uffd = inject_userfaultfd(&mut inj, child).expect("inject_userfaultfd");
        assert_eq!(fds(child), before, "the child's fd table is as it was");
        ptrace::detach(child, 0).expect("detach");

        let mut t = WriteTracker::new(child, uffd).expect("WriteTracker::new");
        t.track(a.start, a.end()).expect("track");
        assert_eq!(written(&mut t, &a), []);
        ask(1);
        ask(9);
        assert_eq!(written(&mut t, &a), [(1, 2), (9, 10)]);
        assert_eq!(written(&mut t, &a), []);
        assert_eq!(resident(&mut t, &a), [(1, 2), (9, 10)]);

        // SAFETY: sends one byte from a local.
        unsafe { libc::write(cmd[1], (&EXIT as *const u8).cast(), 1) };
        close(&[cmd[1], ack[0]]);
        let mut status = 0;
        // SAFETY: waits for our own child, status into a local.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
}

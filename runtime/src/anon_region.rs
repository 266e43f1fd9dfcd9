//! Private anonymous memory of this process that is meant to end up in another: a region
//! filled here (a migration's pre-copy rounds write a process's pages into it) and inherited
//! by the processes this one forks, where mremap moves it into place without copying a page.
//!
//! Regions are placed from [`REGION_BASE`] up, far from where the kernel puts mappings by
//! default (just below the stack, at 0x7f.. on x86_64) and where programs load (0x55..,
//! 0x56..): a new process rarely has anything of its own there, so its region can stay
//! mapped while its own mappings are made around it.

use crate::error::{Result, RuntimeError};
use crate::PAGE_SIZE;

/// Where regions are placed from: 16 TiB.
pub const REGION_BASE: u64 = 0x1000_0000_0000;
/// Where they may end: 64 TiB.
const REGION_LIMIT: u64 = 0x4000_0000_0000;
/// What a page-table page (a PMD entry) covers, and a transparent huge page: regions are
/// placed at multiples of it plus their offset.
pub const PMD_SIZE: u64 = 2 << 20;
/// Tries before giving up on finding a free place.
const PLACEMENT_TRIES: u32 = 64;

/// A private anonymous mapping owned by this value (unmapped on drop), readable and
/// writable, zero until written.
#[derive(Debug)]
pub struct AnonRegion {
    addr: u64,
    len: u64,
}

/// The next address a region is tried at.
static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(REGION_BASE);

impl AnonRegion {
    /// A new region of `len` bytes (a multiple of the page size), placed from
    /// [`REGION_BASE`] up, with free space between it and the region before.
    pub fn new(len: u64) -> Result<Self> {
        Self::like(len, 0)
    }

    /// Like [`AnonRegion::new`], at an address congruent to `like` modulo 2 MiB: moved
    /// (mremap) to `like`, its page tables move whole instead of entry by entry.
    pub fn like(len: u64, like: u64) -> Result<Self> {
        use std::sync::atomic::Ordering;
        let target = || format!("{len} bytes of anonymous memory");
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) || len > REGION_LIMIT - REGION_BASE {
            return Err(RuntimeError::Unsupported(format!(
                "a region of {len} bytes (not a positive multiple of the page size within {} TiB)",
                (REGION_LIMIT - REGION_BASE) >> 40
            )));
        }
        let offset = like % PMD_SIZE;
        for _ in 0..PLACEMENT_TRIES {
            let step = (len + offset + PAGE_SIZE).next_multiple_of(PMD_SIZE);
            let at = NEXT.fetch_add(step, Ordering::Relaxed) + offset;
            if at.checked_add(len).is_none_or(|e| e > REGION_LIMIT) {
                // Wrap around once the space is used up; freed regions left holes.
                let _ = NEXT.compare_exchange(
                    at - offset + step,
                    REGION_BASE,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                continue;
            }
            // SAFETY: a new anonymous mapping at an address nothing of ours uses
            // (MAP_FIXED_NOREPLACE fails rather than replace a mapping); no pointers in.
            let got = unsafe {
                libc::mmap(
                    at as *mut libc::c_void,
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            if got == libc::MAP_FAILED {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EEXIST) {
                    continue;
                }
                return Err(RuntimeError::sys("mmap", target(), err));
            }
            if got as u64 != at {
                // A kernel without MAP_FIXED_NOREPLACE treats it as a hint.
                // SAFETY: unmaps the mapping just made, which nothing else refers to.
                unsafe { libc::munmap(got, len as usize) };
                continue;
            }
            return Ok(AnonRegion { addr: at, len });
        }
        Err(RuntimeError::Unsupported(format!(
            "no free place for {} from {REGION_BASE:#x} up",
            target()
        )))
    }

    /// Its address in this process.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is ours, readable, `len` bytes long and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len as usize) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, writable, and borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len as usize) }
    }

    /// Makes bytes [off, off + len) zero again, their memory given back (MADV_DONTNEED);
    /// both page-aligned, inside the region.
    pub fn zero(&mut self, off: u64, len: u64) -> Result<()> {
        let inside = off.is_multiple_of(PAGE_SIZE)
            && len.is_multiple_of(PAGE_SIZE)
            && off.checked_add(len).is_some_and(|e| e <= self.len);
        if !inside {
            return Err(RuntimeError::Unsupported(format!(
                "zeroing {len} bytes at offset {off} of a {}-byte region",
                self.len
            )));
        }
        if len == 0 {
            return Ok(());
        }
        // SAFETY: the range lies inside our own mapping; MADV_DONTNEED on private anonymous
        // memory makes it read as zero, which every user of the slice may see.
        let rc = unsafe {
            libc::madvise(
                (self.addr + off) as *mut libc::c_void,
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(RuntimeError::last_os(
                "madvise(MADV_DONTNEED)",
                format!("{len} bytes at {:#x}", self.addr + off),
            ));
        }
        Ok(())
    }
}

impl AnonRegion {
    /// Makes the 2 MiB block at offset `off` (2 MiB-aligned in this process's address
    /// space, inside the region) one transparent huge page (MADV_COLLAPSE, 6.1+), if the
    /// kernel can: a process that inherits the region copies, moves and charges it as one
    /// entry instead of 512. False if it could not (nothing changed).
    pub fn collapse(&mut self, off: u64) -> bool {
        let at = self.addr + off;
        let inside = off.checked_add(PMD_SIZE).is_some_and(|e| e <= self.len);
        if !inside || !at.is_multiple_of(PMD_SIZE) || !thp_enabled() {
            return false;
        }
        // SAFETY: the block lies inside our own mapping; MADV_COLLAPSE changes how it is
        // backed, never what it holds.
        unsafe { libc::madvise(at as *mut libc::c_void, PMD_SIZE as usize, MADV_COLLAPSE) == 0 }
    }

    /// The 2 MiB blocks (offsets into the region) that lie whole inside it, aligned.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        let first = self.addr.next_multiple_of(PMD_SIZE) - self.addr;
        (first..self.len)
            .step_by(PMD_SIZE as usize)
            .filter(|o| o + PMD_SIZE <= self.len)
    }
}

/// madvise(2) MADV_COLLAPSE (6.1+).
const MADV_COLLAPSE: i32 = 25;

/// Whether transparent huge pages are not turned off on this host ("never"): only then are
/// regions collapsed.
fn thp_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| !s.contains("[never]"))
    })
}

impl Drop for AnonRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps our own mapping; no slice of it outlives self.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_placed_apart_from_the_base_up_and_zero_again_on_request() {
        let mut a = AnonRegion::new(4 * PAGE_SIZE).expect("a");
        let b = AnonRegion::new(PAGE_SIZE).expect("b");
        assert!(a.addr() >= REGION_BASE && b.addr() >= REGION_BASE);
        let c = AnonRegion::like(PAGE_SIZE, 0x7f12_3456_7000).expect("c");
        assert_eq!(c.addr() % PMD_SIZE, 0x7f12_3456_7000 % PMD_SIZE);
        assert!(a.addr() + a.len() < b.addr() || b.addr() + b.len() < a.addr());
        a.as_mut_slice()[PAGE_SIZE as usize] = 7;
        a.as_mut_slice()[2 * PAGE_SIZE as usize] = 9;
        a.zero(PAGE_SIZE, PAGE_SIZE).expect("zero");
        assert_eq!(a.as_slice()[PAGE_SIZE as usize], 0);
        assert_eq!(a.as_slice()[2 * PAGE_SIZE as usize], 9);
        assert!(a.zero(PAGE_SIZE, 4 * PAGE_SIZE).is_err(), "past its end");
        assert!(AnonRegion::new(100).is_err(), "not whole pages");
    }
}

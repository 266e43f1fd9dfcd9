//! Shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS), created once for the whole tree.
//!
//! Each object is made the way the kernel makes it (an anonymous shared mapping, so it is
//! again "/dev/zero (deleted)" in /proc/PID/maps), filled from the image, and held open
//! through /proc/self/map_files. Every process that mapped it maps that same fd at its old
//! place and offset, so the memory is shared again exactly as it was.

use crate::error::RestoreError;
use stasis_image::proto::{self, RunKind, SpaceKind, VmaKind};
use stasis_image::Image;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Largest shared memory object accepted (bounds the mapping made for it).
const MAX_OBJECT: u64 = 1 << 40;

/// The recreated objects: shmem_id → an fd of the object.
#[derive(Default)]
pub struct SharedObjects {
    pub fds: BTreeMap<u64, OwnedFd>,
}

/// Creates every shared anonymous object the processes map, with its pages.
pub fn recreate(image: &Image, procs: &[&proto::Process]) -> Result<SharedObjects, RestoreError> {
    let mut sizes: BTreeMap<u64, u64> = BTreeMap::new();
    for v in procs
        .iter()
        .flat_map(|p| p.vmas.iter())
        .filter(|v| v.kind() == VmaKind::AnonShared)
    {
        let end = v
            .pgoff
            .checked_add(v.end.saturating_sub(v.start))
            .filter(|e| *e <= MAX_OBJECT && v.pgoff.is_multiple_of(4096))
            .ok_or_else(|| {
                RestoreError::Invalid(format!(
                    "shared memory object {} mapped at offset {:#x} is implausible",
                    v.shmem_id, v.pgoff
                ))
            })?;
        let e = sizes.entry(v.shmem_id).or_default();
        *e = (*e).max(end);
    }
    let mut out = SharedObjects::default();
    for (&id, &size) in &sizes {
        let (fd, map) = create(id, size)?;
        let result = fill(image, id, size, map);
        // SAFETY: map is our own mapping of `size` bytes made by create().
        unsafe { libc::munmap(map.cast(), size as usize) };
        result?;
        out.fds.insert(id, fd);
    }
    Ok(out)
}

/// Maps a new shared anonymous object and opens it through map_files.
fn create(id: u64, size: u64) -> Result<(OwnedFd, *mut u8), RestoreError> {
    let what = |op: &str, e: std::io::Error| {
        RestoreError::Unsupported(format!("recreating shared memory object {id}: {op}: {e}"))
    };
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(what("mmap", std::io::Error::last_os_error()));
    }
    let start = map as u64;
    let path = format!("/proc/self/map_files/{:x}-{:x}", start, start + size);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| {
            // SAFETY: the mapping made above.
            unsafe { libc::munmap(map, size as usize) };
            what(&format!("open {path}"), e)
        })?;
    // SAFETY: into_raw_fd hands over ownership of the open fd.
    let fd = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(file)) };
    Ok((fd, map.cast()))
}

/// Copies the object's pages from the image into `map` (`size` bytes).
fn fill(image: &Image, id: u64, size: u64, map: *mut u8) -> Result<(), RestoreError> {
    for chunk in image
        .chunks()
        .iter()
        .filter(|c| c.space == SpaceKind::SharedMemory && c.space_id == id)
    {
        let data = image.chunk_data(chunk)?;
        let mut at = 0usize;
        for run in &chunk.runs {
            if run.kind() != RunKind::Data {
                continue;
            }
            let len = run.pages.saturating_mul(4096);
            let fits = run.vaddr.checked_add(len).is_some_and(|e| e <= size);
            let bytes = fits.then(|| data.get(at..at + len as usize)).flatten();
            match bytes {
                Some(bytes) => {
                    // SAFETY: [vaddr, vaddr+len) lies inside the `size`-byte mapping (checked),
                    // and `bytes` is a distinct buffer of exactly len bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            bytes.as_ptr(),
                            map.add(run.vaddr as usize),
                            len as usize,
                        )
                    };
                }
                None => {
                    return Err(RestoreError::Invalid(format!(
                        "pages at offset {:#x} of shared memory object {id} lie outside it",
                        run.vaddr
                    )))
                }
            }
            at += len as usize;
        }
    }
    Ok(())
}

impl SharedObjects {
    /// The fd of object `id`.
    pub fn fd(&self, id: u64) -> Result<i32, RestoreError> {
        self.fds
            .get(&id)
            .map(|f| f.as_raw_fd())
            .ok_or_else(|| RestoreError::Invalid(format!("shared memory object {id} is unknown")))
    }
}

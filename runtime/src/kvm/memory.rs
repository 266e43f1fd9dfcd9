//! Guest memory: one memfd mapped MAP_SHARED into the VMM and registered with KVM as slot 0
//! at guest-physical address 0. Being a file, a snapshot can read it (or its mapping) while
//! the guest is paused, and a restore can map an image's page data MAP_PRIVATE instead.

use super::KvmError;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The guest's RAM, mapped in the VMM.
pub struct GuestMemory {
    fd: OwnedFd,
    addr: *mut u8,
    size: u64,
}

// SAFETY: the mapping is owned by this value and only reached through its methods, which
// copy with bounds checks; the guest writing to it concurrently is what guest RAM is.
unsafe impl Send for GuestMemory {}
// SAFETY: as above: shared access only copies bytes in or out of the mapping.
unsafe impl Sync for GuestMemory {}

/// A fresh memfd of `size` zero bytes (a positive multiple of 2 MiB), named as guest memory
/// is: the memory of a new VM, or one a migration receives before its VM is built (see
/// [`GuestMemory::adopt`]).
pub fn memory_file(vm: &str, size: u64) -> Result<std::fs::File, KvmError> {
    if size == 0 || !size.is_multiple_of(2 << 20) {
        return Err(KvmError::invalid(
            vm,
            format!("memory size {size} is not a positive multiple of 2 MiB"),
        ));
    }
    let name = c"stasis-guest-ram";
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(KvmError::sys(
            vm,
            "memfd_create",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: memfd_create just returned this fd and nothing else owns it.
    let file = unsafe { std::fs::File::from_raw_fd(raw) };
    file.set_len(size)
        .map_err(|e| KvmError::sys(vm, format!("ftruncate of guest memory to {size} bytes"), e))?;
    Ok(file)
}

impl GuestMemory {
    /// Zeroed memory of `size` bytes (a multiple of 2 MiB) in a fresh memfd.
    pub fn new(vm: &str, size: u64) -> Result<Self, KvmError> {
        let fd = OwnedFd::from(memory_file(vm, size)?);
        let maplen = usize::try_from(size)
            .map_err(|_| KvmError::invalid(vm, format!("memory size {size} is too large")))?;
        // SAFETY: a new shared mapping of the whole memfd at an address the kernel picks; the
        // result is checked against MAP_FAILED.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                maplen,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(KvmError::sys(
                vm,
                format!("mmap of {size} bytes of guest memory"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(GuestMemory {
            fd,
            addr: addr.cast(),
            size,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the memory is mapped in the VMM (for KVM_SET_USER_MEMORY_REGION).
    pub fn host_addr(&self) -> u64 {
        self.addr as u64
    }

    /// The memfd holding the memory.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    fn range(&self, gpa: u64, len: usize) -> Option<usize> {
        let end = gpa.checked_add(len as u64)?;
        (end <= self.size).then_some(gpa as usize)
    }

    /// Maps `len` bytes of `file` at `offset` over guest memory at `gpa`, MAP_PRIVATE: the
    /// guest reads the file's pages without a copy and its writes stay private (a restore
    /// from an image's raw page data). Before any vCPU runs.
    pub fn map_private(
        &self,
        vm: &str,
        gpa: u64,
        file: &impl AsRawFd,
        offset: u64,
        len: u64,
    ) -> Result<(), KvmError> {
        let bad = || {
            KvmError::invalid(
                vm,
                format!("mapping {len} bytes at guest address {gpa:#x}: outside guest memory"),
            )
        };
        let n = usize::try_from(len).map_err(|_| bad())?;
        let off = self.range(gpa, n).ok_or_else(bad)?;
        if !gpa.is_multiple_of(4096) || !offset.is_multiple_of(4096) || n == 0 {
            return Err(bad());
        }
        let foff = libc::off_t::try_from(offset).map_err(|_| bad())?;
        // SAFETY: MAP_FIXED replaces pages strictly inside this GuestMemory's own mapping
        // (range checked above), which only this value owns; the file is read-only mapped
        // private, so writes never reach it. The result is checked.
        let addr = unsafe {
            libc::mmap(
                self.addr.add(off).cast(),
                n,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                foff,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(KvmError::sys(
                vm,
                format!("mmap of {len} bytes of the image at {offset} over guest {gpa:#x}"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Makes `file` (exactly the size of guest memory) the guest's memory: mapped shared
    /// over the whole of it, so the guest runs on the file's pages without a copy and
    /// writes into them (memory a migration received page by page, in a memfd). Before any
    /// vCPU runs.
    pub fn adopt(&self, vm: &str, file: &std::fs::File) -> Result<(), KvmError> {
        let len = file
            .metadata()
            .map_err(|e| KvmError::sys(vm, "fstat of the memory to adopt", e))?
            .len();
        if len != self.size {
            return Err(KvmError::invalid(
                vm,
                format!(
                    "the memory to adopt is {len} bytes; guest memory is {} bytes",
                    self.size
                ),
            ));
        }
        let n = usize::try_from(len)
            .map_err(|_| KvmError::invalid(vm, format!("memory size {len} is too large")))?;
        // SAFETY: MAP_FIXED replaces exactly this GuestMemory's own mapping (same address
        // and length), which only this value owns; the file is at least that long (checked
        // above). The result is checked.
        let addr = unsafe {
            libc::mmap(
                self.addr.cast(),
                n,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(KvmError::sys(
                vm,
                format!("mmap of {len} bytes of received guest memory"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`; false if it does not fit.
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        let Some(off) = self.range(gpa, data.len()) else {
            return false;
        };
        // SAFETY: off + data.len() is within the mapping (checked above), which stays mapped
        // while self lives; the source is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr.add(off), data.len()) };
        true
    }

    /// Copies guest memory at `gpa` into `buf`; false if it does not fit.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(off) = self.range(gpa, buf.len()) else {
            return false;
        };
        // SAFETY: as in write(), with source and destination swapped.
        unsafe { std::ptr::copy_nonoverlapping(self.addr.add(off), buf.as_mut_ptr(), buf.len()) };
        true
    }

    /// Writes a little-endian u64; false if it does not fit.
    pub fn write_u64(&self, gpa: u64, v: u64) -> bool {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Reads a little-endian u64, if it is inside guest memory.
    pub fn read_u64(&self, gpa: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b).then(|| u64::from_le_bytes(b))
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in new(); nothing refers to it after
        // drop (KVM's memory slot is gone with the VM fd, dropped before this).
        unsafe { libc::munmap(self.addr.cast(), self.size as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds() {
        let m = GuestMemory::new("t", 2 << 20).expect("memfd");
        assert!(m.write_u64(0, 7));
        assert_eq!(m.read_u64(0), Some(7));
        assert!(m.write_u64((2 << 20) - 8, 9));
        assert!(!m.write_u64((2 << 20) - 4, 9));
        assert_eq!(m.read_u64(u64::MAX - 2), None);
        assert!(GuestMemory::new("t", 4096).is_err());
    }
}

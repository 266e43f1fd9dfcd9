//! Where a Linux guest's pieces go in guest memory, and writing them there.
//!
//! | address    | what |
//! |------------|------|
//! | 0x1000     | boot GDT (code 0x10, data 0x18, TSS 0x20, as the 64-bit boot protocol asks) |
//! | 0x2000     | PML4; 0x3000 PDPT; 0x4000.. page directories (2 MiB pages, identity) |
//! | 0x8ff0     | initial stack top |
//! | 0x9000     | zero page (struct boot_params) |
//! | 0x20000    | command line |
//! | 0x100000   | the protected-mode kernel (it decompresses itself at or above pref_address) |
//! | top        | the initrd, page aligned, below the kernel's initrd_addr_max |

use super::boot_params;
use super::bzimage::{BzImage, SetupHeader, ENTRY_64_OFFSET};
use super::tables;
use super::BootError;
use crate::kvm::memory::GuestMemory;

pub const ZERO_PAGE_ADDR: u64 = 0x9000;
pub const STACK_TOP: u64 = 0x8ff0;
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room for the command line and its NUL (up to the EBDA's usual start is far more).
pub const CMDLINE_ROOM: usize = 0x10000;
pub const KERNEL_ADDR: u64 = 0x10_0000;
/// Guest RAM stops below the 32-bit MMIO hole (IOAPIC 0xfec00000, local APIC 0xfee00000).
pub const MAX_MEMORY: u64 = 3 << 30;
const PAGE: u64 = 4096;

/// Where everything goes, decided before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub mem_size: u64,
    /// Where the protected-mode kernel is loaded.
    pub load: u64,
    pub kernel_len: u64,
    /// Where it decompresses itself and runs.
    pub run: u64,
    /// End of all memory the kernel needs (image and decompression).
    pub kernel_end: u64,
    /// startup_64.
    pub entry: u64,
    /// The initrd's address and size.
    pub initrd: Option<(u64, u64)>,
    pub cmdline_len: usize,
}

/// Plans the layout of a kernel of `kernel_len` bytes with header `h` in `mem_size` bytes.
pub fn plan(
    h: &SetupHeader,
    kernel_len: u64,
    mem_size: u64,
    initrd_len: Option<u64>,
    cmdline_len: usize,
) -> Result<Layout, BootError> {
    if mem_size > MAX_MEMORY {
        return Err(BootError::MemoryTooLarge(mem_size));
    }
    let max = usize::try_from(h.cmdline_size)
        .unwrap_or(usize::MAX)
        .min(CMDLINE_ROOM - 1);
    if cmdline_len > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline_len,
            max,
        });
    }
    let load = KERNEL_ADDR;
    let run = h.run_address(load);
    let kernel_end = (load + kernel_len).max(run.saturating_add(u64::from(h.init_size)));
    if kernel_end > mem_size {
        return Err(BootError::KernelTooBig {
            need: kernel_end,
            have: mem_size,
        });
    }
    let initrd = match initrd_len {
        None => None,
        Some(size) => {
            let high = (u64::from(h.initrd_addr_max) + 1).min(mem_size);
            let low = kernel_end.div_ceil(PAGE) * PAGE;
            let addr = high.checked_sub(size).map(|a| a / PAGE * PAGE);
            match addr {
                Some(a) if a >= low => Some((a, size)),
                _ => return Err(BootError::InitrdTooBig { size, low, high }),
            }
        }
    };
    Ok(Layout {
        mem_size,
        load,
        kernel_len,
        run,
        kernel_end,
        entry: load + ENTRY_64_OFFSET,
        initrd,
        cmdline_len,
    })
}

fn put(mem: &GuestMemory, gpa: u64, bytes: &[u8], what: &'static str) -> Result<(), BootError> {
    if mem.write(gpa, bytes) {
        Ok(())
    } else {
        Err(BootError::Write(what))
    }
}

/// Writes the kernel, initrd, command line, zero page, GDT and page tables as `l` says.
pub fn write(
    mem: &GuestMemory,
    img: &BzImage<'_>,
    l: &Layout,
    initrd: Option<&[u8]>,
    cmdline: &str,
) -> Result<(), BootError> {
    if l.mem_size != mem.size() || l.cmdline_len != cmdline.len() {
        return Err(BootError::Write("layout (planned for another VM)"));
    }
    put(mem, l.load, img.kernel, "kernel")?;
    if let (Some((addr, _)), Some(bytes)) = (l.initrd, initrd) {
        put(mem, addr, bytes, "initrd")?;
    }
    let mut line = cmdline.as_bytes().to_vec();
    line.push(0);
    put(mem, CMDLINE_ADDR, &line, "command line")?;
    let zp = boot_params::zero_page(img.setup_header, l);
    put(mem, ZERO_PAGE_ADDR, &zp, "zero page")?;
    let gdt: Vec<u8> = tables::gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    put(mem, tables::GDT_ADDR, &gdt, "GDT")?;
    for (gpa, entry) in tables::page_tables(l.mem_size) {
        put(mem, gpa, &entry.to_le_bytes(), "page tables")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::bzimage::tests::synthetic;
    use super::*;

    fn header() -> SetupHeader {
        SetupHeader::parse(&synthetic(4096)).expect("header")
    }

    #[test]
    fn plans_kernel_and_initrd() {
        let h = header();
        let l = plan(&h, 4096, 256 << 20, Some(10_000), 20).expect("plan");
        assert_eq!(l.load, 0x10_0000);
        assert_eq!(l.entry, 0x10_0200);
        assert_eq!(l.run, 0x100_0000);
        assert_eq!(l.kernel_end, 0x300_0000, "pref_address + init_size");
        let (addr, size) = l.initrd.expect("initrd");
        assert_eq!(size, 10_000);
        assert_eq!(addr % 4096, 0);
        assert!(
            addr + size <= 256 << 20 && addr + size + 4096 > 256 << 20,
            "{addr:#x}"
        );
        // initrd_addr_max below the top of memory wins.
        let mut low = h;
        low.initrd_addr_max = 0x0fff_ffff;
        let l = plan(&low, 4096, 1 << 30, Some(4096), 0).expect("plan");
        assert_eq!(l.initrd, Some((0x1000_0000 - 4096, 4096)));
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let h = header();
        assert_eq!(
            plan(&h, 4096, 32 << 20, None, 0),
            Err(BootError::KernelTooBig {
                need: 0x300_0000,
                have: 32 << 20
            })
        );
        assert!(matches!(
            plan(&h, 4096, 64 << 20, Some(20 << 20), 0),
            Err(BootError::InitrdTooBig { .. })
        ));
        assert_eq!(
            plan(&h, 4096, 64 << 20, None, 2048),
            Err(BootError::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        );
        assert!(plan(&h, 4096, 64 << 20, None, 2047).is_ok());
        assert_eq!(
            plan(&h, 4096, 4 << 30, None, 0),
            Err(BootError::MemoryTooLarge(4 << 30))
        );
        let mut fixed = h;
        fixed.relocatable = false;
        fixed.pref_address = 0x4000_0000;
        assert!(matches!(
            plan(&fixed, 4096, 512 << 20, None, 0),
            Err(BootError::KernelTooBig { .. })
        ));
    }

    #[test]
    fn writes_everything_where_planned() {
        let b = synthetic(8192);
        let img = BzImage::parse(&b).expect("parse");
        let mem = GuestMemory::new("t", 64 << 20).expect("memfd");
        let l = plan(&img.header, 8192, mem.size(), Some(5), 13).expect("plan");
        write(&mem, &img, &l, Some(b"hello"), "console=ttyS0").expect("write");
        let mut k = [0u8; 1];
        assert!(mem.read(l.load, &mut k));
        assert_eq!(k[0], 0xaa);
        let (addr, _) = l.initrd.expect("initrd");
        let mut i = [0u8; 5];
        assert!(mem.read(addr, &mut i));
        assert_eq!(&i, b"hello");
        let mut c = [0u8; 14];
        assert!(mem.read(CMDLINE_ADDR, &mut c));
        assert_eq!(&c, b"console=ttyS0\0");
        let mut magic = [0u8; 4];
        assert!(mem.read(ZERO_PAGE_ADDR + 0x202, &mut magic));
        assert_eq!(&magic, b"HdrS");
        assert_eq!(mem.read_u64(tables::PML4_ADDR), Some(tables::PDPT_ADDR | 3));
        let other = plan(&img.header, 8192, 128 << 20, None, 13).expect("plan");
        assert!(write(&mem, &img, &other, None, "console=ttyS0").is_err());
    }
}

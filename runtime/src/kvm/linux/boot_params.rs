//! The zero page (struct boot_params, arch/x86/include/uapi/asm/bootparam.h) a 64-bit
//! kernel finds at RSI: a copy of its setup header with the loader's fields filled in, and
//! the E820 memory map.

use super::bzimage::HEADER_START;
use super::layout::{Layout, CMDLINE_ADDR};

/// E820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;
/// End of conventional low memory: the EBDA starts here on a PC.
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// Start of high memory.
pub const HIGH_RAM_START: u64 = 0x10_0000;

const E820_ENTRIES: usize = 0x1e8;
const TYPE_OF_LOADER: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21c;
const CMD_LINE_PTR: usize = 0x228;
const E820_TABLE: usize = 0x2d0;
const E820_MAX: usize = 128;
/// loadflags: the protected-mode kernel is loaded at 1 MiB or above.
const LOADED_HIGH: u8 = 0x01;
/// A boot loader without an assigned ID.
const LOADER_UNDEFINED: u8 = 0xff;

/// One entry of the E820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map of a VM with `mem_size` bytes: low RAM, the EBDA/VGA/BIOS hole, RAM
/// from 1 MiB up.
pub fn e820(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: LOW_RAM_END,
            kind: E820_RAM,
        },
        E820Entry {
            addr: LOW_RAM_END,
            size: HIGH_RAM_START - LOW_RAM_END,
            kind: E820_RESERVED,
        },
    ];
    if mem_size > HIGH_RAM_START {
        map.push(E820Entry {
            addr: HIGH_RAM_START,
            size: mem_size - HIGH_RAM_START,
            kind: E820_RAM,
        });
    }
    map
}

fn put_u32(zp: &mut [u8], off: usize, v: u32) {
    zp[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// The 4 KiB zero page for a kernel whose setup header is `setup_header` (file bytes from
/// 0x1f1 to its end), laid out as `l` says.
pub fn zero_page(setup_header: &[u8], l: &Layout) -> Vec<u8> {
    let mut zp = vec![0u8; 4096];
    let n = setup_header.len().min(E820_TABLE - HEADER_START);
    zp[HEADER_START..HEADER_START + n].copy_from_slice(&setup_header[..n]);
    zp[TYPE_OF_LOADER] = LOADER_UNDEFINED;
    zp[LOADFLAGS] |= LOADED_HIGH;
    // Every address is below 4 GiB (MAX_MEMORY), so the ext_* high halves stay zero.
    put_u32(&mut zp, CMD_LINE_PTR, CMDLINE_ADDR as u32);
    if let Some((addr, size)) = l.initrd {
        put_u32(&mut zp, RAMDISK_IMAGE, addr as u32);
        put_u32(&mut zp, RAMDISK_SIZE, size as u32);
    }
    let map = e820(l.mem_size);
    zp[E820_ENTRIES] = map.len().min(E820_MAX) as u8;
    for (i, e) in map.iter().take(E820_MAX).enumerate() {
        let off = E820_TABLE + 20 * i;
        zp[off..off + 8].copy_from_slice(&e.addr.to_le_bytes());
        zp[off + 8..off + 16].copy_from_slice(&e.size.to_le_bytes());
        put_u32(&mut zp, off + 16, e.kind);
    }
    zp
}

#[cfg(test)]
mod tests {
    use super::super::bzimage::{tests::synthetic, BzImage};
    use super::super::layout::plan;
    use super::*;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    #[test]
    fn e820_has_the_usual_holes() {
        let m = e820(256 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].addr, m[0].size, m[0].kind), (0, 0x9fc00, E820_RAM));
        assert_eq!((m[1].addr, m[1].kind), (0x9fc00, E820_RESERVED));
        assert_eq!(m[1].addr + m[1].size, 0x10_0000);
        assert_eq!((m[2].addr, m[2].size), (0x10_0000, (256 << 20) - 0x10_0000));
    }

    #[test]
    fn zero_page_fields() {
        let b = synthetic(4096);
        let img = BzImage::parse(&b).expect("parse");
        let l = plan(&img.header, 4096, 128 << 20, Some(1000), 5).expect("plan");
        let zp = zero_page(img.setup_header, &l);
        assert_eq!(&zp[0x202..0x206], b"HdrS", "the setup header is copied");
        assert_eq!(zp[0x1f1], 4, "setup_sects");
        assert_eq!(zp[TYPE_OF_LOADER], 0xff);
        assert_eq!(zp[LOADFLAGS] & LOADED_HIGH, LOADED_HIGH);
        assert_eq!(u32_at(&zp, CMD_LINE_PTR), CMDLINE_ADDR as u32);
        let (addr, _) = l.initrd.expect("initrd");
        assert_eq!(u32_at(&zp, RAMDISK_IMAGE), addr as u32);
        assert_eq!(u32_at(&zp, RAMDISK_SIZE), 1000);
        assert_eq!(zp[E820_ENTRIES], 3);
        let last = E820_TABLE + 40;
        assert_eq!(u32_at(&zp, last), 0x10_0000);
        assert_eq!(u32_at(&zp, last + 8), (128 << 20) - 0x10_0000);
        assert_eq!(u32_at(&zp, last + 16), E820_RAM);
    }
}

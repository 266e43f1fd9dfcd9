//! The boot GDT and identity page tables for a kernel entered at startup_64.

/// Where the GDT is, and its selectors (the 64-bit boot protocol wants __BOOT_CS = 0x10 and
/// __BOOT_DS = 0x18, flat).
pub const GDT_ADDR: u64 = 0x1000;
pub const SEL_CODE: u16 = 0x10;
pub const SEL_DATA: u16 = 0x18;
pub const SEL_TSS: u16 = 0x20;
pub const GDT_ENTRIES: usize = 5;
pub const PML4_ADDR: u64 = 0x2000;
pub const PDPT_ADDR: u64 = 0x3000;
pub const PD_ADDR: u64 = 0x4000;
/// Present | writable.
const PRESENT_RW: u64 = 0x3;
/// A 2 MiB page in a page directory entry.
const PAGE_SIZE_2M: u64 = 1 << 7;
const GIB: u64 = 1 << 30;

/// The GDT: null, null, 64-bit code, data, and a 32-bit TSS (VMX needs a usable TR; the
/// kernel loads its own early).
pub fn gdt() -> [u64; GDT_ENTRIES] {
    [
        0,
        0,
        0x00af_9b00_0000_ffff, // code: present, DPL 0, exec/read, accessed, L
        0x00cf_9300_0000_ffff, // data: present, DPL 0, read/write, accessed, 4 GiB
        0x0000_8b00_0000_0067, // TSS: present, busy, base 0, limit 0x67
    ]
}

/// The (address, entry) pairs of identity page tables over all of guest memory (at least
/// the first GiB) with 2 MiB pages: one PML4 entry, one PDPT entry per GiB, one page
/// directory per GiB.
pub fn page_tables(mem_size: u64) -> Vec<(u64, u64)> {
    let gibs = mem_size.div_ceil(GIB).max(1);
    let mut out = vec![(PML4_ADDR, PDPT_ADDR | PRESENT_RW)];
    for g in 0..gibs {
        let pd = PD_ADDR + g * 0x1000;
        out.push((PDPT_ADDR + 8 * g, pd | PRESENT_RW));
        for i in 0..512 {
            let addr = (g * 512 + i) << 21;
            out.push((pd + 8 * i, addr | PRESENT_RW | PAGE_SIZE_2M));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_maps_with_2mib_pages() {
        let t = page_tables(256 << 20);
        assert_eq!(t.len(), 1 + 1 + 512, "one GiB at least");
        assert_eq!(t[0], (PML4_ADDR, PDPT_ADDR | 3));
        assert_eq!(t[1], (PDPT_ADDR, PD_ADDR | 3));
        assert_eq!(t[2], (PD_ADDR, 0x83));
        assert_eq!(t[3], (PD_ADDR + 8, (2 << 20) | 0x83));
        let t = page_tables(3 << 30);
        assert_eq!(t.len(), 1 + 3 * 513);
        let last = t.last().copied().expect("entries");
        assert_eq!(
            last,
            (PD_ADDR + 0x2000 + 511 * 8, ((3 << 30) - (2 << 20)) | 0x83)
        );
        assert!(
            t.iter().all(|(a, _)| *a < PD_ADDR + 0x3000),
            "the tables stay below the stack page"
        );
    }

    #[test]
    fn gdt_has_the_boot_selectors() {
        let g = gdt();
        let code = g[usize::from(SEL_CODE / 8)];
        let data = g[usize::from(SEL_DATA / 8)];
        assert_eq!((code >> 53) & 1, 1, "code is 64-bit (L)");
        assert_eq!((code >> 40) & 0x9a, 0x9a, "present code segment");
        assert_eq!((data >> 40) & 0x92, 0x92, "present data segment");
        assert_eq!((g[usize::from(SEL_TSS / 8)] >> 40) & 0xff, 0x8b);
    }
}

//! The setup header of a bzImage, per the Linux x86 boot protocol
//! (Documentation/arch/x86/boot.rst): where the protected-mode kernel starts in the file, how
//! much memory it needs once decompressed, where it wants to run, and the limits it puts on
//! the command line and the initrd.

use super::BootError;

/// "HdrS", the setup header's magic at offset 0x202.
const MAGIC: u32 = 0x5372_6448;
/// 0xaa55 at offset 0x1fe: the boot sector's signature.
const BOOT_FLAG: u16 = 0xaa55;
/// The oldest protocol this VMM boots: 2.12 brought xloadflags and with it XLF_KERNEL_64.
pub const MIN_VERSION: u16 = 0x020c;
/// xloadflags: the kernel has the 64-bit entry point at its load address + 0x200.
pub const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point (startup_64) from the load address.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Where the setup header starts in the file and in boot_params.
pub const HEADER_START: usize = 0x1f1;

/// The fields of the setup header this VMM uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupHeader {
    /// Boot protocol version, major in the high byte (0x020f is 2.15).
    pub version: u16,
    /// 512-byte sectors of real-mode setup code after the boot sector (0 means 4).
    pub setup_sects: u8,
    /// Size of the protected-mode code in bytes (the field counts 16-byte paragraphs).
    pub syssize: u64,
    pub loadflags: u8,
    /// Highest address the initrd may occupy (its last byte).
    pub initrd_addr_max: u32,
    pub kernel_alignment: u32,
    pub relocatable: bool,
    pub xloadflags: u16,
    /// Longest command line, without its terminating NUL.
    pub cmdline_size: u32,
    /// Where the kernel runs (LOAD_PHYSICAL_ADDR); at or above it if relocatable.
    pub pref_address: u64,
    /// Bytes the kernel needs from where it runs, for decompressing and initializing.
    pub init_size: u32,
    /// End of the setup header in the file (0x202 + the byte at 0x201).
    pub header_end: usize,
}

fn u8_at(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([u8_at(b, off), u8_at(b, off + 1)])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from(u16_at(b, off)) | (u32::from(u16_at(b, off + 2)) << 16)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from(u32_at(b, off)) | (u64::from(u32_at(b, off + 4)) << 32)
}

impl SetupHeader {
    /// Reads and checks the header at the start of a bzImage.
    pub fn parse(b: &[u8]) -> Result<SetupHeader, BootError> {
        if b.len() < 0x270 {
            return Err(BootError::NotBzImage(format!(
                "{} bytes, too short for a setup header",
                b.len()
            )));
        }
        if u32_at(b, 0x202) != MAGIC || u16_at(b, 0x1fe) != BOOT_FLAG {
            return Err(BootError::NotBzImage(
                "no \"HdrS\" magic at 0x202 or no 0xaa55 at 0x1fe".into(),
            ));
        }
        let version = u16_at(b, 0x206);
        if version < MIN_VERSION {
            return Err(BootError::OldProtocol(version));
        }
        let header_end = 0x202 + usize::from(u8_at(b, 0x201));
        let h = SetupHeader {
            version,
            setup_sects: u8_at(b, 0x1f1),
            syssize: u64::from(u32_at(b, 0x1f4)) * 16,
            loadflags: u8_at(b, 0x211),
            initrd_addr_max: u32_at(b, 0x22c),
            kernel_alignment: u32_at(b, 0x230),
            relocatable: u8_at(b, 0x234) != 0,
            xloadflags: u16_at(b, 0x236),
            cmdline_size: u32_at(b, 0x238),
            pref_address: u64_at(b, 0x258),
            init_size: u32_at(b, 0x260),
            header_end,
        };
        if h.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::No64BitEntry);
        }
        if h.relocatable && !h.kernel_alignment.is_power_of_two() {
            return Err(BootError::NotBzImage(format!(
                "kernel_alignment {:#x} is not a power of two",
                h.kernel_alignment
            )));
        }
        let pm = h.kernel_offset();
        if b.len() < header_end || (b.len() as u64) < pm as u64 + h.syssize {
            return Err(BootError::NotBzImage(format!(
                "{} bytes, but the header says the kernel ends at {:#x}",
                b.len(),
                pm as u64 + h.syssize
            )));
        }
        Ok(h)
    }

    /// Offset of the protected-mode kernel in the file.
    pub fn kernel_offset(&self) -> usize {
        let sects = if self.setup_sects == 0 {
            4
        } else {
            usize::from(self.setup_sects)
        };
        (sects + 1) * 512
    }

    /// Where the kernel decompresses itself and runs when loaded at `load`: the load address
    /// rounded up to kernel_alignment but not below pref_address if relocatable, else
    /// pref_address.
    pub fn run_address(&self, load: u64) -> u64 {
        if !self.relocatable {
            return self.pref_address;
        }
        let align = u64::from(self.kernel_alignment).max(1);
        load.div_ceil(align)
            .saturating_mul(align)
            .max(self.pref_address)
    }
}

/// A parsed bzImage: its header and the two parts of the file.
#[derive(Debug, Clone, Copy)]
pub struct BzImage<'a> {
    pub header: SetupHeader,
    /// The setup header's bytes (file offsets 0x1f1 up to its end), copied into the zero page.
    pub setup_header: &'a [u8],
    /// The protected-mode kernel, loaded at the load address.
    pub kernel: &'a [u8],
}

impl<'a> BzImage<'a> {
    pub fn parse(b: &'a [u8]) -> Result<BzImage<'a>, BootError> {
        let header = SetupHeader::parse(b)?;
        let setup_header = b
            .get(HEADER_START..header.header_end)
            .ok_or_else(|| BootError::NotBzImage("setup header out of the file".into()))?;
        let kernel = b
            .get(header.kernel_offset()..)
            .ok_or_else(|| BootError::NotBzImage("no protected-mode kernel".into()))?;
        Ok(BzImage {
            header,
            setup_header,
            kernel,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A synthetic bzImage: a valid header of protocol 2.15 and `kernel` bytes of kernel.
    pub fn synthetic(kernel: usize) -> Vec<u8> {
        let setup_sects = 4u8;
        let pm = (usize::from(setup_sects) + 1) * 512;
        let mut b = vec![0u8; pm + kernel];
        b[0x1f1] = setup_sects;
        let para = u32::try_from(kernel.div_ceil(16)).unwrap_or(u32::MAX);
        b[0x1f4..0x1f8].copy_from_slice(&para.to_le_bytes());
        b[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        b[0x201] = 0x6a; // header ends at 0x26c
        b[0x202..0x206].copy_from_slice(&MAGIC.to_le_bytes());
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x211] = 1; // LOADED_HIGH
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        b[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        b[0x234] = 1;
        b[0x236..0x238].copy_from_slice(&0x7fu16.to_le_bytes());
        b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[0x260..0x264].copy_from_slice(&0x200_0000u32.to_le_bytes());
        b[pm] = 0xaa;
        b
    }

    #[test]
    fn parses_a_synthetic_header() {
        let b = synthetic(4096);
        let img = BzImage::parse(&b).expect("parse");
        let h = img.header;
        assert_eq!(h.version, 0x020f);
        assert_eq!(h.kernel_offset(), 5 * 512);
        assert_eq!(h.syssize, 4096);
        assert_eq!(h.cmdline_size, 2047);
        assert_eq!(h.init_size, 0x200_0000);
        assert_eq!(img.kernel.len(), 4096);
        assert_eq!(img.kernel[0], 0xaa);
        assert_eq!(img.setup_header.len(), 0x26c - 0x1f1);
        assert_eq!(
            h.run_address(0x10_0000),
            0x100_0000,
            "not below pref_address"
        );
        assert_eq!(h.run_address(0x120_0000), 0x120_0000);
        assert_eq!(h.run_address(0x130_0000), 0x140_0000, "aligned up to 2 MiB");
    }

    #[test]
    fn refuses_what_is_not_a_bootable_bzimage() {
        assert!(matches!(
            SetupHeader::parse(&[0u8; 100]),
            Err(BootError::NotBzImage(_))
        ));
        let mut b = synthetic(4096);
        b[0x202] = b'X';
        assert!(matches!(
            SetupHeader::parse(&b),
            Err(BootError::NotBzImage(_))
        ));
        let mut b = synthetic(4096);
        b[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        assert_eq!(SetupHeader::parse(&b), Err(BootError::OldProtocol(0x0206)));
        let mut b = synthetic(4096);
        b[0x236] = 0;
        assert_eq!(SetupHeader::parse(&b), Err(BootError::No64BitEntry));
        let mut b = synthetic(4096);
        b.truncate(b.len() - 100);
        assert!(matches!(
            SetupHeader::parse(&b),
            Err(BootError::NotBzImage(_))
        ));
    }
}

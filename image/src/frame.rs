//! The byte layout of an image: file header, frame header, END payload.
//!
//! ```text
//! file header (64 bytes, offset 0)
//!   0  magic       b"STASISIM"
//!   8  major       u16 LE (1)
//!  10  minor       u16 LE (0)
//!  12  header_len  u32 LE (64)
//!  16  flags       u64 LE (0)
//!  24  reserved    32 zero bytes
//!  56  check       first 8 bytes of blake3(bytes 0..56)
//!
//! frame (repeated until END)
//!   0  magic         b"SFRM"
//!   4  kind          u32 LE (FrameKind)
//!   8  flags         u32 LE (0)
//!  12  reserved      u32 LE (0)
//!  16  len           u64 LE, payload bytes
//!  24  payload_hash  blake3(payload), 32 bytes
//!  56  check         first 8 bytes of blake3(bytes 0..56)
//!  64  payload       `len` bytes
//! ```
//!
//! Frame order: `INVENTORY (PROCESS | PAD | [PAD] PAGE_CHUNK PAGE_DATA)* INDEX END`, and the file
//! ends right after END, whose 32-byte payload is `index frame offset u64 LE | number of frames
//! (all frames, INVENTORY..END inclusive) u64 LE | 16 zero bytes`. END therefore always starts at
//! `file_len - 96`.
//!
//! Non-empty raw PAGE_DATA payloads start at a file offset that is a multiple of 4096, so restore
//! can mmap them; the writer puts a PAD frame (zero payload) *before* the PAGE_CHUNK frame to
//! get there, which costs at most 4096 + 63 bytes per chunk.

use crate::error::ImageError;
use crate::limits::{MAX_INDEX_LEN, MAX_PAGE_DATA_LEN, MAX_RECORD_LEN};
use crate::FORMAT_MAJOR;
use crate::FORMAT_MINOR;

/// Magic at offset 0 of every image.
pub const FILE_MAGIC: [u8; 8] = *b"STASISIM";
/// Magic at the start of every frame header.
pub const FRAME_MAGIC: [u8; 4] = *b"SFRM";
/// Size of the file header.
pub const FILE_HEADER_LEN: usize = 64;
/// Size of a frame header.
pub const FRAME_HEADER_LEN: usize = 64;
/// Size of the END payload.
pub const END_PAYLOAD_LEN: usize = 32;
/// Size of the whole END frame (header + payload); END starts at `file_len - END_FRAME_LEN`.
pub const END_FRAME_LEN: usize = FRAME_HEADER_LEN + END_PAYLOAD_LEN;
/// Bytes covered by a header's check value.
const CHECKED_LEN: usize = 56;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[repr(u32)]
pub enum FrameKind {
    /// protobuf `Inventory`; always the first frame.
    Inventory = 1,
    /// protobuf `Process`.
    Process = 2,
    /// protobuf `PageChunk`; always followed by exactly one PAGE_DATA frame.
    PageChunk = 3,
    /// Page data of the preceding PAGE_CHUNK (raw or one zstd frame).
    PageData = 4,
    /// Zero bytes, for alignment.
    Pad = 5,
    /// protobuf `ImageIndex`.
    Index = 6,
    /// Fixed 32-byte trailer.
    End = 7,
}

impl FrameKind {
    /// The kind with wire value `v`, if known.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Inventory,
            2 => Self::Process,
            3 => Self::PageChunk,
            4 => Self::PageData,
            5 => Self::Pad,
            6 => Self::Index,
            7 => Self::End,
            _ => return None,
        })
    }

    /// Upper-case name as used in the documentation and in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inventory => "INVENTORY",
            Self::Process => "PROCESS",
            Self::PageChunk => "PAGE_CHUNK",
            Self::PageData => "PAGE_DATA",
            Self::Pad => "PAD",
            Self::Index => "INDEX",
            Self::End => "END",
        }
    }

    /// Largest payload a frame of this kind may have.
    pub fn max_len(self) -> u64 {
        match self {
            Self::Inventory | Self::Process | Self::PageChunk | Self::Pad => MAX_RECORD_LEN,
            Self::PageData => MAX_PAGE_DATA_LEN,
            Self::Index => MAX_INDEX_LEN,
            Self::End => END_PAYLOAD_LEN as u64,
        }
    }
}

impl std::fmt::Display for FrameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// blake3 of `data` on the calling thread (SIMD, no thread pool: the writer runs beside a
/// reader thread, and a pool spinning for work steals its core on small machines).
pub(crate) fn hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

fn check_of(bytes: &[u8]) -> [u8; 8] {
    let h = blake3::hash(bytes);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.as_bytes()[..8]);
    out
}

fn u16_at(b: &[u8; 64], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; 64], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn describe(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// The 64-byte file header of a format 1.0 image.
pub fn encode_file_header() -> [u8; FILE_HEADER_LEN] {
    let mut b = [0u8; FILE_HEADER_LEN];
    b[0..8].copy_from_slice(&FILE_MAGIC);
    b[8..10].copy_from_slice(&FORMAT_MAJOR.to_le_bytes());
    b[10..12].copy_from_slice(&FORMAT_MINOR.to_le_bytes());
    b[12..16].copy_from_slice(&(FILE_HEADER_LEN as u32).to_le_bytes());
    let check = check_of(&b[..CHECKED_LEN]);
    b[CHECKED_LEN..].copy_from_slice(&check);
    b
}

/// Validates the file header; returns the format (major, minor).
pub fn parse_file_header(b: &[u8; FILE_HEADER_LEN]) -> Result<(u16, u16), ImageError> {
    const WHAT: &str = "file header";
    if b[0..8] != FILE_MAGIC {
        return Err(ImageError::BadMagic {
            offset: 0,
            what: WHAT,
            expected: "STASISIM",
            found: describe(&b[0..8]),
        });
    }
    let (major, minor) = (u16_at(b, 8), u16_at(b, 10));
    if major > FORMAT_MAJOR {
        return Err(ImageError::NewerFormat { major, minor });
    }
    if major == 0 {
        return Err(ImageError::InvalidFormat { major, minor });
    }
    if b[CHECKED_LEN..] != check_of(&b[..CHECKED_LEN]) {
        return Err(ImageError::HeaderCheck {
            offset: 0,
            what: WHAT,
        });
    }
    let header_len = u32_at(b, 12);
    if header_len as usize != FILE_HEADER_LEN {
        return Err(ImageError::invalid(
            0,
            WHAT,
            format!("header_len is {header_len}, format 1.x requires {FILE_HEADER_LEN}"),
        ));
    }
    if u64_at(b, 16) != 0 || b[24..CHECKED_LEN].iter().any(|&x| x != 0) {
        return Err(ImageError::invalid(
            0,
            WHAT,
            "nonzero flags or reserved bytes",
        ));
    }
    Ok((major, minor))
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub len: u64,
    pub payload_hash: [u8; 32],
}

impl FrameHeader {
    /// The 64 header bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..4].copy_from_slice(&FRAME_MAGIC);
        b[4..8].copy_from_slice(&(self.kind as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..56].copy_from_slice(&self.payload_hash);
        let check = check_of(&b[..CHECKED_LEN]);
        b[CHECKED_LEN..].copy_from_slice(&check);
        b
    }

    /// Validates the header of the frame at file offset `offset`: magic, check, kind, zero
    /// flags/reserved, and `len` against the kind's limit.
    pub fn parse(b: &[u8; FRAME_HEADER_LEN], offset: u64) -> Result<Self, ImageError> {
        const WHAT: &str = "frame header";
        if b[0..4] != FRAME_MAGIC {
            return Err(ImageError::BadMagic {
                offset,
                what: WHAT,
                expected: "SFRM",
                found: describe(&b[0..4]),
            });
        }
        if b[CHECKED_LEN..] != check_of(&b[..CHECKED_LEN]) {
            return Err(ImageError::HeaderCheck { offset, what: WHAT });
        }
        let raw_kind = u32_at(b, 4);
        let kind = FrameKind::from_u32(raw_kind).ok_or(ImageError::UnknownFrameKind {
            offset,
            kind: raw_kind,
        })?;
        if u32_at(b, 8) != 0 || u32_at(b, 12) != 0 {
            return Err(ImageError::invalid(
                offset,
                kind.name(),
                "nonzero flags or reserved field in frame header",
            ));
        }
        let len = u64_at(b, 16);
        let limit = kind.max_len();
        if len > limit {
            return Err(ImageError::TooLong {
                offset,
                kind: kind.name(),
                len,
                limit,
            });
        }
        if kind == FrameKind::End && len != END_PAYLOAD_LEN as u64 {
            return Err(ImageError::invalid(
                offset,
                kind.name(),
                format!("END payload must be {END_PAYLOAD_LEN} bytes, header says {len}"),
            ));
        }
        let mut payload_hash = [0u8; 32];
        payload_hash.copy_from_slice(&b[24..56]);
        Ok(Self {
            kind,
            len,
            payload_hash,
        })
    }

    /// Errors unless `payload` hashes to `payload_hash`.
    pub fn check_payload(&self, offset: u64, payload: &[u8]) -> Result<(), ImageError> {
        if hash(payload) != self.payload_hash {
            return Err(ImageError::PayloadHash {
                offset,
                kind: self.kind.name(),
            });
        }
        Ok(())
    }
}

/// The END payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndPayload {
    /// File offset of the INDEX frame header.
    pub index_offset: u64,
    /// Number of frames in the image, INVENTORY through END inclusive.
    pub frames: u64,
}

impl EndPayload {
    pub fn encode(&self) -> [u8; END_PAYLOAD_LEN] {
        let mut b = [0u8; END_PAYLOAD_LEN];
        b[0..8].copy_from_slice(&self.index_offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.frames.to_le_bytes());
        b
    }

    /// Parses the (already hash-checked) END payload of the frame at `offset`.
    pub fn parse(p: &[u8], offset: u64) -> Result<Self, ImageError> {
        if p.len() != END_PAYLOAD_LEN {
            return Err(ImageError::invalid(
                offset,
                "END",
                format!("payload is {} bytes, expected {END_PAYLOAD_LEN}", p.len()),
            ));
        }
        if p[16..].iter().any(|&x| x != 0) {
            return Err(ImageError::invalid(offset, "END", "nonzero reserved bytes"));
        }
        Ok(Self {
            index_offset: u64_at(p, 0),
            frames: u64_at(p, 8),
        })
    }
}

/// Decodes a protobuf record payload, naming the frame on failure.
pub(crate) fn decode<M: prost::Message + Default>(
    payload: &[u8],
    offset: u64,
    kind: FrameKind,
) -> Result<M, ImageError> {
    M::decode(payload).map_err(|source| ImageError::Decode {
        offset,
        kind: kind.name(),
        err: source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_header_round_trip() {
        let h = encode_file_header();
        assert_eq!(parse_file_header(&h).ok(), Some((1, 0)));
    }

    #[test]
    fn file_header_bad_magic_version_check() {
        let mut h = encode_file_header();
        h[0] = b'X';
        assert!(matches!(
            parse_file_header(&h),
            Err(ImageError::BadMagic { .. })
        ));
        let mut h = encode_file_header();
        h[8] = 2;
        let e = parse_file_header(&h).err().map(|e| e.to_string());
        assert!(e
            .as_deref()
            .is_some_and(|e| e.contains("image format 2.0 is newer")));
        let mut h = encode_file_header();
        h[30] = 1;
        assert!(matches!(
            parse_file_header(&h),
            Err(ImageError::HeaderCheck { .. })
        ));
    }

    #[test]
    fn frame_header_round_trip_and_limits() {
        let fh = FrameHeader {
            kind: FrameKind::Process,
            len: 10,
            payload_hash: [7; 32],
        };
        assert_eq!(FrameHeader::parse(&fh.encode(), 0).ok(), Some(fh));
        let big = FrameHeader {
            kind: FrameKind::PageData,
            len: 1 << 40,
            payload_hash: [0; 32],
        };
        let e = FrameHeader::parse(&big.encode(), 4096)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("record length 1099511627776 at offset 4096 (PAGE_DATA) exceeds limit 67108864")
        );
    }
}

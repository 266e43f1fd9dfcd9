//! Random-access reader over a memory-mapped image file (or an owned buffer).
//!
//! [`Image::open`] checks the header, END, INDEX, the inventory and every PROCESS and
//! PAGE_CHUNK record the index points at (with their frame hashes), each PAGE_DATA frame header,
//! and that the referenced frames neither overlap nor leave the file. It does not hash page data:
//! [`Image::chunk_data`] does that per chunk, [`Image::verify`] for the whole file.

use std::borrow::Cow;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::chunk::ChunkRef;
use crate::error::ImageError;
use crate::frame::{
    decode, parse_file_header, EndPayload, FrameHeader, FrameKind, END_FRAME_LEN, FILE_HEADER_LEN,
    FRAME_HEADER_LEN,
};
use crate::limits::{MAX_CHUNKS, MAX_PROCESSES};
use crate::proto::{self, Encoding, RunKind, SpaceKind};
use crate::validate::check_inventory;

enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// Where a page lives in an image (see [`Image::find_page`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageLocation {
    /// Index into [`Image::chunks`].
    pub chunk: usize,
    /// Index into that chunk's runs.
    pub run: usize,
    pub kind: RunKind,
    /// For DATA pages: byte offset of the page within the chunk's decoded data.
    pub data_offset: Option<u64>,
    /// For DATA pages of raw chunks: file offset of the page (4096-aligned).
    pub file_offset: Option<u64>,
}

/// A validated image, open for random access.
pub struct Image {
    backing: Backing,
    version: (u16, u16),
    inventory: proto::Inventory,
    processes: Vec<proto::Process>,
    chunks: Vec<ChunkRef>,
    /// (space, space_id, vaddr_start, chunk index), sorted: the page lookup table.
    lookup: Vec<(i32, u64, u64, usize)>,
    index: proto::ImageIndex,
    index_offset: u64,
    frames: u64,
    /// Set once [`Image::verify`] succeeded: every page hash has been checked.
    verified: AtomicBool,
}

/// Checks bounds and parses the header of the frame at `offset`, which must be of `kind`;
/// returns it with its payload (not yet hash-checked).
pub(crate) fn frame_at(
    bytes: &[u8],
    offset: u64,
    kind: Option<FrameKind>,
) -> Result<(FrameHeader, &[u8]), ImageError> {
    let file_len = bytes.len() as u64;
    let left = file_len.saturating_sub(offset);
    if left < FRAME_HEADER_LEN as u64 {
        return Err(ImageError::Truncated {
            offset,
            what: "frame header",
            needed: FRAME_HEADER_LEN as u64,
            available: left,
        });
    }
    let start = offset as usize; // < file_len, which is a usize
    let mut hb = [0u8; FRAME_HEADER_LEN];
    hb.copy_from_slice(&bytes[start..start + FRAME_HEADER_LEN]);
    let hdr = FrameHeader::parse(&hb, offset)?;
    if let Some(k) = kind {
        if hdr.kind != k {
            return Err(ImageError::invalid(
                offset,
                hdr.kind.name(),
                format!("expected a {k} frame here"),
            ));
        }
    }
    let payload_at = offset + FRAME_HEADER_LEN as u64;
    let left = file_len - payload_at;
    if hdr.len > left {
        return Err(ImageError::Truncated {
            offset: payload_at,
            what: hdr.kind.name(),
            needed: hdr.len,
            available: left,
        });
    }
    let p = payload_at as usize;
    Ok((hdr, &bytes[p..p + hdr.len as usize]))
}

/// Why the last 96 bytes are not an END frame, found by walking the frame headers from the
/// start: the file ends inside a frame or before END (truncated), a header on the way is
/// corrupt, or bytes follow END. None when the walk reaches an END that ends the file (the
/// END frame itself is what is wrong).
fn why_no_end(bytes: &[u8]) -> Option<ImageError> {
    let file_len = bytes.len() as u64;
    let mut offset = FILE_HEADER_LEN as u64;
    loop {
        if offset == file_len {
            return Some(ImageError::Truncated {
                offset,
                what: "END frame",
                needed: END_FRAME_LEN as u64,
                available: 0,
            });
        }
        let (hdr, _) = match frame_at(bytes, offset, None) {
            Ok(f) => f,
            Err(e) => return Some(e),
        };
        let next = offset + FRAME_HEADER_LEN as u64 + hdr.len;
        if hdr.kind == FrameKind::End {
            return (next != file_len).then_some(ImageError::TrailingData { offset: next });
        }
        offset = next;
    }
}

/// Reads, hash-checks and decodes the protobuf record at `offset`.
fn record_at<M: prost::Message + Default>(
    bytes: &[u8],
    offset: u64,
    kind: FrameKind,
) -> Result<(M, u64), ImageError> {
    let (hdr, payload) = frame_at(bytes, offset, Some(kind))?;
    hdr.check_payload(offset, payload)?;
    let end = offset + FRAME_HEADER_LEN as u64 + hdr.len;
    Ok((decode(payload, offset, kind)?, end))
}

impl Image {
    /// Maps and validates the image at `path`.
    pub fn open(path: &Path) -> Result<Image, ImageError> {
        let file_err = |op, source| ImageError::File {
            op,
            path: path.to_path_buf(),
            err: source,
        };
        let file = File::open(path).map_err(|e| file_err("opening image", e))?;
        let len = file
            .metadata()
            .map_err(|e| file_err("reading image metadata", e))?
            .len();
        let backing = if len == 0 {
            Backing::Owned(Vec::new())
        } else {
            // SAFETY: the mapping is read-only and private to this Image. Its contents are
            // treated as untrusted bytes: every access is bounds-checked and every structure
            // validated. Image files are written once and not modified in place; if another
            // process truncated or rewrote the file while it is mapped, reads could fault or
            // see changing bytes, the standard caveat of every mmap-based reader.
            let map =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| file_err("mapping image", e))?;
            Backing::Mmap(map)
        };
        Self::load(backing)
    }

    /// Validates an image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Image, ImageError> {
        Self::load(Backing::Owned(bytes))
    }

    fn load(backing: Backing) -> Result<Image, ImageError> {
        let bytes = backing.bytes();
        let file_len = bytes.len() as u64;
        let mut fh = [0u8; FILE_HEADER_LEN];
        let head = bytes.get(..FILE_HEADER_LEN).ok_or(ImageError::Truncated {
            offset: 0,
            what: "file header",
            needed: FILE_HEADER_LEN as u64,
            available: file_len,
        })?;
        fh.copy_from_slice(head);
        let version = parse_file_header(&fh)?;

        // END sits in the last 96 bytes.
        let body_start = FILE_HEADER_LEN as u64;
        if file_len < body_start + END_FRAME_LEN as u64 {
            return Err(ImageError::Truncated {
                offset: body_start,
                what: "END frame",
                needed: END_FRAME_LEN as u64,
                available: file_len - body_start,
            });
        }
        let end_offset = file_len - END_FRAME_LEN as u64;
        let end = frame_at(bytes, end_offset, Some(FrameKind::End))
            .and_then(|(hdr, payload)| {
                hdr.check_payload(end_offset, payload)?;
                EndPayload::parse(payload, end_offset)
            })
            .map_err(|e| why_no_end(bytes).unwrap_or(e))?;

        // INDEX immediately precedes END.
        let index_offset = end.index_offset;
        if index_offset < body_start || index_offset >= end_offset {
            return Err(ImageError::invalid(
                end_offset,
                "END",
                format!("index offset {index_offset} is outside the image body"),
            ));
        }
        let (index, index_end): (proto::ImageIndex, u64) =
            record_at(bytes, index_offset, FrameKind::Index)?;
        if index_end != end_offset {
            return Err(ImageError::invalid(
                index_offset,
                "INDEX",
                format!("INDEX frame ends at {index_end}, END starts at {end_offset}"),
            ));
        }
        let idx_err = |reason: String| ImageError::invalid(index_offset, "INDEX", reason);

        // INVENTORY is the first frame.
        if index.inventory_offset != body_start {
            return Err(idx_err(format!(
                "inventory offset {} (must be {body_start})",
                index.inventory_offset
            )));
        }
        let (inventory, inv_end): (proto::Inventory, u64) =
            record_at(bytes, body_start, FrameKind::Inventory)?;
        check_inventory(&inventory, body_start)?;
        let has_parent = inventory.parent.is_some();

        if index.process_offsets.len() > MAX_PROCESSES {
            return Err(idx_err(format!(
                "{} processes, limit {MAX_PROCESSES}",
                index.process_offsets.len()
            )));
        }
        if index.chunks.len() > MAX_CHUNKS {
            return Err(idx_err(format!(
                "{} chunks, limit {MAX_CHUNKS}",
                index.chunks.len()
            )));
        }

        // Every referenced frame as [start, end), to prove they are disjoint and in the body.
        let mut extents = Vec::with_capacity(index.process_offsets.len() + index.chunks.len());
        let mut processes = Vec::with_capacity(index.process_offsets.len());
        for &off in &index.process_offsets {
            let (p, p_end) = record_at(bytes, off, FrameKind::Process)?;
            extents.push((off, p_end));
            processes.push(p);
        }
        let mut chunks = Vec::with_capacity(index.chunks.len());
        for (i, entry) in index.chunks.iter().enumerate() {
            let off = entry.chunk_offset;
            let (rec, rec_end): (proto::PageChunk, u64) =
                record_at(bytes, off, FrameKind::PageChunk)?;
            let mut c = ChunkRef::from_record(rec, has_parent, off)?;
            c.index = i;
            let (data_hdr, _) = frame_at(bytes, rec_end, Some(FrameKind::PageData))?;
            c.attach_data(&data_hdr, rec_end)?;
            if c.index_entry() != *entry {
                return Err(idx_err(format!(
                    "chunk {i} entry {entry:?} does not match its frames at offset {off}"
                )));
            }
            extents.push((off, c.data_offset + c.data_len));
            chunks.push(c);
        }
        extents.sort_unstable();
        let mut prev_end = inv_end;
        for &(start, end) in &extents {
            if start < prev_end {
                return Err(idx_err(format!(
                    "frame at offset {start} overlaps the frame ending at {prev_end}"
                )));
            }
            prev_end = end;
        }
        if prev_end > index_offset {
            return Err(idx_err(format!(
                "a frame ending at {prev_end} runs into the INDEX frame"
            )));
        }

        let mut lookup: Vec<(i32, u64, u64, usize)> = chunks
            .iter()
            .map(|c| (c.space as i32, c.space_id, c.vaddr_start, c.index))
            .collect();
        lookup.sort_unstable();
        for w in lookup.windows(2) {
            let (a, b) = (&chunks[w[0].3], &chunks[w[1].3]);
            if (w[0].0, w[0].1) == (w[1].0, w[1].1) && b.vaddr_start < a.vaddr_end {
                return Err(idx_err(format!(
                    "chunks at offsets {} and {} cover overlapping pages of {} {}",
                    a.chunk_offset,
                    b.chunk_offset,
                    a.space.as_str_name(),
                    a.space_id
                )));
            }
        }

        Ok(Image {
            backing,
            version,
            inventory,
            processes,
            chunks,
            lookup,
            index,
            index_offset,
            frames: end.frames,
            verified: AtomicBool::new(false),
        })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.backing.bytes()
    }

    /// Format version from the file header.
    pub fn version(&self) -> (u16, u16) {
        self.version
    }

    pub fn inventory(&self) -> &proto::Inventory {
        &self.inventory
    }

    /// PROCESS records in file order.
    pub fn processes(&self) -> &[proto::Process] {
        &self.processes
    }

    /// Page chunks in file order.
    pub fn chunks(&self) -> &[ChunkRef] {
        &self.chunks
    }

    /// The stored index.
    pub fn index(&self) -> &proto::ImageIndex {
        &self.index
    }

    /// File offset of the INDEX frame.
    pub fn index_offset(&self) -> u64 {
        self.index_offset
    }

    /// Number of frames according to END (checked by [`Image::verify`]).
    pub fn frame_count(&self) -> u64 {
        self.frames
    }

    pub fn file_len(&self) -> u64 {
        self.bytes().len() as u64
    }

    /// Whether the image is memory-mapped (as opposed to held in a buffer).
    pub fn is_mapped(&self) -> bool {
        matches!(self.backing, Backing::Mmap(_))
    }

    /// Decoded, hash-verified page data of one chunk: borrowed straight from the mapping for
    /// raw chunks, owned for zstd. Raw data is hashed on every call until [`Image::verify`] has
    /// succeeded once; after that it is returned without hashing again.
    pub fn chunk_data(&self, chunk: &ChunkRef) -> Result<Cow<'_, [u8]>, ImageError> {
        let (ours, payload) = self.chunk_payload(chunk, "chunk_data")?;
        if ours.encoding == Encoding::Raw && self.is_verified() {
            return Ok(Cow::Borrowed(payload));
        }
        ours.decode_data(payload)
    }

    /// This image's own validated copy of `chunk` (not the caller's, possibly modified one)
    /// and its stored PAGE_DATA payload.
    pub(crate) fn chunk_payload(
        &self,
        chunk: &ChunkRef,
        op: &'static str,
    ) -> Result<(&ChunkRef, &[u8]), ImageError> {
        let ours = self
            .chunks
            .get(chunk.index)
            .filter(|c| c.chunk_offset == chunk.chunk_offset)
            .ok_or_else(|| ImageError::InvalidInput {
                op,
                reason: format!(
                    "chunk {} at offset {} is not in this image",
                    chunk.index, chunk.chunk_offset
                ),
            })?;
        let start = ours.data_offset as usize;
        let payload = self
            .bytes()
            .get(start..start + ours.data_len as usize)
            .ok_or(ImageError::Truncated {
                offset: ours.data_offset,
                what: "PAGE_DATA",
                needed: ours.data_len,
                available: self.file_len().saturating_sub(ours.data_offset),
            })?;
        Ok((ours, payload))
    }

    /// Whether [`Image::verify`] has succeeded on this image.
    pub fn is_verified(&self) -> bool {
        self.verified.load(Ordering::Acquire)
    }

    pub(crate) fn set_verified(&self) {
        self.verified.store(true, Ordering::Release);
    }

    /// For raw chunks: the file offset of the data (page aligned), so callers can mmap/pread it.
    pub fn raw_data_offset(&self, chunk: &ChunkRef) -> Option<u64> {
        let ours = self
            .chunks
            .get(chunk.index)
            .filter(|c| c.chunk_offset == chunk.chunk_offset)?;
        (ours.encoding == Encoding::Raw && ours.data_len > 0).then_some(ours.data_offset)
    }

    /// Finds the chunk holding page `vaddr` (any address within the page) of a space.
    pub fn find_page(&self, space: SpaceKind, space_id: u64, vaddr: u64) -> Option<PageLocation> {
        let key = (space as i32, space_id, vaddr);
        let pos = self
            .lookup
            .partition_point(|&(s, id, start, _)| (s, id, start) <= key)
            .checked_sub(1)?;
        let &(s, id, _, ci) = self.lookup.get(pos)?;
        if (s, id) != (space as i32, space_id) {
            return None;
        }
        let c = self.chunks.get(ci)?;
        if vaddr >= c.vaddr_end {
            return None;
        }
        let (run, kind, data_offset) = c.locate(vaddr)?;
        let file_offset = match (c.encoding, data_offset) {
            (Encoding::Raw, Some(d)) => Some(c.data_offset + d),
            _ => None,
        };
        Some(PageLocation {
            chunk: ci,
            run,
            kind,
            data_offset,
            file_offset,
        })
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("version", &self.version)
            .field("file_len", &self.file_len())
            .field("image_id", &self.inventory.image_id)
            .field("processes", &self.processes.len())
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

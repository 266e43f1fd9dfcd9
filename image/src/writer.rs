//! Forward-only image writer: never seeks, so it works on pipes and sockets.

use std::io::{BufWriter, Write};

use prost::Message;

use crate::chunk::{check_runs, SpanSet};
use crate::compression::Compression;
use crate::encode::{ChunkEncoder, EncodedChunk};
use crate::error::ImageError;
use crate::frame::{
    encode_file_header, hash, EndPayload, FrameHeader, FrameKind, FRAME_HEADER_LEN,
};
use crate::limits::{MAX_CHUNKS, MAX_INDEX_LEN, MAX_PROCESSES};
use crate::proto::{self, Encoding, SpaceKind};
use crate::{FORMAT_MAJOR, FORMAT_MINOR, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;
const ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// What one [`ImageWriter::write_chunk`] stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChunkStats {
    pub data_pages: u64,
    pub zero_pages: u64,
    pub parent_pages: u64,
    /// Bytes of page data before encoding.
    pub raw_bytes: u64,
    /// Bytes of the PAGE_DATA payload.
    pub stored_bytes: u64,
}

/// Totals of a finished image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriteStats {
    pub processes: u64,
    pub chunks: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub parent_pages: u64,
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// Size of the whole image file.
    pub image_bytes: u64,
}

/// A chunk's data and its PAGE_DATA payload, both hashed.
struct Payload<'a> {
    raw: &'a [u8],
    raw_hash: [u8; 32],
    encoding: Encoding,
    payload: &'a [u8],
    payload_hash: [u8; 32],
}

/// A random 128-bit image id, 32 lowercase hex digits.
pub fn new_image_id() -> Result<String, ImageError> {
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| ImageError::InvalidInput {
        op: "generate image id",
        reason: format!("getrandom failed: {e}"),
    })?;
    Ok(hex::encode(id))
}

/// Writes an image as a stream of frames. See [`crate::frame`] for the layout.
///
/// Output is buffered internally; [`ImageWriter::finish`] flushes and hands back the sink.
/// After any I/O error the writer refuses further calls (the image is incomplete).
pub struct ImageWriter<W: Write> {
    out: BufWriter<W>,
    pos: u64,
    frames: u64,
    failed: bool,
    encoder: ChunkEncoder,
    scratch: Vec<u8>,
    inventory: proto::Inventory,
    index: proto::ImageIndex,
    spans: SpanSet,
    stats: WriteStats,
}

impl<W: Write> ImageWriter<W> {
    /// Writes the file header and the INVENTORY frame.
    ///
    /// The stored inventory is a copy of `inventory` with `format_major`/`format_minor` and
    /// `compression` set by the writer, `page_size` set to 4096 when 0, and a fresh random
    /// `image_id` when empty (see [`ImageWriter::inventory`]).
    pub fn new(
        out: W,
        inventory: &proto::Inventory,
        compression: Compression,
    ) -> Result<Self, ImageError> {
        const OP: &str = "ImageWriter::new";
        let mut inv = inventory.clone();
        inv.format_major = u32::from(FORMAT_MAJOR);
        inv.format_minor = u32::from(FORMAT_MINOR);
        inv.compression = compression.to_string();
        if inv.page_size == 0 {
            inv.page_size = PAGE_SIZE as u32;
        }
        if inv.page_size as usize != PAGE_SIZE {
            return Err(ImageError::InvalidInput {
                op: OP,
                reason: format!(
                    "page size {} unsupported (format 1.x stores 4096-byte pages)",
                    inv.page_size
                ),
            });
        }
        if inv.image_id.is_empty() {
            inv.image_id = new_image_id()?;
        }
        let encoder = ChunkEncoder::new(compression)?;
        let mut w = Self {
            out: BufWriter::with_capacity(256 << 10, out),
            pos: 0,
            frames: 0,
            failed: false,
            encoder,
            scratch: Vec::new(),
            inventory: inv,
            index: proto::ImageIndex::default(),
            spans: SpanSet::default(),
            stats: WriteStats::default(),
        };
        w.write_raw(OP, &encode_file_header())?;
        w.index.inventory_offset = w.pos;
        let payload = w.inventory.encode_to_vec();
        w.write_record(OP, FrameKind::Inventory, &payload)?;
        Ok(w)
    }

    /// The inventory as written (with the fields the writer filled in).
    pub fn inventory(&self) -> &proto::Inventory {
        &self.inventory
    }

    /// The compression this writer uses.
    pub fn compression(&self) -> Compression {
        self.encoder.compression()
    }

    /// Bytes written so far (the file offset of the next frame).
    pub fn bytes_written(&self) -> u64 {
        self.pos
    }

    /// Appends a PROCESS record.
    pub fn write_process(&mut self, p: &proto::Process) -> Result<(), ImageError> {
        const OP: &str = "write_process";
        if self.index.process_offsets.len() >= MAX_PROCESSES {
            return Err(ImageError::InvalidInput {
                op: OP,
                reason: format!("more than {MAX_PROCESSES} processes"),
            });
        }
        let payload = p.encode_to_vec();
        let offset = self.pos;
        self.write_record(OP, FrameKind::Process, &payload)?;
        self.index.process_offsets.push(offset);
        self.stats.processes += 1;
        Ok(())
    }

    /// Appends one page chunk (a PAGE_CHUNK frame and its PAGE_DATA frame, after a PAD frame
    /// when raw data needs aligning).
    ///
    /// `data` = concatenated contents of the DATA runs, in run order (len == 4096*data pages).
    /// Runs must follow the chunk rules (see [`crate::chunk`]) and must not overlap pages of
    /// an earlier chunk of the same space.
    pub fn write_chunk(
        &mut self,
        space: SpaceKind,
        space_id: u64,
        runs: &[proto::PageRun],
        data: &[u8],
    ) -> Result<ChunkStats, ImageError> {
        let raw_hash = hash(data);
        // Taken out of self so the payload can borrow it while frames are written.
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = match self.encoder.compress(data, &mut scratch) {
            Ok(encoding) => {
                let (payload, payload_hash) = match encoding {
                    Encoding::Zstd => (&scratch[..], hash(&scratch)),
                    _ => (data, raw_hash),
                };
                let data = Payload {
                    raw: data,
                    raw_hash,
                    encoding,
                    payload,
                    payload_hash,
                };
                self.write_chunk_inner(space, space_id, runs, data)
            }
            Err(e) => Err(e),
        };
        self.scratch = scratch;
        result
    }

    /// Like [`ImageWriter::write_chunk`], for data already hashed and compressed by a
    /// [`ChunkEncoder`] (typically on the threads that read the pages, so the writer only
    /// writes). The encoder must use this writer's compression; the frames are the ones
    /// `write_chunk` writes for the same data.
    pub fn write_encoded_chunk(
        &mut self,
        space: SpaceKind,
        space_id: u64,
        runs: &[proto::PageRun],
        chunk: &EncodedChunk,
    ) -> Result<ChunkStats, ImageError> {
        if chunk.compression != self.compression() {
            return Err(ImageError::InvalidInput {
                op: "write_chunk",
                reason: format!(
                    "chunk encoded with compression {}, image uses {}",
                    chunk.compression,
                    self.compression()
                ),
            });
        }
        let data = Payload {
            raw: &chunk.raw,
            raw_hash: chunk.raw_hash,
            encoding: chunk.encoding,
            payload: chunk.payload(),
            payload_hash: chunk.payload_hash,
        };
        self.write_chunk_inner(space, space_id, runs, data)
    }

    /// Checks the chunk and writes it.
    fn write_chunk_inner(
        &mut self,
        space: SpaceKind,
        space_id: u64,
        runs: &[proto::PageRun],
        data: Payload<'_>,
    ) -> Result<ChunkStats, ImageError> {
        const OP: &str = "write_chunk";
        let invalid = |reason: String| ImageError::InvalidInput { op: OP, reason };
        if self.failed {
            return Err(ImageError::WriterFailed { op: OP });
        }
        if space == SpaceKind::Unspecified {
            return Err(invalid("space kind unspecified".into()));
        }
        if self.index.chunks.len() >= MAX_CHUNKS {
            return Err(invalid(format!("more than {MAX_CHUNKS} chunks")));
        }
        let t = check_runs(runs, self.inventory.parent.is_some()).map_err(invalid)?;
        let raw_len = t.data_pages * PAGE;
        if data.raw.len() as u64 != raw_len {
            return Err(invalid(format!(
                "data is {} bytes, runs have {} data pages ({raw_len} bytes)",
                data.raw.len(),
                t.data_pages
            )));
        }
        self.spans
            .check(space, space_id, t.vaddr_start, t.vaddr_end)
            .map_err(invalid)?;
        let encoding = data.encoding;
        let stored = data.payload.len() as u64;
        let record = proto::PageChunk {
            space: space as i32,
            space_id,
            runs: runs.to_vec(),
            encoding: encoding as i32,
            raw_len,
            stored_len: stored,
            raw_hash: data.raw_hash.to_vec(),
        }
        .encode_to_vec();
        let (chunk_offset, data_frame) =
            self.emit_chunk(&record, encoding, data.payload, data.payload_hash)?;
        self.spans.add(space, space_id, t.vaddr_start, t.vaddr_end);
        self.index.chunks.push(proto::ChunkIndexEntry {
            space: space as i32,
            space_id,
            vaddr_start: t.vaddr_start,
            vaddr_end: t.vaddr_end,
            chunk_offset,
            data_offset: data_frame + FRAME_HEADER_LEN as u64,
            data_len: stored,
            encoding: encoding as i32,
            raw_len,
        });
        let cs = ChunkStats {
            data_pages: t.data_pages,
            zero_pages: t.zero_pages,
            parent_pages: t.parent_pages,
            raw_bytes: raw_len,
            stored_bytes: stored,
        };
        let s = &mut self.stats;
        s.chunks += 1;
        s.data_pages += cs.data_pages;
        s.zero_pages += cs.zero_pages;
        s.parent_pages += cs.parent_pages;
        s.raw_bytes += cs.raw_bytes;
        s.stored_bytes += cs.stored_bytes;
        Ok(cs)
    }

    /// Writes [PAD] PAGE_CHUNK PAGE_DATA; returns the offsets of the PAGE_CHUNK and PAGE_DATA
    /// frames. Any I/O failure poisons the writer.
    fn emit_chunk(
        &mut self,
        record: &[u8],
        encoding: Encoding,
        payload: &[u8],
        payload_hash: [u8; 32],
    ) -> Result<(u64, u64), ImageError> {
        const OP: &str = "write_chunk";
        if encoding == Encoding::Raw && !payload.is_empty() {
            let fixed = 2 * FRAME_HEADER_LEN as u64 + record.len() as u64;
            let mut gap = (PAGE - (self.pos + fixed) % PAGE) % PAGE;
            if gap != 0 && gap < FRAME_HEADER_LEN as u64 {
                gap += PAGE;
            }
            if gap != 0 {
                self.write_pad(OP, gap - FRAME_HEADER_LEN as u64)?;
            }
        }
        let chunk_offset = self.pos;
        self.write_record(OP, FrameKind::PageChunk, record)?;
        let data_frame = self.pos;
        let hdr = FrameHeader {
            kind: FrameKind::PageData,
            len: payload.len() as u64,
            payload_hash,
        };
        self.write_frame(OP, &hdr, payload)?;
        Ok((chunk_offset, data_frame))
    }

    /// Writes the INDEX and END frames, flushes, and returns the sink.
    pub fn finish(mut self) -> Result<(W, WriteStats), ImageError> {
        const OP: &str = "ImageWriter::finish";
        let index = self.index.encode_to_vec();
        if index.len() as u64 > MAX_INDEX_LEN {
            return Err(ImageError::InvalidInput {
                op: OP,
                reason: format!("index is {} bytes, limit {MAX_INDEX_LEN}", index.len()),
            });
        }
        let index_offset = self.pos;
        self.write_record(OP, FrameKind::Index, &index)?;
        let end = EndPayload {
            index_offset,
            frames: self.frames + 1,
        }
        .encode();
        self.write_record(OP, FrameKind::End, &end)?;
        let pos = self.pos;
        let out = self.out.into_inner().map_err(|e| ImageError::Io {
            op: "flushing image",
            offset: pos,
            err: e.into_error(),
        })?;
        let mut stats = self.stats;
        stats.image_bytes = pos;
        Ok((out, stats))
    }

    fn write_pad(&mut self, op: &'static str, len: u64) -> Result<(), ImageError> {
        // Pad payloads are < 2 pages; hash them from a zero buffer without allocating.
        let len = len as usize;
        let mut h = blake3::Hasher::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(PAGE_SIZE);
            h.update(&ZEROS[..n]);
            left -= n;
        }
        let hdr = FrameHeader {
            kind: FrameKind::Pad,
            len: len as u64,
            payload_hash: *h.finalize().as_bytes(),
        };
        self.write_raw(op, &hdr.encode())?;
        let mut left = len;
        while left > 0 {
            let n = left.min(PAGE_SIZE);
            self.write_raw(op, &ZEROS[..n])?;
            left -= n;
        }
        self.frames += 1;
        Ok(())
    }

    fn write_record(
        &mut self,
        op: &'static str,
        kind: FrameKind,
        payload: &[u8],
    ) -> Result<(), ImageError> {
        if payload.len() as u64 > kind.max_len() {
            return Err(ImageError::InvalidInput {
                op,
                reason: format!(
                    "{kind} record is {} bytes, limit {}",
                    payload.len(),
                    kind.max_len()
                ),
            });
        }
        let hdr = FrameHeader {
            kind,
            len: payload.len() as u64,
            payload_hash: hash(payload),
        };
        self.write_frame(op, &hdr, payload)
    }

    fn write_frame(
        &mut self,
        op: &'static str,
        hdr: &FrameHeader,
        payload: &[u8],
    ) -> Result<(), ImageError> {
        self.write_raw(op, &hdr.encode())?;
        self.write_raw(op, payload)?;
        self.frames += 1;
        Ok(())
    }

    fn write_raw(&mut self, op: &'static str, bytes: &[u8]) -> Result<(), ImageError> {
        if self.failed {
            return Err(ImageError::WriterFailed { op });
        }
        if let Err(source) = self.out.write_all(bytes) {
            self.failed = true;
            return Err(ImageError::Io {
                op,
                offset: self.pos,
                err: source,
            });
        }
        self.pos += bytes.len() as u64;
        Ok(())
    }
}

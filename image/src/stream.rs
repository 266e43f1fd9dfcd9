//! Sequential reader over any byte stream (pipe, socket, file), with full validation: every
//! header, every hash (page data included), the frame order, INDEX and END.

use std::io::{ErrorKind, Read};

use crate::error::ImageError;
use crate::frame::{parse_file_header, FrameHeader, FILE_HEADER_LEN, FRAME_HEADER_LEN};
use crate::proto;
use crate::validate::{Sequencer, Step};
use crate::verify::VerifyReport;

/// One record of an image, in stream order. PAD frames are skipped.
// One value per frame, moved once: boxing the large variants buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Inventory(proto::Inventory),
    Process(proto::Process),
    /// A page chunk and its decoded, hash-verified data.
    Chunk {
        chunk: proto::PageChunk,
        data: Vec<u8>,
    },
    Index(proto::ImageIndex),
    /// The END frame; [`StreamReader::next_record`] returns `None` after it.
    End,
}

/// Reads an image frame by frame from `R`. Nothing is trusted until checked; lengths are
/// bounded before buffers grow, and buffers grow only as bytes actually arrive.
pub struct StreamReader<R: Read> {
    r: R,
    pos: u64,
    version: (u16, u16),
    seq: Sequencer,
    pending_chunk: Option<proto::PageChunk>,
    /// Offset of the frame that failed; the reader is fused after an error.
    failed_at: Option<u64>,
}

/// Reads exactly `buf.len()` bytes; returns how many arrived before EOF.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8], pos: u64) -> Result<usize, ImageError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ImageError::Io {
                    op: "reading image stream",
                    offset: pos + got as u64,
                    err: source,
                })
            }
        }
    }
    Ok(got)
}

impl<R: Read> StreamReader<R> {
    /// Reads and validates the file header.
    pub fn new(mut r: R) -> Result<Self, ImageError> {
        let mut h = [0u8; FILE_HEADER_LEN];
        let got = read_full(&mut r, &mut h, 0)?;
        if got < FILE_HEADER_LEN {
            return Err(ImageError::Truncated {
                offset: 0,
                what: "file header",
                needed: FILE_HEADER_LEN as u64,
                available: got as u64,
            });
        }
        let version = parse_file_header(&h)?;
        Ok(Self {
            r,
            pos: FILE_HEADER_LEN as u64,
            version,
            seq: Sequencer::new(),
            pending_chunk: None,
            failed_at: None,
        })
    }

    /// Format version from the file header.
    pub fn version(&self) -> (u16, u16) {
        self.version
    }

    /// Stream offset of the next frame.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Totals of what was read so far.
    pub fn report(&self) -> VerifyReport {
        let mut r = self.seq.report().clone();
        r.file_bytes = self.pos;
        r
    }

    /// The underlying reader.
    pub fn into_inner(self) -> R {
        self.r
    }

    /// The next record, `Ok(None)` after END. Does not read past END. After an error every
    /// further call fails too (the stream position is no longer trustworthy).
    pub fn next_record(&mut self) -> Result<Option<Record>, ImageError> {
        if let Some(offset) = self.failed_at {
            return Err(ImageError::invalid(
                offset,
                "stream",
                "reader stopped by an earlier error at this offset",
            ));
        }
        let r = self.read_record();
        if r.is_err() {
            self.failed_at = Some(self.pos);
        }
        r
    }

    fn read_record(&mut self) -> Result<Option<Record>, ImageError> {
        loop {
            if self.seq.is_done() {
                return Ok(None);
            }
            let offset = self.pos;
            let mut hb = [0u8; FRAME_HEADER_LEN];
            let got = read_full(&mut self.r, &mut hb, offset)?;
            if got == 0 {
                self.seq.finish(offset)?;
            }
            if got < FRAME_HEADER_LEN {
                return Err(ImageError::Truncated {
                    offset,
                    what: "frame header",
                    needed: FRAME_HEADER_LEN as u64,
                    available: got as u64,
                });
            }
            let hdr = FrameHeader::parse(&hb, offset)?;
            let payload = self.read_payload(&hdr, offset)?;
            self.pos = offset + FRAME_HEADER_LEN as u64 + hdr.len;
            let rec = match self.seq.frame(offset, &hdr, &payload)? {
                Step::Pad => continue,
                Step::ChunkHeader(c) => {
                    self.pending_chunk = Some(c);
                    continue;
                }
                Step::Data(c) => {
                    let data = c.decode_data(&payload)?.into_owned();
                    let chunk = self.pending_chunk.take().ok_or_else(|| {
                        ImageError::invalid(offset, "PAGE_DATA", "no preceding PAGE_CHUNK")
                    })?;
                    Record::Chunk { chunk, data }
                }
                Step::Inventory(i) => Record::Inventory(i),
                Step::Process(p) => Record::Process(p),
                Step::Index(i) => Record::Index(i),
                Step::End => Record::End,
            };
            return Ok(Some(rec));
        }
    }

    fn read_payload(&mut self, hdr: &FrameHeader, offset: u64) -> Result<Vec<u8>, ImageError> {
        // hdr.len is bounded by FrameHeader::parse (<= 256 MiB); grow with the data instead of
        // trusting the length for the allocation.
        const INITIAL: u64 = 1 << 20;
        let len = hdr.len;
        let mut buf = Vec::with_capacity(len.min(INITIAL) as usize);
        let payload_at = offset + FRAME_HEADER_LEN as u64;
        (&mut self.r)
            .take(len)
            .read_to_end(&mut buf)
            .map_err(|source| ImageError::Io {
                op: "reading image stream",
                offset: payload_at,
                err: source,
            })?;
        if (buf.len() as u64) < len {
            return Err(ImageError::Truncated {
                offset: payload_at,
                what: hdr.kind.name(),
                needed: len,
                available: buf.len() as u64,
            });
        }
        Ok(buf)
    }
}

/// Reads a whole image from `r`, checking everything, and requires the stream to end right
/// after END.
pub fn verify_stream<R: Read>(r: R) -> Result<VerifyReport, ImageError> {
    let mut s = StreamReader::new(r)?;
    while s.next_record()?.is_some() {}
    let end = s.position();
    let mut extra = [0u8; 1];
    if read_full(&mut s.r, &mut extra, end)? != 0 {
        return Err(ImageError::TrailingData { offset: end });
    }
    Ok(s.report())
}

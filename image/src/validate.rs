//! The sequential rules of an image: which frame may follow which, what each record must hold,
//! and that INDEX and END agree with the frames actually seen. Used by the stream reader and by
//! [`crate::Image::verify`], so both check exactly the same things.

use crate::chunk::{ChunkRef, SpanSet};
use crate::error::ImageError;
use crate::frame::{decode, EndPayload, FrameHeader, FrameKind, FRAME_HEADER_LEN};
use crate::limits::{MAX_CHUNKS, MAX_PROCESSES};
use crate::proto;
use crate::verify::VerifyReport;
use crate::{FORMAT_MAJOR, PAGE_SIZE};

/// Checks an inventory record (frame at `offset`).
pub(crate) fn check_inventory(inv: &proto::Inventory, offset: u64) -> Result<(), ImageError> {
    if inv.format_major != u32::from(FORMAT_MAJOR) {
        return Err(ImageError::invalid(
            offset,
            "INVENTORY",
            format!(
                "format_major {} differs from the file header's {FORMAT_MAJOR}",
                inv.format_major
            ),
        ));
    }
    if inv.page_size as usize != PAGE_SIZE {
        return Err(ImageError::invalid(
            offset,
            "INVENTORY",
            format!(
                "page_size {} unsupported (must be {PAGE_SIZE})",
                inv.page_size
            ),
        ));
    }
    Ok(())
}

/// What a frame turned out to be.
// One value per frame, moved once: boxing the large variants buys nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Step {
    Inventory(proto::Inventory),
    Process(proto::Process),
    Pad,
    /// A PAGE_CHUNK record; its PAGE_DATA must come next.
    ChunkHeader(proto::PageChunk),
    /// A PAGE_DATA frame whose header matched its chunk; the caller checks the payload with
    /// [`ChunkRef::decode_data`] (the sequencer does not hash page data).
    Data(Box<ChunkRef>),
    Index(proto::ImageIndex),
    End,
}

enum State {
    Start,
    Body,
    AwaitData(Box<ChunkRef>),
    AfterIndex { index_offset: u64 },
    Done { end: u64 },
}

/// Sequential validator; feed it every frame in file order.
pub(crate) struct Sequencer {
    state: State,
    has_parent: bool,
    built: proto::ImageIndex,
    spans: SpanSet,
    report: VerifyReport,
}

impl Sequencer {
    pub(crate) fn new() -> Self {
        Self {
            state: State::Start,
            has_parent: false,
            built: proto::ImageIndex::default(),
            spans: SpanSet::default(),
            report: VerifyReport::default(),
        }
    }

    pub(crate) fn report(&self) -> &VerifyReport {
        &self.report
    }

    /// True once END was accepted.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.state, State::Done { .. })
    }

    /// Accepts the frame at `offset`. `payload` is its full payload; it is hash-checked here
    /// for every kind except PAGE_DATA.
    pub(crate) fn frame(
        &mut self,
        offset: u64,
        hdr: &FrameHeader,
        payload: &[u8],
    ) -> Result<Step, ImageError> {
        let kind = hdr.kind;
        if let State::Done { end } = self.state {
            return Err(ImageError::TrailingData { offset: end });
        }
        if kind != FrameKind::PageData {
            hdr.check_payload(offset, payload)?;
        }
        let unexpected = |expected: &str| {
            ImageError::invalid(
                offset,
                kind.name(),
                format!("unexpected {kind} frame: expected {expected}"),
            )
        };
        self.report.frames += 1;
        let state = std::mem::replace(&mut self.state, State::Body);
        let step = match (state, kind) {
            (State::Start, FrameKind::Inventory) => {
                let inv: proto::Inventory = decode(payload, offset, kind)?;
                check_inventory(&inv, offset)?;
                self.has_parent = inv.parent.is_some();
                self.built.inventory_offset = offset;
                Step::Inventory(inv)
            }
            (State::Start, _) => return Err(unexpected("INVENTORY as the first frame")),
            (State::Body, FrameKind::Process) => {
                if self.built.process_offsets.len() >= MAX_PROCESSES {
                    return Err(ImageError::invalid(
                        offset,
                        kind.name(),
                        format!("more than {MAX_PROCESSES} processes"),
                    ));
                }
                let p: proto::Process = decode(payload, offset, kind)?;
                self.built.process_offsets.push(offset);
                self.report.processes += 1;
                Step::Process(p)
            }
            (State::Body, FrameKind::Pad) => {
                if payload.iter().any(|&b| b != 0) {
                    return Err(ImageError::invalid(
                        offset,
                        kind.name(),
                        "PAD payload has nonzero bytes",
                    ));
                }
                self.report.pad_bytes += FRAME_HEADER_LEN as u64 + hdr.len;
                Step::Pad
            }
            (State::Body, FrameKind::PageChunk) => {
                if self.built.chunks.len() >= MAX_CHUNKS {
                    return Err(ImageError::invalid(
                        offset,
                        kind.name(),
                        format!("more than {MAX_CHUNKS} chunks"),
                    ));
                }
                let rec: proto::PageChunk = decode(payload, offset, kind)?;
                let mut c = ChunkRef::from_record(rec.clone(), self.has_parent, offset)?;
                c.index = self.built.chunks.len();
                self.spans
                    .insert(c.space, c.space_id, c.vaddr_start, c.vaddr_end)
                    .map_err(|r| ImageError::invalid(offset, kind.name(), r))?;
                self.state = State::AwaitData(Box::new(c));
                Step::ChunkHeader(rec)
            }
            (State::AwaitData(mut c), FrameKind::PageData) => {
                c.attach_data(hdr, offset)?;
                self.built.chunks.push(c.index_entry());
                let r = &mut self.report;
                r.chunks += 1;
                r.data_pages += c.data_pages;
                r.zero_pages += c.zero_pages;
                r.parent_pages += c.parent_pages;
                r.raw_bytes += c.raw_len;
                r.stored_bytes += c.data_len;
                Step::Data(c)
            }
            (State::AwaitData(c), _) => {
                return Err(unexpected(&format!(
                    "PAGE_DATA right after PAGE_CHUNK at offset {}",
                    c.chunk_offset
                )))
            }
            (State::Body, FrameKind::Index) => {
                let index: proto::ImageIndex = decode(payload, offset, kind)?;
                if let Some(diff) = index_difference(&index, &self.built) {
                    return Err(ImageError::invalid(
                        offset,
                        kind.name(),
                        format!("index does not match the frames in the image: {diff}"),
                    ));
                }
                self.state = State::AfterIndex {
                    index_offset: offset,
                };
                Step::Index(index)
            }
            (State::Body, _) => {
                return Err(unexpected("PROCESS, PAD, PAGE_CHUNK or INDEX"));
            }
            (State::AfterIndex { index_offset }, FrameKind::End) => {
                let end = EndPayload::parse(payload, offset)?;
                if end.index_offset != index_offset {
                    return Err(ImageError::invalid(
                        offset,
                        kind.name(),
                        format!(
                            "END names index offset {}, INDEX frame is at {index_offset}",
                            end.index_offset
                        ),
                    ));
                }
                if end.frames != self.report.frames {
                    return Err(ImageError::invalid(
                        offset,
                        kind.name(),
                        format!(
                            "END counts {} frames, the image has {}",
                            end.frames, self.report.frames
                        ),
                    ));
                }
                self.state = State::Done {
                    end: offset + FRAME_HEADER_LEN as u64 + hdr.len,
                };
                Step::End
            }
            (State::AfterIndex { .. }, _) => return Err(unexpected("END after INDEX")),
            (State::Done { .. }, _) => unreachable_done(offset)?,
        };
        Ok(step)
    }

    /// Errors unless END was seen (call at end of input at file offset `offset`).
    pub(crate) fn finish(&self, offset: u64) -> Result<(), ImageError> {
        let what = match self.state {
            State::Done { .. } => return Ok(()),
            State::Start => "INVENTORY frame",
            State::AwaitData(_) => "PAGE_DATA frame",
            State::Body => "INDEX frame",
            State::AfterIndex { .. } => "END frame",
        };
        Err(ImageError::Truncated {
            offset,
            what,
            needed: FRAME_HEADER_LEN as u64,
            available: 0,
        })
    }
}

// The Done state returns before the match; this keeps the match exhaustive without a panic.
fn unreachable_done(offset: u64) -> Result<Step, ImageError> {
    Err(ImageError::TrailingData { offset })
}

/// First difference between a stored and a recomputed index.
pub(crate) fn index_difference(
    stored: &proto::ImageIndex,
    actual: &proto::ImageIndex,
) -> Option<String> {
    if stored.inventory_offset != actual.inventory_offset {
        return Some(format!(
            "inventory offset {} (actual {})",
            stored.inventory_offset, actual.inventory_offset
        ));
    }
    if stored.process_offsets != actual.process_offsets {
        return Some(format!(
            "{} process offsets listed, {} PROCESS frames found (or offsets differ)",
            stored.process_offsets.len(),
            actual.process_offsets.len()
        ));
    }
    if stored.chunks.len() != actual.chunks.len() {
        return Some(format!(
            "{} chunks listed, {} found",
            stored.chunks.len(),
            actual.chunks.len()
        ));
    }
    let (i, (s, a)) = stored
        .chunks
        .iter()
        .zip(&actual.chunks)
        .enumerate()
        .find(|(_, (s, a))| s != a)?;
    Some(format!("chunk {i}: index says {s:?}, frames say {a:?}"))
}

//! Page chunk rules, shared by the writer and every reader.
//!
//! A chunk describes pages of one address space (`space`, `space_id`) as runs:
//! ascending, non-overlapping, page-aligned, `pages > 0`. DATA runs carry their contents in the
//! chunk's PAGE_DATA frame (concatenated in run order); ZERO and PARENT runs carry nothing.
//! PARENT runs are only allowed when the inventory names a parent image.

use std::borrow::Cow;

use crate::compression::zstd_decode;
use crate::error::ImageError;
use crate::frame::{hash, FrameHeader, FRAME_HEADER_LEN};
use crate::limits::{MAX_CHUNK_RAW_LEN, MAX_RUNS_PER_CHUNK};
use crate::proto::{self, Encoding, PageRun, RunKind, SpaceKind};
use crate::PAGE_SIZE;

const PAGE: u64 = PAGE_SIZE as u64;

/// Counts of a validated run list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RunTotals {
    pub data_pages: u64,
    pub zero_pages: u64,
    pub parent_pages: u64,
    pub vaddr_start: u64,
    pub vaddr_end: u64,
}

/// Checks the run rules; the error is a reason without location (callers add it).
pub(crate) fn check_runs(runs: &[PageRun], has_parent: bool) -> Result<RunTotals, String> {
    if runs.is_empty() {
        return Err("chunk has no runs".into());
    }
    if runs.len() > MAX_RUNS_PER_CHUNK {
        return Err(format!(
            "chunk has {} runs, limit {MAX_RUNS_PER_CHUNK}",
            runs.len()
        ));
    }
    let mut t = RunTotals::default();
    let mut prev_end: Option<u64> = None;
    for (i, r) in runs.iter().enumerate() {
        if !r.vaddr.is_multiple_of(PAGE) {
            return Err(format!("run {i}: vaddr {:#x} is not page aligned", r.vaddr));
        }
        if r.pages == 0 {
            return Err(format!("run {i}: zero pages"));
        }
        let end = r
            .pages
            .checked_mul(PAGE)
            .and_then(|len| r.vaddr.checked_add(len))
            .ok_or_else(|| {
                format!(
                    "run {i}: {:#x} + {} pages overflows the address space",
                    r.vaddr, r.pages
                )
            })?;
        if let Some(prev) = prev_end {
            if r.vaddr < prev {
                return Err(format!(
                    "run {i} at {:#x} overlaps or precedes run {} ending at {prev:#x} (runs must ascend)",
                    r.vaddr,
                    i - 1
                ));
            }
        } else {
            t.vaddr_start = r.vaddr;
        }
        prev_end = Some(end);
        t.vaddr_end = end;
        let counter = match RunKind::try_from(r.kind) {
            Ok(RunKind::Data) => &mut t.data_pages,
            Ok(RunKind::Zero) => &mut t.zero_pages,
            Ok(RunKind::Parent) if has_parent => &mut t.parent_pages,
            Ok(RunKind::Parent) => {
                return Err(format!(
                    "run {i}: PARENT pages but the inventory names no parent image"
                ))
            }
            Ok(RunKind::Unspecified) | Err(_) => {
                return Err(format!("run {i}: invalid run kind {}", r.kind))
            }
        };
        // Cannot overflow: each run's pages fit the address space and runs do not overlap.
        *counter += r.pages;
    }
    if t.data_pages > MAX_CHUNK_RAW_LEN / PAGE {
        return Err(format!(
            "chunk holds {} data pages ({} bytes), limit {MAX_CHUNK_RAW_LEN} bytes",
            t.data_pages,
            u128::from(t.data_pages) * u128::from(PAGE)
        ));
    }
    Ok(t)
}

/// One page chunk: its record, validated, and where its frames are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRef {
    /// Position of this chunk in file order (index into [`crate::Image::chunks`]).
    pub index: usize,
    pub space: SpaceKind,
    pub space_id: u64,
    pub runs: Vec<PageRun>,
    pub encoding: Encoding,
    /// Decoded data length (4096 × data pages).
    pub raw_len: u64,
    /// blake3 of the decoded data.
    pub raw_hash: [u8; 32],
    pub data_pages: u64,
    pub zero_pages: u64,
    pub parent_pages: u64,
    /// First page of the first run; end of the last run (exclusive).
    pub vaddr_start: u64,
    pub vaddr_end: u64,
    /// File offset of the PAGE_CHUNK frame header.
    pub chunk_offset: u64,
    /// File offset of the PAGE_DATA frame header.
    pub data_frame_offset: u64,
    /// File offset of the PAGE_DATA payload (a multiple of 4096 for non-empty raw data).
    pub data_offset: u64,
    /// PAGE_DATA payload length (stored bytes).
    pub data_len: u64,
    /// blake3 of the stored PAGE_DATA payload (equals `raw_hash` for raw chunks).
    pub data_hash: [u8; 32],
    /// Data pages before run i (for locating a page inside the data).
    data_before: Vec<u64>,
}

impl ChunkRef {
    /// Validates a decoded PAGE_CHUNK record found at `chunk_offset`.
    pub(crate) fn from_record(
        c: proto::PageChunk,
        has_parent: bool,
        chunk_offset: u64,
    ) -> Result<Self, ImageError> {
        let bad = |reason: String| ImageError::invalid(chunk_offset, "PAGE_CHUNK", reason);
        let space = match SpaceKind::try_from(c.space) {
            Ok(SpaceKind::Unspecified) | Err(_) => {
                return Err(bad(format!("invalid space kind {}", c.space)))
            }
            Ok(s) => s,
        };
        let encoding = match Encoding::try_from(c.encoding) {
            Ok(Encoding::Unspecified) | Err(_) => {
                return Err(bad(format!("invalid encoding {}", c.encoding)))
            }
            Ok(e) => e,
        };
        let t = check_runs(&c.runs, has_parent).map_err(bad)?;
        if c.raw_len != t.data_pages * PAGE {
            return Err(bad(format!(
                "raw_len {} does not match {} data pages ({} bytes)",
                c.raw_len,
                t.data_pages,
                t.data_pages * PAGE
            )));
        }
        let raw_hash: [u8; 32] = c.raw_hash.as_slice().try_into().map_err(|_| {
            bad(format!(
                "raw_hash is {} bytes, expected 32",
                c.raw_hash.len()
            ))
        })?;
        match encoding {
            Encoding::Zstd if c.raw_len == 0 || c.stored_len == 0 || c.stored_len >= c.raw_len => {
                return Err(bad(format!(
                    "zstd chunk must be non-empty and smaller than its raw length \
                     (stored_len {}, raw_len {})",
                    c.stored_len, c.raw_len
                )))
            }
            Encoding::Raw if c.stored_len != c.raw_len => {
                return Err(bad(format!(
                    "raw chunk stored_len {} differs from raw_len {}",
                    c.stored_len, c.raw_len
                )))
            }
            _ => {}
        }
        let mut data_before = Vec::with_capacity(c.runs.len());
        let mut acc = 0u64;
        for r in &c.runs {
            data_before.push(acc);
            if r.kind == RunKind::Data as i32 {
                acc += r.pages;
            }
        }
        Ok(Self {
            index: 0,
            space,
            space_id: c.space_id,
            runs: c.runs,
            encoding,
            raw_len: c.raw_len,
            raw_hash,
            data_pages: t.data_pages,
            zero_pages: t.zero_pages,
            parent_pages: t.parent_pages,
            vaddr_start: t.vaddr_start,
            vaddr_end: t.vaddr_end,
            chunk_offset,
            data_frame_offset: 0,
            data_offset: 0,
            data_len: c.stored_len,
            data_hash: [0; 32],
            data_before,
        })
    }

    /// Checks the PAGE_DATA frame header found at `frame_offset` against this chunk and
    /// records its position. Does not read the payload.
    pub(crate) fn attach_data(
        &mut self,
        hdr: &FrameHeader,
        frame_offset: u64,
    ) -> Result<(), ImageError> {
        let bad = |reason: String| ImageError::invalid(frame_offset, "PAGE_DATA", reason);
        if hdr.len != self.data_len {
            return Err(bad(format!(
                "payload is {} bytes, PAGE_CHUNK at offset {} says stored_len {}",
                hdr.len, self.chunk_offset, self.data_len
            )));
        }
        let data_offset = frame_offset + FRAME_HEADER_LEN as u64;
        if self.encoding == Encoding::Raw {
            if hdr.len > 0 && !data_offset.is_multiple_of(PAGE) {
                return Err(bad(format!(
                    "raw page data at offset {data_offset} is not 4096-aligned"
                )));
            }
            if hdr.payload_hash != self.raw_hash {
                return Err(bad(format!(
                    "payload hash differs from raw_hash of PAGE_CHUNK at offset {}",
                    self.chunk_offset
                )));
            }
        }
        self.data_frame_offset = frame_offset;
        self.data_offset = data_offset;
        self.data_hash = hdr.payload_hash;
        Ok(())
    }

    /// Hash-checks (and for zstd decodes) this chunk's PAGE_DATA payload.
    pub(crate) fn decode_data<'a>(&self, payload: &'a [u8]) -> Result<Cow<'a, [u8]>, ImageError> {
        let offset = self.data_frame_offset;
        if payload.len() as u64 != self.data_len {
            return Err(ImageError::invalid(
                offset,
                "PAGE_DATA",
                format!(
                    "payload is {} bytes, expected {}",
                    payload.len(),
                    self.data_len
                ),
            ));
        }
        if hash(payload) != self.data_hash {
            return Err(ImageError::PayloadHash {
                offset,
                kind: "PAGE_DATA",
            });
        }
        match self.encoding {
            Encoding::Zstd => {
                let raw = zstd_decode(payload, self.raw_len, offset)?;
                if hash(&raw) != self.raw_hash {
                    return Err(ImageError::RawHash {
                        offset,
                        kind: "PAGE_DATA",
                    });
                }
                Ok(Cow::Owned(raw))
            }
            // Raw: data_hash == raw_hash was checked by attach_data.
            _ => Ok(Cow::Borrowed(payload)),
        }
    }

    /// The run holding page `vaddr`, and for DATA runs the byte offset of that page within the
    /// decoded data.
    pub(crate) fn locate(&self, vaddr: u64) -> Option<(usize, RunKind, Option<u64>)> {
        let page = vaddr - vaddr % PAGE;
        let i = self
            .runs
            .partition_point(|r| r.vaddr <= page)
            .checked_sub(1)?;
        let r = self.runs.get(i)?;
        if (page - r.vaddr) / PAGE >= r.pages {
            return None;
        }
        let kind = RunKind::try_from(r.kind).ok()?;
        let data = (kind == RunKind::Data).then(|| {
            (self.data_before.get(i).copied().unwrap_or(0) + (page - r.vaddr) / PAGE) * PAGE
        });
        Some((i, kind, data))
    }

    /// The index entry describing this chunk.
    pub(crate) fn index_entry(&self) -> proto::ChunkIndexEntry {
        proto::ChunkIndexEntry {
            space: self.space as i32,
            space_id: self.space_id,
            vaddr_start: self.vaddr_start,
            vaddr_end: self.vaddr_end,
            chunk_offset: self.chunk_offset,
            data_offset: self.data_offset,
            data_len: self.data_len,
            encoding: self.encoding as i32,
            raw_len: self.raw_len,
        }
    }
}

/// Page ranges already covered by chunks, per space: chunks of one space must not overlap, so
/// that every page has one home and lookups are a binary search.
#[derive(Debug, Default)]
pub(crate) struct SpanSet {
    spans: std::collections::BTreeMap<(i32, u64, u64), u64>,
}

impl SpanSet {
    /// Adds `[start, end)` of a space, or says which earlier span it overlaps.
    pub(crate) fn insert(
        &mut self,
        space: SpaceKind,
        space_id: u64,
        start: u64,
        end: u64,
    ) -> Result<(), String> {
        self.check(space, space_id, start, end)?;
        self.add(space, space_id, start, end);
        Ok(())
    }

    /// Adds a span without checking (after [`SpanSet::check`] said it fits).
    pub(crate) fn add(&mut self, space: SpaceKind, space_id: u64, start: u64, end: u64) {
        self.spans.insert((space as i32, space_id, start), end);
    }

    /// Says which earlier span `[start, end)` of a space overlaps, if any.
    pub(crate) fn check(
        &self,
        space: SpaceKind,
        space_id: u64,
        start: u64,
        end: u64,
    ) -> Result<(), String> {
        let key = (space as i32, space_id, start);
        let lo = (space as i32, space_id, 0);
        let hi = (space as i32, space_id, u64::MAX);
        let before = self.spans.range(lo..=key).next_back();
        let after = self.spans.range(key..=hi).next();
        for (&(_, _, s), &e) in before.into_iter().chain(after) {
            if s < end && start < e {
                return Err(format!(
                    "pages {start:#x}..{end:#x} of {} {space_id} overlap an earlier chunk \
                     covering {s:#x}..{e:#x}",
                    space.as_str_name()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(vaddr: u64, pages: u64, kind: RunKind) -> PageRun {
        PageRun {
            vaddr,
            pages,
            kind: kind as i32,
        }
    }

    #[test]
    fn run_rules() {
        let ok = [run(0x1000, 2, RunKind::Data), run(0x3000, 1, RunKind::Zero)];
        let t = check_runs(&ok, false);
        assert_eq!(t.as_ref().map(|t| (t.data_pages, t.zero_pages)), Ok((2, 1)));
        assert!(check_runs(&[], false).is_err());
        assert!(check_runs(&[run(0x1001, 1, RunKind::Data)], false).is_err());
        assert!(check_runs(&[run(0x1000, 0, RunKind::Data)], false).is_err());
        assert!(check_runs(&[run(0x1000, 1, RunKind::Parent)], false).is_err());
        assert!(check_runs(&[run(0x1000, 1, RunKind::Parent)], true).is_ok());
        let overlap = [run(0x1000, 2, RunKind::Data), run(0x2000, 1, RunKind::Zero)];
        assert!(check_runs(&overlap, false).is_err());
        let order = [run(0x5000, 1, RunKind::Data), run(0x1000, 1, RunKind::Zero)];
        assert!(check_runs(&order, false).is_err());
        assert!(check_runs(&[run(u64::MAX - 4095, 2, RunKind::Zero)], false).is_err());
        assert!(check_runs(&[run(0, 1 << 20, RunKind::Data)], false).is_err());
        assert!(check_runs(&[run(0, 1 << 40, RunKind::Zero)], false).is_ok());
        let bad_kind = PageRun {
            vaddr: 0,
            pages: 1,
            kind: 9,
        };
        assert!(check_runs(&[bad_kind], false).is_err());
    }

    #[test]
    fn span_set() {
        let mut s = SpanSet::default();
        assert!(s.insert(SpaceKind::Process, 1, 0x1000, 0x3000).is_ok());
        assert!(s.insert(SpaceKind::Process, 1, 0x5000, 0x6000).is_ok());
        assert!(s.insert(SpaceKind::Process, 2, 0x1000, 0x3000).is_ok());
        assert!(s.insert(SpaceKind::SharedMemory, 1, 0x1000, 0x3000).is_ok());
        assert!(s.insert(SpaceKind::Process, 1, 0x3000, 0x5000).is_ok());
        assert!(s.insert(SpaceKind::Process, 1, 0x2000, 0x2800).is_err());
        assert!(s.insert(SpaceKind::Process, 1, 0x0, 0x1001).is_err());
        assert!(s.insert(SpaceKind::Process, 1, 0x5fff, 0x7000).is_err());
        assert!(s.insert(SpaceKind::Process, 1, 0x6000, 0x7000).is_ok());
    }
}

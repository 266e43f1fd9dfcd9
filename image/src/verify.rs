//! Whole-image verification: every byte of the file is checked.
//!
//! One sequential pass walks all frames (headers, metadata hashes, PAD zeros, frame order,
//! chunk/data pairing, INDEX == the frames seen, END); page data is then hashed (and zstd
//! decoded) in parallel across chunks, large chunks also across cores within a chunk.

use rayon::prelude::*;

use crate::chunk::ChunkRef;
use crate::error::ImageError;
use crate::frame::FILE_HEADER_LEN;
use crate::reader::{frame_at, Image};
use crate::validate::{Sequencer, Step};

/// What verification saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Frames, INVENTORY through END.
    pub frames: u64,
    pub processes: u64,
    pub chunks: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    pub parent_pages: u64,
    /// Decoded page data bytes.
    pub raw_bytes: u64,
    /// PAGE_DATA payload bytes.
    pub stored_bytes: u64,
    /// Bytes spent on PAD frames (headers included).
    pub pad_bytes: u64,
    /// Bytes of the whole image.
    pub file_bytes: u64,
}

impl Image {
    /// Checks every byte: all frame headers and hashes, PAD zeros, chunk/data pairing,
    /// INDEX == the frames seen, END, nothing after END. Page data is hashed in parallel.
    pub fn verify(&self) -> Result<VerifyReport, ImageError> {
        let (report, data) = self.walk_frames()?;
        // Hash page data in parallel; report the first failure in file order.
        let results: Vec<Result<(), ImageError>> = data
            .par_iter()
            .with_max_len(1)
            .map(|(c, payload)| c.decode_data(payload).map(|_| ()))
            .collect();
        results.into_iter().collect::<Result<(), _>>()?;
        self.set_verified();
        Ok(report)
    }

    /// Everything [`Image::verify`] checks except the page data's hashes: each chunk's data
    /// is still checked when [`Image::chunk_data`] reads it. For a restore that maps page
    /// data instead of reading it, the caller must hash those chunks itself (see
    /// [`Image::verify_chunk`]) before it relies on the result.
    pub fn verify_structure(&self) -> Result<VerifyReport, ImageError> {
        self.walk_frames().map(|(report, _)| report)
    }

    /// Every chunk whose page data does not check (hash, zstd), in file order, each error
    /// naming the chunk's frame offset. Chunks are checked in parallel; unlike
    /// [`Image::verify`] this does not stop at the first bad one, so a reader can say which
    /// chunks are corrupt.
    pub fn corrupt_chunks(&self) -> Vec<ImageError> {
        self.chunks()
            .par_iter()
            .with_max_len(1)
            .filter_map(|c| self.verify_chunk(c).err())
            .collect()
    }

    /// Hash-checks (and for zstd decodes) one chunk's page data.
    pub fn verify_chunk(&self, chunk: &ChunkRef) -> Result<(), ImageError> {
        let (ours, payload) = self.chunk_payload(chunk, "verify_chunk")?;
        ours.decode_data(payload).map(|_| ())
    }

    /// The sequential pass over every frame; returns the report and each chunk's payload.
    #[allow(clippy::type_complexity)]
    fn walk_frames(&self) -> Result<(VerifyReport, Vec<(Box<ChunkRef>, &[u8])>), ImageError> {
        let bytes = self.bytes();
        let file_len = bytes.len() as u64;
        let mut seq = Sequencer::new();
        let mut data: Vec<(Box<ChunkRef>, &[u8])> = Vec::with_capacity(self.chunks().len());
        let mut offset = FILE_HEADER_LEN as u64;
        while !seq.is_done() {
            if offset == file_len {
                seq.finish(offset)?;
            }
            let (hdr, payload) = frame_at(bytes, offset, None)?;
            if let Step::Data(c) = seq.frame(offset, &hdr, payload)? {
                data.push((c, payload));
            }
            offset += crate::frame::FRAME_HEADER_LEN as u64 + hdr.len;
        }
        if offset != file_len {
            return Err(ImageError::TrailingData { offset });
        }
        let mut report = seq.report().clone();
        report.file_bytes = file_len;
        Ok((report, data))
    }
}

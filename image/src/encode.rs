//! Encoding page data into a chunk's PAGE_DATA payload apart from the writer, so several
//! threads can hash and compress while one [`crate::ImageWriter`] only writes
//! ([`crate::ImageWriter::write_encoded_chunk`]). The frames written are byte for byte
//! those [`crate::ImageWriter::write_chunk`] writes for the same data.

use crate::compression::Compression;
use crate::error::ImageError;
use crate::frame::hash;
use crate::proto::Encoding;

/// Encodes page data with one compression setting; one per thread (it holds a zstd
/// context).
pub struct ChunkEncoder {
    compression: Compression,
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

/// A chunk's page data, hashed and (when it shrinks) compressed.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    pub(crate) compression: Compression,
    pub(crate) encoding: Encoding,
    pub(crate) raw_hash: [u8; 32],
    /// The page data as given.
    pub(crate) raw: Vec<u8>,
    /// The zstd frame; holds the payload only when `encoding` is zstd (kept otherwise so
    /// its allocation can be reused).
    pub(crate) zstd: Vec<u8>,
    pub(crate) payload_hash: [u8; 32],
}

impl ChunkEncoder {
    /// An encoder for images written with `compression`.
    pub fn new(compression: Compression) -> Result<Self, ImageError> {
        let compressor = match compression {
            Compression::None => None,
            Compression::Zstd(level) => {
                Some(
                    zstd::bulk::Compressor::new(level).map_err(|e| ImageError::InvalidInput {
                        op: "ChunkEncoder::new",
                        reason: format!("zstd level {level}: {e}"),
                    })?,
                )
            }
        };
        Ok(Self {
            compression,
            compressor,
        })
    }

    /// The compression this encoder applies.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Hashes `data` (the concatenated DATA pages of a chunk) and compresses it into `zstd`
    /// (a buffer to reuse, e.g. from [`EncodedChunk::into_buffers`]) when that makes it
    /// smaller; data that does not shrink is stored raw.
    pub fn encode(&mut self, data: Vec<u8>, mut zstd: Vec<u8>) -> Result<EncodedChunk, ImageError> {
        let raw_hash = hash(&data);
        let encoding = self.compress(&data, &mut zstd)?;
        let payload_hash = match encoding {
            Encoding::Zstd => hash(&zstd),
            _ => raw_hash,
        };
        Ok(EncodedChunk {
            compression: self.compression,
            encoding,
            raw_hash,
            raw: data,
            zstd,
            payload_hash,
        })
    }

    /// Compresses `data` into `out` if compression is on and makes it smaller; returns the
    /// encoding the payload gets (zstd: `out`, raw: `data`).
    pub(crate) fn compress(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Encoding, ImageError> {
        let Some(c) = self.compressor.as_mut().filter(|_| !data.is_empty()) else {
            return Ok(Encoding::Raw);
        };
        out.clear();
        out.reserve(zstd::zstd_safe::compress_bound(data.len()));
        match c.compress_to_buffer(data, out) {
            Ok(n) if n < data.len() => Ok(Encoding::Zstd),
            Ok(_) => Ok(Encoding::Raw),
            Err(e) => Err(ImageError::InvalidInput {
                op: "write_chunk",
                reason: format!("zstd compression failed: {e}"),
            }),
        }
    }
}

impl EncodedChunk {
    /// The PAGE_DATA payload.
    pub(crate) fn payload(&self) -> &[u8] {
        match self.encoding {
            Encoding::Zstd => &self.zstd,
            _ => &self.raw,
        }
    }

    /// The page data as given to [`ChunkEncoder::encode`].
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// Whether the payload is zstd-compressed (else raw).
    pub fn is_compressed(&self) -> bool {
        self.encoding == Encoding::Zstd
    }

    /// Gives back the raw data and the compression buffer, for reuse.
    pub fn into_buffers(self) -> (Vec<u8>, Vec<u8>) {
        (self.raw, self.zstd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{self, PageRun, RunKind, SpaceKind};
    use crate::{Image, ImageWriter};

    const PAGE: u64 = 4096;

    fn inventory() -> proto::Inventory {
        proto::Inventory {
            image_id: "00112233445566778899aabbccddeeff".into(),
            ..Default::default()
        }
    }

    fn runs(at: u64, data_pages: u64) -> Vec<PageRun> {
        vec![
            PageRun {
                vaddr: at,
                pages: 1,
                kind: RunKind::Zero as i32,
            },
            PageRun {
                vaddr: at + PAGE,
                pages: data_pages,
                kind: RunKind::Data as i32,
            },
        ]
    }

    /// Pages that compress (a repeated byte) and pages that do not (pseudo-random).
    fn samples() -> [Vec<u8>; 2] {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise = (0..3 * PAGE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        [vec![7u8; 2 * PAGE as usize], noise]
    }

    /// The image `write_chunk` makes and the one `write_encoded_chunk` makes.
    fn both(compression: Compression) -> Result<(Vec<u8>, Vec<u8>), ImageError> {
        let mut plain = ImageWriter::new(Vec::new(), &inventory(), compression)?;
        let mut encoded = ImageWriter::new(Vec::new(), &inventory(), compression)?;
        let mut encoder = ChunkEncoder::new(compression)?;
        for (i, data) in samples().into_iter().enumerate() {
            let at = (i as u64) << 30;
            let pages = data.len() as u64 / PAGE;
            let a = plain.write_chunk(SpaceKind::Process, 1, &runs(at, pages), &data)?;
            let chunk = encoder.encode(data, Vec::new())?;
            let b = encoded.write_encoded_chunk(SpaceKind::Process, 1, &runs(at, pages), &chunk)?;
            assert_eq!(a, b);
            assert_eq!(
                chunk.is_compressed(),
                compression != Compression::None && i == 0
            );
        }
        Ok((plain.finish()?.0, encoded.finish()?.0))
    }

    #[test]
    fn encoded_chunks_write_the_same_bytes() -> Result<(), ImageError> {
        for compression in [Compression::None, Compression::Zstd(3)] {
            let (plain, encoded) = both(compression)?;
            assert!(plain == encoded, "{compression}: images differ");
            let image = Image::from_bytes(encoded)?;
            image.verify()?;
            assert_eq!(image.chunks().len(), 2);
            assert_eq!(
                image.chunk_data(&image.chunks()[1])?.as_ref(),
                &samples()[1][..]
            );
        }
        Ok(())
    }

    #[test]
    fn encoded_chunk_must_match_the_writer() -> Result<(), ImageError> {
        let mut w = ImageWriter::new(Vec::new(), &inventory(), Compression::None)?;
        let data = samples()[0].clone();
        let zstd = ChunkEncoder::new(Compression::Zstd(3))?.encode(data.clone(), Vec::new())?;
        let err = w.write_encoded_chunk(SpaceKind::Process, 1, &runs(0, 2), &zstd);
        assert!(
            matches!(err, Err(ImageError::InvalidInput { .. })),
            "{err:?}"
        );
        // Data and runs disagree: rejected, nothing written.
        let raw = ChunkEncoder::new(Compression::None)?.encode(data, Vec::new())?;
        let before = w.bytes_written();
        let err = w.write_encoded_chunk(SpaceKind::Process, 1, &runs(0, 3), &raw);
        assert!(
            matches!(err, Err(ImageError::InvalidInput { .. })),
            "{err:?}"
        );
        assert_eq!(w.bytes_written(), before);
        w.write_encoded_chunk(SpaceKind::Process, 1, &runs(0, 2), &raw)?;
        let (raw_back, _) = raw.into_buffers();
        assert_eq!(raw_back, samples()[0]);
        Ok(())
    }
}

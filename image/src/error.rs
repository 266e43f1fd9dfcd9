//! Errors of the image crate. Every variant names the operation or the place in the image
//! (file offset, frame kind) where the problem was found.

use std::path::PathBuf;

use crate::{FORMAT_MAJOR, FORMAT_MINOR};

/// Anything that can go wrong writing or reading an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// An I/O call on an image file failed.
    #[error("{op} {}: {err}", path.display())]
    File {
        op: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    /// Reading or writing the image stream failed.
    #[error("{op} at image offset {offset}: {err}")]
    Io {
        op: &'static str,
        offset: u64,
        err: std::io::Error,
    },
    /// The image ends before a structure it announces.
    #[error("image truncated at offset {offset}: {what} needs {needed} bytes, {available} left")]
    Truncated {
        offset: u64,
        what: &'static str,
        needed: u64,
        available: u64,
    },
    /// A magic number does not match.
    #[error("bad magic at offset {offset}: {what} should start with {expected:?}, found {found}")]
    BadMagic {
        offset: u64,
        what: &'static str,
        expected: &'static str,
        found: String,
    },
    /// The file header names a format this build cannot read.
    #[error(
        "image format {major}.{minor} is newer than this stasis supports ({FORMAT_MAJOR}.x, up to {FORMAT_MAJOR}.{FORMAT_MINOR})"
    )]
    NewerFormat { major: u16, minor: u16 },
    /// The file header names a format that never existed.
    #[error("image format {major}.{minor} is not a valid stasis image format")]
    InvalidFormat { major: u16, minor: u16 },
    /// A header's check value does not match its contents.
    #[error("{what} at offset {offset}: header check mismatch (header corrupt)")]
    HeaderCheck { offset: u64, what: &'static str },
    /// A frame header names a kind this build does not know.
    #[error("frame at offset {offset}: unknown frame kind {kind}")]
    UnknownFrameKind { offset: u64, kind: u32 },
    /// A length read from the image exceeds its limit (checked before allocating).
    #[error("record length {len} at offset {offset} ({kind}) exceeds limit {limit}")]
    TooLong {
        offset: u64,
        kind: &'static str,
        len: u64,
        limit: u64,
    },
    /// A frame's payload does not hash to the value in its header.
    #[error("frame at offset {offset} ({kind}): payload hash mismatch")]
    PayloadHash { offset: u64, kind: &'static str },
    /// Decoded page data does not hash to `PageChunk.raw_hash`.
    #[error("frame at offset {offset} ({kind}): decoded page data hash mismatch (raw_hash)")]
    RawHash { offset: u64, kind: &'static str },
    /// A protobuf record does not decode.
    #[error("frame at offset {offset} ({kind}): protobuf decode failed: {err}")]
    Decode {
        offset: u64,
        kind: &'static str,
        err: prost::DecodeError,
    },
    /// A zstd payload does not decode.
    #[error("frame at offset {offset} ({kind}): zstd decode failed: {reason}")]
    Zstd {
        offset: u64,
        kind: &'static str,
        reason: String,
    },
    /// A frame is well formed but its contents or position break a format rule.
    #[error("frame at offset {offset} ({kind}): {reason}")]
    Invalid {
        offset: u64,
        kind: &'static str,
        reason: String,
    },
    /// Bytes follow the END frame.
    #[error("trailing data after END frame: image should end at offset {offset}")]
    TrailingData { offset: u64 },
    /// A writer method was called with arguments that cannot be written.
    #[error("{op}: {reason}")]
    InvalidInput { op: &'static str, reason: String },
    /// A previous write failed; the image is incomplete and the writer refuses more work.
    #[error("{op}: an earlier write failed; the image is incomplete")]
    WriterFailed { op: &'static str },
    /// A compression setting string does not parse.
    #[error(
        "invalid compression {0:?}: expected \"none\", \"zstd\" or \"zstd:LEVEL\" (LEVEL {1})"
    )]
    BadCompression(String, String),
}

impl ImageError {
    pub(crate) fn invalid(offset: u64, kind: &'static str, reason: impl Into<String>) -> Self {
        ImageError::Invalid {
            offset,
            kind,
            reason: reason.into(),
        }
    }
}

//! The stasis image format: one file (or stream) holding a checkpointed workload.
//!
//! This crate knows only the format; it never touches processes or `/proc`.
//!
//! # Layout (format 1.0)
//!
//! ```text
//! offset 0   file header, 64 bytes: "STASISIM" | major u16 LE | minor u16 LE |
//!            header_len u32 LE (64) | flags u64 (0) | 32 reserved zero bytes |
//!            check = blake3(bytes 0..56)[..8]
//! offset 64  frames, back to back:
//!              frame header, 64 bytes: "SFRM" | kind u32 LE | flags u32 (0) | reserved u32 (0) |
//!                                      len u64 LE | blake3(payload) | blake3(bytes 0..56)[..8]
//!              payload, `len` bytes
//! ```
//!
//! Frame kinds and order (see [`frame`] for details):
//!
//! | kind | name       | payload                                                         |
//! |------|------------|-----------------------------------------------------------------|
//! | 1    | INVENTORY  | protobuf `Inventory`; the first frame                           |
//! | 2    | PROCESS    | protobuf `Process`                                              |
//! | 3    | PAGE_CHUNK | protobuf `PageChunk`; the next frame is its PAGE_DATA           |
//! | 4    | PAGE_DATA  | raw pages (4096-aligned payload offset) or one zstd frame       |
//! | 5    | PAD        | zero bytes; placed before a PAGE_CHUNK to align its raw data    |
//! | 6    | INDEX      | protobuf `ImageIndex` (offsets of every record); before END     |
//! | 7    | END        | index offset u64 LE, frame count u64 LE, 16 zero bytes; last    |
//!
//! `INVENTORY (PROCESS | PAD | PAGE_CHUNK PAGE_DATA)* INDEX END`, and the file ends right after
//! END, so a random-access reader finds END at `file_len - 96` and the INDEX through it. Frame
//! count in END counts every frame, INVENTORY through END.
//!
//! Page data: a chunk describes pages of one space as ascending, non-overlapping runs (DATA,
//! ZERO, PARENT); only DATA pages are stored, concatenated. Raw data is page-aligned in the file
//! (so restore can mmap it) and its frame hash *is* the chunk's `raw_hash`; zstd data is one
//! zstd frame whose frame hash covers the compressed bytes and `raw_hash` the decoded ones.
//! Chunks of one space never overlap each other.
//!
//! Every length is bounded ([`limits`]) before anything is allocated, every hash is checked,
//! and no input makes this crate panic.
//!
//! # Reading and writing
//!
//! - [`ImageWriter`]: forward-only (pipes, sockets).
//! - [`Image`]: random access over an mmap; [`Image::verify`] checks every byte.
//! - [`StreamReader`]: sequential, fully validating reader over any [`std::io::Read`];
//!   [`verify_stream`] checks a whole stream.
//! - [`inspect::report`]: everything in an image, as JSON or a human summary.

pub mod chunk;
pub mod compression;
pub mod encode;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod inspect;
pub mod inspect_vm;
pub mod limits;
pub mod proto;
pub mod reader;
pub mod stream;
mod validate;
pub mod verify;
pub mod writer;

pub use chunk::ChunkRef;
pub use compression::Compression;
pub use encode::{ChunkEncoder, EncodedChunk};
pub use error::ImageError;
pub use frame::FrameKind;
pub use reader::{Image, PageLocation};
pub use stream::{verify_stream, Record, StreamReader};
pub use verify::VerifyReport;
pub use writer::{new_image_id, ChunkStats, ImageWriter, WriteStats};

/// Major format version written by this crate; readers reject images with a larger one.
pub const FORMAT_MAJOR: u16 = 1;
/// Minor format version written by this crate (additions that older 1.x readers may ignore).
pub const FORMAT_MINOR: u16 = 0;
/// Page size of every image in format 1.x.
pub const PAGE_SIZE: usize = 4096;

/// The blake3 hash the format uses for page data (a chunk's `raw_hash`).
pub fn hash_pages(data: &[u8]) -> [u8; 32] {
    frame::hash(data)
}

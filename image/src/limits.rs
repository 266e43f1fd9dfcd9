//! Upper bounds on every length read from an image. Each is checked before anything is
//! allocated, so a hostile length (say 2^40) is an error, never an allocation.

/// Largest payload of a protobuf record frame (INVENTORY, PROCESS, PAGE_CHUNK) and of a PAD frame.
pub const MAX_RECORD_LEN: u64 = 64 << 20;
/// Largest payload of the INDEX frame. Larger than other records because it grows with the
/// number of chunks (~40 bytes each): 256 MiB indexes several million chunks.
pub const MAX_INDEX_LEN: u64 = 256 << 20;
/// Largest decoded page data of one chunk (`PageChunk.raw_len`).
pub const MAX_CHUNK_RAW_LEN: u64 = 64 << 20;
/// Largest PAGE_DATA payload. A zstd payload is always smaller than its raw length (the writer
/// stores a chunk raw when compression does not shrink it), so this equals [`MAX_CHUNK_RAW_LEN`].
pub const MAX_PAGE_DATA_LEN: u64 = MAX_CHUNK_RAW_LEN;
/// Most runs in one chunk.
pub const MAX_RUNS_PER_CHUNK: usize = 1 << 16;
/// Most PROCESS records in one image.
pub const MAX_PROCESSES: usize = 1 << 20;
/// Most chunks in one image.
pub const MAX_CHUNKS: usize = 1 << 24;

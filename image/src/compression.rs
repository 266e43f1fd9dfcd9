//! Chunk compression setting and the zstd encode/decode helpers.

use std::fmt;
use std::str::FromStr;

use crate::error::ImageError;

/// How the writer encodes page data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Raw, page-aligned, mappable.
    #[default]
    None,
    /// One zstd frame per chunk at this level. A chunk that does not shrink is stored raw.
    Zstd(i32),
}

/// Level used by `"zstd"` without an explicit level.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

impl FromStr for Compression {
    type Err = ImageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let range = zstd::compression_level_range();
        let bad = || {
            ImageError::BadCompression(
                s.to_string(),
                format!("{}..={}", range.start(), range.end()),
            )
        };
        match s {
            "none" => Ok(Self::None),
            "zstd" => Ok(Self::Zstd(DEFAULT_ZSTD_LEVEL)),
            _ => {
                let level = s.strip_prefix("zstd:").ok_or_else(bad)?;
                let level: i32 = level.parse().map_err(|_| bad())?;
                if level == 0 || !range.contains(&level) {
                    return Err(bad());
                }
                Ok(Self::Zstd(level))
            }
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Zstd(level) => write!(f, "zstd:{level}"),
        }
    }
}

/// Decodes a zstd PAGE_DATA payload (frame at `offset`) that must decode to exactly
/// `raw_len` bytes. `raw_len` is bounded by the caller, so the allocation is too.
pub(crate) fn zstd_decode(
    payload: &[u8],
    raw_len: u64,
    offset: u64,
) -> Result<Vec<u8>, ImageError> {
    let zerr = |reason: String| ImageError::Zstd {
        offset,
        kind: "PAGE_DATA",
        reason,
    };
    let frame_len = zstd::zstd_safe::find_frame_compressed_size(payload)
        .map_err(|code| zerr(zstd::zstd_safe::get_error_name(code).to_string()))?;
    if frame_len != payload.len() {
        return Err(zerr(format!(
            "payload is {} bytes but its zstd frame is {frame_len}; exactly one frame expected",
            payload.len()
        )));
    }
    let cap = usize::try_from(raw_len).map_err(|_| zerr(format!("raw_len {raw_len} too large")))?;
    let out = zstd::bulk::decompress(payload, cap).map_err(|e| zerr(e.to_string()))?;
    if out.len() != cap {
        return Err(zerr(format!(
            "decoded {} bytes, PAGE_CHUNK raw_len says {raw_len}",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        assert_eq!("none".parse::<Compression>().ok(), Some(Compression::None));
        assert_eq!(
            "zstd".parse::<Compression>().ok(),
            Some(Compression::Zstd(3))
        );
        assert_eq!(
            "zstd:19".parse::<Compression>().ok(),
            Some(Compression::Zstd(19))
        );
        assert_eq!(
            "zstd:-5".parse::<Compression>().ok(),
            Some(Compression::Zstd(-5))
        );
        for bad in ["", "lz4", "zstd:", "zstd:x", "zstd:99", "zstd:0"] {
            assert!(bad.parse::<Compression>().is_err(), "{bad}");
        }
        assert_eq!(Compression::Zstd(7).to_string(), "zstd:7");
        assert_eq!(Compression::default().to_string(), "none");
    }

    #[test]
    fn zstd_decode_bounds() {
        let data = vec![5u8; 10000];
        let z = zstd::bulk::compress(&data, 3).unwrap_or_default();
        assert_eq!(zstd_decode(&z, 10000, 0).ok(), Some(data));
        assert!(zstd_decode(&z, 9999, 0).is_err());
        assert!(zstd_decode(&z, 10001, 0).is_err());
        let mut two = z.clone();
        two.extend_from_slice(&z);
        assert!(zstd_decode(&two, 20000, 0).is_err());
        assert!(zstd_decode(&[1, 2, 3], 10, 0).is_err());
    }
}

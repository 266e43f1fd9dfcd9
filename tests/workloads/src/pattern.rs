//! Deterministic, pid-independent data patterns and checksums.

/// FNV-1a 64-bit offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The splitmix64 finalizer: a good 64-bit mix of `x`.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over bytes.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// A key for a pattern: a mix of the tag seed and a list of identifiers.
pub fn key(seed: u64, ids: &[u64]) -> u64 {
    let mut k = splitmix64(seed);
    for &id in ids {
        k = splitmix64(k ^ id);
    }
    k
}

/// The `i`th word of the pattern with key `k` (never zero).
#[inline]
pub fn word(k: u64, i: usize) -> u64 {
    splitmix64(k ^ (i as u64).wrapping_mul(0xd134_2543_de82_ef95)) | 1
}

/// Fills `buf` with the pattern `k`.
pub fn fill(buf: &mut [u64], k: u64) {
    for (i, w) in buf.iter_mut().enumerate() {
        *w = word(k, i);
    }
}

/// The first word of `buf` that differs from pattern `k`: (index, expected, got).
pub fn first_mismatch(buf: &[u64], k: u64) -> Option<(usize, u64, u64)> {
    for (i, &w) in buf.iter().enumerate() {
        let e = word(k, i);
        if w != e {
            return Some((i, e, w));
        }
    }
    None
}

/// The first non-zero word of `buf`: (index, value).
pub fn first_nonzero(buf: &[u64]) -> Option<(usize, u64)> {
    buf.iter().position(|&w| w != 0).map(|i| (i, buf[i]))
}

/// Byte pattern: byte `i` of pattern `k`.
pub fn byte(k: u64, i: usize) -> u8 {
    (word(k, i / 8) >> ((i % 8) * 8)) as u8
}

/// Fills `buf` with xorshift64 output in four independent lanes (fast; never zero words).
pub fn fill_xorshift(buf: &mut [u64], seed: u64) {
    let mut s = [
        splitmix64(seed) | 1,
        splitmix64(seed ^ 1) | 1,
        splitmix64(seed ^ 2) | 1,
        splitmix64(seed ^ 3) | 1,
    ];
    let mut chunks = buf.chunks_exact_mut(4);
    for c in &mut chunks {
        for l in 0..4 {
            let mut x = s[l];
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s[l] = x;
            c[l] = x;
        }
    }
    for (l, w) in chunks.into_remainder().iter_mut().enumerate() {
        let mut x = s[l];
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
}

/// A position-dependent 64-bit checksum (four FNV-style lanes over words).
pub fn checksum(buf: &[u64]) -> u64 {
    let mut h = [FNV_OFFSET, FNV_OFFSET ^ 1, FNV_OFFSET ^ 2, FNV_OFFSET ^ 3];
    let mut chunks = buf.chunks_exact(4);
    for c in &mut chunks {
        for l in 0..4 {
            h[l] = (h[l] ^ c[l]).wrapping_mul(FNV_PRIME);
        }
    }
    for (l, &w) in chunks.remainder().iter().enumerate() {
        h[l] = (h[l] ^ w).wrapping_mul(FNV_PRIME);
    }
    let mut r = buf.len() as u64;
    for x in h {
        r = splitmix64(r ^ x);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_deterministic_and_nonzero() {
        let mut a = vec![0u64; 1000];
        fill(&mut a, key(1, &[2, 3]));
        assert!(first_mismatch(&a, key(1, &[2, 3])).is_none());
        assert!(first_mismatch(&a, key(1, &[2, 4])).is_some());
        assert!(a.iter().all(|&w| w != 0));
        let mut b = vec![0u64; 1003];
        fill_xorshift(&mut b, 7);
        assert!(b.iter().all(|&w| w != 0));
        let c = checksum(&b);
        b[500] ^= 1;
        assert_ne!(c, checksum(&b));
    }
}

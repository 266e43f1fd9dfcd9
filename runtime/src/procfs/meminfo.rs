//! /proc/meminfo: what the machine has free.

use crate::error::{Result, RuntimeError};

const PATH: &str = "/proc/meminfo";

/// MemAvailable in bytes, from /proc/meminfo's text.
pub fn parse_mem_available(text: &str) -> Result<u64> {
    let parse = |what: &str| RuntimeError::Parse {
        path: PATH.into(),
        what: what.into(),
    };
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .ok_or_else(|| parse("no MemAvailable line"))?;
    let kib = line
        .trim()
        .strip_suffix("kB")
        .map(str::trim)
        .and_then(|n| n.parse::<u64>().ok())
        .ok_or_else(|| parse(&format!("MemAvailable {:?} is not N kB", line.trim())))?;
    kib.checked_mul(1024)
        .ok_or_else(|| parse("MemAvailable overflows"))
}

/// The machine's MemAvailable in bytes.
pub fn mem_available() -> Result<u64> {
    parse_mem_available(&super::read_text(PATH)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_available() {
        let text =
            "MemTotal:       24684092 kB\nMemFree:         1000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(text).unwrap(), 20_000_000 * 1024);
        assert!(parse_mem_available("MemTotal: 1 kB\n").is_err());
        assert!(parse_mem_available("MemAvailable: lots\n").is_err());
        assert!(mem_available().unwrap() > 0);
    }
}

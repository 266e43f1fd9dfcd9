//! Resource limits of a container, and the parser of their command-line forms.

use crate::error::{Result, RuntimeError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// A limit value meaning "no limit" (written as `max` on cgroup2 and `-1` on v1).
pub const UNLIMITED: u64 = u64::MAX;

/// The CFS period stasis uses for CPU caps, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The smallest CPU cap: the kernel's least quota (1 ms) per period.
pub const MIN_CPUS: f64 = 1_000.0 / CPU_PERIOD_US as f64;

/// The default relative CPU weight (cgroup2's `cpu.weight` default, v1 `cpu.shares` 1024).
pub const DEFAULT_CPU_WEIGHT: u64 = 100;

/// Resource limits. Every field is optional: `None` (or an empty `io`) leaves the cgroup's
/// current setting as it is, so [`crate::cgroups::Cgroup::apply`] changes only what is given;
/// a new cgroup starts with no limits. To lift a limit give [`UNLIMITED`] (memory, swap,
/// pids, an io value) or `cpus = 0.0`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Memory in bytes (the kernel rounds down to whole pages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    /// Swap in bytes that may be used on top of `memory` (0: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap: Option<u64>,
    /// Hard cap in CPUs, e.g. 0.5 for half of one CPU; 0 for no cap; else at least
    /// [`MIN_CPUS`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Relative CPU share under contention, 1..=10000; [`DEFAULT_CPU_WEIGHT`] is the default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u64>,
    /// Most tasks (processes and threads) at once, at least 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Block I/O throttles, one per device and kind.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub io: Vec<IoLimit>,
}

/// One block I/O throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IoLimit {
    /// The block device as (major, minor).
    pub dev: (u32, u32),
    pub kind: IoKind,
    /// Bytes or operations per second; [`UNLIMITED`] lifts the throttle.
    pub value: u64,
}

/// What an [`IoLimit`] throttles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoKind {
    ReadBps,
    WriteBps,
    ReadIops,
    WriteIops,
}

impl IoKind {
    /// Every kind.
    pub const ALL: [IoKind; 4] = [
        IoKind::ReadBps,
        IoKind::WriteBps,
        IoKind::ReadIops,
        IoKind::WriteIops,
    ];

    /// Its key in cgroup2's `io.max`.
    pub fn v2_key(self) -> &'static str {
        match self {
            IoKind::ReadBps => "rbps",
            IoKind::WriteBps => "wbps",
            IoKind::ReadIops => "riops",
            IoKind::WriteIops => "wiops",
        }
    }

    /// Its v1 blkio file.
    pub fn v1_file(self) -> &'static str {
        match self {
            IoKind::ReadBps => "blkio.throttle.read_bps_device",
            IoKind::WriteBps => "blkio.throttle.write_bps_device",
            IoKind::ReadIops => "blkio.throttle.read_iops_device",
            IoKind::WriteIops => "blkio.throttle.write_iops_device",
        }
    }
}

fn invalid(text: &str, what: impl Into<String>) -> RuntimeError {
    RuntimeError::Cgroup {
        target: format!("limit {text:?}"),
        what: what.into(),
    }
}

/// A size in bytes: `1073741824`, `256m`, `1G`, `512KiB`, `4kb` (k, m, g, t are powers of
/// 1024), or `max` / `unlimited` for [`UNLIMITED`].
pub fn parse_size(text: &str) -> Result<u64> {
    let s = text.trim();
    if s.eq_ignore_ascii_case("max") || s.eq_ignore_ascii_case("unlimited") {
        return Ok(UNLIMITED);
    }
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let num: u64 = num
        .parse()
        .map_err(|_| invalid(text, "not a size (e.g. 1073741824, 256m, 1G or max)"))?;
    let unit = unit.to_ascii_lowercase();
    let prefix = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match prefix {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(invalid(text, "unknown unit (use k, m, g or t)")),
    };
    if shift == 0 && !matches!(unit.as_str(), "" | "b") {
        return Err(invalid(text, "unknown unit (use k, m, g or t)"));
    }
    num.checked_mul(1 << shift)
        .filter(|&v| v != UNLIMITED)
        .ok_or_else(|| invalid(text, "too large"))
}

/// A CPU cap: a decimal number of CPUs (`0.5`, `2`); `0`, `max` or `unlimited` for no cap.
pub fn parse_cpus(text: &str) -> Result<f64> {
    let s = text.trim();
    if s.eq_ignore_ascii_case("max") || s.eq_ignore_ascii_case("unlimited") {
        return Ok(0.0);
    }
    let cpus: f64 = s
        .parse()
        .map_err(|_| invalid(text, "not a number of CPUs (e.g. 0.5)"))?;
    check_cpus(cpus).map_err(|why| invalid(text, why))?;
    Ok(cpus)
}

/// A relative CPU weight, 1..=10000.
pub fn parse_cpu_weight(text: &str) -> Result<u64> {
    let w: u64 = text
        .trim()
        .parse()
        .map_err(|_| invalid(text, "not a CPU weight (1..=10000)"))?;
    check_weight(w).map_err(|why| invalid(text, why))?;
    Ok(w)
}

/// A task limit: a number of at least 1, or `max` / `unlimited`.
pub fn parse_pids(text: &str) -> Result<u64> {
    let s = text.trim();
    if s.eq_ignore_ascii_case("max") || s.eq_ignore_ascii_case("unlimited") {
        return Ok(UNLIMITED);
    }
    let n: u64 = s
        .parse()
        .map_err(|_| invalid(text, "not a number of tasks (or max)"))?;
    if n == 0 {
        return Err(invalid(text, "a task limit must be at least 1"));
    }
    Ok(n)
}

fn check_cpus(cpus: f64) -> std::result::Result<(), String> {
    if !cpus.is_finite() || cpus < 0.0 {
        return Err(format!("CPU cap {cpus} is not a non-negative number"));
    }
    if cpus != 0.0 && cpus < MIN_CPUS {
        return Err(format!(
            "CPU cap {cpus} is below the least the kernel allows ({MIN_CPUS}); 0 means no cap"
        ));
    }
    if cpus * CPU_PERIOD_US as f64 > i64::MAX as f64 / 2.0 {
        return Err(format!("CPU cap {cpus} is too large"));
    }
    Ok(())
}

fn check_weight(w: u64) -> std::result::Result<(), String> {
    if (1..=10_000).contains(&w) {
        Ok(())
    } else {
        Err(format!("CPU weight {w} is outside 1..=10000"))
    }
}

impl IoLimit {
    /// `DEV:N` where DEV is a block device path (`/dev/sda`) or `MAJ:MIN`, and N a rate (a
    /// size like `10m` for bytes per second, a plain number for operations; `max` lifts it).
    pub fn parse(kind: IoKind, spec: &str) -> Result<IoLimit> {
        let (dev, value) = spec
            .trim()
            .rsplit_once(':')
            .ok_or_else(|| invalid(spec, "expected DEV:N (DEV a device path or MAJ:MIN)"))?;
        let value = parse_size(value)?;
        if value == 0 {
            return Err(invalid(
                spec,
                "an I/O rate must be at least 1 (max lifts it)",
            ));
        }
        let dev = if dev.starts_with('/') {
            block_device(Path::new(dev))?
        } else {
            let bad = || invalid(spec, "expected MAJ:MIN numbers or a device path");
            let (maj, min) = dev.split_once(':').ok_or_else(bad)?;
            (
                maj.parse().map_err(|_| bad())?,
                min.parse().map_err(|_| bad())?,
            )
        };
        Ok(IoLimit { dev, kind, value })
    }
}

/// (major, minor) of a block device file, from stat's st_rdev.
pub fn block_device(path: &Path) -> Result<(u32, u32)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(path)
        .map_err(|e| RuntimeError::sys("stat", path.display().to_string(), e))?;
    if !md.file_type().is_block_device() {
        return Err(invalid(&path.display().to_string(), "not a block device"));
    }
    let rdev = md.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}

impl Limits {
    /// True if nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// Checks every given value is one the kernel takes (see the field docs).
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| RuntimeError::Cgroup {
            target: "limits".into(),
            what,
        };
        if let Some(c) = self.cpus {
            check_cpus(c).map_err(bad)?;
        }
        if let Some(w) = self.cpu_weight {
            check_weight(w).map_err(bad)?;
        }
        if self.pids == Some(0) {
            return Err(bad("a task limit must be at least 1".into()));
        }
        if let Some(io) = self.io.iter().find(|io| io.value == 0) {
            return Err(bad(format!(
                "{:?} of {}:{} is 0; an I/O rate must be at least 1 (UNLIMITED lifts it)",
                io.kind, io.dev.0, io.dev.1
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1073741824").ok(), Some(1 << 30));
        assert_eq!(parse_size("256m").ok(), Some(256 << 20));
        assert_eq!(parse_size("1G").ok(), Some(1 << 30));
        assert_eq!(parse_size("512KiB").ok(), Some(512 << 10));
        assert_eq!(parse_size("4kb").ok(), Some(4096));
        assert_eq!(parse_size("2t").ok(), Some(2 << 40));
        assert_eq!(parse_size("100b").ok(), Some(100));
        assert_eq!(parse_size("max").ok(), Some(UNLIMITED));
        assert_eq!(parse_size(" unlimited ").ok(), Some(UNLIMITED));
        for bad in [
            "",
            "m",
            "12q",
            "1.5g",
            "-1",
            "5ib",
            "5kbb",
            "99999999999999999999",
            "20000000000t",
        ] {
            let err = parse_size(bad).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn cpus_weights_and_pids() {
        assert_eq!(parse_cpus("0.5").ok(), Some(0.5));
        assert_eq!(parse_cpus("2").ok(), Some(2.0));
        assert_eq!(parse_cpus("max").ok(), Some(0.0));
        assert!(parse_cpus("0.001").is_err(), "below 1 ms per period");
        assert!(parse_cpus("-1").is_err());
        assert!(parse_cpus("nan").is_err());
        assert_eq!(parse_cpu_weight("100").ok(), Some(100));
        assert!(parse_cpu_weight("0").is_err());
        assert!(parse_cpu_weight("10001").is_err());
        assert_eq!(parse_pids("32").ok(), Some(32));
        assert_eq!(parse_pids("max").ok(), Some(UNLIMITED));
        assert!(parse_pids("0").is_err());
    }

    #[test]
    fn io_specs() {
        assert_eq!(
            IoLimit::parse(IoKind::ReadBps, "8:0:10m").ok(),
            Some(IoLimit {
                dev: (8, 0),
                kind: IoKind::ReadBps,
                value: 10 << 20
            })
        );
        assert_eq!(
            IoLimit::parse(IoKind::WriteIops, "254:16:1000")
                .ok()
                .map(|l| (l.dev, l.value)),
            Some(((254, 16), 1000))
        );
        assert_eq!(
            IoLimit::parse(IoKind::ReadIops, "8:0:max")
                .ok()
                .map(|l| l.value),
            Some(UNLIMITED)
        );
        // /dev/null is a character device: refused, naming it.
        let err = IoLimit::parse(IoKind::ReadBps, "/dev/null:1m").expect_err("char dev");
        assert!(err.to_string().contains("/dev/null"), "{err}");
        let err = IoLimit::parse(IoKind::ReadBps, "/nonexistent/sdz:1m").expect_err("absent");
        assert!(err.to_string().contains("/nonexistent/sdz"), "{err}");
        for bad in ["8:0", "8:0:0", "x:0:1m", "8:y:1m", "10m"] {
            assert!(IoLimit::parse(IoKind::ReadBps, bad).is_err(), "{bad}");
        }
    }

    /// A block device path resolves through st_rdev, if this machine has one to look at.
    #[test]
    fn io_spec_with_a_device_path() {
        let Some(dev) = std::fs::read_dir("/dev").ok().and_then(|d| {
            d.flatten().map(|e| e.path()).find(|p| {
                use std::os::unix::fs::FileTypeExt;
                std::fs::metadata(p).is_ok_and(|m| m.file_type().is_block_device())
            })
        }) else {
            eprintln!("SKIP: no block device under /dev");
            return;
        };
        let want = block_device(&dev).expect("stat");
        let spec = format!("{}:1m", dev.display());
        let got = IoLimit::parse(IoKind::ReadBps, &spec).expect("parse");
        assert_eq!(got.dev, want);
        assert_eq!(got.value, 1 << 20);
    }

    #[test]
    fn serde_round_trip_leaves_out_what_is_unset() {
        let l = Limits {
            memory: Some(64 << 20),
            cpus: Some(0.25),
            io: vec![IoLimit {
                dev: (7, 3),
                kind: IoKind::WriteIops,
                value: 100,
            }],
            ..Limits::default()
        };
        let json = serde_json::to_string(&l).expect("serialize");
        assert!(!json.contains("swap") && !json.contains("pids"), "{json}");
        assert!(json.contains("\"write_iops\""), "{json}");
        let back: Limits = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, l);
        let empty: Limits = serde_json::from_str("{}").expect("deserialize {}");
        assert!(empty.is_empty());
    }
}

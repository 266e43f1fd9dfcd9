//! CPU cap and weight: cgroup2 `cpu.max` / `cpu.weight`, v1 `cpu.cfs_quota_us` +
//! `cpu.cfs_period_us` / `cpu.shares`; CPU time from cgroup2 `cpu.stat` or v1 `cpuacct`.

use super::stats::keyed;
use super::{read, read_num, read_opt_num, write, Dir, Limits, Stats};
use super::{CPU_PERIOD_US, DEFAULT_CPU_WEIGHT};
use crate::cgroups::hierarchy::Version;
use crate::error::{Result, RuntimeError};

/// The range the kernel takes for v1 `cpu.shares`.
pub const V1_SHARES: (u64, u64) = (2, 262_144);

/// cgroup2 weight (1..=10000, default 100) to v1 shares (default 1024), clamped.
pub fn weight_to_shares(weight: u64) -> u64 {
    ((weight * 1024 + 50) / 100).clamp(V1_SHARES.0, V1_SHARES.1)
}

/// v1 shares back to a weight; exact for every weight [`weight_to_shares`] made.
pub fn shares_to_weight(shares: u64) -> u64 {
    ((shares * 100 + 512) / 1024).clamp(1, 10_000)
}

/// The quota in microseconds per [`CPU_PERIOD_US`] for a cap of `cpus`; `None` for no cap.
fn quota_us(cpus: f64) -> Option<u64> {
    (cpus > 0.0).then(|| (cpus * CPU_PERIOD_US as f64).round() as u64)
}

pub(super) fn apply(d: &Dir, cpus: Option<f64>, weight: Option<u64>) -> Result<()> {
    match d.version {
        Version::V2 => {
            if let Some(c) = cpus {
                let quota = quota_us(c).map_or("max".to_string(), |q| q.to_string());
                write(&d.file("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            }
            if let Some(w) = weight {
                write(&d.file("cpu.weight"), &w.to_string())?;
            }
        }
        Version::V1 => {
            if let Some(c) = cpus {
                let period = d.file("cpu.cfs_period_us");
                if read_num(&period)? != CPU_PERIOD_US {
                    write(&period, &CPU_PERIOD_US.to_string())?;
                }
                let quota = quota_us(c).map_or("-1".to_string(), |q| q.to_string());
                write(&d.file("cpu.cfs_quota_us"), &quota)?;
            }
            if let Some(w) = weight {
                write(&d.file("cpu.shares"), &weight_to_shares(w).to_string())?;
            }
        }
    }
    Ok(())
}

pub(super) fn read_limits(d: &Dir, out: &mut Limits) -> Result<()> {
    let (quota, period, weight) = match d.version {
        Version::V2 => {
            let file = d.file("cpu.max");
            let text = read(&file)?;
            let mut f = text.split_whitespace();
            let bad = || RuntimeError::Parse {
                path: file.display().to_string(),
                what: format!("expected \"QUOTA PERIOD\", got {:?}", text.trim()),
            };
            let quota = match f.next().ok_or_else(bad)? {
                "max" => None,
                q => Some(q.parse::<u64>().map_err(|_| bad())?),
            };
            let period: u64 = f.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
            (quota, period, read_num(&d.file("cpu.weight"))?)
        }
        Version::V1 => {
            let file = d.file("cpu.cfs_quota_us");
            let text = read(&file)?;
            let quota: i64 = text.trim().parse().map_err(|_| RuntimeError::Parse {
                path: file.display().to_string(),
                what: format!("not a number: {:?}", text.trim()),
            })?;
            let period = read_num(&d.file("cpu.cfs_period_us"))?;
            let shares = read_num(&d.file("cpu.shares"))?;
            (u64::try_from(quota).ok(), period, shares_to_weight(shares))
        }
    };
    out.cpus = quota
        .filter(|_| period > 0)
        .map(|q| q as f64 / period as f64);
    out.cpu_weight = (weight != DEFAULT_CPU_WEIGHT).then_some(weight);
    Ok(())
}

/// Throttling counters of the cpu controller's `cpu.stat`.
pub(super) fn throttle_stats(d: &Dir, out: &mut Stats) -> Result<()> {
    let text = read(&d.file("cpu.stat"))?;
    out.cpu_throttled_periods = keyed(&text, "nr_throttled");
    out.cpu_throttled_ns = match d.version {
        Version::V2 => keyed(&text, "throttled_usec").map(|us| us.saturating_mul(1000)),
        Version::V1 => keyed(&text, "throttled_time"),
    };
    Ok(())
}

/// CPU time: cgroup2 `cpu.stat` (in every cgroup2 cgroup) or v1 `cpuacct.*`.
pub(super) fn usage_stats(d: &Dir, out: &mut Stats) -> Result<()> {
    match d.version {
        Version::V2 => {
            let text = read(&d.file("cpu.stat"))?;
            let ns = |k: &str| keyed(&text, k).map(|us| us.saturating_mul(1000));
            out.cpu_usage_ns = ns("usage_usec");
            out.cpu_user_ns = ns("user_usec");
            out.cpu_system_ns = ns("system_usec");
        }
        Version::V1 => {
            out.cpu_usage_ns = Some(read_num(&d.file("cpuacct.usage"))?);
            out.cpu_user_ns = read_opt_num(&d.file("cpuacct.usage_user"))?;
            out.cpu_system_ns = read_opt_num(&d.file("cpuacct.usage_sys"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_and_shares_round_trip() {
        assert_eq!(weight_to_shares(100), 1024);
        assert_eq!(weight_to_shares(1), 10);
        assert_eq!(weight_to_shares(10_000), 102_400);
        for w in 1..=10_000 {
            assert_eq!(shares_to_weight(weight_to_shares(w)), w, "weight {w}");
        }
        assert_eq!(shares_to_weight(2), 1, "clamped");
        assert_eq!(shares_to_weight(262_144), 10_000, "clamped");
    }
}

//! The pre-copy rounds as the source sees them, and when to stop them: once the copy of
//! what the workload writes during one more round is expected to fit the downtime limit,
//! once the round limit is reached, or once the pages written stop shrinking.

use serde::Serialize;
use stasis_workload::Round;
use std::time::{Duration, Instant};

/// One pre-copy round, as the source saw it.
#[derive(Debug, Clone, Serialize)]
pub struct RoundReport {
    /// 1, 2, ...
    pub round: u32,
    /// Copied while the workload was frozen (the last round).
    pub frozen: bool,
    pub pages: u64,
    /// Bytes sent (pages frames).
    pub bytes: u64,
    pub us: u64,
    /// Bytes per second this round was sent at.
    pub rate: u64,
    /// Bytes per second the workload wrote: what this round found written, over the time
    /// since the round before began (none for the first round).
    pub dirty_rate: Option<u64>,
    /// The downtime of the memory copy if the workload were frozen after this round: what
    /// it writes meanwhile, at the best rate seen (none for the first round).
    pub expected_downtime_us: Option<u64>,
}

/// The rounds copied while the workload runs, and when to stop them.
#[derive(Default)]
pub struct Rounds {
    pub done: Vec<RoundReport>,
    /// When the round before the last began.
    last_began: Option<Instant>,
    /// The best send rate seen (rounds of at least a few MiB), bytes per second.
    best_rate: u64,
}

/// A round shorter than this says little about the send rate.
const RATE_SAMPLE: u64 = 4 << 20;
/// The send rate assumed before a round has measured one (bytes per second).
const RATE_GUESS: u64 = 256 << 20;

impl Rounds {
    /// Records a round of `r.pages` pages (`bytes` sent) that began at `began`.
    pub fn add(&mut self, r: Round, bytes: u64, began: Instant) -> RoundReport {
        let gap = self.last_began.map(|prev| began.duration_since(prev));
        self.last_began = Some(began);
        self.record(r.pages, bytes, began.elapsed(), gap)
    }

    /// Records a round of `pages` pages (`bytes` sent) that took `took`, and began `gap`
    /// after the round before (none for the first).
    fn record(
        &mut self,
        pages: u64,
        bytes: u64,
        took: Duration,
        gap: Option<Duration>,
    ) -> RoundReport {
        let rate = per_second(bytes, took);
        if bytes >= RATE_SAMPLE {
            self.best_rate = self.best_rate.max(rate);
        }
        let send_rate = match self.best_rate {
            0 => RATE_GUESS,
            b => b,
        };
        // What this round found written was written since the round before began.
        let dirty_rate = gap.map(|g| per_second(bytes, g));
        // Frozen now, the last round copies what is written during about one round.
        let expected_downtime_us = dirty_rate.map(|d| {
            let bytes_then = d as f64 * took.as_secs_f64();
            (bytes_then / send_rate as f64 * 1e6) as u64
        });
        let report = RoundReport {
            round: self.done.len() as u32 + 1,
            frozen: false,
            pages,
            bytes,
            us: micros(took),
            rate,
            dirty_rate,
            expected_downtime_us,
        };
        self.done.push(report.clone());
        report
    }

    /// Why to freeze now, or None for another round.
    pub fn switch_now(&self, max_downtime: Duration, max_rounds: u32) -> Option<String> {
        let n = self.done.len();
        let last = self.done.last()?;
        let limit = micros(max_downtime);
        if let Some(e) = last.expected_downtime_us.filter(|&e| e <= limit) {
            return Some(format!(
                "expected downtime {:.1} ms is within {:.1} ms",
                e as f64 / 1e3,
                limit as f64 / 1e3
            ));
        }
        if n >= max_rounds as usize {
            return Some(format!("{n} rounds (--max-rounds)"));
        }
        if n >= 3 && last.pages >= self.done[n - 2].pages {
            return Some(format!(
                "the pages written stopped shrinking ({} after {})",
                last.pages,
                self.done[n - 2].pages
            ));
        }
        None
    }
}

pub fn per_second(bytes: u64, d: Duration) -> u64 {
    (bytes as f64 / d.as_secs_f64().max(1e-6)) as u64
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn rounds_end_when_the_last_copy_fits_the_limit() {
        let mut r = Rounds::default();
        // 1 GiB in 1 s: 1 GiB/s, the first round never ends pre-copy by itself.
        r.record(262144, 1 << 30, 1000 * MS, None);
        assert_eq!(r.switch_now(50 * MS, 30), None);
        // 64 MiB found written over 1 s (64 MiB/s), copied in 64 ms: one more round of
        // writes (64 ms at 64 MiB/s = 4 MiB) takes about 4 ms at 1 GiB/s.
        let rep = r.record(16384, 64 << 20, 64 * MS, Some(1000 * MS));
        assert_eq!(rep.dirty_rate, Some(64 << 20));
        let e = rep.expected_downtime_us.expect("an estimate");
        assert!((3500..4500).contains(&e), "{e}");
        let why = r.switch_now(50 * MS, 30).expect("within the limit");
        assert!(why.contains("within"), "{why}");
        assert_eq!(r.switch_now(1 * MS, 30), None, "4 ms is not within 1 ms");
    }

    #[test]
    fn rounds_end_at_the_round_limit_or_when_writes_stop_shrinking() {
        let mut r = Rounds::default();
        r.record(262144, 1 << 30, 1000 * MS, None);
        r.record(100_000, 400 << 20, 400 * MS, Some(1000 * MS));
        assert_eq!(r.switch_now(Duration::ZERO, 30), None);
        assert!(r
            .switch_now(Duration::ZERO, 2)
            .is_some_and(|w| w.contains("--max-rounds")));
        // The third round found as much written as the second: more rounds will not help.
        r.record(100_000, 400 << 20, 400 * MS, Some(400 * MS));
        let why = r.switch_now(Duration::ZERO, 30).expect("stops");
        assert!(why.contains("stopped shrinking"), "{why}");
    }
}

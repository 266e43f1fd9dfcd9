//! What a cgroup has used, read from the files of each controller.

use serde::{Deserialize, Serialize};

/// Usage counters of a cgroup. A field is `None` where this host does not have the file it
/// comes from (a controller not mounted, a kernel too old for `memory.peak`, ...). Limits
/// are [`super::UNLIMITED`] when unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    /// CPU time of every task, in nanoseconds.
    pub cpu_usage_ns: Option<u64>,
    /// ... of it in user mode.
    pub cpu_user_ns: Option<u64>,
    /// ... of it in the kernel.
    pub cpu_system_ns: Option<u64>,
    /// CFS periods in which the CPU cap stopped the tasks.
    pub cpu_throttled_periods: Option<u64>,
    /// Time the CPU cap held the tasks stopped, in nanoseconds.
    pub cpu_throttled_ns: Option<u64>,
    /// Memory charged now (v1 includes the page cache, as v2 does), in bytes.
    pub memory_current: Option<u64>,
    /// The most memory charged at once, in bytes.
    pub memory_peak: Option<u64>,
    /// The memory limit in bytes.
    pub memory_limit: Option<u64>,
    /// How often usage hit the memory limit (v1 `memory.failcnt` + `memory.memsw.failcnt`,
    /// v2 `memory.events` max).
    pub memory_limit_hits: Option<u64>,
    /// Tasks the OOM killer killed because of the limit.
    pub oom_kills: Option<u64>,
    /// Swap used now, in bytes.
    pub swap_current: Option<u64>,
    /// Swap allowed on top of memory, in bytes.
    pub swap_limit: Option<u64>,
    /// Tasks now.
    pub pids_current: Option<u64>,
    /// The most tasks at once.
    pub pids_peak: Option<u64>,
    /// The task limit.
    pub pids_limit: Option<u64>,
    /// Forks refused because of the task limit.
    pub pids_denied: Option<u64>,
    /// Block I/O over every device.
    pub io_read_bytes: Option<u64>,
    pub io_write_bytes: Option<u64>,
    pub io_read_ops: Option<u64>,
    pub io_write_ops: Option<u64>,
}

/// The value of `key` in a file of `key value` lines (`cpu.stat`, `memory.events`, ...).
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The sums over every device of the `key=value` fields of cgroup2 `io.stat`.
pub(crate) fn io_stat_sums(text: &str, keys: [&str; 4]) -> [u64; 4] {
    let mut sums = [0u64; 4];
    for field in text.split_whitespace() {
        let Some((k, v)) = field.split_once('=') else {
            continue;
        };
        if let (Some(i), Ok(v)) = (keys.iter().position(|x| *x == k), v.parse::<u64>()) {
            sums[i] = sums[i].saturating_add(v);
        }
    }
    sums
}

/// The sums over every device of the `Read` and `Write` lines of a v1 blkio stat file
/// (`MAJ:MIN Read N`).
pub(crate) fn blkio_sums(text: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(_dev), Some(op), Some(n)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let n: u64 = n.parse().unwrap_or(0);
        match op {
            "Read" => r = r.saturating_add(n),
            "Write" => w = w.saturating_add(n),
            _ => {}
        }
    }
    (r, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsers() {
        let stat = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n";
        assert_eq!(keyed(stat, "user_usec"), Some(1000));
        assert_eq!(keyed(stat, "usage"), None);
        let io = "8:0 rbytes=100 wbytes=20 rios=3 wios=1 dbytes=0 dios=0\n\
                  254:0 rbytes=1 wbytes=2 rios=3 wios=4\n";
        assert_eq!(
            io_stat_sums(io, ["rbytes", "wbytes", "rios", "wios"]),
            [101, 22, 6, 5]
        );
        let v1 = "8:0 Read 4096\n8:0 Write 512\n8:0 Sync 0\n7:1 Read 4\nTotal 4612\n";
        assert_eq!(blkio_sums(v1), (4100, 512));
    }
}

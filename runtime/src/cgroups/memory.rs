//! memory and swap: cgroup2 `memory.max` / `memory.swap.max`, v1 `memory.limit_in_bytes` /
//! `memory.memsw.limit_in_bytes` (memory + swap together).

use super::stats::keyed;
use super::{read, read_num, write, Dir, Limits, Stats, UNLIMITED};
use crate::cgroups::hierarchy::Version;
use crate::error::{Result, RuntimeError};

/// v1 reads "unlimited" as the page counter's maximum in bytes (LONG_MAX rounded down to a
/// page); anything this large means no limit.
const V1_UNLIMITED: u64 = 0x7FFF_FFFF_FFFF_F000;

fn v1_value(v: u64) -> u64 {
    if v >= V1_UNLIMITED {
        UNLIMITED
    } else {
        v
    }
}

fn v1_text(v: u64) -> String {
    if v == UNLIMITED {
        "-1".into()
    } else {
        v.to_string()
    }
}

fn some_unless_unlimited(v: u64) -> Option<u64> {
    (v != UNLIMITED).then_some(v)
}

/// Sets what is given; on v1 keeps memsw >= limit at every step, and a swap allowance that
/// is not given stays what it was when only memory changes.
pub(super) fn apply(d: &Dir, memory: Option<u64>, swap: Option<u64>) -> Result<()> {
    if d.version == Version::V2 {
        if let Some(m) = memory {
            write(&d.file("memory.max"), &super::max_text(m))?;
        }
        if let Some(s) = swap {
            write(&d.file("memory.swap.max"), &super::max_text(s))?;
        }
        return Ok(());
    }
    let limit_file = d.file("memory.limit_in_bytes");
    let memsw_file = d.file("memory.memsw.limit_in_bytes");
    let cur_l = v1_value(read_num(&limit_file)?);
    let cur_s = if memsw_file.exists() {
        Some(v1_value(read_num(&memsw_file)?))
    } else {
        None
    };
    let steps = v1_steps(cur_l, cur_s, memory, swap).map_err(|what| RuntimeError::Cgroup {
        target: memsw_file.display().to_string(),
        what: what.into(),
    })?;
    for (file, value) in steps {
        let path = match file {
            V1File::Limit => &limit_file,
            V1File::Memsw => &memsw_file,
        };
        write(path, &v1_text(value))?;
    }
    Ok(())
}

/// The two v1 files a memory change writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum V1File {
    /// `memory.limit_in_bytes`
    Limit,
    /// `memory.memsw.limit_in_bytes` (memory + swap)
    Memsw,
}

/// The writes, in order, that take v1 from (limit, memsw) = (`cur_l`, `cur_s`) to the given
/// memory and swap (`cur_s` is `None` without swap accounting). The kernel refuses a memsw
/// limit below the memory limit, so memsw is raised first when the new memory limit would
/// pass the current memsw one, else memory is lowered first. Unchanged values are not
/// written.
fn v1_steps(
    cur_l: u64,
    cur_s: Option<u64>,
    memory: Option<u64>,
    swap: Option<u64>,
) -> std::result::Result<Vec<(V1File, u64)>, &'static str> {
    let new_l = memory.unwrap_or(cur_l);
    let Some(cur_s) = cur_s else {
        if swap.is_some() {
            return Err(
                "a swap limit needs swap accounting (memory.memsw.* is absent: a \
                        kernel without CONFIG_MEMCG_SWAP, or booted with swapaccount=0)",
            );
        }
        return Ok((new_l != cur_l)
            .then_some((V1File::Limit, new_l))
            .into_iter()
            .collect());
    };
    let new_s = match swap {
        Some(UNLIMITED) => UNLIMITED,
        Some(_) if new_l == UNLIMITED => {
            return Err(
                "a swap limit on cgroup v1 needs a memory limit (memsw caps memory \
                        and swap together)",
            )
        }
        Some(s) => new_l.saturating_add(s),
        // Only memory changes: the swap allowance on top of it stays.
        None if cur_s == UNLIMITED || new_l == UNLIMITED => UNLIMITED,
        None => new_l.saturating_add(cur_s.saturating_sub(cur_l)),
    };
    let order = if new_l > cur_s {
        [(V1File::Memsw, cur_s, new_s), (V1File::Limit, cur_l, new_l)]
    } else {
        [(V1File::Limit, cur_l, new_l), (V1File::Memsw, cur_s, new_s)]
    };
    Ok(order
        .into_iter()
        .filter(|(_, cur, new)| cur != new)
        .map(|(f, _, new)| (f, new))
        .collect())
}

/// (memory limit, swap limit), [`UNLIMITED`] when unlimited; swap is `None` where the host
/// does not account swap.
fn limits(d: &Dir) -> Result<(u64, Option<u64>)> {
    match d.version {
        Version::V2 => {
            let m = super::read_max(&d.file("memory.max"))?;
            let swap = d.file("memory.swap.max");
            let s = if swap.exists() {
                Some(super::read_max(&swap)?)
            } else {
                None
            };
            Ok((m, s))
        }
        Version::V1 => {
            let l = v1_value(read_num(&d.file("memory.limit_in_bytes"))?);
            let memsw = d.file("memory.memsw.limit_in_bytes");
            if !memsw.exists() {
                return Ok((l, None));
            }
            let s = v1_value(read_num(&memsw)?);
            let swap = if l == UNLIMITED || s == UNLIMITED {
                UNLIMITED
            } else {
                s.saturating_sub(l)
            };
            Ok((l, Some(swap)))
        }
    }
}

pub(super) fn read_limits(d: &Dir, out: &mut Limits) -> Result<()> {
    let (m, s) = limits(d)?;
    out.memory = some_unless_unlimited(m);
    out.swap = s.and_then(some_unless_unlimited);
    Ok(())
}

pub(super) fn stats(d: &Dir, out: &mut Stats) -> Result<()> {
    let (m, s) = limits(d)?;
    out.memory_limit = Some(m);
    out.swap_limit = s;
    let opt = |name: &str| super::read_opt_num(&d.file(name));
    match d.version {
        Version::V2 => {
            out.memory_current = Some(read_num(&d.file("memory.current"))?);
            out.memory_peak = opt("memory.peak")?;
            out.swap_current = opt("memory.swap.current")?;
            let events = read(&d.file("memory.events"))?;
            out.memory_limit_hits = keyed(&events, "max");
            out.oom_kills = keyed(&events, "oom_kill");
        }
        Version::V1 => {
            let usage = read_num(&d.file("memory.usage_in_bytes"))?;
            out.memory_current = Some(usage);
            out.memory_peak = opt("memory.max_usage_in_bytes")?;
            out.swap_current =
                opt("memory.memsw.usage_in_bytes")?.map(|both| both.saturating_sub(usage));
            // A charge fails at memsw or at memory, whichever limit it meets first (with
            // no swap allowance the two are equal and memsw is checked first).
            out.memory_limit_hits = match (opt("memory.failcnt")?, opt("memory.memsw.failcnt")?) {
                (Some(a), b) => Some(a.saturating_add(b.unwrap_or(0))),
                (None, b) => b,
            };
            out.oom_kills = keyed(&read(&d.file("memory.oom_control"))?, "oom_kill");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;

    /// Runs the steps against the kernel's rule (memsw >= limit after every write) and
    /// returns the final (limit, memsw).
    fn run(l: u64, s: u64, memory: Option<u64>, swap: Option<u64>) -> (u64, u64) {
        let (mut l, mut s) = (l, s);
        for (f, v) in v1_steps(l, Some(s), memory, swap).expect("steps") {
            match f {
                V1File::Limit => l = v,
                V1File::Memsw => s = v,
            }
            assert!(s >= l, "memsw {s} below limit {l} after writing {f:?}");
        }
        (l, s)
    }

    #[test]
    fn v1_memsw_stays_above_the_limit_in_every_change() {
        let u = UNLIMITED;
        // From nothing set: memory and swap.
        assert_eq!(run(u, u, Some(64 * M), Some(0)), (64 * M, 64 * M));
        assert_eq!(run(u, u, Some(64 * M), Some(32 * M)), (64 * M, 96 * M));
        // Raising memory past memsw keeps the 32 MiB of swap: memsw goes first.
        assert_eq!(run(64 * M, 96 * M, Some(256 * M), None), (256 * M, 288 * M));
        // Lowering memory: the limit goes first.
        assert_eq!(run(256 * M, 288 * M, Some(16 * M), None), (16 * M, 48 * M));
        // Only swap changes.
        assert_eq!(run(64 * M, 64 * M, None, Some(8 * M)), (64 * M, 72 * M));
        // Lifting memory lifts memsw too (it cannot stay below).
        assert_eq!(run(64 * M, 96 * M, Some(u), None), (u, u));
        // Memory alone where memsw is unlimited leaves memsw alone.
        assert_eq!(
            v1_steps(u, Some(u), Some(64 * M), None).expect("steps"),
            vec![(V1File::Limit, 64 * M)]
        );
        // Nothing changes: nothing written.
        assert!(v1_steps(64 * M, Some(64 * M), Some(64 * M), Some(0))
            .expect("steps")
            .is_empty());
    }

    #[test]
    fn v1_swap_needs_a_memory_limit_and_accounting() {
        assert!(v1_steps(UNLIMITED, Some(UNLIMITED), None, Some(M)).is_err());
        assert!(v1_steps(UNLIMITED, Some(UNLIMITED), None, Some(UNLIMITED)).is_ok());
        assert!(v1_steps(64 * M, None, None, Some(M)).is_err());
        assert_eq!(
            v1_steps(64 * M, None, Some(32 * M), None).expect("steps"),
            vec![(V1File::Limit, 32 * M)]
        );
    }
}

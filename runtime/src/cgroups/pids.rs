//! Task limit: `pids.max` (the same file on cgroup2 and v1).

use super::stats::keyed;
use super::UNLIMITED;
use super::{max_text, read, read_max, read_num, read_opt_num, write, Dir, Limits, Stats};
use crate::error::Result;

pub(super) fn apply(d: &Dir, pids: Option<u64>) -> Result<()> {
    match pids {
        Some(n) => write(&d.file("pids.max"), &max_text(n)),
        None => Ok(()),
    }
}

pub(super) fn read_limits(d: &Dir, out: &mut Limits) -> Result<()> {
    out.pids = Some(read_max(&d.file("pids.max"))?).filter(|&n| n != UNLIMITED);
    Ok(())
}

pub(super) fn stats(d: &Dir, out: &mut Stats) -> Result<()> {
    out.pids_current = Some(read_num(&d.file("pids.current"))?);
    out.pids_limit = Some(read_max(&d.file("pids.max"))?);
    out.pids_peak = read_opt_num(&d.file("pids.peak"))?;
    out.pids_denied = keyed(&read(&d.file("pids.events"))?, "max");
    Ok(())
}

//! The cgroups each process of a frozen tree is in, recorded so restore can put it back.

use crate::error::CheckpointError;
use stasis_image::proto;
use stasis_runtime::cgroups::membership;

/// Records the cgroup membership of every live process of `procs` (by host PID).
pub fn record(procs: &mut [proto::Process]) -> Result<(), CheckpointError> {
    for p in procs.iter_mut().filter(|p| !p.zombie) {
        p.cgroups = membership::of(p.pid as i32)?
            .into_iter()
            .map(|m| proto::CgroupMember {
                hierarchy: m.hierarchy,
                controllers: m.controllers,
                path: m.path,
            })
            .collect();
    }
    Ok(())
}

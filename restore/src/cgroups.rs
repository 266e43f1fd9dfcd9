//! Putting each restored process back into the cgroups it was in (every hierarchy, v1 and
//! cgroup2), checked before anything is created: a cgroup that does not exist here refuses
//! the restore, naming the process and the cgroup.

use crate::error::RestoreError;
use crate::Options;
use stasis_image::proto;
use stasis_runtime::cgroups::membership::{self, Membership};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The cgroups of each process (each with its directory here), by image PID.
#[derive(Debug, Default)]
pub struct Placement(BTreeMap<i32, Vec<(Membership, PathBuf)>>);

/// Where each process goes. Nothing for the tree of a container (its restore makes the
/// container's cgroup and puts the tree there) or for an image that records no cgroups.
pub fn plan(procs: &[&proto::Process], opts: &Options) -> Result<Placement, RestoreError> {
    let container = opts
        .pid_namespace
        .as_ref()
        .is_some_and(|ns| !ns.cgroup_procs.is_empty());
    let mut out = Placement::default();
    if container || procs.iter().all(|p| p.cgroups.is_empty()) {
        return Ok(out);
    }
    let path = "/proc/self/mountinfo";
    let mountinfo = std::fs::read_to_string(path)
        .map_err(|e| stasis_runtime::RuntimeError::sys("read", path, e))?;
    for p in procs.iter().filter(|p| !p.zombie) {
        let mut dirs = Vec::with_capacity(p.cgroups.len());
        for c in &p.cgroups {
            let m = Membership {
                hierarchy: c.hierarchy,
                controllers: c.controllers.clone(),
                path: c.path.clone(),
            };
            let dir = membership::directory(&mountinfo, &m).map_err(|e| {
                RestoreError::Unsupported(format!(
                    "process {} ({}) was in {e}; create it (or checkpoint the process from a \
                     cgroup this host has) to restore it where it was",
                    p.pid, p.comm
                ))
            })?;
            dirs.push((m, dir));
        }
        out.0.insert(p.pid as i32, dirs);
    }
    Ok(out)
}

impl Placement {
    /// Moves the new process `host_pid` (image PID `pid`) into its cgroups. A cgroup it is
    /// in already (it inherited the restorer's) is not written: each write to cgroup.procs
    /// waits for an RCU grace period, ~1.5 ms here, per hierarchy.
    pub fn place(&self, pid: i32, host_pid: i32) -> Result<(), RestoreError> {
        let Some(dirs) = self.0.get(&pid) else {
            return Ok(());
        };
        let now = membership::of(host_pid).map_err(|cause| RestoreError::Apply { pid, cause })?;
        for (m, dir) in dirs {
            let there = now.contains(m);
            if !there {
                membership::join(host_pid, dir)
                    .map_err(|cause| RestoreError::Apply { pid, cause })?;
            }
        }
        Ok(())
    }
}

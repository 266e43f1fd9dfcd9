//! Container cgroups: one interface over cgroup v1, cgroup2 and a hybrid of the two for
//! resource limits, usage, freezing and killing.
//!
//! # Where controllers come from
//!
//! [`Hierarchy`] reads the mount table. Each limit controller (memory, cpu, pids, io) is used
//! from cgroup2 when the cgroup2 root lists it in `cgroup.controllers`, else from the v1
//! mount that has it (`blkio` for io). CPU time and the freezer come from cgroup2 whenever it
//! is mounted (every non-root cgroup2 cgroup has `cpu.stat` usage, `cgroup.freeze` and, since
//! 5.14, `cgroup.kill`, with or without controllers), else from v1 `cpuacct` and `freezer`.
//! On a kernel with cgroup2 but without `cgroup.freeze` (before 5.2) the v1 freezer is used.
//!
//! # Where cgroups are made
//!
//! A [`Cgroup`] is a path `rel` (a container's is `crate::container::cgroup_path`, e.g.
//! `stasis/web`) relative to the root of every hierarchy it uses: `/sys/fs/cgroup/stasis/web`
//! on a cgroup2-only host; `/sys/fs/cgroup/memory/stasis/web`,
//! `/sys/fs/cgroup/pids/stasis/web`, ... and
//! `/sys/fs/cgroup/unified/stasis/web` on a hybrid one. The roots are the mount points as
//! this process sees them (in a cgroup namespace, the namespace's root). The parent
//! (`stasis`) is shared by every container and left in place by [`Cgroup::remove`]. On
//! cgroup2 the controllers a cgroup needs are enabled in `cgroup.subtree_control` of each
//! parent from the root down; the parents must hold no processes (cgroup2's rule).
//!
//! # How each limit maps ([`Limits`])
//!
//! | limit | cgroup2 | cgroup v1 |
//! |---|---|---|
//! | `memory` | `memory.max` | `memory.limit_in_bytes` |
//! | `swap` | `memory.swap.max` | `memory.memsw.limit_in_bytes` = memory + swap, kept >= the memory limit at every step of a change |
//! | `cpus` | `cpu.max` "QUOTA 100000" | `cpu.cfs_period_us` 100000 + `cpu.cfs_quota_us` QUOTA |
//! | `cpu_weight` | `cpu.weight` | `cpu.shares` = weight * 1024 / 100, clamped to 2..=262144 |
//! | `pids` | `pids.max` | `pids.max` |
//! | `io` | `io.max` "MAJ:MIN rbps=N" (wbps, riops, wiops) | `blkio.throttle.{read,write}_{bps,iops}_device` "MAJ:MIN N" |
//!
//! `None` leaves a setting as it is, so [`Cgroup::apply`] works for a live change that names
//! only what changes; [`UNLIMITED`] (or `cpus = 0.0`) lifts a limit. On v1 a memory change
//! without a swap value keeps the swap allowance (memsw moves with memory).
//!
//! # Operations
//!
//! [`Cgroup::create`] / [`Cgroup::open`], [`Cgroup::procs_files`] (a new process writes "0"
//! into each to join), [`Cgroup::add_process`], [`Cgroup::pids`], [`Cgroup::apply`],
//! [`Cgroup::read_limits`], [`Cgroup::stats`], [`Cgroup::freeze`] / [`Cgroup::thaw`] (the
//! [`Freezer`] that checkpoint uses), [`Cgroup::kill`], [`Cgroup::remove`].

mod cpu;
pub mod freezer;
pub mod hierarchy;
mod io;
pub mod limits;
pub mod membership;
mod memory;
mod pids;
pub mod stats;
#[cfg(test)]
mod tests;

pub use cpu::{shares_to_weight, weight_to_shares};
pub use freezer::Freezer;
pub use hierarchy::{Controller, Hierarchy, Version};
pub use limits::{
    block_device, parse_cpu_weight, parse_cpus, parse_pids, parse_size, IoKind, IoLimit, Limits,
    CPU_PERIOD_US, DEFAULT_CPU_WEIGHT, MIN_CPUS, UNLIMITED,
};
pub use stats::Stats;

use crate::error::{Result, RuntimeError};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The parent of every container's cgroup, below each hierarchy's root.
pub const DEFAULT_PARENT: &str = "stasis";

/// How long [`Cgroup::freeze`] waits for every task to be frozen.
pub const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`Cgroup::kill`] waits for the cgroup to be empty.
pub const KILL_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| RuntimeError::sys("read", path.display().to_string(), e))
}

/// Writes `value` into an existing cgroup file in one write (a cgroup file is never made).
pub(crate) fn write(path: &Path, value: &str) -> Result<()> {
    let err = |e| RuntimeError::sys("write", format!("{} <- {value:?}", path.display()), e);
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(err)?
        .write_all(value.as_bytes())
        .map_err(err)
}

/// A file holding one number.
pub(crate) fn read_num(path: &Path) -> Result<u64> {
    let text = read(path)?;
    text.trim().parse().map_err(|_| RuntimeError::Parse {
        path: path.display().to_string(),
        what: format!("not a number: {:?}", text.trim()),
    })
}

/// A file holding one number or "max" ([`UNLIMITED`]).
pub(crate) fn read_max(path: &Path) -> Result<u64> {
    if read(path)?.trim() == "max" {
        Ok(UNLIMITED)
    } else {
        read_num(path)
    }
}

/// Like [`read_num`], `None` if the file does not exist on this kernel.
pub(crate) fn read_opt_num(path: &Path) -> Result<Option<u64>> {
    if path.exists() {
        read_num(path).map(Some)
    } else {
        Ok(None)
    }
}

/// "max" for [`UNLIMITED`], else the number.
pub(crate) fn max_text(v: u64) -> String {
    if v == UNLIMITED {
        "max".into()
    } else {
        v.to_string()
    }
}

/// Every process in the cgroup directory `dir` and the cgroups below it.
pub(crate) fn procs_below(dir: &Path) -> Result<Vec<i32>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let text = read(&dir.join("cgroup.procs"))?;
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| RuntimeError::sys("read_dir", dir.display().to_string(), e))?;
        todo.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists()),
        );
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// One controller's directory of a cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dir {
    pub(crate) version: Version,
    pub(crate) path: PathBuf,
}

impl Dir {
    pub(crate) fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

/// A cgroup of a container, in every hierarchy it uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    rel: String,
    /// Every directory, one per hierarchy used, the cgroup2 one first.
    dirs: Vec<PathBuf>,
    v2: Option<PathBuf>,
    memory: Option<Dir>,
    cpu: Option<Dir>,
    pids: Option<Dir>,
    io: Option<Dir>,
    cpuacct: Option<Dir>,
    freezer: Option<Freezer>,
}

/// Refuses paths that would leave the hierarchy or name a controller file.
fn check_rel(rel: &str) -> Result<()> {
    let bad = rel.is_empty()
        || rel.starts_with('/')
        || rel.contains(['\n', '\0'])
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(RuntimeError::Cgroup {
            target: format!("cgroup {rel:?}"),
            what: "a cgroup path is relative, with /-separated names other than . and ..".into(),
        });
    }
    Ok(())
}

fn mkdir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| RuntimeError::sys("mkdir", parent.display().to_string(), e))?;
    }
    std::fs::create_dir(dir).map_err(|e| RuntimeError::sys("mkdir", dir.display().to_string(), e))
}

/// Enables `controllers` for the children of every cgroup2 directory from `root` down to
/// the parent of `rel` (made if missing), so `rel` has their files.
fn enable_v2_controllers(root: &Path, rel: &str, controllers: &[&str]) -> Result<()> {
    if controllers.is_empty() {
        return Ok(());
    }
    let mut dir = root.to_path_buf();
    let parents: Vec<&str> = rel.split('/').collect();
    for i in 0..parents.len() {
        if i > 0 {
            dir.push(parents[i - 1]);
            if !dir.exists() {
                mkdir(&dir).or_else(|e| if dir.is_dir() { Ok(()) } else { Err(e) })?;
            }
        }
        let file = dir.join("cgroup.subtree_control");
        let on = read(&file)?;
        let missing: Vec<String> = controllers
            .iter()
            .filter(|c| !on.split_whitespace().any(|x| x == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if !missing.is_empty() {
            write(&file, &missing.join(" "))?;
        }
    }
    Ok(())
}

impl Cgroup {
    /// Where cgroup `rel` is in every hierarchy of `h` (nothing is read or made).
    fn plan(h: &Hierarchy, rel: &str) -> Result<Cgroup> {
        check_rel(rel)?;
        let dir = |c| {
            h.root_of(c).map(|(version, root)| Dir {
                version,
                path: root.join(rel),
            })
        };
        let mut cg = Cgroup {
            rel: rel.to_string(),
            dirs: Vec::new(),
            v2: h.v2_root().map(|r| r.join(rel)),
            memory: dir(Controller::Memory),
            cpu: dir(Controller::Cpu),
            pids: dir(Controller::Pids),
            io: dir(Controller::Io),
            cpuacct: dir(Controller::CpuAcct),
            freezer: None,
        };
        let controller_dirs = [&cg.memory, &cg.cpu, &cg.pids, &cg.io, &cg.cpuacct];
        let mut dirs: Vec<PathBuf> = cg.v2.iter().cloned().collect();
        for d in controller_dirs.into_iter().flatten() {
            if !dirs.contains(&d.path) {
                dirs.push(d.path.clone());
            }
        }
        if cg.v2.is_none() {
            if let Some(root) = h.v1_root(Controller::Freezer.v1_name()) {
                dirs.push(root.join(rel));
            }
        }
        cg.dirs = dirs;
        Ok(cg)
    }

    /// The v1 freezer directory to use besides cgroup2, on a kernel whose cgroup2 has no
    /// `cgroup.freeze` (before 5.2).
    fn v1_freezer_fallback(&self, h: &Hierarchy) -> Option<PathBuf> {
        let v2 = self.v2.as_ref()?;
        if v2.join("cgroup.freeze").exists() {
            return None;
        }
        h.v1_root(Controller::Freezer.v1_name())
            .map(|r| r.join(&self.rel))
    }

    fn find_freezer(&self) -> Option<Freezer> {
        if let Some(v2) = self
            .v2
            .as_ref()
            .filter(|d| d.join("cgroup.freeze").exists())
        {
            return Some(Freezer::V2(v2.clone()));
        }
        self.dirs
            .iter()
            .find(|d| d.join("freezer.state").exists())
            .map(|d| Freezer::V1(d.clone()))
    }

    /// Makes cgroup `rel` (e.g. `stasis/web`) in every hierarchy it uses: the hierarchies
    /// of memory, cpu, pids and io, plus cgroup2 (freezer, kill, CPU time) or, without it, the
    /// v1 cpuacct and freezer ones. Enables the controllers in the cgroup2 parents. Fails if it
    /// already exists anywhere; on failure removes what it made.
    pub fn create(h: &Hierarchy, rel: &str) -> Result<Cgroup> {
        let mut cg = Cgroup::plan(h, rel)?;
        if let Some(d) = cg.dirs.iter().find(|d| d.exists()) {
            return Err(cg.error(format!("already exists ({})", d.display())));
        }
        if let Some(root) = h.v2_root() {
            let wanted: Vec<&str> = [
                (Controller::Memory, &cg.memory),
                (Controller::Cpu, &cg.cpu),
                (Controller::Pids, &cg.pids),
                (Controller::Io, &cg.io),
            ]
            .into_iter()
            .filter(|(_, d)| d.as_ref().is_some_and(|d| d.version == Version::V2))
            .filter_map(|(c, _)| c.v2_name())
            .collect();
            enable_v2_controllers(root, rel, &wanted)?;
        }
        let mut made: Vec<PathBuf> = Vec::new();
        let mut result = cg.dirs.iter().try_for_each(|d| {
            mkdir(d)?;
            made.push(d.clone());
            Ok(())
        });
        if result.is_ok() {
            if let Some(d) = cg.v1_freezer_fallback(h) {
                result = mkdir(&d);
                if result.is_ok() {
                    made.push(d.clone());
                    cg.dirs.push(d);
                }
            }
        }
        if let Err(e) = result {
            for d in made.iter().rev() {
                let _ = std::fs::remove_dir(d);
            }
            return Err(e);
        }
        cg.freezer = cg.find_freezer();
        Ok(cg)
    }

    /// An existing cgroup `rel`; an error naming the first directory that is missing.
    pub fn open(h: &Hierarchy, rel: &str) -> Result<Cgroup> {
        let mut cg = Cgroup::plan(h, rel)?;
        if let Some(d) = cg.dirs.iter().find(|d| !d.is_dir()) {
            return Err(cg.error(format!("does not exist ({} is missing)", d.display())));
        }
        if let Some(d) = cg.v1_freezer_fallback(h).filter(|d| d.is_dir()) {
            cg.dirs.push(d);
        }
        cg.freezer = cg.find_freezer();
        Ok(cg)
    }

    fn error(&self, what: impl Into<String>) -> RuntimeError {
        RuntimeError::Cgroup {
            target: format!("cgroup {}", self.rel),
            what: what.into(),
        }
    }

    fn need<'a>(&self, dir: &'a Option<Dir>, c: Controller) -> Result<&'a Dir> {
        dir.as_ref().ok_or_else(|| {
            self.error(format!(
                "this host has no {} controller (not in cgroup2's cgroup.controllers, not \
                 mounted as cgroup v1)",
                c.v1_name()
            ))
        })
    }

    /// Its path below each hierarchy's root.
    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// Every directory of it, one per hierarchy used.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Its freezer, if the host has one.
    pub fn freezer(&self) -> Option<&Freezer> {
        self.freezer.as_ref()
    }

    /// Every `cgroup.procs` a new process must be written into to be fully in this cgroup
    /// (a child joins by writing "0" into each before it execs).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Moves process `pid` (all its threads) into this cgroup in every hierarchy.
    pub fn add_process(&self, pid: i32) -> Result<()> {
        self.procs_files()
            .iter()
            .try_for_each(|f| write(f, &pid.to_string()))
    }

    /// Every process in it (or a cgroup below it) in any of its hierarchies.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let mut all = Vec::new();
        for d in &self.dirs {
            all.extend(procs_below(d)?);
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    /// Sets the limits that are given (see [`Limits`]), live; the others stay as they are.
    /// Values are checked before anything is written; a write the kernel refuses (a v1
    /// memory limit below what is in use, say) stops there, naming the file, with the limits
    /// before it already set.
    pub fn apply(&self, limits: &Limits) -> Result<()> {
        limits.validate()?;
        if limits.memory.is_some() || limits.swap.is_some() {
            let d = self.need(&self.memory, Controller::Memory)?;
            memory::apply(d, limits.memory, limits.swap)?;
        }
        if limits.cpus.is_some() || limits.cpu_weight.is_some() {
            let d = self.need(&self.cpu, Controller::Cpu)?;
            cpu::apply(d, limits.cpus, limits.cpu_weight)?;
        }
        if limits.pids.is_some() {
            pids::apply(self.need(&self.pids, Controller::Pids)?, limits.pids)?;
        }
        if !limits.io.is_empty() {
            io::apply(self.need(&self.io, Controller::Io)?, &limits.io)?;
        }
        Ok(())
    }

    /// The limits set now: a limit that is unlimited, or a CPU weight at the default, is
    /// `None`, so applying the result to a new cgroup makes the same limits.
    pub fn read_limits(&self) -> Result<Limits> {
        let mut out = Limits::default();
        if let Some(d) = &self.memory {
            memory::read_limits(d, &mut out)?;
        }
        if let Some(d) = &self.cpu {
            cpu::read_limits(d, &mut out)?;
        }
        if let Some(d) = &self.pids {
            pids::read_limits(d, &mut out)?;
        }
        if let Some(d) = &self.io {
            io::read_limits(d, &mut out)?;
        }
        Ok(out)
    }

    /// Usage counters (see [`Stats`]).
    pub fn stats(&self) -> Result<Stats> {
        let mut out = Stats::default();
        if let Some(d) = &self.cpuacct {
            cpu::usage_stats(d, &mut out)?;
        }
        if let Some(d) = &self.cpu {
            cpu::throttle_stats(d, &mut out)?;
        }
        if let Some(d) = &self.memory {
            memory::stats(d, &mut out)?;
        }
        if let Some(d) = &self.pids {
            pids::stats(d, &mut out)?;
        }
        if let Some(d) = &self.io {
            io::stats(d, &mut out)?;
        }
        Ok(out)
    }

    fn need_freezer(&self) -> Result<&Freezer> {
        self.freezer
            .as_ref()
            .ok_or_else(|| self.error("this host has no freezer (no cgroup2, no v1 freezer)"))
    }

    /// Freezes every task and waits until they are frozen (at most [`FREEZE_TIMEOUT`]).
    pub fn freeze(&self) -> Result<()> {
        self.need_freezer()?.freeze(FREEZE_TIMEOUT)
    }

    /// Whether the cgroup is frozen.
    pub fn frozen(&self) -> Result<bool> {
        self.need_freezer()?.is_frozen()
    }

    /// Thaws every task.
    pub fn thaw(&self) -> Result<()> {
        self.need_freezer()?.thaw()
    }

    /// Kills every task and waits (at most [`KILL_TIMEOUT`]) until none is left: with
    /// cgroup2's `cgroup.kill` where the kernel has it, else by SIGKILL to each process,
    /// again until the cgroup is empty, with the cgroup frozen while the signals are sent
    /// so a forking task cannot slip through and no PID is reused between reading and
    /// signalling it (v1 frozen tasks die once thawed). The cgroup is left thawed.
    pub fn kill(&self) -> Result<()> {
        let deadline = Instant::now() + KILL_TIMEOUT;
        let cgroup_kill = self
            .v2
            .as_ref()
            .map(|d| d.join("cgroup.kill"))
            .filter(|f| f.exists());
        if let Some(f) = &cgroup_kill {
            write(f, "1")?;
        }
        loop {
            let left = self.pids()?;
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.error(format!(
                    "processes {left:?} are still in it {KILL_TIMEOUT:?} after SIGKILL"
                )));
            }
            if cgroup_kill.is_none() {
                let frozen = self
                    .freezer
                    .as_ref()
                    .is_some_and(|f| f.freeze(Duration::from_millis(500)).is_ok());
                for pid in self.pids()? {
                    match crate::sys::kill(pid, libc::SIGKILL) {
                        Err(e) if e.errno() != Some(libc::ESRCH) => return Err(e),
                        _ => {}
                    }
                }
                if frozen {
                    self.thaw()?;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Removes every directory (cgroups made below it first). Fails, naming the cgroup or
    /// the directory, if a process is still in it or the kernel finds it busy.
    pub fn remove(&self) -> Result<()> {
        let mut left = Vec::new();
        for d in self.dirs.iter().filter(|d| d.exists()) {
            left.extend(procs_below(d)?);
        }
        if !left.is_empty() {
            left.sort_unstable();
            left.dedup();
            return Err(self.error(format!(
                "cannot remove: processes {left:?} are still in it (kill them first)"
            )));
        }
        self.dirs.iter().try_for_each(|d| remove_tree(d))
    }
}

/// rmdir of `dir` after every cgroup directory below it. An already missing one is fine; a
/// busy one is retried briefly (a task that just exited may still be leaving).
fn remove_tree(dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(RuntimeError::sys("read_dir", dir.display().to_string(), e)),
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path())?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(RuntimeError::sys("rmdir", dir.display().to_string(), e)),
        }
    }
}

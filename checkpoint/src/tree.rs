//! Holding a whole process tree stopped: every thread of every process, found by walking
//! /proc/PID/task/TID/children from the root after each process is frozen (a frozen process
//! cannot fork any more, so when the walk ends no task can be missing).

use crate::error::CheckpointError;
use crate::freeze::{Frozen, PreSeized};
use stasis_image::proto;
use stasis_runtime::cgroup::Freezer;
use stasis_runtime::{procfs, ptrace, RuntimeError};
use std::time::Duration;

/// Most processes one checkpoint may hold.
pub const MAX_PROCESSES: usize = 4096;

/// A process of the tree that has exited and waits for its parent.
#[derive(Debug, Clone)]
pub struct Zombie {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub comm: String,
    pub wait_status: u32,
}

impl Zombie {
    fn from_stat(pid: i32, stat: procfs::Stat) -> Self {
        Zombie {
            pid,
            ppid: stat.ppid,
            pgid: stat.pgrp,
            sid: stat.session,
            comm: stat.comm,
            wait_status: stat.exit_code as u32,
        }
    }

    /// Its image record: no threads, memory or files; only who it was and its status.
    pub fn to_proto(&self) -> proto::Process {
        proto::Process {
            pid: self.pid as u32,
            ppid: self.ppid as u32,
            pgid: self.pgid as u32,
            sid: self.sid as u32,
            comm: self.comm.clone(),
            zombie: true,
            wait_status: self.wait_status,
            ..Default::default()
        }
    }
}

/// Every process of a tree, stopped. Dropped without [`FrozenTree::kill`] or
/// [`FrozenTree::resume`], every process is resumed as it was.
pub struct FrozenTree {
    /// Live processes, root first, every parent before its children.
    pub procs: Vec<Frozen>,
    pub zombies: Vec<Zombie>,
    /// The cgroup freezer used to stop the tree at one instant, if the tree has a cgroup
    /// of its own.
    pub freezer: Option<String>,
}

/// The freezer of `root`'s cgroup if that cgroup holds nothing but `root` and its
/// descendants (stasis never freezes anything else).
fn own_freezer(root: i32) -> Result<Option<Freezer>, CheckpointError> {
    let Some(fz) = Freezer::of(root)? else {
        return Ok(None);
    };
    for p in fz.procs()? {
        let mut at = p;
        for _ in 0..MAX_PROCESSES {
            if at == root || at <= 1 {
                break;
            }
            at = procfs::read_stat(at).map_or(1, |s| s.ppid);
        }
        if at != root {
            return Ok(None);
        }
    }
    Ok(Some(fz))
}

/// Freezes the cgroup, seizes and interrupts every thread in it, and thaws it: every task
/// then stops within moments of the others, and none can fork or clone unseen.
fn preseize(fz: &Freezer, pre: &mut PreSeized) -> Result<(), CheckpointError> {
    let mut zombies = Vec::new();
    for p in fz.procs()? {
        match procfs::read_stat(p).map(|s| s.state) {
            Ok('T') => {
                pre.stopped.insert(p);
            }
            Ok('Z') => zombies.push(p),
            _ => {}
        }
    }
    // If stasis dies while the cgroup is frozen, the guard thaws it.
    let (file, thaw) = fz.thaw_write();
    let guard = stasis_runtime::guard::Guard::arm(&[(&file, thaw)])?;
    fz.freeze(Duration::from_secs(5))?;
    stasis_runtime::failpoints::hit("preseize-frozen");
    let seized = (|| -> Result<(), CheckpointError> {
        // A job-stopped task cannot fork; and seizing it while the v1 freezer holds it
        // would wait for it to trap, which it cannot do until thawed. It is seized later.
        let skip = |p: &i32| zombies.contains(p) || pre.stopped.contains(p);
        let procs: Vec<i32> = fz.procs()?.into_iter().filter(|p| !skip(p)).collect();
        for p in procs {
            for tid in procfs::read_tids(p).unwrap_or_default() {
                match ptrace::seize(tid, crate::freeze::SEIZE_OPTIONS) {
                    Ok(()) => {}
                    Err(e) if e.errno() == Some(libc::ESRCH) => continue,
                    Err(e) => return Err(e.into()),
                }
                pre.tids.insert(tid, p);
                ptrace::interrupt(tid)?;
            }
        }
        Ok(())
    })();
    let thawed = fz.thaw();
    seized?;
    thawed?;
    // Dropped instead on an error above: the guard then thaws it once more.
    guard.disarm()?;
    Ok(())
}

/// The processes of the tree of `root` as they are now (it may be running): root first,
/// at most [`MAX_PROCESSES`].
pub(crate) fn members(root: i32) -> Vec<i32> {
    let mut todo = vec![root];
    let mut members = Vec::new();
    while let Some(p) = todo.pop() {
        if members.len() >= MAX_PROCESSES {
            break;
        }
        members.push(p);
        if let Ok(kids) = children_of(p) {
            todo.extend(kids);
        }
    }
    members
}

/// The children (thread-group ids) of every thread of `pid`.
pub(crate) fn children_of(pid: i32) -> Result<Vec<i32>, CheckpointError> {
    let mut out = Vec::new();
    for tid in procfs::read_tids(pid).map_err(|e| CheckpointError::from_proc(pid, e))? {
        let text = procfs::read_text(&format!("/proc/{pid}/task/{tid}/children"))?;
        out.extend(
            text.split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// How long a child that could not be stopped may take to become a zombie.
const EXIT_GRACE: Duration = Duration::from_millis(500);

/// After a child could not be stopped: Some(its zombie's stat) once it is a zombie, Some(None)
/// if it is gone, None if it is alive and well (so the failure was not its exit).
fn exited_meanwhile(pid: i32) -> Option<Option<procfs::Stat>> {
    let deadline = std::time::Instant::now() + EXIT_GRACE;
    loop {
        match procfs::read_stat(pid) {
            Ok(s) if s.state == 'Z' => return Some(Some(s)),
            Err(_) => return Some(None),
            // Exiting (PF_EXITING) but not a zombie yet: ptrace refuses it with ESRCH.
            Ok(_) if std::time::Instant::now() < deadline && exiting(pid) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(_) => return None,
        }
    }
}

/// Whether `pid` is on its way out: its main thread is gone from /proc/PID/task, or it is
/// marked exiting (a flag of /proc/PID/stat's field 9, PF_EXITING).
fn exiting(pid: i32) -> bool {
    const PF_EXITING: u64 = 0x4;
    let flags = procfs::read_text(&format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| {
            let rest = t.rsplit_once(')')?.1.to_string();
            rest.split_whitespace().nth(6)?.parse::<u64>().ok()
        });
    flags.is_none_or(|f| f & PF_EXITING != 0)
}

impl FrozenTree {
    /// Freezes `root` and, breadth first, every descendant.
    pub fn freeze(root: i32) -> Result<Self, CheckpointError> {
        let mut pre = PreSeized::default();
        let freezer = own_freezer(root)?;
        if let Some(fz) = &freezer {
            preseize(fz, &mut pre)?;
        }
        let mut tree = FrozenTree {
            procs: vec![Frozen::freeze_with(root, &mut pre)?],
            zombies: Vec::new(),
            freezer: freezer.map(|f| f.describe()),
        };
        let mut next = 0;
        while next < tree.procs.len() {
            let parent = tree.procs[next].pid();
            next += 1;
            for child in children_of(parent)? {
                if tree.procs.len() + tree.zombies.len() >= MAX_PROCESSES {
                    return Err(CheckpointError::unsupported(
                        root,
                        format!("its tree has more than {MAX_PROCESSES} processes"),
                    ));
                }
                let stat = match procfs::read_stat(child) {
                    Ok(s) => s,
                    Err(_) => continue, // reaped meanwhile: no longer ours to save
                };
                if stat.state == 'Z' {
                    tree.zombies.push(Zombie::from_stat(child, stat));
                    continue;
                }
                match Frozen::freeze_with(child, &mut pre) {
                    Ok(frozen) => tree.procs.push(frozen),
                    Err(e) => {
                        // It exited while being stopped: its parent is frozen, so it is a
                        // zombie now (or in a moment: it may still be on its way out), and
                        // saved as one; gone entirely if its parent ignores SIGCHLD.
                        match exited_meanwhile(child) {
                            Some(Some(s)) => {
                                tree.zombies.push(Zombie::from_stat(child, s));
                                continue;
                            }
                            Some(None) => continue,
                            None => {}
                        }
                        return Err(match e {
                            CheckpointError::Unsupported { pid, what } => {
                                CheckpointError::Unsupported {
                                    pid,
                                    what: format!("{what} (process {pid} is a child of {parent})"),
                                }
                            }
                            e => e,
                        });
                    }
                }
            }
        }
        Ok(tree)
    }

    /// Resumes every process exactly as it was (children first).
    pub fn resume(&mut self) -> Result<(), RuntimeError> {
        let mut first = None;
        for f in self.procs.iter_mut().rev() {
            if let Err(e) = f.resume() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Kills every process (only once the image is committed): all are sent SIGKILL first,
    /// then waited for children first. A parent cannot finish dying before we have collected
    /// its traced children's deaths (we are their tracer), and a pid namespace's init waits
    /// for every other process of its namespace; waiting for it first would wait forever.
    pub fn kill(&mut self) -> Result<(), RuntimeError> {
        let mut first = None;
        for f in self.procs.iter_mut() {
            if let Err(e) = f.signal_kill() {
                first.get_or_insert(e);
            }
        }
        for f in self.procs.iter_mut().rev() {
            if let Err(e) = f.kill() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

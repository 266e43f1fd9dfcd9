//! Trees that are a whole pid namespace.
//!
//! When the root of the tree is PID 1 of a pid namespace other than stasis's (a container's
//! init), the image records every PID as the processes see it in that namespace, and is
//! marked as a pid-namespace image: restore recreates it in a fresh namespace, where those
//! PIDs cannot collide with anything. Every process of the tree must then be in that same
//! namespace (a process in a namespace nested inside it is refused, by name). A root that is
//! in another namespace without being its init is refused: its tree would be a part of a
//! namespace, whose other processes the image could not hold.
//!
//! Checkpointing works on host PIDs (as stasis sees them) throughout; [`PidView::translate`]
//! turns the finished records into namespace PIDs just before they are written.

use crate::error::CheckpointError;
use crate::tree::FrozenTree;
use stasis_image::proto;
use stasis_runtime::{pidns, procfs};
use std::collections::BTreeMap;

/// Where the root of a tree lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    /// In stasis's own pid namespace: PIDs are recorded as they are.
    Ours,
    /// PID 1 of another pid namespace, `depth` levels below stasis's /proc.
    Init { depth: usize },
}

/// Classifies the root `pid`, refusing a root that is in another pid namespace without being
/// its init.
pub fn root_kind(pid: i32) -> Result<RootKind, CheckpointError> {
    let status = procfs::read_status(pid).map_err(|e| CheckpointError::from_proc(pid, e))?;
    let ours = pidns::own_pid_ns()?;
    let theirs = pidns::ns_id(pid, "pid").map_err(|e| CheckpointError::from_proc(pid, e))?;
    if theirs == ours || status.ns_depth() == 0 {
        return Ok(RootKind::Ours);
    }
    match status.own_pid() {
        Some(1) => Ok(RootKind::Init {
            depth: status.ns_depth(),
        }),
        own => Err(CheckpointError::unsupported(
            pid,
            format!(
                "process {pid} is PID {} of a pid namespace that is not stasis's, but not that \
                 namespace's init: only a whole pid namespace (checkpointed from its PID 1) or \
                 a tree in stasis's own pid namespace can be checkpointed",
                own.map_or("?".to_string(), |p| p.to_string())
            ),
        )),
    }
}

/// Refuses a tree (the PIDs of all its processes, the root included, whose namespace is
/// `kind`) with a process in a pid namespace nested inside the root's, naming it; then one
/// that has made a new pid namespace for its future children (unshare(CLONE_NEWPID)), which
/// a restore could not make again. Processes gone meanwhile are skipped.
pub fn check_tree(kind: RootKind, pids: &[i32]) -> Result<(), CheckpointError> {
    let want = match kind {
        RootKind::Ours => 0,
        RootKind::Init { depth } => depth,
    };
    let statuses: Vec<(i32, procfs::Status)> = pids
        .iter()
        .filter_map(|&p| Some((p, procfs::read_status(p).ok()?)))
        .collect();
    for (pid, status) in &statuses {
        if status.ns_depth() > want {
            return Err(CheckpointError::unsupported(
                *pid,
                format!(
                    "process {pid} ({}) is in a pid namespace nested inside the tree's (it is \
                     PID {} there); nested pid namespaces are not supported",
                    status.name,
                    status.own_pid().unwrap_or(0)
                ),
            ));
        }
    }
    for (pid, status) in statuses.iter().filter(|(_, s)| s.state != 'Z') {
        let (Ok(own), Ok(kids)) = (
            pidns::ns_id(*pid, "pid"),
            pidns::ns_id(*pid, "pid_for_children"),
        ) else {
            continue;
        };
        if own != kids {
            return Err(CheckpointError::unsupported(
                *pid,
                format!(
                    "process {pid} ({}) has made a new pid namespace for its children \
                     (unshare(CLONE_NEWPID)); nested pid namespaces are not supported",
                    status.name
                ),
            ));
        }
    }
    Ok(())
}

/// The namespaces every task of a tree must share with its root: restore creates every
/// process in the namespaces it puts the root in, so a task with one of its own would come
/// back inside its parent's, its isolation silently gone. (Pid namespaces are
/// [`check_tree`]'s.)
const SHARED: [&str; 7] = ["mnt", "net", "uts", "ipc", "user", "cgroup", "time"];

/// What the namespace of each kind is for.
fn ns_name(kind: &str) -> &'static str {
    match kind {
        "mnt" => "mount",
        "net" => "network",
        "uts" => "UTS (host name)",
        "ipc" => "IPC",
        "user" => "user",
        "cgroup" => "cgroup",
        _ => "time",
    }
}

/// (device, inode) of /proc/PID/task/TID/ns/KIND; None if it cannot be read (the task is
/// gone, or a zombie).
fn task_ns(pid: i32, tid: i32, kind: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(format!("/proc/{pid}/task/{tid}/ns/{kind}")).ok()?;
    Some((m.dev(), m.ino()))
}

/// Refuses a tree (root `root`, processes `pids`) in which a task (a process or one of its
/// threads) is in another mount, network, UTS, IPC, user, cgroup or time namespace than the
/// root, or has made a time namespace for its future children: restore would bring it back
/// in the root's, without a word. Names the process, the namespace and how to tell.
pub fn check_namespaces(root: i32, pids: &[i32]) -> Result<(), CheckpointError> {
    let want: Vec<(&str, Option<(u64, u64)>)> = SHARED
        .iter()
        .map(|&k| (k, task_ns(root, root, k)))
        .collect();
    for &pid in pids {
        let comm = || {
            procfs::read_text(&format!("/proc/{pid}/comm"))
                .map(|c| c.trim_end().to_string())
                .unwrap_or_else(|_| "?".into())
        };
        for tid in procfs::read_tids(pid).unwrap_or_default() {
            let who = if tid == pid {
                format!("process {pid} ({})", comm())
            } else {
                format!("thread {tid} of process {pid} ({})", comm())
            };
            for (kind, root_ns) in &want {
                let (Some(theirs), Some(root_ns)) = (task_ns(pid, tid, kind), root_ns) else {
                    continue;
                };
                if theirs != *root_ns {
                    return Err(CheckpointError::unsupported(
                        pid,
                        format!(
                            "{who} is in a {} namespace of its own ({kind}:[{}]), not the tree \
                             root's ({kind}:[{}]); a restore would put it in the root's, so \
                             nested {} namespaces are not supported",
                            ns_name(kind),
                            theirs.1,
                            root_ns.1,
                            ns_name(kind)
                        ),
                    ));
                }
            }
            let time = task_ns(pid, tid, "time");
            let kids = task_ns(pid, tid, "time_for_children");
            if let (Some(t), Some(k)) = (time, kids) {
                if t != k {
                    return Err(CheckpointError::unsupported(
                        pid,
                        format!(
                            "{who} has made a new time namespace for its children \
                             (unshare(CLONE_NEWTIME)); a restore could not make it again"
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Refuses a tree in stasis's own pid namespace (not a container's, whose namespaces the
/// container restore makes) whose root `root` is in a namespace of another kind than
/// stasis's: restore would create it in the restorer's, its isolation silently gone.
pub fn check_root_namespaces(root: i32) -> Result<(), CheckpointError> {
    use std::os::unix::fs::MetadataExt;
    let comm = procfs::read_text(&format!("/proc/{root}/comm"))
        .map(|c| c.trim_end().to_string())
        .unwrap_or_else(|_| "?".into());
    for kind in SHARED {
        let own = std::fs::metadata(format!("/proc/thread-self/ns/{kind}"))
            .map(|m| (m.dev(), m.ino()))
            .ok();
        let theirs = task_ns(root, root, kind);
        if let (Some(own), Some(theirs)) = (own, theirs) {
            if own != theirs {
                return Err(CheckpointError::unsupported(
                    root,
                    format!(
                        "process {root} ({comm}) is in a {} namespace of its own ({kind}:[{}]), \
                         not stasis's ({kind}:[{}]); a restore would put it in the restorer's, \
                         so only a container (stasis run) or a whole pid namespace may have \
                         namespaces of its own",
                        ns_name(kind),
                        theirs.1,
                        own.1
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Refuses a whole-namespace tree (root `root`, processes `members`) when its namespace
/// holds a process that is not in the tree: one that joined it from outside (setns, as
/// nsenter and `docker exec` do) is a child of a process outside, and the image would
/// silently lack it. The tree may still be running: a process of the namespace whose
/// parent is in it too was born (or reparented) in the tree after `members` was read.
pub fn check_whole(root: i32, members: &[i32]) -> Result<(), CheckpointError> {
    let ns = pidns::ns_id(root, "pid").map_err(|e| CheckpointError::from_proc(root, e))?;
    let dir = std::fs::read_dir("/proc").map_err(|e| CheckpointError::Io("/proc".into(), e))?;
    for d in dir.flatten() {
        let Some(pid) = d.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if members.contains(&pid) || pidns::ns_id(pid, "pid").ok() != Some(ns) {
            continue;
        }
        let parent_inside = procfs::read_stat(pid)
            .ok()
            .is_none_or(|s| pidns::ns_id(s.ppid, "pid").ok() == Some(ns));
        if parent_inside {
            continue;
        }
        let status = procfs::read_status(pid).ok();
        let name = status.as_ref().map_or("?".to_string(), |s| s.name.clone());
        let own = status.and_then(|s| s.own_pid()).unwrap_or(0);
        return Err(CheckpointError::unsupported(
            root,
            format!(
                "process {pid} ({name}) is in the tree's pid namespace (as PID {own}) but not \
                 in the tree: it joined the namespace from outside (setns, e.g. nsenter or an \
                 exec into a container), and the image could not hold it"
            ),
        ));
    }
    Ok(())
}

/// How the PIDs of a frozen tree are recorded.
pub struct PidView {
    root: i32,
    /// None for a tree in stasis's namespace. Otherwise every process's and thread's host PID
    /// → its PID in the namespace, and every process's host PID → (its process group, its
    /// session) there (0 for one outside the namespace).
    names: Option<Names>,
}

struct Names {
    pids: BTreeMap<i32, i32>,
    groups: BTreeMap<i32, (i32, i32)>,
}

impl PidView {
    /// Checks every process of `tree` against the root's namespace (`kind`) and reads the PIDs
    /// they have in it.
    pub fn of(tree: &FrozenTree, root: i32, kind: RootKind) -> Result<Self, CheckpointError> {
        let hosts: Vec<i32> = tree
            .procs
            .iter()
            .map(|f| f.pid())
            .chain(tree.zombies.iter().map(|z| z.pid))
            .collect();
        check_tree(kind, &hosts)?;
        check_namespaces(root, &hosts)?;
        if kind == RootKind::Ours {
            return Ok(PidView { root, names: None });
        }
        check_whole(root, &hosts)?;
        let mut names = Names {
            pids: BTreeMap::new(),
            groups: BTreeMap::new(),
        };
        for &pid in &hosts {
            let status = procfs::read_status(pid)?;
            let own = |ids: &[i32], what: &str| {
                ids.last().copied().ok_or_else(|| {
                    CheckpointError::unsupported(pid, format!("/proc/{pid}/status has no {what}"))
                })
            };
            names.pids.insert(pid, own(&status.ns_pid, "NSpid")?);
            names.groups.insert(
                pid,
                (
                    own(&status.ns_pgid, "NSpgid")?,
                    own(&status.ns_sid, "NSsid")?,
                ),
            );
        }
        for f in &tree.procs {
            for t in f.threads().iter().filter(|t| t.tid != f.pid()) {
                let path = format!("/proc/{}/task/{}/status", f.pid(), t.tid);
                let status = procfs::parse_status(&path, &procfs::read_text(&path)?)?;
                let tid = status.own_pid().ok_or_else(|| {
                    CheckpointError::unsupported(f.pid(), format!("{path} has no NSpid"))
                })?;
                names.pids.insert(t.tid, tid);
            }
        }
        Ok(PidView {
            root,
            names: Some(names),
        })
    }

    /// Whether the tree is a whole pid namespace (its PIDs are recorded as it sees them).
    pub fn is_namespace(&self) -> bool {
        self.names.is_some()
    }

    /// The PID host PID `pid` of the tree is recorded as.
    pub fn image_pid(&self, pid: i32) -> Result<i32, CheckpointError> {
        match &self.names {
            None => Ok(pid),
            Some(n) => n.pids.get(&pid).copied().ok_or_else(|| {
                CheckpointError::unsupported(
                    self.root,
                    format!("PID {pid} is not a task of the tree's pid namespace"),
                )
            }),
        }
    }

    /// Host PID → image PID of every process of the tree (for the page spaces).
    pub fn process_ids(&self, procs: &[proto::Process]) -> BTreeMap<u64, u64> {
        procs
            .iter()
            .filter_map(|p| {
                let host = p.pid as i32;
                Some((host as u64, self.image_pid(host).ok()? as u64))
            })
            .collect()
    }

    /// Rewrites every PID-valued field of the records (collected with host PIDs) into the
    /// namespace's PIDs: pid, ppid, pgid, sid, thread ids and POSIX timer target threads.
    pub fn translate(&self, procs: &mut [proto::Process]) -> Result<(), CheckpointError> {
        let Some(names) = &self.names else {
            return Ok(());
        };
        for p in procs.iter_mut() {
            let host = p.pid as i32;
            p.ppid = if host == self.root {
                0 // its parent is outside the namespace
            } else {
                self.image_pid(p.ppid as i32)? as u32
            };
            let (pgid, sid) = names.groups.get(&host).copied().unwrap_or_default();
            p.pgid = pgid as u32;
            p.sid = sid as u32;
            p.pid = self.image_pid(host)? as u32;
            for t in p.threads.iter_mut() {
                t.tid = self.image_pid(t.tid as i32)? as u32;
            }
            for t in p.posix_timers.iter_mut().filter(|t| t.notify_tid != 0) {
                t.notify_tid = self.image_pid(t.notify_tid)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pid_field_is_translated() {
        let view = PidView {
            root: 100,
            names: Some(Names {
                pids: BTreeMap::from([(100, 1), (101, 2), (102, 3)]),
                groups: BTreeMap::from([(100, (0, 0)), (101, (2, 2))]),
            }),
        };
        let thread = |tid| proto::Thread {
            tid,
            ..Default::default()
        };
        let mut procs = vec![
            proto::Process {
                pid: 100,
                ppid: 99,
                pgid: 98,
                sid: 97,
                threads: vec![thread(100)],
                ..Default::default()
            },
            proto::Process {
                pid: 101,
                ppid: 100,
                pgid: 101,
                sid: 101,
                threads: vec![thread(101), thread(102)],
                posix_timers: vec![proto::PosixTimer {
                    notify_tid: 102,
                    ..Default::default()
                }],
                ..Default::default()
            },
        ];
        assert_eq!(
            view.process_ids(&procs),
            BTreeMap::from([(100, 1), (101, 2)])
        );
        view.translate(&mut procs).unwrap();
        let ids = |p: &proto::Process| (p.pid, p.ppid, p.pgid, p.sid);
        assert_eq!(ids(&procs[0]), (1, 0, 0, 0));
        assert_eq!(ids(&procs[1]), (2, 1, 2, 2));
        assert_eq!(procs[1].threads[1].tid, 3);
        assert_eq!(procs[1].posix_timers[0].notify_tid, 3);
        // A PID outside the tree cannot be recorded.
        assert!(view.image_pid(4242).is_err());
    }
}

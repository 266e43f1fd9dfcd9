//! File locks, leases and signal owners of the tree's open files.
//!
//! /proc/PID/fdinfo/FD lists (as `lock:` lines) the locks taken through that fd's open file
//! description by their owner: POSIX record locks of the process's fd table, flock and OFD
//! locks and leases of the description itself. Requests still waiting (a process blocked in
//! F_SETLKW or flock) are not listed: the waiter's interrupted call is restarted after
//! restore and waits again, for a holder that has its lock back by then. Each lock is saved
//! once: a POSIX lock on an fd of the process that owns it, a description's lock on one fd of
//! that description (in the process that took it when that one still holds it). The signal
//! owner (F_SETOWN_EX) and signal (F_SETSIG) of a description are read from a copy of it.

use crate::error::CheckpointError;
use stasis_image::proto::{self, FdKind, LockKind};
use stasis_runtime::files;
use std::collections::BTreeMap;

/// Where one fd is: (process index, fd index).
type At = (usize, usize);

/// One `lock:` line of fdinfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Held {
    pub kind: i32,
    pub write: bool,
    pub start: u64,
    /// Last byte (inclusive); None: to the end of the file.
    pub end: Option<u64>,
    /// The process that took it (host PID), -1 for OFD locks.
    pub pid: i32,
}

/// Parses the `lock:` lines of fdinfo text; Err names a lock that cannot be taken again.
pub fn parse(text: &str) -> Result<Vec<Held>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("lock:") else {
            continue;
        };
        let w: Vec<&str> = rest.split_whitespace().collect();
        // "1:" KIND MODE TYPE PID DEV:INO START END
        let kind = match (w.get(1).copied(), w.get(2).copied()) {
            (Some("POSIX"), Some("ADVISORY")) => LockKind::Posix,
            (Some("OFDLCK"), Some("ADVISORY")) => LockKind::Ofd,
            (Some("FLOCK"), Some("ADVISORY")) => LockKind::Flock,
            (Some("LEASE"), Some("ACTIVE")) => LockKind::Lease,
            (Some("LEASE"), _) => {
                return Err(format!(
                    "a lease that is being broken ({}); wait until its holder gives it up",
                    rest.trim()
                ))
            }
            _ => return Err(format!("a lock of an unsupported kind ({})", rest.trim())),
        };
        let bad = || format!("an unreadable lock line ({})", rest.trim());
        let write = match w.get(3).copied() {
            Some("WRITE") => true,
            Some("READ") => false,
            _ => return Err(bad()),
        };
        let pid = w.get(4).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let start = w.get(6).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let end = match w.get(7).copied() {
            Some("EOF") => None,
            Some(s) => Some(s.parse().map_err(|_| bad())?),
            None => return Err(bad()),
        };
        out.push(Held {
            kind: kind as i32,
            write,
            start,
            end,
            pid,
        });
    }
    Ok(out)
}

fn to_proto(h: &Held) -> proto::FileLock {
    proto::FileLock {
        kind: h.kind,
        r#type: if h.write {
            libc::F_WRLCK as u32
        } else {
            libc::F_RDLCK as u32
        },
        start: h.start,
        len: h.end.map_or(0, |e| e.saturating_sub(h.start) + 1),
    }
}

/// Reads the locks and signal owners of every fd of the tree (desc_ids must be assigned) and
/// records each on the fd that takes it back at restore; refuses what cannot be.
pub fn collect(procs: &mut [proto::Process]) -> Result<(), CheckpointError> {
    let index: BTreeMap<i32, usize> = procs
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.zombie)
        .map(|(i, p)| (p.pid as i32, i))
        .collect();
    // Description → its fds, and the locks seen on it.
    let mut descs: BTreeMap<u32, (Vec<At>, Vec<Held>)> = BTreeMap::new();
    // (process, fd index) → POSIX locks it owns.
    let mut posix: BTreeMap<At, Vec<Held>> = BTreeMap::new();
    for i in 0..procs.len() {
        if procs[i].zombie {
            continue;
        }
        let pid = procs[i].pid as i32;
        for j in 0..procs[i].fds.len() {
            let f = &procs[i].fds[j];
            // Standard I/O lent by whoever started the tree is not ours to restore.
            if f.kind() == FdKind::Inherited {
                continue;
            }
            let (fd, desc) = (f.fd as i32, f.desc_id);
            let entry = descs.entry(desc).or_default();
            entry.0.push((i, j));
            let path = format!("/proc/{pid}/fdinfo/{fd}");
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => return Err(CheckpointError::Io(format!("reading {path}"), e)),
            };
            let held = parse(&text).map_err(|what| {
                CheckpointError::unsupported(pid, format!("fd {fd} holds {what}"))
            })?;
            for h in held {
                if h.kind != LockKind::Posix as i32 {
                    if !entry.1.contains(&h) {
                        entry.1.push(h);
                    }
                    continue;
                }
                // Owned by the fd table: listed for every process sharing it; taken back by
                // the process that took it, through its fd of the same number.
                let owner = index.get(&h.pid).copied().and_then(|o| {
                    let k = procs[o].fds.iter().position(|g| g.fd as i32 == fd)?;
                    Some((o, k))
                });
                let Some(at) = owner else {
                    return Err(CheckpointError::unsupported(
                        pid,
                        format!(
                            "fd {fd} holds a POSIX lock taken by process {}, which is not in \
                             the checkpointed tree or has no fd {fd}",
                            h.pid
                        ),
                    ));
                };
                let list = posix.entry(at).or_default();
                if !list.contains(&h) {
                    list.push(h);
                }
            }
        }
    }
    for (at, held) in posix {
        procs[at.0].fds[at.1]
            .locks
            .extend(held.iter().map(to_proto));
    }
    for (_, (ats, held)) in descs {
        for h in &held {
            // In the process that took it, if it still holds the description.
            let at = ats
                .iter()
                .copied()
                .find(|&(i, _)| procs[i].pid as i32 == h.pid)
                .unwrap_or(ats[0]);
            let f = &procs[at.0].fds[at.1];
            if h.kind == LockKind::Lease as i32 && (f.ghost_id != 0 || f.kind() != FdKind::Regular)
            {
                return Err(CheckpointError::unsupported(
                    procs[at.0].pid as i32,
                    format!(
                        "fd {} ({}) holds a lease, which is only supported on a file with a \
                         name",
                        f.fd, f.path
                    ),
                ));
            }
            procs[at.0].fds[at.1].locks.push(to_proto(h));
        }
        owner_of(procs, &index, ats[0])?;
    }
    Ok(())
}

/// Reads the signal owner and signal of the description of fd `at` and records them there.
fn owner_of(
    procs: &mut [proto::Process],
    index: &BTreeMap<i32, usize>,
    (i, j): At,
) -> Result<(), CheckpointError> {
    let (pid, fd) = (procs[i].pid as i32, procs[i].fds[j].fd as i32);
    let what = format!("fd {fd} of process {pid}");
    let copy = files::take_copy(pid, fd)?;
    let (kind, owner, signal) = files::signal_owner(&copy, &what)?;
    if owner == 0 && signal == 0 {
        return Ok(());
    }
    let refuse = |who: String| {
        CheckpointError::unsupported(
            pid,
            format!(
                "fd {fd} sends its signals (F_SETOWN) to {who}, which is not in the \
                 checkpointed tree"
            ),
        )
    };
    let (process, thread) = match kind {
        _ if owner == 0 => (0, 0),
        // F_OWNER_TID
        0 => procs
            .iter()
            .enumerate()
            .filter(|(_, p)| !p.zombie)
            .find_map(|(k, p)| {
                let t = p.threads.iter().position(|t| t.tid as i32 == owner)?;
                Some((k as u32 + 1, t as u32))
            })
            .ok_or_else(|| refuse(format!("thread {owner}")))?,
        // F_OWNER_PGRP: any process of the group names it.
        2 => procs
            .iter()
            .position(|p| p.pgid as i32 == owner)
            .map(|k| (k as u32 + 1, 0))
            .ok_or_else(|| refuse(format!("process group {owner}")))?,
        _ => index
            .get(&owner)
            .map(|&k| (k as u32 + 1, 0))
            .ok_or_else(|| refuse(format!("process {owner}")))?,
    };
    procs[i].fds[j].owner = Some(proto::FileOwner {
        r#type: kind,
        process,
        thread,
        signal,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_kind_of_lock_line() {
        let text = "pos:\t5\nflags:\t0100002\nmnt_id:\t27\nino:\t1\n\
                    lock:\t1: POSIX  ADVISORY  WRITE 15731 fe:00:10011082 0 1\n\
                    lock:\t2: FLOCK  ADVISORY  READ 15731 fe:00:10011082 0 EOF\n\
                    lock:\t3: OFDLCK ADVISORY  READ -1 fe:00:10011084 10 EOF\n\
                    lock:\t4: LEASE  ACTIVE    WRITE 15731 fe:00:10011082 0 EOF\n";
        let held = parse(text).expect("parses");
        assert_eq!(held.len(), 4);
        let p = to_proto(&held[0]);
        assert_eq!((p.kind, p.r#type, p.start, p.len), (1, 1, 0, 2));
        let o = to_proto(&held[2]);
        assert_eq!((o.kind, o.r#type, o.start, o.len), (3, 0, 10, 0));
        assert_eq!(held[2].pid, -1);
        assert_eq!(held[3].kind, LockKind::Lease as i32);
    }

    #[test]
    fn refuses_a_lease_being_broken() {
        let text = "lock:\t1: LEASE  BREAKING  READ 12 fe:00:1 0 EOF\n";
        assert!(parse(text).unwrap_err().contains("being broken"));
    }
}

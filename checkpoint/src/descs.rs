//! What the fds of a tree share: open file descriptions (one offset, one set of flags, as
//! dup(2) and fork(2) leave them), found with kcmp; and pipes, whose ends must all be in the
//! tree (their buffered bytes are saved once) unless they are a shell job's standard I/O.

use crate::error::CheckpointError;
use stasis_image::proto::{self, FdKind};
use stasis_runtime::{files, unix_queue};
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

/// Where one fd is: (process index, fd index).
type At = (usize, usize);

/// The fds of the tree by the file they have open: (device, inode) → where they are.
type Files = BTreeMap<(u64, u64), Vec<At>>;

/// Gives every fd its desc_id, and settles every pipe: kept (with its bytes stored in the
/// first process holding an end), inherited (standard I/O to outside the tree, unless
/// `closed` — a container, whose standard I/O never leads outside but to its log), or
/// refused.
pub fn link(procs: &mut [proto::Process], closed: bool) -> Result<(), CheckpointError> {
    settle_shared_tables(procs)?;
    let files = assign_desc_ids(procs)?;
    settle_pipes(procs, closed)?;
    settle_unix_pairs(procs, &files)?;
    crate::locks::collect(procs)
}

/// Both ends of every unix socket pair must be in the tree; what is queued for each end is
/// peeked (never consumed) and stored once, with the files in flight its messages carry.
fn settle_unix_pairs(procs: &mut [proto::Process], files: &Files) -> Result<(), CheckpointError> {
    let mut ends: BTreeMap<u64, At> = BTreeMap::new();
    for (i, p) in procs.iter().enumerate() {
        for (j, f) in p.fds.iter().enumerate() {
            if f.kind() == FdKind::UnixPair {
                ends.entry(f.socket_id).or_insert((i, j));
            }
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    let first = ends
        .values()
        .next()
        .map_or(0, |&(i, _)| procs[i].pid as i32);
    let sockets = stasis_runtime::unix_diag::unix_sockets_of(first)?;
    let mut done = std::collections::BTreeSet::new();
    for (&id, &(i, j)) in &ends {
        let peer = procs[i].fds[j].socket_peer;
        if done.contains(&id) {
            continue;
        }
        let Some(&(pi, pj)) = ends.get(&peer) else {
            return Err(CheckpointError::unsupported(
                procs[i].pid as i32,
                format!(
                    "fd {} is a unix socket whose peer is outside the checkpointed tree",
                    procs[i].fds[j].fd
                ),
            ));
        };
        done.insert(id);
        done.insert(peer);
        let sock_type = sockets.get(&id).map_or(0, |s| s.sock_type) as u32;
        let stream = sock_type == libc::SOCK_STREAM as u32;
        let peek = |(a, b): At| -> Result<(Vec<Vec<u8>>, Vec<proto::Attachment>), CheckpointError> {
            let (pid, fd) = (procs[a].pid as i32, procs[a].fds[b].fd as i32);
            let what = format!("unix socket fd {fd} of process {pid}");
            let copy = files::take_copy(pid, fd)?;
            let queued = unix_queue::peek_queue(&copy, stream, &what)
                .map_err(|e| CheckpointError::unsupported(pid, e.to_string()))?;
            let mut data = Vec::with_capacity(queued.len());
            let mut attached = Vec::new();
            for (k, m) in queued.into_iter().enumerate() {
                if !m.fds.is_empty() {
                    let files = m
                        .fds
                        .iter()
                        .map(|c| in_flight(procs, files, c, (pid, fd)))
                        .collect::<Result<_, _>>()?;
                    attached.push(proto::Attachment {
                        message: k as u32,
                        files,
                    });
                }
                data.push(m.data);
            }
            Ok((data, attached))
        };
        let (queued_for_id, attached_for_id) = peek((i, j))?;
        let (queued_for_peer, attached_for_peer) = peek((pi, pj))?;
        let pair = proto::UnixPair {
            id,
            peer,
            sock_type,
            queued_for_id,
            queued_for_peer,
            attached_for_id,
            attached_for_peer,
        };
        procs[i.min(pi)].unix_pairs.push(pair);
    }
    Ok(())
}

/// What `copy` (this process's copy of a file in flight on unix socket fd `holder.1` of
/// process `holder.0`) is: the open file description of some fd of the tree (a process
/// passed one of its own fds), or a file nobody in the tree holds any more (only a regular
/// file is supported then).
fn in_flight(
    procs: &[proto::Process],
    files: &Files,
    copy: &OwnedFd,
    (pid, fd): (i32, i32),
) -> Result<proto::InFlightFile, CheckpointError> {
    let me = std::process::id() as i32;
    let raw = copy.as_raw_fd();
    let path = format!("/proc/self/fd/{raw}");
    let meta = std::fs::metadata(&path).map_err(|e| {
        CheckpointError::Io(
            format!("stat a file in flight on unix socket fd {fd} of process {pid}"),
            e,
        )
    })?;
    for &(i, j) in files.get(&(meta.dev(), meta.ino())).into_iter().flatten() {
        let f = &procs[i].fds[j];
        if files::same_description(me, raw, procs[i].pid as i32, f.fd as i32)? {
            return Ok(proto::InFlightFile {
                desc_id: f.desc_id,
                file: None,
            });
        }
    }
    let file = crate::fds::in_flight_file(copy, |what| {
        CheckpointError::unsupported(
            pid,
            format!(
                "unix socket fd {fd} has a file in flight (SCM_RIGHTS) that no process of the \
                 tree holds: {what}; only a regular file can be restored that way"
            ),
        )
    })?;
    Ok(proto::InFlightFile {
        desc_id: 0,
        file: Some(file),
    })
}

/// Processes (not threads) sharing one fd table are kept that way when the sharer is a child
/// of the table's other holder (clone(CLONE_FILES), as a parent makes it); any other sharing,
/// and processes sharing one address space, are refused. Only processes with the same fd
/// numbers (or the same mappings) can share them, so only those are compared.
fn settle_shared_tables(procs: &mut [proto::Process]) -> Result<(), CheckpointError> {
    let index: BTreeMap<u32, usize> = procs.iter().enumerate().map(|(i, p)| (p.pid, i)).collect();
    for i in 0..procs.len() {
        let parent = index.get(&procs[i].ppid).copied();
        if let Some(j) = parent.filter(|&j| !procs[j].zombie && !procs[i].zombie) {
            let (a, b) = (procs[j].pid as i32, procs[i].pid as i32);
            procs[i].files_shared_with_parent = files::share(a, b, files::Shared::FdTable)?;
        }
    }
    // The holder a process's table comes from: follow shared-with-parent links up.
    let top = |mut i: usize| {
        while procs[i].files_shared_with_parent {
            match index.get(&procs[i].ppid) {
                Some(&j) => i = j,
                None => break,
            }
        }
        i
    };
    let live: Vec<usize> = (0..procs.len()).filter(|&i| !procs[i].zombie).collect();
    let mut by_fds: BTreeMap<Vec<u32>, Vec<usize>> = BTreeMap::new();
    let mut by_vmas: BTreeMap<Vec<(u64, u64)>, Vec<usize>> = BTreeMap::new();
    for &i in &live {
        let fds = procs[i].fds.iter().map(|f| f.fd).collect();
        by_fds.entry(fds).or_default().push(i);
        let vmas = procs[i].vmas.iter().map(|v| (v.start, v.end)).collect();
        by_vmas.entry(vmas).or_default().push(i);
    }
    for group in by_fds.values() {
        for (k, &a) in group.iter().enumerate() {
            for &b in &group[k + 1..] {
                let (pa, pb) = (procs[a].pid as i32, procs[b].pid as i32);
                if top(a) != top(b) && files::share(pa, pb, files::Shared::FdTable)? {
                    return Err(CheckpointError::unsupported(
                        pb,
                        format!(
                            "it shares one fd table with process {pa}, which is not its parent \
                             (not supported yet)"
                        ),
                    ));
                }
            }
        }
    }
    for group in by_vmas.values() {
        for (k, &a) in group.iter().enumerate() {
            for &b in &group[k + 1..] {
                let (pa, pb) = (procs[a].pid as i32, procs[b].pid as i32);
                if files::share(pa, pb, files::Shared::AddressSpace)? {
                    return Err(CheckpointError::unsupported(
                        pb,
                        format!(
                            "it shares one address space with process {pa} (vfork or \
                             CLONE_VM), which is not supported yet"
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Gives every fd its desc_id; returns the fds grouped by the file they have open.
fn assign_desc_ids(procs: &mut [proto::Process]) -> Result<Files, CheckpointError> {
    // Only fds of the same file can share a description: group by inode first.
    let mut by_file: Files = BTreeMap::new();
    for (i, p) in procs.iter().enumerate() {
        for (j, f) in p.fds.iter().enumerate() {
            let path = format!("/proc/{}/fd/{}", p.pid, f.fd);
            let meta = std::fs::metadata(&path)
                .map_err(|e| CheckpointError::Io(format!("stat {path}"), e))?;
            by_file
                .entry((meta.dev(), meta.ino()))
                .or_default()
                .push((i, j));
        }
    }
    let mut next_id = 1u32;
    for group in by_file.values() {
        // Representatives of the descriptions found so far in this group.
        let mut reps: Vec<(At, u32)> = Vec::new();
        for &(i, j) in group {
            let (pid, fd) = (procs[i].pid as i32, procs[i].fds[j].fd as i32);
            let mut id = None;
            for &((ri, rj), rid) in &reps {
                let (rpid, rfd) = (procs[ri].pid as i32, procs[ri].fds[rj].fd as i32);
                if files::same_description(pid, fd, rpid, rfd)? {
                    id = Some(rid);
                    break;
                }
            }
            let id = id.unwrap_or_else(|| {
                let id = next_id;
                next_id += 1;
                reps.push(((i, j), id));
                id
            });
            procs[i].fds[j].desc_id = id;
        }
    }
    Ok(by_file)
}

fn settle_pipes(procs: &mut [proto::Process], closed: bool) -> Result<(), CheckpointError> {
    // (is a FIFO, inode) → its ends in the tree.
    let mut pipes: BTreeMap<(bool, u64), Vec<At>> = BTreeMap::new();
    for (i, p) in procs.iter().enumerate() {
        for (j, f) in p.fds.iter().enumerate() {
            if matches!(f.kind(), FdKind::Pipe | FdKind::Fifo) {
                let fifo = f.kind() == FdKind::Fifo;
                pipes.entry((fifo, f.pipe_id)).or_default().push((i, j));
            }
        }
    }
    for ((fifo, id), ends) in pipes {
        if fifo {
            refuse_fifo_open_outside(procs, &ends)?;
        }
        let acc = |&(i, j): &At| procs[i].fds[j].flags & libc::O_ACCMODE as u32;
        let reader = ends
            .iter()
            .find(|at| acc(at) != libc::O_WRONLY as u32)
            .copied();
        let writer = ends
            .iter()
            .find(|at| acc(at) != libc::O_RDONLY as u32)
            .copied();
        let copy_of = |at: At| {
            let (pid, fd) = (procs[at.0].pid as i32, procs[at.0].fds[at.1].fd as i32);
            let what = format!("pipe {id} (fd {fd} of process {pid})");
            files::take_copy(pid, fd).map(|c| (c, what))
        };
        // An end missing from the tree may simply be closed everywhere (make gives its
        // extra jobs such a stdin, and holds it at a higher fd too): then the pipe is whole
        // here and restored that way. Standard I/O alone is a shell job's, and inherited.
        let only_stdio = ends.iter().all(|&(i, j)| procs[i].fds[j].fd <= 2);
        let whole = match (reader, writer) {
            (Some(_), Some(_)) => true,
            _ if only_stdio && !fifo && !closed => false,
            (Some(r), None) => {
                let (c, what) = copy_of(r)?;
                files::pipe_peer_closed(&c, true, &what)?
            }
            (None, Some(w)) => {
                let (c, what) = copy_of(w)?;
                files::pipe_peer_closed(&c, false, &what)?
            }
            (None, None) => false,
        };
        if whole {
            // From a read end if the tree holds one (its bytes); a pipe with only writers
            // left has nothing anyone could ever read.
            let end = reader.or(writer).unwrap_or(ends[0]);
            let (copy, what) = copy_of(end)?;
            let (size, data) = if reader.is_some() {
                files::pipe_contents(&copy, &what)?
            } else {
                (files::pipe_size(&copy, &what)?, Vec::new())
            };
            let first = ends.iter().map(|at| at.0).min().unwrap_or(end.0);
            let fifo_path = if fifo {
                procs[end.0].fds[end.1].path.clone()
            } else {
                String::new()
            };
            procs[first].pipes.push(proto::Pipe {
                id,
                size,
                data,
                fifo_path,
            });
            continue;
        }
        if fifo {
            let (i, j) = ends[0];
            return Err(CheckpointError::unsupported(
                procs[i].pid as i32,
                format!(
                    "fd {} is FIFO {} with only one end open in the tree",
                    procs[i].fds[j].fd, procs[i].fds[j].path
                ),
            ));
        }
        // One end is outside the tree: only a shell job's standard I/O may be that.
        if let Some(&(i, j)) = ends.iter().find(|&&(i, j)| procs[i].fds[j].fd > 2) {
            let (p, f) = (&procs[i], &procs[i].fds[j]);
            let end = if acc(&(i, j)) == libc::O_RDONLY as u32 {
                "read"
            } else {
                "write"
            };
            return Err(CheckpointError::unsupported(
                p.pid as i32,
                format!(
                    "fd {} is the {end} end of pipe {id}, whose other end is outside the \
                     checkpointed tree",
                    f.fd
                ),
            ));
        }
        for &(i, j) in &ends {
            procs[i].fds[j].kind = FdKind::Inherited as i32;
        }
    }
    Ok(())
}

/// A FIFO's buffer lives as long as anyone holds it open: if a process outside the tree
/// does, the restored tree would reopen that same buffer and find the saved bytes twice.
/// Every process's fds are searched for it (only when the tree holds a FIFO).
fn refuse_fifo_open_outside(procs: &[proto::Process], ends: &[At]) -> Result<(), CheckpointError> {
    let (i, j) = ends[0];
    let path = format!("/proc/{}/fd/{}", procs[i].pid, procs[i].fds[j].fd);
    let meta =
        std::fs::metadata(&path).map_err(|e| CheckpointError::Io(format!("stat {path}"), e))?;
    let ours: Vec<u32> = procs.iter().map(|p| p.pid).collect();
    let dirs = std::fs::read_dir("/proc").map_err(|e| CheckpointError::Io("/proc".into(), e))?;
    for d in dirs.flatten() {
        let Some(pid) = d.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if ours.contains(&pid) || pid == std::process::id() {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(d.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(m) = std::fs::metadata(fd.path()) {
                if (m.dev(), m.ino()) == (meta.dev(), meta.ino()) {
                    return Err(CheckpointError::unsupported(
                        procs[i].pid as i32,
                        format!(
                            "fd {} is FIFO {}, which process {pid} outside the tree also has open",
                            procs[i].fds[j].fd, procs[i].fds[j].path
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

//! PID namespaces: which one a process is in, and the host PIDs of a tree that lives in one.
//!
//! A task of a tree restored into a new pid namespace has two PIDs: the one it sees (the
//! image's) and the one stasis sees (its "host" PID, in stasis's own namespace). Everything
//! stasis does from outside (ptrace, /proc/PID, kill, wait) takes the host PID; every value the
//! tasks use themselves (injected syscalls, set_tid, setpgid) the namespace one. Host PIDs are
//! read from the kernel (/proc children lists and NSpid), never taken from the tasks' word.

use crate::error::{Result, RuntimeError};
use crate::procfs;
use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::MetadataExt;

/// Identity of a namespace: device and inode of its /proc/PID/ns/KIND link.
pub type NsId = (u64, u64);

/// The namespace of kind `kind` ("pid", "mnt", "pid_for_children"...) process `pid` is in.
pub fn ns_id(pid: i32, kind: &str) -> Result<NsId> {
    let path = format!("/proc/{pid}/ns/{kind}");
    let m = std::fs::metadata(&path).map_err(|e| RuntimeError::sys("stat", path, e))?;
    Ok((m.dev(), m.ino()))
}

/// The pid namespace this process is in.
pub fn own_pid_ns() -> Result<NsId> {
    ns_id(std::process::id() as i32, "pid")
}

/// How many pid namespaces below this /proc's one process `pid` is (the NSpid entries): a
/// descendant of a namespace's init at the init's depth is in the init's namespace, and a
/// deeper one in a namespace nested inside it. Read from NSpid, so a zombie answers too.
pub fn depth(pid: i32) -> Result<usize> {
    Ok(procfs::read_status(pid)?.ns_depth())
}

/// `CLONE_NEW*` type of namespace fd `fd` (ioctl NS_GET_NSTYPE).
pub fn ns_type(fd: BorrowedFd<'_>) -> Result<i32> {
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: NS_GET_NSTYPE takes no argument; the fd is borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE) };
    if rc < 0 {
        return Err(RuntimeError::last_os(
            "ioctl(NS_GET_NSTYPE)",
            format!("fd {}", fd.as_raw_fd()),
        ));
    }
    Ok(rc)
}

/// Host PIDs of `root` (a host PID) and its descendants, keyed by the PID each sees itself
/// as (the last NSpid entry); at most `max` are looked at. Read from the kernel's children
/// lists, so nothing the tasks say is trusted. Tasks that vanish meanwhile are left out.
pub fn tree_by_own_pid(root: i32, max: usize) -> Result<BTreeMap<i32, i32>> {
    let own = procfs::read_status(root)?
        .own_pid()
        .ok_or_else(|| missing_nspid(root))?;
    let mut out = BTreeMap::from([(own, root)]);
    let mut todo = vec![root];
    while let Some(h) = todo.pop() {
        for tid in procfs::read_tids(h).unwrap_or_default() {
            let Ok(text) = procfs::read_text(&format!("/proc/{h}/task/{tid}/children")) else {
                continue;
            };
            for child in text
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                let Some(own) = procfs::read_status(child).ok().and_then(|s| s.own_pid()) else {
                    continue;
                };
                if out.len() >= max {
                    return Err(RuntimeError::Protocol {
                        op: "find host PIDs",
                        pid: root,
                        what: format!("the tree has more than {max} processes"),
                    });
                }
                out.insert(own, child);
                todo.push(child);
            }
        }
    }
    Ok(out)
}

/// The host thread id of the thread of process `host_pid` that sees itself as `tid`.
pub fn host_tid(host_pid: i32, tid: i32) -> Result<i32> {
    for t in procfs::read_tids(host_pid)? {
        let path = format!("/proc/{host_pid}/task/{t}/status");
        let Ok(text) = procfs::read_text(&path) else {
            continue;
        };
        if procfs::parse_status(&path, &text)?.own_pid() == Some(tid) {
            return Ok(t);
        }
    }
    Err(RuntimeError::Protocol {
        op: "find host thread id",
        pid: host_pid,
        what: format!("no thread of it is thread {tid} in its pid namespace"),
    })
}

fn missing_nspid(pid: i32) -> RuntimeError {
    RuntimeError::Parse {
        path: format!("/proc/{pid}/status"),
        what: "no NSpid line".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_tree_maps_to_itself_in_our_namespace() {
        let me = std::process::id() as i32;
        let map = tree_by_own_pid(me, 4096).unwrap();
        assert_eq!(map.get(&me), Some(&me));
        assert_eq!(host_tid(me, me).unwrap(), me);
        assert_eq!(depth(me).unwrap(), 0);
        let own = own_pid_ns().unwrap();
        assert_eq!(ns_id(me, "pid").unwrap(), own);
        let f = std::fs::File::open(format!("/proc/{me}/ns/pid")).unwrap();
        use std::os::fd::AsFd;
        assert_eq!(ns_type(f.as_fd()).unwrap(), libc::CLONE_NEWPID);
    }
}

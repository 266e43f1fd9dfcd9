//! Unix sockets as the kernel's sock_diag netlink interface reports them: each socket's
//! inode, type, state, bound name and the inode of its peer. Only this can pair the two ends
//! of a socketpair; /proc shows no peers.

use crate::error::{Result, RuntimeError};
use std::collections::HashMap;

const UDIAG_SHOW_NAME: u32 = 1;
const UDIAG_SHOW_VFS: u32 = 2;
const UDIAG_SHOW_PEER: u32 = 4;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const UNIX_DIAG_SHUTDOWN: u16 = 6;

/// One unix socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixSocket {
    pub ino: u64,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub sock_type: u8,
    /// TCP-like state (TCP_ESTABLISHED = 1, TCP_LISTEN = 10, TCP_CLOSE = 7).
    pub state: u8,
    /// Bound name (empty if unnamed; abstract names start with NUL).
    pub name: Vec<u8>,
    /// Inode of the peer, 0 if none.
    pub peer: u64,
    /// For a listener: connections waiting to be accepted, and its backlog.
    pub rqueue: u32,
    pub wqueue: u32,
    /// For a socket bound to a path: the inode of the socket file bind made (it may since
    /// have been unlinked or replaced).
    pub vfs_ino: Option<u64>,
    /// The device of that socket file, as the kernel numbers it (major << 20 | minor).
    pub vfs_dev: u32,
    /// The directions shut down (sk_shutdown: 1 receive, 2 send).
    pub shutdown: u8,
}

/// The unix sockets of the network namespace process `pid` is in (sock_diag answers for
/// the namespace of the socket that asks, so in another namespace a thread that joined it
/// asks).
pub fn unix_sockets_of(pid: i32) -> Result<HashMap<u64, UnixSocket>> {
    in_netns_of(pid, unix_sockets)
}

/// Runs `f` in the network namespace of process `pid` (here if it is ours, else in a
/// thread that joined it).
pub(crate) fn in_netns_of<T: Send>(pid: i32, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let me = std::process::id() as i32;
    if crate::pidns::ns_id(pid, "net")? == crate::pidns::ns_id(me, "net")? {
        return f();
    }
    let path = format!("/proc/{pid}/ns/net");
    let net = std::fs::File::open(&path).map_err(|e| RuntimeError::sys("open", &path, e))?;
    crate::sys::in_net_namespace(std::os::fd::AsFd::as_fd(&net), f)?
}

/// Every unix socket in this network namespace, by inode.
pub fn unix_sockets() -> Result<HashMap<u64, UnixSocket>> {
    // struct unix_diag_req: family, protocol, pad, states, ino, show, cookie.
    let mut req = Vec::with_capacity(24);
    req.push(libc::AF_UNIX as u8);
    req.push(0);
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
    req.extend_from_slice(&0u32.to_ne_bytes()); // udiag_ino
    req.extend_from_slice(
        &(UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes(),
    );
    req.extend_from_slice(&[0u8; 8]); // cookie
    let mut out = HashMap::new();
    crate::sock_diag::dump(&req, "sock_diag(AF_UNIX)", |msg| {
        if msg.len() < 16 {
            return;
        }
        let mut s = UnixSocket {
            sock_type: msg[1],
            state: msg[2],
            ino: u32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]) as u64,
            ..Default::default()
        };
        let word = |p: &[u8], o: usize| u32::from_ne_bytes([p[o], p[o + 1], p[o + 2], p[o + 3]]);
        crate::sock_diag::attributes(&msg[16..], |atype, payload| match atype {
            UNIX_DIAG_NAME => s.name = payload.to_vec(),
            UNIX_DIAG_VFS if payload.len() >= 8 => {
                s.vfs_ino = Some(word(payload, 0) as u64);
                s.vfs_dev = word(payload, 4);
            }
            UNIX_DIAG_RQLEN if payload.len() >= 8 => {
                s.rqueue = word(payload, 0);
                s.wqueue = word(payload, 4);
            }
            UNIX_DIAG_PEER if payload.len() >= 4 => s.peer = word(payload, 0) as u64,
            UNIX_DIAG_SHUTDOWN if !payload.is_empty() => s.shutdown = payload[0],
            _ => {}
        });
        out.insert(s.ino, s);
    })?;
    Ok(out)
}

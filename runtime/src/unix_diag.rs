//! Unix sockets as the kernel's sock_diag netlink interface reports them: each socket's
//! inode, type, state, bound name and the inode of its peer. Only this can pair the two ends
//! of a socketpair; /proc shows no peers.

use crate::error::{Result, RuntimeError};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const UDIAG_SHOW_NAME: u32 = 1;
const UDIAG_SHOW_VFS: u32 = 2;
const UDIAG_SHOW_PEER: u32 = 4;
const UDIAG_SHOW_RQLEN: u32 = 0x10;
const UNIX_DIAG_RQLEN: u16 = 4;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_VFS: u16 = 1;
const UNIX_DIAG_PEER: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;

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
}

fn err(what: String) -> RuntimeError {
    RuntimeError::Protocol {
        op: "sock_diag(AF_UNIX)",
        pid: 0,
        what,
    }
}

/// The unix sockets of the network namespace process `pid` is in (sock_diag answers for
/// the namespace of the socket that asks, so in another namespace a thread that joined it
/// asks).
pub fn unix_sockets_of(pid: i32) -> Result<HashMap<u64, UnixSocket>> {
    let me = std::process::id() as i32;
    if crate::pidns::ns_id(pid, "net")? == crate::pidns::ns_id(me, "net")? {
        return unix_sockets();
    }
    let path = format!("/proc/{pid}/ns/net");
    let net = std::fs::File::open(&path).map_err(|e| RuntimeError::sys("open", &path, e))?;
    crate::sys::in_net_namespace(std::os::fd::AsFd::as_fd(&net), unix_sockets)?
}

/// Every unix socket in this network namespace, by inode.
pub fn unix_sockets() -> Result<HashMap<u64, UnixSocket>> {
    // SAFETY: socket() takes no pointers; the result is a new fd we own.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(RuntimeError::last_os(
            "socket(NETLINK_SOCK_DIAG)",
            "unix sockets",
        ));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16) + unix_diag_req (24).
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.push(libc::AF_UNIX as u8); // sdiag_family
    req.push(0); // sdiag_protocol
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
    req.extend_from_slice(&0u32.to_ne_bytes()); // udiag_ino
    req.extend_from_slice(
        &(UDIAG_SHOW_NAME | UDIAG_SHOW_VFS | UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN).to_ne_bytes(),
    );
    req.extend_from_slice(&[0u8; 8]); // cookie
                                      // SAFETY: sends a local buffer on our socket (the kernel is the default destination).
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(RuntimeError::last_os("send(sock_diag)", "unix sockets"));
    }
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receives into a local buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(RuntimeError::last_os("recv(sock_diag)", "unix sockets"));
        }
        let data = &buf[..n as usize];
        let mut at = 0usize;
        while at + 16 <= data.len() {
            let u32_at =
                |o: usize| u32::from_ne_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
            let len = u32_at(at) as usize;
            let kind = u16::from_ne_bytes([data[at + 4], data[at + 5]]);
            if len < 16 || at + len > data.len() {
                return Err(err(format!(
                    "a message of {len} bytes at {at} is malformed"
                )));
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => return Err(err("the kernel answered with an error".into())),
                _ => {}
            }
            let msg = &data[at + 16..at + len];
            if msg.len() >= 16 {
                let mut s = UnixSocket {
                    sock_type: msg[1],
                    state: msg[2],
                    ino: u32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]) as u64,
                    ..Default::default()
                };
                let mut a = 16usize;
                while a + 4 <= msg.len() {
                    let alen = u16::from_ne_bytes([msg[a], msg[a + 1]]) as usize;
                    let atype = u16::from_ne_bytes([msg[a + 2], msg[a + 3]]);
                    if alen < 4 || a + alen > msg.len() {
                        break;
                    }
                    let payload = &msg[a + 4..a + alen];
                    match atype {
                        UNIX_DIAG_NAME => s.name = payload.to_vec(),
                        UNIX_DIAG_VFS if payload.len() >= 4 => {
                            s.vfs_ino = Some(u32::from_ne_bytes([
                                payload[0], payload[1], payload[2], payload[3],
                            ]) as u64)
                        }
                        UNIX_DIAG_RQLEN if payload.len() >= 8 => {
                            s.rqueue = u32::from_ne_bytes([
                                payload[0], payload[1], payload[2], payload[3],
                            ]);
                            s.wqueue = u32::from_ne_bytes([
                                payload[4], payload[5], payload[6], payload[7],
                            ]);
                        }
                        UNIX_DIAG_PEER if payload.len() >= 4 => {
                            s.peer =
                                u32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]])
                                    as u64
                        }
                        _ => {}
                    }
                    a += (alen + 3) & !3;
                }
                out.insert(s.ino, s);
            }
            at += (len + 3) & !3;
        }
    }
}

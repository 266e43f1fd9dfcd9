//! The kernel's sock_diag netlink interface: one dump of the sockets of a family (and
//! protocol) in the caller's network namespace, message by message. [`crate::unix_diag`]
//! reads unix sockets with it; here, what only inet_diag tells of TCP and UDP sockets.

use crate::error::{Result, RuntimeError};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
/// INET_DIAG_SHUTDOWN: a u8 attribute, sk_shutdown.
const INET_DIAG_SHUTDOWN: u16 = 8;
/// Size of struct inet_diag_msg, before its attributes.
const INET_DIAG_MSG: usize = 72;

fn err(op: &'static str, what: String) -> RuntimeError {
    RuntimeError::Protocol { op, pid: 0, what }
}

/// Sends SOCK_DIAG_BY_FAMILY dump request `req` (the request after its netlink header) and
/// calls `each` with every answer (after its netlink header).
pub(crate) fn dump(req: &[u8], op: &'static str, mut each: impl FnMut(&[u8])) -> Result<()> {
    // SAFETY: socket() takes no pointers; the result is a new fd we own.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(RuntimeError::last_os("socket(NETLINK_SOCK_DIAG)", op));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut msg = Vec::with_capacity(16 + req.len());
    msg.extend_from_slice(&((16 + req.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(req);
    // SAFETY: sends a local buffer on our socket (the kernel is the default destination).
    if unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(RuntimeError::last_os("send(sock_diag)", op));
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receives into a local buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(RuntimeError::last_os("recv(sock_diag)", op));
        }
        let data = &buf[..n as usize];
        let mut at = 0usize;
        while at + 16 <= data.len() {
            let len =
                u32::from_ne_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
            let kind = u16::from_ne_bytes([data[at + 4], data[at + 5]]);
            if len < 16 || at + len > data.len() {
                return Err(err(
                    op,
                    format!("a message of {len} bytes at {at} is malformed"),
                ));
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => return Err(err(op, "the kernel answered with an error".into())),
                _ => each(&data[at + 16..at + len]),
            }
            at += (len + 3) & !3;
        }
    }
}

/// Calls `each(type, payload)` for the netlink attributes in `attrs`.
pub(crate) fn attributes(attrs: &[u8], mut each: impl FnMut(u16, &[u8])) {
    let mut a = 0usize;
    while a + 4 <= attrs.len() {
        let alen = u16::from_ne_bytes([attrs[a], attrs[a + 1]]) as usize;
        let atype = u16::from_ne_bytes([attrs[a + 2], attrs[a + 3]]);
        if alen < 4 || a + alen > attrs.len() {
            break;
        }
        each(atype, &attrs[a + 4..a + alen]);
        a += (alen + 3) & !3;
    }
}

/// The directions shut down (sk_shutdown: 1 receive, 2 send) of every socket of `family`
/// (AF_INET, AF_INET6) and `protocol` (IPPROTO_TCP, IPPROTO_UDP) in the network namespace
/// of process `pid`, by inode; sockets with none shut down are left out.
pub fn inet_shutdowns(pid: i32, family: i32, protocol: i32) -> Result<HashMap<u64, u8>> {
    crate::unix_diag::in_netns_of(pid, || {
        // struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed
        // inet_diag_sockid (48 bytes).
        let mut req = vec![family as u8, protocol as u8, 0, 0];
        req.extend_from_slice(&u32::MAX.to_ne_bytes());
        req.extend_from_slice(&[0u8; 48]);
        let mut out = HashMap::new();
        dump(&req, "sock_diag(inet)", |msg| {
            if msg.len() < INET_DIAG_MSG {
                return;
            }
            let ino = u32::from_ne_bytes([msg[68], msg[69], msg[70], msg[71]]) as u64;
            attributes(&msg[INET_DIAG_MSG..], |t, p| {
                if t == INET_DIAG_SHUTDOWN && !p.is_empty() && p[0] != 0 {
                    out.insert(ino, p[0]);
                }
            });
        })?;
        Ok(out)
    })
}

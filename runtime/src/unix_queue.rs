//! What is queued on a unix socket: read without consuming it (MSG_PEEK), with the files in
//! flight (SCM_RIGHTS) its messages carry, and queued again (sendmsg) on restore.

use crate::error::{Result, RuntimeError};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const SO_PEEK_OFF: i32 = 42;
/// SCM_PIDFD (Linux 6.5): a pidfd of the sender, with SO_PASSPIDFD.
const SCM_PIDFD: i32 = 4;
/// SCM_MAX_FD: the most fds one message can carry.
pub const MAX_FDS_PER_MESSAGE: usize = 253;
/// Room for the control data of one message (SCM_MAX_FD fds and more), in u64s for alignment.
const CONTROL_WORDS: usize = 256;
/// The most messages one queue may hold.
const MAX_MESSAGES: usize = 1 << 16;

/// One message queued on a unix socket. A stream socket's queue is given as segments: each
/// segment with files attached is its own message, and the bytes between them one each.
#[derive(Debug)]
pub struct Queued {
    pub data: Vec<u8>,
    /// Copies (in this process, close-on-exec) of the files in flight attached to it, in the
    /// order the reader would receive them.
    pub fds: Vec<OwnedFd>,
}

fn refused(what: &str, carries: &str) -> RuntimeError {
    RuntimeError::Unsupported(format!(
        "{what}: a queued message carries {carries}, which is not supported"
    ))
}

fn set_peek_off(raw: RawFd, off: libc::c_int, what: &str) -> Result<()> {
    // SAFETY: sets an int option from a local.
    let rc = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            SO_PEEK_OFF,
            (&off as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(RuntimeError::last_os("setsockopt(SO_PEEK_OFF)", what));
    }
    Ok(())
}

/// The outcome of one recvmsg(MSG_PEEK): bytes read (or the errno), the fds it carried (ours
/// now, closed when dropped) and msg_flags.
struct Peek {
    n: std::result::Result<usize, i32>,
    fds: Vec<OwnedFd>,
    flags: i32,
}

/// One recvmsg(MSG_PEEK | MSG_DONTWAIT) into `iov`. Control data other than fds is refused,
/// after the fds that came with it are taken (so none leaks into this process).
fn peek_into(raw: RawFd, iov: &mut [libc::iovec], what: &str) -> Result<Peek> {
    let mut control = [0u64; CONTROL_WORDS];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = iov.len();
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let flags = libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    // SAFETY: msg points to live iovecs and a live control buffer of the given sizes.
    let n = unsafe { libc::recvmsg(raw, &mut msg, flags) };
    if n < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        return Ok(Peek {
            n: Err(errno),
            fds: Vec::new(),
            flags: 0,
        });
    }
    let mut fds = Vec::new();
    let mut other = None;
    // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR stays within its control buffer.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: c points to a whole cmsghdr inside the (u64-aligned) control buffer, as
        // CMSG_FIRSTHDR/CMSG_NXTHDR guarantee.
        let (level, kind, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len) };
        // SAFETY: CMSG_LEN only computes a size.
        let header = unsafe { libc::CMSG_LEN(0) } as usize;
        let payload = len.saturating_sub(header);
        if level == libc::SOL_SOCKET && (kind == libc::SCM_RIGHTS || kind == SCM_PIDFD) {
            // SAFETY: CMSG_DATA points into this cmsghdr's payload.
            let data = unsafe { libc::CMSG_DATA(c) };
            for k in 0..payload / 4 {
                // SAFETY: reads the k-th int of the payload, which lies within cmsg_len.
                let fd = unsafe { std::ptr::read_unaligned(data.add(k * 4).cast::<i32>()) };
                // SAFETY: the kernel installed this fd in our table for us; nobody else
                // owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if kind == SCM_PIDFD {
                other = Some(
                    "a pidfd of its sender (SCM_PIDFD: the socket has SO_PASSPIDFD set)".into(),
                );
            }
        } else if level == libc::SOL_SOCKET && kind == libc::SCM_CREDENTIALS {
            other = Some(
                "its sender's credentials (SCM_CREDENTIALS: the socket has SO_PASSCRED set)"
                    .to_string(),
            );
        } else {
            other = Some(format!("control data of level {level} type {kind}"));
        }
        // SAFETY: as for CMSG_FIRSTHDR; NXTHDR returns null past the end.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    if let Some(o) = other {
        return Err(refused(what, &o));
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(refused(what, "more control data than fits (truncated)"));
    }
    Ok(Peek {
        n: Ok(n as usize),
        fds,
        flags: msg.msg_flags,
    })
}

/// An inaccessible (PROT_NONE) mapping, unmapped when dropped.
struct Guard(*mut libc::c_void, usize);

impl Guard {
    fn new(len: usize, what: &str) -> Result<Guard> {
        // SAFETY: a new anonymous mapping where the kernel chooses; no memory is touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(RuntimeError::last_os("mmap(PROT_NONE)", what));
        }
        Ok(Guard(addr, len))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in Guard::new, which nothing references.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

/// Where, in the `len` bytes a stream peek at the current peek offset returned, the segment
/// carrying fds starts. A peek glues the fd-less segments before it to it (and reports its
/// fds whatever the length asked for), but copies segment by segment: given room for all but
/// the last byte, followed by an inaccessible page, it copies the whole segments before the
/// one with fds and stops with EFAULT inside that one.
fn fd_segment_start(raw: RawFd, len: usize, what: &str) -> Result<usize> {
    let guard = Guard::new(len, what)?;
    let mut head = vec![0u8; len - 1];
    let mut iov = [
        libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: guard.0,
            iov_len: guard.1,
        },
    ];
    let p = peek_into(raw, &mut iov, what)?;
    match p.n {
        Err(libc::EFAULT) => Ok(0),
        Ok(n) if n < len && p.fds.is_empty() => Ok(n),
        Ok(n) => Err(RuntimeError::Protocol {
            op: "recvmsg(MSG_PEEK)",
            pid: 0,
            what: format!("{what}: finding where {len} bytes with fds start, {n} were read"),
        }),
        Err(e) => Err(RuntimeError::sys(
            "recvmsg(MSG_PEEK)",
            what,
            std::io::Error::from_raw_os_error(e),
        )),
    }
}

/// Appends `data` (no fds) to the queue, joined to the segment before it if that has none:
/// a stream reader cannot tell them apart.
fn push_plain(out: &mut Vec<Queued>, data: &[u8]) {
    match out.last_mut() {
        Some(last) if last.fds.is_empty() => last.data.extend_from_slice(data),
        _ => out.push(Queued {
            data: data.to_vec(),
            fds: Vec::new(),
        }),
    }
}

/// The messages queued for reading on unix socket `fd` (a copy of the process's fd), oldest
/// first, without consuming them (SO_PEEK_OFF): datagrams one by one, stream data as
/// segments (see [`Queued`]). The files in flight come as copies in this process.
/// Credentials (SCM_CREDENTIALS) and other control data are refused.
pub fn peek_queue(fd: &OwnedFd, stream: bool, what: &str) -> Result<Vec<Queued>> {
    let raw = fd.as_raw_fd();
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCINQ (FIONREAD) writes one c_int to a local.
    if unsafe { libc::ioctl(raw, libc::FIONREAD, &mut queued) } < 0 {
        return Err(RuntimeError::last_os("ioctl(SIOCINQ)", what));
    }
    // The process's own peek offset (-1: none) is set back afterwards.
    let was = crate::inet::get_int(raw, libc::SOL_SOCKET, SO_PEEK_OFF).unwrap_or(-1);
    let out = peek_head(raw, stream, what).and_then(|head| {
        set_peek_off(raw, 0, what)?;
        let rest = peek_all(raw, stream, queued.max(0) as usize, what)?;
        Ok(head.into_iter().chain(rest).collect())
    });
    let reset = set_peek_off(raw, was, what);
    let out = out?;
    reset?;
    Ok(out)
}

/// The first datagram if it is empty, read without a peek offset. Peeking at an offset
/// skips an empty datagram once it has been peeked (by the process, or by this very
/// call: the kernel marks it), so one at the head would be lost with the files it carries
/// and every later message would seem to carry the files of the one before. None for a
/// stream, an empty queue, or a head with bytes (the walk at offset 0 finds that one).
fn peek_head(raw: RawFd, stream: bool, what: &str) -> Result<Option<Queued>> {
    if stream {
        return Ok(None);
    }
    set_peek_off(raw, -1, what)?;
    let mut byte = [0u8; 1];
    let mut iov = [libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: byte.len(),
    }];
    let p = peek_into(raw, &mut iov, what)?;
    Ok(match p.n {
        Ok(0) if p.flags & libc::MSG_TRUNC == 0 => Some(Queued {
            data: Vec::new(),
            fds: p.fds,
        }),
        _ => None,
    })
}

fn peek_all(raw: RawFd, stream: bool, queued: usize, what: &str) -> Result<Vec<Queued>> {
    let mut out: Vec<Queued> = Vec::new();
    let mut total = 0usize;
    let cap = queued.max(64 * 1024);
    loop {
        let mut buf = vec![0u8; cap];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let p = peek_into(raw, &mut iov, what)?;
        let n = match p.n {
            Ok(n) => n,
            Err(libc::EAGAIN) => break,
            Err(e) => {
                return Err(RuntimeError::sys(
                    "recvmsg(MSG_PEEK)",
                    what,
                    std::io::Error::from_raw_os_error(e),
                ))
            }
        };
        if p.flags & libc::MSG_TRUNC != 0 {
            return Err(RuntimeError::Protocol {
                op: "recvmsg(MSG_PEEK)",
                pid: 0,
                what: format!("{what}: a queued message is larger than {cap} bytes"),
            });
        }
        if n == 0 && stream {
            break;
        }
        buf.truncate(n);
        if !stream {
            out.push(Queued {
                data: buf,
                fds: p.fds,
            });
        } else if p.fds.is_empty() {
            push_plain(&mut out, &buf);
        } else {
            let off = libc::c_int::try_from(total).map_err(|_| RuntimeError::Protocol {
                op: "recvmsg(MSG_PEEK)",
                pid: 0,
                what: format!("{what}: more than 2 GiB queued"),
            })?;
            set_peek_off(raw, off, what)?;
            let start = fd_segment_start(raw, n, what)?;
            set_peek_off(raw, off.saturating_add(n as libc::c_int), what)?;
            if start > 0 {
                push_plain(&mut out, &buf[..start]);
            }
            out.push(Queued {
                data: buf[start..].to_vec(),
                fds: p.fds,
            });
        }
        total += n;
        if stream && total >= queued {
            break;
        }
        if out.len() > MAX_MESSAGES {
            return Err(RuntimeError::Protocol {
                op: "recvmsg(MSG_PEEK)",
                pid: 0,
                what: format!("{what}: more than {MAX_MESSAGES} queued messages"),
            });
        }
    }
    Ok(out)
}

/// Queues `data` as one message on unix socket `sock`, for its peer to read, with `fds`
/// attached (SCM_RIGHTS) if there are any. Never blocks: a full socket is an error.
pub fn send_message(sock: RawFd, data: &[u8], fds: &[RawFd], what: &str) -> Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(RuntimeError::Unsupported(format!(
            "{what}: {} files attached to one message; at most {MAX_FDS_PER_MESSAGE} are possible",
            fds.len()
        )));
    }
    let mut control = [0u64; CONTROL_WORDS];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds) as u32;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size; at most 253 fds fit in `control`.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes) } as usize;
        // SAFETY: the control buffer is large enough for one header and `bytes` of data
        // (checked above), so CMSG_FIRSTHDR is not null and CMSG_DATA lies within it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(c),
                bytes as usize,
            );
        }
    }
    // SAFETY: msg points to a live buffer and control data of the given sizes.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(RuntimeError::last_os("sendmsg", what));
    }
    if n as usize != data.len() {
        return Err(RuntimeError::Protocol {
            op: "sendmsg",
            pid: 0,
            what: format!("{what}: queued {n} of {} bytes", data.len()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(ty: i32) -> (OwnedFd, OwnedFd) {
        let mut sv = [0i32; 2];
        // SAFETY: sv is a valid array of two c_ints for socketpair to fill.
        let rc =
            unsafe { libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) }
    }

    fn inq(fd: &OwnedFd) -> i32 {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int to a local.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
        assert_eq!(rc, 0);
        n
    }

    #[test]
    fn stream_segments_with_fds_keep_their_boundaries() {
        let (a, b) = pair(libc::SOCK_STREAM);
        let (x, _y) = pair(libc::SOCK_DGRAM);
        let s = a.as_raw_fd();
        send_message(s, b"aaa", &[], "t").unwrap();
        send_message(s, b"AAAA", &[], "t").unwrap();
        send_message(s, b"bbbbb", &[x.as_raw_fd()], "t").unwrap();
        send_message(s, b"cc", &[x.as_raw_fd(), x.as_raw_fd()], "t").unwrap();
        send_message(s, b"ddd", &[], "t").unwrap();
        let before = inq(&b);
        let q = peek_queue(&b, true, "t").unwrap();
        let shape: Vec<(&[u8], usize)> = q.iter().map(|m| (&m.data[..], m.fds.len())).collect();
        assert_eq!(
            shape,
            [
                (&b"aaaAAAA"[..], 0),
                (&b"bbbbb"[..], 1),
                (&b"cc"[..], 2),
                (&b"ddd"[..], 0)
            ]
        );
        assert_eq!(inq(&b), before, "peeking must consume nothing");
        // The reader still gets the fds with the first byte of their segment.
        let mut buf = [0u8; 7];
        // SAFETY: reads into a local buffer.
        let n = unsafe { libc::recv(b.as_raw_fd(), buf.as_mut_ptr().cast(), 7, 0) };
        assert_eq!(n, 7);
    }

    #[test]
    fn an_empty_datagram_already_peeked_is_not_lost() {
        let (a, b) = pair(libc::SOCK_DGRAM);
        let (x, _y) = pair(libc::SOCK_DGRAM);
        let (z, _w) = pair(libc::SOCK_DGRAM);
        send_message(a.as_raw_fd(), b"", &[x.as_raw_fd()], "t").unwrap();
        send_message(a.as_raw_fd(), b"two", &[z.as_raw_fd()], "t").unwrap();
        for _ in 0..2 {
            // The process (or an earlier checkpoint) peeks first.
            let q = peek_queue(&b, false, "t").unwrap();
            let shape: Vec<(&[u8], usize)> = q.iter().map(|m| (&m.data[..], m.fds.len())).collect();
            assert_eq!(shape, [(&b""[..], 1), (&b"two"[..], 1)]);
        }
    }

    #[test]
    fn datagrams_come_one_by_one_with_their_fds() {
        let (a, b) = pair(libc::SOCK_SEQPACKET);
        let (x, _y) = pair(libc::SOCK_DGRAM);
        send_message(a.as_raw_fd(), b"one", &[], "t").unwrap();
        send_message(a.as_raw_fd(), b"two", &[x.as_raw_fd()], "t").unwrap();
        let q = peek_queue(&b, false, "t").unwrap();
        let shape: Vec<(&[u8], usize)> = q.iter().map(|m| (&m.data[..], m.fds.len())).collect();
        assert_eq!(shape, [(&b"one"[..], 0), (&b"two"[..], 1)]);
    }
}

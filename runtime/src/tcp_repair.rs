//! Established TCP connections through TCP_REPAIR (linux/tcp.h): read out of a live socket
//! (sequence numbers, both queues, negotiated options, window, timestamp clock) and built
//! again in a new socket that the peer cannot tell from the old one.
//!
//! A socket in repair mode sends nothing of its own, and closing it sends neither FIN nor RST.
//! Its packets must still be kept off the wire while it is read and rebuilt: see
//! [`crate::netlock`].

use crate::error::{Result, RuntimeError};
use crate::inet::{get_int, options_of, set_option, sockaddr_of, to_sockaddr};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_REPAIR_ON: i32 = 1;
const TCP_REPAIR_OFF: i32 = 0;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
/// TCP_ESTABLISHED in tcp_states.h.
pub const STATE_ESTABLISHED: u8 = 1;

/// struct tcp_repair_window.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

/// struct tcp_repair_opt.
#[repr(C)]
struct RepairOpt {
    code: u32,
    val: u32,
}

/// Everything TCP_REPAIR tells of an established connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Connection {
    pub local: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    /// write_seq and rcv_nxt: the sequence numbers after the last byte of each queue.
    pub send_seq: u32,
    pub recv_seq: u32,
    /// Not yet acknowledged, oldest first; its last `unsent` bytes were never sent.
    pub send_queue: Vec<u8>,
    pub unsent: u32,
    /// Received, not read by the process yet.
    pub recv_queue: Vec<u8>,
    pub mss: u32,
    /// (snd_wscale, rcv_wscale) if window scaling was negotiated.
    pub wscale: Option<(u32, u32)>,
    pub sack: bool,
    pub timestamps: bool,
    pub timestamp: u32,
    pub window: Window,
    pub sndbuf: u32,
    pub rcvbuf: u32,
    /// (level, option, value) of the other options restored with it.
    pub options: Vec<(i32, i32, i32)>,
}

fn tcp_set(fd: RawFd, name: i32, v: i32, op: &'static str, what: &str) -> Result<()> {
    set_option(fd, libc::IPPROTO_TCP, name, v).map_err(|e| RuntimeError::sys(op, what, e))
}

/// Enters (TCP_REPAIR_ON) or leaves (TCP_REPAIR_OFF) repair mode.
fn set_repair(fd: RawFd, mode: i32, what: &str) -> Result<()> {
    tcp_set(fd, TCP_REPAIR, mode, "setsockopt(TCP_REPAIR)", what)
}

fn tcp_get(fd: RawFd, name: i32, op: &'static str, what: &str) -> Result<i32> {
    get_int(fd, libc::IPPROTO_TCP, name).ok_or_else(|| RuntimeError::last_os(op, what))
}

/// The TCP state (tcp_states.h) and options byte and window scales of TCP_INFO.
fn tcp_info(fd: RawFd, what: &str) -> Result<(u8, u8, u8)> {
    let info = crate::inet::tcp_info(fd, what)?;
    // tcpi_state, ..., tcpi_options at 5, tcpi_snd_wscale:4 | tcpi_rcv_wscale:4 at 6.
    Ok((info[0], info[5], info[6]))
}

/// The TCP state of `fd` (tcp_states.h numbering), None if it is no TCP socket.
pub fn state(fd: &OwnedFd) -> Option<u8> {
    let raw = fd.as_raw_fd();
    if get_int(raw, libc::SOL_SOCKET, libc::SO_PROTOCOL) != Some(libc::IPPROTO_TCP) {
        return None;
    }
    tcp_info(raw, "").ok().map(|(s, _, _)| s)
}

/// The name of a TCP state, for messages.
pub fn state_name(s: u8) -> &'static str {
    match s {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        _ => "unknown",
    }
}

/// Local and peer address of a connected socket.
pub fn endpoints(fd: &OwnedFd) -> Option<(SocketAddr, SocketAddr)> {
    let raw = fd.as_raw_fd();
    Some((sockaddr_of(raw, false)?, sockaddr_of(raw, true)?))
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong, op: &'static str, what: &str) -> Result<usize> {
    let mut v: libc::c_int = 0;
    // SAFETY: the ioctl writes one c_int to a local.
    if unsafe { libc::ioctl(fd, req, &mut v) } < 0 {
        return Err(RuntimeError::last_os(op, what));
    }
    Ok(v.max(0) as usize)
}

/// Peeks `len` bytes of the queue selected by TCP_REPAIR_QUEUE.
fn peek_queue(fd: RawFd, queue: i32, len: usize, what: &str) -> Result<(u32, Vec<u8>)> {
    tcp_set(
        fd,
        TCP_REPAIR_QUEUE,
        queue,
        "setsockopt(TCP_REPAIR_QUEUE)",
        what,
    )?;
    let seq = tcp_get(fd, TCP_QUEUE_SEQ, "getsockopt(TCP_QUEUE_SEQ)", what)? as u32;
    let mut buf = vec![0u8; len];
    if len > 0 {
        // SAFETY: recv writes at most len bytes into buf.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                len,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(RuntimeError::last_os("recv(MSG_PEEK) of a TCP queue", what));
        }
        if n as usize != len {
            return Err(RuntimeError::Unsupported(format!(
                "{what}: peeking the TCP {} queue gave {n} of {len} bytes",
                if queue == TCP_SEND_QUEUE {
                    "send"
                } else {
                    "receive"
                }
            )));
        }
    }
    Ok((seq, buf))
}

/// A live socket put into repair mode. Dropped, it leaves repair mode and the connection
/// goes on as before; [`Repair::close_silently`] closes it in repair mode instead (no FIN,
/// no RST: for after its process was killed).
pub struct Repair {
    fd: Option<OwnedFd>,
    what: String,
}

impl Repair {
    /// Puts the (copy of the) socket `fd` into repair mode. It must be ESTABLISHED.
    pub fn on(fd: OwnedFd, what: &str) -> Result<Repair> {
        let raw = fd.as_raw_fd();
        let (st, _, _) = tcp_info(raw, what)?;
        if st != STATE_ESTABLISHED {
            return Err(RuntimeError::Unsupported(format!(
                "{what}: a TCP connection in state {} (only ESTABLISHED ones can be repaired)",
                state_name(st)
            )));
        }
        set_repair(raw, TCP_REPAIR_ON, what)?;
        Ok(Repair {
            fd: Some(fd),
            what: what.to_string(),
        })
    }

    fn raw(&self) -> RawFd {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// Reads the whole connection.
    pub fn read(&self) -> Result<Connection> {
        let (fd, what) = (self.raw(), self.what.as_str());
        let outq = ioctl_int(fd, libc::TIOCOUTQ, "ioctl(SIOCOUTQ)", what)?;
        let unsent = ioctl_int(fd, SIOCOUTQNSD, "ioctl(SIOCOUTQNSD)", what)?;
        let inq = ioctl_int(fd, libc::FIONREAD, "ioctl(SIOCINQ)", what)?;
        let (recv_seq, recv_queue) = peek_queue(fd, TCP_RECV_QUEUE, inq, what)?;
        let (send_seq, send_queue) = peek_queue(fd, TCP_SEND_QUEUE, outq, what)?;
        let (_, opts, scales) = tcp_info(fd, what)?;
        let mut window = Window::default();
        let mut len = std::mem::size_of::<Window>() as libc::socklen_t;
        // SAFETY: getsockopt fills at most len bytes of a local struct tcp_repair_window.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                TCP_REPAIR_WINDOW,
                (&mut window as *mut Window).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(RuntimeError::last_os("getsockopt(TCP_REPAIR_WINDOW)", what));
        }
        let domain = get_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN);
        let (local, peer) = (sockaddr_of(fd, false), sockaddr_of(fd, true));
        Ok(Connection {
            local,
            peer,
            send_seq,
            recv_seq,
            send_queue,
            unsent: unsent.min(outq) as u32,
            recv_queue,
            // In repair mode TCP_MAXSEG reads the MSS clamp, which is what is set again.
            mss: tcp_get(fd, libc::TCP_MAXSEG, "getsockopt(TCP_MAXSEG)", what)? as u32,
            wscale: (opts & TCPI_OPT_WSCALE != 0)
                .then_some(((scales & 0xf) as u32, (scales >> 4) as u32)),
            sack: opts & TCPI_OPT_SACK != 0,
            timestamps: opts & TCPI_OPT_TIMESTAMPS != 0,
            timestamp: tcp_get(fd, TCP_TIMESTAMP, "getsockopt(TCP_TIMESTAMP)", what)? as u32,
            window,
            sndbuf: get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0) as u32,
            rcvbuf: get_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap_or(0) as u32,
            options: options_of(fd, domain),
        })
    }

    /// Closes the socket still in repair mode: nothing is sent, the connection is gone from
    /// this host. Only once its process is dead.
    pub fn close_silently(mut self) {
        drop(self.fd.take());
    }
}

impl Drop for Repair {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            // The connection carries on; the window probe sent now resyncs the peer.
            let _ = set_repair(fd.as_raw_fd(), TCP_REPAIR_OFF, &self.what);
        }
    }
}

fn sockopt_bytes<T>(fd: RawFd, name: i32, v: &[T], op: &'static str, what: &str) -> Result<()> {
    let len = std::mem::size_of_val(v) as libc::socklen_t;
    // SAFETY: v is a live slice of `len` bytes of plain repr(C) values.
    let r = unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, name, v.as_ptr().cast(), len) };
    if r != 0 {
        return Err(RuntimeError::last_os(op, what));
    }
    Ok(())
}

/// Writes `data` into the queue selected by TCP_REPAIR_QUEUE (or, out of repair mode, into
/// the connection), in pieces the socket's memory accounting accepts.
fn send_all(fd: RawFd, data: &[u8], op: &'static str, what: &str) -> Result<()> {
    let mut off = 0;
    while off < data.len() {
        let n = (data.len() - off).min(64 << 10);
        // SAFETY: sends n bytes from a live slice.
        let r = unsafe {
            libc::send(
                fd,
                data[off..].as_ptr().cast(),
                n,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r <= 0 {
            return Err(RuntimeError::last_os(op, what));
        }
        off += r as usize;
    }
    Ok(())
}

/// A new socket carrying connection `c`, left in repair mode: finish it with [`finish`] once
/// nothing else is to be set up. Its FIN, RST or data cannot escape before.
pub fn rebuild(c: &Connection, what: &str) -> Result<OwnedFd> {
    let (Some(local), Some(peer)) = (c.local, c.peer) else {
        return Err(RuntimeError::Unsupported(format!(
            "{what}: the connection has no addresses"
        )));
    };
    let family = if local.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket takes no pointers.
    let raw = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(RuntimeError::last_os("socket(SOCK_STREAM)", what));
    }
    // SAFETY: raw was just returned by socket and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_repair(raw, TCP_REPAIR_ON, what)?;
    // Buffers first: the queues must fit.
    for (name, v) in [(libc::SO_SNDBUF, c.sndbuf), (libc::SO_RCVBUF, c.rcvbuf)] {
        if v > 0 {
            set_option(raw, libc::SOL_SOCKET, name, (v / 2) as i32)
                .map_err(|e| RuntimeError::sys("setsockopt(SO_SNDBUF/SO_RCVBUF)", what, e))?;
        }
    }
    // IPV6_V6ONLY is refused after bind; SO_REUSEADDR would undo the port sharing repair
    // mode allows bind: the IPv6 options go first, the others last.
    let (before, after): (Vec<_>, Vec<_>) =
        c.options.iter().partition(|o| o.0 == libc::IPPROTO_IPV6);
    let set_options = |opts: Vec<&(i32, i32, i32)>| -> Result<()> {
        for &&(level, name, value) in &opts {
            set_option(raw, level, name, value).map_err(|e| {
                RuntimeError::sys("setsockopt", format!("{what} ({level}, {name})"), e)
            })?;
        }
        Ok(())
    };
    set_options(before)?;
    let send_start = c.send_seq.wrapping_sub(c.send_queue.len() as u32);
    let recv_start = c.recv_seq.wrapping_sub(c.recv_queue.len() as u32);
    for (queue, seq) in [(TCP_SEND_QUEUE, send_start), (TCP_RECV_QUEUE, recv_start)] {
        tcp_set(
            raw,
            TCP_REPAIR_QUEUE,
            queue,
            "setsockopt(TCP_REPAIR_QUEUE)",
            what,
        )?;
        tcp_set(
            raw,
            TCP_QUEUE_SEQ,
            seq as i32,
            "setsockopt(TCP_QUEUE_SEQ)",
            what,
        )?;
    }
    let (ss, len) = to_sockaddr(local);
    // SAFETY: ss holds a valid address of `len` bytes. Repair mode lets the port be shared
    // with the listener it was accepted from.
    if unsafe { libc::bind(raw, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(RuntimeError::last_os("bind", format!("{what}: {local}")));
    }
    let (ss, len) = to_sockaddr(peer);
    // SAFETY: as above. In repair mode connect sends no SYN: the socket is ESTABLISHED.
    if unsafe { libc::connect(raw, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        let err = std::io::Error::last_os_error();
        let why = if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) {
            " (is the original connection still open on this host?)"
        } else {
            ""
        };
        return Err(RuntimeError::Unsupported(format!(
            "{what}: connect {local} -> {peer} in repair mode: {err}{why}"
        )));
    }
    let mut opts = vec![RepairOpt {
        code: TCPOPT_MAXSEG,
        val: c.mss,
    }];
    if let Some((snd, rcv)) = c.wscale {
        opts.push(RepairOpt {
            code: TCPOPT_WINDOW,
            val: snd | (rcv << 16),
        });
    }
    if c.sack {
        opts.push(RepairOpt {
            code: TCPOPT_SACK_PERM,
            val: 0,
        });
    }
    if c.timestamps {
        opts.push(RepairOpt {
            code: TCPOPT_TIMESTAMP,
            val: 0,
        });
    }
    sockopt_bytes(
        raw,
        TCP_REPAIR_OPTIONS,
        &opts,
        "setsockopt(TCP_REPAIR_OPTIONS)",
        what,
    )?;
    if c.timestamps {
        tcp_set(
            raw,
            TCP_TIMESTAMP,
            c.timestamp as i32,
            "setsockopt(TCP_TIMESTAMP)",
            what,
        )?;
    }
    // The receive queue before the window: the window is checked against rcv_nxt.
    tcp_set(
        raw,
        TCP_REPAIR_QUEUE,
        TCP_RECV_QUEUE,
        "setsockopt(TCP_REPAIR_QUEUE)",
        what,
    )?;
    send_all(raw, &c.recv_queue, "refilling the TCP receive queue", what)?;
    let sent = c.send_queue.len() - c.unsent_bytes().len();
    tcp_set(
        raw,
        TCP_REPAIR_QUEUE,
        TCP_SEND_QUEUE,
        "setsockopt(TCP_REPAIR_QUEUE)",
        what,
    )?;
    with_room(raw, sent, what, || {
        send_all(
            raw,
            &c.send_queue[..sent],
            "refilling the TCP send queue",
            what,
        )
    })?;
    sockopt_bytes(
        raw,
        TCP_REPAIR_WINDOW,
        std::slice::from_ref(&c.window),
        "setsockopt(TCP_REPAIR_WINDOW)",
        what,
    )?;
    set_options(after)?;
    Ok(fd)
}

impl Connection {
    /// The bytes of the send queue that were never sent.
    pub fn unsent_bytes(&self) -> &[u8] {
        let sent = self.send_queue.len() - (self.unsent as usize).min(self.send_queue.len());
        &self.send_queue[sent..]
    }
}

/// Takes a rebuilt connection out of repair mode (a window probe tells the peer it is back)
/// and queues `unsent`, the bytes that were never sent.
pub fn finish(fd: RawFd, unsent: &[u8], what: &str) -> Result<()> {
    set_repair(fd, TCP_REPAIR_OFF, what)?;
    with_room(fd, unsent.len(), what, || {
        send_all(fd, unsent, "sending the unsent TCP data", what)
    })
}

/// Runs `fill`, which queues `bytes` more on socket `fd`, with the send buffer raised so they
/// fit whatever the kernel charges per segment, then sets the buffer back: the original's
/// queue fitted its buffer, but a rebuilt queue is cut into segments differently, and
/// nothing can drain while the connection is locked.
fn with_room(fd: RawFd, bytes: usize, what: &str, fill: impl FnOnce() -> Result<()>) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    let op = "setsockopt(SO_SNDBUF)";
    // getsockopt reports twice what was set; setting doubles again.
    let was = get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF)
        .ok_or_else(|| RuntimeError::last_os("getsockopt(SO_SNDBUF)", what))?
        / 2;
    let extra = i32::try_from(bytes.saturating_mul(2)).unwrap_or(i32::MAX / 2);
    set_option(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUF,
        was.saturating_add(extra),
    )
    .map_err(|e| RuntimeError::sys(op, what, e))?;
    let filled = fill();
    set_option(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, was)
        .map_err(|e| RuntimeError::sys(op, what, e))?;
    filled
}

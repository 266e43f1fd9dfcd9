//! The state a socket carries beyond its addresses, in one table for every kind of socket
//! (TCP, UDP, IPv4 and IPv6, unix): its options, its filter, and the directions shut down.
//!
//! Each option of [`TABLE`] is read with getsockopt from the socket and from a new socket of
//! the same domain, type and protocol; only those that differ are saved, and set again on
//! restore. An option the table can read but not give back is refused by name when it
//! differs from the default. Multicast memberships are not readable as options: they are
//! found by asking the socket about each group its network namespace has joined.

use crate::error::{Result, RuntimeError};
use crate::inet::get_int;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// How an option's value is passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An int.
    Int,
    /// Raw bytes: a struct (linger, timeval, IP options), at most this many.
    Bytes(usize),
    /// A name (device, congestion control), at most this many bytes with its NUL.
    Name(usize),
}

/// Which sockets an option applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Any,
    /// IPv4 and IPv6 sockets (IPPROTO_IP options work on both).
    Inet,
    Ipv6,
    /// IPv4 and IPv6 sockets that are not streams: the kernel refuses multicast options
    /// on TCP (an accepted connection reads back the TTL and interface of its SYN there).
    Multicast,
    Multicast6,
    Tcp,
}

/// What is done with an option whose value differs from a new socket's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Set again on restore.
    Restore,
    /// Set again, but only before bind (the kernel refuses it after).
    BeforeBind,
    /// Refused: it cannot be set again as it was.
    Refuse(&'static str),
}

struct Opt {
    level: i32,
    name: i32,
    label: &'static str,
    kind: Kind,
    scope: Scope,
    action: Action,
}

const fn opt(level: i32, name: i32, label: &'static str, scope: Scope) -> Opt {
    Opt {
        level,
        name,
        label,
        kind: Kind::Int,
        scope,
        action: Action::Restore,
    }
}

const SOL: i32 = libc::SOL_SOCKET;
const IP: i32 = libc::IPPROTO_IP;
const IP6: i32 = libc::IPPROTO_IPV6;
const TCP: i32 = libc::IPPROTO_TCP;
/// SO_RCVTIMEO/SO_SNDTIMEO with a struct timeval of two longs (the "old" numbers libc has).
const TIMEVAL: usize = 16;
const SO_GET_FILTER: i32 = libc::SO_ATTACH_FILTER;
const SO_LOCK_FILTER: i32 = 44;
const SO_PEEK_OFF: i32 = 42;
const SO_RCVMARK: i32 = 75;
const SO_PASSPIDFD: i32 = 76;
const IP_BIND_ADDRESS_NO_PORT: i32 = 24;
const IP_MULTICAST_ALL: i32 = 49;
const IP_RECVERR_RFC4884: i32 = 26;
const IPV6_MULTICAST_ALL: i32 = 29;
const IPV6_RECVPATHMTU: i32 = 60;
const IPV6_DONTFRAG: i32 = 62;
const IPV6_AUTOFLOWLABEL: i32 = 70;
const IPV6_ADDR_PREFERENCES: i32 = 72;
const IPV6_TRANSPARENT: i32 = 75;
const IPV6_FREEBIND: i32 = 78;
const TCP_THIN_LINEAR_TIMEOUTS: i32 = 16;
const TCP_THIN_DUPACK: i32 = 17;
const TCP_SAVE_SYN: i32 = 27;
const TCP_FASTOPEN_CONNECT: i32 = 30;
const TCP_ULP: i32 = 31;
const TCP_FASTOPEN_NO_COOKIE: i32 = 34;
const TCP_INQ: i32 = 36;
const TCP_TX_DELAY: i32 = 37;

/// The options that make a socket behave as it does. SO_SNDBUF and SO_RCVBUF are kept as
/// the value to set (half what getsockopt reports); see [`set`].
const TABLE: &[Opt] = &[
    opt(SOL, libc::SO_REUSEADDR, "SO_REUSEADDR", Scope::Any),
    opt(SOL, libc::SO_REUSEPORT, "SO_REUSEPORT", Scope::Any),
    opt(SOL, libc::SO_KEEPALIVE, "SO_KEEPALIVE", Scope::Any),
    opt(SOL, libc::SO_BROADCAST, "SO_BROADCAST", Scope::Any),
    opt(SOL, libc::SO_DONTROUTE, "SO_DONTROUTE", Scope::Any),
    opt(SOL, libc::SO_OOBINLINE, "SO_OOBINLINE", Scope::Any),
    Opt {
        kind: Kind::Bytes(8),
        ..opt(SOL, libc::SO_LINGER, "SO_LINGER", Scope::Any)
    },
    opt(SOL, libc::SO_SNDBUF, "SO_SNDBUF", Scope::Any),
    opt(SOL, libc::SO_RCVBUF, "SO_RCVBUF", Scope::Any),
    opt(SOL, libc::SO_RCVLOWAT, "SO_RCVLOWAT", Scope::Any),
    Opt {
        kind: Kind::Bytes(TIMEVAL),
        ..opt(SOL, libc::SO_SNDTIMEO, "SO_SNDTIMEO", Scope::Any)
    },
    Opt {
        kind: Kind::Bytes(TIMEVAL),
        ..opt(SOL, libc::SO_RCVTIMEO, "SO_RCVTIMEO", Scope::Any)
    },
    opt(SOL, libc::SO_MARK, "SO_MARK", Scope::Any),
    opt(SOL, libc::SO_PASSCRED, "SO_PASSCRED", Scope::Any),
    opt(SOL, libc::SO_PASSSEC, "SO_PASSSEC", Scope::Any),
    opt(SOL, SO_PASSPIDFD, "SO_PASSPIDFD", Scope::Any),
    opt(SOL, libc::SO_TIMESTAMP, "SO_TIMESTAMP", Scope::Any),
    opt(SOL, libc::SO_TIMESTAMPNS, "SO_TIMESTAMPNS", Scope::Any),
    opt(SOL, libc::SO_TIMESTAMPING, "SO_TIMESTAMPING", Scope::Any),
    opt(SOL, libc::SO_RXQ_OVFL, "SO_RXQ_OVFL", Scope::Any),
    opt(SOL, libc::SO_NO_CHECK, "SO_NO_CHECK", Scope::Any),
    opt(SOL, SO_PEEK_OFF, "SO_PEEK_OFF", Scope::Any),
    opt(SOL, SO_RCVMARK, "SO_RCVMARK", Scope::Any),
    opt(SOL, libc::SO_BUSY_POLL, "SO_BUSY_POLL", Scope::Any),
    opt(
        SOL,
        libc::SO_SELECT_ERR_QUEUE,
        "SO_SELECT_ERR_QUEUE",
        Scope::Any,
    ),
    opt(SOL, libc::SO_ZEROCOPY, "SO_ZEROCOPY", Scope::Any),
    opt(
        SOL,
        libc::SO_MAX_PACING_RATE,
        "SO_MAX_PACING_RATE",
        Scope::Any,
    ),
    Opt {
        kind: Kind::Name(libc::IFNAMSIZ),
        ..opt(SOL, libc::SO_BINDTODEVICE, "SO_BINDTODEVICE", Scope::Any)
    },
    opt(IP, libc::IP_TOS, "IP_TOS", Scope::Inet),
    opt(IP, libc::IP_TTL, "IP_TTL", Scope::Inet),
    opt(
        IP,
        libc::IP_MULTICAST_TTL,
        "IP_MULTICAST_TTL",
        Scope::Multicast,
    ),
    opt(
        IP,
        libc::IP_MULTICAST_LOOP,
        "IP_MULTICAST_LOOP",
        Scope::Multicast,
    ),
    // The interface's address (4 bytes); one chosen by index only reads back as 0.
    opt(
        IP,
        libc::IP_MULTICAST_IF,
        "IP_MULTICAST_IF",
        Scope::Multicast,
    ),
    opt(IP, IP_MULTICAST_ALL, "IP_MULTICAST_ALL", Scope::Multicast),
    opt(IP, libc::IP_RECVERR, "IP_RECVERR", Scope::Inet),
    opt(IP, IP_RECVERR_RFC4884, "IP_RECVERR_RFC4884", Scope::Inet),
    opt(IP, libc::IP_PKTINFO, "IP_PKTINFO", Scope::Inet),
    opt(IP, libc::IP_RECVTOS, "IP_RECVTOS", Scope::Inet),
    opt(IP, libc::IP_RECVTTL, "IP_RECVTTL", Scope::Inet),
    opt(IP, libc::IP_RECVOPTS, "IP_RECVOPTS", Scope::Inet),
    opt(IP, libc::IP_RETOPTS, "IP_RETOPTS", Scope::Inet),
    opt(
        IP,
        libc::IP_RECVORIGDSTADDR,
        "IP_RECVORIGDSTADDR",
        Scope::Inet,
    ),
    opt(IP, libc::IP_PASSSEC, "IP_PASSSEC", Scope::Inet),
    opt(IP, libc::IP_FREEBIND, "IP_FREEBIND", Scope::Inet),
    opt(IP, libc::IP_TRANSPARENT, "IP_TRANSPARENT", Scope::Inet),
    opt(IP, libc::IP_MTU_DISCOVER, "IP_MTU_DISCOVER", Scope::Inet),
    opt(IP, libc::IP_NODEFRAG, "IP_NODEFRAG", Scope::Inet),
    opt(IP, libc::IP_CHECKSUM, "IP_CHECKSUM", Scope::Inet),
    opt(
        IP,
        IP_BIND_ADDRESS_NO_PORT,
        "IP_BIND_ADDRESS_NO_PORT",
        Scope::Inet,
    ),
    Opt {
        kind: Kind::Bytes(40),
        ..opt(IP, libc::IP_OPTIONS, "IP_OPTIONS", Scope::Inet)
    },
    Opt {
        action: Action::BeforeBind,
        ..opt(IP6, libc::IPV6_V6ONLY, "IPV6_V6ONLY", Scope::Ipv6)
    },
    opt(
        IP6,
        libc::IPV6_UNICAST_HOPS,
        "IPV6_UNICAST_HOPS",
        Scope::Ipv6,
    ),
    opt(
        IP6,
        libc::IPV6_MULTICAST_HOPS,
        "IPV6_MULTICAST_HOPS",
        Scope::Multicast6,
    ),
    opt(
        IP6,
        libc::IPV6_MULTICAST_LOOP,
        "IPV6_MULTICAST_LOOP",
        Scope::Multicast6,
    ),
    opt(
        IP6,
        libc::IPV6_MULTICAST_IF,
        "IPV6_MULTICAST_IF",
        Scope::Multicast6,
    ),
    opt(
        IP6,
        IPV6_MULTICAST_ALL,
        "IPV6_MULTICAST_ALL",
        Scope::Multicast6,
    ),
    opt(IP6, libc::IPV6_RECVERR, "IPV6_RECVERR", Scope::Ipv6),
    opt(IP6, libc::IPV6_RECVPKTINFO, "IPV6_RECVPKTINFO", Scope::Ipv6),
    opt(
        IP6,
        libc::IPV6_RECVHOPLIMIT,
        "IPV6_RECVHOPLIMIT",
        Scope::Ipv6,
    ),
    opt(IP6, libc::IPV6_TCLASS, "IPV6_TCLASS", Scope::Ipv6),
    opt(IP6, libc::IPV6_RECVTCLASS, "IPV6_RECVTCLASS", Scope::Ipv6),
    opt(
        IP6,
        libc::IPV6_MTU_DISCOVER,
        "IPV6_MTU_DISCOVER",
        Scope::Ipv6,
    ),
    opt(IP6, IPV6_RECVPATHMTU, "IPV6_RECVPATHMTU", Scope::Ipv6),
    opt(IP6, IPV6_DONTFRAG, "IPV6_DONTFRAG", Scope::Ipv6),
    opt(IP6, IPV6_AUTOFLOWLABEL, "IPV6_AUTOFLOWLABEL", Scope::Ipv6),
    opt(
        IP6,
        IPV6_ADDR_PREFERENCES,
        "IPV6_ADDR_PREFERENCES",
        Scope::Ipv6,
    ),
    opt(IP6, IPV6_TRANSPARENT, "IPV6_TRANSPARENT", Scope::Ipv6),
    opt(IP6, IPV6_FREEBIND, "IPV6_FREEBIND", Scope::Ipv6),
    opt(TCP, libc::TCP_NODELAY, "TCP_NODELAY", Scope::Tcp),
    opt(TCP, libc::TCP_CORK, "TCP_CORK", Scope::Tcp),
    opt(TCP, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE", Scope::Tcp),
    opt(TCP, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL", Scope::Tcp),
    opt(TCP, libc::TCP_KEEPCNT, "TCP_KEEPCNT", Scope::Tcp),
    opt(TCP, libc::TCP_SYNCNT, "TCP_SYNCNT", Scope::Tcp),
    opt(TCP, libc::TCP_LINGER2, "TCP_LINGER2", Scope::Tcp),
    opt(TCP, libc::TCP_USER_TIMEOUT, "TCP_USER_TIMEOUT", Scope::Tcp),
    Opt {
        kind: Kind::Name(16),
        ..opt(TCP, libc::TCP_CONGESTION, "TCP_CONGESTION", Scope::Tcp)
    },
    opt(TCP, libc::TCP_QUICKACK, "TCP_QUICKACK", Scope::Tcp),
    opt(
        TCP,
        libc::TCP_NOTSENT_LOWAT,
        "TCP_NOTSENT_LOWAT",
        Scope::Tcp,
    ),
    opt(TCP, libc::TCP_DEFER_ACCEPT, "TCP_DEFER_ACCEPT", Scope::Tcp),
    opt(TCP, libc::TCP_FASTOPEN, "TCP_FASTOPEN", Scope::Tcp),
    Opt {
        action: Action::BeforeBind,
        ..opt(
            TCP,
            TCP_FASTOPEN_CONNECT,
            "TCP_FASTOPEN_CONNECT",
            Scope::Tcp,
        )
    },
    opt(
        TCP,
        TCP_FASTOPEN_NO_COOKIE,
        "TCP_FASTOPEN_NO_COOKIE",
        Scope::Tcp,
    ),
    opt(
        TCP,
        TCP_THIN_LINEAR_TIMEOUTS,
        "TCP_THIN_LINEAR_TIMEOUTS",
        Scope::Tcp,
    ),
    opt(TCP, TCP_THIN_DUPACK, "TCP_THIN_DUPACK", Scope::Tcp),
    opt(TCP, TCP_SAVE_SYN, "TCP_SAVE_SYN", Scope::Tcp),
    opt(TCP, TCP_INQ, "TCP_INQ", Scope::Tcp),
    opt(TCP, TCP_TX_DELAY, "TCP_TX_DELAY", Scope::Tcp),
    // Last: setting IP_TOS sets the priority too.
    opt(SOL, libc::SO_PRIORITY, "SO_PRIORITY", Scope::Any),
    Opt {
        kind: Kind::Name(16),
        action: Action::Refuse(
            "an upper layer protocol (kernel TLS or another ULP), whose state cannot be read",
        ),
        ..opt(TCP, TCP_ULP, "TCP_ULP", Scope::Tcp)
    },
];

/// One saved option: an int, or the bytes setsockopt takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedOpt {
    pub level: i32,
    pub name: i32,
    pub value: i32,
    pub data: Vec<u8>,
}

/// A classic BPF filter (SO_ATTACH_FILTER) and whether it is locked (SO_LOCK_FILTER).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// struct sock_filter instructions, 8 bytes each; empty if only the lock is set.
    pub program: Vec<u8>,
    pub locked: bool,
}

/// What [`read`] found: the options to set again and the filter. `refused` names state
/// that cannot be given back (empty if everything can).
#[derive(Debug, Clone, Default)]
pub struct State {
    pub options: Vec<SavedOpt>,
    pub filter: Option<Filter>,
    pub refused: Vec<String>,
}

/// Domain, type and protocol of socket `raw`.
fn identity(raw: RawFd, what: &str) -> Result<(i32, i32, i32)> {
    let get = |name, op| {
        get_int(raw, libc::SOL_SOCKET, name).ok_or_else(|| RuntimeError::last_os(op, what))
    };
    Ok((
        get(libc::SO_DOMAIN, "getsockopt(SO_DOMAIN)")?,
        get(libc::SO_TYPE, "getsockopt(SO_TYPE)")?,
        get(libc::SO_PROTOCOL, "getsockopt(SO_PROTOCOL)")?,
    ))
}

fn applies(scope: Scope, (domain, ty, proto): (i32, i32, i32)) -> bool {
    let inet = domain == libc::AF_INET || domain == libc::AF_INET6;
    match scope {
        Scope::Any => true,
        Scope::Inet => inet,
        Scope::Ipv6 => domain == libc::AF_INET6,
        Scope::Multicast => inet && ty != libc::SOCK_STREAM,
        Scope::Multicast6 => domain == libc::AF_INET6 && ty != libc::SOCK_STREAM,
        Scope::Tcp => inet && proto == libc::IPPROTO_TCP,
    }
}

/// The raw value of an option, None if the socket does not have it.
fn get_raw(raw: RawFd, o: &Opt) -> Option<Vec<u8>> {
    let size = match o.kind {
        Kind::Int => 4,
        Kind::Bytes(n) | Kind::Name(n) => n,
    };
    let mut buf = vec![0u8; size.max(4)];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most len bytes into a local buffer of that size.
    let r = unsafe { libc::getsockopt(raw, o.level, o.name, buf.as_mut_ptr().cast(), &mut len) };
    if r != 0 {
        return None;
    }
    buf.truncate(len as usize);
    Some(buf)
}

/// A new socket like the one described, for its defaults.
fn fresh((domain, ty, proto): (i32, i32, i32), what: &str) -> Result<OwnedFd> {
    // SAFETY: socket takes no pointers.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(RuntimeError::last_os("socket (for its defaults)", what));
    }
    // SAFETY: fd was just returned by socket and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The options of socket `fd` (a copy of a fd of process `pid`) that differ from a new
/// socket's of its kind, its filter, and what cannot be restored. `established` leaves out
/// the buffer sizes, which TCP_REPAIR's own record keeps for a connection.
pub fn read(pid: i32, fd: &OwnedFd, established: bool, what: &str) -> Result<State> {
    let raw = fd.as_raw_fd();
    let id = identity(raw, what)?;
    let new = fresh(id, what)?;
    let mut state = State::default();
    for o in TABLE.iter().filter(|o| applies(o.scope, id)) {
        let buffer = o.level == SOL && (o.name == libc::SO_SNDBUF || o.name == libc::SO_RCVBUF);
        if buffer && established {
            continue;
        }
        let (Some(v), default) = (get_raw(raw, o), get_raw(new.as_raw_fd(), o)) else {
            continue;
        };
        if Some(&v) == default.as_ref() {
            continue;
        }
        if let Action::Refuse(why) = o.action {
            state.refused.push(format!("{} is set: {why}", o.label));
            continue;
        }
        let int = |v: &[u8]| i32::from_ne_bytes([v[0], v[1], v[2], v[3]]);
        let saved = match o.kind {
            Kind::Int if v.len() >= 4 => {
                let value = if buffer { int(&v) / 2 } else { int(&v) };
                SavedOpt {
                    level: o.level,
                    name: o.name,
                    value,
                    data: Vec::new(),
                }
            }
            // An int option answered with fewer bytes (a char-sized one): kept as bytes.
            _ => {
                let mut data = v;
                if let Kind::Name(_) = o.kind {
                    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                    data.truncate(end);
                }
                if data.is_empty() {
                    continue;
                }
                SavedOpt {
                    level: o.level,
                    name: o.name,
                    value: 0,
                    data,
                }
            }
        };
        state.options.push(saved);
    }
    match filter(raw, what)? {
        Ok(f) => state.filter = f,
        Err(why) => state.refused.push(why),
    }
    if id.0 == libc::AF_INET || id.0 == libc::AF_INET6 {
        state
            .refused
            .extend(crate::mcast::memberships(pid, raw, id.0));
    }
    Ok(state)
}

/// The socket's filter: Ok(None) if it has none, Err(why) if it cannot be read back.
fn filter(raw: RawFd, what: &str) -> Result<std::result::Result<Option<Filter>, String>> {
    let locked = get_int(raw, SOL, SO_LOCK_FILTER).unwrap_or(0) != 0;
    // With no room, SO_GET_FILTER answers the number of instructions in the length.
    let mut count: libc::socklen_t = 0;
    // SAFETY: a zero length lets the kernel write nothing but the length.
    let r = unsafe { libc::getsockopt(raw, SOL, SO_GET_FILTER, std::ptr::null_mut(), &mut count) };
    if r != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EACCES) {
            // A filter with no classic program behind it: SO_ATTACH_BPF.
            return Ok(Err(
                "an eBPF socket filter (SO_ATTACH_BPF) is attached; its program cannot be \
                 read back from the socket"
                    .into(),
            ));
        }
        return Err(RuntimeError::sys("getsockopt(SO_GET_FILTER)", what, err));
    }
    if count == 0 {
        return Ok(Ok(locked.then(Filter::default)));
    }
    // The length is counted in instructions, the buffer holds 8 bytes each.
    let mut program = vec![0u8; count as usize * 8];
    let mut len = count;
    // SAFETY: the buffer holds `count` instructions, the length the kernel checks.
    let r = unsafe {
        libc::getsockopt(
            raw,
            SOL,
            SO_GET_FILTER,
            program.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 || len != count {
        return Err(RuntimeError::last_os("getsockopt(SO_GET_FILTER)", what));
    }
    Ok(Ok(Some(Filter { program, locked })))
}

/// Attaches `f` to `fd` (and locks it if it was).
pub fn attach_filter(fd: RawFd, f: &Filter) -> std::io::Result<()> {
    if !f.program.is_empty() {
        if !f.program.len().is_multiple_of(8) || f.program.len() / 8 > u16::MAX as usize {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        let prog = libc::sock_fprog {
            len: (f.program.len() / 8) as u16,
            filter: f.program.as_ptr().cast_mut().cast(),
        };
        // SAFETY: prog points to the instructions in f.program, alive for the call.
        let r = unsafe {
            libc::setsockopt(
                fd,
                SOL,
                libc::SO_ATTACH_FILTER,
                (&prog as *const libc::sock_fprog).cast(),
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if f.locked {
        set(fd, SOL, SO_LOCK_FILTER, 1, &[])?;
    }
    Ok(())
}

/// Sets one option as [`read`] saved it: `data` if not empty, else the int `value`.
/// Buffer sizes are forced past the system's maximum when possible, as the original's may
/// have been.
pub fn set(fd: RawFd, level: i32, name: i32, value: i32, data: &[u8]) -> std::io::Result<()> {
    if !data.is_empty() {
        // SAFETY: sets the option from a local buffer of the given length.
        let r = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                data.as_ptr().cast(),
                data.len() as libc::socklen_t,
            )
        };
        return if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        };
    }
    crate::inet::set_option(fd, level, name, value)
}

/// Whether the option must be set before the socket is bound.
pub fn before_bind(level: i32, name: i32) -> bool {
    TABLE
        .iter()
        .any(|o| o.level == level && o.name == name && o.action == Action::BeforeBind)
}

/// The label of an option, for messages ("SO_REUSEADDR"), or its numbers.
pub fn label(level: i32, name: i32) -> String {
    TABLE
        .iter()
        .find(|o| o.level == level && o.name == name)
        .map_or(format!("({level}, {name})"), |o| o.label.to_string())
}

/// Shuts down `fd` in the directions of `how` (sk_shutdown bits: 1 receive, 2 send). An
/// unconnected socket takes it too, though the kernel answers ENOTCONN.
pub fn shut_down(fd: RawFd, how: u32) -> std::io::Result<()> {
    let mode = match how & 3 {
        0 => return Ok(()),
        1 => libc::SHUT_RD,
        2 => libc::SHUT_WR,
        _ => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown takes no pointers.
    if unsafe { libc::shutdown(fd, mode) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOTCONN) {
        return Ok(());
    }
    Err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp() -> OwnedFd {
        fresh((libc::AF_INET, libc::SOCK_DGRAM, 0), "t").unwrap()
    }

    #[test]
    fn only_options_that_differ_are_saved_and_come_back() {
        let s = udp();
        set(s.as_raw_fd(), SOL, libc::SO_BROADCAST, 1, &[]).unwrap();
        set(s.as_raw_fd(), IP, libc::IP_TTL, 9, &[]).unwrap();
        set(s.as_raw_fd(), SOL, libc::SO_RCVBUF, 100_000, &[]).unwrap();
        let tv = [3i64, 500_000];
        // SAFETY: a timeval of two longs, read as bytes.
        let tv: [u8; 16] = unsafe { std::mem::transmute(tv) };
        set(s.as_raw_fd(), SOL, libc::SO_RCVTIMEO, 0, &tv).unwrap();
        let got = read(std::process::id() as i32, &s, false, "t").unwrap();
        let names: Vec<i32> = got.options.iter().map(|o| o.name).collect();
        assert_eq!(
            names,
            [
                libc::SO_BROADCAST,
                libc::SO_RCVBUF,
                libc::SO_RCVTIMEO,
                libc::IP_TTL
            ]
        );
        let t = udp();
        for o in &got.options {
            set(t.as_raw_fd(), o.level, o.name, o.value, &o.data).unwrap();
        }
        let again = read(std::process::id() as i32, &t, false, "t").unwrap();
        assert_eq!(again.options, got.options);
        assert!(got.refused.is_empty() && got.filter.is_none());
    }

    #[test]
    fn a_classic_filter_is_read_and_attached_again() {
        let s = udp();
        // ret #0: drop everything.
        let program = [0x06u8, 0, 0, 0, 0, 0, 0, 0];
        let f = Filter {
            program: program.to_vec(),
            locked: false,
        };
        attach_filter(s.as_raw_fd(), &f).unwrap();
        let got = read(std::process::id() as i32, &s, false, "t").unwrap();
        assert_eq!(got.filter.as_ref(), Some(&f));
        let t = udp();
        attach_filter(t.as_raw_fd(), &f).unwrap();
        assert_eq!(
            read(std::process::id() as i32, &t, false, "t")
                .unwrap()
                .filter,
            Some(f)
        );
    }
}

//! TCP listening sockets, read from a copy of the process's fd: family, bound address,
//! backlog, the connections waiting to be accepted, and the socket options that matter.

use crate::error::{Result, RuntimeError};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A listening TCP socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    /// Its listen() backlog (sk_max_ack_backlog).
    pub backlog: u32,
    /// Connections established but not accepted yet.
    pub waiting: u32,
}

/// The options TCP_REPAIR's record of a connection keeps (each an int); every other
/// socket's options are the whole table of [`crate::sockopt`].
pub const OPTIONS: [(i32, i32); 5] = [
    (libc::SOL_SOCKET, libc::SO_REUSEADDR),
    (libc::SOL_SOCKET, libc::SO_REUSEPORT),
    (libc::SOL_SOCKET, libc::SO_KEEPALIVE),
    (libc::IPPROTO_TCP, libc::TCP_NODELAY),
    (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
];

/// The values of the [`OPTIONS`] that apply to the socket: IPv6 options only for IPv6, and
/// those its protocol refuses (TCP_NODELAY on UDP) are left out. SO_LINGER, when on, is
/// recorded as (SOL_SOCKET, SO_LINGER, seconds); see [`set_option`].
pub(crate) fn options_of(raw: i32, domain: Option<i32>) -> Vec<(i32, i32, i32)> {
    let mut out: Vec<(i32, i32, i32)> = OPTIONS
        .iter()
        .filter(|(level, _)| *level != libc::IPPROTO_IPV6 || domain == Some(libc::AF_INET6))
        .filter_map(|&(level, name)| get_int(raw, level, name).map(|v| (level, name, v)))
        .collect();
    let mut l = libc::linger {
        l_onoff: 0,
        l_linger: 0,
    };
    let mut len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
    // SAFETY: getsockopt fills at most len bytes of a local struct linger.
    let r = unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&mut l as *mut libc::linger).cast(),
            &mut len,
        )
    };
    if r == 0 && l.l_onoff != 0 {
        out.push((libc::SOL_SOCKET, libc::SO_LINGER, l.l_linger));
    }
    out.extend(buffer_sizes(raw, domain));
    out
}

/// SO_SNDBUF and SO_RCVBUF where they differ from a new socket's of the same kind (set by
/// the program, or grown by autotuning): recorded as the value to set, half what getsockopt
/// reports (the kernel doubles it).
fn buffer_sizes(raw: i32, domain: Option<i32>) -> Vec<(i32, i32, i32)> {
    let (Some(domain), Some(ty)) = (domain, get_int(raw, libc::SOL_SOCKET, libc::SO_TYPE)) else {
        return Vec::new();
    };
    // SAFETY: socket takes no pointers; the result is closed below.
    let fresh = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
    if fresh < 0 {
        return Vec::new();
    }
    // SAFETY: fresh was just returned by socket and is owned by nobody else.
    let fresh = unsafe { OwnedFd::from_raw_fd(fresh) };
    [libc::SO_SNDBUF, libc::SO_RCVBUF]
        .into_iter()
        .filter_map(|name| {
            let v = get_int(raw, libc::SOL_SOCKET, name)?;
            let default = get_int(fresh.as_raw_fd(), libc::SOL_SOCKET, name)?;
            (v != default).then_some((libc::SOL_SOCKET, name, v / 2))
        })
        .collect()
}

/// Sets an option as [`options_of`] recorded it: an int, or for SO_LINGER the seconds of a
/// linger that is on.
pub fn set_option(fd: i32, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // Root may exceed net.core.[wr]mem_max, as the original may have.
    let force = match (level, name) {
        (libc::SOL_SOCKET, libc::SO_SNDBUF) => Some(libc::SO_SNDBUFFORCE),
        (libc::SOL_SOCKET, libc::SO_RCVBUF) => Some(libc::SO_RCVBUFFORCE),
        _ => None,
    };
    if let Some(forced) = force {
        // SAFETY: sets an int option from a local.
        let r = unsafe { libc::setsockopt(fd, level, forced, (&value as *const i32).cast(), 4) };
        if r == 0 {
            return Ok(());
        }
    }
    let r = if (level, name) == (libc::SOL_SOCKET, libc::SO_LINGER) {
        let l = libc::linger {
            l_onoff: 1,
            l_linger: value,
        };
        let len = std::mem::size_of::<libc::linger>() as libc::socklen_t;
        // SAFETY: sets the option from a local struct linger.
        unsafe { libc::setsockopt(fd, level, name, (&l as *const libc::linger).cast(), len) }
    } else {
        // SAFETY: sets an int option from a local.
        unsafe { libc::setsockopt(fd, level, name, (&value as *const i32).cast(), 4) }
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The sockaddr for `addr`, and its length.
pub fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data, filled below for the family.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sa) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sa = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sa) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// An int socket option, None if the socket has no such option.
pub fn get_int(fd: i32, level: i32, name: i32) -> Option<i32> {
    let mut v: libc::c_int = 0;
    let mut len = 4 as libc::socklen_t;
    // SAFETY: writes one c_int to a local.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// Describes `fd` if it is a listening TCP socket (IPv4 or IPv6); None for any other socket.
pub fn listener(fd: &OwnedFd, what: &str) -> Result<Option<Listener>> {
    let raw = fd.as_raw_fd();
    let domain = get_int(raw, libc::SOL_SOCKET, libc::SO_DOMAIN);
    let ty = get_int(raw, libc::SOL_SOCKET, libc::SO_TYPE);
    let proto = get_int(raw, libc::SOL_SOCKET, libc::SO_PROTOCOL);
    let listening = get_int(raw, libc::SOL_SOCKET, libc::SO_ACCEPTCONN) == Some(1);
    let inet = matches!(domain, Some(libc::AF_INET) | Some(libc::AF_INET6));
    if !inet || ty != Some(libc::SOCK_STREAM) || proto != Some(libc::IPPROTO_TCP) || !listening {
        return Ok(None);
    }
    let addr = local_addr(raw, what)?;
    // struct tcp_info: 8 bytes of u8 fields, then u32 rto, ato, snd_mss, rcv_mss, unacked,
    // sacked. For a listener, unacked is the accept queue and sacked its limit.
    let info = tcp_info(raw, what)?;
    let word = |o: usize| u32::from_ne_bytes([info[o], info[o + 1], info[o + 2], info[o + 3]]);
    Ok(Some(Listener {
        addr,
        backlog: word(28),
        waiting: word(24),
    }))
}

/// struct tcp_info of TCP socket `raw` (TCP_INFO), at least its first 32 bytes filled.
pub(crate) fn tcp_info(raw: i32, what: &str) -> Result<[u8; 104]> {
    let mut info = [0u8; 104];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: getsockopt fills at most len bytes of a local buffer.
    let r = unsafe {
        libc::getsockopt(
            raw,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 || len < 32 {
        return Err(RuntimeError::last_os("getsockopt(TCP_INFO)", what));
    }
    Ok(info)
}

/// What kind of socket `fd` is, for an error message ("a UDP socket", "a netlink socket",
/// "an established TCP connection", ...).
pub fn socket_kind(fd: &OwnedFd) -> String {
    let raw = fd.as_raw_fd();
    let domain = get_int(raw, libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap_or(-1);
    let ty = get_int(raw, libc::SOL_SOCKET, libc::SO_TYPE).unwrap_or(-1);
    let proto = get_int(raw, libc::SOL_SOCKET, libc::SO_PROTOCOL).unwrap_or(-1);
    let family = match domain {
        libc::AF_INET => "IPv4",
        libc::AF_INET6 => "IPv6",
        libc::AF_UNIX => "unix",
        libc::AF_NETLINK => return "a netlink socket".into(),
        libc::AF_PACKET => return "a packet socket".into(),
        _ => return format!("a socket of address family {domain}"),
    };
    if ty == libc::SOCK_RAW {
        return format!("a raw {family} socket");
    }
    if proto == libc::IPPROTO_UDP {
        return format!("a UDP ({family}) socket");
    }
    if proto == libc::IPPROTO_TCP {
        return if sockaddr_of(raw, true).is_some() {
            format!("an established TCP ({family}) connection")
        } else {
            format!("an unconnected TCP ({family}) socket")
        };
    }
    format!("a {family} socket")
}

fn parse_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 =
                unsafe { std::ptr::read((ss as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)),
                u16::from_be(a.sin6_port),
            ))
        }
        _ => None,
    }
}

/// getsockname (`peer` false) or getpeername (`peer` true); None if not connected.
pub(crate) fn sockaddr_of(raw: i32, peer: bool) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; the call fills at most its size.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast();
    // SAFETY: as above.
    let r = unsafe {
        if peer {
            libc::getpeername(raw, p, &mut len)
        } else {
            libc::getsockname(raw, p, &mut len)
        }
    };
    if r != 0 {
        return None;
    }
    parse_sockaddr(&ss)
}

/// getsockname of an IPv4 or IPv6 socket (the unspecified address and port 0 if unbound).
pub fn local_address(raw: i32) -> Option<SocketAddr> {
    sockaddr_of(raw, false)
}

fn local_addr(raw: i32, what: &str) -> Result<SocketAddr> {
    sockaddr_of(raw, false).ok_or_else(|| RuntimeError::last_os("getsockname", what))
}

/// A UDP socket: its bound address, its peer if connected, and its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Udp {
    pub local: SocketAddr,
    pub peer: Option<SocketAddr>,
    /// Bytes of datagrams waiting to be read.
    pub queued: u32,
}

/// Describes `fd` if it is a UDP socket (IPv4 or IPv6).
pub fn udp(fd: &OwnedFd, what: &str) -> Result<Option<Udp>> {
    let raw = fd.as_raw_fd();
    let domain = get_int(raw, libc::SOL_SOCKET, libc::SO_DOMAIN);
    let inet = matches!(domain, Some(libc::AF_INET) | Some(libc::AF_INET6));
    if !inet || get_int(raw, libc::SOL_SOCKET, libc::SO_PROTOCOL) != Some(libc::IPPROTO_UDP) {
        return Ok(None);
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to a local.
    if unsafe { libc::ioctl(raw, libc::FIONREAD, &mut queued) } < 0 {
        return Err(RuntimeError::last_os("ioctl(FIONREAD)", what));
    }
    Ok(Some(Udp {
        local: local_addr(raw, what)?,
        peer: sockaddr_of(raw, true),
        queued: queued.max(0) as u32,
    }))
}

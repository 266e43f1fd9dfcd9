//! Fds recreated from their saved state rather than reopened: eventfd, timerfd, signalfd,
//! epoll and inotify fds, TCP and unix listeners, unconnected unix sockets, UDP sockets, and
//! established TCP connections (rebuilt in repair mode). An epoll fd is made empty here;
//! its watches are added inside the new process once its fd table exists (an epoll watch is
//! keyed by the fd number in the table that added it).

use crate::error::RestoreError;
use stasis_image::proto::{self, FdKind};
use stasis_runtime::inet;
use stasis_runtime::tcp_repair::{self, Connection, Window};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

fn failed(p: &proto::Process, f: &proto::Fd, op: &str) -> RestoreError {
    RestoreError::Unsupported(format!(
        "process {}: recreating fd {} ({:?}): {op}: {}",
        p.pid,
        f.fd,
        f.kind(),
        std::io::Error::last_os_error()
    ))
}

/// Takes ownership of a new fd (closed again if anything after fails), or names the failed
/// call `op`.
fn own(fd: i32, p: &proto::Process, f: &proto::Fd, op: &str) -> Result<OwnedFd, RestoreError> {
    if fd < 0 {
        return Err(failed(p, f, op));
    }
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    }
}

/// When timerfd `t` expires next, as timerfd_settime takes it: its remaining time, or for a
/// timer set absolute (TFD_TIMER_ABSTIME, perhaps with TFD_TIMER_CANCEL_ON_SET) the same
/// instant as an absolute time on its clock, so a later change of that clock acts on it as
/// before. None if the clock cannot be read.
fn timer_expiry(t: &proto::TimerFd) -> Option<(libc::c_int, libc::timespec)> {
    let flags =
        t.settime_flags as libc::c_int & (libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET);
    if flags & libc::TFD_TIMER_ABSTIME == 0 {
        return Some((0, timespec(t.value_ns)));
    }
    let mut now = timespec(0);
    // SAFETY: clock_gettime writes one timespec to a local.
    if unsafe { libc::clock_gettime(t.clockid, &mut now) } != 0 {
        return None;
    }
    let now_ns = (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64);
    Some((flags, timespec(now_ns.saturating_add(t.value_ns))))
}

/// Creates the object in this process (close-on-exec); names on the filesystem (inotify
/// watches, unix socket paths) are under `opts`'s root.
pub fn create(
    p: &proto::Process,
    f: &proto::Fd,
    opts: &crate::Options,
) -> Result<OwnedFd, RestoreError> {
    match f.kind() {
        FdKind::Eventfd => {
            let mut flags = libc::EFD_CLOEXEC;
            if f.eventfd_semaphore {
                flags |= libc::EFD_SEMAPHORE;
            }
            // SAFETY: eventfd takes no pointers.
            let fd = own(unsafe { libc::eventfd(0, flags) }, p, f, "eventfd")?;
            if f.eventfd_count > 0 {
                let v = f.eventfd_count.to_ne_bytes();
                // SAFETY: writes 8 bytes from a local array to our eventfd.
                if unsafe { libc::write(fd.as_raw_fd(), v.as_ptr().cast(), 8) } != 8 {
                    return Err(failed(p, f, "setting its counter"));
                }
            }
            Ok(fd)
        }
        FdKind::Timerfd => {
            let t = f.timerfd.as_ref().ok_or_else(|| {
                RestoreError::Invalid(format!("process {}: timerfd {} has no state", p.pid, f.fd))
            })?;
            // SAFETY: timerfd_create takes no pointers.
            let fd = unsafe { libc::timerfd_create(t.clockid, libc::TFD_CLOEXEC) };
            let fd = own(fd, p, f, "timerfd_create")?;
            if t.value_ns > 0 {
                let (flags, value) =
                    timer_expiry(t).ok_or_else(|| failed(p, f, "clock_gettime"))?;
                let its = libc::itimerspec {
                    it_interval: timespec(t.interval_ns),
                    it_value: value,
                };
                // SAFETY: its is a valid itimerspec; no old value wanted.
                let rc = unsafe {
                    libc::timerfd_settime(fd.as_raw_fd(), flags, &its, std::ptr::null_mut())
                };
                if rc != 0 {
                    return Err(failed(p, f, "timerfd_settime"));
                }
            }
            if t.ticks > 0 {
                // TFD_IOC_SET_TICKS = _IOW('T', 0, u64).
                const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;
                let ticks = t.ticks;
                // SAFETY: the ioctl reads one u64 from a local.
                if unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) } != 0 {
                    return Err(failed(p, f, "ioctl(TFD_IOC_SET_TICKS)"));
                }
            }
            Ok(fd)
        }
        FdKind::Signalfd => {
            // SAFETY: sigset_t is plain data, filled below by sigemptyset/sigaddset.
            let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
            // SAFETY: set is a valid sigset_t.
            unsafe { libc::sigemptyset(&mut set) };
            for sig in 1..=64 {
                if f.signalfd_mask & (1u64 << (sig - 1)) != 0 {
                    // SAFETY: as above; invalid numbers are refused by the kernel, ignored here.
                    unsafe { libc::sigaddset(&mut set, sig) };
                }
            }
            // SAFETY: set is a valid sigset_t.
            own(
                unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) },
                p,
                f,
                "signalfd",
            )
        }
        FdKind::Epoll => {
            // SAFETY: epoll_create1 takes no pointers.
            own(
                unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) },
                p,
                f,
                "epoll_create1",
            )
        }
        FdKind::TcpListen => tcp_listener(p, f),
        FdKind::TcpSocket => tcp_socket(p, f),
        FdKind::Udp => udp_socket(p, f),
        FdKind::UnixListen | FdKind::UnixBound => unix_listener(p, f, opts),
        FdKind::Inotify => {
            // SAFETY: inotify_init1 takes no pointers.
            let fd = own(
                unsafe { libc::inotify_init1(libc::IN_CLOEXEC) },
                p,
                f,
                "inotify_init1",
            )?;
            add_inotify_watches(p, f, fd.as_raw_fd(), opts)?;
            Ok(fd)
        }
        other => Err(RestoreError::Invalid(format!(
            "process {}: fd {} of kind {other:?} is not an event fd",
            p.pid, f.fd
        ))),
    }
}

/// Adds the watches in wd order so each gets its old wd: a new instance hands out wds 1, 2,
/// ... in turn, so a gap is skipped by adding and removing a watch on "/".
fn add_inotify_watches(
    p: &proto::Process,
    f: &proto::Fd,
    fd: i32,
    opts: &crate::Options,
) -> Result<(), RestoreError> {
    let mut watches: Vec<&proto::InotifyWatch> = f.inotify_watches.iter().collect();
    watches.sort_by_key(|w| w.wd);
    let root = c"/";
    let mut next = 1;
    for w in watches {
        if w.wd < next || w.wd > next + 65536 {
            return Err(RestoreError::Invalid(format!(
                "process {}: inotify fd {} has watch descriptor {} out of order",
                p.pid, f.fd, w.wd
            )));
        }
        while next < w.wd {
            // SAFETY: root is a valid C string; the watch is removed at once.
            let burn = unsafe { libc::inotify_add_watch(fd, root.as_ptr(), libc::IN_ACCESS) };
            if burn < 0 || burn >= w.wd {
                return Err(failed(p, f, "skipping watch descriptors"));
            }
            // SAFETY: removes the watch just added.
            unsafe { libc::inotify_rm_watch(fd, burn) };
            next = burn + 1;
        }
        let path = std::ffi::CString::new(opts.host_path(&w.path).as_os_str().as_bytes()).map_err(
            |_| RestoreError::Invalid(format!("inotify watch path {:?} holds NUL", w.path)),
        )?;
        // SAFETY: path is a valid C string.
        let got = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), w.mask) };
        if got != w.wd {
            return Err(RestoreError::Unsupported(format!(
                "process {}: inotify fd {}: watching {} gave wd {got}, not {} ({})",
                p.pid,
                f.fd,
                w.path,
                w.wd,
                std::io::Error::last_os_error()
            )));
        }
        next = got + 1;
    }
    // Removing the skipping watches queued IN_IGNORED events; the new instance starts empty.
    // SAFETY: fcntl and read on our own fd, into a local buffer; the status flags are set to
    // the saved ones afterwards.
    unsafe {
        libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
        let mut buf = [0u8; 4096];
        while libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) > 0 {}
    }
    Ok(())
}

/// The address `ip`:`port` as the image spells them.
pub(crate) fn socket_addr(
    p: &proto::Process,
    ip: &str,
    port: u32,
) -> Result<SocketAddr, RestoreError> {
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|_| RestoreError::Invalid(format!("process {}: address {ip:?}", p.pid)))?;
    let port = u16::try_from(port)
        .map_err(|_| RestoreError::Invalid(format!("process {}: port {port}", p.pid)))?;
    Ok(SocketAddr::new(ip, port))
}

/// A socket address for `ip`:`port` (as the image spells them).
fn sockaddr(
    p: &proto::Process,
    ip: &str,
    port: u32,
) -> Result<(libc::sockaddr_storage, libc::socklen_t), RestoreError> {
    Ok(inet::to_sockaddr(socket_addr(p, ip, port)?))
}

/// A new IPv4/IPv6 socket of type `ty` with `options` set, bound to `ip`:`port`, then
/// finished by `then` (listen, connect); closed again on any failure.
fn inet_socket(
    p: &proto::Process,
    f: &proto::Fd,
    ty: i32,
    (ip, port): (&str, u32),
    options: &[proto::SockOpt],
    then: impl FnOnce(i32) -> Result<(), RestoreError>,
) -> Result<OwnedFd, RestoreError> {
    let (ss, len) = sockaddr(p, ip, port)?;
    let family = ss.ss_family as i32;
    // SAFETY: socket takes no pointers.
    let fd = own(
        unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, 0) },
        p,
        f,
        "socket",
    )?;
    let raw = fd.as_raw_fd();
    // Images before the option table kept a few options per kind of socket.
    for o in options {
        if inet::set_option(raw, o.level, o.name, o.value).is_err() {
            return Err(failed(
                p,
                f,
                &format!("setsockopt({}, {})", o.level, o.name),
            ));
        }
    }
    crate::sockets::set_options(p, f, raw, false)?;
    // An unbound socket (port 0 on no address) stays unbound.
    let unbound = port == 0 && socket_addr(p, ip, port)?.ip().is_unspecified();
    let bind = || {
        // SAFETY: ss holds a valid address of `len` bytes.
        unsafe { libc::bind(raw, (&ss as *const libc::sockaddr_storage).cast(), len) }
    };
    if !unbound && bind() != 0 {
        return Err(failed(p, f, &format!("bind to {ip} port {port}")));
    }
    then(raw)?;
    crate::sockets::shut_down(p, f, raw)?;
    Ok(fd)
}

/// A TCP socket bound to the saved address with the saved options, listening again.
fn tcp_listener(p: &proto::Process, f: &proto::Fd) -> Result<OwnedFd, RestoreError> {
    let t = f.tcp_listen.as_ref().ok_or_else(|| {
        RestoreError::Invalid(format!(
            "process {}: listener fd {} has no state",
            p.pid, f.fd
        ))
    })?;
    inet_socket(p, f, libc::SOCK_STREAM, (&t.ip, t.port), &t.options, |fd| {
        // SAFETY: listen takes no pointers.
        if unsafe { libc::listen(fd, t.backlog.min(65535) as i32) } != 0 {
            return Err(failed(p, f, "listen"));
        }
        Ok(())
    })
}

/// A TCP socket that neither listened nor was connected, bound again if it was.
fn tcp_socket(p: &proto::Process, f: &proto::Fd) -> Result<OwnedFd, RestoreError> {
    let t = f.tcp_listen.as_ref().ok_or_else(|| {
        RestoreError::Invalid(format!(
            "process {}: TCP socket fd {} has no state",
            p.pid, f.fd
        ))
    })?;
    inet_socket(p, f, libc::SOCK_STREAM, (&t.ip, t.port), &t.options, |_| {
        Ok(())
    })
}

/// A UDP socket bound (and connected) as it was.
fn udp_socket(p: &proto::Process, f: &proto::Fd) -> Result<OwnedFd, RestoreError> {
    let u = f.udp.as_ref().ok_or_else(|| {
        RestoreError::Invalid(format!("process {}: UDP fd {} has no state", p.pid, f.fd))
    })?;
    inet_socket(p, f, libc::SOCK_DGRAM, (&u.ip, u.port), &u.options, |fd| {
        if u.peer_ip.is_empty() {
            return Ok(());
        }
        let (ss, len) = sockaddr(p, &u.peer_ip, u.peer_port)?;
        // SAFETY: ss holds a valid address of `len` bytes.
        if unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
            return Err(failed(p, f, "connect"));
        }
        Ok(())
    })
}

/// A unix listener (or an unconnected socket) bound to its old name again. A socket file
/// left at the path by the dead original is removed first (only a socket file: anything
/// else there is an error). Under another root than "/", all of that is done from a thread
/// chrooted there (in the process's working directory, for a relative name): the socket
/// must get exactly its old name, which a path under the root would not be (and might not
/// fit in sun_path).
fn unix_listener(
    p: &proto::Process,
    f: &proto::Fd,
    opts: &crate::Options,
) -> Result<OwnedFd, RestoreError> {
    // A relative name is bound from the directory it was bound in (the working directory
    // when the image predates that record).
    let dir = f.unix_listen.as_ref().map_or("", |u| u.dir.as_str());
    if !dir.is_empty() {
        return crate::sockets::in_dir(opts.root_dir(), dir, || unix_listener_here(p, f)).map_err(
            |e| RestoreError::Unsupported(format!("process {}: fd {}: {e}", p.pid, f.fd)),
        );
    }
    let Some(root) = opts.root_dir() else {
        return unix_listener_here(p, f);
    };
    stasis_runtime::sys::with_root(root, &p.cwd, || unix_listener_here(p, f))
        .map_err(|e| RestoreError::Unsupported(format!("process {}: fd {}: {e}", p.pid, f.fd)))?
}

/// [`unix_listener`] with names resolved as this thread resolves them.
fn unix_listener_here(p: &proto::Process, f: &proto::Fd) -> Result<OwnedFd, RestoreError> {
    use std::os::unix::fs::FileTypeExt;
    let u = f.unix_listen.as_ref().ok_or_else(|| {
        RestoreError::Invalid(format!(
            "process {}: unix socket fd {} has no state",
            p.pid, f.fd
        ))
    })?;
    let listening = f.kind() == FdKind::UnixListen;
    if !listening && u.name.is_empty() {
        // SAFETY: socket takes no pointers.
        let fd = unsafe { libc::socket(libc::AF_UNIX, u.sock_type as i32 | libc::SOCK_CLOEXEC, 0) };
        let fd = own(fd, p, f, "socket(AF_UNIX)")?;
        crate::sockets::set_options(p, f, fd.as_raw_fd(), false)?;
        crate::sockets::shut_down(p, f, fd.as_raw_fd())?;
        return Ok(fd);
    }
    // SAFETY: sockaddr_un is plain data, filled below.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    // The name as the kernel reported it: a path ends at its NUL, an abstract one does not.
    let name: &[u8] = if u.name.first() == Some(&0) {
        &u.name
    } else {
        u.name.split(|b| *b == 0).next().unwrap_or_default()
    };
    if name.is_empty() || name.len() >= sa.sun_path.len() {
        return Err(RestoreError::Invalid(format!(
            "process {}: unix listener name of {} bytes",
            p.pid,
            name.len()
        )));
    }
    for (i, b) in name.iter().enumerate() {
        sa.sun_path[i] = *b as libc::c_char;
    }
    let path = (name[0] != 0).then(|| std::path::Path::new(std::ffi::OsStr::from_bytes(name)));
    if let Some(path) = path.filter(|_| u.deleted) {
        // Its name was unlinked: bound here again and unlinked after, but never in place of
        // a file somebody made there since.
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(RestoreError::Unsupported(format!(
                "process {}: unix listener fd {} was bound to {}, since unlinked; that path \
                 is taken again, so its name cannot be given back",
                p.pid,
                f.fd,
                path.display()
            )));
        }
    } else if let Some(path) = path {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                return Err(RestoreError::Unsupported(format!(
                    "process {}: {} is no longer a socket; not replacing it",
                    p.pid,
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(|e| {
                RestoreError::Unsupported(format!("removing stale socket {}: {e}", path.display()))
            })?;
        }
    }
    let ty = u.sock_type as i32;
    // SAFETY: socket takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0) };
    let fd = own(fd, p, f, "socket(AF_UNIX)")?;
    let len = (std::mem::size_of::<libc::sa_family_t>() + name.len()) as libc::socklen_t;
    let raw = fd.as_raw_fd();
    crate::sockets::set_options(p, f, raw, false)?;
    // SAFETY: sa holds a valid address of `len` bytes.
    let bound = unsafe { libc::bind(raw, (&sa as *const libc::sockaddr_un).cast(), len) } == 0
        // SAFETY: listen takes no pointers.
        && (!listening || unsafe { libc::listen(raw, u.backlog.min(65535) as i32) } == 0);
    if !bound {
        return Err(failed(p, f, "bind/listen"));
    }
    crate::sockets::shut_down(p, f, raw)?;
    if let Some(path) = path.filter(|_| u.deleted) {
        std::fs::remove_file(path).map_err(|e| {
            RestoreError::Unsupported(format!(
                "unlinking {} again after binding: {e}",
                path.display()
            ))
        })?;
    }
    Ok(fd)
}

/// The connection of a FD_KIND_TCP_ESTABLISHED fd rebuilt in this process, still in repair
/// mode, and the bytes it had never sent (queued by tcp_repair::finish).
pub fn tcp_connection(
    p: &proto::Process,
    f: &proto::Fd,
) -> Result<(OwnedFd, Vec<u8>), RestoreError> {
    let c = connection(p, f)?;
    let fd = tcp_repair::rebuild(&c, &format!("process {} fd {}", p.pid, f.fd))
        .map_err(|e| RestoreError::Unsupported(format!("recreating a TCP connection: {e}")))?;
    crate::sockets::set_options(p, f, fd.as_raw_fd(), true)?;
    Ok((fd, c.unsent_bytes().to_vec()))
}

/// The connection of a FD_KIND_TCP_ESTABLISHED fd, as TCP_REPAIR takes it.
fn connection(p: &proto::Process, f: &proto::Fd) -> Result<Connection, RestoreError> {
    let t = f.tcp.as_ref().ok_or_else(|| {
        RestoreError::Invalid(format!(
            "process {}: TCP connection fd {} has no state",
            p.pid, f.fd
        ))
    })?;
    if t.unsent as usize > t.send_queue.len() {
        return Err(RestoreError::Invalid(format!(
            "process {}: TCP connection fd {} has {} unsent bytes in a send queue of {}",
            p.pid,
            f.fd,
            t.unsent,
            t.send_queue.len()
        )));
    }
    Ok(Connection {
        local: Some(socket_addr(p, &t.ip, t.port)?),
        peer: Some(socket_addr(p, &t.peer_ip, t.peer_port)?),
        send_seq: t.send_seq,
        recv_seq: t.recv_seq,
        send_queue: t.send_queue.clone(),
        unsent: t.unsent,
        recv_queue: t.recv_queue.clone(),
        mss: t.mss,
        wscale: t.wscale_ok.then_some((t.snd_wscale, t.rcv_wscale)),
        sack: t.sack_ok,
        timestamps: t.timestamps_ok,
        timestamp: t.timestamp,
        window: Window {
            snd_wl1: t.snd_wl1,
            snd_wnd: t.snd_wnd,
            max_window: t.max_window,
            rcv_wnd: t.rcv_wnd,
            rcv_wup: t.rcv_wup,
        },
        sndbuf: t.sndbuf,
        rcvbuf: t.rcvbuf,
        options: t
            .options
            .iter()
            .map(|o| (o.level, o.name, o.value))
            .collect(),
    })
}

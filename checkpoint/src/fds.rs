//! Classifying a process's file descriptors (and refusing the kinds we cannot restore yet).

use crate::error::CheckpointError;
use crate::ghosts::{is_ghost_link, Ghosts};
use crate::sockets;
use crate::vmas::file_id;
use stasis_image::proto::{self, FdKind};
use stasis_runtime::unix_diag::{self, UnixSocket};
use stasis_runtime::{files, inet, procfs, tcp_repair};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

/// Character devices that are reopened by path.
const REOPENABLE_DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Lists and classifies every fd; an unsupported one is an error naming fd, kind and target.
pub fn collect_fds(pid: i32, ghosts: &mut Ghosts) -> Result<Vec<proto::Fd>, CheckpointError> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOENT) => CheckpointError::NoSuchProcess(pid),
        _ => CheckpointError::Io(format!("reading {dir}"), e),
    })?;
    let mut fds: Vec<i32> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| CheckpointError::Io(format!("reading {dir}"), e))?;
        if let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            fds.push(fd);
        }
    }
    fds.sort_unstable();
    let root = process_root(pid)?;
    // The unix sockets of the namespace, dumped once (when the first socket fd is met).
    let mut unix = None;
    fds.into_iter()
        .map(|fd| classify((pid, &root), fd, ghosts, &mut unix))
        .collect()
}

/// The root directory of process `pid` as its /proc link shows it: the paths of its files
/// are found under /proc/PID/root once it is taken off (see procfs::path_in_root).
pub fn process_root(pid: i32) -> Result<String, CheckpointError> {
    procfs::read_link(&format!("/proc/{pid}/root")).map_err(|e| match e.errno() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => CheckpointError::NoSuchProcess(pid),
        _ => e.into(),
    })
}

/// A file in flight that no fd of the tree holds (`copy` is this process's copy of it),
/// described as an fd is. Only a regular file (or a device reopened by path) can be opened
/// again; anything else is refused through `refuse`, which is told what the file is.
pub fn in_flight_file(
    copy: &OwnedFd,
    refuse: impl Fn(&str) -> CheckpointError,
) -> Result<proto::Fd, CheckpointError> {
    let me = std::process::id() as i32;
    let fd = copy.as_raw_fd();
    let target = procfs::read_fd_target(me, fd)?;
    let kind = if target.starts_with("socket:") {
        format!("{} ({target})", inet::socket_kind(copy))
    } else if target.starts_with("pipe:") {
        format!("an end of a pipe ({target})")
    } else if let Some(kind) = target.strip_prefix("anon_inode:") {
        let kind = kind.trim_matches(|c| c == '[' || c == ']');
        let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {kind} ({target})")
    } else if is_ghost_link(&target) {
        format!("the deleted file {target}")
    } else if !target.starts_with('/') {
        format!("a special file ({target})")
    } else {
        let root = process_root(me)?;
        let mut out = match classify((me, &root), fd, &mut Ghosts::default(), &mut None) {
            Ok(out) if matches!(out.kind(), FdKind::Regular | FdKind::CharDevice) => out,
            Ok(_) | Err(CheckpointError::Unsupported { .. }) => {
                return Err(refuse(&format!("{target}, which is not a regular file")))
            }
            Err(e) => return Err(e),
        };
        // Only the description matters: its number and close-on-exec flag are this
        // process's.
        out.fd = 0;
        out.flags &= !(libc::O_CLOEXEC as u32);
        return Ok(out);
    };
    Err(refuse(&kind))
}

/// Classifies fd `fd` of process `pid`, whose root directory is `root`.
fn classify(
    (pid, root): (i32, &str),
    fd: i32,
    ghosts: &mut Ghosts,
    unix: &mut Option<HashMap<u64, UnixSocket>>,
) -> Result<proto::Fd, CheckpointError> {
    let target = procfs::read_fd_target(pid, fd)?;
    let info = procfs::read_fdinfo(pid, fd)?;
    let unsupported = |kind: &str| {
        CheckpointError::unsupported(
            pid,
            format!("fd {fd} is {kind} ({target}), which is not supported yet"),
        )
    };
    let stdio = fd <= 2;
    let mut out = proto::Fd {
        fd: fd as u32,
        flags: info.flags,
        offset: info.pos,
        ..Default::default()
    };
    if let Some(rest) = target.strip_prefix("pipe:") {
        // Whether both ends are in the tree is settled once every process is collected
        // (descs::link); a pipe with an end outside is refused there, or inherited as stdio.
        out.kind = FdKind::Pipe as i32;
        out.pipe_id = rest
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .map_err(|_| unsupported("a pipe with an unreadable inode number"))?;
        out.inherited_from = target.clone();
        return Ok(out);
    }
    if let Some(ino) = target
        .strip_prefix("socket:[")
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse::<u64>().ok())
    {
        // Unix sockets as sock_diag reports them; that a connected one's peer is in the tree
        // is settled once every process is collected.
        let unix = match unix {
            Some(m) => m,
            None => unix.insert(unix_diag::unix_sockets_of(pid)?),
        };
        return match unix.get(&ino) {
            // A connected stream or seqpacket socket (a socketpair end, or either end of a
            // connection accepted from a listener), or a connected datagram pair.
            Some(s) if s.peer != 0 && s.state == 1 => {
                out.kind = FdKind::UnixPair as i32;
                out.socket_id = ino;
                out.socket_peer = s.peer;
                let copy = files::take_copy(pid, fd)?;
                sockets::save_state(pid, fd, &copy, &mut out, Some(s.shutdown))?;
                Ok(out)
            }
            // TCP_LISTEN = 10: a listener on a name; TCP_CLOSE = 7: unconnected, bound to a
            // name or not (a datagram server, or a client that names its destination in each
            // sendto).
            Some(s) if (s.state == 10 && !s.name.is_empty()) || (s.state == 7 && s.peer == 0) => {
                let listening = s.state == 10;
                if s.rqueue > 0 && listening {
                    return Err(unsupported(&format!(
                        "a unix listener with {} connections waiting to be accepted",
                        s.rqueue
                    )));
                }
                if s.rqueue > 0 {
                    return Err(unsupported(&format!(
                        "a unix socket with {} bytes of datagrams waiting to be read (their \
                         senders could not be given back; not supported yet)",
                        s.rqueue
                    )));
                }
                let kind = if listening {
                    FdKind::UnixListen
                } else {
                    FdKind::UnixBound
                };
                out.kind = kind as i32;
                let dir = sockets::relative_dir(pid, fd, s)?;
                let deleted = dir.is_none() && unix_name_deleted((pid, root), &s.name, s.vfs_ino);
                out.unix_listen = Some(proto::UnixListen {
                    name: s.name.clone(),
                    sock_type: s.sock_type as u32,
                    backlog: if listening { s.wqueue } else { 0 },
                    deleted,
                    dir: dir.unwrap_or_default(),
                });
                let (copy, shutdown) = (files::take_copy(pid, fd)?, Some(s.shutdown));
                sockets::save_state(pid, fd, &copy, &mut out, shutdown)?;
                Ok(out)
            }
            Some(_) => Err(unsupported(
                "a unix socket connected one way or half-closed",
            )),
            None => {
                // Not unix: what it is comes from a copy of the fd.
                let copy = files::take_copy(pid, fd)?;
                if tcp_listener(pid, fd, &copy, &mut out)?
                    || udp_socket(pid, fd, &copy, &mut out)?
                    || tcp_connection(ino, &copy, &mut out)
                    || sockets::tcp_socket(&copy, &mut out)
                {
                    sockets::save_state(pid, fd, &copy, &mut out, None)?;
                    Ok(out)
                } else if let Some(st) = tcp_repair::state(&copy).filter(|&s| s != 7) {
                    // Not CLOSE (unconnected, named by socket_kind): a connection opening or
                    // closing, which TCP_REPAIR cannot rebuild.
                    Err(unsupported(&format!(
                        "a TCP connection in state {}",
                        tcp_repair::state_name(st)
                    )))
                } else {
                    Err(unsupported(&inet::socket_kind(&copy)))
                }
            }
        };
    }
    if let Some(kind) = target.strip_prefix("anon_inode:") {
        let kind = kind.trim_matches(|c| c == '[' || c == ']');
        return match kind {
            "eventfd" | "timerfd" | "signalfd" | "eventpoll" | "inotify" => {
                event_fd(pid, fd, kind, &mut out)?;
                Ok(out)
            }
            "io_uring" => Err(unsupported(
                "an io_uring instance (its rings and requests in flight cannot be saved)",
            )),
            "userfaultfd" => Err(unsupported(
                "a userfaultfd (its registered ranges and pending faults cannot be saved)",
            )),
            other => Err(unsupported(&format!("an anonymous inode [{other}]"))),
        };
    }
    if !target.starts_with('/') {
        return Err(unsupported("a special file"));
    }
    if is_ghost_link(&target) {
        if let Some(path) = linked_elsewhere(pid, fd, &target)? {
            let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
                .map_err(|e| CheckpointError::Io(format!("stat fd {fd} of PID {pid}"), e))?;
            out.kind = FdKind::Regular as i32;
            out.path = path;
            out.file = Some(file_id(&meta));
            return Ok(out);
        }
        out.kind = FdKind::Regular as i32;
        out.path = target.clone();
        out.ghost_id = ghosts.register(pid, &format!("/proc/{pid}/fd/{fd}"), &target)?;
        return Ok(out);
    }
    // Follow the fd itself, not the path: it is the open file we must describe.
    let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
        .map_err(|e| CheckpointError::Io(format!("stat fd {fd} of PID {pid}"), e))?;
    let ft = meta.file_type();
    if ft.is_file() || ft.is_dir() {
        out.kind = FdKind::Regular as i32;
        out.path = target.clone();
        out.file = Some(file_id(&meta));
        Ok(out)
    } else if ft.is_char_device() && REOPENABLE_DEVICES.contains(&target.as_str()) {
        out.kind = FdKind::CharDevice as i32;
        out.path = target.clone();
        Ok(out)
    } else if ft.is_char_device() && stdio && is_terminal_path(&target) {
        out.kind = FdKind::Inherited as i32;
        out.inherited_from = target.clone();
        Ok(out)
    } else if ft.is_fifo() {
        // A named pipe: reopened by path; its buffer is settled with the tree's pipes.
        out.kind = FdKind::Fifo as i32;
        out.path = target.clone();
        out.pipe_id = meta.ino();
        out.file = Some(file_id(&meta));
        Ok(out)
    } else if ft.is_char_device() {
        Err(unsupported("a character device"))
    } else {
        Err(unsupported("a special file"))
    }
}

/// For a file unlinked from the name fd `fd` of `pid` had opened it by (`link`) but still
/// linked under another name (link(2) before the unlink): that name. Its contents must not
/// be copied as a deleted file's: the fd and the other name are one file, and restore must
/// open that same file again. None for a memfd or a file with no link left; a name that
/// cannot be found is refused.
fn linked_elsewhere(pid: i32, fd: i32, link: &str) -> Result<Option<String>, CheckpointError> {
    use std::os::unix::fs::MetadataExt;
    if link.starts_with("/memfd:") {
        return Ok(None);
    }
    let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
        .map_err(|e| CheckpointError::Io(format!("stat fd {fd} of PID {pid}"), e))?;
    if meta.nlink() == 0 || !meta.is_file() {
        return Ok(None);
    }
    let refuse = |why: String| {
        CheckpointError::unsupported(
            pid,
            format!(
                "fd {fd} is {link}, unlinked but still linked elsewhere ({} links), and its                  other name cannot be found ({why})",
                meta.nlink()
            ),
        )
    };
    let copy = files::take_copy(pid, fd)?;
    let (kind, handle) = files::file_handle(&copy, &format!("fd {fd} of PID {pid}"))
        .map_err(|e| refuse(e.to_string()))?;
    let dev = meta.dev();
    let sdev = (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev));
    let path =
        files::path_of_handle(pid, sdev, kind, &handle).map_err(|e| refuse(e.to_string()))?;
    let same = std::fs::metadata(&path).is_ok_and(|m| m.dev() == dev && m.ino() == meta.ino());
    if path.ends_with(" (deleted)") || !path.starts_with('/') || !same {
        return Err(refuse(format!("the kernel names it {path}")));
    }
    Ok(Some(path))
}

/// Whether a socket bound to path `name` (abstract names start with NUL) by a process of
/// `pid` (whose root is `root`) no longer has its socket file there: unlinked, or replaced by
/// another file. The path is looked up as that process sees it.
fn unix_name_deleted((pid, root): (i32, &str), name: &[u8], vfs_ino: Option<u64>) -> bool {
    let path = name.split(|b| *b == 0).next().unwrap_or_default();
    if path.is_empty() {
        return false;
    }
    let meta = match std::str::from_utf8(path) {
        Ok(p) => std::fs::symlink_metadata(procfs::path_in_root(pid, root, p)),
        Err(_) => {
            use std::os::unix::ffi::OsStrExt;
            std::fs::symlink_metadata(std::ffi::OsStr::from_bytes(path))
        }
    };
    match (meta, vfs_ino) {
        (Ok(m), Some(ino)) => m.ino() != ino || !m.file_type().is_socket(),
        (Ok(_), None) => false,
        (Err(_), _) => true,
    }
}

fn is_terminal_path(path: &str) -> bool {
    path.starts_with("/dev/pts/") || path.starts_with("/dev/tty") || path == "/dev/console"
}

/// Fills in an eventfd, timerfd, signalfd or epoll fd from its fdinfo.
fn event_fd(pid: i32, fd: i32, kind: &str, out: &mut proto::Fd) -> Result<(), CheckpointError> {
    let e = procfs::read_event_info(pid, fd)?;
    let missing = |what: &str| {
        CheckpointError::unsupported(pid, format!("fd {fd} ({kind}): fdinfo has no {what}"))
    };
    match kind {
        "eventfd" => {
            out.kind = FdKind::Eventfd as i32;
            out.eventfd_count = e.eventfd_count.ok_or_else(|| missing("eventfd-count"))?;
            out.eventfd_semaphore = e.eventfd_semaphore;
        }
        "timerfd" => {
            out.kind = FdKind::Timerfd as i32;
            out.timerfd = Some(timer_fd(pid, fd, &e, missing("clockid"))?);
        }
        "signalfd" => {
            out.kind = FdKind::Signalfd as i32;
            out.signalfd_mask = e.sigmask.ok_or_else(|| missing("sigmask"))?;
        }
        "inotify" => {
            out.kind = FdKind::Inotify as i32;
            for m in e.inotify {
                let path = files::path_of_handle(pid, m.sdev, m.handle_type, &m.handle).map_err(
                    |err| {
                        CheckpointError::unsupported(
                            pid,
                            format!("fd {fd} (inotify) watch {}: {err}", m.wd),
                        )
                    },
                )?;
                if path.ends_with(" (deleted)") || !path.starts_with('/') {
                    return Err(CheckpointError::unsupported(
                        pid,
                        format!(
                            "fd {fd} (inotify) watch {} is on {path}, which has no name",
                            m.wd
                        ),
                    ));
                }
                out.inotify_watches.push(proto::InotifyWatch {
                    wd: m.wd,
                    path,
                    mask: m.mask,
                    ino: m.ino,
                });
            }
        }
        _ => {
            out.kind = FdKind::Epoll as i32;
            for (tfd, events, data, ino) in e.epoll {
                // The watch is re-added by number: that number must still name the file.
                let path = format!("/proc/{pid}/fd/{tfd}");
                let same = std::fs::metadata(&path).is_ok_and(|m| m.ino() == ino);
                if !same {
                    return Err(CheckpointError::unsupported(
                        pid,
                        format!(
                            "fd {fd} (epoll) watches a file that fd {tfd} no longer names \
                             (closed or replaced after being added)"
                        ),
                    ));
                }
                out.epoll_watches.push(proto::EpollWatch {
                    fd: tfd,
                    events,
                    data,
                    ino,
                });
            }
        }
    }
    Ok(())
}

/// A timerfd's state. fdinfo shows 0 left for a periodic timer that expired and was not
/// read since (the kernel re-arms it lazily, on the next read or timerfd_gettime): read as
/// such it would come back disarmed. timerfd_gettime on a copy of the description moves it
/// on to its next expiry, counting the missed ones into its ticks, as the process's own next
/// read would; the ticks are read after that.
fn timer_fd(
    pid: i32,
    fd: i32,
    e: &procfs::EventInfo,
    no_clock: CheckpointError,
) -> Result<proto::TimerFd, CheckpointError> {
    let clockid = e.clockid.ok_or(no_clock)?;
    let copy = files::take_copy(pid, fd)?;
    let (value_ns, interval_ns) = files::timerfd_time(&copy, &format!("fd {fd} of PID {pid}"))?;
    let after = procfs::read_event_info(pid, fd)?;
    Ok(proto::TimerFd {
        clockid,
        ticks: after.ticks,
        value_ns,
        interval_ns,
        settime_flags: after.settime_flags,
    })
}

/// How the refusal of a listener with queued connections says so: the state the checkpoint
/// holds new connections and drains such queues to avoid (see crate::tcp::Hold).
pub(crate) const WAITING_TO_BE_ACCEPTED: &str = "connections waiting to be accepted";

/// Fills in `out` if fd `fd` is a listening TCP socket with no connection waiting to be
/// accepted (those would be lost); false for any other socket.
fn tcp_listener(
    pid: i32,
    fd: i32,
    copy: &OwnedFd,
    out: &mut proto::Fd,
) -> Result<bool, CheckpointError> {
    let Some(l) = inet::listener(copy, &format!("fd {fd} of PID {pid}"))? else {
        return Ok(false);
    };
    if l.waiting > 0 {
        return Err(CheckpointError::unsupported(
            pid,
            format!(
                "fd {fd} is a TCP listener on {} with {} {WAITING_TO_BE_ACCEPTED} (not \
                 supported yet; with --tcp-established new connections are held until its \
                 queue is empty)",
                l.addr, l.waiting
            ),
        ));
    }
    out.kind = FdKind::TcpListen as i32;
    out.tcp_listen = Some(proto::TcpListen {
        ip: l.addr.ip().to_string(),
        port: l.addr.port() as u32,
        ipv6: l.addr.is_ipv6(),
        backlog: l.backlog,
        options: Vec::new(),
    });
    Ok(true)
}

/// Fills in `out` if fd `fd` is a UDP socket with no datagram waiting (a datagram's source
/// could not be given back); false for any other socket.
fn udp_socket(
    pid: i32,
    fd: i32,
    copy: &OwnedFd,
    out: &mut proto::Fd,
) -> Result<bool, CheckpointError> {
    let Some(u) = inet::udp(copy, &format!("fd {fd} of PID {pid}"))? else {
        return Ok(false);
    };
    if u.queued > 0 {
        return Err(CheckpointError::unsupported(
            pid,
            format!(
                "fd {fd} is a UDP socket on {} with {} bytes of datagrams waiting to be read \
                 (not supported yet)",
                u.local, u.queued
            ),
        ));
    }
    out.kind = FdKind::Udp as i32;
    out.udp = Some(proto::UdpSocket {
        ip: u.local.ip().to_string(),
        port: u.local.port() as u32,
        peer_ip: u.peer.map(|p| p.ip().to_string()).unwrap_or_default(),
        peer_port: u.peer.map_or(0, |p| p.port() as u32),
        options: Vec::new(),
    });
    Ok(true)
}

/// Marks `out` as an established TCP connection with its addresses if it is one; it is
/// locked and read through TCP_REPAIR once the whole tree is collected (crate::tcp).
fn tcp_connection(ino: u64, copy: &OwnedFd, out: &mut proto::Fd) -> bool {
    if tcp_repair::state(copy) != Some(tcp_repair::STATE_ESTABLISHED) {
        return false;
    }
    let Some((local, peer)) = tcp_repair::endpoints(copy) else {
        return false;
    };
    out.kind = FdKind::TcpEstablished as i32;
    out.socket_id = ino;
    out.tcp = Some(proto::TcpConnection {
        ip: local.ip().to_string(),
        port: local.port() as u32,
        peer_ip: peer.ip().to_string(),
        peer_port: peer.port() as u32,
        ..Default::default()
    });
    true
}

/// Marks standard I/O fds open on the runtime's log file `(dev, ino)` as inherited.
pub fn inherit_log(procs: &mut [proto::Process], (dev, ino): (u64, u64)) {
    for f in procs.iter_mut().flat_map(|p| p.fds.iter_mut()) {
        let on_log = f
            .file
            .as_ref()
            .is_some_and(|id| id.dev == dev && id.ino == ino);
        if f.fd <= 2 && f.kind == FdKind::Regular as i32 && on_log {
            f.kind = FdKind::Inherited as i32;
            f.inherited_from = "container log".into();
            f.file = None;
            f.path.clear();
        }
    }
}

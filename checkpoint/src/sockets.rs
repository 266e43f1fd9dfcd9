//! What a socket carries beyond its kind and addresses, for every kind of socket the fds
//! module classifies: its options (runtime's sockopt table), its filter and the directions
//! shut down; the directory a unix socket bound to a relative name was bound in; and TCP
//! sockets that neither listen nor are connected.

use crate::error::CheckpointError;
use stasis_image::proto::{self, FdKind};
use stasis_runtime::unix_diag::UnixSocket;
use stasis_runtime::{inet, procfs, sock_diag, sockopt, tcp_repair};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

/// Records the options, filter and shutdown state of socket fd `fd` of process `pid`
/// (`copy` is this process's copy of it, `out` its classified record); `shutdown` is what
/// sock_diag reported for a unix socket (None: ask inet_diag). State that cannot be given
/// back is refused, naming the process, the fd and why.
pub fn save_state(
    pid: i32,
    fd: i32,
    copy: &OwnedFd,
    out: &mut proto::Fd,
    shutdown: Option<u8>,
) -> Result<(), CheckpointError> {
    let what = format!("fd {fd} of PID {pid}");
    let established = out.kind() == FdKind::TcpEstablished;
    let state = sockopt::read(pid, copy, established, &what)?;
    let kind = || inet::socket_kind(copy);
    if let Some(why) = state.refused.first() {
        return Err(CheckpointError::unsupported(
            pid,
            format!("fd {fd} is {}: {why}", kind()),
        ));
    }
    let shutdown = match shutdown {
        Some(s) => s,
        None => inet_shutdown(pid, copy, &what)?,
    };
    if shutdown != 0 && matches!(out.kind(), FdKind::TcpEstablished | FdKind::TcpListen) {
        return Err(CheckpointError::unsupported(
            pid,
            format!(
                "fd {fd} is {} shut down for {} (not supported yet)",
                kind(),
                directions(shutdown)
            ),
        ));
    }
    out.sock_options = state
        .options
        .into_iter()
        .map(|o| proto::SockOpt {
            level: o.level,
            name: o.name,
            value: o.value,
            data: o.data,
        })
        .collect();
    out.sock_filter = state.filter.map(|f| proto::SocketFilter {
        program: f.program,
        locked: f.locked,
    });
    out.sock_shutdown = shutdown as u32;
    Ok(())
}

fn directions(shutdown: u8) -> &'static str {
    match shutdown & 3 {
        1 => "reading",
        2 => "writing",
        _ => "reading and writing",
    }
}

/// sk_shutdown of TCP or UDP socket `copy`, from inet_diag.
fn inet_shutdown(pid: i32, copy: &OwnedFd, what: &str) -> Result<u8, CheckpointError> {
    let raw = copy.as_raw_fd();
    let get = |name| inet::get_int(raw, libc::SOL_SOCKET, name).unwrap_or(-1);
    let (domain, proto) = (get(libc::SO_DOMAIN), get(libc::SO_PROTOCOL));
    let ino = std::fs::metadata(format!("/proc/self/fd/{raw}"))
        .map_err(|e| CheckpointError::Io(format!("stat {what}"), e))?
        .ino();
    Ok(sock_diag::inet_shutdowns(pid, domain, proto)?
        .get(&ino)
        .copied()
        .unwrap_or(0))
}

/// Fills in `out` if `copy` is a TCP socket that neither listens nor is connected (state
/// CLOSE: made and maybe bound, not connected yet); false for any other socket.
pub fn tcp_socket(copy: &OwnedFd, out: &mut proto::Fd) -> bool {
    if tcp_repair::state(copy) != Some(7) {
        return false;
    }
    let raw = copy.as_raw_fd();
    let Some(local) = inet::local_address(raw) else {
        return false;
    };
    out.kind = FdKind::TcpSocket as i32;
    out.tcp_listen = Some(proto::TcpListen {
        ip: local.ip().to_string(),
        port: local.port() as u32,
        ipv6: local.is_ipv6(),
        backlog: 0,
        options: Vec::new(),
    });
    true
}

/// For a unix socket bound to a relative name: the directory it was bound in, found as
/// CRIU does, by looking for its socket file (its inode, from sock_diag) in the process's
/// working directory and then its root. None for other names. A relative name whose file
/// is in neither is refused: where to bind it again is unknown.
pub fn relative_dir(pid: i32, fd: i32, s: &UnixSocket) -> Result<Option<String>, CheckpointError> {
    use std::os::unix::ffi::OsStrExt;
    let name = s.name.split(|b| *b == 0).next().unwrap_or_default();
    if name.is_empty() || s.name[0] == 0 || name[0] == b'/' {
        return Ok(None);
    }
    let rel = std::path::Path::new(std::ffi::OsStr::from_bytes(name));
    let dev = s.vfs_dev as u64;
    let (major, minor) = ((dev >> 20) as u32, (dev & 0xfffff) as u32);
    for link in ["cwd", "root"] {
        let base = format!("/proc/{pid}/{link}");
        let Ok(m) = std::fs::symlink_metadata(std::path::Path::new(&base).join(rel)) else {
            continue;
        };
        if m.file_type().is_socket()
            && Some(m.ino()) == s.vfs_ino
            && m.dev() == libc::makedev(major, minor)
        {
            return Ok(Some(procfs::read_link(&base)?));
        }
    }
    Err(CheckpointError::unsupported(
        pid,
        format!(
            "fd {fd} is a unix socket bound to the relative name {:?}, whose socket file is in \
             neither the process's working directory nor its root (it changed directory \
             since, or the file was removed): where to bind it again is unknown",
            String::from_utf8_lossy(name)
        ),
    ))
}

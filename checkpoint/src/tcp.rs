//! Established TCP connections. [`crate::fds`] finds them; here, once every process is
//! collected, they are locked off the network, put into repair mode and read: sequence
//! numbers, queues, options and window. Only with `--tcp-established`: without it such a
//! connection is refused, since its peer would see it reset.

use crate::error::CheckpointError;
use stasis_image::proto::{self, FdKind};
use stasis_runtime::files;
use stasis_runtime::netlock::{self, Tuple};
use stasis_runtime::tcp_repair::{Connection, Repair};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// The tree's connections, in repair mode and locked, until the checkpoint ends.
pub struct Repaired {
    // Dropped in this order: repair mode is left while the lock still holds.
    sockets: Vec<Repair>,
    lock: netlock::Held,
}

impl Repaired {
    pub fn count(&self) -> usize {
        self.sockets.len()
    }

    /// The workload runs on: its connections leave repair mode, then are unlocked.
    pub fn release_running(self) {
        drop(self);
    }

    /// The workload was killed: its connections close without a word to the peer and stay
    /// locked until `stasis restore` rebuilds and unlocks them.
    pub fn release_killed(self) {
        let Repaired { sockets, lock } = self;
        for s in sockets {
            s.close_silently();
        }
        lock.keep();
    }
}

fn addr(ip: &str, port: u32) -> Option<SocketAddr> {
    Some(SocketAddr::new(
        ip.parse::<IpAddr>().ok()?,
        u16::try_from(port).ok()?,
    ))
}

/// The connection's two addresses, as classified.
fn tuple(t: &proto::TcpConnection) -> Option<Tuple> {
    Some((addr(&t.ip, t.port)?, addr(&t.peer_ip, t.peer_port)?))
}

fn to_proto(c: &Connection) -> proto::TcpConnection {
    let ip = |a: Option<SocketAddr>| a.map(|a| a.ip().to_string()).unwrap_or_default();
    let port = |a: Option<SocketAddr>| a.map_or(0, |a| a.port() as u32);
    proto::TcpConnection {
        ip: ip(c.local),
        port: port(c.local),
        peer_ip: ip(c.peer),
        peer_port: port(c.peer),
        send_seq: c.send_seq,
        recv_seq: c.recv_seq,
        send_queue: c.send_queue.clone(),
        unsent: c.unsent,
        recv_queue: c.recv_queue.clone(),
        mss: c.mss,
        wscale_ok: c.wscale.is_some(),
        snd_wscale: c.wscale.map_or(0, |w| w.0),
        rcv_wscale: c.wscale.map_or(0, |w| w.1),
        sack_ok: c.sack,
        timestamps_ok: c.timestamps,
        timestamp: c.timestamp,
        snd_wl1: c.window.snd_wl1,
        snd_wnd: c.window.snd_wnd,
        max_window: c.window.max_window,
        rcv_wnd: c.window.rcv_wnd,
        rcv_wup: c.window.rcv_wup,
        sndbuf: c.sndbuf,
        rcvbuf: c.rcvbuf,
        options: c
            .options
            .iter()
            .map(|&(level, name, value)| proto::SockOpt {
                level,
                name,
                value,
                data: Vec::new(),
            })
            .collect(),
    }
}

/// Locks and reads every established connection of the tree into its fd records (every fd
/// of one socket gets the same record). None if the tree has none.
pub fn repair(
    procs: &mut [proto::Process],
    allowed: bool,
) -> Result<Option<Repaired>, CheckpointError> {
    let mut sockets: BTreeMap<u64, Vec<(usize, usize)>> = BTreeMap::new();
    for (i, p) in procs.iter().enumerate() {
        for (j, f) in p.fds.iter().enumerate() {
            if f.kind() == FdKind::TcpEstablished {
                sockets.entry(f.socket_id).or_default().push((i, j));
            }
        }
    }
    let Some(&(i, j)) = sockets.values().flatten().next() else {
        return Ok(None);
    };
    let named = |i: usize, j: usize| {
        let f = &procs[i].fds[j];
        let t = f.tcp.clone().unwrap_or_default();
        (
            procs[i].pid as i32,
            format!(
                "fd {} is an established TCP connection {}:{} -> {}:{}",
                f.fd, t.ip, t.port, t.peer_ip, t.peer_port
            ),
        )
    };
    if !allowed {
        let (pid, what) = named(i, j);
        return Err(CheckpointError::unsupported(
            pid,
            format!(
                "{what}; its peer would see it reset. Checkpoint with --tcp-established to keep \
                 it (it is held behind a network lock and rebuilt with TCP_REPAIR)"
            ),
        ));
    }
    let mut tuples = Vec::with_capacity(sockets.len());
    for places in sockets.values() {
        let (i, j) = places[0];
        let t = procs[i].fds[j].tcp.as_ref().and_then(tuple);
        tuples.push(t.ok_or_else(|| {
            let (pid, what) = named(i, j);
            CheckpointError::unsupported(pid, format!("{what}, whose addresses are unreadable"))
        })?);
    }
    let lock = netlock::lock(&tuples)?;
    let mut repaired = Vec::with_capacity(sockets.len());
    for places in sockets.values() {
        let (i, j) = places[0];
        let (pid, fd) = (procs[i].pid as i32, procs[i].fds[j].fd as i32);
        let copy = files::take_copy(pid, fd)?;
        let r = Repair::on(copy, &format!("fd {fd} of PID {pid}"))?;
        let c = to_proto(&r.read()?);
        repaired.push(r);
        for &(i, j) in places {
            procs[i].fds[j].tcp = Some(c.clone());
        }
    }
    Ok(Some(Repaired {
        sockets: repaired,
        lock,
    }))
}

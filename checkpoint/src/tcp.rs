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

/// Most attempts at freezing a tree whose listeners all have empty queues.
const HOLD_ATTEMPTS: usize = 10;
/// How long to wait for the listeners' queues to drain before each attempt.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// New connections to the tree's TCP listeners, held back (their SYNs dropped by the network
/// lock, in the tree's network namespace) while the tree is frozen: a busy server's accept
/// queue drains and stays empty, so it is checkpointed every time without a client seeing an
/// error (a client's SYN is sent again a second or so later). Released when dropped, unless
/// [`Hold::keep`] leaves it for the restore.
pub struct Hold {
    root: i32,
    ports: Vec<u16>,
    /// The socket inodes of the tree's listeners.
    inodes: std::collections::BTreeSet<u64>,
    /// The tree's network namespace when it is not stasis's own.
    netns: Option<std::fs::File>,
    held: Option<netlock::Held>,
}

/// One line of /proc/PID/net/tcp{,6}: (state, local port, rx_queue, inode).
fn net_tcp(root: i32) -> Vec<(u8, u16, u64, u64)> {
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = files_text(&format!("/proc/{root}/net/{table}"));
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(queues), Some(inode)) =
                (f.get(1), f.get(3), f.get(4), f.get(9))
            else {
                continue;
            };
            let port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let rx = queues
                .split(':')
                .nth(1)
                .and_then(|q| u64::from_str_radix(q, 16).ok());
            if let (Ok(state), Some(port), Some(rx), Ok(inode)) =
                (u8::from_str_radix(state, 16), port, rx, inode.parse())
            {
                out.push((state, port, rx, inode));
            }
        }
    }
    out
}

fn files_text(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Socket inodes of every fd of `pids`.
fn socket_inodes(pids: &[i32]) -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    for p in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue;
        };
        for e in dir.flatten() {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok());
            out.extend(inode);
        }
    }
    out
}

const LISTEN: u8 = 0x0a;
const SYN_RECV: u8 = 0x03;

impl Hold {
    /// Holds new connections to every TCP listener of the tree of `root` (processes `pids`);
    /// None if it has none.
    pub fn start(root: i32, pids: &[i32]) -> Result<Option<Hold>, CheckpointError> {
        let sockets = socket_inodes(pids);
        let listeners: Vec<(u16, u64)> = net_tcp(root)
            .into_iter()
            .filter(|&(state, _, _, inode)| state == LISTEN && sockets.contains(&inode))
            .map(|(_, port, _, inode)| (port, inode))
            .collect();
        if listeners.is_empty() {
            return Ok(None);
        }
        let own = stasis_runtime::pidns::ns_id(std::process::id() as i32, "net")?;
        let theirs = stasis_runtime::pidns::ns_id(root, "net")
            .map_err(|e| CheckpointError::from_proc(root, e))?;
        let netns = if own == theirs {
            None
        } else {
            Some(stasis_runtime::sys::open_ns(root, "net")?)
        };
        let mut hold = Hold {
            root,
            ports: listeners.iter().map(|l| l.0).collect(),
            inodes: listeners.iter().map(|l| l.1).collect(),
            netns,
            held: None,
        };
        let _in = hold.enter()?;
        match netlock::hold(&hold.ports) {
            Ok(h) => hold.held = Some(h),
            // Without nft nothing is held (a listener with a queue is refused as before):
            // only established connections make the lock a requirement.
            Err(stasis_runtime::RuntimeError::Unsupported(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        Ok(Some(hold))
    }

    fn enter(&self) -> Result<Option<stasis_runtime::sys::InNetns>, CheckpointError> {
        Ok(match &self.netns {
            Some(ns) => Some(stasis_runtime::sys::InNetns::enter_file(
                ns,
                &format!("/proc/{}/ns/net", self.root),
            )?),
            None => None,
        })
    }

    /// The ports held.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// Whether no connection waits in a listener's accept queue and none is being set up
    /// (SYN-RECV) to a held port. With the tree frozen and new SYNs dropped, nothing can
    /// be added to them any more.
    pub fn drained(&self) -> bool {
        net_tcp(self.root).iter().all(|&(state, port, rx, inode)| {
            let queued = state == LISTEN && self.inodes.contains(&inode) && rx > 0;
            let coming = state == SYN_RECV && self.ports.contains(&port);
            !queued && !coming
        })
    }

    /// Waits (bounded) for [`Hold::drained`] while the tree runs.
    fn wait_drained(&self) {
        let deadline = std::time::Instant::now() + DRAIN_WAIT;
        while !self.drained() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// Freezes the tree of the root once its listeners have drained: a tree frozen with a
    /// connection still queued is resumed and tried again, a bounded number of times (the
    /// last frozen tree is returned; collecting it then refuses the queued connection).
    pub fn freeze_drained(
        &self,
        freeze: impl Fn() -> Result<crate::tree::FrozenTree, CheckpointError>,
    ) -> Result<crate::tree::FrozenTree, CheckpointError> {
        for _ in 1..HOLD_ATTEMPTS {
            self.wait_drained();
            let frozen = freeze()?;
            if self.drained() {
                return Ok(frozen);
            }
            drop(frozen); // resumed: let the server accept what is queued
        }
        self.wait_drained();
        freeze()
    }

    /// Leaves the ports held after this process is gone (the tree was killed; its restore
    /// lets new connections through once the listeners are back).
    pub fn keep(mut self) {
        if let Some(h) = self.held.take() {
            h.keep();
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(h) = self.held.take() {
            let _in = self.enter();
            drop(h);
        }
    }
}

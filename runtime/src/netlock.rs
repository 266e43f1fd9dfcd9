//! The network lock: while a workload's established TCP connections are checkpointed, killed
//! and restored, every packet of those connections is dropped in both directions, so the
//! peer's retransmissions meet nothing (no RST from a closed socket) and the socket state read
//! through TCP_REPAIR cannot change behind our back. The peer just sees a pause.
//!
//! The lock is a table `inet stasis` of nftables, holding one set of 4-tuples per family
//! matched at the input and output hooks (before conntrack). Locking adds a connection's
//! tuples in both directions; unlocking removes them. The table outlives this process: a
//! checkpoint that killed its workload leaves its connections locked until their restore.
//!
//! Every change stasis makes to the table is made under one file lock (see [`Serial`]), and
//! the last unlock removes the table once nothing is left in it. The lock is what makes that
//! removal safe: an nft transaction cannot say "delete the table if its sets are empty", so
//! the emptiness is read and the table deleted while no other stasis can add to it.

use crate::error::{Result, RuntimeError};
use crate::tool;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;

/// One TCP connection: its local and its peer's address.
pub type Tuple = (SocketAddr, SocketAddr);

const TABLE: &str = "inet stasis";

/// The sets and chains stasis makes in its table (anything else in it is somebody else's,
/// and keeps the table).
const SETS: [&str; 3] = ["conn4", "conn6", "hold"];
const CHAINS: [&str; 2] = ["lock_in", "lock_out"];

/// The file every stasis process locks (flock, exclusive) while it changes the table.
const SERIAL_PATH: &str = "/run/stasis-netlock.lock";

/// Changes to the table by one stasis at a time, across processes (and namespaces: the file
/// is one for the host).
struct Serial {
    _file: std::fs::File,
}

impl Serial {
    fn take() -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(SERIAL_PATH)
            .map_err(|e| RuntimeError::sys("open", SERIAL_PATH, e))?;
        loop {
            // SAFETY: flock on an fd we own; released when it is closed.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Serial { _file: f });
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(RuntimeError::sys("flock", SERIAL_PATH, e));
            }
        }
    }
}

/// Creates the table, its sets and chains if missing, and (re)writes the chains' rules; the
/// sets keep their elements. Idempotent.
fn preamble() -> String {
    let mut s = format!(
        "add table {TABLE}\n\
         add set {TABLE} conn4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}\n\
         add set {TABLE} conn6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; }}\n\
         add set {TABLE} hold {{ type inet_service; }}\n"
    );
    for (chain, hook) in [("lock_in", "input"), ("lock_out", "output")] {
        s.push_str(&format!(
            "add chain {TABLE} {chain} {{ type filter hook {hook} priority -300; policy accept; }}\n\
             flush chain {TABLE} {chain}\n\
             add rule {TABLE} {chain} ip saddr . tcp sport . ip daddr . tcp dport @conn4 drop\n\
             add rule {TABLE} {chain} ip6 saddr . tcp sport . ip6 daddr . tcp dport @conn6 drop\n"
        ));
    }
    // New connections to a held listener wait: their SYNs are dropped (the client sends
    // them again after a second or so) while the listener's queue drains.
    s.push_str(&format!(
        "add rule {TABLE} lock_in tcp dport @hold tcp flags & (syn | ack) == syn drop\n"
    ));
    s
}

/// `add element ...` / `delete element ...` lines for held listener ports, each once.
fn hold_elements(verb: &str, ports: &[u16]) -> String {
    let ports: BTreeSet<u16> = ports.iter().copied().collect();
    ports
        .iter()
        .map(|p| format!("{verb} element {TABLE} hold {{ {p} }}\n"))
        .collect()
}

/// An IPv4 address written as IPv4-mapped IPv6 travels as IPv4.
fn wire(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// `add element ...` / `delete element ...` lines for both directions of each connection,
/// each element once: the two ends of a connection whose both ends are in the tree (client
/// and server on loopback) give the same two elements, and deleting one element twice in a
/// transaction fails all of it.
fn elements(verb: &str, conns: &[Tuple]) -> String {
    let mut seen = BTreeSet::new();
    let mut s = String::new();
    for &(local, peer) in conns {
        let (l, p) = (wire(local), wire(peer));
        let set = if l.is_ipv4() { "conn4" } else { "conn6" };
        for (a, b) in [(l, p), (p, l)] {
            if !seen.insert((a, b)) {
                continue;
            }
            s.push_str(&format!(
                "{verb} element {TABLE} {set} {{ {} . {} . {} . {} }}\n",
                a.ip(),
                a.port(),
                b.ip(),
                b.port()
            ));
        }
    }
    s
}

/// Whether a listing of the table (`nft list table inet stasis`) shows nothing but stasis's
/// own sets and chains, with no element in any set.
fn only_empty_ours(listing: &str) -> bool {
    listing.lines().map(str::trim).all(|l| {
        let name = |kind: &str| {
            l.strip_prefix(kind)
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_string)
        };
        if l.starts_with("elements") {
            return false;
        }
        match (
            name("set "),
            name("chain "),
            name("map "),
            name("flowtable "),
        ) {
            (Some(set), ..) => SETS.contains(&set.as_str()),
            (_, Some(chain), ..) => CHAINS.contains(&chain.as_str()),
            (_, _, None, None) => true,
            _ => false,
        }
    })
}

/// Deletes the table if nothing is left in it (no connection locked, nothing of anybody
/// else's). Only with [`Serial`] held.
fn remove_if_empty(_serial: &Serial) -> Result<()> {
    let listing = tool::run(
        Command::new("nft").args(["list", "table", "inet", "stasis"]),
        None,
        "reading the network lock's table",
        "the network lock needs nft (Debian package nftables)",
    );
    let Ok(listing) = listing else {
        return Ok(()); // no table (removed by another stasis meanwhile)
    };
    if only_empty_ours(&String::from_utf8_lossy(&listing)) {
        nft(
            &format!("delete table {TABLE}\n"),
            "removing the network lock's table",
        )?;
    }
    Ok(())
}

/// Runs an nft script as one transaction (all of it or nothing).
fn nft(script: &str, what: &str) -> Result<()> {
    let needs = "the network lock needs nft (Debian package nftables)";
    tool::run(
        Command::new("nft").args(["-f", "-"]),
        Some(script),
        what,
        needs,
    )
    .map(drop)
}

/// Connections locked by [`lock`] (or listener ports held by [`hold`]): unlocked when
/// dropped, unless [`Held::keep`] leaves them locked for their restore.
#[must_use = "dropping the lock unlocks the connections at once"]
pub struct Held(Vec<Tuple>, Vec<u16>);

impl Held {
    /// Leaves the connections locked after this process is gone (their workload was killed;
    /// `stasis restore` unlocks them).
    pub fn keep(mut self) {
        self.0.clear();
        self.1.clear();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Best effort: the workload runs on either way; a lock left behind is named in the
        // nft table `inet stasis` for the operator.
        let _ = unlock_all(&self.0, &self.1);
    }
}

/// Drops every packet of `conns` from now on, in both directions.
pub fn lock(conns: &[Tuple]) -> Result<Held> {
    if !conns.is_empty() {
        let _serial = Serial::take()?;
        nft(
            &(preamble() + &elements("add", conns)),
            "locking the network",
        )?;
    }
    Ok(Held(conns.to_vec(), Vec::new()))
}

/// Holds new connections to the TCP listeners on `ports` from now on: their SYNs are
/// dropped, so a client waits (and retransmits) instead of being refused or queued.
pub fn hold(ports: &[u16]) -> Result<Held> {
    if !ports.is_empty() {
        let _serial = Serial::take()?;
        nft(
            &(preamble() + &hold_elements("add", ports)),
            "holding new connections to listeners",
        )?;
    }
    Ok(Held(Vec::new(), ports.to_vec()))
}

/// Lets the packets of `conns` pass again (connections that were not locked are fine), and
/// removes the table if that was the last lock in it.
pub fn unlock(conns: &[Tuple]) -> Result<()> {
    unlock_all(conns, &[])
}

/// [`unlock`] `conns` and let new connections to the listeners on `ports` through again.
pub fn unlock_all(conns: &[Tuple], ports: &[u16]) -> Result<()> {
    if conns.is_empty() && ports.is_empty() {
        return Ok(());
    }
    let serial = Serial::take()?;
    // Adding before deleting, in one transaction, makes deleting an absent element harmless.
    let script = preamble()
        + &elements("add", conns)
        + &hold_elements("add", ports)
        + &elements("delete", conns)
        + &hold_elements("delete", ports);
    nft(&script, "unlocking the network")?;
    remove_if_empty(&serial)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_cover_both_directions_and_unmap_ipv4() {
        let l: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        let p: SocketAddr = "127.0.0.1:4711".parse().unwrap();
        let s = elements("add", &[(l, p)]);
        assert_eq!(
            s,
            "add element inet stasis conn4 { 127.0.0.1 . 80 . 127.0.0.1 . 4711 }\n\
             add element inet stasis conn4 { 127.0.0.1 . 4711 . 127.0.0.1 . 80 }\n"
        );
        let l6: SocketAddr = "[::1]:80".parse().unwrap();
        let p6: SocketAddr = "[::1]:9".parse().unwrap();
        assert!(elements("delete", &[(l6, p6)])
            .contains("delete element inet stasis conn6 { ::1 . 80 . ::1 . 9 }"));
    }

    #[test]
    fn both_ends_of_one_connection_give_each_element_once() {
        let a: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "[::ffff:127.0.0.1]:4711".parse().unwrap();
        let s = elements("delete", &[(a, b), (b, a), (a, b)]);
        assert_eq!(s.lines().count(), 2, "{s}");
    }

    #[test]
    fn only_an_empty_table_of_ours_is_removed() {
        let empty = "table inet stasis {\n\tset conn4 {\n\t\ttype ipv4_addr . inet_service\n\t}\n\
                     \tchain lock_in {\n\t\ttype filter hook input priority -300; policy accept;\n\
                     \t\tip saddr . tcp sport . ip daddr . tcp dport @conn4 drop\n\t}\n}\n";
        assert!(only_empty_ours(empty));
        let held = empty.replace(
            "inet_service\n",
            "inet_service\n\t\telements = { 127.0.0.1 . 80 . 127.0.0.1 . 9 }\n",
        );
        assert!(!only_empty_ours(&held));
        let theirs = empty.replace("chain lock_in", "chain mine");
        assert!(!only_empty_ours(&theirs));
    }
}

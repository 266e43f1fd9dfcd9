//! The network lock: while a workload's established TCP connections are checkpointed, killed
//! and restored, every packet of those connections is dropped in both directions, so the
//! peer's retransmissions meet nothing (no RST from a closed socket) and the socket state read
//! through TCP_REPAIR cannot change behind our back. The peer just sees a pause.
//!
//! The lock is a table `inet stasis` of nftables, holding one set of 4-tuples per family
//! matched at the input and output hooks (before conntrack). Locking adds a connection's
//! tuples in both directions; unlocking removes them. The table outlives this process: a
//! checkpoint that killed its workload leaves its connections locked until their restore.

use crate::error::Result;
use crate::tool;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

/// One TCP connection: its local and its peer's address.
pub type Tuple = (SocketAddr, SocketAddr);

const TABLE: &str = "inet stasis";

/// Creates the table, its sets and chains if missing, and (re)writes the chains' rules; the
/// sets keep their elements. Idempotent.
fn preamble() -> String {
    let mut s = format!(
        "add table {TABLE}\n\
         add set {TABLE} conn4 {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}\n\
         add set {TABLE} conn6 {{ type ipv6_addr . inet_service . ipv6_addr . inet_service; }}\n"
    );
    for (chain, hook) in [("lock_in", "input"), ("lock_out", "output")] {
        s.push_str(&format!(
            "add chain {TABLE} {chain} {{ type filter hook {hook} priority -300; policy accept; }}\n\
             flush chain {TABLE} {chain}\n\
             add rule {TABLE} {chain} ip saddr . tcp sport . ip daddr . tcp dport @conn4 drop\n\
             add rule {TABLE} {chain} ip6 saddr . tcp sport . ip6 daddr . tcp dport @conn6 drop\n"
        ));
    }
    s
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

/// `add element ...` / `delete element ...` lines for both directions of each connection.
fn elements(verb: &str, conns: &[Tuple]) -> String {
    let mut s = String::new();
    for &(local, peer) in conns {
        let (l, p) = (wire(local), wire(peer));
        let set = if l.is_ipv4() { "conn4" } else { "conn6" };
        for (a, b) in [(l, p), (p, l)] {
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

/// Connections locked by [`lock`]: unlocked when dropped, unless [`Held::keep`] leaves them
/// locked for their restore.
#[must_use = "dropping the lock unlocks the connections at once"]
pub struct Held(Vec<Tuple>);

impl Held {
    /// Leaves the connections locked after this process is gone (their workload was killed;
    /// `stasis restore` unlocks them).
    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Best effort: the workload runs on either way; a lock left behind is named in the
        // nft table `inet stasis` for the operator.
        let _ = unlock(&self.0);
    }
}

/// Drops every packet of `conns` from now on, in both directions.
pub fn lock(conns: &[Tuple]) -> Result<Held> {
    if !conns.is_empty() {
        nft(
            &(preamble() + &elements("add", conns)),
            "locking the network",
        )?;
    }
    Ok(Held(conns.to_vec()))
}

/// Lets the packets of `conns` pass again. Connections that were not locked are fine.
pub fn unlock(conns: &[Tuple]) -> Result<()> {
    if conns.is_empty() {
        return Ok(());
    }
    // Adding before deleting, in one transaction, makes deleting an absent element harmless.
    let script = preamble() + &elements("add", conns) + &elements("delete", conns);
    nft(&script, "unlocking the network")
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
}

//! Container networking: a container's own network namespace, joined to the host by a veth
//! pair into a stasis bridge, and its configuration saved and rebuilt across checkpoint and
//! restore.
//!
//! - `--net bridge`: [`ensure_bridge`] makes the bridge (default [`Bridge::default`]: `stasis0`,
//!   gateway 10.88.0.1/16) and [`attach`] joins a container to it at its own address
//!   ([`allocate_ip`] picks one), so a service inside is reachable from the host and from the
//!   other containers on the bridge.
//! - `--net none`: [`lo_up`] brings up only the loopback interface.
//! - Checkpoint: [`capture`] reads the namespace's interfaces, addresses and routes into a
//!   [`NetConfig`]; restore: [`recreate`] rebuilds it in a fresh namespace, at the same
//!   address with the same MAC.
//!
//! Everything is done by iproute2's `ip`, run as a child process (see `ip.rs` for how it is
//! run inside a namespace given only a PID in it); a namespace is always named by a process
//! in it, which the caller keeps alive (and unreaped) while calling in here.
//!
//! What stasis does not do to the host: it enables no IP forwarding, adds no NAT and no
//! firewall rule. Host ↔ container traffic goes over the bridge's own address and
//! container ↔ container traffic is bridged, so neither needs forwarding. But where
//! br_netfilter is active (`net.bridge.bridge-nf-call-iptables = 1`), bridged IPv4 traffic
//! also passes the host's iptables/nftables FORWARD chains, and a host whose FORWARD policy is
//! drop (Docker sets that) drops traffic between containers. [`ensure_bridge`] looks for such
//! filtering and reports it in [`BridgeStatus::filtering`], for the operator to allow; it does
//! not change the host's policy. Reaching the outside world from a container (forwarding and
//! NAT) is not provided.

mod config;
mod filter;
mod ip;

pub use config::{
    capture, recreate, Cidr, IfAddr, Interface, InterfaceKind, NetConfig, Route, NET_CONFIG_VERSION,
};

use crate::error::{Result, RuntimeError};
use ip::Ns;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The name a container's interface has inside its namespace.
pub const CONTAINER_IFNAME: &str = "eth0";

/// A bridge on the host that containers' veth pairs are joined to, and the IPv4 subnet on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bridge {
    /// Interface name on the host, at most 15 bytes.
    pub name: String,
    /// The bridge's own address: containers' default gateway, and how the host reaches them.
    pub gateway: Ipv4Addr,
    /// Prefix length of the subnet (1-30).
    pub prefix: u8,
}

impl Default for Bridge {
    /// `stasis0`, 10.88.0.1/16.
    fn default() -> Self {
        Bridge {
            name: "stasis0".to_string(),
            gateway: Ipv4Addr::new(10, 88, 0, 1),
            prefix: 16,
        }
    }
}

impl Bridge {
    /// The subnet mask.
    fn mask(&self) -> u32 {
        mask(self.prefix)
    }

    /// The subnet's network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) & self.mask())
    }

    /// The subnet's broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) | !self.mask())
    }

    /// Whether `addr` may be a container's address here: in the subnet, and neither its
    /// network nor its broadcast address nor the gateway.
    pub fn is_host_addr(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.network())
            && addr != self.network()
            && addr != self.broadcast()
            && addr != self.gateway
    }

    /// Refuses a bridge whose name or subnet cannot work.
    fn check(&self) -> Result<()> {
        ip::check_ifname(&self.name)?;
        if !(1..=30).contains(&self.prefix) {
            return Err(RuntimeError::Unsupported(format!(
                "bridge {}: prefix /{} leaves no room for containers (1-30)",
                self.name, self.prefix
            )));
        }
        if self.gateway == self.network() || self.gateway == self.broadcast() {
            return Err(RuntimeError::Unsupported(format!(
                "bridge {}: gateway {} is the subnet's network or broadcast address",
                self.name, self.gateway
            )));
        }
        Ok(())
    }

    /// A fixed MAC for the bridge, derived from its name. A bridge whose address was never set
    /// takes the lowest MAC of its ports and so changes as containers come and go, leaving
    /// containers' ARP caches pointing at a MAC that is gone; a set one never changes.
    fn mac(&self) -> MacAddr {
        let h = fnv1a(self.name.as_bytes()).to_be_bytes();
        MacAddr([0x02, h[0], h[1], h[2], h[3], h[4]])
    }
}

/// The subnet mask of a prefix length (0-32).
fn mask(prefix: u8) -> u32 {
    match prefix {
        0 => 0,
        p => u32::MAX << (32 - u32::from(p.min(32))),
    }
}

/// A MAC address; written and parsed as `02:42:0a:58:00:02`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The MAC a container gets when none is asked for: 02:42 and the four bytes of its IPv4
    /// address (locally administered, unicast). A container's address then always comes with
    /// the same MAC, so the neighbours' ARP caches stay right when it is restarted or restored.
    pub fn for_ipv4(addr: Ipv4Addr) -> MacAddr {
        let [a, b, c, d] = addr.octets();
        MacAddr([0x02, 0x42, a, b, c, d])
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in out.iter_mut() {
            let part = parts
                .next()
                .filter(|p| p.len() == 2)
                .ok_or_else(|| format!("{s:?} is not a MAC address"))?;
            *byte =
                u8::from_str_radix(part, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address"));
        }
        Ok(MacAddr(out))
    }
}

/// Serde through the type's text form: `#[serde(try_from = "String", into = "String")]`
/// needs these two conversions, which are its `FromStr` and `Display`.
macro_rules! serde_as_string {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> std::result::Result<Self, String> {
                s.parse()
            }
        }

        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.to_string()
            }
        }
    };
}
pub(crate) use serde_as_string;

serde_as_string!(MacAddr);

/// 64-bit FNV-1a: a hash that is the same in every build and every run (std's hashers do not
/// promise that), for names derived from names.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The host-side veth name of the container named `container`: "vst" and 12 hex digits of a
/// 64-bit FNV-1a hash of the name, 15 bytes (the kernel's limit). The same container always
/// gets the same name, so a restore finds (and [`detach`] removes) what an earlier run left;
/// two containers collide only if 48 bits of their hashes do, and then the second
/// [`attach`] fails with "File exists" naming the interface rather than taking over the first's.
pub fn veth_name(container: &str) -> String {
    format!("vst{:012x}", fnv1a(container.as_bytes()) >> 16)
}

/// The first address after the bridge's gateway (wrapping round to the start of the subnet)
/// that is not in `used` and may be a container's. The caller keeps `used` (the addresses of
/// its containers on this bridge) and serializes allocations, e.g. under a lock file.
pub fn allocate_ip(bridge: &Bridge, used: &[Ipv4Addr]) -> Result<Ipv4Addr> {
    bridge.check()?;
    let start = u32::from(bridge.gateway);
    let (first, last) = (u32::from(bridge.network()), u32::from(bridge.broadcast()));
    let size = last - first + 1;
    (1..size)
        .map(|i| Ipv4Addr::from(first + (start - first + i) % size))
        .find(|a| bridge.is_host_addr(*a) && !used.contains(a))
        .ok_or_else(|| {
            RuntimeError::Unsupported(format!(
                "no free address left in {}/{} on bridge {}",
                bridge.network(),
                bridge.prefix,
                bridge.name
            ))
        })
}

/// What [`ensure_bridge`] did and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BridgeStatus {
    /// This call created the bridge (rather than finding it).
    pub created: bool,
    /// Host firewall settings that filter the bridge's traffic, one sentence each, for the
    /// operator: stasis does not change them. Empty when nothing was found.
    pub filtering: Vec<String>,
}

/// Makes sure the bridge exists, has its gateway address and is up. Idempotent, and safe when
/// two callers race: a creation that fails because the other caller just created the bridge
/// counts as success. An existing interface of that name that is not a bridge is an error.
pub fn ensure_bridge(bridge: &Bridge) -> Result<BridgeStatus> {
    bridge.check()?;
    let what = format!("setting up bridge {}", bridge.name);
    let mut created = false;
    match ip::link(Ns::Host, &bridge.name, &what)? {
        Some(link) => check_is_bridge(&link, bridge)?,
        None => {
            let mac = bridge.mac().to_string();
            let made = ip::run(
                Ns::Host,
                &[
                    "link",
                    "add",
                    &bridge.name,
                    "address",
                    &mac,
                    "type",
                    "bridge",
                ],
                None,
                &what,
            );
            match made {
                Ok(_) => created = true,
                // Lost a race to another caller? Then the bridge is there now.
                Err(e) => match ip::link(Ns::Host, &bridge.name, &what)? {
                    Some(link) => check_is_bridge(&link, bridge)?,
                    None => return Err(e),
                },
            }
        }
    }
    let gateway = format!("{}/{}", bridge.gateway, bridge.prefix);
    ip::batch(
        Ns::Host,
        &[
            format!("addr replace {gateway} brd + dev {}", bridge.name),
            format!("link set {} up", bridge.name),
        ],
        &what,
    )?;
    Ok(BridgeStatus {
        created,
        filtering: filter::forward_filtering(bridge)?,
    })
}

fn check_is_bridge(link: &ip::Link, bridge: &Bridge) -> Result<()> {
    match link.kind() {
        "bridge" => Ok(()),
        kind => Err(RuntimeError::Unsupported(format!(
            "{} exists on the host and is a {kind}, not a bridge",
            bridge.name
        ))),
    }
}

/// A container's veth pair, as [`attach`] made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Veth {
    /// The host end, a port of the bridge.
    pub host_name: String,
    /// The container end, inside its namespace ([`CONTAINER_IFNAME`]).
    pub peer_name: String,
    pub addr: Ipv4Addr,
    pub prefix: u8,
    /// The container end's MAC.
    pub mac: MacAddr,
}

/// The host end of a veth pair being set up: removed again unless [`HostEnd::keep`] is called,
/// so a failure half-way leaves nothing on the host (the peer goes with it).
struct HostEnd<'a>(Option<&'a str>);

impl HostEnd<'_> {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for HostEnd<'_> {
    fn drop(&mut self) {
        if let Some(name) = self.0 {
            // Best effort: the error being returned says what failed first.
            let _ = detach(name);
        }
    }
}

/// Creates the veth pair `host_name` ↔ `peer_name`, the peer made directly inside the
/// namespace of `netns_pid` (so no temporary name is ever seen on the host) with `mac` and,
/// if given, `mtu` on both ends; the host end joins the bridge and goes up.
fn create_veth<'a>(
    bridge: &Bridge,
    netns_pid: i32,
    host_name: &'a str,
    peer_name: &str,
    mac: MacAddr,
    mtu: Option<u32>,
) -> Result<HostEnd<'a>> {
    ip::check_ifname(host_name)?;
    ip::check_ifname(peer_name)?;
    let what = format!("creating veth {host_name} for {peer_name} of pid {netns_pid}");
    // Refused here, not by ip: `link add` must not get as far as the other namespace.
    ip::open_netns(netns_pid)?;
    let (mac, ns, mtu) = (
        mac.to_string(),
        ip::ns_path(netns_pid),
        mtu.map(|m| m.to_string()),
    );
    let mut args = vec!["link", "add", host_name];
    if let Some(m) = &mtu {
        args.extend(["mtu", m]);
    }
    args.extend(["type", "veth", "peer", "name", peer_name, "address", &mac]);
    if let Some(m) = &mtu {
        args.extend(["mtu", m]);
    }
    args.extend(["netns", &ns]);
    ip::run(Ns::Host, &args, None, &what)?;
    let end = HostEnd(Some(host_name));
    ip::run(
        Ns::Host,
        &["link", "set", host_name, "master", &bridge.name, "up"],
        None,
        &what,
    )?;
    Ok(end)
}

/// Joins the namespace of `netns_pid` to the bridge: a veth pair whose host end
/// (`veth_host_name`, see [`veth_name`]) is a port of the bridge, up, and whose other end is
/// `eth0` inside, with `addr/prefix`, the MAC `mac` (default [`MacAddr::for_ipv4`]), up; `lo`
/// up; a default route via the bridge's gateway. The bridge must exist ([`ensure_bridge`]).
/// On failure nothing is left on the host.
pub fn attach(
    bridge: &Bridge,
    netns_pid: i32,
    veth_host_name: &str,
    addr: Ipv4Addr,
    prefix: u8,
    mac: Option<MacAddr>,
) -> Result<Veth> {
    bridge.check()?;
    let mask = mask(prefix);
    if !(1..=30).contains(&prefix)
        || u32::from(addr) & mask != u32::from(bridge.gateway) & mask
        || !bridge.is_host_addr(addr)
    {
        return Err(RuntimeError::Unsupported(format!(
            "{addr}/{prefix} cannot be a container's address on bridge {} ({}/{}, gateway {})",
            bridge.name,
            bridge.network(),
            bridge.prefix,
            bridge.gateway
        )));
    }
    let mac = mac.unwrap_or_else(|| MacAddr::for_ipv4(addr));
    let end = create_veth(
        bridge,
        netns_pid,
        veth_host_name,
        CONTAINER_IFNAME,
        mac,
        None,
    )?;
    let dev = CONTAINER_IFNAME;
    ip::batch(
        Ns::Of(netns_pid),
        &[
            "link set lo up".to_string(),
            format!("addr add {addr}/{prefix} brd + dev {dev}"),
            format!("link set {dev} up"),
            format!("route add default via {} dev {dev}", bridge.gateway),
        ],
        &format!("configuring {dev} of veth {veth_host_name}"),
    )?;
    end.keep();
    Ok(Veth {
        host_name: veth_host_name.to_string(),
        peer_name: dev.to_string(),
        addr,
        prefix,
        mac,
    })
}

/// Removes the host end of a veth pair (and so its peer) if it still exists. Deleting a
/// container's namespace removes the pair too, but the kernel does that asynchronously, a
/// little after the last process in it is gone: before its name is used again, detach it.
pub fn detach(veth_host_name: &str) -> Result<()> {
    ip::check_ifname(veth_host_name)?;
    let what = format!("removing veth {veth_host_name}");
    let Some(link) = ip::link(Ns::Host, veth_host_name, &what)? else {
        return Ok(());
    };
    if link.kind() != "veth" {
        return Err(RuntimeError::Unsupported(format!(
            "{veth_host_name} is a {}, not a veth: not removing it",
            link.kind()
        )));
    }
    match ip::run(Ns::Host, &["link", "del", veth_host_name], None, &what) {
        Ok(_) => Ok(()),
        // Gone meanwhile (its namespace was just cleaned up): what was wanted.
        Err(e) => match ip::link(Ns::Host, veth_host_name, &what)? {
            None => Ok(()),
            Some(_) => Err(e),
        },
    }
}

/// `--net none`: brings up `lo` (and nothing else) in the namespace of `netns_pid`.
pub fn lo_up(netns_pid: i32) -> Result<()> {
    ip::run(
        Ns::Of(netns_pid),
        &["link", "set", "lo", "up"],
        None,
        "bringing up lo",
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn br(gw: [u8; 4], prefix: u8) -> Bridge {
        Bridge {
            name: "stt".into(),
            gateway: Ipv4Addr::from(gw),
            prefix,
        }
    }

    #[test]
    fn veth_names_are_deterministic_distinct_and_fit() {
        let a = veth_name("web");
        assert_eq!(a, veth_name("web"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("vst") && a[3..].chars().all(|c| c.is_ascii_hexdigit()));
        assert!(ip::check_ifname(&a).is_ok());
        let names: std::collections::HashSet<_> =
            (0..10_000).map(|i| veth_name(&format!("c{i}"))).collect();
        assert_eq!(names.len(), 10_000);
        assert_ne!(
            veth_name(""),
            veth_name("a very long container name indeed")
        );
        // Pinned: a name must not change between builds, or restores lose their veth.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn allocation_starts_after_the_gateway_and_skips_used() {
        let b = Bridge::default();
        assert_eq!(allocate_ip(&b, &[]).unwrap(), Ipv4Addr::new(10, 88, 0, 2));
        let used = [Ipv4Addr::new(10, 88, 0, 2), Ipv4Addr::new(10, 88, 0, 3)];
        assert_eq!(allocate_ip(&b, &used).unwrap(), Ipv4Addr::new(10, 88, 0, 4));
        // A /30 has two host addresses: the gateway and one more.
        let tiny = br([10, 9, 0, 1], 30);
        assert_eq!(allocate_ip(&tiny, &[]).unwrap(), Ipv4Addr::new(10, 9, 0, 2));
        assert!(allocate_ip(&tiny, &[Ipv4Addr::new(10, 9, 0, 2)]).is_err());
        // A gateway at the top of the subnet wraps round to its start.
        let top = br([10, 9, 0, 254], 24);
        assert_eq!(allocate_ip(&top, &[]).unwrap(), Ipv4Addr::new(10, 9, 0, 1));
    }

    #[test]
    fn allocation_fills_a_subnet_exactly() {
        let b = br([192, 168, 5, 1], 28);
        let mut used = Vec::new();
        while let Ok(a) = allocate_ip(&b, &used) {
            assert!(b.is_host_addr(a), "{a}");
            used.push(a);
        }
        // 16 addresses less network, broadcast and gateway.
        assert_eq!(used.len(), 13);
    }

    #[test]
    fn bad_bridges_are_refused() {
        assert!(allocate_ip(&br([10, 0, 0, 1], 31), &[]).is_err());
        assert!(allocate_ip(&br([10, 0, 0, 0], 24), &[]).is_err());
        assert!(allocate_ip(&br([10, 0, 0, 255], 24), &[]).is_err());
        let long = Bridge {
            name: "a-name-too-long-for-linux".into(),
            ..Bridge::default()
        };
        assert!(allocate_ip(&long, &[]).is_err());
    }

    #[test]
    fn subnet_arithmetic() {
        let b = Bridge::default();
        assert_eq!(b.network(), Ipv4Addr::new(10, 88, 0, 0));
        assert_eq!(b.broadcast(), Ipv4Addr::new(10, 88, 255, 255));
        assert!(b.is_host_addr(Ipv4Addr::new(10, 88, 3, 4)));
        assert!(!b.is_host_addr(Ipv4Addr::new(10, 89, 0, 2)));
        assert!(!b.is_host_addr(b.gateway));
        assert_eq!(mask(0), 0);
        assert_eq!(mask(32), u32::MAX);
    }

    #[test]
    fn mac_addresses() {
        let m: MacAddr = "02:42:0A:58:00:02".parse().unwrap();
        assert_eq!(m, MacAddr::for_ipv4(Ipv4Addr::new(10, 88, 0, 2)));
        assert_eq!(m.to_string(), "02:42:0a:58:00:02");
        for bad in [
            "",
            "02:42:0a:58:00",
            "02:42:0a:58:00:02:03",
            "2:42:0a:58:00:02",
            "zz:42:0a:58:00:02",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, "\"02:42:0a:58:00:02\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), m);
        assert!(serde_json::from_str::<MacAddr>("\"nope\"").is_err());
        // The bridge's own MAC is locally administered and unicast.
        let bm = Bridge::default().mac().0[0];
        assert_eq!(bm & 0b11, 0b10);
    }
}

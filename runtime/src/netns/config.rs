//! A network namespace's configuration: read from a live namespace at checkpoint
//! ([`capture`]) and rebuilt in a fresh one at restore ([`recreate`]).

use super::ip::{self, Link, Ns, RouteEntry};
use super::{create_veth, serde_as_string, Bridge, MacAddr};
use crate::error::{Result, RuntimeError};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

/// Version of the [`NetConfig`] layout; [`recreate`] refuses others. Fields are only ever
/// added (with serde defaults), and then this need not change.
pub const NET_CONFIG_VERSION: u32 = 1;

/// The configuration of a network namespace: its interfaces, their addresses, and the routes
/// of its main table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// [`NET_CONFIG_VERSION`] when written.
    pub version: u32,
    pub interfaces: Vec<Interface>,
    /// Routes of table main, IPv4 then IPv6, in `ip route` order.
    pub routes: Vec<Route>,
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    pub kind: InterfaceKind,
    /// Link-layer address, if it has a MAC-shaped one (tunnels, for one, do not).
    pub mac: Option<MacAddr>,
    pub mtu: u32,
    /// Administratively up.
    pub up: bool,
    /// Its addresses, IPv4 and IPv6, in `ip addr` order (primary first).
    pub addresses: Vec<IfAddr>,
}

/// What an interface is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InterfaceKind {
    Loopback,
    Veth,
    /// Anything else, by the kind `ip -d link` gives it (bridge, dummy, ipip, ether, ...).
    Other(String),
}

impl fmt::Display for InterfaceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterfaceKind::Loopback => f.write_str("loopback"),
            InterfaceKind::Veth => f.write_str("veth"),
            InterfaceKind::Other(k) => f.write_str(k),
        }
    }
}

/// An address of an interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IfAddr {
    /// The address and its prefix length, e.g. 10.88.0.2/16.
    pub local: Cidr,
    /// The IPv4 broadcast address, if one is set.
    pub broadcast: Option<Ipv4Addr>,
}

/// An IP address with a prefix length: `10.88.0.2/16`, `fd00::1/64`, `0.0.0.0/0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    fn max_len(addr: IpAddr) -> u8 {
        if addr.is_ipv4() {
            32
        } else {
            128
        }
    }

    /// The default route's destination of `addr`'s family.
    fn any(v6: bool) -> Cidr {
        let addr = if v6 {
            IpAddr::from([0u16; 8])
        } else {
            IpAddr::from([0u8; 4])
        };
        Cidr { addr, len: 0 }
    }

    /// Parses `ip`'s way of writing a destination: `default`, `a.b.c.d/len`, or a bare
    /// address (a host route).
    fn parse_dst(s: &str, v6: bool) -> std::result::Result<Cidr, String> {
        let c = match s {
            "default" => Cidr::any(v6),
            s if s.contains('/') => s.parse()?,
            s => {
                let addr: IpAddr = s.parse().map_err(|_| format!("{s:?} is not an address"))?;
                Cidr {
                    addr,
                    len: Cidr::max_len(addr),
                }
            }
        };
        if c.addr.is_ipv6() != v6 {
            return Err(format!("{s:?} is not of the family asked for"));
        }
        Ok(c)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("{s:?} is not ADDRESS/PREFIX");
        let (a, l) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        if len > Cidr::max_len(addr) {
            return Err(bad());
        }
        Ok(Cidr { addr, len })
    }
}

serde_as_string!(Cidr);

/// A route of the main table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Route type: unicast, blackhole, unreachable, prohibit, ...
    pub kind: String,
    /// Destination; a default route is 0.0.0.0/0 or ::/0.
    pub dst: Cidr,
    pub gateway: Option<IpAddr>,
    pub dev: Option<String>,
    /// Who made it; `None` is `boot` (what `ip route add` makes), `kernel` ones are made by
    /// the kernel itself from addresses and are not recreated.
    pub protocol: Option<String>,
    pub scope: Option<String>,
    pub metric: Option<u32>,
    /// Preferred source address.
    pub prefsrc: Option<IpAddr>,
    /// The gateway is taken to be on the link even if no route says so.
    #[serde(default)]
    pub onlink: bool,
}

impl Route {
    fn made_by_kernel(&self) -> bool {
        self.protocol.as_deref() == Some("kernel")
    }
}

fn parse_ip<T: FromStr>(what: &str, s: &str, source: &str) -> Result<T> {
    s.parse().map_err(|_| RuntimeError::Parse {
        path: format!("output of `{source}`"),
        what: format!("{what} {s:?} is not an address"),
    })
}

/// Interfaces from `ip -j -d addr show`.
fn interfaces_from(links: Vec<Link>, source: &str) -> Result<Vec<Interface>> {
    let mut out = Vec::with_capacity(links.len());
    for link in links {
        let kind = match link.kind() {
            "loopback" => InterfaceKind::Loopback,
            "veth" => InterfaceKind::Veth,
            other => InterfaceKind::Other(other.to_string()),
        };
        let mut addresses = Vec::new();
        for a in &link.addr_info {
            // Entries without an address (ip prints `{}` for filtered ones) say nothing.
            let (Some(local), Some(len)) = (&a.local, a.prefixlen) else {
                continue;
            };
            let addr: IpAddr = parse_ip("address", local, source)?;
            let local: Cidr =
                format!("{addr}/{len}")
                    .parse()
                    .map_err(|what| RuntimeError::Parse {
                        path: format!("output of `{source}`"),
                        what,
                    })?;
            let broadcast = match (&a.broadcast, a.family.as_deref()) {
                (Some(b), Some("inet")) => Some(parse_ip("broadcast", b, source)?),
                _ => None,
            };
            addresses.push(IfAddr { local, broadcast });
        }
        out.push(Interface {
            mac: link.address.as_deref().and_then(|a| a.parse().ok()),
            mtu: link.mtu.unwrap_or(0),
            up: link.up(),
            name: link.ifname,
            kind,
            addresses,
        });
    }
    Ok(out)
}

/// Parses the output of `ip -j -d addr show`.
#[cfg(test)]
fn parse_interfaces(json: &str) -> Result<Vec<Interface>> {
    let source = "ip -j -d addr show";
    interfaces_from(ip::parse(json, source)?, source)
}

/// Parses the output of `ip -j -4 route show table main` (or `-6` when `v6`).
fn parse_routes(json: &str, v6: bool) -> Result<Vec<Route>> {
    let source = format!("ip -j -{} route show table main", if v6 { 6 } else { 4 });
    let entries: Vec<RouteEntry> = ip::parse(json, &source)?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        if e.nexthops.is_some() || e.nhid.is_some() {
            return Err(RuntimeError::Unsupported(format!(
                "route to {} uses several next hops or a nexthop object, which is not handled",
                e.dst
            )));
        }
        let dst = Cidr::parse_dst(&e.dst, v6).map_err(|what| RuntimeError::Parse {
            path: format!("output of `{source}`"),
            what,
        })?;
        out.push(Route {
            kind: e.kind.unwrap_or_else(|| "unicast".to_string()),
            dst,
            gateway: e
                .gateway
                .map(|g| parse_ip("gateway", &g, &source))
                .transpose()?,
            dev: e.dev,
            protocol: e.protocol,
            scope: e.scope,
            metric: e.metric,
            prefsrc: e
                .prefsrc
                .map(|s| parse_ip("prefsrc", &s, &source))
                .transpose()?,
            onlink: e.flags.iter().any(|f| f == "onlink"),
        });
    }
    Ok(out)
}

/// Reads the configuration of the network namespace of `netns_pid`: every interface with its
/// kind, MAC, MTU, state and addresses, and the IPv4 and IPv6 routes of table main. The
/// namespace should not change meanwhile (its processes frozen). Routes with several next
/// hops are refused; interfaces of any kind are read (and [`recreate`] judges them).
pub fn capture(netns_pid: i32) -> Result<NetConfig> {
    let ns = Ns::Of(netns_pid);
    let what = "reading the network configuration";
    let links = ip::links(ns, what)?;
    let interfaces = interfaces_from(links, "ip -j -d addr show")?;
    let mut routes = Vec::new();
    for (flag, v6) in [("-4", false), ("-6", true)] {
        let out = ip::run(
            ns,
            &["-j", flag, "route", "show", "table", "main"],
            None,
            what,
        )?;
        routes.extend(parse_routes(&out, v6)?);
    }
    Ok(NetConfig {
        version: NET_CONFIG_VERSION,
        interfaces,
        routes,
    })
}

fn unsupported(msg: String) -> RuntimeError {
    RuntimeError::Unsupported(format!("recreating the network namespace: {msg}"))
}

/// Checks that `cfg` can be rebuilt in a namespace that now has `fresh`, changing nothing;
/// returns the one veth, if any, with its MAC. Interfaces of other kinds than loopback and veth are refused,
/// except ones the fresh namespace already has with the same name and kind (devices the kernel
/// makes in every namespace, such as the fallback tunnels tunl0 or sit0 when their modules
/// are loaded), which are left as they are.
fn check<'a>(cfg: &'a NetConfig, fresh: &[Interface]) -> Result<Option<(&'a Interface, MacAddr)>> {
    if cfg.version != NET_CONFIG_VERSION {
        return Err(unsupported(format!(
            "configuration version {} (this stasis reads {NET_CONFIG_VERSION})",
            cfg.version
        )));
    }
    let mut veth = None;
    for i in &cfg.interfaces {
        ip::check_ifname(&i.name)?;
        let present = fresh.iter().find(|f| f.name == i.name);
        match &i.kind {
            InterfaceKind::Loopback if present.map(|p| &p.kind) == Some(&i.kind) => {}
            InterfaceKind::Loopback => {
                return Err(unsupported(format!(
                    "loopback interface {} is not the fresh namespace's loopback",
                    i.name
                )))
            }
            InterfaceKind::Veth => {
                let Some(mac) = i.mac else {
                    return Err(unsupported(format!("veth {} has no MAC address", i.name)));
                };
                if let Some((first, _)) = veth.replace((i, mac)) {
                    return Err(unsupported(format!(
                        "veths {} and {}: only one veth (the container's link to its bridge) \
                         is handled",
                        first.name, i.name
                    )));
                }
                if present.is_some() {
                    return Err(unsupported(format!(
                        "the fresh namespace already has an interface {}",
                        i.name
                    )));
                }
            }
            InterfaceKind::Other(_) if present.map(|p| &p.kind) == Some(&i.kind) => {}
            InterfaceKind::Other(kind) => {
                return Err(unsupported(format!(
                    "interface {} is of kind {kind}, which is not handled (only loopback and \
                     veth are)",
                    i.name
                )))
            }
        }
    }
    for r in &cfg.routes {
        if r.made_by_kernel() {
            continue;
        }
        ip::check_word("route type", &r.kind)?;
        for w in [&r.protocol, &r.scope].into_iter().flatten() {
            ip::check_word("route attribute", w)?;
        }
        if let Some(dev) = &r.dev {
            if !cfg.interfaces.iter().any(|i| &i.name == dev) {
                return Err(unsupported(format!(
                    "route to {} is via {dev}, which is not among the interfaces",
                    r.dst
                )));
            }
        }
    }
    Ok(veth)
}

/// Whether `a` is one of the addresses the kernel gives a loopback interface when it comes
/// up. Added by hand, ::1 would also get a route in table main, which the kernel's own has not.
fn loopback_own(i: &Interface, a: &IfAddr) -> bool {
    let own: [Cidr; 2] = [
        Cidr {
            addr: Ipv4Addr::LOCALHOST.into(),
            len: 8,
        },
        Cidr {
            addr: std::net::Ipv6Addr::LOCALHOST.into(),
            len: 128,
        },
    ];
    i.kind == InterfaceKind::Loopback && own.contains(&a.local)
}

/// The `ip` lines that give the (existing) interfaces of `cfg` their MTU, state and addresses,
/// then add the routes. Interfaces of kinds left as they are ([`check`]) are skipped.
fn script(cfg: &NetConfig) -> Vec<String> {
    let mut lines = Vec::new();
    let handled = |i: &&Interface| matches!(i.kind, InterfaceKind::Loopback | InterfaceKind::Veth);
    for i in cfg.interfaces.iter().filter(handled) {
        let mut set = format!("link set {}", i.name);
        if i.mtu > 0 {
            set.push_str(&format!(" mtu {}", i.mtu));
        }
        if i.up {
            set.push_str(" up");
        }
        lines.push(set);
        for a in i.addresses.iter().filter(|a| !loopback_own(i, a)) {
            // `replace`: the kernel itself adds the link-local IPv6 address (from the MAC),
            // maybe before this line, maybe after. `nodad`: the address was this
            // container's already, and sockets restored onto it cannot bind to a tentative one.
            let mut line = format!("addr replace {}", a.local);
            if let Some(b) = a.broadcast {
                line.push_str(&format!(" brd {b}"));
            }
            line.push_str(&format!(" dev {}", i.name));
            if a.local.addr.is_ipv6() {
                line.push_str(" nodad");
            }
            lines.push(line);
        }
    }
    // Routes the kernel makes from addresses come back by themselves. Of the others, those
    // without a gateway first: a gateway must be reachable by a route when its route is added.
    let mut routes: Vec<&Route> = cfg.routes.iter().filter(|r| !r.made_by_kernel()).collect();
    routes.sort_by_key(|r| r.gateway.is_some());
    for r in routes {
        // The family comes from the destination (never written "default").
        let mut line = format!("route replace {} {}", r.kind, r.dst);
        if let Some(g) = r.gateway {
            line.push_str(&format!(" via {g}"));
        }
        if let Some(d) = &r.dev {
            line.push_str(&format!(" dev {d}"));
        }
        if let Some(p) = &r.protocol {
            line.push_str(&format!(" proto {p}"));
        }
        if let Some(s) = &r.scope {
            line.push_str(&format!(" scope {s}"));
        }
        if let Some(m) = r.metric {
            line.push_str(&format!(" metric {m}"));
        }
        if let Some(s) = r.prefsrc {
            line.push_str(&format!(" src {s}"));
        }
        if r.onlink {
            line.push_str(" onlink");
        }
        lines.push(line);
    }
    lines
}

/// Rebuilds `cfg` in the fresh network namespace of `netns_pid`: its veth (at most one) as a
/// pair with host end `veth_host_name` in `bridge`, the inside end with the captured name, MAC
/// and MTU; every interface's MTU, state and addresses (`lo` included); the routes that the
/// kernel does not make by itself. Everything in `cfg` is checked before anything is changed:
/// an interface of a kind not handled is refused naming it and its kind. If a later step
/// fails, the veth is removed again; the fresh namespace may be left half-configured, and is
/// the caller's to throw away.
pub fn recreate(
    bridge: &Bridge,
    netns_pid: i32,
    cfg: &NetConfig,
    veth_host_name: &str,
) -> Result<()> {
    bridge.check()?;
    ip::check_ifname(veth_host_name)?;
    let fresh = interfaces_from(
        ip::links(Ns::Of(netns_pid), "reading the fresh namespace")?,
        "ip -j -d addr show",
    )?;
    let veth = check(cfg, &fresh)?;
    let mut end = None;
    if let Some((v, mac)) = veth {
        let what = format!("recreating veth {veth_host_name}");
        if ip::link(Ns::Host, veth_host_name, &what)?.is_some() {
            return Err(unsupported(format!(
                "veth {veth_host_name} still exists on the host (detach it first)"
            )));
        }
        let mtu = Some(v.mtu).filter(|m| *m > 0);
        end = Some(create_veth(
            bridge,
            netns_pid,
            veth_host_name,
            &v.name,
            mac,
            mtu,
        )?);
    }
    ip::batch(
        Ns::Of(netns_pid),
        &script(cfg),
        "recreating the network configuration",
    )?;
    if let Some(end) = end {
        end.keep();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured on kernel 6.18 / iproute2 6.1: a container with eth0 on a bridge (and a second
    // IPv6 address), `ip -j -d addr show`, trimmed of fields stasis does not read.
    const ADDR: &str = r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"mtu":65536,"qdisc":"noqueue","operstate":"UNKNOWN","group":"default","txqlen":1000,"link_type":"loopback","address":"00:00:00:00:00:00","broadcast":"00:00:00:00:00:00","promiscuity":0,"allmulti":0,"min_mtu":0,"max_mtu":0,"num_tx_queues":1,"num_rx_queues":1,"gso_max_size":65536,"gso_max_segs":65535,"addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8,"scope":"host","label":"lo","valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6","local":"::1","prefixlen":128,"scope":"host","valid_life_time":4294967295,"preferred_life_time":4294967295}]},{"ifindex":2,"link_index":6,"ifname":"eth0","flags":["BROADCAST","MULTICAST","UP","LOWER_UP"],"mtu":1400,"qdisc":"noqueue","operstate":"UP","group":"default","txqlen":1000,"link_type":"ether","address":"02:42:0a:fa:00:02","broadcast":"ff:ff:ff:ff:ff:ff","link_netnsid":0,"promiscuity":0,"allmulti":0,"min_mtu":68,"max_mtu":65535,"linkinfo":{"info_kind":"veth"},"num_tx_queues":2,"num_rx_queues":2,"addr_info":[{"family":"inet","local":"10.250.0.2","prefixlen":24,"broadcast":"10.250.0.255","scope":"global","label":"eth0","valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6","local":"fd00::2","prefixlen":64,"scope":"global","valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6","local":"fe80::42:aff:fefa:2","prefixlen":64,"scope":"link","valid_life_time":4294967295,"preferred_life_time":4294967295}]},{"ifindex":3,"ifname":"br9","flags":["BROADCAST","MULTICAST"],"mtu":1500,"qdisc":"noop","operstate":"DOWN","group":"default","txqlen":1000,"link_type":"ether","address":"6e:1c:58:45:0e:11","broadcast":"ff:ff:ff:ff:ff:ff","linkinfo":{"info_kind":"bridge","info_data":{"forward_delay":1500,"stp_state":0}},"addr_info":[]},{"ifindex":4,"ifname":"tunl0","flags":["NOARP"],"mtu":1480,"link_type":"ipip","address":"0.0.0.0","broadcast":"0.0.0.0","linkinfo":{"info_kind":"ipip","info_data":{"proto":"ip","remote":"any","local":"any"}},"addr_info":[{}]}]"#;

    const ROUTE4: &str = r#"[{"dst":"default","gateway":"10.250.0.1","dev":"eth0","flags":[]},{"dst":"10.250.0.0/24","dev":"eth0","protocol":"kernel","scope":"link","prefsrc":"10.250.0.2","flags":[]},{"dst":"192.168.7.0/24","gateway":"10.250.0.9","dev":"eth0","protocol":"static","metric":50,"flags":["onlink"]},{"dst":"10.250.0.77","dev":"eth0","scope":"link","flags":[]},{"type":"blackhole","dst":"10.9.0.0/16","flags":[]}]"#;

    const ROUTE6: &str = r#"[{"dst":"fd00::/64","dev":"eth0","protocol":"kernel","metric":256,"flags":[],"pref":"medium"},{"dst":"fe80::/64","dev":"eth0","protocol":"kernel","metric":256,"flags":[],"pref":"medium"},{"dst":"default","gateway":"fd00::1","dev":"eth0","metric":1024,"flags":[],"pref":"medium"}]"#;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn sample() -> NetConfig {
        NetConfig {
            version: NET_CONFIG_VERSION,
            interfaces: parse_interfaces(ADDR).unwrap(),
            routes: [
                parse_routes(ROUTE4, false).unwrap(),
                parse_routes(ROUTE6, true).unwrap(),
            ]
            .concat(),
        }
    }

    #[test]
    fn interfaces_are_parsed() {
        let ifs = parse_interfaces(ADDR).unwrap();
        assert_eq!(ifs.len(), 4);
        let lo = &ifs[0];
        assert_eq!(lo.name, "lo");
        assert_eq!(lo.kind, InterfaceKind::Loopback);
        assert!(lo.up);
        assert_eq!(lo.mtu, 65536);
        assert_eq!(
            lo.addresses,
            vec![
                IfAddr {
                    local: cidr("127.0.0.1/8"),
                    broadcast: None
                },
                IfAddr {
                    local: cidr("::1/128"),
                    broadcast: None
                }
            ]
        );
        let eth = &ifs[1];
        assert_eq!(
            (eth.name.as_str(), &eth.kind, eth.mtu, eth.up),
            ("eth0", &InterfaceKind::Veth, 1400, true)
        );
        assert_eq!(eth.mac, Some("02:42:0a:fa:00:02".parse().unwrap()));
        assert_eq!(eth.addresses.len(), 3);
        assert_eq!(eth.addresses[0].local, cidr("10.250.0.2/24"));
        assert_eq!(
            eth.addresses[0].broadcast,
            Some(Ipv4Addr::new(10, 250, 0, 255))
        );
        assert_eq!(eth.addresses[1].local, cidr("fd00::2/64"));
        assert_eq!(eth.addresses[2].local, cidr("fe80::42:aff:fefa:2/64"));
        let br = &ifs[2];
        assert_eq!(br.kind, InterfaceKind::Other("bridge".into()));
        assert!(!br.up);
        // A tunnel's "address" is no MAC, and an empty addr_info entry is no address.
        let tun = &ifs[3];
        assert_eq!((tun.mac, tun.addresses.len()), (None, 0));
        assert_eq!(tun.kind, InterfaceKind::Other("ipip".into()));
    }

    #[test]
    fn routes_are_parsed() {
        let r4 = parse_routes(ROUTE4, false).unwrap();
        assert_eq!(r4.len(), 5);
        assert_eq!(r4[0].dst, cidr("0.0.0.0/0"));
        assert_eq!(r4[0].gateway, Some("10.250.0.1".parse().unwrap()));
        assert_eq!(r4[0].dev.as_deref(), Some("eth0"));
        assert_eq!((r4[0].kind.as_str(), &r4[0].protocol), ("unicast", &None));
        assert!(r4[1].made_by_kernel());
        assert_eq!(r4[1].prefsrc, Some("10.250.0.2".parse().unwrap()));
        assert_eq!(r4[1].scope.as_deref(), Some("link"));
        assert_eq!(r4[2].metric, Some(50));
        assert_eq!(r4[3].dst, cidr("10.250.0.77/32"));
        assert_eq!(
            (r4[4].kind.as_str(), r4[4].dev.as_deref()),
            ("blackhole", None)
        );
        let r6 = parse_routes(ROUTE6, true).unwrap();
        assert_eq!(r6[2].dst, cidr("::/0"));
        assert_eq!(r6[2].metric, Some(1024));
        assert!(parse_routes(r#"[{"dst":"fd00::/64"}]"#, false).is_err());
        assert!(parse_routes(r#"[{"dst":"10.0.0.0/33"}]"#, false).is_err());
    }

    #[test]
    fn multipath_routes_are_refused() {
        let mp = r#"[{"dst":"default","flags":[],"nexthops":[{"gateway":"10.0.0.1","dev":"eth0","weight":1,"flags":[]},{"gateway":"10.0.1.1","dev":"eth1","weight":1,"flags":[]}]}]"#;
        let e = parse_routes(mp, false).unwrap_err().to_string();
        assert!(e.contains("next hops"), "{e}");
    }

    #[test]
    fn round_trips_through_json() {
        let cfg = sample();
        let json = serde_json::to_string(&cfg).unwrap();
        assert!(json.contains(r#""kind":"veth""#), "{json}");
        assert!(json.contains(r#""kind":{"other":"bridge"}"#), "{json}");
        assert!(json.contains(r#""local":"10.250.0.2/24""#), "{json}");
        assert_eq!(serde_json::from_str::<NetConfig>(&json).unwrap(), cfg);
        assert!(serde_json::from_str::<NetConfig>(&json.replace("/24", "/99")).is_err());
    }

    fn fresh() -> Vec<Interface> {
        vec![Interface {
            name: "lo".into(),
            kind: InterfaceKind::Loopback,
            mac: None,
            mtu: 65536,
            up: false,
            addresses: vec![],
        }]
    }

    #[test]
    fn unhandled_kinds_are_refused_by_name_and_kind() {
        let cfg = sample();
        let e = check(&cfg, &fresh()).unwrap_err().to_string();
        assert!(e.contains("br9") && e.contains("bridge"), "{e}");
        // Without the bridge, the tunnel is refused, unless the fresh namespace has its own.
        let mut cfg = sample();
        cfg.interfaces.retain(|i| i.name != "br9");
        let e = check(&cfg, &fresh()).unwrap_err().to_string();
        assert!(e.contains("tunl0") && e.contains("ipip"), "{e}");
        let mut with_tunl = fresh();
        with_tunl.push(cfg.interfaces[2].clone());
        let veth = check(&cfg, &with_tunl)
            .unwrap()
            .map(|(v, _)| v.name.as_str());
        assert_eq!(veth, Some("eth0"));
    }

    #[test]
    fn other_impossible_configurations_are_refused() {
        let mut cfg = sample();
        cfg.interfaces.truncate(2);
        assert!(check(&cfg, &fresh()).is_ok());
        let mut two = cfg.clone();
        let mut second = two.interfaces[1].clone();
        second.name = "eth1".into();
        two.interfaces.push(second);
        assert!(check(&two, &fresh())
            .unwrap_err()
            .to_string()
            .contains("only one veth"));
        let mut v = cfg.clone();
        v.version = 2;
        assert!(check(&v, &fresh())
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        let mut hostile = cfg.clone();
        hostile.interfaces[1].name = "eth0\nlink del lo".into();
        assert!(check(&hostile, &fresh()).is_err());
        let mut word = cfg.clone();
        word.routes[0].protocol = Some("boot dev lo".into());
        assert!(check(&word, &fresh()).is_err());
        let mut dev = cfg.clone();
        dev.routes[0].dev = Some("eth7".into());
        assert!(check(&dev, &fresh())
            .unwrap_err()
            .to_string()
            .contains("eth7"));
        let mut taken = fresh();
        taken.push(cfg.interfaces[1].clone());
        assert!(check(&cfg, &taken)
            .unwrap_err()
            .to_string()
            .contains("already"));
    }

    #[test]
    fn script_rebuilds_addresses_and_non_kernel_routes() {
        let mut cfg = sample();
        cfg.interfaces.truncate(2);
        let lines = script(&cfg);
        let expected = [
            "link set lo mtu 65536 up",
            "link set eth0 mtu 1400 up",
            "addr replace 10.250.0.2/24 brd 10.250.0.255 dev eth0",
            "addr replace fd00::2/64 dev eth0 nodad",
            "addr replace fe80::42:aff:fefa:2/64 dev eth0 nodad",
            "route replace unicast 10.250.0.77/32 dev eth0 scope link",
            "route replace blackhole 10.9.0.0/16",
            "route replace unicast 0.0.0.0/0 via 10.250.0.1 dev eth0",
            "route replace unicast 192.168.7.0/24 via 10.250.0.9 dev eth0 proto static metric 50 \
             onlink",
            "route replace unicast ::/0 via fd00::1 dev eth0 metric 1024",
        ];
        assert_eq!(lines, expected);
    }
}

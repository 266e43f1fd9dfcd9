//! Container networking, for real: network namespaces of our own `unshare --net sleep`
//! children joined to a test bridge by veth pairs; TCP between the host and a namespace and
//! between two namespaces; a namespace's configuration captured and recreated in a fresh one.
//!
//! Each test has its own bridge "stt<N>p<pid>" on 10.<200+N>.<pid % 256>.0/24, so tests run in
//! parallel and never touch a stasis0 in use. Every veth, bridge and namespace process a test
//! makes is removed by a guard, also when the test fails.

mod common;

use common::{have_with, Unshared};
use stasis_runtime::netns::{self, Bridge, Cidr, InterfaceKind, MacAddr, NetConfig};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Whether this machine can run the tests; says why not.
fn can_run() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(module_path!(), "network namespaces and veths need root");
        return false;
    }
    have_with("ip", "-V") && have_with("unshare", "--version")
}

/// A process in a network namespace of its own: `unshare --net sleep 1000`, killed (by PID)
/// and reaped when dropped.
struct Ns(Unshared);

impl std::ops::Deref for Ns {
    type Target = Unshared;
    fn deref(&self) -> &Unshared {
        &self.0
    }
}

impl Ns {
    fn new() -> Ns {
        Ns(Unshared::new("net"))
    }

    /// Runs `ip ARGS` inside; panics with its stderr if it fails.
    fn ip(&self, args: &[&str]) {
        if let Err(e) = self.try_ip(args) {
            panic!("{e}");
        }
    }

    /// Runs `ip ARGS` inside; returns its stderr if it fails.
    fn try_ip(&self, args: &[&str]) -> Result<(), String> {
        let file = self.ns_file();
        let fd = file.as_raw_fd();
        let mut cmd = Command::new("ip");
        cmd.args(args);
        // SAFETY: only the async-signal-safe setns(2) runs between fork and exec; `file`
        // (and so `fd`) lives until the child has been spawned.
        unsafe {
            cmd.pre_exec(move || match libc::setns(fd, libc::CLONE_NEWNET) {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            });
        }
        let out = cmd.output().expect("running ip");
        match out.status.success() {
            true => Ok(()),
            false => Err(format!(
                "ip {args:?} in {}: {}",
                self.pid,
                String::from_utf8_lossy(&out.stderr)
            )),
        }
    }

    fn listen(&self, addr: Ipv4Addr) -> TcpListener {
        self.within(|| TcpListener::bind((addr, 0)))
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", self.pid))
    }
}

/// A test's own bridge and the veths made on it; all removed when dropped.
struct Net {
    n: u8,
    bridge: Bridge,
    veths: Vec<String>,
}

impl Net {
    fn new(n: u8) -> Net {
        let pid = std::process::id();
        let net = Net {
            n,
            bridge: Bridge {
                name: format!("stt{n}p{pid}"),
                gateway: Ipv4Addr::new(10, 200 + n, (pid % 256) as u8, 1),
                prefix: 24,
            },
            veths: Vec::new(),
        };
        // A bridge left by an earlier, killed run of the same PID.
        net.remove_bridge();
        net
    }

    /// A host-side veth name of this test, removed when the test ends.
    fn veth(&mut self, tag: char) -> String {
        let name = format!("stv{}{tag}p{}", self.n, std::process::id());
        let _ = netns::detach(&name);
        self.veths.push(name.clone());
        name
    }

    fn remove_bridge(&self) {
        if host_has(&self.bridge.name) {
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge.name])
                .status();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for v in &self.veths {
            if let Err(e) = netns::detach(v) {
                eprintln!("cleaning up veth {v}: {e}");
            }
        }
        self.remove_bridge();
    }
}

/// Net `n` with its bridge made, if this machine can run the tests.
fn bridged(n: u8) -> Option<Net> {
    if !can_run() {
        return None;
    }
    let net = Net::new(n);
    netns::ensure_bridge(&net.bridge).expect("ensure_bridge");
    Some(net)
}

fn host_has(ifname: &str) -> bool {
    Path::new("/sys/class/net").join(ifname).exists()
}

/// Accepts one connection on `listener` and writes `greeting` to it, while `connect` (on
/// another thread) connects and reads to the end; returns what the client read.
fn talk(
    listener: &TcpListener,
    greeting: &str,
    connect: impl FnOnce(SocketAddr) -> io::Result<TcpStream> + Send,
) -> io::Result<String> {
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    std::thread::scope(|s| {
        let client = s.spawn(move || {
            let mut stream = connect(addr)?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut got = String::new();
            stream.read_to_string(&mut got)?;
            Ok(got)
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !client.is_finished() && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    conn.set_nonblocking(false)?;
                    conn.write_all(greeting.as_bytes())?;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => return Err(e),
            }
        }
        client.join().expect("client thread")
    })
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, Duration::from_secs(5))
}

/// The host reaches a listener in `ns` at `addr`; on failure, says what of the host firewall
/// might be why.
fn assert_host_reaches(net: &Net, ns: &Ns, addr: Ipv4Addr, what: &str) {
    let listener = ns.listen(addr);
    let got = talk(&listener, what, connect);
    assert_eq!(
        got.as_ref().map(String::as_str).ok(),
        Some(what),
        "host -> {addr} ({what}): {got:?}; firewall findings: {:?}",
        netns::ensure_bridge(&net.bridge).map(|s| s.filtering)
    );
}

/// Without the IPv6 link-local addresses and routes, which the kernel adds on its own
/// schedule after a link comes up.
fn stable(mut cfg: NetConfig) -> NetConfig {
    let link_local = |a: &IpAddr| matches!(a, IpAddr::V6(v6) if v6.segments()[0] == 0xfe80);
    for i in &mut cfg.interfaces {
        i.addresses.retain(|a| !link_local(&a.local.addr));
    }
    cfg.routes.retain(|r| !link_local(&r.dst.addr));
    cfg
}

#[test]
fn bridge_joins_host_and_containers() {
    if !can_run() {
        return;
    }
    let mut net = Net::new(1);
    // Two callers racing to create the bridge: both succeed, one of them made it.
    let (a, b) = std::thread::scope(|s| {
        let one = s.spawn(|| netns::ensure_bridge(&net.bridge));
        let two = s.spawn(|| netns::ensure_bridge(&net.bridge));
        (one.join().unwrap(), two.join().unwrap())
    });
    let (a, b) = (a.expect("ensure_bridge"), b.expect("ensure_bridge"));
    assert!(a.created ^ b.created, "{a:?} {b:?}");
    let again = netns::ensure_bridge(&net.bridge).expect("ensure_bridge again");
    assert!(!again.created);
    eprintln!(
        "host firewall findings for {}: {:?}",
        net.bridge.name, again.filtering
    );

    let (ns_a, ns_b) = (Ns::new(), Ns::new());
    let addr_a = netns::allocate_ip(&net.bridge, &[]).unwrap();
    let addr_b = netns::allocate_ip(&net.bridge, &[addr_a]).unwrap();
    assert_eq!(
        addr_a,
        Ipv4Addr::new(10, 201, net.bridge.gateway.octets()[2], 2)
    );
    let (va, vb) = (net.veth('a'), net.veth('b'));
    let veth_a = netns::attach(&net.bridge, ns_a.pid, &va, addr_a, 24, None).expect("attach a");
    assert_eq!(veth_a.mac, MacAddr::for_ipv4(addr_a));
    assert_eq!(veth_a.peer_name, "eth0");
    let mac_b: MacAddr = "02:00:5e:10:00:b0".parse().unwrap();
    let veth_b =
        netns::attach(&net.bridge, ns_b.pid, &vb, addr_b, 24, Some(mac_b)).expect("attach b");
    assert_eq!(veth_b.mac, mac_b);
    assert!(host_has(&va) && host_has(&vb));

    assert_host_reaches(&net, &ns_a, addr_a, "hello from a");
    assert_host_reaches(&net, &ns_b, addr_b, "hello from b");
    // a -> b and b -> a, each connecting from inside its own namespace.
    for (from, to, to_addr) in [(&ns_a, &ns_b, addr_b), (&ns_b, &ns_a, addr_a)] {
        let listener = to.listen(to_addr);
        let got = talk(&listener, "neighbour", |sa| from.within(|| connect(sa)));
        assert_eq!(
            got.ok().as_deref(),
            Some("neighbour"),
            "{} -> {to_addr}",
            from.pid
        );
    }

    // What attach made, as capture reads it.
    let cfg = netns::capture(ns_b.pid).expect("capture b");
    let names: Vec<_> = cfg.interfaces.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["lo", "eth0"]);
    let eth0 = &cfg.interfaces[1];
    assert_eq!(
        (&eth0.kind, eth0.mac, eth0.up),
        (&InterfaceKind::Veth, Some(mac_b), true)
    );
    let v4 = Cidr {
        addr: addr_b.into(),
        len: 24,
    };
    assert_eq!(eth0.addresses[0].local, v4);
    assert!(cfg.interfaces[0].up);
    let default = cfg
        .routes
        .iter()
        .find(|r| r.dst.len == 0)
        .expect("default route");
    assert_eq!(default.gateway, Some(net.bridge.gateway.into()));
    assert_eq!(default.dev.as_deref(), Some("eth0"));

    // Neither the host's own namespace nor an address off the bridge's subnet is accepted.
    let own = std::process::id() as i32;
    let (vx, vy) = (net.veth('x'), net.veth('y'));
    let e = netns::attach(&net.bridge, own, &vx, addr_b, 24, None).unwrap_err();
    assert!(e.to_string().contains("own network namespace"), "{e}");
    let e = netns::attach(
        &net.bridge,
        ns_a.pid,
        &vy,
        Ipv4Addr::new(192, 0, 2, 7),
        24,
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("192.0.2.7"), "{e}");
    assert!(!host_has(&vx) && !host_has(&vy));
}

#[test]
fn capture_and_recreate_in_a_fresh_namespace() {
    let Some(mut net) = bridged(2) else {
        return;
    };
    let veth = net.veth('c');
    let addr = netns::allocate_ip(&net.bridge, &[]).unwrap();
    let old = Ns::new();
    netns::attach(&net.bridge, old.pid, &veth, addr, 24, None).expect("attach");
    // More than attach makes: an MTU, an IPv6 address and route, a static IPv4 route, a
    // blackhole.
    let gw = net.bridge.gateway.to_string();
    old.ip(&["link", "set", "eth0", "mtu", "1400"]);
    old.ip(&["addr", "add", "fd00:2::2/64", "dev", "eth0"]);
    old.ip(&[
        "route",
        "add",
        "192.168.202.0/24",
        "via",
        &gw,
        "metric",
        "7",
    ]);
    old.ip(&["-6", "route", "add", "fd00:99::/64", "via", "fd00:2::1"]);
    old.ip(&["route", "add", "blackhole", "10.9.0.0/16"]);
    assert_host_reaches(&net, &old, addr, "before");
    let cfg = netns::capture(old.pid).expect("capture");
    // The image stores it as JSON.
    let json = serde_json::to_string(&cfg).unwrap();
    let cfg: NetConfig = serde_json::from_str(&json).unwrap();
    let eth0 = cfg.interfaces.iter().find(|i| i.name == "eth0").unwrap();
    assert_eq!(eth0.mtu, 1400);

    // The workload is gone; its veth goes with its namespace, or by detach.
    drop(old);
    netns::detach(&veth).expect("detach");
    let fresh = Ns::new();
    let t = Instant::now();
    netns::recreate(&net.bridge, fresh.pid, &cfg, &veth).expect("recreate");
    eprintln!("recreate took {:?}", t.elapsed());
    let now = netns::capture(fresh.pid).expect("capture again");
    assert_eq!(stable(now), stable(cfg.clone()), "{json}");
    assert_host_reaches(&net, &fresh, addr, "after");
    // Recreating over a veth name still in use is refused.
    let other = Ns::new();
    let e = netns::recreate(&net.bridge, other.pid, &cfg, &veth).unwrap_err();
    assert!(e.to_string().contains("still exists"), "{e}");
}

#[test]
fn net_none_has_only_lo() {
    if !can_run() {
        return;
    }
    let ns = Ns::new();
    netns::lo_up(ns.pid).expect("lo_up");
    let cfg = netns::capture(ns.pid).expect("capture");
    assert_eq!(cfg.interfaces.len(), 1, "{cfg:?}");
    let lo = &cfg.interfaces[0];
    assert_eq!(
        (lo.name.as_str(), &lo.kind, lo.up),
        ("lo", &InterfaceKind::Loopback, true)
    );
    let addrs: Vec<String> = lo.addresses.iter().map(|a| a.local.to_string()).collect();
    assert_eq!(addrs, ["127.0.0.1/8", "::1/128"]);
    assert!(cfg.routes.is_empty(), "{:?}", cfg.routes);
    let listener = ns.listen(Ipv4Addr::LOCALHOST);
    let got = talk(&listener, "loopback", |sa| ns.within(|| connect(sa)));
    assert_eq!(got.ok().as_deref(), Some("loopback"));
    // The host's own namespace is never taken for a container's.
    let e = netns::lo_up(std::process::id() as i32).unwrap_err();
    assert!(e.to_string().contains("own network namespace"), "{e}");
}

#[test]
fn unsupported_interface_kinds_are_refused_before_anything_changes() {
    let Some(mut net) = bridged(3) else {
        return;
    };
    let (old, fresh) = (Ns::new(), Ns::new());
    let addr = netns::allocate_ip(&net.bridge, &[]).unwrap();
    let vo = net.veth('o');
    netns::attach(&net.bridge, old.pid, &vo, addr, 24, None).expect("attach");
    // A dummy interface if this kernel has them, else a bridge: both kinds stasis does not
    // recreate.
    let kind = match old.try_ip(&["link", "add", "x0", "type", "dummy"]) {
        Ok(()) => "dummy",
        Err(e) => {
            eprintln!("no dummy interface ({e}): using a bridge as the unsupported kind");
            old.ip(&["link", "add", "x0", "type", "bridge"]);
            "bridge"
        }
    };
    let cfg = netns::capture(old.pid).expect("capture");
    let before = netns::capture(fresh.pid).expect("capture fresh");
    let veth = net.veth('f');
    let e = netns::recreate(&net.bridge, fresh.pid, &cfg, &veth).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("x0") && msg.contains(kind), "{msg}");
    // Nothing was made: no veth on the host, the fresh namespace as it was.
    assert!(!host_has(&veth));
    assert_eq!(netns::capture(fresh.pid).expect("capture fresh"), before);
}

#[test]
fn detach_and_failed_attach_leave_nothing_behind() {
    let Some(mut net) = bridged(4) else {
        return;
    };
    let ns = Ns::new();
    let veth = net.veth('d');
    let addr = netns::allocate_ip(&net.bridge, &[]).unwrap();
    netns::attach(&net.bridge, ns.pid, &veth, addr, 24, None).expect("attach");
    assert!(host_has(&veth));
    netns::detach(&veth).expect("detach");
    assert!(!host_has(&veth));
    let names: Vec<_> = netns::capture(ns.pid)
        .expect("capture")
        .interfaces
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(names, ["lo"], "the peer goes with the host end");
    netns::detach(&veth).expect("detaching again is fine");
    // detach removes veths only.
    let e = netns::detach(&net.bridge.name).unwrap_err();
    assert!(e.to_string().contains("not a veth"), "{e}");
    assert!(host_has(&net.bridge.name));

    // An attach failing after its veth was made removes it again: here adding the default
    // route fails, the namespace having one already.
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["route", "add", "default", "dev", "lo"]);
    let e = netns::attach(&net.bridge, ns.pid, &veth, addr, 24, None).unwrap_err();
    assert!(e.to_string().contains("route add default"), "{e}");
    assert!(!host_has(&veth));
}

#[test]
fn a_forward_drop_policy_is_reported_and_blocks_only_container_to_container_traffic() {
    if !can_run() || !have_with("nft", "--version") {
        return;
    }
    // The "host" here is a namespace of its own, so its firewall is the test's to change:
    // with br_netfilter, a FORWARD chain dropping by default stops bridged traffic.
    let host = Ns::new();
    let (a, b) = (Ns::new(), Ns::new());
    let bridge = Bridge {
        name: "stasis0".into(),
        ..Bridge::default()
    };
    host.ip(&["link", "set", "lo", "up"]);
    host.within(|| {
        let nf = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").ok();
        let status = netns::ensure_bridge(&bridge).expect("ensure_bridge");
        assert!(status.created && status.filtering.is_empty(), "{status:?}");
        let addr_a = netns::allocate_ip(&bridge, &[]).unwrap();
        let addr_b = netns::allocate_ip(&bridge, &[addr_a]).unwrap();
        netns::attach(&bridge, a.pid, "va", addr_a, 16, None).expect("attach a");
        netns::attach(&bridge, b.pid, "vb", addr_b, 16, None).expect("attach b");
        let a_to_b = || {
            let listener = b.listen(addr_b);
            talk(&listener, "b", |sa| {
                a.within(|| TcpStream::connect_timeout(&sa, Duration::from_secs(2)))
            })
        };
        assert_eq!(a_to_b().ok().as_deref(), Some("b"));

        let nft = |script: &str| {
            let st = Command::new("nft").arg(script).status().expect("nft");
            assert!(st.success(), "nft {script}");
        };
        nft("add table ip filter");
        nft("add chain ip filter FORWARD { type filter hook forward priority 0; policy drop; }");
        let status = netns::ensure_bridge(&bridge).expect("ensure_bridge again");
        if nf.as_deref().map(str::trim) != Some("1") {
            common::skip(
                module_path!(),
                "in part: br_netfilter is not active here, so FORWARD does not see bridged traffic",
            );
            assert!(status.filtering.is_empty(), "{status:?}");
            return;
        }
        assert_eq!(status.filtering.len(), 1, "{status:?}");
        let finding = &status.filtering[0];
        assert!(
            finding.contains("ip filter FORWARD") && finding.contains("no rule"),
            "{finding}"
        );
        eprintln!("reported: {finding}");
        // Container to container is dropped; the host still reaches both (not forwarded).
        assert!(a_to_b().is_err());
        for (ns, addr) in [(&a, addr_a), (&b, addr_b)] {
            let listener = ns.listen(addr);
            assert_eq!(talk(&listener, "h", connect).ok().as_deref(), Some("h"));
        }
    });
}

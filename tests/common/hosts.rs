//! Two simulated hosts on one machine: two network namespaces of the test's own, joined by a
//! veth pair (made inside them, so nothing is ever added to the machine's own namespace),
//! each with its own stasis state directory, cgroup parent (as an operator of two stasis
//! instances on one machine gives `--cgroup-parent`) and bridge (its namespace's own).
//! Both go when dropped (a namespace with no process left takes its veth end along; the
//! cgroup parents, empty once the test removed its containers, are removed).

use super::unshared::Unshared;
use std::path::PathBuf;
use std::process::Command;

/// One simulated host.
pub struct Host {
    pub ns: Unshared,
    /// Its address on the link between the two.
    pub ip: String,
    /// Its stasis state directory.
    pub state: PathBuf,
    /// The cgroup its containers go below (`stasis-test-...-PID`, below every hierarchy's
    /// root).
    pub cgroup_parent: String,
}

impl Host {
    /// `stasis --state-dir STATE ARGS...` in this host's network namespace; the commands
    /// that make containers (`run`, `restore`, `receive`) get its `--cgroup-parent`.
    pub fn stasis(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.ns.ns_path()))
            .arg(super::stasis())
            .arg("--state-dir")
            .arg(&self.state);
        match args.split_first() {
            Some((cmd, rest)) if ["run", "restore", "receive"].contains(cmd) => {
                c.arg(cmd)
                    .args(["--cgroup-parent", &self.cgroup_parent])
                    .args(rest);
            }
            _ => {
                c.args(args);
            }
        }
        c
    }

    /// Runs `ip ARGS...` in this host's network namespace.
    fn ip(&self, args: &[&str]) {
        let st = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.ns_path()))
            .arg("ip")
            .args(args)
            .status()
            .expect("running ip");
        assert!(st.success(), "ip {args:?} failed");
    }
}

/// Host A and host B, joined at layer 2.
pub struct TwoHosts {
    pub a: Host,
    pub b: Host,
}

impl TwoHosts {
    /// `test` names the scratch directories (one state directory per host).
    pub fn new(test: &str) -> TwoHosts {
        let dir = super::scratch(test);
        // 10.201.X.0/24, X from our PID: tests running at once do not share a subnet (the
        // namespaces are separate anyway; this keeps logs unambiguous).
        let net = std::process::id() % 250 + 1;
        let host = |n: u32, name: &str| Host {
            ns: Unshared::new("net"),
            ip: format!("10.201.{net}.{n}"),
            state: dir.join(name),
            cgroup_parent: format!("stasis-test-{test}-{name}-{}", std::process::id()),
        };
        let (a, b) = (host(1, "a"), host(2, "b"));
        a.ip(&[
            "link",
            "add",
            "veth-a",
            "type",
            "veth",
            "peer",
            "name",
            "veth-b",
            "netns",
            &b.ns.pid.to_string(),
        ]);
        for (h, dev) in [(&a, "veth-a"), (&b, "veth-b")] {
            h.ip(&["addr", "add", &format!("{}/24", h.ip), "dev", dev]);
            h.ip(&["link", "set", dev, "up"]);
            h.ip(&["link", "set", "lo", "up"]);
        }
        TwoHosts { a, b }
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // Fails (EBUSY) while a cgroup is left below: the leftover check then names it.
        for root in super::cleanup::cgroup_roots() {
            for h in [&self.a, &self.b] {
                let _ = std::fs::remove_dir(root.join(&h.cgroup_parent));
            }
        }
    }
}

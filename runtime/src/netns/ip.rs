//! Running iproute2's `ip`, on the host or inside another process's network namespace.
//!
//! `ip -n NAME` only knows namespaces bind-mounted under /run/netns, and a container's
//! namespace has no name, only a process in it. So `ip` is spawned with a `pre_exec` hook that
//! `setns(2)`es the child into /proc/PID/ns/net before it execs: the namespace file is opened
//! here, before the fork (so a missing process is an error naming it, and the open file pins
//! the namespace while `ip` runs), and the child needs nothing but the one async-signal-safe
//! system call. This needs no `nsenter` (util-linux) and keeps the rest of the child's
//! namespaces (mounts, so /etc/iproute2 and /sys) those of this process.
//!
//! Reading uses `ip -j` (JSON); several changes in one namespace go to one `ip -batch -`,
//! which stops at the first failing line and names it on stderr.

use crate::error::{Result, RuntimeError};
use crate::tool;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// The network namespace an `ip` command runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ns {
    /// The calling thread's own (for stasis: the host's).
    Host,
    /// The one process `pid` is in; never the caller's own (see [`open_netns`]).
    Of(i32),
}

impl Ns {
    pub(crate) fn describe(self) -> String {
        match self {
            Ns::Host => "host network namespace".to_string(),
            Ns::Of(pid) => format!("network namespace of pid {pid}"),
        }
    }
}

/// The path naming the network namespace of `pid`, as `ip ... netns PATH` accepts it (a
/// path, unlike a bare number, is never mistaken for a name under /run/netns).
pub(crate) fn ns_path(pid: i32) -> String {
    format!("/proc/{pid}/ns/net")
}

/// Opens the network namespace of `pid`, refusing the calling thread's own: configuring "the
/// container's" namespace must never rename or readdress the host's interfaces.
pub(crate) fn open_netns(pid: i32) -> Result<File> {
    let path = ns_path(pid);
    let file =
        File::open(&path).map_err(|e| RuntimeError::sys("opening network namespace", &path, e))?;
    let theirs = file
        .metadata()
        .map_err(|e| RuntimeError::sys("stat of network namespace", &path, e))?;
    let own = "/proc/thread-self/ns/net";
    let ours = std::fs::metadata(own)
        .map_err(|e| RuntimeError::sys("stat of network namespace", own, e))?;
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Err(RuntimeError::Unsupported(format!(
            "pid {pid} is in this process's own network namespace: refusing to configure it \
             as a container's"
        )));
    }
    Ok(file)
}

/// Runs `ip ARGS` in `ns`, feeding `input` on stdin; returns stdout. `what` says what for, in
/// errors. A missing `ip` is reported naming its Debian package.
pub(crate) fn run(ns: Ns, args: &[&str], input: Option<&str>, what: &str) -> Result<String> {
    let netns = match ns {
        Ns::Of(pid) => Some(open_netns(pid)?),
        Ns::Host => None,
    };
    let mut cmd = Command::new("ip");
    cmd.args(args);
    if let Some(file) = &netns {
        let fd = file.as_raw_fd();
        // SAFETY: the hook runs in the forked child before exec and makes only the
        // async-signal-safe setns(2) call, allocating nothing. `fd` is valid there: `netns`
        // lives until this function returns, after the child was spawned (and O_CLOEXEC only
        // closes it at the exec, after setns).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
    }
    let what = format!("{what} ({})", ns.describe());
    let needs = "container networking needs ip (Debian package iproute2)";
    let out = tool::run(&mut cmd, input, &what, needs)?;
    String::from_utf8(out).map_err(|e| RuntimeError::Parse {
        path: format!("output of `ip {}`", args.join(" ")),
        what: e.to_string(),
    })
}

/// Runs the `ip` commands of `lines` (without the leading `ip`) in `ns` as one `ip -batch -`.
pub(crate) fn batch(ns: Ns, lines: &[String], what: &str) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut script = lines.join("\n");
    script.push('\n');
    run(ns, &["-batch", "-"], Some(&script), what)
        .map(drop)
        .map_err(|e| match e {
            // The failing line is named by number; the script makes it readable.
            RuntimeError::Command {
                what,
                status,
                stderr,
                ..
            } => RuntimeError::Command {
                what,
                command: format!("ip -batch - <<< {:?}", lines.join("; ")),
                status,
                stderr,
            },
            other => other,
        })
}

/// Runs `ip -j ARGS` in `ns` and parses its JSON.
pub(crate) fn json<T: DeserializeOwned>(ns: Ns, args: &[&str], what: &str) -> Result<T> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let out = run(ns, &all, None, what)?;
    parse(&out, &format!("ip {}", all.join(" ")))
}

/// Parses JSON output of `source` (named in errors).
pub(crate) fn parse<T: DeserializeOwned>(text: &str, source: &str) -> Result<T> {
    // `ip -j` prints nothing at all for some empty listings.
    let text = if text.trim().is_empty() { "[]" } else { text };
    serde_json::from_str(text).map_err(|e| RuntimeError::Parse {
        path: format!("output of `{source}`"),
        what: e.to_string(),
    })
}

/// One link of `ip -j -d addr show` / `ip -j -d link show`: the fields stasis reads.
#[derive(Debug, Deserialize)]
pub(crate) struct Link {
    pub ifname: String,
    #[serde(default)]
    pub flags: Vec<String>,
    pub mtu: Option<u32>,
    pub link_type: Option<String>,
    pub address: Option<String>,
    pub linkinfo: Option<LinkInfo>,
    #[serde(default)]
    pub addr_info: Vec<AddrInfo>,
}

impl Link {
    /// The kind of link: `info_kind` (veth, bridge, dummy, ...), or else the link type
    /// (loopback, ether, ...).
    pub fn kind(&self) -> &str {
        self.linkinfo
            .as_ref()
            .and_then(|i| i.info_kind.as_deref())
            .or(self.link_type.as_deref())
            .unwrap_or("unknown")
    }

    /// Administratively up (IFF_UP).
    pub fn up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct LinkInfo {
    pub info_kind: Option<String>,
    /// Kind-specific data; for a bridge this holds `nf_call_iptables`.
    pub info_data: Option<serde_json::Value>,
}

/// One address of a link's `addr_info`.
#[derive(Debug, Deserialize)]
pub(crate) struct AddrInfo {
    pub family: Option<String>,
    pub local: Option<String>,
    pub prefixlen: Option<u8>,
    pub broadcast: Option<String>,
}

/// One route of `ip -j route show`.
#[derive(Debug, Deserialize)]
pub(crate) struct RouteEntry {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub dst: String,
    pub gateway: Option<String>,
    pub dev: Option<String>,
    pub protocol: Option<String>,
    pub scope: Option<String>,
    pub metric: Option<u32>,
    pub prefsrc: Option<String>,
    /// Present on multipath routes.
    pub nexthops: Option<serde_json::Value>,
    #[serde(default)]
    pub flags: Vec<String>,
    /// Present on routes that use a nexthop object.
    pub nhid: Option<u32>,
}

/// Every link of `ns`, with details (`-d`) and addresses.
pub(crate) fn links(ns: Ns, what: &str) -> Result<Vec<Link>> {
    json(ns, &["-d", "addr", "show"], what)
}

/// The link named `name` in `ns`, if there is one. Listing all links, rather than asking for
/// one, tells "absent" from a failure without reading ip's error text.
pub(crate) fn link(ns: Ns, name: &str, what: &str) -> Result<Option<Link>> {
    Ok(links(ns, what)?.into_iter().find(|l| l.ifname == name))
}

/// Refuses names `ip` or the kernel would not take as they are: at most 15 bytes (IFNAMSIZ
/// less the NUL), no '/', ':' or whitespace, not "." or "..", not starting with '-'. Names
/// end up in `ip -batch` lines, so this also keeps a hostile name from adding commands.
pub(crate) fn check_ifname(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name.starts_with('-')
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if bad {
        return Err(RuntimeError::Unsupported(format!(
            "{name:?} is not a usable network interface name (1-15 bytes, no '/', ':' or \
             whitespace)"
        )));
    }
    Ok(())
}

/// Refuses a word (route type, protocol, scope) that is not plain letters, digits, '_' or '-'.
pub(crate) fn check_word(what: &str, word: &str) -> Result<()> {
    if word.is_empty()
        || !word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(RuntimeError::Unsupported(format!(
            "{what} {word:?} is not a plain word"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names() {
        for good in ["eth0", "vst0123456789ab", "stasis0", "a-b_c.d"] {
            assert!(check_ifname(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "vst0123456789abc",
            "a/b",
            "a:1",
            "a b",
            "a\nlink del x",
            ".",
            "..",
            "-x",
        ] {
            assert!(check_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn words() {
        assert!(check_word("protocol", "kernel").is_ok());
        assert!(check_word("protocol", "186").is_ok());
        assert!(check_word("scope", "link dev x").is_err());
        assert!(check_word("scope", "").is_err());
    }

    #[test]
    fn empty_output_is_an_empty_list() {
        let v: Vec<RouteEntry> = parse("\n", "ip -j route").unwrap();
        assert!(v.is_empty());
        assert!(parse::<Vec<RouteEntry>>("[{", "ip -j route").is_err());
    }
}

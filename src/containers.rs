//! The container commands: run, ps, stats, exec, set, freeze, thaw, stop, rm.

use crate::{exit, report};
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use stasis_runtime::cgroups::{IoKind, IoLimit, Limits};
use stasis_runtime::container::{self as ct, NetMode, Record, StateDir};
use std::path::PathBuf;
use std::time::Duration;

/// Resource limits, as `stasis run` and `stasis set` take them.
#[derive(Args, Debug, Clone, Default)]
pub struct LimitArgs {
    /// Memory limit (bytes, or with a suffix: 512m, 2g).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Swap the container may use beyond --memory.
    #[arg(long, value_name = "SIZE")]
    pub swap: Option<String>,
    /// Hard CPU cap in CPUs (0.5 = half of one CPU), like cpulimit.
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// Relative CPU share against other containers (1..10000, default 100), like cpuunits.
    #[arg(long, value_name = "W")]
    pub cpu_weight: Option<u64>,
    /// Most processes and threads the container may have.
    #[arg(long, value_name = "N")]
    pub pids: Option<u64>,
    /// Read bandwidth cap on a block device: DEV:BYTES_PER_SEC (DEV is /dev/sda or 8:0).
    #[arg(long, value_name = "DEV:N")]
    pub io_read_bps: Vec<String>,
    /// Write bandwidth cap: DEV:BYTES_PER_SEC.
    #[arg(long, value_name = "DEV:N")]
    pub io_write_bps: Vec<String>,
    /// Read operations per second cap: DEV:N.
    #[arg(long, value_name = "DEV:N")]
    pub io_read_iops: Vec<String>,
    /// Write operations per second cap: DEV:N.
    #[arg(long, value_name = "DEV:N")]
    pub io_write_iops: Vec<String>,
}

impl LimitArgs {
    pub fn to_limits(&self) -> Result<Limits> {
        let size = |what: &str, s: &Option<String>| -> Result<Option<u64>> {
            s.as_deref()
                .map(|v| {
                    stasis_runtime::cgroups::parse_size(v).with_context(|| format!("--{what}"))
                })
                .transpose()
        };
        let mut io = Vec::new();
        for (kind, flag, specs) in [
            (IoKind::ReadBps, "io-read-bps", &self.io_read_bps),
            (IoKind::WriteBps, "io-write-bps", &self.io_write_bps),
            (IoKind::ReadIops, "io-read-iops", &self.io_read_iops),
            (IoKind::WriteIops, "io-write-iops", &self.io_write_iops),
        ] {
            for s in specs {
                let l = IoLimit::parse(kind, s).with_context(|| format!("--{flag} {s}"))?;
                io.push(l);
            }
        }
        Ok(Limits {
            memory: size("memory", &self.memory)?,
            swap: size("swap", &self.swap)?,
            cpus: self.cpus,
            cpu_weight: self.cpu_weight,
            pids: self.pids,
            io,
        })
    }
}

/// `stasis run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Name of the container (unique on this host).
    #[arg(long)]
    pub name: String,
    /// Root filesystem directory to pivot into (default: the host's, in a private mount
    /// namespace with its own /proc). `scripts/mkrootfs DIR` builds a busybox one.
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,
    /// Host name inside (default: the container's name).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Its cgroup goes below this cgroup in every hierarchy (default: stasis), e.g. to
    /// keep two stasis instances on one host apart.
    #[arg(long, value_name = "PATH")]
    pub cgroup_parent: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Network: none (own namespace, lo only), host (the host's), bridge (own namespace
    /// with a veth into the stasis0 bridge and its own address).
    #[arg(long, default_value = "none")]
    pub net: NetMode,
    /// Address on the bridge, ADDR/NN (default: the first free one).
    #[arg(long, value_name = "ADDR/NN")]
    pub ip: Option<String>,
    /// Run in the background: print the name and exit; output goes to the container's log.
    #[arg(short, long)]
    pub detach: bool,
    /// Print the container's record as JSON (with --detach).
    #[arg(long)]
    pub json: bool,
    /// The command to run as PID 1.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn parse_ip(s: &str) -> Result<(std::net::Ipv4Addr, u8)> {
    let (a, p) = s.split_once('/').unwrap_or((s, "16"));
    let ip = a
        .parse()
        .with_context(|| format!("--ip {s}: not an IPv4 address"))?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| (1..=30).contains(p))
        .with_context(|| format!("--ip {s}: the prefix length must be 1..30"))?;
    Ok((ip, prefix))
}

pub fn run(state: &StateDir, a: RunArgs) -> Result<i32> {
    if a.ip.is_some() && a.net != NetMode::Bridge {
        anyhow::bail!("--ip needs --net bridge");
    }
    if let Some(p) = &a.cgroup_parent {
        ct::check_cgroup_parent(p).map_err(|e| crate::exit::usage(e.to_string()))?;
    }
    let cfg = ct::Config {
        name: a.name.clone(),
        cgroup_parent: a.cgroup_parent,
        rootfs: a.rootfs,
        hostname: a.hostname,
        command: a.command,
        limits: a.limits.to_limits()?,
        net: a.net,
        ip: a.ip.as_deref().map(parse_ip).transpose()?,
        detach: a.detach,
    };
    let rec = ct::run(state, &cfg).with_context(|| format!("starting container {}", a.name))?;
    if a.detach {
        if a.json {
            report::json(&Listed::from(&rec))?;
        } else {
            crate::outln!("{}", rec.name);
        }
        return Ok(exit::OK);
    }
    Ok(ct::wait_foreground(state, &rec)?)
}

/// One container in `ps` and JSON reports.
#[derive(Serialize)]
pub struct Listed {
    pub name: String,
    pub pid: i32,
    pub status: String,
    pub created: u64,
    pub command: Vec<String>,
    pub rootfs: Option<PathBuf>,
    pub hostname: String,
    pub net: NetMode,
    pub ip: Option<String>,
    pub cgroup: String,
    pub limits: Limits,
    pub log: Option<PathBuf>,
}

impl From<&Record> for Listed {
    fn from(r: &Record) -> Self {
        let frozen = ct::cgroup_of(r)
            .ok()
            .and_then(|c| c.frozen().ok())
            .unwrap_or(false);
        Listed {
            name: r.name.clone(),
            pid: r.pid,
            status: if frozen { "frozen" } else { "running" }.into(),
            created: r.created,
            command: r.command.clone(),
            rootfs: r.rootfs.clone(),
            hostname: r.hostname.clone(),
            net: r.net,
            ip: r.bridge.as_ref().map(|b| format!("{}/{}", b.ip, b.prefix)),
            cgroup: r.cgroup.clone(),
            limits: r.limits.clone(),
            log: r.log.clone(),
        }
    }
}

pub fn ps(state: &StateDir, json: bool) -> Result<i32> {
    let (live, stale) = ct::list(state)?;
    for s in &stale {
        let log = state.log_path(s);
        let kept = if log.exists() {
            format!("; its output is kept in {}", log.display())
        } else {
            String::new()
        };
        eprintln!("stasis: removed the stale record of container {s} (its process was gone){kept}");
    }
    let rows: Vec<Listed> = live.iter().map(Listed::from).collect();
    if json {
        report::json(&rows)?;
        return Ok(exit::OK);
    }
    crate::outln!(
        "{:<20} {:>8} {:<8} {:<18} COMMAND",
        "NAME",
        "PID",
        "STATUS",
        "IP"
    );
    for r in rows {
        crate::outln!(
            "{:<20} {:>8} {:<8} {:<18} {}",
            r.name,
            r.pid,
            r.status,
            r.ip.unwrap_or_else(|| r.net.to_string()),
            r.command.join(" ")
        );
    }
    Ok(exit::OK)
}

#[derive(Serialize)]
struct StatsReport {
    name: String,
    pid: i32,
    #[serde(flatten)]
    stats: stasis_runtime::cgroups::Stats,
}

pub fn stats(state: &StateDir, name: &str, json: bool) -> Result<i32> {
    let rec = ct::running(state, name)?;
    let stats = ct::cgroup_of(&rec)?.stats()?;
    let rep = StatsReport {
        name: rec.name.clone(),
        pid: rec.pid,
        stats,
    };
    if json {
        let mut v = serde_json::to_value(&rep)?;
        no_limit_as(&mut v, &serde_json::Value::Null);
        report::json(&v)?;
    } else {
        let mut v = serde_json::to_value(&rep.stats)?;
        no_limit_as(&mut v, &serde_json::Value::from("max"));
        crate::outln!("container {} (pid {})", rep.name, rep.pid);
        if let Some(m) = v.as_object() {
            for (k, v) in m {
                match v.as_str() {
                    Some(s) => crate::outln!("  {k:<24} {s}"),
                    None => crate::outln!("  {k:<24} {v}"),
                }
            }
        }
    }
    Ok(exit::OK)
}

/// Replaces every "no limit" value (u64::MAX, the kernel's "max") with `with`.
fn no_limit_as(v: &mut serde_json::Value, with: &serde_json::Value) {
    match v {
        serde_json::Value::Number(n) if n.as_u64() == Some(u64::MAX) => *v = with.clone(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| no_limit_as(x, with)),
        serde_json::Value::Object(o) => o.values_mut().for_each(|x| no_limit_as(x, with)),
        _ => {}
    }
}

/// The limits as a line of text: "memory 128.0 MiB, cpus 1, io read_bps 8:0 1048576".
fn limits_text(l: &Limits) -> String {
    let amount = |n: u64, bytes: bool| match n {
        u64::MAX => "max".to_string(),
        n if bytes => report::bytes(n),
        n => n.to_string(),
    };
    let mut parts = Vec::new();
    if let Some(m) = l.memory {
        parts.push(format!("memory {}", amount(m, true)));
    }
    if let Some(m) = l.swap {
        parts.push(format!("swap {}", amount(m, true)));
    }
    if let Some(c) = l.cpus {
        parts.push(format!("cpus {c}"));
    }
    if let Some(w) = l.cpu_weight {
        parts.push(format!("cpu weight {w}"));
    }
    if let Some(p) = l.pids {
        parts.push(format!("pids {}", amount(p, false)));
    }
    for io in &l.io {
        let kind = serde_json::to_value(io.kind)
            .ok()
            .and_then(|k| k.as_str().map(str::to_string))
            .unwrap_or_default();
        let (major, minor) = io.dev;
        parts.push(format!(
            "io {kind} {major}:{minor} {}",
            amount(io.value, false)
        ));
    }
    if parts.is_empty() {
        return "no limits".into();
    }
    parts.join(", ")
}

pub fn set(state: &StateDir, name: &str, limits: &LimitArgs, json: bool) -> Result<i32> {
    let rec = ct::set(state, name, &limits.to_limits()?)
        .with_context(|| format!("changing the limits of container {name}"))?;
    if json {
        report::json(&Listed::from(&rec))?;
    } else {
        crate::outln!("{name}: {}", limits_text(&rec.limits));
    }
    Ok(exit::OK)
}

pub fn stop(state: &StateDir, name: &str, timeout: f64) -> Result<i32> {
    ct::stop(state, name, Duration::from_secs_f64(timeout.max(0.0)))
        .with_context(|| format!("stopping container {name}"))?;
    crate::outln!("{name}");
    Ok(exit::OK)
}

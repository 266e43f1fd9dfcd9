//! Starting, joining, limiting, freezing, stopping and removing containers.

use super::init::{self, Launch, Then};
use super::record::{BridgeAddr, NetMode, Record, StateDir};
use super::{setup, ContainerError};
use crate::cgroups::{Cgroup, Hierarchy, Limits, DEFAULT_PARENT};
use crate::netns::{self, Bridge};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `stasis run` was asked for.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub name: String,
    /// The cgroup its cgroup goes below (None: [`DEFAULT_PARENT`]).
    pub cgroup_parent: Option<String>,
    pub rootfs: Option<PathBuf>,
    pub hostname: Option<String>,
    pub command: Vec<String>,
    pub limits: Limits,
    pub net: NetMode,
    /// Address on the bridge (allocated when not given).
    pub ip: Option<(std::net::Ipv4Addr, u8)>,
    /// Standard input from /dev/null, output and error to the container's log.
    pub detach: bool,
}

/// The cgroup of container `name` below `parent` (None: [`DEFAULT_PARENT`]), relative to
/// each hierarchy's root.
pub fn cgroup_path(parent: Option<&str>, name: &str) -> String {
    format!("{}/{name}", parent.unwrap_or(DEFAULT_PARENT))
}

/// Checks a cgroup parent given by an operator (`--cgroup-parent`): a relative path of
/// plain names below each hierarchy's root (e.g. `stasis` or `machine.slice/stasis`).
pub fn check_cgroup_parent(parent: &str) -> Result<(), ContainerError> {
    let ok = !parent.is_empty()
        && parent.len() <= 200
        && parent.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-@:".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(ContainerError::Invalid(format!(
            "cgroup parent {parent:?}: expected a relative path of plain names, e.g. stasis or machine.slice/stasis"
        )))
    }
}

/// A live record of `name`, or why there is none. A record whose process is gone is
/// cleaned up (cgroup, network, record) and reported as no such container.
pub fn running(state: &StateDir, name: &str) -> Result<Record, ContainerError> {
    let rec = state
        .read(name)?
        .ok_or_else(|| ContainerError::NoSuch(name.to_string()))?;
    if rec.alive() {
        return Ok(rec);
    }
    let _lock = state.lock()?;
    clean(state, &rec, true)?;
    Err(ContainerError::NoSuch(name.to_string()))
}

/// Every container whose process still runs; stale records are cleaned and their names
/// returned second.
pub fn list(state: &StateDir) -> Result<(Vec<Record>, Vec<String>), ContainerError> {
    let mut live = Vec::new();
    let mut stale = Vec::new();
    for name in state.names()? {
        let Some(rec) = state.read(&name)? else {
            continue;
        };
        if rec.alive() {
            live.push(rec);
        } else {
            let _lock = state.lock()?;
            // Checked again under the lock: another stasis may have replaced it.
            if let Some(r) = state.read(&name)? {
                if !r.alive() {
                    // Its log stays: it says why it ended (`ps` tells where it is).
                    clean(state, &r, true)?;
                    stale.push(name);
                }
            }
        }
    }
    Ok((live, stale))
}

/// Removes what a dead container left: its cgroup (killing anything still in it), its
/// veth, its record and (unless `keep_log`) its log.
fn clean(state: &StateDir, rec: &Record, keep_log: bool) -> Result<(), ContainerError> {
    let h = Hierarchy::detect()?;
    if let Ok(cg) = Cgroup::open(&h, &rec.cgroup) {
        cg.kill()?;
        cg.remove()?;
    }
    if let Some(b) = &rec.bridge {
        netns::detach(&b.veth)?;
    }
    state.remove(&rec.name, keep_log)
}

fn cstring(what: &str, s: &str) -> Result<CString, ContainerError> {
    CString::new(s)
        .map_err(|_| ContainerError::Invalid(format!("{what} {s:?} contains a NUL byte")))
}

/// Where `cmd` would be found inside `rootfs` (None: on the host), or an error naming it.
fn check_command(rootfs: Option<&Path>, cmd: &str) -> Result<(), ContainerError> {
    let root = rootfs.unwrap_or(Path::new("/"));
    let found = init::exec_paths(cmd).iter().any(|p| {
        let rel = p.to_string_lossy();
        root.join(rel.trim_start_matches('/')).exists()
    });
    if found {
        Ok(())
    } else {
        Err(ContainerError::Invalid(format!(
            "command {cmd:?} not found in {} (searched {})",
            root.display(),
            if cmd.contains('/') {
                "that path".to_string()
            } else {
                init::DEFAULT_PATH.to_string()
            }
        )))
    }
}

/// Creates the cgroup of container `name` below `parent` (None: [`DEFAULT_PARENT`]). One
/// left empty by a crashed stasis (no record names it any more) is removed first; one that
/// still holds processes is refused.
pub fn new_cgroup(
    h: &Hierarchy,
    parent: Option<&str>,
    name: &str,
) -> Result<Cgroup, ContainerError> {
    if let Some(p) = parent {
        check_cgroup_parent(p)?;
    }
    let rel = cgroup_path(parent, name);
    remove_orphan_cgroup(h, &rel)?;
    Ok(Cgroup::create(h, &rel)?)
}

/// Removes cgroup `rel` (a container's, see [`cgroup_path`]) if it exists empty (left by a
/// stasis that died while it built the container); one that holds processes is refused.
/// Only for a name no live record names.
pub fn remove_orphan_cgroup(h: &Hierarchy, rel: &str) -> Result<(), ContainerError> {
    if let Ok(old) = Cgroup::open(h, rel) {
        let pids = old.pids()?;
        if !pids.is_empty() {
            return Err(ContainerError::Invalid(format!(
                "cgroup {rel} already exists and holds processes {pids:?} that no container record names; remove them first"
            )));
        }
        old.remove()?;
    }
    Ok(())
}

/// Opens every cgroup.procs of `cg` for the child to write "0" into (joining it).
pub fn cgroup_joins(cg: &Cgroup) -> Result<Vec<(OwnedFd, PathBuf)>, ContainerError> {
    cg.procs_files()
        .into_iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .map(|f| (OwnedFd::from(f), p.clone()))
                .map_err(|e| ContainerError::io("open", &p, e))
        })
        .collect()
}

/// The namespaces a container gets.
pub fn namespaces(net: NetMode) -> u64 {
    let mut flags =
        libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if net != NetMode::Host {
        flags |= libc::CLONE_NEWNET;
    }
    flags as u64
}

/// Network for a container whose first process is `pid`: lo up, and for a bridge a veth
/// with its address. Returns the attachment.
pub fn connect(
    state: &StateDir,
    name: &str,
    pid: i32,
    net: NetMode,
    ip: Option<(std::net::Ipv4Addr, u8)>,
    mac: Option<netns::MacAddr>,
) -> Result<Option<BridgeAddr>, ContainerError> {
    match net {
        NetMode::Host => Ok(None),
        NetMode::None => {
            netns::lo_up(pid)?;
            Ok(None)
        }
        NetMode::Bridge => {
            let bridge = Bridge::default();
            netns::ensure_bridge(&bridge)?;
            let (ip, prefix) = match ip {
                Some(x) => x,
                None => (
                    netns::allocate_ip(&bridge, &used_ips(state, name)?)?,
                    bridge.prefix,
                ),
            };
            let veth = netns::veth_name(name);
            // What a crashed run may have left under this name.
            netns::detach(&veth)?;
            let v = netns::attach(&bridge, pid, &veth, ip, prefix, mac)?;
            Ok(Some(BridgeAddr {
                ip,
                prefix,
                veth,
                mac: Some(v.mac),
            }))
        }
    }
}

/// Bridge addresses held by live containers other than `except`.
pub fn used_ips(state: &StateDir, except: &str) -> Result<Vec<std::net::Ipv4Addr>, ContainerError> {
    let mut out = Vec::new();
    for n in state.names()? {
        if n == except {
            continue;
        }
        if let Some(r) = state.read(&n)? {
            if let (true, Some(b)) = (r.alive(), &r.bridge) {
                out.push(b.ip);
            }
        }
    }
    Ok(out)
}

/// Cleans up a container that failed to start (or whose restore failed): cgroup, veth and
/// record. Errors are secondary to the one being reported and are ignored.
pub fn undo(state: &StateDir, name: &str, cg: Option<&Cgroup>, veth: Option<&str>) {
    if let Some(cg) = cg {
        let _ = cg.kill();
        let _ = cg.remove();
    }
    if let Some(v) = veth {
        let _ = netns::detach(v);
    }
    let _ = state.remove(name, true);
}

/// The name is free to use: no live container holds it (a stale record is cleaned).
pub fn claim_name(state: &StateDir, name: &str) -> Result<(), ContainerError> {
    super::check_name(name)?;
    if let Some(old) = state.read(name)? {
        if old.alive() {
            return Err(ContainerError::Exists(name.to_string()));
        }
        clean(state, &old, false)?;
    }
    Ok(())
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Starts a container: cgroup with limits, namespaces, mounts, network, record; then its
/// command runs as PID 1. On any failure everything made is removed again.
pub fn run(state: &StateDir, cfg: &Config) -> Result<Record, ContainerError> {
    let lock = state.lock()?;
    claim_name(state, &cfg.name)?;
    let rootfs = match &cfg.rootfs {
        Some(r) => Some(
            std::fs::canonicalize(r).map_err(|e| ContainerError::io("root filesystem", r, e))?,
        ),
        None => None,
    };
    let cmd = cfg
        .command
        .first()
        .ok_or_else(|| ContainerError::Invalid("no command to run".into()))?;
    check_command(rootfs.as_deref(), cmd)?;
    let hostname = cfg.hostname.clone().unwrap_or_else(|| cfg.name.clone());
    let argv = cfg
        .command
        .iter()
        .map(|a| cstring("argument", a))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = vec![
        cstring("env", &format!("PATH={}", init::DEFAULT_PATH))?,
        cstring("env", &format!("HOSTNAME={hostname}"))?,
        cstring("env", "HOME=/")?,
        cstring("env", "TERM=xterm")?,
    ];

    let h = Hierarchy::detect()?;
    let cg = new_cgroup(&h, cfg.cgroup_parent.as_deref(), &cfg.name)?;
    let mut veth = None;
    let result = (|| -> Result<Record, ContainerError> {
        cg.apply(&cfg.limits)?;
        let joins = cgroup_joins(&cg)?;
        let mut ops: Vec<setup::Op> = joins
            .iter()
            .map(|(fd, p)| setup::Op::Write {
                fd: fd.as_raw_fd(),
                bytes: b"0".to_vec(),
                what: format!("join cgroup {}", p.display()),
            })
            .collect();
        ops.push(setup::Op::SetHostname(cstring("host name", &hostname)?));
        ops.extend(setup::mount_ops(rootfs.as_deref(), true));
        let log = if cfg.detach {
            let path = state.log_path(&cfg.name);
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| ContainerError::io("open", &path, e))?;
            let null = std::fs::File::open("/dev/null")
                .map_err(|e| ContainerError::io("open", Path::new("/dev/null"), e))?;
            Some((path, log, null))
        } else {
            None
        };
        let stdio_fds = match &log {
            Some((_, log, null)) => [
                Some(null.as_raw_fd()),
                Some(log.as_raw_fd()),
                Some(log.as_raw_fd()),
            ],
            None => [None, None, None],
        };
        let launch = Launch {
            namespaces: namespaces(cfg.net),
            ops,
            then: Then::Exec {
                paths: init::exec_paths(cmd),
                argv,
                envp,
            },
            stdio: stdio_fds,
        };
        let mut child = init::start(&launch)?;
        drop(joins);
        let bridge = connect(state, &cfg.name, child.pid, cfg.net, cfg.ip, None)?;
        veth = bridge.as_ref().map(|b| b.veth.clone());
        let st = crate::procfs::read_stat(child.pid)?;
        let rec = Record {
            name: cfg.name.clone(),
            pid: child.pid,
            starttime: st.starttime,
            created: now_secs(),
            rootfs: rootfs.clone(),
            hostname: hostname.clone(),
            command: cfg.command.clone(),
            net: cfg.net,
            bridge,
            cgroup: cg.rel().to_string(),
            limits: cfg.limits.clone(),
            log: log.as_ref().map(|(p, _, _)| p.clone()),
        };
        state.write(&rec)?;
        child.go()?;
        child.keep();
        Ok(rec)
    })();
    drop(lock);
    match result {
        Ok(rec) => Ok(rec),
        Err(e) => {
            undo(state, &cfg.name, Some(&cg), veth.as_deref());
            Err(e)
        }
    }
}

/// Waits for a container started in the foreground, passing SIGINT, SIGTERM and SIGHUP on
/// to its init, then cleans it up. Returns its exit status (128+N if killed by signal N).
pub fn wait_foreground(state: &StateDir, rec: &Record) -> Result<i32, ContainerError> {
    let code = crate::sys::wait_forwarding(rec.pid)?;
    let _lock = state.lock()?;
    clean(state, rec, false)?;
    Ok(code)
}

/// Ends a container: SIGTERM to its init, then after `timeout` SIGKILL to everything in its
/// cgroup; then its cgroup, network and record are removed.
pub fn stop(state: &StateDir, name: &str, timeout: Duration) -> Result<(), ContainerError> {
    let rec = running(state, name)?;
    let _ = crate::sys::kill(rec.pid, libc::SIGTERM);
    let deadline = Instant::now() + timeout;
    while rec.alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _lock = state.lock()?;
    clean(state, &rec, false)
}

/// Removes what is left of a container whose processes were killed after a checkpoint:
/// cgroup, network and record; its log stays for the restored container to append to.
pub fn retire(state: &StateDir, name: &str) -> Result<(), ContainerError> {
    let Some(rec) = state.read(name)? else {
        return Ok(());
    };
    let _lock = state.lock()?;
    clean(state, &rec, true)
}

/// Removes a container; a running one only with `force` (it is killed first).
pub fn remove(state: &StateDir, name: &str, force: bool) -> Result<(), ContainerError> {
    let rec = state
        .read(name)?
        .ok_or_else(|| ContainerError::NoSuch(name.to_string()))?;
    if rec.alive() && !force {
        return Err(ContainerError::Running(name.to_string()));
    }
    let _lock = state.lock()?;
    clean(state, &rec, false)
}

/// The cgroup of a running container.
pub fn cgroup_of(rec: &Record) -> Result<Cgroup, ContainerError> {
    Ok(Cgroup::open(&Hierarchy::detect()?, &rec.cgroup)?)
}

/// Freezes every process of a container (cgroup freezer).
pub fn freeze(state: &StateDir, name: &str) -> Result<(), ContainerError> {
    Ok(cgroup_of(&running(state, name)?)?.freeze()?)
}

/// Thaws a frozen container.
pub fn thaw(state: &StateDir, name: &str) -> Result<(), ContainerError> {
    Ok(cgroup_of(&running(state, name)?)?.thaw()?)
}

/// Changes a running container's limits; only those given in `limits` change. Returns the
/// record with the limits now in force.
pub fn set(state: &StateDir, name: &str, limits: &Limits) -> Result<Record, ContainerError> {
    let mut rec = running(state, name)?;
    let cg = cgroup_of(&rec)?;
    cg.apply(limits)?;
    let _lock = state.lock()?;
    rec.limits = cg.read_limits()?;
    state.write(&rec)?;
    Ok(rec)
}

/// Runs `command` inside a running container: all its namespaces and its cgroup. Returns
/// the command's exit status.
pub fn exec(state: &StateDir, name: &str, command: &[String]) -> Result<i32, ContainerError> {
    let rec = running(state, name)?;
    let cg = cgroup_of(&rec)?;
    let joins = cgroup_joins(&cg)?;
    let cmd = command
        .first()
        .ok_or_else(|| ContainerError::Invalid("no command to run".into()))?;
    let mut ns = Vec::new();
    for (kind, flag) in [
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("net", libc::CLONE_NEWNET),
        ("mnt", libc::CLONE_NEWNS),
    ] {
        ns.push((crate::sys::open_ns(rec.pid, kind)?, flag));
    }
    let pid_ns = crate::sys::open_ns(rec.pid, "pid")?;
    // Our children (only) are born in the container's PID namespace.
    crate::sys::setns(
        pid_ns.as_raw_fd(),
        libc::CLONE_NEWPID,
        Path::new(&format!("/proc/{}/ns/pid", rec.pid)),
    )?;
    let raw: Vec<(i32, i32)> = ns.iter().map(|(f, flag)| (f.as_raw_fd(), *flag)).collect();
    let procs: Vec<i32> = joins.iter().map(|(f, _)| f.as_raw_fd()).collect();
    let mut c = std::process::Command::new(cmd);
    c.args(&command[1..])
        .env_clear()
        .env("PATH", init::DEFAULT_PATH)
        .env("HOSTNAME", &rec.hostname)
        .env("HOME", "/")
        .env("TERM", "xterm");
    // SAFETY: the hook runs in the forked child and only makes raw system calls on fds and
    // numbers captured before the fork.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
            for &fd in &procs {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for &(fd, flag) in &raw {
                if libc::setns(fd, flag) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            init::close_all_from(3);
            Ok(())
        });
    }
    let status = c.status().map_err(|e| ContainerError::Start {
        pid: rec.pid,
        step: format!("exec {cmd} in container {name}"),
        err: e,
    })?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

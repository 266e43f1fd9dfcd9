//! Restore of a container image into fresh namespaces.
//!
//! A holder process is cloned into new mount, uts, ipc and (unless the container used the
//! host's) network namespaces; it sets the host name, rebuilds the container's mounts and
//! pivots into its root filesystem. The container gets its cgroup with the saved limits and
//! its network at the saved address (a new one when that is taken by a live container).
//! The process tree is then restored into a new PID namespace whose init joins the holder's
//! namespaces and cgroup; sockets are made inside the container's network namespace. Once
//! the tree runs, the holder exits and the runtime's record is written. If anything fails,
//! everything made is removed again.

use crate::error::RestoreError;
use crate::{restore_tree, Options, PidNamespace, Stats};
use stasis_image::{proto, Image};
use stasis_runtime::cgroups::{Hierarchy, IoKind, IoLimit, Limits};
use stasis_runtime::container::{self as ct, init, setup, BridgeAddr, NetMode, Record, StateDir};
use stasis_runtime::{netns, sysvipc};
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

fn err(name: &str, e: impl std::fmt::Display) -> RestoreError {
    RestoreError::Container {
        name: name.to_string(),
        what: e.to_string(),
    }
}

/// The limits of an image.
pub fn limits_from_proto(l: &proto::ContainerLimits) -> Result<Limits, String> {
    let mut io = Vec::new();
    for t in &l.io {
        let kind = match t.kind.as_str() {
            "rbps" => IoKind::ReadBps,
            "wbps" => IoKind::WriteBps,
            "riops" => IoKind::ReadIops,
            "wiops" => IoKind::WriteIops,
            k => return Err(format!("unknown I/O limit kind {k:?}")),
        };
        io.push(IoLimit {
            dev: (t.major, t.minor),
            kind,
            value: t.value,
        });
    }
    Ok(Limits {
        memory: l.memory,
        swap: l.swap,
        cpus: l.cpus,
        cpu_weight: l.cpu_weight,
        pids: l.pids,
        io,
    })
}

fn perm_from_proto(p: Option<&proto::IpcPerm>) -> sysvipc::IpcPerm {
    let p = p.cloned().unwrap_or_default();
    sysvipc::IpcPerm {
        key: p.key,
        id: p.id,
        mode: p.mode,
        uid: p.uid,
        gid: p.gid,
        cuid: p.cuid,
        cgid: p.cgid,
    }
}

/// The System V IPC objects of an image, checked (ids, keys, sizes, values) before anything
/// is made.
pub fn ipc_from_proto(name: &str, i: &proto::SysvIpc) -> Result<sysvipc::IpcObjects, RestoreError> {
    let bad = |what: String| RestoreError::Invalid(format!("container {name}: {what}"));
    let sem: [u32; 4] = i.sem_limits.as_slice().try_into().map_err(|_| {
        bad(format!(
            "{} semaphore limits instead of 4",
            i.sem_limits.len()
        ))
    })?;
    let mut sems = Vec::new();
    for s in &i.sem {
        let values = s
            .values
            .iter()
            .map(|&v| u16::try_from(v))
            .collect::<Result<Vec<u16>, _>>()
            .map_err(|_| bad("a semaphore value above 65535".into()))?;
        sems.push(sysvipc::SemSet {
            perm: perm_from_proto(s.perm.as_ref()),
            values,
        });
    }
    let objs = sysvipc::IpcObjects {
        version: i.version,
        limits: sysvipc::IpcLimits {
            shmmax: i.shmmax,
            shmall: i.shmall,
            shmmni: i.shmmni,
            shm_rmid_forced: i.shm_rmid_forced,
            msgmax: i.msgmax,
            msgmnb: i.msgmnb,
            msgmni: i.msgmni,
            sem,
        },
        shm: i
            .shm
            .iter()
            .map(|s| sysvipc::ShmSegment {
                perm: perm_from_proto(s.perm.as_ref()),
                size: s.size,
                data: s.data.clone(),
                attached: s.attached,
            })
            .collect(),
        sem: sems,
        msg: i
            .msg
            .iter()
            .map(|q| sysvipc::MsgQueue {
                perm: perm_from_proto(q.perm.as_ref()),
                qbytes: q.qbytes,
                messages: q
                    .messages
                    .iter()
                    .map(|m| sysvipc::Message {
                        mtype: m.mtype,
                        text: m.text.clone(),
                    })
                    .collect(),
            })
            .collect(),
    };
    sysvipc::validate(&objs).map_err(|e| bad(e.to_string()))?;
    Ok(objs)
}

/// The container description of an image, or None for a plain process tree.
pub fn container_of(image: &Image) -> Option<&proto::Container> {
    let inv = image.inventory();
    (inv.kind == proto::WorkloadKind::Container as i32)
        .then_some(inv.container.as_ref())
        .flatten()
}

/// Checks the description before anything is made.
/// `rootfs`, if given, replaces the root file system the image names (and must exist the
/// same way: a container without one of its own gets none).
fn check(
    c: &proto::Container,
    rootfs: Option<&Path>,
) -> Result<(NetMode, Option<PathBuf>, Limits), RestoreError> {
    let net: NetMode = c
        .net_mode
        .parse()
        .map_err(|e: String| RestoreError::Invalid(format!("container {}: {e}", c.name)))?;
    let limits = limits_from_proto(&c.limits.clone().unwrap_or_default())
        .map_err(|e| RestoreError::Invalid(format!("container {}: {e}", c.name)))?;
    let rootfs = match (c.rootfs.is_empty(), rootfs) {
        (true, None) => None,
        (false, None) => Some(PathBuf::from(&c.rootfs)),
        (false, Some(r)) => Some(r.to_path_buf()),
        (true, Some(r)) => {
            return Err(RestoreError::Invalid(format!(
                "container {} has no root file system of its own to be replaced by {}",
                c.name,
                r.display()
            )))
        }
    };
    if let Some(r) = &rootfs {
        if !r.is_dir() {
            return Err(RestoreError::Unsupported(format!(
                "container {}: its root filesystem {} is not a directory on this host",
                c.name,
                r.display()
            )));
        }
    }
    for i in &c.interfaces {
        if i.kind != "loopback" && i.kind != "veth" {
            return Err(RestoreError::Unsupported(format!(
                "container {}: interface {} is a {}, which stasis cannot recreate",
                c.name, i.name, i.kind
            )));
        }
    }
    Ok((net, rootfs, limits))
}

/// The bridge address saved in the image (the veth's first IPv4 address).
fn saved_addr(c: &proto::Container) -> Option<(std::net::Ipv4Addr, u8)> {
    let eth = c.interfaces.iter().find(|i| i.kind == "veth")?;
    eth.addresses.iter().find_map(|a| {
        let (ip, p) = a.split_once('/')?;
        Some((ip.parse().ok()?, p.parse().ok()?))
    })
}

/// The saved network configuration (checked before anything is made).
fn net_config(c: &proto::Container) -> Result<Option<netns::NetConfig>, RestoreError> {
    if c.net_config_json.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&c.net_config_json)
        .map(Some)
        .map_err(|e| {
            RestoreError::Invalid(format!(
                "container {}: its network configuration is unreadable: {e}",
                c.name
            ))
        })
}

/// Rebuilds the container's network in the holder's namespace: exactly as saved (same
/// address, MAC and routes) unless a live container holds the address now, then on a new
/// address (returned second, for a warning).
fn network(
    state: &StateDir,
    name: &str,
    c: &proto::Container,
    (net, cfg): (NetMode, Option<&netns::NetConfig>),
    pid: i32,
) -> Result<(Option<BridgeAddr>, Option<std::net::Ipv4Addr>), RestoreError> {
    let e = |x: ct::ContainerError| err(name, x);
    let r = |x: stasis_runtime::RuntimeError| err(name, x);
    match net {
        NetMode::Host => Ok((None, None)),
        NetMode::None => {
            netns::lo_up(pid).map_err(r)?;
            Ok((None, None))
        }
        NetMode::Bridge => {
            let used = ct::used_ips(state, name).map_err(e)?;
            match (saved_addr(c), cfg) {
                (Some((ip, prefix)), Some(cfg)) if !used.contains(&ip) => {
                    let bridge = netns::Bridge::default();
                    netns::ensure_bridge(&bridge).map_err(r)?;
                    let veth = netns::veth_name(name);
                    netns::detach(&veth).map_err(r)?;
                    netns::recreate(&bridge, pid, cfg, &veth).map_err(r)?;
                    let mac = cfg
                        .interfaces
                        .iter()
                        .find(|i| i.kind == netns::InterfaceKind::Veth)
                        .and_then(|i| i.mac);
                    Ok((
                        Some(BridgeAddr {
                            ip,
                            prefix,
                            veth,
                            mac,
                        }),
                        None,
                    ))
                }
                _ => {
                    let b = ct::connect(state, name, pid, net, None, None).map_err(e)?;
                    let moved = b.as_ref().map(|b| b.ip);
                    Ok((b, moved))
                }
            }
        }
    }
}

fn open_ns(pid: i32, kind: &str) -> Result<OwnedFd, RestoreError> {
    stasis_runtime::sys::open_ns(pid, kind)
        .map(OwnedFd::from)
        .map_err(|cause| RestoreError::Apply { pid, cause })
}

/// The root process of an image's tree.
fn image_root(image: &Image) -> Option<&proto::Process> {
    image.processes().first()
}

/// Restores the container of `image` under `name` (default: its own). Returns the restore
/// statistics and the new record.
pub fn restore_container(
    image: &Image,
    state: &StateDir,
    name: Option<&str>,
    opts: &Options,
) -> Result<(Stats, Record), RestoreError> {
    let c = container_of(image)
        .ok_or_else(|| RestoreError::Invalid("the image is not a container image".into()))?;
    let name = name.unwrap_or(&c.name).to_string();
    let (net, rootfs, limits) = check(c, opts.container_rootfs.as_deref())?;
    let net_cfg = net_config(c)?;
    let ipc = c
        .ipc
        .as_ref()
        .map(|i| ipc_from_proto(&c.name, i))
        .transpose()?;
    // Every byte is checked before anything is made.
    image.verify().map_err(RestoreError::Image)?;
    crate::validate::security(image)?;
    let lock = state.lock().map_err(|e| err(&name, e))?;
    ct::claim_name(state, &name).map_err(|e| match e {
        ct::ContainerError::Exists(_) | ct::ContainerError::BadName(_) => {
            RestoreError::Unsupported(format!("{e}; restore it under another name with --name"))
        }
        e => err(&name, e),
    })?;
    let h = Hierarchy::detect().map_err(|e| err(&name, e))?;
    let parent = opts.container_cgroup_parent.as_deref();
    let cg = ct::new_cgroup(&h, parent, &name).map_err(|e| err(&name, e))?;
    let mut veth = None;
    let result = (|| -> Result<(Stats, Record), RestoreError> {
        cg.apply(&limits).map_err(|e| err(&name, e))?;
        let hostname = CString::new(c.hostname.as_str())
            .map_err(|_| RestoreError::Invalid("host name with a NUL byte".into()))?;
        let mut ops = vec![setup::Op::SetHostname(hostname)];
        ops.extend(setup::mount_ops(rootfs.as_deref(), false));
        let namespaces = ct::namespaces(net) & !(libc::CLONE_NEWPID as u64);
        let holder = init::start(&init::Launch {
            namespaces,
            ops,
            then: init::Then::Hold,
            stdio: [None, None, None],
        })
        .map_err(|e| err(&name, e))?;
        if let Some(objs) = &ipc {
            sysvipc::recreate(holder.pid, objs).map_err(|e| err(&name, e))?;
        }
        // Established connections stay locked off the network in the new namespace from
        // before its interface comes up until they are rebuilt (restore_tree unlocks them),
        // so a retransmission from a peer never meets a namespace without the socket.
        let tuples = crate::tcp_tuples(&crate::validate::processes(image)?);
        if !tuples.is_empty() && net != NetMode::Host {
            let _in_ns =
                stasis_runtime::sys::InNetns::enter(holder.pid).map_err(|e| err(&name, e))?;
            stasis_runtime::netlock::lock(&tuples)
                .map_err(|e| err(&name, e))?
                .keep();
        }
        let (bridge, moved) = network(state, &name, c, (net, net_cfg.as_ref()), holder.pid)?;
        veth = bridge.as_ref().map(|b| b.veth.clone());
        let mut join = Vec::new();
        for kind in ["mnt", "uts", "ipc"] {
            join.push(open_ns(holder.pid, kind)?);
        }
        if net != NetMode::Host {
            join.push(open_ns(holder.pid, "net")?);
        }
        let cgroup_procs = ct::cgroup_joins(&cg)
            .map_err(|e| err(&name, e))?
            .into_iter()
            .map(|(fd, _)| fd)
            .collect();
        // Standard output and error that went to the container's log go to the new one.
        let log_fds: Vec<u32> = image_root(image)
            .map(|p| {
                p.fds
                    .iter()
                    .filter(|f| f.inherited_from == "container log")
                    .map(|f| f.fd)
                    .collect()
            })
            .unwrap_or_default();
        let log = if log_fds.is_empty() {
            None
        } else {
            let path = state.log_path(&name);
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| err(&name, format!("opening {}: {e}", path.display())))?;
            Some((path, f))
        };
        let mut o = Options {
            inherit_fds: opts.inherit_fds.clone(),
            pid_wait: opts.pid_wait,
            hold: opts.hold.clone(),
            precopied: opts.precopied.clone(),
            ..Default::default()
        };
        if let Some((_, f)) = &log {
            for fd in &log_fds {
                o.inherit_fds
                    .insert(*fd, std::os::fd::AsRawFd::as_raw_fd(f));
            }
        }
        o.pid_namespace = Some(PidNamespace {
            join,
            mount_proc: true,
            cgroup_procs,
        });
        o.root = Some(PathBuf::from(format!("/proc/{}/root", holder.pid)));
        // Sockets are made, and connections unlocked, in the joined network namespace.
        let mut stats = restore_tree(image, &o)?;
        if let Some(objs) = &ipc {
            if let Err(e) = sysvipc::finish(holder.pid, objs) {
                stats
                    .warnings
                    .push(format!("finishing its System V IPC objects: {e}"));
            }
        }
        if let (Some(ip), Some(old)) = (moved, saved_addr(c)) {
            stats.warnings.push(format!(
                "its address {} is held by a running container; it is now at {ip}",
                old.0
            ));
        }
        holder.release_hold();
        let st = stasis_runtime::procfs::read_stat(stats.pid).map_err(|e| err(&name, e))?;
        let rec = Record {
            name: name.clone(),
            pid: stats.pid,
            starttime: st.starttime,
            created: c.created,
            rootfs: rootfs.clone(),
            hostname: c.hostname.clone(),
            command: c.command.clone(),
            net,
            bridge,
            cgroup: cg.rel().to_string(),
            limits: cg.read_limits().map_err(|e| err(&name, e))?,
            log: log.map(|(p, _)| p),
        };
        state.write(&rec).map_err(|e| err(&name, e))?;
        Ok((stats, rec))
    })();
    drop(lock);
    match result {
        Ok(r) => Ok(r),
        Err(e) => {
            ct::undo(state, &name, Some(&cg), veth.as_deref());
            Err(e)
        }
    }
}

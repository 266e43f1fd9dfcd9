//! Checkpoint of a container by name: its process tree (frozen through its cgroup) plus
//! what surrounds it — host name, mounts, network configuration, cgroup limits and the
//! runtime's record — in the image's inventory.

use crate::error::CheckpointError;
use crate::session::TreeSession;
use crate::{ImageSink, Options, Progress, Stats};
use stasis_image::proto;
use stasis_runtime::cgroups::{IoKind, Limits};
use stasis_runtime::container::{self as ct, setup, NetMode, Record, StateDir};
use stasis_runtime::{netns, sys, sysvipc};

fn err(name: &str, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Container {
        name: name.to_string(),
        what: e.to_string(),
    }
}

/// The limits in image form.
pub fn limits_to_proto(l: &Limits) -> proto::ContainerLimits {
    proto::ContainerLimits {
        memory: l.memory,
        swap: l.swap,
        cpus: l.cpus,
        cpu_weight: l.cpu_weight,
        pids: l.pids,
        io: l
            .io
            .iter()
            .map(|i| proto::IoThrottle {
                major: i.dev.0,
                minor: i.dev.1,
                kind: match i.kind {
                    IoKind::ReadBps => "rbps",
                    IoKind::WriteBps => "wbps",
                    IoKind::ReadIops => "riops",
                    IoKind::WriteIops => "wiops",
                }
                .into(),
                value: i.value,
            })
            .collect(),
    }
}

fn perm_to_proto(p: &sysvipc::IpcPerm) -> proto::IpcPerm {
    proto::IpcPerm {
        key: p.key,
        id: p.id,
        mode: p.mode,
        uid: p.uid,
        gid: p.gid,
        cuid: p.cuid,
        cgid: p.cgid,
    }
}

/// A System V segment in image form.
pub fn shm_to_proto(s: &sysvipc::ShmSegment) -> proto::SysvShm {
    proto::SysvShm {
        perm: Some(perm_to_proto(&s.perm)),
        size: s.size,
        data: s.data.clone(),
        attached: s.attached,
    }
}

/// The System V IPC objects in image form.
pub fn ipc_to_proto(o: &sysvipc::IpcObjects) -> proto::SysvIpc {
    let l = &o.limits;
    proto::SysvIpc {
        version: o.version,
        shmmax: l.shmmax,
        shmall: l.shmall,
        shmmni: l.shmmni,
        shm_rmid_forced: l.shm_rmid_forced,
        msgmax: l.msgmax,
        msgmnb: l.msgmnb,
        msgmni: l.msgmni,
        sem_limits: l.sem.to_vec(),
        shm: o.shm.iter().map(shm_to_proto).collect(),
        sem: o
            .sem
            .iter()
            .map(|s| proto::SysvSem {
                perm: Some(perm_to_proto(&s.perm)),
                values: s.values.iter().map(|&v| u32::from(v)).collect(),
            })
            .collect(),
        msg: o
            .msg
            .iter()
            .map(|q| proto::SysvMsgQueue {
                perm: Some(perm_to_proto(&q.perm)),
                qbytes: q.qbytes,
                messages: q
                    .messages
                    .iter()
                    .map(|m| proto::SysvMsg {
                        mtype: m.mtype,
                        text: m.text.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// Mounts of the container's mount namespace (from its init's mountinfo, paths relative to
/// its root). With a root filesystem only the root and the standard mounts `stasis run`
/// makes are supported; anything else is refused by name.
fn mounts(rec: &Record) -> Result<Vec<proto::MountPoint>, CheckpointError> {
    let path = format!("/proc/{}/mountinfo", rec.pid);
    let text = stasis_runtime::procfs::read_text(&path)?;
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split_whitespace().collect();
        let r: Vec<&str> = right.split_whitespace().collect();
        let (Some(mp), Some(fstype)) = (l.get(4), r.first()) else {
            continue;
        };
        let m = proto::MountPoint {
            path: mp.to_string(),
            fstype: fstype.to_string(),
            source: r.get(1).unwrap_or(&"").to_string(),
            options: l.get(5).unwrap_or(&"").to_string(),
        };
        if rec.rootfs.is_some()
            && m.path != "/"
            && !setup::STANDARD_MOUNTS
                .iter()
                .any(|(p, t)| *p == m.path && *t == m.fstype)
        {
            return Err(CheckpointError::unsupported(
                rec.pid,
                format!(
                    "container {}: its mount namespace has a {} mount at {} that stasis did not make; only the root filesystem and {} are supported",
                    rec.name,
                    m.fstype,
                    m.path,
                    setup::STANDARD_MOUNTS.map(|(p, _)| p).join(", ")
                ),
            ));
        }
        out.push(m);
    }
    Ok(out)
}

/// Everything about the container but its processes.
pub fn describe(rec: &Record) -> Result<proto::Container, CheckpointError> {
    let cg = ct::cgroup_of(rec).map_err(|e| err(&rec.name, e))?;
    let limits = cg.read_limits().map_err(|e| err(&rec.name, e))?;
    let hostname = sys::hostname_of(rec.pid)?;
    let net = match rec.net {
        NetMode::Host => None,
        _ => Some(netns::capture(rec.pid)?),
    };
    let interfaces = net
        .iter()
        .flat_map(|n| n.interfaces.iter())
        .map(|i| proto::NetInterface {
            name: i.name.clone(),
            kind: i.kind.to_string(),
            mac: i.mac.map(|m| m.to_string()).unwrap_or_default(),
            mtu: i.mtu,
            up: i.up,
            addresses: i.addresses.iter().map(|a| a.local.to_string()).collect(),
        })
        .collect();
    let routes = net
        .iter()
        .flat_map(|n| n.routes.iter())
        .map(|r| proto::NetRoute {
            destination: r.dst.to_string(),
            gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
            dev: r.dev.clone().unwrap_or_default(),
        })
        .collect();
    let net_config_json = match &net {
        Some(n) => serde_json::to_string(n).map_err(|e| err(&rec.name, e))?,
        None => String::new(),
    };
    Ok(proto::Container {
        name: rec.name.clone(),
        hostname,
        rootfs: rec
            .rootfs
            .as_ref()
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_default(),
        command: rec.command.clone(),
        net_mode: rec.net.to_string(),
        interfaces,
        routes,
        limits: Some(limits_to_proto(&limits)),
        mounts: mounts(rec)?,
        created: rec.created,
        record_json: serde_json::to_string(rec).map_err(|e| err(&rec.name, e))?,
        net_config_json,
        // Read by checkpoint_tree while the tree is frozen.
        ipc: None,
    })
}

/// A container being checkpointed: its tree's [`TreeSession`] plus its record. Every step
/// runs in the container's network namespace (its sockets are read, its connections locked
/// and unlocked there); the thread's own namespace is back when each step returns.
pub struct ContainerSession {
    state: StateDir,
    rec: Record,
    /// Its network namespace, opened while it ran (None: it shares the host's).
    netns: Option<std::fs::File>,
    /// None once resumed or killed.
    tree: Option<TreeSession>,
}

impl ContainerSession {
    /// Freezes the running container `name` (see [`TreeSession::freeze`]); `opts` gets the
    /// container's description.
    pub fn freeze(state: &StateDir, name: &str, opts: &Options) -> Result<Self, CheckpointError> {
        let rec = ct::running(state, name).map_err(|e| match e {
            ct::ContainerError::NoSuch(n) => CheckpointError::NoSuchContainer(n),
            e => err(name, e),
        })?;
        let mut opts = opts.clone();
        opts.container = Some(describe(&rec)?);
        if let Some(log) = &rec.log {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::metadata(log) {
                opts.stdio_log = Some((m.dev(), m.ino()));
            }
        }
        let netns = match rec.net {
            NetMode::Host => None,
            _ => Some(sys::open_ns(rec.pid, "net")?),
        };
        let tree = {
            let _in = enter(&netns, rec.pid)?;
            TreeSession::freeze(rec.pid, &opts)?
        };
        Ok(ContainerSession {
            state: state.clone(),
            rec,
            netns,
            tree: Some(tree),
        })
    }

    /// The tree's session (None once resumed or killed).
    pub fn tree(&self) -> Option<&TreeSession> {
        self.tree.as_ref()
    }

    /// See [`TreeSession::set_precopied`].
    pub fn set_precopied(&mut self, covered: std::collections::BTreeMap<i32, Vec<(u64, u64)>>) {
        if let Some(t) = self.tree.as_mut() {
            t.set_precopied(covered);
        }
    }

    /// The tree's session, taken out for a step that ends it.
    fn take_tree(&mut self) -> Result<TreeSession, CheckpointError> {
        self.tree
            .take()
            .ok_or_else(|| err(&self.rec.name, "it is not frozen"))
    }

    /// See [`TreeSession::write`].
    pub fn write<S: ImageSink>(
        &mut self,
        sink: S,
        progress: Progress<'_>,
    ) -> Result<S, CheckpointError> {
        let _in = enter(&self.netns, self.rec.pid)?;
        let name = &self.rec.name;
        self.tree
            .as_mut()
            .ok_or_else(|| err(name, "it is not frozen"))?
            .write(sink, progress)
    }

    /// Records how long committing the image took.
    pub fn set_commit_us(&mut self, us: u64) {
        if let Some(t) = self.tree.as_mut() {
            t.set_commit_us(us);
        }
    }

    /// See [`TreeSession::resume`].
    pub fn resume(&mut self) -> Result<Stats, CheckpointError> {
        let _in = enter(&self.netns, self.rec.pid)?;
        self.take_tree()?.resume()
    }

    /// See [`TreeSession::kill`]; then what is left of the container (cgroup, veth, record)
    /// is removed.
    pub fn kill(&mut self) -> Result<Stats, CheckpointError> {
        let stats = {
            let _in = enter(&self.netns, self.rec.pid)?;
            self.take_tree()?.kill()?
        };
        ct::retire(&self.state, &self.rec.name).map_err(|e| {
            err(
                &self.rec.name,
                format!("the image is written and the container killed, but removing what is left of it failed: {e}"),
            )
        })?;
        Ok(stats)
    }

    /// See [`TreeSession::leave_stopped`]; its record, cgroup and network stay.
    pub fn leave_stopped(&mut self) -> Result<Vec<i32>, CheckpointError> {
        let _in = enter(&self.netns, self.rec.pid)?;
        self.take_tree()?.leave_stopped()
    }

    /// See [`TreeSession::abandon`].
    pub fn abandon(&mut self, cause: CheckpointError) -> CheckpointError {
        let Some(tree) = self.tree.take() else {
            return cause;
        };
        match enter(&self.netns, self.rec.pid) {
            Ok(_in) => tree.abandon(cause),
            // Resumed anyway; its connections are unlocked where this thread is.
            Err(e) => {
                let _ = tree.abandon(cause);
                e
            }
        }
    }
}

impl Drop for ContainerSession {
    fn drop(&mut self) {
        // Resumed (and its connections unlocked) in its own network namespace.
        if let Some(tree) = self.tree.take() {
            let _in = enter(&self.netns, self.rec.pid);
            drop(tree);
        }
    }
}

/// Enters the container's network namespace, if it has one of its own.
fn enter(netns: &Option<std::fs::File>, pid: i32) -> Result<Option<sys::InNetns>, CheckpointError> {
    Ok(match netns {
        Some(f) => Some(sys::InNetns::enter_file(f, &format!("/proc/{pid}/ns/net"))?),
        None => None,
    })
}

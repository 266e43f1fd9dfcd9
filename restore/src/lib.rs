//! Restore: read → validate → plan → apply → resume.
//!
//! [`validate`] checks the whole image and this machine (every hash, every PID is free, the
//! files exist, the CPU and vDSO match) before anything is created. [`ghosts`] and [`shmem`]
//! recreate deleted files and shared anonymous memory once for the tree; [`plan`] prepares
//! the open file descriptions the processes share (files, pipes refilled with their bytes)
//! and the tree's shape, sessions and groups. [`apply`] forks the tree with its original PIDs
//! (clone3 set_tid, each parent forking its own children), replaces each address space
//! through injected syscalls, writes the pages, restores signal state, rseq and registers,
//! and lets every process run only once all are built. A failure at any point kills
//! everything created; the image is never modified.
//!
//! An image of a whole pid namespace (a container's tree, whose root was PID 1 there) is
//! restored into a fresh pid namespace: the root is cloned with CLONE_NEWPID and becomes its
//! PID 1, every other process gets its image PID inside it, so nothing can collide with the
//! host's PIDs. The processes then have two PIDs: the image's, which they see and which every
//! injected syscall uses, and a host PID, read from the kernel (/proc children and NSpid),
//! which the restorer uses for everything it does from outside (ptrace, /proc, kill, wait).
//! [`PidNamespace`] says which other namespaces and cgroups the new root enters first, and
//! [`Options::root`] where the image's paths are found.

pub mod apply;
pub mod cgroups;
pub mod container;
pub mod error;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod ghosts;
pub mod locks;
pub mod mmflags;
pub mod pages;
pub mod plan;
pub mod precopied;
pub mod seccomp;
pub mod shmem;
pub mod sockets;
pub mod validate;
pub mod vm;

pub use error::RestoreError;
pub use precopied::{Precopied, PrecopiedMapping};

use serde::Serialize;
use stasis_image::Image;
use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How to restore.
#[derive(Debug)]
pub struct Options {
    /// Standard I/O fds the image marks as inherited: image fd → this process's fd to pass.
    /// Fds not listed get this process's fd of the same number.
    pub inherit_fds: BTreeMap<u32, i32>,
    /// How long to wait for the original PID to be released (a killed original may still be
    /// an unreaped zombie for a few seconds). Not used for a pid-namespace image.
    pub pid_wait: Duration,
    /// What the new pid namespace of a pid-namespace image joins (see [`PidNamespace`]).
    /// Only for such images (`Inventory.pid_namespace`); giving it for an image of a tree in
    /// stasis's own pid namespace is an error. None: a fresh pid namespace that joins nothing.
    pub pid_namespace: Option<PidNamespace>,
    /// Directory the image's paths resolve under (e.g. /proc/HOLDER/root of a process whose
    /// mount namespace the tree joins); default "/". Every path the restorer itself opens,
    /// stats, creates or binds (files and FIFOs the fds reopen, ghost files, files in flight,
    /// inotify watches, unix socket names, and the exe/cwd/root/mapped-file checks) goes
    /// under it. A unix socket is bound from a thread chrooted into it, so the socket gets
    /// exactly its old name however long `root` is. What the new processes open themselves
    /// (their executable and mapped files, their cwd and chroot) resolves in their own mount
    /// namespace: `root` should name that namespace's root, as seen from the restorer.
    pub root: Option<PathBuf>,
    /// Called once the whole tree is built and stopped, before anything of it runs and
    /// before its TCP connections are unlocked (see [`Hold`]).
    pub hold: Option<Hold>,
    /// A container's root file system is this directory on this host instead of the one
    /// its image names (a copy a migration brought along).
    pub container_rootfs: Option<PathBuf>,
    /// A container's cgroup goes below this cgroup (None: stasis's default parent).
    pub container_cgroup_parent: Option<String>,
    /// The pages of the mappings the image marks pre-copied (a migration's receiver holds
    /// them; see [`precopied`]).
    pub precopied: Option<std::sync::Arc<Precopied>>,
}

/// A restored tree, whole and stopped, that nothing of has run yet.
#[derive(Debug, Clone, Copy)]
pub struct Held {
    /// The root's PID as this process sees it.
    pub pid: i32,
    pub processes: u64,
}

/// The decision over a [`Held`] tree, made on the restoring thread (it is the tracer of
/// every stopped thread): Ok lets the tree run; an error (e.g. [`RestoreError::Discarded`])
/// kills it before it ran, undoes what the restore made, and is what the restore returns.
#[derive(Clone)]
pub struct Hold(pub std::sync::Arc<HoldFn>);

/// The function of a [`Hold`].
pub type HoldFn = dyn Fn(&Held) -> Result<(), RestoreError> + Send + Sync;

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hold(..)")
    }
}

/// The namespaces and cgroups the root of a pid-namespace image enters, in this order, right
/// after it is cloned into its new pid namespace and before it forks anything: every process
/// of the tree inherits them.
#[derive(Debug, Default)]
pub struct PidNamespace {
    /// Namespace files (e.g. opened from /proc/HOLDER/ns/{mnt,uts,ipc,net}) that the new
    /// root joins with setns right after it is cloned, before anything else. Pid and user
    /// namespaces are refused (the tree's pid namespace is the new one; a user namespace
    /// would change what the restorer may do to the tree). With a network namespace, the
    /// sockets the restorer makes for the tree (listeners, unix sockets, UDP, rebuilt TCP
    /// connections) are made in it, from a thread that joined it.
    pub join: Vec<OwnedFd>,
    /// Mount a fresh proc at /proc (nosuid, nodev, noexec; after joining the mount
    /// namespace), so /proc shows the new pid namespace. Needs a mount namespace in `join`:
    /// the host's /proc is never covered. The mount is made in that namespace and stays
    /// there (make its propagation private or slave if it must not reach other namespaces;
    /// unshare(1) makes it private).
    pub mount_proc: bool,
    /// cgroup.procs files (opened for writing by the caller before the restore) the root
    /// writes "0" into before it forks its children, so the whole tree is in those cgroups
    /// before any memory is written.
    pub cgroup_procs: Vec<OwnedFd>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            inherit_fds: BTreeMap::new(),
            pid_wait: Duration::from_secs(10),
            pid_namespace: None,
            root: None,
            hold: None,
            container_rootfs: None,
            container_cgroup_parent: None,
            precopied: None,
        }
    }
}

impl Options {
    /// Where the restorer finds the image's path `path`: under [`Options::root`] (a
    /// relative path, a unix socket bound by a relative name, is taken relative to it too;
    /// without a root it stays relative).
    pub fn host_path(&self, path: &str) -> PathBuf {
        match &self.root {
            None => PathBuf::from(path),
            Some(root) => root.join(path.trim_start_matches('/')),
        }
    }

    /// The root directory of the image's paths, if it is not "/".
    pub fn root_dir(&self) -> Option<&Path> {
        self.root.as_deref().filter(|r| *r != Path::new("/"))
    }
}

/// Measurements of one restore (microseconds).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// PID of the root process (as the restorer sees it: for a pid-namespace image, its
    /// host PID).
    pub pid: i32,
    /// For a pid-namespace image: the root's PID inside its new namespace (1).
    pub ns_pid: Option<i32>,
    pub processes: u64,
    /// Checking every byte of the image.
    pub verify_us: u64,
    /// Waiting for the original PID to be released.
    pub pid_wait_us: u64,
    /// From the start until the process runs again.
    pub total_us: u64,
    pub vmas: u64,
    pub pages_written: u64,
    pub bytes_written: u64,
    /// Established TCP connections rebuilt (TCP_REPAIR) and unlocked.
    pub tcp_connections: u64,
    /// Things that went wrong after the tree was running again (it runs on regardless).
    pub warnings: Vec<String>,
}

/// Restores the process tree of `image`. Returns when every process runs again (the root is
/// our child; the caller waits for it, by the host PID in [`Stats::pid`], or leaves it).
pub fn restore_tree(image: &Image, opts: &Options) -> Result<Stats, RestoreError> {
    let t0 = Instant::now();
    let procs = validate::processes(image)?;
    let pid_ns = image.inventory().pid_namespace;
    validate::options(opts, pid_ns)?;
    let tv = Instant::now();
    image.verify().map_err(RestoreError::Image)?;
    let verify_us = tv.elapsed().as_micros() as u64;
    let ghost_files = validate::ghost_files(&procs);
    for p in &procs {
        validate::process(image, p, &ghost_files, opts)?;
        precopied::check(p, opts.precopied.as_deref())?;
    }
    validate::unix_pairs(&procs, opts)?;
    let cgroups = cgroups::plan(&procs, opts)?;
    let ghosts = ghosts::recreate(image, &procs, opts)?;
    let shmem = shmem::recreate(image, &procs)?;
    // Sockets are made in the network namespace the tree will be in.
    let net = validate::net_to_join(opts)?;
    let plan = match net {
        Some(net) => stasis_runtime::sys::in_net_namespace(net, || {
            plan::plan(&procs, opts, (&ghosts, &shmem), pid_ns)
        })??,
        None => plan::plan(&procs, opts, (&ghosts, &shmem), pid_ns)?,
    };
    let tw = Instant::now();
    // In a fresh pid namespace no PID can be taken.
    if !pid_ns {
        for p in &procs {
            validate::wait_pid_free(p.pid as i32, opts.pid_wait)?;
            for t in p.threads.iter().skip(1) {
                validate::wait_pid_free(t.tid as i32, opts.pid_wait)?;
            }
        }
    }
    let pid_wait_us = tw.elapsed().as_micros() as u64;
    // The connections are let back onto the network (a checkpoint that killed the tree left
    // them locked) in the namespace they are in, the one the tree joined, before anything
    // runs; a restore that cannot unlock them fails.
    let tcp = tcp_tuples(&procs);
    // Ports whose new connections the checkpoint held for the listeners.
    let held: Vec<u16> = image
        .inventory()
        .held_ports
        .iter()
        .filter_map(|&p| u16::try_from(p).ok())
        .collect();
    let unlock = || match net {
        Some(net) => stasis_runtime::sys::in_net_namespace(net, || {
            stasis_runtime::netlock::unlock_all(&tcp, &held)
        })
        .and_then(|r| r),
        None => stasis_runtime::netlock::unlock_all(&tcp, &held),
    };
    let (written, pid) = apply::apply(
        image,
        &procs,
        plan,
        (&cgroups, &unlock, opts.hold.as_ref()),
        opts.precopied.as_deref(),
    )?;
    // Held until every process has mapped its objects (apply returns after that).
    drop((ghosts, shmem));
    let warnings = Vec::new();
    Ok(Stats {
        tcp_connections: tcp.len() as u64,
        warnings,
        pid,
        ns_pid: pid_ns.then_some(procs[0].pid as i32),
        processes: procs.len() as u64,
        verify_us,
        pid_wait_us,
        total_us: t0.elapsed().as_micros() as u64,
        vmas: procs.iter().map(|p| p.vmas.len() as u64).sum(),
        pages_written: written.pages,
        bytes_written: written.bytes,
    })
}

/// Local and peer address of every TCP connection of the tree, once each.
pub fn tcp_tuples(procs: &[&stasis_image::proto::Process]) -> Vec<stasis_runtime::netlock::Tuple> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for p in procs {
        for (f, c) in p.fds.iter().filter_map(|f| Some((f, f.tcp.as_ref()?))) {
            let local = events::socket_addr(p, &c.ip, c.port);
            let peer = events::socket_addr(p, &c.peer_ip, c.peer_port);
            if let (Ok(l), Ok(r), true) = (local, peer, seen.insert(f.socket_id)) {
                out.push((l, r));
            }
        }
    }
    out
}

/// Waits for a restored child to exit; returns its exit code (128+signal if killed).
pub fn wait_exit(pid: i32) -> Result<i32, RestoreError> {
    loop {
        match stasis_runtime::ptrace::wait_stop(pid)? {
            stasis_runtime::ptrace::Stop::Exited(code) => return Ok(code),
            stasis_runtime::ptrace::Stop::Killed(sig) => return Ok(128 + sig),
            _ => continue,
        }
    }
}

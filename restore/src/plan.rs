//! What the new processes set up themselves: the tree's shape, sessions and groups, the
//! open file descriptions they share, and where the trampoline goes.

use crate::error::RestoreError;
use crate::shmem::SharedObjects;
use crate::Options;
use stasis_image::proto::{self, FdKind, VmaKind};
use stasis_runtime::procfs;
use stasis_runtime::spawn::{Exit, FdPlan, NewPidNs, ProcSpec, TreeSpec};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// File status flags F_SETFL can change. O_ASYNC is not among them: it is set by the
/// process that holds the fd (crate::locks), so that its signals carry that fd's number.
const SETFL_MASK: u32 =
    (libc::O_APPEND | libc::O_NONBLOCK | libc::O_DIRECT | libc::O_NOATIME) as u32;

/// Scratch memory after the trampoline's code page.
pub const SCRATCH_LEN: u64 = 64 * 1024;

/// Most fds one process may have.
const MAX_FDS: usize = 4096;

/// The tree to create, and the open file descriptions it inherits from us.
pub struct Plan {
    pub spec: TreeSpec,
    /// Open file descriptions (files, pipe ends, sockets, event fds) prepared for the tree, at
    /// numbers above every target fd; closed once the tree has inherited them.
    pub descs: Vec<OwnedFd>,
    /// Rebuilt TCP connections, still in repair mode: each with the bytes never sent and a
    /// name, finished (tcp_repair::finish) once the whole tree is built.
    pub tcp: Vec<(OwnedFd, Vec<u8>, String)>,
    /// The fd every process keeps (TreeSpec::keep_fds) of each shared memory object and
    /// ghost file some process maps: it maps that fd itself, since the /proc it sees may not
    /// show the restorer (a new pid namespace with its own /proc).
    pub shmem_fds: BTreeMap<u64, i32>,
    pub ghost_fds: BTreeMap<u32, i32>,
}

fn cstr(s: &str, what: &str) -> Result<CString, RestoreError> {
    CString::new(s).map_err(|_| RestoreError::Invalid(format!("{what} {s:?} contains a NUL byte")))
}

fn path_cstr(path: &std::path::Path, what: &str) -> Result<CString, RestoreError> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        RestoreError::Invalid(format!("{what} {} contains a NUL byte", path.display()))
    })
}

fn os_err(what: String) -> RestoreError {
    RestoreError::Unsupported(format!("{what}: {}", std::io::Error::last_os_error()))
}

/// Builds the plan for `procs` (image order: every parent before its children); `pid_ns`:
/// the image is of a whole pid namespace, made anew with what `opts.pid_namespace` says.
pub fn plan(
    procs: &[&proto::Process],
    opts: &Options,
    (ghosts, shmem): (&crate::ghosts::Recreated, &SharedObjects),
    pid_ns: bool,
) -> Result<Plan, RestoreError> {
    raise_nofile();
    let max_target = procs
        .iter()
        .flat_map(|p| p.fds.iter().map(|f| f.fd))
        .max()
        .unwrap_or(2)
        .max(2);
    if max_target > 1 << 20 {
        return Err(RestoreError::Invalid(format!(
            "fd number {max_target} is implausible"
        )));
    }
    let mut d = Descs {
        base: max_target as i32 + 1,
        fds: Vec::new(),
        by_id: BTreeMap::new(),
        pipes: BTreeMap::new(),
        sockets: BTreeMap::new(),
        tcp: Vec::new(),
    };
    for p in procs {
        for pipe in &p.pipes {
            d.create_pipe(p, pipe, opts)?;
        }
        for pair in &p.unix_pairs {
            d.create_unix_pair(p, pair)?;
        }
    }
    let mut shmem_fds = BTreeMap::new();
    let mut ghost_fds = BTreeMap::new();
    for v in procs.iter().flat_map(|p| p.vmas.iter()) {
        if v.kind() == VmaKind::AnonShared && !shmem_fds.contains_key(&v.shmem_id) {
            let fd = d.place(shmem.fd(v.shmem_id)?, "shared memory object")?;
            shmem_fds.insert(v.shmem_id, fd);
        } else if v.ghost_id != 0 && !ghost_fds.contains_key(&v.ghost_id) {
            let fd = d.place(ghosts.fd(v.ghost_id)?, "ghost file")?;
            ghost_fds.insert(v.ghost_id, fd);
        }
    }
    let ours = procfs::read_limits(std::process::id() as i32)?;
    let mut specs = Vec::with_capacity(procs.len());
    for p in procs {
        specs.push(proc_spec(procs, p, opts, ghosts, &ours, &mut d)?);
    }
    for p in procs {
        for pair in &p.unix_pairs {
            d.refill_unix_pair(p, pair, opts, ghosts)?;
        }
    }
    d.finish_unix_pairs(procs)?;
    link_tree(procs, &mut specs)?;
    let len = stasis_runtime::PAGE_SIZE + SCRATCH_LEN;
    let trampoline = find_trampoline(procs, len)?;
    let pid_ns = pid_ns.then(|| {
        let ns = opts.pid_namespace.as_ref();
        NewPidNs {
            join: ns.map_or(Vec::new(), |n| {
                n.join.iter().map(|f| f.as_raw_fd()).collect()
            }),
            mount_proc: ns.is_some_and(|n| n.mount_proc),
            cgroup_procs: ns.map_or(Vec::new(), |n| {
                n.cgroup_procs.iter().map(|f| f.as_raw_fd()).collect()
            }),
        }
    });
    let mut keep_fds: Vec<i32> = shmem_fds
        .values()
        .chain(ghost_fds.values())
        .copied()
        .collect();
    keep_fds.sort_unstable();
    Ok(Plan {
        spec: TreeSpec {
            procs: specs,
            trampoline,
            scratch_len: SCRATCH_LEN,
            keep_fds,
            pid_ns,
        },
        descs: d.fds,
        tcp: d.tcp,
        shmem_fds,
        ghost_fds,
    })
}

/// Lifts our soft RLIMIT_NOFILE to the hard one: the tree's descriptions are held here.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Open file descriptions made for the tree.
struct Descs {
    base: i32,
    fds: Vec<OwnedFd>,
    /// desc_id → our fd.
    by_id: BTreeMap<u32, i32>,
    /// (is a FIFO, pipe id) → (read end, write end, read end handed out, write end handed
    /// out). For a FIFO both are one O_RDWR holder; its fds are opened by path.
    pipes: BTreeMap<(bool, u64), (i32, i32, bool, bool)>,
    /// Unix socket inode → our end of the recreated pair.
    sockets: BTreeMap<u64, i32>,
    /// See [`Plan::tcp`].
    tcp: Vec<(OwnedFd, Vec<u8>, String)>,
}

impl Descs {
    /// Moves a copy of `fd` above every target fd and keeps it; returns its number.
    fn place(&mut self, fd: i32, what: &str) -> Result<i32, RestoreError> {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd we hold returns a new fd we then own.
        let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, self.base) };
        if n < 0 {
            return Err(os_err(format!("placing {what}")));
        }
        // SAFETY: n was just returned by fcntl and is owned by nobody else.
        self.fds.push(unsafe { OwnedFd::from_raw_fd(n) });
        Ok(n)
    }

    /// Like [`Descs::place`] for an fd we just opened (closed after placing).
    fn place_owned(&mut self, fd: i32, what: &str) -> Result<i32, RestoreError> {
        if fd < 0 {
            return Err(os_err(what.to_string()));
        }
        // SAFETY: fd was just opened by us and is owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        self.place(owned.as_raw_fd(), what)
    }

    fn create_pipe(
        &mut self,
        p: &proto::Process,
        pipe: &proto::Pipe,
        opts: &Options,
    ) -> Result<(), RestoreError> {
        let fifo = !pipe.fifo_path.is_empty();
        if self.pipes.contains_key(&(fifo, pipe.id)) {
            return Err(RestoreError::Invalid(format!(
                "pipe {} is stored twice",
                pipe.id
            )));
        }
        let (rd, wr) = if fifo {
            // A holder open for both reading and writing: no open of it can block, and its
            // buffer must be empty (nobody else may have it open).
            let c = path_cstr(&opts.host_path(&pipe.fifo_path), "FIFO path")?;
            // SAFETY: c is a valid C string.
            let raw = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                )
            };
            let what = format!("process {}: opening FIFO {}", p.pid, pipe.fifo_path);
            let fd = self.place_owned(raw, &what)?;
            let mut queued: libc::c_int = 0;
            // SAFETY: FIONREAD writes one c_int to a local.
            if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) } != 0 || queued != 0 {
                return Err(RestoreError::Unsupported(format!(
                    "{what}: it already holds {queued} bytes (another process has it open)"
                )));
            }
            (fd, fd)
        } else {
            let mut ends = [0i32; 2];
            // SAFETY: ends is a valid array of two c_ints for pipe2 to fill.
            if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
                return Err(os_err(format!("process {}: pipe2", p.pid)));
            }
            (
                self.place_owned(ends[0], "pipe read end")?,
                self.place_owned(ends[1], "pipe write end")?,
            )
        };
        // SAFETY: fcntl on our own pipe; no pointers.
        let size = unsafe { libc::fcntl(wr, libc::F_GETPIPE_SZ) };
        if pipe.size as i32 != size {
            // SAFETY: as above. The result is checked: a pipe smaller than the original
            // would change what its writers see (and might not hold the data).
            let got = unsafe { libc::fcntl(wr, libc::F_SETPIPE_SZ, pipe.size as libc::c_int) };
            if got < pipe.size as i32 {
                return Err(os_err(format!(
                    "process {}: giving pipe {} its capacity of {} bytes (fs.pipe-max-size limits \
                     this without CAP_SYS_RESOURCE)",
                    p.pid, pipe.id, pipe.size
                )));
            }
        }
        let mut done = 0;
        while done < pipe.data.len() {
            // SAFETY: writes from a live buffer to our pipe.
            let n = unsafe {
                libc::write(
                    wr,
                    pipe.data[done..].as_ptr().cast(),
                    pipe.data.len() - done,
                )
            };
            if n <= 0 {
                return Err(os_err(format!(
                    "process {}: refilling pipe {} with its {} buffered bytes",
                    p.pid,
                    pipe.id,
                    pipe.data.len()
                )));
            }
            done += n as usize;
        }
        self.pipes.insert((fifo, pipe.id), (rd, wr, fifo, fifo));
        Ok(())
    }

    /// A connected socket pair, its queues still empty (see [`Descs::refill_unix_pair`]).
    fn create_unix_pair(
        &mut self,
        p: &proto::Process,
        pair: &proto::UnixPair,
    ) -> Result<(), RestoreError> {
        let ty = pair.sock_type as i32;
        if ![libc::SOCK_STREAM, libc::SOCK_DGRAM, libc::SOCK_SEQPACKET].contains(&ty) {
            return Err(RestoreError::Invalid(format!(
                "process {}: unix socket {} has type {ty}",
                p.pid, pair.id
            )));
        }
        let mut sv = [0i32; 2];
        let flags = ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
        // SAFETY: sv is a valid array of two c_ints for socketpair to fill.
        if unsafe { libc::socketpair(libc::AF_UNIX, flags, 0, sv.as_mut_ptr()) } != 0 {
            return Err(os_err(format!("process {}: socketpair", p.pid)));
        }
        let a = self.place_owned(sv[0], "socket")?;
        let b = self.place_owned(sv[1], "socket")?;
        if self.sockets.insert(pair.id, a).is_some() || self.sockets.insert(pair.peer, b).is_some()
        {
            return Err(RestoreError::Invalid(format!(
                "unix socket {} is stored twice",
                pair.id
            )));
        }
        Ok(())
    }

    /// Queues again what each end of `pair` had queued (sent through the other end), with the
    /// files in flight attached. Done once every description of the tree is prepared: those
    /// are what the messages carry.
    fn refill_unix_pair(
        &mut self,
        p: &proto::Process,
        pair: &proto::UnixPair,
        opts: &Options,
        ghosts: &crate::ghosts::Recreated,
    ) -> Result<(), RestoreError> {
        let end = |id: u64| {
            self.sockets.get(&id).copied().ok_or_else(|| {
                RestoreError::Invalid(format!(
                    "process {}: unix socket {id} was not created",
                    p.pid
                ))
            })
        };
        let (a, b) = (end(pair.id)?, end(pair.peer)?);
        for (from, msgs, attached) in [
            (b, &pair.queued_for_id, &pair.attached_for_id),
            (a, &pair.queued_for_peer, &pair.attached_for_peer),
        ] {
            let by_msg: BTreeMap<u32, &proto::Attachment> =
                attached.iter().map(|x| (x.message, x)).collect();
            for (k, m) in msgs.iter().enumerate() {
                let mut fds = Vec::new();
                for f in by_msg.get(&(k as u32)).map_or(&[][..], |x| &x.files) {
                    fds.push(self.in_flight(p, pair, f, opts, ghosts)?);
                }
                let what = format!(
                    "process {}: requeueing {} bytes with {} files in flight on unix socket {}",
                    p.pid,
                    m.len(),
                    fds.len(),
                    pair.id
                );
                stasis_runtime::unix_queue::send_message(from, m, &fds, &what)?;
            }
        }
        Ok(())
    }

    /// Gives each end of the tree's socket pairs its options, filter and shutdown state,
    /// once its queue is refilled: a receiving end with SO_PASSCRED set would have the
    /// refilled messages carry the restorer's credentials, and one shut down takes none.
    fn finish_unix_pairs(&self, procs: &[&proto::Process]) -> Result<(), RestoreError> {
        let mut done = std::collections::BTreeSet::new();
        for p in procs {
            for f in p.fds.iter().filter(|f| f.kind() == FdKind::UnixPair) {
                let Some(&fd) = self.sockets.get(&f.socket_id) else {
                    continue;
                };
                if done.insert(f.socket_id) {
                    crate::sockets::set_options(p, f, fd, false)?;
                    crate::sockets::shut_down(p, f, fd)?;
                }
            }
        }
        Ok(())
    }

    /// Our fd for a file in flight on unix socket `pair.id` or its peer: a description the
    /// tree's fds have (prepared already), or a file opened again.
    fn in_flight(
        &mut self,
        p: &proto::Process,
        pair: &proto::UnixPair,
        f: &proto::InFlightFile,
        opts: &Options,
        ghosts: &crate::ghosts::Recreated,
    ) -> Result<i32, RestoreError> {
        match (f.desc_id, &f.file) {
            (0, Some(file)) => self.open(p, file, opts, ghosts),
            (id, None) if id != 0 => self.by_id.get(&id).copied().ok_or_else(|| {
                RestoreError::Invalid(format!(
                    "process {}: a file in flight on unix socket {} is description {id}, which \
                     no fd of the image has",
                    p.pid, pair.id
                ))
            }),
            _ => Err(RestoreError::Invalid(format!(
                "process {}: a file in flight on unix socket {} is not described",
                p.pid, pair.id
            ))),
        }
    }

    /// Our fd for the description of image fd `f` of `p`, opened on first use.
    fn open(
        &mut self,
        p: &proto::Process,
        f: &proto::Fd,
        opts: &Options,
        ghosts: &crate::ghosts::Recreated,
    ) -> Result<i32, RestoreError> {
        if f.desc_id != 0 {
            if let Some(&fd) = self.by_id.get(&f.desc_id) {
                return Ok(fd);
            }
        }
        let status = (f.flags & SETFL_MASK) as i32;
        let open_flags = (f.flags & !((libc::O_CLOEXEC | libc::O_ASYNC) as u32)) as i32;
        let fd = match f.kind() {
            FdKind::Regular | FdKind::CharDevice => {
                let path = if f.ghost_id != 0 {
                    ghosts.path_for(f.ghost_id)?.into()
                } else {
                    opts.host_path(&f.path)
                };
                let c = path_cstr(&path, "file path")?;
                // SAFETY: c is a valid C string; open returns a new fd or -1.
                let raw = unsafe { libc::open(c.as_ptr(), open_flags | libc::O_CLOEXEC, 0) };
                let what = format!("process {}: opening fd {} ({})", p.pid, f.fd, f.path);
                let fd = self.place_owned(raw, &what)?;
                // SAFETY: lseek on our fd.
                if f.offset != 0 && unsafe { libc::lseek(fd, f.offset as i64, libc::SEEK_SET) } < 0
                {
                    return Err(os_err(format!("{what}: seeking to {}", f.offset)));
                }
                fd
            }
            FdKind::Inherited => {
                let from = opts.inherit_fds.get(&f.fd).copied().unwrap_or(f.fd as i32);
                // SAFETY: fcntl(F_GETFD) on any integer only inspects our fd table.
                if unsafe { libc::fcntl(from, libc::F_GETFD) } < 0 {
                    return Err(RestoreError::Unsupported(format!(
                        "process {}: fd {} was {} and should be inherited from stasis's fd {from}, \
                         which is not open",
                        p.pid, f.fd, f.inherited_from
                    )));
                }
                self.place(from, "inherited fd")?
            }
            FdKind::Pipe => {
                let reading = f.flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32;
                let entry = self.pipes.get_mut(&(false, f.pipe_id)).ok_or_else(|| {
                    RestoreError::Invalid(format!(
                        "process {}: fd {} is an end of pipe {}, which the image does not hold",
                        p.pid, f.fd, f.pipe_id
                    ))
                })?;
                let (end, used) = if reading {
                    (entry.0, &mut entry.2)
                } else {
                    (entry.1, &mut entry.3)
                };
                let fd = if !*used {
                    *used = true;
                    end
                } else {
                    // A second description of the same end: reopen the pipe.
                    let c = cstr(&format!("/proc/self/fd/{end}"), "path")?;
                    let acc = (f.flags & libc::O_ACCMODE as u32) as i32;
                    // SAFETY: c is a valid C string.
                    let raw = unsafe { libc::open(c.as_ptr(), acc | libc::O_CLOEXEC) };
                    self.place_owned(raw, &format!("process {}: reopening pipe", p.pid))?
                };
                fd
            }
            FdKind::Fifo => {
                // Refilled through the holder; every description is opened anew by path.
                if !self.pipes.contains_key(&(true, f.pipe_id)) {
                    return Err(RestoreError::Invalid(format!(
                        "process {}: fd {} is FIFO {}, which the image does not hold",
                        p.pid, f.fd, f.path
                    )));
                }
                let c = path_cstr(&opts.host_path(&f.path), "FIFO path")?;
                let acc = (f.flags & libc::O_ACCMODE as u32) as i32;
                // SAFETY: c is a valid C string.
                let raw =
                    unsafe { libc::open(c.as_ptr(), acc | libc::O_NONBLOCK | libc::O_CLOEXEC) };
                let fd =
                    self.place_owned(raw, &format!("process {}: opening FIFO {}", p.pid, f.path))?;
                fd
            }
            FdKind::UnixPair => {
                let fd = self.sockets.get(&f.socket_id).copied().ok_or_else(|| {
                    RestoreError::Invalid(format!(
                        "process {}: fd {} is unix socket {}, which the image does not hold",
                        p.pid, f.fd, f.socket_id
                    ))
                })?;
                fd
            }
            FdKind::Eventfd
            | FdKind::Timerfd
            | FdKind::Signalfd
            | FdKind::Epoll
            | FdKind::Inotify
            | FdKind::TcpListen
            | FdKind::TcpSocket
            | FdKind::UnixListen
            | FdKind::UnixBound
            | FdKind::Udp => {
                let made = crate::events::create(p, f, opts)?;
                let fd =
                    self.place(made.as_raw_fd(), &format!("process {}: fd {}", p.pid, f.fd))?;
                fd
            }
            FdKind::TcpEstablished => {
                let (made, unsent) = crate::events::tcp_connection(p, f)?;
                let what = format!("process {}: fd {}", p.pid, f.fd);
                let fd = self.place(made.as_raw_fd(), &what)?;
                self.tcp.push((made, unsent, what));
                fd
            }
            FdKind::Unspecified => {
                return Err(RestoreError::Invalid(format!(
                    "process {}: fd {} has kind {:?}, which this version cannot restore",
                    p.pid,
                    f.fd,
                    f.kind()
                )))
            }
        };
        // Files were opened with their flags; every other description gets its status flags
        // (O_NONBLOCK, O_APPEND...) here, once.
        if !matches!(f.kind(), FdKind::Regular | FdKind::CharDevice) {
            set_status(fd, status, p, f)?;
        }
        if f.desc_id != 0 {
            self.by_id.insert(f.desc_id, fd);
        }
        Ok(fd)
    }
}

fn set_status(fd: i32, status: i32, p: &proto::Process, f: &proto::Fd) -> Result<(), RestoreError> {
    // SAFETY: fcntl(F_SETFL) on our own fd takes no pointers.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, status) } < 0 {
        return Err(os_err(format!(
            "process {}: setting the file status flags of fd {}",
            p.pid, f.fd
        )));
    }
    Ok(())
}

fn proc_spec(
    procs: &[&proto::Process],
    p: &proto::Process,
    opts: &Options,
    ghosts: &crate::ghosts::Recreated,
    ours: &[procfs::Limit],
    d: &mut Descs,
) -> Result<ProcSpec, RestoreError> {
    let mut spec = ProcSpec {
        pid: p.pid as i32,
        children: Vec::new(),
        setsid: false,
        pgid: None,
        subreaper: p.child_subreaper,
        exit: None,
        rlimits: Vec::new(),
        umask: p.umask,
        cwd: cstr(if p.zombie { "/" } else { &p.cwd }, "working directory")?,
        fds: Vec::new(),
        share_files: p.files_shared_with_parent,
    };
    if p.zombie {
        let st = p.wait_status as i32;
        spec.exit = Some(if libc::WIFSIGNALED(st) {
            Exit::Signal(libc::WTERMSIG(st))
        } else {
            Exit::Code(libc::WEXITSTATUS(st))
        });
        return Ok(spec);
    }
    for l in &p.rlimits {
        if let Some(o) = ours.iter().find(|o| o.resource == l.resource) {
            if l.hard > o.hard {
                return Err(RestoreError::Unsupported(format!(
                    "process {}: resource limit {} has hard limit {} but stasis runs with {} \
                     (raising it needs CAP_SYS_RESOURCE)",
                    p.pid,
                    l.resource,
                    fmt_limit(l.hard),
                    fmt_limit(o.hard)
                )));
            }
        }
        if l.soft > l.hard {
            return Err(RestoreError::Invalid(format!(
                "process {}: resource limit {} soft {} > hard {}",
                p.pid, l.resource, l.soft, l.hard
            )));
        }
        spec.rlimits.push((l.resource, l.soft, l.hard));
    }
    if p.fds.len() > MAX_FDS {
        return Err(RestoreError::Unsupported(format!(
            "process {} has {} fds; at most {MAX_FDS} are supported yet",
            p.pid,
            p.fds.len()
        )));
    }
    if p.files_shared_with_parent {
        // Its parent builds the one table they share; both must list the same fds.
        let parent = procs.iter().find(|q| q.pid == p.ppid && !q.zombie);
        let same = parent.is_some_and(|q| {
            q.fds.len() == p.fds.len()
                && q.fds
                    .iter()
                    .zip(&p.fds)
                    .all(|(a, b)| a.fd == b.fd && a.desc_id == b.desc_id)
        });
        if !same {
            return Err(RestoreError::Invalid(format!(
                "process {} shares its parent's fd table, but their fds differ",
                p.pid
            )));
        }
        return Ok(spec);
    }
    for f in &p.fds {
        let desc = d.open(p, f, opts, ghosts)?;
        spec.fds.push(FdPlan {
            target: f.fd as i32,
            desc,
            cloexec: f.flags & libc::O_CLOEXEC as u32 != 0,
        });
    }
    Ok(spec)
}

/// Parents, sessions and process groups.
fn link_tree(procs: &[&proto::Process], specs: &mut [ProcSpec]) -> Result<(), RestoreError> {
    let index: BTreeMap<u32, usize> = procs.iter().enumerate().map(|(i, p)| (p.pid, i)).collect();
    if index.len() != procs.len() {
        return Err(RestoreError::Invalid(
            "a PID appears twice in the image".into(),
        ));
    }
    for (i, p) in procs.iter().enumerate() {
        let unsupported = |what: String| {
            RestoreError::Unsupported(format!("process {} ({}): {what}", p.pid, p.comm))
        };
        if p.sid == p.pid {
            specs[i].setsid = true;
        }
        if i == 0 {
            if p.zombie {
                return Err(RestoreError::Invalid("the root process is a zombie".into()));
            }
            // A session or group led from outside the tree is inherited from the restorer
            // (as a shell job is).
            if p.pgid == p.pid && p.sid != p.pid {
                specs[i].pgid = Some(p.pid as i32);
            }
            continue;
        }
        let parent = match index.get(&p.ppid) {
            Some(&j) if j < i => j,
            _ => {
                return Err(RestoreError::Invalid(format!(
                    "process {}: its parent {} does not come before it in the image",
                    p.pid, p.ppid
                )))
            }
        };
        specs[parent].children.push(i);
        let pp = procs[parent];
        // A zombie too: it takes its session and group before it exits.
        if p.sid != p.pid && p.sid != pp.sid {
            return Err(unsupported(format!(
                "it is in session {} but its parent {} is in session {}",
                p.sid, pp.pid, pp.sid
            )));
        }
        if p.pgid != pp.pgid && !specs[i].setsid {
            let leader_ok = p.pgid == p.pid
                || index
                    .get(&p.pgid)
                    .is_some_and(|&l| procs[l].sid == p.sid && procs[l].pgid == p.pgid);
            if !leader_ok {
                return Err(unsupported(format!(
                    "its process group {} has no leader in the image",
                    p.pgid
                )));
            }
            specs[i].pgid = Some(p.pgid as i32);
        }
    }
    Ok(())
}

fn fmt_limit(v: u64) -> String {
    if v == u64::MAX {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// A `len`-byte range free in every process's mappings and in ours, preferring low addresses
/// above 4 GiB (away from both the executable and the mmap area).
fn find_trampoline(procs: &[&proto::Process], len: u64) -> Result<u64, RestoreError> {
    let mut busy: Vec<(u64, u64)> = procs
        .iter()
        .flat_map(|p| p.vmas.iter().map(|v| (v.start, v.end)))
        .collect();
    for m in procfs::read_maps(std::process::id() as i32)? {
        busy.push((m.start, m.end));
    }
    busy.sort_unstable();
    let guard = 1 << 20; // keep clear of neighbours (stack guard gaps)
    let mut candidate: u64 = 1 << 32;
    for &(s, e) in &busy {
        if e + guard <= candidate {
            continue;
        }
        if s >= candidate + len + guard {
            break;
        }
        candidate = (e + guard + 0xffff) & !0xffff;
    }
    if candidate + len > crate::validate::TASK_SIZE {
        return Err(RestoreError::Unsupported(
            "no free address range for the restore trampoline".into(),
        ));
    }
    Ok(candidate)
}

//! A process tree being checkpointed, one step at a time: [`TreeSession::freeze`] stops it,
//! [`TreeSession::write`] collects its state and streams its pages into an image sink, and
//! then it is either let run on ([`TreeSession::resume`]) or killed ([`TreeSession::kill`]).
//! The caller decides the order of those steps against committing the image (the workload
//! interface in `stasis-workload` holds the sequences). A session dropped at any point
//! resumes every process exactly as it was.
//!
//! A session is tied to the thread that froze the tree: that thread is the tracer of every
//! thread of the tree (ptrace is per thread) and has the termination signals blocked, so a
//! session is neither `Send` nor `Sync`.

use crate::error::CheckpointError;
use crate::{collect, container, descs, fds, ghosts, membership, pages, pidns, tcp, tree, vmas};
use crate::{ImageSink, Options, Progress, Stats};
use stasis_image::ImageWriter;
use stasis_runtime::sys::TerminationSignalsBlocked;
use std::marker::PhantomData;
use std::time::Instant;

/// A frozen process tree (see the module documentation).
pub struct TreeSession {
    pid: i32,
    opts: Options,
    kind: pidns::RootKind,
    // Dropped in this order: the connections leave repair mode (and are unlocked), the tree
    // resumes, the listeners' held connections are let through, and only then can a Ctrl-C
    // take effect.
    repaired: Option<tcp::Repaired>,
    frozen: tree::FrozenTree,
    hold: Option<tcp::Hold>,
    _signals: TerminationSignalsBlocked,
    t0: Instant,
    t_frozen: Instant,
    stats: Stats,
    /// The processes' mappings, being read since the freeze.
    smaps: Option<collect::SmapsAhead>,
    /// The mappings (host PID → ranges) whose pages went ahead in pre-copy rounds.
    precopied: Option<std::collections::BTreeMap<i32, Vec<(u64, u64)>>>,
    /// Tied to the tracer thread.
    _thread: PhantomData<*const ()>,
}

impl TreeSession {
    /// Checks the tree rooted at `pid` and freezes it: every thread of every process is in a
    /// ptrace stop when this returns. Nothing is changed if it fails.
    pub fn freeze(pid: i32, opts: &Options) -> Result<Self, CheckpointError> {
        let t0 = Instant::now();
        let kind = collect::precheck(pid)?;
        if kind == pidns::RootKind::Ours && opts.container.is_none() {
            pidns::check_root_namespaces(pid)?;
        }
        // Blocked before anything is frozen: a Ctrl-C during the checkpoint takes effect
        // only once the tree has been resumed or killed.
        let signals = TerminationSignalsBlocked::new()?;
        // New connections to the tree's listeners wait until the tree is resumed, and the
        // tree is frozen with their queues empty.
        let hold = match opts.tcp_established {
            true => tcp::Hold::start(pid, &tree::members(pid))?,
            false => None,
        };
        let frozen = match &hold {
            Some(h) => h.freeze_drained(|| tree::FrozenTree::freeze(pid))?,
            None => tree::FrozenTree::freeze(pid)?,
        };
        let pids: Vec<i32> = frozen.procs.iter().map(|f| f.pid()).collect();
        let smaps = Some(collect::SmapsAhead::start(&pids));
        let stats = Stats {
            pid,
            freeze_us: t0.elapsed().as_micros() as u64,
            freezer: frozen
                .freezer
                .clone()
                .unwrap_or_else(|| "ptrace".to_string()),
            compression: opts.compression.to_string(),
            ..Default::default()
        };
        Ok(TreeSession {
            pid,
            opts: opts.clone(),
            kind,
            repaired: None,
            frozen,
            hold,
            _signals: signals,
            t0,
            t_frozen: Instant::now(),
            stats,
            smaps,
            precopied: None,
            _thread: PhantomData,
        })
    }

    /// The root's PID.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// What has been measured so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The mappings (host PID → their ranges) whose pages went whole in pre-copy rounds
    /// ([`crate::precopy::TreeTracking::covered`]): the image leaves them out.
    pub fn set_precopied(&mut self, covered: std::collections::BTreeMap<i32, Vec<(u64, u64)>>) {
        self.precopied = Some(covered);
    }

    /// Collects the frozen tree's state and writes the whole image into `sink` (not
    /// committed). Established connections stay in repair mode and locked until the tree is
    /// resumed or killed.
    pub fn write<S: ImageSink>(
        &mut self,
        mut sink: S,
        progress: Progress<'_>,
    ) -> Result<S, CheckpointError> {
        let (pid, opts) = (self.pid, &self.opts);
        let tc = Instant::now();
        let pids = pidns::PidView::of(&self.frozen, pid, self.kind)?;
        let mut ghosts = ghosts::Ghosts::default();
        let frozen = &mut self.frozen;
        let mut procs = Vec::with_capacity(frozen.procs.len() + frozen.zombies.len());
        let mut smaps = self.smaps.take().map(collect::SmapsAhead::finish);
        for f in frozen.procs.iter_mut() {
            let maps = smaps.as_mut().and_then(|s| s.remove(&f.pid()));
            procs.push(collect::collect_process(f, &mut ghosts, maps)?);
        }
        let host_shm = vmas::check_sysv_namespace(&procs, opts.container.is_some())?;
        if opts.container.is_none() {
            vmas::check_sysv_attaches(&procs, &host_shm)?;
        }
        membership::record(&mut procs)?;
        if let Some(covered) = &self.precopied {
            self.stats.pages_precopied = crate::precopy::mark(&mut procs, covered);
        }
        procs.extend(frozen.zombies.iter().map(tree::Zombie::to_proto));
        // A detached container's standard I/O leads only to its log.
        descs::link(
            &mut procs,
            opts.container.is_some() && opts.stdio_log.is_some(),
        )?;
        if let Some(log) = opts.stdio_log {
            fds::inherit_log(&mut procs, log);
        }
        // Ghost files belong to the tree; the root's record carries them.
        procs[0].ghost_files = ghosts.files.clone();
        // Last before writing: from here the connections are off the network.
        self.repaired = tcp::repair(&mut procs, opts.tcp_established)?;
        let mut plan = pages::plan(&procs, &ghosts)?;
        // Everything above looks at the processes by host PID; the image holds the PIDs
        // they see.
        plan.set_process_ids(pids.process_ids(&procs));
        pids.translate(&mut procs)?;
        let collect_us = tc.elapsed().as_micros() as u64;
        let tp = Instant::now();
        let mut inventory =
            collect::inventory(pids.image_pid(pid)?, pids.is_namespace(), &opts.compression);
        inventory.host_sysv_shm = host_shm.iter().map(container::shm_to_proto).collect();
        if let (Some(h), false) = (&self.hold, opts.leave_running) {
            inventory.held_ports = h.ports().iter().map(|&p| u32::from(p)).collect();
        }
        if let Some(c) = &opts.container {
            // Its IPC namespace's objects, read now that nothing in it runs.
            let ipc = stasis_runtime::sysvipc::capture(pid)?;
            vmas::check_sysv_attaches(&procs, &ipc.shm)?;
            inventory.kind = stasis_image::proto::WorkloadKind::Container as i32;
            inventory.container = Some(stasis_image::proto::Container {
                ipc: Some(container::ipc_to_proto(&ipc)),
                ..c.clone()
            });
        }
        // A checkpoint that kills the tree waits for a durable image anyway: overlap that
        // with the pages phase. One that lets it run resumes it before the sync.
        sink.write_behind(!opts.leave_running);
        let mut writer = ImageWriter::new(sink, &inventory, opts.compression)?;
        for p in &procs {
            writer.write_process(p)?;
        }
        // A failpoint for tests at every progress report of the pages phase.
        let report = |done: u64, total: u64| {
            stasis_runtime::failpoints::hit("pages-progress");
            progress(done, total)
        };
        let (sink, ws) = pages::dump(&plan, writer, &report)?;
        if let Some(sig) = stasis_runtime::sys::termination_pending() {
            return Err(CheckpointError::Interrupted(sig));
        }
        let s = &mut self.stats;
        s.processes = procs.len() as u64;
        s.threads = procs.iter().map(|p| p.threads.len() as u64).sum();
        s.vmas = procs.iter().map(|p| p.vmas.len() as u64).sum();
        s.fds = procs.iter().map(|p| p.fds.len() as u64).sum();
        s.tcp_connections = self.repaired.as_ref().map_or(0, |r| r.count() as u64);
        s.pages_data = ws.data_pages;
        s.pages_zero = ws.zero_pages;
        s.pages_skipped = plan.pages_skipped;
        s.bytes_raw = ws.raw_bytes;
        s.bytes_stored = ws.stored_bytes;
        s.image_bytes = ws.image_bytes;
        s.collect_us = collect_us;
        s.pages_us = tp.elapsed().as_micros() as u64;
        Ok(sink)
    }

    /// Records how long committing the image took.
    pub fn set_commit_us(&mut self, us: u64) {
        self.stats.commit_us = us;
    }

    /// Lets every process run on exactly as it was; returns the checkpoint's figures.
    pub fn resume(mut self) -> Result<Stats, CheckpointError> {
        // Out of repair mode before the processes can touch their sockets.
        if let Some(r) = self.repaired.take() {
            r.release_running();
        }
        self.frozen.resume()?;
        self.stats.process = "running".into();
        Ok(self.finish())
    }

    /// Kills every process (only once its image is committed); returns the checkpoint's
    /// figures. Its connections stay locked, and new connections to its listeners held,
    /// until the tree is restored.
    pub fn kill(mut self) -> Result<Stats, CheckpointError> {
        let tk = Instant::now();
        self.frozen.kill()?;
        // Closed in repair mode, only now that no process holds them.
        self.keep_locked();
        self.stats.kill_us = tk.elapsed().as_micros() as u64;
        self.stats.process = "killed".into();
        Ok(self.finish())
    }

    /// Leaves the tree stopped when this process lets go of it, for an operator to settle (a
    /// migration whose outcome is unknown): every process gets SIGSTOP before it is
    /// detached, so it stops before running any of its own code; its connections stay in
    /// repair mode and locked, so they send nothing; new connections to its listeners stay
    /// held. Returns the PIDs of its processes.
    pub fn leave_stopped(mut self) -> Result<Vec<i32>, CheckpointError> {
        let pids: Vec<i32> = self.frozen.procs.iter().map(|f| f.pid()).collect();
        for &p in &pids {
            stasis_runtime::sys::kill(p, libc::SIGSTOP)?;
        }
        self.keep_locked();
        self.frozen.resume()?;
        Ok(pids)
    }

    /// Leaves its connections in repair mode and locked (our descriptors of them closed
    /// without a word) and new connections to its listeners held, after this session: it
    /// is not to use them any more (killed, or stopped for the operator).
    fn keep_locked(&mut self) {
        if let Some(r) = self.repaired.take() {
            r.release_killed();
        }
        if let Some(h) = self.hold.take() {
            h.keep();
        }
    }

    /// Gives up after `cause`: every process resumes as it was. Returns the error to
    /// report (a Ctrl-C that stopped the checkpoint is reported as such, not left pending).
    pub fn abandon(mut self, cause: CheckpointError) -> CheckpointError {
        // Out of repair mode (and unlocked) before the tree runs.
        drop(self.repaired.take());
        let resumed = self.frozen.resume();
        let cause = match stasis_runtime::sys::take_termination_signal() {
            Some(sig) => CheckpointError::Interrupted(sig),
            None => cause,
        };
        match resumed {
            Ok(()) => cause,
            Err(resume) => CheckpointError::ResumeFailed {
                pid: self.pid,
                cause: Box::new(cause),
                resume,
            },
        }
    }

    fn finish(&mut self) -> Stats {
        self.stats.frozen_us = self.t_frozen.elapsed().as_micros() as u64;
        self.stats.peak_rss_kib = crate::peak_rss_kib();
        self.stats.total_us = self.t0.elapsed().as_micros() as u64;
        self.stats.clone()
    }
}

//! The three kinds of [`Source`]: each wraps the checkpoint crate's session of its kind and
//! keeps track of where in its life the workload is.

use crate::{Kind, Report, Round, Source, Tracked, Verb, WorkloadError};
use stasis_checkpoint::container::ContainerSession;
use stasis_checkpoint::precopy::TreeTracking;
use stasis_checkpoint::vm::{VmCheckpointOptions, VmSession, VmStats};
use stasis_checkpoint::{
    CheckpointError, ImageSink, Options, PageSink, Progress, Stats, TreeSession,
};
use stasis_runtime::container::StateDir;

/// Why a tree copies no rounds.
const NOT_TRACKED: &str = "its dirty tracking was not started";
/// Why a tree's state waits (its memory went out in rounds).
const TREE_LAST_ROUND_FIRST: &str = "its last round of memory is sent before its state";

/// Why a VM's state waits (its memory went out in rounds).
const LAST_ROUND_FIRST: &str = "its last round of memory is sent before its state";
/// Why a paused VM copies no more rounds.
const LAST_ROUND_SENT: &str = "its last round of memory was sent already";

/// Why a workload is not discarded.
const NO_COPY: &str = "no copy of it exists yet (its image is not committed)";

fn unsupported(w: &dyn Source, verb: Verb, why: &str) -> WorkloadError {
    WorkloadError::Unsupported {
        workload: w.describe(),
        verb,
        why: why.to_string(),
    }
}

fn out_of_order(w: &dyn Source, verb: Verb, why: &'static str) -> WorkloadError {
    WorkloadError::OutOfOrder {
        workload: w.describe(),
        verb,
        why,
    }
}

/// Figures of a tree that ran on before its image was committed: the commit came after.
fn add_commit(s: &mut Stats, us: u64) {
    s.commit_us = us;
    s.total_us += us;
}

/// What a [`TreeSource`] checkpoints.
enum Target {
    /// The process tree rooted at this PID.
    Pid(i32),
    /// The container of this name.
    Container { state: StateDir, name: String },
}

/// A frozen process tree, alone or as a container's.
enum Session {
    Tree(Box<TreeSession>),
    Container(Box<ContainerSession>),
}

impl Session {
    fn write(
        &mut self,
        sink: &mut dyn ImageSink,
        progress: Progress<'_>,
    ) -> Result<(), CheckpointError> {
        match self {
            Session::Tree(t) => t.write(sink, progress).map(drop),
            Session::Container(c) => c.write(sink, progress).map(drop),
        }
    }

    fn resume(self) -> Result<Stats, CheckpointError> {
        match self {
            Session::Tree(t) => t.resume(),
            Session::Container(mut c) => c.resume(),
        }
    }

    fn kill(self) -> Result<Stats, CheckpointError> {
        match self {
            Session::Tree(t) => t.kill(),
            Session::Container(mut c) => c.kill(),
        }
    }

    fn leave_stopped(self) -> Result<Vec<i32>, CheckpointError> {
        match self {
            Session::Tree(t) => t.leave_stopped(),
            Session::Container(mut c) => c.leave_stopped(),
        }
    }

    fn abandon(self, cause: CheckpointError) -> CheckpointError {
        match self {
            Session::Tree(t) => t.abandon(cause),
            Session::Container(mut c) => c.abandon(cause),
        }
    }

    fn set_precopied(&mut self, covered: std::collections::BTreeMap<i32, Vec<(u64, u64)>>) {
        match self {
            Session::Tree(t) => t.set_precopied(covered),
            Session::Container(c) => c.set_precopied(covered),
        }
    }

    fn set_commit_us(&mut self, us: u64) {
        match self {
            Session::Tree(t) => t.set_commit_us(us),
            Session::Container(c) => c.set_commit_us(us),
        }
    }

    fn stats(&self) -> Option<&Stats> {
        match self {
            Session::Tree(t) => Some(t.stats()),
            Session::Container(c) => c.tree().map(TreeSession::stats),
        }
    }
}

/// A process tree (named by its root's PID) or a container (by its name).
pub struct TreeSource {
    target: Target,
    opts: Options,
    session: Option<Session>,
    /// Its figures once it was resumed or killed.
    done: Option<Stats>,
    /// Whether its copy exists (see [`Source::committed`]).
    copy_exists: bool,
    /// Its memory's pre-copy rounds, once tracking started.
    tracking: Option<TreeTracking>,
}

impl TreeSource {
    /// The process tree rooted at `pid`.
    pub fn process_tree(pid: i32, opts: &Options) -> Self {
        Self::new(Target::Pid(pid), opts)
    }

    /// The container `name`.
    pub fn container(state: &StateDir, name: &str, opts: &Options) -> Self {
        let target = Target::Container {
            state: state.clone(),
            name: name.to_string(),
        };
        Self::new(target, opts)
    }

    fn new(target: Target, opts: &Options) -> Self {
        TreeSource {
            target,
            opts: opts.clone(),
            session: None,
            done: None,
            copy_exists: false,
            tracking: None,
        }
    }

    /// Its session, taken out for a verb that ends it.
    fn take_frozen(&mut self, verb: Verb) -> Result<Session, WorkloadError> {
        self.session
            .take()
            .ok_or_else(|| out_of_order(self, verb, "it is not frozen"))
    }
}

impl Source for TreeSource {
    fn kind(&self) -> Kind {
        match self.target {
            Target::Pid(_) => Kind::ProcessTree,
            Target::Container { .. } => Kind::Container,
        }
    }

    fn describe(&self) -> String {
        match &self.target {
            Target::Pid(pid) => format!("PID {pid}"),
            Target::Container { name, .. } => format!("container {name}"),
        }
    }

    fn freeze(&mut self) -> Result<(), WorkloadError> {
        if self.session.is_some() || self.done.is_some() {
            return Err(out_of_order(self, Verb::Freeze, "it was frozen already"));
        }
        self.session = Some(match &self.target {
            Target::Pid(pid) => Session::Tree(Box::new(TreeSession::freeze(*pid, &self.opts)?)),
            Target::Container { state, name } => {
                Session::Container(Box::new(ContainerSession::freeze(state, name, &self.opts)?))
            }
        });
        Ok(())
    }

    fn start_dirty_tracking(&mut self) -> Result<Tracked, WorkloadError> {
        if self.session.is_some() || self.done.is_some() || self.tracking.is_some() {
            return Err(out_of_order(
                self,
                Verb::StartDirtyTracking,
                "it is frozen, gone, or tracked already",
            ));
        }
        if let Err(why) = stasis_runtime::write_tracking::support() {
            return Err(unsupported(self, Verb::StartDirtyTracking, &why));
        }
        let root = match &self.target {
            Target::Pid(pid) => *pid,
            Target::Container { state, name } => {
                stasis_runtime::container::running(state, name)
                    .map_err(|e| WorkloadError::Workflow {
                        workload: self.describe(),
                        why: e.to_string(),
                    })?
                    .pid
            }
        };
        self.tracking = Some(TreeTracking::start(root)?);
        Ok(Tracked {
            method: "uffd-wp",
            extent: 0,
            resident: 0,
        })
    }

    fn copy_round(&mut self, to: &mut dyn PageSink) -> Result<Round, WorkloadError> {
        let frozen = self.session.is_some();
        let last_sent = self
            .tracking
            .as_ref()
            .is_some_and(|t| t.covered().is_some());
        match self.tracking.as_mut() {
            None => Err(out_of_order(self, Verb::CopyRound, NOT_TRACKED)),
            Some(_) if last_sent => Err(out_of_order(self, Verb::CopyRound, LAST_ROUND_SENT)),
            Some(t) => Ok(t.round(to, frozen)?),
        }
    }

    fn captured(&self) -> bool {
        false
    }

    fn write_state(
        &mut self,
        sink: &mut dyn ImageSink,
        progress: Progress<'_>,
    ) -> Result<(), WorkloadError> {
        let covered = match &self.tracking {
            None => None,
            Some(t) => match t.covered() {
                Some(c) => Some(c.clone()),
                None => return Err(out_of_order(self, Verb::WriteState, TREE_LAST_ROUND_FIRST)),
            },
        };
        let mut session = self.take_frozen(Verb::WriteState)?;
        if let Some(c) = covered {
            session.set_precopied(c);
        }
        let written = session.write(sink, progress);
        self.session = Some(session);
        Ok(written?)
    }

    fn resume(&mut self) -> Result<(), WorkloadError> {
        let session = self.take_frozen(Verb::Resume)?;
        // Untracked (write protection gone) before it runs.
        self.tracking = None;
        self.done = Some(session.resume()?);
        Ok(())
    }

    fn discard(&mut self) -> Result<(), WorkloadError> {
        if self.session.is_some() && !self.copy_exists {
            return Err(out_of_order(self, Verb::Discard, NO_COPY));
        }
        let session = self.take_frozen(Verb::Discard)?;
        self.tracking = None;
        self.done = Some(session.kill()?);
        Ok(())
    }

    fn leave_frozen(&mut self) -> Result<String, WorkloadError> {
        self.tracking = None;
        let pids = self.take_frozen(Verb::LeaveFrozen)?.leave_stopped()?;
        let list: Vec<String> = pids.iter().map(i32::to_string).collect();
        let list = list.join(" ");
        let connections = match self.opts.tcp_established {
            true => " Its TCP connections stay in repair mode and locked (nft table `inet stasis`), so it must not be resumed if it had any.",
            false => "",
        };
        Ok(format!(
            "{} is stopped (SIGSTOP). If the destination's copy runs, end this one: kill -KILL {list}. \
             If it does not, let this one run on: kill -CONT {list}.{connections}",
            self.describe()
        ))
    }

    fn abandon(&mut self, cause: WorkloadError) -> WorkloadError {
        // Running or about to: untracked first.
        self.tracking = None;
        match (self.session.take(), cause) {
            (Some(s), WorkloadError::Checkpoint(e)) => s.abandon(e).into(),
            (Some(s), cause) => {
                // Resumed; the cause is what is reported.
                let _ = s.resume();
                cause
            }
            (None, cause) => cause,
        }
    }

    fn committed(&mut self, us: u64) {
        self.copy_exists = true;
        match (&mut self.session, &mut self.done) {
            (_, Some(d)) => add_commit(d, us),
            (Some(s), None) => s.set_commit_us(us),
            (None, None) => {}
        }
    }

    fn report(&self) -> Report {
        let frozen = self.session.as_ref().and_then(Session::stats).cloned();
        let pid = match self.target {
            Target::Pid(pid) => pid,
            Target::Container { .. } => 0,
        };
        Report::Tree(self.done.clone().or(frozen).unwrap_or(Stats {
            pid,
            ..Default::default()
        }))
    }
}

/// A VM, named by its name.
pub struct VmSource {
    session: VmSession,
    copy_exists: bool,
}

impl VmSource {
    /// The running VM `name` (refused, naming it, if there is none).
    pub fn open(
        state: &StateDir,
        name: &str,
        opts: VmCheckpointOptions,
    ) -> Result<Self, WorkloadError> {
        Ok(VmSource {
            session: VmSession::open(state, name, opts)?,
            copy_exists: false,
        })
    }
}

impl Source for VmSource {
    fn kind(&self) -> Kind {
        Kind::Vm
    }

    fn describe(&self) -> String {
        format!("VM {}", self.session.name())
    }

    fn freeze(&mut self) -> Result<(), WorkloadError> {
        Ok(self.session.freeze()?)
    }

    fn start_dirty_tracking(&mut self) -> Result<Tracked, WorkloadError> {
        let resident = self.session.start_dirty_tracking()?;
        Ok(Tracked {
            method: "kvm-dirty-log",
            extent: self.session.stats().memory,
            resident,
        })
    }

    fn copy_round(&mut self, to: &mut dyn PageSink) -> Result<Round, WorkloadError> {
        if self.session.last_round_pending() == Some(false) {
            return Err(out_of_order(self, Verb::CopyRound, LAST_ROUND_SENT));
        }
        Ok(self.session.copy_round(to)?)
    }

    fn captured(&self) -> bool {
        self.session.captured()
    }

    fn write_state(
        &mut self,
        sink: &mut dyn ImageSink,
        _progress: Progress<'_>,
    ) -> Result<(), WorkloadError> {
        if self.session.last_round_pending() == Some(true) {
            return Err(out_of_order(self, Verb::WriteState, LAST_ROUND_FIRST));
        }
        self.session.write(sink)?;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), WorkloadError> {
        self.session.resume()?;
        Ok(())
    }

    fn discard(&mut self) -> Result<(), WorkloadError> {
        if !self.copy_exists {
            return Err(out_of_order(self, Verb::Discard, NO_COPY));
        }
        self.session.stop()?;
        Ok(())
    }

    fn leave_frozen(&mut self) -> Result<String, WorkloadError> {
        self.session.stay_paused()?;
        let name = self.session.name();
        Ok(format!(
            "VM {name} is paused. If the destination's copy runs, end this one: stasis vm stop \
             {name}. If it does not, let this one run on: stasis vm resume {name}."
        ))
    }

    fn abandon(&mut self, cause: WorkloadError) -> WorkloadError {
        // Tracking off, and resumed if paused (a VM already running again is left so).
        self.session.stop_tracking();
        let _ = self.session.resume();
        cause
    }

    fn committed(&mut self, _us: u64) {
        self.copy_exists = true;
        self.session.end();
    }

    fn report(&self) -> Report {
        let s: VmStats = self.session.stats().clone();
        Report::Vm(s)
    }
}

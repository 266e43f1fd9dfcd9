//! One interface over every kind of workload stasis handles: a process tree, a container
//! (a process tree with its namespaces, cgroup and network) and a KVM VM.
//!
//! A live workload on this host is a [`Source`]; the receiving side builds one from an image
//! and holds it stopped until it is resumed or discarded ([`destination`]). It answers the verbs every workflow is
//! made of: freeze (pause); start dirty tracking and copy a round of changed memory while it
//! runs; write its final state into an image sink; resume; discard. `checkpoint` is one
//! sequence of those verbs ([`checkpoint`]); live migration and the kernel update are
//! others. A verb a kind of workload cannot do is an error naming the workload, the verb
//! and the reason ([`WorkloadError::Unsupported`]), never a silent Ok.
//!
//! A source is used from the thread that opened it: for process trees that thread is the
//! tracer of every frozen thread (ptrace is per thread), so sources are not `Send`.

pub mod destination;
mod sources;

pub use destination::{build, BuildOptions, Go, Held, OnHeld, Restored};
pub use sources::{TreeSource, VmSource};
/// One round of copying changed memory while the workload runs.
pub use stasis_checkpoint::vm::Round;

use serde::{Deserialize, Serialize};
pub use stasis_checkpoint::PageSink;
use stasis_checkpoint::{CheckpointError, ImageSink, Progress};
use stasis_runtime::container::StateDir;
use std::fmt;
use std::time::Instant;

/// The kinds of workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    ProcessTree,
    Container,
    Vm,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::ProcessTree => "process tree",
            Kind::Container => "container",
            Kind::Vm => "VM",
        })
    }
}

/// The verbs of [`Source`], for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Freeze,
    StartDirtyTracking,
    CopyRound,
    WriteState,
    Resume,
    Discard,
    /// Build it from an image and hold it stopped (the receiving side).
    Build,
    LeaveFrozen,
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Freeze => "freeze",
            Verb::StartDirtyTracking => "start dirty tracking",
            Verb::CopyRound => "copy a round of changed memory",
            Verb::WriteState => "write its state",
            Verb::Resume => "resume",
            Verb::Discard => "discard",
            Verb::Build => "build it from an image",
            Verb::LeaveFrozen => "leave it frozen",
        })
    }
}

/// Why a verb failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// This kind of workload cannot do the verb (nothing was changed).
    #[error("{workload}: cannot {verb}: {why}")]
    Unsupported {
        workload: String,
        verb: Verb,
        why: String,
    },
    /// The verb does not fit where the workload is (e.g. resume before freeze).
    #[error("{workload}: cannot {verb}: {why}")]
    OutOfOrder {
        workload: String,
        verb: Verb,
        why: &'static str,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Restore(#[from] stasis_restore::RestoreError),
    /// The workflow around the verbs failed (a connection lost, a peer that refused).
    #[error("{workload}: {why}")]
    Workflow { workload: String, why: String },
    /// The image could not be made durable (the workload was not discarded).
    #[error("{workload}: committing the image: {source}")]
    Commit {
        workload: String,
        source: std::io::Error,
    },
}

/// What dirty tracking covers.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tracked {
    /// How writes are tracked: "kvm-dirty-log" (a VM), "uffd-wp" (processes: userfaultfd
    /// write-protect and PAGEMAP_SCAN).
    pub method: &'static str,
    /// How far the addresses rounds copy reach (a VM's guest memory size; 0 for processes,
    /// whose mappings each round lists), bytes.
    pub extent: u64,
    /// The memory the first round copies, bytes.
    pub resident: u64,
}

/// What a workflow measured, by kind of workload.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Report {
    /// A process tree or a container.
    Tree(stasis_checkpoint::Stats),
    Vm(stasis_checkpoint::vm::VmStats),
}

/// A live workload on this host (see the crate documentation).
pub trait Source {
    fn kind(&self) -> Kind;

    /// How messages name it: "PID 1234", "container web", "VM demo".
    fn describe(&self) -> String;

    /// Stops it at one instant. Until it is resumed or discarded nothing of it runs.
    fn freeze(&mut self) -> Result<(), WorkloadError>;

    /// From now on, memory it writes is tracked (it runs meanwhile).
    fn start_dirty_tracking(&mut self) -> Result<Tracked, WorkloadError>;

    /// Copies the memory changed since the last round (all of it, the first time) into `to`
    /// while it runs. Frozen after rounds, the last round: what changed since the one before
    /// the freeze. A workload whose memory went out in rounds writes its state without it
    /// ([`Source::write_state`]), and is built on the other side from both.
    fn copy_round(&mut self, to: &mut dyn PageSink) -> Result<Round, WorkloadError>;

    /// Whether, frozen, its whole state is held by stasis, so it may be resumed before its
    /// state is written.
    fn captured(&self) -> bool;

    /// Writes its state as frozen into `sink` (not committed: the caller decides when).
    fn write_state(
        &mut self,
        sink: &mut dyn ImageSink,
        progress: Progress<'_>,
    ) -> Result<(), WorkloadError>;

    /// Lets it run on exactly as it was.
    fn resume(&mut self) -> Result<(), WorkloadError>;

    /// Ends it for good: killed, its cgroup, veth and record removed, a VM stopped. Refused
    /// until [`Source::committed`] said that its copy exists.
    fn discard(&mut self) -> Result<(), WorkloadError>;

    /// Leaves it frozen after this process is gone, neither resumed nor discarded, for an
    /// operator to settle (a migration that committed but never heard back); returns how to
    /// settle it.
    fn leave_frozen(&mut self) -> Result<String, WorkloadError>;

    /// Gives up after `cause`: resumes it as it was if it is frozen, and returns the error
    /// to report.
    fn abandon(&mut self, cause: WorkloadError) -> WorkloadError;

    /// Its copy exists now (its image is committed, or a restored copy confirmed running);
    /// committing took `commit_us`. Only after this may it be discarded.
    fn committed(&mut self, commit_us: u64);

    /// What has been measured so far.
    fn report(&self) -> Report;
}

/// What to open a source for.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// Options for process trees and containers.
    pub tree: stasis_checkpoint::Options,
    /// Options for VMs.
    pub vm: stasis_checkpoint::vm::VmCheckpointOptions,
}

/// The workload `target` names: a PID (a process tree), else a VM's or a container's name.
pub fn open(
    state: &StateDir,
    target: &str,
    opts: &SourceOptions,
) -> Result<Box<dyn Source>, WorkloadError> {
    if let Ok(pid) = target.parse::<i32>() {
        return Ok(Box::new(TreeSource::process_tree(pid, &opts.tree)));
    }
    if is_vm(state, target) {
        return Ok(Box::new(VmSource::open(state, target, opts.vm)?));
    }
    Ok(Box::new(TreeSource::container(state, target, &opts.tree)))
}

/// Whether `target` names a VM (a record under STATE/vms, live or not).
pub fn is_vm(state: &StateDir, target: &str) -> bool {
    stasis_runtime::container::check_name(target).is_ok()
        && state.vms().file_path(target, "json").exists()
}

/// Checkpoints `w` into `sink`: freeze, write its state, then either resume it and commit
/// the image (`leave_running`: a failed commit leaves it running), or commit the image and
/// only then discard it (the original never dies before its image is durable). A failure
/// before that resumes it as it was, and nothing committed is left in the sink.
pub fn checkpoint(
    w: &mut dyn Source,
    sink: &mut dyn ImageSink,
    leave_running: bool,
    progress: Progress<'_>,
) -> Result<Report, WorkloadError> {
    w.freeze()?;
    // Held whole by stasis: it runs on while its image is written.
    let early = leave_running && w.captured();
    if early {
        w.resume()?;
    }
    if let Err(e) = w.write_state(sink, progress) {
        return Err(w.abandon(e));
    }
    if leave_running {
        if !early {
            w.resume()?;
        }
        commit(w, sink)?;
    } else {
        if let Err(e) = commit(w, sink) {
            return Err(w.abandon(e));
        }
        w.discard()?;
    }
    Ok(w.report())
}

/// Makes the image durable and visible under its name.
fn commit(w: &mut dyn Source, sink: &mut dyn ImageSink) -> Result<(), WorkloadError> {
    let t = Instant::now();
    // Tests hold stasis here (FAILPOINTS="image-syncing=sleep(N)") to see the workload's state
    // while its image is being synced.
    stasis_runtime::failpoints::hit("image-syncing");
    sink.commit().map_err(|source| WorkloadError::Commit {
        workload: w.describe(),
        source,
    })?;
    stasis_runtime::failpoints::hit("image-committed");
    w.committed(t.elapsed().as_micros() as u64);
    Ok(())
}

//! Checkpoint errors: each names the process and what could not be done.

use stasis_image::ImageError;
use stasis_runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// stasis was asked to stop (signal number); the process was resumed as it was.
    #[error(
        "interrupted by signal {0}; the checkpoint was abandoned and the process left as it was"
    )]
    Interrupted(i32),
    #[error("no process with PID {0}")]
    NoSuchProcess(i32),
    /// The process uses something this version cannot checkpoint; nothing was changed.
    #[error("cannot checkpoint PID {pid}: {what}")]
    Unsupported { pid: i32, what: String },
    #[error("no running container named {0:?}")]
    NoSuchContainer(String),
    /// A container could not be checkpointed (named, with the reason).
    #[error("container {name}: {what}")]
    Container { name: String, what: String },
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The VMM refused or failed a snapshot step (the error names the VM).
    #[error(transparent)]
    Kvm(#[from] stasis_runtime::kvm::KvmError),
    #[error("checkpoint of VM {name}: {what}")]
    Vm { name: String, what: String },
    #[error("writing image: {0}")]
    Image(#[from] ImageError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The checkpoint failed and resuming the process failed too.
    #[error("checkpoint of PID {pid} failed ({cause}) and resuming it failed: {resume}")]
    ResumeFailed {
        pid: i32,
        cause: Box<CheckpointError>,
        resume: RuntimeError,
    },
}

impl CheckpointError {
    pub(crate) fn unsupported(pid: i32, what: impl Into<String>) -> Self {
        CheckpointError::Unsupported {
            pid,
            what: what.into(),
        }
    }

    /// A failed read of process `pid`'s /proc entry, as what it is: the process is gone
    /// (ENOENT, ESRCH), or the error itself (a permission error says so, with the path).
    pub(crate) fn from_proc(pid: i32, e: RuntimeError) -> Self {
        match e.errno() {
            Some(libc::ENOENT) | Some(libc::ESRCH) => CheckpointError::NoSuchProcess(pid),
            _ => e.into(),
        }
    }
}

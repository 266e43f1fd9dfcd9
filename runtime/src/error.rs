//! Errors of the runtime layer: each names the failing operation and its target.

use std::io;

/// An error from the kernel-facing layer.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A system call failed.
    #[error("{op} ({target}): {err}")]
    Sys {
        op: &'static str,
        target: String,
        /// Part of the message rather than a chained source, so it prints once.
        err: io::Error,
    },
    /// A procfs file did not have the expected shape.
    #[error("parsing {path}: {what}")]
    Parse { path: String, what: String },
    /// The process is in a state or uses a feature that this operation does not handle.
    #[error("{0}")]
    Unsupported(String),
    /// An external program (iproute2's `ip`, ...) ran and failed: what it was asked to do, the
    /// command line, its exit status and its stderr.
    #[error("{what}: `{command}` failed ({status}): {stderr}")]
    Command {
        what: String,
        command: String,
        status: String,
        stderr: String,
    },
    /// Something happened that the protocol with the tracee does not allow.
    #[error("{op} (pid {pid}): {what}")]
    Protocol {
        op: &'static str,
        pid: i32,
        what: String,
    },
    /// A cgroup, or a resource limit for one, that cannot be used as asked: `target` names
    /// the cgroup (or the limit text), `what` says why.
    #[error("{target}: {what}")]
    Cgroup { target: String, what: String },
}

/// Result type of the runtime layer.
pub type Result<T> = std::result::Result<T, RuntimeError>;

impl RuntimeError {
    /// A failed system call: `op` is the call, `target` what it acted on.
    pub fn sys(op: &'static str, target: impl Into<String>, source: io::Error) -> Self {
        RuntimeError::Sys {
            op,
            target: target.into(),
            err: source,
        }
    }

    /// A failed system call, taking errno from the thread's last error.
    pub fn last_os(op: &'static str, target: impl Into<String>) -> Self {
        Self::sys(op, target, io::Error::last_os_error())
    }

    /// The errno of a failed system call, if that is what this is.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RuntimeError::Sys { err, .. } => err.raw_os_error(),
            _ => None,
        }
    }
}

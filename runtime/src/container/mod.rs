//! stasis's own container runtime: `stasis run` and the commands that manage what it
//! started.
//!
//! A container is a process tree whose first process is PID 1 of new pid, mount, uts, ipc
//! and (unless `--net host`) network namespaces, in its own cgroup (`stasis/NAME` in every
//! hierarchy, see [`crate::cgroups`]) with its limits, pivoted into its root filesystem when
//! it has one ([`setup`]). The runtime's record of each container ([`record`]) lives under
//! the state directory and is checked against the live process before it is believed.

pub mod init;
pub mod lifecycle;
pub mod record;
pub mod setup;

pub use lifecycle::*;
pub use record::{
    check_name, process_alive, BridgeAddr, NetMode, Record, StateDir, DEFAULT_STATE_DIR,
};

use std::path::{Path, PathBuf};

/// Errors of the container runtime, naming the container and what failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("invalid container name {0:?}: use letters, digits, '_', '.' and '-', starting with a letter or digit, at most 63 characters")]
    BadName(String),
    #[error("container {0:?} already exists and is running")]
    Exists(String),
    #[error("no such container {0:?}")]
    NoSuch(String),
    #[error("container {0:?} is not running")]
    NotRunning(String),
    #[error("container {0:?} is running: stop it first, or remove it with --force")]
    Running(String),
    #[error("the record {path} is unreadable: {what}")]
    BadRecord { path: PathBuf, what: String },
    #[error("{op} {path}: {err}")]
    Io {
        op: &'static str,
        path: PathBuf,
        err: std::io::Error,
    },
    #[error("starting the container process (pid {pid}): {step}: {err}")]
    Start {
        pid: i32,
        step: String,
        err: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Sys(#[from] crate::RuntimeError),
}

impl ContainerError {
    pub fn io(op: &'static str, path: &Path, err: std::io::Error) -> Self {
        ContainerError::Io {
            op,
            path: path.to_path_buf(),
            err,
        }
    }
}

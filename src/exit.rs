//! Exit codes, documented in `stasis --help`.

use stasis_checkpoint::CheckpointError;
use stasis_migrate::MigrateError;
use stasis_restore::RestoreError;
use stasis_runtime::container::ContainerError;
use stasis_runtime::kvm::KvmError;
use stasis_workload::WorkloadError;

/// Success.
pub const OK: i32 = 0;
/// The operation failed (the workload was left as it was).
pub const FAILED: i32 = 1;
/// Usage error: arguments that do not parse or do not fit (clap exits with 2 by itself).
pub const USAGE: i32 = 2;
/// The image is corrupt, truncated or not an image.
pub const BAD_IMAGE: i32 = 3;
/// Refused before anything changed: no such process, PID taken, or an unsupported feature.
pub const REFUSED: i32 = 4;
/// A migration committed, but the destination never confirmed: the source is left frozen
/// for the operator to settle (the message says how).
pub const UNSETTLED: i32 = 5;

/// An error whose exit code is known where it is made; its text says what is wrong.
#[derive(Debug)]
pub struct Coded {
    pub code: i32,
    pub what: String,
}

impl std::fmt::Display for Coded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl std::error::Error for Coded {}

/// The image is not a valid one; exit code 3.
pub fn bad_image(what: String) -> Coded {
    Coded {
        code: BAD_IMAGE,
        what,
    }
}

/// Refused before anything changed; exit code 4.
pub fn refused(what: String) -> anyhow::Error {
    Coded {
        code: REFUSED,
        what,
    }
    .into()
}

/// Options that do not fit together or do not apply (e.g. to the kind of an image); exit
/// code 2, like the errors clap finds.
pub fn usage(what: String) -> anyhow::Error {
    Coded { code: USAGE, what }.into()
}

/// The exit code for an error.
pub fn code_for(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.code;
        }
        if let Some(e) = cause.downcast_ref::<MigrateError>() {
            match e {
                // Nothing was frozen: refused, or the receiver could not be reached.
                MigrateError::Refused { .. } | MigrateError::Failed { .. } => return REFUSED,
                MigrateError::Unsettled { .. } => return UNSETTLED,
                MigrateError::Interrupted { signal, .. } => return 128 + signal,
                MigrateError::Workload(w) => return workload_code(w),
                _ => return FAILED,
            }
        }
        if let Some(e) = cause.downcast_ref::<WorkloadError>() {
            return workload_code(e);
        }
        if let Some(e) = cause.downcast_ref::<CheckpointError>() {
            return checkpoint_code(e);
        }
        if let Some(e) = cause.downcast_ref::<RestoreError>() {
            return restore_code(e);
        }
        if let Some(e) = cause.downcast_ref::<ContainerError>() {
            return match e {
                ContainerError::BadName(_)
                | ContainerError::Exists(_)
                | ContainerError::NoSuch(_)
                | ContainerError::NotRunning(_)
                | ContainerError::Running(_)
                | ContainerError::Invalid(_) => REFUSED,
                _ => FAILED,
            };
        }
        if let Some(e) = cause.downcast_ref::<KvmError>() {
            return kvm_code(e);
        }
        if let Some(e) = cause.downcast_ref::<stasis_image::ImageError>() {
            // A file that cannot be opened or read is no verdict on an image.
            return match e {
                stasis_image::ImageError::File { .. } => FAILED,
                _ => BAD_IMAGE,
            };
        }
    }
    FAILED
}

fn workload_code(e: &WorkloadError) -> i32 {
    match e {
        WorkloadError::Checkpoint(e) => checkpoint_code(e),
        WorkloadError::Restore(e) => restore_code(e),
        WorkloadError::Unsupported { .. } => REFUSED,
        WorkloadError::OutOfOrder { .. }
        | WorkloadError::Commit { .. }
        | WorkloadError::Workflow { .. } => FAILED,
    }
}

fn checkpoint_code(e: &CheckpointError) -> i32 {
    match e {
        CheckpointError::Kvm(k) => kvm_code(k),
        CheckpointError::NoSuchProcess(_)
        | CheckpointError::NoSuchContainer(_)
        | CheckpointError::Unsupported { .. } => REFUSED,
        CheckpointError::Interrupted(sig) => 128 + sig,
        _ => FAILED,
    }
}

fn restore_code(e: &RestoreError) -> i32 {
    match e {
        RestoreError::Vm(k) => kvm_code(k),
        RestoreError::Image(_) | RestoreError::Invalid(_) => BAD_IMAGE,
        RestoreError::Unsupported(_) | RestoreError::PidTaken { .. } => REFUSED,
        _ => FAILED,
    }
}

fn kvm_code(e: &KvmError) -> i32 {
    match e {
        KvmError::Exists(_)
        | KvmError::NoSuch(_)
        | KvmError::Invalid { .. }
        | KvmError::Unsupported { .. } => REFUSED,
        KvmError::State(ContainerError::BadName(_)) => REFUSED,
        KvmError::Unverified { .. } => BAD_IMAGE,
        _ => FAILED,
    }
}

//! Exit codes, documented in `stasis --help`.

use stasis_checkpoint::CheckpointError;
use stasis_restore::RestoreError;
use stasis_runtime::container::ContainerError;
use stasis_runtime::kvm::KvmError;

/// Success.
pub const OK: i32 = 0;
/// The operation failed (the workload was left as it was).
pub const FAILED: i32 = 1;
/// The image is corrupt, truncated or not an image.
pub const BAD_IMAGE: i32 = 3;
/// Refused before anything changed: no such process, PID taken, or an unsupported feature.
pub const REFUSED: i32 = 4;

/// The exit code for an error.
pub fn code_for(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<CheckpointError>() {
            return match e {
                CheckpointError::Kvm(k) => kvm_code(k),
                CheckpointError::NoSuchProcess(_)
                | CheckpointError::NoSuchContainer(_)
                | CheckpointError::Unsupported { .. } => REFUSED,
                CheckpointError::Interrupted(sig) => 128 + sig,
                _ => FAILED,
            };
        }
        if let Some(e) = cause.downcast_ref::<RestoreError>() {
            return match e {
                RestoreError::Vm(k) => kvm_code(k),
                RestoreError::Image(_) | RestoreError::Invalid(_) => BAD_IMAGE,
                RestoreError::Unsupported(_) | RestoreError::PidTaken { .. } => REFUSED,
                _ => FAILED,
            };
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
        if cause.downcast_ref::<stasis_image::ImageError>().is_some() {
            return BAD_IMAGE;
        }
    }
    FAILED
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

//! seccomp state of a stopped thread, for the image: its mode and its filters.
//!
//! Freezing already suspended the filters for our injected syscalls
//! (crate::freeze::suspend_seccomp); here they are only read back.

use crate::error::CheckpointError;
use stasis_image::proto;
use stasis_runtime::seccomp;

/// The seccomp mode and filters (oldest first) of thread `tid` of `pid`, whose mode read
/// while it was stopped is `mode`.
pub fn collect(
    pid: i32,
    tid: i32,
    mode: u32,
) -> Result<(u32, Vec<proto::SeccompFilter>), CheckpointError> {
    match mode {
        0 | seccomp::MODE_STRICT => Ok((mode, Vec::new())),
        seccomp::MODE_FILTER => {
            let filters = seccomp::filters(tid).map_err(|e| match e.errno() {
                Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EINVAL) => {
                    CheckpointError::unsupported(
                        pid,
                        format!(
                            "thread {tid} has seccomp filters that cannot be read back \
                             (PTRACE_SECCOMP_GET_FILTER needs CAP_SYS_ADMIN and \
                             CONFIG_CHECKPOINT_RESTORE, and works only for classic BPF \
                             filters): {e}"
                        ),
                    )
                }
                _ => e.into(),
            })?;
            if filters.is_empty() {
                return Err(CheckpointError::unsupported(
                    pid,
                    format!("thread {tid} is in seccomp filter mode but has no filter to read"),
                ));
            }
            Ok((
                mode,
                filters
                    .into_iter()
                    .map(|f| proto::SeccompFilter {
                        insns: f.insns,
                        flags: f.flags,
                    })
                    .collect(),
            ))
        }
        other => Err(CheckpointError::unsupported(
            pid,
            format!("thread {tid} has an unknown seccomp mode {other}"),
        )),
    }
}

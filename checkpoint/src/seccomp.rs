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
            if let Some(i) = filters.iter().position(|f| returns_user_notif(&f.insns)) {
                return Err(CheckpointError::unsupported(
                    pid,
                    format!(
                        "thread {tid} has a seccomp filter (number {i}, oldest first) that \
                         hands syscalls to a supervisor (SECCOMP_RET_USER_NOTIF); its listener \
                         cannot be restored"
                    ),
                ));
            }
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

/// Whether a classic BPF program can return SECCOMP_RET_USER_NOTIF (a `ret #k` with it).
fn returns_user_notif(insns: &[u8]) -> bool {
    const RET_K: u16 = 0x06;
    const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;
    const SECCOMP_RET_ACTION_FULL: u32 = 0xffff_0000;
    insns.chunks_exact(8).any(|i| {
        let code = u16::from_ne_bytes([i[0], i[1]]);
        let k = u32::from_ne_bytes([i[4], i[5], i[6], i[7]]);
        code == RET_K && k & SECCOMP_RET_ACTION_FULL == SECCOMP_RET_USER_NOTIF
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_user_notification_returns() {
        let ret = |k: u32| [&[6u8, 0, 0, 0][..], &k.to_ne_bytes()[..]].concat();
        let allow = ret(0x7fff_0000);
        assert!(!returns_user_notif(&allow));
        assert!(returns_user_notif(
            &[allow.clone(), ret(0x7fc0_0000)].concat()
        ));
        assert!(!returns_user_notif(&[allow, ret(0x0005_0001)].concat()));
    }
}

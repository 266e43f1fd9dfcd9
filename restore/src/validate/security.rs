//! A process's security state must be in its record, whole and well formed, before anything
//! is created: a restore (a migration's receiving side, say) recreates whatever the image
//! says, and a field that is missing would otherwise read as "none" — the restorer's own
//! credentials, no_new_privs off, no seccomp filter — giving the process more than it had.
//!
//! Each kind of state is one [`Rule`]: the image must list its kind in
//! `Process.security_recorded` and its check must pass. A new kind of state (a seccomp
//! filter, say) is one more entry in [`RULES`]: its kind, the field errors name, its check.

use crate::error::RestoreError;
use stasis_image::proto::{self, SecurityState};
use stasis_image::Image;

/// Most supplementary groups (the kernel's NGROUPS_MAX).
pub const MAX_GROUPS: usize = 65536;

/// Most entries in `Process.security_recorded` (each kind once; room for kinds to come).
pub const MAX_RECORDED: usize = 16;

/// Secure bits the kernel knows (SECURE_ALL_BITS and their locks, up to Linux 6.14's).
pub const SECUREBITS_KNOWN: u32 = 0xfff;

/// One kind of security state: the field an error names, and what makes it well formed.
pub struct Rule {
    pub kind: SecurityState,
    pub field: &'static str,
    /// Checks the process record; the error says what is wrong (the caller names the
    /// process and the field).
    pub check: fn(&proto::Process) -> Result<(), String>,
}

/// Every kind of security state a process record must carry.
pub const RULES: &[Rule] = &[
    Rule {
        kind: SecurityState::Credentials,
        field: "creds",
        check: credentials,
    },
    Rule {
        kind: SecurityState::NoNewPrivs,
        field: "no_new_privs",
        // A bool: any value is well formed; what matters is that it was recorded.
        check: |_| Ok(()),
    },
    Rule {
        kind: SecurityState::Seccomp,
        field: "seccomp",
        // Each thread's mode and filters (crate::seccomp bounds and checks them).
        check: |p| {
            crate::seccomp::validate(p).map_err(|e| match e {
                RestoreError::Invalid(what) => what,
                e => e.to_string(),
            })
        },
    },
];

/// Checks the security state of every process of the image (zombies run no more and carry
/// none). The error names the process and the field.
pub fn check_image(image: &Image) -> Result<(), RestoreError> {
    image.processes().iter().try_for_each(check_process)
}

/// Checks one process's security state against [`RULES`].
pub fn check_process(p: &proto::Process) -> Result<(), RestoreError> {
    if p.zombie {
        return Ok(());
    }
    let invalid = |field: &str, what: String| {
        RestoreError::Invalid(format!("process {}: security state {field}: {what}", p.pid))
    };
    let recorded = &p.security_recorded;
    if recorded.len() > MAX_RECORDED {
        return Err(invalid(
            "security_recorded",
            format!("{} entries (at most {MAX_RECORDED})", recorded.len()),
        ));
    }
    for (i, &k) in recorded.iter().enumerate() {
        match SecurityState::try_from(k) {
            Ok(SecurityState::Unspecified) | Err(_) => {
                return Err(invalid(
                    "security_recorded",
                    format!("entry {i} is {k}, not a kind of security state"),
                ))
            }
            Ok(_) if recorded[..i].contains(&k) => {
                return Err(invalid(
                    "security_recorded",
                    format!("kind {k} is listed twice"),
                ))
            }
            Ok(_) => {}
        }
    }
    for rule in RULES {
        if !recorded.contains(&(rule.kind as i32)) {
            return Err(invalid(
                rule.field,
                "missing (the image does not say it was recorded; restoring without it would \
                 give the process more than it had)"
                    .into(),
            ));
        }
        (rule.check)(p).map_err(|what| invalid(rule.field, what))?;
    }
    Ok(())
}

/// The highest capability this kernel knows.
fn cap_last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n: &u32| n < 64)
        .unwrap_or(63)
}

/// uid/gid sets, supplementary groups, capability sets and securebits.
fn credentials(p: &proto::Process) -> Result<(), String> {
    let c = p.creds.as_ref().ok_or("missing")?;
    for (what, ids) in [("uids", &c.uids), ("gids", &c.gids)] {
        if ids.len() != 4 {
            return Err(format!(
                "{what} has {} ids (real, effective, saved and filesystem are needed)",
                ids.len()
            ));
        }
        if let Some(i) = ids.iter().position(|&id| id == u32::MAX) {
            return Err(format!("{what}[{i}] is -1, which is not an id"));
        }
    }
    if c.groups.len() > MAX_GROUPS {
        return Err(format!(
            "groups has {} entries (at most {MAX_GROUPS})",
            c.groups.len()
        ));
    }
    if c.groups.contains(&u32::MAX) {
        return Err("groups holds -1, which is not a group id".into());
    }
    let last = cap_last_cap();
    let known = if last >= 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    };
    let sets = [
        ("cap_inheritable", c.cap_inheritable),
        ("cap_permitted", c.cap_permitted),
        ("cap_effective", c.cap_effective),
        ("cap_bounding", c.cap_bounding),
        ("cap_ambient", c.cap_ambient),
    ];
    for (what, set) in sets {
        if set & !known != 0 {
            return Err(format!(
                "{what} {set:#x} holds capabilities this kernel does not have (the last is \
                 {last})"
            ));
        }
    }
    if c.cap_effective & !c.cap_permitted != 0 {
        return Err(format!(
            "cap_effective {:#x} is not within cap_permitted {:#x}",
            c.cap_effective, c.cap_permitted
        ));
    }
    if c.cap_ambient & !(c.cap_permitted & c.cap_inheritable) != 0 {
        return Err(format!(
            "cap_ambient {:#x} is not within cap_permitted and cap_inheritable",
            c.cap_ambient
        ));
    }
    if c.securebits & !SECUREBITS_KNOWN != 0 {
        return Err(format!(
            "securebits {:#x} holds bits the kernel does not know",
            c.securebits
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> proto::Process {
        proto::Process {
            pid: 100,
            creds: Some(proto::Credentials {
                uids: vec![1000; 4],
                gids: vec![1000; 4],
                groups: vec![4, 24],
                cap_bounding: 0xff,
                ..Default::default()
            }),
            security_recorded: vec![
                SecurityState::Credentials as i32,
                SecurityState::NoNewPrivs as i32,
                SecurityState::Seccomp as i32,
            ],
            ..Default::default()
        }
    }

    #[test]
    fn every_missing_or_malformed_field_is_named() {
        assert!(check_process(&good()).is_ok());
        type Breaker = fn(&mut proto::Process);
        let cases: Vec<(&str, Breaker)> = vec![
            ("creds: missing", |p| p.creds = None),
            ("no_new_privs: missing", |p| p.security_recorded.truncate(1)),
            ("seccomp: missing", |p| p.security_recorded.truncate(2)),
            ("creds: missing", |p| {
                p.security_recorded.remove(0);
            }),
            ("security_recorded", |p| p.security_recorded.push(99)),
            ("security_recorded", |p| p.security_recorded.push(1)),
            ("uids has 3", |p| p.creds.as_mut().unwrap().uids.truncate(3)),
            ("gids[2] is -1", |p| {
                p.creds.as_mut().unwrap().gids[2] = u32::MAX
            }),
            ("groups has 65537", |p| {
                p.creds.as_mut().unwrap().groups = vec![7; MAX_GROUPS + 1]
            }),
            ("cap_effective", |p| {
                p.creds.as_mut().unwrap().cap_effective = 1
            }),
            ("cap_ambient", |p| {
                let c = p.creds.as_mut().unwrap();
                c.cap_permitted = 1;
                c.cap_ambient = 1;
            }),
            ("cap_bounding", |p| {
                p.creds.as_mut().unwrap().cap_bounding = 1 << 63
            }),
            ("securebits", |p| {
                p.creds.as_mut().unwrap().securebits = 1 << 20
            }),
        ];
        for (needle, break_it) in cases {
            let mut p = good();
            break_it(&mut p);
            let err = check_process(&p).expect_err(needle).to_string();
            assert!(err.contains(needle), "{needle}: {err}");
            assert!(err.contains("process 100"), "{err}");
        }
        let zombie = proto::Process {
            zombie: true,
            ..Default::default()
        };
        assert!(check_process(&zombie).is_ok());
    }
}

//! The freezer of a process's cgroup: cgroup2's `cgroup.freeze` or the v1 `freezer`
//! controller's `freezer.state`, behind one interface. Paths come from /proc/PID/cgroup and
//! the mount table, so both layouts (and a host that has only one of them) work.

use super::{read, write};
use crate::error::{Result, RuntimeError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One cgroup's freezer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freezer {
    /// cgroup2 directory (has `cgroup.freeze` and `cgroup.events`).
    V2(PathBuf),
    /// cgroup v1 freezer directory (has `freezer.state`).
    V1(PathBuf),
}

/// Mount points of the cgroup2 hierarchy and of the v1 freezer hierarchy, from mountinfo text.
pub fn parse_mounts(mountinfo: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let (v2, v1) = super::hierarchy::parse_mountinfo(mountinfo);
    let freezer = v1
        .into_iter()
        .find(|(controllers, _)| controllers.iter().any(|c| c == "freezer"))
        .map(|(_, dir)| dir);
    (v2, freezer)
}

/// (cgroup2 path, v1 freezer path) of a process, from /proc/PID/cgroup text.
pub fn parse_proc_cgroup(text: &str) -> (Option<String>, Option<String>) {
    let (mut v2, mut v1) = (None, None);
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "freezer") {
            v1 = Some(path.to_string());
        }
    }
    (v2, v1)
}

impl Freezer {
    /// The freezer of `pid`'s own cgroup, if it is in one below a hierarchy's root (a root
    /// cgroup is everybody's and is never frozen). cgroup2 is preferred.
    pub fn of(pid: i32) -> Result<Option<Freezer>> {
        let (m2, m1) = parse_mounts(&read(Path::new("/proc/self/mountinfo"))?);
        let (c2, c1) = parse_proc_cgroup(&read(Path::new(&format!("/proc/{pid}/cgroup")))?);
        let below = |mount: Option<PathBuf>, cg: Option<String>| {
            let (mount, cg) = (mount?, cg?);
            let rel = cg.trim_start_matches('/');
            (!rel.is_empty() && !rel.contains("..")).then(|| mount.join(rel))
        };
        if let Some(dir) = below(m2, c2).filter(|d| d.join("cgroup.freeze").exists()) {
            return Ok(Some(Freezer::V2(dir)));
        }
        Ok(below(m1, c1)
            .filter(|d| d.join("freezer.state").exists())
            .map(Freezer::V1))
    }

    fn dir(&self) -> &Path {
        match self {
            Freezer::V2(d) | Freezer::V1(d) => d,
        }
    }

    /// Every process in the cgroup and its descendants.
    pub fn procs(&self) -> Result<Vec<i32>> {
        super::procs_below(self.dir())
    }

    /// Freezes the cgroup and waits (bounded) until every task in it is frozen.
    pub fn freeze(&self, bound: Duration) -> Result<()> {
        let deadline = Instant::now() + bound;
        match self {
            Freezer::V2(d) => write(&d.join("cgroup.freeze"), "1")?,
            Freezer::V1(d) => write(&d.join("freezer.state"), "FROZEN")?,
        }
        loop {
            if self.is_frozen()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = self.thaw();
                return Err(RuntimeError::Protocol {
                    op: "cgroup freeze",
                    pid: 0,
                    what: format!("{} did not freeze within {bound:?}", self.dir().display()),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Whether every task in the cgroup is frozen.
    pub fn is_frozen(&self) -> Result<bool> {
        Ok(match self {
            Freezer::V2(d) => read(&d.join("cgroup.events"))?
                .lines()
                .any(|l| l.trim() == "frozen 1"),
            Freezer::V1(d) => read(&d.join("freezer.state"))?.trim() == "FROZEN",
        })
    }

    /// Thaws the cgroup.
    pub fn thaw(&self) -> Result<()> {
        match self {
            Freezer::V2(d) => write(&d.join("cgroup.freeze"), "0"),
            Freezer::V1(d) => write(&d.join("freezer.state"), "THAWED"),
        }
    }

    /// The file and the value that thaw the cgroup, for a guard process that writes them
    /// if stasis dies while the cgroup is frozen (runtime::guard).
    pub fn thaw_write(&self) -> (PathBuf, &'static [u8]) {
        match self {
            Freezer::V2(d) => (d.join("cgroup.freeze"), b"0"),
            Freezer::V1(d) => (d.join("freezer.state"), b"THAWED"),
        }
    }

    /// For reports: "cgroup2 /sys/fs/cgroup/..." or "cgroup v1 freezer ...".
    pub fn describe(&self) -> String {
        match self {
            Freezer::V2(d) => format!("cgroup2 {}", d.display()),
            Freezer::V1(d) => format!("cgroup v1 freezer {}", d.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_both_hierarchies() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw\n\
                  37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let (v2, v1) = parse_mounts(mi);
        assert_eq!(v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(v1, Some(PathBuf::from("/sys/fs/cgroup/freezer")));
        let (c2, c1) = parse_proc_cgroup("6:freezer:/a/b\n4:memory:/m\n0::/x\n");
        assert_eq!(c2.as_deref(), Some("/x"));
        assert_eq!(c1.as_deref(), Some("/a/b"));
    }
}

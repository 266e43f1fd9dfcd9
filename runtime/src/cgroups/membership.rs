//! Which cgroups a process is in (/proc/PID/cgroup), and moving a process into cgroups named
//! that way, in cgroup2 and in every cgroup v1 hierarchy (named ones such as `name=systemd`
//! included): checkpoint records the lines, restore puts each process back where it was.

use crate::error::{Result, RuntimeError};
use std::path::{Path, PathBuf};

/// One line of /proc/PID/cgroup: "ID:CONTROLLERS:PATH" (cgroup2: "0::PATH").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub hierarchy: u32,
    /// Comma-separated v1 controllers (or `name=NAME`); empty for cgroup2.
    pub controllers: String,
    /// Path from the hierarchy's root (as this process's cgroup namespace sees it).
    pub path: String,
}

impl Membership {
    /// The line as /proc/PID/cgroup shows it.
    pub fn describe(&self) -> String {
        format!("{}:{}:{}", self.hierarchy, self.controllers, self.path)
    }
}

/// Parses /proc/PID/cgroup text.
pub fn parse(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            Some(Membership {
                hierarchy: parts.next()?.parse().ok()?,
                controllers: parts.next()?.to_string(),
                path: parts.next()?.to_string(),
            })
        })
        .collect()
}

/// The cgroups process `pid` is in.
pub fn of(pid: i32) -> Result<Vec<Membership>> {
    Ok(parse(&crate::procfs::read_text(&format!(
        "/proc/{pid}/cgroup"
    ))?))
}

/// The mount point (from mountinfo text) of the whole hierarchy holding `controllers`:
/// the cgroup2 mount for "", else the v1 mount whose options hold every one of them.
pub fn mount_of(mountinfo: &str, controllers: &str) -> Option<PathBuf> {
    let want: Vec<&str> = controllers.split(',').filter(|c| !c.is_empty()).collect();
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut l = left.split_whitespace();
        let root = l.nth(3)?;
        let mount_point = l.next()?;
        let mut r = right.split_whitespace();
        let fstype = r.next()?;
        let options: Vec<&str> = r.nth(1)?.split(',').collect();
        let fits = match fstype {
            "cgroup2" => want.is_empty(),
            "cgroup" => !want.is_empty() && want.iter().all(|c| options.contains(c)),
            _ => false,
        };
        (fits && root == "/").then(|| PathBuf::from(mount_point.replace("\\040", " ")))
    })
}

/// The directory of cgroup `m` on this host; an error naming it if its hierarchy is not
/// mounted or the cgroup does not exist.
pub fn directory(mountinfo: &str, m: &Membership) -> Result<PathBuf> {
    let missing =
        |what: String| RuntimeError::Unsupported(format!("cgroup {}: {what}", m.describe()));
    let root = mount_of(mountinfo, &m.controllers).ok_or_else(|| {
        missing(if m.controllers.is_empty() {
            "cgroup2 is not mounted here".into()
        } else {
            format!(
                "no cgroup v1 hierarchy with {} is mounted here",
                m.controllers
            )
        })
    })?;
    let dir = root.join(m.path.trim_start_matches('/'));
    if !dir.join("cgroup.procs").exists() {
        return Err(missing(format!("{} does not exist", dir.display())));
    }
    Ok(dir)
}

/// Moves process `pid` (every thread of it) into cgroup directory `dir`.
pub fn join(pid: i32, dir: &Path) -> Result<()> {
    let procs = dir.join("cgroup.procs");
    std::fs::write(&procs, pid.to_string())
        .map_err(|e| RuntimeError::sys("write", format!("{} (PID {pid})", procs.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /sub /mnt/memsub rw,relatime - cgroup cgroup rw,memory
36 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn lines_parse_and_find_their_hierarchy() {
        let m = parse("9:name=systemd:/user.slice\n2:cpu,cpuacct:/a b\n0::/x\n");
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].controllers, "cpu,cpuacct");
        assert_eq!(m[1].path, "/a b");
        let mount = |c: &str| mount_of(MOUNTINFO, c).map(|p| p.display().to_string());
        assert_eq!(
            mount("name=systemd").as_deref(),
            Some("/sys/fs/cgroup/systemd")
        );
        assert_eq!(
            mount("cpu,cpuacct").as_deref(),
            Some("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(mount("memory").as_deref(), Some("/sys/fs/cgroup/memory"));
        assert_eq!(mount("").as_deref(), Some("/sys/fs/cgroup/unified"));
        assert_eq!(mount("pids"), None);
    }
}

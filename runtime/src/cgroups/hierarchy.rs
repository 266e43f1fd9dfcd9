//! Which hierarchy (cgroup2 or a v1 mount) holds each controller on this host.

use super::read;
use crate::error::Result;
use std::path::{Path, PathBuf};

/// A controller stasis uses. The first four carry limits; `CpuAcct` is only where CPU time
/// is read from; `Freezer` stops and resumes the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    Memory,
    Cpu,
    Pids,
    Io,
    CpuAcct,
    Freezer,
}

impl Controller {
    /// Every controller, in the order cgroups are made.
    pub const ALL: [Controller; 6] = [
        Controller::Memory,
        Controller::Cpu,
        Controller::Pids,
        Controller::Io,
        Controller::CpuAcct,
        Controller::Freezer,
    ];

    /// Its name as a v1 mount option.
    pub fn v1_name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
            Controller::Io => "blkio",
            Controller::CpuAcct => "cpuacct",
            Controller::Freezer => "freezer",
        }
    }

    /// Its name in cgroup2's `cgroup.controllers`; `None` for what cgroup2 has in every
    /// cgroup without a controller (`cpu.stat`'s usage, `cgroup.freeze`).
    pub fn v2_name(self) -> Option<&'static str> {
        match self {
            Controller::Memory => Some("memory"),
            Controller::Cpu => Some("cpu"),
            Controller::Pids => Some("pids"),
            Controller::Io => Some("io"),
            Controller::CpuAcct | Controller::Freezer => None,
        }
    }
}

/// cgroup v1 or cgroup2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V1,
    V2,
}

/// The cgroup mounts of a host and which one each controller is used from.
///
/// A limit controller (memory, cpu, pids, io) comes from cgroup2 when the cgroup2 root lists
/// it in `cgroup.controllers`, else from the v1 mount that has it (`blkio` for io). CPU time
/// and the freezer come from cgroup2 whenever it is mounted (its `cpu.stat` usage and
/// `cgroup.freeze` exist in every non-root cgroup2 cgroup), else from the v1 `cpuacct` and
/// `freezer` mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    v2: Option<PathBuf>,
    v2_controllers: Vec<String>,
    v1: Vec<(String, PathBuf)>,
}

/// (cgroup2 mount point, every v1 mount as (its controllers, mount point)) from mountinfo.
/// The first mount of a kind wins; named v1 hierarchies (`name=systemd`) are left out.
pub fn parse_mountinfo(mountinfo: &str) -> (Option<PathBuf>, Vec<(Vec<String>, PathBuf)>) {
    let (mut v2, mut v1) = (None, Vec::new());
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split_whitespace().nth(4).map(unescape) else {
            continue;
        };
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or_default();
        let options = r.nth(1).unwrap_or_default();
        match fstype {
            "cgroup2" => v2 = v2.or(Some(mount_point)),
            "cgroup" => {
                let controllers: Vec<String> = options
                    .split(',')
                    .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                    .map(String::from)
                    .collect();
                if !controllers.is_empty() {
                    v1.push((controllers, mount_point));
                }
            }
            _ => {}
        }
    }
    (v2, v1)
}

/// A mountinfo path field: space, tab, newline and backslash come as `\ooo` octal escapes.
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| {
            b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        if let Some(d) = octal {
            out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

impl Hierarchy {
    /// The hierarchies of this host, from /proc/self/mountinfo.
    pub fn detect() -> Result<Hierarchy> {
        Hierarchy::from_mountinfo(&read(Path::new("/proc/self/mountinfo"))?)
    }

    /// The hierarchies mountinfo text names (the cgroup2 root's `cgroup.controllers` is read
    /// from the mount point, so a test can point it at a directory of its own).
    pub fn from_mountinfo(mountinfo: &str) -> Result<Hierarchy> {
        let (v2, mounts) = parse_mountinfo(mountinfo);
        let v1 = mounts
            .into_iter()
            .flat_map(|(controllers, dir)| controllers.into_iter().map(move |c| (c, dir.clone())))
            .collect();
        Hierarchy::new(v2, v1)
    }

    /// Explicit roots: the cgroup2 mount (if any) and v1 mounts as (controller, mount point),
    /// e.g. `("memory", "/sys/fs/cgroup/memory")`; a comounted hierarchy is listed once per
    /// controller. Reads the cgroup2 root's `cgroup.controllers`.
    pub fn new(v2: Option<PathBuf>, v1: Vec<(String, PathBuf)>) -> Result<Hierarchy> {
        let v2_controllers = match &v2 {
            Some(root) => read(&root.join("cgroup.controllers"))?
                .split_whitespace()
                .map(String::from)
                .collect(),
            None => Vec::new(),
        };
        Ok(Hierarchy {
            v2,
            v2_controllers,
            v1,
        })
    }

    /// The cgroup2 mount point, if cgroup2 is mounted.
    pub fn v2_root(&self) -> Option<&Path> {
        self.v2.as_deref()
    }

    /// The mount point of the v1 hierarchy that has `controller` (a v1 name, e.g. "blkio").
    pub fn v1_root(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, d)| d.as_path())
    }

    /// Where `c` is used from: its version and the root of its hierarchy; `None` if this
    /// host has it nowhere.
    pub fn root_of(&self, c: Controller) -> Option<(Version, &Path)> {
        let v2 = self.v2.as_deref();
        let in_v2 = match c.v2_name() {
            Some(name) => self.v2_controllers.iter().any(|x| x == name),
            None => true,
        };
        match v2 {
            Some(root) if in_v2 => Some((Version::V2, root)),
            _ => self.v1_root(c.v1_name()).map(|r| (Version::V1, r)),
        }
    }

    /// One line per controller, for reports: "memory: cgroup v1 /sys/fs/cgroup/memory".
    pub fn describe(&self) -> String {
        Controller::ALL
            .iter()
            .map(|&c| match self.root_of(c) {
                Some((Version::V2, r)) => format!("{}: cgroup2 {}", c.v1_name(), r.display()),
                Some((Version::V1, r)) => format!("{}: cgroup v1 {}", c.v1_name(), r.display()),
                None => format!("{}: not available", c.v1_name()),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw\n\
        32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
        38 31 0:35 / /sys/fs/cgroup/blk\\040io rw,relatime - cgroup cgroup rw,blkio\n\
        40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

    #[test]
    fn mountinfo_lists_every_v1_mount_and_the_cgroup2_one() {
        let (v2, v1) = parse_mountinfo(HYBRID);
        assert_eq!(v2, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(
            v1,
            vec![
                (
                    vec!["cpu".to_string(), "cpuacct".to_string()],
                    PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
                ),
                (
                    vec!["memory".to_string()],
                    PathBuf::from("/sys/fs/cgroup/memory")
                ),
                (
                    vec!["blkio".to_string()],
                    PathBuf::from("/sys/fs/cgroup/blk io")
                ),
            ]
        );
    }

    /// A controller listed by the cgroup2 root is used there; the others from their v1
    /// mounts; CPU time and the freezer from cgroup2 since it is mounted.
    #[test]
    fn hybrid_selects_per_controller() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let v2 = tmp.path().join("unified");
        std::fs::create_dir(&v2).expect("mkdir");
        std::fs::write(v2.join("cgroup.controllers"), "cpu pids\n").expect("write");
        let text = HYBRID.replace("/sys/fs/cgroup/unified", v2.to_str().expect("utf8"));
        let h = Hierarchy::from_mountinfo(&text).expect("hierarchy");
        assert_eq!(
            h.root_of(Controller::Cpu),
            Some((Version::V2, v2.as_path()))
        );
        assert_eq!(
            h.root_of(Controller::Pids),
            Some((Version::V2, v2.as_path()))
        );
        assert_eq!(
            h.root_of(Controller::Memory),
            Some((Version::V1, Path::new("/sys/fs/cgroup/memory")))
        );
        assert_eq!(
            h.root_of(Controller::Io),
            Some((Version::V1, Path::new("/sys/fs/cgroup/blk io")))
        );
        assert_eq!(
            h.root_of(Controller::CpuAcct),
            Some((Version::V2, v2.as_path()))
        );
        assert_eq!(
            h.root_of(Controller::Freezer),
            Some((Version::V2, v2.as_path()))
        );
    }

    #[test]
    fn v1_only_and_missing_controllers() {
        let h = Hierarchy::from_mountinfo(
            "32 31 0:29 / /cg/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
        )
        .expect("hierarchy");
        assert_eq!(
            h.root_of(Controller::CpuAcct),
            Some((Version::V1, Path::new("/cg/cpu,cpuacct")))
        );
        assert_eq!(h.root_of(Controller::Memory), None);
        assert_eq!(h.root_of(Controller::Freezer), None);
        assert!(h.describe().contains("memory: not available"));
    }

    #[test]
    fn a_missing_cgroup2_root_is_an_error_naming_it() {
        let err = Hierarchy::new(Some(PathBuf::from("/nonexistent/cg2")), Vec::new())
            .expect_err("no such root");
        assert!(
            err.to_string()
                .contains("/nonexistent/cg2/cgroup.controllers"),
            "{err}"
        );
    }
}

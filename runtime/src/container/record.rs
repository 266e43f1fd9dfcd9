//! The runtime's record of its containers: one JSON file per container under the state
//! directory (default /var/lib/stasis), written atomically, so it survives a crash of the
//! stasis process. A record is never trusted by itself: a container is alive only while the
//! process it names still runs with the same start time (a PID alone may have been reused).

use super::ContainerError;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/stasis";

/// How a container is networked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetMode {
    /// Its own network namespace with only `lo`.
    #[default]
    None,
    /// The host's network namespace.
    Host,
    /// Its own network namespace with a veth into the stasis bridge.
    Bridge,
}

impl std::str::FromStr for NetMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(NetMode::None),
            "host" => Ok(NetMode::Host),
            "bridge" => Ok(NetMode::Bridge),
            _ => Err(format!("unknown network mode {s:?} (none, host or bridge)")),
        }
    }
}

impl std::fmt::Display for NetMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetMode::None => "none",
            NetMode::Host => "host",
            NetMode::Bridge => "bridge",
        })
    }
}

/// A container's bridge attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeAddr {
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    /// Host end of the veth pair.
    pub veth: String,
    pub mac: Option<crate::netns::MacAddr>,
}

/// Everything the runtime knows about one container.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    /// Host PID of its init (PID 1 inside).
    pub pid: i32,
    /// Its init's start time (clock ticks after boot, /proc/PID/stat field 22).
    pub starttime: u64,
    /// Seconds since the epoch.
    pub created: u64,
    pub rootfs: Option<PathBuf>,
    pub hostname: String,
    pub command: Vec<String>,
    pub net: NetMode,
    pub bridge: Option<BridgeAddr>,
    /// The cgroup, relative to each hierarchy's root.
    pub cgroup: String,
    pub limits: crate::cgroups::Limits,
    /// Where a detached container's standard output and error go.
    pub log: Option<PathBuf>,
}

impl Record {
    /// Whether the process the record names still runs (same PID, same start time, not a
    /// zombie).
    pub fn alive(&self) -> bool {
        process_alive(self.pid, self.starttime)
    }
}

/// Whether `pid` still runs the process that started at `starttime` (not a zombie): a
/// record's process, believed only while both match.
pub fn process_alive(pid: i32, starttime: u64) -> bool {
    match crate::procfs::read_stat(pid) {
        Ok(st) => st.starttime == starttime && st.state != 'Z' && st.state != 'X',
        Err(_) => false,
    }
}

/// Checks a container name: what podman accepts, and short enough for names derived from it.
pub fn check_name(name: &str) -> Result<(), ContainerError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ContainerError::BadName(name.to_string()))
    }
}

/// The state directory: `containers/NAME.json` records and `containers/NAME.log` logs,
/// serialized by an exclusive lock on `lock`. [`StateDir::vms`] is the same directory's
/// view of VMs (`vms/NAME.json`, ...), with the same lock.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
    kind: &'static str,
}

/// An exclusive lock on the state directory (flock), released on drop.
pub struct Locked {
    _file: File,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir {
            root: root.into(),
            kind: "containers",
        }
    }

    /// The view of the same state directory that holds VMs' records.
    pub fn vms(&self) -> StateDir {
        StateDir {
            root: self.root.clone(),
            kind: "vms",
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn containers(&self) -> PathBuf {
        self.root.join(self.kind)
    }

    /// `NAME.EXT` beside the record of `name`.
    pub fn file_path(&self, name: &str, ext: &str) -> PathBuf {
        self.containers().join(format!("{name}.{ext}"))
    }

    pub fn record_path(&self, name: &str) -> PathBuf {
        self.containers().join(format!("{name}.json"))
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.containers().join(format!("{name}.log"))
    }

    /// Takes the lock that serializes creating and removing containers.
    pub fn lock(&self) -> Result<Locked, ContainerError> {
        let dir = self.containers();
        std::fs::create_dir_all(&dir).map_err(|e| ContainerError::io("create", &dir, e))?;
        let path = self.root.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| ContainerError::io("open", &path, e))?;
        // SAFETY: flock on an fd we own; no pointers.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(ContainerError::io(
                "lock",
                &path,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Locked { _file: file })
    }

    /// The record of `name`, if there is one.
    pub fn read(&self, name: &str) -> Result<Option<Record>, ContainerError> {
        self.read_as(name)
    }

    /// The record of `name` as any record type of this directory's kind.
    pub fn read_as<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, ContainerError> {
        check_name(name)?;
        let path = self.record_path(name);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ContainerError::io("read", &path, e)),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| ContainerError::BadRecord {
                path,
                what: e.to_string(),
            })
    }

    /// Writes a record atomically (temporary file, fsync, rename, fsync of the directory).
    pub fn write(&self, rec: &Record) -> Result<(), ContainerError> {
        self.write_as(&rec.name, rec)
    }

    /// Writes the record of `name` (any serializable record type) atomically.
    pub fn write_as<T: Serialize>(&self, name: &str, rec: &T) -> Result<(), ContainerError> {
        let dir = self.containers();
        std::fs::create_dir_all(&dir).map_err(|e| ContainerError::io("create", &dir, e))?;
        let path = self.record_path(name);
        let tmp = dir.join(format!(".{name}.json.tmp"));
        let text = serde_json::to_vec_pretty(rec).map_err(|e| ContainerError::BadRecord {
            path: path.clone(),
            what: e.to_string(),
        })?;
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            File::open(&dir)?.sync_all()
        };
        write().map_err(|e| ContainerError::io("write", &path, e))
    }

    /// Removes a record (and the container's log, unless `keep_log`).
    pub fn remove(&self, name: &str, keep_log: bool) -> Result<(), ContainerError> {
        let log = (!keep_log).then(|| self.log_path(name));
        for path in std::iter::once(self.record_path(name)).chain(log) {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(ContainerError::io("remove", &path, e)),
            }
        }
        Ok(())
    }

    /// Names of every recorded container, sorted.
    pub fn names(&self) -> Result<Vec<String>, ContainerError> {
        let dir = self.containers();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ContainerError::io("list", &dir, e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                let stem = n.strip_suffix(".json")?;
                check_name(stem).ok()?;
                Some(stem.to_string())
            })
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["web", "a", "db-1", "x.y_z", "9lives"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", ".x", "a/b", "a b", "..", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn net_modes() {
        for m in ["none", "host", "bridge"] {
            assert_eq!(m.parse::<NetMode>().map(|n| n.to_string()), Ok(m.into()));
        }
        assert!("nat".parse::<NetMode>().is_err());
    }
}

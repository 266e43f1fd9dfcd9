//! What a receiver keeps while it receives, and how it goes when a migration fails: the
//! image and root file system a worker receives under STATE/incoming (named after its PID),
//! the markers that let the listener clean up after a worker that was killed, and the
//! reading of a root file system's files streams.

use crate::protocol::{self, Frame, Message};
use crate::receiver::Stored;
use crate::tls::Conn;
use stasis_runtime::container::StateDir;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a receiver keeps the images being received: STATE/incoming.
pub fn incoming_dir(state: &StateDir) -> PathBuf {
    state.root().join("incoming")
}

/// The image that worker `pid` receives into, in `dir` (see [`incoming_dir`]).
pub fn incoming_image(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.img"))
}

/// The image file being received, removed when dropped.
pub(crate) struct Incoming(pub(crate) PathBuf);

impl Drop for Incoming {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Where a container's root file system that comes along is kept: STATE/rootfs/NAME.
pub fn rootfs_dir(state: &StateDir, name: &str) -> PathBuf {
    state.root().join("rootfs").join(name)
}

/// The root file system that worker `pid` receives into, in `dir` (see [`incoming_dir`]).
pub fn incoming_rootfs(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.rootfs"))
}

/// While worker `pid` builds a container on a root file system it received, this file in
/// `dir` names where it is: a listener whose worker was killed then removes it.
pub fn incoming_rootfs_marker(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.rootfs-at"))
}

/// While worker `pid` builds a container, this file in `dir` names its cgroup and its
/// name (a line each): a listener whose worker was killed then removes the cgroup the
/// build left (its processes died with the worker; its network namespace with them).
pub fn incoming_container_marker(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.container"))
}

/// Removes what killed worker `pid` received into `dir` (STATE/incoming: its image, its
/// root file system, one it had moved into STATE/rootfs for a build that never ran, and
/// the cgroup of a container it was building).
pub fn remove_incoming(dir: &Path, pid: u32) {
    let _ = std::fs::remove_file(incoming_image(dir, pid));
    let marker = incoming_container_marker(dir, pid);
    if let (Ok(text), Some(state)) = (std::fs::read_to_string(&marker), dir.parent()) {
        let state = StateDir::new(state);
        if let Some((rel, name)) = text.split_once('\n') {
            let live = stasis_runtime::container::running(&state, name).is_ok();
            if let (false, Ok(h)) = (live, stasis_runtime::cgroups::Hierarchy::detect()) {
                // Its processes, the held copy that was never committed, die with the
                // worker: wait until they are gone (killing any left), then remove it.
                if let Ok(cg) = stasis_runtime::cgroups::Cgroup::open(&h, rel) {
                    let _ = cg.kill();
                }
                let _ = stasis_runtime::container::remove_orphan_cgroup(&h, rel);
            }
        }
        let _ = std::fs::remove_file(marker);
    }
    let _ = std::fs::remove_dir_all(incoming_rootfs(dir, pid));
    let marker = incoming_rootfs_marker(dir, pid);
    if let Ok(at) = std::fs::read_to_string(&marker) {
        let at = PathBuf::from(at);
        let rootfs = dir.parent().map(|state| state.join("rootfs"));
        if at.parent().is_some_and(|p| Some(p) == rootfs.as_deref()) {
            let _ = std::fs::remove_dir_all(at);
        }
        let _ = std::fs::remove_file(marker);
    }
}

/// A root file system being received, removed when dropped unless kept.
pub(crate) struct RootfsIncoming {
    pub(crate) dir: PathBuf,
    /// Once moved to where the container will use it: the marker that says so.
    pub(crate) marker: Option<PathBuf>,
    /// Set when the commit came: the container runs on it.
    pub(crate) kept: Arc<std::sync::atomic::AtomicBool>,
}

impl RootfsIncoming {
    /// Moves it to `at` (where the build will use it), leaving a marker for the listener.
    pub(crate) fn settle(&mut self, at: PathBuf) -> Result<(), String> {
        use std::os::unix::fs::DirBuilderExt;
        let incoming = self.dir.parent().unwrap_or(Path::new("/"));
        let marker = incoming_rootfs_marker(incoming, std::process::id());
        std::fs::write(&marker, at.as_os_str().as_encoded_bytes())
            .map_err(|e| format!("writing {}: {e}", marker.display()))?;
        self.marker = Some(marker);
        if let Some(parent) = at.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        std::fs::rename(&self.dir, &at)
            .map_err(|e| format!("moving the root file system to {}: {e}", at.display()))?;
        self.dir = at;
        Ok(())
    }

    /// What the build calls once the commit came: the container will run on it, so the
    /// listener must no longer remove it.
    pub(crate) fn keeper(&self) -> impl Fn() + Send + Sync + 'static {
        let (kept, marker) = (self.kept.clone(), self.marker.clone());
        move || {
            kept.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(m) = &marker {
                let _ = std::fs::remove_file(m);
            }
        }
    }
}

impl Drop for RootfsIncoming {
    fn drop(&mut self) {
        if !self.kept.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = std::fs::remove_dir_all(&self.dir);
            if let Some(m) = self.marker.take() {
                let _ = std::fs::remove_file(m);
            }
        }
    }
}

/// The bytes of one files stream, frame after frame, up to its end; the paths it names
/// as gone are gathered.
struct FilesReader<'a> {
    conn: &'a mut Box<dyn Conn>,
    pending: Vec<u8>,
    at: usize,
    hash: &'a mut blake3::Hasher,
    bytes: &'a mut u64,
    /// The most bytes the stream may bring (with what came before).
    limit: u64,
    removed: Vec<String>,
    done: bool,
}

impl std::io::Read for FilesReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        use std::io::{Error, ErrorKind};
        while self.at == self.pending.len() && !self.done {
            match protocol::recv(self.conn).map_err(Error::other)? {
                Frame::Files(data) => {
                    *self.bytes += data.len() as u64;
                    if *self.bytes > self.limit {
                        return Err(Error::other(format!(
                            "the workload is larger than this receiver takes ({} bytes)",
                            self.limit
                        )));
                    }
                    self.hash.update(&data);
                    (self.pending, self.at) = (data, 0);
                }
                Frame::Control(Message::Removed { paths }) => self.removed.extend(paths),
                Frame::Control(Message::FilesEnd) => self.done = true,
                Frame::Control(Message::Abort { reason }) => {
                    return Err(Error::new(
                        ErrorKind::ConnectionAborted,
                        format!("the source aborted: {reason}"),
                    ))
                }
                _ => return Err(Error::other("a files stream broken by another frame")),
            }
        }
        let n = out.len().min(self.pending.len() - self.at);
        out[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Receives one files stream (its first frame `first`) into `dst`: unpacks it, then
/// removes the paths it names as gone.
pub(crate) fn receive_files(
    conn: &mut Box<dyn Conn>,
    first: Vec<u8>,
    hash: &mut blake3::Hasher,
    bytes: &mut u64,
    limit: u64,
    dst: &Path,
) -> Result<(), Stored> {
    *bytes += first.len() as u64;
    hash.update(&first);
    let mut r = FilesReader {
        conn,
        pending: first,
        at: 0,
        hash,
        bytes,
        limit,
        removed: Vec::new(),
        done: false,
    };
    let bad = |what: String| Stored::Bad(format!("the root file system: {what}"));
    crate::rootfs::unpack(&mut r, dst).map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionAborted => Stored::Aborted(e.to_string()),
        _ => bad(e.to_string()),
    })?;
    // The rest of the stream (the tar's padding, the paths gone, its end).
    std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| bad(e.to_string()))?;
    for p in &r.removed {
        crate::rootfs::remove(dst, p).map_err(|e| bad(format!("removing {p}: {e}")))?;
    }
    Ok(())
}

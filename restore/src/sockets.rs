//! What a recreated socket gets back beyond its kind and addresses: the options that
//! differed from a new socket's (runtime's sockopt table), its filter and the directions it
//! was shut down in. Each kind of socket calls these at the right point of its making:
//! options before bind, shutdown last (after a unix pair's queues are refilled).

use crate::error::RestoreError;
use stasis_image::proto;
use stasis_runtime::sockopt;
use std::os::fd::RawFd;

fn failed(p: &proto::Process, f: &proto::Fd, op: &str, e: std::io::Error) -> RestoreError {
    RestoreError::Unsupported(format!(
        "process {}: recreating fd {} ({:?}): {op}: {e}",
        p.pid,
        f.fd,
        f.kind()
    ))
}

/// Sets the saved options of `f` on `fd`, and attaches its filter. `bound`: the socket is
/// bound or connected already, so options only a new socket takes are left out (a
/// connection's own record sets those).
pub fn set_options(
    p: &proto::Process,
    f: &proto::Fd,
    fd: RawFd,
    bound: bool,
) -> Result<(), RestoreError> {
    for o in &f.sock_options {
        if bound && sockopt::before_bind(o.level, o.name) {
            continue;
        }
        sockopt::set(fd, o.level, o.name, o.value, &o.data).map_err(|e| {
            let op = format!("setsockopt({})", sockopt::label(o.level, o.name));
            failed(p, f, &op, e)
        })?;
    }
    if let Some(filter) = &f.sock_filter {
        let filter = sockopt::Filter {
            program: filter.program.clone(),
            locked: filter.locked,
        };
        sockopt::attach_filter(fd, &filter)
            .map_err(|e| failed(p, f, "setsockopt(SO_ATTACH_FILTER)", e))?;
    }
    Ok(())
}

/// Shuts `fd` down in the directions `f` was.
pub fn shut_down(p: &proto::Process, f: &proto::Fd, fd: RawFd) -> Result<(), RestoreError> {
    sockopt::shut_down(fd, f.sock_shutdown).map_err(|e| failed(p, f, "shutdown", e))
}

/// Runs `bind` (which binds a unix socket to its relative name) with `dir` as working
/// directory, in a thread of its own under `root` (or "/"), so the name stays as the
/// process bound it and nothing else of this process changes directory.
pub fn in_dir<T: Send>(
    root: Option<&std::path::Path>,
    dir: &str,
    bind: impl FnOnce() -> Result<T, RestoreError> + Send,
) -> Result<T, RestoreError> {
    use std::os::unix::fs::MetadataExt;
    let root = root.unwrap_or(std::path::Path::new("/"));
    stasis_runtime::sys::with_root(root, dir, || {
        // with_root falls back to "/" when it cannot enter the directory: not here.
        let same = match (std::fs::metadata("."), std::fs::metadata(dir)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if !same {
            return Err(RestoreError::Unsupported(format!(
                "cannot enter directory {dir} (under {}) to bind a unix socket to its \
                 relative name",
                root.display()
            )));
        }
        bind()
    })
    .map_err(|e| RestoreError::Unsupported(format!("binding in {dir}: {e}")))?
}

//! The receiving side of every workflow: a workload built from an image and held stopped,
//! then resumed or discarded. [`build`] checks the whole image, builds the workload, and
//! once it is whole and stopped (nothing of it has run, its TCP connections are still
//! locked) asks `on_held` whether it runs ([`Go::Resume`]) or is discarded
//! ([`Go::Discard`]: it is killed before it ran and what the restore made is undone). The
//! decision is made on the restoring thread, which is the tracer of the held workload; a
//! workflow that decides elsewhere (a migration receiver waiting for the source's commit)
//! blocks in `on_held` until it knows.

use crate::{Kind, Verb, WorkloadError};
use stasis_image::Image;
use stasis_restore::vm::{VmRestoreOptions, VmRestoreStats};
use stasis_restore::{Hold, RestoreError};
use stasis_runtime::container::{Record, StateDir};
use std::path::Path;
use std::sync::Arc;

pub use stasis_restore::Held;

/// What becomes of a held workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Go {
    Resume,
    /// Discard it, for this reason (what the build then returns names it).
    Discard(String),
}

/// Asked once the workload is whole and stopped (see the module documentation).
pub type OnHeld = Arc<dyn Fn(&Held) -> Go + Send + Sync>;

/// How to build a workload from an image.
#[derive(Debug)]
pub struct BuildOptions<'a> {
    /// Run it under this name (containers and VMs) instead of the image's.
    pub name: Option<&'a str>,
    /// Options of a process tree's restore (standard I/O passed on, PID wait, ...).
    pub tree: stasis_restore::Options,
    /// A VM: the memory size it must have.
    pub vm_memory: Option<u64>,
    /// A VM: run its VMM detached (else in the foreground until the guest ends).
    pub vm_detach: bool,
    /// A VM in the foreground: keep its console off standard output.
    pub vm_quiet: bool,
    /// A VM: check every hash before the guest runs.
    pub vm_verify_first: bool,
    /// When the restore began (opening the image included).
    pub started: std::time::Instant,
    /// Memory received apart from the image, in rounds (a migration's pre-copy): a VM's
    /// guest memory, a file of its size, which the VM then runs on.
    pub memory: Option<Arc<std::fs::File>>,
}

/// A workload built and running.
#[derive(Debug)]
pub enum Restored {
    /// A process tree: the root is a child of this process.
    Tree(stasis_restore::Stats),
    /// A container and its new record.
    Container(stasis_restore::Stats, Record),
    Vm(VmRestoreStats),
}

/// The kind of workload an image holds.
pub fn kind_of(image: &Image) -> Kind {
    if stasis_restore::vm::vm_of(image).is_some() {
        Kind::Vm
    } else if stasis_restore::container::container_of(image).is_some() {
        Kind::Container
    } else {
        Kind::ProcessTree
    }
}

/// How messages name the workload of `image` (built under `name`, if given).
pub fn describe(image: &Image, name: Option<&str>) -> String {
    let root = image.processes().first().map_or(0, |p| p.pid);
    match (kind_of(image), name) {
        (Kind::ProcessTree, _) => format!("PID {root}"),
        (Kind::Container, Some(n)) => format!("container {n}"),
        (Kind::Container, None) => stasis_restore::container::container_of(image)
            .map_or_else(|| "a container".into(), |c| format!("container {}", c.name)),
        (Kind::Vm, Some(n)) => format!("VM {n}"),
        (Kind::Vm, None) => stasis_restore::vm::vm_of(image)
            .map_or_else(|| "a VM".into(), |v| format!("VM {}", v.name)),
    }
}

/// Builds the workload of `image` (read from `path`) on this host and, once it is whole
/// and stopped, lets `on_held` decide; without `on_held` it runs at once. A discarded
/// workload is an error ([`RestoreError::Discarded`]) with nothing of it left.
pub fn build(
    state: &StateDir,
    image: Arc<Image>,
    path: &Path,
    opts: BuildOptions<'_>,
    on_held: Option<OnHeld>,
) -> Result<Restored, WorkloadError> {
    let BuildOptions { name, mut tree, .. } = opts;
    if opts.memory.is_some() && kind_of(&image) != Kind::Vm {
        return Err(WorkloadError::Unsupported {
            workload: describe(&image, None),
            verb: Verb::Build,
            why: "only a VM takes memory received apart from its image".into(),
        });
    }
    tree.hold = on_held.map(|decide| {
        Hold(Arc::new(move |held: &Held| match decide(held) {
            Go::Resume => Ok(()),
            Go::Discard(why) => Err(RestoreError::Discarded(why)),
        }))
    });
    match kind_of(&image) {
        Kind::ProcessTree => {
            if let Some(n) = name {
                return Err(not_for(&image, "a name", n));
            }
            Ok(Restored::Tree(stasis_restore::restore_tree(&image, &tree)?))
        }
        Kind::Container => {
            let (stats, rec) =
                stasis_restore::container::restore_container(&image, state, name, &tree)?;
            Ok(Restored::Container(stats, rec))
        }
        Kind::Vm => {
            // (restore_vm refuses a held VM that would not run detached.)
            let vm = VmRestoreOptions {
                hold: tree.hold.as_ref(),
                name,
                memory: opts.vm_memory,
                detach: opts.vm_detach,
                quiet: opts.vm_quiet,
                verify_first: opts.vm_verify_first,
                started: opts.started,
                memory_file: opts.memory.clone(),
            };
            let stats = stasis_restore::vm::restore_vm(image, path, state, &vm)?;
            Ok(Restored::Vm(stats))
        }
    }
}

/// A process tree cannot be given `what` (e.g. a name).
fn not_for(image: &Image, what: &str, value: &str) -> WorkloadError {
    WorkloadError::Unsupported {
        workload: describe(image, None),
        verb: Verb::Build,
        why: format!("{what} ({value}) is for containers and VMs"),
    }
}

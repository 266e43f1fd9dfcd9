//! Everything checked before the first change: the image's consistency and this machine.

use crate::error::RestoreError;
use crate::Options;
use stasis_image::proto::{self, VmaKind};
use stasis_image::Image;
use stasis_runtime::procfs::{self, MapEntry};
use stasis_runtime::sys::{self, PidUse};
use stasis_runtime::unix_queue::MAX_FDS_PER_MESSAGE;
use std::time::{Duration, Instant};

pub mod security;

/// The security state of every process of the image is there and well formed (see
/// [`security`]); checked before anything is created.
pub fn security(image: &Image) -> Result<(), RestoreError> {
    security::check_image(image)
}

/// Highest user address on x86_64 with 4-level paging.
pub const TASK_SIZE: u64 = 0x7fff_ffff_f000;

/// Most processes one image may hold.
pub const MAX_PROCESSES: usize = 4096;

/// Highest PID in a new pid namespace (the kernel's PID_MAX_LIMIT on 64-bit).
pub const NS_PID_MAX: i32 = 4 * 1024 * 1024;

/// The network namespace among the namespaces to join, if any.
pub fn net_to_join(opts: &Options) -> Result<Option<std::os::fd::BorrowedFd<'_>>, RestoreError> {
    use std::os::fd::AsFd;
    let Some(ns) = &opts.pid_namespace else {
        return Ok(None);
    };
    for fd in &ns.join {
        if stasis_runtime::pidns::ns_type(fd.as_fd())? == libc::CLONE_NEWNET {
            return Ok(Some(fd.as_fd()));
        }
    }
    Ok(None)
}

/// The restore options fit the image: a pid namespace to enter only for a pid-namespace
/// image, namespace files of kinds the new root can join, /proc mounted only inside a
/// joined mount namespace, and an existing root directory.
pub fn options(opts: &Options, pid_namespace: bool) -> Result<(), RestoreError> {
    use std::os::fd::AsFd;
    if let Some(root) = &opts.root {
        if !root.is_dir() {
            return Err(RestoreError::Unsupported(format!(
                "the root directory {} the image's paths should resolve under is not a directory",
                root.display()
            )));
        }
    }
    let Some(ns) = &opts.pid_namespace else {
        return Ok(());
    };
    if !pid_namespace {
        return Err(RestoreError::Unsupported(
            "namespaces to join were given, but the image is of a tree in stasis's own pid \
             namespace, which is restored into this one (only an image of a whole pid \
             namespace gets a new one)"
                .into(),
        ));
    }
    let mut mount = false;
    for (i, fd) in ns.join.iter().enumerate() {
        let kind = stasis_runtime::pidns::ns_type(fd.as_fd())
            .map_err(|e| RestoreError::Unsupported(format!("namespace file #{i} to join: {e}")))?;
        match kind {
            libc::CLONE_NEWPID | libc::CLONE_NEWUSER => {
                return Err(RestoreError::Unsupported(format!(
                    "namespace file #{i} to join is a {} namespace, which the new pid \
                     namespace's root cannot join",
                    if kind == libc::CLONE_NEWPID {
                        "pid"
                    } else {
                        "user"
                    }
                )))
            }
            libc::CLONE_NEWNS => mount = true,
            _ => {}
        }
    }
    if ns.mount_proc && !mount {
        return Err(RestoreError::Unsupported(
            "mounting a fresh /proc needs a mount namespace to join (it would cover the \
             host's /proc otherwise)"
                .into(),
        ));
    }
    Ok(())
}

/// The processes of a process-tree image, root first (every parent before its children).
pub fn processes(image: &Image) -> Result<Vec<&proto::Process>, RestoreError> {
    let inv = image.inventory();
    let tree = matches!(
        inv.kind(),
        proto::WorkloadKind::ProcessTree | proto::WorkloadKind::Container
    );
    if !tree {
        return Err(RestoreError::Unsupported(format!(
            "image holds a {:?} workload; only process trees are supported yet",
            inv.kind()
        )));
    }
    if inv.parent.is_some() {
        return Err(RestoreError::Unsupported(
            "incremental images (with a parent) are not supported by restore yet".into(),
        ));
    }
    let procs: Vec<&proto::Process> = image.processes().iter().collect();
    match procs.first() {
        None => return Err(RestoreError::Invalid("image holds no process".into())),
        Some(p) if p.pid != inv.root_pid => {
            return Err(RestoreError::Invalid(format!(
                "the first process is {}, but the root is {}",
                p.pid, inv.root_pid
            )))
        }
        Some(p) if inv.pid_namespace && p.pid != 1 => {
            return Err(RestoreError::Invalid(format!(
                "the image is of a whole pid namespace, but its root is PID {}, not 1",
                p.pid
            )))
        }
        Some(_) => {}
    }
    if procs.len() > MAX_PROCESSES {
        return Err(RestoreError::Unsupported(format!(
            "image holds {} processes; at most {MAX_PROCESSES} are supported",
            procs.len()
        )));
    }
    Ok(procs)
}

/// Every ghost file of the tree.
pub fn ghost_files<'a>(procs: &[&'a proto::Process]) -> Vec<&'a proto::GhostFile> {
    procs.iter().flat_map(|p| p.ghost_files.iter()).collect()
}

/// The highest PID the image's tasks may have: the host's pid_max, or the limit of a new pid
/// namespace for a pid-namespace image.
fn pid_max(image: &Image) -> Result<i32, RestoreError> {
    if image.inventory().pid_namespace {
        Ok(NS_PID_MAX)
    } else {
        Ok(sys::pid_max()?)
    }
}

/// Checks the process record and this machine (paths under `opts`'s root).
pub fn process(
    image: &Image,
    p: &proto::Process,
    ghosts: &[&proto::GhostFile],
    opts: &Options,
) -> Result<(), RestoreError> {
    let pid = p.pid as i32;
    let invalid = |what: String| RestoreError::Invalid(format!("process {pid}: {what}"));
    let pid_max = pid_max(image)?;
    // PID 1 is the root of a pid-namespace image (checked in processes()) and nobody else.
    let inv = image.inventory();
    let ns_init = inv.pid_namespace && pid == 1 && inv.root_pid == 1;
    if !ns_init && !(2..=pid_max).contains(&pid) {
        return Err(invalid(format!("PID {pid} is outside 2..={pid_max}")));
    }
    if p.zombie {
        if !p.threads.is_empty() || !p.vmas.is_empty() || !p.fds.is_empty() {
            return Err(invalid("a zombie with threads, memory or files".into()));
        }
        return Ok(());
    }
    security::check_process(p)?;
    for pipe in &p.pipes {
        if pipe.data.len() > pipe.size as usize || pipe.size > 1 << 30 {
            return Err(invalid(format!(
                "pipe {} holds {} bytes in a {}-byte buffer",
                pipe.id,
                pipe.data.len(),
                pipe.size
            )));
        }
    }
    if p.threads.is_empty() || p.threads[0].tid != p.pid {
        return Err(invalid("the first thread must be the main thread".into()));
    }
    if p.threads.len() > 1024 {
        return Err(RestoreError::Unsupported(format!(
            "process {pid} has {} threads; at most 1024 are supported",
            p.threads.len()
        )));
    }
    let mut tids: Vec<u32> = p.threads.iter().map(|t| t.tid).collect();
    tids.sort_unstable();
    tids.dedup();
    let out_of_range = |t: u32| (t <= 1 && t != p.pid) || t as i64 > pid_max as i64;
    if tids.len() != p.threads.len() || tids.iter().any(|&t| out_of_range(t)) {
        return Err(invalid("thread ids are repeated or out of range".into()));
    }
    for t in &p.threads {
        if t.regs.is_none() {
            return Err(invalid(format!("thread {} has no registers", t.tid)));
        }
        check_xstate(image, t)?;
    }
    if p.mm.is_none() {
        return Err(invalid("no mm state".into()));
    }
    if !p.root.starts_with('/') {
        return Err(invalid(format!(
            "root {:?} is not an absolute path",
            p.root
        )));
    }
    if !opts.host_path(&p.root).is_dir() {
        return Err(RestoreError::Unsupported(format!(
            "process {pid}: its root directory {} does not exist",
            p.root
        )));
    }
    check_vmas(pid, &p.vmas)?;
    crate::mmflags::validate(p)?;
    check_sysv_vmas(image, p)?;
    check_vdso(p)?;
    check_files(p, ghosts, opts)?;
    Ok(())
}

/// A System V shared memory mapping must lie within a segment of the image: of its
/// container's IPC namespace, or of the host's (then that segment must still be here, the
/// same key and size, not removed), and the first mapping of each attach (which restore
/// attaches whole) must start at offset 0.
fn check_sysv_vmas(image: &Image, p: &proto::Process) -> Result<(), RestoreError> {
    let invalid = |v: &proto::Vma, what: String| {
        RestoreError::Invalid(format!(
            "process {}: mapping {:#x}-{:#x}: {what}",
            p.pid, v.start, v.end
        ))
    };
    let inv = image.inventory();
    let container = inv.container.as_ref().and_then(|c| c.ipc.as_ref());
    let shm = match container {
        Some(ipc) => ipc.shm.as_slice(),
        None => inv.host_sysv_shm.as_slice(),
    };
    let mut attach_end = 0;
    for v in p.vmas.iter().filter(|v| v.kind() == VmaKind::SysvShm) {
        let seg = shm
            .iter()
            .find(|s| {
                s.perm
                    .as_ref()
                    .is_some_and(|perm| perm.id == v.sysv_shmid as i32)
            })
            .ok_or_else(|| {
                invalid(
                    v,
                    format!("System V segment {} is not in the image", v.sysv_shmid),
                )
            })?;
        let whole = seg.size.div_ceil(4096).saturating_mul(4096);
        let len = v.end - v.start;
        if v.pgoff.checked_add(len).is_none_or(|end| end > whole) {
            return Err(invalid(
                v,
                format!("offset {:#x} is beyond segment {}", v.pgoff, v.sysv_shmid),
            ));
        }
        if v.pgoff == 0 {
            attach_end = v.start.saturating_add(whole);
            if container.is_none() {
                check_host_segment(p.pid, seg)?;
            }
        } else if v.end > attach_end {
            return Err(invalid(v, "not part of an attachment from offset 0".into()));
        }
    }
    Ok(())
}

/// The host's segment the image names is still here: same id, key and size, not removed.
fn check_host_segment(pid: u32, seg: &proto::SysvShm) -> Result<(), RestoreError> {
    let Some(perm) = seg.perm.as_ref() else {
        return Err(RestoreError::Invalid(format!(
            "process {pid}: a System V segment without ids"
        )));
    };
    let now = stasis_runtime::sysvipc::shm_segment(perm.id)?;
    let what = format!(
        "process {pid}: System V segment {} (key {:#010x}, {} bytes) of this host",
        perm.id, perm.key as u32, seg.size
    );
    match now {
        None => Err(RestoreError::Unsupported(format!(
            "{what} no longer exists"
        ))),
        Some(s) if s.perm.key != perm.key || s.size != seg.size => {
            Err(RestoreError::Unsupported(format!(
                "{what} is another segment now (key {:#010x}, {} bytes)",
                s.perm.key as u32, s.size
            )))
        }
        Some(s) if s.perm.mode & stasis_runtime::sysvipc::SHM_DEST != 0 => Err(
            RestoreError::Unsupported(format!("{what} has been removed")),
        ),
        Some(_) => Ok(()),
    }
}

fn check_vmas(pid: i32, vmas: &[proto::Vma]) -> Result<(), RestoreError> {
    let invalid = |what: String| RestoreError::Invalid(format!("process {pid}: {what}"));
    let mut prev_end = 0;
    for v in vmas {
        let page = |x: u64| x.is_multiple_of(4096);
        if !page(v.start) || !page(v.end) || v.end <= v.start || v.start < prev_end {
            return Err(invalid(format!(
                "mapping {:#x}-{:#x} is unaligned, empty or overlaps the previous one",
                v.start, v.end
            )));
        }
        if v.kind() != VmaKind::Vsyscall && v.end > TASK_SIZE {
            return Err(invalid(format!(
                "mapping {:#x}-{:#x} is above user space",
                v.start, v.end
            )));
        }
        if v.kind() == VmaKind::Unspecified {
            return Err(invalid(format!(
                "mapping {:#x}-{:#x} has no kind",
                v.start, v.end
            )));
        }
        prev_end = v.end;
    }
    Ok(())
}

fn check_xstate(image: &Image, t: &proto::Thread) -> Result<(), RestoreError> {
    let ours = sys::xcr0();
    let theirs = image.inventory().xcr0;
    if theirs & !ours != 0 {
        return Err(RestoreError::Unsupported(format!(
            "the image uses CPU state components {theirs:#x} but this CPU enables only {ours:#x}"
        )));
    }
    if t.xstate.len() < 576 || t.xstate.len() > 16384 {
        return Err(RestoreError::Invalid(format!(
            "xstate of thread {} is {} bytes (expected 576..=16384)",
            t.tid,
            t.xstate.len()
        )));
    }
    Ok(())
}

/// This process's vDSO block: ([vvar], [vvar_vclock], [vdso]) entries that exist.
pub fn own_vdso_block() -> Result<Vec<MapEntry>, RestoreError> {
    Ok(procfs::read_maps(std::process::id() as i32)?
        .into_iter()
        .filter(MapEntry::is_vdso_block)
        .collect())
}

pub(crate) fn special_name(kind: VmaKind) -> Option<&'static str> {
    match kind {
        VmaKind::Vvar => Some("[vvar]"),
        VmaKind::VvarVclock => Some("[vvar_vclock]"),
        VmaKind::Vdso => Some("[vdso]"),
        _ => None,
    }
}

fn check_vdso(p: &proto::Process) -> Result<(), RestoreError> {
    let ours = own_vdso_block()?;
    let theirs: Vec<&proto::Vma> = p
        .vmas
        .iter()
        .filter(|v| special_name(v.kind()).is_some())
        .collect();
    let mismatch = |what: String| {
        RestoreError::Unsupported(format!(
            "the image's vDSO differs from this kernel's ({what}); restoring onto a different \
             kernel is not supported yet"
        ))
    };
    if ours.len() != theirs.len() {
        return Err(mismatch(format!(
            "{} special mappings here, {} in the image",
            ours.len(),
            theirs.len()
        )));
    }
    for (o, t) in ours.iter().zip(&theirs) {
        if special_name(t.kind()) != Some(o.name.as_str()) || o.len() != t.end - t.start {
            return Err(mismatch(format!("{} is {} bytes here", o.name, o.len())));
        }
        let (ob, tb) = (o.start - ours[0].start, t.start - theirs[0].start);
        if ob != tb {
            return Err(mismatch(format!(
                "{} sits at a different offset in the block",
                o.name
            )));
        }
    }
    if let Some(v) = ours.iter().find(|m| m.name == "[vdso]") {
        // SAFETY: [vdso] is mapped readable in this process for its whole length.
        let text = unsafe { std::slice::from_raw_parts(v.start as *const u8, v.len() as usize) };
        if blake3::hash(text).as_bytes().as_slice() != p.vdso_hash.as_slice() {
            return Err(mismatch("its code hash differs".into()));
        }
    }
    Ok(())
}

fn check_files(
    p: &proto::Process,
    ghosts: &[&proto::GhostFile],
    opts: &Options,
) -> Result<(), RestoreError> {
    let pid = p.pid;
    for v in &p.vmas {
        if v.ghost_id != 0 {
            if !ghosts.iter().any(|g| g.id == v.ghost_id) {
                return Err(RestoreError::Invalid(format!(
                    "mapping {:#x} names missing ghost file {}",
                    v.start, v.ghost_id
                )));
            }
            continue;
        }
        if matches!(v.kind(), VmaKind::FilePrivate | VmaKind::FileShared) {
            let meta = std::fs::metadata(opts.host_path(&v.path)).map_err(|e| {
                RestoreError::Unsupported(format!("process {pid}: mapped file {}: {e}", v.path))
            })?;
            if let Some(f) = &v.file {
                use std::os::unix::fs::MetadataExt;
                let mtime = meta.mtime() * 1_000_000_000 + meta.mtime_nsec();
                if meta.size() != f.size || mtime != f.mtime_ns {
                    return Err(RestoreError::Unsupported(format!(
                        "process {pid}: mapped file {} changed since the checkpoint (size {} -> {}, \
                         mtime differs: {})",
                        v.path,
                        f.size,
                        meta.size(),
                        mtime != f.mtime_ns
                    )));
                }
            }
        }
    }
    for f in &p.fds {
        if f.ghost_id != 0 {
            if !ghosts.iter().any(|g| g.id == f.ghost_id) {
                return Err(RestoreError::Invalid(format!(
                    "fd {} names missing ghost file {}",
                    f.fd, f.ghost_id
                )));
            }
            continue;
        }
        if f.kind() == proto::FdKind::Fifo {
            use std::os::unix::fs::FileTypeExt;
            match std::fs::metadata(opts.host_path(&f.path)) {
                Ok(m) if m.file_type().is_fifo() => {}
                _ => {
                    return Err(RestoreError::Unsupported(format!(
                        "process {pid}: fd {} was FIFO {}, which is no longer a FIFO there",
                        f.fd, f.path
                    )))
                }
            }
        }
        if matches!(f.kind(), proto::FdKind::Regular | proto::FdKind::CharDevice) {
            if let Err(e) = std::fs::metadata(opts.host_path(&f.path)) {
                return Err(RestoreError::Unsupported(format!(
                    "process {pid}: fd {} was {}: {e}",
                    f.fd, f.path
                )));
            }
        }
    }
    if std::fs::metadata(opts.host_path(&p.exe_path)).is_err() {
        return Err(RestoreError::Unsupported(format!(
            "process {pid}: executable {} does not exist",
            p.exe_path
        )));
    }
    if std::fs::metadata(opts.host_path(&p.cwd)).is_err() {
        return Err(RestoreError::Unsupported(format!(
            "process {pid}: working directory {} does not exist",
            p.cwd
        )));
    }
    Ok(())
}

/// The files in flight on the tree's unix sockets: each attached to a message that exists,
/// and each a description some fd of the image has, or a regular file (or device) that
/// exists to be opened again.
pub fn unix_pairs(procs: &[&proto::Process], opts: &Options) -> Result<(), RestoreError> {
    use std::collections::BTreeSet;
    let descs: BTreeSet<u32> = procs
        .iter()
        .flat_map(|p| p.fds.iter().map(|f| f.desc_id))
        .filter(|&d| d != 0)
        .collect();
    for p in procs {
        for pair in &p.unix_pairs {
            let queues = [
                (&pair.queued_for_id, &pair.attached_for_id),
                (&pair.queued_for_peer, &pair.attached_for_peer),
            ];
            for (queue, attached) in queues {
                let mut seen = BTreeSet::new();
                for a in attached {
                    let invalid = |what: String| {
                        RestoreError::Invalid(format!(
                            "process {}: unix socket {}, queued message {}: {what}",
                            p.pid, pair.id, a.message
                        ))
                    };
                    let Some(data) = queue.get(a.message as usize) else {
                        return Err(invalid("there is no such message".into()));
                    };
                    if !seen.insert(a.message) {
                        return Err(invalid("its files in flight are listed twice".into()));
                    }
                    if a.files.is_empty() || a.files.len() > MAX_FDS_PER_MESSAGE {
                        return Err(invalid(format!(
                            "{} files in flight (1 to {MAX_FDS_PER_MESSAGE} are possible)",
                            a.files.len()
                        )));
                    }
                    if data.is_empty() && pair.sock_type == libc::SOCK_STREAM as u32 {
                        return Err(invalid(
                            "files in flight on no bytes of a stream socket".into(),
                        ));
                    }
                    for f in &a.files {
                        match (f.desc_id, &f.file) {
                            (0, Some(file)) => check_in_flight_file(p, pair, file, opts)?,
                            (id, None) if descs.contains(&id) => {}
                            (0, None) => {
                                return Err(invalid("a file in flight is not described".into()))
                            }
                            (id, None) => {
                                return Err(invalid(format!(
                                    "a file in flight is description {id}, which no fd of the \
                                     image has"
                                )))
                            }
                            (_, Some(_)) => {
                                return Err(invalid(
                                    "a file in flight is both a description and a file".into(),
                                ))
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// A file in flight that no fd holds: a regular file or device, opened again by path.
fn check_in_flight_file(
    p: &proto::Process,
    pair: &proto::UnixPair,
    file: &proto::Fd,
    opts: &Options,
) -> Result<(), RestoreError> {
    let kind = file.kind();
    if !matches!(kind, proto::FdKind::Regular | proto::FdKind::CharDevice)
        || file.ghost_id != 0
        || file.desc_id != 0
    {
        return Err(RestoreError::Invalid(format!(
            "process {}: a file in flight on unix socket {} is {kind:?} {:?}, which cannot be \
             restored that way",
            p.pid, pair.id, file.path
        )));
    }
    std::fs::metadata(opts.host_path(&file.path)).map_err(|e| {
        RestoreError::Unsupported(format!(
            "process {}: file {} was in flight on unix socket {}: {e}",
            p.pid, file.path, pair.id
        ))
    })?;
    Ok(())
}

/// Who hears why a restore waits for a PID (see [`on_pid_wait`]).
static PID_WAIT_NOTICE: std::sync::OnceLock<fn(&str)> = std::sync::OnceLock::new();
/// Whether the notice was given (once per process: a tree waits for all its PIDs together).
static PID_WAIT_SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// How long restore waits for a PID before it says why.
const PID_WAIT_QUIET: Duration = Duration::from_millis(100);

/// Has `notice` told, once, why a restore waits for a PID that is still a zombie (longer than
/// a moment): e.g. a CLI prints it, so a wait of seconds is not a silent hang.
pub fn on_pid_wait(notice: fn(&str)) {
    let _ = PID_WAIT_NOTICE.set(notice);
}

/// Waits (bounded) until `pid` is free: a just-killed original may still be a zombie.
pub fn wait_pid_free(pid: i32, bound: Duration) -> Result<(), RestoreError> {
    use std::sync::atomic::Ordering;
    let start = Instant::now();
    loop {
        match sys::pid_use(pid) {
            PidUse::Free => return Ok(()),
            PidUse::Taken { comm, state } => {
                if state != 'Z' && state != 'X' || start.elapsed() >= bound {
                    return Err(RestoreError::PidTaken { pid, comm, state });
                }
                if start.elapsed() >= PID_WAIT_QUIET && !PID_WAIT_SAID.swap(true, Ordering::Relaxed)
                {
                    if let Some(notice) = PID_WAIT_NOTICE.get() {
                        notice(&format!(
                            "waiting for PID {pid} to be released by its parent ({comm} is a \
                             zombie until its parent reaps it; at most {:.0} s)",
                            bound.as_secs_f64()
                        ));
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(attached: Vec<proto::Attachment>) -> proto::Process {
        proto::Process {
            pid: 100,
            fds: vec![proto::Fd {
                fd: 3,
                desc_id: 1,
                ..Default::default()
            }],
            unix_pairs: vec![proto::UnixPair {
                id: 10,
                peer: 11,
                sock_type: libc::SOCK_STREAM as u32,
                queued_for_id: vec![b"x".to_vec()],
                attached_for_id: attached,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn held(message: u32, desc_id: u32) -> proto::Attachment {
        proto::Attachment {
            message,
            files: vec![proto::InFlightFile {
                desc_id,
                file: None,
            }],
        }
    }

    fn joining(kinds: &[&str], mount_proc: bool) -> Options {
        let join = kinds
            .iter()
            .map(|k| {
                std::fs::File::open(format!("/proc/self/ns/{k}"))
                    .unwrap()
                    .into()
            })
            .collect();
        Options {
            pid_namespace: Some(crate::PidNamespace {
                join,
                mount_proc,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn namespace_options_must_fit_the_image() {
        assert!(options(&joining(&["uts", "net", "mnt"], true), true).is_ok());
        assert!(options(&Options::default(), false).is_ok());
        let bad = [
            (joining(&["uts"], false), false, "own pid namespace"),
            (joining(&["pid"], false), true, "a pid namespace"),
            (joining(&["user"], false), true, "a user namespace"),
            (joining(&["uts"], true), true, "needs a mount namespace"),
        ];
        for (opts, pid_ns, needle) in bad {
            let err = options(&opts, pid_ns).expect_err(needle).to_string();
            assert!(err.contains(needle), "{err}");
        }
        let missing = Options {
            root: Some("/nonexistent-stasis-root".into()),
            ..Default::default()
        };
        assert!(options(&missing, false).is_err());
    }

    #[test]
    fn files_in_flight_must_name_what_the_image_holds() {
        let opts = Options::default();
        assert!(unix_pairs(&[&tree(vec![held(0, 1)])], &opts).is_ok());
        let bad = [
            (vec![held(0, 7)], "description 7"),
            (vec![held(1, 1)], "no such message"),
            (vec![held(0, 1), held(0, 1)], "listed twice"),
            (vec![held(0, 0)], "not described"),
            (
                vec![proto::Attachment {
                    message: 0,
                    files: vec![],
                }],
                "0 files in flight",
            ),
        ];
        for (attached, needle) in bad {
            let err = unix_pairs(&[&tree(attached)], &opts)
                .expect_err(needle)
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
    }
}

//! The System V IPC objects of an IPC namespace — shared memory segments, semaphore sets and
//! message queues — saved at checkpoint ([`capture`]) and recreated at restore ([`recreate`],
//! then [`finish`]) in a fresh IPC namespace, with the same ids, keys, permissions, owners and
//! contents, and the namespace's IPC limits (the kernel.shm*/msg*/sem sysctls).
//!
//! # How
//!
//! A namespace is named by a process in it, which the caller keeps alive while calling in
//! here. The work is done by a short-lived thread of this process that joins the namespace
//! with setns(CLONE_NEWIPC): an IPC namespace belongs to a task, not to a process, so only
//! that thread moves, and /proc/sysvipc, the ipc sysctls and shmget/semctl/msgrcv/... all act
//! on the namespace of the thread that calls them (measured on 6.18: a thread in another
//! namespace sees that namespace's /proc/sysvipc and shm_next_id, while the other threads
//! keep seeing their own).
//!
//! - Objects are listed from /proc/sysvipc/{shm,sem,msg}.
//! - A segment's contents are read from its file, opened through /proc/self/map_files while
//!   the segment is attached read-only for an instant (see `kernel::shm_file`): nattch is
//!   back as it was before anything is read, and reading with pread leaves the segment's
//!   never-written pages unallocated (SEEK_DATA/SEEK_HOLE find the end of its data). The
//!   attach and detach do set the segment's shm_atime/shm_dtime and shm_lpid (to this
//!   process). Needs CAP_SYS_ADMIN (map_files); stasis runs as root.
//! - Semaphore values are read with semctl(GETALL).
//! - Messages are copied without being removed, with msgrcv(MSG_COPY | IPC_NOWAIT, index),
//!   which changes neither the queue nor its times. It needs CONFIG_CHECKPOINT_RESTORE; on a
//!   kernel without it a non-empty queue is refused (never drained). It copies no more than
//!   the namespace's current kernel.msgmax: a message sent before msgmax was lowered below
//!   its length is refused too, with the advice to raise msgmax.
//! - To recreate an object with its id, the id is written to
//!   /proc/sys/kernel/{shm,sem,msg}_next_id right before shmget/semget/msgget(IPC_CREAT |
//!   IPC_EXCL) with its key (IPC_PRIVATE for key 0), and the id obtained is checked. These
//!   sysctls exist with CONFIG_CHECKPOINT_RESTORE, belong to each IPC namespace and are
//!   looked up through the namespace of the thread that opens them (measured on 6.18: a value
//!   written from a thread in the container's namespace is seen there and not in ours, and it
//!   goes back to -1 once an object has taken it). The creating thread sets its effective
//!   uid/gid to the object's creator for the call (cuid/cgid cannot be set otherwise), then
//!   IPC_SET sets owner and mode, and the contents are written: segments through their file
//!   (pages that are all zero are not written, so they stay unallocated), semaphores with
//!   SETALL, messages with msgsnd in queue order. SHM_LOCKED segments are locked again
//!   (SHM_LOCK).
//! - Limits: the namespace's sysctls are saved with its objects. [`recreate`] first raises
//!   each limit to what the objects need if the saved value is smaller (a queue may hold more
//!   than its msg_qbytes, a segment may be bigger than a shmmax lowered after it was made),
//!   then sets the saved values once the objects exist. msg_qbytes above msgmnb cannot be set
//!   without CAP_SYS_RESOURCE, which root lacks on the project's machines; raising msgmnb in
//!   the container's namespace first avoids needing it.
//!
//! [`recreate`] checks everything it can before it creates anything ([`validate`]: no
//! duplicate ids or keys, values in range, contents within the bound; and that the namespace
//! is empty and is not stasis's own). If anything fails once it has started, it removes what
//! it created and puts the limits back.
//!
//! # Bounds
//!
//! The contents of all objects of a namespace together (segment data after trimming,
//! messages' texts plus 8 bytes each for their types, 2 bytes per semaphore) may be at most
//! [`MAX_CONTENT_BYTES`] (32 MiB): they are stored in one protobuf record of the image, and
//! records are at most 64 MiB. [`capture`] checks each object against what is left before
//! it allocates anything for it, and refuses with an error naming the object and its size.
//! Segments count only up to their last non-zero byte: a large segment that is mostly never
//! written costs little.
//!
//! # What is not saved or restored
//!
//! - Times (shm_atime/dtime/ctime, sem_otime/ctime, msg_stime/rtime/ctime) and pids (cpid,
//!   lpid, sempid, lspid, lrpid): the kernel has no way to set them.
//! - Semaphore undo values (semadj) belong to processes, not to the set; processes waiting on
//!   a semaphore or a queue are restored by restarting their system call.
//! - Attachments: `attached` records a segment's nattch at capture; the restored processes
//!   re-attach their segments themselves. A segment already removed while attached (SHM_DEST
//!   in its mode, key IPC_PRIVATE) is recreated as a live segment, and [`finish`] removes it
//!   again once the restored processes have attached it. Likewise kernel.shm_rmid_forced is
//!   set by [`finish`], not by [`recreate`]: with it set, the segments would be destroyed
//!   when the recreating thread exits, as nothing has attached them yet.
//! - SHM_HUGETLB segments are refused at capture.
//! - POSIX message queues (mqueue) of the namespace are not SysV objects and not covered.
//!
//! uids and gids are as the initial user namespace sees them (stasis runs there).

mod kernel;
mod table;

use crate::error::{Result, RuntimeError};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use table::{Kind, Name, Row};

/// Version of the [`IpcObjects`] layout; [`recreate`] refuses others. Fields are only ever
/// added (with serde defaults), and then this need not change.
pub const IPC_OBJECTS_VERSION: u32 = 1;

/// At most this many bytes of contents in all the objects of one namespace (see the module
/// documentation): they go into one image record, and records are at most 64 MiB.
pub const MAX_CONTENT_BYTES: u64 = 32 << 20;

/// Mode bit of a segment removed (IPC_RMID) while still attached.
pub const SHM_DEST: u32 = 0o1000;
/// Mode bit of a segment locked in memory (SHM_LOCK).
pub const SHM_LOCKED: u32 = 0o2000;

/// Largest value of a semaphore.
const SEMVMX: u16 = 32767;
/// What a message costs besides its text, against [`MAX_CONTENT_BYTES`]: its type.
const MSG_OVERHEAD: u64 = 8;
/// The buffer a message is first copied into (kernel.msgmax's default).
const MSG_COPY_START: u64 = 8192;
/// At most this many objects of one kind (the kernel's own bound with ipcmni_extend).
const MAX_OBJECTS: usize = 1 << 24;

/// The SysV IPC objects of one IPC namespace, and its IPC limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcObjects {
    /// [`IPC_OBJECTS_VERSION`] when written.
    pub version: u32,
    pub limits: IpcLimits,
    pub shm: Vec<ShmSegment>,
    pub sem: Vec<SemSet>,
    pub msg: Vec<MsgQueue>,
}

/// What every object has: its key, id, permissions and owners.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcPerm {
    /// The key it was made with; 0 (IPC_PRIVATE) for none.
    pub key: i32,
    /// Its id, which the processes using it know it by.
    pub id: i32,
    /// Permission bits (0777); for segments also [`SHM_DEST`] and [`SHM_LOCKED`].
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    pub gid: u32,
    /// Creator: the effective ids of the process that made it (they may also control it).
    pub cuid: u32,
    pub cgid: u32,
}

/// A shared memory segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmSegment {
    pub perm: IpcPerm,
    /// Size in bytes, as it was asked for (not rounded to pages).
    pub size: u64,
    /// Contents: the first `data.len()` bytes; the rest up to `size` are zero (trailing zero
    /// bytes are trimmed).
    pub data: Vec<u8>,
    /// How many attachments it had at capture (not restored: processes re-attach).
    pub attached: u64,
}

/// A semaphore set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemSet {
    pub perm: IpcPerm,
    /// The value of each semaphore, in order (GETALL); as many as the set has.
    pub values: Vec<u16>,
}

/// A message queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgQueue {
    pub perm: IpcPerm,
    /// Its capacity in bytes (msg_qbytes).
    pub qbytes: u64,
    /// Its messages, first to be received first.
    pub messages: Vec<Message>,
}

/// A message of a queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Its type (at least 1).
    pub mtype: i64,
    pub text: Vec<u8>,
}

/// The IPC limits of a namespace: its sysctls in /proc/sys/kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcLimits {
    /// Largest segment, bytes.
    pub shmmax: u64,
    /// All segments together, pages.
    pub shmall: u64,
    /// Most segments.
    pub shmmni: u32,
    /// 1: segments are removed once no process is attached and their creator is gone.
    pub shm_rmid_forced: u32,
    /// Largest message, bytes.
    pub msgmax: u32,
    /// Default (and, without CAP_SYS_RESOURCE, largest) msg_qbytes of a queue.
    pub msgmnb: u32,
    /// Most queues.
    pub msgmni: u32,
    /// kernel.sem: semmsl (most semaphores in a set), semmns (in all sets), semopm (most
    /// operations in one semop), semmni (most sets).
    pub sem: [u32; 4],
}

/// The contents bytes still allowed, against [`MAX_CONTENT_BYTES`].
struct Budget {
    left: u64,
}

impl Budget {
    fn new() -> Self {
        Budget {
            left: MAX_CONTENT_BYTES,
        }
    }

    /// Whether `bytes` more would still fit; the error names `what`.
    fn room(&self, what: &str, bytes: u64) -> Result<()> {
        match bytes <= self.left {
            true => Ok(()),
            false => Err(self.refuse(what, &format!("has {bytes} bytes of contents"))),
        }
    }

    /// The error for object `what`, whose contents are `too_big` ("has N bytes of ...").
    fn refuse(&self, what: &str, too_big: &str) -> RuntimeError {
        RuntimeError::Unsupported(format!(
            "{what} {too_big}: over the limit of {MAX_CONTENT_BYTES} bytes ({} MiB) for the \
             contents of all SysV IPC objects of a namespace, of which {} were left after the \
             objects before it",
            MAX_CONTENT_BYTES >> 20,
            self.left
        ))
    }

    fn take(&mut self, what: &str, bytes: u64) -> Result<()> {
        self.room(what, bytes)?;
        self.left -= bytes;
        Ok(())
    }
}

/// An object named for errors: "shm id 32769 key 0x00001234 (IPC namespace of pid 42)".
fn name(pid: i32, kind: Kind, perm: &IpcPerm) -> String {
    format!("{} (IPC namespace of pid {pid})", Name(kind, perm))
}

impl ShmSegment {
    fn content_bytes(&self) -> u64 {
        self.data.len() as u64
    }
}

impl SemSet {
    fn content_bytes(&self) -> u64 {
        2 * self.values.len() as u64
    }
}

impl MsgQueue {
    fn content_bytes(&self) -> u64 {
        self.messages
            .iter()
            .map(|m| m.text.len() as u64 + MSG_OVERHEAD)
            .sum()
    }

    /// The msg_qbytes the queue needs while its messages are sent back: msgsnd waits (or
    /// with IPC_NOWAIT fails) unless both the bytes and the number of messages queued stay
    /// within msg_qbytes, and a queue may hold more than its msg_qbytes if that was lowered
    /// after the messages were sent.
    fn room(&self) -> u64 {
        let bytes: u64 = self.messages.iter().map(|m| m.text.len() as u64).sum();
        self.qbytes.max(bytes).max(self.messages.len() as u64)
    }
}

/// Segment `id` of the calling thread's IPC namespace as /proc/sysvipc/shm shows it (no
/// contents), if there is one.
pub fn shm_segment(id: i32) -> Result<Option<ShmSegment>> {
    Ok(table::read(Kind::Shm)?
        .into_iter()
        .find(|r| r.perm.id == id)
        .map(|r| ShmSegment {
            perm: r.perm,
            size: r.size,
            data: Vec::new(),
            attached: r.count,
        }))
}

/// Saves the SysV IPC objects and IPC limits of the IPC namespace of process `pid`, leaving
/// them as they were (but for the attach/detach times of segments; see the module
/// documentation). The processes of the namespace should be frozen meanwhile: objects are
/// read one after another, and one removed while this runs is an error.
pub fn capture(pid: i32) -> Result<IpcObjects> {
    kernel::in_ipc_ns(pid, || {
        let mut budget = Budget::new();
        let limits = IpcLimits::read()?;
        let rows = |kind| table::read(kind).map(Vec::into_iter);
        Ok(IpcObjects {
            version: IPC_OBJECTS_VERSION,
            shm: rows(Kind::Shm)?
                .map(|r| capture_shm(pid, r, &mut budget))
                .collect::<Result<_>>()?,
            sem: rows(Kind::Sem)?
                .map(|r| capture_sem(pid, r, &mut budget))
                .collect::<Result<_>>()?,
            msg: rows(Kind::Msg)?
                .map(|r| capture_msg(pid, r, limits.msgmax, &mut budget))
                .collect::<Result<_>>()?,
            limits,
        })
    })
}

fn capture_shm(pid: i32, row: Row, budget: &mut Budget) -> Result<ShmSegment> {
    let what = name(pid, Kind::Shm, &row.perm);
    let file = kernel::shm_file(row.perm.id, row.size, false)
        .map_err(|e| RuntimeError::sys("shmat + open map_files", &what, e))?;
    if kernel::is_hugetlb(&file).map_err(|e| RuntimeError::sys("fstatfs", &what, e))? {
        return Err(RuntimeError::Unsupported(format!(
            "{what}: SHM_HUGETLB segments are not supported"
        )));
    }
    let end = kernel::data_end(&file, budget.left)
        .map_err(|e| RuntimeError::sys("lseek(SEEK_DATA/SEEK_HOLE)", &what, e))?;
    let end = end.map_err(|past| {
        budget.refuse(
            &what,
            &format!("has data up to byte {past} of its {}", row.size),
        )
    })?;
    let end = end.min(row.size);
    let mut data = vec![0u8; end as usize];
    file.read_exact_at(&mut data, 0)
        .map_err(|e| RuntimeError::sys("pread", &what, e))?;
    let len = data.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    data.truncate(len);
    data.shrink_to_fit();
    budget.take(&what, len as u64)?;
    Ok(ShmSegment {
        perm: row.perm,
        size: row.size,
        data,
        attached: row.count,
    })
}

fn capture_sem(pid: i32, row: Row, budget: &mut Budget) -> Result<SemSet> {
    let what = name(pid, Kind::Sem, &row.perm);
    let ds: libc::semid_ds =
        kernel::stat(row.perm.id).map_err(|e| RuntimeError::sys("semctl(IPC_STAT)", &what, e))?;
    let n = ds.sem_nsems;
    budget.take(&what, 2 * n)?;
    let values = kernel::sem_getall(row.perm.id, n as usize)
        .map_err(|e| RuntimeError::sys("semctl(GETALL)", &what, e))?;
    Ok(SemSet {
        perm: row.perm,
        values,
    })
}

/// `msgmax` is the namespace's kernel.msgmax.
fn capture_msg(pid: i32, row: Row, msgmax: u32, budget: &mut Budget) -> Result<MsgQueue> {
    let what = name(pid, Kind::Msg, &row.perm);
    let ds: libc::msqid_ds =
        kernel::stat(row.perm.id).map_err(|e| RuntimeError::sys("msgctl(IPC_STAT)", &what, e))?;
    let (count, bytes) = (ds.msg_qnum, ds.__msg_cbytes);
    budget.room(
        &what,
        bytes.saturating_add(count.saturating_mul(MSG_OVERHEAD)),
    )?;
    let mut messages = Vec::with_capacity(count as usize);
    // The kernel copies the whole buffer in before it copies a message out, so it starts
    // small and grows (on E2BIG) up to all the queue's bytes, which no message exceeds.
    let mut buf = bytes.min(MSG_COPY_START) as usize;
    for index in 0..count {
        let copied = loop {
            match kernel::msg_copy(row.perm.id, index, buf) {
                Err(e) if e.raw_os_error() == Some(libc::E2BIG) && (buf as u64) < bytes => {
                    buf = (buf * 4).min(bytes as usize)
                }
                copied => break copied,
            }
        };
        match copied {
            Ok((mtype, text)) => messages.push(Message { mtype, text }),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                return Err(RuntimeError::Unsupported(format!(
                    "{what} holds {count} messages, and this kernel cannot read them without \
                     taking them off the queue (msgrcv MSG_COPY needs \
                     CONFIG_CHECKPOINT_RESTORE)"
                )))
            }
            // The buffer is big enough, so the message is longer than the kernel copies.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(RuntimeError::Unsupported(format!(
                    "message {index} of {what} is longer than kernel.msgmax of the namespace \
                     ({msgmax} bytes, lowered since it was sent), and msgrcv(MSG_COPY) copies \
                     no more than that: raise msgmax there to checkpoint it"
                )))
            }
            Err(e) => {
                return Err(RuntimeError::sys(
                    "msgrcv(MSG_COPY)",
                    format!("message {index} of {count} of {what}"),
                    e,
                ))
            }
        }
    }
    let queue = MsgQueue {
        perm: row.perm,
        qbytes: ds.msg_qbytes,
        messages,
    };
    budget.take(&what, queue.content_bytes())?;
    Ok(queue)
}

/// Checks that `objs` can be recreated, before anything is: its version, that no two objects
/// of a kind share an id or a (non-private) key, that every value is one the kernel takes,
/// and that the contents are within [`MAX_CONTENT_BYTES`] (images are read from untrusted
/// bytes).
pub fn validate(objs: &IpcObjects) -> Result<()> {
    let bad = |what: String| RuntimeError::Unsupported(format!("SysV IPC objects: {what}"));
    if objs.version != IPC_OBJECTS_VERSION {
        return Err(bad(format!(
            "layout version {} (this stasis knows {IPC_OBJECTS_VERSION})",
            objs.version
        )));
    }
    objs.limits.validate()?;
    validate_perms(Kind::Shm, objs.shm.iter().map(|s| &s.perm))?;
    validate_perms(Kind::Sem, objs.sem.iter().map(|s| &s.perm))?;
    validate_perms(Kind::Msg, objs.msg.iter().map(|q| &q.perm))?;
    let mut budget = Budget::new();
    for s in &objs.shm {
        let what = Name(Kind::Shm, &s.perm).to_string();
        if s.size == 0 || s.data.len() as u64 > s.size {
            return Err(bad(format!(
                "{what}: {} bytes of contents for a size of {}",
                s.data.len(),
                s.size
            )));
        }
        budget.take(&what, s.content_bytes())?;
    }
    for s in &objs.sem {
        let what = Name(Kind::Sem, &s.perm).to_string();
        if s.values.is_empty() || s.values.len() > i32::MAX as usize {
            return Err(bad(format!("{what}: {} semaphores", s.values.len())));
        }
        budget.take(&what, s.content_bytes())?;
        if let Some(v) = s.values.iter().find(|v| **v > SEMVMX) {
            return Err(bad(format!("{what}: value {v} is over {SEMVMX}")));
        }
    }
    for q in &objs.msg {
        let what = Name(Kind::Msg, &q.perm).to_string();
        budget.take(&what, q.content_bytes())?;
        // IPC_SET passes msg_qbytes on as an int: more would be cut, not refused.
        if q.qbytes > i32::MAX as u64 {
            return Err(bad(format!("{what}: msg_qbytes {}", q.qbytes)));
        }
        if let Some((i, m)) = q.messages.iter().enumerate().find(|(_, m)| m.mtype < 1) {
            return Err(bad(format!("{what}: message {i} has type {}", m.mtype)));
        }
    }
    Ok(())
}

/// The part of [`validate`] common to all kinds: ids, keys, modes, owners.
fn validate_perms<'a>(kind: Kind, perms: impl ExactSizeIterator<Item = &'a IpcPerm>) -> Result<()> {
    let bad = |what: String| RuntimeError::Unsupported(format!("SysV IPC objects: {what}"));
    if perms.len() > MAX_OBJECTS {
        return Err(bad(format!("{} {} objects", perms.len(), kind.name())));
    }
    let modes = match kind {
        Kind::Shm => 0o777 | SHM_DEST | SHM_LOCKED,
        _ => 0o777,
    };
    let (mut ids, mut keys) = (HashSet::new(), HashSet::new());
    for p in perms {
        let what = Name(kind, p);
        if p.id < 0 || !ids.insert(p.id) {
            return Err(bad(format!("{what}: a negative or repeated id")));
        }
        if p.key != 0 && !keys.insert(p.key) {
            return Err(bad(format!("{what}: the key of another {}", kind.name())));
        }
        if p.mode & !modes != 0 {
            return Err(bad(format!("{what}: mode {:o}", p.mode)));
        }
        if [p.uid, p.gid, p.cuid, p.cgid].contains(&u32::MAX) {
            return Err(bad(format!("{what}: uid or gid -1")));
        }
    }
    Ok(())
}

/// Recreates `objs` in the IPC namespace of process `pid`, which must be fresh: empty, and
/// not stasis's own. Everything is checked first ([`validate`], then the namespace); if a
/// step fails after that, the objects made so far are removed again and the limits put back.
/// Call [`finish`] once the restored processes have re-attached their segments.
pub fn recreate(pid: i32, objs: &IpcObjects) -> Result<()> {
    validate(objs)?;
    if kernel::shares_ipc_ns(pid)? {
        return Err(RuntimeError::Unsupported(format!(
            "recreating SysV IPC objects: pid {pid} is in stasis's own IPC namespace, and they \
             are only recreated in a fresh one"
        )));
    }
    kernel::in_ipc_ns(pid, || {
        let present: Vec<String> = Kind::ALL
            .into_iter()
            .map(|kind| table::read(kind).map(|rows| (kind, rows)))
            .collect::<Result<Vec<_>>>()?
            .iter()
            .flat_map(|(kind, rows)| rows.iter().map(|r| Name(*kind, &r.perm).to_string()))
            .collect();
        if !present.is_empty() {
            return Err(RuntimeError::Unsupported(format!(
                "recreating SysV IPC objects: the IPC namespace of pid {pid} is not empty ({} \
                 objects: {}); they are only recreated in a fresh one",
                present.len(),
                present.join(", ")
            )));
        }
        let before = IpcLimits::read()?;
        let mut made = Vec::new();
        let result = objs
            .limits
            .raised_for(objs)
            .write()
            .and_then(|()| create_all(pid, objs, &mut made))
            .and_then(|()| objs.limits.write());
        if result.is_err() {
            for (kind, id) in made.into_iter().rev() {
                let _ = kernel::remove(kind, id);
            }
            for kind in Kind::ALL {
                let _ = kernel::write_sysctl(kind.next_id_sysctl(), "-1");
            }
            let _ = before.write();
        }
        result
    })
}

/// Creates object `perm` of `kind` with its id, key and creator; `size` is the size of a
/// segment or the number of semaphores of a set. Adds it to `made`.
fn create(
    pid: i32,
    kind: Kind,
    perm: &IpcPerm,
    size: u64,
    made: &mut Vec<(Kind, i32)>,
) -> Result<String> {
    let what = name(pid, kind, perm);
    kernel::write_sysctl(kind.next_id_sysctl(), &perm.id.to_string())?;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | 0o600;
    let id = kernel::as_creator(perm.cuid, perm.cgid, || {
        kernel::get(kind, perm.key, size, flags)
    })?
    .map_err(|e| {
        let op = match kind {
            Kind::Shm => "shmget",
            Kind::Sem => "semget",
            Kind::Msg => "msgget",
        };
        RuntimeError::sys(op, &what, e)
    })?;
    made.push((kind, id));
    if id != perm.id {
        return Err(RuntimeError::Unsupported(format!(
            "{what}: the kernel gave it id {id} instead of {} (through {})",
            perm.id,
            kind.next_id_sysctl()
        )));
    }
    Ok(what)
}

fn create_all(pid: i32, objs: &IpcObjects, made: &mut Vec<(Kind, i32)>) -> Result<()> {
    for s in &objs.shm {
        let (id, size) = (s.perm.id, s.size);
        let what = create(pid, Kind::Shm, &s.perm, size, made)?;
        if s.data.iter().any(|b| *b != 0) {
            let file = kernel::shm_file(id, size, true)
                .map_err(|e| RuntimeError::sys("shmat + open map_files", &what, e))?;
            let page = crate::PAGE_SIZE as usize;
            for (i, chunk) in s.data.chunks(page).enumerate() {
                if chunk.iter().any(|b| *b != 0) {
                    file.write_all_at(chunk, (i * page) as u64)
                        .map_err(|e| RuntimeError::sys("pwrite", &what, e))?;
                }
            }
        }
        if s.perm.mode & SHM_LOCKED != 0 {
            kernel::shm_lock(id).map_err(|e| RuntimeError::sys("shmctl(SHM_LOCK)", &what, e))?;
        }
        kernel::set::<libc::shmid_ds>(id, &s.perm, |_| {})
            .map_err(|e| RuntimeError::sys("shmctl(IPC_SET)", &what, e))?;
    }
    for s in &objs.sem {
        let id = s.perm.id;
        let what = create(pid, Kind::Sem, &s.perm, s.values.len() as u64, made)?;
        kernel::sem_setall(id, &s.values)
            .map_err(|e| RuntimeError::sys("semctl(SETALL)", &what, e))?;
        kernel::set::<libc::semid_ds>(id, &s.perm, |_| {})
            .map_err(|e| RuntimeError::sys("semctl(IPC_SET)", &what, e))?;
    }
    for q in &objs.msg {
        let id = q.perm.id;
        let what = create(pid, Kind::Msg, &q.perm, 0, made)?;
        let set_qbytes = |qbytes: u64| {
            kernel::set::<libc::msqid_ds>(id, &q.perm, |ds| ds.msg_qbytes = qbytes).map_err(|e| {
                RuntimeError::sys("msgctl(IPC_SET)", format!("{what}, msg_qbytes {qbytes}"), e)
            })
        };
        set_qbytes(q.room())?;
        for (i, m) in q.messages.iter().enumerate() {
            kernel::msg_send(id, m.mtype, &m.text).map_err(|e| {
                RuntimeError::sys(
                    "msgsnd",
                    format!("message {i} ({} bytes) of {what}", m.text.len()),
                    e,
                )
            })?;
        }
        set_qbytes(q.qbytes)?;
    }
    Ok(())
}

/// Completes [`recreate`] once the restored processes have attached their segments: removes
/// again the segments that were removed while attached ([`SHM_DEST`]; they live on until the
/// last process detaches) and sets kernel.shm_rmid_forced. Unattached segments made by
/// [`recreate`] count as orphans then, as their creator (its thread) is gone: with
/// shm_rmid_forced 1 they are removed right away, like any segment of that namespace whose
/// creator has exited.
pub fn finish(pid: i32, objs: &IpcObjects) -> Result<()> {
    kernel::in_ipc_ns(pid, || {
        for s in objs.shm.iter().filter(|s| s.perm.mode & SHM_DEST != 0) {
            kernel::remove(Kind::Shm, s.perm.id).map_err(|e| {
                RuntimeError::sys("shmctl(IPC_RMID)", name(pid, Kind::Shm, &s.perm), e)
            })?;
        }
        kernel::write_sysctl("shm_rmid_forced", &objs.limits.shm_rmid_forced.to_string())
    })
}

impl IpcLimits {
    /// The limits of the calling thread's IPC namespace.
    fn read() -> Result<Self> {
        let numbers = |name: &str| -> Result<Vec<u64>> {
            let text = kernel::read_sysctl(name)?;
            text.split_whitespace()
                .map(|t| t.parse())
                .collect::<std::result::Result<Vec<u64>, _>>()
                .map_err(|_| RuntimeError::Parse {
                    path: format!("/proc/sys/kernel/{name}"),
                    what: format!("not numbers: {text:?}"),
                })
        };
        let number = |name: &str| -> Result<u64> {
            match numbers(name)?[..] {
                [n] => Ok(n),
                _ => Err(RuntimeError::Parse {
                    path: format!("/proc/sys/kernel/{name}"),
                    what: "not one number".into(),
                }),
            }
        };
        let int = |name: &str| -> Result<u32> {
            let n = number(name)?;
            u32::try_from(n).map_err(|_| RuntimeError::Parse {
                path: format!("/proc/sys/kernel/{name}"),
                what: format!("{n} is out of range"),
            })
        };
        let sem = numbers("sem")?;
        let sem: [u32; 4] = match sem[..] {
            [a, b, c, d] => [a, b, c, d].map(|v| v.min(u32::MAX as u64) as u32),
            _ => {
                return Err(RuntimeError::Parse {
                    path: "/proc/sys/kernel/sem".into(),
                    what: format!("{} numbers, not 4", sem.len()),
                })
            }
        };
        Ok(IpcLimits {
            shmmax: number("shmmax")?,
            shmall: number("shmall")?,
            shmmni: int("shmmni")?,
            shm_rmid_forced: int("shm_rmid_forced")?,
            msgmax: int("msgmax")?,
            msgmnb: int("msgmnb")?,
            msgmni: int("msgmni")?,
            sem,
        })
    }

    /// The sysctls [`recreate`] sets, with their values (all but shm_rmid_forced, which
    /// [`finish`] sets).
    fn settings(&self) -> [(&'static str, String); 7] {
        let [msl, mns, opm, mni] = self.sem;
        [
            ("shmmax", self.shmmax.to_string()),
            ("shmall", self.shmall.to_string()),
            ("shmmni", self.shmmni.to_string()),
            ("msgmax", self.msgmax.to_string()),
            ("msgmnb", self.msgmnb.to_string()),
            ("msgmni", self.msgmni.to_string()),
            ("sem", format!("{msl} {mns} {opm} {mni}")),
        ]
    }

    /// Sets them in the calling thread's IPC namespace.
    fn write(&self) -> Result<()> {
        self.settings()
            .iter()
            .try_for_each(|(name, value)| kernel::write_sysctl(name, value))
    }

    /// Values the kernel takes (ints, non-negative; shm_rmid_forced 0 or 1).
    fn validate(&self) -> Result<()> {
        let ints = [self.shmmni, self.msgmax, self.msgmnb, self.msgmni];
        if ints.iter().chain(&self.sem).any(|v| *v > i32::MAX as u32) || self.shm_rmid_forced > 1 {
            return Err(RuntimeError::Unsupported(format!(
                "SysV IPC limits out of range: {self:?}"
            )));
        }
        Ok(())
    }

    /// These limits, each raised to what `objs` need while they are recreated.
    fn raised_for(&self, objs: &IpcObjects) -> IpcLimits {
        let most = |it: &mut dyn Iterator<Item = u64>| it.max().unwrap_or(0);
        let int = |n: u64| n.min(i32::MAX as u64) as u32;
        let count = |n: usize| int(n as u64);
        let mut l = self.clone();
        l.shmmax = l.shmmax.max(most(&mut objs.shm.iter().map(|s| s.size)));
        l.shmall = l.shmall.max(objs.shm.iter().fold(0u64, |n, s| {
            n.saturating_add(s.size.div_ceil(crate::PAGE_SIZE))
        }));
        l.shmmni = l.shmmni.max(count(objs.shm.len()));
        let messages = || objs.msg.iter().flat_map(|q| &q.messages);
        l.msgmax = l
            .msgmax
            .max(int(most(&mut messages().map(|m| m.text.len() as u64))));
        l.msgmnb = l
            .msgmnb
            .max(int(most(&mut objs.msg.iter().map(MsgQueue::room))));
        l.msgmni = l.msgmni.max(count(objs.msg.len()));
        let sems = || objs.sem.iter().map(|s| s.values.len() as u64);
        l.sem[0] = l.sem[0].max(int(most(&mut sems())));
        l.sem[1] = l.sem[1].max(int(sems().sum()));
        l.sem[3] = l.sem[3].max(count(objs.sem.len()));
        l
    }
}

#[cfg(test)]
mod tests;

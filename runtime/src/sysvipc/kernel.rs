//! The system calls behind [`super`]: joining an IPC namespace on a thread of our own, the
//! namespace's sysctls, and one small wrapper per SysV IPC call, each returning the errno of
//! the call it made (the caller names the object in its error).

use super::table::Kind;
use super::IpcPerm;
use crate::error::{Result, RuntimeError};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// Runs `f` on a short-lived thread that has joined the IPC namespace of `pid`. An IPC
/// namespace belongs to a task, not to a process: setns(CLONE_NEWIPC) moves only the calling
/// thread, and /proc/sysvipc, /proc/sys/kernel/{shm,sem,msg}* and shmget/semctl/msgctl/...
/// all act on the namespace of the thread that calls them. The rest of this process never
/// leaves its own namespace.
pub(super) fn in_ipc_ns<T: Send>(pid: i32, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    crate::sys::in_namespace_of(pid, "ipc", f)?
}

/// Whether the calling thread is in the IPC namespace of `pid`.
pub(super) fn shares_ipc_ns(pid: i32) -> Result<bool> {
    let id = |path: String| {
        std::fs::metadata(&path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| RuntimeError::sys("stat", path, e))
    };
    Ok(id(format!("/proc/{pid}/ns/ipc"))? == id("/proc/thread-self/ns/ipc".to_string())?)
}

/// Reads /proc/sys/kernel/NAME in the calling thread's IPC namespace. The path must be
/// opened by the thread that joined the namespace: ipc sysctls are looked up through the
/// opener's namespace.
pub(super) fn read_sysctl(name: &str) -> Result<String> {
    let path = format!("/proc/sys/kernel/{name}");
    let mut text = String::new();
    File::open(&path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| RuntimeError::sys("read", path, e))?;
    Ok(text)
}

/// Writes /proc/sys/kernel/NAME in the calling thread's IPC namespace.
pub(super) fn write_sysctl(name: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/kernel/{name}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| RuntimeError::sys("write", format!("{path} = {value}"), e))
}

/// The errno of a call that returned -1.
fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    match rc {
        -1 => Err(io::Error::last_os_error()),
        rc => Ok(rc),
    }
}

/// shmget/semget/msgget(key, size, flags): `size` is the segment's size (shm) or the number
/// of semaphores (sem), unused for msg.
pub(super) fn get(kind: Kind, key: i32, size: u64, flags: i32) -> io::Result<i32> {
    let rc = match kind {
        // SAFETY: shmget takes no pointers.
        Kind::Shm => unsafe { libc::shmget(key, size as usize, flags) },
        // SAFETY: semget takes no pointers.
        Kind::Sem => unsafe { libc::semget(key, size as i32, flags) },
        // SAFETY: msgget takes no pointers.
        Kind::Msg => unsafe { libc::msgget(key, flags) },
    };
    check(rc.into()).map(|id| id as i32)
}

/// IPC_RMID: removes the object (a shm segment still attached somewhere is only marked).
pub(super) fn remove(kind: Kind, id: i32) -> io::Result<()> {
    let rc = match kind {
        // SAFETY: IPC_RMID reads no buffer; a null one is allowed.
        Kind::Shm => unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) },
        // SAFETY: IPC_RMID takes no fourth argument.
        Kind::Sem => unsafe { libc::semctl(id, 0, libc::IPC_RMID) },
        // SAFETY: as for shm.
        Kind::Msg => unsafe { libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()) },
    };
    check(rc.into()).map(drop)
}

/// The kernel's description of one kind of object: shmid_ds, semid_ds or msqid_ds.
pub(super) trait Ds: Sized {
    const KIND: Kind;
    fn perm(&mut self) -> &mut libc::ipc_perm;
}

impl Ds for libc::shmid_ds {
    const KIND: Kind = Kind::Shm;
    fn perm(&mut self) -> &mut libc::ipc_perm {
        &mut self.shm_perm
    }
}

impl Ds for libc::semid_ds {
    const KIND: Kind = Kind::Sem;
    fn perm(&mut self) -> &mut libc::ipc_perm {
        &mut self.sem_perm
    }
}

impl Ds for libc::msqid_ds {
    const KIND: Kind = Kind::Msg;
    fn perm(&mut self) -> &mut libc::ipc_perm {
        &mut self.msg_perm
    }
}

/// shmctl/semctl/msgctl with IPC_STAT or IPC_SET on `ds`.
fn ctl<D: Ds>(id: i32, cmd: i32, ds: &mut D) -> io::Result<()> {
    let buf: *mut D = ds;
    let rc = match D::KIND {
        // SAFETY: D is shmid_ds here (the only Ds with KIND Shm): the buffer IPC_STAT fills
        // and IPC_SET reads, valid for the call.
        Kind::Shm => unsafe { libc::shmctl(id, cmd, buf.cast()) },
        // SAFETY: D is semid_ds; semctl's fourth argument is the semun whose `buf` member
        // points at it, passed as that pointer.
        Kind::Sem => unsafe { libc::semctl(id, 0, cmd, buf) },
        // SAFETY: D is msqid_ds, as for shm.
        Kind::Msg => unsafe { libc::msgctl(id, cmd, buf.cast()) },
    };
    check(rc.into()).map(drop)
}

/// IPC_STAT of object `id`.
pub(super) fn stat<D: Ds>(id: i32) -> io::Result<D> {
    // SAFETY: every Ds is a plain C struct of integers, for which all-zero is valid.
    let mut ds: D = unsafe { std::mem::zeroed() };
    ctl(id, libc::IPC_STAT, &mut ds)?;
    Ok(ds)
}

/// IPC_SET of object `id`: owner and permission bits from `perm` (the kernel takes only the
/// 0777 bits of the mode; it keeps SHM_LOCKED/SHM_DEST as they are), and whatever `adjust`
/// sets (a queue's msg_qbytes).
pub(super) fn set<D: Ds>(id: i32, perm: &IpcPerm, adjust: impl FnOnce(&mut D)) -> io::Result<()> {
    let mut ds = stat::<D>(id)?;
    let p = ds.perm();
    p.uid = perm.uid;
    p.gid = perm.gid;
    p.mode = (perm.mode & 0o777) as libc::c_ushort;
    adjust(&mut ds);
    ctl(id, libc::IPC_SET, &mut ds)
}

/// The file behind shm segment `id` of `size` bytes, open for reading (or writing), without
/// keeping it attached: the segment is attached (SHM_RDONLY unless `writable`) just long
/// enough to open its file through /proc/self/map_files, then detached, so its nattch is
/// back as it was before this returns. Reading and writing the file (pread/pwrite) neither
/// allocates memory for the segment's holes nor touches its nattch.
pub(super) fn shm_file(id: i32, size: u64, writable: bool) -> io::Result<File> {
    let flags = if writable { 0 } else { libc::SHM_RDONLY };
    // SAFETY: a null address lets the kernel choose where to map the segment; nothing in
    // this process uses that range but the open below, and it is unmapped right after.
    let addr = unsafe { libc::shmat(id, std::ptr::null(), flags) };
    if addr as isize == -1 {
        return Err(io::Error::last_os_error());
    }
    let start = addr as u64;
    let end = start + size.div_ceil(crate::PAGE_SIZE) * crate::PAGE_SIZE;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(format!("/proc/self/map_files/{start:x}-{end:x}"));
    // SAFETY: `addr` is the attach address shmat returned above, used by nothing else.
    let detached = check(unsafe { libc::shmdt(addr) }.into());
    let file = file?;
    detached?;
    Ok(file)
}

/// Whether `file` is on hugetlbfs (a segment made with SHM_HUGETLB).
pub(super) fn is_hugetlb(file: &File) -> io::Result<bool> {
    // SAFETY: statfs is plain old data; all-zero is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a statfs buffer owned by this frame.
    check(unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) }.into())?;
    Ok(st.f_type == libc::HUGETLBFS_MAGIC)
}

/// The end of the last data extent of shm file `file` (SEEK_DATA/SEEK_HOLE: pages never
/// written are holes), or `Err(at)` as soon as it is known to lie beyond `limit`.
pub(super) fn data_end(file: &File, limit: u64) -> io::Result<std::result::Result<u64, u64>> {
    let seek = |pos: u64, whence: i32| {
        // SAFETY: lseek takes no pointers.
        check(unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) })
    };
    let mut end = 0;
    loop {
        let data = match seek(end, libc::SEEK_DATA) {
            Ok(d) => d as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(Ok(end)),
            Err(e) => return Err(e),
        };
        end = seek(data, libc::SEEK_HOLE)? as u64;
        if end > limit {
            return Ok(Err(end));
        }
    }
}

/// SHM_LOCK: keeps the segment's pages in memory.
pub(super) fn shm_lock(id: i32) -> io::Result<()> {
    // SAFETY: SHM_LOCK reads no buffer; a null one is allowed.
    check(unsafe { libc::shmctl(id, libc::SHM_LOCK, std::ptr::null_mut()) }.into()).map(drop)
}

/// GETALL: the values of the `n` semaphores of set `id`.
pub(super) fn sem_getall(id: i32, n: usize) -> io::Result<Vec<u16>> {
    let mut values = vec![0u16; n];
    // SAFETY: semun.array points at `n` unsigned shorts, as many as the set has.
    check(unsafe { libc::semctl(id, 0, libc::GETALL, values.as_mut_ptr()) }.into())?;
    Ok(values)
}

/// SETALL: sets every semaphore of set `id` (values.len() is its size).
pub(super) fn sem_setall(id: i32, values: &[u16]) -> io::Result<()> {
    // SAFETY: semun.array points at values.len() unsigned shorts, which the kernel only reads.
    check(unsafe { libc::semctl(id, 0, libc::SETALL, values.as_ptr()) }.into()).map(drop)
}

/// A message buffer as msgsnd/msgrcv want it: a long mtype, then the text; words, so the
/// mtype is aligned.
fn msgbuf(len: usize) -> Vec<u64> {
    vec![0u64; 1 + len.div_ceil(8)]
}

/// The text of a message buffer, `len` bytes of it.
fn msgbuf_text(buf: &[u64], len: usize) -> Vec<u8> {
    buf[1..]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .take(len)
        .collect()
}

/// A copy of message number `index` (from 0, in queue order) of queue `id`, left in the
/// queue: msgrcv(MSG_COPY | IPC_NOWAIT), which changes neither the queue nor its times.
/// `max` is at least the size of the largest message. ENOSYS: the kernel has no
/// CONFIG_CHECKPOINT_RESTORE.
pub(super) fn msg_copy(id: i32, index: u64, max: usize) -> io::Result<(i64, Vec<u8>)> {
    let mut buf = msgbuf(max);
    // SAFETY: `buf` holds a long and at least `max` bytes after it, and is initialized (the
    // kernel reads MSG_COPY's buffer before it writes it).
    let n = check(unsafe {
        libc::msgrcv(
            id,
            buf.as_mut_ptr().cast(),
            max,
            index as libc::c_long,
            libc::MSG_COPY | libc::IPC_NOWAIT,
        ) as libc::c_long
    })?;
    Ok((buf[0] as i64, msgbuf_text(&buf, n as usize)))
}

/// msgsnd(IPC_NOWAIT) of one message to queue `id`: EAGAIN if it does not fit.
pub(super) fn msg_send(id: i32, mtype: i64, text: &[u8]) -> io::Result<()> {
    let mut buf = msgbuf(text.len());
    buf[0] = mtype as u64;
    for (word, chunk) in buf[1..].iter_mut().zip(text.chunks(8)) {
        let mut bytes = [0u8; 8];
        bytes[..chunk.len()].copy_from_slice(chunk);
        *word = u64::from_ne_bytes(bytes);
    }
    // SAFETY: `buf` holds a long and text.len() bytes after it, which the kernel only reads.
    check(unsafe { libc::msgsnd(id, buf.as_ptr().cast(), text.len(), libc::IPC_NOWAIT).into() })
        .map(drop)
}

/// Runs `f` (a shmget/semget/msgget) with the calling thread's effective uid and gid set to
/// `uid`/`gid`, so the object it creates has them as its creator (cuid/cgid, which IPC_SET
/// cannot change), then sets them back. Raw setresuid/setresgid change only the calling
/// thread (glibc's wrappers would change every thread of the process). The real and saved
/// ids stay as they were, which is what lets the thread go back; its capabilities are
/// dropped from the effective set meanwhile and restored on the way back.
pub(super) fn as_creator<T>(uid: u32, gid: u32, f: impl FnOnce() -> T) -> Result<T> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid out-pointers to locals.
    check(unsafe { libc::getresuid(&mut r, &mut e, &mut s) }.into())
        .map_err(|err| RuntimeError::sys("getresuid", "this thread", err))?;
    let euid = e;
    // SAFETY: as above.
    check(unsafe { libc::getresgid(&mut r, &mut e, &mut s) }.into())
        .map_err(|err| RuntimeError::sys("getresgid", "this thread", err))?;
    let egid = e;
    if (uid, gid) == (euid, egid) {
        return Ok(f());
    }
    let keep = u32::MAX; // -1: leave unchanged
    let setres = |call: libc::c_long, id: u32| {
        // SAFETY: setresuid/setresgid take no pointers; the raw call changes this thread only.
        check(unsafe { libc::syscall(call, keep, id, keep) })
    };
    setres(libc::SYS_setresgid, gid)
        .map_err(|err| RuntimeError::sys("setresgid", format!("effective gid {gid}"), err))?;
    if let Err(err) = setres(libc::SYS_setresuid, uid) {
        let _ = setres(libc::SYS_setresgid, egid);
        return Err(RuntimeError::sys(
            "setresuid",
            format!("effective uid {uid}"),
            err,
        ));
    }
    let out = f();
    let back_uid = setres(libc::SYS_setresuid, euid);
    let back_gid = setres(libc::SYS_setresgid, egid);
    back_uid.map_err(|err| RuntimeError::sys("setresuid", format!("back to {euid}"), err))?;
    back_gid.map_err(|err| RuntimeError::sys("setresgid", format!("back to {egid}"), err))?;
    Ok(out)
}

//! System V IPC objects of an IPC namespace, for real: namespaces of our own `unshare --ipc
//! sleep` children, objects made in them by a thread of this test that joins them (plain
//! libc calls, not the code under test), captured, recreated in a fresh namespace, and
//! captured again to compare. Also: what capture must not change, the content bound, and the
//! refusals of recreate.
//!
//! Needs root (setns, map_files, next_id sysctls) and unshare(1); says why it skips if not.

mod common;

use common::{enter, ns_id, Unshared};
use stasis_runtime::sysvipc::{self, IpcObjects, SHM_DEST, SHM_LOCKED};
use std::io;
use std::process::{Command, Stdio};
use std::sync::Barrier;
use std::time::Instant;

/// Whether this machine can run the tests; says why not.
fn can_run() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(
            module_path!(),
            "IPC namespaces, setns and the next_id sysctls need root",
        );
        return false;
    }
    if !std::path::Path::new("/proc/sys/kernel/msg_next_id").exists() {
        common::skip(
            module_path!(),
            "this kernel has no CONFIG_CHECKPOINT_RESTORE (no msg_next_id)",
        );
        return false;
    }
    common::have("unshare")
}

/// A process in an IPC namespace of its own: `unshare --ipc sleep 1000`.
type Ns = Unshared;

fn ipc_ns() -> Ns {
    Unshared::new("ipc")
}

/// Panics with errno if a call returned -1.
fn ok(rc: i64, what: &str) -> i64 {
    assert_ne!(rc, -1, "{what}: {}", io::Error::last_os_error());
    rc
}

fn sysctl(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .unwrap_or_else(|e| panic!("read {name}: {e}"))
        .trim()
        .to_string()
}

fn set_sysctl(name: &str, value: &str) {
    std::fs::write(format!("/proc/sys/kernel/{name}"), value)
        .unwrap_or_else(|e| panic!("write {name} = {value}: {e}"));
}

/// A segment attached to this process (for nattch), detached when dropped.
struct Attached(usize);

impl Attached {
    fn new(id: i32) -> Attached {
        // SAFETY: the kernel picks the address; the mapping is only ever written through
        // shm_write's own attach, and detached by Drop.
        let addr = unsafe { libc::shmat(id, std::ptr::null(), 0) };
        assert_ne!(
            addr as isize,
            -1,
            "shmat {id}: {}",
            io::Error::last_os_error()
        );
        Attached(addr as usize)
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // SAFETY: the address shmat returned, not used after this.
        unsafe { libc::shmdt(self.0 as *const libc::c_void) };
    }
}

fn shm_new(key: i32, size: usize, mode: i32) -> i32 {
    // SAFETY: shmget takes no pointers.
    ok(
        unsafe { libc::shmget(key, size, libc::IPC_CREAT | mode) }.into(),
        "shmget",
    ) as i32
}

/// Writes `bytes` at `offset` of segment `id`.
fn shm_write(id: i32, offset: usize, bytes: &[u8]) {
    let a = Attached::new(id);
    // SAFETY: the segment is attached at a.0 and is at least offset + len bytes long (the
    // callers' sizes); nothing else accesses these bytes meanwhile.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (a.0 + offset) as *mut u8, bytes.len())
    };
}

fn shm_ctl(id: i32, cmd: i32, ds: &mut libc::shmid_ds) {
    // SAFETY: ds is a valid shmid_ds for the call.
    ok(unsafe { libc::shmctl(id, cmd, ds) }.into(), "shmctl");
}

fn sem_new(key: i32, values: &[u16], mode: i32) -> i32 {
    // SAFETY: semget takes no pointers.
    let id = unsafe { libc::semget(key, values.len() as i32, libc::IPC_CREAT | mode) };
    let id = ok(id.into(), "semget") as i32;
    // SAFETY: semun.array points at as many unsigned shorts as the set has.
    ok(
        unsafe { libc::semctl(id, 0, libc::SETALL, values.as_ptr()) }.into(),
        "SETALL",
    );
    id
}

fn msg_new(key: i32, mode: i32) -> i32 {
    // SAFETY: msgget takes no pointers.
    ok(
        unsafe { libc::msgget(key, libc::IPC_CREAT | mode) }.into(),
        "msgget",
    ) as i32
}

fn msg_send(id: i32, mtype: i64, text: &[u8]) {
    let mut buf = mtype.to_ne_bytes().to_vec();
    buf.extend_from_slice(text);
    // SAFETY: buf is a long followed by text.len() bytes; the kernel only reads it.
    let rc = unsafe { libc::msgsnd(id, buf.as_ptr().cast(), text.len(), libc::IPC_NOWAIT) };
    ok(rc.into(), "msgsnd");
}

fn msg_ctl(id: i32, cmd: i32, ds: &mut libc::msqid_ds) {
    // SAFETY: ds is a valid msqid_ds for the call.
    ok(unsafe { libc::msgctl(id, cmd, ds) }.into(), "msgctl");
}

/// The `column` of segment `id` in /proc/sysvipc/shm of the calling thread's namespace.
fn shm_column(id: i32, column: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/sysvipc/shm").expect("read /proc/sysvipc/shm");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    let col = |name| header.iter().position(|h| *h == name).expect("column");
    let row: Vec<&str> = lines
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f[col("shmid")] == id.to_string())
        .unwrap_or_else(|| panic!("no shm {id}"));
    row[col(column)].parse().expect("number")
}

const PAGE: usize = 4096;

/// Ids and addresses the round trip checks by name.
struct Made {
    shm_keyed: i32,
    shm_sparse: i32,
    shm_dest: i32,
    /// A semaphore set whose creator is uid 1234 gid 1235.
    sem_other: i32,
    attached: Vec<Attached>,
}

/// Fills namespace `ns` with one of each kind of interesting object, and sets limits lower
/// than what they need (as if lowered after they were made).
fn populate(ns: &Ns) -> Made {
    let made = ns.within(|| {
        // Ids: one picked through shm_next_id, one after a removed segment, others as they come.
        let gone = shm_new(0, PAGE, 0o600);
        // SAFETY: IPC_RMID reads no buffer.
        ok(
            unsafe { libc::shmctl(gone, libc::IPC_RMID, std::ptr::null_mut()) }.into(),
            "rmid",
        );
        set_sysctl("shm_next_id", &(5 * 32768 + 7).to_string());
        let shm_keyed = shm_new(0x5157_0001, 3 * PAGE + 100, 0o640);
        assert_eq!(shm_keyed, 5 * 32768 + 7, "shm_next_id gave another id");
        shm_write(shm_keyed, 0, b"hello");
        shm_write(shm_keyed, 2 * PAGE + 10, &[0xab; 50]);
        // SAFETY: shmid_ds is plain old data.
        let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
        shm_ctl(shm_keyed, libc::IPC_STAT, &mut ds);
        ds.shm_perm.uid = 1000;
        ds.shm_perm.gid = 1001;
        shm_ctl(shm_keyed, libc::IPC_SET, &mut ds);

        let private = shm_new(libc::IPC_PRIVATE, PAGE, 0o600);
        let pattern: Vec<u8> = (0..PAGE).map(|i| (i % 251 + 1) as u8).collect();
        shm_write(private, 0, &pattern);

        // 1 GiB, one byte written at 1 MiB: captured as 1 MiB + 1 bytes, never allocated.
        let shm_sparse = shm_new(0x5157_0003, 1 << 30, 0o666);
        shm_write(shm_sparse, 1 << 20, &[9]);

        let locked = shm_new(0x5157_0004, PAGE, 0o600);
        shm_write(locked, 100, b"locked");
        shm_ctl(locked, libc::SHM_LOCK, &mut ds);

        // Removed while attached: lives on as SHM_DEST with key IPC_PRIVATE.
        let shm_dest = shm_new(0x5157_0005, PAGE, 0o600);
        shm_write(shm_dest, 0, b"doomed");
        let attached = vec![Attached::new(shm_keyed), Attached::new(shm_dest)];
        shm_ctl(shm_dest, libc::IPC_RMID, &mut ds);

        let sem = sem_new(0x5157_0010, &[0, 1, 7, 32767, 3], 0o660);
        // SAFETY: semid_ds is plain old data.
        let mut sds: libc::semid_ds = unsafe { std::mem::zeroed() };
        // SAFETY: semun.buf points at a valid semid_ds.
        ok(
            unsafe { libc::semctl(sem, 0, libc::IPC_STAT, &mut sds) }.into(),
            "IPC_STAT",
        );
        sds.sem_perm.uid = 1000;
        // SAFETY: as above.
        ok(
            unsafe { libc::semctl(sem, 0, libc::IPC_SET, &mut sds) }.into(),
            "IPC_SET",
        );

        set_sysctl("msgmax", "9000");
        let q = msg_new(0x5157_0020, 0o600);
        let binary: Vec<u8> = vec![0, 1, 0, 2, 0, 0];
        let big: Vec<u8> = (0..9000).map(|i| (i * 7 % 256) as u8).collect();
        for (mtype, text) in [
            (1, &b"one"[..]),
            (5, &b"five"[..]),
            (2, &binary[..]),
            (1, &b""[..]),
            (3, &big[..]),
        ] {
            msg_send(q, mtype, text);
        }
        // SAFETY: msqid_ds is plain old data.
        let mut qds: libc::msqid_ds = unsafe { std::mem::zeroed() };
        msg_ctl(q, libc::IPC_STAT, &mut qds);
        qds.msg_qbytes = 8000; // below the 9013 bytes queued
        msg_ctl(q, libc::IPC_SET, &mut qds);
        msg_new(libc::IPC_PRIVATE, 0o622);
        (shm_keyed, shm_sparse, shm_dest, attached)
    });
    let (shm_keyed, shm_sparse, shm_dest, attached) = made;
    let sem_other = sem_by_another_user(ns);
    ns.within(|| {
        // Limits below what the objects need.
        set_sysctl("msgmnb", "1000");
        set_sysctl("shmmax", "4096");
        set_sysctl("shmmni", "2");
        set_sysctl("sem", "4 32000 32 1");
    });
    Made {
        shm_keyed,
        shm_sparse,
        shm_dest,
        sem_other,
        attached,
    }
}

/// A semaphore set made by a thread whose effective ids are 1234/1235: its creator.
fn sem_by_another_user(ns: &Ns) -> i32 {
    ns.within(|| {
        // SAFETY: raw setresgid/setresuid change only this thread, which ends right after.
        unsafe {
            ok(
                libc::syscall(libc::SYS_setresgid, -1, 1235, -1),
                "setresgid",
            );
            ok(
                libc::syscall(libc::SYS_setresuid, -1, 1234, -1),
                "setresuid",
            );
        }
        sem_new(libc::IPC_PRIVATE, &[42], 0o600)
    })
}

#[test]
fn ipc_namespace_and_next_id_are_per_thread() {
    if !can_run() {
        return;
    }
    let a = ipc_ns();
    let ours = ns_id("/proc/thread-self/ns/ipc");
    let our_next = sysctl("shm_next_id");
    let file = a.ns_file();
    let (entered, checked) = (Barrier::new(2), Barrier::new(2));
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            enter(&file, "ipc");
            set_sysctl("shm_next_id", "4242");
            entered.wait();
            checked.wait();
            assert_eq!(sysctl("shm_next_id"), "4242");
            let id = shm_new(0x5157_0100, PAGE, 0o600);
            assert_eq!(id, 4242);
            assert_eq!(sysctl("shm_next_id"), "-1", "next_id is used once");
            id
        });
        entered.wait();
        // While that thread is in the other namespace, with its next_id set there:
        assert_eq!(ns_id("/proc/thread-self/ns/ipc"), ours);
        assert_eq!(
            ns_id(&format!("/proc/self/task/{}/ns/ipc", std::process::id())),
            ours
        );
        assert_eq!(sysctl("shm_next_id"), our_next);
        checked.wait();
        assert_eq!(t.join().expect("thread"), 4242);
    });
    let here = std::fs::read_to_string("/proc/sysvipc/shm").expect("read");
    assert!(
        !here.contains(&0x5157_0100.to_string()),
        "segment made in our namespace"
    );
    assert!(a.within(|| shm_column(4242, "size")) == PAGE as u64);
}

#[test]
fn objects_survive_capture_and_recreate() {
    if !can_run() {
        return;
    }
    let a = ipc_ns();
    let made = populate(&a);
    let sparse_rss = a.within(|| shm_column(made.shm_sparse, "rss"));
    let ours = ns_id("/proc/thread-self/ns/ipc");

    let t = Instant::now();
    let captured = sysvipc::capture(a.pid).expect("capture");
    eprintln!("capture: {:?}", t.elapsed());
    assert_eq!(ns_id("/proc/thread-self/ns/ipc"), ours);
    check_captured(&captured, &made);

    // Capture changed nothing: the queue is still full, nattch is as it was, and the sparse
    // segment has no more pages in memory than before.
    assert_eq!(sysvipc::capture(a.pid).expect("capture again"), captured);
    assert_eq!(a.within(|| shm_column(made.shm_sparse, "rss")), sparse_rss);
    assert_eq!(a.within(|| shm_column(made.shm_keyed, "nattch")), 1);

    let b = ipc_ns();
    let t = Instant::now();
    sysvipc::recreate(b.pid, &captured).expect("recreate");
    eprintln!("recreate: {:?}", t.elapsed());
    // The restored processes re-attach what was attached, then finish marks SHM_DEST.
    let again = b.within(|| vec![Attached::new(made.shm_keyed), Attached::new(made.shm_dest)]);
    sysvipc::finish(b.pid, &captured).expect("finish");
    let recreated = sysvipc::capture(b.pid).expect("capture the recreated");
    assert_eq!(recreated, captured);
    // All-zero pages were not written: the sparse segment has as few pages in memory there.
    assert_eq!(b.within(|| shm_column(made.shm_sparse, "rss")), sparse_rss);
    drop(again);
    drop(made.attached);
}

/// The one item of `items` that `pred` picks (`what` names it if there is none).
fn one<'a, T>(items: &'a [T], what: &str, pred: impl Fn(&T) -> bool) -> &'a T {
    let mut found = items.iter().filter(|i| pred(i));
    let item = found.next().unwrap_or_else(|| panic!("no {what}"));
    assert!(found.next().is_none(), "more than one {what}");
    item
}

/// What `populate` made, as capture must have seen it.
fn check_captured(c: &IpcObjects, made: &Made) {
    let l = &c.limits;
    assert_eq!(
        (l.msgmax, l.msgmnb, l.shmmax, l.shmmni),
        (9000, 1000, 4096, 2)
    );
    assert_eq!(l.sem, [4, 32000, 32, 1]);
    assert_eq!(c.shm.len(), 5);
    let keyed = one(&c.shm, "keyed", |s| s.perm.id == made.shm_keyed);
    assert_eq!(keyed.perm.key, 0x5157_0001);
    assert_eq!(
        (keyed.perm.mode, keyed.perm.uid, keyed.perm.gid),
        (0o640, 1000, 1001)
    );
    assert_eq!((keyed.size, keyed.attached), (3 * PAGE as u64 + 100, 1));
    let mut want = vec![0u8; 2 * PAGE + 60];
    want[..5].copy_from_slice(b"hello");
    want[2 * PAGE + 10..].fill(0xab);
    assert_eq!(keyed.data, want, "trailing zeros trimmed, the rest kept");
    let private = one(&c.shm, "a private segment", |s| {
        s.perm.key == 0 && s.perm.mode & SHM_DEST == 0
    });
    assert_eq!(
        private.data,
        (0..PAGE).map(|i| (i % 251 + 1) as u8).collect::<Vec<_>>()
    );
    let sparse = one(&c.shm, "sparse", |s| s.perm.id == made.shm_sparse);
    assert_eq!((sparse.size, sparse.data.len()), (1 << 30, (1 << 20) + 1));
    let locked = one(&c.shm, "locked", |s| s.perm.key == 0x5157_0004);
    assert_eq!(locked.perm.mode, 0o600 | SHM_LOCKED);
    let dest = one(&c.shm, "dest", |s| s.perm.id == made.shm_dest);
    assert_eq!((dest.perm.key, dest.perm.mode), (0, 0o600 | SHM_DEST));
    assert_eq!((dest.data.as_slice(), dest.attached), (&b"doomed"[..], 1));

    assert_eq!(c.sem.len(), 2);
    let sem = one(&c.sem, "keyed set", |s| s.perm.key == 0x5157_0010);
    assert_eq!(
        (sem.values.as_slice(), sem.perm.uid),
        (&[0, 1, 7, 32767, 3][..], 1000)
    );
    let other = one(&c.sem, "other's set", |s| s.perm.id == made.sem_other);
    let p = &other.perm;
    assert_eq!((p.uid, p.gid, p.cuid, p.cgid), (1234, 1235, 1234, 1235));
    assert_eq!(other.values, [42]);

    assert_eq!(c.msg.len(), 2);
    let q = one(&c.msg, "queue", |q| q.perm.key == 0x5157_0020);
    assert_eq!(q.qbytes, 8000);
    let got: Vec<(i64, usize)> = q.messages.iter().map(|m| (m.mtype, m.text.len())).collect();
    assert_eq!(got, [(1, 3), (5, 4), (2, 6), (1, 0), (3, 9000)]);
    assert_eq!(q.messages[2].text, [0, 1, 0, 2, 0, 0]);
    assert_eq!(q.messages[4].text[..3], [0, 7, 14]);
    let empty = one(&c.msg, "private queue", |q| q.perm.key == 0);
    assert_eq!((empty.perm.mode, empty.messages.len()), (0o622, 0));
}

#[test]
fn capture_refuses_contents_over_the_bound() {
    if !can_run() {
        return;
    }
    let a = ipc_ns();
    let (id, rss) = a.within(|| {
        // 40 MiB, written only at 33 MiB: one page in memory, but 33 MiB of contents.
        let id = shm_new(0x5157_0200, 40 << 20, 0o600);
        shm_write(id, 33 << 20, b"x");
        (id, shm_column(id, "rss"))
    });
    let e = sysvipc::capture(a.pid)
        .expect_err("over the bound")
        .to_string();
    eprintln!("{e}");
    let name = format!(
        "shm id {id} key 0x51570200 (IPC namespace of pid {})",
        a.pid
    );
    assert!(e.contains(&name), "{e}");
    assert!(
        e.contains("over the limit of 33554432 bytes (32 MiB)"),
        "{e}"
    );
    assert_eq!(a.within(|| shm_column(id, "rss")), rss);
    assert_eq!(a.within(|| shm_column(id, "nattch")), 0);
}

#[test]
fn capture_refuses_a_message_longer_than_msgmax_and_leaves_it_queued() {
    if !can_run() {
        return;
    }
    let a = ipc_ns();
    let q = a.within(|| {
        set_sysctl("msgmax", "20000");
        set_sysctl("msgmnb", "30000");
        let q = msg_new(0x5157_0210, 0o600);
        msg_send(q, 1, &[1; 100]);
        msg_send(q, 2, &[2; 15000]); // copied once the buffer has grown
        msg_send(q, 3, &[3; 9000]);
        q
    });
    let objs = sysvipc::capture(a.pid).expect("capture");
    let lens: Vec<usize> = objs.msg[0].messages.iter().map(|m| m.text.len()).collect();
    assert_eq!(lens, [100, 15000, 9000]);
    assert!(objs.msg[0].messages[1].text.iter().all(|b| *b == 2));
    a.within(|| set_sysctl("msgmax", "8192"));
    let e = sysvipc::capture(a.pid).expect_err("too long").to_string();
    let name = format!("msg id {q} key 0x51570210 (IPC namespace of pid {})", a.pid);
    assert!(
        e.contains(&format!("message 1 of {name} is longer than")),
        "{e}"
    );
    assert!(e.contains("(8192 bytes, lowered since it was sent)"), "{e}");
    // Nothing was taken off the queue.
    a.within(|| set_sysctl("msgmax", "20000"));
    assert_eq!(sysvipc::capture(a.pid).expect("capture again"), objs);
}

/// A namespace with a shm segment and a semaphore set, captured.
fn small_objects() -> (Ns, IpcObjects) {
    let a = ipc_ns();
    a.within(|| {
        shm_write(shm_new(0x5157_0300, PAGE, 0o600), 0, b"data");
        sem_new(0x5157_0301, &[1, 2], 0o600);
    });
    let objs = sysvipc::capture(a.pid).expect("capture");
    (a, objs)
}

#[test]
fn recreate_refuses_a_namespace_that_is_not_empty() {
    if !can_run() {
        return;
    }
    let (_a, objs) = small_objects();
    let b = ipc_ns();
    if common::have_with("ipcmk", "--version") && common::have("nsenter") {
        let ns = format!("--ipc={}", b.ns_path());
        let st = Command::new("nsenter")
            .args([ns.as_str(), "ipcmk", "-Q", "-p", "0600"])
            .stdout(Stdio::null())
            .status()
            .expect("nsenter ipcmk");
        assert!(st.success(), "ipcmk -Q");
    } else {
        b.within(|| msg_new(0x5157_0302, 0o600));
    }
    let before = sysvipc::capture(b.pid).expect("capture b");
    assert_eq!(
        (before.shm.len(), before.sem.len(), before.msg.len()),
        (0, 0, 1)
    );
    let e = sysvipc::recreate(b.pid, &objs)
        .expect_err("not empty")
        .to_string();
    assert!(
        e.contains(&format!("the IPC namespace of pid {} is not empty", b.pid)),
        "{e}"
    );
    assert!(
        e.contains(&format!("msg id {}", before.msg[0].perm.id)),
        "{e}"
    );
    assert_eq!(sysvipc::capture(b.pid).expect("capture b again"), before);

    // Nor into our own namespace.
    let e = sysvipc::recreate(std::process::id() as i32, &objs).expect_err("ours");
    assert!(e.to_string().contains("stasis's own IPC namespace"), "{e}");
}

#[test]
fn a_failed_recreate_leaves_the_namespace_as_it_was() {
    if !can_run() {
        return;
    }
    let (_a, mut objs) = small_objects();
    // A second segment at the same index of the id table as the first (ids are seq * 32768
    // + index): no capture has that, and the kernel gives it another id, which recreate
    // finds out only after the first segment exists.
    let mut twin = objs.shm[0].clone();
    twin.perm.id += 32768;
    twin.perm.key = 0x5157_0303;
    objs.shm.push(twin);
    let b = ipc_ns();
    let before = sysvipc::capture(b.pid).expect("capture b");
    let e = sysvipc::recreate(b.pid, &objs)
        .expect_err("id taken")
        .to_string();
    let want = format!(
        "shm id {} key 0x51570303 (IPC namespace of pid {}): the kernel gave it id {} instead",
        objs.shm[1].perm.id,
        b.pid,
        objs.shm[1].perm.id + 1 // the next free index, with the seq asked for
    );
    assert!(e.contains(&want), "{e}");
    assert_eq!(sysvipc::capture(b.pid).expect("capture b again"), before);
    assert_eq!(b.within(|| sysctl("shm_next_id")), "-1");
    // And it works without that segment.
    objs.shm.pop();
    sysvipc::recreate(b.pid, &objs).expect("recreate");
    assert_eq!(sysvipc::capture(b.pid).expect("capture b"), objs);
}

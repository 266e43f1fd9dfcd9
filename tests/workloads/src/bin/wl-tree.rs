//! `wl-tree`: a process tree sharing pipes (with data in their buffers), an open file
//! description and anonymous shared memory, with a process group, a session, an orphan, two
//! zombies and a stopped process.
//!
//! The root R (the process the harness talks to) is a child subreaper. Before `READY`:
//! - A (own process group) with grandchild A1 (in A's group): R → A → A1;
//! - B (new session, its leader) with grandchild B1 (in B's session and group);
//! - O1, an orphan: R forks O, O forks O1 and exits, R reaps O: O1's parent is R;
//! - S, stopped by SIGSTOP; Z and K, unreaped zombies (Z `_exit(7)`, K killed by SIGTERM).
//!
//! Every live child (A, A1, B, B1, O1, S) has a command pipe from R and a result pipe to R
//! (made by R; A1's and B1's pass through A and B), fds 0 and 1 on `/dev/null`, 2 shared with
//! R, and nothing else but what is named here. Left in pipe buffers at `READY`: P1 R→A 3000
//! bytes, P2 A→R 6000 of 10000 bytes (R's end `O_NONBLOCK`), P3 A1→B1 500 bytes. R and A
//! share one open file description of `$TMPDIR/stasis-wl-tree-<pid>-<tag>.dat` (offset 100;
//! R also holds a `dup`). All share a 64 KiB `MAP_SHARED|MAP_ANONYMOUS` region (A's pattern
//! in the first half, B's in the second, words 0-2 are mailboxes).
//!
//! R ↔ child lines: at set-up `UP <pid>` (or `FAIL setup: ..`); per `check`/`verify` (round
//! n) R sends `round <n> offset <file offset>`, the child answers `PASS` or `FAIL <why>`. A
//! child exits on EOF of its command pipe (A and B reap A1 and B1 first, and exit 0 only if
//! they exited 0) or when its parent dies (`PR_SET_PDEATHSIG`). The first check prints
//! `INFO wl-tree: pids R=.. A=.. A1=.. B=.. B1=.. O1=.. S=.. Z=.. K=..`.
//!
//! Each live child checks: the round number, pid (raw), ppid, pgid, sid, `comm`, its children,
//! the exact set of open fds (type, `F_GETFL`, file identity), the shared mapping (address,
//! size, `rw-s`, both halves, R's round in word 0). A also reads P1's backlog (first round)
//! and the 100-byte chunk R adds each round, exactly and nothing more (`FIONREAD`), checks
//! its P2 end is blocking `O_WRONLY`, that the shared offset is where R left it after R's 50
//! bytes, writes 50 bytes, and acknowledges in word 1 (B in word 2). B1 reads P3 likewise.
//! R checks the common `Ctx` state, the subreaper flag, pgid, sid, its fds, P2's remaining
//! 6000 bytes then nothing, that its children are exactly A, B, O1, S, Z and K, Z and K are
//! zombies with their statuses (`waitid(WNOWAIT)`; reaped by `check` only), S is stopped (it
//! is continued to answer, and stopped again after a `verify`), the file offset (+100 per
//! round), contents, the `dup` sharing the offset, every child's answer (a missing one names
//! the child), and A's write and acknowledgements. `check` then closes the command pipes,
//! reaps A, B, O1 and S (each must exit 0) and checks no child is left.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use stasis_workloads::ipc::{
    close, exit, fork, getppid, keep_only, kill, pipe, pipe_bytes, pread, read_exact, read_line,
    Pipe,
};
use stasis_workloads::report::one_line;
use stasis_workloads::{maps, pattern, sys, Cmd, Ctx, Report, Spec};

const SHM_LEN: usize = 64 * 1024;
const SHM_WORDS: usize = SHM_LEN / 8;
/// Mailbox words at the start of the shared region: 0 round (R), 1 A's ack, 2 B's ack.
const HEADER_WORDS: usize = 8;
const A_ACK: u64 = 1000;
const B_ACK: u64 = 2000;
const P1_BACKLOG: usize = 3000;
const P1_CHUNK: usize = 100;
const P2_TOTAL: usize = 10000;
const P2_AT_SETUP: usize = 4000;
const P3_BYTES: usize = 500;
const FILE_AT_SETUP: usize = 100;
const FILE_STEP: usize = 50;
const Z_STATUS: i32 = 7;
/// Bound on every wait for another process (answers, exits, state changes).
const TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on reading pipe data that must already be buffered.
const DATA_TIMEOUT: Duration = Duration::from_secs(2);
const FLAG_MASK: i32 = libc::O_ACCMODE | libc::O_NONBLOCK | libc::O_APPEND;
const RD: i32 = libc::O_RDONLY;
const WR: i32 = libc::O_WRONLY;

// Data streams: bytes of pattern::key(seed, [id, ..]).
const PAT_P1: u64 = 1;
const PAT_P1_CHUNK: u64 = 2;
const PAT_P2: u64 = 3;
const PAT_P3: u64 = 4;
const PAT_FILE_SETUP: u64 = 5;
const PAT_FILE_R: u64 = 6;
const PAT_FILE_A: u64 = 7;
const PAT_SHM_A: u64 = 8;
const PAT_SHM_B: u64 = 9;

/// S while it may be stopped: R continues it when exiting through the protocol, so S sees
/// EOF and exits even if a restore lost `PR_SET_PDEATHSIG`.
static STOPPED_CHILD: AtomicI32 = AtomicI32::new(0);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    A,
    A1,
    B,
    B1,
    O1,
    S,
}

const LIVE: [Role; 6] = [Role::A, Role::A1, Role::B, Role::B1, Role::O1, Role::S];

impl Role {
    fn name(self) -> &'static str {
        ["A", "A1", "B", "B1", "O1", "S"][self as usize]
    }
    /// The grandchild this child forks and reaps.
    fn child(self) -> Option<Role> {
        match self {
            Role::A => Some(Role::A1),
            Role::B => Some(Role::B1),
            _ => None,
        }
    }
}

/// Everything fixed before the first fork; every process has its copy.
#[derive(Clone, Copy)]
struct Plan {
    seed: u64,
    root: i32,
    pgid: i32,
    sid: i32,
    cmd: [Pipe; 6],
    res: [Pipe; 6],
    p1: Pipe,
    p2: Pipe,
    p3: Pipe,
    file: i32,
    shm: Shm,
}

impl Plan {
    fn cmd(&self, r: Role) -> Pipe {
        self.cmd[r as usize]
    }
    fn res(&self, r: Role) -> Pipe {
        self.res[r as usize]
    }
    fn stream(&self, ids: &[u64], len: usize) -> Vec<u8> {
        let k = pattern::key(self.seed, ids);
        (0..len).map(|i| pattern::byte(k, i)).collect()
    }
}

// ----------------------------------------------------------------------------------------
// Helpers (the raw syscalls are in stasis_workloads::ipc).

/// "expected N bytes, got M, first difference ..", or None if equal.
fn diff_bytes(want: &[u8], got: &[u8]) -> Option<String> {
    if want == got {
        return None;
    }
    let at = match want.iter().zip(got).position(|(a, b)| a != b) {
        Some(i) => format!(
            ", first difference at byte {i}: {:#04x} vs {:#04x}",
            want[i], got[i]
        ),
        None => String::new(),
    };
    Some(format!(
        "expected {} bytes, got {}{at}",
        want.len(),
        got.len()
    ))
}

/// A pipe holds exactly `want` (`FIONREAD`); reads it; nothing is left.
fn check_pipe_data(r: &mut Report, what: &str, fd: i32, want: &[u8]) {
    if let Some(n) = r.ok(pipe_bytes(fd)) {
        r.eq(&format!("{what}: bytes buffered"), want.len(), n);
    }
    if want.is_empty() {
        return;
    }
    match read_exact(fd, want.len(), Instant::now() + DATA_TIMEOUT) {
        Ok(got) => diff_bytes(want, &got).map_or((), |d| r.fail(format!("{what}: data: {d}"))),
        Err(e) => r.fail(format!("{what}: {e}")),
    }
    if let Some(n) = r.ok(pipe_bytes(fd)) {
        r.eq(
            &format!("{what}: bytes left after reading {}", want.len()),
            0,
            n,
        );
    }
}

/// (state, ppid) from /proc/PID/stat.
fn proc_stat(pid: i32) -> Result<(char, i32), String> {
    let path = format!("/proc/{pid}/stat");
    let s = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    let f: Vec<&str> = s
        .rsplit_once(')')
        .map_or("", |x| x.1)
        .split_whitespace()
        .collect();
    match (
        f.first().and_then(|s| s.chars().next()),
        f.get(1).and_then(|p| p.parse().ok()),
    ) {
        (Some(state), Some(ppid)) => Ok((state, ppid)),
        _ => Err(format!("unparsable {path}: {s:?}")),
    }
}

/// Calls `done` every millisecond until it returns true, for at most TIMEOUT.
fn poll_until(what: &str, mut done: impl FnMut() -> Result<bool, String>) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    while !done()? {
        if Instant::now() > deadline {
            return Err(format!("{what}: not within {TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

fn wait_state(pid: i32, want: char) -> Result<(), String> {
    let mut last = '?';
    let what = format!("pid {pid} in state {want}");
    poll_until(&what, || {
        last = proc_stat(pid)?.0;
        Ok(last == want)
    })
    .map_err(|e| format!("{e} (state {last})"))
}

fn children_of(pid: i32) -> Result<Vec<i32>, String> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    let s = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
    let mut v: Vec<i32> = s
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

fn describe_status(st: i32) -> String {
    if libc::WIFEXITED(st) {
        format!("exited with {}", libc::WEXITSTATUS(st))
    } else if libc::WIFSIGNALED(st) {
        format!("killed by signal {}", libc::WTERMSIG(st))
    } else {
        format!("wait status {st:#x}")
    }
}

/// How a child ended, by `waitid(WEXITED|WNOWAIT|extra)`: it stays a zombie.
fn peek_exit(pid: i32, extra: i32) -> Result<Option<String>, String> {
    // SAFETY: an all-zero siginfo_t is a valid value of this plain C struct.
    let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | libc::WNOWAIT | extra;
    // SAFETY: `si` is a valid, writable siginfo_t.
    let rc = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut si, flags) };
    sys::cvt(rc, &format!("waitid({pid}, WEXITED|WNOWAIT)"))?;
    // SAFETY: waitid succeeded, so the SIGCHLD fields are set (si_pid 0 under WNOHANG).
    let (got, status) = unsafe { (si.si_pid(), si.si_status()) };
    Ok((got != 0).then(|| match si.si_code {
        libc::CLD_EXITED => format!("exited with {status}"),
        libc::CLD_KILLED => format!("killed by signal {status}"),
        c => format!("si_code {c}, si_status {status}"),
    }))
}

/// Reaps `pid` within TIMEOUT (else kills and reaps it); how it ended.
fn reap_within(pid: i32) -> Result<String, String> {
    let mut st = 0;
    let reaped = poll_until(&format!("exit of {pid}"), || {
        // SAFETY: `st` is a valid, writable int.
        match unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } {
            r if r < 0 => Err(sys::os_err(&format!("waitpid({pid})"))),
            r => Ok(r == pid),
        }
    });
    if let Err(e) = reaped {
        let _ = kill(pid, libc::SIGKILL);
        // SAFETY: as above; reaps the killed child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
        return Err(format!("{e}; killed"));
    }
    Ok(describe_status(st))
}

// ----------------------------------------------------------------------------------------
// Fds: what each must be at set-up, then unchanged at every check.

struct FdSpec {
    fd: i32,
    name: String,
    /// `S_IFMT` bits, or 0: only presence is checked (stdio from the harness).
    kind: libc::mode_t,
    flags: i32,
}

fn fd_spec(fd: i32, name: impl Into<String>, kind: libc::mode_t, flags: i32) -> FdSpec {
    FdSpec {
        fd,
        name: name.into(),
        kind,
        flags,
    }
}

fn fifo(fd: i32, name: impl Into<String>, flags: i32) -> FdSpec {
    fd_spec(fd, name, libc::S_IFIFO, flags)
}

/// (type, F_GETFL, file id): (dev, inode) of a regular file, rdev of a device, none for a
/// pipe (a restored pipe is a new inode).
type FdState = (libc::mode_t, i32, (u64, u64));

fn fd_state(fd: i32) -> Result<FdState, String> {
    let st = sys::fstat(fd)?;
    let kind = st.st_mode & libc::S_IFMT;
    let id = match kind {
        libc::S_IFREG => (st.st_dev, st.st_ino),
        libc::S_IFCHR => (st.st_rdev, 0),
        _ => (0, 0),
    };
    Ok((kind, sys::fcntl_get(fd, libc::F_GETFL, "F_GETFL")?, id))
}

/// The open fds, from /proc/self/fd (without the one listing it).
fn open_fds() -> Result<Vec<i32>, String> {
    // SAFETY: the path is NUL-terminated; the DIR is closed below.
    let dir = unsafe { libc::opendir(c"/proc/self/fd".as_ptr()) };
    if dir.is_null() {
        return Err(sys::os_err("opendir /proc/self/fd"));
    }
    // SAFETY: `dir` is a valid open DIR.
    let own = unsafe { libc::dirfd(dir) };
    let mut fds = Vec::new();
    // SAFETY: `dir` is a valid open DIR; each entry's d_name is NUL-terminated.
    while let Some(e) = unsafe { libc::readdir(dir).as_ref() } {
        // SAFETY: as above.
        let name = unsafe { std::ffi::CStr::from_ptr(e.d_name.as_ptr()) };
        match name.to_str().ok().and_then(|s| s.parse().ok()) {
            Some(fd) if fd != own => fds.push(fd),
            _ => {}
        }
    }
    // SAFETY: `dir` is valid and not used again.
    unsafe { libc::closedir(dir) };
    fds.sort_unstable();
    Ok(fds)
}

struct Fds(Vec<(FdSpec, Option<FdState>)>);

impl Fds {
    /// Checks the open fds are exactly `spec` (types, access flags) and records their state.
    fn take(mut spec: Vec<FdSpec>) -> Result<Fds, String> {
        spec.sort_by_key(|s| s.fd);
        let want: Vec<i32> = spec.iter().map(|s| s.fd).collect();
        let open = open_fds()?;
        if open != want {
            return Err(format!("open fds {open:?}, expected {want:?}"));
        }
        let mut fds = Vec::new();
        for s in spec {
            let st = if s.kind == 0 {
                None
            } else {
                Some(fd_state(s.fd)?)
            };
            if let Some((kind, flags, _)) = st {
                if kind != s.kind || flags & FLAG_MASK != s.flags {
                    return Err(format!(
                        "fd {} ({}): type {kind:o} F_GETFL {flags:#x}, expected {:o} {:#x}",
                        s.fd, s.name, s.kind, s.flags
                    ));
                }
            }
            fds.push((s, st));
        }
        Ok(Fds(fds))
    }

    fn check(&self, r: &mut Report, who: &str) {
        let want: Vec<i32> = self.0.iter().map(|s| s.0.fd).collect();
        if let Some(open) = r.ok(open_fds()) {
            r.eq(&format!("{who}open fds (/proc/self/fd)"), &want, &open);
        }
        for (s, at) in &self.0 {
            let Some(at) = at else { continue };
            let what = format!("{who}fd {} ({}) (type, F_GETFL, file)", s.fd, s.name);
            if let Some(now) = r.ok(fd_state(s.fd).map_err(|e| format!("{what}: {e}"))) {
                r.eq(&what, *at, now);
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// The shared anonymous mapping.

#[derive(Clone, Copy)]
struct Shm(*mut u64);

impl Shm {
    fn map() -> Result<Shm, String> {
        let (prot, flags) = (
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
        );
        // SAFETY: a fresh anonymous mapping where the kernel chooses.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), SHM_LEN, prot, flags, -1, 0) };
        if p == libc::MAP_FAILED {
            return Err(sys::os_err("mmap shared anonymous"));
        }
        Ok(Shm(p.cast()))
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < HEADER_WORDS);
        // SAFETY: the mapping is never unmapped and page-aligned; AtomicU64 has u64's layout;
        // other processes change these words only through atomics too.
        unsafe { &*self.0.add(i).cast::<AtomicU64>() }
    }

    /// A half of the pattern area: (first word, words).
    fn half(second: bool) -> (usize, usize) {
        if second {
            (SHM_WORDS / 2, SHM_WORDS / 2)
        } else {
            (HEADER_WORDS, SHM_WORDS / 2 - HEADER_WORDS)
        }
    }

    fn fill_half(&self, second: bool, k: u64) {
        let (at, len) = Self::half(second);
        // SAFETY: inside the live mapping; only this process writes this half, at set-up.
        pattern::fill(
            unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) },
            k,
        );
    }

    /// Still mapped at the same address, same size, shared, with both halves' patterns.
    fn check(&self, r: &mut Report, who: &str, seed: u64) {
        let addr = self.0 as usize;
        if let Some(m) = r.ok(maps::read_maps()) {
            match m.iter().find(|e| e.start == addr) {
                Some(e) => r.eq(
                    &format!("{who}shared mapping at {addr:#x} (end, perms)"),
                    (addr + SHM_LEN, "rw-s"),
                    (e.end, e.perms.as_str()),
                ),
                None => r.fail(format!("{who}no mapping at {addr:#x} (the shared region)")),
            }
        }
        for (second, id, owner) in [(false, PAT_SHM_A, "A"), (true, PAT_SHM_B, "B")] {
            let (at, len) = Self::half(second);
            // SAFETY: inside the live mapping; the halves are written only at set-up.
            let half = unsafe { std::slice::from_raw_parts(self.0.add(at), len) };
            if let Some((i, e, g)) = pattern::first_mismatch(half, pattern::key(seed, &[id])) {
                r.fail(format!(
                    "{who}shared memory half of {owner}: word {i}: expected {e:#x}, got {g:#x}"
                ));
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// The children.

/// (pid, ppid, pgid, sid), the pid by the raw syscall.
type Ids = (i32, i32, i32, i32);

fn ids_now() -> Ids {
    // SAFETY: getpgrp and getsid(0) take no pointers.
    let (pgid, sid) = unsafe { (libc::getpgrp(), libc::getsid(0)) };
    (sys::getpid_raw(), getppid(), pgid, sid)
}

/// A set-up failure in a child: reported on its result pipe, then exit.
fn child_fail(res: i32, msg: &str) -> ! {
    let _ = sys::write_all(res, format!("FAIL setup: {}\n", one_line(msg)).as_bytes());
    exit(1)
}

fn child_try<T>(res: i32, r: Result<T, String>) -> T {
    r.unwrap_or_else(|e| child_fail(res, &e))
}

/// SIGKILL when the parent dies; exit now if it died already.
fn die_with_parent(parent: i32) {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if rc != 0 || getppid() != parent {
        exit(1);
    }
}

/// The pipes and file a child holds besides 0, 1, 2.
fn own_fds(p: &Plan, role: Role) -> Vec<FdSpec> {
    let mut v = vec![
        fifo(p.cmd(role).r, "command pipe from R", RD),
        fifo(p.res(role).w, "result pipe to R", WR),
    ];
    match role {
        Role::A => v.extend([
            fifo(p.p1.r, "P1 read end (from R)", RD),
            fifo(p.p2.w, "P2 write end (to R)", WR),
            fd_spec(p.file, "shared file", libc::S_IFREG, libc::O_RDWR),
        ]),
        Role::A1 => v.push(fifo(p.p3.w, "P3 write end (to B1)", WR)),
        Role::B1 => v.push(fifo(p.p3.r, "P3 read end (from A1)", RD)),
        _ => {}
    }
    v
}

/// What a child does before `UP`, after fd clean-up and before forking its own child.
fn set_up(p: &Plan, role: Role) -> Result<(), String> {
    match role {
        Role::A => {
            // SAFETY: setpgid(0, 0) takes no pointers.
            sys::cvt(unsafe { libc::setpgid(0, 0) }, "setpgid(0, 0)")?;
            sys::write_all(p.file, &p.stream(&[PAT_FILE_SETUP], FILE_AT_SETUP))?;
            sys::write_all(p.p2.w, &p.stream(&[PAT_P2], P2_TOTAL))?;
            p.shm.fill_half(false, pattern::key(p.seed, &[PAT_SHM_A]));
            p.shm.word(1).store(A_ACK, SeqCst);
        }
        Role::A1 => sys::write_all(p.p3.w, &p.stream(&[PAT_P3], P3_BYTES))?,
        Role::B => {
            // SAFETY: setsid takes no arguments.
            sys::cvt(unsafe { libc::setsid() }, "setsid")?;
            p.shm.fill_half(true, pattern::key(p.seed, &[PAT_SHM_B]));
            p.shm.word(2).store(B_ACK, SeqCst);
        }
        _ => {}
    }
    Ok(())
}

/// A live child from fork to its command loop.
fn run_child(p: &Plan, role: Role, parent: i32) -> ! {
    let res = p.res(role).w;
    // O1's first parent O exits at once; no PDEATHSIG before the reparenting to R (it
    // would fire when O exits).
    if role == Role::O1 {
        child_try(
            res,
            poll_until("reparenting to R", || Ok(getppid() == parent)),
        );
    }
    die_with_parent(parent);
    let mine = own_fds(p, role);
    let grandchild: Vec<i32> = role
        .child()
        .map_or(vec![], |c| own_fds(p, c))
        .iter()
        .map(|s| s.fd)
        .collect();
    keep_only(&[mine.iter().map(|s| s.fd).collect(), grandchild.clone()].concat());
    for (fd, flags) in [(0, RD), (1, WR)] {
        close(fd);
        // SAFETY: the path is NUL-terminated.
        if unsafe { libc::open(c"/dev/null".as_ptr(), flags) } != fd {
            child_fail(res, &sys::os_err(&format!("open /dev/null as fd {fd}")));
        }
    }
    child_try(res, set_up(p, role));
    let me = sys::getpid_raw();
    let child = role.child().map(|c| {
        let pid = child_try(res, fork());
        if pid == 0 {
            run_child(p, c, me);
        }
        grandchild.iter().for_each(|&fd| close(fd));
        pid
    });
    let (pgid, sid) = match role {
        Role::A => (me, p.sid),
        Role::A1 => (parent, p.sid),
        Role::B => (me, me),
        Role::B1 => (parent, parent),
        _ => (p.pgid, p.sid),
    };
    let ids = (me, parent, pgid, sid);
    if ids_now() != ids {
        child_fail(
            res,
            &format!("(pid, ppid, pgid, sid) {:?}, expected {ids:?}", ids_now()),
        );
    }
    let name = std::ffi::CString::new(comm(role)).unwrap_or_default();
    // SAFETY: PR_SET_NAME reads a NUL-terminated string.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
    let mut spec = vec![
        fd_spec(0, "/dev/null as stdin", libc::S_IFCHR, RD),
        fd_spec(1, "/dev/null as stdout", libc::S_IFCHR, WR),
        fd_spec(2, "stderr shared with R", 0, 0),
    ];
    spec.extend(mine);
    let fds = child_try(res, Fds::take(spec));
    child_try(res, sys::write_all(res, format!("UP {me}\n").as_bytes()));
    let backlog = match role {
        Role::A => P1_BACKLOG,
        Role::B1 => P3_BYTES,
        _ => 0,
    };
    Me {
        role,
        p: *p,
        ids,
        fds,
        round: 0,
        backlog,
        child,
        eintr: 0,
    }
    .serve()
}

fn comm(role: Role) -> String {
    format!("wl-tree-{}", role.name())
}

/// A live child's state between commands.
struct Me {
    role: Role,
    p: Plan,
    ids: Ids,
    fds: Fds,
    round: u64,
    /// Set-up bytes still unread in P1 (A) or P3 (B1).
    backlog: usize,
    /// The child it reaps before exiting (A: A1, B: B1).
    child: Option<i32>,
    eintr: u32,
}

impl Me {
    fn serve(mut self) -> ! {
        let (cmd, res) = (self.p.cmd(self.role).r, self.p.res(self.role).w);
        loop {
            let line = match read_line(cmd, None, &mut self.eintr) {
                Ok(Some(l)) => l,
                Ok(None) => self.exit_on_eof(),
                Err(e) => child_fail(res, &format!("command pipe: {e}")),
            };
            let mut r = Report::new();
            let w: Vec<&str> = line.split(' ').collect();
            match (
                &w[..],
                w.get(1).map(|n| n.parse()),
                w.get(3).map(|o| o.parse()),
            ) {
                (["round", _, "offset", _], Some(Ok(n)), Some(Ok(off))) => {
                    self.check(&mut r, n, off)
                }
                _ => r.fail(format!("unparsable command {line:?}")),
            }
            let reply = match r.passed() {
                true => "PASS\n".to_string(),
                false => format!("FAIL {}\n", r.fail_text()),
            };
            if sys::write_all(res, reply.as_bytes()).is_err() {
                exit(1); // R is gone
            }
        }
    }

    fn exit_on_eof(&self) -> ! {
        let Some(pid) = self.child else { exit(0) };
        match reap_within(pid) {
            Ok(end) if end == "exited with 0" => exit(0),
            Ok(end) => eprintln!("wl-tree {}: child {pid} {end}", self.role.name()),
            Err(e) => eprintln!("wl-tree {}: child {pid}: {e}", self.role.name()),
        }
        exit(1)
    }

    fn check(&mut self, r: &mut Report, n: u64, off: i64) {
        r.eq("command round", self.round + 1, n);
        self.round = n;
        r.eq(
            "reads of the command pipe that returned EINTR",
            0,
            self.eintr,
        );
        r.eq("(pid, ppid, pgid, sid)", self.ids, ids_now());
        match std::fs::read_to_string("/proc/self/comm") {
            Ok(c) => r.eq("/proc/self/comm", comm(self.role).as_str(), c.trim_end()),
            Err(e) => r.fail(format!("read /proc/self/comm: {e}")),
        }
        if let Some(kids) = r.ok(children_of(self.ids.0)) {
            r.eq("children", self.child.into_iter().collect::<Vec<_>>(), kids);
        }
        self.fds.check(r, "");
        let (p, shm) = (self.p, self.p.shm);
        shm.check(r, "", p.seed);
        r.eq(
            "shared memory word 0 (round written by R)",
            n,
            shm.word(0).load(SeqCst),
        );
        match self.role {
            Role::A => {
                let mut want = p.stream(&[PAT_P1], self.backlog);
                want.extend(p.stream(&[PAT_P1_CHUNK, n], P1_CHUNK));
                check_pipe_data(r, "P1 (pipe from R)", p.p1.r, &want);
                if let Some(fl) = r.ok(sys::fcntl_get(p.p2.w, libc::F_GETFL, "F_GETFL")) {
                    r.eq_hex(
                        "P2 write end F_GETFL (blocking O_WRONLY)",
                        WR,
                        fl & FLAG_MASK,
                    );
                }
                if let Some(got) = r.ok(sys::lseek(p.file, 0, libc::SEEK_CUR)) {
                    r.eq("shared file offset as R left it", off, got);
                }
                let got = r.ok(pread(p.file, FILE_STEP, off - FILE_STEP as i64));
                if let Some(d) =
                    got.and_then(|g| diff_bytes(&p.stream(&[PAT_FILE_R, n], FILE_STEP), &g))
                {
                    r.fail(format!("shared file: the bytes R wrote this round: {d}"));
                }
                r.ok(sys::write_all(
                    p.file,
                    &p.stream(&[PAT_FILE_A, n], FILE_STEP),
                ));
                shm.word(1).store(n + A_ACK, SeqCst);
            }
            Role::B => shm.word(2).store(n + B_ACK, SeqCst),
            Role::B1 => check_pipe_data(
                r,
                "P3 (pipe from A1)",
                p.p3.r,
                &p.stream(&[PAT_P3], self.backlog),
            ),
            _ => {}
        }
        self.backlog = 0;
    }
}

/// K: waits for R's SIGTERM.
fn run_k(p: &Plan) -> ! {
    die_with_parent(p.root);
    keep_only(&[]);
    // SAFETY: the default action of SIGTERM (terminate), in this child only.
    unsafe { libc::signal(libc::SIGTERM, libc::SIG_DFL) };
    loop {
        // SAFETY: pause takes no arguments.
        unsafe { libc::pause() };
    }
}

// ----------------------------------------------------------------------------------------
// The root.

struct Root {
    p: Plan,
    /// Pids of LIVE, in that order.
    pids: Vec<i32>,
    z: i32,
    k: i32,
    dup: i32,
    /// What the shared file must contain.
    file_data: Vec<u8>,
    fds: Fds,
    round: u64,
    /// P2 bytes R has not read yet.
    p2_left: usize,
}

extern "C" fn continue_stopped_child() {
    let pid = STOPPED_CHILD.load(SeqCst);
    if pid > 0 {
        let _ = kill(pid, libc::SIGCONT);
    }
}

fn spawn(body: impl FnOnce()) -> Result<i32, String> {
    let pid = fork()?;
    if pid == 0 {
        body();
        exit(1); // not reached: every body ends in exit
    }
    Ok(pid)
}

/// Waits for the `UP <pid>` of each live child.
fn read_ups(p: &Plan) -> Result<Vec<i32>, String> {
    let deadline = Instant::now() + TIMEOUT;
    let mut pids = Vec::new();
    for role in LIVE {
        let name = role.name();
        let pid = match read_line(p.res(role).r, Some(deadline), &mut 0) {
            Ok(Some(l)) => l
                .strip_prefix("UP ")
                .and_then(|p| p.parse().ok())
                .ok_or(format!("{name}: {l}"))?,
            Ok(None) => return Err(format!("{name} closed its result pipe before reporting")),
            Err(e) => return Err(format!("{name}: {e}")),
        };
        pids.push(pid);
    }
    Ok(pids)
}

/// Z and K are zombies with their statuses, S is stopped, O is reaped.
fn settle(o: i32, z: i32, k: i32, s: i32) -> Result<(), String> {
    let end = reap_within(o)?;
    if end != "exited with 0" {
        return Err(format!("O (pid {o}) {end}"));
    }
    let end = peek_exit(z, 0)?;
    if end.as_deref() != Some(&format!("exited with {Z_STATUS}")) {
        return Err(format!(
            "Z (pid {z}) {end:?}, expected exit status {Z_STATUS}"
        ));
    }
    // SIGTERM until K dies: the first one may come before K restored its default action.
    poll_until(&format!("K (pid {k}) dying of SIGTERM"), || {
        kill(k, libc::SIGTERM)?;
        Ok(peek_exit(k, libc::WNOHANG)?.is_some())
    })?;
    kill(s, libc::SIGSTOP)?;
    wait_state(s, 'T')?;
    STOPPED_CHILD.store(s, SeqCst);
    // SAFETY: registers a plain extern "C" function.
    unsafe { libc::atexit(continue_stopped_child) };
    Ok(())
}

fn build(ctx: &mut Ctx) -> Result<Root, String> {
    // SAFETY: the default SIGCHLD action; an inherited SIG_IGN would reap Z and K at once.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    sys::cvt(rc, "prctl(PR_SET_CHILD_SUBREAPER, 1)")?;
    let (root, _, pgid, sid) = ids_now();
    let shm = Shm::map()?;
    let path = sys::tmp_dir().join(format!("stasis-wl-tree-{root}-{}.dat", ctx.tag));
    let c = sys::cpath(&path)?;
    // SAFETY: `c` is a NUL-terminated path; the mode goes with O_CREAT.
    let file = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL,
            0o640,
        )
    };
    let file = sys::cvt(file, &format!("open {path:?}"))?;
    ctx.remove_at_exit(path);
    // SAFETY: dup of the fd just opened.
    let dup = sys::cvt(unsafe { libc::dup(file) }, "dup")?;
    let cmd = [pipe()?, pipe()?, pipe()?, pipe()?, pipe()?, pipe()?];
    let res = [pipe()?, pipe()?, pipe()?, pipe()?, pipe()?, pipe()?];
    let (p1, p2, p3) = (pipe()?, pipe()?, pipe()?);
    let p = Plan {
        seed: ctx.seed,
        root,
        pgid,
        sid,
        cmd,
        res,
        p1,
        p2,
        p3,
        file,
        shm,
    };
    // SAFETY: F_GETPIPE_SZ takes no third argument.
    let cap = unsafe { libc::fcntl(p2.r, libc::F_GETPIPE_SZ) };
    if (cap as usize) < P2_TOTAL {
        return Err(format!(
            "pipe capacity {cap} < {P2_TOTAL} (fs.pipe-user-pages-soft?)"
        ));
    }

    let a = spawn(|| run_child(&p, Role::A, root))?;
    let b = spawn(|| run_child(&p, Role::B, root))?;
    let o = spawn(|| {
        die_with_parent(root);
        if child_try(p.res(Role::O1).w, fork()) == 0 {
            run_child(&p, Role::O1, root);
        }
        exit(0);
    })?;
    let s = spawn(|| run_child(&p, Role::S, root))?;
    let z = spawn(|| exit(Z_STATUS))?;
    let k = spawn(|| run_k(&p))?;
    let child_ends = LIVE.iter().flat_map(|&r| [p.cmd(r).r, p.res(r).w]);
    child_ends.chain([p1.r, p2.w, p3.r, p3.w]).for_each(close);
    let pids = read_ups(&p)?;
    if [Role::A, Role::B, Role::S].map(|c| pids[c as usize]) != [a, b, s] {
        return Err(format!(
            "A, B, S reported pids {pids:?}, fork returned {a}, {b}, {s}"
        ));
    }
    settle(o, z, k, s)?;

    let fl = sys::fcntl_get(p2.r, libc::F_GETFL, "F_GETFL")? | libc::O_NONBLOCK;
    // SAFETY: F_SETFL only changes the status flags of our fd.
    sys::cvt(unsafe { libc::fcntl(p2.r, libc::F_SETFL, fl) }, "F_SETFL")?;
    let got = read_exact(p2.r, P2_AT_SETUP, Instant::now() + DATA_TIMEOUT)?;
    if let Some(d) = diff_bytes(&p.stream(&[PAT_P2], P2_AT_SETUP), &got) {
        return Err(format!("P2 first {P2_AT_SETUP} bytes: {d}"));
    }
    sys::write_all(p1.w, &p.stream(&[PAT_P1], P1_BACKLOG))?;
    let mut spec = vec![
        fd_spec(0, "stdin", 0, 0),
        fd_spec(1, "stdout", 0, 0),
        fd_spec(2, "stderr", 0, 0),
        fifo(p1.w, "P1 write end (to A)", WR),
        fifo(p2.r, "P2 read end (from A)", RD | libc::O_NONBLOCK),
        fd_spec(file, "shared file", libc::S_IFREG, libc::O_RDWR),
        fd_spec(dup, "dup of the shared file", libc::S_IFREG, libc::O_RDWR),
    ];
    for role in LIVE {
        spec.push(fifo(
            p.cmd(role).w,
            format!("command pipe to {}", role.name()),
            WR,
        ));
        spec.push(fifo(
            p.res(role).r,
            format!("result pipe from {}", role.name()),
            RD,
        ));
    }
    let file_data = p.stream(&[PAT_FILE_SETUP], FILE_AT_SETUP);
    let fds = Fds::take(spec)?;
    let root = Root {
        p,
        pids,
        z,
        k,
        dup,
        file_data,
        fds,
        round: 0,
        p2_left: P2_TOTAL - P2_AT_SETUP,
    };
    let mut r = Report::new();
    root.check_file(&mut r, FILE_AT_SETUP as i64);
    shm.check(&mut r, "R: ", p.seed);
    root.check_acks(&mut r, 0);
    root.check_children(&mut r);
    match r.passed() {
        true => Ok(root),
        false => Err(r.fail_text()),
    }
}

impl Root {
    fn pid(&self, role: Role) -> i32 {
        self.pids[role as usize]
    }

    fn check(&mut self, r: &mut Report, cmd: Cmd) {
        self.round += 1;
        let n = self.round;
        if n == 1 {
            let kids: String = LIVE
                .iter()
                .map(|&c| format!(" {}={}", c.name(), self.pid(c)))
                .collect();
            r.info(format!(
                "pids R={}{kids} Z={} K={}",
                self.p.root, self.z, self.k
            ));
        }
        self.check_own(r);
        self.check_children(r);
        self.check_zombies(r, cmd == Cmd::Check);
        let s = self.pid(Role::S);
        match proc_stat(s) {
            Ok((state, _)) => r.eq(&format!("S (pid {s}) state (/proc/{s}/stat)"), 'T', state),
            Err(e) => r.fail(format!("S (pid {s}): {e}")),
        }
        // The shared file: R's part of the round now, A's when it answers.
        let off = (FILE_AT_SETUP + 2 * FILE_STEP * (n as usize - 1)) as i64;
        self.check_file(r, off);
        let mine = self.p.stream(&[PAT_FILE_R, n], FILE_STEP);
        r.ok(sys::write_all(self.p.file, &mine));
        self.file_data.extend(mine);
        self.check_acks(r, n - 1);
        self.p.shm.word(0).store(n, SeqCst);
        r.ok(sys::write_all(
            self.p.p1.w,
            &self.p.stream(&[PAT_P1_CHUNK, n], P1_CHUNK),
        ));
        r.ok(kill(s, libc::SIGCONT).map_err(|e| format!("R: continuing S: {e}")));
        self.ask_children(r, n, off + FILE_STEP as i64);
        self.file_data
            .extend(self.p.stream(&[PAT_FILE_A, n], FILE_STEP));
        self.check_file(r, off + 2 * FILE_STEP as i64);
        self.check_acks(r, n);
        match cmd {
            Cmd::Verify => {
                let stopped = kill(s, libc::SIGSTOP).and_then(|()| wait_state(s, 'T'));
                r.ok(stopped.map_err(|e| format!("R: stopping S again: {e}")));
            }
            Cmd::Check => self.finish(r),
        }
    }

    fn check_own(&mut self, r: &mut Report) {
        let mut flag: libc::c_int = -1;
        // SAFETY: PR_GET_CHILD_SUBREAPER stores one int into `flag`.
        unsafe { libc::prctl(libc::PR_GET_CHILD_SUBREAPER, &mut flag as *mut i32, 0, 0, 0) };
        r.eq("R: PR_GET_CHILD_SUBREAPER", 1, flag);
        let (_, _, pgid, sid) = ids_now();
        r.eq(
            "R: (getpgrp(), getsid(0))",
            (self.p.pgid, self.p.sid),
            (pgid, sid),
        );
        self.fds.check(r, "R: ");
        let want = self.p.stream(&[PAT_P2], P2_TOTAL);
        check_pipe_data(
            r,
            "R: P2 (pipe from A)",
            self.p.p2.r,
            &want[P2_TOTAL - self.p2_left..],
        );
        self.p2_left = 0;
        self.p.shm.check(r, "R: ", self.p.seed);
    }

    /// R's children are exactly A, B, O1, S, Z, K (Z and K until reaped).
    fn check_children(&self, r: &mut Report) {
        let mut want = vec![(self.z, "Z"), (self.k, "K")];
        want.extend([Role::A, Role::B, Role::O1, Role::S].map(|c| (self.pid(c), c.name())));
        want.sort_unstable();
        let Some(got) = r.ok(children_of(self.p.root)) else {
            return;
        };
        let name = |pid: i32| want.iter().find(|w| w.0 == pid).map_or("?", |w| w.1);
        let got: Vec<String> = got
            .iter()
            .map(|&pid| format!("{}={pid}", name(pid)))
            .collect();
        let want: Vec<String> = want.iter().map(|(pid, n)| format!("{n}={pid}")).collect();
        r.eq("R: children (/proc/self/task/R/children)", want, got);
    }

    /// Z and K: zombies, children of R, with their ends; reaped if `reap`.
    fn check_zombies(&self, r: &mut Report, reap: bool) {
        let z = (self.z, "Z", format!("exited with {Z_STATUS}"));
        let k = (self.k, "K", format!("killed by signal {}", libc::SIGTERM));
        for (pid, name, want) in [z, k] {
            match proc_stat(pid) {
                Ok(st) => r.eq(
                    &format!("{name} (pid {pid}) (state, ppid)"),
                    ('Z', self.p.root),
                    st,
                ),
                Err(e) => r.fail(format!("{name} (pid {pid}): {e}")),
            }
            let mut st = 0;
            let got = if reap {
                // SAFETY: `st` is a valid, writable int.
                match unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } {
                    rc if rc == pid => Ok(describe_status(st)),
                    0 => Err("waitpid(WNOHANG): not waitable".to_string()),
                    _ => Err(sys::os_err("waitpid(WNOHANG)")),
                }
            } else {
                peek_exit(pid, libc::WNOHANG).and_then(|e| e.ok_or("waitid: not waitable".into()))
            };
            match got {
                Ok(got) => r.eq(&format!("{name} (pid {pid}) end"), want, got),
                Err(e) => r.fail(format!("{name} (pid {pid}): {e}")),
            }
        }
    }

    /// The shared file's offset (through the fd and the dup sharing it) and contents.
    fn check_file(&self, r: &mut Report, want_off: i64) {
        let (fd, dup, data) = (self.p.file, self.dup, &self.file_data);
        if let Some(got) = r.ok(sys::lseek(fd, 0, libc::SEEK_CUR)) {
            r.eq("R: shared file offset", want_off, got);
        }
        if let Some(d) = r
            .ok(pread(fd, data.len() + 4096, 0))
            .and_then(|g| diff_bytes(data, &g))
        {
            r.fail(format!("R: shared file contents: {d}"));
        }
        // Move the offset back 10 bytes through the fd, read them through the dup.
        if r.ok(sys::lseek(fd, -10, libc::SEEK_CUR)).is_some() {
            match read_exact(dup, 10, Instant::now() + DATA_TIMEOUT) {
                Ok(got) => r.eq(
                    "R: 10 bytes read through the dup after lseek(fd, -10)",
                    &data[data.len() - 10..],
                    &got[..],
                ),
                Err(e) => r.fail(format!("R: read through the dup: {e}")),
            }
        }
        if let Some(got) = r.ok(sys::lseek(dup, 0, libc::SEEK_CUR)) {
            r.eq("R: shared file offset through the dup", want_off, got);
        }
    }

    /// A's and B's acknowledgements of round `n`.
    fn check_acks(&self, r: &mut Report, n: u64) {
        let shm = self.p.shm;
        r.eq(
            "R: shared memory word 1 (written by A)",
            n + A_ACK,
            shm.word(1).load(SeqCst),
        );
        r.eq(
            "R: shared memory word 2 (written by B)",
            n + B_ACK,
            shm.word(2).load(SeqCst),
        );
    }

    fn ask_children(&self, r: &mut Report, n: u64, off: i64) {
        let line = format!("round {n} offset {off}\n");
        let who = |c: Role| format!("{} (pid {})", c.name(), self.pid(c));
        let mut asked = Vec::new();
        for c in LIVE {
            match sys::write_all(self.p.cmd(c).w, line.as_bytes()) {
                Ok(()) => asked.push(c),
                Err(e) => r.fail(format!("{}: sending the command: {e}", who(c))),
            }
        }
        let deadline = Instant::now() + TIMEOUT;
        for c in asked {
            match read_line(self.p.res(c).r, Some(deadline), &mut 0) {
                Ok(Some(l)) if l == "PASS" => {}
                Ok(Some(l)) => r.fail(format!(
                    "{}: {}",
                    who(c),
                    l.strip_prefix("FAIL ").unwrap_or(&l)
                )),
                Ok(None) => r.fail(format!("{}: no answer: result pipe closed (gone?)", who(c))),
                Err(e) => r.fail(format!("{}: no answer: {e}", who(c))),
            }
        }
    }

    /// `check`: close the command pipes, reap the children, none may be left.
    fn finish(&self, r: &mut Report) {
        LIVE.iter().for_each(|&c| close(self.p.cmd(c).w));
        for c in [Role::A, Role::B, Role::O1, Role::S] {
            let who = format!("{} (pid {})", c.name(), self.pid(c));
            match reap_within(self.pid(c)) {
                Ok(end) => r.eq(
                    &format!("{who} end after its command pipe closed"),
                    "exited with 0",
                    &end,
                ),
                Err(e) => r.fail(format!("{who}: {e}")),
            }
        }
        STOPPED_CHILD.store(0, SeqCst);
        if let Some(left) = r.ok(children_of(self.p.root)) {
            r.eq("R: children left after check", Vec::<i32>::new(), left);
        }
    }
}

fn main() {
    let mut ctx = Ctx::start("wl-tree", &Spec::default());
    let root = build(&mut ctx);
    let mut root = ctx.setup(root);
    ctx.ready();
    loop {
        let cmd = ctx.read_blocking();
        ctx.respond(cmd, |r| root.check(r, cmd));
    }
}

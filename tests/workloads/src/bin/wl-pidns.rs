//! `wl-pidns`: a process tree that is a whole pid namespace. Run it as PID 1 of a fresh one
//! (e.g. `unshare --pid --fork wl-pidns`); set-up fails if it is not PID 1.
//!
//! R (PID 1) forks A (own process group), which forks A1 (in A's group), and then B (leader
//! of a new session), which forks B1. Every fork waits until the child has reported `UP`, so
//! in a fresh namespace they are exactly A=2, A1=3, B=4, B1=5. R makes every pipe before the
//! first fork: a command and a result pipe per child, and a pipe A → A1 through which A sends
//! a data stream (1000 bytes left unread at `READY`, 100 more each round). R keeps a 1 MiB
//! pattern and its round counter in memory, and a file in `$TMPDIR` open at its offset, where
//! it writes a line per round. Nothing reads /proc by PID, so the tree works whichever /proc
//! is mounted.
//!
//! Each check (round n): R checks getpid() == 1, getppid() == 0, its process group and
//! session are the ones it had at start, the pattern, the counter (n-1, then n) and the file
//! (offset, every line so far). Then A, A1, B and B1 in turn get `round n` on their command
//! pipes and answer `PASS` or `FAIL <why>`: each checks getpid, getppid, getpgrp and getsid
//! against the values of the layout above; A then writes its next 100 bytes to A1, and A1
//! reads exactly what is buffered and checks it continues the stream (1000 + 100 n bytes in
//! all). Last, R checks it still is its namespace's init: it forks O, O forks G and exits, and
//! G must see itself reparented to PID 1 (R reaps O and G). Every check prints `INFO wl-pidns: ids R=1 A=2 A1=3 B=4 B1=5 uts=<nodename>
//! proc_self=<readlink /proc/self>` first. `check` then closes the command pipes; A and B
//! reap A1 and B1, every child must exit 0, and R exits.

use std::time::{Duration, Instant};

use stasis_workloads::ipc::{
    close, exit, fork, getppid, keep_only, pipe, pipe_bytes, read_exact, read_line,
};
use stasis_workloads::{pattern, sys, Cmd, Ctx, Report, Spec};

const TIMEOUT: Duration = Duration::from_secs(10);
const BACKLOG: usize = 1000;
const CHUNK: usize = 100;
const MEM_WORDS: usize = 1 << 17;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    A,
    A1,
    B,
    B1,
}

const ROLES: [Role; 4] = [Role::A, Role::A1, Role::B, Role::B1];

impl Role {
    fn name(self) -> &'static str {
        ["A", "A1", "B", "B1"][self as usize]
    }
    /// (pid, ppid, pgid, sid) in a fresh namespace; `rsid` is R's session (0 when it lies
    /// outside the namespace).
    fn ids(self, rsid: i32) -> (i32, i32, i32, i32) {
        match self {
            Role::A => (2, 1, 2, rsid),
            Role::A1 => (3, 2, 2, rsid),
            Role::B => (4, 1, 4, 4),
            Role::B1 => (5, 4, 4, 4),
        }
    }
}

/// Everything fixed before the first fork.
#[derive(Clone, Copy)]
struct Plan {
    seed: u64,
    rsid: i32,
    cmd: [stasis_workloads::ipc::Pipe; 4],
    res: [stasis_workloads::ipc::Pipe; 4],
    stream: stasis_workloads::ipc::Pipe,
}

impl Plan {
    fn stream_bytes(&self, from: usize, len: usize) -> Vec<u8> {
        let k = pattern::key(self.seed, &[77]);
        (from..from + len).map(|i| pattern::byte(k, i)).collect()
    }
}

fn ids_now() -> (i32, i32, i32, i32) {
    // SAFETY: getpgid/getsid of ourselves take no pointers.
    let (pgid, sid) = unsafe { (libc::getpgid(0), libc::getsid(0)) };
    (sys::getpid_raw(), getppid(), pgid, sid)
}

fn write_line(fd: i32, line: &str) -> Result<(), String> {
    sys::write_all(fd, format!("{line}\n").as_bytes())
}

/// A child: sets itself up, reports `UP`, then answers rounds until EOF.
fn run_child(p: &Plan, role: Role) -> ! {
    let me = role as usize;
    let res = p.res[me].w;
    let fail = |msg: String| -> ! {
        let _ = write_line(res, &format!("FAIL {}: {msg}", role.name()));
        exit(1)
    };
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes no pointers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    let setup = match role {
        // SAFETY: setpgid/setsid of ourselves take no pointers.
        Role::A => sys::cvt(unsafe { libc::setpgid(0, 0) }, "setpgid"),
        // SAFETY: as above.
        Role::B => sys::cvt(unsafe { libc::setsid() }, "setsid"),
        _ => Ok(0),
    };
    if let Err(e) = setup {
        fail(e);
    }
    let kid = match role {
        Role::A => Some(Role::A1),
        Role::B => Some(Role::B1),
        _ => None,
    };
    let mut kid_pid = 0;
    if let Some(k) = kid {
        match fork() {
            Ok(0) => run_child(p, k),
            Ok(pid) => kid_pid = pid,
            Err(e) => fail(e),
        }
        // The grandchild is up before we say we are: the PIDs come out in order.
        let mut eintr = 0;
        match read_line(
            p.res[k as usize].r,
            Some(Instant::now() + TIMEOUT),
            &mut eintr,
        ) {
            Ok(Some(l)) if l == format!("UP {}", k.name()) => {}
            other => fail(format!("{} did not come up: {other:?}", k.name())),
        }
    }
    // Only its own ends (and stdio) from here: every other copy would keep a pipe from
    // reporting EOF to the process it belongs to.
    let mut keep = vec![p.cmd[me].r, res];
    match role {
        Role::A => keep.push(p.stream.w),
        Role::A1 => keep.push(p.stream.r),
        _ => {}
    }
    keep_only(&keep);
    let mut sent = BACKLOG;
    let mut got = 0usize;
    if role == Role::A {
        if let Err(e) = sys::write_all(p.stream.w, &p.stream_bytes(0, BACKLOG)) {
            fail(e);
        }
    }
    if let Err(e) = write_line(res, &format!("UP {}", role.name())) {
        fail(e);
    }
    let mut eintr = 0;
    loop {
        let line = match read_line(p.cmd[me].r, None, &mut eintr) {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(e) => fail(e),
        };
        let Some(n) = line
            .strip_prefix("round ")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            fail(format!("unknown command {line:?}"));
        };
        let mut r = Report::new();
        r.eq("(pid, ppid, pgid, sid)", role.ids(p.rsid), ids_now());
        r.eq("interrupted reads", 0, eintr);
        match role {
            Role::A => {
                let chunk = p.stream_bytes(sent, CHUNK);
                r.ok(sys::write_all(p.stream.w, &chunk));
                sent += CHUNK;
            }
            Role::A1 => {
                let want = BACKLOG + CHUNK * n - got;
                if let Some(buffered) = r.ok(pipe_bytes(p.stream.r)) {
                    r.eq("bytes buffered from A", want, buffered);
                }
                let deadline = Instant::now() + TIMEOUT;
                if let Some(data) = r.ok(read_exact(p.stream.r, want, deadline)) {
                    r.ensure(data == p.stream_bytes(got, want), || {
                        format!("the {want} bytes from A at {got} differ from the stream")
                    });
                }
                got += want;
            }
            _ => {}
        }
        let answer = if r.passed() {
            format!("PASS {}", role.name())
        } else {
            format!("FAIL {}: {}", role.name(), r.fail_text())
        };
        if let Err(e) = write_line(res, &answer) {
            fail(e);
        }
    }
    let mut code = 0;
    if kid_pid != 0 {
        let mut status = 0;
        // SAFETY: waits for our own child with a local status.
        let rc = unsafe { libc::waitpid(kid_pid, &mut status, 0) };
        if rc != kid_pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            code = 1;
        }
    }
    exit(code)
}

struct Root {
    plan: Plan,
    mem: Vec<u64>,
    round: u64,
    file: i32,
    path: std::path::PathBuf,
    lines: Vec<u8>,
    rpgid: i32,
    kids: [i32; 2],
}

impl Root {
    fn check(&mut self, r: &mut Report, round: u64) {
        let ids = ids_now();
        r.eq("R (pid, ppid)", (1, 0), (ids.0, ids.1));
        r.eq(
            "R (pgid, sid)",
            (self.rpgid, self.plan.rsid),
            (ids.2, ids.3),
        );
        let k = pattern::key(self.plan.seed, &[1]);
        if let Some((i, e, g)) = pattern::first_mismatch(&self.mem, k) {
            r.fail(format!("memory word {i}: expected {e:#x}, got {g:#x}"));
        }
        r.eq("round counter", round - 1, self.round);
        self.round = round;
        match sys::lseek(self.file, 0, libc::SEEK_CUR) {
            Ok(off) => r.eq("file offset", self.lines.len() as i64, off),
            Err(e) => r.fail(e),
        }
        let line = format!("round {round}\n");
        r.ok(sys::write_all(self.file, line.as_bytes()));
        self.lines.extend_from_slice(line.as_bytes());
        match std::fs::read(&self.path) {
            Ok(data) => r.ensure(data == self.lines, || {
                format!("file holds {:?}", String::from_utf8_lossy(&data))
            }),
            Err(e) => r.fail(format!("read {}: {e}", self.path.display())),
        }
        let (uts, proc_self) = (nodename(), std::fs::read_link("/proc/self"));
        r.info(format!(
            "ids R={} A=2 A1=3 B=4 B1=5 uts={uts} proc_self={}",
            ids.0,
            proc_self.map_or_else(|e| format!("({e})"), |p| p.display().to_string())
        ));
        for role in ROLES {
            let i = role as usize;
            let mut eintr = 0;
            let asked = write_line(self.plan.cmd[i].w, &format!("round {round}"));
            let answer = asked.and_then(|_| {
                read_line(
                    self.plan.res[i].r,
                    Some(Instant::now() + TIMEOUT),
                    &mut eintr,
                )
            });
            match answer {
                Ok(Some(l)) if l == format!("PASS {}", role.name()) => {}
                Ok(Some(l)) => r.fail(l),
                Ok(None) => r.fail(format!("{} closed its result pipe", role.name())),
                Err(e) => r.fail(format!("{}: {e}", role.name())),
            }
        }
        self.check_orphan(r);
    }

    /// An orphan made now is reparented to R, the namespace's init (and reaped by it).
    fn check_orphan(&self, r: &mut Report) {
        let Some(p) = r.ok(pipe()) else { return };
        match fork() {
            Ok(0) => {
                close(p.r);
                match fork() {
                    Ok(0) => {
                        let deadline = Instant::now() + TIMEOUT;
                        while getppid() != 1 && Instant::now() < deadline {
                            let _ = sys::nanosleep_ms(1);
                        }
                        let me = sys::getpid_raw();
                        let _ = write_line(p.w, &format!("{me} {}", getppid()));
                        exit(0)
                    }
                    Ok(_) => exit(0),
                    Err(_) => exit(1),
                }
            }
            Ok(o) => {
                close(p.w);
                let mut status = 0;
                // SAFETY: waits for our own child with a local status.
                unsafe { libc::waitpid(o, &mut status, 0) };
                let mut eintr = 0;
                let line = read_line(p.r, Some(Instant::now() + TIMEOUT), &mut eintr);
                close(p.r);
                let Some(Some(line)) = r.ok(line) else {
                    r.fail("the orphan never reported".to_string());
                    return;
                };
                let ids: Vec<i32> = line.split(' ').filter_map(|x| x.parse().ok()).collect();
                let [g, ppid] = ids[..] else {
                    r.fail(format!("the orphan said {line:?}"));
                    return;
                };
                r.eq("parent of an orphan (reparented to init)", 1, ppid);
                // SAFETY: as above; G is our child now.
                let rc = unsafe { libc::waitpid(g, &mut status, 0) };
                r.eq("orphan reaped by init", g, rc);
            }
            Err(e) => {
                close(p.r);
                close(p.w);
                r.fail(e);
            }
        }
    }

    /// Closes the command pipes and reaps A and B (which reap A1 and B1).
    fn finish(&mut self, r: &mut Report) {
        for c in self.plan.cmd {
            close(c.w);
        }
        for (pid, name) in self.kids.into_iter().zip(["A", "B"]) {
            let mut status = 0;
            // SAFETY: waits for our own child with a local status.
            let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
            let ok = rc == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
            r.ensure(ok, || {
                format!("{name} (pid {pid}) ended with status {status:#x}")
            });
        }
    }
}

fn nodename() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "?".into();
    }
    let bytes: Vec<u8> = u
        .nodename
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn main() {
    let mut ctx = Ctx::start("wl-pidns", &Spec::default());
    if sys::getpid_raw() != 1 {
        ctx.fail_exit(&format!(
            "setup: must run as PID 1 of a pid namespace, runs as {}",
            sys::getpid_raw()
        ));
    }
    let ids = ids_now();
    let mut pipes = Vec::new();
    for _ in 0..9 {
        let p = pipe();
        pipes.push(ctx.setup(p));
    }
    let plan = Plan {
        seed: ctx.seed,
        rsid: ids.3,
        cmd: [pipes[0], pipes[1], pipes[2], pipes[3]],
        res: [pipes[4], pipes[5], pipes[6], pipes[7]],
        stream: pipes[8],
    };
    let mut mem = vec![0u64; MEM_WORDS];
    pattern::fill(&mut mem, pattern::key(ctx.seed, &[1]));
    let path = sys::tmp_dir().join(format!("stasis-wl-pidns-{}.dat", ctx.tag));
    let c = sys::cpath(&path);
    let c = ctx.setup(c);
    // SAFETY: c is a valid C string.
    let file = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
            0o600,
        )
    };
    let file = sys::cvt(file, "open data file");
    let file = ctx.setup(file);
    ctx.remove_at_exit(path.clone());
    let mut kids = [0; 2];
    for (k, role) in [Role::A, Role::B].into_iter().enumerate() {
        match fork() {
            Ok(0) => run_child(&plan, role),
            Ok(pid) => kids[k] = pid,
            Err(e) => ctx.fail_exit(&format!("setup: {e}")),
        }
        let mut eintr = 0;
        let up = read_line(
            plan.res[role as usize].r,
            Some(Instant::now() + TIMEOUT),
            &mut eintr,
        );
        match up {
            Ok(Some(l)) if l == format!("UP {}", role.name()) => {}
            other => ctx.fail_exit(&format!(
                "setup: {} did not come up: {other:?}",
                role.name()
            )),
        }
    }
    // R keeps only what it uses: the ends it talks through.
    for i in 0..4 {
        close(plan.cmd[i].r);
        close(plan.res[i].w);
    }
    close(plan.stream.r);
    close(plan.stream.w);
    let mut root = Root {
        plan,
        mem,
        round: 0,
        file,
        path,
        lines: Vec::new(),
        rpgid: ids.2,
        kids,
    };
    ctx.ready();
    let mut round = 0;
    loop {
        let cmd = ctx.read_blocking();
        round += 1;
        ctx.respond(cmd, |r| {
            root.check(r, round);
            if cmd == Cmd::Check {
                root.finish(r);
            }
        });
    }
}

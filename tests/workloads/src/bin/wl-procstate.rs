//! `wl-procstate`: process attributes of a small tree, checked by the root.
//!
//! Set up, then checked after restore:
//! - the audit login uid (set to 4242 through /proc/self/loginuid, when the kernel lets it
//!   be set; an INFO line says so otherwise);
//! - child I with four different ids in each set: real/effective/saved/fs uid 2001/2002/
//!   2003/2001, gid 1001/1002/1003/1001, groups 1005 and 1006; it answers on a pipe what
//!   getresuid, getresgid, setfsuid(-1), setfsgid(-1), getgroups and /proc/self/status say;
//! - zombies: Z1 in a process group of its own, Z2 in live child G's group, Z3 leading a
//!   session of its own, each with its exit status (checked with waitid(WNOWAIT));
//! - child T stopped by SIGTSTP (its own group, so the group is not orphaned): its
//!   stop, as waitid(WSTOPPED|WNOWAIT) reports it, is still by SIGTSTP.
//!
//! `check` ends the tree (children killed and reaped).

use stasis_workloads::{sys, Cmd, Ctx, Report, Spec};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};

const LOGINUID: u32 = 4242;
const UIDS: [u32; 4] = [2001, 2002, 2003, 2001];
const GIDS: [u32; 4] = [1001, 1002, 1003, 1001];
const GROUPS: [u32; 2] = [1005, 1006];

struct Child {
    pid: i32,
    cmd: std::fs::File,
    answer: BufReader<std::fs::File>,
}

struct State {
    loginuid: bool,
    ids: Child,
    g: i32,
    /// (pid, exit code, expected pgid, expected sid) of each zombie.
    zombies: Vec<(i32, i32, i32, i32)>,
    t: i32,
    sid: i32,
}

fn pipe() -> Result<(std::fs::File, std::fs::File), String> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    sys::cvt(rc, "pipe2")?;
    // SAFETY: both fds were just created and are owned by the Files from now on.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// (state, pgrp, session) from /proc/PID/stat.
fn stat(pid: i32) -> Result<(char, i32, i32), String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("bad /proc/{pid}/stat"))
    };
    let state = f.first().and_then(|s| s.chars().next()).unwrap_or('?');
    Ok((state, num(2)?, num(3)?))
}

/// What the ids child sees of its own credentials; empty if all is as set up.
fn own_ids() -> String {
    let mut r = Report::new();
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: valid out pointers.
    unsafe { libc::getresuid(&mut a, &mut b, &mut c) };
    // SAFETY: -1 is no valid id: setfsuid only reports the current fs uid.
    let fs = unsafe { libc::setfsuid(u32::MAX) } as u32;
    r.eq("uids (real, effective, saved, fs)", UIDS, [a, b, c, fs]);
    // SAFETY: as above.
    unsafe { libc::getresgid(&mut a, &mut b, &mut c) };
    // SAFETY: as above.
    let fs = unsafe { libc::setfsgid(u32::MAX) } as u32;
    r.eq("gids (real, effective, saved, fs)", GIDS, [a, b, c, fs]);
    let mut groups = [0u32; 8];
    // SAFETY: groups holds 8 entries.
    let n = unsafe { libc::getgroups(8, groups.as_mut_ptr()) };
    r.eq(
        "groups",
        &GROUPS[..],
        groups.get(..n.max(0) as usize).unwrap_or(&[]),
    );
    if let Ok(text) = std::fs::read_to_string("/proc/self/status") {
        let line = |k: &str| {
            text.lines()
                .find(|l| l.starts_with(k))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
        };
        let join = |v: [u32; 4]| v.map(|x| x.to_string()).join(" ");
        r.eq("/proc/self/status Uid", Some(join(UIDS)), line("Uid:"));
        r.eq("/proc/self/status Gid", Some(join(GIDS)), line("Gid:"));
    }
    if r.passed() {
        String::new()
    } else {
        r.fail_text()
    }
}

/// PR_SET_PDEATHSIG(SIGKILL): a child never outlives the root (a failed test leaves none).
fn die_with_parent() {
    // SAFETY: prctl without pointers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
}

fn ids_child_main(cmd: std::fs::File, mut answer: std::fs::File) -> i32 {
    // SAFETY: plain id-changing calls on this process; their results are checked.
    let ok = unsafe {
        libc::setgroups(GROUPS.len(), GROUPS.as_ptr()) == 0
            && libc::setresgid(GIDS[0], GIDS[1], GIDS[2]) == 0
            && libc::setresuid(UIDS[0], UIDS[1], UIDS[2]) == 0
    };
    // Unprivileged now: the fs ids may only become one of the other ids.
    // SAFETY: as above.
    unsafe {
        libc::setfsgid(GIDS[3]);
        libc::setfsuid(UIDS[3]);
    }
    // After the ids (changing them clears it): dies with the root, also after a failure.
    die_with_parent();
    let first = if ok {
        own_ids()
    } else {
        sys::os_err("setting ids")
    };
    let _ = writeln!(answer, "{}", if first.is_empty() { "UP" } else { &first });
    let mut cmd = BufReader::new(cmd);
    let mut line = String::new();
    loop {
        line.clear();
        if cmd.read_line(&mut line).map_or(true, |n| n == 0) {
            return 0;
        }
        let got = own_ids();
        let _ = writeln!(answer, "{}", if got.is_empty() { "OK" } else { &got });
    }
}

fn setup() -> Result<State, String> {
    let loginuid = std::fs::write("/proc/self/loginuid", LOGINUID.to_string()).is_ok();
    // SAFETY: getsid(0) takes no pointers.
    let sid = unsafe { libc::getsid(0) };
    let (cmd_r, cmd_w) = pipe()?;
    let (ans_r, ans_w) = pipe()?;
    let parent_ends = [cmd_w.as_raw_fd(), ans_r.as_raw_fd()];
    let ids = sys::fork_run(move || {
        for fd in parent_ends {
            // SAFETY: the child's copies of the parent's pipe ends, which it does not use.
            unsafe { libc::close(fd) };
        }
        ids_child_main(cmd_r, ans_w)
    })?;
    let mut answer = BufReader::new(ans_r);
    let mut line = String::new();
    answer
        .read_line(&mut line)
        .map_err(|e| format!("reading the ids child: {e}"))?;
    if line.trim() != "UP" {
        return Err(format!("ids child: {}", line.trim()));
    }
    let own_group = || {
        // SAFETY: setpgid on this process.
        unsafe { libc::setpgid(0, 0) };
    };
    let block = || -> i32 {
        die_with_parent();
        loop {
            // SAFETY: pause takes no arguments.
            unsafe { libc::pause() };
        }
    };
    let g = sys::fork_run(|| {
        own_group();
        block()
    })?;
    // SAFETY: setpgid of our own child.
    unsafe { libc::setpgid(g, g) };
    let z1 = sys::fork_run(|| {
        own_group();
        3
    })?;
    let z2 = sys::fork_run(|| {
        // SAFETY: joins G's group, which exists (set above by the parent too).
        unsafe { libc::setpgid(0, g) };
        4
    })?;
    let z3 = sys::fork_run(|| {
        // SAFETY: setsid takes no arguments.
        unsafe { libc::setsid() };
        5
    })?;
    let t = sys::fork_run(|| {
        own_group();
        block()
    })?;
    // SAFETY: setpgid of our own child, then a signal to it.
    unsafe {
        libc::setpgid(t, t);
        libc::kill(t, libc::SIGTSTP);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for (p, want) in [(t, 'T'), (z1, 'Z'), (z2, 'Z'), (z3, 'Z')] {
        while stat(p)?.0 != want {
            if std::time::Instant::now() > deadline {
                return Err(format!("child {p} never reached state {want}"));
            }
            sys::nanosleep_ms(2)?;
        }
    }
    Ok(State {
        loginuid,
        ids: Child {
            pid: ids,
            cmd: cmd_w,
            answer,
        },
        g,
        zombies: vec![(z1, 3, z1, sid), (z2, 4, g, sid), (z3, 5, z3, z3)],
        t,
        sid,
    })
}

/// waitid(P_PID, pid, what | WNOHANG | WNOWAIT): (si_code, si_status), or None.
fn peek_wait(pid: i32, what: i32) -> Result<Option<(i32, i32)>, String> {
    // SAFETY: siginfo_t is plain data for the kernel to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: info is valid for the call.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            what | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        return Err(sys::os_err(&format!("waitid({pid})")));
    }
    // SAFETY: the kernel filled info (si_pid 0 if nothing was waitable).
    let (p, status) = unsafe { (info.si_pid(), info.si_status()) };
    Ok((p == pid).then_some((info.si_code, status)))
}

fn check(s: &mut State, r: &mut Report) {
    if s.loginuid {
        let got = std::fs::read_to_string("/proc/self/loginuid").unwrap_or_default();
        r.eq(
            "audit loginuid",
            LOGINUID.to_string(),
            got.trim().to_string(),
        );
    } else {
        r.info("the audit loginuid cannot be set here: not checked");
    }
    let mut line = String::new();
    match writeln!(s.ids.cmd, "ids").and_then(|_| s.ids.answer.read_line(&mut line)) {
        Ok(n) if n > 0 => r.ensure(line.trim() == "OK", || {
            format!("ids child {}: {}", s.ids.pid, line.trim())
        }),
        Ok(_) => r.fail(format!("ids child {} closed its pipe", s.ids.pid)),
        Err(e) => r.fail(format!("asking ids child {}: {e}", s.ids.pid)),
    }
    for &(z, code, pgid, sid) in &s.zombies {
        match stat(z) {
            Ok((state, pg, sd)) => {
                r.eq(&format!("zombie {z} state"), 'Z', state);
                r.eq(&format!("zombie {z} process group"), pgid, pg);
                r.eq(&format!("zombie {z} session"), sid, sd);
            }
            Err(e) => r.fail(e),
        }
        match peek_wait(z, libc::WEXITED) {
            Ok(got) => r.eq(
                &format!("zombie {z} wait (code, status)"),
                Some((libc::CLD_EXITED, code)),
                got,
            ),
            Err(e) => r.fail(e),
        }
    }
    if let Ok((_, g_pgid, g_sid)) = stat(s.g) {
        r.eq("G leads its group", s.g, g_pgid);
        r.eq("G's session", s.sid, g_sid);
    }
    match stat(s.t) {
        Ok((state, pg, _)) => {
            r.eq("stopped child T state", 'T', state);
            r.eq("stopped child T process group", s.t, pg);
        }
        Err(e) => r.fail(e),
    }
    match peek_wait(s.t, libc::WSTOPPED) {
        Ok(got) => r.eq(
            "stopped child T: waitid(WSTOPPED) (code, signal)",
            Some((libc::CLD_STOPPED, libc::SIGTSTP)),
            got,
        ),
        Err(e) => r.fail(e),
    }
}

fn end_tree(s: &State) {
    let mut all = vec![s.ids.pid, s.g, s.t];
    all.extend(s.zombies.iter().map(|z| z.0));
    for &p in &all {
        // SAFETY: our own children.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    for &p in &all {
        let mut st = 0;
        // SAFETY: st is a valid c_int.
        unsafe { libc::waitpid(p, &mut st, 0) };
    }
}

fn main() {
    let mut ctx = Ctx::start("wl-procstate", &Spec::default());
    let r = setup();
    let mut state = ctx.setup(r);
    ctx.ready();
    loop {
        let cmd = ctx.read_blocking();
        ctx.respond(cmd, |r| {
            check(&mut state, r);
            if cmd == Cmd::Check {
                end_tree(&state);
            }
        });
    }
}

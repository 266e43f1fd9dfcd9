//! `wl-seccomp`: seccomp filters that must behave the same after checkpoint and restore.
//!
//! The main thread installs two classic BPF filters (no_new_privs set first): the oldest
//! makes prctl fail with EOPNOTSUPP, the second (SECCOMP_FILTER_FLAG_LOG) makes uname fail
//! with EACCES. `--threads N` starts N threads before that; with `--tsync` the filters are
//! installed with SECCOMP_FILTER_FLAG_TSYNC (every thread gets them), without it only the
//! main thread has them. `--child` forks a child after the filters (it inherits them).
//! `--strict` forks a child that enters seccomp strict mode and then only reads and writes
//! its pipes (one byte asked, one answered; any other syscall would kill it).
//!
//! Checks, in every thread and the child (each asked in turn): prctl and uname fail with
//! exactly those errnos where the filters apply and work where they do not, getpid works,
//! and /proc/thread-self/status shows the same `Seccomp:` and `Seccomp_filters:`; the strict
//! child answers and its status shows `Seccomp: 1`.

use std::sync::mpsc;

use stasis_workloads::peer::{answer, fork_peer};
use stasis_workloads::{sys, Ctx, Report, Spec};

const PRCTL_ERRNO: i32 = libc::EOPNOTSUPP;
const UNAME_ERRNO: i32 = libc::EACCES;
const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
const FLAG_TSYNC: libc::c_ulong = 1;
const FLAG_LOG: libc::c_ulong = 2;

/// A filter returning `errno` for syscall `nr` and allowing everything else.
fn filter(nr: i64, errno: i32) -> Vec<libc::sock_filter> {
    let ins = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    vec![
        ins((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, 0, 0, 0),
        ins(
            (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            0,
            1,
            nr as u32,
        ),
        ins(
            (libc::BPF_RET | libc::BPF_K) as u16,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | errno as u32,
        ),
        ins(
            (libc::BPF_RET | libc::BPF_K) as u16,
            0,
            0,
            libc::SECCOMP_RET_ALLOW,
        ),
    ]
}

fn install(prog: &mut [libc::sock_filter], flags: libc::c_ulong) -> Result<(), String> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: fprog points to a valid program that lives across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    match rc {
        0 => Ok(()),
        rc if rc > 0 => Err(format!("seccomp TSYNC failed for thread {rc}")),
        _ => Err(sys::os_err("seccomp(SECCOMP_SET_MODE_FILTER)")),
    }
}

/// (mode, filters) of this thread from /proc/thread-self/status.
fn status_mode() -> (String, String) {
    let text = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    };
    (field("Seccomp:"), field("Seccomp_filters:"))
}

/// Checks this thread: filtered (`filtered`) or not; returns what differs.
fn check_here(filtered: bool) -> Vec<String> {
    let mut bad = Vec::new();
    // SAFETY: prctl(PR_GET_DUMPABLE) takes no pointers.
    let rc = unsafe { libc::prctl(libc::PR_GET_DUMPABLE) };
    let e = sys::errno();
    match (filtered, rc) {
        (true, -1) if e == PRCTL_ERRNO => {}
        (false, 0 | 1) => {}
        _ => bad.push(format!(
            "prctl(PR_GET_DUMPABLE) = {rc} (errno {e}), filtered {filtered}"
        )),
    }
    // SAFETY: uts is a valid utsname to fill.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::uname(&mut uts) };
    let e = sys::errno();
    match (filtered, rc) {
        (true, -1) if e == UNAME_ERRNO => {}
        (false, 0) => {}
        _ => bad.push(format!("uname = {rc} (errno {e}), filtered {filtered}")),
    }
    if sys::getpid_raw() <= 0 {
        bad.push("getpid failed".into());
    }
    let want = if filtered { ("2", "2") } else { ("0", "0") };
    let (mode, n) = status_mode();
    if (mode.as_str(), n.as_str()) != want {
        bad.push(format!(
            "status Seccomp {mode} Seccomp_filters {n}, expected {} {}",
            want.0, want.1
        ));
    }
    bad
}

fn main() {
    let mut ctx = Ctx::start(
        "wl-seccomp",
        &Spec {
            flags: &["--tsync", "--child", "--strict"],
            values: &["--threads"],
        },
    );
    let nthreads = ctx.args.num("--threads", 0);
    let nthreads = ctx.setup(nthreads) as usize;
    let tsync = ctx.args.flag("--tsync");
    // The strict child first: a fork before any filter, so only strict mode applies to it.
    let strict = ctx.args.flag("--strict").then(|| {
        fork_peer(&mut ctx, |cmd, res| {
            // SAFETY: prctl takes no pointers; afterwards only read, write and exit are
            // allowed, and only those are used (raw syscalls, no allocation).
            unsafe {
                if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_STRICT) != 0 {
                    libc::syscall(libc::SYS_exit, 3);
                }
                let mut b = [0u8; 1];
                while libc::syscall(libc::SYS_read, cmd, b.as_mut_ptr(), 1) == 1 {
                    libc::syscall(libc::SYS_write, res, b"1".as_ptr(), 1);
                }
                libc::syscall(libc::SYS_exit, 0);
            }
        })
    });
    let mut threads = Vec::new();
    for _ in 0..nthreads {
        let (ask_tx, ask_rx) = mpsc::channel::<bool>();
        let (ans_tx, ans_rx) = mpsc::channel::<Vec<String>>();
        std::thread::spawn(move || {
            while let Ok(filtered) = ask_rx.recv() {
                if ans_tx.send(check_here(filtered)).is_err() {
                    break;
                }
            }
        });
        threads.push((ask_tx, ans_rx));
    }
    ctx.threads += nthreads as u64;
    // SAFETY: prctl takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        let e = sys::os_err("PR_SET_NO_NEW_PRIVS");
        ctx.fail_exit(&format!("setup: {e}"));
    }
    let sync = if tsync { FLAG_TSYNC } else { 0 };
    let r = install(&mut filter(libc::SYS_prctl, PRCTL_ERRNO), sync)
        .and_then(|()| install(&mut filter(libc::SYS_uname, UNAME_ERRNO), sync | FLAG_LOG));
    if let Err(e) = r {
        ctx.fail_exit(&format!("setup: {e}"));
    }
    let child = ctx.args.flag("--child").then(|| {
        fork_peer(&mut ctx, |cmd, res| {
            let mut b = [0u8; 1];
            // SAFETY: reads one byte from our command pipe.
            while unsafe { libc::read(cmd, b.as_mut_ptr().cast(), 1) } == 1 {
                let _ = sys::write_all(res, answer(&check_here(true)).as_bytes());
            }
        })
    });
    ctx.ready();
    ctx.serve_blocking(|r: &mut Report| {
        for e in check_here(true) {
            r.fail(format!("main thread: {e}"));
        }
        for (i, (ask, ans)) in threads.iter().enumerate() {
            let got = ask
                .send(tsync)
                .map_err(|e| e.to_string())
                .and_then(|()| ans.recv().map_err(|e| e.to_string()));
            match got {
                Ok(bad) => bad
                    .into_iter()
                    .for_each(|e| r.fail(format!("thread {i}: {e}"))),
                Err(e) => r.fail(format!("thread {i}: {e}")),
            }
        }
        if let Some(c) = &child {
            if let Err(e) = c.ask() {
                r.fail(format!("child (pid {}): {e}", c.pid));
            }
        }
        if let Some(s) = &strict {
            if let Err(e) = s.ask() {
                r.fail(format!("strict child (pid {}): {e}", s.pid));
            }
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", s.pid)).unwrap_or_default();
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(str::trim)
                .unwrap_or("?");
            r.eq("strict child's Seccomp", "1", mode);
        }
    });
}

//! `wl-events`: eventfds, timerfds, a signalfd and an epoll set watching them.
//!
//! Set-up: eventfd A (`EFD_NONBLOCK`, counter 5); eventfd B (`EFD_SEMAPHORE|EFD_CLOEXEC`,
//! counter 3); timerfd T1 (`CLOCK_MONOTONIC`, `TFD_NONBLOCK`, 30 s then every 2 s); timerfd
//! T2 (`CLOCK_REALTIME`, a 1 ms one-shot that has fired: one tick unread); SIGUSR1 blocked,
//! a signalfd S (`SFD_NONBLOCK`) for it, and one SIGUSR1 pending; a pipe holding 10 bytes;
//! an epoll set E watching A (data 0xdeadbeef00000001), the pipe's read end (data 7), T1
//! (data 9) and S (data 0x5f), all `EPOLLIN`; an inotify fd I watching directory D2 for
//! `IN_DELETE` (wd 2) and D3 for `IN_CREATE` (wd 3; wd 1, on D1, was removed).
//!
//! Checks (repeatable: what a check consumes it puts back): `epoll_wait(E, 0)` reports
//! exactly A, the pipe and S as readable with their data (breaks if watches, data or the
//! readiness behind them are lost); E's fdinfo lists exactly the four watched fds; A reads
//! 5 and keeps `O_NONBLOCK`; B reads 1 (semaphore mode) and keeps `FD_CLOEXEC`; T1 has
//! 0 < remaining <= 30 s and a 2 s interval on `CLOCK_MONOTONIC`; T2 reads exactly 1 tick;
//! S reads one SIGUSR1; the pipe still holds 10 bytes; I's fdinfo lists wds 2 and 3 only, a
//! file created in D3 is reported with wd 3 and its name, and one created and deleted in D2
//! with wd 2 and `IN_DELETE` (breaks if watches or their wds are not restored).

use stasis_workloads::{sys, Ctx, Report, Spec};

const DATA_A: u64 = 0xdead_beef_0000_0001;
const DATA_PIPE: u64 = 7;
const DATA_T1: u64 = 9;
const DATA_S: u64 = 0x5f;

struct Fds {
    inotify: i32,
    dirs: [std::path::PathBuf; 3],
    a: i32,
    b: i32,
    t1: i32,
    t2: i32,
    s: i32,
    prd: i32,
    ep: i32,
}

fn cvt(r: i32, what: &str) -> Result<i32, String> {
    sys::cvt(r, what)
}

fn write_u64(fd: i32, v: u64, what: &str) -> Result<(), String> {
    sys::write_all(fd, &v.to_ne_bytes()).map_err(|e| format!("{what}: {e}"))
}

fn read_u64(fd: i32, what: &str) -> Result<u64, String> {
    let mut b = [0u8; 8];
    // SAFETY: reads 8 bytes into a local buffer.
    let n = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 8) };
    if n != 8 {
        return Err(sys::os_err(&format!("read {what}")));
    }
    Ok(u64::from_ne_bytes(b))
}

fn arm_t2(t2: i32) -> Result<(), String> {
    let its = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        },
    };
    // SAFETY: its is a valid itimerspec.
    let rc = unsafe { libc::timerfd_settime(t2, 0, &its, std::ptr::null_mut()) };
    cvt(rc, "timerfd_settime T2")?;
    let mut p = libc::pollfd {
        fd: t2,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack.
    if unsafe { libc::poll(&mut p, 1, 2000) } != 1 {
        return Err("T2 did not fire".into());
    }
    Ok(())
}

fn raise_usr1() -> Result<(), String> {
    // SAFETY: raise takes no pointers; SIGUSR1 is blocked, so it stays pending.
    let rc = unsafe { libc::raise(libc::SIGUSR1) };
    cvt(rc, "raise(SIGUSR1)").map(drop)
}

/// Makes D1..D3 and the inotify fd (wd 1 on D1 is removed again, leaving wds 2 and 3).
fn setup_inotify(ctx: &mut Ctx) -> Result<(i32, [std::path::PathBuf; 3]), String> {
    let base = sys::tmp_dir().join(format!("wl-events-{}", sys::getpid_raw()));
    let dirs = [base.join("d1"), base.join("d2"), base.join("d3")];
    for d in &dirs {
        std::fs::create_dir_all(d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
        ctx.remove_at_exit(d.clone());
    }
    ctx.remove_at_exit(base);
    // SAFETY: inotify_init1 takes no pointers.
    let fd = cvt(
        unsafe { libc::inotify_init1(libc::IN_NONBLOCK) },
        "inotify_init1",
    )?;
    for (d, mask) in dirs
        .iter()
        .zip([libc::IN_CREATE, libc::IN_DELETE, libc::IN_CREATE])
    {
        let c = sys::cpath(d)?;
        // SAFETY: c is a valid C string.
        let rc = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), mask) };
        cvt(rc, "inotify_add_watch")?;
    }
    // SAFETY: removes watch 1.
    let rc = unsafe { libc::inotify_rm_watch(fd, 1) };
    cvt(rc, "inotify_rm_watch")?;
    // Drain the IN_IGNORED event the removal queued.
    let mut buf = [0u8; 4096];
    // SAFETY: reads into a local buffer.
    unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    Ok((fd, dirs))
}

/// (wd, mask, name) of the queued inotify events.
fn inotify_events(fd: i32) -> Vec<(i32, u32, String)> {
    let mut buf = [0u8; 4096];
    // SAFETY: reads into a local buffer.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    let mut out = Vec::new();
    let mut at = 0usize;
    while n > 0 && at + 16 <= n as usize {
        let word = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let (wd, mask, len) = (word(at) as i32, word(at + 4), word(at + 12) as usize);
        let name = &buf[at + 16..(at + 16 + len).min(n as usize)];
        let name = String::from_utf8_lossy(name)
            .trim_end_matches('\0')
            .to_string();
        out.push((wd, mask, name));
        at += 16 + len;
    }
    out
}

fn check_inotify(f: &Fds, r: &mut Report, round: u64) {
    if let Some(text) = r.ok(
        std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.inotify))
            .map_err(|e| format!("I's fdinfo: {e}")),
    ) {
        let mut wds: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("inotify wd:"))
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        wds.sort();
        r.eq("inotify wds", vec!["2".to_string(), "3".to_string()], wds);
    }
    let name = format!("f{round}");
    let made = f.dirs[2].join(&name);
    let gone = f.dirs[1].join(&name);
    let io = std::fs::write(&made, b"x")
        .and_then(|()| std::fs::write(&gone, b"x"))
        .and_then(|()| std::fs::remove_file(&gone))
        .and_then(|()| std::fs::remove_file(&made));
    if let Err(e) = io {
        r.fail(format!("files in the watched directories: {e}"));
        return;
    }
    let got = inotify_events(f.inotify);
    let want = vec![
        (3, libc::IN_CREATE, name.clone()),
        (2, libc::IN_DELETE, name.clone()),
    ];
    r.eq("inotify events (wd, mask, name)", want, got);
}

fn setup() -> Result<Fds, String> {
    // SAFETY: plain syscalls on local data throughout.
    unsafe {
        let a = cvt(libc::eventfd(0, libc::EFD_NONBLOCK), "eventfd A")?;
        write_u64(a, 5, "eventfd A")?;
        let b = cvt(
            libc::eventfd(0, libc::EFD_SEMAPHORE | libc::EFD_CLOEXEC),
            "eventfd B",
        )?;
        write_u64(b, 3, "eventfd B")?;
        let t1 = cvt(
            libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK),
            "timerfd T1",
        )?;
        let its = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 2,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: 30,
                tv_nsec: 0,
            },
        };
        cvt(
            libc::timerfd_settime(t1, 0, &its, std::ptr::null_mut()),
            "timerfd_settime T1",
        )?;
        let t2 = cvt(libc::timerfd_create(libc::CLOCK_REALTIME, 0), "timerfd T2")?;
        arm_t2(t2)?;
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        cvt(
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
            "sigprocmask",
        )?;
        let s = cvt(libc::signalfd(-1, &set, libc::SFD_NONBLOCK), "signalfd")?;
        raise_usr1()?;
        let mut p = [0i32; 2];
        cvt(libc::pipe(p.as_mut_ptr()), "pipe")?;
        sys::write_all(p[1], b"0123456789")?;
        let ep = cvt(libc::epoll_create1(0), "epoll_create1")?;
        for (fd, data) in [(a, DATA_A), (p[0], DATA_PIPE), (t1, DATA_T1), (s, DATA_S)] {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: data,
            };
            cvt(
                libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev),
                "epoll_ctl",
            )?;
        }
        Ok(Fds {
            inotify: -1,
            dirs: Default::default(),
            a,
            b,
            t1,
            t2,
            s,
            prd: p[0],
            ep,
        })
    }
}

fn check(f: &Fds, r: &mut Report, round: u64) {
    check_inotify(f, r, round);
    // SAFETY: plain syscalls on this process's own fds and local buffers throughout.
    unsafe {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let n = libc::epoll_wait(f.ep, evs.as_mut_ptr(), 8, 0);
        let mut got: Vec<(u64, u32)> = evs
            .iter()
            .take(n.max(0) as usize)
            .map(|e| (e.u64, e.events))
            .collect();
        got.sort_unstable();
        let want = vec![
            (DATA_PIPE, libc::EPOLLIN as u32),
            (DATA_S, libc::EPOLLIN as u32),
            (DATA_A, libc::EPOLLIN as u32),
        ];
        r.eq("epoll_wait(E): (data, events) ready", want, got);
        if let Some(text) = r.ok(
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.ep))
                .map_err(|e| format!("E's fdinfo: {e}")),
        ) {
            let mut tfds: Vec<i32> = text
                .lines()
                .filter_map(|l| l.strip_prefix("tfd:"))
                .filter_map(|l| l.split_whitespace().next()?.parse().ok())
                .collect();
            tfds.sort_unstable();
            let mut want = vec![f.a, f.prd, f.t1, f.s];
            want.sort_unstable();
            r.eq("fds E watches", want, tfds);
        }
        if let Some(v) = r.ok(read_u64(f.a, "eventfd A")) {
            r.eq("eventfd A counter", 5, v);
            r.ok(write_u64(f.a, v, "eventfd A"));
        }
        if let Some(fl) = r.ok(sys::fcntl_get(f.a, libc::F_GETFL, "F_GETFL A")) {
            r.ensure(fl & libc::O_NONBLOCK != 0, || {
                "eventfd A lost O_NONBLOCK".into()
            });
        }
        if let Some(v) = r.ok(read_u64(f.b, "eventfd B")) {
            r.eq("eventfd B (semaphore) read", 1, v);
            r.ok(write_u64(f.b, 1, "eventfd B"));
        }
        if let Some(fl) = r.ok(sys::fcntl_get(f.b, libc::F_GETFD, "F_GETFD B")) {
            r.ensure(fl & libc::FD_CLOEXEC != 0, || {
                "eventfd B lost FD_CLOEXEC".into()
            });
        }
        let mut cur: libc::itimerspec = std::mem::zeroed();
        if r.ok(cvt(
            libc::timerfd_gettime(f.t1, &mut cur),
            "timerfd_gettime T1",
        ))
        .is_some()
        {
            let left = cur.it_value.tv_sec as i64 * 1_000_000_000 + cur.it_value.tv_nsec;
            r.ensure(left > 0 && left <= 30_000_000_000, || {
                format!("T1 remaining {left} ns, expected 0 < left <= 30 s")
            });
            r.eq("T1 interval seconds", 2, cur.it_interval.tv_sec as i64);
        }
        // T2 is blocking: read it only once poll says a tick is there.
        let mut pt = libc::pollfd {
            fd: f.t2,
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut pt, 1, 0) != 1 {
            r.fail("timerfd T2 has no unread tick".to_string());
        } else if let Some(v) = r.ok(read_u64(f.t2, "timerfd T2")) {
            r.eq("T2 ticks", 1, v);
            r.ok(arm_t2(f.t2));
        }
        let mut si = [0u8; 128];
        let n = libc::read(f.s, si.as_mut_ptr().cast(), 128);
        if n == 128 {
            let signo = u32::from_ne_bytes([si[0], si[1], si[2], si[3]]);
            r.eq("signalfd S signal", libc::SIGUSR1 as u32, signo);
            r.ok(raise_usr1());
        } else {
            r.fail(sys::os_err("read signalfd S (SIGUSR1 should be pending)"));
        }
        let mut queued: libc::c_int = 0;
        if r.ok(cvt(
            libc::ioctl(f.prd, libc::FIONREAD, &mut queued),
            "FIONREAD",
        ))
        .is_some()
        {
            r.eq("bytes in the watched pipe", 10, queued);
        }
    }
}

fn main() {
    let mut ctx = Ctx::start("wl-events", &Spec::default());
    let fds = setup();
    let mut fds = ctx.setup(fds);
    let ino = setup_inotify(&mut ctx);
    (fds.inotify, fds.dirs) = ctx.setup(ino);
    ctx.ready();
    let mut round = 0;
    ctx.serve_blocking(|r| {
        round += 1;
        check(&fds, r, round)
    });
}

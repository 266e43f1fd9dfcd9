//! `wl-counter`: prints `count N` every 100 ms; the demo and benchmark workload.
//!
//! Arguments: `--mib N` (default 0) allocates N MiB (one anonymous mapping) of non-zero
//! pseudo-random data (4-lane xorshift) and computes a checksum at start; `--quiet` prints no
//! `count` lines; `--procs P` (default 1) forks P-1 children that each refill the data with
//! their own pattern (private, unshared pages) and wait on a command pipe (the benchmark's
//! process tree). stdin is `O_NONBLOCK`; the loop is `nanosleep(100 ms)` (must return 0), print
//! the count, poll stdin.
//!
//! Checks: the recomputed checksum equals the one from start (breaks if any page of the data
//! was lost or misplaced), no word of the data is zero (a lost page reads zero), the count is
//! consistent (every printed number is the previous plus one, tracked in memory), the sleeps
//! returned 0, and fd 0 still has `O_NONBLOCK`; with `--procs`, every child recomputes its own
//! checksum on request and must still answer. The check prints the final count and the
//! checksum in an `INFO` line.

use stasis_workloads::pattern;
use stasis_workloads::{sys, Ctx, Spec};

fn main() {
    let mut ctx = Ctx::start(
        "wl-counter",
        &Spec {
            flags: &["--quiet"],
            values: &["--mib", "--procs"],
        },
    );
    let quiet = ctx.args.flag("--quiet");
    let mib = ctx.args.num("--mib", 0);
    let mib = ctx.setup(mib) as usize;
    let words = mib * (1 << 17);
    let data: &mut [u64] = if words == 0 {
        &mut []
    } else {
        // SAFETY: a fresh private anonymous mapping at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                words * 8,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            let e = sys::os_err(&format!("mmap {mib} MiB"));
            ctx.fail_exit(&format!("setup: {e}"));
        }
        // SAFETY: the mapping is `words * 8` bytes, writable, never unmapped, and this is the
        // only reference to it.
        unsafe { std::slice::from_raw_parts_mut(p.cast::<u64>(), words) }
    };
    pattern::fill_xorshift(data, ctx.seed);
    let sum0 = pattern::checksum(data);
    let procs = ctx.args.num("--procs", 1);
    let procs = ctx.setup(procs);
    let children = fork_children(&mut ctx, procs.saturating_sub(1), data);
    ctx.set_stdin_nonblocking();
    ctx.ready();
    let mut count: u64 = 0;
    let mut last_printed: Option<u64> = None;
    let mut printed: u64 = 0;
    loop {
        if let Err(e) = sys::nanosleep_ms(100) {
            ctx.note(format!("count {count}: {e} (expected 0)"));
        }
        count += 1;
        if let Some(l) = last_printed {
            if l + 1 != count {
                ctx.note(format!("counter jumped from {l} to {count}"));
            }
        }
        if !quiet {
            sys::out_line(&format!("count {count}"));
            printed += 1;
        }
        last_printed = Some(count);
        while let Some(cmd) = ctx.poll_nonblocking() {
            let data: &[u64] = data;
            ctx.respond(cmd, |r| {
                let sum = pattern::checksum(data);
                r.eq_hex("checksum of the --mib data", sum0, sum);
                if let Some(i) = data.iter().position(|&w| w == 0) {
                    r.fail(format!(
                        "--mib data word {i} (page {}) is zero",
                        i * 8 / 4096
                    ));
                }
                if !quiet {
                    r.eq("count lines printed vs final count", count, printed);
                }
                for (i, c) in children.iter().enumerate() {
                    if let Err(e) = c.ask() {
                        r.fail(format!("child {i} (pid {}): {e}", c.pid));
                    }
                }
                if let Some(now) = r.ok(sys::fcntl_get(0, libc::F_GETFL, "F_GETFL")) {
                    r.ensure(now & libc::O_NONBLOCK != 0, || {
                        format!("fd 0 lost O_NONBLOCK: F_GETFL {now:#x}")
                    });
                }
                r.info(format!(
                    "final count {count}, {mib} MiB, checksum {sum0:#018x}"
                ));
            });
        }
    }
}

/// A forked child holding its own copy of the data: ask it with one byte, it answers one.
struct Child {
    pid: i32,
    cmd: i32,
    res: i32,
}

impl Child {
    fn ask(&self) -> Result<(), String> {
        sys::write_all(self.cmd, b"c")?;
        let mut b = [0u8; 1];
        // SAFETY: reads one byte into a local buffer.
        let n = unsafe { libc::read(self.res, b.as_mut_ptr().cast(), 1) };
        match (n, b[0]) {
            (1, b'1') => Ok(()),
            (1, _) => Err("its data checksum changed".into()),
            _ => Err(sys::os_err("no answer")),
        }
    }
}

/// Forks `n` children; each refills `data` with its own pattern and serves checks.
fn fork_children(ctx: &mut Ctx, n: u64, data: &mut [u64]) -> Vec<Child> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut cmd = [0i32; 2];
        let mut res = [0i32; 2];
        // SAFETY: a valid array for pipe2.
        let a = unsafe { libc::pipe2(cmd.as_mut_ptr(), libc::O_CLOEXEC) };
        // SAFETY: as above.
        let b = unsafe { libc::pipe2(res.as_mut_ptr(), libc::O_CLOEXEC) };
        if a != 0 || b != 0 {
            let e = sys::os_err("pipe2");
            ctx.fail_exit(&format!("setup: {e}"));
        }
        // SAFETY: single-threaded; the child only computes and does raw I/O, then _exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = sys::os_err("fork");
            ctx.fail_exit(&format!("setup: {e}"));
        }
        if pid == 0 {
            // SAFETY: prctl takes no pointers.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
            pattern::fill_xorshift(data, ctx.seed ^ (i + 1));
            let sum = pattern::checksum(data);
            let mut b = [0u8; 1];
            // SAFETY: reads one byte at a time from our command pipe; writes one answer.
            while unsafe { libc::read(cmd[0], b.as_mut_ptr().cast(), 1) } == 1 {
                let ok = pattern::checksum(data) == sum && !data.contains(&0);
                let _ = sys::write_all(res[1], if ok { b"1" } else { b"0" });
            }
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: closing our copies of the child's ends.
        unsafe {
            libc::close(cmd[0]);
            libc::close(res[1]);
        }
        out.push(Child {
            pid,
            cmd: cmd[1],
            res: res[0],
        });
    }
    // The children are ready once they answer.
    for c in &out {
        if let Err(e) = c.ask() {
            ctx.fail_exit(&format!("setup: child {}: {e}", c.pid));
        }
    }
    out
}

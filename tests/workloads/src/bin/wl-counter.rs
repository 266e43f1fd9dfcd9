//! `wl-counter`: prints `count N` every 100 ms; the demo and benchmark workload.
//!
//! Arguments: `--mib N` (default 0) allocates N MiB (one anonymous mapping) of non-zero
//! pseudo-random data (4-lane xorshift) and computes a checksum at start; `--quiet` prints no
//! `count` lines. stdin is `O_NONBLOCK`; the loop is `nanosleep(100 ms)` (must return 0), print
//! the count, poll stdin.
//!
//! Checks: the recomputed checksum equals the one from start (breaks if any page of the data
//! was lost or misplaced), no word of the data is zero (a lost page reads zero), the count is
//! consistent (every printed number is the previous plus one, tracked in memory), the sleeps
//! returned 0, and fd 0 still has `O_NONBLOCK`. The check prints the final count and the
//! checksum in an `INFO` line.

use stasis_workloads::pattern;
use stasis_workloads::{sys, Ctx, Spec};

fn main() {
    let mut ctx = Ctx::start(
        "wl-counter",
        &Spec {
            flags: &["--quiet"],
            values: &["--mib"],
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

//! `wl-pipe-read`: the plain protocol (blocked in `read(0, ..)` on the stdin pipe) with byte
//! and read counters.
//!
//! Checks (besides the common ones): every stdin `read` wrote only the bytes it returned (the
//! buffer is pre-filled with a sentinel; a restorer that fakes a return value or replays a
//! read breaks this or produces an unknown command), the totals of bytes read and consumed as
//! command lines agree with the commands received, and fd 0 is still a FIFO opened `O_RDONLY`
//! without `O_NONBLOCK` (breaks if the restorer gives it a different kind of stdin).

use stasis_workloads::{sys, Cmd, Ctx, Spec};

fn main() {
    let mut ctx = Ctx::start("wl-pipe-read", &Spec::default());
    let st = sys::fstat(0);
    let st = ctx.setup(st);
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        ctx.fail_exit(&format!(
            "setup: stdin is not a pipe (mode {:o})",
            st.st_mode
        ));
    }
    let fl = sys::fcntl_get(0, libc::F_GETFL, "F_GETFL");
    let fl0 = ctx.setup(fl);
    ctx.ready();
    let mut expected_bytes: u64 = 0;
    loop {
        let cmd = ctx.read_blocking();
        expected_bytes += match cmd {
            Cmd::Check => 6,
            Cmd::Verify => 7,
        };
        let (reads, read, consumed) = (ctx.reads, ctx.bytes_read, ctx.bytes_consumed);
        ctx.respond(cmd, |r| {
            r.eq("bytes consumed as command lines", expected_bytes, consumed);
            r.ensure(read >= consumed, || {
                format!("bytes read {read} < bytes consumed {consumed}")
            });
            r.ensure(reads >= 1 && reads <= read, || {
                format!("{reads} reads returned {read} bytes")
            });
            if let Some(st) = r.ok(sys::fstat(0)) {
                r.eq_hex("fd 0 file type", libc::S_IFIFO, st.st_mode & libc::S_IFMT);
            }
            if let Some(fl) = r.ok(sys::fcntl_get(0, libc::F_GETFL, "F_GETFL")) {
                r.eq_hex("fd 0 F_GETFL", fl0, fl);
            }
            r.info(format!("{reads} reads, {read} bytes"));
        });
    }
}

//! Self-checking workload programs for stasis checkpoint/restore tests.
//!
//! Every binary in `src/bin/` sets up some process state, announces itself, waits to be
//! checkpointed and restored (as a new process with the same PID and memory), and then checks
//! that state itself. A test harness only has to drive the line protocol below and look for
//! `PASS`/`FAIL`; it never needs to know what a workload checks.
//!
//! # Protocol (identical for every workload)
//!
//! 1. The workload starts, sets up all of its state, then writes exactly `READY <pid>\n` to
//!    stdout. Before that line it writes nothing to stdout. If set-up fails it writes
//!    `FAIL <name>: setup: <why>\n` instead and exits with status 1 (status 2 for bad
//!    arguments).
//! 2. It then waits for a command line on stdin (a pipe from the harness). Most workloads sit
//!    in a raw blocking `read(0, ..)`; `wl-sleep` and `wl-counter` set stdin `O_NONBLOCK` and
//!    poll it between `nanosleep` calls. A `read` that fails with `EINTR` is never retried: it is
//!    reported as `FAIL <name>: read on stdin returned EINTR` (exit 1), because a correct
//!    restorer restarts the interrupted syscall.
//! 3. Commands, one per line:
//!    - `check\n`: verify every piece of state, print `PASS <name>\n` and exit 0, or
//!      `FAIL <name>: <what differed, expected vs got>[; <more>...]\n` and exit 1.
//!    - `verify\n`: the same checks and the same `PASS`/`FAIL` line, but the workload keeps
//!      running and goes back to step 2 (check, checkpoint again, check again). Failures found
//!      between commands (e.g. a `nanosleep` that returned `EINTR`) are sticky: every later
//!      check reports them again.
//!    - anything else: `FAIL <name>: unknown command ..` and exit 1.
//!    - end of file on stdin: `FAIL <name>: stdin closed (EOF) before a check command`, exit 1.
//!
//!    Besides `READY`, `PASS` and `FAIL`, a workload may print other lines that a harness must
//!    skip: `INFO <name>: ...` (always printed right before the `PASS`/`FAIL` of a check) and,
//!    for `wl-counter`, `count N` lines. A `PASS`/`FAIL` line always starts with `PASS ` /
//!    `FAIL ` followed by the workload name.
//!
//! At start every workload closes all inherited file descriptors above 2, so it holds only
//! stdin/stdout/stderr and the files it opens itself.
//!
//! Common arguments: `--tag <string>` (seeds every data pattern, so patterns do not depend on
//! the pid), and the environment variable `STASIS_WL_TAG` (if both are given they must be
//! equal). Workload-specific arguments are listed below. Unknown arguments are a set-up error.
//!
//! # What every check verifies (all workloads)
//!
//! - `getpid()` (the raw syscall, not a cached value) and `gettid()` equal the pid printed at
//!   `READY`: breaks if the restore did not reuse the pid.
//! - `std::env::args_os()` and `/proc/self/cmdline` equal what the process saw at start, and
//!   each other: breaks if the restorer did not set the mm's `arg_start`/`arg_end`.
//! - `std::env::vars_os()` and `/proc/self/environ` likewise (`env_start`/`env_end`).
//! - the process has exactly the threads it made (`/proc/self/status`; one unless the
//!   workload sets `Ctx::threads`): breaks if restorer threads leak or threads are lost.
//! - `/proc/self/exe` is still the workload binary: breaks if the restorer did not set the
//!   mm's exe link (it would name stasis).
//! - current directory, `umask` (set to `027` at start), `/proc/self/comm`, and the
//!   `RLIMIT_NOFILE` soft/hard limits (soft limit lowered at start to a distinctive value):
//!   breaks if the restorer did not restore these per-process attributes.
//!
//! # The workloads
//!
//! - `wl-memory` (`--mib N`: scales the anonymous part, default about 49 MiB; `--alias`): 24 anonymous
//!   private mappings (4 KiB .. 8 MiB at the default size) with pid-independent patterns, some
//!   sparse (only every Nth page touched; the others must read zero); a read-only mapping;
//!   `PROT_NONE` guard pages between all regions (checked `---p` in `/proc/self/maps`, and
//!   each region's exact start/end/permissions); a `MAP_SHARED|MAP_ANONYMOUS` region (with
//!   `--alias` also a second view of it made with `mremap(old_size=0)`, which must still share
//!   pages after restore); an 8 MiB heap `Vec` and 4096 small `malloc`ed objects; the raw
//!   `brk`; a 512 KiB stack array at the bottom of a 24-deep recursion, each frame holding its
//!   own pattern; a `MAP_PRIVATE` mapping (at file offset 32 KiB) of a file it creates in
//!   `$TMPDIR` with pages fully modified, partly modified, only read and never touched; the
//!   file itself must not have changed. After each check it also allocates and checks fresh
//!   heap memory (malloc still works).
//! - `wl-regs` (`--sse-only`: xmm only even with AVX): reads stdin one byte per `read` syscall issued from inline asm that first
//!   loads x87 control word (round toward zero), three 80-bit x87 values, MXCSR (round toward
//!   zero, FTZ), xmm0-15 (ymm0-15 with AVX), rbx, rbp, r8-r10, r12-r15; after the syscall it
//!   stores them all, plus rdi/rsi/rdx and the x87 status word, and compares. Also the fs base.
//! - `wl-sleep`: loops `nanosleep(300 ms)` (must return 0 and last at least 300 ms by
//!   `CLOCK_MONOTONIC`), polling the non-blocking stdin between sleeps; checks `O_NONBLOCK` is
//!   still set on fd 0.
//! - `wl-pipe-read`: the plain protocol, with a byte and read counter; checks each `read`
//!   wrote only the bytes it returned (sentinel-filled buffer), the totals, and that fd 0 is a
//!   FIFO opened read-only, blocking.
//! - `wl-vdso`: `clock_gettime` (MONOTONIC, REALTIME, BOOTTIME, MONOTONIC_COARSE), `gettimeofday`
//!   and `time` through the vDSO agree with the raw syscalls and advance; monotonic clocks never
//!   go backwards; `[vdso]`/`[vvar]` are at the same addresses as at start; `AT_SYSINFO_EHDR`
//!   (libc and `/proc/self/auxv`) still points at `[vdso]`, which still starts with an ELF header.
//! - `wl-signal` (`--pending`): SIGUSR1/SIGUSR2 handlers (`SA_RESTART|SA_SIGINFO`, specific
//!   masks), SIGINT ignored, SIGRTMIN+3 blocked (with `--pending`, also one SIGRTMIN+3 queued
//!   while blocked, which must still be pending); checks the sigactions field by field, the
//!   blocked mask, and raises both signals, checking the handler ran with the right siginfo and
//!   mask.
//! - `wl-files`: a regular file `O_RDWR` at offset 12345, one `O_WRONLY|O_APPEND`, one
//!   `O_RDONLY|O_CLOEXEC` at offset 500, `/dev/null` at fd 10, fd 4 left closed; checks the set
//!   of open fds, each fd's target path, inode, offset, `F_GETFL`, `FD_CLOEXEC`, contents at the
//!   offset, and that an append lands at the end of the file even after the file grew.
//! - `wl-counter` (`--mib N`, default 0; `--quiet`): prints `count N` every 100 ms; with
//!   `--mib` holds N MiB of non-zero pseudo-random data whose checksum is recomputed on check.
//! - `wl-tree`: a process tree. The root (a child subreaper) has A (own process group) → A1,
//!   B (own session) → B1, an orphan O1 reparented to it, a SIGSTOPped child S and two
//!   unreaped zombies (exit status 7; killed by SIGTERM). Each live child talks to the root
//!   over a command and a result pipe; pipes root→A, A→root (root's end `O_NONBLOCK`) and
//!   A1→B1 hold unread data at `READY`; root and A share one open file description (its
//!   offset), and all share a `MAP_SHARED|MAP_ANONYMOUS` region. Every process checks its
//!   pid, ppid, pgid, sid, exact fds, the bytes it reads (and that nothing more is buffered)
//!   and the shared memory; the root checks its children, the zombies' statuses and that S
//!   is stopped, and reports one `PASS`/`FAIL` naming the failing process. The first check
//!   prints `INFO wl-tree: pids R=.. A=.. A1=.. B=.. B1=.. O1=.. S=.. Z=.. K=..`; `check`
//!   ends the whole tree.
//! - `wl-pidns`: a whole pid namespace; run it as PID 1 of a fresh one (`unshare --pid --fork
//!   wl-pidns`). R (PID 1) → A (2, own group) → A1 (3), R → B (4, own session) → B1 (5),
//!   a pipe stream A → A1, memory and a file in R. Each check verifies every process's
//!   pid, ppid, pgid and sid from inside, the stream, memory and file, and that an orphan
//!   made now is reparented to R; it prints `INFO wl-pidns: ids R=.. A=.. A1=.. B=.. B1=..
//!   uts=<nodename> proc_self=<readlink /proc/self>`. Nothing reads /proc by PID.
//! - `wl-writer` (`--mib`, `--rate`, `--threads`, `--churn`): writes (and remaps) memory all the time.

#![warn(missing_docs)]

pub mod ipc;
pub mod maps;
pub mod pattern;
pub mod peer;
pub mod proto;
pub mod report;
pub mod sys;

pub use proto::{Args, Cmd, Ctx, Spec};
pub use report::Report;

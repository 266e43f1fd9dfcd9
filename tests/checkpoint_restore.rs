//! Every self-checking workload is checkpointed and restored twice in a row and must
//! verify all of its own state after each restore.

mod common;

#[test]
fn memory_patterns_over_many_vmas() {
    common::round_trip("wl-memory", &[], &[]);
}

#[test]
fn memory_with_zstd() {
    common::round_trip("wl-memory", &[], &["--compress", "zstd"]);
}

#[test]
fn registers_x87_sse_avx() {
    common::round_trip("wl-regs", &[], &[]);
}

#[test]
fn nanosleep_restarts() {
    common::round_trip("wl-sleep", &[], &[]);
}

#[test]
fn pipe_read_restarts() {
    common::round_trip("wl-pipe-read", &[], &[]);
}

#[test]
fn vdso_clocks() {
    common::round_trip("wl-vdso", &[], &[]);
}

#[test]
fn signal_handlers() {
    common::round_trip("wl-signal", &[], &[]);
}

#[test]
fn files_offsets_and_flags() {
    common::round_trip("wl-files", &[], &[]);
}

#[test]
fn counter_with_data() {
    common::round_trip("wl-counter", &["--mib", "16", "--quiet"], &[]);
}

#[test]
fn timers_sched_creds_altstack_and_pending_signals() {
    common::round_trip("wl-state", &[], &[]);
}

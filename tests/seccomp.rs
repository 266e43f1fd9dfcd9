//! seccomp: a checkpoint never lets the workload's filters (or strict mode) meet stasis's
//! injected syscalls, so it neither fails nor damages the workload; and the filters come
//! back after restore, in the same order, in every thread that had them (shared through
//! TSYNC where they were), and in children that inherited them; strict mode too.
//!
//! wl-seccomp checks in each thread and child that the filtered calls still fail with
//! their errnos, that the others work, and that /proc shows the same Seccomp and
//! Seccomp_filters.

mod common;

use common::*;

/// --leave-running checkpoint (the workload runs on unharmed), then a checkpoint that
/// kills it, a restore, and the check.
fn filters_survive(test: &str, args: &[&str]) {
    let dir = scratch(test);
    let mut wl = start("wl-seccomp", args);
    let _kill = KillOnDrop(wl.pid);
    wl.pipes
        .expect_pass("verify", &format!("{test}: before the checkpoint"));
    let pid = wl.pid.to_string();
    let img = dir.join("1.img");
    let imgs = img.to_str().expect("utf-8");
    stasis_ok(&["checkpoint", &pid, "--leave-running", "-o", imgs]);
    wl.pipes.expect_pass(
        "verify",
        &format!("{test}: after a --leave-running checkpoint"),
    );
    let tree = descendants(wl.pid);
    stasis_ok(&["checkpoint", &pid, "-o", imgs]);
    wl.child.wait().expect("reap the original");
    reap_orphans(&tree);
    let (mut r, mut p) = restore(&img, false);
    p.expect_pass("check", &format!("{test}: after restore"));
    assert!(r.wait().expect("stasis restore").success());
    reap_orphans(&tree);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_errno_filter_comes_back_and_a_checkpoint_does_not_meet_it() {
    filters_survive("seccomp-errno", &[]);
}

#[test]
fn filters_synchronised_across_threads_come_back_in_every_thread() {
    filters_survive("seccomp-tsync", &["--threads", "2", "--tsync"]);
}

#[test]
fn filters_of_the_main_thread_only_stay_there_and_a_child_inherits_them() {
    filters_survive("seccomp-child", &["--threads", "1", "--child"]);
}

#[test]
fn a_child_in_strict_mode_survives_the_checkpoint_and_comes_back_strict() {
    filters_survive("seccomp-strict", &["--strict", "--child"]);
}

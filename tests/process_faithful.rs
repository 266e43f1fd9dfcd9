//! Process attributes restored exactly: all four ids of each credential set (real,
//! effective, saved, fs), a zombie's process group and session, the signal that
//! job-control-stopped a child (as its parent's waitid reports it), and the audit login
//! uid. The workload's root checks every process itself (see wl-procstate).

mod common;

use common::*;

#[test]
fn ids_zombie_groups_stop_signal_and_loginuid_survive_two_rounds() {
    init();
    round_trip("wl-procstate", &[], &[]);
}

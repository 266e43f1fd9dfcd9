//! Event descriptors: eventfd, timerfd, signalfd and epoll, each recreated from its state
//! (counters, timers with their remaining time and unread ticks, signal masks, the epoll
//! set's watches with their data) and checked by the workload itself.

mod common;

use common::*;

#[test]
fn eventfd_timerfd_signalfd_and_epoll_survive_two_rounds() {
    round_trip("wl-events", &[], &[]);
}

#[test]
fn event_fds_with_zstd() {
    round_trip("wl-events", &[], &["--compress", "zstd"]);
}

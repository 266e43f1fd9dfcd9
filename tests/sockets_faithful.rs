//! Sockets come back exactly as they were, or the checkpoint refuses them by name: their
//! options (tests/workloads/py/wl-sockets.py compares dozens of them with getsockopt on TCP
//! listeners, unbound and bound TCP sockets, UDP over IPv4 and IPv6 and unix pairs), the
//! directions they were shut down in, unix names bound relative to a directory, sockets in
//! flight (SCM_RIGHTS) and classic BPF filters. An eBPF filter, a multicast membership and
//! a relative name whose directory cannot be found are refused.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Child;

const WORKLOAD: &str = include_str!("workloads/py/wl-sockets.py");

/// A scratch directory removed when the test ends, also when it fails.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts the workload in `mode` in a new scratch directory; None (the test skipped) if
/// there is no python3.
fn start_mode(test: &str, mode: &str) -> Option<(Child, String, Scratch)> {
    if !have("python3") {
        skip(test, "no python3");
        return None;
    }
    init();
    let dir = Scratch(scratch(test));
    let (child, line) = start_ready(
        "exec python3 -c \"$0\" \"$1\"",
        &[WORKLOAD.as_ref(), mode.as_ref()],
        &dir.0,
    );
    Some((child, line, dir))
}

/// Checkpoints (kill) and restores the workload in `mode`; it must then find everything
/// it set up as it was.
fn round_trip_passes(test: &str, mode: &str) {
    let Some((child, line, dir)) = start_mode(test, mode) else {
        return;
    };
    if line.starts_with("ready skip") {
        let _guard = KillOnDrop(child.id() as i32);
        skip(test, &line);
        return;
    }
    let got = checkpoint_go(child, &dir.0.join("img"));
    assert_eq!(got.trim(), "PASS", "{mode}: the workload found: {got}");
}

/// The checkpoint of the workload in `mode` is refused with `needle` in the message, and
/// the workload is left running.
fn refused(test: &str, mode: &str, needle: &str) {
    let Some((mut child, line, dir)) = start_mode(test, mode) else {
        return;
    };
    let pid = child.id() as i32;
    let _guard = KillOnDrop(pid);
    if line.starts_with("ready skip") {
        skip(test, &line);
        return;
    }
    let img = dir.0.join("img");
    let err = stasis_fails(
        &[
            "checkpoint",
            &pid.to_string(),
            "-o",
            img.to_str().expect("utf8"),
        ],
        4,
        needle,
    );
    assert!(
        err.contains(&pid.to_string()),
        "the refusal names no process: {err}"
    );
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the refused workload died"
    );
}

#[test]
fn socket_options_differing_from_defaults_come_back() {
    round_trip_passes("sockopts", "sockopts");
}

#[test]
fn shut_down_directions_stay_shut() {
    round_trip_passes("sockshut", "shutdown");
}

#[test]
fn unix_sockets_bound_to_a_relative_name_accept_again() {
    round_trip_passes("sockrel", "relative");
}

#[test]
fn sockets_in_flight_come_back_as_themselves() {
    round_trip_passes("sockscm", "scm");
}

#[test]
fn classic_socket_filters_still_filter() {
    round_trip_passes("sockfilter", "filters");
}

#[test]
fn an_ebpf_socket_filter_is_refused() {
    refused("sockebpf", "ebpf", "eBPF socket filter (SO_ATTACH_BPF)");
}

#[test]
fn a_multicast_membership_is_refused() {
    refused("sockmcast", "multicast", "multicast group 239.1.2.3");
}

#[test]
fn a_relative_name_whose_directory_is_gone_is_refused() {
    refused(
        "sockmoved",
        "relative-moved",
        "relative name \"moved.sock\"",
    );
}

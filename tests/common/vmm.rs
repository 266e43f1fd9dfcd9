//! Cleaning up after VM tests.

use std::path::Path;

/// Kills (SIGKILL) every VMM whose record is in the state directory `state` (the VMs a test
/// started and left behind, e.g. because it failed).
pub fn kill_vmms(state: &Path) {
    for e in std::fs::read_dir(state.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.path().extension().is_some_and(|x| x == "json") {
            let rec: Option<serde_json::Value> = std::fs::read(e.path())
                .ok()
                .and_then(|t| serde_json::from_slice(&t).ok());
            if let Some(pid) = rec.and_then(|r| r["pid"].as_i64()) {
                // SAFETY: kill takes no pointers; the pid is a VMM the test started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

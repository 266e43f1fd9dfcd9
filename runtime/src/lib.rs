//! The kernel-facing layer of stasis for live workloads.
//!
//! Everything that talks to the kernel about another process lives here: procfs parsing
//! ([`procfs`]), ptrace seize/interrupt and register access ([`ptrace`]), syscall injection
//! ([`inject`]), reading and writing another process's memory ([`memory`]), creating a
//! process with a chosen PID ([`spawn`]), container cgroups: limits, usage, freezing
//! ([`cgroups`]), containers' network namespaces ([`netns`]), the System V IPC objects of
//! their IPC namespaces ([`sysvipc`]), the pages a process writes ([`write_tracking`]) and the container runtime itself ([`container`]). The checkpoint and restore crates translate between this and the
//! image format; they never issue raw syscalls themselves.

/// The freezer under its first path; it lives in [`cgroups::freezer`] now.
pub mod cgroup {
    pub use crate::cgroups::freezer::{parse_mounts, parse_proc_cgroup, Freezer};
}
pub mod anon_region;
pub mod cgroups;
pub mod container;
pub mod error;
pub mod failpoints;
pub mod files;
pub mod guard;
pub mod inet;
pub mod inject;
pub mod kvm;
mod mcast;
pub mod memory;
pub mod netlock;
pub mod netns;
pub mod pidns;
pub mod procfs;
pub mod ptrace;
pub mod seccomp;
pub mod sock_diag;
pub mod sockopt;
pub mod spawn;
pub mod sys;
pub mod sysvipc;
pub mod tcp_repair;
mod tool;
pub mod unix_diag;
pub mod unix_queue;
pub mod write_tracking;

pub use error::{Result, RuntimeError};

/// Size of a page on x86_64.
pub const PAGE_SIZE: u64 = 4096;

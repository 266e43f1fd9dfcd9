//! The kernel-facing layer of stasis for live workloads.
//!
//! Everything that talks to the kernel about another process lives here: procfs parsing
//! ([`procfs`]), ptrace seize/interrupt and register access ([`ptrace`]), syscall injection
//! ([`inject`]), reading and writing another process's memory ([`memory`]) and creating a
//! process with a chosen PID ([`spawn`]). The checkpoint and restore crates translate between
//! this and the image format; they never issue raw syscalls themselves.

pub mod cgroup;
pub mod error;
pub mod files;
pub mod inet;
pub mod inject;
pub mod memory;
pub mod netlock;
pub mod pidns;
pub mod procfs;
pub mod ptrace;
pub mod spawn;
pub mod sys;
pub mod tcp_repair;
pub mod unix_diag;
pub mod unix_queue;

pub use error::{Result, RuntimeError};

/// Size of a page on x86_64.
pub const PAGE_SIZE: u64 = 4096;

//! Rebootless kernel update.
//!
//! Not implemented yet. This crate will hold the preserved-memory store (images kept in
//! memory that survives kexec, e.g. a pmem region), loading and executing the new kernel
//! with kexec, and resuming every workload after boot. Nothing here pretends to work today.

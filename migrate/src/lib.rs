//! Moving a live workload between hosts.
//!
//! Not implemented yet. This crate will hold the migration wire protocol (versioned in its
//! first message), the tokio transport, iterative pre-copy rounds driven by dirty-page
//! tracking, post-copy through userfaultfd, and rollback that leaves the source running if
//! anything fails. Nothing here pretends to work today.

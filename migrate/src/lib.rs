//! Moving a live workload between hosts: `stasis migrate` on the source, `stasis receive`
//! on the destination.
//!
//! [`protocol`] is the wire protocol, written down in one place. [`source`] drives a
//! [`stasis_workload::Source`] through pre-copy rounds ([`rounds`] decides when they end) →
//! freeze → last round and state into the connection → commit → discard; [`receiver`]
//! builds what it is sent with [`stasis_workload::build`], holds it stopped until the
//! source commits, then resumes it; what it keeps meanwhile, and how that goes if it fails,
//! is [`incoming`]; a container's own files travel as [`rootfs`] streams. [`listener`] is
//! the long-running server that accepts migrations (tokio) and hands each connection to a
//! worker process of its own, so a restored tree is never the child of the server and a
//! crash of one migration cannot take the others along.
//!
//! Peers authenticate with mutual TLS ([`tls`]; plain TCP only with `--insecure`). A VM's
//! memory goes over in pre-copy rounds while it runs (KVM's dirty log) into the memory the
//! destination's VM then runs on, so the switchover sends only the last round and the
//! state; a process tree or a container goes in one stop-and-copy round (their dirty
//! tracking is not there yet).

pub mod incoming;
pub mod listener;
pub mod process_pages;
pub mod protocol;
pub mod receiver;
pub mod rootfs;
pub mod rounds;
pub mod source;
pub mod tls;

pub use protocol::ProtocolError;
pub use receiver::{receive_one, ReceiveOptions, Received};
pub use source::{migrate, MigrateOptions, MigrateReport};

use stasis_workload::WorkloadError;

/// Why a migration (either side) failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The receiver would not take it; nothing was frozen.
    #[error("{workload}: the receiver refused it: {reason}; nothing was changed")]
    Refused { workload: String, reason: String },
    /// Failed before anything was frozen (e.g. the receiver could not be reached).
    #[error("{workload}: {cause}; nothing was changed")]
    Failed { workload: String, cause: String },
    /// A termination signal (Ctrl-C) stopped it before the commit: it runs on here as it
    /// was, and the destination discards what it had.
    #[error(
        "{workload}: interrupted by signal {signal} before the commit; it runs on here as it \
         was, and the destination discards its copy"
    )]
    Interrupted { workload: String, signal: i32 },
    /// A verb of the workload failed; before the commit it runs on here as it was.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// The commit was sent, but the destination never said it runs the workload: the copy
    /// here is left frozen, neither resumed nor discarded.
    #[error(
        "{workload}: the commit was sent but {what}, so it is unknown whether the destination \
         runs it; the copy here is left frozen: {settle}"
    )]
    Unsettled {
        workload: String,
        what: String,
        settle: String,
    },
    /// The receiving side: the peer broke the protocol, or went away.
    #[error("receiving from {peer}: {source}")]
    Protocol {
        peer: String,
        #[source]
        source: ProtocolError,
    },
    /// The receiving side could not take the workload; nothing of it is left here.
    #[error("receiving {workload} from {peer}: {what}")]
    Receive {
        workload: String,
        peer: String,
        what: String,
    },
    /// The server could not run.
    #[error("receiver on {addr}: {what}")]
    Listener { addr: String, what: String },
}

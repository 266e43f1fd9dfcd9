//! Restore errors: each names what is wrong and where.

use stasis_image::ImageError;
use stasis_runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// (Not the error's `source`: its text is already in this one's, and a reader printing
    /// the chain would say it twice.)
    #[error("image is invalid: {0}")]
    Image(ImageError),
    /// The image is well-formed but describes something inconsistent.
    #[error("image is invalid: {0}")]
    Invalid(String),
    /// The image needs something this version or this machine cannot provide.
    #[error("cannot restore: {0}")]
    Unsupported(String),
    #[error("cannot restore PID {pid}: it is in use by {comm} (state {state})")]
    PidTaken { pid: i32, comm: String, state: char },
    #[error("restoring PID {pid}: {cause}")]
    Apply { pid: i32, cause: RuntimeError },
    /// A container could not be restored (named, with the reason); what was made is gone.
    #[error("restoring container {name}: {what}")]
    Container { name: String, what: String },
    /// The rebuilt TCP connections could not be unlocked: the restored processes were killed
    /// before they ran, and their connections stay locked for another try.
    #[error(
        "the restored TCP connections could not be let back onto the network ({0}); the \
         restored processes were killed before running, the connections stay locked (nft table \
         `inet stasis`) and the image is unchanged: fix the cause and restore again"
    )]
    NetworkUnlock(RuntimeError),
    /// The workflow discarded the restored workload before it ran (see `Options::hold`).
    #[error("discarded before it ran: {0}")]
    Discarded(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Starting a restored VM failed (the error names the VM).
    #[error(transparent)]
    Vm(#[from] stasis_runtime::kvm::KvmError),
}

impl From<ImageError> for RestoreError {
    fn from(e: ImageError) -> Self {
        RestoreError::Image(e)
    }
}

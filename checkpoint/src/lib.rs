//! Checkpoint: freeze, collect, write.

//! What can go wrong in the queue.

use std::path::PathBuf;

/// A queue operation failed. Each variant names what it was doing.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("config key {key}: {reason}")]
    Config { key: &'static str, reason: String },

    /// The store could not be opened and was not moved aside, because the cause
    /// is not the store's content (permissions, another process holding the
    /// lock, disk full, read-only file system).
    #[error("cannot open queue store {dir}: {source}")]
    Open {
        dir: PathBuf,
        #[source]
        source: sled::Error,
    },

    /// The store was broken and moving it aside (or starting a clean one) failed too.
    #[error("queue store {dir} is unusable ({cause}) and could not be replaced: {reason}")]
    Quarantine {
        dir: PathBuf,
        cause: String,
        reason: String,
    },

    /// A batch larger than `queue.max_bytes` on its own.
    #[error(
        "{readings} readings are {bytes} bytes encoded, more than queue.max_bytes ({max_bytes})"
    )]
    BatchTooLarge {
        readings: usize,
        bytes: u64,
        max_bytes: u64,
    },

    /// The store failed earlier and is being reopened (see the flusher).
    #[error("queue store {dir} is being reopened after a storage error")]
    Unavailable { dir: PathBuf },

    /// Reading or writing the store failed (disk full, I/O error, ...).
    #[error("queue {op} failed: {source}")]
    Storage {
        op: &'static str,
        #[source]
        source: sled::Error,
    },
}

//! The contract between the durable queue and its one consumer, the forwarder.
//!
//! The forwarder depends on this trait, not on the queue's storage engine, so it
//! can be unit-tested against an in-memory fake and the storage can change
//! without touching it.

use std::sync::Arc;

use thingspeak::ChannelId;

use crate::reading::Reading;

/// Identifies one queued reading. Keys of one channel sort in arrival order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueKey {
    pub channel: ChannelId,
    pub seq: u64,
}

/// A reading as stored, with the key needed to remove it.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub key: QueueKey,
    pub reading: Reading,
}

/// The storage failed. The message names the operation and the cause.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("queue storage: {0}")]
pub struct StoreError(pub String);

/// What the forwarder needs from the queue.
///
/// A reading stays in the store until `remove` is called with its key: the
/// forwarder removes readings only once their update was delivered (or a stated
/// policy dropped them, counted).
pub trait ReadingStore: Send + Sync + 'static {
    /// Channels that currently have queued readings, ascending.
    fn channels(&self) -> Result<Vec<ChannelId>, StoreError>;

    /// Up to `max` readings of `channel`, oldest first. Does not remove them.
    fn peek(&self, channel: ChannelId, max: usize) -> Result<Vec<Queued>, StoreError>;

    /// Removes readings. Unknown keys (already removed, or dropped because the
    /// queue was full) are ignored.
    fn remove(&self, keys: &[QueueKey]) -> Result<(), StoreError>;

    /// Signalled (`notify_one`) after every successful push, so the consumer
    /// can sleep instead of polling.
    fn pushed(&self) -> Arc<tokio::sync::Notify>;
}

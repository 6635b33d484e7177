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

    /// Readings of `channel` currently queued (from counts, without a scan:
    /// the forwarder reports backlog progress with it).
    fn len_of(&self, channel: ChannelId) -> Result<u64, StoreError>;

    /// Up to `max` readings of `channel`, oldest first. Does not remove them.
    fn peek(&self, channel: ChannelId, max: usize) -> Result<Vec<Queued>, StoreError>;

    /// Removes readings. Unknown keys (already removed, or dropped because the
    /// queue was full) are ignored.
    fn remove(&self, keys: &[QueueKey]) -> Result<(), StoreError>;

    /// Signalled (`notify_one`) after every successful push, so the consumer
    /// can sleep instead of polling.
    fn pushed(&self) -> Arc<tokio::sync::Notify>;
}

/// An in-memory [`ReadingStore`]: what tests and tools use instead of the disk
/// queue. It keeps the same contract (per-channel arrival order, removal by
/// key, a notification per push) and records how many readings were removed.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: std::sync::Mutex<MemoryInner>,
    pushed: Arc<tokio::sync::Notify>,
}

#[derive(Debug, Default)]
struct MemoryInner {
    readings: std::collections::BTreeMap<QueueKey, Reading>,
    next_seq: u64,
    removed: usize,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a reading under the next sequence number and signals the consumer.
    pub fn push(&self, reading: Reading) -> QueueKey {
        let key = {
            let mut inner = self.lock();
            inner.next_seq += 1;
            let key = QueueKey {
                channel: reading.channel,
                seq: inner.next_seq,
            };
            inner.readings.insert(key, reading);
            key
        };
        self.pushed.notify_one();
        key
    }

    /// Queues a reading under a chosen key (later pushes continue above it).
    pub fn insert(&self, key: QueueKey, reading: Reading) {
        {
            let mut inner = self.lock();
            inner.next_seq = inner.next_seq.max(key.seq);
            inner.readings.insert(key, reading);
        }
        self.pushed.notify_one();
    }

    /// Readings currently queued.
    pub fn len(&self) -> usize {
        self.lock().readings.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Readings removed so far.
    pub fn removed(&self) -> usize {
        self.lock().removed
    }
}

impl ReadingStore for MemoryStore {
    fn channels(&self) -> Result<Vec<ChannelId>, StoreError> {
        let mut channels: Vec<ChannelId> = self.lock().readings.keys().map(|k| k.channel).collect();
        channels.dedup();
        Ok(channels)
    }

    fn len_of(&self, channel: ChannelId) -> Result<u64, StoreError> {
        Ok(self
            .lock()
            .readings
            .keys()
            .filter(|k| k.channel == channel)
            .count() as u64)
    }

    fn peek(&self, channel: ChannelId, max: usize) -> Result<Vec<Queued>, StoreError> {
        Ok(self
            .lock()
            .readings
            .range(
                QueueKey { channel, seq: 0 }..=QueueKey {
                    channel,
                    seq: u64::MAX,
                },
            )
            .take(max)
            .map(|(key, reading)| Queued {
                key: *key,
                reading: reading.clone(),
            })
            .collect())
    }

    fn remove(&self, keys: &[QueueKey]) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for key in keys {
            if inner.readings.remove(key).is_some() {
                inner.removed += 1;
            }
        }
        Ok(())
    }

    fn pushed(&self) -> Arc<tokio::sync::Notify> {
        self.pushed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{Origin, SourceKind, Value};
    use thingspeak::Target;

    fn reading(channel: u64, v: f64) -> Reading {
        Reading {
            channel: ChannelId::new(channel).unwrap(),
            target: Target::Status,
            value: Value::Number(v),
            measured_at: chrono::Utc::now(),
            origin: Origin::new(SourceKind::Mqtt, "t"),
        }
    }

    #[test]
    fn memory_store_keeps_the_contract() {
        let store = MemoryStore::new();
        let a = store.push(reading(2, 1.0));
        store.push(reading(1, 2.0));
        let c = store.push(reading(2, 3.0));
        assert_eq!(store.channels().unwrap().len(), 2);
        assert_eq!(store.len_of(ChannelId::new(2).unwrap()).unwrap(), 2);
        assert_eq!(store.len_of(ChannelId::new(3).unwrap()).unwrap(), 0);
        let two = store.peek(ChannelId::new(2).unwrap(), 10).unwrap();
        assert_eq!(two.iter().map(|q| q.key).collect::<Vec<_>>(), vec![a, c]);
        assert_eq!(store.peek(ChannelId::new(2).unwrap(), 1).unwrap().len(), 1);
        store.remove(&[a, a]).unwrap();
        assert_eq!((store.len(), store.removed()), (2, 1));
    }
}

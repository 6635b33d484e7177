//! The gateway's shared data model.
//!
//! Sources produce [`Reading`]s, the durable queue stores them, the forwarder
//! turns them into ThingSpeak updates. Everything here is pure: no I/O, no
//! async runtime, so every stage (and its tests) can depend on it freely.

pub mod extract;
pub mod feed;
pub mod intake;
pub mod metrics;
pub mod reading;
pub mod secret;
pub mod store;
pub mod throttle;

pub use feed::{FeedEntry, FeedFuture, FeedRefusal, FeedSource, FeedTap};
pub use intake::{durable_pair, Durable, DurableAck, IngestBatch};
pub use metrics::Metrics;
pub use reading::{Origin, Reading, SourceKind, Value};
pub use secret::Secret;
pub use store::{MemoryStore, QueueKey, Queued, ReadingStore, StoreError};
pub use thingspeak::{ChannelId, Field, Target};

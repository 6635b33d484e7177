//! ThingSpeak's wire formats: typed ids, topics, payloads and limits.
//!
//! This crate does no I/O. The gateway's forwarder and the emulator both use it,
//! so the two agree on every byte by construction.

pub mod ids;

pub use ids::{ChannelId, Field, IdError, Target, FIELD_COUNT};

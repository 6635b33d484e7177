//! The downlink contract: entries ThingSpeak relays on a channel's feed.
//!
//! The forwarder holds the one upstream subscription per channel (it owns the
//! connection and its credentials); the local broker's front and the downlink
//! rules consume it through [`FeedSource`] without knowing how it is made.
//! Data still flows one way on each side: entries go from the source to its
//! consumers, consumers only ask for a channel.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use thingspeak::{ChannelId, EntryJson};
use tokio::sync::broadcast;

/// One entry of a channel as ThingSpeak relayed it on `channels/<id>/subscribe`.
#[derive(Debug, Clone)]
pub struct FeedEntry {
    pub channel: ChannelId,
    pub entry_id: u64,
    /// The payload exactly as ThingSpeak sent it (relayed byte for byte).
    pub json: Bytes,
    /// The same payload, parsed.
    pub entry: Arc<EntryJson>,
}

/// A consumer's view of a channel's feed.
#[derive(Debug)]
pub struct FeedTap {
    /// The newest entry seen so far (ThingSpeak sends the channel's last
    /// entry to a new subscriber; a shared subscription replays it from here).
    pub last: Option<FeedEntry>,
    /// Every later entry, in entry-id order, each once.
    pub entries: broadcast::Receiver<FeedEntry>,
}

/// Why a feed cannot be served; `reason` is a short metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FeedRefusal {
    pub reason: &'static str,
    pub message: String,
}

/// What a [`FeedSource::subscribe`] returns.
pub type FeedFuture<'a> = Pin<Box<dyn Future<Output = Result<FeedTap, FeedRefusal>> + Send + 'a>>;

/// Where channel feeds come from.
pub trait FeedSource: Send + Sync {
    /// Taps `channel`'s feed. `read_key` is the key a legacy subscriber put in
    /// its topic, if any (a configured read key it does not match is refused).
    fn subscribe(&self, channel: ChannelId, read_key: Option<String>) -> FeedFuture<'_>;
}

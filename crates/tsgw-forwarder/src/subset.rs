//! A view of the reading store limited to some channels, so that each
//! upstream connection (credential set) sees only the channels it serves.

use std::collections::BTreeSet;
use std::sync::Arc;

use thingspeak::ChannelId;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tsgw_core::{QueueKey, Queued, ReadingStore, StoreError};

/// Which channels a view shows.
#[derive(Debug, Clone)]
pub enum Selection {
    Only(BTreeSet<ChannelId>),
    AllBut(BTreeSet<ChannelId>),
}

impl Selection {
    fn contains(&self, channel: ChannelId) -> bool {
        match self {
            Selection::Only(set) => set.contains(&channel),
            Selection::AllBut(set) => !set.contains(&channel),
        }
    }
}

pub struct StoreSubset {
    inner: Arc<dyn ReadingStore>,
    selection: Selection,
    pushed: Arc<Notify>,
}

impl StoreSubset {
    pub fn new(inner: Arc<dyn ReadingStore>, selection: Selection) -> Self {
        Self {
            inner,
            selection,
            pushed: Arc::new(Notify::new()),
        }
    }
}

impl ReadingStore for StoreSubset {
    fn channels(&self) -> Result<Vec<ChannelId>, StoreError> {
        let mut channels = self.inner.channels()?;
        channels.retain(|c| self.selection.contains(*c));
        Ok(channels)
    }

    fn peek(&self, channel: ChannelId, max: usize) -> Result<Vec<Queued>, StoreError> {
        if !self.selection.contains(channel) {
            return Ok(Vec::new());
        }
        self.inner.peek(channel, max)
    }

    fn remove(&self, keys: &[QueueKey]) -> Result<(), StoreError> {
        self.inner.remove(keys)
    }

    fn pushed(&self) -> Arc<Notify> {
        self.pushed.clone()
    }
}

/// Passes every push signal of `store` on to each view (the store's
/// `notify_one` wakes a single waiter). Ends with `shutdown`.
pub async fn relay_pushes(
    store: Arc<dyn ReadingStore>,
    views: Vec<Arc<Notify>>,
    shutdown: CancellationToken,
) {
    let pushed = store.pushed();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = pushed.notified() => {
                for v in &views {
                    v.notify_one();
                }
            }
        }
    }
}

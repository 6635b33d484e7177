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

    fn len_of(&self, channel: ChannelId) -> Result<u64, StoreError> {
        if !self.selection.contains(channel) {
            return Ok(0);
        }
        self.inner.len_of(channel)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::Utc;
    use thingspeak::{Field, Target};
    use tsgw_core::{Origin, Reading, SourceKind, Value};

    use super::*;

    type Mem = tsgw_core::MemoryStore;

    fn ch(n: u64) -> ChannelId {
        ChannelId::new(n).unwrap()
    }

    #[tokio::test]
    async fn views_show_only_their_channels_and_all_get_push_signals() {
        let mem = Arc::new(Mem::default());
        for (seq, c) in [(1, 1), (2, 2), (3, 3)] {
            mem.insert(
                QueueKey {
                    channel: ch(c),
                    seq,
                },
                Reading {
                    channel: ch(c),
                    target: Target::Field(Field::new(1).unwrap()),
                    value: Value::Number(1.0),
                    measured_at: Utc::now(),
                    origin: Origin::new(SourceKind::Mqtt, "d"),
                },
            );
        }
        let store: Arc<dyn ReadingStore> = mem.clone();
        let only = StoreSubset::new(store.clone(), Selection::Only(BTreeSet::from([ch(2)])));
        let rest = StoreSubset::new(store.clone(), Selection::AllBut(BTreeSet::from([ch(2)])));
        assert_eq!(only.channels().unwrap(), vec![ch(2)]);
        assert_eq!(rest.channels().unwrap(), vec![ch(1), ch(3)]);
        assert!(only.peek(ch(1), 10).unwrap().is_empty());
        assert_eq!(rest.peek(ch(3), 10).unwrap().len(), 1);

        let stop = CancellationToken::new();
        let relay = tokio::spawn(relay_pushes(
            store,
            vec![only.pushed(), rest.pushed()],
            stop.clone(),
        ));
        tokio::task::yield_now().await;
        mem.pushed().notify_one();
        for view in [&only, &rest] {
            tokio::time::timeout(Duration::from_secs(5), view.pushed().notified())
                .await
                .expect("each view is woken");
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .unwrap()
            .unwrap();
    }
}

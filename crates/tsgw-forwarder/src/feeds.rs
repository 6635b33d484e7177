//! Channel feeds for local consumers (drop-in subscribers, downlink rules):
//! one upstream subscription per channel, shared by all of them.
//!
//! ThingSpeak allows one connection per MQTT device (a second CONNECT with
//! the same client id takes the first one over), so the feeds ride on the
//! forwarder's own connection for the channel, the one whose credentials
//! cover it: a `[[upstream.connections]]` entry listing it, else the
//! top-level credentials. The hub keeps what consumers want; each
//! forwarder's [`FeedPort`] subscribes it on every connection it makes and
//! hands back what ThingSpeak relays.
//!
//! Entries go out in entry-id order, each once: a re-subscription (after a
//! reconnect, or the forwarder's own confirmation check) makes ThingSpeak
//! send the channel's newest entry again, which is dropped here. An entry id
//! that jumps says entries were written while no connection was up: counted
//! as missed and logged (the newest entry, which subscribing delivers, is
//! never missed, and with the channel's rate limit of at least a second a
//! renewal's reconnect usually misses none).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Opts};
use thingspeak::{ChannelId, EntryJson};
use tokio::sync::{broadcast, mpsc, oneshot};
use tsgw_core::{FeedEntry, FeedFuture, FeedRefusal, FeedSource, FeedTap, Metrics};

use crate::config::UpstreamConfig;

/// Entries a slow consumer may fall behind before it misses some.
const FEED_CAPACITY: usize = 256;

/// How long a subscriber waits for ThingSpeak's SUBACK while the connection
/// is up. Past it (a slow link) the subscription is granted and made anyway.
pub const SUBACK_WAIT: Duration = Duration::from_secs(5);

/// Where each channel's feed is subscribed: the slot of the forwarder whose
/// credentials cover it.
#[derive(Debug, Clone)]
struct Routes {
    listed: HashMap<ChannelId, usize>,
    primary: Option<usize>,
}

impl Routes {
    fn new(config: &UpstreamConfig) -> Self {
        let mut listed = HashMap::new();
        for (i, c) in config.connections.iter().enumerate() {
            for channel in &c.channels {
                listed.insert(*channel, i);
            }
        }
        // The top-level credentials come after the listed connections (slot 0
        // when there are none).
        let primary = config.has_primary().then_some(config.connections.len());
        Self { listed, primary }
    }

    fn slot(&self, channel: ChannelId) -> Option<usize> {
        self.listed.get(&channel).copied().or(self.primary)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Upstream {
    /// Asked for; no answer on the current connection yet.
    Wanted,
    Granted,
    Refused(String),
}

struct Feed {
    slot: usize,
    tx: broadcast::Sender<FeedEntry>,
    last: Option<FeedEntry>,
    upstream: Upstream,
    waiters: Vec<oneshot::Sender<Result<(), FeedRefusal>>>,
}

struct State {
    feeds: HashMap<ChannelId, Feed>,
    /// Per slot: its connection is up.
    up: Vec<bool>,
}

#[derive(Clone)]
struct FeedMetrics {
    subscribed: IntGaugeVec,
    entries: IntCounterVec,
    missed: IntCounterVec,
    refused: IntCounterVec,
}

impl FeedMetrics {
    fn new(metrics: &Metrics) -> Self {
        let subscribed = IntGaugeVec::new(
            Opts::new(
                "tsgw_feed_subscribed",
                "1 while the upstream subscription of a channel feed is granted on a live connection",
            ),
            &["channel"],
        )
        .expect("valid metric");
        let entries = IntCounterVec::new(
            Opts::new(
                "tsgw_feed_entries_total",
                "Entries ThingSpeak relayed on a channel feed, each counted once",
            ),
            &["channel"],
        )
        .expect("valid metric");
        let missed = IntCounterVec::new(
            Opts::new(
                "tsgw_feed_missed_entries_total",
                "Entries a channel feed skipped (entry ids jumped: written while no subscription was up)",
            ),
            &["channel"],
        )
        .expect("valid metric");
        let refused = IntCounterVec::new(
            Opts::new(
                "tsgw_feed_refused_total",
                "Feed subscriptions the gateway could not serve, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let registry = metrics.registry();
        for c in [
            Box::new(subscribed.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(entries.clone()),
            Box::new(missed.clone()),
            Box::new(refused.clone()),
        ] {
            // A second hub on one registry (tests) keeps working, unexported.
            if let Err(e) = registry.register(c) {
                tracing::debug!(error = %e, "feed metrics already registered");
            }
        }
        Self {
            subscribed,
            entries,
            missed,
            refused,
        }
    }
}

struct Inner {
    routes: Routes,
    read_keys: HashMap<ChannelId, String>,
    ports: Vec<mpsc::UnboundedSender<ChannelId>>,
    receivers: Mutex<Vec<Option<mpsc::UnboundedReceiver<ChannelId>>>>,
    state: Mutex<State>,
    metrics: FeedMetrics,
    suback_wait: Duration,
}

/// The feeds of every channel, shared by all consumers. Cheap to clone.
#[derive(Clone)]
pub struct FeedHub {
    inner: Arc<Inner>,
}

/// What a channel's feed is doing, for health checks and the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedStatus {
    pub channel: ChannelId,
    /// `subscribed`, `connection_down`, `waiting` (asked, no SUBACK yet) or
    /// `refused`.
    pub state: &'static str,
    pub last_entry_id: Option<u64>,
}

impl FeedHub {
    /// A hub for the forwarders `config` makes (one per credential set).
    pub fn new(config: &UpstreamConfig, metrics: &Metrics) -> Self {
        let slots = config.connections.len() + usize::from(config.has_primary());
        let (ports, receivers): (Vec<_>, Vec<_>) = (0..slots)
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                (tx, Some(rx))
            })
            .unzip();
        let read_keys = config
            .channels
            .iter()
            .filter_map(|(id, o)| {
                let id = id.parse::<ChannelId>().ok()?;
                Some((id, o.read_key.as_ref()?.expose().to_owned()))
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                routes: Routes::new(config),
                read_keys,
                ports,
                receivers: Mutex::new(receivers),
                state: Mutex::new(State {
                    feeds: HashMap::new(),
                    up: vec![false; slots],
                }),
                metrics: FeedMetrics::new(metrics),
                suback_wait: SUBACK_WAIT,
            }),
        }
    }

    /// The port of forwarder `slot` (connection index; the top-level
    /// credentials come after the listed ones). Taken once.
    pub(crate) fn port(&self, slot: usize) -> Option<FeedPort> {
        let rx = self
            .inner
            .receivers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(slot)?
            .take()?;
        Some(FeedPort {
            hub: self.clone(),
            slot,
            requests: rx,
            wanted: BTreeSet::new(),
        })
    }

    /// Every feed asked for, and how it stands.
    pub fn status(&self) -> Vec<FeedStatus> {
        let state = self.lock();
        let mut out: Vec<FeedStatus> = state
            .feeds
            .iter()
            .map(|(channel, f)| FeedStatus {
                channel: *channel,
                state: match (&f.upstream, state.up.get(f.slot).copied().unwrap_or(false)) {
                    (Upstream::Refused(_), _) => "refused",
                    (_, false) => "connection_down",
                    (Upstream::Wanted, true) => "waiting",
                    (Upstream::Granted, true) => "subscribed",
                },
                last_entry_id: f.last.as_ref().map(|e| e.entry_id),
            })
            .collect();
        out.sort_by_key(|s| s.channel);
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, reason: &'static str, message: String) -> FeedRefusal {
        self.inner
            .metrics
            .refused
            .with_label_values(&[reason])
            .inc();
        FeedRefusal { reason, message }
    }

    fn tap(feed: &Feed) -> FeedTap {
        FeedTap {
            last: feed.last.clone(),
            entries: feed.tx.subscribe(),
        }
    }

    /// Taps `channel`, subscribing upstream first if nobody did yet.
    pub async fn tap_channel(
        &self,
        channel: ChannelId,
        read_key: Option<String>,
    ) -> Result<FeedTap, FeedRefusal> {
        if let (Some(given), Some(configured)) = (&read_key, self.inner.read_keys.get(&channel)) {
            if given != configured {
                return Err(self.refuse(
                    "read_key",
                    format!(
                        "channel {channel}: the read key in the topic is not the channel's \
                         (upstream.channels.\"{channel}\".read_key)"
                    ),
                ));
            }
        }
        let Some(slot) = self.inner.routes.slot(channel) else {
            return Err(self.refuse(
                "no_credentials",
                format!(
                    "channel {channel}: no upstream credentials cover it (list it in an \
                     [[upstream.connections]] entry, or set the top-level credentials)"
                ),
            ));
        };
        let (waiter, answer) = oneshot::channel();
        {
            let mut state = self.lock();
            let up = state.up.get(slot).copied().unwrap_or(false);
            let feed = state.feeds.entry(channel).or_insert_with(|| Feed {
                slot,
                tx: broadcast::channel(FEED_CAPACITY).0,
                last: None,
                upstream: Upstream::Refused(String::new()),
                waiters: Vec::new(),
            });
            match &feed.upstream {
                Upstream::Granted => return Ok(Self::tap(feed)),
                // Asked before and refused: ask again (rights may have changed).
                Upstream::Refused(_) => {
                    feed.upstream = Upstream::Wanted;
                    let _ = self.inner.ports[slot].send(channel);
                }
                Upstream::Wanted => {}
            }
            if !up {
                // Made when the connection is up; entries come from then on.
                return Ok(Self::tap(feed));
            }
            feed.waiters.push(waiter);
        }
        let answer = tokio::time::timeout(self.inner.suback_wait, answer).await;
        match answer {
            Ok(Ok(Err(refusal))) => {
                self.inner
                    .metrics
                    .refused
                    .with_label_values(&[refusal.reason])
                    .inc();
                Err(refusal)
            }
            // Granted, or no answer in time (the subscription stays wanted).
            Ok(Ok(Ok(()))) | Ok(Err(_)) | Err(_) => {
                let state = self.lock();
                match state.feeds.get(&channel) {
                    Some(feed) => Ok(Self::tap(feed)),
                    None => {
                        Err(self.refuse("unavailable", format!("channel {channel}: feed gone")))
                    }
                }
            }
        }
    }
}

impl FeedSource for FeedHub {
    fn subscribe(&self, channel: ChannelId, read_key: Option<String>) -> FeedFuture<'_> {
        Box::pin(self.tap_channel(channel, read_key))
    }
}

/// A forwarder's end of the hub: the channels to subscribe on its connection,
/// and where to report what happens to them.
pub(crate) struct FeedPort {
    hub: FeedHub,
    slot: usize,
    requests: mpsc::UnboundedReceiver<ChannelId>,
    /// Channels consumers want on this connection.
    wanted: BTreeSet<ChannelId>,
}

impl FeedPort {
    /// The next channel a consumer asked for (to subscribe now if connected).
    pub(crate) async fn next_request(&mut self) -> Option<ChannelId> {
        let channel = self.requests.recv().await?;
        self.wanted.insert(channel);
        Some(channel)
    }

    pub(crate) fn wanted(&self) -> &BTreeSet<ChannelId> {
        &self.wanted
    }

    pub(crate) fn is_wanted(&self, channel: ChannelId) -> bool {
        self.wanted.contains(&channel)
    }

    pub(crate) fn connection_up(&self) {
        let mut state = self.hub.lock();
        if let Some(up) = state.up.get_mut(self.slot) {
            *up = true;
        }
    }

    /// The connection ended: every subscription on it is gone and will be
    /// made again on the next one.
    pub(crate) fn connection_down(&self) {
        let mut state = self.hub.lock();
        if let Some(up) = state.up.get_mut(self.slot) {
            *up = false;
        }
        for (channel, feed) in state.feeds.iter_mut() {
            if feed.slot != self.slot {
                continue;
            }
            if feed.upstream == Upstream::Granted {
                feed.upstream = Upstream::Wanted;
            }
            self.hub
                .inner
                .metrics
                .subscribed
                .with_label_values(&[&channel.to_string()])
                .set(0);
        }
    }

    /// ThingSpeak answered the SUBSCRIBE of `channel`'s feed.
    pub(crate) fn answered(&self, channel: ChannelId, granted: bool) {
        if !self.is_wanted(channel) {
            return;
        }
        let mut state = self.hub.lock();
        let Some(feed) = state.feeds.get_mut(&channel) else {
            return;
        };
        let label = channel.to_string();
        let result = if granted {
            if feed.upstream != Upstream::Granted {
                tracing::info!(%channel, "channel feed subscribed upstream");
            }
            feed.upstream = Upstream::Granted;
            self.hub
                .inner
                .metrics
                .subscribed
                .with_label_values(&[&label])
                .set(1);
            Ok(())
        } else {
            let message = format!(
                "channel {channel}: ThingSpeak refused the subscription to its feed (is the \
                 MQTT device authorised to subscribe to this channel?)"
            );
            tracing::warn!(%channel, "{message}");
            feed.upstream = Upstream::Refused(message.clone());
            self.hub
                .inner
                .metrics
                .subscribed
                .with_label_values(&[&label])
                .set(0);
            Err(FeedRefusal {
                reason: "upstream_refused",
                message,
            })
        };
        for waiter in feed.waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }

    /// An entry ThingSpeak relayed on `channel`'s feed.
    pub(crate) fn entry(&self, channel: ChannelId, payload: &bytes::Bytes) {
        let mut state = self.hub.lock();
        let Some(feed) = state.feeds.get_mut(&channel) else {
            return;
        };
        let entry: EntryJson = match serde_json::from_slice(payload) {
            Ok(e) => e,
            // The forwarder's confirmation logs unreadable entries already.
            Err(_) => return,
        };
        let last_id = feed.last.as_ref().map(|e| e.entry_id);
        if last_id.is_some_and(|last| entry.entry_id <= last) {
            // The newest entry again, after a (re-)subscription.
            return;
        }
        let label = channel.to_string();
        if let Some(last) = last_id {
            let skipped = entry.entry_id - last - 1;
            if skipped > 0 {
                self.hub
                    .inner
                    .metrics
                    .missed
                    .with_label_values(&[&label])
                    .inc_by(skipped);
                tracing::warn!(
                    %channel,
                    after = last,
                    next = entry.entry_id,
                    skipped,
                    "channel feed skipped entries written while no subscription was up"
                );
            }
        }
        self.hub
            .inner
            .metrics
            .entries
            .with_label_values(&[&label])
            .inc();
        let entry = FeedEntry {
            channel,
            entry_id: entry.entry_id,
            json: payload.clone(),
            entry: Arc::new(entry),
        };
        feed.last = Some(entry.clone());
        // No receiver is fine: a consumer that comes later starts from `last`.
        let _ = feed.tx.send(entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConnectionConfig;

    fn ch(n: u64) -> ChannelId {
        ChannelId::new(n).unwrap()
    }

    fn entry(id: u64, field1: &str) -> bytes::Bytes {
        bytes::Bytes::from(format!(
            r#"{{"channel_id":7,"created_at":"2026-01-01T00:00:{id:02}Z","entry_id":{id},"field1":"{field1}"}}"#
        ))
    }

    #[tokio::test]
    async fn one_subscription_shared_deduplicated_and_gaps_counted() {
        let metrics = Metrics::new();
        let hub = FeedHub::new(&UpstreamConfig::default(), &metrics);
        let mut port = hub.port(0).unwrap();
        assert!(hub.port(0).is_none(), "a port is taken once");
        port.connection_up();
        let h = hub.clone();
        let first = tokio::spawn(async move { h.tap_channel(ch(7), None).await });
        assert_eq!(port.next_request().await, Some(ch(7)));
        port.answered(ch(7), true);
        let mut a = first.await.unwrap().unwrap();
        assert!(a.last.is_none());
        port.entry(ch(7), &entry(1, "a"));
        // A second consumer shares it: no new request, and it starts from the newest entry.
        let b = hub.tap_channel(ch(7), None).await.unwrap();
        assert_eq!(b.last.as_ref().map(|e| e.entry_id), Some(1));
        assert!(port.requests.try_recv().is_err());
        // The newest entry again (re-subscription), then a gap of one.
        port.entry(ch(7), &entry(1, "a"));
        port.entry(ch(7), &entry(3, "c"));
        let got = a.entries.recv().await.unwrap();
        assert_eq!((got.entry_id, &got.json), (1, &entry(1, "a")));
        assert_eq!(a.entries.recv().await.unwrap().entry_id, 3);
        assert!(a.entries.try_recv().is_err());
        let text = metrics.render();
        assert!(
            text.contains("tsgw_feed_missed_entries_total{channel=\"7\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tsgw_feed_entries_total{channel=\"7\"} 2"),
            "{text}"
        );
        assert_eq!(hub.status()[0].state, "subscribed");
        port.connection_down();
        assert_eq!(hub.status()[0].state, "connection_down");
    }

    #[tokio::test]
    async fn refusals_name_their_reason() {
        let metrics = Metrics::new();
        let mut config = UpstreamConfig::default();
        config.connections.push(ConnectionConfig {
            channels: vec![ch(5)],
            ..Default::default()
        });
        config.channels.insert(
            "5".into(),
            crate::config::ChannelOverride {
                read_key: Some(tsgw_core::Secret::new("RK")),
                ..Default::default()
            },
        );
        // Only [[upstream.connections]]: channel 6 has no credentials.
        assert!(!config.has_primary());
        let hub = FeedHub::new(&config, &metrics);
        let e = hub.tap_channel(ch(6), None).await.unwrap_err();
        assert_eq!(e.reason, "no_credentials");
        let e = hub
            .tap_channel(ch(5), Some("WRONG".into()))
            .await
            .unwrap_err();
        assert_eq!(e.reason, "read_key");
        let mut port = hub.port(0).unwrap();
        port.connection_up();
        let h = hub.clone();
        let asked = tokio::spawn(async move { h.tap_channel(ch(5), Some("RK".into())).await });
        assert_eq!(port.next_request().await, Some(ch(5)));
        port.answered(ch(5), false);
        assert_eq!(asked.await.unwrap().unwrap_err().reason, "upstream_refused");
        assert_eq!(hub.status()[0].state, "refused");
        let text = metrics.render();
        for reason in ["no_credentials", "read_key", "upstream_refused"] {
            assert!(
                text.contains(&format!("tsgw_feed_refused_total{{reason=\"{reason}\"}} 1")),
                "{reason}: {text}"
            );
        }
    }
}

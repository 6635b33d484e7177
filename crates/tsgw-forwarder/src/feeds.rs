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
//! send the channel's newest entry again, which is dropped here. The newest
//! entry, which subscribing delivers, is never missed; with the channel's
//! rate limit of at least a second a renewal's reconnect usually misses
//! none. When the entry id jumps after the subscription was down (an outage),
//! the entries in between are read from ThingSpeak's read API
//! (`feeds.json?results=N`, with the channel's read key) and relayed first,
//! in order; what cannot be read is counted as missed and logged. A jump on a
//! live subscription is entries ThingSpeak does not relay (bulk writes): not
//! relayed here either.

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

/// Distinct channels the hub serves feeds for. Local clients choose the ids
/// they subscribe to; past this many, new ones are refused (`too_many_feeds`).
pub const MAX_FEEDS: usize = 256;

/// A refused feed is not asked for again sooner than this: a device that
/// resubscribes in a loop must not make the gateway hammer ThingSpeak.
pub const ASK_AGAIN_AFTER: Duration = Duration::from_secs(60);

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
    /// ThingSpeak refused it (`at`: when; `None`: never asked yet).
    Refused {
        message: String,
        at: Option<std::time::Instant>,
    },
}

struct Feed {
    slot: usize,
    tx: broadcast::Sender<FeedEntry>,
    last: Option<FeedEntry>,
    upstream: Upstream,
    waiters: Vec<oneshot::Sender<Result<(), FeedRefusal>>>,
    /// The subscription was down since the last entry: entries may have
    /// been written meanwhile.
    interrupted: bool,
    /// Entries held back while the skipped ones are read, oldest first.
    filling: Option<Vec<FeedEntry>>,
    /// Granted once: only such channels get a `channel` metric label (a
    /// local client asking for arbitrary ids must not grow the metrics).
    ever_granted: bool,
}

/// Entries a feed skipped after an outage: ids `after + 1 .. before`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GapFill {
    pub(crate) channel: ChannelId,
    pub(crate) after: u64,
    pub(crate) before: u64,
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
    filled: IntCounterVec,
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
        let filled = IntCounterVec::new(
            Opts::new(
                "tsgw_feed_filled_entries_total",
                "Entries a channel feed skipped during an outage, read from the read API and relayed",
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
            Box::new(filled.clone()),
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
            filled,
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
                    (Upstream::Refused { at: Some(_), .. }, _) => "refused",
                    (Upstream::Refused { at: None, .. }, _) => "waiting",
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
            if state.feeds.len() >= MAX_FEEDS && !state.feeds.contains_key(&channel) {
                drop(state);
                return Err(self.refuse(
                    "too_many_feeds",
                    format!(
                        "channel {channel}: the gateway already serves {MAX_FEEDS} channel feeds"
                    ),
                ));
            }
            let up = state.up.get(slot).copied().unwrap_or(false);
            let feed = state.feeds.entry(channel).or_insert_with(|| Feed {
                slot,
                tx: broadcast::channel(FEED_CAPACITY).0,
                last: None,
                upstream: Upstream::Refused {
                    message: String::new(),
                    at: None,
                },
                waiters: Vec::new(),
                interrupted: false,
                filling: None,
                ever_granted: false,
            });
            match &feed.upstream {
                Upstream::Granted => return Ok(Self::tap(feed)),
                // Refused a while ago: ask again (rights may have changed).
                Upstream::Refused {
                    message,
                    at: Some(at),
                } if at.elapsed() < ASK_AGAIN_AFTER => {
                    let message = message.clone();
                    drop(state);
                    return Err(self.refuse("upstream_refused", message));
                }
                Upstream::Refused { .. } => {
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
            feed.interrupted |= feed.last.is_some();
            if feed.ever_granted {
                self.hub
                    .inner
                    .metrics
                    .subscribed
                    .with_label_values(&[&channel.to_string()])
                    .set(0);
            }
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
            feed.ever_granted = true;
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
            feed.upstream = Upstream::Refused {
                message: message.clone(),
                at: Some(std::time::Instant::now()),
            };
            if feed.ever_granted {
                self.hub
                    .inner
                    .metrics
                    .subscribed
                    .with_label_values(&[&label])
                    .set(0);
            }
            Err(FeedRefusal {
                reason: "upstream_refused",
                message,
            })
        };
        for waiter in feed.waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }

    /// An entry ThingSpeak relayed on `channel`'s feed. Returns the entries
    /// to read first when it shows that an outage skipped some.
    pub(crate) fn entry(&self, channel: ChannelId, payload: &bytes::Bytes) -> Option<GapFill> {
        let mut state = self.hub.lock();
        let feed = state.feeds.get_mut(&channel)?;
        // The forwarder's confirmation logs unreadable entries already.
        let parsed: EntryJson = serde_json::from_slice(payload).ok()?;
        let entry = FeedEntry {
            channel,
            entry_id: parsed.entry_id,
            json: payload.clone(),
            entry: Arc::new(parsed),
        };
        if let Some(held) = &mut feed.filling {
            if held.last().is_none_or(|e| entry.entry_id > e.entry_id) {
                held.push(entry);
            }
            return None;
        }
        let last_id = feed.last.as_ref().map(|e| e.entry_id);
        if last_id.is_some_and(|last| entry.entry_id <= last) {
            // The newest entry again, after a (re-)subscription.
            return None;
        }
        let interrupted = std::mem::take(&mut feed.interrupted);
        if let Some(after) = last_id.filter(|last| entry.entry_id > last + 1) {
            if interrupted {
                let gap = GapFill {
                    channel,
                    after,
                    before: entry.entry_id,
                };
                feed.filling = Some(vec![entry]);
                return Some(gap);
            }
            tracing::debug!(%channel, after, next = entry.entry_id,
                "entry ids skipped on a live subscription: entries ThingSpeak does not relay (bulk writes)");
        }
        self.publish(feed, entry);
        None
    }

    /// The read API's answer for `gap`: the skipped entries it holds are
    /// relayed in order, then the entries held back meanwhile.
    pub(crate) fn filled(&self, gap: GapFill, read: Result<Vec<EntryJson>, String>) {
        let mut state = self.hub.lock();
        let Some(feed) = state.feeds.get_mut(&gap.channel) else {
            return;
        };
        let held = feed.filling.take().unwrap_or_default();
        let label = gap.channel.to_string();
        let skipped = gap.before - gap.after - 1;
        let mut found = 0;
        let why = match read {
            Ok(mut entries) => {
                entries.sort_by_key(|e| e.entry_id);
                entries.dedup_by_key(|e| e.entry_id);
                for e in entries
                    .into_iter()
                    .filter(|e| e.entry_id > gap.after && e.entry_id < gap.before)
                {
                    let Ok(json) = serde_json::to_vec(&e) else {
                        continue;
                    };
                    found += 1;
                    let entry = FeedEntry {
                        channel: gap.channel,
                        entry_id: e.entry_id,
                        json: bytes::Bytes::from(json),
                        entry: Arc::new(e),
                    };
                    self.publish(feed, entry);
                }
                "not in the read API's answer".to_owned()
            }
            Err(why) => why,
        };
        let m = &self.hub.inner.metrics;
        m.filled.with_label_values(&[&label]).inc_by(found);
        if found > 0 {
            tracing::info!(channel = %gap.channel, found, "entries written during the outage read and relayed");
        }
        if skipped > found {
            m.missed
                .with_label_values(&[&label])
                .inc_by(skipped - found);
            tracing::warn!(
                channel = %gap.channel,
                after = gap.after,
                next = gap.before,
                missed = skipped - found,
                "channel feed skipped entries written while no subscription was up: {why}"
            );
        }
        for entry in held {
            if feed
                .last
                .as_ref()
                .is_none_or(|l| entry.entry_id > l.entry_id)
            {
                self.publish(feed, entry);
            }
        }
    }

    fn publish(&self, feed: &mut Feed, entry: FeedEntry) {
        self.hub
            .inner
            .metrics
            .entries
            .with_label_values(&[&entry.channel.to_string()])
            .inc();
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
        // The newest entry again (re-subscription), then a jump on a live
        // subscription (a bulk write, not relayed by ThingSpeak): no gap fill.
        assert_eq!(port.entry(ch(7), &entry(1, "a")), None);
        assert_eq!(port.entry(ch(7), &entry(3, "c")), None);
        let got = a.entries.recv().await.unwrap();
        assert_eq!((got.entry_id, &got.json), (1, &entry(1, "a")));
        assert_eq!(a.entries.recv().await.unwrap().entry_id, 3);
        assert!(a.entries.try_recv().is_err());
        // An outage: the jump after it is filled from the read API, the
        // entries arriving meanwhile held back, then all in order.
        port.connection_down();
        port.connection_up();
        assert_eq!(hub.status()[0].state, "waiting");
        port.answered(ch(7), true);
        let gap = port.entry(ch(7), &entry(7, "g")).expect("a gap to fill");
        assert_eq!((gap.after, gap.before), (3, 7));
        assert_eq!(port.entry(ch(7), &entry(8, "h")), None);
        assert!(a.entries.try_recv().is_err(), "held back while filling");
        let read: Vec<EntryJson> = [4u64, 6, 9]
            .iter()
            .map(|id| serde_json::from_slice(&entry(*id, "r")).unwrap())
            .collect();
        port.filled(gap, Ok(read));
        let ids: Vec<u64> = std::iter::from_fn(|| a.entries.try_recv().ok())
            .map(|e| e.entry_id)
            .collect();
        assert_eq!(ids, [4, 6, 7, 8]);
        let text = metrics.render();
        assert!(
            text.contains("tsgw_feed_missed_entries_total{channel=\"7\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tsgw_feed_filled_entries_total{channel=\"7\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tsgw_feed_entries_total{channel=\"7\"} 6"),
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
        // Asked again within the minute: refused at once, ThingSpeak not asked.
        let again = hub.tap_channel(ch(5), None).await.unwrap_err();
        assert_eq!(again.reason, "upstream_refused");
        assert!(port.requests.try_recv().is_err());
        let text = metrics.render();
        assert!(
            !text.contains("tsgw_feed_subscribed{channel=\"5\"}"),
            "a channel never granted gets no label: {text}"
        );
        for (reason, n) in [
            ("no_credentials", 1),
            ("read_key", 1),
            ("upstream_refused", 2),
        ] {
            assert!(
                text.contains(&format!(
                    "tsgw_feed_refused_total{{reason=\"{reason}\"}} {n}"
                )),
                "{reason}: {text}"
            );
        }
    }

    #[tokio::test]
    async fn the_number_of_feeds_is_bounded() {
        let hub = FeedHub::new(&UpstreamConfig::default(), &Metrics::new());
        // Connection down: each tap is granted at once (made on connect).
        for id in 1..=MAX_FEEDS as u64 {
            hub.tap_channel(ch(id), None).await.unwrap();
        }
        let e = hub.tap_channel(ch(100_000), None).await.unwrap_err();
        assert_eq!(e.reason, "too_many_feeds");
        // Channels already served still are.
        hub.tap_channel(ch(1), None).await.unwrap();
    }
}

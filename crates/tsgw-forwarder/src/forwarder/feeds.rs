//! Channel feeds for local consumers on this forwarder's connection: the
//! subscriptions the hub wants, made on every connection and answered back,
//! the entries relayed to the hub, and the renewal of a connection that
//! carries them before ThingSpeak's idle limit closes it.
//!
//! The feed subscription is the same `channels/<id>/subscribe` the
//! confirmation uses, so it shares the forwarder's subscription state: a
//! SUBACK or entry serves both, and neither changes what the other decides
//! (an entry is evidence of what ThingSpeak stored, whoever asked for it).

use bytes::Bytes;
use thingspeak::{ChannelId, Topic};
use tokio::time::Instant;

use crate::feeds::{FeedPort, GapFill};
use crate::rest::ReadResult;

/// The read API's answer for a gap: the entries, or why there are none.
pub(crate) type FillDone = (GapFill, Result<Vec<thingspeak::EntryJson>, String>);

/// Entries asked for beyond a gap's size: writes that came meanwhile.
const FILL_SLACK: u64 = 20;

use super::{Conn, Forwarder};

impl Forwarder {
    /// Serves the hub's feeds on this forwarder's connections.
    pub(crate) fn with_feeds(mut self, port: FeedPort) -> Self {
        self.feeds = Some(port);
        self
    }

    /// A consumer asked for `channel`: subscribe now if connected (again if
    /// already subscribed: the hub waits for an answer).
    pub(super) fn on_feed_request(&mut self, channel: ChannelId) {
        self.feed_refused.remove(&channel);
        if matches!(self.conn, Conn::Up { .. }) {
            // If it fails (request channel full), the next pass subscribes.
            self.subscribe(channel);
        }
    }

    /// Subscribes every wanted feed the connection does not carry yet.
    pub(super) fn maintain_feeds(&mut self) {
        let Some(port) = &self.feeds else {
            return;
        };
        if !matches!(self.conn, Conn::Up { .. }) {
            return;
        }
        let missing: Vec<ChannelId> = port
            .wanted()
            .iter()
            .filter(|c| !self.subs.contains_key(c) && !self.feed_refused.contains(c))
            .copied()
            .collect();
        for channel in missing {
            if !self.subscribe(channel) {
                // The request channel is full: the next pass tries again.
                break;
            }
        }
    }

    pub(super) fn feeds_connected(&mut self) {
        self.feed_refused.clear();
        if let Some(port) = &self.feeds {
            port.connection_up();
        }
        self.maintain_feeds();
    }

    pub(super) fn feed_answered(&mut self, channel: Option<ChannelId>, granted: bool) {
        let (Some(port), Some(channel)) = (&self.feeds, channel) else {
            return;
        };
        if !granted && port.is_wanted(channel) {
            // Not asked again on this connection (no loop of refusals); a new
            // consumer or the next connection asks again.
            self.feed_refused.insert(channel);
        }
        port.answered(channel, granted);
    }

    pub(super) fn feed_message(&mut self, topic: &str, payload: &Bytes) {
        let Some(port) = &self.feeds else {
            return;
        };
        let gap = match Topic::parse(topic) {
            Ok(Topic::Subscribe { channel } | Topic::SubscribeJson { channel, .. }) => {
                port.entry(channel, payload)
            }
            _ => None,
        };
        if let Some(gap) = gap {
            self.fill_gap(gap);
        }
    }

    /// Reads the entries an outage skipped (the newest `gap + slack`, with
    /// the channel's read key); the answer comes back as an event.
    fn fill_gap(&mut self, gap: GapFill) {
        let tx = self.fills_tx.clone();
        let Some(client) = self.bulk.clone().filter(|_| self.config.read_api) else {
            let _ = tx.try_send((gap, Err("the read API is off (read_api = false)".into())));
            return;
        };
        let key = self.config.read_key(gap.channel);
        let results =
            usize::try_from(gap.before - gap.after - 1 + FILL_SLACK).unwrap_or(usize::MAX);
        let timeout = self.confirm_timeout;
        tokio::spawn(async move {
            let read = match client.read_newest(gap.channel, results, key.as_ref(), timeout).await {
                ReadResult::Entries(list) => Ok(list
                    .into_iter()
                    .map(|e| {
                        let mut entry = thingspeak::EntryJson::new(gap.channel, e.entry_id, e.created_at);
                        for t in thingspeak::payload::all_targets() {
                            entry.set(t, e.get(t).map(str::to_owned));
                        }
                        entry
                    })
                    .collect()),
                ReadResult::NoAccess => Err(
                    "the read API refused (a private channel needs upstream.channels.\"<id>\".read_key)".into(),
                ),
                ReadResult::Failed(why) => Err(format!("the read API failed: {why}")),
            };
            let _ = tx.send((gap, read)).await;
        });
    }

    pub(super) fn on_fill_done(&mut self, (gap, read): FillDone) {
        if let Some(port) = &self.feeds {
            port.filled(gap, read);
        }
    }

    /// When a connection that carries feeds must be renewed: ThingSpeak
    /// closes one that published nothing for its idle limit, without
    /// warning, and relays nothing to a closed connection. Renewing before
    /// (reconnect and subscribe at once) leaves a gap of one reconnect,
    /// which the newest entry delivered on subscribing covers.
    pub(super) fn feed_renew_at(&self) -> Option<Instant> {
        let port = self.feeds.as_ref()?;
        if port.wanted().is_empty() {
            return None;
        }
        // A publish handed to the connection is written (or times out) first.
        if self.in_flight.is_some() {
            return None;
        }
        match &self.conn {
            Conn::Up { last_publish, .. } => Some(*last_publish + self.renew_idle_after),
            _ => None,
        }
    }

    pub(super) fn renew_for_feeds(&mut self, now: Instant) {
        tracing::info!(
            connection = %self.connection,
            "renewing the connection that carries channel feeds before ThingSpeak's idle limit \
             ({:.0} s without a publish)",
            self.renew_idle_after.as_secs_f64()
        );
        self.renew_connection(now);
    }
}

/// The next channel a consumer asked for; never resolves without a hub.
pub(super) async fn next_feed_request(port: &mut Option<FeedPort>) -> Option<ChannelId> {
    match port {
        Some(p) => p.next_request().await,
        None => std::future::pending().await,
    }
}

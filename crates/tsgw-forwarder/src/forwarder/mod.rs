//! The forwarder's loop: keeps one connection to ThingSpeak up (with
//! backoff), turns each channel's queued readings into one update per closed
//! rate-limit window, sends them (MQTT, or REST bulk for a backlog), and
//! removes the readings once the update is delivered.
//!
//! Per channel at most one update is outstanding (unconfirmed, or in a bulk
//! call). That is what makes confirmation sound: if ThingSpeak stored the
//! outstanding update, it is the channel's newest entry, and subscribing
//! (again) makes ThingSpeak deliver exactly that entry. See README.md.
//!
//! One MQTT publish is in flight at a time over the connection. QoS 0
//! publishes carry no packet id, so this is what lets an `Outgoing::Publish`
//! event be matched to its update. Channel updates are a second apart at
//! best, so this costs nothing.
//!
//! The state machine is sans-I/O at its core: events (`on_event`,
//! `on_bulk_done`) and passes over the queue (`send_due`) change state and
//! hand requests to rumqttc's client or a spawned bulk call; the tests feed
//! events by hand against the in-memory store. Its parts:
//! - `link`: the connection lifecycle (connect, up, lost, stuck, renewed, shutdown);
//! - `send`: sending and scheduling windows (what goes, and when);
//! - `confirm`: confirmation and in-doubt resolution (echo, check, conflicts);
//! - `backfill`: bulk calls for a backlog, the backlog policies and progress.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rumqttc::AsyncClient;
use rustls::ClientConfig;
use thingspeak::ChannelId;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tsgw_core::throttle::LogThrottle;
use tsgw_core::{Metrics, ReadingStore};

use crate::backoff::Backoff;
use crate::config::UpstreamConfig;
use crate::driver::{ConnEvent, ConnEventKind};
use crate::error::ForwarderError;
use crate::feeds::FeedPort;
use crate::progress::Progress;
use crate::rest::BulkClient;
use crate::schedule::Schedule;

mod backfill;
mod confirm;
mod doubt;
mod feeds;
mod link;
mod poison;
mod send;
#[cfg(test)]
mod tests;

use backfill::{BulkDone, BulkState, BULK_FAILURE_LOG_EVERY};
use confirm::{Pending, Sub};
use doubt::{Evidence, ReadDone};
use link::WRITE_TIMEOUT;
use poison::{LastWrite, Strikes};

/// Wait before retrying after the store failed.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// Sleep used when nothing is scheduled (a push or an event wakes us earlier).
const IDLE: Duration = Duration::from_secs(3600);

enum Conn {
    Down {
        retry_at: Instant,
    },
    Connecting {
        generation: u64,
        client: AsyncClient,
        task: JoinHandle<()>,
    },
    Up {
        generation: u64,
        client: AsyncClient,
        task: JoinHandle<()>,
        since: Instant,
        /// When this connection last wrote a PUBLISH (or came up).
        last_publish: Instant,
    },
}

/// The update handed to the connection and not yet known to be written.
struct InFlight {
    generation: u64,
    channel: ChannelId,
    issued: Instant,
}

pub(crate) struct Forwarder {
    config: UpstreamConfig,
    tls: Option<Arc<ClientConfig>>,
    store: Arc<dyn ReadingStore>,
    metrics: Metrics,
    connection: String,
    schedule: Schedule,
    backoff: Backoff,
    conn: Conn,
    in_flight: Option<InFlight>,
    pending: HashMap<ChannelId, Pending>,
    /// `created_at` values already delivered, per channel.
    used: HashMap<ChannelId, BTreeSet<DateTime<Utc>>>,
    /// Subscriptions of the current connection, and SUBSCRIBEs not yet written.
    subs: HashMap<ChannelId, Sub>,
    sub_order: VecDeque<ChannelId>,
    sub_pkids: HashMap<u16, ChannelId>,
    /// Channels whose subscription ThingSpeak refused: "written" counts.
    unconfirmable: HashSet<ChannelId>,
    bulk: Option<BulkClient>,
    bulk_state: HashMap<ChannelId, BulkState>,
    bulk_tx: mpsc::Sender<BulkDone>,
    bulk_rx: mpsc::Receiver<BulkDone>,
    /// A bulk call that fails on a dead link is retried every bulk interval
    /// per channel: one warning per channel per period, with the count.
    bulk_failure_log: LogThrottle,
    /// Channels whose backfill falls back to MQTT already logged.
    no_key_reported: HashSet<ChannelId>,
    /// Channels without the write key legacy auth needs, already logged.
    legacy_key_reported: HashSet<ChannelId>,
    /// Earliest time a channel needs looking at again (skips the queue scan on pushes).
    next_check: HashMap<ChannelId, Instant>,
    next_generation: u64,
    /// Publishes written so far (orders writes on one connection).
    write_seq: u64,
    /// Per channel: entries seen, the read API's answers, updates in doubt.
    evidence: HashMap<ChannelId, Evidence>,
    /// When this run started: windows older than this may have been written
    /// by the previous run.
    started_utc: DateTime<Utc>,
    reads_tx: mpsc::Sender<ReadDone>,
    reads_rx: mpsc::Receiver<ReadDone>,
    /// Closes right after each channel's publish, and parks.
    strikes: HashMap<ChannelId, Strikes>,
    last_write: Option<LastWrite>,
    /// Backlog gauges and the periodic backfill progress line.
    progress: Progress,
    refusal_reported: bool,
    store_failing: bool,
    renew_idle_after: Duration,
    confirm_timeout: Duration,
    started: Instant,
    events_tx: mpsc::Sender<ConnEvent>,
    events_rx: mpsc::Receiver<ConnEvent>,
    /// Channel feeds for local consumers carried on this connection.
    feeds: Option<FeedPort>,
    /// Feeds ThingSpeak refused on the current connection (not asked again on it).
    feed_refused: HashSet<ChannelId>,
    /// Read API answers for entries an outage made a feed skip.
    fills_tx: mpsc::Sender<feeds::FillDone>,
    fills_rx: mpsc::Receiver<feeds::FillDone>,
}

impl Forwarder {
    pub(crate) fn new(
        config: UpstreamConfig,
        connection: String,
        tls: Option<Arc<ClientConfig>>,
        bulk: Option<BulkClient>,
        store: Arc<dyn ReadingStore>,
        metrics: Metrics,
    ) -> Self {
        let now = Instant::now();
        let (default, overrides) = config.intervals();
        let backoff = Backoff::new(
            Duration::from_secs_f64(config.reconnect_min_secs),
            Duration::from_secs_f64(config.reconnect_max_secs),
        );
        let (events_tx, events_rx) = mpsc::channel(64);
        let (bulk_tx, bulk_rx) = mpsc::channel(16);
        let (reads_tx, reads_rx) = mpsc::channel(16);
        let (fills_tx, fills_rx) = mpsc::channel(16);
        let renew_idle_after = config.renew_idle_after();
        let confirm_timeout = Duration::from_secs_f64(config.confirm_timeout_secs);
        Self {
            config,
            tls,
            store,
            metrics,
            connection,
            schedule: Schedule::new(default, overrides, now),
            backoff,
            conn: Conn::Down { retry_at: now },
            in_flight: None,
            pending: HashMap::new(),
            used: HashMap::new(),
            subs: HashMap::new(),
            sub_order: VecDeque::new(),
            sub_pkids: HashMap::new(),
            unconfirmable: HashSet::new(),
            bulk,
            bulk_state: HashMap::new(),
            bulk_tx,
            bulk_rx,
            bulk_failure_log: LogThrottle::new(BULK_FAILURE_LOG_EVERY),
            no_key_reported: HashSet::new(),
            legacy_key_reported: HashSet::new(),
            next_check: HashMap::new(),
            next_generation: 0,
            write_seq: 0,
            evidence: HashMap::new(),
            started_utc: Utc::now(),
            reads_tx,
            reads_rx,
            strikes: HashMap::new(),
            last_write: None,
            progress: Progress::default(),
            refusal_reported: false,
            store_failing: false,
            renew_idle_after,
            confirm_timeout,
            started: now,
            events_tx,
            events_rx,
            feeds: None,
            feed_refused: HashSet::new(),
            fills_tx,
            fills_rx,
        }
    }

    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> Result<(), ForwarderError> {
        let pushed = self.store.pushed();
        self.metrics
            .upstream_connected
            .with_label_values(&[&self.connection])
            .set(0);
        loop {
            let now = Instant::now();
            if let Conn::Down { retry_at } = self.conn {
                if now >= retry_at {
                    self.connect()?;
                }
            }
            self.check_write_timeout(now);
            let wake = match self.send_due(now) {
                Ok(wake) => {
                    if self.store_failing {
                        self.store_failing = false;
                        tracing::info!("queue readable again");
                    }
                    wake
                }
                Err(e) => {
                    // Log the first failure loudly, not one line a second.
                    if self.store_failing {
                        tracing::debug!(error = %e, "queue still failing");
                    } else {
                        tracing::error!(error = %e, "forwarder cannot use the queue; retrying every second");
                    }
                    self.store_failing = true;
                    self.next_check.clear();
                    now + STORE_RETRY
                }
            };
            let mut wake = match &self.conn {
                Conn::Down { retry_at } => wake.min(*retry_at),
                _ => wake,
            };
            self.maintain_feeds();
            if let Some(at) = self.feed_renew_at() {
                if now >= at {
                    self.renew_for_feeds(now);
                    continue;
                }
                wake = wake.min(at);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(event) = self.events_rx.recv() => self.on_event(event),
                Some(done) = self.bulk_rx.recv() => self.on_bulk_done(done),
                Some(done) = self.reads_rx.recv() => self.on_read_done(done),
                Some(channel) = feeds::next_feed_request(&mut self.feeds) => self.on_feed_request(channel),
                Some(done) = self.fills_rx.recv() => self.on_fill_done(done),
                _ = pushed.notified() => {}
                _ = sleep_until(wake) => {}
            }
        }
        self.shut_down().await;
        Ok(())
    }

    fn on_event(&mut self, event: ConnEvent) {
        if Some(event.generation) != self.current_generation() {
            // A connection already given up on (e.g. after a write timeout).
            return;
        }
        // Any event may unblock any channel (the one publish in flight, a
        // subscription): look at all of them again.
        self.next_check.clear();
        match event.kind {
            ConnEventKind::Connected => {
                self.on_connected();
                self.feeds_connected();
            }
            ConnEventKind::Written => self.on_written(event.generation),
            ConnEventKind::SubscribeSent(pkid) => {
                if let Some(channel) = self.sub_order.pop_front() {
                    self.sub_pkids.insert(pkid, channel);
                }
            }
            ConnEventKind::SubAck { pkid, granted } => {
                let channel = self.sub_pkids.get(&pkid).copied();
                self.on_suback(pkid, granted);
                self.feed_answered(channel, granted);
            }
            ConnEventKind::Message { topic, payload } => {
                self.feed_message(&topic, &payload);
                self.on_message(&topic, &payload);
            }
            ConnEventKind::Closed(closed) => self.on_closed(closed),
        }
    }

    /// Moves every channel forward as far as it can go now. Returns when to
    /// look again.
    fn send_due(&mut self, now: Instant) -> Result<Instant, tsgw_core::StoreError> {
        let mut wake = now + IDLE;
        if let Some(f) = &self.in_flight {
            wake = wake.min(f.issued + WRITE_TIMEOUT);
        }
        let mut channels: BTreeSet<ChannelId> = self.store.channels()?.into_iter().collect();
        channels.extend(self.pending.keys().copied());
        for channel in channels {
            if let Some(at) = self.next_check.get(&channel) {
                if *at > now {
                    wake = wake.min(*at);
                    continue;
                }
            }
            let at = self.advance(channel, now)?;
            // Waits on an event or a push are not cached: the event clears
            // the cache, and a push must be seen.
            if at < now + IDLE {
                self.next_check.insert(channel, at);
            } else {
                self.next_check.remove(&channel);
            }
            wake = wake.min(at);
        }
        Ok(wake.max(now))
    }
}

/// Seconds since the Unix epoch, for timestamp gauges.
pub(super) fn unix_seconds(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

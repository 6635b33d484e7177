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

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use rumqttc::{AsyncClient, QoS};
use rustls::ClientConfig;
use thingspeak::{BulkEntry, ChannelId, EntryJson, Topic};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tsgw_core::throttle::LogThrottle;
use tsgw_core::{Metrics, QueueKey, ReadingStore};

use crate::backoff::Backoff;
use crate::batch::{aggregate, group, Batch, Group, Policies, Rejected};
use crate::config::{Auth, Backfill, UpstreamConfig};
use crate::connection::{mqtt_options, CONNECT_TIMEOUT_SECS, REQUEST_CHANNEL_CAPACITY};
use crate::driver::{drive, Closed, ConnEvent, ConnEventKind};
use crate::error::ForwarderError;
use crate::progress::{Backlog, Progress};
use crate::rest::{BulkClient, BulkResult};
use crate::schedule::Schedule;

/// Most readings looked at per channel and pass. More wait for later passes.
const PEEK_LIMIT: usize = 10_000;
/// A connection up this long is stable: the backoff starts over after it drops.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// A publish not written within this time means the connection is stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2 * CONNECT_TIMEOUT_SECS);
/// Wait before retrying after the store failed.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// Time allowed to say DISCONNECT at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Sleep used when nothing is scheduled (a push or an event wakes us earlier).
const IDLE: Duration = Duration::from_secs(3600);
/// Checks (subscribe again, wait for the channel's newest entry) that may find
/// no trace of an update before its readings get a fresh `created_at`. A
/// silently dropped publish fails one check, so this is only reached when
/// something else owns that timestamp (another writer), or on a link that
/// loses nearly everything.
const MAX_PROBES: u32 = 10;
/// Longest wait after HTTP 429 before the next bulk call.
const MAX_BULK_BACKOFF: Duration = Duration::from_secs(300);
/// At most one "bulk call failed" warning per channel this often (a 10-minute
/// outage logged 120 of them for 3 channels before).
const BULK_FAILURE_LOG_EVERY: Duration = Duration::from_secs(300);
/// `created_at` values remembered per channel (for late readings).
const USED_MEMORY: usize = 4096;

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

/// Where the outstanding update of a channel stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// To be (re)sent at the channel's next slot.
    Ready,
    /// Handed to the connection, not yet written.
    Writing,
    /// Written; waiting for ThingSpeak to relay it back.
    AwaitEcho { until: Instant },
    /// Subscribed again to get the channel's newest entry; waiting for it.
    Probe { until: Instant },
    /// The connection died after (maybe) writing it: check after reconnecting.
    InDoubt,
}

struct Pending {
    batch: Batch,
    stage: Stage,
    /// Times written to a connection.
    writes: u32,
    /// Checks that found no trace of it.
    probes: u32,
}

/// The connection's subscription of a channel's feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sub {
    Requested,
    Granted,
}

#[derive(Debug, Clone, Copy)]
struct BulkState {
    next_at: Instant,
    busy: bool,
    backoff: Duration,
    /// A call was refused for good (bad key...): the channel uses MQTT only.
    broken: bool,
}

/// The end of a bulk call, reported by its task.
struct BulkDone {
    channel: ChannelId,
    covered: Vec<QueueKey>,
    created_at: Vec<DateTime<Utc>>,
    result: BulkResult,
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
    /// Backlog gauges and the periodic backfill progress line.
    progress: Progress,
    refusal_reported: bool,
    store_failing: bool,
    renew_idle_after: Duration,
    confirm_timeout: Duration,
    started: Instant,
    events_tx: mpsc::Sender<ConnEvent>,
    events_rx: mpsc::Receiver<ConnEvent>,
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
            progress: Progress::default(),
            refusal_reported: false,
            store_failing: false,
            renew_idle_after,
            confirm_timeout,
            started: now,
            events_tx,
            events_rx,
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
            let wake = match &self.conn {
                Conn::Down { retry_at } => wake.min(*retry_at),
                _ => wake,
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(event) = self.events_rx.recv() => self.on_event(event),
                Some(done) = self.bulk_rx.recv() => self.on_bulk_done(done),
                _ = pushed.notified() => {}
                _ = sleep_until(wake) => {}
            }
        }
        self.shut_down().await;
        Ok(())
    }

    /// Starts a connection attempt with a fresh rumqttc event loop.
    fn connect(&mut self) -> Result<(), ForwarderError> {
        let options = mqtt_options(&self.config, self.tls.clone())?;
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
        let mut network = rumqttc::NetworkOptions::new();
        network.set_connection_timeout(CONNECT_TIMEOUT_SECS);
        eventloop.set_network_options(network);
        let generation = self.next_generation;
        self.next_generation += 1;
        tracing::debug!(connection = %self.connection, generation, "connecting upstream");
        let task = tokio::spawn(drive(eventloop, generation, self.events_tx.clone()));
        self.conn = Conn::Connecting {
            generation,
            client,
            task,
        };
        Ok(())
    }

    fn current_generation(&self) -> Option<u64> {
        match &self.conn {
            Conn::Down { .. } => None,
            Conn::Connecting { generation, .. } | Conn::Up { generation, .. } => Some(*generation),
        }
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
            ConnEventKind::Connected => self.on_connected(),
            ConnEventKind::Written => self.on_written(event.generation),
            ConnEventKind::SubscribeSent(pkid) => {
                if let Some(channel) = self.sub_order.pop_front() {
                    self.sub_pkids.insert(pkid, channel);
                }
            }
            ConnEventKind::SubAck { pkid, granted } => self.on_suback(pkid, granted),
            ConnEventKind::Message { topic, payload } => self.on_message(&topic, &payload),
            ConnEventKind::Closed(closed) => self.on_closed(closed),
        }
    }

    fn on_connected(&mut self) {
        let conn = std::mem::replace(
            &mut self.conn,
            Conn::Down {
                retry_at: Instant::now(),
            },
        );
        self.conn = match conn {
            Conn::Connecting {
                generation,
                client,
                task,
            } => {
                let now = Instant::now();
                Conn::Up {
                    generation,
                    client,
                    task,
                    since: now,
                    last_publish: now,
                }
            }
            other => other,
        };
        self.refusal_reported = false;
        self.next_check.clear();
        tracing::info!(
            connection = %self.connection,
            transport = self.config.transport.as_str(),
            "connected to ThingSpeak"
        );
        self.metrics
            .upstream_connected
            .with_label_values(&[&self.connection])
            .set(1);
        self.metrics
            .upstream_connects_total
            .with_label_values(&[&self.connection])
            .inc();
    }

    fn confirms(&self, channel: ChannelId) -> bool {
        self.config.confirm && !self.unconfirmable.contains(&channel)
    }

    fn on_written(&mut self, generation: u64) {
        let Some(in_flight) = self.in_flight.take() else {
            tracing::warn!("publish written that the forwarder did not issue; ignoring");
            return;
        };
        if in_flight.generation != generation {
            self.in_flight = Some(in_flight);
            return;
        }
        let now = Instant::now();
        if let Conn::Up { last_publish, .. } = &mut self.conn {
            *last_publish = now;
        }
        self.written(in_flight.channel, now);
    }

    /// The update of `channel` was written to the connection.
    fn written(&mut self, channel: ChannelId, now: Instant) {
        self.next_check.remove(&channel);
        self.schedule.record(channel, now);
        let label = channel.to_string();
        self.metrics
            .updates_sent_total
            .with_label_values(&[&label])
            .inc();
        let unix_now = unix_seconds(Utc::now());
        self.metrics
            .upstream_last_publish_timestamp_seconds
            .set(unix_now);
        self.metrics
            .channel_last_sent_timestamp_seconds
            .with_label_values(&[&label])
            .set(unix_now);
        let confirms = self.confirms(channel);
        let timeout = self.confirm_timeout;
        let Some(p) = self.pending.get_mut(&channel) else {
            // Confirmed by an echo that overtook the write report.
            return;
        };
        if p.writes > 0 {
            self.metrics
                .updates_retried_total
                .with_label_values(&[&label])
                .inc();
        }
        p.writes += 1;
        tracing::debug!(
            %channel,
            readings = p.batch.covered.len(),
            values = p.batch.update.values.len(),
            created_at = ?p.batch.created_at(),
            "update written"
        );
        if confirms {
            p.stage = Stage::AwaitEcho {
                until: now + timeout,
            };
        } else {
            self.deliver(channel, false);
        }
    }

    /// The outstanding update of `channel` is delivered: its readings leave
    /// the store and its `created_at` is remembered as taken.
    fn deliver(&mut self, channel: ChannelId, confirmed: bool) {
        let Some(p) = self.pending.remove(&channel) else {
            return;
        };
        self.next_check.remove(&channel);
        let label = channel.to_string();
        self.metrics
            .channel_last_confirmed_timestamp_seconds
            .with_label_values(&[&label])
            .set(unix_seconds(Utc::now()));
        // The next pass sets it again if more is queued (a channel with
        // nothing queued is not looked at).
        self.metrics
            .channel_next_window_timestamp_seconds
            .with_label_values(&[&label])
            .set(0.0);
        if confirmed {
            self.metrics
                .updates_confirmed_total
                .with_label_values(&[&label])
                .inc();
        }
        match self.store.remove(&p.batch.covered) {
            Ok(()) => {
                if let Some(t) = p.batch.created_at() {
                    self.mark_used(channel, [t]);
                }
            }
            // The readings stay and form the same window again; ThingSpeak
            // rejects its created_at as a duplicate and the check finds it.
            Err(e) => tracing::error!(%channel, error = %e, "could not remove delivered readings"),
        }
    }

    fn mark_used(&mut self, channel: ChannelId, times: impl IntoIterator<Item = DateTime<Utc>>) {
        let used = self.used.entry(channel).or_default();
        used.extend(times);
        while used.len() > USED_MEMORY {
            used.pop_first();
        }
    }

    fn on_suback(&mut self, pkid: u16, granted: bool) {
        let Some(channel) = self.sub_pkids.remove(&pkid) else {
            return;
        };
        self.next_check.remove(&channel);
        let now = Instant::now();
        if granted {
            self.subs.insert(channel, Sub::Granted);
            if let Some(p) = self.pending.get_mut(&channel) {
                if p.stage == Stage::InDoubt {
                    // The newest entry comes right after the SUBACK.
                    p.stage = Stage::Probe {
                        until: now + self.confirm_timeout,
                    };
                }
            }
            return;
        }
        self.subs.remove(&channel);
        self.unconfirmable.insert(channel);
        tracing::warn!(
            %channel,
            "ThingSpeak refused the subscription to the channel's feed: updates of this channel \
             count as delivered once written (no confirmation); authorise the MQTT device to \
             subscribe to enable it"
        );
        if let Some(p) = self.pending.get_mut(&channel) {
            match p.stage {
                Stage::AwaitEcho { .. } | Stage::Probe { .. } => self.deliver(channel, false),
                Stage::InDoubt => p.stage = Stage::Ready,
                Stage::Ready | Stage::Writing => {}
            }
        }
    }

    /// An entry relayed on a channel's feed subscription.
    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        let channel = match Topic::parse(topic) {
            Ok(Topic::Subscribe { channel } | Topic::SubscribeJson { channel, .. }) => channel,
            _ => {
                tracing::debug!(topic, "message on an unexpected topic; ignored");
                return;
            }
        };
        let entry: EntryJson = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(%channel, error = %e, "unreadable entry on the channel feed; ignored");
                return;
            }
        };
        let Some(p) = self.pending.get_mut(&channel) else {
            return;
        };
        if p.batch.created_at() != Some(entry.created_at) {
            return;
        }
        let same_values =
            p.batch.update.values.iter().all(|(target, value)| {
                entry.get(*target).is_some_and(|got| same_value(got, value))
            });
        if same_values {
            tracing::debug!(%channel, entry_id = entry.entry_id, "update confirmed");
            self.deliver(channel, true);
        } else {
            // The timestamp belongs to another entry: ours can never be stored
            // under it. The readings stay and join the next free window.
            tracing::warn!(
                %channel,
                created_at = %thingspeak::format_timestamp(&entry.created_at),
                "the channel already has a different entry at this created_at; \
                 the readings move to the next window"
            );
            self.pending.remove(&channel);
            self.mark_used(channel, [entry.created_at]);
            self.next_check.remove(&channel);
        }
    }

    fn on_bulk_done(&mut self, done: BulkDone) {
        let channel = done.channel;
        let label = channel.to_string();
        let now = Instant::now();
        let interval = Duration::from_secs_f64(self.config.bulk_interval_secs);
        self.next_check.clear();
        let state = self.bulk_state.entry(channel).or_insert(BulkState {
            next_at: now,
            busy: false,
            backoff: interval,
            broken: false,
        });
        state.busy = false;
        match done.result {
            BulkResult::Accepted => {
                state.next_at = now + interval;
                state.backoff = interval;
                // ThingSpeak counts REST writes against the channel's rate too.
                self.schedule.record(channel, now);
                let unix_now = unix_seconds(Utc::now());
                self.metrics
                    .channel_last_sent_timestamp_seconds
                    .with_label_values(&[&label])
                    .set(unix_now);
                self.metrics
                    .channel_last_confirmed_timestamp_seconds
                    .with_label_values(&[&label])
                    .set(unix_now);
                let n = done.created_at.len() as u64;
                self.metrics
                    .updates_sent_total
                    .with_label_values(&[&label])
                    .inc_by(n);
                self.metrics
                    .updates_confirmed_total
                    .with_label_values(&[&label])
                    .inc_by(n);
                tracing::info!(%channel, updates = n, readings = done.covered.len(), "backlog written by a bulk call");
                match self.store.remove(&done.covered) {
                    Ok(()) => self.mark_used(channel, done.created_at),
                    // A repeat is harmless: ThingSpeak skips existing created_at.
                    Err(e) => {
                        tracing::error!(%channel, error = %e, "could not remove backfilled readings")
                    }
                }
            }
            BulkResult::TooFrequent => {
                state.backoff = (state.backoff * 2).min(MAX_BULK_BACKOFF);
                state.next_at = now + state.backoff;
                tracing::warn!(
                    %channel,
                    retry_in_secs = state.backoff.as_secs(),
                    "bulk call answered 429 (too frequent); backing off"
                );
            }
            BulkResult::Refused { status, body } => {
                state.broken = true;
                tracing::error!(
                    %channel,
                    status,
                    answer = %body.chars().take(200).collect::<String>(),
                    "bulk call refused: check upstream.channels.{channel}.write_key; this channel's \
                     backlog now goes over MQTT"
                );
            }
            BulkResult::Failed(message) => {
                state.next_at = now + interval;
                if let Some(suppressed) = self.bulk_failure_log.check(&label) {
                    tracing::warn!(
                        %channel,
                        error = %message,
                        failed_since_last_warning = suppressed,
                        retry_every_secs = interval.as_secs_f64(),
                        "bulk call failed; retrying"
                    );
                }
            }
        }
    }

    fn on_closed(&mut self, closed: Closed) {
        let now = Instant::now();
        let conn = std::mem::replace(&mut self.conn, Conn::Down { retry_at: now });
        let (was_up_since, idle_close) = match conn {
            // The broker closing a connection we left idle past the renewal
            // point is expected (ThingSpeak's idle limit), not a fault.
            Conn::Up {
                since,
                last_publish,
                ..
            } => (
                Some(since),
                now.duration_since(last_publish) >= self.renew_idle_after,
            ),
            _ => (None, false),
        };
        // Failed attempts count too (reason refused, tls, connect_timeout...),
        // so a refusal loop is visible in metrics, not only in the log.
        self.metrics
            .upstream_disconnects_total
            .with_label_values(&[&self.connection, closed.reason])
            .inc();
        if let Some(since) = was_up_since {
            self.metrics
                .upstream_connected
                .with_label_values(&[&self.connection])
                .set(0);
            if now.duration_since(since) >= STABLE_AFTER {
                self.backoff.reset();
            }
        }
        self.connection_lost(now);
        let jitter: f64 = rand::thread_rng().gen();
        let delay = if closed.is_auth_refusal() {
            if !self.refusal_reported {
                self.refusal_reported = true;
                tracing::error!(
                    connection = %self.connection,
                    client_id = %self.config.client_id,
                    username = %self.config.username,
                    error = %closed.message,
                    "ThingSpeak refused the connection: check the MQTT device's client id, \
                     username and password, and that the device is authorised for the \
                     channels; retrying slowly"
                );
            }
            self.backoff.max_delay(jitter)
        } else if idle_close {
            self.backoff.reset();
            self.backoff.next_delay(jitter)
        } else {
            self.backoff.next_delay(jitter)
        };
        if idle_close {
            tracing::info!(
                connection = %self.connection,
                reason = closed.reason,
                retry_in_secs = delay.as_secs_f64(),
                "idle upstream connection closed by the broker (idle limit); reconnecting"
            );
        } else if was_up_since.is_some() {
            tracing::warn!(
                connection = %self.connection,
                reason = closed.reason,
                error = %closed.message,
                retry_in_secs = delay.as_secs_f64(),
                "upstream connection lost"
            );
        } else if closed.is_auth_refusal() {
            tracing::debug!(
                connection = %self.connection,
                error = %closed.message,
                retry_in_secs = delay.as_secs_f64(),
                "connection refused again"
            );
        } else {
            tracing::warn!(
                connection = %self.connection,
                reason = closed.reason,
                error = %closed.message,
                retry_in_secs = delay.as_secs_f64(),
                "could not connect upstream"
            );
        }
        self.conn = Conn::Down {
            retry_at: now + delay,
        };
    }

    /// Bookkeeping when a connection ends for whatever reason: subscriptions
    /// are gone, and updates written on it are in doubt until checked.
    fn connection_lost(&mut self, now: Instant) {
        self.subs.clear();
        self.sub_order.clear();
        self.sub_pkids.clear();
        self.next_check.clear();
        if let Some(in_flight) = self.in_flight.take() {
            // The update may or may not have left: count it against the
            // channel's interval.
            self.schedule.record(in_flight.channel, now);
            tracing::info!(
                channel = %in_flight.channel,
                "connection lost before the update was written; it will be checked and resent"
            );
        }
        let confirm = self.config.confirm;
        for (channel, p) in self.pending.iter_mut() {
            let confirms = confirm && !self.unconfirmable.contains(channel);
            p.stage = match p.stage {
                // Resending without confirmation is safe: a copy that did
                // arrive makes ThingSpeak reject the resend's created_at.
                _ if !confirms => Stage::Ready,
                Stage::Ready => Stage::Ready,
                Stage::Writing | Stage::AwaitEcho { .. } | Stage::Probe { .. } | Stage::InDoubt => {
                    Stage::InDoubt
                }
            };
        }
    }

    /// Gives up on a connection that has not written an update in time.
    fn check_write_timeout(&mut self, now: Instant) {
        let stuck = matches!(
            (&self.in_flight, &self.conn),
            (Some(f), Conn::Up { .. }) if now.duration_since(f.issued) >= WRITE_TIMEOUT
        );
        if stuck {
            if let Conn::Up { task, .. } = &self.conn {
                task.abort();
            }
            self.on_closed(Closed {
                reason: "write_timeout",
                refused: None,
                message: format!("update not written within {WRITE_TIMEOUT:?}"),
            });
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

    /// Moves one channel forward; returns when it needs looking at again.
    fn advance(
        &mut self,
        channel: ChannelId,
        now: Instant,
    ) -> Result<Instant, tsgw_core::StoreError> {
        let idle = now + IDLE;
        if let Some(p) = self.pending.get(&channel) {
            if p.stage == Stage::Ready && p.writes == 0 {
                // Never sent: decide afresh (newer windows may have closed,
                // a bulk call may have become due).
                self.pending.remove(&channel);
            } else {
                return Ok(self.advance_pending(channel, now));
            }
        }
        if self.bulk_state.get(&channel).is_some_and(|b| b.busy) {
            // Its end is an event, which looks at the channel again.
            return Ok(idle);
        }
        let utc_now = Utc::now();
        let queued = self.store.peek(channel, PEEK_LIMIT)?;
        let empty = BTreeSet::new();
        let used = self.used.get(&channel).unwrap_or(&empty);
        let (groups, rejected) = group(
            channel,
            &queued,
            self.schedule.interval(channel),
            used,
            utc_now,
        );
        self.drop_rejected(channel, &rejected)?;
        self.show_next_window(channel, groups.first(), now, utc_now);
        let closed: Vec<&Group> = groups.iter().filter(|g| g.is_closed(utc_now)).collect();
        let left = self.backlog(channel, &queued, &closed)?;
        self.progress.observe(channel, left, now, &self.metrics);
        if closed.is_empty() {
            return Ok(match groups.first() {
                Some(g) => now + (g.closes_at - utc_now).to_std().unwrap_or(Duration::ZERO),
                None => idle,
            });
        }
        let policies = self.config.policies(channel);
        let batch = match self.backfill_policy(channel) {
            Backfill::Newest => {
                if let Some((newest, older)) = closed.split_last() {
                    self.drop_windows(channel, older)?;
                    Some(window_batch(channel, &[newest], &policies))
                } else {
                    None
                }
            }
            Backfill::Mqtt => {
                let n = self.config.downsample_after;
                let merge = if closed.len() > n {
                    closed.len().div_ceil(n)
                } else {
                    1
                };
                if merge > 1 {
                    tracing::info!(%channel, windows = closed.len(), merge, "backlog: merging old windows into one update");
                }
                let take = merge.min(closed.len());
                Some(window_batch(channel, &closed[..take], &policies))
            }
            Backfill::Bulk => {
                let bulk_due = self.bulk_state.get(&channel).map_or(
                    now >= self.started + Duration::from_secs_f64(self.config.bulk_interval_secs),
                    |b| now >= b.next_at,
                );
                // A bulk call takes one of the channel's update slots too:
                // ThingSpeak counts REST and MQTT writes together.
                if closed.len() > 1 && bulk_due && self.schedule.is_due(channel, now) {
                    let max = self.config.bulk_max_updates;
                    let older = &closed[..closed.len() - 1];
                    let older = &older[..older.len().min(max)];
                    self.start_bulk(channel, older, &policies);
                    return Ok(idle);
                }
                closed
                    .last()
                    .map(|newest| window_batch(channel, &[newest], &policies))
            }
        };
        match batch {
            Some(batch) if !batch.is_empty() => {
                self.pending.insert(
                    channel,
                    Pending {
                        batch,
                        stage: Stage::Ready,
                        writes: 0,
                        probes: 0,
                    },
                );
                Ok(self.advance_pending(channel, now))
            }
            _ => Ok(now + STORE_RETRY),
        }
    }

    /// What waits behind the channel's newest closed window. Past the
    /// readings looked at in one pass, the queue's count gives the readings
    /// and the windows are extrapolated from the readings per window seen.
    fn backlog(
        &self,
        channel: ChannelId,
        queued: &[tsgw_core::Queued],
        closed: &[&Group],
    ) -> Result<Backlog, tsgw_core::StoreError> {
        let Some((_, older)) = closed.split_last() else {
            return Ok(Backlog {
                windows: 0,
                readings: 0,
            });
        };
        let mut windows = older.len() as u64;
        let seen: u64 = older.iter().map(|g| g.readings.len() as u64).sum();
        let mut readings = seen;
        if queued.len() >= PEEK_LIMIT {
            let unseen = self
                .store
                .len_of(channel)?
                .saturating_sub(queued.len() as u64);
            readings += unseen;
            if seen > 0 {
                windows += (unseen * windows).div_ceil(seen);
            }
        }
        Ok(Backlog { windows, readings })
    }

    /// Sets the channel's next-window gauge: when its oldest unsent window can
    /// go (closed, and the rate-limit slot free), 0 with nothing queued.
    fn show_next_window(
        &self,
        channel: ChannelId,
        oldest: Option<&Group>,
        now: Instant,
        utc_now: DateTime<Utc>,
    ) {
        let at = oldest.map_or(0.0, |g| {
            let slot_in = self.schedule.due_at(channel).saturating_duration_since(now);
            let slot = utc_now + chrono::TimeDelta::from_std(slot_in).unwrap_or_default();
            unix_seconds(g.closes_at.max(slot))
        });
        self.metrics
            .channel_next_window_timestamp_seconds
            .with_label_values(&[&channel.to_string()])
            .set(at);
    }

    /// The backfill policy in force for `channel`: bulk needs a write key and a
    /// bulk path that was not refused.
    fn backfill_policy(&mut self, channel: ChannelId) -> Backfill {
        match self.config.backfill {
            Backfill::Bulk => {
                let usable = self.bulk.is_some()
                    && self.config.write_key(channel).is_some()
                    && !self.bulk_state.get(&channel).is_some_and(|b| b.broken);
                if usable {
                    Backfill::Bulk
                } else {
                    if self.no_key_reported.insert(channel) {
                        tracing::info!(
                            %channel,
                            "no upstream.channels.{channel}.write_key: a backlog of this channel is \
                             sent over MQTT (backfill = \"mqtt\")"
                        );
                    }
                    Backfill::Mqtt
                }
            }
            other => other,
        }
    }

    /// Removes the readings of windows the `newest` policy gives up on.
    fn drop_windows(
        &mut self,
        channel: ChannelId,
        windows: &[&Group],
    ) -> Result<(), tsgw_core::StoreError> {
        if windows.is_empty() {
            return Ok(());
        }
        let keys: Vec<QueueKey> = windows
            .iter()
            .flat_map(|g| g.readings.iter().map(|q| q.key))
            .collect();
        self.store.remove(&keys)?;
        self.metrics
            .updates_dropped_total
            .with_label_values(&[&channel.to_string(), "backfill_newest"])
            .inc_by(windows.len() as u64);
        tracing::warn!(
            %channel,
            windows = windows.len(),
            readings = keys.len(),
            "backfill = \"newest\": dropped windows older than the newest"
        );
        Ok(())
    }

    fn start_bulk(&mut self, channel: ChannelId, windows: &[&Group], policies: &Policies) {
        let (Some(client), Some(key)) = (self.bulk.clone(), self.config.write_key(channel)) else {
            return;
        };
        let mut covered = Vec::new();
        let mut created_at = Vec::new();
        let mut entries = Vec::new();
        for g in windows {
            let b = window_batch(channel, &[g], policies);
            if b.is_empty() {
                continue;
            }
            entries.push(BulkEntry::from_update(&b.update, g.created_at));
            covered.extend(b.covered);
            created_at.push(g.created_at);
        }
        if entries.is_empty() {
            return;
        }
        let interval = Duration::from_secs_f64(self.config.bulk_interval_secs);
        let state = self.bulk_state.entry(channel).or_insert(BulkState {
            next_at: Instant::now(),
            busy: false,
            backoff: interval,
            broken: false,
        });
        state.busy = true;
        tracing::info!(%channel, updates = entries.len(), "backfilling older windows with a bulk call");
        let tx = self.bulk_tx.clone();
        tokio::spawn(async move {
            let result = client.post(channel, &key, entries).await;
            let _ = tx
                .send(BulkDone {
                    channel,
                    covered,
                    created_at,
                    result,
                })
                .await;
        });
    }

    /// Moves the outstanding update of `channel` forward.
    fn advance_pending(&mut self, channel: ChannelId, now: Instant) -> Instant {
        let idle = now + IDLE;
        let Some(stage) = self.pending.get(&channel).map(|p| p.stage) else {
            return now;
        };
        match stage {
            Stage::Writing => idle,
            // Subscribing delivers the channel's newest entry: the check. Its
            // SUBACK (an event) starts the wait for that entry.
            Stage::InDoubt => match self.subs.get(&channel) {
                Some(_) => idle,
                None if matches!(self.conn, Conn::Up { .. }) => {
                    if self.subscribe(channel) {
                        idle
                    } else {
                        now + STORE_RETRY
                    }
                }
                None => idle,
            },
            Stage::AwaitEcho { until } if now < until => until,
            Stage::AwaitEcho { .. } => {
                // No echo: check whether ThingSpeak has it (its newest entry)
                // before sending it again.
                tracing::debug!(%channel, "no echo in time; checking the channel's newest entry");
                if self.subscribe(channel) {
                    let until = now + self.confirm_timeout;
                    if let Some(p) = self.pending.get_mut(&channel) {
                        p.stage = Stage::Probe { until };
                    }
                    until
                } else {
                    now + STORE_RETRY
                }
            }
            Stage::Probe { until } if now < until => until,
            Stage::Probe { .. } => {
                let Some(p) = self.pending.get_mut(&channel) else {
                    return now;
                };
                p.probes += 1;
                if p.probes >= MAX_PROBES {
                    // Never seen although we are its only writer: the
                    // timestamp is unusable. The readings stay queued and
                    // form a window with a fresh created_at.
                    let created_at = p.batch.created_at();
                    tracing::warn!(
                        %channel,
                        checks = p.probes,
                        "update never confirmed; its readings get a new created_at"
                    );
                    self.pending.remove(&channel);
                    if let Some(t) = created_at {
                        self.mark_used(channel, [t]);
                    }
                    return now;
                }
                tracing::info!(%channel, "update not stored by ThingSpeak; resending it");
                p.stage = Stage::Ready;
                self.try_publish(channel, now)
            }
            Stage::Ready => self.try_publish(channel, now),
        }
    }

    /// Asks for the channel's feed (again). False if the connection cannot take it now.
    fn subscribe(&mut self, channel: ChannelId) -> bool {
        let Conn::Up { client, .. } = &self.conn else {
            return false;
        };
        let topic = match self.config.auth {
            Auth::Device => Topic::Subscribe { channel },
            // Private channels need the read key; public ones none.
            Auth::Legacy => Topic::SubscribeJson {
                channel,
                key: self.config.read_key(channel),
            },
        }
        .to_string();
        match client.try_subscribe(topic, QoS::AtMostOnce) {
            Ok(()) => {
                self.sub_order.push_back(channel);
                self.subs.insert(channel, Sub::Requested);
                true
            }
            Err(e) => {
                tracing::debug!(%channel, error = %e, "could not subscribe now");
                false
            }
        }
    }

    /// Publishes the ready update of `channel` when the connection, the
    /// subscription and the channel's interval allow.
    fn try_publish(&mut self, channel: ChannelId, now: Instant) -> Instant {
        let idle = now + IDLE;
        let (generation, client, last_publish) = match &self.conn {
            Conn::Up {
                generation,
                client,
                last_publish,
                ..
            } => (*generation, client.clone(), *last_publish),
            // Connecting is an event that looks at every channel again.
            _ => return idle,
        };
        if self.in_flight.is_some() {
            // Its write report is an event that looks again.
            return idle;
        }
        if self.confirms(channel) {
            match self.subs.get(&channel) {
                Some(Sub::Granted) => {}
                // The SUBACK is an event that looks again.
                Some(Sub::Requested) => return idle,
                None => {
                    return if self.subscribe(channel) {
                        idle
                    } else {
                        now + STORE_RETRY
                    };
                }
            }
        }
        if !self.schedule.is_due(channel, now) {
            return self.schedule.due_at(channel);
        }
        if now.duration_since(last_publish) >= self.renew_idle_after {
            self.renew_connection(now);
            return now;
        }
        let key = match self.config.auth {
            Auth::Device => None,
            Auth::Legacy => match self.config.write_key(channel) {
                Some(k) => Some(k),
                None => {
                    if self.legacy_key_reported.insert(channel) {
                        tracing::error!(
                            %channel,
                            "legacy auth needs upstream.channels.\"{channel}\".write_key; \
                             this channel's readings stay queued"
                        );
                    }
                    return idle;
                }
            },
        };
        let Some(p) = self.pending.get_mut(&channel) else {
            return now;
        };
        // The topic may hold the write key: never log it.
        let (topic, payload) = match single_field(&p.batch.update) {
            Some((field, value)) if self.config.field_topics => (
                Topic::PublishField {
                    channel,
                    field,
                    key,
                }
                .to_string(),
                value.to_owned(),
            ),
            _ => (
                Topic::Publish { channel, key }.to_string(),
                p.batch.update.encode(),
            ),
        };
        match client.try_publish(topic, QoS::AtMostOnce, false, payload) {
            Ok(()) => {
                p.stage = Stage::Writing;
                self.in_flight = Some(InFlight {
                    generation,
                    channel,
                    issued: now,
                });
                idle
            }
            Err(e) => {
                // The event loop is gone or full; its driver reports why.
                tracing::warn!(%channel, error = %e, "could not hand the update to the connection");
                now + STORE_RETRY
            }
        }
    }

    /// Replaces an idle connection ThingSpeak may be about to close by a fresh
    /// one (connected at once, without backoff). The readings stay queued.
    fn renew_connection(&mut self, now: Instant) {
        let conn = std::mem::replace(&mut self.conn, Conn::Down { retry_at: now });
        if let Conn::Up { task, .. } = conn {
            task.abort();
            tracing::info!(
                connection = %self.connection,
                "renewing a connection idle for {:.0} s before publishing",
                self.renew_idle_after.as_secs_f64()
            );
            self.metrics
                .upstream_connected
                .with_label_values(&[&self.connection])
                .set(0);
            self.metrics
                .upstream_disconnects_total
                .with_label_values(&[&self.connection, "renew_idle"])
                .inc();
        }
        self.connection_lost(now);
    }

    /// Removes readings that can never be sent, counting and logging each.
    fn drop_rejected(
        &self,
        channel: ChannelId,
        rejected: &[Rejected],
    ) -> Result<(), tsgw_core::StoreError> {
        if rejected.is_empty() {
            return Ok(());
        }
        let keys: Vec<QueueKey> = rejected.iter().map(|r| r.key).collect();
        self.store.remove(&keys)?;
        for r in rejected {
            tracing::warn!(
                %channel,
                target = %r.target,
                seq = r.key.seq,
                "dropping reading: {}",
                r.detail
            );
            self.metrics
                .queue_dropped_total
                .with_label_values(&[r.reason])
                .inc();
        }
        Ok(())
    }

    /// Says DISCONNECT if connected, letting an in-flight write finish.
    async fn shut_down(mut self) {
        let conn = std::mem::replace(
            &mut self.conn,
            Conn::Down {
                retry_at: Instant::now(),
            },
        );
        match conn {
            Conn::Up {
                generation,
                client,
                task,
                ..
            } => {
                let _ = client.try_disconnect();
                let deadline = Instant::now() + SHUTDOWN_GRACE;
                loop {
                    let event = tokio::time::timeout_at(deadline, self.events_rx.recv()).await;
                    match event {
                        Ok(Some(ConnEvent {
                            generation: g,
                            kind: ConnEventKind::Written,
                        })) if g == generation => {
                            // Counted; with confirmation the readings stay
                            // queued (no echo can come now) and the next run
                            // finds the entry when it checks.
                            if let Some(f) = self.in_flight.take() {
                                self.written(f.channel, Instant::now());
                            }
                        }
                        Ok(Some(ConnEvent {
                            kind: ConnEventKind::Closed(_),
                            generation: g,
                        })) if g == generation => break,
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
                task.abort();
                self.metrics
                    .upstream_disconnects_total
                    .with_label_values(&[&self.connection, "shutdown"])
                    .inc();
            }
            Conn::Connecting { task, .. } => task.abort(),
            Conn::Down { .. } => {}
        }
        self.metrics
            .upstream_connected
            .with_label_values(&[&self.connection])
            .set(0);
        tracing::info!(connection = %self.connection, "forwarder stopped");
    }
}

/// Seconds since the Unix epoch, for timestamp gauges.
fn unix_seconds(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// Whether ThingSpeak's echo of a value is the value sent: the same text, or
/// the same number written differently (`21.50` for `21.5`), in case the
/// service normalises numbers.
fn same_value(echoed: &str, sent: &str) -> bool {
    if echoed == sent {
        return true;
    }
    match (echoed.trim().parse::<f64>(), sent.trim().parse::<f64>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The field and value of an update that sets exactly one field and nothing else.
fn single_field(update: &thingspeak::ChannelUpdate) -> Option<(thingspeak::Field, &str)> {
    let mut values = update.values.iter();
    match (values.next(), values.next()) {
        (Some((thingspeak::Target::Field(f), v)), None) => Some((*f, v.as_str())),
        _ => None,
    }
}

/// One update from the readings of `windows` (consecutive, oldest first),
/// stamped with the first window's `created_at`.
fn window_batch(channel: ChannelId, windows: &[&Group], policies: &Policies) -> Batch {
    let created_at = windows
        .first()
        .map_or(DateTime::UNIX_EPOCH, |g| g.created_at);
    let readings: Vec<_> = windows.iter().flat_map(|g| g.readings.iter()).collect();
    aggregate(channel, created_at, &readings, policies)
}

#[cfg(test)]
mod tests {

    use thingspeak::{Field, Target};
    use tsgw_core::{Origin, Reading, Secret, SourceKind, Value};

    use super::*;
    use crate::config::Transport;

    type MemStore = tsgw_core::MemoryStore;

    /// Queues a reading measured 10 s ago (its window is closed) under `seq`.
    fn push_closed(store: &MemStore, seq: u64, target: Target, value: Value) {
        let channel = ch();
        store.insert(
            QueueKey { channel, seq },
            Reading {
                channel,
                target,
                value,
                measured_at: Utc::now() - chrono::TimeDelta::seconds(10),
                origin: Origin::new(SourceKind::Serial, "dev"),
            },
        );
    }

    fn ch() -> ChannelId {
        ChannelId::new(42).unwrap()
    }

    fn field1() -> Target {
        Target::Field(Field::new(1).unwrap())
    }

    fn config(confirm: bool) -> UpstreamConfig {
        UpstreamConfig {
            host: "127.0.0.1".into(),
            transport: Transport::Tcp,
            client_id: "c".into(),
            username: "u".into(),
            password: Secret::new("p"),
            update_interval_secs: 1.0,
            confirm,
            confirm_timeout_secs: 1.0,
            ..UpstreamConfig::default()
        }
    }

    fn forwarder(confirm: bool, store: Arc<MemStore>, metrics: Metrics) -> Forwarder {
        let config = config(confirm);
        let name = config.connection_name();
        Forwarder::new(config, name, None, None, store, metrics)
    }

    /// Puts the forwarder into "connected as `generation`" with a client whose
    /// requests land in the returned (never polled) event loop.
    fn connect_as(f: &mut Forwarder, generation: u64) -> rumqttc::EventLoop {
        let options = mqtt_options(&f.config, None).unwrap();
        let (client, eventloop) = AsyncClient::new(options, REQUEST_CHANNEL_CAPACITY);
        f.conn = Conn::Up {
            generation,
            client,
            task: tokio::spawn(async {}),
            since: Instant::now(),
            last_publish: Instant::now(),
        };
        f.next_check.clear();
        eventloop
    }

    fn event(generation: u64, kind: ConnEventKind) -> ConnEvent {
        ConnEvent { generation, kind }
    }

    fn closed() -> ConnEventKind {
        ConnEventKind::Closed(Closed {
            reason: "io",
            refused: None,
            message: "reset".into(),
        })
    }

    fn later(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    fn stage(f: &Forwarder) -> Option<Stage> {
        f.pending.get(&ch()).map(|p| p.stage)
    }

    /// Subscribes (as the forwarder asks) and grants it as pkid 1.
    fn grant(f: &mut Forwarder, generation: u64) {
        f.on_event(event(generation, ConnEventKind::SubscribeSent(1)));
        f.on_event(event(
            generation,
            ConnEventKind::SubAck {
                pkid: 1,
                granted: true,
            },
        ));
    }

    fn echo(f: &mut Forwarder, generation: u64, value: &str) {
        let p = f.pending.get(&ch()).expect("pending update");
        let mut entry = EntryJson::new(ch(), 7, p.batch.created_at().unwrap());
        entry.field1 = Some(value.into());
        f.on_event(event(
            generation,
            ConnEventKind::Message {
                topic: "channels/42/subscribe".into(),
                payload: serde_json::to_vec(&entry).unwrap().into(),
            },
        ));
    }

    #[tokio::test]
    async fn in_doubt_update_keeps_readings_and_stale_writes_are_ignored() {
        let store = Arc::new(MemStore::default());
        push_closed(&store, 1, field1(), Value::Number(1.0));
        let metrics = Metrics::new();
        let mut f = forwarder(false, store.clone(), metrics.clone());

        let _loop0 = connect_as(&mut f, 0);
        f.send_due(later(2)).unwrap();
        assert_eq!(stage(&f), Some(Stage::Writing), "due channel published");

        // The connection dies before the write is reported: readings stay,
        // and the attempt counts against the interval.
        f.on_event(event(0, closed()));
        assert!(f.in_flight.is_none());
        assert_eq!(store.len(), 1);
        assert_eq!(stage(&f), Some(Stage::Ready));
        assert!(!f
            .schedule
            .is_due(ch(), Instant::now() + Duration::from_millis(500)));

        // Reconnected as generation 1: a late event of generation 0 changes nothing.
        let _loop1 = connect_as(&mut f, 1);
        f.on_event(event(0, ConnEventKind::Written));
        assert_eq!(store.len(), 1);

        // Not yet due again: nothing is published inside the interval.
        f.send_due(Instant::now()).unwrap();
        assert_eq!(stage(&f), Some(Stage::Ready));

        f.send_due(later(2)).unwrap();
        assert_eq!(f.in_flight.as_ref().map(|i| i.generation), Some(1));
        f.on_event(event(1, ConnEventKind::Written));
        assert_eq!(store.len(), 0, "removed once written");
        assert_eq!(
            metrics.updates_sent_total.with_label_values(&["42"]).get(),
            1
        );
        assert_eq!(
            metrics
                .updates_retried_total
                .with_label_values(&["42"])
                .get(),
            0,
            "never written before"
        );
    }

    #[tokio::test]
    async fn channel_gauges_follow_the_channel() {
        let store = Arc::new(MemStore::default());
        push_closed(&store, 1, field1(), Value::Number(1.0));
        let metrics = Metrics::new();
        let mut f = forwarder(false, store.clone(), metrics.clone());
        macro_rules! gauge {
            ($name:ident) => {
                metrics.$name.with_label_values(&["42"]).get()
            };
        }
        let before = unix_seconds(Utc::now());

        f.send_due(later(2)).unwrap();
        let next = gauge!(channel_next_window_timestamp_seconds);
        assert!(
            next >= before && next <= before + 2.0,
            "closed window, slot one interval after start: {next} vs {before}"
        );
        assert_eq!(gauge!(channel_last_sent_timestamp_seconds), 0.0);

        let _loop = connect_as(&mut f, 0);
        f.send_due(later(2)).unwrap();
        f.on_event(event(0, ConnEventKind::Written));
        assert!(gauge!(channel_last_sent_timestamp_seconds) >= before);
        assert!(gauge!(channel_last_confirmed_timestamp_seconds) >= before);
        f.send_due(later(4)).unwrap();
        assert_eq!(
            gauge!(channel_next_window_timestamp_seconds),
            0.0,
            "nothing queued"
        );
    }

    #[tokio::test]
    async fn unsendable_readings_are_dropped_and_counted() {
        let store = Arc::new(MemStore::default());
        push_closed(&store, 1, field1(), Value::Text("x".repeat(300)));
        push_closed(&store, 2, Target::Status, Value::Text("ok".into()));
        let metrics = Metrics::new();
        let mut f = forwarder(false, store.clone(), metrics.clone());
        let _loop = connect_as(&mut f, 0);
        f.send_due(later(2)).unwrap();
        assert_eq!(store.len(), 1, "overlong reading dropped at once");
        assert_eq!(
            metrics
                .queue_dropped_total
                .with_label_values(&["value_too_long"])
                .get(),
            1
        );
        let update = &f.pending[&ch()].batch.update;
        assert_eq!(update.get(Target::Status), Some("ok"));
        assert_eq!(update.get(field1()), None);
    }

    #[tokio::test]
    async fn an_idle_connection_is_renewed_before_publishing() {
        let store = Arc::new(MemStore::default());
        push_closed(&store, 1, field1(), Value::Number(1.0));
        let metrics = Metrics::new();
        let mut f = forwarder(false, store.clone(), metrics.clone());
        f.renew_idle_after = Duration::from_millis(50);
        let _loop = connect_as(&mut f, 0);
        tokio::time::sleep(Duration::from_millis(60)).await;

        let t = later(2);
        f.send_due(t).unwrap();
        assert!(
            f.in_flight.is_none(),
            "not published on the idle connection"
        );
        assert!(
            matches!(f.conn, Conn::Down { retry_at } if retry_at == t),
            "reconnect at once"
        );
        assert_eq!(store.len(), 1);
        assert_eq!(
            metrics
                .upstream_disconnects_total
                .with_label_values(&["127.0.0.1:1883", "renew_idle"])
                .get(),
            1
        );

        // A fresh connection publishes at once.
        f.renew_idle_after = Duration::from_secs(3000);
        let _loop = connect_as(&mut f, 1);
        f.send_due(later(2)).unwrap();
        assert!(f.in_flight.is_some());
    }

    #[tokio::test]
    async fn nothing_is_published_while_not_connected() {
        let store = Arc::new(MemStore::default());
        push_closed(&store, 1, field1(), Value::Number(1.0));
        let mut f = forwarder(false, store.clone(), Metrics::new());
        f.send_due(later(60)).unwrap();
        assert!(f.in_flight.is_none());
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn only_the_matching_echo_confirms() {
        let store = Arc::new(MemStore::default());
        push_closed(&store, 1, field1(), Value::Number(5.0));
        let metrics = Metrics::new();
        let mut f = forwarder(true, store.clone(), metrics.clone());
        let _loop = connect_as(&mut f, 0);

        // First the subscription, then the publish.
        f.send_due(later(2)).unwrap();
        assert!(
            f.in_flight.is_none(),
            "not before the subscription is granted"
        );
        grant(&mut f, 0);
        f.send_due(later(2)).unwrap();
        assert_eq!(stage(&f), Some(Stage::Writing));
        f.on_event(event(0, ConnEventKind::Written));
        assert!(matches!(stage(&f), Some(Stage::AwaitEcho { .. })));
        assert_eq!(store.len(), 1, "written is not delivered");

        // Garbage and other channels' topics change nothing.
        f.on_event(event(
            0,
            ConnEventKind::Message {
                topic: "channels/42/subscribe".into(),
                payload: bytes::Bytes::from_static(b"{not json"),
            },
        ));
        assert_eq!(store.len(), 1);

        echo(&mut f, 0, "5");
        assert_eq!(store.len(), 0, "confirmed by the echo");
        assert!(f.pending.is_empty());
        assert_eq!(
            metrics
                .updates_confirmed_total
                .with_label_values(&["42"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn a_missing_echo_is_checked_then_resent_with_the_same_created_at() {
        let store = Arc::new(MemStore::default());
        push_closed(&store, 1, field1(), Value::Number(5.0));
        let metrics = Metrics::new();
        let mut f = forwarder(true, store.clone(), metrics.clone());
        let _loop = connect_as(&mut f, 0);
        f.send_due(later(2)).unwrap();
        grant(&mut f, 0);
        f.send_due(later(2)).unwrap();
        f.on_event(event(0, ConnEventKind::Written));
        let first = f.pending[&ch()].batch.created_at();

        // No echo within the timeout: subscribe again (the check).
        f.next_check.clear();
        f.send_due(later(3)).unwrap();
        assert!(matches!(stage(&f), Some(Stage::Probe { .. })));
        f.on_event(event(0, ConnEventKind::SubscribeSent(2)));
        f.on_event(event(
            0,
            ConnEventKind::SubAck {
                pkid: 2,
                granted: true,
            },
        ));
        // The check brings no such entry: resend at the next slot.
        f.next_check.clear();
        f.send_due(later(6)).unwrap();
        assert_eq!(stage(&f), Some(Stage::Writing));
        assert_eq!(f.pending[&ch()].batch.created_at(), first);
        f.on_event(event(0, ConnEventKind::Written));
        assert_eq!(
            metrics
                .updates_retried_total
                .with_label_values(&["42"])
                .get(),
            1
        );
        // The connection drops before the echo: checked after reconnecting.
        f.on_event(event(0, closed()));
        assert_eq!(stage(&f), Some(Stage::InDoubt));
        let _loop1 = connect_as(&mut f, 1);
        f.send_due(later(9)).unwrap();
        f.on_event(event(1, ConnEventKind::SubscribeSent(3)));
        f.on_event(event(
            1,
            ConnEventKind::SubAck {
                pkid: 3,
                granted: true,
            },
        ));
        assert!(matches!(stage(&f), Some(Stage::Probe { .. })));
        // The newest entry delivered on subscribing is ours: delivered, no resend.
        echo(&mut f, 1, "5");
        assert_eq!(store.len(), 0);
        assert_eq!(
            metrics.updates_sent_total.with_label_values(&["42"]).get(),
            2
        );
    }

    #[tokio::test]
    async fn an_entry_with_our_timestamp_but_other_values_moves_the_readings() {
        let store = Arc::new(MemStore::default());
        push_closed(&store, 1, field1(), Value::Number(5.0));
        let mut f = forwarder(true, store.clone(), Metrics::new());
        let _loop = connect_as(&mut f, 0);
        f.send_due(later(2)).unwrap();
        grant(&mut f, 0);
        f.send_due(later(2)).unwrap();
        f.on_event(event(0, ConnEventKind::Written));
        let first = f.pending[&ch()].batch.created_at().unwrap();
        echo(&mut f, 0, "999");
        assert!(f.pending.is_empty());
        assert_eq!(store.len(), 1, "not delivered");
        // Next time the readings form a later window.
        f.send_due(later(4)).unwrap();
        let second = f.pending[&ch()].batch.created_at().unwrap();
        assert!(second > first);
    }

    #[test]
    fn echoed_values_match_as_text_or_as_the_same_number() {
        assert!(same_value("21.5", "21.5"));
        assert!(same_value("21.50", "21.5"));
        assert!(same_value("open", "open"));
        assert!(!same_value("21.6", "21.5"));
        assert!(!same_value("Open", "open"));
    }

    #[tokio::test]
    async fn a_refused_subscription_falls_back_to_written_counts() {
        let store = Arc::new(MemStore::default());
        push_closed(&store, 1, field1(), Value::Number(5.0));
        let mut f = forwarder(true, store.clone(), Metrics::new());
        let _loop = connect_as(&mut f, 0);
        f.send_due(later(2)).unwrap();
        f.on_event(event(0, ConnEventKind::SubscribeSent(1)));
        f.on_event(event(
            0,
            ConnEventKind::SubAck {
                pkid: 1,
                granted: false,
            },
        ));
        f.send_due(later(2)).unwrap();
        f.on_event(event(0, ConnEventKind::Written));
        assert_eq!(store.len(), 0);
    }
}

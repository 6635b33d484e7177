//! The forwarder's loop: keeps one connection to ThingSpeak up (with
//! backoff), and whenever a channel with queued readings is due, merges them
//! into one update, publishes it, and removes the readings once the update was
//! written to the connection.
//!
//! One publish is outstanding at a time. QoS 0 publishes carry no packet id,
//! so this is what lets an `Outgoing::Publish` event be matched to its update.
//! Channel updates are seconds apart anyway, so this costs nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use rumqttc::{AsyncClient, QoS};
use rustls::ClientConfig;
use thingspeak::{ChannelId, Topic};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tsgw_core::{Metrics, QueueKey, ReadingStore};

use crate::backoff::Backoff;
use crate::batch::{merge, Batch};
use crate::config::UpstreamConfig;
use crate::connection::{mqtt_options, CONNECT_TIMEOUT_SECS, REQUEST_CHANNEL_CAPACITY};
use crate::driver::{drive, Closed, ConnEvent, ConnEventKind};
use crate::error::ForwarderError;
use crate::schedule::Schedule;

/// Most readings merged into one update. More wait for the next one.
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
/// ThingSpeak closes a connection without PUBLISH for an hour, without
/// warning (pings do not count), and a publish racing that close vanishes.
/// So a connection idle this long is replaced by a fresh one before publishing.
const RENEW_IDLE_AFTER: Duration = Duration::from_secs(50 * 60);

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
    batch: Batch,
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
    last_created_at: HashMap<ChannelId, DateTime<Utc>>,
    next_generation: u64,
    refusal_reported: bool,
    store_failing: bool,
    renew_idle_after: Duration,
    events_tx: mpsc::Sender<ConnEvent>,
    events_rx: mpsc::Receiver<ConnEvent>,
}

impl Forwarder {
    pub(crate) fn new(
        config: UpstreamConfig,
        tls: Option<Arc<ClientConfig>>,
        store: Arc<dyn ReadingStore>,
        metrics: Metrics,
    ) -> Self {
        let now = Instant::now();
        let (default, overrides) = config.intervals();
        let backoff = Backoff::new(
            Duration::from_secs_f64(config.reconnect_min_secs),
            Duration::from_secs_f64(config.reconnect_max_secs),
        );
        let (events_tx, events_rx) = mpsc::channel(16);
        let connection = config.connection_name();
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
            last_created_at: HashMap::new(),
            next_generation: 0,
            refusal_reported: false,
            store_failing: false,
            renew_idle_after: RENEW_IDLE_AFTER,
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
            let wake = match self.publish_due(now) {
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
        match event.kind {
            ConnEventKind::Connected => self.on_connected(),
            ConnEventKind::Written => self.on_written(event.generation),
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
        let batch = in_flight.batch;
        let channel = batch.channel;
        self.schedule.record(channel, now);
        let label = channel.to_string();
        self.metrics
            .updates_sent_total
            .with_label_values(&[&label])
            .inc();
        self.metrics
            .upstream_last_publish_timestamp_seconds
            .set(Utc::now().timestamp_millis() as f64 / 1000.0);
        tracing::debug!(
            %channel,
            readings = batch.covered.len(),
            values = batch.update.values.len(),
            "update written"
        );
        match self.store.remove(&batch.covered) {
            Ok(()) => {
                if let Some(t) = batch.update.created_at {
                    self.last_created_at.insert(channel, t);
                }
            }
            // The readings stay and are sent again with the same created_at,
            // which ThingSpeak rejects as a duplicate if the first one arrived.
            Err(e) => tracing::error!(%channel, error = %e, "could not remove sent readings"),
        }
    }

    fn on_closed(&mut self, closed: Closed) {
        let now = Instant::now();
        let conn = std::mem::replace(&mut self.conn, Conn::Down { retry_at: now });
        let was_up_since = match conn {
            Conn::Up { since, .. } => Some(since),
            _ => None,
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
        if let Some(in_flight) = self.in_flight.take() {
            // The update may or may not have left: count it against the
            // channel's interval, keep its readings for the next update.
            self.schedule.record(in_flight.batch.channel, now);
            tracing::info!(
                channel = %in_flight.batch.channel,
                "connection lost before the update was written; it will be resent"
            );
        }
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
        } else {
            self.backoff.next_delay(jitter)
        };
        if was_up_since.is_some() {
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

    /// Publishes the first due channel if the connection is free. Returns when
    /// to look again.
    fn publish_due(&mut self, now: Instant) -> Result<Instant, tsgw_core::StoreError> {
        let idle = now + IDLE;
        let (generation, client, last_publish) = match &self.conn {
            Conn::Up {
                generation,
                client,
                last_publish,
                ..
            } => (*generation, client.clone(), *last_publish),
            _ => return Ok(idle),
        };
        if let Some(f) = &self.in_flight {
            return Ok(f.issued + WRITE_TIMEOUT);
        }
        let mut wake = idle;
        for channel in self.store.channels()? {
            if !self.schedule.is_due(channel, now) {
                wake = wake.min(self.schedule.due_at(channel));
                continue;
            }
            let queued = self.store.peek(channel, PEEK_LIMIT)?;
            let batch = merge(
                channel,
                &queued,
                self.last_created_at.get(&channel).copied(),
                Utc::now(),
            );
            self.drop_rejected(&batch)?;
            if batch.is_empty() {
                continue;
            }
            if now.duration_since(last_publish) >= self.renew_idle_after {
                self.renew_connection(now);
                return Ok(now);
            }
            let topic = Topic::Publish { channel, key: None }.to_string();
            let payload = batch.update.encode();
            match client.try_publish(topic, QoS::AtMostOnce, false, payload) {
                Ok(()) => {
                    self.in_flight = Some(InFlight {
                        generation,
                        batch,
                        issued: now,
                    });
                    return Ok(now + WRITE_TIMEOUT);
                }
                Err(e) => {
                    // The event loop is gone or full; its driver reports why.
                    tracing::warn!(%channel, error = %e, "could not hand the update to the connection");
                    return Ok(now + STORE_RETRY);
                }
            }
        }
        Ok(wake)
    }

    /// Replaces an idle connection ThingSpeak may be about to close by a fresh
    /// one (connected at once, without backoff). The readings stay queued.
    fn renew_connection(&mut self, now: Instant) {
        let conn = std::mem::replace(&mut self.conn, Conn::Down { retry_at: now });
        if let Conn::Up { task, .. } = conn {
            task.abort();
            tracing::info!(
                connection = %self.connection,
                "renewing a connection idle for {} s before publishing",
                self.renew_idle_after.as_secs()
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
    }

    /// Removes readings that can never be sent, counting and logging each.
    fn drop_rejected(&self, batch: &Batch) -> Result<(), tsgw_core::StoreError> {
        if batch.rejected.is_empty() {
            return Ok(());
        }
        let keys: Vec<QueueKey> = batch.rejected.iter().map(|r| r.key).collect();
        self.store.remove(&keys)?;
        for r in &batch.rejected {
            tracing::warn!(
                channel = %batch.channel,
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
                        })) if g == generation => self.on_written(g),
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use thingspeak::{Field, Target};
    use tokio::sync::Notify;
    use tsgw_core::{Origin, Queued, Reading, Secret, SourceKind, StoreError, Value};

    use super::*;
    use crate::config::Transport;

    #[derive(Default)]
    struct MemStore {
        readings: Mutex<BTreeMap<QueueKey, Reading>>,
        pushed: Arc<Notify>,
    }

    impl MemStore {
        fn push(&self, seq: u64, target: Target, value: Value) {
            let channel = ch();
            self.readings.lock().unwrap().insert(
                QueueKey { channel, seq },
                Reading {
                    channel,
                    target,
                    value,
                    measured_at: Utc::now(),
                    origin: Origin::new(SourceKind::Serial, "dev"),
                },
            );
        }

        fn len(&self) -> usize {
            self.readings.lock().unwrap().len()
        }
    }

    impl ReadingStore for MemStore {
        fn channels(&self) -> Result<Vec<ChannelId>, StoreError> {
            let mut c: Vec<ChannelId> = self
                .readings
                .lock()
                .unwrap()
                .keys()
                .map(|k| k.channel)
                .collect();
            c.dedup();
            Ok(c)
        }
        fn peek(&self, channel: ChannelId, max: usize) -> Result<Vec<Queued>, StoreError> {
            Ok(self
                .readings
                .lock()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.channel == channel)
                .take(max)
                .map(|(k, r)| Queued {
                    key: *k,
                    reading: r.clone(),
                })
                .collect())
        }
        fn remove(&self, keys: &[QueueKey]) -> Result<(), StoreError> {
            let mut r = self.readings.lock().unwrap();
            for k in keys {
                r.remove(k);
            }
            Ok(())
        }
        fn pushed(&self) -> Arc<Notify> {
            self.pushed.clone()
        }
    }

    fn ch() -> ChannelId {
        ChannelId::new(42).unwrap()
    }

    fn field1() -> Target {
        Target::Field(Field::new(1).unwrap())
    }

    fn config() -> UpstreamConfig {
        UpstreamConfig {
            host: "127.0.0.1".into(),
            transport: Transport::Tcp,
            client_id: "c".into(),
            username: "u".into(),
            password: Secret::new("p"),
            update_interval_secs: 1.0,
            ..UpstreamConfig::default()
        }
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
        eventloop
    }

    fn closed() -> ConnEventKind {
        ConnEventKind::Closed(Closed {
            reason: "io",
            refused: None,
            message: "reset".into(),
        })
    }

    #[tokio::test]
    async fn in_doubt_update_keeps_readings_and_stale_writes_are_ignored() {
        let store = Arc::new(MemStore::default());
        store.push(1, field1(), Value::Number(1.0));
        let metrics = Metrics::new();
        let mut f = Forwarder::new(config(), None, store.clone(), metrics.clone());

        let _loop0 = connect_as(&mut f, 0);
        let t1 = Instant::now() + Duration::from_secs(2);
        f.publish_due(t1).unwrap();
        assert!(f.in_flight.is_some(), "due channel published");

        // The connection dies before the write is reported: readings stay,
        // and the attempt counts against the interval.
        f.on_event(ConnEvent {
            generation: 0,
            kind: closed(),
        });
        assert!(f.in_flight.is_none());
        assert_eq!(store.len(), 1);
        assert!(!f
            .schedule
            .is_due(ch(), Instant::now() + Duration::from_millis(500)));
        assert!(matches!(f.conn, Conn::Down { .. }));

        // Reconnected as generation 1: a late event of generation 0 changes nothing.
        let _loop1 = connect_as(&mut f, 1);
        f.on_event(ConnEvent {
            generation: 0,
            kind: ConnEventKind::Written,
        });
        assert_eq!(store.len(), 1);

        // Not yet due again: nothing is published inside the interval.
        f.publish_due(Instant::now()).unwrap();
        assert!(f.in_flight.is_none());

        let t2 = Instant::now() + Duration::from_secs(2);
        f.publish_due(t2).unwrap();
        assert_eq!(f.in_flight.as_ref().map(|i| i.generation), Some(1));
        f.on_event(ConnEvent {
            generation: 1,
            kind: ConnEventKind::Written,
        });
        assert_eq!(store.len(), 0, "removed once written");
        assert_eq!(
            metrics.updates_sent_total.with_label_values(&["42"]).get(),
            1
        );
    }

    #[tokio::test]
    async fn unsendable_readings_are_dropped_and_counted() {
        let store = Arc::new(MemStore::default());
        store.push(1, field1(), Value::Text("x".repeat(300)));
        store.push(2, Target::Status, Value::Text("ok".into()));
        let metrics = Metrics::new();
        let mut f = Forwarder::new(config(), None, store.clone(), metrics.clone());
        let _loop = connect_as(&mut f, 0);
        f.publish_due(Instant::now() + Duration::from_secs(2))
            .unwrap();
        assert_eq!(store.len(), 1, "overlong reading dropped at once");
        assert_eq!(
            metrics
                .queue_dropped_total
                .with_label_values(&["value_too_long"])
                .get(),
            1
        );
        let update = &f.in_flight.as_ref().unwrap().batch.update;
        assert_eq!(update.get(Target::Status), Some("ok"));
        assert_eq!(update.get(field1()), None);
    }

    #[tokio::test]
    async fn an_idle_connection_is_renewed_before_publishing() {
        let store = Arc::new(MemStore::default());
        store.push(1, field1(), Value::Number(1.0));
        let metrics = Metrics::new();
        let mut f = Forwarder::new(config(), None, store.clone(), metrics.clone());
        f.renew_idle_after = Duration::from_millis(50);
        let _loop = connect_as(&mut f, 0);
        tokio::time::sleep(Duration::from_millis(60)).await;

        let t = Instant::now() + Duration::from_secs(2);
        f.publish_due(t).unwrap();
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
        f.renew_idle_after = RENEW_IDLE_AFTER;
        let _loop = connect_as(&mut f, 1);
        f.publish_due(Instant::now() + Duration::from_secs(2))
            .unwrap();
        assert!(f.in_flight.is_some());
    }

    #[tokio::test]
    async fn nothing_is_published_while_not_connected() {
        let store = Arc::new(MemStore::default());
        store.push(1, field1(), Value::Number(1.0));
        let mut f = Forwarder::new(config(), None, store.clone(), Metrics::new());
        f.publish_due(Instant::now() + Duration::from_secs(60))
            .unwrap();
        assert!(f.in_flight.is_none());
        assert_eq!(store.len(), 1);
    }
}

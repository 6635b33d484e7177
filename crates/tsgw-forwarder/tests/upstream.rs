//! The forwarder against the ThingSpeak emulator on loopback: TLS and WSS
//! delivery, the rate limit measured at the receiver, readings kept while the
//! connection is down, and slow retries after a refused CONNECT.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use thingspeak::{ChannelId, Field, Target};
use thingspeak_emulator::{ChannelSpec, DeviceSpec, Emulator, EmulatorHandle};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tsgw_core::{
    Metrics, Origin, QueueKey, Queued, Reading, ReadingStore, Secret, SourceKind, StoreError, Value,
};
use tsgw_forwarder::{ForwarderError, Transport, UpstreamConfig};

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

/// An in-memory [`ReadingStore`] that records what was removed.
#[derive(Default)]
struct FakeStore {
    inner: Mutex<Inner>,
    pushed: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    next_seq: u64,
    readings: BTreeMap<QueueKey, Reading>,
    removed: Vec<QueueKey>,
}

impl FakeStore {
    fn push(&self, channel: ChannelId, target: Target, value: Value) {
        {
            let mut inner = self.inner.lock().unwrap();
            inner.next_seq += 1;
            let key = QueueKey {
                channel,
                seq: inner.next_seq,
            };
            inner.readings.insert(
                key,
                Reading {
                    channel,
                    target,
                    value,
                    measured_at: Utc::now(),
                    origin: Origin::new(SourceKind::Mqtt, "test-device"),
                },
            );
        }
        self.pushed.notify_one();
    }

    fn len(&self) -> usize {
        self.inner.lock().unwrap().readings.len()
    }

    fn removed(&self) -> usize {
        self.inner.lock().unwrap().removed.len()
    }
}

impl ReadingStore for FakeStore {
    fn channels(&self) -> Result<Vec<ChannelId>, StoreError> {
        let inner = self.inner.lock().unwrap();
        let mut channels: Vec<ChannelId> = inner.readings.keys().map(|k| k.channel).collect();
        channels.dedup();
        Ok(channels)
    }

    fn peek(&self, channel: ChannelId, max: usize) -> Result<Vec<Queued>, StoreError> {
        let inner = self.inner.lock().unwrap();
        Ok(inner
            .readings
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
        let mut inner = self.inner.lock().unwrap();
        for k in keys {
            if inner.readings.remove(k).is_some() {
                inner.removed.push(*k);
            }
        }
        Ok(())
    }

    fn pushed(&self) -> Arc<Notify> {
        self.pushed.clone()
    }
}

fn ch(n: u64) -> ChannelId {
    ChannelId::new(n).unwrap()
}

fn field(n: u8) -> Target {
    Target::Field(Field::new(n).unwrap())
}

async fn emulator(interval: Duration, channels: &[ChannelId], wss: bool) -> EmulatorHandle {
    let mut b = Emulator::builder()
        .tls("127.0.0.1:0")
        .default_interval(interval)
        .device(DeviceSpec::new(
            "gw-client",
            "gw-user",
            "gw-pass",
            channels.iter().copied(),
        ));
    if wss {
        b = b.wss("127.0.0.1:0");
    }
    for c in channels {
        b = b.channel(ChannelSpec::new(*c, format!("W{c}"), format!("R{c}")));
    }
    b.start().await.expect("emulator starts")
}

fn config(emu: &EmulatorHandle, transport: Transport, interval_secs: f64) -> UpstreamConfig {
    let port = match transport {
        Transport::Wss => emu.wss_addr(),
        _ => emu.tls_addr(),
    }
    .unwrap()
    .port();
    UpstreamConfig {
        host: "127.0.0.1".into(),
        port: Some(port),
        transport,
        ca_file: emu.ca_file().map(|p| p.to_owned()),
        client_id: "gw-client".into(),
        username: "gw-user".into(),
        password: Secret::new("gw-pass"),
        keep_alive_secs: 30,
        update_interval_secs: interval_secs,
        reconnect_min_secs: 0.1,
        reconnect_max_secs: 0.5,
        channels: BTreeMap::new(),
    }
}

struct Running {
    metrics: Metrics,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ForwarderError>>,
}

fn start(config: UpstreamConfig, store: Arc<FakeStore>) -> Running {
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(tsgw_forwarder::run(
        config,
        store,
        metrics.clone(),
        shutdown.clone(),
    ));
    Running {
        metrics,
        shutdown,
        task,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("forwarder stops within 5 s after shutdown")
            .expect("forwarder task did not panic");
        result.expect("forwarder ends without error");
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tls_publish_arrives_merged_and_readings_are_removed() {
    let c = ch(1001);
    let emu = emulator(Duration::from_secs(1), &[c], false).await;
    let store = Arc::new(FakeStore::default());
    store.push(c, field(1), Value::Number(20.0));
    store.push(c, field(2), Value::Number(40.0));
    store.push(c, field(1), Value::Number(21.5));
    store.push(c, Target::Status, Value::Text("all ok".into()));

    let fwd = start(config(&emu, Transport::Tls, 1.0), store.clone());
    let entries = emu
        .wait_for_entries(c, 1, WAIT)
        .await
        .expect("an entry arrives");
    assert_eq!(entries.len(), 1, "all readings merged into one update");
    let e = &entries[0];
    assert_eq!(e.get(field(1)), Some("21.5"), "last value of field1 wins");
    assert_eq!(e.get(field(2)), Some("40"));
    assert_eq!(e.get(Target::Status), Some("all ok"));
    assert_eq!(e.get(field(3)), None);

    wait_until("readings removed after the write", || store.len() == 0).await;
    assert_eq!(store.removed(), 4);
    let m = fwd.metrics.clone();
    assert_eq!(m.updates_sent_total.with_label_values(&["1001"]).get(), 1);
    let conn = format!("127.0.0.1:{}", emu.tls_addr().unwrap().port());
    assert_eq!(m.upstream_connected.with_label_values(&[&conn]).get(), 1);
    assert_eq!(
        m.upstream_connects_total.with_label_values(&[&conn]).get(),
        1
    );
    assert!(m.upstream_last_publish_timestamp_seconds.get() > 1.7e9);
    assert!(!m.render().contains("gw-pass"));

    fwd.stop().await;
    assert_eq!(
        m.upstream_connected.with_label_values(&[&conn]).get(),
        0,
        "gauge cleared at shutdown"
    );
    let counters = emu.counters();
    assert_eq!(
        counters.closed_invalid, 0,
        "CONNECT and PUBLISH follow ThingSpeak's rules"
    );
    assert_eq!(counters.dropped_rate_limit, 0);
}

#[tokio::test]
async fn wss_publish_arrives() {
    let c = ch(1002);
    let emu = emulator(Duration::from_secs(1), &[c], true).await;
    let store = Arc::new(FakeStore::default());
    store.push(c, field(8), Value::Text("over websocket".into()));
    let fwd = start(config(&emu, Transport::Wss, 1.0), store.clone());
    let entries = emu.wait_for_entries(c, 1, WAIT).await.expect("entry");
    assert_eq!(entries[0].get(field(8)), Some("over websocket"));
    wait_until("reading removed", || store.len() == 0).await;
    fwd.stop().await;
}

#[tokio::test]
async fn rate_limit_is_respected_at_the_receiver() {
    let (a, b) = (ch(2001), ch(2002));
    // The emulator drops (and counts) any update closer than 1 s to the
    // previous one of its channel, measured when it receives it.
    let emu = emulator(Duration::from_secs(1), &[a, b], false).await;
    let store = Arc::new(FakeStore::default());
    let fwd = start(config(&emu, Transport::Tls, 1.0), store.clone());

    // Readings for both channels far faster than the interval, for 4.5 s.
    let feeder = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..45 {
                store.push(a, field(1), Value::Number(f64::from(i)));
                store.push(b, field(2), Value::Number(f64::from(i)));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::timeout(WAIT, feeder).await.unwrap().unwrap();
    let counters = emu
        .wait_for_counters(WAIT, |c| c.accepted >= 6)
        .await
        .expect("several updates accepted");
    // Let any remaining update go out, then check nothing was ever too fast.
    wait_until("queue drained", || store.len() == 0).await;
    fwd.stop().await;
    let counters_end = emu.counters();
    assert_eq!(
        counters_end.dropped_rate_limit, 0,
        "an update came faster than the interval: {counters_end:?}"
    );
    assert!(counters.accepted >= 6);
    let (ea, eb) = (emu.entries(a), emu.entries(b));
    // ~4.5 s of readings + drain at 1 update/s per channel: far fewer
    // updates than the 45 readings each, and at least 3 each.
    assert!(
        (3..=8).contains(&ea.len()),
        "channel a: {} updates",
        ea.len()
    );
    assert!(
        (3..=8).contains(&eb.len()),
        "channel b: {} updates",
        eb.len()
    );
    // The last update carries the last value.
    assert_eq!(ea.last().unwrap().get(field(1)), Some("44"));
    assert_eq!(eb.last().unwrap().get(field(2)), Some("44"));
    assert_eq!(counters_end.rejected_duplicate_timestamp, 0);
}

#[tokio::test]
async fn readings_stay_queued_while_down_and_arrive_after_reconnect() {
    let c = ch(3001);
    let emu = emulator(Duration::from_secs(1), &[c], false).await;
    let store = Arc::new(FakeStore::default());
    let fwd = start(config(&emu, Transport::Tls, 1.0), store.clone());
    emu.wait_for_counters(WAIT, |k| k.sessions >= 1)
        .await
        .expect("forwarder connects");

    // Cut the connection and keep refusing new ones (closing without CONNACK).
    emu.refuse_connections_with(
        Duration::from_secs(3),
        thingspeak_emulator::RefuseMode::Close,
    );
    emu.drop_all_connections();
    store.push(c, field(1), Value::Number(7.0));
    store.push(c, field(2), Value::Number(8.0));

    // While down, the readings are not removed and nothing is stored upstream.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        store.len(),
        2,
        "readings removed while the connection was down"
    );
    assert!(emu.entries(c).is_empty());
    let conn = format!("127.0.0.1:{}", emu.tls_addr().unwrap().port());
    assert_eq!(
        fwd.metrics
            .upstream_connected
            .with_label_values(&[&conn])
            .get(),
        0
    );
    assert!(
        fwd.metrics
            .upstream_disconnects_total
            .with_label_values(&[&conn, "closed_by_peer"])
            .get()
            + fwd
                .metrics
                .upstream_disconnects_total
                .with_label_values(&[&conn, "io"])
                .get()
            >= 1
    );

    // After the refusal ends the forwarder reconnects and delivers them.
    let entries = emu.wait_for_entries(c, 1, WAIT).await.expect("delivered");
    assert_eq!(entries[0].get(field(1)), Some("7"));
    assert_eq!(entries[0].get(field(2)), Some("8"));
    wait_until("readings removed", || store.len() == 0).await;
    assert!(
        fwd.metrics
            .upstream_connects_total
            .with_label_values(&[&conn])
            .get()
            >= 2
    );
    fwd.stop().await;
    assert_eq!(emu.counters().dropped_rate_limit, 0);
}

#[tokio::test]
async fn interval_holds_across_a_reconnect() {
    let c = ch(5001);
    let interval = Duration::from_secs(2);
    let emu = emulator(interval, &[c], false).await;
    let store = Arc::new(FakeStore::default());
    store.push(c, field(1), Value::Number(1.0));
    let fwd = start(config(&emu, Transport::Tls, 2.0), store.clone());
    emu.wait_for_entries(c, 1, WAIT)
        .await
        .expect("first update");

    // Lose the connection right after the update; the forwarder reconnects
    // within ~0.1-0.5 s, but must still wait out the channel's interval.
    emu.drop_all_connections();
    store.push(c, field(1), Value::Number(2.0));
    let entries = emu
        .wait_for_entries(c, 2, WAIT)
        .await
        .expect("second update");
    assert_eq!(entries[1].get(field(1)), Some("2"));
    let k = emu.counters();
    assert!(k.sessions >= 2, "reconnected: {k:?}");
    assert_eq!(k.dropped_rate_limit, 0, "update inside the interval: {k:?}");
    fwd.stop().await;
}

#[tokio::test]
async fn refused_credentials_are_retried_slowly_and_keep_readings() {
    let c = ch(4001);
    let emu = emulator(Duration::from_secs(1), &[c], false).await;
    let store = Arc::new(FakeStore::default());
    store.push(c, field(1), Value::Number(1.0));
    let mut cfg = config(&emu, Transport::Tls, 1.0);
    cfg.password = Secret::new("wrong-password");
    cfg.reconnect_min_secs = 0.05;
    cfg.reconnect_max_secs = 1.0;
    let fwd = start(cfg, store.clone());

    tokio::time::sleep(Duration::from_millis(3000)).await;
    let refusals = emu.counters().refusals;
    // At max backoff (0.5..1 s) 3 s allow at most ~7 attempts; a tight loop makes hundreds.
    assert!(
        (1..=8).contains(&refusals),
        "{refusals} CONNECTs refused in 3 s"
    );
    assert_eq!(store.len(), 1, "readings kept while refused");
    assert!(!fwd.task.is_finished(), "forwarder keeps retrying");
    let conn = format!("127.0.0.1:{}", emu.tls_addr().unwrap().port());
    let counted = fwd
        .metrics
        .upstream_disconnects_total
        .with_label_values(&[&conn, "refused"])
        .get();
    assert_eq!(counted, refusals, "every refusal is counted");
    fwd.stop().await;
}

#[tokio::test]
async fn invalid_config_is_reported_not_retried() {
    let store = Arc::new(FakeStore::default());
    let cfg = UpstreamConfig {
        client_id: "c".into(),
        username: "u".into(),
        ..UpstreamConfig::default()
    };
    let err = tsgw_forwarder::run(cfg, store, Metrics::new(), CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("upstream.password"), "{err}");
}

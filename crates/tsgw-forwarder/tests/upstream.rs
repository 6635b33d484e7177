//! The forwarder against the ThingSpeak emulator on loopback: TLS and WSS
//! delivery, the rate limit measured at the receiver, readings kept while the
//! connection is down, and slow retries after a refused CONNECT.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use thingspeak::{ChannelId, Field, Target};
use thingspeak_emulator::{ChannelSpec, DeviceSpec, Emulator, EmulatorHandle, Entry, WriteOrigin};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tsgw_core::{Metrics, Origin, Reading, Secret, SourceKind, Value};
use tsgw_forwarder::{Aggregate, ChannelOverride, ForwarderError, Transport, UpstreamConfig};

/// Bound on every wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

/// The store the forwarder reads: the shared in-memory one (it counts removals).
type FakeStore = tsgw_core::MemoryStore;

/// Queues a reading measured now.
fn push(store: &FakeStore, channel: ChannelId, target: Target, value: Value) {
    push_at(store, channel, target, value, Utc::now());
}

/// Queues a reading measured at `measured_at`; returns it for bookkeeping.
fn push_at(
    store: &FakeStore,
    channel: ChannelId,
    target: Target,
    value: Value,
    measured_at: DateTime<Utc>,
) -> Reading {
    let reading = Reading {
        channel,
        target,
        value,
        measured_at,
        origin: Origin::new(SourceKind::Mqtt, "test-device"),
    };
    store.push(reading.clone());
    reading
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
        // Reads for updates in doubt would go to the default rest_host
        // (api.thingspeak.com): off unless a test points REST at the emulator.
        read_api: false,
        ..UpstreamConfig::default()
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
    // All measured within one (closed) 1 s window.
    let at = Utc::now() - TimeDelta::seconds(5);
    push_at(&store, c, field(1), Value::Number(20.0), at);
    push_at(&store, c, field(2), Value::Number(40.0), at);
    push_at(&store, c, field(1), Value::Number(21.5), at);
    push_at(&store, c, Target::Status, Value::Text("all ok".into()), at);

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

    wait_until("readings removed after the write", || store.is_empty()).await;
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
    push(&store, c, field(8), Value::Text("over websocket".into()));
    let fwd = start(config(&emu, Transport::Wss, 1.0), store.clone());
    let entries = emu.wait_for_entries(c, 1, WAIT).await.expect("entry");
    assert_eq!(entries[0].get(field(8)), Some("over websocket"));
    wait_until("reading removed", || store.is_empty()).await;
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
                push(&store, a, field(1), Value::Number(f64::from(i)));
                push(&store, b, field(2), Value::Number(f64::from(i)));
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
    wait_until("queue drained", || store.is_empty()).await;
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
    let at = Utc::now();
    push_at(&store, c, field(1), Value::Number(7.0), at);
    push_at(&store, c, field(2), Value::Number(8.0), at);

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
    wait_until("readings removed", || store.is_empty()).await;
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
    push(&store, c, field(1), Value::Number(1.0));
    let fwd = start(config(&emu, Transport::Tls, 2.0), store.clone());
    emu.wait_for_entries(c, 1, WAIT)
        .await
        .expect("first update");

    // Lose the connection right after the update; the forwarder reconnects
    // within ~0.1-0.5 s, but must still wait out the channel's interval.
    emu.drop_all_connections();
    push(&store, c, field(1), Value::Number(2.0));
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
    push(&store, c, field(1), Value::Number(1.0));
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

/// The window start (whole seconds) of `at` for a window of `len_ms`.
fn window_of(at: DateTime<Utc>, len_ms: i64) -> DateTime<Utc> {
    let start = at.timestamp_millis().div_euclid(len_ms) * len_ms;
    DateTime::from_timestamp(start.div_euclid(1000), 0).unwrap()
}

/// What the forwarder must send for `values` (queue order) under `policy`,
/// computed independently of its code.
fn expected_aggregate(policy: Aggregate, values: &[f64]) -> String {
    let x = match policy {
        Aggregate::Last => *values.last().unwrap(),
        Aggregate::First => values[0],
        Aggregate::Mean => values.iter().sum::<f64>() / values.len() as f64,
        Aggregate::Min => values.iter().copied().fold(f64::MAX, f64::min),
        Aggregate::Max => values.iter().copied().fold(f64::MIN, f64::max),
        Aggregate::Sum => values.iter().sum(),
        Aggregate::Count => values.len() as f64,
    };
    Value::Number(x).to_string()
}

/// Expected entries of one channel: window start -> target -> value.
fn expected_windows(
    readings: &[Reading],
    channel: ChannelId,
    len_ms: i64,
    policy: impl Fn(Target) -> Aggregate,
) -> BTreeMap<DateTime<Utc>, BTreeMap<Target, String>> {
    let mut raw: BTreeMap<DateTime<Utc>, BTreeMap<Target, Vec<f64>>> = BTreeMap::new();
    for r in readings.iter().filter(|r| r.channel == channel) {
        let v = r.value.as_f64().unwrap();
        raw.entry(window_of(r.measured_at, len_ms))
            .or_default()
            .entry(r.target)
            .or_default()
            .push(v);
    }
    raw.into_iter()
        .map(|(w, targets)| {
            let values = targets
                .into_iter()
                .map(|(t, vs)| (t, expected_aggregate(policy(t), &vs)))
                .collect();
            (w, values)
        })
        .collect()
}

/// The emulator's entries of one channel in the same shape; fails on a
/// repeated created_at.
fn actual_windows(
    entries: &[Entry],
    targets: &[Target],
) -> BTreeMap<DateTime<Utc>, BTreeMap<Target, String>> {
    let mut out = BTreeMap::new();
    for e in entries {
        let values = targets
            .iter()
            .filter_map(|t| e.get(*t).map(|v| (*t, v.to_owned())))
            .collect();
        assert!(
            out.insert(e.created_at(), values).is_none(),
            "two entries at {}",
            e.created_at()
        );
    }
    out
}

async fn wait_long(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_hz_on_three_channels_gives_exact_window_aggregates_without_rate_limit_drops() {
    let chans = [ch(6001), ch(6002), ch(6003)];
    let emu = emulator(Duration::from_secs(2), &chans, false).await;
    let store = Arc::new(FakeStore::default());
    let mut cfg = config(&emu, Transport::Tls, 2.0);
    let policies = [
        (Aggregate::Mean, Aggregate::Max),
        (Aggregate::Sum, Aggregate::Count),
        (Aggregate::First, Aggregate::Min),
    ];
    for (c, (p1, p2)) in chans.iter().zip(policies) {
        cfg.channels.insert(
            c.to_string(),
            ChannelOverride {
                aggregate: BTreeMap::from([("field1".into(), p1), ("field2".into(), p2)]),
                ..ChannelOverride::default()
            },
        );
    }
    let fwd = start(cfg, store.clone());

    // 6 s of readings at 10 Hz on each channel, two fields each.
    let mut pushed = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..60u32 {
        tick.tick().await;
        for (n, c) in chans.iter().enumerate() {
            let a = f64::from((i * 7) % 13) + 0.25 * n as f64;
            let b = f64::from(i) * 1.5 - 20.0;
            let now = Utc::now();
            pushed.push(push_at(&store, *c, field(1), Value::Number(a), now));
            pushed.push(push_at(&store, *c, field(2), Value::Number(b), now));
        }
    }
    wait_long("every window sent", Duration::from_secs(30), || {
        store.is_empty()
    })
    .await;
    let metrics = fwd.metrics.clone();
    fwd.stop().await;

    let counters = emu.counters();
    assert_eq!(counters.dropped_rate_limit, 0, "{counters:?}");
    assert_eq!(counters.rejected_duplicate_timestamp, 0, "{counters:?}");
    let mut total = 0;
    for (c, (p1, p2)) in chans.iter().zip(policies) {
        let policy = |t: Target| if t == field(1) { p1 } else { p2 };
        let expected = expected_windows(&pushed, *c, 2000, policy);
        let actual = actual_windows(&emu.entries(*c), &[field(1), field(2)]);
        assert!(expected.len() >= 3, "{} windows", expected.len());
        assert_eq!(actual, expected, "channel {c} ({p1:?}, {p2:?})");
        assert_eq!(
            metrics
                .updates_confirmed_total
                .with_label_values(&[&c.to_string()])
                .get(),
            expected.len() as u64
        );
        total += expected.len();
    }
    assert_eq!(counters.accepted, total as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silently_dropped_updates_are_resent_until_confirmed_and_never_duplicated() {
    let c = ch(7001);
    let emu = emulator(Duration::from_secs(1), &[c], false).await;
    // The first two publishes vanish, then a quarter of them at random.
    emu.drop_next_publishes(2);
    emu.set_publish_drop_probability(0.25);
    let store = Arc::new(FakeStore::default());
    let mut cfg = config(&emu, Transport::Tls, 1.0);
    cfg.confirm_timeout_secs = 1.0;
    let fwd = start(cfg, store.clone());

    let mut pushed = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    for i in 0..30u32 {
        tick.tick().await;
        pushed.push(push_at(
            &store,
            c,
            field(1),
            Value::Number(f64::from(i)),
            Utc::now(),
        ));
    }
    wait_long("every window confirmed", Duration::from_secs(60), || {
        store.is_empty()
    })
    .await;
    let metrics = fwd.metrics.clone();
    fwd.stop().await;

    let expected = expected_windows(&pushed, c, 1000, |_| Aggregate::Last);
    let actual = actual_windows(&emu.entries(c), &[field(1)]);
    assert_eq!(
        actual, expected,
        "every window exactly once, with its last value"
    );
    let counters = emu.counters();
    assert!(counters.dropped_fault >= 2, "{counters:?}");
    let label = c.to_string();
    let retried = metrics
        .updates_retried_total
        .with_label_values(&[&label])
        .get();
    assert!(retried >= 2, "{retried} resends");
    assert_eq!(
        metrics
            .updates_confirmed_total
            .with_label_values(&[&label])
            .get(),
        expected.len() as u64
    );
    assert_eq!(counters.dropped_rate_limit, 0, "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_backlog_is_backfilled_by_bulk_calls_while_live_updates_continue() {
    let c = ch(8001);
    let key = "WRITEKEY00008001";
    let emu = Emulator::builder()
        .tls("127.0.0.1:0")
        .https("127.0.0.1:0")
        .default_interval(Duration::from_secs(1))
        .bulk_interval(Duration::from_secs(2))
        .channel(ChannelSpec::new(c, key, "READKEY000008001"))
        .device(DeviceSpec::new("gw-client", "gw-user", "gw-pass", [c]))
        .start()
        .await
        .expect("emulator starts");
    let store = Arc::new(FakeStore::default());

    // What a 20 s outage leaves in the queue: readings at 5 Hz, none sent.
    let started = Utc::now();
    let mut pushed = Vec::new();
    for i in 0..100i64 {
        let at = started - TimeDelta::milliseconds(20_000 - i * 200);
        pushed.push(push_at(&store, c, field(1), Value::Number(i as f64), at));
    }
    let mut cfg = config(&emu, Transport::Tls, 1.0);
    cfg.rest_host = "127.0.0.1".into();
    cfg.rest_port = Some(emu.https_addr().unwrap().port());
    cfg.bulk_interval_secs = 2.0;
    cfg.channels.insert(
        c.to_string(),
        ChannelOverride {
            write_key: Some(Secret::new(key)),
            ..ChannelOverride::default()
        },
    );
    let fwd = start(cfg, store.clone());

    // Live readings go on for 8 s.
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    for i in 100..140i64 {
        tick.tick().await;
        pushed.push(push_at(
            &store,
            c,
            field(1),
            Value::Number(i as f64),
            Utc::now(),
        ));
    }
    wait_long(
        "backlog and live data sent",
        Duration::from_secs(30),
        || store.is_empty(),
    )
    .await;
    fwd.stop().await;

    let entries = emu.entries(c);
    let expected = expected_windows(&pushed, c, 1000, |_| Aggregate::Last);
    assert_eq!(actual_windows(&entries, &[field(1)]), expected);
    let bulk: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.origin == WriteOrigin::Bulk)
        .collect();
    let live: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.origin == WriteOrigin::Mqtt)
        .collect();
    // Nearly all 20 outage windows by bulk, with their original timestamps.
    let outage_windows = expected
        .keys()
        .filter(|w| **w < window_of(started, 1000))
        .count();
    let bulk_outage = bulk
        .iter()
        .filter(|e| e.created_at() < window_of(started, 1000))
        .count();
    assert!(
        bulk_outage >= outage_windows - 2,
        "{bulk_outage} of {outage_windows} outage windows by bulk"
    );
    // Live windows kept going over MQTT meanwhile.
    let live_after_start = live
        .iter()
        .filter(|e| e.created_at() >= window_of(started, 1000))
        .count();
    assert!(
        live_after_start >= 4,
        "{live_after_start} live updates over MQTT"
    );
    let counters = emu.counters();
    assert!(counters.bulk_calls >= 1, "{counters:?}");
    assert_eq!(counters.bulk_rejected, 0, "{counters:?}");
    assert_eq!(counters.dropped_rate_limit, 0, "{counters:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_readings_survive_many_idle_renewals() {
    let c = ch(9001);
    let emu = Emulator::builder()
        .tls("127.0.0.1:0")
        .idle_timeout(Duration::from_secs(3))
        .default_interval(Duration::from_secs(1))
        .channel(ChannelSpec::new(c, "W9001", "R9001"))
        .device(DeviceSpec::new("gw-client", "gw-user", "gw-pass", [c]))
        .start()
        .await
        .expect("emulator starts");
    let store = Arc::new(FakeStore::default());
    let mut cfg = config(&emu, Transport::Tls, 1.0);
    cfg.idle_timeout_secs = 3.0;
    let fwd = start(cfg, store.clone());
    let mut pushed = Vec::new();
    for i in 0..5u32 {
        pushed.push(push_at(
            &store,
            c,
            field(1),
            Value::Number(f64::from(i)),
            Utc::now(),
        ));
        tokio::time::sleep(Duration::from_millis(3700)).await;
    }
    wait_long("all delivered", Duration::from_secs(20), || {
        store.is_empty()
    })
    .await;
    let metrics = fwd.metrics.clone();
    fwd.stop().await;
    let expected = expected_windows(&pushed, c, 1000, |_| Aggregate::Last);
    assert_eq!(actual_windows(&emu.entries(c), &[field(1)]), expected);
    let conn = format!("127.0.0.1:{}", emu.tls_addr().unwrap().port());
    let renewed = metrics
        .upstream_disconnects_total
        .with_label_values(&[&conn, "renew_idle"])
        .get();
    let counters = emu.counters();
    assert!(
        renewed + counters.closed_idle >= 3,
        "{renewed} renewals, {counters:?}"
    );
    assert_eq!(counters.closed_invalid, 0);
}

/// Pushes `n` readings at 5 Hz ending now (a backlog), field1 = 0..n.
fn seed_backlog(store: &FakeStore, c: ChannelId, n: i64) -> (DateTime<Utc>, Vec<Reading>) {
    let now = Utc::now();
    let readings = (0..n)
        .map(|i| {
            let at = now - TimeDelta::milliseconds((n - i) * 200);
            push_at(store, c, field(1), Value::Number(i as f64), at)
        })
        .collect();
    (now, readings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_newest_sends_only_the_newest_window_and_counts_the_rest() {
    let c = ch(8101);
    let emu = emulator(Duration::from_secs(1), &[c], false).await;
    let store = Arc::new(FakeStore::default());
    let (_, pushed) = seed_backlog(&store, c, 50);
    let mut cfg = config(&emu, Transport::Tls, 1.0);
    cfg.backfill = tsgw_forwarder::Backfill::Newest;
    let fwd = start(cfg, store.clone());
    wait_long("backlog handled", Duration::from_secs(20), || {
        store.is_empty()
    })
    .await;
    let metrics = fwd.metrics.clone();
    fwd.stop().await;
    let windows = expected_windows(&pushed, c, 1000, |_| Aggregate::Last);
    let entries = emu.entries(c);
    // The newest closed window when the channel first became due, plus at
    // most the still-open one that closed later.
    assert!(
        (1..=2).contains(&entries.len()),
        "{} entries",
        entries.len()
    );
    let last = entries.last().unwrap();
    assert_eq!(last.get(field(1)), Some("49"), "the newest data is kept");
    let dropped = metrics
        .updates_dropped_total
        .with_label_values(&[&c.to_string(), "backfill_newest"])
        .get();
    assert_eq!(dropped as usize + entries.len(), windows.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_mqtt_downsamples_a_long_backlog_and_keeps_every_reading_covered() {
    let c = ch(8201);
    let emu = emulator(Duration::from_secs(1), &[c], false).await;
    let store = Arc::new(FakeStore::default());
    let (_, pushed) = seed_backlog(&store, c, 60); // 12-13 windows of 1 s
    let mut cfg = config(&emu, Transport::Tls, 1.0);
    cfg.backfill = tsgw_forwarder::Backfill::Mqtt;
    cfg.downsample_after = 4;
    cfg.channels.insert(
        c.to_string(),
        ChannelOverride {
            aggregate: BTreeMap::from([("field1".into(), Aggregate::Count)]),
            ..ChannelOverride::default()
        },
    );
    let fwd = start(cfg, store.clone());
    wait_long("backlog sent", Duration::from_secs(30), || store.is_empty()).await;
    fwd.stop().await;
    let windows = expected_windows(&pushed, c, 1000, |_| Aggregate::Count);
    let entries = emu.entries(c);
    assert!(
        entries.len() < windows.len(),
        "{} updates for {} windows: merged",
        entries.len(),
        windows.len()
    );
    // "count" adds up to every reading exactly once; timestamps rise.
    let counted: u64 = entries
        .iter()
        .map(|e| e.get(field(1)).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(counted, 60);
    assert!(entries
        .windows(2)
        .all(|w| w[0].created_at() < w[1].created_at()));
    assert_eq!(entries[0].created_at(), *windows.keys().next().unwrap());
    assert_eq!(emu.counters().dropped_rate_limit, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_calls_back_off_on_429_and_succeed_later() {
    let c = ch(8301);
    let key = "WRITEKEY00008301";
    // The emulator wants 3 s between bulk calls; the gateway is told 0.5 s.
    let emu = Emulator::builder()
        .tls("127.0.0.1:0")
        .https("127.0.0.1:0")
        .default_interval(Duration::from_secs(1))
        .bulk_interval(Duration::from_secs(3))
        .channel(ChannelSpec::new(c, key, "READKEY000008301"))
        .device(DeviceSpec::new("gw-client", "gw-user", "gw-pass", [c]))
        .start()
        .await
        .expect("emulator starts");
    let store = Arc::new(FakeStore::default());
    let (_, mut pushed) = seed_backlog(&store, c, 30);
    let mut cfg = config(&emu, Transport::Tls, 1.0);
    cfg.rest_host = "127.0.0.1".into();
    cfg.rest_port = Some(emu.https_addr().unwrap().port());
    cfg.bulk_interval_secs = 0.5;
    cfg.channels.insert(
        c.to_string(),
        ChannelOverride {
            write_key: Some(Secret::new(key)),
            ..ChannelOverride::default()
        },
    );
    let fwd = start(cfg, store.clone());
    // More backlog-making live data for 6 s.
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    for i in 30..60i64 {
        tick.tick().await;
        pushed.push(push_at(
            &store,
            c,
            field(1),
            Value::Number(i as f64),
            Utc::now(),
        ));
    }
    wait_long("all sent", Duration::from_secs(30), || store.is_empty()).await;
    fwd.stop().await;
    let expected = expected_windows(&pushed, c, 1000, |_| Aggregate::Last);
    assert_eq!(actual_windows(&emu.entries(c), &[field(1)]), expected);
    let k = emu.counters();
    assert!(k.bulk_calls >= 2, "{k:?}");
    // Rejected calls back off (0.5, 1, 2 s...): a handful, not a loop.
    assert!((1..=6).contains(&k.bulk_rejected), "{k:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_credential_set_gets_its_own_connection_and_channels() {
    let (a, b, d) = (ch(9101), ch(9102), ch(9103));
    let emu = Emulator::builder()
        .tls("127.0.0.1:0")
        .default_interval(Duration::from_secs(1))
        .channel(ChannelSpec::new(a, "WA9101", "RA9101"))
        .channel(ChannelSpec::new(b, "WB9102", "RB9102"))
        .channel(ChannelSpec::new(d, "WD9103", "RD9103"))
        // Each device may write only its own channels.
        .device(DeviceSpec::new("gw-client", "gw-user", "gw-pass", [a]))
        .device(DeviceSpec::new("dev-b", "user-b", "pass-b", [b, d]))
        .start()
        .await
        .expect("emulator starts");
    let store = Arc::new(FakeStore::default());
    let mut cfg = config(&emu, Transport::Tls, 1.0);
    cfg.connections = vec![tsgw_forwarder::ConnectionConfig {
        client_id: "dev-b".into(),
        username: "user-b".into(),
        password: Secret::new("pass-b"),
        channels: vec![b, d],
        ..Default::default()
    }];
    let fwd = start(cfg, store.clone());
    let at = Utc::now();
    push_at(&store, a, field(1), Value::Number(1.0), at);
    push_at(&store, b, field(1), Value::Number(2.0), at);
    push_at(&store, d, field(1), Value::Number(3.0), at);
    wait_until("all three delivered", || store.is_empty()).await;
    let metrics = fwd.metrics.clone();
    fwd.stop().await;
    assert_eq!(emu.entries(a)[0].get(field(1)), Some("1"));
    assert_eq!(emu.entries(b)[0].get(field(1)), Some("2"));
    assert_eq!(emu.entries(d)[0].get(field(1)), Some("3"));
    let k = emu.counters();
    assert!(k.sessions >= 2, "{k:?}");
    assert_eq!(
        k.closed_invalid, 0,
        "no channel on the wrong connection: {k:?}"
    );
    let port = emu.tls_addr().unwrap().port();
    for label in [
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{port}/dev-b"),
    ] {
        assert_eq!(
            metrics
                .upstream_connects_total
                .with_label_values(&[&label])
                .get(),
            1,
            "{label}"
        );
    }
    for c in [a, b, d] {
        assert_eq!(
            metrics
                .updates_confirmed_total
                .with_label_values(&[&c.to_string()])
                .get(),
            1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_write_key_topics_over_plain_tcp_deliver_and_confirm() {
    let c = ch(9201);
    let emu = Emulator::builder()
        .tcp("127.0.0.1:0")
        .default_interval(Duration::from_secs(1))
        .channel(ChannelSpec::new(c, "WRITEKEY00009201", "READKEY000009201"))
        .start()
        .await
        .expect("emulator starts");
    let store = Arc::new(FakeStore::default());
    let cfg = UpstreamConfig {
        host: "127.0.0.1".into(),
        port: Some(emu.tcp_addr().unwrap().port()),
        transport: Transport::Tcp,
        client_id: "legacy-gw".into(),
        auth: tsgw_forwarder::Auth::Legacy,
        update_interval_secs: 1.0,
        reconnect_min_secs: 0.1,
        reconnect_max_secs: 0.5,
        channels: BTreeMap::from([(
            c.to_string(),
            ChannelOverride {
                write_key: Some(Secret::new("WRITEKEY00009201")),
                read_key: Some(Secret::new("READKEY000009201")),
                ..ChannelOverride::default()
            },
        )]),
        ..UpstreamConfig::default()
    };
    let fwd = start(cfg, store.clone());
    push(&store, c, field(2), Value::Number(42.0));
    wait_until("delivered", || store.is_empty()).await;
    let metrics = fwd.metrics.clone();
    fwd.stop().await;
    assert_eq!(emu.entries(c)[0].get(field(2)), Some("42"));
    assert_eq!(
        metrics
            .updates_confirmed_total
            .with_label_values(&[&c.to_string()])
            .get(),
        1,
        "confirmed through the legacy read-key subscription"
    );
    let k = emu.counters();
    assert_eq!((k.closed_invalid, k.subscriptions_refused), (0, 0), "{k:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_field_updates_use_the_field_feed_topic_when_enabled() {
    let c = ch(9301);
    let emu = emulator(Duration::from_secs(1), &[c], false).await;
    let store = Arc::new(FakeStore::default());
    let mut cfg = config(&emu, Transport::Tls, 1.0);
    cfg.confirm = false;
    cfg.field_topics = true;
    let fwd = start(cfg, store.clone());
    let at = Utc::now() - TimeDelta::seconds(5);
    push_at(&store, c, field(3), Value::Number(7.5), at);
    let first = emu.wait_for_entries(c, 1, WAIT).await.expect("first");
    // Two targets in one window: the channel feed topic as usual.
    let at = Utc::now();
    push_at(&store, c, field(1), Value::Number(1.0), at);
    push_at(&store, c, field(2), Value::Number(2.0), at);
    let entries = emu.wait_for_entries(c, 2, WAIT).await.expect("second");
    wait_until("removed", || store.is_empty()).await;
    fwd.stop().await;
    assert_eq!(first[0].get(field(3)), Some("7.5"));
    // A field publish has no created_at: ThingSpeak stamps its own time.
    assert!(first[0].created_at() > at - TimeDelta::seconds(2));
    assert_eq!(entries[1].get(field(1)), Some("1"));
    assert_eq!(entries[1].get(field(2)), Some("2"));
    assert_eq!(emu.counters().closed_invalid, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_the_device_may_not_write_is_parked_and_the_others_keep_flowing() {
    let good = ch(9101);
    let bad = ch(9102);
    // Both channels exist, but the device may write only `good`: ThingSpeak
    // (the emulator) closes the connection on a publish to `bad`.
    let emu = Emulator::builder()
        .tls("127.0.0.1:0")
        .default_interval(Duration::from_secs(1))
        .channel(ChannelSpec::new(good, "W9101", "R9101"))
        .channel(ChannelSpec::new(bad, "W9102", "R9102"))
        .device(DeviceSpec::new("gw-client", "gw-user", "gw-pass", [good]))
        .start()
        .await
        .expect("emulator starts");
    let store = Arc::new(FakeStore::default());
    let fwd = start(config(&emu, Transport::Tls, 1.0), store.clone());
    let parked = |m: &Metrics| {
        m.channel_parked_total
            .with_label_values(&[&bad.to_string(), "closed_after_publish"])
            .get()
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut i = 0u32;
    while parked(&fwd.metrics) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not parked in time; emulator {:?}",
            emu.counters()
        );
        tick.tick().await;
        push(&store, good, field(1), Value::Number(f64::from(i)));
        push(&store, bad, field(1), Value::Number(f64::from(i)));
        i += 1;
    }
    let closes = emu.counters().closed_invalid;
    assert_eq!(closes, 3, "parked after three closes in a row");
    // From the park on, the good channel gets every window at full rate and
    // the connection stays up; the bad channel's readings stay queued.
    let mut windows = BTreeSet::new();
    for _ in 0..50 {
        tick.tick().await;
        let at = Utc::now();
        windows.insert(window_of(at, 1000));
        push_at(&store, good, field(1), Value::Number(f64::from(i)), at);
        push(&store, bad, field(1), Value::Number(f64::from(i)));
        i += 1;
    }
    let first = *windows.first().unwrap();
    let good_after = || {
        emu.entries(good)
            .iter()
            .filter(|e| e.created_at() >= first)
            .count()
    };
    // Full rate: one update per window, slots 100 ms longer than windows, so
    // at most the last window is still to go this long after the last push
    // (its close, plus a second of slack for a loaded machine).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let in_period = good_after();
    assert!(
        in_period + 1 >= windows.len(),
        "{in_period} updates of the good channel for its {} windows since the park",
        windows.len()
    );
    // And every one of its readings gets through.
    wait_until("the good channel's queue empties", || {
        tsgw_core::ReadingStore::len_of(store.as_ref(), good).unwrap() == 0
    })
    .await;
    let metrics = fwd.metrics.clone();
    fwd.stop().await;
    let counters = emu.counters();
    assert_eq!(counters.closed_invalid, closes, "no close while parked");
    assert_eq!(counters.dropped_rate_limit, 0, "{counters:?}");
    assert_eq!(good_after(), windows.len(), "one update per window");
    assert!(emu.entries(bad).is_empty());
    assert!(
        tsgw_core::ReadingStore::len_of(store.as_ref(), bad).unwrap() >= 50,
        "the parked channel's readings stay queued"
    );
    assert_eq!(
        metrics
            .channel_parked
            .with_label_values(&[&bad.to_string()])
            .get(),
        1
    );
}

//! Unit tests of the forwarder's state machine against the in-memory store
//! and a never-polled rumqttc event loop: events are fed by hand.

use thingspeak::{Field, Target};
use tsgw_core::{Origin, Reading, Secret, SourceKind, Value};

use super::confirm::{same_value, Stage};
use super::*;
use crate::config::Transport;
use crate::connection::{mqtt_options, REQUEST_CHANNEL_CAPACITY};
use crate::driver::Closed;
use thingspeak::EntryJson;
use tsgw_core::QueueKey;

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

/// A forwarder whose run started a minute ago: the readings of these tests
/// (measured 10 s ago) arrived during this run. Tests of windows left by a
/// previous run use [`restarted`].
fn forwarder(confirm: bool, store: Arc<MemStore>, metrics: Metrics) -> Forwarder {
    let mut f = restarted(confirm, store, metrics);
    f.started_utc = Utc::now() - chrono::TimeDelta::minutes(1);
    f
}

/// A forwarder started just now: queued readings measured before are a
/// previous run's, which may have written their windows.
fn restarted(confirm: bool, store: Arc<MemStore>, metrics: Metrics) -> Forwarder {
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
    assert_eq!(store.len(), 1, "kept while a close may still follow");
    // The connection outlives the publish by RIGHT_AFTER: "written" counts.
    f.send_due(later(5)).unwrap();
    assert_eq!(store.len(), 0, "removed once written (and survived)");
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
    // "Written" counts once the connection outlived the publish.
    f.send_due(later(4)).unwrap();
    assert!(gauge!(channel_last_confirmed_timestamp_seconds) >= before);
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
    assert_eq!(store.len(), 1, "kept while a close may still follow");
    f.send_due(later(5)).unwrap();
    assert_eq!(store.len(), 0);
}

/// Queues a reading of `channel` measured `secs_ago` seconds ago.
fn push_at(store: &MemStore, channel: ChannelId, seq: u64, secs_ago: i64, value: f64) {
    let at = Utc::now() - chrono::TimeDelta::seconds(secs_ago);
    push_measured(store, channel, seq, at, value);
}

fn push_measured(store: &MemStore, channel: ChannelId, seq: u64, at: DateTime<Utc>, value: f64) {
    store.insert(
        QueueKey { channel, seq },
        Reading {
            channel,
            target: field1(),
            value: Value::Number(value),
            measured_at: at,
            origin: Origin::new(SourceKind::Serial, "dev"),
        },
    );
}

/// ThingSpeak relays (or delivers on subscribing) an entry of channel 42.
fn entry_at(f: &mut Forwarder, generation: u64, created_at: DateTime<Utc>, value: &str) {
    let mut entry = EntryJson::new(ch(), 99, created_at);
    entry.field1 = Some(value.into());
    f.on_event(event(
        generation,
        ConnEventKind::Message {
            topic: "channels/42/subscribe".into(),
            payload: serde_json::to_vec(&entry).unwrap().into(),
        },
    ));
}

fn doubts(metrics: &Metrics, resolution: &str) -> u64 {
    metrics
        .updates_in_doubt_total
        .with_label_values(&["42", resolution])
        .get()
}

#[tokio::test]
async fn a_previous_runs_window_found_as_the_newest_entry_is_not_sent_again() {
    let store = Arc::new(MemStore::default());
    push_closed(&store, 1, field1(), Value::Number(5.0));
    let metrics = Metrics::new();
    let mut f = restarted(true, store.clone(), metrics.clone());
    f.confirm_timeout = Duration::from_secs(10);
    let _loop = connect_as(&mut f, 0);
    f.send_due(later(2)).unwrap();
    grant(&mut f, 0);
    // Granted, but the newest entry (delivered on subscribing) has not come
    // yet: a window the previous run may have written waits for it.
    f.send_due(later(2)).unwrap();
    assert!(
        f.in_flight.is_none(),
        "waits for the subscription's newest entry"
    );
    let created_at = f.pending[&ch()].batch.created_at().unwrap();
    assert!(f.pending[&ch()].maybe_stored);
    entry_at(&mut f, 0, created_at, "5");
    assert_eq!(store.len(), 0, "stored before the crash: delivered");
    assert_eq!(doubts(&metrics, "echo"), 1);
    assert_eq!(
        metrics.updates_sent_total.with_label_values(&["42"]).get(),
        0,
        "not sent again"
    );
}

#[tokio::test]
async fn a_previous_runs_window_stored_with_other_values_is_counted_not_resent() {
    let store = Arc::new(MemStore::default());
    push_closed(&store, 1, field1(), Value::Number(5.0));
    let metrics = Metrics::new();
    let mut f = restarted(true, store.clone(), metrics.clone());
    let _loop = connect_as(&mut f, 0);
    f.send_due(later(2)).unwrap();
    grant(&mut f, 0);
    let created_at = f.pending[&ch()].batch.created_at().unwrap();
    // The previous run stored this window with more readings than survived.
    entry_at(&mut f, 0, created_at, "7");
    assert_eq!(
        store.len(),
        0,
        "removed: sending them again could store some twice"
    );
    assert!(f.pending.is_empty());
    assert_eq!(doubts(&metrics, "stored_differs"), 1);
    assert_eq!(
        metrics
            .updates_dropped_total
            .with_label_values(&["42", "stored_differs"])
            .get(),
        1
    );
    f.send_due(later(4)).unwrap();
    assert!(
        f.in_flight.is_none() && f.pending.is_empty(),
        "nothing resent"
    );
}

#[tokio::test]
async fn an_unechoed_resend_waits_aside_and_the_next_echo_settles_it_as_a_duplicate() {
    let store = Arc::new(MemStore::default());
    push_at(&store, ch(), 1, 10, 5.0);
    push_at(&store, ch(), 2, 5, 6.0);
    let metrics = Metrics::new();
    let mut f = restarted(true, store.clone(), metrics.clone());
    let _loop = connect_as(&mut f, 0);
    f.send_due(later(2)).unwrap();
    grant(&mut f, 0);
    // The newest entry delivered on subscribing is older than both windows.
    entry_at(&mut f, 0, Utc::now() - chrono::TimeDelta::seconds(100), "1");
    f.send_due(later(2)).unwrap();
    assert_eq!(
        stage(&f),
        Some(Stage::Writing),
        "resent with its created_at"
    );
    let first = f.pending[&ch()].batch.created_at().unwrap();
    f.on_event(event(0, ConnEventKind::Written));

    // ThingSpeak already had it and rejected the resend: no echo. After one
    // confirm timeout the channel goes on with its next window at once.
    f.send_due(later(4)).unwrap();
    f.send_due(later(4)).unwrap();
    assert_eq!(stage(&f), Some(Stage::Writing), "next window not held back");
    let second = f.pending[&ch()].batch.created_at().unwrap();
    assert!(second > first);
    assert_eq!(store.len(), 2, "the doubt's readings stay queued meanwhile");
    f.on_event(event(0, ConnEventKind::Written));
    echo(&mut f, 0, "6");
    assert_eq!(store.len(), 0, "the later echo settles the doubt");
    assert_eq!(doubts(&metrics, "duplicate"), 1);
    assert_eq!(doubts(&metrics, "echo"), 1);
    assert_eq!(
        metrics
            .updates_confirmed_total
            .with_label_values(&["42"])
            .get(),
        2
    );
}

#[tokio::test]
async fn a_doubt_cut_short_by_a_lost_connection_is_resent_first() {
    let store = Arc::new(MemStore::default());
    push_at(&store, ch(), 1, 10, 5.0);
    push_at(&store, ch(), 2, 5, 6.0);
    let mut f = restarted(true, store.clone(), Metrics::new());
    let _loop = connect_as(&mut f, 0);
    f.send_due(later(2)).unwrap();
    grant(&mut f, 0);
    entry_at(&mut f, 0, Utc::now() - chrono::TimeDelta::seconds(100), "1");
    f.send_due(later(2)).unwrap();
    let first = f.pending[&ch()].batch.created_at().unwrap();
    f.on_event(event(0, ConnEventKind::Written));
    f.send_due(later(4)).unwrap();
    assert!(f.pending.is_empty(), "aside as a doubt");
    f.on_event(event(0, closed()));
    let _loop1 = connect_as(&mut f, 1);
    f.send_due(later(6)).unwrap();
    assert_eq!(
        f.pending[&ch()].batch.created_at(),
        Some(first),
        "the doubt goes again before newer windows"
    );
}

#[tokio::test]
async fn the_read_api_settles_a_previous_runs_windows_before_sending() {
    let store = Arc::new(MemStore::default());
    let measured = Utc::now() - chrono::TimeDelta::seconds(10);
    push_measured(&store, ch(), 1, measured, 5.0);
    push_at(&store, ch(), 2, 5, 6.0);
    let metrics = Metrics::new();
    let mut f = restarted(true, store.clone(), metrics.clone());
    // A client whose calls fail; the test feeds the read's answer by hand.
    f.bulk = Some(crate::rest::BulkClient::new("127.0.0.1".into(), 9, None));
    let _loop = connect_as(&mut f, 0);
    f.send_due(later(2)).unwrap();
    assert!(f.pending.is_empty(), "waits for the read");
    assert!(f.in_flight.is_none());
    let (start, end) = match &f.evidence[&ch()].read {
        super::doubt::ReadState::Asking { .. } => {
            (Utc::now() - chrono::TimeDelta::seconds(11), f.started_utc)
        }
        other => panic!("asking expected, got {other:?}"),
    };
    // Windows of 1 s start at whole seconds.
    let first = DateTime::from_timestamp(measured.timestamp(), 0).unwrap();
    let mut stored = thingspeak::FeedEntry::new(1, first);
    stored.field1 = Some("5".into());
    f.on_read_done(super::doubt::ReadDone {
        channel: ch(),
        start,
        end,
        result: crate::rest::ReadResult::Entries(vec![stored]),
    });
    f.send_due(later(2)).unwrap();
    f.send_due(later(2)).unwrap();
    f.next_check.clear();
    f.send_due(later(2)).unwrap();
    assert_eq!(store.len(), 1, "the stored window is delivered, unsent");
    assert_eq!(doubts(&metrics, "read_api"), 1);
    assert_eq!(doubts(&metrics, "not_stored"), 1);
    let p = &f.pending[&ch()];
    assert!(!p.maybe_stored, "known absent: an ordinary send");
    assert!(p.batch.created_at().unwrap() > first);
}

/// ThingSpeak closing the connection right after a publish it refuses.
fn peer_close() -> ConnEventKind {
    ConnEventKind::Closed(Closed {
        reason: "closed_by_peer",
        refused: None,
        message: "connection closed by peer".into(),
    })
}

#[tokio::test]
async fn a_channel_whose_publish_closes_the_connection_is_parked_and_others_flow() {
    let store = Arc::new(MemStore::default());
    let bad = ch();
    let good = ChannelId::new(43).unwrap();
    push_at(&store, bad, 1, 10, 1.0);
    push_at(&store, good, 2, 10, 2.0);
    let metrics = Metrics::new();
    let mut f = forwarder(false, store.clone(), metrics.clone());
    for round in 0..3u64 {
        let _loop = connect_as(&mut f, round);
        f.send_due(later(2 + 2 * round)).unwrap();
        assert_eq!(
            f.in_flight.as_ref().map(|i| i.channel),
            Some(bad),
            "round {round}"
        );
        f.on_event(event(round, peer_close()));
    }
    assert_eq!(
        metrics
            .channel_parked_total
            .with_label_values(&["42", "closed_after_publish"])
            .get(),
        1
    );
    assert_eq!(metrics.channel_parked.with_label_values(&["42"]).get(), 1);
    let _loop = connect_as(&mut f, 3);
    f.send_due(later(8)).unwrap();
    assert_eq!(
        f.in_flight.as_ref().map(|i| i.channel),
        Some(good),
        "the other channel goes while the bad one is parked"
    );
    f.on_event(event(3, ConnEventKind::Written));
    f.send_due(later(12)).unwrap();
    assert_eq!(store.len(), 1, "the parked channel's reading stays queued");
}

#[tokio::test]
async fn closes_that_do_not_follow_a_publish_park_nothing() {
    let store = Arc::new(MemStore::default());
    push_at(&store, ch(), 1, 10, 1.0);
    let metrics = Metrics::new();
    let mut f = forwarder(false, store.clone(), metrics.clone());
    for round in 0..4u64 {
        let _loop = connect_as(&mut f, round);
        // A ping timeout (a dead link), not the peer closing.
        f.send_due(later(2 + 2 * round)).unwrap();
        f.on_event(event(
            round,
            ConnEventKind::Closed(Closed {
                reason: "ping_timeout",
                refused: None,
                message: "no PINGRESP".into(),
            }),
        ));
    }
    assert_eq!(
        metrics
            .channel_parked_total
            .with_label_values(&["42", "closed_after_publish"])
            .get(),
        0
    );
}

/// Connects as `generation`, subscribes and publishes the channel's window.
fn written_window(f: &mut Forwarder, generation: u64) -> DateTime<Utc> {
    f.send_due(later(2)).unwrap();
    grant(f, generation);
    f.send_due(later(2)).unwrap();
    assert_eq!(stage(f), Some(Stage::Writing));
    f.on_event(event(generation, ConnEventKind::Written));
    f.pending[&ch()].batch.created_at().unwrap()
}

#[tokio::test]
async fn an_update_written_before_a_connection_loss_is_a_doubt_never_restamped() {
    let store = Arc::new(MemStore::default());
    push_at(&store, ch(), 1, 10, 5.0);
    let metrics = Metrics::new();
    let mut f = forwarder(true, store.clone(), metrics.clone());
    let _loop = connect_as(&mut f, 0);
    let first = written_window(&mut f, 0);
    // The connection drops before the echo: ThingSpeak may have stored it.
    f.on_event(event(0, closed()));
    assert_eq!(stage(&f), Some(Stage::InDoubt));
    assert!(
        f.pending[&ch()].maybe_stored,
        "written on a connection now lost: maybe stored"
    );
    push_at(&store, ch(), 2, 5, 6.0);
    let _loop1 = connect_as(&mut f, 1);
    f.send_due(later(2)).unwrap();
    grant(&mut f, 1);
    assert!(matches!(stage(&f), Some(Stage::Probe { .. })));
    // The check's newest entry is older (its echo lost, or not stored).
    entry_at(&mut f, 1, Utc::now() - chrono::TimeDelta::seconds(100), "1");
    f.send_due(later(4)).unwrap();
    assert_eq!(stage(&f), Some(Stage::Writing), "resent");
    assert_eq!(f.pending[&ch()].batch.created_at(), Some(first));
    f.on_event(event(1, ConnEventKind::Written));
    // ThingSpeak had it and rejects the resend silently: no echo. It waits
    // aside; the channel goes on at once with its next window.
    f.send_due(later(6)).unwrap();
    f.send_due(later(6)).unwrap();
    assert_eq!(stage(&f), Some(Stage::Writing), "next window not held back");
    let next = &f.pending[&ch()].batch;
    assert!(next.created_at().unwrap() > first);
    assert_eq!(
        next.covered.len(),
        1,
        "the doubt's reading joins no other window"
    );
    assert_eq!(store.len(), 2);
    f.on_event(event(1, ConnEventKind::Written));
    echo(&mut f, 1, "6");
    assert_eq!(store.len(), 0, "the later echo settles the doubt");
    assert_eq!(doubts(&metrics, "duplicate"), 1);
}

#[tokio::test]
async fn an_update_no_check_ever_finds_is_kept_in_doubt_never_restamped() {
    let store = Arc::new(MemStore::default());
    push_at(&store, ch(), 1, 10, 5.0);
    push_at(&store, ch(), 2, 5, 6.0);
    let metrics = Metrics::new();
    let mut f = forwarder(true, store.clone(), metrics.clone());
    let _loop = connect_as(&mut f, 0);
    let first = written_window(&mut f, 0);
    let mut loops = Vec::new();
    for k in 0..confirm::MAX_PROBES {
        // The same connection with room for more requests (the test's
        // event loop is never polled).
        loops.push(connect_as(&mut f, 0));
        f.send_due(later(3)).unwrap();
        assert!(matches!(stage(&f), Some(Stage::Probe { .. })), "check {k}");
        let pkid = u16::try_from(k + 2).unwrap();
        f.on_event(event(0, ConnEventKind::SubscribeSent(pkid)));
        f.on_event(event(
            0,
            ConnEventKind::SubAck {
                pkid,
                granted: true,
            },
        ));
        // The check brings nothing: resent with the same created_at.
        f.send_due(later(5)).unwrap();
        if k + 1 < confirm::MAX_PROBES {
            assert_eq!(stage(&f), Some(Stage::Writing), "check {k}");
            assert_eq!(f.pending[&ch()].batch.created_at(), Some(first));
            f.on_event(event(0, ConnEventKind::Written));
        }
    }
    // After the last check the window waits aside; its readings do not
    // join the next window under a new created_at.
    loops.push(connect_as(&mut f, 0));
    f.send_due(later(5)).unwrap();
    assert_eq!(stage(&f), Some(Stage::Writing), "the channel goes on");
    let next = &f.pending[&ch()].batch;
    assert!(next.created_at().unwrap() > first);
    assert!(
        !next.covered.contains(&QueueKey {
            channel: ch(),
            seq: 1
        }),
        "never restamped"
    );
    assert_eq!(f.evidence[&ch()].doubts.len(), 1);
    assert_eq!(store.len(), 2);
    f.on_event(event(0, ConnEventKind::Written));
    echo(&mut f, 0, "6");
    assert_eq!(store.len(), 0);
    assert_eq!(doubts(&metrics, "duplicate"), 1);
}

#[tokio::test]
async fn a_full_read_answer_covers_only_its_newest_entries_and_older_windows_are_read_again() {
    let store = Arc::new(MemStore::default());
    let old = Utc::now() - chrono::TimeDelta::seconds(10);
    let newer = Utc::now() - chrono::TimeDelta::seconds(5);
    push_measured(&store, ch(), 1, old, 5.0);
    push_measured(&store, ch(), 2, newer, 6.0);
    let metrics = Metrics::new();
    let mut f = restarted(true, store.clone(), metrics.clone());
    f.bulk = Some(crate::rest::BulkClient::new("127.0.0.1".into(), 9, None));
    let _loop = connect_as(&mut f, 0);
    f.send_due(later(2)).unwrap();
    let first_window = DateTime::from_timestamp(old.timestamp(), 0).unwrap();
    let second_window = DateTime::from_timestamp(newer.timestamp(), 0).unwrap();
    let (start, end) = match f.evidence[&ch()].read {
        super::doubt::ReadState::Asking { start, end, .. } => (start, end),
        ref other => panic!("asking expected, got {other:?}"),
    };
    assert_eq!((start, end), (first_window, f.started_utc));
    // A full answer: ThingSpeak returns the range's newest 8000 entries, the
    // oldest of them the second window's (stored). The first window lies
    // before them: unknown, not absent.
    let full: Vec<_> = (0..thingspeak::read::MAX_RESULTS)
        .map(|i| {
            let at = second_window + chrono::TimeDelta::milliseconds(i as i64);
            let mut e = thingspeak::FeedEntry::new(i as u64 + 1, at);
            e.field1 = Some(if i == 0 { "6" } else { "1" }.into());
            e
        })
        .collect();
    f.on_read_done(super::doubt::ReadDone {
        channel: ch(),
        start,
        end,
        result: crate::rest::ReadResult::Entries(full),
    });
    f.send_due(later(2)).unwrap();
    assert!(f.in_flight.is_none() && f.pending.is_empty(), "not sent");
    assert_eq!(doubts(&metrics, "not_stored"), 0, "not judged absent");
    let (start, end) = match f.evidence[&ch()].read {
        super::doubt::ReadState::Asking { start, end, .. } => (start, end),
        ref other => panic!("read again expected, got {other:?}"),
    };
    assert_eq!(
        (start, end),
        (first_window, second_window - chrono::TimeDelta::seconds(1)),
        "only the range the full answer left out"
    );
    f.on_read_done(super::doubt::ReadDone {
        channel: ch(),
        start,
        end,
        result: crate::rest::ReadResult::Entries(Vec::new()),
    });
    f.send_due(later(2)).unwrap();
    assert_eq!(doubts(&metrics, "not_stored"), 1);
    let p = &f.pending[&ch()];
    assert_eq!(p.batch.created_at(), Some(first_window));
    assert!(!p.maybe_stored, "known absent: an ordinary send");
    // The second window is settled by the first (full) answer.
    f.pending.clear();
    f.store
        .remove(&[QueueKey {
            channel: ch(),
            seq: 1,
        }])
        .unwrap();
    f.next_check.clear();
    f.send_due(later(2)).unwrap();
    assert_eq!(doubts(&metrics, "read_api"), 1);
    assert_eq!(store.len(), 0);
}

#[tokio::test]
async fn where_written_counts_a_close_right_after_the_publish_keeps_the_readings() {
    let store = Arc::new(MemStore::default());
    push_at(&store, ch(), 1, 10, 5.0);
    let metrics = Metrics::new();
    let mut f = forwarder(true, store.clone(), metrics.clone());
    let _loop = connect_as(&mut f, 0);
    f.send_due(later(2)).unwrap();
    // The device may not subscribe (nor, it turns out, write): written counts.
    f.on_event(event(0, ConnEventKind::SubscribeSent(1)));
    f.on_event(event(
        0,
        ConnEventKind::SubAck {
            pkid: 1,
            granted: false,
        },
    ));
    f.send_due(later(2)).unwrap();
    let first = f.pending[&ch()].batch.created_at();
    f.on_event(event(0, ConnEventKind::Written));
    // ThingSpeak closes the connection right after the publish.
    f.on_event(event(
        0,
        ConnEventKind::Closed(Closed {
            reason: "closed_by_peer",
            refused: None,
            message: "connection closed by peer".into(),
        }),
    ));
    assert_eq!(store.len(), 1, "neither kept nor counted would lose it");
    // Resent on the next connection with the same created_at.
    let _loop1 = connect_as(&mut f, 1);
    f.send_due(later(4)).unwrap();
    assert_eq!(stage(&f), Some(Stage::Writing));
    assert_eq!(f.pending[&ch()].batch.created_at(), first);
    f.on_event(event(1, ConnEventKind::Written));
    assert_eq!(store.len(), 1);
    // This time the connection outlives it: "written" counts.
    f.send_due(later(4) + poison::RIGHT_AFTER).unwrap();
    assert_eq!(store.len(), 0);
    assert_eq!(
        metrics.updates_sent_total.with_label_values(&["42"]).get(),
        2
    );
}

#[tokio::test]
async fn where_written_counts_a_later_publish_written_counts_the_earlier_one() {
    let store = Arc::new(MemStore::default());
    let other = ChannelId::new(43).unwrap();
    push_at(&store, ch(), 1, 10, 1.0);
    push_at(&store, other, 2, 10, 2.0);
    let mut f = forwarder(false, store.clone(), Metrics::new());
    let _loop = connect_as(&mut f, 0);
    f.send_due(later(2)).unwrap();
    let first = f.in_flight.as_ref().map(|i| i.channel).unwrap();
    f.on_event(event(0, ConnEventKind::Written));
    assert_eq!(store.len(), 2, "kept while a close may still follow");
    f.send_due(later(2)).unwrap();
    let second = f.in_flight.as_ref().map(|i| i.channel).unwrap();
    assert_ne!(first, second);
    f.on_event(event(0, ConnEventKind::Written));
    assert_eq!(
        tsgw_core::ReadingStore::len_of(store.as_ref(), first).unwrap(),
        0,
        "the connection took a later publish: the first counts"
    );
    assert_eq!(store.len(), 1);
}

#[tokio::test]
async fn a_parked_channel_leaves_the_others_every_slot() {
    let store = Arc::new(MemStore::default());
    let bad = ch();
    let good = ChannelId::new(43).unwrap();
    push_at(&store, bad, 1, 30, 1.0);
    let metrics = Metrics::new();
    let mut f = forwarder(false, store.clone(), metrics.clone());
    for round in 0..3u64 {
        let _loop = connect_as(&mut f, round);
        f.send_due(later(2 + 2 * round)).unwrap();
        assert_eq!(f.in_flight.as_ref().map(|i| i.channel), Some(bad));
        f.on_event(event(round, peer_close()));
    }
    assert_eq!(metrics.channel_parked.with_label_values(&["42"]).get(), 1);
    // The good channel has one reading in each of 5 closed 1 s windows.
    let windows = 5;
    for i in 0..windows {
        push_at(&store, good, 10 + i, 20 - i as i64, i as f64);
    }
    let _loop = connect_as(&mut f, 3);
    let mut sent = Vec::new();
    let mut at = f.schedule.due_at(good);
    for k in 0..windows {
        if k > 0 {
            // Nothing goes before the channel's slot...
            f.next_check.clear();
            f.send_due(at - Duration::from_millis(1)).unwrap();
            assert!(f.in_flight.is_none(), "before the slot");
        }
        // ...and the good channel's next window goes right at it: every
        // slot taken, the parked channel skipped.
        f.next_check.clear();
        f.send_due(at).unwrap();
        assert_eq!(f.in_flight.as_ref().map(|i| i.channel), Some(good));
        sent.push(f.pending[&good].batch.created_at().unwrap());
        f.on_event(event(3, ConnEventKind::Written));
        at = f.schedule.due_at(good);
    }
    assert!(sent.windows(2).all(|w| w[0] < w[1]), "in order: {sent:?}");
    assert_eq!(sent.len(), windows as usize, "one update per window");
    f.send_due(at + poison::RIGHT_AFTER).unwrap();
    assert_eq!(
        tsgw_core::ReadingStore::len_of(store.as_ref(), good).unwrap(),
        0,
        "every reading of the good channel delivered"
    );
    assert_eq!(
        tsgw_core::ReadingStore::len_of(store.as_ref(), bad).unwrap(),
        1,
        "the parked channel's reading stays queued"
    );
}

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

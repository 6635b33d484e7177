//! Drop-in subscribe at the front: ThingSpeak feed topics served from a
//! `FeedSource` (a stand-in for the forwarder's hub), next to the local
//! ACLs and ordinary subscriptions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeFilter, SubscribeReasonCode};
use thingspeak::{ChannelId, EntryJson};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tsgw_core::{FeedEntry, FeedFuture, FeedRefusal, FeedSource, FeedTap, Metrics};
use tsgw_mqtt::{MqttSource, MqttSourceConfig};

mod common;

const WAIT: Duration = Duration::from_secs(10);

/// A channel's feed and its newest entry.
type Feed = (broadcast::Sender<FeedEntry>, Option<FeedEntry>);

/// Channel 5 has a feed (with a newest entry); channel 9 is refused upstream.
#[derive(Default)]
struct FakeFeeds {
    feeds: Mutex<BTreeMap<u64, Feed>>,
    asked: Mutex<Vec<(u64, Option<String>)>>,
}

impl FakeFeeds {
    fn send(&self, channel: u64, entry: FeedEntry) {
        let mut feeds = self.feeds.lock().unwrap();
        let (tx, last) = feeds.get_mut(&channel).unwrap();
        *last = Some(entry.clone());
        let _ = tx.send(entry);
    }
}

impl FeedSource for FakeFeeds {
    fn subscribe(&self, channel: ChannelId, read_key: Option<String>) -> FeedFuture<'_> {
        self.asked.lock().unwrap().push((channel.get(), read_key));
        let answer = match self.feeds.lock().unwrap().get(&channel.get()) {
            Some((tx, last)) => Ok(FeedTap {
                last: last.clone(),
                entries: tx.subscribe(),
            }),
            None => Err(FeedRefusal {
                reason: "upstream_refused",
                message: format!("channel {channel}: refused"),
            }),
        };
        Box::pin(std::future::ready(answer))
    }
}

fn entry(id: u64, field1: &str) -> FeedEntry {
    let json = Bytes::from(format!(
        r#"{{"channel_id":5,"created_at":"2026-01-01T00:00:{id:02}Z","entry_id":{id},"field1":"{field1}","field2":null}}"#
    ));
    let parsed: EntryJson = serde_json::from_slice(&json).unwrap();
    FeedEntry {
        channel: parsed.channel_id,
        entry_id: id,
        json,
        entry: Arc::new(parsed),
    }
}

struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Packet>,
}

impl Client {
    async fn connect(port: u16, id: &str, user: &str) -> Client {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_credentials(user, "pw");
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let (tx, events) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(packet) = event {
                    if tx.send(packet).is_err() {
                        return;
                    }
                }
            }
        });
        let mut c = Client { client, events };
        assert!(matches!(c.next().await, Packet::ConnAck(_)));
        c
    }

    async fn next(&mut self) -> Packet {
        loop {
            let p = tokio::time::timeout(WAIT, self.events.recv())
                .await
                .expect("a packet in time")
                .expect("connection open");
            if !matches!(p, Packet::PingResp) {
                return p;
            }
        }
    }

    async fn suback(&mut self, topics: &[&str]) -> Vec<SubscribeReasonCode> {
        self.client
            .subscribe_many(
                topics
                    .iter()
                    .map(|t| SubscribeFilter::new(t.to_string(), QoS::AtMostOnce)),
            )
            .await
            .unwrap();
        loop {
            if let Packet::SubAck(ack) = self.next().await {
                return ack.return_codes;
            }
        }
    }

    async fn publish(&mut self) -> (String, Bytes) {
        loop {
            if let Packet::Publish(p) = self.next().await {
                return (p.topic, p.payload);
            }
        }
    }

    async fn quiet(&mut self) {
        match tokio::time::timeout(Duration::from_millis(300), self.events.recv()).await {
            Err(_) | Ok(Some(Packet::PingResp)) => {}
            Ok(other) => panic!("expected nothing, got {other:?}"),
        }
    }
}

fn denied(metrics: &Metrics, reason: &str, user: &str) -> u64 {
    metrics
        .mqtt_denied_total
        .with_label_values(&[reason, user])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_are_relayed_in_thingspeak_formats_behind_the_acls() {
    let mut cfg: MqttSourceConfig = toml::from_str(
        r#"
        [users.reader]
        password = "pw"
        subscribe = ["channels/+/subscribe", "channels/+/subscribe/#"]
        [users.limited]
        password = "pw"
        subscribe = ["home/#"]
        "#,
    )
    .unwrap();
    cfg.listen = Some("127.0.0.1:0".parse().unwrap());
    let feeds = Arc::new(FakeFeeds::default());
    feeds
        .feeds
        .lock()
        .unwrap()
        .insert(5, (broadcast::channel(16).0, Some(entry(1, "20"))));
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let (batches, _batch_rx) = mpsc::channel(32);
    let source = MqttSource::start_with_feeds(
        &cfg,
        &common::upstream_channels(),
        batches,
        Some(feeds.clone()),
        metrics.clone(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let port = source.addrs().plain.unwrap().port();

    let mut reader = Client::connect(port, "reader-1", "reader").await;
    let codes = reader
        .suback(&[
            "channels/5/subscribe",
            "channels/5/subscribe/fields/field1/RKEY",
            "channels/9/subscribe",
            "home/lamp",
        ])
        .await;
    use SubscribeReasonCode::{Failure, Success};
    let ok = Success(QoS::AtMostOnce);
    assert_eq!(codes, vec![ok, ok, Failure, Failure]);
    assert_eq!(
        feeds.asked.lock().unwrap().clone(),
        vec![(5, None), (5, Some("RKEY".into())), (9, None)]
    );
    // Like ThingSpeak: the newest entry right after subscribing, on each topic.
    let mut first = vec![reader.publish().await, reader.publish().await];
    first.sort();
    assert_eq!(
        first,
        vec![
            ("channels/5/subscribe".into(), entry(1, "20").json),
            (
                "channels/5/subscribe/fields/field1/RKEY".into(),
                Bytes::from_static(b"20")
            ),
        ]
    );
    feeds.send(5, entry(2, "21.5"));
    let mut next = [reader.publish().await, reader.publish().await];
    next.sort();
    assert_eq!(
        next[0],
        ("channels/5/subscribe".into(), entry(2, "21.5").json)
    );
    assert_eq!(next[1].1, Bytes::from_static(b"21.5"));

    // Unsubscribing a feed (the front answers) stops only that relay.
    reader
        .client
        .unsubscribe("channels/5/subscribe/fields/field1/RKEY")
        .await
        .unwrap();
    loop {
        if let Packet::UnsubAck(_) = reader.next().await {
            break;
        }
    }
    feeds.send(5, entry(3, "22"));
    assert_eq!(reader.publish().await.0, "channels/5/subscribe");
    reader.quiet().await;

    // Local ACLs first: an account limited to home/# gets no feed.
    let mut limited = Client::connect(port, "limited-1", "limited").await;
    assert_eq!(
        limited.suback(&["channels/5/subscribe"]).await,
        vec![Failure]
    );
    assert_eq!(feeds.asked.lock().unwrap().len(), 3, "never asked upstream");

    assert_eq!(denied(&metrics, "feed_upstream_refused", "reader"), 1);
    assert_eq!(denied(&metrics, "subscribe_denied", "reader"), 1);
    assert_eq!(denied(&metrics, "subscribe_denied", "limited"), 1);
    shutdown.cancel();
}

/// Without a feed source (no upstream), ThingSpeak feeds are refused, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_upstream_feeds_the_subscription_is_refused() {
    let cfg = MqttSourceConfig {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        allow_anonymous: true,
        ..Default::default()
    };
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let (source, _rx) = common::start_source(&cfg, metrics.clone(), shutdown.clone())
        .await
        .unwrap();
    let port = source.addrs().plain.unwrap().port();
    let mut c = Client::connect(port, "anon", "anyone").await;
    assert_eq!(
        c.suback(&["channels/5/subscribe/fields/field1"]).await,
        vec![SubscribeReasonCode::Failure]
    );
    shutdown.cancel();
}

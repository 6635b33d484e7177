//! From ThingSpeak down to local devices: drop-in subscribe (ThingSpeak's
//! channel and field feeds relayed to local subscribers) and `[[downlink]]`
//! rules, against the emulator with another writer using its REST API.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, SubscribeReasonCode};
use thingspeak_emulator::EmulatorHandle;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout};

use crate::common::*;

/// `mosquitto_sub -v` on the gateway's local broker, one line per message.
struct Sub {
    _child: Child,
    lines: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl Sub {
    fn start(broker: SocketAddr, id: &str, topics: &[&str]) -> Sub {
        let mut command = tokio::process::Command::new("mosquitto_sub");
        command
            .args(["-h", &broker.ip().to_string()])
            .args(["-p", &broker.port().to_string()])
            .args(["-i", id, "-v", "-q", "0"]);
        for t in topics {
            command.args(["-t", t]);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot run mosquitto_sub (install mosquitto-clients)");
        let stdout = child.stdout.take().unwrap();
        Sub {
            _child: child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// The next message as (topic, payload), within `within`.
    async fn next(&mut self, within: Duration) -> Option<(String, String)> {
        let line = tokio::time::timeout(within, self.lines.next_line())
            .await
            .ok()?
            .ok()??;
        let (topic, payload) = line.split_once(' ')?;
        Some((topic.to_owned(), payload.to_owned()))
    }
}

/// Writes an entry as another writer would (the web UI, a script): REST
/// `update.json` at the emulator. Returns the entry id.
async fn rest_update(emulator: &EmulatorHandle, ch: u64, query: &str) -> u64 {
    let path = format!(
        "/update.json?api_key={}&{query}",
        tsgw_testkit::write_key(ch)
    );
    let (status, body) = tsgw_testkit::http_get(emulator.http_addr().unwrap(), &path, WAIT)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{body}"));
    j["entry_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("not stored: {body}"))
}

/// Waits until the gateway's upstream subscription of `ch`'s feed is up.
async fn feed_subscribed(gateway: &Gateway, ch: u64) {
    let deadline = Instant::now() + WAIT;
    let metric = format!("tsgw_feed_subscribed{{channel=\"{ch}\"}}");
    while gateway.metric(&metric).await != 1.0 {
        assert!(
            Instant::now() < deadline,
            "feed of {ch} never subscribed: {}",
            gateway.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SUBACK codes a rumqttc client gets for `topics` at the gateway.
async fn suback(broker: SocketAddr, id: &str, topics: &[&str]) -> Vec<SubscribeReasonCode> {
    let mut options = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 10);
    client
        .subscribe_many(
            topics
                .iter()
                .map(|t| rumqttc::SubscribeFilter::new(t.to_string(), QoS::AtMostOnce)),
        )
        .await
        .unwrap();
    let wait = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Incoming::SubAck(ack))) => return ack.return_codes,
                Ok(_) => {}
                Err(e) => panic!("local connection failed: {e}"),
            }
        }
    };
    tokio::time::timeout(WAIT, wait).await.expect("no SUBACK")
}

#[tokio::test]
async fn rest_updates_reach_local_subscribers_in_thingspeak_formats() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(&emulator, dir.path(), 1.0, "");
    let gateway = Gateway::start(&config.write(dir.path()).unwrap());

    // A channel feed, a field feed and the legacy read-key form, all on one
    // local connection, as a sketch would subscribe.
    let legacy = "channels/1001/subscribe/fields/field2/READKEY000001001";
    let mut sub = Sub::start(
        gateway.mqtt,
        "sketch",
        &[
            "channels/1001/subscribe/fields/field1",
            "channels/1001/subscribe",
            legacy,
        ],
    );
    feed_subscribed(&gateway, 1001).await;
    // Give mosquitto_sub its SUBACK (the feed may have been made for it).
    tokio::time::sleep(Duration::from_millis(300)).await;

    for (n, value) in [(1u64, "21.5"), (2, "-3")] {
        if n > 1 {
            // The channel's 1 s rate limit.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let id = rest_update(
            &emulator,
            1001,
            &format!("field1={value}&field2=on{n}&status=set"),
        )
        .await;
        let stored = Instant::now();
        assert_eq!(id, n);
        let mut got = Vec::new();
        for _ in 0..3 {
            let left = Duration::from_secs(1).saturating_sub(stored.elapsed());
            match sub.next(left).await {
                Some(m) => got.push(m),
                None => panic!(
                    "entry {n}: only {got:?} within 1 s of being stored; gateway: {}",
                    gateway.log_tail()
                ),
            }
        }
        got.sort();
        // Byte for byte what ThingSpeak relays: the emulator's own subscriber JSON.
        let entry = emulator.entries(channel(1001)).pop().unwrap();
        let json = serde_json::to_string(&entry.data).unwrap();
        let mut want = vec![
            ("channels/1001/subscribe".to_owned(), json),
            (
                "channels/1001/subscribe/fields/field1".to_owned(),
                value.to_owned(),
            ),
            (legacy.to_owned(), format!("on{n}")),
        ];
        want.sort();
        assert_eq!(got, want, "entry {n}");
    }
    assert!(sub.next(Duration::from_millis(300)).await.is_none());
    // One upstream subscription served all three, each entry counted once.
    assert_eq!(
        gateway
            .metric("tsgw_feed_entries_total{channel=\"1001\"}")
            .await,
        2.0
    );
    assert_eq!(
        gateway
            .metric("tsgw_feed_missed_entries_total{channel=\"1001\"}")
            .await,
        0.0
    );
    let (status, health) = gateway.get("/readyz").await;
    assert_eq!(status, 200, "{health}");
    assert!(
        health.contains(r#""channel":1001,"state":"subscribed","last_entry_id":2"#),
        "{health}"
    );

    // Channels without credentials: the emulator's device is not authorised
    // for 4004 (ThingSpeak refuses), and a wrong read key is refused here.
    // A feed that works in the same SUBSCRIBE is still granted.
    let codes = suback(
        gateway.mqtt,
        "stranger",
        &[
            "channels/4004/subscribe",
            "channels/1001/subscribe/fields/field1",
            "sensors/any",
        ],
    )
    .await;
    assert_eq!(
        codes,
        vec![
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            SubscribeReasonCode::Success(QoS::AtMostOnce)
        ]
    );
    let denied = gateway.metric_family("tsgw_mqtt_denied_total").await;
    assert!(
        denied.contains("reason=\"feed_upstream_refused\"") && denied.ends_with(" 1"),
        "{denied}"
    );
    assert_eq!(
        gateway
            .metric("tsgw_feed_refused_total{reason=\"upstream_refused\"}")
            .await,
        1.0
    );
    assert!(gateway
        .find_log("ThingSpeak feed subscription refused: channel 4004: ThingSpeak refused the subscription to its feed (is the MQTT device authorised to subscribe to this channel?)")
        .is_some(), "{}", gateway.log_tail());
    gateway.stop();
}

/// A connection that carries subscriptions is renewed before ThingSpeak's
/// idle limit (here 3 s): the broker never closes it for idleness, and every
/// entry written meanwhile reaches the local subscriber exactly once, in order.
#[tokio::test]
async fn renewal_before_the_idle_limit_misses_no_entry() {
    tsgw_testkit::crypto();
    let emulator = tsgw_testkit::emulator_builder(Duration::from_secs(1))
        .idle_timeout(Duration::from_secs(3))
        .tls("127.0.0.1:0")
        .http("127.0.0.1:0")
        .start()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&emulator, dir.path(), 1.0, "");
    config.upstream_extra = "idle_timeout_secs = 3\n".into();
    let gateway = Gateway::start(&config.write(dir.path()).unwrap());
    let mut sub = Sub::start(gateway.mqtt, "watcher", &["channels/1002/subscribe"]);
    feed_subscribed(&gateway, 1002).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let writes = 12;
    let writer = {
        let emulator_http = emulator.http_addr().unwrap();
        tokio::spawn(async move {
            for n in 0..writes {
                let path = format!(
                    "/update.json?api_key={}&field1={n}",
                    tsgw_testkit::write_key(1002)
                );
                let (status, body) = tsgw_testkit::http_get(emulator_http, &path, WAIT)
                    .await
                    .unwrap();
                assert!(status == 200 && body != "0", "write {n}: {body}");
                tokio::time::sleep(Duration::from_millis(1050)).await;
            }
        })
    };
    let mut ids = Vec::new();
    while ids.len() < writes {
        match sub.next(Duration::from_secs(5)).await {
            Some((_, payload)) => {
                let j: serde_json::Value = serde_json::from_str(&payload).unwrap();
                ids.push(j["entry_id"].as_u64().unwrap());
            }
            None => panic!("got entries {ids:?} only; gateway: {}", gateway.log_tail()),
        }
    }
    writer.await.unwrap();
    assert_eq!(ids, (1..=writes as u64).collect::<Vec<_>>());
    assert!(sub.next(Duration::from_millis(500)).await.is_none());
    let counters = emulator.counters();
    assert_eq!(counters.closed_idle, 0, "{counters:?}");
    let family = gateway
        .metric_family("tsgw_upstream_disconnects_total")
        .await;
    let renewed = family
        .split(", ")
        .filter(|l| l.contains("reason=\"renew_idle\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(renewed >= 3.0, "renewals over ~13 s at 2.5 s: {family}");
    assert_eq!(
        gateway
            .metric("tsgw_feed_missed_entries_total{channel=\"1002\"}")
            .await,
        0.0
    );
    gateway.stop();
}

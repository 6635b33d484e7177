//! Hostile local input: floods of silent connections, absurd topics and payloads.
//! Each is counted, survived, and leaves well-behaved devices unaffected.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tsgw_core::{Metrics, Reading, Value};
use tsgw_mqtt::{MqttSource, MqttSourceConfig};

const WAIT: Duration = Duration::from_secs(20);

fn config(extra: &str) -> MqttSourceConfig {
    toml::from_str(&format!(
        r#"
        listen = "127.0.0.1:0"
        {extra}
        [[rules]]
        name = "json"
        topic = "j"
        channel = 9
        parser = {{ format = "json", fields = {{ "/v" = "field1" }} }}
        [[rules]]
        name = "plain"
        topic = "p"
        channel = 9
        parser = {{ format = "plain", target = "field2" }}
        "#
    ))
    .unwrap()
}

async fn start(cfg: &MqttSourceConfig) -> (MqttSource, mpsc::Receiver<Reading>, Metrics) {
    let (tx, rx) = mpsc::channel(1000);
    let metrics = Metrics::new();
    let source = MqttSource::start(cfg, tx, metrics.clone(), CancellationToken::new())
        .await
        .unwrap();
    (source, rx, metrics)
}

/// Keeps trying to connect until CONNACK (slots may be full for a while).
async fn device(port: u16, id: &str) -> AsyncClient {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(WAIT, rx)
        .await
        .expect("device connects in time")
        .unwrap();
    client
}

async fn next_value(rx: &mut mpsc::Receiver<Reading>) -> Value {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("reading in time")
        .unwrap()
        .value
}

async fn eventually(metrics: &Metrics, what: &str, cond: impl Fn(&Metrics) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond(metrics) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}:\n{}",
            metrics.render()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_is_shed_and_devices_get_in() {
    let cfg = config("max_connections = 100\nconnect_timeout_ms = 500");
    let (source, mut rx, metrics) = start(&cfg).await;
    let addr = source.addrs().plain.unwrap();

    // 300 sockets that never send CONNECT: 100 take every slot, 200 are refused.
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    eventually(&metrics, "refusals counted", |m| {
        m.device_errors_total
            .with_label_values(&["mqtt", "mqtt", "max_connections"])
            .get()
            >= 200
    })
    .await;

    // The embedded broker drops the silent ones after connect_timeout_ms; a real device gets in.
    let dev = device(addr.port(), "patient").await;
    dev.publish("p", QoS::AtLeastOnce, false, "1")
        .await
        .unwrap();
    assert_eq!(next_value(&mut rx).await, Value::Number(1.0));
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_topics_and_payloads_are_counted_not_fatal() {
    let cfg = config("max_payload_bytes = 300000");
    let (source, mut rx, metrics) = start(&cfg).await;
    let port = source.addrs().plain.unwrap().port();
    let hostile = device(port, "hostile").await;
    let good = device(port, "good").await;

    let long_topic = "x/".repeat(20_000);
    hostile
        .publish(long_topic, QoS::AtMostOnce, false, "1")
        .await
        .unwrap();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    hostile
        .publish("j", QoS::AtMostOnce, false, deep)
        .await
        .unwrap();
    hostile
        .publish("j", QoS::AtMostOnce, false, r#"{"v": NaN}"#)
        .await
        .unwrap();
    hostile
        .publish("j", QoS::AtMostOnce, false, vec![0xC3, 0x28, 0xA0])
        .await
        .unwrap();
    hostile
        .publish("p", QoS::AtMostOnce, false, "")
        .await
        .unwrap();
    hostile
        .publish("j", QoS::AtMostOnce, false, r#"{"v": 1e999}"#)
        .await
        .unwrap();

    eventually(&metrics, "every bad message counted", |m| {
        let e = |dev: &str, reason: &str| {
            m.parse_errors_total
                .with_label_values(&["mqtt", dev, reason])
                .get()
        };
        e("unmapped", "unmapped_topic") == 1
            && e("json", "bad_json") >= 3
            && e("json", "not_utf8") == 1
            && e("plain", "empty") == 1
    })
    .await;

    good.publish("p", QoS::AtLeastOnce, false, "2.5")
        .await
        .unwrap();
    assert_eq!(next_value(&mut rx).await, Value::Number(2.5));
}

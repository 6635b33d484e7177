//! The MQTT source against real rumqttc clients on loopback.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tsgw_core::{Metrics, Reading, Value};
use tsgw_mqtt::{MqttSource, MqttSourceConfig};

mod common;

const WAIT: Duration = Duration::from_secs(10);

fn config(rules_toml: &str) -> MqttSourceConfig {
    let mut cfg: MqttSourceConfig = toml::from_str(rules_toml).expect("test config parses");
    cfg.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg
}

async fn start(
    cfg: &MqttSourceConfig,
) -> (
    MqttSource,
    mpsc::Receiver<Reading>,
    Metrics,
    CancellationToken,
) {
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    let (source, rx) = common::start_source(cfg, metrics.clone(), shutdown.clone())
        .await
        .expect("source starts");
    (source, rx, metrics, shutdown)
}

/// A connected device client whose event loop runs in the background.
async fn device(port: u16, id: &str) -> AsyncClient {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    let mut connected_tx = Some(connected_tx);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = connected_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(WAIT, connected_rx)
        .await
        .expect("device connects in time")
        .expect("event loop alive");
    client
}

async fn next(rx: &mut mpsc::Receiver<Reading>) -> Reading {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a reading arrives in time")
        .expect("channel open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_rule_feeds_several_fields_and_drop_in_works() {
    let cfg = config(
        r#"
        [[rules]]
        name = "climate"
        topic = "sensors/+/climate"
        channel = 42
        parser = { format = "json", fields = { "/t" = "field1", "/h" = "field2" } }
        "#,
    );
    let (source, mut rx, metrics, shutdown) = start(&cfg).await;
    let port = source.addrs().plain.unwrap().port();
    let dev = device(port, "esp-1").await;

    dev.publish(
        "sensors/kitchen/climate",
        QoS::AtLeastOnce,
        false,
        r#"{"t":21.5,"h":40}"#,
    )
    .await
    .unwrap();
    let mut pair = [next(&mut rx).await, next(&mut rx).await];
    pair.sort_by_key(|r| r.target);
    let [a, b] = pair;
    assert_eq!(
        (a.channel.get(), a.target.to_string(), a.value),
        (42, "field1".into(), Value::Number(21.5))
    );
    assert_eq!(
        (b.target.to_string(), b.value),
        ("field2".into(), Value::Number(40.0))
    );
    assert_eq!(a.origin.device, "climate");

    dev.publish(
        "channels/7/publish",
        QoS::AtMostOnce,
        false,
        "field3=1.5&status=hello",
    )
    .await
    .unwrap();
    let mut got = [next(&mut rx).await, next(&mut rx).await];
    got.sort_by_key(|r| r.target);
    assert_eq!(got[0].target.to_string(), "field3");
    assert_eq!(got[1].value, Value::Text("hello".into()));
    assert_eq!(got[0].channel.get(), 7);

    dev.publish(
        "channels/7/publish/fields/field4/SOMEWRITEKEY",
        QoS::AtMostOnce,
        false,
        "9",
    )
    .await
    .unwrap();
    let r = next(&mut rx).await;
    assert_eq!(
        (r.target.to_string(), r.value),
        ("field4".into(), Value::Number(9.0))
    );

    let accepted = metrics
        .readings_total
        .with_label_values(&["mqtt", "climate", "accepted"])
        .get();
    assert_eq!(accepted, 2);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_counted_and_other_clients_keep_working() {
    let cfg = config(
        r#"
        [[rules]]
        name = "temp"
        topic = "t/+"
        channel = 1
        parser = { format = "plain", target = "field1" }
        "#,
    );
    let (source, mut rx, metrics, shutdown) = start(&cfg).await;
    let port = source.addrs().plain.unwrap().port();
    let bad = device(port, "bad").await;
    let good = device(port, "good").await;

    bad.publish("nobody/listens", QoS::AtMostOnce, false, "1")
        .await
        .unwrap();
    bad.publish("t/a", QoS::AtMostOnce, false, vec![0xff, 0xfe])
        .await
        .unwrap();
    bad.publish("channels/0/publish", QoS::AtMostOnce, false, "field1=1")
        .await
        .unwrap();
    // Over max_payload_bytes: rumqttd closes that client only.
    bad.publish("t/a", QoS::AtMostOnce, false, vec![b'1'; 64 * 1024])
        .await
        .unwrap();

    good.publish("t/b", QoS::AtLeastOnce, false, "3.25")
        .await
        .unwrap();
    let r = next(&mut rx).await;
    assert_eq!(r.value, Value::Number(3.25));

    let errors = |device: &str, reason: &str| {
        metrics
            .parse_errors_total
            .with_label_values(&["mqtt", device, reason])
            .get()
    };
    // The bad client's messages travel on another connection: wait for them.
    let deadline = tokio::time::Instant::now() + WAIT;
    while (
        errors("unmapped", "unmapped_topic"),
        errors("temp", "not_utf8"),
        errors("drop_in", "bad_topic"),
    ) != (1, 1, 1)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "bad input not counted: {}",
            metrics.render()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metrics.broker_connections.get() >= 1);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_fails_startup_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cfg = MqttSourceConfig {
        listen: Some(taken.local_addr().unwrap()),
        ..MqttSourceConfig::default()
    };
    let err = common::start_source(&cfg, Metrics::new(), CancellationToken::new())
        .await
        .err()
        .expect("startup fails");
    let text = err.to_string();
    assert!(text.contains("mqtt.listen"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_messages_pass_the_router_unschedule() {
    // rumqttd pauses a local link after ~200 forwards unless it is woken.
    let cfg = config(
        r#"
        [[rules]]
        name = "n"
        topic = "n"
        channel = 1
        parser = { format = "plain", target = "field1" }
        "#,
    );
    let (source, mut rx, _metrics, shutdown) = start(&cfg).await;
    let dev = device(source.addrs().plain.unwrap().port(), "burst").await;
    let total = 2000;
    tokio::spawn(async move {
        for i in 0..total {
            dev.publish("n", QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
        }
    });
    for _ in 0..total {
        next(&mut rx).await;
    }
    shutdown.cancel();
}

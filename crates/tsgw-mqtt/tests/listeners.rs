//! The optional listeners (TLS, WebSocket) and device authentication.

use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tsgw_core::{Metrics, Reading, Secret, Value};
use tsgw_mqtt::{MqttSource, MqttSourceConfig};

mod common;
use common::tls_fixture;

const WAIT: Duration = Duration::from_secs(10);

fn rule_config() -> MqttSourceConfig {
    toml::from_str(
        r#"
        listen = "127.0.0.1:0"
        [[rules]]
        name = "r"
        topic = "t"
        channel = 5
        parser = { format = "plain", target = "field1" }
        "#,
    )
    .unwrap()
}

async fn start(cfg: &MqttSourceConfig) -> (MqttSource, mpsc::Receiver<Reading>, Metrics) {
    let metrics = Metrics::new();
    let (source, rx) = common::start_source(cfg, metrics.clone(), CancellationToken::new())
        .await
        .expect("source starts");
    (source, rx, metrics)
}

/// Connects with `opts`; returns the client once CONNACK came, or the connection error.
async fn connect(opts: MqttOptions) -> Result<AsyncClient, ConnectionError> {
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let first = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("connect attempt finishes in time");
    first?;
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    Ok(client)
}

async fn expect_value(rx: &mut mpsc::Receiver<Reading>, expected: f64) {
    let r = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.value, Value::Number(expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_need_the_configured_credentials() {
    let mut cfg = rule_config();
    cfg.users
        .insert("esp".into(), Secret::new("right-password").into());
    let (source, mut rx, _) = start(&cfg).await;
    let port = source.addrs().plain.unwrap().port();

    let mut wrong = MqttOptions::new("intruder", "127.0.0.1", port);
    wrong.set_credentials("esp", "wrong-password");
    assert!(
        connect(wrong).await.is_err(),
        "a wrong password was accepted"
    );

    let mut anonymous = MqttOptions::new("anon", "127.0.0.1", port);
    anonymous.set_keep_alive(Duration::from_secs(5));
    assert!(
        connect(anonymous).await.is_err(),
        "no credentials were accepted"
    );

    let mut right = MqttOptions::new("esp-1", "127.0.0.1", port);
    right.set_credentials("esp", "right-password");
    let client = connect(right).await.expect("right password accepted");
    client
        .publish("t", QoS::AtLeastOnce, false, "1.5")
        .await
        .unwrap();
    expect_value(&mut rx, 1.5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_devices_and_a_silent_client_stalls_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let (tls, client_tls) = tls_fixture(&dir);
    let mut cfg = rule_config();
    cfg.tls = Some(tls);
    let (source, mut rx, metrics) = start(&cfg).await;
    let tls_addr = source.addrs().tls.unwrap();

    // A client that opens TCP and never speaks TLS.
    let silent = tokio::net::TcpStream::connect(tls_addr).await.unwrap();

    let mut opts = MqttOptions::new("tls-device", "localhost", tls_addr.port());
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        client_tls,
    )));
    let client = connect(opts)
        .await
        .expect("TLS device connects despite the silent one");
    client
        .publish("t", QoS::AtLeastOnce, false, "2.5")
        .await
        .unwrap();
    expect_value(&mut rx, 2.5).await;

    // The silent client is dropped after the handshake timeout (500 ms).
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut buf = [0u8; 1];
    let mut silent = silent;
    let closed = tokio::time::timeout_at(deadline, async {
        use tokio::io::AsyncReadExt;
        silent.read(&mut buf).await
    })
    .await
    .expect("silent client closed in time");
    assert!(matches!(closed, Ok(0) | Err(_)));
    let deadline = tokio::time::Instant::now() + WAIT;
    while metrics
        .device_errors_total
        .with_label_values(&["mqtt", "mqtts", "tls_handshake"])
        .get()
        != 1
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handshake failure not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_certificate_file_is_a_config_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut tls, _) = tls_fixture(&dir);
    std::fs::write(&tls.cert_file, "not a certificate").unwrap();
    tls.key_file = dir.path().join("missing.key");
    let mut cfg = rule_config();
    cfg.tls = Some(tls);
    let err = tsgw_mqtt::validate(&cfg).unwrap_err().to_string();
    assert!(
        err.contains("mqtt.tls") && err.contains("broker.crt"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_listener_serves_devices() {
    let mut cfg = rule_config();
    cfg.websocket_listen = Some("127.0.0.1:0".parse().unwrap());
    let (source, mut rx, _) = start(&cfg).await;
    let ws = source.addrs().websocket.unwrap();
    let mut opts = MqttOptions::new("ws-device", format!("ws://{ws}/mqtt"), ws.port());
    opts.set_transport(Transport::Ws);
    let client = connect(opts).await.expect("WebSocket device connects");
    client
        .publish("t", QoS::AtLeastOnce, false, "3.5")
        .await
        .unwrap();
    expect_value(&mut rx, 3.5).await;
}

//! The local broker's front, against the real binary: bursts larger than every
//! buffer on the way in are accounted for exactly, a slow queue writer makes
//! devices wait instead of losing readings, QoS 1 acks survive SIGKILL, and
//! the access rules (accounts, ACLs, anonymous clients, write keys) hold.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS,
    SubscribeReasonCode,
};
use tokio::sync::mpsc;

use crate::common::*;

/// What a burst may take at most (debug build, 2 cores, other tests running).
const BURST_WAIT: Duration = Duration::from_secs(600);

const ACCEPTED: &str = r#"tsgw_readings_total{device="drop_in",result="accepted",source="mqtt"}"#;

/// Waits until the gateway accepted `expected` drop-in readings; panics with
/// the metrics if it does not get there (or goes past it).
async fn wait_accepted(gateway: &Gateway, expected: f64) -> String {
    let deadline = Instant::now() + BURST_WAIT;
    loop {
        let (_, text) = gateway.get("/metrics").await;
        let accepted = metric_value(&text, ACCEPTED).unwrap_or(0.0);
        assert!(
            accepted <= expected,
            "more accepted than published:\n{text}"
        );
        if accepted == expected {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "accepted {accepted} of {expected} in time; metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Published = accepted + every counted way of refusing or dropping.
fn assert_nothing_else_counted(text: &str) {
    for family in [
        "tsgw_queue_dropped_total",
        "tsgw_parse_errors_total",
        "tsgw_mqtt_denied_total",
    ] {
        assert_eq!(metric_sum(text, family, &[]), 0.0, "{family}:\n{text}");
    }
}

/// Sends a QoS 0 burst and checks that every publish was accepted and nothing
/// else counted; returns the metrics at that point.
async fn burst_all_accounted_for(
    gateway: &Gateway,
    topic: &'static str,
    clients: usize,
    per_client: usize,
) -> String {
    let broker = gateway.mqtt;
    tokio::task::spawn_blocking(move || {
        tsgw_testkit::qos0_burst(broker, topic, clients, per_client, BURST_WAIT)
            .expect("every publish written")
    })
    .await
    .unwrap();
    let text = wait_accepted(gateway, (clients * per_client) as f64).await;
    assert_nothing_else_counted(&text);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_qos0_messages_from_several_clients_are_all_accounted_for() {
    let emu = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &config_toml(&emu, dir.path(), 1.0, ""));
    // The queue must hold the whole burst: a drop, counted or not, is not what this tests.
    let gateway = Gateway::start_with_env(&cfg, &[("TSGW_QUEUE__MAX_BYTES", "536870912")]);
    burst_all_accounted_for(&gateway, "channels/1001/publish", 4, 250_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_queue_writer_makes_devices_wait_not_lose() {
    let emu = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &config_toml(&emu, dir.path(), 1.0, ""));
    // Every write to the queue takes a second: one write takes at most 16
    // device reads (about 9 000 readings here), so the writer manages under
    // 9 000 readings/s however loaded the machine is, while the 32 reads the
    // channel to it holds fill within a second: the front must wait.
    let gateway = Gateway::start_with_env(&cfg, &[("TESTHOOK_TSGW_WRITER_DELAY_MS", "1000")]);
    let text = burst_all_accounted_for(&gateway, "channels/1002/publish", 2, 50_000).await;
    let waited = metric_value(&text, r#"tsgw_ingest_backpressure_total{source="mqtt"}"#);
    assert!(
        waited.unwrap_or(0.0) > 0.0,
        "the front never had to wait for the slowed writer:\n{text}"
    );
}

/// A device that sends `field1=1` at QoS 1 with up to `in_flight` publishes
/// unacknowledged, counting the PUBACKs it gets, until its connection drops.
async fn acking_device(
    broker: SocketAddr,
    id: String,
    in_flight: u16,
    acked: mpsc::UnboundedSender<()>,
) {
    let mut opts = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_inflight(in_flight);
    let (client, mut eventloop) = AsyncClient::new(opts, in_flight as usize);
    let publisher = tokio::spawn(async move {
        loop {
            if client
                .publish("channels/1003/publish", QoS::AtLeastOnce, false, "field1=1")
                .await
                .is_err()
            {
                return;
            }
        }
    });
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                let _ = acked.send(());
            }
            Ok(_) => {}
            // The gateway was killed: this device is done; a new one replaces it.
            Err(_) => break,
        }
    }
    publisher.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_acks_survive_sigkill_every_acked_reading_arrives() {
    let emu = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    // Summing field1 makes every stored reading count upstream once.
    let extra = "[upstream.channels.1003]\naggregate = { field1 = \"sum\" }\n";
    let cfg = write_config(dir.path(), &config_toml(&emu, dir.path(), 1.0, extra));
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel();
    let kills = 12;
    for kill in 0..kills {
        let gateway = Gateway::start(&cfg);
        let devices: Vec<_> = (0..3)
            .map(|d| {
                tokio::spawn(acking_device(
                    gateway.mqtt,
                    format!("kill{kill}-dev{d}"),
                    20,
                    acks_tx.clone(),
                ))
            })
            .collect();
        // Kill at a different point of the write/fsync/ack cycle each time.
        tokio::time::sleep(Duration::from_millis(150 + 97 * kill as u64)).await;
        gateway.kill();
        for d in devices {
            let _ = tokio::time::timeout(WAIT, d).await;
        }
    }
    drop(acks_tx);
    let mut acked = 0u64;
    while acks_rx.recv().await.is_some() {
        acked += 1;
    }
    assert!(acked > 0, "no publish was ever acknowledged");

    // A last run with no load drains what the kills left.
    let gateway = Gateway::start(&cfg);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let queued = gateway.metric("tsgw_queue_readings").await;
        let sum: f64 = entries(&emu, 1003)
            .iter()
            .filter_map(|e| e.field(1).and_then(|v| v.parse::<f64>().ok()))
            .sum();
        if queued == 0.0 && sum >= acked as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acked readings missing upstream: {acked} acked, {sum} summed at the emulator, {queued} still queued; log:\n{}",
            gateway.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Connects and returns the client with its incoming packets, or the error
/// the broker answered with.
async fn connect(
    broker: SocketAddr,
    id: &str,
    credentials: Option<(&str, &str)>,
) -> Result<(AsyncClient, mpsc::UnboundedReceiver<Packet>), ConnectionError> {
    let mut opts = MqttOptions::new(id, broker.ip().to_string(), broker.port());
    opts.set_keep_alive(Duration::from_secs(5));
    if let Some((user, password)) = credentials {
        opts.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
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
    .expect("the broker answers CONNECT in time");
    first?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(packet) = event {
                if tx.send(packet).is_err() {
                    return;
                }
            }
        }
    });
    Ok((client, rx))
}

async fn next_matching<T>(
    rx: &mut mpsc::UnboundedReceiver<Packet>,
    pick: impl Fn(Packet) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let packet = rx.recv().await.expect("connection alive");
            if let Some(found) = pick(packet) {
                return found;
            }
        }
    })
    .await
    .expect("the packet arrives in time")
}

fn refused_with(result: Result<impl Sized, ConnectionError>) -> ConnectReturnCode {
    match result {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Err(other) => panic!("expected a refusing CONNACK, got {other}"),
        Ok(_) => panic!("expected a refusing CONNACK, the client was admitted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_acls_and_write_keys() {
    let emu = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    // The account's password as `tsgw passwd` hashes it.
    let mut passwd = Command::new(env!("CARGO_BIN_EXE_tsgw"))
        .args(["passwd", "esp"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    passwd
        .stdin
        .take()
        .unwrap()
        .write_all(b"esp-password\n")
        .unwrap();
    let line = String::from_utf8(passwd.wait_with_output().unwrap().stdout).unwrap();
    let hash = line
        .trim()
        .strip_prefix("esp = ")
        .unwrap_or_else(|| panic!("tsgw passwd printed {line:?}"));
    let extra = format!(
        "[mqtt.users.esp]\npassword = {hash}\nchannels = [1001]\nsubscribe = [\"sensors/#\"]\n\
         [mqtt.users]\nwatcher = \"watch-password\"\n"
    );
    let cfg = write_config(dir.path(), &config_toml(&emu, dir.path(), 1.0, &extra));
    // Not loopback: anonymous clients are refused by default.
    let gateway = Gateway::start_with_env(&cfg, &[("TSGW_MQTT__LISTEN", "0.0.0.0:0")]);
    assert!(gateway.mqtt.ip().is_unspecified(), "{}", gateway.mqtt);
    let broker: SocketAddr = ([127, 0, 0, 1], gateway.mqtt.port()).into();

    assert_eq!(
        refused_with(connect(broker, "anon", None).await),
        ConnectReturnCode::NotAuthorized
    );
    assert_eq!(
        refused_with(connect(broker, "guess", Some(("esp", "wrong"))).await),
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refused_with(connect(broker, "who", Some(("nobody", "x"))).await),
        ConnectReturnCode::BadUserNamePassword
    );

    let (watcher, mut watched) = connect(broker, "watcher", Some(("watcher", "watch-password")))
        .await
        .expect("watcher admitted");
    watcher.subscribe("#", QoS::AtMostOnce).await.unwrap();
    let codes = next_matching(&mut watched, |p| match p {
        Packet::SubAck(ack) => Some(ack.return_codes),
        _ => None,
    })
    .await;
    assert_eq!(codes, vec![SubscribeReasonCode::Success(QoS::AtMostOnce)]);

    let (esp, mut esp_in) = connect(broker, "esp-1", Some(("esp", "esp-password")))
        .await
        .expect("esp admitted with its hashed password");
    esp.subscribe_many([
        rumqttc::SubscribeFilter::new("sensors/#".into(), QoS::AtMostOnce),
        rumqttc::SubscribeFilter::new("#".into(), QoS::AtMostOnce),
    ])
    .await
    .unwrap();
    let codes = next_matching(&mut esp_in, |p| match p {
        Packet::SubAck(ack) => Some(ack.return_codes),
        _ => None,
    })
    .await;
    assert_eq!(
        codes,
        vec![
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            SubscribeReasonCode::Failure
        ]
    );

    // Denied by the account's ACL, and a channel the gateway does not forward to:
    // both acknowledged (no negative PUBACK in MQTT 3.1.1), counted, never forwarded.
    esp.publish(
        "channels/1002/publish",
        QoS::AtLeastOnce,
        false,
        "field1=66",
    )
    .await
    .unwrap();
    esp.publish(
        "channels/999999/publish",
        QoS::AtLeastOnce,
        false,
        "field1=99",
    )
    .await
    .unwrap();
    // Allowed, with the legacy write key in the topic.
    esp.publish(
        "channels/1001/publish/WRITEKEY00001001",
        QoS::AtLeastOnce,
        false,
        "field1=7",
    )
    .await
    .unwrap();
    for _ in 0..3 {
        next_matching(&mut esp_in, |p| {
            matches!(p, Packet::PubAck(_)).then_some(())
        })
        .await;
    }

    // The watcher sees the allowed publish without its key, and nothing refused.
    let (topic, payload) = next_matching(&mut watched, |p| match p {
        Packet::Publish(p) => Some((p.topic, p.payload)),
        _ => None,
    })
    .await;
    assert_eq!(topic, "channels/1001/publish");
    assert_eq!(&payload[..], b"field1=7");

    wait_for_delivery(&emu, "the allowed reading", |got| {
        got.get(&(1001, "field1".into()))
            .is_some_and(|v| v.contains(&"7".to_owned()))
    })
    .await;
    let (_, text) = gateway.get("/metrics").await;
    for (sample, want) in [
        (
            r#"tsgw_mqtt_denied_total{reason="anonymous",user="anonymous"}"#,
            1.0,
        ),
        (
            r#"tsgw_mqtt_denied_total{reason="bad_password",user="esp"}"#,
            1.0,
        ),
        (
            r#"tsgw_mqtt_denied_total{reason="unknown_user",user="unknown"}"#,
            1.0,
        ),
        (
            r#"tsgw_mqtt_denied_total{reason="subscribe_denied",user="esp"}"#,
            1.0,
        ),
        (
            r#"tsgw_mqtt_denied_total{reason="publish_denied",user="esp"}"#,
            1.0,
        ),
        (
            r#"tsgw_mqtt_denied_total{reason="channel_not_allowed",user="esp"}"#,
            1.0,
        ),
        (r#"tsgw_mqtt_refused_channel_total{channel="999999"}"#, 1.0),
        (
            r#"tsgw_readings_total{device="esp",result="accepted",source="mqtt"}"#,
            1.0,
        ),
    ] {
        assert_eq!(metric_value(&text, sample), Some(want), "{sample}:\n{text}");
    }
    assert!(
        entries(&emu, 1002).is_empty(),
        "a denied publish was forwarded"
    );
    let log = gateway.log_text();
    // This config lists mqtt.drop_in.channels, so that is where the fix goes.
    assert!(log.contains("add 999999 to mqtt.drop_in.channels"), "{log}");
    assert!(
        !log.contains("WRITEKEY00001001"),
        "a write key reached the log"
    );
    assert!(!log.contains("esp-password") && !log.contains("watch-password"));
    // Nothing else reached the watcher: no refused publish, no key.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Ok(packet) = watched.try_recv() {
        if let Packet::Publish(p) = packet {
            panic!("the watcher got {:?}", p.topic);
        }
    }
}

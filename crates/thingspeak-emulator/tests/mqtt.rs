//! ThingSpeak's MQTT rules, each driven by a real rumqttc client.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{ConnectReturnCode, ConnectionError, LastWill, QoS};
use thingspeak_emulator::ChannelSpec;

fn assert_refused(r: Result<Conn, ConnectionError>, code: ConnectReturnCode) {
    match r {
        Err(ConnectionError::ConnectionRefused(c)) => assert_eq!(c, code),
        Err(e) => panic!("expected CONNACK {code:?}, got error {e}"),
        Ok(_) => panic!("expected CONNACK {code:?}, got a session"),
    }
}

#[tokio::test]
async fn device_publish_is_accepted_over_all_four_transports() {
    let emu = emulator().await;
    for (i, tr) in ALL.into_iter().enumerate() {
        let conn = connect(device(&emu, tr, DEV1)).await;
        conn.publish(
            "channels/100/publish",
            &format!("field1={i}&status=via%20{tr:?}"),
        )
        .await;
        let entries = emu.wait_for_entries(ch(100), i + 1, T).await.unwrap();
        let e = &entries[i];
        assert_eq!(e.entry_id(), i as u64 + 1);
        assert_eq!(e.field(1), Some(i.to_string().as_str()));
        assert_eq!(
            e.get(thingspeak::Target::Status),
            Some(format!("via {tr:?}").as_str())
        );
    }
    let c = emu.counters();
    assert_eq!((c.sessions, c.accepted, c.closed_invalid), (4, 4, 0));
}

#[tokio::test]
async fn connack_5_for_a_will() {
    let emu = emulator().await;
    let mut o = device(&emu, Tr::Tcp, DEV1);
    o.set_last_will(LastWill::new(
        "channels/100/publish",
        "field1=0",
        QoS::AtMostOnce,
        false,
    ));
    assert_refused(open(o).await, ConnectReturnCode::NotAuthorized);
    assert_eq!(emu.counters().refusals, 1);
}

#[tokio::test]
async fn connack_5_for_clean_session_off() {
    let emu = emulator().await;
    let mut o = device(&emu, Tr::Tls, DEV1);
    o.set_clean_session(false);
    assert_refused(open(o).await, ConnectReturnCode::NotAuthorized);
}

#[tokio::test]
async fn connack_5_for_a_bad_password_or_wrong_client_id() {
    let emu = emulator().await;
    let mut o = options(&emu, Tr::Tcp, DEV1.0);
    o.set_credentials(DEV1.1, "wrong");
    assert_refused(open(o).await, ConnectReturnCode::NotAuthorized);
    // Right username and password, but another device's client id.
    let mut o = options(&emu, Tr::Ws, "someone-else");
    o.set_credentials(DEV1.1, DEV1.2);
    assert_refused(open(o).await, ConnectReturnCode::NotAuthorized);
    assert_eq!(emu.counters().refusals, 2);
}

#[tokio::test]
async fn updates_within_the_interval_are_dropped_silently() {
    let emu = start(base().channel(
        ChannelSpec::new(ch(400), "WKEY400", "RKEY400").with_interval(Duration::from_secs(3600)),
    ))
    .await;
    let mut conn = connect(options(&emu, Tr::Tcp, "legacy-pub")).await;
    for v in 1..=3 {
        conn.publish("channels/400/publish/WKEY400", &format!("field1={v}"))
            .await;
    }
    let c = emu
        .wait_for_counters(T, |c| c.dropped_rate_limit == 2)
        .await
        .unwrap();
    assert_eq!(c.accepted, 1);
    assert_eq!(emu.entries(ch(400)).len(), 1);
    assert_eq!(emu.entries(ch(400))[0].field(1), Some("1"));
    // Silently: the connection stays open.
    conn.expect_quiet(Duration::from_millis(200)).await;
    assert_eq!(emu.counters().closed_invalid, 0);
}

#[tokio::test]
async fn a_repeated_created_at_is_rejected() {
    let emu = emulator().await;
    let conn = connect(device(&emu, Tr::Tcp, DEV1)).await;
    let at = "created_at=2026-01-02T03:04:05Z";
    conn.publish("channels/100/publish", &format!("field1=1&{at}"))
        .await;
    conn.publish("channels/100/publish", &format!("field1=2&{at}"))
        .await;
    conn.publish(
        "channels/100/publish",
        "field1=3&created_at=2026-01-02T03:04:06Z",
    )
    .await;
    let c = emu
        .wait_for_counters(T, |c| c.accepted + c.rejected_duplicate_timestamp == 3)
        .await
        .unwrap();
    assert_eq!((c.accepted, c.rejected_duplicate_timestamp), (2, 1));
    let e = emu.entries(ch(100));
    assert_eq!(e[0].field(1), Some("1"));
    assert_eq!(
        thingspeak::format_timestamp(&e[0].created_at()),
        "2026-01-02T03:04:05Z"
    );
    assert_eq!(e[1].field(1), Some("3"));
}

#[tokio::test]
async fn idle_sessions_are_closed_even_while_pinging() {
    let emu = start(base().idle_timeout(Duration::from_secs(2))).await;
    let mut o = device(&emu, Tr::Tcp, DEV1);
    o.set_keep_alive(Duration::from_secs(1));
    let mut conn = connect(o).await;
    let started = std::time::Instant::now();
    let pings = conn.expect_closed(Duration::from_secs(5)).await;
    let lasted = started.elapsed();
    assert!(pings >= 1, "PINGREQs were not answered");
    assert!(
        lasted >= Duration::from_millis(1800),
        "closed too early: {lasted:?}"
    );
    emu.wait_for_counters(T, |c| c.closed_idle == 1)
        .await
        .unwrap();
}

#[tokio::test]
async fn publishing_keeps_a_session_alive() {
    let emu = start(base().idle_timeout(Duration::from_secs(2))).await;
    let mut conn = connect(device(&emu, Tr::Tcp, DEV1)).await;
    // Publishes 0.4 s apart for 2.4 s: longer in total than the idle timeout.
    for v in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        conn.publish("channels/100/publish/fields/field1", &v.to_string())
            .await;
    }
    emu.wait_for_entries(ch(100), 6, T).await.unwrap();
    assert_eq!(emu.counters().closed_idle, 0);
    conn.expect_closed(Duration::from_secs(4)).await;
    emu.wait_for_counters(T, |c| c.closed_idle == 1)
        .await
        .unwrap();
}

#[tokio::test]
async fn feed_subscription_gets_the_last_entry_then_json_relays() {
    let emu = emulator().await;
    let publisher = connect(device(&emu, Tr::Tcp, DEV1)).await;
    publisher.publish("channels/100/publish", "field1=1").await;
    publisher
        .publish("channels/100/publish", "field1=2&field3=x")
        .await;
    emu.wait_for_entries(ch(100), 2, T).await.unwrap();

    let mut sub = connect(options(&emu, Tr::Wss, "reader")).await;
    sub.subscribe("channels/100/subscribe/json/RKEY100").await;
    let first = sub.next_publish(T).await;
    assert_eq!(first.topic, "channels/100/subscribe/json/RKEY100");
    let j: serde_json::Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(
        (j["entry_id"].as_u64(), j["field1"].as_str()),
        (Some(2), Some("2"))
    );
    assert_eq!(j["field3"], "x");
    assert_eq!(j["channel_id"], 100);

    publisher.publish("channels/100/publish", "field1=3").await;
    let relay = sub.next_publish(T).await;
    let j: serde_json::Value = serde_json::from_slice(&relay.payload).unwrap();
    assert_eq!(
        (j["entry_id"].as_u64(), j["field1"].as_str()),
        (Some(3), Some("3"))
    );
    assert!(j["field3"].is_null());
    assert!(j["created_at"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn device_feed_subscription_and_unauthorised_subscriptions() {
    let emu = emulator().await;
    let mut sub = connect(device(&emu, Tr::Tls, DEV1)).await;
    // Current API, authorised channel: granted. Channel 200 is not dev1's: refused.
    sub.client
        .subscribe_many([
            rumqttc::SubscribeFilter::new("channels/100/subscribe".into(), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new("channels/200/subscribe".into(), QoS::AtMostOnce),
            rumqttc::SubscribeFilter::new(
                "channels/200/subscribe/json/WRONG".into(),
                QoS::AtMostOnce,
            ),
        ])
        .await
        .unwrap();
    let ack = loop {
        if let rumqttc::Incoming::SubAck(a) = sub.next_incoming(T).await.unwrap() {
            break a;
        }
    };
    use rumqttc::SubscribeReasonCode as R;
    assert_eq!(
        ack.return_codes,
        vec![R::Success(QoS::AtMostOnce), R::Failure, R::Failure]
    );
    let c = emu.counters();
    assert_eq!((c.subscriptions, c.subscriptions_refused), (1, 2));
    // Written through the library (like update.json): relayed too.
    let mut u = thingspeak::ChannelUpdate::new();
    u.set("field2".parse().unwrap(), "7");
    emu.write(ch(100), &u).unwrap();
    let p = sub.next_publish(T).await;
    assert_eq!(p.topic, "channels/100/subscribe");
    let j: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(j["field2"], "7");
}

#[tokio::test]
async fn field_subscriptions_get_bare_values() {
    let emu = emulator().await;
    let mut one = connect(options(&emu, Tr::Ws, "one")).await;
    one.subscribe("channels/200/subscribe/fields/field2/RKEY200")
        .await;
    let mut all = connect(device(&emu, Tr::Tcp, DEV2)).await;
    all.subscribe("channels/300/subscribe/fields/+").await;
    emu.wait_for_counters(T, |c| c.subscriptions == 2)
        .await
        .unwrap();

    let publisher = connect(options(&emu, Tr::Tcp, "pub")).await;
    publisher
        .publish("channels/200/publish/WKEY200", "field1=10&field2=20")
        .await;
    let p = one.next_publish(T).await;
    assert_eq!(p.topic, "channels/200/subscribe/fields/field2/RKEY200");
    assert_eq!(&p.payload[..], b"20");

    publisher
        .publish("channels/300/publish/WKEY300", "field1=1.5&field4=hello")
        .await;
    let a = all.next_publish(T).await;
    let b = all.next_publish(T).await;
    assert_eq!(
        (a.topic.as_str(), &a.payload[..]),
        ("channels/300/subscribe/fields/field1", &b"1.5"[..])
    );
    assert_eq!(
        (b.topic.as_str(), &b.payload[..]),
        ("channels/300/subscribe/fields/field4", &b"hello"[..])
    );
    // field1 of channel 200 did not reach the field2 subscriber.
    one.expect_quiet(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn legacy_publish_with_the_write_key_needs_no_password() {
    let emu = emulator().await;
    let mut o = options(&emu, Tr::Tcp, "anything");
    o.set_credentials("any-user", "");
    let conn = connect(o).await;
    conn.publish("channels/200/publish/fields/field5/WKEY200", "42")
        .await;
    let e = emu.wait_for_entries(ch(200), 1, T).await.unwrap();
    assert_eq!(e[0].field(5), Some("42"));
}

#[tokio::test]
async fn a_wrong_write_key_closes_the_connection() {
    let emu = emulator().await;
    let mut conn = connect(options(&emu, Tr::Tcp, "x")).await;
    conn.publish("channels/200/publish/WKEY100", "field1=1")
        .await;
    conn.expect_closed(T).await;
    emu.wait_for_counters(T, |c| c.closed_invalid == 1)
        .await
        .unwrap();
    assert!(emu.entries(ch(200)).is_empty());
}

#[tokio::test]
async fn publishing_to_a_channel_the_device_does_not_cover_closes() {
    let emu = emulator().await;
    let mut conn = connect(device(&emu, Tr::Ws, DEV1)).await;
    conn.publish("channels/300/publish", "field1=1").await;
    conn.expect_closed(T).await;
    emu.wait_for_counters(T, |c| c.closed_invalid == 1)
        .await
        .unwrap();
}

#[tokio::test]
async fn field_9_field_0_and_unknown_parameters_close() {
    let emu = emulator().await;
    for (topic, payload) in [
        ("channels/100/publish", "field9=1"),
        ("channels/100/publish/fields/field9", "1"),
        ("channels/100/publish/fields/field0", "1"),
        ("channels/100/publish", "field1=1&colour=red"),
    ] {
        let mut conn = connect(device(&emu, Tr::Tcp, DEV1)).await;
        conn.publish(topic, payload).await;
        conn.expect_closed(T).await;
    }
    emu.wait_for_counters(T, |c| c.closed_invalid == 4)
        .await
        .unwrap();
    assert!(emu.entries(ch(100)).is_empty());
}

#[tokio::test]
async fn qos_1_and_retain_close() {
    let emu = emulator().await;
    let mut conn = connect(device(&emu, Tr::Tls, DEV1)).await;
    conn.client
        .publish("channels/100/publish", QoS::AtLeastOnce, false, "field1=1")
        .await
        .unwrap();
    conn.expect_closed(T).await;
    let mut conn = connect(device(&emu, Tr::Tls, DEV1)).await;
    conn.client
        .publish("channels/100/publish", QoS::AtMostOnce, true, "field1=1")
        .await
        .unwrap();
    conn.expect_closed(T).await;
    emu.wait_for_counters(T, |c| c.closed_invalid == 2)
        .await
        .unwrap();
    assert!(emu.entries(ch(100)).is_empty());
}

#[tokio::test]
async fn a_silent_client_does_not_stall_the_tls_listener() {
    let emu = emulator().await;
    // Opens TCP to the TLS port and never says a word.
    let _silent = tokio::net::TcpStream::connect(emu.tls_addr().unwrap())
        .await
        .unwrap();
    let _silent_ws = tokio::net::TcpStream::connect(emu.wss_addr().unwrap())
        .await
        .unwrap();
    let conn = connect(device(&emu, Tr::Tls, DEV1)).await;
    conn.publish("channels/100/publish", "field1=1").await;
    emu.wait_for_entries(ch(100), 1, T).await.unwrap();
    // The handshake timeout (2 s in these tests) ends the silent ones.
    emu.wait_for_counters(T, |c| c.handshake_failures == 2)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_second_connection_with_the_same_client_id_takes_over() {
    let emu = emulator().await;
    let mut first = connect(device(&emu, Tr::Tcp, DEV1)).await;
    let second = connect(device(&emu, Tr::Tls, DEV1)).await;
    first.expect_closed(T).await;
    emu.wait_for_counters(T, |c| c.closed_taken_over == 1)
        .await
        .unwrap();
    second.publish("channels/100/publish", "field1=1").await;
    emu.wait_for_entries(ch(100), 1, T).await.unwrap();
}

#[tokio::test]
async fn websocket_needs_the_mqtt_path_and_answers_the_mqtt_subprotocol() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = emulator().await;
    assert_eq!(
        emu.ws_url().unwrap(),
        format!("ws://{}/mqtt", emu.ws_addr().unwrap())
    );
    let upgrade = |path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: mqtt\r\n\r\n"
        )
    };
    for (path, expect) in [("/other", "404"), ("/mqtt", "101")] {
        let mut s = tokio::net::TcpStream::connect(emu.ws_addr().unwrap())
            .await
            .unwrap();
        s.write_all(upgrade(path).as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(T, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
        assert!(
            head.starts_with(&format!("http/1.1 {expect}")),
            "{path}: {head}"
        );
        if expect == "101" {
            assert!(head.contains("sec-websocket-protocol: mqtt"), "{head}");
        }
    }
}

#[tokio::test]
async fn a_client_that_never_sends_connect_is_closed_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let emu = emulator().await;
    let mut s = tokio::net::TcpStream::connect(emu.tcp_addr().unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 8];
    // Handshake timeout is 2 s in these tests; the server closes without a byte.
    let n = tokio::time::timeout(T, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    let c = emu.counters();
    assert_eq!((c.handshake_failures, c.refusals, c.sessions), (1, 0, 0));
}

#[tokio::test]
async fn legacy_account_key_login_and_public_channel_subscription() {
    let emu = start(
        base()
            .mqtt_api_key("ACCOUNTKEY")
            .channel(ChannelSpec::new(ch(500), "WKEY500", "unused").public()),
    )
    .await;
    let mut o = options(&emu, Tr::Tcp, "any-unique-name");
    o.set_credentials("whoever", "ACCOUNTKEY");
    let mut sub = connect(o).await;
    // Public channel: no read key needed. Private channel 200 without its key: refused.
    sub.subscribe("channels/500/subscribe/json").await;
    sub.subscribe("channels/200/subscribe/json").await;
    emu.wait_for_counters(T, |c| c.subscriptions == 1 && c.subscriptions_refused == 1)
        .await
        .unwrap();
    let mut u = thingspeak::ChannelUpdate::new();
    u.set("field1".parse().unwrap(), "9");
    emu.write(ch(500), &u).unwrap();
    emu.write(ch(200), &u).unwrap();
    let p = sub.next_publish(T).await;
    assert_eq!(p.topic, "channels/500/subscribe/json");
    sub.expect_quiet(Duration::from_millis(200)).await;
}

/// Sends raw bytes as the first packet and returns what the emulator answers
/// before closing (empty if it closes without a word).
async fn raw_first_packet(emu: &thingspeak_emulator::EmulatorHandle, packet: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(emu.tcp_addr().unwrap())
        .await
        .unwrap();
    s.write_all(packet).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut answer))
        .await
        .expect("emulator kept the connection open")
        .ok();
    answer
}

#[tokio::test]
async fn will_flags_and_foreign_protocol_levels_get_connack_5() {
    let emu = emulator().await;
    // CONNECT "MQTT" level 4, flags: clean session + Will retain without the Will flag.
    let will_retain = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x22, 0, 60, 0, 0];
    assert_eq!(raw_first_packet(&emu, &will_retain).await, [0x20, 2, 0, 5]);
    // A mosquitto bridge's private protocol level 0x84.
    let bridge = [
        0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 0x84, 0x02, 0, 60, 0, 0,
    ];
    assert_eq!(raw_first_packet(&emu, &bridge).await, [0x20, 2, 0, 5]);
    // Not starting with CONNECT: closed without an answer.
    assert!(raw_first_packet(&emu, &[0xC0, 0]).await.is_empty());
    let c = emu.counters();
    assert_eq!((c.refusals, c.closed_invalid, c.sessions), (2, 1, 0));
}

#[tokio::test]
async fn concurrent_publishers_get_unique_ids_and_subscribers_see_every_entry_in_order() {
    let emu = emulator().await;
    let mut sub = connect(device(&emu, Tr::Tcp, DEV1)).await;
    sub.subscribe("channels/200/subscribe/json/RKEY200").await;
    emu.wait_for_counters(T, |c| c.subscriptions == 1)
        .await
        .unwrap();
    let mut publishers = Vec::new();
    for i in 0..8 {
        let tr = ALL[i % 4];
        publishers.push(tokio::spawn({
            let opts = options(&emu, tr, &format!("p{i}"));
            async move {
                let conn = connect(opts).await;
                for j in 0..3 {
                    conn.publish(
                        "channels/200/publish/WKEY200",
                        &format!("field1={i}&field2={j}"),
                    )
                    .await;
                }
                // Keep the connection until the emulator has everything.
                conn
            }
        }));
    }
    let mut conns = Vec::new();
    for p in publishers {
        conns.push(p.await.unwrap());
    }
    let entries = emu.wait_for_entries(ch(200), 24, T).await.unwrap();
    let ids: Vec<u64> = entries.iter().map(|e| e.entry_id()).collect();
    assert_eq!(ids, (1..=24).collect::<Vec<_>>());
    for want in 1..=24u64 {
        let p = sub.next_publish(T).await;
        let j: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(j["entry_id"].as_u64(), Some(want));
    }
}

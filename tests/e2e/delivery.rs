//! Readings of every kind reach ThingSpeak with the right fields, within its rate limit.

use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_plain_and_drop_in_messages_arrive_as_entries() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_toml(&emulator, dir.path(), 1.0, ""));
    let gateway = Gateway::start(&config);
    let dev = device(gateway.mqtt, "esp-1").await;

    publish(&dev, "sensors/kitchen/json", r#"{"t": 21.5, "h": 40}"#).await;
    publish(&dev, "sensors/kitchen/plain", "7.25").await;
    publish(
        &dev,
        "channels/1002/publish",
        "field1=3&field2=4&status=hello",
    )
    .await;
    publish(
        &dev,
        "channels/1003/publish/fields/field5/WRITEKEY00001003",
        "55",
    )
    .await;

    wait_for_delivery(&emulator, "all four messages", |got| {
        let has = |ch: u64, t: &str, v: &str| {
            got.get(&(ch, t.to_string()))
                .is_some_and(|vals| vals.iter().any(|x| x == v))
        };
        has(1001, "field1", "21.5")
            && has(1001, "field2", "40")
            && has(1001, "field3", "7.25")
            && has(1002, "field1", "3")
            && has(1002, "field2", "4")
            && has(1002, "status", "hello")
            && has(1003, "field5", "55")
    })
    .await;
    assert_eq!(emulator.counters().dropped_rate_limit, 0);
    assert_eq!(emulator.counters().closed_invalid, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_device_never_trips_the_rate_limit() {
    // 10 messages a second for 5 s on two channels, a 1 s interval upstream: the
    // gateway must merge them, never send faster than the emulator accepts.
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_toml(&emulator, dir.path(), 1.0, ""));
    let gateway = Gateway::start(&config);
    let dev = device(gateway.mqtt, "fast").await;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for i in 0..50 {
        tick.tick().await;
        publish(&dev, "sensors/a/plain", i.to_string()).await;
        publish(&dev, "channels/1002/publish", format!("field1={i}")).await;
    }
    // The last values must arrive; nothing may be dropped by the rate limit.
    wait_for_delivery(&emulator, "the last values", |got| {
        got.get(&(1001, "field3".into()))
            .is_some_and(|v| v.last().map(String::as_str) == Some("49"))
            && got
                .get(&(1002, "field1".into()))
                .is_some_and(|v| v.last().map(String::as_str) == Some("49"))
    })
    .await;
    let counters = emulator.counters();
    assert_eq!(counters.dropped_rate_limit, 0, "{counters:?}");
    assert!(
        counters.accepted >= 8,
        "expected several updates, got {counters:?}"
    );
    // And the gateway's own view matches.
    let sent = gateway
        .metric(r#"tsgw_updates_sent_total{channel="1001"}"#)
        .await
        + gateway
            .metric(r#"tsgw_updates_sent_total{channel="1002"}"#)
            .await;
    assert_eq!(
        sent as u64, counters.accepted,
        "gateway counted {sent} sent"
    );
}

/// The kit's load clients, as the high-volume tests will use them: lines
/// from `mosquitto_pub -l` (QoS 0) and an acked device's ids (QoS 1) are all
/// taken in, and every PUBACK is accounted to its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_lines_and_acked_device_ids_are_counted_exactly() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_toml(&emulator, dir.path(), 1.0, ""));
    let gateway = Gateway::start(&config);
    const ACCEPTED: &str =
        r#"tsgw_readings_total{device="drop_in",result="accepted",source="mqtt"}"#;

    let lines: String = (1..=200).map(|i| format!("{i}\n")).collect();
    tsgw_testkit::mosquitto_pub_lines(
        gateway.mqtt,
        "lines",
        "channels/1002/publish/fields/field1",
        0,
        lines.as_bytes(),
        WAIT,
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));

    let mut acked = tsgw_testkit::AckedDevice::connect(gateway.mqtt, "acked")
        .await
        .unwrap();
    for id in 1..=50u64 {
        acked
            .publish("channels/1003/publish/fields/field2", id, id.to_string())
            .await
            .unwrap();
    }
    for _ in 1..=50 {
        acked.next_ack(WAIT).await.unwrap();
    }
    assert_eq!(
        acked.acked().iter().copied().collect::<Vec<_>>(),
        (1..=50).collect::<Vec<_>>()
    );

    let deadline = tokio::time::Instant::now() + WAIT;
    while gateway.metric(ACCEPTED).await < 250.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "accepted {} of 250",
            gateway.metric(ACCEPTED).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for_delivery(&emulator, "the last line and the last acked value", |got| {
        got.get(&(1002, "field1".into()))
            .is_some_and(|v| v.last().map(String::as_str) == Some("200"))
            && got
                .get(&(1003, "field2".into()))
                .is_some_and(|v| v.last().map(String::as_str) == Some("50"))
    })
    .await;
    assert_eq!(gateway.metric(ACCEPTED).await, 250.0);
}

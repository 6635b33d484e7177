//! Metrics, health, systemd notification and config reload, as operators see them.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_sent_and_readiness_follows_upstream() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_toml(&emulator, dir.path(), 1.0, ""));
    let gateway = Gateway::start(&config);
    let dev = device(gateway.mqtt, "metered").await;

    for i in 0..5 {
        publish(&dev, "sensors/x/json", format!(r#"{{"t": {i}, "h": 50}}"#)).await;
    }
    publish(&dev, "sensors/x/json", "not json").await;
    publish(&dev, "nobody/maps/this", "1").await;
    wait_for_delivery(&emulator, "t=4", |got| {
        got.get(&(1001, "field1".into()))
            .is_some_and(|v| v.contains(&"4".to_string()))
    })
    .await;

    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, text) = gateway.get("/metrics").await;
        assert_eq!(status, 200);
        let v = |k: &str| metric_value(&text, k).unwrap_or(0.0);
        let accepted =
            v(r#"tsgw_readings_total{device="json-sensor",result="accepted",source="mqtt"}"#);
        let bad_json =
            v(r#"tsgw_parse_errors_total{device="json-sensor",reason="bad_json",source="mqtt"}"#);
        let unmapped = v(
            r#"tsgw_parse_errors_total{device="unmapped",reason="unmapped_topic",source="mqtt"}"#,
        );
        let sent = v(r#"tsgw_updates_sent_total{channel="1001"}"#);
        if accepted == 10.0
            && bad_json == 1.0
            && unmapped == 1.0
            && sent as u64 == emulator.counters().accepted
            // Readings leave the queue only once the update's echo confirmed
            // it, a moment after the emulator counted it: wait for that too.
            && v("tsgw_queue_readings") == 0.0
        {
            assert!(text.contains("tsgw_build_info{version="));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "metrics never matched:\n{text}\n{:?}",
            emulator.counters()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let (status, body) = gateway.get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = gateway.get("/healthz").await;
    assert_eq!(status, 200);

    // Upstream goes away: after the 2 s grace, not ready; still alive.
    emulator.refuse_connections_for(Duration::from_secs(3600));
    emulator.drop_all_connections();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, body) = gateway.get("/readyz").await;
        if status == 503 {
            assert!(body.contains("upstream"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never became unready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gateway.get("/healthz").await.0, 200);

    emulator.clear_faults();
    let deadline = tokio::time::Instant::now() + WAIT;
    while gateway.get("/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_gets_ready_and_watchdog_pings() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &config_toml(&emulator, dir.path(), 1.0, ""));
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let gateway = Gateway::start_with_env(
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + WAIT;
    let mut buf = [0u8; 512];
    while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1")) {
        assert!(std::time::Instant::now() < deadline, "got only: {seen:?}");
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    }
    let status = gateway.stop();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_good_config_and_keeps_the_old_one_on_a_bad_one() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let base = config_toml(&emulator, dir.path(), 1.0, "");
    let config = write_config(dir.path(), &base);
    let mut gateway = Gateway::start(&config);
    let dev = device(gateway.mqtt, "reloaded").await;

    // A new rule arrives by SIGHUP.
    let with_rule = format!(
        "{base}\n[[mqtt.rules]]\nname = \"new-rule\"\ntopic = \"new/topic\"\nchannel = 1003\nparser = {{ format = \"plain\", target = \"field8\" }}\n"
    );
    std::fs::write(&config, with_rule).unwrap();
    gateway.signal("HUP");
    gateway.wait_for_log("config reloaded");
    publish(&dev, "new/topic", "88").await;
    wait_for_delivery(&emulator, "the new rule's value", |got| {
        got.get(&(1003, "field8".into()))
            .is_some_and(|v| v.contains(&"88".to_string()))
    })
    .await;

    // A broken config is rejected; the running one (with the new rule) stays.
    std::fs::write(&config, "[upstream\nbroken").unwrap();
    gateway.signal("HUP");
    gateway.wait_for_log("new config rejected; the running config stays in force");
    publish(&dev, "new/topic", "89").await;
    wait_for_delivery(&emulator, "the rule after a rejected reload", |got| {
        got.get(&(1003, "field8".into()))
            .is_some_and(|v| v.contains(&"89".to_string()))
    })
    .await;
    assert_eq!(
        gateway
            .metric(r#"tsgw_config_reloads_total{result="applied"}"#)
            .await,
        1.0
    );
    assert_eq!(
        gateway
            .metric(r#"tsgw_config_reloads_total{result="rejected"}"#)
            .await,
        1.0
    );
    let status = gateway.stop();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_mqtt_port_fails_startup_clearly() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut on_taken_port = config(&emulator, dir.path(), 1.0, "");
    on_taken_port.mqtt_listen = taken.local_addr().unwrap().to_string();
    let config = write_config(dir.path(), &on_taken_port.to_toml());
    let out = std::process::Command::new(tsgw())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mqtt.listen"), "{stderr}");
}

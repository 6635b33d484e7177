//! ThingSpeak's REST writes, the inspection API and fault injection.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{ConnectReturnCode, ConnectionError};
use thingspeak_emulator::{ChannelSpec, RefuseMode, WriteOrigin};

fn bulk_body(key: &str, n: usize, start_sec: usize) -> String {
    let updates: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"created_at":"2025-06-01T00:{:02}:{:02}Z","field1":{i}}}"#,
                (start_sec + i) / 60 % 60,
                (start_sec + i) % 60
            )
        })
        .collect();
    format!(
        r#"{{"write_api_key":"{key}","updates":[{}]}}"#,
        updates.join(",")
    )
}

#[tokio::test]
async fn bulk_update_202_then_429_and_413_and_401() {
    let emu = start(base().bulk_interval(Duration::from_secs(3600))).await;
    let path = "/channels/200/bulk_update.json";
    let json = Some("application/json");
    let (status, body) = http(&emu, "POST", path, json, &bulk_body("WKEY200", 3, 0)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(emu.entries(ch(200)).len(), 3);
    assert!(emu
        .entries(ch(200))
        .iter()
        .all(|e| e.origin == WriteOrigin::Bulk));

    let (status, _) = http(&emu, "POST", path, json, &bulk_body("WKEY200", 1, 10)).await;
    assert_eq!(status, 429);

    let (status, _) = http(&emu, "POST", path, json, &bulk_body("WKEY200", 961, 100)).await;
    assert_eq!(status, 413);
    let (status, _) = http(&emu, "POST", path, json, &bulk_body("WKEY100", 1, 20)).await;
    assert_eq!(status, 401);
    let (status, _) = http(&emu, "POST", path, json, "{not json").await;
    assert_eq!(status, 400);
    let (status, _) = http(&emu, "POST", "/channels/999/bulk_update.json", json, "{}").await;
    assert_eq!(status, 404);

    // Another channel has its own bulk budget. delta_t counts from the previous
    // update; an update repeating a created_at is skipped and counted.
    let body = r#"{"write_api_key":"WKEY300","updates":[
        {"created_at":"2025-06-01T00:00:00Z","field1":"a"},
        {"created_at":"2025-06-01T00:00:00Z","field1":"dup"},
        {"delta_t":5,"field2":"b"}]}"#;
    let (status, _) = http(&emu, "POST", "/channels/300/bulk_update.json", json, body).await;
    assert_eq!(status, 202);
    let e = emu.entries(ch(300));
    assert_eq!(e.len(), 2);
    assert_eq!(e[0].field(1), Some("a"));
    assert_eq!(
        thingspeak::format_timestamp(&e[1].created_at()),
        "2025-06-01T00:00:05Z"
    );
    let c = emu.counters();
    assert_eq!((c.bulk_calls, c.bulk_rejected, c.bulk_entries), (7, 5, 5));
    assert_eq!(c.rejected_duplicate_timestamp, 1);
}

#[tokio::test]
async fn bulk_entries_are_not_relayed_but_update_json_entries_are() {
    let emu = emulator().await;
    let mut sub = connect(device(&emu, Tr::Tcp, DEV1)).await;
    sub.subscribe("channels/100/subscribe").await;
    emu.wait_for_counters(T, |c| c.subscriptions == 1)
        .await
        .unwrap();

    let (status, _) = http(
        &emu,
        "POST",
        "/channels/100/bulk_update.json",
        Some("application/json"),
        &bulk_body("WKEY100", 2, 0),
    )
    .await;
    assert_eq!(status, 202);
    sub.expect_quiet(Duration::from_millis(300)).await;

    let (status, body) = http(
        &emu,
        "POST",
        "/update.json",
        Some("application/x-www-form-urlencoded"),
        "api_key=WKEY100&field1=99",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let p = sub.next_publish(T).await;
    let j: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(
        (j["entry_id"].as_u64(), j["field1"].as_str()),
        (Some(3), Some("99"))
    );
}

#[tokio::test]
async fn update_json_answers_the_entry_or_0_and_shares_the_rate_limit_with_mqtt() {
    let emu = start(base().default_interval(Duration::from_secs(3600))).await;
    let form = Some("application/x-www-form-urlencoded");
    let (status, body) = http(
        &emu,
        "POST",
        "/update.json",
        form,
        "api_key=WKEY200&field1=5&status=hi",
    )
    .await;
    assert_eq!(status, 200);
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (j["entry_id"].as_u64(), j["field1"].as_str()),
        (Some(1), Some("5"))
    );
    assert_eq!(j["status"], "hi");

    // Same channel within the interval: rejected with body 0, also for MQTT.
    let (status, body) = http(
        &emu,
        "POST",
        "/update.json",
        form,
        "api_key=WKEY200&field1=6",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "0"));
    let conn = connect(options(&emu, Tr::Tcp, "legacy")).await;
    conn.publish("channels/200/publish/WKEY200", "field1=7")
        .await;
    emu.wait_for_counters(T, |c| c.dropped_rate_limit == 2)
        .await
        .unwrap();

    // JSON body on another channel; `/update` answers the bare entry id.
    let (status, body) = http(
        &emu,
        "POST",
        "/update",
        Some("application/json"),
        r#"{"api_key":"WKEY300","field8":1.25,"created_at":"2026-01-01T00:00:00Z"}"#,
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "1"));
    assert_eq!(emu.entries(ch(300))[0].field(8), Some("1.25"));

    let (status, body) = http(&emu, "GET", "/update.json?api_key=NOPE&field1=1", None, "").await;
    assert_eq!((status, body.as_str()), (401, "0"));
    let (status, body) = http(
        &emu,
        "POST",
        "/update.json",
        form,
        "api_key=WKEY100&field9=1",
    )
    .await;
    assert_eq!((status, body.as_str()), (400, "0"));
    let c = emu.counters();
    assert_eq!((c.update_calls, c.update_rejected), (5, 3));
}

#[tokio::test]
async fn inspection_api_lists_entries_and_counters() {
    let emu = emulator().await;
    let (status, _) = http(&emu, "GET", "/update?api_key=WKEY100&field1=3", None, "").await;
    assert_eq!(status, 200);
    let (status, body) = http(&emu, "GET", "/api/channels/100/entries", None, "").await;
    assert_eq!(status, 200);
    let entries: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(entries[0]["field1"], "3");
    assert_eq!(entries[0]["origin"], "update_api");
    let (_, body) = http(&emu, "GET", "/api/counters", None, "").await;
    let counters: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(counters["accepted"], 1);
    let (_, body) = http(&emu, "GET", "/api/channels", None, "").await;
    let channels: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(channels.as_array().unwrap().len(), 3);
    let (status, _) = http(&emu, "GET", "/api/channels/7/entries", None, "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn refused_connections_get_connack_3_or_a_close_then_recover() {
    let emu = emulator().await;
    emu.refuse_connections_for(Duration::from_secs(60));
    match open(device(&emu, Tr::Tcp, DEV1)).await {
        Err(ConnectionError::ConnectionRefused(c)) => {
            assert_eq!(c, ConnectReturnCode::ServiceUnavailable)
        }
        other => panic!("expected CONNACK 3, got {:?}", other.err()),
    }
    emu.clear_faults();
    connect(device(&emu, Tr::Tcp, DEV1)).await;

    // The same through the HTTP API, closing instead of answering.
    let (status, _) = http(
        &emu,
        "POST",
        "/api/faults/refuse-connections",
        Some("application/json"),
        r#"{"seconds": 30, "mode": "close"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(emu.fault_status().refuse_mode, Some(RefuseMode::Close));
    assert!(open(device(&emu, Tr::Ws, DEV1)).await.is_err());
    let (status, _) = http(&emu, "DELETE", "/api/faults", None, "").await;
    assert_eq!(status, 200);
    connect(device(&emu, Tr::Ws, DEV1)).await;
    assert_eq!(emu.counters().refusals, 2);
}

#[tokio::test]
async fn drop_all_connections_closes_every_session() {
    let emu = emulator().await;
    let mut a = connect(device(&emu, Tr::Tcp, DEV1)).await;
    let mut b = connect(device(&emu, Tr::Wss, DEV2)).await;
    emu.drop_all_connections();
    a.expect_closed(T).await;
    b.expect_closed(T).await;
    emu.wait_for_counters(T, |c| c.closed_by_fault == 2)
        .await
        .unwrap();
    // New connections are unaffected; the HTTP endpoint works the same.
    let mut c = connect(device(&emu, Tr::Tcp, DEV1)).await;
    let (status, _) = http(&emu, "POST", "/api/faults/drop-connections", None, "").await;
    assert_eq!(status, 204);
    c.expect_closed(T).await;
}

#[tokio::test]
async fn the_next_n_publishes_can_be_lost_silently() {
    let emu = emulator().await;
    emu.drop_next_publishes(2);
    let mut conn = connect(device(&emu, Tr::Tcp, DEV1)).await;
    for v in 1..=3 {
        conn.publish("channels/100/publish", &format!("field1={v}"))
            .await;
    }
    let e = emu.wait_for_entries(ch(100), 1, T).await.unwrap();
    assert_eq!(e[0].field(1), Some("3"));
    assert_eq!(emu.counters().dropped_fault, 2);
    conn.expect_quiet(Duration::from_millis(100)).await;

    // Probability 1 via HTTP drops everything, until cleared.
    let (status, _) = http(
        &emu,
        "POST",
        "/api/faults/drop-publishes",
        Some("application/json"),
        r#"{"probability": 1.0}"#,
    )
    .await;
    assert_eq!(status, 200);
    conn.publish("channels/100/publish", "field1=4").await;
    emu.wait_for_counters(T, |c| c.dropped_fault == 3)
        .await
        .unwrap();
    emu.clear_faults();
    conn.publish("channels/100/publish", "field1=5").await;
    let e = emu.wait_for_entries(ch(100), 2, T).await.unwrap();
    assert_eq!(e[1].field(1), Some("5"));
}

#[tokio::test]
async fn rest_works_over_https_with_the_generated_ca() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let emu = start(base().https("127.0.0.1:0")).await;
    let addr = emu.https_addr().unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(&emu));
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        let body = "api_key=WKEY100&field1=12";
        let req = format!(
            "POST /update HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        // A peer closing TLS without close_notify is fine here: the response is complete.
        let _ = tls.read_to_end(&mut resp).await;
        String::from_utf8(resp).unwrap()
    };
    let resp = tokio::time::timeout(T, exchange).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("\r\n\r\n1"), "{resp}");
    assert_eq!(emu.entries(ch(100))[0].field(1), Some("12"));
}

#[tokio::test]
async fn feeds_json_and_last_json_answer_in_thingspeak_shape_with_the_read_key() {
    let emu = start(base().channel(ChannelSpec::new(ch(400), "WKEY400", "unused").public())).await;
    let mut stored = emu.stored();
    let form = Some("application/x-www-form-urlencoded");
    for (i, at) in [
        "2026-01-01T00:00:00Z",
        "2026-01-01T00:00:10Z",
        "2026-01-01T00:00:20Z",
    ]
    .iter()
    .enumerate()
    {
        let body = format!("api_key=WKEY100&field1={i}&status=s{i}&created_at={at}");
        let (status, _) = http(&emu, "POST", "/update.json", form, &body).await;
        assert_eq!(status, 200);
        // The hook sees every stored entry, as it is stored.
        let e = tokio::time::timeout(T, stored.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.field(1), Some(i.to_string().as_str()));
    }

    // A private channel needs its read key: without it, `-1`.
    let (status, body) = http(&emu, "GET", "/channels/100/feeds.json", None, "").await;
    assert_eq!((status, body.as_str()), (400, "-1"));
    let (_, body) = http(
        &emu,
        "GET",
        "/channels/100/feeds/last.json?api_key=WRONG",
        None,
        "",
    )
    .await;
    assert_eq!(body, "-1");

    // start/end (inclusive, ThingSpeak's `YYYY-MM-DD HH:NN:SS`) select entries.
    let path = "/channels/100/feeds.json?api_key=RKEY100&start=2026-01-01%2000:00:10&end=2026-01-01%2000:00:20";
    let (status, body) = http(&emu, "GET", path, None, "").await;
    assert_eq!(status, 200, "{body}");
    let feeds: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(feeds["channel"]["id"], 100);
    assert_eq!(feeds["channel"]["last_entry_id"], 3);
    let got: Vec<(&str, u64, &str)> = feeds["feeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["created_at"].as_str().unwrap(),
                e["entry_id"].as_u64().unwrap(),
                e["field1"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("2026-01-01T00:00:10Z", 2, "1"),
            ("2026-01-01T00:00:20Z", 3, "2")
        ]
    );
    assert!(
        feeds["feeds"][0].get("status").is_none(),
        "status only when asked"
    );
    assert!(feeds["feeds"][0]["field2"].is_null());

    // The forwarder's own query, parsed by the shared types.
    let t = thingspeak::parse_timestamp("2026-01-01T00:00:00Z").unwrap();
    let path = thingspeak::read::feeds_path(ch(100), &t, &t, Some("RKEY100"));
    let (_, body) = http(&emu, "GET", &path, None, "").await;
    let answer = thingspeak::read::parse_answer::<thingspeak::Feeds>(body.as_bytes()).unwrap();
    let thingspeak::ReadAnswer::Found(feeds) = answer else {
        panic!("readable with the key: {body}");
    };
    assert_eq!(feeds.feeds.len(), 1);
    assert_eq!(feeds.feeds[0].field1.as_deref(), Some("0"));

    // results keeps the newest; last.json is the newest entry, status on request.
    let (_, body) = http(
        &emu,
        "GET",
        "/channels/100/feeds.json?api_key=RKEY100&results=1",
        None,
        "",
    )
    .await;
    let feeds: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(feeds["feeds"].as_array().unwrap().len(), 1);
    assert_eq!(feeds["feeds"][0]["entry_id"], 3);
    let (status, body) = http(
        &emu,
        "GET",
        "/channels/100/feeds/last.json?api_key=RKEY100&status=true",
        None,
        "",
    )
    .await;
    assert_eq!(status, 200);
    let last: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (last["entry_id"].as_u64(), last["status"].as_str()),
        (Some(3), Some("s2"))
    );

    // A public channel reads without a key; no entry yet: `-1`.
    let (status, body) = http(&emu, "GET", "/channels/400/feeds/last.json", None, "").await;
    assert_eq!((status, body.as_str()), (200, "-1"));
    let (status, body) = http(&emu, "GET", "/channels/400/feeds.json", None, "").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["feeds"],
        serde_json::json!([])
    );
    // Unknown channel, and a bad parameter named in the answer.
    let (status, body) = http(&emu, "GET", "/channels/999/feeds.json", None, "").await;
    assert_eq!((status, body.as_str()), (404, "-1"));
    let (status, body) = http(
        &emu,
        "GET",
        "/channels/100/feeds.json?api_key=RKEY100&start=soon",
        None,
        "",
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.contains("start"), "{body}");

    let c = emu.counters();
    assert_eq!((c.feed_reads, c.feed_reads_refused), (10, 2));
}

/// A REST writer ("another writer": the web UI, a script) reaches MQTT
/// subscribers of every subscribe form, with and without a read key, in
/// ThingSpeak's payload formats: the entry JSON on feed topics, the bare
/// value on field topics (fields the entry does not set send nothing).
#[tokio::test]
async fn update_api_entries_reach_every_subscribe_form() {
    let emu = emulator().await;
    let mut feed = connect(device(&emu, Tr::Tcp, DEV1)).await;
    feed.subscribe("channels/100/subscribe").await;
    // Legacy sessions (any client id) with the channel's read key.
    let mut field = connect(options(&emu, Tr::Tcp, "legacy-field")).await;
    field
        .subscribe("channels/100/subscribe/fields/field2/RKEY100")
        .await;
    let mut json = connect(options(&emu, Tr::Tcp, "legacy-json")).await;
    json.subscribe("channels/100/subscribe/json/RKEY100").await;
    emu.wait_for_counters(T, |c| c.subscriptions == 3)
        .await
        .unwrap();

    let (status, body) = http(
        &emu,
        "POST",
        "/update.json",
        Some("application/x-www-form-urlencoded"),
        "api_key=WKEY100&field1=7.5&field2=on&status=set",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let stored: serde_json::Value = serde_json::from_str(&body).unwrap();

    let p = feed.next_publish(T).await;
    assert_eq!(p.topic, "channels/100/subscribe");
    let j: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(
        j, stored,
        "the feed carries the entry as update.json answered it"
    );
    assert_eq!(
        (j["field1"].as_str(), j["status"].as_str()),
        (Some("7.5"), Some("set"))
    );

    let p = json.next_publish(T).await;
    assert_eq!(p.topic, "channels/100/subscribe/json/RKEY100");
    let j: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(j["entry_id"], stored["entry_id"]);

    let p = field.next_publish(T).await;
    assert_eq!(p.topic, "channels/100/subscribe/fields/field2/RKEY100");
    assert_eq!(&p.payload[..], b"on");

    // GET /update (a browser or curl) is relayed too; an entry without
    // field2 sends nothing on the field2 topic.
    let (status, _) = http(&emu, "GET", "/update?api_key=WKEY100&field1=8", None, "").await;
    assert_eq!(status, 200);
    let p = feed.next_publish(T).await;
    let j: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(j["field1"], "8");
    field.expect_quiet(Duration::from_millis(300)).await;
    // feed 2, json 2, field 1.
    assert_eq!(emu.counters().relayed, 5);
}

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

/// A simulated Modbus TCP PLC: holding registers that can be written and read.
#[derive(Clone, Default)]
struct Plc {
    holding: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u16, u16>>>,
    writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Plc {
    fn get(&self, address: u16) -> Option<u16> {
        self.holding.lock().unwrap().get(&address).copied()
    }

    fn writes(&self) -> usize {
        self.writes.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn serve(&self) -> SocketAddr {
        use tokio_modbus::server::tcp::{accept_tcp_connection, Server};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let plc = self.clone();
        tokio::spawn(async move {
            let on_connected = move |stream, peer| {
                let plc = plc.clone();
                async move { accept_tcp_connection(stream, peer, move |_| Ok(Some(plc.clone()))) }
            };
            let _ = Server::new(listener).serve(&on_connected, |_| {}).await;
        });
        addr
    }
}

impl tokio_modbus::server::Service for Plc {
    type Request = tokio_modbus::SlaveRequest<'static>;
    type Response = tokio_modbus::Response;
    type Exception = tokio_modbus::ExceptionCode;
    type Future = std::future::Ready<Result<Self::Response, Self::Exception>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        use tokio_modbus::{ExceptionCode, Request, Response};
        let mut holding = self.holding.lock().unwrap();
        let answer = match req.request {
            Request::ReadHoldingRegisters(a, n) => (a..a + n)
                .map(|r| holding.get(&r).copied())
                .collect::<Option<Vec<u16>>>()
                .map(Response::ReadHoldingRegisters)
                .ok_or(ExceptionCode::IllegalDataAddress),
            Request::WriteSingleRegister(a, w) if holding.contains_key(&a) => {
                holding.insert(a, w);
                self.writes
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok(Response::WriteSingleRegister(a, w))
            }
            _ => Err(ExceptionCode::IllegalFunction),
        };
        std::future::ready(answer)
    }
}

async fn wait_until(what: &str, gateway: &Gateway, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "{what}: {}", gateway.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A setpoint written to the cloud channel reaches the PLC's holding
/// register and is read back; an out-of-range one is refused and counted;
/// a restart does not apply the same entry again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setpoint_reaches_the_plc_and_a_restart_does_not_apply_it_again() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let plc = Plc::default();
    plc.holding.lock().unwrap().extend([(10, 180), (11, 7)]);
    let addr = plc.serve().await;
    let extra = format!(
        r#"
[[modbus]]
name = "boiler"
unit_id = 1
channel = 1003
poll_interval_ms = 500
timeout_ms = 500
transport.tcp.address = "{addr}"
points = [ {{ name = "state", kind = "holding", address = 11, type = "u16", target = "field1" }} ]

[[downlink]]
name = "boiler-setpoint"
channel = 1001
source = "field1"
min = 5
max = 30
min_interval_ms = 500
max_age_secs = 60
action.modbus = {{ device = "boiler", kind = "holding", address = 10, type = "i16", scale = 0.1 }}
"#
    );
    let config = config(&emulator, dir.path(), 1.0, &extra);
    let path = config.write(dir.path()).unwrap();
    let gateway = Gateway::start(&path);
    feed_subscribed(&gateway, 1001).await;

    // Out of range: refused, counted, logged, the register untouched.
    rest_update(&emulator, 1001, "field1=99").await;
    let refused = "tsgw_downlink_refused_total{reason=\"above_max\",rule=\"boiler-setpoint\"}";
    wait_until("99 refused", &gateway, async || {
        gateway.metric(refused).await == 1.0
    })
    .await;
    assert_eq!((plc.get(10), plc.writes()), (Some(180), 0));
    assert!(
        gateway
            .find_log("downlink refused: value 99 is above max = 30")
            .is_some(),
        "{}",
        gateway.log_tail()
    );

    // In range: written, read back, counted.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let setpoint = rest_update(&emulator, 1001, "field1=21.5").await;
    wait_until("21.5 reaches holding register 10", &gateway, async || {
        plc.get(10) == Some(215)
    })
    .await;
    let applied = "tsgw_downlink_applied_total{rule=\"boiler-setpoint\"}";
    wait_until("applied counted", &gateway, async || {
        gateway.metric(applied).await == 1.0
    })
    .await;
    assert!(gateway.find_log("downlink applied").is_some());
    assert_eq!(plc.writes(), 1);
    assert_eq!(
        gateway
            .metric("tsgw_downlink_received_total{rule=\"boiler-setpoint\"}")
            .await,
        2.0
    );

    // The status page shows the feed and the rule's outcomes.
    let (status, html) = gateway.get("/").await;
    assert_eq!(status, 200);
    for want in [
        "<td>1001</td><td class=\"state up\">subscribed</td>",
        "<td>boiler-setpoint</td><td class=\"num\">2</td><td class=\"num\">1</td>",
        "above_max: 1 in the last hour (1 in all)",
    ] {
        assert!(
            html.contains(want),
            "{want} not in the status page:\n{html}"
        );
    }
    gateway.stop();

    // The setpoint is the channel's newest entry, so subscribing after the
    // restart delivers it again: it was applied, and is not applied twice
    // (the register is reset to see any write).
    let state = std::fs::read_to_string(dir.path().join("downlink-state.json")).unwrap();
    assert!(
        state.contains(&format!("\"boiler-setpoint\": {setpoint}")),
        "{state}"
    );
    plc.holding.lock().unwrap().insert(10, 180);
    let gateway = Gateway::start(&path);
    feed_subscribed(&gateway, 1001).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        (plc.get(10), plc.writes()),
        (Some(180), 1),
        "not applied again"
    );
    for m in [
        applied,
        refused,
        "tsgw_downlink_received_total{rule=\"boiler-setpoint\"}",
    ] {
        assert_eq!(gateway.metric(m).await, 0.0, "{m}");
    }
    // A new entry after the restart is applied.
    rest_update(&emulator, 1001, "field1=22").await;
    wait_until("22 reaches the register", &gateway, async || {
        plc.get(10) == Some(220)
    })
    .await;
    assert_eq!(plc.writes(), 2);
    gateway.stop();
}

/// The other two actions: a serial command from a template (to a pty, as an
/// Arduino on USB), and a local MQTT publish from a template.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_and_local_mqtt_actions_follow_their_templates() {
    use tokio::io::AsyncReadExt;
    use tokio_serial::{SerialPort, SerialStream};
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut master, slave) = SerialStream::pair().expect("pty pair");
    let path = slave.name().expect("pty path");
    let extra = format!(
        r#"
[[serial]]
name = "arduino"
path = {path:?}
channel = 1002
exclusive = false
parser = {{ format = "key_value", fields = {{ t = "field1" }} }}

[[downlink]]
name = "fan-speed"
channel = 1002
source = "field3"
min = 0
max = 100
action.serial = {{ port = "arduino", template = "FAN {{value}} #{{entry_id}}\n" }}

[[downlink]]
name = "heater"
channel = 1002
source = "status"
action.mqtt = {{ topic = "home/heater/set", template = '{{"on": "{{value}}", "entry": {{entry_id}}}}' }}
"#
    );
    let config = config(&emulator, dir.path(), 1.0, &extra);
    let gateway = Gateway::start(&config.write(dir.path()).unwrap());
    let mut heater = Sub::start(gateway.mqtt, "heater", &["home/heater/set"]);
    feed_subscribed(&gateway, 1002).await;
    // The port opens asynchronously.
    wait_until("serial port open", &gateway, async || {
        gateway
            .metric("tsgw_device_up{device=\"arduino\",source=\"serial\"}")
            .await
            == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let id = rest_update(&emulator, 1002, "field3=40&status=off").await;
    let (topic, payload) = heater.next(WAIT).await.expect("heater command");
    assert_eq!(topic, "home/heater/set");
    assert_eq!(payload, format!(r#"{{"on": "off", "entry": {id}}}"#));
    let mut line = Vec::new();
    let mut buf = [0u8; 64];
    while !line.ends_with(b"\n") {
        let n = tokio::time::timeout(WAIT, master.read(&mut buf))
            .await
            .expect("serial command")
            .unwrap();
        line.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8(line).unwrap(), format!("FAN 40 #{id}\n"));
    for rule in ["fan-speed", "heater"] {
        let m = format!("tsgw_downlink_applied_total{{rule=\"{rule}\"}}");
        wait_until(&m, &gateway, async || gateway.metric(&m).await == 1.0).await;
    }
    gateway.stop();
    drop(slave);
}

/// Entries written while the upstream connection is down (an outage) reach
/// the local subscriber after it, in order: the newest from the new
/// subscription, those before it from the read API.
#[tokio::test]
async fn entries_written_during_an_outage_are_relayed_after_it() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = "\n[upstream.channels.\"1001\"]\nread_key = \"READKEY000001001\"\n";
    let config = config(&emulator, dir.path(), 1.0, extra);
    let gateway = Gateway::start(&config.write(dir.path()).unwrap());
    let mut sub = Sub::start(gateway.mqtt, "watcher", &["channels/1001/subscribe"]);
    feed_subscribed(&gateway, 1001).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    rest_update(&emulator, 1001, "field1=1").await;
    assert!(sub.next(WAIT).await.is_some());

    emulator.refuse_connections_for(Duration::from_secs(4));
    emulator.drop_all_connections();
    // The health endpoint says the feed is down while it is.
    wait_until("the feed shown down", &gateway, async || {
        let (_, health) = gateway.get("/readyz").await;
        health.contains(r#""channel":1001,"state":"connection_down""#)
    })
    .await;
    for n in 2..=4 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        rest_update(&emulator, 1001, &format!("field1={n}&status=s{n}")).await;
    }
    let entries = emulator.entries(channel(1001));
    for want in &entries[1..] {
        let (topic, payload) = sub.next(WAIT).await.unwrap_or_else(|| {
            panic!(
                "entry {} not relayed: {}",
                want.entry_id(),
                gateway.log_tail()
            )
        });
        assert_eq!(topic, "channels/1001/subscribe");
        // Byte for byte what ThingSpeak would have relayed.
        assert_eq!(payload, serde_json::to_string(&want.data).unwrap());
    }
    assert!(sub.next(Duration::from_millis(500)).await.is_none());
    assert!(
        emulator.counters().refusals > 0,
        "the outage did not happen"
    );
    for (metric, want) in [
        ("tsgw_feed_filled_entries_total{channel=\"1001\"}", 2.0),
        ("tsgw_feed_missed_entries_total{channel=\"1001\"}", 0.0),
        ("tsgw_feed_entries_total{channel=\"1001\"}", 4.0),
    ] {
        assert_eq!(gateway.metric(metric).await, want, "{metric}");
    }
    gateway.stop();
}

/// SIGHUP applies changed rules; an entry handled before the reload is not
/// acted on again by the new rules.
#[tokio::test]
async fn sighup_applies_changed_downlink_rules() {
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let rule = |max: u32| {
        format!(
            r#"
[[downlink]]
name = "limit"
channel = 1003
source = "field1"
max = {max}
action.mqtt = {{ topic = "plant/limit" }}
"#
        )
    };
    let mut config = config(&emulator, dir.path(), 1.0, &rule(30));
    let path = config.write(dir.path()).unwrap();
    let mut gateway = Gateway::start(&path);
    let mut plant = Sub::start(gateway.mqtt, "plant", &["plant/limit"]);
    feed_subscribed(&gateway, 1003).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    rest_update(&emulator, 1003, "field1=45").await;
    let refused = "tsgw_downlink_refused_total{reason=\"above_max\",rule=\"limit\"}";
    wait_until("45 refused", &gateway, async || {
        gateway.metric(refused).await == 1.0
    })
    .await;

    config.extra = config.extra.replace(&rule(30), &rule(50));
    config.write(dir.path()).unwrap();
    gateway.signal("HUP");
    gateway.wait_for_log("downlink rules reloaded");
    // The reloaded rule sees entry 45 again (the feed's newest) and leaves
    // it; the channel's rate limit (1 s) passes meanwhile.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(plant.next(Duration::from_millis(300)).await.is_none());
    rest_update(&emulator, 1003, "field1=46").await;
    let (topic, payload) = plant.next(WAIT).await.expect("46 published");
    assert_eq!((topic.as_str(), payload.as_str()), ("plant/limit", "46"));
    gateway.stop();
}

/// With credentials only for some channels (`[[upstream.connections]]`, no
/// top-level set), a subscription to another channel gets 0x80 at once,
/// counted and logged; a covered channel's feed works.
#[tokio::test]
async fn a_channel_without_credentials_is_refused() {
    use tsgw_testkit::{CLIENT_ID, PASSWORD, USERNAME};
    let emulator = emulator(Duration::from_secs(1)).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "\n[[upstream.connections]]\nclient_id = \"{CLIENT_ID}\"\nusername = \"{USERNAME}\"\n\
         password = \"{PASSWORD}\"\nchannels = [1001]\n"
    );
    let config = config(&emulator, dir.path(), 1.0, &extra);
    let path = config.write(dir.path()).unwrap();
    // No top-level credentials: only channel 1001 has any.
    let mut gateway = Gateway::start_with_env(&path, &[("TSGW_UPSTREAM__CLIENT_ID", "")]);
    let codes = suback(
        gateway.mqtt,
        "sketch",
        &[
            "channels/1002/subscribe/fields/field1",
            "channels/1001/subscribe",
        ],
    )
    .await;
    assert_eq!(
        codes,
        vec![
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtMostOnce)
        ]
    );
    let denied = gateway.metric_family("tsgw_mqtt_denied_total").await;
    assert!(
        denied.contains("reason=\"feed_no_credentials\"") && denied.ends_with(" 1"),
        "{denied}"
    );
    // Logged by the gateway a moment after the SUBACK: wait (bounded) for it.
    gateway.wait_for_log("ThingSpeak feed subscription refused: channel 1002: no upstream credentials cover it (list it in an [[upstream.connections]] entry, or set the top-level credentials)");
    feed_subscribed(&gateway, 1001).await;
    gateway.stop();
}

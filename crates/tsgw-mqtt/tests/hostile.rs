//! Hostile local input: floods of silent connections, thousands of connections
//! of every kind at once, absurd topics and payloads.
//! Each is counted, survived, and leaves well-behaved devices unaffected.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tsgw_core::{Metrics, Reading, Value};
use tsgw_mqtt::{BrokerTlsConfig, MqttSource, MqttSourceConfig};

mod common;

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
    let metrics = Metrics::new();
    let (source, rx) = common::start_source(cfg, metrics.clone(), CancellationToken::new())
        .await
        .unwrap();
    (source, rx, metrics)
}

/// Keeps trying to connect until CONNACK (slots may be full for a while).
async fn device(port: u16, id: &str) -> AsyncClient {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    patient_device(opts).await
}

/// `device` with any options (TLS, other hosts).
async fn patient_device(opts: MqttOptions) -> AsyncClient {
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

// ── Thousands of local connections ──────────────────────────────────────────

/// One flood at a time: each opens thousands of sockets, and two at once would
/// share the open-file budget and the two cores.
static FLOOD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// File descriptors kept free for the runtime, rumqttd and the test harness.
const FD_RESERVE: u64 = 256;

/// Raises this process's open-file soft limit to its hard limit; returns the new soft limit.
fn raise_nofile_limit() -> u64 {
    // SAFETY: plain libc calls on this process's own limits, with a valid struct.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        limit.rlim_cur
    }
}

/// The flood's size: `sockets` concurrent connections against `max_connections`
/// slots, scaled down together if the open-file limit cannot hold them. Every
/// socket costs this process one descriptor (the client end), every admitted
/// one three more (the front's end, its link to rumqttd, rumqttd's end).
fn flood_size(sockets: usize, max_connections: usize) -> (usize, usize) {
    let limit = raise_nofile_limit();
    let budget = limit.saturating_sub(FD_RESERVE) as usize;
    let need = sockets + 3 * max_connections;
    let (n, m) = if need <= budget {
        (sockets, max_connections)
    } else {
        (sockets * budget / need, max_connections * budget / need)
    };
    eprintln!(
        "flood: {n} sockets against max_connections = {m} \
         (wanted {sockets} against {max_connections}; open-file limit {limit})"
    );
    assert!(
        n >= 300 && m >= 100,
        "open-file limit {limit} too low for a meaningful flood"
    );
    (n, m)
}

/// What each flood socket does once connected (over TLS: after its handshake,
/// except `Silent`, which never starts one).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    /// Opens TCP and never sends a byte.
    Silent,
    /// Sends the first bytes of a CONNECT and stalls (slowloris).
    Partial,
    /// Sends a whole CONNECT (keep-alive 60 s) and then idles: a legitimate,
    /// connected client that keeps its slot.
    ConnectIdle,
    /// A real rumqttc client; publishes later if it got in.
    Client,
}

fn kind(i: usize) -> Kind {
    match i % 30 {
        2 => Kind::Client,
        n => match n % 3 {
            0 => Kind::Silent,
            1 => Kind::ConnectIdle,
            _ => Kind::Partial,
        },
    }
}

/// A raw MQTT 3.1.1 CONNECT: clean session, keep-alive 60 s, no credentials.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&u16::try_from(client_id.len()).unwrap().to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    // Ids here are short: the remaining length fits the one-byte form.
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap()];
    packet.extend(body);
    packet
}

const CONNACK_ACCEPTED: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

/// What the flood's sockets saw, counted client-side.
#[derive(Default, Debug)]
struct Tally {
    /// Silent and partial sockets the gateway closed (refused or shed).
    closed: AtomicUsize,
    /// CONNECTs (raw and rumqttc) answered with CONNACK.
    connacked: AtomicUsize,
    /// CONNECTs closed without a CONNACK (refused, or over TLS also shed by the
    /// handshake timeout).
    refused: AtomicUsize,
    /// Connected clients that lost their connection during the flood: must stay 0.
    dropped_after_connack: AtomicUsize,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Plays one raw flood socket until the gateway closes it or `release`.
/// TLS handshakes wait for `go`: the flood is opened over plain TCP first, so
/// that it is complete long before any timeout even in a debug build on two
/// busy cores (the handshakes of a thousand sockets take seconds there).
async fn play(
    kind: Kind,
    id: String,
    stream: TcpStream,
    tls: Option<TlsConnector>,
    tally: Arc<Tally>,
    go: CancellationToken,
    release: CancellationToken,
) {
    let mut io: Box<dyn Io> = match (&tls, kind) {
        (None, _) | (Some(_), Kind::Silent) => Box::new(stream),
        (Some(connector), _) => {
            go.cancelled().await;
            let name = ServerName::try_from("localhost").unwrap();
            match connector.connect(name, stream).await {
                Ok(s) => Box::new(s),
                // The gateway closed the socket: refused at accept, or
                // admitted and shed because the handshake did not finish in time.
                Err(_) if kind == Kind::ConnectIdle => {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => {
                    tally.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    };
    let mut buf = [0u8; 64];
    match kind {
        Kind::Silent | Kind::Partial => {
            if kind == Kind::Partial {
                // A write into a refused socket may fail; the read below sees the close.
                let _ = io.write_all(&connect_packet(&id)[..7]).await;
                let _ = io.flush().await;
            }
            tokio::select! {
                _ = release.cancelled() => {}
                _ = io.read(&mut buf) => { tally.closed.fetch_add(1, Ordering::Relaxed); }
            }
        }
        Kind::ConnectIdle => {
            let _ = io.write_all(&connect_packet(&id)).await;
            let _ = io.flush().await;
            let mut ack = [0u8; 4];
            let answer = tokio::select! {
                _ = release.cancelled() => return,
                r = io.read_exact(&mut ack) => r,
            };
            if answer.is_err() || ack != CONNACK_ACCEPTED {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            tally.connacked.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = release.cancelled() => {}
                _ = io.read(&mut buf) => { tally.dropped_after_connack.fetch_add(1, Ordering::Relaxed); }
            }
        }
        Kind::Client => unreachable!("rumqttc clients connect by themselves"),
    }
}

/// Drives a flood rumqttc client: gives up at the first error before CONNACK
/// (refused), keeps the connection alive after it. Returns the client and
/// whether it got in.
fn flood_client(
    opts: MqttOptions,
    tally: Arc<Tally>,
    release: CancellationToken,
) -> (AsyncClient, Arc<AtomicBool>) {
    let (client, mut eventloop) = AsyncClient::new(opts, 10);
    let connected = Arc::new(AtomicBool::new(false));
    let flag = connected.clone();
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = release.cancelled() => return,
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    flag.store(true, Ordering::Relaxed);
                    tally.connacked.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) if flag.load(Ordering::Relaxed) => {
                    tally.dropped_after_connack.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => {
                    tally.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    });
    (client, connected)
}

/// Panics on the gateway's threads (tokio workers running the fronts and the
/// ingest task, rumqttd's servers and router): tokio would swallow them.
static GATEWAY_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn watch_gateway_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("");
            if ["tokio-runtime-worker", "tsgw-mqtt", "router"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                GATEWAY_PANICS
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("{name}: {info}"));
            }
            previous(info);
        }));
    });
}

/// Waits (bounded) for `cond`; the failure names `what` and shows `report()`.
async fn until(what: &str, cond: impl Fn() -> bool, report: impl Fn() -> String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}:\n{}",
            report()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A flood of `n` concurrent connections of every [`Kind`] against `m` slots.
struct Flood {
    n: usize,
    m: usize,
    /// Which listener, as labelled in the metrics ("mqtt" or "mqtts").
    listener: &'static str,
    addr: SocketAddr,
    tls: Option<(TlsConnector, Arc<rustls::ClientConfig>)>,
    /// connect_timeout_ms (and, for TLS, handshake_timeout_ms).
    timeout: Duration,
}

impl Flood {
    fn options(&self, id: &str) -> MqttOptions {
        let host = if self.tls.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        let mut opts = MqttOptions::new(id, host, self.addr.port());
        opts.set_keep_alive(Duration::from_secs(30));
        if let Some((_, config)) = &self.tls {
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                config.clone(),
            )));
        }
        opts
    }

    /// Opens the flood, checks refusals and shedding, then that a patient device
    /// and the flood's own connected clients still get readings through.
    async fn run(self, source: MqttSource, rx: &mut mpsc::Receiver<Reading>, metrics: &Metrics) {
        let counter = |m: &Metrics, kind: &str| {
            m.device_errors_total
                .with_label_values(&["mqtt", self.listener, kind])
                .get() as usize
        };
        let tally = Arc::new(Tally::default());
        let release = CancellationToken::new();
        let go = CancellationToken::new();
        let mut clients = Vec::new();
        let mut expect = [0usize; 4];
        let started = Instant::now();
        for i in 0..self.n {
            let kind = kind(i);
            expect[kind as usize] += 1;
            let id = format!("f{i}");
            if kind == Kind::Client {
                clients.push(flood_client(
                    self.options(&id),
                    tally.clone(),
                    release.clone(),
                ));
                continue;
            }
            let stream = TcpStream::connect(self.addr)
                .await
                .unwrap_or_else(|e| panic!("flood socket {i}: {e}"));
            let tls = self.tls.as_ref().map(|(c, _)| c.clone());
            tokio::spawn(play(
                kind,
                id,
                stream,
                tls,
                tally.clone(),
                go.clone(),
                release.clone(),
            ));
        }
        let opened = started.elapsed();
        eprintln!("{}: {} sockets opened in {opened:?}", self.listener, self.n);

        // Every connection is either holding a slot or refused, and exactly the
        // excess is refused: nothing is shed before `timeout`, far longer than
        // opening the flood takes.
        until(
            "every flood connection admitted or refused",
            || {
                counter(metrics, "max_connections") + metrics.broker_connections.get() as usize
                    >= self.n
            },
            || metrics.render(),
        )
        .await;
        let decided = started.elapsed();
        assert!(
            decided < self.timeout,
            "the flood took {decided:?} to be decided, longer than the {:?} timeout",
            self.timeout
        );
        assert_eq!(counter(metrics, "max_connections"), self.n - self.m);
        assert_eq!(metrics.broker_connections.get() as usize, self.m);
        assert_eq!(counter(metrics, "connect_timeout"), 0);
        eprintln!("{}: flood decided in {decided:?}", self.listener);
        go.cancel();

        // The slots of silent and stalled sockets come back after the timeout;
        // connected clients keep theirs.
        let silent = expect[Kind::Silent as usize];
        let stalled = expect[Kind::Partial as usize];
        let connecting = expect[Kind::ConnectIdle as usize] + expect[Kind::Client as usize];
        let report = || format!("{tally:?}\n{}", metrics.render());
        until(
            "silent and stalled sockets shed, every CONNECT answered or refused",
            || {
                tally.closed.load(Ordering::Relaxed) == silent + stalled
                    && tally.connacked.load(Ordering::Relaxed)
                        + tally.refused.load(Ordering::Relaxed)
                        == connecting
            },
            report,
        )
        .await;
        let connected = tally.connacked.load(Ordering::Relaxed);
        let shed = self.m - connected;
        until(
            "every shed counted, connected clients still counted",
            || {
                let handshake = if self.tls.is_some() {
                    counter(metrics, "tls_handshake")
                } else {
                    0
                };
                counter(metrics, "connect_timeout") + handshake == shed
                    && metrics.broker_connections.get() as usize == connected
            },
            report,
        )
        .await;
        assert!(
            connected > 0 && shed > 0,
            "{connected} connected, {shed} shed"
        );
        eprintln!(
            "{}: {} refused, {shed} shed, {connected} connected clients kept their slots",
            self.listener,
            self.n - self.m
        );

        // A device arriving now gets in and its reading arrives; so do the
        // readings of the flood's own clients that got in.
        let patient = patient_device(self.options("patient")).await;
        patient
            .publish("p", QoS::AtLeastOnce, false, "42")
            .await
            .unwrap();
        assert_eq!(next_value(rx).await, Value::Number(42.0));
        let mut published = 0;
        for (client, got_in) in &clients {
            if got_in.load(Ordering::Relaxed) && published < 5 {
                client
                    .publish("p", QoS::AtLeastOnce, false, "7")
                    .await
                    .unwrap();
                published += 1;
            }
        }
        assert!(published > 0, "no flood client got in");
        for _ in 0..published {
            assert_eq!(next_value(rx).await, Value::Number(7.0));
        }
        assert_eq!(tally.dropped_after_connack.load(Ordering::Relaxed), 0);
        let panics = GATEWAY_PANICS.lock().unwrap_or_else(|e| e.into_inner());
        assert!(panics.is_empty(), "gateway threads panicked: {panics:#?}");
        release.cancel();
        drop(source);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connections_on_the_plain_listener() {
    let _one_flood = FLOOD.lock().await;
    watch_gateway_panics();
    // The shipped default max_connections (1000) against three times as many sockets.
    let (n, m) = flood_size(3000, 1000);
    let timeout = Duration::from_millis(3000);
    let cfg = config(&format!(
        "max_connections = {m}\nconnect_timeout_ms = {}",
        timeout.as_millis()
    ));
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    let (source, mut rx) = common::start_source(&cfg, metrics.clone(), shutdown.clone())
        .await
        .unwrap();
    let flood = Flood {
        n,
        m,
        listener: "mqtt",
        addr: source.addrs().plain.unwrap(),
        tls: None,
        timeout,
    };
    flood.run(source, &mut rx, &metrics).await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connections_on_the_tls_listener() {
    let _one_flood = FLOOD.lock().await;
    watch_gateway_panics();
    // Silent sockets are shed by the handshake timeout here, stalled ones by
    // the connect timeout after their handshake.
    let (n, m) = flood_size(3000, 1000);
    let timeout = Duration::from_millis(3000);
    let dir = tempfile::tempdir().unwrap();
    let (tls, client_tls) = common::tls_fixture(&dir);
    let mut cfg = config(&format!(
        "max_connections = {m}\nconnect_timeout_ms = {}",
        timeout.as_millis()
    ));
    cfg.tls = Some(BrokerTlsConfig {
        handshake_timeout_ms: timeout.as_millis() as u64,
        ..tls
    });
    let shutdown = CancellationToken::new();
    let metrics = Metrics::new();
    let (source, mut rx) = common::start_source(&cfg, metrics.clone(), shutdown.clone())
        .await
        .unwrap();
    let flood = Flood {
        n,
        m,
        listener: "mqtts",
        addr: source.addrs().tls.unwrap(),
        tls: Some((TlsConnector::from(client_tls.clone()), client_tls)),
        timeout,
    };
    flood.run(source, &mut rx, &metrics).await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_websocket_client_does_not_wedge_the_websocket_listener() {
    // rumqttd reads a WebSocket upgrade inline in its accept loop, with no
    // timeout: the front's connect timeout is what unblocks it. The device's
    // first attempt may queue behind the silent one and be dropped too.
    let mut cfg = config("connect_timeout_ms = 500");
    cfg.websocket_listen = Some("127.0.0.1:0".parse().unwrap());
    let (source, mut rx, metrics) = start(&cfg).await;
    let ws = source.addrs().websocket.unwrap();
    let silent = TcpStream::connect(ws).await.unwrap();

    let mut opts = MqttOptions::new("ws-device", format!("ws://{ws}/mqtt"), ws.port());
    opts.set_transport(Transport::Ws);
    let device = patient_device(opts).await;
    device
        .publish("p", QoS::AtLeastOnce, false, "3")
        .await
        .unwrap();
    assert_eq!(next_value(&mut rx).await, Value::Number(3.0));
    eventually(&metrics, "the silent client's drop counted", |m| {
        m.device_errors_total
            .with_label_values(&["mqtt", "mqtt-ws", "connect_timeout"])
            .get()
            >= 1
    })
    .await;
    drop(silent);
}

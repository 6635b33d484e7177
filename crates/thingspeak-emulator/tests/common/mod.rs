//! Helpers shared by the integration tests: an emulator with known channels,
//! rumqttc clients over the four transports, and a tiny HTTP/1.1 client.

#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, Incoming, MqttOptions, Publish, TlsConfiguration,
    Transport,
};
use thingspeak::ChannelId;
use thingspeak_emulator::{ChannelSpec, DeviceSpec, Emulator, EmulatorBuilder, EmulatorHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Upper bound of every wait in the tests.
pub const T: Duration = Duration::from_secs(5);

/// Channel 100: device dev1 may use it. Channel 200: only legacy keys. Channel 300: dev2.
pub const DEV1: (&str, &str, &str) = ("dev1", "user1", "pass1");
pub const DEV2: (&str, &str, &str) = ("dev2", "user2", "pass2");

pub fn ch(n: u64) -> ChannelId {
    ChannelId::new(n).unwrap()
}

pub fn base() -> EmulatorBuilder {
    Emulator::builder()
        .tcp("127.0.0.1:0")
        .tls("127.0.0.1:0")
        .ws("127.0.0.1:0")
        .wss("127.0.0.1:0")
        .http("127.0.0.1:0")
        .default_interval(Duration::ZERO)
        .handshake_timeout(Duration::from_secs(2))
        .channel(ChannelSpec::new(ch(100), "WKEY100", "RKEY100"))
        .channel(ChannelSpec::new(ch(200), "WKEY200", "RKEY200"))
        .channel(ChannelSpec::new(ch(300), "WKEY300", "RKEY300"))
        .device(DeviceSpec::new(DEV1.0, DEV1.1, DEV1.2, [ch(100)]))
        .device(DeviceSpec::new(DEV2.0, DEV2.1, DEV2.2, [ch(300)]))
}

pub async fn emulator() -> EmulatorHandle {
    start(base()).await
}

pub async fn start(b: EmulatorBuilder) -> EmulatorHandle {
    tokio::time::timeout(T, b.start())
        .await
        .expect("emulator start timed out")
        .expect("emulator start failed")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tr {
    Tcp,
    Tls,
    Ws,
    Wss,
}

pub const ALL: [Tr; 4] = [Tr::Tcp, Tr::Tls, Tr::Ws, Tr::Wss];

fn client_tls(emu: &EmulatorHandle) -> TlsConfiguration {
    TlsConfiguration::Rustls(client_config(emu))
}

/// A rustls client configuration (ring) trusting only the emulator's CA.
pub fn client_config(emu: &EmulatorHandle) -> Arc<rustls::ClientConfig> {
    let pem = emu.ca_cert_pem().expect("generated CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Options for a client of `emu` over `tr`, no credentials.
pub fn options(emu: &EmulatorHandle, tr: Tr, client_id: &str) -> MqttOptions {
    let mut o = match tr {
        Tr::Tcp => {
            let a = emu.tcp_addr().unwrap();
            MqttOptions::new(client_id, a.ip().to_string(), a.port())
        }
        Tr::Tls => {
            let a = emu.tls_addr().unwrap();
            let mut o = MqttOptions::new(client_id, "127.0.0.1", a.port());
            o.set_transport(Transport::Tls(client_tls(emu)));
            o
        }
        Tr::Ws => {
            let a = emu.ws_addr().unwrap();
            let mut o = MqttOptions::new(client_id, format!("ws://{a}/mqtt"), a.port());
            o.set_transport(Transport::Ws);
            o
        }
        Tr::Wss => {
            let a = emu.wss_addr().unwrap();
            let url = format!("wss://localhost:{}/mqtt", a.port());
            let mut o = MqttOptions::new(client_id, url, a.port());
            o.set_transport(Transport::Wss(client_tls(emu)));
            o
        }
    };
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// Options with device credentials (`DEV1` or `DEV2`).
pub fn device(emu: &EmulatorHandle, tr: Tr, dev: (&str, &str, &str)) -> MqttOptions {
    let mut o = options(emu, tr, dev.0);
    o.set_credentials(dev.1, dev.2);
    o
}

/// A connected client whose event loop runs in a task; events arrive on `events`.
pub struct Conn {
    pub client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
}

/// Connects and waits for the CONNACK. `Err` carries rumqttc's error (e.g. a refusal).
pub async fn open(opts: MqttOptions) -> Result<Conn, ConnectionError> {
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let (tx, mut events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let ev = eventloop.poll().await;
            let stop = ev.is_err();
            if tx.send(ev).is_err() || stop {
                return;
            }
        }
    });
    loop {
        match tokio::time::timeout(T, events.recv())
            .await
            .expect("no CONNACK in time")
        {
            Some(Ok(Event::Incoming(Incoming::ConnAck(_)))) => return Ok(Conn { client, events }),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e),
            None => panic!("event loop ended before CONNACK"),
        }
    }
}

pub async fn connect(opts: MqttOptions) -> Conn {
    match open(opts).await {
        Ok(c) => c,
        Err(e) => panic!("connect failed: {e}"),
    }
}

impl Conn {
    pub async fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(
                topic,
                rumqttc::QoS::AtMostOnce,
                false,
                payload.as_bytes().to_vec(),
            )
            .await
            .unwrap();
    }

    pub async fn subscribe(&self, topic: &str) {
        self.client
            .subscribe(topic, rumqttc::QoS::AtMostOnce)
            .await
            .unwrap();
    }

    /// Next incoming packet (outgoing events skipped); `Err` if the connection ended.
    pub async fn next_incoming(&mut self, within: Duration) -> Result<Incoming, String> {
        loop {
            match tokio::time::timeout(within, self.events.recv()).await {
                Err(_) => return Err("timeout".into()),
                Ok(None) => return Err("event loop ended".into()),
                Ok(Some(Err(e))) => return Err(format!("connection error: {e}")),
                Ok(Some(Ok(Event::Incoming(p)))) => return Ok(p),
                Ok(Some(Ok(Event::Outgoing(_)))) => continue,
            }
        }
    }

    /// Next PUBLISH from the emulator, skipping other packets.
    pub async fn next_publish(&mut self, within: Duration) -> Publish {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_incoming(left).await {
                Ok(Incoming::Publish(p)) => return p,
                Ok(_) => continue,
                Err(e) => panic!("no PUBLISH: {e}"),
            }
        }
    }

    /// Waits for the server to close the connection; returns how many PINGRESPs came first.
    pub async fn expect_closed(&mut self, within: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + within;
        let mut pings = 0;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Err(_) => panic!("connection still open after {within:?}"),
                Ok(None) | Ok(Some(Err(_))) => return pings,
                Ok(Some(Ok(Event::Incoming(Incoming::PingResp)))) => pings += 1,
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Asserts no PUBLISH arrives and the connection stays up for `d`
    /// (acknowledgements and ping responses are fine).
    pub async fn expect_quiet(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.events.recv()).await {
                Err(_) => return,
                Ok(Some(Ok(Event::Outgoing(_)))) => continue,
                Ok(Some(Ok(Event::Incoming(Incoming::SubAck(_) | Incoming::PingResp)))) => continue,
                Ok(other) => panic!("expected nothing, got {other:?}"),
            }
        }
    }
}

/// A minimal HTTP/1.1 request (`Connection: close`); returns status and body.
pub async fn http(
    emu: &EmulatorHandle,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> (u16, String) {
    let addr = emu.http_addr().unwrap();
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some(ct) = content_type {
            req.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        String::from_utf8(raw).unwrap()
    };
    let text = tokio::time::timeout(T, exchange)
        .await
        .expect("HTTP timed out");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

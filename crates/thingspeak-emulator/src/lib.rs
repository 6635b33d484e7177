//! A ThingSpeak-compatible MQTT broker and REST endpoint, for tests, the demo
//! and offline work.
//!
//! It enforces what the real service enforces (see `README.md` of this crate):
//! CONNECT rules (CONNACK 5), publish rules (violations close the connection),
//! the per-channel rate limit (excess silently dropped), unique `created_at`,
//! the idle timeout that pings do not reset, subscriptions with last-entry
//! delivery, and the REST bulk/single update calls. Faults can be injected.
//!
//! ```no_run
//! # async fn demo() -> Result<(), thingspeak_emulator::Error> {
//! use std::time::Duration;
//! use thingspeak::ChannelId;
//! use thingspeak_emulator::{ChannelSpec, DeviceSpec, Emulator};
//!
//! let ch = ChannelId::new(1001).unwrap();
//! let emu = Emulator::builder()
//!     .tcp("127.0.0.1:0")
//!     .tls("127.0.0.1:0")
//!     .http("127.0.0.1:0")
//!     .default_interval(Duration::from_millis(100))
//!     .channel(ChannelSpec::new(ch, "WRITEKEY", "READKEY"))
//!     .device(DeviceSpec::new("dev1", "user1", "pass1", [ch]))
//!     .start()
//!     .await?;
//! println!("MQTT on {:?}, CA at {:?}", emu.tcp_addr(), emu.ca_file());
//! let entries = emu.entries(ch);
//! # Ok(()) }
//! ```

pub mod config;
pub mod counters;
pub mod error;
pub mod faults;
pub mod state;

mod core;
mod feeds;
mod http;
mod listeners;
mod mqtt;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use thingspeak::{ChannelId, ChannelUpdate};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

pub use config::{ChannelSpec, ChannelsFile, DeviceSpec};
pub use counters::Counters;
pub use error::Error;
pub use faults::{FaultStatus, RefuseMode};
pub use listeners::{WS_PATH, WS_SUBPROTOCOL};
pub use state::{Entry, Limits, WriteOrigin, WriteRejected};
pub use tls::{CertSource, GENERATED_SANS};

use crate::core::{Core, SessionSettings};
use crate::listeners::Kind;
use crate::state::Store;

/// Entry point: `Emulator::builder()`.
pub struct Emulator;

impl Emulator {
    pub fn builder() -> EmulatorBuilder {
        EmulatorBuilder::default()
    }
}

/// Shortest idle timeout accepted.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Configures and starts an emulator. Every listener is optional; give port 0
/// for an OS-assigned port and read the bound address from the handle.
#[derive(Debug, Clone)]
pub struct EmulatorBuilder {
    tcp: Option<String>,
    tls: Option<String>,
    ws: Option<String>,
    wss: Option<String>,
    http: Option<String>,
    https: Option<String>,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    limits: Limits,
    channels: Vec<ChannelSpec>,
    devices: Vec<DeviceSpec>,
    mqtt_api_keys: Vec<String>,
    cert: CertSource,
    ca_out: Option<PathBuf>,
}

impl Default for EmulatorBuilder {
    fn default() -> Self {
        Self {
            tcp: None,
            tls: None,
            ws: None,
            wss: None,
            http: None,
            https: None,
            idle_timeout: thingspeak::limits::IDLE_TIMEOUT,
            handshake_timeout: Duration::from_secs(10),
            limits: Limits::default(),
            channels: Vec::new(),
            devices: Vec::new(),
            mqtt_api_keys: Vec::new(),
            cert: CertSource::Generate,
            ca_out: None,
        }
    }
}

impl EmulatorBuilder {
    /// Plain MQTT over TCP (ThingSpeak: port 1883).
    pub fn tcp(mut self, addr: impl Into<String>) -> Self {
        self.tcp = Some(addr.into());
        self
    }

    /// MQTT over TLS (ThingSpeak: port 8883).
    pub fn tls(mut self, addr: impl Into<String>) -> Self {
        self.tls = Some(addr.into());
        self
    }

    /// MQTT over WebSocket, path `/mqtt`, subprotocol `mqtt` (ThingSpeak: port 80).
    pub fn ws(mut self, addr: impl Into<String>) -> Self {
        self.ws = Some(addr.into());
        self
    }

    /// MQTT over WebSocket over TLS (ThingSpeak: port 443).
    pub fn wss(mut self, addr: impl Into<String>) -> Self {
        self.wss = Some(addr.into());
        self
    }

    /// REST (`/update.json`, `bulk_update.json`) plus the `/api` inspection API, plain HTTP.
    pub fn http(mut self, addr: impl Into<String>) -> Self {
        self.http = Some(addr.into());
        self
    }

    /// The same HTTP service over TLS (the certificate of the MQTT TLS listeners).
    pub fn https(mut self, addr: impl Into<String>) -> Self {
        self.https = Some(addr.into());
        self
    }

    /// Closes sessions without PUBLISH or SUBSCRIBE for this long (default 3600 s, min 1 s).
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }

    /// Bound on TLS/WebSocket handshakes and on the wait for CONNECT (default 10 s).
    pub fn handshake_timeout(mut self, d: Duration) -> Self {
        self.handshake_timeout = d;
        self
    }

    /// Minimum time between accepted updates of a channel without its own interval (default 15 s).
    pub fn default_interval(mut self, d: Duration) -> Self {
        self.limits.default_interval = d;
        self
    }

    /// Minimum time between bulk-update calls of one channel (default 15 s).
    pub fn bulk_interval(mut self, d: Duration) -> Self {
        self.limits.bulk_interval = d;
        self
    }

    /// Most updates one bulk call may carry (default 960, the free licence's).
    pub fn max_bulk_updates(mut self, n: usize) -> Self {
        self.limits.max_bulk_updates = n;
        self
    }

    pub fn channel(mut self, spec: ChannelSpec) -> Self {
        self.channels.push(spec);
        self
    }

    pub fn device(mut self, spec: DeviceSpec) -> Self {
        self.devices.push(spec);
        self
    }

    /// A legacy account MQTT API key: accepted as CONNECT password with any username.
    pub fn mqtt_api_key(mut self, key: impl Into<String>) -> Self {
        self.mqtt_api_keys.push(key.into());
        self
    }

    /// Adds everything a channels file defines.
    pub fn channels_file(mut self, file: ChannelsFile) -> Self {
        self.channels.extend(file.channels);
        self.devices.extend(file.devices);
        self.mqtt_api_keys.extend(file.mqtt_api_keys);
        self
    }

    /// Use this certificate chain and key (PEM) instead of generating one.
    pub fn cert_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.cert = CertSource::Files {
            cert: cert.into(),
            key: key.into(),
        };
        self
    }

    /// Where to write the generated CA certificate (PEM). Without it a
    /// temporary file is used, removed when the handle is dropped.
    pub fn ca_out(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_out = Some(path.into());
        self
    }

    /// Binds every configured listener and starts serving. Must run inside a tokio runtime.
    pub async fn start(self) -> Result<EmulatorHandle, Error> {
        if self.idle_timeout < MIN_IDLE_TIMEOUT {
            return Err(Error::Invalid(format!(
                "idle timeout {:?} is below the minimum of 1 s",
                self.idle_timeout
            )));
        }
        if self.handshake_timeout.is_zero() {
            return Err(Error::Invalid("handshake timeout must be positive".into()));
        }
        config::validate(&self.channels, &self.devices).map_err(Error::Invalid)?;

        let needs_tls = self.tls.is_some() || self.wss.is_some() || self.https.is_some();
        let server_tls = if needs_tls {
            Some(tls::build(&self.cert)?)
        } else {
            None
        };
        let mut ca_file = None;
        let mut ca_temp = None;
        let ca_pem = server_tls.as_ref().and_then(|t| t.ca_pem.clone());
        if let Some(pem) = &ca_pem {
            match &self.ca_out {
                Some(path) => {
                    std::fs::write(path, pem).map_err(|e| Error::file(path, e))?;
                    ca_file = Some(path.clone());
                }
                None => {
                    let tmp = tempfile::Builder::new()
                        .prefix("thingspeak-emulator-ca-")
                        .suffix(".pem")
                        .tempfile()
                        .map_err(|e| Error::file(&std::env::temp_dir(), e))?;
                    std::fs::write(tmp.path(), pem).map_err(|e| Error::file(tmp.path(), e))?;
                    ca_file = Some(tmp.path().to_owned());
                    ca_temp = Some(tmp);
                }
            }
        }

        let store = Store::new(self.channels, self.limits);
        let core = Arc::new(Core::new(
            store,
            self.devices,
            self.mqtt_api_keys,
            SessionSettings {
                idle_timeout: self.idle_timeout,
                handshake_timeout: self.handshake_timeout,
            },
        ));

        // Bind everything before spawning anything, so a bind error leaves nothing running.
        let mut bound: Vec<(Kind, TcpListener)> = Vec::new();
        for (kind, addr) in [
            (Kind::Tcp, &self.tcp),
            (Kind::Tls, &self.tls),
            (Kind::Ws, &self.ws),
            (Kind::Wss, &self.wss),
        ] {
            if let Some(addr) = addr {
                bound.push((kind, bind(kind_name(kind), addr).await?));
            }
        }
        let http_listener = match &self.http {
            Some(addr) => Some(bind("http", addr).await?),
            None => None,
        };
        let https_listener = match &self.https {
            Some(addr) => Some(bind("https", addr).await?),
            None => None,
        };

        let mut addrs = Addrs::default();
        let mut tasks = Vec::new();
        for (kind, listener) in bound {
            let addr = listener
                .local_addr()
                .map_err(|e| Error::bind(kind_name(kind), "bound socket", e))?;
            info!(transport = %kind, %addr, "MQTT listening");
            match kind {
                Kind::Tcp => addrs.tcp = Some(addr),
                Kind::Tls => addrs.tls = Some(addr),
                Kind::Ws => addrs.ws = Some(addr),
                Kind::Wss => addrs.wss = Some(addr),
            }
            let acceptor = server_tls.as_ref().map(|t| t.acceptor.clone());
            tasks.push(tokio::spawn(listeners::accept_loop(
                listener,
                kind,
                acceptor,
                core.clone(),
            )));
        }
        if let Some(listener) = http_listener {
            let addr = listener
                .local_addr()
                .map_err(|e| Error::bind("http", "bound socket", e))?;
            info!(%addr, "HTTP listening");
            addrs.http = Some(addr);
            let app = http::router(core.clone());
            let stop = core.shutdown.clone();
            tasks.push(tokio::spawn(async move {
                let served = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "HTTP server failed");
                }
            }));
        }

        if let (Some(listener), Some(server_tls)) = (https_listener, &server_tls) {
            let addr = listener
                .local_addr()
                .map_err(|e| Error::bind("https", "bound socket", e))?;
            info!(%addr, "HTTPS listening");
            addrs.https = Some(addr);
            tasks.push(tokio::spawn(http::serve_https(
                listener,
                server_tls.acceptor.clone(),
                http::router(core.clone()),
                core.clone(),
            )));
        }

        Ok(EmulatorHandle {
            core,
            addrs,
            ca_pem,
            ca_file,
            _ca_temp: ca_temp,
            tasks,
        })
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Tcp => "mqtt tcp",
        Kind::Tls => "mqtt tls",
        Kind::Ws => "mqtt ws",
        Kind::Wss => "mqtt wss",
    }
}

async fn bind(what: &'static str, addr: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::bind(what, addr, e))
}

#[derive(Debug, Clone, Copy, Default)]
struct Addrs {
    tcp: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    ws: Option<SocketAddr>,
    wss: Option<SocketAddr>,
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
}

/// A running emulator. Dropping it stops every listener and connection
/// (`shutdown().await` does the same and waits for the listeners to end).
pub struct EmulatorHandle {
    core: Arc<Core>,
    addrs: Addrs,
    ca_pem: Option<String>,
    ca_file: Option<PathBuf>,
    _ca_temp: Option<tempfile::NamedTempFile>,
    tasks: Vec<JoinHandle<()>>,
}

impl EmulatorHandle {
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.addrs.tcp
    }

    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.addrs.tls
    }

    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.addrs.ws
    }

    pub fn wss_addr(&self) -> Option<SocketAddr> {
        self.addrs.wss
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.addrs.http
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.addrs.https
    }

    /// `ws://127.0.0.1:<port>/mqtt`, the broker URL WebSocket clients (rumqttc, paho) take.
    pub fn ws_url(&self) -> Option<String> {
        self.addrs.ws.map(|a| format!("ws://{a}{WS_PATH}"))
    }

    /// `wss://localhost:<port>/mqtt` (host name `localhost`, which the generated certificate covers).
    pub fn wss_url(&self) -> Option<String> {
        self.addrs
            .wss
            .map(|a| format!("wss://localhost:{}{WS_PATH}", a.port()))
    }

    /// PEM of the generated CA that signed the server certificate (`None` with own cert files).
    pub fn ca_cert_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// File holding [`Self::ca_cert_pem`], for clients that take a CA file.
    pub fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    /// All entries of a channel, oldest first (empty for an unknown channel).
    pub fn entries(&self, channel: ChannelId) -> Vec<Entry> {
        self.core
            .store()
            .entries(channel)
            .map(<[Entry]>::to_vec)
            .unwrap_or_default()
    }

    /// Every entry stored from now on by MQTT or `/update` (not bulk), as it
    /// is stored: a test can act at the moment ThingSpeak has an update and
    /// its sender has not yet seen the echo. A receiver that falls more than
    /// a few thousand entries behind misses some (`RecvError::Lagged`).
    pub fn stored(&self) -> tokio::sync::broadcast::Receiver<Arc<Entry>> {
        self.core.relay.subscribe()
    }

    pub fn counters(&self) -> Counters {
        self.core.counters.snapshot()
    }

    /// Writes an update as `/update.json` would (rate limit, relay to subscribers).
    pub fn write(
        &self,
        channel: ChannelId,
        update: &ChannelUpdate,
    ) -> Result<Entry, WriteRejected> {
        self.core.write(channel, update, WriteOrigin::UpdateApi)
    }

    /// Answers every CONNECT with CONNACK 3 (server unavailable) for `d`.
    pub fn refuse_connections_for(&self, d: Duration) {
        self.refuse_connections_with(d, RefuseMode::ServerUnavailable);
    }

    /// Refuses every CONNECT for `d`, the given way.
    pub fn refuse_connections_with(&self, d: Duration, mode: RefuseMode) {
        info!(?d, ?mode, "refusing connections (fault injection)");
        self.core.faults.refuse_for(d, mode);
    }

    /// Closes every open connection now, without warning.
    pub fn drop_all_connections(&self) {
        info!("dropping all connections (fault injection)");
        self.core.drop_all_connections();
    }

    /// Silently drops the next `n` publishes that would otherwise be accepted.
    pub fn drop_next_publishes(&self, n: u64) {
        self.core.faults.drop_next(n);
    }

    /// Silently drops each valid publish with probability `p` (0..=1).
    pub fn set_publish_drop_probability(&self, p: f64) {
        self.core.faults.set_drop_probability(p);
    }

    pub fn clear_faults(&self) {
        self.core.faults.clear();
    }

    pub fn fault_status(&self) -> FaultStatus {
        self.core.faults.status()
    }

    /// Waits until `pred` holds for the counters; returns the last snapshot
    /// either way (`Err` on timeout), polling every 10 ms.
    pub async fn wait_for_counters(
        &self,
        timeout: Duration,
        pred: impl Fn(&Counters) -> bool,
    ) -> Result<Counters, Counters> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let c = self.counters();
            if pred(&c) {
                return Ok(c);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(c);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the channel has at least `n` entries; returns them either
    /// way (`Err` on timeout).
    pub async fn wait_for_entries(
        &self,
        channel: ChannelId,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Entry>, Vec<Entry>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let e = self.entries(channel);
            if e.len() >= n {
                return Ok(e);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops listeners and connections and waits (at most 5 s) for the listeners to end.
    pub async fn shutdown(mut self) {
        self.core.shutdown.cancel();
        let tasks = std::mem::take(&mut self.tasks);
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(Duration::from_secs(5), all)
            .await
            .is_err()
        {
            tracing::warn!("listeners did not stop within 5 s");
        }
        info!("emulator stopped");
    }
}

impl Drop for EmulatorHandle {
    fn drop(&mut self) {
        self.core.shutdown.cancel();
    }
}

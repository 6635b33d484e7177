//! The listeners devices connect to, and the front that stands between them
//! and the embedded broker.
//!
//! tsgw owns the public sockets. Each accepted connection gets its TLS or
//! WebSocket handshake under a timeout, is counted, and is then served packet
//! by packet (`session`): the front authenticates CONNECT, applies the ACLs,
//! hands every PUBLISH's readings to the queue writer (holding QoS 1/2 acks
//! until they are fsynced) and relays the rest to rumqttd's private loopback
//! listener, which keeps sessions, local fan-out and retained messages.
//!
//! The front enforces `connect_timeout_ms` itself: a device must send CONNECT
//! and the broker answer it within that time, or the device is dropped and
//! counted. rumqttd's own timer cannot be relied on for that: in a burst of
//! connections its single-threaded accept loop overflows the 128-entry listen
//! backlog, so a silent device would hold its slot for good.

mod feed;
mod session;
mod subscriptions;
mod websocket;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tsgw_core::{IngestBatch, Metrics};

pub use subscriptions::LocalSubscriptions;

use crate::ingest::{Ingest, Mapping};

/// How one public listener treats new connections before speaking MQTT.
#[derive(Clone)]
pub enum Handshake {
    /// Plain MQTT over TCP.
    None,
    /// TLS is terminated here, within `timeout`.
    Tls {
        acceptor: TlsAcceptor,
        timeout: Duration,
    },
    /// MQTT over WebSocket (subprotocol `mqtt`, any path); the upgrade must
    /// finish within `timeout` (`connect_timeout_ms`).
    WebSocket { timeout: Duration },
}

/// What every connection of every listener shares.
pub struct Context {
    /// rumqttd's private loopback listener.
    pub backend: SocketAddr,
    /// A device must be connected (CONNACK) within this time.
    pub connect_timeout: Duration,
    /// Largest packet a device may send (`mqtt.max_payload_bytes`).
    pub max_packet_bytes: usize,
    pub mapping: watch::Receiver<Arc<Mapping>>,
    pub ingest: Arc<Ingest>,
    /// To the queue writer. Bounded: when it is full, devices wait.
    pub intake: mpsc::Sender<IngestBatch>,
    /// What local clients subscribed to: only publishes someone may want are
    /// relayed to rumqttd.
    pub subscriptions: LocalSubscriptions,
    /// ThingSpeak's channel feeds (drop-in subscribe), when upstream serves them.
    pub feeds: Option<Arc<dyn tsgw_core::FeedSource>>,
}

/// A bound public listener.
pub struct Front {
    pub name: &'static str,
    pub listener: TcpListener,
    pub handshake: Handshake,
    pub context: Arc<Context>,
}

impl Front {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `shutdown`. `slots` bounds concurrent connections across all fronts.
    pub async fn run(self, slots: Arc<Semaphore>, metrics: Metrics, shutdown: CancellationToken) {
        // mosquitto 2.x's rule: anonymous clients are for loopback listeners
        // unless the config says otherwise (0.0.0.0 is not loopback).
        let loopback = self
            .listener
            .local_addr()
            .map(|a| a.ip().is_loopback())
            .unwrap_or(false);
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning on the error.
                        warn!(listener = self.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                warn!(listener = self.name, %peer, "connection refused: mqtt.max_connections reached");
                metrics
                    .device_errors_total
                    .with_label_values(&["mqtt", self.name, "max_connections"])
                    .inc();
                continue;
            };
            let handshake = self.handshake.clone();
            let context = self.context.clone();
            let metrics = metrics.clone();
            let name = self.name;
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                metrics.broker_connections.inc();
                let result = serve(stream, handshake, context, loopback, shutdown).await;
                metrics.broker_connections.dec();
                drop(permit);
                match result {
                    Ok(()) => debug!(listener = name, %peer, "device connection closed"),
                    Err(Dropped::Refused {
                        reason,
                        user,
                        client_id,
                    }) => {
                        // Counted in tsgw_mqtt_denied_total by the session.
                        info!(listener = name, %peer, reason, user = %user, client_id = %printable_id(&client_id), "device refused at CONNECT")
                    }
                    Err(dropped) => {
                        if let Some(kind) = dropped.kind() {
                            metrics
                                .device_errors_total
                                .with_label_values(&["mqtt", name, kind])
                                .inc();
                        }
                        info!(listener = name, %peer, reason = %dropped.message(), "device connection dropped")
                    }
                }
            });
        }
    }
}

/// Why a device connection ended early.
#[derive(Debug)]
pub enum Dropped {
    Handshake(String),
    ConnectTimeout(String),
    /// The device broke MQTT; `kind` is the `device_errors_total` label.
    Protocol {
        kind: &'static str,
        message: String,
    },
    /// CONNECT refused (already counted in `tsgw_mqtt_denied_total`).
    Refused {
        reason: &'static str,
        user: String,
        client_id: String,
    },
    /// Readings of an acknowledged-on-fsync publish could not be stored: the
    /// connection is closed without the ack, so the device sends them again.
    NotStored,
    /// rumqttd closed its side (keep-alive expired, session taken over).
    BrokerClosed,
    Io(String),
}

impl Dropped {
    pub fn protocol(kind: &'static str, message: impl Into<String>) -> Self {
        Dropped::Protocol {
            kind,
            message: message.into(),
        }
    }

    pub fn io(e: std::io::Error) -> Self {
        Dropped::Io(e.to_string())
    }

    /// The `kind` label under which it is counted, if it is.
    fn kind(&self) -> Option<&'static str> {
        match self {
            Dropped::Handshake(_) => Some("tls_handshake"),
            Dropped::ConnectTimeout(_) => Some("connect_timeout"),
            Dropped::Protocol { kind, .. } => Some(kind),
            Dropped::NotStored => Some("not_stored"),
            Dropped::BrokerClosed => Some("broker_closed"),
            Dropped::Refused { .. } | Dropped::Io(_) => None,
        }
    }

    fn message(&self) -> String {
        match self {
            Dropped::Handshake(m) | Dropped::ConnectTimeout(m) | Dropped::Io(m) => m.clone(),
            Dropped::Protocol { message, .. } => message.clone(),
            Dropped::Refused { reason, .. } => format!("refused: {reason}"),
            Dropped::NotStored => {
                "its readings could not be stored; closed without ack so that it resends".into()
            }
            Dropped::BrokerClosed => {
                "the embedded broker ended the session (keep-alive expired or the client id connected again)".into()
            }
        }
    }
}

/// Client ids come from devices: cap what reaches a log line.
fn printable_id(id: &str) -> String {
    id.chars().take(64).collect()
}

async fn serve(
    stream: TcpStream,
    handshake: Handshake,
    context: Arc<Context>,
    loopback: bool,
    shutdown: CancellationToken,
) -> Result<(), Dropped> {
    let _ = stream.set_nodelay(true);
    match handshake {
        Handshake::None => session::run(stream, context, loopback, shutdown).await,
        Handshake::Tls { acceptor, timeout } => {
            let tls = tokio::time::timeout(timeout, acceptor.accept(stream))
                .await
                .map_err(|_| {
                    Dropped::Handshake(format!("TLS handshake not finished within {timeout:?}"))
                })?
                .map_err(|e| Dropped::Handshake(format!("TLS handshake failed: {e}")))?;
            session::run(tls, context, loopback, shutdown).await
        }
        Handshake::WebSocket { timeout } => {
            // The upgrade is part of connecting: a silent client counts as a
            // connect timeout, as on the other listeners.
            let ws = tokio::time::timeout(timeout, websocket::accept(stream))
                .await
                .map_err(|_| {
                    Dropped::ConnectTimeout(format!(
                        "WebSocket upgrade not finished within {timeout:?}"
                    ))
                })?
                .map_err(|e| {
                    Dropped::protocol("ws_handshake", format!("WebSocket upgrade failed: {e}"))
                })?;
            session::run(ws, context, loopback, shutdown).await
        }
    }
}

/// Loads a PEM certificate chain and key into a TLS acceptor (ring provider).
pub fn tls_acceptor(
    cert_file: &std::path::Path,
    key_file: &std::path::Path,
) -> Result<TlsAcceptor, String> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert_file).map_err(|e| format!("{}: {e}", cert_file.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", cert_file.display()));
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key_file).map_err(|e| format!("{}: {e}", key_file.display()))?,
    ))
    .map_err(|e| format!("{}: {e}", key_file.display()))?
    .ok_or_else(|| format!("{}: no PEM private key found", key_file.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

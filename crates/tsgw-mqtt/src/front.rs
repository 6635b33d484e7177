//! The listeners devices connect to.
//!
//! rumqttd binds its own sockets, cannot report the port it got, completes TLS
//! handshakes inline in its accept loop (one silent client stalls the whole
//! listener) and offers no connection count. So tsgw owns the public sockets:
//! each accepted connection gets its TLS handshake under a timeout, is counted,
//! and is then spliced to rumqttd's private loopback listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use tsgw_core::Metrics;

/// How one public listener treats new connections before splicing them.
#[derive(Clone)]
pub enum Handshake {
    /// Bytes go straight through (plain MQTT, or WebSocket handled by rumqttd).
    None,
    /// TLS is terminated here, within `timeout`.
    Tls {
        acceptor: TlsAcceptor,
        timeout: Duration,
    },
}

/// A bound public listener and the private rumqttd listener it feeds.
pub struct Front {
    pub name: &'static str,
    pub listener: TcpListener,
    pub backend: SocketAddr,
    pub handshake: Handshake,
}

impl Front {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts until `shutdown`. `slots` bounds concurrent connections across all fronts.
    pub async fn run(self, slots: Arc<Semaphore>, metrics: Metrics, shutdown: CancellationToken) {
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
            let backend = self.backend;
            let metrics = metrics.clone();
            let name = self.name;
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                metrics.broker_connections.inc();
                let result = serve(stream, handshake, backend, shutdown).await;
                metrics.broker_connections.dec();
                if let Err(Dropped::Handshake(_)) = &result {
                    metrics
                        .device_errors_total
                        .with_label_values(&["mqtt", name, "tls_handshake"])
                        .inc();
                }
                drop(permit);
                match result {
                    Ok(()) => debug!(listener = name, %peer, "device connection closed"),
                    Err(reason) => {
                        info!(listener = name, %peer, reason = %reason.message(), "device connection dropped")
                    }
                }
            });
        }
    }
}

/// Why a device connection ended early.
enum Dropped {
    Handshake(String),
    Io(String),
}

impl Dropped {
    fn message(&self) -> &str {
        match self {
            Dropped::Handshake(m) | Dropped::Io(m) => m,
        }
    }
}

async fn serve(
    stream: TcpStream,
    handshake: Handshake,
    backend: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), Dropped> {
    let _ = stream.set_nodelay(true);
    match handshake {
        Handshake::None => splice(stream, backend, shutdown).await.map_err(Dropped::Io),
        Handshake::Tls { acceptor, timeout } => {
            let tls = tokio::time::timeout(timeout, acceptor.accept(stream))
                .await
                .map_err(|_| {
                    Dropped::Handshake(format!("TLS handshake not finished within {timeout:?}"))
                })?
                .map_err(|e| Dropped::Handshake(format!("TLS handshake failed: {e}")))?;
            splice(tls, backend, shutdown).await.map_err(Dropped::Io)
        }
    }
}

/// Copies bytes both ways until either side closes, then closes both.
///
/// Not `copy_bidirectional`: that waits for *both* directions to end, so when
/// rumqttd drops a client that never sent CONNECT, a silent device would keep
/// its connection slot forever.
async fn splice<S>(
    device: S,
    backend: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut broker = TcpStream::connect(backend)
        .await
        .map_err(|e| format!("embedded broker unreachable at {backend}: {e}"))?;
    let _ = broker.set_nodelay(true);
    let (mut device_read, mut device_write) = tokio::io::split(device);
    let (mut broker_read, mut broker_write) = broker.split();
    tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        r = tokio::io::copy(&mut device_read, &mut broker_write) => r.map(|_| ()).map_err(|e| e.to_string()),
        r = tokio::io::copy(&mut broker_read, &mut device_write) => r.map(|_| ()).map_err(|e| e.to_string()),
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

//! The listeners devices connect to.
//!
//! rumqttd binds its own sockets, cannot report the port it got, completes TLS
//! handshakes inline in its accept loop (one silent client stalls the whole
//! listener) and offers no connection count. So tsgw owns the public sockets:
//! each accepted connection gets its TLS handshake under a timeout, is counted,
//! and is then spliced to rumqttd's private loopback listener.
//!
//! The front also enforces `connect_timeout_ms` itself: the broker must answer
//! (CONNACK, or the WebSocket upgrade) within it, or the device is dropped and
//! counted. rumqttd's own timer cannot be relied on for that: it starts only
//! once rumqttd accepted the spliced connection, and in a burst of connections
//! its single-threaded accept loop overflows the 128-entry listen backlog, so
//! some spliced connections are established on our side but never accepted on
//! its side. A silent device on such a connection would hold its slot for good.
//! Over WebSocket the broker's first answer is the upgrade; a client that
//! upgrades and then sends no CONNECT is left to rumqttd's timer (uncounted).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
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
    /// The broker must answer a device within this time (after any TLS handshake).
    pub connect_timeout: Duration,
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
            let connect_timeout = self.connect_timeout;
            let metrics = metrics.clone();
            let name = self.name;
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                metrics.broker_connections.inc();
                let result = serve(stream, handshake, backend, connect_timeout, shutdown).await;
                metrics.broker_connections.dec();
                let counted = match &result {
                    Err(Dropped::Handshake(_)) => Some("tls_handshake"),
                    Err(Dropped::ConnectTimeout(_)) => Some("connect_timeout"),
                    _ => None,
                };
                if let Some(kind) = counted {
                    metrics
                        .device_errors_total
                        .with_label_values(&["mqtt", name, kind])
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
    ConnectTimeout(String),
    Io(String),
}

impl Dropped {
    fn message(&self) -> &str {
        match self {
            Dropped::Handshake(m) | Dropped::ConnectTimeout(m) | Dropped::Io(m) => m,
        }
    }
}

async fn serve(
    stream: TcpStream,
    handshake: Handshake,
    backend: SocketAddr,
    connect_timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(), Dropped> {
    let _ = stream.set_nodelay(true);
    match handshake {
        Handshake::None => splice(stream, backend, connect_timeout, shutdown).await,
        Handshake::Tls { acceptor, timeout } => {
            let tls = tokio::time::timeout(timeout, acceptor.accept(stream))
                .await
                .map_err(|_| {
                    Dropped::Handshake(format!("TLS handshake not finished within {timeout:?}"))
                })?
                .map_err(|e| Dropped::Handshake(format!("TLS handshake failed: {e}")))?;
            splice(tls, backend, connect_timeout, shutdown).await
        }
    }
}

/// Copies bytes both ways until either side closes, then closes both.
///
/// Not `copy_bidirectional`: that waits for *both* directions to end, so when
/// rumqttd drops a client that never sent CONNECT, a silent device would keep
/// its connection slot forever. The broker's first bytes must arrive within
/// `connect_timeout` (see the module docs for why rumqttd's timer is not enough).
async fn splice<S>(
    device: S,
    backend: SocketAddr,
    connect_timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(), Dropped>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = Instant::now() + connect_timeout;
    let late =
        || Dropped::ConnectTimeout(format!("no CONNECT accepted within {connect_timeout:?}"));
    let io = |e: std::io::Error| Dropped::Io(e.to_string());
    let mut broker = tokio::time::timeout_at(deadline, TcpStream::connect(backend))
        .await
        .map_err(|_| late())?
        .map_err(|e| Dropped::Io(format!("embedded broker unreachable at {backend}: {e}")))?;
    let _ = broker.set_nodelay(true);
    let (mut device_read, mut device_write) = tokio::io::split(device);
    let (mut broker_read, mut broker_write) = broker.split();
    let to_device = async {
        let mut first = [0u8; 1024];
        let n = tokio::time::timeout_at(deadline, broker_read.read(&mut first))
            .await
            .map_err(|_| late())?
            .map_err(io)?;
        if n == 0 {
            return Ok(());
        }
        device_write.write_all(&first[..n]).await.map_err(io)?;
        device_write.flush().await.map_err(io)?;
        tokio::io::copy(&mut broker_read, &mut device_write)
            .await
            .map(drop)
            .map_err(io)
    };
    tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        r = tokio::io::copy(&mut device_read, &mut broker_write) => r.map(drop).map_err(io),
        r = to_device => r,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_broker_that_never_answers_is_a_connect_timeout() {
        // A listener that never accepts: the spliced connection is established
        // on our side only, as when rumqttd's accept backlog overflows.
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (device, _peer) = tokio::io::duplex(64);
        let started = Instant::now();
        let result = splice(
            device,
            backend.local_addr().unwrap(),
            Duration::from_millis(200),
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(result, Err(Dropped::ConnectTimeout(_))));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn the_deadline_covers_only_the_brokers_first_answer() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = backend.local_addr().unwrap();
        let broker = tokio::spawn(async move {
            let (mut s, _) = backend.accept().await.unwrap();
            let mut connect = [0u8; 7];
            s.read_exact(&mut connect).await.unwrap();
            assert_eq!(&connect, b"CONNECT");
            s.write_all(b"CONNACK").await.unwrap();
            // Well past the connect deadline: the connection must stay up.
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.write_all(b"PUBLISH").await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
        });
        let (device, mut peer) = tokio::io::duplex(64);
        let spliced = tokio::spawn(splice(
            device,
            addr,
            Duration::from_millis(100),
            CancellationToken::new(),
        ));
        peer.write_all(b"CONNECT").await.unwrap();
        let mut answer = [0u8; 14];
        peer.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"CONNACKPUBLISH");
        drop(peer);
        assert!(spliced.await.unwrap().is_ok());
        broker.await.unwrap();
    }
}

//! Accept loops for the four MQTT transports. Each accepted connection gets
//! its own task; handshakes are bounded so a silent client never holds up
//! the loop or lingers forever.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{info, warn};

use crate::core::Core;
use crate::counters::LiveCounters;
use crate::mqtt::session;
use crate::mqtt::transport::{BoxedIo, Transport};

/// The WebSocket path and subprotocol ThingSpeak (and paho) use.
pub const WS_PATH: &str = "/mqtt";
pub const WS_SUBPROTOCOL: &str = "mqtt";

/// Largest WebSocket message accepted (well above any valid ThingSpeak packet).
const WS_MAX_MESSAGE: usize = 128 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tcp,
    Tls,
    Ws,
    Wss,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Tcp => "tcp",
            Kind::Tls => "tls",
            Kind::Ws => "ws",
            Kind::Wss => "wss",
        })
    }
}

/// Runs an accept loop until shutdown.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    kind: Kind,
    tls: Option<TlsAcceptor>,
    core: Arc<Core>,
) {
    loop {
        let accepted = tokio::select! {
            _ = core.shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                LiveCounters::inc(&core.counters.connections);
                info!(%peer, transport = %kind, "connection accepted");
                let core = core.clone();
                let tls = tls.clone();
                tokio::spawn(async move { handle(stream, peer, kind, tls, core).await });
            }
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                warn!(transport = %kind, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    kind: Kind,
    tls: Option<TlsAcceptor>,
    core: Arc<Core>,
) {
    // Small MQTT packets must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let timeout = core.session.handshake_timeout;
    let handshake = async {
        let io: BoxedIo = match (&kind, tls) {
            (Kind::Tls | Kind::Wss, Some(acceptor)) => Box::new(
                acceptor
                    .accept(stream)
                    .await
                    .map_err(|e| format!("TLS handshake: {e}"))?,
            ),
            (Kind::Tls | Kind::Wss, None) => {
                return Err("TLS listener without certificate".to_string())
            }
            (Kind::Tcp | Kind::Ws, _) => Box::new(stream),
        };
        match kind {
            Kind::Tcp | Kind::Tls => Ok(Transport::Stream(io)),
            Kind::Ws | Kind::Wss => {
                // MQTT packets here are small; bound what one frame may make us buffer.
                let config = WebSocketConfig::default()
                    .max_message_size(Some(WS_MAX_MESSAGE))
                    .max_frame_size(Some(WS_MAX_MESSAGE));
                let ws = tokio_tungstenite::accept_hdr_async_with_config(
                    io,
                    check_ws_request,
                    Some(config),
                )
                .await
                .map_err(|e| format!("WebSocket handshake: {e}"))?;
                Ok(Transport::WebSocket(Box::new(ws)))
            }
        }
    };
    let transport = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(t)) => t,
        Ok(Err(reason)) => {
            LiveCounters::inc(&core.counters.handshake_failures);
            info!(%peer, transport = %kind, %reason, "connection closed");
            return;
        }
        Err(_) => {
            LiveCounters::inc(&core.counters.handshake_failures);
            info!(%peer, transport = %kind, reason = "handshake timed out", "connection closed");
            return;
        }
    };
    session::run(core, transport, peer, kind).await;
}

/// Accepts only `/mqtt` and answers the `mqtt` subprotocol, as ThingSpeak does.
#[allow(clippy::result_large_err)] // the signature is tungstenite's callback type
fn check_ws_request(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() != WS_PATH {
        return Err(error_response(
            StatusCode::NOT_FOUND,
            format!("MQTT over WebSocket is served at {WS_PATH}"),
        ));
    }
    let offered: Vec<String> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_ascii_lowercase()))
        .collect();
    if offered.iter().any(|p| p == WS_SUBPROTOCOL) {
        resp.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(WS_SUBPROTOCOL),
        );
    } else if !offered.is_empty() {
        return Err(error_response(
            StatusCode::BAD_REQUEST,
            format!("subprotocol {WS_SUBPROTOCOL:?} required"),
        ));
    }
    Ok(resp)
}

fn error_response(status: StatusCode, message: String) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(message));
    *r.status_mut() = status;
    r
}

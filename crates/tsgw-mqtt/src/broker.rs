//! The embedded rumqttd broker, bound to private loopback ports only.
//!
//! Devices never reach these ports directly: `front` owns the public sockets.
//! rumqttd runs its router on its own thread and each server on a
//! current-thread runtime of its own, as rumqttd itself does.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use tracing::error;

use crate::config::MqttSourceConfig;
use crate::MqttSourceError;

/// rumqttd's private listeners and the gateway's own link into its router.
pub struct Embedded {
    pub tcp_backend: SocketAddr,
    pub ws_backend: Option<SocketAddr>,
    pub link_tx: LinkTx,
    pub link_rx: LinkRx,
}

/// In-memory log of the ingest subscription: rumqttd keeps at most
/// SEGMENT_SIZE × SEGMENT_COUNT bytes of publishes the gateway has not read yet.
const SEGMENT_SIZE: usize = 1024 * 1024;
const SEGMENT_COUNT: usize = 8;

/// How much longer than the fronts rumqttd waits for a CONNECT.
const RUMQTTD_CONNECT_BACKSTOP_MS: u16 = 1000;

/// The client id of the gateway's own link into the router.
pub const INGEST_CLIENT_ID: &str = "tsgw-ingest";

pub async fn start(config: &MqttSourceConfig) -> Result<Embedded, MqttSourceError> {
    let router_config = RouterConfig {
        // Room for the ingest link on top of the devices.
        max_connections: config.max_connections + 4,
        max_outgoing_packet_count: 200,
        max_segment_size: SEGMENT_SIZE,
        max_segment_count: SEGMENT_COUNT,
        ..RouterConfig::default()
    };
    let router_tx = Router::new(0, router_config).spawn();

    let connections = ConnectionSettings {
        // The fronts enforce connect_timeout_ms and count what they drop;
        // rumqttd's timer is only a backstop, a second later so that it never
        // wins the race and drops a device uncounted.
        connection_timeout_ms: config
            .connect_timeout_ms
            .saturating_add(RUMQTTD_CONNECT_BACKSTOP_MS),
        max_payload_size: config.max_payload_bytes,
        max_inflight_count: 100,
        auth: if config.users.is_empty() {
            None
        } else {
            Some(
                config
                    .users
                    .iter()
                    .map(|(user, pass)| (user.clone(), pass.expose().to_owned()))
                    .collect::<HashMap<_, _>>(),
            )
        },
        external_auth: None,
        dynamic_filters: false,
    };

    let tcp_backend = free_loopback_addr()?;
    let tcp_server = Server::new(
        server_settings("tsgw-mqtt-tcp", tcp_backend, connections.clone()),
        router_tx.clone(),
        V4,
    );
    spawn_server(tcp_server, "tsgw-mqtt-tcp", LinkType::Remote)?;
    let ws_backend = match config.websocket_listen {
        None => None,
        Some(_) => {
            let addr = free_loopback_addr()?;
            let ws_server = Server::new(
                server_settings("tsgw-mqtt-ws", addr, connections),
                router_tx.clone(),
                V4,
            );
            spawn_server(ws_server, "tsgw-mqtt-ws", LinkType::Websocket)?;
            Some(addr)
        }
    };

    let link_router = router_tx.clone();
    let (mut link_tx, link_rx) = tokio::task::spawn_blocking(move || {
        rumqttd::local::LinkBuilder::new(INGEST_CLIENT_ID, link_router)
            .build()
            .map(|(tx, rx, _ack)| (tx, rx))
            // LinkError is large; keep only its message.
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| MqttSourceError::Broker(format!("ingest link task: {e}")))?
    .map_err(|e| MqttSourceError::Broker(format!("ingest link: {e}")))?;
    link_tx
        .subscribe("#")
        .map_err(|e| MqttSourceError::Broker(format!("ingest subscription: {e}")))?;

    wait_until_listening(tcp_backend).await?;
    if let Some(ws) = ws_backend {
        wait_until_listening(ws).await?;
    }
    Ok(Embedded {
        tcp_backend,
        ws_backend,
        link_tx,
        link_rx,
    })
}

/// A loopback port the OS says is free now. rumqttd cannot bind port 0 and
/// tell us the result, so we ask first; `wait_until_listening` catches the
/// rare case of losing the port in between.
fn free_loopback_addr() -> Result<SocketAddr, MqttSourceError> {
    let probe = StdListener::bind("127.0.0.1:0")
        .map_err(|e| MqttSourceError::Broker(format!("no free loopback port: {e}")))?;
    probe
        .local_addr()
        .map_err(|e| MqttSourceError::Broker(format!("no free loopback port: {e}")))
}

fn server_settings(
    name: &str,
    listen: SocketAddr,
    connections: ConnectionSettings,
) -> ServerSettings {
    ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    }
}

/// Runs one rumqttd server on its own thread and current-thread runtime.
fn spawn_server(
    mut server: Server<V4>,
    name: &'static str,
    link_type: LinkType,
) -> Result<(), MqttSourceError> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!(server = name, error = %e, "cannot start embedded broker runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                if let Err(e) = server.start(link_type).await {
                    error!(server = name, error = %e, "embedded broker listener stopped");
                }
            });
        })
        .map_err(|e| MqttSourceError::Broker(format!("cannot spawn {name}: {e}")))?;
    Ok(())
}

async fn wait_until_listening(addr: SocketAddr) -> Result<(), MqttSourceError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(MqttSourceError::Broker(format!(
                    "embedded broker did not start listening on {addr}: {e}"
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

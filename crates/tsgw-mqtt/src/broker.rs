//! The embedded rumqttd broker, bound to a private loopback port only.
//!
//! Devices never reach this port directly: `front` owns the public sockets,
//! authenticates, and takes every publish's readings itself. rumqttd is left
//! what it does well: sessions, local fan-out between devices, retained
//! messages. It runs its router on its own thread and its server on a
//! current-thread runtime of its own, as rumqttd itself does.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::{Duration, Instant};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::{
    ConnectionSettings, LinkType, Notification, Router, RouterConfig, Server, ServerSettings,
};
use tracing::error;

use crate::config::MqttSourceConfig;
use crate::MqttSourceError;

/// rumqttd's private listener and the gateway's link that keeps every topic routable.
pub struct Embedded {
    pub backend: SocketAddr,
    /// The sink's sending half (dropping it would unsubscribe the sink), also
    /// how the gateway publishes to local subscribers itself.
    pub publisher: LocalPublisher,
}

/// Publishes to local subscribers from inside the gateway (downlink rules),
/// through the sink link: QoS 0, not retained, as rumqttd's local links do.
/// Its topics always match a filter (the sink's `#`). Cheap to clone.
#[derive(Clone)]
pub struct LocalPublisher {
    link: std::sync::Arc<std::sync::Mutex<LinkTx>>,
}

impl LocalPublisher {
    /// Hands the publish to rumqttd's router without waiting; an error says
    /// why it was not taken (the router's queue full, or it stopped).
    pub fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        let mut link = self.link.lock().unwrap_or_else(|e| e.into_inner());
        link.try_publish(topic.to_owned(), payload)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// rumqttd keeps, per subscribed filter, an in-memory log of at most
/// SEGMENT_SIZE × SEGMENT_COUNT bytes (1 MiB) of publishes. It is only the
/// local fan-out's buffer: readings never pass through it (the front queues
/// them), so a local subscriber that falls this far behind misses relayed
/// messages, as a slow QoS 0 subscriber of mosquitto would.
const SEGMENT_SIZE: usize = 256 * 1024;
const SEGMENT_COUNT: usize = 4;

/// How much longer than the fronts rumqttd waits for a CONNECT.
const RUMQTTD_CONNECT_BACKSTOP_MS: u16 = 1000;

/// The client id of the gateway's own link into the router. It subscribes to
/// `#` and discards what it gets: with `dynamic_filters = false` rumqttd
/// disconnects a client that publishes to a topic no filter matches, and
/// dynamic filters would give every new topic a log of its own (memory
/// without bound). It must read: rumqttd queues forwards for a local link
/// without bound (a link that never read grew to 2.3 GB in a 1M burst).
pub const SINK_CLIENT_ID: &str = "tsgw-sink";

pub async fn start(config: &MqttSourceConfig) -> Result<Embedded, MqttSourceError> {
    let router_config = RouterConfig {
        // Room for the sink link on top of the devices.
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
        // The front authenticates; rumqttd only ever sees loopback connections from it.
        auth: None,
        external_auth: None,
        dynamic_filters: false,
    };

    let backend = free_loopback_addr()?;
    let server = Server::new(
        server_settings("tsgw-mqtt-tcp", backend, connections),
        router_tx.clone(),
        V4,
    );
    spawn_server(server, "tsgw-mqtt-tcp", LinkType::Remote)?;

    let link_router = router_tx.clone();
    let (mut sink_tx, sink_rx) = tokio::task::spawn_blocking(move || {
        rumqttd::local::LinkBuilder::new(SINK_CLIENT_ID, link_router)
            .build()
            .map(|(tx, rx, _ack)| (tx, rx))
            // LinkError is large; keep only its message.
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| MqttSourceError::Broker(format!("sink link task: {e}")))?
    .map_err(|e| MqttSourceError::Broker(format!("sink link: {e}")))?;
    sink_tx
        .subscribe("#")
        .map_err(|e| MqttSourceError::Broker(format!("sink subscription: {e}")))?;

    tokio::spawn(discard(sink_rx));
    wait_until_listening(backend).await?;
    Ok(Embedded {
        backend,
        publisher: LocalPublisher {
            link: std::sync::Arc::new(std::sync::Mutex::new(sink_tx)),
        },
    })
}

/// Reads and drops everything the router forwards to the sink link. The router
/// pauses a link after a burst of forwards until it says it is ready again
/// (`Unschedule`); without the wake-up, forwards would pile up unread.
async fn discard(mut sink: LinkRx) {
    loop {
        match sink.next().await {
            Ok(Some(Notification::Unschedule)) => {
                if sink.wake().await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                error!(error = %e, "embedded broker router is gone");
                return;
            }
        }
    }
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

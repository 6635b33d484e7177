//! The MQTT source: local devices publish to an embedded broker, and every
//! publish becomes readings for the durable queue.
//!
//! ```text
//! device ──► front (public socket, TLS/WebSocket, auth, ACL, flow control) ──► mpsc<IngestBatch> ──► queue writer
//!              │  ▲ PUBACK once the readings are fsynced
//!              ▼  │
//!            rumqttd (loopback): sessions, local fan-out, retained messages
//! ```
//! Two ways in: ThingSpeak's own topics (drop-in, for devices already written
//! for ThingSpeak) and configured rules (topic filter + payload parser).

pub mod acl;
pub mod auth;
mod broker;
pub mod config;
pub mod dropin;
pub mod filter;
mod front;
mod ingest;
pub mod rules;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use thingspeak::ChannelId;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tsgw_core::{FeedSource, IngestBatch, Metrics};

use auth::{AccountError, Accounts};
pub use broker::LocalPublisher;
pub use config::{
    AccountConfig, AclConfig, BrokerTlsConfig, DropInConfig, MqttSourceConfig, RuleConfig,
    UserConfig,
};
use front::{Context, Front, Handshake};
use ingest::{Ingest, Mapping};
use rules::{RuleError, Rules};

#[derive(Debug, thiserror::Error)]
pub enum MqttSourceError {
    #[error("cannot listen on {addr} (mqtt.{key}): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("mqtt.tls: {0}")]
    Tls(String),
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error(transparent)]
    Account(#[from] AccountError),
    #[error("mqtt: {0}")]
    Invalid(String),
    #[error("embedded broker: {0}")]
    Broker(String),
}

/// Checks a config without binding anything.
pub fn validate(config: &MqttSourceConfig) -> Result<(), MqttSourceError> {
    Rules::compile(&config.rules)?;
    Accounts::compile(config)?;
    if config.max_payload_bytes == 0 {
        return Err(MqttSourceError::Invalid(
            "max_payload_bytes must be above 0".into(),
        ));
    }
    if config.max_connections == 0 {
        return Err(MqttSourceError::Invalid(
            "max_connections must be above 0".into(),
        ));
    }
    if config.listen.is_none() && config.tls.is_none() && config.websocket_listen.is_none() {
        return Err(MqttSourceError::Invalid(
            "no listener: set at least one of listen, tls.listen, websocket_listen".into(),
        ));
    }
    if let Some(tls) = &config.tls {
        front::tls_acceptor(&tls.cert_file, &tls.key_file).map_err(MqttSourceError::Tls)?;
    }
    Ok(())
}

/// Where the running source listens (useful with port 0).
#[derive(Debug, Clone, Copy, Default)]
pub struct ListenAddrs {
    pub plain: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub websocket: Option<SocketAddr>,
}

/// A running MQTT source.
pub struct MqttSource {
    addrs: ListenAddrs,
    mapping: watch::Sender<Arc<Mapping>>,
    /// rumqttd's router and the gateway's link into it live as long as this.
    _broker: broker::Embedded,
}

impl MqttSource {
    /// Binds the listeners, starts the embedded broker and the fronts.
    /// Fails (with the config key and address) if a port is taken.
    ///
    /// `upstream_channels` are the channels the upstream config names: with
    /// `mqtt.drop_in.channels` empty, drop-in publishes may write only those.
    pub async fn start(
        config: &MqttSourceConfig,
        upstream_channels: &BTreeSet<ChannelId>,
        intake: mpsc::Sender<IngestBatch>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<Self, MqttSourceError> {
        Self::start_with_feeds(config, upstream_channels, intake, None, metrics, shutdown).await
    }

    /// [`MqttSource::start`], with ThingSpeak's channel feeds served to local
    /// subscribers of `channels/<id>/subscribe...` from `feeds` (drop-in
    /// subscribe). Without it those subscriptions are refused (SUBACK 0x80).
    pub async fn start_with_feeds(
        config: &MqttSourceConfig,
        upstream_channels: &BTreeSet<ChannelId>,
        intake: mpsc::Sender<IngestBatch>,
        feeds: Option<Arc<dyn FeedSource>>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<Self, MqttSourceError> {
        validate(config)?;
        // Bind the public sockets first: a taken port fails startup before
        // anything else was started.
        let plain = bind(config.listen, "listen").await?;
        let tls = match &config.tls {
            Some(t) => bind(Some(t.listen), "tls.listen").await?.map(|l| (l, t)),
            None => None,
        };
        let ws = bind(config.websocket_listen, "websocket_listen").await?;

        let embedded = broker::start(config).await?;
        let nofile = open_file_limit();
        let slot_count = connection_slots(config.max_connections, nofile);
        if slot_count < config.max_connections {
            warn!(
                max_connections = config.max_connections,
                open_file_limit = nofile,
                accepted = slot_count,
                "mqtt.max_connections does not fit the open-file limit (3 per device); \
                 accepting fewer devices: raise the limit (LimitNOFILE) or lower max_connections"
            );
        }
        let slots = Arc::new(Semaphore::new(slot_count));
        let (mapping_tx, mapping_rx) =
            watch::channel(Arc::new(compile_mapping(config, upstream_channels)?));
        let context = Arc::new(Context {
            backend: embedded.backend,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms.into()),
            max_packet_bytes: config.max_payload_bytes,
            mapping: mapping_rx,
            ingest: Arc::new(Ingest::new(metrics.clone())),
            intake,
            subscriptions: Default::default(),
            feeds,
        });
        let mut addrs = ListenAddrs::default();
        let mut fronts = Vec::new();
        if let Some(listener) = plain {
            fronts.push(Front {
                name: "mqtt",
                listener,
                handshake: Handshake::None,
                context: context.clone(),
            });
        }
        if let Some((listener, tls_config)) = tls {
            let acceptor = front::tls_acceptor(&tls_config.cert_file, &tls_config.key_file)
                .map_err(MqttSourceError::Tls)?;
            fronts.push(Front {
                name: "mqtts",
                listener,
                handshake: Handshake::Tls {
                    acceptor,
                    timeout: Duration::from_millis(tls_config.handshake_timeout_ms),
                },
                context: context.clone(),
            });
        }
        if let Some(listener) = ws {
            fronts.push(Front {
                name: "mqtt-ws",
                listener,
                handshake: Handshake::WebSocket {
                    timeout: Duration::from_millis(config.connect_timeout_ms.into()),
                },
                context: context.clone(),
            });
        }
        for front in fronts {
            let addr = front.local_addr().ok();
            match front.name {
                "mqtt" => addrs.plain = addr,
                "mqtts" => addrs.tls = addr,
                _ => addrs.websocket = addr,
            }
            if let Some(addr) = addr {
                info!(listener = front.name, %addr, "local MQTT listener ready");
                if !addr.ip().is_loopback() && !config.allow_anonymous {
                    info!(listener = front.name, %addr, "clients without an account are refused on this listener (mqtt.allow_anonymous = false)");
                }
            }
            tokio::spawn(front.run(slots.clone(), metrics.clone(), shutdown.clone()));
        }
        Ok(Self {
            addrs,
            mapping: mapping_tx,
            _broker: embedded,
        })
    }

    /// Publishes to local subscribers from inside the gateway (downlink).
    pub fn local_publisher(&self) -> LocalPublisher {
        self._broker.publisher.clone()
    }

    pub fn addrs(&self) -> ListenAddrs {
        self.addrs
    }

    /// Applies new rules, accounts and drop-in settings to new publishes and
    /// connections. Listener changes need a restart.
    pub fn reload_mapping(
        &self,
        config: &MqttSourceConfig,
        upstream_channels: &BTreeSet<ChannelId>,
    ) -> Result<(), MqttSourceError> {
        validate(config)?;
        self.mapping
            .send_replace(Arc::new(compile_mapping(config, upstream_channels)?));
        Ok(())
    }
}

fn compile_mapping(
    config: &MqttSourceConfig,
    upstream_channels: &BTreeSet<ChannelId>,
) -> Result<Mapping, MqttSourceError> {
    let drop_in_channels = if config.drop_in.channels.is_empty() {
        upstream_channels.clone()
    } else {
        config.drop_in.channels.iter().copied().collect()
    };
    Ok(Mapping {
        rules: Rules::compile(&config.rules)?,
        drop_in: config.drop_in.clone(),
        drop_in_channels,
        accounts: Accounts::compile(config)?,
    })
}

/// Descriptors one device connection holds in this process: its socket, the
/// front's connection to rumqttd and rumqttd's end of it.
const FDS_PER_CONNECTION: u64 = 3;
/// Descriptors left for everything else: queue files, the upstream connection,
/// serial ports, the metrics endpoint, connections being refused.
const FD_RESERVE: u64 = 128;

/// `max_connections`, lowered to what the open-file limit `nofile` can hold.
/// Past that limit accept fails with EMFILE: devices would wait for a
/// connection that rumqttd cannot accept (its accept loop then spins on the
/// error at a full core), and the queue, upstream and serial ports could not
/// open files either.
fn connection_slots(max_connections: usize, nofile: Option<u64>) -> usize {
    let Some(nofile) = nofile else {
        return max_connections;
    };
    let fit = nofile.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION;
    max_connections
        .min(usize::try_from(fit).unwrap_or(usize::MAX))
        .max(1)
}

/// The soft RLIMIT_NOFILE, or None if unlimited or unknown.
#[cfg(unix)]
// rlim_t is u32 on 32-bit ARM (armv7 gnueabihf), u64 elsewhere.
#[allow(clippy::useless_conversion)]
fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(u64::from(limit.rlim_cur))
}

#[cfg(not(unix))]
fn open_file_limit() -> Option<u64> {
    None
}

/// Binds `addr` if the key is set.
async fn bind(
    addr: Option<SocketAddr>,
    key: &'static str,
) -> Result<Option<TcpListener>, MqttSourceError> {
    match addr {
        None => Ok(None),
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|source| MqttSourceError::Bind { key, addr, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_fit_the_open_file_limit() {
        // The systemd unit's LimitNOFILE=8192 holds the default 1000 devices.
        assert_eq!(connection_slots(1000, Some(8192)), 1000);
        // A shell's 1024: (1024 - 128) / 3.
        assert_eq!(connection_slots(1000, Some(1024)), 298);
        assert_eq!(connection_slots(1000, None), 1000);
        // Even an absurd limit leaves one slot rather than none.
        assert_eq!(connection_slots(1000, Some(10)), 1);
    }

    #[test]
    fn the_open_file_limit_is_read() {
        let limit = open_file_limit().expect("RLIMIT_NOFILE is finite on Linux");
        assert!(limit >= 64, "{limit}");
    }
}

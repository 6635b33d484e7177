//! The MQTT source: local devices publish to an embedded broker, and every
//! publish becomes readings for the durable queue.
//!
//! ```text
//! device ──► front (public socket, TLS, counting) ──► rumqttd (loopback) ──► ingest ──► mpsc<Reading>
//! ```
//! Two ways in: ThingSpeak's own topics (drop-in, for devices already written
//! for ThingSpeak) and configured rules (topic filter + payload parser).

mod broker;
pub mod config;
pub mod dropin;
pub mod filter;
mod front;
mod ingest;
pub mod rules;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::info;
use tsgw_core::{Metrics, Reading};

pub use config::{BrokerTlsConfig, DropInConfig, MqttSourceConfig, RuleConfig};
use front::{Front, Handshake};
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
    #[error("mqtt: {0}")]
    Invalid(String),
    #[error("embedded broker: {0}")]
    Broker(String),
}

/// Checks a config without binding anything.
pub fn validate(config: &MqttSourceConfig) -> Result<(), MqttSourceError> {
    Rules::compile(&config.rules)?;
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
}

impl MqttSource {
    /// Binds the listeners, starts the embedded broker and the ingest task.
    /// Fails (with the config key and address) if a port is taken.
    pub async fn start(
        config: &MqttSourceConfig,
        readings: mpsc::Sender<Reading>,
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
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms.into());
        let mut addrs = ListenAddrs::default();
        let mut fronts = Vec::new();
        if let Some(listener) = plain {
            fronts.push(Front {
                name: "mqtt",
                listener,
                backend: embedded.tcp_backend,
                handshake: Handshake::None,
                connect_timeout,
            });
        }
        if let Some((listener, tls_config)) = tls {
            let acceptor = front::tls_acceptor(&tls_config.cert_file, &tls_config.key_file)
                .map_err(MqttSourceError::Tls)?;
            fronts.push(Front {
                name: "mqtts",
                listener,
                backend: embedded.tcp_backend,
                handshake: Handshake::Tls {
                    acceptor,
                    timeout: Duration::from_millis(tls_config.handshake_timeout_ms),
                },
                connect_timeout,
            });
        }
        if let (Some(listener), Some(backend)) = (ws, embedded.ws_backend) {
            fronts.push(Front {
                name: "mqtt-ws",
                listener,
                backend,
                handshake: Handshake::None,
                connect_timeout,
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
            }
            tokio::spawn(front.run(slots.clone(), metrics.clone(), shutdown.clone()));
        }

        let (mapping_tx, mapping_rx) = watch::channel(Arc::new(Mapping {
            rules: Rules::compile(&config.rules)?,
            drop_in: config.drop_in.clone(),
        }));
        // Keep the transmit half alive: dropping it would unsubscribe the ingest link.
        let link_tx = embedded.link_tx;
        let ingest = Ingest::new(embedded.link_rx, mapping_rx, readings, metrics);
        tokio::spawn(async move {
            ingest.run(shutdown).await;
            drop(link_tx);
        });
        Ok(Self {
            addrs,
            mapping: mapping_tx,
        })
    }

    pub fn addrs(&self) -> ListenAddrs {
        self.addrs
    }

    /// Applies new rules and drop-in settings. Listener changes need a restart.
    pub fn reload_mapping(&self, config: &MqttSourceConfig) -> Result<(), MqttSourceError> {
        let mapping = Mapping {
            rules: Rules::compile(&config.rules)?,
            drop_in: config.drop_in.clone(),
        };
        self.mapping.send_replace(Arc::new(mapping));
        Ok(())
    }
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

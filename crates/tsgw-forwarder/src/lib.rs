//! The forwarder: the only code that talks to ThingSpeak.
//!
//! It reads queued readings through [`tsgw_core::ReadingStore`], merges the
//! readings of each channel into one update at most once per interval,
//! publishes it over MQTT (TLS by default) and removes the readings from the
//! store only once the update was written to the connection.
//!
//! Public API: [`UpstreamConfig`] (+ [`Transport`], [`ChannelOverride`]),
//! [`run`], [`ForwarderError`].
//!
//! ```toml
//! [upstream]                     # every key optional except the credentials
//! host = "mqtt3.thingspeak.com"
//! transport = "tls"              # tls (8883) | wss (443) | tcp (1883) | ws (80)
//! # port = 8883
//! # ca_file = "/etc/tsgw/extra-ca.pem"   # trusted in addition to the system roots
//! client_id = "..."              # the MQTT device made in the ThingSpeak UI
//! username = "..."
//! password = "..."
//! update_interval_secs = 15      # free licence; 1 on paid licences
//! [upstream.channels.1234567]
//! update_interval_secs = 1
//! ```
//!
//! Behaviour worth knowing:
//! - At most one update per channel per interval (plus 100 ms margin), also
//!   across reconnects. A channel's first update after start waits one
//!   interval, in case the previous run updated it just before stopping.
//! - All readings of a channel waiting in the store become one update: the
//!   last value of each target, `created_at` = newest measurement (seconds,
//!   strictly increasing per channel).
//! - Readings leave the store only after their update was written to the
//!   connection. If the connection drops first, they are sent after reconnect.
//! - A connection without a PUBLISH for 50 minutes is replaced before the
//!   next update: ThingSpeak closes it at 60 without warning, and a publish
//!   racing that close would vanish.
//! - Reconnects back off exponentially with jitter; a refused CONNECT
//!   (bad credentials, not authorised) is logged once at error level and
//!   retried at the maximum backoff.
//!
//! Modules: `config` (settings), `connection` (rumqttc options, TLS trust),
//! `driver` (one connection's event loop), `batch` (readings → update, pure),
//! `schedule` (per-channel interval bookkeeping, pure), `backoff` (reconnect
//! delays, pure), `forwarder` (the loop tying them together).

mod backoff;
mod batch;
mod config;
mod connection;
mod driver;
mod error;
mod forwarder;
mod rest;
mod schedule;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tsgw_core::{Metrics, ReadingStore};

pub use batch::Aggregate;
pub use config::{Backfill, ChannelOverride, Transport, UpstreamConfig};
pub use error::ForwarderError;

/// Runs the forwarder until `shutdown` is cancelled.
///
/// Returns an error only for problems retrying cannot fix: invalid config or
/// unusable TLS trust. Connection loss, refused connects and store failures
/// are logged, counted and retried.
pub async fn run(
    config: UpstreamConfig,
    store: Arc<dyn ReadingStore>,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), ForwarderError> {
    config.validate()?;
    connection::install_crypto_provider();
    let tls = if config.transport.is_encrypted() {
        Some(connection::tls_config(&config)?)
    } else {
        tracing::warn!(
            transport = config.transport.as_str(),
            host = %config.host,
            "upstream transport is unencrypted as configured: the MQTT password and data \
             travel in clear text"
        );
        None
    };
    if config.update_interval_secs < 1.0 {
        tracing::warn!(
            update_interval_secs = config.update_interval_secs,
            "update interval is below ThingSpeak's 1 s minimum (paid licence); faster updates are dropped"
        );
    }
    let bulk = bulk_client(&config, tls.as_ref())?;
    forwarder::Forwarder::new(config, tls, bulk, store, metrics)
        .run(shutdown)
        .await
}

/// The REST client for bulk backfill, when the policy and the keys call for it.
fn bulk_client(
    config: &UpstreamConfig,
    mqtt_tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Option<rest::BulkClient>, ForwarderError> {
    let any_key = config.channels.values().any(|c| c.write_key.is_some());
    if config.backfill != Backfill::Bulk || !any_key {
        return Ok(None);
    }
    let tls = if config.rest_tls {
        Some(match mqtt_tls {
            Some(t) => t.clone(),
            None => connection::tls_config(config)?,
        })
    } else {
        tracing::warn!(
            rest_host = %config.rest_host,
            "REST backfill over plain HTTP as configured: write API keys travel in clear text"
        );
        None
    };
    Ok(Some(rest::BulkClient::new(
        config.rest_host.clone(),
        config.rest_port(),
        tls,
    )))
}

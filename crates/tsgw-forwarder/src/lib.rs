//! The forwarder: the only code that talks to ThingSpeak.
//!
//! It reads queued readings through [`tsgw_core::ReadingStore`], groups each
//! channel's readings into rate-limit windows by measurement time, aggregates
//! each target per policy into one update per window (`created_at` = window
//! start), sends it over MQTT (TLS by default) or, for a backlog, through the
//! REST bulk-write call, and removes the readings once the update counts as
//! delivered: echoed back by ThingSpeak (`confirm = true`, default) or written
//! to the connection (`confirm = false`). README.md states the guarantees.
//!
//! Public API: [`UpstreamConfig`] (+ [`Transport`], [`ChannelOverride`],
//! [`Backfill`], [`Aggregate`]), [`run`], [`run_with_feeds`] and [`FeedHub`]
//! (channel feeds for local subscribers), [`ForwarderError`].
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
//! aggregate = { field1 = "mean" }  # last (default) | first | mean | min | max | sum | count
//! confirm = true                 # delivered = echoed back on channels/<id>/subscribe
//! confirm_timeout_secs = 10
//! read_api = true                # feeds.json answers whether an update in doubt was stored
//! idle_timeout_secs = 3600       # broker's idle limit; renewed at 5/6 of it
//! backfill = "bulk"              # bulk | mqtt | newest
//! downsample_after = 60          # mqtt: merge windows when more wait
//! rest_host = "api.thingspeak.com"
//! bulk_interval_secs = 15
//! bulk_max_updates = 960
//! auth = "device"                # device | legacy (write key in the topic)
//! field_topics = false           # single-field updates to .../fields/field<n> (confirm = false only)
//! [[upstream.connections]]       # more credential sets, one connection each
//! client_id = "..."
//! username = "..."
//! password = "..."
//! channels = [2345678]
//! [upstream.channels."1234567"]
//! update_interval_secs = 1
//! aggregate = { field2 = "max" }
//! write_key = "..."              # for bulk backfill and legacy auth
//! read_key = "..."               # feeds.json for updates in doubt; legacy auth: confirmation subscription
//! ```
//!
//! Modules: `config` (settings), `connection` (rumqttc options, TLS trust),
//! `driver` (one connection's event loop), `batch` (windows and aggregation,
//! pure), `schedule` (per-channel interval bookkeeping, pure), `backoff`
//! (reconnect delays, pure), `rest` (bulk-write HTTP client), `progress`
//! (backlog gauges and the periodic backfill progress line), `subset` (a store
//! view per connection), `forwarder` (the loop and the per-channel delivery
//! state machine, in `link`, `send`, `confirm` and `backfill` parts).

mod backoff;
mod batch;
mod config;
mod connection;
mod driver;
mod error;
mod feeds;
mod forwarder;
mod progress;
mod rest;
mod schedule;
mod subset;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tsgw_core::{Metrics, ReadingStore};

pub use batch::Aggregate;
pub use config::{Auth, Backfill, ChannelOverride, ConnectionConfig, Transport, UpstreamConfig};
pub use error::ForwarderError;
pub use feeds::{FeedHub, FeedStatus, SUBACK_WAIT};

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
    let feeds = FeedHub::new(&config, &metrics);
    run_with_feeds(config, store, metrics, feeds, shutdown).await
}

/// [`run`], also serving `feeds` (made by [`FeedHub::new`] from the same
/// config) on the connections: drop-in subscribers and downlink rules get
/// ThingSpeak's channel feeds through it.
pub async fn run_with_feeds(
    config: UpstreamConfig,
    store: Arc<dyn ReadingStore>,
    metrics: Metrics,
    feeds: FeedHub,
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
    if config.connections.is_empty() {
        let name = config.connection_name();
        let mut f = forwarder::Forwarder::new(config, name, tls, bulk, store, metrics);
        if let Some(port) = feeds.port(0) {
            f = f.with_feeds(port);
        }
        return f.run(shutdown).await;
    }

    // One forwarder per credential set, each seeing only its channels.
    let mut parts: Vec<(Option<usize>, subset::Selection)> = config
        .connections
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                Some(i),
                subset::Selection::Only(c.channels.iter().copied().collect()),
            )
        })
        .collect();
    if config.has_primary() {
        parts.push((None, subset::Selection::AllBut(config.listed_channels())));
    } else {
        tracing::info!(
            "no top-level upstream credentials: readings of channels not listed in \
             [[upstream.connections]] stay queued"
        );
    }
    // Cancelled by the caller, or here when one forwarder fails fatally.
    let stop = shutdown.child_token();
    let mut views = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, selection) in parts {
        let cfg = config.for_connection(index);
        let name = match index {
            None => cfg.connection_name(),
            Some(_) => format!("{}/{}", cfg.connection_name(), cfg.client_id),
        };
        let view = Arc::new(subset::StoreSubset::new(store.clone(), selection));
        views.push(view.pushed());
        let mut f =
            forwarder::Forwarder::new(cfg, name, tls.clone(), bulk.clone(), view, metrics.clone());
        // Slots: the listed connections in order, then the top-level credentials.
        let slot = index.unwrap_or(config.connections.len());
        if let Some(port) = feeds.port(slot) {
            f = f.with_feeds(port);
        }
        tasks.spawn(f.run(stop.clone()));
    }
    let relay = tokio::spawn(subset::relay_pushes(store, views, stop.clone()));
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // Fatal for one is fatal for all (config or TLS trust).
                stop.cancel();
                if result.is_ok() {
                    result = Err(e);
                }
            }
            Err(e) => tracing::error!(error = %e, "a forwarder task failed"),
        }
    }
    relay.abort();
    result
}

/// The REST client for bulk backfill and feed reads, when the policy, the
/// keys or `read_api` call for it.
fn bulk_client(
    config: &UpstreamConfig,
    mqtt_tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Option<rest::BulkClient>, ForwarderError> {
    let any_key = config.channels.values().any(|c| c.write_key.is_some());
    let bulk = config.backfill == Backfill::Bulk && any_key;
    if !bulk && !config.read_api {
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
            "REST calls over plain HTTP as configured: API keys travel in clear text"
        );
        None
    };
    Ok(Some(rest::BulkClient::new(
        config.rest_host.clone(),
        config.rest_port(),
        tls,
    )))
}

//! Fixtures shared by the tsgw-mqtt integration tests.
#![allow(dead_code)] // each test binary uses part of it

use std::collections::BTreeSet;
use std::sync::Arc;

use thingspeak::ChannelId;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tsgw_core::{IngestBatch, Metrics, Reading};
use tsgw_mqtt::{BrokerTlsConfig, MqttSource, MqttSourceConfig, MqttSourceError};

/// The channels the (absent) upstream config would name: drop-in publishes
/// to these are accepted, to any other refused.
pub fn upstream_channels() -> BTreeSet<ChannelId> {
    [5, 7, 9, 42].map(|id| ChannelId::new(id).unwrap()).into()
}

/// Starts the source with a stand-in for the queue writer: readings come out
/// of the returned channel one by one, and every ack is resolved at once, as
/// if the fsync were instant.
pub async fn start_source(
    cfg: &MqttSourceConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(MqttSource, mpsc::Receiver<Reading>), MqttSourceError> {
    let (batches, mut batch_rx) = mpsc::channel::<IngestBatch>(32);
    let (readings, reading_rx) = mpsc::channel(100_000);
    let source = MqttSource::start(cfg, &upstream_channels(), batches, metrics, shutdown).await?;
    tokio::spawn(async move {
        while let Some(batch) = batch_rx.recv().await {
            for reading in batch.readings {
                if readings.send(reading).await.is_err() {
                    return;
                }
            }
            if let Some(ack) = batch.durable {
                ack.resolve(true);
            }
        }
    });
    Ok((source, reading_rx))
}

/// A self-signed server certificate for localhost, as PEM files, plus a client config trusting it.
pub fn tls_fixture(dir: &tempfile::TempDir) -> (BrokerTlsConfig, Arc<rustls::ClientConfig>) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_file = dir.path().join("broker.crt");
    let key_file = dir.path().join("broker.key");
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.key_pair.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    (
        BrokerTlsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert_file,
            key_file,
            handshake_timeout_ms: 500,
        },
        Arc::new(client),
    )
}

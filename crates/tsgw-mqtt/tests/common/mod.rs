//! Fixtures shared by the tsgw-mqtt integration tests.

use std::sync::Arc;

use tsgw_mqtt::BrokerTlsConfig;

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

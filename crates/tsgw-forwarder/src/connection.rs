//! Builds rumqttc's connection options from the config: ThingSpeak's CONNECT
//! rules (clean session, no Will), credentials, the transport and TLS trust.

use std::io::BufReader;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use thingspeak::limits::MAX_MESSAGE_BYTES;

use crate::config::{Auth, Transport, UpstreamConfig};
use crate::error::ForwarderError;

/// Requests rumqttc may buffer. Kept tiny on purpose: with clean session it
/// discards whatever it holds when a connection drops, so the store (not
/// rumqttc) must hold everything not yet written.
pub const REQUEST_CHANNEL_CAPACITY: usize = 10;

/// Time allowed for TCP connect, TLS/WebSocket handshakes and the CONNACK,
/// and for each network flush.
pub const CONNECT_TIMEOUT_SECS: u64 = 15;

/// Installs ring as the process-wide rustls provider. Another component may
/// have installed it first: that is fine, so the error is ignored.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS client config: the system's roots plus the optional extra CA file.
/// No pinning: ThingSpeak's certificate has changed over time.
pub fn tls_config(config: &UpstreamConfig) -> Result<Arc<ClientConfig>, ForwarderError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::warn!(error = %err, "could not load some system CA certificates");
    }
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);

    let mut extra = 0;
    if let Some(path) = &config.ca_file {
        let file = std::fs::File::open(path).map_err(|e| ForwarderError::Config {
            key: "upstream.ca_file".into(),
            message: format!("cannot open {}: {e}", path.display()),
        })?;
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut BufReader::new(file))
            .collect::<Result<_, _>>()
            .map_err(|e| ForwarderError::Config {
                key: "upstream.ca_file".into(),
                message: format!("{} is not a PEM certificate file: {e}", path.display()),
            })?;
        for cert in certs {
            roots.add(cert).map_err(|e| ForwarderError::Config {
                key: "upstream.ca_file".into(),
                message: format!("{}: unusable CA certificate: {e}", path.display()),
            })?;
            extra += 1;
        }
        if extra == 0 {
            return Err(ForwarderError::Config {
                key: "upstream.ca_file".into(),
                message: format!("{} holds no PEM certificates", path.display()),
            });
        }
    }
    if roots.is_empty() {
        return Err(ForwarderError::Tls(
            "no trusted CA certificates: the system store is empty and no upstream.ca_file is set"
                .into(),
        ));
    }
    tracing::debug!(system = added, extra, "TLS trust store loaded");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ForwarderError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(tls))
}

/// rumqttc options for one connection attempt. `tls` is required for the
/// encrypted transports (build it once with [`tls_config`]).
pub fn mqtt_options(
    config: &UpstreamConfig,
    tls: Option<Arc<ClientConfig>>,
) -> Result<MqttOptions, ForwarderError> {
    let port = config.effective_port();
    let host = match config.transport {
        Transport::Tls | Transport::Tcp => config.host.clone(),
        // For WebSocket rumqttc takes the whole URL as the host.
        Transport::Wss => format!("wss://{}:{port}/mqtt", config.host),
        Transport::Ws => format!("ws://{}:{port}/mqtt", config.host),
    };
    let mut options = MqttOptions::new(config.client_id.clone(), host, port);
    // ThingSpeak refuses (rc 5) a CONNECT with clean session off or a Will;
    // MqttOptions has no Will unless one is set, and none is.
    options
        .set_clean_session(true)
        .set_keep_alive(Duration::from_secs(config.keep_alive_secs))
        .set_request_channel_capacity(REQUEST_CHANNEL_CAPACITY)
        // Outgoing: one channel update plus topic. Incoming: acks and pings only.
        .set_max_packet_size(16 * 1024, MAX_MESSAGE_BYTES + 256);
    match config.auth {
        Auth::Device => {
            options.set_credentials(config.username.clone(), config.password.expose());
        }
        // Legacy: a username plus the account's MQTT API key may subscribe;
        // a publisher with write keys in its topics needs no credentials.
        Auth::Legacy if !config.password.is_empty() => {
            let username = if config.username.is_empty() {
                config.client_id.clone()
            } else {
                config.username.clone()
            };
            options.set_credentials(username, config.password.expose());
        }
        Auth::Legacy => {}
    }
    let transport = match (config.transport, tls) {
        (Transport::Tls, Some(tls)) => {
            rumqttc::Transport::tls_with_config(TlsConfiguration::Rustls(tls))
        }
        (Transport::Wss, Some(tls)) => {
            rumqttc::Transport::wss_with_config(TlsConfiguration::Rustls(tls))
        }
        (Transport::Ws, _) => rumqttc::Transport::ws(),
        (Transport::Tcp, _) => rumqttc::Transport::tcp(),
        // Never downgrade an encrypted transport to plain text.
        (Transport::Tls | Transport::Wss, None) => {
            return Err(ForwarderError::Tls(format!(
                "transport {} needs a TLS configuration",
                config.transport.as_str()
            )))
        }
    };
    options.set_transport(transport);
    Ok(options)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsgw_core::Secret;

    fn config(transport: Transport) -> UpstreamConfig {
        UpstreamConfig {
            client_id: "dev".into(),
            username: "user".into(),
            password: Secret::new("pw"),
            transport,
            ..UpstreamConfig::default()
        }
    }

    #[test]
    fn options_follow_thingspeak_rules() {
        let o = mqtt_options(&config(Transport::Tcp), None).unwrap();
        assert!(o.clean_session());
        assert!(o.last_will().is_none());
        assert_eq!(o.keep_alive(), Duration::from_secs(60));
        assert_eq!(o.client_id(), "dev");
        let login = o.credentials().unwrap();
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("user", "pw")
        );
        assert_eq!(
            o.broker_address(),
            ("mqtt3.thingspeak.com".to_string(), 1883)
        );
        assert_eq!(o.request_channel_capacity(), REQUEST_CHANNEL_CAPACITY);
    }

    #[test]
    fn websocket_host_is_the_full_url() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(Transport::Wss);
        c.ca_file = Some(ca_file(&dir));
        assert!(
            mqtt_options(&c, None).is_err(),
            "TLS transport without TLS config"
        );
        let tls = tls_config(&c).unwrap();
        let o = mqtt_options(&c, Some(tls)).unwrap();
        assert_eq!(
            o.broker_address(),
            ("wss://mqtt3.thingspeak.com:443/mqtt".to_string(), 443)
        );
        let mut c = config(Transport::Ws);
        c.port = Some(8080);
        let o = mqtt_options(&c, None).unwrap();
        assert_eq!(
            o.broker_address(),
            ("ws://mqtt3.thingspeak.com:8080/mqtt".to_string(), 8080)
        );
    }

    #[test]
    fn ca_file_errors_name_the_key() {
        let mut c = config(Transport::Tls);
        c.ca_file = Some("/nonexistent/ca.pem".into());
        match tls_config(&c) {
            Err(ForwarderError::Config { key, .. }) => assert_eq!(key, "upstream.ca_file"),
            other => panic!("{other:?}"),
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        c.ca_file = Some(path);
        match tls_config(&c) {
            Err(ForwarderError::Config { key, message }) => {
                assert_eq!(key, "upstream.ca_file");
                assert!(message.contains("no PEM certificates"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A throwaway CA certificate file, so tests do not depend on the
    /// machine's system store.
    fn ca_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.pem()).unwrap();
        path
    }

    #[test]
    fn extra_ca_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(Transport::Tls);
        c.ca_file = Some(ca_file(&dir));
        tls_config(&c).unwrap();
    }
}

//! The server certificate for the TLS and WebSocket-over-TLS listeners.
//!
//! Either loaded from PEM files, or generated at start: a throw-away CA plus a
//! leaf for `localhost`, `127.0.0.1` and `::1` signed by it. A separate CA is
//! needed because webpki-based clients (rustls) refuse a self-signed leaf as
//! its own trust anchor; with a CA they verify the chain like any real server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use crate::error::Error;

/// Where the server certificate comes from.
#[derive(Debug, Clone, Default)]
pub enum CertSource {
    /// Generate a CA and a leaf certificate at start.
    #[default]
    Generate,
    /// Use this certificate chain and private key (both PEM files).
    Files { cert: PathBuf, key: PathBuf },
}

/// The TLS acceptor plus what clients need to trust it.
pub(crate) struct ServerTls {
    pub acceptor: TlsAcceptor,
    /// PEM of the CA that signed the server certificate, when generated here.
    pub ca_pem: Option<String>,
}

/// Host names and addresses the generated leaf certificate is valid for.
pub const GENERATED_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

pub(crate) fn build(source: &CertSource) -> Result<ServerTls, Error> {
    let (chain, key, ca_pem) = match source {
        CertSource::Generate => {
            let (chain, key, ca_pem) = generate()?;
            (chain, key, Some(ca_pem))
        }
        CertSource::Files { cert, key } => (load_certs(cert)?, load_key(key)?, None),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(format!("protocol versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| Error::Tls(format!("server certificate/key rejected: {e}")))?;
    Ok(ServerTls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        ca_pem,
    })
}

type Generated = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>, String);

fn generate() -> Result<Generated, Error> {
    let gen_err = |what: &str, e: rcgen::Error| Error::Tls(format!("generating {what}: {e}"));

    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).map_err(|e| gen_err("CA", e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "thingspeak-emulator test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().map_err(|e| gen_err("CA key", e))?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| gen_err("CA certificate", e))?;

    let sans: Vec<String> = GENERATED_SANS.iter().map(|s| s.to_string()).collect();
    let mut leaf_params = CertificateParams::new(sans).map_err(|e| gen_err("leaf", e))?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let leaf_key = KeyPair::generate().map_err(|e| gen_err("leaf key", e))?;
    let leaf_cert = leaf_params
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .map_err(|e| gen_err("leaf certificate", e))?;

    let chain = vec![leaf_cert.der().clone(), ca_cert.der().clone()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    Ok((chain, key, ca_cert.pem()))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{}: bad PEM certificate: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no CERTIFICATE block found",
            path.display()
        )));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let pem = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| Error::Tls(format!("{}: bad PEM private key: {e}", path.display())))?
        .ok_or_else(|| Error::Tls(format!("{}: no PRIVATE KEY block found", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ca_signs_a_localhost_leaf() {
        let (chain, _key, ca_pem) = generate().unwrap();
        assert_eq!(chain.len(), 2);
        assert!(ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        // The CA PEM parses back to the second certificate of the chain.
        let parsed = rustls_pemfile::certs(&mut ca_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(parsed, vec![chain[1].clone()]);
        assert!(build(&CertSource::Generate).is_ok());
    }

    #[test]
    fn pem_files_are_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let tls = build(&CertSource::Files {
            cert: cert_path.clone(),
            key: key_path.clone(),
        })
        .unwrap();
        assert!(tls.ca_pem.is_none());
        // A key file without a key is named in the error.
        let err = build(&CertSource::Files {
            cert: cert_path.clone(),
            key: cert_path.clone(),
        })
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("c.pem") && err.contains("PRIVATE KEY"),
            "{err}"
        );
    }

    #[test]
    fn missing_files_name_the_path() {
        let err = build(&CertSource::Files {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        })
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    }
}

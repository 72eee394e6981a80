//! TLS served directly: when `server.tls_cert` and `server.tls_key` are
//! set, every connection is TLS (rustls, TLS 1.2 and 1.3, ALPN
//! `http/1.1`), so `wss://` and `https://` work without a proxy in front.
//!
//! The handshake runs on the connection's task, after the first bytes
//! arrive and under `server.handshake_timeout_ms` (a handshake past it is
//! closed and counted in `gale_http_timeouts_total{stage="Tls"}`); a
//! failed handshake (a plain-HTTP client, an unknown CA on the client's
//! side) is counted in `gale_tls_handshake_failures_total`.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use crate::config::ConfigError;

/// The server's TLS settings, loaded; cheap to clone.
#[derive(Clone)]
pub struct Tls(TlsAcceptor);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(rustls)")
    }
}

impl Tls {
    /// Runs the server side of the handshake on `tcp`.
    pub(crate) fn accept(&self, tcp: TcpStream) -> tokio_rustls::Accept<TcpStream> {
        self.0.accept(tcp)
    }
}

/// Builds the acceptor from PEM files: `cert` holds the certificate chain
/// (leaf first), `key` its private key (PKCS#8, PKCS#1 or SEC1).
///
/// # Errors
/// A [`ConfigError`] naming the setting whose file is missing, unreadable
/// or unusable, or a key that does not match the certificate.
pub fn acceptor(cert: &str, key: &str) -> Result<Tls, ConfigError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let chain = CertificateDer::pem_file_iter(Path::new(cert))
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ConfigError::invalid("server.tls_cert", format!("{cert}: {e}")))?;
    if chain.is_empty() {
        return Err(ConfigError::invalid(
            "server.tls_cert",
            format!("{cert}: no CERTIFICATE in the file"),
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(Path::new(key))
        .map_err(|e| ConfigError::invalid("server.tls_key", format!("{key}: {e}")))?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            ConfigError::invalid(
                "server.tls_key",
                format!("{key} does not go with {cert}: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls(TlsAcceptor::from(Arc::new(config))))
}

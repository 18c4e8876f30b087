//! TLS settings of a [`RedisStore`](crate::RedisStore): the CA to trust, a
//! client certificate, and the explicit opt-out of verification.

use std::fmt;
use std::sync::Arc;

use cachet_core::StoreError;
use redis::cluster::ClusterClientBuilder;
use redis::{ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, TlsCertificates, TlsMode};

use crate::redact_url;

/// What a store's connections trust and present on `rediss://`. Its `Debug`
/// shows whether each part is set, never its contents.
#[derive(Clone, Default)]
pub(crate) struct TlsOptions {
    /// PEM certificates to trust instead of the system's roots.
    pub(crate) root_ca: Option<Arc<[u8]>>,
    /// PEM certificate chain and private key for mutual TLS.
    pub(crate) client: Option<ClientPem>,
    /// Skip verification of the server's certificate altogether.
    pub(crate) accept_invalid_certs: bool,
}

/// A client certificate chain and its private key, PEM.
pub(crate) type ClientPem = (Arc<[u8]>, Arc<[u8]>);

impl fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |on: bool| if on { "<set>" } else { "<none>" };
        f.debug_struct("TlsOptions")
            .field("root_ca", &set(self.root_ca.is_some()))
            .field("client_cert", &set(self.client.is_some()))
            .field("accept_invalid_certs", &self.accept_invalid_certs)
            .finish()
    }
}

impl TlsOptions {
    /// Whether any TLS option is set.
    pub(crate) fn is_set(&self) -> bool {
        self.root_ca.is_some() || self.client.is_some() || self.accept_invalid_certs
    }

    pub(crate) fn certificates(&self) -> Option<TlsCertificates> {
        (self.root_ca.is_some() || self.client.is_some()).then(|| TlsCertificates {
            client_tls: self.client.as_ref().map(|(cert, key)| ClientTlsConfig {
                client_cert: cert.to_vec(),
                client_key: key.to_vec(),
            }),
            root_cert: self.root_ca.as_ref().map(|ca| ca.to_vec()),
        })
    }

    /// A client for the server at `url`, with these settings.
    pub(crate) fn client(&self, url: &str) -> Result<redis::Client, StoreError> {
        let info = self.connection_info(url)?;
        let client = match self.certificates() {
            Some(certs) => redis::Client::build_with_tls(info, certs),
            None => redis::Client::open(info),
        };
        client.map_err(|e| {
            StoreError::config(format!("invalid TLS settings for {:?}", redact_url(url)))
                .with_source(crate::RedisCause(e))
        })
    }

    /// `url` parsed, with the settings checked against its scheme and
    /// verification turned off only where the builder said so.
    pub(crate) fn connection_info(&self, url: &str) -> Result<redis::ConnectionInfo, StoreError> {
        if url.contains('#') {
            // The fragment is not shown: a `#` in an unescaped password starts one.
            return Err(StoreError::config(format!(
                "the Redis URL {:?} has a fragment (such as #insecure); a URL cannot turn off \
                 certificate verification, use RedisStoreBuilder::danger_accept_invalid_certs",
                redact_url(url)
            )));
        }
        if let Some(ca) = &self.root_ca
            && !holds_certificates(ca)
        {
            // Else redis-rs would trust no certificate at all, and every
            // handshake would fail with an unknown issuer.
            return Err(StoreError::config(
                "the CA given to tls_ca_pem holds no PEM certificate (a \
                 `-----BEGIN CERTIFICATE-----` block) or one that does not decode",
            ));
        }
        ensure_provider();
        let info = url.into_connection_info().map_err(|e| {
            StoreError::config(format!("invalid Redis URL {:?}", redact_url(url)))
                .with_source(crate::RedisCause(e))
        })?;
        match info.addr().clone() {
            ConnectionAddr::TcpTls {
                host,
                port,
                tls_params,
                ..
            } => Ok(info.set_addr(ConnectionAddr::TcpTls {
                host,
                port,
                insecure: self.accept_invalid_certs,
                tls_params,
            })),
            _ if self.is_set() => Err(StoreError::config(format!(
                "TLS settings were given but {:?} is not a rediss:// URL",
                redact_url(url)
            ))),
            _ => Ok(info),
        }
    }

    /// Applies these settings to a cluster client whose seed nodes were parsed
    /// by [`connection_info`](Self::connection_info).
    pub(crate) fn cluster(&self, mut builder: ClusterClientBuilder) -> ClusterClientBuilder {
        if self.accept_invalid_certs {
            builder = builder.tls(TlsMode::Insecure);
        }
        if let Some(certs) = self.certificates() {
            builder = builder.certs(certs);
        }
        builder
    }

    /// Warns, at every connect, that the server's certificate goes unchecked.
    pub(crate) fn warn_if_insecure(&self, target: &dyn fmt::Debug) {
        if self.accept_invalid_certs {
            tracing::warn!(
                store = ?target,
                "TLS certificate verification is OFF (danger_accept_invalid_certs): \
                 anyone on the path can impersonate the Redis server"
            );
        }
    }
}

/// Whether `pem` holds at least one PEM certificate, and every certificate
/// block in it decodes.
pub(crate) fn holds_certificates(pem: &[u8]) -> bool {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut certs = CertificateDer::pem_slice_iter(pem).peekable();
    certs.peek().is_some() && certs.all(|cert| cert.is_ok())
}

/// Makes rustls's `ring` provider the process default unless one is already
/// installed, so that a second provider elsewhere in the program (which makes
/// rustls unable to choose on its own) does not break connecting.
fn ensure_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race to another installer is fine: a provider is installed.
        // `ring`, deprecated from rustls 0.23.48 for its lack of post-quantum
        // key exchange: see docs/decisions.md, "TLS: rustls with ring".
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let _ = provider.install_default();
    }
}

/// Whether a connection failure is a failed TLS handshake (a certificate that
/// does not verify, a client certificate the server wants or refuses).
pub(crate) fn is_handshake_failure(e: &redis::RedisError) -> bool {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&s.to_string());
        source = s.source();
    }
    let text = text.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "alert"]
        .iter()
        .any(|w| text.contains(w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_without_a_certificate_is_refused() {
        let cert: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let key: &[u8] = b"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n";
        let broken: &[u8] = b"-----BEGIN CERTIFICATE-----\nMIIB\n";
        for (ca, ok) in [
            (cert, true),
            (&[b"# roots\n", cert, cert].concat()[..], true),
            (b"garbage\n", false),
            (key, false),
            (broken, false),
            (b"", false),
        ] {
            let tls = TlsOptions {
                root_ca: Some(Arc::from(ca)),
                ..TlsOptions::default()
            };
            let got = tls.connection_info("rediss://127.0.0.1:6380/");
            match got {
                Ok(_) => assert!(ok, "{:?} accepted", String::from_utf8_lossy(ca)),
                Err(e) => {
                    assert!(!ok, "{:?} refused: {e}", String::from_utf8_lossy(ca));
                    assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
                }
            }
        }
    }
}

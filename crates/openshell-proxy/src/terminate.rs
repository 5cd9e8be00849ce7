//! TLS termination for `tls: terminate` endpoints.
//!
//! Each sandbox gets a CA of its own ([`SandboxCa`], ECDSA P-256, made when the sandbox starts,
//! its key only ever in the supervisor's memory). The workload trusts it through the bundle
//! [`trust_bundle`] builds (the system roots plus that CA), which the runtime places read-only
//! in the sandbox. For every host a terminated CONNECT names, the CA signs a leaf certificate
//! (cached per host, renewed a day before it expires); the proxy completes the client's
//! handshake with it, offering only `http/1.1` by ALPN (HTTP/2 is never negotiated), and
//! talks to the upstream over a second TLS connection that verifies the upstream's
//! certificate against the system roots and any `--upstream-ca` ([`UpstreamTls`]), again
//! offering only `http/1.1`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::credentials::CredentialSet;

/// The only application protocol offered either way.
const ALPN_HTTP11: &[u8] = b"http/1.1";
/// How long a leaf certificate is valid.
const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// A cached leaf is replaced when it expires within this long.
const LEAF_RENEW: Duration = Duration::from_secs(24 * 3600);
/// How long the sandbox CA is valid.
const CA_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// Certificates are valid from this long before they were made (clock skew).
const BACKDATE: Duration = Duration::from_secs(3600);
/// Most cached leaf certificates; the cache is emptied when full.
const LEAVES_MAX: usize = 1024;

/// Why TLS termination could not be set up or a certificate made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen failed to make a key or a certificate.
    #[error("cannot make {what}")]
    Generate {
        /// What was being made.
        what: String,
        #[source]
        source: rcgen::Error,
    },
    /// rustls refused a configuration.
    #[error("cannot configure TLS for {what}")]
    Config {
        /// What was being configured.
        what: String,
        #[source]
        source: rustls::Error,
    },
    /// An `--upstream-ca` file could not be read or holds no certificate.
    #[error("--upstream-ca {}: {reason}", path.display())]
    UpstreamCa {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// No trusted root at all for upstream connections.
    #[error("no trusted root certificates for upstream TLS (none in the system store, no --upstream-ca)")]
    NoRoots,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

struct Leaf {
    config: Arc<ServerConfig>,
    renew_at: SystemTime,
}

/// A sandbox's own certificate authority. Its key never leaves this value.
pub struct SandboxCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    pem: String,
    provider: Arc<CryptoProvider>,
    leaves: Mutex<HashMap<String, Leaf>>,
}

impl std::fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxCa").finish_non_exhaustive()
    }
}

impl SandboxCa {
    /// A new CA whose name mentions `label` (the sandbox).
    pub fn generate(label: &str) -> Result<Self, TlsError> {
        let gen = |what: &str| {
            let what = what.to_owned();
            move |source| TlsError::Generate { what, source }
        };
        let key = rcgen::KeyPair::generate().map_err(gen("the sandbox CA key"))?;
        let mut params = rcgen::CertificateParams::default();
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + CA_LIFETIME);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "openshell");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("openshell sandbox CA {label}"),
        );
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key)
            .map_err(gen("the sandbox CA certificate"))?;
        let pem = issuer.pem();
        Ok(Self {
            issuer,
            pem,
            provider: provider(),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM (what the workload trusts).
    pub fn certificate_pem(&self) -> &str {
        &self.pem
    }

    /// The CA certificate, DER.
    pub fn certificate_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// The server configuration presenting a leaf for `host` (a normalised name or an
    /// address), made on first use and cached.
    pub(crate) fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, TlsError> {
        let now = SystemTime::now();
        if let Ok(leaves) = self.leaves.lock() {
            if let Some(leaf) = leaves.get(host).filter(|l| l.renew_at > now) {
                return Ok(leaf.config.clone());
            }
        }
        let config = Arc::new(self.make_leaf(host, now)?);
        if let Ok(mut leaves) = self.leaves.lock() {
            if leaves.len() >= LEAVES_MAX {
                leaves.clear();
            }
            leaves.insert(
                host.to_owned(),
                Leaf {
                    config: config.clone(),
                    renew_at: now + LEAF_LIFETIME - LEAF_RENEW,
                },
            );
        }
        Ok(config)
    }

    fn make_leaf(&self, host: &str, now: SystemTime) -> Result<ServerConfig, TlsError> {
        let gen = |source| TlsError::Generate {
            what: format!("a certificate for {host}"),
            source,
        };
        let key = rcgen::KeyPair::generate().map_err(gen)?;
        let mut params = rcgen::CertificateParams::new(vec![host.to_owned()]).map_err(gen)?;
        params.not_before = offset(now - BACKDATE);
        params.not_after = offset(now + LEAF_LIFETIME);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, host);
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen)?;
        let chain = vec![cert.der().clone(), self.issuer.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config_err = |source| TlsError::Config {
            what: format!("the client side of {host}"),
            source,
        };
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config_err)?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(config_err)?;
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        Ok(config)
    }
}

/// How the proxy connects to upstreams of terminated connections: rustls, verifying against
/// the system roots plus any extra CA files, ALPN `http/1.1` only.
#[derive(Clone)]
pub struct UpstreamTls {
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls").finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// The system's roots (as `rustls-native-certs` finds them) plus the certificates in
    /// each of `extra_ca` (PEM).
    pub fn new(extra_ca: &[PathBuf]) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        for path in extra_ca {
            add_pem_file(&mut roots, path)?;
        }
        Self::with_roots(roots)
    }

    /// Trust exactly `roots`.
    pub fn with_roots(roots: RootCertStore) -> Result<Self, TlsError> {
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Config {
                what: "upstream connections".into(),
                source,
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }

    pub(crate) fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }
}

fn add_pem_file(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    let bad = |reason: String| TlsError::UpstreamCa {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(&text) {
        let cert = cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("unusable certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(bad("holds no certificate".into()));
    }
    Ok(())
}

/// What one sandbox's terminated connections use: its CA, the upstream TLS settings and its
/// credentials.
pub struct Termination {
    /// The sandbox's CA.
    pub ca: SandboxCa,
    /// Upstream connections.
    pub upstream: UpstreamTls,
    /// The sandbox's credentials (placeholders and values).
    pub credentials: CredentialSet,
}

impl std::fmt::Debug for Termination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Termination")
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

fn pem_encode(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The bundle the workload trusts: the system's roots (as `rustls-native-certs` finds them)
/// and then the sandbox CA, PEM.
pub fn trust_bundle(ca: &SandboxCa) -> Vec<u8> {
    let mut out = String::new();
    for cert in rustls_native_certs::load_native_certs().certs {
        out.push_str(&pem_encode(cert.as_ref()));
    }
    out.push_str("# openshell sandbox CA (TLS termination by the egress proxy)\n");
    out.push_str(ca.certificate_pem());
    out.into_bytes()
}

/// A stream that yields `first` before reading `inner` (bytes the proxy read past a CONNECT
/// head belong to the TLS handshake).
pub(crate) struct Prefixed<S> {
    first: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(first: Vec<u8>, inner: S) -> Self {
        Self {
            first,
            at: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.first.len() {
            let n = buf.remaining().min(self.first.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.first[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_chain_to_the_sandbox_ca_and_are_cached_per_host() {
        let ca = SandboxCa::generate("test").unwrap_or_else(|e| panic!("{e}"));
        let a = ca
            .server_config("api.example.com")
            .unwrap_or_else(|e| panic!("{e}"));
        let again = ca
            .server_config("api.example.com")
            .unwrap_or_else(|e| panic!("{e}"));
        let other = ca
            .server_config("127.0.0.1")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(Arc::ptr_eq(&a, &again));
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(a.alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(ca
            .certificate_pem()
            .starts_with("-----BEGIN CERTIFICATE-----"));
        let bundle = String::from_utf8(trust_bundle(&ca)).unwrap_or_default();
        assert!(bundle.ends_with(ca.certificate_pem()));
    }
}

//! Live policy sources: a watched file (inotify) and a polled URL (ETag).
//!
//! Both re-read the whole policy, call [`PolicyHandle::update`] and log the
//! outcome; an invalid or refused policy is reported and the last good one
//! stays in force.
//!
//! A policy URL is `https://` (rustls; the server's certificate must chain to the system's
//! root certificates and name the host, or, with a pin, have exactly the pinned SHA-256) or
//! `http://` to a loopback address only: a policy fetched in clear over a network could be
//! rewritten on the way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::policy::{PolicyHandle, UpdateError};

/// How long events are gathered after the first one before re-reading, so
/// an editor's write-rename sequence becomes one reload.
const SETTLE: Duration = Duration::from_millis(50);

/// Largest policy document accepted from a URL.
const MAX_POLICY_BYTES: usize = 4 * 1024 * 1024;

/// A watch or poll could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The policy file has no parent directory or name.
    #[error("cannot watch {}: not a file path", path.display())]
    BadPath {
        /// The path given.
        path: PathBuf,
    },
    /// inotify could not be set up.
    #[error("cannot watch {}", path.display())]
    Notify {
        /// The directory watched.
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    /// The URL is not `https://host[:port]/path` or a loopback `http://` URL.
    #[error("unsupported policy url {url:?}: {why}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The certificate pin is not 64 hex digits.
    #[error("policy url pin {pin:?}: expected the certificate's SHA-256 as 64 hex digits (optionally after sha256:)")]
    BadPin {
        /// The pin given.
        pin: String,
    },
    /// TLS could not be set up (no system root certificates, or the provider refused).
    #[error("cannot set up TLS for the policy url: {0}")]
    Tls(String),
    /// A one-shot fetch failed.
    #[error("fetching policy from {url}: {reason}")]
    Fetch {
        /// The URL given.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

fn log_update(source: &str, result: Result<u64, UpdateError>) {
    match result {
        Ok(generation) => {
            tracing::info!(target: "openshell::policy", source, generation, "network policy updated");
        }
        Err(error) => {
            let detail = match &error {
                UpdateError::Parse(e) => e.to_string(),
                UpdateError::StaticChanged(e) => e.to_string(),
                UpdateError::Compile(e) => {
                    let mut text = e.to_string();
                    let mut cause = std::error::Error::source(e);
                    while let Some(c) = cause {
                        text.push_str(": ");
                        text.push_str(&c.to_string());
                        cause = c.source();
                    }
                    text
                }
            };
            tracing::warn!(target: "openshell::policy", source, %error, %detail, "policy update refused; keeping the last good policy");
        }
    }
}

/// Watch `path` and apply every change to `handle`. The parent directory is
/// watched, so editors that write a new file and rename it over the old one
/// are seen. Unchanged content is not re-applied. Stops when the task is
/// aborted.
pub fn watch_file(path: &Path, handle: PolicyHandle) -> Result<JoinHandle<()>, WatchError> {
    let (watcher, rx) = inotify_changes(path)?;
    Ok(apply_changes(path, handle, rx, Box::new(watcher)))
}

/// An inotify watch (through `notify`) on `path`'s directory that sends one
/// message per event touching `path`. The watch lives as long as the returned
/// watcher.
pub fn inotify_changes(
    path: &Path,
) -> Result<
    (
        notify::RecommendedWatcher,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ),
    WatchError,
> {
    let bad = || WatchError::BadPath {
        path: path.to_path_buf(),
    };
    let name = path.file_name().ok_or_else(bad)?.to_os_string();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        Some(_) => PathBuf::from("."),
        None => return Err(bad()),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(ev) => ev.paths.is_empty() || ev.paths.iter().any(|p| p.file_name() == Some(&name)),
            Err(_) => true,
        };
        if relevant {
            let _ = tx.send(());
        }
    })
    .map_err(|source| WatchError::Notify {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError::Notify {
            path: dir.clone(),
            source,
        })?;
    Ok((watcher, rx))
}

/// Re-read `path` after each message on `changes` (waiting for the writer to
/// settle) and apply new content to `handle`. `keep` (the change source) lives
/// as long as the task.
pub fn apply_changes(
    path: &Path,
    handle: PolicyHandle,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<()>,
    keep: Box<dyn std::any::Any + Send>,
) -> JoinHandle<()> {
    let path = path.to_path_buf();
    let source_name = path.display().to_string();
    let mut last = std::fs::read(&path).ok();
    tokio::spawn(async move {
        // The change source lives as long as this task.
        let _keep = keep;
        while rx.recv().await.is_some() {
            tokio::time::sleep(SETTLE).await;
            while rx.try_recv().is_ok() {}
            let text = match tokio::fs::read(&path).await {
                Ok(text) => text,
                Err(error) => {
                    tracing::debug!(target: "openshell::policy", source = %source_name, %error, "policy file not readable (yet)");
                    continue;
                }
            };
            if last.as_deref() == Some(text.as_slice()) {
                continue;
            }
            last = Some(text.clone());
            let result = match std::str::from_utf8(&text) {
                Ok(text) => handle.update_yaml(&source_name, text),
                Err(_) => {
                    tracing::warn!(target: "openshell::policy", source = %source_name, "policy file is not utf-8; keeping the last good policy");
                    continue;
                }
            };
            log_update(&source_name, result);
        }
    })
}

/// A parsed policy URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HttpUrl {
    tls: bool,
    host: String,
    port: u16,
    authority: String,
    path: String,
}

fn parse_url(url: &str) -> Result<HttpUrl, &'static str> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    let (tls, rest, default_port) = if lower.starts_with("https://") {
        (true, &url[8..], 443)
    } else if lower.starts_with("http://") {
        (false, &url[7..], 80)
    } else {
        return Err("expected https://host[:port]/path (or http:// to a loopback address)");
    };
    let split = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    let (host, port) = crate::http::parse_authority(authority, Some(default_port))
        .map_err(|_| "expected host[:port] after the scheme")?;
    let path = if path.is_empty() { "/" } else { path };
    if path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("whitespace or control characters in the path");
    }
    if !tls && !is_loopback(&host) {
        return Err("plain http:// is allowed only to a loopback address (127.0.0.0/8, ::1, localhost); use https://");
    }
    Ok(HttpUrl {
        tls,
        host,
        port,
        authority: authority.to_string(),
        path: path.to_string(),
    })
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where the policy is fetched from, and how its server is trusted.
#[derive(Clone)]
pub struct PolicyUrl {
    url: String,
    parsed: HttpUrl,
    /// For `https://`: the TLS client.
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for PolicyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyUrl")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl PolicyUrl {
    /// Check `url` and set up its TLS client. `pin`: the SHA-256 of the server's certificate
    /// (64 hex digits, optionally after `sha256:`); with it, that certificate is trusted
    /// alone (a self-signed one works), without it the system's root certificates decide.
    pub fn new(url: &str, pin: Option<&str>) -> Result<Self, WatchError> {
        let parsed = parse_url(url).map_err(|why| WatchError::BadUrl {
            url: url.to_string(),
            why,
        })?;
        let pin = pin.map(parse_pin).transpose()?;
        if pin.is_some() && !parsed.tls {
            return Err(WatchError::BadUrl {
                url: url.to_string(),
                why: "a certificate pin needs an https:// url",
            });
        }
        let tls = match parsed.tls {
            true => Some(tls_connector(pin)?),
            false => None,
        };
        Ok(Self {
            url: url.to_string(),
            parsed,
            tls,
        })
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.url
    }
}

fn parse_pin(pin: &str) -> Result<[u8; 32], WatchError> {
    let hex = pin.strip_prefix("sha256:").unwrap_or(pin).replace(':', "");
    let bad = || WatchError::BadPin {
        pin: pin.to_string(),
    };
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(out)
}

fn tls_connector(pin: Option<[u8; 32]>) -> Result<tokio_rustls::TlsConnector, WatchError> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| WatchError::Tls(e.to_string()))?;
    let config = match pin {
        Some(sha256) => builder
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(Pinned { sha256, provider }))
            .with_no_client_auth(),
        None => {
            let loaded = rustls_native_certs::load_native_certs();
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(loaded.certs);
            if added == 0 {
                return Err(WatchError::Tls(format!(
                    "no system root certificates could be loaded ({} errors); give --policy-url-sha256",
                    loaded.errors.len()
                )));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(
        config,
    )))
}

/// Trusts exactly one server certificate, by its SHA-256; the handshake's signatures are
/// still verified with it.
#[derive(Debug)]
struct Pinned {
    sha256: [u8; 32],
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use sha2::Digest;
        let digest: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if digest == self.sha256 {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate does not have the pinned SHA-256".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Fetch `url` every `interval` with `If-None-Match` and apply each new
/// document to `handle`. Stops when the task is aborted.
pub fn poll_url(url: &PolicyUrl, interval: Duration, handle: PolicyHandle) -> JoinHandle<()> {
    let url = url.clone();
    let source_name = url.url.clone();
    tokio::spawn(async move {
        let mut etag: Option<String> = None;
        let mut last_body: Option<Vec<u8>> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let fetched = tokio::time::timeout(
                interval.max(Duration::from_secs(5)),
                fetch(&url, etag.as_deref()),
            )
            .await
            .unwrap_or_else(|_| Err("request timed out".to_string()));
            match fetched {
                Ok(Fetched::NotModified) => {}
                Ok(Fetched::Body {
                    etag: new_etag,
                    body,
                }) => {
                    etag = new_etag;
                    if last_body.as_deref() == Some(body.as_slice()) {
                        continue;
                    }
                    last_body = Some(body.clone());
                    match String::from_utf8(body) {
                        Ok(text) => {
                            log_update(&source_name, handle.update_yaml(&source_name, &text))
                        }
                        Err(_) => {
                            tracing::warn!(target: "openshell::policy", source = %source_name, "policy document is not utf-8; keeping the last good policy");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(target: "openshell::policy", source = %source_name, %error, "policy fetch failed; keeping the last good policy");
                }
            }
        }
    })
}

/// Fetch the policy document at `url` once (the initial policy when a sandbox starts from
/// `--policy-url` alone).
pub async fn fetch_text(url: &PolicyUrl) -> Result<String, WatchError> {
    let fetched = tokio::time::timeout(Duration::from_secs(10), fetch(url, None))
        .await
        .unwrap_or_else(|_| Err("request timed out".to_string()));
    let fail = |reason: String| WatchError::Fetch {
        url: url.url.clone(),
        reason,
    };
    match fetched {
        Ok(Fetched::Body { body, .. }) => {
            String::from_utf8(body).map_err(|_| fail("policy document is not utf-8".to_string()))
        }
        Ok(Fetched::NotModified) => Err(fail("unexpected 304 Not Modified".to_string())),
        Err(reason) => Err(fail(reason)),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Fetched {
    NotModified,
    Body { etag: Option<String>, body: Vec<u8> },
}

/// One `GET` over a fresh connection (`Connection: close`), over TLS for `https://`;
/// response parsed with httparse.
async fn fetch(url: &PolicyUrl, etag: Option<&str>) -> Result<Fetched, String> {
    let target = &url.parsed;
    let mut addrs: Vec<std::net::SocketAddr> =
        tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| format!("resolving {}: {e}", target.host))?
            .collect();
    if url.tls.is_none() {
        // Plain http only ever goes to this host: `localhost` must resolve to loopback.
        addrs.retain(|a| a.ip().is_loopback());
        if addrs.is_empty() {
            return Err(format!(
                "{} resolves to no loopback address, and plain http:// is allowed only to loopback",
                target.host
            ));
        }
    }
    let tcp = tokio::net::TcpStream::connect(&addrs[..])
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: openshell-proxy\r\nAccept: */*\r\nConnection: close\r\n",
        target.path, target.authority
    );
    if let Some(tag) = etag {
        request.push_str(&format!("If-None-Match: {tag}\r\n"));
    }
    request.push_str("\r\n");
    let raw = match &url.tls {
        Some(connector) => {
            let name = rustls::pki_types::ServerName::try_from(target.host.clone())
                .map_err(|e| format!("server name {}: {e}", target.host))?;
            let stream = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            exchange(stream, request.as_bytes()).await?
        }
        None => exchange(tcp, request.as_bytes()).await?,
    };
    parse_response(&raw)
}

async fn exchange<S>(mut stream: S, request: &[u8]) -> Result<Vec<u8>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(request)
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    match (&mut stream)
        .take(MAX_POLICY_BYTES as u64 + 64 * 1024)
        .read_to_end(&mut raw)
        .await
    {
        Ok(_) => {}
        // A server that closes without TLS close_notify: the response is judged by its own
        // framing (Content-Length or chunked) below.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        Err(e) => return Err(format!("receive: {e}")),
    }
    Ok(raw)
}

fn parse_response(raw: &[u8]) -> Result<Fetched, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("truncated response head".into()),
        Err(e) => return Err(format!("malformed response: {e}")),
    };
    let status = response.code.unwrap_or(0);
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if status == 304 {
        return Ok(Fetched::NotModified);
    }
    if status != 200 {
        return Err(format!("http status {status}"));
    }
    let etag = header("etag");
    let rest = &raw[head_len..];
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| "invalid content-length")?;
        rest.get(..len).ok_or("truncated body")?.to_vec()
    } else {
        return Err("response without Content-Length or chunked framing".into());
    };
    if body.len() > MAX_POLICY_BYTES {
        return Err("policy document too large".into());
    }
    Ok(Fetched::Body { etag, body })
}

fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let (idx, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(v)) => v,
            _ => return Err("malformed chunked body".into()),
        };
        rest = &rest[idx..];
        if size == 0 {
            return Ok(body);
        }
        let size = usize::try_from(size).map_err(|_| "chunk too large")?;
        let data = rest.get(..size).ok_or("truncated chunk")?;
        body.extend_from_slice(data);
        rest = rest.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080/p.yaml"),
            Ok(HttpUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 8080,
                authority: "127.0.0.1:8080".into(),
                path: "/p.yaml".into()
            })
        );
        assert_eq!(
            parse_url("HTTPS://policy.example/p").map(|u| (u.tls, u.host, u.port)),
            Ok((true, "policy.example".into(), 443))
        );
        assert_eq!(
            parse_url("http://localhost/p").map(|u| u.host),
            Ok("localhost".into())
        );
        assert_eq!(parse_url("http://[::1]:9/p").map(|u| u.port), Ok(9));
        let not_loopback = Err("plain http:// is allowed only to a loopback address (127.0.0.0/8, ::1, localhost); use https://");
        assert_eq!(parse_url("http://policy.example/p"), not_loopback);
        assert_eq!(parse_url("http://10.0.0.1/p"), not_loopback);
        assert!(parse_url("ftp://a/p").is_err());
        assert!(parse_url("http://a b/p").is_err());
    }

    #[test]
    fn pins() {
        let hex = "AB".repeat(32);
        assert_eq!(parse_pin(&hex).ok(), Some([0xab; 32]));
        assert_eq!(
            parse_pin(&format!("sha256:{}", "0a".repeat(32))).ok(),
            Some([0x0a; 32])
        );
        assert!(parse_pin("abc").is_err());
        assert!(parse_pin(&"zz".repeat(32)).is_err());
        assert_eq!(
            PolicyUrl::new("http://127.0.0.1/p", Some(&hex)).map(drop).map_err(|e| e.to_string()),
            Err("unsupported policy url \"http://127.0.0.1/p\": a certificate pin needs an https:// url".to_string())
        );
    }

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(b"HTTP/1.1 304 Not Modified\r\n\r\n"),
            Ok(Fetched::NotModified)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: 3\r\n\r\nabcdef"),
            Ok(Fetched::Body {
                etag: Some("\"v1\"".into()),
                body: b"abc".to_vec()
            })
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n"),
            Ok(Fetched::Body {
                etag: None,
                body: b"abcd".to_vec()
            })
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 500 Oops\r\n\r\n"),
            Err("http status 500".to_string())
        );
    }
}

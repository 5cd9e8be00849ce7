//! HTTPS through a proxy that terminates TLS: our proxy (`tls: terminate`) next to mitmproxy's
//! `mitmdump`, with the same client and the same HTTPS upstream on 127.0.0.2 (rustls, a
//! certificate of a test CA made here with rcgen, an HTTP/1.1 keep-alive responder answering
//! every GET with [`BODY`]).
//!
//! Three paths, rotated so drift hits all alike: direct (client -> upstream TLS), ours and
//! mitmproxy (client -> `CONNECT` -> TLS with the proxy, which opens its own TLS connection
//! upstream and relays each request). The client is rustls (tokio-rustls), offers only
//! `http/1.1` and never resumes a session, so every new connection is a full handshake.
//!
//! - keep-alive: one connection per path, [`KEEPALIVE`] GETs one after another; added
//!   latency is a proxy's percentile minus the direct percentile.
//! - new connection: [`NEW_CONNECTIONS`] times `CONNECT` + handshake + one GET + close.
//! - rate: [`CLIENTS`] keep-alive connections (opened before the clock starts) sending GETs in
//!   a loop for [`RATE_SECS`], [`RATE_ROUNDS`] rounds alternating between the paths.
//!
//! Every request and connection has [`OP_TIMEOUT`]; a latency phase stops early after
//! [`PHASE_LIMIT`] (the output says how many samples it took).
//!
//! Our proxy runs in-process on its own 2-worker runtime (as the supervisor's), with a fixed
//! caller, a policy whose endpoint for the upstream says `tls: terminate` and
//! `access: read-only` (so every request is decided with its method and path), a fresh
//! sandbox CA (which the client trusts) and the upstream's CA as an `--upstream-ca` file.
//! mitmproxy (`/usr/bin/mitmdump`, or `$MITMDUMP`) runs as a child in regular proxy mode with
//! a confdir in a temporary directory, verifying the upstream with
//! `ssl_verify_upstream_trusted_ca` (the same CA file); the client trusts the CA it writes
//! there. It is killed at the end, also on error. Loopback only. Prints one JSON object on
//! stdout.
//! Run: `cargo bench -p openshell-proxy --bench terminate`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    allow_entry_with, connect_via, document, free_port, runtime, summary_us, version_line,
    BoxError, Peer,
};
use openshell_policy::Policy;
use openshell_proxy::credentials::CredentialSet;
use openshell_proxy::terminate::{SandboxCa, Termination, UpstreamTls};
use openshell_proxy::{Caller, FixedIdentity, PolicyHandle, Proxy, ProxyConfig, SandboxContext};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

/// Keep-alive GETs per path, after [`KEEPALIVE_WARMUP`].
const KEEPALIVE: usize = 2_000;
const KEEPALIVE_WARMUP: usize = 200;
/// New connections per path, after [`NEW_WARMUP`].
const NEW_CONNECTIONS: usize = 300;
const NEW_WARMUP: usize = 20;
const CLIENTS: usize = 16;
const RATE_SECS: f64 = 2.0;
const RATE_ROUNDS: usize = 3;
/// Limit for one request, one connection (CONNECT and handshake) or one close.
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// A latency phase stops after this long, whatever it has measured.
const PHASE_LIMIT: Duration = Duration::from_secs(120);
/// What the upstream answers to every GET.
const BODY: &[u8] = b"hello from the https upstream\n";
const CALLER: &str = "/usr/bin/curl";

const PATHS: usize = 3;
const DIRECT: usize = 0;
const OURS: usize = 1;
const MITM: usize = 2;

type ClientTls = TlsStream<TcpStream>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The test CA (PEM) and the upstream's certificate chain and key for 127.0.0.2.
struct Pki {
    ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn test_pki() -> Result<Pki, BoxError> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "openshell bench upstream CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.2".to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "127.0.0.2");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca)?;
    Ok(Pki {
        ca_pem: ca.pem(),
        chain: vec![cert.der().clone(), ca.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    })
}

/// The HTTPS upstream on 127.0.0.2:0, served by the current runtime: every request head
/// (GETs carry no body) gets `200` with [`BODY`], on a connection that stays open.
async fn https_upstream(pki: &Pki) -> Result<SocketAddr, BoxError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(pki.chain.clone(), pki.key.clone_key())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.2:0").await?;
    let addr = listener.local_addr()?;
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        BODY.len()
    )
    .into_bytes();
    response.extend_from_slice(BODY);
    let response: Arc<[u8]> = response.into();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let (acceptor, response) = (acceptor.clone(), response.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = Vec::with_capacity(4096);
                let mut chunk = [0u8; 4096];
                loop {
                    while let Some(end) = find(&buf, b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if tls.write_all(&response).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                    }
                    if buf.len() > 64 * 1024 {
                        return;
                    }
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    Ok(addr)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One way to the upstream: directly or through a proxy, with a client trusting `ca`.
#[derive(Clone)]
struct Route {
    name: &'static str,
    proxy: Option<SocketAddr>,
    connector: tokio_rustls::TlsConnector,
}

impl Route {
    fn new(
        name: &'static str,
        proxy: Option<SocketAddr>,
        ca: CertificateDer<'static>,
    ) -> Result<Self, BoxError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca)?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            name,
            proxy,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// (`CONNECT` ->) TCP and a TLS handshake with the upstream's address as the name (so no
    /// SNI), within [`OP_TIMEOUT`].
    async fn open(&self, upstream: SocketAddr) -> Result<ClientTls, BoxError> {
        let open = async {
            let tcp = match self.proxy {
                None => {
                    let s = TcpStream::connect(upstream).await?;
                    s.set_nodelay(true)?;
                    s
                }
                Some(proxy) => {
                    let (status, s) = connect_via(proxy, upstream).await?;
                    if status != 200 {
                        return Err(format!("CONNECT via {proxy} answered {status}").into());
                    }
                    s
                }
            };
            let name = ServerName::IpAddress(upstream.ip().into());
            Ok::<_, BoxError>(self.connector.connect(name, tcp).await?)
        };
        tokio::time::timeout(OP_TIMEOUT, open)
            .await
            .map_err(|_| format!("{}: connection not open within {OP_TIMEOUT:?}", self.name))?
            .map_err(|e| format!("{}: {e}", self.name).into())
    }
}

/// A keep-alive connection and the bytes read past the last response.
struct Conn {
    tls: ClientTls,
    buf: Vec<u8>,
}

impl Conn {
    /// Send `request` and read the whole response, which must be `200` with [`BODY`], within
    /// [`OP_TIMEOUT`].
    async fn get(&mut self, request: &[u8]) -> Result<(), BoxError> {
        tokio::time::timeout(OP_TIMEOUT, get(&mut self.tls, &mut self.buf, request))
            .await
            .map_err(|_| format!("no response within {OP_TIMEOUT:?}"))?
    }
}

async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    request: &[u8],
) -> Result<(), BoxError> {
    s.write_all(request).await?;
    s.flush().await?;
    let mut chunk = [0u8; 4096];
    let (head_len, status, length) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(n) = resp.parse(buf)? {
            let length = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .ok_or("response without Content-Length")?;
            break (n, resp.code.unwrap_or(0), length);
        }
        if buf.len() > 64 * 1024 {
            return Err("response head too large".into());
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err("closed before a whole response head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    while buf.len() < head_len + length {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err("closed inside the response body".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if status != 200 {
        let text = String::from_utf8_lossy(&buf[..head_len + length]).into_owned();
        return Err(format!("answered {status}: {text}").into());
    }
    if &buf[head_len..head_len + length] != BODY {
        return Err("response body differs from the upstream's".into());
    }
    buf.drain(..head_len + length);
    Ok(())
}

/// `CONNECT` + handshake + one GET + close.
async fn new_connection(
    route: &Route,
    upstream: SocketAddr,
    request: &[u8],
) -> Result<(), BoxError> {
    let mut conn = Conn {
        tls: route.open(upstream).await?,
        buf: Vec::new(),
    };
    conn.get(request)
        .await
        .map_err(|e| format!("{}: {e}", route.name))?;
    let _ = tokio::time::timeout(OP_TIMEOUT, conn.tls.shutdown()).await;
    Ok(())
}

/// Completed GETs per second over [`CLIENTS`] keep-alive connections for [`RATE_SECS`], and
/// the failures (a failed connection is reopened). The connections are open before the clock
/// starts.
async fn rate(route: &Route, upstream: SocketAddr, request: Arc<[u8]>, secs: f64) -> (f64, u64) {
    let failed = Arc::new(AtomicU64::new(0));
    let opened = futures::future::join_all((0..CLIENTS).map(|_| route.open(upstream))).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for conn in opened {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        let (route, request) = (route.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = conn.ok().map(|tls| Conn {
                tls,
                buf: Vec::new(),
            });
            while !stop.load(Ordering::Relaxed) {
                let Some(c) = conn.as_mut() else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    conn = route.open(upstream).await.ok().map(|tls| Conn {
                        tls,
                        buf: Vec::new(),
                    });
                    continue;
                };
                match c.get(&request).await {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let counted = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    (counted as f64 / elapsed, failed.load(Ordering::Relaxed))
}

fn mitmdump_bin() -> std::ffi::OsString {
    std::env::var_os("MITMDUMP").unwrap_or_else(|| "/usr/bin/mitmdump".into())
}

/// mitmdump in regular proxy mode on 127.0.0.1, its confdir (and so its CA) in a temporary
/// directory, trusting `upstream_ca` upstream and nothing else, printing nothing per flow.
fn start_mitmproxy(upstream_ca_pem: &str) -> Result<Peer, BoxError> {
    let dir = tempfile::tempdir()?;
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, upstream_ca_pem)?;
    let port = free_port()?;
    let mut cmd = Command::new(mitmdump_bin());
    cmd.args(["--quiet", "--mode", "regular"])
        .args(["--listen-host", "127.0.0.1", "--listen-port"])
        .arg(port.to_string())
        .arg("--set")
        .arg(format!("confdir={}", dir.path().display()))
        .arg("--set")
        .arg(format!(
            "ssl_verify_upstream_trusted_ca={}",
            ca_file.display()
        ))
        .args(["--set", "termlog_verbosity=error", "--set", "flow_detail=0"]);
    Peer::start(
        "mitmdump",
        cmd,
        dir,
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(30),
        |d| mitmproxy_ca(d).is_ok(),
    )
}

/// The CA mitmproxy writes into its confdir (what a client of it trusts).
fn mitmproxy_ca(confdir: &Path) -> Result<CertificateDer<'static>, BoxError> {
    let path = confdir.join("mitmproxy-ca-cert.pem");
    let pem = std::fs::read(&path)?;
    let cert = CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or_else(|| format!("{}: no certificate", path.display()))??;
    Ok(cert)
}

/// Rotating over the three routes, `count` measured rounds after `warmup`, one `unit` each,
/// within [`PHASE_LIMIT`]. Returns the samples per route (fewer when the limit was reached).
async fn rotate(
    label: &str,
    warmup: usize,
    count: usize,
    mut unit: impl AsyncFnMut(usize) -> Result<(), BoxError>,
) -> Result<[Vec<Duration>; PATHS], BoxError> {
    let mut samples: [Vec<Duration>; PATHS] = Default::default();
    let deadline = Instant::now() + PHASE_LIMIT;
    for n in 0..warmup + count {
        if Instant::now() > deadline {
            eprintln!(
                "terminate: {label}: stopped after {PHASE_LIMIT:?} with {} of {count} samples",
                samples[0].len()
            );
            break;
        }
        for k in 0..PATHS {
            let idx = (n + k) % PATHS;
            let t = Instant::now();
            unit(idx).await?;
            if n >= warmup {
                samples[idx].push(t.elapsed());
            }
        }
    }
    Ok(samples)
}

fn main() -> Result<(), BoxError> {
    let pki = test_pki()?;
    let scratch = tempfile::tempdir()?;
    let upstream_ca_file = scratch.path().join("upstream-ca.pem");
    std::fs::write(&upstream_ca_file, &pki.ca_pem)?;
    let upstream_ca = CertificateDer::from_pem_slice(pki.ca_pem.as_bytes())?;

    // The upstream and our proxy each get their own runtime, the client another, so the
    // client is the same whichever proxy it measures.
    let upstream_rt = runtime(1, "https-upstream")?;
    let upstream = upstream_rt.block_on(https_upstream(&pki))?;

    let proxy_rt = runtime(2, "openshell-proxy")?;
    let text = document(&allow_entry_with(
        "bench",
        "127.0.0.2",
        upstream.port(),
        CALLER,
        &["tls: terminate", "access: read-only"],
    ));
    let handle = PolicyHandle::new(Policy::from_yaml("bench-terminate.yaml", &text)?)?;
    let config = ProxyConfig {
        max_connections: 1024,
        ..ProxyConfig::default()
    };
    let proxy = Proxy::new(config, handle)?;
    let termination = Termination {
        ca: SandboxCa::generate("bench")?,
        // As `--upstream-ca FILE`: the system roots and the bench's test CA.
        upstream: UpstreamTls::new(std::slice::from_ref(&upstream_ca_file))?,
        credentials: CredentialSet::new(Vec::new()),
    };
    let sandbox_ca = termination.ca.certificate_der();
    let (ours_addr, _ours_task) = proxy_rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = proxy.serve_tcp(
            listener,
            SandboxContext::new(
                "bench",
                Arc::new(FixedIdentity(Caller {
                    pid: 4242,
                    exe: PathBuf::from(CALLER),
                    ancestors: vec![PathBuf::from("/usr/bin/bash")],
                })),
            )
            .with_termination(Arc::new(termination)),
        );
        Ok::<_, BoxError>((addr, task))
    })?;

    let mitm = start_mitmproxy(&pki.ca_pem)?;
    let version = version_line({
        let mut cmd = Command::new(mitmdump_bin());
        cmd.arg("--version");
        cmd
    });
    let routes = [
        Route::new("direct", None, upstream_ca)?,
        Route::new("ours", Some(ours_addr), sandbox_ca)?,
        Route::new("mitmproxy", Some(mitm.addr), mitmproxy_ca(mitm.dir.path())?)?,
    ];
    let request: Arc<[u8]> = format!(
        "GET /bench HTTP/1.1\r\nHost: {upstream}\r\nUser-Agent: openshell-bench\r\nAccept: */*\r\n\r\n"
    )
    .into_bytes()
    .into();

    let client = runtime(2, "bench-client")?;
    let result = client.block_on(async {
        // Each works before anything is measured.
        for route in &routes {
            new_connection(route, upstream, &request).await?;
        }

        eprintln!("terminate: keep-alive, {KEEPALIVE} sequential GETs on one connection each");
        let mut conns = Vec::new();
        for route in &routes {
            conns.push(Conn {
                tls: route.open(upstream).await?,
                buf: Vec::new(),
            });
        }
        let keepalive = rotate("keep-alive", KEEPALIVE_WARMUP, KEEPALIVE, async |idx| {
            conns[idx]
                .get(&request)
                .await
                .map_err(|e| format!("{}: keep-alive: {e}", routes[idx].name).into())
        })
        .await?;
        drop(conns);

        eprintln!(
            "terminate: new connection, {NEW_CONNECTIONS} each: CONNECT + handshake + GET + close"
        );
        let fresh = rotate("new connection", NEW_WARMUP, NEW_CONNECTIONS, async |idx| {
            new_connection(&routes[idx], upstream, &request).await
        })
        .await?;

        eprintln!(
            "terminate: rate, {CLIENTS} keep-alive clients, {RATE_ROUNDS} x {RATE_SECS} s each"
        );
        for idx in [OURS, MITM] {
            let _ = rate(&routes[idx], upstream, request.clone(), RATE_SECS / 4.0).await;
        }
        let mut rates: [Vec<f64>; PATHS] = Default::default();
        let mut failures = [0u64; PATHS];
        for _ in 0..RATE_ROUNDS {
            for idx in [OURS, MITM, DIRECT] {
                let (r, f) = rate(&routes[idx], upstream, request.clone(), RATE_SECS).await;
                rates[idx].push(r);
                failures[idx] += f;
            }
        }
        Ok::<_, BoxError>((keepalive, fresh, rates, failures))
    });
    let mitm_log = mitm.log();
    drop(mitm);
    let (keepalive, fresh, rates, failures) = result.map_err(|e| {
        if mitm_log.trim().is_empty() {
            e
        } else {
            format!("{e}\nmitmdump said:\n{mitm_log}").into()
        }
    })?;

    let keep: Vec<serde_json::Value> = keepalive.iter().map(|l| summary_us(l)).collect();
    let new: Vec<serde_json::Value> = fresh.iter().map(|l| summary_us(l)).collect();
    let added = |s: &[serde_json::Value], i: usize, keys: &[&str]| {
        let mut out = serde_json::Map::new();
        for k in keys {
            let d =
                s[i][*k].as_f64().unwrap_or(f64::NAN) - s[DIRECT][*k].as_f64().unwrap_or(f64::NAN);
            out.insert(
                (*k).to_string(),
                serde_json::json!((d * 1000.0).round() / 1000.0),
            );
        }
        serde_json::Value::Object(out)
    };
    let mean_rate = |i: usize| rates[i].iter().sum::<f64>() / rates[i].len().max(1) as f64;
    let rate_json = |i: usize| {
        serde_json::json!({
            "per_s": mean_rate(i).round(),
            "rounds": rates[i].iter().map(|r| r.round()).collect::<Vec<_>>(),
            "failed": failures[i],
        })
    };
    let ratio = |a: f64, b: f64| ((a / b) * 1000.0).round() / 1000.0;
    let p = |s: &[serde_json::Value], i: usize, k: &str| s[i][k].as_f64().unwrap_or(f64::NAN);
    let route_json = |i: usize| {
        let mut v = serde_json::json!({
            "keepalive": keep[i],
            "new_connection": new[i],
            "rate": rate_json(i),
        });
        if i != DIRECT {
            v["keepalive_added"] = added(&keep, i, &["p50_us", "p95_us", "p99_us"]);
            v["new_connection_added"] = added(&new, i, &["p50_us", "p99_us"]);
        }
        v
    };
    let report = serde_json::json!({
        "upstream": upstream.to_string(),
        "body_bytes": BODY.len(),
        "keepalive_requests": KEEPALIVE,
        "new_connections": NEW_CONNECTIONS,
        "clients": CLIENTS,
        "rate_secs": RATE_SECS,
        "rate_rounds": RATE_ROUNDS,
        "client_session_resumption": false,
        "mitmproxy_version": version,
        "mitmproxy_upstream_verification": "ssl_verify_upstream_trusted_ca",
        "direct": route_json(DIRECT),
        "ours": route_json(OURS),
        "mitmproxy": route_json(MITM),
        "ours_over_mitmproxy": {
            "rate": ratio(mean_rate(OURS), mean_rate(MITM)),
            "keepalive_p50": ratio(p(&keep, OURS, "p50_us"), p(&keep, MITM, "p50_us")),
            "keepalive_p99": ratio(p(&keep, OURS, "p99_us"), p(&keep, MITM, "p99_us")),
            "new_connection_p50": ratio(p(&new, OURS, "p50_us"), p(&new, MITM, "p50_us")),
            "new_connection_p99": ratio(p(&new, OURS, "p99_us"), p(&new, MITM, "p99_us")),
        },
    });
    println!("{report}");
    drop(client);
    drop(proxy_rt);
    drop(upstream_rt);
    Ok(())
}

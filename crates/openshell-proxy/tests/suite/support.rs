//! Test harness: a proxy on 127.0.0.1:0 with a fixed caller, upstream
//! servers on 127.0.0.2 / 127.0.0.3, and raw HTTP clients.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openshell_policy::Policy;
use openshell_proxy::{Caller, FixedIdentity, PolicyHandle, Proxy, ProxyConfig, SandboxContext};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const CURL: &str = "/usr/bin/curl";

/// Fail (rather than hang) when a step takes unreasonably long.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(20), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no progress in 20 s"),
    }
}

/// Wait until `cond` holds (checked every 20 ms, at most 20 s).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

pub fn policy(network_policies: &str) -> Policy {
    let text = format!("version: 1\nnetwork_policies:\n{network_policies}");
    match Policy::from_yaml("test.yaml", &text) {
        Ok(p) => p,
        Err(e) => panic!("test policy does not parse: {e}\n{text}"),
    }
}

/// A policy letting `binary` reach `host:port` (loopback allowed).
pub fn allow_yaml(host: &str, port: u16, binary: &str) -> String {
    format!(
        "  test:\n    endpoints:\n      - host: \"{host}\"\n        port: {port}\n        allowed_ips: [\"127.0.0.0/8\"]\n    binaries:\n      - path: {binary}\n"
    )
}

pub fn caller(exe: &str) -> Caller {
    Caller {
        pid: 4242,
        exe: PathBuf::from(exe),
        ancestors: vec![PathBuf::from("/usr/bin/bash")],
    }
}

pub struct Harness {
    pub addr: SocketAddr,
    pub handle: PolicyHandle,
    pub task: JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start(network_policies: &str, exe: &str, config: ProxyConfig) -> Harness {
    let handle = match PolicyHandle::new(policy(network_policies)) {
        Ok(h) => h,
        Err(e) => panic!("policy handle: {e}"),
    };
    let proxy = match Proxy::new(config, handle.clone()) {
        Ok(p) => p,
        Err(e) => panic!("proxy: {e}"),
    };
    let listener = bind("127.0.0.1:0").await;
    let addr = local(&listener);
    let task = proxy.serve_tcp(
        listener,
        SandboxContext::new("test-sandbox", Arc::new(FixedIdentity(caller(exe)))),
    );
    Harness { addr, handle, task }
}

pub async fn bind(addr: &str) -> TcpListener {
    match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => panic!("bind {addr}: {e}"),
    }
}

pub fn local(listener: &TcpListener) -> SocketAddr {
    match listener.local_addr() {
        Ok(a) => a,
        Err(e) => panic!("local_addr: {e}"),
    }
}

/// An upstream that echoes every byte back, on `ip`:0.
pub async fn echo_server(ip: &str) -> SocketAddr {
    let listener = bind(&format!("{ip}:0")).await;
    let addr = local(&listener);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// An upstream HTTP server on `ip`:0 that records each raw request
/// (head and body) and answers `200 ok`.
pub async fn http_server(ip: &str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = bind(&format!("{ip}:0")).await;
    let addr = local(&listener);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let raw = read_request(&mut s).await;
                if let Ok(mut r) = record.lock() {
                    r.push(String::from_utf8_lossy(&raw).into_owned());
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, seen)
}

/// Read one request: the head, then a Content-Length or chunked body.
async fn read_request(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body = &buf[end + 4..];
            let done = if let Some(len) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                body.len() >= len
            } else if head.contains("transfer-encoding: chunked") {
                // The last chunk, then the trailer section up to its empty line.
                body.ends_with(b"\r\n\r\n")
                    && (body.starts_with(b"0\r\n") || find(body, b"\r\n0\r\n").is_some())
            } else {
                true
            };
            if done {
                return buf;
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return buf,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => panic!("connect {addr}: {e}"),
    }
}

/// A parsed response: status, lowercased header names with values, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_str(&self.body) {
            Ok(v) => v,
            Err(e) => panic!("body is not json ({e}): {}", self.body),
        }
    }
}

pub fn parse_response(raw: &[u8]) -> Response {
    let Some(end) = find(raw, b"\r\n\r\n") else {
        panic!("no response head in {:?}", String::from_utf8_lossy(raw));
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: String::from_utf8_lossy(&raw[end + 4..]).into_owned(),
    }
}

/// Send `request` on a new connection and read the response until the proxy closes.
pub async fn exchange(proxy: SocketAddr, request: &[u8]) -> Response {
    within("exchange", async {
        let mut s = connect(proxy).await;
        let _ = s.write_all(request).await;
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw).await;
        parse_response(&raw)
    })
    .await
}

/// Send a CONNECT and read just the response head; the stream is then the tunnel.
pub async fn open_tunnel(proxy: SocketAddr, target: &str) -> (Response, TcpStream) {
    within("tunnel", async {
        let mut s = connect(proxy).await;
        let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        let _ = s.write_all(req.as_bytes()).await;
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while find(&raw, b"\r\n\r\n").is_none() {
            match s.read(&mut byte).await {
                Ok(0) | Err(_) => break,
                Ok(_) => raw.push(byte[0]),
            }
        }
        let mut resp = parse_response(&raw);
        if resp.status != 200 {
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            resp.body = String::from_utf8_lossy(&rest).into_owned();
        }
        (resp, s)
    })
    .await
}

/// CONNECT and return only the status (the tunnel is dropped).
pub async fn connect_status(proxy: SocketAddr, target: &str) -> u16 {
    open_tunnel(proxy, target).await.0.status
}

/// A self-signed certificate for `name` and 127.0.0.1, made with Debian's openssl.
pub fn self_signed(
    dir: &std::path::Path,
    name: &str,
) -> (
    rustls::pki_types::CertificateDer<'static>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    use rustls::pki_types::pem::PemObject;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={name}")])
        .args([
            "-addext",
            &format!("subjectAltName=DNS:{name},IP:127.0.0.1"),
        ])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("openssl: {e}"));
    assert!(made.success(), "openssl req failed");
    (
        rustls::pki_types::CertificateDer::from_pem_file(&cert).unwrap_or_else(|e| panic!("{e}")),
        rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap_or_else(|e| panic!("{e}")),
    )
}

/// A TLS server on `ip`:0 with `cert`: after each handshake it records the server name the
/// client sent, answers one line, and closes.
pub async fn tls_server(
    ip: &str,
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| b.with_no_client_auth().with_single_cert(vec![cert], key))
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("{e}"));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = bind(&format!("{ip}:0")).await;
    let addr = local(&listener);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                let name = s.get_ref().1.server_name().unwrap_or("").to_string();
                if let Ok(mut r) = record.lock() {
                    r.push(name);
                }
                let _ = s.write_all(b"hello over tls\n").await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, seen)
}

/// A TLS client through an open tunnel, trusting `cert`, sending `server_name` (or no
/// name for an address); the line the server answered, or why not.
pub async fn tls_through(
    tunnel: TcpStream,
    cert: &rustls::pki_types::CertificateDer<'static>,
    server_name: &str,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut s = within("tls handshake", connector.connect(name, tunnel))
        .await
        .map_err(|e| e.to_string())?;
    let mut line = Vec::new();
    let _ = within("tls read", s.read_to_end(&mut line)).await;
    Ok(String::from_utf8_lossy(&line).into_owned())
}

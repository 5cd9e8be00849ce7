//! TLS termination (`tls: terminate`): a TLS upstream on loopback signed by a test CA (made
//! here with rcgen), a proxy terminating with a sandbox CA, and a rustls client trusting that
//! CA. Verdicts are what the upstream received, over which connections and ALPN.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use openshell_proxy::credentials::{Credential, CredentialSet};
use openshell_proxy::terminate::{SandboxCa, Termination, UpstreamTls};
use openshell_proxy::{FixedIdentity, PolicyHandle, Proxy, ProxyConfig, SandboxContext};
use pretty_assertions::assert_eq;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::support::*;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A test CA and a server certificate it signed for `localhost` and 127.0.0.1.
fn test_pki() -> (
    CertificateDer<'static>,
    CertificateDer<'static>,
    PrivateKeyDer<'static>,
) {
    let ca_key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).unwrap_or_else(|e| panic!("{e}"));
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap_or_else(|e| panic!("{e}"));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &ca)
        .unwrap_or_else(|e| panic!("{e}"));
    (
        ca.der().clone(),
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// What the upstream saw on one connection: the ALPN it negotiated and each request (head
/// and body).
#[derive(Debug, Clone, Default)]
struct Conn {
    alpn: Option<String>,
    requests: Vec<String>,
}

/// A keep-alive HTTP/1.1 server over TLS on 127.0.0.1:0. `/chunked` answers chunked; a
/// WebSocket upgrade gets 101 and then an echo; anything else `200` with `ok <path>`.
async fn upstream(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> (SocketAddr, Arc<Mutex<Vec<Conn>>>) {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map(|b| b.with_no_client_auth().with_single_cert(vec![cert], key))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = bind("127.0.0.1:0").await;
    let addr = local(&listener);
    let seen: Arc<Mutex<Vec<Conn>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let record = record.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let alpn = tls
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned());
                let index = {
                    let mut all = record.lock().unwrap_or_else(|e| e.into_inner());
                    all.push(Conn {
                        alpn,
                        requests: Vec::new(),
                    });
                    all.len() - 1
                };
                let mut buf = Vec::new();
                loop {
                    let Some(request) = read_message(&mut tls, &mut buf).await else {
                        return;
                    };
                    let text = String::from_utf8_lossy(&request).into_owned();
                    record.lock().unwrap_or_else(|e| e.into_inner())[index]
                        .requests
                        .push(text.clone());
                    let path = text.split(' ').nth(1).unwrap_or("").to_string();
                    let lower = text.to_ascii_lowercase();
                    if lower.contains("\r\nupgrade: websocket") {
                        let _ = tls
                            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                            .await;
                        let mut byte = [0u8; 64];
                        while let Ok(n) = tls.read(&mut byte).await {
                            if n == 0 || tls.write_all(&byte[..n]).await.is_err() {
                                return;
                            }
                        }
                        return;
                    }
                    let reply = if path == "/chunked" {
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\n\r\n".to_string()
                    } else {
                        let body = format!("ok {path}");
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    if tls.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// One message (head and a Content-Length or chunked body) from `s`, or `None` at the end.
async fn read_message<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body = &buf[end + 4..];
            let total = if let Some(len) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                (body.len() >= len).then_some(end + 4 + len)
            } else if head.contains("transfer-encoding: chunked") {
                find(body, b"0\r\n\r\n").map(|at| end + 4 + at + 5)
            } else {
                Some(end + 4)
            };
            if let Some(total) = total {
                return Some(buf.drain(..total).collect());
            }
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

struct Terminating {
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    approvals: Option<openshell_proxy::Approvals>,
    _task: Harness,
}

/// A proxy deciding with `network_policies`, terminating with a fresh sandbox CA, trusting
/// `upstream_ca` upstream, holding `credentials`.
async fn start_terminating(
    network_policies: &str,
    upstream_ca: CertificateDer<'static>,
    credentials: Vec<Credential>,
) -> Terminating {
    start_terminating_with(
        ProxyConfig::default(),
        network_policies,
        upstream_ca,
        credentials,
    )
    .await
}

/// [`start_terminating`] with `config`.
async fn start_terminating_with(
    config: ProxyConfig,
    network_policies: &str,
    upstream_ca: CertificateDer<'static>,
    credentials: Vec<Credential>,
) -> Terminating {
    let handle = PolicyHandle::new(policy(network_policies)).unwrap_or_else(|e| panic!("{e}"));
    let proxy = Proxy::new(config, handle.clone()).unwrap_or_else(|e| panic!("{e}"));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(upstream_ca).unwrap_or_else(|e| panic!("{e}"));
    let ca = SandboxCa::generate("test").unwrap_or_else(|e| panic!("{e}"));
    let ca_der = ca.certificate_der();
    let termination = Termination {
        ca,
        upstream: UpstreamTls::with_roots(roots).unwrap_or_else(|e| panic!("{e}")),
        credentials: CredentialSet::new(credentials),
    };
    let listener = bind("127.0.0.1:0").await;
    let addr = local(&listener);
    let task = proxy.serve_tcp(
        listener,
        SandboxContext::new("test-sandbox", Arc::new(FixedIdentity(caller(CURL))))
            .with_termination(Arc::new(termination)),
    );
    Terminating {
        addr,
        ca: ca_der,
        approvals: proxy.approvals().cloned(),
        _task: Harness { addr, handle, task },
    }
}

fn terminate_yaml(host: &str, port: u16, extra: &str) -> String {
    format!(
        "  test:\n    endpoints:\n      - host: \"{host}\"\n        port: {port}\n        allowed_ips: [\"127.0.0.0/8\"]\n        tls: terminate\n{extra}    binaries:\n      - path: {CURL}\n"
    )
}

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// CONNECT `host:port` through the proxy, then TLS with SNI `sni` trusting `ca`, offering
/// `alpn`.
async fn tls_through(
    proxy: SocketAddr,
    target: &str,
    sni: &str,
    ca: &CertificateDer<'static>,
    alpn: &[&[u8]],
) -> std::io::Result<ClientTls> {
    let (resp, tunnel) = open_tunnel(proxy, target).await;
    assert_eq!(resp.status, 200, "CONNECT {target}: {}", resp.body);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap_or_else(|e| panic!("{e}"));
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("{e}"))
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = ServerName::try_from(sni.to_owned()).unwrap_or_else(|e| panic!("{e}"));
    within(
        "client handshake",
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tunnel),
    )
    .await
}

/// Send `request` and read one response (its head and a Content-Length or chunked body).
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    request: &str,
) -> Option<Response> {
    within("round trip", async {
        s.write_all(request.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        let raw = read_message(s, &mut buf).await?;
        Some(parse_response(&raw))
    })
    .await
}

fn request_lines(seen: &Arc<Mutex<Vec<Conn>>>) -> Vec<Vec<String>> {
    seen.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|c| {
            c.requests
                .iter()
                .map(|r| r.lines().next().unwrap_or("").to_string())
                .collect()
        })
        .collect()
}

/// One keep-alive connection: GET allowed, DELETE denied (403, the connection stays), GET
/// allowed again, a POST with a body denied (403, the connection closes). The upstream sees
/// the two GETs, both on one connection of the proxy's, negotiated as http/1.1.
#[tokio::test]
async fn every_request_of_a_keep_alive_connection_is_decided() {
    let (ca, cert, key) = test_pki();
    let (up, seen) = upstream(cert, key).await;
    let p = start_terminating(
        &terminate_yaml("localhost", up.port(), "        access: read-only\n"),
        ca,
        Vec::new(),
    )
    .await;
    let target = format!("localhost:{}", up.port());
    let mut tls = tls_through(p.addr, &target, "localhost", &p.ca, &[b"h2", b"http/1.1"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let host = format!("Host: {target}\r\n");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\n{host}\r\n");
    let statuses = [
        round_trip(&mut tls, &get("/a"))
            .await
            .map(|r| (r.status, r.body)),
        round_trip(&mut tls, &format!("DELETE /x HTTP/1.1\r\n{host}\r\n"))
            .await
            .map(|r| (r.status, r.json()["missing"].to_string())),
        round_trip(&mut tls, &get("/%61/b//c"))
            .await
            .map(|r| (r.status, r.body)),
        round_trip(&mut tls, &get("/chunked"))
            .await
            .map(|r| (r.status, r.body)),
        round_trip(
            &mut tls,
            &format!("POST /y HTTP/1.1\r\n{host}Content-Length: 3\r\n\r\nabc"),
        )
        .await
        .map(|r| (r.status, r.header("connection").unwrap_or("").to_string())),
    ];
    assert_eq!(
        statuses,
        [
            Some((200, "ok /a".to_string())),
            Some((403, "[\"method\"]".to_string())),
            Some((200, "ok /a/b/c".to_string())),
            Some((200, "3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n".to_string())),
            Some((403, "close".to_string())),
        ]
    );
    let mut rest = Vec::new();
    let _ = within("close", tls.read_to_end(&mut rest)).await;
    assert_eq!(
        request_lines(&seen),
        vec![vec![
            "GET /a HTTP/1.1".to_string(),
            "GET /a/b/c HTTP/1.1".to_string(),
            "GET /chunked HTTP/1.1".to_string(),
        ]]
    );
    let alpn: Vec<Option<String>> = seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|c| c.alpn.clone())
        .collect();
    assert_eq!(alpn, vec![Some("http/1.1".to_string())]);
}

/// HTTP/2 is never negotiated: a client offering only h2 gets no handshake; a ClientHello
/// naming another host than the CONNECT's gets none either. Neither reaches the upstream.
#[tokio::test]
async fn h2_only_clients_and_other_server_names_get_no_handshake() {
    let (ca, cert, key) = test_pki();
    let (up, seen) = upstream(cert, key).await;
    let p = start_terminating(&terminate_yaml("localhost", up.port(), ""), ca, Vec::new()).await;
    let target = format!("localhost:{}", up.port());
    let h2 = tls_through(p.addr, &target, "localhost", &p.ca, &[b"h2"]).await;
    assert!(h2.is_err(), "an h2-only client completed a handshake");
    let fronted = tls_through(p.addr, &target, "example.com", &p.ca, &[]).await;
    assert!(
        fronted.is_err(),
        "a ClientHello for another host was answered"
    );
    let mut ok = tls_through(p.addr, &target, "localhost", &p.ca, &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = round_trip(
        &mut ok,
        &format!("GET /fine HTTP/1.1\r\nHost: {target}\r\n\r\n"),
    )
    .await;
    assert_eq!(resp.map(|r| r.status), Some(200));
    assert_eq!(
        request_lines(&seen),
        vec![vec!["GET /fine HTTP/1.1".to_string()]]
    );
}

/// A request whose Host names another host than the tunnel's is refused (421).
#[tokio::test]
async fn the_host_header_must_name_the_tunnels_host() {
    let (ca, cert, key) = test_pki();
    let (up, seen) = upstream(cert, key).await;
    let p = start_terminating(&terminate_yaml("localhost", up.port(), ""), ca, Vec::new()).await;
    let target = format!("localhost:{}", up.port());
    let mut tls = tls_through(p.addr, &target, "localhost", &p.ca, &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = round_trip(
        &mut tls,
        "GET / HTTP/1.1\r\nHost: metadata.internal\r\n\r\n",
    )
    .await;
    assert_eq!(resp.map(|r| r.status), Some(421));
    assert_eq!(request_lines(&seen), Vec::<Vec<String>>::new());
}

/// The upstream sees the real value only on the credential's endpoint; the placeholder sent
/// to another allowed host (here 127.0.0.1, the same server by another name), in a plain
/// HTTP request, or in the query without `query: true` is refused.
#[tokio::test]
async fn credentials_are_substituted_only_for_their_endpoint() {
    let (ca, cert, key) = test_pki();
    let (up, seen) = upstream(cert, key).await;
    let port = up.port();
    let cred = Credential::new(
        "api",
        "real-secret-value".into(),
        vec![("localhost".into(), port)],
        false,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let placeholder = cred.placeholder.clone();
    let yaml = format!(
        "{}{}",
        terminate_yaml("localhost", port, ""),
        terminate_yaml("127.0.0.1", port, "").replace("  test:", "  other:")
    );
    let p = start_terminating(&yaml, ca, vec![cred]).await;
    let auth = format!("Authorization: Bearer {placeholder}\r\n");
    let mut right = tls_through(
        p.addr,
        &format!("localhost:{port}"),
        "localhost",
        &p.ca,
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let ok = round_trip(
        &mut right,
        &format!("GET /v1 HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}\r\n"),
    )
    .await;
    let in_query = round_trip(
        &mut right,
        &format!("GET /v1?key={placeholder} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n"),
    )
    .await;
    let mut wrong = tls_through(
        p.addr,
        &format!("127.0.0.1:{port}"),
        "127.0.0.1",
        &p.ca,
        &[],
    )
    .await;
    // rustls sends no SNI for an address; the proxy terminates for the address.
    let elsewhere = match wrong.as_mut() {
        Ok(tls) => {
            round_trip(
                tls,
                &format!("GET /leak HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n"),
            )
            .await
        }
        Err(e) => panic!("{e}"),
    };
    let plain = exchange(
        p.addr,
        format!(
            "GET http://localhost:{port}/plain HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}\r\n"
        )
        .as_bytes(),
    )
    .await;
    let got: Vec<(u16, String)> = [ok, in_query, elsewhere]
        .into_iter()
        .flatten()
        .map(|r| {
            let missing = serde_json::from_str::<serde_json::Value>(&r.body)
                .ok()
                .and_then(|v| v.get("missing").map(ToString::to_string))
                .unwrap_or_default();
            (r.status, missing)
        })
        .chain([(plain.status, plain.json()["missing"].to_string())])
        .collect();
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[0].0, 200);
    assert_eq!(
        got[1..].to_vec(),
        vec![
            (403, "[\"credential\"]".to_string()),
            (403, "[\"credential\"]".to_string()),
            (403, "[\"credential\"]".to_string()),
        ]
    );
    let requests: Vec<String> = seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .flat_map(|c| c.requests.clone())
        .collect();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(
        requests[0].starts_with("GET /v1 HTTP/1.1\r\n"),
        "{}",
        requests[0]
    );
    assert!(
        requests[0].contains("authorization: Bearer real-secret-value\r\n"),
        "{}",
        requests[0]
    );
    assert!(!requests[0].contains(&placeholder));
}

/// An `Upgrade: websocket` request passes only where the endpoint says `protocol: websocket`,
/// and the connection then carries the WebSocket both ways.
#[tokio::test]
async fn websocket_upgrades_only_where_the_endpoint_allows_them() {
    let (ca, cert, key) = test_pki();
    let (up, seen) = upstream(cert, key).await;
    let target = format!("localhost:{}", up.port());
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: {target}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let plain = start_terminating(
        &terminate_yaml("localhost", up.port(), ""),
        ca.clone(),
        Vec::new(),
    )
    .await;
    let mut tls = tls_through(plain.addr, &target, "localhost", &plain.ca, &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let refused = round_trip(&mut tls, &upgrade)
        .await
        .map(|r| (r.status, r.json()["missing"].to_string()));
    assert_eq!(refused, Some((403, "[\"protocol\"]".to_string())));
    let ws = start_terminating(
        &terminate_yaml("localhost", up.port(), "        protocol: websocket\n"),
        ca,
        Vec::new(),
    )
    .await;
    let mut tls = tls_through(ws.addr, &target, "localhost", &ws.ca, &[])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let switched = round_trip(&mut tls, &upgrade).await.map(|r| r.status);
    assert_eq!(switched, Some(101));
    let echoed = within("echo", async {
        tls.write_all(b"frame").await.ok()?;
        let mut got = [0u8; 5];
        tls.read_exact(&mut got).await.ok()?;
        Some(got)
    })
    .await;
    assert_eq!(echoed.as_ref().map(|b| &b[..]), Some(&b"frame"[..]));
    assert_eq!(
        request_lines(&seen),
        vec![vec!["GET /ws HTTP/1.1".to_string()]]
    );
}

/// `enforcement: ask` on terminated connections: the CONNECT is held and asked (no method or
/// path yet); once allowed, its requests through that endpoint go on without asking; a
/// request that only another ask endpoint allows is held and asked with its method and path,
/// and a deny of it reaches no upstream.
#[tokio::test]
async fn an_approved_terminated_connection_asks_again_only_for_another_endpoint() {
    use openshell_proxy::{Answer, ApprovalConfig};
    let (ca, cert, key) = test_pki();
    let (up, seen) = upstream(cert, key).await;
    let port = up.port();
    let network = format!(
        "  asked:\n    endpoints:\n      - {{ host: localhost, port: {port}, allowed_ips: [127.0.0.0/8], tls: terminate, enforcement: ask, access: read-only }}\n    binaries: [{{ path: {CURL} }}]\n  writes:\n    endpoints:\n      - {{ host: localhost, port: {port}, allowed_ips: [127.0.0.0/8], tls: terminate, enforcement: ask, rules: [{{ allow: {{ method: POST, path: /upload }} }}] }}\n    binaries: [{{ path: {CURL} }}]\n"
    );
    let config = ProxyConfig {
        approvals: Some(ApprovalConfig {
            timeout: std::time::Duration::from_secs(20),
            max_pending: 8,
        }),
        ..ProxyConfig::default()
    };
    let p = start_terminating_with(config, &network, ca, Vec::new()).await;
    let approvals = p.approvals.clone().unwrap_or_else(|| panic!("approvals"));
    let next_question = |seen_ids: Vec<String>| {
        let approvals = approvals.clone();
        async move {
            let mut found = None;
            eventually("a question", || {
                found = approvals
                    .pending()
                    .into_iter()
                    .find(|q| !seen_ids.iter().any(|s| q["id"] == s.as_str()));
                found.is_some()
            })
            .await;
            found.unwrap_or_default()
        }
    };
    let target = format!("localhost:{port}");
    let (proxy, ca_der, t) = (p.addr, p.ca.clone(), target.clone());
    let connecting =
        tokio::spawn(
            async move { tls_through(proxy, &t, "localhost", &ca_der, &[b"http/1.1"]).await },
        );
    let connect_q = next_question(Vec::new()).await;
    assert_eq!(
        (connect_q["policy"].as_str(), connect_q["path"].is_null()),
        (Some("asked"), true)
    );
    let connect_id = connect_q["id"].as_str().unwrap_or("").to_string();
    assert_eq!(
        approvals.answer(&connect_id, Answer::AllowOnce, "test"),
        Ok(())
    );
    let mut tls = within("connect", connecting)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let host = format!("Host: {target}\r\n");
    // Through the approved endpoint: no question.
    let get = round_trip(&mut tls, &format!("GET /a HTTP/1.1\r\n{host}\r\n"))
        .await
        .map(|r| r.status);
    assert_eq!(get, Some(200));
    assert_eq!(approvals.pending().len(), 0);
    // Only the other ask endpoint allows this POST: asked with its method and path.
    let post = format!("POST /upload HTTP/1.1\r\n{host}Content-Length: 3\r\n\r\nabc");
    let posting = tokio::spawn(async move { round_trip(&mut tls, &post).await.map(|r| r.status) });
    let post_q = next_question(vec![connect_id]).await;
    assert_eq!(
        (
            post_q["policy"].as_str(),
            post_q["method"].as_str(),
            post_q["path"].as_str()
        ),
        (Some("writes"), Some("POST"), Some("/upload"))
    );
    let post_id = post_q["id"].as_str().unwrap_or("").to_string();
    assert_eq!(approvals.answer(&post_id, Answer::Deny, "test"), Ok(()));
    assert_eq!(
        within("post", posting)
            .await
            .unwrap_or_else(|e| panic!("{e}")),
        Some(403)
    );
    assert_eq!(
        request_lines(&seen),
        vec![vec!["GET /a HTTP/1.1".to_string()]]
    );
}

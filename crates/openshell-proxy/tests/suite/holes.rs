//! The egress holes an outside review found (issue 16), closed at the proxy: method/path
//! rules are never bypassed through CONNECT, a passthrough tunnel's TLS server name must be
//! its CONNECT host, request paths are normalised once, chunked framing is re-serialised,
//! refused connections leave nothing behind and audit lines are bounded. Verdicts are what
//! the upstream received.

use std::time::Duration;

use openshell_proxy::ProxyConfig;
use pretty_assertions::assert_eq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::support::*;

fn endpoint_yaml(host: &str, port: u16, extra: &str) -> String {
    format!(
        "  test:\n    endpoints:\n      - host: \"{host}\"\n        port: {port}\n        allowed_ips: [\"127.0.0.0/8\"]\n{extra}    binaries:\n      - path: {CURL}\n"
    )
}

/// CONNECT to an endpoint with method/path rules and no `tls: terminate` is refused with a
/// reason naming the fix; `tls: terminate` on a proxy serving the sandbox without TLS
/// termination is refused too rather than tunnelled. Neither reaches the upstream.
#[tokio::test]
async fn connect_never_bypasses_method_and_path_rules() {
    let (up, seen) = http_server("127.0.0.2").await;
    let cases = [
        (
            "        access: read-only\n",
            "tls",
            "which a CONNECT tunnel cannot enforce",
        ),
        (
            "        rules:\n          - allow: { method: GET, path: \"/public/**\" }\n",
            "tls",
            "which a CONNECT tunnel cannot enforce",
        ),
        (
            "        access: read-only\n        tls: terminate\n",
            "tls",
            "this proxy was started without TLS termination",
        ),
    ];
    for (extra, missing, says) in cases {
        let h = start(
            &endpoint_yaml("127.0.0.2", up.port(), extra),
            CURL,
            ProxyConfig::default(),
        )
        .await;
        let (resp, mut tunnel) = open_tunnel(h.addr, &up.to_string()).await;
        let body = resp.json();
        assert_eq!(
            (resp.status, body["missing"].clone()),
            (403, serde_json::json!([missing])),
            "{extra}: {body}"
        );
        let reason = body["reason"].as_str().unwrap_or("");
        assert!(reason.contains(says), "{extra}: {reason}");
        // What a POST through the tunnel would have been goes nowhere.
        let _ = tunnel
            .write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
            .await;
    }
    // The same endpoints still decide plain-HTTP requests by their rules.
    let h = start(
        &endpoint_yaml("127.0.0.2", up.port(), "        access: read-only\n"),
        CURL,
        ProxyConfig::default(),
    )
    .await;
    let get = format!("GET http://{up}/ok HTTP/1.1\r\nHost: {up}\r\n\r\n");
    let post = format!("POST http://{up}/no HTTP/1.1\r\nHost: {up}\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(exchange(h.addr, get.as_bytes()).await.status, 200);
    assert_eq!(exchange(h.addr, post.as_bytes()).await.status, 403);
    let lines: Vec<String> = seen
        .lock()
        .map(|s| {
            s.iter()
                .map(|r| r.lines().next().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(lines, vec!["GET /ok HTTP/1.1".to_string()]);
}

/// A passthrough tunnel to a host name carries TLS only for that name: a ClientHello for
/// another name, one without a name, and bytes that are not TLS close the tunnel before
/// anything reaches the upstream; the same name (any case, trailing dot) passes. A tunnel
/// to an address takes TLS without a name and plain bytes, not a ClientHello naming a host.
#[tokio::test]
async fn passthrough_tunnels_check_the_tls_server_name() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (cert, key) = self_signed(dir.path(), "localhost");
    let (up, names) = tls_server("127.0.0.1", cert.clone(), key).await;
    let audit = dir.path().join("audit.jsonl");
    let config = ProxyConfig {
        audit_log: Some(audit.clone()),
        header_timeout: Duration::from_secs(2),
        ..ProxyConfig::default()
    };
    let mut policies = endpoint_yaml("localhost", up.port(), "");
    policies
        .push_str(&endpoint_yaml("127.0.0.1", up.port(), "").replace("  test:", "  byaddress:"));
    let h = start(&policies, CURL, config).await;
    let through = |target: String, name: &'static str| {
        let cert = cert.clone();
        async move {
            let (resp, tunnel) = open_tunnel(h.addr, &target).await;
            assert_eq!(resp.status, 200, "{target}");
            tls_through(tunnel, &cert, name).await
        }
    };
    let target = format!("localhost:{}", up.port());
    assert_eq!(
        through(target.clone(), "localhost").await,
        Ok("hello over tls\n".into())
    );
    assert_eq!(
        through(format!("LocalHost.:{}", up.port()), "localhost").await,
        Ok("hello over tls\n".into())
    );
    let fronted = through(target.clone(), "evil.example").await;
    assert!(fronted.is_err(), "{fronted:?}");
    // No name at all: an address as the TLS client's server name sends no SNI.
    let unnamed = through(target.clone(), "127.0.0.1").await;
    assert!(unnamed.is_err(), "{unnamed:?}");
    // Plain bytes to a host name: closed without a byte through.
    let (resp, mut tunnel) = open_tunnel(h.addr, &target).await;
    assert_eq!(resp.status, 200);
    let _ = tunnel
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let mut rest = Vec::new();
    let _ = within("closed", tunnel.read_to_end(&mut rest)).await;
    assert_eq!(rest, Vec::<u8>::new());
    // To an address: TLS without a name passes, a name is refused.
    let by_address = format!("127.0.0.1:{}", up.port());
    assert_eq!(
        through(by_address.clone(), "127.0.0.1").await,
        Ok("hello over tls\n".into())
    );
    let named = through(by_address, "localhost").await;
    assert!(named.is_err(), "{named:?}");
    // The upstream completed handshakes only for the right name, or none on the address.
    let names = names.lock().map(|n| n.clone()).unwrap_or_default();
    assert_eq!(
        names,
        vec!["localhost".to_string(), "localhost".into(), String::new()]
    );
    // Each refusal is a decision in the audit log.
    let log = std::fs::read_to_string(&audit).unwrap_or_default();
    let refusals: Vec<String> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["action"] == "deny")
        .map(|v| v["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        refusals,
        vec![
            "TLS server name evil.example does not match the CONNECT host localhost".to_string(),
            "the TLS ClientHello names no server; a tunnel to localhost must name it (SNI)".into(),
            "a tunnel to localhost must start with a TLS ClientHello naming it; these bytes are not TLS".into(),
            "TLS server name localhost on a tunnel to an address: the CONNECT must name the host".into(),
        ]
    );
}

/// Paths are decided as the upstream will receive them: decoded unreserved characters and
/// collapsed slashes are normalised (and sent so), `;` parameters and encoded slashes or dot
/// segments are refused.
#[tokio::test]
async fn paths_are_decided_as_sent() {
    let (up, seen) = http_server("127.0.0.2").await;
    let extra = "        access: full\n        deny_rules:\n          - { method: \"*\", path: /admin }\n          - { method: \"*\", path: \"/admin/**\" }\n          - { method: \"*\", path: \"/secret\" }\n";
    let h = start(
        &endpoint_yaml("127.0.0.2", up.port(), extra),
        CURL,
        ProxyConfig::default(),
    )
    .await;
    let mut got = Vec::new();
    for path in [
        "/%61dmin",
        "//admin",
        "/%61dmin/x",
        "/x;/admin",
        "/x%2F..%2F..%2Fsecret",
        "/x/%2e%2e/secret",
        "/%70ublic//a",
    ] {
        let req = format!("GET http://{up}{path} HTTP/1.1\r\nHost: {up}\r\n\r\n");
        got.push((path, exchange(h.addr, req.as_bytes()).await.status));
    }
    assert_eq!(
        got,
        vec![
            ("/%61dmin", 403),
            ("//admin", 403),
            ("/%61dmin/x", 403),
            ("/x;/admin", 400),
            ("/x%2F..%2F..%2Fsecret", 400),
            ("/x/%2e%2e/secret", 400),
            ("/%70ublic//a", 200),
        ]
    );
    let lines: Vec<String> = seen
        .lock()
        .map(|s| {
            s.iter()
                .map(|r| r.lines().next().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(lines, vec!["GET /public/a HTTP/1.1".to_string()]);
}

/// Chunk sizes and trailers reach the upstream re-serialised (no extensions, no framing
/// trailers); bare LF in the framing ends the request before its body goes on.
#[tokio::test]
async fn chunked_framing_is_rewritten() {
    let (up, seen) = http_server("127.0.0.2").await;
    let h = start(
        &endpoint_yaml("127.0.0.2", up.port(), ""),
        CURL,
        ProxyConfig::default(),
    )
    .await;
    let head =
        format!("POST http://{up}/c HTTP/1.1\r\nHost: {up}\r\nTransfer-Encoding: chunked\r\n\r\n");
    let good = format!("{head}5;ext=\"x\"\r\nhello\r\n0\r\nX-Sum: 1\r\nContent-Length: 5\r\n\r\n");
    assert_eq!(exchange(h.addr, good.as_bytes()).await.status, 200);
    let bare = format!("{head}5\nhello\r\n0\r\n\r\n");
    let _ = within("bare lf", async {
        let mut s = connect(h.addr).await;
        let _ = s.write_all(bare.as_bytes()).await;
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await;
    let count = std::sync::Arc::clone(&seen);
    eventually("both requests at the upstream", || {
        count.lock().map(|s| s.len()).unwrap_or(0) == 2
    })
    .await;
    let requests = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let bodies: Vec<&str> = requests
        .iter()
        .map(|r| r.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or(""))
        .collect();
    // The second request's head went upstream, none of its body did.
    assert_eq!(bodies, vec!["5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n", ""]);
}

/// A connection over the limit is answered 503 and closed by the accept loop itself: the
/// proxy does not keep reading it (bytes sent after the answer are met with a reset).
#[tokio::test]
async fn over_the_limit_connections_are_closed_at_accept() {
    let up = echo_server("127.0.0.2").await;
    let config = ProxyConfig {
        max_connections: 1,
        ..ProxyConfig::default()
    };
    let h = start(&endpoint_yaml("127.0.0.2", up.port(), ""), CURL, config).await;
    let (resp, _held) = open_tunnel(h.addr, &up.to_string()).await;
    assert_eq!(resp.status, 200);
    let mut refused = connect(h.addr).await;
    let mut answer = Vec::new();
    let _ = within("503", refused.read_to_end(&mut answer)).await;
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 503 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // The proxy no longer has the socket: the first write is met with a reset, the second
    // fails.
    let _ = refused.write_all(b"more").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = refused.write_all(b"more").await.map_err(|e| e.kind());
    assert!(
        matches!(
            second,
            Err(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
        ),
        "{second:?}"
    );
}

/// A sandbox chooses host names and paths: audit lines stay bounded.
#[tokio::test]
async fn audit_lines_are_bounded() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let audit = dir.path().join("audit.jsonl");
    let config = ProxyConfig {
        audit_log: Some(audit.clone()),
        header_limit: 32 * 1024,
        ..ProxyConfig::default()
    };
    let h = start(&endpoint_yaml("127.0.0.2", 9, ""), CURL, config).await;
    let path = "/p".repeat(8000);
    let req = format!("GET http://127.0.0.2:9{path} HTTP/1.1\r\nHost: x\r\n\r\n");
    let _ = exchange(h.addr, req.as_bytes()).await;
    let log = std::fs::read_to_string(&audit).unwrap_or_default();
    let line = log.lines().next().unwrap_or("");
    assert!(line.len() < 6000, "{}", line.len());
    let json: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
    assert!(
        json["path"]
            .as_str()
            .is_some_and(|p| p.ends_with("...[14976 more bytes]")),
        "{json}"
    );
}

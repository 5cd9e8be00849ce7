//! CONNECT tunnels: allow, deny by host and binary, SSRF, limits, audit log.

use openshell_proxy::ProxyConfig;
use pretty_assertions::assert_eq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::support::*;

#[tokio::test]
async fn allowed_connect_passes_bytes_both_ways() {
    let up = echo_server("127.0.0.2").await;
    let h = start(
        &allow_yaml("127.0.0.2", up.port(), CURL),
        CURL,
        ProxyConfig::default(),
    )
    .await;
    let (resp, mut tunnel) = open_tunnel(h.addr, &up.to_string()).await;
    assert_eq!(resp.status, 200);
    within("echo", async {
        tunnel.write_all(b"ping through the tunnel").await.ok();
        let mut back = [0u8; 23];
        tunnel.read_exact(&mut back).await.ok();
        assert_eq!(&back, b"ping through the tunnel");
    })
    .await;
}

fn deny_fields(body: &serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "error": body["error"],
        "host": body["host"],
        "port": body["port"],
        "binary": body["binary"],
        "missing": body["missing"],
        "closest_policy": body["closest_policy"],
    })
}

#[tokio::test]
async fn other_host_gets_403_naming_host() {
    let up = echo_server("127.0.0.2").await;
    let h = start(
        &allow_yaml("127.0.0.2", up.port(), CURL),
        CURL,
        ProxyConfig::default(),
    )
    .await;
    let (resp, _) = open_tunnel(h.addr, &format!("other.example:{}", up.port())).await;
    assert_eq!(resp.status, 403);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let body = resp.json();
    assert_eq!(
        deny_fields(&body),
        serde_json::json!({
            "error": "policy_denied",
            "host": "other.example",
            "port": up.port(),
            "binary": CURL,
            "missing": ["host"],
            "closest_policy": "test",
        })
    );
    assert!(
        body["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{body}"
    );
    assert!(body["suggestion"].as_str().is_some(), "{body}");
}

#[tokio::test]
async fn other_binary_gets_403_naming_binary() {
    let up = echo_server("127.0.0.2").await;
    let h = start(
        &allow_yaml("127.0.0.2", up.port(), CURL),
        "/usr/bin/wget",
        ProxyConfig::default(),
    )
    .await;
    let (resp, _) = open_tunnel(h.addr, &up.to_string()).await;
    assert_eq!(resp.status, 403);
    assert_eq!(
        deny_fields(&resp.json()),
        serde_json::json!({
            "error": "policy_denied",
            "host": "127.0.0.2",
            "port": up.port(),
            "binary": "/usr/bin/wget",
            "missing": ["binary"],
            "closest_policy": "test",
        })
    );
}

#[tokio::test]
async fn ancestor_binary_is_allowed() {
    let up = echo_server("127.0.0.3").await;
    // The fixed caller's ancestor is /usr/bin/bash.
    let h = start(
        &allow_yaml("127.0.0.3", up.port(), "/usr/bin/bash"),
        "/usr/bin/wget",
        ProxyConfig::default(),
    )
    .await;
    assert_eq!(connect_status(h.addr, &up.to_string()).await, 200);
}

#[tokio::test]
async fn loopback_name_without_allowed_ips_is_refused() {
    let up = echo_server("127.0.0.2").await;
    let yaml = format!(
        "  local:\n    endpoints:\n      - host: localhost\n        port: {}\n    binaries:\n      - path: {CURL}\n",
        up.port()
    );
    let h = start(&yaml, CURL, ProxyConfig::default()).await;
    let (resp, _) = open_tunnel(h.addr, &format!("localhost:{}", up.port())).await;
    assert_eq!(resp.status, 403);
    let body = resp.json();
    let reason = body["reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.contains("loopback") && reason.contains("allowed_ips"),
        "{body}"
    );
    assert_eq!(body["closest_policy"], "local");
}

#[tokio::test]
async fn metadata_address_is_refused_before_connecting() {
    let yaml = format!(
        "  meta:\n    endpoints:\n      - host: 169.254.169.254\n        port: 80\n    binaries:\n      - path: {CURL}\n"
    );
    let h = start(&yaml, CURL, ProxyConfig::default()).await;
    let (resp, _) = open_tunnel(h.addr, "169.254.169.254:80").await;
    assert_eq!(resp.status, 403);
    let reason = resp.json()["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("cloud metadata"), "{reason}");
    // Forward form is refused the same way.
    let resp = exchange(
        h.addr,
        b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
    )
    .await;
    assert_eq!(resp.status, 403);
}

#[tokio::test]
async fn allowed_ips_restricts_the_resolved_address() {
    let up = echo_server("127.0.0.2").await;
    let yaml = format!(
        "  narrow:\n    endpoints:\n      - host: \"127.0.0.2\"\n        port: {}\n        allowed_ips: [\"127.0.0.3/32\"]\n    binaries:\n      - path: {CURL}\n",
        up.port()
    );
    let h = start(&yaml, CURL, ProxyConfig::default()).await;
    let (resp, _) = open_tunnel(h.addr, &up.to_string()).await;
    assert_eq!(resp.status, 403);
    let reason = resp.json()["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("outside the endpoint's allowed_ips"),
        "{reason}"
    );
}

#[tokio::test]
async fn connection_limit_gives_503() {
    let up = echo_server("127.0.0.2").await;
    let config = ProxyConfig {
        max_connections: 1,
        ..ProxyConfig::default()
    };
    let h = start(&allow_yaml("127.0.0.2", up.port(), CURL), CURL, config).await;
    let (resp, held) = open_tunnel(h.addr, &up.to_string()).await;
    assert_eq!(resp.status, 200);
    let resp = exchange(h.addr, b"CONNECT 127.0.0.2:1 HTTP/1.1\r\n\r\n").await;
    assert_eq!(resp.status, 503);
    drop(held);
    // The permit comes back once the tunnel closes.
    let addr = h.addr;
    let target = up.to_string();
    within("permit released", async {
        loop {
            if connect_status(addr, &target).await == 200 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn decisions_go_to_the_audit_log() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("audit.jsonl");
    let up = echo_server("127.0.0.2").await;
    let config = ProxyConfig {
        audit_log: Some(log.clone()),
        ..ProxyConfig::default()
    };
    let h = start(&allow_yaml("127.0.0.2", up.port(), CURL), CURL, config).await;
    assert_eq!(connect_status(h.addr, &up.to_string()).await, 200);
    assert_eq!(connect_status(h.addr, "denied.example:443").await, 403);
    // Same destination again: served from the decision cache, still logged.
    assert_eq!(connect_status(h.addr, &up.to_string()).await, 200);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let summary: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            serde_json::json!([
                l["sandbox"],
                l["host"],
                l["port"],
                l["binary"],
                l["pid"],
                l["ancestors"],
                l["action"],
                l["policy"],
                l["generation"]
            ])
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            serde_json::json!([
                "test-sandbox",
                "127.0.0.2",
                up.port(),
                CURL,
                4242,
                ["/usr/bin/bash"],
                "allow",
                "test",
                1
            ]),
            serde_json::json!([
                "test-sandbox",
                "denied.example",
                443,
                CURL,
                4242,
                ["/usr/bin/bash"],
                "deny",
                null,
                1
            ]),
            serde_json::json!([
                "test-sandbox",
                "127.0.0.2",
                up.port(),
                CURL,
                4242,
                ["/usr/bin/bash"],
                "allow",
                "test",
                1
            ]),
        ]
    );
    assert!(lines.iter().all(|l| l["src"]
        .as_str()
        .is_some_and(|s| s.starts_with("127.0.0.1:"))));
}

#[tokio::test]
async fn dropping_the_guard_stops_serving_and_closes_tunnels() {
    use openshell_proxy::{FixedIdentity, PolicyHandle, Proxy, SandboxContext, ServeGuard};
    let up = echo_server("127.0.0.2").await;
    let handle = PolicyHandle::new(policy(&allow_yaml("127.0.0.2", up.port(), CURL)))
        .unwrap_or_else(|e| panic!("{e}"));
    let proxy = Proxy::new(ProxyConfig::default(), handle).unwrap_or_else(|e| panic!("{e}"));
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let addr = std_listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let task = proxy
        .serve_std_tcp(
            std_listener,
            SandboxContext::new("guarded", std::sync::Arc::new(FixedIdentity(caller(CURL)))),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let guard = ServeGuard(task);
    let (resp, mut tunnel) = open_tunnel(addr, &up.to_string()).await;
    assert_eq!(resp.status, 200);
    drop(guard);
    within("tunnel closed", async {
        let mut buf = [0u8; 16];
        // EOF (or reset) once the connection task is aborted.
        let n = tunnel.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0);
    })
    .await;
    within("listener closed", async {
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

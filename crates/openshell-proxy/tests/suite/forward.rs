//! Absolute-form plain-HTTP forwarding and L7 rules.

use openshell_proxy::ProxyConfig;
use pretty_assertions::assert_eq;

use super::support::*;

fn l7_yaml(host: &str, port: u16, extra: &str) -> String {
    format!(
        "  web:\n    endpoints:\n      - host: \"{host}\"\n        port: {port}\n        allowed_ips: [\"127.0.0.0/8\"]\n{extra}    binaries:\n      - path: {CURL}\n"
    )
}

#[tokio::test]
async fn forward_form_is_rewritten_to_origin_form() {
    let (up, seen) = http_server("127.0.0.2").await;
    let h = start(
        &allow_yaml("127.0.0.2", up.port(), CURL),
        CURL,
        ProxyConfig::default(),
    )
    .await;
    let req = format!(
        "GET http://{up}/a/b?x=1 HTTP/1.1\r\nHost: {up}\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nUser-Agent: test\r\n\r\n"
    );
    let resp = exchange(h.addr, req.as_bytes()).await;
    assert_eq!((resp.status, resp.body.as_str()), (200, "ok"));
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(
        seen,
        vec![format!(
            "GET /a/b?x=1 HTTP/1.1\r\nHost: {up}\r\nuser-agent: test\r\nConnection: close\r\n\r\n"
        )]
    );
}

#[tokio::test]
async fn read_only_allows_get_and_denies_post() {
    let (up, seen) = http_server("127.0.0.2").await;
    let h = start(
        &l7_yaml("127.0.0.2", up.port(), "        access: read-only\n"),
        CURL,
        ProxyConfig::default(),
    )
    .await;
    let get = format!("GET http://{up}/simple/ HTTP/1.1\r\nHost: {up}\r\n\r\n");
    assert_eq!(exchange(h.addr, get.as_bytes()).await.status, 200);
    let post =
        format!("POST http://{up}/upload HTTP/1.1\r\nHost: {up}\r\nContent-Length: 5\r\n\r\nhello");
    let resp = exchange(h.addr, post.as_bytes()).await;
    assert_eq!(resp.status, 403);
    let body = resp.json();
    assert_eq!(body["error"], "policy_denied");
    assert!(
        body["missing"]
            .as_array()
            .is_some_and(|m| m.contains(&serde_json::json!("method"))),
        "{body}"
    );
    // Only the GET reached upstream.
    assert_eq!(seen.lock().map(|s| s.len()).unwrap_or(0), 1);
}

#[tokio::test]
async fn path_rules_apply() {
    let (up, _) = http_server("127.0.0.3").await;
    let rules = "        rules:\n          - allow: { method: GET, path: \"/api/**\" }\n";
    let h = start(
        &l7_yaml("127.0.0.3", up.port(), rules),
        CURL,
        ProxyConfig::default(),
    )
    .await;
    let ok = format!("GET http://{up}/api/v1/x HTTP/1.1\r\nHost: {up}\r\n\r\n");
    assert_eq!(exchange(h.addr, ok.as_bytes()).await.status, 200);
    let no = format!("GET http://{up}/admin HTTP/1.1\r\nHost: {up}\r\n\r\n");
    let resp = exchange(h.addr, no.as_bytes()).await;
    assert_eq!(resp.status, 403);
    assert!(
        resp.json()["missing"]
            .as_array()
            .is_some_and(|m| m.contains(&serde_json::json!("path"))),
        "{}",
        resp.body
    );
}

#[tokio::test]
async fn audit_mode_forwards_and_logs_audit() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("audit.jsonl");
    let (up, seen) = http_server("127.0.0.2").await;
    let config = ProxyConfig {
        audit_log: Some(log.clone()),
        ..ProxyConfig::default()
    };
    let h = start(
        &l7_yaml(
            "127.0.0.2",
            up.port(),
            "        access: read-only\n        enforcement: audit\n",
        ),
        CURL,
        config,
    )
    .await;
    let post =
        format!("POST http://{up}/upload HTTP/1.1\r\nHost: {up}\r\nContent-Length: 5\r\n\r\nhello");
    let resp = exchange(h.addr, post.as_bytes()).await;
    assert_eq!(resp.status, 200);
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].ends_with("\r\n\r\nhello"), "{seen:?}");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let line: serde_json::Value =
        serde_json::from_str(text.lines().next().unwrap_or("{}")).unwrap_or_default();
    assert_eq!(
        (
            line["action"].clone(),
            line["method"].clone(),
            line["path"].clone()
        ),
        (
            serde_json::json!("audit"),
            serde_json::json!("POST"),
            serde_json::json!("/upload")
        )
    );
}

#[tokio::test]
async fn bodies_are_forwarded_exactly() {
    let (up, seen) = http_server("127.0.0.2").await;
    let h = start(
        &l7_yaml("127.0.0.2", up.port(), "        access: read-write\n"),
        CURL,
        ProxyConfig::default(),
    )
    .await;
    let chunked = format!(
        "POST http://{up}/c HTTP/1.1\r\nHost: {up}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    assert_eq!(exchange(h.addr, chunked.as_bytes()).await.status, 200);
    let fixed = format!("PUT http://{up}/f HTTP/1.1\r\nHost: {up}\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!(exchange(h.addr, fixed.as_bytes()).await.status, 200);
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert_eq!(
        seen,
        vec![
            format!("POST /c HTTP/1.1\r\nHost: {up}\r\ntransfer-encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            format!("PUT /f HTTP/1.1\r\nHost: {up}\r\ncontent-length: 3\r\nConnection: close\r\n\r\nabc"),
        ]
    );
}

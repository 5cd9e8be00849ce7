//! Malformed requests get clean errors and the proxy keeps serving.

use openshell_proxy::ProxyConfig;
use pretty_assertions::assert_eq;

use super::support::*;

#[tokio::test]
async fn malformed_requests_get_clean_errors() {
    let up = echo_server("127.0.0.2").await;
    let config = ProxyConfig {
        header_limit: 4096,
        ..ProxyConfig::default()
    };
    let h = start(&allow_yaml("127.0.0.2", up.port(), CURL), CURL, config).await;
    let big = format!(
        "GET http://{up}/ HTTP/1.1\r\nHost: {up}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(16 * 1024)
    );
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("oversized headers", big.into_bytes(), 431),
        (
            "https in forward form",
            b"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
            400,
        ),
        ("connect without port", b"CONNECT example.com HTTP/1.1\r\n\r\n".to_vec(), 400),
        ("connect port 0", b"CONNECT example.com:0 HTTP/1.1\r\n\r\n".to_vec(), 400),
        ("connect garbage target", b"CONNECT ::::: HTTP/1.1\r\n\r\n".to_vec(), 400),
        (
            "duplicate host",
            format!("GET http://{up}/ HTTP/1.1\r\nHost: {up}\r\nHost: evil.example\r\n\r\n")
                .into_bytes(),
            400,
        ),
        (
            "content-length with transfer-encoding",
            format!(
                "POST http://{up}/ HTTP/1.1\r\nHost: {up}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
            400,
        ),
        (
            "conflicting content-length",
            format!(
                "POST http://{up}/ HTTP/1.1\r\nHost: {up}\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcd"
            )
            .into_bytes(),
            400,
        ),
        (
            "origin form",
            b"GET /index.html HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
            400,
        ),
        ("garbage", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n".to_vec(), 400),
        ("text garbage", b"HELLO THERE\r\n\r\n".to_vec(), 400),
    ];
    let mut got = Vec::new();
    for (name, raw, _) in &cases {
        got.push((*name, exchange(h.addr, raw).await.status));
    }
    let want: Vec<(&str, u16)> = cases.iter().map(|(n, _, s)| (*n, *s)).collect();
    assert_eq!(got, want);
    // Still serving.
    assert_eq!(connect_status(h.addr, &up.to_string()).await, 200);
    let resp = exchange(h.addr, b"GET https://example.com/ HTTP/1.1\r\n\r\n").await;
    assert!(resp.body.contains("CONNECT"), "{}", resp.body);
}

#[tokio::test]
async fn client_closing_early_does_not_stop_the_proxy() {
    let up = echo_server("127.0.0.2").await;
    let h = start(
        &allow_yaml("127.0.0.2", up.port(), CURL),
        CURL,
        ProxyConfig::default(),
    )
    .await;
    for partial in [&b""[..], b"CONN", b"CONNECT 127.0.0.2:1 HTTP/1.1\r\nHost"] {
        let mut s = connect(h.addr).await;
        use tokio::io::AsyncWriteExt;
        let _ = s.write_all(partial).await;
        drop(s);
    }
    assert_eq!(connect_status(h.addr, &up.to_string()).await, 200);
}

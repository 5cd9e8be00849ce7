//! The Unix-socket entry point (vm backend): caller preamble, then HTTP.

use std::sync::Arc;

use openshell_proxy::identity::render_preamble;
use openshell_proxy::{FixedIdentity, PolicyHandle, Proxy, ProxyConfig, SandboxContext};
use pretty_assertions::assert_eq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::support::*;

async fn exchange_unix(path: &std::path::Path, bytes: &[u8]) -> Response {
    within("unix exchange", async {
        let mut s = UnixStream::connect(path)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = s.write_all(bytes).await;
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw).await;
        parse_response(&raw)
    })
    .await
}

#[tokio::test]
async fn preamble_names_the_caller() {
    let (up, seen) = http_server("127.0.0.2").await;
    let handle = PolicyHandle::new(policy(&allow_yaml("127.0.0.2", up.port(), CURL)))
        .unwrap_or_else(|e| panic!("{e}"));
    let proxy = Proxy::new(ProxyConfig::default(), handle).unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("egress.sock");
    let listener = UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
    let task = proxy.serve_unix(
        listener,
        // The identity is not consulted for Unix listeners.
        SandboxContext::new("vm", Arc::new(FixedIdentity(caller("/bin/false")))),
    );
    let request = format!("GET http://{up}/x HTTP/1.1\r\nHost: {up}\r\n\r\n");

    let allowed = format!("{}{request}", render_preamble(&caller(CURL)));
    assert_eq!(exchange_unix(&path, allowed.as_bytes()).await.status, 200);

    let other = format!("{}{request}", render_preamble(&caller("/usr/bin/wget")));
    let resp = exchange_unix(&path, other.as_bytes()).await;
    assert_eq!(
        (resp.status, resp.json()["missing"].clone()),
        (403, serde_json::json!(["binary"]))
    );

    for bad in [
        request.clone(),
        format!("OPENSHELL-CALLER {{\"pid\":1}}\n{request}"),
        format!("OPENSHELL-CALLER {}\n", "x".repeat(8192)),
    ] {
        assert_eq!(exchange_unix(&path, bad.as_bytes()).await.status, 400);
    }
    assert_eq!(seen.lock().map(|s| s.len()).unwrap_or(0), 1);
    task.abort();
}

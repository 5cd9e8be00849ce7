//! Live policy updates: direct, by file edit (inotify) and by URL polling (ETag).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openshell_proxy::{watch, ProxyConfig, UpdateError};
use pretty_assertions::assert_eq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::support::*;

fn full_yaml(network: &str) -> String {
    format!("version: 1\nnetwork_policies:\n{network}")
}

#[tokio::test]
async fn update_changes_next_decision_and_bad_updates_keep_the_old_one() {
    let up = echo_server("127.0.0.2").await;
    let h = start(
        &allow_yaml("127.0.0.3", 9, CURL),
        CURL,
        ProxyConfig::default(),
    )
    .await;
    let target = up.to_string();
    assert_eq!(connect_status(h.addr, &target).await, 403);

    let generation = h
        .handle
        .update(&policy(&allow_yaml("127.0.0.2", up.port(), CURL)));
    assert_eq!(generation.map_err(|e| e.to_string()), Ok(2));
    assert_eq!(connect_status(h.addr, &target).await, 200);

    let invalid = h
        .handle
        .update_yaml("new.yaml", "version: 1\nnetwork_policies: [oops\n");
    assert!(matches!(invalid, Err(UpdateError::Parse(_))), "{invalid:?}");
    let static_change = h.handle.update_yaml(
        "new.yaml",
        "version: 1\nfilesystem_policy:\n  read_only: [/usr]\n",
    );
    match static_change {
        Err(UpdateError::StaticChanged(e)) => {
            assert_eq!(
                e.to_string(),
                "filesystem_policy changed; static sections are fixed at start"
            )
        }
        other => panic!("expected a refused static change, got {other:?}"),
    }
    assert_eq!(h.handle.generation(), 2);
    assert_eq!(connect_status(h.addr, &target).await, 200);
}

#[tokio::test]
async fn open_tunnels_survive_a_policy_change() {
    let up = echo_server("127.0.0.2").await;
    let h = start(
        &allow_yaml("127.0.0.2", up.port(), CURL),
        CURL,
        ProxyConfig::default(),
    )
    .await;
    let (resp, mut tunnel) = open_tunnel(h.addr, &up.to_string()).await;
    assert_eq!(resp.status, 200);
    assert!(h.handle.update(&policy("")).is_ok());
    assert_eq!(connect_status(h.addr, &up.to_string()).await, 403);
    within("old tunnel still works", async {
        tunnel.write_all(b"still").await.ok();
        let mut back = [0u8; 5];
        tunnel.read_exact(&mut back).await.ok();
        assert_eq!(&back, b"still");
    })
    .await;
}

#[tokio::test]
async fn file_edit_changes_the_decision() {
    let up = echo_server("127.0.0.2").await;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("policy.yaml");
    let deny_all = allow_yaml("127.0.0.3", 9, CURL);
    std::fs::write(&path, full_yaml(&deny_all)).unwrap_or_else(|e| panic!("{e}"));
    let h = start(&deny_all, CURL, ProxyConfig::default()).await;
    let watcher = watch::watch_file(&path, h.handle.clone()).unwrap_or_else(|e| panic!("{e}"));
    let target = up.to_string();
    assert_eq!(connect_status(h.addr, &target).await, 403);

    // Editor style: write a temporary file, rename it over the policy.
    let tmp = dir.path().join(".policy.yaml.swp");
    let allow = full_yaml(&allow_yaml("127.0.0.2", up.port(), CURL));
    std::fs::write(&tmp, &allow).unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("{e}"));
    let handle = h.handle.clone();
    eventually("generation 2", || handle.generation() == 2).await;
    assert_eq!(connect_status(h.addr, &target).await, 200);

    // An invalid edit in place keeps the last good policy...
    std::fs::write(
        &path,
        "version: 1\nnetwork_policies:\n  x: {endpoints: 3}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // ...and a later valid edit is applied after it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(connect_status(h.addr, &target).await, 200);
    std::fs::write(&path, full_yaml(&deny_all)).unwrap_or_else(|e| panic!("{e}"));
    eventually("generation 3", || handle.generation() == 3).await;
    assert_eq!(connect_status(h.addr, &target).await, 403);
    watcher.abort();
}

/// Serves the current (etag, body); answers 304 when If-None-Match matches
/// and counts those requests.
async fn policy_server(state: Arc<Mutex<(String, String)>>, hits: Arc<AtomicUsize>) -> String {
    let listener = bind("127.0.0.1:0").await;
    let addr = local(&listener);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let state = Arc::clone(&state);
            let hits = Arc::clone(&hits);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while find(&buf, b"\r\n\r\n").is_none() {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                let (etag, body) = state.lock().map(|s| s.clone()).unwrap_or_default();
                let inm = head
                    .lines()
                    .find_map(|l| l.strip_prefix("if-none-match:"))
                    .map(|v| v.trim().to_string());
                let reply = if inm.as_deref() == Some(etag.to_ascii_lowercase().as_str()) {
                    hits.fetch_add(1, Ordering::SeqCst);
                    "HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n".to_string()
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\nETag: {etag}\r\nContent-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}/policy.yaml")
}

#[tokio::test]
async fn url_polling_with_etag_changes_the_decision() {
    let up = echo_server("127.0.0.2").await;
    let deny_all = allow_yaml("127.0.0.3", 9, CURL);
    let state = Arc::new(Mutex::new(("\"v1\"".to_string(), full_yaml(&deny_all))));
    let hits = Arc::new(AtomicUsize::new(0));
    let url = policy_server(Arc::clone(&state), Arc::clone(&hits)).await;
    let h = start(&deny_all, CURL, ProxyConfig::default()).await;
    let url = watch::PolicyUrl::new(&url, None).unwrap_or_else(|e| panic!("{e}"));
    let poller = watch::poll_url(&url, Duration::from_millis(50), h.handle.clone());
    let counter = Arc::clone(&hits);
    eventually("an If-None-Match hit", || {
        counter.load(Ordering::SeqCst) >= 1
    })
    .await;
    let target = up.to_string();
    assert_eq!(connect_status(h.addr, &target).await, 403);
    let before = h.handle.generation();

    // An invalid document keeps the last good policy.
    if let Ok(mut s) = state.lock() {
        *s = (
            "\"v2\"".to_string(),
            "version: 1\nbogus: true\n".to_string(),
        );
    }
    let counter = Arc::clone(&hits);
    eventually("v2 fetched", || counter.load(Ordering::SeqCst) >= 2).await;
    assert_eq!(h.handle.generation(), before);
    assert_eq!(connect_status(h.addr, &target).await, 403);

    if let Ok(mut s) = state.lock() {
        *s = (
            "\"v3\"".to_string(),
            full_yaml(&allow_yaml("127.0.0.2", up.port(), CURL)),
        );
    }
    let handle = h.handle.clone();
    eventually("v3 applied", || handle.generation() == before + 1).await;
    assert_eq!(connect_status(h.addr, &target).await, 200);
    poller.abort();
}

#[test]
fn bad_sources_are_refused_up_front() {
    let handle = openshell_proxy::PolicyHandle::new(policy(""));
    let Ok(handle) = handle else {
        panic!("empty policy");
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let Ok(rt) = rt else { panic!("runtime") };
    rt.block_on(async {
        let refused = |url: &str| {
            watch::PolicyUrl::new(url, None)
                .map(drop)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            refused("http://policy.example/p"),
            Err("unsupported policy url \"http://policy.example/p\": plain http:// is allowed only to a loopback address (127.0.0.0/8, ::1, localhost); use https://".to_string())
        );
        assert!(refused("ftp://x/p").is_err());
        assert!(watch::watch_file(std::path::Path::new("/"), handle.clone()).is_err());
    });
}

/// A TLS policy server on 127.0.0.1 with a self-signed certificate (made by Debian's
/// openssl): served when its certificate is pinned, refused with another pin or with the
/// system's roots (which do not know it).
#[tokio::test]
async fn https_policy_url_with_a_pinned_certificate() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let (cert, key) = self_signed(dir.path(), "policy.test");
    let document = full_yaml(&allow_yaml("127.0.0.2", 443, CURL));
    let addr = tls_policy_server(cert.clone(), key, document.clone()).await;
    let url = format!("https://127.0.0.1:{}/policy.yaml", addr.port());
    let pin: String = sha2::Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let fetch = |pin: Option<String>| {
        let url = url.clone();
        async move {
            let source = watch::PolicyUrl::new(&url, pin.as_deref()).map_err(|e| e.to_string())?;
            watch::fetch_text(&source).await.map_err(|e| e.to_string())
        }
    };
    assert_eq!(fetch(Some(pin.clone())).await, Ok(document));
    let wrong = fetch(Some("00".repeat(32))).await;
    assert!(
        wrong.as_ref().is_err_and(|e| e.contains("pinned SHA-256")),
        "{wrong:?}"
    );
    let unknown = fetch(None).await;
    assert!(
        unknown.as_ref().is_err_and(|e| e.contains("tls:")),
        "{unknown:?}"
    );
}

async fn tls_policy_server(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    document: String,
) -> std::net::SocketAddr {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| b.with_no_client_auth().with_single_cert(vec![cert], key))
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("{e}"));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = bind("127.0.0.1:0").await;
    let addr = local(&listener);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let document = document.clone();
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while find(&buf, b"\r\n\r\n").is_none() {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nETag: \"t\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{document}",
                    document.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

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
    let poller = watch::poll_url(&url, Duration::from_millis(50), h.handle.clone())
        .unwrap_or_else(|e| panic!("{e}"));
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
        assert!(watch::poll_url(
            "https://example.com/p",
            Duration::from_secs(1),
            handle.clone()
        )
        .is_err());
        assert!(watch::poll_url("ftp://x/p", Duration::from_secs(1), handle.clone()).is_err());
        assert!(watch::watch_file(std::path::Path::new("/"), handle.clone()).is_err());
    });
}

//! `enforcement: ask`: held connections and requests, answered through the proxy's
//! [`Approvals`] (the HTTP endpoint's own tests are unit tests), with the verdict read from
//! the upstream and the audit log.

use std::sync::Arc;
use std::time::Duration;

use openshell_proxy::{
    Answer, ApprovalConfig, Approvals, FixedIdentity, PolicyHandle, Proxy, ProxyConfig,
    SandboxContext,
};
use pretty_assertions::assert_eq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::support::*;

struct Asking {
    addr: std::net::SocketAddr,
    approvals: Option<Approvals>,
    policy: PolicyHandle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Asking {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ask_yaml(host: &str, port: u16) -> String {
    format!(
        "  asked:\n    endpoints:\n      - host: \"{host}\"\n        port: {port}\n        allowed_ips: [\"127.0.0.0/8\"]\n        enforcement: ask\n    binaries:\n      - path: {CURL}\n"
    )
}

async fn start_asking(network: &str, config: ProxyConfig) -> Asking {
    let handle = PolicyHandle::new(policy(network)).unwrap_or_else(|e| panic!("{e}"));
    let proxy = Proxy::new(config, handle.clone()).unwrap_or_else(|e| panic!("{e}"));
    let listener = bind("127.0.0.1:0").await;
    let addr = local(&listener);
    let task = proxy.serve_tcp(
        listener,
        SandboxContext::new("test-sandbox", Arc::new(FixedIdentity(caller(CURL)))),
    );
    Asking {
        addr,
        approvals: proxy.approvals().cloned(),
        policy: handle,
        task,
    }
}

fn asking(timeout: Duration, audit: Option<std::path::PathBuf>) -> ProxyConfig {
    ProxyConfig {
        audit_log: audit,
        approvals: Some(ApprovalConfig {
            timeout,
            max_pending: 8,
        }),
        ..ProxyConfig::default()
    }
}

/// The id of the one pending question, once there is one.
async fn question(a: &Approvals) -> (String, serde_json::Value) {
    let mut found = None;
    eventually("a question", || {
        found = a.pending().first().cloned();
        found.is_some()
    })
    .await;
    let q = found.unwrap_or_default();
    (q["id"].as_str().unwrap_or("").to_string(), q)
}

fn audit(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn seen(s: &std::sync::Mutex<Vec<String>>) -> Vec<String> {
    s.lock()
        .map(|v| {
            v.iter()
                .map(|r| r.lines().next().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn allow_once_lets_the_held_tunnel_through_and_the_next_one_asks_again() {
    let up = echo_server("127.0.0.2").await;
    let h = start_asking(
        &ask_yaml("127.0.0.2", up.port()),
        asking(Duration::from_secs(20), None),
    )
    .await;
    let a = h.approvals.clone().unwrap_or_else(|| panic!("approvals"));
    let target = up.to_string();
    let (proxy, t) = (h.addr, target.clone());
    let held = tokio::spawn(async move { open_tunnel(proxy, &t).await });
    let (id, q) = question(&a).await;
    assert_eq!(
        (
            q["host"].as_str(),
            q["port"].as_u64(),
            q["binary"].as_str(),
            q["policy"].as_str()
        ),
        (
            Some("127.0.0.2"),
            Some(u64::from(up.port())),
            Some(CURL),
            Some("asked")
        )
    );
    assert!(!held.is_finished());
    assert_eq!(a.answer(&id, Answer::AllowOnce, "test"), Ok(()));
    let (resp, mut tunnel) = within("held tunnel", held)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status, 200);
    within("echo", async {
        let _ = tunnel.write_all(b"after approval").await;
        let mut back = [0u8; 14];
        let _ = tunnel.read_exact(&mut back).await;
        assert_eq!(&back, b"after approval");
    })
    .await;
    // Once: the next connection is held again, with a new question.
    let again = tokio::spawn(async move { open_tunnel(proxy, &target).await });
    let (second, _) = question(&a).await;
    assert_ne!(second, id);
    assert_eq!(a.answer(&second, Answer::Deny, "test"), Ok(()));
    let (resp, _) = within("denied", again)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status, 403);
}

#[tokio::test]
async fn allow_always_asks_once_and_deny_sends_nothing_upstream() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("audit.jsonl");
    let (up, requests) = http_server("127.0.0.2").await;
    let h = start_asking(
        &ask_yaml("127.0.0.2", up.port()),
        asking(Duration::from_secs(20), Some(log.clone())),
    )
    .await;
    let a = h.approvals.clone().unwrap_or_else(|| panic!("approvals"));
    let get = |path: &str| format!("GET http://{up}{path} HTTP/1.1\r\nHost: {up}\r\n\r\n");
    // deny: a 403 naming the approval, and nothing upstream.
    let proxy = h.addr;
    let denied = tokio::spawn({
        let r = get("/denied?token=abc");
        async move { exchange(proxy, r.as_bytes()).await }
    });
    let (id, q) = question(&a).await;
    // The person sees the whole request, its query too.
    assert_eq!(
        (
            q["method"].as_str(),
            q["path"].as_str(),
            q["query"].as_str()
        ),
        (Some("GET"), Some("/denied"), Some("token=abc"))
    );
    assert_eq!(a.answer(&id, Answer::Deny, "test"), Ok(()));
    let resp = within("deny", denied)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (resp.status, resp.json()["missing"].clone()),
        (403, serde_json::json!(["approval"]))
    );
    assert_eq!(seen(&requests), Vec::<String>::new());
    // allow-always: held once, then the endpoint is open for this binary.
    let first = tokio::spawn({
        let r = get("/first");
        async move { exchange(proxy, r.as_bytes()).await }
    });
    let (id2, _) = question(&a).await;
    assert_eq!(a.answer(&id2, Answer::AllowAlways, "test"), Ok(()));
    assert_eq!(
        within("first", first).await.map(|r| r.status).ok(),
        Some(200)
    );
    let second = exchange(proxy, get("/second").as_bytes()).await;
    assert_eq!(second.status, 200);
    assert_eq!(
        seen(&requests),
        vec![
            "GET /first HTTP/1.1".to_string(),
            "GET /second HTTP/1.1".to_string()
        ]
    );
    // Audit: question, answer and decision for each held request; the second one asked
    // nothing.
    let lines: Vec<(String, String, String, String)> = audit(&log)
        .iter()
        .map(|l| {
            let s = |k: &str| l[k].as_str().unwrap_or("").to_string();
            (s("event"), s("action"), s("path"), s("answer"))
        })
        .collect();
    let e = |a: &str, b: &str, c: &str, d: &str| (a.into(), b.into(), c.into(), d.into());
    assert_eq!(
        lines,
        vec![
            e("approval.question", "ask", "/denied", ""),
            e("approval.answer", "deny", "/denied", "deny"),
            e("", "deny", "/denied", ""),
            e("approval.question", "ask", "/first", ""),
            e("approval.answer", "allow", "/first", "allow-always"),
            e("", "allow", "/first", ""),
            e("", "allow", "/second", ""),
        ]
    );
    let reasons: Vec<String> = audit(&log)
        .iter()
        .map(|l| l["reason"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(reasons[2].contains("denied by the approver"), "{reasons:?}");
    assert!(reasons[6].contains("approved earlier"), "{reasons:?}");
    // The sandbox is no longer served: its grant ends with it, and the audit log says so.
    h.task.abort();
    let mut dropped = Vec::new();
    eventually("the grant dropped", || {
        dropped = audit(&log)
            .into_iter()
            .filter(|l| l["event"] == "approval.grant_dropped")
            .collect();
        !dropped.is_empty()
    })
    .await;
    assert_eq!(
        (
            dropped.len(),
            dropped[0]["sandbox"].as_str(),
            dropped[0]["binary"].as_str(),
            dropped[0]["reason"].as_str()
        ),
        (
            1,
            Some("test-sandbox"),
            Some(CURL),
            Some("an allow-always answer ends with its sandbox")
        )
    );
}

#[tokio::test]
async fn no_answer_in_time_denies_and_says_timeout() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let log = dir.path().join("audit.jsonl");
    let up = echo_server("127.0.0.2").await;
    let h = start_asking(
        &ask_yaml("127.0.0.2", up.port()),
        asking(Duration::from_millis(300), Some(log.clone())),
    )
    .await;
    let (resp, _) = open_tunnel(h.addr, &up.to_string()).await;
    assert_eq!(resp.status, 403);
    let answers: Vec<(String, String)> = audit(&log)
        .iter()
        .map(|l| {
            (
                l["action"].as_str().unwrap_or("").to_string(),
                l["answer"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        answers,
        vec![
            ("ask".to_string(), String::new()),
            ("deny".to_string(), "timeout".to_string()),
            ("deny".to_string(), String::new()),
        ]
    );
    assert!(
        audit(&log)[2]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("(timeout)")),
        "{:?}",
        audit(&log)
    );
}

#[tokio::test]
async fn without_an_approver_ask_denies_naming_the_flag() {
    let up = echo_server("127.0.0.2").await;
    let h = start_asking(&ask_yaml("127.0.0.2", up.port()), ProxyConfig::default()).await;
    assert!(h.approvals.is_none());
    let (resp, _) = open_tunnel(h.addr, &up.to_string()).await;
    let body = resp.json();
    assert_eq!(
        (resp.status, body["missing"].clone()),
        (403, serde_json::json!(["approval"]))
    );
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("--approval-listen")),
        "{body}"
    );
}

#[tokio::test]
async fn a_client_that_goes_away_withdraws_its_question() {
    let up = echo_server("127.0.0.2").await;
    let h = start_asking(
        &ask_yaml("127.0.0.2", up.port()),
        asking(Duration::from_secs(20), None),
    )
    .await;
    let a = h.approvals.clone().unwrap_or_else(|| panic!("approvals"));
    let mut s = connect(h.addr).await;
    let target = up.to_string();
    let _ = s
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await;
    let (id, _) = question(&a).await;
    drop(s);
    eventually("withdrawn", || a.pending().is_empty()).await;
    assert!(a.answer(&id, Answer::AllowOnce, "test").is_err());
}

#[tokio::test]
async fn an_answer_after_a_policy_update_does_not_let_the_held_connection_through() {
    let up = echo_server("127.0.0.2").await;
    let h = start_asking(
        &ask_yaml("127.0.0.2", up.port()),
        asking(Duration::from_secs(20), None),
    )
    .await;
    let a = h.approvals.clone().unwrap_or_else(|| panic!("approvals"));
    let (proxy, target) = (h.addr, up.to_string());
    let held = tokio::spawn(async move { open_tunnel(proxy, &target).await });
    let (id, _) = question(&a).await;
    // The update removes the endpoint the question was about; the answer comes after it.
    let other = format!(
        "version: 1\nnetwork_policies:\n{}",
        ask_yaml("127.0.0.3", up.port())
    );
    h.policy
        .update_yaml("test.yaml", &other)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(a.answer(&id, Answer::AllowOnce, "test"), Ok(()));
    let (resp, _) = within("held tunnel", held)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(resp.status, 403, "{resp:?}");
    assert!(resp.body.contains("the policy changed"), "{}", resp.body);
}

/// The workload must never answer its own questions: a policy whose `allowed_ips` covers
/// the approval endpoint's address still cannot reach it through the proxy, on any local
/// address and by either form of request. The same proxy without the reservation does reach
/// it (the control), so the test fails when the reservation is gone.
#[tokio::test]
async fn the_approval_endpoint_is_unreachable_whatever_allowed_ips_says() {
    let up = echo_server("127.0.0.2").await;
    let endpoint_listener = bind("127.0.0.1:0").await;
    let endpoint = local(&endpoint_listener);
    let port = endpoint.port();
    let network = format!(
        "{}  approver:\n    endpoints:\n      - host: \"127.0.0.1\"\n        port: {port}\n        allowed_ips: [\"127.0.0.0/8\"]\n      - host: \"127.0.0.3\"\n        port: {port}\n        allowed_ips: [\"127.0.0.0/8\"]\n    binaries:\n      - path: {CURL}\n",
        ask_yaml("127.0.0.2", up.port())
    );
    let reserved = ProxyConfig {
        reserved: vec![openshell_proxy::ssrf::Reserved {
            what: "the approval endpoint".into(),
            addr: endpoint,
        }],
        ..asking(Duration::from_secs(20), None)
    };
    let unreserved = asking(Duration::from_secs(20), None);
    let mut answered = Vec::new();
    let mut first = Some(endpoint_listener);
    for (label, config) in [("reserved", reserved), ("unreserved", unreserved)] {
        let h = start_asking(&network, config).await;
        let a = h.approvals.clone().unwrap_or_else(|| panic!("approvals"));
        let listener = match first.take() {
            Some(l) => l,
            None => bind(&endpoint.to_string()).await,
        };
        let serving = tokio::spawn(openshell_proxy::approval::http::serve(listener, a.clone()));
        let (proxy, target) = (h.addr, up.to_string());
        let held = tokio::spawn(async move { open_tunnel(proxy, &target).await });
        let (id, _) = question(&a).await;
        // What a workload would send: its own answer, as plain HTTP through the proxy and
        // inside a CONNECT tunnel, to the listener's address and to another loopback one.
        let body = r#"{"answer":"allow-once"}"#;
        let post = |host: &str| {
            format!(
                "POST http://{host}:{port}/v1/approvals/{id} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        };
        let mut statuses = Vec::new();
        for host in ["127.0.0.1", "127.0.0.3"] {
            statuses.push(exchange(h.addr, post(host).as_bytes()).await.status);
            statuses.push(connect_status(h.addr, &format!("{host}:{port}")).await);
        }
        let still_pending = a.pending().iter().any(|q| q["id"] == id.as_str());
        answered.push((label, statuses, still_pending));
        let _ = a.answer(&id, Answer::Deny, "test");
        let _ = within("held", held).await;
        serving.abort();
        let _ = serving.await;
    }
    assert_eq!(
        answered,
        vec![
            ("reserved", vec![403, 403, 403, 403], true),
            // The control: without the reservation the workload answered itself.
            // (Nothing listens on 127.0.0.3.)
            ("unreserved", vec![200, 200, 502, 502], false),
        ]
    );
}

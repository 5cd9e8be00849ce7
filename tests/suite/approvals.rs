//! `enforcement: ask`: a real curl inside the sandbox (each backend) is held until the test,
//! acting as the person, answers through `--approval-listen` from the host. Every verdict is
//! read on the host: what the upstream received and the audit log.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use pretty_assertions::assert_eq;

use super::common::*;
use super::egress::Upstream;

/// One policy letting curl reach the upstream, through an endpoint that asks.
fn asking_policy(up: &Upstream) -> String {
    format!(
        "network_policies:\n  asked:\n    endpoints:\n      - host: \"{ip}\"\n        port: {port}\n        allowed_ips: [127.0.0.0/8]\n        enforcement: ask\n    binaries: [{{ path: /usr/bin/curl }}]\n",
        ip = up.addr.ip(),
        port = up.addr.port(),
    )
}

/// The person: talks to the approval endpoint with plain HTTP/1.1 from the host.
struct Approver {
    addr: SocketAddr,
}

impl Approver {
    /// A free loopback port for `--approval-listen`.
    fn new() -> Approver {
        let probe = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let addr = probe.local_addr().expect("addr");
        Approver { addr }
    }

    fn flag(&self) -> String {
        self.addr.to_string()
    }

    /// Send one request; the status and the JSON body (`Null` when none).
    fn exchange(&self, request: &str) -> Option<(u16, serde_json::Value)> {
        let mut s = TcpStream::connect(self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(request.as_bytes()).ok()?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).ok()?;
        let status = raw.split(' ').nth(1)?.parse().ok()?;
        let body = raw
            .split_once("\r\n\r\n")
            .and_then(|(_, b)| serde_json::from_str(b).ok())
            .unwrap_or(serde_json::Value::Null);
        Some((status, body))
    }

    fn pending(&self) -> Vec<serde_json::Value> {
        let request = format!(
            "GET /v1/approvals HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        match self.exchange(&request) {
            Some((200, serde_json::Value::Array(list))) => list,
            _ => Vec::new(),
        }
    }

    /// The first pending question whose id is not in `seen`, waiting up to `limit`.
    fn question(&self, seen: &[String], limit: Duration) -> serde_json::Value {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(q) = self
                .pending()
                .into_iter()
                .find(|q| !seen.iter().any(|s| q["id"] == s.as_str()))
            {
                return q;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no new question within {limit:?}");
    }

    /// Answer question `id`; the status.
    fn answer(&self, id: &str, answer: &str) -> u16 {
        let body = format!("{{\"answer\":\"{answer}\"}}");
        let request = format!(
            "POST /v1/approvals/{id} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        self.exchange(&request).map_or(0, |(status, _)| status)
    }
}

/// Start the sandbox in the background (stdout and stderr collected).
fn start(s: &Scratch, backend: &str, flags: &[&str], script: &str) -> Child {
    s.command(backend, flags, &["/bin/sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start openshell-sandbox")
}

fn finish(child: Child) -> Output {
    child
        .wait_with_output()
        .expect("wait for openshell-sandbox")
}

/// The audit log's JSON lines.
fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `event`, `action`, `answer` and `path` of each line (empty where absent).
fn audit_summary(path: &Path) -> Vec<[String; 4]> {
    audit_lines(path)
        .iter()
        .map(|l| {
            ["event", "action", "answer", "path"].map(|k| l[k].as_str().unwrap_or("").to_owned())
        })
        .collect()
}

fn row(event: &str, action: &str, answer: &str, path: &str) -> [String; 4] {
    [event, action, answer, path].map(str::to_owned)
}

const QUESTION_WAIT: Duration = Duration::from_secs(90);
const CURL: &str = "curl -s -o /dev/null -w '%{http_code}'";

/// allow-once: the held request reaches the upstream once answered; the next request asks
/// again (a new question), and is denied.
#[test]
fn allow_once_lets_the_held_request_through_and_the_next_asks_again() {
    if !can_run("allow_once_lets_the_held_request_through_and_the_next_asks_again") {
        return;
    }
    for backend in backends() {
        let up = Upstream::start("127.0.0.2");
        let s = Scratch::new(&asking_policy(&up));
        let audit = s.outside.join("audit.jsonl");
        let approver = Approver::new();
        let script = format!(
            "{CURL} {first}; echo; {CURL} {second}; echo",
            first = up.url("/first"),
            second = up.url("/second"),
        );
        let child = start(
            &s,
            backend,
            &[
                "--audit-log",
                audit.to_str().unwrap(),
                "--approval-listen",
                &approver.flag(),
                "--timeout",
                "240",
            ],
            &script,
        );
        let q = approver.question(&[], QUESTION_WAIT);
        let fields = ["binary", "host", "method", "path", "policy"]
            .map(|k| q[k].as_str().unwrap_or("").to_owned());
        assert_eq!(
            (backend, fields, q["port"].as_u64()),
            (
                backend,
                ["/usr/bin/curl", "127.0.0.2", "GET", "/first", "asked"].map(str::to_owned),
                Some(u64::from(up.addr.port()))
            )
        );
        // Held: nothing reached the upstream before the answer.
        assert_eq!(up.seen(), Vec::<String>::new());
        let first_id = q["id"].as_str().unwrap_or("").to_owned();
        assert_eq!(approver.answer(&first_id, "allow-once"), 200);
        assert_eq!(approver.answer(&first_id, "deny"), 409, "answered already");
        let second = approver.question(std::slice::from_ref(&first_id), QUESTION_WAIT);
        assert_eq!(second["path"].as_str(), Some("/second"));
        let second_id = second["id"].as_str().unwrap_or("").to_owned();
        assert_eq!(approver.answer(&second_id, "deny"), 200);
        let out = finish(child);
        assert_eq!(
            (backend, up.seen()),
            (backend, vec!["GET /first HTTP/1.1".to_owned()]),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
        assert_eq!(
            audit_summary(&audit),
            vec![
                row("approval.question", "ask", "", "/first"),
                row("approval.answer", "allow", "allow-once", "/first"),
                row("", "allow", "", "/first"),
                row("approval.question", "ask", "", "/second"),
                row("approval.answer", "deny", "deny", "/second"),
                row("", "deny", "", "/second"),
            ],
            "{backend}"
        );
    }
}

/// allow-always over CONNECT tunnels: one question, then the endpoint is open for curl for
/// the sandbox's lifetime; the upstream sees both requests.
#[test]
fn allow_always_asks_once() {
    if !can_run("allow_always_asks_once") {
        return;
    }
    for backend in backends() {
        let up = Upstream::start("127.0.0.2");
        let s = Scratch::new(&asking_policy(&up));
        let audit = s.outside.join("audit.jsonl");
        let approver = Approver::new();
        let script = format!(
            "{CURL} -p {one}; echo; {CURL} -p {two}; echo",
            one = up.url("/one"),
            two = up.url("/two"),
        );
        let child = start(
            &s,
            backend,
            &[
                "--audit-log",
                audit.to_str().unwrap(),
                "--approval-listen",
                &approver.flag(),
                "--timeout",
                "240",
            ],
            &script,
        );
        let q = approver.question(&[], QUESTION_WAIT);
        // A CONNECT: no method or path to show.
        assert_eq!((q["method"].is_null(), q["path"].is_null()), (true, true));
        let id = q["id"].as_str().unwrap_or("").to_owned();
        assert_eq!(approver.answer(&id, "allow-always"), 200);
        let out = finish(child);
        assert_eq!(
            (backend, up.seen()),
            (
                backend,
                vec![
                    "GET /one HTTP/1.1".to_owned(),
                    "GET /two HTTP/1.1".to_owned()
                ]
            ),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
        assert_eq!(
            audit_summary(&audit),
            vec![
                row("approval.question", "ask", "", ""),
                row("approval.answer", "allow", "allow-always", ""),
                row("", "allow", "", ""),
                row("", "allow", "", ""),
                // The grant ends with the sandbox.
                row("approval.grant_dropped", "", "", ""),
            ],
            "{backend}"
        );
        let reasons: Vec<String> = audit_lines(&audit)
            .iter()
            .map(|l| l["reason"].as_str().unwrap_or("").to_owned())
            .collect();
        assert!(
            reasons[3].contains("approved earlier for the sandbox's lifetime"),
            "{reasons:?}"
        );
    }
}

/// deny: the upstream gets no byte, and the audit log says the approver denied it.
#[test]
fn deny_sends_nothing_upstream() {
    if !can_run("deny_sends_nothing_upstream") {
        return;
    }
    for backend in backends() {
        let up = Upstream::start("127.0.0.2");
        let s = Scratch::new(&asking_policy(&up));
        let audit = s.outside.join("audit.jsonl");
        let approver = Approver::new();
        let script = format!("{CURL} {}; echo", up.url("/denied"));
        let child = start(
            &s,
            backend,
            &[
                "--audit-log",
                audit.to_str().unwrap(),
                "--approval-listen",
                &approver.flag(),
                "--timeout",
                "240",
            ],
            &script,
        );
        let q = approver.question(&[], QUESTION_WAIT);
        let id = q["id"].as_str().unwrap_or("").to_owned();
        assert_eq!(approver.answer(&id, "deny"), 200);
        let out = finish(child);
        assert_eq!(
            (backend, up.seen()),
            (backend, Vec::<String>::new()),
            "{}",
            stderr(&out)
        );
        let decision = audit_lines(&audit)
            .into_iter()
            .find(|l| l["event"].is_null())
            .unwrap_or_default();
        assert_eq!(
            (decision["action"].as_str(), decision["approval"].as_str()),
            (Some("deny"), Some(id.as_str()))
        );
        assert!(
            decision["reason"]
                .as_str()
                .is_some_and(|r| r.contains("denied by the approver")),
            "{decision}"
        );
    }
}

/// No answer within `--approval-timeout`: denied, and the audit log says timeout.
#[test]
fn no_answer_in_time_is_a_deny() {
    if !can_run("no_answer_in_time_is_a_deny") {
        return;
    }
    for backend in backends() {
        let up = Upstream::start("127.0.0.2");
        let s = Scratch::new(&asking_policy(&up));
        let audit = s.outside.join("audit.jsonl");
        let approver = Approver::new();
        let script = format!("{CURL} {}; echo", up.url("/late"));
        let child = start(
            &s,
            backend,
            &[
                "--audit-log",
                audit.to_str().unwrap(),
                "--approval-listen",
                &approver.flag(),
                "--approval-timeout",
                "2",
                "--timeout",
                "240",
            ],
            &script,
        );
        // Asked, and left unanswered.
        let q = approver.question(&[], QUESTION_WAIT);
        assert_eq!(q["path"].as_str(), Some("/late"));
        let out = finish(child);
        assert_eq!(
            (backend, up.seen()),
            (backend, Vec::<String>::new()),
            "{}",
            stderr(&out)
        );
        assert_eq!(
            audit_summary(&audit),
            vec![
                row("approval.question", "ask", "", "/late"),
                row("approval.answer", "deny", "timeout", "/late"),
                row("", "deny", "", "/late"),
            ],
            "{backend}"
        );
        let reason = audit_lines(&audit)
            .get(2)
            .and_then(|l| l["reason"].as_str().map(str::to_owned))
            .unwrap_or_default();
        assert!(reason.contains("within 2 s; denied (timeout)"), "{reason}");
        // The endpoint ended with the supervisor.
        let id = q["id"].as_str().unwrap_or("").to_owned();
        assert_eq!(approver.answer(&id, "allow-once"), 0);
    }
}

/// Without `--approval-listen` nobody can be asked: `ask` fails closed, with a warning at
/// start and a reason naming the flag.
#[test]
fn without_an_approver_ask_denies() {
    if !can_run("without_an_approver_ask_denies") {
        return;
    }
    for backend in backends() {
        let up = Upstream::start("127.0.0.2");
        let s = Scratch::new(&asking_policy(&up));
        let audit = s.outside.join("audit.jsonl");
        let out = s.run(
            backend,
            &["--audit-log", audit.to_str().unwrap(), "--timeout", "240"],
            &[
                "/bin/sh",
                "-c",
                &format!("{CURL} {}; echo", up.url("/unasked")),
            ],
        );
        assert_eq!((backend, up.seen()), (backend, Vec::<String>::new()));
        assert!(
            stderr(&out).contains("enforcement: ask and there is no --approval-listen"),
            "{}",
            stderr(&out)
        );
        let lines = audit_lines(&audit);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["action"].as_str(), Some("deny"));
        assert!(
            lines[0]["reason"].as_str().is_some_and(|r| r.contains(
                "no approver is configured: start the supervisor with --approval-listen"
            )),
            "{:?}",
            lines[0]
        );
    }
}

/// `--approval-listen` refuses an address other than loopback unless told otherwise.
#[test]
fn the_approval_endpoint_is_loopback_only() {
    if !can_run("the_approval_endpoint_is_loopback_only") {
        return;
    }
    let up = Upstream::start("127.0.0.2");
    let s = Scratch::new(&asking_policy(&up));
    let out = s.run(
        "process",
        &["--approval-listen", "0.0.0.0:0"],
        &["/bin/true"],
    );
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--dangerously-allow-approval-on-non-loopback"),
        "{}",
        stderr(&out)
    );
}

/// A workload must not answer its own questions: even a policy whose `allowed_ips` covers
/// the approval endpoint's address leaves it unreachable. The workload's curl lists and
/// answers through the proxy (`--noproxy ''` overrides the sandbox's NO_PROXY for loopback); the host reads the verdict from the
/// upstream (nothing arrived), the audit log (every attempt denied, naming the endpoint) and
/// the question's end (a timeout, not the workload's answer).
#[test]
fn the_workload_cannot_answer_its_own_question() {
    if !can_run("the_workload_cannot_answer_its_own_question") {
        return;
    }
    for backend in backends() {
        let up = Upstream::start("127.0.0.2");
        let approver = Approver::new();
        let port = approver.addr.port();
        let policy = format!(
            "{}  approver:\n    endpoints:\n      - host: \"127.0.0.1\"\n        port: {port}\n        allowed_ips: [127.0.0.0/8]\n    binaries: [{{ path: /usr/bin/curl }}]\n",
            asking_policy(&up)
        );
        let s = Scratch::new(&policy);
        let audit = s.outside.join("audit.jsonl");
        let list = format!("http://127.0.0.1:{port}/v1/approvals");
        let script = format!(
            r#"{CURL} {held} > /dev/null & i=0
while [ $i -lt 30 ]; do
  id=$(curl -s --noproxy '' {list} | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
  if [ -n "$id" ]; then
    curl -s --noproxy '' -o /dev/null -w 'answered %{{http_code}}\n' -X POST -H 'Content-Type: application/json' -d '{{"answer":"allow-always"}}' {list}/$id
    break
  fi
  i=$((i+1)); sleep 0.2
done
wait"#,
            held = up.url("/self"),
        );
        let child = start(
            &s,
            backend,
            &[
                "--audit-log",
                audit.to_str().unwrap(),
                "--approval-listen",
                &approver.flag(),
                "--approval-timeout",
                "10",
                "--timeout",
                "240",
            ],
            &script,
        );
        let q = approver.question(&[], QUESTION_WAIT);
        assert_eq!(q["path"].as_str(), Some("/self"));
        let out = finish(child);
        assert_eq!(
            (backend, up.seen(), stdout(&out).contains("answered")),
            (backend, Vec::<String>::new(), false),
            "{}{}",
            stdout(&out),
            stderr(&out)
        );
        let lines = audit_lines(&audit);
        let answers: Vec<&str> = lines
            .iter()
            .filter(|l| l["event"] == "approval.answer")
            .filter_map(|l| l["answer"].as_str())
            .collect();
        assert_eq!((backend, answers), (backend, vec!["timeout"]));
        let attempts: Vec<&serde_json::Value> = lines
            .iter()
            .filter(|l| l["event"].is_null() && l["port"].as_u64() == Some(u64::from(port)))
            .collect();
        assert!(
            !attempts.is_empty(),
            "{backend}: no attempt audited: {lines:?}"
        );
        for line in attempts {
            assert_eq!(line["action"].as_str(), Some("deny"), "{backend}: {line}");
            assert!(
                line["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("the approval endpoint of the supervisor")),
                "{backend}: {line}"
            );
        }
    }
}

//! The HTTP endpoint where a person answers approval questions (`--approval-listen`, loopback
//! only unless the operator says otherwise).
//!
//! - `GET /v1/approvals`: 200 with a JSON array of the pending questions, oldest first
//!   ([`Approvals::pending`]).
//! - `POST /v1/approvals/{id}` with `Content-Type: application/json` and the body
//!   `{"answer": "allow-once" | "allow-always" | "deny"}`: 200 `{"id", "answer"}`; 404 for an
//!   id that names no question; 409 for a question no longer pending (answered, timed out or
//!   withdrawn); 400 for any other body; 415 without the JSON content type; 411 without a
//!   `Content-Length`; 413 for a body over [`BODY_MAX`] bytes.
//! - Anything else: 404 (path) or 405 (method).
//!
//! A web page the person visits must not be able to answer: the `Host` header must name a
//! loopback address, `localhost` or the address the connection came in on (a DNS-rebound
//! name gets 403), an `Origin` header too, and the JSON content type keeps a browser from posting without a CORS
//! preflight, which this endpoint never grants. Ids are not guessable.
//!
//! One request per connection (`Connection: close`), its head within [`HEAD_MAX`] bytes,
//! head and body within [`READ_TIMEOUT`] and the response taken within [`WRITE_TIMEOUT`]; at
//! most [`CONNECTIONS_MAX`] connections at once. A request refused for its `Host` or `Origin`
//! is an event and an audit line (`approval.refused`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::{Answer, AnswerError, Approvals};
use crate::http::reason_phrase;

/// Largest request head.
pub const HEAD_MAX: usize = 8 * 1024;
/// Largest request body.
pub const BODY_MAX: usize = 4 * 1024;
/// Time for a whole request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for the response to be taken.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once; more are closed at once.
pub const CONNECTIONS_MAX: usize = 32;

/// Serve `listener` until the task is aborted.
pub async fn serve(listener: tokio::net::TcpListener, approvals: Approvals) {
    let limit = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(target: "openshell::proxy", %error, "approval endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            tracing::warn!(target: "openshell::proxy", %peer, "approval endpoint: connection limit reached");
            continue;
        };
        let approvals = approvals.clone();
        let local = stream.local_addr().map(|a| a.ip()).ok();
        tokio::spawn(async move {
            let _permit = permit;
            handle(stream, peer, local, &approvals).await;
        });
    }
}

/// One request that came in on `local`: read, answer, close.
pub(crate) async fn handle<S>(
    mut stream: S,
    peer: SocketAddr,
    local: Option<IpAddr>,
    approvals: &Approvals,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let response = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream, local)).await
    {
        Ok(Ok(request)) => respond(&request, peer, approvals),
        Ok(Err(Refused(status, message))) => {
            if status == 403 {
                // Somebody tried to answer from where no answer may come (a web page, a
                // rebound name): that is worth an event and an audit line.
                approvals.refused_request(peer, status, &message);
            }
            reply(status, &serde_json::json!({ "error": message }))
        }
        Err(_) => reply(
            408,
            &serde_json::json!({ "error": "request not received in time" }),
        ),
    };
    // A client that does not read its response does not keep the task.
    let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await;
}

/// A request as far as this endpoint cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    method: String,
    /// The path, without a query.
    path: String,
    body: Vec<u8>,
}

/// A request refused before routing: the status and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refused(u16, String);

fn refused(status: u16, message: impl Into<String>) -> Refused {
    Refused(status, message.into())
}

async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    local: Option<IpAddr>,
) -> Result<Request, Refused> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_len = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() >= HEAD_MAX {
            return Err(refused(431, format!("request head over {HEAD_MAX} bytes")));
        }
        let want = chunk.len().min(HEAD_MAX + 3 - buf.len());
        let n = stream
            .read(&mut chunk[..want])
            .await
            .map_err(|e| refused(400, format!("reading the request: {e}")))?;
        if n == 0 {
            return Err(refused(400, "connection closed inside the request head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&buf[..head_len]) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) | Err(_) => {
            return Err(refused(400, "malformed request head"))
        }
    }
    let method = parsed.method.unwrap_or("").to_string();
    let target = parsed.path.unwrap_or("");
    let path = target.split('?').next().unwrap_or("").to_string();
    let header = |name: &str| -> Result<Option<&str>, Refused> {
        let mut found = parsed
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name));
        let first = found.next();
        if found.next().is_some() {
            return Err(refused(400, format!("more than one {name} header")));
        }
        first
            .map(|h| {
                std::str::from_utf8(h.value)
                    .map(str::trim)
                    .map_err(|_| refused(400, format!("{name} is not text")))
            })
            .transpose()
    };
    match header("host")? {
        Some(host) if own_authority(host, local) => {}
        Some(_) => {
            return Err(refused(
                403,
                "the Host header must name a loopback address or localhost",
            ))
        }
        None => return Err(refused(400, "no Host header")),
    }
    if let Some(origin) = header("origin")? {
        let authority = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if !authority.is_some_and(|a| own_authority(a, local)) {
            return Err(refused(403, "requests from web pages are refused"));
        }
    }
    if header("transfer-encoding")?.is_some() {
        return Err(refused(411, "send the body with a Content-Length"));
    }
    let length = match header("content-length")? {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| refused(400, "bad Content-Length"))?,
        None => 0,
    };
    if method == "POST" {
        if header("content-length")?.is_none() {
            return Err(refused(411, "a POST needs a Content-Length"));
        }
        let json = header("content-type")?.is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
        if !json {
            return Err(refused(
                415,
                "the body must be Content-Type: application/json",
            ));
        }
    }
    if length > BODY_MAX {
        return Err(refused(413, format!("body over {BODY_MAX} bytes")));
    }
    let mut body = buf[head_len..].to_vec();
    if body.len() > length {
        return Err(refused(400, "more bytes than the Content-Length"));
    }
    while body.len() < length {
        let want = chunk.len().min(length - body.len());
        let n = stream
            .read(&mut chunk[..want])
            .await
            .map_err(|e| refused(400, format!("reading the body: {e}")))?;
        if n == 0 {
            return Err(refused(400, "connection closed inside the body"));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(Request { method, path, body })
}

/// `host[:port]` naming a loopback address, `localhost` or `local`.
fn own_authority(authority: &str, local: Option<IpAddr>) -> bool {
    let Some(host) = authority_host(authority) else {
        return false;
    };
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>();
    host.eq_ignore_ascii_case("localhost")
        || ip.as_ref().is_ok_and(IpAddr::is_loopback)
        || ip.is_ok_and(|ip| Some(ip) == local && !ip.is_unspecified())
}

/// `host[:port]` naming a loopback address or `localhost`.
#[cfg(test)]
fn loopback_authority(authority: &str) -> bool {
    own_authority(authority, None)
}

/// The host part of `host[:port]` (an IPv6 literal without its brackets), if well formed.
fn authority_host(authority: &str) -> Option<&str> {
    if let Some(rest) = authority.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, tail)) if tail.is_empty() || tail.strip_prefix(':').is_some_and(is_port) => {
                Some(h)
            }
            _ => None,
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, port)) if is_port(port) => Some(h),
            Some(_) => None,
            None => Some(authority),
        }
    }
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

/// The body of `POST /v1/approvals/{id}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerBody {
    answer: Answer,
}

fn respond(request: &Request, peer: SocketAddr, approvals: &Approvals) -> Vec<u8> {
    const BASE: &str = "/v1/approvals";
    let rest = request.path.strip_prefix(BASE);
    match (request.method.as_str(), rest) {
        ("GET", Some("" | "/")) => reply(200, &serde_json::Value::from(approvals.pending())),
        (_, Some("" | "/")) => reply(405, &serde_json::json!({ "error": "use GET" })),
        ("POST", Some(id)) if id.starts_with('/') => {
            let id = &id[1..];
            if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return reply(404, &serde_json::json!({ "error": "no such question" }));
            }
            let answer = match serde_json::from_slice::<AnswerBody>(&request.body) {
                Ok(body) => body.answer,
                Err(error) => {
                    return reply(
                        400,
                        &serde_json::json!({
                            "error": format!("expected {{\"answer\": \"allow-once\" | \"allow-always\" | \"deny\"}}: {error}")
                        }),
                    )
                }
            };
            match approvals.answer(id, answer, &format!("http {peer}")) {
                Ok(()) => reply(
                    200,
                    &serde_json::json!({ "id": id, "answer": answer.as_str() }),
                ),
                Err(error @ AnswerError::Unknown(_)) => {
                    reply(404, &serde_json::json!({ "error": error.to_string() }))
                }
                Err(error @ AnswerError::Settled { how, .. }) => reply(
                    409,
                    &serde_json::json!({ "error": error.to_string(), "settled": how }),
                ),
            }
        }
        (_, Some(id)) if id.starts_with('/') => {
            reply(405, &serde_json::json!({ "error": "use POST" }))
        }
        _ => reply(404, &serde_json::json!({ "error": "not found" })),
    }
}

/// A JSON response that closes the connection.
fn reply(status: u16, body: &serde_json::Value) -> Vec<u8> {
    let body = format!("{body}\n");
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        reason_phrase(status),
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approval::{ApprovalConfig, Question, Settled};
    use crate::PolicyHandle;
    use openshell_policy::Policy;
    use pretty_assertions::assert_eq;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn setup() -> (Approvals, Question) {
        setup_audited(None)
    }

    fn setup_audited(audit: Option<&std::path::Path>) -> (Approvals, Question) {
        let text = "version: 1\nnetwork_policies:\n  api:\n    endpoints:\n      - { host: api.example, port: 443, enforcement: ask }\n    binaries: [{ path: /usr/bin/curl }]\n";
        let policy = Policy::from_yaml("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        let endpoint = policy
            .network
            .get("api")
            .and_then(|p| p.endpoints.first().cloned())
            .unwrap_or_else(|| panic!("endpoint"));
        let handle = PolicyHandle::new(policy).unwrap_or_else(|e| panic!("{e}"));
        let audit = audit.map(|path| {
            Arc::new(
                crate::decision::AuditLog::open(path.to_path_buf(), Default::default())
                    .unwrap_or_else(|e| panic!("{e}")),
            )
        });
        let approvals = Approvals::new(ApprovalConfig::default(), handle, audit);
        let question = Question {
            sandbox: "s1".into(),
            binary: "/usr/bin/curl".into(),
            pid: 7,
            ancestors: vec![],
            host: "api.example".into(),
            port: 443,
            method: None,
            path: None,
            query: None,
            policy: "api".into(),
            endpoint_index: 0,
            endpoint,
            generation: 1,
        };
        (approvals, question)
    }

    /// Send `request` through [`handle`]; the status and the JSON body.
    async fn exchange(approvals: &Approvals, request: &str) -> (u16, serde_json::Value) {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap_or_else(|e| panic!("{e}"));
        let serving = handle(server, peer, None, approvals);
        let talking = async {
            let _ = client.write_all(request.as_bytes()).await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let ((), out) = tokio::join!(serving, talking);
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .and_then(|(_, b)| serde_json::from_str(b).ok())
            .unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    fn post(id: &str, body: &str, extra: &str) -> String {
        format!(
            "POST /v1/approvals/{id} HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn lists_and_answers() {
        rt().block_on(async {
            let (approvals, question) = setup();
            let mut ticket = approvals.ask(question).unwrap_or_else(|e| panic!("{e}"));
            let id = ticket.id().to_string();
            let (status, list) = exchange(
                &approvals,
                "GET /v1/approvals HTTP/1.1\r\nHost: localhost:9\r\n\r\n",
            )
            .await;
            assert_eq!(status, 200);
            assert_eq!(
                (
                    list[0]["id"].as_str(),
                    list[0]["host"].as_str(),
                    list[0]["port"].as_u64(),
                    list[0]["binary"].as_str(),
                    list[0]["policy"].as_str(),
                    list[0]["waiting"].as_u64(),
                ),
                (
                    Some(id.as_str()),
                    Some("api.example"),
                    Some(443),
                    Some("/usr/bin/curl"),
                    Some("api"),
                    Some(1)
                )
            );
            let answers = [
                (post(&id, r#"{"answer":"maybe"}"#, ""), 400),
                (post(&id, r#"{"answer":"deny","x":1}"#, ""), 400),
                (post("ffff", r#"{"answer":"deny"}"#, ""), 404),
                (post(&id, r#"{"answer":"allow-once"}"#, ""), 200),
                (post(&id, r#"{"answer":"deny"}"#, ""), 409),
            ];
            let mut got = Vec::new();
            for (request, _) in &answers {
                got.push(exchange(&approvals, request).await.0);
            }
            assert_eq!(got, answers.iter().map(|(_, s)| *s).collect::<Vec<_>>());
            assert_eq!(ticket.wait().await, Settled::Answered(Answer::AllowOnce));
        });
    }

    #[test]
    fn refuses_what_a_web_page_or_a_bad_client_sends() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let log = dir.path().join("audit.jsonl");
        rt().block_on(async {
            let (approvals, question) = setup_audited(Some(&log));
            let mut ticket = approvals.ask(question).unwrap_or_else(|e| panic!("{e}"));
            let id = ticket.id().to_string();
            let deny = r#"{"answer":"deny"}"#;
            let big = format!(r#"{{"answer":"deny","pad":"{}"}}"#, "x".repeat(BODY_MAX));
            let cases = [
                // DNS rebinding: a name that is not loopback.
                (post(&id, deny, "").replace("127.0.0.1:9", "evil.example:9"), 403),
                (post(&id, deny, "Origin: https://evil.example\r\n"), 403),
                (post(&id, deny, "").replace("application/json", "text/plain"), 415),
                (
                    format!("POST /v1/approvals/{id} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"),
                    411,
                ),
                (post(&id, &big, ""), 413),
                ("GET /v1/approvals HTTP/1.1\r\n\r\n".to_string(), 400),
                ("DELETE /v1/approvals HTTP/1.1\r\nHost: [::1]:9\r\n\r\n".to_string(), 405),
                ("GET /v2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".to_string(), 404),
                (format!("GET /v1/approvals HTTP/1.1\r\nHost: 127.0.0.1\r\nX: {}\r\n\r\n", "y".repeat(HEAD_MAX)), 431),
            ];
            let mut got = Vec::new();
            for (request, _) in &cases {
                got.push(exchange(&approvals, request).await.0);
            }
            assert_eq!(got, cases.iter().map(|(_, s)| *s).collect::<Vec<_>>());
            // None of them answered: the question still waits.
            assert_eq!(approvals.pending().len(), 1);
            // The two that came from where no answer may come are audit lines.
            let refused: Vec<(u64, String)> = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|l| l["event"] == "approval.refused")
                .map(|l| (l["status"].as_u64().unwrap_or(0), l["reason"].as_str().unwrap_or("").to_string()))
                .collect();
            assert_eq!(
                refused,
                vec![
                    (403, "the Host header must name a loopback address or localhost".to_string()),
                    (403, "requests from web pages are refused".to_string()),
                ]
            );
            let (status, _) = exchange(&approvals, &post(&id, deny, "Origin: http://localhost:9\r\n")).await;
            assert_eq!(status, 200);
            assert_eq!(ticket.wait().await, Settled::Answered(Answer::Deny));
        });
    }

    #[test]
    fn loopback_authorities() {
        let got: Vec<bool> = [
            "127.0.0.1",
            "127.0.0.1:8080",
            "localhost:1",
            "LOCALHOST",
            "[::1]:9",
            "[::1]",
            "127.9.9.9:1",
            "10.0.0.1:9",
            "evil.example",
            "127.0.0.1.evil.example:9",
            "[::1]x",
            "127.0.0.1:",
            "",
        ]
        .iter()
        .map(|a| loopback_authority(a))
        .collect();
        assert_eq!(
            got,
            vec![
                true, true, true, true, true, true, true, false, false, false, false, false, false
            ]
        );
        // The address the connection came in on (a non-loopback listener) counts too.
        let local: Option<IpAddr> = "10.0.0.1".parse().ok();
        assert_eq!(
            (
                own_authority("10.0.0.1:9", local),
                own_authority("10.0.0.2:9", local)
            ),
            (true, false)
        );
    }
}

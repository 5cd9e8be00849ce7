//! Requests inside a terminated TLS tunnel (keep-alive HTTP/1.1, origin form) and the
//! upstream's responses: the rewrite sent upstream, response heads parsed and re-serialised,
//! and how their bodies are framed.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::{reason_phrase, Head, Reject, Target, HOP_BY_HOP, MAX_HEADERS};

/// Whether the head's `Connection` header lists `token` (case-insensitive).
pub(crate) fn connection_has(head: &Head, token: &str) -> bool {
    head.headers
        .iter()
        .filter(|(n, _)| n == "connection")
        .any(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
}

/// The client asks for a WebSocket (`Upgrade: websocket`).
pub(crate) fn wants_websocket(head: &Head) -> bool {
    head.headers
        .iter()
        .filter(|(n, _)| n == "upgrade")
        .any(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
        })
}

/// The client expects `100 Continue` before it sends its body.
pub(crate) fn expects_continue(head: &Head) -> bool {
    head.headers
        .iter()
        .any(|(n, v)| n == "expect" && v.trim_ascii().eq_ignore_ascii_case(b"100-continue"))
}

/// The origin-form head sent upstream on a terminated tunnel's keep-alive connection:
/// hop-by-hop headers removed (the client's `Upgrade` too unless `websocket`, then exactly
/// `Connection: Upgrade` and `Upgrade: websocket`), `Expect` removed (the proxy answers
/// `100 Continue` itself), `Connection: close` when `close`.
pub(crate) fn rewrite_inner(head: &Head, websocket: bool, close: bool) -> Vec<u8> {
    let Target::Forward {
        authority, origin, ..
    } = &head.target
    else {
        return Vec::new();
    };
    let named = connection_tokens(head);
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(
        format!("{} {origin} HTTP/1.1\r\nHost: {authority}\r\n", head.method).as_bytes(),
    );
    for (name, value) in &head.headers {
        if HOP_BY_HOP.contains(&name.as_str())
            || name == "expect"
            || named.iter().any(|n| n == name)
        {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if websocket {
        out.extend_from_slice(b"Connection: Upgrade\r\nUpgrade: websocket\r\n");
    } else if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Header names listed in `Connection` (and `Proxy-Connection`), lower-cased.
fn connection_tokens(head: &Head) -> Vec<String> {
    head.headers
        .iter()
        .filter(|(n, _)| n == "connection" || n == "proxy-connection")
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ResponseBody {
    None,
    Length(u64),
    Chunked,
    /// Until the server closes (the client connection then ends too).
    UntilClose,
}

/// A parsed upstream response head.
#[derive(Debug, Clone)]
pub(crate) struct ResponseHead {
    pub(crate) status: u16,
    pub(crate) reason: String,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    pub(crate) body: ResponseBody,
    /// The server ends the connection after this response.
    pub(crate) close: bool,
    pub(crate) len: usize,
}

/// Response header fields never relayed as they came: the proxy frames the client's
/// connection itself.
const RESPONSE_HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "proxy-connection"];

/// Parse an upstream response head (to a request with `method`); `Ok(None)` when more
/// bytes are needed. Framing the proxy cannot relay unambiguously is an error.
pub(crate) fn parse_response_head(
    buf: &[u8],
    method: &str,
) -> Result<Option<ResponseHead>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Reject::bad(format!("malformed upstream response: {e}"))),
    };
    let status = resp.code.unwrap_or(0);
    let reason = resp
        .reason
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    let headers: Vec<(String, Vec<u8>)> = resp
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    let tokens = |name: &str| -> Vec<String> {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| {
                String::from_utf8_lossy(v)
                    .split(',')
                    .map(|t| t.trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let connection = tokens("connection");
    let http10 = resp.version == Some(0);
    let mut close = connection.iter().any(|t| t == "close")
        || (http10 && !connection.iter().any(|t| t == "keep-alive"));
    let body = if method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&status)
        || status == 204
        || status == 304
    {
        ResponseBody::None
    } else {
        let encodings = tokens("transfer-encoding");
        let lengths: Vec<&[u8]> = headers
            .iter()
            .filter(|(n, _)| n == "content-length")
            .map(|(_, v)| v.as_slice())
            .collect();
        if !encodings.is_empty() {
            if !lengths.is_empty() {
                return Err(Reject::bad(
                    "upstream response has Content-Length with Transfer-Encoding",
                ));
            }
            if encodings != ["chunked"] {
                return Err(Reject::bad(
                    "upstream response has a transfer coding other than chunked",
                ));
            }
            ResponseBody::Chunked
        } else if lengths.is_empty() {
            close = true;
            ResponseBody::UntilClose
        } else {
            let mut value: Option<u64> = None;
            for raw in lengths {
                let text = std::str::from_utf8(raw).unwrap_or("").trim();
                let n = (!text.is_empty()
                    && text.len() <= 19
                    && text.bytes().all(|b| b.is_ascii_digit()))
                .then(|| text.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| Reject::bad("upstream response has an invalid Content-Length"))?;
                if value.is_some_and(|v| v != n) {
                    return Err(Reject::bad(
                        "upstream response has conflicting Content-Length headers",
                    ));
                }
                value = Some(n);
            }
            match value {
                Some(0) | None => ResponseBody::None,
                Some(n) => ResponseBody::Length(n),
            }
        }
    };
    Ok(Some(ResponseHead {
        status,
        reason,
        headers,
        body,
        close,
        len,
    }))
}

/// The response head sent to the client: its status, its fields but the hop-by-hop ones
/// (for a `101`, `Connection: Upgrade` and its `Upgrade`), and `Connection: close` when
/// `close`.
pub(crate) fn serialize_response_head(resp: &ResponseHead, close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(format!("HTTP/1.1 {} {}\r\n", resp.status, resp.reason).as_bytes());
    for (name, value) in &resp.headers {
        if RESPONSE_HOP_BY_HOP.contains(&name.as_str()) {
            continue;
        }
        if name == "upgrade" && resp.status != 101 {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    if resp.status == 101 {
        out.extend_from_slice(b"Connection: Upgrade\r\n");
    } else if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Read an upstream response head into `buf` (at most `limit` bytes). `Err` with the reason
/// when the server closed or sent something the proxy cannot relay.
pub(crate) async fn read_response_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    limit: usize,
    method: &str,
) -> Result<ResponseHead, String> {
    let mut chunk = vec![0u8; 8192];
    loop {
        if !buf.is_empty() {
            match parse_response_head(buf, method) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(reject) => return Err(reject.message),
            }
        }
        if buf.len() >= limit {
            return Err(format!("upstream response head larger than {limit} bytes"));
        }
        let want = chunk.len().min(limit - buf.len());
        let n = stream
            .read(&mut chunk[..want])
            .await
            .map_err(|e| format!("reading the upstream response: {e}"))?;
        if n == 0 {
            return Err("the upstream closed before a whole response head".to_string());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A JSON response on a connection that stays open.
pub(crate) fn json_response_keep(status: u16, body: &serde_json::Value) -> Vec<u8> {
    let body = format!("{body}\n");
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        reason_phrase(status),
        body.len()
    )
    .into_bytes()
}

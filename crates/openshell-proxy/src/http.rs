//! Request heads (parsed by httparse), their validation, the forward-form
//! rewrite and message bodies.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Most header lines accepted in one request head.
const MAX_HEADERS: usize = 128;

/// A request head that cannot be served: the status and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {message}")]
pub(crate) struct Reject {
    pub(crate) status: u16,
    pub(crate) message: String,
}

impl Reject {
    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }

    fn too_large(message: impl Into<String>) -> Self {
        Self {
            status: 431,
            message: message.into(),
        }
    }
}

/// Why reading a head ended without one.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The client closed (or failed) before sending a whole head; nothing to answer.
    Closed,
    /// Answer with this status and close.
    Reject(Reject),
}

/// What the request asks the proxy to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// `CONNECT host:port`.
    Connect { host: String, port: u16 },
    /// `GET http://host[:port]/path?query`.
    Forward {
        host: String,
        port: u16,
        /// `host[:port]` as sent, for the Host header upstream.
        authority: String,
        /// Origin-form request target (`/path?query`).
        origin: String,
        /// Path without query, for L7 rules.
        path: String,
    },
}

impl Target {
    pub(crate) fn host(&self) -> &str {
        match self {
            Target::Connect { host, .. } | Target::Forward { host, .. } => host,
        }
    }

    /// The query of a forwarded request, without its `?`; `None` for a CONNECT or a request
    /// without one.
    pub(crate) fn query(&self) -> Option<&str> {
        match self {
            Target::Forward { origin, .. } => origin.split_once('?').map(|(_, q)| q),
            Target::Connect { .. } => None,
        }
    }

    pub(crate) fn port(&self) -> u16 {
        match self {
            Target::Connect { port, .. } | Target::Forward { port, .. } => *port,
        }
    }
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Body {
    None,
    Length(u64),
    Chunked,
}

/// A validated request head.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub(crate) method: String,
    pub(crate) target: Target,
    pub(crate) headers: Vec<(String, Vec<u8>)>,
    pub(crate) body: Body,
    /// Bytes of the buffer the head occupied.
    pub(crate) len: usize,
    /// The request line said HTTP/1.0 (the connection then ends after the response).
    #[cfg_attr(not(feature = "terminate"), allow(dead_code))]
    pub(crate) http10: bool,
}

/// Where a head arrived, which decides how its request target is read.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "terminate"), allow(dead_code))]
pub(crate) enum Form<'a> {
    /// On the proxy's own listener: `CONNECT host:port` or an absolute `http://` URL.
    Proxy,
    /// Inside a terminated TLS tunnel to `host:port`: an origin-form path (or an absolute
    /// `https://` URL naming that host), with a Host header naming that host.
    Tunnel { host: &'a str, port: u16 },
}

/// Read until `buf` holds a whole head, at most `limit` bytes, within `timeout`.
pub(crate) async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    limit: usize,
    timeout: Duration,
) -> Result<Head, ReadError> {
    read_head_in(stream, buf, limit, timeout, Form::Proxy).await
}

/// [`read_head`] for a head arriving as `form` says.
pub(crate) async fn read_head_in<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    limit: usize,
    timeout: Duration,
    form: Form<'_>,
) -> Result<Head, ReadError> {
    let read = async {
        let mut chunk = vec![0u8; 8192];
        loop {
            if !buf.is_empty() {
                match parse_head_in(buf, form) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    Err(reject) => return Err(ReadError::Reject(reject)),
                }
            }
            if buf.len() >= limit {
                return Err(ReadError::Reject(Reject::too_large(format!(
                    "request header fields too large (limit {limit} bytes)"
                ))));
            }
            let want = chunk.len().min(limit - buf.len());
            let n = stream
                .read(&mut chunk[..want])
                .await
                .map_err(|_| ReadError::Closed)?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(result) => result,
        Err(_) => Err(ReadError::Reject(Reject {
            status: 408,
            message: "request head not received in time".into(),
        })),
    }
}

/// Parse and validate a head; `Ok(None)` when more bytes are needed.
#[cfg(test)]
pub(crate) fn parse_head(buf: &[u8]) -> Result<Option<Head>, Reject> {
    parse_head_in(buf, Form::Proxy)
}

/// [`parse_head`] for a head arriving as `form` says.
pub(crate) fn parse_head_in(buf: &[u8], form: Form<'_>) -> Result<Option<Head>, Reject> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Reject::too_large(format!(
                "more than {MAX_HEADERS} header fields"
            )))
        }
        Err(e) => return Err(Reject::bad(format!("malformed request: {e}"))),
    };
    if let Some(at) = bare_lf(&buf[..len]) {
        return Err(Reject::bad(format!(
            "bare LF at byte {at} of the request head: lines must end with CRLF"
        )));
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(Reject::bad("malformed request line"));
    };
    let headers: Vec<(String, Vec<u8>)> = req
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    let body = body_framing(&headers)?;
    if headers.iter().filter(|(n, _)| n == "host").count() > 1 {
        return Err(Reject::bad("duplicate Host header"));
    }
    let target = match form {
        Form::Proxy if method == "CONNECT" => {
            if body != Body::None {
                return Err(Reject::bad("CONNECT must not have a body"));
            }
            let (host, port) = parse_authority(target, None)?;
            Target::Connect { host, port }
        }
        Form::Proxy => parse_absolute(target)?,
        Form::Tunnel { .. } if method == "CONNECT" => {
            return Err(Reject::bad("CONNECT inside a TLS tunnel is refused"))
        }
        Form::Tunnel { host, port } => parse_in_tunnel(target, host, port, &headers)?,
    };
    Ok(Some(Head {
        method: method.to_string(),
        target,
        headers,
        body,
        len,
        http10: req.version == Some(0),
    }))
}

/// The offset of the first LF not preceded by CR.
fn bare_lf(bytes: &[u8]) -> Option<usize> {
    bytes
        .iter()
        .enumerate()
        .find(|&(i, &b)| b == b'\n' && (i == 0 || bytes[i - 1] != b'\r'))
        .map(|(i, _)| i)
}

fn body_framing(headers: &[(String, Vec<u8>)]) -> Result<Body, Reject> {
    let lengths: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_slice())
        .collect();
    let encodings: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .map(|(_, v)| v.as_slice())
        .collect();
    if !lengths.is_empty() && !encodings.is_empty() {
        return Err(Reject::bad(
            "Content-Length together with Transfer-Encoding",
        ));
    }
    if !encodings.is_empty() {
        let only_chunked = encodings.len() == 1
            && std::str::from_utf8(encodings[0])
                .map(|v| v.trim().eq_ignore_ascii_case("chunked"))
                .unwrap_or(false);
        if !only_chunked {
            return Err(Reject::bad("unsupported Transfer-Encoding (only chunked)"));
        }
        return Ok(Body::Chunked);
    }
    let mut value: Option<u64> = None;
    for raw in lengths {
        let text = std::str::from_utf8(raw).unwrap_or("").trim();
        if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Reject::bad("invalid Content-Length"));
        }
        let n: u64 = text
            .parse()
            .map_err(|_| Reject::bad("invalid Content-Length"))?;
        match value {
            Some(prev) if prev != n => {
                return Err(Reject::bad("conflicting Content-Length headers"));
            }
            _ => value = Some(n),
        }
    }
    Ok(match value {
        None | Some(0) => Body::None,
        Some(n) => Body::Length(n),
    })
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !host.starts_with('.')
        && !host.contains("..")
}

/// `host:port`, `[v6]:port`, or without port when `default_port` is given.
pub(crate) fn parse_authority(
    text: &str,
    default_port: Option<u16>,
) -> Result<(String, u16), Reject> {
    let bad = || Reject::bad(format!("invalid target {text:?}: expected host:port"));
    if text.contains('@') {
        return Err(Reject::bad("user information in the target is not allowed"));
    }
    let (host, port_text) = if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or_else(bad)?;
        let ip: std::net::Ipv6Addr = v6.parse().map_err(|_| bad())?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(bad)?),
        };
        (ip.to_string(), port)
    } else {
        match text.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (text.to_string(), None),
        }
    };
    if host.parse::<std::net::Ipv6Addr>().is_err() && !valid_host(&host) {
        return Err(bad());
    }
    let port = match port_text {
        Some(p) => {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            p.parse::<u16>().map_err(|_| bad())?
        }
        None => default_port.ok_or_else(bad)?,
    };
    if port == 0 {
        return Err(bad());
    }
    Ok((host, port))
}

fn parse_absolute(target: &str) -> Result<Target, Reject> {
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(Reject::bad(
            "https:// URLs must be tunnelled: use CONNECT (set HTTPS_PROXY)",
        ));
    }
    if !lower.starts_with("http://") {
        if target.contains("://") {
            return Err(Reject::bad("only http:// URLs can be forwarded"));
        }
        return Err(Reject::bad(
            "not a proxy request: send an absolute http:// URL or CONNECT",
        ));
    }
    let rest = &target[7..];
    if rest.contains('#') {
        return Err(Reject::bad("fragment in request target"));
    }
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(split);
    let (host, port) = parse_authority(authority, Some(80))?;
    let (raw_path, query) = match tail.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (tail, None),
    };
    let path = normalise_path(if raw_path.is_empty() { "/" } else { raw_path })?;
    let origin = match query {
        Some(q) => {
            check_query(q)?;
            format!("{path}?{q}")
        }
        None => path.clone(),
    };
    Ok(Target::Forward {
        host,
        port,
        authority: authority.to_string(),
        origin,
        path,
    })
}

/// A request target inside a terminated tunnel to `host:port`: origin form (`/path?query`),
/// or an absolute `https://` URL naming the tunnel's host; the Host header must name the
/// tunnel's host too (421 otherwise: the connection was decided for that host alone).
fn parse_in_tunnel(
    target: &str,
    host: &str,
    port: u16,
    headers: &[(String, Vec<u8>)],
) -> Result<Target, Reject> {
    let misdirected = |named: &str| Reject {
        status: 421,
        message: format!(
            "the request names {named}, but this connection was opened to {host}:{port}"
        ),
    };
    let same = |authority: &str| -> Result<(), Reject> {
        let (h, p) = parse_authority(authority, Some(443))?;
        let given_port = authority.rsplit_once(':').is_some() && !authority.ends_with(']');
        if normalise_host_text(&h) != host || (given_port && p != port) {
            return Err(misdirected(authority));
        }
        Ok(())
    };
    let origin_form = if target.starts_with('/') {
        target
    } else {
        let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
        if !lower.starts_with("https://") {
            return Err(Reject::bad(
                "inside a TLS tunnel the request target must be a path (or an https:// URL)",
            ));
        }
        let rest = &target[8..];
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        same(&rest[..split])?;
        match &rest[split..] {
            "" => "/",
            tail => tail,
        }
    };
    let authority = match headers.iter().find(|(n, _)| n == "host") {
        Some((_, value)) => {
            let text = std::str::from_utf8(value)
                .map_err(|_| Reject::bad("invalid Host header"))?
                .trim();
            same(text)?;
            text.to_string()
        }
        None => return Err(Reject::bad("missing Host header")),
    };
    if origin_form.contains('#') {
        return Err(Reject::bad("fragment in request target"));
    }
    let (raw_path, query) = match origin_form.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (origin_form, None),
    };
    let path = normalise_path(if raw_path.is_empty() { "/" } else { raw_path })?;
    let origin = match query {
        Some(q) => {
            check_query(q)?;
            format!("{path}?{q}")
        }
        None => path.clone(),
    };
    Ok(Target::Forward {
        host: host.to_string(),
        port,
        authority,
        origin,
        path,
    })
}

fn normalise_host_text(host: &str) -> String {
    openshell_policy::types::normalise_host(host)
}

/// `pchar` of RFC 3986 other than `%` and `;` (handled apart): what a path
/// segment may hold literally.
fn path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The one form of a request path that is both decided on and sent upstream:
/// percent-encoded unreserved characters decoded (`%61dmin` is `admin`),
/// other percent-encodings kept with upper-case hex, runs of `/` collapsed.
/// Refused (400) rather than guessed: `;` path parameters, an encoded `/` or
/// `\` or NUL, dot segments (encoded too), bytes outside `pchar`, malformed
/// percent-encodings. Servers disagree on all of those, so a rule decided on
/// one reading could be bypassed by another.
pub(crate) fn normalise_path(raw: &str) -> Result<String, Reject> {
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(Reject::bad("the request path must start with /"));
    }
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'/' => {
                if !out.ends_with('/') {
                    out.push('/');
                }
                i += 1;
            }
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex_value),
                    bytes.get(i + 2).copied().and_then(hex_value),
                ) else {
                    return Err(Reject::bad(
                        "malformed percent-encoding in the request path",
                    ));
                };
                let decoded = hi * 16 + lo;
                match decoded {
                    b'/' | b'\\' | 0 => {
                        return Err(Reject::bad(
                            "encoded '/', '\\' or NUL in the request path is refused",
                        ))
                    }
                    d if unreserved(d) => out.push(char::from(d)),
                    d => {
                        out.push('%');
                        out.push_str(&format!("{d:02X}"));
                    }
                }
                i += 3;
            }
            b';' => {
                return Err(Reject::bad(
                    "path parameters (';') in the request path are refused",
                ))
            }
            b if path_char(b) => {
                out.push(char::from(b));
                i += 1;
            }
            b => {
                return Err(Reject::bad(format!(
                    "byte 0x{b:02x} is not allowed in the request path (percent-encode it)"
                )))
            }
        }
    }
    if out.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(Reject::bad("dot segments in the request path"));
    }
    Ok(out)
}

/// The query is sent as it came; only bytes a query may hold are accepted.
fn check_query(query: &str) -> Result<(), Reject> {
    match query
        .bytes()
        .find(|&b| !(path_char(b) || matches!(b, b'/' | b'?' | b'%' | b';')))
    {
        Some(b) => Err(Reject::bad(format!(
            "byte 0x{b:02x} is not allowed in the query (percent-encode it)"
        ))),
        None => Ok(()),
    }
}

/// Requests inside terminated tunnels and their responses.
#[cfg(feature = "terminate")]
#[path = "http_inner.rs"]
pub(crate) mod inner;

/// Headers never forwarded (hop-by-hop, proxy-only, and Host, which is
/// rewritten from the URL).
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "host",
];

/// The origin-form head sent upstream: one request per upstream connection,
/// ending with `Connection: close`.
pub(crate) fn rewrite_forward(head: &Head) -> Vec<u8> {
    let Target::Forward {
        authority, origin, ..
    } = &head.target
    else {
        return Vec::new();
    };
    let named: Vec<String> = head
        .headers
        .iter()
        .filter(|(n, _)| n == "connection" || n == "proxy-connection")
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(
        format!("{} {origin} HTTP/1.1\r\nHost: {authority}\r\n", head.method).as_bytes(),
    );
    for (name, value) in &head.headers {
        if HOP_BY_HOP.contains(&name.as_str()) || named.iter().any(|n| n == name) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    out
}

/// A plain-text error response that closes the connection.
pub(crate) fn error_response(status: u16, message: &str) -> Vec<u8> {
    let body = format!("{message}\n");
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason_phrase(status),
        body.len()
    )
    .into_bytes()
}

/// A JSON response that closes the connection.
pub(crate) fn json_response(status: u16, body: &serde_json::Value) -> Vec<u8> {
    let body = format!("{body}\n");
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        reason_phrase(status),
        body.len()
    )
    .into_bytes()
}

pub(crate) fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Errors while relaying a body.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("i/o while relaying the body")]
    Io(#[from] std::io::Error),
    #[error("client closed before the body ended")]
    Truncated,
    #[error("malformed chunked body")]
    Chunked,
}

/// Copy exactly the request body (framed by `body`) from the client to
/// upstream. `buffered` holds bytes already read after the head. Returns the bytes read
/// past the body's end (the start of the next message on a keep-alive connection).
pub(crate) async fn forward_body<R, W>(
    client: &mut R,
    buffered: &[u8],
    body: Body,
    upstream: &mut W,
) -> Result<Vec<u8>, BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match body {
        Body::None => Ok(buffered.to_vec()),
        Body::Length(n) => {
            let take = buffered.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            upstream.write_all(&buffered[..take]).await?;
            let rest = n - take as u64;
            let copied = tokio::io::copy(&mut (&mut *client).take(rest), upstream).await?;
            if copied != rest {
                return Err(BodyError::Truncated);
            }
            Ok(buffered[take..].to_vec())
        }
        Body::Chunked => forward_chunked(client, buffered.to_vec(), upstream).await,
    }
}

async fn fill<R: AsyncRead + Unpin>(client: &mut R, buf: &mut Vec<u8>) -> Result<(), BodyError> {
    let mut chunk = [0u8; 8192];
    let n = client.read(&mut chunk).await?;
    if n == 0 {
        return Err(BodyError::Truncated);
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Longest chunk-size line or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Most bytes of trailer fields relayed for one body.
const MAX_TRAILERS: usize = 16 * 1024;
/// Trailer fields never relayed: they would change how the message is framed or routed.
const TRAILER_REFUSED: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Take one CRLF-terminated line from `buf` (reading more from `client` as needed), without
/// the CRLF. A LF without CR before it, or a line longer than [`MAX_LINE`], is malformed.
async fn take_line<R: AsyncRead + Unpin>(
    client: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Vec<u8>, BodyError> {
    loop {
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            if pos == 0 || buf[pos - 1] != b'\r' {
                return Err(BodyError::Chunked);
            }
            let line = buf[..pos - 1].to_vec();
            buf.drain(..=pos);
            if line.contains(&b'\r') {
                return Err(BodyError::Chunked);
            }
            return Ok(line);
        }
        if buf.len() >= MAX_LINE {
            return Err(BodyError::Chunked);
        }
        fill(client, buf).await?;
    }
}

fn token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// `chunk-size [ chunk-ext ]`: the size, the extensions checked for shape and dropped.
pub(crate) fn parse_chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let end = line.iter().position(|&b| b == b';').unwrap_or(line.len());
    let (size, ext) = line.split_at(end);
    let size = match size.iter().rposition(|&b| b != b' ' && b != b'\t') {
        Some(last) => &size[..=last],
        None => return Err(BodyError::Chunked),
    };
    if size.is_empty() || size.len() > 16 || !size.iter().all(u8::is_ascii_hexdigit) {
        return Err(BodyError::Chunked);
    }
    // Extensions: `;name[=value]` with token names and token or quoted values, never
    // relayed; anything else (control bytes included) is malformed.
    if ext.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(BodyError::Chunked);
    }
    for part in ext.split(|&b| b == b';').skip(1) {
        let part = trim_ows(part);
        let (name, value) = match part.iter().position(|&b| b == b'=') {
            Some(eq) => (trim_ows(&part[..eq]), Some(trim_ows(&part[eq + 1..]))),
            None => (part, None),
        };
        if name.is_empty() || !name.iter().all(|&b| token_char(b)) {
            return Err(BodyError::Chunked);
        }
        if let Some(v) = value {
            let quoted = v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"';
            if !(quoted || (!v.is_empty() && v.iter().all(|&b| token_char(b)))) {
                return Err(BodyError::Chunked);
            }
        }
    }
    let text = std::str::from_utf8(size).map_err(|_| BodyError::Chunked)?;
    u64::from_str_radix(text, 16).map_err(|_| BodyError::Chunked)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// One trailer field, re-serialised as `name: value`; `None` for a field never relayed.
fn trailer_field(line: &[u8]) -> Result<Option<Vec<u8>>, BodyError> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(BodyError::Chunked)?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| token_char(b)) {
        return Err(BodyError::Chunked);
    }
    let value = trim_ows(&line[colon + 1..]);
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(BodyError::Chunked);
    }
    let lower = name.to_ascii_lowercase();
    if TRAILER_REFUSED
        .iter()
        .any(|r| r.as_bytes() == lower.as_slice())
    {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
    Ok(Some(out))
}

/// Relay a chunked body chunk by chunk, re-serialising what frames it: each size line
/// written by us (hex, no extensions), each chunk's data followed by exactly CRLF, the
/// trailer fields rewritten (those that change framing or routing dropped), nothing after
/// the last chunk. Bare LF anywhere in the framing is malformed.
async fn forward_chunked<R, W>(
    client: &mut R,
    mut buf: Vec<u8>,
    upstream: &mut W,
) -> Result<Vec<u8>, BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let line = take_line(client, &mut buf).await?;
        let size = parse_chunk_size(&line)?;
        upstream
            .write_all(format!("{size:X}\r\n").as_bytes())
            .await?;
        if size == 0 {
            break;
        }
        // Chunk data, then exactly CRLF.
        let mut remaining = size;
        while remaining > 0 {
            if buf.is_empty() {
                fill(client, &mut buf).await?;
            }
            let take = buf
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            upstream.write_all(&buf[..take]).await?;
            buf.drain(..take);
            remaining -= take as u64;
        }
        while buf.len() < 2 {
            fill(client, &mut buf).await?;
        }
        if &buf[..2] != b"\r\n" {
            return Err(BodyError::Chunked);
        }
        upstream.write_all(b"\r\n").await?;
        buf.drain(..2);
    }
    // Trailer section: fields until an empty line.
    let mut relayed = 0usize;
    loop {
        let line = take_line(client, &mut buf).await?;
        if line.is_empty() {
            upstream.write_all(b"\r\n").await?;
            return Ok(buf);
        }
        relayed += line.len();
        if relayed > MAX_TRAILERS {
            return Err(BodyError::Chunked);
        }
        if let Some(field) = trailer_field(&line)? {
            upstream.write_all(&field).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn reject_of(raw: &str) -> Option<Reject> {
        parse_head(raw.as_bytes()).err()
    }

    #[test]
    fn connect_targets() {
        assert_eq!(
            parse_authority("example.com:443", None),
            Ok(("example.com".to_string(), 443))
        );
        assert_eq!(
            parse_authority("[::1]:8080", None),
            Ok(("::1".to_string(), 8080))
        );
        for bad in [
            "example.com",
            "example.com:0",
            "example.com:99999",
            ":443",
            "exa mple.com:443",
            "a@b:443",
            "[::1:443",
            "example.com:+44",
            "",
        ] {
            assert!(parse_authority(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn forward_targets() {
        let head = parse_head(b"GET http://Example.com:8080/a/b?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()
            .flatten()
            .map(|h| h.target);
        assert_eq!(
            head,
            Some(Target::Forward {
                host: "Example.com".into(),
                port: 8080,
                authority: "Example.com:8080".into(),
                origin: "/a/b?q=1".into(),
                path: "/a/b".into(),
            })
        );
    }

    #[test]
    fn rejects() {
        let cases = [
            ("GET https://a.com/ HTTP/1.1\r\n\r\n", 400),
            ("GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("CONNECT a.com HTTP/1.1\r\n\r\n", 400),
            ("GET http://a.com/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            (
                "POST http://a.com/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (
                "POST http://a.com/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                400,
            ),
            ("GET http://a.com/x/../y HTTP/1.1\r\n\r\n", 400),
            ("GET http://a.com/x/%2e%2E/y HTTP/1.1\r\n\r\n", 400),
            ("\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),
        ];
        for (raw, status) in cases {
            assert_eq!(reject_of(raw).map(|r| r.status), Some(status), "{raw:?}");
        }
        assert!(parse_head(
            b"POST http://a.com/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"
        )
        .is_ok());
    }

    #[test]
    fn rewrite_strips_hop_by_hop() {
        let raw = b"GET http://a.com:81/p?q HTTP/1.1\r\nHost: evil\r\nProxy-Connection: keep-alive\r\nConnection: X-Secret\r\nX-Secret: 1\r\nProxy-Authorization: Basic x\r\nAccept: */*\r\n\r\n";
        let head = parse_head(raw).ok().flatten();
        let out = head.map(|h| String::from_utf8_lossy(&rewrite_forward(&h)).into_owned());
        assert_eq!(
            out.as_deref(),
            Some("GET /p?q HTTP/1.1\r\nHost: a.com:81\r\naccept: */*\r\nConnection: close\r\n\r\n")
        );
    }

    #[tokio::test]
    async fn chunked_body_stops_at_last_chunk() {
        let input: &[u8] = b"4\r\nWiki\r\n05 ; ext=1;q=\"a b\"\r\npedia\r\n000\r\nX-T:  1 \r\nContent-Length: 9\r\n\r\nGET http://smuggled/ HTTP/1.1\r\n\r\n";
        let mut client = &input[3..];
        let mut out = Vec::new();
        let result = forward_body(&mut client, &input[..3], Body::Chunked, &mut out).await;
        assert!(result.is_ok(), "{result:?}");
        // Sizes rewritten without extensions, trailers rewritten (framing ones dropped),
        // nothing after the body.
        assert_eq!(
            String::from_utf8_lossy(&out),
            "4\r\nWiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n"
        );
    }

    #[test]
    fn paths_are_normalised_once_or_refused() {
        let cases: Vec<(&str, Result<&str, &str>)> = vec![
            ("/a/b", Ok("/a/b")),
            ("/%61dmin", Ok("/admin")),
            ("//admin", Ok("/admin")),
            ("/a//b///c/", Ok("/a/b/c/")),
            ("/%7euser/%2d%5F", Ok("/~user/-_")),
            ("/q%3fx%2bY%3b", Ok("/q%3Fx%2BY%3B")),
            (
                "/x;/admin",
                Err("path parameters (';') in the request path are refused"),
            ),
            (
                "/..;/admin",
                Err("path parameters (';') in the request path are refused"),
            ),
            (
                "/x%2F..%2F..%2Fsecret",
                Err("encoded '/', '\\' or NUL in the request path is refused"),
            ),
            ("/x/%2e%2E/secret", Err("dot segments in the request path")),
            ("/x/%2E/y", Err("dot segments in the request path")),
            ("/x/../y", Err("dot segments in the request path")),
            (
                "/x%5c..",
                Err("encoded '/', '\\' or NUL in the request path is refused"),
            ),
            (
                "/a%00",
                Err("encoded '/', '\\' or NUL in the request path is refused"),
            ),
            (
                "/a%zz",
                Err("malformed percent-encoding in the request path"),
            ),
            (
                "/a%4",
                Err("malformed percent-encoding in the request path"),
            ),
            (
                "/a\\b",
                Err("byte 0x5c is not allowed in the request path (percent-encode it)"),
            ),
            (
                "/\u{e9}",
                Err("byte 0xc3 is not allowed in the request path (percent-encode it)"),
            ),
        ];
        for (raw, want) in cases {
            let got = normalise_path(raw);
            assert_eq!(
                got.as_deref().map_err(|r| r.message.as_str()),
                want,
                "{raw}"
            );
        }
    }

    #[test]
    fn the_decided_path_is_the_path_sent() {
        let head =
            parse_head(b"GET http://a.com/%61dmin//x?q=%2F1 HTTP/1.1\r\nHost: a.com\r\n\r\n")
                .ok()
                .flatten();
        let Some(head) = head else {
            panic!("no head");
        };
        let Target::Forward { path, origin, .. } = &head.target else {
            panic!("not a forward target");
        };
        assert_eq!(
            (path.as_str(), origin.as_str()),
            ("/admin/x", "/admin/x?q=%2F1")
        );
        let sent = String::from_utf8_lossy(&rewrite_forward(&head)).into_owned();
        assert!(
            sent.starts_with("GET /admin/x?q=%2F1 HTTP/1.1\r\n"),
            "{sent}"
        );
    }

    #[test]
    fn bare_lf_in_a_head_is_refused() {
        let r = reject_of("GET http://a.com/ HTTP/1.1\nHost: a.com\r\n\r\n");
        assert_eq!(r.map(|r| r.status), Some(400));
        let r = reject_of("GET http://a.com/ HTTP/1.1\r\nHost: a.com\n\r\n");
        assert_eq!(r.map(|r| r.status), Some(400));
    }

    #[tokio::test]
    async fn malformed_chunked_framing_is_refused() {
        for body in [
            &b"4\nWiki\r\n0\r\n\r\n"[..],
            b"4\r\nWiki\n0\r\n\r\n",
            b"4\r\nWiki\r\n0\r\n\n",
            b"4;\x01\r\nWiki\r\n0\r\n\r\n",
            b"4;=x\r\nWiki\r\n0\r\n\r\n",
            b"x4\r\nWiki\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
            b"0\r\nbad trailer\r\n\r\n",
            b"0\r\nX: a\x01b\r\n\r\n",
        ] {
            let mut client: &[u8] = &[];
            let mut out = Vec::new();
            let result = forward_body(&mut client, body, Body::Chunked, &mut out).await;
            assert!(
                matches!(result, Err(BodyError::Chunked)),
                "{:?}: {result:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}

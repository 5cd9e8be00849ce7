//! Live policy sources: a watched file (inotify) and a polled URL (ETag).
//!
//! Both re-read the whole policy, call [`PolicyHandle::update`] and log the
//! outcome; an invalid or refused policy is reported and the last good one
//! stays in force.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

use crate::policy::{PolicyHandle, UpdateError};

/// How long events are gathered after the first one before re-reading, so
/// an editor's write-rename sequence becomes one reload.
const SETTLE: Duration = Duration::from_millis(50);

/// Largest policy document accepted from a URL.
const MAX_POLICY_BYTES: usize = 4 * 1024 * 1024;

/// A watch or poll could not start.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The policy file has no parent directory or name.
    #[error("cannot watch {}: not a file path", path.display())]
    BadPath {
        /// The path given.
        path: PathBuf,
    },
    /// inotify could not be set up.
    #[error("cannot watch {}", path.display())]
    Notify {
        /// The directory watched.
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    /// The URL is not `http://host[:port]/path`.
    #[error("unsupported policy url {url:?}: expected http://host[:port]/path")]
    BadUrl {
        /// The URL given.
        url: String,
    },
    /// A one-shot fetch failed.
    #[error("fetching policy from {url}: {reason}")]
    Fetch {
        /// The URL given.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

fn log_update(source: &str, result: Result<u64, UpdateError>) {
    match result {
        Ok(generation) => {
            tracing::info!(target: "openshell::policy", source, generation, "network policy updated");
        }
        Err(error) => {
            let detail = match &error {
                UpdateError::Parse(e) => e.to_string(),
                UpdateError::StaticChanged(e) => e.to_string(),
                UpdateError::Compile(e) => {
                    let mut text = e.to_string();
                    let mut cause = std::error::Error::source(e);
                    while let Some(c) = cause {
                        text.push_str(": ");
                        text.push_str(&c.to_string());
                        cause = c.source();
                    }
                    text
                }
            };
            tracing::warn!(target: "openshell::policy", source, %error, %detail, "policy update refused; keeping the last good policy");
        }
    }
}

/// Watch `path` and apply every change to `handle`. The parent directory is
/// watched, so editors that write a new file and rename it over the old one
/// are seen. Unchanged content is not re-applied. Stops when the task is
/// aborted.
pub fn watch_file(path: &Path, handle: PolicyHandle) -> Result<JoinHandle<()>, WatchError> {
    let (watcher, rx) = inotify_changes(path)?;
    Ok(apply_changes(path, handle, rx, Box::new(watcher)))
}

/// An inotify watch (through `notify`) on `path`'s directory that sends one
/// message per event touching `path`. The watch lives as long as the returned
/// watcher.
pub fn inotify_changes(
    path: &Path,
) -> Result<
    (
        notify::RecommendedWatcher,
        tokio::sync::mpsc::UnboundedReceiver<()>,
    ),
    WatchError,
> {
    let bad = || WatchError::BadPath {
        path: path.to_path_buf(),
    };
    let name = path.file_name().ok_or_else(bad)?.to_os_string();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        Some(_) => PathBuf::from("."),
        None => return Err(bad()),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match &event {
            Ok(ev) => ev.paths.is_empty() || ev.paths.iter().any(|p| p.file_name() == Some(&name)),
            Err(_) => true,
        };
        if relevant {
            let _ = tx.send(());
        }
    })
    .map_err(|source| WatchError::Notify {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError::Notify {
            path: dir.clone(),
            source,
        })?;
    Ok((watcher, rx))
}

/// Re-read `path` after each message on `changes` (waiting for the writer to
/// settle) and apply new content to `handle`. `keep` (the change source) lives
/// as long as the task.
pub fn apply_changes(
    path: &Path,
    handle: PolicyHandle,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<()>,
    keep: Box<dyn std::any::Any + Send>,
) -> JoinHandle<()> {
    let path = path.to_path_buf();
    let source_name = path.display().to_string();
    let mut last = std::fs::read(&path).ok();
    tokio::spawn(async move {
        // The change source lives as long as this task.
        let _keep = keep;
        while rx.recv().await.is_some() {
            tokio::time::sleep(SETTLE).await;
            while rx.try_recv().is_ok() {}
            let text = match tokio::fs::read(&path).await {
                Ok(text) => text,
                Err(error) => {
                    tracing::debug!(target: "openshell::policy", source = %source_name, %error, "policy file not readable (yet)");
                    continue;
                }
            };
            if last.as_deref() == Some(text.as_slice()) {
                continue;
            }
            last = Some(text.clone());
            let result = match std::str::from_utf8(&text) {
                Ok(text) => handle.update_yaml(&source_name, text),
                Err(_) => {
                    tracing::warn!(target: "openshell::policy", source = %source_name, "policy file is not utf-8; keeping the last good policy");
                    continue;
                }
            };
            log_update(&source_name, result);
        }
    })
}

/// A parsed `http://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HttpUrl {
    host: String,
    port: u16,
    authority: String,
    path: String,
}

fn parse_url(url: &str) -> Option<HttpUrl> {
    let rest = url
        .get(..7)
        .filter(|s| s.eq_ignore_ascii_case("http://"))
        .map(|_| &url[7..])?;
    let split = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    let (host, port) = crate::http::parse_authority(authority, Some(80)).ok()?;
    let path = if path.is_empty() { "/" } else { path };
    if path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return None;
    }
    Some(HttpUrl {
        host,
        port,
        authority: authority.to_string(),
        path: path.to_string(),
    })
}

/// Fetch `url` every `interval` with `If-None-Match` and apply each new
/// document to `handle`. Plain http only. Stops when the task is aborted.
pub fn poll_url(
    url: &str,
    interval: Duration,
    handle: PolicyHandle,
) -> Result<JoinHandle<()>, WatchError> {
    let parsed = parse_url(url).ok_or_else(|| WatchError::BadUrl {
        url: url.to_string(),
    })?;
    let source_name = url.to_string();
    Ok(tokio::spawn(async move {
        let mut etag: Option<String> = None;
        let mut last_body: Option<Vec<u8>> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let fetched = tokio::time::timeout(
                interval.max(Duration::from_secs(5)),
                fetch(&parsed, etag.as_deref()),
            )
            .await
            .unwrap_or_else(|_| Err("request timed out".to_string()));
            match fetched {
                Ok(Fetched::NotModified) => {}
                Ok(Fetched::Body {
                    etag: new_etag,
                    body,
                }) => {
                    etag = new_etag;
                    if last_body.as_deref() == Some(body.as_slice()) {
                        continue;
                    }
                    last_body = Some(body.clone());
                    match String::from_utf8(body) {
                        Ok(text) => {
                            log_update(&source_name, handle.update_yaml(&source_name, &text))
                        }
                        Err(_) => {
                            tracing::warn!(target: "openshell::policy", source = %source_name, "policy document is not utf-8; keeping the last good policy");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(target: "openshell::policy", source = %source_name, %error, "policy fetch failed; keeping the last good policy");
                }
            }
        }
    }))
}

/// Fetch the policy document at `url` once (the initial policy when a sandbox starts from
/// `--policy-url` alone).
pub async fn fetch_text(url: &str) -> Result<String, WatchError> {
    let parsed = parse_url(url).ok_or_else(|| WatchError::BadUrl {
        url: url.to_string(),
    })?;
    let fetched = tokio::time::timeout(Duration::from_secs(10), fetch(&parsed, None))
        .await
        .unwrap_or_else(|_| Err("request timed out".to_string()));
    match fetched {
        Ok(Fetched::Body { body, .. }) => String::from_utf8(body).map_err(|_| WatchError::Fetch {
            url: url.to_string(),
            reason: "policy document is not utf-8".to_string(),
        }),
        Ok(Fetched::NotModified) => Err(WatchError::Fetch {
            url: url.to_string(),
            reason: "unexpected 304 Not Modified".to_string(),
        }),
        Err(reason) => Err(WatchError::Fetch {
            url: url.to_string(),
            reason,
        }),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Fetched {
    NotModified,
    Body { etag: Option<String>, body: Vec<u8> },
}

/// One `GET` over a fresh connection (`Connection: close`), response parsed
/// with httparse.
async fn fetch(url: &HttpUrl, etag: Option<&str>) -> Result<Fetched, String> {
    let mut stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: openshell-proxy\r\nAccept: */*\r\nConnection: close\r\n",
        url.path, url.authority
    );
    if let Some(tag) = etag {
        request.push_str(&format!("If-None-Match: {tag}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_POLICY_BYTES as u64 + 64 * 1024)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| format!("receive: {e}"))?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Result<Fetched, String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("truncated response head".into()),
        Err(e) => return Err(format!("malformed response: {e}")),
    };
    let status = response.code.unwrap_or(0);
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if status == 304 {
        return Ok(Fetched::NotModified);
    }
    if status != 200 {
        return Err(format!("http status {status}"));
    }
    let etag = header("etag");
    let rest = &raw[head_len..];
    let chunked = header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| "invalid content-length")?;
        rest.get(..len).ok_or("truncated body")?.to_vec()
    } else {
        rest.to_vec()
    };
    if body.len() > MAX_POLICY_BYTES {
        return Err("policy document too large".into());
    }
    Ok(Fetched::Body { etag, body })
}

fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let (idx, size) = match httparse::parse_chunk_size(rest) {
            Ok(httparse::Status::Complete(v)) => v,
            _ => return Err("malformed chunked body".into()),
        };
        rest = &rest[idx..];
        if size == 0 {
            return Ok(body);
        }
        let size = usize::try_from(size).map_err(|_| "chunk too large")?;
        let data = rest.get(..size).ok_or("truncated chunk")?;
        body.extend_from_slice(data);
        rest = rest.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:8080/p.yaml"),
            Some(HttpUrl {
                host: "127.0.0.1".into(),
                port: 8080,
                authority: "127.0.0.1:8080".into(),
                path: "/p.yaml".into()
            })
        );
        assert_eq!(parse_url("https://a/p").map(|u| u.host), None);
        assert_eq!(parse_url("http://a b/p").map(|u| u.host), None);
    }

    #[test]
    fn responses() {
        assert_eq!(
            parse_response(b"HTTP/1.1 304 Not Modified\r\n\r\n"),
            Ok(Fetched::NotModified)
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: 3\r\n\r\nabcdef"),
            Ok(Fetched::Body {
                etag: Some("\"v1\"".into()),
                body: b"abc".to_vec()
            })
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n"),
            Ok(Fetched::Body {
                etag: None,
                body: b"abcd".to_vec()
            })
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 500 Oops\r\n\r\n"),
            Err("http status 500".to_string())
        );
    }
}

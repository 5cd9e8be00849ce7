//! The proxy: listeners, per-connection handling, decisions and relaying.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openshell_policy::types::normalise_host;
use openshell_policy::{Decision, Enforcement, HttpRequest, IpNet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::decision::{deny_body, Action, AuditLog, Decided, Decider, Record};
use crate::http::{self, Head, ReadError, Target};
use crate::identity::{parse_preamble, Caller, IdentityError, IdentityResolver, PREAMBLE_MAX};
use crate::policy::PolicyHandle;
use crate::ssrf;

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Concurrent connections per sandbox (per served listener); more get 503.
    pub max_connections: usize,
    /// Largest request head in bytes; larger gets 431.
    pub header_limit: usize,
    /// Append every decision as a JSON line to this file.
    pub audit_log: Option<PathBuf>,
    /// Limit for resolving and connecting upstream.
    pub connect_timeout: Duration,
    /// Limit for receiving a whole request head (and the Unix preamble);
    /// slower clients get 408.
    pub header_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_limit: 32 * 1024,
            audit_log: None,
            connect_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a proxy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A setting is out of range.
    #[error("invalid proxy configuration: {0}")]
    Config(&'static str),
    /// The audit log could not be opened for appending.
    #[error("cannot open audit log {}", path.display())]
    AuditLog {
        /// The configured path.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One sandbox served by the proxy.
#[derive(Clone)]
pub struct SandboxContext {
    /// Names the sandbox in decision events.
    pub sandbox_id: String,
    /// Finds the caller of each TCP connection. Not consulted for Unix
    /// listeners, whose callers come from the preamble.
    pub identity: Arc<dyn IdentityResolver>,
}

impl std::fmt::Debug for SandboxContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxContext")
            .field("sandbox_id", &self.sandbox_id)
            .finish_non_exhaustive()
    }
}

/// The egress proxy. Cloning gives another handle to the same proxy.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.inner.config)
            .field("policy", self.inner.decider.policy())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: ProxyConfig,
    decider: Decider,
    audit: Option<AuditLog>,
}

/// How the caller of a connection is found.
enum Who {
    Tcp { peer: SocketAddr, local: SocketAddr },
    Preamble,
}

impl Proxy {
    /// Build a proxy deciding with `policy` (shared with whoever updates it).
    pub fn new(config: ProxyConfig, policy: PolicyHandle) -> Result<Self, ProxyError> {
        if config.max_connections == 0 {
            return Err(ProxyError::Config("max_connections must be at least 1"));
        }
        if config.header_limit < 1024 {
            return Err(ProxyError::Config("header_limit must be at least 1024"));
        }
        let audit = match &config.audit_log {
            Some(path) => {
                Some(
                    AuditLog::open(path.clone()).map_err(|source| ProxyError::AuditLog {
                        path: path.clone(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                decider: Decider::new(policy),
                audit,
            }),
        })
    }

    /// The policy handle this proxy decides with.
    pub fn policy(&self) -> &PolicyHandle {
        self.inner.decider.policy()
    }

    /// Serve one sandbox's TCP listener (the process backend's edge address).
    /// Runs until the returned task is aborted; aborting also closes that
    /// listener's open connections. (Dropping the handle detaches the task,
    /// which keeps serving.)
    pub fn serve_tcp(
        &self,
        listener: tokio::net::TcpListener,
        sandbox: SandboxContext,
    ) -> JoinHandle<()> {
        self.serve(listener, sandbox)
    }

    /// [`serve_tcp`](Self::serve_tcp) for a std listener (as bound by the
    /// runtime inside the edge namespace): switches it to non-blocking and
    /// registers it with the current tokio runtime.
    pub fn serve_std_tcp(
        &self,
        listener: std::net::TcpListener,
        sandbox: SandboxContext,
    ) -> std::io::Result<JoinHandle<()>> {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        Ok(self.serve_tcp(listener, sandbox))
    }

    /// Serve a Unix listener (the vm backend's egress socket). Each
    /// connection starts with a caller preamble line
    /// ([`crate::identity::PREAMBLE_PREFIX`]), then the client's request.
    /// Same lifetime rules as [`serve_tcp`](Self::serve_tcp).
    pub fn serve_unix(
        &self,
        listener: tokio::net::UnixListener,
        sandbox: SandboxContext,
    ) -> JoinHandle<()> {
        self.serve(listener, sandbox)
    }

    /// The accept loop both entry points share: a per-sandbox connection
    /// limit (503 beyond it), one task per connection.
    fn serve<L: Entry>(&self, listener: L, sandbox: SandboxContext) -> JoinHandle<()> {
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            let sandbox = Arc::new(sandbox);
            let limit = Arc::new(Semaphore::new(inner.config.max_connections));
            let mut tasks = JoinSet::new();
            loop {
                let accepted = tokio::select! {
                    accepted = listener.next() => accepted,
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                };
                let (stream, src, who) = match accepted {
                    Ok(triple) => triple,
                    Err(error) => {
                        tracing::warn!(target: "openshell::proxy", sandbox = %sandbox.sandbox_id, %error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let permit = Arc::clone(&limit).try_acquire_owned();
                let inner = Arc::clone(&inner);
                let sandbox = Arc::clone(&sandbox);
                tasks.spawn(async move {
                    let Ok(_permit) = permit else {
                        busy(stream, &sandbox.sandbox_id).await;
                        return;
                    };
                    inner.handle(stream, &sandbox, src, who).await;
                });
            }
        })
    }
}

/// A proxy entry point: yields each connection with its source label and how
/// its caller is identified.
trait Entry: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn next(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, String, Who)>> + Send;
}

impl Entry for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String, Who)> {
        let (stream, peer) = self.accept().await?;
        let local = stream.local_addr()?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer.to_string(), Who::Tcp { peer, local }))
    }
}

impl Entry for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String, Who)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, "unix".to_string(), Who::Preamble))
    }
}

async fn busy<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, sandbox: &str) {
    tracing::warn!(target: "openshell::proxy", sandbox, "connection limit reached");
    let response = http::error_response(503, "too many concurrent connections from this sandbox");
    let _ = tokio::time::timeout(LINGER, reply(&mut stream, &response)).await;
}

/// Send a final response, then close gracefully: shut down our side and
/// drain (bounded in bytes and time) what the client is still sending, so the
/// close does not turn into a reset that destroys the response.
async fn reply<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 8192];
        let mut drained = 0usize;
        while drained < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}

/// Longest lingering close after an error response.
const LINGER: Duration = Duration::from_secs(2);
/// Most bytes drained during a lingering close.
const LINGER_BYTES: usize = 1024 * 1024;

/// Read the preamble line into `buf`; on success the line is removed and
/// `buf` holds whatever followed it.
async fn read_preamble<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> Result<Caller, String> {
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let caller = parse_preamble(&buf[..pos]).map_err(|e| e.to_string());
                buf.drain(..=pos);
                return caller;
            }
            if buf.len() >= PREAMBLE_MAX {
                return Err(format!("caller preamble longer than {PREAMBLE_MAX} bytes"));
            }
            let want = chunk.len().min(PREAMBLE_MAX - buf.len());
            let n = stream
                .read(&mut chunk[..want])
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("connection closed before the caller preamble".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| Err("caller preamble not received in time".to_string()))
}

/// The final outcome of deciding one connection or request.
struct Outcome {
    decision: Decision,
    action: Action,
    reason: String,
    /// Where to connect (set when allowed).
    addr: Option<SocketAddr>,
    /// Status for a deny that is not a policy 403 (DNS failure: 502).
    status: u16,
    cached: bool,
    /// Policy generation the decision was made with.
    generation: u64,
}

fn denied(reason: String, missing: Vec<String>, suggestion: Option<String>) -> Decision {
    Decision {
        allow: false,
        policy: None,
        enforcement: Enforcement::Enforce,
        reason,
        missing,
        closest_policy: None,
        suggestion,
        allowed_ips: Vec::new(),
    }
}

impl Inner {
    async fn handle<S>(&self, mut stream: S, sandbox: &SandboxContext, src: String, who: Who)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut buf = Vec::with_capacity(4096);
        let preamble_caller = match who {
            Who::Preamble => {
                match read_preamble(&mut stream, &mut buf, self.config.header_timeout).await {
                    Ok(caller) => Some(caller),
                    Err(message) => {
                        tracing::debug!(target: "openshell::proxy", sandbox = %sandbox.sandbox_id, %message, "bad caller preamble");
                        reply(&mut stream, &http::error_response(400, &message)).await;
                        return;
                    }
                }
            }
            Who::Tcp { .. } => None,
        };
        let head = match http::read_head(
            &mut stream,
            &mut buf,
            self.config.header_limit,
            self.config.header_timeout,
        )
        .await
        {
            Ok(head) => head,
            Err(ReadError::Closed) => return,
            Err(ReadError::Reject(reject)) => {
                tracing::debug!(target: "openshell::proxy", sandbox = %sandbox.sandbox_id, %src, status = reject.status, message = %reject.message, "request refused");
                reply(
                    &mut stream,
                    &http::error_response(reject.status, &reject.message),
                )
                .await;
                return;
            }
        };
        let caller = match (preamble_caller, who) {
            (Some(caller), _) => Ok(caller),
            (None, Who::Tcp { peer, local }) => {
                let resolver = Arc::clone(&sandbox.identity);
                tokio::task::spawn_blocking(move || resolver.resolve(peer, local))
                    .await
                    .unwrap_or_else(|e| Err(IdentityError::Other(e.to_string())))
            }
            (None, Who::Preamble) => Err(IdentityError::Other("no caller".into())),
        };
        let outcome = self.decide(&head, caller.as_ref()).await;
        let (binary, pid, ancestors) = match &caller {
            Ok(c) => (
                c.exe.to_string_lossy().into_owned(),
                c.pid,
                c.ancestors
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect::<Vec<_>>(),
            ),
            Err(_) => (String::new(), 0, Vec::new()),
        };
        let (method, path) = match &head.target {
            Target::Forward { path, .. } => (Some(head.method.as_str()), Some(path.as_str())),
            Target::Connect { .. } => (None, None),
        };
        let record = Record {
            sandbox: &sandbox.sandbox_id,
            src: &src,
            host: head.target.host(),
            port: head.target.port(),
            binary: &binary,
            pid,
            ancestors: &ancestors,
            action: outcome.action,
            policy: outcome.decision.policy.as_deref(),
            reason: &outcome.reason,
            generation: outcome.generation,
            method,
            path,
            cached: outcome.cached,
        };
        record.emit();
        if let Some(audit) = &self.audit {
            audit.append(&record);
        }
        let Some(addr) = outcome.addr else {
            let response = if outcome.status == 403 {
                http::json_response(
                    403,
                    &deny_body(
                        head.target.host(),
                        head.target.port(),
                        &binary,
                        &outcome.decision,
                        &outcome.reason,
                    ),
                )
            } else {
                http::error_response(outcome.status, &outcome.reason)
            };
            reply(&mut stream, &response).await;
            return;
        };
        let upstream = match tokio::time::timeout(
            self.config.connect_timeout,
            TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(error)) => {
                tracing::debug!(target: "openshell::proxy", %addr, %error, "upstream connect failed");
                reply(
                    &mut stream,
                    &http::error_response(502, &format!("cannot connect to {addr}: {error}")),
                )
                .await;
                return;
            }
            Err(_) => {
                reply(
                    &mut stream,
                    &http::error_response(504, &format!("connecting to {addr} timed out")),
                )
                .await;
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        self.relay(stream, upstream, &head, &buf[head.len..]).await;
    }

    async fn relay<S>(&self, mut client: S, mut upstream: TcpStream, head: &Head, rest: &[u8])
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let result: std::io::Result<()> = async {
            match head.target {
                Target::Connect { .. } => {
                    client
                        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                        .await?;
                    if !rest.is_empty() {
                        upstream.write_all(rest).await?;
                    }
                    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
                }
                Target::Forward { .. } => {
                    upstream.write_all(&http::rewrite_forward(head)).await?;
                    http::forward_body(&mut client, rest, head.body, &mut upstream)
                        .await
                        .map_err(std::io::Error::other)?;
                    upstream.flush().await?;
                    tokio::io::copy(&mut upstream, &mut client).await?;
                    client.shutdown().await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(error) = result {
            tracing::debug!(target: "openshell::proxy", %error, "relay ended with an error");
        }
    }

    async fn decide(&self, head: &Head, caller: Result<&Caller, &IdentityError>) -> Outcome {
        let caller = match caller {
            Ok(caller) => caller,
            Err(error) => {
                let generation = self.decider.policy().generation();
                let reason = match error {
                    IdentityError::BinaryChanged { .. } => {
                        "binary content changed since first seen".to_string()
                    }
                    error => format!("cannot identify the calling process: {error}"),
                };
                return Outcome {
                    decision: denied(reason.clone(), vec!["binary".into()], None),
                    action: Action::Deny,
                    reason,
                    addr: None,
                    status: 403,
                    cached: false,
                    generation,
                };
            }
        };
        let host = normalise_host(head.target.host());
        let port = head.target.port();
        let request = match &head.target {
            Target::Forward { path, .. } => Some(HttpRequest {
                method: head.method.clone(),
                path: path.clone(),
            }),
            Target::Connect { .. } => None,
        };
        let Decided {
            decision,
            cached: was_cached,
            generation,
        } = self.decider.decide(caller, &host, port, request);
        let decision = match decision {
            Ok(d) => d,
            Err(error) => {
                tracing::error!(target: "openshell::proxy", error = %error, "policy evaluation failed");
                let reason = "policy evaluation failed".to_string();
                return Outcome {
                    decision: denied(reason.clone(), Vec::new(), None),
                    action: Action::Deny,
                    reason,
                    addr: None,
                    status: 403,
                    cached: false,
                    generation,
                };
            }
        };
        if !decision.allow {
            return Outcome {
                reason: decision.reason.clone(),
                decision,
                action: Action::Deny,
                addr: None,
                status: 403,
                cached: was_cached,
                generation,
            };
        }
        let allowed: Vec<IpNet> = decision
            .allowed_ips
            .iter()
            .filter_map(|s| IpNet::try_from(s.as_str()).ok())
            .collect();
        match self.pick_address(&host, port, &allowed).await {
            Ok(addr) => Outcome {
                action: if decision.enforcement == Enforcement::Audit {
                    Action::Audit
                } else {
                    Action::Allow
                },
                reason: decision.reason.clone(),
                decision,
                addr: Some(addr),
                status: 200,
                cached: was_cached,
                generation,
            },
            Err((status, reason, ip)) => {
                let suggestion = ip.map(|ip| {
                    format!(
                        "if {host} is meant to reach {ip}, add allowed_ips covering {ip} to its endpoint in policy {}",
                        decision.policy.as_deref().unwrap_or("?")
                    )
                });
                let mut refused = denied(reason.clone(), Vec::new(), suggestion);
                refused.closest_policy = decision.policy.clone();
                Outcome {
                    reason,
                    decision: refused,
                    action: Action::Deny,
                    addr: None,
                    status,
                    cached: was_cached,
                    generation,
                }
            }
        }
    }

    /// Resolve `host` once and pick the first address the SSRF rules allow.
    async fn pick_address(
        &self,
        host: &str,
        port: u16,
        allowed: &[IpNet],
    ) -> Result<SocketAddr, (u16, String, Option<IpAddr>)> {
        let lookup = tokio::time::timeout(
            self.config.connect_timeout,
            tokio::net::lookup_host((host, port)),
        )
        .await;
        let addrs: Vec<SocketAddr> = match lookup {
            Ok(Ok(addrs)) => addrs.collect(),
            Ok(Err(error)) => return Err((502, format!("cannot resolve {host}: {error}"), None)),
            Err(_) => return Err((504, format!("resolving {host} timed out"), None)),
        };
        let mut first_refusal = None;
        for addr in &addrs {
            match ssrf::check(addr.ip(), allowed) {
                Ok(()) => return Ok(*addr),
                Err(reason) => {
                    if first_refusal.is_none() {
                        first_refusal = Some((reason, addr.ip()));
                    }
                }
            }
        }
        match first_refusal {
            Some((reason, ip)) => Err((403, reason, Some(ip))),
            None => Err((502, format!("{host} resolved to no address"), None)),
        }
    }
}

/// Aborts a serving task when dropped (tokio's `JoinHandle` only detaches),
/// closing the listener and its open connections: a guard to keep for as
/// long as a sandbox runs.
#[derive(Debug)]
pub struct ServeGuard(pub JoinHandle<()>);

impl Drop for ServeGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

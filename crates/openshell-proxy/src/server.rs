//! The proxy: listeners, per-connection handling, decisions and relaying.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openshell_policy::types::normalise_host;
use openshell_policy::{ConnectMode, Decision, Endpoint, Enforcement, HttpRequest, IpNet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::approval::{Answer, ApprovalConfig, Approvals, Question, Settled};
use crate::decision::{deny_body, Action, AuditLog, AuditRotation, Decided, Decider, Record};
use crate::http::{self, Head, ReadError, Target};
use crate::identity::{
    parse_preamble, Caller, Identified, IdentityError, IdentityResolver, PREAMBLE_MAX,
};
use crate::policy::PolicyHandle;
use crate::ssrf::{self, HostAddresses};
use crate::tls::{self, Hello};
#[cfg(feature = "terminate")]
use crate::{
    credentials::{CredentialSet, Refusal},
    http::{inner::ResponseBody, Body, Form},
    terminate::{Prefixed, Termination},
};

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Concurrent connections per sandbox (per served listener); more get 503.
    pub max_connections: usize,
    /// Largest request head in bytes; larger gets 431.
    pub header_limit: usize,
    /// Append every decision as a JSON line to this file.
    pub audit_log: Option<PathBuf>,
    /// When the audit log is rotated and how many old files are kept.
    pub audit_rotation: AuditRotation,
    /// Limit for resolving and connecting upstream.
    pub connect_timeout: Duration,
    /// Limit for receiving a whole request head (and the Unix preamble);
    /// slower clients get 408.
    pub header_timeout: Duration,
    /// Ask a person about what `enforcement: ask` endpoints allow. `None`: nobody is there
    /// to ask, and such an allow is a deny that says so.
    pub approvals: Option<ApprovalConfig>,
    /// The supervisor's own listeners (the approval endpoint, the SSH server): refused as
    /// destinations on every local address, whatever an endpoint's `allowed_ips` says, so a
    /// sandbox can never answer its own questions or reach the supervisor's services.
    pub reserved: Vec<ssrf::Reserved>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_limit: 32 * 1024,
            audit_log: None,
            audit_rotation: AuditRotation::default(),
            connect_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(30),
            approvals: None,
            reserved: Vec::new(),
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
    /// The sandbox's CA, upstream TLS settings and credentials: `tls: terminate` endpoints
    /// are refused without it.
    #[cfg(feature = "terminate")]
    pub termination: Option<Arc<Termination>>,
}

impl SandboxContext {
    /// A sandbox named `sandbox_id` whose callers `identity` finds, without TLS termination.
    pub fn new(sandbox_id: impl Into<String>, identity: Arc<dyn IdentityResolver>) -> Self {
        Self {
            sandbox_id: sandbox_id.into(),
            identity,
            #[cfg(feature = "terminate")]
            termination: None,
        }
    }

    /// The same sandbox, terminating TLS with `termination`.
    #[cfg(feature = "terminate")]
    pub fn with_termination(mut self, termination: Arc<Termination>) -> Self {
        self.termination = Some(termination);
        self
    }

    /// The credentials whose placeholders this sandbox holds (none without termination).
    #[cfg(feature = "terminate")]
    fn credentials(&self) -> Option<&CredentialSet> {
        self.termination.as_deref().map(|t| &t.credentials)
    }
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
    audit: Option<Arc<AuditLog>>,
    /// The questions held connections wait on (with [`ProxyConfig::approvals`]).
    approvals: Option<Approvals>,
    /// The host's own addresses, refused as destinations like loopback.
    host_addresses: HostAddresses,
}

/// How the caller of a connection is found.
#[derive(Debug, Clone, Copy)]
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
        if config.approvals.is_some_and(|a| a.max_pending == 0) {
            return Err(ProxyError::Config(
                "approvals.max_pending must be at least 1",
            ));
        }
        let audit = match &config.audit_log {
            Some(path) => Some(Arc::new(
                AuditLog::open(path.clone(), config.audit_rotation).map_err(|source| {
                    ProxyError::AuditLog {
                        path: path.clone(),
                        source,
                    }
                })?,
            )),
            None => None,
        };
        let approvals = config
            .approvals
            .map(|a| Approvals::new(a, policy.clone(), audit.clone()));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                decider: Decider::new(policy),
                audit,
                approvals,
                host_addresses: HostAddresses::watch(),
            }),
        })
    }

    /// The policy handle this proxy decides with.
    pub fn policy(&self) -> &PolicyHandle {
        self.inner.decider.policy()
    }

    /// The questions about `enforcement: ask` endpoints, to answer them
    /// ([`crate::approval::http::serve`]); `None` without [`ProxyConfig::approvals`].
    pub fn approvals(&self) -> Option<&Approvals> {
        self.inner.approvals.as_ref()
    }

    /// The sandbox `sandbox_id` ended: its `allow-always` grants end now (its accept loop
    /// also drops them when it ends, but an aborted task ends whenever the runtime gets to
    /// it).
    pub fn end_sandbox(&self, sandbox_id: &str) {
        self.inner.decider.policy().forget_sandbox(sandbox_id);
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
    /// limit, one task per connection. A connection over the limit is answered
    /// 503 with one non-blocking write and closed, in the loop itself: no task
    /// is spawned for it.
    fn serve<L: Entry>(&self, listener: L, sandbox: SandboxContext) -> JoinHandle<()> {
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            // However the loop ends (aborted, as it normally is), the sandbox's allow-always
            // grants end with it.
            let _grants = ForgetGrants {
                policy: inner.decider.policy().clone(),
                sandbox: sandbox.sandbox_id.clone(),
            };
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
                let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                    tracing::warn!(target: "openshell::proxy", sandbox = %sandbox.sandbox_id, %src, "connection limit reached");
                    L::refuse(
                        stream,
                        &http::error_response(
                            503,
                            "too many concurrent connections from this sandbox",
                        ),
                    );
                    continue;
                };
                let inner = Arc::clone(&inner);
                let sandbox = Arc::clone(&sandbox);
                tasks.spawn(async move {
                    let _permit = permit;
                    inner.handle(stream, &sandbox, src, who).await;
                });
            }
        })
    }
}

/// Drops a sandbox's grants when its accept loop ends.
struct ForgetGrants {
    policy: PolicyHandle,
    sandbox: String,
}

impl Drop for ForgetGrants {
    fn drop(&mut self) {
        self.policy.forget_sandbox(&self.sandbox);
    }
}

/// A proxy entry point: yields each connection with its source label and how
/// its caller is identified.
trait Entry: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn next(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, String, Who)>> + Send;
    /// Answer with `bytes` if the socket takes them at once, then close.
    fn refuse(stream: Self::Stream, bytes: &[u8]);
}

impl Entry for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String, Who)> {
        let (stream, peer) = self.accept().await?;
        let local = stream.local_addr()?;
        let _ = stream.set_nodelay(true);
        Ok((stream, peer.to_string(), Who::Tcp { peer, local }))
    }
    fn refuse(stream: Self::Stream, bytes: &[u8]) {
        let _ = stream.try_write(bytes);
    }
}

impl Entry for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String, Who)> {
        let (stream, _) = self.accept().await?;
        Ok((stream, "unix".to_string(), Who::Preamble))
    }
    fn refuse(stream: Self::Stream, bytes: &[u8]) {
        let _ = stream.try_write(bytes);
    }
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

/// Most client bytes kept while a connection waits for approval.
const HOLD_BUFFER: usize = 64 * 1024;

/// Read the client while it waits (for approval), appending to `buf` up to [`HOLD_BUFFER`]
/// bytes; returns when the client closes or fails (and never once the buffer is full).
async fn watch_client<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    while buf.len() < HOLD_BUFFER {
        let want = chunk.len().min(HOLD_BUFFER - buf.len());
        match stream.read(&mut chunk[..want]).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    std::future::pending::<()>().await;
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
    /// For an allow through an `enforcement: ask` endpoint: that endpoint.
    asked: Option<Endpoint>,
    /// The approval question it waited on.
    approval: Option<String>,
}

impl Outcome {
    fn deny(reason: String, missing: Vec<String>, generation: u64) -> Self {
        Self {
            decision: denied(reason.clone(), missing, None),
            action: Action::Deny,
            reason,
            addr: None,
            status: 403,
            cached: false,
            generation,
            asked: None,
            approval: None,
        }
    }

    /// This outcome, now a deny for `reason` (missing `approval`), keeping the policy that
    /// asked and the question.
    fn refuse_approval(&mut self, reason: String) {
        let policy = self.decision.policy.clone();
        let approval = self.approval.take();
        *self = Outcome::deny(reason, vec!["approval".into()], self.generation);
        self.decision.closest_policy = policy;
        self.approval = approval;
    }

    fn allowed(&self) -> bool {
        self.action != Action::Deny
    }
}

fn denied(reason: String, missing: Vec<String>, suggestion: Option<String>) -> Decision {
    Decision {
        allow: false,
        policy: None,
        endpoint: None,
        enforcement: Enforcement::Enforce,
        reason,
        missing,
        closest_policy: None,
        suggestion,
        allowed_ips: Vec::new(),
        connect: None,
        websocket: false,
    }
}

/// Why a caller could not be credited, as a deny's reason.
fn identity_reason(error: &IdentityError) -> String {
    match error {
        IdentityError::BinaryChanged { .. }
        | IdentityError::Redirected { .. }
        | IdentityError::TooLarge { .. }
        | IdentityError::Shared { .. }
        | IdentityError::Changed(_) => error.to_string(),
        error => format!("cannot identify the calling process: {error}"),
    }
}

/// Whether this sandbox's connections can be terminated.
fn terminates(sandbox: &SandboxContext) -> bool {
    #[cfg(feature = "terminate")]
    {
        sandbox.termination.is_some()
    }
    #[cfg(not(feature = "terminate"))]
    {
        let _ = sandbox;
        false
    }
}

/// The structured event for a placeholder sent where its value may not go.
#[cfg(feature = "terminate")]
fn refused_credential(sandbox: &str, host: &str, port: u16, refusal: &Refusal) {
    tracing::warn!(
        target: "openshell::decision",
        event = "credential.refused",
        sandbox,
        credential = %refusal.credential,
        host = %crate::decision::clip(host),
        port,
        place = %refusal.place,
        "credential placeholder refused"
    );
}

/// What a passthrough tunnel's first client bytes must be.
enum Gate {
    /// A TLS ClientHello whose server name is this host (lower-cased, no trailing dot).
    ServerName(String),
    /// Anything; but a ClientHello must carry no server name (the CONNECT named an address).
    NoServerName,
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
        // The caller is identified when the connection is accepted (side by side with reading
        // the head) and again once the head is in; any difference is a deny.
        let accepted = async {
            match who {
                Who::Tcp { peer, local } => Some(sandbox.identity.identify(peer, local).await),
                Who::Preamble => None,
            }
        };
        let head = http::read_head(
            &mut stream,
            &mut buf,
            self.config.header_limit,
            self.config.header_timeout,
        );
        let (accepted, head) = tokio::join!(accepted, head);
        let head = match head {
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
        let identified: Result<Option<Identified>, IdentityError> = match (accepted, who) {
            (Some(first), Who::Tcp { peer, local }) => {
                let second = sandbox.identity.identify(peer, local).await;
                match (first, second) {
                    (Ok(a), Ok(b)) if a == b => Ok(Some(b)),
                    (Ok(_), Ok(_)) => Err(IdentityError::Changed(
                        "between the connection and its request".into(),
                    )),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
            _ => Ok(None),
        };
        let mut caller: Result<Caller, IdentityError> = match (&identified, preamble_caller) {
            (_, Some(caller)) => Ok(caller),
            (Ok(Some(identified)), None) => Ok(identified.caller.clone()),
            (Ok(None), None) => Err(IdentityError::Other("no caller".into())),
            (Err(e), None) => Err(IdentityError::Other(identity_reason(e))),
        };
        let mut outcome = self.decide(&head, caller.as_ref());
        // The expensive identity checks only for what the policy allows.
        if let (true, Ok(Some(identified))) = (outcome.allowed(), &identified) {
            match sandbox.identity.verify(identified).await {
                Ok(verified) => {
                    if caller.as_ref().ok() != Some(&verified) {
                        outcome = self.decide(&head, Ok(&verified));
                        caller = Ok(verified);
                    }
                }
                Err(error) => {
                    outcome = Outcome::deny(
                        identity_reason(&error),
                        vec!["binary".into()],
                        outcome.generation,
                    );
                }
            }
        }
        let mut terminate = false;
        if outcome.allowed() {
            if let Target::Connect { .. } = head.target {
                match outcome.decision.connect {
                    Some(ConnectMode::Tunnel) => {}
                    Some(ConnectMode::Terminate) if terminates(sandbox) => terminate = true,
                    Some(ConnectMode::Terminate) => {
                        let reason = format!(
                            "the endpoint in policy {} has tls: terminate, and this proxy was started without TLS termination, so the connection is refused rather than tunnelled unchecked",
                            outcome.decision.policy.as_deref().unwrap_or("?")
                        );
                        let mut refused =
                            Outcome::deny(reason, vec!["tls".into()], outcome.generation);
                        refused.decision.closest_policy = outcome.decision.policy.clone();
                        refused.decision.connect = Some(ConnectMode::Terminate);
                        outcome = refused;
                    }
                    Some(ConnectMode::Deny) | None => {
                        outcome = Outcome::deny(
                            "the policy gave no way to carry this tunnel".into(),
                            Vec::new(),
                            outcome.generation,
                        );
                    }
                }
            }
        }
        // A placeholder never travels in a CONNECT head or a plain-HTTP request.
        #[cfg(feature = "terminate")]
        if let (true, Some(credentials)) = (outcome.allowed(), sandbox.credentials()) {
            if let Some(found) = credentials.find_in(&buf[..head.len]) {
                let place = match head.target {
                    Target::Connect { .. } => "CONNECT request",
                    Target::Forward { .. } => "plain HTTP request",
                };
                let host = normalise_host(head.target.host());
                let refusal = CredentialSet::refusal(found, place, &host, head.target.port());
                refused_credential(&sandbox.sandbox_id, &host, head.target.port(), &refusal);
                outcome = Outcome::deny(
                    refusal.reason,
                    vec!["credential".into()],
                    outcome.generation,
                );
            }
        }
        // An allow through an ask endpoint waits for a person's answer (or an allow-always
        // one), before anything is resolved or sent upstream.
        let mut approved = None;
        if let (true, Enforcement::Ask, Ok(c)) = (
            outcome.allowed(),
            outcome.decision.enforcement,
            caller.as_ref(),
        ) {
            let request = match &head.target {
                Target::Forward { path, .. } => {
                    Some((head.method.as_str(), path.as_str(), head.target.query()))
                }
                Target::Connect { .. } => None,
            };
            let host = normalise_host(head.target.host());
            approved = self
                .hold(
                    &mut stream,
                    &mut buf,
                    sandbox,
                    c,
                    (&host, head.target.port()),
                    request,
                    &mut outcome,
                )
                .await;
            // The answer was for the program the question named: on a TCP listener it is
            // identified and verified once more (the guest agent vouches for its callers).
            if let (true, Some(_), Who::Tcp { peer, local }) =
                (outcome.allowed(), &outcome.approval, who)
            {
                let again = match sandbox.identity.identify(peer, local).await {
                    Ok(identified) => sandbox.identity.verify(&identified).await,
                    Err(error) => Err(error),
                };
                match again {
                    Ok(now) if &now == c => {}
                    Ok(_) => outcome.refuse_approval(
                        "the calling process changed while the connection waited for approval"
                            .into(),
                    ),
                    Err(error) => outcome.refuse_approval(identity_reason(&error)),
                }
            }
        }
        if outcome.allowed() {
            self.resolve(&head, &mut outcome).await;
        }
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
            approval: outcome.approval.as_deref(),
        };
        self.log(&record);
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
        #[cfg(feature = "terminate")]
        if let (true, Some(termination), Ok(caller)) =
            (terminate, sandbox.termination.as_deref(), &caller)
        {
            let rest = buf[head.len..].to_vec();
            self.terminate(
                stream,
                termination,
                &head,
                rest,
                addr,
                caller,
                &record,
                sandbox,
                approved,
            )
            .await;
            return;
        }
        #[cfg(not(feature = "terminate"))]
        let _ = approved;
        if terminate {
            // Unreachable: `terminates` said this build has no termination.
            return;
        }
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
        let rest = buf[head.len..].to_vec();
        match &head.target {
            Target::Connect { host, .. } => {
                let gate = match host.parse::<IpAddr>() {
                    Ok(_) => Gate::NoServerName,
                    Err(_) => Gate::ServerName(normalise_host(host)),
                };
                let normalised = normalise_host(host);
                let port = head.target.port();
                let scan = |first: &[u8]| -> Result<(), String> {
                    #[cfg(feature = "terminate")]
                    if let Some(found) = sandbox.credentials().and_then(|c| c.find_in(first)) {
                        let refusal =
                            CredentialSet::refusal(found, "passthrough tunnel", &normalised, port);
                        refused_credential(&sandbox.sandbox_id, &normalised, port, &refusal);
                        return Err(refusal.reason);
                    }
                    let _ = (first, &normalised, port);
                    Ok(())
                };
                if let Err(reason) = self.tunnel(stream, upstream, rest, gate, &scan).await {
                    let refused = Record {
                        action: Action::Deny,
                        reason: &reason,
                        cached: false,
                        ..record
                    };
                    self.log(&refused);
                }
            }
            Target::Forward { .. } => self.forward(stream, upstream, &head, &rest).await,
        }
    }

    fn log(&self, record: &Record<'_>) {
        record.emit();
        if let Some(audit) = &self.audit {
            audit.append(record);
        }
    }

    /// Relay a passthrough tunnel. The client's first bytes pass `gate` before anything is
    /// sent upstream; `Err` is the reason the tunnel was closed instead.
    async fn tunnel<S>(
        &self,
        client: S,
        upstream: TcpStream,
        mut first: Vec<u8>,
        gate: Gate,
        scan: &(dyn Fn(&[u8]) -> Result<(), String> + Sync),
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let (mut up_r, mut up_w) = upstream.into_split();
        client_w
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .map_err(|e| format!("writing to the client: {e}"))?;
        // With a host name, nothing flows either way before the server name is checked (TLS
        // speaks first from the client). With an address, the server may speak first.
        if let Gate::ServerName(host) = &gate {
            let checked = check_hello(
                &mut client_r,
                &mut first,
                Some(host),
                self.config.header_timeout,
            )
            .await;
            if let Err(reason) = checked.and_then(|()| scan(&first)) {
                let _ = client_w.shutdown().await;
                return Err(reason);
            }
        }
        let downstream = async {
            let _ = tokio::io::copy(&mut up_r, &mut client_w).await;
            let _ = client_w.shutdown().await;
        };
        let upstream_bound = async {
            if let Gate::NoServerName = gate {
                check_hello(&mut client_r, &mut first, None, self.config.header_timeout).await?;
                scan(&first)?;
            }
            if !first.is_empty() {
                up_w.write_all(&first)
                    .await
                    .map_err(|e| format!("writing upstream: {e}"))?;
            }
            let _ = tokio::io::copy(&mut client_r, &mut up_w).await;
            let _ = up_w.shutdown().await;
            Ok::<(), String>(())
        };
        match gate {
            Gate::ServerName(_) => {
                let (up, ()) = tokio::join!(upstream_bound, downstream);
                up
            }
            Gate::NoServerName => {
                tokio::pin!(downstream);
                tokio::select! {
                    up = upstream_bound => {
                        up?;
                        downstream.await;
                        Ok(())
                    }
                    () = &mut downstream => Ok(()),
                }
            }
        }
    }

    async fn forward<S>(&self, mut client: S, mut upstream: TcpStream, head: &Head, rest: &[u8])
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let result: std::io::Result<()> = async {
            upstream.write_all(&http::rewrite_forward(head)).await?;
            http::forward_body(&mut client, rest, head.body, &mut upstream)
                .await
                .map_err(std::io::Error::other)?;
            // One request per plain-HTTP connection: what follows its body is not relayed.
            upstream.flush().await?;
            tokio::io::copy(&mut upstream, &mut client).await?;
            client.shutdown().await?;
            Ok(())
        }
        .await;
        if let Err(error) = result {
            tracing::debug!(target: "openshell::proxy", %error, "relay ended with an error");
        }
    }

    /// Carry a CONNECT to a `tls: terminate` endpoint: complete the client's TLS handshake
    /// with a leaf of the sandbox CA for the CONNECT host (its ClientHello must name that
    /// host; ALPN offers only `http/1.1`), then read HTTP/1.1 requests one after another on
    /// that keep-alive connection and decide each with its method and normalised path; an
    /// allowed request gets its credentials substituted and goes upstream over a TLS
    /// connection of the proxy's own (opened on the first allowed request, verified, ALPN
    /// `http/1.1`), and its response comes back re-framed. A denied request gets a 403 (the
    /// connection stays open when the request had no body). A WebSocket upgrade passes only
    /// when the endpoint that allowed it says `protocol: websocket`; the connection is then
    /// relayed as it is.
    ///
    /// `approved` is the ask endpoint (policy key and endpoint) whose question the CONNECT
    /// waited on and got an allow for: requests it allows go on without asking again; one
    /// that another ask endpoint allows is held with its method and path.
    #[cfg(feature = "terminate")]
    #[allow(clippy::too_many_arguments)]
    async fn terminate<S>(
        &self,
        mut stream: S,
        t: &Termination,
        connect: &Head,
        rest: Vec<u8>,
        addr: SocketAddr,
        caller: &Caller,
        base: &Record<'_>,
        sandbox: &SandboxContext,
        approved: Option<(String, Endpoint)>,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let host = normalise_host(connect.target.host());
        let port = connect.target.port();
        let refuse = |reason: String| {
            self.log(&Record {
                action: Action::Deny,
                reason: &reason,
                cached: false,
                ..base.clone()
            });
        };
        if stream
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        let acceptor = tokio_rustls::LazyConfigAcceptor::new(
            rustls::server::Acceptor::default(),
            Prefixed::new(rest, stream),
        );
        let start = match tokio::time::timeout(self.config.header_timeout, acceptor).await {
            Ok(Ok(start)) => start,
            Ok(Err(error)) => {
                refuse(format!(
                    "a terminated connection to {host} must start with a TLS ClientHello: {error}"
                ));
                return;
            }
            Err(_) => {
                refuse("no TLS ClientHello received in time".to_string());
                return;
            }
        };
        let sni = start.client_hello().server_name().map(normalise_host);
        let named = match (host.parse::<IpAddr>().is_ok(), sni) {
            (false, Some(sni)) if sni == host => Ok(()),
            (false, Some(sni)) => Err(format!(
                "TLS server name {sni} does not match the CONNECT host {host}"
            )),
            (false, None) => Err(format!(
                "the TLS ClientHello names no server; a tunnel to {host} must name it (SNI)"
            )),
            (true, None) => Ok(()),
            (true, Some(sni)) => Err(format!(
                "TLS server name {sni} on a tunnel to an address: the CONNECT must name the host"
            )),
        };
        if let Err(reason) = named {
            refuse(reason);
            return;
        }
        let config = match t.ca.server_config(&host) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(target: "openshell::proxy", %host, error = %error, "cannot make a certificate");
                return;
            }
        };
        let mut client = match tokio::time::timeout(
            self.config.header_timeout,
            start.into_stream(config),
        )
        .await
        {
            Ok(Ok(client)) => client,
            Ok(Err(error)) => {
                tracing::debug!(target: "openshell::proxy", sandbox = base.sandbox, %host, %error, "client TLS handshake failed (does the client trust the sandbox CA?)");
                return;
            }
            Err(_) => return,
        };
        let binary = base.binary;
        let form = Form::Tunnel { host: &host, port };
        let mut buf: Vec<u8> = Vec::new();
        let mut upstream: Option<tokio_rustls::client::TlsStream<TcpStream>> = None;
        let mut ubuf: Vec<u8> = Vec::new();
        loop {
            let idle = buf.is_empty();
            let mut req = match http::read_head_in(
                &mut client,
                &mut buf,
                self.config.header_limit,
                self.config.header_timeout,
                form,
            )
            .await
            {
                Ok(req) => req,
                Err(ReadError::Closed) => return,
                Err(ReadError::Reject(r)) if r.status == 408 && idle => {
                    let _ = client.shutdown().await;
                    return;
                }
                Err(ReadError::Reject(r)) => {
                    if r.status == 421 {
                        refuse(r.message.clone());
                    }
                    reply(&mut client, &http::error_response(r.status, &r.message)).await;
                    return;
                }
            };
            let mut after_head = buf[req.len..].to_vec();
            buf.clear();
            let path = match &req.target {
                Target::Forward { path, .. } => path.clone(),
                Target::Connect { .. } => return,
            };
            let method = req.method.clone();
            let mut outcome = self.decide(&req, Ok(caller));
            let websocket = http::inner::wants_websocket(&req);
            if outcome.allowed() && websocket && !outcome.decision.websocket {
                let reason = format!(
                    "WebSocket upgrade of {method} {path} to {host}:{port} refused: the endpoint of policy {} does not say protocol: websocket",
                    outcome.decision.policy.as_deref().unwrap_or("?")
                );
                let policy = outcome.decision.policy.clone();
                outcome = Outcome::deny(reason, vec!["protocol".into()], outcome.generation);
                outcome.decision.closest_policy = policy;
            }
            if let (true, Enforcement::Ask) = (outcome.allowed(), outcome.decision.enforcement) {
                let covered = match (&approved, &outcome.decision.policy, &outcome.asked) {
                    (Some((policy, endpoint)), Some(p), Some(e)) => policy == p && endpoint == e,
                    _ => false,
                };
                if covered {
                    outcome.reason = format!("{}; approved with its connection", outcome.reason);
                    outcome.approval = base.approval.map(str::to_owned);
                } else {
                    let mut more = Vec::new();
                    self.hold(
                        &mut client,
                        &mut more,
                        sandbox,
                        caller,
                        (&host, port),
                        Some((&method, &path, req.target.query())),
                        &mut outcome,
                    )
                    .await;
                    after_head.extend_from_slice(&more);
                }
            }
            let mut used = Vec::new();
            if outcome.allowed() {
                match t.credentials.apply(&mut req, &host, port) {
                    Ok(names) => used = names,
                    Err(refusal) => {
                        refused_credential(base.sandbox, &host, port, &refusal);
                        outcome = Outcome::deny(
                            refusal.reason,
                            vec!["credential".into()],
                            outcome.generation,
                        );
                    }
                }
            }
            self.log(&Record {
                action: outcome.action,
                policy: outcome.decision.policy.as_deref(),
                reason: &outcome.reason,
                generation: outcome.generation,
                method: Some(&method),
                path: Some(&path),
                cached: outcome.cached,
                approval: outcome.approval.as_deref(),
                ..base.clone()
            });
            if !outcome.allowed() {
                let body = deny_body(&host, port, binary, &outcome.decision, &outcome.reason);
                if req.body == Body::None && !websocket {
                    if client
                        .write_all(&http::inner::json_response_keep(403, &body))
                        .await
                        .is_err()
                        || client.flush().await.is_err()
                    {
                        return;
                    }
                    buf = after_head;
                    continue;
                }
                reply(&mut client, &http::json_response(403, &body)).await;
                return;
            }
            for name in &used {
                tracing::debug!(target: "openshell::proxy", event = "credential.substituted", sandbox = base.sandbox, credential = %name, %host, port, "credential substituted");
            }
            if upstream.is_none() {
                match self.connect_tls(t, &host, addr).await {
                    Ok(up) => upstream = Some(up),
                    Err(reason) => {
                        tracing::warn!(target: "openshell::proxy", event = "egress.upstream_tls", sandbox = base.sandbox, %host, port, %reason, "upstream TLS failed");
                        reply(&mut client, &http::error_response(502, &reason)).await;
                        return;
                    }
                }
            }
            let Some(up) = upstream.as_mut() else {
                return;
            };
            let close = req.http10 || http::inner::connection_has(&req, "close");
            let relayed: Result<bool, String> = async {
                if http::inner::expects_continue(&req) && req.body != Body::None {
                    client
                        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                        .await
                        .map_err(|e| e.to_string())?;
                    client.flush().await.map_err(|e| e.to_string())?;
                }
                up.write_all(&http::inner::rewrite_inner(&req, websocket, close))
                    .await
                    .map_err(|e| format!("writing upstream: {e}"))?;
                buf = http::forward_body(&mut client, &after_head, req.body, up)
                    .await
                    .map_err(|e| e.to_string())?;
                up.flush().await.map_err(|e| e.to_string())?;
                loop {
                    let resp = http::inner::read_response_head(
                        up,
                        &mut ubuf,
                        self.config.header_limit,
                        &method,
                    )
                    .await?;
                    ubuf.drain(..resp.len);
                    if resp.status == 101 {
                        if !websocket {
                            return Err("the upstream switched protocols unasked".into());
                        }
                        client
                            .write_all(&http::inner::serialize_response_head(&resp, false))
                            .await
                            .map_err(|e| e.to_string())?;
                        client.write_all(&ubuf).await.map_err(|e| e.to_string())?;
                        up.write_all(&buf).await.map_err(|e| e.to_string())?;
                        client.flush().await.map_err(|e| e.to_string())?;
                        up.flush().await.map_err(|e| e.to_string())?;
                        let _ = tokio::io::copy_bidirectional(&mut client, up).await;
                        return Ok(true);
                    }
                    if (100..200).contains(&resp.status) {
                        client
                            .write_all(&http::inner::serialize_response_head(&resp, false))
                            .await
                            .map_err(|e| e.to_string())?;
                        continue;
                    }
                    let close_after = close || resp.close;
                    client
                        .write_all(&http::inner::serialize_response_head(&resp, close_after))
                        .await
                        .map_err(|e| e.to_string())?;
                    let body = match resp.body {
                        ResponseBody::None => None,
                        ResponseBody::Length(n) => Some(Body::Length(n)),
                        ResponseBody::Chunked => Some(Body::Chunked),
                        ResponseBody::UntilClose => {
                            client.write_all(&ubuf).await.map_err(|e| e.to_string())?;
                            ubuf.clear();
                            tokio::io::copy(up, &mut client)
                                .await
                                .map_err(|e| e.to_string())?;
                            None
                        }
                    };
                    if let Some(body) = body {
                        ubuf = http::forward_body(up, &ubuf, body, &mut client)
                            .await
                            .map_err(|e| format!("relaying the response: {e}"))?;
                    }
                    client.flush().await.map_err(|e| e.to_string())?;
                    return Ok(close_after);
                }
            }
            .await;
            match relayed {
                Ok(false) => {}
                Ok(true) => {
                    let _ = client.shutdown().await;
                    return;
                }
                Err(error) => {
                    tracing::debug!(target: "openshell::proxy", sandbox = base.sandbox, %host, %error, "terminated relay ended");
                    let _ = client.shutdown().await;
                    return;
                }
            }
        }
    }

    /// TCP to the checked address, then TLS with the upstream's name verified.
    #[cfg(feature = "terminate")]
    async fn connect_tls(
        &self,
        t: &Termination,
        host: &str,
        addr: SocketAddr,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| format!("{host} is not a TLS server name: {e}"))?;
        let connect = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
            let _ = tcp.set_nodelay(true);
            t.upstream
                .connector()
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host} ({addr}) failed: {e}"))
        };
        match tokio::time::timeout(self.config.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(format!("connecting to {host} ({addr}) timed out")),
        }
    }

    /// For an allow through an `enforcement: ask` endpoint (`outcome`): unless an
    /// `allow-always` answer covers it, ask and hold until the question is settled. While it
    /// waits the client is read, to notice it going away; what it sends meanwhile is appended
    /// to `buf` (at most [`HOLD_BUFFER`] bytes; then it is no longer read). Anything but an
    /// allow answer turns `outcome` into a deny saying why. Returns the policy and endpoint
    /// this connection is now approved for.
    #[allow(clippy::too_many_arguments)]
    async fn hold<S>(
        &self,
        stream: &mut S,
        buf: &mut Vec<u8>,
        sandbox: &SandboxContext,
        caller: &Caller,
        (host, port): (&str, u16),
        request: Option<(&str, &str, Option<&str>)>,
        outcome: &mut Outcome,
    ) -> Option<(String, Endpoint)>
    where
        S: AsyncRead + Unpin,
    {
        let what = match request {
            Some((method, path, _)) => format!("{method} {path}"),
            None => "connection".to_string(),
        };
        let binary = caller.exe.to_string_lossy().into_owned();
        let (Some(policy), Some(index), Some(endpoint)) = (
            outcome.decision.policy.clone(),
            outcome.decision.endpoint,
            outcome.asked.clone(),
        ) else {
            outcome.refuse_approval(format!(
                "{what} to {host}:{port} by {binary} needs approval, and the decision did not name its endpoint; denied"
            ));
            return None;
        };
        let question = Question {
            sandbox: sandbox.sandbox_id.clone(),
            binary: caller.exe.clone(),
            pid: caller.pid,
            ancestors: caller
                .ancestors
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
            host: host.to_string(),
            port,
            method: request.map(|(m, _, _)| m.to_string()),
            path: request.map(|(_, p, _)| p.to_string()),
            query: request.and_then(|(_, _, q)| q.map(str::to_string)),
            policy: policy.clone(),
            endpoint_index: index,
            endpoint: endpoint.clone(),
            generation: outcome.generation,
        };
        if self.decider.policy().granted(&question.grant()) {
            outcome.reason = format!(
                "{}; approved earlier for the sandbox's lifetime (allow-always)",
                outcome.reason
            );
            return Some((policy, endpoint));
        }
        let Some(approvals) = &self.approvals else {
            outcome.refuse_approval(format!(
                "{what} to {host}:{port} by {binary} needs approval (the endpoint of policy {policy} says enforcement: ask) and no approver is configured: start the supervisor with --approval-listen ADDR; denied"
            ));
            return None;
        };
        let mut ticket = match approvals.ask(question) {
            Ok(ticket) => ticket,
            Err(reason) => {
                outcome.refuse_approval(format!("{what} to {host}:{port} by {binary}: {reason}"));
                return None;
            }
        };
        let id = ticket.id().to_string();
        outcome.approval = Some(id.clone());
        let settled = tokio::select! {
            settled = ticket.wait() => Some(settled),
            () = watch_client(stream, buf) => None,
        };
        drop(ticket);
        let timeout = approvals.config().timeout.as_secs();
        match settled {
            Some(Settled::Answered(Answer::AllowOnce | Answer::AllowAlways))
                if self.decider.policy().generation() != outcome.generation =>
            {
                // The decision this connection waited with belongs to a policy that is no
                // longer in force (the update may have removed or changed the endpoint, or
                // the binary): it does not go on; a new connection is decided afresh (and an
                // allow-always grant that still holds lets it through without asking).
                outcome.refuse_approval(format!(
                    "{what} to {host}:{port} by {binary}: the policy changed (generation {} to {}) while approval {id} was pending; denied, a new connection is decided under the policy in force",
                    outcome.generation,
                    self.decider.policy().generation()
                ));
                None
            }
            Some(Settled::Answered(answer @ (Answer::AllowOnce | Answer::AllowAlways))) => {
                let how = if answer == Answer::AllowOnce {
                    "once"
                } else {
                    "for the sandbox's lifetime"
                };
                outcome.reason = format!(
                    "{}; approved {how} by the approver (approval {id})",
                    outcome.reason
                );
                Some((policy, endpoint))
            }
            Some(Settled::Answered(Answer::Deny)) => {
                outcome.refuse_approval(format!(
                    "{what} to {host}:{port} by {binary} denied by the approver (approval {id})"
                ));
                None
            }
            Some(Settled::Timeout) => {
                outcome.refuse_approval(format!(
                    "{what} to {host}:{port} by {binary}: no answer to approval {id} within {timeout} s; denied (timeout)"
                ));
                None
            }
            Some(Settled::Withdrawn) | None => {
                outcome.refuse_approval(format!(
                    "{what} to {host}:{port} by {binary}: the client went away while approval {id} was pending"
                ));
                None
            }
        }
    }

    /// The Rego step: one decision for the connection (CONNECT) or the request.
    fn decide(&self, head: &Head, caller: Result<&Caller, &IdentityError>) -> Outcome {
        let caller = match caller {
            Ok(caller) => caller,
            Err(error) => {
                let generation = self.decider.policy().generation();
                let reason = match error {
                    IdentityError::Other(reason) => reason.clone(),
                    error => identity_reason(error),
                };
                return Outcome::deny(reason, vec!["binary".into()], generation);
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
            asked,
        } = self.decider.decide(caller, &host, port, request);
        let decision = match decision {
            Ok(d) => d,
            Err(error) => {
                tracing::error!(target: "openshell::proxy", error = %error, "policy evaluation failed");
                return Outcome::deny("policy evaluation failed".into(), Vec::new(), generation);
            }
        };
        Outcome {
            reason: decision.reason.clone(),
            action: match (decision.allow, decision.enforcement) {
                (false, _) => Action::Deny,
                (true, Enforcement::Audit) => Action::Audit,
                (true, _) => Action::Allow,
            },
            decision,
            addr: None,
            status: 403,
            cached: was_cached,
            generation,
            asked,
            approval: None,
        }
    }

    /// For an allowed outcome: resolve the name once and pick the address to connect to, or
    /// turn the outcome into a deny.
    async fn resolve(&self, head: &Head, outcome: &mut Outcome) {
        let host = normalise_host(head.target.host());
        let port = head.target.port();
        let allowed: Vec<IpNet> = outcome
            .decision
            .allowed_ips
            .iter()
            .filter_map(|s| IpNet::try_from(s.as_str()).ok())
            .collect();
        match self.pick_address(&host, port, &allowed).await {
            Ok(addr) => {
                outcome.addr = Some(addr);
                outcome.status = 200;
            }
            Err((status, reason, ip)) => {
                let policy = outcome.decision.policy.clone();
                let suggestion = ip.map(|ip| {
                    format!(
                        "if {host} is meant to reach {ip}, add allowed_ips covering {ip} to its endpoint in policy {}",
                        policy.as_deref().unwrap_or("?")
                    )
                });
                let mut refused = denied(reason.clone(), Vec::new(), suggestion);
                refused.closest_policy = policy;
                outcome.reason = reason;
                outcome.decision = refused;
                outcome.action = Action::Deny;
                outcome.status = status;
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
        let own = match self.host_addresses.current().await {
            Ok(own) => own,
            Err(reason) => return Err((503, reason, None)),
        };
        let mut first_refusal = None;
        let mut reserved_hit = None;
        for addr in &addrs {
            if let Some(r) = ssrf::reserved(*addr, &self.config.reserved, &own[..]) {
                reserved_hit.get_or_insert_with(|| {
                    format!(
                        "{addr} is {} of the supervisor ({}), which no sandbox may reach",
                        r.what, r.addr
                    )
                });
                continue;
            }
            match ssrf::check_with(addr.ip(), allowed, &own[..]) {
                Ok(()) => return Ok(*addr),
                Err(reason) => {
                    if first_refusal.is_none() {
                        first_refusal = Some((reason, addr.ip()));
                    }
                }
            }
        }
        match (first_refusal, reserved_hit) {
            (Some((reason, ip)), _) => Err((403, reason, Some(ip))),
            (None, Some(reason)) => Err((403, reason, None)),
            (None, None) => Err((502, format!("{host} resolved to no address"), None)),
        }
    }
}

/// Read the client's first bytes into `first` until they are known not to be TLS or hold a
/// whole ClientHello, and check its server name: with `host`, a TLS ClientHello naming
/// exactly that host (case and a trailing dot aside) is required, within `timeout`; without,
/// a ClientHello must name no host (bytes that are not TLS pass, and there is no time limit:
/// the server may speak first). A client that closes before sending anything passes (there
/// is nothing to relay).
async fn check_hello<R: AsyncRead + Unpin>(
    client: &mut R,
    first: &mut Vec<u8>,
    host: Option<&str>,
    timeout: Duration,
) -> Result<(), String> {
    let read = async {
        let mut chunk = [0u8; 4096];
        loop {
            match tls::parse(first) {
                Hello::Incomplete => {}
                other => return Ok(Some(other)),
            }
            if first.len() >= tls::MAX_HELLO + 1024 {
                return Err("TLS ClientHello too large".to_string());
            }
            let n = client
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the client: {e}"))?;
            if n == 0 {
                if first.is_empty() {
                    return Ok(None);
                }
                return Err("the client closed inside its TLS ClientHello".to_string());
            }
            first.extend_from_slice(&chunk[..n]);
        }
    };
    let hello = match host {
        Some(_) => match tokio::time::timeout(timeout, read).await {
            Ok(hello) => hello?,
            Err(_) => return Err("no TLS ClientHello received in time".to_string()),
        },
        None => read.await?,
    };
    let Some(hello) = hello else {
        return Ok(());
    };
    match (hello, host) {
        (Hello::Whole { ech: true, .. }, _) => Err(
            "the TLS ClientHello carries an encrypted ClientHello (ECH), which hides the server name a passthrough tunnel must check".to_string(),
        ),
        (Hello::Whole { sni: Some(sni), .. }, Some(host)) => {
            if normalise_host(&sni) == host {
                Ok(())
            } else {
                Err(format!(
                    "TLS server name {sni} does not match the CONNECT host {host}"
                ))
            }
        }
        (Hello::Whole { sni: None, .. }, Some(host)) => Err(format!(
            "the TLS ClientHello names no server; a tunnel to {host} must name it (SNI)"
        )),
        (Hello::Whole { sni: Some(sni), .. }, None) => Err(format!(
            "TLS server name {sni} on a tunnel to an address: the CONNECT must name the host"
        )),
        (Hello::Whole { sni: None, .. } | Hello::NotTls, None) => Ok(()),
        (Hello::NotTls, Some(host)) => Err(format!(
            "a tunnel to {host} must start with a TLS ClientHello naming it; these bytes are not TLS"
        )),
        (Hello::Malformed(why), _) => Err(format!("malformed TLS ClientHello: {why}")),
        (Hello::Incomplete, _) => Err("incomplete TLS ClientHello".to_string()),
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

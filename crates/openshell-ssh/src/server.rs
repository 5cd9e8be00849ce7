//! The russh server: authentication, session channels, forwards and refusals.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use openshell_runtime::{
    error_chain, ExecConfig, ExitStatus, SandboxHandle, SandboxedExec, Stdio, StdioMode,
};
use russh::keys::{HashAlg, PrivateKey};
use russh::server::{
    Auth, ChannelOpenHandle, Handle, Msg, PublicKeyOffer, Session, VerifiedPublicKey,
};
use russh::{Channel, ChannelId, ChannelOpenFailure, MethodKind, MethodSet, Pty, Sig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::keys::AuthorizedKeys;

/// Everything the server needs besides the sandbox.
#[derive(Debug)]
pub struct SshOptions {
    pub host_key: PrivateKey,
    pub authorized_keys: AuthorizedKeys,
    /// Close a connection after this long without a packet in either direction.
    pub idle_timeout: Option<Duration>,
    /// Where sessions start (the workload's working directory).
    pub workdir: PathBuf,
    /// The environment every session starts from (the workload's `--env`); the client's
    /// allowlisted variables are added on top.
    pub env: BTreeMap<String, String>,
    /// The shell for `ssh host` and, with `-c`, for `ssh host COMMAND`.
    pub shell: String,
    /// The sftp server program run inside the sandbox for the `sftp` subsystem.
    pub sftp_server: String,
}

/// Errors of the server itself (not of one connection).
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("accepting ssh connections")]
    Accept(#[source] std::io::Error),
}

/// An error that ends one connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("ssh protocol")]
    Protocol(#[from] russh::Error),
}

/// The variables a client may set with `SendEnv`/`SetEnv`: the terminal and the locale.
/// Anything else (`LD_PRELOAD`, `PATH`, `BASH_ENV`, ...) is refused and logged.
pub fn env_allowed(name: &str) -> bool {
    match name {
        "TERM" | "COLORTERM" | "LANG" | "LANGUAGE" | "TZ" => true,
        _ => name.strip_prefix("LC_").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        }),
    }
}

/// Whether a `direct-tcpip` (`ssh -L`) target names the sandbox's own loopback. The connection
/// is always made to 127.0.0.1 inside the sandbox; any other name is refused, never resolved.
pub fn forward_target_allowed(host: &str) -> bool {
    host == "127.0.0.1" || host.eq_ignore_ascii_case("localhost")
}

/// The SSH server of one sandbox.
pub struct SshServer {
    config: Arc<russh::server::Config>,
    shared: Arc<Shared>,
}

struct Shared {
    options: SshOptions,
    sandbox: SandboxHandle,
}

impl SshServer {
    pub fn new(options: SshOptions, sandbox: SandboxHandle) -> SshServer {
        let config = russh::server::Config {
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            keys: vec![options.host_key.clone()],
            inactivity_timeout: options.idle_timeout,
            // OpenSSH clients open with a "none" attempt to learn the methods: answer it at
            // once; every real rejection still takes the constant auth_rejection_time.
            auth_rejection_time_initial: Some(Duration::ZERO),
            max_auth_attempts: 6,
            nodelay: true,
            ..Default::default()
        };
        SshServer {
            config: Arc::new(config),
            shared: Arc::new(Shared { options, sandbox }),
        }
    }

    /// Serve connections from `listener` until this future is dropped.
    pub async fn serve(self, listener: TcpListener) -> Result<(), SshError> {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) if is_transient(&e) => {
                    warn!(error = %e, "accepting an ssh connection; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(SshError::Accept(e)),
            };
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().unwrap_or(peer);
            let sandbox = self.shared.sandbox.id().to_owned();
            info!(event = "ssh.connection", %sandbox, %peer, "ssh connection");
            let handler = Connection {
                shared: self.shared.clone(),
                peer,
                local,
                user: String::new(),
                channels: HashMap::new(),
            };
            let config = self.config.clone();
            tokio::spawn(async move {
                let result = match russh::server::run_stream(config, stream, handler).await {
                    Ok(session) => session.await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => {
                        info!(event = "ssh.disconnected", %sandbox, %peer, "ssh connection closed")
                    }
                    Err(e) => {
                        info!(event = "ssh.disconnected", %sandbox, %peer, error = %error_chain(&e), "ssh connection ended")
                    }
                }
            });
        }
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    )
}

/// What runs on a session channel.
enum What {
    Shell,
    Exec(String),
    Sftp,
}

impl What {
    fn kind(&self) -> &'static str {
        match self {
            What::Shell => "shell",
            What::Exec(_) => "exec",
            What::Sftp => "sftp",
        }
    }
}

/// Requests for a running session's process.
enum Control {
    Signal(i32),
    Resize(u16, u16),
}

#[derive(Default)]
struct SessionChannel {
    env: BTreeMap<String, String>,
    /// `pty-req`: TERM, rows, columns.
    pty: Option<(String, u16, u16)>,
    started: bool,
    stdin: Option<StdinQueue>,
    /// Dropping it (channel or connection closed) kills the process.
    control: Option<mpsc::UnboundedSender<Control>>,
}

/// Bytes from the client on their way to a session's stdin.
///
/// russh delivers channel data on the connection's one event loop and replenishes the client's
/// window on receipt, so the only backpressure is a handler that does not return. Blocking there
/// on every full queue deadlocks a process that reads its stdin only as fast as its stdout drains
/// (`ssh host cat < big > out`): its output would need the very loop that is blocked. So the queue
/// accepts up to [`STDIN_QUEUE_MAX`] bytes without blocking, and only past that does the handler
/// wait for the process to catch up.
#[derive(Clone)]
struct StdinQueue {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    drained: Arc<tokio::sync::Notify>,
}

/// Bytes of client input a session may hold before the connection waits for it (per channel).
const STDIN_QUEUE_MAX: usize = 32 << 20;

impl StdinQueue {
    fn new() -> (StdinQueue, StdinReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let drained = Arc::new(tokio::sync::Notify::new());
        (
            StdinQueue {
                tx,
                queued: queued.clone(),
                drained: drained.clone(),
            },
            StdinReceiver {
                rx,
                queued,
                drained,
            },
        )
    }

    async fn push(&self, data: Vec<u8>) {
        use std::sync::atomic::Ordering;
        let len = data.len();
        if self.tx.send(data).is_err() {
            return;
        }
        self.queued.fetch_add(len, Ordering::AcqRel);
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.queued.load(Ordering::Acquire) <= STDIN_QUEUE_MAX || self.tx.is_closed() {
                return;
            }
            notified.await;
        }
    }
}

struct StdinReceiver {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    drained: Arc<tokio::sync::Notify>,
}

impl StdinReceiver {
    async fn recv(&mut self) -> Option<Vec<u8>> {
        self.rx.recv().await
    }

    fn written(&self, len: usize) {
        self.queued
            .fetch_sub(len, std::sync::atomic::Ordering::AcqRel);
        self.drained.notify_waiters();
    }
}

impl Drop for StdinReceiver {
    fn drop(&mut self) {
        // Whoever waits for room must not wait for a process that is gone.
        self.rx.close();
        self.drained.notify_waiters();
    }
}

/// One client connection.
struct Connection {
    shared: Arc<Shared>,
    peer: SocketAddr,
    local: SocketAddr,
    user: String,
    channels: HashMap<ChannelId, SessionChannel>,
}

impl Connection {
    fn sandbox(&self) -> &str {
        self.shared.sandbox.id()
    }

    fn refuse(&self, what: &'static str, session: &mut Session, channel: Option<ChannelId>) {
        warn!(event = "ssh.refused", sandbox = %self.sandbox(), peer = %self.peer, user = %self.user,
              request = what, "refused: not offered by this server");
        if let Some(id) = channel {
            let _ = session.channel_failure(id);
        }
    }

    async fn start(
        &mut self,
        id: ChannelId,
        what: What,
        session: &mut Session,
    ) -> Result<(), ConnectionError> {
        let Some(chan) = self.channels.get(&id) else {
            session.channel_failure(id)?;
            return Ok(());
        };
        if chan.started {
            session.channel_failure(id)?;
            return Ok(());
        }
        let options = &self.shared.options;
        let (program, args) = match &what {
            What::Shell => (options.shell.clone(), Vec::new()),
            What::Exec(cmd) => (options.shell.clone(), vec!["-c".to_owned(), cmd.clone()]),
            What::Sftp => (options.sftp_server.clone(), Vec::new()),
        };
        let mut env = options.env.clone();
        env.extend(chan.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.insert(
            "SSH_CONNECTION".to_owned(),
            format!(
                "{} {} {} {}",
                self.peer.ip(),
                self.peer.port(),
                self.local.ip(),
                self.local.port()
            ),
        );
        let stdio = match (&chan.pty, &what) {
            (Some((term, rows, cols)), What::Shell | What::Exec(_)) => {
                env.insert("TERM".to_owned(), term.clone());
                StdioMode::Pty {
                    rows: *rows,
                    cols: *cols,
                }
            }
            _ => StdioMode::Piped,
        };
        let config = ExecConfig {
            program: program.clone(),
            args,
            env,
            workdir: options.workdir.clone(),
            stdio,
        };
        let command = match &what {
            What::Exec(cmd) => cmd.as_str(),
            _ => program.as_str(),
        };
        let mut exec = match self.shared.sandbox.exec(config).await {
            Ok(e) => e,
            Err(e) => {
                warn!(event = "ssh.session", sandbox = %self.sandbox(), peer = %self.peer, user = %self.user,
                      kind = what.kind(), command, outcome = "failed", error = %error_chain(&e),
                      "could not start the session in the sandbox");
                session.channel_failure(id)?;
                return Ok(());
            }
        };
        info!(event = "ssh.session", sandbox = %self.sandbox(), peer = %self.peer, user = %self.user,
              kind = what.kind(), command, pty = matches!(stdio, StdioMode::Pty { .. }),
              outcome = "started", "ssh session started in the sandbox");
        let stdio = exec.take_stdio();
        let (in_tx, in_rx) = StdinQueue::new();
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let Some(chan) = self.channels.get_mut(&id) else {
            // The channel closed while the process started: it must not run on.
            let _ = exec.kill();
            return Ok(());
        };
        chan.started = true;
        chan.stdin = Some(in_tx);
        chan.control = Some(ctl_tx);
        session.channel_success(id)?;
        let run = RunningSession {
            handle: session.handle(),
            id,
            sandbox: self.sandbox().to_owned(),
            kind: what.kind(),
        };
        tokio::spawn(run.run(exec, stdio, in_rx, ctl_rx));
        Ok(())
    }
}

impl russh::server::Handler for Connection {
    type Error = ConnectionError;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self
            .shared
            .options
            .authorized_keys
            .contains(offer.public_key)
        {
            return Ok(Auth::Accept);
        }
        info!(event = "ssh.auth", sandbox = %self.sandbox(), peer = %self.peer, user,
              fingerprint = %offer.public_key.fingerprint(HashAlg::Sha256), decision = "deny",
              reason = "key not in authorized_keys", "ssh key refused");
        Ok(Auth::reject())
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let fingerprint = key.public_key.fingerprint(HashAlg::Sha256);
        if self.shared.options.authorized_keys.contains(key.public_key) {
            info!(event = "ssh.auth", sandbox = %self.sandbox(), peer = %self.peer, user,
                  %fingerprint, decision = "allow", "ssh key accepted");
            self.user = user.to_owned();
            Ok(Auth::Accept)
        } else {
            info!(event = "ssh.auth", sandbox = %self.sandbox(), peer = %self.peer, user,
                  %fingerprint, decision = "deny", reason = "key not in authorized_keys",
                  "ssh key refused");
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Requests and data reach this handler's callbacks; the channel object is not needed.
        let id = channel.id();
        drop(channel);
        self.channels.insert(id, SessionChannel::default());
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let port = u16::try_from(port_to_connect).ok().filter(|p| *p != 0);
        let port = match (forward_target_allowed(host_to_connect), port) {
            (true, Some(port)) => port,
            (allowed, _) => {
                let reason = if allowed {
                    "port out of range"
                } else {
                    "only the sandbox's loopback (127.0.0.1, localhost) can be forwarded to"
                };
                warn!(event = "ssh.forward", sandbox = %self.sandbox(), peer = %self.peer, user = %self.user,
                      host = host_to_connect, port = port_to_connect, decision = "deny", reason,
                      "forward refused");
                reply
                    .reject(ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                return Ok(());
            }
        };
        match self.shared.sandbox.connect_tcp(port).await {
            Ok(conn) => {
                info!(event = "ssh.forward", sandbox = %self.sandbox(), peer = %self.peer, user = %self.user,
                      host = host_to_connect, port, decision = "allow", "forward connected inside the sandbox");
                // The bytes go through this handler's callbacks and the same input queue as a
                // session's stdin (see StdinQueue), never by blocking the connection's loop.
                let id = channel.id();
                drop(channel);
                let (input, input_rx) = StdinQueue::new();
                let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
                self.channels.insert(
                    id,
                    SessionChannel {
                        started: true,
                        stdin: Some(input),
                        control: Some(ctl_tx),
                        ..SessionChannel::default()
                    },
                );
                reply.accept().await;
                tokio::spawn(run_forward(session.handle(), id, conn, input_rx, ctl_rx));
            }
            Err(e) => {
                info!(event = "ssh.forward", sandbox = %self.sandbox(), peer = %self.peer, user = %self.user,
                      host = host_to_connect, port, decision = "allow", outcome = "connect_failed",
                      error = %error_chain(&e), "forward allowed but nothing answered inside the sandbox");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse("x11 channel", session, None);
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse("direct-streamlocal forward", session, None);
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the control sender kills a process that still runs.
        self.channels.remove(&channel);
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(chan) = self.channels.get_mut(&channel) {
            chan.stdin = None;
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let stdin = self.channels.get(&channel).and_then(|c| c.stdin.clone());
        if let Some(queue) = stdin {
            queue.push(data.to_vec()).await;
        }
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(chan) if !chan.started && !term.contains('\0') => {
                chan.pty = Some((term.to_owned(), clamp(row_height, 24), clamp(col_width, 80)));
                session.channel_success(channel)?;
            }
            _ => session.channel_failure(channel)?,
        }
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = env_allowed(variable_name) && !variable_value.contains('\0');
        match self.channels.get_mut(&channel) {
            Some(chan) if ok && !chan.started => {
                chan.env
                    .insert(variable_name.to_owned(), variable_value.to_owned());
                session.channel_success(channel)?;
            }
            _ => {
                info!(event = "ssh.env_refused", sandbox = %self.sandbox(), peer = %self.peer,
                      user = %self.user, name = variable_name, "environment variable not in the allowlist");
                session.channel_failure(channel)?;
            }
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, What::Shell, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match std::str::from_utf8(data) {
            Ok(cmd) if !cmd.contains('\0') => {
                self.start(channel, What::Exec(cmd.to_owned()), session)
                    .await
            }
            _ => {
                warn!(event = "ssh.session", sandbox = %self.sandbox(), peer = %self.peer,
                      outcome = "refused", reason = "command is not UTF-8 or contains NUL",
                      "exec request refused");
                session.channel_failure(channel)?;
                Ok(())
            }
        }
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            return self.start(channel, What::Sftp, session).await;
        }
        warn!(event = "ssh.refused", sandbox = %self.sandbox(), peer = %self.peer, user = %self.user,
              request = "subsystem", name, "unknown subsystem refused");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(chan) = self.channels.get_mut(&channel) {
            let (rows, cols) = (clamp(row_height, 24), clamp(col_width, 80));
            if let Some((_, r, c)) = chan.pty.as_mut() {
                (*r, *c) = (rows, cols);
            }
            if let Some(ctl) = &chan.control {
                let _ = ctl.send(Control::Resize(rows, cols));
            }
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(number) = signal_number(&signal) else {
            debug!(?signal, "ignoring an unknown signal name");
            return Ok(());
        };
        if let Some(ctl) = self.channels.get(&channel).and_then(|c| c.control.as_ref()) {
            info!(event = "ssh.signal", sandbox = %self.sandbox(), peer = %self.peer, signal = number,
                  "signal from the client delivered to the session");
            let _ = ctl.send(Control::Signal(number));
        }
        Ok(())
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.refuse("x11 forwarding", session, Some(channel));
        Ok(())
    }

    async fn agent_request(
        &mut self,
        _channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refuse("agent forwarding", session, None);
        Ok(false)
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        warn!(event = "ssh.forward", sandbox = %self.sandbox(), peer = %self.peer, user = %self.user,
              direction = "remote", host = address, port = *port, decision = "deny",
              reason = "remote forwarding (-R) is not offered", "forward refused");
        Ok(false)
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        warn!(event = "ssh.forward", sandbox = %self.sandbox(), peer = %self.peer, user = %self.user,
              direction = "remote", socket = socket_path, decision = "deny",
              reason = "remote forwarding is not offered", "forward refused");
        Ok(false)
    }
}

fn clamp(v: u32, default: u16) -> u16 {
    match u16::try_from(v) {
        Ok(0) => default,
        Ok(v) => v,
        Err(_) => u16::MAX,
    }
}

/// The signal number for an SSH signal name (RFC 4254 names, without `SIG`).
fn signal_number(sig: &Sig) -> Option<i32> {
    let name = match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name.as_str(),
    };
    nix::sys::signal::Signal::from_str(&format!("SIG{name}"))
        .ok()
        .map(|s| s as i32)
}

/// The SSH name of signal `n`.
fn signal_name(n: i32) -> Sig {
    let name = nix::sys::signal::Signal::try_from(n)
        .map(|s| s.as_str().trim_start_matches("SIG").to_owned())
        .unwrap_or_else(|_| format!("{n}"));
    match name.as_str() {
        "ABRT" => Sig::ABRT,
        "ALRM" => Sig::ALRM,
        "FPE" => Sig::FPE,
        "HUP" => Sig::HUP,
        "ILL" => Sig::ILL,
        "INT" => Sig::INT,
        "KILL" => Sig::KILL,
        "PIPE" => Sig::PIPE,
        "QUIT" => Sig::QUIT,
        "SEGV" => Sig::SEGV,
        "TERM" => Sig::TERM,
        "USR1" => Sig::USR1,
        _ => Sig::Custom(name),
    }
}

/// A process started for a session channel, from start to exit-status.
struct RunningSession {
    handle: Handle,
    id: ChannelId,
    sandbox: String,
    kind: &'static str,
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

fn terminal_halves(fd: OwnedFd) -> std::io::Result<(tokio::fs::File, tokio::fs::File)> {
    let reader = std::fs::File::from(fd.try_clone()?);
    let writer = std::fs::File::from(fd);
    Ok((
        tokio::fs::File::from_std(reader),
        tokio::fs::File::from_std(writer),
    ))
}

impl RunningSession {
    async fn run(
        self,
        mut exec: SandboxedExec,
        stdio: Stdio,
        mut stdin_rx: StdinReceiver,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut outputs = Vec::new();
        let mut input: Option<Writer> = None;
        if let Some(fd) = stdio.pty {
            match terminal_halves(fd) {
                Ok((reader, writer)) => {
                    outputs.push(tokio::spawn(pump(
                        reader,
                        self.handle.clone(),
                        self.id,
                        None,
                    )));
                    input = Some(Box::new(writer));
                }
                Err(e) => {
                    warn!(sandbox = %self.sandbox, error = %e, "duplicating the session's terminal");
                    let _ = exec.kill();
                }
            }
        } else {
            if let Some(out) = stdio.stdout {
                outputs.push(tokio::spawn(pump(out, self.handle.clone(), self.id, None)));
            }
            if let Some(err) = stdio.stderr {
                outputs.push(tokio::spawn(pump(
                    err,
                    self.handle.clone(),
                    self.id,
                    Some(1),
                )));
            }
            input = stdio.stdin;
        }
        let input_task = tokio::spawn(async move {
            let Some(mut w) = input else { return };
            while let Some(chunk) = stdin_rx.recv().await {
                if w.write_all(&chunk).await.is_err() || w.flush().await.is_err() {
                    return;
                }
                stdin_rx.written(chunk.len());
            }
            // The client sent EOF: close the process's stdin.
            let _ = w.shutdown().await;
        });
        let mut control_open = true;
        let status = loop {
            tokio::select! {
                status = exec.wait() => break status,
                c = control.recv(), if control_open => match c {
                    Some(Control::Signal(n)) => {
                        if let Err(e) = exec.signal(n) {
                            debug!(error = %e, signal = n, "signal to a session process");
                        }
                    }
                    Some(Control::Resize(rows, cols)) => {
                        if let Err(e) = exec.resize(rows, cols) {
                            debug!(error = %e, "resizing a session terminal");
                        }
                    }
                    None => {
                        // The channel or the connection is gone: nothing may outlive it.
                        control_open = false;
                        let _ = exec.kill();
                    }
                },
            }
        };
        // Everything the process wrote reaches the client before its exit status (as with
        // OpenSSH, a background process that keeps the stream open keeps the channel open).
        for t in outputs {
            let _ = t.await;
        }
        input_task.abort();
        let h = &self.handle;
        match status {
            Ok(ExitStatus::Code(code)) => {
                let _ = h.exit_status_request(self.id, code as u32).await;
            }
            Ok(ExitStatus::Signaled(n)) => {
                let _ = h
                    .exit_signal_request(
                        self.id,
                        signal_name(n),
                        false,
                        String::new(),
                        String::new(),
                    )
                    .await;
            }
            Err(ref e) => {
                warn!(sandbox = %self.sandbox, error = %error_chain(e), "waiting for a session process");
            }
        }
        let _ = h.eof(self.id).await;
        let _ = h.close(self.id).await;
        let status = status
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "unknown".to_owned());
        info!(event = "ssh.session_ended", sandbox = %self.sandbox, kind = self.kind, %status,
              "ssh session ended");
    }
}

/// Relay one `direct-tcpip` channel and its connection inside the sandbox until either side
/// ends. The client's EOF half-closes the connection; the sandbox side's EOF closes the channel.
async fn run_forward(
    handle: Handle,
    id: ChannelId,
    conn: Box<dyn openshell_runtime::Connection>,
    mut input: StdinReceiver,
    mut control: mpsc::UnboundedReceiver<Control>,
) {
    let (rd, mut wr) = tokio::io::split(conn);
    let to_sandbox = async {
        while let Some(chunk) = input.recv().await {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
            input.written(chunk.len());
        }
        let _ = wr.shutdown().await;
        std::future::pending::<()>().await
    };
    // The control sender is dropped when the channel or the connection closes.
    let closed = async { while control.recv().await.is_some() {} };
    tokio::select! {
        () = pump(rd, handle.clone(), id, None) => {}
        () = to_sandbox => {}
        () = closed => {}
    }
    let _ = handle.eof(id).await;
    let _ = handle.close(id).await;
}

/// Copy a process's output to the channel (`ext`: 1 for stderr) until end of file.
async fn pump(mut from: impl AsyncRead + Unpin, handle: Handle, id: ChannelId, ext: Option<u32>) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let data = Bytes::copy_from_slice(&buf[..n]);
        let sent = match ext {
            None => handle.data(id, data).await.is_ok(),
            Some(code) => handle.extended_data(id, code, data).await.is_ok(),
        };
        if !sent {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_allowlist() {
        for ok in [
            "TERM",
            "LANG",
            "LC_ALL",
            "LC_CTYPE",
            "COLORTERM",
            "LANGUAGE",
            "TZ",
        ] {
            assert!(env_allowed(ok), "{ok}");
        }
        for bad in [
            "PATH",
            "LD_PRELOAD",
            "BASH_ENV",
            "LC_",
            "LC_all",
            "HOME",
            "SHELL",
            "",
        ] {
            assert!(!env_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn forward_targets_are_the_sandbox_loopback_only() {
        for ok in ["127.0.0.1", "localhost", "LOCALHOST"] {
            assert!(forward_target_allowed(ok), "{ok}");
        }
        for bad in [
            "10.200.0.1",
            "127.0.0.2",
            "0.0.0.0",
            "::1",
            "169.254.169.254",
            "example.com",
            "localhost.",
            "",
        ] {
            assert!(!forward_target_allowed(bad), "{bad}");
        }
    }

    #[test]
    fn signal_names_round_trip() {
        for n in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGKILL,
            libc::SIGUSR2,
            libc::SIGHUP,
        ] {
            assert_eq!(signal_number(&signal_name(n)), Some(n));
        }
        assert_eq!(signal_number(&Sig::Custom("NOPE".into())), None);
    }
}

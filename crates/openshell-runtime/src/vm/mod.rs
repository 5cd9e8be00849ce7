//! The vm backend (Cargo feature `vm`): the workload runs in a microVM with our guest kernel and
//! guest agent, and every host↔guest byte travels over vsock. The guest has no network device.
//!
//! Per sandbox, under the guest directory's `run/<id>/`:
//! - `root/`: the guest's root directory (mount points for every share, the agent);
//! - qemu engine: one virtiofsd serving `root/` with the policy's directories bind-mounted at
//!   the same paths as on the host, read-only where the policy says, all inside that daemon's
//!   own mount namespace (`fs_server.rs`); the krun engine gets one virtio-fs device per share;
//! - vhost-device-vsock with `vsock.sock` (host dials the agent) and `vsock.sock_3128` (the
//!   guest's egress, served by the proxy; bound before boot);
//! - QEMU (`qemu.rs`) or, with feature `krun` on hosts whose KVM runs standard guests, one
//!   jailed libkrun shim (`krun.rs`) instead of QEMU and both daemons;
//! - the guest agent inside, which applies the same privilege drop, Landlock and seccomp as the
//!   process backend.

pub mod engine;
pub(crate) mod fs_server;
pub mod guest;
pub mod jail;
#[cfg(feature = "krun")]
pub mod krun;
#[cfg(feature = "krun")]
mod krun_sys;
pub mod qemu;
pub(crate) mod qmp;
pub(crate) mod template;
pub(crate) mod vmm_syscalls;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::process::protocol::{FsBind, GuestTree, LaunchPlan, WaitReport};
use crate::process::{log_restrictions, setup_error, Identity, ProcessError};
use crate::vm_protocol::{self as proto, Event, Frame, GuestMount, GuestStdio, Kind, Request};
use crate::{ExecConfig, ExitStatus, SpawnConfig, Stdio, StdioMode};
use engine::{Engine, EngineChoice, Share, VmDescription};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    #[cfg(feature = "krun")]
    #[error(transparent)]
    Krun(#[from] krun::KrunError),
    #[error(transparent)]
    Artifact(#[from] guest::MissingArtifact),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("filesystem_policy: {path}: {reason} (compatibility: hard_requirement)")]
    Share { path: String, reason: String },
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {what}: {message}")]
    Helper { what: &'static str, message: String },
    #[error("the guest agent did not answer within {0:?}; console: {1}")]
    AgentTimeout(Duration, String),
    #[error("the guest agent closed the connection")]
    AgentLost,
    #[error("talking to the guest agent")]
    Frame(#[source] proto::FrameError),
    #[error("attaching the egress proxy")]
    Egress(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the process has already exited")]
    NotRunning,
    #[error(transparent)]
    RootFs(#[from] crate::rootfs::RootFsError),
    #[error("the process has no terminal to resize")]
    NoTerminal,
    #[error("connecting to 127.0.0.1:{port} inside the guest: {reason}")]
    Forward { port: u16, reason: String },
    #[error(transparent)]
    Template(#[from] template::TemplateError),
    #[error("the VMM's system user {user}: {reason}")]
    VmmUser { user: &'static str, reason: String },
}

fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let op = op.into();
    move |source| VmError::Io { op, source }
}

/// The VM's memory when the policy says `memory_mib: unlimited` (the guest's RAM is then the
/// workload's only bound; no `memory.max` is set).
const UNLIMITED_MEMORY_VM_MIB: u64 = 512;
/// The least memory a guest boots with.
const MIN_VM_MIB: u64 = 128;
/// The most vCPUs a VM gets (libkrun takes a `u8`).
const MAX_VCPUS: u32 = 255;

/// vCPUs and memory (MiB) of a sandbox's VM: `ceil(cpus)` vCPUs (the host's CPUs when
/// unlimited), `memory_mib` of RAM (at least [`MIN_VM_MIB`]; [`UNLIMITED_MEMORY_VM_MIB`] when
/// unlimited).
fn vm_size(r: &crate::EffectiveResources) -> (u32, u64) {
    let vcpus = match r.cpus.max() {
        // cpus is validated finite, > 0 and <= 1024.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Some(c) => (c.ceil().max(1.0) as u32).min(MAX_VCPUS),
        None => std::thread::available_parallelism()
            .map_or(1, |n| u32::try_from(n.get()).unwrap_or(MAX_VCPUS))
            .min(MAX_VCPUS),
    };
    let memory_mib = r
        .memory_mib
        .max()
        .unwrap_or(UNLIMITED_MEMORY_VM_MIB)
        .max(MIN_VM_MIB);
    (vcpus, memory_mib)
}

/// Policy paths left out of the VM, with the reason.
type Skipped = Vec<(String, String)>;

/// A session's plumbing: the guest's stdio mode, where stdout and stderr go, where stdin comes
/// from, and what the caller gets.
type Plumbing = (
    GuestStdio,
    Option<Sink>,
    Option<Sink>,
    Option<crate::OutputStream>,
    Stdio,
);

/// The shares for a policy: the host paths of its view (read_only, read_write, the workdir with
/// `include_workdir`; see `process::view`), each at the same path in the guest. The guest's own
/// /proc, /dev and private /tmp are not shares. Each path is opened once here without following
/// a link in any component, as the file-tree helper opens it again: a missing path, or one with
/// a link on the way, is skipped (best_effort) or refused (hard_requirement). The qemu engine's
/// single tree takes directories, files and links (recreated in the tree); the krun engine
/// shares directories only (one virtio-fs device each).
fn shares_for(
    identity: &Identity,
    policy: &openshell_policy::Policy,
    engine: Engine,
) -> Result<(Vec<Share>, Skipped), VmError> {
    use crate::process::view;
    use nix::sys::stat::SFlag;
    let plan = identity.view(policy, None);
    let mut shares: Vec<Share> = Vec::new();
    let mut skipped = Vec::new();
    let mut refuse = |path: String, reason: String| -> Result<(), VmError> {
        match plan.hard_requirement {
            true => Err(VmError::Share { path, reason }),
            false => {
                skipped.push((path, reason));
                Ok(())
            }
        }
    };
    if plan.host_root {
        refuse(
            "/".into(),
            "the host's root directory cannot be shared into a VM; list its directories".into(),
        )?;
    }
    for bind in &plan.binds {
        let text = bind.path.display().to_string();
        let kind = match view::open_host(&bind.path).and_then(|fd| nix::sys::stat::fstat(&fd)) {
            Ok(st) => SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT,
            Err(nix::Error::ENOENT) => {
                refuse(text, "does not exist".into())?;
                continue;
            }
            Err(nix::Error::ELOOP) => {
                refuse(
                    text,
                    "a directory on the way is a symbolic link; list the path it leads to".into(),
                )?;
                continue;
            }
            Err(e) => {
                refuse(text, std::io::Error::from(e).to_string())?;
                continue;
            }
        };
        if kind == SFlag::S_IFSOCK {
            // A host socket is connectable only on the host: a VM's virtio-fs shows the file,
            // but nothing in the guest is bound to it.
            refuse(text, "a host socket cannot be reached from a VM".into())?;
            continue;
        }
        if engine == Engine::Krun && kind != SFlag::S_IFDIR {
            // Merged-usr links (/bin -> usr/bin) exist in the krun guest's root too.
            if kind != SFlag::S_IFLNK {
                refuse(text, "the krun engine shares directories only".into())?;
            }
            continue;
        }
        shares.push(Share {
            tag: format!("s{}", shares.len()),
            guest_path: text,
            host_path: bind.path.clone(),
            readonly: !bind.writable,
        });
    }
    Ok((shares, skipped))
}

/// The guest's private /tmp (`filesystem_policy.tmp: private`): a tmpfs the agent mounts, with
/// the shares that lie below /tmp bound back inside it.
fn guest_tmp(
    identity: &Identity,
    policy: &openshell_policy::Policy,
    memory_mib: Option<u64>,
    shares: &[Share],
) -> Option<proto::GuestTmp> {
    match identity.view(policy, memory_mib).tmp {
        crate::process::view::TmpPlan::Host => None,
        crate::process::view::TmpPlan::Private { size_mib, readonly } => Some(proto::GuestTmp {
            size_mib,
            readonly,
            keep: shares
                .iter()
                .filter(|s| Path::new(&s.guest_path).starts_with("/tmp") && s.guest_path != "/tmp")
                .map(|s| GuestMount {
                    tag: s.tag.clone(),
                    path: s.guest_path.clone(),
                    readonly: s.readonly,
                })
                .collect(),
        }),
    }
}

/// Build the per-sandbox guest root: the cached rootfs's layout, the agent, and a mount point
/// for every share.
fn build_root(cached: &Path, root: &Path, shares: &[Share]) -> Result<(), VmError> {
    copy_tree(cached, root).map_err(io(format!("copying the guest root to {}", root.display())))?;
    for share in shares {
        let target = root.join(share.guest_path.trim_start_matches('/'));
        // Never follow a symlink of the root out of it.
        if target
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            continue;
        }
        std::fs::create_dir_all(&target)
            .map_err(io(format!("creating mount point {}", target.display())))?;
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let src = e.path();
        let dst = to.join(e.file_name());
        let ft = e.file_type()?;
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if ft.is_dir() {
            copy_tree(&src, &dst)?;
        } else if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst)?;
        }
    }
    Ok(())
}

/// Where the host dials the guest agent's control port.
#[derive(Debug, Clone)]
struct AgentAddr {
    uds: PathBuf,
    /// vhost-device-vsock (qemu engine) wants `CONNECT <port>`; libkrun's listening socket
    /// (krun engine) is the port itself.
    connect_line: bool,
    /// The uid the socket's listener must have (the jailed vsock daemon's): the socket sits in
    /// a directory the VMM user can write, so a connection to anything else is refused.
    peer_uid: Option<u32>,
}

/// Dial the agent's control port: through vhost-device-vsock (`CONNECT <port>` → `OK <n>`),
/// or straight into libkrun's socket for AGENT_PORT.
async fn dial_agent(agent: &AgentAddr) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(&agent.uds).await?;
    if let Some(uid) = agent.peer_uid {
        let peer = stream.peer_cred()?;
        if peer.uid() != uid {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not the VMM's socket (uid {})",
                    agent.uds.display(),
                    peer.uid()
                ),
            ));
        }
    }
    if !agent.connect_line {
        return Ok(stream);
    }
    stream
        .write_all(format!("CONNECT {}\n", proto::AGENT_PORT).as_bytes())
        .await?;
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > 64 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
    if line.starts_with(b"OK") {
        Ok(stream)
    } else {
        Err(std::io::ErrorKind::ConnectionRefused.into())
    }
}

/// How the workload's `Setup` and `Spawn` reach the agent.
enum MainStart {
    /// In the guest's tree before boot (qemu engine): the stdio plumbing and the encoded
    /// requests.
    InTree(Plumbing, Vec<u8>),
    /// Sent on the boot connection once the agent dials (krun engine).
    OnConnection(Box<(LaunchPlan, Request)>),
}

/// A process in the guest, as seen from the host.
struct Session {
    to_agent: mpsc::UnboundedSender<Frame>,
    exited: watch::Receiver<Option<WaitReport>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

type Sink = Box<dyn AsyncWrite + Send + Unpin>;

/// Where a session's output goes and where its input comes from, plus what the caller gets.
fn stdio_plumbing(mode: StdioMode) -> Result<Plumbing, VmError> {
    let pipe = || -> Result<(tokio::net::unix::pipe::Sender, tokio::net::unix::pipe::Receiver), VmError> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| VmError::Io {
                op: "creating a pipe".into(),
                source: e.into(),
            })?;
        let tx = tokio::net::unix::pipe::Sender::from_owned_fd(w).map_err(io("registering a pipe"))?;
        let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(r).map_err(io("registering a pipe"))?;
        Ok((tx, rx))
    };
    Ok(match mode {
        StdioMode::Null => (GuestStdio::Null, None, None, None, Stdio::default()),
        StdioMode::Piped => {
            let (in_tx, in_rx) = pipe()?;
            let (out_tx, out_rx) = pipe()?;
            let (err_tx, err_rx) = pipe()?;
            (
                GuestStdio::Piped,
                Some(Box::new(out_tx)),
                Some(Box::new(err_tx)),
                Some(Box::new(in_rx)),
                Stdio {
                    stdin: Some(Box::new(in_tx)),
                    stdout: Some(Box::new(out_rx)),
                    stderr: Some(Box::new(err_rx)),
                    pty: None,
                },
            )
        }
        StdioMode::Pty { rows, cols } => {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair()
                .map_err(io("creating the terminal bridge"))?;
            ours.set_nonblocking(true)
                .map_err(io("configuring the terminal bridge"))?;
            let ours = UnixStream::from_std(ours).map_err(io("registering the terminal bridge"))?;
            let (r, w) = ours.into_split();
            (
                GuestStdio::Pty { rows, cols },
                Some(Box::new(w)),
                None,
                Some(Box::new(r)),
                Stdio {
                    pty: Some(OwnedFd::from(theirs)),
                    ..Stdio::default()
                },
            )
        }
    })
}

/// Start one process in the guest over a fresh control connection.
async fn start_session(
    agent: &AgentAddr,
    sandbox: &str,
    launch: LaunchPlan,
    mode: StdioMode,
    main: bool,
) -> Result<(Session, Stdio), VmError> {
    let stream = tokio::time::timeout(Duration::from_secs(10), dial_agent(agent))
        .await
        .map_err(|_| {
            VmError::AgentTimeout(Duration::from_secs(10), "no answer to a new session".into())
        })?
        .map_err(io("connecting to the guest agent"))?;
    open_session(stream, sandbox, launch, mode, main, None).await
}

/// Start one process on a connected control `stream`, after `setup` when given: both requests
/// go out at once, and the agent reads the `Spawn` only if the setup succeeded.
async fn open_session(
    stream: UnixStream,
    sandbox: &str,
    launch: LaunchPlan,
    mode: StdioMode,
    main: bool,
    setup: Option<Request>,
) -> Result<(Session, Stdio), VmError> {
    let plumbing = stdio_plumbing(mode)?;
    let spawn = Request::Spawn {
        launch,
        stdio: plumbing.0,
        main,
    };
    let requests = match &setup {
        Some(setup) => proto::encode_boot_requests(setup, &spawn),
        None => Frame::json(&spawn).encode(),
    };
    run_session(stream, sandbox, plumbing, Some(requests), setup.is_some()).await
}

/// The session on a connected control `stream`: send `requests` (already encoded frames; `None`
/// when the agent had them before it dialled, see `vm_protocol::BOOT_REQUESTS`), expect `Ready`
/// first when they include a `Setup`, then the process's events.
async fn run_session(
    stream: UnixStream,
    sandbox: &str,
    plumbing: Plumbing,
    requests: Option<Vec<u8>>,
    with_setup: bool,
) -> Result<(Session, Stdio), VmError> {
    let (guest_stdio, stdout, stderr, stdin, caller_stdio) = plumbing;
    let (mut reader, mut writer) = stream.into_split();
    if let Some(requests) = requests {
        writer
            .write_all(&requests)
            .await
            .map_err(|e| VmError::Frame(proto::FrameError::Io(e)))?;
    }
    if with_setup {
        match proto::read_frame_async(&mut reader)
            .await
            .map_err(VmError::Frame)?
        {
            Some(f) if f.kind == Kind::Json => {
                match f.decode_json::<Event>().map_err(VmError::Frame)? {
                    Event::Ready => {}
                    Event::Failed {
                        stage,
                        message,
                        kind,
                    } => return Err(VmError::Process(setup_error(stage, message, kind))),
                    other => {
                        return Err(VmError::Helper {
                            what: "guest agent",
                            message: format!("unexpected answer to setup: {other:?}"),
                        })
                    }
                }
            }
            _ => return Err(VmError::AgentLost),
        }
    }
    loop {
        let frame = proto::read_frame_async(&mut reader)
            .await
            .map_err(VmError::Frame)?
            .ok_or(VmError::AgentLost)?;
        if frame.kind != Kind::Json {
            continue;
        }
        match frame.decode_json::<Event>().map_err(VmError::Frame)? {
            Event::Restricted(report) => log_restrictions(sandbox, &report),
            Event::Running { pid } => {
                debug!(sandbox, pid, "guest process running");
                break;
            }
            Event::Failed {
                stage,
                message,
                kind,
            } => return Err(VmError::Process(setup_error(stage, message, kind))),
            other => debug!(?other, "unexpected event while starting"),
        }
    }

    let (to_agent, mut outbox) = mpsc::unbounded_channel::<Frame>();
    let (exit_tx, exited) = watch::channel(None);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(async move {
        while let Some(frame) = outbox.recv().await {
            if proto::write_frame_async(&mut writer, &frame).await.is_err() {
                break;
            }
        }
    }));
    if let Some(mut input) = stdin {
        let to_agent = to_agent.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 16384];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let frame = Frame {
                            kind: Kind::Stdin,
                            payload: buf[..n].to_vec(),
                        };
                        if to_agent.send(frame).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = to_agent.send(Frame::empty(Kind::StdinEof));
        }));
    } else if guest_stdio == GuestStdio::Piped {
        let _ = to_agent.send(Frame::empty(Kind::StdinEof));
    }
    // When the caller closes its end of an output stream, the process hears of it as it would
    // on the process backend: SIGPIPE for a pipe, SIGHUP for a terminal (a hangup). Without
    // that, a workload writing into a closed `| head` would run forever, its output relayed
    // and dropped.
    let closed_signal = match guest_stdio {
        GuestStdio::Pty { .. } => libc::SIGHUP,
        _ => libc::SIGPIPE,
    };
    let signals = to_agent.clone();
    tasks.push(tokio::spawn(async move {
        let mut stdout = stdout;
        let mut stderr = stderr;
        let mut report = None;
        let mut told = false;
        while let Ok(Some(frame)) = proto::read_frame_async(&mut reader).await {
            let delivered = match frame.kind {
                Kind::Stdout => deliver(&mut stdout, &frame.payload).await,
                Kind::Stderr => deliver(&mut stderr, &frame.payload).await,
                _ => true,
            };
            if !delivered && !told {
                told = true;
                let signal = Request::Signal {
                    signal: closed_signal,
                };
                let _ = signals.send(Frame::json(&signal));
            }
            match frame.kind {
                Kind::StdoutEof => {
                    if let Some(mut s) = stdout.take() {
                        let _ = s.shutdown().await;
                    }
                }
                Kind::StderrEof => {
                    if let Some(mut s) = stderr.take() {
                        let _ = s.shutdown().await;
                    }
                }
                Kind::Json => {
                    if let Ok(Event::Exited(r)) = frame.decode_json::<Event>() {
                        report = Some(r);
                        break;
                    }
                }
                _ => {}
            }
        }
        drop(stdout);
        drop(stderr);
        let _ = exit_tx.send(Some(report.unwrap_or(WaitReport::Signal(libc::SIGKILL))));
    }));
    Ok((
        Session {
            to_agent,
            exited,
            tasks,
        },
        caller_stdio,
    ))
}

/// Write one frame's payload to `sink` (nothing when there is none); `false` when the caller
/// has closed its end, after which the sink is dropped.
async fn deliver(sink: &mut Option<Sink>, payload: &[u8]) -> bool {
    let Some(s) = sink.as_mut() else {
        return true;
    };
    let written = match s.write_all(payload).await {
        Ok(()) => s.flush().await,
        Err(e) => Err(e),
    };
    if written.is_err() {
        *sink = None;
        return false;
    }
    true
}

impl Session {
    async fn wait(&mut self) -> WaitReport {
        loop {
            if let Some(r) = *self.exited.borrow() {
                return r;
            }
            if self.exited.changed().await.is_err() {
                return self
                    .exited
                    .borrow()
                    .unwrap_or(WaitReport::Signal(libc::SIGKILL));
            }
        }
    }

    fn signal(&self, signal: i32) -> Result<(), VmError> {
        if self.exited.borrow().is_some() {
            return Err(VmError::NotRunning);
        }
        self.to_agent
            .send(Frame::json(&Request::Signal { signal }))
            .map_err(|_| VmError::NotRunning)
    }
}

fn status_of(r: WaitReport) -> ExitStatus {
    match r {
        WaitReport::Code(c) => ExitStatus::Code(c),
        WaitReport::Signal(s) => ExitStatus::Signaled(s),
    }
}

/// The process that runs the VM: QEMU, or the krun shim.
#[derive(Debug)]
enum Vmm {
    Qemu(Child),
    #[cfg(feature = "krun")]
    Krun(Box<krun::KrunShim>),
}

impl Vmm {
    async fn wait(&mut self) {
        match self {
            Vmm::Qemu(child) => drop(child.wait().await),
            #[cfg(feature = "krun")]
            Vmm::Krun(shim) => drop(shim.wait().await),
        }
    }

    /// The exit status, once it has ended.
    fn try_exited(&mut self) -> Option<std::process::ExitStatus> {
        match self {
            Vmm::Qemu(child) => child.try_wait().ok().flatten(),
            #[cfg(feature = "krun")]
            Vmm::Krun(shim) => shim.try_wait(),
        }
    }

    fn start_kill(&mut self) {
        match self {
            Vmm::Qemu(child) => drop(child.start_kill()),
            #[cfg(feature = "krun")]
            Vmm::Krun(shim) => shim.kill(),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Vmm::Qemu(child) => child.id(),
            #[cfg(feature = "krun")]
            Vmm::Krun(shim) => Some(shim.pid()),
        }
    }
}

/// A workload running in a microVM.
#[derive(Debug)]
pub struct VmSandbox {
    id: String,
    box_dir: PathBuf,
    agent: AgentAddr,
    vmm: Vmm,
    helpers: Vec<Child>,
    main: Session,
    stdio: Stdio,
    /// Whether the workload runs on a PTY (it can be resized).
    pty: bool,
    identity: Identity,
    _egress: Option<crate::EgressGuard>,
    status: Option<ExitStatus>,
}

/// A directory removed when the guard is dropped, unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl VmSandbox {
    pub async fn spawn(config: SpawnConfig, choice: EngineChoice) -> Result<VmSandbox, VmError> {
        let decision = engine::decide(choice, engine::kvm_support())?;
        let artifacts = guest::Artifacts::locate()?;
        // With a root filesystem the workdir is a path inside the tree; the agent's chdir
        // checks it.
        let on_host = config.root.is_none();
        if !config.workdir.is_absolute() || (on_host && !config.workdir.is_dir()) {
            return Err(ProcessError::BadWorkdir(config.workdir.clone()).into());
        }
        if let Some(root) = &config.root {
            crate::rootfs::validate_lower(&root.lower)?;
        }
        // No connect mediation in the guest: no host socket is reachable from a VM.
        let (identity, launch) = Identity::for_workload(&config, proto::GUEST_PROXY_ADDR, false)?;
        let id = crate::process::new_sandbox_id();
        let run = guest::guest_dir().join("run");
        // Boxes of supervisors killed with SIGKILL (they cannot clean up their own).
        crate::process::rootfs::collect_stale(&run);
        let box_dir = run.join(&id);
        std::fs::create_dir_all(&box_dir).map_err(io(format!("creating {}", box_dir.display())))?;
        // Removed on an error and when this future is dropped mid-start (a stop during the
        // boot); kept once the box belongs to a running sandbox.
        let guard = RemoveOnDrop(Some(box_dir.clone()));
        let vm = Self::boot(&id, &box_dir, config, identity, launch, artifacts, decision).await?;
        guard.disarm();
        Ok(vm)
    }

    async fn boot(
        id: &str,
        box_dir: &Path,
        config: SpawnConfig,
        identity: Identity,
        launch: LaunchPlan,
        artifacts: guest::Artifacts,
        decision: engine::EngineDecision,
    ) -> Result<VmSandbox, VmError> {
        // With a root filesystem the policy's paths are the tree's: nothing of the host is
        // shared, the root is the per-sandbox writable view of the tree (made by virtiofsd's
        // wrapper in its own mount namespace), and Landlock in the guest confines writes to
        // read_write paths, as on the process backend.
        let (mut shares, root) = match &config.root {
            None => {
                let (shares, skipped) = shares_for(&identity, &config.policy, decision.engine)?;
                for (path, reason) in &skipped {
                    warn!(event = "sandbox.vm_share_skipped", sandbox = id, %path, %reason, "policy path not shared into the VM");
                }
                let root = box_dir.join("root");
                match decision.engine {
                    // The fs server mounts a tmpfs root here, in its own namespace.
                    Engine::Qemu => std::fs::create_dir(&root)
                        .map_err(io(format!("creating {}", root.display())))?,
                    Engine::Krun => build_root(&artifacts.rootfs, &root, &shares)?,
                }
                (shares, root)
            }
            Some(tree) => {
                let agent = artifacts.rootfs.join("openshell/agent");
                crate::process::rootfs::seed_guest_upper(
                    &tree.lower,
                    &box_dir.join("upper"),
                    &agent,
                )
                .map_err(io(format!(
                    "preparing the guest's entries in {}",
                    box_dir.display()
                )))?;
                (Vec::new(), box_dir.join("merged"))
            }
        };
        shares.insert(
            0,
            Share {
                tag: "root".into(),
                host_path: root.clone(),
                guest_path: "/".into(),
                readonly: config.root.is_none(),
            },
        );
        let (vcpus, memory_mib) = vm_size(&config.resources);
        // The qemu engine's VMM runs jailed as its own user, with its sockets in the box's
        // `vmm/`; the krun shim keeps them in the box.
        let vmm_box = match decision.engine {
            Engine::Qemu => Some(VmmBox::prepare(box_dir)?),
            Engine::Krun => None,
        };
        let vsock_uds = match &vmm_box {
            Some(b) => b.vsock_uds(),
            None => box_dir.join("vsock.sock"),
        };
        let trust_bundle = match (&config.trust_bundle, decision.engine) {
            (Some(pem), Engine::Qemu) => Some(
                crate::process::write_trust_bundle(box_dir, pem)
                    .map_err(io(format!("writing the CA bundle in {}", box_dir.display())))?,
            ),
            (Some(_), _) => {
                return Err(VmError::Share {
                    path: crate::TRUST_BUNDLE_PATH.into(),
                    reason: "the krun engine shares directories only, so the egress proxy's CA bundle (tls: terminate) cannot be placed; use the qemu engine".into(),
                })
            }
            (None, _) => None,
        };
        let vm = VmDescription {
            kernel: artifacts.kernel.clone(),
            root: root.clone(),
            root_view: config
                .root
                .as_ref()
                .map(|r| crate::process::protocol::RootPlan {
                    lower: r.lower.clone(),
                    box_dir: box_dir.to_owned(),
                }),
            shares: shares.clone(),
            vsock_uds: vsock_uds.clone(),
            vcpus,
            memory_mib,
            cmdline: match decision.engine {
                #[cfg(feature = "krun")]
                Engine::Krun => krun::kernel_cmdline(config.root.is_some()),
                _ => qemu::kernel_cmdline(qemu::host_tsc_khz()),
            },
            workload_ids: Some(identity.kernel_ids()),
            trust_bundle: trust_bundle.clone(),
        };
        info!(event = "sandbox.vm_engine", sandbox = id, engine = decision.engine.name(), reason = %decision.reason, vcpus, memory_mib, "vm engine chosen");

        // Guest→host listeners exist before boot: readiness, then egress.
        let guest_listener = |port: u32| match &vmm_box {
            Some(b) => b.listen(port),
            None => {
                let path = PathBuf::from(format!("{}_{port}", vsock_uds.display()));
                std::os::unix::net::UnixListener::bind(&path)
                    .map_err(io(format!("binding {}", path.display())))
            }
        };
        let ready = guest_listener(proto::READY_PORT)?;
        ready
            .set_nonblocking(true)
            .map_err(io("configuring the ready listener"))?;
        let ready = tokio::net::UnixListener::from_std(ready)
            .map_err(io("registering the ready listener"))?;
        let egress = match &config.egress {
            Some(egress) => {
                let listener = guest_listener(proto::EGRESS_PORT)?;
                Some(
                    egress
                        .attach(crate::EgressAttachment {
                            sandbox_id: id.to_owned(),
                            listener: crate::EgressListener::Unix { listener },
                        })
                        .map_err(VmError::Egress)?,
                )
            }
            None => None,
        };
        // The qemu engine's single virtio-fs root already holds every share; libkrun gets one
        // device per share, which the agent mounts.
        let mounts = shares
            .iter()
            .skip(1)
            .filter(|_| decision.engine != Engine::Qemu)
            .map(|s| GuestMount {
                tag: s.tag.clone(),
                path: s.guest_path.clone(),
                readonly: s.readonly,
            })
            .collect();
        // An image's /tmp is part of its per-sandbox view; the agent mounts a private tmpfs
        // there as well.
        let tmp = match &config.root {
            None => guest_tmp(
                &identity,
                &config.policy,
                config.resources.memory_mib.max(),
                &shares,
            ),
            Some(_) => Some(proto::GuestTmp {
                size_mib: config.resources.memory_mib.max(),
                readonly: false,
                keep: Vec::new(),
            }),
        };
        let trust_guest_paths: Vec<String> = match (&trust_bundle, &config.root) {
            (None, _) => Vec::new(),
            (Some(_), None) => vec![crate::TRUST_BUNDLE_PATH.to_owned()],
            (Some(_), Some(root)) => crate::process::view::image_trust_paths(
                &root.lower,
                Path::new(crate::TRUST_BUNDLE_PATH),
            )
            .map_err(|e| VmError::Share {
                path: crate::TRUST_BUNDLE_PATH.into(),
                reason: crate::error_chain(&e),
            })?
            .iter()
            .map(|p| p.display().to_string())
            .collect(),
        };
        let read_only = shares
            .iter()
            .skip(1)
            .filter(|s| s.readonly && decision.engine == Engine::Qemu)
            .map(|s| s.guest_path.clone())
            // The CA bundle is bound read-only in the tree; the guest binds it read-only too,
            // where the image's links lead.
            .chain(trust_guest_paths)
            .collect();
        let setup = Request::Setup {
            hostname: config.hostname.clone(),
            mounts,
            // The guest's workload cgroup: every policy gets a pids limit unless it says
            // `pids: unlimited`; with `memory_mib: unlimited` the guest's RAM is the bound.
            pids_limit: config.resources.pids.max(),
            memory_limit_mib: config.resources.memory_mib.max(),
            tmp,
            read_only,
            identity_max_binary_bytes: config.identity_max_binary_bytes,
        };
        // The qemu engine puts both requests in the guest's tree (vm_protocol::BOOT_REQUESTS):
        // the agent launches the workload before it dials, and nothing is sent after.
        let start = match decision.engine {
            Engine::Qemu => {
                let plumbing = stdio_plumbing(config.stdio)?;
                let spawn = Request::Spawn {
                    launch,
                    stdio: plumbing.0,
                    main: true,
                };
                let requests = proto::encode_boot_requests(&setup, &spawn);
                MainStart::InTree(plumbing, requests)
            }
            Engine::Krun => MainStart::OnConnection(Box::new((launch, setup))),
        };
        let console = match &vmm_box {
            Some(b) => b.console(),
            None => box_dir.join("console.log"),
        };
        let (mut vmm, helpers, agent) = match (decision.engine, &vmm_box) {
            (Engine::Qemu, Some(vmm_box)) => {
                let requests = match &start {
                    MainStart::InTree(_, requests) => Some(requests.clone()),
                    MainStart::OnConnection(_) => None,
                };
                // Restored from a template when one fits (the default root only: a template's
                // tree is the built root's), else booted.
                let template = match config.root.is_none() && template::enabled() {
                    true => template::ensure(&vm, decision.accel, &artifacts).await,
                    false => None,
                };
                let restored = match &template {
                    Some(t) => template::restore(
                        id,
                        vmm_box,
                        &ready,
                        &vm,
                        t,
                        decision.accel,
                        &artifacts,
                        requests.clone(),
                    )
                    .await
                    .ok(),
                    None => None,
                };
                let (qemu_child, helpers) = match restored {
                    Some(started) => started,
                    None => {
                        start_qemu(vmm_box, &vm, &artifacts, decision.accel, requests, &[], &[])
                            .await?
                    }
                };
                if config.root.is_some() {
                    log_root_method(id, box_dir)?;
                }
                let agent = AgentAddr {
                    uds: vm.vsock_uds.clone(),
                    connect_line: true,
                    peer_uid: Some(vmm_box.ids.uid),
                };
                (Vmm::Qemu(qemu_child), helpers, agent)
            }
            (Engine::Qemu, None) => {
                return Err(VmError::Helper {
                    what: "qemu",
                    message: "no VMM box was prepared".into(),
                })
            }
            #[cfg(feature = "krun")]
            (Engine::Krun, _) => {
                let mut shim = krun::KrunShim::start(krun::plan_for(&vm)).await?;
                debug!(sandbox = id, pid = shim.pid(), jail = ?shim.jail, "krun shim configured");
                if config.root.is_some() {
                    log_root_method(id, box_dir)?;
                }
                shim.boot().await?;
                let agent = AgentAddr {
                    uds: vsock_uds.clone(),
                    connect_line: false,
                    peer_uid: None,
                };
                (Vmm::Krun(Box::new(shim)), Vec::new(), agent)
            }
            #[cfg(not(feature = "krun"))]
            (Engine::Krun, _) => return Err(engine::EngineError::KrunNotBuilt.into()),
        };
        let vmm_log = box_dir.join(match decision.engine {
            Engine::Qemu => "qemu.log",
            Engine::Krun => "krun.log",
        });

        // Wait for the agent, bounded, watching the VMM. It dials READY_PORT once its control
        // port listens (dialling the guest earlier can leave a connection that
        // vhost-device-vsock never answers); that connection then carries the setup and the
        // workload.
        let boot_limit = Duration::from_secs(60);
        let started = std::time::Instant::now();
        let announced = accept_bounded(
            &ready,
            boot_limit,
            || match vmm.try_exited() {
                Some(status) => Err(VmError::Helper {
                    what: decision.engine.name(),
                    message: format!(
                        "exited with {status} before the agent answered: {}",
                        std::fs::read_to_string(&vmm_log).unwrap_or_default()
                    ),
                }),
                None => Ok(()),
            },
            || VmError::AgentTimeout(boot_limit, console_tail(&console)),
        )
        .await;
        let announced = match announced {
            Ok(stream) => stream,
            Err(e) => {
                vmm.start_kill();
                return Err(e);
            }
        };
        drop(ready);
        debug!(
            sandbox = id,
            ms = started.elapsed().as_millis() as u64,
            "guest agent announced itself"
        );
        let limit = Duration::from_secs(30);
        let session = async {
            match start {
                MainStart::InTree(plumbing, _) => {
                    run_session(announced, id, plumbing, None, true).await
                }
                MainStart::OnConnection(requests) => {
                    let (launch, setup) = *requests;
                    open_session(announced, id, launch, config.stdio, true, Some(setup)).await
                }
            }
        };
        let (main, stdio) = tokio::time::timeout(limit, session)
            .await
            .map_err(|_| VmError::AgentTimeout(limit, console_tail(&console)))??;
        info!(event = "sandbox.started", sandbox = id, runtime = "vm", program = %config.program, "workload started");
        Ok(VmSandbox {
            id: id.to_owned(),
            box_dir: box_dir.to_owned(),
            agent,
            vmm,
            helpers,
            main,
            stdio,
            pty: matches!(config.stdio, StdioMode::Pty { .. }),
            identity,
            _egress: egress,
            status: None,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn take_stdio(&mut self) -> Stdio {
        std::mem::take(&mut self.stdio)
    }

    /// Wait for the workload; the VM powers off after it and is torn down here.
    pub async fn wait(&mut self) -> Result<ExitStatus, VmError> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let report = tokio::select! {
            r = self.main.wait() => Some(r),
            _ = self.vmm.wait() => None,
        };
        let report = match report {
            Some(r) => r,
            // QEMU ended first (killed): the workload died with the VM.
            None => self
                .main
                .exited
                .borrow()
                .unwrap_or(WaitReport::Signal(libc::SIGKILL)),
        };
        // The agent synced the guest before reporting the main process's status, and nothing
        // else in the VM outlives it: end the VM now rather than wait for its reboot.
        self.vmm.start_kill();
        for helper in &mut self.helpers {
            let _ = helper.start_kill();
        }
        let _ = self.vmm.wait().await;
        for helper in &mut self.helpers {
            let _ = helper.wait().await;
        }
        let _ = std::fs::remove_dir_all(&self.box_dir);
        let status = status_of(report);
        info!(event = "sandbox.exited", sandbox = %self.id, %status, "workload ended");
        self.status = Some(status);
        Ok(status)
    }

    pub fn signal(&self, signal: i32) -> Result<(), VmError> {
        if self.status.is_some() {
            return Err(VmError::NotRunning);
        }
        if signal == 0 {
            return match self.main.exited.borrow().is_none() {
                true => Ok(()),
                false => Err(VmError::NotRunning),
            };
        }
        self.main.signal(signal)
    }

    /// Set the terminal size of a workload started with a PTY.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), VmError> {
        if !self.pty {
            return Err(VmError::NoTerminal);
        }
        if self.status.is_some() || self.main.exited.borrow().is_some() {
            return Err(VmError::NotRunning);
        }
        self.main
            .to_agent
            .send(Frame::json(&Request::Resize { rows, cols }))
            .map_err(|_| VmError::NotRunning)
    }

    /// Kill the VM (and with it everything in it). Never blocks.
    pub fn kill(&self) -> Result<(), VmError> {
        if let Some(pid) = self.vmm.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::SIGKILL,
            );
        }
        Ok(())
    }

    pub async fn exec(&self, config: ExecConfig) -> Result<VmExec, VmError> {
        if self.status.is_some() {
            return Err(VmError::NotRunning);
        }
        exec_in(&self.agent, &self.id, &self.identity, config).await
    }

    /// A cheap, cloneable handle that can exec into this VM and connect to its ports while the
    /// owner of this value waits for it.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            inner: std::sync::Arc::new(VmHandleInner {
                id: self.id.clone(),
                agent: self.agent.clone(),
                identity: self.identity.clone(),
                workload: self.main.exited.clone(),
            }),
        }
    }
}

async fn exec_in(
    agent: &AgentAddr,
    id: &str,
    identity: &Identity,
    config: ExecConfig,
) -> Result<VmExec, VmError> {
    let launch = identity.launch(
        &config.program,
        &config.args,
        &config.env,
        &config.workdir,
        config.stdio,
        Vec::new(),
    )?;
    let pty = matches!(config.stdio, StdioMode::Pty { .. });
    let (session, stdio) = start_session(agent, id, launch, config.stdio, false).await?;
    info!(event = "sandbox.exec", sandbox = %id, program = %config.program, "command started in the sandbox");
    Ok(VmExec {
        session,
        stdio,
        pty,
        status: None,
    })
}

/// What exec and port connections into a running VM need. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct VmHandle {
    inner: std::sync::Arc<VmHandleInner>,
}

#[derive(Debug)]
struct VmHandleInner {
    id: String,
    agent: AgentAddr,
    identity: Identity,
    /// The workload's end: the VM powers off after it.
    workload: watch::Receiver<Option<WaitReport>>,
}

impl VmHandle {
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    fn check_running(&self) -> Result<(), VmError> {
        match self.inner.workload.borrow().is_some() {
            true => Err(VmError::NotRunning),
            false => Ok(()),
        }
    }

    pub async fn exec(&self, config: ExecConfig) -> Result<VmExec, VmError> {
        self.check_running()?;
        let i = &self.inner;
        exec_in(&i.agent, &i.id, &i.identity, config).await
    }

    /// Connect to `127.0.0.1:port` inside the guest: the agent dials it on its own loopback and
    /// relays the bytes over a fresh vsock control connection. Nothing outside the guest's
    /// loopback can be reached this way.
    pub async fn connect_tcp(&self, port: u16) -> Result<tokio::io::DuplexStream, VmError> {
        self.check_running()?;
        let stream = tokio::time::timeout(Duration::from_secs(10), dial_agent(&self.inner.agent))
            .await
            .map_err(|_| {
                VmError::AgentTimeout(Duration::from_secs(10), "no answer to a forward".into())
            })?
            .map_err(io("connecting to the guest agent"))?;
        let (mut reader, mut writer) = stream.into_split();
        proto::write_frame_async(&mut writer, &Frame::json(&Request::Forward { port }))
            .await
            .map_err(VmError::Frame)?;
        loop {
            let frame = proto::read_frame_async(&mut reader)
                .await
                .map_err(VmError::Frame)?
                .ok_or(VmError::AgentLost)?;
            if frame.kind != Kind::Json {
                continue;
            }
            match frame.decode_json::<Event>().map_err(VmError::Frame)? {
                Event::Connected => break,
                Event::Failed { stage, message, .. } => {
                    return Err(VmError::Forward {
                        port,
                        reason: format!("{stage}: {message}"),
                    })
                }
                other => debug!(?other, "unexpected event while connecting a forward"),
            }
        }
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (mut ours_rd, mut ours_wr) = tokio::io::split(ours);
        tokio::spawn(async move {
            let to_guest = async {
                let mut buf = vec![0u8; proto::MAX_GUEST_WRITE];
                loop {
                    match ours_rd.read(&mut buf).await {
                        // The guest would see a half-close as the end of the forward: keep the
                        // connection until the guest side ends.
                        Ok(0) | Err(_) => return std::future::pending::<()>().await,
                        Ok(n) => {
                            let frame = Frame {
                                kind: Kind::Data,
                                payload: buf[..n].to_vec(),
                            };
                            if proto::write_frame_async(&mut writer, &frame).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            };
            let from_guest = async {
                while let Ok(Some(frame)) = proto::read_frame_async(&mut reader).await {
                    if frame.kind == Kind::Data && ours_wr.write_all(&frame.payload).await.is_err()
                    {
                        return;
                    }
                }
                let _ = ours_wr.shutdown().await;
            };
            tokio::select! {
                () = to_guest => {}
                () = from_guest => {}
            }
        });
        Ok(theirs)
    }
}

/// A box's places for the qemu engine's jailed VMM:
/// - `vmm/` (mode 0700, the VMM user's): the vsock daemon's sockets and the supervisor's
///   guest→host listeners next to them (`vsock.sock_<port>`, handed to the VMM user), QMP, the
///   console, a template's state while it is written;
/// - `fs/` (mode 0700, the VMM user's): virtiofsd's socket, apart from `vmm/` so that virtiofsd
///   reaches nothing of QEMU's (QMP, the vsock sockets);
/// - `jail-qemu/`, `jail-vsock/`, `jail-fs/`: empty mount points for the jails' roots.
///
/// Everything root does in `vmm/` goes through its directory descriptor without following a
/// link; logs stay in the box itself, which only root can write.
#[derive(Debug, Clone)]
pub(crate) struct VmmBox {
    pub dir: PathBuf,
    pub vmm: PathBuf,
    pub fs: PathBuf,
    pub ids: jail::VmmIds,
}

impl VmmBox {
    pub fn prepare(box_dir: &Path) -> Result<VmmBox, VmError> {
        use std::os::unix::fs::DirBuilderExt;
        let ids = jail::vmm_ids()?;
        let mkdir = |name: &str, mode: u32| {
            let path = box_dir.join(name);
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(&path)
                .map_err(io(format!("creating {}", path.display())))?;
            Ok::<_, VmError>(path)
        };
        let owned = |name: &str| {
            let path = mkdir(name, 0o700)?;
            let dir =
                std::fs::File::open(&path).map_err(io(format!("opening {}", path.display())))?;
            nix::unistd::fchown(
                &dir,
                Some(nix::unistd::Uid::from_raw(ids.uid)),
                Some(nix::unistd::Gid::from_raw(ids.gid)),
            )
            .map_err(|e| VmError::Io {
                op: format!("handing {} to {}", path.display(), jail::VMM_USER),
                source: e.into(),
            })?;
            Ok::<_, VmError>(path)
        };
        let vmm = owned("vmm")?;
        let fs = owned("fs")?;
        mkdir("jail-qemu", 0o755)?;
        mkdir("jail-vsock", 0o755)?;
        mkdir("jail-fs", 0o755)?;
        Ok(VmmBox {
            dir: box_dir.to_owned(),
            vmm,
            fs,
            ids,
        })
    }

    pub fn vsock_uds(&self) -> PathBuf {
        self.vmm.join("vsock.sock")
    }

    pub fn console(&self) -> PathBuf {
        self.vmm.join("console.log")
    }

    pub fn qmp(&self) -> PathBuf {
        self.vmm.join("qmp.sock")
    }

    /// Hand the socket `name` of `dir` (one root bound there) to the VMM user, without
    /// following a link.
    pub fn hand_over(&self, dir: &Path, name: &str) -> Result<(), VmError> {
        let at = std::fs::File::open(dir).map_err(io(format!("opening {}", dir.display())))?;
        nix::unistd::fchownat(
            &at,
            name,
            Some(nix::unistd::Uid::from_raw(self.ids.uid)),
            Some(nix::unistd::Gid::from_raw(self.ids.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .map_err(|e| VmError::Io {
            op: format!("handing {}/{name} to {}", dir.display(), jail::VMM_USER),
            source: e.into(),
        })
    }

    /// Bind a guest→host listener at `<vsock.sock>_<port>` (before the vsock daemon starts)
    /// and hand it to the VMM user.
    pub fn listen(&self, port: u32) -> Result<std::os::unix::net::UnixListener, VmError> {
        let name = format!("vsock.sock_{port}");
        let path = self.vmm.join(&name);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .map_err(io(format!("binding {}", path.display())))?;
        self.hand_over(&self.vmm, &name)?;
        Ok(listener)
    }
}

/// The qemu engine: the vsock daemon (jailed) and the virtiofsd serving the guest's tree
/// (sockets ready), then QEMU (jailed) with `vm`'s description and `extra` arguments, seeing
/// `extra_read_only` too (a template's state). `boot_requests` go into the guest's tree
/// (`vm_protocol::BOOT_REQUESTS`). Returns QEMU's jail and the helpers (all killed when
/// dropped).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn start_qemu(
    vmm_box: &VmmBox,
    vm: &VmDescription,
    artifacts: &guest::Artifacts,
    accel: engine::Accel,
    boot_requests: Option<Vec<u8>>,
    extra: &[String],
    extra_read_only: &[PathBuf],
) -> Result<(Child, Vec<Child>), VmError> {
    let box_dir = &vmm_box.dir;
    let vsock_uds = &vm.vsock_uds;
    let mut helpers = Vec::new();
    let vhost_vsock = vmm_box.vmm.join("vhost-vsock.sock");
    // The daemon is dynamically linked: its loader and libraries come from the host's /usr.
    let vsock_jail = jail::JailSpec {
        what: "vhost-device-vsock",
        program: artifacts.vsock_daemon.clone(),
        args: qemu::vsock_daemon_args(&vhost_vsock, vsock_uds),
        log: box_dir.join("vsock.log"),
        root: box_dir.join("jail-vsock"),
        read_only: jail::host_libraries(),
        read_write: vec![vmm_box.vmm.clone()],
        kvm: false,
        syscalls: vmm_syscalls::VSOCK,
        ids: jail::JailIds::vmm(vmm_box.ids),
        keep_caps: 0,
        tree: None,
    };
    let fs_socket = vmm_box.fs.join("fs.sock");
    let tree = GuestTree {
        root: vm.root.clone(),
        binds: vm
            .shares
            .iter()
            .filter(|s| s.guest_path != "/")
            .map(|s| FsBind {
                source: s.host_path.clone(),
                guest_path: s.guest_path.clone(),
                readonly: s.readonly,
            })
            .collect(),
        root_view: vm.root_view.clone(),
        base: vm.root_view.is_none().then(|| artifacts.rootfs.clone()),
        boot_requests,
        guest_root: (vmm_box.ids.uid, vmm_box.ids.gid),
        trust_bundle: vm.trust_bundle.clone(),
    };
    let fs_jail = fs_server::jail_spec(
        vmm_box,
        &artifacts.virtiofsd,
        tree,
        &fs_socket,
        vm.workload_ids,
    )?;
    // Both daemons start at once; QEMU needs both sockets.
    let (vsockd, fsd) = tokio::join!(jail::start(vsock_jail), jail::start(fs_jail));
    let limit = Duration::from_secs(10);
    let mut vsockd = match vsockd {
        Ok(child) => child,
        Err(e) => {
            if let Ok(mut fsd) = fsd {
                let _ = fsd.start_kill();
            }
            return Err(e);
        }
    };
    let waited = qemu::wait_for_socket(&vhost_vsock, &mut vsockd, limit).await;
    helpers.push(vsockd);
    waited.map_err(|message| VmError::Helper {
        what: "vhost-device-vsock",
        message: format!(
            "{message}: {}",
            std::fs::read_to_string(box_dir.join("vsock.log"))
                .unwrap_or_default()
                .trim()
        ),
    })?;
    let mut fsd = fsd?;
    let waited = qemu::wait_for_socket(&fs_socket, &mut fsd, limit).await;
    helpers.push(fsd);
    waited.map_err(|message| {
        // What the daemon said.
        let said = std::fs::read_to_string(box_dir.join("virtiofsd.log")).unwrap_or_default();
        VmError::Helper {
            what: "virtiofsd",
            message: format!("{message}: {}", said.trim()),
        }
    })?;
    let mut args = qemu::qemu_args(vm, accel, &vhost_vsock, &fs_socket, &vmm_box.console());
    args.extend_from_slice(extra);
    let qemu_dir = artifacts
        .qemu
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut read_only = vec![qemu_dir, vm.kernel.clone(), vmm_box.fs.clone()];
    // Its firmware (`qboot.rom`), where the distribution's qemu-system-data puts it.
    if Path::new(qemu::FIRMWARE_DIR).is_dir() {
        read_only.push(PathBuf::from(qemu::FIRMWARE_DIR));
    }
    read_only.extend(extra_read_only.iter().cloned());
    let qemu_jail = jail::JailSpec {
        what: "qemu",
        program: artifacts.qemu.clone(),
        args,
        log: box_dir.join("qemu.log"),
        root: box_dir.join("jail-qemu"),
        read_only,
        read_write: vec![vmm_box.vmm.clone()],
        kvm: accel == engine::Accel::Kvm,
        syscalls: vmm_syscalls::QEMU,
        ids: jail::JailIds::vmm(vmm_box.ids),
        keep_caps: 0,
        tree: None,
    };
    let qemu_child = jail::start(qemu_jail).await?;
    Ok((qemu_child, helpers))
}

/// Accept one connection on `ready` within `limit`, checking `alive` every 50 ms (its error
/// ends the wait: the VMM died); `timed_out` makes the error when `limit` passes.
pub(crate) async fn accept_bounded<E>(
    ready: &tokio::net::UnixListener,
    limit: Duration,
    mut alive: impl FnMut() -> Result<(), E>,
    timed_out: impl FnOnce() -> E,
) -> Result<UnixStream, E> {
    let started = std::time::Instant::now();
    loop {
        tokio::select! {
            accepted = ready.accept() => {
                if let Ok((stream, _)) = accepted {
                    return Ok(stream);
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        alive()?;
        if started.elapsed() > limit {
            return Err(timed_out());
        }
    }
}

/// Log how the engine made the root filesystem's view (its record in `<box>/root-method`).
fn log_root_method(id: &str, box_dir: &Path) -> Result<(), VmError> {
    let text = std::fs::read_to_string(box_dir.join("root-method"))
        .map_err(io("reading how the root filesystem was made"))?;
    match serde_json::from_str(&text) {
        Ok(method) => crate::process::log_root(id, &method),
        Err(e) => warn!(sandbox = id, error = %e, "unreadable root-method record"),
    }
    Ok(())
}

/// The console's last lines. The console lies in a directory the VMM user can write: opened
/// without following a link, and only a regular file is read.
fn console_tail(console: &Path) -> String {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(console)
    {
        if let Some(m) = f.metadata().ok().filter(|m| m.is_file()) {
            use std::io::Seek as _;
            let _ = f.seek(std::io::SeekFrom::Start(m.len().saturating_sub(64 * 1024)));
            let _ = f.take(64 * 1024).read_to_string(&mut text);
        }
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A command started inside a running VM sandbox.
#[derive(Debug)]
pub struct VmExec {
    session: Session,
    stdio: Stdio,
    pty: bool,
    status: Option<ExitStatus>,
}

impl VmExec {
    pub fn take_stdio(&mut self) -> Stdio {
        std::mem::take(&mut self.stdio)
    }

    pub async fn wait(&mut self) -> Result<ExitStatus, VmError> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let status = status_of(self.session.wait().await);
        self.status = Some(status);
        Ok(status)
    }

    pub fn signal(&self, signal: i32) -> Result<(), VmError> {
        self.session.signal(signal)
    }

    /// Set the terminal size of a command started with a PTY.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), VmError> {
        if !self.pty {
            return Err(VmError::NoTerminal);
        }
        if self.session.exited.borrow().is_some() {
            return Err(VmError::NotRunning);
        }
        self.session
            .to_agent
            .send(Frame::json(&Request::Resize { rows, cols }))
            .map_err(|_| VmError::NotRunning)
    }

    pub fn kill(&self) -> Result<(), VmError> {
        match self.session.signal(libc::SIGKILL) {
            Ok(()) | Err(VmError::NotRunning) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EffectiveResources, Limit};
    use pretty_assertions::assert_eq;

    #[test]
    fn vm_size_follows_the_effective_limits() {
        let host = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let with = |cpus, memory_mib| EffectiveResources {
            cpus,
            memory_mib,
            ..EffectiveResources::DEFAULT
        };
        let got = [
            vm_size(&EffectiveResources::DEFAULT),
            vm_size(&with(Limit::Max(1.5), Limit::Max(64))),
            vm_size(&with(Limit::Max(1024.0), Limit::Max(4096))),
            vm_size(&with(Limit::Unlimited, Limit::Unlimited)),
        ];
        assert_eq!(
            got,
            [(1, 1024), (2, 128), (255, 4096), (host.min(255), 512)]
        );
    }
}

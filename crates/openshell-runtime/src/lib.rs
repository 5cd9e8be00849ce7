//! Sandbox backends behind one API.
//!
//! A caller describes a workload with a [`SpawnConfig`] (program, arguments, environment, working
//! directory, stdio, the validated policy and resource limits) and picks a backend with
//! [`RuntimeKind`]. [`spawn`] returns a [`SandboxedProcess`], an enum with one arm per backend and
//! the same methods on each: [`SandboxedProcess::id`], [`SandboxedProcess::wait`],
//! [`SandboxedProcess::signal`], [`SandboxedProcess::kill`], streamed stdout/stderr, and
//! [`SandboxedProcess::exec`] of another command inside the running sandbox.
//!
//! The process backend re-executes the hosting binary as a small helper (see [`helper`]); a binary
//! that uses this crate must call [`helper::run_if_helper`] first thing in `main`.

#![cfg_attr(not(target_os = "linux"), allow(unused))]

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use openshell_policy::Policy;

pub mod helper;
#[cfg(target_os = "linux")]
pub mod lineage;
#[cfg(target_os = "linux")]
pub mod process;
pub mod rootfs;
#[cfg(all(target_os = "linux", feature = "vm"))]
pub mod vm;
#[cfg(target_os = "linux")]
pub mod vm_protocol;

#[cfg(all(feature = "vm", not(target_os = "linux")))]
compile_error!("the vm backend needs Linux (vsock, virtio-fs helpers, qemu)");

#[cfg(target_os = "linux")]
pub use process::{ProcessError, ProcessHandle, ProcessSandbox};
pub use rootfs::{ImageDefaults, MergedRun, RootFs, RunRequest};

/// Which isolation backend runs the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RuntimeKind {
    /// A Linux child in its own namespaces with Landlock, seccomp and cgroup limits.
    #[default]
    Process,
    /// A microVM (Cargo feature `vm`).
    Vm,
}

impl RuntimeKind {
    /// Whether this build carries the backend.
    pub fn is_available(self) -> bool {
        match self {
            RuntimeKind::Process => cfg!(target_os = "linux"),
            RuntimeKind::Vm => cfg!(feature = "vm"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Process => "process",
            RuntimeKind::Vm => "vm",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for an unknown runtime name.
#[derive(Debug, thiserror::Error)]
#[error("unknown runtime {0:?}, expected process or vm")]
pub struct UnknownRuntime(String);

impl FromStr for RuntimeKind {
    type Err = UnknownRuntime;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "process" => Ok(RuntimeKind::Process),
            "vm" => Ok(RuntimeKind::Vm),
            other => Err(UnknownRuntime(other.to_owned())),
        }
    }
}

/// How the workload's standard streams are connected.
///
/// Every mode gives the workload descriptors the runtime made for it; none hands over the
/// caller's own. There is deliberately no "inherit" mode: the workload runs in a session of its
/// own, so job control would not stop it from reading the caller's terminal while the caller is
/// in the background, the terminal settings it changes would outlive it, and a stdout that is a
/// file could be truncated (`ftruncate(1)`). A caller that wants the workload's output on its
/// own streams relays `Piped` or `Pty` (the CLI does, see `openshell-sandbox`'s `stdio.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StdioMode {
    /// stdin, stdout and stderr are pipes the caller reads and writes as they are produced.
    Piped,
    /// stdin, stdout and stderr are one pseudo-terminal; the caller gets the master side.
    Pty { rows: u16, cols: u16 },
    /// stdin reads nothing; stdout and stderr are discarded.
    #[default]
    Null,
}

/// Resource limits, applied on every backend: the policy's `resources` with its defaults
/// filled in ([`openshell_policy::Resources::effective`]). A resource is unlimited only as
/// [`Limit::Unlimited`], which a policy (or the CLI) must spell out.
pub use openshell_policy::{EffectiveResources, Limit};

/// What the runtime hands the egress layer for one sandbox, before the workload starts.
pub struct EgressAttachment {
    pub sandbox_id: String,
    pub listener: EgressListener,
}

/// The proxy's entry point for one sandbox.
pub enum EgressListener {
    /// Process backend: a listener bound in the sandbox's edge network namespace; callers are
    /// identified from the host's view of the sandbox's processes.
    Tcp {
        listener: std::net::TcpListener,
        /// Host pid of a process in the sandbox's network namespace (its init).
        init_pid: i32,
        /// The host pids of the sandbox's processes right now.
        members: Arc<dyn Fn() -> Vec<i32> + Send + Sync>,
        /// Who connected each socket to the proxy and when each process exec'd, as the
        /// supervisor saw the calls (see [`lineage`]).
        #[cfg(target_os = "linux")]
        lineage: Arc<lineage::Lineage>,
        /// The paths the workload can write, as it sees them (code mapped from below them
        /// is not a binary's own).
        writable: Vec<PathBuf>,
    },
    /// vm backend: the host end of the guest's egress vsock port; each connection starts with
    /// the guest agent's caller preamble.
    Unix {
        listener: std::os::unix::net::UnixListener,
    },
}

/// Kept alive for as long as the sandbox runs; dropping it stops serving the sandbox.
pub type EgressGuard = Box<dyn std::any::Any + Send + Sync>;

/// The egress layer (the proxy), seen from the runtime.
pub trait Egress: Send + Sync + fmt::Debug {
    /// Start serving one sandbox. Called before the workload starts; an error stops the sandbox.
    fn attach(
        &self,
        attachment: EgressAttachment,
    ) -> Result<EgressGuard, Box<dyn std::error::Error + Send + Sync>>;
}

/// Where the workload finds the proxy (inside its network namespace).
pub const PROXY_ADDR: std::net::SocketAddr = std::net::SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::new(10, 200, 0, 1),
    3128,
));

/// Point the workload's proxy variables at `addr` (host:port inside the sandbox), unless the
/// caller set them, so curl, wget, pip, git, npm and urllib use the egress proxy unmodified.
pub(crate) fn add_proxy_env(env: &mut BTreeMap<String, String>, addr: &str) {
    let url = format!("http://{addr}");
    for key in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        env.entry(key.to_owned()).or_insert_with(|| url.clone());
    }
    for key in ["NO_PROXY", "no_proxy"] {
        env.entry(key.to_owned())
            .or_insert_with(|| "localhost,127.0.0.1,::1".to_owned());
    }
}

/// Where the sandbox's CA bundle is in every sandbox that has one: the distribution's own
/// bundle path (Debian, Ubuntu, Alpine), so programs that read it unasked trust it too.
pub const TRUST_BUNDLE_PATH: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The variables pointing programs at [`TRUST_BUNDLE_PATH`]: OpenSSL (and Python's `ssl`,
/// urllib), Python requests, curl, Node, git and pip.
pub const TRUST_ENV: [&str; 6] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
];

/// Point the trust variables at the sandbox's bundle, unless the caller set them.
pub(crate) fn add_trust_env(env: &mut BTreeMap<String, String>) {
    for key in TRUST_ENV {
        env.entry(key.to_owned())
            .or_insert_with(|| TRUST_BUNDLE_PATH.to_owned());
    }
}

/// Everything needed to start a workload in a sandbox.
#[derive(Debug, Clone)]
pub struct SpawnConfig {
    /// The program: an absolute path, or a name looked up in the workload's `PATH` inside the
    /// sandbox.
    pub program: String,
    pub args: Vec<String>,
    /// The workload's whole environment: nothing of the supervisor's environment is passed on.
    pub env: BTreeMap<String, String>,
    /// Working directory inside the sandbox (absolute; inside the tree when `root` is set).
    pub workdir: PathBuf,
    pub stdio: StdioMode,
    /// The sandbox's root filesystem. `None`: the process backend keeps the host's root
    /// (restricted by Landlock), the vm backend boots its built default root. `Some`: the tree
    /// becomes `/` (the process backend pivot_roots into it, the vm backend shares it as the
    /// virtio-fs root), through a per-sandbox writable view, and the policy's paths are paths
    /// inside it.
    pub root: Option<RootFs>,
    /// The validated policy. Its static sections (filesystem, landlock, process) are enforced by
    /// the backend.
    pub policy: Arc<Policy>,
    pub resources: EffectiveResources,
    /// Hostname inside the sandbox.
    pub hostname: String,
    /// The vm backend's engine (`--vm-engine`); ignored by the process backend.
    pub vm_engine: VmEngine,
    /// The egress proxy. Without it the sandbox has no way out at all; with it the workload
    /// gets HTTP_PROXY, HTTPS_PROXY, ALL_PROXY (and lowercase) pointing at it, and NO_PROXY for
    /// loopback.
    pub egress: Option<Arc<dyn Egress>>,
    /// Executables larger than this are not hashed for the egress identity check (their
    /// connections are denied); `None`: the proxy's default. The process backend's proxy
    /// takes it from its own configuration; the vm backend hands it to the guest agent.
    pub identity_max_binary_bytes: Option<u64>,
    /// The CA bundle the workload trusts (PEM: the system roots and the sandbox CA of the
    /// egress proxy's TLS termination). With it, the runtime places it read-only at
    /// [`TRUST_BUNDLE_PATH`] in the sandbox (over the distribution's bundle, or created where
    /// the sandbox's own file system has none; a start that cannot place it fails) and sets
    /// [`TRUST_ENV`] for every process launched there.
    pub trust_bundle: Option<Arc<Vec<u8>>>,
}

impl SpawnConfig {
    /// A config with the defaults a user would expect: the policy's resources (defaults filled
    /// in for what it leaves out), hostname `openshell`, no stdio ([`StdioMode::Null`]), no
    /// environment.
    pub fn new(program: impl Into<String>, policy: Arc<Policy>, workdir: PathBuf) -> Self {
        let resources = policy.resources.effective();
        SpawnConfig {
            program: program.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            workdir,
            stdio: StdioMode::Null,
            root: None,
            policy,
            resources,
            hostname: "openshell".to_owned(),
            vm_engine: VmEngine::Auto,
            egress: None,
            identity_max_binary_bytes: None,
            trust_bundle: None,
        }
    }
}

/// A command to run inside an already running sandbox.
#[derive(Debug, Clone)]
pub struct ExecConfig {
    pub program: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: PathBuf,
    pub stdio: StdioMode,
}

/// How a sandboxed process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signaled(i32),
}

impl ExitStatus {
    /// The shell convention: the exit code, or 128+N for death by signal N.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signaled(s) => 128 + s,
        }
    }

    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signaled(s) => write!(f, "signal {s}"),
        }
    }
}

/// `--vm-engine auto|krun|qemu`: which engine boots a vm sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmEngine {
    /// krun where KVM runs standard guests, qemu otherwise (the choice is logged).
    #[default]
    Auto,
    Krun,
    Qemu,
}

impl FromStr for VmEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(VmEngine::Auto),
            "krun" => Ok(VmEngine::Krun),
            "qemu" => Ok(VmEngine::Qemu),
            other => Err(format!(
                "unknown vm engine {other:?}, expected auto, krun or qemu"
            )),
        }
    }
}

/// Errors of the runtime API.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the {0} backend is not part of this build; rebuild with `cargo build --release -p openshell-sandbox --features vm`")]
    BackendNotBuilt(RuntimeKind),
    #[cfg(target_os = "linux")]
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[cfg(all(target_os = "linux", feature = "vm"))]
    #[error(transparent)]
    Vm(#[from] vm::VmError),
}

/// A stream the workload writes (its stdout or stderr), whatever the backend.
pub type OutputStream = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
/// The workload's stdin, whatever the backend.
pub type InputStream = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// The standard streams of a sandboxed process the caller asked to pipe.
#[derive(Default)]
pub struct Stdio {
    pub stdin: Option<InputStream>,
    pub stdout: Option<OutputStream>,
    pub stderr: Option<OutputStream>,
    /// The terminal for [`StdioMode::Pty`]: read the workload's output from it and write its
    /// input to it. A PTY master on the process backend; a stream socket bridged to the guest's
    /// PTY on the vm backend (resize with `resize`).
    pub pty: Option<std::os::fd::OwnedFd>,
}

impl fmt::Debug for Stdio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stdio")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("pty", &self.pty)
            .finish()
    }
}

/// A workload running in a sandbox, whatever the backend.
#[derive(Debug)]
pub enum SandboxedProcess {
    #[cfg(target_os = "linux")]
    Process(ProcessSandbox),
    #[cfg(all(target_os = "linux", feature = "vm"))]
    Vm(vm::VmSandbox),
}

/// Start `config` under `kind`.
pub async fn spawn(
    kind: RuntimeKind,
    config: SpawnConfig,
) -> Result<SandboxedProcess, RuntimeError> {
    match kind {
        #[cfg(target_os = "linux")]
        RuntimeKind::Process => Ok(SandboxedProcess::Process(
            ProcessSandbox::spawn(config).await?,
        )),
        #[cfg(not(target_os = "linux"))]
        RuntimeKind::Process => Err(RuntimeError::BackendNotBuilt(kind)),
        #[cfg(all(target_os = "linux", feature = "vm"))]
        RuntimeKind::Vm => {
            let engine = match config.vm_engine {
                VmEngine::Auto => vm::engine::EngineChoice::Auto,
                VmEngine::Krun => vm::engine::EngineChoice::Krun,
                VmEngine::Qemu => vm::engine::EngineChoice::Qemu,
            };
            Ok(SandboxedProcess::Vm(
                vm::VmSandbox::spawn(config, engine).await?,
            ))
        }
        #[cfg(not(all(target_os = "linux", feature = "vm")))]
        RuntimeKind::Vm => {
            let _ = config;
            Err(RuntimeError::BackendNotBuilt(kind))
        }
    }
}

impl SandboxedProcess {
    /// The sandbox's identifier (unique on this host while it runs).
    pub fn id(&self) -> &str {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedProcess::Process(p) => p.id(),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedProcess::Vm(v) => v.id(),
        }
    }

    /// Which backend runs it.
    pub fn kind(&self) -> RuntimeKind {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedProcess::Process(_) => RuntimeKind::Process,
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedProcess::Vm(_) => RuntimeKind::Vm,
        }
    }

    /// Take the piped standard streams (once).
    pub fn take_stdio(&mut self) -> Stdio {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedProcess::Process(p) => p.take_stdio(),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedProcess::Vm(v) => v.take_stdio(),
        }
    }

    /// Wait for the workload to end. The sandbox is torn down when this returns.
    pub async fn wait(&mut self) -> Result<ExitStatus, RuntimeError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedProcess::Process(p) => Ok(p.wait().await?),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedProcess::Vm(v) => Ok(v.wait().await?),
        }
    }

    /// Send `signal` to the workload. Never blocks.
    pub fn signal(&self, signal: i32) -> Result<(), RuntimeError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedProcess::Process(p) => Ok(p.signal(signal)?),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedProcess::Vm(v) => Ok(v.signal(signal)?),
        }
    }

    /// Set the terminal size of a workload started with [`StdioMode::Pty`] (the workload gets
    /// SIGWINCH from its terminal).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), RuntimeError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedProcess::Process(p) => Ok(p.resize(rows, cols)?),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedProcess::Vm(v) => Ok(v.resize(rows, cols)?),
        }
    }

    /// Kill the workload and everything else in the sandbox. Never blocks.
    pub fn kill(&self) -> Result<(), RuntimeError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedProcess::Process(p) => Ok(p.kill()?),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedProcess::Vm(v) => Ok(v.kill()?),
        }
    }

    /// Run another command inside this running sandbox, with the same namespaces and
    /// restrictions as the workload.
    pub async fn exec(&self, config: ExecConfig) -> Result<SandboxedExec, RuntimeError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedProcess::Process(p) => {
                Ok(SandboxedExec::Process(Box::new(p.exec(config).await?)))
            }
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedProcess::Vm(v) => Ok(SandboxedExec::Vm(Box::new(v.exec(config).await?))),
        }
    }
}

impl SandboxedProcess {
    /// A cheap, cloneable handle for starting commands in this sandbox and connecting to its
    /// ports while the owner of this value waits for it (an SSH server, say). The handle's
    /// operations fail with "not running" once the workload has ended.
    pub fn handle(&self) -> Result<SandboxHandle, RuntimeError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedProcess::Process(p) => Ok(SandboxHandle::Process(p.handle()?)),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedProcess::Vm(v) => Ok(SandboxHandle::Vm(v.handle())),
        }
    }
}

/// A byte stream to a port inside a sandbox, whatever the backend.
pub trait Connection: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Connection for T {}

/// See [`SandboxedProcess::handle`].
#[derive(Debug, Clone)]
pub enum SandboxHandle {
    #[cfg(target_os = "linux")]
    Process(process::ProcessHandle),
    #[cfg(all(target_os = "linux", feature = "vm"))]
    Vm(vm::VmHandle),
}

impl SandboxHandle {
    pub fn id(&self) -> &str {
        match self {
            #[cfg(target_os = "linux")]
            SandboxHandle::Process(p) => p.id(),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxHandle::Vm(v) => v.id(),
        }
    }

    pub fn kind(&self) -> RuntimeKind {
        match self {
            #[cfg(target_os = "linux")]
            SandboxHandle::Process(_) => RuntimeKind::Process,
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxHandle::Vm(_) => RuntimeKind::Vm,
        }
    }

    /// Like [`SandboxedProcess::exec`].
    pub async fn exec(&self, config: ExecConfig) -> Result<SandboxedExec, RuntimeError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxHandle::Process(p) => {
                Ok(SandboxedExec::Process(Box::new(p.exec(config).await?)))
            }
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxHandle::Vm(v) => Ok(SandboxedExec::Vm(Box::new(v.exec(config).await?))),
        }
    }

    /// Connect to `127.0.0.1:port` on the sandbox's own loopback: from inside its network
    /// namespace (process backend) or by the guest agent over vsock (vm backend). There is no
    /// way to name any other address.
    pub async fn connect_tcp(&self, port: u16) -> Result<Box<dyn Connection>, RuntimeError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxHandle::Process(p) => Ok(Box::new(p.connect_tcp(port).await?)),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxHandle::Vm(v) => Ok(Box::new(v.connect_tcp(port).await?)),
        }
    }
}

/// A command started with [`SandboxedProcess::exec`].
#[derive(Debug)]
pub enum SandboxedExec {
    #[cfg(target_os = "linux")]
    Process(Box<process::ProcessExec>),
    #[cfg(all(target_os = "linux", feature = "vm"))]
    Vm(Box<vm::VmExec>),
}

impl SandboxedExec {
    pub fn take_stdio(&mut self) -> Stdio {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedExec::Process(p) => p.take_stdio(),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedExec::Vm(p) => p.take_stdio(),
        }
    }

    pub async fn wait(&mut self) -> Result<ExitStatus, RuntimeError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedExec::Process(p) => Ok(p.wait().await?),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedExec::Vm(p) => Ok(p.wait().await?),
        }
    }

    pub fn signal(&self, signal: i32) -> Result<(), RuntimeError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedExec::Process(p) => Ok(p.signal(signal)?),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedExec::Vm(p) => Ok(p.signal(signal)?),
        }
    }

    /// Set the terminal size of a command started with [`StdioMode::Pty`].
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), RuntimeError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedExec::Process(p) => Ok(p.resize(rows, cols)?),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedExec::Vm(p) => Ok(p.resize(rows, cols)?),
        }
    }

    pub fn kill(&self) -> Result<(), RuntimeError> {
        match self {
            #[cfg(target_os = "linux")]
            SandboxedExec::Process(p) => Ok(p.kill()?),
            #[cfg(all(target_os = "linux", feature = "vm"))]
            SandboxedExec::Vm(p) => Ok(p.kill()?),
        }
    }
}

/// An error and its sources, joined with ": " (for one-line reports: a helper's failure stage,
/// a guest agent's diagnostics, a structured log field).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}

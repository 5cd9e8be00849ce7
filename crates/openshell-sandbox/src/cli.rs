//! Command-line interface.

use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand, ValueEnum};
use openshell_policy::Limit;
use openshell_runtime::RuntimeKind;

#[derive(Debug, Parser)]
#[command(
    name = "openshell-sandbox",
    version,
    about = "Run a command in a sandbox under a policy",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the seccomp table (each denied system call and why, and every difference from
    /// Docker's default profile and OpenShell's filter) and exit.
    Seccomp,
    /// OCI images in the cache ($OPENSHELL_HOME/images, default ~/.local/share/openshell).
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Resolve REF at its registry, then fetch, verify and unpack what is not cached yet.
    Pull {
        /// Image reference: [REGISTRY/]REPOSITORY[:TAG][@DIGEST].
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// List the cached images.
    Ls,
    /// Forget REF and remove the blobs and trees no other image needs.
    Rm { reference: String },
    /// Remove blobs and trees no image needs (and leftovers of interrupted pulls).
    Gc,
    /// Print REF's unpacked root directory and config as JSON (pulls it only when not cached).
    Inspect {
        reference: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

/// How to reach a registry.
#[derive(Debug, Clone, Default, Args)]
pub struct RegistryArgs {
    /// Speak plain HTTP to this registry, HOST:PORT (repeatable). Meant for registries on
    /// loopback; any other host is logged as a warning.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registry: Vec<String>,

    /// Docker-style config.json with credentials (`auths`); default $DOCKER_CONFIG/config.json
    /// or ~/.docker/config.json when present.
    #[arg(long, value_name = "FILE")]
    pub registry_config: Option<PathBuf>,

    /// Registry user name (with --password-stdin); overrides the config file.
    #[arg(long, value_name = "NAME", requires = "password_stdin")]
    pub username: Option<String>,

    /// Read the registry password from standard input.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
}

/// The default form: `openshell-sandbox [OPTIONS] [-- COMMAND...]`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Isolation backend.
    #[arg(long, env = "OPENSHELL_RUNTIME", default_value = "process", value_parser = parse_runtime)]
    pub runtime: RuntimeKind,

    /// Engine of the vm backend: krun where KVM runs standard guests, qemu (KVM or TCG) where it
    /// cannot; `auto` picks and logs why.
    #[arg(long, env = "OPENSHELL_VM_ENGINE", default_value = "auto", value_parser = parse_engine)]
    pub vm_engine: openshell_runtime::VmEngine,

    /// Policy file (OpenShell v1 YAML). Without it, the built-in restrictive default applies.
    #[arg(long, env = "OPENSHELL_POLICY", value_name = "FILE")]
    pub policy: Option<PathBuf>,

    /// Poll this https:// URL (http:// only to a loopback address) for policy updates (ETag /
    /// If-None-Match). Without --policy, the initial policy is fetched from it too. Only
    /// network_policies may change live. The server's certificate must chain to the system's
    /// root certificates, unless --policy-url-sha256 pins it.
    #[arg(long, env = "OPENSHELL_POLICY_URL", value_name = "URL")]
    pub policy_url: Option<String>,

    /// Trust exactly the --policy-url server certificate with this SHA-256 (64 hex digits,
    /// optionally after `sha256:`), instead of the system's root certificates.
    #[arg(long, value_name = "HEX", requires = "policy_url")]
    pub policy_url_sha256: Option<String>,

    /// How often to poll --policy-url, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub policy_poll_interval: f64,

    /// Append every egress decision as one JSON line to this file.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,

    /// Rotate the audit log when it would grow past this many MiB (FILE -> FILE.1 -> ...).
    #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_log_max_mib: u64,

    /// Rotated audit logs kept (FILE.1 .. FILE.N).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub audit_log_keep: u32,

    /// Trust the CA certificates in this PEM file (repeatable), besides the system's roots,
    /// for upstreams of `tls: terminate` endpoints (a private upstream, a test server).
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,

    /// Executables larger than this many MiB are not hashed for the egress identity check,
    /// and connections they make are denied.
    #[arg(long, value_name = "MIB", default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub identity_max_binary_mib: u64,

    /// Most concurrent proxied connections per sandbox.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_connections: usize,

    /// Root filesystem: an unpacked tree (e.g. an OCI image's) that becomes `/` in the sandbox,
    /// through a per-sandbox writable view; the tree itself is never modified. The policy's
    /// paths are then paths inside the tree.
    #[arg(long, value_name = "DIR")]
    pub rootfs: Option<PathBuf>,

    /// An OCI image as the root filesystem (e.g. `docker.io/library/busybox:1.36`): pulled
    /// into the cache under $OPENSHELL_HOME when missing, every blob verified; a cached image
    /// needs no network. Its Env, WorkingDir, User and Entrypoint/Cmd are the defaults, as with
    /// --rootfs-config. See `openshell-sandbox image --help` for the cache.
    #[arg(long, value_name = "REF", conflicts_with_all = ["rootfs", "rootfs_config"])]
    pub image: Option<String>,

    #[command(flatten)]
    pub registry: RegistryArgs,

    /// An OCI image configuration (JSON) whose Env, WorkingDir, User, Entrypoint and Cmd apply
    /// as the defaults of a --rootfs sandbox (the command, --env, --workdir and the policy's
    /// run_as_user win).
    #[arg(long, value_name = "FILE", requires = "rootfs")]
    pub rootfs_config: Option<PathBuf>,

    /// Working directory inside the sandbox (default: the current directory; with --rootfs,
    /// the image's WorkingDir or /).
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,

    /// Set an environment variable for the workload (repeatable). The workload gets nothing else
    /// of this process's environment but TERM, LANG and LC_ALL.
    #[arg(long = "env", value_name = "KEY=VAL")]
    pub env: Vec<EnvVar>,

    /// Kill the sandbox after this many seconds and exit with status 124.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,

    /// After forwarding SIGTERM or SIGINT to the workload, kill the sandbox if the workload has
    /// not ended within this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub stop_grace: u64,

    /// Memory limit in MiB (at least 16), or `unlimited` (overrides the policy's
    /// resources.memory_mib; default 1024).
    #[arg(long, value_name = "MIB", value_parser = parse_memory_mib)]
    pub memory_mib: Option<Limit<u64>>,

    /// CPU limit in CPUs (> 0, <= 1024), or `unlimited` (overrides resources.cpus; default 1).
    #[arg(long, value_name = "CPUS", value_parser = parse_cpus)]
    pub cpus: Option<Limit<f64>>,

    /// Process limit (at least 1), or `unlimited` (overrides resources.pids; default 512).
    #[arg(long, value_name = "N", value_parser = parse_pids)]
    pub pids: Option<Limit<u64>>,

    /// Log filter: error, warn, info, debug, trace, or a tracing directive (default: warn, or
    /// RUST_LOG).
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Write logs to this file instead of stderr.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// Validate the policy, print the effective policy, and exit 0 (valid) or 1 (invalid).
    #[arg(long)]
    pub check_policy: bool,

    /// Serve SSH into the sandbox on this address (off unless given). Sessions, scp/sftp and
    /// `ssh -L` forwards run inside the sandbox with the workload's restrictions. Without a
    /// command the workload is `sleep infinity`: the sandbox lives until it is signalled or
    /// --timeout expires.
    #[arg(long, value_name = "ADDR")]
    pub ssh_listen: Option<std::net::SocketAddr>,

    /// Allow --ssh-listen on an address other than loopback (reachable from other hosts).
    #[arg(long)]
    pub dangerously_allow_ssh_on_non_loopback: bool,

    /// Ask about what `enforcement: ask` endpoints allow over HTTP on this address (off
    /// unless given; loopback only unless --dangerously-allow-approval-on-non-loopback):
    /// `GET /v1/approvals` lists the pending questions, `POST /v1/approvals/ID` with
    /// `{"answer": "allow-once" | "allow-always" | "deny"}` answers one. Without it, such
    /// connections are denied.
    #[arg(long, value_name = "ADDR")]
    pub approval_listen: Option<std::net::SocketAddr>,

    /// Allow --approval-listen on an address other than loopback (whoever reaches it can
    /// approve the sandbox's egress).
    #[arg(long, requires = "approval_listen")]
    pub dangerously_allow_approval_on_non_loopback: bool,

    /// Seconds a question waits for an answer; then the held connection is denied.
    #[arg(long, value_name = "SECS", default_value_t = 60, requires = "approval_listen",
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub approval_timeout: u64,

    /// The public keys allowed to log in (OpenSSH authorized_keys format, no options).
    /// Required with --ssh-listen.
    #[arg(long, value_name = "FILE")]
    pub ssh_authorized_keys: Option<PathBuf>,

    /// The SSH host key: created (ed25519, mode 0600) if missing, then kept, so known_hosts
    /// entries hold across restarts [default: $OPENSHELL_HOME/ssh_host_ed25519_key or
    /// ~/.local/share/openshell/ssh_host_ed25519_key].
    #[arg(long, value_name = "FILE")]
    pub ssh_host_key: Option<PathBuf>,

    /// Close an SSH connection after this many seconds without traffic (0: never).
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    pub ssh_idle_timeout: u64,

    /// The shell SSH sessions run inside the sandbox (`ssh host` and `ssh host COMMAND`).
    #[arg(long, value_name = "PATH", default_value = "/bin/sh")]
    pub ssh_shell: String,

    /// The sftp server program run inside the sandbox for sftp and scp (Debian's
    /// openssh-sftp-server); it must be readable and executable under the policy.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/usr/lib/openssh/sftp-server"
    )]
    pub ssh_sftp_server: String,

    /// The command to run, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

fn parse_memory_mib(s: &str) -> Result<Limit<u64>, String> {
    openshell_policy::resources::parse_memory_mib(s).map_err(|e| e.to_string())
}

fn parse_cpus(s: &str) -> Result<Limit<f64>, String> {
    openshell_policy::resources::parse_cpus(s).map_err(|e| e.to_string())
}

fn parse_pids(s: &str) -> Result<Limit<u64>, String> {
    openshell_policy::resources::parse_pids(s).map_err(|e| e.to_string())
}

fn parse_engine(s: &str) -> Result<openshell_runtime::VmEngine, String> {
    openshell_runtime::VmEngine::from_str(s)
}

fn parse_runtime(s: &str) -> Result<RuntimeKind, String> {
    RuntimeKind::from_str(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct EnvVar {
    pub key: String,
    pub value: String,
}

impl FromStr for EnvVar {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => Ok(EnvVar {
                key: k.to_owned(),
                value: v.to_owned(),
            }),
            _ => Err(format!("expected KEY=VAL, got {s:?}")),
        }
    }
}

//! Messages between the supervisor and its helpers: JSON, one message per line, over a Unix
//! stream socket that the helper finds at [`CONTROL_FD`].
//!
//! The supervisor writes first (a plan), the helper answers with progress reports. At any
//! moment only one helper process writes to the socket, so lines never interleave.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The control socket's descriptor number in a helper.
pub const CONTROL_FD: i32 = 3;
/// The read end of the lifeline pipe: it reaches end-of-file when the supervisor is gone.
pub const LIFELINE_FD: i32 = 4;
/// The helpers' end of the descriptor channel (see `channel`).
pub const FD_CHANNEL: i32 = 5;
/// An exec helper's pidfd of the sandbox's init, whose namespaces it joins.
pub const INIT_PIDFD: i32 = 6;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToHelper {
    /// Start a new sandbox (first message to a fresh namespace holder).
    Spawn(Box<SpawnPlan>),
    /// Run a command inside a running sandbox (first message to an exec helper).
    Exec(ExecPlan),
    /// Cgroup placement and the network are ready: init may start the workload.
    Go,
    /// Become the shim of one libkrun VM (first message to a krun shim; feature `krun`).
    KrunShim(KrunPlan),
    /// Build a jail's root, pivot into it and run one VMM program there (QEMU,
    /// vhost-device-vsock, virtiofsd with the VM's file tree; feature `vm`; see `vm::jail`).
    Jail(Box<JailPlan>),
}

/// One jailed VMM program: its root's host paths and its launch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JailPlan {
    /// An empty directory where the helper mounts the jail's root.
    pub root: PathBuf,
    /// Its stdout and stderr (opened by the helper, before the pivot).
    pub log: PathBuf,
    /// Host paths bound at the same path: (path, writable).
    pub paths: Vec<(PathBuf, bool)>,
    /// A guest file tree to build first and bind into the root (virtiofsd's).
    #[serde(default)]
    pub tree: Option<JailTree>,
    pub launch: LaunchPlan,
}

/// A guest file tree and where the jail has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailTree {
    pub tree: GuestTree,
    pub at: PathBuf,
}

/// One VM's file tree: the guest root with the policy's directories bind-mounted at their
/// paths, read-only where the policy says, served by a single virtiofsd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestTree {
    /// Where the helper mounts the guest root (in its own namespace): an empty directory that
    /// gets a tmpfs with `base`'s layout; or, with `root_view`, where the tree's writable view
    /// is mounted (`<box>/merged`).
    pub root: PathBuf,
    /// The default guest tree (directories, symlinks and the agent), without `root_view`.
    pub base: Option<PathBuf>,
    /// A root filesystem (an image tree): its per-sandbox writable view becomes the root.
    pub root_view: Option<RootPlan>,
    /// Parents before children.
    pub binds: Vec<FsBind>,
    /// The guest's boot requests, written to `vm_protocol::BOOT_REQUESTS` in the tree (on a
    /// read-only tmpfs of its own, so they never reach a disk), owned by `guest_root`.
    #[serde(default)]
    pub boot_requests: Option<Vec<u8>>,
    /// The host uid and gid guest root is on this tree (the VMM user's).
    pub guest_root: (u32, u32),
    /// The sandbox's CA bundle (a host file), bound read-only at `TRUST_BUNDLE_PATH` in the
    /// tree (created there in an image's writable view when the image has none).
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
}

/// One policy directory inside a [`GuestTree`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsBind {
    pub source: PathBuf,
    /// The absolute path inside the guest (the same as `source` for policy paths).
    pub guest_path: String,
    pub readonly: bool,
}

/// One libkrun VM, resolved by the supervisor (the krun engine's view of a `VmDescription`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KrunPlan {
    pub kernel: PathBuf,
    pub cmdline: String,
    /// virtio-fs devices; the root directory is the one tagged `root`.
    pub shares: Vec<KrunShare>,
    pub vsock: Vec<KrunPort>,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// With a root filesystem: the shim mounts the tree's writable view on the root share's
    /// path (`<box>/merged`) in its own mount namespace before configuring libkrun.
    #[serde(default)]
    pub root_view: Option<RootPlan>,
    /// The guest console and libkrun's own log.
    pub console: PathBuf,
    pub log: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KrunShare {
    pub tag: String,
    pub host_path: PathBuf,
    pub readonly: bool,
}

/// Guest vsock `port` ↔ host Unix socket `path`; `listen`: the host dials the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KrunPort {
    pub port: u32,
    pub path: PathBuf,
    pub listen: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpawnPlan {
    pub hostname: String,
    pub net: NetPlan,
    /// Per-hierarchy cgroup directories the namespace holder removes once init is gone.
    pub cgroup_dirs: Vec<PathBuf>,
    /// The per-sandbox directory (the supervisor's, empty): the view is mounted on it in
    /// init's own mount namespace; the holder removes it once init is gone.
    pub box_dir: PathBuf,
    /// Without a root filesystem: the view init builds from the policy and pivots into.
    pub view: super::view::ViewPlan,
    /// A root filesystem: init makes the writable view of the tree (in `box_dir`) and
    /// pivot_roots into it instead.
    pub root: Option<RootPlan>,
    /// The sandbox's CA bundle (a file in `box_dir`), bound read-only at
    /// `TRUST_BUNDLE_PATH` in the view or the root filesystem's view.
    #[serde(default)]
    pub trust_bundle: Option<PathBuf>,
    /// The workload's stdio is a PTY of this size (rows, columns), which init allocates in
    /// the sandbox's own devpts and whose master it hands over the descriptor channel.
    #[serde(default)]
    pub pty: Option<(u16, u16)>,
    pub launch: LaunchPlan,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootPlan {
    /// The tree (read only).
    pub lower: PathBuf,
    /// The per-sandbox directory (upper, work or copy, merged).
    pub box_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetPlan {
    /// Name of the sandbox side of the veth pair.
    pub ifname: String,
    pub address: std::net::Ipv4Addr,
    pub prefix_len: u8,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecPlan {
    /// As [`SpawnPlan::pty`], allocated by the exec helper once inside the sandbox.
    #[serde(default)]
    pub pty: Option<(u16, u16)>,
    /// The session's cgroup directories (one per hierarchy): the launched command joins
    /// them (`launch.join_cgroups` are their `cgroup.procs`), and whatever is left in them is
    /// killed when the command ends.
    #[serde(default)]
    pub session_cgroups: Vec<PathBuf>,
    pub launch: LaunchPlan,
}

/// What the last process before `execve` does: everything it needs, resolved by the supervisor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchPlan {
    pub program: String,
    /// Full argv, argv[0] included.
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// The workload's uid and gid (inside its user namespace when `userns` is set).
    pub uid: u32,
    pub gid: u32,
    /// Set when the workload asks for uid or gid 0: it then runs in a user namespace of its
    /// own, where those ids are mapped to these unprivileged host ids (never host root).
    #[serde(default)]
    pub userns: Option<UsernsMap>,
    /// Supplementary groups on the host (set before the user namespace; `[gid]` when empty
    /// and there is none).
    #[serde(default)]
    pub groups: Vec<u32>,
    /// Mount a fresh /proc (of the process's pid namespace) on `/proc` before restricting
    /// (a jail's program, which is pid 1 of a new pid namespace).
    #[serde(default)]
    pub fresh_proc: bool,
    /// Capabilities (a mask of capability numbers) kept through the privilege drop and the
    /// `execve`: only with `userns`, where they reach only the ids the namespace maps (a jailed
    /// virtiofsd's file-serving ones). 0 for everything else.
    #[serde(default)]
    pub keep_caps: u64,
    pub pty: bool,
    /// `cgroup.procs` files to join before restricting (exec into a running sandbox). The exec
    /// helper joins them itself, from the host's view, before it enters the sandbox (whose root
    /// may have no /sys), and hands on an empty list; the launch step joins whatever is left.
    pub join_cgroups: Vec<PathBuf>,
    pub landlock: LandlockPlan,
    /// The workload's seccomp filter, compiled by the supervisor; the launcher installs it.
    pub seccomp: super::seccomp::CompiledFilter,
    /// The filter notifies `connect` (see `unix_connect`): the process installs it with a
    /// listener and hands the listener to the supervisor over [`FD_CHANNEL`] before `execve`;
    /// if it cannot, it never runs.
    #[serde(default)]
    pub mediate_connect: bool,
    /// The filter notifies `connect`, `execve` and `execveat`, and the process that launches
    /// this one (the guest agent) records them (see `lineage`): the process installs the
    /// filter with a listener and hands it to its launcher before `execve`; if it cannot, it
    /// never runs.
    #[serde(default)]
    pub notify_launcher: bool,
}

/// The host ids a process's user namespace maps its uid and gid to (one id each), and the
/// further ids it maps to themselves (a jailed virtiofsd's: the workload's, which the guest's
/// requests carry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsernsMap {
    pub host_uid: u32,
    pub host_gid: u32,
    #[serde(default)]
    pub also_uids: Vec<u32>,
    #[serde(default)]
    pub also_gids: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LandlockPlan {
    pub read_only: Vec<PathBuf>,
    pub read_write: Vec<PathBuf>,
    /// `hard_requirement`: anything that cannot be enforced is an error.
    pub hard_requirement: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromHelper {
    /// The namespace holder forked init; this is init's pid on the host.
    InitPid { pid: i32 },
    /// init made the sandbox's writable root and pivot_rooted into it.
    RootReady(super::rootfs::RootMethod),
    /// init built the view from the policy and pivot_rooted into it; best_effort left these
    /// policy paths out, with the reason.
    ViewReady { skipped: Vec<(String, String)> },
    /// The workload's restrictions are in place; it is about to call execve.
    Restricted(RestrictionReport),
    /// execve succeeded.
    Running { pid: i32 },
    /// Setting up failed; the workload never started.
    Failed {
        stage: String,
        message: String,
        kind: FailureKind,
    },
    /// The workload ended.
    WorkloadExited(WaitReport),
    /// init ended (after the workload, or killed); the sandbox is gone and cleaned up.
    SandboxEnded(WaitReport),
    /// The krun shim is jailed and libkrun accepted the whole configuration; the VM starts next.
    KrunConfigured { pid: i32, jail: Vec<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitReport {
    Code(i32),
    Signal(i32),
}

/// What was enforced, for the supervisor's structured log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestrictionReport {
    /// Landlock ABI of the running kernel (0: none).
    pub landlock_abi: i32,
    /// "fully_enforced", "partially_enforced" or "not_enforced".
    pub landlock_status: String,
    /// Filesystem access rights handled by the ruleset.
    pub landlock_rights: Vec<String>,
    /// Policy paths that were skipped under best_effort, with the reason.
    pub landlock_skipped: Vec<(String, String)>,
    pub seccomp_rules: usize,
    pub no_new_privs: bool,
    pub uid: u32,
    pub gid: u32,
    /// The ids the process has on the host when it runs in a user namespace of its own.
    #[serde(default)]
    pub host_ids: Option<(u32, u32)>,
    /// Who decides `connect()` to a pathname UNIX socket: "supervisor" (see `unix_connect`),
    /// plus "landlock" where the kernel has a right for it; "vm" when the host's sockets
    /// cannot be reached at all (a VM's shares carry no host socket).
    #[serde(default)]
    pub unix_connect: String,
}

/// What a failed start means, carried as a type from the process that saw the failure (the
/// launcher, a helper, the guest agent) to the supervisor, so the exit status never depends
/// on the wording of a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The sandbox could not be set up (exit status 125).
    #[default]
    Sandbox,
    /// The program does not exist: execve failed with ENOENT (127, as a shell reports).
    NotFound,
    /// The program exists and could not be executed: execve failed otherwise (126).
    NotExecutable,
}

impl FailureKind {
    /// The kind of a failed execve, from its errno.
    pub fn of_exec(errno: nix::Error) -> Self {
        if errno == nix::Error::ENOENT {
            Self::NotFound
        } else {
            Self::NotExecutable
        }
    }

    /// The exit status a shell would report for it.
    pub fn exit_code(self) -> i32 {
        match self {
            Self::Sandbox => 125,
            Self::NotFound => 127,
            Self::NotExecutable => 126,
        }
    }
}

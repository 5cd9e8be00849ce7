//! The process backend: a Linux child in its own pid, mount, IPC, UTS and network namespaces,
//! restricted by a dropped identity, Landlock and seccomp, and limited by a cgroup.
//!
//! The supervisor side lives here; what runs inside the sandbox lives in [`child`]. See
//! `ARCHITECTURE.md` for the start-up sequence and the invariants.

pub mod cgroup;
pub mod channel;
pub mod child;
pub mod landlock;
pub mod net;
pub mod notify;
pub mod proc_events;
pub mod protocol;
pub mod rootfs;
pub mod seccomp;
pub(crate) mod sys;
pub mod unix_connect;
pub mod view;

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::unistd::{Group, User};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tracing::{debug, info, warn};

use crate::helper::HELPER_ARG;
use crate::{ExecConfig, ExitStatus, SpawnConfig, Stdio, StdioMode};
use openshell_policy::{LandlockCompatibility, Policy};
use protocol::{
    ExecPlan, FailureKind, FromHelper, LandlockPlan, LaunchPlan, NetPlan, RestrictionReport,
    SpawnPlan, ToHelper, WaitReport, CONTROL_FD, FD_CHANNEL, INIT_PIDFD, LIFELINE_FD,
};

/// Errors of the process backend.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("the process backend needs root (it creates namespaces, a veth pair and a cgroup)")]
    NeedsRoot,
    #[error("process.run_as_user: user {0:?} does not exist on this host")]
    NoSuchUser(String),
    #[error("process.run_as_group: group {0:?} does not exist on this host")]
    NoSuchGroup(String),
    #[error("user {name:?} does not exist in {}/etc/passwd", root.display())]
    NoSuchUserInRoot { name: String, root: PathBuf },
    #[error("group {name:?} does not exist in {}/etc/group", root.display())]
    NoSuchGroupInRoot { name: String, root: PathBuf },
    #[error(transparent)]
    RootFs(#[from] crate::rootfs::RootFsError),
    #[error("preparing the per-sandbox root directory {}", path.display())]
    RootDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("looking up user or group {name:?}")]
    Lookup {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("workdir {0}: must be an absolute path to an existing directory")]
    BadWorkdir(PathBuf),
    #[error(
        "workdir {0}: not in the sandbox: include_workdir is false and no filesystem_policy path \
         contains it"
    )]
    WorkdirNotInView(PathBuf),
    #[error("invalid {what}: contains a NUL byte")]
    Nul { what: &'static str },
    #[error("creating the sandbox cgroup")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("setting up the sandbox network")]
    Net(#[from] net::NetError),
    #[error("{op}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox setup failed at {stage}: {message}")]
    Setup {
        stage: String,
        message: String,
        /// The exit status a shell would report for this failure (127: not found, 126: not
        /// executable, 125: the sandbox itself failed).
        exit_code: i32,
    },
    #[error("attaching the egress proxy")]
    Egress(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the sandbox helper ended unexpectedly")]
    HelperLost,
    #[error("the process has already exited")]
    NotRunning,
    #[error("sending signal {signal}")]
    Signal {
        signal: i32,
        #[source]
        source: nix::Error,
    },
    #[error("the process has no terminal to resize")]
    NoTerminal,
    #[error("resizing the terminal")]
    Resize(#[source] nix::Error),
    #[error("connecting to 127.0.0.1:{port} inside the sandbox")]
    Connect {
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> ProcessError {
    move |source| ProcessError::Io { op, source }
}

/// The executable re-run as the helper. `/proc/self/exe` still works if the file is replaced.
pub(crate) fn helper_exe() -> PathBuf {
    std::env::var_os("OPENSHELL_HELPER_EXE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

/// The supervisor's end of a helper's control channel.
#[derive(Debug)]
pub(crate) struct Control {
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Control {
    pub(crate) async fn send(&mut self, msg: &ToHelper) -> Result<(), ProcessError> {
        let mut bytes = serde_json::to_vec(msg).map_err(|e| ProcessError::Io {
            op: "encoding a control message",
            source: e.into(),
        })?;
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .await
            .map_err(io("writing to the sandbox helper"))
    }

    /// The next message, or `None` once the helper has closed the channel. Cancel-safe.
    pub(crate) async fn recv(&mut self) -> Option<FromHelper> {
        loop {
            match self.lines.next_line().await {
                Ok(Some(line)) => match serde_json::from_str(&line) {
                    Ok(msg) => return Some(msg),
                    Err(e) => {
                        warn!(error = %e, "ignoring an unreadable message from the sandbox helper")
                    }
                },
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

/// A started helper process with its channels.
#[derive(Debug)]
pub(crate) struct Helper {
    pub(crate) child: tokio::process::Child,
    pub(crate) ctl: Control,
    /// The write end of the lifeline pipe; dropping it tells the helper the supervisor is gone.
    _lifeline: OwnedFd,
    stdio: Stdio,
    /// The supervisor's end of the descriptor channel (see `channel`), until taken.
    fds: Option<OwnedFd>,
}

#[cfg(feature = "vm")]
impl Helper {
    /// The helper's process, once its control socket is of no more use (it exec'd a daemon).
    pub(crate) fn into_child(self) -> tokio::process::Child {
        self.child
    }
}

fn stdio_for(
    mode: StdioMode,
) -> Result<
    (
        std::process::Stdio,
        std::process::Stdio,
        std::process::Stdio,
        Option<OwnedFd>,
    ),
    ProcessError,
> {
    use std::process::Stdio as S;
    Ok(match mode {
        StdioMode::Piped => (S::piped(), S::piped(), S::piped(), None),
        StdioMode::Null => (S::null(), S::null(), S::null(), None),
        // The helper allocates the PTY inside the sandbox (its own devpts) and hands the
        // master over the descriptor channel (close-on-exec on both sides, so no helper
        // started later keeps the slave open).
        StdioMode::Pty { .. } => (S::null(), S::null(), S::null(), None),
    })
}

/// Start the helper binary with the control socket at fd 3 and the lifeline at fd 4.
/// `unshare` is applied in the child just before execve.
pub(crate) fn start_helper(
    stdio: StdioMode,
    unshare: CloneFlags,
    init: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<Helper, ProcessError> {
    // An exec helper's own copy of init's pidfd (`INIT_PIDFD`), closed here once it is placed.
    let init = match init {
        Some(fd) => Some(
            fd.try_clone_to_owned()
                .map_err(io("duplicating init's pidfd"))?,
        ),
        None => None,
    };
    let (ours, theirs) = StdUnixStream::pair().map_err(io("creating the control socket"))?;
    let (fds_ours, fds_theirs) = channel::pair().map_err(|e| ProcessError::Io {
        op: "creating the descriptor channel",
        source: e.into(),
    })?;
    let (life_r, life_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ProcessError::Io {
            op: "creating the lifeline pipe",
            source: e.into(),
        })?;
    let (stdin, stdout, stderr, pty) = stdio_for(stdio)?;
    let mut cmd = tokio::process::Command::new(helper_exe());
    cmd.arg(HELPER_ARG)
        .env_clear()
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(false);
    let theirs_fd = theirs.as_raw_fd();
    let life_fd = life_r.as_raw_fd();
    let fds_fd = fds_theirs.as_raw_fd();
    let init_fd = init.as_ref().map(|fd| fd.as_raw_fd());
    sys::pre_exec(&mut cmd, move || {
        sys::place_fds(&[
            (theirs_fd, CONTROL_FD),
            (life_fd, LIFELINE_FD),
            (fds_fd, FD_CHANNEL),
        ])?;
        if let Some(fd) = init_fd {
            sys::place_fds(&[(fd, INIT_PIDFD)])?;
        }
        nix::unistd::setsid().map_err(std::io::Error::from)?;
        if !unshare.is_empty() {
            nix::sched::unshare(unshare).map_err(std::io::Error::from)?;
        }
        Ok(())
    });
    let mut child = cmd.spawn().map_err(io("starting the sandbox helper"))?;
    drop(theirs);
    drop(life_r);
    drop(fds_theirs);
    drop(init);
    ours.set_nonblocking(true)
        .map_err(io("configuring the control socket"))?;
    let stream = UnixStream::from_std(ours).map_err(io("registering the control socket"))?;
    let (r, w) = stream.into_split();
    let stdio = Stdio {
        stdin: child
            .stdin
            .take()
            .map(|s| Box::new(s) as crate::InputStream),
        stdout: child
            .stdout
            .take()
            .map(|s| Box::new(s) as crate::OutputStream),
        stderr: child
            .stderr
            .take()
            .map(|s| Box::new(s) as crate::OutputStream),
        pty,
    };
    Ok(Helper {
        child,
        ctl: Control {
            lines: BufReader::new(r).lines(),
            writer: w,
        },
        _lifeline: life_w,
        stdio,
        fds: Some(fds_ours),
    })
}

/// Serve a helper's descriptor channel until every holder of its other end is gone: each
/// workload's connect listener is served by `unix_connect` (with `mediator`); the first PTY
/// master goes to `pty`.
fn serve_channel(
    fds: OwnedFd,
    mediator: Arc<unix_connect::Mediator>,
    pty: tokio::sync::oneshot::Sender<OwnedFd>,
) -> Result<(), ProcessError> {
    let fds = sys::async_fd(fds, tokio::io::Interest::READABLE)
        .map_err(io("watching the descriptor channel"))?;
    tokio::spawn(async move {
        let mut pty = Some(pty);
        loop {
            let Ok(mut guard) = fds.readable().await else {
                return;
            };
            match channel::recv(guard.get_inner().as_fd()) {
                Ok(Some(channel::Passed::Listener(listener))) => {
                    tokio::spawn(unix_connect::serve(listener, mediator.clone()));
                }
                Ok(Some(channel::Passed::PtyMaster(master))) => {
                    if let Some(tx) = pty.take() {
                        let _ = tx.send(master);
                    }
                }
                Ok(None) => return,
                Err(nix::Error::EAGAIN) => guard.clear_ready(),
                Err(e) => {
                    warn!(sandbox = %mediator.sandbox, error = %e, "descriptor channel");
                    return;
                }
            }
        }
    });
    Ok(())
}

/// The name of the CA bundle's host copy in a sandbox's per-sandbox directory.
pub(crate) const TRUST_BUNDLE_FILE: &str = "ca-bundle.crt";

/// Write the sandbox's CA bundle into its per-sandbox directory (root's, never shared with
/// the sandbox as a directory), read-only for everyone; the view binds that file read-only
/// at `TRUST_BUNDLE_PATH`.
pub(crate) fn write_trust_bundle(box_dir: &Path, pem: &[u8]) -> std::io::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = box_dir.join(TRUST_BUNDLE_FILE);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    file.write_all(pem)?;
    file.sync_all()?;
    Ok(path)
}

/// The identity and restrictions every process in one sandbox gets.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    uid: u32,
    gid: u32,
    user: String,
    home: PathBuf,
    /// The workdir, when `include_workdir` makes it read-write (it is then in
    /// `landlock.read_write` too): a host path the view always binds, even `/tmp`.
    workdir_rw: Option<PathBuf>,
    pub(crate) landlock: LandlockPlan,
    /// The egress proxy's address inside the sandbox, when it has egress: every process
    /// launched there (the workload, `exec`, SSH sessions) gets the proxy variables.
    proxy: Option<String>,
    /// The sandbox has the egress proxy's CA bundle at `TRUST_BUNDLE_PATH`: every process
    /// launched there gets the trust variables.
    pub(crate) trust: bool,
    /// Every process launched with this identity has its `connect` calls carried out by the
    /// supervisor (see `unix_connect`).
    mediate_connect: bool,
    /// The sandbox's record of connects and execs, shared by every process launched with
    /// this identity and by the egress proxy.
    pub(crate) lineage: Arc<crate::lineage::Lineage>,
}

impl Identity {
    /// The file system view of a sandbox on the host's root: the policy's paths (this
    /// identity's Landlock plan, the workdir included), the policy's /tmp, a private /tmp and
    /// /dev/shm of at most `memory_mib`.
    pub(crate) fn view(&self, policy: &Policy, memory_mib: Option<u64>) -> view::ViewPlan {
        view::plan(
            &self.landlock.read_only,
            &self.landlock.read_write,
            self.workdir_rw.as_deref(),
            policy.filesystem.tmp,
            memory_mib,
            self.landlock.hard_requirement,
        )
    }

    /// Check that `workdir` exists in a view of the host's root: it is `/`, or a path below one
    /// the view binds.
    fn check_workdir_in_view(&self, policy: &Policy, workdir: &Path) -> Result<(), ProcessError> {
        let plan = self.view(policy, None);
        let visible = workdir == Path::new("/")
            || plan.host_root
            || plan.binds.iter().any(|b| workdir.starts_with(&b.path));
        match visible {
            true => Ok(()),
            false => Err(ProcessError::WorkdirNotInView(workdir.to_owned())),
        }
    }

    /// The identity for `config`'s workload and its launch plan, with the proxy variables
    /// pointing at `proxy_addr` when the sandbox has egress.
    /// `mediate_connect`: the supervisor carries out the workload's `connect` calls (the
    /// process backend; see `unix_connect`).
    pub(crate) fn for_workload(
        config: &SpawnConfig,
        proxy_addr: &str,
        mediate_connect: bool,
    ) -> Result<(Identity, LaunchPlan), ProcessError> {
        let mut identity =
            Identity::resolve(&config.policy, &config.workdir, config.root.as_ref())?;
        identity.mediate_connect = mediate_connect;
        if config.root.is_none() {
            identity.check_workdir_in_view(&config.policy, &config.workdir)?;
        }
        identity.trust = config.trust_bundle.is_some();
        if config.egress.is_some() {
            identity.proxy = Some(proxy_addr.to_owned());
            if mediate_connect {
                // The process backend learns forks and execs from the host's process events.
                let events = proc_events::ProcEvents::global().map_err(|e| ProcessError::Io {
                    op: "starting the process events reader (CONFIG_PROC_EVENTS, CAP_NET_ADMIN)",
                    source: std::io::Error::other(e),
                })?;
                identity.lineage = Arc::new(crate::lineage::Lineage::from_events(events));
            }
        }
        let launch = identity.launch(
            &config.program,
            &config.args,
            &config.env,
            &config.workdir,
            config.stdio,
            Vec::new(),
        )?;
        Ok((identity, launch))
    }

    /// The policy's user and group (else, with a root filesystem, the image's user; else
    /// `nobody`), looked up in the host's user database, or in the tree's `/etc/passwd` and
    /// `/etc/group` when the sandbox has its own root.
    pub(crate) fn resolve(
        policy: &Policy,
        workdir: &Path,
        root: Option<&crate::RootFs>,
    ) -> Result<Identity, ProcessError> {
        let (uid, gid, user_name, home) = match root {
            None => Self::host_user(policy)?,
            Some(root) => Self::tree_user(policy, root)?,
        };
        let fs = &policy.filesystem;
        let mut read_write: Vec<PathBuf> = fs
            .read_write
            .iter()
            .map(|p| p.as_path().to_owned())
            .collect();
        // `/` is never read-write, not even as the workdir (an image's default WorkingDir).
        if fs.include_workdir && workdir == Path::new("/") {
            info!(
                event = "sandbox.workdir_not_writable",
                "include_workdir: the workdir is /, which is never made read-write"
            );
        } else if fs.include_workdir {
            read_write.push(workdir.to_owned());
        }
        let workdir_rw =
            (fs.include_workdir && workdir != Path::new("/")).then(|| workdir.to_owned());
        Ok(Identity {
            uid,
            gid,
            user: user_name,
            home,
            workdir_rw,
            landlock: LandlockPlan {
                read_only: fs
                    .read_only
                    .iter()
                    .map(|p| p.as_path().to_owned())
                    .collect(),
                read_write,
                hard_requirement: policy.landlock.compatibility
                    == LandlockCompatibility::HardRequirement,
            },
            proxy: None,
            trust: false,
            mediate_connect: false,
            lineage: Arc::new(crate::lineage::Lineage::new()),
        })
    }

    fn host_user(policy: &Policy) -> Result<(u32, u32, String, PathBuf), ProcessError> {
        let user_name = policy
            .process
            .run_as_user
            .clone()
            .unwrap_or_else(|| "nobody".to_owned());
        let user = User::from_name(&user_name)
            .map_err(|source| ProcessError::Lookup {
                name: user_name.clone(),
                source,
            })?
            .ok_or_else(|| ProcessError::NoSuchUser(user_name.clone()))?;
        let gid = match &policy.process.run_as_group {
            Some(name) => {
                Group::from_name(name)
                    .map_err(|source| ProcessError::Lookup {
                        name: name.clone(),
                        source,
                    })?
                    .ok_or_else(|| ProcessError::NoSuchGroup(name.clone()))?
                    .gid
            }
            None => user.gid,
        };
        Ok((user.uid.as_raw(), gid.as_raw(), user.name, user.dir))
    }

    /// The user inside a root filesystem. Names are the tree's, never the host's. A numeric
    /// uid without a passwd entry runs with gid 65534 and HOME=/; the implicit default
    /// `nobody`, when the tree lacks it, is 65534:65534.
    fn tree_user(
        policy: &Policy,
        root: &crate::RootFs,
    ) -> Result<(u32, u32, String, PathBuf), ProcessError> {
        use crate::rootfs::{parse_group, parse_passwd, RootFsError};
        const NOBODY: u32 = 65534;
        let read = |path: &'static str| match rootfs::read_in_tree(&root.lower, path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(source) => Err(RootFsError::Read {
                root: root.lower.clone(),
                path,
                source,
            }),
        };
        let passwd = parse_passwd(&root.lower, &read("/etc/passwd")?)?;
        let groups = parse_group(&root.lower, &read("/etc/group")?)?;
        let (spec, implicit) = match (&policy.process.run_as_user, &root.user) {
            (Some(user), _) => (user.clone(), false),
            (None, Some(image_user)) => (image_user.clone(), false),
            (None, None) => ("nobody".to_owned(), true),
        };
        let (user_part, image_group) = match spec.split_once(':') {
            Some((u, g)) => (u.to_owned(), Some(g.to_owned())),
            None => (spec.clone(), None),
        };
        let no_user = || ProcessError::NoSuchUserInRoot {
            name: user_part.clone(),
            root: root.lower.clone(),
        };
        let (uid, mut gid, name, home) = if let Ok(uid) = user_part.parse::<u32>() {
            match passwd.iter().find(|e| e.uid == uid) {
                Some(e) => (e.uid, e.gid, e.name.clone(), e.home.clone()),
                None => (uid, NOBODY, user_part.clone(), PathBuf::from("/")),
            }
        } else {
            match passwd.iter().find(|e| e.name == user_part) {
                Some(e) => (e.uid, e.gid, e.name.clone(), e.home.clone()),
                None if implicit => (NOBODY, NOBODY, user_part.clone(), PathBuf::from("/")),
                None => return Err(no_user()),
            }
        };
        // The policy's group wins over the image's `user:group`.
        let group =
            policy
                .process
                .run_as_group
                .clone()
                .or(if policy.process.run_as_user.is_none() {
                    image_group
                } else {
                    None
                });
        if let Some(group) = group {
            gid = match group.parse::<u32>() {
                Ok(g) => g,
                Err(_) => groups
                    .iter()
                    .find(|(n, _)| *n == group)
                    .map(|(_, g)| *g)
                    .ok_or_else(|| ProcessError::NoSuchGroupInRoot {
                        name: group.clone(),
                        root: root.lower.clone(),
                    })?,
            };
        }
        Ok((uid, gid, name, home))
    }

    /// uid or gid 0 is never the host's: such a workload runs in a user namespace of its
    /// own, where 0 is mapped to the unprivileged `nobody`/`nogroup` ids (65534) and any other
    /// id to itself.
    fn userns(&self) -> Option<protocol::UsernsMap> {
        const NOBODY: u32 = 65534;
        let host = |id: u32| if id == 0 { NOBODY } else { id };
        (self.uid == 0 || self.gid == 0).then(|| protocol::UsernsMap {
            host_uid: host(self.uid),
            host_gid: host(self.gid),
            also_uids: Vec::new(),
            also_gids: Vec::new(),
        })
    }

    /// The seccomp filter of this identity's processes: `connect` notified on both backends,
    /// `execve` and `execveat` too in the guest (see `lineage`).
    fn filter(&self) -> Result<seccomp::CompiledFilter, ProcessError> {
        let base = seccomp::compiled()?;
        Ok(match self.mediate_connect {
            true => seccomp::with_connect_notified(base),
            false => seccomp::with_lineage_notified(base),
        })
    }

    /// The uid and gid this identity's processes have as the kernel that runs them sees them
    /// (the host's, or the guest's in a VM): 65534 for 0.
    pub(crate) fn kernel_ids(&self) -> (u32, u32) {
        match self.userns() {
            Some(map) => (map.host_uid, map.host_gid),
            None => (self.uid, self.gid),
        }
    }

    /// What the connect mediation needs to act as this identity's processes.
    pub(crate) fn mediator(&self, sandbox: &str) -> unix_connect::Mediator {
        let (uid, gid) = self.kernel_ids();
        let groups = if self.userns().is_some() {
            Vec::new()
        } else {
            vec![self.gid]
        };
        let mut listed = std::collections::HashSet::new();
        for path in self
            .landlock
            .read_only
            .iter()
            .chain(&self.landlock.read_write)
        {
            if let Ok(st) = view::open_host(path).and_then(|fd| nix::sys::stat::fstat(&fd)) {
                if st.st_mode & libc::S_IFMT == libc::S_IFSOCK {
                    listed.insert((st.st_dev, st.st_ino));
                }
            }
        }
        unix_connect::Mediator {
            sandbox: sandbox.to_owned(),
            lineage: self.lineage.clone(),
            proxy: crate::PROXY_ADDR,
            uid,
            gid,
            groups,
            listed,
        }
    }

    pub(crate) fn launch(
        &self,
        program: &str,
        args: &[String],
        env: &BTreeMap<String, String>,
        workdir: &Path,
        stdio: StdioMode,
        join_cgroups: Vec<PathBuf>,
    ) -> Result<LaunchPlan, ProcessError> {
        if !workdir.is_absolute() {
            return Err(ProcessError::BadWorkdir(workdir.to_owned()));
        }
        let mut full_env = env.clone();
        if let Some(addr) = &self.proxy {
            crate::add_proxy_env(&mut full_env, addr);
        }
        if self.trust {
            crate::add_trust_env(&mut full_env);
        }
        let defaults = [
            (
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ),
            ("HOME", self.home.display().to_string()),
            ("USER", self.user.clone()),
            ("LOGNAME", self.user.clone()),
        ];
        for (k, v) in defaults {
            full_env.entry(k.to_owned()).or_insert(v);
        }
        let mut argv = Vec::with_capacity(args.len() + 1);
        argv.push(program.to_owned());
        argv.extend(args.iter().cloned());
        for s in argv.iter().chain(full_env.keys()).chain(full_env.values()) {
            if s.contains('\0') {
                return Err(ProcessError::Nul {
                    what: "argument or environment",
                });
            }
        }
        Ok(LaunchPlan {
            program: program.to_owned(),
            argv,
            env: full_env.into_iter().collect(),
            cwd: workdir.to_owned(),
            uid: self.uid,
            gid: self.gid,
            userns: self.userns(),
            groups: Vec::new(),
            fresh_proc: false,
            keep_caps: 0,
            pty: matches!(stdio, StdioMode::Pty { .. }),
            join_cgroups,
            landlock: self.landlock.clone(),
            seccomp: self.filter()?,
            mediate_connect: self.mediate_connect,
            notify_launcher: !self.mediate_connect,
        })
    }
}

/// The error of a start that failed at `stage`, with the exit status its typed `kind` means.
pub(crate) fn setup_error(stage: String, message: String, kind: FailureKind) -> ProcessError {
    ProcessError::Setup {
        stage,
        message,
        exit_code: kind.exit_code(),
    }
}

/// Log what was enforced (one structured event per process launched).
pub(crate) fn log_restrictions(sandbox: &str, r: &RestrictionReport) {
    let rights = r.landlock_rights.join(",");
    // The ids the process has on the host ("-" when they are its own: no user namespace).
    let host_ids = match r.host_ids {
        Some((uid, gid)) => format!("{uid}:{gid}"),
        None => "-".to_owned(),
    };
    if r.landlock_status == "fully_enforced" {
        info!(
            event = "sandbox.restricted",
            sandbox,
            landlock_abi = r.landlock_abi,
            landlock_status = %r.landlock_status,
            landlock_rights = %rights,
            seccomp_rules = r.seccomp_rules,
            no_new_privs = r.no_new_privs,
            uid = r.uid,
            gid = r.gid,
            userns_host_ids = %host_ids,
            unix_connect = %r.unix_connect,
            "restrictions applied"
        );
    } else {
        warn!(
            event = "sandbox.restricted",
            sandbox,
            landlock_abi = r.landlock_abi,
            landlock_status = %r.landlock_status,
            landlock_rights = %rights,
            seccomp_rules = r.seccomp_rules,
            no_new_privs = r.no_new_privs,
            uid = r.uid,
            gid = r.gid,
            userns_host_ids = %host_ids,
            unix_connect = %r.unix_connect,
            "landlock is not fully enforced (compatibility: best_effort)"
        );
    }
    for (path, reason) in &r.landlock_skipped {
        warn!(event = "sandbox.landlock_skipped", sandbox, path = %path, reason = %reason,
              "policy path skipped (compatibility: best_effort)");
    }
}

/// Log how the sandbox's writable root was made (a copy is a weakened start-up, not a weakened
/// isolation: the tree stays untouched either way).
pub(crate) fn log_root(sandbox: &str, method: &rootfs::RootMethod) {
    match method {
        rootfs::RootMethod::Overlay => {
            info!(
                event = "sandbox.rootfs",
                sandbox,
                method = "overlay",
                "root filesystem ready"
            )
        }
        rootfs::RootMethod::Copy { reason } => warn!(
            event = "sandbox.rootfs",
            sandbox,
            method = "copy",
            %reason,
            "overlayfs unavailable: the sandbox runs on a per-sandbox copy of the tree"
        ),
    }
}

/// Wait for `Running` (after an optional `Restricted`), or fail.
async fn await_running(ctl: &mut Control, sandbox: &str) -> Result<i32, ProcessError> {
    loop {
        match ctl.recv().await {
            Some(FromHelper::Restricted(report)) => log_restrictions(sandbox, &report),
            Some(FromHelper::RootReady(method)) => log_root(sandbox, &method),
            Some(FromHelper::ViewReady { skipped }) => {
                for (path, reason) in skipped {
                    warn!(event = "sandbox.path_skipped", sandbox, %path, %reason,
                          "policy path left out of the sandbox (compatibility: best_effort)");
                }
            }
            Some(FromHelper::Running { pid }) => return Ok(pid),
            Some(FromHelper::Failed {
                stage,
                message,
                kind,
            }) => return Err(setup_error(stage, message, kind)),
            Some(other) => debug!(?other, "unexpected message while starting"),
            None => return Err(ProcessError::HelperLost),
        }
    }
}

fn procs_files(cgroup: &Option<cgroup::Cgroup>) -> Vec<PathBuf> {
    cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default()
}

/// Host pids of the processes in `init_pid`'s pid namespace (init included).
fn pidns_members(init_pid: i32) -> Vec<i32> {
    let Ok(ns) = std::fs::read_link(format!("/proc/{init_pid}/ns/pid")) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|l| l == ns))
        .collect()
}

/// The pids listed in the first readable `cgroup.procs` file.
fn read_pids(procs: &[PathBuf]) -> Vec<i32> {
    procs
        .iter()
        .find_map(|p| cgroup::pids_below(p).ok())
        .unwrap_or_default()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A sandbox id unique on this host while the supervisor lives: its pid and a counter, in hex
/// (stale-state collection parses the pid back out).
pub(crate) fn new_sandbox_id() -> String {
    format!(
        "{:x}-{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A workload running in a process sandbox.
#[derive(Debug)]
pub struct ProcessSandbox {
    id: String,
    holder: Helper,
    init_pid: i32,
    init_pidfd: OwnedFd,
    cgroup: Option<cgroup::Cgroup>,
    edge: Arc<net::EdgeNamespace>,
    /// Keeps the proxy serving this sandbox.
    _egress: Option<crate::EgressGuard>,
    identity: Identity,
    /// A duplicate of the workload's PTY master (for resizing after the caller took it).
    pty: Option<OwnedFd>,
    workload_status: Option<WaitReport>,
    status: Option<ExitStatus>,
}

impl ProcessSandbox {
    /// Create the sandbox and start the workload. Returns once the workload has exec'd under its
    /// restrictions, or with the reason it never started.
    pub async fn spawn(config: SpawnConfig) -> Result<ProcessSandbox, ProcessError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(ProcessError::NeedsRoot);
        }
        // With a root filesystem the workdir is a path inside the tree; init's chdir checks it.
        let on_host = config.root.is_none();
        if !config.workdir.is_absolute() || (on_host && !config.workdir.is_dir()) {
            return Err(ProcessError::BadWorkdir(config.workdir.clone()));
        }
        if let Some(root) = &config.root {
            crate::rootfs::validate_lower(&root.lower)?;
        }
        let (identity, launch) =
            Identity::for_workload(&config, &crate::PROXY_ADDR.to_string(), true)?;
        let id = new_sandbox_id();
        let run = rootfs::process_run_dir();
        rootfs::collect_stale(&run);
        let box_dir = run.join(&id);
        std::fs::create_dir_all(&box_dir).map_err(|source| ProcessError::RootDir {
            path: box_dir.clone(),
            source,
        })?;
        let root = config.root.as_ref().map(|root| protocol::RootPlan {
            lower: root.lower.clone(),
            box_dir: box_dir.clone(),
        });
        let view = identity.view(&config.policy, config.resources.memory_mib.max());
        let trust_bundle = match &config.trust_bundle {
            Some(pem) => match write_trust_bundle(&box_dir, pem) {
                Ok(path) => Some(path),
                Err(source) => {
                    let _ = std::fs::remove_dir_all(&box_dir);
                    return Err(ProcessError::RootDir {
                        path: box_dir.join(TRUST_BUNDLE_FILE),
                        source,
                    });
                }
            },
            None => None,
        };
        // Every policy gets limits (defaults for what it leaves out), so there is a cgroup
        // unless the policy made every resource `unlimited`: then, no cgroup, since on cgroup
        // v1 hosts moving a process into one costs an RCU grace period (about 10 ms here), and
        // the pid namespace already bounds the sandbox's lifetime.
        let r = &config.resources;
        let remove_root = |_: &Option<protocol::RootPlan>| {
            let _ = std::fs::remove_dir_all(&box_dir);
        };
        let cgroup = if r.any_limited() {
            match cgroup::Cgroup::create(&id, &config.resources) {
                Ok(c) => Some(c),
                Err(e) => {
                    remove_root(&root);
                    return Err(e.into());
                }
            }
        } else {
            None
        };
        let dirs = (box_dir.clone(), view, root.clone(), trust_bundle);
        match Self::start(id.clone(), config, identity, launch, cgroup, dirs).await {
            Ok(sandbox) => Ok(sandbox),
            Err((e, cgroup)) => {
                if let Some(cgroup) = cgroup {
                    cgroup.remove(Duration::from_secs(2));
                }
                remove_root(&root);
                Err(e)
            }
        }
    }

    async fn start(
        id: String,
        config: SpawnConfig,
        identity: Identity,
        launch: LaunchPlan,
        cgroup: Option<cgroup::Cgroup>,
        (box_dir, view, root, trust_bundle): (
            PathBuf,
            view::ViewPlan,
            Option<protocol::RootPlan>,
            Option<PathBuf>,
        ),
    ) -> Result<ProcessSandbox, (ProcessError, Option<cgroup::Cgroup>)> {
        // init makes its own mount namespace (see `child::init_main`); the holder keeps the
        // host's, which it needs to remove the per-sandbox directory.
        let flags = CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWPID;
        let mut holder = match start_helper(config.stdio, flags, None) {
            Ok(h) => h,
            Err(e) => return Err((e, cgroup)),
        };
        debug!(sandbox = %id, "holder started");
        let (pty_tx, pty_rx) = tokio::sync::oneshot::channel();
        let mediator = Arc::new(identity.mediator(&id));
        if let Some(fds) = holder.fds.take() {
            if let Err(e) = serve_channel(fds, mediator, pty_tx) {
                let _ = holder.child.start_kill();
                let _ = holder.child.wait().await;
                return Err((e, cgroup));
            }
        }
        let pty_size = match config.stdio {
            StdioMode::Pty { rows, cols } => Some((rows, cols)),
            _ => None,
        };
        let plan = SpawnPlan {
            hostname: config.hostname.clone(),
            net: NetPlan {
                ifname: net::SANDBOX_IF.to_owned(),
                address: net::SANDBOX_ADDR,
                prefix_len: net::PREFIX_LEN,
            },
            cgroup_dirs: cgroup.as_ref().map(|c| c.dirs.clone()).unwrap_or_default(),
            box_dir,
            view,
            root,
            trust_bundle,
            pty: pty_size,
            launch,
        };
        // From here on the holder owns the cgroup's removal; on failure we kill it and wait, so
        // the cgroup is gone when this returns.
        let result = async {
            holder.ctl.send(&ToHelper::Spawn(Box::new(plan))).await?;
            let init_pid = match holder.ctl.recv().await {
                Some(FromHelper::InitPid { pid }) => pid,
                Some(FromHelper::Failed {
                    stage,
                    message,
                    kind,
                }) => return Err(setup_error(stage, message, kind)),
                _ => return Err(ProcessError::HelperLost),
            };
            debug!(sandbox = %id, init_pid, "init forked");
            let init_pidfd =
                sys::pidfd_open(nix::unistd::Pid::from_raw(init_pid)).map_err(|e| {
                    ProcessError::Io {
                        op: "opening a pidfd for the sandbox init",
                        source: e.into(),
                    }
                })?;
            // Both steps cost a kernel-wide synchronisation (cgroup v1 migration, namespace
            // device registration): run them side by side.
            let dirs = procs_files(&cgroup);
            let add = tokio::task::spawn_blocking(move || cgroup::add_to(&dirs, init_pid));
            let (added, edge) = tokio::join!(add, net::EdgeNamespace::create(init_pid));
            added.map_err(|_| ProcessError::HelperLost)??;
            let edge = edge?;
            debug!(sandbox = %id, "cgroup and network ready");
            let egress = match &config.egress {
                Some(egress) => {
                    let listener = edge.bind_tcp(crate::PROXY_ADDR).await?;
                    let procs = procs_files(&cgroup);
                    let members = Arc::new(move || {
                        if procs.is_empty() {
                            pidns_members(init_pid)
                        } else {
                            read_pids(&procs)
                        }
                    });
                    let attachment = crate::EgressAttachment {
                        sandbox_id: id.clone(),
                        listener: crate::EgressListener::Tcp {
                            listener,
                            init_pid,
                            members,
                            lineage: identity.lineage.clone(),
                            writable: identity.landlock.read_write.clone(),
                        },
                    };
                    Some(egress.attach(attachment).map_err(ProcessError::Egress)?)
                }
                None => None,
            };
            holder.ctl.send(&ToHelper::Go).await?;
            debug!(sandbox = %id, "go sent");
            let _workload = await_running(&mut holder.ctl, &id).await?;
            // init handed the terminal's master over before it launched the workload; a
            // duplicate stays here for resizes.
            let mut pty = None;
            if pty_size.is_some() {
                let master = pty_rx.await.map_err(|_| ProcessError::HelperLost)?;
                pty = Some(master.try_clone().map_err(io("duplicating the terminal"))?);
                holder.stdio.pty = Some(master);
            }
            Ok((init_pid, init_pidfd, edge, egress, pty))
        }
        .await;
        match result {
            Ok((init_pid, init_pidfd, edge, egress, pty)) => {
                info!(event = "sandbox.started", sandbox = %id, runtime = "process", init_pid,
                      program = %config.program, "workload started");
                Ok(ProcessSandbox {
                    id,
                    holder,
                    init_pid,
                    init_pidfd,
                    cgroup,
                    edge: Arc::new(edge),
                    _egress: egress,
                    identity,
                    pty,
                    workload_status: None,
                    status: None,
                })
            }
            Err(e) => {
                let _ = holder.child.start_kill();
                let _ = holder.child.wait().await;
                Err((e, cgroup))
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The sandbox init's pid on the host.
    pub fn init_pid(&self) -> i32 {
        self.init_pid
    }

    /// The per-sandbox edge network namespace (where the egress proxy listens).
    pub fn edge(&self) -> Arc<net::EdgeNamespace> {
        self.edge.clone()
    }

    pub fn take_stdio(&mut self) -> Stdio {
        std::mem::take(&mut self.holder.stdio)
    }

    /// Wait for the workload to end and the sandbox to be torn down. Cancel-safe.
    pub async fn wait(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let mut ended = None;
        while let Some(msg) = self.holder.ctl.recv().await {
            match msg {
                FromHelper::WorkloadExited(r) => self.workload_status = Some(r),
                FromHelper::SandboxEnded(r) => {
                    ended = Some(r);
                    break;
                }
                FromHelper::Failed { stage, message, .. } => {
                    warn!(sandbox = %self.id, %stage, %message, "sandbox teardown problem")
                }
                other => debug!(?other, "unexpected message"),
            }
        }
        let _ = self.holder.child.wait().await;
        // The holder removes the cgroup; this only matters if the holder itself was killed.
        if let Some(cgroup) = &self.cgroup {
            cgroup.remove(Duration::from_millis(500));
        }
        let report = self
            .workload_status
            .or(ended)
            .unwrap_or(WaitReport::Signal(libc::SIGKILL));
        let status = match report {
            WaitReport::Code(c) => ExitStatus::Code(c),
            WaitReport::Signal(s) => ExitStatus::Signaled(s),
        };
        info!(event = "sandbox.exited", sandbox = %self.id, %status, "workload ended");
        self.status = Some(status);
        Ok(status)
    }

    /// Send `signal` to the workload (through init, which forwards it). Never blocks.
    pub fn signal(&self, signal: i32) -> Result<(), ProcessError> {
        if self.status.is_some() {
            return Err(ProcessError::NotRunning);
        }
        sys::pidfd_send_signal(self.init_pidfd.as_fd(), signal)
            .map_err(|source| ProcessError::Signal { signal, source })
    }

    /// Set the terminal size of a workload started with a PTY.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ProcessError> {
        let pty = self.pty.as_ref().ok_or(ProcessError::NoTerminal)?;
        sys::set_window_size(pty.as_fd(), rows, cols).map_err(ProcessError::Resize)
    }

    /// Kill init, and with it every process in the sandbox. Never blocks.
    pub fn kill(&self) -> Result<(), ProcessError> {
        match sys::pidfd_send_signal(self.init_pidfd.as_fd(), libc::SIGKILL) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(source) => Err(ProcessError::Signal {
                signal: libc::SIGKILL,
                source,
            }),
        }
    }

    /// Run another command in this sandbox with the workload's namespaces, cgroup, identity and
    /// restrictions.
    pub async fn exec(&self, config: ExecConfig) -> Result<ProcessExec, ProcessError> {
        if self.status.is_some() {
            return Err(ProcessError::NotRunning);
        }
        exec_in(
            &self.id,
            self.init_pidfd.as_fd(),
            &self.identity,
            procs_files(&self.cgroup),
            config,
        )
        .await
    }

    /// A cheap, cloneable handle that can exec into this sandbox and connect to its ports while
    /// the owner of this value waits for it.
    pub fn handle(&self) -> Result<ProcessHandle, ProcessError> {
        let init_pidfd = self
            .init_pidfd
            .try_clone()
            .map_err(io("duplicating the sandbox init's pidfd"))?;
        Ok(ProcessHandle {
            inner: Arc::new(HandleInner {
                id: self.id.clone(),
                init_pidfd,
                identity: self.identity.clone(),
                procs: procs_files(&self.cgroup),
            }),
        })
    }
}

/// What exec and port connections into a running process sandbox need. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct ProcessHandle {
    inner: Arc<HandleInner>,
}

#[derive(Debug)]
struct HandleInner {
    id: String,
    /// Identifies the sandbox's init without a pid race: signal 0 tells whether it still runs,
    /// and `setns` through it enters the sandbox's network namespace.
    init_pidfd: OwnedFd,
    identity: Identity,
    procs: Vec<PathBuf>,
}

impl ProcessHandle {
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    fn check_running(&self) -> Result<(), ProcessError> {
        match sys::pidfd_send_signal(self.inner.init_pidfd.as_fd(), 0) {
            Ok(()) => Ok(()),
            Err(_) => Err(ProcessError::NotRunning),
        }
    }

    /// Run a command in the sandbox, like [`ProcessSandbox::exec`].
    pub async fn exec(&self, config: ExecConfig) -> Result<ProcessExec, ProcessError> {
        self.check_running()?;
        let i = &self.inner;
        exec_in(
            &i.id,
            i.init_pidfd.as_fd(),
            &i.identity,
            i.procs.clone(),
            config,
        )
        .await
    }

    /// Connect to `127.0.0.1:port` inside the sandbox's network namespace. The socket is made
    /// on a dedicated thread that enters the namespace and ends afterwards, so no pooled thread
    /// is ever left inside it. Nothing outside the sandbox's loopback can be reached this way.
    pub async fn connect_tcp(&self, port: u16) -> Result<tokio::net::TcpStream, ProcessError> {
        self.check_running()?;
        let ns = self
            .inner
            .init_pidfd
            .try_clone()
            .map_err(io("duplicating the sandbox init's pidfd"))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("openshell-forward".into())
            .spawn(move || {
                let result = nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|e| ProcessError::Io {
                        op: "entering the sandbox's network namespace",
                        source: e.into(),
                    })
                    .and_then(|()| {
                        let addr =
                            std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
                        let stream = std::net::TcpStream::connect(addr)
                            .map_err(|source| ProcessError::Connect { port, source })?;
                        stream
                            .set_nonblocking(true)
                            .map_err(io("configuring the forwarded connection"))?;
                        Ok(stream)
                    });
                let _ = tx.send(result);
            })
            .map_err(io("starting the forward thread"))?;
        let stream = rx.await.map_err(|_| ProcessError::HelperLost)??;
        tokio::net::TcpStream::from_std(stream).map_err(io("registering the forwarded connection"))
    }
}

/// Start `config` inside the sandbox whose init is `init_pid`.
async fn exec_in(
    id: &str,
    init: std::os::fd::BorrowedFd<'_>,
    identity: &Identity,
    procs: Vec<PathBuf>,
    config: ExecConfig,
) -> Result<ProcessExec, ProcessError> {
    {
        // The session's own cgroup below the sandbox's (see `cgroup::Cgroup::session`).
        static SESSIONS: AtomicU32 = AtomicU32::new(0);
        let name = SESSIONS.fetch_add(1, Ordering::Relaxed).to_string();
        let mut session_cgroups = Vec::new();
        for file in &procs {
            let Some(dir) = file.parent() else { continue };
            let sub = dir.join(format!("session-{name}"));
            if let Err(source) = std::fs::create_dir(&sub) {
                cgroup::remove_dirs(&session_cgroups, Duration::ZERO);
                return Err(ProcessError::Io {
                    op: "creating the session's cgroup",
                    source,
                });
            }
            session_cgroups.push(sub);
        }
        let session = SessionCgroups(session_cgroups.clone());
        let join = session_cgroups
            .iter()
            .map(|d| d.join("cgroup.procs"))
            .collect();
        let launch = identity.launch(
            &config.program,
            &config.args,
            &config.env,
            &config.workdir,
            config.stdio,
            join,
        )?;
        let mut helper = start_helper(config.stdio, CloneFlags::empty(), Some(init))?;
        let (pty_tx, pty_rx) = tokio::sync::oneshot::channel();
        if let Some(fds) = helper.fds.take() {
            serve_channel(fds, Arc::new(identity.mediator(id)), pty_tx)?;
        }
        let pty_size = match config.stdio {
            StdioMode::Pty { rows, cols } => Some((rows, cols)),
            _ => None,
        };
        let plan = ExecPlan {
            pty: pty_size,
            session_cgroups,
            launch,
        };
        let mut pty = None;
        let started = async {
            helper.ctl.send(&ToHelper::Exec(plan)).await?;
            let pid = await_running(&mut helper.ctl, id).await?;
            if pty_size.is_some() {
                let master = pty_rx.await.map_err(|_| ProcessError::HelperLost)?;
                pty = Some(master.try_clone().map_err(io("duplicating the terminal"))?);
                helper.stdio.pty = Some(master);
            }
            // A command that already ended has no pidfd; signals then report NotRunning.
            match sys::pidfd_open(nix::unistd::Pid::from_raw(pid)) {
                Ok(fd) => Ok(Some(fd)),
                Err(nix::Error::ESRCH) => Ok(None),
                Err(e) => Err(ProcessError::Io {
                    op: "opening a pidfd for the exec'd process",
                    source: e.into(),
                }),
            }
        }
        .await;
        match started {
            Ok(pidfd) => {
                info!(event = "sandbox.exec", sandbox = %id, program = %config.program, "command started in the sandbox");
                Ok(ProcessExec {
                    helper,
                    pidfd,
                    pty,
                    status: None,
                    _session: session,
                })
            }
            Err(e) => {
                let _ = helper.child.start_kill();
                let _ = helper.child.wait().await;
                Err(e)
            }
        }
    }
}

/// A command started inside a running process sandbox.
#[derive(Debug)]
pub struct ProcessExec {
    helper: Helper,
    pidfd: Option<OwnedFd>,
    /// A duplicate of the PTY master (for resizing after the caller took the terminal).
    pty: Option<OwnedFd>,
    status: Option<ExitStatus>,
    /// Removed (and emptied, should the helper have been killed before it did) when dropped.
    _session: SessionCgroups,
}

/// A session's cgroup directories; dropping the value kills what is left in them and removes
/// them, so nothing a session started outlives it.
#[derive(Debug)]
struct SessionCgroups(Vec<PathBuf>);

impl Drop for SessionCgroups {
    fn drop(&mut self) {
        cgroup::remove_dirs(&self.0, Duration::from_millis(200));
    }
}

impl ProcessExec {
    pub fn take_stdio(&mut self) -> Stdio {
        std::mem::take(&mut self.helper.stdio)
    }

    pub async fn wait(&mut self) -> Result<ExitStatus, ProcessError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let mut report = None;
        while let Some(msg) = self.helper.ctl.recv().await {
            if let FromHelper::WorkloadExited(r) = msg {
                report = Some(r);
                break;
            }
        }
        let _ = self.helper.child.wait().await;
        let status = match report {
            Some(WaitReport::Code(c)) => ExitStatus::Code(c),
            Some(WaitReport::Signal(s)) => ExitStatus::Signaled(s),
            None => ExitStatus::Signaled(libc::SIGKILL),
        };
        self.status = Some(status);
        Ok(status)
    }

    pub fn signal(&self, signal: i32) -> Result<(), ProcessError> {
        let (None, Some(pidfd)) = (self.status, &self.pidfd) else {
            return Err(ProcessError::NotRunning);
        };
        sys::pidfd_send_signal(pidfd.as_fd(), signal)
            .map_err(|source| ProcessError::Signal { signal, source })
    }

    /// Set the terminal size of a command started with a PTY.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ProcessError> {
        let pty = self.pty.as_ref().ok_or(ProcessError::NoTerminal)?;
        sys::set_window_size(pty.as_fd(), rows, cols).map_err(ProcessError::Resize)
    }

    pub fn kill(&self) -> Result<(), ProcessError> {
        let Some(pidfd) = &self.pidfd else {
            return Ok(());
        };
        match sys::pidfd_send_signal(pidfd.as_fd(), libc::SIGKILL) {
            Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
            Err(source) => Err(ProcessError::Signal {
                signal: libc::SIGKILL,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn the_exit_status_of_a_failed_start_comes_from_its_kind_never_its_message() {
        let code = |stage: &str, message: &str, kind| match setup_error(
            stage.into(),
            message.into(),
            kind,
        ) {
            ProcessError::Setup { exit_code, .. } => exit_code,
            other => panic!("{other:?}"),
        };
        // A message in another wording (or locale) changes nothing.
        assert_eq!(code("exec", "/x: introuvable", FailureKind::NotFound), 127);
        assert_eq!(code("exec", "/x: refusé", FailureKind::NotExecutable), 126);
        // A setup step whose message happens to read like a missing file is still a setup
        // failure (the text match this replaced called it 127 at the exec stage).
        assert_eq!(
            code(
                "exec",
                "/x: No such file or directory (os error 2)",
                FailureKind::Sandbox
            ),
            125
        );
        assert_eq!(code("landlock", "anything", FailureKind::Sandbox), 125);
        // The kind crosses the helper and guest protocols as a value.
        let wire = serde_json::to_string(&FromHelper::Failed {
            stage: "exec".into(),
            message: "m".into(),
            kind: FailureKind::NotFound,
        })
        .unwrap();
        assert!(wire.contains("\"kind\":\"not_found\""), "{wire}");
    }

    fn policy(process: &str) -> Policy {
        let text = format!(
            "version: 1\nfilesystem_policy:\n  include_workdir: true\n  read_only: [/bin]\n{process}"
        );
        Policy::from_yaml("p.yaml", &text).expect("valid policy")
    }

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("mkdir");
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1234:1235:app:/home/app:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(dir.path().join("etc/group"), "app:x:1235:\nstaff:x:1240:\n")
            .expect("group");
        dir
    }

    fn who(
        policy: &Policy,
        root: &crate::RootFs,
        workdir: &str,
    ) -> (u32, u32, String, PathBuf, Vec<PathBuf>) {
        let id = Identity::resolve(policy, Path::new(workdir), Some(root)).expect("resolve");
        (id.uid, id.gid, id.user, id.home, id.landlock.read_write)
    }

    #[test]
    fn users_are_resolved_in_the_tree_and_the_policy_wins() {
        let dir = tree();
        let root = |user: Option<&str>| crate::RootFs {
            lower: dir.path().to_owned(),
            user: user.map(str::to_owned),
        };
        let none = policy("");
        assert_eq!(
            who(&none, &root(Some("app")), "/data"),
            (
                1234,
                1235,
                "app".into(),
                "/home/app".into(),
                vec!["/data".into()]
            )
        );
        assert_eq!(
            who(&none, &root(Some("app:staff")), "/data").1,
            1240,
            "the image's user:group"
        );
        assert_eq!(
            who(&none, &root(Some("4321:77")), "/data"),
            (4321, 77, "4321".into(), "/".into(), vec!["/data".into()])
        );
        // Without a user anywhere: nobody, 65534 when the tree has no such entry.
        assert_eq!(who(&none, &root(None), "/data").0, 65534);
        // The policy's run_as_user wins over the image's User (and its group part).
        let policy_user = policy("process:\n  run_as_user: root\n");
        let (uid, gid, name, home, _) = who(&policy_user, &root(Some("app:staff")), "/data");
        assert_eq!(
            (uid, gid, name, home),
            (0, 0, "root".into(), "/root".into())
        );
        // The workdir / is never read-write.
        assert_eq!(who(&none, &root(Some("app")), "/").4, Vec::<PathBuf>::new());
    }

    #[test]
    fn unknown_users_and_groups_name_the_trees_files() {
        let dir = tree();
        let root = crate::RootFs {
            lower: dir.path().to_owned(),
            user: Some("ghost".into()),
        };
        let err = Identity::resolve(&policy(""), Path::new("/"), Some(&root)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "user \"ghost\" does not exist in {}/etc/passwd",
                dir.path().display()
            )
        );
        let root = crate::RootFs {
            lower: dir.path().to_owned(),
            user: Some("app:nogroup".into()),
        };
        let err = Identity::resolve(&policy(""), Path::new("/"), Some(&root)).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "group \"nogroup\" does not exist in {}/etc/group",
                dir.path().display()
            )
        );
    }
}

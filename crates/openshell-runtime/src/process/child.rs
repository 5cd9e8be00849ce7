//! The helper program: code that runs in the re-executed hosting binary, never in the supervisor.
//!
//! Every helper is a freshly exec'd, single-threaded process (no async runtime survives a fork),
//! so it may fork and allocate freely. There are three roles:
//!
//! - **holder**: started by the supervisor with new mount (not with a root filesystem: then init
//!   makes its own), UTS, IPC, network and pid namespaces
//!   (unshared just before its execve, so it is the namespaces' first member but stays in the
//!   host pid namespace). It forks init, reports init's host pid, then waits. When init ends,
//!   or when the supervisor disappears (its lifeline pipe reaches end-of-file), it kills init,
//!   removes the sandbox's cgroup and reports the end. It is what makes cleanup hold after the
//!   supervisor is killed with SIGKILL.
//! - **init**: pid 1 of the sandbox. It waits for the supervisor's go (cgroup and veth ready),
//!   makes mounts private, mounts a fresh /proc, sets the hostname, configures the network, then
//!   launches the workload, forwards signals to it, reaps orphans and reports its exit status.
//!   When init exits the kernel kills everything left in the pid namespace.
//! - **exec**: joins a running sandbox's namespaces and launches one more command in it.
//!
//! Launching (shared by init and exec) forks a child that, in this order: joins the cgroup,
//! starts a session (PTY mode), changes directory, drops to the policy's user and group, clears
//! every capability and the bounding set, sets no_new_privs and RLIMIT_CORE=0, applies Landlock,
//! applies seccomp, and calls execve. Any failure is reported and the child exits without exec:
//! the workload never runs unrestricted.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Gid, Pid, Uid};

use super::protocol::{
    ExecPlan, FailureKind, FromHelper, LaunchPlan, RestrictionReport, SpawnPlan, ToHelper,
    UsernsMap, WaitReport, CONTROL_FD, FD_CHANNEL, INIT_PIDFD, LIFELINE_FD,
};
use super::{cgroup, channel, landlock, net, rootfs, seccomp, sys, view};

/// The control channel as seen from a helper.
pub(crate) struct Control {
    reader: BufReader<UnixStream>,
}

impl Control {
    fn from_fd() -> Control {
        let fd = take_fd(CONTROL_FD);
        Control {
            reader: BufReader::new(UnixStream::from(fd)),
        }
    }

    /// Read one message. Ordering guarantees no read-ahead: the supervisor only writes its next
    /// message after an answer to this one.
    pub(crate) fn recv(&mut self) -> Option<ToHelper> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => serde_json::from_str(&line).ok(),
        }
    }

    pub(crate) fn send(&mut self, msg: &FromHelper) {
        let Ok(mut bytes) = serde_json::to_vec(msg) else {
            return;
        };
        bytes.push(b'\n');
        // A supervisor that went away cannot be told; the lifeline handles that case.
        let _ = self.reader.get_mut().write_all(&bytes);
    }

    pub(crate) fn fail(&mut self, stage: &str, message: String) -> ! {
        self.fail_with(StageError {
            stage: stage.to_owned(),
            message,
            kind: FailureKind::Sandbox,
        })
    }

    /// Reports `error` to the supervisor and ends this helper with its exit status.
    pub(crate) fn fail_with(&mut self, error: StageError) -> ! {
        let code = error.kind.exit_code();
        self.send(&FromHelper::Failed {
            stage: error.stage,
            message: error.message,
            kind: error.kind,
        });
        std::process::exit(code);
    }
}

/// Whether the other end of `fd` (a socket, or a pipe's read end) is gone, right now: what a
/// helper checks after setting its parent-death signal, which does not fire for a parent that
/// died before it was set (the helper would then outlive the supervisor, unwaited for).
pub(crate) fn hung_up(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::empty())];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
        && fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
}

pub(crate) fn take_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the supervisor placed `fd` (CONTROL_FD or LIFELINE_FD) in this process with dup2
    // before execve; this function is called once per descriptor, so ownership is unique.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Entry point of every helper role; never returns.
pub fn helper_main() -> ! {
    let mut ctl = Control::from_fd();
    match ctl.recv() {
        Some(ToHelper::Spawn(plan)) => holder(ctl, *plan),
        Some(ToHelper::Exec(plan)) => exec_helper(ctl, plan),
        Some(ToHelper::Go) => ctl.fail("protocol", "unexpected go before a plan".into()),
        #[cfg(feature = "krun")]
        Some(ToHelper::KrunShim(plan)) => crate::vm::krun::shim_main(ctl, plan),
        #[cfg(not(feature = "krun"))]
        Some(ToHelper::KrunShim(_)) => ctl.fail(
            "protocol",
            "this binary was built without the krun engine (feature `krun`)".into(),
        ),
        #[cfg(feature = "vm")]
        Some(ToHelper::Jail(plan)) => crate::vm::jail::main(ctl, *plan),
        #[cfg(not(feature = "vm"))]
        Some(ToHelper::Jail(_)) => ctl.fail(
            "protocol",
            "this binary was built without the vm backend (feature `vm`)".into(),
        ),
        None => std::process::exit(125),
    }
}

fn errno_text(e: nix::Error) -> String {
    std::io::Error::from(e).to_string()
}

/// The signals init and the exec helper forward to the workload.
const FORWARDED: [Signal; 8] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
    Signal::SIGCONT,
];

fn blocked_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    set
}

fn wait_report(status: WaitStatus) -> Option<WaitReport> {
    match status {
        WaitStatus::Exited(_, code) => Some(WaitReport::Code(code)),
        WaitStatus::Signaled(_, sig, _) => Some(WaitReport::Signal(sig as i32)),
        _ => None,
    }
}

fn null_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            let _ = sys::dup_onto(null.as_fd(), fd);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// holder

fn holder(mut ctl: Control, plan: SpawnPlan) -> ! {
    let lifeline = take_fd(LIFELINE_FD);
    let mask = blocked_set();
    if let Err(e) = mask.thread_block() {
        ctl.fail("signals", errno_text(e));
    }
    let sfd = match SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK) {
        Ok(s) => s,
        Err(e) => ctl.fail("signals", errno_text(e)),
    };
    let init = match sys::fork_single_threaded() {
        Ok(ForkResult::Child) => {
            drop(lifeline);
            drop(sfd);
            init_main(ctl, plan)
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => ctl.fail("fork init", errno_text(e)),
    };
    ctl.send(&FromHelper::InitPid { pid: init.as_raw() });
    null_stdio();

    let mut init_status = None;
    let mut killed = false;
    while init_status.is_none() {
        let mut fds = [
            PollFd::new(lifeline.as_fd(), PollFlags::POLLIN),
            PollFd::new(sfd.as_fd(), PollFlags::POLLIN),
        ];
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        let lifeline_gone = fds[0].revents().is_some_and(|r| !r.is_empty());
        if lifeline_gone && !killed {
            // The supervisor is gone: nobody will wait for this sandbox.
            let _ = kill(init, Signal::SIGKILL);
            killed = true;
        }
        while let Ok(Some(_)) = sfd.read_signal() {}
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) if status.pid() == Some(init) => {
                    init_status = wait_report(status);
                }
                Ok(_) => {}
            }
        }
    }
    // The view (or the overlay) lived in init's mount namespace, gone with init; only files
    // remain.
    if let Err(e) = std::fs::remove_dir_all(&plan.box_dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            ctl.send(&FromHelper::Failed {
                stage: "cleanup".into(),
                message: format!("removing {}: {e}", plan.box_dir.display()),
                kind: FailureKind::Sandbox,
            });
        }
    }
    let left = cgroup::remove_dirs(&plan.cgroup_dirs, std::time::Duration::from_secs(5));
    if !left.is_empty() {
        ctl.send(&FromHelper::Failed {
            stage: "cgroup cleanup".into(),
            message: format!("could not remove {left:?}"),
            kind: FailureKind::Sandbox,
        });
    }
    if let Some(status) = init_status {
        ctl.send(&FromHelper::SandboxEnded(status));
    }
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------------
// init

fn init_main(mut ctl: Control, plan: SpawnPlan) -> ! {
    // If the holder dies, so does init, and with it the whole pid namespace.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        ctl.fail("pdeathsig", errno_text(e));
    }
    match ctl.recv() {
        Some(ToHelper::Go) => {}
        _ => std::process::exit(125),
    }
    // init takes a mount namespace of its own, before any mount: the holder keeps the host's
    // (it removes the per-sandbox directory afterwards, and pivot_root would move every process
    // of a shared namespace).
    if let Err(e) = nix::sched::unshare(CloneFlags::CLONE_NEWNS) {
        ctl.fail("mount", format!("unshare: {}", errno_text(e)));
    }
    if let Err(e) =
        mount::<str, str, str, str>(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)
    {
        ctl.fail("mount", format!("making mounts private: {}", errno_text(e)));
    }
    let new_root = match &plan.root {
        None => match view::build(
            &plan.view,
            &plan.box_dir,
            plan.trust_bundle
                .as_deref()
                .map(|source| (source, Path::new(crate::TRUST_BUNDLE_PATH))),
        ) {
            Ok(skipped) => {
                ctl.send(&FromHelper::ViewReady { skipped });
                plan.box_dir.clone()
            }
            Err(e) => ctl.fail("filesystem", crate::error_chain(&e)),
        },
        Some(root) => {
            let (merged, method) = match rootfs::make_writable_root(&root.lower, &root.box_dir) {
                Ok(r) => r,
                Err(e) => ctl.fail("rootfs", e),
            };
            if let Err(e) = rootfs::own_filesystems(&merged, plan.view.tmp) {
                ctl.fail("rootfs", e);
            }
            if let Some(source) = &plan.trust_bundle {
                if let Err(e) = rootfs::place_trust_bundle(&merged, source) {
                    ctl.fail("rootfs", crate::error_chain(&e));
                }
            }
            ctl.send(&FromHelper::RootReady(method));
            merged
        }
    };
    if let Err(e) = rootfs::pivot_into(&new_root) {
        ctl.fail("filesystem", e);
    }
    if let Err(e) = nix::unistd::sethostname(&plan.hostname) {
        ctl.fail("hostname", errno_text(e));
    }
    if let Err(e) =
        net::configure_sandbox_side(&plan.net.ifname, plan.net.address, plan.net.prefix_len)
    {
        ctl.fail("network", crate::error_chain(&e));
    }
    let sfd = match SignalFd::with_flags(
        &blocked_set(),
        SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
    ) {
        Ok(s) => s,
        Err(e) => ctl.fail("signals", errno_text(e)),
    };
    let workload = match launch(&mut ctl, &plan.launch, plan.pty, &[]) {
        Ok(pid) => pid,
        Err(error) => ctl.fail_with(error),
    };
    ctl.send(&FromHelper::Running {
        pid: workload.as_raw(),
    });
    null_stdio();
    let status = supervise(workload, &sfd, None);
    ctl.send(&FromHelper::WorkloadExited(status));
    std::process::exit(0);
}

/// Forward signals to `workload`, reap every child, and return the workload's status.
fn supervise(workload: Pid, sfd: &SignalFd, lifeline: Option<&OwnedFd>) -> WaitReport {
    let mut lifeline_open = lifeline.is_some();
    loop {
        let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        if let (Some(l), true) = (lifeline, lifeline_open) {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        if poll(&mut fds, PollTimeout::NONE).is_err() {
            continue;
        }
        if fds
            .get(1)
            .and_then(|f| f.revents())
            .is_some_and(|r| !r.is_empty())
        {
            let _ = kill(workload, Signal::SIGKILL);
            lifeline_open = false;
        }
        while let Ok(Some(info)) = sfd.read_signal() {
            let signo = info.ssi_signo as i32;
            if signo == Signal::SIGCHLD as i32 {
                continue;
            }
            if let Ok(sig) = Signal::try_from(signo) {
                let _ = kill(workload, sig);
            }
        }
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) if status.pid() == Some(workload) => {
                    if let Some(report) = wait_report(status) {
                        return report;
                    }
                }
                Ok(_) => {}
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// exec

fn exec_helper(mut ctl: Control, plan: ExecPlan) -> ! {
    let lifeline = take_fd(LIFELINE_FD);
    let mask = blocked_set();
    if let Err(e) = mask.thread_block() {
        ctl.fail("signals", errno_text(e));
    }
    let sfd = match SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK) {
        Ok(s) => s,
        Err(e) => ctl.fail("signals", errno_text(e)),
    };
    // The session's cgroup, opened from the host's view (the sandbox's root has no
    // /sys/fs/cgroup): the launched command joins it through these descriptors, this helper
    // never does (it is no member of the sandbox, so it is nobody's egress ancestor), and kills
    // whatever is left in it when the command ends or the supervisor goes away.
    let mut plan = plan;
    let open = |path: &Path, flags: nix::fcntl::OFlag| {
        nix::fcntl::open(
            path,
            flags | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
    };
    let mut join = Vec::new();
    for file in std::mem::take(&mut plan.launch.join_cgroups) {
        match open(&file, nix::fcntl::OFlag::O_WRONLY) {
            Ok(fd) => join.push(fd),
            Err(e) => ctl.fail("cgroup", format!("{}: {}", file.display(), errno_text(e))),
        }
    }
    let mut session = Vec::new();
    for dir in &plan.session_cgroups {
        match open(
            dir,
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
        ) {
            Ok(fd) => session.push(fd),
            Err(e) => ctl.fail("cgroup", format!("{}: {}", dir.display(), errno_text(e))),
        }
    }
    // Enter init's namespaces through its pidfd (never by pid number: a pid can be recycled),
    // all at once; the mount namespace moves this process to the sandbox's root, and nothing
    // here re-executes a host path afterwards.
    let init = take_fd(INIT_PIDFD);
    let flags = CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNS;
    if let Err(e) = nix::sched::setns(init.as_fd(), flags) {
        ctl.fail("join sandbox", format!("setns: {}", errno_text(e)));
    }
    drop(init);
    let workload = match launch(&mut ctl, &plan.launch, plan.pty, &join) {
        Ok(pid) => pid,
        Err(error) => ctl.fail_with(error),
    };
    drop(join);
    ctl.send(&FromHelper::Running {
        pid: workload.as_raw(),
    });
    null_stdio();
    let status = supervise(workload, &sfd, Some(&lifeline));
    // What the command left running (in the background, in a session of its own) ends with it.
    if !cgroup::kill_session(&session, std::time::Duration::from_secs(5)) {
        ctl.send(&FromHelper::Failed {
            stage: "session cleanup".into(),
            message: "processes were still running in the session's cgroup".into(),
            kind: FailureKind::Sandbox,
        });
    }
    ctl.send(&FromHelper::WorkloadExited(status));
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------------
// launch

/// A failed step of a launch: where, what, and what it means for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageError {
    pub stage: String,
    pub message: String,
    pub kind: FailureKind,
}

/// A step of setting up the sandbox failed (`(stage, message)`; [`FailureKind::Sandbox`]).
impl From<(String, String)> for StageError {
    fn from((stage, message): (String, String)) -> Self {
        Self {
            stage,
            message,
            kind: FailureKind::Sandbox,
        }
    }
}

fn stage(stage: &str) -> impl FnOnce(String) -> StageError + '_ {
    move |m| (stage.to_owned(), m).into()
}

/// Fork the workload, wait until it has exec'd (or failed), report, and return its pid. With
/// `pty` (rows, columns), its stdio is a new PTY of the sandbox's own devpts (this process
/// must be inside the sandbox's mount namespace), whose master goes to the supervisor.
fn launch(
    ctl: &mut Control,
    plan: &LaunchPlan,
    pty: Option<(u16, u16)>,
    join: &[OwnedFd],
) -> Result<Pid, StageError> {
    let slave = match pty {
        Some((rows, cols)) => Some(sandbox_pty(rows, cols).map_err(stage("pty"))?),
        None => None,
    };
    let stdio = slave.as_ref().map(|s| {
        let fd = s.as_raw_fd();
        [fd, fd, fd]
    });
    let launched = launch_joining(plan, stdio, join, None)?;
    drop(slave);
    ctl.send(&FromHelper::Restricted(launched.report));
    Ok(Pid::from_raw(launched.pid))
}

/// A PTY in the sandbox's own devpts (`/dev/ptmx` of the sandbox's /dev): the master goes to
/// the supervisor over the descriptor channel; the slave, opened through the master, is
/// returned for the workload's stdio.
fn sandbox_pty(rows: u16, cols: u16) -> Result<OwnedFd, String> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| format!("opening /dev/ptmx: {}", errno_text(e)))?;
    nix::pty::grantpt(&master).map_err(|e| format!("grantpt: {}", errno_text(e)))?;
    nix::pty::unlockpt(&master).map_err(|e| format!("unlockpt: {}", errno_text(e)))?;
    sys::set_window_size(master.as_fd(), rows, cols)
        .map_err(|e| format!("setting the terminal size: {}", errno_text(e)))?;
    let slave = sys::open_pty_peer(master.as_fd())
        .map_err(|e| format!("opening the terminal: {}", errno_text(e)))?;
    channel::send_pty_master(FD_CHANNEL, master.as_fd())
        .map_err(|e| format!("handing the terminal to the supervisor: {}", errno_text(e)))?;
    Ok(slave)
}

/// Where the calls a launched process's filter notifies are recorded, when the launcher
/// records them itself (the guest agent: `plan.notify_launcher`).
#[derive(Debug, Clone, Copy)]
pub struct Recorder<'a> {
    pub lineage: &'a crate::lineage::Lineage,
    /// The egress relay's address: connects to it are recorded.
    pub proxy: std::net::SocketAddr,
}

/// A process [`launch_restricted`] started.
#[derive(Debug)]
pub struct Launched {
    /// Its pid, in the caller's pid namespace.
    pub pid: i32,
    /// What it enforced.
    pub report: RestrictionReport,
    /// With `plan.notify_launcher`: its filter's notification listener, to be served with
    /// [`super::notify::serve`] from now on.
    pub listener: Option<OwnedFd>,
}

/// Fork a child that restricts itself as `plan` says and execs; return once execve has
/// succeeded. With `stdio`, the child's standard streams are those three descriptors. With
/// `plan.notify_launcher`, the child hands its filter's listener to this process, which
/// records the notifications into `recorder` until the exec (the exec itself is one), then
/// returns the listener.
///
/// The caller must be single-threaded (the guest agent and the helpers are).
pub fn launch_restricted(
    plan: &LaunchPlan,
    stdio: Option<[RawFd; 3]>,
    recorder: Option<Recorder<'_>>,
) -> Result<Launched, StageError> {
    launch_joining(plan, stdio, &[], recorder)
}

/// [`launch_restricted`], the child first writing itself into each `cgroup.procs` descriptor
/// of `join`.
fn launch_joining(
    plan: &LaunchPlan,
    stdio: Option<[RawFd; 3]>,
    join: &[OwnedFd],
    recorder: Option<Recorder<'_>>,
) -> Result<Launched, StageError> {
    let filter = &plan.seccomp;
    if plan.notify_launcher && recorder.is_none() {
        return Err((
            "seccomp".to_owned(),
            "the launch plan asks its launcher to record, and no recorder was given".to_owned(),
        )
            .into());
    }
    // Both ends close on exec: end of file tells the parent the workload runs.
    let (parent_end, child_end) =
        UnixStream::pair().map_err(|e| ("socketpair".to_owned(), e.to_string()))?;
    let handover = match plan.notify_launcher {
        true => Some(channel::pair().map_err(|e| ("socketpair".to_owned(), errno_text(e)))?),
        false => None,
    };
    match sys::fork_single_threaded().map_err(|e| ("fork".to_owned(), errno_text(e)))? {
        ForkResult::Child => {
            drop(parent_end);
            let handover = handover.map(|(ours, theirs)| {
                drop(ours);
                theirs
            });
            let mut report = child_end;
            if let Some(fds) = stdio {
                for (target, fd) in fds.into_iter().enumerate() {
                    if fd != target as RawFd {
                        let _ = sys::dup_raw_onto(fd, target as RawFd);
                    }
                }
            }
            let error = restrict_and_exec(plan, filter, &mut report, join, handover.as_ref());
            let code = error.kind.exit_code();
            let line = serde_json::to_string(&FromHelper::Failed {
                stage: error.stage,
                message: error.message,
                kind: error.kind,
            })
            .unwrap_or_default();
            let _ = writeln!(report, "F{line}");
            std::process::exit(code);
        }
        ForkResult::Parent { child } => {
            drop(child_end);
            let handover = handover.map(|(ours, theirs)| {
                drop(theirs);
                ours
            });
            parent_side(plan, child, parent_end, handover, recorder)
        }
    }
}

/// The launcher's side: map a user namespace when asked, collect the report, and (with a
/// recorder) take the listener and record its notifications, until the child's exec closes
/// the report socket.
fn parent_side(
    plan: &LaunchPlan,
    child: Pid,
    parent_end: UnixStream,
    mut handover: Option<OwnedFd>,
    recorder: Option<Recorder<'_>>,
) -> Result<Launched, StageError> {
    let fail = |stage: &str, message: String| {
        let _ = waitpid(child, None);
        Err((stage.to_owned(), message).into())
    };
    let mut writer = match parent_end.try_clone() {
        Ok(w) => w,
        Err(e) => return fail("socketpair", e.to_string()),
    };
    let mut reader = parent_end;
    let mut pending = Vec::new();
    let mut restricted = None;
    let mut listener: Option<OwnedFd> = None;
    let mut closed = false;
    while !closed {
        // Whole lines first.
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            if let Some(pid) = line.strip_prefix('U') {
                // The child unshared its user namespace: map it (it cannot map another
                // host id itself), then let it go on.
                let mapped = match (pid.parse::<i32>(), &plan.userns) {
                    (Ok(pid), Some(map)) => map_user_namespace(pid, plan, map),
                    _ => Err("an unexpected user namespace request".to_owned()),
                };
                let answer: &[u8] = if mapped.is_ok() { b"G" } else { b"X" };
                let _ = writer.write_all(answer);
                if let Err(message) = mapped {
                    return fail("user namespace", message);
                }
            } else if let Some(json) = line.strip_prefix('R') {
                if let Ok(report) = serde_json::from_str::<RestrictionReport>(json) {
                    restricted = Some(report);
                }
            } else if let Some(json) = line.strip_prefix('F') {
                let _ = waitpid(child, None);
                return Err(match serde_json::from_str::<FromHelper>(json) {
                    Ok(FromHelper::Failed {
                        stage,
                        message,
                        kind,
                    }) => StageError {
                        stage,
                        message,
                        kind,
                    },
                    _ => ("launch".to_owned(), "unreadable failure report".to_owned()).into(),
                });
            }
        }
        let mut fds = vec![PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
        if let Some(h) = &handover {
            fds.push(PollFd::new(h.as_fd(), PollFlags::POLLIN));
        }
        if let Some(l) = &listener {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return fail("launch", errno_text(e)),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let mut at = 1;
        if handover.is_some() {
            if ready[at] {
                match handover.as_ref().map(|h| channel::recv(h.as_fd())) {
                    Some(Ok(Some(channel::Passed::Listener(fd)))) => {
                        listener = Some(fd);
                        handover = None;
                    }
                    Some(Err(nix::Error::EAGAIN)) => {}
                    // Closed without a listener (the child failed before): the report says why.
                    _ => handover = None,
                }
            }
            at += 1;
        }
        if let (Some(l), Some(rec)) = (&listener, recorder) {
            if ready.get(at).copied().unwrap_or(false) {
                let _ = super::notify::serve_one(l.as_fd(), rec.lineage, rec.proxy);
            }
        }
        if ready[0] {
            let mut chunk = [0u8; 4096];
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => closed = true,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            }
        }
    }
    match (restricted, plan.notify_launcher, listener) {
        (Some(report), false, _) => Ok(Launched {
            pid: child.as_raw(),
            report,
            listener: None,
        }),
        (Some(report), true, Some(listener)) => Ok(Launched {
            pid: child.as_raw(),
            report,
            listener: Some(listener),
        }),
        (Some(_), true, None) => fail("seccomp", "the launched process sent no listener".into()),
        (None, _, _) => fail("launch", "the workload process ended before exec".into()),
    }
}

/// Write the maps of `pid`'s new user namespace: `plan.uid` → `map.host_uid`, `plan.gid` →
/// `map.host_gid`, and each of `map.also_uids`/`also_gids` to itself, one id each; setgroups
/// denied (the process cannot shed the host groups it never had, nor gain any).
fn map_user_namespace(pid: i32, plan: &LaunchPlan, map: &UsernsMap) -> Result<(), String> {
    let write = |file: &str, text: String| {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, text).map_err(|e| format!("{path}: {e}"))
    };
    let lines = |first: (u32, u32), also: &[u32]| {
        let mut text = format!("{} {} 1\n", first.0, first.1);
        for id in also.iter().filter(|id| **id != first.0 && **id != first.1) {
            text.push_str(&format!("{id} {id} 1\n"));
        }
        text
    };
    write("setgroups", "deny".into())?;
    write("uid_map", lines((plan.uid, map.host_uid), &map.also_uids))?;
    write("gid_map", lines((plan.gid, map.host_gid), &map.also_gids))
}

/// In the forked child: restrict, then exec. Returns only on failure, typed: an execve that
/// failed is [`FailureKind::NotFound`] or [`FailureKind::NotExecutable`] from its errno,
/// anything before it [`FailureKind::Sandbox`].
fn restrict_and_exec(
    plan: &LaunchPlan,
    filter: &seccomp::CompiledFilter,
    report: &mut UnixStream,
    join: &[OwnedFd],
    handover: Option<&OwnedFd>,
) -> StageError {
    match restrict(plan, filter, report, join, handover) {
        Ok(mut rr) => {
            rr.uid = plan.uid;
            rr.gid = plan.gid;
            let line = serde_json::to_string(&rr).unwrap_or_default();
            if writeln!(report, "R{line}").is_err() {
                return ("report".to_owned(), "cannot report restrictions".to_owned()).into();
            }
            let err = exec(plan);
            StageError {
                stage: "exec".into(),
                message: format!("{}: {}", plan.program, errno_text(err)),
                kind: FailureKind::of_exec(err),
            }
        }
        Err(error) => error,
    }
}

fn restrict(
    plan: &LaunchPlan,
    filter: &seccomp::CompiledFilter,
    parent: &mut UnixStream,
    join: &[OwnedFd],
    handover: Option<&OwnedFd>,
) -> Result<RestrictionReport, StageError> {
    // Default dispositions and an empty mask: the workload must not inherit the helper's.
    for signo in 1..32 {
        if let Ok(sig) = Signal::try_from(signo) {
            if sig != Signal::SIGKILL && sig != Signal::SIGSTOP {
                let _ = reset_signal(sig);
            }
        }
    }
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| ("signals".to_owned(), errno_text(e)))?;

    for file in &plan.join_cgroups {
        std::fs::write(file, "0")
            .map_err(|e| ("cgroup".to_owned(), format!("{}: {e}", file.display())))?;
    }
    for fd in join {
        nix::unistd::write(fd, b"0").map_err(|e| {
            (
                "cgroup".to_owned(),
                format!("joining the session: {}", errno_text(e)),
            )
        })?;
    }
    if plan.pty {
        nix::unistd::setsid().map_err(|e| ("pty".to_owned(), errno_text(e)))?;
        // fd 0 is the PTY slave the supervisor set up.
        let stdin = std::io::stdin();
        sys::set_controlling_tty(stdin.as_fd()).map_err(|e| ("pty".to_owned(), errno_text(e)))?;
    }
    if plan.fresh_proc {
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| ("proc".to_owned(), errno_text(e)))?;
    }
    nix::unistd::chdir(&plan.cwd).map_err(|e| {
        (
            "workdir".to_owned(),
            format!("{}: {}", plan.cwd.display(), errno_text(e)),
        )
    })?;

    if plan.userns.is_some() {
        enter_user_namespace(parent, &plan.groups).map_err(stage("user namespace"))?;
    }
    drop_privileges(plan).map_err(stage("privileges"))?;
    // A change of credentials clears the parent-death signal: set it again, so the process
    // still dies with its launcher (a jailed VMM program with its jail's helper; an exec with
    // its helper); a launcher already gone means nobody waits for it.
    // (`getppid` cannot tell: in a pid namespace of its own the parent is 0; the report socket
    // hangs up when the launcher is gone.)
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
        .map_err(|e| ("pdeathsig".to_owned(), errno_text(e)))?;
    if hung_up(parent.as_fd()) {
        return Err(("pdeathsig".to_owned(), "the launcher is gone".to_owned()).into());
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| ("no_new_privs".to_owned(), errno_text(e)))?;
    // Read back now: a jailed program's allowlist has no prctl for its launcher.
    let no_new_privs = nix::sys::prctl::get_no_new_privs().unwrap_or(false);
    let outcome = landlock::restrict(&plan.landlock)
        .map_err(|e| ("landlock".to_owned(), crate::error_chain(&e)))?;
    let unix_connect = if plan.mediate_connect {
        // The supervisor carries out every connect: without its listener nothing may run.
        let listener = sys::install_filter_with_listener(&filter.program)
            .map_err(|e| ("seccomp".to_owned(), errno_text(e)))?;
        channel::send_listener(FD_CHANNEL, listener.as_fd()).map_err(|e| {
            (
                "seccomp".to_owned(),
                format!(
                    "handing the connect listener to the supervisor: {}",
                    errno_text(e)
                ),
            )
        })?;
        "supervisor"
    } else if let (true, Some(handover)) = (plan.notify_launcher, handover) {
        // The launcher records this process's connects and execs: without its listener
        // nothing may run.
        let listener = sys::install_filter_with_listener(&filter.program)
            .map_err(|e| ("seccomp".to_owned(), errno_text(e)))?;
        channel::send_listener(handover.as_raw_fd(), listener.as_fd()).map_err(|e| {
            (
                "seccomp".to_owned(),
                format!("handing the listener to the launcher: {}", errno_text(e)),
            )
        })?;
        "vm"
    } else {
        seccomp::apply(filter).map_err(|e| ("seccomp".to_owned(), crate::error_chain(&e)))?;
        "vm"
    };
    let unix_connect = match outcome.rights.iter().any(|r| r == "ResolveUnix") {
        true => format!("{unix_connect}+landlock"),
        false => unix_connect.to_owned(),
    };
    sys::cloexec_from(3).map_err(|e| ("descriptors".to_owned(), errno_text(e)))?;
    Ok(RestrictionReport {
        landlock_abi: outcome.abi,
        landlock_status: outcome.status.to_owned(),
        landlock_rights: outcome.rights,
        landlock_skipped: outcome.skipped,
        seccomp_rules: filter.rules,
        no_new_privs,
        uid: plan.uid,
        gid: plan.gid,
        host_ids: plan.userns.as_ref().map(|m| (m.host_uid, m.host_gid)),
        unix_connect,
    })
}

fn reset_signal(sig: Signal) -> nix::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler};
    let action = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    sys::sigaction(sig, &action).map(drop)
}

/// Leave the host's user namespace for a new one, which the parent maps (see
/// [`map_user_namespace`]): supplementary groups are shed on the host first, then the child
/// asks and waits for its maps. Afterwards the caller holds every capability of the new
/// namespace only, which [`drop_privileges`] clears.
fn enter_user_namespace(parent: &mut UnixStream, groups: &[u32]) -> Result<(), String> {
    let groups: Vec<Gid> = groups.iter().map(|g| Gid::from_raw(*g)).collect();
    nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups: {}", errno_text(e)))?;
    nix::sched::unshare(CloneFlags::CLONE_NEWUSER)
        .map_err(|e| format!("unshare: {}", errno_text(e)))?;
    writeln!(parent, "U{}", std::process::id()).map_err(|e| format!("asking for maps: {e}"))?;
    let mut answer = [0u8; 1];
    match parent.read_exact(&mut answer) {
        Ok(()) if answer == *b"G" => Ok(()),
        _ => Err("the user namespace was not mapped".into()),
    }
}

fn drop_privileges(plan: &LaunchPlan) -> Result<(), String> {
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    // Capabilities are kept only where they mean nothing on the host: inside a user namespace
    // of the process's own (a jailed virtiofsd's, over the ids its namespace maps).
    let keep = plan.keep_caps;
    if keep != 0 && plan.userns.is_none() {
        return Err(format!(
            "capabilities {keep:#x} may be kept only inside a user namespace"
        ));
    }
    sys::drop_bounding_set(last_cap, keep)
        .map_err(|e| format!("dropping the bounding set: {}", errno_text(e)))?;
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| format!("RLIMIT_CORE: {}", errno_text(e)))?;
    let gid = Gid::from_raw(plan.gid);
    let uid = Uid::from_raw(plan.uid);
    // In a user namespace setgroups is denied: the process has no supplementary group.
    if plan.userns.is_none() {
        let mut groups = vec![gid];
        groups.extend(plan.groups.iter().map(|g| Gid::from_raw(*g)));
        nix::unistd::setgroups(&groups).map_err(|e| format!("setgroups: {}", errno_text(e)))?;
    }
    nix::unistd::setresgid(gid, gid, gid)
        .map_err(|e| format!("setresgid {}: {}", plan.gid, errno_text(e)))?;
    nix::unistd::setresuid(uid, uid, uid)
        .map_err(|e| format!("setresuid {}: {}", plan.uid, errno_text(e)))?;
    sys::clear_ambient_caps()
        .map_err(|e| format!("clearing ambient capabilities: {}", errno_text(e)))?;
    sys::set_caps(keep).map_err(|e| format!("dropping capabilities: {}", errno_text(e)))?;
    let caps =
        sys::effective_caps().map_err(|e| format!("reading capabilities: {}", errno_text(e)))?;
    if caps != keep {
        return Err(format!(
            "capabilities {caps:#x} present after dropping to {keep:#x}"
        ));
    }
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("dumpable: {}", errno_text(e)))?;
    Ok(())
}

fn exec(plan: &LaunchPlan) -> nix::Error {
    use std::ffi::CString;
    let to_c = |s: &str| CString::new(s.as_bytes()).map_err(|_| nix::Error::EINVAL);
    let argv: Result<Vec<CString>, _> = plan.argv.iter().map(|a| to_c(a)).collect();
    let env: Result<Vec<CString>, _> = plan
        .env
        .iter()
        .map(|(k, v)| to_c(&format!("{k}={v}")))
        .collect();
    let (Ok(argv), Ok(env), Ok(program)) = (argv, env, to_c(&plan.program)) else {
        return nix::Error::EINVAL;
    };
    if plan.program.contains('/') {
        return match nix::unistd::execve(&program, &argv, &env) {
            Err(e) => e,
            Ok(never) => match never {},
        };
    }
    // Search the workload's PATH, as execvpe would, but with the workload's environment.
    let path = plan
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    let mut last = nix::Error::ENOENT;
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(&plan.program);
        let Ok(c) = CString::new(candidate.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        match nix::unistd::execve(&c, &argv, &env) {
            Err(nix::Error::ENOENT) | Err(nix::Error::ENOTDIR) => {}
            Err(e) => last = e,
            Ok(never) => match never {},
        }
    }
    last
}

//! The jail of the VMM's processes (QEMU, vhost-device-vsock and virtiofsd): under TCG, QEMU's
//! own security policy puts the emulator outside its security boundary, so a bug in TCG, a
//! device model or a vhost-user daemon must meet what a compromised workload meets.
//!
//! Each jailed program runs:
//! - as the unprivileged system user [`VMM_USER`] (its host uid and gid), with no_new_privs, in
//!   a user namespace of its own, setgroups denied. QEMU and the vsock daemon: their uid and gid
//!   mapped to themselves, every capability cleared. virtiofsd: root of its namespace (mapped
//!   to the VMM user) with only the capabilities serving files needs ([`FILE_SERVER_CAPS`]),
//!   which reach only the ids its namespace maps: the VMM user, which guest root becomes on the
//!   host, and the workload's own ids. It cannot make a device node (that needs the host's
//!   CAP_MKNOD), and a setuid file it makes belongs to one of those ids;
//! - in its own mount, pid, network, IPC and UTS namespaces: no network device, no view of any
//!   host process, pid 1 of its namespace;
//! - in a root that holds only what it needs (its binary, the kernel, firmware, the template
//!   state, the box's VMM directory, `/dev/kvm` with KVM; for virtiofsd the guest's file tree,
//!   built by the helper and bound at [`GUEST_TREE`], nosuid and nodev), each host path opened without
//!   following links and bound from its descriptor (`process::view::Tree`), read-only except the
//!   VMM directory, plus a fresh `/proc` of its pid namespace;
//! - under Landlock to those paths and a seccomp allowlist recorded for that program
//!   ([`super::vmm_syscalls`]; every other call fails with EPERM, or is logged with
//!   `OPENSHELL_VMM_SECCOMP=log` while recording).
//!
//! A helper (this binary re-executed, `ToHelper::Jail`) builds the root as root, pivots into it,
//! then launches the program with the same code as a workload (`launch_restricted`: user
//! namespace, privilege drop, Landlock, seccomp) and stays as its parent, dying with the
//! supervisor (PDEATHSIG) and taking the program with it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::unistd::User;
use tokio::process::Child;

use super::VmError;
use crate::process::child::{hung_up, take_fd, Control};
use crate::process::protocol::{
    FromHelper, JailPlan, JailTree, LandlockPlan, LaunchPlan, ToHelper, UsernsMap, WaitReport,
    LIFELINE_FD,
};
use crate::process::{rootfs, seccomp, start_helper, view};
use crate::StdioMode;

/// The system user the VMM's processes run as (`cargo xtask guest` and `cargo xtask deps`
/// create it).
pub const VMM_USER: &str = "openshell-vmm";

/// `OPENSHELL_VMM_SECCOMP=log`: calls outside the recorded allowlists are logged, not refused
/// (to record them; see `vmm_syscalls`).
pub const SECCOMP_ENV: &str = "OPENSHELL_VMM_SECCOMP";

/// The host ids the VMM's processes run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmIds {
    pub uid: u32,
    pub gid: u32,
}

/// Where virtiofsd's jail has the guest's file tree (its `--shared-dir`): the same path in every
/// sandbox, as a template's migrated state expects.
pub const GUEST_TREE: &str = "/fs";

/// The capabilities virtiofsd keeps inside its user namespace: to carry out each request as the
/// guest's ids (CAP_SETUID, CAP_SETGID), and for what guest root may do to files of the ids the
/// namespace maps (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID). Not CAP_MKNOD, not
/// CAP_SETFCAP, not CAP_DAC_READ_SEARCH (file handles are not used).
pub const FILE_SERVER_CAPS: u64 = {
    // <linux/capability.h>
    const CAP_CHOWN: u32 = 0;
    const CAP_DAC_OVERRIDE: u32 = 1;
    const CAP_FOWNER: u32 = 3;
    const CAP_FSETID: u32 = 4;
    const CAP_SETGID: u32 = 6;
    const CAP_SETUID: u32 = 7;
    (1 << CAP_CHOWN)
        | (1 << CAP_DAC_OVERRIDE)
        | (1 << CAP_FOWNER)
        | (1 << CAP_FSETID)
        | (1 << CAP_SETGID)
        | (1 << CAP_SETUID)
};

/// What virtiofsd is started with: [`FILE_SERVER_CAPS`] and CAP_SETPCAP, which its own start
/// needs to empty its bounding set (libcap-ng applies capabilities and bounding set together);
/// that drops CAP_SETPCAP with the rest, and it serves with `FILE_SERVER_CAPS` alone.
pub const FILE_SERVER_START_CAPS: u64 = FILE_SERVER_CAPS | (1 << 8/* CAP_SETPCAP */);

/// Who a jailed program is: its uid and gid inside its user namespace, and what that namespace
/// maps them (and any further ids) to on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailIds {
    pub uid: u32,
    pub gid: u32,
    pub map: UsernsMap,
}

impl JailIds {
    /// QEMU's and the vsock daemon's: the VMM user, mapped to itself.
    pub fn vmm(ids: VmmIds) -> JailIds {
        JailIds {
            uid: ids.uid,
            gid: ids.gid,
            map: UsernsMap {
                host_uid: ids.uid,
                host_gid: ids.gid,
                also_uids: Vec::new(),
                also_gids: Vec::new(),
            },
        }
    }

    /// virtiofsd's: root of its namespace is the VMM user on the host, and the workload's ids
    /// as the guest kernel knows them (`workload`) are themselves. An error when those are the
    /// VMM user's (the namespace could not tell them apart).
    pub fn file_server(ids: VmmIds, workload: Option<(u32, u32)>) -> Result<JailIds, VmError> {
        let (also_uids, also_gids) = match workload {
            Some((uid, gid)) if uid == ids.uid || gid == ids.gid => {
                return Err(VmError::VmmUser {
                    user: VMM_USER,
                    reason: format!(
                        "the workload's ids ({uid}:{gid}) are the VMM user's ({}:{}); run it as \
                         another user",
                        ids.uid, ids.gid
                    ),
                })
            }
            // Guest root is already mapped (to the VMM user).
            Some((uid, gid)) => (
                (uid != 0).then_some(uid).into_iter().collect(),
                (gid != 0).then_some(gid).into_iter().collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        Ok(JailIds {
            uid: 0,
            gid: 0,
            map: UsernsMap {
                host_uid: ids.uid,
                host_gid: ids.gid,
                also_uids,
                also_gids,
            },
        })
    }
}

/// The ids of [`VMM_USER`]; an error saying how to create it when it is missing.
pub fn vmm_ids() -> Result<VmmIds, VmError> {
    let missing = || {
        VmError::VmmUser {
        user: VMM_USER,
        reason: "no such user: run `cargo xtask deps --vm` (or `useradd --system --user-group --no-create-home \
                 --shell /usr/sbin/nologin openshell-vmm`)"
            .into(),
    }
    };
    let user = User::from_name(VMM_USER)
        .map_err(|e| VmError::VmmUser {
            user: VMM_USER,
            reason: e.to_string(),
        })?
        .ok_or_else(missing)?;
    if user.uid.is_root() || user.gid.as_raw() == 0 {
        return Err(VmError::VmmUser {
            user: VMM_USER,
            reason: "its uid or gid is 0".into(),
        });
    }
    Ok(VmmIds {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}

/// What a dynamically linked VMM program (vhost-device-vsock, virtiofsd) needs to load: the
/// host's loader and libraries, read-only.
pub fn host_libraries() -> Vec<PathBuf> {
    ["/usr", "/lib", "/lib64", "/etc/ld.so.cache"]
        .into_iter()
        .map(PathBuf::from)
        .filter(|p| p.symlink_metadata().is_ok())
        .collect()
}

/// One program to jail.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// For messages: "qemu", "vhost-device-vsock", "virtiofsd".
    pub what: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Its stdout and stderr (a file of the box, which only root can write into).
    pub log: PathBuf,
    /// An empty directory of the box, where its root is built.
    pub root: PathBuf,
    /// Host paths it sees read-only (the program itself is added).
    pub read_only: Vec<PathBuf>,
    /// Host paths it may write (the box's VMM directory).
    pub read_write: Vec<PathBuf>,
    /// `/dev/kvm`, and the group that may open it.
    pub kvm: bool,
    /// Its recorded allowlist.
    pub syscalls: &'static [i64],
    pub ids: JailIds,
    /// Capabilities kept inside its user namespace (0 but for virtiofsd).
    pub keep_caps: u64,
    /// A guest file tree the helper builds first and binds at `GUEST_TREE`, writable.
    pub tree: Option<crate::process::protocol::GuestTree>,
}

/// Start `spec` jailed; returns the helper that is the program's parent (killing it kills the
/// program) once the program runs.
pub async fn start(spec: JailSpec) -> Result<Child, VmError> {
    let helper_err = |message: String| VmError::Helper {
        what: spec.what,
        message,
    };
    let unlisted = match std::env::var(SECCOMP_ENV).as_deref() {
        Ok("log") => seccompiler::SeccompAction::Log,
        _ => seccompiler::SeccompAction::Errno(libc::EPERM as u32),
    };
    // The launcher's own last steps run under the filter too (it is installed before them).
    let allowed: Vec<i64> = spec
        .syscalls
        .iter()
        .chain(super::vmm_syscalls::LAUNCHER)
        .chain(super::vmm_syscalls::ALWAYS)
        .copied()
        .collect();
    let filter = seccomp::compile_allowlist(&allowed, unlisted)
        .map_err(|e| helper_err(crate::error_chain(&e)))?;
    let mut groups = Vec::new();
    let mut read_write = spec.read_write.clone();
    if spec.kvm {
        let kvm =
            nix::sys::stat::stat("/dev/kvm").map_err(|e| helper_err(format!("/dev/kvm: {e}")))?;
        groups.push(kvm.st_gid);
        read_write.push(PathBuf::from("/dev/kvm"));
    }
    let mut read_only = vec![spec.program.clone()];
    read_only.extend(spec.read_only.iter().cloned());
    let tree = spec.tree.clone().map(|tree| JailTree {
        tree,
        at: PathBuf::from(GUEST_TREE),
    });
    if tree.is_some() {
        read_write.push(PathBuf::from(GUEST_TREE));
    }
    let mut argv = vec![spec.program.display().to_string()];
    argv.extend(spec.args.iter().cloned());
    let plan = JailPlan {
        root: spec.root.clone(),
        log: spec.log.clone(),
        paths: read_only
            .iter()
            .map(|p| (p.clone(), false))
            .chain(
                read_write
                    .iter()
                    .filter(|p| !p.starts_with(GUEST_TREE))
                    .map(|p| (p.clone(), true)),
            )
            .collect(),
        tree,
        launch: LaunchPlan {
            program: spec.program.display().to_string(),
            argv,
            env: Vec::new(),
            cwd: PathBuf::from("/"),
            uid: spec.ids.uid,
            gid: spec.ids.gid,
            userns: Some(spec.ids.map.clone()),
            groups,
            fresh_proc: true,
            keep_caps: spec.keep_caps,
            pty: false,
            join_cgroups: Vec::new(),
            landlock: LandlockPlan {
                read_only: read_only
                    .iter()
                    .cloned()
                    .chain([PathBuf::from("/proc")])
                    .collect(),
                read_write,
                hard_requirement: false,
            },
            seccomp: filter,
            mediate_connect: false,
            notify_launcher: false,
        },
    };
    let namespaces = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    let mut helper =
        start_helper(StdioMode::Null, namespaces, None).map_err(|e| helper_err(e.to_string()))?;
    helper
        .ctl
        .send(&ToHelper::Jail(Box::new(plan)))
        .await
        .map_err(|e| helper_err(format!("sending the plan: {e}")))?;
    let limit = Duration::from_secs(10);
    let answer = async {
        loop {
            match helper.ctl.recv().await {
                Some(FromHelper::Restricted(report)) => {
                    tracing::debug!(what = spec.what, ?report, "jailed")
                }
                Some(FromHelper::Running { pid }) => return Ok(pid),
                Some(FromHelper::Failed { stage, message, .. }) => {
                    return Err(format!("{stage}: {message}"))
                }
                Some(other) => return Err(format!("unexpected message {other:?}")),
                None => return Err("the jail's helper ended".to_owned()),
            }
        }
    };
    match tokio::time::timeout(limit, answer).await {
        Ok(Ok(pid)) => {
            tracing::debug!(
                what = spec.what,
                pid,
                uid = spec.ids.map.host_uid,
                "started in its jail"
            );
            Ok(helper.into_child())
        }
        Ok(Err(message)) => {
            let _ = helper.child.start_kill();
            let _ = helper.child.wait().await;
            Err(helper_err(message))
        }
        Err(_) => {
            let _ = helper.child.start_kill();
            let _ = helper.child.wait().await;
            Err(helper_err(format!(
                "the jail was not ready within {limit:?}"
            )))
        }
    }
}

/// The helper side: build the root, pivot into it, launch the program, wait for it and exit
/// with its status. Runs single-threaded in the namespaces the supervisor unshared for it.
pub(crate) fn main(mut ctl: Control, plan: JailPlan) -> ! {
    use std::os::fd::{AsFd, AsRawFd};
    // The supervisor may have died between sending the plan and this point, when the signal
    // would not fire: then its end of the lifeline is closed already, and nobody waits for
    // this jail (found by `rootfs_sandboxes_leave_no_mounts_or_directories`: a virtiofsd and
    // its view outlived a supervisor killed during the start).
    let lifeline = take_fd(LIFELINE_FD);
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        ctl.fail("pdeathsig", e.to_string());
    }
    if hung_up(lifeline.as_fd()) {
        ctl.fail("pdeathsig", "the supervisor is gone".to_owned());
    }
    drop(lifeline);
    let none: Option<&str> = None;
    if let Err(e) = nix::mount::mount(
        none,
        "/",
        none,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        none,
    ) {
        ctl.fail("mount", format!("making mounts private: {e}"));
    }
    // The log is a file of the box (root's directory): opened here, before the pivot.
    let log = match nix::fcntl::open(
        &plan.log,
        nix::fcntl::OFlag::O_WRONLY
            | nix::fcntl::OFlag::O_CREAT
            | nix::fcntl::OFlag::O_TRUNC
            | nix::fcntl::OFlag::O_NOFOLLOW
            | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    ) {
        Ok(fd) => fd,
        Err(e) => ctl.fail("log", format!("{}: {e}", plan.log.display())),
    };
    if let Some(tree) = &plan.tree {
        if let Err((what, e)) = super::fs_server::build_tree(&tree.tree) {
            ctl.fail("mount", format!("{what}: {e}"));
        }
    }
    if let Err(e) = build_root(&plan) {
        ctl.fail("jail", crate::error_chain(&e));
    }
    if let Err(e) = rootfs::pivot_into(&plan.root) {
        ctl.fail("jail", e);
    }
    // stdin reads nothing: the helper's own stdin, /dev/null from the supervisor.
    let stdio = [0, log.as_raw_fd(), log.as_raw_fd()];
    let launched = match crate::process::child::launch_restricted(&plan.launch, Some(stdio), None) {
        Ok(r) => r,
        Err(error) => ctl.fail_with(error),
    };
    let (pid, report) = (launched.pid, launched.report);
    drop(log);
    ctl.send(&FromHelper::Restricted(report));
    ctl.send(&FromHelper::Running { pid });
    let status = loop {
        match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => break WaitReport::Code(code),
            Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => {
                break WaitReport::Signal(sig as i32)
            }
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(_) => break WaitReport::Signal(libc::SIGKILL),
        }
    };
    ctl.send(&FromHelper::WorkloadExited(status));
    std::process::exit(match status {
        WaitReport::Code(c) => c,
        WaitReport::Signal(s) => 128 + s,
    })
}

/// The jail's root at `plan.root`: a tmpfs with each of `plan.paths` bound at its path (no
/// link followed), a mount point for the program's /proc, sealed read-only.
fn build_root(plan: &JailPlan) -> Result<(), view::ViewError> {
    let sys = |what: String| move |source| view::ViewError::Sys { what, source };
    let at =
        view::open_host(&plan.root).map_err(sys(format!("opening {}", plan.root.display())))?;
    let fs = crate::process::sys::new_mount(
        "tmpfs",
        &[("mode", "0755"), ("size", "64k"), ("nr_inodes", "256")],
        libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
    )
    .map_err(sys("mounting the jail's root".into()))?;
    crate::process::sys::attach_mount(fs.as_fd(), at.as_fd())
        .map_err(sys("attaching the jail's root".into()))?;
    let root =
        view::open_host(&plan.root).map_err(sys(format!("opening {}", plan.root.display())))?;
    let mut tree = view::Tree::new(root, true);
    for (path, writable) in &plan.paths {
        if let Err(reason) = tree.place_host_path(path, path, *writable, true)? {
            return Err(view::ViewError::Path {
                path: path.display().to_string(),
                reason,
            });
        }
    }
    if let Some(guest) = &plan.tree {
        // The guest's tree with every mount below it (its shares), nosuid and nodev throughout:
        // nothing in it is a device or a privilege on the host, whatever an image carries.
        let source = view::open_host(&guest.tree.root)
            .map_err(sys(format!("opening {}", guest.tree.root.display())))?;
        tree.bind_recursive(source.as_fd(), &guest.at)?;
    }
    tree.dir(Path::new("/proc"))?;
    tree.seal_root()
}

use std::os::fd::AsFd;

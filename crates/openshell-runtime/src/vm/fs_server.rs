//! One virtiofsd per VM (qemu engine).
//!
//! The guest sees a single virtio-fs root: the per-sandbox root directory with every policy
//! directory bind-mounted at its own path, read-only where the policy says; or, for a root
//! filesystem (an image tree), the tree's per-sandbox writable view and nothing of the host. The tree is built
//! by a helper process in a mount namespace of its own, which then becomes virtiofsd
//! (`execve`). Nothing is mounted in the host's namespace, so nothing outlives the daemon, even
//! after a SIGKILL of the supervisor; and read-only shares are enforced by the host kernel
//! (read-only bind mounts) under a daemon that itself can write only to read-write shares.
//!
//! Binds are not recursive: mounts nested below a policy directory on the host are not shown.

use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::mount::{mount, MsFlags};
use nix::sched::CloneFlags;
use tokio::process::Child;
use tracing::debug;

use super::VmError;
use crate::process::child::Control;
use crate::process::protocol::{FromHelper, FsBind, FsServerPlan, ToHelper};
use crate::process::{start_helper, sys, view};
use crate::vm_protocol::BOOT_REQUESTS;
use crate::StdioMode;

/// Start the helper that builds `plan`'s tree and becomes its virtiofsd. Returns once the
/// helper has exec'd virtiofsd (its control socket closed) or failed.
pub async fn start(plan: FsServerPlan) -> Result<Child, VmError> {
    let helper_err = |message: String| VmError::Helper {
        what: "virtiofsd",
        message,
    };
    let mut helper = start_helper(StdioMode::Null, CloneFlags::CLONE_NEWNS, None)
        .map_err(|e| helper_err(e.to_string()))?;
    helper
        .ctl
        .send(&ToHelper::FsServer(plan))
        .await
        .map_err(|e| helper_err(format!("sending the plan: {e}")))?;
    let limit = Duration::from_secs(10);
    match tokio::time::timeout(limit, helper.ctl.recv()).await {
        // The control socket is close-on-exec: end of file means virtiofsd is running.
        Ok(None) => Ok(helper.into_child()),
        Ok(Some(FromHelper::Failed { stage, message })) => {
            let _ = helper.child.wait().await;
            Err(helper_err(format!("{stage}: {message}")))
        }
        Ok(Some(other)) => {
            let _ = helper.child.start_kill();
            Err(helper_err(format!("unexpected message {other:?}")))
        }
        Err(_) => {
            let _ = helper.child.start_kill();
            let _ = helper.child.wait().await;
            Err(helper_err(format!(
                "building the file tree took over {limit:?}"
            )))
        }
    }
}

/// The helper side: build the tree, then exec virtiofsd. Runs single-threaded in a fresh
/// mount namespace (the supervisor unshared it before exec).
pub(crate) fn main(mut ctl: Control, plan: FsServerPlan) -> ! {
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        ctl.fail("pdeathsig", e.to_string());
    }
    if let Err((what, e)) = build_tree(&plan) {
        ctl.fail("mount", format!("{what}: {e}"));
    }
    let log = match std::fs::File::create(&plan.log) {
        Ok(f) => f,
        Err(e) => ctl.fail("log", format!("{}: {e}", plan.log.display())),
    };
    let err = match log.try_clone() {
        Ok(f) => f,
        Err(e) => ctl.fail("log", e.to_string()),
    };
    // Everything but stdio closes at exec, the control socket included: its end of file tells
    // the supervisor that virtiofsd runs.
    if let Err(e) = sys::cloexec_from(3) {
        ctl.fail("exec", format!("marking descriptors close-on-exec: {e}"));
    }
    let e = std::process::Command::new(&plan.program)
        .args(&plan.args)
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(err)
        .exec();
    ctl.fail("exec", format!("{}: {e}", plan.program.display()))
}

type MountFailure = (String, nix::Error);

fn build_tree(plan: &FsServerPlan) -> Result<(), MountFailure> {
    let none: Option<&str> = None;
    // Nothing done here may reach the host's mount namespace.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| ("making / private".to_owned(), e))?;
    match &plan.root_view {
        // An image tree: the root is its writable per-sandbox view (overlay, or a copy).
        Some(view) => {
            let method = crate::process::rootfs::prepare_guest_view(&view.lower, &view.box_dir)
                .map_err(|e| {
                    (
                        format!("the root filesystem's writable view: {e}"),
                        nix::Error::EIO,
                    )
                })?;
            debug!(method = method.name(), "guest root view ready");
        }
        None => {
            let base = plan.base.as_deref().ok_or_else(|| {
                (
                    "neither a base tree nor a root filesystem".to_owned(),
                    nix::Error::EINVAL,
                )
            })?;
            tmpfs_root(base, &plan.root)?;
        }
    }
    // Each share is opened without following a link in any component and bound from that
    // descriptor onto a mount point opened the same way (see `process::view`); a share the
    // supervisor found a moment ago and that is gone or replaced by a link now is an error.
    let root =
        view::open_host(&plan.root).map_err(|e| (format!("opening {}", plan.root.display()), e))?;
    let mut tree = view::Tree::new(root, plan.root_view.is_none());
    for b in &plan.binds {
        let at = Path::new(&b.guest_path);
        tree.place_host_path(&b.source, at, !b.readonly, true)
            .and_then(|placed| {
                placed.map(drop).map_err(|reason| view::ViewError::Path {
                    path: b.guest_path.clone(),
                    reason,
                })
            })
            .map_err(|e| (crate::error_chain(&e), nix::Error::EINVAL))?;
    }
    if let Some(source) = &plan.trust_bundle {
        // Over the policy's /etc (or an image's bundle), or created in the tree where it is
        // ours (the default root's tmpfs, an image's writable view).
        let target = Path::new(crate::TRUST_BUNDLE_PATH);
        view::open_file_to_place(source)
            .and_then(|fd| tree.place_read_only_file(fd.as_fd(), target, plan.root_view.is_some()))
            .map_err(|e| view::trust_error(target, e))
            .map_err(|e| (crate::error_chain(&e), nix::Error::EINVAL))?;
    }
    if let Some(requests) = &plan.boot_requests {
        write_boot_requests(&plan.root, requests)?;
    }
    if plan.root_view.is_none() {
        // The root itself is read-only; the read-write shares stay writable.
        let flags =
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount(none, &plan.root, none, flags, none)
            .map_err(|e| (format!("making {} read-only", plan.root.display()), e))?;
    }
    debug!(root = %plan.root.display(), binds = plan.binds.len(), "vm file tree built");
    Ok(())
}

/// The guest's boot requests at `BOOT_REQUESTS` in the tree, on a tmpfs of their own (read-only,
/// the file mode 0400): they carry the workload's environment and never reach a disk, not even
/// an image view's upper layer. The agent hides the whole directory once it has read them.
fn write_boot_requests(root: &Path, requests: &[u8]) -> Result<(), MountFailure> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (dir, file) = BOOT_REQUESTS
        .rsplit_once('/')
        .unwrap_or(("/", BOOT_REQUESTS));
    let at = FsBind {
        source: PathBuf::new(),
        guest_path: dir.to_owned(),
        readonly: true,
    };
    // A real directory inside the tree (an image's symlink cannot redirect it); made if missing.
    let target = mount_point(root, &at, true)?;
    let none: Option<&str> = None;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let size = requests.len() + 8192;
    mount(
        Some("tmpfs"),
        &target,
        Some("tmpfs"),
        flags,
        Some(format!("size={size},nr_inodes=4,mode=0700").as_str()),
    )
    .map_err(|e| (format!("mounting a tmpfs on {}", target.display()), e))?;
    let path = target.join(file);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&path)
        .and_then(|mut f| f.write_all(requests));
    written.map_err(|e| {
        (
            format!("writing {}", path.display()),
            nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    })?;
    mount(
        none,
        &target,
        none,
        flags | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        none,
    )
    .map_err(|e| (format!("making {} read-only", target.display()), e))?;
    Ok(())
}

/// The default guest root: a tmpfs on `root`, in this namespace only, with `base`'s layout:
/// its directories and symlinks recreated, its files bound read-only. Nothing is copied on the
/// host, and everything goes with the namespace.
fn tmpfs_root(base: &Path, root: &Path) -> Result<(), MountFailure> {
    mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=1m,nr_inodes=4096"),
    )
    .map_err(|e| (format!("mounting a tmpfs on {}", root.display()), e))?;
    copy_layout(base, root)
}

fn copy_layout(from: &Path, to: &Path) -> Result<(), MountFailure> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |what: String| {
        move |e: std::io::Error| {
            (
                what,
                nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            )
        }
    };
    let entries = std::fs::read_dir(from).map_err(io(format!("reading {}", from.display())))?;
    for entry in entries {
        let entry = entry.map_err(io(format!("reading {}", from.display())))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = std::fs::symlink_metadata(&src).map_err(io(format!("{}", src.display())))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let link = std::fs::read_link(&src).map_err(io(format!("{}", src.display())))?;
            std::os::unix::fs::symlink(&link, &dst)
                .map_err(io(format!("creating {}", dst.display())))?;
        } else if ft.is_dir() {
            std::fs::DirBuilder::new()
                .mode(meta.permissions().mode() & 0o7777)
                .create(&dst)
                .map_err(io(format!("creating {}", dst.display())))?;
            copy_layout(&src, &dst)?;
        } else if ft.is_file() {
            std::fs::File::create(&dst).map_err(io(format!("creating {}", dst.display())))?;
            bind(&src, &dst, true)?;
        }
    }
    Ok(())
}

/// Where `b` goes under `root`. The mount point must be a real directory inside the tree: a
/// symlink on the way would let the bind land elsewhere. With `create`, missing directories
/// on the way are made (in the helper's tmpfs).
fn mount_point(root: &Path, b: &FsBind, create: bool) -> Result<PathBuf, MountFailure> {
    let bad = |why: &str| (format!("{}: {why}", b.guest_path), nix::Error::EINVAL);
    let rel = b
        .guest_path
        .strip_prefix('/')
        .filter(|r| !r.is_empty())
        .ok_or_else(|| bad("not an absolute path below /"))?;
    let mut at = root.to_path_buf();
    for part in Path::new(rel).components() {
        match part {
            std::path::Component::Normal(p) => at.push(p),
            _ => return Err(bad("not a normalized path")),
        }
        match at.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(bad("the mount point is not a directory")),
            Err(e) if create && e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&at).map_err(|e| {
                    (
                        format!("{}: creating {}", b.guest_path, at.display()),
                        nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                    )
                })?;
            }
            Err(e) => {
                return Err((
                    format!("{}: {}", b.guest_path, at.display()),
                    nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                ))
            }
        }
    }
    Ok(at)
}

fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), MountFailure> {
    let none: Option<&str> = None;
    let what = || format!("binding {} on {}", source.display(), target.display());
    mount(Some(source), target, none, MsFlags::MS_BIND, none).map_err(|e| (what(), e))?;
    if readonly {
        // Keep noexec where the host has it; a remount would otherwise drop it.
        let noexec = nix::sys::statvfs::statvfs(source)
            .is_ok_and(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_NOEXEC));
        let mut flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        if noexec {
            flags |= MsFlags::MS_NOEXEC;
        }
        mount(none, target, none, flags, none)
            .map_err(|e| (format!("making {} read-only", target.display()), e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bind_at(guest_path: &str) -> FsBind {
        FsBind {
            source: "/usr".into(),
            guest_path: guest_path.into(),
            readonly: true,
        }
    }

    #[test]
    fn mount_points_must_be_real_directories_inside_the_root() {
        let dir = std::env::temp_dir().join(format!("openshell-fs-tree-{}", std::process::id()));
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::create_dir_all(dir.join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(dir.join("elsewhere"), root.join("link")).unwrap();
        std::fs::write(root.join("file"), b"").unwrap();

        assert_eq!(
            mount_point(&root, &bind_at("/usr/lib"), false).unwrap(),
            root.join("usr/lib")
        );
        for bad in [
            "/link",
            "/link/x",
            "/file",
            "/missing",
            "/",
            "usr",
            "/usr/../etc",
        ] {
            assert!(
                mount_point(&root, &bind_at(bad), false).is_err(),
                "{bad} was accepted as a mount point"
            );
        }
        // Creating: missing directories are made, symlinks and files still refused.
        assert_eq!(
            mount_point(&root, &bind_at("/missing/deeper"), true).unwrap(),
            root.join("missing/deeper")
        );
        assert!(root.join("missing/deeper").is_dir());
        for bad in ["/link/x", "/file/x", "/usr/../etc"] {
            assert!(
                mount_point(&root, &bind_at(bad), true).is_err(),
                "{bad} was accepted as a mount point"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

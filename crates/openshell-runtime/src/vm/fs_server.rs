//! One virtiofsd per VM (qemu engine).
//!
//! The guest sees a single virtio-fs root: the per-sandbox root directory with every policy
//! directory bind-mounted at its own path, read-only where the policy says; or, for a root
//! filesystem (an image tree), the tree's per-sandbox writable view and nothing of the host.
//! The tree is built by the helper of virtiofsd's jail (`jail`), in the jail's own mount
//! namespace, and bound into the jail's root; virtiofsd then runs there, unprivileged on the
//! host. Nothing is mounted in the host's namespace, so nothing outlives the daemon, even after
//! a SIGKILL of the supervisor; and read-only shares are enforced by the host kernel (read-only
//! bind mounts) under a daemon that itself can write only to read-write shares.
//!
//! Binds are not recursive: mounts nested below a policy directory on the host are not shown.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};
use tracing::debug;

use super::{jail, VmError};
use crate::process::protocol::{FsBind, GuestTree};
use crate::process::view;
use crate::vm_protocol::BOOT_REQUESTS;

/// The jail of the virtiofsd serving `tree` on `socket` (see `jail`): the tree is built by the
/// jail's helper in the jail's own mount namespace and bound at `jail::GUEST_TREE`; virtiofsd
/// is root of a user namespace of its own that maps guest root to the VMM user and the
/// workload's ids (`workload`, as the guest kernel knows them) to themselves.
pub fn jail_spec(
    vmm_box: &super::VmmBox,
    program: &Path,
    tree: GuestTree,
    socket: &Path,
    workload: Option<(u32, u32)>,
) -> Result<jail::JailSpec, VmError> {
    Ok(jail::JailSpec {
        what: "virtiofsd",
        program: program.to_owned(),
        args: super::qemu::virtiofsd_args(socket, Path::new(jail::GUEST_TREE)),
        log: vmm_box.dir.join("virtiofsd.log"),
        root: vmm_box.dir.join("jail-fs"),
        read_only: super::jail::host_libraries(),
        read_write: vec![vmm_box.fs.clone()],
        kvm: false,
        syscalls: super::vmm_syscalls::VIRTIOFSD,
        ids: jail::JailIds::file_server(vmm_box.ids, workload)?,
        keep_caps: jail::FILE_SERVER_START_CAPS,
        tree: Some(tree),
    })
}

pub(crate) type MountFailure = (String, nix::Error);

/// Build `plan`'s tree at `plan.root`, in the calling helper's own mount namespace.
pub(crate) fn build_tree(plan: &GuestTree) -> Result<(), MountFailure> {
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
            .and_then(|fd| match plan.root_view {
                // An image: its own links resolved in the tree, its other bundles covered.
                Some(_) => view::place_trust_in_image(&mut tree, fd.as_fd(), target).map(drop),
                None => tree.place_read_only_file(fd.as_fd(), target, false),
            })
            .map_err(|e| view::trust_error(target, e))
            .map_err(|e| (crate::error_chain(&e), nix::Error::EINVAL))?;
    }
    if let Some(requests) = &plan.boot_requests {
        write_boot_requests(&plan.root, requests, plan.guest_root)?;
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
fn write_boot_requests(
    root: &Path,
    requests: &[u8],
    (uid, gid): (u32, u32),
) -> Result<(), MountFailure> {
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
        Some(format!("size={size},nr_inodes=4,mode=0700,uid={uid},gid={gid}").as_str()),
    )
    .map_err(|e| (format!("mounting a tmpfs on {}", target.display()), e))?;
    let path = target.join(file);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(requests)?;
            // Guest root reads them: on the host that is the VMM user.
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
        });
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

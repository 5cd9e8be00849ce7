//! A root filesystem from a directory: the per-sandbox writable view (overlay or copy), the
//! minimal /proc and /dev inside it, and pivot_root. The helper-side functions run in freshly
//! exec'd, single-threaded helpers (the sandbox's init; the vm backend's virtiofsd wrapper),
//! never in the supervisor.
//!
//! Per sandbox, `<box>` ([`process_run_dir`]`/<id>` on the process backend, the vm box
//! directory on the vm backend) holds `upper/` and `work/` (the overlay's), or `copy/` (the
//! fallback), and `merged/`, where the writable view is mounted. The lower tree is only ever
//! read.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::view;

/// How the sandbox's writable root was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootMethod {
    /// overlayfs: the tree is the lower layer, `<box>/upper` takes the writes.
    Overlay,
    /// A per-sandbox copy of the tree (overlayfs was unavailable, for the reason given).
    Copy { reason: String },
}

impl RootMethod {
    pub fn name(&self) -> &'static str {
        match self {
            RootMethod::Overlay => "overlay",
            RootMethod::Copy { .. } => "copy",
        }
    }
}

/// Where the process backend keeps per-sandbox root directories: `$OPENSHELL_RUN_DIR/rootfs`,
/// else `/run/openshell/rootfs`. On Debian /run is a tmpfs: creating and removing a sandbox's
/// directories costs microseconds instead of milliseconds, and what the sandbox writes into its
/// root is shared memory charged to its own memory cgroup, so `resources.memory_mib` bounds it.
pub fn process_run_dir() -> PathBuf {
    std::env::var_os("OPENSHELL_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/openshell"))
        .join("rootfs")
}

/// Remove `<run>/<id>` directories of supervisors that no longer exist (ids start with the
/// supervisor's pid in hex): the process backend's holder normally removes its own, so this
/// covers a holder that was killed too; the vm backend's boxes of a SIGKILLed supervisor.
pub fn collect_stale(run: &Path) {
    let Ok(entries) = std::fs::read_dir(run) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .split('-')
            .next()
            .and_then(|p| i32::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Read a file of the tree at `root`, resolving every component (symlinks included) inside the
/// tree, never outside it (openat2 with RESOLVE_IN_ROOT).
pub fn read_in_tree(root: &Path, path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let dir = std::fs::File::open(root)?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = nix::fcntl::openat2(dir.as_fd(), path, how)?;
    let mut text = String::new();
    std::fs::File::from(fd).read_to_string(&mut text)?;
    Ok(text)
}

fn errno_text(e: nix::Error) -> String {
    std::io::Error::from(e).to_string()
}

/// Make `<box>/merged` the sandbox's writable view of `lower`: an overlay, or a copy bind-mounted
/// there when overlayfs refuses. Must run in a private mount namespace.
pub fn make_writable_root(lower: &Path, box_dir: &Path) -> Result<(PathBuf, RootMethod), String> {
    // overlayfs splits its options on ',' (and lowerdir on ':'); such a path cannot be said.
    for path in [lower, box_dir] {
        if path
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .any(|b| matches!(b, b',' | b':' | b'\\'))
        {
            return Err(format!(
                "{}: the path may not contain ',', ':' or '\\' (overlayfs options)",
                path.display()
            ));
        }
    }
    let merged = box_dir.join("merged");
    let upper = box_dir.join("upper");
    let work = box_dir.join("work");
    for d in [&merged, &upper, &work] {
        std::fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    // nodev: a device node in an image (say a 0666 copy of the host's disk) opens nothing; the
    // sandbox's devices are the ones bound into its own /dev. nosuid: set-id bits grant nothing
    // (no_new_privs already ensures that for the workload).
    let flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    let reason = match mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        flags,
        Some(data.as_str()),
    ) {
        Ok(()) => {
            // The root directory of the view takes the tree's mode (an image's `/` is 0755).
            return Ok((merged, RootMethod::Overlay));
        }
        Err(e) => format!("overlayfs: {}", errno_text(e)),
    };
    let copy = box_dir.join("copy");
    copy_tree(lower, &copy).map_err(|e| {
        format!(
            "{reason}; copying {} to {}: {e}",
            lower.display(),
            copy.display()
        )
    })?;
    mount(
        Some(&copy),
        &merged,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("bind-mounting the copy: {}", errno_text(e)))?;
    mount(
        None::<&str>,
        &merged,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags,
        None::<&str>,
    )
    .map_err(|e| format!("remounting the copy nodev,nosuid: {}", errno_text(e)))?;
    Ok((merged, RootMethod::Copy { reason }))
}

/// A full copy (no hard links into the tree, so writes never reach it): modes, ownership,
/// symlinks, hard links within the tree, device nodes and fifos. Regular files go through
/// `copy_file_range`, which reflinks where the filesystem can.
///
/// Root does this inside trees an image controls, so nothing here follows a link: every entry
/// is read and created relative to directory descriptors (`openat2` without following links,
/// `O_NOFOLLOW | O_EXCL` creations, `*at` calls with `AT_SYMLINK_NOFOLLOW`), and a link the
/// image carries is copied as a link, never entered.
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let src = open_dir_nofollow(nix::fcntl::AT_FDCWD, from)?;
    match nix::sys::stat::mkdirat(nix::fcntl::AT_FDCWD, to, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(nix::Error::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let dst = open_dir_nofollow(nix::fcntl::AT_FDCWD, to)?;
    let mut links = HashMap::new();
    copy_dir_at(&src, &dst, Path::new(""), &dst, &mut links, false)?;
    copy_owner_and_mode(&src, &dst)
}

/// Copy the entries of `upper` into the existing tree `into`, replacing whatever `into` has
/// at the same names (a directory on both sides is merged; anything else is removed first,
/// without following it): how the guest's entries enter a per-sandbox copy of an image.
pub fn merge_into(upper: &Path, into: &Path) -> std::io::Result<()> {
    let src = open_dir_nofollow(nix::fcntl::AT_FDCWD, upper)?;
    let dst = open_dir_nofollow(nix::fcntl::AT_FDCWD, into)?;
    let mut links = HashMap::new();
    copy_dir_at(&src, &dst, Path::new(""), &dst, &mut links, true)
}

fn open_dir_nofollow<Fd: AsFd>(dir: Fd, path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    Ok(nix::fcntl::openat2(dir, path, how)?)
}

fn open_file_nofollow<Fd: AsFd>(dir: Fd, name: &std::ffi::OsStr) -> std::io::Result<std::fs::File> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
    Ok(std::fs::File::from(nix::fcntl::openat2(dir, name, how)?))
}

fn copy_owner_and_mode(
    src: &std::os::fd::OwnedFd,
    dst: &std::os::fd::OwnedFd,
) -> std::io::Result<()> {
    let st = nix::sys::stat::fstat(src)?;
    nix::unistd::fchown(
        dst,
        Some(nix::unistd::Uid::from_raw(st.st_uid)),
        Some(nix::unistd::Gid::from_raw(st.st_gid)),
    )?;
    nix::sys::stat::fchmod(dst, Mode::from_bits_truncate(st.st_mode & 0o7777))?;
    Ok(())
}

/// Give the entry `name` of `dir` (just made by the copy) the `owner`, without following it.
fn chown_entry(
    dir: &std::os::fd::OwnedFd,
    name: &std::ffi::OsStr,
    owner: (Option<nix::unistd::Uid>, Option<nix::unistd::Gid>),
) -> std::io::Result<()> {
    let nofollow = nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW;
    Ok(nix::unistd::fchownat(
        dir, name, owner.0, owner.1, nofollow,
    )?)
}

/// Remove `name` in `dir` whatever it is, without following it.
fn remove_at(dir: &std::os::fd::OwnedFd, name: &std::ffi::OsStr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // std's remove_dir_all never follows a link (it unlinks one), and walks with openat.
    let path = Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
    std::fs::remove_dir_all(&path).or_else(|e| match e.kind() {
        std::io::ErrorKind::NotADirectory => std::fs::remove_file(&path),
        _ => Err(e),
    })
}

fn copy_dir_at(
    src: &std::os::fd::OwnedFd,
    dst: &std::os::fd::OwnedFd,
    rel: &Path,
    dst_root: &std::os::fd::OwnedFd,
    links: &mut HashMap<(u64, u64), PathBuf>,
    replace: bool,
) -> std::io::Result<()> {
    use nix::fcntl::AtFlags;
    use nix::sys::stat::SFlag;
    let entries = nix::dir::Dir::from_fd(src.try_clone()?)?;
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(std::ffi::OsStr::from_bytes(name).to_owned());
        }
    }
    for name in names {
        let st = nix::sys::stat::fstatat(src, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        let mode = Mode::from_bits_truncate(st.st_mode & 0o7777);
        let owner = (
            Some(nix::unistd::Uid::from_raw(st.st_uid)),
            Some(nix::unistd::Gid::from_raw(st.st_gid)),
        );
        if replace {
            match nix::sys::stat::fstatat(dst, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(existing) => {
                    let existing_kind = SFlag::from_bits_truncate(existing.st_mode) & SFlag::S_IFMT;
                    if !(kind == SFlag::S_IFDIR && existing_kind == SFlag::S_IFDIR) {
                        remove_at(dst, &name)?;
                    }
                }
                Err(nix::Error::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        match kind {
            SFlag::S_IFDIR => {
                match nix::sys::stat::mkdirat(
                    dst,
                    name.as_os_str(),
                    Mode::from_bits_truncate(0o700),
                ) {
                    Ok(()) => {}
                    Err(nix::Error::EEXIST) if replace => {}
                    Err(e) => return Err(e.into()),
                }
                let sub_src = open_dir_nofollow(src, Path::new(&name))?;
                let sub_dst = open_dir_nofollow(dst, Path::new(&name))?;
                copy_dir_at(
                    &sub_src,
                    &sub_dst,
                    &rel.join(&name),
                    dst_root,
                    links,
                    replace,
                )?;
                copy_owner_and_mode(&sub_src, &sub_dst)?;
            }
            SFlag::S_IFLNK => {
                let target = nix::fcntl::readlinkat(src, name.as_os_str())?;
                nix::unistd::symlinkat(target.as_os_str(), dst, name.as_os_str())?;
                chown_entry(dst, &name, owner)?;
            }
            SFlag::S_IFREG => {
                if st.st_nlink > 1 {
                    if let Some(first) = links.get(&(st.st_dev, st.st_ino)) {
                        // `first` is a file this copy made, below directories it made: no
                        // component of it can be a link.
                        nix::unistd::linkat(
                            dst_root,
                            first.as_path(),
                            dst,
                            name.as_os_str(),
                            AtFlags::empty(),
                        )?;
                        continue;
                    }
                    links.insert((st.st_dev, st.st_ino), rel.join(&name));
                }
                let mut from = open_file_nofollow(src, &name)?;
                let fd = nix::fcntl::openat(
                    dst,
                    name.as_os_str(),
                    OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_WRONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )?;
                let mut to = std::fs::File::from(fd);
                std::io::copy(&mut from, &mut to)?;
                nix::unistd::fchown(&to, owner.0, owner.1)?;
                nix::sys::stat::fchmod(&to, mode)?;
            }
            SFlag::S_IFIFO | SFlag::S_IFCHR | SFlag::S_IFBLK => {
                nix::sys::stat::mknodat(dst, name.as_os_str(), kind, mode, st.st_rdev)?;
                chown_entry(dst, &name, owner)?;
                // mknod applied the umask; the node was just made here and is not a link.
                nix::sys::stat::fchmodat(
                    dst,
                    name.as_os_str(),
                    mode,
                    nix::sys::stat::FchmodatFlags::FollowSymlink,
                )?;
            }
            // Sockets mean nothing in a copy.
            _ => {}
        }
    }
    Ok(())
}

/// The sandbox's own file systems inside a root filesystem's writable view `merged` (before
/// the pivot): /proc and /dev as in a policy view ([`view::mount_proc_and_dev`]), and a private
/// tmpfs on the tree's /tmp. Mount points must be real directories of the view (a symbolic
/// link or a file there is refused, so no mount lands outside it); missing ones are created in
/// the writable view, never in the tree.
/// Bind the sandbox's CA bundle (the host file `source`) read-only at `TRUST_BUNDLE_PATH` in
/// a root filesystem's writable view `merged`: over the image's own bundle, or created in the
/// view (its per-sandbox layer) when the image has none. A link on the way is refused.
pub fn place_trust_bundle(merged: &Path, source: &Path) -> Result<(), view::ViewError> {
    let fd = view::open_file_to_place(source)?;
    let root = view::open_host(merged).map_err(|source| view::ViewError::Sys {
        what: format!("opening {}", merged.display()),
        source,
    })?;
    let mut tree = view::Tree::new(root, false);
    let target = Path::new(crate::TRUST_BUNDLE_PATH);
    view::place_trust_in_image(&mut tree, fd.as_fd(), target)
        .map(drop)
        .map_err(|e| view::trust_error(target, e))
}

pub fn own_filesystems(merged: &Path, tmp: view::TmpPlan) -> Result<(), String> {
    let root = view::open_host(merged).map_err(|e| format!("opening {}: {e}", merged.display()))?;
    let mut tree = view::Tree::new(root, true);
    let size = match tmp {
        view::TmpPlan::Private { size_mib, .. } => size_mib,
        view::TmpPlan::Host => None,
    };
    view::mount_proc_and_dev(&mut tree, size).map_err(|e| crate::error_chain(&e))?;
    tree.mount_private_tmp(size, false)
        .map_err(|e| crate::error_chain(&e))
}

/// Make `dir` (a mount point in the caller's private mount namespace) the root: pivot_root
/// into it and detach the old root, so nothing of the host's tree stays reachable.
pub fn pivot_into(dir: &Path) -> Result<(), String> {
    nix::unistd::chdir(dir).map_err(|e| format!("entering the root: {}", errno_text(e)))?;
    // The old root ends up stacked on the new one; detaching it leaves only the new root.
    nix::unistd::pivot_root(".", ".").map_err(|e| format!("pivot_root: {}", errno_text(e)))?;
    umount2(".", MntFlags::MNT_DETACH)
        .map_err(|e| format!("detaching the old root: {}", errno_text(e)))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {}", errno_text(e)))?;
    Ok(())
}

/// The vm backend's view before boot: what the guest needs in the per-sandbox upper layer (the
/// agent at `/openshell/agent`, mount points the tree may lack), written to `<box>/upper`, so the
/// tree is never touched. For the copy fallback the same entries are applied after the copy.
pub fn seed_guest_upper(lower: &Path, upper: &Path, agent: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(upper)?;
    for (name, mode) in [
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("run", 0o755),
        ("tmp", 0o1777),
    ] {
        if std::fs::symlink_metadata(lower.join(name)).is_err() {
            let p = upper.join(name);
            std::fs::DirBuilder::new().mode(mode).create(&p)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
        }
    }
    let dir = upper.join("openshell");
    std::fs::DirBuilder::new().mode(0o755).create(&dir)?;
    // Opaque: nothing of the image's own /openshell shows through the overlay (a planted
    // `boot/requests`, a link where the agent goes); the copy fallback replaces it instead.
    let opened = std::fs::File::open(&dir)?;
    super::sys::set_xattr(opened.as_fd(), c"trusted.overlay.opaque", b"y")?;
    // Copied, never linked: the guest root is writable, the host's artifact must stay intact.
    std::fs::copy(agent, dir.join("agent"))?;
    std::fs::set_permissions(dir.join("agent"), std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// The vm backend's view of a root filesystem, in the caller's (private) mount namespace:
/// `<box>/merged` over `lower` and `<box>/upper` (seeded by [`seed_guest_upper`]), or a copy with
/// the upper layer's entries added. The method is recorded in `<box>/root-method` (JSON) for the
/// supervisor's log.
pub fn prepare_guest_view(lower: &Path, box_dir: &Path) -> Result<RootMethod, String> {
    let (merged, method) = make_writable_root(lower, box_dir)?;
    if let RootMethod::Copy { .. } = method {
        // The copy has no upper layer: put the guest's entries into it, replacing whatever the
        // image has at those names (its own /openshell included), never writing through a
        // link it carries.
        let merged_dir = open_dir_nofollow(nix::fcntl::AT_FDCWD, &merged)
            .map_err(|e| format!("opening {}: {e}", merged.display()))?;
        match remove_at(&merged_dir, std::ffi::OsStr::new("openshell")) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing the image's /openshell: {e}")),
        }
        merge_into(&box_dir.join("upper"), &merged)
            .map_err(|e| format!("adding the guest's entries to the copy: {e}"))?;
    }
    let record = serde_json::to_string(&method).unwrap_or_default();
    std::fs::write(box_dir.join("root-method"), record)
        .map_err(|e| format!("recording the root method: {e}"))?;
    Ok(method)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn files_are_read_inside_the_tree_even_through_absolute_symlinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("tree");
        std::fs::create_dir_all(root.join("real")).expect("mkdir");
        std::fs::write(root.join("real/passwd"), "tree's\n").expect("write");
        // An image whose /etc is an absolute symlink must not lead to the host's /etc.
        std::os::unix::fs::symlink("/real", root.join("etc")).expect("symlink");
        std::os::unix::fs::symlink("../../../../../../etc/hostname", root.join("up"))
            .expect("symlink");
        assert_eq!(
            read_in_tree(&root, "/etc/passwd").expect("read"),
            "tree's\n"
        );
        assert_eq!(
            read_in_tree(&root, "/up").map_err(|e| e.kind()),
            Err(std::io::ErrorKind::NotFound),
            "`..` stops at the tree's root"
        );
    }

    #[test]
    fn a_copy_keeps_modes_links_and_never_shares_an_inode_with_the_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        std::fs::create_dir_all(from.join("bin")).expect("mkdir");
        std::fs::write(from.join("bin/tool"), "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(
            from.join("bin/tool"),
            std::fs::Permissions::from_mode(0o4750),
        )
        .expect("chmod");
        std::fs::hard_link(from.join("bin/tool"), from.join("bin/alias")).expect("link");
        std::os::unix::fs::symlink("tool", from.join("bin/sym")).expect("symlink");
        std::fs::set_permissions(&from, std::fs::Permissions::from_mode(0o711)).expect("chmod");
        copy_tree(&from, &to).expect("copy");

        let meta = |p: &Path| std::fs::symlink_metadata(p).expect("stat");
        assert_eq!(meta(&to.join("bin/tool")).mode() & 0o7777, 0o4750);
        assert_eq!(meta(&to).mode() & 0o7777, 0o711);
        assert_eq!(
            std::fs::read_link(to.join("bin/sym")).expect("readlink"),
            PathBuf::from("tool")
        );
        // Hard links within the tree stay links within the copy...
        assert_eq!(
            meta(&to.join("bin/tool")).ino(),
            meta(&to.join("bin/alias")).ino()
        );
        // ...and a write to the copy never reaches the tree.
        assert_ne!(
            meta(&to.join("bin/tool")).ino(),
            meta(&from.join("bin/tool")).ino()
        );
        std::fs::write(to.join("bin/tool"), "changed").expect("write");
        assert_eq!(
            std::fs::read_to_string(from.join("bin/tool")).expect("read"),
            "#!/bin/sh\n"
        );
    }

    /// An image that carries `openshell -> <outside>` or `openshell/agent -> <outside>` must
    /// not make the copy fallback write through the link (root would overwrite a host file).
    #[test]
    fn merging_the_guest_entries_never_writes_through_an_image_link() {
        let dir = tempfile::tempdir().expect("tempdir");
        let canary = dir.path().join("shadow");
        std::fs::write(&canary, "host secret\n").expect("write");
        for image_entry in ["dir-link", "file-link"] {
            let (upper, merged) = (dir.path().join("upper"), dir.path().join("merged"));
            let _ = std::fs::remove_dir_all(&upper);
            let _ = std::fs::remove_dir_all(&merged);
            std::fs::create_dir_all(upper.join("openshell")).expect("mkdir");
            std::fs::write(upper.join("openshell/agent"), "agent").expect("write");
            std::fs::create_dir_all(&merged).expect("mkdir");
            match image_entry {
                "dir-link" => {
                    std::os::unix::fs::symlink(dir.path(), merged.join("openshell"))
                        .expect("symlink");
                    std::os::unix::fs::symlink(&canary, dir.path().join("agent")).expect("symlink");
                }
                _ => {
                    std::fs::create_dir(merged.join("openshell")).expect("mkdir");
                    std::os::unix::fs::symlink(&canary, merged.join("openshell/agent"))
                        .expect("symlink");
                }
            }
            merge_into(&upper, &merged).expect("merge");
            assert_eq!(
                std::fs::read_to_string(&canary).expect("canary"),
                "host secret\n",
                "{image_entry}: the host file is untouched"
            );
            let agent = merged.join("openshell/agent");
            assert!(
                std::fs::symlink_metadata(merged.join("openshell"))
                    .expect("stat")
                    .is_dir(),
                "{image_entry}"
            );
            assert!(
                std::fs::symlink_metadata(&agent).expect("stat").is_file(),
                "{image_entry}"
            );
            assert_eq!(std::fs::read_to_string(&agent).expect("agent"), "agent");
            let _ = std::fs::remove_file(dir.path().join("agent"));
        }
    }

    #[test]
    fn the_guest_entries_go_to_the_upper_layer_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (lower, upper) = (dir.path().join("lower"), dir.path().join("upper"));
        std::fs::create_dir_all(lower.join("proc")).expect("mkdir");
        let agent = dir.path().join("agent");
        std::fs::write(&agent, "agent").expect("write");
        seed_guest_upper(&lower, &upper, &agent).expect("seed");
        let mut names: Vec<String> = std::fs::read_dir(&upper)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["dev", "openshell", "run", "sys", "tmp"]);
        assert_eq!(
            std::fs::read_to_string(upper.join("openshell/agent")).expect("agent"),
            "agent"
        );
        assert_ne!(
            std::fs::metadata(upper.join("openshell/agent"))
                .expect("stat")
                .ino(),
            std::fs::metadata(&agent).expect("stat").ino(),
            "copied, not linked"
        );
        assert_eq!(
            std::fs::read_dir(&lower).expect("read_dir").count(),
            1,
            "the tree is untouched"
        );
    }
}

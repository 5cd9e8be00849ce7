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
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

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
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    copy_dir(from, to, &mut links)
}

fn copy_dir(
    from: &Path,
    to: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    match std::fs::create_dir(to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let src = e.path();
        let dst = to.join(e.file_name());
        let m = std::fs::symlink_metadata(&src)?;
        let ft = m.file_type();
        if ft.is_dir() {
            copy_dir(&src, &dst, links)?;
            continue;
        }
        if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
            std::os::unix::fs::lchown(&dst, Some(m.uid()), Some(m.gid()))?;
            continue;
        }
        if m.nlink() > 1 {
            if let Some(first) = links.get(&(m.dev(), m.ino())) {
                std::fs::hard_link(first, &dst)?;
                continue;
            }
            links.insert((m.dev(), m.ino()), dst.clone());
        }
        if ft.is_file() {
            std::fs::copy(&src, &dst)?;
        } else {
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_fifo() {
                nix::sys::stat::SFlag::S_IFIFO
            } else if ft.is_char_device() {
                nix::sys::stat::SFlag::S_IFCHR
            } else if ft.is_block_device() {
                nix::sys::stat::SFlag::S_IFBLK
            } else {
                // Sockets mean nothing in a copy.
                continue;
            };
            nix::sys::stat::mknod(
                &dst,
                kind,
                Mode::from_bits_truncate(m.mode() & 0o7777),
                m.rdev(),
            )?;
        }
        std::os::unix::fs::lchown(&dst, Some(m.uid()), Some(m.gid()))?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    Ok(())
}

/// Make sure `root/<name>` is a real directory (created in the writable view, never the tree);
/// a symlink or a file there is refused, so no mount lands outside the root.
fn ensure_dir(root: &Path, name: &str, mode: u32) -> Result<PathBuf, String> {
    let path = root.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_dir() => Ok(path),
        Ok(_) => Err(format!(
            "/{name} in the root filesystem is not a directory (a symlink or a file)"
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(mode)
                .create(&path)
                .map_err(|e| format!("creating /{name}: {e}"))?;
            // The umask does not apply to what we ask for.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod /{name}: {e}"))?;
            Ok(path)
        }
        Err(e) => Err(format!("/{name}: {e}")),
    }
}

/// The host's device nodes bind-mounted into the sandbox's /dev.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Inside `merged`: a fresh /proc (of the caller's pid namespace), a minimal tmpfs /dev (the
/// host's null, zero, full, random, urandom and tty bind-mounted; a private devpts for PTYs;
/// /dev/shm), /tmp; then pivot_root into it and detach the old root. Must run in a private
/// mount namespace whose pid namespace is the sandbox's.
pub fn enter_root(merged: &Path) -> Result<(), String> {
    let proc_dir = ensure_dir(merged, "proc", 0o555)?;
    mount(
        Some("proc"),
        &proc_dir,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| format!("mounting /proc: {}", errno_text(e)))?;
    let dev = ensure_dir(merged, "dev", 0o755)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )
    .map_err(|e| format!("mounting /dev: {}", errno_text(e)))?;
    for name in DEVICES {
        let target = dev.join(name);
        std::fs::File::create(&target).map_err(|e| format!("creating /dev/{name}: {e}"))?;
        let source = Path::new("/dev").join(name);
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("bind-mounting /dev/{name}: {}", errno_text(e)))?;
    }
    let pts = dev.join("pts");
    std::fs::create_dir(&pts).map_err(|e| format!("creating /dev/pts: {e}"))?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )
    .map_err(|e| format!("mounting /dev/pts: {}", errno_text(e)))?;
    let links = [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ];
    for (name, target) in links {
        std::os::unix::fs::symlink(target, dev.join(name))
            .map_err(|e| format!("creating /dev/{name}: {e}"))?;
    }
    let shm = dev.join("shm");
    std::fs::DirBuilder::new()
        .mode(0o1777)
        .create(&shm)
        .and_then(|()| std::fs::set_permissions(&shm, std::fs::Permissions::from_mode(0o1777)))
        .map_err(|e| format!("creating /dev/shm: {e}"))?;
    ensure_dir(merged, "tmp", 0o1777)?;

    nix::unistd::chdir(merged).map_err(|e| format!("entering the root: {}", errno_text(e)))?;
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
        // The copy has no upper layer: put the guest's entries into it.
        copy_dir(&box_dir.join("upper"), &merged, &mut HashMap::new())
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

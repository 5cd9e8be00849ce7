//! The workload's file system view, built from the policy: a fresh root that holds the policy's
//! paths, the sandbox's own `/proc`, `/dev` and `/tmp`, and nothing else. A path the policy does
//! not list does not exist in the sandbox (ENOENT), as in the vm backend's guest.
//!
//! The supervisor computes a [`ViewPlan`] (pure, no I/O); a helper carries it out as root in a
//! mount namespace of its own (the process backend's init, before it pivots into the view; the
//! vm backend's file-tree helper, for the host paths shared into the guest). Host paths are
//! opened once with `openat2(RESOLVE_NO_SYMLINKS)` (no symbolic link is followed in any
//! component) and bound from those descriptors with the mount API (`open_tree`,
//! `mount_setattr`, `move_mount`), onto mount points opened the same way inside the view, so a
//! link planted by an earlier workload can neither redirect a bind nor move a mount point.
//!
//! - read_only paths: bound `ro,nosuid,nodev`: neither their contents nor their metadata (mode,
//!   owner, times, extended attributes) can change;
//! - read_write paths (and the workdir with `include_workdir`): bound `rw,nosuid,nodev`;
//! - a policy path that is itself a symbolic link (`/bin -> usr/bin`) is recreated as the same
//!   link inside the view, where it resolves among the view's own paths only;
//! - `/proc`: a fresh procfs of the sandbox's pid namespace, with the kernel's sensitive files
//!   masked and its tunables read only (runc's lists); `/dev`: a small tmpfs with null, zero,
//!   full, random, urandom and tty bound from the host, a private devpts and `/dev/shm`;
//!   `/tmp`: a tmpfs of the sandbox's own (`filesystem_policy.tmp: private`, the default),
//!   charged to its memory, or the host's /tmp with `tmp: host`;
//! - binds are not recursive: what is mounted below a policy path on the host is not shown.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};
use serde::{Deserialize, Serialize};

use super::sys;

/// What the view holds, in the order it is built. Computed by [`plan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewPlan {
    /// `/` is in read_only: the view's root is the host's root directory, read only (its
    /// mount only: what is mounted below it is not shown), instead of an empty tmpfs.
    pub host_root: bool,
    /// Host paths bound at the same path, parents before children.
    pub binds: Vec<ViewBind>,
    pub tmp: TmpPlan,
    /// A missing path, or one with a symbolic link before its last component, is an error
    /// (`hard_requirement`) or skipped and reported (`best_effort`).
    pub hard_requirement: bool,
}

/// One host path in the view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewBind {
    pub path: PathBuf,
    pub writable: bool,
}

/// The sandbox's `/tmp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TmpPlan {
    /// A tmpfs of the sandbox's own, at most `size_mib` (`None`: the kernel's default, half of
    /// RAM; the memory cgroup bounds it either way), read only when the policy lists `/tmp` in
    /// read_only but not in read_write.
    Private {
        size_mib: Option<u64>,
        readonly: bool,
    },
    /// The host's `/tmp`, bound like any policy path (it is one of the binds).
    Host,
}

/// The host device nodes every sandbox's `/dev` gets (bound from the host's `/dev`).
pub const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Entries of the sandbox's own `/dev` besides [`DEVICES`].
const OWN_DEV_ENTRIES: [&str; 7] = ["pts", "ptmx", "shm", "fd", "stdin", "stdout", "stderr"];

/// Whether `path` names something of the sandbox's own (its /proc, its /dev, its private /tmp)
/// rather than a host path to bind.
fn is_own(path: &Path, tmp: TmpMode) -> bool {
    if path.starts_with("/proc") || path == Path::new("/dev") {
        return true;
    }
    if let Ok(rest) = path.strip_prefix("/dev") {
        let first = rest.components().next().map(|c| c.as_os_str());
        return first.is_some_and(|f| {
            DEVICES
                .iter()
                .chain(OWN_DEV_ENTRIES.iter())
                .any(|d| OsStr::new(d) == f)
        });
    }
    tmp == TmpMode::Private && path == Path::new("/tmp")
}

pub use openshell_policy::TmpMode;

/// The view for a policy's read_only and read_write paths (the workdir already added to
/// read_write when `include_workdir` says so, and named as `workdir`: it is always the host's
/// directory, even when it is `/tmp`, which then is the host's /tmp).
pub fn plan(
    read_only: &[PathBuf],
    read_write: &[PathBuf],
    workdir: Option<&Path>,
    tmp: TmpMode,
    tmp_size_mib: Option<u64>,
    hard_requirement: bool,
) -> ViewPlan {
    // A path listed both ways is writable (Landlock's union).
    let mut paths: BTreeMap<&Path, bool> = BTreeMap::new();
    for p in read_only {
        paths.entry(p.as_path()).or_insert(false);
    }
    for p in read_write {
        paths.insert(p.as_path(), true);
    }
    let host_root = paths.contains_key(Path::new("/"));
    let tmp = match workdir {
        Some(w) if w == Path::new("/tmp") => TmpMode::Host,
        _ => tmp,
    };
    let mut binds: Vec<ViewBind> = paths
        .iter()
        .filter(|(p, _)| **p != Path::new("/") && !is_own(p, tmp))
        .map(|(p, w)| ViewBind {
            path: p.to_path_buf(),
            writable: *w,
        })
        .collect();
    // Parents before children (a stable sort keeps the rest in path order).
    binds.sort_by_key(|b| b.path.components().count());
    let tmp = match tmp {
        TmpMode::Host => TmpPlan::Host,
        TmpMode::Private => TmpPlan::Private {
            size_mib: tmp_size_mib,
            readonly: paths.get(Path::new("/tmp")) == Some(&false),
        },
    };
    ViewPlan {
        host_root,
        binds,
        tmp,
        hard_requirement,
    }
}

/// Bind the opened entry `fd` read-only (nosuid, nodev) over itself.
pub fn freeze(fd: BorrowedFd<'_>) -> nix::Result<()> {
    if kind_of(fd)? == SFlag::S_IFLNK {
        return Ok(());
    }
    let clone = sys::clone_mount(fd)?;
    sys::set_mount_attrs(clone.as_fd(), RDONLY | NOSUID | NODEV)?;
    sys::attach_mount(clone.as_fd(), fd)
}

/// Why the view could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("filesystem_policy: {path}: {reason}")]
    Path { path: String, reason: String },
    #[error("{what}")]
    Sys {
        what: String,
        #[source]
        source: Errno,
    },
}

fn sys_err(what: impl Into<String>) -> impl FnOnce(Errno) -> ViewError {
    let what = what.into();
    move |source| ViewError::Sys { what, source }
}

/// A path the policy names that the view left out (best_effort), with the reason.
pub type Skipped = (String, String);

/// What a host path turned out to be once opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    Bound,
    Linked,
}

/// `MOUNT_ATTR_*` flags.
const RDONLY: u64 = libc::MOUNT_ATTR_RDONLY;
const NOSUID: u64 = libc::MOUNT_ATTR_NOSUID;
const NODEV: u64 = libc::MOUNT_ATTR_NODEV;
const NOEXEC: u64 = libc::MOUNT_ATTR_NOEXEC;

/// Open `path` (absolute) on the host without following a symbolic link in any component;
/// a trailing symbolic link is opened itself (O_PATH | O_NOFOLLOW).
pub fn open_host(path: &Path) -> nix::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path, how)
}

/// Open one component `name` below `dir` without following it or any link.
fn open_below(dir: BorrowedFd<'_>, name: &OsStr, directory: bool) -> nix::Result<OwnedFd> {
    let mut flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    if directory {
        flags |= OFlag::O_DIRECTORY;
    }
    let how = OpenHow::new().flags(flags).resolve(
        ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS
            | ResolveFlag::RESOLVE_BENEATH,
    );
    nix::fcntl::openat2(dir, name, how)
}

fn kind_of(fd: BorrowedFd<'_>) -> nix::Result<SFlag> {
    let st = nix::sys::stat::fstat(fd)?;
    Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT)
}

/// A tree being built: its root directory and which of its paths are mounts of ours (where
/// mount points may be created) and which are host binds (where nothing is ever created).
pub struct Tree {
    root: OwnedFd,
    /// Mount points in the view: `true` for our own file systems, `false` for host binds.
    mounts: Vec<(PathBuf, bool)>,
}

impl Tree {
    /// A tree whose root directory is `root`; `own_root`: the root is a file system of ours
    /// (a tmpfs), not a host directory.
    pub fn new(root: OwnedFd, own_root: bool) -> Tree {
        Tree {
            root,
            mounts: vec![(PathBuf::from("/"), own_root)],
        }
    }

    /// The root directory.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Whether new entries may be created in directory `dir` of the view: only inside a file
    /// system of ours (the innermost mount that covers it).
    fn ours(&self, dir: &Path) -> bool {
        self.mounts
            .iter()
            .filter(|(m, _)| dir.starts_with(m))
            .max_by_key(|(m, _)| m.components().count())
            .is_some_and(|(_, own)| *own)
    }

    /// Open the directory `path` (absolute, normalised) of the view, creating the missing
    /// components where they would land in a file system of ours. No component may be a
    /// symbolic link.
    pub fn dir(&self, path: &Path) -> Result<OwnedFd, ViewError> {
        self.dir_with(path, false)
    }

    /// [`dir`](Self::dir); with `anywhere`, missing components are created wherever they
    /// are missing (in a root filesystem's per-sandbox writable view, never on the host).
    fn dir_with(&self, path: &Path, anywhere: bool) -> Result<OwnedFd, ViewError> {
        let mut cur = self.root.try_clone().map_err(|e| {
            sys_err("duplicating the view's root")(Errno::from_raw(
                e.raw_os_error().unwrap_or(libc::EBADF),
            ))
        })?;
        let mut at = PathBuf::from("/");
        for comp in path.components() {
            let name = match comp {
                Component::RootDir => continue,
                Component::Normal(n) => n,
                _ => {
                    return Err(ViewError::Path {
                        path: path.display().to_string(),
                        reason: "not a normalised absolute path".into(),
                    })
                }
            };
            let next = match open_below(cur.as_fd(), name, true) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if anywhere || self.ours(&at) => {
                    match nix::sys::stat::mkdirat(
                        cur.as_fd(),
                        name,
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => {
                            return Err(sys_err(format!("creating {}", at.join(name).display()))(e))
                        }
                    }
                    open_below(cur.as_fd(), name, true)
                        .map_err(sys_err(format!("opening {}", at.join(name).display())))?
                }
                Err(e @ (Errno::ELOOP | Errno::ENOTDIR)) => {
                    return Err(ViewError::Path {
                        path: path.display().to_string(),
                        reason: format!(
                            "{} in the view is not a directory ({e})",
                            at.join(name).display()
                        ),
                    })
                }
                Err(e) => return Err(sys_err(format!("opening {}", at.join(name).display()))(e)),
            };
            at.push(name);
            cur = next;
        }
        Ok(cur)
    }

    /// A non-directory mount point at `path`: an empty file created where the view is ours, or
    /// the existing non-directory, non-link entry.
    fn file(&self, path: &Path) -> Result<OwnedFd, ViewError> {
        let (parent, name) = split(path)?;
        let dir = self.dir(parent)?;
        if self.ours(parent) {
            match nix::fcntl::openat(
                dir.as_fd(),
                name,
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_RDONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::empty(),
            ) {
                Ok(_) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(sys_err(format!("creating {}", path.display()))(e)),
            }
        }
        let fd = open_below(dir.as_fd(), name, false)
            .map_err(sys_err(format!("opening {} in the view", path.display())))?;
        match kind_of(fd.as_fd()).map_err(sys_err(format!("{}", path.display())))? {
            SFlag::S_IFDIR | SFlag::S_IFLNK => Err(ViewError::Path {
                path: path.display().to_string(),
                reason: "the mount point in the view is a directory or a link".into(),
            }),
            _ => Ok(fd),
        }
    }

    /// Mount a fresh `fstype` on `path` and record it as ours.
    pub fn mount_own(
        &mut self,
        path: &Path,
        fstype: &str,
        options: &[(&str, &str)],
        attrs: u64,
    ) -> Result<(), ViewError> {
        let target = self.dir(path)?;
        let mnt = sys::new_mount(fstype, options, attrs)
            .map_err(sys_err(format!("mounting {fstype} on {}", path.display())))?;
        sys::attach_mount(mnt.as_fd(), target.as_fd())
            .map_err(sys_err(format!("attaching {fstype} on {}", path.display())))?;
        self.mounts.push((path.to_owned(), true));
        Ok(())
    }

    /// Bind the already opened `source` (a host path, or an entry of the view) at `path`.
    fn bind_fd(
        &mut self,
        source: BorrowedFd<'_>,
        path: &Path,
        attrs: u64,
        own: bool,
    ) -> Result<(), ViewError> {
        let directory =
            kind_of(source).map_err(sys_err(format!("{}", path.display())))? == SFlag::S_IFDIR;
        let target = if directory {
            self.dir(path)?
        } else {
            self.file(path)?
        };
        let tree = sys::clone_mount(source)
            .map_err(sys_err(format!("cloning the mount of {}", path.display())))?;
        sys::set_mount_attrs(tree.as_fd(), attrs).map_err(sys_err(format!(
            "setting the mount flags of {}",
            path.display()
        )))?;
        sys::attach_mount(tree.as_fd(), target.as_fd())
            .map_err(sys_err(format!("binding {}", path.display())))?;
        self.mounts.push((path.to_owned(), own));
        Ok(())
    }

    /// Put the host path `source` at `path` in the view (the same path for a policy's paths):
    /// bound read only or writable, always nosuid, nodev unless it is a device under `/dev`; a
    /// host path that is itself a symbolic link becomes the same link in the view.
    /// `Ok(Err(reason))`: skipped (best_effort).
    pub fn place_host_path(
        &mut self,
        source: &Path,
        path: &Path,
        writable: bool,
        hard_requirement: bool,
    ) -> Result<Result<Placed, String>, ViewError> {
        let text = source.display().to_string();
        let refuse = |reason: String| -> Result<Result<Placed, String>, ViewError> {
            if hard_requirement {
                Err(ViewError::Path {
                    path: text.clone(),
                    reason: format!("{reason} (compatibility: hard_requirement)"),
                })
            } else {
                Ok(Err(reason))
            }
        };
        let source = match open_host(source) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return refuse("does not exist".into()),
            Err(Errno::ELOOP) => {
                return refuse(
                    "a directory on the way is a symbolic link; list the path it leads to".into(),
                )
            }
            Err(e) => return Err(sys_err(format!("opening {text}"))(e)),
        };
        let kind = kind_of(source.as_fd()).map_err(sys_err(text.clone()))?;
        if kind == SFlag::S_IFLNK {
            let target = nix::fcntl::readlinkat(source.as_fd(), "")
                .map_err(sys_err(format!("reading the link {text}")))?;
            self.link(path, Path::new(&target))?;
            return Ok(Ok(Placed::Linked));
        }
        let device = matches!(kind, SFlag::S_IFCHR | SFlag::S_IFBLK);
        let mut attrs = NOSUID;
        if !(device && path.starts_with("/dev")) {
            attrs |= NODEV;
        }
        if !writable {
            attrs |= RDONLY;
        }
        self.bind_fd(source.as_fd(), path, attrs, false)?;
        Ok(Ok(Placed::Bound))
    }

    /// Bind the directory `source` with every mount below it at `path`, writable where each
    /// mount is, nosuid and nodev throughout (a VM's guest tree in virtiofsd's jail).
    pub fn bind_recursive(&mut self, source: BorrowedFd<'_>, path: &Path) -> Result<(), ViewError> {
        let target = self.dir(path)?;
        let tree = sys::clone_mounts(source, true)
            .map_err(sys_err(format!("cloning the mounts of {}", path.display())))?;
        sys::set_mounts_attrs(tree.as_fd(), NOSUID | NODEV, true).map_err(sys_err(format!(
            "setting the mount flags of {}",
            path.display()
        )))?;
        sys::attach_mount(tree.as_fd(), target.as_fd())
            .map_err(sys_err(format!("binding {}", path.display())))?;
        self.mounts.push((path.to_owned(), false));
        Ok(())
    }

    /// Bind `source` (an already opened directory or file, e.g. one the caller is about to
    /// hide under a new mount) at `path`: nosuid, nodev, read only unless `writable`.
    pub fn bind_within(
        &mut self,
        source: BorrowedFd<'_>,
        path: &Path,
        writable: bool,
    ) -> Result<(), ViewError> {
        let mut attrs = NOSUID | NODEV;
        if !writable {
            attrs |= RDONLY;
        }
        self.bind_fd(source, path, attrs, false)
    }

    /// Bind the opened regular file `source` read-only (nosuid, nodev, noexec) over `path`:
    /// an existing regular file there (in a host bind too: the bind covers it in this mount
    /// namespace only), or one created where the view is ours; with `anywhere` (a root
    /// filesystem's per-sandbox writable view), the file and its directories are created
    /// wherever they are missing. No component may be a symbolic link.
    pub fn place_read_only_file(
        &mut self,
        source: BorrowedFd<'_>,
        path: &Path,
        anywhere: bool,
    ) -> Result<(), ViewError> {
        let (parent, name) = split(path)?;
        let dir = self.dir_with(parent, anywhere)?;
        if anywhere || self.ours(parent) {
            match nix::fcntl::openat(
                dir.as_fd(),
                name,
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_RDONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o444),
            ) {
                Ok(_) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(sys_err(format!("creating {}", path.display()))(e)),
            }
        }
        let target = match open_below(dir.as_fd(), name, false) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                return Err(ViewError::Path {
                    path: path.display().to_string(),
                    reason: format!(
                        "does not exist in {}, which the view shows from the host",
                        parent.display()
                    ),
                })
            }
            Err(e) => {
                return Err(sys_err(format!("opening {} in the view", path.display()))(
                    e,
                ))
            }
        };
        if kind_of(target.as_fd()).map_err(sys_err(format!("{}", path.display())))?
            != SFlag::S_IFREG
        {
            return Err(ViewError::Path {
                path: path.display().to_string(),
                reason: "is not a regular file in the view (a link or something else)".into(),
            });
        }
        let tree = sys::clone_mount(source)
            .map_err(sys_err(format!("cloning the mount of {}", path.display())))?;
        sys::set_mount_attrs(tree.as_fd(), RDONLY | NOSUID | NODEV | NOEXEC).map_err(sys_err(
            format!("setting the mount flags of {}", path.display()),
        ))?;
        sys::attach_mount(tree.as_fd(), target.as_fd())
            .map_err(sys_err(format!("binding {}", path.display())))?;
        self.mounts.push((path.to_owned(), false));
        Ok(())
    }

    /// `path` (absolute) with the symbolic links of an image's tree resolved the way the
    /// sandbox will see them: inside the tree, `..` never above its root, each link read with
    /// `readlinkat` on a component opened without following anything (nothing is followed by
    /// the kernel, so no race can lead outside). Components that do not exist end the
    /// resolution: the rest is taken as written. At most [`MAX_LINKS`] links.
    pub fn resolve_links(&self, path: &Path) -> Result<PathBuf, ViewError> {
        let bad = |reason: String| ViewError::Path {
            path: path.display().to_string(),
            reason,
        };
        let mut pending: Vec<std::ffi::OsString> = components_of(path).into_iter().rev().collect();
        let mut at = PathBuf::from("/");
        let mut hops = 0usize;
        let mut cur = Some(self.root.try_clone().map_err(|e| {
            sys_err("duplicating the view's root")(Errno::from_raw(
                e.raw_os_error().unwrap_or(libc::EBADF),
            ))
        })?);
        while let Some(name) = pending.pop() {
            if name == ".." {
                at.pop();
                cur = self.reopen(&at)?;
                continue;
            }
            let Some(dir) = &cur else {
                at.push(&name);
                continue;
            };
            let st = match nix::sys::stat::fstatat(
                dir.as_fd(),
                name.as_os_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(st) => st,
                Err(Errno::ENOENT) => {
                    at.push(&name);
                    cur = None;
                    continue;
                }
                Err(e) => return Err(sys_err(format!("{}", at.join(&name).display()))(e)),
            };
            if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFLNK {
                at.push(&name);
                cur = open_below(dir.as_fd(), &name, false).ok();
                continue;
            }
            hops += 1;
            if hops > MAX_LINKS {
                return Err(bad(format!("more than {MAX_LINKS} symbolic links")));
            }
            let target = nix::fcntl::readlinkat(dir.as_fd(), name.as_os_str()).map_err(sys_err(
                format!("reading the link {}", at.join(&name).display()),
            ))?;
            let target = PathBuf::from(target);
            if target.is_absolute() {
                at = PathBuf::from("/");
                cur = self.reopen(&at)?;
            }
            pending.extend(components_of(&target).into_iter().rev());
        }
        Ok(at)
    }

    /// Whether `path` is a regular file of the view (no component a link).
    fn is_regular_file(&self, path: &Path) -> bool {
        let Ok((parent, name)) = split(path) else {
            return false;
        };
        let Ok(Some(dir)) = self.reopen(parent) else {
            return false;
        };
        open_below(dir.as_fd(), name, false)
            .and_then(|fd| kind_of(fd.as_fd()))
            .is_ok_and(|k| k == SFlag::S_IFREG)
    }

    /// The directory `at` of the view opened again (no link followed), `None` if it is not
    /// one (the resolution then goes on lexically).
    fn reopen(&self, at: &Path) -> Result<Option<OwnedFd>, ViewError> {
        let mut cur = self.root.try_clone().map_err(|e| {
            sys_err("duplicating the view's root")(Errno::from_raw(
                e.raw_os_error().unwrap_or(libc::EBADF),
            ))
        })?;
        for name in components_of(at) {
            match open_below(cur.as_fd(), &name, true) {
                Ok(fd) => cur = fd,
                Err(_) => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    /// A symbolic link at `path` with the text `target` (resolved inside the view). An
    /// existing identical link is fine; where the view is a host bind, the link is already the
    /// host's.
    fn link(&self, path: &Path, target: &Path) -> Result<(), ViewError> {
        let (parent, name) = split(path)?;
        let dir = self.dir(parent)?;
        if !self.ours(parent) {
            return Ok(());
        }
        match nix::unistd::symlinkat(target, dir.as_fd(), name) {
            Ok(()) => Ok(()),
            Err(Errno::EEXIST) => match nix::fcntl::readlinkat(dir.as_fd(), name) {
                Ok(existing) if Path::new(&existing) == target => Ok(()),
                _ => Err(ViewError::Path {
                    path: path.display().to_string(),
                    reason: format!(
                        "a symbolic link to {} cannot replace what the view already has there",
                        target.display()
                    ),
                }),
            },
            Err(e) => Err(sys_err(format!("creating the link {}", path.display()))(e)),
        }
    }

    /// A tmpfs of the sandbox's own on `/tmp` (mode 1777, nosuid, nodev): at most `size_mib`
    /// (`None`: the kernel's default, half of RAM), read only when `readonly`.
    pub fn mount_private_tmp(
        &mut self,
        size_mib: Option<u64>,
        readonly: bool,
    ) -> Result<(), ViewError> {
        let size = size_mib.map(|m| format!("{m}m"));
        let mut options = vec![("mode", "1777")];
        if let Some(size) = &size {
            options.push(("size", size.as_str()));
        }
        let mut attrs = NOSUID | NODEV;
        if readonly {
            attrs |= RDONLY;
        }
        self.mount_own(Path::new("/tmp"), "tmpfs", &options, attrs)
    }

    /// Make the view's root read only (its own mount only).
    pub fn seal_root(&self) -> Result<(), ViewError> {
        sys::set_mount_attrs(self.root.as_fd(), RDONLY)
            .map_err(sys_err("making the view's root read only"))
    }
}

/// A failure to place the sandbox's CA bundle, saying what needs it.
pub fn trust_error(target: &Path, e: ViewError) -> ViewError {
    ViewError::Path {
        path: target.display().to_string(),
        reason: format!(
            "the egress proxy's CA bundle (for tls: terminate) cannot be placed here: {}",
            crate::error_chain(&e)
        ),
    }
}

/// Where distributions other than Debian's family keep their bundle of trusted certificates
/// (Fedora, RHEL and UBI; openSUSE; Alpine's second name): in an image that has one (a regular
/// file once its links are resolved in the tree), the sandbox's bundle is bound over it too.
pub const OTHER_TRUST_PATHS: [&str; 4] = [
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Place the sandbox's bundle (`source`, opened by [`open_file_to_place`]) in an image's
/// per-sandbox writable view: at `primary` (created where missing), and over every one of
/// [`OTHER_TRUST_PATHS`] the image has, each with the image's links resolved inside the tree
/// ([`Tree::resolve_links`]), so that an image whose `/etc/ssl/certs` is a link (Fedora's)
/// gets its bundle where the link leads. Returns the paths placed, as the tree names them.
pub fn place_trust_in_image(
    tree: &mut Tree,
    source: BorrowedFd<'_>,
    primary: &Path,
) -> Result<Vec<PathBuf>, ViewError> {
    let paths = trust_paths(tree, primary)?;
    for (i, path) in paths.iter().enumerate() {
        // The first is created where missing; the others exist.
        tree.place_read_only_file(source, path, i == 0)?;
    }
    Ok(paths)
}

/// Where [`place_trust_in_image`] places the bundle in `tree`: `primary` resolved, then each
/// of [`OTHER_TRUST_PATHS`] that resolves to another regular file.
pub fn trust_paths(tree: &Tree, primary: &Path) -> Result<Vec<PathBuf>, ViewError> {
    let mut paths = vec![tree.resolve_links(primary)?];
    for other in OTHER_TRUST_PATHS {
        let Ok(resolved) = tree.resolve_links(Path::new(other)) else {
            continue;
        };
        if !paths.contains(&resolved) && tree.is_regular_file(&resolved) {
            paths.push(resolved);
        }
    }
    Ok(paths)
}

/// [`trust_paths`] in the image tree at `lower` (read only: nothing is created), as the
/// sandbox's view of it will have them.
pub fn image_trust_paths(lower: &Path, primary: &Path) -> Result<Vec<PathBuf>, ViewError> {
    let root = open_host(lower).map_err(sys_err(format!("opening {}", lower.display())))?;
    trust_paths(&Tree::new(root, false), primary)
}

/// Most symbolic links [`Tree::resolve_links`] follows in one path (the kernel's limit).
pub const MAX_LINKS: usize = 40;

/// The normal components of `path` and its `..`s, in order (`.` and `/` dropped).
fn components_of(path: &Path) -> Vec<std::ffi::OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect()
}

fn split(path: &Path) -> Result<(&Path, &OsStr), ViewError> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => Err(ViewError::Path {
            path: path.display().to_string(),
            reason: "not a path below /".into(),
        }),
    }
}

/// `/proc` entries hidden behind `/dev/null` (files) or an empty read-only tmpfs
/// (directories): kernel memory, keys, timers and hardware details (runc's masked paths).
const PROC_MASKED: [&str; 9] = [
    "kcore",
    "keys",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "latency_stats",
    "acpi",
    "scsi",
    "asound",
];
/// `/proc` entries bound read-only over themselves: the kernel's tunables and triggers (runc's
/// read-only paths).
const PROC_READONLY: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// The sandbox's own pseudo file systems in `tree`: a fresh `/proc` of the caller's pid
/// namespace (masked as runc does), `/dev` (a small tmpfs with [`DEVICES`] bound from the
/// host's `/dev`, a private devpts, `/dev/shm` of `shm_size_mib`, the usual links).
pub fn mount_proc_and_dev(tree: &mut Tree, shm_size_mib: Option<u64>) -> Result<(), ViewError> {
    let nosuid_nodev_noexec = NOSUID | NODEV | NOEXEC;
    // hidepid=invisible: the workload sees its own processes, not init's (the supervisor's
    // binary, as root), as in the guest.
    tree.mount_own(
        Path::new("/proc"),
        "proc",
        &[("hidepid", "invisible")],
        nosuid_nodev_noexec,
    )?;
    tree.mount_own(
        Path::new("/dev"),
        "tmpfs",
        &[("mode", "0755"), ("size", "64k"), ("nr_inodes", "64")],
        NOSUID | NOEXEC,
    )?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        let source = open_host(&host).map_err(sys_err(format!("opening {}", host.display())))?;
        tree.bind_fd(source.as_fd(), &host, NOSUID | NOEXEC, true)?;
    }
    // Every devpts mount is an instance of its own (Linux >= 4.7): the sandbox's PTYs are
    // invisible outside it.
    tree.mount_own(
        Path::new("/dev/pts"),
        "devpts",
        &[("ptmxmode", "0666"), ("mode", "0620")],
        NOSUID | NOEXEC,
    )?;
    let size = shm_size_mib.map(|m| format!("{m}m"));
    let mut options = vec![("mode", "1777")];
    if let Some(size) = &size {
        options.push(("size", size.as_str()));
    }
    tree.mount_own(
        Path::new("/dev/shm"),
        "tmpfs",
        &options,
        nosuid_nodev_noexec,
    )?;
    let dev = tree.dir(Path::new("/dev"))?;
    for (name, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        nix::unistd::symlinkat(target, dev.as_fd(), name)
            .map_err(sys_err(format!("creating /dev/{name}")))?;
    }
    mask_proc(tree)
}

/// Hide and freeze the kernel's sensitive `/proc` entries (those this kernel has).
pub fn mask_proc(tree: &mut Tree) -> Result<(), ViewError> {
    let proc_dir = tree.dir(Path::new("/proc"))?;
    let null = tree.file(Path::new("/dev/null"))?;
    for name in PROC_MASKED {
        let path = Path::new("/proc").join(name);
        let entry = match open_below(proc_dir.as_fd(), OsStr::new(name), false) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(sys_err(format!("opening {}", path.display()))(e)),
        };
        let is_dir = kind_of(entry.as_fd()).map_err(sys_err(format!("{}", path.display())))?
            == SFlag::S_IFDIR;
        if is_dir {
            let fs = sys::new_mount(
                "tmpfs",
                &[("size", "4k"), ("nr_inodes", "1"), ("mode", "0555")],
                RDONLY | NOSUID | NODEV | NOEXEC,
            )
            .map_err(sys_err(format!("masking {}", path.display())))?;
            sys::attach_mount(fs.as_fd(), entry.as_fd())
                .map_err(sys_err(format!("masking {}", path.display())))?;
        } else {
            let tree_fd = sys::clone_mount(null.as_fd())
                .map_err(sys_err(format!("masking {}", path.display())))?;
            sys::set_mount_attrs(tree_fd.as_fd(), RDONLY | NOSUID | NOEXEC)
                .map_err(sys_err(format!("masking {}", path.display())))?;
            sys::attach_mount(tree_fd.as_fd(), entry.as_fd())
                .map_err(sys_err(format!("masking {}", path.display())))?;
        }
    }
    for name in PROC_READONLY {
        let path = Path::new("/proc").join(name);
        let entry = match open_below(proc_dir.as_fd(), OsStr::new(name), false) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(sys_err(format!("opening {}", path.display()))(e)),
        };
        let clone = sys::clone_mount(entry.as_fd())
            .map_err(sys_err(format!("freezing {}", path.display())))?;
        sys::set_mount_attrs(clone.as_fd(), RDONLY | NOSUID | NODEV | NOEXEC)
            .map_err(sys_err(format!("freezing {}", path.display())))?;
        sys::attach_mount(clone.as_fd(), entry.as_fd())
            .map_err(sys_err(format!("freezing {}", path.display())))?;
    }
    Ok(())
}

/// Open the host file `source` that [`Tree::place_read_only_file`] binds (the sandbox's CA
/// bundle): without following links, a regular file.
pub fn open_file_to_place(source: &Path) -> Result<OwnedFd, ViewError> {
    let fd = open_host(source).map_err(sys_err(format!("opening {}", source.display())))?;
    match kind_of(fd.as_fd()).map_err(sys_err(format!("{}", source.display())))? {
        SFlag::S_IFREG => Ok(fd),
        _ => Err(ViewError::Path {
            path: source.display().to_string(),
            reason: "is not a regular file".into(),
        }),
    }
}

/// Build `plan` at `at` (an empty directory of the supervisor's, in the caller's private
/// mount namespace): the root, the sandbox's own file systems, the host paths, and
/// `trust_bundle` (a host file, opened before anything is mounted on `at`) read-only at
/// `trust_at`. Returns the paths skipped under best_effort. The caller then pivots into `at`.
pub fn build(
    plan: &ViewPlan,
    at: &Path,
    trust_bundle: Option<(&Path, &Path)>,
) -> Result<Vec<Skipped>, ViewError> {
    let trust = match trust_bundle {
        Some((source, target)) => Some((open_file_to_place(source)?, target)),
        None => None,
    };
    let at_fd = open_host(at).map_err(sys_err(format!("opening {}", at.display())))?;
    let root_mount = if plan.host_root {
        let host = open_host(Path::new("/")).map_err(sys_err("opening /"))?;
        let tree = sys::clone_mount(host.as_fd()).map_err(sys_err("cloning the mount of /"))?;
        sys::set_mount_attrs(tree.as_fd(), RDONLY | NOSUID | NODEV)
            .map_err(sys_err("making / read only"))?;
        tree
    } else {
        sys::new_mount(
            "tmpfs",
            &[("mode", "0755"), ("size", "1m"), ("nr_inodes", "4096")],
            NOSUID | NODEV,
        )
        .map_err(sys_err("mounting the view's root tmpfs"))?
    };
    sys::attach_mount(root_mount.as_fd(), at_fd.as_fd()).map_err(sys_err(format!(
        "attaching the view's root on {}",
        at.display()
    )))?;
    let root = open_host(at).map_err(sys_err(format!("opening {}", at.display())))?;
    let mut tree = Tree::new(root, !plan.host_root);
    let shm = match plan.tmp {
        TmpPlan::Private { size_mib, .. } => size_mib,
        TmpPlan::Host => None,
    };
    mount_proc_and_dev(&mut tree, shm)?;
    if let TmpPlan::Private { size_mib, readonly } = plan.tmp {
        tree.mount_private_tmp(size_mib, readonly)?;
    }
    let mut skipped = Vec::new();
    for bind in &plan.binds {
        if let Err(reason) =
            tree.place_host_path(&bind.path, &bind.path, bind.writable, plan.hard_requirement)?
        {
            skipped.push((bind.path.display().to_string(), reason));
        }
    }
    if let Some((fd, target)) = &trust {
        tree.place_read_only_file(fd.as_fd(), target, false)
            .map_err(|e| trust_error(target, e))?;
    }
    if !plan.host_root {
        tree.seal_root()?;
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn p(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    /// Links in an image's tree resolve inside it: `..` stops at its root, an absolute link
    /// starts again at its root, a missing component ends the resolution, and a loop is an
    /// error rather than a hang.
    #[test]
    fn image_links_resolve_inside_the_tree() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = dir.path();
        let link = |target: &str, at: &str| {
            std::os::unix::fs::symlink(target, root.join(at)).unwrap_or_else(|e| panic!("{e}"))
        };
        std::fs::create_dir_all(root.join("etc/pki/tls/certs")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::create_dir_all(root.join("etc/ssl")).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(root.join("etc/pki/tls/certs/ca-bundle.crt"), "x")
            .unwrap_or_else(|e| panic!("{e}"));
        link("../pki/tls/certs", "etc/ssl/certs");
        link("../../../../../../../../etc/shadow", "etc/ssl/up");
        link("/etc/ssl/certs/ca-bundle.crt", "etc/ssl/abs");
        link("loop-b", "etc/ssl/loop-a");
        link("loop-a", "etc/ssl/loop-b");
        let tree = Tree::new(open_host(root).unwrap_or_else(|e| panic!("{e}")), false);
        let resolve = |path: &str| {
            tree.resolve_links(Path::new(path))
                .map(|p| p.display().to_string())
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/ssl/up",
                "/etc/ssl/abs",
                "/etc/ssl/missing/more",
            ]
            .map(resolve),
            [
                Ok("/etc/pki/tls/certs/ca-certificates.crt".to_string()),
                Ok("/etc/shadow".to_string()),
                Ok("/etc/pki/tls/certs/ca-bundle.crt".to_string()),
                Ok("/etc/ssl/missing/more".to_string()),
            ]
        );
        assert!(resolve("/etc/ssl/loop-a").is_err_and(|e| e.contains("symbolic links")));
        assert_eq!(
            trust_paths(&tree, Path::new("/etc/ssl/certs/ca-certificates.crt"))
                .map_err(|e| e.to_string()),
            Ok(p(&[
                "/etc/pki/tls/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt"
            ]))
        );
    }

    #[test]
    fn the_plan_binds_host_paths_parents_first_and_keeps_its_own() {
        let plan = plan(
            &p(&[
                "/usr",
                "/etc",
                "/proc",
                "/dev/urandom",
                "/dev/kvm",
                "/tmp",
                "/home/u/.ssh",
            ]),
            &p(&["/home/u", "/dev/null", "/tmp/x", "/etc"]),
            Some(Path::new("/tmp/x")),
            TmpMode::Private,
            Some(256),
            true,
        );
        let binds: Vec<(&str, bool)> = plan
            .binds
            .iter()
            .map(|b| (b.path.to_str().unwrap(), b.writable))
            .collect();
        assert_eq!(
            binds,
            vec![
                ("/etc", true),
                ("/usr", false),
                ("/dev/kvm", false),
                ("/home/u", true),
                ("/tmp/x", true),
                ("/home/u/.ssh", false),
            ]
        );
        assert_eq!(
            plan.tmp,
            TmpPlan::Private {
                size_mib: Some(256),
                readonly: true
            }
        );
        assert!(!plan.host_root);
    }

    #[test]
    fn host_tmp_and_host_root_are_explicit() {
        let plan = plan(&p(&["/"]), &p(&["/tmp"]), None, TmpMode::Host, None, false);
        assert!(plan.host_root);
        assert_eq!(plan.tmp, TmpPlan::Host);
        assert_eq!(
            plan.binds,
            vec![ViewBind {
                path: "/tmp".into(),
                writable: true
            }]
        );
        let private = super::plan(&[], &p(&["/tmp"]), None, TmpMode::Private, None, false);
        assert_eq!(private.binds, vec![]);
        assert_eq!(
            private.tmp,
            TmpPlan::Private {
                size_mib: None,
                readonly: false
            }
        );
        // A workdir of /tmp is the host's /tmp.
        let workdir = super::plan(
            &[],
            &p(&["/tmp"]),
            Some(Path::new("/tmp")),
            TmpMode::Private,
            None,
            false,
        );
        assert_eq!(workdir.tmp, TmpPlan::Host);
        assert_eq!(workdir.binds.len(), 1);
    }
}

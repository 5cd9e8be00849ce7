//! Early guest setup when the agent is PID 1: pseudo filesystems, the console, loopback.
//! Also the setup the host asks for later ([`setup`]): shares, hostname, pids limit.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
use openshell_runtime::vm_protocol::{GuestMount, GuestTmp, AGENT_DIR, BOOT_REQUESTS, PARK_ARG};

use crate::{diag, sys};

/// The cgroup every spawned process joins (the workload directly, each other session in a
/// cgroup of its own below it).
pub const WORKLOAD_CGROUP: &str = "/sys/fs/cgroup/workload";

/// A boot step that failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("mounting {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: Errno,
    },
    #[error("creating {0}")]
    Mkdir(&'static str, #[source] std::io::Error),
    #[error("bringing lo up")]
    Loopback(#[source] Errno),
}

/// What the host's `Setup` request could not do.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("setup was already done")]
    Again,
    #[error("hostname {0:?}: expected 1 to 64 letters, digits, '-' or '.'")]
    Hostname(String),
    #[error("mount {0:?}: expected an absolute, normalized path other than /")]
    MountPath(String),
    #[error("mount {path}: tag {tag:?} must be 1 to 36 bytes without NUL")]
    MountTag { path: String, tag: String },
    #[error("pids_limit must be at least 1")]
    PidsLimit,
    #[error("tmp.size_mib must be at least 1")]
    TmpSize,
    #[error("tmp.keep {0:?}: expected an absolute, normalized path below /tmp")]
    TmpKeep(String),
    #[error("the private /tmp")]
    Tmp(#[source] openshell_runtime::process::view::ViewError),
    #[error("the read-only shares")]
    ReadOnly(#[source] openshell_runtime::process::view::ViewError),
    #[error("memory_limit_mib must be at least 1")]
    MemoryLimit,
    #[error("mount {path}: creating the mount point")]
    Mkdir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {path}: mounting virtiofs tag {tag:?}")]
    Mount {
        path: String,
        tag: String,
        #[source]
        source: Errno,
    },
    #[error("sethostname")]
    SetHostname(#[source] Errno),
    #[error("{path}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl SetupError {
    /// The `stage` of the `Failed` event.
    pub fn stage(&self) -> &'static str {
        match self {
            SetupError::Again => "protocol",
            SetupError::Hostname(_)
            | SetupError::MountPath(_)
            | SetupError::MountTag { .. }
            | SetupError::PidsLimit
            | SetupError::MemoryLimit
            | SetupError::TmpSize
            | SetupError::TmpKeep(_) => "validate",
            SetupError::Tmp(_) | SetupError::ReadOnly(_) => "mount",
            SetupError::Mkdir { .. } | SetupError::Mount { .. } => "mount",
            SetupError::SetHostname(_) => "hostname",
            SetupError::Cgroup { .. } => "cgroup",
        }
    }
}

fn mount_fs(
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    match mount(Some(fstype), target, Some(fstype), flags, data) {
        // Already there (the kernel mounts devtmpfs itself with CONFIG_DEVTMPFS_MOUNT).
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(source) => Err(BootError::Mount {
            fstype,
            target,
            source,
        }),
    }
}

/// The root (virtio-fs: the built root, or an image's per-sandbox view) becomes nodev and
/// nosuid, read-only or not as the kernel mounted it: a device node an image carries opens
/// nothing (the guest's devices are devtmpfs's, its own mount), and set-id bits grant nothing.
fn harden_root() -> Result<(), BootError> {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let readonly = statvfs("/")
        .map(|s| s.flags().contains(FsFlags::ST_RDONLY))
        .unwrap_or(true);
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    if readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    mount::<str, str, str, str>(None, "/", None, flags, None).map_err(|source| BootError::Mount {
        fstype: "virtiofs",
        target: "/",
        source,
    })
}

fn mkdir(path: &'static str) -> Result<(), BootError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(BootError::Mkdir(path, e)),
    }
}

/// Make sure descriptors 0, 1 and 2 exist, so no later descriptor lands on them. With
/// `console`, all three become /dev/console (the agent's diagnostics go there); otherwise only
/// missing ones are filled, with /dev/null.
pub fn ensure_std_fds(console: bool) {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let path = if console { "/dev/console" } else { "/dev/null" };
    let Ok(file) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    else {
        return;
    };
    for fd in 0..3 {
        if (console || !sys::fd_is_open(fd)) && file.as_raw_fd() != fd {
            let _ = sys::dup_onto(file.as_fd(), fd);
        }
    }
    if file.as_raw_fd() < 3 {
        // The open itself filled a missing slot: keep it.
        let _ = file.into_raw_fd();
    }
}

/// Boot steps of PID 1. Each failure is reported and the rest still run: a guest missing
/// /dev/shm is still useful, and PID 1 must not exit.
pub fn boot() {
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let noexec = nosuid_nodev | MsFlags::MS_NOEXEC;
    let steps: Vec<Box<dyn Fn() -> Result<(), BootError>>> = vec![
        Box::new(harden_root),
        Box::new(|| mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))),
        Box::new(|| {
            ensure_std_fds(true);
            Ok(())
        }),
        // hidepid: the workload (unprivileged) sees only its own processes, not the agent's or
        // the kernel threads', as in the process backend's pid namespace.
        Box::new(move || mount_fs("proc", "/proc", noexec, Some("hidepid=invisible"))),
        Box::new(move || mount_fs("sysfs", "/sys", noexec, None)),
        Box::new(|| mkdir("/dev/pts")),
        Box::new(|| {
            mount_fs(
                "devpts",
                "/dev/pts",
                MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
                Some("newinstance,ptmxmode=0666,mode=0620"),
            )
        }),
        Box::new(|| mkdir("/dev/shm")),
        Box::new(move || mount_fs("tmpfs", "/dev/shm", nosuid_nodev, Some("mode=1777"))),
        Box::new(move || mount_fs("tmpfs", "/run", nosuid_nodev, Some("mode=0755"))),
        Box::new(move || mount_fs("cgroup2", "/sys/fs/cgroup", noexec, None)),
        Box::new(loopback_up),
    ];
    for step in steps {
        if let Err(e) = step() {
            diag!("boot: {}", crate::chain(&e));
        }
    }
    // Without a console, at least keep 0..=2 occupied.
    ensure_std_fds(false);
}

/// Whether the kernel command line asks the agent to park for a template
/// (`vm_protocol::PARK_ARG`, a word of its own).
pub fn park_requested() -> bool {
    std::fs::read_to_string("/proc/cmdline")
        .is_ok_and(|line| line.split_whitespace().any(|w| w == PARK_ARG))
}

/// The boot requests the qemu engine put in the tree ([`BOOT_REQUESTS`]); `None` when there
/// are none (the host then sends them on the boot connection). Either way [`AGENT_DIR`] is
/// then hidden under an empty read-only tmpfs: the workload sees neither the agent binary nor
/// its own launch plan (which carries its environment). When requests were found and cannot
/// be hidden, that is an error: the host is told and nothing is launched.
pub fn take_boot_requests() -> Option<Result<Vec<u8>, String>> {
    let found = match std::fs::read(BOOT_REQUESTS) {
        Ok(bytes) => Some(Ok(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(format!("reading {BOOT_REQUESTS}: {e}"))),
    };
    let flags = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let hidden = mount(
        Some("tmpfs"),
        AGENT_DIR,
        Some("tmpfs"),
        flags,
        Some("size=4k,nr_inodes=1,mode=0555"),
    );
    match (found, hidden) {
        (Some(Ok(_)), Err(e)) => Some(Err(format!("hiding {AGENT_DIR}: {e}"))),
        (found, Err(e)) => {
            diag!("boot: hiding {AGENT_DIR}: {e}");
            found
        }
        (found, Ok(())) => found,
    }
}

fn loopback_up() -> Result<(), BootError> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(BootError::Loopback)?;
    sys::interface_up(sock.as_fd(), "lo").map_err(BootError::Loopback)
}

fn valid_hostname(h: &str) -> bool {
    (1..=64).contains(&h.len())
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn valid_mount_path(p: &str) -> bool {
    // Checked on the text: Path::components would hide "." and "//".
    let Some(rest) = p.strip_prefix('/') else {
        return false;
    };
    p.len() <= 4096
        && !p.contains('\0')
        && rest
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// Bind each read-only share of the tree read-only over itself (links are left alone: they
/// resolve to paths that are shares themselves).
fn read_only_shares(paths: &[String]) -> Result<(), SetupError> {
    use openshell_runtime::process::view;
    let sys =
        |what: String| move |source| SetupError::ReadOnly(view::ViewError::Sys { what, source });
    for path in paths {
        let fd = view::open_host(Path::new(path)).map_err(sys(format!("opening {path}")))?;
        view::freeze(fd.as_fd()).map_err(sys(format!("making {path} read only")))?;
    }
    Ok(())
}

/// The guest's private /tmp: a tmpfs on /tmp (guest memory, charged to the workload cgroup
/// of whoever writes it), with the shares below /tmp (virtio-fs directories the host put in the
/// tree) opened before the tmpfs hides them and bound back at their paths inside it.
fn private_tmp(tmp: &GuestTmp) -> Result<(), SetupError> {
    use openshell_runtime::process::view;
    let keep = tmp
        .keep
        .iter()
        .map(|m| {
            view::open_host(Path::new(&m.path))
                .map(|fd| (fd, m))
                .map_err(|e| {
                    SetupError::Tmp(view::ViewError::Sys {
                        what: format!("opening {}", m.path),
                        source: e,
                    })
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let root = view::open_host(Path::new("/")).map_err(|e| {
        SetupError::Tmp(view::ViewError::Sys {
            what: "opening /".into(),
            source: e,
        })
    })?;
    let mut tree = view::Tree::new(root, false);
    tree.mount_private_tmp(tmp.size_mib, tmp.readonly)
        .map_err(SetupError::Tmp)?;
    for (fd, m) in keep {
        tree.bind_within(fd.as_fd(), Path::new(&m.path), !m.readonly)
            .map_err(SetupError::Tmp)?;
    }
    Ok(())
}

/// The workload cgroup's limits from `Setup`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub pids: Option<u64>,
    pub memory_mib: Option<u64>,
}

/// What the guest kernel and the agent keep of the guest's RAM beyond the workload's
/// `memory.max`, so that a workload at its limit meets a cgroup OOM, not a starved guest.
const GUEST_RESERVE_KIB: u64 = 48 * 1024;

/// The file system part of a `Setup`: virtio-fs devices to mount (krun engine), the private
/// /tmp, the tree's read-only shares (qemu engine).
#[derive(Debug, Clone, Copy)]
pub struct Shape<'a> {
    pub mounts: &'a [GuestMount],
    pub tmp: Option<&'a GuestTmp>,
    pub read_only: &'a [String],
}

/// Check a `Setup` request completely before acting on any of it.
pub fn validate_setup(hostname: &str, shape: &Shape<'_>, limits: Limits) -> Result<(), SetupError> {
    let mounts = shape.mounts;
    if !valid_hostname(hostname) {
        return Err(SetupError::Hostname(hostname.to_owned()));
    }
    for path in shape.read_only {
        if !valid_mount_path(path) {
            return Err(SetupError::MountPath(path.clone()));
        }
    }
    if let Some(tmp) = shape.tmp {
        if tmp.size_mib == Some(0) {
            return Err(SetupError::TmpSize);
        }
        for m in &tmp.keep {
            if !valid_mount_path(&m.path)
                || !Path::new(&m.path).starts_with("/tmp")
                || m.path == "/tmp"
            {
                return Err(SetupError::TmpKeep(m.path.clone()));
            }
        }
    }
    for m in mounts {
        if !valid_mount_path(&m.path) {
            return Err(SetupError::MountPath(m.path.clone()));
        }
        if m.tag.is_empty() || m.tag.len() > 36 || m.tag.contains('\0') {
            return Err(SetupError::MountTag {
                path: m.path.clone(),
                tag: m.tag.clone(),
            });
        }
    }
    if limits.pids == Some(0) {
        return Err(SetupError::PidsLimit);
    }
    if limits.memory_mib == Some(0) {
        return Err(SetupError::MemoryLimit);
    }
    Ok(())
}

/// Carry out a validated `Setup`; returns the `cgroup.procs` file spawned processes must join.
pub fn setup(
    hostname: &str,
    shape: &Shape<'_>,
    limits: Limits,
) -> Result<Option<PathBuf>, SetupError> {
    let mounts = shape.mounts;
    for m in mounts {
        if let Err(source) = std::fs::create_dir_all(&m.path) {
            return Err(SetupError::Mkdir {
                path: m.path.clone(),
                source,
            });
        }
        let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if m.readonly {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(
            Some(m.tag.as_str()),
            m.path.as_str(),
            Some("virtiofs"),
            flags,
            None::<&str>,
        )
        .map_err(|source| SetupError::Mount {
            path: m.path.clone(),
            tag: m.tag.clone(),
            source,
        })?;
    }
    read_only_shares(shape.read_only)?;
    if let Some(tmp) = shape.tmp {
        private_tmp(tmp)?;
    }
    nix::unistd::sethostname(hostname).map_err(SetupError::SetHostname)?;
    // The workload cgroup exists even without limits: every session gets a cgroup below it,
    // so what a session starts can be killed with it.
    let io = |path: &str| {
        let path = path.to_owned();
        move |source| SetupError::Cgroup { path, source }
    };
    let control = "/sys/fs/cgroup/cgroup.subtree_control";
    let mut controllers = Vec::new();
    if limits.pids.is_some() {
        controllers.push("+pids");
    }
    if limits.memory_mib.is_some() {
        controllers.push("+memory");
    }
    if !controllers.is_empty() {
        std::fs::write(control, controllers.join(" ")).map_err(io(control))?;
    }
    match std::fs::create_dir(WORKLOAD_CGROUP) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(WORKLOAD_CGROUP)(e)),
    }
    if let Some(limit) = limits.pids {
        let max = format!("{WORKLOAD_CGROUP}/pids.max");
        std::fs::write(&max, limit.to_string()).map_err(io(&max))?;
    }
    if let Some(mib) = limits.memory_mib {
        // sysinfo's total is /proc/meminfo's MemTotal, without formatting all of meminfo.
        let total = nix::sys::sysinfo::sysinfo()
            .map_err(|e| io("sysinfo")(std::io::Error::from(e)))?
            .ram_total();
        let bytes = memory_max(mib, Some(total / 1024));
        let max = format!("{WORKLOAD_CGROUP}/memory.max");
        std::fs::write(&max, bytes.to_string()).map_err(io(&max))?;
    }
    Ok(Some(Path::new(WORKLOAD_CGROUP).join("cgroup.procs")))
}

/// The workload's `memory.max` in bytes: the asked limit, capped at the guest's memory minus
/// [`GUEST_RESERVE_KIB`] (at least a quarter of it).
fn memory_max(limit_mib: u64, mem_total_kib: Option<u64>) -> u64 {
    let asked = limit_mib.saturating_mul(1024 * 1024);
    match mem_total_kib {
        Some(total) => {
            let room = total
                .saturating_sub(GUEST_RESERVE_KIB)
                .max(total / 4)
                .saturating_mul(1024);
            asked.min(room)
        }
        None => asked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_max_leaves_the_guest_room() {
        // Under the guest's RAM: as asked.
        assert_eq!(memory_max(64, Some(1_017_148)), 64 << 20);
        // The policy's limit is the guest's RAM: capped below it.
        assert_eq!(
            memory_max(1024, Some(1_017_148)),
            (1_017_148 - GUEST_RESERVE_KIB) * 1024
        );
        // A tiny guest keeps a quarter for the workload.
        assert_eq!(memory_max(1024, Some(40_000)), 10_000 * 1024);
        assert_eq!(memory_max(64, None), 64 << 20);
    }

    #[test]
    fn validates_setup() {
        let m = |tag: &str, path: &str| GuestMount {
            tag: tag.into(),
            path: path.into(),
            readonly: true,
        };
        let pids = |n| Limits {
            pids: n,
            memory_mib: None,
        };
        let shape = |mounts: &'static [GuestMount]| Shape {
            mounts,
            tmp: None,
            read_only: &[],
        };
        let data = Box::leak(Box::new([m("s0", "/work/data")]));
        assert!(validate_setup("box-1.local", &shape(data), pids(Some(64))).is_ok());
        let long = "x".repeat(65);
        let no_memory = Limits {
            pids: None,
            memory_mib: Some(0),
        };
        assert!(validate_setup("h", &shape(&[]), no_memory).is_err());
        let bad: Vec<(&str, Vec<GuestMount>, Option<u64>)> = vec![
            ("", vec![], None),
            ("a b", vec![], None),
            (&long, vec![], None),
            ("h", vec![m("s0", "relative")], None),
            ("h", vec![m("s0", "/")], None),
            ("h", vec![m("s0", "/a/../etc")], None),
            ("h", vec![m("s0", "/a/./b")], None),
            ("h", vec![m("s0", "/a/")], None),
            ("h", vec![m("s0", "/a//b")], None),
            ("h", vec![m("", "/a")], None),
            ("h", vec![m(&"t".repeat(37), "/a")], None),
            ("h", vec![], Some(0)),
        ];
        for (host, mounts, pids) in bad {
            assert!(
                validate_setup(
                    host,
                    &Shape {
                        mounts: &mounts,
                        tmp: None,
                        read_only: &[],
                    },
                    Limits {
                        pids,
                        memory_mib: None
                    },
                )
                .is_err(),
                "{host:?} {mounts:?} {pids:?}"
            );
        }
        let tmp = |size_mib, keep: &str| GuestTmp {
            size_mib,
            readonly: false,
            keep: vec![m("s1", keep)],
        };
        fn with_tmp(t: &GuestTmp) -> Shape<'_> {
            Shape {
                mounts: &[],
                tmp: Some(t),
                read_only: &[],
            }
        }
        let ok = tmp(Some(64), "/tmp/work");
        assert!(validate_setup("h", &with_tmp(&ok), pids(None)).is_ok());
        for bad in [
            tmp(Some(0), "/tmp/work"),
            tmp(None, "/tmp"),
            tmp(None, "/etc"),
            tmp(None, "/tmpx/y"),
            tmp(None, "/tmp/../etc"),
        ] {
            assert!(
                validate_setup("h", &with_tmp(&bad), pids(None)).is_err(),
                "{bad:?}"
            );
        }
        let ro = ["/usr/../etc".to_owned()];
        let bad_ro = Shape {
            mounts: &[],
            tmp: None,
            read_only: &ro,
        };
        assert!(validate_setup("h", &bad_ro, pids(None)).is_err());
    }
}

//! The process backend's `connect()` mediation: a socket created outside the sandbox cannot be
//! connected to from inside, unless the policy lists its path.
//!
//! Landlock (ABI <= 8) has no right for `connect()` on a pathname UNIX socket, and a host
//! daemon's socket can sit below a path the policy does list (the workdir, a read-write
//! directory, the host's /tmp with `tmp: host`). So the workload's seccomp filter turns every
//! `connect` into a user notification (`SECCOMP_RET_USER_NOTIF`), and the supervisor carries the
//! call out itself, on a duplicate of the workload's socket (`pidfd_getfd`), from a copy of the
//! address it read once (`process_vm_readv`): nothing the workload changes after the check can
//! change what is connected.
//!
//! - Any address but a pathname UNIX one (IPv4, IPv6, abstract UNIX names, which live in the
//!   sandbox's own network namespace): connected as given.
//! - A pathname: resolved by a thread that entered the workload's mount and network namespaces,
//!   its working directory and its identity (uid, gid, groups), so lookups and permission checks
//!   are the workload's own; the path is opened once (`O_PATH`, no magic links), and the socket
//!   it names is accepted only when a socket of the sandbox's own network namespace is bound to
//!   it (`sock_diag`, `UNIX_DIAG_VFS`) or when the policy lists it explicitly. The connect then
//!   goes to exactly that inode (through the thread's own `/proc/thread-self/fd/N`), so a
//!   renamed or replaced path cannot redirect it. Anything else is refused with ECONNREFUSED,
//!   the answer a socket file nothing listens on gives (and the vm backend's answer for a host
//!   socket on a share), and logged (`sandbox.unix_connect`).
//!
//! Datagrams addressed per send cannot be mediated this way, so the seccomp table refuses UNIX
//! datagram sockets; connected stream and seqpacket sockets ignore a send's address.
//!
//! The connecting socket's peer credentials are the workload's uid and gid; its pid is the
//! supervisor's (0 as seen from inside the sandbox).
//!
//! A connect to the egress proxy is written into the sandbox's [`crate::lineage::Lineage`]
//! (socket inode, calling process, its executable, its exec generation) before it is carried
//! out.

use std::collections::HashSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sched::CloneFlags;
use tracing::{debug, info, warn};

use super::sys;

/// Who the workload is on the host, and what the policy lets it connect to.
#[derive(Debug, Clone)]
pub struct Mediator {
    pub sandbox: String,
    /// The sandbox's record of who connected what and who exec'd when (see `lineage`).
    pub lineage: Arc<crate::lineage::Lineage>,
    /// The egress proxy's address inside the sandbox: connects to it are recorded.
    pub proxy: std::net::SocketAddr,
    /// The workload's host uid, gid and supplementary groups.
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// `(dev, ino)` of host sockets the policy lists by their own path.
    pub listed: HashSet<(u64, u64)>,
}

/// Serve one workload's listener until every process using its filter is gone. Each
/// notification is handled on a thread of its own (a blocking connect stalls nobody else).
pub async fn serve(listener: OwnedFd, mediator: Arc<Mediator>) {
    let listener = match sys::async_fd(listener, tokio::io::Interest::READABLE) {
        Ok(fd) => Arc::new(fd),
        Err(e) => {
            warn!(sandbox = %mediator.sandbox, error = %e, "cannot watch the connect listener");
            return;
        }
    };
    loop {
        let mut guard = match listener.readable().await {
            Ok(g) => g,
            Err(_) => return,
        };
        // POLLIN: a notification waits; POLLHUP alone: no process uses the filter any more.
        let mut poll = [nix::poll::PollFd::new(
            guard.get_inner().as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let revents = match nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO) {
            Ok(_) => poll[0].revents().unwrap_or(nix::poll::PollFlags::empty()),
            Err(_) => nix::poll::PollFlags::empty(),
        };
        if !revents.contains(nix::poll::PollFlags::POLLIN) {
            if revents.intersects(nix::poll::PollFlags::POLLHUP | nix::poll::PollFlags::POLLERR) {
                return;
            }
            guard.clear_ready();
            continue;
        }
        let notif = match sys::notif_recv(guard.get_inner().as_fd()) {
            Ok(n) => n,
            // The caller was killed or interrupted before it was received.
            Err(Errno::ENOENT) | Err(Errno::EINTR) => continue,
            Err(e) => {
                warn!(sandbox = %mediator.sandbox, error = %e, "reading a connect notification");
                return;
            }
        };
        drop(guard);
        let listener = listener.clone();
        let for_thread = mediator.clone();
        // A thread of its own, never reused: a pathname connect changes the thread's
        // namespaces and identity (see `resolve_and_connect`).
        let spawned = std::thread::Builder::new()
            .name("openshell-connect".into())
            .spawn(move || {
                let fd = listener.get_ref().as_fd();
                if let Some(errno) = handle(&for_thread, fd, &notif) {
                    let (val, errno) = match errno {
                        Errno::UnknownErrno => (0, 0),
                        e => (-1, e as i32),
                    };
                    // ENOENT: the caller is gone or was interrupted; nothing to answer.
                    let _ = sys::notif_send(fd, notif.id, val, errno);
                }
            });
        if let Err(e) = spawned {
            warn!(sandbox = %mediator.sandbox, error = %e, "cannot start a connect thread");
        }
    }
}

/// Carry out one `connect`. `Some(UnknownErrno)`: success; `Some(e)`: fail with `e`; `None`:
/// the notification is stale (its caller is gone), nothing to answer.
fn handle(m: &Mediator, listener: BorrowedFd<'_>, n: &sys::SeccompNotif) -> Option<Errno> {
    if i64::from(n.data.nr) != libc::SYS_connect {
        return Some(Errno::ENOSYS);
    }
    let fd = n.data.args[0] as i32;
    let addr_ptr = n.data.args[1] as usize;
    // socklen_t: the kernel reads 32 bits.
    let len = n.data.args[2] as u32 as usize;
    if len > std::mem::size_of::<libc::sockaddr_storage>() {
        return Some(Errno::EINVAL);
    }
    let pid = nix::unistd::Pid::from_raw(n.pid as i32);
    let pidfd = sys::pidfd_open(pid).ok()?;
    // The pid named the caller when the pidfd was opened only if the notification still waits.
    if !sys::notif_id_valid(listener, n.id) {
        return None;
    }
    let mut addr = vec![0u8; len];
    if len > 0 {
        let local = [std::io::IoSliceMut::new(&mut addr)];
        let remote = [nix::sys::uio::RemoteIoVec {
            base: addr_ptr,
            len,
        }];
        let mut local = local;
        match nix::sys::uio::process_vm_readv(pid, &mut local, &remote) {
            Ok(read) if read == len => {}
            _ => return Some(Errno::EFAULT),
        }
    }
    let socket = match sys::pidfd_getfd(pidfd.as_fd(), fd) {
        Ok(s) => s,
        Err(e) => return Some(e),
    };
    if !sys::notif_id_valid(listener, n.id) {
        return None;
    }
    let family = addr
        .get(..2)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
        .unwrap_or(0);
    let pathname = family == libc::AF_UNIX as u16 && addr.len() > 2 && addr[2] != 0;
    let result = if pathname {
        let path = &addr[2..];
        let path = &path[..path.iter().position(|b| *b == 0).unwrap_or(path.len())];
        let path = PathBuf::from(std::ffi::OsStr::from_bytes(path));
        resolve_and_connect(m, &pidfd, pid, &socket, &path)
    } else {
        // The connection is credited to this process: recorded before it exists.
        if super::notify::inet_address(&addr) == Some(m.proxy) {
            match nix::sys::stat::fstat(&socket) {
                Ok(st) => m.lineage.record_connect(n.pid, st.st_ino),
                Err(e) => return Some(e),
            }
        }
        sys::connect_raw(socket.as_fd(), &addr)
    };
    Some(match result {
        Ok(()) => Errno::UnknownErrno,
        Err(e) => e,
    })
}

use std::os::unix::ffi::OsStrExt;

/// A pathname connect. Runs on the notification's own thread, which takes the caller's mount
/// and network namespaces, working directory and identity, and ends afterwards.
fn resolve_and_connect(
    m: &Mediator,
    pidfd: &OwnedFd,
    pid: nix::unistd::Pid,
    socket: &OwnedFd,
    path: &std::path::Path,
) -> nix::Result<()> {
    let dir = |p: &str| {
        nix::fcntl::open(
            p,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
    };
    // Opened in the host's view, before this thread leaves it.
    let cwd = dir(&format!("/proc/{pid}/cwd"))?;
    let own_fds = dir("/proc/thread-self/fd")?;
    nix::sched::unshare(CloneFlags::CLONE_FS)?;
    nix::sched::setns(pidfd, CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET)?;
    nix::unistd::fchdir(&cwd)?;
    let bound = bound_socket_inodes()?;
    sys::become_on_this_thread(m.uid, m.gid, &m.groups)?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let target = nix::fcntl::openat2(nix::fcntl::AT_FDCWD, path.as_os_str(), how)?;
    let st = nix::sys::stat::fstat(&target)?;
    let is_socket = st.st_mode & libc::S_IFMT == libc::S_IFSOCK;
    let dev = (libc::major(st.st_dev), libc::minor(st.st_dev));
    let ours = bound.contains(&(dev.0, dev.1, st.st_ino as u32));
    let listed = m.listed.contains(&(st.st_dev, st.st_ino));
    if !is_socket {
        return Err(Errno::ECONNREFUSED);
    }
    if !(ours || listed) {
        info!(event = "sandbox.unix_connect", sandbox = %m.sandbox, decision = "deny",
              path = %path.display(), reason = "a socket created outside the sandbox",
              "connect refused");
        return Err(Errno::ECONNREFUSED);
    }
    debug!(sandbox = %m.sandbox, path = %path.display(), listed, "connect allowed");
    nix::unistd::fchdir(&own_fds)?;
    let name = target.as_raw_fd().to_string();
    let addr = sockaddr_un(name.as_bytes());
    sys::connect_raw(socket.as_fd(), &addr)
}

/// A pathname `sockaddr_un` as bytes.
fn sockaddr_un(path: &[u8]) -> Vec<u8> {
    let mut addr = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
    addr.extend_from_slice(path);
    addr.push(0);
    addr
}

/// `(major, minor, low 32 bits of the inode)` of every path a UNIX socket of the calling
/// thread's network namespace is bound to (`NETLINK_SOCK_DIAG`, `UNIX_DIAG_VFS`).
fn bound_socket_inodes() -> nix::Result<HashSet<(u32, u32, u32)>> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const UDIAG_SHOW_VFS: u32 = 0x2;
    const UNIX_DIAG_VFS: u16 = 1;
    let sock = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.push(libc::AF_UNIX as u8); // sdiag_family
    req.push(0); // sdiag_protocol
    req.extend_from_slice(&0u16.to_ne_bytes()); // pad
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // udiag_states: all
    req.extend_from_slice(&0u32.to_ne_bytes()); // udiag_ino
    req.extend_from_slice(&UDIAG_SHOW_VFS.to_ne_bytes());
    req.extend_from_slice(&[0u8; 8]); // udiag_cookie
    nix::sys::socket::send(sock.as_raw_fd(), &req, nix::sys::socket::MsgFlags::empty())?;
    let mut found = HashSet::new();
    let mut buf = vec![0u8; 32 * 1024];
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    loop {
        let n = nix::sys::socket::recv(
            sock.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        )?;
        if n == 0 {
            return Err(Errno::EIO);
        }
        let mut at = 0;
        while at + 16 <= n {
            let msg_len = u32_at(&buf, at) as usize;
            let kind = u16_at(&buf, at + 4);
            if msg_len < 16 || at + msg_len > n {
                return Err(Errno::EIO);
            }
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => return Err(Errno::EIO),
                SOCK_DIAG_BY_FAMILY => {
                    // unix_diag_msg is 16 bytes; attributes follow, 4-byte aligned.
                    let mut attr = at + 16 + 16;
                    let end = at + msg_len;
                    while attr + 4 <= end {
                        let rta_len = u16_at(&buf, attr) as usize;
                        let rta_type = u16_at(&buf, attr + 2);
                        if rta_len < 4 || attr + rta_len > end {
                            break;
                        }
                        if rta_type == UNIX_DIAG_VFS && rta_len >= 12 {
                            let ino = u32_at(&buf, attr + 4);
                            let dev = u32_at(&buf, attr + 8);
                            // The kernel's dev_t: 12 bits of major, 20 of minor.
                            found.insert((dev >> 20, dev & 0xf_ffff, ino));
                        }
                        attr += (rta_len + 3) & !3;
                    }
                }
                _ => {}
            }
            at += (msg_len + 3) & !3;
        }
    }
}

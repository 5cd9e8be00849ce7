//! The notified calls that are recorded, not decided: `execve`/`execveat` on both backends,
//! and `connect` in the guest (the process backend's supervisor carries connects out itself,
//! see `unix_connect`). Each is written into the sandbox's [`Lineage`] and then let through
//! unchanged (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`).
//!
//! Letting a call continue after looking at its arguments is unsafe for a decision (another
//! thread can change them in between), and none is made here: an exec is recorded whatever
//! it runs, and a connect is recorded by the socket it names. A thread that swaps the socket
//! or the address after the record gets a connection with no record, which the proxy denies.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::errno::Errno;

use super::sys;
use crate::lineage::Lineage;

/// The socket address a `connect` names, from its raw bytes (IPv4 or IPv6 only).
pub fn inet_address(raw: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes([*raw.first()?, *raw.get(1)?]);
    let port = u16::from_be_bytes([*raw.get(2)?, *raw.get(3)?]);
    let ip = match i32::from(family) {
        libc::AF_INET => {
            let o: [u8; 4] = raw.get(4..8)?.try_into().ok()?;
            IpAddr::V4(Ipv4Addr::from(o))
        }
        libc::AF_INET6 => {
            let o: [u8; 16] = raw.get(8..24)?.try_into().ok()?;
            let v6 = Ipv6Addr::from(o);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether notification `n` is a `connect` of a socket to `proxy`: the address read from
/// the caller's memory (`process_vm_readv`, or `/proc/PID/mem` on kernels without
/// CONFIG_CROSS_MEMORY_ATTACH, as the guest's).
fn connects_to(n: &sys::SeccompNotif, proxy: SocketAddr) -> bool {
    let len = (n.data.args[2] as u32 as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
    if len < 8 {
        return false;
    }
    let base = n.data.args[1] as usize;
    let mut addr = vec![0u8; len];
    let local = [std::io::IoSliceMut::new(&mut addr)];
    let remote = [nix::sys::uio::RemoteIoVec { base, len }];
    let mut local = local;
    let pid = nix::unistd::Pid::from_raw(n.pid as i32);
    let read = match nix::sys::uio::process_vm_readv(pid, &mut local, &remote) {
        Ok(read) => read == len,
        Err(Errno::ENOSYS) => {
            use std::os::unix::fs::FileExt;
            std::fs::File::open(format!("/proc/{}/mem", n.pid))
                .and_then(|mem| mem.read_exact_at(&mut addr, base as u64))
                .is_ok()
        }
        Err(_) => false,
    };
    read && inet_address(&addr) == Some(proxy)
}

/// The inode of descriptor `fd` of the notification's caller.
pub(crate) fn socket_inode(
    listener: BorrowedFd<'_>,
    n: &sys::SeccompNotif,
    fd: i32,
) -> Option<u64> {
    let pidfd = sys::pidfd_open(nix::unistd::Pid::from_raw(n.pid as i32)).ok()?;
    // The pid named the caller when the pidfd was opened only if the notification still waits.
    if !sys::notif_id_valid(listener, n.id) {
        return None;
    }
    let socket = sys::pidfd_getfd(pidfd.as_fd(), fd).ok()?;
    nix::sys::stat::fstat(&socket).ok().map(|st| st.st_ino)
}

/// Record notification `n` (an exec, or a connect to `proxy`) and let it continue. Calls
/// other than these are refused with ENOSYS (the filter notifies no others).
pub(crate) fn record_and_continue(
    listener: BorrowedFd<'_>,
    n: &sys::SeccompNotif,
    lineage: &Lineage,
    proxy: SocketAddr,
) {
    let nr = i64::from(n.data.nr);
    if nr == libc::SYS_execve || nr == libc::SYS_execveat {
        lineage.record_exec(n.pid);
    } else if nr == libc::SYS_connect {
        if connects_to(n, proxy) {
            match socket_inode(listener, n, n.data.args[0] as i32) {
                Some(inode) => lineage.record_connect(n.pid, inode),
                None => return,
            }
        }
    } else {
        // ENOENT: the caller is gone or was interrupted; nothing to answer.
        let _ = sys::notif_send(listener, n.id, -1, Errno::ENOSYS as i32);
        return;
    }
    let _ = sys::notif_continue(listener, n.id);
}

/// Receive and record one pending notification, if there is one.
pub(crate) fn serve_one(
    listener: BorrowedFd<'_>,
    lineage: &Lineage,
    proxy: SocketAddr,
) -> nix::Result<()> {
    match sys::notif_recv(listener) {
        Ok(n) => {
            record_and_continue(listener, &n, lineage, proxy);
            Ok(())
        }
        // The caller was killed or interrupted before it was received.
        Err(Errno::ENOENT) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Serve a listener whose calls are only recorded (the guest agent's workloads), until no
/// process uses its filter any more.
pub async fn serve(listener: OwnedFd, lineage: Arc<Lineage>, proxy: SocketAddr) {
    let Ok(listener) = sys::async_fd(listener, tokio::io::Interest::READABLE) else {
        return;
    };
    loop {
        let Ok(mut guard) = listener.readable().await else {
            return;
        };
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
        if serve_one(guard.get_inner().as_fd(), &lineage, proxy).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn socket_addresses() {
        let mut v4 = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        v4.extend_from_slice(&3128u16.to_be_bytes());
        v4.extend_from_slice(&[10, 200, 0, 1]);
        v4.extend_from_slice(&[0; 8]);
        let mut v6 = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        v6.extend_from_slice(&3128u16.to_be_bytes());
        v6.extend_from_slice(&[0; 4]);
        v6.extend_from_slice(
            &"::ffff:10.200.0.1"
                .parse::<Ipv6Addr>()
                .map(|a| a.octets())
                .unwrap_or_default(),
        );
        v6.extend_from_slice(&[0; 4]);
        let want: Option<SocketAddr> = "10.200.0.1:3128".parse().ok();
        assert_eq!((inet_address(&v4), inet_address(&v6)), (want, want));
        assert_eq!(inet_address(&[1, 0, 0]), None);
    }
}

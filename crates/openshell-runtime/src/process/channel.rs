//! The descriptor channel: how the sandbox's side hands the supervisor descriptors it can only
//! make from inside (a `SOCK_SEQPACKET` socket pair; the helper finds its end at
//! [`FD_CHANNEL`](super::protocol::FD_CHANNEL), inherited by init and by the process that
//! becomes the workload until its `execve`).
//!
//! Each message is one tag byte with one descriptor attached:
//! - [`Passed::Listener`]: a workload's seccomp user-notification listener (its `connect`
//!   calls, which the supervisor carries out; see `unix_connect`), sent by the workload's own
//!   process just before `execve`;
//! - [`Passed::PtyMaster`]: the master of a PTY allocated in the sandbox's own devpts, so the
//!   workload's terminal is a `/dev/pts/N` of its own `/dev`.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

const LISTENER: u8 = b'L';
const PTY_MASTER: u8 = b'P';

/// A descriptor that came over the channel.
#[derive(Debug)]
pub enum Passed {
    Listener(OwnedFd),
    PtyMaster(OwnedFd),
}

/// A new channel: (the supervisor's end, the helper's end), both close-on-exec.
pub fn pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

fn send(channel: RawFd, tag: u8, fd: BorrowedFd<'_>) -> nix::Result<()> {
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let iov = [IoSlice::new(std::slice::from_ref(&tag))];
    sendmsg::<()>(channel, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map(drop)
}

/// Helper side: hand over a workload's seccomp listener.
pub fn send_listener(channel: RawFd, fd: BorrowedFd<'_>) -> nix::Result<()> {
    send(channel, LISTENER, fd)
}

/// Helper side: hand over the master of the PTY the workload's stdio is.
pub fn send_pty_master(channel: RawFd, fd: BorrowedFd<'_>) -> nix::Result<()> {
    send(channel, PTY_MASTER, fd)
}

/// Supervisor side: the next descriptor, `Ok(None)` once every helper end is closed. Blocking
/// (the caller polls the socket for readability first).
pub fn recv(channel: BorrowedFd<'_>) -> nix::Result<Option<Passed>> {
    let mut tag = [0u8; 1];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [std::io::IoSliceMut::new(&mut tag)];
    let msg = recvmsg::<()>(
        channel.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )?;
    if msg.bytes == 0 {
        return Ok(None);
    }
    let mut received = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for raw in fds {
                let fd = super::sys::adopt_received_fd(raw);
                if received.is_none() {
                    received = Some(fd);
                }
            }
        }
    }
    let Some(fd) = received else {
        return Err(nix::Error::EBADMSG);
    };
    match tag[0] {
        LISTENER => Ok(Some(Passed::Listener(fd))),
        PTY_MASTER => Ok(Some(Passed::PtyMaster(fd))),
        _ => Err(nix::Error::EBADMSG),
    }
}

//! Async byte streams over raw descriptors (pipes, the PTY master, vsock sockets), and vsock
//! listening and dialing. Everything is driven by the current-thread tokio reactor.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{
    connect, getsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sys;

/// Anything a connection can be: a vsock or Unix stream.
pub trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}

/// A non-blocking descriptor read and written through the reactor.
#[derive(Debug)]
pub struct FdStream {
    inner: AsyncFd<OwnedFd>,
    /// A PTY master reports EIO once every slave descriptor is closed: that is its end of file.
    eio_is_eof: bool,
}

impl FdStream {
    /// Take `fd`, switch it to non-blocking mode and register it with the reactor.
    pub fn new(fd: OwnedFd) -> io::Result<FdStream> {
        set_nonblocking(fd.as_fd())?;
        Ok(FdStream {
            inner: sys::register(fd)?,
            eio_is_eof: false,
        })
    }

    /// Like [`new`](Self::new) for a PTY master.
    pub fn pty_master(fd: OwnedFd) -> io::Result<FdStream> {
        let mut s = FdStream::new(fd)?;
        s.eio_is_eof = true;
        Ok(s)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.inner.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard
                .try_io(|fd| nix::unistd::read(fd.get_ref(), unfilled).map_err(io::Error::from))
            {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EIO as i32) && this.eio_is_eof => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.inner.poll_write_ready(cx))?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let fd = self.inner.get_ref().as_raw_fd();
        match nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write) {
            // Pipes and terminals are closed by dropping them.
            Ok(()) | Err(Errno::ENOTSOCK) | Err(Errno::ENOTCONN) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(e.into())),
        }
    }
}

/// A listening vsock socket on any local CID.
pub fn vsock_listen(port: u32) -> io::Result<AsyncFd<OwnedFd>> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    nix::sys::socket::bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))?;
    nix::sys::socket::listen(&fd, Backlog::new(64).unwrap_or(Backlog::MAXCONN))?;
    sys::register(fd)
}

/// Accept one connection on a listener registered with the reactor.
pub async fn accept(listener: &AsyncFd<OwnedFd>) -> io::Result<FdStream> {
    loop {
        let mut guard = listener.readable().await?;
        let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
        match guard.try_io(|l| sys::accept(l.get_ref().as_fd(), flags).map_err(io::Error::from)) {
            Ok(Ok(fd)) => return FdStream::new(fd),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// Dial `port` on vsock CID `cid` without blocking the thread.
pub async fn vsock_connect(cid: u32, port: u32) -> io::Result<FdStream> {
    vsock_connect_start(cid, port)?.finish().await
}

/// A vsock connection being established: the handshake with the host proceeds while the
/// agent does other work, and [`finish`](Self::finish) waits for whatever is left of it.
#[derive(Debug)]
pub struct PendingConnect {
    stream: FdStream,
    in_progress: bool,
}

/// Start dialling `port` on vsock CID `cid`: the socket and the `connect` call, no waiting.
pub fn vsock_connect_start(cid: u32, port: u32) -> io::Result<PendingConnect> {
    let fd = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let in_progress = match connect(fd.as_raw_fd(), &VsockAddr::new(cid, port)) {
        Ok(()) => false,
        Err(Errno::EINPROGRESS) | Err(Errno::EINTR) => true,
        Err(e) => return Err(e.into()),
    };
    Ok(PendingConnect {
        stream: FdStream::new(fd)?,
        in_progress,
    })
}

impl PendingConnect {
    /// The connected stream, or why the connection failed.
    pub async fn finish(self) -> io::Result<FdStream> {
        if self.in_progress {
            let guard = self.stream.inner.writable().await?;
            drop(guard);
            if let errno @ 1.. = getsockopt(&self.stream.fd(), sockopt::SocketError)? {
                return Err(io::Error::from_raw_os_error(errno));
            }
        }
        Ok(self.stream)
    }
}

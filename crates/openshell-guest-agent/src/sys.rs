//! Every `unsafe` block of the guest agent, each with its invariant.
//!
//! Return codes are turned into `Result` at once with `Errno::result`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::SockFlag;

/// `accept4(2)` on a listening socket, returning the connection as an owned descriptor.
pub fn accept(listener: BorrowedFd<'_>, flags: SockFlag) -> nix::Result<OwnedFd> {
    let raw = nix::sys::socket::accept4(listener.as_raw_fd(), flags)?;
    // SAFETY: accept4 succeeded, so `raw` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

nix::ioctl_write_ptr_bad!(tiocswinsz, libc::TIOCSWINSZ, libc::winsize);

/// Set a terminal's window size (`TIOCSWINSZ`), on the PTY master or slave.
pub fn set_winsize(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> nix::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: `fd` is a live descriptor for the duration of the call and `ws` is a valid winsize
    // that the kernel only reads.
    unsafe { tiocswinsz(fd.as_raw_fd(), &ws) }.map(drop)
}

/// Set `IFF_UP` on a network interface through `SIOCGIFFLAGS`/`SIOCSIFFLAGS` on `sock` (any
/// AF_INET datagram socket).
pub fn interface_up(sock: BorrowedFd<'_>, name: &str) -> nix::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(Errno::EINVAL);
    }
    // SAFETY: ifreq is a plain C struct (integers, arrays and a union of integers and pointers
    // that the kernel fills); all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `sock` is a live socket; `req` is a valid ifreq with a NUL-terminated name that
    // the kernel reads and writes in place.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    Errno::result(r)?;
    // SAFETY: SIOCGIFFLAGS succeeded, so the union holds `ifru_flags`.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: as above; the kernel only reads `req`.
    let r = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    Errno::result(r).map(drop)
}

/// Whether descriptor `fd` is open in this process.
pub fn fd_is_open(fd: i32) -> bool {
    // SAFETY: F_GETFD takes no pointer and only queries the descriptor table.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// `dup2(2)`: make `target` a copy of `src`, replacing whatever `target` was.
pub fn dup_onto(src: BorrowedFd<'_>, target: i32) -> nix::Result<()> {
    // SAFETY: `src` is live; dup2 atomically replaces `target`, which only ever names one of the
    // standard descriptors 0..=2 that this process deliberately (re)points.
    let r = unsafe { libc::dup2(src.as_raw_fd(), target) };
    Errno::result(r).map(drop)
}

/// Register an owned descriptor with the current tokio reactor.
pub fn register(fd: OwnedFd) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd is an open descriptor that stays open, and names the same file
    // description, until it is dropped; the AsyncFd owns it for its whole lifetime. Only called
    // from tasks on the agent's runtime, so a reactor is present.
    unsafe { tokio::io::unix::AsyncFd::register(fd) }.map_err(std::io::Error::from)
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])` in linux/random.h.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)` in linux/random.h.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mix `entropy` into the kernel's input pool, credited in full, then reseed the kernel's
/// generator from it (`RNDADDENTROPY`, `RNDRESEEDCRNG` on `random`, a descriptor of
/// /dev/random or /dev/urandom). Needs CAP_SYS_ADMIN; the agent is PID 1 as root.
pub fn reseed_random(random: BorrowedFd<'_>, entropy: &[u8]) -> nix::Result<()> {
    let bits = i32::try_from(entropy.len() * 8).map_err(|_| Errno::EINVAL)?;
    let size = i32::try_from(entropy.len()).map_err(|_| Errno::EINVAL)?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in
    // u32 words so the buffer is aligned for it.
    let mut words = vec![0u32; 2 + entropy.len().div_ceil(4)];
    words[0] = bits as u32;
    words[1] = size as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut bytes = [0u8; 4];
        bytes[..chunk.len()].copy_from_slice(chunk);
        // The kernel reads `buf` as bytes: keep their order in memory.
        words[2 + i] = u32::from_ne_bytes(bytes);
    }
    // SAFETY: `random` is live; `words` is a rand_pool_info whose buf_size (in bytes) does not
    // exceed the buffer that follows it, and the kernel only reads it during the call.
    let r = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, words.as_ptr()) };
    Errno::result(r)?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let r = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) };
    Errno::result(r).map(drop)
}

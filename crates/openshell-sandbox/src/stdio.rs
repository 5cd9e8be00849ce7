//! The workload's standard streams, as the CLI connects them.
//!
//! The supervisor never hands its own stdin, stdout or stderr to a sandbox (ARCHITECTURE.md):
//! the workload runs in a session of its own, so job control would not keep it from reading
//! the caller's terminal while the supervisor is in the background, terminal settings it
//! changed would outlive it, and a stdout or stderr that is a file could be truncated. Instead:
//!
//! - our stdin is a terminal: the workload gets a terminal of its own ([`StdioMode::Pty`], at
//!   our terminal's size). We put our terminal in raw mode, relay bytes both ways (the
//!   workload's stdout and stderr both arrive on our stdout), pass window-size changes on, and
//!   restore our terminal's settings when done: [`RawMode`] restores them when dropped, so on
//!   every way out of the supervisor (the workload's end, its death by a signal, `--timeout`,
//!   the stop grace, an error).
//! - otherwise pipes ([`StdioMode::Piped`]), relayed to our own streams: end of file on our
//!   stdin reaches the workload, and its output is written out before the exit status is
//!   returned ([`Relay::drained`]).
//!
//! The relays are threads doing blocking I/O on our descriptors: that works for every kind of
//! file (a regular file cannot be polled), a slow reader of our stdout only slows the workload
//! down (its pipe or terminal fills up) and loses nothing, and reading our terminal from a
//! background process group stops the supervisor with SIGTTIN, as it would any program (setting
//! raw mode there stops it with SIGTTOU). Neither signal is ignored or blocked. The stdin relay
//! is never joined: a blocking read must not hold up the exit.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::Context;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, SetArg, Termios};
use openshell_runtime::{InputStream, OutputStream, SandboxedProcess, StdioMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::sys;

/// Bytes moved per read.
const CHUNK: usize = 64 * 1024;
/// The size given to the workload's terminal when ours reports none (0x0).
const DEFAULT_SIZE: (u16, u16) = (24, 80);

/// How the workload's streams are connected: a terminal of its own when our stdin is a
/// terminal, pipes otherwise. Never our own descriptors.
pub fn mode() -> StdioMode {
    let stdin = io::stdin();
    if !nix::unistd::isatty(stdin.as_fd()).unwrap_or(false) {
        return StdioMode::Piped;
    }
    let (rows, cols) = terminal_size(stdin.as_fd());
    StdioMode::Pty { rows, cols }
}

fn terminal_size(fd: BorrowedFd<'_>) -> (u16, u16) {
    match sys::window_size(fd) {
        Ok((rows, cols)) if rows > 0 && cols > 0 => (rows, cols),
        _ => DEFAULT_SIZE,
    }
}

/// Our terminal (stdin) in raw mode; dropping this restores the settings it had before.
struct RawMode {
    saved: Termios,
    raw: Termios,
}

impl RawMode {
    fn enter() -> nix::Result<RawMode> {
        let stdin = io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        set_termios(stdin.as_fd(), &raw)?;
        Ok(RawMode { saved, raw })
    }

    /// Raw mode again (after the supervisor was stopped and continued: the shell that stopped
    /// it has set the terminal its own way meanwhile).
    fn reapply(&self) -> nix::Result<()> {
        set_termios(io::stdin().as_fd(), &self.raw)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Err(e) = set_termios(io::stdin().as_fd(), &self.saved) {
            tracing::warn!(error = %e, "could not restore the terminal's settings");
        }
    }
}

fn set_termios(fd: BorrowedFd<'_>, t: &Termios) -> nix::Result<()> {
    loop {
        match termios::tcsetattr(fd, SetArg::TCSADRAIN, t) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// The relays between the workload's streams and ours, started once the sandbox runs.
pub struct Relay {
    /// Restores our terminal when the relay is dropped.
    raw: Option<RawMode>,
    pty: bool,
    /// One per output relay, completed when it has written everything.
    outputs: Vec<oneshot::Receiver<()>>,
}

impl Relay {
    /// Take the sandbox's streams and start relaying them (and, for a terminal, put ours in raw
    /// mode).
    pub fn start(sandbox: &mut SandboxedProcess) -> anyhow::Result<Relay> {
        let stdio = sandbox.take_stdio();
        let handle = Handle::current();
        let mut relay = Relay {
            raw: None,
            pty: false,
            outputs: Vec::new(),
        };
        if let Some(pty) = stdio.pty {
            relay.pty = true;
            let input = pty
                .try_clone()
                .context("duplicating the workload's terminal")?;
            relay.raw = match RawMode::enter() {
                Ok(raw) => Some(raw),
                Err(e) => {
                    tracing::warn!(error = %e, "could not put the terminal in raw mode");
                    None
                }
            };
            spawn("openshell-stdin", move || relay_terminal_input(input))?;
            relay.outputs.push(spawn_output(
                "openshell-stdout",
                Out::Stdout,
                WhenClosed::Discard,
                move |buf| read_fd(pty.as_fd(), buf),
            )?);
            return Ok(relay);
        }
        if let Some(input) = stdio.stdin {
            let handle = handle.clone();
            spawn("openshell-stdin", move || relay_piped_input(&handle, input))?;
        }
        for (name, out, stream) in [
            ("openshell-stdout", Out::Stdout, stdio.stdout),
            ("openshell-stderr", Out::Stderr, stdio.stderr),
        ] {
            if let Some(mut stream) = stream {
                let handle = handle.clone();
                relay
                    .outputs
                    .push(spawn_output(name, out, WhenClosed::Close, move |buf| {
                        read_stream(&handle, &mut stream, buf)
                    })?);
            }
        }
        Ok(relay)
    }

    /// Give the workload's terminal our terminal's current size (on SIGWINCH).
    pub fn window_changed(&self, sandbox: &SandboxedProcess) {
        if !self.pty {
            return;
        }
        let (rows, cols) = terminal_size(io::stdin().as_fd());
        if let Err(e) = sandbox.resize(rows, cols) {
            tracing::debug!(error = %e, rows, cols, "could not resize the workload's terminal");
        }
    }

    /// The supervisor was continued after a stop (SIGCONT): raw mode again, and the size the
    /// terminal has now. In the background, setting raw mode stops it again (SIGTTOU).
    pub fn continued(&self, sandbox: &SandboxedProcess) {
        if let Some(raw) = &self.raw {
            if let Err(e) = raw.reapply() {
                tracing::warn!(error = %e, "could not put the terminal in raw mode again");
            }
        }
        self.window_changed(sandbox);
    }

    /// Resolves once every output relay has written all the workload's output (its end of
    /// file: the sandbox is gone, so nothing holds the other end any more).
    pub async fn drained(&mut self) {
        for done in &mut self.outputs {
            let _ = done.await;
        }
        self.outputs.clear();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(f)
        .with_context(|| format!("starting the {name} relay thread"))
        .map(drop)
}

/// Our stdin to the workload's stdin pipe; our end of file closes the pipe.
fn relay_piped_input(handle: &Handle, mut input: InputStream) {
    let stdin = io::stdin();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match read_fd(stdin.as_fd(), &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if handle.block_on(input.write_all(&buf[..n])).is_err() {
            // The workload closed its stdin: what follows has nowhere to go.
            return;
        }
    }
    let _ = handle.block_on(input.shutdown());
}

/// Our terminal to the workload's: keystrokes, in raw mode, as they come.
fn relay_terminal_input(pty: OwnedFd) {
    let stdin = io::stdin();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match read_fd(stdin.as_fd(), &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if write_all_fd(pty.as_fd(), &buf[..n]).is_err() {
            return;
        }
    }
}

#[derive(Clone, Copy)]
enum Out {
    Stdout,
    Stderr,
}

/// What an output relay does once our side cannot be written any more (a closed pipe).
#[derive(Clone, Copy, PartialEq)]
enum WhenClosed {
    /// Close the workload's pipe too: it gets EPIPE or SIGPIPE, as in any pipeline.
    Close,
    /// Keep reading and drop the bytes (a terminal has no such signal), so the workload
    /// never blocks on its output.
    Discard,
}

/// Relay what `read` returns to our stdout or stderr until its end of file; the receiver
/// completes when all of it is written.
fn spawn_output(
    name: &str,
    out: Out,
    when_closed: WhenClosed,
    mut read: impl FnMut(&mut [u8]) -> io::Result<usize> + Send + 'static,
) -> anyhow::Result<oneshot::Receiver<()>> {
    let (done, drained) = oneshot::channel();
    spawn(name, move || {
        let (stdout, stderr) = (io::stdout(), io::stderr());
        let to = match out {
            Out::Stdout => stdout.as_fd(),
            Out::Stderr => stderr.as_fd(),
        };
        let mut buf = vec![0u8; CHUNK];
        let mut writing = true;
        loop {
            let n = match read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if writing && write_all_fd(to, &buf[..n]).is_err() {
                writing = false;
                if when_closed == WhenClosed::Close {
                    break;
                }
            }
        }
        let _ = done.send(());
    })?;
    Ok(drained)
}

fn read_stream(handle: &Handle, stream: &mut OutputStream, buf: &mut [u8]) -> io::Result<usize> {
    handle.block_on(stream.read(buf))
}

/// One read, retried on EINTR; on a non-blocking descriptor, waits until it is readable.
fn read_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match nix::unistd::read(fd, buf) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => wait_for(fd, PollFlags::POLLIN)?,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Write all of `buf`, retried on EINTR; on a non-blocking descriptor, waits until it is
/// writable.
fn write_all_fd(fd: BorrowedFd<'_>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => wait_for(fd, PollFlags::POLLOUT)?,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn wait_for(fd: BorrowedFd<'_>, events: PollFlags) -> io::Result<()> {
    let mut fds = [PollFd::new(fd, events)];
    match nix::poll::poll(&mut fds, PollTimeout::NONE) {
        Ok(_) | Err(Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

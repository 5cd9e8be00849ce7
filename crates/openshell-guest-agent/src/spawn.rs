//! A `Spawn` connection: launch one restricted process and relay its stdio, signals, terminal
//! size and exit status.
//!
//! Tasks on the agent's thread: one writer owns the connection's write half and sends the frames
//! it is handed in order; one reader per output stream; one host reader for stdin, signals and
//! resizes; one stdin writer. The session itself waits for the reaper to report the exit, lets
//! the output readers drain (bounded by [`OUTPUT_GRACE`], since a background grandchild may hold
//! the pipe open), then sends `Exited` last.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use openshell_runtime::process::child::{launch_restricted, Recorder};
use openshell_runtime::process::protocol::{LaunchPlan, WaitReport};
use openshell_runtime::vm_protocol::{
    read_frame_async, Event, Frame, GuestStdio, Kind, Request, MAX_GUEST_WRITE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::{spawn_local, JoinHandle};

use crate::control::{failed, failed_as, send, Reader, Writer};
use crate::fdio::FdStream;
use crate::linux::{power_off, Ctx};
use crate::{chain, diag, sys};

/// How long output may keep flowing after the process has exited.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// Frames queued toward the host.
const OUT_QUEUE: usize = 32;
/// Stdin chunks queued toward the process.
const STDIN_QUEUE: usize = 16;

/// The agent's side of the process's stdio.
struct ParentSide {
    stdin: Option<FdStream>,
    stdout: Option<FdStream>,
    stderr: Option<FdStream>,
    /// A descriptor of the PTY master, for resizes.
    pty: Option<OwnedFd>,
}

/// The process's descriptors, kept open in the agent until the fork is done.
struct ChildSide {
    fds: Vec<OwnedFd>,
    stdio: [RawFd; 3],
}

fn cloexec(fd: &OwnedFd) -> std::io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))?;
    Ok(())
}

fn open_stdio(stdio: GuestStdio) -> std::io::Result<(ParentSide, ChildSide)> {
    match stdio {
        GuestStdio::Piped => {
            let (in_r, in_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
            let stdio = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
            Ok((
                ParentSide {
                    stdin: Some(FdStream::new(in_w)?),
                    stdout: Some(FdStream::new(out_r)?),
                    stderr: Some(FdStream::new(err_r)?),
                    pty: None,
                },
                ChildSide {
                    fds: vec![in_r, out_w, err_w],
                    stdio,
                },
            ))
        }
        GuestStdio::Pty { rows, cols } => {
            let pty = nix::pty::openpty(None, None)?;
            cloexec(&pty.master)?;
            cloexec(&pty.slave)?;
            sys::set_winsize(pty.slave.as_fd(), rows, cols)?;
            let writer = pty.master.try_clone()?;
            let resize = pty.master.try_clone()?;
            let s = pty.slave.as_raw_fd();
            Ok((
                ParentSide {
                    stdin: Some(FdStream::pty_master(writer)?),
                    stdout: Some(FdStream::pty_master(pty.master)?),
                    stderr: None,
                    pty: Some(resize),
                },
                ChildSide {
                    fds: vec![pty.slave],
                    stdio: [s, s, s],
                },
            ))
        }
        GuestStdio::Null => {
            let null: OwnedFd = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?
                .into();
            let n = null.as_raw_fd();
            Ok((
                ParentSide {
                    stdin: None,
                    stdout: None,
                    stderr: None,
                    pty: None,
                },
                ChildSide {
                    fds: vec![null],
                    stdio: [n, n, n],
                },
            ))
        }
    }
}

/// A `Spawn` connection: launch, then relay until the process has ended.
pub async fn run(
    ctx: Rc<Ctx>,
    rd: Reader,
    mut wr: Writer,
    launch: LaunchPlan,
    stdio: GuestStdio,
    main: bool,
) {
    match start(&ctx, launch, stdio, main) {
        Ok(process) => session(ctx, rd, wr, process, main).await,
        Err(frame) => {
            send(&mut wr, &frame).await;
        }
    }
}

/// A session's cgroup below the workload's: created before the launch, and on drop every
/// process left in it is killed (`cgroup.kill`) and the cgroup removed.
struct SessionCgroup {
    dir: std::path::PathBuf,
}

impl SessionCgroup {
    fn new(workload_procs: &std::path::Path) -> Result<SessionCgroup, String> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let parent = workload_procs
            .parent()
            .ok_or_else(|| "the workload cgroup has no directory".to_owned())?;
        let dir = parent.join(format!("session-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(SessionCgroup { dir })
    }
}

impl Drop for SessionCgroup {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(self.dir.join("cgroup.kill"), "1") {
            diag!("{}: cgroup.kill: {e}", self.dir.display());
        }
        // The killed processes leave asynchronously; the reaper collects them meanwhile.
        for _ in 0..200 {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => {
                    diag!("{}: {e}", self.dir.display());
                    return;
                }
            }
        }
        diag!("{}: still busy", self.dir.display());
    }
}

/// A launched process, before its session.
pub struct Launched {
    pid: i32,
    /// The session's own cgroup (not the main process's): killed when the session ends.
    session_cgroup: Option<SessionCgroup>,
    report: openshell_runtime::process::protocol::RestrictionReport,
    parent: ParentSide,
    is_pty: bool,
    exited: tokio::sync::oneshot::Receiver<WaitReport>,
}

impl Launched {
    /// Kill the process (its session will never run).
    pub fn kill(&self) {
        if let Err(e) = kill(Pid::from_raw(self.pid), Signal::SIGKILL) {
            diag!("killing pid {}: {e}", self.pid);
        }
    }
}

/// Launch one restricted process with its stdio, without awaiting anything: the reaper learns
/// of it before this returns. On failure, the `Failed` frame for the host.
pub fn start(
    ctx: &Ctx,
    mut launch: LaunchPlan,
    stdio: GuestStdio,
    main: bool,
) -> Result<Launched, Frame> {
    let is_pty = matches!(stdio, GuestStdio::Pty { .. });
    if launch.pty != is_pty {
        let msg = "launch.pty must be true exactly when stdio is Pty";
        return Err(failed("protocol", msg));
    }
    let mut session_cgroup = None;
    if let Some(procs) = ctx.cgroup_procs.borrow().clone() {
        if main {
            launch.join_cgroups.push(procs);
        } else {
            let session = SessionCgroup::new(&procs).map_err(|e| failed("cgroup", e))?;
            launch.join_cgroups.push(session.dir.join("cgroup.procs"));
            session_cgroup = Some(session);
        }
    }
    let (parent, child) = open_stdio(stdio).map_err(|e| failed("stdio", e.to_string()))?;
    // Blocks this thread until the process has exec'd or failed; nothing else runs meanwhile,
    // which also keeps the reaper from collecting a failed launch's status.
    let recorder = Recorder {
        lineage: &ctx.lineage,
        proxy: ctx.egress_addr,
    };
    let launched = launch_restricted(&launch, Some(child.stdio), Some(recorder));
    drop(child.fds);
    let launched = launched.map_err(|e| {
        diag!("spawn {}: {}: {}", launch.program, e.stage, e.message);
        failed_as(&e.stage, e.message, e.kind)
    })?;
    let (pid, report) = (launched.pid, launched.report);
    if let Some(listener) = launched.listener {
        spawn_local(openshell_runtime::process::notify::serve(
            listener,
            ctx.lineage.clone(),
            ctx.egress_addr,
        ));
    }
    if ctx.identity.borrow().is_none() {
        // Every process of the sandbox has this Landlock plan: what it may write is where
        // code is not a binary's own.
        *ctx.identity.borrow_mut() = Some(crate::egress::resolver(
            ctx,
            launch.landlock.read_write.clone(),
        ));
    }
    // Registered before any await: see Reaper::register.
    let exited = ctx.reaper.register(pid);
    Ok(Launched {
        pid,
        session_cgroup,
        report,
        parent,
        is_pty,
        exited,
    })
}

/// Relay a launched process's stdio, signals, terminal size and exit status over a connection.
pub async fn session(ctx: Rc<Ctx>, rd: Reader, mut wr: Writer, process: Launched, main: bool) {
    let Launched {
        pid,
        session_cgroup,
        report,
        parent,
        is_pty,
        exited,
    } = process;
    let (tx, mut rx) = mpsc::channel::<Frame>(OUT_QUEUE);
    let writer = spawn_local(async move {
        while let Some(frame) = rx.recv().await {
            if !send(&mut wr, &frame).await {
                // The host is gone: keep draining so nobody blocks on a full queue.
                while rx.recv().await.is_some() {}
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let _ = tx.send(Frame::json(&Event::Restricted(report))).await;
    let _ = tx.send(Frame::json(&Event::Running { pid })).await;

    let mut readers: Vec<JoinHandle<()>> = Vec::new();
    match (parent.stdout, is_pty) {
        (Some(out), true) => {
            // A terminal has one output stream; both ends of file come when it closes.
            readers.push(spawn_local(relay_output(
                out,
                tx.clone(),
                Kind::Stdout,
                &[Kind::StdoutEof, Kind::StderrEof],
            )));
        }
        (Some(out), false) => {
            readers.push(spawn_local(relay_output(
                out,
                tx.clone(),
                Kind::Stdout,
                &[Kind::StdoutEof],
            )));
        }
        (None, _) => {
            let _ = tx.send(Frame::empty(Kind::StdoutEof)).await;
        }
    }
    match parent.stderr {
        Some(err) => readers.push(spawn_local(relay_output(
            err,
            tx.clone(),
            Kind::Stderr,
            &[Kind::StderrEof],
        ))),
        None if !is_pty => {
            let _ = tx.send(Frame::empty(Kind::StderrEof)).await;
        }
        None => {}
    }

    let (stdin_tx, stdin_rx) = mpsc::channel::<Vec<u8>>(STDIN_QUEUE);
    let stdin_task = spawn_local(relay_stdin(parent.stdin, stdin_rx));
    let host_task = spawn_local(host_reader(ctx.clone(), rd, pid, stdin_tx, parent.pty));

    // The reaper drops the sender only if the agent is shutting down.
    let status = exited
        .await
        .unwrap_or(WaitReport::Signal(Signal::SIGKILL as i32));
    // What the process left running (in the background, in a session of its own) ends with
    // it, before its status is reported.
    drop(session_cgroup);

    let drain = futures_join_all(&mut readers);
    if tokio::time::timeout(OUTPUT_GRACE, drain).await.is_err() {
        diag!("pid {pid}: output still open after exit; closing it");
    }
    for h in readers.into_iter().chain([stdin_task, host_task]) {
        // A finished handle may already have been awaited above: never poll it again.
        if !h.is_finished() {
            h.abort();
            let _ = h.await;
        }
    }
    if main && !ctx.test_mode && has_dirty_pages() {
        // The host ends the VM as soon as it reads the main process's status: everything
        // written to the shares must be on the host by then. Plain writes already are (no
        // writeback cache); only pages dirtied through shared mappings wait in the guest. A
        // sync also makes virtiofsd syncfs the host's file systems, which can take hundreds of
        // milliseconds, so it runs only when there is something to write.
        nix::unistd::sync();
    }
    let _ = tx.send(Frame::json(&Event::Exited(status))).await;
    drop(tx);
    let _ = writer.await;
    if main {
        if ctx.test_mode {
            diag!("main process ended ({status:?}); exiting (test mode)");
            std::process::exit(0);
        }
        diag!("main process ended ({status:?}); powering off");
        power_off();
    }
}

/// Whether the guest holds dirty or in-flight page-cache pages (`/proc/meminfo`); `true` when
/// that cannot be read.
fn has_dirty_pages() -> bool {
    match std::fs::read_to_string("/proc/meminfo") {
        Ok(text) => meminfo_dirty(&text).is_none_or(|kib| kib > 0),
        Err(_) => true,
    }
}

/// `Dirty` plus `Writeback` in KiB, or `None` if either is missing.
fn meminfo_dirty(meminfo: &str) -> Option<u64> {
    let field = |name: &str| {
        meminfo.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<u64>()
                .ok()
        })
    };
    Some(field("Dirty")? + field("Writeback")?)
}

/// Await every handle in turn; one already finished is not polled again.
async fn futures_join_all(handles: &mut [JoinHandle<()>]) {
    for h in handles.iter_mut() {
        if !h.is_finished() {
            let _ = h.await;
        }
    }
}

async fn relay_output(mut from: FdStream, tx: mpsc::Sender<Frame>, kind: Kind, eofs: &[Kind]) {
    let mut buf = vec![0u8; MAX_GUEST_WRITE];
    loop {
        match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                let frame = Frame {
                    kind,
                    payload: buf[..n].to_vec(),
                };
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                diag!("reading {kind:?}: {e}");
                break;
            }
        }
    }
    for &eof in eofs {
        let _ = tx.send(Frame::empty(eof)).await;
    }
}

async fn relay_stdin(to: Option<FdStream>, mut rx: mpsc::Receiver<Vec<u8>>) {
    let mut to = to;
    while let Some(chunk) = rx.recv().await {
        if let Some(stream) = to.as_mut() {
            if stream.write_all(&chunk).await.is_err() {
                // The process closed its stdin; later input has nowhere to go.
                to = None;
            }
        }
    }
    // StdinEof (or the host went away): closing our end is the process's end of file.
}

/// Frames from the host while the process runs. A bad frame, or the host going away, kills the
/// process: nobody is left to receive its output or status.
async fn host_reader(
    ctx: Rc<Ctx>,
    mut rd: Reader,
    pid: i32,
    stdin_tx: mpsc::Sender<Vec<u8>>,
    pty: Option<OwnedFd>,
) {
    let mut stdin_tx = Some(stdin_tx);
    let why = loop {
        let frame = match read_frame_async(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break "the host closed the connection".to_owned(),
            Err(e) => break chain(&e),
        };
        match frame.kind {
            Kind::Stdin => {
                if let Some(tx) = &stdin_tx {
                    if tx.send(frame.payload).await.is_err() {
                        stdin_tx = None;
                    }
                }
            }
            Kind::StdinEof => stdin_tx = None,
            Kind::Json => match frame.decode_json::<Request>() {
                Ok(Request::Signal { signal }) => match Signal::try_from(signal) {
                    Ok(sig) if ctx.reaper.is_running(pid) => {
                        if let Err(e) = kill(Pid::from_raw(pid), sig) {
                            diag!("signal {sig} to pid {pid}: {e}");
                        }
                    }
                    Ok(_) => {}
                    Err(_) => diag!("ignoring invalid signal number {signal}"),
                },
                Ok(Request::Resize { rows, cols }) => match &pty {
                    Some(fd) => {
                        if let Err(e) = sys::set_winsize(fd.as_fd(), rows, cols) {
                            diag!("resize pid {pid}: {e}");
                        }
                    }
                    None => diag!("ignoring resize of a process without a terminal"),
                },
                Ok(_) => break "unexpected request while a process runs".to_owned(),
                Err(e) => break chain(&e),
            },
            other => break format!("unexpected {other:?} frame"),
        }
    };
    drop(stdin_tx);
    diag!("pid {pid}: {why}");
    if ctx.reaper.is_running(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::meminfo_dirty;

    #[test]
    fn dirty_pages_come_from_meminfo() {
        let idle = "MemFree:  100 kB\nDirty:             0 kB\nWriteback:         0 kB\n";
        assert_eq!(meminfo_dirty(idle), Some(0));
        let busy = "Dirty:            12 kB\nWritebackTmp:      9 kB\nWriteback:         4 kB\n";
        assert_eq!(meminfo_dirty(busy), Some(16));
        assert_eq!(meminfo_dirty("Dirty: 3 kB\n"), None);
        assert_eq!(meminfo_dirty("Dirty: x kB\nWriteback: 0 kB\n"), None);
    }
}

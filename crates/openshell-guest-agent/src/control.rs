//! One control connection: its first frame decides what it is (setup, a process, a forward).

use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;

use openshell_runtime::process::protocol::FailureKind;
use openshell_runtime::vm_protocol::{
    decode_boot_requests, read_frame_async, write_frame_async, Event, Frame, Kind, Request,
    MAX_GUEST_WRITE, RESUME_ENTROPY_BYTES,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::fdio::{Io, PendingConnect};
use crate::linux::Ctx;
use crate::{boot, chain, diag, spawn};

pub type Reader = ReadHalf<Box<dyn Io>>;
pub type Writer = WriteHalf<Box<dyn Io>>;

/// A `Failed` event of a setup step ([`FailureKind::Sandbox`]).
pub fn failed(stage: &str, message: impl Into<String>) -> Frame {
    failed_as(stage, message, FailureKind::Sandbox)
}

/// A `Failed` event of `kind`.
pub fn failed_as(stage: &str, message: impl Into<String>, kind: FailureKind) -> Frame {
    Frame::json(&Event::Failed {
        stage: stage.to_owned(),
        message: message.into(),
        kind,
    })
}

/// Best-effort write of one frame; a host that went away is not an error worth more than a line.
pub async fn send(w: &mut Writer, frame: &Frame) -> bool {
    match write_frame_async(w, frame).await {
        Ok(()) => true,
        Err(e) => {
            diag!("control write: {}", chain(&e));
            false
        }
    }
}

/// Serve one control connection. A successful `Setup` may be followed by one more request on
/// the same connection: the host sends `Setup` and the workload's `Spawn` back to back on the
/// connection the agent opened to announce itself (see `linux::announce`), saving a dial and a
/// round trip at boot. After a failed `Setup` nothing else is read.
pub async fn serve_connection(ctx: Rc<Ctx>, conn: Box<dyn Io>) {
    let (mut rd, mut wr) = tokio::io::split(conn);
    let Some(mut request) = read_request(&mut rd).await else {
        return;
    };
    if let Request::Setup {
        hostname,
        mounts,
        pids_limit,
        memory_limit_mib,
        tmp,
        read_only,
        identity_max_binary_bytes,
    } = &request
    {
        ctx.identity_max_binary_bytes
            .set(*identity_max_binary_bytes);
        let limits = boot::Limits {
            pids: *pids_limit,
            memory_mib: *memory_limit_mib,
        };
        let shape = boot::Shape {
            mounts,
            tmp: tmp.as_ref(),
            read_only,
        };
        let done = setup(&ctx, hostname, shape, limits);
        let reply = match &done {
            Ok(()) => Frame::json(&Event::Ready),
            Err(e) => {
                diag!("setup: {}", chain(e));
                failed(e.stage(), chain(e))
            }
        };
        if !send(&mut wr, &reply).await || done.is_err() {
            let _ = wr.shutdown().await;
            return;
        }
        request = match read_request(&mut rd).await {
            Some(Request::Setup { .. }) => {
                send(&mut wr, &failed("protocol", "setup was already done")).await;
                return;
            }
            Some(next) => next,
            None => {
                let _ = wr.shutdown().await;
                return;
            }
        };
    }
    match request {
        // Only reachable as a first request: handled above.
        Request::Setup { .. } => {}
        Request::Spawn {
            launch,
            stdio,
            main,
        } => spawn::run(ctx, rd, wr, launch, stdio, main).await,
        Request::Forward { port } => forward(rd, wr, port).await,
        Request::Signal { .. } | Request::Resize { .. } => {
            send(
                &mut wr,
                &failed("protocol", "no process runs on this connection"),
            )
            .await;
        }
        // The host dials again when a restore's transport reset cut its first `Resume` off
        // the answer: applied again (more entropy, the clock set again), answered the same.
        Request::Resume {
            realtime_ns,
            entropy,
        } => {
            let reply = match apply_resume(realtime_ns, &entropy, !ctx.test_mode) {
                Ok(()) => Frame::json(&Event::Ready),
                Err(e) => failed("resume", chain(&e)),
            };
            send(&mut wr, &reply).await;
        }
    }
}

/// What a connection to a parked agent came to (see [`resume`]).
#[derive(Debug)]
pub enum Resumed {
    /// The guest's clock is set and its random generator reseeded: carry on booting.
    Yes,
    /// Not a `Resume` (answered `Failed`): keep waiting for one.
    NotResume,
}

/// Why a parked agent cannot go on: its random state is the template's, shared by every VM
/// restored from it, so nothing may run.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("Resume carries {0} bytes of entropy, expected {RESUME_ENTROPY_BYTES}")]
    Entropy(usize),
    #[error("opening /dev/urandom")]
    Open(#[source] std::io::Error),
    #[error("reseeding the kernel's random generator")]
    Reseed(#[source] nix::errno::Errno),
    #[error("setting the clock")]
    Clock(#[source] nix::errno::Errno),
}

/// A parked agent's connection to the host: expects [`Request::Resume`], applies it (entropy
/// first, then the clock) and answers `Ready`, or `Failed` with the reason. A bad `Resume` is an
/// error: the host gave a restored clone no fresh randomness. A connection that ends (the
/// transport reset of a restore) or carries anything else is `NotResume`.
pub async fn resume(conn: Box<dyn Io>) -> Result<Resumed, ResumeError> {
    let (mut rd, mut wr) = tokio::io::split(conn);
    let request = read_request(&mut rd).await;
    let Some(Request::Resume {
        realtime_ns,
        entropy,
    }) = request
    else {
        if request.is_some() {
            send(
                &mut wr,
                &failed(
                    "protocol",
                    "the agent is parked: the first request must be Resume",
                ),
            )
            .await;
        }
        return Ok(Resumed::NotResume);
    };
    let done = apply_resume(realtime_ns, &entropy, true);
    let reply = match &done {
        Ok(()) => Frame::json(&Event::Ready),
        Err(e) => failed("resume", chain(e)),
    };
    send(&mut wr, &reply).await;
    let _ = wr.shutdown().await;
    done.map(|()| Resumed::Yes)
}

/// Check a `Resume` and, with `apply` (not in test mode, on a host), carry it out.
fn apply_resume(realtime_ns: u64, entropy: &[u8], apply: bool) -> Result<(), ResumeError> {
    use std::os::fd::AsFd as _;
    if entropy.len() != RESUME_ENTROPY_BYTES {
        return Err(ResumeError::Entropy(entropy.len()));
    }
    if !apply {
        return Ok(());
    }
    let random = std::fs::File::open("/dev/urandom").map_err(ResumeError::Open)?;
    crate::sys::reseed_random(random.as_fd(), entropy).map_err(ResumeError::Reseed)?;
    let ns = i64::try_from(realtime_ns).unwrap_or(i64::MAX);
    let now = nix::sys::time::TimeSpec::new(ns / 1_000_000_000, ns % 1_000_000_000);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, now).map_err(ResumeError::Clock)
}

/// The workload from the boot requests (see `vm_protocol::BOOT_REQUESTS`): set up and launch it
/// at once, then report on the boot connection (`announce`, whose dial was started before and
/// completes meanwhile) as if the host had sent the requests on it: `Ready` (or `Failed`), then
/// the workload's `Spawn` session.
pub async fn serve_preloaded(
    ctx: Rc<Ctx>,
    requests: Result<Vec<u8>, String>,
    announce: std::io::Result<PendingConnect>,
) {
    enum Boot {
        SetupFailed(Frame),
        LaunchFailed(Frame),
        Launched(Box<spawn::Launched>),
    }
    let boot = match requests
        .map_err(|m| failed("boot", m))
        .and_then(|bytes| decode_boot_requests(&bytes).map_err(|e| failed("protocol", chain(&e))))
    {
        Err(frame) => Boot::SetupFailed(frame),
        Ok((
            Request::Setup {
                hostname,
                mounts,
                pids_limit,
                memory_limit_mib,
                tmp,
                read_only,
                identity_max_binary_bytes,
            },
            Request::Spawn { launch, stdio, .. },
        )) => {
            ctx.identity_max_binary_bytes.set(identity_max_binary_bytes);
            let limits = boot::Limits {
                pids: pids_limit,
                memory_mib: memory_limit_mib,
            };
            let shape = boot::Shape {
                mounts: &mounts,
                tmp: tmp.as_ref(),
                read_only: &read_only,
            };
            match setup(&ctx, &hostname, shape, limits) {
                Err(e) => {
                    diag!("setup: {}", chain(&e));
                    Boot::SetupFailed(failed(e.stage(), chain(&e)))
                }
                Ok(()) => match spawn::start(&ctx, launch, stdio, true) {
                    Ok(process) => Boot::Launched(Box::new(process)),
                    Err(frame) => Boot::LaunchFailed(frame),
                },
            }
        }
        // decode_boot_requests checked the kinds.
        Ok(_) => Boot::SetupFailed(failed("protocol", "unexpected boot requests")),
    };
    let conn = match announce {
        Ok(pending) => pending.finish().await,
        Err(e) => Err(e),
    };
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            diag!("could not announce readiness: {e}");
            if let Boot::Launched(process) = &boot {
                // Nobody could ever receive its output or status.
                process.kill();
            }
            return;
        }
    };
    let (rd, mut wr) = tokio::io::split(Box::new(conn) as Box<dyn Io>);
    match boot {
        Boot::SetupFailed(frame) => {
            send(&mut wr, &frame).await;
            let _ = wr.shutdown().await;
        }
        Boot::LaunchFailed(frame) => {
            if send(&mut wr, &Frame::json(&Event::Ready)).await {
                send(&mut wr, &frame).await;
            }
        }
        Boot::Launched(process) => {
            if send(&mut wr, &Frame::json(&Event::Ready)).await {
                spawn::session(ctx, rd, wr, *process, true).await;
            } else {
                process.kill();
            }
        }
    }
}

/// The next request on a connection; `None` at end of file or after a bad frame (logged).
async fn read_request(rd: &mut Reader) -> Option<Request> {
    let frame = match read_frame_async(rd).await {
        Ok(Some(f)) => f,
        Ok(None) => return None,
        Err(e) => {
            diag!("control: bad request frame: {}", chain(&e));
            return None;
        }
    };
    if frame.kind != Kind::Json {
        diag!("control: a {:?} frame where a request belongs", frame.kind);
        return None;
    }
    match frame.decode_json() {
        Ok(r) => Some(r),
        Err(e) => {
            diag!("control: bad request: {}", chain(&e));
            None
        }
    }
}

fn setup(
    ctx: &Ctx,
    hostname: &str,
    shape: boot::Shape<'_>,
    limits: boot::Limits,
) -> Result<(), boot::SetupError> {
    if ctx.setup_done.replace(true) {
        return Err(boot::SetupError::Again);
    }
    boot::validate_setup(hostname, &shape, limits)?;
    if ctx.test_mode {
        return Ok(());
    }
    let procs = boot::setup(hostname, &shape, limits)?;
    *ctx.cgroup_procs.borrow_mut() = procs;
    Ok(())
}

/// Relay a TCP connection to the guest's loopback as `Data` frames. Either side's end of file
/// ends the forward (a guest half-close would not reach the host anyway).
async fn forward(mut rd: Reader, mut wr: Writer, port: u16) {
    if port == 0 {
        send(&mut wr, &failed("validate", "port 0")).await;
        return;
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let tcp = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            send(&mut wr, &failed("connect", format!("{addr}: {e}"))).await;
            return;
        }
    };
    if !send(&mut wr, &Frame::json(&Event::Connected)).await {
        return;
    }
    let (mut tcp_rd, mut tcp_wr) = tcp.into_split();
    let host_to_tcp = async {
        loop {
            match read_frame_async(&mut rd).await {
                Ok(Some(f)) if f.kind == Kind::Data => {
                    if tcp_wr.write_all(&f.payload).await.is_err() {
                        return;
                    }
                }
                Ok(Some(f)) => {
                    diag!("forward: unexpected {:?} frame", f.kind);
                    return;
                }
                Ok(None) => return,
                Err(e) => {
                    diag!("forward: {}", chain(&e));
                    return;
                }
            }
        }
    };
    let tcp_to_host = async {
        let mut buf = vec![0u8; MAX_GUEST_WRITE];
        loop {
            match tcp_rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let frame = Frame {
                        kind: Kind::Data,
                        payload: buf[..n].to_vec(),
                    };
                    if !send(&mut wr, &frame).await {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = host_to_tcp => {}
        () = tcp_to_host => {}
    }
}

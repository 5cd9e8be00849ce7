//! One control connection: its first frame decides what it is (setup, a process, a forward).

use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;

use openshell_runtime::vm_protocol::{
    read_frame_async, write_frame_async, Event, Frame, Kind, Request, MAX_GUEST_WRITE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::fdio::Io;
use crate::linux::Ctx;
use crate::{boot, chain, diag, spawn};

pub type Reader = ReadHalf<Box<dyn Io>>;
pub type Writer = WriteHalf<Box<dyn Io>>;

/// A `Failed` event.
pub fn failed(stage: &str, message: impl Into<String>) -> Frame {
    Frame::json(&Event::Failed {
        stage: stage.to_owned(),
        message: message.into(),
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

pub async fn serve_connection(ctx: Rc<Ctx>, conn: Box<dyn Io>) {
    let (mut rd, mut wr) = tokio::io::split(conn);
    let first = match read_frame_async(&mut rd).await {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) => {
            diag!("control: bad first frame: {}", chain(&e));
            return;
        }
    };
    if first.kind != Kind::Json {
        diag!("control: first frame is {:?}, not a request", first.kind);
        return;
    }
    let request: Request = match first.decode_json() {
        Ok(r) => r,
        Err(e) => {
            diag!("control: bad first frame: {}", chain(&e));
            return;
        }
    };
    match request {
        Request::Setup {
            hostname,
            mounts,
            pids_limit,
        } => {
            let reply = match setup(&ctx, &hostname, &mounts, pids_limit) {
                Ok(()) => Frame::json(&Event::Ready),
                Err(e) => {
                    diag!("setup: {}", chain(&e));
                    failed(e.stage(), chain(&e))
                }
            };
            send(&mut wr, &reply).await;
            let _ = wr.shutdown().await;
        }
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
    }
}

fn setup(
    ctx: &Ctx,
    hostname: &str,
    mounts: &[openshell_runtime::vm_protocol::GuestMount],
    pids_limit: Option<u64>,
) -> Result<(), boot::SetupError> {
    if ctx.setup_done.replace(true) {
        return Err(boot::SetupError::Again);
    }
    boot::validate_setup(hostname, mounts, pids_limit)?;
    if ctx.test_mode {
        return Ok(());
    }
    let procs = boot::setup(hostname, mounts, pids_limit)?;
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

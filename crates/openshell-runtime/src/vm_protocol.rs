//! The host ↔ guest-agent protocol of the vm backend, over vsock.
//!
//! Every byte between host and guest travels over vsock; nothing else connects them.
//!
//! - **Control** ([`AGENT_PORT`]): the host dials the agent once per session. Its first frame is a
//!   [`Request`]; the agent answers with [`Event`]s and data frames. One connection carries one
//!   process (the workload, or one `exec`), or one port forward. A successful
//!   [`Request::Setup`] may be followed by one more request on its connection.
//! - **Boot** ([`READY_PORT`]): once its control port listens, the agent dials the host. That
//!   connection is served like a control connection: the host sends `Setup` and the workload's
//!   `Spawn` back to back on it, without waiting for the agent in between. The qemu engine
//!   instead puts both requests in the guest's tree before boot ([`BOOT_REQUESTS`], see
//!   [`encode_boot_requests`]): the agent sets up and launches the workload at once, then dials
//!   the host (the dial was started before the launch and completes meanwhile), and the host
//!   sends nothing on that connection, only reads `Ready` and the workload's events. Every vsock
//!   round trip before the workload starts is gone.
//! - **Resume** (qemu engine templates, see `vm::template`): a guest booted with [`PARK_ARG`]
//!   on its kernel command line sets up only what no sandbox decides (pseudo filesystems, its
//!   listeners), dials [`READY_PORT`] once to say it is parked, and waits for one control
//!   connection whose first frame is [`Request::Resume`]. The host snapshots it there. A VM
//!   restored from that snapshot gets `Resume` (the host's clock and fresh entropy: every clone
//!   starts with the template's random state), answers `Ready`, then reads its tree's boot
//!   requests and carries on as a cold-booted guest does.
//! - **Egress** ([`EGRESS_PORT`]): the agent listens on 127.0.0.1:3128 inside the guest and, for
//!   each connection, dials the host on this port, sends one caller preamble line (see
//!   `openshell_proxy::identity`) naming the binary it resolved from the guest's /proc, then relays
//!   bytes. The host side is the egress proxy's Unix listener.
//!
//! Frames are length-prefixed because a guest's half-close does not reach the host as EOF over
//! vhost-user vsock: `u32` big-endian length of what follows, one kind byte, the payload.
//! Payloads written by the agent are at most [`MAX_GUEST_WRITE`] bytes (larger single writes
//! stall the vhost-device-vsock TX path with this guest kernel). Every frame is validated; a bad
//! one ends the connection, never the agent.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::process::protocol::{FailureKind, LaunchPlan, RestrictionReport, WaitReport};

/// vsock port the agent listens on for control connections.
pub const AGENT_PORT: u32 = 1024;
/// vsock port on the host (CID 2) the agent dials once, when its control port listens; the
/// connection then carries `Setup` and the workload.
pub const READY_PORT: u32 = 1025;
/// vsock port on the host (CID 2) the agent dials for egress.
pub const EGRESS_PORT: u32 = 3128;
/// The address the workload's proxy variables point at inside the guest.
pub const GUEST_PROXY_ADDR: &str = "127.0.0.1:3128";
/// Where the qemu engine puts the boot requests in the guest's tree (a read-only tmpfs of
/// its own); the agent reads them, then hides [`AGENT_DIR`] from the workload.
pub const BOOT_REQUESTS: &str = "/openshell/boot/requests";
/// The guest directory holding the agent binary and the boot requests.
pub const AGENT_DIR: &str = "/openshell";
/// The kernel command-line word that makes the agent park for a template (see the module docs).
pub const PARK_ARG: &str = "openshell.park";
/// How many bytes of host entropy a [`Request::Resume`] carries (and the agent requires).
pub const RESUME_ENTROPY_BYTES: usize = 64;
/// Largest frame accepted (header excluded).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest payload the agent writes in one frame.
pub const MAX_GUEST_WRITE: usize = 30_000;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A JSON [`Request`] (host→guest) or [`Event`] (guest→host).
    Json = 1,
    /// Bytes for the process's stdin (or the PTY).
    Stdin = 2,
    /// Bytes the process wrote to stdout (or the PTY).
    Stdout = 3,
    /// Bytes the process wrote to stderr.
    Stderr = 4,
    /// The host closed stdin.
    StdinEof = 5,
    /// stdout reached end-of-file.
    StdoutEof = 6,
    /// stderr reached end-of-file.
    StderrEof = 7,
    /// Raw bytes of a port forward.
    Data = 8,
}

impl Kind {
    pub fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Json,
            2 => Kind::Stdin,
            3 => Kind::Stdout,
            4 => Kind::Stderr,
            5 => Kind::StdinEof,
            6 => Kind::StdoutEof,
            7 => Kind::StderrEof,
            8 => Kind::Data,
            _ => return None,
        })
    }
}

/// How a process's stdio is connected inside the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestStdio {
    Piped,
    Pty { rows: u16, cols: u16 },
    Null,
}

/// One virtio-fs share to mount in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMount {
    /// The virtio-fs tag.
    pub tag: String,
    /// Where it appears in the guest (the same path as on the host).
    pub path: String,
    pub readonly: bool,
}

/// The guest's private /tmp: a tmpfs of at most `size_mib` (`None`: the kernel's default),
/// read only when the policy lists /tmp only as read_only, with `keep`, the shares below /tmp
/// (already in the guest's tree), bound back inside it at their paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestTmp {
    pub size_mib: Option<u64>,
    pub readonly: bool,
    pub keep: Vec<GuestMount>,
}

/// What the host asks of the agent (first frame of a control connection).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Finish setting up the guest: mounts, hostname, limits. Sent once, before anything else.
    Setup {
        hostname: String,
        mounts: Vec<GuestMount>,
        pids_limit: Option<u64>,
        /// The workload's memory limit (the policy's `memory_mib`): every spawned process
        /// joins a cgroup with this `memory.max`, capped below the guest's RAM so the guest
        /// kernel and the agent keep room (a cgroup OOM, not a whole-guest one).
        #[serde(default)]
        memory_limit_mib: Option<u64>,
        /// A private /tmp (`filesystem_policy.tmp: private`); `None`: /tmp is a share (the
        /// host's, with `tmp: host`).
        #[serde(default)]
        tmp: Option<GuestTmp>,
        /// Paths of the guest's tree that are read-only shares (qemu engine): the agent binds
        /// each read-only over itself, so the guest refuses writes and metadata changes there
        /// itself (EROFS, as the process backend answers) before any request reaches the host.
        #[serde(default)]
        read_only: Vec<String>,
        /// Executables larger than this are not hashed for the egress identity check (the
        /// agent denies their connections); `None`: the default.
        #[serde(default)]
        identity_max_binary_bytes: Option<u64>,
    },
    /// Start a process. `main`: the workload, whose end powers the VM off.
    Spawn {
        launch: LaunchPlan,
        stdio: GuestStdio,
        main: bool,
    },
    /// While a process runs: deliver a signal.
    Signal { signal: i32 },
    /// While a PTY process runs: resize its terminal.
    Resize { rows: u16, cols: u16 },
    /// Connect to a TCP port on the guest's loopback and relay [`Kind::Data`] frames.
    Forward { port: u16 },
    /// Only to a parked agent, as the first frame of the first control connection after a
    /// restore: set the guest's wall clock and mix `entropy` ([`RESUME_ENTROPY_BYTES`] bytes)
    /// into its random pool, reseeding the kernel's generator. Answered `Ready` or `Failed`.
    Resume {
        /// The host's `CLOCK_REALTIME`, in nanoseconds since the epoch.
        realtime_ns: u64,
        entropy: Vec<u8>,
    },
}

/// What the agent reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Event {
    /// Setup done.
    Ready,
    /// The process's restrictions are in place (just before execve).
    Restricted(RestrictionReport),
    /// execve succeeded; `pid` is the guest pid.
    Running { pid: i32 },
    /// The request failed; nothing runs. `kind` says whether the program was missing (127),
    /// not executable (126) or the setup failed (125).
    Failed {
        stage: String,
        message: String,
        kind: FailureKind,
    },
    /// The process ended.
    Exited(WaitReport),
    /// A forward is connected.
    Connected,
}

/// The boot requests: `setup` then `spawn` (a main `Spawn`), as two frames (the qemu engine's
/// file, and what the krun engine sends on the ready connection).
pub fn encode_boot_requests(setup: &Request, spawn: &Request) -> Vec<u8> {
    let mut out = Frame::json(setup).encode();
    out.extend_from_slice(&Frame::json(spawn).encode());
    out
}

/// What is wrong with a boot requests file.
#[derive(Debug, thiserror::Error)]
pub enum BootRequestsError {
    #[error("request {index}")]
    Frame {
        index: usize,
        #[source]
        source: FrameError,
    },
    #[error("request {0} is missing")]
    Missing(usize),
    #[error("request {0} is not a JSON frame")]
    NotJson(usize),
    #[error("expected Setup, then the workload's Spawn (main: true)")]
    Order,
    #[error("{0} bytes after the two requests")]
    Trailing(usize),
}

/// Decode a boot requests file: a `Setup` and a main `Spawn`, nothing else.
pub fn decode_boot_requests(bytes: &[u8]) -> Result<(Request, Request), BootRequestsError> {
    let mut r = bytes;
    let mut next = |index: usize| -> Result<Request, BootRequestsError> {
        let frame = read_frame(&mut r)
            .map_err(|source| BootRequestsError::Frame { index, source })?
            .ok_or(BootRequestsError::Missing(index))?;
        if frame.kind != Kind::Json {
            return Err(BootRequestsError::NotJson(index));
        }
        frame
            .decode_json()
            .map_err(|source| BootRequestsError::Frame { index, source })
    };
    let setup = next(1)?;
    let spawn = next(2)?;
    if !r.is_empty() {
        return Err(BootRequestsError::Trailing(r.len()));
    }
    match (&setup, &spawn) {
        (Request::Setup { .. }, Request::Spawn { main: true, .. }) => Ok((setup, spawn)),
        _ => Err(BootRequestsError::Order),
    }
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed json frame")]
    Json(#[source] serde_json::Error),
    #[error("connection")]
    Io(#[source] std::io::Error),
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn json<T: Serialize>(value: &T) -> Frame {
        Frame {
            kind: Kind::Json,
            payload: serde_json::to_vec(value).unwrap_or_default(),
        }
    }

    pub fn empty(kind: Kind) -> Frame {
        Frame {
            kind,
            payload: Vec::new(),
        }
    }

    pub fn decode_json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, FrameError> {
        serde_json::from_slice(&self.payload).map_err(FrameError::Json)
    }

    /// Header and payload as one buffer.
    pub fn encode(&self) -> Vec<u8> {
        let len = self.payload.len() + 1;
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.payload);
        out
    }
}

/// Validate a frame header; returns the number of bytes that follow it (kind + payload).
pub fn check_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > MAX_FRAME + 1 {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Decode the bytes after a header.
pub fn decode_body(body: Vec<u8>) -> Result<Frame, FrameError> {
    let (&kind, payload) = body.split_first().ok_or(FrameError::Empty)?;
    let kind = Kind::from_byte(kind).ok_or(FrameError::UnknownKind(kind))?;
    Ok(Frame {
        kind,
        payload: payload.to_vec(),
    })
}

/// Blocking read of one frame; `Ok(None)` at a clean end-of-stream.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, FrameError> {
    let mut header = [0u8; 4];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(FrameError::Io(e)),
    }
    let len = check_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(FrameError::Io)?;
    decode_body(body).map(Some)
}

/// Blocking write of one frame.
pub fn write_frame(w: &mut impl Write, frame: &Frame) -> Result<(), FrameError> {
    w.write_all(&frame.encode()).map_err(FrameError::Io)
}

/// Async read of one frame; `Ok(None)` at a clean end-of-stream.
pub async fn read_frame_async<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Frame>, FrameError> {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 4];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(FrameError::Io(e)),
    }
    let len = check_len(header)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(FrameError::Io)?;
    decode_body(body).map(Some)
}

/// Async write of one frame.
pub async fn write_frame_async<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), FrameError> {
    use tokio::io::AsyncWriteExt;
    w.write_all(&frame.encode()).await.map_err(FrameError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            Frame::json(&Event::Running { pid: 7 }),
            Frame {
                kind: Kind::Stdout,
                payload: b"hello".to_vec(),
            },
            Frame::empty(Kind::StdoutEof),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            write_frame(&mut wire, f).expect("write");
        }
        let mut r = &wire[..];
        let mut back = Vec::new();
        while let Some(f) = read_frame(&mut r).expect("read") {
            back.push(f);
        }
        assert_eq!(back, frames);
    }

    fn setup() -> Request {
        Request::Setup {
            hostname: "openshell".into(),
            mounts: Vec::new(),
            pids_limit: Some(64),
            memory_limit_mib: None,
            tmp: None,
            read_only: Vec::new(),
            identity_max_binary_bytes: Some(1 << 20),
        }
    }

    fn spawn(main: bool) -> Request {
        let seccomp = crate::process::seccomp::compiled().expect("the table compiles");
        let launch: LaunchPlan = serde_json::from_value(serde_json::json!({
            "program": "/bin/true",
            "argv": ["true"],
            "env": [],
            "cwd": "/",
            "uid": 1000,
            "gid": 1000,
            "pty": false,
            "landlock": { "read_only": [], "read_write": [], "hard_requirement": true },
            "join_cgroups": [],
            "seccomp": seccomp,
        }))
        .expect("a launch plan");
        Request::Spawn {
            launch,
            stdio: GuestStdio::Null,
            main,
        }
    }

    #[test]
    fn boot_requests_are_a_setup_and_the_main_spawn() {
        let bytes = encode_boot_requests(&setup(), &spawn(true));
        let (s, p) = decode_boot_requests(&bytes).expect("decoded");
        assert!(matches!(
            s,
            Request::Setup {
                pids_limit: Some(64),
                ..
            }
        ));
        assert!(matches!(p, Request::Spawn { main: true, .. }));

        let bad: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "request 1 is missing"),
            (Frame::json(&setup()).encode(), "request 2 is missing"),
            (
                encode_boot_requests(&spawn(true), &setup()),
                "expected Setup",
            ),
            (
                encode_boot_requests(&setup(), &spawn(false)),
                "expected Setup",
            ),
            ([bytes.clone(), vec![0]].concat(), "1 bytes after"),
            (bytes[..bytes.len() - 1].to_vec(), "request 2"),
            (
                [
                    Frame::json(&setup()).encode(),
                    Frame::empty(Kind::StdinEof).encode(),
                ]
                .concat(),
                "request 2 is not a JSON frame",
            ),
        ];
        for (bytes, expected) in bad {
            let err = decode_boot_requests(&bytes).expect_err("rejected");
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        let cases: Vec<(&[u8], &str)> = vec![
            (&[0, 0, 0, 0], "empty frame"),
            (&[0xff, 0xff, 0xff, 0xff], "exceeds the limit"),
            (&[0, 0, 0, 1, 99], "unknown frame kind 99"),
        ];
        for (bytes, expected) in cases {
            let mut r = bytes;
            let err = read_frame(&mut r).expect_err("rejected");
            assert!(err.to_string().contains(expected), "{err}");
        }
        let mut truncated: &[u8] = &[0, 0, 0, 5, 1, b'{'];
        assert!(read_frame(&mut truncated).is_err());
        let f = Frame {
            kind: Kind::Json,
            payload: b"{not json".to_vec(),
        };
        assert!(f.decode_json::<Request>().is_err());
    }
}

//! Starting an agent in test mode and talking to it.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use openshell_runtime::process::protocol::{
    FailureKind, LandlockPlan, LaunchPlan, RestrictionReport, WaitReport,
};
use openshell_runtime::vm_protocol::{
    read_frame, write_frame, Event, Frame, GuestStdio, Kind, Request,
};

/// A running agent; killed when dropped.
pub struct Agent {
    child: Child,
    _dir: tempfile::TempDir,
    pub control: PathBuf,
    pub egress: SocketAddr,
}

impl Agent {
    /// Start an agent whose egress goes to `<dir>/egress` (which the test may listen on).
    pub fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        Agent::start_in(dir)
    }

    pub fn start_in(dir: tempfile::TempDir) -> Agent {
        let control = dir.path().join("ctl");
        // OPENSHELL_TEST_AGENT runs the suite against another build (e.g. the static release).
        let program = std::env::var_os("OPENSHELL_TEST_AGENT")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_openshell-guest-agent").into());
        let mut child = Command::new(program)
            .arg("--test-mode")
            .arg("--listen-unix")
            .arg(&control)
            .arg("--egress-listen")
            .arg("127.0.0.1:0")
            .arg("--egress-unix")
            .arg(dir.path().join("egress"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the agent: {e}"));
        let stdout = child.stdout.take().unwrap_or_else(|| unreachable!());
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading the agent's addresses: {e}"));
        let info: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert_eq!(info["control"].as_str(), control.to_str(), "{line}");
        let egress = info["egress"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no egress address in {line}"));
        Agent {
            child,
            _dir: dir,
            control,
            egress,
        }
    }

    pub fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.control).unwrap_or_else(|e| panic!("connecting: {e}"))
    }

    /// Connect and send `request` as the first frame.
    pub fn request(&self, request: &Request) -> UnixStream {
        let mut conn = self.connect();
        send(&mut conn, &Frame::json(request));
        conn
    }

    /// Wait for the agent to exit on its own; its exit code.
    pub fn wait(&mut self) -> Option<i32> {
        self.child
            .wait()
            .unwrap_or_else(|e| panic!("waiting for the agent: {e}"))
            .code()
    }

    /// Whether the agent is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn send(conn: &mut UnixStream, frame: &Frame) {
    write_frame(conn, frame).unwrap_or_else(|e| panic!("sending {:?}: {e}", frame.kind));
    let _ = conn.flush();
}

pub fn recv(conn: &mut UnixStream) -> Option<Frame> {
    read_frame(conn).unwrap_or_else(|e| panic!("reading a frame: {e}"))
}

pub fn recv_event(conn: &mut UnixStream) -> Event {
    let frame = recv(conn).unwrap_or_else(|| panic!("connection closed, wanted an event"));
    assert_eq!(frame.kind, Kind::Json, "{frame:?}");
    frame
        .decode_json()
        .unwrap_or_else(|e| panic!("decoding an event: {e}"))
}

/// Whether restricted launches can run here (they drop to uid 65534). Prints SKIP if not;
/// under CI=true a skip is a failure.
pub fn can_launch(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: needs root, and CI=true forbids skipping");
        }
        #[allow(clippy::print_stderr)] // a skip says why
        {
            eprintln!("SKIP {test}: needs root (the privilege drop)");
        }
    }
    root
}

/// A launch plan as the host would send it: nobody, the usual read-only system directories.
pub fn plan(argv: &[&str]) -> LaunchPlan {
    LaunchPlan {
        program: argv[0].to_owned(),
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
        uid: 65534,
        gid: 65534,
        userns: None,
        groups: vec![],
        fresh_proc: false,
        keep_caps: 0,
        pty: false,
        join_cgroups: vec![],
        landlock: LandlockPlan {
            read_only: ["/usr", "/bin", "/lib", "/lib64", "/etc"]
                .iter()
                .map(PathBuf::from)
                .collect(),
            read_write: vec![PathBuf::from("/dev/null")],
            hard_requirement: false,
        },
        // As the vm backend makes it: connect and exec notified to the agent.
        seccomp: openshell_runtime::process::seccomp::with_lineage_notified(
            openshell_runtime::process::seccomp::compiled().expect("the seccomp table compiles"),
        ),
        mediate_connect: false,
        notify_launcher: true,
    }
}

/// Everything a Spawn connection produced.
#[derive(Debug, Default)]
pub struct Outcome {
    pub restricted: Option<RestrictionReport>,
    pub pid: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_eof: bool,
    pub stderr_eof: bool,
    pub largest_payload: usize,
    pub exited: Option<WaitReport>,
    pub failed: Option<(String, String)>,
    /// The typed meaning of `failed`.
    pub failed_kind: Option<FailureKind>,
    /// Frame kinds in arrival order (data frames collapsed).
    pub order: Vec<String>,
}

/// Read frames until Exited, Failed or the end of the connection.
pub fn collect(conn: &mut UnixStream, out: &mut Outcome) {
    while let Some(frame) = recv(conn) {
        out.largest_payload = out.largest_payload.max(frame.payload.len());
        let name = format!("{:?}", frame.kind);
        match frame.kind {
            Kind::Stdout => out.stdout.extend_from_slice(&frame.payload),
            Kind::Stderr => out.stderr.extend_from_slice(&frame.payload),
            Kind::StdoutEof => out.stdout_eof = true,
            Kind::StderrEof => out.stderr_eof = true,
            Kind::Json => {
                let event: Event = frame
                    .decode_json()
                    .unwrap_or_else(|e| panic!("decoding an event: {e}"));
                out.order.push(event_name(&event).to_owned());
                match event {
                    Event::Restricted(r) => out.restricted = Some(r),
                    Event::Running { pid } => out.pid = Some(pid),
                    Event::Exited(w) => {
                        out.exited = Some(w);
                        return;
                    }
                    Event::Failed {
                        stage,
                        message,
                        kind,
                    } => {
                        out.failed = Some((stage, message));
                        out.failed_kind = Some(kind);
                        return;
                    }
                    other => panic!("unexpected event {other:?}"),
                }
                continue;
            }
            other => panic!("unexpected frame kind {other:?}"),
        }
        if out.order.last() != Some(&name) {
            out.order.push(name);
        }
    }
}

/// Read until `Running`, collecting like [`collect`].
pub fn until_running(conn: &mut UnixStream) -> Outcome {
    let mut out = Outcome::default();
    while out.pid.is_none() {
        let event = recv_event(conn);
        out.order.push(event_name(&event).to_owned());
        match event {
            Event::Restricted(r) => out.restricted = Some(r),
            Event::Running { pid } => out.pid = Some(pid),
            other => panic!("wanted Restricted then Running, got {other:?}"),
        }
    }
    out
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::Ready => "Ready",
        Event::Restricted(_) => "Restricted",
        Event::Running { .. } => "Running",
        Event::Failed { .. } => "Failed",
        Event::Exited(_) => "Exited",
        Event::Connected => "Connected",
    }
}

pub fn spawn_request(launch: LaunchPlan, stdio: GuestStdio, main: bool) -> Request {
    Request::Spawn {
        launch,
        stdio,
        main,
    }
}

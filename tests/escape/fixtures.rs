//! What the host sets up around a probe and reads afterwards: canaries, secrets, listeners, a
//! victim process. Everything here runs on the host, outside every sandbox.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{self, Scratch};
use crate::Verdict;

/// The post-conditions of one probe run: each failed one is a line of the verdict.
#[derive(Default)]
pub struct Findings(Vec<String>);

impl Findings {
    pub fn add(&mut self, what: impl Into<String>) {
        self.0.push(what.into());
    }

    pub fn expect(&mut self, holds: bool, what: impl FnOnce() -> String) {
        if !holds {
            self.0.push(what());
        }
    }

    pub fn verdict(self) -> Verdict {
        if self.0.is_empty() {
            Verdict::Held
        } else {
            Verdict::Escaped(self.0.join("; "))
        }
    }
}

/// A random token no probe can guess.
pub fn token(what: &str) -> String {
    let mut bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("urandom");
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("openshell-{what}-{hex}")
}

/// A host file whose content and metadata must not change.
pub struct Canary {
    pub path: PathBuf,
    content: Vec<u8>,
    meta: Meta,
}

/// Inode, mode, owner, group, size, mtime, ctime, links.
type Meta = (u64, u32, u32, u32, u64, i64, i64, i64);

fn meta_of(path: &Path) -> Option<Meta> {
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((
        m.ino(),
        m.mode(),
        m.uid(),
        m.gid(),
        m.size(),
        m.mtime(),
        m.ctime(),
        m.nlink() as i64,
    ))
}

impl Canary {
    /// Write `content` at `path` (mode `mode`, root's) and remember it.
    pub fn new(path: &Path, content: &str, mode: u32) -> Canary {
        std::fs::write(path, content).expect("write canary");
        common::chmod(path, mode);
        Canary {
            path: path.to_owned(),
            content: content.as_bytes().to_vec(),
            meta: meta_of(path).expect("canary metadata"),
        }
    }

    pub fn check(&self, f: &mut Findings) {
        let now = std::fs::read(&self.path).ok();
        f.expect(now.as_deref() == Some(&self.content[..]), || {
            format!("{} changed or gone", self.path.display())
        });
        f.expect(meta_of(&self.path) == Some(self.meta), || {
            format!("{}'s metadata changed", self.path.display())
        });
    }
}

/// The names in a host directory, which must stay the same.
pub struct Listing {
    dir: PathBuf,
    names: Vec<String>,
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

impl Listing {
    pub fn of(dir: &Path) -> Listing {
        Listing {
            dir: dir.to_owned(),
            names: names_in(dir),
        }
    }

    pub fn check(&self, f: &mut Findings) {
        let now = names_in(&self.dir);
        f.expect(now == self.names, || {
            format!(
                "{} changed: {:?} -> {now:?}",
                self.dir.display(),
                self.names
            )
        });
    }
}

/// Every regular file under `dir` (no link followed), with its bytes.
fn files_under(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            if let Ok(bytes) = std::fs::read(e.path()) {
                out.push((e.path(), bytes));
            }
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A secret must appear nowhere the sandbox can hand data to the host: its output and every
/// file under its writable workdir.
pub fn secret_kept(f: &mut Findings, secret: &str, s: &Scratch, out: &Output) {
    let mut files = Vec::new();
    files_under(&s.work, &mut files);
    for (path, bytes) in files {
        f.expect(!contains(&bytes, secret.as_bytes()), || {
            format!("the secret reached {}", path.display())
        });
    }
    f.expect(
        !contains(&out.stdout, secret.as_bytes()) && !contains(&out.stderr, secret.as_bytes()),
        || "the secret reached the sandbox's output".to_owned(),
    );
}

/// What a host listener received: connections (or datagrams) and bytes.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<(usize, Vec<u8>)>>);

impl Received {
    fn record(&self, bytes: &[u8]) {
        let mut g = self.0.lock().expect("lock");
        g.0 += 1;
        g.1.extend_from_slice(bytes);
    }

    pub fn get(&self) -> (usize, Vec<u8>) {
        self.0.lock().expect("lock").clone()
    }

    /// Nothing arrived (after a moment for anything in flight).
    pub fn check_nothing(&self, f: &mut Findings, what: &str) {
        std::thread::sleep(Duration::from_millis(200));
        let (n, bytes) = self.get();
        f.expect(n == 0, || {
            format!(
                "{what} got {n} connection(s): {:?}",
                String::from_utf8_lossy(&bytes)
            )
        });
    }
}

fn drain(mut stream: impl Read, got: &Received) {
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    got.record(&bytes);
}

/// A stream that can be given a read timeout (TCP and UNIX streams).
trait Timed: Read + Send + 'static {
    fn timeout(&self, t: Duration);
}

impl Timed for std::net::TcpStream {
    fn timeout(&self, t: Duration) {
        let _ = self.set_read_timeout(Some(t));
    }
}

impl Timed for std::os::unix::net::UnixStream {
    fn timeout(&self, t: Duration) {
        let _ = self.set_read_timeout(Some(t));
    }
}

/// Accept every connection of `incoming` in the background, recording what each sends.
fn record_all<S: Timed>(incoming: impl Iterator<Item = S> + Send + 'static) -> Received {
    let got = Received::default();
    let record = got.clone();
    std::thread::spawn(move || {
        for stream in incoming {
            stream.timeout(Duration::from_secs(2));
            let r = record.clone();
            std::thread::spawn(move || drain(stream, &r));
        }
    });
    got
}

/// A host TCP listener recording every connection.
pub fn tcp_listener(addr: SocketAddr) -> (SocketAddr, Received) {
    let listener = TcpListener::bind(addr).expect("bind a host listener");
    let local = listener.local_addr().expect("local address");
    let got = record_all(std::iter::from_fn(move || {
        listener.accept().ok().map(|(s, _)| s)
    }));
    (local, got)
}

/// A host UDP socket recording every datagram.
pub fn udp_listener(addr: SocketAddr) -> (SocketAddr, Received) {
    let socket = UdpSocket::bind(addr).expect("bind a host UDP socket");
    let local = socket.local_addr().expect("local address");
    let got = Received::default();
    let record = got.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok(n) = socket.recv(&mut buf) {
            record.record(&buf[..n]);
        }
    });
    (local, got)
}

/// A host UNIX stream socket (root's, mode 0666, as a daemon's) recording every connection;
/// removed when dropped.
pub struct HostUnix {
    pub path: PathBuf,
    pub got: Received,
}

impl HostUnix {
    pub fn listen(path: &Path) -> HostUnix {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("bind a host socket");
        common::chmod(path, 0o666);
        let got = record_all(unix_incoming(listener));
        HostUnix {
            path: path.to_owned(),
            got,
        }
    }
}

impl Drop for HostUnix {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A host UNIX socket in the abstract namespace (of the host's network namespace).
pub fn abstract_listener(name: &str) -> Received {
    use std::os::linux::net::SocketAddrExt;
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
    let listener = UnixListener::bind_addr(&addr).expect("bind an abstract socket");
    record_all(unix_incoming(listener))
}

/// A UNIX listener's connections, for as long as it accepts.
fn unix_incoming(
    listener: UnixListener,
) -> impl Iterator<Item = std::os::unix::net::UnixStream> + Send + 'static {
    std::iter::from_fn(move || listener.accept().ok().map(|(s, _)| s))
}

/// A host process outside every sandbox holding a secret in its memory; killed when dropped.
pub struct Victim {
    pub child: std::process::Child,
    pub secret: String,
}

impl Victim {
    pub fn start() -> Victim {
        let secret = token("victim");
        let child = std::process::Command::new("/usr/bin/python3")
            .args([
                "-c",
                "import sys, time\nsecret = sys.argv[1].encode() * 64\nwhile True: time.sleep(1)",
                &secret,
            ])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start the victim");
        Victim { child, secret }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Who traces it now (0: nobody).
    pub fn tracer(&self) -> Option<u32> {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Still running, untraced, as started.
    pub fn check(&mut self, f: &mut Findings) {
        f.expect(matches!(self.child.try_wait(), Ok(None)), || {
            "the host victim process ended".to_owned()
        });
        f.expect(self.tracer() == Some(0), || {
            format!("the host victim is traced by {:?}", self.tracer())
        });
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Longest a probe's sandbox may run: a sandbox that a probe keeps from ending is a finding
/// (and the suite never hangs on one).
pub const PROBE_LIMIT: Duration = Duration::from_secs(180);

/// Run `cmd` (a supervisor) to its end, or kill it after [`PROBE_LIMIT`]; the output, and
/// whether it had to be killed.
pub fn run_bounded(mut cmd: std::process::Command) -> (Output, bool) {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the supervisor");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PROBE_LIMIT) {
        Ok(out) => (out.expect("wait for the supervisor"), false),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM);
            let out = rx
                .recv_timeout(Duration::from_secs(15))
                .unwrap_or_else(|_| {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
                    rx.recv().expect("the supervisor's output")
                });
            (out.expect("wait for the supervisor"), true)
        }
    }
}

/// Run `script` with the sandbox's python3 (args after it), from the workdir, bounded.
pub fn python(s: &Scratch, backend: &str, script: &str, args: &[&str]) -> Output {
    let mut cmd = vec!["/usr/bin/python3", "-c", script];
    cmd.extend_from_slice(args);
    bounded(s.command(backend, &[], &cmd))
}

/// [`run_bounded`], with a sandbox that had to be killed recorded in its output (which
/// [`ran`] then reports).
pub fn bounded(cmd: std::process::Command) -> Output {
    let (mut out, killed) = run_bounded(cmd);
    if killed {
        out.stderr
            .extend_from_slice(format!("\n{TIMED_OUT} {PROBE_LIMIT:?}\n").as_bytes());
    }
    out
}

const TIMED_OUT: &str = "openshell-escape: the sandbox did not end within";

/// The supervisor ran the workload (no start failure) and ended within the bound: a probe
/// that never ran proves nothing, and one that never ends is a finding.
pub fn ran(f: &mut Findings, out: &Output, marker: &Path) {
    let err = common::stderr(out);
    if let Some(at) = err.find(TIMED_OUT) {
        let tail: String = err[..at]
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        f.add(format!("{}: {tail}", &err[at..].trim()));
    }
    f.expect(marker.exists(), || {
        format!(
            "the probe did not run (exit {}): {}",
            common::code(out),
            common::stderr(out)
        )
    });
}

/// A host sysctl's value (trimmed).
pub fn sysctl(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Run `script` (python, from the workdir) in a sandbox that calls `hold()` once it has made
/// its attempts; while it holds, `inspect` looks at the sandbox's host processes (given the
/// supervisor's pid); then the sandbox is let go and its output returned.
pub fn python_holding(
    s: &Scratch,
    backend: &str,
    script: &str,
    args: &[&str],
    inspect: impl FnOnce(u32, &mut Findings),
    f: &mut Findings,
) -> Output {
    let mut cmd = vec!["/usr/bin/python3", "-c", script];
    cmd.extend_from_slice(args);
    let mut command = s.command(backend, &[], &cmd);
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the supervisor");
    let supervisor = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let holding = s.work.join("holding");
    if common::wait_until(PROBE_LIMIT, || holding.exists()) {
        inspect(supervisor, f);
    } else {
        f.add("the probe never reached its hold");
    }
    std::fs::write(s.work.join("done"), "").expect("let the probe go");
    let out = rx.recv_timeout(PROBE_LIMIT).unwrap_or_else(|_| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(supervisor as i32),
            nix::sys::signal::SIGKILL,
        );
        rx.recv().expect("the supervisor's output")
    });
    out.expect("wait for the supervisor")
}

/// Every host process descended from `root` (not `root` itself).
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // The fields after the command name's closing parenthesis: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// A field of /proc/<pid>/status.
pub fn status_field(pid: u32, name: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')
                .map(|v| v.trim().to_owned())
        })
}

//! Shared by the proxy benchmarks (`benches/*.rs`, `harness = false`): a
//! generated 100-policy network section, raw CONNECT clients, an echo
//! upstream, percentile summaries, runtimes and peer programs run as
//! children. Each benchmark prints one JSON object on stdout (read by
//! `cargo xtask bench`); progress goes to stderr.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Network policies like a busy sandbox's: `n` entries of one to three
/// endpoints (exact hosts, `*.` and `**.` globs, several ports, some with
/// L7 `access`) and two to three binaries (exact paths and globs). Entry
/// `i` allows `/usr/bin/tool{i}` (and `/opt/app{i}/bin/*`) to reach
/// `api{i}.example.com:443` and `*.cdn{i}.example.net:80/443`. Indented to
/// sit under `network_policies:`.
pub fn generated_policies(n: usize) -> String {
    let mut y = String::new();
    for i in 0..n {
        let _ = writeln!(y, "  p{i:03}:");
        let _ = writeln!(y, "    name: generated-{i}");
        let _ = writeln!(y, "    endpoints:");
        let _ = writeln!(y, "      - host: api{i}.example.com");
        let _ = writeln!(y, "        port: 443");
        let _ = writeln!(y, "      - host: \"*.cdn{i}.example.net\"");
        let _ = writeln!(y, "        ports: [80, 443]");
        match i % 4 {
            1 => {
                let _ = writeln!(y, "      - host: \"**.mirror{i}.example.org\"");
                let _ = writeln!(y, "        port: 8443");
            }
            2 => {
                let _ = writeln!(y, "      - host: registry{i}.example.io");
                let _ = writeln!(y, "        port: 80");
                let _ = writeln!(y, "        protocol: rest");
                let _ = writeln!(y, "        access: read-only");
            }
            3 => {
                let _ = writeln!(y, "      - host: \"pkg-*.example{i}.dev\"");
                let _ = writeln!(y, "        ports: [443, 8080]");
            }
            _ => {}
        }
        let _ = writeln!(y, "    binaries:");
        let _ = writeln!(y, "      - path: /usr/bin/tool{i}");
        let _ = writeln!(y, "      - path: \"/opt/app{i}/bin/*\"");
        if i % 3 == 0 {
            let _ = writeln!(y, "      - path: \"/usr/lib/app{i}/**\"");
        }
    }
    y
}

/// One policy letting `binary` reach `host:port`, loopback allowed.
pub fn allow_entry(key: &str, host: &str, port: u16, binary: &str) -> String {
    allow_entry_with(key, host, port, binary, &[])
}

/// [`allow_entry`] with more fields on its endpoint, one `key: value` each
/// (e.g. `tls: terminate`, `access: read-only`).
pub fn allow_entry_with(
    key: &str,
    host: &str,
    port: u16,
    binary: &str,
    endpoint_fields: &[&str],
) -> String {
    let mut fields = String::new();
    for f in endpoint_fields {
        let _ = writeln!(fields, "        {f}");
    }
    format!(
        "  {key}:\n    endpoints:\n      - host: \"{host}\"\n        port: {port}\n        allowed_ips: [\"127.0.0.0/8\"]\n{fields}    binaries:\n      - path: {binary}\n"
    )
}

/// A whole policy document with only a network section.
pub fn document(network_policies: &str) -> String {
    format!("version: 1\nnetwork_policies:\n{network_policies}")
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// p50, p90, p95, p99, mean, min and max of durations, in microseconds.
pub fn summary_us(samples: &[Duration]) -> serde_json::Value {
    let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let mean = us.iter().sum::<f64>() / us.len().max(1) as f64;
    serde_json::json!({
        "samples": us.len(),
        "p50_us": round3(percentile(&us, 50.0)),
        "p90_us": round3(percentile(&us, 90.0)),
        "p95_us": round3(percentile(&us, 95.0)),
        "p99_us": round3(percentile(&us, 99.0)),
        "mean_us": round3(mean),
        "min_us": round3(us.first().copied().unwrap_or(f64::NAN)),
        "max_us": round3(us.last().copied().unwrap_or(f64::NAN)),
    })
}

/// An upstream on `ip`:0 that echoes every byte back, served by the current
/// runtime.
pub async fn echo_server(ip: &str) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind((ip, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(addr)
}

/// Send `CONNECT target` to `proxy` and read the response head; returns the
/// status and the open stream. Nothing follows the head until we send.
pub async fn connect_via(
    proxy: SocketAddr,
    target: SocketAddr,
) -> Result<(u16, TcpStream), BoxError> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 256];
    loop {
        let n = s.read(&mut byte).await?;
        if n == 0 {
            return Err("proxy closed the connection before the response head".into());
        }
        head.extend_from_slice(&byte[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if head.len() > 16 * 1024 {
            return Err("response head too large".into());
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad response head {text:?}"))?;
    Ok((status, s))
}

/// Write `payload` and read the same number of bytes back.
pub async fn echo_round_trip(s: &mut TcpStream, payload: &[u8]) -> Result<(), BoxError> {
    s.write_all(payload).await?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).await?;
    if back != payload {
        return Err("echo returned different bytes".into());
    }
    Ok(())
}

/// A multi-threaded runtime of `workers` threads named `name`.
pub fn runtime(workers: usize, name: &str) -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()?)
}

/// A TCP port free on 127.0.0.1 a moment ago (for a peer program's listener).
pub fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A peer program (the proxy we compare with) run as a child with a
/// working directory of its own; killed and reaped when dropped, also when
/// the benchmark fails, and its directory removed after.
pub struct Peer {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its stdout and stderr.
    log: PathBuf,
    /// Its configuration and state (removed when dropped, after the kill).
    pub dir: tempfile::TempDir,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Peer {
    /// Start `cmd` (`name` in messages) with its output in a log in `dir`
    /// and wait, at most `within`, until `addr` accepts connections and
    /// `ready` (given `dir`) holds.
    pub fn start(
        name: &str,
        mut cmd: Command,
        dir: tempfile::TempDir,
        addr: SocketAddr,
        within: Duration,
        ready: impl Fn(&std::path::Path) -> bool,
    ) -> Result<Peer, BoxError> {
        let log = dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let mut peer = Peer {
            child,
            addr,
            log,
            dir,
        };
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = peer.child.try_wait()? {
                return Err(format!("{name} exited ({status}) at start:\n{}", peer.log()).into());
            }
            if ready(peer.dir.path()) && std::net::TcpStream::connect(peer.addr).is_ok() {
                return Ok(peer);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{name} not ready on {} after {within:?}:\n{}",
                    peer.addr,
                    peer.log()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A program's version line: the first line `cmd` prints, or empty.
pub fn version_line(mut cmd: Command) -> String {
    cmd.stdin(Stdio::null())
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

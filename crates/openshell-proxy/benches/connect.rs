//! CONNECT rate and added latency: our proxy next to Debian's tinyproxy,
//! with the same client, the same echo upstream (on 127.0.0.2) and the same
//! work per connection: `CONNECT` -> `200` -> one echo round trip -> close.
//!
//! - latency: [`SEQUENTIAL`] connections one after another, rotating between
//!   direct (client -> upstream), ours and tinyproxy so drift hits all
//!   three alike; added latency is a proxy's percentile minus the direct
//!   percentile.
//! - rate: [`CLIENTS`] concurrent clients looping for [`RATE_SECS`] per
//!   round, rounds alternating between the proxies.
//!
//! Our proxy runs in-process on its own 2-worker runtime (as the
//! supervisor's), with a fixed caller and a policy allowing 127.0.0.2;
//! tinyproxy (`/usr/bin/tinyproxy`, or `$TINYPROXY`) runs as a child with
//! a generated configuration and is killed at the end, also on error.
//! Loopback only. Prints one JSON object on stdout.
//! Run: `cargo bench -p openshell-proxy --bench connect`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    allow_entry, connect_via, document, echo_round_trip, free_port, is_root, runtime, summary_us,
    version_line, BoxError, Peer,
};
use openshell_policy::Policy;
use openshell_proxy::{Caller, FixedIdentity, PolicyHandle, Proxy, ProxyConfig, SandboxContext};
use tokio::net::TcpStream;

const SEQUENTIAL: usize = 3_000;
const SEQUENTIAL_WARMUP: usize = 200;
const CLIENTS: usize = 32;
const RATE_SECS: f64 = 2.0;
const RATE_ROUNDS: usize = 3;
const PAYLOAD: &[u8] = b"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const CALLER: &str = "/usr/bin/curl";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    Direct,
    Proxy(SocketAddr),
}

/// One unit of work: (CONNECT ->) one echo round trip -> close.
async fn one(via: Via, upstream: SocketAddr) -> Result<(), BoxError> {
    match via {
        Via::Direct => {
            let mut s = TcpStream::connect(upstream).await?;
            s.set_nodelay(true)?;
            echo_round_trip(&mut s, PAYLOAD).await
        }
        Via::Proxy(proxy) => {
            let (status, mut s) = connect_via(proxy, upstream).await?;
            if status != 200 {
                return Err(format!("CONNECT via {proxy} answered {status}").into());
            }
            echo_round_trip(&mut s, PAYLOAD).await
        }
    }
}

fn start_tinyproxy(upstream_port: u16) -> Result<Peer, BoxError> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mut conf = String::new();
    if is_root() {
        // tinyproxy drops to this identity after binding.
        conf.push_str("User nobody\nGroup nogroup\n");
    }
    conf.push_str(&format!(
        "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 1024\nLogLevel Critical\n\
         Allow 127.0.0.1\nConnectPort {upstream_port}\nDisableViaHeader Yes\n"
    ));
    let conf_path = dir.path().join("tinyproxy.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = Command::new(tinyproxy_bin());
    cmd.arg("-d").arg("-c").arg(&conf_path);
    Peer::start(
        "tinyproxy",
        cmd,
        dir,
        SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(5),
        |_| true,
    )
}

fn tinyproxy_bin() -> std::ffi::OsString {
    std::env::var_os("TINYPROXY").unwrap_or_else(|| "/usr/bin/tinyproxy".into())
}

/// Completed units per second with `CLIENTS` concurrent loops for
/// `RATE_SECS`, plus the number of failed units.
async fn rate(via: Via, upstream: SocketAddr) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for _ in 0..CLIENTS {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_secs(5), one(via, upstream)).await {
                    Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(RATE_SECS)).await;
    stop.store(true, Ordering::Relaxed);
    let counted = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    (counted as f64 / elapsed, failed.load(Ordering::Relaxed))
}

fn main() -> Result<(), BoxError> {
    // The upstream and our proxy each get their own runtime, the client
    // another, so the client is the same whichever proxy it measures.
    let upstream_rt = runtime(1, "echo-upstream")?;
    let upstream = upstream_rt.block_on(common::echo_server("127.0.0.2"))?;

    let proxy_rt = runtime(2, "openshell-proxy")?;
    let text = document(&allow_entry("bench", "127.0.0.2", upstream.port(), CALLER));
    let handle = PolicyHandle::new(Policy::from_yaml("bench-connect.yaml", &text)?)?;
    let config = ProxyConfig {
        max_connections: 1024,
        ..ProxyConfig::default()
    };
    let proxy = Proxy::new(config, handle)?;
    let ours = proxy_rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = proxy.serve_tcp(
            listener,
            SandboxContext::new(
                "bench",
                Arc::new(FixedIdentity(Caller {
                    pid: 4242,
                    exe: PathBuf::from(CALLER),
                    ancestors: vec![PathBuf::from("/usr/bin/bash")],
                })),
            ),
        );
        Ok::<_, BoxError>((addr, task))
    })?;
    let (ours_addr, _ours_task) = ours;

    let tiny = start_tinyproxy(upstream.port())?;
    let version = version_line({
        let mut cmd = Command::new(tinyproxy_bin());
        cmd.arg("-v");
        cmd
    });

    let client = runtime(2, "bench-client")?;
    let result = client.block_on(async {
        let targets = [
            ("direct", Via::Direct),
            ("ours", Via::Proxy(ours_addr)),
            ("tinyproxy", Via::Proxy(tiny.addr)),
        ];
        // Each works before anything is measured.
        for (name, via) in targets {
            one(via, upstream)
                .await
                .map_err(|e| format!("{name}: {e}"))?;
        }

        eprintln!("connect: latency, {SEQUENTIAL} sequential connections each");
        let mut lat: [Vec<Duration>; 3] = Default::default();
        for n in 0..SEQUENTIAL_WARMUP + SEQUENTIAL {
            for k in 0..3 {
                let idx = (n + k) % 3;
                let (name, via) = targets[idx];
                let t = Instant::now();
                one(via, upstream)
                    .await
                    .map_err(|e| format!("{name}: {e}"))?;
                if n >= SEQUENTIAL_WARMUP {
                    lat[idx].push(t.elapsed());
                }
            }
        }

        eprintln!("connect: rate, {CLIENTS} clients, {RATE_ROUNDS} x {RATE_SECS} s each");
        let _ = rate(Via::Proxy(ours_addr), upstream).await; // warm up
        let mut rates = [Vec::new(), Vec::new(), Vec::new()];
        let mut failures = [0u64; 3];
        for _ in 0..RATE_ROUNDS {
            for idx in [1, 2, 0] {
                let (r, f) = rate(targets[idx].1, upstream).await;
                rates[idx].push(r);
                failures[idx] += f;
            }
        }
        Ok::<_, BoxError>((lat, rates, failures))
    });
    drop(tiny);
    let (lat, rates, failures) = result?;

    let summaries: Vec<serde_json::Value> = lat.iter().map(|l| summary_us(l)).collect();
    let p = |i: usize, k: &str| summaries[i][k].as_f64().unwrap_or(f64::NAN);
    let added = |i: usize| {
        serde_json::json!({
            "p50_us": ((p(i, "p50_us") - p(0, "p50_us")) * 1000.0).round() / 1000.0,
            "p99_us": ((p(i, "p99_us") - p(0, "p99_us")) * 1000.0).round() / 1000.0,
        })
    };
    let rate_json = |i: usize| {
        let mean = rates[i].iter().sum::<f64>() / rates[i].len() as f64;
        serde_json::json!({
            "per_s": mean.round(),
            "rounds": rates[i].iter().map(|r| r.round()).collect::<Vec<_>>(),
            "failed": failures[i],
        })
    };
    let report = serde_json::json!({
        "upstream": upstream.to_string(),
        "payload_bytes": PAYLOAD.len(),
        "sequential": SEQUENTIAL,
        "clients": CLIENTS,
        "rate_secs": RATE_SECS,
        "rate_rounds": RATE_ROUNDS,
        "tinyproxy_version": version,
        "direct": { "latency": summaries[0], "rate": rate_json(0) },
        "ours": { "latency": summaries[1], "added": added(1), "rate": rate_json(1) },
        "tinyproxy": { "latency": summaries[2], "added": added(2), "rate": rate_json(2) },
    });
    println!("{report}");
    drop(client);
    drop(proxy_rt);
    drop(upstream_rt);
    Ok(())
}

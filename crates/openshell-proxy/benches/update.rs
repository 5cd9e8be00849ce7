//! Live policy update latency with the 100-policy network section plus one
//! policy for the benchmark's caller, toggled between allowing and not.
//!
//! - `file_to_connect`: from renaming a new policy file over the watched one
//!   ([`openshell_proxy::watch::watch_file`]) to the first CONNECT through a
//!   running proxy that gets the new answer (CONNECTs are sent back to back
//!   until one does). Includes inotify, the watcher's settle delay, reading,
//!   parsing, compiling and swapping.
//! - `update`: [`PolicyHandle::update`] alone (static check, compile, swap).
//! - `update_yaml`: [`PolicyHandle::update_yaml`] (parse too).
//!
//! Prints one JSON object on stdout.
//! Run: `cargo bench -p openshell-proxy --bench update`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{allow_entry, connect_via, document, generated_policies, summary_us, BoxError};
use openshell_policy::Policy;
use openshell_proxy::{Caller, FixedIdentity, PolicyHandle, Proxy, ProxyConfig, SandboxContext};

const POLICIES: usize = 100;
const FILE_UPDATES: usize = 50;
const HANDLE_UPDATES: usize = 50;
const CALLER: &str = "/usr/bin/curl";
/// Give up on one file update after this long.
const UPDATE_LIMIT: Duration = Duration::from_secs(10);
/// Quiet time before each file update.
const PAUSE: Duration = Duration::from_millis(200);

/// The document with the benchmark's policy allowing `binary`.
fn doc(base: &str, port: u16, binary: &str) -> String {
    document(&format!(
        "{base}{}",
        allow_entry("bench", "127.0.0.2", port, binary)
    ))
}

fn main() -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> Result<(), BoxError> {
    let upstream = common::echo_server("127.0.0.2").await?;
    let base = generated_policies(POLICIES);
    // Allowing: the caller's binary; denying: another binary.
    let texts = [
        doc(&base, upstream.port(), CALLER),
        doc(&base, upstream.port(), "/usr/bin/wget"),
    ];
    let expect = [200u16, 403u16];
    let policies = [
        Policy::from_yaml("allow.yaml", &texts[0])?,
        Policy::from_yaml("deny.yaml", &texts[1])?,
    ];

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("policy.yaml");
    let tmp = dir.path().join(".policy.yaml.new");
    std::fs::write(&path, &texts[0])?;
    let handle = PolicyHandle::new(policies[0].clone())?;
    let proxy = Proxy::new(ProxyConfig::default(), handle.clone())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let _serve = openshell_proxy::ServeGuard(proxy.serve_tcp(
        listener,
        SandboxContext::new(
            "bench",
            Arc::new(FixedIdentity(Caller {
                pid: 4242,
                exe: PathBuf::from(CALLER),
                ancestors: vec![PathBuf::from("/usr/bin/bash")],
            })),
        ),
    ));
    let watch = openshell_proxy::watch::watch_file(&path, handle.clone())?;
    let _watch = openshell_proxy::ServeGuard(watch);

    let status = || async { connect_via(addr, upstream).await.map(|(s, _)| s) };
    if status().await? != expect[0] {
        return Err("the initial policy does not allow the benchmark's CONNECT".into());
    }

    eprintln!("update: {FILE_UPDATES} file updates through watch_file");
    let mut file_to_connect = Vec::new();
    let mut attempts = Vec::new();
    for n in 1..=FILE_UPDATES {
        // Let the watcher go idle (late events of the previous rename end
        // their settle delay), so each update starts from rest.
        tokio::time::sleep(PAUSE).await;
        let which = n % 2;
        std::fs::write(&tmp, &texts[which])?;
        let generation = handle.generation();
        let t = Instant::now();
        std::fs::rename(&tmp, &path)?;
        let mut tries = 0u64;
        loop {
            tries += 1;
            if status().await? == expect[which] {
                break;
            }
            if t.elapsed() > UPDATE_LIMIT {
                return Err(format!(
                    "update {n}: CONNECT still answered the old way after {UPDATE_LIMIT:?}"
                )
                .into());
            }
        }
        file_to_connect.push(t.elapsed());
        attempts.push(tries);
        if handle.generation() != generation + 1 {
            return Err(format!("update {n}: expected exactly one new generation").into());
        }
    }

    eprintln!("update: {HANDLE_UPDATES} PolicyHandle::update and update_yaml calls");
    let mut update = Vec::new();
    for n in 0..HANDLE_UPDATES {
        let t = Instant::now();
        handle.update(&policies[n % 2])?;
        update.push(t.elapsed());
    }
    let mut update_yaml = Vec::new();
    for n in 0..HANDLE_UPDATES {
        let t = Instant::now();
        handle.update_yaml("bench.yaml", &texts[n % 2])?;
        update_yaml.push(t.elapsed());
    }

    let mean_tries = attempts.iter().sum::<u64>() as f64 / attempts.len() as f64;
    let report = serde_json::json!({
        "policies": POLICIES + 1,
        "policy_bytes": texts[0].len(),
        "file_to_connect": summary_us(&file_to_connect),
        "connects_per_update_mean": (mean_tries * 10.0).round() / 10.0,
        "update": summary_us(&update),
        "update_yaml": summary_us(&update_yaml),
    });
    println!("{report}");
    Ok(())
}

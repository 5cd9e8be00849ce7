//! Exec round trip through the runtime API: in a running sandbox (the workload `sleep`), one
//! `SandboxedProcess::exec` of `/bin/true` with null stdio and its `wait`, over and over, on
//! each backend; next to the host's own fork + exec + wait of `/bin/true` (no sandbox), the
//! floor any sandbox starts from, measured in the same run, rounds alternating.
//!
//! The runtime starts its helpers from `OPENSHELL_HELPER_EXE` (the release CLI: `cargo xtask
//! bench exec` builds it and sets the variable). The vm backend runs when the guest is built
//! (`cargo xtask guest`); without it the report says why it was not measured. Policy:
//! `policies/default.yaml`, workdir `/var/tmp`. Prints one JSON object on stdout.
//! Run: `cargo xtask bench exec`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use openshell_policy::Policy;
use openshell_runtime::{ExecConfig, RuntimeKind, SpawnConfig, StdioMode};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Timed execs per backend (after the warmup), in rounds alternating with the host's.
const ROUNDS: usize = 10;
const PER_ROUND: usize = 20;
const WARMUP: usize = 5;

fn summary_us(samples: &[Duration]) -> serde_json::Value {
    let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    us.sort_by(f64::total_cmp);
    let at = |p: f64| {
        if us.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * us.len() as f64).ceil() as usize;
        (us[rank.clamp(1, us.len()) - 1] * 1000.0).round() / 1000.0
    };
    serde_json::json!({
        "samples": us.len(),
        "p50_us": at(50.0),
        "p95_us": at(95.0),
        "p99_us": at(99.0),
        "min_us": at(0.0),
        "max_us": at(100.0),
    })
}

async fn host_exec() -> Result<Duration, BoxError> {
    let start = Instant::now();
    let status = tokio::process::Command::new("/bin/true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await?;
    let took = start.elapsed();
    if !status.success() {
        return Err(format!("host /bin/true: {status}").into());
    }
    Ok(took)
}

async fn sandbox_exec(sandbox: &openshell_runtime::SandboxedProcess) -> Result<Duration, BoxError> {
    let start = Instant::now();
    let mut child = sandbox
        .exec(ExecConfig {
            program: "/bin/true".into(),
            args: Vec::new(),
            env: Default::default(),
            workdir: "/var/tmp".into(),
            stdio: StdioMode::Null,
        })
        .await?;
    let status = child.wait().await?;
    let took = start.elapsed();
    if !status.success() {
        return Err(format!("exec /bin/true in the sandbox: {status:?}").into());
    }
    Ok(took)
}

/// One backend: its exec times and the host's, alternating rounds.
async fn measure(
    kind: RuntimeKind,
    policy: Arc<Policy>,
) -> Result<(Vec<Duration>, Vec<Duration>), BoxError> {
    let mut config = SpawnConfig::new("/bin/sleep", policy, "/var/tmp".into());
    config.args = vec!["600".into()];
    config.stdio = StdioMode::Null;
    let mut sandbox = openshell_runtime::spawn(kind, config).await?;
    let result = async {
        for _ in 0..WARMUP {
            sandbox_exec(&sandbox).await?;
            host_exec().await?;
        }
        let (mut ours, mut host) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            for _ in 0..PER_ROUND {
                ours.push(sandbox_exec(&sandbox).await?);
            }
            for _ in 0..PER_ROUND {
                host.push(host_exec().await?);
            }
        }
        Ok::<_, BoxError>((ours, host))
    }
    .await;
    let _ = sandbox.kill();
    let _ = sandbox.wait().await;
    result
}

/// Why the vm backend cannot run here, if it cannot: its guest is not built.
fn vm_missing() -> Option<String> {
    let home = std::env::var_os("OPENSHELL_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".local/share/openshell")
        });
    let guest = std::env::var_os("OPENSHELL_GUEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| home.join("guest"));
    (!guest.join("kernel").exists())
        .then(|| format!("no guest at {}: run `cargo xtask guest`", guest.display()))
}

fn main() -> Result<(), BoxError> {
    if std::env::var_os("OPENSHELL_HELPER_EXE").is_none() {
        return Err("set OPENSHELL_HELPER_EXE to the release openshell-sandbox (cargo xtask bench exec does)".into());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join("policies/default.yaml");
    let text = std::fs::read_to_string(&path)?;
    let policy = Arc::new(Policy::from_yaml(&path.display().to_string(), &text)?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut report = serde_json::json!({
        "workload": "/bin/sleep 600; each exec /bin/true, null stdio, then wait",
        "execs": ROUNDS * PER_ROUND,
        "policy": "policies/default.yaml",
    });
    for (name, kind) in [("process", RuntimeKind::Process), ("vm", RuntimeKind::Vm)] {
        if kind == RuntimeKind::Vm {
            if let Some(reason) = vm_missing().or_else(|| {
                (!kind.is_available()).then(|| "built without the vm feature".to_owned())
            }) {
                eprintln!("exec: vm not measured: {reason}");
                report[name] = serde_json::json!({ "measured": false, "reason": reason });
                continue;
            }
        }
        eprintln!("exec: {name}");
        let (ours, host) = rt.block_on(measure(kind, policy.clone()))?;
        report[name] = serde_json::json!({
            "measured": true,
            "ours": summary_us(&ours),
            "host": summary_us(&host),
        });
    }
    println!("{report}");
    Ok(())
}

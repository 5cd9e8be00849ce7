//! `openshell-sandbox`: run a command in a sandbox under a policy.

mod approval;
mod cli;
mod egress;
mod image;
mod logging;
mod protect;
mod ssh;
mod stdio;
mod sys;
mod terminate;
mod watch;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use openshell_policy::Policy;
use openshell_runtime::{ExitStatus, RuntimeError, RuntimeKind, SpawnConfig};
use tokio::signal::unix::{signal, SignalKind};

use cli::{Cli, Command, RunArgs};

/// The restrictive default policy, used when no `--policy` is given.
const DEFAULT_POLICY: &str = include_str!("../../../policies/default.yaml");

/// Exit status when the sandbox itself fails (the convention of `docker run` and `env`).
const EXIT_SANDBOX_FAILED: u8 = 125;
/// Exit status when `--timeout` expires (the convention of `timeout(1)`).
const EXIT_TIMEOUT: u8 = 124;

fn main() -> ExitCode {
    // Must come first: the process backend re-executes this binary as its in-sandbox helper.
    openshell_runtime::helper::run_if_helper();
    watch::run_if_watcher();

    let cli = Cli::parse();
    let run = match cli.command {
        Some(Command::Seccomp) => return print_seccomp_table(),
        Some(Command::Image(cmd)) => return run_image(cmd),
        None => cli.run,
    };
    // Logging is set up inside, once the files the supervisor owns have been checked.
    match run_main(run) {
        Ok(code) => code,
        Err(e) => {
            report_error(&e);
            let code = e
                .downcast_ref::<RuntimeError>()
                .and_then(setup_exit_code)
                .unwrap_or(EXIT_SANDBOX_FAILED);
            ExitCode::from(code)
        }
    }
}

/// `image ...`: logs at the default level on stderr; errors exit 1.
fn run_image(cmd: cli::ImageCommand) -> ExitCode {
    let _guard = match logging::init(None, cli::LogFormat::Text, None) {
        Ok(g) => g,
        Err(e) => {
            report_error(&e);
            return ExitCode::from(1);
        }
    };
    match image::run(cmd) {
        Ok(code) => code,
        Err(e) => {
            report_error(&e);
            ExitCode::from(1)
        }
    }
}

/// The shell-convention exit status of a workload that could not start (126, 127), if any.
fn setup_exit_code(e: &RuntimeError) -> Option<u8> {
    use openshell_runtime::ProcessError;
    let process = match e {
        RuntimeError::Process(p) => p,
        #[cfg(feature = "vm")]
        RuntimeError::Vm(openshell_runtime::vm::VmError::Process(p)) => p,
        _ => return None,
    };
    match process {
        ProcessError::Setup { exit_code, .. } => u8::try_from(*exit_code).ok(),
        _ => None,
    }
}

/// Print the error chain once, on stderr.
fn report_error(e: &anyhow::Error) {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("openshell-sandbox: error: {e:#}");
    }
}

#[allow(clippy::print_stdout)]
fn print_seccomp_table() -> ExitCode {
    use openshell_runtime::process::seccomp::{peers, Match, DENIED, NOTIFIED, PREFIX};
    println!("First, right after the architecture check (user notification, both backends):");
    for (nr, reason) in NOTIFIED {
        let name = match nr {
            libc::SYS_connect => "connect",
            libc::SYS_execve => "execve",
            _ => "execveat",
        };
        println!("  {name:<20} {reason}");
    }
    println!();
    println!("Before the table (x86_64, hand-written prefix):");
    for row in PREFIX {
        println!("  {:<38} {:<26} {}", row.what, row.action, row.reason);
    }
    println!();
    println!("Denied calls (EPERM; every other call is allowed):");
    for row in DENIED {
        // The width of each compared argument, from its kernel declaration.
        let widths: Vec<String> = row
            .matches
            .args()
            .iter()
            .map(|a| match a.width() {
                Some(w) => format!("{}: {w}", a.decl),
                None => format!("{}: no width", a.decl),
            })
            .collect();
        let what = match row.matches {
            Match::Always => "always".to_owned(),
            m => format!("{m} [{}]", widths.join(", ")),
        };
        println!(
            "  {:<20} {:<8} {}",
            row.name.trim_start_matches("SYS_"),
            what,
            row.reason
        );
    }
    println!();
    println!("Compared with Docker's default profile and OpenShell (every difference):");
    for d in peers::DIFFERENCES {
        println!("  {}", d.calls.join(", "));
        println!("    Docker:    {}", d.docker);
        println!("    OpenShell: {}", d.openshell);
        println!("    ours:      {}", d.ours);
        println!("    why:       {}", d.why);
    }
    ExitCode::SUCCESS
}

fn load_policy(path: Option<&Path>) -> anyhow::Result<Policy> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading policy {}", path.display()))?;
            Ok(Policy::from_yaml(&path.display().to_string(), &text)?)
        }
        None => Ok(Policy::from_yaml(
            "<built-in default policy>",
            DEFAULT_POLICY,
        )?),
    }
}

/// The limits a sandbox gets: the CLI's overrides, else the policy's `resources`, else the
/// defaults, and which of the three each came from.
struct EffectiveLimits {
    effective: openshell_policy::EffectiveResources,
    from_cli: Vec<&'static str>,
    defaulted: Vec<&'static str>,
}

impl EffectiveLimits {
    fn of(policy: &Policy, run: &RunArgs) -> EffectiveLimits {
        let file = policy.resources;
        let said = openshell_policy::Resources {
            memory_mib: run.memory_mib.or(file.memory_mib),
            cpus: run.cpus.or(file.cpus),
            pids: run.pids.or(file.pids),
        };
        let from_cli = [
            ("memory_mib", run.memory_mib.is_some()),
            ("cpus", run.cpus.is_some()),
            ("pids", run.pids.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, given)| given.then_some(name))
        .collect();
        EffectiveLimits {
            effective: said.effective(),
            from_cli,
            defaulted: said.defaulted(),
        }
    }

    /// One `sandbox.resources` event: the values that apply and where they came from.
    fn log(&self) {
        let e = &self.effective;
        tracing::info!(
            event = "sandbox.resources",
            memory_mib = %e.memory_mib,
            cpus = %e.cpus,
            pids = %e.pids,
            defaults = %names(&self.defaulted),
            cli = %names(&self.from_cli),
            "resource limits (defaults: what the policy leaves out)"
        );
    }
}

/// `a,b` or `none`.
fn names(list: &[&str]) -> String {
    if list.is_empty() {
        "none".to_owned()
    } else {
        list.join(",")
    }
}

fn run_main(run: RunArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // The proxy starts tasks of its own (the host's addresses) when it is built.
    let _enter = rt.enter();
    let policy_url = match &run.policy_url {
        Some(url) => Some(
            openshell_proxy::watch::PolicyUrl::new(url, run.policy_url_sha256.as_deref())
                .context("--policy-url")?,
        ),
        None => None,
    };
    let policy = if let (None, Some(source)) = (&run.policy, &policy_url) {
        rt.block_on(async {
            let text = openshell_proxy::watch::fetch_text(source).await?;
            let policy = Policy::from_yaml(source.as_str(), &text)?;
            openshell_policy::DecisionEngine::new(&policy.network)
                .context("compiling network_policies into the Rego engine")?;
            anyhow::Ok(policy)
        })
    } else {
        load_policy(run.policy.as_deref())
    };
    let policy = match policy {
        Ok(p) => p,
        Err(e) if run.check_policy => {
            report_error(&e);
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e),
    };
    let resources = EffectiveLimits::of(&policy, &run);
    if run.check_policy {
        // The limits that apply (the CLI's and the defaults included), every field written.
        let mut shown = policy.clone();
        shown.resources = openshell_policy::Resources::from(resources.effective);
        #[allow(clippy::print_stdout)]
        {
            print!("{}", shown.to_yaml());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let runtime: RuntimeKind = run.runtime;
    let host_workdir = match (&run.workdir, run.image.is_some() || run.rootfs.is_some()) {
        // The policy's paths and the workdir are inside the image tree.
        (_, true) => None,
        (Some(dir), false) => Some(std::path::absolute(dir).unwrap_or_else(|_| dir.clone())),
        (None, false) => {
            let dir = std::env::current_dir().context("reading the current directory")?;
            Some(std::path::absolute(&dir).unwrap_or(dir))
        }
    };
    // Before anything starts, logging included: the workload must not be able to write a file
    // the supervisor reads or writes.
    let writable = protect::writable_paths(&policy, host_workdir.as_deref())?;
    protect::check(&protect::owned_files(&run), &writable)?;
    let _guard = logging::init(
        run.log_level.as_deref(),
        run.log_format,
        run.log_file.as_deref(),
    )?;
    resources.log();
    if !runtime.is_available() {
        return Err(RuntimeError::BackendNotBuilt(runtime).into());
    }
    // The supervisor's own listeners are bound first: the proxy refuses them as destinations.
    let ssh = ssh::prepare(&run)?;
    let approval_endpoint = approval::prepare(&run, &policy)?;
    let reserved = ssh
        .iter()
        .filter_map(ssh::Prepared::reserved)
        .chain(
            approval_endpoint
                .iter()
                .filter_map(approval::Prepared::reserved),
        )
        .collect();
    // The audit log is opened here, before anything is created for the sandbox.
    let handle =
        openshell_proxy::PolicyHandle::new(policy.clone()).context("loading the network policy")?;
    let proxy_config = openshell_proxy::ProxyConfig {
        max_connections: run.max_connections,
        audit_log: run.audit_log.clone(),
        audit_rotation: openshell_proxy::AuditRotation {
            max_bytes: run.audit_log_max_mib.saturating_mul(1024 * 1024),
            keep: run.audit_log_keep,
        },
        approvals: approval::config(&run),
        reserved,
        ..Default::default()
    };
    let proxy = openshell_proxy::Proxy::new(proxy_config, handle.clone())
        .context("starting the egress proxy")?;
    let visible = protect::visible_paths(&policy, host_workdir.as_deref())?;
    let prepared = terminate::prepare(&policy, &run.upstream_ca, &visible)?;
    let approvals = proxy.approvals().cloned();
    let mut env = BTreeMap::new();
    for key in ["TERM", "LANG", "LC_ALL"] {
        if let Ok(value) = std::env::var(key) {
            env.insert(key.to_owned(), value);
        }
    }
    for kv in &run.env {
        env.insert(kv.key.clone(), kv.value.clone());
    }
    // The workload holds placeholders, never the values.
    for (var, placeholder) in prepared.iter().flat_map(|p| &p.placeholders) {
        if run.env.iter().any(|kv| &kv.key == var) {
            anyhow::bail!(
                "--env {var}: a credential of the policy puts its placeholder in {var}; leave it out"
            );
        }
        env.insert(var.clone(), placeholder.clone());
    }
    let (program, args, env, workdir, root) = match (&run.image, &run.rootfs) {
        (Some(reference), _) => {
            let options = run
                .registry
                .pull_options(openshell_image::PullPolicy::Missing)?;
            let store = openshell_image::Store::open(&openshell_image::Store::default_home())
                .context("opening the image cache")?;
            let prepared = rt
                .block_on(store.ensure(reference, &options))
                .with_context(|| format!("--image {reference}"))?;
            let c = &prepared.config;
            let defaults = openshell_runtime::ImageDefaults {
                env: c.env.clone(),
                working_dir: c.working_dir.clone(),
                user: c.user.clone(),
                entrypoint: c.entrypoint.clone(),
                cmd: c.cmd.clone(),
            };
            rootfs_run(prepared.rootfs_dir.clone(), &defaults, &run, env)?
        }
        (None, Some(dir)) => {
            let lower = std::fs::canonicalize(dir)
                .with_context(|| format!("--rootfs {}", dir.display()))?;
            let image = match &run.rootfs_config {
                Some(file) => {
                    let text = std::fs::read_to_string(file)
                        .with_context(|| format!("reading --rootfs-config {}", file.display()))?;
                    openshell_runtime::ImageDefaults::from_oci_config_json(&text)
                        .with_context(|| format!("--rootfs-config {}", file.display()))?
                }
                None => openshell_runtime::ImageDefaults::default(),
            };
            rootfs_run(lower, &image, &run, env)?
        }
        (None, None) => {
            // With SSH and no command, the sandbox just stays up for sessions.
            let default_command = ["sleep".to_owned(), "infinity".to_owned()];
            let command = match (run.command.is_empty(), &ssh) {
                (true, Some(_)) => &default_command[..],
                _ => &run.command[..],
            };
            let Some((program, args)) = command.split_first() else {
                anyhow::bail!(
                    "no command given: usage: openshell-sandbox [OPTIONS] -- COMMAND [ARGS...]"
                );
            };
            let workdir = host_workdir.clone().unwrap_or_default();
            (program.clone(), args.to_vec(), env, workdir, None)
        }
    };
    let ssh_env = env.clone();
    let ssh_workdir = workdir.clone();
    let mut config = SpawnConfig::new(program.clone(), Arc::new(policy), workdir);
    config.egress = Some(Arc::new(egress::ProxyEgress::new(
        proxy,
        run.identity_max_binary_mib.saturating_mul(1024 * 1024),
        prepared.as_ref().map(|p| p.termination.clone()),
    )));
    config.trust_bundle = prepared.as_ref().map(|p| p.trust_bundle.clone());
    config.vm_engine = run.vm_engine;
    // The guest agent checks executables in the VM with the same limit.
    config.identity_max_binary_bytes =
        Some(run.identity_max_binary_mib.saturating_mul(1024 * 1024));
    config.args = args;
    config.env = env;
    config.root = root;
    // Never our own descriptors: a terminal of its own, or pipes, relayed (see `stdio.rs`).
    config.stdio = stdio::mode();
    config.resources = resources.effective;

    rt.block_on(async {
        // Live updates: only network_policies may change; anything else is refused and the
        // last good policy stays.
        let _file_watch = match &run.policy {
            Some(path) => Some(
                watch::watch_policy_file(path, handle.clone())
                    .with_context(|| format!("watching {}", path.display()))?,
            ),
            None => None,
        };
        let _url_poll = match &policy_url {
            Some(source) => {
                let interval = Duration::from_secs_f64(run.policy_poll_interval.max(0.05));
                Some(openshell_proxy::watch::poll_url(
                    source,
                    interval,
                    handle.clone(),
                ))
            }
            None => None,
        };
        let ssh = match ssh {
            Some(prepared) => Some(prepared.into_server(ssh_workdir, ssh_env)?),
            None => None,
        };
        // Served from before the sandbox starts until the supervisor ends.
        let _approval_endpoint = match (approval_endpoint, approvals) {
            (Some(prepared), Some(approvals)) => Some(AbortOnDrop(prepared.serve(approvals)?)),
            _ => None,
        };
        let code = supervise(
            runtime,
            config,
            run.timeout,
            Duration::from_secs(run.stop_grace),
            ssh,
        )
        .await;
        for task in [_file_watch, _url_poll].into_iter().flatten() {
            task.abort();
        }
        code
    })
}

/// What a `--rootfs` run executes: the image config's defaults (from `--rootfs-config`) under
/// the explicit command, `--env` and `--workdir`.
type RootfsRun = (
    String,
    Vec<String>,
    BTreeMap<String, String>,
    std::path::PathBuf,
    Option<openshell_runtime::RootFs>,
);

/// A sandbox on the tree `lower` with the image's run defaults `image` (from `--rootfs-config`,
/// or a pulled image's config) under the command, `--env` and `--workdir`.
fn rootfs_run(
    lower: std::path::PathBuf,
    image: &openshell_runtime::ImageDefaults,
    run: &RunArgs,
    env: BTreeMap<String, String>,
) -> anyhow::Result<RootfsRun> {
    let merged = openshell_runtime::rootfs::merge_image_config(
        image,
        openshell_runtime::RunRequest {
            command: run.command.clone(),
            env,
            workdir: run.workdir.clone(),
        },
    )?;
    if !merged.workdir.is_absolute() {
        anyhow::bail!(
            "--workdir {}: with --rootfs it must be an absolute path inside the tree",
            merged.workdir.display()
        );
    }
    let root = openshell_runtime::RootFs {
        lower,
        user: merged.user,
    };
    Ok((
        merged.program,
        merged.args,
        merged.env,
        merged.workdir,
        Some(root),
    ))
}

async fn supervise(
    kind: RuntimeKind,
    config: SpawnConfig,
    timeout: Option<u64>,
    stop_grace_for: Duration,
    ssh: Option<ssh::Ready>,
) -> anyhow::Result<ExitCode> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing a SIGHUP handler")?;
    let mut sigwinch =
        signal(SignalKind::window_change()).context("installing a SIGWINCH handler")?;
    // Only observed (the stop and the continuation are the kernel's): a supervisor continued
    // after a stop puts its terminal back in raw mode.
    let mut sigcont =
        signal(SignalKind::from_raw(libc::SIGCONT)).context("installing a SIGCONT handler")?;

    // A stop request while the sandbox starts (a VM's template can take seconds) ends the
    // start: what it made so far goes with the dropped future and with this process.
    let mut sandbox = tokio::select! {
        spawned = openshell_runtime::spawn(kind, config) => spawned?,
        _ = sigint.recv() => return Ok(stopped_while_starting(libc::SIGINT)),
        _ = sigterm.recv() => return Ok(stopped_while_starting(libc::SIGTERM)),
        _ = sighup.recv() => return Ok(stopped_while_starting(libc::SIGHUP)),
    };
    // Restores the terminal when dropped: on every way out of this function from here on.
    let mut relay = stdio::Relay::start(&mut sandbox)?;
    // Serves for as long as the sandbox runs; aborted (every connection with it) when it ends.
    let _ssh = match ssh {
        Some(ready) => Some(AbortOnDrop(ready.serve(sandbox.handle()?))),
        None => None,
    };
    let deadline = async {
        match timeout {
            Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut timed_out = false;
    // Armed by the first SIGTERM or SIGINT forwarded: a workload (or a VM) that does not end
    // within `--stop-grace` of it is killed, so the supervisor always answers a stop request.
    let stop_grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(stop_grace);
    let mut stopping = false;
    let status = loop {
        let stop = tokio::select! {
            status = sandbox.wait() => break status?,
            _ = sigint.recv() => Some(libc::SIGINT),
            _ = sigterm.recv() => Some(libc::SIGTERM),
            _ = sighup.recv() => {
                // Not a stop request (programs reload on it): forwarded only.
                forward(&sandbox, libc::SIGHUP);
                None
            }
            _ = sigwinch.recv() => {
                relay.window_changed(&sandbox);
                None
            }
            _ = sigcont.recv() => {
                relay.continued(&sandbox);
                None
            }
            _ = &mut stop_grace, if stopping => {
                tracing::warn!(event = "sandbox.stop_timeout", sandbox = sandbox.id(),
                               grace_seconds = stop_grace_for.as_secs(),
                               "the workload did not end after the stop signal; killing the sandbox");
                stopping = false;
                sandbox.kill()?;
                None
            }
            _ = &mut deadline, if !timed_out => {
                tracing::warn!(event = "sandbox.timeout", sandbox = sandbox.id(), seconds = timeout.unwrap_or(0),
                               "timeout expired; killing the sandbox");
                timed_out = true;
                sandbox.kill()?;
                None
            }
        };
        if let Some(sig) = stop {
            forward(&sandbox, sig);
            if !stopping {
                stopping = true;
                stop_grace
                    .as_mut()
                    .reset(tokio::time::Instant::now() + stop_grace_for);
            }
        }
    };
    // The sandbox is gone: nothing holds the other end of its streams once it is dropped (the
    // vm backend's session tasks with it), so the relays reach their end of file. Everything
    // the workload wrote is written out before the status is returned, unless a stop request
    // comes meanwhile (our stdout may be a pipe nobody reads).
    drop(_ssh);
    drop(sandbox);
    tokio::select! {
        _ = relay.drained() => {}
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    drop(relay);
    if timed_out {
        return Ok(ExitCode::from(EXIT_TIMEOUT));
    }
    Ok(ExitCode::from(exit_byte(status)))
}

/// The exit of a supervisor stopped by `sig` before its sandbox ran: 128 + the signal, as a shell
/// reports a program the signal ended.
fn stopped_while_starting(sig: i32) -> ExitCode {
    tracing::warn!(
        event = "sandbox.start_interrupted",
        signal = sig,
        "stopped while the sandbox was starting"
    );
    ExitCode::from(u8::try_from(128 + sig).unwrap_or(EXIT_SANDBOX_FAILED))
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn forward(sandbox: &openshell_runtime::SandboxedProcess, sig: i32) {
    tracing::debug!(signal = sig, "forwarding signal to the workload");
    if let Err(e) = sandbox.signal(sig) {
        tracing::warn!(error = %e, signal = sig, "could not forward signal");
    }
}

fn exit_byte(status: ExitStatus) -> u8 {
    u8::try_from(status.code() & 0xff).unwrap_or(EXIT_SANDBOX_FAILED)
}

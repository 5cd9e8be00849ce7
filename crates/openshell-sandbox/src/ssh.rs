//! `--ssh-listen`: checks and loading before the sandbox starts, serving once it runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use openshell_runtime::SandboxHandle;
use openshell_ssh::{AuthorizedKeys, SshOptions, SshServer};

use crate::cli::RunArgs;

/// Everything checked and loaded before the sandbox starts: bad keys or a refused address
/// never leave a sandbox behind.
pub struct Prepared {
    listener: std::net::TcpListener,
    options: SshOptions,
}

/// The listener registered with the async runtime, waiting for the sandbox.
pub struct Ready {
    listener: tokio::net::TcpListener,
    options: SshOptions,
}

pub fn prepare(run: &RunArgs) -> anyhow::Result<Option<Prepared>> {
    let Some(addr) = run.ssh_listen else {
        if run.ssh_authorized_keys.is_some() || run.ssh_host_key.is_some() {
            anyhow::bail!("--ssh-authorized-keys and --ssh-host-key need --ssh-listen");
        }
        return Ok(None);
    };
    if !addr.ip().is_loopback() && !run.dangerously_allow_ssh_on_non_loopback {
        anyhow::bail!(
            "--ssh-listen {addr}: not a loopback address; pass --dangerously-allow-ssh-on-non-loopback to serve other hosts"
        );
    }
    let keys_path = run
        .ssh_authorized_keys
        .as_deref()
        .context("--ssh-listen needs --ssh-authorized-keys FILE (public-key login only)")?;
    let authorized_keys = AuthorizedKeys::load(keys_path)?;
    let host_key_path = run
        .ssh_host_key
        .clone()
        .unwrap_or_else(openshell_ssh::default_host_key_path);
    let host_key = openshell_ssh::load_or_create_host_key(&host_key_path)?;
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--ssh-listen {addr}: binding"))?;
    listener
        .set_nonblocking(true)
        .context("configuring the ssh listener")?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(event = "ssh.listening", addr = %bound, keys = authorized_keys.len(),
                   authorized_keys = %keys_path.display(), host_key = %host_key_path.display(),
                   "ssh server listening");
    let options = SshOptions {
        host_key,
        authorized_keys,
        idle_timeout: (run.ssh_idle_timeout > 0).then(|| Duration::from_secs(run.ssh_idle_timeout)),
        workdir: PathBuf::new(),
        env: BTreeMap::new(),
        shell: run.ssh_shell.clone(),
        sftp_server: run.ssh_sftp_server.clone(),
    };
    Ok(Some(Prepared { listener, options }))
}

impl Prepared {
    /// The bound listener, as the proxy reserves it.
    pub fn reserved(&self) -> Option<openshell_proxy::ssrf::Reserved> {
        let addr = self.listener.local_addr().ok()?;
        Some(openshell_proxy::ssrf::Reserved {
            what: "the SSH server".into(),
            addr,
        })
    }

    /// Sessions start in `workdir` with `env` (the workload's).
    pub fn into_server(
        mut self,
        workdir: PathBuf,
        env: BTreeMap<String, String>,
    ) -> anyhow::Result<Ready> {
        self.options.workdir = workdir;
        self.options.env = env;
        let listener = tokio::net::TcpListener::from_std(self.listener)
            .context("registering the ssh listener")?;
        Ok(Ready {
            listener,
            options: self.options,
        })
    }
}

impl Ready {
    pub fn serve(self, sandbox: SandboxHandle) -> tokio::task::JoinHandle<()> {
        let server = SshServer::new(self.options, sandbox);
        let listener = self.listener;
        tokio::spawn(async move {
            if let Err(e) = server.serve(listener).await {
                tracing::error!(event = "ssh.stopped", error = %e, "the ssh server stopped");
            }
        })
    }
}

//! What the supervisor prepares for TLS termination and credentials before the sandbox
//! starts: the sandbox's CA (its key stays in this process), the CA bundle the workload trusts,
//! the upstream TLS settings (`--upstream-ca`), and each credential's value (read here, from
//! this process's environment or a file the sandbox cannot see) with the placeholder the
//! workload gets instead.

use std::sync::Arc;

use anyhow::Context;
use openshell_policy::{CredentialSource, Policy, TlsMode};
use openshell_proxy::credentials::{Credential, CredentialSet};
use openshell_proxy::terminate::{trust_bundle, SandboxCa, Termination, UpstreamTls};

use crate::protect;

/// Termination for one sandbox.
pub struct Prepared {
    pub termination: Arc<Termination>,
    /// PEM: the system roots and the sandbox CA.
    pub trust_bundle: Arc<Vec<u8>>,
    /// `(variable, placeholder)` for the workload's environment.
    pub placeholders: Vec<(String, String)>,
}

/// The policy the sandbox starts with terminates TLS somewhere or has credentials (which are
/// only ever sent on terminated connections).
pub fn needed(policy: &Policy) -> bool {
    !policy.credentials.is_empty()
        || policy
            .network
            .iter()
            .flat_map(|(_, p)| p.endpoints.iter())
            .any(|e| e.tls == Some(TlsMode::Terminate))
}

/// Read a credential file: one trailing line break removed.
fn read_value(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    let trimmed = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    Ok(trimmed.to_owned())
}

/// Everything termination needs, or `None` when the policy does not use it. `visible`: the
/// host paths the sandbox shows (a credential file there is refused). The variables credentials
/// are read from are removed from this process's environment, so no process it starts (the
/// sandbox's helpers, QEMU and its daemons, the policy watcher) inherits a value.
pub fn prepare(
    policy: &Policy,
    upstream_ca: &[std::path::PathBuf],
    visible: &[protect::Writable],
) -> anyhow::Result<Option<Prepared>> {
    if !needed(policy) {
        return Ok(None);
    }
    let upstream = UpstreamTls::new(upstream_ca).context("--upstream-ca")?;
    let mut credentials = Vec::new();
    for (name, c) in &policy.credentials {
        let value = match &c.source {
            CredentialSource::FromEnv(var) => std::env::var(var).with_context(|| {
                format!("credentials.{name}.from_env: {var} is not set (or not UTF-8) in the supervisor's environment")
            })?,
            CredentialSource::FromFile(path) => {
                protect::check_secret(name, path.as_path(), visible)?;
                read_value(path.as_path()).with_context(|| {
                    format!("credentials.{name}.from_file: reading {path}")
                })?
            }
        };
        let endpoints = c
            .endpoints
            .iter()
            .map(|e| (e.host.as_str().to_owned(), e.port.get()))
            .collect();
        credentials.push(
            Credential::new(name, value, endpoints, c.query)
                .with_context(|| format!("credentials.{name}"))?,
        );
    }
    for c in policy.credentials.values() {
        if let CredentialSource::FromEnv(var) = &c.source {
            // The runtime has no other thread reading the environment yet; nothing after
            // this point needs the variable.
            std::env::remove_var(var);
        }
    }
    let placeholders = policy
        .credentials
        .values()
        .zip(&credentials)
        .map(|(c, resolved)| (c.env.clone(), resolved.placeholder.clone()))
        .collect();
    let ca = SandboxCa::generate(&format!("supervisor {}", std::process::id()))
        .context("making the sandbox CA")?;
    let bundle = trust_bundle(&ca);
    Ok(Some(Prepared {
        termination: Arc::new(Termination {
            ca,
            upstream,
            credentials: CredentialSet::new(credentials),
        }),
        trust_bundle: Arc::new(bundle),
        placeholders,
    }))
}

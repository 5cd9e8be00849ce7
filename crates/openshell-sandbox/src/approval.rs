//! `--approval-listen`: the address checked and bound before the sandbox starts, the
//! endpoint served while it runs.

use std::time::Duration;

use anyhow::Context;
use openshell_policy::Policy;
use openshell_proxy::{ApprovalConfig, Approvals};

use crate::cli::RunArgs;

/// Most questions pending at once.
const MAX_PENDING: usize = 64;

/// The listener, bound (a refused or busy address never leaves a sandbox behind).
pub struct Prepared {
    listener: std::net::TcpListener,
}

/// What the proxy is told: ask, with this timeout, when there is someone to ask.
pub fn config(run: &RunArgs) -> Option<ApprovalConfig> {
    run.approval_listen.map(|_| ApprovalConfig {
        timeout: Duration::from_secs(run.approval_timeout),
        max_pending: MAX_PENDING,
    })
}

pub fn prepare(run: &RunArgs, policy: &Policy) -> anyhow::Result<Option<Prepared>> {
    let Some(addr) = run.approval_listen else {
        if policy.network.asks() {
            tracing::warn!(
                event = "approval.unavailable",
                "the policy has endpoints with enforcement: ask and there is no --approval-listen: what they allow is denied"
            );
        }
        return Ok(None);
    };
    if !addr.ip().is_loopback() && !run.dangerously_allow_approval_on_non_loopback {
        anyhow::bail!(
            "--approval-listen {addr}: not a loopback address; pass --dangerously-allow-approval-on-non-loopback to let other hosts approve egress"
        );
    }
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--approval-listen {addr}: binding"))?;
    listener
        .set_nonblocking(true)
        .context("configuring the approval listener")?;
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(event = "approval.listening", addr = %bound, timeout_seconds = run.approval_timeout,
                   "approval endpoint listening (GET /v1/approvals, POST /v1/approvals/ID)");
    Ok(Some(Prepared { listener }))
}

impl Prepared {
    /// The bound listener, as the proxy reserves it.
    pub fn reserved(&self) -> Option<openshell_proxy::ssrf::Reserved> {
        let addr = self.listener.local_addr().ok()?;
        Some(openshell_proxy::ssrf::Reserved {
            what: "the approval endpoint".into(),
            addr,
        })
    }

    /// Serve until the task is aborted.
    pub fn serve(self, approvals: Approvals) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::from_std(self.listener)
            .context("registering the approval listener")?;
        Ok(tokio::spawn(openshell_proxy::approval::http::serve(
            listener, approvals,
        )))
    }
}

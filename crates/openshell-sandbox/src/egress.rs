//! Glue between the runtime's egress hook and the proxy: each sandbox's listener is served by
//! the shared proxy. Process sandboxes' callers are identified from the host's view of the
//! sandbox's /proc; vm sandboxes' callers are named by the guest agent's preamble.

use std::sync::Arc;

use openshell_proxy::procfs::ProcfsResolver;
use openshell_proxy::{Proxy, SandboxContext, ServeGuard};
use openshell_runtime::{Egress, EgressAttachment, EgressGuard, EgressListener};

#[derive(Debug, Clone)]
pub struct ProxyEgress {
    pub proxy: Proxy,
}

impl Egress for ProxyEgress {
    fn attach(
        &self,
        a: EgressAttachment,
    ) -> Result<EgressGuard, Box<dyn std::error::Error + Send + Sync>> {
        let handle = match a.listener {
            EgressListener::Tcp {
                listener,
                init_pid,
                members,
            } => {
                let resolver = ProcfsResolver::new(init_pid as u32, move || {
                    Ok(members().into_iter().map(|p| p as u32).collect())
                });
                let context = SandboxContext {
                    sandbox_id: a.sandbox_id,
                    identity: Arc::new(resolver),
                };
                self.proxy.serve_std_tcp(listener, context)?
            }
            EgressListener::Unix { listener } => {
                listener.set_nonblocking(true)?;
                let listener = tokio::net::UnixListener::from_std(listener)?;
                let context = SandboxContext {
                    sandbox_id: a.sandbox_id,
                    identity: Arc::new(PreambleOnly),
                };
                self.proxy.serve_unix(listener, context)
            }
        };
        Ok(Box::new(ServeGuard(handle)))
    }
}

/// The resolver for Unix entry points, where the preamble names the caller: never asked.
struct PreambleOnly;

impl openshell_proxy::IdentityResolver for PreambleOnly {
    fn resolve(
        &self,
        peer: std::net::SocketAddr,
        _local: std::net::SocketAddr,
    ) -> Result<openshell_proxy::Caller, openshell_proxy::IdentityError> {
        Err(openshell_proxy::IdentityError::SocketNotFound { peer })
    }
}

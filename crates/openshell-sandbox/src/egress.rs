//! Glue between the runtime's egress hook and the proxy: each sandbox's listener is served by
//! the shared proxy, with callers identified from the sandbox's /proc.

use std::sync::Arc;

use openshell_proxy::procfs::ProcfsResolver;
use openshell_proxy::{Proxy, SandboxContext, ServeGuard};
use openshell_runtime::{Egress, EgressAttachment, EgressGuard};

#[derive(Debug, Clone)]
pub struct ProxyEgress {
    pub proxy: Proxy,
}

impl Egress for ProxyEgress {
    fn attach(
        &self,
        a: EgressAttachment,
    ) -> Result<EgressGuard, Box<dyn std::error::Error + Send + Sync>> {
        let members = a.members.clone();
        let resolver = ProcfsResolver::new(a.init_pid as u32, move || {
            Ok(members().into_iter().map(|p| p as u32).collect())
        });
        let context = SandboxContext {
            sandbox_id: a.sandbox_id,
            identity: Arc::new(resolver),
        };
        let handle = self.proxy.serve_std_tcp(a.listener, context)?;
        Ok(Box::new(ServeGuard(handle)))
    }
}

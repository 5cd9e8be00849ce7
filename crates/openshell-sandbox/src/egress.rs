//! Glue between the runtime's egress hook and the proxy: each sandbox's listener is served by
//! the shared proxy. Process sandboxes' callers are identified from the host's view of the
//! sandbox's /proc and the supervisor's record of their connects and execs; vm sandboxes'
//! callers are named by the guest agent's preamble.

use std::sync::Arc;

use openshell_proxy::procfs::{HashCache, ProcfsConfig, ProcfsResolver};
use openshell_proxy::terminate::Termination;
use openshell_proxy::{Connector, ProcKey, ProcessHistory, Proxy, SandboxContext, ServeGuard};
use openshell_runtime::lineage::{self, Lineage};
use openshell_runtime::{Egress, EgressAttachment, EgressGuard, EgressListener};

#[derive(Debug, Clone)]
pub struct ProxyEgress {
    pub proxy: Proxy,
    /// Executable digests, shared by every sandbox this supervisor serves.
    hashes: Arc<HashCache>,
    max_hash_bytes: u64,
    /// The sandbox's CA, upstream TLS and credentials, when its policy terminates TLS.
    termination: Option<Arc<Termination>>,
}

impl ProxyEgress {
    pub fn new(proxy: Proxy, max_hash_bytes: u64, termination: Option<Arc<Termination>>) -> Self {
        Self {
            proxy,
            hashes: Arc::new(HashCache::new()),
            max_hash_bytes,
            termination,
        }
    }

    fn context(
        &self,
        sandbox_id: String,
        identity: Arc<dyn openshell_proxy::IdentityResolver>,
    ) -> SandboxContext {
        let context = SandboxContext::new(sandbox_id, identity);
        match &self.termination {
            Some(t) => context.with_termination(t.clone()),
            None => context,
        }
    }
}

/// The runtime's [`Lineage`] as the proxy's [`ProcessHistory`].
pub struct History(pub Arc<Lineage>);

fn runtime_key(k: ProcKey) -> lineage::ProcKey {
    lineage::ProcKey {
        pid: k.pid,
        start: k.start,
    }
}

impl ProcessHistory for History {
    fn connector(&self, socket_inode: u64) -> Option<Connector> {
        self.0.connector(socket_inode).map(|c| Connector {
            process: ProcKey {
                pid: c.process.pid,
                start: c.process.start,
            },
            exe: c.exe,
            seq: c.seq,
        })
    }

    fn credits(&self, parent: ProcKey, child: ProcKey) -> bool {
        self.0.credits(runtime_key(parent), runtime_key(child))
    }

    fn exec_seq(&self, process: ProcKey) -> u64 {
        self.0.exec_seq(runtime_key(process))
    }
}

impl Egress for ProxyEgress {
    fn attach(
        &self,
        a: EgressAttachment,
    ) -> Result<EgressGuard, Box<dyn std::error::Error + Send + Sync>> {
        let sandbox_id = a.sandbox_id.clone();
        let handle = match a.listener {
            EgressListener::Tcp {
                listener,
                init_pid,
                members,
                lineage,
                writable,
            } => {
                let config = ProcfsConfig {
                    writable,
                    max_hash_bytes: self.max_hash_bytes,
                    ..ProcfsConfig::new(init_pid as u32)
                };
                // One blocking thread at a time for this sandbox's identity work.
                let resolver = ProcfsResolver::new(
                    config,
                    move || Ok(members().into_iter().map(|p| p as u32).collect()),
                    Arc::new(History(lineage)),
                    self.hashes.clone(),
                )
                .offloaded(1);
                let context = self.context(a.sandbox_id, Arc::new(resolver));
                self.proxy.serve_std_tcp(listener, context)?
            }
            EgressListener::Unix { listener } => {
                listener.set_nonblocking(true)?;
                let listener = tokio::net::UnixListener::from_std(listener)?;
                let context = self.context(a.sandbox_id, Arc::new(PreambleOnly));
                self.proxy.serve_unix(listener, context)
            }
        };
        Ok(Box::new(Attached {
            serving: ServeGuard(handle),
            proxy: self.proxy.clone(),
            sandbox_id,
        }))
    }
}

/// A sandbox served by the proxy: when it ends, serving stops and its approval grants end.
struct Attached {
    serving: ServeGuard,
    proxy: Proxy,
    sandbox_id: String,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.serving.0.abort();
        self.proxy.end_sandbox(&self.sandbox_id);
    }
}

/// The resolver for Unix entry points, where the preamble names the caller: never asked.
struct PreambleOnly;

impl openshell_proxy::IdentityResolver for PreambleOnly {
    fn identify(
        &self,
        peer: std::net::SocketAddr,
        _local: std::net::SocketAddr,
    ) -> openshell_proxy::identity::BoxFuture<
        '_,
        Result<openshell_proxy::Identified, openshell_proxy::IdentityError>,
    > {
        Box::pin(std::future::ready(Err(
            openshell_proxy::IdentityError::SocketNotFound { peer },
        )))
    }

    fn verify<'a>(
        &'a self,
        identified: &'a openshell_proxy::Identified,
    ) -> openshell_proxy::identity::BoxFuture<
        'a,
        Result<openshell_proxy::Caller, openshell_proxy::IdentityError>,
    > {
        Box::pin(std::future::ready(Ok(identified.caller.clone())))
    }
}

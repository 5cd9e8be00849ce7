//! The egress relay: every TCP connection to the guest proxy address goes to the host proxy,
//! preceded by one preamble line naming the calling binary resolved from the guest's /proc.
//! A connection whose caller cannot be credited is answered 403 here: the host never sees it.
//!
//! The caller is identified as the host's process backend does it (the same
//! `ProcfsResolver`, over the agent's record of every launched process's connects and execs):
//! when the connection is accepted and again once its request head is in, then verified
//! (executables' content, loaders, other holders of the socket). That work runs on the
//! agent's one thread but yields between files and megabytes hashed, and at most
//! [`IDENTITY_AT_ONCE`] connections are identified at a time, so the agent keeps serving.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use openshell_proxy::identity::{render_preamble, Caller, PREAMBLE_MAX};
use openshell_proxy::procfs::{HashCache, ProcfsConfig, ProcfsResolver, DEFAULT_MAX_HASH_BYTES};
use openshell_proxy::{Connector, IdentityError, ProcKey, ProcessHistory};
use openshell_runtime::lineage::{self, Lineage};
use openshell_runtime::vm_protocol::{EGRESS_PORT, MAX_GUEST_WRITE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use crate::fdio::{self, Io};
use crate::linux::{Ctx, EgressTarget};
use crate::{chain, diag};

/// Most connections whose caller is being identified at once.
const IDENTITY_AT_ONCE: usize = 4;
/// Longest request head read before the second identification (the host's limit).
const HEAD_MAX: usize = 32 * 1024;
/// How long the request head may take.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Every process the agent can see, except kernel threads (no executable) and the agent itself.
pub fn guest_pids() -> std::io::Result<Vec<u32>> {
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != me && std::fs::read_link(entry.path().join("exe")).is_ok() {
            pids.push(pid);
        }
    }
    Ok(pids)
}

/// The preamble line for `caller`, dropping its farthest ancestors until it fits the host's
/// limit; `None` if even the bare caller does not fit.
pub fn bounded_preamble(caller: &Caller) -> Option<String> {
    let mut caller = caller.clone();
    loop {
        let line = render_preamble(&caller);
        if line.len() <= PREAMBLE_MAX {
            return Some(line);
        }
        caller.ancestors.pop()?;
    }
}

/// The agent's [`Lineage`] as the proxy's [`ProcessHistory`].
struct History(Arc<Lineage>);

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

/// The relay's resolver: the agent is the guest's init (its network namespace is the guest's,
/// and the ancestor walk stops at it); `writable`: what the workload may write.
pub fn resolver(ctx: &Ctx, writable: Vec<PathBuf>) -> ProcfsResolver {
    let config = ProcfsConfig {
        writable,
        max_hash_bytes: ctx
            .identity_max_binary_bytes
            .get()
            .unwrap_or(DEFAULT_MAX_HASH_BYTES),
        ..ProcfsConfig::new(std::process::id())
    };
    ProcfsResolver::new(
        config,
        guest_pids,
        Arc::new(History(ctx.lineage.clone())),
        Arc::new(HashCache::new()),
    )
}

pub async fn serve(ctx: Rc<Ctx>, listener: TcpListener, target: EgressTarget) {
    let budget = Rc::new(tokio::sync::Semaphore::new(IDENTITY_AT_ONCE));
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::task::spawn_local(relay(ctx.clone(), budget.clone(), conn, target.clone()));
            }
            Err(e) => {
                diag!("egress accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn dial(target: &EgressTarget) -> std::io::Result<Box<dyn Io>> {
    Ok(match target {
        EgressTarget::Vsock => {
            Box::new(fdio::vsock_connect(libc::VMADDR_CID_HOST, EGRESS_PORT).await?)
        }
        EgressTarget::Unix(path) => Box::new(UnixStream::connect(path).await?),
    })
}

/// Read the client's first bytes up to the end of its request head (or [`HEAD_MAX`] bytes,
/// its end of file or [`HEAD_TIMEOUT`]; the host judges what they are).
async fn read_head(client: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        while buf.len() < HEAD_MAX && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match client.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(HEAD_TIMEOUT, read).await;
    buf
}

/// Who the connection may be credited to: identified at accept and after the head (equal),
/// then verified. Each step holds one of the [`IDENTITY_AT_ONCE`] permits only while it works
/// (not while the client takes its time with the head).
async fn credit(
    resolver: &ProcfsResolver,
    budget: &tokio::sync::Semaphore,
    client: &mut TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
) -> (Result<Caller, IdentityError>, Vec<u8>) {
    let identify = || async {
        let _permit = budget.acquire().await;
        resolver.identify_here(peer, local).await
    };
    let (first, head) = tokio::join!(identify(), read_head(client));
    let second = identify().await;
    let identified = match (first, second) {
        (Ok(a), Ok(b)) if a == b => b,
        (Ok(_), Ok(_)) => {
            let e = IdentityError::Changed("between the connection and its request".into());
            return (Err(e), head);
        }
        (Err(e), _) | (_, Err(e)) => return (Err(e), head),
    };
    let _permit = budget.acquire().await;
    (resolver.verify_here(&identified).await, head)
}

async fn relay(
    ctx: Rc<Ctx>,
    budget: Rc<tokio::sync::Semaphore>,
    mut client: TcpStream,
    target: EgressTarget,
) {
    let (peer, local) = match (client.peer_addr(), client.local_addr()) {
        (Ok(p), Ok(l)) => (p, l),
        _ => return,
    };
    let resolver = ctx.identity.borrow().clone();
    let (caller, head) = match resolver {
        Some(resolver) => credit(&resolver, &budget, &mut client, peer, local).await,
        None => (
            Err(IdentityError::Other("no workload has been launched".into())),
            Vec::new(),
        ),
    };
    let caller = match caller {
        Ok(c) => c,
        Err(e) => {
            diag!("egress from {peer}: caller not credited: {}", chain(&e));
            // The same answer the host proxy gives when it cannot credit a caller: a 403 the
            // agent in the sandbox can read, never a silent close.
            let reason = match &e {
                IdentityError::BinaryChanged { .. }
                | IdentityError::Redirected { .. }
                | IdentityError::TooLarge { .. }
                | IdentityError::Shared { .. }
                | IdentityError::Changed(_) => e.to_string(),
                e => format!("cannot identify the calling process: {e}"),
            };
            let body = serde_json::json!({
                "error": "policy_denied",
                "missing": ["binary"],
                "reason": reason,
            })
            .to_string();
            let response = format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.write_all(response.as_bytes()).await;
            let _ = client.shutdown().await;
            return;
        }
    };
    let Some(preamble) = bounded_preamble(&caller) else {
        diag!("egress from {peer}: caller path too long");
        return;
    };
    let mut host = match dial(&target).await {
        Ok(h) => h,
        Err(e) => {
            diag!("egress from {peer}: dialing the host: {e}");
            return;
        }
    };
    if host.write_all(preamble.as_bytes()).await.is_err() {
        return;
    }
    for part in head.chunks(MAX_GUEST_WRITE) {
        if host.write_all(part).await.is_err() {
            return;
        }
    }
    // Writes toward the host never exceed MAX_GUEST_WRITE bytes (the copy buffer's size).
    let _ = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut host,
        MAX_GUEST_WRITE,
        64 * 1024,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_is_bounded() {
        let caller = Caller {
            pid: 9,
            exe: "/usr/bin/curl".into(),
            ancestors: (0..64)
                .map(|i| format!("/{}/{i}", "d".repeat(100)).into())
                .collect(),
        };
        let line = bounded_preamble(&caller).unwrap_or_default();
        assert!(
            line.len() <= PREAMBLE_MAX && line.ends_with('\n'),
            "{}",
            line.len()
        );
        let parsed = openshell_proxy::identity::parse_preamble(line.trim_end().as_bytes());
        let parsed = parsed.map_err(|e| e.to_string());
        assert!(
            parsed
                .as_ref()
                .is_ok_and(|c| c.exe == caller.exe && !c.ancestors.is_empty()),
            "{parsed:?}"
        );
        let long = Caller {
            pid: 9,
            exe: format!("/{}", "x".repeat(5000)).into(),
            ancestors: vec![],
        };
        assert_eq!(bounded_preamble(&long), None);
    }
}

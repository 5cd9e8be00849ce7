//! The egress relay: every TCP connection to the guest proxy address goes to the host proxy,
//! preceded by one preamble line naming the calling binary resolved from the guest's /proc.
//! A connection whose caller cannot be resolved is closed: the host never sees it.

use std::rc::Rc;

use openshell_proxy::identity::{render_preamble, Caller, IdentityResolver, PREAMBLE_MAX};
use openshell_proxy::procfs::ProcfsResolver;
use openshell_runtime::vm_protocol::{EGRESS_PORT, MAX_GUEST_WRITE};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixStream};

use crate::fdio::{self, Io};
use crate::linux::EgressTarget;
use crate::{chain, diag};

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

pub async fn serve(listener: TcpListener, target: EgressTarget) {
    // The agent is the guest's init: its network namespace is the guest's, and the ancestor
    // walk stops at it.
    let resolver = Rc::new(ProcfsResolver::new(std::process::id(), guest_pids));
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::task::spawn_local(relay(resolver.clone(), conn, target.clone()));
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

async fn relay(resolver: Rc<ProcfsResolver>, mut client: TcpStream, target: EgressTarget) {
    let (peer, local) = match (client.peer_addr(), client.local_addr()) {
        (Ok(p), Ok(l)) => (p, l),
        _ => return,
    };
    // Reads a few small /proc files (and hashes a binary the first time it is seen) on this
    // thread; the connection waits meanwhile.
    let caller = match resolver.resolve(peer, local) {
        Ok(c) => c,
        Err(e) => {
            diag!("egress from {peer}: caller not identified: {}", chain(&e));
            // The same answer the host proxy gives when it cannot identify a caller: a 403 the
            // agent in the sandbox can read, never a silent close.
            let body = serde_json::json!({
                "error": "policy_denied",
                "missing": ["binary"],
                "reason": e.to_string(),
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

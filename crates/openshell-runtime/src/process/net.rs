//! The sandbox's network: one veth pair whose far end lives in a private "edge" namespace.
//!
//! ```text
//!   sandbox netns                 edge netns (one per sandbox)        host netns
//!   eth0 10.200.0.2/30  <--veth-->  veth0 10.200.0.1/30                (untouched)
//!   lo                              the egress proxy listens here
//! ```
//!
//! The sandbox has no default route: its only reachable address is the edge side, and the only
//! thing that listens in the edge namespace is the egress proxy (a later layer), whose sockets
//! are created there by [`EdgeNamespace::bind_tcp`]. Host services bound to 0.0.0.0 are not
//! reachable, so no host firewall rules are needed. The edge namespace has no processes: it lives
//! as long as the supervisor holds its descriptor, and with it the veth pair.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;

use futures::TryStreamExt;
use nix::sched::CloneFlags;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};

pub const EDGE_IF: &str = "veth0";
pub const SANDBOX_IF: &str = "eth0";
pub const EDGE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const SANDBOX_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
pub const PREFIX_LEN: u8 = 30;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{op}")]
    Sys {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}")]
    Netlink {
        op: &'static str,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("network setup thread ended without an answer")]
    ThreadLost,
}

fn sys(op: &'static str) -> impl FnOnce(nix::Error) -> NetError {
    move |e| NetError::Sys {
        op,
        source: e.into(),
    }
}

fn nl(op: &'static str) -> impl FnOnce(rtnetlink::Error) -> NetError {
    move |source| NetError::Netlink { op, source }
}

/// The per-sandbox edge namespace.
#[derive(Debug)]
pub struct EdgeNamespace {
    ns: File,
}

impl EdgeNamespace {
    /// Create the edge namespace and the veth pair, and move the sandbox end into the network
    /// namespace of `sandbox_pid`.
    ///
    /// The work runs on a dedicated thread, because it changes that thread's network namespace;
    /// the thread ends afterwards so no pooled thread is ever left in the wrong namespace.
    pub async fn create(sandbox_pid: i32) -> Result<EdgeNamespace, NetError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("openshell-edge".into())
            .spawn(move || {
                let _ = tx.send(create_on_this_thread(sandbox_pid));
            })
            .map_err(|source| NetError::Sys {
                op: "starting the network setup thread",
                source,
            })?;
        rx.await.map_err(|_| NetError::ThreadLost)?
    }

    /// Bind a TCP listener inside the edge namespace (the proxy's entry point for this sandbox).
    pub async fn bind_tcp(&self, addr: SocketAddr) -> Result<std::net::TcpListener, NetError> {
        let ns = self.ns.try_clone().map_err(|source| NetError::Sys {
            op: "duplicating the edge namespace descriptor",
            source,
        })?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("openshell-edge-bind".into())
            .spawn(move || {
                let result = nix::sched::setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(sys("entering the edge network namespace"))
                    .and_then(|()| {
                        std::net::TcpListener::bind(addr).map_err(|source| NetError::Sys {
                            op: "binding in the edge network namespace",
                            source,
                        })
                    });
                let _ = tx.send(result);
            })
            .map_err(|source| NetError::Sys {
                op: "starting the network setup thread",
                source,
            })?;
        rx.await.map_err(|_| NetError::ThreadLost)?
    }
}

fn create_on_this_thread(sandbox_pid: i32) -> Result<EdgeNamespace, NetError> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNET)
        .map_err(sys("creating the edge network namespace"))?;
    let ns = File::open("/proc/thread-self/ns/net").map_err(|source| NetError::Sys {
        op: "opening the edge network namespace",
        source,
    })?;
    // IPv6 stays off in the edge namespace: the sandbox must not get link-local neighbours.
    for conf in ["all", "default"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| NetError::Sys {
            op: "starting the netlink runtime",
            source,
        })?;
    runtime.block_on(configure_edge(sandbox_pid))?;
    Ok(EdgeNamespace { ns })
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<u32, NetError> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_owned())
        .execute()
        .try_next()
        .await
        .map_err(nl("looking up the edge interface"))?;
    link.map(|l| l.header.index).ok_or(NetError::Sys {
        op: "looking up the edge interface",
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })
}

async fn configure_edge(sandbox_pid: i32) -> Result<(), NetError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| NetError::Sys {
        op: "opening a netlink socket",
        source,
    })?;
    let conn = tokio::spawn(connection);
    let result = async {
        // The peer is created directly in the sandbox's namespace: moving a device between
        // namespaces afterwards costs a network-wide synchronisation (tens of milliseconds).
        let peer = LinkUnspec::new_with_name(SANDBOX_IF)
            .setns_by_pid(sandbox_pid as u32)
            .build();
        let veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(EDGE_IF.to_owned())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        handle
            .link()
            .add(veth)
            .execute()
            .await
            .map_err(nl("creating the veth pair"))?;
        let edge = link_index(&handle, EDGE_IF).await?;
        handle
            .address()
            .add(edge, EDGE_ADDR.into(), PREFIX_LEN)
            .execute()
            .await
            .map_err(nl("addressing the edge interface"))?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(edge).up().build())
            .execute()
            .await
            .map_err(nl("bringing the edge interface up"))?;
        let lo = link_index(&handle, "lo").await?;
        handle
            .link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .map_err(nl("bringing the edge loopback up"))
    }
    .await;
    conn.abort();
    result
}

/// Inside the sandbox's network namespace (called by init): loopback up, the sandbox end of the
/// veth addressed and up, IPv6 off. No default route is added.
pub fn configure_sandbox_side(
    ifname: &str,
    address: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), NetError> {
    for conf in ["all", "default"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|source| NetError::Sys {
            op: "starting the netlink runtime",
            source,
        })?;
    runtime.block_on(async {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetError::Sys {
                op: "opening a netlink socket",
                source,
            })?;
        let conn = tokio::spawn(connection);
        let result = async {
            let lo = link_index(&handle, "lo").await?;
            handle
                .link()
                .set(LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await
                .map_err(nl("bringing loopback up"))?;
            let _ = std::fs::write(
                format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
                "1",
            );
            let index = link_index(&handle, ifname).await?;
            handle
                .address()
                .add(index, address.into(), prefix_len)
                .execute()
                .await
                .map_err(nl("addressing the sandbox interface"))?;
            handle
                .link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(nl("bringing the sandbox interface up"))
        }
        .await;
        conn.abort();
        result
    })
}

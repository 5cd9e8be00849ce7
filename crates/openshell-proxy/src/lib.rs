//! OpenShell egress proxy.
//!
//! Every connection a sandbox makes off-box arrives here and is decided by
//! the Rego policy ([`openshell_policy::DecisionEngine`]) by destination and
//! by the executable that opened it.
//!
//! # Entry points (one per backend)
//! - [`Proxy::serve_tcp`]: the process backend binds a listener inside the
//!   sandbox's edge network namespace (10.200.0.1:3128) and hands it over;
//!   callers are found through the host's /proc ([`procfs::ProcfsResolver`]).
//! - [`Proxy::serve_unix`]: the vm backend maps a Unix socket into the guest;
//!   the guest agent starts each connection with one caller preamble line
//!   (`OPENSHELL-CALLER {"pid":..,"exe":..,"ancestors":[..]}\n`, at most
//!   [`identity::PREAMBLE_MAX`] bytes, validated, refused with 400 when
//!   malformed) and then relays the client's bytes.
//!
//! # Callers
//! On a TCP listener the caller is identified twice, when the connection is accepted and once
//! its request head is in ([`IdentityResolver::identify`], the same answer both times or a
//! deny), and, only if the policy allows the request, verified
//! ([`IdentityResolver::verify`]: executables' content, loaders, other holders of the socket).
//! [`procfs::ProcfsResolver`] credits the process that called `connect`, as the sandbox's
//! [`ProcessHistory`] recorded it. On a Unix listener the preamble names the caller (the guest
//! agent did the same work in the VM).
//!
//! # Requests
//! - `CONNECT host:port`: decided without L7 input (cached per caller, destination and policy
//!   generation). The decision says how it is carried ([`openshell_policy::ConnectMode`]): a
//!   plain `tunnel` to an endpoint without method/path rules; `terminate`, refused with its
//!   reason until termination exists; `deny` for an endpoint whose method/path rules a tunnel
//!   could not enforce (403, missing `tls`). A tunnel to a host name relays nothing until the
//!   client's TLS ClientHello names that host (SNI); to an address, a ClientHello must name
//!   none. A refused tunnel is one more decision record.
//! - `METHOD http://host[:port]/path`: the path normalised once (unreserved percent-encodings
//!   decoded, `//` collapsed; `;`, encoded `/` or `\\`, dot segments refused with 400),
//!   decided with `{method, path}` and sent upstream with that same path in origin form, with
//!   hop-by-hop headers removed and `Connection: close` (one request per connection; the client
//!   connection is closed after the response); a chunked body re-framed. `https://` in
//!   forward form gets 400.
//! - Malformed heads get 400 (431 when too large, 408 when too slow) and the
//!   connection is closed: bad CONNECT targets, duplicate Host,
//!   Content-Length with Transfer-Encoding, conflicting Content-Length,
//!   transfer codings other than `chunked`, bare LF.
//! - After an allow, the name is resolved once and the first address that
//!   passes the SSRF rules is the one connected to: loopback, RFC 1918,
//!   link-local (including 169.254.169.254), ULA, CGNAT, the other special-purpose ranges and
//!   the host's own addresses are refused unless the endpoint's `allowed_ips` covers the
//!   address; with `allowed_ips` set, the address must lie inside it.
//! - A deny is a 403 with a JSON body: `error`, `host`, `port`, `binary`,
//!   `missing`, `closest_policy`, `suggestion`, `reason`.
//! - Each decision is one `tracing` event with target `openshell::decision`
//!   (fields `sandbox src host port binary pid ancestors action policy
//!   reason generation method path cached`) and, with an audit log, the same
//!   as one JSON line (text fields cut at 1024 bytes, the file rotated at a size).
//! - A connection over the sandbox's limit is answered 503 by the accept loop and closed.
//!
//! # Approvals
//! An allow through an endpoint with `enforcement: ask` is held before anything is resolved
//! or sent upstream, unless an `allow-always` answer for that sandbox, policy, endpoint and
//! binary is in force: a question waits in [`Approvals`] (with [`ProxyConfig::approvals`];
//! without it the allow is a deny naming `--approval-listen`) until a person answers through
//! [`approval::http::serve`] or the timeout denies it. The caller of an approved TCP
//! connection is identified and verified once more before it goes on. A terminated CONNECT
//! that was approved carries its requests through that endpoint without asking again; a
//! request inside it that another ask endpoint allows asks with its method and path.
//!
//! # Live policy
//! [`PolicyHandle::update`] swaps the compiled policy atomically; the next
//! decision uses the new generation (the CONNECT cache is keyed by
//! generation). [`watch::watch_file`] and [`watch::poll_url`] feed it.
//! Invalid documents and changed static sections are refused and logged, and
//! the last good policy stays in force.
//!
//! **Open connections are not re-decided**: a CONNECT tunnel, or a forwarded
//! request in flight, was decided when it was opened and stays open after a
//! policy change, until either side closes it. Only new connections (and new
//! forwarded requests, which each use a new connection) see the change.
//! Stopping a listener's task (aborting the handle from `serve_*`) closes its
//! open connections.
//!
//! # Logging levels
//! `info`: decisions and policy updates. `warn`: refused updates, failed
//! fetches, connection limit reached. `debug`: malformed requests and relay
//! errors (the client already got its answer).

pub mod approval;
#[cfg(feature = "terminate")]
pub mod credentials;
mod decision;
mod http;
pub mod identity;
pub mod policy;
pub mod procfs;
mod server;
pub mod ssrf;
#[cfg(feature = "terminate")]
pub mod terminate;
mod tls;
#[cfg(feature = "watch")]
pub mod watch;

pub use approval::{Answer, AnswerError, ApprovalConfig, Approvals};
pub use decision::{AuditRotation, Decided, Decider};
pub use identity::{
    Caller, Connector, FixedIdentity, Identified, IdentityError, IdentityResolver, ProcKey,
    ProcessHistory,
};
pub use policy::{PolicyHandle, UpdateError};
pub use server::{Proxy, ProxyConfig, ProxyError, SandboxContext, ServeGuard};

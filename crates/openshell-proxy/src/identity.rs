//! Who opened a connection: the [`IdentityResolver`] seam, the [`ProcessHistory`] the
//! supervisor keeps, and the Unix listener's caller preamble.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use serde::Deserialize;

/// The process that opened a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    /// Process id as seen by whoever resolved it (host pid for the process
    /// backend, guest pid for the vm backend).
    pub pid: u32,
    /// Resolved executable path (never argv\[0\]).
    pub exe: PathBuf,
    /// Executables of its ancestors inside the sandbox, nearest first.
    pub ancestors: Vec<PathBuf>,
}

/// Why a caller could not be identified, or may not be credited. Every such connection is
/// denied; the message is the deny's reason.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No socket in the sandbox matches the connection.
    #[error("no socket in the sandbox matches connection from {peer}")]
    SocketNotFound {
        /// The connection's peer address.
        peer: SocketAddr,
    },
    /// The socket was found but no sandbox process holds it.
    #[error("no sandbox process holds socket inode {inode}")]
    ProcessNotFound {
        /// Inode of the socket.
        inode: u64,
    },
    /// The supervisor never saw a `connect` call for this socket.
    #[error("no record of which process connected socket inode {inode}")]
    NoConnector {
        /// Inode of the socket.
        inode: u64,
    },
    /// The process that called `connect` is gone.
    #[error("the process that opened the connection (pid {pid}) has exited")]
    ConnectorGone {
        /// Its pid.
        pid: u32,
    },
    /// The calling process is not what it was: it executed another program after it
    /// connected, or its identity changed between the connection and the request.
    #[error("the calling process changed: {0}")]
    Changed(String),
    /// The executable's loader was redirected, or the process runs code from a file the
    /// sandbox can write: it is not (only) that binary.
    #[error("{exe} does not run as itself: {why}")]
    Redirected {
        /// The executable path.
        exe: PathBuf,
        /// What was found.
        why: String,
    },
    /// The executable is too large to have its content checked.
    #[error(
        "{exe} is {size} bytes, above the {limit}-byte limit for checking an executable's content \
         (--identity-max-binary-mib)"
    )]
    TooLarge {
        /// The executable path.
        exe: PathBuf,
        /// Its size.
        size: u64,
        /// The limit in force.
        limit: u64,
    },
    /// Another program holds the connection's socket too.
    #[error("the connection's socket is also held by {exe} (pid {pid}), another program")]
    Shared {
        /// That process.
        pid: u32,
        /// Its executable.
        exe: PathBuf,
    },
    /// Checking would take more than the bounded work allowed per connection.
    #[error("too much to check: {0}")]
    TooMuch(String),
    /// Reading /proc failed.
    #[error("reading {path}")]
    Proc {
        /// The file or directory.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The executable at this path has different content than when it was
    /// first seen in this sandbox.
    #[error("binary content changed since first seen: {exe}")]
    BinaryChanged {
        /// The executable path.
        exe: PathBuf,
    },
    /// The resolver could not produce an answer for another reason.
    #[error("{0}")]
    Other(String),
}

/// A boxed future, as the [`IdentityResolver`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A process, named so that a reused pid is not mistaken for it: its pid and its start time
/// (clock ticks after boot, field 22 of `/proc/PID/stat`), which `exec` does not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcKey {
    /// Process id (thread group id).
    pub pid: u32,
    /// Start time.
    pub start: u64,
}

/// Who called `connect` on a socket, as the sandbox's supervisor saw the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connector {
    /// The calling process.
    pub process: ProcKey,
    /// Device and inode of its executable at the call.
    pub exe: (u64, u64),
    /// The history's sequence number at the call (see [`ProcessHistory::exec_seq`]).
    pub seq: u64,
}

/// What the supervisor saw the sandbox's processes do, in order: every `connect` to the proxy
/// and every `exec` (the process backend's supervisor and the guest agent each receive both
/// as seccomp notifications). It answers what /proc cannot: which process opened a socket,
/// and whether an ancestor already was the program it runs now when it created a descendant.
pub trait ProcessHistory: Send + Sync {
    /// Who connected the socket with this inode to the proxy.
    fn connector(&self, socket_inode: u64) -> Option<Connector>;
    /// Whether `parent` counts as the ancestor of `child` it is now: it has not started
    /// another program since `child` was created (nor while it had other threads that could
    /// have created children unseen).
    fn credits(&self, parent: ProcKey, child: ProcKey) -> bool;
    /// The sequence number of the process's last `exec`, 0 if none was seen. Numbers grow
    /// with every recorded event, so an exec after a connect has a larger number.
    fn exec_seq(&self, process: ProcKey) -> u64;
}

/// A process on the chain from the caller up: the caller first, then each ancestor that
/// counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    /// The process.
    pub process: ProcKey,
    /// Device and inode of its executable.
    pub exe_file: (u64, u64),
    /// Its exec sequence number when seen.
    pub exec_seq: u64,
}

/// A cheaply identified caller: enough to decide, and what [`IdentityResolver::verify`]
/// checks before the connection is credited. Two identifications of one connection compare
/// equal exactly when nothing about the caller changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identified {
    /// The caller as the policy sees it.
    pub caller: Caller,
    /// The processes behind it (empty for resolvers that name a fixed caller).
    pub chain: Vec<ChainEntry>,
    /// The socket's inode (0 when unknown).
    pub socket_inode: u64,
}

/// Finds the caller of a TCP connection accepted by the proxy. The proxy identifies each
/// connection when it is accepted and again once the request head is in (a difference is a
/// deny), decides, and only for an allow asks for the expensive checks ([`verify`]).
///
/// [`verify`]: IdentityResolver::verify
pub trait IdentityResolver: Send + Sync {
    /// `peer` is the client's address (inside the sandbox), `local` the proxy's address the
    /// client connected to. Bounded work: no content hashing, no scan of other processes'
    /// descriptors.
    fn identify(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> BoxFuture<'_, Result<Identified, IdentityError>>;

    /// Check what an allow rests on: executables' content (size-capped), loaders, and that
    /// no other program holds the socket. Returns the caller that may be credited: ancestors
    /// that fail their checks are left out (the caller failing is an error).
    fn verify<'a>(
        &'a self,
        identified: &'a Identified,
    ) -> BoxFuture<'a, Result<Caller, IdentityError>>;
}

/// A resolver that names the same caller for every connection (tests, and
/// sandboxes where only one executable can run).
#[derive(Debug, Clone)]
pub struct FixedIdentity(pub Caller);

impl IdentityResolver for FixedIdentity {
    fn identify(
        &self,
        _peer: SocketAddr,
        _local: SocketAddr,
    ) -> BoxFuture<'_, Result<Identified, IdentityError>> {
        let identified = Identified {
            caller: self.0.clone(),
            chain: Vec::new(),
            socket_inode: 0,
        };
        Box::pin(std::future::ready(Ok(identified)))
    }

    fn verify<'a>(
        &'a self,
        identified: &'a Identified,
    ) -> BoxFuture<'a, Result<Caller, IdentityError>> {
        Box::pin(std::future::ready(Ok(identified.caller.clone())))
    }
}

/// The first line a guest agent sends on each Unix-socket connection:
/// `OPENSHELL-CALLER {"pid":123,"exe":"/usr/bin/curl","ancestors":["/usr/bin/bash"]}\n`,
/// followed by the client's HTTP request bytes.
pub const PREAMBLE_PREFIX: &str = "OPENSHELL-CALLER ";

/// Largest accepted preamble line, newline included.
pub const PREAMBLE_MAX: usize = 4096;

/// Most ancestors a preamble may name.
pub const PREAMBLE_MAX_ANCESTORS: usize = 64;

/// A malformed caller preamble.
#[derive(Debug, thiserror::Error)]
pub enum PreambleError {
    /// The line does not start with [`PREAMBLE_PREFIX`].
    #[error("caller preamble must start with {PREAMBLE_PREFIX:?}")]
    Prefix,
    /// No newline within [`PREAMBLE_MAX`] bytes.
    #[error("caller preamble longer than {PREAMBLE_MAX} bytes")]
    TooLong,
    /// The JSON is not a caller record.
    #[error("caller preamble is not valid caller json")]
    Json(#[source] serde_json::Error),
    /// A field is out of range.
    #[error("caller preamble: {0}")]
    Invalid(&'static str),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireCaller {
    pid: u32,
    exe: String,
    #[serde(default)]
    ancestors: Vec<String>,
}

fn valid_exe(p: &str) -> bool {
    !p.is_empty() && p.len() <= 1024 && Path::new(p).is_absolute() && !p.contains('\0')
}

/// Parse and validate one preamble line (without its newline).
pub fn parse_preamble(line: &[u8]) -> Result<Caller, PreambleError> {
    if line.len() >= PREAMBLE_MAX {
        return Err(PreambleError::TooLong);
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let json = line
        .strip_prefix(PREAMBLE_PREFIX.as_bytes())
        .ok_or(PreambleError::Prefix)?;
    let wire: WireCaller = serde_json::from_slice(json).map_err(PreambleError::Json)?;
    if wire.pid == 0 {
        return Err(PreambleError::Invalid("pid must not be 0"));
    }
    if !valid_exe(&wire.exe) {
        return Err(PreambleError::Invalid("exe must be an absolute path"));
    }
    if wire.ancestors.len() > PREAMBLE_MAX_ANCESTORS {
        return Err(PreambleError::Invalid("too many ancestors"));
    }
    if !wire.ancestors.iter().all(|a| valid_exe(a)) {
        return Err(PreambleError::Invalid(
            "every ancestor must be an absolute path",
        ));
    }
    Ok(Caller {
        pid: wire.pid,
        exe: PathBuf::from(wire.exe),
        ancestors: wire.ancestors.into_iter().map(PathBuf::from).collect(),
    })
}

/// Render a preamble line (with its newline) for a guest agent or a test.
pub fn render_preamble(caller: &Caller) -> String {
    let json = serde_json::json!({
        "pid": caller.pid,
        "exe": caller.exe.to_string_lossy(),
        "ancestors": caller.ancestors.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>(),
    });
    format!("{PREAMBLE_PREFIX}{json}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn preamble_round_trip() {
        let caller = Caller {
            pid: 42,
            exe: "/usr/bin/curl".into(),
            ancestors: vec!["/usr/bin/bash".into()],
        };
        let line = render_preamble(&caller);
        let parsed = parse_preamble(line.trim_end().as_bytes()).map_err(|e| e.to_string());
        assert_eq!(parsed, Ok(caller));
    }

    #[test]
    fn preamble_rejects() {
        let cases: Vec<(&[u8], &str)> = vec![
            (
                b"HELLO {}",
                "caller preamble must start with \"OPENSHELL-CALLER \"",
            ),
            (
                b"OPENSHELL-CALLER {",
                "caller preamble is not valid caller json",
            ),
            (
                b"OPENSHELL-CALLER {\"pid\":1,\"exe\":\"curl\"}",
                "caller preamble: exe must be an absolute path",
            ),
            (
                b"OPENSHELL-CALLER {\"pid\":0,\"exe\":\"/c\"}",
                "caller preamble: pid must not be 0",
            ),
            (
                b"OPENSHELL-CALLER {\"pid\":1,\"exe\":\"/c\",\"x\":1}",
                "caller preamble is not valid caller json",
            ),
            (
                b"OPENSHELL-CALLER {\"pid\":1,\"exe\":\"/c\",\"ancestors\":[\"b\"]}",
                "caller preamble: every ancestor must be an absolute path",
            ),
        ];
        for (line, want) in cases {
            let got = parse_preamble(line).map(|_| ()).map_err(|e| e.to_string());
            assert_eq!(
                got,
                Err(want.to_string()),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }
}

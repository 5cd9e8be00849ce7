//! Who opened a connection: the [`IdentityResolver`] seam and the Unix
//! listener's caller preamble.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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

/// Why a caller could not be identified. Every such connection is denied.
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

/// Finds the caller of a TCP connection accepted by the proxy.
pub trait IdentityResolver: Send + Sync {
    /// `peer` is the client's address (inside the sandbox), `local` the
    /// proxy's address the client connected to. Called on a blocking thread.
    fn resolve(&self, peer: SocketAddr, local: SocketAddr) -> Result<Caller, IdentityError>;
}

/// A resolver that names the same caller for every connection (tests, and
/// sandboxes where only one executable can run).
#[derive(Debug, Clone)]
pub struct FixedIdentity(pub Caller);

impl IdentityResolver for FixedIdentity {
    fn resolve(&self, _peer: SocketAddr, _local: SocketAddr) -> Result<Caller, IdentityError> {
        Ok(self.0.clone())
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

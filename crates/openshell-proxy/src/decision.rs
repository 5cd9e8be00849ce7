//! Decisions: the Rego call with the CONNECT cache ([`Decider`]), the
//! structured event and the audit log line.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use openshell_policy::{Decision, DecisionInput, ExecInfo, HttpRequest, NetworkTarget, RegoError};

use crate::identity::Caller;
use crate::policy::PolicyHandle;

/// Most cached decisions; the cache is emptied when full (old generations
/// are dead entries anyway).
const CACHE_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    pub(crate) binary: PathBuf,
    pub(crate) ancestors: Vec<PathBuf>,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) generation: u64,
}

/// Rego answers for CONNECT (no L7 input), keyed by caller, destination and
/// policy generation.
#[derive(Default)]
pub(crate) struct DecisionCache {
    map: Mutex<HashMap<CacheKey, Decision>>,
}

impl DecisionCache {
    pub(crate) fn get(&self, key: &CacheKey) -> Option<Decision> {
        self.map.lock().ok()?.get(key).cloned()
    }

    pub(crate) fn insert(&self, key: CacheKey, decision: Decision) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= CACHE_MAX {
                map.clear();
            }
            map.insert(key, decision);
        }
    }
}

/// The Rego step of the proxy: the live policy and the CONNECT decision
/// cache, exactly as the proxy uses them for every connection and request
/// (public so benchmarks measure the proxy's own path).
pub struct Decider {
    policy: PolicyHandle,
    cache: DecisionCache,
}

/// What [`Decider::decide`] found.
#[derive(Debug)]
pub struct Decided {
    /// The engine's answer, or why evaluation failed.
    pub decision: Result<Decision, RegoError>,
    /// The answer came from the CONNECT cache.
    pub cached: bool,
    /// Policy generation the decision was made with.
    pub generation: u64,
}

impl std::fmt::Debug for Decider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decider")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Decider {
    /// A decider with an empty cache.
    pub fn new(policy: PolicyHandle) -> Self {
        Self {
            policy,
            cache: DecisionCache::default(),
        }
    }

    /// The policy handle decisions are made with.
    pub fn policy(&self) -> &PolicyHandle {
        &self.policy
    }

    /// Decide `caller` reaching `host:port` with the policy in force.
    /// `host` must already be normalised
    /// ([`openshell_policy::types::normalise_host`]). Without `request` (a
    /// CONNECT tunnel) the answer is cached per caller, destination and
    /// policy generation; requests with L7 input always run Rego.
    pub fn decide(
        &self,
        caller: &Caller,
        host: &str,
        port: u16,
        request: Option<HttpRequest>,
    ) -> Decided {
        let snapshot = self.policy.snapshot();
        let generation = snapshot.generation;
        let key = request.is_none().then(|| CacheKey {
            binary: caller.exe.clone(),
            ancestors: caller.ancestors.clone(),
            host: host.to_string(),
            port,
            generation,
        });
        if let Some(decision) = key.as_ref().and_then(|k| self.cache.get(k)) {
            return Decided {
                decision: Ok(decision),
                cached: true,
                generation,
            };
        }
        let input = DecisionInput {
            exec: ExecInfo {
                path: caller.exe.to_string_lossy().into_owned(),
                ancestors: caller
                    .ancestors
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect(),
            },
            network: NetworkTarget {
                host: host.to_string(),
                port,
            },
            request,
        };
        let decision = snapshot.decide(&input);
        if let (Ok(d), Some(k)) = (&decision, key) {
            self.cache.insert(k, d.clone());
        }
        Decided {
            decision,
            cached: false,
            generation,
        }
    }
}

/// `allow`, `deny` or `audit` (allowed only because the endpoint audits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Allow,
    Deny,
    Audit,
}

impl Action {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
            Action::Audit => "audit",
        }
    }
}

/// Everything one decision event says.
#[derive(Debug, Clone)]
pub(crate) struct Record<'a> {
    pub(crate) sandbox: &'a str,
    pub(crate) src: &'a str,
    pub(crate) host: &'a str,
    pub(crate) port: u16,
    pub(crate) binary: &'a str,
    pub(crate) pid: u32,
    pub(crate) ancestors: &'a [String],
    pub(crate) action: Action,
    pub(crate) policy: Option<&'a str>,
    pub(crate) reason: &'a str,
    pub(crate) generation: u64,
    pub(crate) method: Option<&'a str>,
    pub(crate) path: Option<&'a str>,
    pub(crate) cached: bool,
}

impl Record<'_> {
    /// The one structured event (target `openshell::decision`).
    pub(crate) fn emit(&self) {
        tracing::info!(
            target: "openshell::decision",
            sandbox = self.sandbox,
            src = self.src,
            host = self.host,
            port = self.port,
            binary = self.binary,
            pid = self.pid,
            ancestors = ?self.ancestors,
            action = self.action.as_str(),
            policy = self.policy.unwrap_or(""),
            reason = self.reason,
            generation = self.generation,
            method = self.method.unwrap_or(""),
            path = self.path.unwrap_or(""),
            cached = self.cached,
            "egress decision"
        );
    }

    /// The same fields as one JSON object.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        serde_json::json!({
            "ts": ts,
            "sandbox": self.sandbox,
            "src": self.src,
            "host": self.host,
            "port": self.port,
            "binary": self.binary,
            "pid": self.pid,
            "ancestors": self.ancestors,
            "action": self.action.as_str(),
            "policy": self.policy,
            "reason": self.reason,
            "generation": self.generation,
            "method": self.method,
            "path": self.path,
        })
    }
}

/// Appends decision records as JSON lines.
pub(crate) struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    /// Open (or create, mode 0600) the log for appending. The proxy runs as root: the last
    /// component is never followed (`O_NOFOLLOW`), and anything but a regular file is refused,
    /// so a planted symlink or FIFO cannot make it write elsewhere or hang. `O_NONBLOCK` keeps
    /// the open of a FIFO from blocking; it has no effect on a regular file.
    pub(crate) fn open(path: PathBuf) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .map_err(|e| match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_symlink() => std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "is a symbolic link; it is never followed",
                ),
                // A FIFO without a reader, or a socket, answers ENXIO.
                Ok(m) if !m.is_file() && !m.is_dir() => not_a_file(),
                _ => e,
            })?;
        if !file.metadata()?.is_file() {
            return Err(not_a_file());
        }
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// One line per record, written with a single `write_all` on an
    /// `O_APPEND` file.
    pub(crate) fn append(&self, record: &Record<'_>) {
        let mut line = record.to_json().to_string();
        line.push('\n');
        let result = match self.file.lock() {
            Ok(mut file) => file.write_all(line.as_bytes()),
            Err(_) => Err(std::io::Error::other("audit log lock poisoned")),
        };
        if let Err(error) = result {
            tracing::warn!(path = %self.path.display(), %error, "cannot append to the audit log");
        }
    }
}

fn not_a_file() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file")
}

/// The 403 body for a deny.
pub(crate) fn deny_body(
    host: &str,
    port: u16,
    binary: &str,
    decision: &Decision,
    reason: &str,
) -> serde_json::Value {
    serde_json::json!({
        "error": "policy_denied",
        "host": host,
        "port": port,
        "binary": binary,
        "missing": decision.missing,
        "closest_policy": decision.closest_policy,
        "suggestion": decision.suggestion,
        "reason": reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_audit_log_is_a_regular_file_never_reached_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let p = |name: &str| dir.path().join(name);
        std::fs::write(p("canary"), "canary\n").unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink(p("canary"), p("link")).unwrap_or_else(|e| panic!("{e}"));
        // mkfifo(1): this crate has no unsafe and no nix.
        let made = std::process::Command::new("mkfifo")
            .arg(p("fifo"))
            .status()
            .unwrap_or_else(|e| panic!("mkfifo: {e}"));
        assert!(made.success(), "mkfifo");
        let got = [
            AuditLog::open(p("link"))
                .map(drop)
                .map_err(|e| e.to_string()),
            AuditLog::open(p("fifo"))
                .map(drop)
                .map_err(|e| e.to_string()),
            AuditLog::open(p("new.jsonl"))
                .map(drop)
                .map_err(|e| e.to_string()),
        ];
        let want = [
            Err("is a symbolic link; it is never followed".to_owned()),
            Err("not a regular file".to_owned()),
            Ok(()),
        ];
        assert_eq!(got.to_vec(), want.to_vec());
        assert_eq!(
            std::fs::read_to_string(p("canary")).unwrap_or_default(),
            "canary\n"
        );
        let mode = std::fs::metadata(p("new.jsonl"))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_default();
        assert_eq!(mode, 0o600);
    }
}

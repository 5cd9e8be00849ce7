//! Decisions: the CONNECT cache, the structured event and the audit log line.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use openshell_policy::Decision;

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
    pub(crate) fn open(path: PathBuf) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
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

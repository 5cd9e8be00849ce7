//! Decisions: the Rego call with its decision cache ([`Decider`]), the
//! structured event and the audit log line.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use openshell_policy::{
    Decision, DecisionInput, Endpoint, Enforcement, ExecInfo, HttpRequest, NetworkTarget, RegoError,
};

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
    /// The request's method and (normalised) path; `None` for a CONNECT.
    pub(crate) request: Option<(String, String)>,
    pub(crate) generation: u64,
}

/// Rego answers, keyed by everything the engine is given (caller, destination, the request's
/// method and normalised path) and the policy generation: the engine is a function of its
/// input and the policy, so a hit is the answer Rego would give.
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
    /// The answer came from the decision cache.
    pub cached: bool,
    /// Policy generation the decision was made with.
    pub generation: u64,
    /// For an allow through an `enforcement: ask` endpoint: that endpoint, as it is in that
    /// generation (what an `allow-always` answer is kept for).
    pub asked: Option<Endpoint>,
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
    /// ([`openshell_policy::types::normalise_host`]), and a request's path too. The answer is
    /// cached per caller, destination, request (method and path) and policy generation.
    pub fn decide(
        &self,
        caller: &Caller,
        host: &str,
        port: u16,
        request: Option<HttpRequest>,
    ) -> Decided {
        let snapshot = self.policy.snapshot();
        let generation = snapshot.generation;
        let key = CacheKey {
            binary: caller.exe.clone(),
            ancestors: caller.ancestors.clone(),
            host: host.to_string(),
            port,
            request: request.as_ref().map(|r| (r.method.clone(), r.path.clone())),
            generation,
        };
        let asked = |d: &Decision| match (d.allow, d.enforcement, &d.policy, d.endpoint) {
            (true, Enforcement::Ask, Some(key), Some(index)) => {
                snapshot.endpoint(key, index).cloned()
            }
            _ => None,
        };
        if let Some(decision) = self.cache.get(&key) {
            return Decided {
                asked: asked(&decision),
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
        if let Ok(d) = &decision {
            self.cache.insert(key, d.clone());
        }
        Decided {
            asked: decision.as_ref().ok().and_then(asked),
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
    /// The approval question this connection or request waited on.
    pub(crate) approval: Option<&'a str>,
}

/// Longest text of one field in a decision event or audit line, in bytes; longer text is
/// cut at a character boundary and marked (a sandbox chooses host names, paths and binary
/// names, so it must not be able to make one line arbitrarily long).
pub(crate) const FIELD_MAX: usize = 1024;
/// Most ancestors written in one event.
pub(crate) const ANCESTORS_MAX: usize = 64;

/// `text`, cut to [`FIELD_MAX`] bytes.
pub(crate) fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    if text.len() <= FIELD_MAX {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut end = FIELD_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{}...[{} more bytes]",
        &text[..end],
        text.len() - end
    ))
}

impl Record<'_> {
    fn ancestors_clipped(&self) -> Vec<std::borrow::Cow<'_, str>> {
        self.ancestors
            .iter()
            .take(ANCESTORS_MAX)
            .map(|a| clip(a))
            .collect()
    }

    /// The one structured event (target `openshell::decision`).
    pub(crate) fn emit(&self) {
        tracing::info!(
            target: "openshell::decision",
            sandbox = self.sandbox,
            src = self.src,
            host = %clip(self.host),
            port = self.port,
            binary = %clip(self.binary),
            pid = self.pid,
            ancestors = ?self.ancestors_clipped(),
            action = self.action.as_str(),
            policy = %clip(self.policy.unwrap_or("")),
            reason = %clip(self.reason),
            generation = self.generation,
            method = %clip(self.method.unwrap_or("")),
            path = %clip(self.path.unwrap_or("")),
            cached = self.cached,
            approval = %self.approval.unwrap_or(""),
            "egress decision"
        );
    }

    /// The same fields as one JSON object, each text field cut to [`FIELD_MAX`] bytes.
    pub(crate) fn to_json(&self) -> serde_json::Value {
        let ts = now_ts();
        let mut line = serde_json::json!({
            "ts": ts,
            "sandbox": clip(self.sandbox),
            "src": clip(self.src),
            "host": clip(self.host),
            "port": self.port,
            "binary": clip(self.binary),
            "pid": self.pid,
            "ancestors": self.ancestors_clipped(),
            "action": self.action.as_str(),
            "policy": self.policy.map(clip),
            "reason": clip(self.reason),
            "generation": self.generation,
            "method": self.method.map(clip),
            "path": self.path.map(clip),
        });
        if let (Some(id), Some(map)) = (self.approval, line.as_object_mut()) {
            map.insert("approval".into(), serde_json::Value::from(clip(id)));
        }
        line
    }
}

/// Seconds since the epoch, for audit lines.
pub(crate) fn now_ts() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Appends decision records as JSON lines, rotating the file at a size: when a line would
/// take it past `max_bytes`, `FILE.(keep-1)` becomes `FILE.keep` (the oldest is dropped), ...,
/// `FILE` becomes `FILE.1`, and a new `FILE` is created. Rotation renames within the file's
/// directory, which the supervisor already refuses to be within the workload's reach.
pub(crate) struct AuditLog {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Mutex<Open>,
}

struct Open {
    file: std::fs::File,
    size: u64,
}

/// How an audit log is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRotation {
    /// Size at which the file is rotated (at least 4096 bytes).
    pub max_bytes: u64,
    /// Rotated files kept (`FILE.1` .. `FILE.keep`), at least 1.
    pub keep: u32,
}

impl Default for AuditRotation {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            keep: 3,
        }
    }
}

impl AuditLog {
    /// Open (or create, mode 0600) the log for appending. The proxy runs as root: the last
    /// component is never followed (`O_NOFOLLOW`), and anything but a regular file is refused,
    /// so a planted symlink or FIFO cannot make it write elsewhere or hang. `O_NONBLOCK` keeps
    /// the open of a FIFO from blocking; it has no effect on a regular file.
    pub(crate) fn open(path: PathBuf, rotation: AuditRotation) -> std::io::Result<Self> {
        let file = open_log(&path, false)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path,
            max_bytes: rotation.max_bytes.max(4096),
            keep: rotation.keep.max(1),
            file: Mutex::new(Open { file, size }),
        })
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Shift the rotated files, move the log to `.1` and start a new one.
    fn rotate(&self, open: &mut Open) -> std::io::Result<()> {
        for n in (1..self.keep).rev() {
            match std::fs::rename(self.rotated(n), self.rotated(n + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        open.file = open_log(&self.path, true)?;
        open.size = 0;
        Ok(())
    }

    /// One line per record, written with a single `write_all` on an `O_APPEND` file.
    pub(crate) fn append(&self, record: &Record<'_>) {
        self.append_value(&record.to_json());
    }

    /// One JSON object as one line (its text fields already clipped).
    pub(crate) fn append_value(&self, value: &serde_json::Value) {
        let mut line = value.to_string();
        line.push('\n');
        let mut open = match self.file.lock() {
            Ok(open) => open,
            Err(_) => {
                tracing::warn!(path = %self.path.display(), "audit log lock poisoned");
                return;
            }
        };
        if open.size > 0 && open.size + line.len() as u64 > self.max_bytes {
            if let Err(error) = self.rotate(&mut open) {
                tracing::warn!(path = %self.path.display(), %error, "cannot rotate the audit log; appending to it");
            }
        }
        match open.file.write_all(line.as_bytes()) {
            Ok(()) => open.size += line.len() as u64,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "cannot append to the audit log");
            }
        }
    }
}

/// Open the log: appending, never through a symlink, a regular file only; `fresh` (after a
/// rotation) creates it and fails if something is already there.
fn open_log(path: &std::path::Path, fresh: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY);
    if fresh {
        options.create_new(true);
    } else {
        options.create(true);
    }
    let file = options
        .open(path)
        .map_err(|e| match std::fs::symlink_metadata(path) {
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
    Ok(file)
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

    /// A cached answer is the one Rego gives for that exact request: another path, method or
    /// policy generation is decided afresh.
    #[test]
    fn requests_are_cached_per_method_path_and_generation() {
        let text = "version: 1\nnetwork_policies:\n  api:\n    endpoints:\n      - host: api.example\n        port: 80\n        rules:\n          - allow: { method: GET, path: \"/public/**\" }\n    binaries: [{ path: /usr/bin/curl }]\n";
        let policy =
            openshell_policy::Policy::from_yaml("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        let handle = PolicyHandle::new(policy).unwrap_or_else(|e| panic!("{e}"));
        let decider = Decider::new(handle.clone());
        let curl = Caller {
            pid: 1,
            exe: "/usr/bin/curl".into(),
            ancestors: Vec::new(),
        };
        let ask = |method: &str, path: &str| {
            let d = decider.decide(
                &curl,
                "api.example",
                80,
                Some(HttpRequest {
                    method: method.into(),
                    path: path.into(),
                }),
            );
            (d.decision.map(|d| d.allow).unwrap_or(false), d.cached)
        };
        let first = [
            ask("GET", "/public/a"),
            ask("GET", "/private"),
            ask("POST", "/public/a"),
        ];
        let again = [
            ask("GET", "/public/a"),
            ask("GET", "/private"),
            ask("POST", "/public/a"),
        ];
        assert_eq!(
            (first, again),
            (
                [(true, false), (false, false), (false, false)],
                [(true, true), (false, true), (false, true)]
            )
        );
        let closed = text.replace("/public/**", "/nothing");
        handle
            .update_yaml("p.yaml", &closed)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ask("GET", "/public/a"), (false, false));
    }

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
            AuditLog::open(p("link"), AuditRotation::default())
                .map(drop)
                .map_err(|e| e.to_string()),
            AuditLog::open(p("fifo"), AuditRotation::default())
                .map(drop)
                .map_err(|e| e.to_string()),
            AuditLog::open(p("new.jsonl"), AuditRotation::default())
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

    fn record<'a>(host: &'a str, ancestors: &'a [String]) -> Record<'a> {
        Record {
            sandbox: "s",
            src: "10.200.0.2:1",
            host,
            port: 443,
            binary: "/usr/bin/curl",
            pid: 7,
            ancestors,
            action: Action::Deny,
            policy: None,
            reason: "r",
            generation: 1,
            method: None,
            path: None,
            cached: false,
            approval: None,
        }
    }

    #[test]
    fn audit_fields_are_truncated() {
        let long = "h".repeat(5000);
        let ancestors: Vec<String> = (0..100).map(|i| format!("/bin/{i}")).collect();
        let json = record(&long, &ancestors).to_json();
        assert_eq!(
            json["host"].as_str().map(str::len),
            Some(FIELD_MAX + "...[3976 more bytes]".len())
        );
        assert_eq!(
            json["ancestors"].as_array().map(Vec::len),
            Some(ANCESTORS_MAX)
        );
        assert_eq!(
            clip("é".repeat(600).as_str()).len(),
            1024 + "...[176 more bytes]".len()
        );
    }

    #[test]
    fn the_audit_log_rotates_at_its_size() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(
            path.clone(),
            AuditRotation {
                max_bytes: 4096,
                keep: 2,
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let host = "x".repeat(900);
        for _ in 0..40 {
            log.append(&record(&host, &[]));
        }
        let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let lines = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
                .count()
        };
        let names = [
            "audit.jsonl",
            "audit.jsonl.1",
            "audit.jsonl.2",
            "audit.jsonl.3",
        ]
        .map(|n| dir.path().join(n));
        // Every file within the size, whole lines only, the oldest beyond `keep` gone.
        assert_eq!(
            names
                .iter()
                .map(|p| (size(p) <= 4096, p.exists()))
                .collect::<Vec<_>>(),
            vec![(true, true), (true, true), (true, true), (true, false)]
        );
        assert_eq!((lines(&names[1]), lines(&names[2])), (3, 3));
        let mode = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or_default();
        assert_eq!(mode, 0o600);
    }
}

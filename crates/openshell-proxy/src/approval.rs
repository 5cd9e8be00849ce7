//! Approvals for endpoints with `enforcement: ask`.
//!
//! A connection (or request) that the policy allows only through an ask endpoint is held
//! while its question waits here ([`Approvals::ask`] gives the held task a [`Ticket`]). A
//! person answers through the loopback HTTP endpoint ([`http::serve`]):
//! - `allow-once`: the connections waiting on that question go on; the next one asks again;
//! - `allow-always`: the same, and a grant for that sandbox, policy, endpoint and binary is
//!   kept with the live policy ([`crate::PolicyHandle`]) for the sandbox's lifetime, dropped
//!   by a live update that removes or changes the endpoint;
//! - `deny`.
//!
//! No answer within the timeout is a deny. A question asked while an identical one (same
//! sandbox, process, binary and ancestry, destination, method, path and query, policy,
//! endpoint and generation) is pending joins it, and one answer settles both: an answer is
//! only ever given to what the person was shown. At most `max_pending` questions wait at
//! once, and at most [`PER_PROCESS_MAX`] of them from one process; beyond that a question is
//! refused (a deny). A question whose every waiting
//! connection went away (the client closed it, or the sandbox ended) is withdrawn.
//!
//! Every question and every settlement is one structured event (target
//! `openshell::decision`, `event` `approval.question` or `approval.answer`) and, with an
//! audit log, one JSON line with the same `event` field.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openshell_policy::Endpoint;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::decision::{clip, now_ts, AuditLog, ANCESTORS_MAX};
use crate::policy::{Grant, PolicyHandle};

#[path = "approval_http.rs"]
pub mod http;

/// Most questions one process (one sandbox's pid) may have pending at once, so that one
/// process cannot fill the queue and crowd out the others' questions.
pub const PER_PROCESS_MAX: usize = 8;

/// How questions are asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApprovalConfig {
    /// How long a question waits for an answer before it is a deny.
    pub timeout: Duration,
    /// Most questions pending at once (per proxy); more are refused.
    pub max_pending: usize,
}

impl Default for ApprovalConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            max_pending: 64,
        }
    }
}

/// A person's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Answer {
    /// The connections waiting on this question go on.
    AllowOnce,
    /// As `AllowOnce`, and the binary may use this endpoint without asking for the sandbox's
    /// lifetime (while the endpoint stays in the policy).
    AllowAlways,
    /// The connections waiting on this question are refused.
    Deny,
}

impl Answer {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllowOnce => "allow-once",
            Self::AllowAlways => "allow-always",
            Self::Deny => "deny",
        }
    }
}

/// How a question ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// A person answered.
    Answered(Answer),
    /// Nobody answered in time.
    Timeout,
    /// Every connection waiting on it went away.
    Withdrawn,
}

impl Settled {
    fn as_str(self) -> &'static str {
        match self {
            Self::Answered(a) => a.as_str(),
            Self::Timeout => "timeout",
            Self::Withdrawn => "withdrawn",
        }
    }

    pub(crate) fn allows(self) -> bool {
        matches!(
            self,
            Self::Answered(Answer::AllowOnce | Answer::AllowAlways)
        )
    }
}

/// Why an answer was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// No question has this id.
    #[error("no question {0}")]
    Unknown(String),
    /// The question was settled before this answer came.
    #[error("question {id} is no longer pending: {how}")]
    Settled {
        /// The question.
        id: String,
        /// `allow-once`, `allow-always`, `deny`, `timeout` or `withdrawn`.
        how: &'static str,
    },
}

/// What a held connection asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Question {
    pub(crate) sandbox: String,
    pub(crate) binary: PathBuf,
    pub(crate) pid: u32,
    pub(crate) ancestors: Vec<String>,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) method: Option<String>,
    pub(crate) path: Option<String>,
    /// The query string (without `?`), shown so the person sees the whole request.
    pub(crate) query: Option<String>,
    /// The key of the policy whose ask endpoint allowed it.
    pub(crate) policy: String,
    /// That endpoint's index in the policy, and the endpoint itself.
    pub(crate) endpoint_index: usize,
    pub(crate) endpoint: Endpoint,
    pub(crate) generation: u64,
}

impl Question {
    /// Identical questions share one pending entry: everything the person is shown is the
    /// same (another process, ancestry or query is another question).
    fn same_as(&self, other: &Question) -> bool {
        self.sandbox == other.sandbox
            && self.pid == other.pid
            && self.ancestors == other.ancestors
            && self.query == other.query
            && self.binary == other.binary
            && self.host == other.host
            && self.port == other.port
            && self.method == other.method
            && self.path == other.path
            && self.policy == other.policy
            && self.endpoint_index == other.endpoint_index
            && self.generation == other.generation
    }

    /// The grant an `allow-always` answer to this question records.
    pub(crate) fn grant(&self) -> Grant {
        Grant {
            sandbox: self.sandbox.clone(),
            policy: self.policy.clone(),
            endpoint: self.endpoint.clone(),
            binary: self.binary.clone(),
        }
    }

    /// `GET /path?query`, or `connection` for a CONNECT.
    fn request_text(&self) -> String {
        match (&self.method, &self.path, &self.query) {
            (Some(m), Some(p), Some(q)) => format!("{m} {p}?{q}"),
            (Some(m), Some(p), None) => format!("{m} {p}"),
            _ => "connection".to_string(),
        }
    }

    /// The endpoint as the policy writes it: its host (or `*` for a hostless one) and ports.
    fn endpoint_json(&self) -> serde_json::Value {
        serde_json::json!({
            "index": self.endpoint_index,
            "host": self.endpoint.host.as_ref().map(|h| clip(h.as_str()).into_owned()),
            "ports": self.endpoint.ports.iter().map(|p| p.get()).collect::<Vec<_>>(),
        })
    }

    /// The fields every line about this question carries.
    fn json(&self, id: &str) -> serde_json::Value {
        serde_json::json!({
            "id": id,
            "sandbox": clip(&self.sandbox),
            "binary": clip(&self.binary.to_string_lossy()),
            "pid": self.pid,
            "ancestors": self.ancestors.iter().take(ANCESTORS_MAX).map(|a| clip(a)).collect::<Vec<_>>(),
            "host": clip(&self.host),
            "port": self.port,
            "method": self.method.as_deref().map(clip),
            "path": self.path.as_deref().map(clip),
            "query": self.query.as_deref().map(clip),
            "policy": clip(&self.policy),
            "endpoint": self.endpoint_json(),
            "generation": self.generation,
        })
    }
}

struct Pending {
    id: String,
    question: Question,
    /// Seconds since the epoch.
    asked_at: f64,
    deadline: Instant,
    tx: watch::Sender<Option<Settled>>,
    /// Tickets not yet dropped.
    waiters: usize,
}

/// Ids of recently settled questions, so that a late answer gets 409 rather than 404.
const SETTLED_KEPT: usize = 256;

struct State {
    pending: Vec<Pending>,
    settled: VecDeque<(String, &'static str)>,
    counter: u64,
}

struct Shared {
    config: ApprovalConfig,
    state: Mutex<State>,
    policy: PolicyHandle,
    audit: Option<Arc<AuditLog>>,
    /// Keys the ids (SipHash with this process's random keys over a counter): unique, and
    /// not guessable from outside.
    ids: std::collections::hash_map::RandomState,
}

/// The questions of one proxy. Cloning gives another handle to the same questions.
#[derive(Clone)]
pub struct Approvals {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// A held connection's place in a question. Dropping it before the question is settled
/// leaves the question (which is withdrawn when nobody waits on it any more).
pub(crate) struct Ticket {
    approvals: Approvals,
    id: String,
    rx: watch::Receiver<Option<Settled>>,
    deadline: Instant,
}

impl Ticket {
    /// The question's id.
    pub(crate) fn id(&self) -> &str {
        &self.id
    }

    /// Wait for the answer, or the timeout.
    pub(crate) async fn wait(&mut self) -> Settled {
        let mut expired = false;
        loop {
            if let Some(settled) = *self.rx.borrow_and_update() {
                return settled;
            }
            let changed = if expired {
                self.rx.changed().await
            } else {
                tokio::select! {
                    changed = self.rx.changed() => changed,
                    () = tokio::time::sleep_until(self.deadline) => {
                        // Settles it as a timeout unless something else settled it first;
                        // either way the value arrives on the channel.
                        self.approvals.expire(&self.id);
                        expired = true;
                        continue;
                    }
                }
            };
            if changed.is_err() {
                // Every removal sends before the sender goes; a closed channel without a
                // value would otherwise never end.
                return (*self.rx.borrow()).unwrap_or(Settled::Withdrawn);
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.approvals.leave(&self.id);
    }
}

impl Approvals {
    /// Questions answered through [`http::serve`]; `allow-always` answers are kept in
    /// `policy`; questions and answers are appended to `audit`.
    pub(crate) fn new(
        config: ApprovalConfig,
        policy: PolicyHandle,
        audit: Option<Arc<AuditLog>>,
    ) -> Self {
        if let Some(audit) = &audit {
            policy.audit_grants_to(Arc::clone(audit));
        }
        Self {
            shared: Arc::new(Shared {
                config,
                state: Mutex::new(State {
                    pending: Vec::new(),
                    settled: VecDeque::new(),
                    counter: 0,
                }),
                policy,
                audit,
                ids: std::collections::hash_map::RandomState::new(),
            }),
        }
    }

    /// How questions are asked.
    pub fn config(&self) -> ApprovalConfig {
        self.shared.config
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Ask `question`, or join the identical one already pending. `Err` is the reason it
    /// was refused (too many pending).
    pub(crate) fn ask(&self, question: Question) -> Result<Ticket, String> {
        let mut state = self.state();
        if let Some(p) = state
            .pending
            .iter_mut()
            .find(|p| p.question.same_as(&question))
        {
            p.waiters += 1;
            return Ok(Ticket {
                approvals: self.clone(),
                id: p.id.clone(),
                rx: p.tx.subscribe(),
                deadline: p.deadline,
            });
        }
        if state.pending.len() >= self.shared.config.max_pending {
            return Err(format!(
                "{} questions already wait for approval (the most at once); denied",
                state.pending.len()
            ));
        }
        let mine = state
            .pending
            .iter()
            .filter(|p| p.question.sandbox == question.sandbox && p.question.pid == question.pid)
            .count();
        if mine >= PER_PROCESS_MAX {
            return Err(format!(
                "process {} already has {mine} questions waiting for approval (the most one process may have); denied",
                question.pid
            ));
        }
        let id = loop {
            state.counter += 1;
            let mut h = self.shared.ids.build_hasher();
            h.write_u64(state.counter);
            let id = format!("{:016x}", h.finish());
            let taken = state.pending.iter().any(|p| p.id == id)
                || state.settled.iter().any(|(s, _)| *s == id);
            if !taken {
                break id;
            }
        };
        let (tx, rx) = watch::channel(None);
        let deadline = Instant::now() + self.shared.config.timeout;
        let asked_at = now_ts();
        let line = self.question_line(&id, &question, asked_at);
        state.pending.push(Pending {
            id: id.clone(),
            question,
            asked_at,
            deadline,
            tx,
            waiters: 1,
        });
        drop(state);
        self.write(&line);
        Ok(Ticket {
            approvals: self.clone(),
            id,
            rx,
            deadline,
        })
    }

    /// The pending questions, oldest first, as JSON objects (what `GET /v1/approvals`
    /// lists): the question's fields plus `asked_at` (seconds since the epoch),
    /// `expires_in` (seconds left) and `waiting` (connections held on it).
    pub fn pending(&self) -> Vec<serde_json::Value> {
        let now = Instant::now();
        self.state()
            .pending
            .iter()
            .map(|p| {
                let mut v = p.question.json(&p.id);
                if let Some(map) = v.as_object_mut() {
                    map.insert("asked_at".into(), p.asked_at.into());
                    map.insert(
                        "expires_in".into(),
                        p.deadline
                            .saturating_duration_since(now)
                            .as_secs_f64()
                            .into(),
                    );
                    map.insert("waiting".into(), p.waiters.into());
                }
                v
            })
            .collect()
    }

    /// Answer question `id`; `by` names who answered (for the logs).
    pub fn answer(&self, id: &str, answer: Answer, by: &str) -> Result<(), AnswerError> {
        let pending = self.take(id, Settled::Answered(answer))?;
        let mut note = None;
        if answer == Answer::AllowAlways && !self.shared.policy.grant(pending.question.grant()) {
            note = Some(
                "the endpoint is no longer in the policy, so only the waiting connections go on",
            );
        }
        self.settle(pending, Settled::Answered(answer), by, note);
        Ok(())
    }

    /// The pending question `id`, removed, and recorded as settled `how`.
    fn take(&self, id: &str, how: Settled) -> Result<Pending, AnswerError> {
        let mut state = self.state();
        let Some(at) = state.pending.iter().position(|p| p.id == id) else {
            return Err(match state.settled.iter().find(|(s, _)| s == id) {
                Some((_, how)) => AnswerError::Settled {
                    id: id.to_string(),
                    how,
                },
                None => AnswerError::Unknown(id.to_string()),
            });
        };
        let pending = state.pending.remove(at);
        if state.settled.len() >= SETTLED_KEPT {
            state.settled.pop_front();
        }
        state.settled.push_back((pending.id.clone(), how.as_str()));
        Ok(pending)
    }

    /// Tell the waiters and log the settlement.
    fn settle(&self, pending: Pending, how: Settled, by: &str, note: Option<&str>) {
        let line = self.answer_line(&pending, how, by, note);
        pending.tx.send_replace(Some(how));
        self.write(&line);
    }

    /// The timeout of question `id` passed: settle it as a deny, unless it already is.
    fn expire(&self, id: &str) {
        if let Ok(pending) = self.take(id, Settled::Timeout) {
            self.settle(pending, Settled::Timeout, "timeout", None);
        }
    }

    /// A ticket of question `id` was dropped: withdraw the question when nobody waits on it.
    fn leave(&self, id: &str) {
        let last = {
            let mut state = self.state();
            match state.pending.iter_mut().find(|p| p.id == id) {
                Some(p) => {
                    p.waiters = p.waiters.saturating_sub(1);
                    p.waiters == 0
                }
                None => false,
            }
        };
        if last {
            if let Ok(pending) = self.take(id, Settled::Withdrawn) {
                self.settle(pending, Settled::Withdrawn, "proxy", None);
            }
        }
    }

    fn question_line(&self, id: &str, q: &Question, asked_at: f64) -> serde_json::Value {
        let reason = format!(
            "{} to {}:{} by {} is held for approval: the endpoint of policy {} says enforcement: ask (timeout {} s)",
            q.request_text(),
            q.host,
            q.port,
            q.binary.display(),
            q.policy,
            self.shared.config.timeout.as_secs()
        );
        tracing::info!(
            target: "openshell::decision",
            event = "approval.question",
            approval = id,
            sandbox = %clip(&q.sandbox),
            host = %clip(&q.host),
            port = q.port,
            binary = %clip(&q.binary.to_string_lossy()),
            pid = q.pid,
            method = %clip(q.method.as_deref().unwrap_or("")),
            path = %clip(q.path.as_deref().unwrap_or("")),
            policy = %clip(&q.policy),
            endpoint = q.endpoint_index,
            generation = q.generation,
            reason = %clip(&reason),
            "approval asked"
        );
        let mut line = q.json(id);
        if let Some(map) = line.as_object_mut() {
            map.remove("id");
            map.insert("ts".into(), asked_at.into());
            map.insert("event".into(), "approval.question".into());
            map.insert("approval".into(), id.into());
            map.insert("action".into(), "ask".into());
            map.insert("reason".into(), clip(&reason).into_owned().into());
        }
        line
    }

    fn answer_line(
        &self,
        p: &Pending,
        how: Settled,
        by: &str,
        note: Option<&str>,
    ) -> serde_json::Value {
        let q = &p.question;
        let what = format!(
            "{} to {}:{} by {}",
            q.request_text(),
            q.host,
            q.port,
            q.binary.display()
        );
        let mut reason = match how {
            Settled::Answered(Answer::AllowOnce) => {
                format!("{what} approved once by the approver")
            }
            Settled::Answered(Answer::AllowAlways) => format!(
                "{what} approved by the approver for the sandbox's lifetime (policy {}, this endpoint and binary)",
                q.policy
            ),
            Settled::Answered(Answer::Deny) => format!("{what} denied by the approver"),
            Settled::Timeout => format!(
                "{what} denied: no answer within {} s (timeout)",
                self.shared.config.timeout.as_secs()
            ),
            Settled::Withdrawn => {
                format!("{what} withdrawn: every connection waiting on it went away")
            }
        };
        if let Some(note) = note {
            reason = format!("{reason}; {note}");
        }
        let action = if how.allows() { "allow" } else { "deny" };
        tracing::info!(
            target: "openshell::decision",
            event = "approval.answer",
            approval = %p.id,
            answer = how.as_str(),
            action,
            by = %clip(by),
            sandbox = %clip(&q.sandbox),
            host = %clip(&q.host),
            port = q.port,
            binary = %clip(&q.binary.to_string_lossy()),
            policy = %clip(&q.policy),
            waiting = p.waiters,
            reason = %clip(&reason),
            "approval settled"
        );
        let mut line = q.json(&p.id);
        if let Some(map) = line.as_object_mut() {
            map.remove("id");
            map.insert("ts".into(), now_ts().into());
            map.insert("event".into(), "approval.answer".into());
            map.insert("approval".into(), p.id.clone().into());
            map.insert("answer".into(), how.as_str().into());
            map.insert("by".into(), clip(by).into_owned().into());
            map.insert("action".into(), action.into());
            map.insert("reason".into(), clip(&reason).into_owned().into());
        }
        line
    }

    /// The answering endpoint refused a request from `peer` with `status` because `reason`
    /// (one that must never answer: a web page, a rebound name).
    pub(crate) fn refused_request(&self, peer: std::net::SocketAddr, status: u16, reason: &str) {
        tracing::warn!(
            target: "openshell::decision",
            event = "approval.refused",
            %peer,
            status,
            reason = %clip(reason),
            "approval endpoint refused a request"
        );
        self.write(&serde_json::json!({
            "ts": now_ts(),
            "event": "approval.refused",
            "peer": peer.to_string(),
            "status": status,
            "reason": clip(reason),
        }));
    }

    fn write(&self, line: &serde_json::Value) {
        if let Some(audit) = &self.shared.audit {
            audit.append_value(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_policy::Policy;
    use pretty_assertions::assert_eq;

    const POLICY: &str = "version: 1\nnetwork_policies:\n  api:\n    endpoints:\n      - { host: api.example, port: 443, enforcement: ask }\n    binaries: [{ path: /usr/bin/curl }]\n";

    fn handle(text: &str) -> PolicyHandle {
        let policy = Policy::from_yaml("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        PolicyHandle::new(policy).unwrap_or_else(|e| panic!("{e}"))
    }

    fn question(handle: &PolicyHandle, pid: u32, path: &str) -> Question {
        let endpoint = handle
            .policy()
            .network
            .get("api")
            .and_then(|p| p.endpoints.first().cloned())
            .unwrap_or_else(|| panic!("no endpoint"));
        Question {
            sandbox: "s1".into(),
            binary: "/usr/bin/curl".into(),
            pid,
            ancestors: vec!["/bin/sh".into()],
            host: "api.example".into(),
            port: 443,
            method: Some("GET".into()),
            path: Some(path.into()),
            query: None,
            policy: "api".into(),
            endpoint_index: 0,
            endpoint,
            generation: handle.generation(),
        }
    }

    fn approvals(handle: &PolicyHandle, timeout: Duration, max_pending: usize) -> Approvals {
        Approvals::new(
            ApprovalConfig {
                timeout,
                max_pending,
            },
            handle.clone(),
            None,
        )
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn ids(a: &Approvals) -> Vec<String> {
        a.pending()
            .iter()
            .map(|v| v["id"].as_str().unwrap_or("").to_string())
            .collect()
    }

    #[test]
    fn identical_questions_share_one_entry_and_one_answer() {
        rt().block_on(async {
            let h = handle(POLICY);
            let a = approvals(&h, Duration::from_secs(60), 8);
            let mut first = a
                .ask(question(&h, 10, "/x"))
                .unwrap_or_else(|e| panic!("{e}"));
            // The same process asking the same again (another connection): the same question.
            let mut second = a
                .ask(question(&h, 10, "/x"))
                .unwrap_or_else(|e| panic!("{e}"));
            let mut other = a
                .ask(question(&h, 10, "/y"))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(first.id(), second.id());
            assert_ne!(first.id(), other.id());
            // What the person was not shown is another question: another process, another
            // ancestry, another query.
            let mut elsewhere = vec![
                question(&h, 11, "/x"),
                question(&h, 10, "/x"),
                question(&h, 10, "/x"),
            ];
            elsewhere[1].ancestors = vec!["/usr/bin/python3".into()];
            elsewhere[2].query = Some("token=x".into());
            let elsewhere: Vec<Ticket> = elsewhere
                .into_iter()
                .map(|q| a.ask(q).unwrap_or_else(|e| panic!("{e}")))
                .collect();
            let mut expected = vec![first.id().to_string(), other.id().to_string()];
            expected.extend(elsewhere.iter().map(|t| t.id().to_string()));
            assert_eq!(ids(&a), expected);
            assert_eq!(a.pending()[4]["query"], "token=x");
            drop(elsewhere);
            assert_eq!(a.pending()[0]["waiting"], 2);
            let id = first.id().to_string();
            assert_eq!(a.answer(&id, Answer::AllowOnce, "test"), Ok(()));
            assert_eq!(
                (first.wait().await, second.wait().await),
                (
                    Settled::Answered(Answer::AllowOnce),
                    Settled::Answered(Answer::AllowOnce)
                )
            );
            // Once: no grant, and a late answer is a conflict, not an unknown id.
            assert!(!h.granted(&question(&h, 10, "/x").grant()));
            assert_eq!(
                a.answer(&id, Answer::Deny, "test"),
                Err(AnswerError::Settled {
                    id: id.clone(),
                    how: "allow-once"
                })
            );
            assert_eq!(
                a.answer("0000000000000000", Answer::Deny, "test"),
                Err(AnswerError::Unknown("0000000000000000".into()))
            );
            let other_id = other.id().to_string();
            assert_eq!(a.answer(&other_id, Answer::Deny, "test"), Ok(()));
            assert_eq!(other.wait().await, Settled::Answered(Answer::Deny));
            assert_eq!(ids(&a), Vec::<String>::new());
        });
    }

    #[test]
    fn no_answer_in_time_is_a_timeout() {
        rt().block_on(async {
            let h = handle(POLICY);
            let a = approvals(&h, Duration::from_millis(200), 8);
            let mut t = a
                .ask(question(&h, 10, "/x"))
                .unwrap_or_else(|e| panic!("{e}"));
            let mut joined = a
                .ask(question(&h, 10, "/x"))
                .unwrap_or_else(|e| panic!("{e}"));
            let start = Instant::now();
            assert_eq!(
                (t.wait().await, joined.wait().await),
                (Settled::Timeout, Settled::Timeout)
            );
            assert!(start.elapsed() >= Duration::from_millis(200));
            let id = t.id().to_string();
            assert_eq!(
                a.answer(&id, Answer::AllowOnce, "test"),
                Err(AnswerError::Settled { id, how: "timeout" })
            );
            assert_eq!(ids(&a), Vec::<String>::new());
        });
    }

    #[test]
    fn pending_questions_are_bounded() {
        rt().block_on(async {
            let h = handle(POLICY);
            let a = approvals(&h, Duration::from_secs(60), 2);
            let _one = a
                .ask(question(&h, 1, "/1"))
                .unwrap_or_else(|e| panic!("{e}"));
            let _two = a
                .ask(question(&h, 2, "/2"))
                .unwrap_or_else(|e| panic!("{e}"));
            let three = a.ask(question(&h, 3, "/3")).map(|t| t.id().to_string());
            assert_eq!(
                three,
                Err("2 questions already wait for approval (the most at once); denied".into())
            );
            // Joining a pending question is not a new one.
            assert!(a.ask(question(&h, 1, "/1")).is_ok());
        });
    }

    #[test]
    fn one_process_cannot_fill_the_queue() {
        rt().block_on(async {
            let h = handle(POLICY);
            let a = approvals(&h, Duration::from_secs(60), 64);
            let mine: Vec<Ticket> = (0..PER_PROCESS_MAX)
                .map(|i| {
                    a.ask(question(&h, 7, &format!("/{i}")))
                        .unwrap_or_else(|e| panic!("{e}"))
                })
                .collect();
            let more = a.ask(question(&h, 7, "/more")).map(|t| t.id().to_string());
            assert_eq!(
                more,
                Err(format!("process 7 already has {PER_PROCESS_MAX} questions waiting for approval (the most one process may have); denied"))
            );
            // Another process still gets its question asked.
            assert!(a.ask(question(&h, 8, "/more")).is_ok());
            drop(mine);
        });
    }

    #[test]
    fn a_question_nobody_waits_on_is_withdrawn() {
        rt().block_on(async {
            let h = handle(POLICY);
            let a = approvals(&h, Duration::from_secs(60), 8);
            let one = a
                .ask(question(&h, 1, "/x"))
                .unwrap_or_else(|e| panic!("{e}"));
            let two = a
                .ask(question(&h, 1, "/x"))
                .unwrap_or_else(|e| panic!("{e}"));
            let id = one.id().to_string();
            drop(one);
            assert_eq!(ids(&a), vec![id.clone()]);
            drop(two);
            assert_eq!(ids(&a), Vec::<String>::new());
            assert_eq!(
                a.answer(&id, Answer::AllowOnce, "test"),
                Err(AnswerError::Settled {
                    id,
                    how: "withdrawn"
                })
            );
        });
    }

    #[test]
    fn allow_always_is_a_grant_that_lives_while_its_endpoint_does() {
        rt().block_on(async {
            let h = handle(POLICY);
            let a = approvals(&h, Duration::from_secs(60), 8);
            let mut t = a.ask(question(&h, 1, "/x")).unwrap_or_else(|e| panic!("{e}"));
            let id = t.id().to_string();
            assert_eq!(a.answer(&id, Answer::AllowAlways, "test"), Ok(()));
            assert_eq!(t.wait().await, Settled::Answered(Answer::AllowAlways));
            let grant = question(&h, 1, "/x").grant();
            assert!(h.granted(&grant));
            // Another binary or sandbox is not covered.
            let mut wget = grant.clone();
            wget.binary = "/usr/bin/wget".into();
            let mut other_sandbox = grant.clone();
            other_sandbox.sandbox = "s2".into();
            assert_eq!((h.granted(&wget), h.granted(&other_sandbox)), (false, false));
            // An update that keeps the endpoint keeps the grant.
            let more = format!("{POLICY}  other:\n    endpoints: [{{ host: b.example, port: 443 }}]\n    binaries: [{{ path: /usr/bin/curl }}]\n");
            h.update_yaml("p.yaml", &more).unwrap_or_else(|e| panic!("{e}"));
            assert!(h.granted(&grant));
            // One that changes it drops it, and putting it back does not bring it back.
            let changed = POLICY.replace("port: 443", "port: 8443");
            h.update_yaml("p.yaml", &changed).unwrap_or_else(|e| panic!("{e}"));
            assert!(!h.granted(&grant));
            h.update_yaml("p.yaml", POLICY).unwrap_or_else(|e| panic!("{e}"));
            assert!(!h.granted(&grant));
        });
    }

    #[test]
    fn an_answer_for_an_endpoint_that_is_gone_grants_nothing() {
        rt().block_on(async {
            let h = handle(POLICY);
            let a = approvals(&h, Duration::from_secs(60), 8);
            let q = question(&h, 1, "/x");
            let mut t = a.ask(q.clone()).unwrap_or_else(|e| panic!("{e}"));
            h.update_yaml("p.yaml", "version: 1\n")
                .unwrap_or_else(|e| panic!("{e}"));
            let id = t.id().to_string();
            assert_eq!(a.answer(&id, Answer::AllowAlways, "test"), Ok(()));
            // The waiting connection was decided under the old policy and goes on; no grant.
            assert_eq!(t.wait().await, Settled::Answered(Answer::AllowAlways));
            assert!(!h.granted(&q.grant()));
        });
    }

    #[test]
    fn answers_parse_from_their_wire_spelling() {
        let parsed: Vec<Answer> = ["\"allow-once\"", "\"allow-always\"", "\"deny\""]
            .iter()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect();
        assert_eq!(
            parsed,
            vec![Answer::AllowOnce, Answer::AllowAlways, Answer::Deny]
        );
        assert!(serde_json::from_str::<Answer>("\"allow\"").is_err());
    }
}

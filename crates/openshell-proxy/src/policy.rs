//! The live network policy: a compiled [`DecisionEngine`] and its generation
//! number behind an atomic swap, and the `allow-always` answers that hold while their
//! endpoint is in it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::decision::{clip, now_ts, AuditLog};
use openshell_policy::{
    Decision, DecisionEngine, DecisionInput, Endpoint, Policy, PolicyError, RegoError,
    StaticSectionChanged,
};

/// Why a policy update was refused. The previous policy stays in force.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The new text is not a valid policy.
    #[error("invalid policy")]
    Parse(#[source] PolicyError),
    /// The new policy changes a section fixed at start.
    #[error("policy update refused")]
    StaticChanged(#[source] StaticSectionChanged),
    /// The network section did not compile into a decision engine.
    #[error("cannot compile network policies")]
    Compile(#[source] RegoError),
}

/// One compiled policy generation.
pub(crate) struct Snapshot {
    pub(crate) generation: u64,
    policy: Policy,
    template: DecisionEngine,
    /// Engines ready for use: `DecisionEngine::decide` needs `&mut`, so each
    /// concurrent decision takes one (cloning the template when empty).
    pool: Mutex<Vec<DecisionEngine>>,
}

const POOL_MAX: usize = 16;

impl Snapshot {
    fn build(policy: Policy, generation: u64) -> Result<Self, UpdateError> {
        let template = DecisionEngine::new(&policy.network).map_err(UpdateError::Compile)?;
        Ok(Self {
            generation,
            policy,
            template,
            pool: Mutex::new(Vec::new()),
        })
    }

    /// Endpoint `index` of policy `key` in this generation.
    pub(crate) fn endpoint(&self, key: &str, index: usize) -> Option<&Endpoint> {
        self.policy.network.get(key)?.endpoints.get(index)
    }

    /// Evaluate one input with an engine of this generation.
    pub(crate) fn decide(&self, input: &DecisionInput) -> Result<Decision, RegoError> {
        let pooled = self.pool.lock().ok().and_then(|mut p| p.pop());
        let mut engine = pooled.unwrap_or_else(|| self.template.clone());
        let result = engine.decide(input);
        if let Ok(mut pool) = self.pool.lock() {
            if pool.len() < POOL_MAX {
                pool.push(engine);
            }
        }
        result
    }
}

/// Handle to the network policy in force. Cloning is cheap and every clone
/// sees the same policy; [`PolicyHandle::update`] swaps it atomically, so a
/// decision always uses one whole generation.
#[derive(Clone)]
pub struct PolicyHandle {
    inner: Arc<Inner>,
}

struct Inner {
    current: ArcSwap<Snapshot>,
    /// Serialises updates so generations increase in swap order.
    update_lock: Mutex<()>,
    /// `allow-always` answers: kept with the policy, and only while their endpoint is in it.
    grants: Mutex<Vec<Grant>>,
    /// Where a dropped grant is recorded (the approvals' audit log), once approvals exist.
    audit: std::sync::OnceLock<Arc<AuditLog>>,
}

/// An `allow-always` answer: `binary` of `sandbox` may use this endpoint of policy `policy`
/// without asking, for as long as the sandbox runs and the policy in force has that endpoint
/// unchanged (a live update that removes or changes it drops the grant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) sandbox: String,
    pub(crate) policy: String,
    pub(crate) endpoint: Endpoint,
    pub(crate) binary: PathBuf,
}

impl Grant {
    fn holds_in(&self, policy: &Policy) -> bool {
        policy
            .network
            .get(&self.policy)
            .is_some_and(|p| p.endpoints.contains(&self.endpoint))
    }
}

impl std::fmt::Debug for PolicyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyHandle")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl PolicyHandle {
    /// Compile the policy the sandbox starts with (generation 1).
    pub fn new(policy: Policy) -> Result<Self, UpdateError> {
        let snapshot = Snapshot::build(policy, 1)?;
        Ok(Self {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(snapshot),
                update_lock: Mutex::new(()),
                grants: Mutex::new(Vec::new()),
                audit: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Validate and compile `new`, then swap it in. Refused (keeping the
    /// current policy) when a static section differs from the one in force
    /// or the network section does not compile. Returns the new generation.
    pub fn update(&self, new: &Policy) -> Result<u64, UpdateError> {
        let _guard = self
            .inner
            .update_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.inner.current.load_full();
        current
            .policy
            .check_static_unchanged(new)
            .map_err(UpdateError::StaticChanged)?;
        let generation = current.generation + 1;
        let snapshot = Snapshot::build(new.clone(), generation)?;
        self.inner.current.store(Arc::new(snapshot));
        // Grants live only as long as their endpoint does.
        let mut grants = self
            .inner
            .grants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        grants.retain(|g| {
            let holds = g.holds_in(new);
            if !holds {
                self.dropped(
                    g,
                    generation,
                    "an allow-always answer no longer applies: the policy update removed or changed its endpoint",
                );
            }
            holds
        });
        Ok(generation)
    }

    /// Record dropped grants in `audit` too (the first call wins).
    pub(crate) fn audit_grants_to(&self, audit: Arc<AuditLog>) {
        let _ = self.inner.audit.set(audit);
    }

    /// The sandbox `sandbox` is no longer served: its grants go with it.
    pub(crate) fn forget_sandbox(&self, sandbox: &str) {
        let generation = self.generation();
        let mut grants = self
            .inner
            .grants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        grants.retain(|g| {
            let keep = g.sandbox != sandbox;
            if !keep {
                self.dropped(
                    g,
                    generation,
                    "an allow-always answer ends with its sandbox",
                );
            }
            keep
        });
    }

    /// One structured event, and an audit line where approvals audit, for a dropped grant.
    fn dropped(&self, g: &Grant, generation: u64, reason: &str) {
        tracing::info!(
            target: "openshell::decision",
            event = "approval.grant_dropped",
            sandbox = %g.sandbox,
            policy = %g.policy,
            binary = %g.binary.display(),
            generation,
            reason,
            "allow-always grant dropped"
        );
        if let Some(audit) = self.inner.audit.get() {
            audit.append_value(&serde_json::json!({
                "ts": now_ts(),
                "event": "approval.grant_dropped",
                "sandbox": clip(&g.sandbox),
                "policy": clip(&g.policy),
                "binary": clip(&g.binary.to_string_lossy()),
                "endpoint": {
                    "host": g.endpoint.host.as_ref().map(|h| clip(h.as_str()).into_owned()),
                    "ports": g.endpoint.ports.iter().map(|p| p.get()).collect::<Vec<_>>(),
                },
                "generation": generation,
                "reason": reason,
            }));
        }
    }

    /// Record an `allow-always` answer, if the policy in force still has its endpoint
    /// (false otherwise: a grant for an endpoint that is gone would never be dropped).
    pub(crate) fn grant(&self, grant: Grant) -> bool {
        // Under the update lock: no update can remove the endpoint between the check and the
        // insertion without pruning the new grant.
        let _guard = self
            .inner
            .update_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !grant.holds_in(&self.inner.current.load().policy) {
            return false;
        }
        let mut grants = self
            .inner
            .grants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if !grants.contains(&grant) {
            grants.push(grant);
        }
        true
    }

    /// Whether an `allow-always` answer covers this.
    pub(crate) fn granted(&self, grant: &Grant) -> bool {
        self.inner
            .grants
            .lock()
            .map(|g| g.contains(grant))
            .unwrap_or(false)
    }

    /// Parse policy YAML (`source_name` labels errors) and [`update`](Self::update).
    pub fn update_yaml(&self, source_name: &str, text: &str) -> Result<u64, UpdateError> {
        let policy = Policy::from_yaml(source_name, text).map_err(UpdateError::Parse)?;
        self.update(&policy)
    }

    /// The generation in force (1 for the initial policy).
    pub fn generation(&self) -> u64 {
        self.inner.current.load().generation
    }

    /// A copy of the policy in force.
    pub fn policy(&self) -> Policy {
        self.inner.current.load().policy.clone()
    }

    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.current.load_full()
    }
}

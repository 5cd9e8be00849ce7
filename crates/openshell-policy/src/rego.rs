//! The egress decision engine: `policies/openshell.rego` evaluated with
//! regorus over data built from [`NetworkPolicies`].
//!
//! The Rego source is compiled into the crate (`include_str!`), so building
//! an engine reads nothing from disk.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{Endpoint, Enforcement, L7Rule, NetworkPolicies, NetworkPolicy};
use crate::types::normalise_host;

/// The Rego module that makes every egress decision.
pub const REGO_SOURCE: &str = include_str!("../../../policies/openshell.rego");

/// The rule queried for each decision.
pub const DECISION_RULE: &str = "data.openshell.sandbox.decision";

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Failures of building or evaluating the decision engine.
#[derive(Debug, thiserror::Error)]
pub enum RegoError {
    /// The embedded Rego module did not compile.
    #[error("rego module does not compile")]
    Compile(#[source] BoxError),
    /// The policy data could not be converted or loaded.
    #[error("cannot load policy data into the rego engine")]
    Data(#[source] BoxError),
    /// The decision input could not be converted.
    #[error("cannot convert decision input")]
    Input(#[source] BoxError),
    /// Evaluation failed.
    #[error("rego evaluation failed")]
    Eval(#[source] BoxError),
    /// The rule produced something that is not a decision.
    #[error("rego decision has an unexpected shape")]
    Output(#[source] BoxError),
}

/// The calling process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecInfo {
    /// Resolved executable path of the process that opened the connection.
    pub path: String,
    /// Resolved executable paths of its ancestors, nearest first.
    pub ancestors: Vec<String>,
}

/// Where the connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkTarget {
    /// Host name as requested (normalised by the engine).
    pub host: String,
    /// Destination port.
    pub port: u16,
}

/// An HTTP request inside the connection (when the proxy inspects L7).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpRequest {
    /// Method, any case.
    pub method: String,
    /// URL path (without query).
    pub path: String,
}

/// One question to the engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DecisionInput {
    /// The caller.
    pub exec: ExecInfo,
    /// The destination.
    pub network: NetworkTarget,
    /// The request, absent for CONNECT tunnels and plain TCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<HttpRequest>,
}

/// The engine's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Let the connection or request through.
    pub allow: bool,
    /// Key of the policy that allowed it.
    pub policy: Option<String>,
    /// `audit` when allowed only because the endpoint is in audit mode.
    pub enforcement: Enforcement,
    /// One sentence for logs, a person or an agent.
    pub reason: String,
    /// What did not match: `host`, `port`, `binary`, `method`, `path`.
    pub missing: Vec<String>,
    /// The policy that came closest (fewest missing parts, then key order).
    pub closest_policy: Option<String>,
    /// What change to the policy would allow this.
    pub suggestion: Option<String>,
    /// CIDRs the resolved address must lie in (from the matched endpoint);
    /// empty means no IP restriction. The proxy enforces this after DNS.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
}

/// Evaluates [`DecisionInput`]s against a set of network policies. Cloning
/// is cheap enough for handing one engine to each proxy task; rebuild with
/// [`DecisionEngine::new`] after a policy update.
#[derive(Clone)]
pub struct DecisionEngine {
    engine: regorus::Engine,
    policy_count: usize,
}

impl fmt::Debug for DecisionEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecisionEngine")
            .field("policy_count", &self.policy_count)
            .finish_non_exhaustive()
    }
}

impl DecisionEngine {
    /// Build an engine for these policies.
    pub fn new(policies: &NetworkPolicies) -> Result<Self, RegoError> {
        let mut engine = regorus::Engine::new();
        engine.set_rego_v0(false);
        engine
            .add_policy("openshell.rego".to_string(), REGO_SOURCE.to_string())
            .map_err(|e| RegoError::Compile(e.into()))?;
        let data = serde_json::json!({ "network_policies": policies_data(policies) });
        let value = regorus::Value::from_json_str(&data.to_string())
            .map_err(|e| RegoError::Data(e.into()))?;
        engine
            .add_data(value)
            .map_err(|e| RegoError::Data(e.into()))?;
        Ok(Self {
            engine,
            policy_count: policies.len(),
        })
    }

    /// Decide one connection or request. The host is lowercased and a
    /// trailing dot removed before evaluation.
    pub fn decide(&mut self, input: &DecisionInput) -> Result<Decision, RegoError> {
        let mut input = input.clone();
        input.network.host = normalise_host(&input.network.host);
        let json = serde_json::to_string(&input).map_err(|e| RegoError::Input(e.into()))?;
        let value = regorus::Value::from_json_str(&json).map_err(|e| RegoError::Input(e.into()))?;
        self.engine.set_input(value);
        let out = self
            .engine
            .eval_rule(DECISION_RULE.to_string())
            .map_err(|e| RegoError::Eval(e.into()))?;
        let text = out.to_json_str().map_err(|e| RegoError::Output(e.into()))?;
        serde_json::from_str(&text).map_err(|e| RegoError::Output(e.into()))
    }
}

/// The `data.network_policies` document (see the header of openshell.rego).
pub fn policies_data(policies: &NetworkPolicies) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = policies
        .iter()
        .map(|(key, p)| (key.to_string(), policy_data(p)))
        .collect();
    serde_json::Value::Object(map)
}

fn policy_data(p: &NetworkPolicy) -> serde_json::Value {
    serde_json::json!({
        "name": p.name,
        "binaries": p.binaries.iter().map(|b| b.as_str()).collect::<Vec<_>>(),
        "endpoints": p.endpoints.iter().map(endpoint_data).collect::<Vec<_>>(),
    })
}

fn endpoint_data(ep: &Endpoint) -> serde_json::Value {
    let rules = |rs: &[L7Rule]| {
        rs.iter()
            .map(|r| serde_json::json!({ "method": r.method.as_str(), "path": r.path.as_str() }))
            .collect::<Vec<_>>()
    };
    serde_json::json!({
        "host": ep.host.as_ref().map(|h| h.as_str()),
        "ports": ep.ports.iter().map(|p| p.get()).collect::<Vec<_>>(),
        "enforcement": ep.enforcement,
        "access": ep.access.map(|a| a.as_str()),
        "rules": rules(&ep.rules),
        "deny_rules": rules(&ep.deny_rules),
        "allowed_ips": ep.allowed_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

//! The egress decision engine: `policies/openshell.rego` evaluated with
//! regorus over data built from [`NetworkPolicies`].
//!
//! The Rego source is compiled into the crate (`include_str!`), so building
//! an engine reads nothing from disk.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{
    Endpoint, Enforcement, L7Rule, NetworkPolicies, NetworkPolicy, Protocol, TlsMode,
};
use crate::prefilter;
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
    /// For an allow: the index of the endpoint that allowed it in that policy's endpoints.
    #[serde(default)]
    pub endpoint: Option<usize>,
    /// `audit` when allowed only because the endpoint is in audit mode; `ask` when the
    /// endpoint that allowed it wants a person's approval first (the proxy holds it).
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
    /// For a CONNECT (no request): how the tunnel is carried, `None` for
    /// requests. A CONNECT decision without it is a deny.
    #[serde(default)]
    pub connect: Option<ConnectMode>,
    /// For an allowed request: the endpoint that allowed it has `protocol: websocket`, so an
    /// `Upgrade: websocket` request may switch the connection to WebSocket.
    #[serde(default)]
    pub websocket: bool,
}

/// How an allowed CONNECT is carried (the decision's `connect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectMode {
    /// Bytes relayed as they are (the endpoint has no method/path rules).
    Tunnel,
    /// TLS terminated at the proxy, every request inside decided.
    Terminate,
    /// Refused: the endpoint's method/path rules need `tls: terminate`.
    Deny,
}

/// Evaluates [`DecisionInput`]s against a set of network policies. Cloning
/// is cheap enough for handing one engine to each proxy task; rebuild with
/// [`DecisionEngine::new`] after a policy update.
///
/// Each decision first narrows the section to the policies that could
/// decide it (see `prefilter.rs`) and evaluates the Rego module over only
/// those, with one prepared regorus engine kept per such subset; the answer
/// is the one the whole section gives.
#[derive(Clone)]
pub struct DecisionEngine {
    /// The module over the whole section.
    full: regorus::Engine,
    /// The module without data, cloned for each new subset.
    bare: regorus::Engine,
    /// `None` when the section uses glob syntax the filter does not model.
    index: Option<Arc<prefilter::Index>>,
    /// `data.network_policies` entries, in key order.
    entries: Arc<Vec<(String, serde_json::Value)>>,
    /// Prepared engines by selected policy indices.
    subsets: HashMap<Vec<usize>, regorus::Engine>,
    /// Insertion order of `subsets`, for eviction.
    subset_order: VecDeque<Vec<usize>>,
    policy_count: usize,
}

/// At most this many subset engines per [`DecisionEngine`].
const SUBSET_CACHE: usize = 256;

impl fmt::Debug for DecisionEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecisionEngine")
            .field("policy_count", &self.policy_count)
            .finish_non_exhaustive()
    }
}

fn data_value(entries: &[(String, serde_json::Value)]) -> Result<regorus::Value, RegoError> {
    let map: serde_json::Map<String, serde_json::Value> = entries.iter().cloned().collect();
    let data = serde_json::json!({ "network_policies": map });
    regorus::Value::from_json_str(&data.to_string()).map_err(|e| RegoError::Data(e.into()))
}

impl DecisionEngine {
    /// Build an engine for these policies.
    pub fn new(policies: &NetworkPolicies) -> Result<Self, RegoError> {
        let mut bare = regorus::Engine::new();
        bare.set_rego_v0(false);
        bare.add_policy("openshell.rego".to_string(), REGO_SOURCE.to_string())
            .map_err(|e| RegoError::Compile(e.into()))?;
        let entries: Vec<(String, serde_json::Value)> = policies
            .iter()
            .map(|(key, p)| (key.to_string(), policy_data(p)))
            .collect();
        let mut full = bare.clone();
        full.add_data(data_value(&entries)?)
            .map_err(|e| RegoError::Data(e.into()))?;
        Ok(Self {
            full,
            bare,
            index: prefilter::Index::new(policies).map(Arc::new),
            entries: Arc::new(entries),
            subsets: HashMap::new(),
            subset_order: VecDeque::new(),
            policy_count: policies.len(),
        })
    }

    /// Decide one connection or request. The host is lowercased and a
    /// trailing dot removed before evaluation.
    pub fn decide(&mut self, input: &DecisionInput) -> Result<Decision, RegoError> {
        let host = normalise_host(&input.network.host);
        let value = input_value(input, &host)?;
        match self.select(input, &host) {
            Some(selected) => {
                let engine = self.subset_engine(selected)?;
                evaluate(engine, value)
            }
            None => evaluate(&mut self.full, value),
        }
    }

    /// The whole section, without the prefilter (what `decide` must equal).
    #[cfg(test)]
    pub(crate) fn decide_full(&mut self, input: &DecisionInput) -> Result<Decision, RegoError> {
        let host = normalise_host(&input.network.host);
        let value = input_value(input, &host)?;
        evaluate(&mut self.full, value)
    }

    /// The policies to evaluate, or `None` for the whole section.
    fn select(&self, input: &DecisionInput, host: &str) -> Option<Vec<usize>> {
        let index = self.index.as_deref()?;
        // regorus' glob.match fails on a NUL in the value; leave such
        // inputs to the whole section so the error (or not) is the same.
        let strings = [host, input.exec.path.as_str()]
            .into_iter()
            .chain(input.exec.ancestors.iter().map(String::as_str))
            .chain(
                input
                    .request
                    .iter()
                    .flat_map(|r| [r.method.as_str(), r.path.as_str()]),
            );
        if strings.into_iter().any(|s| s.contains('\0')) {
            return None;
        }
        // The same functions as the module's lower() and upper().
        let req_host = host.to_lowercase();
        let method = input.request.as_ref().map(|r| r.method.to_uppercase());
        let query = prefilter::Query {
            host: &req_host,
            port: input.network.port,
            exec_paths: std::iter::once(input.exec.path.as_str())
                .chain(input.exec.ancestors.iter().map(String::as_str))
                .collect(),
            request: input
                .request
                .as_ref()
                .zip(method.as_deref())
                .map(|(r, m)| (m, r.path.as_str())),
        };
        let selected = index.select(&query);
        (selected.len() < index.len()).then_some(selected)
    }

    /// The prepared engine for these policies, built on first use.
    fn subset_engine(&mut self, selected: Vec<usize>) -> Result<&mut regorus::Engine, RegoError> {
        if !self.subsets.contains_key(&selected) {
            if self.subsets.len() >= SUBSET_CACHE {
                if let Some(old) = self.subset_order.pop_front() {
                    self.subsets.remove(&old);
                }
            }
            let entries: Vec<(String, serde_json::Value)> = selected
                .iter()
                .filter_map(|&i| self.entries.get(i).cloned())
                .collect();
            let mut engine = self.bare.clone();
            engine
                .add_data(data_value(&entries)?)
                .map_err(|e| RegoError::Data(e.into()))?;
            self.subset_order.push_back(selected.clone());
            self.subsets.insert(selected.clone(), engine);
        }
        self.subsets
            .get_mut(&selected)
            .ok_or_else(|| RegoError::Eval("subset engine missing".into()))
    }
}

/// The input document, with the host normalised.
fn input_value(input: &DecisionInput, host: &str) -> Result<regorus::Value, RegoError> {
    let normalised = DecisionInput {
        exec: input.exec.clone(),
        network: NetworkTarget {
            host: host.to_string(),
            port: input.network.port,
        },
        request: input.request.clone(),
    };
    let json = serde_json::to_string(&normalised).map_err(|e| RegoError::Input(e.into()))?;
    regorus::Value::from_json_str(&json).map_err(|e| RegoError::Input(e.into()))
}

fn evaluate(engine: &mut regorus::Engine, input: regorus::Value) -> Result<Decision, RegoError> {
    engine.set_input(input);
    let out = engine
        .eval_rule(DECISION_RULE.to_string())
        .map_err(|e| RegoError::Eval(e.into()))?;
    let text = out.to_json_str().map_err(|e| RegoError::Output(e.into()))?;
    serde_json::from_str(&text).map_err(|e| RegoError::Output(e.into()))
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
        "protocol": ep.protocol.map(|p| match p {
            Protocol::Rest => "rest",
            Protocol::Websocket => "websocket",
            Protocol::Tcp => "tcp",
        }),
        "tls": match ep.tls {
            Some(TlsMode::Terminate) => Some("terminate"),
            Some(TlsMode::Passthrough | TlsMode::Skip) => Some("passthrough"),
            None => None,
        },
    })
}

#[cfg(test)]
#[path = "rego_equivalence_tests.rs"]
mod equivalence_tests;

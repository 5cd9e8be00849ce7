//! OpenShell policy: the v1 YAML model, its validation, and the Rego egress
//! decision engine.
//!
//! Architecture invariant: this crate does no I/O. Callers pass policy text
//! and a name for error messages; the Rego module is compiled in.
//!
//! Loading is two steps: [`wire`] deserialises YAML into serde structs
//! (`deny_unknown_fields`, single values validated by the newtypes in
//! [`types`] so errors carry their position), then `model` checks the
//! cross-field rules and builds the validated [`Policy`]. Every error is a
//! [`PolicyError`] naming `source:line:column: field.path: message`.
//!
//! Schema notes (OpenShell v1, `NVIDIA/OpenShell` `crates/openshell-policy`):
//! - a network policy's `name` defaults to its map key and may differ from it;
//! - `port` and `ports` are mutually exclusive here (OpenShell lets `ports`
//!   win silently; we refuse the ambiguity);
//! - an endpoint without `host` is valid only with `allowed_ips` (OpenShell's
//!   hostless endpoint: any host on the port, IPs checked after DNS);
//! - `access` and `rules` are mutually exclusive; `deny_rules` need one of
//!   them; `protocol: tcp` takes no L7 fields;
//! - binaries' deprecated `harness` flag is accepted and ignored;
//! - fields we cannot enforce (GraphQL, MCP, JSON-RPC, SQL, query matchers)
//!   are refused as unknown rather than ignored;
//! - `credentials` (our extension, OpenShell's "providers"): secrets the
//!   supervisor reads (`from_env`, `from_file`) and the egress proxy adds to
//!   requests to exact `endpoints` on terminated connections, the workload
//!   seeing only a placeholder in `env`; a static section.

mod error;
mod model;
mod prefilter;
pub mod rego;
pub mod resources;
pub mod types;
mod wire;

pub use error::{PolicyError, StaticSectionChanged};
pub use model::{
    Access, Credential, CredentialEndpoint, CredentialSource, Endpoint, Enforcement,
    FilesystemPolicy, L7Rule, LandlockCompatibility, LandlockPolicy, NetworkPolicies,
    NetworkPolicy, Policy, ProcessPolicy, Protocol, TlsMode, TmpMode, RESERVED_ENV,
};
pub use rego::{
    ConnectMode, Decision, DecisionEngine, DecisionInput, ExecInfo, HttpRequest, NetworkTarget,
    RegoError,
};
pub use resources::{EffectiveResources, Limit, Resources};
pub use types::{
    BinaryPattern, HostPattern, InvalidValue, IpNet, MethodPattern, PathPattern, Port, SandboxPath,
};

//! The validated policy model and its conversion from and to the wire form.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{PolicyError, StaticSectionChanged};
use crate::resources::Resources;
use crate::types::{
    BinaryPattern, HostPattern, IpNet, MethodPattern, PathPattern, Port, SandboxPath,
};
use crate::wire::{self, Seg};

/// A validated, normalised sandbox policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// Schema version; always 1.
    pub version: u32,
    /// `filesystem_policy` (static).
    pub filesystem: FilesystemPolicy,
    /// `landlock` (static).
    pub landlock: LandlockPolicy,
    /// `process` (static).
    pub process: ProcessPolicy,
    /// `network_policies` (may change live).
    pub network: NetworkPolicies,
    /// `resources` as the file wrote it (static; our extension); what applies is
    /// [`Resources::effective`].
    pub resources: Resources,
    /// `credentials` (static; our extension): secrets the egress proxy adds to requests on
    /// terminated connections to their endpoints, keyed by name.
    pub credentials: BTreeMap<String, Credential>,
}

/// One credential: where the supervisor reads its value, the variable the workload sees (a
/// placeholder, never the value), and the only endpoints the value is sent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Credential {
    /// Where the supervisor reads the value (never shared with the sandbox).
    pub source: CredentialSource,
    /// The environment variable that holds the placeholder in the sandbox.
    pub env: String,
    /// The only destinations the value is substituted for (exact hosts).
    pub endpoints: Vec<CredentialEndpoint>,
    /// Substitute in the query string too (headers only when false).
    pub query: bool,
}

/// Where a credential's value comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialSource {
    /// The supervisor's environment variable of this name.
    FromEnv(String),
    /// A file the supervisor reads (one trailing newline removed).
    FromFile(SandboxPath),
}

/// One destination of a credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CredentialEndpoint {
    /// An exact host name or address, normalised (no glob).
    pub host: HostPattern,
    /// The port.
    pub port: Port,
}

/// Environment variables the runtime sets for every sandboxed process (egress proxy, trust
/// store) or that change how programs load: a credential may not take one of them.
pub const RESERVED_ENV: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "GIT_SSL_CAINFO",
    "PIP_CERT",
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
];

/// Whether `name` is a valid environment variable name (`[A-Za-z_][A-Za-z0-9_]*`).
fn env_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 256
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Which paths the workload may read or write (Landlock rules).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FilesystemPolicy {
    /// Add the working directory to `read_write`.
    pub include_workdir: bool,
    /// Paths readable (and executable) beneath.
    pub read_only: Vec<SandboxPath>,
    /// Paths readable and writable beneath; never `/`.
    pub read_write: Vec<SandboxPath>,
    /// Whose `/tmp` the sandbox sees (our extension).
    pub tmp: TmpMode,
}

/// `filesystem_policy.tmp`: the sandbox's `/tmp`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TmpMode {
    /// A per-sandbox tmpfs, charged to the sandbox's memory and gone with it; whether the
    /// workload may read or write it is still up to `read_only` / `read_write`.
    #[default]
    Private,
    /// The host's `/tmp` (with every socket and file other programs keep there); `/tmp` must
    /// be listed in `read_only` or `read_write`.
    Host,
}

/// What to do when the kernel cannot enforce the requested Landlock rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandlockCompatibility {
    /// Apply what the kernel supports and report what was enforced.
    #[default]
    BestEffort,
    /// Refuse to start unless every rule is enforced.
    HardRequirement,
}

/// `landlock` section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LandlockPolicy {
    /// Behaviour on kernels without full Landlock support.
    pub compatibility: LandlockCompatibility,
}

/// `process` section: the identity the workload runs as.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProcessPolicy {
    /// User name or numeric uid; `None` keeps the caller's.
    pub run_as_user: Option<String>,
    /// Group name or numeric gid; `None` keeps the caller's.
    pub run_as_group: Option<String>,
}

/// The named network policies, keyed by their YAML map key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct NetworkPolicies {
    policies: BTreeMap<String, NetworkPolicy>,
}

impl NetworkPolicies {
    /// Policies in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &NetworkPolicy)> {
        self.policies.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The policy with this key.
    pub fn get(&self, key: &str) -> Option<&NetworkPolicy> {
        self.policies.get(key)
    }

    /// True when no network access is allowed at all.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// True when some endpoint says `enforcement: ask`.
    pub fn asks(&self) -> bool {
        self.policies
            .values()
            .flat_map(|p| &p.endpoints)
            .any(|ep| ep.enforcement == Enforcement::Ask)
    }
}

impl FromIterator<(String, NetworkPolicy)> for NetworkPolicies {
    fn from_iter<I: IntoIterator<Item = (String, NetworkPolicy)>>(iter: I) -> Self {
        Self {
            policies: iter.into_iter().collect(),
        }
    }
}

/// One named network policy: which binaries may reach which endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkPolicy {
    /// Display name; defaults to the map key (OpenShell allows it to differ).
    pub name: String,
    /// Allowed destinations.
    pub endpoints: Vec<Endpoint>,
    /// Executables (or ancestors) allowed to use the endpoints. Empty means
    /// no process can use this policy.
    pub binaries: Vec<BinaryPattern>,
}

/// L7 inspection protocol of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/REST: method and path rules apply.
    Rest,
    /// WebSocket over HTTP: the upgrade request is checked like REST.
    Websocket,
    /// Explicit plain TCP (no L7 fields allowed).
    Tcp,
}

/// How TLS to an endpoint is handled by the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Terminate TLS at the proxy so L7 rules can be checked.
    Terminate,
    /// Pass TLS through untouched (no L7 inspection).
    Passthrough,
    /// OpenShell's newer spelling of passthrough.
    Skip,
}

/// Whether an endpoint's L7 rules deny or only report, and whether what they allow needs a
/// person's approval first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// Requests outside the rules are denied.
    #[default]
    Enforce,
    /// Requests outside the rules are allowed and reported.
    Audit,
    /// As `Enforce`, and what the endpoint allows is held until a person approves it (once,
    /// or for the sandbox's lifetime) or denies it; no answer in time is a deny.
    Ask,
}

impl Enforcement {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
            Self::Ask => "ask",
        }
    }
}

/// L7 access preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    /// GET, HEAD, OPTIONS.
    #[serde(rename = "read-only")]
    ReadOnly,
    /// read-only plus POST, PUT, PATCH, DELETE.
    #[serde(rename = "read-write")]
    ReadWrite,
    /// Any method.
    #[serde(rename = "full")]
    Full,
}

impl Access {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ReadOnly => "read-only",
            Self::ReadWrite => "read-write",
            Self::Full => "full",
        }
    }
}

/// One L7 rule: a method (or `*`) and a path glob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct L7Rule {
    /// HTTP method, uppercase, or `*`.
    pub method: MethodPattern,
    /// URL path glob.
    pub path: PathPattern,
}

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Host name or glob. `None` only for OpenShell's hostless endpoints,
    /// which match any host on the port and rely on `allowed_ips` (checked by
    /// the proxy against the resolved addresses).
    pub host: Option<HostPattern>,
    /// Ports (from `port` or `ports`), never empty.
    pub ports: Vec<Port>,
    /// L7 protocol, if any.
    pub protocol: Option<Protocol>,
    /// TLS handling, if given.
    pub tls: Option<TlsMode>,
    /// Enforce or audit the L7 rules, or ask a person first.
    pub enforcement: Enforcement,
    /// Access preset (exclusive with `rules`).
    pub access: Option<Access>,
    /// Explicit allow rules (exclusive with `access`).
    pub rules: Vec<L7Rule>,
    /// Rules that deny even what `access`/`rules` allow.
    pub deny_rules: Vec<L7Rule>,
    /// Addresses the host may resolve to (checked by the proxy after DNS).
    pub allowed_ips: Vec<IpNet>,
    /// Keep `%2F` in paths instead of rejecting it (proxy canonicaliser flag).
    pub allow_encoded_slash: bool,
}

impl Policy {
    /// Parse and validate OpenShell v1 policy YAML. `source_name` only labels
    /// errors; nothing is read from disk.
    pub fn from_yaml(source_name: &str, text: &str) -> Result<Policy, PolicyError> {
        let file = wire::parse(source_name, text)?;
        let mut cx = Cx {
            source_name,
            text,
            path: Vec::new(),
        };
        convert(&mut cx, file)
    }

    /// Render the validated, normalised policy as v1 YAML: every default of the OpenShell
    /// sections written out; `resources` as the file gave them (for the limits that apply, set
    /// `resources` to `Resources::from(p.resources.effective())` first).
    /// `Policy::from_yaml(_, &p.to_yaml()) == Ok(p)`.
    pub fn to_yaml(&self) -> String {
        match wire::render(&to_wire(self)) {
            Ok(text) => text,
            // Serialising plain structs of strings and numbers cannot fail;
            // if it ever does, say so in a YAML comment rather than panic.
            Err(err) => format!("# failed to render policy: {err}\n"),
        }
    }

    /// Check that the static sections (filesystem, landlock, process,
    /// resources) of `newer` equal this policy's. Resources compare by the limits that apply:
    /// writing out a default, or leaving it out, changes nothing.
    pub fn check_static_unchanged(&self, newer: &Policy) -> Result<(), StaticSectionChanged> {
        let section = if self.filesystem != newer.filesystem {
            "filesystem_policy"
        } else if self.landlock != newer.landlock {
            "landlock"
        } else if self.process != newer.process {
            "process"
        } else if self.resources.effective() != newer.resources.effective() {
            "resources"
        } else if self.credentials != newer.credentials {
            "credentials"
        } else {
            return Ok(());
        };
        Err(StaticSectionChanged { section })
    }
}

// ---------------------------------------------------------------------------
// wire -> model
// ---------------------------------------------------------------------------

/// Conversion context: the current field path, for positioned errors.
struct Cx<'a> {
    source_name: &'a str,
    text: &'a str,
    path: Vec<Seg>,
}

impl Cx<'_> {
    /// An error at the current path plus `extra` segments.
    fn err(&self, extra: &[Seg], message: &str) -> PolicyError {
        let mut path = self.path.clone();
        path.extend_from_slice(extra);
        let (line, column) = wire::locate(self.text, &path);
        PolicyError::new(
            self.source_name,
            line,
            column,
            &wire::path_string(&path),
            message,
        )
    }

    fn push(&mut self, seg: Seg) {
        self.path.push(seg);
    }

    fn pop(&mut self) {
        self.path.pop();
    }
}

fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

fn convert(cx: &mut Cx<'_>, file: wire::PolicyFile) -> Result<Policy, PolicyError> {
    let filesystem = match file.filesystem_policy {
        None => FilesystemPolicy::default(),
        Some(fs) => {
            let read_write = fs.read_write.unwrap_or_default();
            if let Some(i) = read_write.iter().position(SandboxPath::is_root) {
                return Err(cx.err(
                    &[key("filesystem_policy"), key("read_write"), Seg::Index(i)],
                    "read_write must not contain /; name the directories that need writes",
                ));
            }
            let read_only = dedup(fs.read_only.unwrap_or_default());
            let read_write = dedup(read_write);
            let tmp = fs.tmp.unwrap_or_default();
            let lists_tmp = |p: &SandboxPath| p.as_str() == "/tmp";
            if tmp == TmpMode::Host
                && !read_only.iter().any(lists_tmp)
                && !read_write.iter().any(lists_tmp)
            {
                return Err(cx.err(
                    &[key("filesystem_policy"), key("tmp")],
                    "tmp: host shares the host's /tmp, which must then be listed in read_only or \
                     read_write",
                ));
            }
            FilesystemPolicy {
                include_workdir: fs.include_workdir.unwrap_or(false),
                read_only,
                read_write,
                tmp,
            }
        }
    };
    let landlock = LandlockPolicy {
        compatibility: file
            .landlock
            .and_then(|l| l.compatibility)
            .unwrap_or_default(),
    };
    let process = match file.process {
        None => ProcessPolicy::default(),
        Some(p) => {
            cx.push(key("process"));
            let run_as_user = account(cx, "run_as_user", p.run_as_user)?;
            let run_as_group = account(cx, "run_as_group", p.run_as_group)?;
            cx.pop();
            ProcessPolicy {
                run_as_user,
                run_as_group,
            }
        }
    };
    let resources = file
        .resources
        .map_or_else(Resources::default, |r| Resources {
            memory_mib: r.memory_mib.map(|m| m.0),
            cpus: r.cpus.map(|c| c.0),
            pids: r.pids.map(|p| p.0),
        });
    let mut policies = BTreeMap::new();
    if let Some(map) = file.network_policies {
        for (k, def) in map.0 {
            cx.push(key("network_policies"));
            cx.push(Seg::Key(k.clone()));
            let policy = network_policy(cx, &k, def)?;
            cx.pop();
            cx.pop();
            policies.insert(k, policy);
        }
    }
    let mut credentials = BTreeMap::new();
    if let Some(map) = file.credentials {
        cx.push(key("credentials"));
        for (k, def) in map.0 {
            cx.push(Seg::Key(k.clone()));
            let credential = credential(cx, &k, def, &credentials)?;
            cx.pop();
            credentials.insert(k, credential);
        }
        cx.pop();
    }
    Ok(Policy {
        version: file.version.0,
        filesystem,
        landlock,
        process,
        network: NetworkPolicies { policies },
        resources,
        credentials,
    })
}

/// A credential's name goes into its placeholder: letters, digits, `-` and `_`.
fn credential_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

fn credential(
    cx: &Cx<'_>,
    name: &str,
    def: wire::CredentialDef,
    earlier: &BTreeMap<String, Credential>,
) -> Result<Credential, PolicyError> {
    if !credential_name_ok(name) {
        return Err(cx.err(
            &[],
            "a credential name may use only letters, digits, - and _ (at most 64)",
        ));
    }
    let source = match (def.from_env, def.from_file) {
        (Some(_), Some(_)) => {
            return Err(cx.err(
                &[key("from_file")],
                "from_env and from_file are mutually exclusive",
            ))
        }
        (None, None) => {
            return Err(cx.err(
                &[],
                "credential needs from_env or from_file (where the supervisor reads the value)",
            ))
        }
        (Some(var), None) => {
            if !env_name_ok(&var) {
                return Err(cx.err(
                    &[key("from_env")],
                    &format!("expected an environment variable name, got {var:?}"),
                ));
            }
            CredentialSource::FromEnv(var)
        }
        (None, Some(path)) => {
            if path.is_root() {
                return Err(cx.err(&[key("from_file")], "expected a file, got /"));
            }
            CredentialSource::FromFile(path)
        }
    };
    let Some(env) = def.env else {
        return Err(cx.err(
            &[],
            "credential needs env (the variable that holds its placeholder in the sandbox)",
        ));
    };
    if !env_name_ok(&env) {
        return Err(cx.err(
            &[key("env")],
            &format!("expected an environment variable name, got {env:?}"),
        ));
    }
    let upper = env.to_ascii_uppercase();
    if RESERVED_ENV.contains(&upper.as_str()) || upper.starts_with("LD_") {
        return Err(cx.err(
            &[key("env")],
            &format!("{env} is set by the sandbox itself or changes how programs load"),
        ));
    }
    if let Some((other, _)) = earlier.iter().find(|(_, c)| c.env == env) {
        return Err(cx.err(
            &[key("env")],
            &format!("{env} is already the variable of credential {other}"),
        ));
    }
    let defs = def.endpoints.unwrap_or_default();
    if defs.is_empty() {
        return Err(cx.err(
            &[key("endpoints")],
            "credential needs at least one endpoint (the only destinations its value is sent to)",
        ));
    }
    let mut endpoints = Vec::new();
    for (i, ep) in defs.into_iter().enumerate() {
        let at = [key("endpoints"), Seg::Index(i)];
        let Some(host) = ep.host else {
            return Err(cx.err(&at, "endpoint needs host"));
        };
        if host.is_glob() {
            return Err(cx.err(
                &[key("endpoints"), Seg::Index(i), key("host")],
                "a credential's host must be exact (no glob): list each host its value may reach",
            ));
        }
        let Some(port) = ep.port else {
            return Err(cx.err(&at, "endpoint needs port"));
        };
        endpoints.push(CredentialEndpoint { host, port });
    }
    Ok(Credential {
        source,
        env,
        endpoints: dedup(endpoints),
        query: def.query.unwrap_or(false),
    })
}

fn dedup<T: PartialEq>(items: Vec<T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::with_capacity(items.len());
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// run_as_user / run_as_group: empty means unset (as in OpenShell).
fn account(cx: &Cx<'_>, field: &str, value: Option<String>) -> Result<Option<String>, PolicyError> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let ok = value.len() <= 256
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'));
    if !ok {
        return Err(cx.err(
            &[key(field)],
            &format!("expected a user or group name or numeric id, got {value:?}"),
        ));
    }
    Ok(Some(value))
}

fn network_policy(
    cx: &mut Cx<'_>,
    map_key: &str,
    def: wire::NetworkPolicyDef,
) -> Result<NetworkPolicy, PolicyError> {
    let name = match def.name {
        Some(n) if !n.is_empty() => n,
        _ => map_key.to_string(),
    };
    let mut endpoints = Vec::new();
    for (i, ep) in def.endpoints.unwrap_or_default().into_iter().enumerate() {
        cx.push(key("endpoints"));
        cx.push(Seg::Index(i));
        endpoints.push(endpoint(cx, ep)?);
        cx.pop();
        cx.pop();
    }
    let binaries = dedup(
        def.binaries
            .unwrap_or_default()
            .into_iter()
            .map(|b| b.path)
            .collect(),
    );
    Ok(NetworkPolicy {
        name,
        endpoints,
        binaries,
    })
}

fn endpoint(cx: &mut Cx<'_>, ep: wire::EndpointDef) -> Result<Endpoint, PolicyError> {
    let ports = match (ep.port, ep.ports) {
        (Some(_), Some(_)) => {
            return Err(cx.err(&[key("ports")], "port and ports are mutually exclusive"))
        }
        (Some(p), None) => vec![p],
        (None, Some(ps)) if ps.is_empty() => {
            return Err(cx.err(&[key("ports")], "ports must not be empty"))
        }
        (None, Some(ps)) => dedup(ps),
        (None, None) => return Err(cx.err(&[], "endpoint needs port or ports")),
    };
    let allowed_ips = dedup(ep.allowed_ips.unwrap_or_default());
    if ep.host.is_none() && allowed_ips.is_empty() {
        return Err(cx.err(
            &[],
            "endpoint needs host (or allowed_ips for a hostless endpoint)",
        ));
    }
    let rules_def = ep.rules.unwrap_or_default();
    if ep.access.is_some() && !rules_def.is_empty() {
        return Err(cx.err(&[key("rules")], "access and rules are mutually exclusive"));
    }
    let mut rules = Vec::new();
    for (i, r) in rules_def.into_iter().enumerate() {
        rules.push(l7_rule(
            cx,
            &[key("rules"), Seg::Index(i), key("allow")],
            r.allow,
        )?);
    }
    let deny_def = ep.deny_rules.unwrap_or_default();
    if !deny_def.is_empty() && ep.access.is_none() && rules.is_empty() {
        return Err(cx.err(
            &[key("deny_rules")],
            "deny_rules need rules or access to define the base allow set",
        ));
    }
    let mut deny_rules = Vec::new();
    for (i, r) in deny_def.into_iter().enumerate() {
        deny_rules.push(l7_rule(cx, &[key("deny_rules"), Seg::Index(i)], r)?);
    }
    if ep.protocol == Some(Protocol::Tcp)
        && (ep.access.is_some() || !rules.is_empty() || !deny_rules.is_empty())
    {
        return Err(cx.err(
            &[key("protocol")],
            "protocol tcp does not support access, rules or deny_rules",
        ));
    }
    Ok(Endpoint {
        host: ep.host,
        ports,
        protocol: ep.protocol,
        tls: ep.tls,
        enforcement: ep.enforcement.unwrap_or_default(),
        access: ep.access,
        rules,
        deny_rules,
        allowed_ips,
        allow_encoded_slash: ep.allow_encoded_slash.unwrap_or(false),
    })
}

fn l7_rule(cx: &Cx<'_>, at: &[Seg], def: wire::MethodPathDef) -> Result<L7Rule, PolicyError> {
    if def.method.is_none() && def.path.is_none() {
        return Err(cx.err(at, "rule needs method or path"));
    }
    Ok(L7Rule {
        method: def.method.unwrap_or_else(MethodPattern::any),
        path: def.path.unwrap_or_else(PathPattern::any),
    })
}

// ---------------------------------------------------------------------------
// model -> wire
// ---------------------------------------------------------------------------

fn to_wire(p: &Policy) -> wire::PolicyFile {
    let process = if p.process == ProcessPolicy::default() {
        None
    } else {
        Some(wire::ProcessDef {
            run_as_user: p.process.run_as_user.clone(),
            run_as_group: p.process.run_as_group.clone(),
        })
    };
    let resources = if p.resources == Resources::default() {
        None
    } else {
        Some(wire::ResourcesDef {
            memory_mib: p.resources.memory_mib.map(wire::MemoryMib),
            cpus: p.resources.cpus.map(wire::Cpus),
            pids: p.resources.pids.map(wire::Pids),
        })
    };
    let network_policies = if p.network.is_empty() {
        None
    } else {
        Some(wire::UniqueMap(
            p.network
                .iter()
                .map(|(k, np)| (k.to_string(), network_policy_to_wire(np)))
                .collect(),
        ))
    };
    wire::PolicyFile {
        version: wire::Version(p.version),
        filesystem_policy: Some(wire::FilesystemDef {
            include_workdir: Some(p.filesystem.include_workdir),
            read_only: Some(p.filesystem.read_only.clone()),
            read_write: Some(p.filesystem.read_write.clone()),
            tmp: Some(p.filesystem.tmp),
        }),
        landlock: Some(wire::LandlockDef {
            compatibility: Some(p.landlock.compatibility),
        }),
        process,
        network_policies,
        resources,
        credentials: (!p.credentials.is_empty()).then(|| {
            wire::UniqueMap(
                p.credentials
                    .iter()
                    .map(|(k, c)| (k.clone(), credential_to_wire(c)))
                    .collect(),
            )
        }),
    }
}

fn credential_to_wire(c: &Credential) -> wire::CredentialDef {
    let (from_env, from_file) = match &c.source {
        CredentialSource::FromEnv(var) => (Some(var.clone()), None),
        CredentialSource::FromFile(path) => (None, Some(path.clone())),
    };
    wire::CredentialDef {
        from_env,
        from_file,
        env: Some(c.env.clone()),
        endpoints: Some(
            c.endpoints
                .iter()
                .map(|e| wire::CredentialEndpointDef {
                    host: Some(e.host.clone()),
                    port: Some(e.port),
                })
                .collect(),
        ),
        query: c.query.then_some(true),
    }
}

fn network_policy_to_wire(np: &NetworkPolicy) -> wire::NetworkPolicyDef {
    wire::NetworkPolicyDef {
        name: Some(np.name.clone()),
        endpoints: Some(np.endpoints.iter().map(endpoint_to_wire).collect()),
        binaries: Some(
            np.binaries
                .iter()
                .map(|b| wire::BinaryDef {
                    path: b.clone(),
                    harness: None,
                })
                .collect(),
        ),
    }
}

fn endpoint_to_wire(ep: &Endpoint) -> wire::EndpointDef {
    let (port, ports) = match ep.ports.as_slice() {
        [one] => (Some(*one), None),
        many => (None, Some(many.to_vec())),
    };
    let rule = |r: &L7Rule| wire::MethodPathDef {
        method: Some(r.method.clone()),
        path: Some(r.path.clone()),
    };
    wire::EndpointDef {
        host: ep.host.clone(),
        port,
        ports,
        protocol: ep.protocol,
        tls: ep.tls,
        enforcement: (ep.enforcement != Enforcement::Enforce).then_some(ep.enforcement),
        access: ep.access,
        rules: (!ep.rules.is_empty()).then(|| {
            ep.rules
                .iter()
                .map(|r| wire::RuleDef { allow: rule(r) })
                .collect()
        }),
        deny_rules: (!ep.deny_rules.is_empty()).then(|| ep.deny_rules.iter().map(rule).collect()),
        allowed_ips: (!ep.allowed_ips.is_empty()).then(|| ep.allowed_ips.clone()),
        allow_encoded_slash: ep.allow_encoded_slash.then_some(true),
    }
}

//! A conservative Rust-side prefilter for the Rego decision.
//!
//! `policies/openshell.rego` scores every (policy, endpoint) pair of the
//! network section: the decision is the first pair of
//! `sort([count(missing), host missing, port missing, key, index, missing])`
//! (an allow when it misses nothing), or the first audit match; a CONNECT
//! picks among all full matches by how its tunnel is carried, and any
//! decision puts full matches through `enforcement: ask` endpoints after the
//! others, so for a CONNECT, and for every decision of a section with an ask
//! endpoint, every policy that may match fully is kept. Evaluating
//! that over a large section costs the regorus interpreter tens of
//! milliseconds, so [`Index::select`] works out, per pair, which parts are
//! certainly missing, certainly present or unknown (globs are only tested
//! for a necessary condition here, never decided), and keeps only the
//! policies that could hold the first pair or an audit match. Rego then
//! evaluates exactly the same rules over that subset, which yields the same
//! decision because everything it looks at (the first pair, the first full
//! match, every possible audit match) is in the subset, whole policies with
//! their endpoint indices intact.
//!
//! Soundness rests on two things: a part reported [`Tri::Yes`] or
//! [`Tri::No`] is what Rego computes, and for each pair the lower bound of
//! its sort key is at most the true key, the upper bound at least. Inputs
//! the module would reject with an error (a NUL in a value reaching
//! `glob.match`) and patterns using glob syntax other than `*`/`**` are not
//! filtered at all.

use std::cmp::Ordering;

use crate::model::{Access, Endpoint, Enforcement, L7Rule, NetworkPolicies, NetworkPolicy};

/// Three-valued truth: certain yes, certain no, or not known without the
/// real glob matcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tri {
    Yes,
    No,
    Maybe,
}

impl Tri {
    fn from_bool(b: bool) -> Self {
        if b {
            Self::Yes
        } else {
            Self::No
        }
    }

    fn not(self) -> Self {
        match self {
            Self::Yes => Self::No,
            Self::No => Self::Yes,
            Self::Maybe => Self::Maybe,
        }
    }

    fn and(self, other: Self) -> Self {
        match (self, other) {
            (Self::No, _) | (_, Self::No) => Self::No,
            (Self::Yes, Self::Yes) => Self::Yes,
            _ => Self::Maybe,
        }
    }

    fn or(self, other: Self) -> Self {
        match (self, other) {
            (Self::Yes, _) | (_, Self::Yes) => Self::Yes,
            (Self::No, Self::No) => Self::No,
            _ => Self::Maybe,
        }
    }

    /// `any` over an iterator of [`Tri`].
    fn any(items: impl IntoIterator<Item = Self>) -> Self {
        items.into_iter().fold(Self::No, Self::or)
    }
}

/// A necessary condition for regorus' `glob.match(pattern, delimiters, v)`
/// (globset with `literal_separator`, the delimiters rewritten to `/`): the
/// rewritten value must start with the literal text before the first `*`
/// and end with the literal text after the last one. One `/` next to the
/// stars is left out of each, since globset's `**` tokens may absorb it.
#[derive(Debug, Clone)]
struct Glob {
    prefix: String,
    suffix: String,
}

impl Glob {
    /// `rewritten` is the pattern after [`rewrite_host`] or as is (paths).
    /// Patterns with a `*` only.
    fn new(rewritten: &str) -> Self {
        let first = rewritten.find('*').unwrap_or(rewritten.len());
        let last = rewritten.rfind('*').map_or(rewritten.len(), |i| i + 1);
        let prefix = &rewritten[..first];
        let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
        let suffix = &rewritten[last.max(first)..];
        let suffix = suffix.strip_prefix('/').unwrap_or(suffix);
        Self {
            prefix: prefix.to_string(),
            suffix: suffix.to_string(),
        }
    }

    /// `No` when the glob certainly does not match the (rewritten) value.
    fn test(&self, rewritten_value: &str) -> Tri {
        if rewritten_value.len() >= self.prefix.len().max(self.suffix.len())
            && rewritten_value.starts_with(&self.prefix)
            && rewritten_value.ends_with(&self.suffix)
        {
            Tri::Maybe
        } else {
            Tri::No
        }
    }
}

/// regorus' rewrite for delimiters `["."]`: `/` becomes its internal
/// placeholder (NUL), then each `.` becomes `/./`.
fn rewrite_host(s: &str) -> String {
    s.replace('/', "\0").replace('.', "/./")
}

/// Glob syntax we do not model (validation refuses it; see
/// `types::check_glob_segment`), or the NUL that regorus reserves.
fn unmodelled(pattern: &str) -> bool {
    pattern
        .chars()
        .any(|c| matches!(c, '?' | '[' | ']' | '{' | '}' | '\\' | '\0'))
}

#[derive(Debug, Clone)]
enum HostIx {
    Exact(String),
    Glob(Glob),
    /// Hostless with `allowed_ips`: any host.
    Any,
    /// Hostless without `allowed_ips`: no host.
    Never,
}

#[derive(Debug, Clone)]
enum PathIx {
    Any,
    Glob(Glob),
}

#[derive(Debug, Clone)]
struct RuleIx {
    method: String,
    path: PathIx,
}

#[derive(Debug, Clone)]
struct EndpointIx {
    host: HostIx,
    ports: Vec<u16>,
    audit: bool,
    access: Option<Access>,
    rules: Vec<RuleIx>,
    deny_rules: Vec<RuleIx>,
}

#[derive(Debug, Clone)]
struct PolicyIx {
    exact_binaries: Vec<String>,
    glob_binaries: Vec<Glob>,
    endpoints: Vec<EndpointIx>,
}

/// The network section, prepared for [`Index::select`]. Policies are in key
/// order (the order of [`NetworkPolicies::iter`], byte order like Rego's
/// string comparison).
#[derive(Debug, Clone)]
pub(crate) struct Index {
    policies: Vec<PolicyIx>,
    /// Some endpoint says `enforcement: ask`: the first full match is then not always the
    /// first candidate.
    asks: bool,
}

/// The request as the Rego module sees it (`req_host`, `exec_paths`, ...).
pub(crate) struct Query<'a> {
    /// `lower(input.network.host)`.
    pub host: &'a str,
    pub port: u16,
    /// `input.exec.path` then the ancestors.
    pub exec_paths: Vec<&'a str>,
    /// `upper(method)` and the path, when there is a request.
    pub request: Option<(&'a str, &'a str)>,
}

/// The lexicographic sort key of a candidate, without the key (the policy
/// index stands for it, key order being index order) and with `missing`
/// left out (it never decides between distinct (key, index) pairs).
type SortKey = (u32, u32, u32, usize, usize);

impl Index {
    /// `None` when some pattern uses syntax the filter does not model; the
    /// engine then always evaluates the whole section.
    pub(crate) fn new(network: &NetworkPolicies) -> Option<Self> {
        let ixs = network
            .iter()
            .map(|(_, p)| policy_ix(p))
            .collect::<Option<Vec<_>>>()?;
        Some(Self {
            policies: ixs,
            asks: network.asks(),
        })
    }

    /// Number of policies.
    pub(crate) fn len(&self) -> usize {
        self.policies.len()
    }

    /// Indices (key order) of the policies Rego must see to reach the same
    /// decision as over the whole section.
    pub(crate) fn select(&self, q: &Query<'_>) -> Vec<usize> {
        let host_rewritten = rewrite_host(q.host);
        let mut bounds: Vec<(SortKey, SortKey, bool)> = Vec::new();
        let mut best_upper: Option<SortKey> = None;
        for (pi, pol) in self.policies.iter().enumerate() {
            if pol.endpoints.is_empty() {
                continue;
            }
            let binary_ok = pol.binary_ok(&q.exec_paths);
            for (ei, ep) in pol.endpoints.iter().enumerate() {
                let host_ok = ep.host_ok(q.host, &host_rewritten);
                let port_ok = Tri::from_bool(ep.ports.contains(&q.port));
                let (method_missing, path_missing) = match q.request {
                    None => (Tri::No, Tri::No),
                    Some((method, path)) => ep.l7_missing(method, path),
                };
                let missing = [
                    host_ok.not(),
                    port_ok.not(),
                    binary_ok.not(),
                    method_missing,
                    path_missing,
                ];
                let yes = missing.iter().filter(|m| **m == Tri::Yes).count() as u32;
                let maybe = missing.iter().filter(|m| **m == Tri::Maybe).count() as u32;
                let flag_lo = |t: Tri| u32::from(t == Tri::No);
                let flag_hi = |t: Tri| u32::from(t != Tri::Yes);
                let lower = (yes, flag_lo(host_ok), flag_lo(port_ok), pi, ei);
                let upper = (yes + maybe, flag_hi(host_ok), flag_hi(port_ok), pi, ei);
                // A possible audit match: host, port and binary may all
                // match on an audit endpoint.
                let audit =
                    ep.audit && host_ok != Tri::No && port_ok != Tri::No && binary_ok != Tri::No;
                if best_upper.is_none_or(|b| upper.cmp(&b) == Ordering::Less) {
                    best_upper = Some(upper);
                }
                bounds.push((lower, upper, audit));
            }
        }
        let Some(best) = best_upper else {
            return Vec::new();
        };
        // A CONNECT ranks its full matches by how the tunnel is carried
        // (`connect_rank`), and every decision puts ask endpoints' full
        // matches last, so then every pair that may match fully is kept.
        let all_full = q.request.is_none() || self.asks;
        let mut out: Vec<usize> = bounds
            .iter()
            .filter(|(lower, _, audit)| *audit || *lower <= best || (all_full && lower.0 == 0))
            .map(|(lower, _, _)| lower.3)
            .collect();
        out.dedup();
        out
    }
}

fn policy_ix(p: &NetworkPolicy) -> Option<PolicyIx> {
    let mut exact_binaries = Vec::new();
    let mut glob_binaries = Vec::new();
    for b in &p.binaries {
        let b = b.as_str();
        if b.contains('*') {
            if unmodelled(b) {
                return None;
            }
            glob_binaries.push(Glob::new(b));
        } else {
            exact_binaries.push(b.to_string());
        }
    }
    let endpoints = p
        .endpoints
        .iter()
        .map(endpoint_ix)
        .collect::<Option<Vec<_>>>()?;
    Some(PolicyIx {
        exact_binaries,
        glob_binaries,
        endpoints,
    })
}

fn endpoint_ix(ep: &Endpoint) -> Option<EndpointIx> {
    let host = match &ep.host {
        None if ep.allowed_ips.is_empty() => HostIx::Never,
        None => HostIx::Any,
        Some(h) if h.as_str().contains('*') => {
            if unmodelled(h.as_str()) {
                return None;
            }
            HostIx::Glob(Glob::new(&rewrite_host(h.as_str())))
        }
        Some(h) => HostIx::Exact(h.as_str().to_string()),
    };
    let rules = |rs: &[L7Rule]| {
        rs.iter()
            .map(|r| {
                let path = r.path.as_str();
                let path = if path == "**" {
                    PathIx::Any
                } else if unmodelled(path) {
                    return None;
                } else {
                    PathIx::Glob(Glob::new(path))
                };
                Some(RuleIx {
                    method: r.method.as_str().to_string(),
                    path,
                })
            })
            .collect::<Option<Vec<_>>>()
    };
    Some(EndpointIx {
        host,
        ports: ep.ports.iter().map(|p| p.get()).collect(),
        audit: ep.enforcement == Enforcement::Audit,
        access: ep.access,
        rules: rules(&ep.rules)?,
        deny_rules: rules(&ep.deny_rules)?,
    })
}

impl PolicyIx {
    /// `binary_ok(pol)`.
    fn binary_ok(&self, exec_paths: &[&str]) -> Tri {
        let exact = exec_paths
            .iter()
            .any(|p| self.exact_binaries.iter().any(|b| b == p));
        if exact {
            return Tri::Yes;
        }
        Tri::any(
            self.glob_binaries
                .iter()
                .flat_map(|g| exec_paths.iter().map(move |p| g.test(p))),
        )
    }
}

impl EndpointIx {
    /// `host_ok(ep)`.
    fn host_ok(&self, host: &str, host_rewritten: &str) -> Tri {
        match &self.host {
            HostIx::Exact(h) => Tri::from_bool(h == host),
            HostIx::Glob(g) => g.test(host_rewritten),
            HostIx::Any => Tri::Yes,
            HostIx::Never => Tri::No,
        }
    }

    /// `access == null and count(rules) == 0`.
    fn unrestricted(&self) -> bool {
        self.access.is_none() && self.rules.is_empty()
    }

    /// `unrestricted`, `access == "full"` or the method in the access set.
    fn access_allows(&self, method: &str) -> bool {
        const READ_ONLY: &[&str] = &["GET", "HEAD", "OPTIONS"];
        const READ_WRITE: &[&str] = &["GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"];
        self.unrestricted()
            || match self.access {
                Some(Access::Full) => true,
                Some(Access::ReadOnly) => READ_ONLY.contains(&method),
                Some(Access::ReadWrite) => READ_WRITE.contains(&method),
                None => false,
            }
    }

    /// `part_missing("method")` and `part_missing("path")` with a request.
    fn l7_missing(&self, method: &str, path: &str) -> (Tri, Tri) {
        let method_matches = |pattern: &str| pattern == "*" || pattern == method;
        let path_matches = |p: &PathIx| match p {
            PathIx::Any => Tri::Yes,
            PathIx::Glob(g) => g.test(path),
        };
        let rule_matches =
            |r: &RuleIx| Tri::from_bool(method_matches(&r.method)).and(path_matches(&r.path));
        let access = self.access_allows(method);
        let method_ok = access || self.rules.iter().any(|r| method_matches(&r.method));
        if !method_ok {
            return (Tri::Yes, Tri::No);
        }
        let base_ok = if access {
            Tri::Yes
        } else {
            Tri::any(self.rules.iter().map(rule_matches))
        };
        let denied = Tri::any(self.deny_rules.iter().map(rule_matches));
        let l7_ok = base_ok.and(denied.not());
        (Tri::No, l7_ok.not())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_prefix_and_suffix() {
        let g = Glob::new(&rewrite_host("*.cdn1.example.net"));
        assert_eq!(g.test(&rewrite_host("a.cdn1.example.net")), Tri::Maybe);
        assert_eq!(g.test(&rewrite_host("a.cdn2.example.net")), Tri::No);
        // Only a necessary condition: the real matcher says no here.
        assert_eq!(g.test(&rewrite_host("a.b.cdn1.example.net")), Tri::Maybe);
        let g = Glob::new(&rewrite_host("**.mirror.org"));
        assert_eq!(g.test(&rewrite_host("mirror.org")), Tri::No);
        assert_eq!(g.test(&rewrite_host("x.y.mirror.org")), Tri::Maybe);
        let g = Glob::new("/**/git-upload-pack");
        assert_eq!(g.test("/a/git-upload-pack"), Tri::Maybe);
        assert_eq!(g.test("/a/git-receive-pack"), Tri::No);
        // The `/` before `**` is left out (conservative).
        assert_eq!(g.test("git-upload-pack"), Tri::Maybe);
        let g = Glob::new("/usr/lib/app3/**");
        assert_eq!(g.test("/usr/lib/app3/x/y"), Tri::Maybe);
        assert_eq!(g.test("/usr/lib/app30/x"), Tri::Maybe);
        assert_eq!(g.test("/usr/bin/x"), Tri::No);
        let g = Glob::new("**/x");
        assert_eq!(g.test("x"), Tri::Maybe);
    }
}

//! Credentials the workload never sees: each has a placeholder (random per sandbox,
//! `openshell-cred-<name>-<32 hex digits>`) that the workload holds instead of the value, and
//! the proxy puts the value in its place only in requests on terminated connections to the
//! credential's endpoints, after the policy allowed the request. A placeholder anywhere else
//! (another destination, plain HTTP, a CONNECT head or a passthrough tunnel's first bytes, the
//! request path, the query of a credential without `query: true`) refuses the request.
//!
//! The values live only in the supervisor's memory: the sandbox gets placeholders through
//! its environment, and nothing here writes a value anywhere but into the upstream request.

use base64::Engine as _;

use crate::http::{Head, Target};

/// The text every placeholder starts with.
pub const PLACEHOLDER_PREFIX: &str = "openshell-cred-";

/// One credential with its value, resolved by the supervisor.
pub struct Credential {
    /// The policy's name for it.
    pub name: String,
    /// What the workload holds instead of the value.
    pub placeholder: String,
    value: String,
    /// `(host, port)` pairs the value may be sent to (hosts normalised).
    endpoints: Vec<(String, u16)>,
    /// The value may be substituted in the query string too.
    query: bool,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential")
            .field("name", &self.name)
            .field("placeholder", &self.placeholder)
            .field("endpoints", &self.endpoints)
            .field("query", &self.query)
            .finish_non_exhaustive()
    }
}

/// Why a credential could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The value would break a request header (a control character or a line break).
    #[error("credential {name}: the value contains a control character, which cannot be sent in a header")]
    BadValue {
        /// The credential's name.
        name: String,
    },
    /// The value is empty.
    #[error("credential {name}: the value is empty")]
    Empty {
        /// The credential's name.
        name: String,
    },
    /// The system's random generator failed.
    #[error("cannot generate a placeholder: the random generator failed")]
    Random,
}

impl Credential {
    /// A credential named `name` with `value`, sent only to `endpoints` (`query`: in the query
    /// string too), with a fresh random placeholder.
    pub fn new(
        name: &str,
        value: String,
        endpoints: Vec<(String, u16)>,
        query: bool,
    ) -> Result<Self, CredentialError> {
        if value.is_empty() {
            return Err(CredentialError::Empty { name: name.into() });
        }
        if value.chars().any(|c| c.is_control()) {
            return Err(CredentialError::BadValue { name: name.into() });
        }
        let mut random = [0u8; 16];
        rustls::crypto::aws_lc_rs::default_provider()
            .secure_random
            .fill(&mut random)
            .map_err(|_| CredentialError::Random)?;
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self {
            name: name.to_owned(),
            placeholder: format!("{PLACEHOLDER_PREFIX}{name}-{hex}"),
            value,
            endpoints: endpoints
                .into_iter()
                .map(|(h, p)| (openshell_policy::types::normalise_host(&h), p))
                .collect(),
            query,
        })
    }

    fn serves(&self, host: &str, port: u16) -> bool {
        self.endpoints.iter().any(|(h, p)| h == host && *p == port)
    }
}

/// A placeholder found where it may not go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The credential whose placeholder it is.
    pub(crate) credential: String,
    /// Where it was (`header authorization`, `request path`, ...).
    pub(crate) place: String,
    /// The whole reason, for the 403 and the audit line.
    pub(crate) reason: String,
}

/// Every credential of one sandbox.
#[derive(Debug, Default)]
pub struct CredentialSet {
    entries: Vec<Credential>,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn replace(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(haystack.len() + with.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// `Basic <base64>` credentials, decoded.
fn basic_decoded(value: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, rest) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()
}

/// Percent-encode everything but unreserved characters (for a value put in a query).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl CredentialSet {
    /// The set of `entries`.
    pub fn new(entries: Vec<Credential>) -> Self {
        Self { entries }
    }

    /// The credentials, in the policy's order.
    pub fn iter(&self) -> impl Iterator<Item = &Credential> {
        self.entries.iter()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first credential whose placeholder occurs in `bytes` (as they are, or inside a
    /// `Basic` authorization), for traffic that can never carry a value.
    pub(crate) fn find_in(&self, bytes: &[u8]) -> Option<&Credential> {
        if self.entries.is_empty() {
            return None;
        }
        let decoded: Vec<Vec<u8>> = bytes
            .split(|&b| b == b'\n')
            .filter_map(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let colon = line.iter().position(|&b| b == b':')?;
                basic_decoded(&line[colon + 1..])
            })
            .collect();
        self.entries.iter().find(|c| {
            let p = c.placeholder.as_bytes();
            contains(bytes, p) || decoded.iter().any(|d| contains(d, p))
        })
    }

    /// A refusal for `credential`'s placeholder found in `place` on the way to `host:port`.
    pub(crate) fn refusal(credential: &Credential, place: &str, host: &str, port: u16) -> Refusal {
        let why = if credential.serves(host, port) {
            match place {
                "query" => "its policy entry does not allow the query string (query: true)",
                "plain HTTP request" | "CONNECT request" | "passthrough tunnel" => {
                    "the value is only ever sent on a terminated TLS connection (tls: terminate)"
                }
                _ => {
                    "the value is only ever put in request headers (or the query with query: true)"
                }
            }
        } else {
            "that is not one of its endpoints"
        };
        Refusal {
            credential: credential.name.clone(),
            place: place.to_owned(),
            reason: format!(
                "the placeholder of credential {} was sent to {host}:{port} in the {place}, and {why}: refused",
                credential.name
            ),
        }
    }

    /// Put the values in place of their placeholders in a request on a terminated connection
    /// to `host:port` (already allowed by the policy): in header values (also inside a
    /// `Basic` authorization) and, for a credential with `query: true`, in the query string.
    /// A placeholder for another destination, in the path, in a header name, or in the query
    /// of a credential without `query: true`, refuses the whole request. Returns the names of
    /// the credentials used.
    pub(crate) fn apply(
        &self,
        head: &mut Head,
        host: &str,
        port: u16,
    ) -> Result<Vec<String>, Refusal> {
        let mut used = Vec::new();
        if self.entries.is_empty() {
            return Ok(used);
        }
        for c in &self.entries {
            let p = c.placeholder.as_bytes();
            if let Target::Forward { path, origin, .. } = &mut head.target {
                if contains(path.as_bytes(), p) {
                    return Err(Self::refusal(c, "request path", host, port));
                }
                if contains(origin.as_bytes(), p) {
                    if !(c.serves(host, port) && c.query) {
                        return Err(Self::refusal(c, "query", host, port));
                    }
                    *origin = String::from_utf8_lossy(&replace(
                        origin.as_bytes(),
                        p,
                        percent_encode(&c.value).as_bytes(),
                    ))
                    .into_owned();
                    used.push(c.name.clone());
                }
            }
            if contains(head.method.as_bytes(), p) {
                return Err(Self::refusal(c, "request method", host, port));
            }
            for (name, value) in &mut head.headers {
                if contains(name.as_bytes(), p) {
                    return Err(Self::refusal(c, "header name", host, port));
                }
                let plain = contains(value, p);
                let basic = basic_decoded(value).filter(|d| contains(d, p));
                if !plain && basic.is_none() {
                    continue;
                }
                if !c.serves(host, port) {
                    return Err(Self::refusal(c, &format!("header {name}"), host, port));
                }
                if plain {
                    *value = replace(value, p, c.value.as_bytes());
                } else if let Some(decoded) = basic {
                    let real = replace(&decoded, p, c.value.as_bytes());
                    let encoded = base64::engine::general_purpose::STANDARD.encode(real);
                    *value = format!("Basic {encoded}").into_bytes();
                }
                if !used.contains(&c.name) {
                    used.push(c.name.clone());
                }
            }
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{parse_head_in, Form};
    use pretty_assertions::assert_eq;

    fn set(query: bool) -> (CredentialSet, String) {
        let c = Credential::new(
            "api",
            "s3cr3t/value".into(),
            vec![("API.example.com".into(), 443)],
            query,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let p = c.placeholder.clone();
        (CredentialSet::new(vec![c]), p)
    }

    fn head(raw: &str) -> Head {
        head_to(raw, "api.example.com")
    }

    fn head_to(raw: &str, host: &str) -> Head {
        match parse_head_in(raw.as_bytes(), Form::Tunnel { host, port: 443 }) {
            Ok(Some(h)) => h,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn placeholders_are_random_and_recognisable() {
        let (_, a) = set(false);
        let (_, b) = set(false);
        assert_ne!(a, b);
        assert!(
            a.starts_with("openshell-cred-api-") && a.len() == "openshell-cred-api-".len() + 32
        );
    }

    #[test]
    fn headers_get_the_value_only_for_the_endpoint() {
        let (creds, p) = set(false);
        let raw = format!("GET /v1 HTTP/1.1\r\nHost: api.example.com\r\nX-Api-Key: {p}\r\nAuthorization: Bearer {p}\r\n\r\n");
        let mut h = head(&raw);
        assert_eq!(
            creds.apply(&mut h, "api.example.com", 443),
            Ok(vec!["api".to_string()])
        );
        let values: Vec<String> = h
            .headers
            .iter()
            .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v)))
            .collect();
        assert_eq!(
            values,
            vec![
                "host: api.example.com".to_string(),
                "x-api-key: s3cr3t/value".to_string(),
                "authorization: Bearer s3cr3t/value".to_string(),
            ]
        );
        let mut other = head_to(
            &raw.replace("api.example.com", "other.example.com"),
            "other.example.com",
        );
        let refused = creds.apply(&mut other, "other.example.com", 443);
        assert_eq!(
            refused.map_err(|r| (r.credential, r.place)),
            Err(("api".to_string(), "header x-api-key".to_string()))
        );
    }

    #[test]
    fn basic_authorization_is_decoded_and_re_encoded() {
        let (creds, p) = set(false);
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{p}"));
        let mut h = head(&format!(
            "GET / HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Basic {basic}\r\n\r\n"
        ));
        assert_eq!(
            creds.apply(&mut h, "api.example.com", 443),
            Ok(vec!["api".to_string()])
        );
        let want = base64::engine::general_purpose::STANDARD.encode("x-access-token:s3cr3t/value");
        assert_eq!(h.headers[1].1, format!("Basic {want}").into_bytes());
        assert!(creds
            .find_in(
                format!("CONNECT a:443 HTTP/1.1\r\nProxy-Authorization: Basic {basic}\r\n\r\n")
                    .as_bytes()
            )
            .is_some());
    }

    #[test]
    fn the_query_needs_query_true_and_the_path_never_carries_a_value() {
        let (creds, p) = set(false);
        let mut h = head(&format!(
            "GET /v1?key={p} HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
        ));
        assert_eq!(
            creds
                .apply(&mut h, "api.example.com", 443)
                .map_err(|r| r.place),
            Err("query".to_string())
        );
        let (creds, p) = set(true);
        let mut h = head(&format!(
            "GET /v1?key={p}&a=1 HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
        ));
        assert_eq!(
            creds.apply(&mut h, "api.example.com", 443),
            Ok(vec!["api".to_string()])
        );
        let Target::Forward { origin, .. } = &h.target else {
            panic!("not a forward target");
        };
        assert_eq!(origin, "/v1?key=s3cr3t%2Fvalue&a=1");
        let mut h = head(&format!(
            "GET /v1/{p} HTTP/1.1\r\nHost: api.example.com\r\n\r\n"
        ));
        assert_eq!(
            creds
                .apply(&mut h, "api.example.com", 443)
                .map_err(|r| r.place),
            Err("request path".to_string())
        );
    }

    #[test]
    fn values_that_would_break_a_header_are_refused() {
        assert!(matches!(
            Credential::new("x", "a\r\nb".into(), vec![], false),
            Err(CredentialError::BadValue { .. })
        ));
        assert!(matches!(
            Credential::new("x", String::new(), vec![], false),
            Err(CredentialError::Empty { .. })
        ));
    }
}

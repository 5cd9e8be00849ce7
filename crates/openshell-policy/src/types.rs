//! Validated newtypes. Each is built with `TryFrom` and also deserialises
//! through the same check, inside serde's visitor, so serde_yaml attaches the
//! position of the offending value to the error.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a single value was rejected. The message is what the user sees after
/// `file:line:column: field.path: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub(crate) String);

impl InvalidValue {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Implements `Serialize` (as a string) and `Deserialize` (string visitor that
/// calls `TryFrom<&str>`) for a newtype.
macro_rules! string_newtype_serde {
    ($ty:ident, $expecting:literal) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.to_string())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        $ty::try_from(v).map_err(E::custom)
                    }
                }
                deserializer.deserialize_str(V)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = InvalidValue;
            fn try_from(value: String) -> Result<Self, InvalidValue> {
                Self::try_from(value.as_str())
            }
        }
    };
}

// ---------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------

/// Lexically normalise an absolute path: collapse `//` and `.`, refuse `..`.
/// `allow_glob` permits `*` and `**` segments (binary patterns).
fn normalise_abs_path(raw: &str, what: &str, allow_glob: bool) -> Result<String, InvalidValue> {
    if raw.is_empty() {
        return Err(InvalidValue::new(format!("{what} must not be empty")));
    }
    if raw.contains('\0') {
        return Err(InvalidValue::new(format!("{what} must not contain NUL")));
    }
    if !raw.starts_with('/') {
        return Err(InvalidValue::new(format!(
            "{what} must be absolute, got {raw}"
        )));
    }
    let mut parts: Vec<&str> = Vec::new();
    for seg in raw.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                return Err(InvalidValue::new(format!(
                    "{what} must not contain .., got {raw}"
                )))
            }
            s => {
                if allow_glob {
                    check_glob_segment(s, what)?;
                } else if s.contains('*') {
                    return Err(InvalidValue::new(format!(
                        "{what} must not contain glob characters, got {raw}"
                    )));
                }
                parts.push(s);
            }
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

/// A glob segment may use `*` anywhere and `**` only as the whole segment,
/// and none of the other glob metacharacters (they would be matched as globs
/// by the engine, which a path author rarely means).
fn check_glob_segment(seg: &str, what: &str) -> Result<(), InvalidValue> {
    if let Some(c) = seg
        .chars()
        .find(|c| matches!(c, '?' | '[' | ']' | '{' | '}' | '\\'))
    {
        return Err(InvalidValue::new(format!(
            "{what} must not contain {c}; only * and ** globs are supported"
        )));
    }
    if seg.contains("**") && seg != "**" {
        return Err(InvalidValue::new(format!(
            "{what}: ** must be a whole segment, got {seg}"
        )));
    }
    Ok(())
}

/// An absolute, lexically normalised filesystem path (no `..`, no `.`, no
/// empty segments, no NUL, no globs).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SandboxPath(String);

impl SandboxPath {
    /// The path as a `std::path::Path`.
    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for the filesystem root `/`.
    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }
}

impl TryFrom<&str> for SandboxPath {
    type Error = InvalidValue;
    fn try_from(value: &str) -> Result<Self, InvalidValue> {
        normalise_abs_path(value, "path", false).map(Self)
    }
}

impl fmt::Display for SandboxPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype_serde!(SandboxPath, "an absolute path");

/// An executable path or glob (`*` within one segment, `**` across segments),
/// matched against the resolved executable of the calling process and of its
/// ancestors.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BinaryPattern(String);

impl BinaryPattern {
    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when the pattern contains a glob.
    pub fn is_glob(&self) -> bool {
        self.0.contains('*')
    }
}

impl TryFrom<&str> for BinaryPattern {
    type Error = InvalidValue;
    fn try_from(value: &str) -> Result<Self, InvalidValue> {
        let p = normalise_abs_path(value, "binary path", true)?;
        if p == "/" {
            return Err(InvalidValue::new("binary path must name a file, got /"));
        }
        Ok(Self(p))
    }
}

impl fmt::Display for BinaryPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype_serde!(BinaryPattern, "an absolute executable path or glob");

// ---------------------------------------------------------------------------
// Hosts
// ---------------------------------------------------------------------------

/// A host name or glob, lowercased with any trailing dot removed. `*` matches
/// within one DNS label, `**` across labels (`*.example.com` matches
/// `a.example.com` but neither `example.com` nor `a.b.example.com`).
/// IP literals are accepted as exact hosts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPattern(String);

impl HostPattern {
    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when the pattern contains a glob.
    pub fn is_glob(&self) -> bool {
        self.0.contains('*')
    }
}

/// Lowercase a host and remove one trailing dot (the form the decision engine
/// compares).
pub fn normalise_host(host: &str) -> String {
    let lower = host.to_ascii_lowercase();
    match lower.strip_suffix('.') {
        Some(s) => s.to_string(),
        None => lower,
    }
}

impl TryFrom<&str> for HostPattern {
    type Error = InvalidValue;
    fn try_from(value: &str) -> Result<Self, InvalidValue> {
        if value.contains("://") {
            return Err(InvalidValue::new(format!(
                "host must be a bare name without a scheme, got {value}"
            )));
        }
        let bracketless = value
            .strip_prefix('[')
            .and_then(|v| v.strip_suffix(']'))
            .unwrap_or(value);
        if let Ok(ip) = bracketless.parse::<Ipv6Addr>() {
            return Ok(Self(ip.to_string()));
        }
        let host = normalise_host(value);
        if host.is_empty() {
            return Err(InvalidValue::new("host must not be empty"));
        }
        if host.contains(':') {
            return Err(InvalidValue::new(format!(
                "host must not contain a port, use port or ports, got {value}"
            )));
        }
        if let Some(c) = host
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '*')))
        {
            let what = if c.is_whitespace() {
                "whitespace".to_string()
            } else {
                format!("{c:?}")
            };
            return Err(InvalidValue::new(format!(
                "host must contain only letters, digits, -, _, . and *; found {what} in {value}"
            )));
        }
        for label in host.split('.') {
            if label.is_empty() {
                return Err(InvalidValue::new(format!(
                    "host has an empty label, got {value}"
                )));
            }
            if label.contains("**") && label != "**" {
                return Err(InvalidValue::new(format!(
                    "host: ** must be a whole label, got {value}"
                )));
            }
        }
        Ok(Self(host))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype_serde!(HostPattern, "a host name or glob");

// ---------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------

/// A TCP port, 1..=65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Port(u16);

impl Port {
    /// The port number.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl TryFrom<u64> for Port {
    type Error = InvalidValue;
    fn try_from(value: u64) -> Result<Self, InvalidValue> {
        match u16::try_from(value) {
            Ok(p) if p >= 1 => Ok(Self(p)),
            _ => Err(InvalidValue::new("expected 1..=65535")),
        }
    }
}

impl TryFrom<i64> for Port {
    type Error = InvalidValue;
    fn try_from(value: i64) -> Result<Self, InvalidValue> {
        u64::try_from(value)
            .map_err(|_| InvalidValue::new("expected 1..=65535"))
            .and_then(Self::try_from)
    }
}

impl TryFrom<u16> for Port {
    type Error = InvalidValue;
    fn try_from(value: u16) -> Result<Self, InvalidValue> {
        Self::try_from(u64::from(value))
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number 1..=65535")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                Port::try_from(v).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                Port::try_from(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// CIDR
// ---------------------------------------------------------------------------

/// An IP network (`10.0.0.0/8`, `2001:db8::/32`); a plain address is a /32 or
/// /128. Host bits beyond the prefix are cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// True when `ip` lies in this network (an IPv4 address never lies in an
    /// IPv6 network and the other way round).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask_v4(ip, self.prefix) == net,
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask_v6(ip, self.prefix) == net,
            _ => false,
        }
    }
}

fn mask_v4(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let bits = u32::from(ip);
    let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
    Ipv4Addr::from(bits & mask)
}

fn mask_v6(ip: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let bits = u128::from(ip);
    let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
    Ipv6Addr::from(bits & mask)
}

impl TryFrom<&str> for IpNet {
    type Error = InvalidValue;
    fn try_from(value: &str) -> Result<Self, InvalidValue> {
        let bad = || {
            InvalidValue::new(format!(
                "expected an IP address or CIDR like 10.0.0.0/8, got {value}"
            ))
        };
        let (addr_text, prefix_text) = match value.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (value, None),
        };
        let addr: IpAddr = addr_text.parse().map_err(|_| bad())?;
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => max,
            Some(p) => {
                if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 3 {
                    return Err(bad());
                }
                let n: u8 = p.parse().map_err(|_| bad())?;
                if n > max {
                    return Err(InvalidValue::new(format!(
                        "prefix /{n} is longer than {max} bits in {value}"
                    )));
                }
                n
            }
        };
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(mask_v4(a, prefix)),
            IpAddr::V6(a) => IpAddr::V6(mask_v6(a, prefix)),
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

string_newtype_serde!(IpNet, "an IP address or CIDR");

// ---------------------------------------------------------------------------
// L7 rules
// ---------------------------------------------------------------------------

/// An HTTP method (uppercased) or `*` for any method.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MethodPattern(String);

impl MethodPattern {
    /// Any method.
    pub fn any() -> Self {
        Self("*".to_string())
    }

    /// The method as text (`GET`, `*`, ...).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for MethodPattern {
    type Error = InvalidValue;
    fn try_from(value: &str) -> Result<Self, InvalidValue> {
        if value == "*" {
            return Ok(Self::any());
        }
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(InvalidValue::new(format!(
                "expected an HTTP method like GET or *, got {value:?}"
            )));
        }
        Ok(Self(value.to_ascii_uppercase()))
    }
}

impl fmt::Display for MethodPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype_serde!(MethodPattern, "an HTTP method or *");

/// A URL path glob (`/simple/**`, `/**/info/refs*`); `*` stays within one
/// path segment, `**` crosses segments, and `**` alone matches any path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PathPattern(String);

impl PathPattern {
    /// Any path.
    pub fn any() -> Self {
        Self("**".to_string())
    }

    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for PathPattern {
    type Error = InvalidValue;
    fn try_from(value: &str) -> Result<Self, InvalidValue> {
        if value == "**" || value == "*" {
            return Ok(Self::any());
        }
        if !value.starts_with('/') {
            return Err(InvalidValue::new(format!(
                "path must start with / (or be **), got {value:?}"
            )));
        }
        if value.chars().any(|c| c.is_whitespace() || c == '\0') {
            return Err(InvalidValue::new(format!(
                "path must not contain whitespace, got {value:?}"
            )));
        }
        for seg in value.split('/') {
            check_glob_segment(seg, "path")?;
        }
        Ok(Self(value.to_string()))
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

string_newtype_serde!(PathPattern, "a URL path glob");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_path_normalises() {
        let cases = [
            ("/usr//lib/./x/", Ok("/usr/lib/x")),
            ("/", Ok("/")),
            ("//", Ok("/")),
            ("usr", Err(())),
            ("", Err(())),
            ("/a/../b", Err(())),
            ("/a\0b", Err(())),
            ("/a/*", Err(())),
        ];
        for (input, want) in cases {
            let got = SandboxPath::try_from(input)
                .map(|p| p.to_string())
                .map_err(|_| ());
            assert_eq!(got, want.map(str::to_string), "input {input:?}");
        }
    }

    #[test]
    fn ipnet_parses_and_contains() {
        let net = IpNet::try_from("10.1.2.3/8").map_err(|e| e.to_string());
        assert_eq!(net.map(|n| n.to_string()), Ok("10.0.0.0/8".to_string()));
        let single = IpNet::try_from("192.168.1.1").map(|n| n.to_string());
        assert_eq!(single, Ok("192.168.1.1/32".to_string()));
        let v6 = IpNet::try_from("2001:db8::1/32").map(|n| n.to_string());
        assert_eq!(v6, Ok("2001:db8::/32".to_string()));
        let zero = IpNet::try_from("0.0.0.0/0").map(|n| n.to_string());
        assert_eq!(zero, Ok("0.0.0.0/0".to_string()));
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "x",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "::/129",
        ] {
            assert!(IpNet::try_from(bad).is_err(), "{bad}");
        }
        let Ok(net) = IpNet::try_from("10.0.0.0/8") else {
            panic!("valid cidr rejected");
        };
        assert!(net.contains(
            "10.200.0.1"
                .parse()
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        ));
        assert!(!net.contains(
            "11.0.0.1"
                .parse()
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        ));
    }

    #[test]
    fn host_pattern_rules() {
        let cases = [
            ("PyPI.org.", Ok("pypi.org")),
            ("*.pythonhosted.org", Ok("*.pythonhosted.org")),
            ("**.example.com", Ok("**.example.com")),
            ("::1", Ok("::1")),
            ("https://x", Err(())),
            ("example.com:443", Err(())),
            ("a b", Err(())),
            ("", Err(())),
            ("a..b", Err(())),
            ("a**.com", Err(())),
        ];
        for (input, want) in cases {
            let got = HostPattern::try_from(input)
                .map(|p| p.to_string())
                .map_err(|_| ());
            assert_eq!(got, want.map(str::to_string), "input {input:?}");
        }
    }
}

//! The YAML wire format (OpenShell policy v1 plus our `resources` section).
//! This is the only module that knows about serde_yaml.
//!
//! Single values are validated during deserialisation (see [`crate::types`])
//! so serde_yaml reports where they are; cross-field checks happen later in
//! [`crate::model`] and find their position with [`locate`].

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::PolicyError;
use crate::resources::{self, Limit, UNLIMITED};
use crate::types::{
    BinaryPattern, HostPattern, IpNet, MethodPattern, PathPattern, Port, SandboxPath,
};
use crate::{Access, Enforcement, LandlockCompatibility, Protocol, TlsMode, TmpMode};

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
    pub version: Version,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem_policy: Option<FilesystemDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub landlock: Option<LandlockDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policies: Option<UniqueMap<NetworkPolicyDef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesDef>,
    /// Our extension: secrets the proxy adds to requests the workload makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<UniqueMap<CredentialDef>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CredentialDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_file: Option<SandboxPath>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Vec<CredentialEndpointDef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CredentialEndpointDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostPattern>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilesystemDef {
    #[serde(default)]
    pub include_workdir: Option<bool>,
    #[serde(default)]
    pub read_only: Option<Vec<SandboxPath>>,
    #[serde(default)]
    pub read_write: Option<Vec<SandboxPath>>,
    /// Our extension: whose `/tmp` the sandbox sees (default `private`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp: Option<TmpMode>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LandlockDef {
    #[serde(default)]
    pub compatibility: Option<LandlockCompatibility>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProcessDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as_group: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResourcesDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<MemoryMib>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Cpus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<Pids>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NetworkPolicyDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub endpoints: Option<Vec<EndpointDef>>,
    #[serde(default)]
    pub binaries: Option<Vec<BinaryDef>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EndpointDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<HostPattern>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Port>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<Port>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<Access>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<RuleDef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny_rules: Option<Vec<MethodPathDef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_ips: Option<Vec<IpNet>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_encoded_slash: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleDef {
    pub allow: MethodPathDef,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MethodPathDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<MethodPattern>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathPattern>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BinaryDef {
    pub path: BinaryPattern,
    /// Deprecated in OpenShell and ignored there; accepted so old files load.
    #[serde(default, skip_serializing)]
    #[allow(dead_code)]
    pub harness: Option<bool>,
}

// ---------------------------------------------------------------------------
// Small validated scalars (checked inside the visitor for exact positions)
// ---------------------------------------------------------------------------

macro_rules! int_scalar {
    ($ty:ident, $inner:ty, $expecting:literal, $check:expr) => {
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub(crate) struct $ty(pub $inner);

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.0.serialize(s)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$ty, E> {
                        let check: fn(i128) -> Result<$inner, String> = $check;
                        check(i128::from(v)).map($ty).map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$ty, E> {
                        let check: fn(i128) -> Result<$inner, String> = $check;
                        check(i128::from(v)).map($ty).map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

int_scalar!(Version, u32, "policy version 1", |v| if v == 1 {
    Ok(1)
} else {
    Err(format!("unsupported version {v}, expected 1"))
});

/// A limit in the YAML: an integer checked by `check`, or `unlimited`.
macro_rules! int_limit {
    ($ty:ident, $expecting:literal, $check:path) => {
        #[derive(Debug, Clone, Copy, PartialEq)]
        pub(crate) struct $ty(pub Limit<u64>);

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                self.0.serialize(s)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$ty, E> {
                        $check(i128::from(v))
                            .map(|v| $ty(Limit::Max(v)))
                            .map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$ty, E> {
                        $check(i128::from(v))
                            .map(|v| $ty(Limit::Max(v)))
                            .map_err(E::custom)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        if v == UNLIMITED {
                            Ok($ty(Limit::Unlimited))
                        } else {
                            Err(E::custom(resources::not_unlimited(v)))
                        }
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

int_limit!(
    MemoryMib,
    "memory in MiB (>= 16) or unlimited",
    resources::check_memory_mib
);

int_limit!(
    Pids,
    "a process count (>= 1) or unlimited",
    resources::check_pids
);

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Cpus(pub Limit<f64>);

impl Serialize for Cpus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Cpus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Cpus;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of CPUs or unlimited")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Cpus, E> {
                resources::check_cpus(v)
                    .map(|v| Cpus(Limit::Max(v)))
                    .map_err(E::custom)
            }
            #[allow(clippy::cast_precision_loss)]
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Cpus, E> {
                self.visit_f64(v as f64)
            }
            #[allow(clippy::cast_precision_loss)]
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Cpus, E> {
                self.visit_f64(v as f64)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cpus, E> {
                if v == UNLIMITED {
                    Ok(Cpus(Limit::Unlimited))
                } else {
                    Err(E::custom(resources::not_unlimited(v)))
                }
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// A map that refuses duplicate keys (serde's BTreeMap keeps the last one)
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub(crate) struct UniqueMap<V>(pub BTreeMap<String, V>);

impl<V: Serialize> Serialize for UniqueMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of named network policies")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(de::Error::custom(format!("duplicate policy {key}")));
                    }
                    let value = map.next_value::<V>()?;
                    out.insert(key, value);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(MapVisitor(PhantomData))
    }
}

// ---------------------------------------------------------------------------
// Parsing and rendering
// ---------------------------------------------------------------------------

/// Parse the wire form, turning serde_yaml / serde_path_to_error failures into
/// a positioned [`PolicyError`].
pub(crate) fn parse(source_name: &str, text: &str) -> Result<PolicyFile, PolicyError> {
    if is_blank(text) {
        return Err(PolicyError::new(
            source_name,
            1,
            1,
            "",
            "empty policy document, expected at least version: 1",
        ));
    }
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize::<_, PolicyFile>(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let (line, column) = inner.location().map_or((1, 1), |l| (l.line(), l.column()));
        let path = if path == "." || path == "?" {
            String::new()
        } else {
            path
        };
        let message = clean_message(&inner, &path);
        // An unknown field is a problem of the mapping that holds it.
        let path = if message.starts_with("unknown field") {
            match path.rfind(['.', '[']) {
                Some(i) => path[..i].to_string(),
                None => String::new(),
            }
        } else {
            path
        };
        PolicyError::new(source_name, line, column, &path, &message)
    })
}

/// True when the text holds no YAML content (only whitespace and comments).
fn is_blank(text: &str) -> bool {
    text.lines().all(|l| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#')
    })
}

/// serde_yaml's Display is `[path: ]message[ at line L column C]`; keep only
/// the message (position and path are reported separately) and drop serde's
/// backticks around names.
fn clean_message(err: &serde_yaml::Error, path: &str) -> String {
    let mut text = strip_positions(&err.to_string());
    // serde_yaml prefixes its own path, which is the failing node or one of
    // its parents; both are prefixes of serde_path_to_error's path.
    let mut candidate = path;
    while !candidate.is_empty() {
        if let Some(rest) = text.strip_prefix(&format!("{candidate}: ")) {
            text = rest.to_string();
            break;
        }
        candidate = match candidate.rfind(['.', '[']) {
            Some(i) => &candidate[..i],
            None => "",
        };
    }
    let mut text = text.replace('`', "");
    // serde names our internal wire structs; say what the user must write.
    if let Some(i) = text.find("expected struct ") {
        text.truncate(i);
        text.push_str("expected a mapping");
    }
    text
}

/// Remove every ` at line L column C` (libyaml puts them mid-message too).
fn strip_positions(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(" at line ") {
        let (before, after) = rest.split_at(i);
        out.push_str(before);
        let tail = &after[" at line ".len()..];
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        let tail2 = &tail[digits..];
        if digits > 0 && tail2.starts_with(" column ") {
            let tail3 = &tail2[" column ".len()..];
            let digits2 = tail3.bytes().take_while(u8::is_ascii_digit).count();
            if digits2 > 0 {
                rest = &tail3[digits2..];
                continue;
            }
        }
        out.push_str(" at line ");
        rest = tail;
    }
    out.push_str(rest);
    out
}

pub(crate) fn render(file: &PolicyFile) -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(file)
}

// ---------------------------------------------------------------------------
// Locating a node by path (for cross-field errors)
// ---------------------------------------------------------------------------

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Render a path as `a.b[0].c`.
pub(crate) fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

const LOCATE_MARKER: &str = "openshell-policy: located";

/// Find the 1-based line and column of the YAML node at `path` by walking the
/// document with serde_yaml and failing on purpose at that node: serde_yaml
/// then attaches the node's own mark to the error. Works for block and flow
/// style alike because it is the real parser. Falls back to the closest
/// existing ancestor, then to 1:1.
pub(crate) fn locate(text: &str, path: &[Seg]) -> (usize, usize) {
    for len in (0..=path.len()).rev() {
        let Some(prefix) = path.get(..len) else {
            continue;
        };
        let de = serde_yaml::Deserializer::from_str(text);
        if let Err(err) = Locate(prefix).deserialize(de) {
            if err.to_string().contains(LOCATE_MARKER) {
                if let Some(loc) = err.location() {
                    return (loc.line(), loc.column());
                }
            }
        }
    }
    (1, 1)
}

struct Locate<'a>(&'a [Seg]);

impl<'de> DeserializeSeed<'de> for Locate<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Locate<'_> {
    fn hit<E: de::Error>(&self) -> Result<(), E> {
        if self.0.is_empty() {
            Err(E::custom(LOCATE_MARKER))
        } else {
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for Locate<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.hit()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.hit()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.hit()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.hit()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.hit()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.hit()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.hit()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.hit()?;
        let (want, rest) = match self.0.split_first() {
            Some((Seg::Index(i), rest)) => (Some(*i), rest),
            _ => (None, &[][..]),
        };
        let mut index = 0usize;
        loop {
            if Some(index) == want {
                if seq.next_element_seed(Locate(rest))?.is_none() {
                    return Ok(());
                }
            } else if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.hit()?;
        let (want, rest) = match self.0.split_first() {
            Some((Seg::Key(k), rest)) => (Some(k.as_str()), rest),
            _ => (None, &[][..]),
        };
        while let Some(key) = map.next_key::<KeyText>()? {
            if want == Some(key.0.as_str()) {
                map.next_value_seed(Locate(rest))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// A mapping key rendered as text (scalars only; other keys never match).
struct KeyText(String);

impl<'de> Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText(String::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyText, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(KeyText(String::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyText, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(KeyText(String::new()))
            }
        }
        d.deserialize_any(V)
    }
}

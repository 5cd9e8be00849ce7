//! `resources` (our extension): what the policy file wrote, and the limits that apply.
//!
//! A field left out gets its default ([`EffectiveResources::DEFAULT`], what
//! `policies/default.yaml` ships); a resource is unlimited only when the policy (or the CLI)
//! says `unlimited`. The bounds are checked here, once, for the YAML and the CLI alike.

use std::fmt;

use serde::{Serialize, Serializer};

use crate::types::InvalidValue;

/// A limit on one resource: a bound, or the explicit opt-out `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit<T> {
    /// At most this much.
    Max(T),
    /// No limit. Only ever written explicitly (`unlimited`), never a default.
    Unlimited,
}

impl<T: Copy> Limit<T> {
    /// The bound, or `None` when unlimited.
    pub fn max(self) -> Option<T> {
        match self {
            Limit::Max(v) => Some(v),
            Limit::Unlimited => None,
        }
    }
}

impl<T: fmt::Display> fmt::Display for Limit<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Max(v) => v.fmt(f),
            Limit::Unlimited => f.write_str(UNLIMITED),
        }
    }
}

/// A number, or the string `unlimited`: the YAML spelling.
impl<T: Serialize> Serialize for Limit<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Limit::Max(v) => v.serialize(s),
            Limit::Unlimited => s.serialize_str(UNLIMITED),
        }
    }
}

/// The spelling of the opt-out, in the policy and on the CLI.
pub const UNLIMITED: &str = "unlimited";

/// `resources` as the policy file wrote it. A field left out is `None`: it gets its default in
/// [`Resources::effective`], so a policy without `resources` is limited all the same.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Resources {
    /// Memory limit in MiB (at least 16), or unlimited.
    pub memory_mib: Option<Limit<u64>>,
    /// CPU limit in CPUs (finite, > 0 and <= 1024), or unlimited.
    pub cpus: Option<Limit<f64>>,
    /// Most processes and threads (at least 1), or unlimited.
    pub pids: Option<Limit<u64>>,
}

/// The limits that apply: every resource decided.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EffectiveResources {
    pub memory_mib: Limit<u64>,
    pub cpus: Limit<f64>,
    pub pids: Limit<u64>,
}

impl EffectiveResources {
    /// What a resource left out of the policy gets (the values `policies/default.yaml` ships).
    pub const DEFAULT: EffectiveResources = EffectiveResources {
        memory_mib: Limit::Max(1024),
        cpus: Limit::Max(1.0),
        pids: Limit::Max(512),
    };

    /// True when at least one resource is limited.
    pub fn any_limited(&self) -> bool {
        self.memory_mib.max().is_some() || self.cpus.max().is_some() || self.pids.max().is_some()
    }
}

impl Resources {
    /// The limits that apply: what the file said, defaults for what it left out.
    pub fn effective(&self) -> EffectiveResources {
        let d = EffectiveResources::DEFAULT;
        EffectiveResources {
            memory_mib: self.memory_mib.unwrap_or(d.memory_mib),
            cpus: self.cpus.unwrap_or(d.cpus),
            pids: self.pids.unwrap_or(d.pids),
        }
    }

    /// The fields left out (which [`Resources::effective`] fills with defaults), in schema order.
    pub fn defaulted(&self) -> Vec<&'static str> {
        [
            ("memory_mib", self.memory_mib.is_none()),
            ("cpus", self.cpus.is_none()),
            ("pids", self.pids.is_none()),
        ]
        .into_iter()
        .filter_map(|(name, missing)| missing.then_some(name))
        .collect()
    }
}

/// Every field written out: the form `--check-policy` prints.
impl From<EffectiveResources> for Resources {
    fn from(e: EffectiveResources) -> Self {
        Resources {
            memory_mib: Some(e.memory_mib),
            cpus: Some(e.cpus),
            pids: Some(e.pids),
        }
    }
}

// ---------------------------------------------------------------------------
// Bounds, shared by the YAML visitors and the CLI parsers
// ---------------------------------------------------------------------------

pub(crate) fn check_memory_mib(v: i128) -> Result<u64, String> {
    u64::try_from(v)
        .ok()
        .filter(|v| *v >= 16)
        .ok_or_else(|| "expected at least 16".to_string())
}

pub(crate) fn check_pids(v: i128) -> Result<u64, String> {
    u64::try_from(v)
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| "expected at least 1".to_string())
}

pub(crate) fn check_cpus(v: f64) -> Result<f64, String> {
    if v.is_finite() && v > 0.0 && v <= 1024.0 {
        Ok(v)
    } else {
        Err("expected a number > 0 and <= 1024".to_string())
    }
}

/// The message for a string that is not `unlimited`.
pub(crate) fn not_unlimited(v: &str) -> String {
    format!("expected a number or {UNLIMITED}, got {v:?}")
}

fn parse_int(
    text: &str,
    check: fn(i128) -> Result<u64, String>,
) -> Result<Limit<u64>, InvalidValue> {
    if text == UNLIMITED {
        return Ok(Limit::Unlimited);
    }
    let n: i128 = text
        .parse()
        .map_err(|_| InvalidValue(not_unlimited(text)))?;
    check(n).map(Limit::Max).map_err(InvalidValue)
}

/// `--memory-mib`: MiB (at least 16) or `unlimited`.
pub fn parse_memory_mib(text: &str) -> Result<Limit<u64>, InvalidValue> {
    parse_int(text, check_memory_mib)
}

/// `--pids`: a count (at least 1) or `unlimited`.
pub fn parse_pids(text: &str) -> Result<Limit<u64>, InvalidValue> {
    parse_int(text, check_pids)
}

/// `--cpus`: CPUs (finite, > 0 and <= 1024) or `unlimited`.
pub fn parse_cpus(text: &str) -> Result<Limit<f64>, InvalidValue> {
    if text == UNLIMITED {
        return Ok(Limit::Unlimited);
    }
    let n: f64 = text
        .parse()
        .map_err(|_| InvalidValue(not_unlimited(text)))?;
    check_cpus(n).map(Limit::Max).map_err(InvalidValue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn left_out_fields_get_the_defaults_and_say_so() {
        let said = Resources {
            memory_mib: None,
            cpus: Some(Limit::Unlimited),
            pids: Some(Limit::Max(64)),
        };
        assert_eq!(
            said.effective(),
            EffectiveResources {
                memory_mib: Limit::Max(1024),
                cpus: Limit::Unlimited,
                pids: Limit::Max(64),
            }
        );
        assert_eq!(said.defaulted(), vec!["memory_mib"]);
        assert_eq!(
            Resources::default().effective(),
            EffectiveResources::DEFAULT
        );
        assert_eq!(
            Resources::default().defaulted(),
            vec!["memory_mib", "cpus", "pids"]
        );
        assert_eq!(
            Resources::from(said.effective()).defaulted(),
            Vec::<&str>::new()
        );
    }

    #[test]
    fn only_unlimited_everywhere_is_unlimited() {
        let none = EffectiveResources {
            memory_mib: Limit::Unlimited,
            cpus: Limit::Unlimited,
            pids: Limit::Unlimited,
        };
        assert!(!none.any_limited());
        assert!(EffectiveResources::DEFAULT.any_limited());
        assert!(EffectiveResources {
            pids: Limit::Max(1),
            ..none
        }
        .any_limited());
    }

    #[test]
    fn cli_values_parse_with_the_policy_bounds() {
        let shown = |r: Result<String, InvalidValue>| r.map_err(|e| e.to_string());
        let mem = |s: &str| shown(parse_memory_mib(s).map(|l| l.to_string()));
        let pids = |s: &str| shown(parse_pids(s).map(|l| l.to_string()));
        let cpus = |s: &str| shown(parse_cpus(s).map(|l| l.to_string()));
        let got = [
            mem("256"),
            mem("unlimited"),
            mem("8"),
            mem("-1"),
            mem("lots"),
            mem("Unlimited"),
            pids("1"),
            pids("0"),
            pids("unlimited"),
            cpus("0.5"),
            cpus("unlimited"),
            cpus("0"),
            cpus("inf"),
            cpus("NaN"),
            cpus("2000"),
            cpus("half"),
        ];
        let want = [
            Ok("256".to_string()),
            Ok("unlimited".to_string()),
            Err("expected at least 16".to_string()),
            Err("expected at least 16".to_string()),
            Err("expected a number or unlimited, got \"lots\"".to_string()),
            Err("expected a number or unlimited, got \"Unlimited\"".to_string()),
            Ok("1".to_string()),
            Err("expected at least 1".to_string()),
            Ok("unlimited".to_string()),
            Ok("0.5".to_string()),
            Ok("unlimited".to_string()),
            Err("expected a number > 0 and <= 1024".to_string()),
            Err("expected a number > 0 and <= 1024".to_string()),
            Err("expected a number > 0 and <= 1024".to_string()),
            Err("expected a number > 0 and <= 1024".to_string()),
            Err("expected a number or unlimited, got \"half\"".to_string()),
        ];
        assert_eq!(got.to_vec(), want.to_vec());
    }
}

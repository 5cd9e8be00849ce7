//! The filesystem policy as a Landlock ruleset.
//!
//! `read_only` paths get read, list and execute rights; `read_write` paths get every right the
//! ABI knows. Everything else is denied. The ruleset targets the best ABI the kernel offers.
//! - `hard_requirement`: a kernel without Landlock, a right the kernel cannot enforce, or a
//!   missing path is an error and the workload never starts.
//! - `best_effort`: a missing path is skipped and reported; Landlock is never turned off because
//!   one path is missing. A kernel without Landlock is reported as `not_enforced`.

use std::path::Path;

use landlock::{
    Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, RestrictionStatus, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI,
};

use super::protocol::LandlockPlan;
use super::sys;

#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    #[error("landlock is not available in this kernel and the policy says hard_requirement")]
    Unavailable,
    #[error("{path}: cannot open for a landlock rule")]
    Path {
        path: String,
        #[source]
        source: landlock::PathFdError,
    },
    #[error("building the landlock ruleset")]
    Ruleset(#[source] landlock::RulesetError),
    #[error("landlock ruleset was only {status} but the policy says hard_requirement")]
    NotFullyEnforced { status: &'static str },
}

/// What was enforced.
#[derive(Debug, Clone)]
pub struct LandlockOutcome {
    pub abi: i32,
    pub status: &'static str,
    pub rights: Vec<String>,
    pub skipped: Vec<(String, String)>,
}

fn abi_from(version: i32) -> ABI {
    match version {
        i32::MIN..=0 => ABI::Unsupported,
        1 => ABI::V1,
        2 => ABI::V2,
        3 => ABI::V3,
        4 => ABI::V4,
        5 => ABI::V5,
        6 => ABI::V6,
        7 => ABI::V7,
        8 => ABI::V8,
        _ => ABI::V9,
    }
}

fn status_name(status: &RulesetStatus) -> &'static str {
    match status {
        RulesetStatus::FullyEnforced => "fully_enforced",
        RulesetStatus::PartiallyEnforced => "partially_enforced",
        RulesetStatus::NotEnforced => "not_enforced",
    }
}

/// Restrict the calling thread (and its future children) to `plan`.
pub fn restrict(plan: &LandlockPlan) -> Result<LandlockOutcome, LandlockError> {
    let kernel_abi = sys::landlock_abi();
    if plan.hard_requirement && kernel_abi == 0 {
        return Err(LandlockError::Unavailable);
    }
    let abi = abi_from(kernel_abi);
    let level = if plan.hard_requirement {
        CompatLevel::HardRequirement
    } else {
        CompatLevel::BestEffort
    };
    let all = AccessFs::from_all(abi);
    let read = AccessFs::from_read(abi);
    // Landlock scopes (signals, abstract unix sockets) are left alone: the pid and network
    // namespaces already confine both, and scoping would also cut off `exec` sessions, which
    // run in sibling Landlock domains.
    let mut created = Ruleset::default()
        .set_compatibility(level)
        .handle_access(all)
        .map_err(LandlockError::Ruleset)?
        .create()
        .map_err(LandlockError::Ruleset)?;
    let mut skipped = Vec::new();
    let rules = plan
        .read_only
        .iter()
        .map(|p| (p, read))
        .chain(plan.read_write.iter().map(|p| (p, all)));
    for (path, access) in rules {
        let fd = match PathFd::new(path) {
            Ok(fd) => fd,
            Err(source) if !plan.hard_requirement => {
                skipped.push((path.display().to_string(), source.to_string()));
                continue;
            }
            Err(source) => {
                return Err(LandlockError::Path {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        // Directory-only rights on a file are invalid: keep only the rights that apply.
        let access = if is_dir(path) {
            access
        } else {
            access & AccessFs::from_file(abi)
        };
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(LandlockError::Ruleset)?;
    }
    let RestrictionStatus { ruleset, .. } =
        created.restrict_self().map_err(LandlockError::Ruleset)?;
    let status = status_name(&ruleset);
    if plan.hard_requirement && ruleset != RulesetStatus::FullyEnforced {
        return Err(LandlockError::NotFullyEnforced { status });
    }
    let enforced = ruleset != RulesetStatus::NotEnforced;
    Ok(LandlockOutcome {
        abi: kernel_abi,
        status,
        rights: if enforced {
            all.iter().map(|a| format!("{a:?}")).collect()
        } else {
            Vec::new()
        },
        skipped,
    })
}

fn is_dir(path: &Path) -> bool {
    std::fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false)
}

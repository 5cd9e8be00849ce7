//! The escape suite: hostile probes run inside a sandbox, each scored by a post-condition the
//! host checks after the sandbox ends (a canary unchanged, a listener that recorded nothing, a
//! host value that did not move, no process left). A probe's own output is never the verdict:
//! a probe can lie, and one that failed to try would look like one that was stopped.
//!
//! Every probe runs on every backend this build carries, under the same policy. Each is a test
//! of its own; one that escapes fails until the hole is closed. Each run records its row
//! (probe, category, what it tries, the host-side check, the verdict per backend) under
//! `$CARGO_TARGET_TMPDIR/escape/`, from which `cargo xtask escape` writes docs/security.md.
//!
//! Needs root, Landlock and network namespaces, as the behaviour suite does.

#![allow(clippy::print_stderr)] // skips say why on stderr

#[path = "../suite/common.rs"]
#[allow(dead_code)]
mod common;
mod fixtures;
mod probes;

use std::path::PathBuf;

/// What a probe's host-side check found on one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The post-condition holds.
    Held,
    /// It does not: what the host found.
    Escaped(String),
}

/// One probe: what it tries and how the host scores it.
pub struct Probe {
    pub name: &'static str,
    pub category: &'static str,
    pub tries: &'static str,
    pub check: &'static str,
    /// Runs the probe on a backend and checks its post-condition on the host.
    pub run: fn(&'static str) -> Verdict,
}

fn results_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("escape")
}

/// Run `probe` on every backend, record its row, fail if it escaped anywhere.
pub fn score(probe: &Probe) {
    if !common::can_run(probe.name) {
        return;
    }
    let mut verdicts = Vec::new();
    for backend in common::backends() {
        let verdict = (probe.run)(backend);
        verdicts.push((backend, verdict));
    }
    let row = serde_json::json!({
        "probe": probe.name,
        "category": probe.category,
        "tries": probe.tries,
        "check": probe.check,
        "verdicts": verdicts
            .iter()
            .map(|(b, v)| (b.to_string(), serde_json::Value::String(match v {
                Verdict::Held => "held".to_owned(),
                Verdict::Escaped(how) => format!("ESCAPED: {how}"),
            })))
            .collect::<serde_json::Map<String, serde_json::Value>>(),
    });
    let dir = results_dir();
    std::fs::create_dir_all(&dir).expect("results directory");
    std::fs::write(
        dir.join(format!("{}.json", probe.name)),
        serde_json::to_vec_pretty(&row).expect("json"),
    )
    .expect("write the probe's row");
    let escaped: Vec<_> = verdicts
        .iter()
        .filter(|(_, v)| *v != Verdict::Held)
        .collect();
    assert!(escaped.is_empty(), "{}: {escaped:?}", probe.name);
}

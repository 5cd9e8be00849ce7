//! Rego decision latency with a 100-policy network section.
//!
//! - `uncached`: `DecisionEngine::decide` for every query (Rego each time);
//! - `cached`: [`Decider::decide`] without L7 input, the proxy's CONNECT
//!   path, with the cache already holding each query's answer;
//! - `forward_cached`: [`Decider::decide`] with L7 input (plain-HTTP forwarding and
//!   requests inside terminated TLS), cached per method and path after the first.
//!
//! Queries cycle through allowed and denied callers and destinations (exact
//! hosts, glob hosts, ancestors, unknown hosts and binaries). Prints one
//! JSON object on stdout. Run: `cargo bench -p openshell-proxy --bench decision`.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod common;

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{document, generated_policies, summary_us, BoxError};
use openshell_policy::{
    DecisionEngine, DecisionInput, ExecInfo, HttpRequest, NetworkTarget, Policy,
};
use openshell_proxy::{Caller, Decider, PolicyHandle};

const POLICIES: usize = 100;
const WARMUP: usize = 2_000;
const SAMPLES_CACHED: usize = 20_000;
/// Rego samples: at most this many, and no more than fit in
/// [`UNCACHED_BUDGET`] after warmup.
const SAMPLES_UNCACHED: usize = 20_000;
const UNCACHED_BUDGET: Duration = Duration::from_secs(8);
const UNCACHED_WARMUP: usize = 20;

struct Query {
    caller: Caller,
    host: String,
    port: u16,
    expect_allow: bool,
}

fn caller(exe: &str, ancestors: &[&str]) -> Caller {
    Caller {
        pid: 4242,
        exe: PathBuf::from(exe),
        ancestors: ancestors.iter().map(PathBuf::from).collect(),
    }
}

/// 100 queries over the generated policies, a fifth of each kind.
fn queries() -> Vec<Query> {
    let mut q = Vec::new();
    for k in 0..20usize {
        let i = (k * 37) % POLICIES;
        let j = (k * 53 + 11) % POLICIES;
        // Exact host, exact binary.
        q.push(Query {
            caller: caller(&format!("/usr/bin/tool{i}"), &["/usr/bin/bash"]),
            host: format!("api{i}.example.com"),
            port: 443,
            expect_allow: true,
        });
        // Glob host, glob binary.
        q.push(Query {
            caller: caller(&format!("/opt/app{j}/bin/run"), &["/usr/bin/bash"]),
            host: format!("assets.cdn{j}.example.net"),
            port: 80,
            expect_allow: true,
        });
        // Allowed through an ancestor.
        q.push(Query {
            caller: caller(
                "/usr/bin/curl",
                &[
                    &format!("/usr/bin/tool{j}"),
                    "/usr/bin/bash",
                    "/usr/sbin/sshd",
                ],
            ),
            host: format!("api{j}.example.com"),
            port: 443,
            expect_allow: true,
        });
        // Unknown host.
        q.push(Query {
            caller: caller(&format!("/usr/bin/tool{i}"), &["/usr/bin/bash"]),
            host: format!("unknown{k}.example.com"),
            port: 443,
            expect_allow: false,
        });
        // Known host, wrong binary.
        q.push(Query {
            caller: caller("/usr/bin/wget", &["/usr/bin/bash"]),
            host: format!("api{i}.example.com"),
            port: 443,
            expect_allow: false,
        });
    }
    q
}

fn input(q: &Query, request: Option<HttpRequest>) -> DecisionInput {
    DecisionInput {
        exec: ExecInfo {
            path: q.caller.exe.to_string_lossy().into_owned(),
            ancestors: q
                .caller
                .ancestors
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect(),
        },
        network: NetworkTarget {
            host: q.host.clone(),
            port: q.port,
        },
        request,
    }
}

fn get() -> Option<HttpRequest> {
    Some(HttpRequest {
        method: "GET".into(),
        path: "/simple/index.html".into(),
    })
}

/// Time `f(i)` for `warmup` then up to `samples` iterations (stopping early
/// once `budget` is spent).
fn sample(
    warmup: usize,
    samples: usize,
    budget: Duration,
    mut f: impl FnMut(usize) -> Result<(), BoxError>,
) -> Result<Vec<Duration>, BoxError> {
    for i in 0..warmup {
        f(i)?;
    }
    let mut out = Vec::with_capacity(samples);
    let start = Instant::now();
    for i in 0..samples {
        let t = Instant::now();
        f(i)?;
        out.push(t.elapsed());
        if start.elapsed() > budget {
            break;
        }
    }
    Ok(out)
}

fn main() -> Result<(), BoxError> {
    let text = document(&generated_policies(POLICIES));
    let policy = Policy::from_yaml("bench-decision.yaml", &text)?;
    assert_eq!(policy.network.len(), POLICIES);
    let queries = queries();
    let inputs: Vec<DecisionInput> = queries.iter().map(|q| input(q, None)).collect();

    // Uncached: the engine alone, Rego for every query.
    let mut engine = DecisionEngine::new(&policy.network)?;
    for (q, i) in queries.iter().zip(&inputs) {
        let d = engine.decide(i)?;
        if d.allow != q.expect_allow {
            return Err(format!(
                "query {} -> {}:{} expected allow={}, got {d:?}",
                q.caller.exe.display(),
                q.host,
                q.port,
                q.expect_allow
            )
            .into());
        }
    }
    eprintln!("decision: uncached (DecisionEngine::decide)");
    let uncached = sample(UNCACHED_WARMUP, SAMPLES_UNCACHED, UNCACHED_BUDGET, |n| {
        let d = engine.decide(black_box(&inputs[n % inputs.len()]))?;
        black_box(d);
        Ok(())
    })?;

    // Cached: the proxy's CONNECT path, every answer already in the cache.
    let handle = PolicyHandle::new(policy.clone())?;
    let decider = Decider::new(handle);
    for q in &queries {
        let first = decider.decide(&q.caller, &q.host, q.port, None);
        let second = decider.decide(&q.caller, &q.host, q.port, None);
        if first.cached || !second.cached {
            return Err("decision cache did not behave as expected".into());
        }
        if second.decision?.allow != q.expect_allow {
            return Err("cached decision differs from the engine's".into());
        }
    }
    eprintln!("decision: cached (Decider::decide, CONNECT)");
    let cached = sample(WARMUP, SAMPLES_CACHED, Duration::MAX, |n| {
        let q = &queries[n % queries.len()];
        let d = decider.decide(black_box(&q.caller), black_box(&q.host), q.port, None);
        if !d.cached {
            return Err("cache miss during the cached run".into());
        }
        black_box(d.decision?);
        Ok(())
    })?;

    // Forwarded plain HTTP (and requests inside terminated TLS): L7 input, cached per method
    // and path like a CONNECT.
    eprintln!("decision: forward (Decider::decide with L7 input, cached)");
    let forward = sample(UNCACHED_WARMUP, SAMPLES_UNCACHED, UNCACHED_BUDGET, |n| {
        let q = &queries[n % queries.len()];
        let d = decider.decide(&q.caller, &q.host, q.port, get());
        black_box(d.decision?);
        Ok(())
    })?;

    // Sample n ran query n % len (the sampler restarts its count after warmup).
    let split = |samples: &[Duration], allow: bool| -> Vec<Duration> {
        samples
            .iter()
            .enumerate()
            .filter(|(n, _)| queries[n % queries.len()].expect_allow == allow)
            .map(|(_, d)| *d)
            .collect()
    };
    let report = serde_json::json!({
        "policies": POLICIES,
        "queries": queries.len(),
        "allowed_queries": queries.iter().filter(|q| q.expect_allow).count(),
        "uncached": summary_us(&uncached),
        "uncached_allowed": summary_us(&split(&uncached, true)),
        "uncached_denied": summary_us(&split(&uncached, false)),
        "cached": summary_us(&cached),
        "forward_cached": summary_us(&forward),
    });
    println!("{report}");
    Ok(())
}

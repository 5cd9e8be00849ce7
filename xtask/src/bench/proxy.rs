//! The egress proxy benchmarks: `decision`, `connect`, `terminate` and `update`. Each is a
//! `harness = false` bench target of openshell-proxy (`crates/openshell-proxy/benches/NAME.rs`)
//! that measures in process and prints one JSON object on stdout; here it is built and run with
//! `cargo bench`, parsed, printed as a table against its targets and written to
//! `target/bench/NAME.json`.

use std::process::Stdio;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{machine, round3, verdict, Ctx};
use crate::util;

/// Target: decision p50 through the proxy's CONNECT cache, in microseconds.
const TARGET_DECISION_CACHED_P50_US: f64 = 20.0;
/// Target: our CONNECT rate over tinyproxy's.
const TARGET_RATE_RATIO: f64 = 1.0;
/// Target: p99 latency our proxy adds to CONNECT -> 200 -> echo, in microseconds.
const TARGET_ADDED_P99_US: f64 = 1000.0;
/// Target: p99 latency our TLS-terminating proxy adds to a keep-alive HTTPS request, in
/// microseconds.
const TARGET_TLS_ADDED_P99_US: f64 = 2000.0;
/// Target: our keep-alive HTTPS request rate through termination over mitmproxy's.
const TARGET_TLS_RATE_RATIO: f64 = 0.8;
/// Target: a new policy file reaches new connections within this long, in microseconds.
const TARGET_UPDATE_P99_US: f64 = 1_000_000.0;

/// Builds and runs `cargo bench -p openshell-proxy --bench NAME` (in the workspace's target
/// directory, like the spawn benchmark's binary) and returns the JSON it printed last.
fn cargo_bench(ctx: &Ctx, name: &str) -> Result<Value> {
    cargo_bench_in(ctx, "openshell-proxy", &[], name)
}

/// [`cargo_bench`] for the bench target `name` of `package` built with `features`; the
/// runtime's helpers are the release CLI the benchmarks measure.
pub(super) fn cargo_bench_in(
    ctx: &Ctx,
    package: &str,
    features: &[&str],
    name: &str,
) -> Result<Value> {
    let mut cmd = util::cargo();
    cmd.args(["bench", "-p", package, "--bench", name]);
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    cmd.arg("--target-dir")
        .arg(ctx.root.join("target"))
        .env(
            "OPENSHELL_HELPER_EXE",
            ctx.root.join("target/release/openshell-sandbox"),
        )
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let shown = util::display(&cmd);
    println!("$ {shown}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("`{shown}` failed: {}\n{stdout}", out.status);
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("`{shown}` printed no JSON object:\n{stdout}"))?;
    serde_json::from_str(line).with_context(|| format!("`{shown}` printed bad JSON: {line}"))
}

fn num(v: &Value, path: &[&str]) -> Result<f64> {
    let mut cur = v;
    for key in path {
        cur = &cur[*key];
    }
    cur.as_f64()
        .with_context(|| format!("no number at {} in the benchmark output", path.join(".")))
}

fn print_machine(m: &Value) {
    super::print_machine(m);
}

/// A latency row: p50, p99, mean (microseconds, shown as µs or ms) and samples.
fn latency_row(label: &str, s: &Value) -> Result<()> {
    println!(
        "  {label:<34} {:>11} {:>11} {:>11} {:>7}",
        us(num(s, &["p50_us"])?),
        us(num(s, &["p99_us"])?),
        us(num(s, &["mean_us"])?),
        s["samples"]
    );
    Ok(())
}

fn latency_header() {
    println!(
        "  {:<34} {:>11} {:>11} {:>11} {:>7}",
        "", "p50", "p99", "mean", "samples"
    );
}

fn us(x: f64) -> String {
    if x.abs() >= 1000.0 {
        format!("{:.2} ms", x / 1000.0)
    } else {
        format!("{x:.2} µs")
    }
}

/// `decision`: Rego decision latency with 100 policies, uncached and through the CONNECT cache.
pub fn decision(ctx: &Ctx) -> Result<()> {
    let out = cargo_bench(ctx, "decision")?;
    let cached_p50 = num(&out, &["cached", "p50_us"])?;
    let ok = cached_p50 <= TARGET_DECISION_CACHED_P50_US;
    let machine = machine();
    println!();
    print_machine(&machine);
    println!(
        "decision latency, {} network policies, {} queries ({} allowed) in rotation",
        out["policies"], out["queries"], out["allowed_queries"]
    );
    latency_header();
    for (label, key) in [
        ("uncached (DecisionEngine::decide)", "uncached"),
        ("  of which allowed", "uncached_allowed"),
        ("  of which denied", "uncached_denied"),
        ("cached (proxy CONNECT path)", "cached"),
        (
            "forward, L7 input (cached per method and path)",
            "forward_cached",
        ),
    ] {
        latency_row(label, &out[key])?;
    }
    println!(
        "  target cached p50 <= {TARGET_DECISION_CACHED_P50_US:.0} µs: {} ({})",
        verdict(ok),
        us(cached_p50)
    );
    let report = serde_json::json!({
        "benchmark": "decision",
        "machine": machine,
        "results": out,
        "targets": {
            "cached_p50_us_max": TARGET_DECISION_CACHED_P50_US,
            "cached_p50_ok": ok,
        },
    });
    let path = ctx.write_report("decision", &report)?;
    println!("  wrote {}", path.display());
    Ok(())
}

/// `connect`: CONNECT rate and added latency, ours vs tinyproxy.
pub fn connect(ctx: &Ctx) -> Result<()> {
    let out = cargo_bench(ctx, "connect")?;
    let ours_rate = num(&out, &["ours", "rate", "per_s"])?;
    let tiny_rate = num(&out, &["tinyproxy", "rate", "per_s"])?;
    let rate_ratio = ours_rate / tiny_rate;
    let ours_added_p99 = num(&out, &["ours", "added", "p99_us"])?;
    let tiny_added_p99 = num(&out, &["tinyproxy", "added", "p99_us"])?;
    let rate_ok = rate_ratio >= TARGET_RATE_RATIO;
    let added_ok = ours_added_p99 <= TARGET_ADDED_P99_US;

    let machine = machine();
    println!();
    print_machine(&machine);
    println!(
        "CONNECT -> 200 -> {} B echo round trip -> close, upstream {} ({})",
        out["payload_bytes"], out["upstream"], out["tinyproxy_version"]
    );
    println!(
        "  latency: {} sequential connections each (interleaved); rate: {} concurrent clients, \
         {} rounds of {} s",
        out["sequential"], out["clients"], out["rate_rounds"], out["rate_secs"]
    );
    println!(
        "  {:<10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>7}",
        "", "p50", "p99", "added p50", "added p99", "conn/s", "failed"
    );
    for name in ["direct", "ours", "tinyproxy"] {
        let r = &out[name];
        let added = |k: &str| num(r, &["added", k]).map_or_else(|_| "-".to_owned(), us);
        println!(
            "  {name:<10} {:>10} {:>10} {:>12} {:>12} {:>10.0} {:>7}",
            us(num(r, &["latency", "p50_us"])?),
            us(num(r, &["latency", "p99_us"])?),
            added("p50_us"),
            added("p99_us"),
            num(r, &["rate", "per_s"])?,
            r["rate"]["failed"]
        );
    }
    println!(
        "  ratio ours/tinyproxy: rate {rate_ratio:.2}, added p99 {:.2}",
        ours_added_p99 / tiny_added_p99
    );
    println!(
        "  target rate >= tinyproxy's: {} ({ours_rate:.0} vs {tiny_rate:.0} conn/s)",
        verdict(rate_ok)
    );
    println!(
        "  target added p99 <= {}: {} ({})",
        us(TARGET_ADDED_P99_US),
        verdict(added_ok),
        us(ours_added_p99)
    );
    let report = serde_json::json!({
        "benchmark": "connect",
        "machine": machine,
        "results": out,
        "rate_ratio": round3(rate_ratio),
        "added_p99_ratio": round3(ours_added_p99 / tiny_added_p99),
        "targets": {
            "rate_ratio_min": TARGET_RATE_RATIO,
            "rate_ok": rate_ok,
            "added_p99_us_max": TARGET_ADDED_P99_US,
            "added_p99_ok": added_ok,
        },
    });
    let path = ctx.write_report("connect", &report)?;
    println!("  wrote {}", path.display());
    Ok(())
}

/// `terminate`: HTTPS through a TLS-terminating proxy, ours vs mitmproxy: keep-alive request
/// latency, new-connection latency and keep-alive request rate.
pub fn terminate(ctx: &Ctx) -> Result<()> {
    let out = cargo_bench(ctx, "terminate")?;
    let ours_rate = num(&out, &["ours", "rate", "per_s"])?;
    let mitm_rate = num(&out, &["mitmproxy", "rate", "per_s"])?;
    let rate_ratio = ours_rate / mitm_rate;
    let ours_added_p99 = num(&out, &["ours", "keepalive_added", "p99_us"])?;
    let rate_ok = rate_ratio >= TARGET_TLS_RATE_RATIO;
    let added_ok = ours_added_p99 <= TARGET_TLS_ADDED_P99_US;

    let machine = machine();
    println!();
    print_machine(&machine);
    println!(
        "HTTPS GET -> {} B, upstream {} (rustls); {}; client: rustls, no session resumption",
        out["body_bytes"],
        out["upstream"].as_str().unwrap_or("?"),
        out["mitmproxy_version"]
            .as_str()
            .unwrap_or("mitmproxy, version unknown")
    );
    println!(
        "  keep-alive: {} sequential GETs on one connection each; new connection: {} x CONNECT \
         + handshake + GET + close (both interleaved); rate: {} keep-alive clients, {} rounds \
         of {} s",
        out["keepalive_requests"],
        out["new_connections"],
        out["clients"],
        out["rate_rounds"],
        out["rate_secs"]
    );
    println!(
        "  {:<10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10} {:>7}",
        "", "ka p50", "ka p95", "ka p99", "+ka p99", "new p50", "new p99", "req/s", "failed"
    );
    for name in ["direct", "ours", "mitmproxy"] {
        let r = &out[name];
        let added = num(r, &["keepalive_added", "p99_us"]).map_or_else(|_| "-".to_owned(), us);
        println!(
            "  {name:<10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10.0} {:>7}",
            us(num(r, &["keepalive", "p50_us"])?),
            us(num(r, &["keepalive", "p95_us"])?),
            us(num(r, &["keepalive", "p99_us"])?),
            added,
            us(num(r, &["new_connection", "p50_us"])?),
            us(num(r, &["new_connection", "p99_us"])?),
            num(r, &["rate", "per_s"])?,
            r["rate"]["failed"]
        );
    }
    let ratios = &out["ours_over_mitmproxy"];
    println!(
        "  ratio ours/mitmproxy: rate {rate_ratio:.2}, keep-alive p99 {}, new-connection p99 {}",
        ratios["keepalive_p99"], ratios["new_connection_p99"]
    );
    println!(
        "  target rate >= {TARGET_TLS_RATE_RATIO:.1}x mitmproxy's: {} ({ours_rate:.0} vs \
         {mitm_rate:.0} req/s)",
        verdict(rate_ok)
    );
    println!(
        "  target added keep-alive p99 <= {}: {} ({})",
        us(TARGET_TLS_ADDED_P99_US),
        verdict(added_ok),
        us(ours_added_p99)
    );
    let report = serde_json::json!({
        "benchmark": "terminate",
        "machine": machine,
        "results": out,
        "rate_ratio": round3(rate_ratio),
        "targets": {
            "rate_ratio_min": TARGET_TLS_RATE_RATIO,
            "rate_ok": rate_ok,
            "keepalive_added_p99_us_max": TARGET_TLS_ADDED_P99_US,
            "keepalive_added_p99_ok": added_ok,
        },
    });
    let path = ctx.write_report("terminate", &report)?;
    println!("  wrote {}", path.display());
    Ok(())
}

/// `update`: live policy update latency (file -> new CONNECT decision; handle update alone).
pub fn update(ctx: &Ctx) -> Result<()> {
    let out = cargo_bench(ctx, "update")?;
    let p99 = num(&out, &["file_to_connect", "p99_us"])?;
    let ok = p99 <= TARGET_UPDATE_P99_US;
    let machine = machine();
    println!();
    print_machine(&machine);
    println!(
        "live policy update, {} network policies ({} bytes of YAML)",
        out["policies"], out["policy_bytes"]
    );
    latency_header();
    for (label, key) in [
        ("file rename -> first new CONNECT", "file_to_connect"),
        ("PolicyHandle::update (compile+swap)", "update"),
        ("PolicyHandle::update_yaml (+parse)", "update_yaml"),
    ] {
        latency_row(label, &out[key])?;
    }
    println!(
        "  CONNECTs sent per file update until the new answer: {} on average",
        out["connects_per_update_mean"]
    );
    println!(
        "  target new connections see a change within 1 s (p99): {} ({})",
        verdict(ok),
        us(p99)
    );
    let report = serde_json::json!({
        "benchmark": "update",
        "machine": machine,
        "results": out,
        "targets": {
            "file_to_connect_p99_us_max": TARGET_UPDATE_P99_US,
            "file_to_connect_p99_ok": ok,
        },
    });
    let path = ctx.write_report("update", &report)?;
    println!("  wrote {}", path.display());
    Ok(())
}

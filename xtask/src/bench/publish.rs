//! The published numbers: after a benchmark run, `docs/benchmarks.json` and
//! `docs/benchmarks.md` are rewritten from the reports in `target/bench/` (a report of a
//! benchmark that did not run this time is kept from the published JSON), and the README's
//! headline block (between `<!-- benchmarks: headline -->` and `<!-- /benchmarks -->`) is
//! replaced with the headline ratios.
//!
//! [`HEADLINES`] is the one place that says which figure of which report is published, which
//! peer it is compared with (measured in the same run) and the target it is held to (the
//! project's targets; a benchmark's own printout checks it against its older, looser bounds).

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// How a figure is held to its target.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// ours / peer (medians) at most this.
    RatioMax(f64),
    /// ours / peer (medians) at least this (rates: higher is better).
    RatioMin(f64),
    /// Our median at most this, in the figure's unit.
    Max(f64),
}

impl Target {
    fn text(self, unit: &str) -> String {
        match self {
            Target::RatioMax(r) => format!("ratio ≤ {r}"),
            Target::RatioMin(r) => format!("ratio ≥ {r}"),
            Target::Max(v) => format!("≤ {v} {unit}"),
        }
    }
}

/// One published figure: where it is in its benchmark's report (JSON pointers), in which unit
/// (`scale` turns the report's number into it), and what it is compared with.
struct Headline {
    bench: &'static str,
    figure: &'static str,
    unit: &'static str,
    scale: f64,
    ours: (&'static str, Option<&'static str>),
    /// The peer's name and its median and p95 pointers.
    peer: Option<(&'static str, &'static str, Option<&'static str>)>,
    target: Target,
    /// Quoted in the README.
    headline: bool,
}

const HEADLINES: &[Headline] = &[
    Headline {
        bench: "spawn",
        figure: "process backend: spawn → exit of /bin/true, full isolation",
        unit: "ms",
        scale: 1.0,
        ours: ("/ours/stats/median_ms", Some("/ours/stats/p95_ms")),
        peer: Some((
            "bubblewrap --unshare-all",
            "/bwrap/stats/median_ms",
            Some("/bwrap/stats/p95_ms"),
        )),
        target: Target::RatioMax(1.5),
        headline: true,
    },
    Headline {
        bench: "rootfs",
        figure: "process backend: warm start from a --rootfs tree",
        unit: "ms",
        scale: 1.0,
        ours: (
            "/ours_rootfs/stats/median_ms",
            Some("/ours_rootfs/stats/p95_ms"),
        ),
        peer: Some((
            "bwrap --bind tree /",
            "/bwrap_bind/stats/median_ms",
            Some("/bwrap_bind/stats/p95_ms"),
        )),
        target: Target::RatioMax(1.5),
        headline: false,
    },
    Headline {
        bench: "vm",
        figure: "vm backend: cold create + exec + destroy (template restore)",
        unit: "ms",
        scale: 1.0,
        ours: (
            "/cold/ours/stats/median_ms",
            Some("/cold/ours/stats/p95_ms"),
        ),
        peer: Some((
            "bare QEMU microvm boot",
            "/cold/bare/stats/median_ms",
            Some("/cold/bare/stats/p95_ms"),
        )),
        target: Target::RatioMax(0.5),
        headline: true,
    },
    Headline {
        bench: "vm",
        figure: "vm backend: full boot (OPENSHELL_VM_TEMPLATE=off)",
        unit: "ms",
        scale: 1.0,
        ours: (
            "/cold/ours_booting/stats/median_ms",
            Some("/cold/ours_booting/stats/p95_ms"),
        ),
        peer: Some((
            "bare QEMU microvm boot",
            "/cold/bare/stats/median_ms",
            Some("/cold/bare/stats/p95_ms"),
        )),
        target: Target::RatioMax(1.2),
        headline: false,
    },
    Headline {
        bench: "vm",
        figure: "vm backend: host memory of an idle VM (RSS of QEMU and its helpers)",
        unit: "MiB",
        scale: 1.0 / 1024.0,
        ours: ("/idle_rss/total_kib", None),
        peer: None,
        target: Target::Max(48.0),
        headline: false,
    },
    Headline {
        bench: "ssh",
        figure: "exec round trip over a reused SSH connection",
        unit: "ms",
        scale: 1.0,
        ours: ("/ours/stats/median_ms", Some("/ours/stats/p95_ms")),
        peer: Some((
            "OpenSSH sshd",
            "/openssh/stats/median_ms",
            Some("/openssh/stats/p95_ms"),
        )),
        target: Target::RatioMax(1.2),
        headline: true,
    },
    Headline {
        bench: "exec",
        figure: "process backend: exec round trip through the runtime API (p50, p99)",
        unit: "ms",
        scale: 1.0 / 1000.0,
        ours: (
            "/results/process/ours/p50_us",
            Some("/results/process/ours/p99_us"),
        ),
        peer: Some((
            "the host's fork + exec (no sandbox)",
            "/results/process/host/p50_us",
            Some("/results/process/host/p99_us"),
        )),
        target: Target::Max(super::exec::TARGET_PROCESS_MS),
        headline: false,
    },
    Headline {
        bench: "exec",
        figure: "vm backend: exec round trip through the runtime API (p50, p99)",
        unit: "ms",
        scale: 1.0 / 1000.0,
        ours: ("/results/vm/ours/p50_us", Some("/results/vm/ours/p99_us")),
        peer: Some((
            "the host's fork + exec (no sandbox)",
            "/results/vm/host/p50_us",
            Some("/results/vm/host/p99_us"),
        )),
        target: Target::Max(super::exec::TARGET_VM_MS),
        headline: false,
    },
    Headline {
        bench: "connect",
        figure: "egress proxy: CONNECT rate",
        unit: "conn/s",
        scale: 1.0,
        ours: ("/results/ours/rate/per_s", None),
        peer: Some(("tinyproxy", "/results/tinyproxy/rate/per_s", None)),
        target: Target::RatioMin(1.0),
        headline: true,
    },
    Headline {
        bench: "connect",
        figure: "egress proxy: latency added to a CONNECT round trip (p50, p99)",
        unit: "µs",
        scale: 1.0,
        ours: (
            "/results/ours/added/p50_us",
            Some("/results/ours/added/p99_us"),
        ),
        peer: Some((
            "tinyproxy",
            "/results/tinyproxy/added/p50_us",
            Some("/results/tinyproxy/added/p99_us"),
        )),
        target: Target::Max(1000.0),
        headline: false,
    },
    Headline {
        bench: "terminate",
        figure: "TLS termination: keep-alive HTTPS request rate (one path: decided once, then from the cache)",
        unit: "req/s",
        scale: 1.0,
        ours: ("/results/ours/rate/per_s", None),
        peer: Some(("mitmproxy", "/results/mitmproxy/rate/per_s", None)),
        target: Target::RatioMin(0.8),
        headline: true,
    },
    Headline {
        bench: "terminate",
        figure: "TLS termination: latency added to a keep-alive HTTPS request, cached decision (p50, p99)",
        unit: "µs",
        scale: 1.0,
        ours: (
            "/results/ours/keepalive_added/p50_us",
            Some("/results/ours/keepalive_added/p99_us"),
        ),
        peer: Some((
            "mitmproxy",
            "/results/mitmproxy/keepalive_added/p50_us",
            Some("/results/mitmproxy/keepalive_added/p99_us"),
        )),
        target: Target::Max(2000.0),
        headline: false,
    },
    Headline {
        bench: "decision",
        figure: "Rego decision, 100 policies, uncached (p50, p99)",
        unit: "µs",
        scale: 1.0,
        ours: ("/results/uncached/p50_us", Some("/results/uncached/p99_us")),
        peer: None,
        target: Target::Max(100.0),
        headline: false,
    },
    Headline {
        bench: "decision",
        figure: "Rego decision through the proxy's cache (p50, p99)",
        unit: "µs",
        scale: 1.0,
        ours: ("/results/cached/p50_us", Some("/results/cached/p99_us")),
        peer: None,
        target: Target::Max(20.0),
        headline: false,
    },
    Headline {
        bench: "update",
        figure: "live policy update: file rename → next CONNECT decided by it (p50, p99)",
        unit: "ms",
        scale: 1.0 / 1000.0,
        ours: (
            "/results/file_to_connect/p50_us",
            Some("/results/file_to_connect/p99_us"),
        ),
        peer: None,
        target: Target::Max(50.0),
        headline: false,
    },
    Headline {
        bench: "image",
        figure: "OCI image: cold pull + unpack from a loopback registry",
        unit: "ms",
        scale: 1.0,
        ours: (
            "/ours_cold/stats/median_ms",
            Some("/ours_cold/stats/p95_ms"),
        ),
        peer: Some((
            "skopeo copy + umoci unpack",
            "/skopeo_umoci/stats/median_ms",
            Some("/skopeo_umoci/stats/p95_ms"),
        )),
        target: Target::RatioMax(1.0),
        headline: false,
    },
    Headline {
        bench: "image",
        figure: "OCI image: warm start from the cache",
        unit: "ms",
        scale: 1.0,
        ours: (
            "/ours_warm/stats/median_ms",
            Some("/ours_warm/stats/p95_ms"),
        ),
        peer: None,
        target: Target::Max(20.0),
        headline: false,
    },
];

/// Figures of peers that cannot run on this machine, as they publish them: labelled as
/// theirs, never compared as if measured here.
const PUBLISHED: &[(&str, &str, &str)] = &[(
    "Firecracker",
    "user space reached in as little as 125 ms; under 5 MiB memory overhead per microVM; up \
         to 150 microVMs created per second per host (on KVM hardware)",
    "firecracker-microvm.github.io (project site)",
)];

/// Measured figures that have no benchmark yet (listed so that their absence is visible).
const NOT_MEASURED: &[(&str, &str)] = &[(
    "density: idle sandboxes held at once, memory per sandbox, starts per second",
    "≥ 200 idle VMs on a 24 GiB host",
)];

/// Rewrite `docs/benchmarks.{json,md}` and the README's headline block from the reports.
pub fn publish(root: &Path, benches: &[&str], ran: &[&str]) -> Result<()> {
    let docs = root.join("docs");
    let json_path = docs.join("benchmarks.json");
    let previous: Value = std::fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let mut reports = serde_json::Map::new();
    for name in benches {
        let fresh = root.join("target/bench").join(format!("{name}.json"));
        let report = if ran.contains(name) {
            let text = std::fs::read_to_string(&fresh)
                .with_context(|| format!("{} ran and wrote no {}", name, fresh.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not JSON", fresh.display()))?
        } else {
            match previous["reports"].get(*name) {
                Some(kept) => kept.clone(),
                None => continue,
            }
        };
        reports.insert((*name).to_owned(), report);
    }
    let figures: Vec<Value> = HEADLINES
        .iter()
        .map(|h| figure(h, reports.get(h.bench)))
        .collect();
    let doc = serde_json::json!({
        "generated_by": "cargo xtask bench",
        "figures": figures,
        "published_by_peers": PUBLISHED.iter().map(|(peer, what, source)| serde_json::json!({
            "peer": peer, "figures": what, "source": source,
        })).collect::<Vec<_>>(),
        "not_measured": NOT_MEASURED.iter().map(|(what, target)| serde_json::json!({
            "figure": what, "target": target,
        })).collect::<Vec<_>>(),
        "reports": reports,
    });
    std::fs::create_dir_all(&docs).with_context(|| format!("creating {}", docs.display()))?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    let md_path = docs.join("benchmarks.md");
    std::fs::write(&md_path, markdown(&doc))
        .with_context(|| format!("writing {}", md_path.display()))?;
    let readme = root.join("README.md");
    let text = std::fs::read_to_string(&readme)
        .with_context(|| format!("reading {}", readme.display()))?;
    let updated = replace_block(&text, &headline_block(&doc))
        .with_context(|| format!("{}: the headline block", readme.display()))?;
    if updated != text {
        std::fs::write(&readme, updated)
            .with_context(|| format!("writing {}", readme.display()))?;
    }
    println!(
        "\nwrote {}, {} and the README's headline block",
        json_path.display(),
        md_path.display()
    );
    Ok(())
}

/// One figure from its report: our median (and p95), the peer's, the ratio, the target and
/// whether it holds. `measured: false` when the report or a number is missing.
fn figure(h: &Headline, report: Option<&Value>) -> Value {
    let at = |ptr: &str| {
        report
            .and_then(|r| r.pointer(ptr))
            .and_then(Value::as_f64)
            .map(|v| round(v * h.scale))
    };
    let ours = at(h.ours.0);
    let ours_p95 = h.ours.1.and_then(at);
    let peer = h
        .peer
        .map(|(name, median, p95)| (name, at(median), p95.and_then(at)));
    let ratio = match (ours, peer.and_then(|p| p.1)) {
        (Some(o), Some(p)) if p > 0.0 => Some(round(o / p)),
        _ => None,
    };
    let holds = match (h.target, ours, ratio) {
        (Target::RatioMax(t), _, Some(r)) => Some(r <= t),
        (Target::RatioMin(t), _, Some(r)) => Some(r >= t),
        (Target::Max(t), Some(o), _) => Some(o <= t),
        _ => None,
    };
    let (machine, load) = report.map_or((Value::Null, Value::Null), |r| {
        (r["machine"].clone(), r["machine"]["loadavg"].clone())
    });
    serde_json::json!({
        "benchmark": h.bench,
        "figure": h.figure,
        "unit": h.unit,
        "measured": ours.is_some(),
        "ours": { "median": ours, "p95": ours_p95 },
        "peer": peer.map(|(name, median, p95)| serde_json::json!({
            "name": name, "median": median, "p95": p95,
        })),
        "ratio": ratio,
        "target": h.target.text(h.unit),
        "holds": holds,
        "headline": h.headline,
        "loadavg": load,
        "machine": machine,
    })
}

fn round(x: f64) -> f64 {
    if x.abs() >= 100.0 {
        x.round()
    } else {
        (x * 100.0).round() / 100.0
    }
}

fn num(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "–".to_owned(), |x| format!("{x}"))
}

fn with_p95(v: &Value) -> String {
    match (v["median"].as_f64(), v["p95"].as_f64()) {
        (Some(m), Some(p)) => format!("{m} ({p})"),
        (Some(m), None) => format!("{m}"),
        _ => "not measured".to_owned(),
    }
}

fn holds_text(v: &Value) -> &'static str {
    match v.as_bool() {
        Some(true) => "holds",
        Some(false) => "**missed**",
        None => "–",
    }
}

fn markdown(doc: &Value) -> String {
    let mut out = String::from(
        "# Benchmarks\n\n\
         Generated by `cargo xtask bench` (which also writes `benchmarks.json` next to this file \
         and the headline block of the README); do not edit by hand. Every peer in the table \
         was measured in the same run on the same machine; medians, with p95 (or p99 where the \
         figure says so) in parentheses. Nothing here is asserted by a test: a missed target is \
         work to do, and the reason is given in the notes of the issue that owns it.\n\n\
         ## Figures\n\n\
         | figure | ours | peer | peer's | ratio | target | |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let figures = doc["figures"].as_array().cloned().unwrap_or_default();
    for f in &figures {
        let unit = f["unit"].as_str().unwrap_or("");
        let peer = &f["peer"];
        out.push_str(&format!(
            "| {} | {} {unit} | {} | {} | {} | {} | {} |\n",
            f["figure"].as_str().unwrap_or(""),
            with_p95(&f["ours"]),
            peer["name"].as_str().unwrap_or("–"),
            if peer.is_null() {
                "–".to_owned()
            } else {
                format!("{} {unit}", with_p95(peer))
            },
            num(&f["ratio"]),
            f["target"].as_str().unwrap_or(""),
            holds_text(&f["holds"]),
        ));
    }
    out.push_str("\n## Not measured yet\n\n");
    for m in doc["not_measured"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "- {} (target: {})\n",
            m["figure"].as_str().unwrap_or(""),
            m["target"].as_str().unwrap_or("")
        ));
    }
    out.push_str("\n## Published by peers that cannot run here\n\n");
    for p in doc["published_by_peers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "- **{}** (their figures, from {}, not measured here): {}\n",
            p["peer"].as_str().unwrap_or(""),
            p["source"].as_str().unwrap_or(""),
            p["figures"].as_str().unwrap_or("")
        ));
    }
    out.push_str("\n## The machine, per benchmark\n\n| benchmark | cpus | cpu | kernel | KVM | load average (1, 5, 15 min) at the end |\n|---|---|---|---|---|---|\n");
    let mut seen = Vec::new();
    for f in &figures {
        let bench = f["benchmark"].as_str().unwrap_or("");
        if seen.contains(&bench) || f["machine"].is_null() {
            continue;
        }
        seen.push(bench);
        let m = &f["machine"];
        let load: Vec<String> = m["loadavg"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| format!("{:.2}", l.as_f64().unwrap_or(f64::NAN)))
            .collect();
        out.push_str(&format!(
            "| {bench} | {} | {} | {} | {} | {} |\n",
            m["cpus"],
            m["cpu"].as_str().unwrap_or("?"),
            m["kernel"].as_str().unwrap_or("?"),
            m["kvm"].as_str().unwrap_or("?"),
            load.join(", ")
        ));
    }
    out.push_str(
        "\nThe full reports (commands, every statistic, run counts) are in `benchmarks.json`.\n",
    );
    out
}

const BLOCK_START: &str = "<!-- benchmarks: headline -->";
const BLOCK_END: &str = "<!-- /benchmarks -->";

/// The README's block: one line per headline figure.
fn headline_block(doc: &Value) -> String {
    let mut out = String::new();
    for f in doc["figures"].as_array().into_iter().flatten() {
        if f["headline"] != true {
            continue;
        }
        let unit = f["unit"].as_str().unwrap_or("");
        let line = match (f["ours"]["median"].as_f64(), f["ratio"].as_f64()) {
            (Some(ours), Some(ratio)) => format!(
                "- {}: {ours} {unit}, {ratio}× {} (target {}: {})\n",
                f["figure"].as_str().unwrap_or(""),
                f["peer"]["name"].as_str().unwrap_or("the peer"),
                f["target"].as_str().unwrap_or(""),
                holds_text(&f["holds"]).trim_matches('*'),
            ),
            _ => format!(
                "- {}: not measured yet\n",
                f["figure"].as_str().unwrap_or("")
            ),
        };
        out.push_str(&line);
    }
    out
}

/// `text` with the lines between the block's markers replaced by `block`.
fn replace_block(text: &str, block: &str) -> Result<String> {
    let (Some(start), Some(end)) = (text.find(BLOCK_START), text.find(BLOCK_END)) else {
        bail!("no {BLOCK_START} … {BLOCK_END} markers");
    };
    if end < start {
        bail!("{BLOCK_END} comes before {BLOCK_START}");
    }
    let inner = start + BLOCK_START.len();
    Ok(format!("{}\n{block}{}", &text[..inner], &text[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> Value {
        serde_json::json!({
            "machine": { "cpus": 2, "loadavg": [1.0, 0.5, 0.25] },
            "ours": { "stats": { "median_ms": 15.0, "p95_ms": 20.0 } },
            "bwrap": { "stats": { "median_ms": 5.0, "p95_ms": 6.0 } },
        })
    }

    #[test]
    fn a_figure_has_its_ratio_and_verdict_and_a_missing_report_is_not_measured() {
        let spawn = &HEADLINES[0];
        let f = figure(spawn, Some(&report()));
        assert_eq!(
            (
                f["ours"]["median"].as_f64(),
                f["peer"]["median"].as_f64(),
                f["ratio"].as_f64(),
                f["holds"].as_bool()
            ),
            (Some(15.0), Some(5.0), Some(3.0), Some(false))
        );
        let missing = figure(spawn, None);
        assert_eq!(
            (missing["measured"].as_bool(), missing["holds"].as_bool()),
            (Some(false), None)
        );
    }

    #[test]
    fn the_readme_block_is_replaced_between_its_markers() {
        let text = format!("a\n{BLOCK_START}\nold\n{BLOCK_END}\nb\n");
        assert_eq!(
            replace_block(&text, "new\n").ok(),
            Some(format!("a\n{BLOCK_START}\nnew\n{BLOCK_END}\nb\n"))
        );
        assert!(replace_block("no markers", "x").is_err());
    }
}

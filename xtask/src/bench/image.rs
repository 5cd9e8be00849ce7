//! `image`: pulling and unpacking the python test image (`cargo xtask images`) from Debian's
//! docker-registry on loopback, cold (empty cache) and warm (cached), next to peers in the same
//! run:
//! - `skopeo copy` to an OCI layout + `umoci unpack` (both verify digests, like we do);
//! - `curl | tar -xz` of the same two layer blobs: no manifest, no verification, no cache (the
//!   naive way; GNU tar runs gzip as a separate process and restores owners and times).
//!
//! The registry is `openshell-test-registry` (the test harness: docker-registry, images pushed
//! with oci-client). Warm is `image inspect`, which is what a sandbox start does with a cached
//! image (`PullPolicy::Missing`: no network).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use super::{hyperfine_prepared, verdict, Cmd, Ctx};
use crate::util;

const DEFAULT_RUNS: u32 = 10;
const WARM_RUNS: u32 = 50;
/// Target: our cold pull+unpack over skopeo+umoci's.
const TARGET_RATIO: f64 = 1.0;
/// Target: warm ensure from the cache, median.
const TARGET_WARM_MS: f64 = 20.0;

pub fn run(ctx: &Ctx) -> Result<()> {
    crate::images::run_images(false)?;
    let layout = crate::images::images_dir().join("python");
    util::run(
        util::cargo()
            .args([
                "build",
                "--release",
                "-p",
                "openshell-image",
                "--features",
                "test-support",
                "--bin",
                "openshell-test-registry",
                "--target-dir",
            ])
            .arg(ctx.root.join("target")),
    )?;
    let mut registry = Command::new(ctx.root.join("target/release/openshell-test-registry"))
        .arg(format!("python={}", layout.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting openshell-test-registry")?;
    let mut host = String::new();
    BufReader::new(registry.stdout.take().context("registry stdout")?)
        .read_line(&mut host)
        .context("reading the registry address")?;
    let host = host.trim().to_owned();
    anyhow::ensure!(
        !host.is_empty(),
        "openshell-test-registry printed no address"
    );
    let result = measure(ctx, &host, &layout);
    drop(registry.stdin.take());
    let _ = registry.wait();
    result
}

fn measure(ctx: &Ctx, host: &str, layout: &std::path::Path) -> Result<()> {
    let work = std::env::temp_dir().join(format!("openshell-bench-image-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let w = work.display();
    let reference = format!("{host}/python:latest");
    let layers = layer_digests(layout)?;
    let sandbox = "target/release/openshell-sandbox";

    let ours = format!(
        "env OPENSHELL_HOME={w}/ours {sandbox} image pull {reference} --insecure-registry {host}"
    );
    let peer = format!(
        "sh -c \"mkdir -p {w}/peer && skopeo copy --quiet --src-tls-verify=false docker://{reference} \
         oci:{w}/peer/layout:latest && umoci unpack --image {w}/peer/layout:latest \
         {w}/peer/bundle\""
    );
    let fetch = layers
        .iter()
        .map(|d| format!("curl -sf http://{host}/v2/python/blobs/{d} | tar -xzf - -C {w}/curl"))
        .collect::<Vec<_>>()
        .join(" && ");
    let lower = format!("sh -c \"mkdir -p {w}/curl && {fetch}\"");
    let cold = [
        Cmd {
            name: "ours-cold",
            line: ours.clone(),
        },
        Cmd {
            name: "skopeo+umoci",
            line: peer.clone(),
        },
        Cmd {
            name: "curl|tar",
            line: lower.clone(),
        },
    ];
    let prepare = ["ours", "peer", "curl"].map(|d| format!("rm -rf {w}/{d}"));
    let runs = ctx.runs_given.unwrap_or(DEFAULT_RUNS);
    let [ours_s, peer_s, lower_s] = hyperfine_prepared(ctx, &cold, &prepare, runs, 1)?[..] else {
        unreachable!("one result per command")
    };

    // Warm: the image is cached; `image inspect` resolves it without the registry.
    let warm_line = format!("env OPENSHELL_HOME={w}/ours {sandbox} image inspect {reference}");
    let warm = [Cmd {
        name: "ours-warm",
        line: warm_line.clone(),
    }];
    let warm_runs = ctx.runs_given.unwrap_or(WARM_RUNS);
    let [warm_s] = hyperfine_prepared(ctx, &warm, &[], warm_runs, 3)?[..] else {
        unreachable!("one result per command")
    };
    let _ = std::fs::remove_dir_all(&work);

    let ratio = ours_s.median_ms / peer_s.median_ms;
    let ratio_lower = ours_s.median_ms / lower_s.median_ms;
    let ratio_ok = ratio <= TARGET_RATIO;
    let warm_ok = warm_s.median_ms <= TARGET_WARM_MS;
    let machine = super::machine();
    println!();
    super::print_machine(&machine);
    println!(
        "python test image ({} layers) from docker-registry on {host}",
        layers.len()
    );
    println!("  {:<14} {:>10} {:>10} {:>10}", "", "median", "p95", "mean");
    for (name, s) in [
        ("ours-cold", ours_s),
        ("skopeo+umoci", peer_s),
        ("curl|tar", lower_s),
        ("ours-warm", warm_s),
    ] {
        println!(
            "  {name:<14} {:>7.1} ms {:>7.1} ms {:>7.1} ms",
            s.median_ms, s.p95_ms, s.mean_ms
        );
    }
    println!("  ratio ours-cold/skopeo+umoci: {ratio:.2} (median)");
    println!("  ratio ours-cold/curl|tar (no verification, no cache): {ratio_lower:.2}");
    println!(
        "  target cold ratio <= {TARGET_RATIO:.1}: {} ({ratio:.2})",
        verdict(ratio_ok)
    );
    println!(
        "  target warm median <= {TARGET_WARM_MS:.0} ms: {} ({:.1} ms)",
        verdict(warm_ok),
        warm_s.median_ms
    );
    let report = serde_json::json!({
        "benchmark": "image",
        "image": layout,
        "runs": runs,
        "warm_runs": warm_runs,
        "machine": machine,
        "ours_cold": { "command": ours, "stats": ours_s.to_json() },
        "skopeo_umoci": { "command": peer, "stats": peer_s.to_json() },
        "curl_tar": { "command": lower, "stats": lower_s.to_json() },
        "ours_warm": { "command": warm_line, "stats": warm_s.to_json() },
        "ratio_cold_vs_skopeo_umoci": super::round3(ratio),
        "ratio_cold_vs_curl_tar": super::round3(ratio_lower),
        "targets": {
            "cold_ratio_max": TARGET_RATIO,
            "cold_ratio_ok": ratio_ok,
            "warm_median_ms_max": TARGET_WARM_MS,
            "warm_ok": warm_ok,
        },
    });
    let path = ctx.write_report("image", &report)?;
    println!("  wrote {}", path.display());
    Ok(())
}

/// The layer digests of an OCI layout's first manifest.
fn layer_digests(layout: &std::path::Path) -> Result<Vec<String>> {
    let read = |p: std::path::PathBuf| -> Result<serde_json::Value> {
        Ok(serde_json::from_slice(
            &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        )?)
    };
    let index = read(layout.join("index.json"))?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index without a manifest")?;
    let manifest = read(
        layout
            .join("blobs/sha256")
            .join(manifest_digest.trim_start_matches("sha256:")),
    )?;
    Ok(manifest["layers"]
        .as_array()
        .context("manifest without layers")?
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_owned))
        .collect())
}

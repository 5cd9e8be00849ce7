//! `exec`: exec round trip through the runtime API (`SandboxedProcess::exec` of `/bin/true`
//! and its wait, in a running sandbox), each backend, next to the host's own fork + exec +
//! wait measured in the same run (the bench target `openshell-sandbox/benches/exec.rs`).

use anyhow::Result;

use super::{machine, print_machine, verdict, Ctx};

/// Targets: median exec round trip, in milliseconds.
pub(super) const TARGET_PROCESS_MS: f64 = 2.0;
pub(super) const TARGET_VM_MS: f64 = 10.0;

pub fn run(ctx: &Ctx) -> Result<()> {
    let out = super::proxy::cargo_bench_in(ctx, "openshell-sandbox", &["vm"], "exec")?;
    let machine = machine();
    println!();
    print_machine(&machine);
    println!(
        "exec /bin/true through the runtime API ({} execs per backend)",
        out["execs"]
    );
    println!(
        "  {:<10} {:>12} {:>12} {:>12} {:>14}",
        "", "p50", "p95", "p99", "host fork+exec p50"
    );
    for (name, target) in [("process", TARGET_PROCESS_MS), ("vm", TARGET_VM_MS)] {
        let b = &out[name];
        if b["measured"] != true {
            println!("  {name:<10} not measured: {}", b["reason"]);
            continue;
        }
        let ms = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN) / 1000.0;
        let p50 = ms(&b["ours"]["p50_us"]);
        println!(
            "  {name:<10} {:>9.2} ms {:>9.2} ms {:>9.2} ms {:>11.2} ms",
            p50,
            ms(&b["ours"]["p95_us"]),
            ms(&b["ours"]["p99_us"]),
            ms(&b["host"]["p50_us"])
        );
        println!(
            "  target {name} median <= {target} ms: {} ({p50:.2} ms)",
            verdict(p50 <= target)
        );
    }
    let report = serde_json::json!({
        "benchmark": "exec",
        "machine": machine,
        "results": out,
        "targets": { "process_median_ms_max": TARGET_PROCESS_MS, "vm_median_ms_max": TARGET_VM_MS },
    });
    let path = ctx.write_report("exec", &report)?;
    println!("  wrote {}", path.display());
    Ok(())
}

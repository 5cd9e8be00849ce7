//! `spawn`: wall time from spawn to exit of `/bin/true` under openshell-sandbox, next to
//! Debian's bubblewrap doing a comparable job (all namespaces unshared, read-only root).

use anyhow::Result;

use super::{hyperfine, verdict, Cmd, Ctx};

/// Target: our median spawn -> exit time, in milliseconds.
const TARGET_MEDIAN_MS: f64 = 20.0;
/// Target: our median over bubblewrap's median.
const TARGET_RATIO: f64 = 2.0;

/// The workdir is outside the repository: the policy makes the workdir writable, and a
/// `--policy` file the workload could write is refused.
const OURS: &str = "target/release/openshell-sandbox --policy policies/default.yaml \
                    --workdir /var/tmp -- /bin/true";
/// The same policy built in (no --policy file, so no inotify watch whose teardown costs an SRCU
/// grace period at exit).
const OURS_BUILTIN: &str = "target/release/openshell-sandbox --workdir /var/tmp -- /bin/true";
/// Every namespace unshared (user, ipc, pid, net, uts, cgroup), the host root read-only, a
/// fresh /dev and /proc. Works as root and, where unprivileged user namespaces are allowed, as
/// anyone else.
const BWRAP: &str =
    "bwrap --unshare-all --die-with-parent --ro-bind / / --dev /dev --proc /proc /bin/true";

pub fn run(ctx: &Ctx) -> Result<()> {
    let cmds = [
        Cmd {
            name: "ours",
            line: OURS.to_owned(),
        },
        Cmd {
            name: "ours-builtin",
            line: OURS_BUILTIN.to_owned(),
        },
        Cmd {
            name: "bwrap",
            line: BWRAP.to_owned(),
        },
    ];
    let [ours, builtin, bwrap] = hyperfine(ctx, &cmds)?[..] else {
        unreachable!("hyperfine returns one result per command")
    };
    let ratio = ours.median_ms / bwrap.median_ms;
    let ratio_p95 = ours.p95_ms / bwrap.p95_ms;
    let median_ok = ours.median_ms <= TARGET_MEDIAN_MS;
    let ratio_ok = ratio <= TARGET_RATIO;

    let machine = super::machine();
    println!();
    super::print_machine(&machine);
    println!(
        "spawn -> exit of /bin/true ({} runs each, {} warmup, from {})",
        ctx.runs,
        ctx.warmup,
        ctx.root.display()
    );
    println!("  {:<12} {:>10} {:>10} {:>10}", "", "median", "p95", "mean");
    for (name, s) in [("ours", ours), ("ours-builtin", builtin), ("bwrap", bwrap)] {
        println!(
            "  {name:<12} {:>7.2} ms {:>7.2} ms {:>7.2} ms",
            s.median_ms, s.p95_ms, s.mean_ms
        );
    }
    println!("  ratio ours/bwrap: {ratio:.2} (median), {ratio_p95:.2} (p95)");
    println!(
        "  ratio ours-builtin/bwrap: {:.2} (median)",
        builtin.median_ms / bwrap.median_ms
    );
    println!(
        "  target median <= {TARGET_MEDIAN_MS:.0} ms: {} ({:.2} ms)",
        verdict(median_ok),
        ours.median_ms
    );
    println!(
        "  target ratio <= {TARGET_RATIO:.1}: {} ({ratio:.2})",
        verdict(ratio_ok)
    );

    let report = serde_json::json!({
        "benchmark": "spawn",
        "workload": "/bin/true",
        "runs": ctx.runs,
        "warmup": ctx.warmup,
        "machine": machine,
        "ours": { "command": OURS, "stats": ours.to_json() },
        "ours_builtin": { "command": OURS_BUILTIN, "stats": builtin.to_json() },
        "bwrap": { "command": BWRAP, "stats": bwrap.to_json() },
        "ratio_median": super::round3(ratio),
        "ratio_p95": super::round3(ratio_p95),
        "targets": {
            "median_ms_max": TARGET_MEDIAN_MS,
            "median_ok": median_ok,
            "ratio_max": TARGET_RATIO,
            "ratio_ok": ratio_ok,
        },
    });
    let path = ctx.write_report("spawn", &report)?;
    println!("  wrote {}", path.display());
    Ok(())
}

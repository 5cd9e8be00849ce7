//! `rootfs`: warm start from a root filesystem directory — spawn to exit of `/bin/true` with
//! `--rootfs <tree>` (a per-sandbox overlay, pivot_root, fresh /proc and /dev) — next to
//! bubblewrap binding the same tree as `/`, and next to our own start on the host root.
//!
//! The tree is a small busybox image built here (Debian's busybox-static), with the directories
//! the built-in default policy names, so no path is skipped.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{hyperfine, verdict, Cmd, Ctx};

/// Target: our median over bubblewrap's median.
const TARGET_RATIO: f64 = 2.0;

const BUSYBOX: &str = "/bin/busybox";

/// Build (or rebuild) the benchmark's tree under `target/bench/rootfs-tree`.
fn build_tree(root: &Path) -> Result<PathBuf> {
    let tree = root.join("target/bench/rootfs-tree");
    if tree.exists() {
        std::fs::remove_dir_all(&tree)
            .with_context(|| format!("cannot remove {}", tree.display()))?;
    }
    for d in [
        "bin", "sbin", "usr", "lib", "lib64", "etc", "tmp", "proc", "dev",
    ] {
        std::fs::create_dir_all(tree.join(d))
            .with_context(|| format!("cannot create {}", tree.join(d).display()))?;
    }
    std::fs::copy(BUSYBOX, tree.join("bin/busybox"))
        .with_context(|| format!("cannot copy {BUSYBOX} (Debian package busybox-static)"))?;
    for applet in ["true", "sh"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet))?;
    }
    std::fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )?;
    std::fs::write(tree.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(tree)
}

pub fn run(ctx: &Ctx) -> Result<()> {
    let tree = build_tree(&ctx.root)?;
    let t = tree.display();
    let ours = format!("target/release/openshell-sandbox --rootfs {t} -- /bin/true");
    let host = "target/release/openshell-sandbox -- /bin/true".to_owned();
    let bwrap = format!(
        "bwrap --unshare-all --die-with-parent --bind {t} / --dev /dev --proc /proc /bin/true"
    );
    let cmds = [
        Cmd {
            name: "ours-rootfs",
            line: ours.clone(),
        },
        Cmd {
            name: "ours-hostroot",
            line: host.clone(),
        },
        Cmd {
            name: "bwrap-bind",
            line: bwrap.clone(),
        },
    ];
    let [rootfs, hostroot, bw] = hyperfine(ctx, &cmds)?[..] else {
        unreachable!("hyperfine returns one result per command")
    };
    let ratio = rootfs.median_ms / bw.median_ms;
    let ratio_ok = ratio <= TARGET_RATIO;
    let machine = super::machine();
    println!();
    super::print_machine(&machine);
    println!(
        "warm start from a rootfs dir, spawn -> exit of /bin/true ({} runs each, {} warmup)",
        ctx.runs, ctx.warmup
    );
    println!("  {:<14} {:>10} {:>10} {:>10}", "", "median", "p95", "mean");
    for (name, s) in [
        ("ours-rootfs", rootfs),
        ("ours-hostroot", hostroot),
        ("bwrap-bind", bw),
    ] {
        println!(
            "  {name:<14} {:>7.2} ms {:>7.2} ms {:>7.2} ms",
            s.median_ms, s.p95_ms, s.mean_ms
        );
    }
    println!("  ratio ours-rootfs/bwrap-bind: {ratio:.2} (median)");
    println!(
        "  cost of the root filesystem: {:+.2} ms (median, ours-rootfs - ours-hostroot)",
        rootfs.median_ms - hostroot.median_ms
    );
    println!(
        "  target ratio <= {TARGET_RATIO:.1}: {} ({ratio:.2})",
        verdict(ratio_ok)
    );
    let report = serde_json::json!({
        "benchmark": "rootfs",
        "workload": "/bin/true",
        "runs": ctx.runs,
        "warmup": ctx.warmup,
        "machine": machine,
        "ours_rootfs": { "command": ours, "stats": rootfs.to_json() },
        "ours_hostroot": { "command": host, "stats": hostroot.to_json() },
        "bwrap_bind": { "command": bwrap, "stats": bw.to_json() },
        "ratio_median": super::round3(ratio),
        "rootfs_cost_ms": super::round3(rootfs.median_ms - hostroot.median_ms),
        "targets": { "ratio_max": TARGET_RATIO, "ratio_ok": ratio_ok },
    });
    let path = ctx.write_report("rootfs", &report)?;
    println!("  wrote {}", path.display());
    Ok(())
}

//! `cargo xtask bench [NAME...] [--runs N]`: benchmarks that report, never assert.
//!
//! Each benchmark is a function in its own module, registered in [`BENCHES`]. Before any of them
//! runs, the system packages are ensured and, when a selected benchmark needs it, the release
//! `openshell-sandbox` is built. A benchmark measures with hyperfine ([`hyperfine`]) or with an
//! in-process `harness = false` bench target (the proxy benchmarks, [`proxy`]), prints a table,
//! writes its figures to `target/bench/<name>.json` and says whether its targets hold. Missing a
//! target never fails the command; a command that cannot run does. After the run the published
//! numbers (`docs/benchmarks.{md,json}`, the README's headline block) are rewritten
//! ([`publish`]), with the reports of the benchmarks that ran replacing theirs.

mod exec;
mod image;
mod proxy;
mod publish;
mod rootfs;
mod spawn;
mod ssh;
mod vm;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::util::{self, project_root};

/// One benchmark: `cargo xtask bench <name>`.
struct Bench {
    name: &'static str,
    about: &'static str,
    /// Measures `target/release/openshell-sandbox` (built before any benchmark runs).
    needs_sandbox: bool,
    run: fn(&Ctx) -> Result<()>,
}

/// All benchmarks, in the order `cargo xtask bench` runs them. Add proxy, ssh, ... here.
const BENCHES: &[Bench] = &[
    Bench {
        name: "spawn",
        about: "spawn -> exit of /bin/true: openshell-sandbox vs bubblewrap",
        needs_sandbox: true,
        run: spawn::run,
    },
    Bench {
        name: "rootfs",
        about:
            "warm start from a --rootfs dir (overlay + pivot_root): ours vs bwrap --bind <tree> /",
        needs_sandbox: true,
        run: rootfs::run,
    },
    Bench {
        name: "decision",
        about: "Rego decision latency, 100 policies: uncached vs the proxy's CONNECT cache",
        needs_sandbox: false,
        run: proxy::decision,
    },
    Bench {
        name: "connect",
        about: "CONNECT rate and added latency: openshell-proxy vs tinyproxy",
        needs_sandbox: false,
        run: proxy::connect,
    },
    Bench {
        name: "terminate",
        about: "HTTPS through a TLS-terminating proxy (keep-alive and new-connection latency, \
                request rate): openshell-proxy vs mitmproxy",
        needs_sandbox: false,
        run: proxy::terminate,
    },
    Bench {
        name: "update",
        about: "live policy update: file rename -> first CONNECT with the new decision",
        needs_sandbox: false,
        run: proxy::update,
    },
    Bench {
        name: "ssh",
        about: "exec round trip over a reused ssh connection (ControlMaster): ours vs OpenSSH sshd",
        needs_sandbox: true,
        run: ssh::run,
    },
    Bench {
        name: "exec",
        about: "exec round trip through the runtime API, each backend, vs the host's fork + exec",
        needs_sandbox: true,
        run: exec::run,
    },
    Bench {
        name: "image",
        about: "pull + unpack of the python test image from a loopback registry (cold) and a \
                warm ensure from the cache, vs skopeo copy + umoci unpack and curl | tar \
                (10 runs unless --runs)",
        needs_sandbox: true,
        run: image::run,
    },
    Bench {
        name: "vm",
        about: "microVM (qemu engine): cold create+exec+destroy, first output, idle RSS vs bare \
                qemu microvm (20 runs unless --runs)",
        needs_sandbox: true,
        run: vm::run,
    },
];

const DEFAULT_RUNS: u32 = 100;
const DEFAULT_WARMUP: u32 = 5;

/// Parsed `bench` arguments.
pub struct Opts {
    names: Vec<String>,
    /// `--runs`, when given.
    runs: Option<u32>,
    list: bool,
}

impl Opts {
    pub fn parse(args: &[String]) -> Result<Opts> {
        let mut opts = Opts {
            names: Vec::new(),
            runs: None,
            list: false,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let runs = if arg == "--runs" {
                Some(args.next().context("--runs needs a value")?.as_str())
            } else {
                arg.strip_prefix("--runs=")
            };
            if let Some(runs) = runs {
                opts.runs = Some(
                    runs.parse()
                        .ok()
                        .filter(|&n: &u32| n >= 2)
                        .with_context(|| {
                            format!("--runs: expected an integer >= 2, got {runs:?}")
                        })?,
                );
            } else if arg == "--list" {
                opts.list = true;
            } else if arg.starts_with('-') {
                bail!("unknown option {arg:?} (options: --runs N, --list)");
            } else if BENCHES.iter().any(|b| b.name == arg) {
                opts.names.push(arg.clone());
            } else {
                bail!("unknown benchmark {arg:?} (available: {})", bench_names());
            }
        }
        Ok(opts)
    }
}

fn bench_names() -> String {
    BENCHES
        .iter()
        .map(|b| b.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What every benchmark gets.
pub struct Ctx {
    /// Workspace root; benchmarks run their commands from here.
    root: PathBuf,
    /// Measured runs per command.
    runs: u32,
    /// `--runs`, when given (benchmarks with their own default use it).
    runs_given: Option<u32>,
    /// Warmup runs per command.
    warmup: u32,
}

impl Ctx {
    /// Writes a benchmark's figures to `target/bench/<name>.json` and returns the path.
    fn write_report(&self, name: &str, report: &Value) -> Result<PathBuf> {
        let dir = self.root.join("target").join("bench");
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{name}.json"));
        let text = serde_json::to_string_pretty(report)? + "\n";
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

pub fn run(opts: &Opts) -> Result<()> {
    if opts.list {
        for b in BENCHES {
            println!("{:<10} {}", b.name, b.about);
        }
        return Ok(());
    }
    let selected: Vec<&Bench> = if opts.names.is_empty() {
        BENCHES.iter().collect()
    } else {
        BENCHES
            .iter()
            .filter(|b| opts.names.iter().any(|n| n == b.name))
            .collect()
    };
    let root = project_root();

    // The measured binary lives at target/release/openshell-sandbox under the workspace, whatever
    // CARGO_TARGET_DIR the caller has set, so the command the report names is the one measured.
    // Always with the vm backend (a superset: the process backend is the same code), so that
    // running spawn and vm together builds once.
    if selected.iter().any(|b| b.needs_sandbox) {
        println!("=== build openshell-sandbox (release, --features vm) ===");
        util::run(
            util::cargo()
                .args([
                    "build",
                    "--release",
                    "-p",
                    "openshell-sandbox",
                    "--features",
                    "vm",
                    "--target-dir",
                ])
                .arg(root.join("target")),
        )
        .context("cannot build openshell-sandbox")?;
        println!();
    }
    println!("=== deps ===");
    crate::deps::ensure()?;

    let ctx = Ctx {
        root,
        runs: opts.runs.unwrap_or(DEFAULT_RUNS),
        runs_given: opts.runs,
        warmup: DEFAULT_WARMUP,
    };
    for b in &selected {
        println!("\n=== bench {}: {} ===", b.name, b.about);
        // A stale report must not be published as this run's.
        let _ = std::fs::remove_file(
            ctx.root
                .join("target/bench")
                .join(format!("{}.json", b.name)),
        );
        (b.run)(&ctx).with_context(|| format!("bench {}", b.name))?;
    }
    // Only the benchmarks that ran replace their published reports.
    let ran: Vec<&str> = selected.iter().map(|b| b.name).collect();
    publish::publish(
        &ctx.root,
        &BENCHES.iter().map(|b| b.name).collect::<Vec<_>>(),
        &ran,
    )
}

/// One command for hyperfine: a short name and the command line (split into words by hyperfine,
/// no shell: whitespace separates arguments, and an argument with spaces goes in double quotes;
/// [`words`] splits the same way for the smoke run).
struct Cmd {
    name: &'static str,
    line: String,
}

/// Timing of one command, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Stats {
    median_ms: f64,
    p95_ms: f64,
    mean_ms: f64,
    min_ms: f64,
    max_ms: f64,
    runs: usize,
}

impl Stats {
    fn to_json(self) -> Value {
        serde_json::json!({
            "median_ms": round3(self.median_ms),
            "p95_ms": round3(self.p95_ms),
            "mean_ms": round3(self.mean_ms),
            "min_ms": round3(self.min_ms),
            "max_ms": round3(self.max_ms),
            "runs": self.runs,
        })
    }
}

/// What the figures depend on besides the code: CPU count and load when the benchmark ran.
/// One line naming the machine and its load, printed above every result table.
fn print_machine(machine: &Value) {
    println!(
        "machine: {} cpus, load average {} (figures are noisy on a busy machine)",
        machine["cpus"],
        machine["loadavg"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| format!("{:.2}", l.as_f64().unwrap_or(f64::NAN)))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<f64> = loadavg
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let kvm = if !Path::new("/dev/kvm").exists() {
        "none (TCG only)"
    } else if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm-pvm (nested; standard guests run under TCG)"
    } else if Path::new("/sys/module/kvm_intel").exists()
        || Path::new("/sys/module/kvm_amd").exists()
    {
        "kvm (hardware)"
    } else {
        "kvm (unknown kind)"
    };
    serde_json::json!({ "cpus": cpus, "cpu": cpu, "kernel": kernel, "kvm": kvm, "loadavg": load })
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Runs each command once to check that it works (showing its output if not), then measures
/// all of them side by side in one hyperfine run without a shell, and returns their statistics
/// in the same order.
fn hyperfine(ctx: &Ctx, cmds: &[Cmd]) -> Result<Vec<Stats>> {
    hyperfine_prepared(ctx, cmds, &[], ctx.runs, ctx.warmup)
}

/// [`hyperfine`] with a `--prepare` command per command (none, or one for each, in order; run
/// before each timing run and before the smoke run), and explicit run and warmup counts.
fn hyperfine_prepared(
    ctx: &Ctx,
    cmds: &[Cmd],
    prepare: &[String],
    runs: u32,
    warmup: u32,
) -> Result<Vec<Stats>> {
    ensure!(
        prepare.is_empty() || prepare.len() == cmds.len(),
        "one prepare command per command, or none"
    );
    for (i, c) in cmds.iter().enumerate() {
        if let Some(p) = prepare.get(i) {
            smoke(
                &ctx.root,
                &Cmd {
                    name: "prepare",
                    line: p.clone(),
                },
            )?;
        }
        smoke(&ctx.root, c)?;
    }

    let json_path =
        std::env::temp_dir().join(format!("xtask-hyperfine-{}.json", std::process::id()));
    let _cleanup = RemoveOnDrop(&json_path);
    let mut cmd = Command::new("hyperfine");
    cmd.current_dir(&ctx.root)
        .stdin(Stdio::null())
        .args(["--shell=none", "--style=basic"])
        .args(["--warmup", &warmup.to_string()])
        .args(["--runs", &runs.to_string()])
        .arg("--export-json")
        .arg(&json_path);
    for p in prepare {
        cmd.args(["--prepare", p]);
    }
    for c in cmds {
        cmd.args(["--command-name", c.name]);
    }
    for c in cmds {
        cmd.arg(&c.line);
    }
    util::run(&mut cmd)?;

    let text = std::fs::read_to_string(&json_path)
        .with_context(|| format!("cannot read hyperfine output {}", json_path.display()))?;
    let doc: Value = serde_json::from_str(&text).context("hyperfine output is not JSON")?;
    let results = doc["results"]
        .as_array()
        .context("hyperfine output has no results array")?;
    ensure!(
        results.len() == cmds.len(),
        "hyperfine reported {} results for {} commands",
        results.len(),
        cmds.len()
    );
    results
        .iter()
        .zip(cmds)
        .map(|(r, c)| {
            let times: Vec<f64> = r["times"]
                .as_array()
                .and_then(|t| t.iter().map(Value::as_f64).collect())
                .with_context(|| {
                    format!("{}: no numeric times array in hyperfine output", c.name)
                })?;
            stats(&times).with_context(|| format!("{}: no timings", c.name))
        })
        .collect()
}

/// Runs a command once, outside hyperfine, so a broken command fails with its own output.
fn smoke(root: &Path, c: &Cmd) -> Result<()> {
    let words = words(&c.line);
    let mut parts = words.iter();
    let program = parts.next().context("empty command line")?;
    let out = Command::new(program)
        .args(parts)
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{}: cannot start `{}`", c.name, c.line))?;
    if !out.status.success() {
        bail!(
            "{}: `{}` failed ({}):\n{}{}",
            c.name,
            c.line,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Splits a command line into words: whitespace separates, double quotes group (no escapes).
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    let mut quoted = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                cur.get_or_insert_with(String::new);
            }
            c if c.is_whitespace() && !quoted => {
                out.extend(cur.take());
            }
            c => cur.get_or_insert_with(String::new).push(c),
        }
    }
    out.extend(cur);
    out
}

/// Statistics over wall-clock times in seconds. The median averages the two middle values for an
/// even count; p95 is the nearest-rank percentile (the smallest time with at least 95% of the
/// runs at or below it).
fn stats(times_s: &[f64]) -> Option<Stats> {
    if times_s.is_empty() {
        return None;
    }
    let mut ms: Vec<f64> = times_s.iter().map(|t| t * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let n = ms.len();
    let median_ms = if n % 2 == 1 {
        ms[n / 2]
    } else {
        (ms[n / 2 - 1] + ms[n / 2]) / 2.0
    };
    // ceil(0.95 * n) computed in integers: the 1-based rank of the p95 sample.
    let rank = (95 * n).div_ceil(100);
    Some(Stats {
        median_ms,
        p95_ms: ms[rank.max(1) - 1],
        mean_ms: ms.iter().sum::<f64>() / n as f64,
        min_ms: ms[0],
        max_ms: ms[n - 1],
        runs: n,
    })
}

struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::{stats, words};

    #[test]
    fn words_split_like_hyperfine() {
        assert_eq!(words(r#"q -a "x y  z" b"#), vec!["q", "-a", "x y  z", "b"]);
        assert_eq!(words(r#"  a "" b "#), vec!["a", "", "b"]);
    }

    #[test]
    fn median_and_p95() {
        let times: Vec<f64> = (1..=20).rev().map(|i| f64::from(i) / 1000.0).collect();
        let s = stats(&times).unwrap();
        assert_eq!(
            (s.median_ms, s.p95_ms, s.min_ms, s.max_ms),
            (10.5, 19.0, 1.0, 20.0)
        );
        let s = stats(&[0.003, 0.001, 0.002]).unwrap();
        assert_eq!((s.median_ms, s.p95_ms, s.runs), (2.0, 3.0, 3));
        assert!(stats(&[]).is_none());
    }
}

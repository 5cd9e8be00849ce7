//! `cargo xtask escape`: run the escape suite (tests/escape/) on every backend and write
//! docs/security.md from the rows its probes recorded: probe, category, what it tries, the
//! host-side check, and the verdict per backend. The doc is written even when a probe escaped
//! (the row says so), and the command then fails.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::util::{cargo, project_root, run};

/// Where the suite's probes record their rows (`$CARGO_TARGET_TMPDIR/escape`).
fn results_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
        .join("tmp/escape")
}

/// One probe's row, as `tests/escape/main.rs` writes it.
struct Row {
    probe: String,
    category: String,
    tries: String,
    check: String,
    verdicts: Vec<(String, String)>,
}

fn read_rows() -> Result<Vec<Row>> {
    let dir = results_dir();
    let mut rows = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_slice(&text)
            .with_context(|| format!("{}: not JSON", path.display()))?;
        let field = |name: &str| -> Result<String> {
            v[name]
                .as_str()
                .map(String::from)
                .with_context(|| format!("{}: field `{name}` missing", path.display()))
        };
        let verdicts = v["verdicts"]
            .as_object()
            .with_context(|| format!("{}: field `verdicts` missing", path.display()))?
            .iter()
            .map(|(b, v)| (b.clone(), v.as_str().unwrap_or("?").to_owned()))
            .collect();
        rows.push(Row {
            probe: field("probe")?,
            category: field("category")?,
            tries: field("tries")?,
            check: field("check")?,
            verdicts,
        });
    }
    let order = [
        "files",
        "privilege",
        "kernel",
        "resources",
        "network",
        "control",
    ];
    rows.sort_by_key(|r| {
        (
            order
                .iter()
                .position(|c| *c == r.category)
                .unwrap_or(order.len()),
            r.probe.clone(),
        )
    });
    Ok(rows)
}

fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

fn render(rows: &[Row]) -> String {
    let backends = ["process", "vm"];
    let mut out = String::new();
    let escaped = rows
        .iter()
        .filter(|r| r.verdicts.iter().any(|(_, v)| v != "held"))
        .count();
    let _ = writeln!(
        out,
        "# Escape suite\n\n\
         Written by `cargo xtask escape` from its last run on this machine; do not edit by hand.\n\n\
         Each probe runs inside a sandbox (the same script and policy on every backend) and is \
         scored by a post-condition checked **on the host** after the sandbox ends: a canary's \
         bytes and metadata, what a host listener received, a host value, the processes left. \
         A probe's own output is never the verdict. The probes live in `tests/escape/probes.rs` \
         and run with the test command (`cargo test --workspace --all-features`); one that \
         escapes is a failing test.\n\n\
         **{} probes, {} escaped.** A backend column reads `held` when the post-condition held \
         there, `not run` when this build had no such backend.\n",
        rows.len(),
        escaped
    );
    let _ = writeln!(
        out,
        "| Probe | Category | What it tries | Host-side check | process | vm |\n|---|---|---|---|---|---|"
    );
    for r in rows {
        let verdict = |b: &str| {
            r.verdicts
                .iter()
                .find(|(name, _)| name == b)
                .map_or_else(|| "not run".to_owned(), |(_, v)| cell(v))
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} | {} |",
            r.probe,
            r.category,
            cell(&r.tries),
            cell(&r.check),
            verdict(backends[0]),
            verdict(backends[1])
        );
    }
    out
}

pub fn run_escape(rest: &[String]) -> Result<()> {
    let dir = results_dir();
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let mut cmd = cargo();
    cmd.args([
        "test",
        "-p",
        "openshell-sandbox",
        "--all-features",
        "--test",
        "escape",
    ]);
    if !rest.is_empty() {
        cmd.arg("--").args(rest);
    }
    let tested = run(&mut cmd);
    let rows = read_rows()?;
    if rows.is_empty() {
        bail!("the escape suite recorded no probe (see its output above)");
    }
    let doc = project_root().join("docs/security.md");
    std::fs::write(&doc, render(&rows)).with_context(|| format!("writing {}", doc.display()))?;
    println!("wrote {} ({} probes)", doc.display(), rows.len());
    tested
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_render_with_both_backends_and_escapes_counted() {
        let rows = vec![
            Row {
                probe: "a".into(),
                category: "files".into(),
                tries: "x | y".into(),
                check: "z".into(),
                verdicts: vec![("process".into(), "held".into())],
            },
            Row {
                probe: "b".into(),
                category: "kernel".into(),
                tries: "t".into(),
                check: "c".into(),
                verdicts: vec![
                    ("process".into(), "held".into()),
                    ("vm".into(), "ESCAPED: it got out".into()),
                ],
            },
        ];
        let doc = render(&rows);
        assert!(doc.contains("**2 probes, 1 escaped.**"), "{doc}");
        assert!(
            doc.contains("| `a` | files | x \\| y | z | held | not run |"),
            "{doc}"
        );
        assert!(
            doc.contains("| `b` | kernel | t | c | held | ESCAPED: it got out |"),
            "{doc}"
        );
    }
}

//! `cargo xtask readme`: run README.md's two set-up commands exactly as written there.
//!
//! README.md marks what a newcomer types on a fresh machine with HTML comments, each followed by
//! a fenced block:
//!
//! - `<!-- fresh-machine: run -->`: the main job, a command in a sandbox under a shipped policy;
//! - `<!-- fresh-machine: run prints -->`: what that command prints on standard output, line for
//!   line;
//! - `<!-- fresh-machine: test -->`: the whole test suite.
//!
//! The commands are read from the README on every run (never copied here), run by `sh -c` in the
//! project root, and the first one fails the check unless its standard output is exactly the
//! README's. CI runs this instead of spelling the commands out, so the README cannot drift from
//! what works.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util::project_root;

const RUN: &str = "run";
const RUN_PRINTS: &str = "run prints";
const TEST: &str = "test";

/// The fenced block after one marker, with the README line the marker is on (1-based).
#[derive(Debug, PartialEq, Eq)]
pub struct Block {
    pub line: usize,
    pub text: String,
}

/// README.md's set-up section as blocks.
#[derive(Debug)]
pub struct SetUp {
    pub run: Block,
    pub run_prints: Block,
    pub test: Block,
}

pub fn run() -> Result<()> {
    let path = project_root().join("README.md");
    let readme = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let setup = parse(&readme).with_context(|| format!("{}: set-up commands", path.display()))?;

    println!("\n=== README.md line {}: the main job ===", setup.run.line);
    let printed = run_captured(&setup.run.text, &project_root())?;
    let want = lines(&setup.run_prints.text);
    let got = lines(&printed);
    if want != got {
        bail!(
            "README.md line {}: the command printed\n{}\nbut README.md line {} says it prints\n{}",
            setup.run.line,
            indent(&got),
            setup.run_prints.line,
            indent(&want)
        );
    }
    println!(
        "readme: the main job printed what README.md line {} says",
        setup.run_prints.line
    );

    println!(
        "\n=== README.md line {}: the test suite ===",
        setup.test.line
    );
    run_shown(&setup.test.text, &project_root())
}

/// Finds the three marked blocks. Each marker must appear once and be followed (blank lines
/// allowed) by a fenced block.
pub fn parse(readme: &str) -> Result<SetUp> {
    let all: Vec<&str> = readme.lines().collect();
    let find = |name: &str| -> Result<Block> {
        let marker = format!("<!-- fresh-machine: {name} -->");
        let at: Vec<usize> = all
            .iter()
            .enumerate()
            .filter(|(_, l)| l.trim() == marker)
            .map(|(i, _)| i)
            .collect();
        let i = match at.as_slice() {
            [i] => *i,
            [] => bail!("no `{marker}` line"),
            [first, second, ..] => bail!(
                "`{marker}` appears on lines {} and {}; it must appear once",
                first + 1,
                second + 1
            ),
        };
        let mut rest = all.iter().enumerate().skip(i + 1);
        let open = rest
            .by_ref()
            .find(|(_, l)| !l.trim().is_empty())
            .filter(|(_, l)| l.trim_start().starts_with("```"))
            .map(|(j, _)| j)
            .with_context(|| {
                format!(
                    "line {}: `{marker}` is not followed by a fenced block",
                    i + 1
                )
            })?;
        let body: Vec<&str> = rest
            .by_ref()
            .take_while(|(_, l)| !l.trim_start().starts_with("```"))
            .map(|(_, l)| *l)
            .collect();
        if open + 1 + body.len() >= all.len() {
            bail!("line {}: the fenced block is never closed", open + 1);
        }
        let text = body.join("\n");
        if text.trim().is_empty() {
            bail!(
                "line {}: the fenced block after `{marker}` is empty",
                open + 1
            );
        }
        Ok(Block { line: i + 1, text })
    };
    Ok(SetUp {
        run: find(RUN)?,
        run_prints: find(RUN_PRINTS)?,
        test: find(TEST)?,
    })
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(|l| l.trim_end().to_owned()).collect()
}

fn indent(lines: &[String]) -> String {
    lines
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn shell(command: &str, dir: &Path) -> Command {
    println!("$ {command}");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", command]).current_dir(dir);
    cmd
}

/// Runs a README command with its standard output captured (and echoed once it ends), standard
/// error inherited so build progress stays visible.
fn run_captured(command: &str, dir: &Path) -> Result<String> {
    let out = shell(command, dir)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `sh -c {command:?}`"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{stdout}");
    if !out.status.success() {
        bail!("`{command}` failed: {}", out.status);
    }
    Ok(stdout)
}

fn run_shown(command: &str, dir: &Path) -> Result<()> {
    let status = shell(command, dir)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start `sh -c {command:?}`"))?;
    if !status.success() {
        bail!("`{command}` failed: {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_projects_readme_has_its_set_up_commands() {
        let readme = std::fs::read_to_string(project_root().join("README.md")).unwrap();
        let setup = parse(&readme).unwrap();
        assert!(setup.run.text.contains("openshell-sandbox"), "{setup:?}");
        assert_eq!(setup.test.text.trim(), "cargo xtask test");
        assert!(!setup.run_prints.text.trim().is_empty());
    }

    #[test]
    fn blocks_are_read_after_their_markers() {
        let text = "intro\n<!-- fresh-machine: run -->\n\n```sh\necho a\necho b\n```\n\
                    <!-- fresh-machine: run prints -->\n```text\na\nb\n```\n\
                    <!-- fresh-machine: test -->\n```sh\ncargo xtask test\n```\n";
        let setup = parse(text).unwrap();
        assert_eq!(
            setup.run,
            Block {
                line: 2,
                text: "echo a\necho b".into()
            }
        );
        assert_eq!(setup.run_prints.text, "a\nb");
        assert_eq!(setup.test.line, 13);
    }

    #[test]
    fn a_missing_doubled_or_unfenced_marker_is_an_error_naming_the_line() {
        let missing = "<!-- fresh-machine: run -->\n```\nx\n```\n";
        assert!(format!("{:#}", parse(missing).unwrap_err()).contains("run prints"));

        let doubled = "<!-- fresh-machine: run -->\n```\nx\n```\n<!-- fresh-machine: run -->\n";
        assert!(format!("{:#}", parse(doubled).unwrap_err()).contains("lines 1 and 5"));

        let unfenced = "<!-- fresh-machine: run -->\nplain text\n";
        assert!(format!("{:#}", parse(unfenced).unwrap_err()).contains("line 1"));

        let open = "<!-- fresh-machine: run -->\n```\nx\n";
        assert!(format!("{:#}", parse(open).unwrap_err()).contains("never closed"));
    }
}

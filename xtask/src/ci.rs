//! `cargo xtask ci`: the checks CI runs once `cargo xtask deps` has installed the packages.
//! `.ci/run` spells out the same commands.

use anyhow::Result;

use crate::util::{cargo, run};

pub fn run_all() -> Result<()> {
    section("cargo fmt");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    section("cargo clippy");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    section("cargo test");
    test(&[])?;
    println!("\nci: all checks passed");
    Ok(())
}

/// The project's test command, `cargo test --workspace`, with extra arguments appended.
pub fn test(extra: &[String]) -> Result<()> {
    run(cargo().args(["test", "--workspace"]).args(extra))
}

fn section(name: &str) {
    println!("\n=== {name} ===");
}

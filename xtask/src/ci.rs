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
    run(cargo().args(["test", "--workspace"]))?;
    println!("\nci: all checks passed");
    Ok(())
}

fn section(name: &str) {
    println!("\n=== {name} ===");
}

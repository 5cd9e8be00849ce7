//! `cargo xtask ci`: the checks CI runs once `cargo xtask deps` has installed the packages.
//! `.ci/run` spells out the same commands.

use anyhow::Result;

use crate::util::{cargo, run};

pub fn run_all() -> Result<()> {
    section("cargo fmt");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    section("cargo clippy");
    for features in [None, Some("--all-features")] {
        run(cargo()
            .args(["clippy", "--workspace", "--all-targets"])
            .args(features)
            .args(["--", "-D", "warnings"]))?;
    }
    section("cargo xtask test");
    crate::deps::ensure_with(true)?;
    crate::guest::run(&crate::guest::Opts::parse(&[])?)?;
    crate::images::run_images(false)?;
    test(&[])?;
    println!("\nci: all checks passed");
    Ok(())
}

/// The suite on both backends: `cargo test --workspace --all-features`, with extra arguments
/// appended.
pub fn test(extra: &[String]) -> Result<()> {
    run(cargo()
        .args(["test", "--workspace", "--all-features"])
        .args(extra))
}

fn section(name: &str) {
    println!("\n=== {name} ===");
}

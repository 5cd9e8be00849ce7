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
    // README.md's two set-up commands as written there: the main job (its output checked) and
    // `cargo xtask test`.
    crate::deps::ensure_with(true)?;
    crate::readme::run()?;
    println!("\nci: all checks passed");
    Ok(())
}

/// The suite on both backends: `cargo test --workspace --all-features`, with extra arguments
/// appended.
///
/// Tests run one at a time unless `RUST_TEST_THREADS` says otherwise: with several VMs booting at
/// once on a 2-core TCG host, the 24 MiB both-ways transfer of the ssh test sometimes crawls in
/// vhost-device-vsock (tiny packets, every one re-registering its socket in epoll) until its
/// 300 s bound; alone it takes about 10 s. See the note on issue #4.
pub fn test(extra: &[String]) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--all-features"])
        .args(extra);
    if std::env::var_os("RUST_TEST_THREADS").is_none() {
        cmd.env("RUST_TEST_THREADS", "1");
    }
    run(&mut cmd)
}

fn section(name: &str) {
    println!("\n=== {name} ===");
}

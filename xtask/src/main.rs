//! Project chores, run as `cargo xtask <COMMAND>` (alias in `.cargo/config.toml`).
//!
//! A plain binary with few dependencies, in the style of rust-analyzer's xtask: it installs the
//! system packages the tests and benchmarks need, builds the microVM guest, runs the CI checks and
//! runs the benchmarks.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod bench;
mod ci;
mod deps;
mod escape;
mod guest;
mod images;
mod readme;
mod util;

use anyhow::{bail, Context, Result};

const USAGE: &str = "\
usage: cargo xtask <COMMAND>

commands:
  deps [--vm]              install the Debian packages tests and benchmarks need (when missing);
                           --vm adds those of the microVM backend (kernel build, qemu, helpers)
                           and its VMM system user, openshell-vmm
  guest [--force] [--only kernel|qemu|helpers|agent|rootfs] [--check]
                           build what the vm backend needs (guest kernel, minimal static QEMU,
                           vhost-device-vsock and virtiofsd, static guest agent, root directory),
                           cached by content hash
                           under $OPENSHELL_GUEST_DIR (see guest/README.md); --force rebuilds,
                           --check then boots the kernel under qemu as a smoke test
  images [--force]         build the OCI test images (busybox; python from Debian packages) as
                           OCI layouts under <target>/test-images, cached by content
  bench [NAME...] [--runs N] [--list]
                           build openshell-sandbox in release, then run the named benchmarks
                           (default: all; --list names them) with N runs each (default 100;
                           vm: 20)
  test [ARGS...]           deps (with --vm), the guest, the test images, then
                           `cargo test --workspace --all-features [ARGS...]` (the README's command)
  escape [ARGS...]         deps (with --vm) and the guest, then the escape suite
                           (tests/escape/, both backends); writes docs/security.md from the
                           run and fails if a probe escaped
  readme                   run README.md's two set-up commands as written there (marked
                           `<!-- fresh-machine: ... -->`); fails unless the first prints what
                           the README says it prints
  ci                       cargo fmt --check, cargo clippy -D warnings (with and without
                           --all-features), then `cargo xtask readme` (which runs the
                           README's `cargo xtask test`)
  help                     print this message";

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        println!("{USAGE}");
        bail!("no command given");
    };
    let rest: Vec<String> = args.collect();
    match cmd.as_str() {
        "deps" => match rest.as_slice() {
            [] => deps::ensure(),
            [vm] if vm == "--vm" => deps::ensure_with(true),
            [other, ..] => bail!("deps: unexpected argument {other:?} (options: --vm)"),
        },
        "guest" => {
            let opts = guest::Opts::parse(&rest).context("guest: bad arguments")?;
            guest::run(&opts)
        }
        "images" => match rest.as_slice() {
            [] => images::run_images(false),
            [f] if f == "--force" => images::run_images(true),
            [other, ..] => bail!("images: unexpected argument {other:?} (options: --force)"),
        },
        "bench" => {
            let opts = bench::Opts::parse(&rest).context("bench: bad arguments")?;
            bench::run(&opts)
        }
        "test" => {
            // The whole suite: both backends, so the vm guest is built (cached) first.
            deps::ensure_with(true)?;
            guest::run(&guest::Opts::parse(&[])?)?;
            images::run_images(false)?;
            ci::test(&rest)
        }
        "escape" => {
            deps::ensure_with(true)?;
            guest::run(&guest::Opts::parse(&[])?)?;
            escape::run_escape(&rest)
        }
        "readme" => {
            no_args("readme", &rest)?;
            readme::run()
        }
        "ci" => {
            no_args("ci", &rest)?;
            ci::run_all()
        }
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => {
            eprintln!("{USAGE}");
            bail!("unknown command {other:?}")
        }
    }
}

fn no_args(cmd: &str, rest: &[String]) -> Result<()> {
    if let Some(first) = rest.first() {
        bail!("{cmd}: unexpected argument {first:?}");
    }
    Ok(())
}

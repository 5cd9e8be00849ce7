//! `openshell-test-registry NAME=OCI_LAYOUT_DIR...`: starts Debian's docker-registry on
//! 127.0.0.1 (the test harness's `Registry`), pushes each layout as `HOST/NAME:latest` with
//! oci-client, prints `HOST` on stdout, and stops the registry when stdin closes. For the image
//! benchmark (`cargo xtask bench image`) and for trying `--image` by hand.

#![allow(clippy::print_stdout)]

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use openshell_image::testing::{push, Registry, RegistryOptions, TestImage};

fn main() -> anyhow::Result<()> {
    let mut images = Vec::new();
    for arg in std::env::args().skip(1) {
        let (name, dir) = arg
            .split_once('=')
            .with_context(|| format!("expected NAME=OCI_LAYOUT_DIR, got {arg:?}"))?;
        images.push((name.to_owned(), PathBuf::from(dir)));
    }
    let registry = Registry::start(&RegistryOptions::default())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for (name, dir) in &images {
        let image = TestImage::from_layout(dir)?;
        let reference = format!("{}/{name}:latest", registry.host());
        rt.block_on(push(&reference, &image, None))
            .with_context(|| format!("pushing {reference}"))?;
    }
    println!("{}", registry.host());
    std::io::stdout().flush()?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(registry);
    Ok(())
}

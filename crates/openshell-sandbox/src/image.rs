//! `openshell-sandbox image pull|ls|rm|inspect`: the OCI image cache from the command line, and
//! the registry flags (`RegistryArgs`) turned into `openshell_image::PullOptions`.

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use openshell_image::{
    AuthOptions, Credentials, PreparedImage, PullEvent, PullOptions, PullPolicy, Store,
};

use crate::cli::{ImageCommand, RegistryArgs};

impl RegistryArgs {
    /// The pull options these flags ask for (reads the password from stdin when
    /// `--password-stdin` is given).
    pub fn pull_options(&self, policy: PullPolicy) -> anyhow::Result<PullOptions> {
        let explicit = match (&self.username, self.password_stdin) {
            (Some(username), true) => {
                let mut password = String::new();
                std::io::stdin()
                    .read_to_string(&mut password)
                    .context("reading the registry password from stdin")?;
                let password = password.trim_end_matches(['\n', '\r']).to_owned();
                anyhow::ensure!(!password.is_empty(), "--password-stdin: empty password");
                Some(Credentials::Basic {
                    username: username.clone(),
                    password,
                })
            }
            (None, false) => None,
            _ => anyhow::bail!("--username and --password-stdin go together"),
        };
        for r in &self.insecure_registry {
            openshell_image::parse_insecure_registry(r)?;
        }
        Ok(PullOptions {
            policy,
            insecure_registries: self.insecure_registry.clone(),
            auth: AuthOptions {
                explicit,
                config_file: self.registry_config.clone(),
            },
            observer: Some(progress_observer()),
        })
    }
}

/// A progress bar on a terminal, plain lines on stderr otherwise.
fn progress_observer() -> openshell_image::Observer {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        let seen: Mutex<HashMap<String, u64>> = Mutex::new(HashMap::new());
        Arc::new(move |event: &PullEvent| match event {
            PullEvent::Resolved { bytes, .. } => {
                bar.set_length(*bytes);
                bar.set_message("pulling");
            }
            PullEvent::BlobStarted {
                size, cached: true, ..
            } => bar.inc(*size),
            PullEvent::BlobProgress { digest, bytes } => {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let before = seen.insert(digest.clone(), *bytes).unwrap_or(0);
                bar.inc(bytes.saturating_sub(before));
            }
            PullEvent::Unpacking { index, total, .. } => {
                bar.set_message(format!("unpacking layer {}/{total}", index + 1));
            }
            PullEvent::Done { .. } => bar.finish_and_clear(),
            _ => {}
        })
    } else {
        Arc::new(|event: &PullEvent| {
            let line = match event {
                PullEvent::Resolved {
                    reference,
                    digest,
                    layers,
                    bytes,
                } => format!("{reference}: {digest}, {layers} layers, {bytes} bytes"),
                PullEvent::BlobStarted {
                    digest,
                    size,
                    cached,
                } => {
                    if *cached {
                        format!("{digest}: cached")
                    } else {
                        format!("{digest}: downloading {size} bytes")
                    }
                }
                PullEvent::Unpacking {
                    layer,
                    index,
                    total,
                } => format!("unpacking layer {}/{total} {layer}", index + 1),
                _ => return,
            };
            #[allow(clippy::print_stderr)]
            {
                eprintln!("openshell: image: {line}");
            }
        })
    }
}

fn rt() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn inspect_json(image: &PreparedImage) -> serde_json::Value {
    serde_json::json!({
        "reference": image.reference,
        "digest": image.digest,
        "rootfs": image.rootfs_dir,
        "config": {
            "env": image.config.env,
            "working_dir": image.config.working_dir,
            "user": image.config.user,
            "entrypoint": image.config.entrypoint,
            "cmd": image.config.cmd,
        },
    })
}

/// Runs one `image` subcommand.
#[allow(clippy::print_stdout)]
pub fn run(command: ImageCommand) -> anyhow::Result<ExitCode> {
    let store = Store::open(&Store::default_home())?;
    match command {
        ImageCommand::Pull {
            reference,
            registry,
        } => {
            let options = registry.pull_options(PullPolicy::Always)?;
            let image = rt()?.block_on(store.ensure(&reference, &options))?;
            println!("{} {}", image.reference, image.digest);
        }
        ImageCommand::Inspect {
            reference,
            registry,
        } => {
            let options = registry.pull_options(PullPolicy::Missing)?;
            let image = rt()?.block_on(store.ensure(&reference, &options))?;
            println!("{:#}", inspect_json(&image));
        }
        ImageCommand::Ls => {
            let rows = store.list()?;
            let width = rows
                .iter()
                .map(|(r, _)| r.len())
                .max()
                .unwrap_or(0)
                .max("REFERENCE".len());
            println!("{:width$}  {:12}  {:>10}", "REFERENCE", "DIGEST", "SIZE");
            for (reference, record) in rows {
                println!(
                    "{reference:width$}  {:12}  {:>10}",
                    short(&record.digest),
                    human(record.size)
                );
            }
        }
        ImageCommand::Rm { reference } => {
            let report = store.remove(&reference)?;
            println!(
                "removed {reference} ({} tree(s), {} blob(s) freed)",
                report.trees, report.blobs
            );
        }
        ImageCommand::Gc => {
            let report = store.gc()?;
            println!("removed {} tree(s), {} blob(s)", report.trees, report.blobs);
        }
    }
    Ok(ExitCode::SUCCESS)
}

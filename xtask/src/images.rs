//! `cargo xtask images [--force]`: the OCI test images, written as OCI image layouts under
//! `<target>/test-images/<name>/` (the registry harness in `openshell-image`'s `testing` module
//! pushes them with oci-client).
//!
//! - `busybox`: Debian's busybox-static (`/bin/busybox` plus a symlink per applet), `/etc/passwd`
//!   and `/etc/group` with `root`, `sandbox` (1000:1000) and `nobody`/`nogroup` (the default
//!   policy's `run_as_user`/`run_as_group`), `/tmp` (1777), `/sandbox` (owned by 1000),
//!   and empty `/dev`, `/proc`, `/sys` mount points.
//! - `python`: the busybox layer (the same blob) plus one layer of Debian packages
//!   (python3.11-minimal and what it needs to start: libpython3.11-minimal, libc6, libexpat1,
//!   zlib1g, libssl3), fetched with `apt-get download` and extracted with `dpkg -x`, and
//!   `/usr/bin/python3 -> python3.11`. Debian packages rather than the host's files, so the image
//!   does not depend on what happens to be installed here.
//!
//! Each image is cached by a key over its inputs (the busybox binary, the packages' SHA256 from
//! the apt index, this builder's version); a matching `key` file means nothing is rebuilt.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::util::{project_root, run};

/// Bump when the image contents change for reasons the key does not see.
const BUILDER_VERSION: &str = "1";

const BUSYBOX: &str = "/bin/busybox";

const PYTHON_PACKAGES: &[&str] = &[
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libc6",
    "libexpat1",
    "zlib1g",
    "libssl3",
];

const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `<target>/test-images`.
pub fn images_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join("target"))
        .join("test-images")
}

pub fn run_images(force: bool) -> Result<()> {
    let out = images_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let busybox = std::fs::read(BUSYBOX)
        .with_context(|| format!("reading {BUSYBOX} (package busybox-static)"))?;
    let base = busybox_layer(&busybox)?;

    let key = hex(&Sha256::digest(
        [
            BUILDER_VERSION.as_bytes(),
            b"busybox",
            &Sha256::digest(&busybox),
        ]
        .concat(),
    ));
    build_image(&out.join("busybox"), &key, force, || {
        Ok((
            vec![base.clone()],
            json!({"Env": [PATH], "WorkingDir": "/sandbox", "User": "sandbox",
                   "Cmd": ["/bin/sh"]}),
        ))
    })?;

    let debs = package_hashes()?;
    let key = hex(&Sha256::digest(
        [
            BUILDER_VERSION.as_bytes(),
            b"python",
            &Sha256::digest(&busybox),
            serde_json::to_string(&debs)?.as_bytes(),
        ]
        .concat(),
    ));
    build_image(&out.join("python"), &key, force, || {
        let layer = python_layer(&out)?;
        Ok((
            vec![base.clone(), layer],
            json!({"Env": [PATH, "LANG=C.UTF-8"], "WorkingDir": "/sandbox", "User": "sandbox",
                   "Cmd": ["python3"]}),
        ))
    })?;
    println!("images: {}", out.display());
    Ok(())
}

/// An uncompressed layer tar.
type Tar = Vec<u8>;

fn build_image(
    dir: &Path,
    key: &str,
    force: bool,
    make: impl FnOnce() -> Result<(Vec<Tar>, serde_json::Value)>,
) -> Result<()> {
    let key_file = dir.join("key");
    if !force && std::fs::read_to_string(&key_file).is_ok_and(|k| k.trim() == key) {
        println!("images: {} is current", dir.display());
        return Ok(());
    }
    println!("images: building {}", dir.display());
    let (layers, config_section) = make()?;
    let staging = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&staging);
    let blobs = staging.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let write_blob = |bytes: &[u8]| -> Result<(String, usize)> {
        let digest = hex(&Sha256::digest(bytes));
        std::fs::write(blobs.join(&digest), bytes)?;
        Ok((format!("sha256:{digest}"), bytes.len()))
    };
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in &layers {
        diff_ids.push(format!("sha256:{}", hex(&Sha256::digest(tar))));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(tar)?;
        let (digest, size) = write_blob(&gz.finish()?)?;
        descriptors.push(
            json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                "digest": digest, "size": size}),
        );
    }
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config_section,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (config_digest, config_size) = write_blob(&serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": descriptors,
    });
    let (manifest_digest, manifest_size) = write_blob(&serde_json::to_vec(&manifest)?)?;
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest_size}],
    });
    std::fs::write(staging.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        staging.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    std::fs::write(staging.join("key"), key)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&staging, dir)?;
    Ok(())
}

/// Reproducible tar entries: mtime 0, explicit owners, in the order given.
struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Layer {
        let mut builder = tar::Builder::new(Vec::new());
        builder.mode(tar::HeaderMode::Deterministic);
        Layer { builder }
    }

    fn header(kind: tar::EntryType, mode: u32, owner: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner);
        h.set_gid(owner);
        h.set_mtime(0);
        h.set_size(0);
        h
    }

    fn dir(&mut self, path: &str, mode: u32, owner: u64) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Directory, mode, owner);
        self.builder
            .append_data(&mut h, path, std::io::empty())
            .with_context(|| format!("tar entry {path}"))
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Regular, mode, 0);
        h.set_size(data.len() as u64);
        self.builder
            .append_data(&mut h, path, data)
            .with_context(|| format!("tar entry {path}"))
    }

    fn symlink(&mut self, path: &str, target: &Path) -> Result<()> {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.builder
            .append_link(&mut h, path, target)
            .with_context(|| format!("tar entry {path}"))
    }

    fn finish(self) -> Result<Tar> {
        Ok(self.builder.into_inner()?)
    }
}

fn busybox_layer(busybox: &[u8]) -> Result<Tar> {
    let mut l = Layer::new();
    for (dir, mode, owner) in [
        ("bin", 0o755, 0),
        ("sbin", 0o755, 0),
        ("usr", 0o755, 0),
        ("usr/bin", 0o755, 0),
        ("usr/sbin", 0o755, 0),
        ("etc", 0o755, 0),
        ("dev", 0o755, 0),
        ("proc", 0o555, 0),
        ("sys", 0o555, 0),
        ("root", 0o700, 0),
        ("tmp", 0o1777, 0),
        ("sandbox", 0o755, 1000),
    ] {
        l.dir(dir, mode, owner)?;
    }
    l.file("bin/busybox", 0o755, busybox)?;
    l.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n\
          sandbox:x:1000:1000:sandbox:/sandbox:/bin/sh\n\
          nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )?;
    l.file(
        "etc/group",
        0o644,
        b"root:x:0:\nsandbox:x:1000:\nnogroup:x:65534:\n",
    )?;
    let out = Command::new(BUSYBOX)
        .arg("--list-full")
        .stdin(Stdio::null())
        .output()
        .context("running busybox --list-full")?;
    if !out.status.success() {
        bail!("busybox --list-full failed: {}", out.status);
    }
    let mut applets: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "bin/busybox" && !a.contains(".."))
        .map(str::to_owned)
        .collect();
    applets.sort();
    applets.dedup();
    for applet in applets {
        l.symlink(&applet, Path::new("/bin/busybox"))?;
    }
    l.finish()
}

/// `package -> SHA256` of the candidate .deb of each package, from the apt index (refreshed
/// once with `apt-get update` when it does not know a package).
fn package_hashes() -> Result<BTreeMap<String, String>> {
    match package_hashes_once() {
        Ok(h) => Ok(h),
        Err(e) => {
            println!("images: {e:#}; refreshing the apt index");
            run(Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null()))
            .context("apt-get update")?;
            package_hashes_once()
        }
    }
}

fn package_hashes_once() -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pkg in PYTHON_PACKAGES {
        let o = Command::new("apt-cache")
            .args(["show", "--no-all-versions", pkg])
            .stdin(Stdio::null())
            .output()
            .context("running apt-cache")?;
        let text = String::from_utf8_lossy(&o.stdout);
        let sha = text
            .lines()
            .find_map(|l| l.strip_prefix("SHA256: "))
            .with_context(|| {
                format!("apt-cache show {pkg}: no SHA256 (run `apt-get update` first)")
            })?;
        out.insert((*pkg).to_owned(), sha.trim().to_owned());
    }
    Ok(out)
}

fn python_layer(out: &Path) -> Result<Tar> {
    let debs = out.join("debs");
    let _ = std::fs::remove_dir_all(&debs);
    std::fs::create_dir_all(&debs)?;
    run(Command::new("apt-get")
        .arg("download")
        .args(PYTHON_PACKAGES)
        .current_dir(&debs)
        .stdin(Stdio::null()))
    .context("apt-get download of the python packages")?;
    let root = out.join("python-root");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    files.sort();
    for deb in files {
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    }
    std::os::unix::fs::symlink("python3.11", root.join("usr/bin/python3"))
        .context("linking usr/bin/python3")?;
    let mut l = Layer::new();
    // Directories the busybox layer already has are skipped so their modes stay.
    let base: &[&str] = &["bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc"];
    let mut stack = vec![root.clone()];
    let mut entries = Vec::new();
    while let Some(dir) = stack.pop() {
        let mut children: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        children.sort();
        for c in children {
            let meta = std::fs::symlink_metadata(&c)?;
            if meta.is_dir() {
                stack.push(c.clone());
            }
            entries.push((c, meta));
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, meta) in entries {
        let rel = path.strip_prefix(&root)?.to_string_lossy().into_owned();
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            l.symlink(&rel, &std::fs::read_link(&path)?)?;
        } else if meta.is_dir() {
            if !base.contains(&rel.as_str()) {
                l.dir(&rel, mode, 0)?;
            }
        } else if meta.is_file() {
            l.file(&rel, mode, &std::fs::read(&path)?)?;
        } else {
            bail!(
                "{}: unexpected file type (mode {:o})",
                path.display(),
                meta.mode()
            );
        }
    }
    let tar = l.finish()?;
    let _ = std::fs::remove_dir_all(&root);
    Ok(tar)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

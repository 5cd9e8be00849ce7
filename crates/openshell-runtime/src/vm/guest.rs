//! Where the guest artifacts built by `cargo xtask guest` live.
//!
//! `$OPENSHELL_GUEST_DIR`, else `$OPENSHELL_HOME/guest`, else `~/.local/share/openshell/guest`:
//! - `kernel/current/vmlinux`
//! - `rootfs/current/` (with `/openshell/agent`)
//! - `helpers/bin/vhost-device-vsock`, `helpers/bin/virtiofsd`

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{what} not found at {}; build the guest with `cargo xtask guest` (or set OPENSHELL_GUEST_DIR)", path.display())]
pub struct MissingArtifact {
    pub what: &'static str,
    pub path: PathBuf,
}

/// The guest artifacts, all present.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub vsock_daemon: PathBuf,
    pub virtiofsd: PathBuf,
    pub qemu: PathBuf,
}

pub fn guest_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OPENSHELL_GUEST_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("OPENSHELL_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let user_home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/root"));
            user_home.join(".local/share/openshell")
        });
    home.join("guest")
}

fn need(what: &'static str, path: PathBuf) -> Result<PathBuf, MissingArtifact> {
    if path.exists() {
        Ok(path)
    } else {
        Err(MissingArtifact { what, path })
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

impl Artifacts {
    pub fn locate() -> Result<Artifacts, MissingArtifact> {
        Self::locate_in(&guest_dir())
    }

    pub fn locate_in(dir: &Path) -> Result<Artifacts, MissingArtifact> {
        let rootfs = need("guest root filesystem", dir.join("rootfs/current"))?;
        need("guest agent", rootfs.join("openshell/agent"))?;
        let qemu = which("qemu-system-x86_64").ok_or(MissingArtifact {
            what: "qemu-system-x86_64 (Debian package qemu-system-x86)",
            path: PathBuf::from("$PATH"),
        })?;
        Ok(Artifacts {
            kernel: need("guest kernel", dir.join("kernel/current/vmlinux"))?,
            rootfs,
            vsock_daemon: need(
                "vhost-device-vsock",
                dir.join("helpers/bin/vhost-device-vsock"),
            )?,
            virtiofsd: need("virtiofsd", dir.join("helpers/bin/virtiofsd"))?,
            qemu,
        })
    }
}

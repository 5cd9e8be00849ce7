//! Where the guest artifacts built by `cargo xtask guest` live.
//!
//! `$OPENSHELL_GUEST_DIR`, else `$OPENSHELL_HOME/guest`, else `~/.local/share/openshell/guest`:
//! - `kernel/current/vmlinux`
//! - `qemu/current/qemu-system-x86_64` (a minimal static QEMU; no fallback to one on `PATH`,
//!   see [`Artifacts::locate_in`])
//! - `rootfs/current/` (with `/openshell/agent`)
//! - `helpers/bin/vhost-device-vsock`, `helpers/bin/virtiofsd`

use std::path::{Path, PathBuf};

use tracing::debug;

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

/// `path` with every link resolved (`current` is a link to a hashed build): the VMM's jail binds
/// each artifact at its real path, without following links.
fn need(what: &'static str, path: PathBuf) -> Result<PathBuf, MissingArtifact> {
    match std::fs::canonicalize(&path) {
        Ok(real) => Ok(real),
        Err(_) => Err(MissingArtifact { what, path }),
    }
}

impl Artifacts {
    pub fn locate() -> Result<Artifacts, MissingArtifact> {
        Self::locate_in(&guest_dir())
    }

    /// The artifacts under `dir`, all required.
    ///
    /// QEMU is the one `cargo xtask guest` built (microvm, the two vhost-user devices, TCG and
    /// KVM, seccomp; static), never a `qemu-system-x86_64` from `PATH`: a distribution's QEMU
    /// carries hundreds of devices and dozens of shared libraries the guest could reach or that
    /// cost memory and start-up time, so a silent fallback would change both the attack surface
    /// and the resource figures. Missing, it is an error that says how to build it.
    pub fn locate_in(dir: &Path) -> Result<Artifacts, MissingArtifact> {
        let rootfs = need("guest root filesystem", dir.join("rootfs/current"))?;
        need("guest agent", rootfs.join("openshell/agent"))?;
        let qemu = need("QEMU", dir.join("qemu/current/qemu-system-x86_64"))?;
        debug!(
            event = "vm.qemu_binary",
            path = %qemu.display(),
            source = "guest dir (no PATH fallback)",
            "QEMU chosen"
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    /// A guest dir with every artifact present as an empty file, except those named in `skip`.
    fn guest_dir_without(skip: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for part in [
            "kernel/current/vmlinux",
            "qemu/current/qemu-system-x86_64",
            "rootfs/current/openshell/agent",
            "helpers/bin/vhost-device-vsock",
            "helpers/bin/virtiofsd",
        ] {
            if !skip.contains(&part) {
                let path = dir.path().join(part);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, b"").unwrap();
            }
        }
        dir
    }

    #[test]
    fn qemu_is_the_guest_dirs_own() {
        let dir = guest_dir_without(&[]);
        let found = Artifacts::locate_in(dir.path()).unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(found.qemu, real.join("qemu/current/qemu-system-x86_64"));
        assert_eq!(found.kernel, real.join("kernel/current/vmlinux"));
    }

    #[test]
    fn a_missing_qemu_is_an_error_naming_the_build() {
        // No fallback: where Debian's qemu-system-x86 is installed (as on the dev machine),
        // /usr/bin/qemu-system-x86_64 is on PATH and still not used.
        let dir = guest_dir_without(&["qemu/current/qemu-system-x86_64"]);
        let err = Artifacts::locate_in(dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "QEMU not found at {}; build the guest with `cargo xtask guest` (or set \
                 OPENSHELL_GUEST_DIR)",
                dir.path().join("qemu/current/qemu-system-x86_64").display()
            )
        );
    }
}

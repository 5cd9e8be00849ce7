//! Which engine boots the VM, and the description both engines take.

use std::path::PathBuf;
use std::str::FromStr;

/// `--vm-engine auto|krun|qemu`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineChoice {
    #[default]
    Auto,
    Krun,
    Qemu,
}

impl FromStr for EngineChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "krun" => Ok(EngineChoice::Krun),
            "qemu" => Ok(EngineChoice::Qemu),
            other => Err(format!(
                "unknown vm engine {other:?}, expected auto, krun or qemu"
            )),
        }
    }
}

/// What the host's KVM can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmSupport {
    /// No usable /dev/kvm.
    None,
    /// kvm-pvm: a paravirtual nested hypervisor that only runs PVM-patched guest kernels.
    PvmOnly,
    /// Hardware KVM that runs standard guests.
    Standard,
}

pub fn kvm_support() -> KvmSupport {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    if dev.is_err() {
        return KvmSupport::None;
    }
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        return KvmSupport::PvmOnly;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if cpuinfo.split_whitespace().any(|f| f == "vmx" || f == "svm") {
        KvmSupport::Standard
    } else {
        KvmSupport::None
    }
}

/// The engine actually used, with the reason (logged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineDecision {
    pub engine: Engine,
    /// QEMU's accelerator (the krun engine always runs on KVM).
    pub accel: Accel,
    pub reason: String,
}

/// The engine that boots the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// libkrun in a shim process (feature `krun`).
    Krun,
    /// qemu-system-x86_64 -M microvm with its helpers.
    Qemu,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Krun => "krun",
            Engine::Qemu => "qemu",
        }
    }
}

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("--vm-engine krun: this host's /dev/kvm is kvm-pvm, which only runs PVM-patched guest kernels (a standard guest dies at its first interrupt); use --vm-engine qemu (or auto)")]
    KrunOnPvm,
    #[error("--vm-engine krun: this host has no KVM that runs standard guests; use --vm-engine qemu (or auto)")]
    KrunWithoutKvm,
    #[error("--vm-engine krun: the libkrun engine is not part of this build yet; use --vm-engine qemu (or auto), which uses KVM where it can")]
    KrunNotBuilt,
}

/// Whether this build has the krun engine.
pub const KRUN_BUILT: bool = cfg!(feature = "krun");

/// Pick the engine for `choice` on a host with `kvm`.
pub fn decide(choice: EngineChoice, kvm: KvmSupport) -> Result<EngineDecision, EngineError> {
    decide_with(choice, kvm, KRUN_BUILT)
}

/// [`decide`] for a build with or without the krun engine.
pub fn decide_with(
    choice: EngineChoice,
    kvm: KvmSupport,
    krun_built: bool,
) -> Result<EngineDecision, EngineError> {
    let qemu = |accel, reason: &str| {
        Ok(EngineDecision {
            engine: Engine::Qemu,
            accel,
            reason: reason.into(),
        })
    };
    let krun = |reason: &str| {
        Ok(EngineDecision {
            engine: Engine::Krun,
            accel: Accel::Kvm,
            reason: reason.into(),
        })
    };
    match (choice, kvm) {
        (EngineChoice::Krun, KvmSupport::PvmOnly) => Err(EngineError::KrunOnPvm),
        (EngineChoice::Krun, KvmSupport::None) => Err(EngineError::KrunWithoutKvm),
        (EngineChoice::Krun, KvmSupport::Standard) if !krun_built => Err(EngineError::KrunNotBuilt),
        (EngineChoice::Krun, KvmSupport::Standard) => {
            krun("krun: requested, and hardware KVM runs standard guests")
        }
        (EngineChoice::Auto, KvmSupport::Standard) if krun_built => {
            krun("krun: hardware KVM runs standard guests")
        }
        (EngineChoice::Auto, KvmSupport::Standard) => qemu(
            Accel::Kvm,
            "qemu with KVM: hardware KVM runs standard guests (the krun engine is not built)",
        ),
        (_, KvmSupport::Standard) => {
            qemu(Accel::Kvm, "qemu with KVM: requested with --vm-engine qemu")
        }
        (_, KvmSupport::PvmOnly) => qemu(
            Accel::Tcg,
            "qemu with TCG: /dev/kvm is kvm-pvm, which only runs PVM-patched guest kernels",
        ),
        (_, KvmSupport::None) => qemu(Accel::Tcg, "qemu with TCG: no usable KVM"),
    }
}

/// A directory shared into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub host_path: PathBuf,
    pub guest_path: String,
    pub readonly: bool,
}

/// What both engines boot: the same description.
#[derive(Debug, Clone)]
pub struct VmDescription {
    pub kernel: PathBuf,
    pub root: PathBuf,
    /// With a root filesystem: the tree whose per-sandbox writable view the engine mounts on
    /// `root` (`<box>/merged`) in a mount namespace of its own before the VM starts.
    pub root_view: Option<crate::process::protocol::RootPlan>,
    pub shares: Vec<Share>,
    /// The host Unix socket that vsock connections go through (`<uds>`, `<uds>_<port>`).
    pub vsock_uds: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub cmdline: String,
    /// The workload's uid and gid as the guest kernel knows them (its file requests carry
    /// them): the ids the file server acts as on the host besides guest root. `None`: guest root
    /// alone (a template's VM).
    pub workload_ids: Option<(u32, u32)>,
    /// The sandbox's CA bundle (a host file), placed read-only at `TRUST_BUNDLE_PATH` in the
    /// guest's tree (qemu engine).
    pub trust_bundle: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_decisions() {
        use Engine::{Krun, Qemu};
        // (choice, kvm, krun built, expected engine and accel or an error fragment)
        let cases = [
            (
                EngineChoice::Auto,
                KvmSupport::PvmOnly,
                false,
                Ok((Qemu, Accel::Tcg)),
            ),
            (
                EngineChoice::Auto,
                KvmSupport::PvmOnly,
                true,
                Ok((Qemu, Accel::Tcg)),
            ),
            (
                EngineChoice::Auto,
                KvmSupport::None,
                true,
                Ok((Qemu, Accel::Tcg)),
            ),
            (
                EngineChoice::Auto,
                KvmSupport::Standard,
                false,
                Ok((Qemu, Accel::Kvm)),
            ),
            (
                EngineChoice::Auto,
                KvmSupport::Standard,
                true,
                Ok((Krun, Accel::Kvm)),
            ),
            (
                EngineChoice::Qemu,
                KvmSupport::PvmOnly,
                true,
                Ok((Qemu, Accel::Tcg)),
            ),
            (
                EngineChoice::Qemu,
                KvmSupport::Standard,
                true,
                Ok((Qemu, Accel::Kvm)),
            ),
            (
                EngineChoice::Krun,
                KvmSupport::Standard,
                true,
                Ok((Krun, Accel::Kvm)),
            ),
            (
                EngineChoice::Krun,
                KvmSupport::Standard,
                false,
                Err("not part of this build"),
            ),
            (
                EngineChoice::Krun,
                KvmSupport::PvmOnly,
                true,
                Err("kvm-pvm"),
            ),
            (
                EngineChoice::Krun,
                KvmSupport::PvmOnly,
                false,
                Err("kvm-pvm"),
            ),
            (EngineChoice::Krun, KvmSupport::None, true, Err("no KVM")),
        ];
        for (choice, kvm, built, expected) in cases {
            let got = decide_with(choice, kvm, built)
                .map(|d| (d.engine, d.accel))
                .map_err(|e| e.to_string());
            match expected {
                Ok(want) => assert_eq!(got, Ok(want), "{choice:?} {kvm:?} built={built}"),
                Err(fragment) => assert!(
                    got.as_ref().is_err_and(|e| e.contains(fragment)),
                    "{choice:?} {kvm:?} built={built}: {got:?}"
                ),
            }
        }
    }

    /// The PVM refusal is the message users see; it stays word for word.
    #[test]
    fn pvm_refusal_text() {
        assert_eq!(
            decide(EngineChoice::Krun, KvmSupport::PvmOnly)
                .map_err(|e| e.to_string())
                .err()
                .as_deref(),
            Some("--vm-engine krun: this host's /dev/kvm is kvm-pvm, which only runs PVM-patched guest kernels (a standard guest dies at its first interrupt); use --vm-engine qemu (or auto)")
        );
        let auto = decide(EngineChoice::Auto, KvmSupport::PvmOnly).map(|d| (d.engine, d.reason));
        assert_eq!(
            auto.ok(),
            Some((
                Engine::Qemu,
                "qemu with TCG: /dev/kvm is kvm-pvm, which only runs PVM-patched guest kernels"
                    .to_owned()
            ))
        );
    }
}

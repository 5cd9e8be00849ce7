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
    pub accel: Accel,
    pub reason: String,
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

/// Pick the engine for `choice` on a host with `kvm`.
pub fn decide(choice: EngineChoice, kvm: KvmSupport) -> Result<EngineDecision, EngineError> {
    match (choice, kvm) {
        (EngineChoice::Krun, KvmSupport::PvmOnly) => Err(EngineError::KrunOnPvm),
        (EngineChoice::Krun, KvmSupport::None) => Err(EngineError::KrunWithoutKvm),
        (EngineChoice::Krun, KvmSupport::Standard) => Err(EngineError::KrunNotBuilt),
        (_, KvmSupport::Standard) => Ok(EngineDecision {
            accel: Accel::Kvm,
            reason:
                "qemu with KVM: hardware KVM runs standard guests (the krun engine is not built)"
                    .into(),
        }),
        (_, KvmSupport::PvmOnly) => Ok(EngineDecision {
            accel: Accel::Tcg,
            reason: "qemu with TCG: /dev/kvm is kvm-pvm, which only runs PVM-patched guest kernels"
                .into(),
        }),
        (_, KvmSupport::None) => Ok(EngineDecision {
            accel: Accel::Tcg,
            reason: "qemu with TCG: no usable KVM".into(),
        }),
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
    pub shares: Vec<Share>,
    /// The host Unix socket that vsock connections go through (`<uds>`, `<uds>_<port>`).
    pub vsock_uds: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub cmdline: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_decisions() {
        let cases = [
            (EngineChoice::Auto, KvmSupport::PvmOnly, Ok(Accel::Tcg)),
            (EngineChoice::Auto, KvmSupport::None, Ok(Accel::Tcg)),
            (EngineChoice::Auto, KvmSupport::Standard, Ok(Accel::Kvm)),
            (EngineChoice::Qemu, KvmSupport::PvmOnly, Ok(Accel::Tcg)),
            (EngineChoice::Krun, KvmSupport::PvmOnly, Err("kvm-pvm")),
            (EngineChoice::Krun, KvmSupport::None, Err("no KVM")),
        ];
        for (choice, kvm, expected) in cases {
            let got = decide(choice, kvm)
                .map(|d| d.accel)
                .map_err(|e| e.to_string());
            match expected {
                Ok(accel) => assert_eq!(got, Ok(accel), "{choice:?} {kvm:?}"),
                Err(fragment) => assert!(
                    got.as_ref().is_err_and(|e| e.contains(fragment)),
                    "{choice:?} {kvm:?}: {got:?}"
                ),
            }
        }
    }
}

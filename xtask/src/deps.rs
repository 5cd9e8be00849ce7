//! `cargo xtask deps [--vm]`: install the Debian packages the tests and benchmarks need, and with
//! `--vm` also those the microVM backend's guest build and engine need ([`VM_PACKAGES`]) and the
//! system user its VMM programs run as ([`VMM_USER`]).
//!
//! Idempotent: packages already installed are left alone, and when nothing is missing no
//! `apt-get` runs at all.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util::{is_root, on_path, run};

/// Debian packages the tests and benchmarks use, each with what it is for.
const PACKAGES: &[(&str, &str)] = &[
    ("bubblewrap", "peer sandbox for the spawn benchmark"),
    ("hyperfine", "benchmark driver"),
    ("curl", "HTTP client"),
    ("wget", "HTTP client"),
    ("iproute2", "`ip`, for network namespaces"),
    (
        "busybox-static",
        "static userland for workloads and the --rootfs test tree",
    ),
    ("python3", "test servers and scripts"),
    (
        "python3-requests",
        "Python's requests, a client in the TLS termination test",
    ),
    (
        "openssh-client",
        "ssh, scp, sftp, ssh-keygen: the ssh tests' client",
    ),
    (
        "openssh-sftp-server",
        "/usr/lib/openssh/sftp-server, run inside the sandbox for sftp and scp",
    ),
    ("openssh-server", "sshd, peer server for the ssh benchmark"),
    (
        "procps",
        "pgrep and kill, used by the ssh tests and benchmark",
    ),
    (
        "docker-registry",
        "OCI registry on loopback for the image tests and benchmark",
    ),
    ("skopeo", "peer image copier for the image benchmark"),
    ("umoci", "peer image unpacker for the image benchmark"),
    // The binary alone: the `tinyproxy` package also enables a system service.
    (
        "tinyproxy-bin",
        "/usr/bin/tinyproxy, peer proxy for the connect benchmark",
    ),
    (
        "mitmproxy",
        "/usr/bin/mitmdump, peer TLS-terminating proxy for the terminate benchmark",
    ),
];

/// Debian packages `cargo xtask guest` and the vm backend's qemu engine need (`deps --vm`).
pub const VM_PACKAGES: &[(&str, &str)] = &[
    ("linux-source-6.12", "guest kernel source"),
    ("bc", "kernel build"),
    ("bison", "kernel build"),
    ("flex", "kernel build"),
    ("libelf-dev", "kernel build"),
    ("libssl-dev", "kernel build"),
    ("make", "kernel build"),
    ("gcc", "kernel build"),
    (
        "qemu-system-data",
        "bios-microvm.bin for -M microvm (the qemu source is 10.0 from backports)",
    ),
    ("xz-utils", "qemu build: unpacks Debian's .orig.tar.xz"),
    (
        "patch",
        "qemu and vhost-device-vsock builds: guest/{qemu,vhost-device-vsock}/*.patch",
    ),
    ("python3", "qemu build: configure"),
    (
        "python3-venv",
        "qemu build: a venv for meson 1.5 from PyPI (Debian 12 has 1.0)",
    ),
    ("ninja-build", "qemu build"),
    ("pkgconf", "qemu build"),
    ("libglib2.0-dev", "qemu build (linked statically)"),
    ("zlib1g-dev", "qemu build (linked statically)"),
    ("libfdt-dev", "qemu build (linked statically)"),
    ("binutils", "qemu build: strip"),
    ("busybox-static", "guest rootfs diagnostics and boot check"),
    (
        "libseccomp-dev",
        "virtiofsd build; qemu build (linked statically)",
    ),
    ("libcap-ng-dev", "virtiofsd build"),
    ("file", "checks that the guest agent is static"),
];

/// `cargo xtask deps [--vm]`: installs whatever of [`PACKAGES`] (and with `vm`, [`VM_PACKAGES`])
/// is missing.
pub fn ensure_with(vm: bool) -> Result<()> {
    let mut all: Vec<(&str, &str)> = PACKAGES.to_vec();
    if vm {
        for &(pkg, why) in VM_PACKAGES {
            if !all.iter().any(|(p, _)| *p == pkg) {
                all.push((pkg, why));
            }
        }
    }
    ensure_packages(&all)?;
    if vm {
        ensure_vmm_user()?;
    }
    Ok(())
}

/// The system user the vm backend runs its VMM programs as (QEMU, the vsock daemon): the same
/// name as `openshell_runtime::vm::jail::VMM_USER`. Without it the vm backend refuses to start.
pub const VMM_USER: &str = "openshell-vmm";

/// Creates [`VMM_USER`] (a system user with a group of its own, no home, no login shell) when
/// missing.
pub fn ensure_vmm_user() -> Result<()> {
    let exists = Command::new("getent")
        .args(["passwd", VMM_USER])
        .stdout(Stdio::null())
        .status()
        .context("running getent")?
        .success();
    if exists {
        println!("deps: user {VMM_USER} present");
        return Ok(());
    }
    let mut cmd = if is_root()? {
        Command::new("useradd")
    } else if on_path("sudo") {
        let mut c = Command::new("sudo");
        c.args(["-n", "useradd"]);
        c
    } else {
        bail!(
            "not root and sudo not found: create the VMM user as root: \
             useradd --system --user-group --no-create-home --shell /usr/sbin/nologin {VMM_USER}"
        );
    };
    cmd.args([
        "--system",
        "--user-group",
        "--no-create-home",
        "--home-dir",
        "/nonexistent",
        "--shell",
        "/usr/sbin/nologin",
        VMM_USER,
    ])
    .stdin(Stdio::null());
    run(&mut cmd).with_context(|| format!("creating the system user {VMM_USER}"))?;
    println!("deps: created the system user {VMM_USER}");
    Ok(())
}

/// Installs whatever of [`PACKAGES`] is missing.
pub fn ensure() -> Result<()> {
    ensure_packages(PACKAGES)
}

/// Installs whatever of `packages` is missing.
pub fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    if !on_path("dpkg-query") || !on_path("apt-get") {
        bail!(
            "dpkg-query or apt-get not found: this command supports Debian and derivatives; \
             install these packages by other means: {}",
            names(packages.iter().map(|(p, _)| *p))
        );
    }
    let mut missing = Vec::new();
    for &(pkg, _) in packages {
        if !installed(pkg)? {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        println!("deps: all {} packages present", packages.len());
        return Ok(());
    }
    println!("deps: installing {}", names(missing.iter().copied()));
    for &(pkg, why) in packages.iter().filter(|(p, _)| missing.contains(p)) {
        println!("  {pkg:<16} {why}");
    }

    // Root runs apt-get directly; anyone else goes through non-interactive sudo.
    let sudo = !is_root()?;
    if sudo && !on_path("sudo") {
        bail!(
            "not root and sudo not found: run as root, or install: {}",
            names(missing.iter().copied())
        );
    }
    let apt = |args: &[&str]| {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.args(["-n", "--preserve-env=DEBIAN_FRONTEND", "apt-get"]);
            c
        } else {
            Command::new("apt-get")
        };
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        cmd
    };
    run(&mut apt(&["update"])).context("apt-get update failed")?;
    let mut install = apt(&["install", "-y", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install).context("apt-get install failed")?;

    let still_missing: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !installed(p).unwrap_or(false))
        .collect();
    if !still_missing.is_empty() {
        bail!(
            "still not installed after apt-get: {}",
            names(still_missing.into_iter())
        );
    }
    println!("deps: installed {}", names(missing.into_iter()));
    Ok(())
}

/// The installed version of a Debian package, as `dpkg-query` reports it.
pub fn version(pkg: &str) -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("cannot run dpkg-query for {pkg}"))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || v.is_empty() || !installed(pkg)? {
        bail!("package {pkg} is not installed (run `cargo xtask deps --vm`)");
    }
    Ok(v)
}

/// Whether dpkg reports the package as fully installed.
fn installed(pkg: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("cannot run dpkg-query for {pkg}"))?;
    // Exit status 1 means "no such package"; anything else reports the status.
    Ok(out.status.success() && out.stdout.as_slice() == b"install ok installed")
}

fn names<'a>(pkgs: impl Iterator<Item = &'a str>) -> String {
    pkgs.collect::<Vec<_>>().join(" ")
}

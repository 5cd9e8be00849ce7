//! The qemu engine: `qemu-system-x86_64 -M microvm` with vhost-user vsock
//! (vhost-device-vsock) and one virtiofsd serving the guest's whole tree (`fs_server`), all
//! supervised.
//!
//! Start-up order matters: both daemons' sockets must exist before QEMU starts, and the
//! guest→host vsock listeners (`<uds>_<port>`) must be bound before boot. Every helper is
//! started with PR_SET_PDEATHSIG=SIGKILL, so killing the supervisor (even with SIGKILL) kills
//! QEMU, the VM and the daemons.

use std::path::Path;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::engine::{Accel, VmDescription};
use crate::process::sys;

/// The kernel command line for a TCG/KVM microvm boot of our guest. The root is mounted `rw`
/// because read-write shares live inside it; the root directory itself and the read-only
/// shares are read-only bind mounts on the host, so writes to them fail (EROFS).
///
/// [`GUEST_TUNING`] is appended: measured on this TCG host with `cargo xtask bench vm`-style
/// alternating runs, it took about 50 ms off a cold create + exec + destroy.
pub fn kernel_cmdline(tsc_khz: Option<u64>) -> String {
    let mut cmdline = String::from(
        "console=ttyS0 quiet reboot=t panic=-1 noapictimer no_timer_check tsc=reliable \
         root=root rootfstype=virtiofs rw init=/openshell/agent",
    );
    cmdline.push(' ');
    cmdline.push_str(GUEST_TUNING);
    if let Some(khz) = tsc_khz {
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    cmdline
}

/// Guest kernel parameters for a small, single-purpose VM:
/// - `rcupdate.rcu_expedited=1`: every `synchronize_rcu()` is expedited. Moving the workload
///   into its cgroup waits for one (the cgroup threadgroup lock), as do mounts at boot; a normal
///   grace period costs 10-20 ms at HZ=100, 25 ms of every launch here.
/// - hash tables sized for a sandbox, not for the whole guest RAM (dentries, inodes, TCP, mounts):
///   less memory to clear at boot under TCG, about 1.6 MiB less guest RAM touched.
pub const GUEST_TUNING: &str = "rcupdate.rcu_expedited=1 dhash_entries=16384 \
     ihash_entries=8192 thash_entries=1024 uhash_entries=256 mhash_entries=256 mphash_entries=256";

/// The host TSC frequency, for `tsc_early_khz` (TCG's own calibration sometimes fails).
pub fn host_tsc_khz() -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(v) = s.trim().parse() {
            return Some(v);
        }
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("cpu MHz"))
        .and_then(|rest| rest.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())?;
    Some((mhz * 1000.0).round() as u64)
}

/// The CPU model under TCG: Nehalem, i.e. x86-64-v2 (SSE4.2, POPCNT), which the distributions
/// that raised their baseline (RHEL 9 and its images) need, plus RDRAND, which seeds the guest
/// kernel's random pool at boot (without it, `getrandom(GRND_NONBLOCK)` in a workload started
/// right after boot can fail, and Python refuses to start). Not `max`: with AVX and AVX2
/// advertised, glibc's string functions take their AVX paths, which TCG emulates slowly; a
/// dynamically linked `/bin/true` then took 61-74 ms in the guest instead of 37-45 ms, and
/// `env true` 150 ms instead of 88 ms. The kernel boots as fast either way. `cargo xtask bench
/// vm` gives its bare QEMU the same model.
/// `OPENSHELL_VM_CPU` overrides it (e.g. `max` for programs built for x86-64-v3).
pub const TCG_CPU: &str = "Nehalem,+rdrand";

/// The TCG CPU model: `OPENSHELL_VM_CPU` when set to a plausible model name, else [`TCG_CPU`].
/// QEMU itself rejects a model it does not know.
pub fn tcg_cpu() -> String {
    match std::env::var("OPENSHELL_VM_CPU") {
        Ok(v)
            if !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.,+=".contains(&b)) =>
        {
            v
        }
        _ => TCG_CPU.to_owned(),
    }
}

/// QEMU's arguments for `vm`.
pub fn qemu_args(
    vm: &VmDescription,
    accel: Accel,
    vhost_vsock_socket: &Path,
    fs_socket: &Path,
    console: &Path,
) -> Vec<String> {
    let mem = vm.memory_mib;
    let mut args: Vec<String> = vec![
        "-M".into(),
        "microvm,x-option-roms=off,rtc=on,acpi=off,memory-backend=mem".into(),
        "-accel".into(),
        match accel {
            Accel::Kvm => "kvm".into(),
            Accel::Tcg => "tcg".into(),
        },
        "-cpu".into(),
        match accel {
            Accel::Kvm => "host".into(),
            Accel::Tcg => tcg_cpu(),
        },
        "-smp".into(),
        vm.vcpus.to_string(),
        "-m".into(),
        format!("{mem}M"),
        // vhost-user devices need guest memory the daemons can map.
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-serial".into(),
        format!("file:{}", console.display()),
        "-kernel".into(),
        vm.kernel.display().to_string(),
        "-append".into(),
        vm.cmdline.clone(),
        "-chardev".into(),
        format!("socket,id=vsock,path={}", vhost_vsock_socket.display()),
        "-device".into(),
        "vhost-user-vsock-device,chardev=vsock".into(),
    ];
    // One virtio-fs device: the guest root with every share already bind-mounted in it.
    args.push("-chardev".into());
    args.push(format!("socket,id=fs,path={}", fs_socket.display()));
    args.push("-device".into());
    args.push("vhost-user-fs-device,chardev=fs,tag=root".into());
    args
}

/// QEMU's QMP socket at `path` (the templates drive QEMU through it), and with `incoming` the
/// wait for `migrate-incoming` instead of a boot.
pub fn qmp_args(path: &Path, incoming: bool) -> Vec<String> {
    let mut args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", path.display()),
    ];
    if incoming {
        args.extend(["-incoming".into(), "defer".into()]);
    }
    args
}

/// Arguments for the virtiofsd serving a VM's tree `dir`. No `--tag`: QEMU 7.1 to 8.0 crash
/// on it. Read-only shares are read-only bind mounts inside the tree (see `fs_server`).
/// `--no-announce-submounts`: announced, the guest would automount each share lazily, after
/// the agent's Landlock rules were attached to the mount points underneath. `--cache=auto`:
/// attributes and names are trusted for a second; with our patch (`guest/virtiofsd/`) the guest
/// keeps its page cache of files on read-only mounts across opens, and drops a writable file's
/// at each open, so a host edit there shows at once.
///
/// virtiofsd runs in its jail (`jail`): `--sandbox=none`, as the jail already gives it its
/// namespaces and a root holding the tree at `dir`; root of a user namespace of its own, so it
/// carries out each request with the guest's ids as they are mapped there (guest root is the VMM
/// user on the host) and has only the capabilities it was left. `--modcaps=-mknod:-setfcap`:
/// it does not ask for the two it does not have (device nodes, file capabilities);
/// `--inode-file-handles=never`: opening a file handle needs CAP_DAC_READ_SEARCH on the host,
/// which it never has, so it keeps O_PATH descriptors (its default would ask for that
/// capability).
pub fn virtiofsd_args(socket: &Path, dir: &Path) -> Vec<String> {
    vec![
        format!("--socket-path={}", socket.display()),
        format!("--shared-dir={}", dir.display()),
        "--cache=auto".into(),
        "--sandbox=none".into(),
        "--modcaps=-mknod:-setfcap".into(),
        "--inode-file-handles=never".into(),
        "--no-announce-submounts".into(),
        "--log-level=error".into(),
    ]
}

/// Where Debian's qemu-system-data keeps QEMU's firmware (the microvm's `qboot.rom`).
pub const FIRMWARE_DIR: &str = "/usr/share/qemu";

/// Arguments for vhost-device-vsock.
pub fn vsock_daemon_args(socket: &Path, uds: &Path) -> Vec<String> {
    vec![
        "--guest-cid=3".into(),
        format!("--socket={}", socket.display()),
        format!("--uds-path={}", uds.display()),
    ]
}

/// Start `program` so that it dies with the supervisor, in a process group of its own: a
/// signal from the caller's terminal (^C, ^Z, SIGTTIN) goes to the supervisor's group, and the
/// supervisor decides what reaches the sandbox, as on the process backend (whose helpers run in
/// sessions of their own).
pub fn start(program: &Path, args: &[String], log: &Path) -> std::io::Result<Child> {
    let log_out = std::fs::File::create(log)?;
    let log_err = log_out.try_clone()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log_out)
        .stderr(log_err)
        .process_group(0)
        .kill_on_drop(true);
    sys::pre_exec(&mut cmd, || {
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
            .map_err(std::io::Error::from)
    });
    cmd.spawn()
}

/// Wait until `path` exists (a daemon's socket), or `child` died, or `limit` passed.
pub async fn wait_for_socket(
    path: &Path,
    child: &mut Child,
    limit: Duration,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "exited with {status} before creating {}",
                path.display()
            ));
        }
        if start.elapsed() > limit {
            return Err(format!(
                "did not create {} within {limit:?}",
                path.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::engine::Share;

    #[test]
    fn qemu_command_line_has_what_the_boot_needs() {
        let vm = VmDescription {
            kernel: "/k/vmlinux".into(),
            root: "/r".into(),
            root_view: None,
            shares: vec![Share {
                tag: "root".into(),
                host_path: "/r".into(),
                guest_path: "/".into(),
                readonly: true,
            }],
            vsock_uds: "/b/vsock.sock".into(),
            vcpus: 1,
            memory_mib: 256,
            cmdline: kernel_cmdline(Some(2_596_122)),
            workload_ids: None,
            trust_bundle: None,
        };
        let args = qemu_args(
            &vm,
            Accel::Tcg,
            Path::new("/b/vhost.sock"),
            Path::new("/b/fs.sock"),
            Path::new("/b/console.log"),
        );
        let joined = args.join(" ");
        for needed in [
            "microvm,x-option-roms=off,rtc=on,acpi=off,memory-backend=mem",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-no-reboot",
            "-sandbox on",
            "vhost-user-vsock-device,chardev=vsock",
            "vhost-user-fs-device,chardev=fs,tag=root",
            "reboot=t panic=-1",
            "tsc_early_khz=2596122",
            "rootfstype=virtiofs",
        ] {
            assert!(joined.contains(needed), "missing {needed:?} in {joined}");
        }
        assert!(!virtiofsd_args(Path::new("/s"), Path::new("/d"))
            .iter()
            .any(|a| a.starts_with("--tag")));
    }
}

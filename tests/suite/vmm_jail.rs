//! The vm backend's VMM runs jailed (`vm::jail`): QEMU, vhost-device-vsock and virtiofsd as
//! the unprivileged VMM user, in namespaces of their own, under no_new_privs and a seccomp
//! filter, with no capability (virtiofsd: only those serving files needs, inside its own user
//! namespace); and they die with their supervisor. A guest root, the most a hostile guest can
//! be, cannot leave a setuid-root file or a device node on the host. Every verdict is read on
//! the host, from /proc and from the files themselves. vm only: the process backend has no VMM
//! (its own confinement is in `isolation` and `identity`).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use super::common::*;

/// The capabilities virtiofsd serves with: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID
/// (numbers from <linux/capability.h>).
const FILE_SERVER_CAPS: u64 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4) | (1 << 6) | (1 << 7);

/// The VMM user's uid, as the project's setup creates it.
fn vmm_uid() -> u32 {
    nix::unistd::User::from_name("openshell-vmm")
        .expect("reading the user database")
        .expect("the openshell-vmm user (cargo xtask deps --vm creates it)")
        .uid
        .as_raw()
}

fn vm_available(test: &str) -> bool {
    if !can_run(test) {
        return false;
    }
    if !backends().contains(&"vm") {
        eprintln!("SKIP {test}: no vm backend in this build or no guest");
        return false;
    }
    true
}

/// One `/proc/<pid>/status` field, e.g. `Uid` or `CapEff`.
fn status_field(pid: i32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid ...: comm may hold spaces, so split after its closing parenthesis.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Host pids below `ancestor` whose executable's file name is `name`.
fn descendants_named(ancestor: i32, name: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(e.path().join("exe")) else {
            continue;
        };
        if exe.file_name().is_none_or(|n| n != name) {
            continue;
        }
        let mut at = pid;
        while let Some(parent) = parent_of(at) {
            if parent == ancestor {
                found.push(pid);
                break;
            }
            if parent <= 1 {
                break;
            }
            at = parent;
        }
    }
    found
}

fn hex(field: &str) -> u64 {
    u64::from_str_radix(field, 16).expect("a hex capability set")
}

struct Running {
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_vmm_runs_jailed_and_dies_with_its_supervisor() {
    if !vm_available("the_vmm_runs_jailed_and_dies_with_its_supervisor") {
        return;
    }
    let s = Scratch::new("");
    let marker = s.work.join("started");
    let child = s
        .command(
            "vm",
            &[],
            &[
                "/bin/sh",
                "-c",
                &format!("echo up > {}; exec sleep 600", marker.display()),
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the sandbox");
    let mut running = Running { child };
    let supervisor = running.child.id() as i32;
    assert!(
        wait_until(Duration::from_secs(120), || marker.exists()),
        "the workload did not start"
    );

    let uid = vmm_uid();
    // The test runs in the host's namespaces.
    let host_ns = |kind: &str| std::fs::read_link(format!("/proc/self/ns/{kind}")).expect("ns");
    let mut seen = Vec::new();
    for (program, caps) in [
        ("qemu-system-x86_64", 0),
        ("vhost-device-vsock", 0),
        ("virtiofsd", FILE_SERVER_CAPS),
    ] {
        let pids = descendants_named(supervisor, program);
        assert_eq!(
            pids.len(),
            1,
            "{program}: expected one process, found {pids:?}"
        );
        let pid = pids[0];
        let ids: Vec<u32> = status_field(pid, "Uid")
            .split_whitespace()
            .map(|v| v.parse().expect("a uid"))
            .collect();
        assert_eq!(
            ids,
            vec![uid; 4],
            "{program}: real, effective, saved and fs uid"
        );
        assert_eq!(hex(&status_field(pid, "CapEff")), caps, "{program}: CapEff");
        assert_eq!(hex(&status_field(pid, "CapPrm")), caps, "{program}: CapPrm");
        assert_eq!(hex(&status_field(pid, "CapAmb")), 0, "{program}: CapAmb");
        assert_eq!(
            hex(&status_field(pid, "CapBnd")) & !caps,
            0,
            "{program}: its bounding set holds nothing more"
        );
        assert_eq!(
            status_field(pid, "NoNewPrivs"),
            "1",
            "{program}: NoNewPrivs"
        );
        assert_eq!(status_field(pid, "Seccomp"), "2", "{program}: Seccomp");
        for kind in ["mnt", "net", "pid", "user", "ipc", "uts"] {
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).expect("ns");
            assert_ne!(ns, host_ns(kind), "{program}: the host's {kind} namespace");
        }
        // Nothing of the host's file system but what it was given: not the host's secrets, not
        // the sandbox's policy, not the workdir at its host path (virtiofsd serves it in its tree).
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        for absent in [
            Path::new("/etc/shadow"),
            Path::new("/home"),
            &s.policy,
            &s.work,
        ] {
            let inside = root.join(absent.strip_prefix("/").expect("absolute"));
            assert!(
                std::fs::symlink_metadata(&inside).is_err(),
                "{program}: {} is in its root",
                absent.display()
            );
        }
        seen.push(pid);
    }

    // Killed without a chance to clean up, the supervisor takes every jailed process along.
    running.child.kill().expect("kill the supervisor");
    let _ = running.child.wait();
    assert!(
        wait_until(Duration::from_secs(10), || seen
            .iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())),
        "jailed processes outlived their supervisor: {:?}",
        seen.iter()
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
            .collect::<Vec<_>>()
    );
}

/// The guest's init for [`a_guest_root_leaves_no_setuid_root_file_or_device_node`]: root of the
/// guest with every capability, it does in a read-write share what a hostile guest would, then
/// ends (the guest powers off).
const GUEST_ROOT: &str = r#"#!/openshell/busybox sh
B=/openshell/busybox
cd "$1" || exit 1
$B echo root > by-root
$B cp /openshell/busybox suid-root
$B chown 0:0 suid-root
$B chmod 6755 suid-root
$B mknod mem c 1 1
$B mknod disk b 8 0
$B mkdir sgid-dir
$B chown 0:0 sgid-dir
$B chmod 2777 sgid-dir
$B echo done > ran
$B sync
$B reboot -f
"#;

/// A guest dir whose init is `GUEST_ROOT` (run on `work`) instead of the agent: the real
/// kernel, QEMU and daemons, the real root layout.
fn guest_dir_with_a_hostile_init(at: &Path, work: &Path) -> PathBuf {
    let real = guest_dir();
    let dir = at.join("guest");
    std::fs::create_dir_all(dir.join("rootfs")).expect("mkdir");
    for part in ["kernel", "qemu", "helpers"] {
        std::os::unix::fs::symlink(real.join(part), dir.join(part)).expect("symlink");
    }
    let rootfs = dir.join("rootfs/current");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(real.join("rootfs/current/."))
        .arg(&rootfs)
        .status()
        .expect("cp");
    assert!(copied.success(), "copying the guest root");
    let init = rootfs.join("openshell/agent");
    std::fs::remove_file(&init).expect("remove the agent");
    // The kernel passes no argument to init: the share's path is in the script itself.
    let script = GUEST_ROOT.replace("\"$1\"", &format!("'{}'", work.display()));
    std::fs::write(&init, script).expect("write the init");
    chmod(&init, 0o755);
    dir
}

#[test]
fn a_guest_root_leaves_no_setuid_root_file_or_device_node() {
    if !vm_available("a_guest_root_leaves_no_setuid_root_file_or_device_node") {
        return;
    }
    let s = Scratch::new("");
    let tmp = tempfile::tempdir().expect("tempdir");
    let guest = guest_dir_with_a_hostile_init(tmp.path(), &s.work);
    // The agent never answers: the sandbox fails once the guest has powered off.
    let out = s
        .command("vm", &[], &["/bin/true"])
        .env("OPENSHELL_GUEST_DIR", &guest)
        .env("OPENSHELL_VM_TEMPLATE", "off")
        .output()
        .expect("run the sandbox");
    assert_ne!(
        code(&out),
        0,
        "a guest without its agent cannot run a workload"
    );
    let ran = std::fs::read_to_string(s.work.join("ran")).unwrap_or_default();
    assert_eq!(
        ran.trim(),
        "done",
        "the hostile init did not run to its end: {}",
        stderr(&out)
    );

    let vmm = vmm_uid();
    for name in ["by-root", "suid-root", "sgid-dir"] {
        let meta =
            std::fs::symlink_metadata(s.work.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_ne!(meta.uid(), 0, "{name}: guest root made a file of host root");
        assert_ne!(
            meta.gid(),
            0,
            "{name}: guest root made a file of host root's group"
        );
        assert_eq!(
            meta.uid(),
            vmm,
            "{name}: guest root is the VMM user on the host"
        );
    }
    for name in ["mem", "disk"] {
        let path = s.work.join(name);
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            let ft = meta.file_type();
            assert!(
                !ft.is_char_device() && !ft.is_block_device(),
                "{name}: guest root made a device node on the host"
            );
        }
    }
}

/// Stopped while its VM boots, the supervisor ends the start: it exits as the signal asks (128 +
/// SIGTERM), the workload never runs, no jailed process survives it and its box directory is
/// gone (not left for the next start's sweep).
#[test]
fn a_stop_during_the_boot_ends_the_start_and_leaves_nothing() {
    if !vm_available("a_stop_during_the_boot_ends_the_start_and_leaves_nothing") {
        return;
    }
    let s = Scratch::new("");
    let marker = s.work.join("started");
    let child = s
        .command(
            "vm",
            &[],
            &["/bin/sh", "-c", &format!("echo up > {}", marker.display())],
        )
        // A cold boot (no snapshot template): the window between the VMM's start and the
        // workload's is the whole boot.
        .env("OPENSHELL_VM_TEMPLATE", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the sandbox");
    let mut running = Running { child };
    let supervisor = running.child.id() as i32;
    assert!(
        wait_until(Duration::from_secs(60), || !descendants_named(
            supervisor,
            "qemu-system-x86_64"
        )
        .is_empty()),
        "the VMM did not start"
    );
    let jailed: Vec<i32> = ["qemu-system-x86_64", "vhost-device-vsock", "virtiofsd"]
        .iter()
        .flat_map(|name| descendants_named(supervisor, name))
        .collect();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(supervisor),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM the supervisor");
    let status = running.child.wait().expect("wait for the supervisor");
    assert_eq!(status.code(), Some(128 + 15), "exit status {status:?}");
    assert!(!marker.exists(), "the workload ran after the stop");
    assert!(
        wait_until(Duration::from_secs(10), || jailed
            .iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())),
        "jailed processes outlived the stopped start"
    );
    let prefix = format!("{supervisor:x}-");
    let left: Vec<_> = std::fs::read_dir(guest_dir().join("run"))
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "box directories left behind: {left:?}");
}

//! The krun engine on this host, as far as it honestly goes (feature `krun`).
//!
//! This binary has no libtest harness: it must dispatch the helper itself, because the
//! supervisor re-executes it as the krun shim (`OPENSHELL_HELPER_EXE` points at it).
//!
//! - libkrun accepts the whole configuration (nothing boots);
//! - shim supervision: the shim configures, boots, and its end reaches the supervisor as an
//!   engine error (on kvm-pvm the standard guest dies at its first interrupt with
//!   KVM_EXIT_INTERNAL_ERROR), with no shim left;
//! - SIGKILL of the supervisor kills the shim;
//! - a root filesystem's writable view is mounted in the shim's own mount namespace.
//!
//! Without a usable /dev/kvm or the guest kernel the tests print why they skip; with CI=true a
//! skip is a failure.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use openshell_runtime::vm::engine::{kvm_support, KvmSupport, Share, VmDescription};
use openshell_runtime::vm::guest::guest_dir;
use openshell_runtime::vm::krun::{self, KrunError, KrunShim};

const ROLE: &str = "OPENSHELL_KRUN_TEST_ROLE";
const DIR: &str = "OPENSHELL_KRUN_TEST_DIR";

/// Why this host cannot run the tests, if it cannot.
fn unavailable() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm is not usable: {e}"));
    }
    let kernel = kernel();
    if !kernel.exists() {
        return Some(format!(
            "no guest kernel at {} (cargo xtask guest)",
            kernel.display()
        ));
    }
    None
}

fn kernel() -> PathBuf {
    guest_dir().join("kernel/current/vmlinux")
}

/// A description with a root directory, one read-write share, and a box directory in `dir`.
fn description(dir: &Path) -> VmDescription {
    let root = dir.join("root");
    let work = dir.join("work");
    let boxd = dir.join("box");
    for d in [&root, &work, &boxd] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    }
    VmDescription {
        kernel: kernel(),
        root: root.clone(),
        root_view: None,
        shares: vec![
            Share {
                tag: "root".into(),
                host_path: root,
                guest_path: "/".into(),
                readonly: true,
            },
            Share {
                tag: "s1".into(),
                host_path: work,
                guest_path: "/sandbox".into(),
                readonly: false,
            },
        ],
        vsock_uds: boxd.join("vsock.sock"),
        vcpus: 1,
        memory_mib: 256,
        cmdline: krun::kernel_cmdline(false),
        workload_ids: None,
        trust_bundle: None,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Whether `pid` is gone (or only a zombie waiting for a reaper that is not us).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn check_config_accepts_the_whole_description() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let vm = description(dir.path());
    let result = krun::check_config(&vm).map_err(|e| e.to_string());
    assert_eq!(result, Ok(()));
    // Nothing started: libkrun's listening socket for AGENT_PORT is only bound at boot.
    assert!(!vm.vsock_uds.exists());
    // And a configuration libkrun cannot take is an error, not a crash.
    let too_many = VmDescription {
        vcpus: 1000,
        ..vm.clone()
    };
    let err = krun::check_config(&too_many).map_err(|e| e.to_string());
    assert_eq!(
        err,
        Err(
            "libkrun refused the configuration: krun_set_vm_config: vcpus 1000 is out of range"
                .into()
        )
    );
}

fn shim_end_is_an_engine_error_and_leaves_no_shim() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let vm = description(dir.path());
    rt().block_on(async {
        let mut shim = KrunShim::start(krun::plan_for(&vm))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let pid = shim.pid();
        println!("  shim {pid} configured, jail: {:?}", shim.jail);
        assert!(!gone(pid));
        for part in ["namespaces", "landlock", "seccomp"] {
            assert!(
                shim.jail.iter().any(|j| j.starts_with(part)),
                "{:?}",
                shim.jail
            );
        }
        // Jailed: its own network (it needs none: vsock runs over pathname Unix sockets) and
        // mount namespaces.
        for ns in ["net", "mnt", "ipc", "uts"] {
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"));
            let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
            assert!(
                its.is_ok() && ours.ok() != its.ok(),
                "shim shares our {ns} namespace"
            );
        }
        if kvm_support() == KvmSupport::Standard {
            // A real guest would boot here; this test only covers hosts where it cannot.
            println!("  standard KVM: not booting; killing the configured shim instead");
            drop(shim);
        } else {
            shim.boot().await.unwrap_or_else(|e| panic!("{e}"));
            let err = tokio::time::timeout(Duration::from_secs(60), shim.wait())
                .await
                .unwrap_or_else(|_| panic!("the shim did not end within 60 s"));
            let text = err.to_string();
            println!("  {text}");
            assert!(matches!(err, KrunError::Exited { .. }), "{text}");
            assert!(
                text.contains("KVM_EXIT_INTERNAL_ERROR") || text.contains("exit status"),
                "{text}"
            );
            drop(shim);
        }
        let start = Instant::now();
        while !gone(pid) && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(pid), "shim {pid} is still there");
    });
}

/// With a root filesystem the shim mounts the tree's writable view on the root share's path in
/// its own mount namespace (never the host's), and the tree stays untouched.
fn the_root_filesystem_view_lives_in_the_shims_namespace() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let lower = dir.path().join("tree");
    std::fs::create_dir_all(lower.join("etc")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(lower.join("marker"), "tree").unwrap_or_else(|e| panic!("{e}"));
    let mut vm = description(dir.path());
    let boxd = dir.path().join("box");
    let merged = boxd.join("merged");
    std::fs::create_dir_all(boxd.join("upper/openshell")).unwrap_or_else(|e| panic!("{e}"));
    vm.root = merged.clone();
    vm.shares[0].host_path = merged.clone();
    vm.shares[0].readonly = false;
    vm.root_view = Some(openshell_runtime::process::protocol::RootPlan {
        lower: lower.clone(),
        box_dir: boxd.clone(),
    });
    vm.cmdline = krun::kernel_cmdline(true);
    let needle = merged.display().to_string();
    rt().block_on(async {
        let shim = KrunShim::start(krun::plan_for(&vm))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let pid = shim.pid();
        assert!(
            shim.jail.iter().any(|j| j == "rootfs: overlay"),
            "{:?}",
            shim.jail
        );
        let theirs = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .unwrap_or_else(|e| panic!("{e}"));
        let ours =
            std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_else(|e| panic!("{e}"));
        assert!(theirs.contains(&needle), "the shim sees the view");
        assert!(!ours.contains(&needle), "the host does not");
        assert_eq!(
            std::fs::read_to_string(boxd.join("root-method"))
                .ok()
                .as_deref(),
            Some("\"Overlay\"")
        );
        drop(shim);
        let start = Instant::now();
        while !gone(pid) && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(pid), "shim {pid} is still there");
    });
    let mut names: Vec<_> = std::fs::read_dir(&lower)
        .unwrap_or_else(|e| panic!("{e}"))
        .map(|e| e.map(|e| e.file_name()).unwrap_or_default())
        .collect();
    names.sort();
    assert_eq!(names, ["etc", "marker"], "the tree is untouched");
}

/// The supervisor role of `sigkill_of_the_supervisor_kills_the_shim`: start a configured shim,
/// print its pid, and wait to be killed.
fn supervisor_role(dir: &Path) -> ! {
    let vm = description(dir);
    rt().block_on(async {
        let shim = KrunShim::start(krun::plan_for(&vm))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = std::io::stdout();
        let _ = writeln!(out, "shim {}", shim.pid());
        let _ = out.flush();
        tokio::time::sleep(Duration::from_secs(120)).await;
        drop(shim);
    });
    std::process::exit(0);
}

fn sigkill_of_the_supervisor_kills_the_shim() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let me = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    let mut supervisor = std::process::Command::new(me)
        .env(ROLE, "supervisor")
        .env(DIR, dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut line = String::new();
    let stdout = supervisor.stdout.take().unwrap_or_else(|| panic!("stdout"));
    BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{e}"));
    let pid: u32 = line
        .trim()
        .strip_prefix("shim ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the supervisor said {line:?}"));
    assert!(!gone(pid));
    supervisor.kill().unwrap_or_else(|e| panic!("{e}"));
    let _ = supervisor.wait();
    let start = Instant::now();
    while !gone(pid) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(gone(pid), "shim {pid} survived SIGKILL of its supervisor");
}

fn main() {
    openshell_runtime::helper::run_if_helper();
    if std::env::var_os(ROLE).is_some_and(|r| r == "supervisor") {
        let dir = std::env::var_os(DIR).unwrap_or_else(|| panic!("{DIR}"));
        supervisor_role(Path::new(&dir));
    }
    let me = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    std::env::set_var("OPENSHELL_HELPER_EXE", me);

    let tests: [(&str, fn()); 4] = [
        (
            "the_root_filesystem_view_lives_in_the_shims_namespace",
            the_root_filesystem_view_lives_in_the_shims_namespace,
        ),
        (
            "check_config_accepts_the_whole_description",
            check_config_accepts_the_whole_description,
        ),
        (
            "shim_end_is_an_engine_error_and_leaves_no_shim",
            shim_end_is_an_engine_error_and_leaves_no_shim,
        ),
        (
            "sigkill_of_the_supervisor_kills_the_shim",
            sigkill_of_the_supervisor_kills_the_shim,
        ),
    ];
    if let Some(reason) = unavailable() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            eprintln!("krun tests cannot run in CI: {reason}");
            std::process::exit(1);
        }
        for (name, _) in tests {
            println!("test {name} ... skipped: {reason}");
        }
        return;
    }
    let mut failed = 0;
    for (name, test) in tests {
        println!("test {name} ...");
        match std::panic::catch_unwind(test) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    println!("krun: {} passed, {failed} failed", tests.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}

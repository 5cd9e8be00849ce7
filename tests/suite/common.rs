//! Shared harness: backends, capability probes, policies, and running the CLI.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SANDBOX: &str = env!("CARGO_BIN_EXE_openshell-sandbox");
pub const PROBE: &str = env!("CARGO_BIN_EXE_openshell-probe");

/// The backends this build carries: `process` always; `vm` when built with the `vm` feature
/// and the guest (`cargo xtask guest`) is present. A vm build without the guest skips the vm
/// runs and says why (a failure under CI=true).
pub fn backends() -> Vec<&'static str> {
    let mut list = vec!["process"];
    if cfg!(feature = "vm") {
        match vm_missing() {
            None => list.push("vm"),
            Some(reason) => {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("vm backend built but not runnable in CI: {reason}");
                }
                eprintln!("SKIP vm backend: {reason}");
            }
        }
    }
    list
}

/// The vm guest's artifacts, where the runtime looks for them (`OPENSHELL_GUEST_DIR`, else
/// `$OPENSHELL_HOME/guest`); a test that moves `OPENSHELL_HOME` passes this on explicitly.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("OPENSHELL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("OPENSHELL_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                        .join(".local/share/openshell")
                });
            home.join("guest")
        })
}

fn vm_missing() -> Option<String> {
    let dir = guest_dir();
    for part in [
        "kernel/current/vmlinux",
        "qemu/current/qemu-system-x86_64",
        "rootfs/current/openshell/agent",
        "helpers/bin/virtiofsd",
        "helpers/bin/vhost-device-vsock",
    ] {
        if !dir.join(part).exists() {
            return Some(format!(
                "{} missing: run `cargo xtask guest`",
                dir.join(part).display()
            ));
        }
    }
    None
}

/// Why this machine cannot run the sandbox tests, if it cannot.
fn missing_capability() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (the process backend needs CAP_SYS_ADMIN and CAP_NET_ADMIN)".into());
    }
    if landlock_abi() < 1 {
        return Some("kernel without Landlock".into());
    }
    if !Path::new("/proc/self/ns/net").exists() {
        return Some("kernel without network namespaces".into());
    }
    None
}

/// The kernel's Landlock ABI version (0 without Landlock).
pub fn landlock_abi() -> i64 {
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and the VERSION flag only
    // returns a number.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32,
        )
    };
    r.max(0)
}

/// Return true if the test may run; print why and return false (or panic under CI) if not.
pub fn can_run(test: &str) -> bool {
    match missing_capability() {
        None => true,
        Some(reason) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: this machine should have {reason:?} available in CI");
            }
            eprintln!("SKIP {test}: {reason}");
            false
        }
    }
}

/// A scratch area: a workdir the sandbox may write, and a directory the policy does not list.
pub struct Scratch {
    _root: tempfile::TempDir,
    pub work: PathBuf,
    pub outside: PathBuf,
    pub policy: PathBuf,
}

fn target_dir() -> PathBuf {
    Path::new(PROBE)
        .parent()
        .expect("probe has a parent")
        .to_owned()
}

impl Scratch {
    /// Policy body lines after `version: 1`; `{work}` and `{target}` are substituted.
    pub fn new(extra: &str) -> Scratch {
        let root = tempfile::Builder::new()
            .prefix("openshell-test-")
            .tempdir()
            .expect("tempdir");
        let work = root.path().join("work");
        let outside = root.path().join("outside");
        for d in [&work, &outside] {
            std::fs::create_dir(d).expect("mkdir");
            chmod(d, 0o777);
        }
        chmod(root.path(), 0o755);
        let policy = root.path().join("policy.yaml");
        let scratch = Scratch {
            _root: root,
            work,
            outside,
            policy,
        };
        scratch.write_policy(extra);
        scratch
    }

    pub fn write_policy(&self, extra: &str) {
        let text = format!(
            "version: 1\n\
             filesystem_policy:\n  include_workdir: true\n  read_only: [/usr, /bin, /lib, /lib64, /etc, /proc, /dev/urandom, {target}]\n  read_write: [/dev/null]\n\
             landlock:\n  compatibility: hard_requirement\n\
             process:\n  run_as_user: nobody\n  run_as_group: nogroup\n{extra}",
            target = target_dir().display(),
        );
        std::fs::write(&self.policy, text).expect("write policy");
    }

    /// Replace text in the policy written by [`Scratch::write_policy`], each `(from, to)` once;
    /// panics when `from` is not there, so an edit never silently does nothing.
    pub fn edit_policy(&self, edits: &[(&str, &str)]) {
        let mut text = std::fs::read_to_string(&self.policy).expect("read policy");
        for (from, to) in edits {
            assert!(text.contains(from), "the policy has no {from:?}:\n{text}");
            text = text.replacen(from, to, 1);
        }
        std::fs::write(&self.policy, text).expect("write policy");
    }

    /// `openshell-sandbox --runtime B --policy P --workdir W [flags] -- cmd...`
    pub fn command(&self, backend: &str, flags: &[&str], cmd: &[&str]) -> Command {
        let mut c = Command::new(SANDBOX);
        c.arg("--runtime")
            .arg(backend)
            .arg("--policy")
            .arg(&self.policy)
            .arg("--workdir")
            .arg(&self.work)
            .args(flags)
            .arg("--")
            .args(cmd)
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, backend: &str, flags: &[&str], cmd: &[&str]) -> Output {
        self.command(backend, flags, cmd)
            .output()
            .expect("run openshell-sandbox")
    }
}

pub fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Wait (bounded) until `cond` holds; returns whether it did.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// The cgroup directories (v1 or v2) of sandboxes started by the supervisor with host pid
/// `supervisor` that exist right now.
pub fn sandbox_cgroups(supervisor: u32) -> Vec<PathBuf> {
    let prefix = format!("{supervisor:x}-");
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name
                .strip_prefix("openshell-")
                .unwrap_or(&name)
                .starts_with(&prefix);
            if ours && (name.starts_with("openshell-") || dir.ends_with("openshell")) {
                found.push(p);
            } else if p.components().count() < 9 {
                stack.push(p);
            }
        }
    }
    found
}

/// Host pids whose command line contains `needle`.
pub fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Point the runtime at the CLI to re-execute for its helpers: the runtime re-executes a binary
/// that dispatches its helper, and the test binary does not.
pub fn use_cli_as_helper() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("OPENSHELL_HELPER_EXE", SANDBOX));
}

/// A runtime for tests that drive the runtime API directly.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

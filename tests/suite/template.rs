//! The qemu engine's templates (`vm::template`): a sandbox's VM is restored from a snapshot of
//! a parked guest instead of booting. vm only: the process backend boots nothing (see
//! feature-matrix.md).

use std::path::Path;
use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::common::{backends, can_run, code, guest_dir, stderr, stdout, Scratch};

/// The backends list says whether the vm backend runs here (and fails under CI when it should).
fn vm_runs(test: &str) -> bool {
    can_run(test) && backends().contains(&"vm")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Run on the vm backend with the runtime's events on stderr and `env` set.
fn run_vm(s: &Scratch, env: &[(&str, &Path)], cmd: &str) -> Output {
    let mut c = s.command("vm", &[], &["/bin/sh", "-c", cmd]);
    c.env("RUST_LOG", "info,openshell_runtime::vm::template=debug");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run openshell-sandbox")
}

/// 16 random bytes in hex, then the guest's clock in seconds.
const PROBE: &str = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s.%N";

fn random_and_clock(out: &Output) -> (String, f64) {
    let text = stdout(out);
    let mut lines = text.lines();
    let random = lines.next().unwrap_or_default().to_owned();
    let clock = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no clock in {text:?}; stderr: {}", stderr(out)));
    assert_eq!(random.len(), 32, "{text:?}");
    (random, clock)
}

#[test]
fn restored_guests_get_fresh_randomness_and_the_hosts_clock() {
    if !vm_runs("restored_guests_get_fresh_randomness_and_the_hosts_clock") {
        return;
    }
    let s = Scratch::new("");
    // The first run makes the template if it is missing; the pause makes its frozen clock
    // visibly late, were the restored guest not told the time.
    let first = run_vm(&s, &[], PROBE);
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    std::thread::sleep(Duration::from_secs(2));
    let mut seen = vec![random_and_clock(&first).0];
    for _ in 0..2 {
        let before = unix_now();
        let out = run_vm(&s, &[], PROBE);
        let after = unix_now();
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let log = stderr(&out);
        assert!(log.contains("outcome=\"restored\""), "not restored: {log}");
        let (random, clock) = random_and_clock(&out);
        // Two clones of one snapshot must not share the kernel generator's state.
        assert!(
            !seen.contains(&random),
            "{random} was seen before: {seen:?}"
        );
        seen.push(random);
        assert!(
            clock > before - 1.0 && clock < after + 1.0,
            "guest clock {clock} outside the run [{before}, {after}]"
        );
    }
    // Templates off: a boot, no template event at all.
    let out = run_vm(&s, &[("OPENSHELL_VM_TEMPLATE", Path::new("off"))], PROBE);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(!stderr(&out).contains("vm.template"), "{}", stderr(&out));
    let (random, _) = random_and_clock(&out);
    assert!(!seen.contains(&random));
}

#[test]
fn a_broken_template_falls_back_to_a_boot() {
    if !vm_runs("a_broken_template_falls_back_to_a_boot") {
        return;
    }
    // A guest dir of its own (the artifacts linked, templates and boxes its own), so breaking
    // its template touches no other test.
    let own = tempfile::Builder::new()
        .prefix("openshell-guest-")
        .tempdir()
        .expect("tempdir");
    let shared = guest_dir();
    for part in ["kernel", "qemu", "rootfs", "helpers"] {
        let target = std::fs::canonicalize(shared.join(part)).expect("guest artifact");
        std::os::unix::fs::symlink(target, own.path().join(part)).expect("symlink");
    }
    let env = [("OPENSHELL_GUEST_DIR", own.path())];
    let s = Scratch::new("");
    let echo = "echo hello";

    let out = run_vm(&s, &env, echo);
    let log = stderr(&out);
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "hello\n"), "{log}");
    assert!(log.contains("outcome=\"created\""), "{log}");
    assert!(log.contains("outcome=\"restored\""), "{log}");

    // Cut the snapshot short: the restore fails, the sandbox boots, the template is marked.
    let templates = own.path().join("templates");
    let dir = std::fs::read_dir(&templates)
        .expect("templates dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("state").is_file())
        .expect("a template with a state file");
    let state = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("state"))
        .expect("open state");
    state.set_len(4096).expect("truncate state");
    drop(state);
    let out = run_vm(&s, &env, echo);
    let log = stderr(&out);
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "hello\n"), "{log}");
    assert!(log.contains("outcome=\"restore_failed\""), "{log}");
    let failed = std::fs::read_to_string(dir.join("failed")).expect("failed record");
    assert!(failed.starts_with("restoring: "), "{failed}");
    assert!(!dir.join("state").exists());

    // Later sandboxes boot without trying it again, and leave no box behind.
    let out = run_vm(&s, &env, echo);
    let log = stderr(&out);
    assert_eq!((code(&out), stdout(&out).as_str()), (0, "hello\n"), "{log}");
    assert!(log.contains("outcome=\"skipped\""), "{log}");
    assert!(!log.contains("outcome=\"restored\""), "{log}");
    let boxes: Vec<_> = std::fs::read_dir(own.path().join("run"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(boxes.is_empty(), "boxes left: {boxes:?}");
}

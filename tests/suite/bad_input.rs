//! Bad input: a clear error naming file, line and field; a non-zero exit; the workload never
//! starts.

use pretty_assertions::assert_eq;

use super::common::*;

#[test]
fn unknown_policy_field_names_file_line_and_field() {
    // Pure validation: needs no privileges.
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "version: 1\nfilesystem_policy:\n  read_onyl: [/usr]\n",
    )
    .expect("write");
    let marker = dir.path().join("ran");
    let out = std::process::Command::new(SANDBOX)
        .arg("--policy")
        .arg(&policy)
        .arg("--")
        .args(["/bin/sh", "-c", &format!("touch {}", marker.display())])
        .output()
        .expect("run");
    assert_eq!(code(&out), 125);
    let err = stderr(&out);
    let expected = format!("{}:3:3: filesystem_policy: unknown field", policy.display());
    assert!(err.contains(&expected), "{err}");
    assert!(!marker.exists(), "the workload never started");
}

#[test]
fn check_policy_prints_the_effective_policy_or_fails_with_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "version: 1\nfilesystem_policy:\n  read_only: [/usr//lib/./]\n",
    )
    .expect("write");
    let out = std::process::Command::new(SANDBOX)
        .arg("--policy")
        .arg(&good)
        .arg("--check-policy")
        .output()
        .expect("run");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("/usr/lib"),
        "normalised path in {}",
        stdout(&out)
    );

    // The limits that apply: the defaults for what the policy leaves out, the CLI's overrides.
    assert!(
        stdout(&out).ends_with("resources:\n  memory_mib: 1024\n  cpus: 1.0\n  pids: 512\n"),
        "default limits in {}",
        stdout(&out)
    );
    let out = std::process::Command::new(SANDBOX)
        .arg("--policy")
        .arg(&good)
        .args(["--check-policy", "--pids", "unlimited", "--cpus", "2"])
        .output()
        .expect("run");
    assert_eq!(
        (
            code(&out),
            stdout(&out)
                .ends_with("resources:\n  memory_mib: 1024\n  cpus: 2.0\n  pids: unlimited\n")
        ),
        (0, true),
        "{} {}",
        stdout(&out),
        stderr(&out)
    );

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "version: 1\nnetwork_policies:\n  x:\n    endpoints: [{host: a.example, port: 0}]\n",
    )
    .expect("write");
    let out = std::process::Command::new(SANDBOX)
        .arg("--policy")
        .arg(&bad)
        .arg("--check-policy")
        .output()
        .expect("run");
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains(":4:"),
        "line of the bad port: {}",
        stderr(&out)
    );
}

#[test]
fn shipped_policies_are_valid() {
    for name in ["default.yaml", "developer.yaml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../policies")
            .join(name);
        let out = std::process::Command::new(SANDBOX)
            .arg("--policy")
            .arg(&path)
            .arg("--check-policy")
            .output()
            .expect("run");
        assert_eq!((name, code(&out)), (name, 0), "{}", stderr(&out));
    }
}

#[test]
fn vm_runtime_without_the_feature_says_how_to_build_it() {
    if !cfg!(feature = "vm") {
        let out = std::process::Command::new(SANDBOX)
            .args(["--runtime", "vm", "--", "/bin/true"])
            .output()
            .expect("run");
        assert_eq!(code(&out), 125);
        assert!(stderr(&out).contains("--features vm"), "{}", stderr(&out));
    }
    let out = std::process::Command::new(SANDBOX)
        .args(["--", "/bin/true"])
        .env("OPENSHELL_RUNTIME", "qemu")
        .output()
        .expect("run");
    assert_eq!(
        code(&out),
        2,
        "clap rejects an unknown runtime: {}",
        stderr(&out)
    );
}

#[test]
fn missing_or_unexecutable_program_exits_127_or_126() {
    if !can_run("missing_or_unexecutable_program_exits_127_or_126") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let out = s.run(backend, &[], &["/nonexistent/program"]);
        assert_eq!((backend, code(&out)), (backend, 127), "{}", stderr(&out));
        let script = s.work.join("script.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").expect("write");
        chmod(&script, 0o644);
        let out = s.run(backend, &[], &[script.to_str().unwrap()]);
        assert_eq!((backend, code(&out)), (backend, 126), "{}", stderr(&out));
    }
}

#[test]
fn bad_resource_values_are_refused_naming_the_flag_or_field() {
    // Pure validation: needs no privileges.
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "version: 1\nresources:\n  memory_mib: lots\n").expect("write");
    let marker = dir.path().join("ran");
    let touch = format!("touch {}", marker.display());
    let out = std::process::Command::new(SANDBOX)
        .arg("--policy")
        .arg(&policy)
        .args(["--", "/bin/sh", "-c", &touch])
        .output()
        .expect("run");
    let expected = format!(
        "{}:3:15: resources.memory_mib: expected a number or unlimited, got \"lots\"",
        policy.display()
    );
    assert_eq!(
        (
            code(&out),
            stderr(&out).contains(&expected),
            marker.exists()
        ),
        (125, true, false),
        "{expected:?} in {}",
        stderr(&out)
    );
    for (flag, value, expected) in [
        ("--memory-mib", "8", "invalid value '8' for '--memory-mib <MIB>': expected at least 16"),
        ("--pids", "0", "invalid value '0' for '--pids <N>': expected at least 1"),
        (
            "--cpus",
            "none",
            "invalid value 'none' for '--cpus <CPUS>': expected a number or unlimited, got \"none\"",
        ),
    ] {
        let out = std::process::Command::new(SANDBOX)
            .args([flag, value, "--", "/bin/sh", "-c", &touch])
            .output()
            .expect("run");
        assert_eq!(
            (flag, code(&out), stderr(&out).contains(expected), marker.exists()),
            (flag, 2, true, false),
            "{expected:?} in {}",
            stderr(&out)
        );
    }
}

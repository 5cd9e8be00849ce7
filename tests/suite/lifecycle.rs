//! Exit codes, signals, timeouts, and the workload's own stdout/stderr.

use std::time::Duration;

use pretty_assertions::assert_eq;

use super::common::*;

#[test]
fn exit_code_is_the_workloads() {
    if !can_run("exit_code_is_the_workloads") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let out = s.run(backend, &[], &["/bin/sh", "-c", "exit 7"]);
        assert_eq!((backend, code(&out)), (backend, 7), "{}", stderr(&out));
        let out = s.run(backend, &[], &["/bin/true"]);
        assert_eq!((backend, code(&out)), (backend, 0), "{}", stderr(&out));
    }
}

#[test]
fn death_by_signal_is_128_plus_n() {
    if !can_run("death_by_signal_is_128_plus_n") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let out = s.run(backend, &[], &["/bin/sh", "-c", "kill -TERM $$"]);
        assert_eq!(
            (backend, code(&out)),
            (backend, 128 + 15),
            "{}",
            stderr(&out)
        );
        let out = s.run(backend, &[], &["/bin/sh", "-c", "kill -KILL $$"]);
        assert_eq!(
            (backend, code(&out)),
            (backend, 128 + 9),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn timeout_kills_and_exits_124() {
    if !can_run("timeout_kills_and_exits_124") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let out = s.run(
            backend,
            &["--timeout", "1"],
            &["/bin/sh", "-c", "touch started; sleep 600; touch finished"],
        );
        assert_eq!((backend, code(&out)), (backend, 124), "{}", stderr(&out));
        assert!(
            s.work.join("started").exists(),
            "{backend}: the workload ran"
        );
        assert!(
            !s.work.join("finished").exists(),
            "{backend}: the workload was killed"
        );
    }
}

#[test]
fn stdout_and_stderr_are_the_workloads_own() {
    if !can_run("stdout_and_stderr_are_the_workloads_own") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let out = s.run(
            backend,
            &["--log-level", "info"],
            &["/bin/sh", "-c", "echo out; echo err >&2"],
        );
        assert_eq!((backend, stdout(&out)), (backend, "out\n".to_owned()));
        let err = stderr(&out);
        let (logs, workload): (Vec<&str>, Vec<&str>) =
            err.lines().partition(|l| l.starts_with("openshell: "));
        assert_eq!((backend, workload), (backend, vec!["err"]));
        assert!(
            logs.iter().any(|l| l.contains("sandbox.restricted")),
            "{backend}: the supervisor logged what it enforced, on stderr with a prefix: {err}"
        );
    }
}

/// Start `trap <action> TERM` in a loop on `backend` with `args`, SIGTERM the supervisor once
/// the trap is set, and return the supervisor's exit code.
fn sigterm_exit_code(backend: &str, args: &[&str], action: &str) -> Option<i32> {
    let s = Scratch::new("");
    let script = format!("trap {action} TERM; touch ready; while :; do sleep 0.05; done");
    let mut child = s
        .command(backend, args, &["/bin/sh", "-c", &script])
        .spawn()
        .expect("spawn");
    assert!(
        wait_until(Duration::from_secs(20), || s.work.join("ready").exists()),
        "{backend}: ready"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGTERM,
    )
    .expect("kill");
    child.wait().expect("wait").code()
}

#[test]
fn a_workload_ignoring_sigterm_is_killed_after_the_stop_grace() {
    if !can_run("a_workload_ignoring_sigterm_is_killed_after_the_stop_grace") {
        return;
    }
    for backend in backends() {
        // The workload ignores it; the supervisor kills the sandbox once the grace is over.
        let code = sigterm_exit_code(backend, &["--stop-grace", "1"], "''");
        assert_eq!((backend, code), (backend, Some(128 + 9)));
    }
}

#[test]
fn sigterm_is_forwarded_to_the_workload() {
    if !can_run("sigterm_is_forwarded_to_the_workload") {
        return;
    }
    for backend in backends() {
        let code = sigterm_exit_code(backend, &[], "'exit 42'");
        assert_eq!((backend, code), (backend, Some(42)));
    }
}

#[test]
fn env_is_explicit() {
    if !can_run("env_is_explicit") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let out = s
            .command(
                backend,
                &["--env", "GREETING=hi"],
                &[
                    "/bin/sh",
                    "-c",
                    "echo \"$GREETING|$SECRET_TOKEN|$USER|$HOME\"",
                ],
            )
            .env("SECRET_TOKEN", "leak")
            .output()
            .expect("run");
        assert_eq!(
            (backend, stdout(&out)),
            (backend, "hi||nobody|/nonexistent\n".to_owned()),
            "{}",
            stderr(&out)
        );
    }
}

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

/// 24 MiB through `cat` in three sandboxes at once: stdin and stdout busy at the same time. On
/// the vm backend every byte crosses vhost-device-vsock both ways; its stock 0.3.0 let one of
/// three such transfers stall for good (host-bound data was flushed only on an EPOLLOUT-only
/// wake-up); `guest/vhost-device-vsock/` patches that. The bound below only tells a hang from
/// a finish (the transfers take seconds); it measures nothing.
#[test]
fn stdio_busy_both_ways_in_concurrent_sandboxes_arrives_whole() {
    use std::io::{Read, Write};
    use std::process::Stdio;
    if !can_run("stdio_busy_both_ways_in_concurrent_sandboxes_arrives_whole") {
        return;
    }
    const SIZE: usize = 24 << 20;
    let mut data = Vec::with_capacity(SIZE);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while data.len() < SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let data = std::sync::Arc::new(data);
    for backend in backends() {
        let s = Scratch::new("");
        let mut runs = Vec::new();
        for _ in 0..3 {
            let mut child = s
                .command(backend, &[], &["/bin/cat"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn openshell-sandbox");
            let mut stdin = child.stdin.take().expect("stdin");
            let input = data.clone();
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            });
            let mut stdout = child.stdout.take().expect("stdout");
            let reader = std::thread::spawn(move || {
                let mut out = Vec::with_capacity(SIZE);
                let _ = stdout.read_to_end(&mut out);
                out
            });
            runs.push((child, writer, reader));
        }
        let pids: Vec<u32> = runs.iter().map(|(c, _, _)| c.id()).collect();
        let finished = wait_until(Duration::from_secs(120), || {
            runs.iter().all(|(_, _, reader)| reader.is_finished())
        });
        if !finished {
            for pid in &pids {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        let results: Vec<_> = runs
            .into_iter()
            .map(|(mut child, writer, reader)| {
                let out = reader.join().expect("reader");
                let _ = writer.join();
                (child.wait().expect("wait").code(), out)
            })
            .collect();
        let back: Vec<usize> = results.iter().map(|(_, out)| out.len()).collect();
        assert!(
            finished,
            "{backend}: a transfer stalled: bytes back per sandbox {back:?} of {SIZE}"
        );
        for (i, (code, out)) in results.iter().enumerate() {
            assert_eq!((backend, i, *code, out.len()), (backend, i, Some(0), SIZE));
            assert!(*out == *data, "{backend}: sandbox {i}'s bytes differ");
        }
    }
}

//! The files the supervisor owns (`--policy`, `--log-file`, `--audit-log`, the SSH keys) stay
//! out of the workload's reach: a run where the workload could write one is refused before
//! anything starts, and the logs are never opened through a symlink. Verdicts on the host: the
//! exit status, a marker the workload would have created, a canary file's bytes.

use pretty_assertions::assert_eq;

use super::common::*;

/// What a refused run left: (backend, exit status, the workload ran, the message was there).
type Verdict = (&'static str, i32, bool, bool);

fn refused(backend: &'static str, expected: bool) -> Verdict {
    (backend, 125, false, expected)
}

#[test]
fn a_policy_the_workload_could_write_is_refused() {
    if !can_run("a_policy_the_workload_could_write_is_refused") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let ran = s.work.join("ran");
        let touch = format!("touch {}", ran.display());

        // The policy out of the workload's reach runs (and the marker shows it would be seen).
        let out = s.run(backend, &[], &["/bin/sh", "-c", &touch]);
        assert_eq!(
            (backend, code(&out), ran.exists()),
            (backend, 0, true),
            "{}",
            stderr(&out)
        );
        std::fs::remove_file(&ran).expect("remove marker");

        // In the workdir (include_workdir: true): the live reload would take the workload's
        // edit within ~50 ms.
        let inside = s.work.join("policy.yaml");
        std::fs::copy(&s.policy, &inside).expect("copy policy");
        let out = std::process::Command::new(SANDBOX)
            .args(["--runtime", backend, "--policy"])
            .arg(&inside)
            .arg("--workdir")
            .arg(&s.work)
            .args(["--", "/bin/sh", "-c", &touch])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run openshell-sandbox");
        let expected = format!(
            "--policy {}: the workload may write it: {} lies under {}, which the workdir ({}, \
             filesystem_policy.include_workdir: true) makes writable",
            inside.display(),
            inside.display(),
            s.work.display(),
            s.work.display()
        );
        assert_eq!(
            (
                backend,
                code(&out),
                ran.exists(),
                stderr(&out).contains(&expected)
            ),
            refused(backend, true),
            "{expected:?} in {}",
            stderr(&out)
        );

        // Under a read_write path the policy names through a symlink.
        let root = s.work.parent().expect("scratch root").to_owned();
        let link = root.join("rw-link");
        std::os::unix::fs::symlink(&s.outside, &link).expect("symlink");
        s.edit_policy(&[(
            "read_write: [/dev/null]",
            &format!("read_write: [/dev/null, {}]", link.display()),
        )]);
        let behind = s.outside.join("policy.yaml");
        std::fs::copy(&s.policy, &behind).expect("copy policy");
        let out = std::process::Command::new(SANDBOX)
            .args(["--runtime", backend, "--policy"])
            .arg(&behind)
            .arg("--workdir")
            .arg(&s.work)
            .args(["--", "/bin/sh", "-c", &touch])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run openshell-sandbox");
        let expected = format!(
            "--policy {}: the workload may write it: {} lies under {}, which \
             filesystem_policy.read_write[1] ({}) makes writable",
            behind.display(),
            behind.display(),
            s.outside.display(),
            link.display()
        );
        assert_eq!(
            (
                backend,
                code(&out),
                ran.exists(),
                stderr(&out).contains(&expected)
            ),
            refused(backend, true),
            "{expected:?} in {}",
            stderr(&out)
        );
    }
}

#[test]
fn logs_are_never_written_through_a_symlink() {
    if !can_run("logs_are_never_written_through_a_symlink") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("network_policies:\n  none:\n    endpoints: [{ host: allowed.example, port: 80 }]\n    binaries: [{ path: /nonexistent }]\n");
        let ran = s.work.join("ran");
        // The workload makes the proxy decide (and, with an audit log, write) once.
        let script = format!(
            "touch {}; curl -s -o /dev/null http://denied.example/",
            ran.display()
        );
        let canary = s.outside.join("canary");
        let original = b"root-owned file the workload wants to write into\n".to_vec();
        std::fs::write(&canary, &original).expect("canary");
        // As an earlier run could have planted it.
        let link = s.outside.join("link");
        std::os::unix::fs::symlink(&canary, &link).expect("symlink");
        let link_s = link.to_str().expect("utf-8");
        for (flag, expected) in [
            (
                "--log-file",
                format!("--log-file {link_s}: is a symbolic link; it is never followed"),
            ),
            (
                "--audit-log",
                format!("cannot open audit log {link_s}: is a symbolic link; it is never followed"),
            ),
        ] {
            let out = s.run(
                backend,
                &[flag, link_s, "--log-level", "info"],
                &["/bin/sh", "-c", &script],
            );
            assert_eq!(
                (
                    (backend, flag),
                    code(&out),
                    ran.exists(),
                    stderr(&out).contains(&expected)
                ),
                ((backend, flag), 125, false, true),
                "{expected:?} in {}",
                stderr(&out)
            );
            assert_eq!(
                (backend, flag, std::fs::read(&canary).expect("canary")),
                (backend, flag, original.clone()),
                "the canary is unchanged"
            );
        }
    }
}

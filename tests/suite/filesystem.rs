//! Landlock from filesystem_policy: writes and reads outside the policy fail; checked from
//! outside by looking at the files.

use pretty_assertions::assert_eq;

use std::process::Stdio;
use std::time::Duration;

use super::common::*;

const EACCES: i32 = 13;
const ENOENT: i32 = 2;
const EROFS: i32 = 30;

/// A path the policy does not list does not exist in the sandbox, on either backend: the
/// process backend's view and the vm backend's guest tree hold only the policy's paths.
const UNLISTED: i32 = ENOENT;

#[test]
fn writes_land_only_where_the_policy_allows() {
    if !can_run("writes_land_only_where_the_policy_allows") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let inside = s.work.join("allowed.txt");
        let outside = s.outside.join("forbidden.txt");
        let etc = "/etc/openshell-forbidden.txt";
        let results: Vec<(String, i32)> =
            [inside.to_str().unwrap(), outside.to_str().unwrap(), etc]
                .into_iter()
                .map(|p| {
                    (
                        p.to_owned(),
                        code(&s.run(backend, &[], &[PROBE, "write", p])),
                    )
                })
                .collect();
        assert_eq!(
            (backend, results),
            (
                backend,
                vec![
                    (inside.display().to_string(), 0),
                    (outside.display().to_string(), UNLISTED),
                    // read_only paths are read-only mounts: refused before Landlock is asked.
                    (etc.to_owned(), EROFS)
                ]
            )
        );
        assert!(inside.exists(), "{backend}: the allowed write happened");
        assert!(
            !outside.exists(),
            "{backend}: nothing written outside the policy"
        );
        assert!(
            !std::path::Path::new(etc).exists(),
            "{backend}: nothing written to a read-only path"
        );
    }
}

/// Pages dirtied through a shared mapping and never synced by the workload are on the host once
/// the sandbox has ended (the vm backend must not drop the guest's page cache).
#[test]
fn writes_through_a_shared_mapping_reach_the_host() {
    if !can_run("writes_through_a_shared_mapping_reach_the_host") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let file = s.work.join("mapped.bin");
        let out = s.run(backend, &[], &[PROBE, "mmap-write", file.to_str().unwrap()]);
        assert_eq!((backend, code(&out)), (backend, 0), "{}", stderr(&out));
        let bytes = std::fs::read(&file).expect("read the mapped file");
        assert_eq!(
            (backend, bytes.len(), &bytes[..7]),
            (backend, 4096, &b"mapped\n"[..])
        );
    }
}

#[test]
fn reads_outside_the_policy_fail() {
    if !can_run("reads_outside_the_policy_fail") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let secret = s.outside.join("secret");
        std::fs::write(&secret, "s3cret").expect("write");
        chmod(&secret, 0o644);
        let out = s.run(backend, &[], &[PROBE, "read", secret.to_str().unwrap()]);
        assert_eq!(
            (backend, code(&out)),
            (backend, UNLISTED),
            "{}",
            stderr(&out)
        );
        let out = s.run(backend, &[], &["/bin/cat", "/etc/hostname"]);
        assert_eq!(
            (backend, code(&out)),
            (backend, 0),
            "read_only paths stay readable: {}",
            stderr(&out)
        );
    }
}

#[test]
fn hard_requirement_refuses_a_missing_path() {
    if !can_run("hard_requirement_refuses_a_missing_path") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        s.edit_policy(&[(
            "read_write: [/dev/null]",
            "read_write: [/dev/null, /nonexistent/openshell-path]",
        )]);
        let out = s.run(backend, &[], &["/bin/sh", "-c", "touch ran"]);
        assert_eq!((backend, code(&out)), (backend, 125));
        assert!(
            stderr(&out).contains("/nonexistent/openshell-path"),
            "{}",
            stderr(&out)
        );
        assert!(
            !s.work.join("ran").exists(),
            "{backend}: the workload never started"
        );
    }
}

#[test]
fn best_effort_skips_a_missing_path_but_keeps_landlock() {
    if !can_run("best_effort_skips_a_missing_path_but_keeps_landlock") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        s.edit_policy(&[
            (
                "read_write: [/dev/null]",
                "read_write: [/dev/null, /nonexistent/openshell-path]",
            ),
            ("hard_requirement", "best_effort"),
        ]);
        // The private /tmp exists but the policy does not list it: only Landlock refuses.
        let out = s.run(
            backend,
            &["--log-level", "info"],
            &[PROBE, "write", "/tmp/landlock-probe"],
        );
        assert_eq!((backend, code(&out)), (backend, EACCES), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("sandbox.landlock_skipped") && err.contains("/nonexistent/openshell-path"),
            "{backend}: the skip is reported: {err}"
        );
        assert!(
            err.contains("sandbox.restricted") && err.contains("landlock_status=fully_enforced"),
            "{backend}: Landlock is enforced: {err}"
        );
    }
}

/// Even a policy that lets the workload read `/openshell` shows it nothing: on the vm backend
/// the agent binary and the boot requests (the workload's launch plan, environment included)
/// live there, and the agent hides the directory under an empty read-only tmpfs before it
/// launches anything. The process backend has no such directory (the path is skipped).
#[test]
fn the_workload_cannot_read_the_agent_or_its_launch_plan() {
    if !can_run("the_workload_cannot_read_the_agent_or_its_launch_plan") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        s.edit_policy(&[
            ("read_only: [", "read_only: [/openshell, "),
            (
                "compatibility: hard_requirement",
                "compatibility: best_effort",
            ),
        ]);
        let out = s
            .command(
                backend,
                &["--env", "SECRET_FOR_THE_TEST=hunter2"],
                &[
                    "/bin/sh",
                    "-c",
                    "ls -A /openshell 2>/dev/null; \
                     cat /openshell/boot/requests /openshell/agent 2>/dev/null | grep -c hunter2; \
                     echo end",
                ],
            )
            .output()
            .expect("run");
        assert_eq!(
            (backend, code(&out), stdout(&out)),
            (backend, 0, "0\nend\n".to_owned()),
            "{}",
            stderr(&out)
        );
    }
}

/// Files the host changes while the workload runs: a read-write share shows the change at the
/// next open, a read-only share within its one-second attribute timeout. On the vm backend the
/// guest keeps its page cache of files on read-only mounts across opens (our virtiofsd patch,
/// `guest/virtiofsd/`); this checks that it still drops it when the host changed the file. The
/// edits are in place and keep the size, so only the modification time tells.
#[test]
fn host_edits_reach_the_workload() {
    use std::io::{BufRead, BufReader, Write};
    if !can_run("host_edits_reach_the_workload") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let ro = s.outside.join("ro");
        std::fs::create_dir(&ro).expect("mkdir");
        s.edit_policy(&[("read_only: [", &format!("read_only: [{}, ", ro.display()))]);
        let (rw_file, ro_file) = (s.work.join("note"), ro.join("note"));
        for f in [&rw_file, &ro_file] {
            std::fs::write(f, "old\n").expect("write");
        }
        let script = format!(
            "cat note {ro}/note; cat note {ro}/note; echo ready; \
             read _; cat note; read _; cat {ro}/note",
            ro = ro.display()
        );
        let mut child = s
            .command(backend, &[], &["/bin/sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut next = || lines.next().and_then(Result::ok).unwrap_or_default();
        let seen: Vec<String> = (0..5).map(|_| next()).collect();
        assert_eq!(
            (backend, seen),
            (
                backend,
                vec!["old", "old", "old", "old", "ready"]
                    .into_iter()
                    .map(String::from)
                    .collect()
            ),
        );
        // In place, same size: a new modification time is all that changes.
        let edit = |f: &std::path::Path| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .open(f)
                .expect("open");
            file.write_all(b"new\n").expect("edit");
        };
        edit(&rw_file);
        writeln!(stdin, "go").expect("stdin");
        let after_rw = next();
        edit(&ro_file);
        std::thread::sleep(Duration::from_millis(1500));
        writeln!(stdin, "go").expect("stdin");
        let after_ro = next();
        drop(stdin);
        let out = child.wait_with_output().expect("wait");
        assert_eq!(
            (backend, after_rw.as_str(), after_ro.as_str(), code(&out)),
            (backend, "new", "new", 0),
            "{}",
            stderr(&out)
        );
    }
}

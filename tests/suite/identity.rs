//! Dropped identity, capabilities, no_new_privs, namespaces and hostname.

use pretty_assertions::assert_eq;

use super::common::*;

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn runs_as_policy_user_without_capabilities() {
    if !can_run("runs_as_policy_user_without_capabilities") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let out = s.run(backend, &[], &["/bin/cat", "/proc/self/status"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let st = stdout(&out);
        let got: Vec<(&str, String)> = [
            "Uid",
            "Gid",
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Seccomp",
        ]
        .into_iter()
        .map(|k| (k, status_field(&st, k)))
        .collect();
        let zero = "0000000000000000".to_owned();
        let expected = vec![
            ("Uid", "65534\t65534\t65534\t65534".to_owned()),
            ("Gid", "65534\t65534\t65534\t65534".to_owned()),
            ("CapInh", zero.clone()),
            ("CapPrm", zero.clone()),
            ("CapEff", zero.clone()),
            ("CapBnd", zero.clone()),
            ("CapAmb", zero),
            ("NoNewPrivs", "1".to_owned()),
            ("Seccomp", "2".to_owned()),
        ];
        assert_eq!((backend, got), (backend, expected));
    }
}

#[test]
fn own_pid_namespace_hostname_and_fresh_proc() {
    if !can_run("own_pid_namespace_hostname_and_fresh_proc") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let out = s.run(
            backend,
            &[],
            &[
                "/bin/sh",
                "-c",
                "echo $$; hostname; ls /proc | grep -c '^[0-9]'",
            ],
        );
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let text = stdout(&out);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let pid: i32 = lines[0].parse().expect("pid");
        // In the VM the kernel's own threads take the first pids; what matters there is that
        // /proc shows nothing but the workload's processes (checked below).
        assert!(
            backend == "vm" || pid < 10,
            "{backend}: the shell is one of the first pids of a new namespace, got {pid}"
        );
        assert_eq!(lines[1], "openshell");
        let visible: usize = lines[2].parse().expect("count");
        assert!(
            visible < 10,
            "{backend}: /proc shows only the sandbox's processes, got {visible}"
        );
    }
}

#[test]
fn missing_user_is_a_clear_error_and_nothing_runs() {
    if !can_run("missing_user_is_a_clear_error_and_nothing_runs") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        s.edit_policy(&[("run_as_user: nobody", "run_as_user: no-such-user-xyz")]);
        let out = s.run(backend, &[], &["/bin/sh", "-c", "touch ran"]);
        assert_eq!(code(&out), 125);
        assert!(
            stderr(&out).contains("no-such-user-xyz"),
            "{}",
            stderr(&out)
        );
        assert!(
            !s.work.join("ran").exists(),
            "{backend}: the workload never started"
        );
        let passwd = std::fs::read_to_string("/etc/passwd").expect("passwd");
        assert!(
            !passwd.contains("no-such-user-xyz"),
            "nothing was created on the host"
        );
    }
}

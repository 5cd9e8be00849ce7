//! cgroup limits from `resources` (and the CLI overrides): each limit is hit from inside.

use std::time::Duration;

use pretty_assertions::assert_eq;

use super::common::*;

#[test]
fn pids_limit_stops_a_fork_bomb() {
    if !can_run("pids_limit_stops_a_fork_bomb") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("resources:\n  pids: 24\n");
        let out = s.run(backend, &[], &[PROBE, "fork", "200"]);
        assert_eq!(
            (backend, code(&out)),
            (backend, 0),
            "fork was refused: {} {}",
            stdout(&out),
            stderr(&out)
        );
    }
}

#[test]
fn memory_limit_kills_a_memory_bomb() {
    if !can_run("memory_limit_kills_a_memory_bomb") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("resources:\n  memory_mib: 64\n");
        let out = s.run(backend, &[], &[PROBE, "alloc", "1024"]);
        assert_eq!(
            (backend, code(&out)),
            (backend, 128 + 9),
            "OOM-killed: {} {}",
            stdout(&out),
            stderr(&out)
        );
        // Only the bomb dies: the shell around it (and, in a VM, the guest) carries on.
        let script = format!("{PROBE} alloc 1024; echo status=$?");
        let out = s.run(backend, &[], &["/bin/sh", "-c", &script]);
        assert_eq!(
            (backend, code(&out), stdout(&out).trim()),
            (backend, 0, "status=137"),
            "{}",
            stderr(&out)
        );
        // Under the limit the same program completes.
        let out = s.run(backend, &[], &[PROBE, "alloc", "16"]);
        assert_eq!((backend, code(&out)), (backend, 0), "{}", stderr(&out));
    }
}

#[test]
fn cpu_limit_is_written_to_the_sandbox_cgroup() {
    if !can_run("cpu_limit_is_written_to_the_sandbox_cgroup") {
        return;
    }
    for backend in backends().into_iter().filter(|b| *b == "process") {
        let s = Scratch::new("resources:\n  cpus: 0.5\n");
        let mut child = s
            .command(
                backend,
                &["--memory-mib", "256"],
                &["/bin/sh", "-c", "touch ready; sleep 600"],
            )
            .spawn()
            .expect("spawn");
        assert!(wait_until(Duration::from_secs(20), || s
            .work
            .join("ready")
            .exists()));
        let dirs = sandbox_cgroups(child.id());
        let read = |name: &str| {
            dirs.iter()
                .find_map(|d| std::fs::read_to_string(d.join(name)).ok())
                .map(|v| v.trim().to_owned())
        };
        let cpu = read("cpu.max").or_else(|| read("cpu.cfs_quota_us"));
        let mem = read("memory.max").or_else(|| read("memory.limit_in_bytes"));
        let _ = child.kill();
        let _ = child.wait();
        let cpu = cpu.expect("a cpu limit file");
        assert!(
            cpu == "50000 100000" || cpu == "50000",
            "cpu quota is half a CPU: {cpu}"
        );
        assert_eq!(
            mem.as_deref(),
            Some("268435456"),
            "--memory-mib overrides the policy"
        );
    }
}

/// The sandbox cgroup's (memory, pids, cpu quota) files of a process-backend sandbox that runs
/// `flags` under `s`'s policy, read on the host while it runs (v1 or v2 file names).
fn cgroup_limits(s: &Scratch, flags: &[&str]) -> (Option<String>, Option<String>, Option<String>) {
    let mut child = s
        .command(
            "process",
            flags,
            &["/bin/sh", "-c", "touch ready; sleep 600"],
        )
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let ready = wait_until(Duration::from_secs(20), || s.work.join("ready").exists());
    let dirs = sandbox_cgroups(child.id());
    let read = |name: &str| {
        dirs.iter()
            .find_map(|d| std::fs::read_to_string(d.join(name)).ok())
            .map(|v| v.trim().to_owned())
    };
    let found = (
        read("memory.max").or_else(|| read("memory.limit_in_bytes")),
        read("pids.max"),
        read("cpu.max").or_else(|| read("cpu.cfs_quota_us")),
    );
    let _ = child.kill();
    let out = child.wait_with_output().expect("wait");
    let _ = std::fs::remove_file(s.work.join("ready"));
    assert!(ready, "the sandbox never started: {}", stderr(&out));
    found
}

/// A cgroup limit file's value read as "no limit" (v2 `max`, v1 the counter's maximum or -1).
fn no_limit(value: &Option<String>) -> bool {
    value.as_deref().is_some_and(|v| {
        v == "max"
            || v.starts_with("max ")
            || v == "-1"
            || v.parse::<u64>().is_ok_and(|n| n >= 1 << 62)
    })
}

#[test]
fn a_policy_without_resources_gets_the_default_limits() {
    if !can_run("a_policy_without_resources_gets_the_default_limits") {
        return;
    }
    for backend in backends() {
        // No resources section (every OpenShell v1 policy): pids 512 stops the bomb.
        let s = Scratch::new("");
        let out = s.run(backend, &["--log-level", "info"], &[PROBE, "fork", "2000"]);
        assert_eq!(
            (backend, code(&out)),
            (backend, 0),
            "fork was never refused: {} {}",
            stdout(&out),
            stderr(&out)
        );
        let event = "event=\"sandbox.resources\" memory_mib=1024 cpus=1 pids=512 \
                     defaults=memory_mib,cpus,pids cli=none";
        assert!(
            stderr(&out).contains(event),
            "{backend}: {event:?} not in {}",
            stderr(&out)
        );
    }
    if backends().contains(&"process") {
        let s = Scratch::new("");
        let (memory, pids, cpu) = cgroup_limits(&s, &[]);
        assert_eq!(
            (memory.as_deref(), pids.as_deref()),
            (Some("1073741824"), Some("512")),
            "1024 MiB and 512 processes"
        );
        let cpu = cpu.expect("a cpu limit file");
        assert!(
            cpu == "100000 100000" || cpu == "100000",
            "cpu quota is one CPU: {cpu}"
        );
    }
}

#[test]
fn unlimited_leaves_the_resource_unlimited() {
    if !can_run("unlimited_leaves_the_resource_unlimited") {
        return;
    }
    for backend in backends() {
        // More processes than the default 512, all started: nothing refused them.
        let s = Scratch::new("resources:\n  pids: unlimited\n");
        let out = s.run(backend, &[], &[PROBE, "fork", "600"]);
        assert_eq!(
            (backend, code(&out), stdout(&out).trim().to_owned()),
            (backend, 1, "started all 600".to_owned()),
            "{}",
            stderr(&out)
        );
        // The CLI's unlimited wins over the policy's limit.
        let s = Scratch::new("resources:\n  pids: 24\n");
        let out = s.run(backend, &["--pids", "unlimited"], &[PROBE, "fork", "600"]);
        assert_eq!(
            (backend, code(&out), stdout(&out).trim().to_owned()),
            (backend, 1, "started all 600".to_owned()),
            "{}",
            stderr(&out)
        );
    }
    if backends().contains(&"process") {
        let s = Scratch::new("resources:\n  memory_mib: unlimited\n  cpus: unlimited\n");
        let (memory, pids, cpu) = cgroup_limits(&s, &[]);
        assert_eq!(
            (no_limit(&memory), pids.as_deref(), no_limit(&cpu)),
            (true, Some("512"), true),
            "memory {memory:?} and cpu {cpu:?} unlimited, pids the default"
        );
        let (memory, pids, _) = cgroup_limits(&s, &["--pids", "unlimited", "--memory-mib", "256"]);
        assert_eq!(
            (memory.as_deref(), no_limit(&pids)),
            (Some("268435456"), true),
            "--pids unlimited: {pids:?}"
        );
    }
}

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

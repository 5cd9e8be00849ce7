//! Nothing is left behind when the supervisor is killed with SIGKILL: no processes, network
//! namespace, veth, cgroup or mounts.

use std::path::PathBuf;
use std::time::Duration;

use super::common::*;

fn netns_of(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()
}

fn any_process_in_netns(ns: &PathBuf) -> bool {
    std::fs::read_dir("/proc")
        .map(|it| {
            it.flatten().any(|e| {
                e.file_name().to_string_lossy().parse::<i32>().is_ok()
                    && std::fs::read_link(e.path().join("ns/net")).ok().as_ref() == Some(ns)
            })
        })
        .unwrap_or(false)
}

#[test]
fn sigkill_of_the_supervisor_leaves_nothing_behind() {
    if !can_run("sigkill_of_the_supervisor_leaves_nothing_behind") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("resources:\n  pids: 64\n");
        let mut child = s
            .command(
                backend,
                &[],
                &["/bin/sh", "-c", "sleep 600 & touch ready; wait"],
            )
            .spawn()
            .expect("spawn");
        let supervisor = child.id();
        assert!(
            wait_until(Duration::from_secs(90), || s.work.join("ready").exists()),
            "{backend}: ready"
        );
        // The policy file's watcher (a child of the supervisor) must go too.
        let watchers: Vec<i32> = pids_with_cmdline("__openshell-watch")
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/status"))
                    .map(|st| st.contains(&format!("PPid:\t{supervisor}\n")))
                    .unwrap_or(false)
            })
            .collect();
        assert_eq!(watchers.len(), 1, "{backend}: one policy watcher");
        let watcher_gone = || !std::path::Path::new(&format!("/proc/{}", watchers[0])).exists();
        if backend == "vm" {
            // QEMU, virtiofsd and vhost-device-vsock all name the sandbox's box directory.
            let marker = format!("/run/{supervisor:x}-");
            let vm_procs = pids_with_cmdline(&marker);
            assert!(
                vm_procs.len() >= 3,
                "{backend}: qemu and its helpers run: {vm_procs:?}"
            );
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(supervisor as i32),
                nix::sys::signal::SIGKILL,
            )
            .expect("kill");
            let _ = child.wait();
            assert!(
                wait_until(Duration::from_secs(15), || pids_with_cmdline(&marker)
                    .is_empty()),
                "{backend}: qemu, the VM and every helper are gone: {:?}",
                pids_with_cmdline(&marker)
            );
            assert!(
                wait_until(Duration::from_secs(15), watcher_gone),
                "{backend}: the watcher is gone"
            );
            continue;
        }
        let cgroups = sandbox_cgroups(supervisor);
        assert!(!cgroups.is_empty(), "{backend}: the sandbox has a cgroup");
        let members: Vec<i32> = std::fs::read_to_string(cgroups[0].join("cgroup.procs"))
            .expect("procs")
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        assert!(
            members.len() >= 2,
            "{backend}: init, the shell and sleep are in the cgroup: {members:?}"
        );
        let sandbox_netns = netns_of(members[0]).expect("netns");
        let helpers: Vec<i32> = pids_with_cmdline("__openshell-helper")
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/status"))
                    .map(|st| st.contains(&format!("PPid:\t{supervisor}\n")))
                    .unwrap_or(false)
            })
            .collect();
        assert_eq!(helpers.len(), 1, "{backend}: one namespace holder");

        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(supervisor as i32),
            nix::sys::signal::SIGKILL,
        )
        .expect("kill");
        let _ = child.wait();

        let alive = |pids: &[i32]| {
            pids.iter()
                .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        };
        assert!(
            wait_until(Duration::from_secs(15), || !alive(&members)
                && !alive(&helpers)),
            "{backend}: every sandbox process and helper is gone"
        );
        assert!(
            wait_until(Duration::from_secs(15), || cgroups
                .iter()
                .all(|d| !d.exists())),
            "{backend}: the cgroup is removed: {cgroups:?}"
        );
        assert!(
            wait_until(Duration::from_secs(15), || !any_process_in_netns(
                &sandbox_netns
            )),
            "{backend}: no process holds the sandbox network namespace (it and its veth are gone)"
        );
    }
}

//! A per-sandbox cgroup with the policy's resource limits, on cgroup v2 or v1.
//!
//! - v2 (a unified hierarchy with the memory, pids and cpu controllers):
//!   `/sys/fs/cgroup/openshell/<id>` with `memory.max`, `memory.swap.max`, `pids.max`, `cpu.max`.
//! - v1 (hybrid hosts, where those controllers live in per-controller hierarchies): one directory
//!   per controller, nested under the supervisor's own cgroup so the sandbox also stays inside
//!   the supervisor's limits: `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes`),
//!   `pids.max`, `cpu.cfs_quota_us`.
//!
//! The directories are removed by the namespace holder once init is gone (see `child`), so they
//! go away even when the supervisor is killed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::EffectiveResources;

const ROOT: &str = "/sys/fs/cgroup";
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup hierarchy with the memory, pids and cpu controllers under {ROOT}")]
    NoHierarchy,
    #[error("{path}: {op}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The hierarchy flavour found on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    V2,
    V1,
}

/// The sandbox's cgroup: one directory (v2) or one per controller (v1).
#[derive(Debug)]
pub struct Cgroup {
    pub flavour: Flavour,
    pub dirs: Vec<PathBuf>,
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(io("write", path))
}

/// Detect which flavour this host offers.
pub fn detect() -> Result<Flavour, CgroupError> {
    let controllers = Path::new(ROOT).join("cgroup.controllers");
    if let Ok(list) = std::fs::read_to_string(&controllers) {
        let have: Vec<&str> = list.split_whitespace().collect();
        if CONTROLLERS.iter().all(|c| have.contains(c)) {
            return Ok(Flavour::V2);
        }
    }
    if CONTROLLERS
        .iter()
        .all(|c| Path::new(ROOT).join(c).join("cgroup.procs").exists())
    {
        return Ok(Flavour::V1);
    }
    Err(CgroupError::NoHierarchy)
}

/// This process's cgroup path in the v1 hierarchy of `controller` (from /proc/self/cgroup).
fn own_v1_path(controller: &str) -> String {
    let Ok(text) = std::fs::read_to_string("/proc/self/cgroup") else {
        return "/".to_owned();
    };
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let ctrls = parts.next()?;
            let path = parts.next()?;
            ctrls
                .split(',')
                .any(|c| c == controller)
                .then(|| path.to_owned())
        })
        .next()
        .unwrap_or_else(|| "/".to_owned())
}

impl Cgroup {
    /// Create the sandbox's cgroup and write its limits.
    pub fn create(id: &str, resources: &EffectiveResources) -> Result<Cgroup, CgroupError> {
        let flavour = detect()?;
        let cgroup = match flavour {
            Flavour::V2 => {
                let base = Path::new(ROOT).join("openshell");
                std::fs::create_dir_all(&base).map_err(io("create", &base))?;
                write(
                    &Path::new(ROOT).join("cgroup.subtree_control"),
                    "+memory +pids +cpu",
                )?;
                write(&base.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
                let dir = base.join(id);
                std::fs::create_dir(&dir).map_err(io("create", &dir))?;
                Cgroup {
                    flavour,
                    dirs: vec![dir],
                }
            }
            Flavour::V1 => {
                let mut dirs = Vec::new();
                for controller in CONTROLLERS {
                    let own = own_v1_path(controller);
                    let dir = Path::new(ROOT)
                        .join(controller)
                        .join(own.trim_start_matches('/'))
                        .join(format!("openshell-{id}"));
                    if let Err(e) = std::fs::create_dir(&dir).map_err(io("create", &dir)) {
                        let partial = Cgroup { flavour, dirs };
                        partial.remove(Duration::ZERO);
                        return Err(e);
                    }
                    dirs.push(dir);
                }
                Cgroup { flavour, dirs }
            }
        };
        if let Err(e) = cgroup.set_limits(resources) {
            cgroup.remove(Duration::ZERO);
            return Err(e);
        }
        Ok(cgroup)
    }

    fn dir_for(&self, controller: &str) -> &Path {
        match self.flavour {
            Flavour::V2 => &self.dirs[0],
            Flavour::V1 => {
                let i = CONTROLLERS
                    .iter()
                    .position(|c| *c == controller)
                    .unwrap_or(0);
                &self.dirs[i]
            }
        }
    }

    fn set_limits(&self, r: &EffectiveResources) -> Result<(), CgroupError> {
        let period: u64 = 100_000;
        match self.flavour {
            Flavour::V2 => {
                let dir = &self.dirs[0];
                if let Some(mib) = r.memory_mib.max() {
                    write(&dir.join("memory.max"), &(mib * 1024 * 1024).to_string())?;
                    // Swap would let the workload exceed the limit it was given.
                    let swap = dir.join("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    }
                }
                if let Some(pids) = r.pids.max() {
                    write(&dir.join("pids.max"), &pids.to_string())?;
                }
                if let Some(cpus) = r.cpus.max() {
                    let quota = cpu_quota(cpus, period);
                    write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
                }
            }
            Flavour::V1 => {
                if let Some(mib) = r.memory_mib.max() {
                    let dir = self.dir_for("memory");
                    let bytes = (mib * 1024 * 1024).to_string();
                    write(&dir.join("memory.limit_in_bytes"), &bytes)?;
                    let memsw = dir.join("memory.memsw.limit_in_bytes");
                    if memsw.exists() {
                        write(&memsw, &bytes)?;
                    }
                }
                if let Some(pids) = r.pids.max() {
                    write(&self.dir_for("pids").join("pids.max"), &pids.to_string())?;
                }
                if let Some(cpus) = r.cpus.max() {
                    let dir = self.dir_for("cpu");
                    write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                    write(
                        &dir.join("cpu.cfs_quota_us"),
                        &cpu_quota(cpus, period).to_string(),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes itself into to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Move `pid` into the cgroup.
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        add_to(&self.procs_files(), pid)
    }

    /// Remove the directories; see [`remove_dirs`].
    pub fn remove(&self, patience: Duration) {
        remove_dirs(&self.dirs, patience);
    }

    /// A session's cgroup, `session-<name>` below the sandbox's in each hierarchy: everything a
    /// session (an `exec`, an SSH channel) starts lands there, stays under the sandbox's
    /// limits, and can be killed as a whole when the session ends ([`kill_session`]).
    pub fn session(&self, name: &str) -> Result<Vec<PathBuf>, CgroupError> {
        let mut made = Vec::new();
        for dir in &self.dirs {
            let sub = dir.join(format!("session-{name}"));
            if let Err(e) = std::fs::create_dir(&sub).map_err(io("create", &sub)) {
                remove_dirs(&made, Duration::ZERO);
                return Err(e);
            }
            made.push(sub);
        }
        Ok(made)
    }
}

/// Kill every process in a session's cgroup (opened as `dirs`, directory descriptors) and
/// wait, bounded, until it is empty: `cgroup.kill` where the kernel has it (v2), else
/// SIGKILL to each member until none is left (a fork racing the loop lands in the same cgroup
/// and is caught on the next round; the sandbox's pids limit bounds how many rounds it takes).
/// Pids are read in the caller's pid namespace.
pub fn kill_session(dirs: &[std::os::fd::OwnedFd], patience: Duration) -> bool {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    let open = |dir: &std::os::fd::OwnedFd, name: &str, flags: nix::fcntl::OFlag| {
        nix::fcntl::openat(
            dir.as_fd(),
            name,
            flags | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map(std::fs::File::from)
    };
    for dir in dirs {
        if let Ok(mut kill) = open(dir, "cgroup.kill", nix::fcntl::OFlag::O_WRONLY) {
            let _ = kill.write_all(b"1");
        }
    }
    let deadline = Instant::now() + patience;
    loop {
        let mut any = false;
        for dir in dirs {
            let Ok(mut procs) = open(dir, "cgroup.procs", nix::fcntl::OFlag::O_RDONLY) else {
                continue;
            };
            let mut text = String::new();
            let _ = procs.read_to_string(&mut text);
            for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                any = true;
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::SIGKILL,
                );
            }
        }
        if !any {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The pids of `dir`'s cgroup and of the session cgroups below it (`cgroup.procs` lists only a
/// cgroup's own members).
pub fn pids_below(procs_file: &Path) -> std::io::Result<Vec<i32>> {
    let mut pids: Vec<i32> = std::fs::read_to_string(procs_file)?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Some(dir) = procs_file.parent() {
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir())
                && entry.file_name().to_string_lossy().starts_with("session-")
            {
                if let Ok(text) = std::fs::read_to_string(entry.path().join("cgroup.procs")) {
                    pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            }
        }
    }
    Ok(pids)
}

/// Write `pid` into each `cgroup.procs` file.
pub fn add_to(procs_files: &[PathBuf], pid: i32) -> Result<(), CgroupError> {
    for file in procs_files {
        write(file, &pid.to_string())?;
    }
    Ok(())
}

fn cpu_quota(cpus: f64, period: u64) -> u64 {
    // 1 ms is the kernel's minimum quota.
    ((cpus * period as f64).round() as u64).max(1000)
}

/// Remove cgroup directories, killing any process still in them, retrying for up to `patience`
/// while exiting processes leave. Returns the directories that could not be removed.
pub fn remove_dirs(dirs: &[PathBuf], patience: Duration) -> Vec<PathBuf> {
    let deadline = Instant::now() + patience;
    // Session cgroups first: a cgroup with children cannot be removed.
    let mut left: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir())
                    && e.file_name().to_string_lossy().starts_with("session-")
                {
                    left.push(e.path());
                }
            }
        }
    }
    left.extend(dirs.iter().cloned());
    loop {
        left.retain(|dir| match std::fs::remove_dir(dir) {
            Ok(()) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(_) => {
                kill_members(dir);
                true
            }
        });
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn kill_members(dir: &Path) {
    let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
        return;
    };
    for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
}

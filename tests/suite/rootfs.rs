//! `--rootfs DIR`: the tree becomes `/` through a per-sandbox writable view, on both backends.
//! The tree itself is never modified; the policy's paths are paths inside it; writes outside
//! read_write are denied; exec lands in the same root; the image config's user, env, workdir
//! and command apply under the explicit ones; nothing is left behind.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use openshell_policy::Policy;
use openshell_runtime::{ExecConfig, RootFs, RuntimeKind, SpawnConfig, StdioMode};
use pretty_assertions::assert_eq;
use tokio::io::AsyncReadExt;

use super::common::*;

/// Debian's busybox-static (installed by `cargo xtask deps`).
const BUSYBOX: &str = "/bin/busybox";

/// The applets the tree links to busybox.
const APPLETS: &[&str] = &[
    "sh", "cat", "ls", "id", "echo", "touch", "sleep", "pwd", "env", "test", "mkdir", "rm", "head",
    "stty", "cmp", "grep",
];

/// A test image: busybox-static and its applets in /bin, an /etc/passwd with a user the host
/// does not have (`app`, 1234), a marker file only the tree has, a world-writable /data. No
/// /proc, /dev or /tmp: the sandbox must make them without touching the tree.
struct Tree {
    _dir: tempfile::TempDir,
    root: PathBuf,
    policy: PathBuf,
}

impl Tree {
    /// The tree's policy, parsed, for the runtime-API tests.
    fn parsed_policy(&self) -> Arc<Policy> {
        let text = std::fs::read_to_string(&self.policy).expect("policy");
        Arc::new(Policy::from_yaml("policy.yaml", &text).expect("valid"))
    }
}

/// Why `BUSYBOX` cannot serve as the tree's only program, if it cannot: it must be a static
/// ELF64 executable (no PT_INTERP program header).
fn busybox_unusable() -> Option<String> {
    let bytes = match std::fs::read(BUSYBOX) {
        Ok(b) => b,
        Err(e) => {
            return Some(format!(
                "{BUSYBOX}: {e}: run `cargo xtask deps` (busybox-static)"
            ))
        }
    };
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Some(format!("{BUSYBOX}: not an ELF64 executable"));
    };
    if !bytes.starts_with(b"\x7fELF") {
        return Some(format!("{BUSYBOX}: not an ELF executable"));
    }
    const PT_INTERP: u32 = 3;
    let dynamic = (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        bytes
            .get(o..o + 4)
            .is_some_and(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == PT_INTERP)
    });
    dynamic.then(|| {
        format!("{BUSYBOX} is dynamically linked: run `cargo xtask deps` (busybox-static)")
    })
}

fn tree(test: &str, extra: &str) -> Option<Tree> {
    if !can_run(test) {
        return None;
    }
    if let Some(reason) = busybox_unusable() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: {reason}");
        }
        eprintln!("SKIP {test}: {reason}");
        return None;
    }
    let dir = tempfile::Builder::new()
        .prefix("openshell-rootfs-")
        .tempdir()
        .expect("tempdir");
    let root = dir.path().join("tree");
    for d in ["bin", "etc", "data", "home/app"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).expect("copy busybox");
    // The same program at another path: the egress policy names binaries by path.
    std::fs::copy(BUSYBOX, root.join("bin/busybox-other")).expect("copy busybox");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("symlink");
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n\
         nobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n\
         app:x:1234:1235:app:/home/app:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\nnogroup:x:65534:\napp:x:1235:\nstaff:x:1240:\n",
    )
    .expect("group");
    std::fs::write(root.join("marker"), "only in the tree\n").expect("marker");
    // A device node an image could carry (here the zero device, world-readable): it must open
    // nothing inside the sandbox.
    nix::sys::stat::mknod(
        &root.join("bin/zero-node"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 5),
    )
    .expect("mknod");
    chmod(&root.join("bin/zero-node"), 0o666);
    chmod(&root.join("data"), 0o777);
    std::os::unix::fs::chown(root.join("home/app"), Some(1234), Some(1235)).expect("chown");
    chmod(dir.path(), 0o755);
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            "version: 1\n\
             filesystem_policy:\n  include_workdir: true\n  read_only: [/bin, /etc, /proc, /marker, /home, /dev/urandom]\n  read_write: [/data, /tmp, /dev/null]\n\
             landlock:\n  compatibility: hard_requirement\n{extra}"
        ),
    )
    .expect("policy");
    Some(Tree {
        _dir: dir,
        root,
        policy,
    })
}

impl Tree {
    fn command(&self, backend: &str, flags: &[&str], cmd: &[&str]) -> Command {
        let mut c = Command::new(SANDBOX);
        c.arg("--runtime")
            .arg(backend)
            .arg("--policy")
            .arg(&self.policy)
            .arg("--rootfs")
            .arg(&self.root)
            .args(flags);
        if !cmd.is_empty() {
            c.arg("--").args(cmd);
        }
        c.stdin(Stdio::null());
        c
    }

    fn run(&self, backend: &str, flags: &[&str], cmd: &[&str]) -> std::process::Output {
        self.command(backend, flags, cmd)
            .output()
            .expect("run openshell-sandbox")
    }

    /// Every entry of the tree with its type, mode, owner, size and content.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        use std::os::unix::fs::MetadataExt;
        let mut out = BTreeMap::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
                let p = e.path();
                let m = std::fs::symlink_metadata(&p).expect("stat");
                let content = if m.file_type().is_symlink() {
                    std::fs::read_link(&p)
                        .expect("readlink")
                        .display()
                        .to_string()
                } else if m.is_file() {
                    let bytes = std::fs::read(&p).expect("read");
                    format!(
                        "{} bytes, sum {}",
                        bytes.len(),
                        bytes.iter().map(|b| *b as u64).sum::<u64>()
                    )
                } else {
                    String::new()
                };
                if m.is_dir() {
                    stack.push(p.clone());
                }
                out.insert(
                    p.strip_prefix(&self.root).expect("inside").to_owned(),
                    format!("{:o} {}:{} {content}", m.mode(), m.uid(), m.gid()),
                );
            }
        }
        out
    }
}

fn openshell_home() -> PathBuf {
    std::env::var_os("OPENSHELL_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".local/share/openshell")
        })
}

fn guest_dir() -> PathBuf {
    std::env::var_os("OPENSHELL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| openshell_home().join("guest"))
}

/// Where a backend keeps its per-sandbox directories.
fn run_dir(backend: &str) -> PathBuf {
    match backend {
        "vm" => guest_dir().join("run"),
        _ => std::env::var_os("OPENSHELL_RUN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/openshell"))
            .join("rootfs"),
    }
}

/// Per-sandbox directories of sandboxes started by supervisor `pid`.
fn boxes_of(backend: &str, pid: u32) -> Vec<PathBuf> {
    let prefix = format!("{pid:x}-");
    std::fs::read_dir(run_dir(backend))
        .map(|it| {
            it.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Mounts, in any mount namespace on the host, whose line names `needle`.
fn mounts_naming(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(e.path().join("mountinfo")) {
            found.extend(
                text.lines()
                    .filter(|l| l.contains(needle))
                    .map(String::from),
            );
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The processes whose mount namespace has a mount naming `needle`: pid, name, state and
/// parent (what a failure names, to tell who kept a view alive).
fn mount_holders(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let holds = std::fs::read_to_string(e.path().join("mountinfo"))
            .is_ok_and(|text| text.contains(needle));
        if holds {
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            found.push(format!(
                "pid {} {} state {} ppid {}",
                e.file_name().to_string_lossy(),
                field("Name:"),
                field("State:"),
                field("PPid:")
            ));
        }
    }
    found
}

#[test]
fn the_tree_is_the_root_and_is_never_modified() {
    let Some(t) = tree("the_tree_is_the_root_and_is_never_modified", "") else {
        return;
    };
    let before = t.snapshot();
    for backend in backends() {
        let out = t.run(
            backend,
            &["--workdir", "/data"],
            &[
                "/bin/sh",
                "-c",
                "cat /marker; \
                 test -e /etc/debian_version && echo host-etc-visible; \
                 test -e /usr && echo host-usr-visible; \
                 echo written > /data/out && cat /data/out; \
                 echo x > /tmp/t && echo tmp-ok; \
                 echo x > /etc/new 2>/dev/null || echo etc-denied; \
                 echo x >> /marker 2>/dev/null || echo marker-denied; \
                 mkdir /newdir 2>/dev/null || echo root-denied; \
                 rm /bin/busybox 2>/dev/null || echo rm-denied; \
                 test -c /dev/null && test -c /dev/urandom && echo devices; \
                 head -c 1 /bin/zero-node >/dev/null 2>&1 && echo image-device-opened; \
                 pwd; id -u",
            ],
        );
        assert_eq!(
            (backend, code(&out), stdout(&out)),
            (
                backend,
                0,
                "only in the tree\nwritten\ntmp-ok\netc-denied\nmarker-denied\nroot-denied\n\
                 rm-denied\ndevices\n/data\n65534\n"
                    .to_owned()
            ),
            "stderr: {}",
            stderr(&out)
        );
        assert_eq!(
            t.snapshot(),
            before,
            "{backend}: the tree is unchanged (the write to /data went to the sandbox's view)"
        );
    }
}

#[test]
fn image_config_supplies_user_env_workdir_and_command() {
    let Some(t) = tree("image_config_supplies_user_env_workdir_and_command", "") else {
        return;
    };
    let config = t.root.parent().expect("parent").join("config.json");
    std::fs::write(
        &config,
        r#"{"architecture":"amd64","os":"linux","config":{
            "User":"app","WorkingDir":"/home/app",
            "Env":["PATH=/bin","A=image","B=image"],
            "Entrypoint":["/bin/sh","-c"],
            "Cmd":["id -u; id -g; pwd; echo $A $B; echo $HOME"]}}"#,
    )
    .expect("config");
    let config = config.display().to_string();
    // The policy names no user: the image's, resolved in the tree's /etc/passwd (the host has
    // no `app`).
    let t_with_user = tree(
        "image_config_supplies_user_env_workdir_and_command",
        "process:\n  run_as_user: nobody\n",
    )
    .expect("second tree");
    let config2 = t_with_user
        .root
        .parent()
        .expect("parent")
        .join("config.json");
    std::fs::copy(&config, &config2).expect("copy config");
    let config2 = config2.display().to_string();
    for backend in backends() {
        let out = t.run(
            backend,
            &["--rootfs-config", &config, "--env", "B=cli"],
            &[],
        );
        assert_eq!(
            (backend, code(&out), stdout(&out)),
            (
                backend,
                0,
                "1234\n1235\n/home/app\nimage cli\n/home/app\n".to_owned()
            ),
            "stderr: {}",
            stderr(&out)
        );
        // The policy's run_as_user wins over the image's User.
        let out = t_with_user.run(backend, &["--rootfs-config", &config2], &[]);
        assert_eq!(
            (backend, code(&out), stdout(&out)),
            (
                backend,
                0,
                "65534\n65534\n/home/app\nimage image\n/nonexistent\n".to_owned()
            ),
            "stderr: {}",
            stderr(&out)
        );
        // An explicit command replaces Entrypoint and Cmd; --workdir replaces WorkingDir.
        let out = t.run(
            backend,
            &["--rootfs-config", &config, "--workdir", "/data"],
            &["/bin/sh", "-c", "pwd; id -un"],
        );
        assert_eq!(
            (backend, code(&out), stdout(&out)),
            (backend, 0, "/data\napp\n".to_owned()),
            "stderr: {}",
            stderr(&out)
        );
    }
}

#[test]
fn bad_rootfs_input_is_a_clear_error() {
    let Some(t) = tree(
        "bad_rootfs_input_is_a_clear_error",
        "process:\n  run_as_user: ghost\n",
    ) else {
        return;
    };
    for backend in backends() {
        let out = t.run(backend, &[], &["/bin/sh", "-c", "echo ran"]);
        assert_eq!(
            (backend, code(&out), stdout(&out)),
            (backend, 125, String::new())
        );
        let expected = format!(
            "user \"ghost\" does not exist in {}/etc/passwd",
            t.root.display()
        );
        assert!(
            stderr(&out).contains(&expected),
            "{backend}: {}",
            stderr(&out)
        );

        let out = Command::new(SANDBOX)
            .args([
                "--runtime",
                backend,
                "--rootfs",
                "/nonexistent-openshell-tree",
                "--",
                "/bin/sh",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run");
        assert_eq!((backend, code(&out)), (backend, 125));
        assert!(
            stderr(&out)
                .contains("--rootfs /nonexistent-openshell-tree: No such file or directory"),
            "{backend}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn exec_into_a_rootfs_sandbox_lands_in_the_same_root() {
    let Some(t) = tree("exec_into_a_rootfs_sandbox_lands_in_the_same_root", "") else {
        return;
    };
    use_cli_as_helper();
    let rt = rt();
    let policy = t.parsed_policy();
    rt.block_on(async {
        for backend in backends() {
            let kind: RuntimeKind = backend.parse().expect("runtime");
            let mut c = SpawnConfig::new("/bin/sh", policy.clone(), "/data".into());
            c.args = vec![
                "-c".into(),
                "echo from-main > /data/main-$$; touch /data/ready; exec sleep 600".into(),
            ];
            c.stdio = StdioMode::Null;
            c.root = Some(RootFs {
                lower: t.root.clone(),
                user: None,
            });
            let mut sandbox = openshell_runtime::spawn(kind, c).await.expect("spawn");
            let exec = ExecConfig {
                program: "/bin/sh".into(),
                args: vec![
                    "-c".into(),
                    "while ! test -e /data/ready; do sleep 0.05; done; \
                     cat /marker /data/main-*; test -e /etc/debian_version || echo no-host; \
                     echo x > /etc/new 2>/dev/null || echo etc-denied"
                        .into(),
                ],
                env: BTreeMap::new(),
                workdir: "/".into(),
                stdio: StdioMode::Piped,
            };
            let mut child = sandbox.exec(exec).await.expect("exec");
            let mut stdio = child.take_stdio();
            let mut text = String::new();
            let read = stdio
                .stdout
                .as_mut()
                .expect("stdout")
                .read_to_string(&mut text);
            tokio::time::timeout(Duration::from_secs(60), read)
                .await
                .expect("exec output in time")
                .expect("read");
            let status = child.wait().await.expect("wait");
            assert_eq!(
                (backend, status.code(), text.as_str()),
                (
                    backend,
                    0,
                    "only in the tree\nfrom-main\nno-host\netc-denied\n"
                )
            );
            sandbox.kill().expect("kill");
            sandbox.wait().await.expect("wait");
        }
    });
    assert!(
        !t.root.join("data/ready").exists(),
        "the sandbox's writes never reach the tree"
    );
}

#[test]
fn rootfs_sandboxes_leave_no_mounts_or_directories() {
    let Some(t) = tree("rootfs_sandboxes_leave_no_mounts_or_directories", "") else {
        return;
    };
    for backend in backends() {
        // A normal end.
        let child = t
            .command(backend, &[], &["/bin/sh", "-c", "echo x > /data/f"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn");
        let supervisor = child.id();
        let out = child.wait_with_output().expect("wait");
        assert_eq!((backend, code(&out)), (backend, 0));
        let marker = format!("{}/{supervisor:x}-", run_dir(backend).display());
        assert_eq!(
            (
                backend,
                boxes_of(backend, supervisor),
                mounts_naming(&marker)
            ),
            (backend, vec![], vec![]),
            "after a normal end"
        );

        // SIGKILL of the supervisor while the sandbox runs.
        let mut child = t
            .command(
                backend,
                &[],
                &["/bin/sh", "-c", "touch /data/ready; exec sleep 600"],
            )
            .spawn()
            .expect("spawn");
        let supervisor = child.id();
        let marker = format!("{}/{supervisor:x}-", run_dir(backend).display());
        assert!(
            wait_until(Duration::from_secs(90), || !mounts_naming(&marker)
                .is_empty()),
            "{backend}: the sandbox's view is mounted while it runs"
        );
        assert_eq!(boxes_of(backend, supervisor).len(), 1, "{backend}: one box");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(supervisor as i32),
            nix::sys::signal::SIGKILL,
        )
        .expect("kill");
        let _ = child.wait();
        assert!(
            wait_until(Duration::from_secs(15), || mounts_naming(&marker)
                .is_empty()),
            "{backend}: no mount of the sandbox's view is left: {:?}, held by {:?}",
            mounts_naming(&marker),
            mount_holders(&marker)
        );
        if backend == "vm" {
            // The vm backend's box directory is collected by the next start (as without a
            // root filesystem).
            let out = t.run(backend, &[], &["/bin/sh", "-c", "true"]);
            assert_eq!((backend, code(&out)), (backend, 0), "{}", stderr(&out));
        }
        assert!(
            wait_until(Duration::from_secs(15), || boxes_of(backend, supervisor)
                .is_empty()),
            "{backend}: the per-sandbox directory is removed: {:?}",
            boxes_of(backend, supervisor)
        );
    }
    assert!(!t.root.join("data/ready").exists() && !t.root.join("data/f").exists());
}

/// Run `cmd` in a `--rootfs` sandbox of `t` whose per-sandbox directories lie on an overlayfs,
/// which overlayfs refuses as an upper layer (so the copy fallback runs); done in a private
/// mount namespace (unshare), so nothing leaks to the host. Returns the output and the overlay's
/// upper directory (where the boxes went), kept alive by the returned tempdir.
fn run_without_overlayfs(
    t: &Tree,
    backend: &str,
    workdir: &str,
    cmd: &[&str],
) -> (std::process::Output, PathBuf, tempfile::TempDir) {
    let scratch = tempfile::tempdir().expect("tempdir");
    let (upper, work, mnt) = (
        scratch.path().join("u"),
        scratch.path().join("w"),
        scratch.path().join("m"),
    );
    let lower = scratch.path().join("l");
    for d in [&upper, &work, &mnt, &lower] {
        std::fs::create_dir(d).expect("mkdir");
    }
    // The vm backend's directories live in the guest directory: overlay the real one.
    let lower = if backend == "vm" { guest_dir() } else { lower };
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount -t overlay overlay -o \"$1\" \"$2\" && shift 2 && exec \"$@\"")
        .arg("sh")
        .arg(&options)
        .arg(&mnt)
        .arg("env")
        .arg(format!("OPENSHELL_RUN_DIR={}", mnt.display()))
        .arg(format!("OPENSHELL_GUEST_DIR={}", mnt.display()))
        .arg(SANDBOX)
        .args(["--runtime", backend, "--policy"])
        .arg(&t.policy)
        .arg("--rootfs")
        .arg(&t.root)
        .args(["--workdir", workdir, "--"])
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("unshare (util-linux)");
    (out, upper, scratch)
}

#[test]
fn a_copy_serves_when_overlayfs_is_unavailable() {
    let Some(t) = tree("a_copy_serves_when_overlayfs_is_unavailable", "") else {
        return;
    };
    let before = t.snapshot();
    for backend in backends() {
        let (out, upper, _scratch) = run_without_overlayfs(
            &t,
            backend,
            "/data",
            &[
                "/bin/sh",
                "-c",
                "cat /marker; echo x > /data/new && cat /data/new; \
                 echo x > /etc/new 2>/dev/null || echo etc-denied",
            ],
        );
        assert_eq!(
            (backend, code(&out), stdout(&out)),
            (backend, 0, "only in the tree\nx\netc-denied\n".to_owned()),
            "stderr: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("method=\"copy\"") && stderr(&out).contains("reason=overlayfs: "),
            "{backend}: the fallback is logged with its reason: {}",
            stderr(&out)
        );
        assert_eq!(t.snapshot(), before, "{backend}: the tree is unchanged");
        let boxes = if backend == "vm" { "run" } else { "rootfs" };
        let left: Vec<PathBuf> = std::fs::read_dir(upper.join(boxes))
            .map(|it| it.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert_eq!((backend, left), (backend, vec![]), "the copy is removed");
    }
}

/// An image that carries links where the runtime works as root (`/openshell/agent` pointing at
/// a host file; `/openshell/boot` at a host directory) cannot make a root helper write through
/// them: with overlayfs refused (the copy fallback, where the vm backend used to write the
/// agent through the image's link), the host's files stay byte-for-byte as they were, and the
/// sandbox runs.
#[test]
fn root_helpers_never_follow_an_images_links() {
    use std::os::unix::fs::PermissionsExt;
    let Some(t) = tree("root_helpers_never_follow_an_images_links", "") else {
        return;
    };
    let host = tempfile::Builder::new()
        .prefix("openshell-host-")
        .tempdir()
        .expect("tempdir");
    let canary = host.path().join("shadow");
    let host_dir = host.path().join("dir");
    std::fs::create_dir(&host_dir).expect("mkdir");
    std::fs::create_dir(t.root.join("openshell")).expect("mkdir");
    for link in ["agent", "boot"] {
        std::fs::write(&canary, "host secret\n").expect("canary");
        chmod(&canary, 0o600);
        let (target, at) = match link {
            "agent" => (&canary, t.root.join("openshell/agent")),
            _ => (&host_dir, t.root.join("openshell/boot")),
        };
        let _ = std::fs::remove_file(t.root.join("openshell/agent"));
        let _ = std::fs::remove_file(t.root.join("openshell/boot"));
        std::os::unix::fs::symlink(target, &at).expect("symlink");
        for backend in backends() {
            let (out, _, _scratch) =
                run_without_overlayfs(&t, backend, "/data", &["/bin/sh", "-c", "cat /marker"]);
            // The host first: a failed run may still have written through the link.
            assert_eq!(
                (
                    backend,
                    link,
                    String::from_utf8_lossy(&std::fs::read(&canary).expect("canary")).into_owned(),
                    std::fs::metadata(&canary)
                        .expect("stat")
                        .permissions()
                        .mode()
                        & 0o7777,
                    std::fs::read_dir(&host_dir).expect("read_dir").count()
                ),
                (backend, link, "host secret\n".to_owned(), 0o600, 0),
                "the host's file and directory are untouched: {}",
                stderr(&out)
            );
            assert_eq!(
                (backend, link, code(&out), stdout(&out)),
                (backend, link, 0, "only in the tree\n".to_owned()),
                "stderr: {}",
                stderr(&out)
            );
            assert!(
                stderr(&out).contains("method=\"copy\""),
                "{backend}: the copy fallback ran: {}",
                stderr(&out)
            );
        }
    }
}

#[test]
fn egress_names_the_images_binaries() {
    let up = super::egress::Upstream::start("127.0.0.4");
    let network = format!(
        "network_policies:\n  upstream:\n    endpoints:\n      - host: \"{ip}\"\n        port: {port}\n        allowed_ips: [127.0.0.0/8]\n    binaries: [{{ path: /bin/busybox }}]\n",
        ip = up.addr.ip(),
        port = up.addr.port(),
    );
    let Some(t) = tree("egress_names_the_images_binaries", &network) else {
        return;
    };
    for backend in backends() {
        // Allowed: the image's /bin/busybox (the host has no such file).
        let script = format!("wget -q -O - {}; echo wget=$?", up.url("/from-image"));
        let out = t.run(backend, &[], &["/bin/sh", "-c", &script]);
        assert_eq!(
            (backend, stdout(&out)),
            (backend, "upstream-ok\nwget=0\n".to_owned()),
            "{}",
            stderr(&out)
        );
        // Denied: the same program at /bin/busybox-other, with no /bin/busybox among its
        // ancestors either.
        let script = format!(
            "/bin/busybox-other wget -q -O - {} 2>/dev/null; echo other=$?",
            up.url("/from-other")
        );
        let out = t.run(backend, &[], &["/bin/busybox-other", "sh", "-c", &script]);
        assert_eq!(
            (backend, stdout(&out)),
            (backend, "other=1\n".to_owned()),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(
        up.seen(),
        vec!["GET /from-image HTTP/1.1".to_owned(); backends().len()],
        "only the allowed binary's requests reached the upstream"
    );
}

#[test]
fn pty_mode_works_in_a_rootfs_sandbox() {
    let Some(t) = tree("pty_mode_works_in_a_rootfs_sandbox", "") else {
        return;
    };
    use_cli_as_helper();
    let rt = rt();
    let policy = t.parsed_policy();
    rt.block_on(async {
        for backend in backends() {
            let kind: RuntimeKind = backend.parse().expect("runtime");
            let mut c = SpawnConfig::new("/bin/sh", policy.clone(), "/data".into());
            c.args = vec![
                "-c".into(),
                "test -t 0 && test -t 1 && echo terminal; stty size".into(),
            ];
            c.stdio = StdioMode::Pty { rows: 21, cols: 77 };
            c.root = Some(RootFs {
                lower: t.root.clone(),
                user: None,
            });
            let mut sandbox = openshell_runtime::spawn(kind, c).await.expect("spawn");
            let master = sandbox.take_stdio().pty.expect("pty master");
            let status = sandbox.wait().await.expect("wait");
            let mut file = std::fs::File::from(master);
            // Everything the workload wrote, until the terminal reports its end (EIO on a PTY
            // master, end-of-file on the vm backend's bridge).
            let mut bytes = Vec::new();
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut file, &mut buf) {
                if n == 0 {
                    break;
                }
                bytes.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&bytes).replace('\r', "");
            assert_eq!(
                (backend, status.code(), text.as_str()),
                (backend, 0, "terminal\n21 77\n")
            );
        }
    });
}

/// An image laid out as Fedora's (`/etc/ssl/certs` a link to `../pki/tls/certs`, the bundle a
/// link to `/etc/pki/ca-trust/...`), with a link that points outside the tree: a sandbox that
/// terminates TLS still starts, its trust variable's path and the image's own bundle paths
/// all hold the sandbox's bundle (its last certificate is the sandbox CA, read by the host's
/// openssl), the host file the hostile link names is untouched and mounted nowhere, and the
/// tree is unchanged.
#[test]
fn an_image_with_another_distributions_trust_layout_gets_the_sandbox_ca() {
    let network = "network_policies:\n  api:\n    endpoints:\n      - host: \"127.0.0.4\"\n        port: 443\n        allowed_ips: [127.0.0.0/8]\n        tls: terminate\n        access: read-only\n    binaries: [{ path: /bin/busybox }]\n";
    let Some(t) = tree(
        "an_image_with_another_distributions_trust_layout_gets_the_sandbox_ca",
        network,
    ) else {
        return;
    };
    let etc = t.root.join("etc");
    std::fs::create_dir_all(etc.join("pki/tls/certs")).expect("mkdir");
    std::fs::create_dir_all(etc.join("pki/ca-trust/extracted/pem")).expect("mkdir");
    std::fs::create_dir_all(etc.join("ssl")).expect("mkdir");
    std::fs::write(
        etc.join("pki/ca-trust/extracted/pem/tls-ca-bundle.pem"),
        "IMAGE ROOTS\n",
    )
    .expect("bundle");
    std::os::unix::fs::symlink(
        "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
        etc.join("pki/tls/certs/ca-bundle.crt"),
    )
    .expect("link");
    std::os::unix::fs::symlink("../pki/tls/certs", etc.join("ssl/certs")).expect("link");
    // A hostile link: an absolute path to a file of the host's.
    let host_file = t.root.parent().expect("parent").join("host-bundle.pem");
    std::fs::write(&host_file, "HOST FILE\n").expect("host file");
    std::os::unix::fs::symlink(&host_file, etc.join("ssl/cert.pem")).expect("link");
    let before = t.snapshot();
    let script = "cmp \"$SSL_CERT_FILE\" /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem && echo image-bundle-replaced; \
                  cmp \"$SSL_CERT_FILE\" /etc/pki/tls/certs/ca-bundle.crt && echo link-replaced; \
                  grep -q 'IMAGE ROOTS' \"$SSL_CERT_FILE\" || echo not-the-images; \
                  echo \"$SSL_CERT_FILE\"; echo ---; cat \"$SSL_CERT_FILE\"";
    for backend in backends() {
        let out = t.run(backend, &[], &["/bin/sh", "-c", script]);
        let text = stdout(&out);
        let (head, bundle) = text.split_once("---\n").unwrap_or((&text, ""));
        assert_eq!(
            (backend, head),
            (
                backend,
                "image-bundle-replaced\nlink-replaced\nnot-the-images\n/etc/ssl/certs/ca-certificates.crt\n"
            ),
            "{}",
            stderr(&out)
        );
        // The last certificate of the bundle the workload trusts is the sandbox CA.
        let last = bundle
            .rsplit_once("-----BEGIN CERTIFICATE-----")
            .map(|(_, b)| format!("-----BEGIN CERTIFICATE-----{b}"))
            .unwrap_or_default();
        let mut openssl = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-subject"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("openssl");
        use std::io::Write as _;
        openssl
            .stdin
            .take()
            .expect("stdin")
            .write_all(last.as_bytes())
            .expect("write");
        let subject = openssl.wait_with_output().expect("openssl");
        let subject = String::from_utf8_lossy(&subject.stdout).into_owned();
        assert!(
            subject.contains("openshell sandbox CA"),
            "{backend}: the bundle's last certificate is {subject:?}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&host_file).expect("host file"),
        "HOST FILE\n"
    );
    assert_eq!(mounts_naming("host-bundle.pem"), Vec::<String>::new());
    assert_eq!(t.snapshot(), before, "the tree is unchanged");
}

//! `cargo xtask guest [--force] [--only PART] [--check]`: build everything the vm backend needs,
//! cached by content hash under [`guest_dir`]. The layout is documented in `guest/README.md`; the
//! runtime finds the artifacts through the `current` symlinks (see [`paths`]).
//!
//! Parts, in build order:
//! - `kernel`: `kernel/<hash>/vmlinux`, from Debian's `linux-source-6.12` and the config fragment
//!   `guest/kernel/openshell-6.12.config`.
//! - `qemu`: `qemu/<hash>/qemu-system-x86_64`, a minimal static QEMU 10.0 from Debian's qemu
//!   source (bookworm-backports) with the flags, device config and patches in `guest/qemu/` (see
//!   [`qemu`]).
//! - `helpers`: `helpers/bin/{vhost-device-vsock,virtiofsd}`, each from its crates.io source with
//!   our patches (`guest/<name>/`), cached by recipe hash.
//! - `agent`: `agent/<hash>/openshell-guest-agent`, static, from the workspace crate.
//! - `rootfs`: `rootfs/<hash>/`, a minimal root directory with the agent and busybox.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::deps;
use crate::util::{self, cargo, display, project_root};

mod qemu;

/// The kernel config fragment, relative to the workspace root.
const KERNEL_FRAGMENT: &str = "guest/kernel/openshell-6.12.config";
/// The Debian package that ships the kernel source tarball under `/usr/src`.
const KERNEL_SOURCE_PKG: &str = "linux-source-6.12";
/// Pinned helper versions (`cargo install --locked`).
const VSOCK_CRATE: (&str, &str) = ("vhost-device-vsock", "0.3.0");
const VIRTIOFSD_CRATE: (&str, &str) = ("virtiofsd", "1.14.0");
/// The guest agent's package and binary name.
const AGENT: &str = "openshell-guest-agent";
/// The agent's target triple (explicit, so `RUSTFLAGS` does not reach build scripts).
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";
/// Bump when the rootfs layout below changes; it is part of the rootfs hash.
const ROOTFS_LAYOUT_VERSION: u32 = 2;
/// Top-level directories of the rootfs: the guest's own file systems and the agent. Nothing
/// else: the mount points of the policy's paths (`/usr`, `/etc`, the workdir, ...) are made
/// per sandbox, only for the paths the policy lists, so a path it does not list does not exist
/// in the guest (as on the process backend).
const ROOTFS_DIRS: &[&str] = &["proc", "sys", "dev", "tmp", "run", "openshell"];
/// Debian merged-usr symlinks at the rootfs top level.
const ROOTFS_LINKS: &[(&str, &str)] = &[
    ("bin", "usr/bin"),
    ("sbin", "usr/sbin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
];
/// Where Debian's busybox-static installs its binary.
const BUSYBOX: &str = "/bin/busybox";
/// Progress interval of long steps.
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
/// The boot check's bound.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// What the boot check's init prints on the serial console.
const BOOT_MARKER: &str = "OPENSHELL-GUEST-BOOT-OK";

/// One buildable part, for `--only`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Part {
    Kernel,
    Qemu,
    Helpers,
    Agent,
    Rootfs,
}

impl Part {
    fn parse(s: &str) -> Result<Part> {
        Ok(match s {
            "kernel" => Part::Kernel,
            "qemu" => Part::Qemu,
            "helpers" => Part::Helpers,
            "agent" => Part::Agent,
            "rootfs" => Part::Rootfs,
            _ => bail!("--only: expected kernel, qemu, helpers, agent or rootfs, got {s:?}"),
        })
    }
}

/// Parsed `guest` arguments.
pub struct Opts {
    force: bool,
    only: Option<Part>,
    check: bool,
}

impl Opts {
    pub fn parse(args: &[String]) -> Result<Opts> {
        let mut opts = Opts {
            force: false,
            only: None,
            check: false,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let only = if arg == "--only" {
                Some(args.next().context("--only needs a value")?.as_str())
            } else {
                arg.strip_prefix("--only=")
            };
            if let Some(only) = only {
                opts.only = Some(Part::parse(only)?);
            } else if arg == "--force" {
                opts.force = true;
            } else if arg == "--check" {
                opts.check = true;
            } else {
                bail!("unknown argument {arg:?} (options: --force, --only PART, --check)");
            }
        }
        Ok(opts)
    }

    fn wants(&self, part: Part) -> bool {
        self.only.is_none_or(|p| p == part)
    }
}

/// The guest artifact directory: `$OPENSHELL_GUEST_DIR`, else `$OPENSHELL_HOME/guest`, else
/// `~/.local/share/openshell/guest`. Empty variables count as unset.
pub fn guest_dir() -> Result<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("OPENSHELL_GUEST_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(home) = var("OPENSHELL_HOME") {
        return Ok(PathBuf::from(home).join("guest"));
    }
    let home = var("HOME").context("none of OPENSHELL_GUEST_DIR, OPENSHELL_HOME, HOME is set")?;
    Ok(PathBuf::from(home).join(".local/share/openshell/guest"))
}

/// Where the runtime finds each artifact (through the `current` symlinks).
pub struct Paths {
    pub root: PathBuf,
    pub kernel: PathBuf,
    pub qemu: PathBuf,
    pub vsock: PathBuf,
    pub virtiofsd: PathBuf,
    pub agent: PathBuf,
    pub rootfs: PathBuf,
}

/// The artifact paths under [`guest_dir`].
pub fn paths() -> Result<Paths> {
    let root = guest_dir()?;
    Ok(Paths {
        kernel: root.join("kernel/current/vmlinux"),
        qemu: root.join("qemu/current").join(qemu::BINARY),
        vsock: root.join("helpers/bin").join(VSOCK_CRATE.0),
        virtiofsd: root.join("helpers/bin").join(VIRTIOFSD_CRATE.0),
        agent: root.join("agent/current").join(AGENT),
        rootfs: root.join("rootfs/current"),
        root,
    })
}

/// `cargo xtask guest`.
pub fn run(opts: &Opts) -> Result<()> {
    let started = Instant::now();
    deps::ensure_packages(deps::VM_PACKAGES)?;
    deps::ensure_vmm_user()?;
    let p = paths()?;
    println!("guest: artifacts under {}", p.root.display());
    fs::create_dir_all(&p.root).with_context(|| format!("cannot create {}", p.root.display()))?;

    // A failing part does not stop the others; the command fails at the end.
    let mut failed: Vec<&str> = Vec::new();
    let mut part = |name: &'static str, f: &mut dyn FnMut() -> Result<()>| {
        if let Err(e) = timed(name, f) {
            eprintln!("guest: {name}: FAILED: {e:#}");
            failed.push(name);
        }
    };
    if opts.wants(Part::Kernel) {
        part("kernel", &mut || kernel(&p.root, opts.force));
    }
    if opts.wants(Part::Qemu) {
        part("qemu", &mut || qemu::build(&p.root, opts.force));
    }
    if opts.wants(Part::Helpers) {
        part("helpers", &mut || helpers(&p.root, opts.force));
    }
    let mut agent_hash = None;
    let mut agent_failed = false;
    if opts.wants(Part::Agent) {
        part("agent", &mut || {
            agent_hash = agent(&p.root, opts.force).inspect_err(|_| agent_failed = true)?;
            Ok(())
        });
    }
    if opts.wants(Part::Rootfs) {
        if agent_hash.is_none() && !agent_failed {
            // With --only rootfs, or while the crate does not exist: the last built agent.
            agent_hash = current_hash(&p.root.join("agent"));
        }
        match agent_hash {
            Some(h) => part("rootfs", &mut || rootfs(&p.root, &h, opts.force)),
            None => println!(
                "guest: rootfs: SKIPPED: it contains the guest agent, and {}",
                if agent_failed {
                    "the agent failed to build"
                } else {
                    "none is built yet (`cargo xtask guest --only agent` once the crate exists)"
                }
            ),
        }
    }
    println!(
        "guest: done in {:.1}s\n{}",
        started.elapsed().as_secs_f64(),
        layout(&p)
    );
    if opts.check {
        if let Some(part) = failed.iter().find(|f| ["kernel", "qemu"].contains(f)) {
            eprintln!("guest: check: SKIPPED: the {part} failed to build");
        } else {
            check(&p)?;
        }
    }
    if !failed.is_empty() {
        bail!("failed: {} (messages above)", failed.join(", "));
    }
    Ok(())
}

fn timed<T>(name: &str, f: &mut dyn FnMut() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    println!("guest: {name}: start");
    let out = f().with_context(|| format!("guest {name}"))?;
    println!("guest: {name}: ok in {:.1}s", t.elapsed().as_secs_f64());
    Ok(out)
}

/// The layout summary printed at the end.
fn layout(p: &Paths) -> String {
    let show = |path: &Path| {
        let state = match fs::canonicalize(path) {
            Ok(real) if real != path => format!("-> {}", real.display()),
            Ok(_) => "present".to_owned(),
            Err(_) => "MISSING".to_owned(),
        };
        format!("{} ({state})", path.display())
    };
    format!(
        "guest layout ($OPENSHELL_GUEST_DIR = {}):\n  \
         kernel     {}\n  \
         qemu       {}\n  \
         vsock      {}\n  \
         virtiofsd  {}\n  \
         agent      {}\n  \
         rootfs     {}",
        p.root.display(),
        show(&p.kernel),
        show(&p.qemu),
        show(&p.vsock),
        show(&p.virtiofsd),
        show(&p.agent),
        show(&p.rootfs),
    )
}

// ---------------------------------------------------------------------------------------------
// kernel

fn kernel(root: &Path, force: bool) -> Result<()> {
    let fragment_path = project_root().join(KERNEL_FRAGMENT);
    let fragment = fs::read(&fragment_path)
        .with_context(|| format!("cannot read {}", fragment_path.display()))?;
    let version = deps::version(KERNEL_SOURCE_PKG)?;
    let mut input = fragment.clone();
    input.extend_from_slice(version.as_bytes());
    let hash = sha256_hex(&input)?;
    let dir = root.join("kernel").join(&hash);
    let vmlinux = dir.join("vmlinux");
    println!("guest: kernel: {KERNEL_SOURCE_PKG} {version}, {KERNEL_FRAGMENT} -> kernel/{hash}");
    if vmlinux.is_file() && !force {
        println!("guest: kernel: cached: {}", vmlinux.display());
        return set_current(&root.join("kernel"), &hash);
    }

    let tarball = PathBuf::from(format!("/usr/src/{KERNEL_SOURCE_PKG}.tar.xz"));
    ensure!(
        tarball.is_file(),
        "{} not found (is {KERNEL_SOURCE_PKG} installed?)",
        tarball.display()
    );
    let BuildDir {
        work,
        log,
        log_path,
        cleanup: _cleanup,
    } = BuildDir::fresh("kernel", &dir)?;

    step(
        "extract",
        Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(&work),
        &log,
        &log_path,
    )?;
    let src = work.join(KERNEL_SOURCE_PKG);
    ensure!(
        src.join("Makefile").is_file(),
        "{} did not contain {KERNEL_SOURCE_PKG}/Makefile",
        tarball.display()
    );
    let make = || {
        let mut c = Command::new("make");
        c.current_dir(&src);
        c
    };
    step("allnoconfig", make().arg("allnoconfig"), &log, &log_path)?;
    step(
        "merge fragment",
        Command::new(src.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&src)
            .args(["-m", ".config"])
            .arg(&fragment_path),
        &log,
        &log_path,
    )?;
    step("olddefconfig", make().arg("olddefconfig"), &log, &log_path)?;

    let config = fs::read_to_string(src.join(".config")).context("cannot read .config")?;
    let dropped = dropped_options(&String::from_utf8_lossy(&fragment), &config);
    if !dropped.is_empty() {
        bail!(
            "after `make olddefconfig` these lines of {KERNEL_FRAGMENT} do not hold (unmet \
             dependencies, a hidden choice, an `if EXPERT` prompt, or selected by another \
             option): {}",
            dropped.join("; ")
        );
    }
    println!("guest: kernel: every option of the fragment holds after olddefconfig");

    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    step(
        &format!("make -j{jobs} vmlinux"),
        make().arg(format!("-j{jobs}")).arg("vmlinux"),
        &log,
        &log_path,
    )?;

    let tmp = dir.join("vmlinux.tmp");
    fs::copy(src.join("vmlinux"), &tmp).context("cannot copy vmlinux")?;
    fs::rename(&tmp, &vmlinux)?;
    fs::write(dir.join("config"), &config)?;
    println!(
        "guest: kernel: {} ({} MB); removing the build tree",
        vmlinux.display(),
        fs::metadata(&vmlinux)?.len() / 1_000_000
    );
    let t = Instant::now();
    drop(_cleanup);
    println!(
        "guest: kernel: build tree removed in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    set_current(&root.join("kernel"), &hash)
}

/// The `CONFIG_X=...` lines of `fragment` that `config` does not hold, each as
/// `fragment line (line N): config has ...`. `CONFIG_X=n` holds when `config` has
/// `# CONFIG_X is not set` or no `CONFIG_X` at all; any other value must be in `config` verbatim.
fn dropped_options(fragment: &str, config: &str) -> Vec<String> {
    let mut have = std::collections::HashMap::new();
    for line in config.lines().map(str::trim) {
        if let Some((name, value)) = line.split_once('=').filter(|_| line.starts_with("CONFIG_")) {
            have.insert(name, value);
        } else if let Some(name) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            have.insert(name, "n");
        }
    }
    fragment
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.trim();
            let (name, want) = line
                .split_once('=')
                .filter(|_| line.starts_with("CONFIG_"))?;
            let got = have.get(name).copied().unwrap_or("n");
            (got != want).then(|| format!("{line} (line {}): .config has {name}={got}", i + 1))
        })
        .collect()
}

/// Runs one build step with its output appended to the log, printing a progress line every
/// [`PROGRESS_EVERY`] with the log's last line. On failure, prints the log's tail.
fn step(name: &str, cmd: &mut Command, log: &fs::File, log_path: &Path) -> Result<()> {
    step_in("kernel", name, cmd, log, log_path)
}

/// [`step`] for the part named `part` (the prefix of its progress lines).
fn step_in(
    part: &str,
    name: &str,
    cmd: &mut Command,
    log: &fs::File,
    log_path: &Path,
) -> Result<()> {
    let shown = display(cmd);
    println!("guest: {part}: {name}: $ {shown}");
    let mut l = log.try_clone()?;
    writeln!(l, "\n### {name}: $ {shown}")?;
    let t = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?)
        .spawn()
        .with_context(|| format!("cannot start `{shown}`"))?;
    let mut next = PROGRESS_EVERY;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if t.elapsed() >= next {
            next += PROGRESS_EVERY;
            println!(
                "guest: {part}: {name}: {:>4}s  {}",
                t.elapsed().as_secs(),
                last_line(log_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if !status.success() {
        let tail = fs::read_to_string(log_path).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(30).collect();
        for line in tail.iter().rev() {
            eprintln!("  | {line}");
        }
        bail!(
            "`{shown}` failed: {status} (full log: {})",
            log_path.display()
        );
    }
    println!(
        "guest: {part}: {name}: done in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The last non-empty line of a (growing) log file, shortened.
fn last_line(path: &Path) -> Option<String> {
    let mut f = fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(4096);
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?.trim();
    if line.starts_with("### ") {
        // Our own step header: the step has printed nothing yet.
        return None;
    }
    Some(line.chars().take(100).collect())
}

/// Removes a directory tree when dropped (the kernel build tree, on success and on failure).
pub(crate) struct RemoveOnDrop(PathBuf);

/// A part's fresh build tree `<dir>/build` (removed when `cleanup` drops) and its build log
/// `<dir>/build.log`.
pub(crate) struct BuildDir {
    pub work: PathBuf,
    pub log: fs::File,
    pub log_path: PathBuf,
    pub cleanup: RemoveOnDrop,
}

impl BuildDir {
    pub(crate) fn fresh(part: &str, dir: &Path) -> Result<BuildDir> {
        fs::create_dir_all(dir)?;
        let work = dir.join("build");
        let log_path = dir.join("build.log");
        if work.exists() {
            fs::remove_dir_all(&work)
                .with_context(|| format!("cannot remove stale {}", work.display()))?;
        }
        fs::create_dir_all(&work)?;
        let cleanup = RemoveOnDrop(work.clone());
        let log = fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        println!("guest: {part}: build log {}", log_path.display());
        Ok(BuildDir {
            work,
            log,
            log_path,
            cleanup,
        })
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if self.0.exists() {
            if let Err(e) = fs::remove_dir_all(&self.0) {
                eprintln!("guest: warning: cannot remove {}: {e}", self.0.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

/// A helper built from its crates.io source with our patches (see [`from_source`]).
struct SourceRecipe {
    /// The crate and the binary it installs.
    name: &'static str,
    version: &'static str,
    /// Our `*.patch` files for it, relative to the project root.
    dir: &'static str,
    /// Names the recipe in its hash; bumped (with `revision`) when the build itself changes.
    label: &'static str,
    revision: u32,
}

/// vhost-device-vsock: a connection busy both ways stalled (see the patch).
const VSOCK_RECIPE: SourceRecipe = SourceRecipe {
    name: VSOCK_CRATE.0,
    version: VSOCK_CRATE.1,
    dir: "guest/vhost-device-vsock",
    label: "openshell-vsock",
    revision: 1,
};

/// virtiofsd: the guest keeps its page cache of files on read-only mounts (see the patch).
const VIRTIOFSD_RECIPE: SourceRecipe = SourceRecipe {
    name: VIRTIOFSD_CRATE.0,
    version: VIRTIOFSD_CRATE.1,
    dir: "guest/virtiofsd",
    label: "openshell-virtiofsd",
    revision: 1,
};

fn helpers(root: &Path, force: bool) -> Result<()> {
    let prefix = root.join("helpers");
    for recipe in [&VSOCK_RECIPE, &VIRTIOFSD_RECIPE] {
        from_source(recipe, &prefix, force)?;
        let path = prefix.join("bin").join(recipe.name);
        let v = tool_version(&path)
            .with_context(|| format!("{} --version failed after install", path.display()))?;
        println!("guest: helpers: {}: {v} at {}", recipe.name, path.display());
    }
    Ok(())
}

/// A recipe directory's `*.patch` files in name order: name, path, bytes.
pub(crate) fn recipe_patches(dir: &Path) -> Result<Vec<(String, PathBuf, Vec<u8>)>> {
    let mut patches = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".patch") {
            let bytes =
                fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            patches.push((name, path, bytes));
        }
    }
    patches.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(patches)
}

/// The recipe's `*.patch` files in name order, and its hash over the crate, the revision and
/// every patch.
fn source_recipe(recipe: &SourceRecipe) -> Result<(Vec<(String, PathBuf)>, String)> {
    let patches = recipe_patches(&project_root().join(recipe.dir))?;
    let mut input = format!(
        "{} recipe={}\ncrate={} {}\n",
        recipe.label, recipe.revision, recipe.name, recipe.version
    )
    .into_bytes();
    for (patch, _, bytes) in &patches {
        input.extend_from_slice(format!("--- {patch}\n").as_bytes());
        input.extend_from_slice(bytes);
    }
    let hash = sha256_hex(&input)?;
    Ok((patches.into_iter().map(|(n, p, _)| (n, p)).collect(), hash))
}

/// A helper from its crates.io source with our patches, installed as `helpers/bin/<name>`, with
/// the recipe's hash in `helpers/<name>.recipe`. The source comes through `cargo vendor` of a
/// throwaway package that depends on the pinned version (crates.io only, checksummed by cargo),
/// the patches are applied with `patch -p1`, and `cargo install --locked --path` builds it with
/// the crate's own lock file.
fn from_source(recipe: &SourceRecipe, prefix: &Path, force: bool) -> Result<()> {
    let (name, ver, dir) = (recipe.name, recipe.version, recipe.dir);
    let (patches, hash) = source_recipe(recipe)?;
    let marker = prefix.join(format!("{name}.recipe"));
    let binary = prefix.join("bin").join(name);
    let have = fs::read_to_string(&marker).unwrap_or_default();
    if !force && have.trim() == hash && tool_version(&binary).is_some_and(|v| v.contains(ver)) {
        println!("guest: helpers: cached: {name} {ver} with {dir}/ ({hash})");
        return Ok(());
    }
    println!(
        "guest: helpers: building {name} {ver} from source with {} patch(es) from {dir}/ \
         (about a minute)",
        patches.len()
    );
    let build = BuildDir::fresh("helpers", &prefix.join(format!("{name}-build")))?;
    let fetch = build.work.join("fetch");
    fs::create_dir_all(fetch.join("src"))?;
    fs::write(
        fetch.join("Cargo.toml"),
        format!(
            "[package]\nname = \"openshell-helper-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
             publish = false\n\n[dependencies]\n{name} = \"={ver}\"\n\n[workspace]\n"
        ),
    )?;
    fs::write(fetch.join("src/lib.rs"), "")?;
    let mut vendor = cargo();
    vendor
        .args(["vendor", "--versioned-dirs", "--quiet"])
        .arg(build.work.join("vendor"))
        .current_dir(&fetch)
        .stdout(Stdio::null());
    util::run(&mut vendor)?;
    let src = build.work.join("vendor").join(format!("{name}-{ver}"));
    ensure!(
        src.join("Cargo.lock").is_file(),
        "{} has no Cargo.lock",
        src.display()
    );
    for (patch, path) in &patches {
        let mut cmd = Command::new("patch");
        cmd.args(["-p1", "--batch", "--forward", "-i"])
            .arg(path)
            .current_dir(&src);
        util::run(&mut cmd).with_context(|| format!("applying {dir}/{patch}"))?;
    }
    let mut install = cargo();
    install
        .args(["install", "--locked", "--force", "--path"])
        .arg(&src)
        .arg("--root")
        .arg(prefix)
        .env("CARGO_TARGET_DIR", build.work.join("target"))
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    util::run(&mut install)?;
    let v = tool_version(&binary)
        .with_context(|| format!("{} --version failed after install", binary.display()))?;
    ensure!(
        v.contains(ver),
        "{} reports {v:?}, expected {ver}",
        binary.display()
    );
    fs::write(&marker, format!("{hash}\n"))?;
    drop(build);
    Ok(())
}

/// The first line of `<path> --version`, when it runs and succeeds.
fn tool_version(path: &Path) -> Option<String> {
    let out = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next()?.trim().to_owned())
}

// ---------------------------------------------------------------------------------------------
// agent

/// Builds the static guest agent; `None` (with a message) when the crate does not exist yet.
fn agent(root: &Path, force: bool) -> Result<Option<String>> {
    let repo = project_root();
    let manifest = repo.join("crates").join(AGENT).join("Cargo.toml");
    if !manifest.is_file() {
        println!(
            "guest: agent: SKIPPED: {} does not exist yet (the `{AGENT}` crate is being written); \
             the other parts are built without it",
            manifest.display()
        );
        return Ok(None);
    }
    let target_dir = repo.join("target/guest");
    let mut cmd = cargo();
    cmd.args(["build", "--release", "-p", AGENT, "--target", AGENT_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // The guest execs the agent over virtio-fs: no debug info to page in (symbols stay
        // for backtraces).
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS");
    util::run(&mut cmd)?;
    let built = target_dir.join(AGENT_TARGET).join("release").join(AGENT);
    let bytes = fs::read(&built).with_context(|| format!("cannot read {}", built.display()))?;
    ensure_static(&bytes).with_context(|| format!("{} is not static", built.display()))?;
    if let Ok(out) = Command::new("file").arg("-b").arg(&built).output() {
        println!(
            "guest: agent: file: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    let hash = sha256_hex(&bytes)?;
    let dir = root.join("agent").join(&hash);
    let dest = dir.join(AGENT);
    if dest.is_file() && !force {
        println!("guest: agent: cached: {}", dest.display());
    } else {
        fs::create_dir_all(&dir)?;
        install_file(&built, &dest, 0o755)?;
        println!(
            "guest: agent: {} ({} KB)",
            dest.display(),
            bytes.len() / 1000
        );
    }
    set_current(&root.join("agent"), &hash)?;
    Ok(Some(hash))
}

/// Fails unless `elf` is a 64-bit little-endian ELF with no `PT_INTERP` program header (that is,
/// it needs no dynamic loader).
fn ensure_static(elf: &[u8]) -> Result<()> {
    const PT_INTERP: u32 = 3;
    ensure!(
        elf.len() >= 64 && &elf[..4] == b"\x7fELF",
        "not an ELF file"
    );
    ensure!(elf[4] == 2 && elf[5] == 1, "not a 64-bit little-endian ELF");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into()?) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let p_type = elf
            .get(o..o + 4)
            .context("program header out of bounds")?
            .try_into()
            .map(u32::from_le_bytes)?;
        ensure!(
            p_type != PT_INTERP,
            "it has a PT_INTERP program header (dynamically linked)"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// rootfs

fn rootfs(root: &Path, agent_hash: &str, force: bool) -> Result<()> {
    let busybox_version = deps::version("busybox-static")?;
    let hash = sha256_hex(
        format!(
            "openshell-rootfs-layout={ROOTFS_LAYOUT_VERSION}\nagent={agent_hash}\n\
             busybox-static={busybox_version}\n"
        )
        .as_bytes(),
    )?;
    let base = root.join("rootfs");
    let dir = base.join(&hash);
    println!("guest: rootfs: layout v{ROOTFS_LAYOUT_VERSION}, agent {agent_hash} -> rootfs/{hash}");
    if dir.join("openshell").join("agent").is_file() && !force {
        println!("guest: rootfs: cached: {}", dir.display());
        return set_current(&base, &hash);
    }
    let agent = root.join("agent").join(agent_hash).join(AGENT);
    ensure!(agent.is_file(), "{} is missing", agent.display());

    // Build next to the final place, then rename into it.
    let tmp = base.join(format!(".tmp-{hash}-{}", std::process::id()));
    fs::create_dir_all(&tmp)?;
    let cleanup = RemoveOnDrop(tmp.clone());
    for d in ROOTFS_DIRS {
        let mode = match *d {
            "tmp" => 0o1777,
            _ => 0o755,
        };
        let p = tmp.join(d);
        fs::create_dir(&p)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
    }
    for (link, target) in ROOTFS_LINKS {
        symlink(target, tmp.join(link))?;
    }
    install_file(&agent, &tmp.join("openshell/agent"), 0o755)?;
    install_file(Path::new(BUSYBOX), &tmp.join("openshell/busybox"), 0o755)?;
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::rename(&tmp, &dir)?;
    drop(cleanup);
    println!("guest: rootfs: {}", dir.display());
    set_current(&base, &hash)
}

// ---------------------------------------------------------------------------------------------
// boot check

/// Boots the kernel under our `qemu-system-x86_64 -M microvm` with a tiny initramfs whose `/init`
/// prints [`BOOT_MARKER`] and reboots (which, with `reboot=t` and `-no-reboot`, ends QEMU).
fn check(p: &Paths) -> Result<()> {
    ensure!(
        p.kernel.is_file(),
        "no kernel at {} (run `cargo xtask guest --only kernel`)",
        p.kernel.display()
    );
    ensure!(
        p.qemu.is_file(),
        "no QEMU at {} (run `cargo xtask guest --only qemu`)",
        p.qemu.display()
    );
    let tmp = p.root.join(format!(".check-{}", std::process::id()));
    fs::create_dir_all(&tmp)?;
    let _cleanup = RemoveOnDrop(tmp.clone());
    let initrd = tmp.join("initrd.cpio");
    let busybox = fs::read(BUSYBOX).with_context(|| format!("cannot read {BUSYBOX}"))?;
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox echo {BOOT_MARKER} $(/bin/busybox uname -r)\n\
         /bin/busybox reboot -f\n"
    );
    fs::write(&initrd, newc_archive(&busybox, init.as_bytes()))?;

    let khz = host_tsc_khz()?;
    let append = format!(
        "console=ttyS0 reboot=t panic=-1 noapictimer no_timer_check tsc=reliable \
         tsc_early_khz={khz}"
    );
    let mut cmd = Command::new(&p.qemu);
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,rtc=on,acpi=off",
        "-no-reboot",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-m",
        "256",
        "-kernel",
    ])
    .arg(&p.kernel)
    .arg("-initrd")
    .arg(&initrd)
    .arg("-append")
    .arg(&append)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    println!("guest: check: $ {}", display(&cmd));

    let t = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", p.qemu.display()))?;
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().context("no stdout")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("qemu stderr: {line}"));
        }
    });

    let mut console = Vec::new();
    let mut marker_at = None;
    let deadline = t + BOOT_TIMEOUT;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Ok(line) => {
                if marker_at.is_none() && line.contains(BOOT_MARKER) {
                    marker_at = Some(t.elapsed());
                    println!("guest: check: console: {}", line.trim());
                }
                console.push(line);
            }
            // Both pipes closed: QEMU has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => break,
        }
    }
    // QEMU should be gone already (guest reboot + -no-reboot); bound the wait, then kill.
    let exit_deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if Instant::now() >= exit_deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let total = t.elapsed();

    let Some(marker_at) = marker_at else {
        for line in console.iter().rev().take(40).rev() {
            eprintln!("  | {line}");
        }
        bail!(
            "the guest did not print {BOOT_MARKER} within {}s (console above)",
            BOOT_TIMEOUT.as_secs()
        );
    };
    if let Some(line) = console.iter().find(|l| l.contains("Linux version")) {
        println!("guest: check: console: {}", line.trim());
    }
    println!(
        "guest: check: OK: marker after {:.2}s, qemu {} after {:.2}s (TCG, tsc_early_khz={khz})",
        marker_at.as_secs_f64(),
        match status {
            Some(s) => format!("exited ({s})"),
            None => "killed (did not exit on guest reboot)".to_owned(),
        },
        total.as_secs_f64()
    );
    Ok(())
}

/// An uncompressed `newc` cpio archive with `/bin/busybox`, `/init` (a busybox script) and
/// `/dev/console`, written here so that no `cpio` tool is needed.
pub(crate) fn newc_archive(busybox: &[u8], init: &[u8]) -> Vec<u8> {
    newc_archive_with(busybox, init, &[])
}

/// [`newc_archive`] plus `extra` files (relative paths; their parent directories are added).
pub(crate) fn newc_archive_with(
    busybox: &[u8],
    init: &[u8],
    extra: &[(String, Vec<u8>)],
) -> Vec<u8> {
    const DIR: u32 = 0o040755;
    const FILE: u32 = 0o100755;
    const CHR: u32 = 0o020600;
    let mut out = Vec::new();
    let mut ino = 1;
    let mut entry = |name: &str, mode: u32, data: &[u8], rdev: (u32, u32)| {
        let fields = [
            ino,
            mode,
            0,
            0,
            if mode == DIR { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        ino += 1;
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    entry("bin", DIR, b"", (0, 0));
    entry("dev", DIR, b"", (0, 0));
    entry("dev/console", CHR, b"", (5, 1));
    entry("bin/busybox", FILE, busybox, (0, 0));
    entry("init", FILE, init, (0, 0));
    let mut dirs: Vec<String> = vec!["bin".into(), "dev".into()];
    for (path, data) in extra {
        let mut parent = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |x| x.1)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !dirs.contains(&parent) {
                entry(&parent, DIR, b"", (0, 0));
                dirs.push(parent.clone());
            }
        }
        entry(path, FILE, data, (0, 0));
    }
    entry("TRAILER!!!", 0, b"", (0, 0));
    out
}

/// The host TSC frequency in kHz, for the guest's `tsc_early_khz=` (TCG's own calibration
/// sometimes fails): `/sys/devices/system/cpu/cpu0/tsc_khz` when the kernel exposes it, else
/// `cpu MHz` of `/proc/cpuinfo` × 1000, rounded.
pub fn host_tsc_khz() -> Result<u64> {
    if let Ok(s) = fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_khz") {
        if let Ok(khz) = s.trim().parse() {
            return Ok(khz);
        }
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("cannot read /proc/cpuinfo")?;
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "cpu MHz").then(|| v.trim().parse().ok())?
        })
        .context("no `cpu MHz` in /proc/cpuinfo")?;
    Ok((mhz * 1000.0).round() as u64)
}

// ---------------------------------------------------------------------------------------------
// small helpers

/// Points `<base>/current` at `<base>/<hash>` (a relative symlink, replaced atomically).
fn set_current(base: &Path, hash: &str) -> Result<()> {
    let tmp = base.join(format!(".current-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    symlink(hash, &tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    fs::rename(&tmp, base.join("current"))
        .with_context(|| format!("cannot update {}/current", base.display()))?;
    Ok(())
}

/// The hash of the directory `<base>/current` points at, if any.
fn current_hash(base: &Path) -> Option<String> {
    let target = fs::read_link(base.join("current")).ok()?;
    base.join(&target)
        .is_dir()
        .then(|| target.to_string_lossy().into_owned())
}

/// Copies a file to `dest` (through a temporary name) with the given mode.
fn install_file(src: &Path, dest: &Path, mode: u32) -> Result<()> {
    let tmp = dest.with_extension("tmp");
    fs::copy(src, &tmp)
        .with_context(|| format!("cannot copy {} to {}", src.display(), tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, dest)?;
    Ok(())
}

/// Lowercase hex SHA-256 of `data`, through coreutils' `sha256sum` (keeps xtask free of a hash
/// crate); the first 16 hex digits, which name the cache directories.
fn sha256_hex(data: &[u8]) -> Result<String> {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run sha256sum")?;
    {
        let mut stdin = child.stdin.take().context("no stdin")?;
        stdin.write_all(data)?;
    }
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "sha256sum failed");
    let text = String::from_utf8(out.stdout)?;
    let hex = text.split_whitespace().next().unwrap_or_default();
    ensure!(
        hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "unexpected sha256sum output {text:?}"
    );
    Ok(hex[..16].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_options_lists_lines_that_do_not_hold() {
        let fragment = "# c\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_C=n\nCONFIG_D=\"x\"\nCONFIG_E=n\n\
                        CONFIG_F=n\nCONFIG_G=15\nCONFIG_H=y\n";
        let config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_D=\"x\"\nCONFIG_E=y\n\
                      # CONFIG_F is not set\nCONFIG_G=17\n";
        assert_eq!(
            dropped_options(fragment, config),
            vec![
                "CONFIG_B=y (line 3): .config has CONFIG_B=n",
                "CONFIG_E=n (line 6): .config has CONFIG_E=y",
                "CONFIG_G=15 (line 8): .config has CONFIG_G=17",
                "CONFIG_H=y (line 9): .config has CONFIG_H=n",
            ]
        );
    }

    #[test]
    fn static_check_reads_program_headers() {
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        // The test binary is dynamically linked on gnu.
        assert!(ensure_static(&me).is_err());
        assert!(ensure_static(b"not elf").is_err());
    }

    #[test]
    fn newc_is_padded_and_terminated() {
        let a = newc_archive(b"BB", b"#!init");
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
        let b = newc_archive_with(b"BB", b"#!init", &[("usr/bin/x".into(), b"X".to_vec())]);
        assert_eq!(b.len() % 4, 0);
        for name in [&b"usr\0"[..], b"usr/bin\0", b"usr/bin/x\0"] {
            assert!(b.windows(name.len()).any(|w| w == name), "{name:?}");
        }
        assert!(b.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn sha256_of_abc() {
        assert_eq!(sha256_hex(b"abc").unwrap(), "ba7816bf8f01cfea");
    }
}

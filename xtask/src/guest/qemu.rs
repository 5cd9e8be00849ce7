//! The `qemu` part: a minimal, static `qemu-system-x86_64` for the qemu engine, built from
//! Debian's qemu 10.0 source package (on Debian 12, the one in bookworm-backports).
//!
//! Debian's `qemu-system-x86_64` links 51 shared libraries and carries every PC device; its
//! `qemu-system-x86_64-microvm` is KVM-only (`--disable-tcg`), so it cannot run on kvm-pvm hosts.
//! Ours has the microvm board, the two vhost-user devices, TCG and KVM, seccomp (`-sandbox on`)
//! and nothing else, linked statically: about 20 MiB less RSS per VM and ~25 ms less from exec to
//! its first connect. It is QEMU 10.0 rather than Debian 12's own 7.2 because VM snapshot and
//! restore need 10.0's migration features: migration to a file with the `mapped-ram` capability,
//! and `mode=cpr-reboot`.
//!
//! Inputs, all under `guest/qemu/` except the source:
//! - the source: `apt-get source --tar-only qemu=<V>`, Debian's upstream tarball (the "+ds"
//!   repack, without prebuilt firmware) of `V`, the newest version of Debian's source package
//!   whose upstream version is in the [`SOURCE_SERIES`] series. It comes through a private apt
//!   configuration: `deb-src` entries mirroring the machine's `deb` entries, plus
//!   `bookworm-backports` next to the Debian archive's `bookworm` (see [`BACKPORTS`]), so the
//!   system's apt configuration is never changed, and apt checks the tarball against the signed
//!   index. The series is pinned, not `V`: backports keeps only the newest revision of a package,
//!   so a pinned revision would vanish from the mirror. Debian's patch series (`debian/patches`,
//!   in the package's `.debian.tar.xz`) is not applied: the mirror this is built against serves
//!   the backport's upstream tarball but not its `.dsc` or `.debian.tar.xz`, so the binary is
//!   upstream QEMU plus our patches only (dropping `--tar-only` and the `tar` step brings Debian's
//!   patches back where the mirror has the whole package);
//! - `python-requirements.txt`: meson and pycotap for configure, from PyPI, pinned by hash;
//! - `*.patch`, applied in name order with `patch -p1`;
//! - `openshell-microvm.mak`, the device config (copied into `configs/devices/x86_64-softmmu/`);
//! - `configure.args`, the configure flags, one per line.
//!
//! The hash covers all of them, `V`, the recipe version below and the versions of the Debian `-dev`
//! packages linked in statically (a security update of glib rebuilds QEMU). Finding `V` takes the
//! mirror, so a run first looks for an existing build of this recipe (each build's `build-info`
//! records its `V`) and uses it without the network; `--force` looks `V` up again and rebuilds.

use std::cmp::Ordering;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use super::{
    ensure_static, recipe_patches, set_current, sha256_hex, step_in, BuildDir, RemoveOnDrop,
};
use crate::deps;
use crate::util::{display, project_root};

/// The binary's name (the benchmark finds QEMU processes by it).
pub const BINARY: &str = "qemu-system-x86_64";
/// The recipe's directory, relative to the workspace root.
const RECIPE_DIR: &str = "guest/qemu";
/// The configure flags file, in [`RECIPE_DIR`].
const CONFIGURE_ARGS: &str = "configure.args";
/// The device config file, in [`RECIPE_DIR`]; its stem is the `--with-devices-x86_64=` name.
const DEVICES: &str = "openshell-microvm.mak";
/// The hash-pinned Python packages configure needs, in [`RECIPE_DIR`].
const PYTHON_REQUIREMENTS: &str = "python-requirements.txt";
/// Debian's source package.
const SOURCE_PKG: &str = "qemu";
/// The QEMU release series built: the newest Debian version of [`SOURCE_PKG`] whose upstream
/// version starts with this. A new series (new machine types, migration format) is a decision;
/// a new upload within it is not, and the mirror drops the old one.
const SOURCE_SERIES: &str = "10.0.";
/// Debian 12's own QEMU is 7.2; 10.0 is in its backports suite, which Debian's default apt
/// configuration does not list. The private configuration adds the second suite wherever the
/// Debian archive's entry has the first (on a release that has 10.0 itself, nothing is added and
/// the release's own source is found).
const BACKPORTS: (&str, &str) = ("bookworm", "bookworm-backports");
/// The Debian archive's keyring (`Signed-By`), which tells the archive from third-party
/// repositories that also name their suites after the release.
const DEBIAN_KEYRING: &str = "debian-archive-keyring";
/// The interpreter the build's venv is made from: Debian's, whose `python3-venv` package
/// `deps --vm` installs (a `python3` earlier on `PATH` may lack venv or ensurepip).
const PYTHON: &str = "/usr/bin/python3";
/// The packaging of the firmware `--firmwarepath` points at (`/usr/share/qemu/bios-microvm.bin`),
/// checked before a build so a missing firmware shows up here rather than at the first VM start.
const FIRMWARE_PKG: &str = "qemu-system-data";
/// Debian packages whose static archives end up in the binary: their versions are in the hash.
const LINKED_PKGS: &[&str] = &[
    "libc6-dev",
    "libglib2.0-dev",
    "libpcre2-dev",
    "zlib1g-dev",
    "libfdt-dev",
    "libseccomp-dev",
];
/// Bump when the build steps below change in a way that changes the binary.
const RECIPE_VERSION: u32 = 2;
/// Where the machine's apt sources are.
const APT_SOURCE_LIST: &str = "/etc/apt/sources.list";
const APT_SOURCE_PARTS: &str = "/etc/apt/sources.list.d";
/// What the version check's output must contain (see the test that ties it to the series).
const VERSION_LINE: &str = "QEMU emulator version 10.0.";
/// QMP input for the migration check: the answer to `query-migrate-parameters` shows the mode
/// set with `-global`, then `quit` ends QEMU.
const QMP_MIGRATION: &str = "{\"execute\":\"qmp_capabilities\"}\n\
    {\"execute\":\"query-migrate-parameters\"}\n{\"execute\":\"quit\"}\n";

/// What the built binary must offer: arguments, its stdin, and a line its output must contain.
const MUST_OFFER: &[(&[&str], &str, &str)] = &[
    (&["-M", "help"], "", "microvm "),
    (&["-accel", "help"], "", "tcg"),
    (&["-accel", "help"], "", "kvm"),
    (&["-device", "help"], "", "name \"vhost-user-fs-device\""),
    (&["-device", "help"], "", "name \"vhost-user-vsock-device\""),
    (
        &["-device", "vhost-user-vsock-device,help"],
        "",
        "chardev=<str>",
    ),
    (&["-device", "help"], "", "name \"isa-serial\""),
    (&["-object", "help"], "", "memory-backend-memfd"),
    // Parsed before -version exits: fails when seccomp support is not built in.
    (&["-sandbox", "on", "-version"], "", "QEMU emulator version"),
    (&["-version"], "", VERSION_LINE),
    // Snapshots' migration features: QEMU refuses to start with a `-global` naming a property or
    // value the migration object lacks, so this fails without the mapped-ram capability or the
    // cpr-reboot mode.
    (
        &[
            "-M",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-global",
            "migration.mapped-ram=on",
            "-global",
            "migration.mode=cpr-reboot",
            "-qmp",
            "stdio",
        ],
        QMP_MIGRATION,
        "\"mode\": \"cpr-reboot\"",
    ),
];

/// The recipe files, read once.
struct Recipe {
    configure_args: Vec<String>,
    configure_bytes: Vec<u8>,
    devices: Vec<u8>,
    devices_name: String,
    python_requirements: Vec<u8>,
    patches: Vec<(String, PathBuf, Vec<u8>)>,
}

impl Recipe {
    fn read(dir: &Path) -> Result<Recipe> {
        let configure_path = dir.join(CONFIGURE_ARGS);
        let configure_bytes = fs::read(&configure_path)
            .with_context(|| format!("cannot read {}", configure_path.display()))?;
        let configure_args = parse_args(
            &String::from_utf8(configure_bytes.clone())
                .with_context(|| format!("{} is not UTF-8", configure_path.display()))?,
        )
        .with_context(|| format!("{}", configure_path.display()))?;
        let devices_name = DEVICES.trim_end_matches(".mak").to_owned();
        let wanted = format!("--with-devices-x86_64={devices_name}");
        ensure!(
            configure_args.contains(&wanted),
            "{}: no `{wanted}` line, so {DEVICES} would not be used",
            configure_path.display()
        );
        ensure!(
            !configure_args.iter().any(|a| a.starts_with("--python=")),
            "{}: no `--python=` line: the build passes its own venv's interpreter",
            configure_path.display()
        );
        let devices_path = dir.join(DEVICES);
        let devices = fs::read(&devices_path)
            .with_context(|| format!("cannot read {}", devices_path.display()))?;
        let python_path = dir.join(PYTHON_REQUIREMENTS);
        let python_requirements = fs::read(&python_path)
            .with_context(|| format!("cannot read {}", python_path.display()))?;
        let patches = recipe_patches(dir)?;
        Ok(Recipe {
            configure_args,
            configure_bytes,
            devices,
            devices_name,
            python_requirements,
            patches,
        })
    }

    /// The requirement specifiers of `python-requirements.txt` (`meson==1.5.0`, ...), for
    /// `build-info`.
    fn python_pins(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.python_requirements)
            .lines()
            .filter(|l| !l.starts_with([' ', '\t', '#']))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }
}

/// Everything the hash covers except the source version, which [`Inputs::hash`] takes.
struct Inputs {
    recipe: Recipe,
    /// `linked=<pkg> <version>` lines for [`LINKED_PKGS`].
    linked: String,
}

impl Inputs {
    fn read() -> Result<Inputs> {
        let recipe = Recipe::read(&project_root().join(RECIPE_DIR))?;
        let mut linked = String::new();
        for pkg in LINKED_PKGS {
            linked.push_str(&format!("linked={pkg} {}\n", deps::version(pkg)?));
        }
        Ok(Inputs { recipe, linked })
    }

    /// The start of `build-info`, and of the hashed input.
    fn header(&self, version: &str) -> String {
        format!(
            "openshell-qemu recipe={RECIPE_VERSION}\nsource={SOURCE_PKG} {version}\n{}",
            self.linked
        )
    }

    /// The build's directory name for source version `version`.
    fn hash(&self, version: &str) -> Result<String> {
        let r = &self.recipe;
        let mut input = self.header(version).into_bytes();
        for (name, bytes) in [
            (CONFIGURE_ARGS, &r.configure_bytes),
            (DEVICES, &r.devices),
            (PYTHON_REQUIREMENTS, &r.python_requirements),
        ]
        .into_iter()
        .chain(r.patches.iter().map(|(n, _, b)| (n.as_str(), b)))
        {
            input.extend_from_slice(format!("\n--- {name} ({} bytes)\n", bytes.len()).as_bytes());
            input.extend_from_slice(bytes);
        }
        sha256_hex(&input)
    }
}

/// The flags of a `configure.args` text: one per line, `#` comments and blank lines skipped.
/// A line with whitespace inside is refused (it would be one argument, which is rarely meant).
fn parse_args(text: &str) -> Result<Vec<String>> {
    let mut args = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        ensure!(
            !line.contains(char::is_whitespace),
            "line {}: {line:?}: one flag per line, without spaces",
            i + 1
        );
        ensure!(
            line.starts_with("--"),
            "line {}: {line:?}: expected a `--flag`",
            i + 1
        );
        args.push(line.to_owned());
    }
    ensure!(!args.is_empty(), "no flags");
    Ok(args)
}

/// Builds (or finds cached) `qemu/<hash>/qemu-system-x86_64` and points `qemu/current` at it.
pub fn build(root: &Path, force: bool) -> Result<()> {
    let inputs = Inputs::read()?;
    deps::version(FIRMWARE_PKG)?;
    let base = root.join("qemu");
    if !force {
        if let Some((hash, version)) = existing_build(&base, &inputs)? {
            println!(
                "guest: qemu: cached: {} ({SOURCE_PKG} {version}; found offline, --force looks \
                 up the newest {SOURCE_SERIES}x and rebuilds)",
                base.join(&hash).join(BINARY).display()
            );
            return set_current(&base, &hash);
        }
    }

    // 1. Which source: the newest of the series, through a private apt configuration.
    fs::create_dir_all(&base).with_context(|| format!("cannot create {}", base.display()))?;
    let lookup_dir = base.join(format!(".lookup-{}", std::process::id()));
    if lookup_dir.exists() {
        fs::remove_dir_all(&lookup_dir)?;
    }
    fs::create_dir_all(&lookup_dir)?;
    let lookup_cleanup = RemoveOnDrop(lookup_dir.clone());
    let lookup_log_path = lookup_dir.join("lookup.log");
    let lookup_log = fs::File::create(&lookup_log_path)?;
    let lookup_apt = lookup_dir.join("apt");
    let (entries, backports) = write_apt_sources(&lookup_apt)?;
    println!(
        "guest: qemu: {entries} deb-src entries from the machine's deb entries ({}) in {}",
        if backports {
            format!("{} included", BACKPORTS.1)
        } else {
            format!("no {} entry to add {} to", BACKPORTS.0, BACKPORTS.1)
        },
        lookup_apt.display()
    );
    step_in(
        "qemu",
        "apt-get update (deb-src only)",
        &mut apt("apt-get", &lookup_apt, &["update"]),
        &lookup_log,
        &lookup_log_path,
    )?;
    let showsrc = capture(
        &mut apt(
            "apt-cache",
            &lookup_apt,
            &["showsrc", "--only-source", SOURCE_PKG],
        ),
        &lookup_log,
    )?;
    let Some(version) = newest_in_series(&showsrc, SOURCE_PKG, SOURCE_SERIES) else {
        bail!(
            "no version of Debian's {SOURCE_PKG} source with upstream version \
             {SOURCE_SERIES}x in the private apt configuration's deb-src suites (on Debian 12 it \
             comes from {}, added next to the Debian archive's {}); versions found: {}",
            BACKPORTS.1,
            BACKPORTS.0,
            match versions_of(&showsrc, SOURCE_PKG).join(", ") {
                v if v.is_empty() => "none".to_owned(),
                v => v,
            }
        );
    };
    let hash = inputs.hash(&version)?;
    let dir = base.join(&hash);
    let bin = dir.join(BINARY);
    println!(
        "guest: qemu: {SOURCE_PKG} {version} (the newest {SOURCE_SERIES}x), {RECIPE_DIR}/ -> \
         qemu/{hash}"
    );
    if bin.is_file() && !force {
        println!("guest: qemu: cached: {}", bin.display());
        return set_current(&base, &hash);
    }

    let BuildDir {
        work,
        log,
        log_path,
        cleanup,
    } = BuildDir::fresh("qemu", &dir)?;
    let step = |name: &str, cmd: &mut Command| step_in("qemu", name, cmd, &log, &log_path);
    // The lookup's log and apt lists move into the build tree: one log, no second update.
    (&log).write_all(&fs::read(&lookup_log_path)?)?;
    let apt_dir = work.join("apt");
    fs::rename(&lookup_apt, &apt_dir).with_context(|| {
        format!(
            "cannot move {} to {}",
            lookup_apt.display(),
            apt_dir.display()
        )
    })?;
    drop(lookup_cleanup);

    // 2. The source: Debian's upstream tarball of `V`, which apt checks against the signed
    // index. Only the tarball (see the module docs for why Debian's patch series is left out).
    let src_parent = work.join("src");
    fs::create_dir_all(&src_parent)?;
    let wanted = format!("{SOURCE_PKG}={version}");
    step(
        &format!("apt-get source --tar-only {wanted}"),
        apt("apt-get", &apt_dir, &["source", "--tar-only", &wanted]).current_dir(&src_parent),
    )?;
    let tarball = orig_tarball(&src_parent)?;
    step(
        "unpack",
        Command::new("tar")
            .arg("xf")
            .arg(&tarball)
            .current_dir(&src_parent),
    )?;
    let tarball_name = tarball
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    fs::remove_file(&tarball)?;
    let src = source_tree(&src_parent)?;

    // 3. Our patches and device config.
    for (name, path, _) in &inputs.recipe.patches {
        step(
            &format!("patch {name}"),
            Command::new("patch")
                .args(["-p1", "--batch", "--forward", "-i"])
                .arg(path)
                .current_dir(&src),
        )?;
    }
    let devices_dest = src
        .join("configs/devices/x86_64-softmmu")
        .join(format!("{}.mak", inputs.recipe.devices_name));
    ensure!(
        !devices_dest.exists(),
        "{} already exists in Debian's source; rename {RECIPE_DIR}/{DEVICES}",
        devices_dest.display()
    );
    fs::write(&devices_dest, &inputs.recipe.devices)
        .with_context(|| format!("cannot write {}", devices_dest.display()))?;

    // 4. A venv with configure's Python packages: QEMU 10 needs meson >= 1.5 (Debian 12 has
    // 1.0) and the +ds tarball has none of the wheels upstream's tarball bundles for it.
    let venv = work.join("pyenv");
    step(
        "python3 -m venv",
        Command::new(PYTHON).args(["-m", "venv"]).arg(&venv),
    )?;
    let requirements = work.join(PYTHON_REQUIREMENTS);
    fs::write(&requirements, &inputs.recipe.python_requirements)?;
    step(
        &format!("pip install {}", inputs.recipe.python_pins().join(" ")),
        Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--require-hashes",
                "--no-deps",
                "--no-input",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&requirements),
    )?;

    // 5. configure and build the one binary.
    let build_dir = work.join("build");
    fs::create_dir_all(&build_dir)?;
    step(
        "configure",
        Command::new(src.join("configure"))
            .arg(format!("--python={}", venv.join("bin/python3").display()))
            .args(&inputs.recipe.configure_args)
            .current_dir(&build_dir),
    )?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    step(
        &format!("ninja -j{jobs} {BINARY}"),
        Command::new("ninja")
            .arg(format!("-j{jobs}"))
            .arg(BINARY)
            .current_dir(&build_dir),
    )?;

    // 6. Check, strip and install.
    let built = build_dir.join(BINARY);
    let bytes = fs::read(&built).with_context(|| format!("cannot read {}", built.display()))?;
    ensure_static(&bytes).with_context(|| format!("{} is not static", built.display()))?;
    let tmp = dir.join(format!("{BINARY}.tmp"));
    step(
        "strip",
        Command::new("strip").arg("-o").arg(&tmp).arg(&built),
    )?;
    if let Err(e) = verify(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(e.context(format!(
            "{} is not what the qemu engine needs",
            built.display()
        )));
    }
    fs::rename(&tmp, &bin)?;
    let r = &inputs.recipe;
    let info = format!(
        "{}tarball {tarball_name}\nconfigure {}\npython {}\npatches {}\n",
        inputs.header(&version),
        r.configure_args.join(" "),
        r.python_pins().join(" "),
        r.patches
            .iter()
            .map(|(n, _, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    fs::write(dir.join("build-info"), info)?;
    println!(
        "guest: qemu: {} ({:.1} MB, static, {SOURCE_PKG} {version}); removing the build tree",
        bin.display(),
        fs::metadata(&bin)?.len() as f64 / 1e6
    );
    let t = Instant::now();
    drop(cleanup);
    println!(
        "guest: qemu: build tree removed in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    set_current(&base, &hash)
}

/// An existing build of this recipe under `base`: a `<hash>/` with the binary whose `build-info`
/// records a source version in the series for which [`Inputs::hash`] gives `<hash>`. The one
/// `current` points at wins, then the newest version. Returns the hash and the version.
fn existing_build(base: &Path, inputs: &Inputs) -> Result<Option<(String, String)>> {
    let Ok(dir) = fs::read_dir(base) else {
        return Ok(None);
    };
    let current = fs::read_link(base.join("current"))
        .ok()
        .map(|t| t.to_string_lossy().into_owned());
    let mut found: Vec<(String, String)> = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "current" || !entry.path().join(BINARY).is_file() {
            continue;
        }
        let Ok(info) = fs::read_to_string(entry.path().join("build-info")) else {
            continue;
        };
        let Some(version) = recorded_source(&info) else {
            continue;
        };
        if upstream_version(version).starts_with(SOURCE_SERIES) && inputs.hash(version)? == name {
            found.push((name, version.to_owned()));
        }
    }
    Ok(found
        .iter()
        .find(|(h, _)| current.as_deref() == Some(h))
        .or_else(|| {
            found
                .iter()
                .max_by(|a, b| compare_debian_versions(&a.1, &b.1))
        })
        .cloned())
}

/// The source version a `build-info` records (its `source=qemu <V>` line).
fn recorded_source(info: &str) -> Option<&str> {
    let prefix = format!("source={SOURCE_PKG} ");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// `program` (`apt-get`, `apt-cache`) with the private apt configuration under `apt_dir`.
fn apt(program: &str, apt_dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    for (key, value) in [
        ("Dir::Etc::SourceList", apt_dir.join("sources.list")),
        ("Dir::Etc::SourceParts", apt_dir.join("sources.list.d")),
        ("Dir::State::Lists", apt_dir.join("lists")),
        ("Dir::Cache", apt_dir.join("cache")),
    ] {
        c.arg("-o").arg(format!("{key}={}", value.display()));
    }
    c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// Runs `cmd`, appends its output to `log`, and returns its stdout; fails with its stderr.
fn capture(cmd: &mut Command, mut log: &fs::File) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{shown}`"))?;
    writeln!(log, "\n### $ {shown}")?;
    log.write_all(&out.stdout)?;
    log.write_all(&out.stderr)?;
    ensure!(
        out.status.success(),
        "`{shown}` failed: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The versions of source package `pkg` in `apt-cache showsrc` output (stanzas of `Package:`,
/// `Version:`, ... fields), in the order listed.
fn versions_of(showsrc: &str, pkg: &str) -> Vec<String> {
    let mut versions: Vec<String> = Vec::new();
    for stanza in showsrc.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        if let (Some(p), Some(v)) = (field("Package:"), field("Version:")) {
            if p == pkg && !versions.iter().any(|have| have == v) {
                versions.push(v.to_owned());
            }
        }
    }
    versions
}

/// The newest version of source package `pkg` in `apt-cache showsrc` output whose upstream
/// version starts with `series`.
fn newest_in_series(showsrc: &str, pkg: &str, series: &str) -> Option<String> {
    versions_of(showsrc, pkg)
        .into_iter()
        .filter(|v| upstream_version(v).starts_with(series))
        .max_by(|a, b| compare_debian_versions(a, b))
}

/// The upstream part of a Debian version: without the epoch (`1:`) and the revision (`-2`).
fn upstream_version(version: &str) -> &str {
    let v = version.split_once(':').map_or(version, |(_, v)| v);
    v.rsplit_once('-').map_or(v, |(u, _)| u)
}

/// Debian's version order (dpkg's `verrevcmp`): the epoch numerically, then the upstream version
/// and the revision, each compared in alternating runs of non-digits (where `~` sorts before
/// everything, even the end, and letters before other characters) and of digits (numerically).
fn compare_debian_versions(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, rest)) => (e.parse().unwrap_or(0), rest),
            None => (0, v),
        };
        let (upstream, revision) = rest.rsplit_once('-').unwrap_or((rest, ""));
        (epoch, upstream, revision)
    }
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(b'~') => -1,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(c),
            Some(c) => i32::from(c) + 256,
        }
    }
    fn verrevcmp(a: &[u8], b: &[u8]) -> Ordering {
        let (mut i, mut j) = (0, 0);
        let digit = |s: &[u8], k: usize| s.get(k).is_some_and(u8::is_ascii_digit);
        while i < a.len() || j < b.len() {
            while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
                let (ac, bc) = (order(a.get(i).copied()), order(b.get(j).copied()));
                if ac != bc {
                    return ac.cmp(&bc);
                }
                i += 1;
                j += 1;
            }
            while a.get(i) == Some(&b'0') {
                i += 1;
            }
            while b.get(j) == Some(&b'0') {
                j += 1;
            }
            let mut first_diff = Ordering::Equal;
            while digit(a, i) && digit(b, j) {
                if first_diff == Ordering::Equal {
                    first_diff = a[i].cmp(&b[j]);
                }
                i += 1;
                j += 1;
            }
            if digit(a, i) {
                return Ordering::Greater;
            }
            if digit(b, j) {
                return Ordering::Less;
            }
            if first_diff != Ordering::Equal {
                return first_diff;
            }
        }
        Ordering::Equal
    }
    let (a, b) = (split(a), split(b));
    a.0.cmp(&b.0)
        .then_with(|| verrevcmp(a.1.as_bytes(), b.1.as_bytes()))
        .then_with(|| verrevcmp(a.2.as_bytes(), b.2.as_bytes()))
}

/// Writes `sources.list` and `sources.list.d/` under `apt_dir` with a `deb-src` entry for each
/// `deb` entry of the machine's apt configuration (one-line and deb822 formats), plus the
/// backports suite next to the Debian archive's base suite ([`BACKPORTS`]), and the empty state
/// and cache directories apt expects. Returns the number of entries (a deb822 stanza counts once)
/// and whether the backports suite is among them.
fn write_apt_sources(apt_dir: &Path) -> Result<(usize, bool)> {
    let parts = apt_dir.join("sources.list.d");
    for d in [
        parts.clone(),
        apt_dir.join("lists/partial"),
        apt_dir.join("cache/archives/partial"),
    ] {
        fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let mut one_line: Vec<String> = Vec::new();
    let mut read_list = |path: &Path| -> Result<()> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        for line in deb_src_lines(&text) {
            // The machine may list backports itself: apt warns about an entry given twice.
            if !one_line.contains(&line) {
                one_line.push(line);
            }
        }
        Ok(())
    };
    if Path::new(APT_SOURCE_LIST).is_file() {
        read_list(Path::new(APT_SOURCE_LIST))?;
    }
    let mut names: Vec<PathBuf> = match fs::read_dir(APT_SOURCE_PARTS) {
        Ok(dir) => dir.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    for path in &names {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.ends_with(".list") {
            read_list(path)?;
        }
    }
    let mut count = one_line.len();
    let mut all: String = one_line.iter().map(|l| format!("{l}\n")).collect();
    fs::write(apt_dir.join("sources.list"), &all)?;
    for path in &names {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.ends_with(".sources") {
            let text = fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let (out, n) = deb_src_stanzas(&text);
            if n > 0 {
                fs::write(parts.join(name.as_ref()), &out)?;
                count += n;
                all.push_str(&out);
            }
        }
    }
    ensure!(
        count > 0,
        "no `deb` entries in {APT_SOURCE_LIST} or {APT_SOURCE_PARTS}/: cannot tell which \
         mirror to fetch Debian's {SOURCE_PKG} source from"
    );
    let backports = all.split_whitespace().any(|word| word == BACKPORTS.1);
    Ok((count, backports))
}

/// Whether an apt entry is the Debian archive or a mirror of it: its URI's path ends in
/// `/debian`, and it is signed by the Debian archive keyring or names no key (apt's default
/// keys). Suite names alone do not tell: a third-party repository may call its suite `bookworm`
/// too, and a backports suite it lacks would fail `apt-get update`.
fn is_debian_archive(uri: &str, signed_by: Option<&str>) -> bool {
    uri.trim_end_matches('/').ends_with("/debian")
        && signed_by.is_none_or(|key| key.contains(DEBIAN_KEYRING))
}

/// The `deb-src` lines for the `deb` lines of a one-line-format sources list; a Debian archive
/// line for the base suite ([`BACKPORTS`]) is followed by the same line for backports.
fn deb_src_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim_start().strip_prefix("deb ") else {
            continue;
        };
        let rest = rest.trim();
        out.push(format!("deb-src {rest}"));
        // `[options] uri suite component...`, the options optional.
        let (options, fields) = match rest.strip_prefix('[') {
            Some(r) => match r.split_once(']') {
                Some((o, f)) => (Some(o), f),
                None => continue,
            },
            None => (None, rest),
        };
        let fields: Vec<&str> = fields.split_whitespace().collect();
        let signed_by = options
            .into_iter()
            .flat_map(str::split_whitespace)
            .find_map(|o| o.strip_prefix("signed-by="));
        if let [uri, suite, components @ ..] = fields.as_slice() {
            if *suite == BACKPORTS.0 && is_debian_archive(uri, signed_by) {
                out.push(format!(
                    "deb-src {}{uri} {} {}",
                    options.map_or(String::new(), |o| format!("[{o}] ")),
                    BACKPORTS.1,
                    components.join(" ")
                ));
            }
        }
    }
    out
}

/// The stanzas of a deb822 `.sources` file whose `Types` include `deb`, with `Types: deb-src`
/// (every other field, continuation lines included, kept as written), and a Debian archive
/// stanza's `Suites` extended with backports when it has the base suite ([`BACKPORTS`]).
/// Disabled stanzas are dropped.
fn deb_src_stanzas(text: &str) -> (String, usize) {
    let mut out = String::new();
    let mut n = 0;
    for stanza in text.split("\n\n") {
        let mut is_deb = false;
        let mut enabled = true;
        let mut lines = Vec::new();
        let mut uris: Vec<&str> = Vec::new();
        let mut signed_by = None;
        let mut suites_line = None;
        for line in stanza.lines() {
            if line.trim_start().starts_with('#') {
                continue;
            }
            match line.split_once(':') {
                Some((key, value)) if key.eq_ignore_ascii_case("types") => {
                    is_deb = value.split_whitespace().any(|t| t == "deb");
                    lines.push("Types: deb-src".to_owned());
                }
                Some((key, value)) if key.eq_ignore_ascii_case("enabled") => {
                    enabled = !value.trim().eq_ignore_ascii_case("no");
                    lines.push(line.to_owned());
                }
                Some((key, value)) if key.eq_ignore_ascii_case("uris") => {
                    uris.extend(value.split_whitespace());
                    lines.push(line.to_owned());
                }
                Some((key, value)) if key.eq_ignore_ascii_case("signed-by") => {
                    // An inline key (the value on the next lines) is no keyring path: `Some("")`.
                    signed_by = Some(value.trim());
                    lines.push(line.to_owned());
                }
                Some((key, value)) if key.eq_ignore_ascii_case("suites") => {
                    let suites: Vec<&str> = value.split_whitespace().collect();
                    if suites.contains(&BACKPORTS.0) && !suites.contains(&BACKPORTS.1) {
                        suites_line = Some(lines.len());
                    }
                    lines.push(line.to_owned());
                }
                _ => lines.push(line.to_owned()),
            }
        }
        if !(is_deb && enabled) {
            continue;
        }
        if let Some(i) = suites_line {
            if uris.iter().any(|uri| is_debian_archive(uri, signed_by)) {
                lines[i] = format!("{} {}", lines[i].trim_end(), BACKPORTS.1);
            }
        }
        out.push_str(&lines.join("\n"));
        out.push_str("\n\n");
        n += 1;
    }
    (out, n)
}

/// The one upstream tarball (`<pkg>_<version>.orig.tar.<ext>`) `apt-get source --tar-only` left
/// in `dir`.
fn orig_tarball(dir: &Path) -> Result<PathBuf> {
    let tarballs: Vec<PathBuf> = fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".orig.tar."))
        })
        .collect();
    match tarballs.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one *.orig.tar.* from apt-get source --tar-only in {}, found {tarballs:?}",
            dir.display()
        ),
    }
}

/// The one directory unpacked under `parent` (it holds `configure`).
fn source_tree(parent: &Path) -> Result<PathBuf> {
    let trees: Vec<PathBuf> = fs::read_dir(parent)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("configure").is_file())
        .collect();
    match trees.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "the tarball left no source tree with a `configure` in {}",
            parent.display()
        ),
        _ => bail!("several source trees in {}: {trees:?}", parent.display()),
    }
}

/// How long one check may take (the migration check starts a machine-less QEMU).
const CHECK_TIMEOUT_SECS: u32 = 20;

/// Runs the binary for each of [`MUST_OFFER`] and fails naming the first thing it lacks.
fn verify(bin: &Path) -> Result<()> {
    let t = Instant::now();
    for (args, stdin, needle) in MUST_OFFER {
        // Through coreutils' `timeout`, so a check that waits on its input cannot hang the build.
        let mut child = Command::new("timeout")
            .arg(CHECK_TIMEOUT_SECS.to_string())
            .arg(bin)
            .args(*args)
            .stdin(if stdin.is_empty() {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        if let Some(mut input) = child.stdin.take() {
            input.write_all(stdin.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && stdout.lines().any(|l| l.contains(needle)),
            "`{BINARY} {}` ({}) does not offer {needle:?}: check {RECIPE_DIR}/{CONFIGURE_ARGS}, \
             {RECIPE_DIR}/{DEVICES} and the source version{}",
            args.join(" "),
            out.status,
            match String::from_utf8_lossy(&out.stderr).trim() {
                "" => String::new(),
                err => format!(" (stderr: {err})"),
            }
        );
    }
    println!(
        "guest: qemu: offers microvm, tcg, kvm, vhost-user-fs/vsock, isa-serial, memfd, \
         -sandbox, QEMU {SOURCE_SERIES}x, migration with mapped-ram and mode=cpr-reboot \
         ({} checks in {:.2}s)",
        MUST_OFFER.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configure_args_one_flag_per_line() {
        let args = parse_args("# c\n--a=1\n\n  --b  # why\n").unwrap();
        assert_eq!(args, vec!["--a=1", "--b"]);
        let err = parse_args("--a\n--b c\n").unwrap_err().to_string();
        assert_eq!(err, "line 2: \"--b c\": one flag per line, without spaces");
        assert!(parse_args("x\n").is_err());
        assert!(parse_args("# only\n").is_err());
    }

    #[test]
    fn the_repo_recipe_is_well_formed() {
        let recipe = Recipe::read(&project_root().join(RECIPE_DIR)).unwrap();
        assert!(recipe
            .configure_args
            .contains(&"--target-list=x86_64-softmmu".to_owned()));
        assert_eq!(recipe.devices_name, "openshell-microvm");
        assert!(!recipe.patches.is_empty());
        assert_eq!(
            recipe.python_pins(),
            vec!["meson==1.5.0".to_owned(), "pycotap==1.3.1".to_owned()]
        );
    }

    #[test]
    fn the_version_check_follows_the_series() {
        assert!(VERSION_LINE.ends_with(&format!(" {SOURCE_SERIES}")));
    }

    #[test]
    fn verify_names_what_a_binary_lacks() {
        let err = verify(Path::new("/bin/true")).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "`qemu-system-x86_64 -M help` (exit status: 0) does not offer \"microvm \""
            ),
            "{err}"
        );
    }

    #[test]
    fn one_line_deb_entries_become_deb_src_with_backports() {
        let out = deb_src_lines(
            "# c\ndeb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
             http://m/debian/ bookworm main contrib\n\
             deb-src http://m/debian bookworm main\n  deb http://s/debian-security bookworm-security main\n\
             deb http://deb.debian.org/debian bookworm main\n\
             deb [signed-by=/etc/apt/keyrings/docker.asc] https://download.docker.com/linux/debian bookworm stable\n",
        );
        assert_eq!(
            out,
            vec![
                "deb-src [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                 http://m/debian/ bookworm main contrib",
                "deb-src [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                 http://m/debian/ bookworm-backports main contrib",
                "deb-src http://s/debian-security bookworm-security main",
                "deb-src http://deb.debian.org/debian bookworm main",
                "deb-src http://deb.debian.org/debian bookworm-backports main",
                "deb-src [signed-by=/etc/apt/keyrings/docker.asc] \
                 https://download.docker.com/linux/debian bookworm stable",
            ]
        );
    }

    #[test]
    fn deb822_stanzas_become_deb_src_with_backports() {
        let text = "Types: deb\n# note\nURIs: http://deb.debian.org/debian\n\
                    Suites: bookworm bookworm-updates\nComponents: main\n\
                    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                    Types: deb\nURIs: http://deb.debian.org/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n\
                    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                    Types: deb\nURIs: https://download.docker.com/linux/debian\nSuites: bookworm\n\
                    Components: stable\nSigned-By: /etc/apt/keyrings/docker.asc\n\n\
                    Types: deb\nURIs: http://m/debian\nSuites: bookworm bookworm-backports\n\
                    Components: main\n\n\
                    Types: deb\nURIs: http://x/\nSuites: x\nComponents: main\nEnabled: no\n\n\
                    Types: deb-src\nURIs: http://y/\nSuites: y\nComponents: main\n";
        let (out, n) = deb_src_stanzas(text);
        assert_eq!(n, 4);
        assert_eq!(
            out,
            "Types: deb-src\nURIs: http://deb.debian.org/debian\n\
             Suites: bookworm bookworm-updates bookworm-backports\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb-src\nURIs: http://deb.debian.org/debian-security\n\
             Suites: bookworm-security\nComponents: main\n\
             Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
             Types: deb-src\nURIs: https://download.docker.com/linux/debian\nSuites: bookworm\n\
             Components: stable\nSigned-By: /etc/apt/keyrings/docker.asc\n\n\
             Types: deb-src\nURIs: http://m/debian\nSuites: bookworm bookworm-backports\n\
             Components: main\n\n"
        );
    }

    #[test]
    fn debian_versions_compare_like_dpkg() {
        use Ordering::*;
        for (a, b, want) in [
            (
                "1:10.0.2+ds-2+deb13u1~bpo12+1",
                "1:10.0.2+ds-2+deb13u1",
                Less,
            ),
            (
                "1:10.0.2+ds-2+deb13u1~bpo12+2",
                "1:10.0.2+ds-2+deb13u1~bpo12+1",
                Greater,
            ),
            ("1:10.0.10+ds-1", "1:10.0.9+ds-1", Greater),
            ("1:7.2+dfsg-7+deb12u7", "1:10.0.2+ds-1", Less),
            ("2:1.0", "1:9.9", Greater),
            ("10.0.2", "1:10.0.2", Less),
            ("1.0~rc1-1", "1.0-1", Less),
            ("1.0a", "1.0+", Less),
            ("1.0", "1.0.0", Less),
            ("1.01-1", "1.1-1", Equal),
            ("1:10.0.2+ds-2", "1:10.0.2+ds-2", Equal),
        ] {
            assert_eq!(compare_debian_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_debian_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn upstream_version_drops_epoch_and_revision() {
        assert_eq!(
            upstream_version("1:10.0.2+ds-2+deb13u1~bpo12+1"),
            "10.0.2+ds"
        );
        assert_eq!(upstream_version("10.0.2"), "10.0.2");
        assert_eq!(upstream_version("1:10.0.2-a-b"), "10.0.2-a");
    }

    #[test]
    fn the_newest_source_of_the_series_is_picked() {
        let showsrc = "Package: qemu\nBinary: qemu-system-x86\nVersion: 1:7.2+dfsg-7+deb12u16\n\
                       Format: 3.0 (quilt)\n\n\
                       Package: qemu\nVersion: 1:10.0.2+ds-2+deb13u1~bpo12+1\n\n\
                       Package: qemu\nVersion: 1:10.0.10+ds-1~bpo12+1\n\n\
                       Package: qemu\nVersion: 1:10.1.0+ds-1~bpo12+1\n\n\
                       Package: qemu-other\nVersion: 1:10.0.99-1\n\n\
                       Package: qemu\nVersion: 1:10.0.2+ds-2+deb13u1~bpo12+1\n";
        assert_eq!(
            newest_in_series(showsrc, "qemu", "10.0."),
            Some("1:10.0.10+ds-1~bpo12+1".to_owned())
        );
        assert_eq!(
            versions_of(showsrc, "qemu"),
            vec![
                "1:7.2+dfsg-7+deb12u16",
                "1:10.0.2+ds-2+deb13u1~bpo12+1",
                "1:10.0.10+ds-1~bpo12+1",
                "1:10.1.0+ds-1~bpo12+1",
            ]
        );
        assert_eq!(newest_in_series(showsrc, "qemu", "11.0."), None);
        assert_eq!(newest_in_series("", "qemu", "10.0."), None);
    }

    #[test]
    fn build_info_records_the_source() {
        let info = "openshell-qemu recipe=2\nsource=qemu 1:10.0.2+ds-2+deb13u1~bpo12+1\n\
                    linked=libc6-dev 2.36-9\n";
        assert_eq!(recorded_source(info), Some("1:10.0.2+ds-2+deb13u1~bpo12+1"));
        assert_eq!(recorded_source("source=qemu \n"), None);
        assert_eq!(recorded_source("openshell-qemu recipe=1\n"), None);
    }
}

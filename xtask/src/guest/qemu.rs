//! The `qemu` part: a minimal, static `qemu-system-x86_64` for the qemu engine, built from
//! Debian's own qemu source package.
//!
//! Debian's `qemu-system-x86_64` links 51 shared libraries and carries every PC device; its
//! `qemu-system-x86_64-microvm` is KVM-only (`--disable-tcg`), so it cannot run on kvm-pvm hosts.
//! Ours has the microvm board, the two vhost-user devices, TCG and KVM, seccomp (`-sandbox on`)
//! and nothing else, linked statically: about 20 MiB less RSS per VM and ~25 ms less from exec to
//! its first connect.
//!
//! Inputs, all under `guest/qemu/` except the source:
//! - the source: `apt-get source qemu=<V>` where `V` is the installed `qemu-system-data`'s
//!   source version (that package ships the `bios-microvm.bin` our QEMU loads), fetched through a
//!   private apt configuration whose `deb-src` entries mirror the machine's `deb` entries, so the
//!   system's apt configuration is never changed;
//! - `*.patch`, applied in name order with `patch -p1`;
//! - `openshell-microvm.mak`, the device config (copied into `configs/devices/x86_64-softmmu/`);
//! - `configure.args`, the configure flags, one per line.
//!
//! The hash covers all of them, the recipe version below and the versions of the Debian `-dev`
//! packages linked in statically (a security update of glib rebuilds QEMU).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use super::{ensure_static, recipe_patches, set_current, sha256_hex, step_in, BuildDir};
use crate::deps;
use crate::util::project_root;

/// The binary's name (the benchmark finds QEMU processes by it).
pub const BINARY: &str = "qemu-system-x86_64";
/// The recipe's directory, relative to the workspace root.
const RECIPE_DIR: &str = "guest/qemu";
/// The configure flags file, in [`RECIPE_DIR`].
const CONFIGURE_ARGS: &str = "configure.args";
/// The device config file, in [`RECIPE_DIR`]; its stem is the `--with-devices-x86_64=` name.
const DEVICES: &str = "openshell-microvm.mak";
/// Debian's source package.
const SOURCE_PKG: &str = "qemu";
/// The installed binary package whose source version is the one we build (it ships the
/// firmware, `/usr/share/qemu/bios-microvm.bin`, that `--firmwarepath` points at).
const VERSION_PKG: &str = "qemu-system-data";
/// Debian packages whose static archives end up in the binary: their versions are in the hash.
const LINKED_PKGS: &[&str] = &[
    "libc6-dev",
    "libglib2.0-dev",
    "libpcre2-dev",
    "libpixman-1-dev",
    "zlib1g-dev",
    "libfdt-dev",
    "libseccomp-dev",
];
/// Bump when the build steps below change in a way that changes the binary.
const RECIPE_VERSION: u32 = 1;
/// Where the machine's apt sources are.
const APT_SOURCE_LIST: &str = "/etc/apt/sources.list";
const APT_SOURCE_PARTS: &str = "/etc/apt/sources.list.d";

/// What the built binary must offer: arguments, and a line its output must contain.
const MUST_OFFER: &[(&[&str], &str)] = &[
    (&["-M", "help"], "microvm "),
    (&["-accel", "help"], "tcg"),
    (&["-accel", "help"], "kvm"),
    (&["-device", "help"], "name \"vhost-user-fs-device\""),
    (&["-device", "help"], "name \"vhost-user-vsock-device\""),
    (&["-device", "help"], "name \"isa-serial\""),
    (&["-object", "help"], "memory-backend-memfd"),
    // Parsed before -version exits: fails when seccomp support is not built in.
    (&["-sandbox", "on", "-version"], "QEMU emulator version"),
];

/// The recipe files, read once.
struct Recipe {
    configure_args: Vec<String>,
    configure_bytes: Vec<u8>,
    devices: Vec<u8>,
    devices_name: String,
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
        let devices_path = dir.join(DEVICES);
        let devices = fs::read(&devices_path)
            .with_context(|| format!("cannot read {}", devices_path.display()))?;
        let patches = recipe_patches(dir)?;
        Ok(Recipe {
            configure_args,
            configure_bytes,
            devices,
            devices_name,
            patches,
        })
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
    let recipe_dir = project_root().join(RECIPE_DIR);
    let recipe = Recipe::read(&recipe_dir)?;
    let version = deps::source_version(VERSION_PKG)?;
    let mut header =
        format!("openshell-qemu recipe={RECIPE_VERSION}\nsource={SOURCE_PKG} {version}\n");
    for pkg in LINKED_PKGS {
        header.push_str(&format!("linked={pkg} {}\n", deps::version(pkg)?));
    }
    let mut input = header.clone().into_bytes();
    for (name, bytes) in [
        (CONFIGURE_ARGS, &recipe.configure_bytes),
        (DEVICES, &recipe.devices),
    ]
    .into_iter()
    .chain(recipe.patches.iter().map(|(n, _, b)| (n.as_str(), b)))
    {
        input.extend_from_slice(format!("\n--- {name} ({} bytes)\n", bytes.len()).as_bytes());
        input.extend_from_slice(bytes);
    }
    let hash = sha256_hex(&input)?;
    let base = root.join("qemu");
    let dir = base.join(&hash);
    let bin = dir.join(BINARY);
    println!(
        "guest: qemu: {SOURCE_PKG} {version} (the version of {VERSION_PKG}), {RECIPE_DIR}/ -> qemu/{hash}"
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

    // 1. The source, through a private apt configuration.
    let apt_dir = work.join("apt");
    let entries = write_apt_sources(&apt_dir)?;
    println!(
        "guest: qemu: {entries} deb-src entries (from the machine's deb entries) in {}",
        apt_dir.display()
    );
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
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
    };
    step("apt-get update (deb-src only)", &mut apt(&["update"]))?;
    let src_parent = work.join("src");
    fs::create_dir_all(&src_parent)?;
    let wanted = format!("{SOURCE_PKG}={version}");
    step(
        &format!("apt-get source {wanted}"),
        apt(&["source", &wanted]).current_dir(&src_parent),
    )
    .with_context(|| {
        format!(
            "cannot fetch the source of {SOURCE_PKG} {version}; if the mirror no longer has it, \
             upgrade {VERSION_PKG} (`apt-get install --only-upgrade {VERSION_PKG}`) and retry"
        )
    })?;
    let src = source_tree(&src_parent)?;

    // 2. Our patches and device config.
    for (name, path, _) in &recipe.patches {
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
        .join(format!("{}.mak", recipe.devices_name));
    ensure!(
        !devices_dest.exists(),
        "{} already exists in Debian's source; rename {RECIPE_DIR}/{DEVICES}",
        devices_dest.display()
    );
    fs::write(&devices_dest, &recipe.devices)
        .with_context(|| format!("cannot write {}", devices_dest.display()))?;

    // 3. configure and build the one binary.
    let build_dir = work.join("build");
    fs::create_dir_all(&build_dir)?;
    step(
        "configure",
        Command::new(src.join("configure"))
            .args(&recipe.configure_args)
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

    // 4. Check, strip and install.
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
    let info = format!(
        "{header}configure {}\npatches {}\n",
        recipe.configure_args.join(" "),
        recipe
            .patches
            .iter()
            .map(|(n, _, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    );
    fs::write(dir.join("build-info"), info)?;
    println!(
        "guest: qemu: {} ({:.1} MB, static); removing the build tree",
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

/// Writes `sources.list` and `sources.list.d/` under `apt_dir` with a `deb-src` entry for each
/// `deb` entry of the machine's apt configuration (one-line and deb822 formats), and the empty
/// state and cache directories apt expects. Returns the number of entries.
fn write_apt_sources(apt_dir: &Path) -> Result<usize> {
    let parts = apt_dir.join("sources.list.d");
    for d in [
        parts.clone(),
        apt_dir.join("lists/partial"),
        apt_dir.join("cache/archives/partial"),
    ] {
        fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let mut count = 0;
    let mut one_line = String::new();
    let mut read_list = |path: &Path| -> Result<()> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let (out, n) = deb_src_lines(&text);
        one_line.push_str(&out);
        count += n;
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
    fs::write(apt_dir.join("sources.list"), one_line)?;
    for path in &names {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.ends_with(".sources") {
            let text = fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let (out, n) = deb_src_stanzas(&text);
            if n > 0 {
                fs::write(parts.join(name.as_ref()), out)?;
                count += n;
            }
        }
    }
    ensure!(
        count > 0,
        "no `deb` entries in {APT_SOURCE_LIST} or {APT_SOURCE_PARTS}/: cannot tell which \
         mirror to fetch Debian's {SOURCE_PKG} source from"
    );
    Ok(count)
}

/// The `deb-src` lines for the `deb` lines of a one-line-format sources list.
fn deb_src_lines(text: &str) -> (String, usize) {
    let mut out = String::new();
    let mut n = 0;
    for line in text.lines() {
        if let Some(rest) = line.trim_start().strip_prefix("deb ") {
            out.push_str(&format!("deb-src {rest}\n"));
            n += 1;
        }
    }
    (out, n)
}

/// The stanzas of a deb822 `.sources` file whose `Types` include `deb`, with `Types: deb-src`
/// (every other field, continuation lines included, kept as written). Disabled stanzas are
/// dropped.
fn deb_src_stanzas(text: &str) -> (String, usize) {
    let mut out = String::new();
    let mut n = 0;
    for stanza in text.split("\n\n") {
        let mut is_deb = false;
        let mut enabled = true;
        let mut lines = Vec::new();
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
                _ => lines.push(line.to_owned()),
            }
        }
        if is_deb && enabled {
            out.push_str(&lines.join("\n"));
            out.push_str("\n\n");
            n += 1;
        }
    }
    (out, n)
}

/// The one directory `apt-get source` unpacked under `parent` (it holds `configure`).
fn source_tree(parent: &Path) -> Result<PathBuf> {
    let trees: Vec<PathBuf> = fs::read_dir(parent)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("configure").is_file())
        .collect();
    match trees.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "apt-get source left no source tree with a `configure` in {}",
            parent.display()
        ),
        _ => bail!(
            "apt-get source left several source trees in {}: {trees:?}",
            parent.display()
        ),
    }
}

/// Runs the binary for each of [`MUST_OFFER`] and fails naming the first thing it lacks.
fn verify(bin: &Path) -> Result<()> {
    let t = Instant::now();
    for (args, needle) in MUST_OFFER {
        let out = Command::new(bin)
            .args(*args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && stdout.lines().any(|l| l.contains(needle)),
            "`{BINARY} {}` ({}) does not offer {needle:?}: check {RECIPE_DIR}/{CONFIGURE_ARGS} \
             and {RECIPE_DIR}/{DEVICES}{}",
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
         -sandbox ({} checks in {:.2}s)",
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
    fn one_line_deb_entries_become_deb_src() {
        let (out, n) = deb_src_lines(
            "# c\ndeb [signed-by=/k.gpg] http://m/debian bookworm main\n\
             deb-src http://m/debian bookworm main\n  deb http://s/ bookworm-security main\n",
        );
        assert_eq!(n, 2);
        assert_eq!(
            out,
            "deb-src [signed-by=/k.gpg] http://m/debian bookworm main\n\
             deb-src http://s/ bookworm-security main\n"
        );
    }

    #[test]
    fn deb822_stanzas_become_deb_src() {
        let text = "Types: deb\n# note\nURIs: http://m/debian\nSuites: bookworm bookworm-updates\n\
                    Components: main\nSigned-By: /k.gpg\n\n\
                    Types: deb\nURIs: http://x/\nSuites: x\nComponents: main\nEnabled: no\n\n\
                    Types: deb-src\nURIs: http://y/\nSuites: y\nComponents: main\n";
        let (out, n) = deb_src_stanzas(text);
        assert_eq!(n, 1);
        assert_eq!(
            out,
            "Types: deb-src\nURIs: http://m/debian\nSuites: bookworm bookworm-updates\n\
             Components: main\nSigned-By: /k.gpg\n\n"
        );
    }
}

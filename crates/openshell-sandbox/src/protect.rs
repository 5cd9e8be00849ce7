//! The files the supervisor owns stay out of the workload's reach.
//!
//! The supervisor reads `--policy` (and reloads it live), `--ssh-authorized-keys` and
//! `--ssh-host-key`, and appends to `--log-file` and `--audit-log`, as root. A workload that can
//! write one of them could grant itself egress (the policy's live reload takes ~50 ms), log in,
//! impersonate the server, or make root write where it chooses. So before anything starts
//! (logging included, so the refusal reaches stderr) every such file is checked against the
//! host paths the workload may write:
//!
//! - `filesystem_policy.read_write`, except `/tmp` itself under `tmp: private` (the default),
//!   where the sandbox's `/tmp` is a tmpfs of its own and the host's is out of reach;
//! - the workdir when `include_workdir` is true (never `/`, which the runtime does not make
//!   writable).
//!
//! With `--rootfs` or `--image` the policy's paths (and the workdir) are paths inside the image
//! tree, which is never modified, so nothing on the host is writable by the workload.
//!
//! Paths are compared resolved and component by component: the file's directory canonicalized
//! (its name not followed), and, when the name is a symlink, its target too; each policy path
//! canonicalized as far as it exists. A symlink on either side cannot hide an overlap. The same
//! directory reached through another mount (a bind mount) is caught by device and inode. A file
//! with more than one hard link is refused: another of its names could be writable.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use openshell_policy::{Policy, TmpMode};

use crate::cli::RunArgs;

/// Why a supervisor-owned file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error(
        "{flag} {}: the workload may write it: {} lies under {}, which {why} makes writable; \
         keep the files the supervisor reads and writes outside the sandbox's writable paths",
        file.display(), resolved.display(), writable.display()
    )]
    Writable {
        flag: &'static str,
        file: PathBuf,
        resolved: PathBuf,
        writable: PathBuf,
        why: String,
    },
    #[error(
        "{flag} {}: the workload may write it: {} is {} (the same device and inode: a bind \
         mount or another path to it), which {why} makes writable; keep the files the supervisor \
         reads and writes outside the sandbox's writable paths",
        file.display(), alias.display(), writable.display()
    )]
    SameDirectory {
        flag: &'static str,
        file: PathBuf,
        alias: PathBuf,
        writable: PathBuf,
        why: String,
    },
    #[error(
        "{flag} {}: it has {links} hard links, and another of its names may be writable by the \
         workload; use a file with a single link",
        file.display()
    )]
    HardLinks {
        flag: &'static str,
        file: PathBuf,
        links: u64,
    },
    #[error(
        "{flag} {}: the sandbox can see it: {} lies under {}, which {why} shows in the sandbox; \
         keep credential files outside every path the policy lists",
        file.display(), resolved.display(), visible.display()
    )]
    Visible {
        flag: String,
        file: PathBuf,
        resolved: PathBuf,
        visible: PathBuf,
        why: String,
    },
    #[error("{flag} {}: not a file name", file.display())]
    NotAFile { flag: &'static str, file: PathBuf },
    #[error("{flag} {}: resolving {}", file.display(), path.display())]
    Resolve {
        flag: &'static str,
        file: PathBuf,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("resolving {what} {}", path.display())]
    ResolveWritable {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A host path the workload may write, resolved, and the policy setting that makes it so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writable {
    pub path: PathBuf,
    pub why: String,
}

/// The files of this run the supervisor owns, with the flag that names each.
pub fn owned_files(run: &RunArgs) -> Vec<(&'static str, PathBuf)> {
    let mut files = Vec::new();
    let mut add = |flag, path: &Option<PathBuf>| {
        if let Some(p) = path {
            files.push((flag, p.clone()));
        }
    };
    add("--policy", &run.policy);
    add("--log-file", &run.log_file);
    add("--audit-log", &run.audit_log);
    add("--ssh-authorized-keys", &run.ssh_authorized_keys);
    for ca in &run.upstream_ca {
        files.push(("--upstream-ca", ca.clone()));
    }
    match (&run.ssh_host_key, run.ssh_listen) {
        (Some(p), _) => files.push(("--ssh-host-key", p.clone())),
        (None, Some(_)) => files.push((
            "--ssh-host-key (default)",
            openshell_ssh::default_host_key_path(),
        )),
        (None, None) => {}
    }
    files
}

/// The host paths the workload may write under `policy`. `host_workdir` is the workdir on the
/// host, or `None` with `--rootfs`/`--image`: the policy's paths (and the workdir) are then
/// inside the image tree, and nothing on the host is writable by the workload.
pub fn writable_paths(
    policy: &Policy,
    host_workdir: Option<&Path>,
) -> Result<Vec<Writable>, ProtectError> {
    let Some(workdir) = host_workdir else {
        return Ok(Vec::new());
    };
    let fs = &policy.filesystem;
    let mut out = Vec::new();
    for (i, p) in fs.read_write.iter().enumerate() {
        let why = if p.as_str() == "/tmp" {
            match fs.tmp {
                // The sandbox's /tmp is its own tmpfs: the host's /tmp is out of reach.
                TmpMode::Private => continue,
                TmpMode::Host => {
                    format!(
                        "filesystem_policy.read_write[{i}] ({p}, with filesystem_policy.tmp: host)"
                    )
                }
            }
        } else {
            format!("filesystem_policy.read_write[{i}] ({p})")
        };
        let path = resolve(p.as_path()).map_err(|source| ProtectError::ResolveWritable {
            what: format!("filesystem_policy.read_write[{i}]"),
            path: p.as_path().to_owned(),
            source,
        })?;
        out.push(Writable { path, why });
    }
    if fs.include_workdir {
        let path = resolve(workdir).map_err(|source| ProtectError::ResolveWritable {
            what: "the workdir".to_owned(),
            path: workdir.to_owned(),
            source,
        })?;
        // `/` is never made writable, not even as the workdir.
        if path != Path::new("/") {
            out.push(Writable {
                path,
                why: format!(
                    "the workdir ({}, filesystem_policy.include_workdir: true)",
                    workdir.display()
                ),
            });
        }
    }
    Ok(out)
}

/// The host paths the sandbox shows (read_only and read_write, the workdir with
/// `include_workdir`, the host's `/tmp` with `tmp: host`), with the setting that shows each;
/// none with `--rootfs`/`--image` (`host_workdir` is `None`).
pub fn visible_paths(
    policy: &Policy,
    host_workdir: Option<&Path>,
) -> Result<Vec<Writable>, ProtectError> {
    let Some(workdir) = host_workdir else {
        return Ok(Vec::new());
    };
    let fs = &policy.filesystem;
    let mut out = Vec::new();
    let lists = [("read_only", &fs.read_only), ("read_write", &fs.read_write)];
    for (list, paths) in lists {
        for (i, p) in paths.iter().enumerate() {
            if p.as_str() == "/tmp" && fs.tmp == TmpMode::Private {
                continue;
            }
            let path = resolve(p.as_path()).map_err(|source| ProtectError::ResolveWritable {
                what: format!("filesystem_policy.{list}[{i}]"),
                path: p.as_path().to_owned(),
                source,
            })?;
            out.push(Writable {
                path,
                why: format!("filesystem_policy.{list}[{i}] ({p})"),
            });
        }
    }
    if fs.include_workdir {
        let path = resolve(workdir).map_err(|source| ProtectError::ResolveWritable {
            what: "the workdir".to_owned(),
            path: workdir.to_owned(),
            source,
        })?;
        out.push(Writable {
            path,
            why: format!(
                "the workdir ({}, filesystem_policy.include_workdir: true)",
                workdir.display()
            ),
        });
    }
    Ok(out)
}

/// Refuse a credential file (`credentials.NAME.from_file`) the sandbox could see at all:
/// under a path of `visible`, through a symlink or a bind mount, or with a second hard link.
pub fn check_secret(name: &str, file: &Path, visible: &[Writable]) -> Result<(), ProtectError> {
    let ids: HashMap<(u64, u64), &Writable> = visible
        .iter()
        .filter_map(|w| {
            std::fs::metadata(&w.path)
                .ok()
                .map(|m| ((m.dev(), m.ino()), w))
        })
        .collect();
    let flag = format!("credentials.{name}.from_file");
    match check_one("credentials.from_file", file, visible, &ids) {
        Ok(()) => Ok(()),
        Err(ProtectError::Writable {
            file,
            resolved,
            writable,
            why,
            ..
        }) => Err(ProtectError::Visible {
            flag,
            file,
            resolved,
            visible: writable,
            why,
        }),
        Err(ProtectError::SameDirectory {
            file,
            alias,
            writable,
            why,
            ..
        }) => Err(ProtectError::Visible {
            flag,
            file,
            resolved: alias,
            visible: writable,
            why,
        }),
        Err(other) => Err(other),
    }
}

/// Refuse the first of `files` the workload could write (see the module documentation).
pub fn check(files: &[(&'static str, PathBuf)], writable: &[Writable]) -> Result<(), ProtectError> {
    // The writable directories (and files) that exist, by device and inode.
    let ids: HashMap<(u64, u64), &Writable> = writable
        .iter()
        .filter_map(|w| {
            std::fs::metadata(&w.path)
                .ok()
                .map(|m| ((m.dev(), m.ino()), w))
        })
        .collect();
    for (flag, file) in files {
        check_one(flag, file, writable, &ids)?;
    }
    Ok(())
}

fn check_one(
    flag: &'static str,
    file: &Path,
    writable: &[Writable],
    ids: &HashMap<(u64, u64), &Writable>,
) -> Result<(), ProtectError> {
    let resolve_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ProtectError::Resolve {
            flag,
            file: file.to_owned(),
            path,
            source,
        }
    };
    let abs = std::path::absolute(file).map_err(resolve_err(file))?;
    let (Some(parent), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Err(ProtectError::NotAFile {
            flag,
            file: file.to_owned(),
        });
    };
    // The name as given, in its resolved directory; then, if it is a symlink, where it leads
    // (what a reader that follows it would read).
    let named = resolve(parent).map_err(resolve_err(parent))?.join(name);
    let mut candidates = vec![named.clone()];
    let meta = match std::fs::symlink_metadata(&named) {
        Ok(m) => Some(m),
        Err(e) if gone(&e) => None,
        Err(e) => return Err(resolve_err(&named)(e)),
    };
    if meta.as_ref().is_some_and(std::fs::Metadata::is_symlink) {
        candidates.push(resolve(&named).map_err(resolve_err(&named))?);
    }
    for candidate in &candidates {
        if let Some(w) = writable.iter().find(|w| candidate.starts_with(&w.path)) {
            return Err(ProtectError::Writable {
                flag,
                file: file.to_owned(),
                resolved: candidate.clone(),
                writable: w.path.clone(),
                why: w.why.clone(),
            });
        }
        // A bind mount shows a directory under another path: compare identities of the file
        // and each of its directories.
        for alias in candidate.ancestors() {
            let Ok(m) = std::fs::metadata(alias) else {
                continue;
            };
            if let Some(w) = ids.get(&(m.dev(), m.ino())) {
                return Err(ProtectError::SameDirectory {
                    flag,
                    file: file.to_owned(),
                    alias: alias.to_owned(),
                    writable: w.path.clone(),
                    why: w.why.clone(),
                });
            }
        }
    }
    // The file itself (followed): a second hard link could sit anywhere, writable.
    if let Ok(m) = std::fs::metadata(&named) {
        if m.is_file() && m.nlink() > 1 {
            return Err(ProtectError::HardLinks {
                flag,
                file: file.to_owned(),
                links: m.nlink(),
            });
        }
    }
    Ok(())
}

/// A path that does not exist (or cannot, because a component is not a directory).
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

/// `path` made absolute with every symlink of its existing part resolved; the part that does
/// not exist yet is appended lexically (`.` dropped, `..` taking off the last component).
fn resolve(path: &Path) -> io::Result<PathBuf> {
    let abs = std::path::absolute(path)?;
    let mut missing = Vec::new();
    let mut existing: &Path = &abs;
    let mut resolved = loop {
        match std::fs::canonicalize(existing) {
            Ok(p) => break p,
            Err(e) if gone(&e) => match (existing.parent(), existing.components().next_back()) {
                (Some(parent), Some(last)) => {
                    missing.push(last.as_os_str().to_owned());
                    existing = parent;
                }
                // Only `/` has no parent, and `/` exists.
                _ => break PathBuf::from("/"),
            },
            Err(e) => return Err(e),
        }
    };
    for part in missing.iter().rev() {
        for c in Path::new(part).components() {
            match c {
                Component::ParentDir => {
                    resolved.pop();
                }
                Component::Normal(n) => resolved.push(n),
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
            }
        }
    }
    Ok(resolved)
}

/// Open a log the supervisor appends to (`--log-file`): never through a symlink (`O_NOFOLLOW`),
/// a regular file only, created mode 0600, close-on-exec. `O_NONBLOCK` keeps a FIFO planted in
/// its place from blocking the open; it has no effect on a regular file.
pub fn open_append(path: &Path) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_symlink() => io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a symbolic link; it is never followed",
            ),
            // A FIFO without a reader answers ENXIO, a socket ENXIO too.
            Ok(m) if !m.is_file() && !m.is_dir() => not_a_file(),
            _ => e,
        })?;
    if !file.metadata()?.is_file() {
        return Err(not_a_file());
    }
    Ok(file)
}

fn not_a_file() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn policy(extra: &str) -> Policy {
        Policy::from_yaml("test.yaml", &format!("version: 1\n{extra}"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    struct Area {
        _dir: tempfile::TempDir,
        root: PathBuf,
    }

    impl Area {
        fn new() -> Area {
            let dir = tempfile::tempdir().expect("tempdir");
            let root = std::fs::canonicalize(dir.path()).expect("canonical");
            for d in ["work", "data", "safe"] {
                std::fs::create_dir(root.join(d)).expect("mkdir");
            }
            Area { _dir: dir, root }
        }

        fn p(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }

        fn writable(&self, rw: &[&str]) -> Vec<Writable> {
            let list: Vec<String> = rw.iter().map(|r| self.p(r).display().to_string()).collect();
            let text = format!(
                "filesystem_policy:\n  include_workdir: true\n  read_write: [{}]\n",
                list.join(", ")
            );
            writable_paths(&policy(&text), Some(&self.p("work"))).expect("writable paths")
        }

        fn verdict(&self, rw: &[&str], flag: &'static str, file: &Path) -> Result<(), String> {
            check(&[(flag, file.to_owned())], &self.writable(rw)).map_err(|e| e.to_string())
        }
    }

    fn writable_msg(
        flag: &str,
        file: &Path,
        resolved: &Path,
        writable: &Path,
        why: &str,
    ) -> String {
        format!(
            "{flag} {}: the workload may write it: {} lies under {}, which {why} makes writable; \
             keep the files the supervisor reads and writes outside the sandbox's writable paths",
            file.display(),
            resolved.display(),
            writable.display()
        )
    }

    #[test]
    fn a_file_in_the_workdir_or_a_read_write_path_is_refused() {
        let a = Area::new();
        std::fs::write(a.p("work/policy.yaml"), "version: 1\n").expect("write");
        let workdir_why = format!(
            "the workdir ({}, filesystem_policy.include_workdir: true)",
            a.p("work").display()
        );
        let got = [
            a.verdict(&[], "--policy", &a.p("work/policy.yaml")),
            // Not there yet: a log the supervisor would create.
            a.verdict(&["data"], "--audit-log", &a.p("data/sub/audit.jsonl")),
            a.verdict(&["data"], "--log-file", &a.p("safe/../data/log")),
            a.verdict(&["data"], "--log-file", &a.p("safe/log")),
        ];
        let rw_why = format!(
            "filesystem_policy.read_write[0] ({})",
            a.p("data").display()
        );
        let want = [
            Err(writable_msg(
                "--policy",
                &a.p("work/policy.yaml"),
                &a.p("work/policy.yaml"),
                &a.p("work"),
                &workdir_why,
            )),
            Err(writable_msg(
                "--audit-log",
                &a.p("data/sub/audit.jsonl"),
                &a.p("data/sub/audit.jsonl"),
                &a.p("data"),
                &rw_why,
            )),
            Err(writable_msg(
                "--log-file",
                &a.p("safe/../data/log"),
                &a.p("data/log"),
                &a.p("data"),
                &rw_why,
            )),
            Ok(()),
        ];
        assert_eq!(got.to_vec(), want.to_vec());
    }

    #[test]
    fn symlinks_on_either_side_do_not_hide_the_overlap() {
        let a = Area::new();
        std::os::unix::fs::symlink(a.p("data"), a.p("data-link")).expect("symlink");
        std::os::unix::fs::symlink(a.p("data"), a.p("safe/into-data")).expect("symlink");
        std::fs::write(a.p("data/policy.yaml"), "version: 1\n").expect("write");
        // A file whose own name is a symlink into a writable directory.
        std::os::unix::fs::symlink(a.p("data/policy.yaml"), a.p("safe/policy.yaml"))
            .expect("symlink");
        let link_why = format!(
            "filesystem_policy.read_write[0] ({})",
            a.p("data-link").display()
        );
        let data_why = format!(
            "filesystem_policy.read_write[0] ({})",
            a.p("data").display()
        );
        let got = [
            // The policy path is a symlink to the file's directory.
            a.verdict(&["data-link"], "--policy", &a.p("data/policy.yaml")),
            // The file's path goes through a symlink into the writable directory.
            a.verdict(&["data"], "--policy", &a.p("safe/into-data/policy.yaml")),
            a.verdict(&["data"], "--policy", &a.p("safe/policy.yaml")),
        ];
        let want = [
            Err(writable_msg(
                "--policy",
                &a.p("data/policy.yaml"),
                &a.p("data/policy.yaml"),
                &a.p("data"),
                &link_why,
            )),
            Err(writable_msg(
                "--policy",
                &a.p("safe/into-data/policy.yaml"),
                &a.p("data/policy.yaml"),
                &a.p("data"),
                &data_why,
            )),
            Err(writable_msg(
                "--policy",
                &a.p("safe/policy.yaml"),
                &a.p("data/policy.yaml"),
                &a.p("data"),
                &data_why,
            )),
        ];
        assert_eq!(got.to_vec(), want.to_vec());
    }

    #[test]
    fn a_file_with_another_hard_link_is_refused() {
        let a = Area::new();
        std::fs::write(a.p("safe/policy.yaml"), "version: 1\n").expect("write");
        std::fs::hard_link(a.p("safe/policy.yaml"), a.p("data/alias.yaml")).expect("link");
        assert_eq!(
            a.verdict(&[], "--policy", &a.p("safe/policy.yaml")),
            Err(format!(
                "--policy {}: it has 2 hard links, and another of its names may be writable by \
                 the workload; use a file with a single link",
                a.p("safe/policy.yaml").display()
            ))
        );
    }

    #[test]
    fn tmp_counts_only_when_shared_with_the_host_and_never_with_an_image() {
        let work = Path::new("/srv/openshell-test-work");
        let list = |text: &str, workdir: Option<&Path>| {
            writable_paths(&policy(text), workdir).map(|ws| {
                ws.into_iter()
                    .map(|w| (w.path.display().to_string(), w.why))
                    .collect::<Vec<_>>()
            })
        };
        let rw = "filesystem_policy:\n  include_workdir: true\n  read_write: [/tmp, /dev/null]\n";
        let host = "filesystem_policy:\n  read_write: [/tmp]\n  tmp: host\n";
        let root = "filesystem_policy:\n  include_workdir: true\n";
        let got = [
            list(rw, Some(work)).map_err(|e| e.to_string()),
            list(host, Some(work)).map_err(|e| e.to_string()),
            list(rw, None).map_err(|e| e.to_string()),
            list(root, Some(Path::new("/"))).map_err(|e| e.to_string()),
        ];
        let tmp = std::fs::canonicalize("/tmp").expect("/tmp");
        let want = [
            Ok(vec![
                (
                    "/dev/null".to_owned(),
                    "filesystem_policy.read_write[1] (/dev/null)".to_owned(),
                ),
                (
                    work.display().to_string(),
                    format!(
                        "the workdir ({}, filesystem_policy.include_workdir: true)",
                        work.display()
                    ),
                ),
            ]),
            Ok(vec![(
                tmp.display().to_string(),
                "filesystem_policy.read_write[0] (/tmp, with filesystem_policy.tmp: host)"
                    .to_owned(),
            )]),
            // --rootfs / --image: the policy's paths are inside the image tree.
            Ok(vec![]),
            // `/` as the workdir is never writable.
            Ok(vec![]),
        ];
        assert_eq!(got.to_vec(), want.to_vec());
    }

    #[test]
    fn resolve_keeps_the_missing_tail_lexically() {
        let a = Area::new();
        std::os::unix::fs::symlink(a.p("data"), a.p("link")).expect("symlink");
        let got = [
            resolve(&a.p("link/new/./deeper/../file")).map_err(|e| e.to_string()),
            resolve(&a.p("link")).map_err(|e| e.to_string()),
        ];
        let want = [Ok(a.p("data/new/file")), Ok(a.p("data"))];
        assert_eq!(got.to_vec(), want.to_vec());
    }

    #[test]
    fn open_append_refuses_symlinks_and_other_files_and_creates_0600() {
        use std::os::unix::fs::PermissionsExt;
        let a = Area::new();
        std::fs::write(a.p("safe/canary"), "canary\n").expect("write");
        std::os::unix::fs::symlink(a.p("safe/canary"), a.p("safe/log")).expect("symlink");
        nix::unistd::mkfifo(
            &a.p("safe/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .expect("mkfifo");
        let got = [
            open_append(&a.p("safe/log"))
                .map(drop)
                .map_err(|e| e.to_string()),
            open_append(&a.p("safe/fifo"))
                .map(drop)
                .map_err(|e| e.to_string()),
            open_append(&a.p("safe"))
                .map(drop)
                .map_err(|e| e.kind().to_string()),
            open_append(&a.p("safe/new.log"))
                .map(drop)
                .map_err(|e| e.to_string()),
        ];
        let want = [
            Err("is a symbolic link; it is never followed".to_owned()),
            Err("not a regular file".to_owned()),
            Err(io::ErrorKind::IsADirectory.to_string()),
            Ok(()),
        ];
        assert_eq!(got.to_vec(), want.to_vec());
        let mode = std::fs::metadata(a.p("safe/new.log"))
            .expect("created")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(a.p("safe/canary")).expect("canary"),
            "canary\n"
        );
    }
}

//! A sandbox whose root filesystem is a given directory (an unpacked OCI image), on every
//! backend.
//!
//! The directory (`RootFs::lower`) is never modified: each sandbox gets its own writable view,
//! an overlay (the tree as the lower layer, a per-sandbox upper and work directory) or, where
//! overlayfs is unavailable, a per-sandbox copy. The per-sandbox directory is removed when the
//! sandbox ends (process backend: by the namespace holder, also after SIGKILL of the
//! supervisor; vm backend: by the supervisor, or by the next start after a SIGKILL).
//!
//! With a root, every path of the policy (Landlock's read_only / read_write, the workdir) is a
//! path *inside* the tree, and the user is looked up in the tree's `/etc/passwd`.
//!
//! [`merge_image_config`] applies an image's run defaults (Env, WorkingDir, User, Entrypoint,
//! Cmd) under what the caller asked for explicitly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The root filesystem of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootFs {
    /// The unpacked tree (absolute). Read only: it is the overlay's lower layer or the source of
    /// the per-sandbox copy, never written.
    pub lower: PathBuf,
    /// The user to run as when the policy names none (`process.run_as_user` wins), as an image
    /// config spells it: `name`, `uid`, `name:group` or `uid:gid`, resolved in the tree's
    /// `/etc/passwd` and `/etc/group`.
    pub user: Option<String>,
}

/// Errors about a root filesystem or an image's run defaults.
#[derive(Debug, thiserror::Error)]
pub enum RootFsError {
    #[error("root filesystem {0}: must be an absolute path to an existing directory")]
    NotADirectory(PathBuf),
    #[error("root filesystem {0}: the path may not contain ',', ':' or '\\' (overlayfs options)")]
    UnsafePath(PathBuf),
    #[error("root filesystem {root}: reading {path}")]
    Read {
        root: PathBuf,
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("root filesystem {root}: {path}:{line}: {reason}")]
    Parse {
        root: PathBuf,
        path: &'static str,
        line: usize,
        reason: String,
    },
    #[error("image config: {0}")]
    Json(#[source] serde_json::Error),
    #[error("image config: Env[{index}] {entry:?}: expected KEY=VALUE")]
    BadEnv { index: usize, entry: String },
    #[error("image config: WorkingDir {0:?}: expected an absolute path")]
    BadWorkingDir(String),
    #[error("no command given and the image has neither Entrypoint nor Cmd")]
    NoCommand,
}

/// An image's run defaults: the `config` object of an OCI image configuration, as plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    /// `KEY=VALUE` entries.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

#[derive(Deserialize)]
struct OciConfigFile {
    #[serde(default)]
    config: Option<OciRunConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct OciRunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
}

impl ImageDefaults {
    /// Read an OCI image configuration document (`application/vnd.oci.image.config.v1+json`);
    /// only its `config` object matters here, other fields are ignored.
    pub fn from_oci_config_json(text: &str) -> Result<ImageDefaults, RootFsError> {
        let file: OciConfigFile = serde_json::from_str(text).map_err(RootFsError::Json)?;
        let Some(c) = file.config else {
            return Ok(ImageDefaults::default());
        };
        let none_if_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        Ok(ImageDefaults {
            env: c.env.unwrap_or_default(),
            working_dir: none_if_empty(c.working_dir),
            user: none_if_empty(c.user),
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
        })
    }
}

/// What the caller asked for explicitly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunRequest {
    /// The command (program and arguments); empty: the image's Entrypoint and Cmd.
    pub command: Vec<String>,
    /// Explicit environment; wins over the image's Env.
    pub env: BTreeMap<String, String>,
    /// Explicit working directory; wins over the image's WorkingDir.
    pub workdir: Option<PathBuf>,
}

/// The effective run settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergedRun {
    pub program: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The explicit workdir, else the image's WorkingDir, else `/`.
    pub workdir: PathBuf,
    /// The image's User (the policy's `process.run_as_user` still wins; see [`RootFs::user`]).
    pub user: Option<String>,
}

/// Apply an image's run defaults under an explicit request: the command replaces Entrypoint and
/// Cmd (without one, Entrypoint followed by Cmd runs); explicit variables override the image's
/// Env; the explicit workdir wins over WorkingDir.
pub fn merge_image_config(
    image: &ImageDefaults,
    request: RunRequest,
) -> Result<MergedRun, RootFsError> {
    let mut env = BTreeMap::new();
    for (index, entry) in image.env.iter().enumerate() {
        match entry.split_once('=') {
            Some((k, v)) if !k.is_empty() && !entry.contains('\0') => {
                env.insert(k.to_owned(), v.to_owned());
            }
            _ => {
                return Err(RootFsError::BadEnv {
                    index,
                    entry: entry.clone(),
                })
            }
        }
    }
    env.extend(request.env);
    let argv = if request.command.is_empty() {
        image
            .entrypoint
            .iter()
            .chain(image.cmd.iter())
            .cloned()
            .collect()
    } else {
        request.command
    };
    let Some((program, args)) = argv.split_first() else {
        return Err(RootFsError::NoCommand);
    };
    let workdir = match (request.workdir, &image.working_dir) {
        (Some(dir), _) => dir,
        (None, Some(dir)) if dir.starts_with('/') => PathBuf::from(dir),
        (None, Some(dir)) => return Err(RootFsError::BadWorkingDir(dir.clone())),
        (None, None) => PathBuf::from("/"),
    };
    Ok(MergedRun {
        program: program.clone(),
        args: args.to_vec(),
        env,
        workdir,
        user: image.user.clone(),
    })
}

/// `$OPENSHELL_HOME`, else `~/.local/share/openshell`.
pub fn openshell_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("OPENSHELL_HOME") {
        return PathBuf::from(dir);
    }
    let user_home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    user_home.join(".local/share/openshell")
}

/// Check `lower` before anything is built on it.
pub fn validate_lower(lower: &Path) -> Result<(), RootFsError> {
    if !lower.is_absolute() || !lower.is_dir() {
        return Err(RootFsError::NotADirectory(lower.to_owned()));
    }
    let text = lower.as_os_str().as_encoded_bytes();
    if text.iter().any(|b| matches!(b, b',' | b':' | b'\\')) {
        return Err(RootFsError::UnsafePath(lower.to_owned()));
    }
    Ok(())
}

/// One `/etc/passwd` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The colon-separated records of a user database file (`path` inside the tree at `root`),
/// each with at least `fields` fields, and a way to name a bad line.
fn records<'a, T>(
    root: &Path,
    path: &'static str,
    text: &'a str,
    fields: usize,
    mut record: impl FnMut(&[&'a str], &dyn Fn(&str) -> RootFsError) -> Result<T, RootFsError>,
) -> Result<Vec<T>, RootFsError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |reason: &str| RootFsError::Parse {
            root: root.to_owned(),
            path,
            line: i + 1,
            reason: reason.to_owned(),
        };
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < fields {
            return Err(bad(&format!("expected {fields} fields separated by ':'")));
        }
        out.push(record(&f, &bad)?);
    }
    Ok(out)
}

/// Parse `/etc/passwd` text (`name:password:uid:gid:gecos:home:shell`).
pub fn parse_passwd(root: &Path, text: &str) -> Result<Vec<PasswdEntry>, RootFsError> {
    records(root, "/etc/passwd", text, 7, |f, bad| {
        Ok(PasswdEntry {
            name: f[0].to_owned(),
            uid: f[2].parse().map_err(|_| bad("uid is not a number"))?,
            gid: f[3].parse().map_err(|_| bad("gid is not a number"))?,
            home: PathBuf::from(if f[5].is_empty() { "/" } else { f[5] }),
        })
    })
}

/// Parse `/etc/group` text (`name:password:gid:members`) into (name, gid).
pub fn parse_group(root: &Path, text: &str) -> Result<Vec<(String, u32)>, RootFsError> {
    records(root, "/etc/group", text, 3, |f, bad| {
        Ok((
            f[0].to_owned(),
            f[2].parse().map_err(|_| bad("gid is not a number"))?,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn image() -> ImageDefaults {
        ImageDefaults {
            env: vec![
                "PATH=/usr/bin:/bin".into(),
                "A=image".into(),
                "B=image".into(),
            ],
            working_dir: Some("/app".into()),
            user: Some("app".into()),
            entrypoint: vec!["/bin/entry".into(), "--flag".into()],
            cmd: vec!["serve".into()],
        }
    }

    #[test]
    fn image_defaults_apply_under_the_explicit_request() {
        let merged = merge_image_config(
            &image(),
            RunRequest {
                command: vec![],
                env: [("B".to_owned(), "cli".to_owned())].into(),
                workdir: None,
            },
        )
        .expect("merge");
        assert_eq!(
            merged,
            MergedRun {
                program: "/bin/entry".into(),
                args: vec!["--flag".into(), "serve".into()],
                env: [
                    ("A".to_owned(), "image".to_owned()),
                    ("B".to_owned(), "cli".to_owned()),
                    ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
                ]
                .into(),
                workdir: "/app".into(),
                user: Some("app".into()),
            }
        );
    }

    #[test]
    fn an_explicit_command_and_workdir_replace_the_images() {
        let merged = merge_image_config(
            &image(),
            RunRequest {
                command: vec!["sh".into(), "-c".into(), "true".into()],
                env: BTreeMap::new(),
                workdir: Some("/data".into()),
            },
        )
        .expect("merge");
        assert_eq!(
            (merged.program, merged.args, merged.workdir),
            (
                "sh".into(),
                vec!["-c".into(), "true".into()],
                "/data".into()
            )
        );
    }

    #[test]
    fn bad_image_configs_are_clear_errors() {
        let none = ImageDefaults::default();
        assert_eq!(
            merge_image_config(&none, RunRequest::default())
                .unwrap_err()
                .to_string(),
            "no command given and the image has neither Entrypoint nor Cmd"
        );
        let bad_env = ImageDefaults {
            env: vec!["OK=1".into(), "NOEQUALS".into()],
            cmd: vec!["sh".into()],
            ..ImageDefaults::default()
        };
        assert_eq!(
            merge_image_config(&bad_env, RunRequest::default())
                .unwrap_err()
                .to_string(),
            "image config: Env[1] \"NOEQUALS\": expected KEY=VALUE"
        );
        let relative = ImageDefaults {
            working_dir: Some("app".into()),
            cmd: vec!["sh".into()],
            ..ImageDefaults::default()
        };
        assert_eq!(
            merge_image_config(&relative, RunRequest::default())
                .unwrap_err()
                .to_string(),
            "image config: WorkingDir \"app\": expected an absolute path"
        );
    }

    #[test]
    fn oci_config_json_is_read() {
        let text = r#"{"architecture":"amd64","os":"linux",
            "config":{"Env":["PATH=/bin"],"WorkingDir":"","User":"1000:1000","Cmd":["sh"]},
            "rootfs":{"type":"layers","diff_ids":[]}}"#;
        assert_eq!(
            ImageDefaults::from_oci_config_json(text).expect("parse"),
            ImageDefaults {
                env: vec!["PATH=/bin".into()],
                working_dir: None,
                user: Some("1000:1000".into()),
                entrypoint: vec![],
                cmd: vec!["sh".into()],
            }
        );
        assert!(ImageDefaults::from_oci_config_json("{\"config\": {\"Env\": 3}}").is_err());
    }

    #[test]
    fn passwd_and_group_parse_with_line_numbers() {
        let root = Path::new("/r");
        let users = parse_passwd(
            root,
            "root:x:0:0:root:/root:/bin/sh\n\napp:x:1234:1234::/home/app:/bin/sh\n",
        )
        .expect("parse");
        assert_eq!(users[1].uid, 1234);
        assert_eq!(users[1].home, PathBuf::from("/home/app"));
        let err =
            parse_passwd(root, "root:x:0:0:root:/root:/bin/sh\nbad:x:zero:0::/:\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "root filesystem /r: /etc/passwd:2: uid is not a number"
        );
        assert_eq!(
            parse_group(root, "app:x:1234:\n").expect("group"),
            vec![("app".to_owned(), 1234)]
        );
    }

    #[test]
    fn lower_paths_that_overlayfs_cannot_take_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let odd = dir.path().join("a,b");
        std::fs::create_dir(&odd).expect("mkdir");
        assert!(matches!(
            validate_lower(&odd),
            Err(RootFsError::UnsafePath(_))
        ));
        assert!(matches!(
            validate_lower(Path::new("relative")),
            Err(RootFsError::NotADirectory(_))
        ));
        validate_lower(dir.path()).expect("a plain directory is fine");
    }
}

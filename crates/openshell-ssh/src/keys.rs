//! Keys: the clients' `authorized_keys` and the server's host key.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::authorized_keys::Entry;
use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
use russh::keys::ssh_key::{EcdsaCurve, LineEnding, PublicKey};
use russh::keys::{Algorithm, HashAlg, PrivateKey};
use tracing::info;

/// Errors loading or creating keys. Each names the file (and line, for authorized keys).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: reading")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: not an OpenSSH public key line")]
    Parse {
        path: PathBuf,
        line: usize,
        #[source]
        source: russh::keys::ssh_key::Error,
    },
    #[error("{path}:{line}: key options ({options}) are not supported; remove them (every key gets the same sandboxed access)")]
    Options {
        path: PathBuf,
        line: usize,
        options: String,
    },
    #[error("{path}:{line}: key algorithm {algorithm} is not supported (use ssh-ed25519, ecdsa-sha2-nistp256/384/521 or rsa)")]
    Algorithm {
        path: PathBuf,
        line: usize,
        algorithm: String,
    },
    #[error("{path}: no keys: nobody could log in")]
    Empty { path: PathBuf },
    #[error("{path}: not an OpenSSH private key")]
    HostKeyParse {
        path: PathBuf,
        #[source]
        source: russh::keys::ssh_key::Error,
    },
    #[error("{path}: the host key is encrypted; the server needs an unencrypted key")]
    HostKeyEncrypted { path: PathBuf },
    #[error("{path}: the host key is accessible by group or others (mode {mode:o}); chmod 600 it")]
    HostKeyMode { path: PathBuf, mode: u32 },
    #[error("{path}: the host key is a symbolic link, which is never followed; give the key file itself")]
    HostKeySymlink { path: PathBuf },
    #[error("{path}: the host key is not a regular file")]
    HostKeyNotAFile { path: PathBuf },
    #[error("{path}: host key algorithm {algorithm} is not supported")]
    HostKeyAlgorithm { path: PathBuf, algorithm: String },
    #[error("{path}: writing the new host key")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("encoding the new host key")]
    Encode(#[source] russh::keys::ssh_key::Error),
}

/// The public keys allowed to log in, from an OpenSSH `authorized_keys` file.
#[derive(Debug, Clone)]
pub struct AuthorizedKeys {
    path: PathBuf,
    keys: Vec<PublicKey>,
}

fn supported(algorithm: &Algorithm) -> bool {
    matches!(
        algorithm,
        Algorithm::Ed25519
            | Algorithm::Ecdsa {
                curve: EcdsaCurve::NistP256 | EcdsaCurve::NistP384 | EcdsaCurve::NistP521
            }
            | Algorithm::Rsa { .. }
    )
}

impl AuthorizedKeys {
    /// Read `path`. Blank lines and `#` comments are skipped; a line with options (`from=`,
    /// `command=`, `no-pty`, ...) is refused rather than silently ignored, and so is a key of an
    /// algorithm the server cannot verify.
    pub fn load(path: &Path) -> Result<AuthorizedKeys, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parse the text of an `authorized_keys` file; `path` is used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<AuthorizedKeys, KeyError> {
        let mut keys = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let entry: Entry = line.parse().map_err(|source| KeyError::Parse {
                path: path.to_owned(),
                line: i + 1,
                source,
            })?;
            if !entry.config_opts().is_empty() {
                return Err(KeyError::Options {
                    path: path.to_owned(),
                    line: i + 1,
                    options: entry.config_opts().as_str().to_owned(),
                });
            }
            let key = entry.public_key().clone();
            if !supported(&key.algorithm()) {
                return Err(KeyError::Algorithm {
                    path: path.to_owned(),
                    line: i + 1,
                    algorithm: key.algorithm().as_str().to_owned(),
                });
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(KeyError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(AuthorizedKeys {
            path: path.to_owned(),
            keys,
        })
    }

    /// Whether `key` is one of the authorized keys (compared by key material, not comment).
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.keys.iter().any(|k| k.key_data() == key.key_data())
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where the host key lives unless `--ssh-host-key` says otherwise:
/// `$OPENSHELL_HOME/ssh_host_ed25519_key`, or `~/.local/share/openshell/ssh_host_ed25519_key`.
pub fn default_host_key_path() -> PathBuf {
    let home = std::env::var_os("OPENSHELL_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".local/share/openshell")
        });
    home.join("ssh_host_ed25519_key")
}

/// Load the host key at `path`, or create an Ed25519 key there (mode 0600, parent directories
/// 0700) if there is none, so clients' `known_hosts` entries hold across restarts. The key's own
/// name is never followed: a symlink there (dangling or not) is refused, and so is anything but
/// a regular file.
pub fn load_or_create_host_key(path: &Path) -> Result<PrivateKey, KeyError> {
    match open_no_follow(path) {
        Ok(file) => load_host_key(path, file),
        Err(KeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            create_host_key(path)
        }
        Err(e) => Err(e),
    }
}

/// Open `path` for reading without following a symlink in its last component (`O_NOFOLLOW`,
/// `O_NONBLOCK` so a FIFO cannot block; it has no effect on a regular file), and check it is a
/// regular file.
fn open_no_follow(path: &Path) -> Result<std::fs::File, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match std::fs::symlink_metadata(path) {
            Ok(m) if m.is_symlink() => KeyError::HostKeySymlink {
                path: path.to_owned(),
            },
            _ => read_err(e),
        })?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(KeyError::HostKeyNotAFile {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

fn load_host_key(path: &Path, mut file: std::fs::File) -> Result<PrivateKey, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_owned(),
        source,
    };
    let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::HostKeyMode {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read_err)?;
    let key = PrivateKey::from_openssh(text).map_err(|source| KeyError::HostKeyParse {
        path: path.to_owned(),
        source,
    })?;
    if key.is_encrypted() {
        return Err(KeyError::HostKeyEncrypted {
            path: path.to_owned(),
        });
    }
    if !supported(&key.algorithm()) {
        return Err(KeyError::HostKeyAlgorithm {
            path: path.to_owned(),
            algorithm: key.algorithm().as_str().to_owned(),
        });
    }
    info!(event = "ssh.host_key", path = %path.display(),
          fingerprint = %key.public_key().fingerprint(HashAlg::Sha256), created = false,
          "using the ssh host key");
    Ok(key)
}

fn create_host_key(path: &Path) -> Result<PrivateKey, KeyError> {
    let write_err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(write_err)?;
    let pair = Ed25519Keypair::from_seed(&seed);
    let key =
        PrivateKey::new(KeypairData::from(pair), "openshell host key").map_err(KeyError::Encode)?;
    let text = key.to_openssh(LineEnding::LF).map_err(KeyError::Encode)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(write_err)?;
    }
    // create_new (O_EXCL, which never follows a symlink; O_NOFOLLOW says so again): two
    // supervisors starting at once never overwrite each other's key; the loser reads the
    // winner's. Whatever appeared there meanwhile is opened as an existing key, never created
    // through, so a symlink planted after the first look is refused, not followed.
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return load_host_key(path, open_no_follow(path)?);
        }
        Err(e) => return Err(write_err(e)),
    };
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_err)?;
    info!(event = "ssh.host_key", path = %path.display(),
          fingerprint = %key.public_key().fingerprint(HashAlg::Sha256), created = true,
          "created the ssh host key");
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINIAKYdqjAQ/09VdwrSZSVcgXnbMja35wgLkXz4z4fQ4 user@host";

    #[test]
    fn authorized_keys_skip_comments_and_blank_lines() {
        let text = format!("# a comment\n\n{ED}\n");
        let keys = AuthorizedKeys::parse(Path::new("ak"), &text).expect("parses");
        assert_eq!(keys.len(), 1);
        let key: PublicKey = ED.parse().expect("key");
        assert!(keys.contains(&key));
    }

    #[test]
    fn authorized_keys_errors_name_file_and_line() {
        let cases = [
            (format!("\n{ED}\nnot a key\n"), "ak:3: not an OpenSSH public key line"),
            (
                format!("{ED}\ncommand=\"/bin/true\" {ED}\n"),
                "ak:2: key options (command=\"/bin/true\") are not supported",
            ),
            ("# only a comment\n".to_owned(), "ak: no keys"),
            (
                "ssh-dss AAAAB3NzaC1kc3MAAACBANgOOskXoKMeAw4CRZxkDhH43DKY2BE2xSuArB6CLHmKMi+xNCaoQhHnU7rqBu9Gyt0Gjj3LIbgat5zV+6+zacgriOmtuubWq5HJjKucJ/usZFaEPIiXmfjM2Z7NiImQ9lxmQ4KgZt7slcvxuerSwufIkLBwodKChSQMF2iZh2PVAAAAFQDArswp/Iw8hKWAB0DhxM13o8nFxwAAAIEAuIOAT9fYPvBHFOIxfSZUrfNvR1IHkScRhcejimit91QGCwJeQ4xCA0fUaXBVeIEuDWYAzM5eUvIxz4ueFC6qUBMROHrMiNQH70TCDg9SD0UFUyrXS4o3kHzj++gEpjVYhIwfsPBnW5SjGC5eTOvD/kBquCWva38Kh6uwPcy79dYAAACBALVx5C50NLFSIuseTcP07idwF20EpYBzfBhrG+zXfNDl5nuLTHXBgpC7lG2+6p6GC3LldDCiCi3D0Y5tStrO9bX7d3mgBulusSw6VnplFRM/0mauZlDL6feg4zN+fXb4A3oDFWj7byG3kJpeeGmqxzYOs5ZCU1twOkmrnHOGDsq3 t".to_owned(),
                "ak:1: key algorithm ssh-dss is not supported",
            ),
        ];
        for (text, expected) in cases {
            let err = AuthorizedKeys::parse(Path::new("ak"), &text).expect_err(expected);
            assert!(
                err.to_string().starts_with(expected),
                "{err} does not start with {expected}"
            );
        }
    }

    #[test]
    fn host_key_is_created_once_with_mode_0600_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/ssh_host_ed25519_key");
        let first = load_or_create_host_key(&path).expect("created");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_create_host_key(&path).expect("loaded");
        assert_eq!(first.public_key().key_data(), again.public_key().key_data());
        assert_eq!(again.algorithm(), Algorithm::Ed25519);
    }

    #[test]
    fn host_key_symlinks_are_never_followed_or_created_through() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |name: &str| dir.path().join(name);
        load_or_create_host_key(&p("real")).expect("created");
        let real = std::fs::read(p("real")).expect("read");
        std::os::unix::fs::symlink(p("real"), p("link")).expect("symlink");
        // Dangling: creating through it would write wherever it points.
        std::os::unix::fs::symlink(p("elsewhere"), p("dangling")).expect("symlink");
        std::fs::create_dir(p("dir")).expect("mkdir");
        let shown = |r: Result<PrivateKey, KeyError>| r.map(drop).map_err(|e| e.to_string());
        let got = [
            shown(load_or_create_host_key(&p("link"))),
            shown(load_or_create_host_key(&p("dangling"))),
            shown(load_or_create_host_key(&p("dir"))),
        ];
        let link_msg = |name: &str| {
            format!(
                "{}: the host key is a symbolic link, which is never followed; give the key \
                 file itself",
                p(name).display()
            )
        };
        let want = [
            Err(link_msg("link")),
            Err(link_msg("dangling")),
            Err(format!(
                "{}: the host key is not a regular file",
                p("dir").display()
            )),
        ];
        assert_eq!(got.to_vec(), want.to_vec());
        assert!(!p("elsewhere").exists(), "nothing created through the link");
        assert_eq!(std::fs::read(p("real")).expect("read"), real);
    }

    #[test]
    fn host_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        load_or_create_host_key(&path).expect("created");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_or_create_host_key(&path).expect_err("refused");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }
}

//! Registry credentials: explicit flags, or a docker-style `config.json`, else anonymous.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

use crate::error::ImageError;

/// Credentials for one registry.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Anonymous,
    Basic { username: String, password: String },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => {
                write!(f, "Basic({username:?}, <redacted>)")
            }
        }
    }
}

impl Credentials {
    pub(crate) fn to_registry_auth(&self) -> oci_client::secrets::RegistryAuth {
        match self {
            Credentials::Anonymous => oci_client::secrets::RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => {
                oci_client::secrets::RegistryAuth::Basic(username.clone(), password.clone())
            }
        }
    }
}

/// Where credentials come from, in order: `explicit`, then the config file.
#[derive(Debug, Clone, Default)]
pub struct AuthOptions {
    /// `--username` / `--password-stdin`: used for every registry of this pull.
    pub explicit: Option<Credentials>,
    /// `--registry-config FILE`. Without it, `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json` when present.
    pub config_file: Option<PathBuf>,
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl AuthOptions {
    /// The credentials for `registry` (`host[:port]`).
    pub fn for_registry(&self, registry: &str) -> Result<Credentials, ImageError> {
        if let Some(c) = &self.explicit {
            return Ok(c.clone());
        }
        let path = match &self.config_file {
            Some(p) => p.clone(),
            None => match default_config_file() {
                Some(p) if p.exists() => p,
                _ => return Ok(Credentials::Anonymous),
            },
        };
        credentials_from_file(&path, registry)
    }
}

fn default_config_file() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The `auths` key of a registry: `host[:port]`, with or without a scheme and a path; Docker
/// Hub is also known as `https://index.docker.io/v1/`.
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let k = k.split('/').next().unwrap_or(k);
    match k {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        other => other,
    }
}

/// Reads `auths` of a docker-style config file.
pub fn credentials_from_file(path: &Path, registry: &str) -> Result<Credentials, ImageError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImageError::RegistryConfigIo {
        path: path.to_owned(),
        source,
    })?;
    let config: DockerConfig =
        serde_json::from_str(&text).map_err(|e| ImageError::RegistryConfig {
            path: path.to_owned(),
            what: format!("line {} column {}: {e}", e.line(), e.column()),
        })?;
    let wanted = key_host(registry);
    let Some((key, entry)) = config.auths.iter().find(|(k, _)| key_host(k) == wanted) else {
        return Ok(Credentials::Anonymous);
    };
    let field_error = |what: &str| ImageError::RegistryConfig {
        path: path.to_owned(),
        what: format!("auths.{key:?}: {what}"),
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| field_error("auth is not valid base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| field_error("auth is not UTF-8"))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| field_error("auth does not decode to username:password"))?;
        return Ok(Credentials::Basic {
            username: username.to_owned(),
            password: password.to_owned(),
        });
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Credentials::Basic {
            username: u.clone(),
            password: p.clone(),
        }),
        (None, None) => Err(field_error(
            "no auth, username or password (credential helpers are not supported)",
        )),
        _ => Err(field_error("username and password must be given together")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn base64_auth_and_username_password_entries() {
        let f = write(
            r#"{"auths":{"127.0.0.1:5000":{"auth":"YWxpY2U6czNjcmV0"},
               "https://reg.example:443/v2/":{"username":"bob","password":"pw"},
               "https://index.docker.io/v1/":{"auth":"ZDpo"}}}"#,
        );
        let basic = |u: &str, p: &str| Credentials::Basic {
            username: u.into(),
            password: p.into(),
        };
        assert_eq!(
            credentials_from_file(f.path(), "127.0.0.1:5000").unwrap(),
            basic("alice", "s3cret")
        );
        assert_eq!(
            credentials_from_file(f.path(), "reg.example:443").unwrap(),
            basic("bob", "pw")
        );
        assert_eq!(
            credentials_from_file(f.path(), "docker.io").unwrap(),
            basic("d", "h")
        );
        assert_eq!(
            credentials_from_file(f.path(), "other:1").unwrap(),
            Credentials::Anonymous
        );
    }

    #[test]
    fn bad_entries_name_the_file_and_key() {
        let f = write(r#"{"auths":{"r:1":{"auth":"!!"}}}"#);
        let e = credentials_from_file(f.path(), "r:1")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{}: auths.\"r:1\": auth is not valid base64",
                f.path().display()
            )
        );
        let f = write(r#"{"auths": [}"#);
        let e = credentials_from_file(f.path(), "r:1")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{}: line 1 column", f.path().display())),
            "{e}"
        );
    }
}

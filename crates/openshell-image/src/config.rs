//! The parts of an OCI image config a sandbox honours.

use serde::{Deserialize, Serialize};

/// Env, WorkingDir, User, Entrypoint and Cmd of an image (all optional in the spec).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=VALUE` strings, in the image's order.
    pub env: Vec<String>,
    /// Absolute working directory, if the image sets one.
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, if the image sets one.
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

impl ImageConfig {
    /// The command to run: the entrypoint followed by `args` when given, else by Cmd (the
    /// `docker run` rule). Empty when the image names no command and none was given.
    pub fn command(&self, args: &[String]) -> Vec<String> {
        let tail = if args.is_empty() { &self.cmd } else { args };
        self.entrypoint.iter().chain(tail).cloned().collect()
    }

    /// Env as key/value pairs; entries without `=` are skipped.
    pub fn env_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.iter().filter_map(|kv| kv.split_once('='))
    }
}

/// The wire form of the config blob (unknown fields ignored: images carry many).
#[derive(Debug, Deserialize)]
pub(crate) struct ConfigBlob {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ContainerConfig {
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl ConfigBlob {
    pub(crate) fn image_config(&self) -> ImageConfig {
        let c = self.config.as_ref();
        let nonempty = |s: Option<&String>| s.filter(|s| !s.is_empty()).cloned();
        ImageConfig {
            env: c.and_then(|c| c.env.clone()).unwrap_or_default(),
            working_dir: nonempty(c.and_then(|c| c.working_dir.as_ref())),
            user: nonempty(c.and_then(|c| c.user.as_ref())),
            entrypoint: c.and_then(|c| c.entrypoint.clone()).unwrap_or_default(),
            cmd: c.and_then(|c| c.cmd.clone()).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn config_fields_and_the_command_rule() {
        let blob: ConfigBlob = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin","A=b=c"],
               "WorkingDir":"/sandbox","User":"sandbox","Entrypoint":["/bin/sh","-c"],
               "Cmd":["echo hi"],"Labels":{"x":"y"}},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        let config = blob.image_config();
        assert_eq!(
            config,
            ImageConfig {
                env: vec!["PATH=/bin".into(), "A=b=c".into()],
                working_dir: Some("/sandbox".into()),
                user: Some("sandbox".into()),
                entrypoint: vec!["/bin/sh".into(), "-c".into()],
                cmd: vec!["echo hi".into()],
            }
        );
        assert_eq!(config.command(&[]), vec!["/bin/sh", "-c", "echo hi"]);
        assert_eq!(config.command(&["id".into()]), vec!["/bin/sh", "-c", "id"]);
        assert_eq!(
            config.env_pairs().collect::<Vec<_>>(),
            vec![("PATH", "/bin"), ("A", "b=c")]
        );
    }
}

//! The SSH server into a running sandbox.
//!
//! Users and their tools (ssh, scp, sftp, editors' remote modes, `ssh -L`) reach a sandbox only
//! through this server. Everything a session does runs inside the sandbox through the runtime's
//! [`openshell_runtime::SandboxHandle`], with the workload's identity and restrictions:
//!
//! - `shell` and `exec` run the configured shell (with a PTY when the client asked for one);
//! - the `sftp` subsystem runs an sftp server program inside the sandbox (so scp and sftp write
//!   files as the workload's user, under its Landlock rules);
//! - `direct-tcpip` (`ssh -L`) connects to 127.0.0.1 on the sandbox's own loopback;
//! - remote forwarding, agent forwarding and X11 are refused.
//!
//! Authentication is public-key only, against an OpenSSH `authorized_keys` file; there is no
//! other path in. Every decision is a structured `tracing` event (`ssh.auth`, `ssh.session`,
//! `ssh.forward`, `ssh.refused`, `ssh.env_refused`).

pub mod keys;
mod server;

pub use keys::{default_host_key_path, load_or_create_host_key, AuthorizedKeys, KeyError};
pub use server::{
    env_allowed, forward_target_allowed, ConnectionError, SshError, SshOptions, SshServer,
};

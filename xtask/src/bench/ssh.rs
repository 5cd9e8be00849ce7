//! `ssh`: exec round trip (`ssh -S ctl host true`) over a reused ControlMaster connection into a
//! sandbox served by `openshell-sandbox --ssh-listen`, next to Debian's OpenSSH sshd on a
//! loopback port doing the same (`/bin/sh -c true` as root on the host, no sandbox).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{hyperfine, verdict, Cmd, Ctx};

/// Target: our median exec round trip over a reused connection, in milliseconds.
const TARGET_MEDIAN_MS: f64 = 15.0;

const SSHD: &str = "/usr/sbin/sshd";

/// Kills and reaps a child when dropped.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        // SIGTERM first: the supervisor then tears the sandbox down.
        let _ = Command::new("kill")
            .arg(self.0.id().to_string())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn keygen(path: &Path) -> Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ssh-keygen")?;
    if !out.status.success() {
        bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn client_opts(dir: &Path) -> Vec<String> {
    vec![
        "-F".into(),
        "/dev/null".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-o".into(),
        format!("UserKnownHostsFile={}", dir.join("known_hosts").display()),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-i".into(),
        dir.join("id").display().to_string(),
    ]
}

/// Start a ControlMaster to `port` (it backgrounds once authenticated), retrying while the
/// server comes up.
fn master(dir: &Path, port: u16, ctl: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("ssh")
            .args(client_opts(dir))
            .args([
                "-o",
                "ControlMaster=yes",
                "-o",
                "ControlPersist=yes",
                "-N",
                "-f",
            ])
            .arg("-S")
            .arg(ctl)
            .args(["-p", &port.to_string(), "root@127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .context("cannot run ssh")?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no ssh connection to port {port}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stop_master(ctl: &Path) {
    let _ = Command::new("ssh")
        .args(["-F", "/dev/null", "-O", "exit", "-S"])
        .arg(ctl)
        .arg("root@127.0.0.1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

pub fn run(ctx: &Ctx) -> Result<()> {
    if !Path::new(SSHD).is_file() {
        bail!("{SSHD} not found (Debian openssh-server; `cargo xtask deps` installs it)");
    }
    let dir = std::env::temp_dir().join(format!("xtask-ssh-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let _cleanup = Scratch(dir.clone());
    let work = dir.join("work");
    std::fs::create_dir_all(&work)?;
    keygen(&dir.join("id"))?;
    keygen(&dir.join("host"))?;
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys"))?;
    let (ours_port, peer_port) = (free_port()?, free_port()?);
    let host_pub = std::fs::read_to_string(dir.join("host.pub"))?;
    let host_pub: Vec<&str> = host_pub.split_whitespace().take(2).collect();
    let host_pub = host_pub.join(" ");
    std::fs::write(
        dir.join("known_hosts"),
        format!("[127.0.0.1]:{ours_port} {host_pub}\n[127.0.0.1]:{peer_port} {host_pub}\n"),
    )?;

    let sandbox = ctx.root.join("target/release/openshell-sandbox");
    let _ours = Reap(
        Command::new(&sandbox)
            .arg("--policy")
            .arg(ctx.root.join("policies/default.yaml"))
            .arg("--workdir")
            .arg(&work)
            .args(["--ssh-listen", &format!("127.0.0.1:{ours_port}")])
            .arg("--ssh-authorized-keys")
            .arg(dir.join("authorized_keys"))
            .arg("--ssh-host-key")
            .arg(dir.join("host"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", sandbox.display()))?,
    );
    // The peer: Debian's sshd on loopback with a throwaway config (no PAM, key login only).
    // It runs in a private mount namespace whose /etc/passwd gives root /bin/sh, so both sides
    // run `/bin/sh -c true` (root's login shell may be bash, which sources ~/.bashrc for ssh
    // commands and would measure whatever that file does).
    std::fs::create_dir_all("/run/sshd")?;
    let passwd: String = std::fs::read_to_string("/etc/passwd")?
        .lines()
        .map(|l| match l.strip_prefix("root:") {
            Some(rest) => {
                let mut f: Vec<&str> = rest.split(':').collect();
                if let Some(shell) = f.last_mut() {
                    *shell = "/bin/sh";
                }
                format!("root:{}\n", f.join(":"))
            }
            None => format!("{l}\n"),
        })
        .collect();
    std::fs::write(dir.join("passwd"), passwd)?;
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {peer_port}\nListenAddress 127.0.0.1\nHostKey {host}\nAuthorizedKeysFile {ak}\n\
             PidFile none\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n",
            host = dir.join("host").display(),
            ak = dir.join("authorized_keys").display(),
        ),
    )?;
    let _peer = Reap(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /etc/passwd && exec {SSHD} -D -e -f {}",
                dir.join("passwd").display(),
                config.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start sshd")?,
    );

    let (ours_ctl, peer_ctl) = (dir.join("ours.ctl"), dir.join("peer.ctl"));
    master(&dir, ours_port, &ours_ctl)?;
    let result = (|| {
        master(&dir, peer_port, &peer_ctl)?;
        let line = |ctl: &Path, port: u16| {
            format!(
                "ssh -F /dev/null -S {} -p {port} root@127.0.0.1 true",
                ctl.display()
            )
        };
        let cmds = [
            Cmd {
                name: "ours",
                line: line(&ours_ctl, ours_port),
            },
            Cmd {
                name: "openssh",
                line: line(&peer_ctl, peer_port),
            },
        ];
        let stats = hyperfine(ctx, &cmds)?;
        Ok::<_, anyhow::Error>((cmds, stats))
    })();
    stop_master(&ours_ctl);
    stop_master(&peer_ctl);
    let (cmds, stats) = result?;
    let [ours, peer] = stats[..] else {
        unreachable!("hyperfine returns one result per command")
    };
    let ratio = ours.median_ms / peer.median_ms;
    let median_ok = ours.median_ms <= TARGET_MEDIAN_MS;

    let machine = super::machine();
    println!();
    super::print_machine(&machine);
    println!(
        "exec round trip `ssh -S ctl host true` over a ControlMaster connection ({} runs each, {} warmup)",
        ctx.runs, ctx.warmup
    );
    println!("  {:<10} {:>10} {:>10} {:>10}", "", "median", "p95", "mean");
    for (name, s) in [("ours", ours), ("openssh", peer)] {
        println!(
            "  {name:<10} {:>7.2} ms {:>7.2} ms {:>7.2} ms",
            s.median_ms, s.p95_ms, s.mean_ms
        );
    }
    println!("  ratio ours/openssh: {ratio:.2} (median)");
    println!(
        "  target median <= {TARGET_MEDIAN_MS:.0} ms: {} ({:.2} ms)",
        verdict(median_ok),
        ours.median_ms
    );
    let report = serde_json::json!({
        "benchmark": "ssh",
        "workload": "ssh -S ctl host true (process backend, policies/default.yaml)",
        "runs": ctx.runs,
        "warmup": ctx.warmup,
        "machine": machine,
        "ours": { "command": cmds[0].line, "stats": ours.to_json() },
        "openssh": { "command": cmds[1].line, "stats": peer.to_json() },
        "ratio_median": super::round3(ratio),
        "targets": { "median_ms_max": TARGET_MEDIAN_MS, "median_ok": median_ok },
    });
    let path = ctx.write_report("ssh", &report)?;
    println!("  wrote {}", path.display());
    Ok(())
}

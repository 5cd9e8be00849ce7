//! SSH into a running sandbox with the real OpenSSH client (Debian's openssh-client): exec with
//! exit codes and separate streams as the policy's user, a PTY shell, scp both ways and sftp
//! with writes landing only where the policy allows, `ssh -L` to a server inside the sandbox,
//! and refusal of a wrong key, of `-R` and of forwards to anything but the sandbox's loopback.
//!
//! One sandbox per backend (`--ssh-listen` without a command: the workload is `sleep
//! infinity`), many checks against it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use pretty_assertions::assert_eq;

use super::common::*;

const TOOLS: [&str; 5] = ["ssh", "scp", "sftp", "ssh-keygen", "ssh-agent"];
const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";

/// Whether an ssh test may run: the sandbox can run here and the OpenSSH tools are installed.
/// A missing tool is a skip, printed, except under `CI=true`, where it fails the test.
fn ssh_can_run(name: &str) -> bool {
    if !can_run(name) {
        return false;
    }
    let Some(reason) = tools_missing() else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{name}: this machine should have {reason:?} in CI");
    }
    eprintln!("SKIP {name}: {reason}");
    false
}

/// Why the OpenSSH tools cannot be used here, if they cannot.
fn tools_missing() -> Option<String> {
    for tool in TOOLS {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Some(format!(
                "{tool} not found (Debian openssh-client; `cargo xtask deps` installs it)"
            ));
        }
    }
    if !Path::new(SFTP_SERVER).is_file() {
        return Some(format!(
            "{SFTP_SERVER} not found (Debian openssh-sftp-server; `cargo xtask deps` installs it)"
        ));
    }
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {}", stderr(&out));
}

/// A sandbox served over SSH, and the client side's files.
struct SshBox {
    child: Child,
    port: u16,
    keys: tempfile::TempDir,
    log: PathBuf,
}

impl SshBox {
    fn start(s: &Scratch, backend: &str) -> SshBox {
        Self::start_with(s, backend, &[])
    }

    fn start_with(s: &Scratch, backend: &str, extra: &[&str]) -> SshBox {
        let keys = tempfile::tempdir().expect("tempdir");
        let k = keys.path();
        keygen(&k.join("id"));
        keygen(&k.join("wrong"));
        keygen(&k.join("host"));
        std::fs::copy(k.join("id.pub"), k.join("authorized_keys")).expect("authorized_keys");
        let port = free_port();
        let host_pub = std::fs::read_to_string(k.join("host.pub")).expect("host.pub");
        let host_pub: Vec<&str> = host_pub.split_whitespace().take(2).collect();
        std::fs::write(
            k.join("known_hosts"),
            format!("[127.0.0.1]:{port} {}\n", host_pub.join(" ")),
        )
        .expect("known_hosts");
        let log = k.join("sandbox.log");
        let port_s = format!("127.0.0.1:{port}");
        let mut flags: Vec<&str> = extra.to_vec();
        let ak = k.join("authorized_keys");
        let hk = k.join("host");
        flags.extend([
            "--ssh-listen",
            &port_s,
            "--ssh-authorized-keys",
            ak.to_str().expect("utf-8"),
            "--ssh-host-key",
            hk.to_str().expect("utf-8"),
            "--log-level",
            "info",
            "--log-file",
            log.to_str().expect("utf-8"),
        ]);
        let child = s
            .command(backend, &flags, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start openshell-sandbox");
        let mut b = SshBox {
            child,
            port,
            keys,
            log,
        };
        let up = wait_until(Duration::from_secs(90), || {
            b.ssh(&[], "true").status.success()
        });
        if !up {
            let _ = b.child.kill();
            panic!(
                "{backend}: ssh never answered; log:\n{}",
                std::fs::read_to_string(&b.log).unwrap_or_default()
            );
        }
        b
    }

    fn key(&self, name: &str) -> PathBuf {
        self.keys.path().join(name)
    }

    /// The options every client invocation gets: no user config, strict host key checking
    /// against the generated known_hosts, no prompts.
    fn client_opts(&self, key: &str) -> Vec<String> {
        vec![
            "-F".into(),
            "/dev/null".into(),
            "-o".into(),
            "BatchMode=yes".into(),
            "-o".into(),
            "StrictHostKeyChecking=yes".into(),
            "-o".into(),
            format!("UserKnownHostsFile={}", self.key("known_hosts").display()),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
            "-o".into(),
            "ConnectTimeout=20".into(),
            "-i".into(),
            self.key(key).display().to_string(),
        ]
    }

    fn ssh_cmd(&self, key: &str, extra: &[&str]) -> Command {
        let mut c = Command::new("ssh");
        c.args(self.client_opts(key))
            .arg("-p")
            .arg(self.port.to_string())
            .args(extra)
            .stdin(Stdio::null());
        c
    }

    fn ssh(&self, extra: &[&str], command: &str) -> Output {
        self.ssh_cmd("id", extra)
            .arg("agent@127.0.0.1")
            .arg(command)
            .output()
            .expect("ssh")
    }

    fn scp(&self, from: &str, to: &str) -> Output {
        Command::new("scp")
            .args(self.client_opts("id"))
            .arg("-P")
            .arg(self.port.to_string())
            .args([from, to])
            .stdin(Stdio::null())
            .output()
            .expect("scp")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SshBox {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Read what a forwarded connection answers to `request` (until EOF or 20 s).
fn talk(port: u16, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(20)))?;
    c.write_all(request)?;
    let mut out = Vec::new();
    c.read_to_end(&mut out)?;
    Ok(out)
}

/// A local forward (`ssh -N -L`), killed when dropped.
struct Forward(Child);

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ssh_exec_pty_scp_sftp_and_forwards_run_inside_the_sandbox() {
    let name = "ssh_exec_pty_scp_sftp_and_forwards_run_inside_the_sandbox";
    if !ssh_can_run(name) {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        // A directory the policy lists read-only, world-writable on the host: only the
        // sandbox's restrictions stop writes there.
        let ro = s.work.parent().expect("parent").join("ro");
        std::fs::create_dir(&ro).expect("mkdir ro");
        chmod(&ro, 0o777);
        s.edit_policy(&[("read_only: [", &format!("read_only: [{}, ", ro.display()))]);
        let b = SshBox::start(&s, backend);

        // exec: exit codes, separate stdout and stderr, the policy's user, the workdir.
        let out = b.ssh(&[], "id -un; pwd; echo to-stderr >&2; exit 7");
        assert_eq!(
            (backend, code(&out), stdout(&out), stderr(&out)),
            (
                backend,
                7,
                format!("nobody\n{}\n", s.work.display()),
                "to-stderr\n".to_owned()
            )
        );
        // Death by signal reaches the client as exit-signal (ssh exits 255 for it; -v shows
        // the request).
        let out = b.ssh(&["-v"], "kill -TERM $$");
        assert_eq!((backend, code(&out)), (backend, 255), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("rtype exit-signal"),
            "{backend}: {}",
            stderr(&out)
        );

        // Large stdin and stdout at once (the process reads only as fast as its output drains):
        // every byte comes back, nothing stalls. `timeout` turns a stall into a failure.
        let size = 24 << 20;
        let mut cat = Command::new("timeout")
            .arg("300")
            .arg("ssh")
            .args(b.client_opts("id"))
            .arg("-p")
            .arg(b.port.to_string())
            .args(["agent@127.0.0.1", "cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ssh cat");
        let mut input = cat.stdin.take().expect("stdin");
        let feeder = std::thread::spawn(move || {
            let chunk: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
            for _ in 0..(size >> 20) {
                if input.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let out = cat.wait_with_output().expect("ssh cat");
        let _ = feeder.join();
        assert_eq!(
            (backend, code(&out), out.stdout.len()),
            (backend, 0, size),
            "{}",
            stderr(&out)
        );

        // env: the allowlist passes LC_ALL and refuses the rest.
        let out = b.ssh(
            &["-o", "SetEnv=LC_ALL=C LD_PRELOAD=/tmp/x.so FOO=bar"],
            "echo \"$LC_ALL|${LD_PRELOAD-unset}|${FOO-unset}\"",
        );
        assert_eq!(
            (backend, stdout(&out)),
            (backend, "C|unset|unset\n".to_owned())
        );

        // Sessions reach the network only through the egress proxy, like the workload.
        let out = b.ssh(&[], "echo \"$HTTPS_PROXY|$NO_PROXY\"");
        let proxy = if backend == "vm" {
            "127.0.0.1:3128"
        } else {
            "10.200.0.1:3128"
        };
        assert_eq!(
            (backend, stdout(&out)),
            (backend, format!("http://{proxy}|localhost,127.0.0.1,::1\n"))
        );

        // An interactive shell through a PTY, with scripted input.
        let mut shell = b
            .ssh_cmd("id", &["-tt", "agent@127.0.0.1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ssh -tt");
        shell
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"tty; echo \"term=$TERM\"; exit 4\n")
            .expect("type");
        let out = shell.wait_with_output().expect("shell");
        let text = stdout(&out);
        assert_eq!((backend, code(&out)), (backend, 4), "{text}");
        assert!(text.contains("/dev/pts/"), "{backend}: no terminal: {text}");

        // scp up and down; the file belongs to the policy's user.
        let local = b.key("upload.txt");
        std::fs::write(&local, "payload\n").expect("write");
        let dest = s.work.join("uploaded.txt");
        let out = b.scp(
            local.to_str().expect("utf-8"),
            &format!("agent@127.0.0.1:{}", dest.display()),
        );
        assert_eq!((backend, code(&out)), (backend, 0), "{}", stderr(&out));
        assert_eq!(
            std::fs::read_to_string(&dest).expect("uploaded"),
            "payload\n"
        );
        assert_eq!(
            std::fs::metadata(&dest).expect("meta").uid(),
            65534,
            "{backend}: scp writes as the policy's user (nobody)"
        );
        let back = b.key("downloaded.txt");
        let out = b.scp(
            &format!("agent@127.0.0.1:{}", dest.display()),
            back.to_str().expect("utf-8"),
        );
        assert_eq!((backend, code(&out)), (backend, 0), "{}", stderr(&out));
        assert_eq!(
            std::fs::read_to_string(&back).expect("downloaded"),
            "payload\n"
        );

        // scp into a read-only path and into a path the policy does not list: refused, nothing
        // left behind.
        for target in [ro.join("evil.txt"), s.outside.join("evil.txt")] {
            let out = b.scp(
                local.to_str().expect("utf-8"),
                &format!("agent@127.0.0.1:{}", target.display()),
            );
            assert_ne!((backend, code(&out)), (backend, 0), "{}", target.display());
            assert!(
                !target.exists(),
                "{backend}: {} was written",
                target.display()
            );
        }

        // sftp: mkdir and put inside the workdir; put into the read-only directory fails.
        let batch = b.key("batch");
        std::fs::write(
            &batch,
            format!(
                "mkdir {w}/d\nput {l} {w}/d/f.txt\nls {w}/d\n",
                w = s.work.display(),
                l = local.display()
            ),
        )
        .expect("batch");
        let out = Command::new("sftp")
            .args(b.client_opts("id"))
            .arg("-P")
            .arg(b.port.to_string())
            .arg("-b")
            .arg(&batch)
            .arg("agent@127.0.0.1")
            .stdin(Stdio::null())
            .output()
            .expect("sftp");
        assert_eq!((backend, code(&out)), (backend, 0), "{}", stderr(&out));
        assert_eq!(
            std::fs::read_to_string(s.work.join("d/f.txt")).expect("sftp put"),
            "payload\n"
        );
        std::fs::write(
            &batch,
            format!("put {} {}/f.txt\n", local.display(), ro.display()),
        )
        .expect("batch");
        let out = Command::new("sftp")
            .args(b.client_opts("id"))
            .arg("-P")
            .arg(b.port.to_string())
            .arg("-b")
            .arg(&batch)
            .arg("agent@127.0.0.1")
            .stdin(Stdio::null())
            .output()
            .expect("sftp");
        assert_ne!((backend, code(&out)), (backend, 0), "{}", stdout(&out));
        assert!(
            !ro.join("f.txt").exists(),
            "{backend}: sftp wrote into a read-only path"
        );

        // ssh -L to a server started inside the sandbox (on its loopback only).
        let inner = free_port();
        let _server = b
            .ssh_cmd("id", &["agent@127.0.0.1"])
            .arg(format!(
                "echo served-from-inside > index.html; exec python3 -m http.server {inner} --bind 127.0.0.1"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Forward)
            .expect("server");
        // And an echo server, for bulk traffic both ways through a forward.
        let echo = free_port();
        let _echo_server = b
            .ssh_cmd("id", &["agent@127.0.0.1"])
            .arg(format!(
                "exec python3 -c 'import socket\ns=socket.socket()\ns.bind((\"127.0.0.1\",{echo}))\ns.listen()\nwhile True:\n c,_=s.accept()\n while (d:=c.recv(65536)): c.sendall(d)\n c.close()'"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Forward)
            .expect("echo server");
        // A host listener on the same loopback port number as another forward's target:
        // 127.0.0.1 in a forward is the sandbox's, so this must never see a connection.
        let host = TcpListener::bind("127.0.0.1:0").expect("host listener");
        host.set_nonblocking(true).expect("nonblocking");
        let host_port = host.local_addr().expect("addr").port();
        let (l_ok, l_host_lo, l_edge, l_name) =
            (free_port(), free_port(), free_port(), free_port());
        let l_echo = free_port();
        let _fwd = b
            .ssh_cmd(
                "id",
                &[
                    "-N",
                    "-o",
                    "ExitOnForwardFailure=yes",
                    "-L",
                    &format!("127.0.0.1:{l_ok}:127.0.0.1:{inner}"),
                    "-L",
                    &format!("127.0.0.1:{l_host_lo}:127.0.0.1:{host_port}"),
                    "-L",
                    &format!("127.0.0.1:{l_edge}:10.200.0.1:3128"),
                    "-L",
                    &format!("127.0.0.1:{l_name}:example.com:80"),
                    "-L",
                    &format!("127.0.0.1:{l_echo}:127.0.0.1:{echo}"),
                    "agent@127.0.0.1",
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Forward)
            .expect("ssh -L");
        let request = b"GET /index.html HTTP/1.0\r\n\r\n";
        let served = wait_until(Duration::from_secs(60), || {
            talk(l_ok, request)
                .map(|r| String::from_utf8_lossy(&r).contains("served-from-inside"))
                .unwrap_or(false)
        });
        assert!(
            served,
            "{backend}: ssh -L did not reach the server inside the sandbox"
        );
        // Bulk both ways at once through the forward: every byte comes back.
        let size: usize = 16 << 20;
        let mut conn = None;
        assert!(wait_until(Duration::from_secs(30), || {
            conn = TcpStream::connect(("127.0.0.1", l_echo)).ok().filter(|c| {
                let mut c = c;
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                c.write_all(b"ping").is_ok() && {
                    let mut four = [0u8; 4];
                    c.read_exact(&mut four).is_ok() && &four == b"ping"
                }
            });
            conn.is_some()
        }));
        let conn = conn.expect("echo connection");
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut writer = conn.try_clone().expect("clone");
        let feeder = std::thread::spawn(move || {
            let chunk: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
            for _ in 0..(size >> 20) {
                writer.write_all(&chunk).expect("send");
            }
        });
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let mut reader = &conn;
        while got < size {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        feeder.join().expect("feeder");
        assert_eq!((backend, got), (backend, size), "echo through ssh -L");
        drop(conn);
        for (port, what) in [
            (l_host_lo, "host loopback"),
            (l_edge, "edge address"),
            (l_name, "a host name"),
        ] {
            let answer = talk(port, request).unwrap_or_default();
            assert_eq!((backend, what, answer), (backend, what, Vec::new()));
        }
        assert!(
            host.accept().is_err(),
            "{backend}: a forward reached the host's loopback"
        );
        let log = b.log_text();
        for host in ["10.200.0.1", "example.com"] {
            assert!(
                log.lines().any(|l| l.contains("ssh.forward")
                    && l.contains("decision=\"deny\"")
                    && l.contains(host)),
                "{backend}: no deny event for {host} in:\n{log}"
            );
        }

        // Remote forwarding is refused.
        let out = b
            .ssh_cmd(
                "id",
                &[
                    "-N",
                    "-o",
                    "ExitOnForwardFailure=yes",
                    "-R",
                    "127.0.0.1:0:127.0.0.1:22",
                    "agent@127.0.0.1",
                ],
            )
            .output()
            .expect("ssh -R");
        assert_eq!((backend, code(&out)), (backend, 255));
        assert!(
            stderr(&out).contains("remote port forwarding failed"),
            "{backend}: {}",
            stderr(&out)
        );

        // Agent forwarding is refused: the session gets no agent socket, and the refusal is
        // logged.
        let agent_sock = b.key("agent.sock");
        let _agent = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&agent_sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Forward)
            .expect("ssh-agent");
        assert!(wait_until(Duration::from_secs(10), || agent_sock.exists()));
        let out = b
            .ssh_cmd(
                "id",
                &["-A", "agent@127.0.0.1", "echo ${SSH_AUTH_SOCK-unset}"],
            )
            .env("SSH_AUTH_SOCK", &agent_sock)
            .output()
            .expect("ssh -A");
        assert_eq!(
            (backend, code(&out), stdout(&out)),
            (backend, 0, "unset\n".to_owned())
        );
        let log = b.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("ssh.refused") && l.contains("agent forwarding")),
            "{backend}: no agent refusal in:\n{log}"
        );

        // A key that is not in authorized_keys gets nothing.
        let out = b
            .ssh_cmd("wrong", &["agent@127.0.0.1", "touch wrong-key-ran"])
            .output()
            .expect("ssh");
        assert_eq!((backend, code(&out)), (backend, 255));
        assert!(
            stderr(&out).contains("Permission denied (publickey)"),
            "{backend}: {}",
            stderr(&out)
        );
        assert!(!s.work.join("wrong-key-ran").exists());
        let log = b.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("ssh.auth") && l.contains("decision=\"deny\"")),
            "{backend}: no auth deny event in:\n{log}"
        );
    }
}

#[test]
fn ssh_listen_refuses_bad_keys_and_non_loopback_before_starting() {
    let name = "ssh_listen_refuses_bad_keys_and_non_loopback_before_starting";
    if !can_run(name) {
        return;
    }
    let s = Scratch::new("");
    let dir = tempfile::tempdir().expect("tempdir");
    let ak = dir.path().join("authorized_keys");
    std::fs::write(&ak, "# keys\nssh-ed25519 not-base64 x\n").expect("write");
    let ak_s = ak.to_str().expect("utf-8");
    let hk = dir.path().join("host");
    let hk_s = hk.to_str().expect("utf-8");
    let cases: [(&[&str], String); 3] = [
        (
            &[
                "--ssh-listen",
                "127.0.0.1:0",
                "--ssh-authorized-keys",
                ak_s,
                "--ssh-host-key",
                hk_s,
            ],
            format!("{ak_s}:2: not an OpenSSH public key line"),
        ),
        (
            &["--ssh-listen", "0.0.0.0:0", "--ssh-authorized-keys", ak_s],
            "not a loopback address; pass --dangerously-allow-ssh-on-non-loopback".to_owned(),
        ),
        (
            &["--ssh-listen", "127.0.0.1:0"],
            "--ssh-listen needs --ssh-authorized-keys".to_owned(),
        ),
    ];
    for (flags, expected) in cases {
        for backend in backends() {
            let out = s.run(backend, flags, &[]);
            assert_eq!((backend, code(&out)), (backend, 125), "{}", stderr(&out));
            assert!(
                stderr(&out).contains(&expected),
                "{backend}: {expected:?} not in {}",
                stderr(&out)
            );
        }
    }
    assert!(!hk.exists(), "no host key is created when the keys are bad");
}

#[test]
fn an_idle_ssh_connection_is_closed_and_its_process_killed() {
    let name = "an_idle_ssh_connection_is_closed_and_its_process_killed";
    if !ssh_can_run(name) {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let b = SshBox::start_with(&s, backend, &["--ssh-idle-timeout", "2"]);
        // No traffic while it sleeps: the server closes the connection, and the session's
        // process goes with it.
        let out = b.ssh(&[], "exec sleep 567");
        assert_eq!((backend, code(&out)), (backend, 255), "{}", stderr(&out));
        let gone = wait_until(Duration::from_secs(20), || {
            code(&b.ssh(&[], "pgrep -f 'slee[p] 567'")) == 1
        });
        assert!(
            gone,
            "{backend}: the idle session's process outlived its connection"
        );
        assert!(
            b.log_text().contains("ssh.disconnected"),
            "{backend}: {}",
            b.log_text()
        );
    }
}

/// A session's processes have no ancestor outside the sandbox: a policy whose binaries cover the
/// supervisor's own install directory (the exec helper that starts every session is that binary)
/// gives a session nothing through it.
#[test]
fn a_sessions_egress_never_borrows_the_supervisors_identity() {
    if !ssh_can_run("a_sessions_egress_never_borrows_the_supervisors_identity") {
        return;
    }
    for backend in backends() {
        let up = super::egress::Upstream::start("127.0.0.5");
        let dir = Path::new(SANDBOX).parent().expect("the binary's directory");
        // With limits (a cgroup: its members are who the proxy considers), as every policy has.
        let s = Scratch::new(&format!(
            "resources:\n  pids: 512\nnetwork_policies:\n  up:\n    endpoints:\n      - host: \"{ip}\"\n        port: {port}\n        allowed_ips: [127.0.0.0/8]\n    binaries: [{{ path: \"{dir}/*\" }}]\n",
            ip = up.addr.ip(),
            port = up.addr.port(),
            dir = dir.display(),
        ));
        let b = SshBox::start(&s, backend);
        let out = b.ssh(
            &[],
            &format!(
                "curl -s -o /dev/null -w '%{{http_code}}' {}",
                up.url("/borrowed")
            ),
        );
        assert_eq!(
            (backend, stdout(&out)),
            (backend, "403".to_owned()),
            "{}",
            stderr(&out)
        );
        assert_eq!((backend, up.seen()), (backend, Vec::<String>::new()));
    }
}

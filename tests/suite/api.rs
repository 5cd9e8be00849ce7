//! The runtime API itself: streaming output, exec into a running sandbox, PTY, signal and kill
//! from async code.

use std::sync::Arc;
use std::time::Duration;

use openshell_policy::Policy;
use openshell_runtime::{ExecConfig, ExitStatus, RuntimeKind, SpawnConfig, StdioMode};
use pretty_assertions::assert_eq;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::common::*;

fn kinds() -> Vec<RuntimeKind> {
    backends()
        .into_iter()
        .map(|b| b.parse().expect("runtime"))
        .collect()
}

fn config(s: &Scratch, program: &str, args: &[&str], stdio: StdioMode) -> SpawnConfig {
    let text = std::fs::read_to_string(&s.policy).expect("policy");
    let policy = Policy::from_yaml("policy.yaml", &text).expect("valid");
    let mut c = SpawnConfig::new(program, Arc::new(policy), s.work.clone());
    c.args = args.iter().map(|a| a.to_string()).collect();
    c.stdio = stdio;
    c
}

#[test]
fn output_is_streamed_while_the_workload_runs() {
    if !can_run("output_is_streamed_while_the_workload_runs") {
        return;
    }
    use_cli_as_helper();
    rt().block_on(async {
        for kind in kinds() {
            let s = Scratch::new("");
            let c = config(
                &s,
                "/bin/sh",
                &["-c", "echo first; sleep 600; echo never"],
                StdioMode::Piped,
            );
            let mut sandbox = openshell_runtime::spawn(kind, c).await.expect("spawn");
            let stdio = sandbox.take_stdio();
            let mut lines = BufReader::new(stdio.stdout.expect("stdout")).lines();
            let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await;
            assert_eq!(
                first.expect("no timeout").expect("read"),
                Some("first".to_owned())
            );
            // Still running: the line arrived before the workload ended.
            sandbox.signal(0).expect("still running");
            sandbox.kill().expect("kill");
            let status = sandbox.wait().await.expect("wait");
            assert_eq!((kind, status), (kind, ExitStatus::Signaled(9)));
            assert!(
                sandbox.signal(libc::SIGTERM).is_err(),
                "signal after exit is an error, not a panic"
            );
        }
    });
}

#[test]
fn exec_runs_inside_the_same_sandbox_with_the_same_restrictions() {
    if !can_run("exec_runs_inside_the_same_sandbox_with_the_same_restrictions") {
        return;
    }
    use_cli_as_helper();
    rt().block_on(async {
        for kind in kinds() {
            let s = Scratch::new("");
            let c = config(
                &s,
                "/bin/sh",
                &["-c", "echo $$ > main.pid; exec sleep 600"],
                StdioMode::Null,
            );
            let mut sandbox = openshell_runtime::spawn(kind, c).await.expect("spawn");
            assert!(wait_until(Duration::from_secs(20), || s
                .work
                .join("main.pid")
                .exists()));
            let outside = s.outside.join("from-exec");
            let script = format!(
                "hostname; id -u; kill -0 $(cat main.pid) && echo sees-main; \
                 {PROBE} write {}; echo write=$?; {PROBE} syscall ptrace; echo ptrace=$?; exit 5",
                outside.display()
            );
            let exec = ExecConfig {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), script],
                env: Default::default(),
                workdir: s.work.clone(),
                stdio: StdioMode::Piped,
            };
            let mut child = sandbox.exec(exec).await.expect("exec");
            let mut out = String::new();
            child
                .take_stdio()
                .stdout
                .expect("stdout")
                .read_to_string(&mut out)
                .await
                .expect("read");
            let status = child.wait().await.expect("wait");
            assert_eq!(
                (kind, out, status),
                (
                    kind,
                    // The path the policy does not list does not exist in either backend.
                    "openshell\n65534\nsees-main\nwrite=2\nptrace=1\n".to_owned(),
                    ExitStatus::Code(5)
                )
            );
            assert!(!outside.exists());
            sandbox.kill().expect("kill");
            sandbox.wait().await.expect("wait");
        }
    });
}

#[test]
fn pty_mode_gives_the_workload_a_terminal() {
    if !can_run("pty_mode_gives_the_workload_a_terminal") {
        return;
    }
    use_cli_as_helper();
    rt().block_on(async {
        for kind in kinds() {
            let s = Scratch::new("");
            let c = config(
                &s,
                "/bin/sh",
                &["-c", "tty; stty size"],
                StdioMode::Pty {
                    rows: 33,
                    cols: 101,
                },
            );
            let mut sandbox = openshell_runtime::spawn(kind, c).await.expect("spawn");
            let master = sandbox.take_stdio().pty.expect("pty master");
            let status = sandbox.wait().await.expect("wait");
            let mut file = std::fs::File::from(master);
            let mut buf = vec![0u8; 4096];
            let n = std::io::Read::read(&mut file, &mut buf).unwrap_or(0);
            let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
            assert_eq!((kind, status), (kind, ExitStatus::Code(0)));
            assert!(text.starts_with("/dev/pts/"), "{text:?}");
            assert!(text.contains("33 101"), "{text:?}");
        }
    });
}

#[test]
fn a_handle_execs_while_the_owner_waits_and_resizes_the_exec_terminal() {
    if !can_run("a_handle_execs_while_the_owner_waits_and_resizes_the_exec_terminal") {
        return;
    }
    use_cli_as_helper();
    rt().block_on(async {
        for kind in kinds() {
            let s = Scratch::new("");
            // The workload runs until the test creates `stop` in the workdir.
            let c = config(
                &s,
                "/bin/sh",
                &["-c", "until [ -e stop ]; do sleep 0.05; done; exit 3"],
                StdioMode::Null,
            );
            let mut sandbox = openshell_runtime::spawn(kind, c).await.expect("spawn");
            let handle = sandbox.handle().expect("handle");
            // The owner waits (it needs `&mut`) while the handle execs.
            let owner = tokio::spawn(async move {
                let status = sandbox.wait().await.expect("wait");
                (sandbox, status)
            });
            let mut exec = handle
                .exec(ExecConfig {
                    program: "/bin/sh".into(),
                    args: vec!["-c".into(), "read x; stty size".into()],
                    env: Default::default(),
                    workdir: s.work.clone(),
                    stdio: StdioMode::Pty { rows: 24, cols: 80 },
                })
                .await
                .expect("exec through the handle");
            let pty = exec.take_stdio().pty.expect("pty");
            // The resize reaches the terminal before the line that lets the shell go on.
            exec.resize(40, 100).expect("resize");
            let text = tokio::task::spawn_blocking(move || {
                use std::io::{Read, Write};
                let mut f = std::fs::File::from(pty);
                f.write_all(b"go\n").expect("type");
                let mut all = Vec::new();
                let mut buf = [0u8; 1024];
                while let Ok(n) = f.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    all.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&all).contains("40 100") {
                        break;
                    }
                }
                String::from_utf8_lossy(&all).replace('\r', "")
            })
            .await
            .expect("reader");
            assert!(text.contains("40 100"), "{kind}: {text:?}");
            assert_eq!(
                (kind, exec.wait().await.expect("wait")),
                (kind, ExitStatus::Code(0))
            );
            let plain = handle
                .exec(ExecConfig {
                    program: "/bin/true".into(),
                    args: vec![],
                    env: Default::default(),
                    workdir: s.work.clone(),
                    stdio: StdioMode::Null,
                })
                .await
                .expect("exec");
            assert!(
                plain.resize(10, 10).is_err(),
                "{kind}: no terminal to resize"
            );
            drop(plain);
            // Nothing listens on this port inside the sandbox: an error, not a hang.
            assert!(handle.connect_tcp(1).await.is_err(), "{kind}");
            // Ending the workload ends the owner's wait; the handle then refuses.
            std::fs::write(s.work.join("stop"), "").expect("stop");
            let (_sandbox, status) = owner.await.expect("owner");
            assert_eq!((kind, status), (kind, ExitStatus::Code(3)));
            assert!(
                handle
                    .exec(ExecConfig {
                        program: "/bin/true".into(),
                        args: vec![],
                        env: Default::default(),
                        workdir: s.work.clone(),
                        stdio: StdioMode::Null,
                    })
                    .await
                    .is_err(),
                "{kind}: exec after the end"
            );
        }
    });
}

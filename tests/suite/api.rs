//! The runtime API itself: streaming output, exec into a running sandbox, PTY, signal and kill
//! from async code.

use std::sync::{Arc, Once};
use std::time::Duration;

use openshell_policy::Policy;
use openshell_runtime::{ExecConfig, ExitStatus, RuntimeKind, SpawnConfig, StdioMode};
use pretty_assertions::assert_eq;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use super::common::*;

fn use_cli_as_helper() {
    static ONCE: Once = Once::new();
    // The runtime re-executes a binary that dispatches its helper; this test binary does not,
    // so point it at the CLI, which does.
    ONCE.call_once(|| std::env::set_var("OPENSHELL_HELPER_EXE", SANDBOX));
}

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

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
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
                    format!(
                        "openshell\n65534\nsees-main\nwrite={}\nptrace=1\n",
                        if kind == RuntimeKind::Vm { 2 } else { 13 }
                    ),
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

//! Spawning restricted processes: stdio, signals, big output, PTY, failures, setup.

use openshell_runtime::process::protocol::{FailureKind, WaitReport};
use openshell_runtime::vm_protocol::{
    Event, Frame, GuestMount, GuestStdio, GuestTmp, Kind, Request, MAX_GUEST_WRITE,
};
use pretty_assertions::assert_eq;

use super::harness::{
    can_launch, collect, plan, recv_event, send, spawn_request, until_running, Agent, Outcome,
};

#[test]
fn setup_is_ready_once() {
    let agent = Agent::start();
    let setup = Request::Setup {
        hostname: "box".into(),
        mounts: vec![GuestMount {
            tag: "share0".into(),
            path: "/work/data".into(),
            readonly: true,
        }],
        pids_limit: Some(128),
        memory_limit_mib: Some(256),
        identity_max_binary_bytes: None,
        tmp: Some(GuestTmp {
            size_mib: Some(256),
            readonly: false,
            keep: vec![GuestMount {
                tag: "share1".into(),
                path: "/tmp/work".into(),
                readonly: false,
            }],
        }),
        read_only: vec!["/usr".into()],
    };
    let mut conn = agent.request(&setup);
    assert!(matches!(recv_event(&mut conn), Event::Ready));
    let mut again = agent.request(&setup);
    match recv_event(&mut again) {
        Event::Failed { stage, message, .. } => {
            assert_eq!(
                (stage.as_str(), message.as_str()),
                ("protocol", "setup was already done")
            );
        }
        other => panic!("wanted Failed, got {other:?}"),
    }
}

#[test]
fn invalid_setup_is_refused() {
    let agent = Agent::start();
    let mut conn = agent.request(&Request::Setup {
        hostname: "box".into(),
        mounts: vec![GuestMount {
            tag: "share0".into(),
            path: "/work/../etc".into(),
            readonly: false,
        }],
        pids_limit: None,
        memory_limit_mib: None,
        tmp: None,
        read_only: Vec::new(),
        identity_max_binary_bytes: None,
    });
    match recv_event(&mut conn) {
        Event::Failed { stage, .. } => assert_eq!(stage, "validate"),
        other => panic!("wanted Failed, got {other:?}"),
    }
}

#[test]
fn piped_stdio_and_exit_code() {
    if !can_launch("piped_stdio_and_exit_code") {
        return;
    }
    let agent = Agent::start();
    // Reads to the end of its input, so it is still running when StdinEof arrives (with `read`,
    // it could exit and the agent close the connection before the test sent StdinEof).
    let script = "echo out; echo err >&2; x=$(cat); echo got $x; exit 3";
    let mut conn = agent.request(&spawn_request(
        plan(&["/bin/sh", "-c", script]),
        GuestStdio::Piped,
        false,
    ));
    let mut out = until_running(&mut conn);
    send(
        &mut conn,
        &Frame {
            kind: Kind::Stdin,
            payload: b"hi\n".to_vec(),
        },
    );
    send(&mut conn, &Frame::empty(Kind::StdinEof));
    collect(&mut conn, &mut out);
    let report = out
        .restricted
        .clone()
        .unwrap_or_else(|| panic!("no Restricted: {out:?}"));
    assert_eq!(
        (report.uid, report.gid, report.no_new_privs),
        (65534, 65534, true)
    );
    assert!(report.seccomp_rules > 0, "{report:?}");
    assert_eq!(
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            out.stdout_eof,
            out.stderr_eof,
            out.exited,
        ),
        (
            "out\ngot hi\n".to_owned(),
            "err\n".to_owned(),
            true,
            true,
            Some(WaitReport::Code(3))
        )
    );
    assert_eq!(out.order.first().map(String::as_str), Some("Restricted"));
    assert_eq!(out.order.get(1).map(String::as_str), Some("Running"));
    assert_eq!(out.order.last().map(String::as_str), Some("Exited"));
    // The connection ends after Exited.
    assert!(super::harness::recv(&mut conn).is_none());
}

#[test]
fn signal_is_delivered() {
    if !can_launch("signal_is_delivered") {
        return;
    }
    let agent = Agent::start();
    let mut conn = agent.request(&spawn_request(
        plan(&["/bin/sleep", "600"]),
        GuestStdio::Null,
        false,
    ));
    let mut out = until_running(&mut conn);
    send(&mut conn, &Frame::json(&Request::Signal { signal: 15 }));
    collect(&mut conn, &mut out);
    assert_eq!(out.exited, Some(WaitReport::Signal(15)), "{out:?}");
    assert!(out.stdout_eof && out.stderr_eof, "{out:?}");
}

#[test]
fn invalid_signal_is_ignored_and_the_session_goes_on() {
    if !can_launch("invalid_signal_is_ignored_and_the_session_goes_on") {
        return;
    }
    let agent = Agent::start();
    let mut conn = agent.request(&spawn_request(
        plan(&["/bin/sleep", "600"]),
        GuestStdio::Null,
        false,
    ));
    let mut out = until_running(&mut conn);
    send(&mut conn, &Frame::json(&Request::Signal { signal: 4242 }));
    send(&mut conn, &Frame::json(&Request::Signal { signal: -1 }));
    send(&mut conn, &Frame::json(&Request::Signal { signal: 9 }));
    collect(&mut conn, &mut out);
    assert_eq!(out.exited, Some(WaitReport::Signal(9)), "{out:?}");
}

#[test]
fn big_output_arrives_intact_in_small_frames() {
    if !can_launch("big_output_arrives_intact_in_small_frames") {
        return;
    }
    let agent = Agent::start();
    let mut conn = agent.request(&spawn_request(
        plan(&["/bin/sh", "-c", "yes abcdefghij | head -c 2000000"]),
        GuestStdio::Piped,
        false,
    ));
    let mut out = until_running(&mut conn);
    collect(&mut conn, &mut out);
    let expected: Vec<u8> = b"abcdefghij\n"
        .iter()
        .copied()
        .cycle()
        .take(2_000_000)
        .collect();
    assert_eq!(out.stdout.len(), expected.len());
    assert!(out.stdout == expected, "stdout content differs");
    assert!(
        out.largest_payload <= MAX_GUEST_WRITE,
        "{}",
        out.largest_payload
    );
    assert_eq!(out.exited, Some(WaitReport::Code(0)));
}

#[test]
fn pty_spawn_has_a_terminal() {
    if !can_launch("pty_spawn_has_a_terminal") {
        return;
    }
    let agent = Agent::start();
    let mut launch = plan(&[
        "/bin/sh",
        "-c",
        "if [ -t 0 ] && [ -t 1 ]; then echo is-a-tty; fi; stty size; read x; stty size; echo got-$x",
    ]);
    launch.pty = true;
    let mut conn = agent.request(&spawn_request(
        launch,
        GuestStdio::Pty {
            rows: 33,
            cols: 101,
        },
        false,
    ));
    let mut out = until_running(&mut conn);
    // Wait for the first size report, so the resize below comes after it.
    while !String::from_utf8_lossy(&out.stdout).contains("33 101") {
        let frame =
            super::harness::recv(&mut conn).unwrap_or_else(|| panic!("closed early: {out:?}"));
        assert_eq!(frame.kind, Kind::Stdout, "{frame:?}");
        out.stdout.extend_from_slice(&frame.payload);
    }
    send(
        &mut conn,
        &Frame::json(&Request::Resize {
            rows: 34,
            cols: 102,
        }),
    );
    send(
        &mut conn,
        &Frame {
            kind: Kind::Stdin,
            payload: b"yo\n".to_vec(),
        },
    );
    collect(&mut conn, &mut out);
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    // The terminal echoes the input; the resize is applied before the input is written.
    assert_eq!(text, "is-a-tty\n33 101\nyo\n34 102\ngot-yo\n");
    assert!(out.stderr.is_empty());
    assert_eq!(out.exited, Some(WaitReport::Code(0)));
}

#[test]
fn pty_flag_must_match_stdio() {
    let agent = Agent::start();
    let mut conn = agent.request(&spawn_request(
        plan(&["/bin/true"]),
        GuestStdio::Pty { rows: 24, cols: 80 },
        false,
    ));
    let mut out = Outcome::default();
    collect(&mut conn, &mut out);
    assert_eq!(out.failed.map(|f| f.0), Some("protocol".to_owned()));
}

#[test]
fn missing_program_fails_at_exec() {
    if !can_launch("missing_program_fails_at_exec") {
        return;
    }
    let agent = Agent::start();
    let mut conn = agent.request(&spawn_request(
        plan(&["/nonexistent/program"]),
        GuestStdio::Piped,
        false,
    ));
    let mut out = Outcome::default();
    collect(&mut conn, &mut out);
    let (stage, message) = out.failed.unwrap_or_else(|| panic!("wanted Failed"));
    assert_eq!(stage, "exec", "{message}");
    assert!(message.contains("/nonexistent/program"), "{message}");
    assert_eq!(out.failed_kind, Some(FailureKind::NotFound));
    assert_eq!(out.pid, None);

    // A file that exists and cannot be executed is the other kind (126), whatever the message.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let mut conn = agent.request(&spawn_request(
        plan(&[script.to_str().unwrap()]),
        GuestStdio::Piped,
        false,
    ));
    let mut out = Outcome::default();
    collect(&mut conn, &mut out);
    let (stage, message) = out.failed.unwrap_or_else(|| panic!("wanted Failed"));
    assert_eq!(stage, "exec", "{message}");
    assert_eq!(out.failed_kind, Some(FailureKind::NotExecutable));
}

#[test]
fn orphans_are_reaped() {
    if !can_launch("orphans_are_reaped") {
        return;
    }
    let agent = Agent::start();
    // The background child outlives the shell, so it is reparented to the agent.
    let mut conn = agent.request(&spawn_request(
        plan(&[
            "/bin/sh",
            "-c",
            "sleep 0.2 </dev/null >/dev/null 2>&1 & echo $!",
        ]),
        GuestStdio::Piped,
        false,
    ));
    let mut out = until_running(&mut conn);
    collect(&mut conn, &mut out);
    assert_eq!(out.exited, Some(WaitReport::Code(0)));
    let orphan: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{out:?}: {e}"));
    // A zombie would stay forever; poll for its disappearance with a generous deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::path::Path::new(&format!("/proc/{orphan}")).exists() {
        let state = std::fs::read_to_string(format!("/proc/{orphan}/stat")).unwrap_or_default();
        assert!(
            std::time::Instant::now() < deadline,
            "orphan {orphan} not reaped: {state}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn main_process_end_stops_the_agent() {
    if !can_launch("main_process_end_stops_the_agent") {
        return;
    }
    let mut agent = Agent::start();
    let mut conn = agent.request(&spawn_request(plan(&["/bin/true"]), GuestStdio::Null, true));
    let mut out = until_running(&mut conn);
    collect(&mut conn, &mut out);
    assert_eq!(out.exited, Some(WaitReport::Code(0)));
    assert_eq!(agent.wait(), Some(0));
}

#[test]
fn sessions_run_concurrently() {
    if !can_launch("sessions_run_concurrently") {
        return;
    }
    let agent = Agent::start();
    let mut long = agent.request(&spawn_request(
        plan(&["/bin/sh", "-c", "read x; echo long-$x"]),
        GuestStdio::Piped,
        false,
    ));
    let mut long_out = until_running(&mut long);
    // While the first one waits for input, a second one runs to completion.
    let mut short = agent.request(&spawn_request(
        plan(&["/bin/echo", "short"]),
        GuestStdio::Piped,
        false,
    ));
    let mut short_out = Outcome::default();
    collect(&mut short, &mut short_out);
    assert_eq!(short_out.stdout, b"short\n");
    send(
        &mut long,
        &Frame {
            kind: Kind::Stdin,
            payload: b"done\n".to_vec(),
        },
    );
    collect(&mut long, &mut long_out);
    assert_eq!(long_out.stdout, b"long-done\n");
    assert_eq!(long_out.exited, Some(WaitReport::Code(0)));
}

#[test]
fn host_disconnect_kills_the_process() {
    if !can_launch("host_disconnect_kills_the_process") {
        return;
    }
    let agent = Agent::start();
    let mut conn = agent.request(&spawn_request(
        plan(&["/bin/sleep", "600"]),
        GuestStdio::Null,
        false,
    ));
    let out = until_running(&mut conn);
    let pid = out.pid.unwrap_or_else(|| unreachable!());
    drop(conn);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "pid {pid} still there"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

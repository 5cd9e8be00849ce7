//! Bad first frames end their connection, never the agent.

use std::io::{Read, Write};

use openshell_runtime::vm_protocol::{Event, Frame, Kind, Request};
use pretty_assertions::assert_eq;

use super::harness::{recv_event, Agent};

/// The agent still answers: a Signal with no process is refused with a protocol failure.
fn still_serving(agent: &Agent) {
    let mut conn = agent.request(&Request::Signal { signal: 15 });
    match recv_event(&mut conn) {
        Event::Failed { stage, .. } => assert_eq!(stage, "protocol"),
        other => panic!("wanted Failed, got {other:?}"),
    }
}

#[test]
fn bad_first_frames_close_only_their_connection() {
    let mut agent = Agent::start();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("unknown kind", vec![0, 0, 0, 1, 99]),
        ("empty frame", vec![0, 0, 0, 0]),
        ("oversized length", vec![0x7f, 0xff, 0xff, 0xff, 1]),
        (
            "invalid json",
            Frame {
                kind: Kind::Json,
                payload: b"{nope".to_vec(),
            }
            .encode(),
        ),
        (
            "unknown request",
            Frame {
                kind: Kind::Json,
                payload: br#"{"Reboot":{}}"#.to_vec(),
            }
            .encode(),
        ),
        (
            "not a request frame",
            Frame {
                kind: Kind::Stdin,
                payload: b"hi".to_vec(),
            }
            .encode(),
        ),
        ("truncated", vec![0, 0, 0, 9, 1, b'{']),
    ];
    for (name, bytes) in cases {
        let mut conn = agent.connect();
        conn.write_all(&bytes)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        if name == "truncated" {
            let _ = conn.shutdown(std::net::Shutdown::Write);
        }
        let mut rest = Vec::new();
        // The agent closes the connection without answering (a reset is also a close).
        let _ = conn.read_to_end(&mut rest);
        assert_eq!(rest, Vec::<u8>::new(), "{name}");
        assert!(agent.alive(), "{name}: the agent died");
        still_serving(&agent);
    }
}

#[test]
fn bad_frame_during_a_session_ends_it() {
    let agent = Agent::start();
    // A Forward to a port nobody listens on fails cleanly; the agent carries on.
    let mut conn = agent.request(&Request::Forward { port: 1 });
    match recv_event(&mut conn) {
        Event::Failed { stage, .. } => assert_eq!(stage, "connect"),
        other => panic!("wanted Failed, got {other:?}"),
    }
    let mut zero = agent.request(&Request::Forward { port: 0 });
    match recv_event(&mut zero) {
        Event::Failed { stage, .. } => assert_eq!(stage, "validate"),
        other => panic!("wanted Failed, got {other:?}"),
    }
    still_serving(&agent);
}

#[test]
fn resume_needs_all_its_entropy() {
    use openshell_runtime::vm_protocol::RESUME_ENTROPY_BYTES;
    // In test mode a valid Resume is checked, not applied (it would reseed and set the
    // host's clock); the check is the same as in a guest.
    let agent = Agent::start();
    for (len, want) in [
        (0, Err("resume")),
        (RESUME_ENTROPY_BYTES - 1, Err("resume")),
        (RESUME_ENTROPY_BYTES + 1, Err("resume")),
        (RESUME_ENTROPY_BYTES, Ok(())),
    ] {
        let mut conn = agent.request(&Request::Resume {
            realtime_ns: 1_700_000_000_000_000_000,
            entropy: vec![7; len],
        });
        match (recv_event(&mut conn), want) {
            (Event::Ready, Ok(())) => {}
            (Event::Failed { stage, message, .. }, Err(wanted)) => {
                assert_eq!(stage, wanted);
                assert!(
                    message.contains(&format!("expected {RESUME_ENTROPY_BYTES}")),
                    "{message}"
                );
            }
            (got, want) => panic!("{len} bytes: got {got:?}, wanted {want:?}"),
        }
    }
    still_serving(&agent);
}

//! Port forwards to the guest's loopback.

use std::io::{Read, Write};
use std::net::TcpListener;

use openshell_runtime::vm_protocol::{Event, Frame, Kind, Request, MAX_GUEST_WRITE};
use pretty_assertions::assert_eq;

use super::harness::{recv, recv_event, send, Agent};

#[test]
fn forward_round_trips_bytes() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let port = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .port();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap_or_else(|e| panic!("{e}"));
        let mut buf = [0u8; 8192];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let agent = Agent::start();
    let mut conn = agent.request(&Request::Forward { port });
    assert!(matches!(recv_event(&mut conn), Event::Connected));
    let message: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    for chunk in message.chunks(7000) {
        send(
            &mut conn,
            &Frame {
                kind: Kind::Data,
                payload: chunk.to_vec(),
            },
        );
    }
    let mut back = Vec::new();
    while back.len() < message.len() {
        let frame = recv(&mut conn).unwrap_or_else(|| panic!("closed after {} bytes", back.len()));
        assert_eq!(frame.kind, Kind::Data);
        assert!(frame.payload.len() <= MAX_GUEST_WRITE);
        back.extend_from_slice(&frame.payload);
    }
    assert!(back == message, "echoed bytes differ");
    drop(conn);
    let _ = echo.join();
}

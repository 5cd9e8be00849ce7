//! The egress relay names the calling binary and relays bytes both ways.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;

use openshell_proxy::identity::parse_preamble;
use pretty_assertions::assert_eq;

use super::harness::Agent;

#[test]
fn egress_sends_preamble_then_relays() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let host = UnixListener::bind(dir.path().join("egress")).unwrap_or_else(|e| panic!("{e}"));
    let agent = Agent::start_in(dir);

    let mut client = TcpStream::connect(agent.egress).unwrap_or_else(|e| panic!("{e}"));
    let request = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
    client.write_all(request).unwrap_or_else(|e| panic!("{e}"));

    let (conn, _) = host.accept().unwrap_or_else(|e| panic!("{e}"));
    let mut reader = BufReader::new(conn.try_clone().unwrap_or_else(|e| panic!("{e}")));
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&line).into_owned();
    let caller = parse_preamble(line.strip_suffix(b"\n").unwrap_or(&line))
        .unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let me = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((caller.pid, caller.exe), (std::process::id(), me));

    let mut got = vec![0u8; request.len()];
    reader
        .read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, request.to_vec());

    let reply = b"HTTP/1.1 200 Connection established\r\n\r\n";
    (&conn).write_all(reply).unwrap_or_else(|e| panic!("{e}"));
    let mut back = vec![0u8; reply.len()];
    client
        .read_exact(&mut back)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(back, reply.to_vec());
}

#[test]
fn egress_to_an_absent_host_closes_the_client() {
    // No Unix listener: the agent cannot dial the host and closes the client connection.
    let agent = Agent::start();
    let mut client = TcpStream::connect(agent.egress).unwrap_or_else(|e| panic!("{e}"));
    let _ = client.write_all(b"GET http://example.com/ HTTP/1.1\r\n\r\n");
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    assert_eq!(rest, Vec::<u8>::new());
}

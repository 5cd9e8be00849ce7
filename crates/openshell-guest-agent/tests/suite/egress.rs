//! The egress relay names the calling binary and relays bytes both ways; it credits a
//! connection only to the launched process that made it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixListener;

use openshell_proxy::identity::parse_preamble;
use openshell_runtime::vm_protocol::GuestStdio;
use pretty_assertions::assert_eq;

use super::harness::{can_launch, collect, plan, spawn_request, Agent, Outcome};

/// curl, launched by the agent, tunnels through the relay: the host end gets the preamble
/// naming curl (never the agent or the test) and then curl's bytes; the answer reaches curl.
#[test]
fn egress_sends_preamble_then_relays() {
    if !can_launch("egress_sends_preamble_then_relays") {
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let host = UnixListener::bind(dir.path().join("egress")).unwrap_or_else(|e| panic!("{e}"));
    let agent = Agent::start_in(dir);
    let proxy = format!("http://{}", agent.egress);
    let mut conn = agent.request(&spawn_request(
        plan(&[
            "/usr/bin/curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            "--max-time",
            "20",
            "-p",
            "-x",
            &proxy,
            "http://example.com:8080/",
        ]),
        GuestStdio::Piped,
        false,
    ));
    let (relayed, _) = host.accept().unwrap_or_else(|e| panic!("{e}"));
    let mut reader = BufReader::new(relayed.try_clone().unwrap_or_else(|e| panic!("{e}")));
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&line).into_owned();
    let caller = parse_preamble(line.strip_suffix(b"\n").unwrap_or(&line))
        .unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let curl = std::fs::canonicalize("/usr/bin/curl").unwrap_or_default();
    assert_eq!(caller.exe, curl, "{text}");
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        let mut l = String::new();
        if reader.read_line(&mut l).unwrap_or(0) == 0 {
            break;
        }
        head.push_str(&l);
    }
    assert!(
        head.starts_with("CONNECT example.com:8080 HTTP/1.1\r\n"),
        "{head}"
    );
    (&relayed)
        .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        .unwrap_or_else(|e| panic!("{e}"));
    drop(relayed);
    let mut out = Outcome::default();
    collect(&mut conn, &mut out);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
}

/// A connection no launched process opened (this test's own) is not relayed: the agent
/// answers 403 naming why, and the host end sees nothing.
#[test]
fn a_connection_no_launched_process_opened_is_refused() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let host = UnixListener::bind(dir.path().join("egress")).unwrap_or_else(|e| panic!("{e}"));
    host.set_nonblocking(true).unwrap_or_else(|e| panic!("{e}"));
    let agent = Agent::start_in(dir);
    let mut client = TcpStream::connect(agent.egress).unwrap_or_else(|e| panic!("{e}"));
    let _ = client.write_all(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n");
    let mut answer = Vec::new();
    let _ = client.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
    assert!(answer.contains("\"missing\":[\"binary\"]"), "{answer}");
    assert!(
        answer.contains("no workload has been launched")
            || answer.contains("no record of which process connected"),
        "{answer}"
    );
    assert!(host.accept().is_err(), "the host end was dialled");
}

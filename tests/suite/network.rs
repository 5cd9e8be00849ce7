//! The network namespace: one veth whose only peer is the edge namespace, no default route,
//! nothing of the host reachable.

use std::net::TcpListener;

use pretty_assertions::assert_eq;

use super::common::*;

const ENETUNREACH: i32 = 101;
const ECONNREFUSED: i32 = 111;

#[test]
fn only_route_is_to_the_edge() {
    if !can_run("only_route_is_to_the_edge") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let out = s.run(backend, &[], &["/bin/cat", "/proc/net/route"]);
        if backend == "vm" {
            // The guest has no network device at all: no route, not even to an edge.
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            assert_eq!(stdout(&out).lines().skip(1).count(), 0, "{}", stdout(&out));
            continue;
        }
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let routes: Vec<Vec<String>> = stdout(&out)
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().take(3).map(str::to_owned).collect())
            .collect();
        // eth0 10.200.0.0/30, no gateway; no default route (destination 00000000).
        assert_eq!(
            (backend, routes),
            (
                backend,
                vec![vec![
                    "eth0".to_owned(),
                    "0000C80A".to_owned(),
                    "00000000".to_owned()
                ]]
            )
        );
    }
}

#[test]
fn host_services_and_other_destinations_are_unreachable() {
    if !can_run("host_services_and_other_destinations_are_unreachable") {
        return;
    }
    // A host service on every address, and one on another loopback address.
    let any = TcpListener::bind("0.0.0.0:0").expect("bind any");
    let any_port = any.local_addr().expect("addr").port();
    let lo2 = TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    let lo2_addr = lo2.local_addr().expect("addr").to_string();
    any.set_nonblocking(true).expect("nonblocking");
    lo2.set_nonblocking(true).expect("nonblocking");
    for backend in backends() {
        let s = Scratch::new("");
        let targets = [
            format!("10.200.0.1:{any_port}"),
            lo2_addr.clone(),
            // TEST-NET-1 (RFC 5737): never routed; the connect fails before any packet leaves.
            "192.0.2.1:80".to_owned(),
        ];
        let got: Vec<(String, i32)> = targets
            .iter()
            .map(|t| {
                (
                    t.clone(),
                    code(&s.run(backend, &[], &[PROBE, "connect", t])),
                )
            })
            .collect();
        // The process backend reaches its (empty) edge namespace and gets a refusal; the VM
        // has no network device, so nothing but its own loopback is even routable.
        let edge = if backend == "vm" {
            ENETUNREACH
        } else {
            ECONNREFUSED
        };
        assert_eq!(
            (backend, got),
            (
                backend,
                vec![
                    (targets[0].clone(), edge),
                    (targets[1].clone(), ECONNREFUSED),
                    (targets[2].clone(), ENETUNREACH)
                ]
            )
        );
        assert!(
            any.accept().is_err(),
            "{backend}: the host service saw no connection"
        );
        assert!(
            lo2.accept().is_err(),
            "{backend}: the host loopback service saw no connection"
        );
    }
}

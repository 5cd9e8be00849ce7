//! Egress through the proxy, with real curl and wget inside the sandbox, against upstream
//! servers on 127.0.0.0/8 addresses other than 127.0.0.1. Every check looks at what the upstream
//! received, not only at what the client printed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pretty_assertions::assert_eq;

use super::common::*;

/// A tiny HTTP upstream that records each request line it receives.
pub(super) struct Upstream {
    pub(super) addr: SocketAddr,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    pub(super) fn start(ip: &str) -> Upstream {
        let listener = TcpListener::bind((ip, 0)).expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut reader = BufReader::new(&stream);
                    let mut first = String::new();
                    if reader.read_line(&mut first).is_err() {
                        return;
                    }
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; length.min(1 << 20)];
                    let _ = reader.read_exact(&mut body);
                    log.lock().expect("lock").push(first.trim_end().to_owned());
                    let reply = "upstream-ok\n";
                    let _ = (&stream).write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}", reply.len())
                            .as_bytes(),
                    );
                });
            }
        });
        Upstream { addr, seen }
    }

    pub(super) fn seen(&self) -> Vec<String> {
        self.seen.lock().expect("lock").clone()
    }

    pub(super) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn network_section(body: &str) -> String {
    format!("network_policies:\n{body}")
}

fn endpoint_policy(name: &str, up: &Upstream, binary: &str, extra: &str) -> String {
    format!(
        "  {name}:\n    endpoints:\n      - host: \"{ip}\"\n        port: {port}\n        allowed_ips: [127.0.0.0/8]\n{extra}    binaries: [{{ path: {binary} }}]\n",
        ip = up.addr.ip(),
        port = up.addr.port(),
    )
}

const CURL_CODE: &str = "curl -s -o /dev/null -w '%{http_code}'";

#[test]
fn allowed_binary_and_host_pass_others_get_403() {
    if !can_run("allowed_binary_and_host_pass_others_get_403") {
        return;
    }
    for backend in backends() {
        let up = Upstream::start("127.0.0.2");
        let other = Upstream::start("127.0.0.3");
        let s = Scratch::new(&network_section(&endpoint_policy(
            "upstream",
            &up,
            "/usr/bin/curl",
            "",
        )));
        let script = format!(
            "{CURL_CODE} {a}; echo; {CURL_CODE} --proxytunnel {b}; echo; {CURL_CODE} {c}; echo; \
             wget -q -O /dev/null {a}; echo wget=$?; curl -s {a}",
            a = up.url("/allowed"),
            b = up.url("/tunnelled"),
            c = other.url("/other-host"),
        );
        let out = s.run(backend, &[], &["/bin/sh", "-c", &script]);
        assert_eq!(
            (backend, stdout(&out)),
            (backend, "200\n200\n403\nwget=8\nupstream-ok\n".to_owned()),
            "{}",
            stderr(&out)
        );
        // The allowed requests (forward form and CONNECT tunnel) reached the upstream; the
        // denied ones never did.
        let seen = up.seen();
        assert!(
            seen.contains(&"GET /allowed HTTP/1.1".to_owned()),
            "{seen:?}"
        );
        assert!(
            seen.contains(&"GET /tunnelled HTTP/1.1".to_owned()),
            "{seen:?}"
        );
        assert_eq!(
            seen.iter().filter(|l| l.contains("/allowed")).count(),
            2,
            "wget never got through: {seen:?}"
        );
        assert_eq!(other.seen(), Vec::<String>::new());
    }
}

#[test]
fn deny_is_a_json_403_an_agent_can_act_on() {
    if !can_run("deny_is_a_json_403_an_agent_can_act_on") {
        return;
    }
    let up = Upstream::start("127.0.0.2");
    for backend in backends() {
        let s = Scratch::new(&network_section(&endpoint_policy(
            "upstream",
            &up,
            "/usr/bin/python3*",
            "",
        )));
        let out = s.run(
            backend,
            &[],
            &["/bin/sh", "-c", &format!("curl -s {}", up.url("/x"))],
        );
        let body = stdout(&out);
        assert!(body.contains("\"error\":\"policy_denied\""), "{body}");
        assert!(
            body.contains("\"missing\":[\"binary\"]"),
            "names what was missing: {body}"
        );
        assert!(
            body.contains("\"closest_policy\":\"upstream\""),
            "names the closest policy: {body}"
        );
        assert!(
            body.contains("/usr/bin/curl"),
            "names the calling binary: {body}"
        );
        assert_eq!(up.seen(), Vec::<String>::new());
    }
}

#[test]
fn l7_rules_and_audit_mode_on_plain_http() {
    if !can_run("l7_rules_and_audit_mode_on_plain_http") {
        return;
    }
    for backend in backends() {
        let ro = Upstream::start("127.0.0.2");
        let audited = Upstream::start("127.0.0.3");
        let policies = endpoint_policy(
            "readonly",
            &ro,
            "/usr/bin/curl",
            "        access: read-only\n",
        ) + &endpoint_policy(
            "audited",
            &audited,
            "/usr/bin/curl",
            "        enforcement: audit\n        access: read-only\n",
        );
        let s = Scratch::new(&network_section(&policies));
        // Outside the workload's reach: a log in the workdir is refused (protected::*).
        let audit = s.outside.join("audit.jsonl");
        let script = format!(
            "{CURL_CODE} {a}; echo; {CURL_CODE} -X POST -d x {b}; echo; {CURL_CODE} -X POST -d x {c}; echo",
            a = ro.url("/get"),
            b = ro.url("/post"),
            c = audited.url("/audited-post"),
        );
        let out = s.run(
            backend,
            &["--audit-log", audit.to_str().unwrap()],
            &["/bin/sh", "-c", &script],
        );
        assert_eq!(
            (backend, stdout(&out)),
            (backend, "200\n403\n200\n".to_owned()),
            "{}",
            stderr(&out)
        );
        assert_eq!(ro.seen(), vec!["GET /get HTTP/1.1".to_owned()]);
        assert_eq!(
            audited.seen(),
            vec!["POST /audited-post HTTP/1.1".to_owned()]
        );
        let log = std::fs::read_to_string(&audit).expect("audit log");
        let actions: Vec<&str> = log
            .lines()
            .map(|l| {
                if l.contains("\"action\":\"allow\"") {
                    "allow"
                } else if l.contains("\"action\":\"audit\"") {
                    "audit"
                } else {
                    "deny"
                }
            })
            .collect();
        assert_eq!(actions, vec!["allow", "deny", "audit"], "{log}");
    }
}

#[test]
fn ssrf_targets_are_refused_without_allowed_ips() {
    if !can_run("ssrf_targets_are_refused_without_allowed_ips") {
        return;
    }
    let up = Upstream::start("127.0.0.2");
    for backend in backends() {
        let policies = format!(
            "  loopback:\n    endpoints: [{{ host: \"{ip}\", port: {port} }}]\n    binaries: [{{ path: /usr/bin/curl }}]\n\
             \x20 metadata:\n    endpoints: [{{ host: 169.254.169.254, port: 80 }}]\n    binaries: [{{ path: /usr/bin/curl }}]\n",
            ip = up.addr.ip(),
            port = up.addr.port()
        );
        let s = Scratch::new(&network_section(&policies));
        let script = format!(
            "{CURL_CODE} {}; echo; {CURL_CODE} http://169.254.169.254/latest/meta-data/; echo",
            up.url("/ssrf")
        );
        let out = s.run(backend, &[], &["/bin/sh", "-c", &script]);
        assert_eq!(
            (backend, stdout(&out)),
            (backend, "403\n403\n".to_owned()),
            "{}",
            stderr(&out)
        );
        assert_eq!(up.seen(), Vec::<String>::new());
    }
}

/// Rewrite the policy while a sandbox runs (replace it, break it, delete it, write it again);
/// the workload waits for `go-N` files between phases.
#[test]
fn live_update_from_the_policy_file() {
    if !can_run("live_update_from_the_policy_file") {
        return;
    }
    let up = Upstream::start("127.0.0.2");
    for backend in backends() {
        let s = Scratch::new("");
        let script = format!(
            "for phase in 1 2 3 4 5; do while [ ! -e go-$phase ]; do sleep 0.05; done; \
             {CURL_CODE} {url} > result-$phase; touch done-$phase; done",
            url = up.url("/live")
        );
        let mut child = s
            .command(backend, &[], &["/bin/sh", "-c", &script])
            .spawn()
            .expect("spawn");
        let phase = |n: u32| {
            std::fs::write(s.work.join(format!("go-{n}")), "").expect("go");
            assert!(
                wait_until(Duration::from_secs(20), || s
                    .work
                    .join(format!("done-{n}"))
                    .exists()),
                "phase {n}"
            );
            std::fs::read_to_string(s.work.join(format!("result-{n}"))).expect("result")
        };
        // 1: no network policy yet.
        let first = phase(1);
        // 2: the file now allows curl (rename-replace, as editors do).
        let allowing = std::fs::read_to_string(&s.policy).expect("read")
            + &network_section(&endpoint_policy("upstream", &up, "/usr/bin/curl", ""));
        let tmp = s.policy.with_extension("tmp");
        std::fs::write(&tmp, &allowing).expect("write");
        std::fs::rename(&tmp, &s.policy).expect("rename");
        std::thread::sleep(Duration::from_millis(1000));
        let second = phase(2);
        // 3: an invalid document keeps the last good policy.
        std::fs::write(&s.policy, allowing.replace("port:", "port: -1 #")).expect("write");
        std::thread::sleep(Duration::from_millis(1000));
        let third = phase(3);
        // 4: the file deleted: the last good policy stays.
        let without = std::fs::read_to_string(&s.policy).expect("read");
        std::fs::remove_file(&s.policy).expect("delete the policy");
        std::thread::sleep(Duration::from_millis(1000));
        let fourth = phase(4);
        // 5: a file at the path again (without the network section) is applied.
        let none = without.replace(
            &network_section(&endpoint_policy("upstream", &up, "/usr/bin/curl", ""))
                .replace("port:", "port: -1 #"),
            "",
        );
        std::fs::write(&s.policy, none).expect("write");
        std::thread::sleep(Duration::from_millis(1000));
        let fifth = phase(5);
        let status = child.wait().expect("wait");
        assert_eq!(
            (backend, first, second, third, fourth, fifth, status.code()),
            (
                backend,
                "403".to_owned(),
                "200".to_owned(),
                "200".to_owned(),
                "200".to_owned(),
                "403".to_owned(),
                Some(0)
            )
        );
    }
}

/// Serve a policy document over HTTP from the test, change it mid-run.
#[test]
fn live_update_from_a_policy_url() {
    if !can_run("live_update_from_a_policy_url") {
        return;
    }
    let up = Upstream::start("127.0.0.2");
    for backend in backends() {
        let s = Scratch::new("");
        let base = std::fs::read_to_string(&s.policy).expect("read");
        let document = Arc::new(Mutex::new(base.clone()));
        let server = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}/policy.yaml", server.local_addr().expect("addr"));
        let served = document.clone();
        std::thread::spawn(move || {
            for stream in server.incoming().flatten() {
                let mut reader = BufReader::new(&stream);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                }
                let body = served.lock().expect("lock").clone();
                let etag = format!("\"{}\"", body.len());
                let _ = (&stream).write_all(
                    format!("HTTP/1.1 200 OK\r\nETag: {etag}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                        .as_bytes(),
                );
            }
        });
        let script = format!(
            "for phase in 1 2; do while [ ! -e go-$phase ]; do sleep 0.05; done; \
             {CURL_CODE} {u} > result-$phase; touch done-$phase; done",
            u = up.url("/from-url")
        );
        let mut cmd = std::process::Command::new(SANDBOX);
        cmd.args([
            "--runtime",
            backend,
            "--policy-url",
            &url,
            "--policy-poll-interval",
            "0.2",
            "--workdir",
        ])
        .arg(&s.work)
        .args(["--", "/bin/sh", "-c", &script])
        .stdin(std::process::Stdio::null());
        let mut child = cmd.spawn().expect("spawn");
        let phase = |n: u32| {
            std::fs::write(s.work.join(format!("go-{n}")), "").expect("go");
            assert!(
                wait_until(Duration::from_secs(20), || s
                    .work
                    .join(format!("done-{n}"))
                    .exists()),
                "phase {n}"
            );
            std::fs::read_to_string(s.work.join(format!("result-{n}"))).expect("result")
        };
        let first = phase(1);
        *document.lock().expect("lock") =
            base.clone() + &network_section(&endpoint_policy("upstream", &up, "/usr/bin/curl", ""));
        std::thread::sleep(Duration::from_millis(1000));
        let second = phase(2);
        let status = child.wait().expect("wait");
        assert_eq!(
            (backend, first, second, status.code()),
            (backend, "403".to_owned(), "200".to_owned(), Some(0))
        );
    }
}

#[test]
fn a_binary_whose_content_changed_is_denied() {
    if !can_run("a_binary_whose_content_changed_is_denied") {
        return;
    }
    for backend in backends() {
        let up = Upstream::start("127.0.0.2");
        let s = Scratch::new("");
        let tool = s.work.join("tool");
        s.write_policy(&network_section(&endpoint_policy(
            "upstream",
            &up,
            tool.to_str().unwrap(),
            "",
        )));
        // The same path, first with curl's bytes, then with one more byte (still a working curl).
        let script = format!(
            "cat /usr/bin/curl > tool; chmod +x tool; ./tool -s -o /dev/null -w '%{{http_code}}' {a}; echo; \
             printf x >> tool; ./tool -s -w '%{{http_code}}' {b}; echo",
            a = up.url("/first"),
            b = up.url("/second"),
        );
        let out = s.run(backend, &[], &["/bin/sh", "-c", &script]);
        let text = stdout(&out);
        assert!(
            text.starts_with("200\n"),
            "{backend}: the first binary is allowed: {text} {}",
            stderr(&out)
        );
        assert!(
            text.contains("binary content changed since first seen") && text.ends_with("403\n"),
            "{backend}: the changed binary is denied with a reason: {text}"
        );
        assert_eq!(up.seen(), vec!["GET /first HTTP/1.1".to_owned()]);
    }
}

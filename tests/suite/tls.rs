//! TLS termination (`tls: terminate`) and credentials, with real clients inside a sandbox on
//! each backend. The upstreams are TLS servers on 127.0.0.x signed by a test CA made here with
//! rcgen (handed to the proxy with `--upstream-ca`); the workload trusts the sandbox's own CA
//! only through the bundle the runtime placed and the variables pointing at it. Every verdict
//! is read on the host: what each upstream connection carried (requests, headers, ALPN), the
//! audit log, and the sandbox's processes' environment and memory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pretty_assertions::assert_eq;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::common::*;

/// A test CA (its PEM written to `dir/upstream-ca.pem`) and a server certificate it signed
/// for 127.0.0.2 and 127.0.0.3.
fn test_pki(dir: &Path) -> (PathBuf, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).expect("test CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.2".into(), "127.0.0.3".into()])
        .expect("params");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca).expect("server certificate");
    let pem = dir.join("upstream-ca.pem");
    std::fs::write(&pem, ca.pem()).expect("write CA");
    (
        pem,
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// What one TLS connection to an upstream carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Conn {
    alpn: Option<String>,
    /// Each request's head, as received.
    requests: Vec<String>,
}

/// A keep-alive HTTP/1.1 server over TLS (offering h2 and http/1.1 by ALPN) on `ip`:0; it
/// records every connection and answers every request `200 ok <path>`.
struct TlsUpstream {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Conn>>>,
}

impl TlsUpstream {
    fn start(ip: &str, cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Self {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let config = Arc::new(config);
        let listener = TcpListener::bind((ip, 0)).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let record = conns.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let config = config.clone();
                let record = record.clone();
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
                    let Ok(conn) = rustls::ServerConnection::new(config) else {
                        return;
                    };
                    let mut tls = rustls::StreamOwned::new(conn, stream);
                    let mut reader = BufReader::new(&mut tls);
                    let mut index = None;
                    loop {
                        let mut head = String::new();
                        loop {
                            let mut line = String::new();
                            match reader.read_line(&mut line) {
                                Ok(0) | Err(_) => return,
                                Ok(_) => {}
                            }
                            head.push_str(&line);
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        let mut body = vec![0u8; length.min(1 << 20)];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        let at = *index.get_or_insert_with(|| {
                            let alpn = reader
                                .get_ref()
                                .conn
                                .alpn_protocol()
                                .map(|p| String::from_utf8_lossy(p).into_owned());
                            let mut all = record.lock().expect("lock");
                            all.push(Conn {
                                alpn,
                                requests: Vec::new(),
                            });
                            all.len() - 1
                        });
                        record.lock().expect("lock")[at].requests.push(head.clone());
                        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                        let reply = format!("ok {path}\n");
                        let out = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{reply}",
                            reply.len()
                        );
                        let tls = reader.get_mut();
                        if tls.write_all(out.as_bytes()).is_err() || tls.flush().is_err() {
                            return;
                        }
                    }
                });
            }
        });
        TlsUpstream { addr, conns }
    }

    fn conns(&self) -> Vec<Conn> {
        self.conns.lock().expect("lock").clone()
    }

    /// Each connection's request lines.
    fn request_lines(&self) -> Vec<Vec<String>> {
        self.conns()
            .iter()
            .map(|c| {
                c.requests
                    .iter()
                    .map(|r| r.lines().next().unwrap_or("").to_owned())
                    .collect()
            })
            .collect()
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }
}

/// A `tls: terminate` endpoint for `binaries` at `addr`, with `extra` endpoint lines.
fn terminated(name: &str, addr: SocketAddr, binaries: &[&str], extra: &str) -> String {
    let binaries: Vec<String> = binaries
        .iter()
        .map(|b| format!("{{ path: {b} }}"))
        .collect();
    format!(
        "  {name}:\n    endpoints:\n      - host: \"{ip}\"\n        port: {port}\n        allowed_ips: [127.0.0.0/8]\n        tls: terminate\n{extra}    binaries: [{}]\n",
        binaries.join(", "),
        ip = addr.ip(),
        port = addr.port(),
    )
}

/// The JSON lines of an audit log.
fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

const PYTHON: &str = "/usr/bin/python3.11";
const GIT: &str = "/usr/local/bin/git";
const NODE: &str = "/usr/bin/node";

/// Whether the clients the tests run (Debian's, at these paths) are installed: a skip says
/// which is missing, and in CI a missing one is a failure.
fn clients_present(test: &str, clients: &[&str]) -> bool {
    for client in clients {
        if !Path::new(client).exists() {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: this machine should have {client} in CI");
            }
            eprintln!("SKIP {test}: {client} is not installed");
            return false;
        }
    }
    true
}

/// Python's requests, when the host's python3 has it (the part that uses it says when not).
fn python_has_requests() -> bool {
    let has = std::process::Command::new(PYTHON)
        .args(["-c", "import requests"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has {
        eprintln!("note: {PYTHON} has no requests module: its part is left out");
    }
    has
}

/// curl, python3 (http.client on one connection, urllib, requests where installed), node
/// (its own CONNECT, then TLS trusting NODE_EXTRA_CA_CERTS) and git, all unmodified, through
/// an endpoint with `tls: terminate` and `access: read-only`: on one keep-alive connection a
/// GET passes, a DELETE gets 403 and the next GET passes again; the upstream receives only
/// the allowed requests, on one connection per client connection, negotiated as http/1.1
/// although both the clients and the upstream offer h2.
#[test]
fn terminated_https_is_decided_per_request_for_real_clients() {
    let test = "terminated_https_is_decided_per_request_for_real_clients";
    if !can_run(test) || !clients_present(test, &["/usr/bin/curl", PYTHON, GIT, NODE]) {
        return;
    }
    let requests = python_has_requests();
    for backend in backends() {
        let s = Scratch::new("");
        let (ca, cert, key) = test_pki(&s.outside);
        let up = TlsUpstream::start("127.0.0.2", cert, key);
        let binaries = ["/usr/bin/curl", PYTHON, GIT, NODE];
        s.write_policy(&format!(
            "network_policies:\n{}",
            terminated("api", up.addr, &binaries, "        access: read-only\n")
        ));
        let audit = s.outside.join("audit.jsonl");
        let (ip, port) = (up.addr.ip(), up.addr.port());
        let python = format!(
            r#"
import http.client, os, ssl, urllib.request
proxy = os.environ["HTTPS_PROXY"][len("http://"):]
host, pport = proxy.rsplit(":", 1)
c = http.client.HTTPSConnection(host, int(pport), context=ssl.create_default_context())
c.set_tunnel("{ip}", {port})
out = []
for method, path in [("GET", "/py-1"), ("DELETE", "/py-delete"), ("GET", "/py-2")]:
    c.request(method, path)
    r = c.getresponse()
    r.read()
    out.append(str(r.status))
print("python", " ".join(out))
print("urllib", urllib.request.urlopen("https://{ip}:{port}/urllib").status)
if {requests}:
    import requests
    print("requests", requests.get("https://{ip}:{port}/requests").status_code)
"#,
            requests = if requests { "True" } else { "False" },
        );
        std::fs::write(s.work.join("client.py"), python).expect("write");
        let node = format!(
            r#"
const http = require("http"), tls = require("tls");
const proxy = new URL(process.env.HTTPS_PROXY);
const req = http.request({{ host: proxy.hostname, port: proxy.port, method: "CONNECT", path: "{ip}:{port}" }});
req.on("connect", (res, socket) => {{
  const t = tls.connect({{ socket, host: "{ip}", ALPNProtocols: ["h2", "http/1.1"] }}, () => {{
    t.write("GET /node HTTP/1.1\r\nHost: {ip}:{port}\r\nConnection: close\r\n\r\n");
  }});
  let data = "";
  t.on("data", (d) => (data += d));
  t.on("end", () => console.log("node", data.split("\r\n")[0], t.alpnProtocol));
  t.on("error", (e) => console.log("node error", e.message));
}});
req.end();
"#
        );
        std::fs::write(s.work.join("client.js"), node).expect("write");
        let script = format!(
            "curl -s -o /dev/null -w 'curl %{{http_code}} %{{num_connects}} %{{http_version}}\\n' {a} \
               --next -s -o /dev/null -w 'curl %{{http_code}} %{{num_connects}} %{{http_version}}\\n' -X DELETE {d} \
               --next -s -o /dev/null -w 'curl %{{http_code}} %{{num_connects}} %{{http_version}}\\n' {c}; \
             python3 client.py; node client.js; \
             git ls-remote {repo} >/dev/null 2>git.err; echo git $?",
            a = up.url("/curl-1"),
            d = up.url("/curl-delete"),
            c = up.url("/curl-2"),
            repo = up.url("/repo.git"),
        );
        let out = s.run(
            backend,
            &[
                "--audit-log",
                audit.to_str().unwrap(),
                "--upstream-ca",
                ca.to_str().unwrap(),
            ],
            &["/bin/sh", "-c", &script],
        );
        let mut want = vec![
            "curl 200 1 1.1",
            "curl 403 0 1.1",
            "curl 200 0 1.1",
            "python 200 403 200",
            "urllib 200",
        ];
        if requests {
            want.push("requests 200");
        }
        // git gets the upstream's answer to its first request, which is no git repository.
        want.extend(["node HTTP/1.1 200 OK http/1.1", "git 128"]);
        assert_eq!(
            (
                backend,
                stdout(&out).lines().map(str::to_owned).collect::<Vec<_>>()
            ),
            (
                backend,
                want.iter().map(|l| l.to_string()).collect::<Vec<_>>()
            ),
            "{}\n{}",
            stderr(&out),
            std::fs::read_to_string(s.work.join("git.err")).unwrap_or_default()
        );
        let mut want_conns = vec![
            vec!["GET /curl-1 HTTP/1.1", "GET /curl-2 HTTP/1.1"],
            vec!["GET /py-1 HTTP/1.1", "GET /py-2 HTTP/1.1"],
            vec!["GET /urllib HTTP/1.1"],
        ];
        if requests {
            want_conns.push(vec!["GET /requests HTTP/1.1"]);
        }
        want_conns.extend([
            vec!["GET /node HTTP/1.1"],
            vec!["GET /repo.git/info/refs?service=git-upload-pack HTTP/1.1"],
        ]);
        assert_eq!(
            up.request_lines(),
            want_conns
                .iter()
                .map(|c| c.iter().map(|l| l.to_string()).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            "{backend}"
        );
        let alpn: Vec<Option<String>> = up.conns().into_iter().map(|c| c.alpn).collect();
        assert_eq!(
            alpn,
            vec![Some("http/1.1".to_owned()); want_conns.len()],
            "{backend}"
        );
        let denied: Vec<(String, String)> = audit_lines(&audit)
            .iter()
            .filter(|l| l["action"] == "deny")
            .map(|l| {
                (
                    l["method"].as_str().unwrap_or("").to_owned(),
                    l["path"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        assert_eq!(
            denied,
            vec![
                ("DELETE".to_owned(), "/curl-delete".to_owned()),
                ("DELETE".to_owned(), "/py-delete".to_owned()),
            ],
            "{backend}"
        );
    }
}

/// The sandbox's processes, seen from the host, while the sandbox runs: on the process
/// backend every member of its cgroup (init, the shell, the sleeper); on the vm backend every
/// descendant of the supervisor: the jail helpers, the VMM (whose memory holds the whole
/// guest) and its daemons.
fn sandbox_processes(backend: &str, supervisor: u32) -> Vec<i32> {
    let mut pids = Vec::new();
    if backend == "process" {
        for dir in sandbox_cgroups(supervisor) {
            let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
                continue;
            };
            pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    } else {
        let mut parents = std::collections::HashMap::new();
        for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            if let Some(parent) = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .and_then(|v| v.trim().parse::<u32>().ok())
            {
                parents.insert(pid, parent);
            }
        }
        for &pid in parents.keys() {
            let mut at = pid;
            // Bounded walk up the tree (pid 1's parent is 0).
            for _ in 0..64 {
                match parents.get(&at) {
                    Some(&p) if p == supervisor => {
                        pids.push(pid as i32);
                        break;
                    }
                    Some(&p) if p > 1 => at = p,
                    _ => break,
                }
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Which of `needles` occur anywhere in the readable memory of `pid` (read from the host
/// through /proc/PID/mem, region by region).
fn memory_holds(pid: i32, needles: &[&[u8]]) -> Vec<bool> {
    let mut found = vec![false; needles.len()];
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return found;
    };
    let Ok(mem) = std::fs::File::open(format!("/proc/{pid}/mem")) else {
        return found;
    };
    let longest = needles.iter().map(|n| n.len()).max().unwrap_or(1);
    let mut chunk = vec![0u8; 1 << 20];
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let mut at = start;
        // Overlap consecutive reads so a needle across a boundary is found.
        let overlap = longest as u64;
        while at < end {
            let want = ((end - at) as usize).min(chunk.len());
            use std::os::unix::fs::FileExt;
            let Ok(n) = mem.read_at(&mut chunk[..want], at) else {
                break;
            };
            if n == 0 {
                break;
            }
            for (i, needle) in needles.iter().enumerate() {
                if !found[i] && chunk[..n].windows(needle.len()).any(|w| w == *needle) {
                    found[i] = true;
                }
            }
            if (n as u64) <= overlap {
                break;
            }
            at += n as u64 - overlap;
        }
    }
    found
}

/// Whether `needle` occurs in a file below `dir` (symlinks not followed).
fn files_hold(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                let data = std::fs::read(e.path()).unwrap_or_default();
                if data.windows(needle.len()).any(|w| w == needle) {
                    found.push(e.path());
                }
            }
        }
    }
    found
}

fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A credential read from the supervisor's environment: the workload holds a placeholder;
/// curl and python (urllib) sending it to the credential's endpoint reach the upstream with
/// the real value; the same placeholder sent to another allowed host (127.0.0.3) or over plain
/// HTTP is refused and logged, and those upstreams see nothing. While the sandbox still runs,
/// the host finds the value in no sandboxed process's environment or memory (process backend:
/// every member of the sandbox; vm backend: QEMU and its daemons, whose memory holds the whole
/// guest) and in no file the sandbox could write; the placeholder is found there (the search
/// looks where it should).
#[test]
fn a_credential_reaches_only_its_endpoint_and_never_the_sandbox() {
    let test = "a_credential_reaches_only_its_endpoint_and_never_the_sandbox";
    if !can_run(test) || !clients_present(test, &["/usr/bin/curl", PYTHON]) {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let (ca, cert, key) = test_pki(&s.outside);
        let api = TlsUpstream::start("127.0.0.2", cert.clone(), key.clone_key());
        let other = TlsUpstream::start("127.0.0.3", cert, key);
        let plain = super::egress::Upstream::start("127.0.0.4");
        let secret = format!("sk-test-{}", random_hex());
        let source = format!("OPENSHELL_TEST_SECRET_{}", &random_hex()[..8]);
        let binaries = ["/usr/bin/curl", PYTHON];
        s.write_policy(&format!(
            "network_policies:\n{}{}  plain:\n    endpoints:\n      - host: \"127.0.0.4\"\n        port: {pport}\n        allowed_ips: [127.0.0.0/8]\n    binaries: [{{ path: /usr/bin/curl }}]\n\
             credentials:\n  api:\n    from_env: {source}\n    env: API_KEY\n    endpoints: [{{ host: 127.0.0.2, port: {port} }}]\n",
            terminated("api", api.addr, &binaries, ""),
            terminated("other", other.addr, &binaries, ""),
            pport = plain.addr.port(),
            port = api.addr.port(),
        ));
        let audit = s.outside.join("audit.jsonl");
        let python = format!(
            "import os, urllib.request\n\
             r = urllib.request.Request('{url}', headers={{'X-Api-Key': os.environ['API_KEY']}})\n\
             print('urllib', urllib.request.urlopen(r).status)\n",
            url = api.url("/python"),
        );
        std::fs::write(s.work.join("client.py"), python).expect("write");
        let code = "-s -o /dev/null -w '%{http_code}\\n'";
        let script = format!(
            "curl {code} -H \"Authorization: Bearer $API_KEY\" {right}; \
             curl {code} -H \"Authorization: Bearer $API_KEY\" {wrong}; \
             curl {code} -H \"Authorization: Bearer $API_KEY\" {plain}; \
             python3 client.py; touch done; exec sleep 60",
            right = api.url("/curl"),
            wrong = other.url("/leak"),
            plain = plain.url("/plain-leak"),
        );
        let mut child = s
            .command(
                backend,
                &[
                    "--audit-log",
                    audit.to_str().unwrap(),
                    "--upstream-ca",
                    ca.to_str().unwrap(),
                ],
                &["/bin/sh", "-c", &script],
            )
            .env(&source, &secret)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let ready = wait_until(Duration::from_secs(120), || s.work.join("done").exists());
        // Read from the host while the sandbox is alive.
        let pids = sandbox_processes(backend, child.id());
        let mut value_in_environ = Vec::new();
        let mut value_in_memory = Vec::new();
        let mut placeholder_seen = false;
        for &pid in &pids {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if environ
                .windows(secret.len())
                .any(|w| w == secret.as_bytes())
            {
                value_in_environ.push(pid);
            }
            let found = memory_holds(pid, &[secret.as_bytes(), b"openshell-cred-api-"]);
            if found[0] {
                value_in_memory.push(pid);
            }
            placeholder_seen |= found[1];
        }
        let mut value_in_files = files_hold(&s.work, secret.as_bytes());
        if backend == "process" {
            for &pid in &pids {
                value_in_files.extend(files_hold(
                    Path::new(&format!("/proc/{pid}/root/tmp")),
                    secret.as_bytes(),
                ));
            }
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("wait");
        assert!(
            ready,
            "{backend}: the workload never finished: {}",
            stderr(&out)
        );
        assert_eq!(
            (backend, stdout(&out)),
            (backend, "200\n403\n403\nurllib 200\n".to_owned()),
            "{}",
            stderr(&out)
        );
        assert!(!pids.is_empty(), "{backend}: no sandboxed process found");
        if backend == "vm" {
            // The VMM is among them: the guest's memory is searched.
            let names: Vec<String> = pids
                .iter()
                .map(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                })
                .collect();
            assert!(
                names
                    .iter()
                    .any(|n| n.starts_with("qemu") || n.contains("krun")),
                "no VMM among the searched processes: {names:?}"
            );
        }
        assert!(placeholder_seen, "{backend}: the placeholder is in no process's memory: the search looks in the wrong place");
        assert_eq!(
            (backend, value_in_environ, value_in_memory, value_in_files),
            (backend, Vec::new(), Vec::new(), Vec::new()),
            "the credential's value reached the sandbox"
        );
        // The upstreams: the value only at the credential's endpoint, never the placeholder.
        let received: Vec<String> = api
            .conns()
            .iter()
            .flat_map(|c| c.requests.clone())
            .map(|r| r.to_ascii_lowercase())
            .collect();
        assert_eq!(received.len(), 2, "{backend}: {received:?}");
        assert!(
            received[0].starts_with("get /curl ")
                && received[0].contains(&format!("authorization: bearer {secret}\r\n")),
            "{backend}: {}",
            received[0]
        );
        assert!(
            received[1].starts_with("get /python ")
                && received[1].contains(&format!("x-api-key: {secret}\r\n")),
            "{backend}: {}",
            received[1]
        );
        assert_eq!(
            (backend, other.request_lines(), plain.seen()),
            (backend, Vec::<Vec<String>>::new(), Vec::<String>::new())
        );
        let refused: Vec<String> = audit_lines(&audit)
            .iter()
            .filter(|l| l["action"] == "deny")
            .map(|l| l["reason"].as_str().unwrap_or("").to_owned())
            .collect();
        assert_eq!(refused.len(), 2, "{backend}: {refused:?}");
        assert!(
            refused[0].contains("placeholder of credential api was sent to 127.0.0.3")
                && refused[1].contains("in the plain HTTP request"),
            "{backend}: {refused:?}"
        );
    }
}

/// A credential the supervisor cannot read safely stops the start (exit 125) with an error
/// naming the field: a `from_file` the sandbox could see (here in the workdir), a `from_env`
/// that is not set, an `--env` for the variable that holds a placeholder.
#[test]
fn credential_sources_are_checked_before_anything_starts() {
    let s = Scratch::new("");
    let token = s.work.join("token");
    std::fs::write(&token, "t0ken\n").expect("write");
    let credential = |source: &str| {
        format!(
            "credentials:\n  api:\n    {source}\n    env: API_KEY\n    endpoints: [{{ host: api.example.com, port: 443 }}]\n"
        )
    };
    let cases = [
        (
            credential(&format!("from_file: {}", token.display())),
            Vec::new(),
            format!(
                "openshell-sandbox: error: credentials.api.from_file {t}: the sandbox can see it: {t} lies under {w}, which the workdir ({w}, filesystem_policy.include_workdir: true) shows in the sandbox; keep credential files outside every path the policy lists\n",
                t = token.display(),
                w = s.work.display()
            ),
        ),
        (
            credential("from_env: OPENSHELL_TEST_UNSET_VARIABLE"),
            Vec::new(),
            "openshell-sandbox: error: credentials.api.from_env: OPENSHELL_TEST_UNSET_VARIABLE is not set (or not UTF-8) in the supervisor's environment: environment variable not found\n".to_owned(),
        ),
        (
            credential("from_env: HOME"),
            vec!["--env", "API_KEY=mine"],
            "openshell-sandbox: error: --env API_KEY: a credential of the policy puts its placeholder in API_KEY; leave it out\n".to_owned(),
        ),
    ];
    for (policy, flags, want) in cases {
        s.write_policy(&policy);
        let out = s.run("process", &flags, &["/bin/true"]);
        assert_eq!((code(&out), stderr(&out)), (125, want));
    }
}

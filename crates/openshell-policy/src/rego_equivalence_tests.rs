//! The prefiltered `decide` against the whole-section evaluation, on
//! generated sections and inputs (allow and deny, exact and glob hosts and
//! binaries, ancestors, hostless endpoints, L7 access/rules/deny_rules,
//! tls, audit and ask).

use std::fmt::Write as _;

use crate::model::Policy;
use crate::rego::{DecisionEngine, DecisionInput, ExecInfo, HttpRequest, NetworkTarget};

/// Deterministic xorshift generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const HOSTS: &[&str] = &[
    "api{n}.example.com",
    "*.cdn{n}.example.net",
    "**.mirror{n}.example.org",
    "pkg-*.example{n}.dev",
    "*.example.com",
    "**.example.com",
    "svc{n}.*.internal",
    "example.com",
];
const BINARIES: &[&str] = &[
    "/usr/bin/tool{n}",
    "/opt/app{n}/bin/*",
    "/usr/lib/app{n}/**",
    "/usr/bin/*",
    "/usr/bin/curl",
    "/**/python3",
];
const METHODS: &[&str] = &["GET", "POST", "DELETE", "*", "PUT"];
const PATHS: &[&str] = &[
    "/simple/**",
    "/**/info/refs*",
    "**",
    "/v1/*",
    "/secret/**",
    "/x",
];
const ACCESS: &[&str] = &["read-only", "read-write", "full"];

fn section(rng: &mut Rng, policies: usize) -> String {
    let mut y = String::from("version: 1\nnetwork_policies:\n");
    for i in 0..policies {
        let n = rng.below(6);
        let _ = writeln!(y, "  p{i:03}:");
        let _ = writeln!(y, "    endpoints:");
        for _ in 0..1 + rng.below(3) {
            if rng.below(12) == 0 {
                let _ = writeln!(y, "      - port: {}", 5432 + rng.below(2));
                let _ = writeln!(y, "        allowed_ips: [10.0.0.0/8]");
                continue;
            }
            let host = rng.pick(HOSTS).replace("{n}", &n.to_string());
            let _ = writeln!(y, "      - host: \"{host}\"");
            match rng.below(3) {
                0 => {
                    let _ = writeln!(y, "        port: 443");
                }
                1 => {
                    let _ = writeln!(y, "        ports: [80, 443]");
                }
                _ => {
                    let _ = writeln!(y, "        port: 8443");
                }
            }
            match rng.below(8) {
                0 | 1 => {
                    let _ = writeln!(y, "        enforcement: audit");
                }
                2 | 3 => {
                    let _ = writeln!(y, "        enforcement: ask");
                }
                _ => {}
            }
            let l7 = match rng.below(4) {
                0 => {
                    let _ = writeln!(y, "        protocol: rest");
                    let _ = writeln!(y, "        access: {}", rng.pick(ACCESS));
                    true
                }
                1 => {
                    let _ = writeln!(y, "        protocol: rest");
                    let _ = writeln!(y, "        rules:");
                    for _ in 0..1 + rng.below(2) {
                        let _ = writeln!(
                            y,
                            "          - allow: {{ method: \"{}\", path: \"{}\" }}",
                            rng.pick(METHODS),
                            rng.pick(PATHS)
                        );
                    }
                    true
                }
                _ => false,
            };
            match rng.below(5) {
                0 => {
                    let _ = writeln!(y, "        tls: terminate");
                }
                1 => {
                    let _ = writeln!(y, "        tls: passthrough");
                }
                _ => {}
            }
            if l7 && rng.below(3) == 0 {
                let _ = writeln!(y, "        deny_rules:");
                let _ = writeln!(
                    y,
                    "          - {{ method: \"{}\", path: \"{}\" }}",
                    rng.pick(METHODS),
                    rng.pick(PATHS)
                );
            }
        }
        let bins = rng.below(4);
        if bins > 0 {
            let _ = writeln!(y, "    binaries:");
            for _ in 0..bins {
                let b = rng.pick(BINARIES).replace("{n}", &n.to_string());
                let _ = writeln!(y, "      - path: \"{b}\"");
            }
        }
    }
    y
}

fn input(rng: &mut Rng) -> DecisionInput {
    let n = rng.below(7);
    let host = match rng.below(12) {
        0 => format!("api{n}.example.com"),
        1 => format!("assets.cdn{n}.example.net"),
        2 => format!("a.b.cdn{n}.example.net"),
        3 => format!("x.y.mirror{n}.example.org"),
        4 => format!("mirror{n}.example.org"),
        5 => format!("pkg-core.example{n}.dev"),
        6 => format!("svc{n}.eu.internal"),
        7 => "Example.COM.".to_string(),
        8 => "deep.sub.example.com".to_string(),
        9 => format!("API{n}.Example.com."),
        10 => "db.internal".to_string(),
        _ => format!("unknown{n}.example.com"),
    };
    let bin = |rng: &mut Rng| match rng.below(7) {
        0 => format!("/usr/bin/tool{n}"),
        1 => format!("/opt/app{n}/bin/run"),
        2 => format!("/usr/lib/app{n}/x/y"),
        3 => "/usr/bin/curl".to_string(),
        4 => "/usr/local/bin/python3".to_string(),
        5 => "/usr/bin/wget".to_string(),
        _ => format!("/opt/app{n}/bin/sub/run"),
    };
    let path = bin(rng);
    let ancestors = (0..rng.below(3)).map(|_| bin(rng)).collect();
    let port = [443, 80, 8443, 5432, 5433, 22][rng.below(6)];
    let request = (rng.below(2) == 0).then(|| HttpRequest {
        method: ["get", "POST", "DELETE", "PATCH", "options"][rng.below(5)].to_string(),
        path: [
            "/simple/index.html",
            "/org/repo.git/info/refs",
            "/v1/x",
            "/v1/x/y",
            "/secret/key",
            "/x",
            "/",
        ][rng.below(7)]
        .to_string(),
    });
    DecisionInput {
        exec: ExecInfo { path, ancestors },
        network: NetworkTarget { host, port },
        request,
    }
}

#[test]
fn prefiltered_decisions_equal_whole_section_decisions() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut allowed, mut audited, mut asked, mut denied, mut filtered) = (0, 0, 0, 0, 0);
    let (mut seen_deny_rules, mut seen_hostless) = (false, false);
    for round in 0..12 {
        let text = section(&mut rng, [1, 3, 8, 20, 40][round % 5]);
        seen_deny_rules |= text.contains("deny_rules");
        seen_hostless |= text.contains("allowed_ips");
        let policy =
            Policy::from_yaml("generated.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let mut engine = DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..150 {
            let i = input(&mut rng);
            let selected = engine.select(&i, &crate::types::normalise_host(&i.network.host));
            if selected.is_some() {
                filtered += 1;
            }
            let fast = engine.decide(&i).unwrap_or_else(|e| panic!("{e:?}"));
            let full = engine.decide_full(&i).unwrap_or_else(|e| panic!("{e:?}"));
            assert_eq!(fast, full, "input {i:?}\nselected {selected:?}\n{text}");
            match (fast.allow, fast.enforcement) {
                (true, crate::model::Enforcement::Audit) => audited += 1,
                (true, crate::model::Enforcement::Ask) => asked += 1,
                (true, _) => allowed += 1,
                (false, _) => denied += 1,
            }
        }
    }
    // The generator reaches every kind of decision, mostly through the filter.
    assert!(
        allowed > 50 && audited > 10 && asked > 10 && denied > 50,
        "{allowed} {audited} {asked} {denied}"
    );
    assert!(filtered > 900, "{filtered}");
    assert!(seen_deny_rules && seen_hostless);
}

#[test]
fn odd_inputs_equal_whole_section() {
    let mut rng = Rng(7);
    let text = section(&mut rng, 20);
    let policy = Policy::from_yaml("generated.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    let mut engine = DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"));
    for host in [
        "",
        ".",
        "\u{0}",
        "api1.example.com\u{0}",
        "*",
        "**",
        "a/b.example.com",
        "ÄPI1.EXAMPLE.COM",
    ] {
        for bin in ["/usr/bin/tool1", "/usr/bin/\u{0}", ""] {
            let mut i = input(&mut rng);
            i.network.host = host.to_string();
            i.exec.path = bin.to_string();
            let fast = engine.decide(&i).map_err(|e| format!("{e:?}"));
            let full = engine.decide_full(&i).map_err(|e| format!("{e:?}"));
            assert_eq!(fast.is_ok(), full.is_ok(), "{i:?}");
            assert_eq!(fast.ok(), full.ok(), "{i:?}");
        }
    }
}

#[test]
fn empty_and_endpointless_sections() {
    let policy = Policy::from_yaml("p.yaml", "version: 1\n").unwrap_or_else(|e| panic!("{e}"));
    let mut engine = DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"));
    let mut rng = Rng(11);
    for _ in 0..20 {
        let i = input(&mut rng);
        assert_eq!(engine.decide(&i).ok(), engine.decide_full(&i).ok());
    }
}

/// An audit match that is not the closest pair (a smaller key misses fewer
/// parts) must still be seen by the filtered evaluation.
#[test]
fn audit_match_behind_a_closer_policy() {
    let text = r#"
version: 1
network_policies:
  a_enforce:
    endpoints:
      - { host: api.example.com, port: 443, protocol: rest, access: read-only }
    binaries: [{ path: /usr/bin/tool }]
  b_audit:
    endpoints:
      - host: "*.example.com"
        port: 443
        protocol: rest
        enforcement: audit
        rules:
          - allow: { method: GET, path: "/v1/**" }
    binaries: [{ path: "/usr/bin/*" }]
"#;
    let policy = Policy::from_yaml("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let mut engine = DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"));
    for (method, path) in [("POST", "/v2/x"), ("POST", "/v1/x"), ("GET", "/v2/x")] {
        let i = DecisionInput {
            exec: ExecInfo {
                path: "/usr/bin/tool".to_string(),
                ancestors: vec![],
            },
            network: NetworkTarget {
                host: "api.example.com".to_string(),
                port: 443,
            },
            request: Some(HttpRequest {
                method: method.to_string(),
                path: path.to_string(),
            }),
        };
        let fast = engine.decide(&i).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            fast,
            engine.decide_full(&i).unwrap_or_else(|e| panic!("{e:?}"))
        );
        if method == "POST" {
            assert_eq!(
                (fast.allow, fast.policy.as_deref()),
                (true, Some("b_audit"))
            );
        }
    }
}

/// A CONNECT whose smallest-key match is an endpoint with method/path rules
/// (refused on a tunnel) while a later policy allows a plain tunnel: the
/// filtered evaluation must still see the later one.
#[test]
fn plain_tunnel_behind_a_refused_one() {
    let text = r#"
version: 1
network_policies:
  a_readonly:
    endpoints:
      - { host: api.example.com, port: 443, protocol: rest, access: read-only }
    binaries: [{ path: /usr/bin/tool }]
  b_plain:
    endpoints:
      - { host: "*.example.com", port: 443 }
    binaries: [{ path: /usr/bin/tool }]
  c_other:
    endpoints:
      - { host: other.example.org, port: 443 }
    binaries: [{ path: /usr/bin/tool }]
"#;
    let policy = Policy::from_yaml("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let mut engine = DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"));
    let i = DecisionInput {
        exec: ExecInfo {
            path: "/usr/bin/tool".into(),
            ancestors: vec![],
        },
        network: NetworkTarget {
            host: "api.example.com".into(),
            port: 443,
        },
        request: None,
    };
    let fast = engine.decide(&i).unwrap_or_else(|e| panic!("{e:?}"));
    let full = engine.decide_full(&i).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(fast, full);
    assert_eq!(
        (fast.allow, fast.policy.as_deref(), fast.connect),
        (
            true,
            Some("b_plain"),
            Some(crate::rego::ConnectMode::Tunnel)
        )
    );
}

/// A request whose smallest-key full match asks while a later policy allows it outright:
/// the outright allow wins, so the filtered evaluation must see the later policy too.
#[test]
fn outright_allow_behind_an_ask() {
    let text = r#"
version: 1
network_policies:
  a_ask:
    endpoints:
      - { host: api.example.com, port: 443, enforcement: ask }
    binaries: [{ path: /usr/bin/tool }]
  b_plain:
    endpoints:
      - { host: api.example.com, port: 443 }
    binaries: [{ path: /usr/bin/tool }]
  c_other:
    endpoints:
      - { host: other.example.com, port: 443 }
    binaries: [{ path: /usr/bin/tool }]
"#;
    let policy = Policy::from_yaml("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let mut engine = DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"));
    for request in [
        None,
        Some(HttpRequest {
            method: "GET".to_string(),
            path: "/".to_string(),
        }),
    ] {
        let i = DecisionInput {
            exec: ExecInfo {
                path: "/usr/bin/tool".to_string(),
                ancestors: vec![],
            },
            network: NetworkTarget {
                host: "api.example.com".to_string(),
                port: 443,
            },
            request,
        };
        let fast = engine.decide(&i).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            fast,
            engine.decide_full(&i).unwrap_or_else(|e| panic!("{e:?}"))
        );
        assert_eq!(
            (fast.allow, fast.policy.as_deref(), fast.enforcement),
            (true, Some("b_plain"), crate::model::Enforcement::Enforce)
        );
    }
}

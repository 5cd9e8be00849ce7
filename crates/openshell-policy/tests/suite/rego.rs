//! The Rego decision engine, end to end through DecisionEngine.

use openshell_policy::{
    ConnectMode, Decision, DecisionEngine, DecisionInput, Enforcement, ExecInfo, HttpRequest,
    NetworkTarget, Policy,
};
use pretty_assertions::assert_eq;

const POLICY: &str = r#"
version: 1
network_policies:
  pypi:
    endpoints:
      - { host: pypi.org, port: 443 }
      - { host: "*.pythonhosted.org", port: 443 }
    binaries:
      - { path: /usr/bin/python3 }
      - { path: "/opt/venv/*/bin/pip" }
  github:
    endpoints:
      - host: api.github.com
        port: 443
        protocol: rest
        access: read-only
      - host: github.com
        port: 443
        protocol: rest
        rules:
          - allow: { method: GET, path: "/**/info/refs*" }
          - allow: { method: POST, path: "/**/git-upload-pack" }
        deny_rules:
          - { method: "*", path: "/secret/**" }
    binaries:
      - { path: /usr/bin/git }
  telemetry:
    endpoints:
      - host: telemetry.example.com
        port: 443
        enforcement: audit
        access: read-only
    binaries:
      - { path: /usr/bin/agent }
"#;

fn engine() -> DecisionEngine {
    let policy = Policy::from_yaml("policy.yaml", POLICY).unwrap_or_else(|e| panic!("{e}"));
    DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"))
}

fn input(bin: &str, ancestors: &[&str], host: &str, port: u16) -> DecisionInput {
    DecisionInput {
        exec: ExecInfo {
            path: bin.to_string(),
            ancestors: ancestors.iter().map(|a| a.to_string()).collect(),
        },
        network: NetworkTarget {
            host: host.to_string(),
            port,
        },
        request: None,
    }
}

fn with_request(mut i: DecisionInput, method: &str, path: &str) -> DecisionInput {
    i.request = Some(HttpRequest {
        method: method.to_string(),
        path: path.to_string(),
    });
    i
}

fn decide(e: &mut DecisionEngine, i: &DecisionInput) -> Decision {
    e.decide(i)
        .unwrap_or_else(|err| panic!("decide failed: {err:?}"))
}

/// An allow through endpoint `endpoint` of `policy`; `connect` is what a CONNECT decision says
/// (requests: `None`).
fn allowed(policy: &str, endpoint: usize, reason: &str, connect: Option<ConnectMode>) -> Decision {
    Decision {
        allow: true,
        policy: Some(policy.to_string()),
        endpoint: Some(endpoint),
        enforcement: Enforcement::Enforce,
        reason: reason.to_string(),
        missing: vec![],
        closest_policy: None,
        suggestion: None,
        allowed_ips: vec![],
        connect,
        websocket: false,
    }
}

/// A deny; `connect` is `Some(Deny)` for a CONNECT, `None` for a request.
fn denied(
    missing: &[&str],
    closest: &str,
    reason: &str,
    suggestion: &str,
    connect: Option<ConnectMode>,
) -> Decision {
    Decision {
        allow: false,
        policy: None,
        endpoint: None,
        enforcement: Enforcement::Enforce,
        reason: reason.to_string(),
        missing: missing.iter().map(|m| m.to_string()).collect(),
        closest_policy: Some(closest.to_string()),
        suggestion: Some(suggestion.to_string()),
        allowed_ips: vec![],
        connect,
        websocket: false,
    }
}

const TUNNEL: Option<ConnectMode> = Some(ConnectMode::Tunnel);
const DENY: Option<ConnectMode> = Some(ConnectMode::Deny);

#[test]
fn allowed_host_port_binary() {
    let mut e = engine();
    assert_eq!(
        decide(&mut e, &input("/usr/bin/python3", &[], "pypi.org", 443)),
        allowed(
            "pypi",
            0,
            "connection to pypi.org:443 by /usr/bin/python3 allowed by policy pypi",
            TUNNEL,
        )
    );
}

#[test]
fn wrong_host_is_denied_with_closest_policy() {
    let mut e = engine();
    assert_eq!(
        decide(&mut e, &input("/usr/bin/python3", &[], "evil.example", 443)),
        denied(
            &["host"],
            "pypi",
            "denied: no policy allows connection to evil.example:443 by /usr/bin/python3; closest policy pypi is missing host",
            "add an endpoint { host: evil.example, port: 443 } to network_policies.pypi",
            DENY,
        )
    );
}

#[test]
fn right_host_wrong_binary() {
    let mut e = engine();
    assert_eq!(
        decide(&mut e, &input("/usr/bin/curl", &["/usr/bin/bash"], "pypi.org", 443)),
        denied(
            &["binary"],
            "pypi",
            "denied: no policy allows connection to pypi.org:443 by /usr/bin/curl; closest policy pypi is missing binary",
            "add binaries: [{ path: /usr/bin/curl }] to network_policies.pypi",
            DENY,
        )
    );
}

#[test]
fn ancestor_binary_allows() {
    let mut e = engine();
    let d = decide(
        &mut e,
        &input(
            "/usr/bin/curl",
            &["/usr/bin/bash", "/usr/bin/python3"],
            "pypi.org",
            443,
        ),
    );
    assert_eq!(
        d,
        allowed(
            "pypi",
            0,
            "connection to pypi.org:443 by /usr/bin/curl allowed by policy pypi",
            TUNNEL,
        )
    );
}

#[test]
fn binary_glob() {
    let mut e = engine();
    let ok = decide(
        &mut e,
        &input("/opt/venv/py312/bin/pip", &[], "pypi.org", 443),
    );
    assert_eq!((ok.allow, ok.policy), (true, Some("pypi".to_string())));
    // "*" does not cross "/".
    let no = decide(
        &mut e,
        &input("/opt/venv/a/b/bin/pip", &[], "pypi.org", 443),
    );
    assert_eq!((no.allow, no.missing), (false, vec!["binary".to_string()]));
}

#[test]
fn glob_host() {
    let mut e = engine();
    let cases = [
        ("files.pythonhosted.org", true),
        ("pythonhosted.org", false),
        ("a.b.pythonhosted.org", false),
        ("files.pythonhosted.org.evil.com", false),
    ];
    for (host, allow) in cases {
        let d = decide(&mut e, &input("/usr/bin/python3", &[], host, 443));
        assert_eq!(d.allow, allow, "{host}");
    }
}

#[test]
fn host_is_case_insensitive_and_trailing_dot_ignored() {
    let mut e = engine();
    for host in ["PyPI.ORG", "pypi.org.", "FILES.PythonHosted.org."] {
        let d = decide(&mut e, &input("/usr/bin/python3", &[], host, 443));
        assert_eq!(
            (d.allow, d.policy),
            (true, Some("pypi".to_string())),
            "{host}"
        );
    }
}

#[test]
fn wrong_port() {
    let mut e = engine();
    assert_eq!(
        decide(&mut e, &input("/usr/bin/python3", &[], "pypi.org", 80)),
        denied(
            &["port"],
            "pypi",
            "denied: no policy allows connection to pypi.org:80 by /usr/bin/python3; closest policy pypi is missing port",
            "add port 80 to the endpoint for pypi.org in network_policies.pypi",
            DENY,
        )
    );
}

#[test]
fn l7_read_only_allows_get_denies_post() {
    let mut e = engine();
    let base = input("/usr/bin/git", &[], "api.github.com", 443);
    let get = decide(&mut e, &with_request(base.clone(), "get", "/repos/x"));
    assert_eq!(
        get,
        allowed(
            "github",
            0,
            "GET /repos/x to api.github.com:443 by /usr/bin/git allowed by policy github",
            None,
        )
    );
    assert_eq!(
        decide(&mut e, &with_request(base.clone(), "POST", "/repos/x")),
        denied(
            &["method"],
            "github",
            "denied: no policy allows POST /repos/x to api.github.com:443 by /usr/bin/git; closest policy github is missing method",
            "allow method POST for api.github.com in network_policies.github (access or rules)",
            None,
        )
    );
    // A CONNECT (no request) to an endpoint with method/path rules and no tls: terminate
    // would carry any method unchecked: refused, naming what is missing.
    assert_eq!(
        decide(&mut e, &base),
        denied(
            &["tls"],
            "github",
            "denied: policy github allows connection to api.github.com:443 by /usr/bin/git only under its method and path rules (access, rules or deny_rules), which a CONNECT tunnel cannot enforce: they need tls: terminate on the endpoint",
            "add tls: terminate to the endpoint for api.github.com in network_policies.github, so that its method and path rules apply to every request",
            DENY,
        )
    );
}

#[test]
fn connect_modes_tunnel_terminate_deny_and_audit() {
    let text = r#"
version: 1
network_policies:
  a_rules:
    endpoints:
      - { host: rules.example, port: 443, protocol: rest, access: read-only, tls: passthrough }
      - { host: both.example, port: 443, protocol: rest, access: read-only }
      - { host: audited.example, port: 443, protocol: rest, access: read-only, enforcement: audit }
      - { host: denyonly.example, port: 443, access: full, deny_rules: [{ method: POST, path: "/x" }] }
    binaries: [{ path: /usr/bin/curl }]
  b_terminate:
    endpoints:
      - { host: term.example, port: 443, tls: terminate }
      - { host: term-rules.example, port: 443, protocol: rest, access: read-only, tls: terminate }
    binaries: [{ path: /usr/bin/curl }]
  c_plain:
    endpoints:
      - { host: both.example, port: 443 }
    binaries: [{ path: /usr/bin/curl }]
"#;
    let policy = Policy::from_yaml("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let mut e = DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"));
    type Row<'a> = (
        &'a str,
        bool,
        Option<ConnectMode>,
        Option<String>,
        Enforcement,
    );
    let got: Vec<Row> = [
        "rules.example",
        "denyonly.example",
        "term.example",
        "term-rules.example",
        "both.example",
        "audited.example",
    ]
    .into_iter()
    .map(|host| {
        let d = decide(&mut e, &input("/usr/bin/curl", &[], host, 443));
        (
            host,
            d.allow,
            d.connect,
            d.policy.or(d.closest_policy),
            d.enforcement,
        )
    })
    .collect();
    let p = |s: &str| Some(s.to_string());
    assert_eq!(
        got,
        vec![
            (
                "rules.example",
                false,
                DENY,
                p("a_rules"),
                Enforcement::Enforce
            ),
            (
                "denyonly.example",
                false,
                DENY,
                p("a_rules"),
                Enforcement::Enforce
            ),
            (
                "term.example",
                true,
                Some(ConnectMode::Terminate),
                p("b_terminate"),
                Enforcement::Enforce
            ),
            (
                "term-rules.example",
                true,
                Some(ConnectMode::Terminate),
                p("b_terminate"),
                Enforcement::Enforce
            ),
            // A plain tunnel in another policy wins over the refused one.
            (
                "both.example",
                true,
                TUNNEL,
                p("c_plain"),
                Enforcement::Enforce
            ),
            // Audit mode tunnels and says what would have been denied.
            (
                "audited.example",
                true,
                TUNNEL,
                p("a_rules"),
                Enforcement::Audit
            ),
        ]
    );
    // Requests to the same endpoints are decided by their rules, connect null.
    let get = decide(
        &mut e,
        &with_request(
            input("/usr/bin/curl", &[], "rules.example", 443),
            "GET",
            "/",
        ),
    );
    assert_eq!((get.allow, get.connect), (true, None));
}

#[test]
fn l7_rules_method_and_path() {
    let mut e = engine();
    let base = input("/usr/bin/git", &[], "github.com", 443);
    let cases = [
        ("GET", "/org/repo.git/info/refs", true, vec![]),
        ("POST", "/org/repo.git/git-upload-pack", true, vec![]),
        (
            "POST",
            "/org/repo.git/git-receive-pack",
            false,
            vec!["path"],
        ),
        ("DELETE", "/org/repo.git/info/refs", false, vec!["method"]),
        ("GET", "/secret/x/info/refs", false, vec!["path"]),
    ];
    for (method, path, allow, missing) in cases {
        let d = decide(&mut e, &with_request(base.clone(), method, path));
        let missing: Vec<String> = missing.into_iter().map(String::from).collect();
        assert_eq!((d.allow, d.missing), (allow, missing), "{method} {path}");
    }
}

#[test]
fn audit_enforcement_allows_and_says_so() {
    let mut e = engine();
    let base = input("/usr/bin/agent", &[], "telemetry.example.com", 443);
    assert_eq!(
        decide(&mut e, &with_request(base.clone(), "POST", "/v1/events")),
        Decision {
            allow: true,
            policy: Some("telemetry".to_string()),
            endpoint: Some(0),
            enforcement: Enforcement::Audit,
            reason: "audit: POST /v1/events to telemetry.example.com:443 would be denied by policy telemetry (missing method); allowed because the endpoint is in audit mode".to_string(),
            missing: vec!["method".to_string()],
            closest_policy: Some("telemetry".to_string()),
            suggestion: Some("allow method POST for telemetry.example.com in network_policies.telemetry (access or rules)".to_string()),
            allowed_ips: vec![],
            connect: None,
            websocket: false,
        }
    );
    let get = decide(&mut e, &with_request(base.clone(), "GET", "/v1/config"));
    assert_eq!((get.allow, get.enforcement), (true, Enforcement::Audit));
    // Audit never opens the binary check.
    let other = decide(
        &mut e,
        &with_request(
            input("/usr/bin/curl", &[], "telemetry.example.com", 443),
            "GET",
            "/",
        ),
    );
    assert_eq!(
        (other.allow, other.missing),
        (false, vec!["binary".to_string()])
    );
}

#[test]
fn no_policies_denies_with_reason() {
    let policy = Policy::from_yaml("p.yaml", "version: 1\n").unwrap_or_else(|e| panic!("{e}"));
    let mut e = DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        decide(&mut e, &input("/usr/bin/curl", &[], "example.com", 443)),
        Decision {
            allow: false,
            policy: None,
            endpoint: None,
            enforcement: Enforcement::Enforce,
            reason: "denied: no network policies with endpoints are defined, so all egress is denied (connection to example.com:443 by /usr/bin/curl)".to_string(),
            missing: vec!["host".to_string(), "port".to_string(), "binary".to_string()],
            closest_policy: None,
            suggestion: Some("add a network_policies entry with endpoint { host: example.com, port: 443 } and binaries: [{ path: /usr/bin/curl }]".to_string()),
            allowed_ips: vec![],
            connect: DENY,
            websocket: false,
        }
    );
}

#[test]
fn hostless_endpoint_returns_allowed_ips() {
    let text = "version: 1\nnetwork_policies:\n  db:\n    endpoints: [{ port: 5432, allowed_ips: [10.0.0.0/8] }]\n    binaries: [{ path: /usr/bin/psql }]\n";
    let policy = Policy::from_yaml("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let mut e = DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"));
    let d = decide(&mut e, &input("/usr/bin/psql", &[], "db.internal", 5432));
    assert_eq!(
        (d.allow, d.policy, d.allowed_ips),
        (true, Some("db".to_string()), vec!["10.0.0.0/8".to_string()])
    );
}

#[test]
fn engine_clone_is_independent() {
    let mut a = engine();
    let mut b = a.clone();
    let i = input("/usr/bin/python3", &[], "pypi.org", 443);
    assert_eq!(decide(&mut a, &i), decide(&mut b, &i));
}

#[test]
fn hundred_policies_evaluate() {
    let mut text = String::from("version: 1\nnetwork_policies:\n");
    for n in 0..100 {
        text.push_str(&format!(
            "  p{n:03}:\n    endpoints: [{{ host: \"*.h{n}.example\", port: {} }}]\n    binaries: [{{ path: /usr/bin/b{n} }}]\n",
            1000 + n
        ));
    }
    let policy = Policy::from_yaml("many.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(policy.network.len(), 100);
    let mut e = DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"));
    for n in [0u16, 42, 99] {
        let d = decide(
            &mut e,
            &input(
                &format!("/usr/bin/b{n}"),
                &[],
                &format!("api.h{n}.example"),
                1000 + n,
            ),
        );
        assert_eq!((d.allow, d.policy), (true, Some(format!("p{n:03}"))));
    }
    let d = decide(&mut e, &input("/usr/bin/b5", &[], "api.h5.example", 1006));
    assert_eq!(
        (d.allow, d.missing, d.closest_policy),
        (false, vec!["port".to_string()], Some("p005".to_string()))
    );
}

#[test]
fn odd_decision_inputs_deny_or_error_without_panic() {
    let mut e = engine();
    for host in [
        "",
        ".",
        "\u{0}",
        "pypi.org\u{0}",
        "*",
        "**",
        "xn--bcher-kva.example",
    ] {
        let i = with_request(
            input("/usr/bin/python3", &[], host, 443),
            "GET\u{0}",
            "\u{0}",
        );
        if let Ok(d) = e.decide(&i) {
            assert!(!d.allow, "{host:?} allowed: {d:?}");
        }
    }
}

/// An allowed request says whether the endpoint that allowed it has `protocol: websocket`
/// (the proxy lets an `Upgrade: websocket` through only then); denials never do.
#[test]
fn allowed_requests_say_whether_their_endpoint_takes_websockets() {
    let text = r#"
version: 1
network_policies:
  a_ws:
    endpoints:
      - { host: ws.example, port: 443, protocol: websocket, tls: terminate }
      - { host: rest.example, port: 443, protocol: rest, access: read-only, tls: terminate }
    binaries: [{ path: /usr/bin/node }]
"#;
    let policy = Policy::from_yaml("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    let mut e = DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<(bool, bool)> = [
        ("ws.example", "GET"),
        ("rest.example", "GET"),
        ("rest.example", "POST"),
    ]
    .into_iter()
    .map(|(host, method)| {
        let d = decide(
            &mut e,
            &with_request(input("/usr/bin/node", &[], host, 443), method, "/socket"),
        );
        (d.allow, d.websocket)
    })
    .collect();
    assert_eq!(got, vec![(true, true), (true, false), (false, false)]);
}

/// `enforcement: ask` matches as `enforce` does and says `ask`, naming the endpoint; a policy
/// that allows outright wins over one that asks, whatever the key order, for CONNECTs and
/// requests alike; L7 rules of an ask endpoint still deny, and a CONNECT to an ask endpoint
/// with rules and no termination is refused as for `enforce`.
#[test]
fn ask_matches_as_enforce_and_comes_after_outright_allows() {
    let text = r#"
version: 1
network_policies:
  a_ask:
    endpoints:
      - { host: other.example, port: 443, enforcement: ask }
      - { host: api.example, port: 443, enforcement: ask }
      - { host: shared.example, port: 443, enforcement: ask }
      - { host: ro.example, port: 80, access: read-only, enforcement: ask }
    binaries: [{ path: /usr/bin/curl }]
  b_plain:
    endpoints:
      - { host: shared.example, port: 443 }
    binaries: [{ path: /usr/bin/curl }]
"#;
    let policy = Policy::from_yaml("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
    assert!(policy.network.asks());
    let mut e = DecisionEngine::new(&policy.network).unwrap_or_else(|e| panic!("{e}"));
    let curl = |host: &str, port: u16| input("/usr/bin/curl", &[], host, port);
    type Row = (
        bool,
        Option<String>,
        Option<usize>,
        Enforcement,
        Option<ConnectMode>,
    );
    let row = |d: Decision| -> Row {
        (
            d.allow,
            d.policy.or(d.closest_policy),
            d.endpoint,
            d.enforcement,
            d.connect,
        )
    };
    let p = |s: &str| Some(s.to_string());
    let got: Vec<Row> = vec![
        row(decide(&mut e, &curl("api.example", 443))),
        row(decide(&mut e, &curl("shared.example", 443))),
        row(decide(
            &mut e,
            &with_request(curl("shared.example", 443), "POST", "/x"),
        )),
        row(decide(
            &mut e,
            &with_request(curl("ro.example", 80), "GET", "/x"),
        )),
        row(decide(
            &mut e,
            &with_request(curl("ro.example", 80), "POST", "/x"),
        )),
        row(decide(&mut e, &curl("ro.example", 80))),
    ];
    assert_eq!(
        got,
        vec![
            (true, p("a_ask"), Some(1), Enforcement::Ask, TUNNEL),
            (true, p("b_plain"), Some(0), Enforcement::Enforce, TUNNEL),
            (true, p("b_plain"), Some(0), Enforcement::Enforce, None),
            (true, p("a_ask"), Some(3), Enforcement::Ask, None),
            (false, p("a_ask"), None, Enforcement::Enforce, None),
            (false, p("a_ask"), None, Enforcement::Enforce, DENY),
        ]
    );
    // The binary check is not opened by asking.
    let wget = decide(&mut e, &input("/usr/bin/wget", &[], "api.example", 443));
    assert_eq!(
        (wget.allow, wget.missing),
        (false, vec!["binary".to_string()])
    );
}

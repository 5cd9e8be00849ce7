//! Every rejected policy names source, line, column, field path and message.

use openshell_policy::Policy;
use pretty_assertions::assert_eq;

type Where = (String, usize, usize, String, String);

fn error_of(text: &str) -> Result<Where, String> {
    match Policy::from_yaml("policy.yaml", text) {
        Ok(p) => Err(format!("unexpectedly accepted: {p:?}")),
        Err(e) => Ok((
            e.source_name().to_string(),
            e.line(),
            e.column(),
            e.field_path().to_string(),
            e.message().to_string(),
        )),
    }
}

fn at(line: usize, column: usize, path: &str, message: &str) -> Result<Where, String> {
    Ok((
        "policy.yaml".to_string(),
        line,
        column,
        path.to_string(),
        message.to_string(),
    ))
}

const ENDPOINT_PREFIX: &str = "version: 1\nnetwork_policies:\n  pypi:\n    endpoints:\n";

#[test]
fn error_table() {
    let ep = |rest: &str| format!("{ENDPOINT_PREFIX}{rest}");
    let cred = |rest: &str| format!("version: 1\ncredentials:\n  api:\n{rest}");
    let cases: Vec<(&str, String, Result<Where, String>)> = vec![
        (
            "unknown top-level field",
            "version: 1\nfoo: 1\n".to_string(),
            at(2, 1, "", "unknown field foo, expected one of version, filesystem_policy, landlock, process, network_policies, resources, credentials"),
        ),
        (
            "unknown nested field",
            "version: 1\nfilesystem_policy:\n  read_onyl: [/usr]\n".to_string(),
            at(3, 3, "filesystem_policy", "unknown field read_onyl, expected one of include_workdir, read_only, read_write, tmp"),
        ),
        (
            "tmp: host without /tmp listed",
            "version: 1\nfilesystem_policy:\n  read_write: [/data]\n  tmp: host\n".to_string(),
            at(4, 8, "filesystem_policy.tmp", "tmp: host shares the host's /tmp, which must then be listed in read_only or read_write"),
        ),
        (
            "tmp: an unknown mode",
            "version: 1\nfilesystem_policy:\n  read_write: [/tmp]\n  tmp: shared\n".to_string(),
            at(4, 8, "filesystem_policy.tmp", "unknown variant shared, expected private or host"),
        ),
        (
            "unknown endpoint field",
            ep("      - { host: pypi.org, port: 443, hots: x }\n"),
            at(5, 38, "network_policies.pypi.endpoints[0]", "unknown field hots, expected one of host, port, ports, protocol, tls, enforcement, access, rules, deny_rules, allowed_ips, allow_encoded_slash"),
        ),
        (
            "port 0",
            ep("      - host: pypi.org\n        port: 0\n"),
            at(6, 15, "network_policies.pypi.endpoints[0].port", "expected 1..=65535"),
        ),
        (
            "port 70000 in flow style",
            ep("      - { host: pypi.org, port: 70000 }\n"),
            at(5, 33, "network_policies.pypi.endpoints[0].port", "expected 1..=65535"),
        ),
        (
            "port in ports list out of range",
            ep("      - host: pypi.org\n        ports: [443, 0]\n"),
            at(6, 22, "network_policies.pypi.endpoints[0].ports[1]", "expected 1..=65535"),
        ),
        (
            "relative path",
            "version: 1\nfilesystem_policy:\n  read_only: [usr]\n".to_string(),
            at(3, 15, "filesystem_policy.read_only[0]", "path must be absolute, got usr"),
        ),
        (
            "dot-dot path",
            "version: 1\nfilesystem_policy:\n  read_only:\n    - /usr/../etc\n".to_string(),
            at(4, 7, "filesystem_policy.read_only[0]", "path must not contain .., got /usr/../etc"),
        ),
        (
            "root read-write",
            "version: 1\nfilesystem_policy:\n  read_write:\n    - /tmp\n    - //\n".to_string(),
            at(5, 7, "filesystem_policy.read_write[1]", "read_write must not contain /; name the directories that need writes"),
        ),
        (
            "port and ports, block style",
            ep("      - host: pypi.org\n        port: 443\n        ports: [443]\n"),
            at(7, 16, "network_policies.pypi.endpoints[0].ports", "port and ports are mutually exclusive"),
        ),
        (
            "port and ports, flow style",
            ep("      - { host: pypi.org, port: 443, ports: [443] }\n"),
            at(5, 45, "network_policies.pypi.endpoints[0].ports", "port and ports are mutually exclusive"),
        ),
        (
            "neither port nor ports",
            ep("      - host: pypi.org\n"),
            at(5, 9, "network_policies.pypi.endpoints[0]", "endpoint needs port or ports"),
        ),
        (
            "access with rules",
            ep("      - host: pypi.org\n        port: 443\n        access: read-only\n        rules:\n          - allow: { method: GET, path: /a }\n"),
            at(9, 11, "network_policies.pypi.endpoints[0].rules", "access and rules are mutually exclusive"),
        ),
        (
            "bad compatibility",
            "version: 1\nlandlock:\n  compatibility: strict\n".to_string(),
            at(3, 18, "landlock.compatibility", "unknown variant strict, expected best_effort or hard_requirement"),
        ),
        (
            "bad version",
            "version: 2\n".to_string(),
            at(1, 10, "version", "unsupported version 2, expected 1"),
        ),
        (
            "missing version",
            "filesystem_policy: {}\n".to_string(),
            at(1, 1, "", "missing field version"),
        ),
        (
            "bad yaml syntax",
            "version: 1\nprocess:\n  run_as_user: a\n run_as_group: b\n".to_string(),
            at(4, 2, "", "did not find expected key, while parsing a block mapping"),
        ),
        (
            "tab indentation",
            "version: 1\nlandlock: {}\n\tx: 1\n".to_string(),
            at(3, 1, "", "found character that cannot start any token, while scanning for the next token"),
        ),
        (
            "empty document",
            String::new(),
            at(1, 1, "", "empty policy document, expected at least version: 1"),
        ),
        (
            "comments only",
            "# nothing here\n\n".to_string(),
            at(1, 1, "", "empty policy document, expected at least version: 1"),
        ),
        (
            "bad cidr",
            ep("      - host: x.org\n        port: 443\n        allowed_ips: [10.0.0.0/33]\n"),
            at(7, 23, "network_policies.pypi.endpoints[0].allowed_ips[0]", "prefix /33 is longer than 32 bits in 10.0.0.0/33"),
        ),
        (
            "garbage cidr",
            ep("      - host: x.org\n        port: 443\n        allowed_ips: [\"10.0.0/8\"]\n"),
            at(7, 23, "network_policies.pypi.endpoints[0].allowed_ips[0]", "expected an IP address or CIDR like 10.0.0.0/8, got 10.0.0/8"),
        ),
        (
            "host with scheme",
            ep("      - host: https://x\n        port: 443\n"),
            at(5, 15, "network_policies.pypi.endpoints[0].host", "host must be a bare name without a scheme, got https://x"),
        ),
        (
            "host with port",
            ep("      - { host: \"pypi.org:443\", port: 443 }\n"),
            at(5, 17, "network_policies.pypi.endpoints[0].host", "host must not contain a port, use port or ports, got pypi.org:443"),
        ),
        (
            "host with space",
            ep("      - { host: \"pypi .org\", port: 443 }\n"),
            at(5, 17, "network_policies.pypi.endpoints[0].host", "host must contain only letters, digits, -, _, . and *; found whitespace in pypi .org"),
        ),
        (
            "memory too small",
            "version: 1\nresources:\n  memory_mib: 8\n".to_string(),
            at(3, 15, "resources.memory_mib", "expected at least 16"),
        ),
        (
            "cpus zero",
            "version: 1\nresources: { cpus: 0 }\n".to_string(),
            at(2, 20, "resources.cpus", "expected a number > 0 and <= 1024"),
        ),
        (
            "cpus infinite",
            "version: 1\nresources:\n  cpus: .inf\n".to_string(),
            at(3, 9, "resources.cpus", "expected a number > 0 and <= 1024"),
        ),
        (
            "cpus too many",
            "version: 1\nresources:\n  cpus: 2000\n".to_string(),
            at(3, 9, "resources.cpus", "expected a number > 0 and <= 1024"),
        ),
        (
            "pids zero",
            "version: 1\nresources:\n  pids: 0\n".to_string(),
            at(3, 9, "resources.pids", "expected at least 1"),
        ),
        (
            "memory as a word other than unlimited",
            "version: 1\nresources:\n  memory_mib: lots\n".to_string(),
            at(3, 15, "resources.memory_mib", "expected a number or unlimited, got \"lots\""),
        ),
        (
            "unlimited is spelled in lowercase",
            "version: 1\nresources: { pids: Unlimited }\n".to_string(),
            at(2, 20, "resources.pids", "expected a number or unlimited, got \"Unlimited\""),
        ),
        (
            "cpus as a quoted number",
            "version: 1\nresources:\n  cpus: \"2\"\n".to_string(),
            at(3, 9, "resources.cpus", "expected a number or unlimited, got \"2\""),
        ),
        (
            "memory as a list",
            "version: 1\nresources:\n  memory_mib: [unlimited]\n".to_string(),
            at(3, 15, "resources.memory_mib", "invalid type: sequence, expected memory in MiB (>= 16) or unlimited"),
        ),
        (
            "pids fractional",
            "version: 1\nresources:\n  pids: 1.5\n".to_string(),
            at(3, 9, "resources.pids", "invalid type: floating point 1.5, expected a process count (>= 1) or unlimited"),
        ),
        (
            "unknown resources field",
            "version: 1\nresources:\n  memory: 512\n".to_string(),
            at(3, 3, "resources", "unknown field memory, expected one of memory_mib, cpus, pids"),
        ),
        (
            "duplicate policy key",
            "version: 1\nnetwork_policies:\n  x: {}\n  x: {}\n".to_string(),
            at(3, 3, "network_policies", "duplicate policy x"),
        ),
        (
            "port as string",
            ep("      - { host: x.org, port: \"443\" }\n"),
            at(5, 30, "network_policies.pypi.endpoints[0].port", "invalid type: string \"443\", expected a port number 1..=65535"),
        ),
        (
            "hostless endpoint without allowed_ips",
            ep("      - port: 443\n"),
            at(5, 9, "network_policies.pypi.endpoints[0]", "endpoint needs host (or allowed_ips for a hostless endpoint)"),
        ),
        (
            "bad enforcement value",
            ep("      - { host: x.org, port: 443, enforcement: prompt }\n"),
            at(5, 48, "network_policies.pypi.endpoints[0].enforcement", "unknown variant prompt, expected one of enforce, audit, ask"),
        ),
        (
            "bad access value",
            ep("      - { host: x.org, port: 443, access: write }\n"),
            at(5, 43, "network_policies.pypi.endpoints[0].access", "unknown variant write, expected one of read-only, read-write, full"),
        ),
        (
            "unsupported protocol",
            ep("      - { host: x.org, port: 443, protocol: graphql }\n"),
            at(5, 45, "network_policies.pypi.endpoints[0].protocol", "unknown variant graphql, expected one of rest, websocket, tcp"),
        ),
        (
            "relative binary",
            "version: 1\nnetwork_policies:\n  x:\n    binaries:\n      - path: python3\n".to_string(),
            at(5, 15, "network_policies.x.binaries[0].path", "binary path must be absolute, got python3"),
        ),
        (
            "rule without method or path",
            ep("      - host: x.org\n        port: 443\n        rules:\n          - allow: {}\n"),
            at(8, 20, "network_policies.pypi.endpoints[0].rules[0].allow", "rule needs method or path"),
        ),
        (
            "deny rules without base set",
            ep("      - host: x.org\n        port: 443\n        deny_rules: [{ method: POST }]\n"),
            at(7, 21, "network_policies.pypi.endpoints[0].deny_rules", "deny_rules need rules or access to define the base allow set"),
        ),
        (
            "credential with both sources",
            cred("    from_env: KEY\n    from_file: /etc/key\n    env: KEY\n    endpoints: [{ host: api.example.com, port: 443 }]\n"),
            at(5, 16, "credentials.api.from_file", "from_env and from_file are mutually exclusive"),
        ),
        (
            "credential without a source",
            cred("    env: KEY\n    endpoints: [{ host: api.example.com, port: 443 }]\n"),
            at(4, 5, "credentials.api", "credential needs from_env or from_file (where the supervisor reads the value)"),
        ),
        (
            "credential without env",
            cred("    from_env: KEY\n    endpoints: [{ host: api.example.com, port: 443 }]\n"),
            at(4, 5, "credentials.api", "credential needs env (the variable that holds its placeholder in the sandbox)"),
        ),
        (
            "credential env not a variable name",
            cred("    from_env: KEY\n    env: 1KEY\n    endpoints: [{ host: api.example.com, port: 443 }]\n"),
            at(5, 10, "credentials.api.env", "expected an environment variable name, got \"1KEY\""),
        ),
        (
            "credential env reserved",
            cred("    from_env: KEY\n    env: https_proxy\n    endpoints: [{ host: api.example.com, port: 443 }]\n"),
            at(5, 10, "credentials.api.env", "https_proxy is set by the sandbox itself or changes how programs load"),
        ),
        (
            "credential without endpoints",
            cred("    from_env: KEY\n    env: KEY\n    endpoints: []\n"),
            at(6, 16, "credentials.api.endpoints", "credential needs at least one endpoint (the only destinations its value is sent to)"),
        ),
        (
            "credential endpoint glob",
            cred("    from_env: KEY\n    env: KEY\n    endpoints: [{ host: \"*.example.com\", port: 443 }]\n"),
            at(6, 25, "credentials.api.endpoints[0].host", "a credential's host must be exact (no glob): list each host its value may reach"),
        ),
        (
            "credential endpoint without port",
            cred("    from_env: KEY\n    env: KEY\n    endpoints: [{ host: api.example.com }]\n"),
            at(6, 17, "credentials.api.endpoints[0]", "endpoint needs port"),
        ),
        (
            "credential unknown field",
            cred("    from_env: KEY\n    env: KEY\n    headers: [x]\n"),
            at(6, 5, "credentials.api", "unknown field headers, expected one of from_env, from_file, env, endpoints, query"),
        ),
        (
            "credential name",
            "version: 1\ncredentials:\n  \"a b\":\n    from_env: KEY\n    env: KEY\n    endpoints: [{ host: x.org, port: 443 }]\n".to_string(),
            at(4, 5, "credentials.a b", "a credential name may use only letters, digits, - and _ (at most 64)"),
        ),
        (
            "two credentials, one variable",
            "version: 1\ncredentials:\n  a:\n    from_env: A\n    env: KEY\n    endpoints: [{ host: x.org, port: 443 }]\n  b:\n    from_env: B\n    env: KEY\n    endpoints: [{ host: y.org, port: 443 }]\n".to_string(),
            at(9, 10, "credentials.b.env", "KEY is already the variable of credential a"),
        ),
        (
            "top level not a mapping",
            "- 1\n".to_string(),
            at(1, 1, "", "invalid type: sequence, expected a mapping"),
        ),
        (
            "negative version",
            "version: -1\n".to_string(),
            at(1, 10, "version", "unsupported version -1, expected 1"),
        ),
    ];
    for (name, text, want) in cases {
        assert_eq!(error_of(&text), want, "case: {name}");
    }
}

#[test]
fn display_format() {
    let text = format!("{ENDPOINT_PREFIX}      - host: pypi.org\n        port: 0\n");
    let shown = Policy::from_yaml("policy.yaml", &text).map_err(|e| e.to_string());
    assert_eq!(
        shown,
        Err(
            "policy.yaml:6:15: network_policies.pypi.endpoints[0].port: expected 1..=65535"
                .to_string()
        )
    );
    let shown = Policy::from_yaml("p.yaml", "version: 1\nlandlock: {}\n\tx: 1\n")
        .map_err(|e| e.to_string());
    assert_eq!(
        shown,
        Err("p.yaml:3:1: found character that cannot start any token, while scanning for the next token".to_string())
    );
}

#[test]
fn odd_inputs_are_errors_not_panics() {
    let inputs = [
        "{",
        "[",
        "]",
        ":",
        "---\n---\n",
        "version: 1\n---\nversion: 1\n",
        "~",
        "version: ~\n",
        "version: 1\nnetwork_policies: *nope\n",
        "version: 1\nnetwork_policies: [1, 2]\n",
        "a: &a [*a]\n",
        "version: 1\nfilesystem_policy: { read_only: [\"/a\\u0000b\"] }\n",
        "version: 1\nnetwork_policies:\n  ? [a]\n  : {}\n",
        "version: 18446744073709551616\n",
        "version: 1\nresources: { cpus: .nan }\n",
        "\u{feff}version: 1\nfoo: 1\n",
    ];
    for text in inputs {
        let got = Policy::from_yaml("odd.yaml", text);
        assert!(got.is_err(), "accepted {text:?}: {got:?}");
        if let Err(e) = got {
            assert!(e.line() >= 1 && e.column() >= 1, "{text:?}: {e}");
            assert!(!e.message().is_empty(), "{text:?}");
        }
    }
}

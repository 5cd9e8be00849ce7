//! Successful parses compared as whole values, round trips, static checks.

use openshell_policy::{
    Access, BinaryPattern, EffectiveResources, Endpoint, Enforcement, FilesystemPolicy,
    HostPattern, IpNet, L7Rule, LandlockCompatibility, LandlockPolicy, Limit, MethodPattern,
    NetworkPolicies, NetworkPolicy, PathPattern, Policy, PolicyError, Port, ProcessPolicy,
    Protocol, Resources, SandboxPath, StaticSectionChanged, TlsMode, TmpMode,
};
use pretty_assertions::assert_eq;
use std::collections::BTreeMap;

fn path(p: &str) -> SandboxPath {
    SandboxPath::try_from(p).unwrap_or_else(|e| panic!("bad test path {p}: {e}"))
}
fn host(h: &str) -> HostPattern {
    HostPattern::try_from(h).unwrap_or_else(|e| panic!("bad test host {h}: {e}"))
}
fn port(p: u16) -> Port {
    Port::try_from(p).unwrap_or_else(|e| panic!("bad test port {p}: {e}"))
}
fn bin(b: &str) -> BinaryPattern {
    BinaryPattern::try_from(b).unwrap_or_else(|e| panic!("bad test binary {b}: {e}"))
}
fn plain(h: &str, p: u16) -> Endpoint {
    Endpoint {
        host: Some(host(h)),
        ports: vec![port(p)],
        protocol: None,
        tls: None,
        enforcement: Enforcement::Enforce,
        access: None,
        rules: vec![],
        deny_rules: vec![],
        allowed_ips: vec![],
        allow_encoded_slash: false,
    }
}

fn load(text: &str) -> Result<Policy, PolicyError> {
    Policy::from_yaml("policy.yaml", text)
}

const BLOCK: &str = r#"
version: 1
filesystem_policy:
  include_workdir: true
  read_only:
    - /usr
    - /lib//x86_64/./
    - /etc
  read_write:
    - /sandbox
    - /tmp
landlock:
  compatibility: hard_requirement
process:
  run_as_user: sandbox
  run_as_group: sandbox
resources:
  memory_mib: 512
  cpus: 1.5
  pids: 256
network_policies:
  pypi:
    endpoints:
      - host: PyPI.org.
        port: 443
      - host: "*.pythonhosted.org"
        port: 443
    binaries:
      - path: /usr/bin/python3
"#;

const FLOW: &str = r#"
version: 1
filesystem_policy: { include_workdir: true, read_only: [/usr, /lib/x86_64, /etc], read_write: [/sandbox, /tmp] }
landlock: { compatibility: hard_requirement }
process: { run_as_user: sandbox, run_as_group: sandbox }
resources: { memory_mib: 512, cpus: 1.5, pids: 256 }
network_policies:
  pypi: { name: pypi, endpoints: [{ host: pypi.org, port: 443 }, { host: "*.pythonhosted.org", port: 443 }], binaries: [{ path: /usr/bin/python3 }] }
"#;

fn expected_block() -> Policy {
    Policy {
        version: 1,
        filesystem: FilesystemPolicy {
            include_workdir: true,
            read_only: vec![path("/usr"), path("/lib/x86_64"), path("/etc")],
            read_write: vec![path("/sandbox"), path("/tmp")],
            tmp: TmpMode::Private,
        },
        landlock: LandlockPolicy {
            compatibility: LandlockCompatibility::HardRequirement,
        },
        process: ProcessPolicy {
            run_as_user: Some("sandbox".to_string()),
            run_as_group: Some("sandbox".to_string()),
        },
        network: [(
            "pypi".to_string(),
            NetworkPolicy {
                name: "pypi".to_string(),
                endpoints: vec![plain("pypi.org", 443), plain("*.pythonhosted.org", 443)],
                binaries: vec![bin("/usr/bin/python3")],
            },
        )]
        .into_iter()
        .collect(),
        resources: Resources {
            memory_mib: Some(Limit::Max(512)),
            cpus: Some(Limit::Max(1.5)),
            pids: Some(Limit::Max(256)),
        },
        credentials: BTreeMap::new(),
    }
}

#[test]
fn block_style_parses_to_whole_value() {
    assert_eq!(load(BLOCK), Ok(expected_block()));
}

#[test]
fn flow_style_equals_block_style() {
    assert_eq!(load(FLOW), Ok(expected_block()));
}

#[test]
fn minimal_policy_gets_defaults() {
    assert_eq!(
        load("version: 1\n"),
        Ok(Policy {
            version: 1,
            filesystem: FilesystemPolicy::default(),
            landlock: LandlockPolicy {
                compatibility: LandlockCompatibility::BestEffort
            },
            process: ProcessPolicy::default(),
            network: NetworkPolicies::default(),
            resources: Resources::default(),
            credentials: BTreeMap::new(),
        })
    );
}

const FULL_ENDPOINT: &str = r#"
version: 1
network_policies:
  github_git:
    name: github-git
    endpoints:
      - host: github.com
        ports: [443, 8443, 443]
        protocol: rest
        tls: terminate
        enforcement: audit
        rules:
          - allow: { method: get, path: "/**/info/refs*" }
          - allow: { method: POST, path: "/**/git-upload-pack" }
        deny_rules:
          - { method: "*", path: /admin/** }
        allowed_ips: [140.82.112.0/20, 140.82.113.4]
        allow_encoded_slash: true
      - { host: api.github.com, port: 443, access: read-only, tls: passthrough }
      - { allowed_ips: ["10.1.2.3/8"], port: 5432, protocol: tcp }
    binaries:
      - { path: /usr/bin/git, harness: true }
      - { path: "/usr/lib/git-core/**" }
"#;

#[test]
fn full_endpoint_schema() {
    let ip = |s: &str| IpNet::try_from(s).unwrap_or_else(|e| panic!("{e}"));
    let rule = |m: &str, p: &str| L7Rule {
        method: MethodPattern::try_from(m).unwrap_or_else(|e| panic!("{e}")),
        path: PathPattern::try_from(p).unwrap_or_else(|e| panic!("{e}")),
    };
    let want = NetworkPolicy {
        name: "github-git".to_string(),
        endpoints: vec![
            Endpoint {
                host: Some(host("github.com")),
                ports: vec![port(443), port(8443)],
                protocol: Some(Protocol::Rest),
                tls: Some(TlsMode::Terminate),
                enforcement: Enforcement::Audit,
                access: None,
                rules: vec![
                    rule("GET", "/**/info/refs*"),
                    rule("POST", "/**/git-upload-pack"),
                ],
                deny_rules: vec![rule("*", "/admin/**")],
                allowed_ips: vec![ip("140.82.112.0/20"), ip("140.82.113.4/32")],
                allow_encoded_slash: true,
            },
            Endpoint {
                access: Some(Access::ReadOnly),
                tls: Some(TlsMode::Passthrough),
                ..plain("api.github.com", 443)
            },
            Endpoint {
                host: None,
                ports: vec![port(5432)],
                protocol: Some(Protocol::Tcp),
                allowed_ips: vec![ip("10.0.0.0/8")],
                ..plain("unused.example", 1)
            },
        ],
        binaries: vec![bin("/usr/bin/git"), bin("/usr/lib/git-core/**")],
    };
    let got = load(FULL_ENDPOINT).map(|p| p.network.get("github_git").cloned());
    assert_eq!(got, Ok(Some(want)));
}

#[test]
fn to_yaml_round_trips() {
    for text in [
        BLOCK,
        FLOW,
        FULL_ENDPOINT,
        "version: 1\n",
        RESOURCES_PARTLY,
        RESOURCES_UNLIMITED,
    ] {
        let Ok(policy) = load(text) else {
            panic!("fixture did not load: {text}");
        };
        let rendered = policy.to_yaml();
        assert_eq!(
            Policy::from_yaml("rendered.yaml", &rendered),
            Ok(policy.clone()),
            "rendered:\n{rendered}"
        );
    }
}

#[test]
fn to_yaml_is_normalised() {
    let Ok(policy) = load(BLOCK) else {
        panic!("block fixture did not load");
    };
    let want = r#"version: 1
filesystem_policy:
  include_workdir: true
  read_only:
  - /usr
  - /lib/x86_64
  - /etc
  read_write:
  - /sandbox
  - /tmp
  tmp: private
landlock:
  compatibility: hard_requirement
process:
  run_as_user: sandbox
  run_as_group: sandbox
network_policies:
  pypi:
    name: pypi
    endpoints:
    - host: pypi.org
      port: 443
    - host: '*.pythonhosted.org'
      port: 443
    binaries:
    - path: /usr/bin/python3
resources:
  memory_mib: 512
  cpus: 1.5
  pids: 256
"#;
    assert_eq!(policy.to_yaml(), want);
}

const RESOURCES_PARTLY: &str = "version: 1\nresources:\n  pids: 64\n";
const RESOURCES_UNLIMITED: &str =
    "version: 1\nresources: { memory_mib: unlimited, cpus: unlimited, pids: unlimited }\n";

#[test]
fn resources_keep_what_the_file_said_apart_from_what_applies() {
    let said = |text: &str| load(text).map(|p| (p.resources, p.resources.effective()));
    let got = [
        said("version: 1\n"),
        said(RESOURCES_PARTLY),
        said(RESOURCES_UNLIMITED),
        said("version: 1\nresources: { cpus: 2, memory_mib: unlimited }\n"),
    ];
    let want = [
        Ok((Resources::default(), EffectiveResources::DEFAULT)),
        Ok((
            Resources {
                memory_mib: None,
                cpus: None,
                pids: Some(Limit::Max(64)),
            },
            EffectiveResources {
                memory_mib: Limit::Max(1024),
                cpus: Limit::Max(1.0),
                pids: Limit::Max(64),
            },
        )),
        Ok((
            Resources {
                memory_mib: Some(Limit::Unlimited),
                cpus: Some(Limit::Unlimited),
                pids: Some(Limit::Unlimited),
            },
            EffectiveResources {
                memory_mib: Limit::Unlimited,
                cpus: Limit::Unlimited,
                pids: Limit::Unlimited,
            },
        )),
        Ok((
            Resources {
                memory_mib: Some(Limit::Unlimited),
                cpus: Some(Limit::Max(2.0)),
                pids: None,
            },
            EffectiveResources {
                memory_mib: Limit::Unlimited,
                cpus: Limit::Max(2.0),
                pids: Limit::Max(512),
            },
        )),
    ];
    assert_eq!(got.to_vec(), want.to_vec());
}

#[test]
fn effective_resources_render_every_field() {
    let Ok(mut policy) = load(RESOURCES_PARTLY) else {
        panic!("fixture did not load");
    };
    policy.resources = Resources::from(policy.resources.effective());
    let rendered = policy.to_yaml();
    assert!(
        rendered.ends_with("resources:\n  memory_mib: 1024\n  cpus: 1.0\n  pids: 64\n"),
        "{rendered}"
    );
    let Ok(mut unlimited) = load(RESOURCES_UNLIMITED) else {
        panic!("fixture did not load");
    };
    unlimited.resources = Resources::from(unlimited.resources.effective());
    let rendered = unlimited.to_yaml();
    assert!(
        rendered.ends_with(
            "resources:\n  memory_mib: unlimited\n  cpus: unlimited\n  pids: unlimited\n"
        ),
        "{rendered}"
    );
}

#[test]
fn static_sections_checked() {
    let Ok(base) = load(BLOCK) else {
        panic!("block fixture did not load");
    };
    let variant = |from: &str, to: &str| {
        load(&BLOCK.replace(from, to)).unwrap_or_else(|e| panic!("variant did not load: {e}"))
    };
    let network_only = variant("host: PyPI.org.", "host: example.org");
    assert_eq!(base.check_static_unchanged(&network_only), Ok(()));
    let cases = [
        ("    - /tmp\n", "    - /var/tmp\n", "filesystem_policy"),
        ("hard_requirement", "best_effort", "landlock"),
        ("run_as_user: sandbox", "run_as_user: other", "process"),
        ("pids: 256", "pids: 128", "resources"),
        ("pids: 256", "pids: unlimited", "resources"),
        ("  pids: 256\n", "", "resources"),
    ];
    for (from, to, section) in cases {
        assert_eq!(
            base.check_static_unchanged(&variant(from, to)),
            Err(StaticSectionChanged { section }),
            "{section}"
        );
    }
    let shown = base
        .check_static_unchanged(&variant("    - /tmp\n", "    - /var/tmp\n"))
        .map_err(|e| e.to_string());
    assert_eq!(
        shown,
        Err("filesystem_policy changed; static sections are fixed at start".to_string())
    );
    // Resources compare by what applies: a default written out or left out is no change.
    let Ok(bare) = load("version: 1\n") else {
        panic!("minimal policy did not load");
    };
    let Ok(spelled) = load("version: 1\nresources: { memory_mib: 1024, cpus: 1, pids: 512 }\n")
    else {
        panic!("spelled-out defaults did not load");
    };
    assert_eq!(bare.check_static_unchanged(&spelled), Ok(()));
    assert_eq!(spelled.check_static_unchanged(&bare), Ok(()));
}

#[test]
fn empty_name_and_empty_process_fields_default() {
    let got = load(
        "version: 1\nprocess: { run_as_user: \"\" }\nnetwork_policies:\n  a: { name: \"\" }\n",
    );
    let want = Policy {
        version: 1,
        filesystem: FilesystemPolicy::default(),
        landlock: LandlockPolicy::default(),
        process: ProcessPolicy::default(),
        network: [(
            "a".to_string(),
            NetworkPolicy {
                name: "a".to_string(),
                endpoints: vec![],
                binaries: vec![],
            },
        )]
        .into_iter()
        .collect(),
        resources: Resources::default(),
        credentials: BTreeMap::new(),
    };
    assert_eq!(got, Ok(want));
}

const CREDENTIALS: &str = r#"
version: 1
credentials:
  anthropic:
    from_env: ANTHROPIC_API_KEY
    env: ANTHROPIC_API_KEY
    endpoints: [{ host: API.Anthropic.com., port: 443 }]
  github:
    from_file: /etc/openshell/github-token
    env: GH_TOKEN
    endpoints:
      - { host: api.github.com, port: 443 }
      - { host: github.com, port: 443 }
      - { host: api.github.com, port: 443 }
    query: true
"#;

#[test]
fn credentials_parse_to_whole_values_round_trip_and_are_static() {
    use openshell_policy::{Credential, CredentialEndpoint, CredentialSource};
    let endpoint = |host: &str| CredentialEndpoint {
        host: HostPattern::try_from(host).unwrap_or_else(|e| panic!("{e}")),
        port: Port::try_from(443u16).unwrap_or_else(|e| panic!("{e}")),
    };
    let want: BTreeMap<String, Credential> = [
        (
            "anthropic".to_string(),
            Credential {
                source: CredentialSource::FromEnv("ANTHROPIC_API_KEY".into()),
                env: "ANTHROPIC_API_KEY".into(),
                endpoints: vec![endpoint("api.anthropic.com")],
                query: false,
            },
        ),
        (
            "github".to_string(),
            Credential {
                source: CredentialSource::FromFile(
                    SandboxPath::try_from("/etc/openshell/github-token")
                        .unwrap_or_else(|e| panic!("{e}")),
                ),
                env: "GH_TOKEN".into(),
                endpoints: vec![endpoint("api.github.com"), endpoint("github.com")],
                query: true,
            },
        ),
    ]
    .into_iter()
    .collect();
    let policy = load(CREDENTIALS).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(policy.credentials, want);
    assert_eq!(load(&policy.to_yaml()), Ok(policy.clone()));
    let changed =
        load(&CREDENTIALS.replace("GH_TOKEN", "GITHUB_TOKEN")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        policy.check_static_unchanged(&changed),
        Err(StaticSectionChanged {
            section: "credentials"
        })
    );
}

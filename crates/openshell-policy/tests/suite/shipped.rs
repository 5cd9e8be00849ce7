//! The policies shipped in policies/ load and mean what their comments say.

use std::path::PathBuf;

use openshell_policy::{
    EffectiveResources, LandlockCompatibility, Limit, Policy, ProcessPolicy, Resources,
};
use pretty_assertions::assert_eq;

fn load_shipped(name: &str) -> Policy {
    let file: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "..", "policies", name]
        .iter()
        .collect();
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    Policy::from_yaml(name, &text).unwrap_or_else(|e| panic!("{e}"))
}

fn strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

#[test]
fn default_policy() {
    let p = load_shipped("default.yaml");
    assert_eq!(p.version, 1);
    assert!(p.filesystem.include_workdir);
    assert_eq!(
        strings(&p.filesystem.read_only),
        [
            "/usr",
            "/bin",
            "/sbin",
            "/lib",
            "/lib64",
            "/etc",
            "/proc",
            "/dev/zero",
            "/dev/urandom",
            "/dev/random"
        ]
    );
    assert_eq!(strings(&p.filesystem.read_write), ["/tmp", "/dev/null"]);
    assert_eq!(p.landlock.compatibility, LandlockCompatibility::BestEffort);
    assert_eq!(
        p.process,
        ProcessPolicy {
            run_as_user: Some("nobody".to_string()),
            run_as_group: Some("nogroup".to_string()),
        }
    );
    assert_eq!(
        p.resources,
        Resources {
            memory_mib: Some(Limit::Max(1024)),
            cpus: Some(Limit::Max(1.0)),
            pids: Some(Limit::Max(512)),
        }
    );
    // What it ships is what a policy without resources gets.
    assert_eq!(p.resources.effective(), EffectiveResources::DEFAULT);
    assert!(p.network.is_empty());
    assert_eq!(Policy::from_yaml("x", &p.to_yaml()), Ok(p));
}

#[test]
fn developer_policy() {
    let p = load_shipped("developer.yaml");
    let default = load_shipped("default.yaml");
    assert!(p
        .filesystem
        .read_only
        .iter()
        .any(|r| r.as_str() == "/usr/local"));
    assert_eq!(p.landlock, default.landlock);
    assert_eq!(p.process, default.process);
    assert_eq!(p.resources, default.resources);
    let hosts: Vec<(String, Vec<String>)> = p
        .network
        .iter()
        .map(|(k, np)| {
            (
                k.to_string(),
                np.endpoints
                    .iter()
                    .filter_map(|e| e.host.as_ref().map(ToString::to_string))
                    .collect(),
            )
        })
        .collect();
    let owned = |k: &str, hs: &[&str]| (k.to_string(), hs.iter().map(|h| h.to_string()).collect());
    assert_eq!(
        hosts,
        vec![
            owned(
                "crates",
                &["crates.io", "static.crates.io", "index.crates.io"]
            ),
            owned("debian", &["deb.debian.org"]),
            owned("npm", &["registry.npmjs.org"]),
            owned("pypi", &["pypi.org", "files.pythonhosted.org"]),
        ]
    );
    for (key, np) in p.network.iter() {
        assert!(!np.binaries.is_empty(), "{key} lists binaries");
    }
    assert_eq!(Policy::from_yaml("x", &p.to_yaml()), Ok(p));
}

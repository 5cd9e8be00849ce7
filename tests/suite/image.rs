//! `openshell-sandbox image pull|ls|inspect|rm` against a real registry (Debian's
//! docker-registry on loopback, see `openshell_image::testing`). Pulling and the cache do not
//! depend on the backend, so these run once, not per backend.

use std::process::Command;

use openshell_image::testing::{
    can_run, push, registry_missing, LayerBuilder, Registry, RegistryOptions, TestImage,
};
use pretty_assertions::assert_eq;

use super::common::*;

fn image_cmd(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(SANDBOX)
        .arg("image")
        .args(args)
        .env("OPENSHELL_HOME", home)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run openshell-sandbox image")
}

#[test]
fn image_pull_ls_inspect_rm_through_the_cli() {
    if !can_run(
        "image_pull_ls_inspect_rm_through_the_cli",
        registry_missing(),
    ) {
        return;
    }
    let registry = Registry::start(&RegistryOptions::default()).expect("registry");
    let tar = LayerBuilder::new()
        .dir("bin", 0o755)
        .file("bin/marker", 0o644, b"cli")
        .finish();
    let image = TestImage::single(
        &tar,
        serde_json::json!({"Env": ["PATH=/bin"], "WorkingDir": "/sandbox", "Cmd": ["sh"]}),
    );
    let reference = format!("{}/cli:1", registry.host());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (digest, _) = rt.block_on(push(&reference, &image, None)).unwrap();
    let home = tempfile::tempdir().unwrap();

    // Without --insecure-registry the client speaks HTTPS and fails; nothing is cached.
    let out = image_cmd(home.path(), &["pull", &reference]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("openshell-sandbox: error: "),
        "{}",
        stderr(&out)
    );

    let out = image_cmd(
        home.path(),
        &["pull", &reference, "--insecure-registry", registry.host()],
    );
    assert_eq!(
        (code(&out), stdout(&out)),
        (0, format!("{reference} {digest}\n")),
        "{}",
        stderr(&out)
    );
    // Not a terminal: plain progress lines on stderr.
    assert!(
        stderr(&out).contains("openshell: image: unpacking layer 1/1"),
        "{}",
        stderr(&out)
    );

    let out = image_cmd(home.path(), &["ls"]);
    let hex = digest.trim_start_matches("sha256:");
    let lines: Vec<Vec<String>> = stdout(&out)
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    assert_eq!(lines[0], vec!["REFERENCE", "DIGEST", "SIZE"]);
    assert_eq!(lines[1][..2], [reference.clone(), hex[..12].to_owned()]);

    let out = image_cmd(home.path(), &["inspect", &reference]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("inspect json");
    let rootfs = std::path::PathBuf::from(json["rootfs"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("bin/marker")).unwrap(),
        "cli"
    );
    assert_eq!(json["config"]["working_dir"], "/sandbox");
    assert_eq!(json["config"]["cmd"], serde_json::json!(["sh"]));

    let out = image_cmd(home.path(), &["rm", &reference]);
    assert_eq!(
        stdout(&out),
        format!("removed {reference} (1 tree(s), 3 blob(s) freed)\n")
    );
    assert!(!rootfs.exists());
    let out = image_cmd(home.path(), &["rm", &reference]);
    assert_eq!(
        (code(&out), stderr(&out)),
        (
            1,
            format!(
                "openshell-sandbox: error: {reference} is not in the image cache (pull it first)\n"
            )
        )
    );
}

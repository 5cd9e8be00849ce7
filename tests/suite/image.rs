//! OCI images against a real registry (Debian's docker-registry on loopback, see
//! `openshell_image::testing`): `openshell-sandbox image pull|ls|inspect|rm`, which does not
//! depend on the backend and runs once, and `--image`, which runs on both backends.

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

/// `--image REF` on both backends: the busybox and python test images (`cargo xtask images`)
/// pushed to a real registry, pulled once, run with their config (User, WorkingDir, Env, Cmd)
/// under a policy whose paths are the image's; a later start with the registry gone needs no
/// download.
#[test]
fn images_from_a_registry_run_on_both_backends() {
    let layouts = ["busybox", "python"].map(openshell_image::testing::test_image);
    let missing = registry_missing().or_else(|| layouts.iter().find_map(|l| l.clone().err()));
    if !can_run("images_from_a_registry_run_on_both_backends", missing)
        || !super::common::can_run("images_from_a_registry_run_on_both_backends")
    {
        return;
    }
    let mut registry = Registry::start(&RegistryOptions::default()).expect("registry");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut refs = Vec::new();
    for (name, layout) in ["busybox", "python"].iter().zip(&layouts) {
        let reference = format!("{}/{name}:test", registry.host());
        let image = TestImage::from_layout(layout.as_ref().unwrap()).unwrap();
        rt.block_on(push(&reference, &image, None)).unwrap();
        refs.push(reference);
    }
    let host = registry.host().to_owned();
    let home = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("image-policy.yaml");
    // Paths inside the image (the busybox image has no /lib: best_effort skips it); no
    // `process` section, so the image's User applies.
    std::fs::write(
        &policy,
        "version: 1\n\
         filesystem_policy:\n  include_workdir: true\n  read_only: [/bin, /usr, /lib, /lib64, /etc, /proc]\n  read_write: [/tmp, /dev/null]\n\
         landlock:\n  compatibility: best_effort\n",
    )
    .unwrap();
    let run = |backend: &str, reference: &str, cmd: &[&str]| {
        let mut c = Command::new(SANDBOX);
        c.args(["--runtime", backend, "--policy"])
            .arg(&policy)
            .args(["--image", reference, "--insecure-registry", &host]);
        if !cmd.is_empty() {
            c.arg("--").args(cmd);
        }
        c.env("OPENSHELL_HOME", home.path())
            .env("OPENSHELL_GUEST_DIR", guest_dir())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run openshell-sandbox")
    };
    let busybox = [
        "/bin/sh",
        "-c",
        "echo $(id -u) $PWD $PATH; echo hi > note && cat note; echo x > /etc/x || echo denied",
    ];
    let python = [
        "python3",
        "-c",
        "import os, sys; print(os.getuid(), os.getcwd(), os.environ['LANG'], sys.version_info[:2])",
    ];
    let expect_busybox =
        "1000 /sandbox /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nhi\ndenied\n";
    let expect_python = "1000 /sandbox C.UTF-8 (3, 11)\n";
    for pass in ["pulled", "cached"] {
        for backend in backends() {
            let out = run(backend, &refs[0], &busybox);
            assert_eq!(
                (pass, backend, code(&out), stdout(&out)),
                (pass, backend, 0, expect_busybox.to_owned()),
                "{}",
                stderr(&out)
            );
            let out = run(backend, &refs[1], &python);
            assert_eq!(
                (pass, backend, code(&out), stdout(&out)),
                (pass, backend, 0, expect_python.to_owned()),
                "{}",
                stderr(&out)
            );
            // No command: the image's Cmd (python3 reading an empty stdin).
            let out = run(backend, &refs[1], &[]);
            assert_eq!(
                (pass, backend, code(&out)),
                (pass, backend, 0),
                "{}",
                stderr(&out)
            );
        }
        // The second pass runs from the cache alone.
        registry.stop();
    }
}

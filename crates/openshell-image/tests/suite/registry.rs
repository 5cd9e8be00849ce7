//! Pulling from a real registry: Debian's `docker-registry` on 127.0.0.1, images pushed with
//! oci-client's push.

use std::path::Path;

use base64::Engine;
use openshell_image::testing::{
    can_run, push, push_index, registry_missing, test_image, LayerBuilder, Registry,
    RegistryOptions, TestImage, TestLayer,
};
use openshell_image::{
    AuthOptions, Credentials, ImageConfig, ImageError, PullOptions, PullPolicy, Store,
};
use pretty_assertions::assert_eq;
use serde_json::json;

fn start(test: &str, options: &RegistryOptions) -> Option<Registry> {
    if !can_run(test, registry_missing()) {
        return None;
    }
    Some(Registry::start(options).expect("start docker-registry"))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn options(registry: &Registry) -> PullOptions {
    PullOptions {
        insecure_registries: vec![registry.host().to_owned()],
        ..Default::default()
    }
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// A two-layer image (gzip, then zstd with a whiteout) with a full config.
fn sample_image(marker: &str) -> TestImage {
    let lower = LayerBuilder::new()
        .dir("bin", 0o755)
        .file("bin/hello", 0o755, marker.as_bytes())
        .file("bin/remove-me", 0o644, b"x")
        .dir("sandbox", 0o755)
        .finish();
    let upper = LayerBuilder::new()
        .file("bin/.wh.remove-me", 0o644, b"")
        .file("sandbox/data", 0o644, b"data")
        .finish();
    TestImage::new(
        vec![TestLayer::gzip(&lower), TestLayer::zstd(&upper)],
        &[&lower, &upper],
        json!({"Env": ["PATH=/bin", "GREETING=hi"], "WorkingDir": "/sandbox",
               "User": "1000:1000", "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"]}),
        "amd64",
    )
}

#[test]
fn anonymous_pull_unpacks_and_a_cached_ensure_needs_no_registry() {
    let Some(mut registry) = start("anonymous_pull", &RegistryOptions::default()) else {
        return;
    };
    let rt = rt();
    let reference = format!("{}/sample:1", registry.host());
    let (digest, _) = rt
        .block_on(push(&reference, &sample_image("v1"), None))
        .unwrap();
    let short = format!("{}/sample", registry.host());
    rt.block_on(push(
        &format!("{short}:latest"),
        &sample_image("latest"),
        None,
    ))
    .unwrap();
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let image = rt
        .block_on(store.ensure(&reference, &options(&registry)))
        .unwrap();
    assert_eq!(image.digest, digest);
    assert_eq!(image.reference, reference);
    assert_eq!(
        image.config,
        ImageConfig {
            env: vec!["PATH=/bin".into(), "GREETING=hi".into()],
            working_dir: Some("/sandbox".into()),
            user: Some("1000:1000".into()),
            entrypoint: vec!["/bin/sh".into(), "-c".into()],
            cmd: vec!["echo hi".into()],
        }
    );
    assert_eq!(
        std::fs::read_to_string(image.rootfs_dir.join("bin/hello")).unwrap(),
        "v1"
    );
    assert!(!image.rootfs_dir.join("bin/remove-me").exists());
    assert_eq!(
        std::fs::read_to_string(image.rootfs_dir.join("sandbox/data")).unwrap(),
        "data"
    );
    // A short form is normalised (tag `latest`) and remembered as an alias.
    let latest = rt
        .block_on(store.ensure(&short, &options(&registry)))
        .unwrap();
    assert_eq!(latest.reference, format!("{short}:latest"));
    let listed: Vec<String> = store.list().unwrap().into_iter().map(|(r, _)| r).collect();
    assert_eq!(listed, vec![reference.clone(), format!("{short}:latest")]);

    // With the registry gone, the cached reference still resolves: no network is needed.
    registry.stop();
    let again = rt
        .block_on(store.ensure(&reference, &options(&registry)))
        .unwrap();
    assert_eq!(again, image);
    let again = rt
        .block_on(store.ensure(&short, &options(&registry)))
        .unwrap();
    assert_eq!(again, latest);
    store.remove(&short).unwrap();
    assert_eq!(
        std::fs::read_to_string(store.root().join("aliases.json")).unwrap(),
        "{}"
    );
    // ...whereas re-resolving it does need the registry, which proves the line above used none.
    let always = PullOptions {
        policy: PullPolicy::Always,
        ..options(&registry)
    };
    let err = rt.block_on(store.ensure(&reference, &always)).unwrap_err();
    assert!(
        matches!(err, ImageError::Auth { .. } | ImageError::Registry { .. }),
        "{err:?}"
    );
    // And a never-pulled reference with Never is a clear error.
    let never = PullOptions {
        policy: PullPolicy::Never,
        ..options(&registry)
    };
    let err = rt
        .block_on(store.ensure(&format!("{}/other:1", registry.host()), &never))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}/other:1 is not in the image cache (pull it first)",
            registry.host()
        )
    );
}

#[test]
fn basic_auth_from_a_config_file_or_explicit_credentials() {
    let creds = ("alice".to_owned(), "s3cret".to_owned());
    let Some(registry) = start(
        "basic_auth",
        &RegistryOptions {
            basic_auth: Some(creds.clone()),
        },
    ) else {
        return;
    };
    let rt = rt();
    let reference = format!("{}/private:1", registry.host());
    rt.block_on(push(&reference, &sample_image("secret"), Some(&creds)))
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let with = |auth: AuthOptions| PullOptions {
        policy: PullPolicy::Always,
        auth,
        ..options(&registry)
    };

    // Anonymous: refused by the registry, and nothing cached.
    let empty_config = home.path().join("empty.json");
    std::fs::write(&empty_config, r#"{"auths":{}}"#).unwrap();
    let anonymous = AuthOptions {
        explicit: None,
        config_file: Some(empty_config),
    };
    let err = rt
        .block_on(store.ensure(&reference, &with(anonymous)))
        .unwrap_err();
    let unauthorized = format!(
        "{reference}: fetching the manifest from the registry failed: Not authorized: url \
         http://{}/v2/private/manifests/1",
        registry.host()
    );
    assert_eq!(format!("{:#}", anyhow::Error::from(err)), unauthorized);
    assert!(store.list().unwrap().is_empty());

    // A wrong explicit password is refused too.
    let wrong = AuthOptions {
        explicit: Some(Credentials::Basic {
            username: "alice".into(),
            password: "wrong".into(),
        }),
        config_file: None,
    };
    let err = rt
        .block_on(store.ensure(&reference, &with(wrong)))
        .unwrap_err();
    assert_eq!(format!("{:#}", anyhow::Error::from(err)), unauthorized);
    assert!(store.list().unwrap().is_empty());

    // A docker-style config.json with a base64 `auth` entry.
    let config = home.path().join("config.json");
    let encoded = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    std::fs::write(
        &config,
        json!({"auths": {registry.host(): {"auth": encoded}}}).to_string(),
    )
    .unwrap();
    let from_file = AuthOptions {
        explicit: None,
        config_file: Some(config),
    };
    let image = rt
        .block_on(store.ensure(&reference, &with(from_file)))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(image.rootfs_dir.join("bin/hello")).unwrap(),
        "secret"
    );

    // Explicit flags.
    let explicit = AuthOptions {
        explicit: Some(Credentials::Basic {
            username: creds.0.clone(),
            password: creds.1.clone(),
        }),
        config_file: None,
    };
    let again = rt
        .block_on(store.ensure(&reference, &with(explicit)))
        .unwrap();
    assert_eq!(again.digest, image.digest);
}

#[test]
fn a_manifest_list_resolves_to_linux_amd64() {
    let Some(registry) = start("manifest_list", &RegistryOptions::default()) else {
        return;
    };
    let rt = rt();
    let arm = {
        let t = LayerBuilder::new().file("arch", 0o644, b"arm64").finish();
        TestImage::new(vec![TestLayer::gzip(&t)], &[&t], json!({}), "arm64")
    };
    let amd = {
        let t = LayerBuilder::new().file("arch", 0o644, b"amd64").finish();
        TestImage::new(vec![TestLayer::gzip(&t)], &[&t], json!({}), "amd64")
    };
    let reference = format!("{}/multi:1", registry.host());
    let (index, platform_digests) = rt
        .block_on(push_index(&reference, &[("arm64", &arm), ("amd64", &amd)]))
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let image = rt
        .block_on(store.ensure(&reference, &options(&registry)))
        .unwrap();
    assert_eq!(image.digest, platform_digests[1]);
    assert_eq!(
        std::fs::read_to_string(image.rootfs_dir.join("arch")).unwrap(),
        "amd64"
    );
    let (_, record) = store.list().unwrap().remove(0);
    assert_eq!(record.index, Some(index));

    // A list without linux/amd64 says what it has.
    let arm_only = format!("{}/armonly:1", registry.host());
    rt.block_on(push_index(&arm_only, &[("arm64", &arm)]))
        .unwrap();
    let err = rt
        .block_on(store.ensure(&arm_only, &options(&registry)))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{arm_only}: no linux/amd64 image in the manifest list (it has: linux/arm64)")
    );
    // A single-platform image for another architecture is refused too.
    let arm_single = format!("{}/armsingle:1", registry.host());
    rt.block_on(push(&arm_single, &arm, None)).unwrap();
    let err = rt
        .block_on(store.ensure(&arm_single, &options(&registry)))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{arm_single}: the image is for linux/arm64, not linux/amd64")
    );
}

#[test]
fn a_corrupted_blob_fails_verification_and_nothing_is_cached() {
    let Some(registry) = start("corrupted_blob", &RegistryOptions::default()) else {
        return;
    };
    let rt = rt();
    let image = sample_image("v1");
    let layer_digest = openshell_image::testing::digest_of(&image.layers[1].data);
    let reference = format!("{}/corrupt:1", registry.host());
    rt.block_on(push(&reference, &image, None)).unwrap();
    // Flip one byte of the second layer in the registry's storage (same size).
    let data = registry.blob_data(&layer_digest);
    let mut bytes = std::fs::read(&data).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let err = rt
        .block_on(store.ensure(&reference, &options(&registry)))
        .unwrap_err();
    match &err {
        ImageError::DigestMismatch { what, expected, .. } => {
            assert_eq!((*what, expected.as_str()), ("layer", layer_digest.as_str()))
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    assert!(err.to_string().contains(&layer_digest), "{err}");
    assert!(!store.blob_path(&layer_digest).exists());
    assert_eq!(count(&store.root().join("trees")), 0);
    assert!(store.list().unwrap().is_empty());
    assert_eq!(count(&store.root().join("tmp")), 0);
}

#[test]
fn a_malicious_layer_from_the_registry_is_refused_and_nothing_is_published() {
    let Some(registry) = start("malicious_layer", &RegistryOptions::default()) else {
        return;
    };
    let rt = rt();
    let tar = LayerBuilder::new()
        .dir("etc", 0o755)
        .symlink("etc/evil", "/etc")
        .file("etc/evil/passwd", 0o644, b"root::0:0::/:/bin/sh\n")
        .finish();
    let image = TestImage::single(&tar, json!({}));
    let layer = openshell_image::testing::digest_of(&image.layers[0].data);
    let reference = format!("{}/evil:1", registry.host());
    rt.block_on(push(&reference, &image, None)).unwrap();
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let err = rt
        .block_on(store.ensure(&reference, &options(&registry)))
        .unwrap_err();
    assert_eq!(
        format!("{:#}", anyhow::Error::from(err)),
        format!(
            "{reference}: layer {layer}: entry \"etc/evil/passwd\": a parent component is a \
             symbolic link or not a directory"
        )
    );
    assert_eq!(count(&store.root().join("trees")), 0);
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn concurrent_ensures_share_one_pull_and_rm_collects_garbage() {
    let Some(registry) = start("concurrent", &RegistryOptions::default()) else {
        return;
    };
    let rt = rt();
    let a = format!("{}/a:1", registry.host());
    let b = format!("{}/b:1", registry.host());
    rt.block_on(push(&a, &sample_image("a"), None)).unwrap();
    rt.block_on(push(&b, &sample_image("b"), None)).unwrap();
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let opts = options(&registry);
    let (x, y) =
        rt.block_on(async { tokio::join!(store.ensure(&a, &opts), store.ensure(&a, &opts)) });
    assert_eq!(x.unwrap(), y.unwrap());
    assert_eq!(count(&store.root().join("trees")), 1);
    rt.block_on(store.ensure(&b, &opts)).unwrap();
    assert_eq!(count(&store.root().join("trees")), 2);
    // a and b share their upper layer: 2 manifests, 2 configs, 2 lower layers, 1 upper.
    assert_eq!(count(&store.root().join("blobs/sha256")), 7);

    let report = store.remove(&a).unwrap();
    assert_eq!((report.trees, report.blobs), (1, 3));
    assert_eq!(count(&store.root().join("blobs/sha256")), 4);
    let report = store.remove(&b).unwrap();
    assert_eq!((report.trees, report.blobs), (1, 4));
    assert_eq!(count(&store.root().join("blobs/sha256")), 0);
    let err = store.remove(&b).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{b} is not in the image cache (pull it first)")
    );
}

/// The images `cargo xtask images` builds, pulled and checked: the busybox image runs its
/// shell, the python image its interpreter (chrooted, as root).
#[test]
fn the_busybox_and_python_test_images_pull_and_run() {
    let layouts = ["busybox", "python"].map(test_image);
    let missing = registry_missing().or_else(|| layouts.iter().find_map(|l| l.clone().err()));
    let Some(registry) = start("test_images", &RegistryOptions::default())
        .filter(|_| can_run("test_images", missing))
    else {
        return;
    };
    let rt = rt();
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let mut roots = Vec::new();
    for (name, layout) in ["busybox", "python"].iter().zip(&layouts) {
        let layout = layout.as_ref().unwrap();
        let reference = format!("{}/{name}:test", registry.host());
        rt.block_on(push(
            &reference,
            &TestImage::from_layout(layout).unwrap(),
            None,
        ))
        .unwrap();
        let image = rt
            .block_on(store.ensure(&reference, &options(&registry)))
            .unwrap();
        assert!(
            image.config.env.iter().any(|e| e.starts_with("PATH=")),
            "{image:?}"
        );
        assert_eq!(image.config.working_dir.as_deref(), Some("/sandbox"));
        roots.push(image);
    }
    let passwd = std::fs::read_to_string(roots[0].rootfs_dir.join("etc/passwd")).unwrap();
    assert!(passwd.contains("sandbox:x:1000:1000:"), "{passwd}");
    assert!(roots[1].rootfs_dir.join("usr/bin/python3").exists());
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP running the images: not root (chroot needs it)");
        return;
    }
    let run = |root: &Path, cmd: &[&str]| {
        let out = std::process::Command::new("/usr/sbin/chroot")
            .arg(root)
            .args(cmd)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(
        run(
            &roots[0].rootfs_dir,
            &["/bin/sh", "-c", "echo hello from busybox"]
        ),
        (Some(0), "hello from busybox\n".to_owned())
    );
    assert_eq!(
        run(
            &roots[1].rootfs_dir,
            &[
                "/usr/bin/python3",
                "-c",
                "import os, sys; print(os.getcwd(), sys.version_info[:2])"
            ]
        ),
        (Some(0), "/ (3, 11)\n".to_owned())
    );
}

/// The registry token flow: a 401 with a `Bearer realm=...` challenge, a token fetched from the
/// realm with basic credentials, then bearer requests. The registry behind is the real one; the
/// realm is the harness's `TokenFront` (see its docs for why not docker-registry's JWT auth).
#[test]
fn token_auth_fetches_a_bearer_token_from_the_realm() {
    let Some(registry) = start("token_auth", &RegistryOptions::default()) else {
        return;
    };
    let rt = rt();
    rt.block_on(push(
        &format!("{}/tokened:1", registry.host()),
        &sample_image("tokened"),
        None,
    ))
    .unwrap();
    let front =
        openshell_image::testing::TokenFront::start(registry.host(), "bob", "hunter2").unwrap();
    let reference = format!("{}/tokened:1", front.host());
    let home = tempfile::tempdir().unwrap();
    let store = Store::open(home.path()).unwrap();
    let opts = |auth: Option<Credentials>| PullOptions {
        insecure_registries: vec![front.host().to_owned()],
        auth: AuthOptions {
            explicit: auth,
            config_file: Some(home.path().join("none.json")),
        },
        ..Default::default()
    };
    std::fs::write(home.path().join("none.json"), "{}").unwrap();

    let wrong = Credentials::Basic {
        username: "bob".into(),
        password: "wrong".into(),
    };
    let err = rt
        .block_on(store.ensure(&reference, &opts(Some(wrong))))
        .unwrap_err();
    assert_eq!(
        format!("{:#}", anyhow::Error::from(err)),
        format!(
            "{reference}: authentication with {} failed: Authentication failure: \
             {{\"details\":\"bad credentials\"}}",
            front.host()
        )
    );
    assert_eq!(front.tokens_issued(), 0);

    let right = Credentials::Basic {
        username: "bob".into(),
        password: "hunter2".into(),
    };
    let image = rt
        .block_on(store.ensure(&reference, &opts(Some(right))))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(image.rootfs_dir.join("bin/hello")).unwrap(),
        "tokened"
    );
    assert!(front.tokens_issued() >= 1);

    // Cached: a second ensure sends no request at all.
    let seen = front.requests();
    rt.block_on(store.ensure(&reference, &opts(None))).unwrap();
    assert_eq!(front.requests(), seen);
}

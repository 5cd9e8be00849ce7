//! Layer unpacking without a registry: malicious archives are refused with an error naming the
//! entry and write nothing outside the root; whiteouts, opaque directories, links, gzip and
//! zstd behave as the OCI image spec says.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use openshell_image::testing::{digest_of, LayerBuilder};
use openshell_image::unpack::{apply_layer, Compression, MAX_EXTENSION_HEADER};
use openshell_image::UnpackError;
use pretty_assertions::assert_eq;

struct Dirs {
    _base: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

fn dirs() -> Dirs {
    let base = tempfile::tempdir().unwrap();
    let root = base.path().join("root");
    let outside = base.path().join("outside");
    std::fs::create_dir(&root).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), "host secret").unwrap();
    Dirs {
        _base: base,
        root,
        outside,
    }
}

fn apply(root: &Path, tar: &[u8]) -> Result<(), UnpackError> {
    apply_layer(root, tar, Compression::None, Some(&digest_of(tar))).map(|_| ())
}

/// Every file below `dir`, relative, sorted (symlinks not followed).
fn listing(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn malicious_archives_are_refused_and_write_nothing_outside() {
    let d = dirs();
    let outside = d.outside.display().to_string();
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "dotdot",
            LayerBuilder::new().file("../escaped", 0o644, b"x").finish(),
            r#"entry "../escaped": path escapes the root with '..'"#.into(),
        ),
        (
            "dotdot deep",
            LayerBuilder::new()
                .file("a/../../escaped", 0o644, b"x")
                .finish(),
            r#"entry "a/../../escaped": path escapes the root with '..'"#.into(),
        ),
        (
            "absolute",
            LayerBuilder::new()
                .file(&format!("{outside}/abs"), 0o644, b"x")
                .finish(),
            format!(r#"entry "{outside}/abs": absolute paths are refused"#),
        ),
        (
            "symlink escape",
            LayerBuilder::new()
                .symlink("a", &outside)
                .file("a/passwd", 0o644, b"pwned")
                .finish(),
            r#"entry "a/passwd": a parent component is a symbolic link or not a directory"#.into(),
        ),
        (
            "relative symlink escape",
            LayerBuilder::new()
                .dir("d", 0o755)
                .symlink("d/up", "../../outside")
                .file("d/up/secret", 0o644, b"pwned")
                .finish(),
            r#"entry "d/up/secret": a parent component is a symbolic link or not a directory"#
                .into(),
        ),
        (
            "hard link outside",
            LayerBuilder::new()
                .hardlink("h", "../outside/secret")
                .finish(),
            r#"entry "h": hard link target "../outside/secret" escapes the root"#.into(),
        ),
        (
            "hard link absolute",
            LayerBuilder::new().hardlink("h", "/etc/passwd").finish(),
            r#"entry "h": hard link target "/etc/passwd" escapes the root"#.into(),
        ),
        (
            "hard link through a symlink",
            LayerBuilder::new()
                .symlink("s", &outside)
                .hardlink("h", "s/secret")
                .finish(),
            r#"entry "h": a parent component is a symbolic link or not a directory"#.into(),
        ),
        (
            "hard link to a missing entry",
            LayerBuilder::new().hardlink("h", "nothing").finish(),
            r#"entry "h": hard link target "nothing" does not exist in the image"#.into(),
        ),
        (
            "huge PAX header",
            LayerBuilder::new()
                .header_only(tar::EntryType::XHeader, "PaxHeader/x", 1 << 40)
                .finish(),
            format!(
                r#"entry "PaxHeader/x": PAX header of {} bytes exceeds the {MAX_EXTENSION_HEADER}-byte limit"#,
                1u64 << 40
            ),
        ),
        (
            "huge GNU long name",
            LayerBuilder::new()
                .header_only(tar::EntryType::GNULongName, "././@LongLink", 1 << 30)
                .finish(),
            format!(
                r#"entry "././@LongLink": GNU long name header of {} bytes exceeds the {MAX_EXTENSION_HEADER}-byte limit"#,
                1u64 << 30
            ),
        ),
        (
            "PAX path escape",
            LayerBuilder::new()
                .pax(b"22 path=../pax-escape\n")
                .file("innocent", 0o644, b"x")
                .finish(),
            r#"entry "../pax-escape": path escapes the root with '..'"#.into(),
        ),
    ];
    let before = listing(d.root.parent().unwrap());
    for (what, tar, expected) in cases {
        let root = d.root.join(what.replace(' ', "-"));
        std::fs::create_dir(&root).unwrap();
        let err = apply(&root, &tar).expect_err(what);
        assert_eq!((what, err.to_string()), (what, expected));
    }
    // Nothing appeared outside the roots, and the host file is untouched.
    let after: Vec<String> = listing(d.root.parent().unwrap())
        .into_iter()
        .filter(|p| !p.starts_with("root/"))
        .collect();
    assert_eq!(
        after,
        before
            .into_iter()
            .filter(|p| !p.starts_with("root/"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        std::fs::read_to_string(d.outside.join("secret")).unwrap(),
        "host secret"
    );
}

#[test]
fn a_file_entry_replaces_a_symlink_instead_of_writing_through_it() {
    let d = dirs();
    let target = d.outside.join("secret").display().to_string();
    let tar = LayerBuilder::new()
        .symlink("link", &target)
        .file("link", 0o644, b"inside")
        .finish();
    apply(&d.root, &tar).unwrap();
    assert_eq!(
        std::fs::read_to_string(d.outside.join("secret")).unwrap(),
        "host secret"
    );
    assert!(!std::fs::symlink_metadata(d.root.join("link"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_to_string(d.root.join("link")).unwrap(),
        "inside"
    );
}

#[test]
fn links_devices_and_setuid() {
    let d = dirs();
    let tar = LayerBuilder::new()
        .dir("bin", 0o755)
        .file("bin/busybox", 0o4755, b"binary")
        .hardlink("bin/sh-hard", "bin/busybox")
        .symlink("bin/sh", "busybox")
        .symlink("etc-link", "/etc/passwd")
        .raw(tar::EntryType::Char, b"dev-null", b"", 0o666, b"")
        .raw(tar::EntryType::Fifo, b"fifo", b"", 0o666, b"")
        .finish();
    let stats = apply_layer(&d.root, tar.as_slice(), Compression::None, None).unwrap();
    assert_eq!((stats.created, stats.skipped), (5, 2));
    let bb = std::fs::metadata(d.root.join("bin/busybox")).unwrap();
    let hard = std::fs::metadata(d.root.join("bin/sh-hard")).unwrap();
    assert_eq!(bb.ino(), hard.ino());
    // setuid cleared, the rest of the mode kept.
    assert_eq!(bb.permissions().mode() & 0o7777, 0o755);
    assert_eq!(
        std::fs::read_link(d.root.join("etc-link")).unwrap(),
        PathBuf::from("/etc/passwd")
    );
    assert_eq!(
        std::fs::read_link(d.root.join("bin/sh")).unwrap(),
        PathBuf::from("busybox")
    );
    assert_eq!(
        listing(&d.root),
        vec!["bin", "bin/busybox", "bin/sh", "bin/sh-hard", "etc-link"]
    );
}

fn lower_layer() -> Vec<u8> {
    LayerBuilder::new()
        .dir("etc", 0o755)
        .file("etc/keep", 0o644, b"keep")
        .file("etc/gone", 0o644, b"gone")
        .dir("opq", 0o755)
        .file("opq/old", 0o644, b"old")
        .dir("opq/sub", 0o755)
        .file("opq/sub/deep", 0o644, b"deep")
        .dir("tree", 0o755)
        .file("tree/a", 0o644, b"a")
        .finish()
}

fn upper_layer() -> Vec<u8> {
    LayerBuilder::new()
        .file("etc/.wh.gone", 0o644, b"")
        .file("opq/new", 0o644, b"new")
        .file("opq/.wh..wh..opq", 0o644, b"")
        .file(".wh.tree", 0o644, b"")
        .file(".wh.never-existed", 0o644, b"")
        // The same layer's own entry survives its whiteout.
        .file("etc/same", 0o644, b"same")
        .file("etc/.wh.same", 0o644, b"")
        .finish()
}

#[test]
fn whiteouts_and_opaque_directories_across_two_layers_gzip_and_zstd() {
    for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let d = dirs();
        for tar in [lower_layer(), upper_layer()] {
            let blob = match compression {
                Compression::None => tar.clone(),
                Compression::Gzip => openshell_image::testing::TestLayer::gzip(&tar).data,
                Compression::Zstd => openshell_image::testing::TestLayer::zstd(&tar).data,
            };
            let stats = apply_layer(
                &d.root,
                blob.as_slice(),
                compression,
                Some(&digest_of(&tar)),
            )
            .unwrap();
            assert_eq!(stats.diff_id, digest_of(&tar));
        }
        assert_eq!(
            (compression, listing(&d.root)),
            (
                compression,
                vec!["etc", "etc/keep", "etc/same", "opq", "opq/new"]
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>()
            )
        );
    }
}

#[test]
fn a_wrong_diff_id_is_an_error() {
    let d = dirs();
    let tar = lower_layer();
    let wrong = digest_of(b"something else");
    let err = apply_layer(&d.root, tar.as_slice(), Compression::None, Some(&wrong)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "uncompressed content has digest {}, the config's diff id is {wrong}",
            digest_of(&tar)
        )
    );
}

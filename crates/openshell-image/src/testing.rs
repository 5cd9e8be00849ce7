//! Test support (feature `test-support`): Debian's `docker-registry` on loopback, images pushed
//! to it with oci-client's push, layer builders (including malicious archives), and the test
//! images `cargo xtask images` builds. Shared by this crate's tests, the behaviour suite and the
//! `openshell-test-registry` binary the image benchmark uses.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciImageIndex, OciImageManifest};
use oci_client::{Client, Reference};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::unpack::hex;

/// What can go wrong in the harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error("{what}")]
    Registry {
        what: String,
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// The registry binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "docker-registry";

/// Why the registry tests cannot run here, if they cannot.
pub fn registry_missing() -> Option<String> {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(REGISTRY_BIN).is_file()));
    (!found).then(|| format!("{REGISTRY_BIN} not on PATH: run `cargo xtask deps`"))
}

/// Registry options.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Require HTTP basic auth (htpasswd with a bcrypt entry) for this user and password.
    pub basic_auth: Option<(String, String)>,
}

/// A running `docker-registry` on 127.0.0.1 with its own storage; stopped on drop.
pub struct Registry {
    child: Option<Child>,
    dir: tempfile::TempDir,
    host: String,
}

impl Registry {
    pub fn start(options: &RegistryOptions) -> Result<Registry, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("openshell-registry-")
            .tempdir()
            .map_err(io("creating the registry directory"))?;
        let port = {
            let l =
                std::net::TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
            l.local_addr().map_err(io("finding a free port"))?.port()
        };
        let host = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: {host}\n",
            dir.path().join("storage").display()
        );
        if let Some((user, password)) = &options.basic_auth {
            let hash = bcrypt::hash(password, 4)
                .map_err(|e| HarnessError::Setup(format!("bcrypt: {e}")))?;
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{hash}\n"))
                .map_err(io("writing htpasswd"))?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: openshell-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).map_err(io("writing the registry config"))?;
        let log = std::fs::File::create(dir.path().join("registry.log"))
            .map_err(io("creating the registry log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("registry log"))?)
            .stderr(log)
            .spawn()
            .map_err(io(format!("starting {REGISTRY_BIN}")))?;
        let mut registry = Registry {
            child: Some(child),
            dir,
            host,
        };
        registry.wait_ready()?;
        Ok(registry)
    }

    fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(self.dir.path().join("registry.log"))
                        .unwrap_or_default();
                    return Err(HarnessError::Setup(format!(
                        "{REGISTRY_BIN} exited with {status}: {log}"
                    )));
                }
            }
            if let Ok(status) = self.get_status("/v2/") {
                if status == 200 || status == 401 {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(HarnessError::Setup(format!(
            "{REGISTRY_BIN} did not answer on {} within 20 s",
            self.host
        )))
    }

    /// The status code of a plain GET.
    pub fn get_status(&self, path: &str) -> Result<u16, HarnessError> {
        let mut s = TcpStream::connect(&self.host).map_err(io("connecting to the registry"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io("registry socket"))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.host
        )
        .map_err(io("writing to the registry"))?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).map_err(io("reading from the registry"))?;
        let line = String::from_utf8_lossy(&buf[..n]);
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| HarnessError::Setup(format!("odd registry answer {line:?}")))
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The file the registry serves a blob from (to corrupt it in tests).
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Stops the registry (the port then refuses connections).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One layer blob and its media type.
#[derive(Debug, Clone)]
pub struct TestLayer {
    pub data: Vec<u8>,
    pub media_type: String,
}

impl TestLayer {
    pub fn tar(tar: Vec<u8>) -> TestLayer {
        TestLayer {
            data: tar,
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        }
    }

    pub fn gzip(tar: &[u8]) -> TestLayer {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(tar).expect("gzip to memory");
        TestLayer {
            data: enc.finish().expect("gzip to memory"),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        }
    }

    pub fn zstd(tar: &[u8]) -> TestLayer {
        TestLayer {
            data: zstd::encode_all(tar, 3).expect("zstd to memory"),
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
        }
    }
}

/// `sha256:<hex>` of some bytes.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

/// An image to push: a config blob and layers.
#[derive(Debug, Clone)]
pub struct TestImage {
    pub config: Vec<u8>,
    pub layers: Vec<TestLayer>,
}

impl TestImage {
    /// An image whose config has the diff ids of `uncompressed` (one per layer, in order) and
    /// the given `config` section (Env, Cmd, ...), for `arch` (`amd64`, `arm64`).
    pub fn new(
        layers: Vec<TestLayer>,
        uncompressed: &[&[u8]],
        config: serde_json::Value,
        arch: &str,
    ) -> TestImage {
        let diff_ids: Vec<String> = uncompressed.iter().map(|t| digest_of(t)).collect();
        let config = json!({
            "architecture": arch,
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        TestImage {
            config: serde_json::to_vec(&config).expect("json"),
            layers,
        }
    }

    /// A single-layer amd64 image from an uncompressed tar, gzip-compressed.
    pub fn single(tar: &[u8], config: serde_json::Value) -> TestImage {
        TestImage::new(vec![TestLayer::gzip(tar)], &[tar], config, "amd64")
    }

    /// Loads an OCI image layout written by `cargo xtask images` (its index's first manifest).
    pub fn from_layout(dir: &Path) -> Result<TestImage, HarnessError> {
        let read_json = |p: PathBuf| -> Result<serde_json::Value, HarnessError> {
            let bytes = std::fs::read(&p).map_err(io(format!("reading {}", p.display())))?;
            serde_json::from_slice(&bytes)
                .map_err(|e| HarnessError::Setup(format!("{}: {e}", p.display())))
        };
        let blob = |d: &str| {
            dir.join("blobs/sha256")
                .join(d.strip_prefix("sha256:").unwrap_or(d))
        };
        let index = read_json(dir.join("index.json"))?;
        let manifest_digest = index["manifests"][0]["digest"]
            .as_str()
            .ok_or_else(|| HarnessError::Setup(format!("{}: no manifest", dir.display())))?;
        let manifest = read_json(blob(manifest_digest))?;
        let config_digest = manifest["config"]["digest"].as_str().unwrap_or_default();
        let config = std::fs::read(blob(config_digest)).map_err(io("reading the config"))?;
        let mut layers = Vec::new();
        for l in manifest["layers"].as_array().cloned().unwrap_or_default() {
            let d = l["digest"].as_str().unwrap_or_default();
            layers.push(TestLayer {
                data: std::fs::read(blob(d)).map_err(io(format!("reading layer {d}")))?,
                media_type: l["mediaType"].as_str().unwrap_or_default().to_owned(),
            });
        }
        Ok(TestImage { config, layers })
    }
}

fn client() -> Client {
    Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        platform_resolver: None,
        ..Default::default()
    })
}

fn auth(basic: Option<&(String, String)>) -> oci_client::secrets::RegistryAuth {
    match basic {
        Some((u, p)) => oci_client::secrets::RegistryAuth::Basic(u.clone(), p.clone()),
        None => oci_client::secrets::RegistryAuth::Anonymous,
    }
}

fn reference(s: &str) -> Result<Reference, HarnessError> {
    s.parse()
        .map_err(|e| HarnessError::Setup(format!("reference {s:?}: {e}")))
}

/// Pushes `image` as `reference` (`127.0.0.1:PORT/repo:tag`) with oci-client; returns the
/// manifest digest and size.
pub async fn push(
    reference_str: &str,
    image: &TestImage,
    basic: Option<&(String, String)>,
) -> Result<(String, u64), HarnessError> {
    let r = reference(reference_str)?;
    let client = client();
    let auth = auth(basic);
    let layers: Vec<ImageLayer> = image
        .layers
        .iter()
        .map(|l| ImageLayer::new(l.data.clone(), l.media_type.clone(), None))
        .collect();
    let config = Config::oci_v1(image.config.clone(), None);
    let manifest = OciImageManifest::build(&layers, &config, None);
    client
        .push(&r, &layers, config, &auth, Some(manifest))
        .await
        .map_err(|source| HarnessError::Registry {
            what: format!("pushing {reference_str}"),
            source: Box::new(source),
        })?;
    let (bytes, digest) = client
        .pull_manifest_raw(&r, &auth, &["application/vnd.oci.image.manifest.v1+json"])
        .await
        .map_err(|source| HarnessError::Registry {
            what: format!("reading back {reference_str}"),
            source: Box::new(source),
        })?;
    Ok((digest, bytes.len() as u64))
}

/// Pushes each `(arch, image)` and an OCI index of them as `reference`; returns the index digest
/// and each platform manifest's digest.
pub async fn push_index(
    reference_str: &str,
    images: &[(&str, &TestImage)],
) -> Result<(String, Vec<String>), HarnessError> {
    let mut entries = Vec::new();
    let mut digests = Vec::new();
    for (arch, image) in images {
        let tagged = format!("{reference_str}-{arch}");
        let (digest, size) = push(&tagged, image, None).await?;
        entries.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": size,
            "platform": {"architecture": arch, "os": "linux"},
        }));
        digests.push(digest);
    }
    let index: OciImageIndex = serde_json::from_value(json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))
    .map_err(|e| HarnessError::Setup(format!("index: {e}")))?;
    let r = reference(reference_str)?;
    client()
        .push_manifest_list(&r, &auth(None), index)
        .await
        .map_err(|source| HarnessError::Registry {
            what: format!("pushing the index {reference_str}"),
            source: Box::new(source),
        })?;
    let (_, digest) = client()
        .pull_manifest_raw(
            &r,
            &auth(None),
            &["application/vnd.oci.image.index.v1+json"],
        )
        .await
        .map_err(|source| HarnessError::Registry {
            what: format!("reading back {reference_str}"),
            source: Box::new(source),
        })?;
    Ok((digest, digests))
}

/// Builds tar archives entry by entry, including entries `tar::Builder` refuses to write
/// (`..`, absolute paths), for the malicious-archive tests.
pub struct LayerBuilder {
    out: Vec<u8>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    pub fn new() -> LayerBuilder {
        LayerBuilder { out: Vec::new() }
    }

    /// Appends a raw ustar entry with the name and link name bytes as given.
    pub fn raw(
        &mut self,
        kind: tar::EntryType,
        name: &[u8],
        link: &[u8],
        mode: u32,
        data: &[u8],
    ) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        {
            let bytes = h.as_old_mut();
            bytes.name = [0; 100];
            bytes.name[..name.len()].copy_from_slice(name);
            bytes.linkname = [0; 100];
            bytes.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.out.extend_from_slice(h.as_bytes());
        self.out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.out.extend(std::iter::repeat_n(0u8, pad));
        self
    }

    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.raw(tar::EntryType::Directory, name.as_bytes(), b"", mode, b"")
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.raw(tar::EntryType::Regular, name.as_bytes(), b"", mode, data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            tar::EntryType::Symlink,
            name.as_bytes(),
            target.as_bytes(),
            0o777,
            b"",
        )
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(
            tar::EntryType::Link,
            name.as_bytes(),
            target.as_bytes(),
            0o644,
            b"",
        )
    }

    /// A PAX extended header claiming `size` bytes (followed by that many bytes of records).
    pub fn pax(&mut self, records: &[u8]) -> &mut Self {
        self.raw(tar::EntryType::XHeader, b"PaxHeader", b"", 0o644, records)
    }

    /// A header of `kind` that claims `size` bytes of data, without the data (a huge PAX or GNU
    /// long-name record must be refused before anything is read).
    pub fn header_only(&mut self, kind: tar::EntryType, name: &str, size: u64) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(size);
        h.set_cksum();
        self.out.extend_from_slice(h.as_bytes());
        self
    }

    /// The archive with its two end-of-archive blocks.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.out);
        out.extend(std::iter::repeat_n(0u8, 1024));
        out
    }
}

/// Where `cargo xtask images` puts the test images: `$OPENSHELL_TEST_IMAGES`, else the
/// `test-images` directory of the target directory this test binary runs from.
pub fn test_images_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("OPENSHELL_TEST_IMAGES") {
        return Some(PathBuf::from(d));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .map(|a| a.join("test-images"))
        .find(|d| d.is_dir())
}

/// The OCI layout of a test image (`busybox`, `python`), or why it is missing.
pub fn test_image(name: &str) -> Result<PathBuf, String> {
    let dir = test_images_dir()
        .map(|d| d.join(name))
        .filter(|d| d.join("index.json").is_file());
    dir.ok_or_else(|| format!("test image {name:?} not built: run `cargo xtask images`"))
}

/// Returns true when a test needing `what` may run; prints why not otherwise, and panics
/// under `CI=true` (where every tool is installed by `cargo xtask deps`).
pub fn can_run(test: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(reason) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: {reason} (required under CI=true)");
            }
            #[allow(clippy::print_stderr)]
            {
                eprintln!("SKIP {test}: {reason}");
            }
            false
        }
    }
}

/// A token-auth front for a registry: `/v2/...` needs `Authorization: Bearer <token>` (else 401
/// with a `Bearer realm=...` challenge), `/token` hands out the token for HTTP basic
/// credentials, and authorised requests are relayed to the real registry behind it. This is the
/// registry token flow (challenge, realm, bearer) without standing up a JWT-signing auth server.
pub struct TokenFront {
    host: String,
    requests: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokens: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

const FRONT_TOKEN: &str = "openshell-test-token";

impl TokenFront {
    pub fn start(backend: &str, user: &str, password: &str) -> Result<TokenFront, HarnessError> {
        use base64::Engine;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").map_err(io("binding the token front"))?;
        let host = format!(
            "127.0.0.1:{}",
            listener
                .local_addr()
                .map_err(io("token front address"))?
                .port()
        );
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        );
        let requests = Arc::new(AtomicUsize::new(0));
        let tokens = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, t, s) = (requests.clone(), tokens.clone(), stop.clone());
        let backend = backend.to_owned();
        let realm = format!("http://{host}/token");
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                r.fetch_add(1, Ordering::SeqCst);
                let (backend, basic, realm, t) =
                    (backend.clone(), basic.clone(), realm.clone(), t.clone());
                std::thread::spawn(move || {
                    let _ = serve_front(conn, &backend, &basic, &realm, &t);
                });
            }
        });
        Ok(TokenFront {
            host,
            requests,
            tokens,
            stop,
        })
    }

    /// `127.0.0.1:PORT` of the front.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Connections accepted so far.
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.tokens.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for TokenFront {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(&self.host);
    }
}

fn serve_front(
    mut conn: TcpStream,
    backend: &str,
    basic: &str,
    realm: &str,
    tokens: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let authorization = headers
        .iter()
        .find(|(k, _)| k == "authorization")
        .map(|(_, v)| v.as_str());
    let reply = |conn: &mut TcpStream, status: &str, extra: &str, body: &str| {
        write!(
            conn,
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n{extra}\r\n{body}",
            body.len()
        )
    };
    if path.starts_with("/token") {
        if authorization == Some(basic) {
            tokens.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = format!(r#"{{"token":"{FRONT_TOKEN}","expires_in":300}}"#);
            return reply(&mut conn, "200 OK", "", &body);
        }
        return reply(
            &mut conn,
            "401 Unauthorized",
            "",
            r#"{"details":"bad credentials"}"#,
        );
    }
    if authorization != Some(&format!("Bearer {FRONT_TOKEN}")) {
        let challenge =
            format!("WWW-Authenticate: Bearer realm=\"{realm}\",service=\"openshell-test\"\r\n");
        return reply(
            &mut conn,
            "401 Unauthorized",
            &challenge,
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#,
        );
    }
    let mut upstream = TcpStream::connect(backend)?;
    let mut forwarded = format!("{request_line}\r\nHost: {backend}\r\nConnection: close\r\n");
    for (k, v) in &headers {
        if !matches!(k.as_str(), "host" | "connection" | "authorization") {
            forwarded.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    forwarded.push_str("\r\n");
    upstream.write_all(forwarded.as_bytes())?;
    std::io::copy(&mut upstream, &mut conn)?;
    Ok(())
}

//! Pulling with oci-client: resolve the manifest (selecting linux/amd64 from a list), fetch and
//! verify every blob into the store, unpack the layers into a new tree, publish it by rename.

use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::{Client, Reference, RegistryOperation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::auth::AuthOptions;
use crate::config::ConfigBlob;
use crate::error::ImageError;
use crate::store::{io_err, tempfile_in, PreparedImage, RefRecord, Store, TreeRecord};
use crate::unpack::{self, Compression};

/// Largest manifest or manifest list accepted.
pub const MAX_MANIFEST: u64 = 4 << 20;
/// Largest image config accepted.
pub const MAX_CONFIG: u64 = 16 << 20;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const ACCEPTED: &[&str] = &[OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];

/// When to contact the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Use the cache when the reference is there; pull otherwise (what a sandbox start does).
    #[default]
    Missing,
    /// Resolve the reference again (what `image pull` does); blobs and trees already cached are
    /// not fetched again.
    Always,
    /// Never contact a registry.
    Never,
}

/// Progress of a pull, for a progress bar or log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    Resolved {
        reference: String,
        digest: String,
        layers: usize,
        bytes: u64,
    },
    BlobStarted {
        digest: String,
        size: u64,
        cached: bool,
    },
    /// Bytes received so far for this blob.
    BlobProgress {
        digest: String,
        bytes: u64,
    },
    BlobDone {
        digest: String,
    },
    Unpacking {
        layer: String,
        index: usize,
        total: usize,
    },
    /// The image is verified, unpacked and published.
    Done {
        digest: String,
    },
}

/// A callback that receives [`PullEvent`]s.
pub type Observer = Arc<dyn Fn(&PullEvent) + Send + Sync>;

/// How to pull.
#[derive(Clone, Default)]
pub struct PullOptions {
    pub policy: PullPolicy,
    /// `HOST:PORT` of registries spoken to over plain HTTP (`--insecure-registry`).
    pub insecure_registries: Vec<String>,
    pub auth: AuthOptions,
    pub observer: Option<Observer>,
}

impl std::fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullOptions")
            .field("policy", &self.policy)
            .field("insecure_registries", &self.insecure_registries)
            .field("auth", &self.auth)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

/// Validates `--insecure-registry HOST:PORT`.
pub fn parse_insecure_registry(value: &str) -> Result<String, ImageError> {
    let bad = || ImageError::InsecureRegistry {
        value: value.to_owned(),
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(['/', '@', ' ']) {
        return Err(bad());
    }
    Ok(value.to_owned())
}

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .map_or(registry, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks that a digest is `sha256:` and 64 lower-case hex digits (it becomes a file name).
fn check_digest(reference: &str, digest: &str) -> Result<(), ImageError> {
    let ok = digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        Err(ImageError::UnsupportedDigest {
            reference: reference.to_owned(),
            digest: digest.to_owned(),
        })
    }
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", unpack::hex(&Sha256::digest(bytes)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestWire {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<IndexEntry>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexEntry {
    digest: String,
    #[serde(default)]
    platform: Option<PlatformWire>,
}

#[derive(Deserialize)]
struct PlatformWire {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
}

struct Pulling<'a> {
    store: &'a Store,
    client: Client,
    reference: Reference,
    name: String,
    observer: Option<Observer>,
    /// Whether this registry is spoken to over plain HTTP.
    insecure: bool,
}

impl Store {
    /// The prepared image for `reference`, pulled and unpacked as `options.policy` says.
    ///
    /// With [`PullPolicy::Missing`] a cached reference costs no network at all. A pull holds the
    /// store's lock, so concurrent callers wait and then find the image cached.
    pub async fn ensure(
        &self,
        reference: &str,
        options: &PullOptions,
    ) -> Result<PreparedImage, ImageError> {
        if options.policy != PullPolicy::Always {
            // Keys of the index are normalised references (which normalise to themselves), and
            // short forms seen before are remembered as aliases: a cached image is found without
            // parsing the reference (oci-spec's reference regex costs ~50 ms to build, more than
            // the rest of a cached start).
            let name = self.alias(reference)?;
            if let Some(p) = self.cached_normalised(name.as_deref().unwrap_or(reference))? {
                tracing::debug!(reference = %reference, digest = %p.digest, "image found in the cache");
                return Ok(p);
            }
        }
        let parsed = parse_reference(reference)?;
        let name = parsed.whole();
        let insecure = options
            .insecure_registries
            .iter()
            .map(|r| parse_insecure_registry(r))
            .collect::<Result<Vec<_>, _>>()?;
        if options.policy != PullPolicy::Always {
            if let Some(p) = self.cached_normalised(&name)? {
                tracing::debug!(reference = %name, digest = %p.digest, "image found in the cache");
                return Ok(p);
            }
        }
        if options.policy == PullPolicy::Never {
            return Err(ImageError::NotCached { reference: name });
        }
        let store = self.clone();
        let lock = tokio::task::spawn_blocking(move || store.lock())
            .await
            .map_err(ImageError::Join)??;
        if options.policy == PullPolicy::Missing {
            // Another puller may have finished while we waited for the lock.
            if let Some(p) = self.cached_normalised(&name)? {
                return Ok(p);
            }
        }
        self.clear_tmp()?;
        let registry = parsed.resolve_registry().to_owned();
        let protocol = if insecure.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(insecure.clone())
        };
        if insecure.contains(&registry) {
            if is_loopback(&registry) {
                tracing::info!(event = "image.insecure_registry", registry = %registry,
                               "plain HTTP to a loopback registry");
            } else {
                tracing::warn!(event = "image.insecure_registry", registry = %registry,
                               "plain HTTP to a non-loopback registry, as --insecure-registry asks");
            }
        }
        let client = Client::try_from(ClientConfig {
            protocol,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        })
        .map_err(|source| ImageError::Registry {
            reference: name.clone(),
            what: "a client".into(),
            source: Box::new(source),
        })?;
        let pulling = Pulling {
            store: self,
            client,
            reference: parsed,
            name: name.clone(),
            observer: options.observer.clone(),
            insecure: insecure.contains(&registry),
        };
        let result = pulling.run(&options.auth).await;
        if result.is_ok() && reference != name {
            self.add_alias(reference, &name)?;
        }
        drop(lock);
        result
    }

    /// The cached image of `reference`, if any, without any network.
    pub fn cached(&self, reference: &str) -> Result<Option<PreparedImage>, ImageError> {
        self.cached_normalised(&normalise_reference(reference)?)
    }
}

pub(crate) fn parse_reference(reference: &str) -> Result<Reference, ImageError> {
    reference
        .parse::<Reference>()
        .map_err(|source| ImageError::Reference {
            reference: reference.to_owned(),
            source,
        })
}

/// `busybox` -> `docker.io/library/busybox:latest`; registry references stay as given.
pub fn normalise_reference(reference: &str) -> Result<String, ImageError> {
    Ok(parse_reference(reference)?.whole())
}

impl Pulling<'_> {
    fn emit(&self, event: PullEvent) {
        if let Some(o) = &self.observer {
            o(&event);
        }
    }

    fn registry_err(
        &self,
        what: impl Into<String>,
    ) -> impl FnOnce(oci_client::errors::OciDistributionError) -> ImageError + '_ {
        let what = what.into();
        move |source| ImageError::Registry {
            reference: self.name.clone(),
            what,
            source: Box::new(source),
        }
    }

    fn parse_manifest(&self, bytes: &[u8], what: &str) -> Result<ManifestWire, ImageError> {
        serde_json::from_slice(bytes).map_err(|source| ImageError::Manifest {
            reference: self.name.clone(),
            what: what.to_owned(),
            source,
        })
    }

    /// Fetches a manifest by reference, verifies it against `expected` (or the registry's
    /// digest) and stores it as a blob.
    async fn manifest(
        &self,
        reference: &Reference,
        auth: &oci_client::secrets::RegistryAuth,
        expected: Option<&str>,
    ) -> Result<(Vec<u8>, String), ImageError> {
        let (bytes, registry_digest) = self
            .client
            .pull_manifest_raw(reference, auth, ACCEPTED)
            .await
            .map_err(self.registry_err("the manifest"))?;
        let expected = expected.unwrap_or(&registry_digest).to_owned();
        check_digest(&self.name, &expected)?;
        if bytes.len() as u64 > MAX_MANIFEST {
            return Err(ImageError::TooLarge {
                reference: self.name.clone(),
                what: "manifest",
                digest: expected,
                limit: MAX_MANIFEST,
            });
        }
        let actual = sha256(&bytes);
        if actual != expected {
            tracing::warn!(event = "image.digest_mismatch", reference = %self.name, expected = %expected,
                           actual = %actual, "manifest failed digest verification");
            return Err(ImageError::DigestMismatch {
                reference: self.name.clone(),
                what: "manifest",
                expected,
                actual,
            });
        }
        let path = self.store.blob_path(&expected);
        if !path.exists() {
            self.store.write_atomic(&path, &bytes)?;
        }
        Ok((bytes.to_vec(), expected))
    }

    async fn run(self, auth_options: &AuthOptions) -> Result<PreparedImage, ImageError> {
        let registry = self.reference.resolve_registry().to_owned();
        let credentials = auth_options.for_registry(self.reference.registry())?;
        tracing::debug!(reference = %self.name, registry = %registry, credentials = ?credentials,
                        "pulling");
        let auth = credentials.to_registry_auth();
        self.client
            .auth(&self.reference, &auth, RegistryOperation::Pull)
            .await
            .map_err(|source| ImageError::Auth {
                reference: self.name.clone(),
                registry: registry.clone(),
                hint: if is_loopback(&registry) && !self.insecure {
                    format!(
                        " (over HTTPS; a plain-HTTP registry needs --insecure-registry {registry})"
                    )
                } else {
                    String::new()
                },
                source: Box::new(source),
            })?;

        let (bytes, top_digest) = self
            .manifest(&self.reference, &auth, self.reference.digest())
            .await?;
        let top = self.parse_manifest(&bytes, "manifest")?;
        let is_index = matches!(top.media_type.as_deref(), Some(OCI_INDEX | DOCKER_LIST))
            || (top.media_type.is_none() && top.manifests.is_some());
        let (manifest, digest, index) = if is_index {
            let entries = top.manifests.unwrap_or_default();
            let chosen = entries.iter().find(|e| {
                e.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            });
            let Some(chosen) = chosen else {
                let available = entries
                    .iter()
                    .map(|e| {
                        e.platform.as_ref().map_or("unknown".to_owned(), |p| {
                            format!("{}/{}", p.os, p.architecture)
                        })
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(ImageError::NoPlatform {
                    reference: self.name.clone(),
                    available,
                });
            };
            check_digest(&self.name, &chosen.digest)?;
            tracing::debug!(reference = %self.name, digest = %chosen.digest, "selected linux/amd64");
            let by_digest = Reference::with_digest(
                self.reference.registry().to_owned(),
                self.reference.repository().to_owned(),
                chosen.digest.clone(),
            );
            let (bytes, digest) = self
                .manifest(&by_digest, &auth, Some(&chosen.digest))
                .await?;
            let m = self.parse_manifest(&bytes, "platform manifest")?;
            if m.manifests.is_some() {
                return Err(ImageError::UnsupportedManifest {
                    reference: self.name.clone(),
                    media_type: "a manifest list inside a manifest list".into(),
                });
            }
            (m, digest, Some(top_digest))
        } else {
            match top.media_type.as_deref() {
                None | Some(OCI_MANIFEST | DOCKER_MANIFEST) => {}
                Some(other) => {
                    return Err(ImageError::UnsupportedManifest {
                        reference: self.name.clone(),
                        media_type: other.to_owned(),
                    })
                }
            }
            (top, top_digest, None)
        };
        let (Some(config_desc), Some(layers)) = (manifest.config, manifest.layers) else {
            return Err(ImageError::UnsupportedManifest {
                reference: self.name.clone(),
                media_type: "a manifest without config or layers".into(),
            });
        };
        let mut compressions = Vec::with_capacity(layers.len());
        for layer in &layers {
            check_digest(&self.name, &layer.digest)?;
            let c = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
                ImageError::UnsupportedLayer {
                    reference: self.name.clone(),
                    digest: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                }
            })?;
            compressions.push(c);
        }
        let total: u64 = layers.iter().map(|l| l.size.max(0) as u64).sum();
        self.emit(PullEvent::Resolved {
            reference: self.name.clone(),
            digest: digest.clone(),
            layers: layers.len(),
            bytes: total,
        });

        let config_path = self.blob(&config_desc, "config", MAX_CONFIG).await?;
        let config_bytes = std::fs::read(&config_path).map_err(io_err(&config_path))?;
        let config: ConfigBlob =
            serde_json::from_slice(&config_bytes).map_err(|source| ImageError::Manifest {
                reference: self.name.clone(),
                what: format!("config {}", config_desc.digest),
                source,
            })?;
        if (!config.os.is_empty() && config.os != "linux")
            || (!config.architecture.is_empty() && config.architecture != "amd64")
        {
            return Err(ImageError::WrongPlatform {
                reference: self.name.clone(),
                os: config.os.clone(),
                arch: config.architecture.clone(),
            });
        }
        let diff_ids = config
            .rootfs
            .as_ref()
            .map(|r| r.diff_ids.clone())
            .unwrap_or_default();
        if diff_ids.len() != layers.len() {
            return Err(ImageError::LayerCount {
                reference: self.name.clone(),
                diff_ids: diff_ids.len(),
                layers: layers.len(),
            });
        }

        let mut blob_paths = Vec::with_capacity(layers.len());
        for layer in &layers {
            blob_paths.push(self.blob(layer, "layer", u64::MAX).await?);
        }

        let tree = self.store.tree_dir(&digest);
        if !tree.join("image.json").exists() {
            let record = TreeRecord {
                digest: digest.clone(),
                config_digest: config_desc.digest.clone(),
                layers: layers.iter().map(|l| l.digest.clone()).collect(),
                config: config.image_config(),
            };
            let plan: Vec<(PathBuf, String, Compression, String)> = blob_paths
                .iter()
                .zip(&layers)
                .zip(compressions.iter().zip(&diff_ids))
                .map(|((p, l), (c, d))| (p.clone(), l.digest.clone(), *c, d.clone()))
                .collect();
            let observer = self.observer.clone();
            let store = self.store.clone();
            let name = self.name.clone();
            tokio::task::spawn_blocking(move || {
                unpack_tree(&store, &name, &tree, &record, &plan, observer)
            })
            .await
            .map_err(ImageError::Join)??;
        }

        let mut refs = self.store.refs()?;
        refs.insert(
            self.name.clone(),
            RefRecord {
                digest: digest.clone(),
                index,
                config: config_desc.digest.clone(),
                layers: layers.iter().map(|l| l.digest.clone()).collect(),
                size: total,
                pulled: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            },
        );
        self.store.write_refs(&refs)?;
        tracing::info!(event = "image.pulled", reference = %self.name, digest = %digest,
                       layers = layers.len(), "image pulled, verified and unpacked");
        self.emit(PullEvent::Done {
            digest: digest.clone(),
        });
        self.store
            .prepared(&self.name, &digest)?
            .ok_or_else(|| ImageError::NotCached {
                reference: self.name.clone(),
            })
    }

    /// The verified blob of `desc` in the store, downloading it if it is not there yet.
    async fn blob(
        &self,
        desc: &Descriptor,
        what: &'static str,
        limit: u64,
    ) -> Result<PathBuf, ImageError> {
        check_digest(&self.name, &desc.digest)?;
        let size = u64::try_from(desc.size).unwrap_or(0);
        let dest = self.store.blob_path(&desc.digest);
        if dest.exists() {
            self.emit(PullEvent::BlobStarted {
                digest: desc.digest.clone(),
                size,
                cached: true,
            });
            self.emit(PullEvent::BlobDone {
                digest: desc.digest.clone(),
            });
            return Ok(dest);
        }
        if size > limit {
            return Err(ImageError::TooLarge {
                reference: self.name.clone(),
                what,
                digest: desc.digest.clone(),
                limit,
            });
        }
        self.emit(PullEvent::BlobStarted {
            digest: desc.digest.clone(),
            size,
            cached: false,
        });
        let (tmp_path, file) = tempfile_in(&self.store.tmp_dir())?;
        let result = self.download(desc, what, size, &tmp_path, file).await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp_path);
            return Err(e);
        }
        std::fs::rename(&tmp_path, &dest).map_err(io_err(&dest))?;
        self.emit(PullEvent::BlobDone {
            digest: desc.digest.clone(),
        });
        Ok(dest)
    }

    async fn download(
        &self,
        desc: &Descriptor,
        what: &'static str,
        size: u64,
        tmp_path: &Path,
        file: std::fs::File,
    ) -> Result<(), ImageError> {
        let mut file = tokio::fs::File::from_std(file);
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, desc.digest.as_str())
            .await
            .map_err(self.registry_err(format!("{what} {}", desc.digest)))?;
        let mut hasher = Sha256::new();
        let mut received = 0u64;
        let mismatch = |hasher: Sha256| {
            let actual = format!("sha256:{}", unpack::hex(&hasher.finalize()));
            tracing::warn!(event = "image.digest_mismatch", reference = %self.name,
                           expected = %desc.digest, actual = %actual, what,
                           "blob failed digest verification");
            ImageError::DigestMismatch {
                reference: self.name.clone(),
                what,
                expected: desc.digest.clone(),
                actual,
            }
        };
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // oci-client checks the digest too and fails the stream's end; report it as ours.
                Err(_) if received == size => return Err(mismatch(hasher)),
                Err(e) => {
                    return Err(ImageError::Store {
                        path: tmp_path.to_owned(),
                        source: std::io::Error::other(format!(
                            "downloading {what} {}: {e}",
                            desc.digest
                        )),
                    })
                }
            };
            received += chunk.len() as u64;
            if received > size {
                return Err(ImageError::SizeMismatch {
                    reference: self.name.clone(),
                    what,
                    digest: desc.digest.clone(),
                    expected: size,
                    actual: received,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io_err(tmp_path))?;
            self.emit(PullEvent::BlobProgress {
                digest: desc.digest.clone(),
                bytes: received,
            });
        }
        file.flush().await.map_err(io_err(tmp_path))?;
        file.sync_all().await.map_err(io_err(tmp_path))?;
        if received != size {
            return Err(ImageError::SizeMismatch {
                reference: self.name.clone(),
                what,
                digest: desc.digest.clone(),
                expected: size,
                actual: received,
            });
        }
        let actual = format!("sha256:{}", unpack::hex(&hasher.clone().finalize()));
        if actual != desc.digest {
            return Err(mismatch(hasher));
        }
        Ok(())
    }
}

/// Unpacks the layers into a temporary tree and publishes it by renaming it into place.
fn unpack_tree(
    store: &Store,
    name: &str,
    tree: &Path,
    record: &TreeRecord,
    plan: &[(PathBuf, String, Compression, String)],
    observer: Option<Observer>,
) -> Result<(), ImageError> {
    let (tmp_marker, _) = tempfile_in(&store.tmp_dir())?;
    let staging = tmp_marker.with_extension("tree");
    let rootfs = staging.join("rootfs");
    std::fs::create_dir_all(&rootfs).map_err(io_err(&rootfs))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err(&rootfs))?;
    }
    for (index, (path, digest, compression, diff_id)) in plan.iter().enumerate() {
        if let Some(o) = &observer {
            o(&PullEvent::Unpacking {
                layer: digest.clone(),
                index,
                total: plan.len(),
            });
        }
        let file = std::fs::File::open(path).map_err(io_err(path))?;
        let stats = unpack::apply_layer(
            &rootfs,
            BufReader::with_capacity(1 << 16, file),
            *compression,
            Some(diff_id),
        )
        .map_err(|source| {
            tracing::warn!(event = "image.unpack.refused", reference = %name, layer = %digest,
                           error = %source, "layer refused");
            ImageError::Unpack {
                reference: name.to_owned(),
                layer: digest.clone(),
                source,
            }
        })?;
        tracing::debug!(reference = %name, layer = %digest, created = stats.created,
                        whiteouts = stats.whiteouts, skipped = stats.skipped, "layer unpacked");
    }
    let meta = staging.join("image.json");
    let bytes = serde_json::to_vec_pretty(record).map_err(|source| ImageError::StoreIndex {
        path: meta.clone(),
        source,
    })?;
    std::fs::write(&meta, bytes).map_err(io_err(&meta))?;
    std::fs::rename(&staging, tree).map_err(io_err(tree))?;
    let _ = std::fs::remove_file(&tmp_marker);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insecure_registry_values() {
        assert!(parse_insecure_registry("127.0.0.1:5000").is_ok());
        assert!(parse_insecure_registry("[::1]:5000").is_ok());
        for bad in ["127.0.0.1", "host:0", "host:x", ":5000", "http://h:1/"] {
            assert!(parse_insecure_registry(bad).is_err(), "{bad}");
        }
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:1"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }

    #[test]
    fn digests_must_be_sha256_hex() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(check_digest("r", &good).is_ok());
        for bad in [
            "sha256:../../etc".to_owned(),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(check_digest("r", &bad).is_err(), "{bad}");
        }
    }
}

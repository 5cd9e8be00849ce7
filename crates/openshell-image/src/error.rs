//! Errors of the image crate: one enum for pulling and the store, one for unpacking an entry.

use std::path::PathBuf;

/// Anything that can go wrong turning a reference into a prepared image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {reference:?}")]
    Reference {
        reference: String,
        #[source]
        source: oci_client::ParseError,
    },
    #[error("--insecure-registry {value:?}: expected HOST:PORT")]
    InsecureRegistry { value: String },
    #[error("{path}: {what}")]
    RegistryConfig { path: PathBuf, what: String },
    #[error("reading registry config {path}")]
    RegistryConfigIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{reference}: authentication with {registry} failed{hint}")]
    Auth {
        reference: String,
        registry: String,
        /// Empty, or a hint for a likely cause.
        hint: String,
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
    #[error("{reference}: fetching {what} from the registry failed")]
    Registry {
        reference: String,
        what: String,
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
    #[error(
        "{reference}: {what} {expected} failed digest verification (got {actual}); nothing was \
         cached or unpacked"
    )]
    DigestMismatch {
        reference: String,
        what: &'static str,
        expected: String,
        actual: String,
    },
    #[error("{reference}: {what} {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        reference: String,
        what: &'static str,
        digest: String,
        expected: u64,
        actual: u64,
    },
    #[error("{reference}: unsupported digest {digest:?} (only sha256 is accepted)")]
    UnsupportedDigest { reference: String, digest: String },
    #[error("{reference}: {what} {digest} is larger than the {limit}-byte limit")]
    TooLarge {
        reference: String,
        what: &'static str,
        digest: String,
        limit: u64,
    },
    #[error("{reference}: malformed {what}")]
    Manifest {
        reference: String,
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{reference}: unsupported manifest media type {media_type:?}")]
    UnsupportedManifest {
        reference: String,
        media_type: String,
    },
    #[error("{reference}: no linux/amd64 image in the manifest list (it has: {available})")]
    NoPlatform {
        reference: String,
        available: String,
    },
    #[error("{reference}: the image is for {os}/{arch}, not linux/amd64")]
    WrongPlatform {
        reference: String,
        os: String,
        arch: String,
    },
    #[error("{reference}: layer {digest}: unsupported media type {media_type:?}")]
    UnsupportedLayer {
        reference: String,
        digest: String,
        media_type: String,
    },
    #[error(
        "{reference}: the config lists {diff_ids} layer diff ids but the manifest has {layers} \
         layers"
    )]
    LayerCount {
        reference: String,
        diff_ids: usize,
        layers: usize,
    },
    #[error("{reference}: layer {layer}")]
    Unpack {
        reference: String,
        layer: String,
        #[source]
        source: UnpackError,
    },
    #[error("{reference} is not in the image cache (pull it first)")]
    NotCached { reference: String },
    #[error("image cache {path}")]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image cache {path}: corrupt index")]
    StoreIndex {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("background task failed")]
    Join(#[source] tokio::task::JoinError),
}

/// Why one layer could not be unpacked. Entry errors name the entry's path in the archive.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("entry {entry:?}: path escapes the root with '..'")]
    PathEscape { entry: String },
    #[error("entry {entry:?}: absolute paths are refused")]
    AbsolutePath { entry: String },
    #[error("entry {entry:?}: a parent component is a symbolic link or not a directory")]
    ThroughSymlink { entry: String },
    #[error("entry {entry:?}: hard link target {target:?} escapes the root")]
    HardLinkEscape { entry: String, target: String },
    #[error("entry {entry:?}: hard link target {target:?} does not exist in the image")]
    HardLinkMissing { entry: String, target: String },
    #[error("entry {entry:?}: hard link target {target:?} is a directory")]
    HardLinkToDirectory { entry: String, target: String },
    #[error("entry {entry:?}: {kind} header of {size} bytes exceeds the {limit}-byte limit")]
    HeaderTooLarge {
        entry: String,
        kind: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("entry {entry:?}: malformed PAX record: {what}")]
    BadPax { entry: String, what: String },
    #[error("entry {entry:?}: unsupported entry type {kind:?}")]
    UnsupportedType { entry: String, kind: String },
    #[error("entry {entry:?}: invalid whiteout")]
    BadWhiteout { entry: String },
    #[error("entry {entry:?}")]
    Io {
        entry: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the archive")]
    Archive(#[source] std::io::Error),
    #[error("uncompressed content has digest {actual}, the config's diff id is {expected}")]
    DiffId { expected: String, actual: String },
}

impl UnpackError {
    pub(crate) fn io(entry: &str, source: impl Into<std::io::Error>) -> UnpackError {
        UnpackError::Io {
            entry: entry.to_owned(),
            source: source.into(),
        }
    }
}

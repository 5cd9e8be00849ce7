//! The content-addressed image cache under `$OPENSHELL_HOME/images`:
//!
//! ```text
//! images/                    0700
//!   lock                     flock: one writer (pull, rm, gc) at a time
//!   refs.json                reference -> manifest digest, config, layers (written by rename)
//!   aliases.json             short forms seen (`busybox`) -> normalised reference
//!   blobs/sha256/<hex>       manifests, configs, layer blobs; verified before they are renamed in
//!   trees/<manifest hex>/    rootfs/ (the unpacked image) and image.json; renamed in whole
//!   tmp/                     partial downloads and unpacks (cleared by the next writer)
//! ```
//!
//! Nothing under `blobs/` or `trees/` is modified after its rename: sandboxes get their own
//! writable copy of a tree.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;
use crate::error::ImageError;

/// A prepared image: a verified, unpacked, cached tree and its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedImage {
    /// The reference as normalised (`registry/repository:tag` or `@digest`).
    pub reference: String,
    /// The image manifest's digest (`sha256:<hex>`).
    pub digest: String,
    /// The unpacked root file system. Read-only by contract: never modify it, copy it.
    pub rootfs_dir: PathBuf,
    pub config: ImageConfig,
}

/// One cached reference, as `image ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefRecord {
    /// Manifest digest.
    pub digest: String,
    /// The manifest list / index it was selected from, if any.
    #[serde(default)]
    pub index: Option<String>,
    pub config: String,
    pub layers: Vec<String>,
    /// Sum of the compressed layer sizes.
    pub size: u64,
    /// Seconds since the epoch of the pull.
    pub pulled: u64,
}

/// What `image.json` in a tree records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TreeRecord {
    pub digest: String,
    pub config_digest: String,
    pub layers: Vec<String>,
    pub config: ImageConfig,
}

/// What `rm`/`gc` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub trees: usize,
    pub blobs: usize,
}

/// The image cache.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Holds the store's exclusive lock until dropped.
pub(crate) struct StoreLock {
    _lock: nix::fcntl::Flock<File>,
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Store {
        path: path.to_owned(),
        source,
    }
}

impl Store {
    /// `$OPENSHELL_HOME`, or `~/.local/share/openshell`.
    pub fn default_home() -> PathBuf {
        if let Some(h) = std::env::var_os("OPENSHELL_HOME") {
            return PathBuf::from(h);
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".local/share/openshell")
    }

    /// Opens (creating if needed) the cache under `home/images`.
    pub fn open(home: &Path) -> Result<Store, ImageError> {
        let root = home.join("images");
        for dir in [
            root.clone(),
            root.join("blobs/sha256"),
            root.join("trees"),
            root.join("tmp"),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err(&dir))?;
        }
        // The trees hold other users' files (and images may hold secrets): host users other
        // than the owner never reach them.
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(io_err(&root))?;
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn lock(&self) -> Result<StoreLock, ImageError> {
        let path = self.root.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, e)| ImageError::Store {
                path: path.clone(),
                source: e.into(),
            },
        )?;
        Ok(StoreLock { _lock: lock })
    }

    /// Where a verified blob lives (whether or not it is there).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap_or(digest))
    }

    pub(crate) fn tree_dir(&self, digest: &str) -> PathBuf {
        self.root
            .join("trees")
            .join(digest.strip_prefix("sha256:").unwrap_or(digest))
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Removes leftovers of interrupted writers. Call with the lock held.
    pub(crate) fn clear_tmp(&self) -> Result<(), ImageError> {
        let tmp = self.tmp_dir();
        for entry in fs::read_dir(&tmp).map_err(io_err(&tmp))? {
            let path = entry.map_err(io_err(&tmp))?.path();
            let r = if path.is_dir() && !path.is_symlink() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            r.map_err(io_err(&path))?;
        }
        Ok(())
    }

    /// Writes `bytes` to `dest` through a temporary file and a rename.
    pub(crate) fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), ImageError> {
        let mut tmp = tempfile_in(&self.tmp_dir())?;
        tmp.1.write_all(bytes).map_err(io_err(&tmp.0))?;
        tmp.1.sync_all().map_err(io_err(&tmp.0))?;
        fs::rename(&tmp.0, dest).map_err(io_err(dest))
    }

    pub(crate) fn refs(&self) -> Result<BTreeMap<String, RefRecord>, ImageError> {
        let path = self.root.join("refs.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| ImageError::StoreIndex { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    pub(crate) fn write_refs(&self, refs: &BTreeMap<String, RefRecord>) -> Result<(), ImageError> {
        let path = self.root.join("refs.json");
        let bytes = serde_json::to_vec_pretty(refs).map_err(|source| ImageError::StoreIndex {
            path: path.clone(),
            source,
        })?;
        self.write_atomic(&path, &bytes)
    }

    fn aliases(&self) -> Result<BTreeMap<String, String>, ImageError> {
        let path = self.root.join("aliases.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| ImageError::StoreIndex { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The normalised reference a short form (`busybox`) was resolved to before, if any.
    pub(crate) fn alias(&self, reference: &str) -> Result<Option<String>, ImageError> {
        Ok(self.aliases()?.remove(reference))
    }

    /// Remembers that `reference` normalises to `name`. Call with the lock held.
    pub(crate) fn add_alias(&self, reference: &str, name: &str) -> Result<(), ImageError> {
        let mut aliases = self.aliases()?;
        if aliases.get(reference).map(String::as_str) == Some(name) {
            return Ok(());
        }
        aliases.insert(reference.to_owned(), name.to_owned());
        self.write_aliases(&aliases)
    }

    fn write_aliases(&self, aliases: &BTreeMap<String, String>) -> Result<(), ImageError> {
        let path = self.root.join("aliases.json");
        let bytes =
            serde_json::to_vec_pretty(aliases).map_err(|source| ImageError::StoreIndex {
                path: path.clone(),
                source,
            })?;
        self.write_atomic(&path, &bytes)
    }

    /// The prepared image of a cached reference (already normalised), without any network.
    pub(crate) fn cached_normalised(
        &self,
        reference: &str,
    ) -> Result<Option<PreparedImage>, ImageError> {
        let refs = self.refs()?;
        let Some(record) = refs.get(reference) else {
            return Ok(None);
        };
        self.prepared(reference, &record.digest)
    }

    /// The prepared image of the tree of `digest`, if it is published.
    pub(crate) fn prepared(
        &self,
        reference: &str,
        digest: &str,
    ) -> Result<Option<PreparedImage>, ImageError> {
        let dir = self.tree_dir(digest);
        let meta = dir.join("image.json");
        let bytes = match fs::read(&meta) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&meta)(e)),
        };
        let record: TreeRecord = serde_json::from_slice(&bytes)
            .map_err(|source| ImageError::StoreIndex { path: meta, source })?;
        Ok(Some(PreparedImage {
            reference: reference.to_owned(),
            digest: record.digest,
            rootfs_dir: dir.join("rootfs"),
            config: record.config,
        }))
    }

    /// Every cached reference with its record, sorted by reference.
    pub fn list(&self) -> Result<Vec<(String, RefRecord)>, ImageError> {
        Ok(self.refs()?.into_iter().collect())
    }

    /// Forgets `reference` and removes what no reference needs any more. Errors with
    /// [`ImageError::NotCached`] when the reference is not in the cache.
    pub fn remove(&self, reference: &str) -> Result<GcReport, ImageError> {
        let normalised = crate::normalise_reference(reference)?;
        let _lock = self.lock()?;
        let mut refs = self.refs()?;
        if refs.remove(&normalised).is_none() {
            return Err(ImageError::NotCached {
                reference: normalised,
            });
        }
        self.write_refs(&refs)?;
        tracing::info!(event = "image.removed", reference = %normalised, "image reference removed");
        self.gc_locked(&refs)
    }

    /// Removes trees and blobs no reference needs, and leftovers of interrupted pulls.
    pub fn gc(&self) -> Result<GcReport, ImageError> {
        let _lock = self.lock()?;
        let refs = self.refs()?;
        self.gc_locked(&refs)
    }

    fn gc_locked(&self, refs: &BTreeMap<String, RefRecord>) -> Result<GcReport, ImageError> {
        self.clear_tmp()?;
        let mut aliases = self.aliases()?;
        let before = aliases.len();
        aliases.retain(|_, name| refs.contains_key(name));
        if aliases.len() != before {
            self.write_aliases(&aliases)?;
        }
        let mut keep_trees = BTreeSet::new();
        let mut keep_blobs = BTreeSet::new();
        for r in refs.values() {
            let hex = |d: &str| d.strip_prefix("sha256:").unwrap_or(d).to_owned();
            keep_trees.insert(hex(&r.digest));
            keep_blobs.insert(hex(&r.digest));
            keep_blobs.insert(hex(&r.config));
            if let Some(i) = &r.index {
                keep_blobs.insert(hex(i));
            }
            keep_blobs.extend(r.layers.iter().map(|l| hex(l)));
        }
        let mut report = GcReport::default();
        let trees = self.root.join("trees");
        for entry in fs::read_dir(&trees).map_err(io_err(&trees))? {
            let entry = entry.map_err(io_err(&trees))?;
            if !keep_trees.contains(entry.file_name().to_string_lossy().as_ref()) {
                fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
                report.trees += 1;
            }
        }
        let blobs = self.root.join("blobs/sha256");
        for entry in fs::read_dir(&blobs).map_err(io_err(&blobs))? {
            let entry = entry.map_err(io_err(&blobs))?;
            if !keep_blobs.contains(entry.file_name().to_string_lossy().as_ref()) {
                fs::remove_file(entry.path()).map_err(io_err(&entry.path()))?;
                report.blobs += 1;
            }
        }
        tracing::info!(
            event = "image.gc",
            trees = report.trees,
            blobs = report.blobs,
            "unreferenced image data removed"
        );
        Ok(report)
    }
}

/// A new, uniquely named file in `dir`.
pub(crate) fn tempfile_in(dir: &Path) -> Result<(PathBuf, File), ImageError> {
    for attempt in 0..100u32 {
        let path = dir.join(format!(
            "{}-{}-{attempt}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Err(io_err(dir)(std::io::Error::other(
        "no unique temporary name",
    )))
}

//! Safe layer unpacking: our own walker over the `tar` crate's raw entries.
//!
//! Rules (each refusal is an [`UnpackError`] naming the entry):
//! - Entry paths are relative. An absolute path is refused (not re-rooted), and so is any `..`
//!   component, even one that would stay inside.
//! - Every parent directory is opened component by component with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS)` from a descriptor of the root, and the entry itself is created with
//!   `*at` calls relative to its parent's descriptor. A symbolic link is created as is, but is
//!   never followed: a later entry whose parent is a symlink is refused. (Layers that builders
//!   record from an overlay upper directory name real paths, so this refuses no image that
//!   `docker build` makes; Docker itself would resolve such a parent inside the root instead.)
//! - Hard links must name an entry already extracted, inside the root, not a directory.
//! - Whiteouts (`.wh.NAME`) and opaque directories (`.wh..wh..opq`) hide lower layers only, never
//!   entries of the same layer (the OCI image spec's rule).
//! - Device nodes and FIFOs are skipped with an `image.unpack.skipped` event: an image never
//!   creates host devices.
//! - Setuid and setgid bits are cleared (`image.unpack.setid_cleared`): the cache lives on the
//!   host, where a setuid-root file from an image would be a way up for a host user. Ownership
//!   is kept when running as root. Extended attributes and timestamps are not restored.
//! - PAX and GNU long-name records are read only up to [`MAX_EXTENSION_HEADER`] bytes; larger
//!   ones are refused before anything is read.
//! - The uncompressed stream is hashed and checked against the config's diff id.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{fstatat, mkdirat, Mode, SFlag};
use nix::unistd::{fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};
use sha2::{Digest, Sha256};

use crate::error::UnpackError;

/// The largest PAX extended header or GNU long name/link record accepted.
pub const MAX_EXTENSION_HEADER: u64 = 1 << 20;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer media type, or `None` for a type that is not a layer we unpack
    /// (foreign layers, artifacts).
    pub fn from_media_type(media_type: &str) -> Option<Compression> {
        match media_type {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// What one layer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    /// Entries created (files, directories, links).
    pub created: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Device nodes and FIFOs skipped.
    pub skipped: u64,
    /// `sha256:<hex>` of the uncompressed tar stream.
    pub diff_id: String,
}

/// Applies one layer on top of `root` (a directory this process created). When
/// `expected_diff_id` is given, the uncompressed stream must hash to it.
pub fn apply_layer(
    root: &Path,
    blob: impl Read,
    compression: Compression,
    expected_diff_id: Option<&str>,
) -> Result<LayerStats, UnpackError> {
    let root_fd = nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| UnpackError::io(&root.display().to_string(), e))?;
    let decoder: Box<dyn Read> = match compression {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(blob).map_err(UnpackError::Archive)?)
        }
    };
    let mut hashing = HashingReader {
        inner: decoder,
        hasher: Sha256::new(),
    };
    let mut unpacker = Unpacker {
        root: root_fd,
        chown: nix::unistd::geteuid().is_root(),
        created: HashSet::new(),
        stats: LayerStats::default(),
    };
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let entries = archive.entries().map_err(UnpackError::Archive)?.raw(true);
        let mut pending = Pending::default();
        for entry in entries {
            let mut entry = entry.map_err(UnpackError::Archive)?;
            unpacker.entry(&mut entry, &mut pending)?;
        }
    }
    // The end-of-archive blocks and any padding belong to the diff id too.
    io::copy(&mut hashing, &mut io::sink()).map_err(UnpackError::Archive)?;
    let diff_id = format!("sha256:{}", hex(&hashing.hasher.finalize()));
    if let Some(expected) = expected_diff_id {
        if expected != diff_id {
            return Err(UnpackError::DiffId {
                expected: expected.to_owned(),
                actual: diff_id,
            });
        }
    }
    let mut stats = unpacker.stats;
    stats.diff_id = diff_id;
    Ok(stats)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Extension records that apply to the next real entry.
#[derive(Default)]
struct Pending {
    pax: HashMap<String, Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

struct Unpacker {
    root: OwnedFd,
    chown: bool,
    /// Paths created by this layer (whiteouts never hide them).
    created: HashSet<PathBuf>,
    stats: LayerStats,
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn read_extension<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    name: &str,
    kind: &'static str,
) -> Result<Vec<u8>, UnpackError> {
    let size = entry
        .header()
        .entry_size()
        .map_err(|e| UnpackError::io(name, e))?;
    if size > MAX_EXTENSION_HEADER {
        return Err(UnpackError::HeaderTooLarge {
            entry: name.to_owned(),
            kind,
            size,
            limit: MAX_EXTENSION_HEADER,
        });
    }
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    entry
        .take(MAX_EXTENSION_HEADER)
        .read_to_end(&mut data)
        .map_err(UnpackError::Archive)?;
    Ok(data)
}

/// Parses PAX records (`"<len> <key>=<value>\n"`) into `out`.
fn parse_pax(
    data: &[u8],
    name: &str,
    out: &mut HashMap<String, Vec<u8>>,
) -> Result<(), UnpackError> {
    let bad = |what: &str| UnpackError::BadPax {
        entry: name.to_owned(),
        what: what.to_owned(),
    };
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|b| *b == 0) {
            break;
        }
        let space = rest
            .iter()
            .position(|b| *b == b' ')
            .ok_or_else(|| bad("record without a length"))?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("record length is not a number"))?;
        if len <= space + 1 || len > rest.len() {
            return Err(bad("record length out of range"));
        }
        let record = &rest[space + 1..len];
        let record = record
            .strip_suffix(b"\n")
            .ok_or_else(|| bad("record not terminated by a newline"))?;
        let eq = record
            .iter()
            .position(|b| *b == b'=')
            .ok_or_else(|| bad("record without '='"))?;
        let key = std::str::from_utf8(&record[..eq]).map_err(|_| bad("key is not UTF-8"))?;
        out.insert(key.to_owned(), record[eq + 1..].to_vec());
        rest = &rest[len..];
    }
    Ok(())
}

fn pax_number(
    pax: &HashMap<String, Vec<u8>>,
    key: &str,
    name: &str,
) -> Result<Option<u64>, UnpackError> {
    match pax.get(key) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| UnpackError::BadPax {
                entry: name.to_owned(),
                what: format!("{key} is not a number"),
            }),
    }
}

/// An archive path made relative and free of `.`/`..`; empty for the root itself.
fn normalise(raw: &[u8], name: &str) -> Result<PathBuf, UnpackError> {
    let path = Path::new(OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::AbsolutePath {
                    entry: name.to_owned(),
                })
            }
            Component::ParentDir => {
                return Err(UnpackError::PathEscape {
                    entry: name.to_owned(),
                })
            }
            Component::CurDir => {}
            Component::Normal(c) => out.push(c),
        }
    }
    Ok(out)
}

fn resolve_flags() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH
        | ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

/// Opens the directory `name` (one component) under `dir` without following a symlink.
fn open_dir(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    openat2(
        dir,
        name,
        OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(resolve_flags()),
    )
}

fn is_dir(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<Option<bool>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(
            SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR,
        )),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes `name` under `dir` (a whole tree for a directory), never following symlinks.
fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<()> {
    match is_dir(dir, name)? {
        None => Ok(()),
        Some(true) => {
            let fd = open_dir(dir, name)?;
            clear_dir(fd, Path::new(""), &HashSet::new())?;
            unlinkat(dir, name, UnlinkatFlags::RemoveDir)
        }
        Some(false) => unlinkat(dir, name, UnlinkatFlags::NoRemoveDir),
    }
}

/// Removes the children of the directory `fd` (at archive path `rel`) that are not in `keep`;
/// kept directories are cleared the same way (an opaque directory hides everything below it
/// from lower layers).
fn clear_dir(fd: OwnedFd, rel: &Path, keep: &HashSet<PathBuf>) -> nix::Result<()> {
    let names: Vec<std::ffi::OsString> = {
        let mut d = nix::dir::Dir::from_fd(fd.try_clone().map_err(|_| Errno::EMFILE)?)?;
        d.iter()
            .filter_map(|e| e.ok())
            .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_owned())
            .filter(|n| n != "." && n != "..")
            .collect()
    };
    for name in names {
        let child = rel.join(&name);
        if keep.contains(&child) {
            if is_dir(fd.as_fd(), &name)? == Some(true) {
                clear_dir(open_dir(fd.as_fd(), &name)?, &child, keep)?;
            }
        } else {
            remove_at(fd.as_fd(), &name)?;
        }
    }
    Ok(())
}

struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Unpacker {
    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        pending: &mut Pending,
    ) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        let header_name = lossy(&entry.header().path_bytes());
        match kind {
            tar::EntryType::XGlobalHeader => {
                // Global records (comments, mtimes) change nothing we restore; the data is
                // skipped unread.
                return Ok(());
            }
            tar::EntryType::XHeader => {
                let data = read_extension(entry, &header_name, "PAX")?;
                return parse_pax(&data, &header_name, &mut pending.pax);
            }
            tar::EntryType::GNULongName => {
                let mut data = read_extension(entry, &header_name, "GNU long name")?;
                while data.last() == Some(&0) {
                    data.pop();
                }
                pending.long_name = Some(data);
                return Ok(());
            }
            tar::EntryType::GNULongLink => {
                let mut data = read_extension(entry, &header_name, "GNU long link")?;
                while data.last() == Some(&0) {
                    data.pop();
                }
                pending.long_link = Some(data);
                return Ok(());
            }
            _ => {}
        }
        let pending = std::mem::take(pending);
        let raw_path = pending
            .pax
            .get("path")
            .cloned()
            .or(pending.long_name)
            .unwrap_or_else(|| entry.header().path_bytes().into_owned());
        let name = lossy(&raw_path);
        let raw_link = pending
            .pax
            .get("linkpath")
            .cloned()
            .or(pending.long_link)
            .or_else(|| entry.header().link_name_bytes().map(|c| c.into_owned()));
        let header = entry.header();
        let header_size = header.entry_size().map_err(|e| UnpackError::io(&name, e))?;
        if let Some(size) = pax_number(&pending.pax, "size", &name)? {
            // The raw reader reads the header's size; a different PAX size would desynchronise
            // it, so it is refused rather than guessed.
            if size != header_size {
                return Err(UnpackError::BadPax {
                    entry: name,
                    what: format!("size {size} differs from the header's {header_size}"),
                });
            }
        }
        let uid = match pax_number(&pending.pax, "uid", &name)? {
            Some(u) => u,
            None => header.uid().map_err(|e| UnpackError::io(&name, e))?,
        };
        let gid = match pax_number(&pending.pax, "gid", &name)? {
            Some(g) => g,
            None => header.gid().map_err(|e| UnpackError::io(&name, e))?,
        };
        let id = |v: u64| {
            u32::try_from(v).map_err(|_| UnpackError::BadPax {
                entry: name.clone(),
                what: format!("owner id {v} out of range"),
            })
        };
        let meta = Meta {
            mode: header.mode().map_err(|e| UnpackError::io(&name, e))? & 0o7777,
            uid: id(uid)?,
            gid: id(gid)?,
        };
        let path = normalise(&raw_path, &name)?;

        // Whiteouts first: they are markers, never files.
        if let Some(file_name) = path.file_name().and_then(|f| f.to_str()) {
            if file_name.starts_with(WHITEOUT_PREFIX) {
                return self.whiteout(&path, file_name, &name);
            }
        }
        if path.as_os_str().is_empty() {
            // The root directory itself (`./`): its mode and owner stay ours.
            if kind == tar::EntryType::Directory {
                return Ok(());
            }
            return Err(UnpackError::UnsupportedType {
                entry: name,
                kind: format!("{kind:?} at the root"),
            });
        }

        match kind {
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                tracing::info!(event = "image.unpack.skipped", entry = %name, kind = ?kind,
                               "device nodes and FIFOs from images are not created");
                self.stats.skipped += 1;
                return Ok(());
            }
            tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::Directory
            | tar::EntryType::Symlink
            | tar::EntryType::Link => {}
            other => {
                return Err(UnpackError::UnsupportedType {
                    entry: name,
                    kind: format!("{other:?}"),
                })
            }
        }

        let parent_fd = self
            .parent(&path, &name, true)?
            .ok_or_else(|| UnpackError::io(&name, io::Error::from(io::ErrorKind::NotFound)))?;
        let parent = parent_fd.as_fd();
        let leaf = path.file_name().unwrap_or_default().to_owned();
        let io_err = |e: Errno| UnpackError::io(&name, e);
        let mode = self.clear_setid(&meta, &name);

        match kind {
            tar::EntryType::Directory => {
                match is_dir(parent, &leaf).map_err(io_err)? {
                    Some(true) => {}
                    Some(false) => {
                        remove_at(parent, &leaf).map_err(io_err)?;
                        mkdirat(parent, leaf.as_os_str(), Mode::from_bits_truncate(0o700))
                            .map_err(io_err)?;
                    }
                    None => mkdirat(parent, leaf.as_os_str(), Mode::from_bits_truncate(0o700))
                        .map_err(io_err)?,
                }
                let dir = File::from(open_dir(parent, &leaf).map_err(io_err)?);
                self.own(&dir, &meta, &name)?;
                dir.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|e| UnpackError::io(&name, e))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_at(parent, &leaf).map_err(io_err)?;
                let fd = openat2(
                    parent,
                    leaf.as_os_str(),
                    OpenHow::new()
                        .flags(
                            OFlag::O_WRONLY
                                | OFlag::O_CREAT
                                | OFlag::O_EXCL
                                | OFlag::O_NOFOLLOW
                                | OFlag::O_CLOEXEC,
                        )
                        .mode(Mode::from_bits_truncate(0o600))
                        .resolve(resolve_flags()),
                )
                .map_err(io_err)?;
                let mut file = File::from(fd);
                io::copy(entry, &mut file).map_err(|e| UnpackError::io(&name, e))?;
                self.own(&file, &meta, &name)?;
                file.set_permissions(std::fs::Permissions::from_mode(mode))
                    .map_err(|e| UnpackError::io(&name, e))?;
            }
            tar::EntryType::Symlink => {
                let target = raw_link.unwrap_or_default();
                if target.is_empty() {
                    return Err(UnpackError::UnsupportedType {
                        entry: name,
                        kind: "symlink without a target".into(),
                    });
                }
                remove_at(parent, &leaf).map_err(io_err)?;
                symlinkat(OsStr::from_bytes(&target), parent, leaf.as_os_str()).map_err(io_err)?;
                if self.chown {
                    fchownat(
                        parent,
                        leaf.as_os_str(),
                        Some(Uid::from_raw(meta.uid)),
                        Some(Gid::from_raw(meta.gid)),
                        AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(io_err)?;
                }
            }
            tar::EntryType::Link => {
                let raw_target = raw_link.unwrap_or_default();
                let target_name = lossy(&raw_target);
                let escape = || UnpackError::HardLinkEscape {
                    entry: name.clone(),
                    target: target_name.clone(),
                };
                let target = normalise(&raw_target, &name).map_err(|_| escape())?;
                let target_leaf = match target.file_name() {
                    Some(l) => l.to_owned(),
                    None => {
                        return Err(UnpackError::HardLinkToDirectory {
                            entry: name.clone(),
                            target: target_name,
                        })
                    }
                };
                let missing = || UnpackError::HardLinkMissing {
                    entry: name.clone(),
                    target: target_name.clone(),
                };
                let target_parent = self.parent(&target, &name, false)?.ok_or_else(missing)?;
                match is_dir(target_parent.as_fd(), &target_leaf).map_err(io_err)? {
                    None => return Err(missing()),
                    Some(true) => {
                        return Err(UnpackError::HardLinkToDirectory {
                            entry: name.clone(),
                            target: target_name,
                        })
                    }
                    Some(false) => {}
                }
                if target != path {
                    remove_at(parent, &leaf).map_err(io_err)?;
                    linkat(
                        target_parent.as_fd(),
                        target_leaf.as_os_str(),
                        parent,
                        leaf.as_os_str(),
                        AtFlags::empty(),
                    )
                    .map_err(io_err)?;
                }
            }
            _ => unreachable!("filtered above"),
        }
        self.created.insert(path);
        self.stats.created += 1;
        Ok(())
    }

    fn clear_setid(&self, meta: &Meta, name: &str) -> u32 {
        if meta.mode & 0o6000 != 0 {
            tracing::info!(event = "image.unpack.setid_cleared", entry = %name,
                           mode = format!("{:o}", meta.mode), "setuid/setgid bits cleared");
        }
        meta.mode & 0o1777
    }

    fn own(&self, file: &File, meta: &Meta, name: &str) -> Result<(), UnpackError> {
        if self.chown {
            std::os::unix::fs::fchown(file, Some(meta.uid), Some(meta.gid))
                .map_err(|e| UnpackError::io(name, e))?;
        }
        Ok(())
    }

    /// A descriptor of the directory holding `path`, walked from the root one component at a
    /// time without following symlinks. Missing directories are created (mode 0755, owned by
    /// us) when `create`, else the answer is `None`.
    fn parent(
        &mut self,
        path: &Path,
        name: &str,
        create: bool,
    ) -> Result<Option<OwnedFd>, UnpackError> {
        let mut cur: Option<OwnedFd> = None;
        let mut walked = PathBuf::new();
        let Some(parent) = path.parent() else {
            return Ok(Some(
                self.root
                    .try_clone()
                    .map_err(|e| UnpackError::io(name, e))?,
            ));
        };
        for component in parent.components() {
            let Component::Normal(c) = component else {
                continue;
            };
            walked.push(c);
            let dir = cur.as_ref().map_or(self.root.as_fd(), |f| f.as_fd());
            let next = match open_dir(dir, c) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(dir, c, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(UnpackError::io(name, e)),
                    }
                    self.created.insert(walked.clone());
                    open_dir(dir, c).map_err(|e| self.walk_error(name, e))?
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(e) => return Err(self.walk_error(name, e)),
            };
            cur = Some(next);
        }
        match cur {
            Some(fd) => Ok(Some(fd)),
            None => Ok(Some(
                self.root
                    .try_clone()
                    .map_err(|e| UnpackError::io(name, e))?,
            )),
        }
    }

    fn walk_error(&self, name: &str, e: Errno) -> UnpackError {
        match e {
            Errno::ELOOP | Errno::ENOTDIR | Errno::EXDEV => {
                tracing::warn!(event = "image.unpack.refused", entry = %name,
                               "entry path traverses a symbolic link");
                UnpackError::ThroughSymlink {
                    entry: name.to_owned(),
                }
            }
            e => UnpackError::io(name, e),
        }
    }

    fn whiteout(&mut self, path: &Path, file_name: &str, name: &str) -> Result<(), UnpackError> {
        let parent_rel = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let Some(parent) = self.parent(path, name, false)? else {
            // Nothing below to hide.
            return Ok(());
        };
        let io_err = |e: Errno| UnpackError::io(name, e);
        if file_name == OPAQUE {
            clear_dir(parent, &parent_rel, &self.created).map_err(io_err)?;
        } else {
            let hidden = &file_name[WHITEOUT_PREFIX.len()..];
            if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
                return Err(UnpackError::BadWhiteout {
                    entry: name.to_owned(),
                });
            }
            if !self.created.contains(&parent_rel.join(hidden)) {
                remove_at(parent.as_fd(), OsStr::new(hidden)).map_err(io_err)?;
            }
        }
        self.stats.whiteouts += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_parse_and_reject_bad_lengths() {
        let mut out = HashMap::new();
        parse_pax(b"13 path=a/bc\n", "x", &mut out).unwrap();
        assert_eq!(out.get("path").map(Vec::as_slice), Some(&b"a/bc"[..]));
        for bad in [&b"99 path=a\n"[..], b"x path=a\n", b"9 patha\n", b"5 a=b\n"] {
            assert!(
                parse_pax(bad, "x", &mut HashMap::new()).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn normalise_refuses_absolute_and_dotdot() {
        assert_eq!(normalise(b"./a//b/", "e").unwrap(), PathBuf::from("a/b"));
        assert!(matches!(
            normalise(b"/etc/passwd", "e"),
            Err(UnpackError::AbsolutePath { .. })
        ));
        assert!(matches!(
            normalise(b"a/../../x", "e"),
            Err(UnpackError::PathEscape { .. })
        ));
        assert!(matches!(
            normalise(b"a/../b", "e"),
            Err(UnpackError::PathEscape { .. })
        ));
    }
}

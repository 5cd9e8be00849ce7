//! Caller identity from /proc: the process backend's resolver (on the host) and the guest
//! agent's (inside the VM).
//!
//! **Identify** (cheap, done when a connection is accepted and again after its request head):
//! the sandbox's socket table (`/proc/<init>/net/tcp` and `tcp6`, read to a bounded size)
//! maps the connection to a socket inode; the [`ProcessHistory`] names the process that
//! called `connect` on it (never a guess among the socket's holders); that process must still
//! run the executable it ran then and must not have started another program since. The
//! ancestors are walked up through `PPid` to the sandbox's boundary, and an ancestor counts
//! only if the history says it already was that program when it created the next process
//! down. argv\[0\] is never read.
//!
//! **Verify** (only for an allowed connection): each executable's content against what was
//! first seen at its path in this sandbox (SHA-256, hashed at most once per file version
//! across sandboxes, concurrent requests for one file sharing one hash, refused above a size
//! limit without reading); the loader (an initial environment with `LD_PRELOAD`, `LD_AUDIT`
//! or `LD_LIBRARY_PATH`, or executable code mapped from a deleted file, a memory file or a
//! path the sandbox can write, makes a process something else than its binary); and every
//! other process of the sandbox that holds the socket must run the same executable (only
//! processes running another executable have their descriptors looked at, with a bound on
//! how many).
//!
//! The work is paced: the resolver's futures yield between files and between megabytes
//! hashed, so the guest agent's single thread keeps serving; on the host each sandbox's
//! identity work runs on at most one blocking thread at a time ([`ProcfsResolver::offloaded`]).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};

use crate::identity::{
    BoxFuture, Caller, ChainEntry, Identified, IdentityError, IdentityResolver, ProcKey,
    ProcessHistory,
};

/// Deepest ancestor chain followed.
const MAX_ANCESTORS: usize = 64;
/// Most bytes of a socket table read per lookup (about 50 000 sockets).
const MAX_SOCKET_TABLE: u64 = 8 * 1024 * 1024;
/// Most bytes of a process's initial environment read.
const MAX_ENVIRON: u64 = 4 * 1024 * 1024;
/// Most bytes of a process's memory map read.
const MAX_MAPS: u64 = 8 * 1024 * 1024;
/// Most descriptors looked at per connection when checking who else holds its socket.
pub const MAX_DESCRIPTORS_CHECKED: usize = 65_536;
/// Default limit on an executable's size for hashing it.
pub const DEFAULT_MAX_HASH_BYTES: u64 = 512 * 1024 * 1024;
/// Bytes hashed between two yields.
const HASH_SLICE: usize = 1024 * 1024;
/// Most file versions whose digest is remembered.
const HASH_CACHE_MAX: usize = 4096;

/// Variables that redirect the dynamic loader.
const LOADER_VARIABLES: &[&str] = &["LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH"];

type PidSource = dyn Fn() -> std::io::Result<Vec<u32>> + Send + Sync;

/// A version of a file: what its content digest is remembered by. `ctime` changes with any
/// write and cannot be set back by the file's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

type Slot = Arc<tokio::sync::OnceCell<[u8; 32]>>;

/// SHA-256 digests of executables by file version, shared by every sandbox's resolver (a
/// file version has one content), with one hash in flight per version.
#[derive(Debug, Default)]
pub struct HashCache {
    slots: Mutex<HashMap<FileKey, Slot>>,
}

impl HashCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    async fn digest(
        &self,
        key: FileKey,
        file: std::fs::File,
        path: &Path,
    ) -> Result<[u8; 32], IdentityError> {
        let slot = {
            let mut slots = self
                .slots
                .lock()
                .map_err(|_| IdentityError::Other("hash cache poisoned".into()))?;
            if slots.len() >= HASH_CACHE_MAX && !slots.contains_key(&key) {
                slots.clear();
            }
            Arc::clone(slots.entry(key).or_default())
        };
        let mut file = Some(file);
        slot.get_or_try_init(|| async {
            let file = file
                .take()
                .ok_or_else(|| IdentityError::Other("hash started twice".into()))?;
            hash_paced(file, path).await
        })
        .await
        .copied()
    }
}

/// SHA-256 of `file`, yielding after every [`HASH_SLICE`] bytes.
async fn hash_paced(mut file: std::fs::File, path: &Path) -> Result<[u8; 32], IdentityError> {
    let io = |source| IdentityError::Proc {
        path: path.to_path_buf(),
        source,
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut since_yield = 0usize;
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        since_yield += n;
        if since_yield >= HASH_SLICE {
            since_yield = 0;
            pace().await;
        }
    }
    Ok(hasher.finalize().into())
}

/// Let other tasks run (any executor: wakes itself at once).
pub(crate) fn pace() -> impl Future<Output = ()> {
    struct Yield(bool);
    impl Future for Yield {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                Poll::Ready(())
            } else {
                self.0 = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
    Yield(false)
}

/// What a [`ProcfsResolver`] needs to know about its sandbox.
#[derive(Debug, Clone)]
pub struct ProcfsConfig {
    /// The procfs mount to read (`/proc`).
    pub proc_root: PathBuf,
    /// Pid of a process in the sandbox's network namespace (its init, or the guest agent);
    /// never counted as an ancestor.
    pub init_pid: u32,
    /// Paths the sandbox's processes can write, as they see them (the policy's read_write
    /// paths and the workdir it makes writable): code mapped from below one of them is not
    /// the binary's own.
    pub writable: Vec<PathBuf>,
    /// Executables larger than this are not hashed, and their callers are denied.
    pub max_hash_bytes: u64,
}

impl ProcfsConfig {
    /// The defaults for `/proc` and `init_pid`, nothing writable.
    pub fn new(init_pid: u32) -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            init_pid,
            writable: Vec::new(),
            max_hash_bytes: DEFAULT_MAX_HASH_BYTES,
        }
    }
}

struct Inner {
    config: ProcfsConfig,
    pids: Box<PidSource>,
    history: Arc<dyn ProcessHistory>,
    hashes: Arc<HashCache>,
    /// First digest seen per executable path in this sandbox.
    seen: Mutex<HashMap<PathBuf, [u8; 32]>>,
}

/// [`IdentityResolver`] over a procfs and a [`ProcessHistory`].
#[derive(Clone)]
pub struct ProcfsResolver {
    inner: Arc<Inner>,
    /// Set on the host: identity work runs on blocking threads, at most this many at once for
    /// the sandbox.
    budget: Option<Arc<tokio::sync::Semaphore>>,
}

impl std::fmt::Debug for ProcfsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcfsResolver")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl ProcfsResolver {
    /// `pids`: the sandbox's processes right now (for example from its cgroup.procs), asked
    /// on every identification. `history`: what the supervisor saw of its `connect` and
    /// `exec` calls. `hashes`: digests shared with other sandboxes' resolvers.
    pub fn new(
        config: ProcfsConfig,
        pids: impl Fn() -> std::io::Result<Vec<u32>> + Send + Sync + 'static,
        history: Arc<dyn ProcessHistory>,
        hashes: Arc<HashCache>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                pids: Box::new(pids),
                history,
                hashes,
                seen: Mutex::new(HashMap::new()),
            }),
            budget: None,
        }
    }

    /// Run the [`IdentityResolver`] methods on blocking threads, at most `threads` at once
    /// for this sandbox (the host's per-sandbox budget). Needs a multi-threaded tokio
    /// runtime.
    pub fn offloaded(mut self, threads: usize) -> Self {
        self.budget = Some(Arc::new(tokio::sync::Semaphore::new(threads.max(1))));
        self
    }

    /// [`IdentityResolver::identify`] on the calling task (the guest agent's way).
    pub async fn identify_here(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Identified, IdentityError> {
        self.inner.identify(peer, local).await
    }

    /// [`IdentityResolver::verify`] on the calling task.
    pub async fn verify_here(&self, identified: &Identified) -> Result<Caller, IdentityError> {
        self.inner.verify(identified).await
    }

    async fn offload<T, F>(&self, work: F) -> Result<T, IdentityError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Pin<Box<dyn Future<Output = Result<T, IdentityError>> + Send>>
            + Send
            + 'static,
    {
        let inner = Arc::clone(&self.inner);
        let Some(budget) = &self.budget else {
            return work(inner).await;
        };
        let _permit = budget
            .acquire()
            .await
            .map_err(|_| IdentityError::Other("identity budget closed".into()))?;
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || handle.block_on(work(inner)))
            .await
            .unwrap_or_else(|e| Err(IdentityError::Other(e.to_string())))
    }
}

impl IdentityResolver for ProcfsResolver {
    fn identify(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> BoxFuture<'_, Result<Identified, IdentityError>> {
        Box::pin(
            self.offload(move |inner| Box::pin(async move { inner.identify(peer, local).await })),
        )
    }

    fn verify<'a>(
        &'a self,
        identified: &'a Identified,
    ) -> BoxFuture<'a, Result<Caller, IdentityError>> {
        let identified = identified.clone();
        Box::pin(
            self.offload(move |inner| Box::pin(async move { inner.verify(&identified).await })),
        )
    }
}

fn proc_io(path: PathBuf) -> impl FnOnce(std::io::Error) -> IdentityError {
    move |source| IdentityError::Proc { path, source }
}

/// Read at most `limit` bytes of a file; `None` when it holds more.
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

impl Inner {
    fn proc_path(&self, pid: u32, rest: &str) -> PathBuf {
        self.config.proc_root.join(pid.to_string()).join(rest)
    }

    fn find_inode(&self, peer: SocketAddr, local: SocketAddr) -> Result<u64, IdentityError> {
        for table in ["net/tcp", "net/tcp6"] {
            let path = self.proc_path(self.config.init_pid, table);
            let bytes = match read_bounded(&path, MAX_SOCKET_TABLE) {
                Ok(Some(b)) => b,
                Ok(None) => {
                    return Err(IdentityError::TooMuch(format!(
                        "the sandbox's socket table {} is larger than {MAX_SOCKET_TABLE} bytes",
                        path.display()
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(IdentityError::Proc { path, source }),
            };
            if let Some(inode) = find_socket(&String::from_utf8_lossy(&bytes), peer, local) {
                return Ok(inode);
            }
        }
        Err(IdentityError::SocketNotFound { peer })
    }

    /// `(start time, parent pid)` from `/proc/PID/stat`.
    fn stat(&self, pid: u32) -> Option<(u64, u32)> {
        let text = std::fs::read_to_string(self.proc_path(pid, "stat")).ok()?;
        parse_stat(&text)
    }

    fn key(&self, pid: u32) -> Option<ProcKey> {
        self.stat(pid).map(|(start, _)| ProcKey { pid, start })
    }

    /// The executable's path and `(dev, ino)`.
    fn exe(&self, pid: u32) -> Result<(PathBuf, (u64, u64)), IdentityError> {
        let path = self.proc_path(pid, "exe");
        let target = std::fs::read_link(&path).map_err(proc_io(path.clone()))?;
        let meta = std::fs::metadata(&path).map_err(proc_io(path))?;
        Ok((target, (meta.dev(), meta.ino())))
    }

    /// Whether `pid` is in the sandbox's pid namespace (its init's). A helper of the
    /// supervisor that started a process inside (an exec session's helper enters the
    /// namespaces only for its children) is outside, and so is never an ancestor.
    fn in_sandbox_pidns(&self, pid: u32) -> bool {
        let ns = |p: u32| std::fs::read_link(self.proc_path(p, "ns/pid")).ok();
        match (ns(self.config.init_pid), ns(pid)) {
            (Some(sandbox), Some(theirs)) => sandbox == theirs,
            _ => false,
        }
    }

    fn members(&self) -> Result<Vec<u32>, IdentityError> {
        (self.pids)().map_err(|source| IdentityError::Proc {
            path: PathBuf::from("cgroup.procs"),
            source,
        })
    }

    async fn identify(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Identified, IdentityError> {
        let inode = self.find_inode(peer, local)?;
        let connector = self
            .history
            .connector(inode)
            .ok_or(IdentityError::NoConnector { inode })?;
        let key = connector.process;
        if self.key(key.pid) != Some(key) {
            return Err(IdentityError::ConnectorGone { pid: key.pid });
        }
        let (exe, exe_file) = self.exe(key.pid)?;
        let exec_seq = self.history.exec_seq(key);
        if exe_file != connector.exe || exec_seq > connector.seq {
            return Err(IdentityError::Changed(format!(
                "pid {} started {} after it connected",
                key.pid,
                exe.display()
            )));
        }
        let mut chain = vec![ChainEntry {
            process: key,
            exe_file,
            exec_seq,
        }];
        let members: HashSet<u32> = self.members()?.into_iter().collect();
        let mut ancestors = Vec::new();
        let mut child = key;
        let mut depth = 0;
        while depth < MAX_ANCESTORS {
            depth += 1;
            let Some((_, parent)) = self.stat(child.pid) else {
                break;
            };
            // The walk stops at the sandbox's boundary: its init, a process that is no member
            // of the sandbox, or one outside its pid namespace.
            if parent == 0
                || parent == self.config.init_pid
                || !members.contains(&parent)
                || !self.in_sandbox_pidns(parent)
            {
                break;
            }
            let Some(parent_key) = self.key(parent) else {
                break;
            };
            if self.history.credits(parent_key, child) {
                let (parent_exe, parent_file) = self.exe(parent)?;
                ancestors.push(parent_exe);
                chain.push(ChainEntry {
                    process: parent_key,
                    exe_file: parent_file,
                    exec_seq: self.history.exec_seq(parent_key),
                });
            }
            child = parent_key;
        }
        pace().await;
        Ok(Identified {
            caller: Caller {
                pid: key.pid,
                exe,
                ancestors,
            },
            chain,
            socket_inode: inode,
        })
    }

    async fn verify(&self, identified: &Identified) -> Result<Caller, IdentityError> {
        let Some((first, rest)) = identified.chain.split_first() else {
            return Ok(identified.caller.clone());
        };
        let caller = &identified.caller;
        self.check_process(first, &caller.exe).await?;
        let mut ancestors = Vec::new();
        for (entry, exe) in rest.iter().zip(&caller.ancestors) {
            match self.check_process(entry, exe).await {
                Ok(()) => ancestors.push(exe.clone()),
                Err(error) => {
                    tracing::debug!(target: "openshell::proxy", pid = entry.process.pid, %error, "ancestor not credited");
                }
            }
        }
        self.check_holders(identified.socket_inode, first).await?;
        Ok(Caller {
            pid: caller.pid,
            exe: caller.exe.clone(),
            ancestors,
        })
    }

    /// The loader and content checks of one process on the chain.
    async fn check_process(&self, entry: &ChainEntry, exe: &Path) -> Result<(), IdentityError> {
        let pid = entry.process.pid;
        if let Some(why) = self.loader_redirection(pid, exe)? {
            return Err(IdentityError::Redirected {
                exe: exe.to_path_buf(),
                why,
            });
        }
        pace().await;
        self.check_content(pid, exe).await?;
        // Still the same process running the same file.
        if self.key(pid) != Some(entry.process) || self.exe(pid)?.1 != entry.exe_file {
            return Err(IdentityError::Changed(format!(
                "pid {pid} changed while it was checked"
            )));
        }
        Ok(())
    }

    /// Why `pid` is not only its executable, if it is not.
    fn loader_redirection(&self, pid: u32, exe: &Path) -> Result<Option<String>, IdentityError> {
        let path = self.proc_path(pid, "environ");
        let Some(environ) = read_bounded(&path, MAX_ENVIRON).map_err(proc_io(path))? else {
            return Ok(Some(format!(
                "its initial environment is larger than {MAX_ENVIRON} bytes"
            )));
        };
        if let Some(name) = loader_variable(&environ) {
            return Ok(Some(format!("its environment sets {name}")));
        }
        if environ.is_empty() {
            // Empty, or not laid out yet: a process caught inside its execve has no
            // environment to read, and must not pass as clean for that.
            let path = self.proc_path(pid, "stat");
            let stat = std::fs::read_to_string(&path).map_err(proc_io(path))?;
            if environment_laid_out(&stat) != Some(true) {
                return Ok(Some(
                    "it is still starting (its environment is not laid out yet)".into(),
                ));
            }
        }
        let path = self.proc_path(pid, "maps");
        let Some(maps) = read_bounded(&path, MAX_MAPS).map_err(proc_io(path))? else {
            return Ok(Some(format!(
                "its memory map is larger than {MAX_MAPS} bytes"
            )));
        };
        Ok(foreign_code(
            &String::from_utf8_lossy(&maps),
            exe,
            &self.config.writable,
        ))
    }

    /// Check (and on first sight record) the content of `pid`'s executable.
    async fn check_content(&self, pid: u32, exe: &Path) -> Result<(), IdentityError> {
        let path = self.proc_path(pid, "exe");
        let file = std::fs::File::open(&path).map_err(proc_io(path.clone()))?;
        let meta = file.metadata().map_err(proc_io(path.clone()))?;
        if meta.size() > self.config.max_hash_bytes {
            return Err(IdentityError::TooLarge {
                exe: exe.to_path_buf(),
                size: meta.size(),
                limit: self.config.max_hash_bytes,
            });
        }
        let digest = self.hashes.digest(FileKey::of(&meta), file, &path).await?;
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| IdentityError::Other("binary table poisoned".into()))?;
        match seen.get(exe) {
            Some(first) if *first != digest => Err(IdentityError::BinaryChanged {
                exe: exe.to_path_buf(),
            }),
            Some(_) => Ok(()),
            None => {
                seen.insert(exe.to_path_buf(), digest);
                Ok(())
            }
        }
    }

    /// Every other process holding the socket runs the caller's executable, as itself (its
    /// loader not redirected). Only processes running another executable, or the same one
    /// redirected, have their descriptors read, at most [`MAX_DESCRIPTORS_CHECKED`] in all.
    async fn check_holders(&self, inode: u64, caller: &ChainEntry) -> Result<(), IdentityError> {
        if inode == 0 {
            return Ok(());
        }
        let want = format!("socket:[{inode}]");
        let mut checked = 0usize;
        for pid in self.members()? {
            if pid == caller.process.pid {
                continue;
            }
            let Ok((exe, file)) = self.exe(pid) else {
                continue;
            };
            // The same binary holding the socket is fine only if it runs as itself.
            let mut redirected = None;
            if file == caller.exe_file {
                match self.loader_redirection(pid, &exe) {
                    Ok(None) => continue,
                    Ok(Some(why)) => redirected = Some(why),
                    Err(error) => redirected = Some(error.to_string()),
                }
            }
            let Ok(entries) = std::fs::read_dir(self.proc_path(pid, "fd")) else {
                continue;
            };
            for entry in entries.flatten() {
                checked += 1;
                if checked > MAX_DESCRIPTORS_CHECKED {
                    return Err(IdentityError::TooMuch(format!(
                        "the sandbox's other programs hold more than {MAX_DESCRIPTORS_CHECKED} descriptors"
                    )));
                }
                if std::fs::read_link(entry.path()).is_ok_and(|t| t.as_os_str() == want.as_str()) {
                    return Err(match redirected {
                        Some(why) => IdentityError::Redirected {
                            exe,
                            why: format!("pid {pid} holds the connection's socket too, and {why}"),
                        },
                        None => IdentityError::Shared { pid, exe },
                    });
                }
            }
            pace().await;
        }
        Ok(())
    }
}

/// The first loader variable set (non-empty) in a `/proc/PID/environ` image.
fn loader_variable(environ: &[u8]) -> Option<&'static str> {
    environ.split(|&b| b == 0).find_map(|entry| {
        LOADER_VARIABLES.iter().copied().find(|name| {
            entry.len() > name.len() + 1
                && entry.starts_with(name.as_bytes())
                && entry[name.len()] == b'='
        })
    })
}

/// Executable code in a `/proc/PID/maps` text that is not the binary's own: mapped from a
/// deleted file or a memory file, or from below a path the sandbox can write (the executable
/// itself excepted: its content is checked by digest).
fn foreign_code(maps: &str, exe: &Path, writable: &[PathBuf]) -> Option<String> {
    for line in maps.lines() {
        let mut fields = line.splitn(6, ' ');
        let (Some(_), Some(perms), Some(_), Some(_), Some(_)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let name = fields.next().unwrap_or("").trim_start();
        if perms.as_bytes().get(2) != Some(&b'x') || !name.starts_with('/') {
            continue;
        }
        if name.ends_with(" (deleted)") || name.starts_with("/memfd:") {
            return Some(format!("it runs code from {name}"));
        }
        let file = Path::new(name);
        if file == exe {
            continue;
        }
        if writable.iter().any(|root| file.starts_with(root)) {
            return Some(format!(
                "it runs code from {name}, which the sandbox can write"
            ));
        }
    }
    None
}

/// Whether a /proc/PID/stat text shows the process's environment laid out (`env_start`, field
/// 51, not 0). While an `execve` is under way the new executable is already visible but its
/// environment is not: reading `environ` then gives nothing.
fn environment_laid_out(text: &str) -> Option<bool> {
    let rest = &text[text.rfind(')')? + 1..];
    let env_start: u64 = rest.split_whitespace().nth(48)?.parse().ok()?;
    Some(env_start != 0)
}

/// `(start time, parent pid)` of a /proc/PID/stat text.
fn parse_stat(text: &str) -> Option<(u64, u32)> {
    // The command name (field 2) may hold spaces and parentheses: fields resume after the
    // last ')'. Then: state (3), ppid (4), ... starttime (22).
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, ppid))
}

/// One row of /proc/net/tcp or tcp6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpEntry {
    /// Local address of the socket.
    pub local: SocketAddr,
    /// Remote address of the socket.
    pub remote: SocketAddr,
    /// Kernel state number (1 = established, 10 = listen).
    pub state: u8,
    /// Socket inode.
    pub inode: u64,
}

/// Parse one data row of /proc/net/tcp or tcp6; `None` for the header or a
/// malformed row. Addresses are the kernel's raw 32-bit words in host byte
/// order (so little-endian on x86), ports are big-endian hex.
pub fn parse_tcp_line(line: &str) -> Option<TcpEntry> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 10 || !fields[0].ends_with(':') {
        return None;
    }
    Some(TcpEntry {
        local: parse_hex_addr(fields[1])?,
        remote: parse_hex_addr(fields[2])?,
        state: u8::from_str_radix(fields[3], 16).ok()?,
        inode: fields[9].parse().ok()?,
    })
}

fn parse_hex_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    if port.len() != 4 {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(hex_word(addr)?.to_ne_bytes())),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = hex_word(addr.get(i * 8..i * 8 + 8)?)?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn hex_word(text: &str) -> Option<u32> {
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(text, 16).ok()
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// The inode of the socket whose local end is `peer` (the client in the
/// sandbox) and whose remote end is `local` (the proxy).
pub fn find_socket(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u64> {
    let (peer, local) = (canonical(peer), canonical(local));
    table
        .lines()
        .filter_map(parse_tcp_line)
        .find(|e| canonical(e.local) == peer && canonical(e.remote) == local && e.inode != 0)
        .map(|e| e.inode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Connector;
    use pretty_assertions::assert_eq;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0200C80A:A1B2 0100C80A:0C38 01 00000000:00000000 00:00000000 00000000  1000        0 98765 1 0000000000000000 20 4 30 10 -1
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000200C80A:D431 0000000000000000FFFF00000100C80A:0C38 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0
";

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_ipv4_rows() {
        let rows: Vec<TcpEntry> = TCP.lines().filter_map(parse_tcp_line).collect();
        assert_eq!(
            rows,
            vec![
                TcpEntry {
                    local: addr("127.0.0.1:3306"),
                    remote: addr("0.0.0.0:0"),
                    state: 0x0A,
                    inode: 4242,
                },
                TcpEntry {
                    local: addr("10.200.0.2:41394"),
                    remote: addr("10.200.0.1:3128"),
                    state: 1,
                    inode: 98765,
                },
            ]
        );
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_ipv6_rows_and_matches_mapped_addresses() {
        let rows: Vec<TcpEntry> = TCP6.lines().filter_map(parse_tcp_line).collect();
        assert_eq!(
            rows.iter().map(|r| (r.local, r.inode)).collect::<Vec<_>>(),
            vec![
                (addr("[::1]:22"), 555),
                (addr("[::ffff:10.200.0.2]:54321"), 777),
            ]
        );
        let local = addr("10.200.0.1:3128");
        assert_eq!(
            find_socket(TCP6, addr("10.200.0.2:54321"), local),
            Some(777)
        );
        assert_eq!(
            find_socket(TCP, addr("10.200.0.2:41394"), local),
            Some(98765)
        );
        assert_eq!(find_socket(TCP, addr("10.200.0.2:54321"), local), None);
    }

    #[test]
    fn rejects_malformed_rows() {
        for line in [
            "",
            "  sl  local_address rem_address",
            "   0: 0100007G:0CEA 00000000:0000 0A 0:0 0:0 0 0 0 1",
            "   0: 0100007F:CEA 00000000:0000 0A 0:0 0:0 0 0 0 1",
            "   0: 0100007F:0CEA 00000000:0000 0A 0:0 0:0 0 0 0 notanumber",
            "   0: 01007F:0CEA 00000000:0000 0A 0:0 0:0 0 0 0 1",
        ] {
            assert_eq!(parse_tcp_line(line), None, "{line}");
        }
    }

    #[test]
    fn parses_stat_with_odd_command_names() {
        let stat = "10 (a) (b c) S 7 10 10 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 4321 1000 10 18446744073709551615";
        assert_eq!(parse_stat(stat), Some((4321, 7)));
        assert_eq!(parse_stat("10 (x) S"), None);
    }

    #[test]
    fn an_environment_not_laid_out_is_seen_in_stat() {
        let me = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        assert_eq!(environment_laid_out(&me), Some(true));
        let mid_exec = format!("10 (x y) R {}", vec!["0"; 60].join(" "));
        assert_eq!(environment_laid_out(&mid_exec), Some(false));
        assert_eq!(environment_laid_out("10 (x) S 1"), None);
    }

    #[test]
    fn loader_variables_and_foreign_code() {
        assert_eq!(
            loader_variable(b"PATH=/bin\0LD_PRELOAD=/tmp/x.so\0"),
            Some("LD_PRELOAD")
        );
        assert_eq!(
            loader_variable(b"LD_LIBRARY_PATH=/w\0"),
            Some("LD_LIBRARY_PATH")
        );
        assert_eq!(loader_variable(b"LD_AUDIT=a\0"), Some("LD_AUDIT"));
        assert_eq!(
            loader_variable(b"LD_PRELOAD=\0XLD_PRELOAD=x\0LD_PRELOADX=1\0"),
            None
        );
        let exe = Path::new("/work/tool");
        let writable = [PathBuf::from("/work"), PathBuf::from("/tmp")];
        let map = |name: &str, perms: &str| {
            format!("7f0000000000-7f0000001000 {perms} 00000000 08:01 1234                       {name}\n")
        };
        let cases = [
            (map("/usr/lib/libc.so.6", "r-xp"), None),
            (map("/work/tool", "r-xp"), None),
            (map("/work/data.bin", "r--p"), None),
            (map("[vdso]", "r-xp"), None),
            (map("", "rwxp"), None),
            (
                map("/tmp/evil.so", "r-xp"),
                Some("it runs code from /tmp/evil.so, which the sandbox can write".to_string()),
            ),
            (
                map("/memfd:x (deleted)", "r-xp"),
                Some("it runs code from /memfd:x (deleted)".to_string()),
            ),
            (
                map("/usr/lib/gone.so (deleted)", "r-xp"),
                Some("it runs code from /usr/lib/gone.so (deleted)".to_string()),
            ),
        ];
        for (maps, want) in cases {
            assert_eq!(foreign_code(&maps, exe, &writable), want, "{maps}");
        }
    }

    /// A history that names this test process as the connector of one socket.
    struct OneConnect {
        inode: u64,
        connector: Connector,
        exec_seq: u64,
    }

    impl ProcessHistory for OneConnect {
        fn connector(&self, socket_inode: u64) -> Option<Connector> {
            (socket_inode == self.inode).then_some(self.connector)
        }
        fn credits(&self, _parent: ProcKey, _child: ProcKey) -> bool {
            true
        }
        fn exec_seq(&self, _process: ProcKey) -> u64 {
            self.exec_seq
        }
    }

    fn me() -> (ProcKey, (u64, u64)) {
        key_of(std::process::id())
    }

    fn key_of(pid: u32) -> (ProcKey, (u64, u64)) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let (start, _) = parse_stat(&stat).unwrap_or_else(|| panic!("stat"));
        let meta = std::fs::metadata(format!("/proc/{pid}/exe")).unwrap_or_else(|e| panic!("{e}"));
        (ProcKey { pid, start }, (meta.dev(), meta.ino()))
    }

    fn socket_inode(s: &std::net::TcpStream) -> u64 {
        use std::os::fd::AsRawFd;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", s.as_raw_fd()))
            .unwrap_or_else(|e| panic!("{e}"));
        let text = link.to_string_lossy();
        text.trim_start_matches("socket:[")
            .trim_end_matches(']')
            .parse()
            .unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn pair() -> (
        std::net::TcpStream,
        std::net::TcpStream,
        SocketAddr,
        SocketAddr,
    ) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let local = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let client = std::net::TcpStream::connect(local).unwrap_or_else(|e| panic!("{e}"));
        let (server, _) = listener.accept().unwrap_or_else(|e| panic!("{e}"));
        let peer = client.local_addr().unwrap_or_else(|e| panic!("{e}"));
        (client, server, peer, local)
    }

    /// A child running `program` with a clean environment (this test binary runs with
    /// cargo's LD_LIBRARY_PATH, so it is never "itself") and `socket` as its stdin.
    struct Holder(std::process::Child);

    impl Holder {
        fn spawn(program: &str, args: &[&str], socket: &std::net::TcpStream) -> Self {
            Self::spawn_env(program, args, None, socket)
        }
        fn spawn_env(
            program: &str,
            args: &[&str],
            env: Option<(&str, &str)>,
            socket: &std::net::TcpStream,
        ) -> Self {
            let held = socket.try_clone().unwrap_or_else(|e| panic!("{e}"));
            let child = std::process::Command::new(program)
                .args(args)
                .env_clear()
                .envs(env)
                .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(held)))
                .spawn()
                .unwrap_or_else(|e| panic!("{program}: {e}"));
            // Wait until it runs the program (not the forked test binary any more), its exec
            // finished (its environment laid out).
            let want = std::fs::canonicalize(program).unwrap_or_default();
            for _ in 0..200 {
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id()))
                    .unwrap_or_default();
                if std::fs::read_link(format!("/proc/{}/exe", child.id()))
                    .ok()
                    .as_ref()
                    == Some(&want)
                    && environment_laid_out(&stat) == Some(true)
                {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Self(child)
        }
        fn id(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn resolver(history: OneConnect, members: Vec<u32>) -> ProcfsResolver {
        let me = std::process::id();
        ProcfsResolver::new(
            ProcfsConfig::new(me),
            move || Ok(members.clone()),
            Arc::new(history),
            Arc::new(HashCache::new()),
        )
    }

    /// A real connection whose connect the history names: a child holding the socket (this
    /// process lets go of it). The resolver names that child's executable, and credits it.
    #[tokio::test]
    async fn resolves_a_recorded_connection() {
        let (client, _server, peer, local) = pair();
        let inode = socket_inode(&client);
        let child = Holder::spawn("/usr/bin/sleep", &["30"], &client);
        drop(client);
        let (key, exe_file) = key_of(child.id());
        let history = OneConnect {
            inode,
            connector: Connector {
                process: key,
                exe: exe_file,
                seq: 3,
            },
            exec_seq: 0,
        };
        let r = resolver(history, vec![key.pid]);
        let identified = r
            .identify_here(peer, local)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let exe = std::fs::canonicalize("/usr/bin/sleep").unwrap_or_default();
        let want = Caller {
            pid: key.pid,
            exe,
            ancestors: vec![],
        };
        assert_eq!(identified.caller, want);
        // Identifying again gives the same answer; verifying credits it.
        assert_eq!(
            r.identify_here(peer, local).await.ok(),
            Some(identified.clone())
        );
        assert_eq!(
            r.verify_here(&identified).await.map_err(|e| e.to_string()),
            Ok(want)
        );
        // A connection that does not exist is not found.
        let bogus: SocketAddr = "127.0.0.1:1".parse().unwrap_or_else(|_| unreachable!());
        assert!(matches!(
            r.identify_here(bogus, local).await,
            Err(IdentityError::SocketNotFound { .. })
        ));
    }

    /// The connecting process started another program after its connect: denied.
    #[tokio::test]
    async fn an_exec_after_the_connect_is_a_change() {
        let (client, _server, peer, local) = pair();
        let (key, exe_file) = me();
        let history = OneConnect {
            inode: socket_inode(&client),
            connector: Connector {
                process: key,
                exe: exe_file,
                seq: 3,
            },
            exec_seq: 4,
        };
        let r = resolver(history, vec![key.pid]);
        let got = r
            .identify_here(peer, local)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            got,
            Err(format!(
                "the calling process changed: pid {} started {} after it connected",
                key.pid,
                exe.display()
            ))
        );
    }

    /// Another program holding the socket is refused; one redirected by LD_PRELOAD too.
    #[tokio::test]
    async fn a_socket_shared_with_another_program_is_refused() {
        let (client, _server, peer, local) = pair();
        let inode = socket_inode(&client);
        let connector = Holder::spawn("/usr/bin/sleep", &["30"], &client);
        let other = Holder::spawn("/usr/bin/tail", &["-f", "/dev/null"], &client);
        drop(client);
        let (key, exe_file) = key_of(connector.id());
        let history = OneConnect {
            inode,
            connector: Connector {
                process: key,
                exe: exe_file,
                seq: 3,
            },
            exec_seq: 0,
        };
        let r = resolver(history, vec![key.pid, other.id()]);
        let identified = r
            .identify_here(peer, local)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let got = r
            .verify_here(&identified)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let tail = std::fs::canonicalize("/usr/bin/tail").unwrap_or_default();
        assert_eq!(
            got,
            Err(format!(
                "the connection's socket is also held by {} (pid {}), another program",
                tail.display(),
                other.id()
            ))
        );
    }

    /// The same program holding the socket passes only while it runs as itself: a copy
    /// started with `LD_PRELOAD` that holds the connector's socket is refused.
    #[tokio::test]
    async fn a_redirected_copy_of_the_same_program_holding_the_socket_is_refused() {
        let mut got = Vec::new();
        for preload in [None, Some("/nonexistent/preload.so")] {
            let (client, _server, peer, local) = pair();
            let inode = socket_inode(&client);
            let connector = Holder::spawn("/usr/bin/sleep", &["30"], &client);
            let other = Holder::spawn_env(
                "/usr/bin/sleep",
                &["31"],
                preload.map(|p| ("LD_PRELOAD", p)),
                &client,
            );
            drop(client);
            let (key, exe_file) = key_of(connector.id());
            let history = OneConnect {
                inode,
                connector: Connector {
                    process: key,
                    exe: exe_file,
                    seq: 3,
                },
                exec_seq: 0,
            };
            let r = resolver(history, vec![key.pid, other.id()]);
            let identified = r
                .identify_here(peer, local)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            got.push(
                r.verify_here(&identified)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            );
            let sleep = std::fs::canonicalize("/usr/bin/sleep").unwrap_or_default();
            if preload.is_some() {
                assert_eq!(
                    got.last().cloned(),
                    Some(Err(format!(
                        "{} does not run as itself: pid {} holds the connection's socket too, and its environment sets LD_PRELOAD",
                        sleep.display(),
                        other.id()
                    )))
                );
            }
        }
        assert_eq!(got[0], Ok(()));
    }

    #[tokio::test]
    async fn changed_binary_content_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let proc_root = dir.path();
        let pid_dir = proc_root.join("77");
        std::fs::create_dir_all(&pid_dir).unwrap_or_else(|e| panic!("{e}"));
        let bin = dir.path().join("tool");
        std::fs::write(&bin, b"first").unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink(&bin, pid_dir.join("exe")).unwrap_or_else(|e| panic!("{e}"));
        let (key, exe_file) = me();
        let history = OneConnect {
            inode: 1,
            connector: Connector {
                process: key,
                exe: exe_file,
                seq: 0,
            },
            exec_seq: 0,
        };
        let mut config = ProcfsConfig::new(1);
        config.proc_root = proc_root.to_path_buf();
        config.max_hash_bytes = 100;
        let r = ProcfsResolver::new(
            config,
            || Ok(vec![77]),
            Arc::new(history),
            Arc::new(HashCache::new()),
        );
        let exe = PathBuf::from("/usr/bin/tool");
        assert!(r.inner.check_content(77, &exe).await.is_ok());
        assert!(r.inner.check_content(77, &exe).await.is_ok());
        std::fs::write(&bin, b"second, longer").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            r.inner
                .check_content(77, &exe)
                .await
                .map_err(|e| e.to_string()),
            Err("binary content changed since first seen: /usr/bin/tool".to_string())
        );
        // Above the size limit: refused without reading (a sparse file of 1 TiB).
        let big = std::fs::File::options()
            .write(true)
            .open(&bin)
            .unwrap_or_else(|e| panic!("{e}"));
        big.set_len(1 << 40).unwrap_or_else(|e| panic!("{e}"));
        let started = std::time::Instant::now();
        assert_eq!(
            r.inner.check_content(77, &exe).await.map_err(|e| e.to_string()),
            Err("/usr/bin/tool is 1099511627776 bytes, above the 100-byte limit for checking an executable's content (--identity-max-binary-mib)".to_string())
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[tokio::test]
    async fn one_hash_per_file_version_even_when_asked_at_once() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 * HASH_SLICE]).unwrap_or_else(|e| panic!("{e}"));
        let cache = Arc::new(HashCache::new());
        let open = || std::fs::File::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let key = FileKey::of(&open().metadata().unwrap_or_else(|e| panic!("{e}")));
        let (a, b) = tokio::join!(
            cache.digest(key, open(), &path),
            cache.digest(key, open(), &path)
        );
        let (a, b) = (
            a.unwrap_or_else(|e| panic!("{e}")),
            b.unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(a, b);
        assert_eq!(cache.slots.lock().map(|s| s.len()).unwrap_or(0), 1);
    }
}

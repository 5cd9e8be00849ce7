//! Caller identity for the process backend, from the host's /proc.
//!
//! The sandbox's socket table (`/proc/<init>/net/tcp` and `tcp6`, read
//! through any process in the sandbox's network namespace) maps the
//! connection to a socket inode; the `fd` directories of the sandbox's
//! processes map the inode to a pid; `/proc/<pid>/exe` names the executable.
//! argv\[0\] is never read.
//!
//! Each resolver also remembers, per executable path, a SHA-256 of the
//! content first seen there (hashed once per `(dev, ino, size, mtime)`); a
//! later caller whose executable at that path has other content is refused
//! with [`IdentityError::BinaryChanged`].

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::identity::{Caller, IdentityError, IdentityResolver};

/// Deepest ancestor chain followed.
const MAX_ANCESTORS: usize = 64;

type PidSource = dyn Fn() -> std::io::Result<Vec<u32>> + Send + Sync;

/// [`IdentityResolver`] for a process sandbox.
pub struct ProcfsResolver {
    proc_root: PathBuf,
    init_pid: u32,
    pids: Box<PidSource>,
    seen: Mutex<HashMap<PathBuf, Seen>>,
}

impl std::fmt::Debug for ProcfsResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcfsResolver")
            .field("proc_root", &self.proc_root)
            .field("init_pid", &self.init_pid)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

#[derive(Debug, Clone)]
struct Seen {
    key: FileKey,
    digest: [u8; 32],
}

impl ProcfsResolver {
    /// `init_pid`: host pid of a process in the sandbox's network namespace
    /// (its init; never counted as an ancestor). `pids`: host pids of the
    /// sandbox's processes (for example from its cgroup.procs), asked on
    /// every resolution.
    pub fn new(
        init_pid: u32,
        pids: impl Fn() -> std::io::Result<Vec<u32>> + Send + Sync + 'static,
    ) -> Self {
        Self::with_proc_root("/proc", init_pid, pids)
    }

    /// Like [`new`](Self::new) with another procfs mount.
    pub fn with_proc_root(
        proc_root: impl Into<PathBuf>,
        init_pid: u32,
        pids: impl Fn() -> std::io::Result<Vec<u32>> + Send + Sync + 'static,
    ) -> Self {
        Self {
            proc_root: proc_root.into(),
            init_pid,
            pids: Box::new(pids),
            seen: Mutex::new(HashMap::new()),
        }
    }

    fn proc_path(&self, pid: u32, rest: &str) -> PathBuf {
        self.proc_root.join(pid.to_string()).join(rest)
    }

    fn find_inode(&self, peer: SocketAddr, local: SocketAddr) -> Result<u64, IdentityError> {
        for table in ["net/tcp", "net/tcp6"] {
            let path = self.proc_path(self.init_pid, table);
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(IdentityError::Proc { path, source }),
            };
            if let Some(inode) = find_socket(&text, peer, local) {
                return Ok(inode);
            }
        }
        Err(IdentityError::SocketNotFound { peer })
    }

    fn find_pid(&self, inode: u64, candidates: &[u32]) -> Option<u32> {
        let want = format!("socket:[{inode}]");
        candidates.iter().copied().find(|&pid| {
            let Ok(entries) = std::fs::read_dir(self.proc_path(pid, "fd")) else {
                return false;
            };
            entries.flatten().any(|entry| {
                std::fs::read_link(entry.path())
                    .map(|target| target.as_os_str() == want.as_str())
                    .unwrap_or(false)
            })
        })
    }

    fn exe(&self, pid: u32) -> Result<PathBuf, IdentityError> {
        let path = self.proc_path(pid, "exe");
        std::fs::read_link(&path).map_err(|source| IdentityError::Proc { path, source })
    }

    /// Whether `pid` is in the sandbox's pid namespace (its init's). A helper of the
    /// supervisor that started a process inside (an exec session's helper enters the
    /// namespaces only for its children) is outside, and so is never an ancestor.
    fn in_sandbox_pidns(&self, pid: u32) -> bool {
        let ns = |p: u32| std::fs::read_link(self.proc_path(p, "ns/pid")).ok();
        match (ns(self.init_pid), ns(pid)) {
            (Some(sandbox), Some(theirs)) => sandbox == theirs,
            _ => false,
        }
    }

    fn parent(&self, pid: u32) -> Option<u32> {
        let status = std::fs::read_to_string(self.proc_path(pid, "status")).ok()?;
        parse_ppid(&status)
    }

    /// Check (and on first sight record) the content of `pid`'s executable.
    fn check_content(&self, pid: u32, exe: &Path) -> Result<(), IdentityError> {
        let path = self.proc_path(pid, "exe");
        let meta = std::fs::metadata(&path).map_err(|source| IdentityError::Proc {
            path: path.clone(),
            source,
        })?;
        let key = FileKey {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
        };
        let known = self
            .seen
            .lock()
            .map_err(|_| IdentityError::Other("binary table poisoned".into()))?
            .get(exe)
            .cloned();
        if let Some(seen) = &known {
            if seen.key == key {
                return Ok(());
            }
        }
        let digest = hash_file(&path)?;
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| IdentityError::Other("binary table poisoned".into()))?;
        match seen.get_mut(exe) {
            Some(entry) if entry.digest != digest => Err(IdentityError::BinaryChanged {
                exe: exe.to_path_buf(),
            }),
            Some(entry) => {
                entry.key = key;
                Ok(())
            }
            None => {
                seen.insert(exe.to_path_buf(), Seen { key, digest });
                Ok(())
            }
        }
    }
}

fn hash_file(path: &Path) -> Result<[u8; 32], IdentityError> {
    let io = |source| IdentityError::Proc {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

impl IdentityResolver for ProcfsResolver {
    fn resolve(&self, peer: SocketAddr, local: SocketAddr) -> Result<Caller, IdentityError> {
        let inode = self.find_inode(peer, local)?;
        let candidates = (self.pids)().map_err(|source| IdentityError::Proc {
            path: PathBuf::from("cgroup.procs"),
            source,
        })?;
        let pid = self
            .find_pid(inode, &candidates)
            .ok_or(IdentityError::ProcessNotFound { inode })?;
        let exe = self.exe(pid)?;
        self.check_content(pid, &exe)?;
        let members: HashSet<u32> = candidates.iter().copied().collect();
        let mut ancestors = Vec::new();
        let mut current = pid;
        while ancestors.len() < MAX_ANCESTORS {
            let Some(parent) = self.parent(current) else {
                break;
            };
            // The walk stops at the sandbox's boundary: its init, a process that is no member
            // of the sandbox, or one outside its pid namespace.
            if parent == 0
                || parent == self.init_pid
                || !members.contains(&parent)
                || !self.in_sandbox_pidns(parent)
            {
                break;
            }
            let parent_exe = self.exe(parent)?;
            self.check_content(parent, &parent_exe)?;
            ancestors.push(parent_exe);
            current = parent;
        }
        Ok(Caller {
            pid,
            exe,
            ancestors,
        })
    }
}

/// `PPid:` of a /proc/PID/status text.
fn parse_ppid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
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
    use pretty_assertions::assert_eq;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0200C80A:A1B2 0100C80A:0C38 01 00000000:00000000 00:00000000 00000000  1000        0 98765 1 0000000000000000 20 4 30 10 -1
";

    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000200C80A:D431 0000000000000000FFFF00000100C80A:0C38 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0
";

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_ipv4_rows() {
        let rows: Vec<TcpEntry> = TCP.lines().filter_map(parse_tcp_line).collect();
        assert_eq!(
            rows,
            vec![
                TcpEntry {
                    local: "127.0.0.1:3306".parse().unwrap_or_else(|_| unreachable!()),
                    remote: "0.0.0.0:0".parse().unwrap_or_else(|_| unreachable!()),
                    state: 0x0A,
                    inode: 4242,
                },
                TcpEntry {
                    local: "10.200.0.2:41394"
                        .parse()
                        .unwrap_or_else(|_| unreachable!()),
                    remote: "10.200.0.1:3128".parse().unwrap_or_else(|_| unreachable!()),
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
                ("[::1]:22".parse().unwrap_or_else(|_| unreachable!()), 555),
                (
                    "[::ffff:10.200.0.2]:54321"
                        .parse()
                        .unwrap_or_else(|_| unreachable!()),
                    777
                ),
            ]
        );
        let peer: SocketAddr = "10.200.0.2:54321"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        let local: SocketAddr = "10.200.0.1:3128".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(find_socket(TCP6, peer, local), Some(777));
        let peer4: SocketAddr = "10.200.0.2:41394"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(find_socket(TCP, peer4, local), Some(98765));
        assert_eq!(find_socket(TCP, peer, local), None);
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
    fn parses_ppid() {
        assert_eq!(
            parse_ppid("Name:\tcurl\nState:\tS\nPid:\t10\nPPid:\t7\n"),
            Some(7)
        );
        assert_eq!(parse_ppid("Name:\tcurl\n"), None);
    }

    /// A real connection inside this test process: the resolver finds this
    /// process's own executable through /proc (no privileges needed).
    #[test]
    fn resolves_own_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0");
        let Ok(listener) = listener else {
            assert!(listener.is_ok(), "bind failed");
            return;
        };
        let local = listener.local_addr().unwrap_or_else(|_| unreachable!());
        let client = std::net::TcpStream::connect(local).unwrap_or_else(|e| panic!("{e}"));
        let _server = listener.accept().unwrap_or_else(|e| panic!("{e}"));
        let peer = client.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let me = std::process::id();
        let resolver = ProcfsResolver::new(me, move || Ok(vec![me]));
        let caller = resolver
            .resolve(peer, local)
            .unwrap_or_else(|e| panic!("{e}"));
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            caller,
            Caller {
                pid: me,
                exe,
                ancestors: vec![]
            }
        );
        // Resolving again hits the content cache and still succeeds.
        assert!(resolver.resolve(peer, local).is_ok());
        // A connection that does not exist is not found.
        let bogus: SocketAddr = "127.0.0.1:1".parse().unwrap_or_else(|_| unreachable!());
        assert!(matches!(
            resolver.resolve(bogus, local),
            Err(IdentityError::SocketNotFound { .. })
        ));
    }

    #[test]
    fn changed_binary_content_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let proc_root = dir.path();
        let pid_dir = proc_root.join("77");
        std::fs::create_dir_all(&pid_dir).unwrap_or_else(|e| panic!("{e}"));
        let bin = dir.path().join("tool");
        std::fs::write(&bin, b"first").unwrap_or_else(|e| panic!("{e}"));
        std::os::unix::fs::symlink(&bin, pid_dir.join("exe")).unwrap_or_else(|e| panic!("{e}"));
        let resolver = ProcfsResolver::with_proc_root(proc_root, 1, || Ok(vec![77]));
        let exe = PathBuf::from("/usr/bin/tool");
        assert!(resolver.check_content(77, &exe).is_ok());
        assert!(resolver.check_content(77, &exe).is_ok());
        std::fs::write(&bin, b"second, longer").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            resolver.check_content(77, &exe).map_err(|e| e.to_string()),
            Err("binary content changed since first seen: /usr/bin/tool".to_string())
        );
    }
}

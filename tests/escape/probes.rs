//! The probes. Each runs a hostile script inside a sandbox (the same script and policy on every
//! backend) and then checks, on the host, what the script would have changed had it escaped.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{self, Scratch};
use crate::fixtures::*;
use crate::{score, Probe, Verdict};

/// Shared by every probe script: the marker that it ran, `loot` (hand data to the host through
/// the workdir, which the host then searches) and `attempt` (try one thing, go on whatever
/// happens).
const PRELUDE: &str = r#"
import os, sys, socket, ctypes, errno, struct, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
open("started", "w").write("1")
def loot(data):
    if isinstance(data, str):
        data = data.encode()
    with open("loot", "ab") as f:
        f.write(data + b"\n")
def attempt(name, fn):
    try:
        r = fn()
        print(name, "ok", flush=True)
        return r
    except BaseException as e:
        print(name, "refused:", repr(e), flush=True)
def sc(n, *args):
    r = libc.syscall(ctypes.c_long(n), *[a if isinstance(a, (bytes, ctypes.Array)) else ctypes.c_long(a) for a in args])
    return r if r >= 0 else -ctypes.get_errno()
def read_all(path):
    with open(path, "rb") as f:
        return f.read()
"#;

fn script(body: &str) -> String {
    format!("{PRELUDE}\n{body}")
}

/// A scratch area with a read-only directory listed in the policy (returned second).
fn with_read_only_dir(extra: &str) -> (Scratch, std::path::PathBuf) {
    let s = Scratch::new(extra);
    let ro = s.work.parent().expect("scratch root").join("ro");
    std::fs::create_dir(&ro).expect("mkdir ro");
    common::chmod(&ro, 0o777);
    s.edit_policy(&[("read_only: [", &format!("read_only: [{}, ", ro.display()))]);
    (s, ro)
}

fn started(s: &Scratch) -> std::path::PathBuf {
    s.work.join("started")
}

// ---------------------------------------------------------------------------------------------
// Files

const WRITE_EVERY_WAY: &str = r#"
for p in sys.argv[1:]:
    d = os.path.dirname(p)
    attempt(p + " write", lambda: open(p, "w").write("escaped"))
    attempt(p + " append", lambda: open(p, "a").write("escaped"))
    attempt(p + " truncate", lambda: os.truncate(p, 0))
    attempt(p + " chmod", lambda: os.chmod(p, 0o4777))
    attempt(p + " chown", lambda: os.chown(p, 65534, 65534))
    attempt(p + " utime", lambda: os.utime(p, (0, 0)))
    attempt(p + " setxattr", lambda: os.setxattr(p, "user.escaped", b"1"))
    attempt(p + " rename", lambda: os.rename(p, p + ".moved"))
    attempt(p + " link", lambda: os.link(p, p + ".link"))
    attempt(p + " unlink", lambda: os.unlink(p))
    attempt(d + " create", lambda: open(os.path.join(d, "new-file"), "w").write("escaped"))
    attempt(d + " mkdir", lambda: os.mkdir(os.path.join(d, "new-dir")))
    attempt(d + " symlink", lambda: os.symlink("/etc/passwd", os.path.join(d, "new-link")))
    attempt(d + " mkfifo", lambda: os.mkfifo(os.path.join(d, "new-fifo")))
"#;

/// Every write to a mode-0666 canary in `dir` (of scratch area `s`) leaves it and its
/// directory as they were.
fn writes_refused(s: &Scratch, dir: &Path, backend: &'static str) -> Verdict {
    let canary = Canary::new(&dir.join("canary"), &token("canary"), 0o666);
    let listing = Listing::of(dir);
    let path = canary.path.display().to_string();
    let out = python(s, backend, &script(WRITE_EVERY_WAY), &[&path]);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(s));
    canary.check(&mut f);
    listing.check(&mut f);
    f.verdict()
}

fn files_write_outside_policy(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    writes_refused(&s, &s.outside.clone(), backend)
}

fn files_write_read_only(backend: &'static str) -> Verdict {
    let (s, ro) = with_read_only_dir("");
    writes_refused(&s, &ro, backend)
}

const READ_EVERY_WAY: &str = r#"
target = sys.argv[1]
name = os.path.basename(target)
parent = os.path.dirname(target)
ways = [
    target,
    "/proc/self/root" + target,
    "/proc/1/root" + target,
    "/proc/%d/root%s" % (os.getppid(), target),
    "/proc/self/cwd/../" + os.path.basename(parent) + "/" + name,
    os.getcwd() + "/../" + os.path.basename(parent) + "/" + name,
    "//" + target.lstrip("/"),
    target.replace("/", "/./"),
]
for w in ways:
    attempt("read " + w, lambda: loot(read_all(w)))
# Through a link made in the workdir, absolute and relative.
attempt("symlink", lambda: os.symlink(target, "abs-link"))
attempt("read abs-link", lambda: loot(read_all("abs-link")))
attempt("rel symlink", lambda: os.symlink("../" + os.path.basename(parent) + "/" + name, "rel-link"))
attempt("read rel-link", lambda: loot(read_all("rel-link")))
attempt("hard link", lambda: os.link(target, "hard-link"))
attempt("read hard-link", lambda: loot(read_all("hard-link")))
# Walk every directory the sandbox can list, reading anything that names the file.
for root, dirs, files in os.walk("/", topdown=True):
    dirs[:] = [d for d in dirs if not (root == "/" and d in ("proc", "sys"))]
    for fn in files:
        if fn == name:
            attempt("walk " + os.path.join(root, fn), lambda: loot(read_all(os.path.join(root, fn))))
"#;

fn files_read_unlisted(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let secret = token("secret");
    let canary = Canary::new(&s.outside.join("secret"), &secret, 0o644);
    let path = canary.path.display().to_string();
    let out = python(&s, backend, &script(READ_EVERY_WAY), &[&path]);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    secret_kept(&mut f, &secret, &s, &out);
    canary.check(&mut f);
    f.verdict()
}

fn files_read_host_secrets(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    // /etc is listed read-only: /etc/shadow is there, and stays root's.
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let shadow_root = shadow.lines().next().unwrap_or_default().to_owned();
    // A file of root's home (never listed), as a key would be.
    let ssh = Path::new("/root/.ssh");
    let made_ssh = !ssh.exists();
    std::fs::create_dir_all(ssh).expect("mkdir /root/.ssh");
    let secret = token("root-key");
    let key = ssh.join(format!("{}-key", secret));
    std::fs::write(&key, &secret).expect("write the key canary");
    common::chmod(&key, 0o644);
    let body = r#"
for p in ["/etc/shadow", "/etc/gshadow", "/proc/1/root/etc/shadow", "/proc/self/root/etc/shadow"]:
    attempt("read " + p, lambda: loot(read_all(p)))
for d in ["/root", "/root/.ssh", "/proc/1/root/root/.ssh"]:
    try:
        for n in os.listdir(d):
            attempt("read " + d + "/" + n, lambda: loot(read_all(d + "/" + n)))
            loot(n)
    except OSError as e:
        print(d, "refused:", e)
attempt("read the key", lambda: loot(read_all(sys.argv[1])))
"#;
    let out = python(
        &s,
        backend,
        &script(body),
        &[key.to_str().expect("utf-8 path")],
    );
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    secret_kept(&mut f, &secret, &s, &out);
    if shadow_root.len() > 8 {
        secret_kept(&mut f, &shadow_root, &s, &out);
    }
    let _ = std::fs::remove_file(&key);
    if made_ssh {
        let _ = std::fs::remove_dir(ssh);
    }
    f.verdict()
}

fn files_proc_fd_reopen(backend: &'static str) -> Verdict {
    let (s, ro) = with_read_only_dir("");
    let canary = Canary::new(&ro.join("canary"), &token("canary"), 0o666);
    let body = r#"
p = sys.argv[1]
fd = os.open(p, os.O_RDONLY)
attempt("reopen fd for writing", lambda: open("/proc/self/fd/%d" % fd, "w").write("escaped"))
attempt("reopen fd O_RDWR", lambda: os.write(os.open("/proc/self/fd/%d" % fd, os.O_RDWR), b"escaped"))
attempt("reopen via thread-self", lambda: os.write(os.open("/proc/thread-self/fd/%d" % fd, os.O_WRONLY), b"escaped"))
pfd = attempt("O_PATH", lambda: os.open(p, os.O_PATH))
if pfd is not None:
    attempt("reopen O_PATH fd", lambda: os.write(os.open("/proc/self/fd/%d" % pfd, os.O_WRONLY), b"escaped"))
dfd = os.open(os.path.dirname(p), os.O_RDONLY | os.O_DIRECTORY)
attempt("openat from dir fd", lambda: os.write(os.open(os.path.basename(p), os.O_WRONLY, dir_fd=dfd), b"escaped"))
attempt("mmap shared", lambda: __import__("mmap").mmap(fd, 0, flags=1, prot=3))
"#;
    let out = python(
        &s,
        backend,
        &script(body),
        &[canary.path.to_str().expect("utf-8 path")],
    );
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    canary.check(&mut f);
    f.verdict()
}

/// Files under `dir` that are device nodes, setuid/setgid, or owned by host root.
fn dangerous_files(dir: &Path, out: &mut Vec<String>) {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(m) = e.path().symlink_metadata() else {
            continue;
        };
        let t = m.file_type();
        if t.is_char_device() || t.is_block_device() {
            out.push(format!("device node {}", e.path().display()));
        }
        if m.mode() & 0o6000 != 0 && !t.is_dir() {
            out.push(format!(
                "set-id file {} (uid {})",
                e.path().display(),
                m.uid()
            ));
        }
        if m.uid() == 0 {
            out.push(format!("host root's file {}", e.path().display()));
        }
        if t.is_dir() {
            dangerous_files(&e.path(), out);
        }
    }
}

const MAKE_DANGEROUS_FILES: &str = r#"
import shutil, stat
for name, mode, dev in [("mem", stat.S_IFCHR, os.makedev(1, 1)), ("kmsg", stat.S_IFCHR, os.makedev(1, 11)), ("disk", stat.S_IFBLK, os.makedev(8, 0))]:
    attempt("mknod " + name, lambda: os.mknod(name, mode | 0o666, dev))
    attempt("mknod /tmp/" + name, lambda: os.mknod("/tmp/" + name, mode | 0o666, dev))
attempt("copy sh", lambda: shutil.copy("/bin/sh", "sh"))
attempt("setuid sh", lambda: os.chmod("sh", 0o6755))
attempt("chown sh to 0", lambda: os.chown("sh", 0, 0))
attempt("setuid again", lambda: os.chmod("sh", 0o6755))
open("plain", "w").write("x")
attempt("chown plain to 0", lambda: os.chown("plain", 0, 0))
attempt("setgid dir", lambda: (os.mkdir("d"), os.chmod("d", 0o2777)))
"#;

fn files_device_and_setid_files(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let out = python(&s, backend, &script(MAKE_DANGEROUS_FILES), &[]);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    let mut found = Vec::new();
    dangerous_files(&s.work, &mut found);
    for what in found {
        // The setgid directory bit is ordinary (and harmless) for the workload's own directory.
        if !what.contains("/work/d ") {
            f.add(what);
        }
    }
    f.verdict()
}

fn files_root_in_a_user_namespace(backend: &'static str) -> Verdict {
    let (s, ro) = with_read_only_dir("");
    s.edit_policy(&[
        ("run_as_user: nobody", "run_as_user: root"),
        ("run_as_group: nogroup", "run_as_group: root"),
    ]);
    let canary = Canary::new(&ro.join("canary"), &token("canary"), 0o644);
    let secret = token("root-only");
    let private = Canary::new(&ro.join("private"), &secret, 0o600);
    let body = format!(
        "{MAKE_DANGEROUS_FILES}\n{WRITE_EVERY_WAY}\nattempt('read private', lambda: loot(read_all(sys.argv[2])))\n"
    );
    let out = python(
        &s,
        backend,
        &script(&body),
        &[
            canary.path.to_str().expect("utf-8"),
            private.path.to_str().expect("utf-8"),
        ],
    );
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    canary.check(&mut f);
    private.check(&mut f);
    let mut found = Vec::new();
    dangerous_files(&s.work, &mut found);
    for what in found {
        if !what.contains("/work/d ") {
            f.add(what);
        }
    }
    // Guest or namespace root reading a 0600 file of host root's in a read-only path is the
    // one thing root of a user namespace may not do either.
    secret_kept(&mut f, &secret, &s, &out);
    f.verdict()
}

fn files_open_by_handle(backend: &'static str) -> Verdict {
    let (s, ro) = with_read_only_dir("");
    let canary = Canary::new(&ro.join("canary"), &token("canary"), 0o666);
    let secret = token("secret");
    let hidden = Canary::new(&s.outside.join("secret"), &secret, 0o644);
    let ino = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&hidden.path).expect("stat").ino()
    };
    let body = r#"
SYS_name_to_handle_at, SYS_open_by_handle_at = 303, 304
buf = ctypes.create_string_buffer(8 + 128)
struct.pack_into("I", buf, 0, 128)
mnt = ctypes.c_int(0)
r = sc(SYS_name_to_handle_at, -100, sys.argv[1].encode() + b"\0", buf, ctypes.addressof(mnt), 0)
print("name_to_handle_at", r)
if r == 0:
    fd = sc(SYS_open_by_handle_at, os.open("/", os.O_RDONLY), buf, os.O_RDWR)
    print("open_by_handle_at", fd)
    if fd >= 0:
        attempt("write through handle", lambda: os.write(fd, b"escaped"))
# A forged handle for the hidden file's inode (ext4's type 1: inode, generation).
ino = int(sys.argv[2])
for gen in range(0, 64):
    h = ctypes.create_string_buffer(8 + 8)
    struct.pack_into("IiII", h, 0, 8, 1, ino, gen)
    fd = sc(SYS_open_by_handle_at, os.open(".", os.O_RDONLY), h, os.O_RDONLY)
    if fd >= 0:
        attempt("read forged handle", lambda: loot(os.read(fd, 4096)))
"#;
    let out = python(
        &s,
        backend,
        &script(body),
        &[canary.path.to_str().expect("utf-8"), &ino.to_string()],
    );
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    canary.check(&mut f);
    secret_kept(&mut f, &secret, &s, &out);
    f.verdict()
}

fn sysrq_lines() -> usize {
    std::process::Command::new("dmesg")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains("sysrq"))
                .count()
        })
        .unwrap_or(0)
}

const HOST_KNOBS: [&str; 5] = [
    "/proc/sys/kernel/core_pattern",
    "/proc/sys/kernel/hostname",
    "/proc/sys/kernel/printk_ratelimit",
    "/proc/sys/vm/overcommit_ratio",
    "/proc/sys/kernel/modprobe",
];

fn files_proc_sys_and_sysrq(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let before: Vec<String> = HOST_KNOBS.iter().map(|k| sysctl(k)).collect();
    let sysrq = sysrq_lines();
    let body = r#"
for k, v in [("/proc/sys/kernel/core_pattern", "|/tmp/escaped %p"), ("/proc/sys/kernel/hostname", "escaped"),
             ("/proc/sys/kernel/printk_ratelimit", "77"), ("/proc/sys/vm/overcommit_ratio", "77"),
             ("/proc/sys/kernel/modprobe", "/tmp/escaped")]:
    attempt("write " + k, lambda: open(k, "w").write(v))
attempt("sysrq-trigger", lambda: open("/proc/sysrq-trigger", "w").write("h"))
attempt("sysrq knob", lambda: open("/proc/sys/kernel/sysrq", "w").write("1"))
"#;
    let out = python(&s, backend, &script(body), &[]);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    for (knob, was) in HOST_KNOBS.iter().zip(before) {
        let now = sysctl(knob);
        f.expect(now == was, || format!("host {knob}: {was:?} -> {now:?}"));
    }
    let now = sysrq_lines();
    f.expect(now == sysrq, || {
        format!("the host kernel logged a SysRq ({sysrq} -> {now} lines)")
    });
    f.verdict()
}

fn files_host_sockets(backend: &'static str) -> Verdict {
    let (s, ro) = with_read_only_dir("");
    let tag = token("sock");
    let sockets = [
        HostUnix::listen(&s.outside.join("host.sock")),
        HostUnix::listen(&s.work.join("host.sock")),
        HostUnix::listen(&ro.join("host.sock")),
        HostUnix::listen(Path::new(&format!("/run/{tag}.sock"))),
        HostUnix::listen(Path::new(&format!("/tmp/{tag}.sock"))),
    ];
    let abstract_name = format!("{tag}-abstract");
    let abstract_got = abstract_listener(&abstract_name);
    let body = r#"
for p in sys.argv[2:]:
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_UNIX, kind)
        attempt("connect %s %s" % (p, kind), lambda: (s.connect(p), s.send(b"escaped")))
s = socket.socket(socket.AF_UNIX)
attempt("abstract", lambda: (s.connect("\0" + sys.argv[1]), s.send(b"escaped")))
# Every socket file the sandbox can find.
for root, dirs, files in os.walk("/", topdown=True):
    dirs[:] = [d for d in dirs if not (root == "/" and d in ("proc", "sys"))]
    for fn in files:
        p = os.path.join(root, fn)
        try:
            if __import__("stat").S_ISSOCK(os.lstat(p).st_mode):
                c = socket.socket(socket.AF_UNIX)
                attempt("found " + p, lambda: (c.connect(p), c.send(b"escaped")))
        except OSError:
            pass
"#;
    let mut args = vec![abstract_name.clone()];
    args.extend(sockets.iter().map(|h| h.path.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = python(&s, backend, &script(body), &args);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    for h in &sockets {
        h.got.check_nothing(&mut f, &h.path.display().to_string());
    }
    abstract_got.check_nothing(&mut f, "the host's abstract socket");
    f.verdict()
}

fn files_tmp_is_the_sandboxs_own(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    // Listed: the sandbox gets a /tmp of its own it may write.
    s.edit_policy(&[("read_write: [/dev/null]", "read_write: [/dev/null, /tmp]")]);
    let tag = token("tmp");
    let body = r#"
for d in ["/tmp", "/var/tmp", "/dev/shm", "/run", "/run/user"]:
    attempt("write " + d, lambda: open(os.path.join(d, sys.argv[1]), "w").write("escaped"))
"#;
    let out = python(&s, backend, &script(body), &[&tag]);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    for d in ["/tmp", "/var/tmp", "/dev/shm", "/run", "/run/user"] {
        let p = Path::new(d).join(&tag);
        f.expect(!p.exists(), || {
            format!("{} appeared on the host", p.display())
        });
        let _ = std::fs::remove_file(&p);
    }
    f.verdict()
}

// ---------------------------------------------------------------------------------------------
// Kernel surface

fn kernel_mount_and_namespaces(backend: &'static str) -> Verdict {
    let (s, ro) = with_read_only_dir("");
    let canary = Canary::new(&ro.join("canary"), &token("canary"), 0o666);
    let listing = Listing::of(&ro);
    let secret = token("secret");
    let hidden = Canary::new(&s.outside.join("secret"), &secret, 0o644);
    let body = r#"
ro, hidden = sys.argv[1], sys.argv[2]
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP = 0x20000, 0x10000000, 0x20000000, 0x40000000, 0x02000000
def mount(src, tgt, fs, flags=0):
    r = libc.mount(src.encode(), tgt.encode(), fs.encode() if fs else None, ctypes.c_ulong(flags), None)
    return r if r == 0 else -ctypes.get_errno()
def try_everything(tag):
    os.makedirs("m-" + tag, exist_ok=True)
    print(tag, "tmpfs over ro", mount("none", ro, "tmpfs"))
    attempt(tag + " write ro", lambda: open(os.path.join(ro, "canary"), "w").write("escaped"))
    print(tag, "remount ro rw", mount("none", ro, None, 0x20 | 0x1000))  # MS_REMOUNT|MS_BIND
    attempt(tag + " write ro after remount", lambda: open(os.path.join(ro, "canary"), "w").write("escaped"))
    print(tag, "proc", mount("proc", "m-" + tag, "proc"))
    attempt(tag + " read through new proc", lambda: loot(read_all("m-%s/1/root%s" % (tag, hidden))))
    print(tag, "bind /", mount("/", "m-" + tag, None, 0x1000 | 0x4000))
    print(tag, "sysfs", mount("sysfs", "m-" + tag, "sysfs"))
    print(tag, "cgroup2", mount("cgroup2", "m-" + tag, "cgroup2"))
    print(tag, "pivot_root", sc(155, b".\0", b".\0"))
    print(tag, "chroot", sc(161, b"/\0"))
try_everything("direct")
for flags in (CLONE_NEWUSER | CLONE_NEWNS, CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP):
    print("unshare", hex(flags), sc(272, flags))
try_everything("after-unshare")
print("setns", sc(308, os.open("/proc/self/ns/net", os.O_RDONLY), 0))
pid = os.fork()
if pid == 0:
    try_everything("child")
    os._exit(0)
os.waitpid(pid, 0)
"#;
    let out = python(
        &s,
        backend,
        &script(body),
        &[
            ro.to_str().expect("utf-8"),
            hidden.path.to_str().expect("utf-8"),
        ],
    );
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    canary.check(&mut f);
    listing.check(&mut f);
    secret_kept(&mut f, &secret, &s, &out);
    f.verdict()
}

fn kernel_trace_a_host_process(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let mut victim = Victim::start();
    let pid = victim.pid().to_string();
    let body = r#"
pid = int(sys.argv[1])
PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206
for target in [pid, 1, os.getppid()]:
    print("attach", target, sc(101, PTRACE_ATTACH, target, 0, 0))
    print("seize", target, sc(101, PTRACE_SEIZE, target, 0, 0))
    for f in ["cmdline", "environ", "maps", "mem", "stack", "syscall", "auxv"]:
        attempt("read /proc/%d/%s" % (target, f), lambda: loot(read_all("/proc/%d/%s" % (target, f))))
    class iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
    buf = ctypes.create_string_buffer(4096)
    local = iovec(ctypes.cast(buf, ctypes.c_void_p), 4096)
    try:
        maps = open("/proc/%d/maps" % target).read().splitlines()
    except OSError:
        maps = ["400000-401000"]
    for line in maps[:64]:
        start = int(line.split("-")[0], 16)
        remote = iovec(ctypes.c_void_p(start), 4096)
        if sc(310, target, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0) > 0:
            loot(buf.raw)
        sc(311, target, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0)
    pidfd = sc(434, target, 0)
    print("pidfd_open", target, pidfd)
    if pidfd >= 0:
        for fd in range(0, 8):
            got = sc(438, pidfd, fd, 0)
            if got >= 0:
                attempt("pidfd_getfd %d" % fd, lambda: loot(os.read(got, 4096)))
        print("pidfd_send_signal", sc(424, pidfd, 9, 0, 0))
    print("kill", target, sc(62, target, 19))
    print("kcmp", sc(312, os.getpid(), target, 0, 0, 0))
time.sleep(0.5)
"#;
    let out = python(&s, backend, &script(body), &[&pid]);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    victim.check(&mut f);
    secret_kept(&mut f, &victim.secret, &s, &out);
    f.verdict()
}

fn kernel_modules_kexec_reboot(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let knobs = [
        "/sys/kernel/kexec_loaded",
        "/sys/kernel/kexec_crash_loaded",
        "/proc/sys/kernel/ctrl-alt-del",
        "/proc/swaps",
    ];
    let before: Vec<String> = knobs.iter().map(|k| sysctl(k)).collect();
    let cad = before[2].clone();
    let body = r#"
cad_now = sys.argv[1]
print("init_module", sc(175, b"\x7fELF" + b"\0" * 64, 68, b"\0"))
print("finit_module", sc(313, os.open("/bin/sh", os.O_RDONLY), b"\0", 0))
print("delete_module", sc(176, b"openshell_nonexistent\0", 0))
print("kexec_load", sc(246, 0, 0, 0, 0))
print("kexec_file_load", sc(320, os.open("/bin/sh", os.O_RDONLY), -1, 1, b"\0", 0))
# ctrl-alt-del set to the opposite of the host's (CAD_ON 0x89abcdef, CAD_OFF 0).
cmd = 0 if cad_now == "1" else 0x89abcdef
print("reboot cad", sc(169, 0xfee1dead, 672274793, cmd, 0))
print("swapon", sc(167, b"/bin/sh\0", 0))
print("acct", sc(163, b"acct-file\0"))
print("quotactl", sc(179, 0x800002, b"/\0", 0, 0))
"#;
    let out = python(&s, backend, &script(body), &[&cad]);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    let now = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let names = |t: &str| -> Vec<String> {
        let mut v: Vec<String> = t
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect();
        v.sort();
        v
    };
    f.expect(names(&now) == names(&modules), || {
        "the host's loaded modules changed".to_owned()
    });
    for (knob, was) in knobs.iter().zip(before) {
        let now = sysctl(knob);
        f.expect(now == was, || format!("host {knob}: {was:?} -> {now:?}"));
    }
    f.verdict()
}

/// How far the host's realtime clock moved against its monotonic clock since `since`.
fn clock_moved(since: (std::time::SystemTime, Instant)) -> f64 {
    let real = std::time::SystemTime::now()
        .duration_since(since.0)
        .map(|d| d.as_secs_f64())
        .unwrap_or_else(|e| -e.duration().as_secs_f64());
    real - since.1.elapsed().as_secs_f64()
}

fn kernel_clock_and_names(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let since = (std::time::SystemTime::now(), Instant::now());
    let names = (
        sysctl("/proc/sys/kernel/hostname"),
        sysctl("/proc/sys/kernel/domainname"),
    );
    let body = r#"
class timeval(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("usec", ctypes.c_long)]
tv = timeval(int(time.time()) - 86400 * 400, 0)
print("settimeofday", sc(164, ctypes.addressof(tv), 0))
ts = (ctypes.c_long * 2)(int(time.time()) - 86400 * 400, 0)
print("clock_settime", sc(227, 0, ts))
timex = ctypes.create_string_buffer(208)
struct.pack_into("I", timex, 0, 0x0100)  # ADJ_SETOFFSET
struct.pack_into("q", timex, 72, -86400)
print("clock_adjtime", sc(266, 0, timex))
print("sethostname", sc(170, b"escaped", 7))
print("setdomainname", sc(171, b"escaped", 7))
attempt("/etc/localtime", lambda: open("/etc/localtime", "w").write("x"))
"#;
    let out = python(&s, backend, &script(body), &[]);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    let moved = clock_moved(since);
    f.expect(moved.abs() < 5.0, || {
        format!("the host's clock moved by {moved:.1} s")
    });
    let now = (
        sysctl("/proc/sys/kernel/hostname"),
        sysctl("/proc/sys/kernel/domainname"),
    );
    f.expect(now == names, || format!("host names: {names:?} -> {now:?}"));
    f.verdict()
}

fn keys_on_host() -> String {
    std::fs::read_to_string("/proc/keys").unwrap_or_default()
}

fn kernel_keyrings(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let tag = token("key");
    let users = std::fs::read_to_string("/proc/key-users").unwrap_or_default();
    let body = r#"
desc = sys.argv[1].encode() + b"\0"
for ring in (-4, -3, -5, -6):  # user, session, user-session, group keyrings
    print("add_key", ring, sc(248, b"user\0", desc, b"escaped", 7, ring))
print("join session", sc(250, 1, desc))  # KEYCTL_JOIN_SESSION_KEYRING
print("request_key", sc(249, b"user\0", desc, 0, -4))
"#;
    let out = python(&s, backend, &script(body), &[&tag]);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    f.expect(!keys_on_host().contains(&tag), || {
        "a key the sandbox added is in the host's keyrings".to_owned()
    });
    // Keys of a uid the sandbox maps to (nobody's, or the userns range) would show here.
    let now = std::fs::read_to_string("/proc/key-users").unwrap_or_default();
    let nobody = |t: &str| {
        t.lines()
            .find(|l| l.trim_start().starts_with("65534:"))
            .map(String::from)
    };
    f.expect(nobody(&now) == nobody(&users), || {
        format!(
            "nobody's keys on the host: {:?} -> {:?}",
            nobody(&users),
            nobody(&now)
        )
    });
    f.verdict()
}

/// Waits (bounded) for the host's inspection: `hold()` marks the attempts done and returns
/// when the host has looked.
const HOLD: &str = r#"
def hold():
    open("holding", "w").write("1")
    end = time.time() + 170
    while time.time() < end and not os.path.exists("done"):
        time.sleep(0.05)
"#;

/// Kernel objects no host process of a sandbox may hold, by the name of their anonymous
/// inode.
const KERNEL_OBJECTS: [&str; 9] = [
    "bpf-map",
    "bpf-prog",
    "bpf_link",
    "[perf_event]",
    "[userfaultfd]",
    "[io_uring]",
    "[fanotify]",
    "[secretmem]",
    "secretmem",
];

/// What each kernel-object probe asks the kernel for.
const OBJECT_ATTEMPTS: &str = r#"
held = []
def keep(name, fd):
    print(name, fd, flush=True)
    if fd >= 0:
        held.append(fd)
def bpf():
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("IIII", attr, 0, 2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY, key 4, value 4, 1 entry
    keep("bpf map", sc(321, 0, attr, 128))
    insns = ctypes.create_string_buffer(bytes.fromhex("b700000000000000" "9500000000000000"))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("IIQQ", attr, 0, 1, 2, ctypes.addressof(insns), ctypes.addressof(lic))
    keep("bpf prog", sc(321, 5, attr, 128))
def perf():
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("II", attr, 0, 1, 128)  # PERF_TYPE_SOFTWARE, size; config 0: cpu-clock
    keep("perf self", sc(298, attr, 0, -1, -1, 0))
    keep("perf cpu 0", sc(298, attr, -1, 0, -1, 0))
    struct.pack_into("II", attr, 0, 2, 128)  # PERF_TYPE_TRACEPOINT
    keep("perf tracepoint", sc(298, attr, -1, 0, -1, 0))
def uffd():
    keep("userfaultfd user-mode", sc(323, 0x80000 | 1))
    keep("userfaultfd", sc(323, 0x80000))
    try:
        keep("/dev/userfaultfd", os.open("/dev/userfaultfd", os.O_RDWR))
    except OSError as e:
        print("/dev/userfaultfd", e)
def uring():
    params = ctypes.create_string_buffer(120)
    keep("io_uring_setup", sc(425, 4, params))
    struct.pack_into("I", params, 8, 1 << 5)  # IORING_SETUP_SQPOLL: a kernel thread of ours
    keep("io_uring sqpoll", sc(425, 4, params))
def fanotify():
    keep("fanotify notif", sc(300, 0, 0))
    keep("fanotify content", sc(300, 4 | 8, 0))  # FAN_CLASS_CONTENT | FAN_UNLIMITED_QUEUE
    keep("memfd_secret", sc(447, 0))
{"bpf": bpf, "perf": perf, "uffd": uffd, "uring": uring, "fanotify": fanotify}[sys.argv[1]]()
pid = os.fork()
if pid == 0:
    hold()
    os._exit(0)
hold()
os.waitpid(pid, 0)
"#;

fn kernel_object(backend: &'static str, which: &str) -> Verdict {
    let s = Scratch::new("");
    let body = format!("{HOLD}\n{OBJECT_ATTEMPTS}");
    let mut f = Findings::default();
    let out = python_holding(
        &s,
        backend,
        &script(&body),
        &[which],
        |supervisor, f| {
            for pid in descendants(supervisor) {
                let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
                    continue;
                };
                for fd in fds.flatten() {
                    let target = std::fs::read_link(fd.path())
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    if KERNEL_OBJECTS.iter().any(|k| target.contains(k)) {
                        f.add(format!("host pid {pid} holds {target}"));
                    }
                }
            }
        },
        &mut f,
    );
    ran(&mut f, &out, &started(&s));
    f.verdict()
}

fn kernel_bpf(backend: &'static str) -> Verdict {
    kernel_object(backend, "bpf")
}

fn kernel_perf_events(backend: &'static str) -> Verdict {
    kernel_object(backend, "perf")
}

fn kernel_userfaultfd(backend: &'static str) -> Verdict {
    kernel_object(backend, "uffd")
}

fn kernel_io_uring(backend: &'static str) -> Verdict {
    kernel_object(backend, "uring")
}

fn kernel_fanotify_and_secretmem(backend: &'static str) -> Verdict {
    kernel_object(backend, "fanotify")
}

// ---------------------------------------------------------------------------------------------
// Privilege

/// Every host process of the sandbox but our own helpers (the supervisor binary) is
/// unprivileged: not host root by any of its uids, no_new_privs set, and capabilities (if any)
/// only in a user namespace of its own.
fn check_unprivileged(supervisor: u32, f: &mut Findings) {
    let ours = std::fs::canonicalize(common::SANDBOX).expect("the supervisor binary");
    let host_userns = std::fs::read_link("/proc/1/ns/user").ok();
    let mut seen = 0;
    for pid in descendants(supervisor) {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        if exe.as_deref() == Some(ours.as_path()) {
            continue;
        }
        let Some(uids) = status_field(pid, "Uid") else {
            continue;
        };
        seen += 1;
        let name = status_field(pid, "Name").unwrap_or_default();
        if uids.split_whitespace().any(|u| u == "0") {
            f.add(format!("host pid {pid} ({name}) has uids {uids}"));
        }
        if status_field(pid, "NoNewPrivs").as_deref() != Some("1") {
            f.add(format!("host pid {pid} ({name}) lacks no_new_privs"));
        }
        let caps = status_field(pid, "CapEff").unwrap_or_default();
        let own_userns = std::fs::read_link(format!("/proc/{pid}/ns/user")).ok() != host_userns;
        if !caps.trim_start_matches('0').is_empty() && !own_userns {
            f.add(format!(
                "host pid {pid} ({name}) has capabilities {caps} in the host's user namespace"
            ));
        }
    }
    f.expect(seen > 0, || {
        "no host process of the sandbox to inspect (the probe proves nothing)".to_owned()
    });
}

const SETUID_PROGRAMS: &str = r#"
import subprocess
procs = []
for cmd in (["/usr/bin/passwd"], ["/usr/bin/chfn"], ["/usr/bin/chsh"], ["/usr/bin/su", "-c", "sleep 200"],
            ["/usr/bin/newgrp", "root"], ["/usr/bin/gpasswd", "-a", "nobody", "root"], ["/usr/bin/mount", "-t", "tmpfs", "x", "/mnt"],
            ["/usr/bin/chage", "-l", "root"], ["/usr/bin/expiry", "-c"]):
    try:
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    except OSError as e:
        print(cmd[0], e)
time.sleep(1)
hold()
for p in procs:
    p.kill()
"#;

fn privilege_setuid_programs(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let body = format!("{HOLD}\n{SETUID_PROGRAMS}");
    let mut f = Findings::default();
    let out = python_holding(&s, backend, &script(&body), &[], check_unprivileged, &mut f);
    ran(&mut f, &out, &started(&s));
    f.verdict()
}

fn privilege_uid_0_setuid_programs(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    s.edit_policy(&[
        ("run_as_user: nobody", "run_as_user: root"),
        ("run_as_group: nogroup", "run_as_group: root"),
    ]);
    let body = format!("{HOLD}\n{SETUID_PROGRAMS}");
    let mut f = Findings::default();
    let out = python_holding(&s, backend, &script(&body), &[], check_unprivileged, &mut f);
    ran(&mut f, &out, &started(&s));
    f.verdict()
}

// ---------------------------------------------------------------------------------------------
// Resources

/// The longest a host loopback connect took while `run` ran.
fn host_responsiveness<T>(run: impl FnOnce() -> T) -> (T, Duration) {
    let (addr, _) = tcp_listener("127.0.0.1:0".parse().expect("addr"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut worst = Duration::ZERO;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let t = Instant::now();
            let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(30));
            worst = worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(100));
        }
        worst
    });
    let result = run();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let worst = sampler.join().expect("sampler");
    (result, worst)
}

/// The host stayed responsive (a loopback connect never took 5 s).
const RESPONSIVE: Duration = Duration::from_secs(5);

fn resources_fork_bomb(backend: &'static str) -> Verdict {
    let s = Scratch::new("resources:\n  pids: 64\n");
    let tag = token("bomb");
    let body = r#"
n = 0
for i in range(2000):
    try:
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
        n += 1
    except OSError:
        break
print("forked", n, flush=True)
"#;
    let (out, worst) = host_responsiveness(|| python(&s, backend, &script(body), &[&tag]));
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    f.expect(worst < RESPONSIVE, || {
        format!("a host loopback connect took {worst:?}")
    });
    let left = || common::pids_with_cmdline(&tag);
    f.expect(
        common::wait_until(Duration::from_secs(15), || left().is_empty()),
        || format!("processes left on the host: {:?}", left()),
    );
    f.verdict()
}

fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn resources_memory_and_tmp_fill(backend: &'static str) -> Verdict {
    let s = Scratch::new("resources:\n  memory_mib: 128\n");
    // The sandbox's own /tmp, writable.
    s.edit_policy(&[("read_write: [/dev/null]", "read_write: [/dev/null, /tmp]")]);
    let tag = token("fill");
    let mem_before = mem_available();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let low = std::thread::spawn(move || {
        let mut low = u64::MAX;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            low = low.min(mem_available());
            std::thread::sleep(Duration::from_millis(50));
        }
        low
    });
    let body = r#"
blocks = []
try:
    with open("/tmp/" + sys.argv[1], "wb") as f:
        for i in range(1024):
            f.write(b"\0" * (1 << 20))
            f.flush()
except OSError as e:
    print("tmp fill stopped:", e, flush=True)
for i in range(2048):
    b = bytearray(1 << 20)
    for j in range(0, 1 << 20, 4096):
        b[j] = 1
    blocks.append(b)
open("got-2-gib", "w").write("1")
"#;
    let out = python(&s, backend, &script(body), &[&tag]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let lowest = low.join().expect("sampler");
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    f.expect(!s.work.join("got-2-gib").exists(), || {
        "the workload touched 2 GiB under a 128 MiB limit".to_owned()
    });
    f.expect(!Path::new("/tmp").join(&tag).exists(), || {
        "the fill file is in the host's /tmp".to_owned()
    });
    // The VM's memory, or the cgroup's limit, plus slack for the supervisor and page cache.
    let used = mem_before.saturating_sub(lowest);
    f.expect(used < (1536 << 20), || {
        format!("the host's available memory fell by {} MiB", used >> 20)
    });
    f.verdict()
}

fn file_handles() -> u64 {
    sysctl("/proc/sys/fs/file-nr")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn resources_descriptor_exhaustion(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let before = file_handles();
    let body = r#"
import resource
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
print("limits", soft, hard)
attempt("raise the limit", lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1 << 20, 1 << 20)))
fds = []
try:
    while len(fds) < 200000:
        fds.append(os.open("/dev/null", os.O_RDONLY))
except OSError as e:
    print("open stopped at", len(fds), e, flush=True)
socks = []
try:
    while len(socks) < 100000:
        socks.append(socket.socket())
except OSError as e:
    print("socket stopped at", len(socks), e, flush=True)
"#;
    let (out, worst) = host_responsiveness(|| python(&s, backend, &script(body), &[]));
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    f.expect(worst < RESPONSIVE, || {
        format!("a host loopback connect took {worst:?}")
    });
    let settled = common::wait_until(Duration::from_secs(10), || file_handles() < before + 2000);
    f.expect(settled, || {
        format!("host file handles {before} -> {}", file_handles())
    });
    f.verdict()
}

// ---------------------------------------------------------------------------------------------
// Network

/// Connect directly and through the proxy to every `host` spelling at `port`, sending a line.
const CONNECT_EVERY_WAY: &str = r#"
port = int(sys.argv[1])
hosts = sys.argv[2:]
proxy = os.environ.get("HTTPS_PROXY", "")[len("http://"):]
for h in hosts:
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            infos = socket.getaddrinfo(h, port, fam, socket.SOCK_STREAM)
        except OSError as e:
            print("resolve", h, e)
            continue
        for info in infos:
            s = socket.socket(info[0], socket.SOCK_STREAM)
            s.settimeout(3)
            attempt("direct %s %s" % (h, info[4]), lambda: (s.connect(info[4]), s.sendall(b"escaped direct\n")))
    u = socket.socket(socket.AF_INET6 if ":" in h else socket.AF_INET, socket.SOCK_DGRAM)
    attempt("udp " + h, lambda: u.sendto(b"escaped udp\n", (h.strip("[]"), port)))
    if proxy:
        ph, pp = proxy.rsplit(":", 1)
        for req in ["CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (h, port, h, port),
                    "GET http://%s:%d/ HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (h, port, h, port),
                    "GET / HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (h, port)]:
            s = socket.socket(socket.AF_INET6 if ":" in ph else socket.AF_INET)
            s.settimeout(5)
            def go():
                s.connect((ph.strip("[]"), int(pp)))
                s.sendall(req.encode() + b"escaped via proxy\n")
                print("proxy answered", s.recv(64))
            attempt("proxy " + req.split("\r\n")[0], go)
"#;

fn network_host_loopback(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let (v4, got4) = tcp_listener("127.0.0.1:0".parse().expect("addr"));
    let port = v4.port();
    let got6 = std::net::TcpListener::bind(("::1", port))
        .ok()
        .map(drop)
        .and_then(|()| Some(tcp_listener(SocketAddr::new("::1".parse().ok()?, 0)).1));
    let (_, udp4) = udp_listener(SocketAddr::new("127.0.0.1".parse().expect("ip"), port));
    let hosts = [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "127.0.0.1.",
        "localhost",
        "localhost.",
        "::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "0",
        "[::1]",
    ];
    let port_s = port.to_string();
    let mut args = vec![port_s.as_str()];
    args.extend(hosts);
    let out = python(&s, backend, &script(CONNECT_EVERY_WAY), &args);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    got4.check_nothing(&mut f, "the host's 127.0.0.1 listener");
    if let Some(g) = got6 {
        g.check_nothing(&mut f, "the host's ::1 listener");
    }
    udp4.check_nothing(&mut f, "the host's 127.0.0.1 UDP socket");
    f.verdict()
}

/// The host's own interface addresses (traffic to them stays on this machine).
fn host_addresses() -> Vec<IpAddr> {
    let out = std::process::Command::new("ip")
        .args(["-j", "addr"])
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out).unwrap_or_default();
    links
        .iter()
        .filter_map(|l| l["addr_info"].as_array())
        .flatten()
        .filter_map(|a| a["local"].as_str()?.parse::<IpAddr>().ok())
        .filter(|ip| !ip.is_loopback())
        .collect()
}

fn network_host_interfaces(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let (any, got) = tcp_listener("0.0.0.0:0".parse().expect("addr"));
    let port = any.port();
    let got6 = std::net::TcpListener::bind(("::", port))
        .map(|l| {
            drop(l);
            tcp_listener(SocketAddr::new("::".parse().expect("ip"), port)).1
        })
        .ok();
    let (_, udp) = udp_listener(SocketAddr::new("0.0.0.0".parse().expect("ip"), port));
    let addrs: Vec<String> = host_addresses()
        .iter()
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
        .map(ToString::to_string)
        .collect();
    let port_s = port.to_string();
    let mut args = vec![port_s.as_str()];
    args.extend(addrs.iter().map(String::as_str));
    let out = python(&s, backend, &script(CONNECT_EVERY_WAY), &args);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    f.expect(!addrs.is_empty(), || {
        "the host has no address to try (the probe proves nothing)".to_owned()
    });
    got.check_nothing(&mut f, "the host's 0.0.0.0 listener");
    if let Some(g) = got6 {
        g.check_nothing(&mut f, "the host's :: listener");
    }
    udp.check_nothing(&mut f, "the host's UDP socket");
    f.verdict()
}

/// A policy letting /usr/bin/python3.11 reach `addr` (loopback allowed).
fn allow_python(addr: SocketAddr, extra: &str) -> String {
    format!(
        "network_policies:\n  allowed:\n    endpoints:\n      - host: \"{}\"\n        port: {}\n        allowed_ips: [127.0.0.0/8]\n{extra}    binaries: [{{ path: /usr/bin/python3.11 }}]\n",
        addr.ip(),
        addr.port()
    )
}

fn network_proxy_request_tricks(backend: &'static str) -> Verdict {
    let (allowed, _allowed_got) = tcp_listener("127.0.0.2:0".parse().expect("addr"));
    let (forbidden, got) = tcp_listener("127.0.0.3:0".parse().expect("addr"));
    let s = Scratch::new(&allow_python(allowed, ""));
    let body = r#"
a_host, a_port, f_host, f_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ph, pp = os.environ["HTTPS_PROXY"][len("http://"):].rsplit(":", 1)
F = "%s:%d" % (f_host, f_port)
A = "%s:%d" % (a_host, a_port)
tricks = [
    "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (F, F),
    "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (F, A),
    "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % ("2130706435:%d" % f_port, A),
    "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % ("0x7f000003:%d" % f_port, A),
    "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % ("127.3:%d" % f_port, A),
    "GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (F, A),
    "GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (A, F),
    "GET http://%s@%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (A, F, A),
    "GET / HTTP/1.1\r\nHost: %s\r\nHost: %s\r\n\r\n" % (A, F),
    "GET http://%s/ HTTP/1.1\r\nHost: %s\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (A, A, F, F),
    "GET http://%s/ HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (A, A, F, F),
    "GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\nGET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (A, A, F, F),
    "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\nCONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (A, A, F, F),
    "CONNECT [::ffff:%s]:%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (f_host, f_port, A),
    "CONNECT %s.:%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (f_host, f_port, A),
]
for t in tricks:
    s = socket.socket(socket.AF_INET6 if ":" in ph else socket.AF_INET)
    s.settimeout(5)
    def go():
        s.connect((ph.strip("[]"), int(pp)))
        s.sendall(t.encode())
        print("answer", s.recv(200)[:60], flush=True)
        s.sendall(b"escaped\n")
        time.sleep(0.2)
    attempt(t.split("\r\n")[0], go)
"#;
    let args = [
        allowed.ip().to_string(),
        allowed.port().to_string(),
        forbidden.ip().to_string(),
        forbidden.port().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = python(&s, backend, &script(body), &args);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    got.check_nothing(&mut f, "the forbidden upstream");
    f.verdict()
}

fn network_copied_allowed_binary(backend: &'static str) -> Verdict {
    let (allowed, got) = tcp_listener("127.0.0.2:0".parse().expect("addr"));
    let s = Scratch::new(&allow_python(allowed, ""));
    // The copy sits in the workdir; the run copies it and starts it there and through the
    // loader, each sending its own name.
    let client = r#"
import os, socket, sys
ph, pp = os.environ["HTTPS_PROXY"][len("http://"):].rsplit(":", 1)
s = socket.socket(); s.settimeout(5)
try:
    s.connect((ph, int(pp)))
    s.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (sys.argv[1], sys.argv[1])).encode())
    if b" 200 " in s.recv(200):
        s.sendall(sys.argv[2].encode() + b"\n")
except OSError as e:
    print(sys.argv[2], e)
"#;
    std::fs::write(s.work.join("client.py"), client).expect("write client");
    let target = allowed.to_string();
    let run = format!(
        "cp /usr/bin/python3.11 ./py && ./py client.py {target} copy; \
         ln -s /usr/bin/python3.11 ./linked && ./linked client.py {target} link; \
         /lib64/ld-linux-x86-64.so.2 /usr/bin/python3.11 client.py {target} loader; \
         LD_PRELOAD=/nonexistent.so /usr/bin/python3.11 client.py {target} preload; \
         /usr/bin/python3.11 client.py {target} control; touch started"
    );
    let out = bounded(s.command(backend, &[], &["/bin/sh", "-c", &run]));
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    std::thread::sleep(Duration::from_millis(300));
    let (n, bytes) = got.get();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    // The control proves the probe could have got through: the allowed binary did.
    f.expect(text.contains("control"), || {
        format!("the allowed binary itself did not get through (the probe proves nothing): {n} {text:?} {}", common::stderr(&out))
    });
    // A symlink is the same executable (the kernel names the target).
    for name in ["copy", "loader"] {
        f.expect(!text.contains(name), || {
            format!("the {name} was let through as the allowed binary")
        });
    }
    f.verdict()
}

fn network_another_sandbox(backend: &'static str) -> Verdict {
    // Sandbox A listens on every address it has and logs what reaches it into its workdir.
    let a = Scratch::new("");
    let listener = r#"
import json, os, socket, subprocess, time
port = 47011
addrs = []
try:
    out = subprocess.run(["/usr/sbin/ip", "-j", "addr"], capture_output=True, text=True).stdout
    for i in json.loads(out or "[]"):
        for a in i.get("addr_info", []):
            addrs.append(a["local"])
except Exception as e:
    print("ip:", e)
srv4 = socket.socket(); srv4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv4.bind(("0.0.0.0", port)); srv4.listen(16)
srv4.settimeout(0.2)
open("addresses", "w").write(json.dumps(addrs))
end = time.time() + 20
while time.time() < end and not os.path.exists("done"):
    try:
        c, peer = srv4.accept()
        c.settimeout(1)
        try:
            data = c.recv(100)
        except OSError:
            data = b""
        with open("got", "ab") as f:
            f.write(("%s %r\n" % (peer, data)).encode())
    except socket.timeout:
        pass
"#;
    let mut sandbox_a = a
        .command(backend, &[], &["/usr/bin/python3", "-c", listener])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sandbox A");
    let mut f = Findings::default();
    let listed = common::wait_until(Duration::from_secs(60), || {
        a.work.join("addresses").exists()
    });
    f.expect(listed, || "sandbox A never listened".to_owned());
    let addresses: Vec<String> =
        serde_json::from_slice(&std::fs::read(a.work.join("addresses")).unwrap_or_default())
            .unwrap_or_default();
    let b = Scratch::new("");
    let mut args = vec!["47011".to_owned()];
    args.extend(addresses.iter().filter(|a| !a.starts_with("127.")).cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = python(&b, backend, &script(CONNECT_EVERY_WAY), &args);
    ran(&mut f, &out, &started(&b));
    std::fs::write(a.work.join("done"), "").expect("done");
    let _ = sandbox_a.wait();
    let got = std::fs::read_to_string(a.work.join("got")).unwrap_or_default();
    f.expect(got.is_empty(), || format!("sandbox A was reached: {got:?}"));
    f.verdict()
}

fn resources_daemon_outlives_the_sandbox(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let tag = token("daemon");
    let body = r#"
import signal
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
    signal.signal(sig, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        for fd in range(0, 3):
            os.close(fd)
        for p in ["/sys/fs/cgroup/cgroup.procs", "/proc/self/cgroup"]:
            try:
                open(p, "w").write("0")
            except OSError:
                pass
        time.sleep(300)
    os._exit(0)
time.sleep(0.5)
"#;
    let out = python(&s, backend, &script(body), &[&tag]);
    let mut f = Findings::default();
    ran(&mut f, &out, &started(&s));
    let left = || common::pids_with_cmdline(&tag);
    f.expect(
        common::wait_until(Duration::from_secs(15), || left().is_empty()),
        || format!("the daemon outlived its sandbox on the host: {:?}", left()),
    );
    f.verdict()
}

/// What the kernel calls a socket's protocol (`system.sockprotoname` of the socket a
/// `/proc/<pid>/fd/<n>` link names), as the host reads it.
fn socket_protocol(fd_link: &Path) -> Option<String> {
    let path = std::ffi::CString::new(fd_link.as_os_str().as_encoded_bytes()).ok()?;
    let mut buf = [0u8; 64];
    // SAFETY: both strings are NUL-terminated and live across the call; the kernel writes at
    // most `buf.len()` bytes into `buf`.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"system.sockprotoname".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    Some(
        String::from_utf8_lossy(&buf[..n])
            .trim_end_matches('\0')
            .to_owned(),
    )
}

/// The socket protocols a sandbox may hold: TCP, UDP and ping sockets of both families, UNIX
/// (stream, and the name the kernel shares between seqpacket and datagram sockets; datagram
/// ones are refused by the table) and NETLINK (the table lets NETLINK_ROUTE alone through).
const ALLOWED_SOCKETS: [&str; 9] = [
    "TCP",
    "TCPv6",
    "UDP",
    "UDPv6",
    "PING",
    "PINGv6",
    "UNIX-STREAM",
    "UNIX",
    "NETLINK",
];

/// Every socket a host process of the sandbox holds is of an allowed protocol.
fn check_socket_families(supervisor: u32, f: &mut Findings) {
    for pid in descendants(supervisor) {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let is_socket = std::fs::read_link(fd.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
            if !is_socket {
                continue;
            }
            let proto = socket_protocol(&fd.path());
            if !proto
                .as_deref()
                .is_some_and(|p| ALLOWED_SOCKETS.contains(&p))
            {
                let name = status_field(pid, "Name").unwrap_or_default();
                f.add(format!("host pid {pid} ({name}) holds a {proto:?} socket"));
            }
        }
    }
}

fn network_socket_families(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let body = r#"
held = []
HIGH = 1 << 32
for fam in range(1, 46):
    for typ in (1, 2, 3, 5, 10):
        for proto in (0, 1, 6, 9, 17, 255, 768):
            for high in (0, HIGH):
                fd = sc(41, fam | high, typ, proto)
                if fd >= 0:
                    held.append(fd)
# The x32 entry (number | 0x40000000) and the i386 one (int 0x80, socketcall), in a child:
# the filter kills a process that uses the i386 table.
for fam, typ, proto in ((17, 3, 0x300), (40, 1, 0), (2, 3, 1)):
    fd = sc(41 | 0x40000000, fam, typ, proto)
    if fd >= 0:
        held.append(fd)
pid = os.fork()
if pid == 0:
    import mmap
    page = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40, prot=7)
    base = ctypes.addressof(ctypes.c_char.from_buffer(page))
    args = base + 64
    struct.pack_into("III", page, 64, 17, 3, 0x300)  # AF_PACKET, SOCK_RAW, ETH_P_ALL
    code = b"\xb8\x66\x00\x00\x00" + b"\xbb\x01\x00\x00\x00" + b"\xb9" + struct.pack("<I", args) + b"\xcd\x80\xc3"
    page[0:len(code)] = code
    fd = ctypes.CFUNCTYPE(ctypes.c_int)(base)()
    print("int 0x80 socket", fd, flush=True)
    hold()
    os._exit(0)
print("held", len(held), flush=True)
hold()
os.waitpid(pid, 0)
"#;
    let body = format!("{HOLD}\n{body}");
    let mut f = Findings::default();
    let out = python_holding(
        &s,
        backend,
        &script(&body),
        &[],
        check_socket_families,
        &mut f,
    );
    ran(&mut f, &out, &started(&s));
    f.verdict()
}

/// The namespaces (user, mount, network, UTS, IPC, cgroup, pid) a process is in.
fn namespaces_of(pid: u32) -> Vec<String> {
    ["user", "mnt", "net", "uts", "ipc", "cgroup", "pid"]
        .iter()
        .map(|ns| {
            std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
                .map(|t| t.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect()
}

fn kernel_new_namespaces(backend: &'static str) -> Verdict {
    let s = Scratch::new("");
    let body = r#"
CLONE = {"user": 0x10000000, "mnt": 0x20000, "net": 0x40000000, "uts": 0x4000000, "ipc": 0x8000000,
         "cgroup": 0x02000000, "pid": 0x20000000, "time": 0x80}
for name, flag in CLONE.items():
    print("unshare", name, sc(272, flag), sc(272, flag | (1 << 32)))
args = ctypes.create_string_buffer(88)
struct.pack_into("Q", args, 0, 0x10000000 | 0x20000)  # CLONE_NEWUSER | CLONE_NEWNS
struct.pack_into("Q", args, 32, 17)  # exit_signal SIGCHLD
r = sc(435, args, 88)
if r == 0:
    hold()
    os._exit(0)
print("clone3", r)
for ns in ["user", "mnt", "net", "pid", "uts", "ipc", "cgroup"]:
    try:
        print("setns", ns, sc(308, os.open("/proc/self/ns/" + ns, os.O_RDONLY), 0))
    except OSError as e:
        print("open ns", ns, e)
hold()
"#;
    let body = format!("{HOLD}\n{body}");
    let ours = std::fs::canonicalize(common::SANDBOX).expect("the supervisor binary");
    let host = namespaces_of(1);
    let mut f = Findings::default();
    let out = python_holding(
        &s,
        backend,
        &script(&body),
        &[],
        |supervisor, f| {
            let mut workload: Vec<(u32, Vec<String>)> = Vec::new();
            for pid in descendants(supervisor) {
                let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
                if exe.as_deref() == Some(ours.as_path()) {
                    continue;
                }
                let ns = namespaces_of(pid);
                // No process of the sandbox shares any namespace with the host's init.
                for (kind, (mine, theirs)) in ["user", "mnt", "net", "uts", "ipc", "cgroup", "pid"]
                    .iter()
                    .zip(ns.iter().zip(&host))
                {
                    if kind != &"cgroup" && kind != &"user" && mine == theirs {
                        f.add(format!("host pid {pid} is in the host's {kind} namespace"));
                    }
                }
                workload.push((pid, ns));
            }
            // On the process backend every workload process shares one set of namespaces
            // (none made a new one); the vm backend's host processes are its jailed VMM
            // programs, each in namespaces of its own.
            if backend == "process" {
                if let Some((_, first)) = workload.first() {
                    for (pid, ns) in &workload {
                        if ns != first {
                            f.add(format!(
                                "host pid {pid} left the sandbox's namespaces: {ns:?} vs {first:?}"
                            ));
                        }
                    }
                }
            }
            f.expect(!workload.is_empty(), || {
                "no host process of the sandbox to inspect".to_owned()
            });
        },
        &mut f,
    );
    ran(&mut f, &out, &started(&s));
    f.verdict()
}

/// The cloud metadata address, on the host's loopback device for the probe's duration.
struct MetadataAddress;

const METADATA: &str = "169.254.169.254";

impl MetadataAddress {
    fn add() -> Option<MetadataAddress> {
        let ok = std::process::Command::new("ip")
            .args(["addr", "add", &format!("{METADATA}/32"), "dev", "lo"])
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(MetadataAddress)
    }
}

impl Drop for MetadataAddress {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", &format!("{METADATA}/32"), "dev", "lo"])
            .status();
    }
}

fn network_cloud_metadata(backend: &'static str) -> Verdict {
    let mut f = Findings::default();
    let Some(_address) = MetadataAddress::add() else {
        f.add("could not put the metadata address on the host's lo (the probe proves nothing)");
        return f.verdict();
    };
    let (addr, got) = tcp_listener(SocketAddr::new(METADATA.parse().expect("ip"), 0));
    // The policy even names it: the proxy still refuses a link-local destination.
    let s = Scratch::new(&format!(
        "network_policies:\n  metadata:\n    endpoints:\n      - host: \"{METADATA}\"\n        port: {}\n    binaries: [{{ path: /usr/bin/python3.11 }}]\n",
        addr.port()
    ));
    let port = addr.port().to_string();
    let out = python(
        &s,
        backend,
        &script(CONNECT_EVERY_WAY),
        &[
            &port,
            METADATA,
            "2852039166",
            "0xa9fea9fe",
            "169.254.43518",
            "::ffff:169.254.169.254",
            "169.254.169.254.",
        ],
    );
    ran(&mut f, &out, &started(&s));
    got.check_nothing(&mut f, "the metadata listener");
    f.verdict()
}

// ---------------------------------------------------------------------------------------------

macro_rules! probes {
    ($($name:ident, $category:literal, $tries:literal, $check:literal;)*) => {
        $(
            #[test]
            fn $name() {
                score(&Probe {
                    name: stringify!($name),
                    category: $category,
                    tries: $tries,
                    check: $check,
                    run: super::$name,
                });
            }
        )*
    };
}

mod tests {
    use super::*;

    probes! {
        files_write_outside_policy, "files",
            "write, append, truncate, chmod, chown, utime, setxattr, rename, link and unlink a host file outside every policy path, and create entries next to it",
            "the file's bytes and metadata, and its directory's entries, are unchanged";
        files_write_read_only, "files",
            "the same on a mode-0666 file in a read-only policy path (only the policy stands in the way)",
            "the file's bytes and metadata, and its directory's entries, are unchanged";
        files_read_unlisted, "files",
            "read a host file outside the policy by its path, /proc/self/root, /proc/1/root, the parent's root, `..` from the workdir, odd spellings, links made in the workdir, and a walk of everything visible",
            "the file's random content appears nowhere in the workdir or the output";
        files_read_host_secrets, "files",
            "read /etc/shadow (in a read-only path), and root's ~/.ssh (unlisted), directly and through /proc/1/root",
            "shadow's first line and a random key file's content appear nowhere in the workdir or the output";
        files_proc_fd_reopen, "files",
            "reopen a read-only file's descriptor for writing through /proc/self/fd, /proc/thread-self/fd, an O_PATH descriptor, a directory descriptor, a shared mapping",
            "the file's bytes and metadata are unchanged";
        files_device_and_setid_files, "files",
            "mknod /dev/mem, /dev/kmsg and a disk in the workdir and /tmp; a setuid copy of /bin/sh; chown to 0",
            "no device node, set-id file or file of host root's is under the workdir";
        files_root_in_a_user_namespace, "privilege",
            "as the policy's uid 0 (`run_as_user: root`): the device, set-id and chown attempts, every write to a root-owned read-only file, reading a 0600 file of host root's",
            "no device node, set-id file or host-root file in the workdir; both files unchanged; the 0600 file's content is nowhere";
        files_open_by_handle, "files",
            "name_to_handle_at and open_by_handle_at for writing, and forged ext4 handles for a hidden file's inode (shocker)",
            "the read-only file is unchanged; the hidden file's content appears nowhere";
        files_proc_sys_and_sysrq, "files",
            "write core_pattern, hostname, printk_ratelimit, overcommit_ratio, modprobe under /proc/sys; /proc/sysrq-trigger",
            "each host value is unchanged; the host kernel logged no SysRq";
        files_host_sockets, "files",
            "connect (stream, seqpacket, datagram) to host daemons' sockets outside the policy, in the workdir, in a read-only path, in /run and /tmp, an abstract socket, and every socket file it can find",
            "no host listener accepted a connection";
        files_tmp_is_the_sandboxs_own, "files",
            "write into /tmp, /var/tmp, /dev/shm, /run, /run/user",
            "no such file appears on the host";
        kernel_mount_and_namespaces, "kernel",
            "mount tmpfs, proc, sysfs, cgroup2 and bind mounts, remount read-only paths, pivot_root, chroot; unshare every namespace (user first), setns; again in a child",
            "the read-only file and directory are unchanged; a hidden file's content appears nowhere";
        kernel_trace_a_host_process, "kernel",
            "ptrace attach and seize, /proc/<pid>/mem and environ, process_vm_readv/writev, pidfd_open, pidfd_getfd, pidfd_send_signal, kill and kcmp on a host process (and on pid 1 and its parent)",
            "the host process still runs untraced; its secret appears nowhere";
        kernel_modules_kexec_reboot, "kernel",
            "init_module, finit_module, delete_module, kexec_load, kexec_file_load, reboot(CAD), swapon, acct, quotactl",
            "the host's modules, kexec state, ctrl-alt-del and swaps are unchanged";
        kernel_clock_and_names, "kernel",
            "settimeofday, clock_settime and clock_adjtime 400 days back; sethostname, setdomainname",
            "the host's realtime clock (against its monotonic clock), hostname and domain name are unchanged";
        kernel_keyrings, "kernel",
            "add_key to the user, session and group keyrings, join a named session keyring, request_key",
            "no such key in the host's /proc/keys; nobody's key count unchanged";
        kernel_new_namespaces, "kernel",
            "unshare every namespace (and with bit 32 set), clone3 with CLONE_NEWUSER|CLONE_NEWNS, setns into its own namespaces",
            "while it holds: on process every workload process is in the same namespaces, none the host's (mount, network, UTS, IPC, pid); on vm no VMM process is in the host's";
        kernel_bpf, "kernel",
            "create a BPF map and load a socket-filter program",
            "no host process of the sandbox holds a BPF object (its descriptors, read on the host while the probe holds; on vm the host processes are the VMM's, the guest kernel being the boundary)";
        kernel_perf_events, "kernel",
            "perf_event_open on itself, on a CPU, and a tracepoint",
            "no host process of the sandbox holds a perf event";
        kernel_userfaultfd, "kernel",
            "userfaultfd (user-mode only and full) and /dev/userfaultfd",
            "no host process of the sandbox holds a userfaultfd";
        kernel_io_uring, "kernel",
            "io_uring_setup, plain and with a kernel polling thread",
            "no host process of the sandbox holds an io_uring";
        kernel_fanotify_and_secretmem, "kernel",
            "fanotify_init (notification and content classes), memfd_secret",
            "no host process of the sandbox holds a fanotify group or secret memory";
        privilege_setuid_programs, "privilege",
            "run passwd, chfn, chsh, su, newgrp, gpasswd, mount, chage and expiry (set-ID root) and keep them waiting on input",
            "every host process of the sandbox but its helpers (on vm: the VMM's) has no uid 0, no_new_privs set, no capability in the host's user namespace";
        privilege_uid_0_setuid_programs, "privilege",
            "the same as the policy's uid 0 (`run_as_user: root`)",
            "the same";
        resources_fork_bomb, "resources",
            "fork 2000 sleeping children under `pids: 64`",
            "the host answered loopback connects within 5 s throughout; no process of the bomb is left";
        resources_memory_and_tmp_fill, "resources",
            "fill /tmp with 1 GiB, then touch 2 GiB of memory, under `memory_mib: 128`",
            "the file written only after 2 GiB is absent; no fill file in the host's /tmp; host MemAvailable fell by under 1.5 GiB";
        resources_descriptor_exhaustion, "resources",
            "raise RLIMIT_NOFILE, open 200,000 files and 100,000 sockets",
            "the host answered within 5 s; its open file count came back";
        resources_daemon_outlives_the_sandbox, "resources",
            "double-fork, setsid, ignore every catchable signal, close its descriptors, try to leave its cgroup, sleep",
            "no process of the daemon is left on the host 15 s after the sandbox ended";
        network_socket_families, "network",
            "socket() for every family 1-45 with five types and seven protocols, with and without bit 32 set; AF_PACKET, AF_VSOCK and raw sockets through the x32 entry and through int 0x80 (i386 socketcall); keep what it got",
            "every socket a host process of the sandbox holds is TCP, UDP, ping, UNIX or NETLINK by the kernel's name for it (`system.sockprotoname`, read on the host while the probe holds; on vm: the VMM's processes)";
        network_cloud_metadata, "network",
            "169.254.169.254 (put on the host's lo for the probe) in five spellings, directly and through the proxy, with a policy that names it",
            "the listener on the metadata address received nothing";
        network_host_loopback, "network",
            "TCP (direct and through the proxy's CONNECT, absolute-URL and Host forms) and UDP to the host's loopback as 127.0.0.1, 127.1, decimal, hex, octal, trailing dot, localhost, ::1, ::ffff:127.0.0.1, 0.0.0.0",
            "the host's 127.0.0.1 and ::1 listeners and UDP socket received nothing";
        network_host_interfaces, "network",
            "the same to each of the host's own interface addresses",
            "the host's wildcard TCP and UDP listeners received nothing";
        network_proxy_request_tricks, "network",
            "through the proxy, with one allowed upstream: CONNECT to a forbidden one by name, decimal, hex, short, v4-mapped and trailing-dot forms; Host vs absolute-URL mismatches; userinfo; duplicate Host; CL/TE smuggling; a websocket upgrade and pipelined requests carrying a second request",
            "the forbidden upstream received nothing";
        network_copied_allowed_binary, "network",
            "reach an upstream only python3.11 may reach with a copy of python3.11 and through the dynamic loader (and, as control, python3.11 itself)",
            "the upstream got the control's line and neither the copy's nor the loader's";
        network_another_sandbox, "network",
            "from one sandbox, TCP, UDP and proxy requests to every address of another sandbox running at the same time",
            "the other sandbox's listener (its log, read from its workdir on the host) received nothing";
    }
}

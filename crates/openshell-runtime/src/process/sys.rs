//! Every `unsafe` block and raw system call of the process backend, each with its invariant.
//!
//! Return codes are turned into `Result` at once with `Errno::result`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::unistd::{ForkResult, Pid};

/// `fork(2)`.
///
/// Only called from the helper program, which is single-threaded (it was just exec'd and starts
/// no threads), so the child may allocate and run arbitrary code.
pub fn fork_single_threaded() -> nix::Result<ForkResult> {
    // SAFETY: the helper process is single-threaded (see the module docs of `child`), so no lock
    // can be held by another thread at fork time.
    unsafe { nix::unistd::fork() }
}

/// Drop every capability from the bounding set, `0..=last_cap`, but those in `keep`.
pub fn drop_bounding_set(last_cap: u32, keep: u64) -> nix::Result<()> {
    for cap in (0..=last_cap).filter(|c| *c >= 64 || keep & (1 << c) == 0) {
        // SAFETY: PR_CAPBSET_DROP takes a capability number and no pointers.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        match Errno::result(r) {
            Ok(_) => {}
            // A capability the kernel does not know: nothing to drop.
            Err(Errno::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Clear the ambient capability set.
pub fn clear_ambient_caps() -> nix::Result<()> {
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    Errno::result(r).map(drop)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Set the calling thread's effective and permitted capability sets to `keep` (a mask of
/// capability numbers) and its inheritable set to nothing.
pub fn set_caps(keep: u64) -> nix::Result<()> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let word = |w: u64| CapData {
        effective: w as u32,
        permitted: w as u32,
        inheritable: 0,
    };
    let data = [word(keep & 0xffff_ffff), word(keep >> 32)];
    // SAFETY: header and data point to live, correctly sized structures for version 3 (two
    // CapData entries); the kernel only reads them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    Errno::result(r).map(drop)
}

/// Read the calling thread's effective capability set (low and high words).
pub fn effective_caps() -> nix::Result<u64> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and data point to live, correctly sized structures for version 3; the
    // kernel writes two CapData entries.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    Errno::result(r)?;
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

/// `pidfd_open(2)`: a descriptor that names `pid` for as long as the descriptor lives.
pub fn pidfd_open(pid: Pid) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags, no pointers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    let fd = Errno::result(r)?;
    let fd = RawFd::try_from(fd).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned this new descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_send_signal(2)`.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> nix::Result<()> {
    // SAFETY: a null siginfo is allowed (the kernel fills it as for kill(2)); the descriptor is
    // borrowed and so open for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    Errno::result(r).map(drop)
}

/// The Landlock ABI version of the running kernel, or 0 when Landlock is unavailable.
pub fn landlock_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_ulong = 1;
    // SAFETY: with a null attribute pointer and size 0, the VERSION flag only returns a number.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(r).unwrap_or(0).max(0)
}

/// Make `fd` (a terminal) the calling process's controlling terminal. The caller must be a
/// session leader without one.
pub fn set_controlling_tty(fd: BorrowedFd<'_>) -> nix::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal), no pointers.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSCTTY as _, 0) };
    Errno::result(r).map(drop)
}

/// Set the window size of the terminal `fd`.
pub fn set_window_size(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> nix::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize structure, which lives on this stack frame.
    let r = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TIOCSWINSZ as _,
            &ws as *const libc::winsize,
        )
    };
    Errno::result(r).map(drop)
}

/// Mark every descriptor from `first` upwards close-on-exec.
pub fn cloexec_from(first: u32) -> nix::Result<()> {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range takes plain integers; with CLOEXEC it only sets a flag.
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    Errno::result(r).map(drop)
}

/// Install `f` to run in the forked child of `command` before it calls execve.
///
/// `f` must only make async-signal-safe calls: the supervisor is multi-threaded.
pub fn pre_exec<F>(command: &mut tokio::process::Command, f: F)
where
    F: FnMut() -> std::io::Result<()> + Send + Sync + 'static,
{
    // SAFETY: every closure passed here (see `process::mod`) only calls setsid, dup2, prctl and
    // unshare through thin wrappers: async-signal-safe system calls that do not allocate.
    unsafe {
        command.pre_exec(f);
    }
}

/// `sigaction(2)`.
pub fn sigaction(
    signal: nix::sys::signal::Signal,
    action: &nix::sys::signal::SigAction,
) -> nix::Result<nix::sys::signal::SigAction> {
    // SAFETY: only SIG_DFL and SIG_IGN are installed through this wrapper (see `child`), never a
    // Rust handler, so no handler can run with broken invariants.
    unsafe { nix::sys::signal::sigaction(signal, action) }
}

/// In a pre-exec child: make `pairs[i].0` available at `pairs[i].1` without close-on-exec.
///
/// Sources are first moved above every target, so a source that happens to sit on another
/// pair's target is never clobbered. Only async-signal-safe calls (fcntl, dup2).
pub fn place_fds(pairs: &[(RawFd, RawFd)]) -> std::io::Result<()> {
    const HIGH: RawFd = 64;
    let mut moved = [0 as RawFd; 4];
    for (i, (src, _)) in pairs.iter().enumerate().take(moved.len()) {
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor this process owns; no pointers.
        let r = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, HIGH) };
        moved[i] = Errno::result(r)?;
    }
    for (i, (_, dst)) in pairs.iter().enumerate().take(moved.len()) {
        // SAFETY: dup2 of an open descriptor onto a small target number; the new descriptor has
        // close-on-exec cleared, which is the point.
        let r = unsafe { libc::dup2(moved[i], *dst) };
        Errno::result(r)?;
    }
    Ok(())
}

/// `dup2(fd, target)` for a standard stream number (0, 1 or 2) in a helper.
pub fn dup_onto(fd: BorrowedFd<'_>, target: RawFd) -> nix::Result<()> {
    // SAFETY: `target` is a standard stream of this single-threaded helper; replacing it closes
    // the old descriptor, which no Rust object in the helper owns.
    let r = unsafe { libc::dup2(fd.as_raw_fd(), target) };
    Errno::result(r).map(drop)
}

/// `dup2(fd, target)` in a freshly forked, single-threaded child, for descriptors the parent
/// passed by number (the guest agent's pipes and PTYs).
pub fn dup_raw_onto(fd: RawFd, target: RawFd) -> nix::Result<()> {
    // SAFETY: dup2 validates `fd` itself (EBADF); replacing `target` in a child that is about to
    // exec closes a descriptor no Rust object in the child relies on.
    let r = unsafe { libc::dup2(fd, target) };
    Errno::result(r).map(drop)
}

/// `open_tree(fd, "", OPEN_TREE_CLONE | AT_EMPTY_PATH)`: a detached copy of the mount at `fd`
/// (that mount only, not what is mounted below it), as a new descriptor.
pub fn clone_mount(fd: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    clone_mounts(fd, false)
}

/// As [`clone_mount`]; with `recursive`, the mounts below it come along (`AT_RECURSIVE`).
pub fn clone_mounts(fd: BorrowedFd<'_>, recursive: bool) -> nix::Result<OwnedFd> {
    let mut flags =
        libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: the path is a static empty C string and the descriptor is borrowed, so open for the
    // duration of the call; the kernel returns a new descriptor or an error.
    let r = unsafe { libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), c"".as_ptr(), flags) };
    let fd = RawFd::try_from(Errno::result(r)?).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned this new descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `mount_setattr(fd, "", AT_EMPTY_PATH, {attr_set})` on a detached mount: set mount flags
/// (`MOUNT_ATTR_*`) on that one mount.
pub fn set_mount_attrs(fd: BorrowedFd<'_>, attr_set: u64) -> nix::Result<()> {
    set_mounts_attrs(fd, attr_set, false)
}

/// As [`set_mount_attrs`]; with `recursive`, on every mount below it too (`AT_RECURSIVE`), each
/// keeping the flags it has besides.
pub fn set_mounts_attrs(fd: BorrowedFd<'_>, attr_set: u64, recursive: bool) -> nix::Result<()> {
    let mut flags = libc::AT_EMPTY_PATH;
    if recursive {
        flags |= libc::AT_RECURSIVE;
    }
    let attr = libc::mount_attr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `attr` lives on this stack frame for the duration of the call and its size is
    // passed; the path is a static empty C string; the descriptor is borrowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    Errno::result(r).map(drop)
}

/// `move_mount(from, "", to, "", F_EMPTY_PATH | T_EMPTY_PATH)`: attach the detached mount
/// `from` on exactly the file or directory `to` names (no path is resolved again).
pub fn attach_mount(from: BorrowedFd<'_>, to: BorrowedFd<'_>) -> nix::Result<()> {
    let flags = libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH;
    // SAFETY: both descriptors are borrowed (open for the call) and both paths are static
    // empty C strings.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            from.as_raw_fd(),
            c"".as_ptr(),
            to.as_raw_fd(),
            c"".as_ptr(),
            flags,
        )
    };
    Errno::result(r).map(drop)
}

/// A new, detached mount of a fresh `fstype` instance (`fsopen`, one `fsconfig` string per
/// option, `fsmount` with the `MOUNT_ATTR_*` flags `attrs`), as a descriptor to attach with
/// [`attach_mount`]. A pseudo filesystem made this way belongs to the caller's namespaces (proc:
/// its pid namespace).
pub fn new_mount(fstype: &str, options: &[(&str, &str)], attrs: u64) -> nix::Result<OwnedFd> {
    use std::ffi::CString;
    let cstr = |s: &str| CString::new(s).map_err(|_| Errno::EINVAL);
    let fstype = cstr(fstype)?;
    // SAFETY: `fstype` is a NUL-terminated string that outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), libc::FSOPEN_CLOEXEC) };
    let raw = RawFd::try_from(Errno::result(r)?).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned this new descriptor and nothing else owns it.
    let fs = unsafe { OwnedFd::from_raw_fd(raw) };
    for (key, value) in options {
        let (key, value) = (cstr(key)?, cstr(value)?);
        // SAFETY: key and value are NUL-terminated strings that outlive the call; the
        // descriptor is owned by this frame.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                libc::FSCONFIG_SET_STRING,
                key.as_ptr(),
                value.as_ptr(),
                0,
            )
        };
        Errno::result(r)?;
    }
    // SAFETY: FSCONFIG_CMD_CREATE takes no key or value (null pointers, aux 0).
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            libc::FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    Errno::result(r)?;
    // SAFETY: fsmount takes the configured context's descriptor and two flag words.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsmount,
            fs.as_raw_fd(),
            libc::FSMOUNT_CLOEXEC,
            attrs as libc::c_uint,
        )
    };
    let raw = RawFd::try_from(Errno::result(r)?).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned this new descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `fsetxattr(fd, name, value, 0)`.
pub fn set_xattr(fd: BorrowedFd<'_>, name: &std::ffi::CStr, value: &[u8]) -> nix::Result<()> {
    // SAFETY: name is NUL-terminated and value is a live slice whose length is passed; the
    // descriptor is borrowed for the call.
    let r = unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast::<libc::c_void>(),
            value.len(),
            0,
        )
    };
    Errno::result(r).map(drop)
}

/// Take ownership of a descriptor that `recvmsg` just installed with SCM_RIGHTS.
pub fn adopt_received_fd(raw: RawFd) -> OwnedFd {
    // SAFETY: the kernel installed `raw` in this process during the recvmsg that returned it;
    // nothing else owns it, so the OwnedFd is its only owner (and closes it when dropped).
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// `ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)`: open the slave of the PTY
/// `master` without looking up its path.
pub fn open_pty_peer(master: BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: TIOCGPTPEER takes open flags as an integer argument, no pointers; the descriptor
    // is borrowed for the call.
    let r = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER as _, flags) };
    let fd = Errno::result(r)?;
    // SAFETY: the kernel just returned this new descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---------------------------------------------------------------------------------------------
// seccomp user notification (the supervisor carries out the workload's `connect` calls)

/// `struct seccomp_data` (linux/seccomp.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SeccompData {
    pub nr: i32,
    pub arch: u32,
    pub instruction_pointer: u64,
    pub args: [u64; 6],
}

/// `struct seccomp_notif`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SeccompNotif {
    pub id: u64,
    pub pid: u32,
    pub flags: u32,
    pub data: SeccompData,
}

/// `struct seccomp_notif_resp`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SeccompNotifResp {
    id: u64,
    val: i64,
    error: i32,
    flags: u32,
}

const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
const SECCOMP_FILTER_FLAG_NEW_LISTENER: libc::c_ulong = 1 << 3;
// _IOWR('!', 0, struct seccomp_notif), _IOWR('!', 1, struct seccomp_notif_resp),
// _IOW('!', 2, __u64)
const SECCOMP_IOCTL_NOTIF_RECV: libc::c_ulong = 0xc050_2100;
const SECCOMP_IOCTL_NOTIF_SEND: libc::c_ulong = 0xc018_2101;
const SECCOMP_IOCTL_NOTIF_ID_VALID: libc::c_ulong = 0x4008_2102;

/// Install the classic BPF `program` on the calling thread with a new user-notification
/// listener, and return the listener. no_new_privs must already be set.
pub fn install_filter_with_listener(program: &[seccompiler::sock_filter]) -> nix::Result<OwnedFd> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| Errno::EINVAL)?,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies the
    // program and only reads it (seccompiler's sock_filter has the kernel's layout).
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        )
    };
    let fd = RawFd::try_from(Errno::result(r)?).map_err(|_| Errno::EBADF)?;
    // SAFETY: with NEW_LISTENER the kernel returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Receive one notification (blocks until one is pending).
pub fn notif_recv(listener: BorrowedFd<'_>) -> nix::Result<SeccompNotif> {
    // The kernel requires a zeroed structure.
    let mut notif = SeccompNotif::default();
    // SAFETY: NOTIF_RECV writes one seccomp_notif into `notif`, which lives on this frame and
    // has the kernel's layout and size (80 bytes, encoded in the request number).
    let r = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            SECCOMP_IOCTL_NOTIF_RECV as _,
            &mut notif as *mut SeccompNotif,
        )
    };
    Errno::result(r).map(|_| notif)
}

/// Answer notification `id`: the call returns `val`, or fails with `errno` when it is not 0.
pub fn notif_send(listener: BorrowedFd<'_>, id: u64, val: i64, errno: i32) -> nix::Result<()> {
    let resp = SeccompNotifResp {
        id,
        val,
        error: -errno,
        flags: 0,
    };
    // SAFETY: NOTIF_SEND reads one seccomp_notif_resp, which lives on this frame and has the
    // kernel's layout and size (24 bytes, encoded in the request number).
    let r = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            SECCOMP_IOCTL_NOTIF_SEND as _,
            &resp as *const SeccompNotifResp,
        )
    };
    Errno::result(r).map(drop)
}

/// `SECCOMP_USER_NOTIF_FLAG_CONTINUE`: the kernel carries the call out as if it had not
/// been intercepted.
const SECCOMP_USER_NOTIF_FLAG_CONTINUE: u32 = 1;

/// Let notification `id`'s call proceed unchanged. Only for calls whose outcome the
/// supervisor does not decide (it recorded them; see `lineage`): the call's arguments are read
/// again by the kernel, after the supervisor looked at them.
pub fn notif_continue(listener: BorrowedFd<'_>, id: u64) -> nix::Result<()> {
    let resp = SeccompNotifResp {
        id,
        val: 0,
        error: 0,
        flags: SECCOMP_USER_NOTIF_FLAG_CONTINUE,
    };
    // SAFETY: NOTIF_SEND reads one seccomp_notif_resp, which lives on this frame and has the
    // kernel's layout and size (24 bytes, encoded in the request number).
    let r = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            SECCOMP_IOCTL_NOTIF_SEND as _,
            &resp as *const SeccompNotifResp,
        )
    };
    Errno::result(r).map(drop)
}

/// Whether notification `id` is still pending (its process still waits in the call).
pub fn notif_id_valid(listener: BorrowedFd<'_>, id: u64) -> bool {
    // SAFETY: NOTIF_ID_VALID reads one u64, which lives on this frame.
    let r = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            SECCOMP_IOCTL_NOTIF_ID_VALID as _,
            &id as *const u64,
        )
    };
    r == 0
}

/// `pidfd_getfd(pidfd, targetfd, 0)`: a duplicate of another process's descriptor.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, targetfd: i32) -> nix::Result<OwnedFd> {
    // SAFETY: pidfd_getfd takes a borrowed descriptor and two integers, no pointers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), targetfd, 0) };
    let fd = RawFd::try_from(Errno::result(r)?).map_err(|_| Errno::EBADF)?;
    // SAFETY: the kernel just returned this new descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `connect(fd, addr, addr.len())` with a socket address given as raw bytes (a copy of the
/// workload's); the kernel validates it as for any caller.
pub fn connect_raw(fd: BorrowedFd<'_>, addr: &[u8]) -> nix::Result<()> {
    let len = libc::socklen_t::try_from(addr.len()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: `addr` is a live byte slice of `len` bytes; the kernel copies at most `len`
    // bytes and validates their content. The descriptor is borrowed for the call.
    let r = unsafe { libc::connect(fd.as_raw_fd(), addr.as_ptr().cast::<libc::sockaddr>(), len) };
    Errno::result(r).map(drop)
}

/// Change the calling **thread's** credentials only (raw system calls: glibc's wrappers would
/// change every thread of the process). The thread loses its capabilities; it must exit
/// afterwards and never run anything else.
pub fn become_on_this_thread(uid: u32, gid: u32, groups: &[u32]) -> nix::Result<()> {
    // SAFETY: setgroups reads `groups.len()` gids from a live slice.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    Errno::result(r)?;
    // SAFETY: setresgid and setresuid take integers only.
    let r = unsafe { libc::syscall(libc::SYS_setresgid, gid, gid, gid) };
    Errno::result(r)?;
    // SAFETY: as above.
    let r = unsafe { libc::syscall(libc::SYS_setresuid, uid, uid, uid) };
    Errno::result(r).map(drop)
}

/// Register `fd` with the async runtime for readiness `interest`.
pub fn async_fd(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd keeps its descriptor open and unchanged for as long as it lives, and
    // the AsyncFd owns it for its whole life, which is what `register_with_interest` requires.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) }
        .map_err(std::io::Error::from)
}

/// `NETLINK_CONNECTOR` (linux/netlink.h).
const NETLINK_CONNECTOR: libc::c_int = 11;

/// A netlink connector socket subscribed to the kernel's process events (`CN_IDX_PROC`): a
/// datagram per fork, exec and exit on the host. Needs CAP_NET_ADMIN in the initial user
/// namespace; the receive buffer is raised to `rcvbuf` bytes.
pub fn proc_events_socket(rcvbuf: usize) -> nix::Result<OwnedFd> {
    // SAFETY: socket takes integers only; a non-negative result is a new descriptor.
    let r = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_CONNECTOR,
        )
    };
    let fd = Errno::result(r)?;
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let size = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
    // SAFETY: SO_RCVBUFFORCE reads one c_int from a live local for its stated size.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    Errno::result(r)?;
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value before the fields are set.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    addr.nl_groups = libc::CN_IDX_PROC;
    // SAFETY: bind reads `size_of::<sockaddr_nl>()` bytes from `addr`, a live local.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    Errno::result(r)?;
    // nlmsghdr (16) + cn_msg (20) + the operation (4): PROC_CN_MCAST_LISTEN.
    let mut msg = Vec::with_capacity(40);
    msg.extend_from_slice(&40u32.to_ne_bytes());
    msg.extend_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&std::process::id().to_ne_bytes());
    msg.extend_from_slice(&libc::CN_IDX_PROC.to_ne_bytes());
    msg.extend_from_slice(&libc::CN_VAL_PROC.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&4u16.to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&libc::PROC_CN_MCAST_LISTEN.to_ne_bytes());
    // SAFETY: send reads `msg.len()` bytes from a live buffer.
    let r = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    Errno::result(r)?;
    Ok(sock)
}

/// One datagram from `sock` without waiting: `Ok(None)` when none is queued.
pub fn recv_nowait(sock: BorrowedFd<'_>, buf: &mut [u8]) -> nix::Result<Option<usize>> {
    // SAFETY: recv writes at most `buf.len()` bytes into a live buffer.
    let r = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    match Errno::result(r) {
        Ok(n) => Ok(Some(n as usize)),
        Err(Errno::EAGAIN) => Ok(None),
        Err(e) => Err(e),
    }
}

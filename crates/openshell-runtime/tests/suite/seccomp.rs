//! The workload's compiled seccomp filter, proved row by row with nothing else in the way.
//!
//! For every probe a throwaway child (root, every capability, no Landlock, none of our
//! namespaces) makes one call twice: once unrestricted, once with only the compiled filter
//! installed. Each probe's arguments are chosen so that the kernel's own answer differs from
//! the filter's, and is harmless (bad magic, NULL pointers, invalid descriptors or flags,
//! query forms, objects that die with the child): the two answers together show that the row
//! bites. Every row of the table must be proved by a probe (`every_row_is_proved`), and the
//! prefix is proved too: the i386 ABI kills (the parent's waitpid sees SIGSYS), x32 numbers
//! get EPERM, clone3 gets ENOSYS. Argument width: every family, type and protocol check is
//! tried with dirty high bits, which the kernel drops for an `int`.

use pretty_assertions::assert_eq;

use openshell_runtime::process::seccomp::{self, DENIED};

use super::sys::{self, Call, Filter, Outcome};
use Outcome::{Errno, Signal};

const OK: Outcome = Outcome::Ok;
const EPERM: Outcome = Errno(libc::EPERM);
/// High bits above an `int`'s 32.
const HIGH: u64 = 1 << 32;
const X32_SYSCALL_BIT: u64 = 0x4000_0000;
/// Nobody has this pid (the kernel's limit is 2^22).
const NO_PID: u64 = 0x7fff_ffff;
/// A descriptor nobody has open.
const NO_FD: u64 = 0x7fff_0000;
const ALL_FLAGS: u64 = 0xffff_ffff;
/// i386 `getpid`.
const I386_GETPID: u32 = 20;

/// One call, what the kernel alone answers (any of `without`: kernels differ, e.g. a family
/// or call that is not built), and what the filter answers.
struct Probe {
    name: &'static str,
    call: Call,
    without: &'static [Outcome],
    with: Outcome,
}

fn raw(nr: i64, a: &[u64]) -> Call {
    let mut args = [0u64; 6];
    args[..a.len()].copy_from_slice(a);
    Call::Raw {
        nr: nr as u64,
        args,
    }
}

fn u(v: libc::c_int) -> u64 {
    v as u64
}

/// A probe the filter must answer with EPERM.
fn denied(name: &'static str, call: Call, without: &'static [Outcome]) -> Probe {
    Probe {
        name,
        call,
        without,
        with: EPERM,
    }
}

/// A call the filter must leave alone.
fn everyday(name: &'static str, call: Call) -> Probe {
    Probe {
        name,
        call,
        without: &[OK],
        with: OK,
    }
}

/// Every probe. `pair` is where socketpair writes its two descriptors; `no_file` a path that
/// does not exist; `own_file` one the test made.
fn probes(pair: u64, no_file: u64, own_file: u64) -> Vec<Probe> {
    use libc::*;
    let einval: &'static [Outcome] = &[Errno(EINVAL)];
    let efault: &'static [Outcome] = &[Errno(EFAULT)];
    let ebadf: &'static [Outcome] = &[Errno(EBADF)];
    let esrch: &'static [Outcome] = &[Errno(ESRCH)];
    let enoent: &'static [Outcome] = &[Errno(ENOENT)];
    let (unix, inet, inet6, netlink) = (u(AF_UNIX), u(AF_INET), u(AF_INET6), u(AF_NETLINK));
    let (stream, dgram, raw_, seqpacket) = (
        u(SOCK_STREAM),
        u(SOCK_DGRAM),
        u(SOCK_RAW),
        u(SOCK_SEQPACKET),
    );
    let sock_packet = 10;
    let netlink_audit = u(NETLINK_AUDIT);
    let per_addr_no_randomize = 0x0040000;
    let per_linux32 = 0x0008;
    vec![
        // The prefix.
        Probe {
            name: "i386 getpid (int 0x80)",
            call: Call::Int80 { nr: I386_GETPID },
            // SIGSEGV: a kernel without the i386 ABI (ia32_emulation off).
            without: &[OK, Signal(SIGSEGV)],
            with: Signal(SIGSYS),
        },
        denied(
            "x32 getpid",
            raw((SYS_getpid as u64 | X32_SYSCALL_BIT) as i64, &[]),
            // ENOSYS: a kernel without the x32 ABI.
            &[OK, Errno(ENOSYS)],
        ),
        denied(
            "x32 socket(AF_VSOCK)",
            raw(
                (SYS_socket as u64 | X32_SYSCALL_BIT) as i64,
                &[u(AF_VSOCK), stream],
            ),
            &[OK, Errno(ENOSYS), Errno(EAFNOSUPPORT)],
        ),
        Probe {
            name: "clone3(NULL, 0)",
            call: raw(SYS_clone3, &[0, 0]),
            without: einval,
            with: Errno(ENOSYS),
        },
        // Other processes.
        denied(
            "ptrace(PTRACE_ATTACH, no such pid)",
            raw(SYS_ptrace, &[u(PTRACE_ATTACH as c_int), NO_PID]),
            esrch,
        ),
        denied(
            "process_vm_readv(flags 1)",
            raw(SYS_process_vm_readv, &[NO_PID, 0, 0, 0, 0, 1]),
            einval,
        ),
        denied(
            "process_vm_writev(flags 1)",
            raw(SYS_process_vm_writev, &[NO_PID, 0, 0, 0, 0, 1]),
            einval,
        ),
        denied(
            "kcmp(no such pid)",
            raw(SYS_kcmp, &[NO_PID, NO_PID, 0, 0, 0]),
            // ENOSYS: a kernel without CONFIG_KCMP.
            &[Errno(ESRCH), Errno(ENOSYS)],
        ),
        denied(
            "pidfd_getfd(-1, 0, flags 1)",
            raw(SYS_pidfd_getfd, &[u(-1), 0, 1]),
            einval,
        ),
        denied(
            "process_madvise(-1, flags 1)",
            raw(SYS_process_madvise, &[u(-1), 0, 0, 0, 1]),
            einval,
        ),
        denied(
            "migrate_pages(no such pid)",
            raw(SYS_migrate_pages, &[NO_PID, 0, 0, 0]),
            &[Errno(ESRCH), Errno(ENOSYS)],
        ),
        denied(
            "move_pages(bad flags)",
            raw(SYS_move_pages, &[0, 0, 0, 0, 0, 0x8000_0000]),
            &[Errno(EINVAL), Errno(ENOSYS)],
        ),
        // Kernel attack surface.
        denied("bpf(bad command)", raw(SYS_bpf, &[0xffff, 0, 0]), einval),
        denied(
            "perf_event_open(NULL)",
            raw(SYS_perf_event_open, &[0, 0, u(-1), u(-1), 0]),
            efault,
        ),
        denied(
            "userfaultfd(bad flags)",
            raw(SYS_userfaultfd, &[ALL_FLAGS]),
            einval,
        ),
        denied(
            "io_uring_setup(0, NULL)",
            raw(SYS_io_uring_setup, &[0, 0]),
            // EPERM would be io_uring_disabled=2, which hides the row: refuse that host.
            &[Errno(EFAULT), Errno(EINVAL), Errno(ENOSYS)],
        ),
        denied(
            "io_uring_enter(-1)",
            raw(SYS_io_uring_enter, &[u(-1), 0, 0, 0, 0, 0]),
            &[Errno(EBADF), Errno(ENOSYS)],
        ),
        denied(
            "io_uring_register(-1)",
            raw(SYS_io_uring_register, &[u(-1), 0, 0, 0]),
            &[Errno(EINVAL), Errno(EBADF), Errno(ENOSYS)],
        ),
        denied(
            "fanotify_init(bad flags)",
            raw(SYS_fanotify_init, &[ALL_FLAGS, 0]),
            einval,
        ),
        denied(
            "keyctl(bad command)",
            raw(SYS_keyctl, &[0x7fff]),
            &[Errno(EOPNOTSUPP)],
        ),
        denied("add_key(NULL)", raw(SYS_add_key, &[0, 0, 0, 0, 0]), efault),
        denied(
            "request_key(NULL)",
            raw(SYS_request_key, &[0, 0, 0, 0]),
            efault,
        ),
        // Kernels and modules (ENOSYS: built without kexec or modules, as here).
        denied(
            "kexec_load(bad flags)",
            raw(SYS_kexec_load, &[0, 0, 0, ALL_FLAGS]),
            &[Errno(ENOSYS), Errno(EINVAL)],
        ),
        denied(
            "kexec_file_load(bad flags)",
            raw(SYS_kexec_file_load, &[u(-1), u(-1), 0, 0, ALL_FLAGS]),
            &[Errno(ENOSYS), Errno(EINVAL)],
        ),
        denied(
            "init_module(NULL, 0)",
            raw(SYS_init_module, &[0, 0, 0]),
            &[Errno(ENOSYS), Errno(ENOEXEC)],
        ),
        denied(
            "finit_module(-1)",
            raw(SYS_finit_module, &[u(-1), 0, 0]),
            &[Errno(ENOSYS), Errno(EBADF)],
        ),
        denied(
            "delete_module(NULL)",
            raw(SYS_delete_module, &[0, 0]),
            &[Errno(ENOSYS), Errno(EFAULT)],
        ),
        denied(
            "uselib(NULL)",
            raw(SYS_uselib, &[0]),
            &[Errno(ENOSYS), Errno(EFAULT)],
        ),
        // Mounts.
        denied("mount(NULL)", raw(SYS_mount, &[0, 0, 0, 0, 0]), efault),
        denied("umount2(NULL)", raw(SYS_umount2, &[0, 0]), efault),
        denied("pivot_root(NULL)", raw(SYS_pivot_root, &[0, 0]), efault),
        denied("chroot(NULL)", raw(SYS_chroot, &[0]), efault),
        denied(
            "open_tree(bad flags)",
            raw(SYS_open_tree, &[u(-1), 0, ALL_FLAGS]),
            einval,
        ),
        denied(
            "open_tree_attr(bad flags)",
            raw(467, &[u(-1), 0, ALL_FLAGS, 0, 0]),
            // ENOSYS: before Linux 6.15.
            &[Errno(EINVAL), Errno(ENOSYS)],
        ),
        denied(
            "move_mount(bad flags)",
            raw(SYS_move_mount, &[u(-1), 0, u(-1), 0, ALL_FLAGS]),
            einval,
        ),
        denied(
            "fsopen(bad flags)",
            raw(SYS_fsopen, &[0, ALL_FLAGS]),
            einval,
        ),
        denied(
            "fsconfig(-1)",
            raw(SYS_fsconfig, &[u(-1), 0, 0, 0, 0]),
            einval,
        ),
        denied(
            "fsmount(bad flags)",
            raw(SYS_fsmount, &[u(-1), ALL_FLAGS, 0]),
            einval,
        ),
        denied(
            "fspick(bad flags)",
            raw(SYS_fspick, &[u(-1), 0, ALL_FLAGS]),
            einval,
        ),
        denied(
            "mount_setattr(bad flags)",
            raw(SYS_mount_setattr, &[u(-1), 0, ALL_FLAGS, 0, 0]),
            einval,
        ),
        // Namespaces.
        denied("setns(-1)", raw(SYS_setns, &[u(-1), 0]), ebadf),
        denied(
            "unshare(CLONE_NEWNS)",
            raw(SYS_unshare, &[u(CLONE_NEWNS)]),
            &[OK],
        ),
        denied(
            "unshare(CLONE_NEWCGROUP)",
            raw(SYS_unshare, &[u(CLONE_NEWCGROUP)]),
            &[OK],
        ),
        denied(
            "unshare(CLONE_NEWUTS)",
            raw(SYS_unshare, &[u(CLONE_NEWUTS)]),
            &[OK],
        ),
        denied(
            "unshare(CLONE_NEWIPC)",
            raw(SYS_unshare, &[u(CLONE_NEWIPC)]),
            &[OK],
        ),
        denied(
            "unshare(CLONE_NEWUSER)",
            raw(SYS_unshare, &[u(CLONE_NEWUSER)]),
            &[OK],
        ),
        denied(
            "unshare(CLONE_NEWPID)",
            raw(SYS_unshare, &[u(CLONE_NEWPID)]),
            &[OK],
        ),
        denied(
            "unshare(CLONE_NEWNET)",
            raw(SYS_unshare, &[u(CLONE_NEWNET)]),
            &[OK],
        ),
        denied(
            "unshare(CLONE_NEWTIME)",
            raw(SYS_unshare, &[0x80]),
            // EINVAL: a kernel without time namespaces.
            &[OK, Errno(EINVAL)],
        ),
        denied(
            "unshare(high | CLONE_NEWUSER)",
            raw(SYS_unshare, &[HIGH | u(CLONE_NEWUSER)]),
            // unsigned long: the kernel refuses the unknown high bit itself.
            einval,
        ),
        denied(
            "clone(CLONE_NEWNS)",
            raw(SYS_clone, &[u(CLONE_NEWNS | SIGCHLD)]),
            &[OK],
        ),
        denied(
            "clone(CLONE_NEWCGROUP)",
            raw(SYS_clone, &[u(CLONE_NEWCGROUP | SIGCHLD)]),
            &[OK],
        ),
        denied(
            "clone(CLONE_NEWUTS)",
            raw(SYS_clone, &[u(CLONE_NEWUTS | SIGCHLD)]),
            &[OK],
        ),
        denied(
            "clone(CLONE_NEWIPC)",
            raw(SYS_clone, &[u(CLONE_NEWIPC | SIGCHLD)]),
            &[OK],
        ),
        denied(
            "clone(CLONE_NEWUSER)",
            raw(SYS_clone, &[u(CLONE_NEWUSER | SIGCHLD)]),
            &[OK],
        ),
        denied(
            "clone(CLONE_NEWPID)",
            raw(SYS_clone, &[u(CLONE_NEWPID | SIGCHLD)]),
            &[OK],
        ),
        denied(
            "clone(CLONE_NEWNET)",
            raw(SYS_clone, &[u(CLONE_NEWNET | SIGCHLD)]),
            &[OK],
        ),
        denied(
            "clone(high | CLONE_NEWUSER)",
            raw(SYS_clone, &[HIGH | u(CLONE_NEWUSER | SIGCHLD)]),
            // the kernel keeps the low 32 bits: a user namespace
            &[OK],
        ),
        // Whole-machine state.
        denied("reboot(bad magic)", raw(SYS_reboot, &[0, 0, 0, 0]), einval),
        denied(
            "swapon(bad flags)",
            raw(SYS_swapon, &[0, ALL_FLAGS]),
            einval,
        ),
        denied("swapoff(NULL)", raw(SYS_swapoff, &[0]), efault),
        denied(
            "clock_settime(bad clock)",
            raw(SYS_clock_settime, &[0x7fff, 0]),
            einval,
        ),
        denied(
            "clock_adjtime(bad clock, NULL)",
            raw(SYS_clock_adjtime, &[0x7fff, 0]),
            &[Errno(EFAULT), Errno(EINVAL)],
        ),
        denied(
            "settimeofday(NULL, NULL): sets nothing",
            raw(SYS_settimeofday, &[0, 0]),
            &[OK],
        ),
        denied("adjtimex(NULL)", raw(SYS_adjtimex, &[0]), efault),
        denied(
            "acct(no such file)",
            raw(SYS_acct, &[no_file]),
            &[Errno(ENOENT)],
        ),
        denied(
            "quotactl(no device)",
            raw(SYS_quotactl, &[0, 0, 0, 0]),
            &[Errno(ENODEV)],
        ),
        denied(
            "quotactl_fd(-1)",
            raw(SYS_quotactl_fd, &[u(-1), 0, 0, 0]),
            ebadf,
        ),
        denied("syslog(bad type)", raw(SYS_syslog, &[100, 0, 0]), einval),
        denied(
            "vhangup (no controlling terminal)",
            raw(SYS_vhangup, &[]),
            &[OK],
        ),
        // ENOSYS: a kernel without CONFIG_X86_IOPL_IOPERM, as here.
        denied(
            "iopl(4)",
            raw(SYS_iopl, &[4]),
            &[Errno(EINVAL), Errno(ENOSYS)],
        ),
        denied(
            "ioperm(beyond the bitmap)",
            raw(SYS_ioperm, &[0x1_0000, 1, 0]),
            &[Errno(EINVAL), Errno(ENOSYS)],
        ),
        // File handles.
        denied(
            "open_by_handle_at(-1, NULL)",
            raw(SYS_open_by_handle_at, &[u(-1), 0, 0]),
            &[Errno(EBADF), Errno(EFAULT)],
        ),
        denied(
            "name_to_handle_at(bad flags)",
            raw(SYS_name_to_handle_at, &[u(-1), 0, 0, 0, ALL_FLAGS]),
            einval,
        ),
        // Obsolete.
        denied(
            "lookup_dcookie",
            raw(SYS_lookup_dcookie, &[0, 0, 0]),
            &[Errno(ENOSYS), Errno(EFAULT)],
        ),
        denied("sysfs(bad option)", raw(SYS_sysfs, &[99, 0, 0]), einval),
        denied(
            "ustat(no such device)",
            raw(SYS_ustat, &[0xffff_ffff, 0]),
            einval,
        ),
        // Execution domains: unsigned int, compared on 32 bits.
        denied(
            "personality(ADDR_NO_RANDOMIZE)",
            raw(SYS_personality, &[per_addr_no_randomize]),
            &[OK],
        ),
        denied(
            "personality(PER_LINUX32)",
            raw(SYS_personality, &[per_linux32]),
            &[OK],
        ),
        denied(
            "personality(high | ADDR_NO_RANDOMIZE)",
            raw(SYS_personality, &[HIGH | per_addr_no_randomize]),
            &[OK],
        ),
        everyday("personality(PER_LINUX)", raw(SYS_personality, &[0])),
        everyday("personality(query)", raw(SYS_personality, &[ALL_FLAGS])),
        everyday(
            "personality(high | query): the kernel sees the query",
            raw(SYS_personality, &[HIGH | ALL_FLAGS]),
        ),
        // socket families: int, compared on 32 bits (EAFNOSUPPORT: a family not built).
        denied(
            "socket(AF_VSOCK)",
            raw(SYS_socket, &[u(AF_VSOCK), stream, 0]),
            &[OK, Errno(EAFNOSUPPORT)],
        ),
        denied(
            "socket(high | AF_VSOCK)",
            raw(SYS_socket, &[HIGH | u(AF_VSOCK), stream, 0]),
            &[OK, Errno(EAFNOSUPPORT)],
        ),
        denied(
            "socket(AF_PACKET)",
            raw(SYS_socket, &[u(AF_PACKET), raw_, 0]),
            &[OK, Errno(EAFNOSUPPORT)],
        ),
        denied(
            "socket(high | AF_PACKET)",
            raw(SYS_socket, &[HIGH | u(AF_PACKET), raw_, 0]),
            &[OK, Errno(EAFNOSUPPORT)],
        ),
        denied(
            "socket(family 1000)",
            raw(SYS_socket, &[1000, stream, 0]),
            &[Errno(EAFNOSUPPORT)],
        ),
        denied(
            "socket(AF_NETLINK, NETLINK_AUDIT)",
            raw(SYS_socket, &[netlink, raw_, netlink_audit]),
            &[OK, Errno(EPROTONOSUPPORT)],
        ),
        denied(
            "socket(AF_NETLINK, high | NETLINK_AUDIT)",
            raw(SYS_socket, &[netlink, raw_, HIGH | netlink_audit]),
            &[OK, Errno(EPROTONOSUPPORT)],
        ),
        denied(
            "socket(high | AF_NETLINK, NETLINK_AUDIT)",
            raw(SYS_socket, &[HIGH | netlink, raw_, netlink_audit]),
            &[OK, Errno(EPROTONOSUPPORT)],
        ),
        denied(
            "socket(AF_NETLINK, NETLINK_KOBJECT_UEVENT)",
            raw(SYS_socket, &[netlink, dgram, u(NETLINK_KOBJECT_UEVENT)]),
            &[OK],
        ),
        denied(
            "socket(AF_INET, SOCK_RAW)",
            raw(SYS_socket, &[inet, raw_, u(IPPROTO_ICMP)]),
            &[OK],
        ),
        denied(
            "socket(high | AF_INET, SOCK_RAW)",
            raw(SYS_socket, &[HIGH | inet, raw_, u(IPPROTO_ICMP)]),
            &[OK],
        ),
        denied(
            "socket(AF_INET, high | SOCK_RAW | SOCK_CLOEXEC)",
            raw(
                SYS_socket,
                &[inet, HIGH | u(SOCK_RAW | SOCK_CLOEXEC), u(IPPROTO_ICMP)],
            ),
            &[OK],
        ),
        denied(
            "socket(AF_INET6, SOCK_RAW)",
            raw(SYS_socket, &[inet6, raw_, u(IPPROTO_ICMPV6)]),
            &[OK, Errno(EAFNOSUPPORT)],
        ),
        denied(
            "socket(high | AF_INET6, SOCK_RAW)",
            raw(SYS_socket, &[HIGH | inet6, raw_, u(IPPROTO_ICMPV6)]),
            &[OK, Errno(EAFNOSUPPORT)],
        ),
        denied(
            "socket(AF_INET, SOCK_PACKET)",
            raw(SYS_socket, &[inet, sock_packet, 0]),
            &[OK, Errno(EAFNOSUPPORT)],
        ),
        denied(
            "socket(high | AF_INET, SOCK_PACKET)",
            raw(SYS_socket, &[HIGH | inet, sock_packet, 0]),
            &[OK, Errno(EAFNOSUPPORT)],
        ),
        denied(
            "socket(AF_INET6, SOCK_PACKET)",
            raw(SYS_socket, &[inet6, sock_packet, 0]),
            &[
                Errno(ESOCKTNOSUPPORT),
                Errno(EPROTONOSUPPORT),
                Errno(EAFNOSUPPORT),
            ],
        ),
        denied(
            "socket(AF_UNIX, SOCK_DGRAM)",
            raw(SYS_socket, &[unix, dgram, 0]),
            &[OK],
        ),
        denied(
            "socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC)",
            raw(
                SYS_socket,
                &[unix, u(SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC), 0],
            ),
            &[OK],
        ),
        denied(
            "socket(high | AF_UNIX, high | SOCK_DGRAM)",
            raw(SYS_socket, &[HIGH | unix, HIGH | dgram, 0]),
            &[OK],
        ),
        denied(
            "socket(AF_UNIX, SOCK_RAW): a datagram socket",
            raw(SYS_socket, &[unix, raw_, 0]),
            &[OK],
        ),
        everyday(
            "socket(AF_UNIX, SOCK_STREAM)",
            raw(SYS_socket, &[unix, stream, 0]),
        ),
        everyday(
            "socket(AF_UNIX, SOCK_SEQPACKET)",
            raw(SYS_socket, &[unix, seqpacket, 0]),
        ),
        everyday(
            "socket(high | AF_UNIX, SOCK_STREAM)",
            raw(SYS_socket, &[HIGH | unix, stream, 0]),
        ),
        everyday(
            "socket(AF_INET, SOCK_STREAM)",
            raw(SYS_socket, &[inet, stream, 0]),
        ),
        everyday(
            "socket(AF_INET, SOCK_DGRAM)",
            raw(SYS_socket, &[inet, dgram, 0]),
        ),
        everyday(
            "socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE)",
            raw(SYS_socket, &[netlink, raw_, u(NETLINK_ROUTE)]),
        ),
        everyday(
            "socket(AF_NETLINK, SOCK_DGRAM | SOCK_CLOEXEC, NETLINK_ROUTE)",
            raw(
                SYS_socket,
                &[netlink, u(SOCK_DGRAM | SOCK_CLOEXEC), u(NETLINK_ROUTE)],
            ),
        ),
        // socketpair.
        denied(
            "socketpair(AF_UNIX, SOCK_DGRAM)",
            raw(SYS_socketpair, &[unix, dgram, 0, pair]),
            &[OK],
        ),
        denied(
            "socketpair(high | AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC)",
            raw(
                SYS_socketpair,
                &[HIGH | unix, u(SOCK_DGRAM | SOCK_CLOEXEC), 0, pair],
            ),
            &[OK],
        ),
        denied(
            "socketpair(AF_UNIX, SOCK_RAW): a datagram pair",
            raw(SYS_socketpair, &[unix, raw_, 0, pair]),
            &[OK],
        ),
        denied(
            "socketpair(AF_INET, SOCK_STREAM)",
            raw(SYS_socketpair, &[inet, stream, 0, pair]),
            &[Errno(EOPNOTSUPP)],
        ),
        denied(
            "socketpair(high | AF_INET, SOCK_STREAM)",
            raw(SYS_socketpair, &[HIGH | inet, stream, 0, pair]),
            &[Errno(EOPNOTSUPP)],
        ),
        everyday(
            "socketpair(AF_UNIX, SOCK_STREAM)",
            raw(SYS_socketpair, &[unix, stream, 0, pair]),
        ),
        everyday(
            "socketpair(AF_UNIX, SOCK_SEQPACKET)",
            raw(SYS_socketpair, &[unix, seqpacket, 0, pair]),
        ),
        everyday(
            "socketpair(high | AF_UNIX, SOCK_STREAM)",
            raw(SYS_socketpair, &[HIGH | unix, stream, 0, pair]),
        ),
        // Set-ID modes: on a path that does not exist (or a closed descriptor), so only the
        // filter decides; dirty bits above the mode's 16 change no answer.
        denied("chmod(S_ISUID)", raw(SYS_chmod, &[no_file, 0o4755]), enoent),
        denied(
            "chmod(high | S_ISGID)",
            raw(SYS_chmod, &[no_file, HIGH | 0xffff_0000 | 0o2755]),
            enoent,
        ),
        denied("fchmod(S_ISUID)", raw(SYS_fchmod, &[NO_FD, 0o4755]), ebadf),
        denied(
            "fchmodat(S_ISGID)",
            raw(SYS_fchmodat, &[AT_FDCWD as u64, no_file, 0o2711]),
            enoent,
        ),
        denied(
            "fchmodat2(S_ISUID)",
            raw(SYS_fchmodat2, &[AT_FDCWD as u64, no_file, 0o4711, 0]),
            &[Errno(ENOENT), Errno(ENOSYS)],
        ),
        denied("creat(S_ISUID)", raw(SYS_creat, &[no_file, 0o4755]), enoent),
        denied(
            "open(O_CREAT, S_ISUID)",
            raw(SYS_open, &[no_file, u(O_CREAT | O_WRONLY), 0o4755]),
            enoent,
        ),
        denied(
            "openat(O_CREAT, S_ISGID)",
            raw(
                SYS_openat,
                &[AT_FDCWD as u64, no_file, u(O_CREAT | O_WRONLY), 0o2755],
            ),
            enoent,
        ),
        denied(
            "mknod(S_IFREG | S_ISUID)",
            raw(SYS_mknod, &[no_file, u(S_IFREG as i32) | 0o4755, 0]),
            enoent,
        ),
        denied(
            "mknodat(S_IFREG | S_ISGID)",
            raw(
                SYS_mknodat,
                &[AT_FDCWD as u64, no_file, u(S_IFREG as i32) | 0o2755, 0],
            ),
            enoent,
        ),
        denied(
            "memfd_secret(0)",
            raw(SYS_memfd_secret, &[0]),
            // ENOSYS: a kernel without secret memory (secretmem.enable=0).
            &[OK, Errno(ENOSYS)],
        ),
        denied(
            "openat2(NULL how)",
            raw(SYS_openat2, &[AT_FDCWD as u64, no_file, 0, 24]),
            efault,
        ),
        everyday(
            "chmod(0o1777): the sticky bit",
            raw(SYS_chmod, &[own_file, 0o1777]),
        ),
        everyday(
            "openat(O_CREAT, 0o644)",
            raw(
                SYS_openat,
                &[AT_FDCWD as u64, own_file, u(O_CREAT | O_WRONLY), 0o644],
            ),
        ),
        // Everyday process calls.
        everyday("getpid", raw(SYS_getpid, &[])),
        everyday("clone(SIGCHLD): fork", raw(SYS_clone, &[u(SIGCHLD)])),
        everyday("unshare(CLONE_FILES)", raw(SYS_unshare, &[u(CLONE_FILES)])),
    ]
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Every probe, without and with the filter: the kernel's answer is one of the probe's
/// `without`, the filter's is its `with`.
#[test]
fn every_row_bites_with_the_filter_as_the_only_restriction() {
    if !is_root() {
        let reason = "not root (the probes need every capability)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("every_row_bites_with_the_filter_as_the_only_restriction: {reason}");
        }
        eprintln!("SKIP every_row_bites_with_the_filter_as_the_only_restriction: {reason}");
        return;
    }
    let compiled = seccomp::compile().expect("the table compiles");
    let filter = Filter::new(&compiled.program);
    let mut pair = [0i32; 2];
    let no_file = c"/nonexistent/openshell-seccomp-test";
    let dir = tempfile::tempdir().expect("tempdir");
    let own = dir.path().join("own");
    std::fs::write(&own, "").expect("own file");
    let own = std::ffi::CString::new(own.as_os_str().as_encoded_bytes()).expect("path");
    let probes = probes(
        pair.as_mut_ptr() as u64,
        no_file.as_ptr() as u64,
        own.as_ptr() as u64,
    );
    let mut got = Vec::new();
    let mut want = Vec::new();
    for p in &probes {
        let without = sys::run(p.call, None);
        let with = sys::run(p.call, Some(&filter));
        got.push((p.name, without, with));
        let expected_without = if p.without.contains(&without) {
            without
        } else {
            p.without[0]
        };
        want.push((p.name, expected_without, p.with));
    }
    assert_eq!(got, want);
}

/// The probes are sound: a denied probe's kernel answer can never be the filter's, and
/// every row of the table is proved by a probe the row matches (by the table's own reading
/// of its arguments, widths included); an everyday probe matches no row.
#[test]
fn every_row_is_proved() {
    let probes = probes(0, 0, 0);
    let undecidable: Vec<&str> = probes
        .iter()
        .filter(|p| p.with != OK && p.without.contains(&p.with))
        .map(|p| p.name)
        .collect();
    assert_eq!(undecidable, Vec::<&str>::new());

    let hits = |p: &Probe, row: &seccomp::Denied| match p.call {
        Call::Raw { nr, args } => nr as i64 == row.nr && row.matches.hits(&args),
        Call::Int80 { .. } => false,
    };
    let unproved: Vec<(&str, String)> = DENIED
        .iter()
        .filter(|row| !probes.iter().any(|p| p.with == EPERM && hits(p, row)))
        .map(|row| (row.name, row.matches.to_string()))
        .collect();
    assert_eq!(unproved, Vec::<(&str, String)>::new());

    let everyday_hitting: Vec<&str> = probes
        .iter()
        .filter(|p| p.with == OK && DENIED.iter().any(|row| hits(p, row)))
        .map(|p| p.name)
        .collect();
    assert_eq!(everyday_hitting, Vec::<&str>::new());
}

//! The workload's seccomp filter, as one reviewed table.
//!
//! Everything not in [`DENIED`] is allowed: the filter closes kernel attack surface and the
//! escape routes a sandboxed agent has no business using. Each row says why. The table is
//! compiled with seccompiler; a short hand-written prefix ([`PREFIX`]) runs first and
//! - kills any process using a non-native ABI (i386 `int 0x80`),
//! - refuses x32 system calls (numbers with bit 30 set), which would otherwise bypass the table,
//! - answers `clone3` with ENOSYS so libc falls back to `clone`, whose flags the table can see.
//!
//! Argument widths: every argument a row compares is declared as the kernel's `SYSCALL_DEFINE`
//! declares it ([`Arg::decl`]), and the comparison width follows from that type alone
//! ([`Arg::width`]): an `int` or `unsigned int` is compared on its low 32 bits, because the
//! kernel truncates the register to them (a 64-bit comparison would let
//! `socket((1 << 32) | AF_VSOCK, ..)` past a row the kernel then serves as `AF_VSOCK`); an
//! `unsigned long` on all 64. [`peers`] records how the table differs from Docker's default
//! profile and OpenShell's filter.

pub mod peers;

use std::collections::BTreeMap;
use std::fmt;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// How many bits of an argument the filter compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Width {
    /// The low 32 bits: the kernel's parameter is `int` or `unsigned int`.
    Bits32,
    /// All 64 bits: the kernel's parameter is `unsigned long`.
    Bits64,
}

impl fmt::Display for Width {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Width::Bits32 => "32-bit",
            Width::Bits64 => "64-bit",
        })
    }
}

/// One argument of a system call: its position and its declaration as in the kernel's
/// `SYSCALL_DEFINE` (type, then name), from which the comparison width follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arg {
    pub index: u8,
    pub decl: &'static str,
}

impl Arg {
    /// The comparison width for the declared type; `None` for a type the table does not know
    /// (compiling such a row fails).
    pub fn width(&self) -> Option<Width> {
        match self.decl.rsplit_once(' ')?.0 {
            // `umode_t` is an `unsigned short`: the kernel keeps the low 16 bits. Compared on
            // 32, which answers as the kernel does for the only rows that read one: bit tests
            // below bit 16 (`every_mode_row_tests_bits_the_kernel_keeps`).
            "int" | "unsigned int" | "umode_t" => Some(Width::Bits32),
            "unsigned long" => Some(Width::Bits64),
            _ => None,
        }
    }

    /// The parameter's name.
    pub fn name(&self) -> &'static str {
        self.decl
            .rsplit_once(' ')
            .map_or(self.decl, |(_, name)| name)
    }

    /// The value the filter compares, from a call's six argument registers.
    pub fn seen(&self, args: &[u64; 6]) -> u64 {
        let raw = args[usize::from(self.index)];
        match self.width() {
            Some(Width::Bits32) => raw & 0xffff_ffff,
            _ => raw,
        }
    }
}

/// A comparison of one argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    /// `(arg & mask) == value`.
    MaskedEq(u64),
}

/// One condition of a row: `arg op value`, with the value's name for the printed table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cond {
    pub arg: Arg,
    pub op: Op,
    pub value: u64,
    pub value_name: &'static str,
}

impl Cond {
    /// Whether the condition holds for a call's argument registers, compared as the filter
    /// compares them.
    pub fn holds(&self, args: &[u64; 6]) -> bool {
        let seen = self.arg.seen(args);
        match self.op {
            Op::Eq => seen == self.value,
            Op::Ne => seen != self.value,
            Op::MaskedEq(mask) => seen & mask == self.value,
        }
    }
}

impl fmt::Display for Cond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (arg, value) = (self.arg.name(), self.value_name);
        match self.op {
            Op::Eq => write!(f, "{arg} == {value}"),
            Op::Ne => write!(f, "{arg} != {value}"),
            Op::MaskedEq(mask) => write!(f, "({arg} & {mask:#x}) == {value}"),
        }
    }
}

/// What a denied call matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    /// Every call.
    Always,
    /// Calls whose argument has any of the bits in `mask` set (one rule per bit); `names`
    /// names the bits for the printed table.
    AnyBit {
        arg: Arg,
        mask: u64,
        names: &'static str,
    },
    /// Calls for which every condition holds.
    All(&'static [Cond]),
}

impl Match {
    /// Whether a call with these argument registers matches, compared as the compiled filter
    /// compares (the widths included).
    pub fn hits(&self, args: &[u64; 6]) -> bool {
        match self {
            Match::Always => true,
            Match::AnyBit { arg, mask, .. } => arg.seen(args) & mask != 0,
            Match::All(conds) => conds.iter().all(|c| c.holds(args)),
        }
    }

    /// The arguments the match compares, each once, in order of first use.
    pub fn args(&self) -> Vec<Arg> {
        let mut out: Vec<Arg> = Vec::new();
        let all: Vec<Arg> = match self {
            Match::Always => Vec::new(),
            Match::AnyBit { arg, .. } => vec![*arg],
            Match::All(conds) => conds.iter().map(|c| c.arg).collect(),
        };
        for arg in all {
            if !out.contains(&arg) {
                out.push(arg);
            }
        }
        out
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::Always => f.write_str("always"),
            Match::AnyBit { arg, mask, names } => {
                write!(f, "{} & ({names} = {mask:#x})", arg.name())
            }
            Match::All(conds) => {
                for (i, c) in conds.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" && ")?;
                    }
                    write!(f, "{c}")?;
                }
                Ok(())
            }
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Denied {
    pub name: &'static str,
    pub nr: i64,
    pub matches: Match,
    pub reason: &'static str,
}

/// One step of the hand-written prefix, for the printed table.
#[derive(Debug, Clone, Copy)]
pub struct PrefixRow {
    pub what: &'static str,
    pub action: &'static str,
    pub reason: &'static str,
}

/// What the prefix ([`prefix`]) does before the table is consulted.
pub const PREFIX: &[PrefixRow] = &[
    PrefixRow {
        what: "any ABI but x86_64 (i386 int 0x80)",
        action: "kill the process (SIGSYS)",
        reason: "a second system call table the rows do not describe",
    },
    PrefixRow {
        what: "x32 calls (number | 0x40000000)",
        action: "EPERM",
        reason: "x32 numbers reach the same kernel functions without matching any row",
    },
    PrefixRow {
        what: "clone3",
        action: "ENOSYS",
        reason:
            "its flags sit behind a pointer; libc falls back to clone, whose flags the rows see",
    },
];

const NS_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;
/// `CLONE_NEWTIME` (linux/sched.h): unshare only; for clone this bit is part of the exit
/// signal (`CSIGNAL`), which the kernel strips from the flags.
const CLONE_NEWTIME: u64 = 0x80;

// Values the rows compare, as the filter compares them.
const AF_UNIX: u64 = libc::AF_UNIX as u64;
const AF_INET: u64 = libc::AF_INET as u64;
const AF_INET6: u64 = libc::AF_INET6 as u64;
const AF_NETLINK: u64 = libc::AF_NETLINK as u64;
const SOCK_DGRAM: u64 = libc::SOCK_DGRAM as u64;
const SOCK_RAW: u64 = libc::SOCK_RAW as u64;
/// The obsolete `SOCK_PACKET` socket type (linux/socket.h).
const SOCK_PACKET: u64 = 10;
/// linux/net.h: the socket type; `SOCK_NONBLOCK` and `SOCK_CLOEXEC` sit above it.
const SOCK_TYPE_MASK: u64 = 0xf;
const NETLINK_ROUTE: u64 = libc::NETLINK_ROUTE as u64;
/// The Linux execution domain with no flags (linux/personality.h).
const PER_LINUX: u64 = 0;
/// `personality(0xffffffff)` only reports the current personality.
const PER_QUERY: u64 = 0xffff_ffff;
/// `open_tree_attr` (Linux 6.15), not yet in the libc crate: the x86_64 table's number.
#[allow(non_upper_case_globals)]
const SYS_open_tree_attr: i64 = 467;

// The kernel's declarations (SYSCALL_DEFINE) of the arguments the rows compare.
/// `SYSCALL_DEFINE3(socket, int, family, int, type, int, protocol)`, and the same three
/// for `socketpair`.
const FAMILY: Arg = Arg {
    index: 0,
    decl: "int family",
};
const TYPE: Arg = Arg {
    index: 1,
    decl: "int type",
};
const PROTOCOL: Arg = Arg {
    index: 2,
    decl: "int protocol",
};
/// `SYSCALL_DEFINE1(personality, unsigned int, personality)`.
const PERSONALITY: Arg = Arg {
    index: 0,
    decl: "unsigned int personality",
};
/// The `umode_t mode` argument at `index`: `chmod`, `creat` (1); `fchmod` (1); `fchmodat`,
/// `fchmodat2`, `open`, `mknodat` (2); `openat` (3); `mknod` (1).
const fn mode(index: u8) -> Arg {
    Arg {
        index,
        decl: "umode_t mode",
    }
}
/// `S_ISUID | S_ISGID`: a file in a host path (the workdir, a read-write share) with either
/// bit would run as the workload's ids for any host user who executes it.
const SET_ID: u64 = (libc::S_ISUID | libc::S_ISGID) as u64;
/// `SYSCALL_DEFINE1(unshare, unsigned long, unshare_flags)`.
const UNSHARE_FLAGS: Arg = Arg {
    index: 0,
    decl: "unsigned long unshare_flags",
};
/// `SYSCALL_DEFINE5(clone, unsigned long, clone_flags, ..)` on x86_64 (the kernel then uses
/// the low 32 bits; a bit test answers the same on either width).
const CLONE_FLAGS: Arg = Arg {
    index: 0,
    decl: "unsigned long clone_flags",
};

macro_rules! cond {
    ($arg:ident == $value:ident) => {
        Cond {
            arg: $arg,
            op: Op::Eq,
            value: $value,
            value_name: stringify!($value),
        }
    };
    ($arg:ident != $value:ident) => {
        Cond {
            arg: $arg,
            op: Op::Ne,
            value: $value,
            value_name: stringify!($value),
        }
    };
    ($arg:ident & $mask:ident == $value:ident) => {
        Cond {
            arg: $arg,
            op: Op::MaskedEq($mask),
            value: $value,
            value_name: stringify!($value),
        }
    };
}

/// Calls whose mode argument at `index` has a set-ID bit.
const fn set_id(index: u8) -> Match {
    Match::AnyBit {
        arg: mode(index),
        mask: SET_ID,
        names: "S_ISUID|S_ISGID",
    }
}

macro_rules! deny {
    ($name:ident, $matches:expr, $reason:literal) => {
        Denied {
            name: stringify!($name),
            nr: libc::$name as i64,
            matches: $matches,
            reason: $reason,
        }
    };
    (local $name:ident, $matches:expr, $reason:literal) => {
        Denied {
            name: stringify!($name),
            nr: $name,
            matches: $matches,
            reason: $reason,
        }
    };
}

/// The reviewed table: each denied call, what of it is denied, and why.
pub const DENIED: &[Denied] = &[
    // Other processes: debugging, their memory, their descriptors.
    deny!(
        SYS_ptrace,
        Match::Always,
        "inspecting or controlling other processes"
    ),
    deny!(
        SYS_process_vm_readv,
        Match::Always,
        "reading another process's memory"
    ),
    deny!(
        SYS_process_vm_writev,
        Match::Always,
        "writing another process's memory"
    ),
    deny!(
        SYS_kcmp,
        Match::Always,
        "comparing other processes' kernel objects (an ordering oracle on kernel pointers)"
    ),
    deny!(
        SYS_pidfd_getfd,
        Match::Always,
        "copying a file descriptor out of another process"
    ),
    deny!(
        SYS_process_madvise,
        Match::Always,
        "advising the kernel about another process's memory"
    ),
    deny!(
        SYS_migrate_pages,
        Match::Always,
        "moving another process's memory between NUMA nodes"
    ),
    deny!(
        SYS_move_pages,
        Match::Always,
        "moving (another process's) pages between NUMA nodes"
    ),
    // Kernel attack surface with a long CVE record.
    deny!(
        SYS_bpf,
        Match::Always,
        "loading eBPF programs into the kernel"
    ),
    deny!(
        SYS_perf_event_open,
        Match::Always,
        "performance counters leak kernel and co-tenant data"
    ),
    deny!(
        SYS_userfaultfd,
        Match::Always,
        "a common exploit primitive for kernel races"
    ),
    deny!(
        SYS_io_uring_setup,
        Match::Always,
        "io_uring bypasses seccomp for the calls it performs"
    ),
    deny!(
        SYS_io_uring_enter,
        Match::Always,
        "io_uring bypasses seccomp for the calls it performs"
    ),
    deny!(
        SYS_io_uring_register,
        Match::Always,
        "io_uring bypasses seccomp for the calls it performs"
    ),
    deny!(
        SYS_memfd_secret,
        Match::Always,
        "each secret page is taken out of the kernel's direct map, splitting it for the whole \
         machine"
    ),
    deny!(
        SYS_fanotify_init,
        Match::Always,
        "filesystem-wide event monitoring: little-used kernel surface"
    ),
    // Kernel keyrings are not namespaced.
    deny!(
        SYS_keyctl,
        Match::Always,
        "kernel keyrings are shared with the host"
    ),
    deny!(
        SYS_add_key,
        Match::Always,
        "kernel keyrings are shared with the host"
    ),
    deny!(
        SYS_request_key,
        Match::Always,
        "kernel keyrings are shared with the host"
    ),
    // Replacing or extending the kernel.
    deny!(SYS_kexec_load, Match::Always, "booting another kernel"),
    deny!(SYS_kexec_file_load, Match::Always, "booting another kernel"),
    deny!(SYS_init_module, Match::Always, "loading kernel modules"),
    deny!(SYS_finit_module, Match::Always, "loading kernel modules"),
    deny!(SYS_delete_module, Match::Always, "unloading kernel modules"),
    deny!(
        SYS_uselib,
        Match::Always,
        "loading a library the a.out way (gone from current kernels)"
    ),
    // Changing the filesystem view the policy was computed for.
    deny!(
        SYS_mount,
        Match::Always,
        "mounting changes the filesystem view"
    ),
    deny!(
        SYS_umount2,
        Match::Always,
        "unmounting could reveal what a mount hides"
    ),
    deny!(
        SYS_pivot_root,
        Match::Always,
        "changing the root filesystem"
    ),
    deny!(SYS_chroot, Match::Always, "changing the root directory"),
    deny!(SYS_open_tree, Match::Always, "new mount API"),
    deny!(local SYS_open_tree_attr, Match::Always, "new mount API"),
    deny!(SYS_move_mount, Match::Always, "new mount API"),
    deny!(SYS_fsopen, Match::Always, "new mount API"),
    deny!(SYS_fsconfig, Match::Always, "new mount API"),
    deny!(SYS_fsmount, Match::Always, "new mount API"),
    deny!(SYS_fspick, Match::Always, "new mount API"),
    deny!(SYS_mount_setattr, Match::Always, "new mount API"),
    // Leaving or creating namespaces.
    deny!(SYS_setns, Match::Always, "joining another namespace"),
    deny!(
        SYS_unshare,
        Match::AnyBit {
            arg: UNSHARE_FLAGS,
            mask: NS_FLAGS | CLONE_NEWTIME,
            names: "CLONE_NEW*"
        },
        "new namespaces (user namespaces grant capabilities)"
    ),
    deny!(
        SYS_clone,
        Match::AnyBit {
            arg: CLONE_FLAGS,
            mask: NS_FLAGS,
            names: "CLONE_NEW*"
        },
        "new namespaces (user namespaces grant capabilities)"
    ),
    // Whole-machine state.
    deny!(SYS_reboot, Match::Always, "rebooting the machine"),
    deny!(SYS_swapon, Match::Always, "changing the machine's swap"),
    deny!(SYS_swapoff, Match::Always, "changing the machine's swap"),
    deny!(
        SYS_clock_settime,
        Match::Always,
        "setting the machine's clock"
    ),
    deny!(
        SYS_clock_adjtime,
        Match::Always,
        "adjusting the machine's clock"
    ),
    deny!(
        SYS_settimeofday,
        Match::Always,
        "setting the machine's clock"
    ),
    deny!(SYS_adjtimex, Match::Always, "adjusting the machine's clock"),
    deny!(
        SYS_acct,
        Match::Always,
        "process accounting is machine-wide"
    ),
    deny!(SYS_quotactl, Match::Always, "disk quotas are machine-wide"),
    deny!(
        SYS_quotactl_fd,
        Match::Always,
        "disk quotas are machine-wide"
    ),
    deny!(SYS_syslog, Match::Always, "the kernel log leaks host data"),
    deny!(SYS_vhangup, Match::Always, "hanging up terminals"),
    deny!(SYS_iopl, Match::Always, "raw I/O port access"),
    deny!(SYS_ioperm, Match::Always, "raw I/O port access"),
    // Set-user-ID and set-group-ID files: the workload's writes land in host paths, where such
    // a file would lend the workload's ids to whoever runs it (creating one with the bits set
    // included: the kernel keeps them from `open`'s and `mknod`'s mode).
    deny!(
        SYS_chmod,
        set_id(1),
        "making a set-user-ID or set-group-ID file"
    ),
    deny!(
        SYS_fchmod,
        set_id(1),
        "making a set-user-ID or set-group-ID file"
    ),
    deny!(
        SYS_fchmodat,
        set_id(2),
        "making a set-user-ID or set-group-ID file"
    ),
    deny!(
        SYS_fchmodat2,
        set_id(2),
        "making a set-user-ID or set-group-ID file"
    ),
    deny!(
        SYS_creat,
        set_id(1),
        "creating a set-user-ID or set-group-ID file"
    ),
    deny!(
        SYS_open,
        set_id(2),
        "creating a set-user-ID or set-group-ID file"
    ),
    deny!(
        SYS_openat,
        set_id(3),
        "creating a set-user-ID or set-group-ID file"
    ),
    deny!(
        SYS_mknod,
        set_id(1),
        "creating a set-user-ID or set-group-ID file"
    ),
    deny!(
        SYS_mknodat,
        set_id(2),
        "creating a set-user-ID or set-group-ID file"
    ),
    deny!(
        SYS_openat2,
        Match::Always,
        "its mode sits behind a pointer the filter cannot read (set-ID files); libc uses openat"
    ),
    // File handles bypass path-based checks (the "shocker" escape).
    deny!(
        SYS_open_by_handle_at,
        Match::Always,
        "opening files by handle bypasses path checks"
    ),
    deny!(
        SYS_name_to_handle_at,
        Match::Always,
        "file handles leak inode identities"
    ),
    // Obsolete calls that still reach filesystems or kernel state.
    deny!(
        SYS_lookup_dcookie,
        Match::Always,
        "oprofile's path lookup by cookie (gone from current kernels)"
    ),
    deny!(
        SYS_sysfs,
        Match::Always,
        "obsolete; lists the kernel's filesystem types"
    ),
    deny!(
        SYS_ustat,
        Match::Always,
        "obsolete; filesystem statistics by device number, outside the policy's paths"
    ),
    // Execution domains.
    deny!(
        SYS_personality,
        Match::All(&[
            cond!(PERSONALITY != PER_LINUX),
            cond!(PERSONALITY != PER_QUERY)
        ]),
        "other execution domains switch off ASLR or make data executable"
    ),
    // Network access other than through the proxy's TCP path: an allowlist of families.
    deny!(
        SYS_socket,
        Match::All(&[
            cond!(FAMILY != AF_UNIX),
            cond!(FAMILY != AF_INET),
            cond!(FAMILY != AF_INET6),
            cond!(FAMILY != AF_NETLINK)
        ]),
        "families other than unix, IPv4, IPv6 and netlink (packet, vsock, alg, bluetooth, ...)"
    ),
    deny!(
        SYS_socket,
        Match::All(&[
            cond!(FAMILY == AF_NETLINK),
            cond!(PROTOCOL != NETLINK_ROUTE)
        ]),
        "netlink other than routing (audit, uevents, sock_diag, netfilter, ...)"
    ),
    deny!(
        SYS_socket,
        Match::All(&[
            cond!(FAMILY == AF_INET),
            cond!(TYPE & SOCK_TYPE_MASK == SOCK_RAW)
        ]),
        "raw IPv4 sockets forge packets"
    ),
    deny!(
        SYS_socket,
        Match::All(&[
            cond!(FAMILY == AF_INET6),
            cond!(TYPE & SOCK_TYPE_MASK == SOCK_RAW)
        ]),
        "raw IPv6 sockets forge packets"
    ),
    deny!(
        SYS_socket,
        Match::All(&[
            cond!(FAMILY == AF_INET),
            cond!(TYPE & SOCK_TYPE_MASK == SOCK_PACKET)
        ]),
        "the obsolete packet type (the kernel makes it an AF_PACKET socket)"
    ),
    deny!(
        SYS_socket,
        Match::All(&[
            cond!(FAMILY == AF_INET6),
            cond!(TYPE & SOCK_TYPE_MASK == SOCK_PACKET)
        ]),
        "the obsolete packet type (refused whatever the kernel does with it)"
    ),
    deny!(
        SYS_socket,
        Match::All(&[
            cond!(FAMILY == AF_UNIX),
            cond!(TYPE & SOCK_TYPE_MASK == SOCK_DGRAM)
        ]),
        "unix datagrams reach any pathname socket on each send, unseen by Landlock (ABI <= 7)"
    ),
    deny!(
        SYS_socket,
        Match::All(&[
            cond!(FAMILY == AF_UNIX),
            cond!(TYPE & SOCK_TYPE_MASK == SOCK_RAW)
        ]),
        "unix SOCK_RAW, which the kernel makes a datagram socket"
    ),
    deny!(
        SYS_socketpair,
        Match::All(&[cond!(FAMILY != AF_UNIX)]),
        "pairs of anything but unix sockets (e.g. TIPC)"
    ),
    deny!(
        SYS_socketpair,
        Match::All(&[
            cond!(FAMILY == AF_UNIX),
            cond!(TYPE & SOCK_TYPE_MASK == SOCK_DGRAM)
        ]),
        "a unix datagram pair can still send to any pathname socket"
    ),
    deny!(
        SYS_socketpair,
        Match::All(&[
            cond!(FAMILY == AF_UNIX),
            cond!(TYPE & SOCK_TYPE_MASK == SOCK_RAW)
        ]),
        "unix SOCK_RAW, which the kernel makes a datagram socket"
    ),
];

/// Errors compiling the table.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("compiling the seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    #[error(
        "seccomp table: {call}: argument `{decl}` has no comparison width (int, unsigned int \
         or unsigned long)"
    )]
    ArgType {
        call: &'static str,
        decl: &'static str,
    },
}

/// A compiled filter and the number of rules it holds.
///
/// A [`LaunchPlan`](super::protocol::LaunchPlan) carries it: the supervisor compiles the table
/// once ([`compiled`]), and whoever launches the workload (the process backend's helper, the vm
/// backend's guest agent) only installs it. Under TCG a compilation in the guest cost 3-4 ms of
/// every boot. On the wire the program is hex, 16 digits per instruction (`code`, `jt`, `jf`,
/// `k`, big-endian), and is checked for length when read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "WireFilter", into = "WireFilter")]
pub struct CompiledFilter {
    pub program: BpfProgram,
    pub rules: usize,
}

/// The most instructions a classic BPF program may have (linux/bpf_common.h `BPF_MAXINSNS`).
const BPF_MAXINSNS: usize = 4096;

#[derive(serde::Serialize, serde::Deserialize)]
struct WireFilter {
    rules: usize,
    bpf: String,
}

impl From<CompiledFilter> for WireFilter {
    fn from(f: CompiledFilter) -> WireFilter {
        use std::fmt::Write as _;
        let mut bpf = String::with_capacity(f.program.len() * 16);
        for i in &f.program {
            let _ = write!(bpf, "{:04x}{:02x}{:02x}{:08x}", i.code, i.jt, i.jf, i.k);
        }
        WireFilter {
            rules: f.rules,
            bpf,
        }
    }
}

impl TryFrom<WireFilter> for CompiledFilter {
    type Error = String;

    fn try_from(w: WireFilter) -> Result<CompiledFilter, String> {
        let bytes = w.bpf.as_bytes();
        if bytes.is_empty() || !bytes.len().is_multiple_of(16) || bytes.len() / 16 > BPF_MAXINSNS {
            return Err(format!(
                "seccomp program: {} hex digits, expected 16 per instruction, 1 to {BPF_MAXINSNS} \
                 instructions",
                bytes.len()
            ));
        }
        let field = |s: &[u8]| -> Result<u32, String> {
            std::str::from_utf8(s)
                .ok()
                .filter(|s| s.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .ok_or_else(|| "seccomp program: not hexadecimal".to_owned())
        };
        let mut program = Vec::with_capacity(bytes.len() / 16);
        for chunk in bytes.chunks_exact(16) {
            program.push(seccompiler::sock_filter {
                code: field(&chunk[0..4])? as u16,
                jt: field(&chunk[4..6])? as u8,
                jf: field(&chunk[6..8])? as u8,
                k: field(&chunk[8..16])?,
            });
        }
        Ok(CompiledFilter {
            program,
            rules: w.rules,
        })
    }
}

fn width(row: &Denied, arg: Arg) -> Result<SeccompCmpArgLen, SeccompError> {
    match arg.width() {
        Some(Width::Bits32) => Ok(SeccompCmpArgLen::Dword),
        Some(Width::Bits64) => Ok(SeccompCmpArgLen::Qword),
        None => Err(SeccompError::ArgType {
            call: row.name,
            decl: arg.decl,
        }),
    }
}

fn condition(row: &Denied, c: &Cond) -> Result<SeccompCondition, SeccompError> {
    let op = match c.op {
        Op::Eq => SeccompCmpOp::Eq,
        Op::Ne => SeccompCmpOp::Ne,
        Op::MaskedEq(mask) => SeccompCmpOp::MaskedEq(mask),
    };
    SeccompCondition::new(c.arg.index, width(row, c.arg)?, op, c.value)
        .map_err(SeccompError::Compile)
}

fn rules_for(row: &Denied) -> Result<Vec<SeccompRule>, SeccompError> {
    let rule =
        |conds: Vec<SeccompCondition>| SeccompRule::new(conds).map_err(SeccompError::Compile);
    Ok(match row.matches {
        Match::Always => Vec::new(),
        Match::AnyBit { arg, mask, .. } => {
            let len = width(row, arg)?;
            (0..64)
                .map(|b| 1u64 << b)
                .filter(|bit| mask & bit != 0)
                .map(|bit| {
                    SeccompCondition::new(arg.index, len.clone(), SeccompCmpOp::MaskedEq(bit), bit)
                        .map_err(SeccompError::Compile)
                        .and_then(|c| rule(vec![c]))
                })
                .collect::<Result<_, _>>()?
        }
        Match::All(conds) => vec![rule(
            conds
                .iter()
                .map(|c| condition(row, c))
                .collect::<Result<_, _>>()?,
        )?],
    })
}

/// The filter, compiled once per process: it does not depend on the policy, and under TCG a
/// compilation costs a few milliseconds of every launch.
pub fn compiled() -> Result<&'static CompiledFilter, SeccompError> {
    static FILTER: std::sync::OnceLock<CompiledFilter> = std::sync::OnceLock::new();
    if let Some(filter) = FILTER.get() {
        return Ok(filter);
    }
    let filter = compile()?;
    Ok(FILTER.get_or_init(|| filter))
}

/// Compile [`DENIED`] into a BPF program (prefix included).
pub fn compile() -> Result<CompiledFilter, SeccompError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut always: Vec<i64> = Vec::new();
    for row in DENIED {
        let rules = rules_for(row)?;
        if rules.is_empty() {
            always.push(row.nr);
        }
        map.entry(row.nr).or_default().extend(rules);
    }
    // A syscall denied unconditionally must have no conditional rules, or seccompiler would
    // only deny the conditional cases.
    for nr in always {
        map.insert(nr, Vec::new());
    }
    let filter = SeccompFilter::new(
        map,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(SeccompError::Compile)?;
    let body: BpfProgram = filter.try_into().map_err(SeccompError::Compile)?;
    let mut program = prefix();
    program.extend(body);
    Ok(CompiledFilter {
        program,
        rules: DENIED.len(),
    })
}

/// A filter that allows exactly the calls `allowed` (system call numbers) and answers every
/// other one with `unlisted` (EPERM for the jailed daemons; `SeccompAction::Log` while their
/// lists are recorded), behind the same prefix as the workload's table (non-native ABIs killed,
/// x32 refused, clone3 ENOSYS so libc falls back to clone, which must then be allowed).
pub fn compile_allowlist(
    allowed: &[i64],
    unlisted: SeccompAction,
) -> Result<CompiledFilter, SeccompError> {
    let map: BTreeMap<i64, Vec<SeccompRule>> = allowed.iter().map(|nr| (*nr, Vec::new())).collect();
    let filter = SeccompFilter::new(map, unlisted, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(SeccompError::Compile)?;
    let body: BpfProgram = filter.try_into().map_err(SeccompError::Compile)?;
    let mut program = prefix();
    program.extend(body);
    Ok(CompiledFilter {
        program,
        rules: allowed.len(),
    })
}

// Classic BPF opcodes (linux/filter.h, linux/seccomp.h).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// The hand-written prefix; it falls through to the compiled table.
fn prefix() -> BpfProgram {
    vec![
        insn(BPF_LD_W_ABS, 0, 0, OFFSET_ARCH),
        insn(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        insn(BPF_LD_W_ABS, 0, 0, OFFSET_NR),
        insn(BPF_JGE_K, 0, 1, X32_SYSCALL_BIT),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        insn(BPF_JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ]
}

const SECCOMP_RET_USER_NOTIF: u32 = 0x7fc0_0000;

/// The calls a workload's filter turns into user notifications, right after the architecture
/// check: `connect` on both backends (the process backend's supervisor carries it out, see
/// `unix_connect`; the guest agent records it), and in the guest `execve`/`execveat`
/// (recorded, then let through; see [`crate::lineage`]; the host learns execs from process
/// events instead).
pub const NOTIFIED: [(i64, &str); 3] = [
    (
        libc::SYS_connect,
        "connect: who opens each socket, carried out or recorded by the supervisor (both backends)",
    ),
    (
        libc::SYS_execve,
        "execve: recorded so an exec after a fork does not lend its program (vm guest)",
    ),
    (libc::SYS_execveat, "execveat: as execve (vm guest)"),
];

/// `filter` with `connect` answered by a user notification (the process backend).
pub fn with_connect_notified(filter: &CompiledFilter) -> CompiledFilter {
    with_notified(filter, &NOTIFIED[..1])
}

/// `filter` with every [`NOTIFIED`] call answered by a user notification (the vm guest).
pub fn with_lineage_notified(filter: &CompiledFilter) -> CompiledFilter {
    with_notified(filter, &NOTIFIED)
}

/// `filter` with `calls` answered by a user notification: one comparison each right after the
/// architecture check, so every other row, x32 and clone3 included, sees a call only if it is
/// none of them. Each counts as one more row.
fn with_notified(filter: &CompiledFilter, calls: &[(i64, &str)]) -> CompiledFilter {
    // The first three instructions of `prefix`: load the architecture, accept x86_64, kill.
    let arch_check = 3;
    let n = calls.len();
    let mut program = Vec::with_capacity(filter.program.len() + n + 2);
    program.extend_from_slice(&filter.program[..arch_check]);
    program.push(insn(BPF_LD_W_ABS, 0, 0, OFFSET_NR));
    for (i, (nr, _)) in calls.iter().enumerate() {
        // Equal: jump to the RET below; the last one's "not equal" skips over it.
        let to_ret = (n - 1 - i) as u8;
        let jf = if i == n - 1 { 1 } else { 0 };
        program.push(insn(BPF_JEQ_K, to_ret, jf, *nr as u32));
    }
    program.push(insn(BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF));
    program.extend_from_slice(&filter.program[arch_check..]);
    CompiledFilter {
        program,
        rules: filter.rules + n,
    }
}

/// Install `filter` on the calling thread. no_new_privs must already be set.
pub fn apply(filter: &CompiledFilter) -> Result<(), seccompiler::Error> {
    seccompiler::apply_filter(&filter.program)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn notified_calls_come_right_after_the_architecture_check() {
        let filter = compile().expect("table compiles");
        let connect = with_connect_notified(&filter);
        assert_eq!(
            (
                connect.program[4].k,
                connect.program[4].jt,
                connect.program[4].jf,
                connect.program[5].k
            ),
            (libc::SYS_connect as u32, 0, 1, SECCOMP_RET_USER_NOTIF)
        );
        assert_eq!(&connect.program[6..], &filter.program[3..]);
        assert_eq!(connect.rules, filter.rules + 1);
        let out = with_lineage_notified(&filter);
        let p = &out.program;
        assert_eq!(p.len(), filter.program.len() + 5);
        assert_eq!(&p[..3], &filter.program[..3]);
        assert_eq!(
            (p[0].k, p[1].k, p[2].k),
            (OFFSET_ARCH, AUDIT_ARCH_X86_64, SECCOMP_RET_KILL_PROCESS),
            "the architecture check comes first"
        );
        assert_eq!((p[3].code, p[3].k), (BPF_LD_W_ABS, OFFSET_NR));
        let jumps: Vec<(u32, u8, u8)> = p[4..7].iter().map(|i| (i.k, i.jt, i.jf)).collect();
        assert_eq!(
            jumps,
            vec![
                (libc::SYS_connect as u32, 2, 0),
                (libc::SYS_execve as u32, 1, 0),
                (libc::SYS_execveat as u32, 0, 1),
            ]
        );
        assert_eq!(p[7].k, SECCOMP_RET_USER_NOTIF);
        assert_eq!(&p[8..], &filter.program[3..]);
        assert_eq!(out.rules, filter.rules + 3);
    }

    #[test]
    fn table_compiles_and_covers_the_required_calls() {
        let filter = compile().expect("table compiles");
        assert!(filter.program.len() > prefix().len());
        let required = [
            "SYS_ptrace",
            "SYS_process_vm_readv",
            "SYS_process_vm_writev",
            "SYS_kcmp",
            "SYS_pidfd_getfd",
            "SYS_bpf",
            "SYS_perf_event_open",
            "SYS_userfaultfd",
            "SYS_keyctl",
            "SYS_add_key",
            "SYS_request_key",
            "SYS_kexec_load",
            "SYS_kexec_file_load",
            "SYS_init_module",
            "SYS_finit_module",
            "SYS_delete_module",
            "SYS_uselib",
            "SYS_mount",
            "SYS_open_tree",
            "SYS_open_tree_attr",
            "SYS_move_mount",
            "SYS_fsopen",
            "SYS_fsconfig",
            "SYS_fsmount",
            "SYS_fspick",
            "SYS_mount_setattr",
            "SYS_umount2",
            "SYS_pivot_root",
            "SYS_setns",
            "SYS_unshare",
            "SYS_clone",
            "SYS_io_uring_setup",
            "SYS_io_uring_enter",
            "SYS_io_uring_register",
            "SYS_reboot",
            "SYS_swapon",
            "SYS_swapoff",
            "SYS_clock_settime",
            "SYS_settimeofday",
            "SYS_adjtimex",
            "SYS_acct",
            "SYS_quotactl",
            "SYS_open_by_handle_at",
            "SYS_iopl",
            "SYS_ioperm",
            "SYS_personality",
            "SYS_socket",
            "SYS_socketpair",
        ];
        let missing: Vec<&str> = required
            .iter()
            .copied()
            .filter(|name| !DENIED.iter().any(|row| row.name == *name))
            .collect();
        assert_eq!(missing, Vec::<&str>::new());
    }

    #[test]
    fn the_filter_travels_as_hex_and_comes_back_whole() {
        let filter = compile().expect("table compiles");
        let json = serde_json::to_string(&filter).expect("serialized");
        let back: CompiledFilter = serde_json::from_str(&json).expect("deserialized");
        assert_eq!(back, filter);
        for bad in [
            r#"{"rules":1,"bpf":""}"#,
            r#"{"rules":1,"bpf":"0020000000000004ff"}"#,
            r#"{"rules":1,"bpf":"00200000000000g4"}"#,
            r#"{"rules":1,"bpf":"+020000000000004"}"#,
        ] {
            assert!(
                serde_json::from_str::<CompiledFilter>(bad).is_err(),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn every_row_has_a_reason() {
        let without: Vec<&str> = DENIED
            .iter()
            .filter(|row| row.reason.trim().is_empty())
            .map(|row| row.name)
            .collect();
        assert_eq!(without, Vec::<&str>::new());
    }

    /// Each compared argument, the kernel's declaration of it and the width that follows: 32
    /// bits for `int`/`unsigned int`, 64 for `unsigned long`.
    #[test]
    fn every_compared_argument_has_the_width_of_its_declaration() {
        let got: Vec<(&str, &str, Option<Width>)> = DENIED
            .iter()
            .flat_map(|row| {
                row.matches
                    .args()
                    .into_iter()
                    .map(move |a| (row.name, a.decl, a.width()))
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let b32 = Some(Width::Bits32);
        let b64 = Some(Width::Bits64);
        assert_eq!(
            got,
            vec![
                ("SYS_chmod", "umode_t mode", b32),
                ("SYS_clone", "unsigned long clone_flags", b64),
                ("SYS_creat", "umode_t mode", b32),
                ("SYS_fchmod", "umode_t mode", b32),
                ("SYS_fchmodat", "umode_t mode", b32),
                ("SYS_fchmodat2", "umode_t mode", b32),
                ("SYS_mknod", "umode_t mode", b32),
                ("SYS_mknodat", "umode_t mode", b32),
                ("SYS_open", "umode_t mode", b32),
                ("SYS_openat", "umode_t mode", b32),
                ("SYS_personality", "unsigned int personality", b32),
                ("SYS_socket", "int family", b32),
                ("SYS_socket", "int protocol", b32),
                ("SYS_socket", "int type", b32),
                ("SYS_socketpair", "int family", b32),
                ("SYS_socketpair", "int type", b32),
                ("SYS_unshare", "unsigned long unshare_flags", b64),
            ]
        );
    }

    /// A `umode_t` keeps 16 bits in the kernel: a row may only test bits below 16 of one (on
    /// 32 bits that answers as the kernel does, dirty high bits or not).
    #[test]
    fn every_mode_row_tests_bits_the_kernel_keeps() {
        let mut rows = 0;
        for row in DENIED {
            for arg in row.matches.args() {
                if arg.decl.starts_with("umode_t ") {
                    rows += 1;
                    match row.matches {
                        Match::AnyBit { mask, .. } => assert_eq!(mask & !0xffff, 0, "{}", row.name),
                        other => panic!("{}: a mode compared by {other:?}", row.name),
                    }
                }
            }
        }
        assert_eq!(rows, 9);
        let chmod = DENIED
            .iter()
            .find(|r| r.name == "SYS_fchmodat")
            .expect("row");
        let dirty = 0xdead_0000_0000_0000u64 | 0xffff_0000;
        assert!(chmod.matches.hits(&[0, 0, 0o4755, 0, 0, 0]));
        assert!(chmod.matches.hits(&[0, 0, dirty | 0o2755, 0, 0, 0]));
        assert!(!chmod.matches.hits(&[0, 0, 0o755, 0, 0, 0]));
        assert!(
            !chmod.matches.hits(&[0, 0, 0o1777, 0, 0, 0]),
            "the sticky bit is fine"
        );
    }

    #[test]
    fn an_argument_type_without_a_width_is_refused() {
        let row = Denied {
            name: "SYS_write",
            nr: libc::SYS_write,
            matches: Match::All(&[Cond {
                arg: Arg {
                    index: 2,
                    decl: "size_t count",
                },
                op: Op::Eq,
                value: 0,
                value_name: "0",
            }]),
            reason: "test",
        };
        let err = rules_for(&row).expect_err("size_t has no width");
        assert_eq!(
            err.to_string(),
            "seccomp table: SYS_write: argument `size_t count` has no comparison width (int, \
             unsigned int or unsigned long)"
        );
    }

    /// The rows an `int` argument with dirty high bits hits are the rows its low 32 bits hit.
    #[test]
    fn high_bits_of_an_int_change_no_answer() {
        let high = 1u64 << 32;
        let socket = |args: [u64; 6]| -> Vec<&str> {
            DENIED
                .iter()
                .filter(|r| r.nr == libc::SYS_socket && r.matches.hits(&args))
                .map(|r| r.reason)
                .collect()
        };
        let vsock = libc::AF_VSOCK as u64;
        let stream = libc::SOCK_STREAM as u64;
        assert_eq!(
            socket([high | vsock, stream, 0, 0, 0, 0]),
            socket([vsock, stream, 0, 0, 0, 0])
        );
        assert_eq!(socket([high | vsock, stream, 0, 0, 0, 0]).len(), 1);
        assert_eq!(
            socket([high | AF_UNIX, stream, 0, 0, 0, 0]),
            Vec::<&str>::new()
        );
        assert_eq!(
            socket([AF_NETLINK, SOCK_RAW, high | NETLINK_ROUTE, 0, 0, 0]),
            Vec::<&str>::new()
        );
        assert_eq!(
            socket([AF_NETLINK, SOCK_RAW, high | 9, 0, 0, 0]).len(),
            1,
            "NETLINK_AUDIT with high bits"
        );
    }

    #[test]
    fn user_namespace_flag_is_covered_for_clone_and_unshare() {
        for name in ["SYS_clone", "SYS_unshare"] {
            let row = DENIED.iter().find(|r| r.name == name).expect("row present");
            match row.matches {
                Match::AnyBit { mask, .. } => {
                    assert_eq!(
                        mask & libc::CLONE_NEWUSER as u64,
                        libc::CLONE_NEWUSER as u64
                    )
                }
                other => panic!("{name}: unexpected match {other:?}"),
            }
        }
    }

    #[test]
    fn rows_print_as_their_conditions() {
        let printed: Vec<String> = DENIED
            .iter()
            .filter(|r| matches!(r.name, "SYS_socketpair" | "SYS_unshare" | "SYS_personality"))
            .map(|r| format!("{} {}", r.name, r.matches))
            .collect();
        assert_eq!(
            printed,
            vec![
                "SYS_unshare unshare_flags & (CLONE_NEW* = 0x7e020080)".to_owned(),
                "SYS_personality personality != PER_LINUX && personality != PER_QUERY".to_owned(),
                "SYS_socketpair family != AF_UNIX".to_owned(),
                "SYS_socketpair family == AF_UNIX && (type & 0xf) == SOCK_DGRAM".to_owned(),
                "SYS_socketpair family == AF_UNIX && (type & 0xf) == SOCK_RAW".to_owned(),
            ]
        );
    }
}

//! How the table differs from two peers, one row per difference, for `openshell-sandbox
//! seccomp` and for review:
//! - Docker's default profile (moby/profiles `seccomp/default_linux.go`, as read in 2026):
//!   an allowlist, seen from a container with Docker's default capabilities on x86_64;
//! - OpenShell's sandbox filter (NVIDIA/OpenShell
//!   `crates/openshell-sandbox/src/sandbox/linux/seccomp.rs`, proxy network mode, with the
//!   supervisor's prelude filter that its workload inherits): a denylist like ours.
//!
//! Calls all three treat alike have no row. A unit test holds the `ours` column to
//! [`super::DENIED`].

use std::fmt;

/// What one filter does with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stance {
    Allowed,
    Denied,
    /// Some forms allowed, some denied (or the call's outcome is not a plain allow/deny).
    Partly(&'static str),
}

impl fmt::Display for Stance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stance::Allowed => f.write_str("allowed"),
            Stance::Denied => f.write_str("denied"),
            Stance::Partly(how) => f.write_str(how),
        }
    }
}

/// One difference: the calls it covers and what each filter does with them.
#[derive(Debug, Clone, Copy)]
pub struct Difference {
    /// System call names, or an ABI (a name with a space).
    pub calls: &'static [&'static str],
    pub docker: Stance,
    pub openshell: Stance,
    pub ours: Stance,
    pub why: &'static str,
}

use Stance::{Allowed, Denied, Partly};

/// Every difference between our table and either peer.
pub const DIFFERENCES: &[Difference] = &[
    Difference {
        calls: &[
            "chmod",
            "fchmod",
            "fchmodat",
            "fchmodat2",
            "creat",
            "open",
            "openat",
            "mknod",
            "mknodat",
        ],
        docker: Allowed,
        openshell: Allowed,
        ours: Partly("a mode with S_ISUID or S_ISGID denied"),
        why: "the workload's files land in host paths, where a set-ID file would run as the \
              workload's ids for any host user (the escape suite found one on both backends)",
    },
    Difference {
        calls: &["memfd_secret"],
        docker: Allowed,
        openshell: Allowed,
        ours: Denied,
        why: "secret memory is removed from the kernel's direct map, which splits it and slows \
              the whole machine (why the kernel first kept it off by default); no workload \
              needs it (the escape suite's probe held it on the process backend)",
    },
    Difference {
        calls: &["openat2"],
        docker: Allowed,
        openshell: Allowed,
        ours: Denied,
        why: "its mode sits behind a pointer, so the set-ID rows above cannot see it; libc's \
              open and openat do not use it",
    },
    Difference {
        calls: &["ptrace", "process_vm_readv", "process_vm_writev"],
        docker: Allowed,
        openshell: Denied,
        ours: Denied,
        why: "a workload has no business reading or steering other processes",
    },
    Difference {
        calls: &["kcmp"],
        docker: Denied,
        openshell: Allowed,
        ours: Denied,
        why: "compares two processes' kernel objects: an ordering oracle on kernel pointers, \
              used only by checkpoint/restore",
    },
    Difference {
        calls: &["process_madvise", "migrate_pages", "move_pages"],
        docker: Denied,
        openshell: Allowed,
        ours: Denied,
        why: "act on another process's memory, like process_vm_*; the query form of \
              move_pages (libnuma) fails softly",
    },
    Difference {
        calls: &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
        docker: Denied,
        openshell: Allowed,
        ours: Allowed,
        why: "NUMA placement of the caller's own memory (libnuma, hwloc, OpenMP and ML \
              runtimes); the memory cgroup bounds it",
    },
    Difference {
        calls: &["pidfd_open", "pidfd_send_signal"],
        docker: Allowed,
        openshell: Denied,
        ours: Allowed,
        why: "race-free waiting on and signalling of the workload's own processes (Python's \
              subprocess uses them); the pid namespace and kill's permission rules apply",
    },
    Difference {
        calls: &["memfd_create"],
        docker: Allowed,
        openshell: Denied,
        ours: Allowed,
        why: "anonymous memory files (browsers, Wayland, JITs, Python); executing one gains \
              nothing over executing a file in the policy's read_write paths",
    },
    Difference {
        calls: &["execveat"],
        docker: Allowed,
        openshell: Partly("AT_EMPTY_PATH denied"),
        ours: Allowed,
        why: "fexecve of an open file: as memfd_create",
    },
    Difference {
        calls: &["seccomp"],
        docker: Allowed,
        openshell: Partly("SECCOMP_SET_MODE_FILTER denied"),
        ours: Allowed,
        why: "a further filter only narrows what is allowed (filters stack); browsers, \
              bubblewrap and nested agent sandboxes install their own",
    },
    Difference {
        calls: &["io_uring_enter", "io_uring_register"],
        docker: Denied,
        openshell: Allowed,
        ours: Denied,
        why: "without io_uring_setup no ring can be made, but a ring passed in would still \
              run calls seccomp never sees: all three closed",
    },
    Difference {
        calls: &["fanotify_init"],
        docker: Denied,
        openshell: Allowed,
        ours: Denied,
        why: "event monitoring for antivirus and audit daemons; the unprivileged mode (5.13) \
              is little-used kernel surface",
    },
    Difference {
        calls: &["keyctl", "add_key", "request_key"],
        docker: Denied,
        openshell: Allowed,
        ours: Denied,
        why: "kernel keyrings are not namespaced: keys and quotas are shared with the host",
    },
    Difference {
        calls: &["mount_setattr", "open_tree_attr"],
        docker: Denied,
        openshell: Allowed,
        ours: Denied,
        why: "the mount API is closed whole, its newer calls included",
    },
    Difference {
        calls: &["chroot"],
        docker: Allowed,
        openshell: Allowed,
        ours: Denied,
        why: "Docker grants CAP_SYS_CHROOT; our workload has no capabilities and no use for it",
    },
    Difference {
        calls: &["unshare"],
        docker: Denied,
        openshell: Partly("CLONE_NEWUSER denied"),
        ours: Partly("any CLONE_NEW* flag denied"),
        why: "every namespace is the sandbox's business; unsharing files or fs state stays \
              possible",
    },
    Difference {
        calls: &["clone"],
        docker: Partly("CLONE_NEW* flags denied"),
        openshell: Partly("CLONE_NEWUSER denied"),
        ours: Partly("CLONE_NEW* flags denied"),
        why: "as unshare",
    },
    Difference {
        calls: &[
            "reboot",
            "swapon",
            "swapoff",
            "clock_settime",
            "settimeofday",
            "acct",
            "quotactl",
            "quotactl_fd",
            "syslog",
            "vhangup",
            "iopl",
            "ioperm",
        ],
        docker: Denied,
        openshell: Allowed,
        ours: Denied,
        why: "machine-wide state guarded only by a capability: closed here too, so one leaked \
              capability is not enough",
    },
    Difference {
        calls: &["adjtimex", "clock_adjtime"],
        docker: Allowed,
        openshell: Allowed,
        ours: Denied,
        why: "reading the clock discipline is rare (NTP tools); the write side is guarded \
              only by CAP_SYS_TIME",
    },
    Difference {
        calls: &["open_by_handle_at"],
        docker: Denied,
        openshell: Allowed,
        ours: Denied,
        why: "opens any file by handle, past path-based checks (Landlock): the shocker escape",
    },
    Difference {
        calls: &["name_to_handle_at"],
        docker: Allowed,
        openshell: Allowed,
        ours: Denied,
        why: "handles serve only open_by_handle_at, and they leak inode and mount identities",
    },
    Difference {
        calls: &["uselib", "lookup_dcookie"],
        docker: Denied,
        openshell: Allowed,
        ours: Denied,
        why: "gone from current kernels (ENOSYS); denied so an older host kernel's \
              implementation stays out of reach",
    },
    Difference {
        calls: &["sysfs", "ustat"],
        docker: Denied,
        openshell: Allowed,
        ours: Denied,
        why: "obsolete; the kernel's filesystem types, and statistics of any mounted \
              filesystem by device number, outside the policy's paths",
    },
    Difference {
        calls: &["setdomainname", "sethostname"],
        docker: Denied,
        openshell: Allowed,
        ours: Allowed,
        why: "the sandbox has its own UTS namespace (process) or kernel (vm), and without \
              CAP_SYS_ADMIN the kernel refuses",
    },
    Difference {
        calls: &["lsm_get_self_attr", "lsm_set_self_attr", "lsm_list_modules"],
        docker: Denied,
        openshell: Allowed,
        ours: Allowed,
        why: "the caller's own LSM attributes, as /proc/self/attr; each LSM rules on a change",
    },
    Difference {
        calls: &[
            "_sysctl",
            "create_module",
            "get_kernel_syms",
            "query_module",
            "nfsservctl",
            "getpmsg",
            "putpmsg",
            "afs_syscall",
            "tuxcall",
            "security",
            "vserver",
        ],
        docker: Denied,
        openshell: Allowed,
        ours: Allowed,
        why: "no implementation in any kernel with Landlock (ENOSYS): nothing to close",
    },
    Difference {
        calls: &["personality"],
        docker: Partly("0, PER_LINUX32, UNAME26, both, and the query allowed"),
        openshell: Allowed,
        ours: Partly("only PER_LINUX (0) and the query 0xffffffff allowed"),
        why: "other domains switch off ASLR (ADDR_NO_RANDOMIZE), make data executable \
              (READ_IMPLIES_EXEC) or fake the kernel version",
    },
    Difference {
        calls: &["socket"],
        docker: Partly(
            "all families but AF_ALG, AF_VSOCK and removed ones; raw and packet sockets \
             with its default CAP_NET_RAW",
        ),
        openshell: Partly("AF_PACKET, AF_BLUETOOTH, AF_VSOCK, AF_NETLINK denied"),
        ours: Partly(
            "only AF_UNIX (not datagram), AF_INET/AF_INET6 (not raw or SOCK_PACKET), \
             AF_NETLINK (NETLINK_ROUTE)",
        ),
        why: "an allowlist stays closed for families a kernel adds; netlink route serves \
              getifaddrs and getaddrinfo; unix datagrams reach any pathname socket",
    },
    Difference {
        calls: &["socketpair"],
        docker: Allowed,
        openshell: Allowed,
        ours: Partly("AF_UNIX stream and seqpacket only"),
        why: "a datagram pair can still send to any pathname socket; other families (TIPC) \
              are kernel surface",
    },
    Difference {
        calls: &["i386 ABI (int 0x80)"],
        docker: Partly("allowed, through the same list"),
        openshell: Partly("process killed (seccompiler's architecture check)"),
        ours: Partly("process killed"),
        why: "a second table the rows would have to cover; the vm guest kernel has no i386 \
              ABI at all",
    },
    Difference {
        calls: &["x32 ABI (number | 0x40000000)"],
        docker: Partly("allowed, through the same list"),
        openshell: Partly("not filtered: its rules name x86_64 numbers only"),
        ours: Partly("refused (EPERM)"),
        why: "x32 numbers reach the same kernel functions without matching a row",
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    /// What the table does with a call, in the comparison's terms.
    fn table_stance(call: &str) -> &'static str {
        let name = format!("SYS_{call}");
        let rows: Vec<_> = super::super::DENIED
            .iter()
            .filter(|r| r.name == name)
            .collect();
        if rows.is_empty() {
            "allowed"
        } else if rows
            .iter()
            .any(|r| matches!(r.matches, super::super::Match::Always))
        {
            "denied"
        } else {
            "partly"
        }
    }

    fn kind(s: Stance) -> &'static str {
        match s {
            Allowed => "allowed",
            Denied => "denied",
            Partly(_) => "partly",
        }
    }

    #[test]
    fn the_ours_column_is_the_table() {
        let wrong: Vec<(&str, &str, &str)> = DIFFERENCES
            .iter()
            .flat_map(|d| d.calls.iter().map(move |c| (*c, kind(d.ours))))
            .filter(|(call, _)| !call.contains(' '))
            .map(|(call, ours)| (call, ours, table_stance(call)))
            .filter(|(_, ours, table)| ours != table)
            .collect();
        assert_eq!(wrong, Vec::<(&str, &str, &str)>::new());
    }

    #[test]
    fn every_row_is_a_difference() {
        let same: Vec<&[&str]> = DIFFERENCES
            .iter()
            .filter(|d| d.ours == d.docker && d.ours == d.openshell)
            .map(|d| d.calls)
            .collect();
        assert_eq!(same, Vec::<&[&str]>::new());
    }

    #[test]
    fn every_call_has_one_row() {
        let mut calls: Vec<&str> = DIFFERENCES
            .iter()
            .flat_map(|d| d.calls.iter().copied())
            .collect();
        let all = calls.len();
        calls.sort_unstable();
        calls.dedup();
        assert_eq!(calls.len(), all);
    }
}

//! The workload's seccomp filter, as one reviewed table.
//!
//! Everything not in [`DENIED`] is allowed: the filter closes kernel attack surface and the
//! escape routes a sandboxed agent has no business using. Each row says why. The table is
//! compiled with seccompiler; a short hand-written prefix runs first and
//! - kills any process using a non-native ABI (i386 `int 0x80`),
//! - refuses x32 system calls (numbers with bit 30 set), which would otherwise bypass the table,
//! - answers `clone3` with ENOSYS so libc falls back to `clone`, whose flags the table can see.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a denied call matches.
#[derive(Debug, Clone, Copy)]
pub enum Match {
    /// Every call.
    Always,
    /// Calls whose argument `arg` has any of the bits in `mask` set (one rule per bit).
    AnyBit { arg: u8, mask: u64 },
    /// `socket(domain, ..)` for this domain.
    Domain(u64),
    /// `socket(domain, type, ..)` for this domain and socket type (flags masked off).
    DomainType(u64, u64),
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Denied {
    pub name: &'static str,
    pub nr: i64,
    pub matches: Match,
    pub reason: &'static str,
}

const NS_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64
    | 0x80; // CLONE_NEWTIME

/// The obsolete `SOCK_PACKET` socket type (linux/socket.h).
const SOCK_PACKET: u64 = 10;
const AF_INET: u64 = libc::AF_INET as u64;
const AF_INET6: u64 = libc::AF_INET6 as u64;

macro_rules! deny {
    ($name:ident, $matches:expr, $reason:literal) => {
        Denied {
            name: stringify!($name),
            nr: libc::$name as i64,
            matches: $matches,
            reason: $reason,
        }
    };
}

/// The reviewed table: each denied call, what of it is denied, and why.
pub const DENIED: &[Denied] = &[
    // Debugging other processes and reading their memory.
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
        "probing other processes' kernel objects"
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
            arg: 0,
            mask: NS_FLAGS
        },
        "new namespaces (user namespaces grant capabilities)"
    ),
    deny!(
        SYS_clone,
        Match::AnyBit {
            arg: 0,
            mask: NS_FLAGS
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
    // Network access other than through the proxy's TCP path.
    deny!(
        SYS_socket,
        Match::Domain(libc::AF_PACKET as u64),
        "packet sockets see and forge raw frames"
    ),
    deny!(
        SYS_socket,
        Match::Domain(libc::AF_VSOCK as u64),
        "vsock reaches the hypervisor host"
    ),
    deny!(
        SYS_socket,
        Match::DomainType(AF_INET, libc::SOCK_RAW as u64),
        "raw IPv4 sockets forge packets"
    ),
    deny!(
        SYS_socket,
        Match::DomainType(AF_INET6, libc::SOCK_RAW as u64),
        "raw IPv6 sockets forge packets"
    ),
    deny!(
        SYS_socket,
        Match::DomainType(AF_INET, SOCK_PACKET),
        "obsolete packet sockets"
    ),
];

/// Errors compiling the table.
#[derive(Debug, thiserror::Error)]
#[error("compiling the seccomp filter")]
pub struct SeccompError(#[source] seccompiler::BackendError);

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

fn condition(arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).map_err(SeccompError)
}

fn rules_for(m: Match) -> Result<Vec<SeccompRule>, SeccompError> {
    let rule = |conds: Vec<SeccompCondition>| SeccompRule::new(conds).map_err(SeccompError);
    Ok(match m {
        Match::Always => Vec::new(),
        Match::AnyBit { arg, mask } => (0..64)
            .map(|b| 1u64 << b)
            .filter(|bit| mask & bit != 0)
            .map(|bit| rule(vec![condition(arg, SeccompCmpOp::MaskedEq(bit), bit)?]))
            .collect::<Result<_, _>>()?,
        Match::Domain(d) => vec![rule(vec![condition(0, SeccompCmpOp::Eq, d)?])?],
        // The low byte of `type` is the socket type; SOCK_NONBLOCK and SOCK_CLOEXEC sit above.
        Match::DomainType(d, t) => vec![rule(vec![
            condition(0, SeccompCmpOp::Eq, d)?,
            condition(1, SeccompCmpOp::MaskedEq(0xff), t)?,
        ])?],
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
        let rules = rules_for(row.matches)?;
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
    .map_err(SeccompError)?;
    let body: BpfProgram = filter.try_into().map_err(SeccompError)?;
    let mut program = prefix();
    program.extend(body);
    Ok(CompiledFilter {
        program,
        rules: DENIED.len(),
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

/// Install `filter` on the calling thread. no_new_privs must already be set.
pub fn apply(filter: &CompiledFilter) -> Result<(), seccompiler::Error> {
    seccompiler::apply_filter(&filter.program)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_compiles_and_covers_the_required_calls() {
        let filter = compile().expect("table compiles");
        assert!(filter.program.len() > prefix().len());
        let required = [
            "SYS_ptrace",
            "SYS_process_vm_readv",
            "SYS_process_vm_writev",
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
            "SYS_mount",
            "SYS_open_tree",
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
            "SYS_socket",
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

    #[test]
    fn user_namespace_flag_is_covered_for_clone_and_unshare() {
        for name in ["SYS_clone", "SYS_unshare"] {
            let row = DENIED.iter().find(|r| r.name == name).expect("row present");
            match row.matches {
                Match::AnyBit { arg: 0, mask } => {
                    assert_eq!(
                        mask & libc::CLONE_NEWUSER as u64,
                        libc::CLONE_NEWUSER as u64
                    )
                }
                other => panic!("{name}: unexpected match {other:?}"),
            }
        }
    }
}

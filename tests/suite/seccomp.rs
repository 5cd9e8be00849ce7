//! The seccomp table: each denied call is tried from inside and must fail with the table's
//! errno; everyday calls keep working. `-high` probes set bit 32 of an `int` argument (the
//! kernel drops it, so must the filter). Every row is proved without a sandbox, against the
//! kernel's own answer, by the runtime's root test (`crates/openshell-runtime/tests`); here
//! the same table is seen through the sandboxed path of both backends. (The i386 ABI is left
//! to that test: the vm guest's kernel has no i386 ABI at all.)

use pretty_assertions::assert_eq;

use super::common::*;

const EPERM: i32 = 1;
const ENOSYS: i32 = 38;

#[test]
fn denied_calls_fail_and_everyday_calls_work() {
    if !can_run("denied_calls_fail_and_everyday_calls_work") {
        return;
    }
    let expected: Vec<(&str, i32)> = vec![
        ("ptrace", EPERM),
        ("process_vm_readv", EPERM),
        ("bpf", EPERM),
        ("perf_event_open", EPERM),
        ("userfaultfd", EPERM),
        ("keyctl", EPERM),
        ("add_key", EPERM),
        ("request_key", EPERM),
        ("kexec_load", EPERM),
        ("init_module", EPERM),
        ("finit_module", EPERM),
        ("delete_module", EPERM),
        ("mount", EPERM),
        ("umount2", EPERM),
        ("pivot_root", EPERM),
        ("fsopen", EPERM),
        ("open_tree", EPERM),
        ("setns", EPERM),
        ("unshare-user", EPERM),
        ("unshare-net", EPERM),
        ("clone-newuser", EPERM),
        ("clone3", ENOSYS),
        ("io_uring_setup", EPERM),
        ("reboot", EPERM),
        ("swapon", EPERM),
        ("clock_settime", EPERM),
        ("settimeofday", EPERM),
        ("adjtimex", EPERM),
        ("acct", EPERM),
        ("quotactl", EPERM),
        ("open_by_handle_at", EPERM),
        ("iopl", EPERM),
        ("ioperm", EPERM),
        ("socket-packet", EPERM),
        ("socket-vsock", EPERM),
        ("socket-raw", EPERM),
        ("socket-raw6", EPERM),
        ("socket-vsock-high", EPERM),
        ("socket-packet-high", EPERM),
        ("socket-raw-high", EPERM),
        ("socket-netlink-audit", EPERM),
        ("socket-netlink-audit-high", EPERM),
        ("socket-unix-dgram", EPERM),
        ("socket-unix-raw", EPERM),
        ("socketpair-unix-dgram", EPERM),
        ("socketpair-unix-dgram-high", EPERM),
        ("socketpair-inet", EPERM),
        ("personality-noaslr", EPERM),
        ("personality-noaslr-high", EPERM),
        ("personality-linux32", EPERM),
        ("pidfd_getfd", EPERM),
        ("kcmp", EPERM),
        ("process_madvise", EPERM),
        ("migrate_pages", EPERM),
        ("move_pages", EPERM),
        ("fanotify_init", EPERM),
        ("open_tree_attr", EPERM),
        ("uselib", EPERM),
        ("lookup_dcookie", EPERM),
        ("sysfs", EPERM),
        ("ustat", EPERM),
        ("chroot", EPERM),
        ("x32-getpid", EPERM),
        ("socket-tcp", 0),
        ("socket-unix", 0),
        ("socket-netlink-route", 0),
        ("socketpair-unix-stream", 0),
        ("personality-query", 0),
        ("fork", 0),
    ];
    for backend in backends() {
        let s = Scratch::new("");
        // One sandbox runs every probe; each line is "name code".
        let script: String = expected
            .iter()
            .map(|(name, _)| format!("{PROBE} syscall {name} 2>/dev/null; echo \"{name} $?\"\n"))
            .collect();
        let out = s.run(backend, &[], &["/bin/sh", "-c", &script]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let text = stdout(&out);
        let got: Vec<(&str, i32)> = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(n, c)| (n, c.parse().unwrap_or(-1)))
            .collect();
        assert_eq!((backend, got), (backend, expected.clone()));
    }
}

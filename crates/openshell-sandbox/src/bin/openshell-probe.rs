//! `openshell-probe`: try one forbidden (or allowed) thing from inside a sandbox and report the
//! outcome as the exit status: 0 when the operation succeeded, otherwise the errno it failed with.
//!
//! It exists so behaviour tests (and users checking a policy) can observe what the sandbox
//! allows without depending on what else the image has installed.
//!
//! ```text
//! openshell-probe syscall NAME     ptrace, bpf, mount, unshare-user, clone3, socket-packet, ...
//!                                  (`-high` variants set bit 32 of an `int` argument, which
//!                                  the kernel drops)
//! openshell-probe connect IP:PORT  a TCP connect
//! openshell-probe write PATH       create and write a file
//! openshell-probe mmap-write PATH  create a page-sized file and write `mapped` through a shared
//!                                  mapping, with no msync: the pages are left dirty at exit
//! openshell-probe read PATH        open a file for reading
//! openshell-probe fork N           start up to N sleeping children; 0 once fork is refused
//! openshell-probe alloc MIB        allocate and touch MIB mebibytes
//! openshell-probe ftruncate FD     truncate the open descriptor FD (e.g. 1: stdout) to 0 bytes
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

fn errno_exit(e: &std::io::Error) -> ExitCode {
    let code = e.raw_os_error().unwrap_or(255);
    eprintln!("openshell-probe: {e}");
    ExitCode::from(u8::try_from(code).unwrap_or(255))
}

fn result(r: std::io::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => errno_exit(&e),
    }
}

/// Run a raw system call with up to six integer arguments; Ok on a non-negative return.
fn raw(nr: libc::c_long, args: [libc::c_long; 6]) -> std::io::Result<()> {
    // SAFETY: every call made through this probe passes only integers or null pointers, which
    // the kernel validates; the probe checks the kernel's answer, not memory effects.
    let r = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `socketpair(domain, type, 0, fds)` with raw (possibly dirty) argument registers; the pair
/// is closed at exit.
fn pair_of(domain: libc::c_long, ty: libc::c_long) -> std::io::Result<()> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a live, writable array of two ints, which is what socketpair writes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_socketpair,
            domain,
            ty,
            0 as libc::c_long,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Write `mapped\n` at the start of a new page-sized file through a shared mapping, and leave
/// the dirty page for the kernel to write back (no msync).
fn mmap_write(path: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const LEN: usize = 4096;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(LEN as u64)?;
    // SAFETY: a fresh shared mapping of LEN bytes of a file that is LEN bytes long; the kernel
    // picks the address and nothing else refers to it.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let text = b"mapped\n";
    // SAFETY: `map` is a writable mapping of LEN bytes and `text` is shorter than LEN.
    unsafe { std::ptr::copy_nonoverlapping(text.as_ptr(), map.cast::<u8>(), text.len()) };
    drop(file);
    // The mapping stays until exit, dirty.
    Ok(())
}

fn syscall(name: &str) -> Option<std::io::Result<()>> {
    use libc::*;
    let z = [0 as c_long; 6];
    let with = |a: &[c_long]| {
        let mut args = z;
        args[..a.len()].copy_from_slice(a);
        args
    };
    let ppid = std::os::unix::process::parent_id() as c_long;
    // Bit 32: above an `int`, dropped by the kernel.
    let high: c_long = 1 << 32;
    let x32: c_long = 0x4000_0000;
    Some(match name {
        "ptrace" => raw(SYS_ptrace, with(&[PTRACE_ATTACH as c_long, ppid])),
        "process_vm_readv" => raw(SYS_process_vm_readv, with(&[ppid])),
        "bpf" => raw(SYS_bpf, with(&[0])),
        "perf_event_open" => raw(SYS_perf_event_open, z),
        "userfaultfd" => raw(SYS_userfaultfd, z),
        "keyctl" => raw(SYS_keyctl, with(&[0])),
        "add_key" => raw(SYS_add_key, z),
        "request_key" => raw(SYS_request_key, z),
        "kexec_load" => raw(SYS_kexec_load, z),
        "init_module" => raw(SYS_init_module, z),
        "finit_module" => raw(SYS_finit_module, with(&[-1])),
        "delete_module" => raw(SYS_delete_module, z),
        "mount" => raw(SYS_mount, z),
        "umount2" => raw(SYS_umount2, z),
        "pivot_root" => raw(SYS_pivot_root, z),
        "fsopen" => raw(SYS_fsopen, z),
        "open_tree" => raw(SYS_open_tree, with(&[-1])),
        "setns" => raw(SYS_setns, with(&[-1])),
        "unshare-user" => raw(SYS_unshare, with(&[CLONE_NEWUSER as c_long])),
        "unshare-net" => raw(SYS_unshare, with(&[CLONE_NEWNET as c_long])),
        "clone-newuser" => clone_with(CLONE_NEWUSER),
        "clone3" => raw(SYS_clone3, z),
        "io_uring_setup" => raw(SYS_io_uring_setup, z),
        "reboot" => raw(SYS_reboot, z),
        "swapon" => raw(SYS_swapon, z),
        "clock_settime" => raw(SYS_clock_settime, z),
        "settimeofday" => raw(SYS_settimeofday, z),
        "adjtimex" => raw(SYS_adjtimex, z),
        "acct" => raw(SYS_acct, z),
        "quotactl" => raw(SYS_quotactl, z),
        "open_by_handle_at" => raw(SYS_open_by_handle_at, with(&[-1])),
        "iopl" => raw(SYS_iopl, with(&[3])),
        "ioperm" => raw(SYS_ioperm, with(&[0, 1, 1])),
        "socket-packet" => raw(SYS_socket, with(&[AF_PACKET as c_long, SOCK_RAW as c_long])),
        "socket-vsock" => raw(
            SYS_socket,
            with(&[AF_VSOCK as c_long, SOCK_STREAM as c_long]),
        ),
        "socket-raw" => raw(
            SYS_socket,
            with(&[
                AF_INET as c_long,
                SOCK_RAW as c_long,
                IPPROTO_ICMP as c_long,
            ]),
        ),
        "socket-raw6" => raw(
            SYS_socket,
            with(&[
                AF_INET6 as c_long,
                (SOCK_RAW | SOCK_CLOEXEC) as c_long,
                IPPROTO_ICMPV6 as c_long,
            ]),
        ),
        "socket-tcp" => raw(
            SYS_socket,
            with(&[AF_INET as c_long, SOCK_STREAM as c_long]),
        ),
        "socket-unix" => raw(
            SYS_socket,
            with(&[AF_UNIX as c_long, SOCK_STREAM as c_long]),
        ),
        "socket-vsock-high" => raw(
            SYS_socket,
            with(&[high | AF_VSOCK as c_long, SOCK_STREAM as c_long]),
        ),
        "socket-packet-high" => raw(
            SYS_socket,
            with(&[high | AF_PACKET as c_long, SOCK_RAW as c_long]),
        ),
        "socket-raw-high" => raw(
            SYS_socket,
            with(&[
                high | AF_INET as c_long,
                SOCK_RAW as c_long,
                IPPROTO_ICMP as c_long,
            ]),
        ),
        "socket-netlink-route" => raw(
            SYS_socket,
            with(&[
                AF_NETLINK as c_long,
                SOCK_RAW as c_long,
                NETLINK_ROUTE as c_long,
            ]),
        ),
        "socket-netlink-audit" => raw(
            SYS_socket,
            with(&[
                AF_NETLINK as c_long,
                SOCK_RAW as c_long,
                NETLINK_AUDIT as c_long,
            ]),
        ),
        "socket-netlink-audit-high" => raw(
            SYS_socket,
            with(&[
                AF_NETLINK as c_long,
                SOCK_RAW as c_long,
                high | NETLINK_AUDIT as c_long,
            ]),
        ),
        "socket-unix-dgram" => raw(SYS_socket, with(&[AF_UNIX as c_long, SOCK_DGRAM as c_long])),
        "socket-unix-raw" => raw(SYS_socket, with(&[AF_UNIX as c_long, SOCK_RAW as c_long])),
        "socketpair-unix-stream" => pair_of(AF_UNIX as c_long, SOCK_STREAM as c_long),
        "socketpair-unix-dgram" => pair_of(AF_UNIX as c_long, SOCK_DGRAM as c_long),
        "socketpair-unix-dgram-high" => pair_of(high | AF_UNIX as c_long, SOCK_DGRAM as c_long),
        "socketpair-inet" => pair_of(AF_INET as c_long, SOCK_STREAM as c_long),
        "personality-query" => raw(SYS_personality, with(&[0xffff_ffff])),
        "personality-noaslr" => raw(SYS_personality, with(&[ADDR_NO_RANDOMIZE as c_long])),
        "personality-noaslr-high" => {
            raw(SYS_personality, with(&[high | ADDR_NO_RANDOMIZE as c_long]))
        }
        "personality-linux32" => raw(SYS_personality, with(&[0x0008])),
        "pidfd_getfd" => raw(SYS_pidfd_getfd, with(&[-1])),
        "kcmp" => raw(SYS_kcmp, with(&[ppid, ppid])),
        "process_madvise" => raw(SYS_process_madvise, with(&[-1])),
        "migrate_pages" => raw(SYS_migrate_pages, with(&[ppid])),
        "move_pages" => raw(SYS_move_pages, with(&[ppid])),
        "fanotify_init" => raw(SYS_fanotify_init, z),
        "open_tree_attr" => raw(467, with(&[-1])),
        "uselib" => raw(SYS_uselib, z),
        "lookup_dcookie" => raw(SYS_lookup_dcookie, z),
        "sysfs" => raw(SYS_sysfs, with(&[1])),
        "ustat" => raw(SYS_ustat, z),
        "chroot" => raw(SYS_chroot, z),
        "x32-getpid" => raw(SYS_getpid | x32, z),
        "fork" => clone_with(0),
        _ => return None,
    })
}

/// `clone(flags | SIGCHLD)`; the child exits at once.
fn clone_with(flags: libc::c_int) -> std::io::Result<()> {
    // SAFETY: clone without CLONE_VM behaves like fork; the child only calls _exit.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_long,
            0,
            0,
            0,
            0,
        )
    };
    match pid {
        0 => {
            // SAFETY: _exit is async-signal-safe and ends the forked child.
            unsafe { libc::_exit(0) }
        }
        p if p < 0 => Err(std::io::Error::last_os_error()),
        p => {
            let mut status = 0;
            // SAFETY: waits for the child just created; status is a valid out pointer.
            unsafe { libc::waitpid(p as libc::pid_t, &mut status, 0) };
            Ok(())
        }
    }
}

fn fork_until_refused(max: usize) -> ExitCode {
    let mut children = Vec::new();
    let mut refused = None;
    for _ in 0..max {
        match std::process::Command::new("/bin/sleep").arg("30").spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let started = children.len();
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    match refused {
        Some(e) => {
            println!("started {started}, then refused: {e}");
            ExitCode::SUCCESS
        }
        None => {
            println!("started all {started}");
            ExitCode::from(1)
        }
    }
}

fn alloc(mib: usize) -> ExitCode {
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    for _ in 0..mib {
        blocks.push(vec![1u8; 1024 * 1024]);
    }
    println!("allocated {} MiB", blocks.len());
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        "syscall" => match syscall(arg(1)) {
            Some(r) => result(r),
            None => {
                eprintln!("openshell-probe: unknown syscall probe {:?}", arg(1));
                ExitCode::from(255)
            }
        },
        "connect" => match arg(1).parse::<SocketAddr>() {
            Ok(addr) => result(TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map(drop)),
            Err(e) => {
                eprintln!("openshell-probe: {e}");
                ExitCode::from(255)
            }
        },
        "write" => result(std::fs::File::create(arg(1)).and_then(|mut f| f.write_all(b"probe\n"))),
        "read" => result(std::fs::File::open(arg(1)).map(drop)),
        "mmap-write" => result(mmap_write(arg(1))),
        "fork" => fork_until_refused(arg(1).parse().unwrap_or(1000)),
        "alloc" => alloc(arg(1).parse().unwrap_or(1024)),
        "ftruncate" => match arg(1).parse::<libc::c_long>() {
            Ok(fd) => result(raw(libc::SYS_ftruncate, [fd, 0, 0, 0, 0, 0])),
            Err(e) => {
                eprintln!("openshell-probe: ftruncate {:?}: {e}", arg(1));
                ExitCode::from(255)
            }
        },
        _ => {
            eprintln!("usage: openshell-probe syscall NAME | connect IP:PORT | write PATH | mmap-write PATH | read PATH | fork N | alloc MIB | ftruncate FD");
            ExitCode::from(255)
        }
    }
}

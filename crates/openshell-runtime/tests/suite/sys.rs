//! Every `unsafe` block of this test binary: fork, the child's raw system calls, waitpid.
//!
//! The test binary runs tests on several threads, so a forked child may only make raw system
//! calls (`syscall` and `int 0x80` instructions): no allocation, no locks, no libc wrapper
//! that keeps state. Everything the child reads (the filter program, the call's arguments,
//! the buffers they point to) is prepared before the fork.

use std::arch::asm;

/// What the child does once it is restricted (or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// The `syscall` instruction with this number and these six argument registers, exactly
    /// as given (high bits included). A `clone` that makes a child: the new child exits at
    /// once and the caller waits for it.
    Raw { nr: u64, args: [u64; 6] },
    /// `int 0x80` from 64-bit code with this number in eax: the i386 ABI.
    Int80 { nr: u32 },
}

/// How the child ended, as its parent's waitpid saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The call returned a non-negative value.
    Ok,
    /// The call failed with this errno.
    Errno(i32),
    /// The child was killed by this signal.
    Signal(i32),
}

/// The exit status of a child that could not install the filter (no errno is this large).
const INSTALL_FAILED: i32 = 250;

/// A compiled program in the layout `seccomp(2)` takes; it owns the instructions.
pub struct Filter {
    insns: Vec<libc::sock_filter>,
}

impl Filter {
    pub fn new(program: &[seccompiler::sock_filter]) -> Filter {
        Filter {
            insns: program
                .iter()
                .map(|i| libc::sock_filter {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect(),
        }
    }
}

/// Fork a child that starts a session of its own (so `vhangup` has no terminal to hang up),
/// disables core dumps, installs `filter` when given (as root, with CAP_SYS_ADMIN, so without
/// no_new_privs: the filter is the only restriction), makes `call`, and exits with the result.
pub fn run(call: Call, filter: Option<&Filter>) -> Outcome {
    let prog = filter.map(|f| libc::sock_fprog {
        len: u16::try_from(f.insns.len()).expect("a seccomp program is at most 4096 long"),
        filter: f.insns.as_ptr().cast_mut(),
    });
    let prog_ptr: *const libc::sock_fprog = prog.as_ref().map_or(std::ptr::null(), |p| p);
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: fork has no memory-safety preconditions; the child runs only `child`, which
    // makes raw system calls on memory prepared above and never returns.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the forked child; `prog_ptr` is null or points at `prog`, whose
        // instructions live in `filter`, both alive in this copy of the address space;
        // `no_core` is a valid rlimit.
        unsafe { child(call, prog_ptr, &no_core) }
    }
    assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
    let mut status = 0;
    // SAFETY: waits for the child forked above; `status` is a valid out pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFSIGNALED(status) {
        return Outcome::Signal(libc::WTERMSIG(status));
    }
    match libc::WEXITSTATUS(status) {
        0 => Outcome::Ok,
        INSTALL_FAILED => panic!("the child could not install the seccomp filter"),
        errno => Outcome::Errno(errno),
    }
}

/// The child's whole life. Only raw system calls.
///
/// # Safety
/// Call only in a freshly forked child; `prog` is null or a valid `sock_fprog`.
unsafe fn child(call: Call, prog: *const libc::sock_fprog, no_core: &libc::rlimit) -> ! {
    const SECCOMP_SET_MODE_FILTER: u64 = 1;
    const WALL: u64 = 0x4000_0000;
    // SAFETY: raw system calls whose pointer arguments are null or point at live memory of
    // this process (`no_core`, `prog`, and whatever `call` was prepared with).
    unsafe {
        syscall6(libc::SYS_setsid as u64, [0; 6]);
        let core = no_core as *const libc::rlimit as u64;
        syscall6(
            libc::SYS_prlimit64 as u64,
            [0, libc::RLIMIT_CORE as u64, core, 0, 0, 0],
        );
        if !prog.is_null() {
            let r = syscall6(
                libc::SYS_seccomp as u64,
                [SECCOMP_SET_MODE_FILTER, 0, prog as u64, 0, 0, 0],
            );
            if r != 0 {
                exit(INSTALL_FAILED);
            }
        }
        let ret = match call {
            Call::Raw { nr, args } => {
                let ret = syscall6(nr, args);
                if nr == libc::SYS_clone as u64 {
                    if ret == 0 {
                        exit(0);
                    }
                    if ret > 0 {
                        syscall6(libc::SYS_wait4 as u64, [ret as u64, 0, WALL, 0, 0, 0]);
                    }
                }
                ret
            }
            Call::Int80 { nr } => int80(nr),
        };
        exit(if ret >= 0 { 0 } else { (-ret) as i32 })
    }
}

/// # Safety
/// A raw system call: the arguments must be valid for `nr`.
#[inline(always)]
unsafe fn syscall6(nr: u64, a: [u64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: the `syscall` instruction clobbers only rax (the result), rcx and r11.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr as i64 => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// `int 0x80` with `nr` in eax and no arguments: an i386 system call from 64-bit code.
///
/// # Safety
/// `nr` must be an i386 call that takes no pointer arguments.
unsafe fn int80(nr: u32) -> i64 {
    let ret: u32;
    // SAFETY: the i386 entry returns in eax; r8-r11 are declared clobbered because older
    // kernels zeroed them on this path.
    unsafe {
        asm!(
            "int 0x80",
            inlateout("eax") nr => ret,
            lateout("r8") _,
            lateout("r9") _,
            lateout("r10") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    i64::from(ret as i32)
}

/// # Safety
/// Ends the process: nothing after it runs.
unsafe fn exit(code: i32) -> ! {
    // SAFETY: exit_group takes no pointer and does not return.
    unsafe {
        syscall6(libc::SYS_exit_group as u64, [code as u64, 0, 0, 0, 0, 0]);
    }
    // exit_group does not return; this satisfies the type.
    loop {
        std::hint::spin_loop();
    }
}

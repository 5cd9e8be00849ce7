//! Every libkrun call of the krun engine, and nothing else (STYLE.md: libkrun calls in one
//! file). Each call's return code becomes a `Result` at once.
//!
//! The symbols come from the `libkrun` crate (lib name `krun`), linked into this binary; the
//! declarations from `libkrun-sys` in declarations-only mode.

use std::ffi::{CString, NulError};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;

// Force the link of the crate that defines the `krun_*` symbols.
use krun as _;
use libkrun_sys as ffi;

/// A libkrun call that failed: which one, and the errno it returned.
#[derive(Debug, thiserror::Error)]
pub enum KrunCallError {
    #[error("{call}: {errno}")]
    Errno { call: &'static str, errno: Errno },
    #[error("{call}: argument contains a NUL byte")]
    Nul {
        call: &'static str,
        #[source]
        source: NulError,
    },
    #[error("{call}: {what} {value} is out of range")]
    Range {
        call: &'static str,
        what: &'static str,
        value: u64,
    },
}

/// libkrun returns 0 or a positive value on success and `-errno` on failure.
fn check(call: &'static str, rc: i32) -> Result<u32, KrunCallError> {
    if rc < 0 {
        Err(KrunCallError::Errno {
            call,
            errno: Errno::from_raw(-rc),
        })
    } else {
        Ok(rc as u32)
    }
}

fn cstr(call: &'static str, s: &str) -> Result<CString, KrunCallError> {
    CString::new(s).map_err(|source| KrunCallError::Nul { call, source })
}

fn cpath(call: &'static str, p: &Path) -> Result<CString, KrunCallError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|source| KrunCallError::Nul { call, source })
}

/// Route libkrun's own log (the VMM's errors, e.g. KVM_EXIT_INTERNAL_ERROR) to stderr.
pub fn init_log_to_stderr() -> Result<(), KrunCallError> {
    // SAFETY: plain integers; target 2 (stderr) makes libkrun write to the process's stderr,
    // which it does not take ownership of.
    let rc = unsafe {
        ffi::krun_init_log(
            ffi::KRUN_LOG_TARGET_STDERR,
            ffi::KRUN_LOG_LEVEL_WARN,
            ffi::KRUN_LOG_STYLE_NEVER,
            0,
        )
    };
    check("krun_init_log", rc).map(drop)
}

/// A libkrun configuration context. Freed on drop unless it was handed to [`Ctx::start_enter`].
#[derive(Debug)]
pub struct Ctx {
    id: u32,
}

impl Ctx {
    pub fn create() -> Result<Ctx, KrunCallError> {
        // SAFETY: no arguments; libkrun allocates the context in its own table.
        let rc = unsafe { ffi::krun_create_ctx() };
        check("krun_create_ctx", rc).map(|id| Ctx { id })
    }

    pub fn set_vm_config(&self, vcpus: u32, memory_mib: u64) -> Result<(), KrunCallError> {
        const CALL: &str = "krun_set_vm_config";
        let vcpus = u8::try_from(vcpus).map_err(|_| KrunCallError::Range {
            call: CALL,
            what: "vcpus",
            value: vcpus.into(),
        })?;
        let mem = u32::try_from(memory_mib).map_err(|_| KrunCallError::Range {
            call: CALL,
            what: "memory MiB",
            value: memory_mib,
        })?;
        // SAFETY: plain integers and a context id this object owns.
        let rc = unsafe { ffi::krun_set_vm_config(self.id, vcpus, mem) };
        check(CALL, rc).map(drop)
    }

    /// An ELF vmlinux with our own command line (libkrun appends its `--` epilogue).
    pub fn set_kernel_elf(&self, kernel: &Path, cmdline: &str) -> Result<(), KrunCallError> {
        const CALL: &str = "krun_set_kernel";
        let kernel = cpath(CALL, kernel)?;
        let cmdline = cstr(CALL, cmdline)?;
        // SAFETY: both pointers are NUL-terminated strings that outlive the call (libkrun copies
        // them); a NULL initramfs is documented as "none".
        let rc = unsafe {
            ffi::krun_set_kernel(
                self.id,
                kernel.as_ptr(),
                ffi::KRUN_KERNEL_FORMAT_ELF,
                std::ptr::null(),
                cmdline.as_ptr(),
            )
        };
        check(CALL, rc).map(drop)
    }

    /// A virtio-fs device with `tag` serving `dir`, read-only when asked.
    pub fn add_virtiofs(&self, tag: &str, dir: &Path, readonly: bool) -> Result<(), KrunCallError> {
        const CALL: &str = "krun_add_virtiofs3";
        let tag = cstr(CALL, tag)?;
        let dir = cpath(CALL, dir)?;
        // SAFETY: NUL-terminated strings that outlive the call (libkrun copies them); shm_size 0
        // means no DAX window.
        let rc =
            unsafe { ffi::krun_add_virtiofs3(self.id, tag.as_ptr(), dir.as_ptr(), 0, readonly) };
        check(CALL, rc).map(drop)
    }

    /// The guest gets no network: no implicit vsock with TSI (which would hijack the guest's
    /// inet sockets), only an explicit vsock device with no TSI feature at all.
    pub fn vsock_without_tsi(&self) -> Result<(), KrunCallError> {
        // SAFETY: a context id this object owns.
        let rc = unsafe { ffi::krun_disable_implicit_vsock(self.id) };
        check("krun_disable_implicit_vsock", rc)?;
        // SAFETY: a context id this object owns; 0 is the empty TSI feature set.
        let rc = unsafe { ffi::krun_add_vsock(self.id, 0) };
        check("krun_add_vsock", rc).map(drop)
    }

    /// Map guest vsock `port` to the host Unix socket `path`. `listen`: libkrun listens on
    /// `path` and a host connection reaches the guest's listener on `port` (host dials guest);
    /// otherwise a guest connection to `port` is connected to the host's listener at `path`.
    pub fn add_vsock_port(
        &self,
        port: u32,
        path: &Path,
        listen: bool,
    ) -> Result<(), KrunCallError> {
        const CALL: &str = "krun_add_vsock_port2";
        let path = cpath(CALL, path)?;
        // SAFETY: a NUL-terminated string that outlives the call (libkrun copies it).
        let rc = unsafe { ffi::krun_add_vsock_port2(self.id, port, path.as_ptr(), listen) };
        check(CALL, rc).map(drop)
    }

    /// Write the guest console to `path`.
    pub fn set_console_output(&self, path: &Path) -> Result<(), KrunCallError> {
        const CALL: &str = "krun_set_console_output";
        let path = cpath(CALL, path)?;
        // SAFETY: a NUL-terminated string that outlives the call (libkrun copies it).
        let rc = unsafe { ffi::krun_set_console_output(self.id, path.as_ptr()) };
        check(CALL, rc).map(drop)
    }

    /// Boot the VM on this thread. libkrun exits the process when the guest ends, so this only
    /// returns on an error before the guest starts.
    pub fn start_enter(self) -> KrunCallError {
        let id = self.id;
        // libkrun takes the context out of its table: it must not be freed again.
        std::mem::forget(self);
        // SAFETY: a configured context id; libkrun owns it from here on.
        let rc = unsafe { ffi::krun_start_enter(id) };
        match check("krun_start_enter", rc) {
            Err(e) => e,
            Ok(_) => KrunCallError::Errno {
                call: "krun_start_enter",
                errno: Errno::UnknownErrno,
            },
        }
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: a context id this object owns and nobody else frees.
        let rc = unsafe { ffi::krun_free_ctx(self.id) };
        let _ = check("krun_free_ctx", rc);
    }
}

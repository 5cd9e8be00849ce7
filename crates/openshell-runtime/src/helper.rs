//! The hidden helper entry point.
//!
//! The process backend starts its in-sandbox helpers (the namespace holder, the sandbox's init,
//! the exec helper) by re-executing the hosting binary with [`HELPER_ARG`] as its first argument.
//! Starting a fresh, single-threaded program is the only safe way to do namespace, mount and
//! credential work from a multi-threaded async supervisor.

/// The first argument that marks a helper invocation.
pub const HELPER_ARG: &str = "__openshell-helper";

/// The first argument of the vm backend's root filesystem wrapper: `LOWER BOX PROGRAM ARGS...`
/// (see `process::rootfs::wrapper_main`).
pub const ROOTFS_EXEC_ARG: &str = "__openshell-rootfs-exec";

/// Run the helper and exit if this process was started as one; return otherwise.
///
/// Call this first thing in `main`, before starting an async runtime or any thread.
pub fn run_if_helper() {
    let mut args = std::env::args_os();
    let _argv0 = args.next();
    match args.next() {
        Some(a) if a == HELPER_ARG => {
            #[cfg(target_os = "linux")]
            crate::process::child::helper_main();
            #[cfg(not(target_os = "linux"))]
            std::process::exit(125);
        }
        Some(a) if a == ROOTFS_EXEC_ARG => {
            #[cfg(target_os = "linux")]
            {
                let rest: Vec<std::ffi::OsString> = args.collect();
                crate::process::rootfs::wrapper_main(&rest);
            }
            #[cfg(not(target_os = "linux"))]
            std::process::exit(125);
        }
        _ => {}
    }
}

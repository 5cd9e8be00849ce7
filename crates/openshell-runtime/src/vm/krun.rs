//! The krun engine (feature `krun`): libkrun linked into this binary, one shim process per VM.
//!
//! `krun_start_enter` takes over the calling process until the guest ends, so the supervisor
//! re-executes the hosting binary as a helper in the shim role ([`ToHelper::KrunShim`]). The
//! shim:
//! 1. starts in its own mount, IPC, UTS and network namespaces (plus a user namespace when not
//!    root): libkrun's VMM shares a security context with the guest, and it needs no network
//!    (the guest has none: no TSI, no virtio-net; vsock goes through pathname Unix sockets);
//! 2. dies with the supervisor: PR_SET_PDEATHSIG(SIGKILL) and a thread on the lifeline pipe;
//! 3. restricts itself with Landlock to what the VMM touches (the kernel, the shares, the box
//!    directory, /dev/kvm, /proc for virtio-fs);
//! 4. configures libkrun (all calls in `krun_sys.rs`), installs the workload's seccomp table
//!    (`process::seccomp`; libkrun's threads inherit it) and reports `KrunConfigured`;
//! 5. waits for `Go` (the supervisor binds the guest→host listeners first), then boots.
//!
//! vsock, in libkrun's terms (`krun_add_vsock_port2(port, path, listen)`):
//! - AGENT_PORT (host dials guest): `listen = true` on `<uds>`: libkrun listens there and a
//!   host connection reaches the guest agent's listener directly (no `CONNECT` line, unlike
//!   vhost-device-vsock);
//! - READY_PORT and EGRESS_PORT (guest dials host): `listen = false` on `<uds>_<port>`, the
//!   same paths as the qemu engine; the supervisor listens there.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sched::CloneFlags;

use super::engine::VmDescription;
use super::krun_sys::{self, Ctx, KrunCallError};
use crate::process::child::{take_fd, Control as HelperSide};
use crate::process::protocol::{
    FromHelper, KrunPlan, KrunPort, KrunShare, LandlockPlan, ToHelper, LIFELINE_FD,
};
use crate::process::{start_helper, Helper, ProcessError};
use crate::vm_protocol as proto;
use crate::StdioMode;

#[derive(Debug, thiserror::Error)]
pub enum KrunError {
    #[error("libkrun refused the configuration: {0}")]
    Call(#[from] KrunCallError),
    #[error("starting the krun shim")]
    Start(#[source] ProcessError),
    #[error("the krun shim failed at {stage}: {message}")]
    Shim { stage: String, message: String },
    #[error("the krun shim did not report within {0:?}")]
    Timeout(Duration),
    #[error("the krun VM ended: the shim exited with {status}; libkrun: {log}")]
    Exited { status: String, log: String },
}

/// The kernel command line for our guest under libkrun (hvc0 is libkrun's console; libkrun
/// appends its own `--` epilogue, which the guest agent ignores).
/// `writable_root`: the root is a per-sandbox writable view of an image (mounted `rw`).
pub fn kernel_cmdline(writable_root: bool) -> String {
    format!(
        "console=hvc0 quiet reboot=k panic=-1 root=root rootfstype=virtiofs {} \
         init=/openshell/agent",
        if writable_root { "rw" } else { "ro" }
    )
}

/// The krun engine's view of `vm`. The box directory is `vm.vsock_uds`'s parent; the console
/// and libkrun's log go there.
pub fn plan_for(vm: &VmDescription) -> KrunPlan {
    let box_dir = vm
        .vsock_uds
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let mut shares: Vec<KrunShare> = vm
        .shares
        .iter()
        .map(|s| KrunShare {
            tag: s.tag.clone(),
            host_path: s.host_path.clone(),
            readonly: s.readonly,
        })
        .collect();
    if !shares.iter().any(|s| s.tag == "root") {
        shares.insert(
            0,
            KrunShare {
                tag: "root".into(),
                host_path: vm.root.clone(),
                readonly: true,
            },
        );
    }
    let port_path = |port: u32| PathBuf::from(format!("{}_{port}", vm.vsock_uds.display()));
    KrunPlan {
        kernel: vm.kernel.clone(),
        cmdline: vm.cmdline.clone(),
        shares,
        vsock: vec![
            KrunPort {
                port: proto::AGENT_PORT,
                path: vm.vsock_uds.clone(),
                listen: true,
            },
            KrunPort {
                port: proto::READY_PORT,
                path: port_path(proto::READY_PORT),
                listen: false,
            },
            KrunPort {
                port: proto::EGRESS_PORT,
                path: port_path(proto::EGRESS_PORT),
                listen: false,
            },
        ],
        vcpus: vm.vcpus,
        memory_mib: vm.memory_mib,
        root_view: vm.root_view.clone(),
        console: box_dir.join("console.log"),
        log: box_dir.join("krun.log"),
    }
}

/// Apply the whole plan to a fresh libkrun context.
fn configure(plan: &KrunPlan) -> Result<Ctx, KrunCallError> {
    let ctx = Ctx::create()?;
    ctx.set_vm_config(plan.vcpus, plan.memory_mib)?;
    ctx.set_kernel_elf(&plan.kernel, &plan.cmdline)?;
    for share in &plan.shares {
        ctx.add_virtiofs(&share.tag, &share.host_path, share.readonly)?;
    }
    ctx.vsock_without_tsi()?;
    for port in &plan.vsock {
        ctx.add_vsock_port(port.port, &port.path, port.listen)?;
    }
    ctx.set_console_output(&plan.console)?;
    Ok(ctx)
}

/// Check that libkrun accepts the whole configuration of `vm`, then free it: nothing boots.
pub fn check_config(vm: &VmDescription) -> Result<(), KrunError> {
    let ctx = configure(&plan_for(vm))?;
    drop(ctx);
    Ok(())
}

/// The namespaces the shim starts in.
fn jail_namespaces() -> CloneFlags {
    let base = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET;
    if nix::unistd::geteuid().is_root() {
        base
    } else {
        base | CloneFlags::CLONE_NEWUSER
    }
}

/// A running krun shim, seen from the supervisor. Dropping it kills the shim (and the VM).
#[derive(Debug)]
pub struct KrunShim {
    helper: Helper,
    pid: u32,
    log: PathBuf,
    /// What the shim reported as applied (namespaces, Landlock).
    pub jail: Vec<String>,
}

impl KrunShim {
    /// Start a shim for `plan` and wait until it is jailed and libkrun accepted the
    /// configuration. The VM does not start before [`KrunShim::boot`].
    pub async fn start(plan: KrunPlan) -> Result<KrunShim, KrunError> {
        let mut helper =
            start_helper(StdioMode::Null, jail_namespaces(), None).map_err(KrunError::Start)?;
        let pid = helper.child.id().unwrap_or(0);
        let log = plan.log.clone();
        helper
            .ctl
            .send(&ToHelper::KrunShim(plan))
            .await
            .map_err(KrunError::Start)?;
        let limit = Duration::from_secs(10);
        let answer = tokio::time::timeout(limit, helper.ctl.recv()).await;
        let mut shim = KrunShim {
            helper,
            pid,
            log,
            jail: Vec::new(),
        };
        match answer {
            Ok(Some(FromHelper::KrunConfigured { jail, .. })) => {
                shim.jail = jail;
                Ok(shim)
            }
            Ok(Some(FromHelper::Failed { stage, message, .. })) => {
                let _ = shim.helper.child.wait().await;
                Err(KrunError::Shim { stage, message })
            }
            Ok(_) => Err(shim.wait().await),
            Err(_) => {
                let _ = shim.helper.child.start_kill();
                let _ = shim.helper.child.wait().await;
                Err(KrunError::Timeout(limit))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Let the shim boot the VM.
    pub async fn boot(&mut self) -> Result<(), KrunError> {
        self.helper
            .ctl
            .send(&ToHelper::Go)
            .await
            .map_err(KrunError::Start)
    }

    /// Whether the shim has ended (without waiting).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.helper.child.try_wait().ok().flatten()
    }

    /// Wait for the shim (the VM) to end; the answer names the exit status and libkrun's log.
    pub async fn wait(&mut self) -> KrunError {
        let status = match self.helper.child.wait().await {
            Ok(s) => s.to_string(),
            Err(e) => format!("an unknown status ({e})"),
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        let log = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
        KrunError::Exited { status, log }
    }

    /// SIGKILL the shim, and with it the VM. Never blocks.
    pub fn kill(&mut self) {
        let _ = self.helper.child.start_kill();
    }
}

impl Drop for KrunShim {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Paths the VMM may touch, for the shim's Landlock ruleset.
fn landlock_plan(plan: &KrunPlan) -> LandlockPlan {
    let mut read_only = vec![plan.kernel.clone(), PathBuf::from("/proc")];
    let mut read_write = vec![PathBuf::from("/dev/kvm")];
    for share in &plan.shares {
        match share.readonly {
            true => read_only.push(share.host_path.clone()),
            false => read_write.push(share.host_path.clone()),
        }
    }
    for path in plan
        .vsock
        .iter()
        .map(|p| &p.path)
        .chain([&plan.console, &plan.log])
    {
        if let Some(dir) = path.parent() {
            if !read_write.iter().any(|d| d == dir) {
                read_write.push(dir.to_path_buf());
            }
        }
    }
    LandlockPlan {
        read_only,
        read_write,
        hard_requirement: false,
    }
}

/// Exit as soon as the supervisor's end of the lifeline closes.
fn watch_lifeline(lifeline: OwnedFd) {
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(lifeline);
        let mut buf = [0u8; 1];
        // Only end-of-file (or an error) comes back: the supervisor never writes.
        let _ = f.read(&mut buf);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::SIGKILL);
    });
}

/// The shim role of the helper; never returns.
pub(crate) fn shim_main(mut ctl: HelperSide, plan: KrunPlan) -> ! {
    let lifeline = take_fd(LIFELINE_FD);
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        ctl.fail("jail", format!("PR_SET_PDEATHSIG: {e}"));
    }
    watch_lifeline(lifeline);
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&plan.log)
    {
        Ok(f) => f,
        Err(e) => ctl.fail("log", format!("{}: {e}", plan.log.display())),
    };
    for target in [1, 2] {
        if let Err(e) = crate::process::sys::dup_onto(std::os::fd::AsFd::as_fd(&log), target) {
            ctl.fail("log", format!("dup2: {e}"));
        }
    }
    drop(log);
    let mut jail = vec!["namespaces: mnt ipc uts net".to_owned()];
    // Mounts made by the VMM (none expected) stay in the shim's namespace.
    if let Err(e) = nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
        None::<&str>,
    ) {
        ctl.fail("jail", format!("making mounts private: {e}"));
    }
    // The root filesystem's view lives in this namespace, as long as the shim (and the VM).
    if let Some(view) = &plan.root_view {
        match crate::process::rootfs::prepare_guest_view(&view.lower, &view.box_dir) {
            Ok(method) => jail.push(format!("rootfs: {}", method.name())),
            Err(e) => ctl.fail("rootfs", e),
        }
    }
    match crate::process::landlock::restrict(&landlock_plan(&plan)) {
        Ok(outcome) => jail.push(format!(
            "landlock: {} (abi {})",
            outcome.status, outcome.abi
        )),
        Err(e) => ctl.fail("jail", format!("landlock: {e}")),
    }
    if let Err(e) = krun_sys::init_log_to_stderr() {
        ctl.fail("configure", e.to_string());
    }
    let ctx = match configure(&plan) {
        Ok(ctx) => ctx,
        Err(e) => ctl.fail("configure", e.to_string()),
    };
    // The workload's reviewed seccomp table (no mount, ptrace, bpf, namespaces, module
    // loading, io_uring, raw or vsock sockets, ...) on this thread; libkrun's VMM, vCPU and
    // device threads are started from it by krun_start_enter and inherit it.
    match crate::process::seccomp::compile()
        .map_err(|e| e.to_string())
        .and_then(|f| {
            crate::process::seccomp::apply(&f)
                .map(|()| f.rules)
                .map_err(|e| e.to_string())
        }) {
        Ok(rules) => jail.push(format!("seccomp: {rules} rules")),
        Err(e) => ctl.fail("jail", format!("seccomp: {e}")),
    }
    ctl.send(&FromHelper::KrunConfigured {
        pid: std::process::id() as i32,
        jail,
    });
    match ctl.recv() {
        Some(ToHelper::Go) => {}
        // The supervisor changed its mind or is gone.
        _ => std::process::exit(0),
    }
    drop(ctl);
    let err = ctx.start_enter();
    let _ = writeln!(std::io::stderr(), "openshell krun shim: {err}");
    std::process::exit(125);
}

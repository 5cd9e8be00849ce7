//! openshell-guest-agent: PID 1 of an OpenShell microVM guest.
//!
//! It mounts the guest's pseudo filesystems and brings `lo` up, then serves the host over vsock
//! (see `openshell_runtime::vm_protocol`): guest setup, spawning restricted processes with
//! streamed stdio, signals and exit status, and port forwards. It also relays the guest's egress
//! (127.0.0.1:3128) to the host proxy, naming the calling binary it resolved from /proc.
//!
//! The agent is single-threaded (a current-thread tokio runtime and a `LocalSet`), because it
//! forks through `launch_restricted`. Nothing the host sends is trusted: every frame is
//! validated, and a bad one ends that connection, never the agent.
//!
//! Flags (`--test-mode` runs it on an ordinary host, for tests; the other flags need it):
//!
//! - `--test-mode`: skip the PID 1 boot steps and the mounts, hostname and cgroup of `Setup`;
//!   become a child subreaper; after the `main` process ends, exit 0 instead of powering off.
//!   Prints one JSON line on stdout with the bound addresses:
//!   `{"control":"<path or vsock:PORT>","egress":"127.0.0.1:PORT"}`.
//! - `--listen-unix PATH`: serve control connections on this Unix socket instead of vsock.
//! - `--egress-listen ADDR`: the egress relay's TCP address (default 127.0.0.1:3128; port 0
//!   picks a free one).
//! - `--egress-unix PATH`: dial this Unix socket for egress instead of vsock CID 2.
//!
//! As PID 1 the agent ignores its arguments: the kernel passes unknown command-line words to init.

#[cfg(target_os = "linux")]
mod boot;
#[cfg(target_os = "linux")]
mod control;
#[cfg(target_os = "linux")]
mod egress;
#[cfg(target_os = "linux")]
mod fdio;
#[cfg(target_os = "linux")]
mod reaper;
#[cfg(target_os = "linux")]
mod spawn;
#[cfg(target_os = "linux")]
mod sys;

/// One line of the agent's own diagnostics on stderr (the console in the guest).
#[macro_export]
macro_rules! diag {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "openshell-guest-agent: {}", format_args!($($arg)*));
    }};
}

/// An error and its sources, joined with ": ".
#[cfg(target_os = "linux")]
pub use openshell_runtime::error_chain as chain;

#[cfg(not(target_os = "linux"))]
fn main() {
    diag!("the guest agent runs only on Linux");
    std::process::exit(2);
}

#[cfg(target_os = "linux")]
fn main() {
    let pid1 = std::process::id() == 1;
    let args = match linux::Args::from_env(pid1) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let mut boot_requests = linux::BootRequests::Read(None);
    if pid1 && !args.test_mode {
        boot::boot();
        // Parked for a template, the tree's requests are the restored sandbox's: read them only
        // after the resume.
        boot_requests = match boot::park_requested() {
            true => linux::BootRequests::AfterResume,
            false => linux::BootRequests::Read(boot::take_boot_requests()),
        };
    } else {
        boot::ensure_std_fds(false);
    }
    let result = linux::run(args, boot_requests);
    if let Err(e) = &result {
        diag!("fatal: {e:#}");
    }
    if pid1 {
        // PID 1 must never return: that panics the kernel. Power off instead.
        linux::power_off();
    }
    std::process::exit(if result.is_ok() { 0 } else { 1 });
}

#[cfg(target_os = "linux")]
mod linux {
    use std::cell::{Cell, RefCell};
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::rc::Rc;

    use anyhow::Context as _;
    use clap::Parser;
    use openshell_runtime::vm_protocol::{AGENT_PORT, GUEST_PROXY_ADDR, READY_PORT};
    use tokio::net::{TcpListener, UnixListener};
    use tokio::signal::unix::{signal, SignalKind};

    use crate::reaper::Reaper;
    use crate::{boot, control, egress, fdio};

    #[derive(Debug, Parser)]
    #[command(
        name = "openshell-guest-agent",
        about = "PID 1 of an OpenShell microVM guest"
    )]
    pub struct Args {
        /// Run on an ordinary host for tests: no boot steps, no mounts, hostname or cgroup,
        /// exit instead of powering off; print the bound addresses as one JSON line.
        #[arg(long)]
        pub test_mode: bool,
        /// Serve control connections on this Unix socket instead of vsock.
        #[arg(long, requires = "test_mode", value_name = "PATH")]
        pub listen_unix: Option<PathBuf>,
        /// The egress relay's listen address (port 0: any free port).
        #[arg(long, requires = "test_mode", value_name = "ADDR")]
        pub egress_listen: Option<SocketAddr>,
        /// Dial this Unix socket for egress instead of vsock CID 2.
        #[arg(long, requires = "test_mode", value_name = "PATH")]
        pub egress_unix: Option<PathBuf>,
    }

    impl Args {
        /// As PID 1, arguments are whatever the kernel did not recognize: they are not even
        /// parsed (under TCG, building clap's parser took over 10 ms of every boot).
        pub fn from_env(pid1: bool) -> Result<Args, clap::Error> {
            if pid1 {
                return Ok(Args {
                    test_mode: false,
                    listen_unix: None,
                    egress_listen: None,
                    egress_unix: None,
                });
            }
            Args::try_parse()
        }
    }

    /// Where egress connections go.
    #[derive(Debug, Clone)]
    pub enum EgressTarget {
        Vsock,
        Unix(PathBuf),
    }

    /// State shared by every connection on the agent's single thread.
    #[derive(Debug)]
    pub struct Ctx {
        pub test_mode: bool,
        pub reaper: Reaper,
        /// A `Setup` was received (it is accepted once).
        pub setup_done: Cell<bool>,
        /// `cgroup.procs` of the workload cgroup, once `Setup` created it.
        pub cgroup_procs: RefCell<Option<PathBuf>>,
        /// Every launched process's connects (to the egress relay) and execs, as their
        /// seccomp notifications said (see `openshell_runtime::lineage`).
        pub lineage: std::sync::Arc<openshell_runtime::lineage::Lineage>,
        /// The egress relay's address: connects to it are recorded.
        pub egress_addr: SocketAddr,
        /// From `Setup`: the size limit for hashing executables.
        pub identity_max_binary_bytes: Cell<Option<u64>>,
        /// The egress relay's caller resolver, made when the workload is launched (it needs
        /// the paths the workload can write).
        pub identity: RefCell<Option<openshell_proxy::procfs::ProcfsResolver>>,
    }

    /// End the VM. microvm without ACPI cannot power off ("System halted instead"), so this
    /// reboots: the kernel's `reboot=t` and QEMU's `-no-reboot` turn that into QEMU exiting.
    pub fn power_off() -> ! {
        nix::unistd::sync();
        let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        diag!("power off failed: {e:?}");
        // Nothing else to do; PID 1 exiting panics the kernel, which with panic=-1 also ends
        // the VM.
        std::process::exit(1);
    }

    /// The qemu engine's boot requests (see `boot::take_boot_requests`).
    #[derive(Debug)]
    pub enum BootRequests {
        /// Read at boot (`None`: there were none; the host sends them on the boot connection).
        Read(Option<Result<Vec<u8>, String>>),
        /// Parked for a template (`vm_protocol::PARK_ARG`): read them once resumed.
        AfterResume,
    }

    /// Serve until the agent powers off. `boot_requests`: what the qemu engine left in the tree,
    /// served as the boot connection's requests.
    pub fn run(args: Args, boot_requests: BootRequests) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, serve(args, boot_requests))
    }

    enum ControlListener {
        Vsock(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>),
        Unix(UnixListener),
    }

    impl ControlListener {
        async fn accept(&self) -> std::io::Result<Box<dyn fdio::Io>> {
            Ok(match self {
                ControlListener::Vsock(l) => Box::new(fdio::accept(l).await?),
                ControlListener::Unix(l) => Box::new(l.accept().await?.0),
            })
        }
    }

    /// Parked for a template: dial [`READY_PORT`] and wait on that connection for the
    /// host's `Resume`. The host snapshots the VM while it waits. A restored clone's connection
    /// is cut by the vsock transport reset that follows a restore: the agent dials again, and
    /// the restoring host answers that dial with `Resume`. Runs after the listeners are bound
    /// and before anything a sandbox decides.
    async fn park() -> anyhow::Result<()> {
        let mut told = false;
        loop {
            let dialled = match fdio::vsock_connect_start(libc::VMADDR_CID_HOST, READY_PORT) {
                Ok(pending) => pending.finish().await,
                Err(e) => Err(e),
            };
            match dialled {
                Ok(conn) => {
                    if !told {
                        diag!("parked");
                        told = true;
                    }
                    match control::resume(Box::new(conn)).await {
                        Ok(control::Resumed::Yes) => {
                            diag!("resumed");
                            return Ok(());
                        }
                        Ok(control::Resumed::NotResume) => {}
                        Err(e) => return Err(e).context("resuming"),
                    }
                }
                Err(e) => diag!("park: dialling the host: {e}"),
            }
            // Not in a hurry: a refused or cut dial waits for the restoring host.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    async fn serve(args: Args, boot_requests: BootRequests) -> anyhow::Result<()> {
        if args.test_mode {
            // Orphans of spawned processes come to the agent, as they would to PID 1.
            nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
        }
        // Before any fork, so no SIGCHLD is missed.
        let sigchld = signal(SignalKind::child()).context("watching SIGCHLD")?;
        let (listener, control_name) = match &args.listen_unix {
            Some(path) => (
                ControlListener::Unix(
                    UnixListener::bind(path)
                        .with_context(|| format!("listening on {}", path.display()))?,
                ),
                path.display().to_string(),
            ),
            None => (
                ControlListener::Vsock(
                    fdio::vsock_listen(AGENT_PORT)
                        .with_context(|| format!("listening on vsock port {AGENT_PORT}"))?,
                ),
                format!("vsock:{AGENT_PORT}"),
            ),
        };
        let egress_addr: SocketAddr = match args.egress_listen {
            Some(a) => a,
            None => GUEST_PROXY_ADDR
                .parse()
                .context("parsing the guest proxy address")?,
        };
        let egress_listener = TcpListener::bind(egress_addr)
            .await
            .with_context(|| format!("listening on {egress_addr}"))?;
        let egress_bound = egress_listener.local_addr()?;
        let ctx = Rc::new(Ctx {
            test_mode: args.test_mode,
            reaper: Reaper::default(),
            setup_done: Cell::new(false),
            cgroup_procs: RefCell::new(None),
            lineage: std::sync::Arc::new(openshell_runtime::lineage::Lineage::new()),
            egress_addr: egress_bound,
            identity_max_binary_bytes: Cell::new(None),
            identity: RefCell::new(None),
        });
        let target = match args.egress_unix {
            Some(p) => EgressTarget::Unix(p),
            None => EgressTarget::Vsock,
        };
        if args.test_mode {
            use std::io::Write as _;
            let line = serde_json::json!({
                "control": control_name,
                "egress": egress_bound.to_string(),
            });
            let mut out = std::io::stdout();
            writeln!(out, "{line}").context("writing the bound addresses")?;
            out.flush().context("writing the bound addresses")?;
        }
        diag!("listening: control {control_name}, egress {egress_bound}");
        let reaper_ctx = ctx.clone();
        tokio::task::spawn_local(async move { reaper_ctx.reaper.run(sigchld).await });
        tokio::task::spawn_local(egress::serve(ctx.clone(), egress_listener, target));
        let boot_requests = match boot_requests {
            BootRequests::Read(requests) => requests,
            BootRequests::AfterResume => {
                park().await?;
                boot::take_boot_requests()
            }
        };
        // Tell the host the control port is listening by dialling it: the host sends `Setup`
        // and the workload's `Spawn` on this very connection (no dial back, no extra round
        // trip), or left them in the tree; it dials the control port for every later session.
        let announce = (!args.test_mode).then(|| {
            fdio::vsock_connect_start(
                libc::VMADDR_CID_HOST,
                openshell_runtime::vm_protocol::READY_PORT,
            )
        });

        match (announce, boot_requests) {
            // The dial completes while the workload is set up and launched.
            (Some(announce), Some(requests)) => {
                tokio::task::spawn_local(control::serve_preloaded(ctx.clone(), requests, announce));
            }
            (Some(announce), None) => {
                let ctx = ctx.clone();
                tokio::task::spawn_local(async move {
                    let dialled = match announce {
                        Ok(pending) => pending.finish().await,
                        Err(e) => Err(e),
                    };
                    match dialled {
                        Ok(stream) => control::serve_connection(ctx, Box::new(stream)).await,
                        Err(e) => diag!("could not announce readiness: {e}"),
                    }
                });
            }
            (None, _) => {}
        }

        loop {
            match listener.accept().await {
                Ok(conn) => {
                    tokio::task::spawn_local(control::serve_connection(ctx.clone(), conn));
                }
                Err(e) => {
                    diag!("control accept: {e}");
                    // Out of descriptors or similar: do not spin.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

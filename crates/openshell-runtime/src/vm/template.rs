//! Templates of the qemu engine: a guest booted once and snapshotted where nothing of a sandbox
//! has reached it yet, restored for each new sandbox instead of booting.
//!
//! A template guest boots the built root with no share and no boot requests, and the kernel
//! command-line word `vm_protocol::PARK_ARG`: its agent mounts the pseudo filesystems, binds its
//! listeners, dials `READY_PORT` and waits. The host then stops the VM and migrates it to
//! `<guest dir>/templates/<key>/state` (QEMU's file migration with `mapped-ram`: a sparse file
//! holding only the pages the guest touched). A sandbox then starts its own vsock daemon and
//! virtiofsd (its tree, its shares, its boot requests, exactly as for a boot), starts QEMU with
//! `-incoming defer`, loads the state and continues the VM. virtiofsd's migration state names
//! the paths the template guest had looked up (`/`, `/openshell/agent`, the pseudo filesystems'
//! mount points), which every sandbox's tree has too. The first connection to the restored agent
//! is `Request::Resume`: the host's clock and 64 bytes of fresh entropy, mixed into the guest's
//! pool and the kernel generator reseeded, because every clone starts with the template's random
//! state. Only then does the agent read the sandbox's boot requests and launch the workload.
//!
//! The key hashes everything the snapshot depends on: QEMU's command line for the VM (memory,
//! vcpus, accelerator, CPU model, kernel command line), the identities of QEMU, the kernel, the
//! root (agent included) and the two daemons, and [`FORMAT`]. Creation is serialized per key by
//! a lock file. A failed creation or restore boots the sandbox; unless it only ran out of time
//! (a loaded host), it leaves a `failed` file with the reason, and later sandboxes with that key
//! boot without trying again (delete the file, or the templates directory, to retry).
//! `OPENSHELL_VM_TEMPLATE=off` boots every sandbox.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Child;
use tracing::{debug, info, warn};

use super::engine::{Accel, Share, VmDescription};
use super::qmp::{Qmp, QmpError};
use super::{accept_bounded, console_tail, guest, qemu, start_qemu, VmError, VmmBox};
use crate::vm_protocol::{self as proto, Event, Frame, Kind, Request};

/// The environment variable that turns templates off (`off`, `0`, `false`, `no`).
pub const ENV: &str = "OPENSHELL_VM_TEMPLATE";
/// Bump when what a template holds, or how it is made, changes.
const FORMAT: u32 = 1;
/// How long a template guest may take to park, and a restored agent to answer.
const PARK_LIMIT: Duration = Duration::from_secs(60);
const RESUME_LIMIT: Duration = Duration::from_secs(15);
/// Files a failed restore leaves in the box that a boot must not find.
const RESTORE_LEFTOVERS: &[&str] = &[
    "vhost-vsock.sock",
    "vsock.sock",
    "fs.sock",
    "fs.sock.pid",
    "qmp.sock",
    "console.log",
];

/// Why a template could not be made or restored.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("starting the VM")]
    Start(#[source] Box<VmError>),
    #[error("QEMU exited with {status} while {during}: {log}")]
    QemuExited {
        status: std::process::ExitStatus,
        during: &'static str,
        log: String,
    },
    #[error("the template guest did not park within {0:?}; console: {1}")]
    NoPark(Duration, String),
    #[error("the restored guest agent did not answer within {0:?}")]
    NoAnswer(Duration),
    #[error("the restored guest agent refused to resume: {0}")]
    Refused(String),
    #[error("talking to the restored guest agent")]
    Frame(#[source] proto::FrameError),
}

impl TemplateError {
    /// Whether the failure would recur with this template: everything but running out of time
    /// (a loaded host), after which the next sandbox tries again.
    fn lasting(&self) -> bool {
        !matches!(
            self,
            TemplateError::NoPark(..)
                | TemplateError::NoAnswer(_)
                | TemplateError::Qmp(QmpError::Timeout(..))
        )
    }
}

fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> TemplateError {
    let op = op.into();
    move |source| TemplateError::Io { op, source }
}

/// Whether templates are on (the default) for this process.
pub fn enabled() -> bool {
    enabled_by(std::env::var(ENV).ok().as_deref())
}

/// Templates are on unless [`ENV`]'s value says off.
fn enabled_by(value: Option<&str>) -> bool {
    !matches!(
        value.map(str::to_ascii_lowercase).as_deref(),
        Some("off" | "0" | "false" | "no")
    )
}

/// One template: where its snapshot is and the kernel command line it was booted with (the
/// restoring QEMU gets the same).
#[derive(Debug, Clone)]
pub struct Template {
    key: String,
    dir: PathBuf,
    state: PathBuf,
    cmdline: String,
}

impl Template {
    /// The template for `vm` (its memory, vcpus and kernel command line) under `accel`.
    fn for_vm(
        vm: &VmDescription,
        accel: Accel,
        artifacts: &guest::Artifacts,
    ) -> Result<Template, TemplateError> {
        let cmdline = format!("{} {}", vm.cmdline, proto::PARK_ARG);
        // QEMU's arguments with box-independent placeholder paths: any change to how the VM
        // is described changes the key.
        let placeholder = VmDescription {
            root: "/root".into(),
            root_view: None,
            shares: Vec::new(),
            vsock_uds: "/vsock".into(),
            cmdline: cmdline.clone(),
            ..vm.clone()
        };
        let args = qemu::qemu_args(
            &placeholder,
            accel,
            Path::new("/vhost"),
            Path::new("/fs"),
            Path::new("/console"),
        );
        let mut hasher = Sha256::new();
        hasher.update(format!("openshell-vm-template {FORMAT}\n"));
        for a in &args {
            hasher.update(a.as_bytes());
            hasher.update(b"\0");
        }
        let agent = artifacts.rootfs.join("openshell/agent");
        for file in [
            &artifacts.qemu,
            &artifacts.kernel,
            &artifacts.rootfs,
            &agent,
            &artifacts.virtiofsd,
            &artifacts.vsock_daemon,
        ] {
            hasher.update(identity(file)?.as_bytes());
        }
        let key: String = hasher
            .finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        let dir = guest::guest_dir().join("templates").join(&key);
        Ok(Template {
            state: dir.join("state"),
            key,
            dir,
            cmdline,
        })
    }

    /// Record that this template does not work (the reason in `failed`) and drop its snapshot,
    /// so that later sandboxes boot without trying it.
    fn mark_failed(&self, reason: &str) {
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::create_dir_all(&self.dir);
        let _ = std::fs::write(self.dir.join("failed"), format!("{reason}\n"));
    }
}

/// A file's identity for the key: its real path (the artifacts' directories are named by
/// their content hashes), size and modification time.
fn identity(path: &Path) -> Result<String, TemplateError> {
    let real = std::fs::canonicalize(path).map_err(io(format!("resolving {}", path.display())))?;
    let meta = std::fs::metadata(&real).map_err(io(format!("reading {}", real.display())))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok(format!("{} {} {mtime}\n", real.display(), meta.len()))
}

/// The template for `vm`, made now if missing; `None` when there is none to use (its creation
/// failed now or before: the reason is logged, and the sandbox boots).
pub async fn ensure(
    vm: &VmDescription,
    accel: Accel,
    artifacts: &guest::Artifacts,
) -> Option<Template> {
    match find_or_create(vm, accel, artifacts).await {
        Ok(template) => template,
        Err(e) => {
            warn!(event = "vm.template", outcome = "unavailable", error = %crate::error_chain(&e), "no template: booting");
            None
        }
    }
}

/// [`ensure`]'s work; an error is a template that could not even be looked for.
async fn find_or_create(
    vm: &VmDescription,
    accel: Accel,
    artifacts: &guest::Artifacts,
) -> Result<Option<Template>, TemplateError> {
    let template = Template::for_vm(vm, accel, artifacts)?;
    if template.state.is_file() {
        return Ok(Some(template));
    }
    let failed = template.dir.join("failed");
    if failed.is_file() {
        debug!(event = "vm.template", outcome = "skipped", key = %template.key, record = %failed.display(), "template failed before: booting");
        return Ok(None);
    }
    // One creator per key; the others wait and then use its snapshot.
    let _lock = lock(template.dir.with_extension("lock")).await?;
    if template.state.is_file() {
        return Ok(Some(template));
    }
    if failed.is_file() {
        return Ok(None);
    }
    let started = Instant::now();
    match create(&template, vm, accel, artifacts).await {
        Ok(()) => {
            info!(event = "vm.template", outcome = "created", key = %template.key, ms = started.elapsed().as_millis() as u64, state = %template.state.display(), "template created");
            Ok(Some(template))
        }
        Err(e) => {
            let reason = crate::error_chain(&e);
            warn!(event = "vm.template", outcome = "create_failed", key = %template.key, error = %reason, lasting = e.lasting(), "template not created: booting");
            if e.lasting() {
                template.mark_failed(&format!("creating: {reason}"));
            }
            Ok(None)
        }
    }
}

/// An exclusive lock on `path` (created), held until the value is dropped.
async fn lock(path: PathBuf) -> Result<nix::fcntl::Flock<File>, TemplateError> {
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))
    })
    .await
    .map_err(|e| std::io::Error::other(e.to_string()))
    .and_then(|r| r)
    .map_err(io(format!("locking {shown}")))
}

/// Boot a template guest in a box of its own, wait until it parks, snapshot it.
async fn create(
    template: &Template,
    vm: &VmDescription,
    accel: Accel,
    artifacts: &guest::Artifacts,
) -> Result<(), TemplateError> {
    let id = format!("{}-template", crate::process::new_sandbox_id());
    let box_dir = guest::guest_dir().join("run").join(&id);
    let root = box_dir.join("root");
    std::fs::create_dir_all(&root).map_err(io(format!("creating {}", root.display())))?;
    std::fs::create_dir_all(&template.dir)
        .map_err(io(format!("creating {}", template.dir.display())))?;
    let result = create_in(template, vm, accel, artifacts, &box_dir).await;
    let _ = std::fs::remove_dir_all(&box_dir);
    result
}

async fn create_in(
    template: &Template,
    vm: &VmDescription,
    accel: Accel,
    artifacts: &guest::Artifacts,
    box_dir: &Path,
) -> Result<(), TemplateError> {
    let root = box_dir.join("root");
    let vmm_box = VmmBox::prepare(box_dir).map_err(|e| TemplateError::Start(Box::new(e)))?;
    // QEMU (jailed, as the VMM user) writes the state into its own directory; root moves it
    // into place once QEMU has ended (see `take_state`).
    let tmp = vmm_box.vmm.join("state.tmp");
    let vsock_uds = vmm_box.vsock_uds();
    let ready = vmm_box
        .listen(proto::READY_PORT)
        .map_err(|e| TemplateError::Start(Box::new(e)))?;
    ready
        .set_nonblocking(true)
        .map_err(io("configuring the ready listener"))?;
    let ready = UnixListener::from_std(ready).map_err(io("registering the ready listener"))?;
    // The built root alone: no share, no boot requests, nothing of any sandbox.
    let tvm = VmDescription {
        root: root.clone(),
        root_view: None,
        shares: vec![Share {
            tag: "root".into(),
            host_path: root,
            guest_path: "/".into(),
            readonly: true,
        }],
        vsock_uds,
        cmdline: template.cmdline.clone(),
        workload_ids: None,
        trust_bundle: None,
        ..vm.clone()
    };
    let console = vmm_box.console();
    let qmp_path = vmm_box.qmp();
    let (mut vmm, _helpers) = start_qemu(
        &vmm_box,
        &tvm,
        artifacts,
        accel,
        None,
        &qemu::qmp_args(&qmp_path, false),
        &[],
    )
    .await
    .map_err(|e| TemplateError::Start(Box::new(e)))?;
    // Parked: the agent dialled READY_PORT and waits on that connection, which stays open
    // until the snapshot is taken.
    let _parked = accept_bounded(
        &ready,
        PARK_LIMIT,
        || exited(&mut vmm, box_dir, "the template guest booted"),
        || TemplateError::NoPark(PARK_LIMIT, console_tail(&console)),
    )
    .await?;
    let mut qmp = Qmp::connect(&qmp_path, vmm_box.ids.uid, Duration::from_secs(10)).await?;
    qmp.set_file_migration().await?;
    qmp.execute("stop", None).await?;
    qmp.execute(
        "migrate",
        Some(json!({ "uri": format!("file:{}", tmp.display()) })),
    )
    .await?;
    qmp.wait_migration(Duration::from_secs(120)).await?;
    let _ = qmp.execute("quit", None).await;
    if tokio::time::timeout(Duration::from_secs(5), vmm.wait())
        .await
        .is_err()
    {
        let _ = vmm.start_kill();
    }
    take_state(&vmm_box, &tmp, &template.state)?;
    let info = json!({
        "format": FORMAT,
        "key": template.key,
        "memory_mib": vm.memory_mib,
        "vcpus": vm.vcpus,
        "accel": format!("{accel:?}"),
        "cmdline": template.cmdline,
        "qemu": artifacts.qemu,
        "kernel": artifacts.kernel,
        "rootfs": std::fs::canonicalize(&artifacts.rootfs).unwrap_or_default(),
    });
    let _ = std::fs::write(template.dir.join("info.json"), format!("{info:#}\n"));
    Ok(())
}

/// Move the state QEMU wrote (`tmp`, in the VMM user's directory) to `state`, once QEMU and
/// everything else of the VMM user in this box has ended: it must be a regular file of the
/// VMM user's (never a link it left), synced before it is used (a torn snapshot would restore a
/// broken guest), and the template keeps it read-only and root's.
fn take_state(vmm_box: &VmmBox, tmp: &Path, state: &Path) -> Result<(), TemplateError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let shown = tmp.display().to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(tmp)
        .map_err(io(format!("opening {shown}")))?;
    let meta = file.metadata().map_err(io(shown.to_string()))?;
    if !meta.is_file() || meta.uid() != vmm_box.ids.uid {
        return Err(TemplateError::Io {
            op: format!("{shown}: not a regular file of {}", super::jail::VMM_USER),
            source: std::io::ErrorKind::InvalidData.into(),
        });
    }
    file.sync_all().map_err(io(format!("syncing {shown}")))?;
    nix::unistd::fchown(
        &file,
        Some(nix::unistd::Uid::from_raw(0)),
        Some(nix::unistd::Gid::from_raw(0)),
    )
    .map_err(|e| TemplateError::Io {
        op: format!("handing {shown} to root"),
        source: e.into(),
    })?;
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(io(format!("chmod {shown}")))?;
    std::fs::rename(tmp, state).map_err(io(format!("renaming {shown} to {}", state.display())))
}

/// Fails when QEMU has exited.
fn exited(vmm: &mut Child, box_dir: &Path, during: &'static str) -> Result<(), TemplateError> {
    match vmm.try_wait() {
        Ok(Some(status)) => Err(TemplateError::QemuExited {
            status,
            during,
            log: std::fs::read_to_string(box_dir.join("qemu.log"))
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }),
        _ => Ok(()),
    }
}

/// Start the sandbox's daemons (its tree, `boot_requests` in it) and a QEMU restoring
/// `template`, then resume the agent. On failure everything started is stopped and the box's
/// sockets removed, so that the caller can boot in the same box.
#[allow(clippy::too_many_arguments)]
pub async fn restore(
    id: &str,
    vmm_box: &VmmBox,
    ready: &UnixListener,
    vm: &VmDescription,
    template: &Template,
    accel: Accel,
    artifacts: &guest::Artifacts,
    boot_requests: Option<Vec<u8>>,
) -> Result<(Child, Vec<Child>), VmError> {
    let started = Instant::now();
    let box_dir = &vmm_box.dir;
    let rvm = VmDescription {
        cmdline: template.cmdline.clone(),
        ..vm.clone()
    };
    let qmp_path = vmm_box.qmp();
    let (mut vmm, mut helpers) = start_qemu(
        vmm_box,
        &rvm,
        artifacts,
        accel,
        boot_requests,
        &qemu::qmp_args(&qmp_path, true),
        std::slice::from_ref(&template.state),
    )
    .await?;
    let resumed = async {
        let mut qmp = Qmp::connect(&qmp_path, vmm_box.ids.uid, Duration::from_secs(10)).await?;
        qmp.set_file_migration().await?;
        qmp.execute(
            "migrate-incoming",
            Some(json!({ "uri": format!("file:{}", template.state.display()) })),
        )
        .await?;
        qmp.wait_migration(Duration::from_secs(30)).await?;
        qmp.execute("cont", None).await?;
        let loaded_ms = started.elapsed().as_millis() as u64;
        let attempts = resume(ready, &mut vmm, box_dir).await?;
        Ok::<_, TemplateError>((loaded_ms, attempts))
    }
    .await;
    match resumed {
        Ok((loaded_ms, resume_attempts)) => {
            info!(event = "vm.template", outcome = "restored", sandbox = id, key = %template.key, loaded_ms, resume_attempts, ms = started.elapsed().as_millis() as u64, "VM restored from its template");
            Ok((vmm, helpers))
        }
        Err(e) => {
            let _ = exited(&mut vmm, box_dir, "restoring");
            let _ = vmm.kill().await;
            for h in &mut helpers {
                let _ = h.kill().await;
            }
            for name in RESTORE_LEFTOVERS {
                let _ = std::fs::remove_file(vmm_box.vmm.join(name));
                let _ = std::fs::remove_file(vmm_box.fs.join(name));
            }
            let reason = crate::error_chain(&e);
            warn!(event = "vm.template", outcome = "restore_failed", sandbox = id, key = %template.key, error = %reason, lasting = e.lasting(), "restore failed: booting");
            if e.lasting() {
                template.mark_failed(&format!("restoring: {reason}"));
            }
            Err(e.into())
        }
    }
}

/// Resume the restored agent. Parked, it waits on a connection it dialled to `READY_PORT`; the
/// transport reset that follows a restore cuts it and the agent dials again, into this
/// sandbox's `ready` listener: that connection gets `Resume` (the host's clock and fresh
/// entropy) and answers `Ready`. A connection cut before the answer is waited for again, until
/// [`RESUME_LIMIT`] (the agent answers a repeated `Resume` the same way).
async fn resume(
    ready: &UnixListener,
    vmm: &mut Child,
    box_dir: &Path,
) -> Result<u32, TemplateError> {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        let left = RESUME_LIMIT.saturating_sub(started.elapsed());
        let stream = tokio::select! {
            accepted = ready.accept() => accepted.map_err(io("accepting the restored agent's call"))?.0,
            _ = tokio::time::sleep(left) => return Err(TemplateError::NoAnswer(RESUME_LIMIT)),
            status = vmm.wait() => {
                exited(vmm, box_dir, "resuming")?;
                return Err(TemplateError::Io { op: "waiting for QEMU".into(), source: status.err().unwrap_or_else(|| std::io::ErrorKind::BrokenPipe.into()) });
            }
        };
        attempts += 1;
        match resume_on(stream, left).await {
            Ok(()) => return Ok(attempts),
            Err(Attempt::Retry) => {}
            Err(Attempt::Fatal(e)) => return Err(e),
        }
    }
}

/// How one resume attempt failed.
enum Attempt {
    /// No answer: the connection was cut or closed.
    Retry,
    Fatal(TemplateError),
}

async fn resume_on(stream: UnixStream, limit: Duration) -> Result<(), Attempt> {
    let mut entropy = vec![0u8; proto::RESUME_ENTROPY_BYTES];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut entropy))
        .map_err(|e| Attempt::Fatal(io("reading /dev/urandom")(e)))?;
    let realtime_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let (mut reader, mut writer) = stream.into_split();
    let request = Frame::json(&Request::Resume {
        realtime_ns,
        entropy,
    });
    if proto::write_frame_async(&mut writer, &request)
        .await
        .is_err()
    {
        return Err(Attempt::Retry);
    }
    let answer = match tokio::time::timeout(limit, proto::read_frame_async(&mut reader)).await {
        Ok(Ok(Some(frame))) => frame,
        _ => return Err(Attempt::Retry),
    };
    let refused = |m: String| Err(Attempt::Fatal(TemplateError::Refused(m)));
    if answer.kind != Kind::Json {
        return refused(format!("a {:?} frame", answer.kind));
    }
    match answer.decode_json::<Event>() {
        Ok(Event::Ready) => Ok(()),
        Ok(Event::Failed { stage, message, .. }) => refused(format!("{stage}: {message}")),
        Ok(other) => refused(format!("unexpected {other:?}")),
        Err(e) => Err(Attempt::Fatal(TemplateError::Frame(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_on_unless_turned_off() {
        for (value, on) in [
            (None, true),
            (Some(""), true),
            (Some("on"), true),
            (Some("off"), false),
            (Some("OFF"), false),
            (Some("0"), false),
            (Some("false"), false),
            (Some("no"), false),
        ] {
            assert_eq!(enabled_by(value), on, "{value:?}");
        }
    }

    /// Artifacts as empty files in a temporary directory.
    fn artifacts(dir: &Path) -> guest::Artifacts {
        let file = |name: &str| {
            let p = dir.join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, name).unwrap();
            p
        };
        file("rootfs/openshell/agent");
        guest::Artifacts {
            kernel: file("vmlinux"),
            rootfs: dir.join("rootfs"),
            vsock_daemon: file("vhost-device-vsock"),
            virtiofsd: file("virtiofsd"),
            qemu: file("qemu"),
        }
    }

    #[test]
    fn the_key_follows_what_the_snapshot_depends_on() {
        let dir = tempfile::tempdir().unwrap();
        let a = artifacts(dir.path());
        let vm = VmDescription {
            kernel: a.kernel.clone(),
            root: "/box/root".into(),
            root_view: None,
            shares: Vec::new(),
            vsock_uds: "/box/vsock.sock".into(),
            vcpus: 1,
            memory_mib: 512,
            cmdline: qemu::kernel_cmdline(Some(2_000_000)),
            workload_ids: None,
            trust_bundle: None,
        };
        let key = |vm: &VmDescription, a: &guest::Artifacts| {
            Template::for_vm(vm, Accel::Tcg, a).unwrap().key
        };
        let base = Template::for_vm(&vm, Accel::Tcg, &a).unwrap();
        assert!(base.cmdline.ends_with(&format!(" {}", proto::PARK_ARG)));
        // The box's own paths (and its CA bundle) do not matter: every sandbox shares the
        // template.
        let other_box = VmDescription {
            root: "/other/root".into(),
            vsock_uds: "/other/vsock.sock".into(),
            trust_bundle: Some("/other/ca-bundle.crt".into()),
            ..vm.clone()
        };
        assert_eq!(key(&other_box, &a), base.key);
        // Memory, vcpus, the command line, the accelerator and every artifact do.
        let mut changed = vec![
            key(
                &VmDescription {
                    memory_mib: 1024,
                    ..vm.clone()
                },
                &a,
            ),
            key(
                &VmDescription {
                    vcpus: 2,
                    ..vm.clone()
                },
                &a,
            ),
            key(
                &VmDescription {
                    cmdline: qemu::kernel_cmdline(Some(2_000_001)),
                    ..vm.clone()
                },
                &a,
            ),
            Template::for_vm(&vm, Accel::Kvm, &a).unwrap().key,
        ];
        std::fs::write(&a.virtiofsd, "a longer virtiofsd").unwrap();
        changed.push(key(&vm, &a));
        std::fs::write(a.rootfs.join("openshell/agent"), "another agent build").unwrap();
        changed.push(key(&vm, &a));
        for k in &changed {
            assert_ne!(k, &base.key);
        }
        changed.sort();
        changed.dedup();
        assert_eq!(changed.len(), 6);
        // A missing artifact is an error, not a key.
        std::fs::remove_file(&a.qemu).unwrap();
        assert!(Template::for_vm(&vm, Accel::Tcg, &a).is_err());
    }
}

//! Watching `--policy FILE` with inotify from a small child process.
//!
//! Tearing down an inotify instance costs the kernel an SRCU grace period (about 15 ms here),
//! paid by whichever process closes it last. The watch therefore lives in a child (this binary
//! re-executed with [`WATCH_ARG`]) that prints one line per change; the supervisor re-reads and
//! applies the file. The child ends when its stdin (held by the supervisor) reaches end-of-file,
//! so it never outlives the supervisor, and the supervisor's own exit does not wait for it.

use std::io::{BufRead, Write};
use std::path::Path;

use openshell_proxy::PolicyHandle;
use tokio::io::AsyncBufReadExt;

/// The first argument that marks a watcher invocation.
pub const WATCH_ARG: &str = "__openshell-watch";

/// Run the watcher and exit if this process was started as one; return otherwise.
pub fn run_if_watcher() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_none_or(|a| a != WATCH_ARG) {
        return;
    }
    let Some(path) = args.get(2).map(std::path::PathBuf::from) else {
        std::process::exit(2);
    };
    // End with the supervisor: its end of our stdin closes when it exits, however it exits.
    std::thread::spawn(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .lock()
            .read_line(&mut sink)
            .is_ok_and(|n| n > 0)
        {
            sink.clear();
        }
        std::process::exit(0);
    });
    let Ok((_watcher, mut changes)) = openshell_proxy::watch::inotify_changes(&path) else {
        std::process::exit(1);
    };
    let mut out = std::io::stdout().lock();
    while changes.blocking_recv().is_some() {
        if writeln!(out, "changed").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    std::process::exit(0);
}

/// Start the watcher child for `path` and apply its changes to `handle`; abort the returned task
/// to stop (the child is killed).
pub fn watch_policy_file(
    path: &Path,
    handle: PolicyHandle,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut child = tokio::process::Command::new("/proc/self/exe")
        .arg(WATCH_ARG)
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        // Its own process group: a Ctrl-C at the terminal is for the workload, not the watcher.
        .process_group(0)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("watcher has no stdout"))?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let relay = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(_)) = lines.next_line().await {
            if tx.send(()).is_err() {
                break;
            }
        }
    });
    // The child and the relay live (and die) with the applying task.
    Ok(openshell_proxy::watch::apply_changes(
        path,
        handle,
        rx,
        Box::new(Watcher {
            _child: child,
            relay,
        }),
    ))
}

struct Watcher {
    _child: tokio::process::Child,
    relay: tokio::task::JoinHandle<()>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.relay.abort();
    }
}

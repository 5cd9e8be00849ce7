//! Reaping every child, the agent's own and orphans (the agent is PID 1 in the guest, or a child
//! subreaper in test mode), and telling each session when its process ended.

use std::cell::RefCell;
use std::collections::HashMap;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use openshell_runtime::process::protocol::WaitReport;
use tokio::signal::unix::Signal;
use tokio::sync::oneshot;

/// Processes whose end a session is waiting for.
#[derive(Debug, Default)]
pub struct Reaper {
    waiting: RefCell<HashMap<i32, oneshot::Sender<WaitReport>>>,
}

impl Reaper {
    /// Ask to be told when `pid` ends. Must be called right after the fork, before the next
    /// `.await`, so the reaper task cannot collect the status first.
    pub fn register(&self, pid: i32) -> oneshot::Receiver<WaitReport> {
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(pid, tx);
        rx
    }

    /// Whether `pid` is a registered process that has not been reaped: only then may it be
    /// signalled (after reaping, the pid may belong to someone else).
    pub fn is_running(&self, pid: i32) -> bool {
        self.waiting.borrow().contains_key(&pid)
    }

    /// Collect every child that has ended.
    pub fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    let (pid, report) = match status {
                        WaitStatus::Exited(pid, code) => (pid, WaitReport::Code(code)),
                        WaitStatus::Signaled(pid, sig, _) => (pid, WaitReport::Signal(sig as i32)),
                        _ => continue,
                    };
                    let tx = self.waiting.borrow_mut().remove(&pid.as_raw());
                    if let Some(tx) = tx {
                        // The session may be gone already; then nobody needs the status.
                        let _ = tx.send(report);
                    }
                }
            }
        }
    }

    /// Reap on every SIGCHLD, forever.
    pub async fn run(&self, mut sigchld: Signal) {
        loop {
            self.reap_all();
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    }
}

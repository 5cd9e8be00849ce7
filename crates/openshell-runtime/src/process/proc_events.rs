//! The host kernel's process events (the netlink proc connector, `CONFIG_PROC_EVENTS`): one
//! fork, exec and exit event per process on the host, in the order the kernel sent them.
//!
//! The process backend learns from them what /proc cannot say afterwards: whether a process
//! started another program after it made a child (the child then does not credit it as an
//! ancestor), and whether the process that connected a socket exec'd since. The events are
//! queued in the socket by the kernel before the forking or exec'ing process returns to user
//! space, so a reader that drains the queue ([`ProcEvents::sync`]) knows every fork and exec
//! that happened before the moment it asks; the workload never waits on the supervisor for
//! them (a stopped supervisor stops nothing but its own reading).
//!
//! A process is followed from its fork: its parent, the parent's exec generation at that
//! moment, and its own exec generation. A process whose fork was not seen (it existed before
//! the reader started) or whose events may have been lost (the queue overflowed) is unknown,
//! and unknown answers no: it credits nobody and nothing credits it.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

use super::sys;

/// Receive queue for the events (the reader drains it continuously).
const QUEUE_BYTES: usize = 32 * 1024 * 1024;

const PROC_EVENT_FORK: u32 = 0x1;
const PROC_EVENT_EXEC: u32 = 0x2;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// nlmsghdr (16) + cn_msg (20): where `struct proc_event` starts.
const EVENT_AT: usize = 36;

#[derive(Debug, Clone, Copy)]
struct Proc {
    /// The thread group that forked it, and that group's exec generation then.
    parent: u32,
    parent_gen: Option<u64>,
    /// Execs since its fork.
    exec_gen: u64,
    /// Events about it may have been lost.
    tainted: bool,
}

#[derive(Debug, Default)]
struct Table {
    procs: HashMap<u32, Proc>,
}

/// The event reader (one per supervisor, shared by its sandboxes).
#[derive(Debug)]
pub struct ProcEvents {
    sock: OwnedFd,
    table: Mutex<Table>,
}

static GLOBAL: OnceLock<Result<Arc<ProcEvents>, String>> = OnceLock::new();

impl ProcEvents {
    /// The supervisor's reader, started on first use (before the first sandbox forks).
    pub fn global() -> Result<Arc<ProcEvents>, String> {
        GLOBAL
            .get_or_init(|| ProcEvents::start().map_err(|e| e.to_string()))
            .clone()
    }

    fn start() -> nix::Result<Arc<ProcEvents>> {
        let sock = sys::proc_events_socket(QUEUE_BYTES)?;
        let events = Arc::new(ProcEvents {
            sock,
            table: Mutex::new(Table::default()),
        });
        let reader = events.clone();
        std::thread::Builder::new()
            .name("openshell-procevents".into())
            .spawn(move || reader.run())
            .map_err(|_| nix::Error::EAGAIN)?;
        Ok(events)
    }

    /// Wait for events and apply them, for the life of the process.
    fn run(&self) {
        loop {
            let mut poll = [nix::poll::PollFd::new(
                self.sock.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut poll, nix::poll::PollTimeout::NONE) {
                Ok(_) | Err(nix::Error::EINTR) => self.sync(),
                Err(e) => {
                    tracing::error!(error = %e, "process events: the reader stopped; every process is unknown from now on");
                    if let Ok(mut table) = self.table.lock() {
                        table.procs.values_mut().for_each(|p| p.tainted = true);
                    }
                    return;
                }
            }
        }
    }

    /// Apply every event queued so far.
    pub fn sync(&self) {
        let Ok(mut table) = self.table.lock() else {
            return;
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match sys::recv_nowait(self.sock.as_fd(), &mut buf) {
                Ok(Some(n)) => apply(&mut table, &buf[..n]),
                Ok(None) => return,
                Err(nix::Error::ENOBUFS) => {
                    tracing::warn!(
                        event = "sandbox.proc_events_lost",
                        "process events were lost: the processes alive now credit no ancestor"
                    );
                    table.procs.values_mut().for_each(|p| p.tainted = true);
                }
                Err(nix::Error::EINTR) => {}
                Err(_) => return,
            }
        }
    }

    /// Whether `parent` made `child` and has not exec'd since.
    pub fn credits(&self, parent: u32, child: u32) -> bool {
        self.sync();
        let Ok(table) = self.table.lock() else {
            return false;
        };
        match (table.procs.get(&parent), table.procs.get(&child)) {
            (Some(p), Some(c)) => {
                !p.tainted && !c.tainted && c.parent == parent && c.parent_gen == Some(p.exec_gen)
            }
            _ => false,
        }
    }

    /// The exec generation of `pid`, `None` when it is unknown.
    pub fn exec_gen(&self, pid: u32) -> Option<u64> {
        self.sync();
        let table = self.table.lock().ok()?;
        table
            .procs
            .get(&pid)
            .filter(|p| !p.tainted)
            .map(|p| p.exec_gen)
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Apply one datagram (one or more netlink messages, each one `proc_event`).
fn apply(table: &mut Table, datagram: &[u8]) {
    let mut at = 0;
    while let Some(len) = u32_at(datagram, at) {
        let len = len as usize;
        if len < EVENT_AT + 16 || at + len > datagram.len() {
            return;
        }
        apply_event(table, &datagram[at + EVENT_AT..at + len]);
        at += (len + 3) & !3;
    }
}

/// One `struct proc_event`: what (0), cpu (4), timestamp (8), the event's data (16).
fn apply_event(table: &mut Table, ev: &[u8]) {
    let (Some(what), Some(a), Some(b), Some(c), Some(d)) = (
        u32_at(ev, 0),
        u32_at(ev, 16),
        u32_at(ev, 20),
        u32_at(ev, 24),
        u32_at(ev, 28),
    ) else {
        return;
    };
    match what {
        // parent_pid, parent_tgid, child_pid, child_tgid; a thread is not a process.
        PROC_EVENT_FORK if c == d => {
            let parent_gen = table
                .procs
                .get(&b)
                .filter(|p| !p.tainted)
                .map(|p| p.exec_gen);
            table.procs.insert(
                d,
                Proc {
                    parent: b,
                    parent_gen,
                    exec_gen: 0,
                    tainted: false,
                },
            );
        }
        // process_pid, process_tgid (after the exec, the thread group's leader).
        PROC_EVENT_EXEC => {
            if let Some(p) = table.procs.get_mut(&b) {
                p.exec_gen += 1;
            }
        }
        PROC_EVENT_EXIT if a == b => {
            table.procs.remove(&b);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn event(what: u32, data: [u32; 4]) -> Vec<u8> {
        let mut ev = vec![0u8; EVENT_AT];
        ev[..4].copy_from_slice(&((EVENT_AT + 32) as u32).to_ne_bytes());
        ev.extend_from_slice(&what.to_ne_bytes());
        ev.extend_from_slice(&[0u8; 12]);
        for v in data {
            ev.extend_from_slice(&v.to_ne_bytes());
        }
        ev
    }

    #[test]
    fn a_child_made_before_an_exec_does_not_credit_the_new_program() {
        let mut t = Table::default();
        for e in [
            event(PROC_EVENT_FORK, [1, 1, 10, 10]),   // 1 makes 10
            event(PROC_EVENT_FORK, [10, 10, 11, 11]), // 10 makes 11
            event(PROC_EVENT_FORK, [10, 10, 12, 12]), // 10 makes a thread? no: a process 12
            event(PROC_EVENT_FORK, [10, 10, 13, 10]), // a thread of 10: ignored
            event(PROC_EVENT_EXEC, [10, 10, 0, 0]),   // 10 execs
            event(PROC_EVENT_FORK, [10, 10, 14, 14]), // 10 makes 14 afterwards
            event(PROC_EVENT_EXIT, [12, 12, 0, 0]),
        ] {
            apply(&mut t, &e);
        }
        let credits = |p: u32, c: u32| match (t.procs.get(&p), t.procs.get(&c)) {
            (Some(pp), Some(cc)) => cc.parent == p && cc.parent_gen == Some(pp.exec_gen),
            _ => false,
        };
        assert_eq!(
            (
                credits(10, 11),
                credits(10, 14),
                credits(1, 10),
                t.procs.contains_key(&12),
                t.procs.contains_key(&13)
            ),
            (false, true, false, false, false)
        );
    }

    /// The real connector (root): a shell that forks a child and then execs.
    #[test]
    fn the_kernel_reports_fork_and_exec() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").is_err(),
                "needs root, and CI=true forbids skipping"
            );
            #[allow(clippy::print_stderr)] // a skip says why
            {
                eprintln!("SKIP the_kernel_reports_fork_and_exec: needs root (CAP_NET_ADMIN)");
            }
            return;
        }
        let events = ProcEvents::global().unwrap_or_else(|e| panic!("{e}"));
        let mut sh = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                "sleep 30 & echo $! > /dev/stdout; exec sh -c 'sleep 31 & echo $!; wait'",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut out = String::new();
        {
            use std::io::BufRead;
            let stdout = sh.stdout.take().unwrap_or_else(|| unreachable!());
            let mut lines = std::io::BufReader::new(stdout).lines();
            for _ in 0..2 {
                out.push_str(&lines.next().and_then(|l| l.ok()).unwrap_or_default());
                out.push(' ');
            }
        }
        let pids: Vec<u32> = out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        let (before, after) = (pids[0], pids[1]);
        let got = (
            events.credits(sh.id(), before),
            events.credits(sh.id(), after),
            events.exec_gen(sh.id()),
        );
        for p in [before, after] {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = sh.kill();
        let _ = sh.wait();
        assert_eq!(got, (false, true, Some(2)));
    }
}

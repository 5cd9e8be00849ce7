//! What a sandbox's processes did that /proc cannot tell afterwards: which process called
//! `connect` on a socket, and which processes existed when another one started a new program.
//!
//! Both backends' workload filters turn `connect` into a seccomp user notification (the process
//! backend's supervisor carries out each connect itself; the guest agent lets it continue once
//! recorded), and the handler calls [`Lineage::record_connect`] **before** the call proceeds.
//! Execs are learnt differently on each backend: in the guest the filter notifies `execve` and
//! `execveat` too and the agent calls [`Lineage::record_exec`] before they proceed; on the host
//! the kernel's process events say every fork and exec ([`Lineage::from_events`],
//! `process::proc_events`), so the workload never waits on the supervisor to exec. Either way
//! a record precedes what it records:
//!
//! - a connect to the egress proxy records the socket's inode with the calling process and
//!   its executable then. The proxy credits a connection to that process only, never to
//!   whichever process happens to hold the socket later.
//! - an exec records a sequence number for the process (the proxy denies a connection whose
//!   process started another program after its connect) and the process's descendants at
//!   that moment: they were created by the program it ran before, so the program it runs
//!   after does not count as their ancestor. A process that execs with several threads (any
//!   of which could create a child unseen between the record and the exec) counts for nobody
//!   until its next single-threaded exec.
//!
//! Processes are named by [`ProcKey`] (pid and start time), so a reused pid is never taken
//! for the process that had it before. The tables are bounded: entries of processes that
//! ended are pruned, and a table that stays full makes every question answer "no" (deny).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A process: its pid and start time (clock ticks after boot, field 22 of `/proc/PID/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcKey {
    pub pid: u32,
    pub start: u64,
}

/// Who connected a socket to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect {
    pub process: ProcKey,
    /// Device and inode of its executable at the call.
    pub exe: (u64, u64),
    /// The sequence number at the call.
    pub seq: u64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Exec {
    seq: u64,
    /// Descendants at the last exec.
    before: HashSet<ProcKey>,
    /// The last exec came from a process with several threads.
    multithreaded: bool,
}

#[derive(Debug, Default)]
struct State {
    seq: u64,
    execs: HashMap<ProcKey, Exec>,
    connects: HashMap<u64, Connect>,
    /// A table stayed full after pruning: answers are "no" from now on.
    overflowed: bool,
}

/// Most processes with exec records, and most recorded connects.
const MAX_EXECS: usize = 65_536;
const MAX_CONNECTS: usize = 65_536;
/// Tables are pruned when they reach this size.
const PRUNE_AT: usize = 4096;
/// A connect record is kept at least this long (the proxy reads it when it accepts the
/// connection and again after the request head, within its header timeout).
const CONNECT_KEEP: Duration = Duration::from_secs(120);
/// Most descendants recorded for one exec.
const MAX_DESCENDANTS: usize = 16_384;

/// One sandbox's record (see the module docs). Shared by its notification handlers and the
/// egress proxy.
#[derive(Debug)]
pub struct Lineage {
    proc_root: PathBuf,
    state: Mutex<State>,
    /// The process backend: forks and execs come from the host's process events instead of
    /// notifications (which would make every exec wait on the supervisor).
    events: Option<std::sync::Arc<crate::process::proc_events::ProcEvents>>,
}

/// `(start time, parent pid)` of a `/proc/PID/stat` text.
pub fn parse_stat(text: &str) -> Option<(u64, u32)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, ppid))
}

impl Lineage {
    /// A record reading `/proc` (the guest's, or the host's with host pids).
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    /// A record reading another procfs mount (tests).
    pub fn with_proc_root(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            state: Mutex::new(State::default()),
            events: None,
        }
    }

    /// A record whose forks and execs are the host's process events (the process backend);
    /// only connects are recorded into it.
    pub fn from_events(events: std::sync::Arc<crate::process::proc_events::ProcEvents>) -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            state: Mutex::new(State::default()),
            events: Some(events),
        }
    }

    fn read(&self, pid: u32, file: &str) -> Option<String> {
        std::fs::read_to_string(self.proc_root.join(pid.to_string()).join(file)).ok()
    }

    fn key(&self, pid: u32) -> Option<ProcKey> {
        let (start, _) = parse_stat(&self.read(pid, "stat")?)?;
        Some(ProcKey { pid, start })
    }

    /// The thread group and thread count of thread `tid`.
    fn thread_group(&self, tid: u32) -> Option<(u32, u32)> {
        let status = self.read(tid, "status")?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u32>().ok())
        };
        Some((field("Tgid:")?, field("Threads:")?))
    }

    /// Children of `pid`, from its threads' `children` files, or (kernels without
    /// CONFIG_PROC_CHILDREN, as the guest's) from every process's parent.
    fn children(&self, pid: u32, parents: &mut Option<HashMap<u32, Vec<u32>>>) -> Vec<u32> {
        let tasks = self.proc_root.join(pid.to_string()).join("task");
        let mut found = Vec::new();
        let mut have_files = false;
        if let Ok(entries) = std::fs::read_dir(&tasks) {
            for entry in entries.flatten() {
                if let Ok(text) = std::fs::read_to_string(entry.path().join("children")) {
                    have_files = true;
                    found.extend(
                        text.split_whitespace()
                            .filter_map(|p| p.parse::<u32>().ok()),
                    );
                }
            }
        }
        if have_files {
            return found;
        }
        let map = parents.get_or_insert_with(|| {
            let mut map: HashMap<u32, Vec<u32>> = HashMap::new();
            if let Ok(entries) = std::fs::read_dir(&self.proc_root) {
                for entry in entries.flatten() {
                    let Some(child) = entry
                        .file_name()
                        .to_str()
                        .and_then(|n| n.parse::<u32>().ok())
                    else {
                        continue;
                    };
                    if let Some((_, parent)) =
                        self.read(child, "stat").as_deref().and_then(parse_stat)
                    {
                        map.entry(parent).or_default().push(child);
                    }
                }
            }
            map
        });
        map.get(&pid).cloned().unwrap_or_default()
    }

    /// The descendants of `pid` now; `None` if there are more than [`MAX_DESCENDANTS`].
    fn descendants(&self, pid: u32) -> Option<HashSet<ProcKey>> {
        let mut parents = None;
        let mut found = HashSet::new();
        let mut queue = vec![pid];
        while let Some(p) = queue.pop() {
            for child in self.children(p, &mut parents) {
                let Some(key) = self.key(child) else { continue };
                if found.insert(key) {
                    if found.len() > MAX_DESCENDANTS {
                        return None;
                    }
                    queue.push(child);
                }
            }
        }
        Some(found)
    }

    /// Thread `tid` is about to call `execve`/`execveat`. Call before letting it proceed.
    pub fn record_exec(&self, tid: u32) {
        let Some((tgid, threads)) = self.thread_group(tid) else {
            return;
        };
        let Some(key) = self.key(tgid) else { return };
        let (before, multithreaded) = if threads > 1 {
            (HashSet::new(), true)
        } else {
            match self.descendants(tgid) {
                Some(d) => (d, false),
                None => (HashSet::new(), true),
            }
        };
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.seq += 1;
        let seq = state.seq;
        state.execs.insert(
            key,
            Exec {
                seq,
                before,
                multithreaded,
            },
        );
        if state.execs.len() >= PRUNE_AT {
            self.prune(&mut state);
        }
    }

    /// Thread `tid` is about to connect the socket with inode `inode` to the proxy. Call
    /// before the connect happens.
    pub fn record_connect(&self, tid: u32, inode: u64) {
        let Some((tgid, _)) = self.thread_group(tid) else {
            return;
        };
        let Some(key) = self.key(tgid) else { return };
        let exe = self.proc_root.join(tgid.to_string()).join("exe");
        let Ok(meta) = std::fs::metadata(exe) else {
            return;
        };
        // With process events the sequence is the process's own exec generation (all its
        // execs so far are in the queue, which this drains); a process they do not know
        // gets no record, and its connection is denied.
        let generation = match &self.events {
            Some(events) => match events.exec_gen(tgid) {
                Some(g) => Some(g),
                None => return,
            },
            None => None,
        };
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.seq += 1;
        let record = Connect {
            process: key,
            exe: (meta.dev(), meta.ino()),
            seq: generation.unwrap_or(state.seq),
            at: Instant::now(),
        };
        state.connects.insert(inode, record);
        if state.connects.len() >= PRUNE_AT {
            let now = Instant::now();
            state
                .connects
                .retain(|_, c| now.duration_since(c.at) < CONNECT_KEEP);
            if state.connects.len() >= MAX_CONNECTS {
                // The oldest go; a connection whose record went is denied.
                let mut ages: Vec<Instant> = state.connects.values().map(|c| c.at).collect();
                ages.sort();
                let cut = ages[ages.len() / 2];
                state.connects.retain(|_, c| c.at > cut);
            }
        }
    }

    /// Drop the records of processes that ended; mark the table overflowed if it stays full.
    fn prune(&self, state: &mut State) {
        state.execs.retain(|key, _| self.key(key.pid) == Some(*key));
        for exec in state.execs.values_mut() {
            exec.before.retain(|key| self.key(key.pid) == Some(*key));
        }
        if state.execs.len() >= MAX_EXECS {
            tracing::warn!(
                event = "sandbox.lineage_overflow",
                "too many processes to follow: no process counts as an ancestor from now on"
            );
            state.overflowed = true;
            state.execs.clear();
        }
    }

    /// Who connected the socket with this inode.
    pub fn connector(&self, inode: u64) -> Option<Connect> {
        self.state.lock().ok()?.connects.get(&inode).copied()
    }

    /// Whether `parent` counts as `child`'s ancestor: it has not started another program
    /// since `child` was created.
    pub fn credits(&self, parent: ProcKey, child: ProcKey) -> bool {
        if let Some(events) = &self.events {
            return events.credits(parent.pid, child.pid);
        }
        let Ok(state) = self.state.lock() else {
            return false;
        };
        if state.overflowed {
            return false;
        }
        match state.execs.get(&parent) {
            None => true,
            Some(exec) => !exec.multithreaded && !exec.before.contains(&child),
        }
    }

    /// The sequence number of the process's last exec (0: none seen). After an overflow,
    /// the largest number, so nothing can be credited.
    pub fn exec_seq(&self, process: ProcKey) -> u64 {
        if let Some(events) = &self.events {
            return events.exec_gen(process.pid).unwrap_or(u64::MAX);
        }
        let Ok(state) = self.state.lock() else {
            return u64::MAX;
        };
        if state.overflowed {
            return u64::MAX;
        }
        state.execs.get(&process).map_or(0, |e| e.seq)
    }
}

impl Default for Lineage {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn me() -> ProcKey {
        let pid = std::process::id();
        let text = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let (start, _) = parse_stat(&text).unwrap_or_else(|| panic!("stat"));
        ProcKey { pid, start }
    }

    /// This process execs (as far as the record knows) while a child it made runs: the child
    /// no longer credits it; a child made afterwards does.
    #[test]
    fn an_exec_after_a_fork_does_not_lend_the_new_program() {
        let lineage = Lineage::new();
        let mut before = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let before_key = lineage.key(before.id()).unwrap_or_else(|| panic!("key"));
        assert!(lineage.credits(me(), before_key));
        // The test binary has several threads; record as the exec of a single-threaded
        // process would, through the same path the handlers use for descendants.
        let descendants = lineage.descendants(std::process::id()).unwrap_or_default();
        assert!(descendants.contains(&before_key));
        {
            let mut state = lineage.state.lock().unwrap_or_else(|e| panic!("{e}"));
            state.seq += 1;
            let seq = state.seq;
            state.execs.insert(
                me(),
                Exec {
                    seq,
                    before: descendants,
                    multithreaded: false,
                },
            );
        }
        let mut after = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let after_key = lineage.key(after.id()).unwrap_or_else(|| panic!("key"));
        let got = (
            lineage.credits(me(), before_key),
            lineage.credits(me(), after_key),
            lineage.exec_seq(me()),
        );
        for child in [&mut before, &mut after] {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert_eq!(got, (false, true, 1));
    }

    #[test]
    fn a_multithreaded_exec_credits_nobody_and_connects_are_recorded() {
        let lineage = Lineage::new();
        // This test process has several threads (the test harness's).
        lineage.record_exec(std::process::id());
        let anyone = ProcKey { pid: 1, start: 1 };
        assert_eq!(lineage.credits(me(), anyone), false);
        lineage.record_connect(std::process::id(), 4242);
        let c = lineage
            .connector(4242)
            .unwrap_or_else(|| panic!("no record"));
        assert_eq!((c.process, c.seq > lineage.exec_seq(me())), (me(), true));
        assert_eq!(lineage.connector(4343), None);
    }

    #[test]
    fn parses_stat() {
        let stat = "10 (a) (b) S 7 10 10 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 4321 1000";
        assert_eq!(parse_stat(stat), Some((4321, 7)));
    }
}

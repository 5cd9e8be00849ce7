//! The workload never holds the supervisor's terminal or files: it gets a terminal of its own
//! (when the supervisor's stdin is a terminal) or pipes, which the supervisor relays. Verdicts
//! are read on the host: the caller's file, the caller's terminal settings, the keystrokes left
//! unread in it, the supervisor's state, and which host processes hold the caller's file.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::termios::{ControlFlags, InputFlags, LocalFlags, OutputFlags};
use nix::unistd::Pid;
use pretty_assertions::assert_eq;

use super::common::*;

/// A pseudo-terminal the test owns: the supervisor runs on the slave, the test types into and
/// reads from the master (the caller's terminal, as far as the supervisor can tell).
struct Terminal {
    master: OwnedFd,
    slave: OwnedFd,
    /// Everything the master has read so far.
    output: Arc<Mutex<Vec<u8>>>,
}

impl Terminal {
    fn new(rows: u16, cols: u16) -> Terminal {
        let size = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
        for fd in [&pty.master, &pty.slave] {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .expect("cloexec");
        }
        // Read the master all along, so the supervisor never blocks writing to its terminal.
        // The reader ends (EIO) once the test drops its slave after the supervisor is gone.
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = std::fs::File::from(pty.master.try_clone().expect("dup master"));
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("output").extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            master: pty.master,
            slave: pty.slave,
            output,
        }
    }

    fn slave(&self) -> Stdio {
        Stdio::from(self.slave.try_clone().expect("dup slave"))
    }

    fn path(&self) -> PathBuf {
        nix::unistd::ttyname(&self.slave).expect("ttyname")
    }

    fn type_in(&self, bytes: &[u8]) {
        let mut f = std::fs::File::from(self.master.try_clone().expect("dup master"));
        f.write_all(bytes).expect("type into the terminal");
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("output")).replace('\r', "")
    }

    /// The terminal's settings, as the caller's shell would find them.
    fn settings(&self) -> Settings {
        let t = nix::sys::termios::tcgetattr(&self.slave).expect("tcgetattr");
        (
            t.input_flags,
            t.output_flags,
            t.control_flags,
            t.local_flags,
            t.control_chars.to_vec(),
        )
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize structure, which lives on this stack frame.
        let r = unsafe {
            libc::ioctl(
                self.master.as_raw_fd(),
                libc::TIOCSWINSZ as _,
                &ws as *const libc::winsize,
            )
        };
        assert_eq!(r, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    /// Bytes typed but not read by anyone yet.
    fn unread(&self) -> i32 {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int, which lives on this stack frame.
        let r = unsafe { libc::ioctl(self.slave.as_raw_fd(), libc::FIONREAD as _, &mut n) };
        assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
        n
    }
}

type Settings = (InputFlags, OutputFlags, ControlFlags, LocalFlags, Vec<u8>);

/// Run `cmd` as the leader of a new session whose controlling terminal is `tty` (one of the
/// descriptors it gets), in the terminal's foreground: a login shell's position.
fn on_terminal(cmd: &mut Command, tty: &Terminal) {
    let fd = tty.slave.as_raw_fd();
    // SAFETY: runs in the forked child before exec and only makes async-signal-safe calls
    // (setsid, ioctl) on a descriptor the child inherited.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            if libc::ioctl(fd, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Wait (bounded) for `child` to end; kill it if it does not.
fn finish(child: &mut Child, limit: Duration) -> Option<i32> {
    let ended = wait_until(limit, || child.try_wait().expect("try_wait").is_some());
    if !ended {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait");
    assert!(ended, "the supervisor did not end within {limit:?}");
    status.code()
}

/// Host processes other than `except` with a descriptor open on `path`, as (pid, name).
fn holders_of(path: &Path, except: &[i32]) -> Vec<(i32, String)> {
    use std::os::unix::fs::MetadataExt;
    // Compared by device and inode, not by name: a sandbox's own devpts has a `/dev/pts/0` too.
    let want = std::fs::metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .expect("stat the terminal");
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if except.contains(&pid) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == want))
        {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            found.push((pid, comm.trim().to_owned()));
        }
    }
    found
}

/// The one-letter state of `pid` in /proc (`T`: stopped).
fn state_of(pid: i32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name, which may itself contain spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or("?")
        .to_owned()
}

/// The caller's stdout and stderr are a log file that already holds a line. The workload
/// truncates fds 1 and 2 (ftruncate) and `/proc/self/fd/1` and writes a marker each way: the
/// file still starts with the line and has both markers, and while the workload runs no host
/// process but the supervisor holds the file (not the workload, not a helper, not a VMM).
#[test]
fn the_workload_cannot_truncate_the_callers_output_file() {
    if !can_run("the_workload_cannot_truncate_the_callers_output_file") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        // Outside the policy's paths: the workload cannot open it by name either.
        let log = s.outside.join("caller.log");
        std::fs::write(&log, "original line\n").expect("write the log");
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&log)
            .expect("open the log");
        let script = format!(
            "{PROBE} ftruncate 1; {PROBE} ftruncate 2; truncate -s0 /proc/self/fd/1; \
             echo marker-out; echo marker-err >&2; touch written; \
             until [ -e checked ]; do sleep 0.05; done"
        );
        let mut child = s
            .command(backend, &[], &["/bin/sh", "-c", &script])
            .stdout(file.try_clone().expect("dup log"))
            .stderr(file)
            .spawn()
            .expect("spawn");
        assert!(
            wait_until(Duration::from_secs(60), || s.work.join("written").exists()),
            "{backend}: the workload ran"
        );
        let holders = holders_of(&log, &[child.id() as i32]);
        std::fs::write(s.work.join("checked"), "").expect("release the workload");
        let code = finish(&mut child, Duration::from_secs(60));
        let text = std::fs::read_to_string(&log).expect("read the log");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            (
                backend,
                code,
                lines.first().copied(),
                // Both still arrive appended; stdout and stderr are two pipes relayed apart,
                // so a line of one may land inside a line of the other.
                text.contains("marker-out"),
                text.contains("marker-err"),
                holders
            ),
            (backend, Some(0), Some("original line"), true, true, vec![]),
            "the log:\n{text}"
        );
    }
}

/// Run `script` with `flags` by a supervisor on a terminal of the test's; `stop`, when given,
/// is the signal the test sends the supervisor once the workload created `changed`. Returns the
/// terminal's settings before and after, the exit code, and whether the workload changed its
/// own terminal's settings.
fn settings_around(
    backend: &str,
    flags: &[&str],
    script: &str,
    stop: Option<Signal>,
) -> (Settings, Settings, Option<i32>, bool) {
    let s = Scratch::new("");
    let tty = Terminal::new(24, 80);
    let before = tty.settings();
    let mut cmd = s.command(backend, flags, &["/bin/sh", "-c", script]);
    cmd.stdin(tty.slave())
        .stdout(tty.slave())
        .stderr(tty.slave());
    on_terminal(&mut cmd, &tty);
    let mut child = cmd.spawn().expect("spawn");
    if let Some(sig) = stop {
        assert!(
            wait_until(Duration::from_secs(60), || s.work.join("changed").exists()),
            "{backend}: the workload ran: {}",
            tty.output()
        );
        kill(Pid::from_raw(child.id() as i32), sig).expect("signal the supervisor");
    }
    let code = finish(&mut child, Duration::from_secs(60));
    let after = tty.settings();
    (before, after, code, s.work.join("changed").exists())
}

/// The supervisor runs on the caller's terminal; the workload changes its terminal's settings
/// (no echo, no canonical mode, raw) and ends: normally, killed by a signal, killed by
/// `--timeout`, or killed after ignoring a SIGTERM for `--stop-grace`. Each time the caller's
/// terminal has the settings it had before.
#[test]
fn the_workload_cannot_change_the_callers_terminal_settings() {
    if !can_run("the_workload_cannot_change_the_callers_terminal_settings") {
        return;
    }
    struct Case {
        name: &'static str,
        flags: &'static [&'static str],
        script: String,
        stop: Option<Signal>,
        code: i32,
    }
    let change = "stty -echo -icanon min 1 && stty raw && touch changed";
    let cases = [
        Case {
            name: "exits",
            flags: &[],
            script: format!("{change}; exit 3"),
            stop: None,
            code: 3,
        },
        Case {
            name: "killed",
            flags: &[],
            script: format!("{change}; kill -KILL $$"),
            stop: None,
            code: 137,
        },
        Case {
            name: "timeout",
            flags: &["--timeout", "1"],
            script: format!("{change}; sleep 600"),
            stop: None,
            code: 124,
        },
        Case {
            name: "stop grace",
            flags: &["--stop-grace", "1"],
            script: format!("trap '' TERM; {change}; while :; do sleep 0.1; done"),
            stop: Some(Signal::SIGTERM),
            code: 137,
        },
    ];
    for backend in backends() {
        for case in &cases {
            let (before, after, code, changed) =
                settings_around(backend, case.flags, &case.script, case.stop);
            assert_eq!(
                (backend, case.name, after, code, changed),
                (backend, case.name, before, Some(case.code), true)
            );
        }
    }
}

/// The supervisor runs on the caller's terminal in a background process group (a job-control
/// shell's `&`; the shell's group has the terminal). The test types `secret` into the terminal
/// while the workload tries to read its stdin: the workload gets none of it, the bytes are
/// still unread in the caller's terminal, and the supervisor was stopped (SIGTTOU/SIGTTIN), as
/// any background program touching its terminal is.
#[test]
fn a_background_supervisor_passes_no_keystrokes_to_the_workload() {
    if !can_run("a_background_supervisor_passes_no_keystrokes_to_the_workload") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let tty = Terminal::new(24, 80);
        let pid_file = s.outside.join("supervisor.pid");
        // dash with job control (-m) puts `&` jobs in a process group of their own and keeps
        // the terminal for itself; exec'ing sleep keeps that group in the foreground.
        let job = format!("\"$@\" & echo $! > {}; exec sleep 600", pid_file.display());
        let sandbox = s.command(
            backend,
            &[],
            &[
                "/bin/sh",
                "-c",
                "touch ready; timeout 5 cat > stolen; touch done",
            ],
        );
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-m", "-c", &job, "sh"])
            .arg(sandbox.get_program())
            .args(sandbox.get_args())
            .stdin(tty.slave())
            .stdout(tty.slave())
            .stderr(tty.slave());
        on_terminal(&mut cmd, &tty);
        let mut shell = cmd.spawn().expect("spawn the shell");
        assert!(
            wait_until(Duration::from_secs(60), || s.work.join("ready").exists()),
            "{backend}: the workload ran: {}",
            tty.output()
        );
        tty.type_in(b"secret\n");
        let done = wait_until(Duration::from_secs(60), || s.work.join("done").exists());
        let supervisor: i32 = std::fs::read_to_string(&pid_file)
            .expect("the supervisor's pid")
            .trim()
            .parse()
            .expect("a pid");
        let state = state_of(supervisor);
        let unread = tty.unread();
        let stolen = std::fs::read_to_string(s.work.join("stolen")).unwrap_or_default();
        let _ = kill(Pid::from_raw(supervisor), Signal::SIGKILL);
        let _ = shell.kill();
        let _ = shell.wait();
        assert_eq!(
            (backend, done, stolen, state, unread),
            (backend, true, String::new(), "T".to_owned(), 7),
            "the terminal showed: {}",
            tty.output()
        );
    }
}

/// The workload's terminal has the caller's terminal's size, and follows it when it changes
/// (resize + SIGWINCH to the supervisor). While it runs, no host process but the supervisor
/// holds the caller's terminal.
#[test]
fn the_workload_terminal_follows_the_callers_window_size() {
    if !can_run("the_workload_terminal_follows_the_callers_window_size") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let tty = Terminal::new(33, 101);
        let script = "stty size; i=0; \
                      while [ \"$(stty size)\" = '33 101' ] && [ $i -lt 600 ]; do \
                      sleep 0.1; i=$((i+1)); done; stty size";
        let mut cmd = s.command(backend, &[], &["/bin/sh", "-c", script]);
        cmd.stdin(tty.slave())
            .stdout(tty.slave())
            .stderr(tty.slave());
        on_terminal(&mut cmd, &tty);
        let mut child = cmd.spawn().expect("spawn");
        assert!(
            wait_until(Duration::from_secs(60), || tty.output().contains("33 101")),
            "{backend}: the workload reported its size: {}",
            tty.output()
        );
        let holders = holders_of(&tty.path(), &[child.id() as i32, std::process::id() as i32]);
        tty.resize(44, 120);
        kill(Pid::from_raw(child.id() as i32), Signal::SIGWINCH).expect("SIGWINCH");
        let code = finish(&mut child, Duration::from_secs(60));
        let output = tty.output();
        let sizes: Vec<&str> = output
            .lines()
            .map(str::trim)
            .filter(|l| l.split(' ').all(|w| w.parse::<u16>().is_ok()) && l.contains(' '))
            .collect();
        assert_eq!(
            (backend, code, sizes, holders),
            (backend, Some(0), vec!["33 101", "44 120"], vec![]),
            "the terminal showed: {output}"
        );
    }
}

/// ^C typed at the caller's terminal interrupts the workload (which exits 42 from its trap) and
/// nothing else, on both backends: with pipes (stdin not a terminal) the supervisor gets the
/// SIGINT and forwards it, and no helper or VMM of the sandbox is in the terminal's foreground
/// group to get it too; with a terminal of its own (raw mode) the byte reaches the workload's
/// terminal, which makes the SIGINT.
#[test]
fn ctrl_c_at_the_callers_terminal_interrupts_only_the_workload() {
    if !can_run("ctrl_c_at_the_callers_terminal_interrupts_only_the_workload") {
        return;
    }
    for backend in backends() {
        for stdin_is_terminal in [false, true] {
            let s = Scratch::new("");
            let tty = Terminal::new(24, 80);
            let script = "trap 'exit 42' INT; touch ready; while :; do sleep 0.1; done";
            let mut cmd = s.command(backend, &[], &["/bin/sh", "-c", script]);
            if stdin_is_terminal {
                cmd.stdin(tty.slave());
            }
            cmd.stdout(tty.slave()).stderr(tty.slave());
            on_terminal(&mut cmd, &tty);
            let mut child = cmd.spawn().expect("spawn");
            assert!(
                wait_until(Duration::from_secs(60), || s.work.join("ready").exists()),
                "{backend}: the workload ran: {}",
                tty.output()
            );
            tty.type_in(b"\x03");
            let code = finish(&mut child, Duration::from_secs(60));
            assert_eq!(
                (backend, stdin_is_terminal, code),
                (backend, stdin_is_terminal, Some(42)),
                "the terminal showed: {}",
                tty.output()
            );
        }
    }
}

/// The caller's stdout is a pipe whose reader leaves after a few bytes (`| head -c 10`): the
/// workload writing into it ends with SIGPIPE (141), as in any pipeline, instead of running on
/// with its output relayed and dropped (vm: the host tells the agent to deliver the SIGPIPE).
#[test]
fn a_workload_writing_into_a_closed_pipe_ends_with_sigpipe() {
    if !can_run("a_workload_writing_into_a_closed_pipe_ends_with_sigpipe") {
        return;
    }
    for backend in backends() {
        let s = Scratch::new("");
        let mut child = s
            .command(backend, &[], &["/usr/bin/yes"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut out = child.stdout.take().expect("stdout");
        let mut head = [0u8; 10];
        out.read_exact(&mut head).expect("read the first bytes");
        drop(out);
        let code = finish(&mut child, Duration::from_secs(60));
        assert_eq!(
            (backend, &head, code),
            (backend, b"y\ny\ny\ny\ny\n", Some(128 + 13))
        );
    }
}

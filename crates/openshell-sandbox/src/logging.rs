//! Log set-up: the supervisor's logs never reach the workload's stdout.
//!
//! Levels: `error` the sandbox failed; `warn` something was weakened or refused (best-effort
//! Landlock, skipped paths, timeouts); `info` lifecycle and security decisions (one structured
//! event each, `event = "sandbox.*"`); `debug` internal steps. Default: `warn`.

use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// A writer that puts `openshell: ` before each line written to stderr.
#[derive(Clone, Copy)]
struct PrefixedStderr;

struct PrefixedStderrWriter;

impl Write for PrefixedStderrWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut out = Vec::with_capacity(buf.len() + 16);
        for line in buf.split_inclusive(|b| *b == b'\n') {
            out.extend_from_slice(b"openshell: ");
            out.extend_from_slice(line);
        }
        std::io::stderr().lock().write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for PrefixedStderr {
    type Writer = PrefixedStderrWriter;
    fn make_writer(&'a self) -> Self::Writer {
        PrefixedStderrWriter
    }
}

pub struct Guard;

pub fn init(level: Option<&str>, format: LogFormat, file: Option<&Path>) -> anyhow::Result<Guard> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).with_context(|| format!("--log-level {l:?}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match (file, format) {
        (Some(path), format) => {
            let f = crate::protect::open_append(path)
                .with_context(|| format!("--log-file {}", path.display()))?;
            let w = Mutex::new(f);
            match format {
                LogFormat::Json => builder.json().with_writer(w).init(),
                LogFormat::Text => builder.with_ansi(false).with_writer(w).init(),
            }
        }
        (None, LogFormat::Json) => builder.json().with_writer(std::io::stderr).init(),
        (None, LogFormat::Text) => builder
            .with_ansi(false)
            .without_time()
            .with_writer(PrefixedStderr)
            .init(),
    }
    Ok(Guard)
}

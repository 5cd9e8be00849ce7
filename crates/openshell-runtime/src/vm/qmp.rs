//! A small QMP client (QEMU's JSON machine protocol, one JSON object per line over a Unix
//! socket): what the qemu engine's templates need to snapshot a parked guest and restore it
//! (`stop`, `migrate`, `migrate-incoming`, `query-migrate`, `cont`, `quit`).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// What went wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP: {0}")]
    Io(#[source] std::io::Error),
    #[error("QMP closed the connection during {0}")]
    Closed(String),
    #[error("QMP sent something that is not a JSON object: {0:?}")]
    Garbage(String),
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("migration {status}: {desc}")]
    Migration { status: String, desc: String },
    #[error("QMP {0} did not finish within {1:?}")]
    Timeout(String, Duration),
}

/// How long QEMU may take to answer one command.
const REPLY_LIMIT: Duration = Duration::from_secs(30);

/// A QMP connection in command mode.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Connect to QEMU's QMP socket at `path` (retrying while QEMU starts, for up to `limit`),
    /// read the greeting and enter command mode.
    /// Connect to QEMU's QMP socket at `path`; the listener must be `uid`'s (the jailed QEMU):
    /// the socket lies in a directory that user can write.
    pub async fn connect(path: &Path, uid: u32, limit: Duration) -> Result<Qmp, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => {
                    let peer = s.peer_cred().map_err(|source| QmpError::Connect {
                        path: path.display().to_string(),
                        source,
                    })?;
                    if peer.uid() != uid {
                        return Err(QmpError::Connect {
                            path: path.display().to_string(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::PermissionDenied,
                                format!("not QEMU's socket (uid {})", peer.uid()),
                            ),
                        });
                    }
                    break s;
                }
                Err(source) if start.elapsed() > limit => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        source,
                    })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        qmp.read_message("the greeting").await?;
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// The next message; QEMU answers every command at once (a migration is polled), so one
    /// that says nothing within [`REPLY_LIMIT`] is stuck (e.g. on a vhost-user daemon).
    async fn read_message(&mut self, during: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = tokio::time::timeout(REPLY_LIMIT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout(during.to_owned(), REPLY_LIMIT))?
            .map_err(QmpError::Io)?;
        if n == 0 {
            return Err(QmpError::Closed(during.to_owned()));
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.is_object() => Ok(v),
            _ => Err(QmpError::Garbage(line.trim().chars().take(200).collect())),
        }
    }

    /// Run one command and return its `return` value; events that arrive meanwhile are
    /// skipped.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(QmpError::Io)?;
        loop {
            let reply = self.read_message(command).await?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            let err = reply.get("error").cloned().unwrap_or(Value::Null);
            return Err(QmpError::Command {
                command: command.to_owned(),
                class: err["class"].as_str().unwrap_or("unknown").to_owned(),
                desc: err["desc"].as_str().unwrap_or("no description").to_owned(),
            });
        }
    }

    /// The migration settings both ends of a template's file migration use: the `mapped-ram`
    /// capability (each page at a fixed offset of a sparse file: a restore reads only the pages
    /// the guest touched) and `mode=cpr-reboot` (the source is stopped first, so the vsock
    /// daemon needs no dirty-page log).
    pub async fn set_file_migration(&mut self) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": "mapped-ram", "state": true }] })),
        )
        .await?;
        self.execute(
            "migrate-set-parameters",
            Some(json!({ "mode": "cpr-reboot" })),
        )
        .await?;
        Ok(())
    }

    /// Poll `query-migrate` until the migration completed (`Ok`), failed or was cancelled
    /// (`Err`), or `limit` passed.
    pub async fn wait_migration(&mut self, limit: Duration) -> Result<(), QmpError> {
        let start = Instant::now();
        loop {
            let state = self.execute("query-migrate", None).await?;
            match state["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                status @ ("failed" | "cancelled") => {
                    return Err(QmpError::Migration {
                        status: status.to_owned(),
                        desc: state["error-desc"]
                            .as_str()
                            .unwrap_or("no description")
                            .to_owned(),
                    })
                }
                _ => {}
            }
            if start.elapsed() > limit {
                return Err(QmpError::Timeout("migration".into(), limit));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

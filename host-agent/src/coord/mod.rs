//! Backup coordination across hosts (EP 1 148 416 [0063]-[0071]): the management console
//! (`hvmctl backup run`), the database host (quiesce hooks, a consistency group's
//! snapshot, all inside a bounded freeze) and the backup host (copies the snapshot
//! straight from the array through its own plugin, or pulls the database host's snapshot
//! export over NBD, and writes an image and a manifest).
//!
//! Agents serve this on a TCP port with TLS only ([`tls`]). The protocol is one JSON
//! request line per connection, `{"token", "id", "op"}`, answered by zero or more
//! `{"progress": ...}` lines and one `{"ok": ...}` or `{"error": ...}` line. A request
//! without the shared token is refused before anything else is looked at. Every request
//! carries an id: a retried request (the same id and operation) is not done again; it
//! waits for and gets the first one's answer.
//!
//! - [`server`]: the listener, authentication and the id table;
//! - [`freeze`]: the database role: hooks, the group snapshot, delete and resync;
//! - [`hooks`]: command, `fsfreeze` and PostgreSQL hooks;
//! - [`copy`]: the backup role's copy into a repository ([`crate::backups`]);
//! - [`repository`]: the backup role's list, verify, prune and restore;
//! - [`inplace`]: restore in place: the database role's fence and the console's steps;
//! - [`console`]: `hvmctl backup run`.

pub mod console;
pub mod copy;
pub mod freeze;
pub mod hooks;
pub mod inplace;
pub mod repository;
pub mod server;
pub mod tls;
pub mod tracking;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One request: the first and only line a client sends.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub token: String,
    /// Chosen by the client; a retry carries the same id.
    pub id: String,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// The agent's roles and version; checks the token.
    Hello,
    /// Database role: quiesce, snapshot the virtual LUs at one instant, resume.
    Snapshot {
        vlus: Vec<String>,
        /// Shorter than the configured deadline, if given; never longer.
        #[serde(default)]
        deadline_ms: Option<u64>,
        /// Extra `HVM_*` variables for command hooks.
        #[serde(default)]
        vars: BTreeMap<String, String>,
        /// The backup the console chose an id for: each virtual LU's changed-block record
        /// is cut at the snapshot instant and the reply's `changes` says what was written
        /// since the last completed backup ([`tracking`]).
        #[serde(default)]
        backup: Option<String>,
    },
    /// Database role: delete the snapshots (resync starts). Deleting what is already
    /// deleted is not an error.
    Delete { vlus: Vec<String> },
    /// Database role: resync progress.
    Resync { vlus: Vec<String> },
    /// Database role: compare the legs of each (Synchronized) virtual LU.
    Verify { vlus: Vec<String> },
    /// Database role: counters (bytes read through snapshot exports).
    Counters,
    /// Database role: `backup` is stored; it becomes the virtual LUs' tracking base.
    /// Idempotent.
    Complete { vlus: Vec<String>, backup: String },
    /// Database role: `backup` failed; the ranges its snapshot's cut took count as
    /// written again. Idempotent.
    Abort { vlus: Vec<String>, backup: String },
    /// Database role: before a restore in place, put up the virtual LU's fence (new NBD
    /// connections refused unless they carry its ticket) and check that no client has
    /// it open; with `force`, run `coordination.restore.stop` first. Answers the ticket.
    RestoreFence {
        vlu: String,
        #[serde(default)]
        force: bool,
        /// The backup being restored, for the stop command's `HVM_BACKUP`.
        #[serde(default)]
        backup: String,
    },
    /// Database role: take down the fence `ticket` put up. Idempotent.
    RestoreUnfence { vlu: String, ticket: String },
    /// Backup role: store snapshots in a repository under `target_root`.
    Copy(CopyRequest),
    /// Backup role: the catalog's backups, synchronised with the repositories' manifests
    /// first (`rebuild`: from nothing).
    BackupList {
        #[serde(default)]
        target: Option<String>,
        #[serde(default)]
        vlu: Option<String>,
        #[serde(default)]
        rebuild: bool,
    },
    /// Backup role: read every chunk of a backup and check it against its name.
    BackupVerify { backup: String },
    /// Backup role: delete the backups of a repository that `keep` does not keep (none
    /// if `dry_run`), then the chunks no manifest names.
    BackupPrune {
        target: String,
        #[serde(default)]
        keep: Option<crate::backups::retention::Keep>,
        #[serde(default)]
        dry_run: bool,
    },
    /// Backup role: write a virtual LU's image at a backup to a new file or a block
    /// device on the backup host, or onto the live virtual LU over NBD.
    BackupRestore(RestoreRequest),
}

impl Op {
    /// The operation's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Snapshot { .. } => "snapshot",
            Op::Delete { .. } => "delete",
            Op::Resync { .. } => "resync",
            Op::Verify { .. } => "verify",
            Op::Counters => "counters",
            Op::Complete { .. } => "complete",
            Op::Abort { .. } => "abort",
            Op::RestoreFence { .. } => "restore_fence",
            Op::RestoreUnfence { .. } => "restore_unfence",
            Op::Copy(_) => "copy",
            Op::BackupList { .. } => "backup_list",
            Op::BackupVerify { .. } => "backup_verify",
            Op::BackupPrune { .. } => "backup_prune",
            Op::BackupRestore(_) => "backup_restore",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyRequest {
    /// A directory relative to the backup host's `target_root`; it must not exist yet.
    pub target: String,
    pub lus: Vec<CopyLu>,
    /// Small files written beside the images (the PostgreSQL backup label).
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Recorded in the manifest as given (database host, freeze, instant).
    #[serde(default)]
    pub info: Value,
    /// Read at most this many bytes per second (absent or 0: no limit).
    #[serde(default)]
    pub rate: Option<u64>,
    /// The backup's id, as the console gave it to the database host's tracking; absent:
    /// the request id.
    #[serde(default)]
    pub backup: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyLu {
    pub vlu: String,
    pub size: u64,
    pub source: Source,
    /// The backup the database host's tracking counts `changes` from.
    #[serde(default)]
    pub base: Option<String>,
    /// `[offset, length]` byte ranges written since `base`: copied alone if the
    /// repository holds `base`, else the whole LU is.
    #[serde(default)]
    pub changes: Option<Vec<(u64, u64)>>,
    /// Bytes written since `base`, as the tracking counts them.
    #[serde(default)]
    pub written_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    pub backup: String,
    /// The virtual LU (may be left out when the backup has one).
    #[serde(default)]
    pub vlu: Option<String>,
    pub to: RestoreTo,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RestoreTo {
    /// An absolute path on the backup host: a new file, or a block device nobody holds.
    Path(String),
    /// The live virtual LU: its export on the database host's NBD listener
    /// (`HOST:PORT`), written where it differs. `export` may carry the ticket of the
    /// fence the database host put up ([`inplace`]): `NAME#fence=TICKET`.
    Nbd { address: String, export: String },
}

/// Where the backup host reads a snapshot from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// The real LU on the array, through the backup host's own backend of that name (as
    /// over a SAN): the database host does no work for the copy.
    Array { backend: String, lu: u32 },
    /// The database host's snapshot export over NBD (`HOST:PORT`).
    Nbd { address: String, export: String },
    /// The array copies its real LU, a split pair secondary of EP 1 058 190, to one of its
    /// backup devices by itself (CCOPY, [0029]-[0030]), driven through the backup host's
    /// backend of that name: no host reads the LU ([`crate::pairs::medium`]).
    ArrayDevice { backend: String, lu: u32 },
}

/// One reply line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    Progress { done: u64, total: u64 },
    Ok(Value),
    Error(Failure),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// No token or the wrong one; nothing was done.
    Unauthorized,
    /// The request was malformed or names something that does not exist.
    BadRequest,
    /// The operation is one of a role this agent does not have.
    NotMyRole,
    /// The freeze's deadline passed; everything was thawed and rolled back.
    Timeout,
    /// A step failed; the detail says which and what was undone.
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    pub code: Code,
    pub message: String,
    #[serde(default)]
    pub detail: Value,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
            detail: Value::Null,
        }
    }

    pub fn with(mut self, detail: Value) -> Self {
        self.detail = detail;
        self
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Code::Unauthorized => "unauthorized",
            Code::BadRequest => "bad request",
            Code::NotMyRole => "wrong role",
            Code::Timeout => "timeout",
            Code::Failed => "failed",
        })
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// Where and how the console reaches an agent.
#[derive(Clone)]
pub struct Peer {
    /// `HOST:PORT`; HOST is also the name its certificate must carry.
    pub address: String,
    pub tls: Arc<rustls::ClientConfig>,
    pub token: String,
}

impl Peer {
    pub fn host(&self) -> &str {
        match self.address.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => &self.address,
        }
    }

    /// Send `op` as request `id`; `progress` sees each progress line. Retries a
    /// connection that fails before an answer, with the same id, up to `retries` times.
    pub fn call(
        &self,
        id: &str,
        op: &Op,
        retries: u32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Value, Failure> {
        let mut attempt = 0;
        loop {
            match self.call_once(id, op, progress) {
                Err(CallError::Transport(e)) if attempt < retries => {
                    attempt += 1;
                    tracing::warn!(peer = %self.address, error = %e, attempt, "retrying with the same request id");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(CallError::Transport(e)) => {
                    return Err(Failure::new(
                        Code::Failed,
                        format!("agent {}: {e}", self.address),
                    ))
                }
                Err(CallError::Reply(f)) => return Err(f),
                Ok(v) => return Ok(v),
            }
        }
    }

    fn call_once(
        &self,
        id: &str,
        op: &Op,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Value, CallError> {
        let t = |e: &dyn std::fmt::Display| CallError::Transport(e.to_string());
        let name = tls::server_name(self.host()).map_err(|e| t(&e))?;
        let tcp = std::net::TcpStream::connect(&self.address).map_err(|e| t(&e))?;
        tcp.set_nodelay(true).map_err(|e| t(&e))?;
        let conn = rustls::ClientConnection::new(self.tls.clone(), name).map_err(|e| t(&e))?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let req = Request {
            token: self.token.clone(),
            id: id.to_string(),
            op: op.clone(),
        };
        let mut line = serde_json::to_string(&req).map_err(|e| t(&e))?;
        line.push('\n');
        s.write_all(line.as_bytes()).map_err(|e| t(&e))?;
        s.flush().map_err(|e| t(&e))?;
        let mut r = BufReader::new(s);
        loop {
            let mut buf = String::new();
            if r.read_line(&mut buf).map_err(|e| t(&e))? == 0 {
                return Err(CallError::Transport(
                    "the connection closed before an answer".into(),
                ));
            }
            match serde_json::from_str::<Line>(&buf) {
                Ok(Line::Progress { done, total }) => progress(done, total),
                Ok(Line::Ok(v)) => return Ok(v),
                Ok(Line::Error(f)) => return Err(CallError::Reply(f)),
                Err(e) => return Err(CallError::Transport(format!("a malformed answer: {e}"))),
            }
        }
    }
}

enum CallError {
    /// The answer did not arrive: the request may or may not have been done.
    Transport(String),
    Reply(Failure),
}

/// A fresh request id: time and randomness, unique enough across consoles.
pub fn new_id() -> String {
    let mut raw = [0u8; 8];
    // The OS's generator (getrandom(2)); should it fail, the time alone still orders ids.
    let _ = getrandom::fill(&mut raw);
    format!("{}-{}", unix_ms(), hex::encode(raw))
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// `secs` since the epoch as an RFC 3339 UTC time (`time`'s formatter).
pub fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{secs}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_392_000 + 3661), "2026-11-23T01:01:01Z");
        assert_eq!(rfc3339(u64::MAX), format!("@{}", u64::MAX));
        let (a, b) = (new_id(), new_id());
        let (ms, rand) = a.split_once('-').unwrap();
        assert!(ms.parse::<u64>().unwrap() > 1_700_000_000_000, "{a}");
        assert!(
            rand.len() == 16 && rand.bytes().all(|c| c.is_ascii_hexdigit()),
            "{a}"
        );
        assert_ne!(a, b);
    }

    #[test]
    fn wire_format() {
        let r: Request = serde_json::from_str(
            r#"{"token":"t","id":"1","op":{"type":"snapshot","vlus":["db"]}}"#,
        )
        .unwrap();
        assert_eq!(
            r.op,
            Op::Snapshot {
                vlus: vec!["db".into()],
                deadline_ms: None,
                vars: BTreeMap::new(),
                backup: None,
            }
        );
        let r: Request = serde_json::from_str(
            r#"{"token":"t","id":"2","op":{"type":"complete","vlus":["db"],"backup":"b1"}}"#,
        )
        .unwrap();
        assert_eq!(r.op.name(), "complete");
        let r: Request = serde_json::from_str(
            r#"{"token":"t","id":"3","op":{"type":"snapshot","vlus":["db"],"backup":"b2"}}"#,
        )
        .unwrap();
        assert!(matches!(r.op, Op::Snapshot { backup: Some(b), .. } if b == "b2"));
        let l = serde_json::to_string(&Line::Progress { done: 1, total: 2 }).unwrap();
        assert_eq!(l, r#"{"progress":{"done":1,"total":2}}"#);
        let src: Source = serde_json::from_str(r#"{"array":{"backend":"a","lu":2}}"#).unwrap();
        assert_eq!(
            src,
            Source::Array {
                backend: "a".into(),
                lu: 2
            }
        );
    }
}

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

use std::io::{BufRead, BufReader, Write};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

pub use hvm_api::coord::{
    BackupList, BackupRow, Changes, Code, Consistency, Copied, CopiedBy, CopiedLu, CopyLu,
    CopyRequest, Counters, Deleted, DeletedVlu, Failure, FailureDetail, Fenced, Hello,
    LegsCompared, Line, Medium, Op, Pruned, Request, RestoreCheck, RestoreRequest, RestoreTo,
    Restored, ResyncProgress, ResyncVlu, SnapshotFailure, SnapshotLu, SnapshotTaken, Source, Step,
    TrackingBase, TrackingBases, Unfenced, Verified,
};

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

    /// [`Peer::call`] with the reply read as `T`.
    pub fn ask<T: DeserializeOwned>(
        &self,
        id: &str,
        op: &Op,
        retries: u32,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<T, Failure> {
        let v = self.call(id, op, retries, progress)?;
        T::deserialize(&v).map_err(|e| {
            Failure::new(
                Code::Failed,
                format!(
                    "agent {}: a malformed {} reply: {e}",
                    self.address,
                    op.name()
                ),
            )
        })
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
    use std::collections::BTreeMap;

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
                consistency: Consistency::Application,
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
        // The default consistency is left out, so that an older agent reads the request.
        let op = |consistency| Op::Snapshot {
            vlus: vec!["db".into()],
            deadline_ms: None,
            vars: BTreeMap::new(),
            backup: None,
            consistency,
        };
        let app = serde_json::to_string(&op(Consistency::Application)).unwrap();
        assert!(!app.contains("consistency"), "{app}");
        let crash = serde_json::to_string(&op(Consistency::Crash)).unwrap();
        assert!(crash.contains(r#""consistency":"crash""#), "{crash}");
        let back: Op = serde_json::from_str(&crash).unwrap();
        assert_eq!(back, op(Consistency::Crash));
        assert!(serde_json::from_str::<Op>(&crash.replace("crash", "none")).is_err());
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

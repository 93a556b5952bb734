//! The agent-to-agent service: a TLS listener, the token check, the id table that makes
//! a retried request answer once, and the dispatch to the roles' operations.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::{
    copy, freeze, inplace, repository, tls, Code, Counters, Failure, Hello, Line, Op, Request,
};
use crate::config::{CoordinationConfig, Role};
use crate::host::Host;
use crate::nbd::server::AcceptBackoff;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 1 << 20;
/// Ids remembered for retries.
const REMEMBERED: usize = 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections that may be between accept and a matching token at once; past it a new
/// connection is closed at once, so unauthenticated peers cannot pile up tasks, TLS
/// state and descriptors.
const MAX_UNAUTHENTICATED: usize = 32;

struct Entry {
    fingerprint: String,
    progress: watch::Receiver<(u64, u64)>,
    done: watch::Receiver<Option<Line>>,
}

pub struct Service {
    agent: Arc<Host>,
    cfg: CoordinationConfig,
    token: String,
    acceptor: TlsAcceptor,
    ops: Mutex<(BTreeMap<String, Entry>, VecDeque<String>)>,
    /// One freeze at a time: two groups' gates must not open each other's.
    freeze: tokio::sync::Mutex<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("coordination: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("coordination.listen {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// A typed reply as the reply line's JSON object.
fn reply<T: serde::Serialize>(r: Result<T, Failure>) -> Result<Value, Failure> {
    r.and_then(|v| serde_json::to_value(v).map_err(|e| Failure::new(Code::Failed, e.to_string())))
}

/// Compare the SHA-256 digests of the two tokens without an early exit, so the time
/// taken says nothing about the token's content or its length.
fn same(a: &str, b: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    let diff = a.iter().zip(b.iter()).fold(0u8, |d, (x, y)| d | (x ^ y));
    // black_box: the optimiser must not turn the fold back into an early-exit compare.
    std::hint::black_box(diff) == 0
}

impl Service {
    /// Load the TLS files and the token; `cfg`'s paths are absolute.
    pub fn new(agent: Arc<Host>, cfg: CoordinationConfig) -> Result<Service, ServiceError> {
        // Client certificates are required: only holders of a certificate signed by the
        // agents' CA get as far as sending a request (and its token).
        let server = tls::mutual_server_config(&cfg.cert, &cfg.key, &cfg.ca_file())?;
        let token = tls::read_token(&cfg.token_file)?;
        Ok(Service {
            agent,
            cfg,
            token,
            acceptor: TlsAcceptor::from(server),
            ops: Mutex::new((BTreeMap::new(), VecDeque::new())),
            freeze: tokio::sync::Mutex::new(()),
        })
    }

    pub async fn bind(&self) -> Result<TcpListener, ServiceError> {
        TcpListener::bind(&self.cfg.listen)
            .await
            .map_err(|source| ServiceError::Bind {
                addr: self.cfg.listen.clone(),
                source,
            })
    }

    fn target_root(&self) -> Option<PathBuf> {
        self.cfg.backup.as_ref().map(|b| b.target_root.clone())
    }

    fn backup_role(&self) -> Result<repository::BackupRole, Failure> {
        let root = self
            .target_root()
            .ok_or_else(|| Failure::new(Code::NotMyRole, "no backup.target_root"))?;
        Ok(repository::BackupRole {
            root,
            catalog: self.agent.state_dir.join("backup-catalog.sqlite"),
            keep: self.cfg.backup.as_ref().and_then(|b| b.keep),
        })
    }

    /// The backup role's catalog operations: list, verify, prune, restore.
    async fn catalog_op(
        &self,
        op: Op,
        progress: watch::Sender<(u64, u64)>,
    ) -> Result<Value, Failure> {
        let role = self.backup_role()?;
        let agent = self.agent.clone();
        let mut p = move |d, t| {
            progress.send_replace((d, t));
        };
        let work: Box<dyn FnOnce() -> Result<Value, Failure> + Send> = match op {
            Op::BackupList {
                target,
                vlu,
                rebuild,
            } => Box::new(move || {
                reply(repository::list(
                    &role,
                    target.as_deref(),
                    vlu.as_deref(),
                    rebuild,
                ))
            }),
            Op::BackupVerify { backup } => {
                Box::new(move || reply(repository::verify(&role, &backup, &mut p)))
            }
            Op::BackupPrune {
                target,
                keep,
                dry_run,
            } => Box::new(move || reply(repository::prune(&role, &target, keep, dry_run))),
            Op::BackupRestore(r) => Box::new(move || {
                reply(repository::restore(
                    &role,
                    &r,
                    &|| copy::nbd_tls(&agent),
                    &mut p,
                ))
            }),
            Op::BackupRestoreCheck {
                backup,
                vlu,
                in_place,
            } => {
                Box::new(move || reply(repository::check(&role, &backup, vlu.as_deref(), in_place)))
            }
            other => {
                return Err(Failure::new(
                    Code::BadRequest,
                    format!("{} is not a backup-role operation", other.name()),
                ))
            }
        };
        tokio::task::spawn_blocking(work)
            .await
            .unwrap_or_else(|e| Err(Failure::new(Code::Failed, e.to_string())))
    }

    /// Serve until `shutdown`; connections being served finish on their own.
    pub async fn run(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let unauthenticated = Arc::new(Semaphore::new(MAX_UNAUTHENTICATED));
        let mut backoff = AcceptBackoff::new("coordination");
        let mut refused = 0u64;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        backoff.succeeded();
                        // Over the cap: dropping the stream closes it.
                        let Ok(slot) = unauthenticated.clone().try_acquire_owned() else {
                            refused += 1;
                            if refused.is_power_of_two() {
                                tracing::warn!(%peer, refused, cap = MAX_UNAUTHENTICATED, "coordination: connection refused: too many not yet authenticated");
                            }
                            continue;
                        };
                        let svc = self.clone();
                        tokio::spawn(async move { svc.connection(stream, peer, slot).await });
                    }
                    Err(e) => backoff.failed(&e).await,
                }
            }
        }
    }

    /// Serve one connection; `slot` counts it as unauthenticated until its token matched.
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        slot: OwnedSemaphorePermit,
    ) {
        let _ = stream.set_nodelay(true);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "coordination: TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::warn!(%peer, "coordination: TLS handshake timed out");
                return;
            }
        };
        let (rd, mut wr) = tokio::io::split(tls);
        let mut line = String::new();
        let read = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            BufReader::new(rd.take(MAX_REQUEST)).read_line(&mut line),
        )
        .await;
        let reply = |l: &Line| {
            let mut s = serde_json::to_string(l).unwrap_or_else(|_| "{}".into());
            s.push('\n');
            s
        };
        let request = match read {
            Ok(Ok(_)) if line.ends_with('\n') => self.check(&line, peer),
            _ => Err(Failure::new(
                Code::BadRequest,
                "expected one JSON request line (at most 1 MiB) within 10 s",
            )),
        };
        drop(slot);
        let req = match request {
            Ok(r) => r,
            Err(f) => {
                let _ = wr.write_all(reply(&Line::Error(f)).as_bytes()).await;
                let _ = wr.shutdown().await;
                return;
            }
        };
        let (mut progress, mut done) = self.start(req);
        let mut last = (0, 0);
        let mut sent = std::time::Instant::now();
        loop {
            let finished = done.borrow_and_update().clone();
            if let Some(l) = finished {
                let _ = wr.write_all(reply(&l).as_bytes()).await;
                let _ = wr.shutdown().await;
                return;
            }
            tokio::select! {
                _ = done.changed() => {}
                _ = progress.changed() => {
                    let p = *progress.borrow_and_update();
                    // At most five progress lines a second; the answer is never held.
                    if p != last && sent.elapsed() >= Duration::from_millis(200) {
                        last = p;
                        sent = std::time::Instant::now();
                        let l = Line::Progress { done: p.0, total: p.1 };
                        if wr.write_all(reply(&l).as_bytes()).await.is_err() {
                            // The client went away; the operation goes on, and a retry
                            // with its id gets the answer.
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Authenticate and parse; nothing is looked at before the token matches.
    fn check(&self, line: &str, peer: SocketAddr) -> Result<Request, Failure> {
        let v: Value = serde_json::from_str(line).map_err(|_| {
            Failure::new(Code::Unauthorized, "expected a JSON request with a token")
        })?;
        let token = v.get("token").and_then(Value::as_str).unwrap_or("");
        if !same(token, &self.token) {
            tracing::warn!(%peer, "coordination: a request without the right token was refused");
            return Err(Failure::new(
                Code::Unauthorized,
                "the token is missing or wrong",
            ));
        }
        let req: Request = serde_json::from_value(v)
            .map_err(|e| Failure::new(Code::BadRequest, format!("malformed request: {e}")))?;
        if req.id.is_empty() || req.id.len() > 128 {
            return Err(Failure::new(
                Code::BadRequest,
                "the request id must be 1-128 characters",
            ));
        }
        let need = match &req.op {
            Op::Hello => None,
            Op::Snapshot { .. }
            | Op::Delete { .. }
            | Op::Resync { .. }
            | Op::Verify { .. }
            | Op::Counters
            | Op::Complete { .. }
            | Op::Abort { .. }
            | Op::RestoreFence { .. }
            | Op::RestoreUnfence { .. } => Some(Role::Database),
            Op::Copy(_)
            | Op::BackupList { .. }
            | Op::BackupVerify { .. }
            | Op::BackupPrune { .. }
            | Op::BackupRestore(_)
            | Op::BackupRestoreCheck { .. } => Some(Role::Backup),
        };
        if let Some(role) = need {
            if !self.cfg.roles.contains(&role) {
                return Err(Failure::new(
                    Code::NotMyRole,
                    format!(
                        "this agent's roles are {:?}; the operation needs {role:?}",
                        self.cfg.roles
                    ),
                ));
            }
        }
        tracing::info!(%peer, id = %req.id, op = req.op.name(), "coordination request");
        Ok(req)
    }

    /// Start the request's operation, or join the one already started under its id.
    fn start(
        self: &Arc<Self>,
        req: Request,
    ) -> (watch::Receiver<(u64, u64)>, watch::Receiver<Option<Line>>) {
        let mutating = matches!(
            req.op,
            Op::Snapshot { .. }
                | Op::Delete { .. }
                | Op::Copy(_)
                | Op::BackupPrune { .. }
                | Op::BackupRestore(_)
                | Op::RestoreFence { .. }
        );
        let fingerprint = serde_json::to_string(&req.op).unwrap_or_default();
        let (ptx, prx) = watch::channel((0, 0));
        let (dtx, drx) = watch::channel(None);
        if mutating {
            let mut ops = self.ops.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(e) = ops.0.get(&req.id) {
                if e.fingerprint == fingerprint {
                    tracing::info!(id = %req.id, "a retried request: answering with the first one's result");
                    return (e.progress.clone(), e.done.clone());
                }
                let _ = dtx.send(Some(Line::Error(Failure::new(
                    Code::BadRequest,
                    format!("request id {} was used for a different operation", req.id),
                ))));
                return (prx, drx);
            }
            ops.0.insert(
                req.id.clone(),
                Entry {
                    fingerprint,
                    progress: prx.clone(),
                    done: drx.clone(),
                },
            );
            ops.1.push_back(req.id.clone());
            while ops.1.len() > REMEMBERED {
                if let Some(old) = ops.1.pop_front() {
                    ops.0.remove(&old);
                }
            }
        }
        let svc = self.clone();
        tokio::spawn(async move {
            let line = match svc.execute(req, ptx).await {
                Ok(v) => Line::Ok(v),
                Err(f) => Line::Error(f),
            };
            let _ = dtx.send(Some(line));
        });
        (prx, drx)
    }

    /// The `hello` reply: roles, version, what this agent serves.
    fn hello(&self) -> Hello {
        let roles = self.cfg.roles.iter().map(|r| match r {
            Role::Database => hvm_api::Role::Database,
            Role::Backup => hvm_api::Role::Backup,
        });
        Hello {
            roles: roles.collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            virtual_lus: self.agent.virtual_lus.keys().cloned().collect(),
            backends: self.agent.managers.keys().cloned().collect(),
            nbd_tcp: self.agent.tcp_bound.get().cloned(),
        }
    }

    async fn execute(
        &self,
        req: Request,
        progress: watch::Sender<(u64, u64)>,
    ) -> Result<Value, Failure> {
        let agent = self.agent.clone();
        let blocking = |f: Box<dyn FnOnce() -> Result<Value, Failure> + Send>| async move {
            tokio::task::spawn_blocking(f)
                .await
                .unwrap_or_else(|e| Err(Failure::new(Code::Failed, e.to_string())))
        };
        match req.op {
            Op::Hello => reply(Ok(self.hello())),
            Op::Snapshot {
                vlus,
                deadline_ms,
                vars,
                backup,
                consistency,
            } => {
                let _one = self.freeze.lock().await;
                let req = freeze::SnapshotRequest {
                    id: req.id,
                    vlus,
                    deadline_ms,
                    vars,
                    backup,
                    consistency,
                };
                reply(freeze::snapshot(agent, self.cfg.freeze.clone(), req).await)
            }
            Op::Complete { vlus, backup } => {
                blocking(Box::new(move || {
                    reply(freeze::finish(&agent, &vlus, &backup, true))
                }))
                .await
            }
            Op::Abort { vlus, backup } => {
                blocking(Box::new(move || {
                    reply(freeze::finish(&agent, &vlus, &backup, false))
                }))
                .await
            }
            Op::Delete { vlus } => {
                blocking(Box::new(move || reply(freeze::delete(&agent, &vlus)))).await
            }
            Op::Resync { vlus } => {
                blocking(Box::new(move || reply(freeze::resync(&agent, &vlus)))).await
            }
            Op::Verify { vlus } => {
                blocking(Box::new(move || reply(freeze::verify(&agent, &vlus)))).await
            }
            Op::RestoreFence { vlu, force, backup } => {
                let fence = inplace::Fence { vlu, force, backup };
                reply(inplace::fence(&agent, &self.cfg.restore, &fence).await)
            }
            Op::RestoreUnfence { vlu, ticket } => reply(inplace::unfence(&agent, &vlu, &ticket)),
            Op::Counters => reply(Ok(Counters {
                snapshot_read_bytes: agent
                    .snapshot_reads
                    .load(std::sync::atomic::Ordering::Relaxed),
            })),
            Op::Copy(c) => {
                let role = self.backup_role()?;
                let id = req.id;
                blocking(Box::new(move || {
                    reply(copy::copy(&agent, &role, &id, &c, &mut |d, t| {
                        progress.send_replace((d, t));
                    }))
                }))
                .await
            }
            op => self.catalog_op(op, progress).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same;

    #[test]
    fn token_comparison() {
        assert!(same("0123456789abcdef", "0123456789abcdef"));
        assert!(!same("0123456789abcdef", "0123456789abcdeF"));
        assert!(!same("0123456789abcdef", "0123456789abcde"));
        assert!(!same("", "x"));
        assert!(same("", ""));
    }
}

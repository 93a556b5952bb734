//! The control API: HTTP/JSON on a Unix socket (`control.sock` in the runtime directory,
//! mode 0660), curl-able:
//!
//! ```sh
//! curl --unix-socket /run/hvm/control.sock http://hvm/v1/lus
//! curl --unix-socket /run/hvm/control.sock -X POST http://hvm/v1/lus/db/snapshot
//! ```
//!
//! | method and path | what |
//! |---|---|
//! | `GET /v1/status` | version, counts, resync settings, the last reload |
//! | `GET /v1/lus` | virtual LUs: mode, READ/WRITE destinations, recorded LBAs |
//! | `GET /v1/lus/{name}/extents` | the update-location table of the LU's pair |
//! | `POST /v1/lus/{name}/snapshot` | acquire ([0027], [0060]); repeating it is a no-op |
//! | `DELETE /v1/lus/{name}/snapshot` | delete ([0031], [0061]); resync starts; a repeat while it runs is a no-op |
//! | `GET /v1/resync` | progress of every pair |
//! | `POST /v1/resync/pause`, `/v1/resync/resume` | pause or resume the resync service |
//! | `PUT /v1/resync/rate` `{"bytes_per_second": N}` | rate limit per backend, 0: none |
//! | `POST /v1/lus/{name}/move` `{to, lus?, rate?}` | move a virtual LU to another backend while it serves (see `moves`); again with `rate` changes the rate |
//! | `POST /v1/lus/{name}/rollback` | make the origin equal to its snapshot (writes held meanwhile), then delete the snapshot; the resync follows |
//! | `DELETE /v1/lus/{name}/move` | cancel the move; the data stays where it was |
//! | `GET /v1/lus/{name}/move` | the move's progress, or how the last one ended |
//! | `GET /v1/backends` | backends, their health and journals |
//! | `POST /v1/lus/{name}/verify` | `{rate?, repair?}`: compare a Synchronized pair's legs |
//! | `POST /v1/backends/{name}/backup` `BackupOp` | an array-side backup function of EP 1 058 190 (pair, CCOPY, AUTO, COW, pool); answers `BackupReply`; a CCOPY or COW without ranges covers the whole LU |
//! | `POST /v1/reload` | reload the config file, as SIGHUP does (see [`crate::reload`]); 422 if it is not valid |
//! | `GET /metrics` | Prometheus text format (see [`crate::metrics`]); also on `listen.metrics` |
//!
//! Errors are `{"error": "..."}` with 404 (no such LU), 409 (the strategy's precondition
//! does not hold, e.g. acquire while Re-synchronizing), 400 (bad request) or 500.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hvm_api::{self as api, ErrorStatus};
use hvm_core::array_backup::{Area, BackupOp, BackupReply};
use hvm_core::{Backend, BackendError, BackendErrorKind, ManagerError, Mode, VirtualLuId};

use crate::exports::Manager;
use crate::host::Host;
use crate::metrics::{Scrape, CONTENT_TYPE as METRICS_CONTENT_TYPE};
use crate::moves::MoveError;

type Shared = Arc<Host>;

/// An error reply.
pub struct ApiError(ErrorStatus, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.code()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(api::ErrorReply { error: self.1 })).into_response()
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        let code = match e {
            ManagerError::NotSynchronized { .. }
            | ManagerError::NotSnapshot { .. }
            | ManagerError::NotResynchronizing { .. }
            | ManagerError::NotAnOrigin(..)
            | ManagerError::Held { .. } => ErrorStatus::Conflict,
            _ => ErrorStatus::Internal,
        };
        ApiError(code, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// What was written to an origin since its last completed backup (issue 19).
fn tracking_view(mgr: &Manager, vlu: VirtualLuId) -> Option<api::Tracking> {
    let t = mgr.tracking(vlu).ok()?;
    Some(api::Tracking {
        base: t.base.map(|b| b.to_string()),
        current_bytes: t.current_lbas * hvm_core::SECTOR_SIZE,
        pending: t.pending.map(|(b, lbas)| api::Pending {
            backup: b.to_string(),
            bytes: lbas * hvm_core::SECTOR_SIZE,
        }),
        granule: t.granularity * hvm_core::SECTOR_SIZE,
    })
}

fn lookup(agent: &Host, name: &str) -> ApiResult<(Arc<Manager>, VirtualLuId)> {
    agent.virtual_lu(name).ok_or_else(|| {
        ApiError(
            ErrorStatus::NotFound,
            format!("no virtual LU named {name:?}"),
        )
    })
}

/// Every virtual LU, as `GET /v1/lus` shows it.
pub fn lus(agent: &Host) -> Vec<api::Lu> {
    let mut out = Vec::new();
    for (name, (backend, vlu)) in &agent.virtual_lus {
        let Some(mgr) = agent.managers.get(backend) else {
            continue;
        };
        let entry = mgr.lu_mode_entry(*vlu);
        let recorded = mgr.recorded_lbas(*vlu).unwrap_or(0);
        let clients = agent.exports.export(name).map(|e| e.nbd_clients());
        out.push(api::Lu {
            name: name.clone(),
            backend: backend.clone(),
            vlu: vlu.0,
            mode: mgr.mode(*vlu).to_string(),
            read: entry.and_then(|e| e.read).map(|l| l.0),
            write: entry.and_then(|e| e.write).map(|l| l.0),
            snapshot_of: agent.snapshot_of.get(name).cloned(),
            size_bytes: mgr.capacity_bytes(*vlu).unwrap_or(0),
            recorded_lbas: recorded,
            placement: agent.moved_to(name).map(|p| p.to_string()),
            moving: agent.moves.job(name).map(|j| j.status()),
            tracking: tracking_view(mgr, *vlu),
            nbd_clients: clients.map_or(0, |c| c.open() as u64),
            restore_fence: clients.is_some_and(|c| c.fenced()),
        });
    }
    out
}

/// Resync progress of every pair.
pub fn resync_views(agent: &Host) -> Vec<api::ResyncPair> {
    let mut out = Vec::new();
    for (name, (backend, vlu)) in &agent.virtual_lus {
        let Some(mgr) = agent.managers.get(backend) else {
            continue;
        };
        let Ok(p) = mgr.resync_progress(*vlu) else {
            continue; // a snapshot LU: its pair is listed under the origin
        };
        out.push(api::ResyncPair {
            name: name.clone(),
            backend: backend.clone(),
            mode: mgr.mode(*vlu).to_string(),
            remaining_lbas: p.remaining,
            copied_lbas: p.copied,
            skipped_lbas: p.skipped,
            done: p.done,
        });
    }
    out
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(ErrorStatus::Internal, e.to_string()))?
}

/// What keeps the agent from serving every write: journals out of service.
fn problems(a: &Shared) -> Vec<String> {
    a.journals
        .iter()
        .filter_map(|(name, j)| {
            j.failure().map(|why| {
                format!(
                    "backend {name}: journal {} cannot be written ({why}); writes that need it fail, retried every {} s",
                    j.path().display(),
                    crate::durable::RETRY_EVERY.as_secs()
                )
            })
        })
        .collect()
}

async fn status(State(a): State<Shared>) -> Json<api::Status> {
    let problems = problems(&a);
    let health = match problems.as_slice() {
        [] => "ok".to_string(),
        p => format!("failing: {}", p.join("; ")),
    };
    let last_reload = a
        .last_reload
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    Json(api::Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        health,
        problems,
        backends: a.managers.len() as u64,
        virtual_lus: a.virtual_lus.len() as u64,
        nbd_socket: a.socket.clone(),
        resync: api::ResyncSettings {
            paused: a.resync.paused(),
            bytes_per_second: a.resync.rate(),
            chunk_bytes: a.resync.chunk(),
        },
        config_file: a.config_file.clone(),
        snapshot_read_bytes: a.snapshot_reads.load(std::sync::atomic::Ordering::Relaxed),
        coordination: a.coordination.as_ref().map(|c| api::Coordination {
            listen: c.listen.clone(),
            roles: c.roles.iter().map(|r| role_view(*r)).collect(),
        }),
        last_reload,
    })
}

fn role_view(r: crate::config::Role) -> api::Role {
    match r {
        crate::config::Role::Database => api::Role::Database,
        crate::config::Role::Backup => api::Role::Backup,
    }
}

async fn reload(State(a): State<Shared>) -> ApiResult<Json<api::Reload>> {
    let report = blocking(move || Ok(a.reload())).await?;
    match &report.error {
        Some(e) => Err(ApiError(ErrorStatus::Invalid, e.clone())),
        None => Ok(Json(report)),
    }
}

fn move_error(e: MoveError) -> ApiError {
    let code = match e {
        MoveError::Refused(_) => ErrorStatus::Conflict,
        MoveError::NotMoving(_) => ErrorStatus::NotFound,
        MoveError::Placement(_) => ErrorStatus::Internal,
    };
    ApiError(code, e.to_string())
}

/// `POST /v1/lus/{name}/move` `{to, lus?, rate?}`: start a move, or change the rate of
/// the one under way to the same backend.
async fn move_start(
    State(a): State<Shared>,
    Path(name): Path<String>,
    Json(req): Json<api::MoveRequest>,
) -> ApiResult<Json<api::Move>> {
    blocking(move || a.start_move(&name, &req).map(Json).map_err(move_error)).await
}

async fn move_cancel(
    State(a): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<Json<api::Move>> {
    blocking(move || {
        let job = a.moves.cancel(&name).map_err(move_error)?;
        Ok(Json(job.status()))
    })
    .await
}

async fn move_status(
    State(a): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<Json<api::Move>> {
    let job = a
        .moves
        .job(&name)
        .ok_or_else(|| move_error(MoveError::NotMoving(name.clone())))?;
    Ok(Json(job.status()))
}

async fn list(State(a): State<Shared>) -> Json<Vec<api::Lu>> {
    Json(lus(&a))
}

async fn extents(
    State(a): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<Json<api::Extents>> {
    let (mgr, vlu) = lookup(&a, &name)?;
    let t = mgr.update_location_table(vlu)?;
    Ok(Json(api::Extents {
        mode: mgr.mode(vlu).to_string(),
        total_lbas: t.total(),
        ranges: t.iter().map(|e| [e.first(), e.last()]).collect(),
        name,
    }))
}

/// LBAs compared under one range lock.
const VERIFY_CHUNK_LBAS: u64 = 2048;
/// Differing ranges listed in a reply at most (their LBA count is always whole).
const VERIFY_LISTED: usize = 1000;

/// Why a verify could not run.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{name} is {mode}; verify compares the legs of a Synchronized pair")]
    NotSynchronized { name: String, mode: Mode },
    #[error("{name}: {source}")]
    Manager {
        name: String,
        #[source]
        source: ManagerError,
    },
}

/// Compare the legs of Synchronized virtual LU `name` chunk by chunk while I/O goes on,
/// at most `rate` bytes a second (0: unlimited), listing the ranges that differ and,
/// with `repair`, writing them again from the origin. The reply of
/// `POST /v1/lus/{name}/verify` and (in a list) of the coordination
/// service's `verify`.
pub fn verify_report(
    mgr: &Manager,
    vlu: VirtualLuId,
    name: &str,
    rate: u64,
    repair: bool,
) -> Result<api::Verify, VerifyError> {
    let failed = |source| VerifyError::Manager {
        name: name.to_string(),
        source,
    };
    let mode = mgr.mode(vlu);
    if mode != Mode::Synchronized {
        return Err(VerifyError::NotSynchronized {
            name: name.to_string(),
            mode,
        });
    }
    let capacity = mgr.capacity_bytes(vlu).map_err(failed)? / 512;
    let start = std::time::Instant::now();
    let (mut at, mut ranges, mut lbas) = (0u64, Vec::<[u64; 2]>::new(), 0u64);
    while at < capacity {
        let (next, found) = mgr
            .verify_step(vlu, at, VERIFY_CHUNK_LBAS, repair)
            .map_err(failed)?;
        for e in found {
            lbas += e.count();
            let listed = ranges.len();
            match ranges.last_mut() {
                Some(r) if r[1] + 1 == e.first() => r[1] = e.last(),
                _ if listed < VERIFY_LISTED => ranges.push([e.first(), e.last()]),
                _ => {}
            }
        }
        at = next;
        if rate > 0 {
            // Pace to `rate`: sleep until the bytes compared so far are due.
            let due = std::time::Duration::from_secs_f64((at * 512) as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    tracing::info!(vlu = %name, differing_lbas = lbas, repaired = repair && lbas > 0, "verify finished");
    Ok(api::Verify {
        name: name.to_string(),
        compared_bytes: capacity * 512,
        seconds: start.elapsed().as_secs_f64(),
        identical: lbas == 0,
        differing_lbas: lbas,
        differing: ranges,
        repaired: repair && lbas > 0,
    })
}

async fn verify(
    State(a): State<Shared>,
    Path(name): Path<String>,
    body: Option<Json<api::VerifyRequest>>,
) -> ApiResult<Json<api::Verify>> {
    let (mgr, vlu) = lookup(&a, &name)?;
    let req = body.map(|Json(r)| r).unwrap_or_default();
    blocking(
        move || match verify_report(&mgr, vlu, &name, req.rate, req.repair) {
            Ok(v) => Ok(Json(v)),
            Err(VerifyError::Manager { source, .. }) => Err(source.into()),
            Err(e) => Err(ApiError(ErrorStatus::Conflict, e.to_string())),
        },
    )
    .await
}

/// The reply of a snapshot acquire or delete.
fn change(name: String, mode: Mode, changed: bool) -> Json<api::SnapshotChange> {
    Json(api::SnapshotChange {
        name,
        mode: mode.to_string(),
        changed,
    })
}

async fn acquire(
    State(a): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<Json<api::SnapshotChange>> {
    let (mgr, vlu) = lookup(&a, &name)?;
    blocking(move || {
        // A repeat of a request that already took effect is not an error.
        if mgr.mode(vlu) == Mode::Snapshot {
            return Ok(change(name, Mode::Snapshot, false));
        }
        mgr.acquire(vlu)?;
        tracing::info!(vlu = %name, "snapshot acquired");
        Ok(change(name, Mode::Snapshot, true))
    })
    .await
}

async fn delete(
    State(a): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<Json<api::SnapshotChange>> {
    let (mgr, vlu) = lookup(&a, &name)?;
    let ctl = a.resync.clone();
    blocking(move || {
        // A repeat while the resync it started runs is not an error; from Synchronized
        // there is no snapshot to delete ([0031]).
        let mode = mgr.mode(vlu);
        if mode == Mode::Resynchronizing && mgr.resync_progress(vlu).is_ok() {
            return Ok(change(name, mode, false));
        }
        mgr.delete(vlu)?;
        ctl.wake();
        tracing::info!(vlu = %name, "snapshot deleted; resync started");
        Ok(change(name, mgr.mode(vlu), true))
    })
    .await
}

/// `POST /v1/lus/{name}/rollback`: make the origin equal to its snapshot, with clients'
/// writes held at the virtual LU's gate meanwhile; the snapshot is then deleted and the
/// resync makes the legs equal again.
async fn rollback(
    State(a): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<Json<api::Rollback>> {
    let (mgr, vlu) = lookup(&a, &name)?;
    let ctl = a.resync.clone();
    let exports = a.exports.clone();
    blocking(move || {
        let export = exports.export(&name).cloned();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        if let Some(e) = &export {
            if !e.gate.close(deadline) {
                return Err(ApiError(
                    ErrorStatus::Conflict,
                    format!("{name}: writes in flight did not complete within 30 s"),
                ));
            }
        }
        let r = mgr.rollback(vlu);
        if let Some(e) = &export {
            e.gate.open();
        }
        let blocks = r?;
        ctl.wake();
        tracing::info!(vlu = %name, blocks, "rolled back to the snapshot; resync started");
        Ok(Json(api::Rollback {
            mode: mgr.mode(vlu).to_string(),
            rolled_back_lbas: blocks,
            name,
        }))
    })
    .await
}

async fn resync(State(a): State<Shared>) -> Json<api::Resync> {
    Json(api::Resync {
        paused: a.resync.paused(),
        bytes_per_second: a.resync.rate(),
        pairs: resync_views(&a),
    })
}

async fn pause(State(a): State<Shared>) -> Json<api::Paused> {
    a.resync.set_paused(true);
    Json(api::Paused { paused: true })
}

async fn resume(State(a): State<Shared>) -> Json<api::Paused> {
    a.resync.set_paused(false);
    Json(api::Paused { paused: false })
}

async fn rate(State(a): State<Shared>, Json(r): Json<api::Rate>) -> Json<api::Rate> {
    a.resync.set_rate(r.bytes_per_second);
    Json(r)
}

async fn backends(State(a): State<Shared>) -> Json<api::Backends> {
    let a2 = a.clone();
    let list = tokio::task::spawn_blocking(move || {
        a2.managers
            .iter()
            .map(|(name, mgr)| {
                let (health, lus) = match mgr.backend().describe() {
                    Ok(d) => ("ok".to_string(), lu_identities(mgr.backend(), &d)),
                    Err(e) => (format!("failing: {e}"), Vec::new()),
                };
                api::BackendView {
                    name: name.clone(),
                    lus,
                    strategy_capabilities: format!("{:?}", mgr.capabilities()),
                    backup: mgr.backend().backup_capabilities(),
                    health,
                    journal: a2.journals.get(name).map(|j| {
                        let s = j.stats();
                        api::Journal {
                            path: j.path().to_path_buf(),
                            stats: api::JournalStats {
                                file_bytes: s.file_bytes,
                                flushes: s.flushes,
                                compactions: s.compactions,
                            },
                        }
                    }),
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    Json(api::Backends { backends: list })
}

/// Each LU's number, capacity and identity (VPD 83h, device and inode, export, image
/// id), as the driver reports them.
fn lu_identities(
    backend: &dyn hvm_core::Backend,
    d: &hvm_core::BackendDescription,
) -> Vec<api::BackendLu> {
    d.lus
        .iter()
        .map(|l| api::BackendLu {
            lu: l.id.0,
            capacity_lbas: l.capacity_lbas,
            identity: backend.identity(l.id).ok().flatten(),
        })
        .collect()
}

/// The HTTP status of a backend's refusal: 501 when the array lacks the function, 409
/// when it refuses it in the present state (a volume that is not a split secondary, a
/// busy device), 400 for a request it cannot parse.
fn backend_status(e: &BackendError) -> ErrorStatus {
    match e.kind {
        BackendErrorKind::Unsupported => ErrorStatus::Unsupported,
        BackendErrorKind::InvalidRequest | BackendErrorKind::DataProtect => ErrorStatus::Conflict,
        BackendErrorKind::OutOfRange => ErrorStatus::BadRequest,
        BackendErrorKind::NotReady => ErrorStatus::Unavailable,
        _ => ErrorStatus::Internal,
    }
}

/// A CCOPY or COW request without ranges covers the whole LU.
fn whole_lu(backend: &dyn Backend, op: &mut BackupOp) -> ApiResult<()> {
    let (BackupOp::Ccopy { lu, ranges, .. } | BackupOp::Cow { lu, ranges, .. }) = op else {
        return Ok(());
    };
    if !ranges.is_empty() {
        return Ok(());
    }
    let d = backend
        .describe()
        .map_err(|e| ApiError(backend_status(&e), e.message))?;
    let blocks = d
        .lus
        .iter()
        .find(|l| l.id.0 == *lu)
        .map(|l| l.capacity_lbas)
        .ok_or_else(|| ApiError(ErrorStatus::NotFound, format!("the array has no LU {lu}")))?;
    ranges.push(Area { start: 0, blocks });
    Ok(())
}

async fn array_backup(
    State(a): State<Shared>,
    Path(name): Path<String>,
    Json(mut op): Json<BackupOp>,
) -> ApiResult<Json<BackupReply>> {
    let mgr = a
        .managers
        .get(&name)
        .cloned()
        .ok_or_else(|| ApiError(ErrorStatus::NotFound, format!("no backend named {name:?}")))?;
    blocking(move || {
        let backend = mgr.backend();
        if !backend.backup_capabilities().any() {
            return Err(ApiError(
                ErrorStatus::Unsupported,
                format!("{name}: no array-side backup functions (its array has no `backup` section, or its plugin was built before plugin interface 0.1.1)"),
            ));
        }
        whole_lu(backend, &mut op)?;
        match op {
            BackupOp::PairStatus { .. }
            | BackupOp::Job { .. }
            | BackupOp::Counters
            | BackupOp::Devices => {
                tracing::debug!(backend = %name, ?op, "array-side backup query");
            }
            _ => tracing::info!(backend = %name, ?op, "array-side backup operation"),
        }
        backend
            .backup(&op)
            .map(Json)
            .map_err(|e| ApiError(backend_status(&e), format!("{name}: {}", e.message)))
    })
    .await
}

/// The agent's metrics now (see [`crate::metrics`]).
pub fn scrape(a: &Host) -> Scrape {
    let mut s = Scrape::default();
    let views = lus(a);
    let clients = views
        .iter()
        .map(|l| (vec![("vlu", l.name.clone())], l.nbd_clients))
        .collect();
    let recorded = views
        .into_iter()
        .filter(|l| l.snapshot_of.is_none())
        .map(|l| {
            let labels = vec![("vlu", l.name), ("backend", l.backend), ("mode", l.mode)];
            (labels, l.recorded_lbas)
        })
        .collect();
    s.gauge(
        "hvm_recorded_lbas",
        "LBAs recorded in the update-location table of a pair.",
        recorded,
    );
    s.gauge(
        "hvm_nbd_clients",
        "NBD connections open on a virtual LU's export.",
        clients,
    );
    let copied = resync_views(a)
        .into_iter()
        .map(|r| (vec![("vlu", r.name), ("backend", r.backend)], r.copied_lbas))
        .collect();
    s.counter(
        "hvm_resync_copied_lbas",
        "LBAs written back by resync since the last delete.",
        copied,
    );
    // One read of each journal's stats (one lock) gives both families.
    let (flushes, bytes) = a
        .journals
        .iter()
        .map(|(name, j)| {
            let st = j.stats();
            let labels = vec![("backend", name.clone())];
            ((labels.clone(), st.flushes), (labels, st.file_bytes))
        })
        .unzip();
    s.counter(
        "hvm_journal_flushes",
        "Journal flushes (fdatasync).",
        flushes,
    );
    s.gauge("hvm_journal_bytes", "Size of the journal file.", bytes);
    let reads = a.snapshot_reads.load(std::sync::atomic::Ordering::Relaxed);
    s.counter(
        "hvm_snapshot_read_bytes",
        "Bytes read through snapshot exports.",
        vec![(vec![], reads)],
    );
    let paused = u64::from(a.resync.paused());
    s.gauge(
        "hvm_resync_paused",
        "1 when the resync service is paused.",
        vec![(vec![], paused)],
    );
    s
}

async fn metrics(State(a): State<Shared>) -> impl IntoResponse {
    ([("content-type", METRICS_CONTENT_TYPE)], scrape(&a).text())
}

async fn not_found() -> ApiError {
    ApiError(
        ErrorStatus::NotFound,
        "no such endpoint; see GET /v1/status".into(),
    )
}

/// The API's routes.
pub fn router(agent: Shared) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/lus", get(list))
        .route("/v1/lus/{name}/extents", get(extents))
        .route("/v1/lus/{name}/snapshot", post(acquire).delete(delete))
        .route("/v1/lus/{name}/verify", post(verify))
        .route("/v1/lus/{name}/rollback", post(rollback))
        .route(
            "/v1/lus/{name}/move",
            post(move_start).delete(move_cancel).get(move_status),
        )
        .route("/v1/resync", get(resync))
        .route("/v1/resync/pause", post(pause))
        .route("/v1/resync/resume", post(resume))
        .route("/v1/resync/rate", put(rate))
        .route("/v1/backends", get(backends))
        .route("/v1/backends/{name}/backup", post(array_backup))
        .route("/v1/reload", post(reload))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(agent)
}

/// Connections the metrics listener serves at once; past it a new one is closed at once.
pub const METRICS_MAX_CONNECTIONS: usize = 16;

/// The routes of the metrics listener (`listen.metrics`): `GET /metrics`, 405 for another
/// method on it, 404 for any other path.
pub fn metrics_router(agent: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { (StatusCode::NOT_FOUND, "only GET /metrics is served here\n") })
        .with_state(agent)
}

/// Serve [`metrics_router`] on `listener` until `shutdown`, with the control API's limits:
/// a header-read timeout, at most [`METRICS_MAX_CONNECTIONS`], back-off on failed accepts.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    agent: Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let app = metrics_router(agent);
    serve_app(listener, app, "metrics", METRICS_MAX_CONNECTIONS, shutdown).await
}

/// Bind the control socket: in a 0700 directory, the socket itself 0660.
pub fn bind(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path)?;
    }
    let l = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

/// `control_group`: let the members of `group` use the control socket at `path`: the
/// socket 0660 and its directory 0750, both of that group (the agent may do this without
/// CAP_CHOWN when it runs with that group, as the packaged unit's `Group=hvm` does).
pub fn share_with_group(path: &std::path::Path, group: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let gid = nix::unistd::Group::from_name(group)
        .map_err(std::io::Error::from)?
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("control_group: no group named {group:?}"),
            )
        })?
        .gid;
    let share = |p: &std::path::Path, mode: u32| {
        nix::unistd::chown(p, None, Some(gid)).map_err(std::io::Error::from)?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
    };
    if let Some(dir) = path.parent() {
        share(dir, 0o750)?;
    }
    share(path, 0o660)
}

/// Time a client has to send a request's header, from connecting or from the previous
/// reply: a client that connects and says nothing must not hold a connection for ever.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Connections served at once; past it a new connection is closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time requests being served get to finish at shutdown.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// A listener [`serve_app`] accepts connections from: the control socket, the metrics
/// TCP port.
pub trait Accept: Send + 'static {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_io(&self) -> impl std::future::Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_io(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_io(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Serve the API on `listener` until `shutdown`, then let requests being served finish.
/// Each connection is HTTP/1 with [`HEADER_READ_TIMEOUT`]; at most [`MAX_CONNECTIONS`];
/// failed accepts back off (out of descriptors) and are logged once per interval.
pub async fn serve(
    listener: tokio::net::UnixListener,
    agent: Shared,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    serve_app(
        listener,
        router(agent),
        "control API",
        MAX_CONNECTIONS,
        shutdown,
    )
    .await
}

/// Serve `app` on `listener` until `shutdown`, then let requests being served finish:
/// HTTP/1 with [`HEADER_READ_TIMEOUT`], at most `cap` connections, back-off on failed
/// accepts; `what` names the listener in logs.
pub async fn serve_app(
    listener: impl Accept,
    app: Router,
    what: &'static str,
    cap: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(cap));
    let mut backoff = crate::nbd::server::AcceptBackoff::new(what);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept_io() => match accepted {
                Ok(s) => s,
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
        };
        backoff.succeeded();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(cap, "{what}: connection refused: too many connections");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            // A client that went away or timed out is no error of the service.
            let _ = conn.await;
            drop(slot);
        });
    }
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("{what}: requests still running after the drain deadline; leaving them");
    }
}

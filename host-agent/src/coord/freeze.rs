//! The database role: the bounded freeze around a consistency group's snapshot, and
//! deleting the snapshots afterwards (resync starts) [0063]-[0070].
//!
//! Order: every hook quiesces (in config order); the group's write gates close, every
//! virtual LU's snapshot is acquired, the gates open (one instant, see [`crate::gate`]);
//! every hook resumes (in reverse). The deadline runs from the first quiesce to the
//! snapshot: past it, the hooks are resumed at once, and a snapshot that was taken or is
//! still being taken is deleted, so the database is never left frozen and no snapshot
//! of a failed run remains.
//!
//! With a backup id, each virtual LU's changed-block record is cut at the same instant
//! (inside the manager's acquire, under the same gate), and the reply says what changed
//! since the last completed backup ([`super::tracking`]); a run that fails aborts the
//! cuts, so the record loses nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvm_core::change_tracking::Cut;
use hvm_core::{BackupId, Mode, Strategy, VirtualLuId};

use super::hooks::{Files, Hook, Outcome};
use super::{
    unix_ms, Changes, Code, Consistency, Deleted, DeletedVlu, Failure, FailureDetail, LegsCompared,
    ResyncProgress, ResyncVlu, SnapshotFailure, SnapshotLu, SnapshotTaken, Step, TrackingBase,
    TrackingBases,
};
use crate::config::FreezeConfig;
use crate::exports::Manager;
use crate::host::Host;

/// How long a timed-out run waits for an acquire still in progress on the array, to roll
/// it back before answering.
const LATE_ACQUIRE_WAIT: Duration = Duration::from_secs(5);

struct Member {
    name: String,
    snapshot: String,
    backend: String,
    mgr: Arc<Manager>,
    vlu: VirtualLuId,
    snap_vlu: VirtualLuId,
}

fn resolve(agent: &Host, vlus: &[String]) -> Result<Vec<Member>, Failure> {
    if vlus.is_empty() {
        return Err(Failure::new(Code::BadRequest, "no virtual LU named"));
    }
    let mut out = Vec::new();
    for name in vlus {
        let bad = |m: String| Failure::new(Code::BadRequest, m);
        if out.iter().any(|m: &Member| &m.name == name) {
            return Err(bad(format!("{name} is named twice")));
        }
        let (backend, vlu) = agent
            .virtual_lus
            .get(name)
            .ok_or_else(|| bad(format!("no virtual LU named {name}")))?;
        if agent.snapshot_of.contains_key(name) {
            return Err(bad(format!(
                "{name} is a snapshot export; name the virtual LU it is the snapshot of"
            )));
        }
        let snapshot = agent
            .snapshot_of
            .iter()
            .find(|(_, of)| *of == name)
            .map(|(s, _)| s.clone())
            .ok_or_else(|| bad(format!("{name} has no snapshot export configured")))?;
        let (mgr, snap_vlu) = agent
            .virtual_lu(&snapshot)
            .ok_or_else(|| bad(format!("{snapshot}: not found")))?;
        out.push(Member {
            name: name.clone(),
            snapshot,
            backend: backend.clone(),
            mgr,
            vlu: *vlu,
            snap_vlu,
        });
    }
    Ok(out)
}

/// What the group's acquire gives: the instant and each cut, or why it failed.
type Acquired = Result<(u64, Vec<Cut>), String>;

/// Close the group's gates, acquire every snapshot (cutting the changed-block records
/// for `backup`), open the gates. On any failure the snapshots acquired are deleted and
/// the cuts aborted again. Returns the instant (ms since the epoch) and each cut.
fn acquire_group(
    agent: &Host,
    group: &[Member],
    deadline: Instant,
    backup: Option<BackupId>,
) -> Acquired {
    let gates: Vec<_> = group
        .iter()
        .filter_map(|m| agent.exports.export(&m.name).cloned())
        .collect();
    let mut closed = Vec::new();
    let open_all = |closed: &[Arc<crate::exports::VluExport>]| {
        for e in closed {
            e.gate.open();
        }
    };
    for e in &gates {
        if !e.gate.close(deadline) {
            open_all(&closed);
            return Err("writes in flight did not complete before the deadline".into());
        }
        closed.push(e.clone());
    }
    let mut acquired: Vec<&Member> = Vec::new();
    let mut cuts = Vec::new();
    let mut result = Ok(());
    for m in group {
        let done = match backup {
            Some(b) => m.mgr.acquire_for_backup(m.vlu, b).map(|c| cuts.push(c)),
            None => m.mgr.acquire(m.vlu),
        };
        match done {
            Ok(()) => acquired.push(m),
            Err(e) => {
                result = Err(format!("acquiring the snapshot of {}: {e}", m.name));
                break;
            }
        }
    }
    let instant = unix_ms();
    open_all(&closed);
    if let Err(e) = result {
        rollback(agent, acquired.into_iter(), backup);
        return Err(e);
    }
    Ok((instant, cuts))
}

/// Delete the snapshots of `members` that are in Snapshot mode; resync starts. Abort
/// `backup`'s cuts (a member whose cut is not pending is left as it is).
fn rollback<'a>(
    agent: &Host,
    members: impl Iterator<Item = &'a Member>,
    backup: Option<BackupId>,
) -> Vec<String> {
    let mut done = Vec::new();
    for m in members {
        if let Some(b) = &backup {
            if let Err(e) = m.mgr.abort_backup(m.vlu, b) {
                tracing::error!(vlu = %m.name, backup = %b, error = %e, "aborting a changed-block cut failed; it stays pending and the next cut merges it");
            }
        }
        if m.mgr.mode(m.vlu) == Mode::Snapshot {
            match m.mgr.delete(m.vlu) {
                Ok(()) => done.push(m.name.clone()),
                Err(e) => {
                    tracing::error!(vlu = %m.name, error = %e, "rolling back a snapshot failed")
                }
            }
        }
    }
    agent.resync.wake();
    done
}

fn step(name: String, since: Instant) -> Step {
    Step {
        step: name,
        ms: since.elapsed().as_secs_f64() * 1000.0,
    }
}

/// What the console asked of a `snapshot`.
pub struct SnapshotRequest {
    pub id: String,
    pub vlus: Vec<String>,
    pub deadline_ms: Option<u64>,
    pub vars: std::collections::BTreeMap<String, String>,
    /// Cut the changed-block records for this backup.
    pub backup: Option<String>,
    /// `Crash`: no hook runs, the write gate alone makes the instant.
    pub consistency: Consistency,
}

/// A snapshot is taken only from Synchronized ([0027]).
fn check_synchronized(group: &[Member]) -> Result<(), Failure> {
    for m in group {
        let mode = m.mgr.mode(m.vlu);
        if mode != Mode::Synchronized {
            return Err(Failure::new(
                Code::Failed,
                format!(
                    "{} is {mode}; a snapshot is taken only from Synchronized ([0027]){}",
                    m.name,
                    if mode == Mode::Resynchronizing {
                        ": wait for the resync to end"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    Ok(())
}

/// The `HVM_*` variables command hooks see.
fn hook_env(
    id: &str,
    vlus: &[String],
    deadline_ms: u64,
    vars: std::collections::BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("HVM_BACKUP_ID".into(), id.to_string()),
        ("HVM_VLUS".into(), vlus.join(" ")),
        ("HVM_DEADLINE_MS".into(), deadline_ms.to_string()),
    ];
    for (k, v) in vars {
        let k = k.to_ascii_uppercase();
        if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') && !k.is_empty() {
            env.push((format!("HVM_{k}"), v));
        }
    }
    env
}

/// One run of the freeze: the hooks, how many of them were started, the step in
/// progress, the acquire task once started, and the steps done.
struct Freeze {
    hooks: Vec<Hook>,
    env: Vec<(String, String)>,
    label: String,
    started: usize,
    current: String,
    acquire: Option<tokio::task::JoinHandle<Acquired>>,
    steps: Vec<Step>,
}

impl Freeze {
    /// Quiesce every hook in order, then take the group's snapshot.
    async fn quiesce_and_acquire(
        &mut self,
        agent: &Arc<Host>,
        group: &Arc<Vec<Member>>,
        deadline: Instant,
        backup: Option<BackupId>,
    ) -> Result<(u64, Vec<Cut>), String> {
        for h in self.hooks.iter_mut() {
            self.started += 1;
            self.current = format!("quiesce {}", h.name());
            let t = Instant::now();
            h.quiesce(&self.env, &self.label)
                .await
                .map_err(|e| format!("{}: {e}", self.current))?;
            let mut done = step(self.current.clone(), t);
            // A part timed apart (fsfreeze's sync before the freeze) is its own step;
            // the hook's step is then the rest (the freeze, writes held).
            if let Some((name, ms)) = h.take_part() {
                done.ms = (done.ms - ms).max(0.0);
                self.steps.push(Step {
                    step: format!("quiesce {name}"),
                    ms,
                });
            }
            self.steps.push(done);
        }
        let names: Vec<&str> = group.iter().map(|m| m.name.as_str()).collect();
        self.current = format!("snapshot of {}", names.join(", "));
        let t = Instant::now();
        let (a, g) = (agent.clone(), group.clone());
        let task = self.acquire.insert(tokio::task::spawn_blocking(move || {
            acquire_group(&a, &g, deadline, backup)
        }));
        let current = &self.current;
        let instant = task
            .await
            .map_err(|e| format!("{current}: {e}"))?
            .map_err(|e| format!("{current}: {e}"))?;
        self.steps.push(step(self.current.clone(), t));
        Ok(instant)
    }

    /// Resume the hooks that were started, in reverse: the files they gave and the
    /// errors of those that failed.
    async fn thaw(&mut self, outcome: Outcome) -> (Files, Vec<String>) {
        let mut files = Files::new();
        let mut errors = Vec::new();
        for h in self.hooks[..self.started].iter_mut().rev() {
            let t = Instant::now();
            match h.resume(&self.env, outcome).await {
                Ok(f) => files.extend(f),
                Err(e) => errors.push(format!("resume {}: {e}", h.name())),
            }
            self.steps.push(step(format!("resume {}", h.name()), t));
        }
        (files, errors)
    }

    fn thawed(&self) -> Vec<String> {
        self.hooks[..self.started].iter().map(Hook::name).collect()
    }
}

/// Delete every snapshot of the group (off the async threads).
async fn rollback_all(
    agent: Arc<Host>,
    group: Arc<Vec<Member>>,
    backup: Option<BackupId>,
) -> Vec<String> {
    tokio::task::spawn_blocking(move || rollback(&agent, group.iter(), backup))
        .await
        .unwrap_or_default()
}

/// After the deadline passed: the acquire may still be running on the array: wait a
/// little for it, then delete whatever it took; if it is still running, roll back when
/// it ends. Returns what was rolled back and adds to `errors`.
async fn late_rollback(
    acquire: Option<tokio::task::JoinHandle<Acquired>>,
    agent: &Arc<Host>,
    group: &Arc<Vec<Member>>,
    backup: Option<BackupId>,
    errors: &mut Vec<String>,
) -> Vec<String> {
    let Some(mut task) = acquire else {
        return Vec::new();
    };
    match tokio::time::timeout(LATE_ACQUIRE_WAIT, &mut task).await {
        Ok(_) => rollback_all(agent.clone(), group.clone(), backup).await,
        Err(_) => {
            let (a, g) = (agent.clone(), group.clone());
            tokio::spawn(async move {
                let _ = task.await;
                let rolled = rollback_all(a, g, backup).await;
                tracing::warn!(?rolled, "a late acquire ended; rolled back");
            });
            errors.push(
                "the array had not finished the acquire; it is rolled back when it does".into(),
            );
            Vec::new()
        }
    }
}

/// What a timed-out or failed run answers: the steps, the freeze and what was thawed
/// and rolled back.
impl Freeze {
    fn fail(&self, id: &str, code: Code, message: String, rolled: Vec<String>, ms: f64) -> Failure {
        tracing::error!(backup = %id, %message, "backup snapshot failed");
        Failure::new(code, message).with(FailureDetail::Snapshot(Box::new(SnapshotFailure {
            steps: self.steps.clone(),
            freeze_ms: ms,
            thawed: self.thawed(),
            rolled_back: rolled,
        })))
    }
}

/// The run's result once the hooks are thawed: the instant and the cuts, or the failure
/// after everything was rolled back.
async fn settle(
    fr: &mut Freeze,
    result: Result<Result<(u64, Vec<Cut>), String>, tokio::time::error::Elapsed>,
    mut resume_errors: Vec<String>,
    (agent, group, backup): (&Arc<Host>, &Arc<Vec<Member>>, Option<BackupId>),
    (id, deadline_ms, freeze_ms): (&str, u64, f64),
) -> Result<(u64, Vec<Cut>), Failure> {
    let acquire = fr.acquire.take();
    match result {
        Err(_) => {
            let rolled = late_rollback(acquire, agent, group, backup, &mut resume_errors).await;
            let msg = format!(
                "the freeze deadline of {deadline_ms} ms passed during {}; everything was thawed",
                fr.current
            );
            let msg = joined(msg, &resume_errors);
            Err(fr.fail(id, Code::Timeout, msg, rolled, freeze_ms))
        }
        Ok(Err(e)) => {
            let msg = joined(e, &resume_errors);
            Err(fr.fail(id, Code::Failed, msg, Vec::new(), freeze_ms))
        }
        Ok(Ok(_)) if !resume_errors.is_empty() => {
            let rolled = rollback_all(agent.clone(), group.clone(), backup).await;
            let msg = resume_errors.join("; ");
            Err(fr.fail(id, Code::Failed, msg, rolled, freeze_ms))
        }
        Ok(Ok(taken)) => Ok(taken),
    }
}

/// The `snapshot` operation.
pub async fn snapshot(
    agent: Arc<Host>,
    cfg: FreezeConfig,
    req: SnapshotRequest,
) -> Result<SnapshotTaken, Failure> {
    let SnapshotRequest {
        id,
        vlus,
        deadline_ms,
        vars,
        backup,
        consistency,
    } = req;
    let backup = backup
        .map(|b| BackupId::new(&b))
        .transpose()
        .map_err(|e| Failure::new(Code::BadRequest, e.to_string()))?;
    let group = Arc::new(resolve(&agent, &vlus)?);
    check_synchronized(&group)?;
    let deadline_ms = deadline_ms.map_or(cfg.deadline_ms, |d| d.min(cfg.deadline_ms));
    let mut fr = Freeze {
        hooks: match consistency {
            Consistency::Application => cfg.hooks.iter().map(Hook::new).collect(),
            Consistency::Crash => Vec::new(),
        },
        env: hook_env(&id, &vlus, deadline_ms, vars),
        label: format!("hvm {id}"),
        started: 0,
        current: String::new(),
        acquire: None,
        steps: Vec::new(),
    };
    let start = Instant::now();
    let deadline = start + Duration::from_millis(deadline_ms);
    let work = fr.quiesce_and_acquire(&agent, &group, deadline, backup);
    let result = tokio::time::timeout_at(deadline.into(), work).await;
    let outcome = match &result {
        Ok(Ok(_)) => Outcome::Ok,
        Ok(Err(_)) => Outcome::Failed,
        Err(_) => Outcome::Timeout,
    };
    // Thaw first, whatever happened: the database must not wait for the rollback.
    let (files, resume_errors) = fr.thaw(outcome).await;
    let freeze_ms = start.elapsed().as_secs_f64() * 1000.0;
    let ctx = (&agent, &group, backup);
    let (instant, cuts) = settle(
        &mut fr,
        result,
        resume_errors,
        ctx,
        (&id, deadline_ms, freeze_ms),
    )
    .await?;
    let changes = match cut_changes(group.clone(), cuts, backup).await {
        Ok(c) => c,
        Err(e) => {
            let rolled = rollback_all(agent.clone(), group.clone(), backup).await;
            return Err(fr.fail(&id, Code::Failed, e, rolled, freeze_ms));
        }
    };
    tracing::info!(
        backup = %id, freeze_ms, vlus = ?vlus, consistency = consistency.as_str(),
        "consistency group snapshot taken"
    );
    // It asks the arrays (off the async threads).
    let g = group.clone();
    let snapshots = tokio::task::spawn_blocking(move || snapshots(&g))
        .await
        .unwrap_or_default();
    Ok(SnapshotTaken {
        instant_unix_ms: instant,
        freeze_ms,
        deadline_ms,
        steps: std::mem::take(&mut fr.steps),
        snapshots,
        files,
        nbd_tcp: agent.tcp_bound.get().cloned(),
        changes,
    })
}

/// The reply's `snapshots`: what the backup host reads, per virtual LU.
fn snapshots(group: &[Member]) -> Vec<SnapshotLu> {
    group
        .iter()
        .map(|m| {
            let strategy = m.mgr.strategy(m.vlu).ok();
            // E1/E2: the snapshot is a real LU, frozen on the array, that a
            // backup host can read directly. E4's is host-side (saved
            // pre-update data plus the mate), so only its export has it.
            let array_lu = match strategy {
                Some(Strategy::ModeSelect | Strategy::VirtualLuRouting) => m
                    .mgr
                    .lu_mode_entry(m.snap_vlu)
                    .and_then(|e| e.read)
                    .map(|lu| lu.0),
                _ => None,
            };
            // Issue 22: a split pair secondary of EP 1 058 190 that its array can copy
            // to a backup device by itself (CCOPY).
            let array_ccopy = array_lu.is_some_and(|lu| {
                crate::pairs::offers_ccopy(m.mgr.backend().as_ref(), hvm_core::LuId(lu))
            });
            SnapshotLu {
                vlu: m.name.clone(),
                export: m.snapshot.clone(),
                backend: m.backend.clone(),
                size: m.mgr.capacity_bytes(m.vlu).unwrap_or(0),
                strategy: strategy.map(|s| format!("{s:?}")),
                array_lu,
                array_ccopy,
            }
        })
        .collect()
}

/// The reply's `changes` for `backup`, if given (off the async threads).
async fn cut_changes(
    group: Arc<Vec<Member>>,
    cuts: Vec<Cut>,
    backup: Option<BackupId>,
) -> Result<Option<BTreeMap<String, Changes>>, String> {
    let Some(b) = backup else {
        return Ok(None);
    };
    tokio::task::spawn_blocking(move || changes(&group, &cuts, &b).map(Some))
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
}

/// The reply's `changes`: per virtual LU, the base and the byte ranges of its cut.
fn changes(
    group: &[Member],
    cuts: &[Cut],
    backup: &BackupId,
) -> Result<BTreeMap<String, Changes>, String> {
    let mut out = BTreeMap::new();
    for (m, cut) in group.iter().zip(cuts) {
        let c = super::tracking::changes(&m.mgr, m.vlu, backup, cut.base)
            .map_err(|e| format!("the changed blocks of {}: {e}", m.name))?;
        out.insert(m.name.clone(), c);
    }
    Ok(out)
}

/// `lead`, then what else went wrong, as one message.
fn joined(lead: String, more: &[String]) -> String {
    std::iter::once(lead)
        .chain(more.iter().cloned())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The `delete` operation: each virtual LU's snapshot is deleted and resync starts.
pub fn delete(agent: &Host, vlus: &[String]) -> Result<Deleted, Failure> {
    let group = resolve(agent, vlus)?;
    let mut out = Vec::new();
    for m in &group {
        let mode = m.mgr.mode(m.vlu);
        let changed = match mode {
            Mode::Snapshot => {
                m.mgr.delete(m.vlu).map_err(|e| {
                    Failure::new(
                        Code::Failed,
                        format!("deleting the snapshot of {}: {e}", m.name),
                    )
                })?;
                true
            }
            _ => false,
        };
        out.push(DeletedVlu {
            vlu: m.name.clone(),
            mode: m.mgr.mode(m.vlu).to_string(),
            changed,
        });
    }
    agent.resync.wake();
    Ok(Deleted { vlus: out })
}

/// The `resync` operation: progress of each virtual LU.
/// Compare the legs of each virtual LU (no repair): what `backup run --wait-resync`
/// reports once the resync is done, instead of assuming the legs are identical.
pub fn verify(agent: &Host, vlus: &[String]) -> Result<LegsCompared, Failure> {
    let group = resolve(agent, vlus)?;
    let mut out = Vec::new();
    for m in &group {
        let v = crate::control::verify_report(&m.mgr, m.vlu, &m.name, 0, false)
            .map_err(|e| Failure::new(Code::Failed, e.to_string()))?;
        out.push(v);
    }
    Ok(LegsCompared { vlus: out })
}

pub fn resync(agent: &Host, vlus: &[String]) -> Result<ResyncProgress, Failure> {
    let group = resolve(agent, vlus)?;
    let mut out = Vec::new();
    for m in &group {
        let p = m.mgr.resync_progress(m.vlu).ok();
        out.push(ResyncVlu {
            vlu: m.name.clone(),
            mode: m.mgr.mode(m.vlu).to_string(),
            remaining_lbas: p.as_ref().map_or(0, |p| p.remaining),
            copied_lbas: p.as_ref().map_or(0, |p| p.copied),
            done: m.mgr.mode(m.vlu) == Mode::Synchronized,
        });
    }
    Ok(ResyncProgress { vlus: out })
}

/// The origin virtual LUs named, with their managers.
fn origins(
    agent: &Host,
    vlus: &[String],
) -> Result<Vec<(String, Arc<Manager>, VirtualLuId)>, Failure> {
    let bad = |m: String| Failure::new(Code::BadRequest, m);
    if vlus.is_empty() {
        return Err(bad("no virtual LU named".into()));
    }
    let mut out = Vec::new();
    for name in vlus {
        if agent.snapshot_of.contains_key(name) {
            return Err(bad(format!(
                "{name} is a snapshot export; name the virtual LU it is the snapshot of"
            )));
        }
        let (mgr, vlu) = agent
            .virtual_lu(name)
            .ok_or_else(|| bad(format!("no virtual LU named {name}")))?;
        out.push((name.clone(), mgr, vlu));
    }
    Ok(out)
}

/// The `complete` (or, with `complete` false, `abort`) operation.
pub fn finish(
    agent: &Host,
    vlus: &[String],
    backup: &str,
    complete: bool,
) -> Result<TrackingBases, Failure> {
    let id = BackupId::new(backup).map_err(|e| Failure::new(Code::BadRequest, e.to_string()))?;
    let group = origins(agent, vlus)?;
    let mut out = BTreeMap::new();
    for (name, mgr, vlu) in group {
        let base = if complete {
            mgr.complete_backup(vlu, &id)
        } else {
            mgr.abort_backup(vlu, &id)
        }
        .map_err(|e| {
            let what = if complete { "completing" } else { "aborting" };
            Failure::new(Code::Failed, format!("{what} backup {id} of {name}: {e}"))
        })?;
        let base = base.map(|b| b.to_string());
        out.insert(name, TrackingBase { base });
    }
    Ok(TrackingBases { vlus: out })
}

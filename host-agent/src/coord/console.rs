//! The management console: `hvmctl backup run`. It asks the database host to quiesce,
//! snapshot the virtual LUs at one instant and resume; asks the backup host to copy the
//! snapshots; asks the database host to delete them (resync starts) and, if asked, waits
//! for the resync. Each step is printed with its duration. If a step fails, it says which
//! and leaves the system clean: the snapshots deleted and resync started, or the exact
//! command to finish by hand.

use std::time::Instant;

use hvm_core::SECTOR_SIZE;
use serde_json::{json, Value};

use super::{
    new_id, BackupList, Code, Consistency, Copied, CopiedBy, CopiedLu, CopyLu, CopyRequest,
    Deleted, Failure, FailureDetail, LegsCompared, Op, Peer, Pruned, RestoreRequest, RestoreTo,
    Restored, ResyncProgress, SnapshotLu, SnapshotTaken, Source, Step, Verified,
};
use crate::backups::retention::Keep;
use crate::ctl;

/// Where the backup host reads the snapshot from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// The array's own copy to its backup device when every snapshot is a split pair
    /// secondary of an array that offers CCOPY (EP 1 058 190); else the array when the
    /// snapshot is a real LU there (E1, E2), else NBD.
    Auto,
    /// The array copies each snapshot to one of its backup devices by itself (CCOPY of a
    /// split pair secondary): no host reads it. Refused for any other snapshot.
    ArrayDevice,
    /// The array only; an E4 snapshot is refused.
    Array,
    /// The database host's snapshot export over NBD.
    Nbd,
}

pub struct Options {
    pub db: Peer,
    pub backup: Peer,
    pub vlus: Vec<String>,
    pub target: String,
    pub via: Via,
    /// `HOST:PORT` of the database host's NBD listener, if not its `listen.tcp` with the
    /// host of `--db`.
    pub db_nbd: Option<String>,
    pub deadline_ms: Option<u64>,
    pub wait_resync: bool,
    /// Copy the whole virtual LUs even if the repository holds the tracking's base.
    pub full: bool,
    /// Copy rate limit, bytes per second.
    pub rate: Option<u64>,
    /// `Crash`: the database host runs no freeze hook.
    pub consistency: Consistency,
    /// Print step lines and bars (false with --json).
    pub human: bool,
}

/// Most ranges one copy request carries (the request line is at most 1 MiB); more are
/// merged across their smallest gaps, copying a little more than was written.
const MAX_RANGES: usize = 30_000;

/// `ranges` (sorted, disjoint) merged across their smallest gaps down to `max`.
pub fn coalesce(ranges: &[(u64, u64)], max: usize) -> Vec<(u64, u64)> {
    if ranges.len() <= max || max == 0 {
        return ranges.to_vec();
    }
    let mut gaps: Vec<u64> = ranges
        .windows(2)
        .map(|w| w[1].0.saturating_sub(w[0].0 + w[0].1))
        .collect();
    gaps.sort_unstable();
    let limit = gaps[ranges.len() - max - 1];
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(o, l) in ranges {
        match out.last_mut() {
            Some(last) if o.saturating_sub(last.0 + last.1) <= limit => {
                last.1 = (o + l).max(last.0 + last.1) - last.0;
            }
            _ => out.push((o, l)),
        }
    }
    out
}

/// Changes from the tracking: the base backup, ranges, bytes written.
type Tracked = (Option<String>, Vec<(u64, u64)>, Option<u64>);

/// What the database host's snapshot reply says changed in `vlu` since its last
/// completed backup: (base, ranges, bytes written); `None` without tracking. Bytes
/// written are known only while the tracking is exact (512-byte granules); once it has
/// coarsened, its ranges cover more than was written and no count is claimed.
fn changes(snap: &SnapshotTaken, vlu: &str) -> Option<Tracked> {
    let c = snap.changes.as_ref()?.get(vlu)?;
    let exact = c.granule <= SECTOR_SIZE;
    Some((
        c.base.clone(),
        coalesce(&c.extents, MAX_RANGES),
        exact.then_some(c.bytes),
    ))
}

/// The snapshots as the array copies them to its devices: whole LUs (a device's medium
/// holds one full copy; the tracking's changes do not apply).
fn device_lus(snapshots: &[SnapshotLu]) -> Vec<CopyLu> {
    snapshots
        .iter()
        .map(|s| CopyLu {
            vlu: s.vlu.clone(),
            size: s.size,
            source: Source::ArrayDevice {
                backend: s.backend.clone(),
                lu: s.array_lu.unwrap_or(0),
            },
            base: None,
            changes: None,
            written_bytes: None,
        })
        .collect()
}

/// What a run did, and how it failed if it did.
pub struct Report {
    pub value: Value,
    pub error: Option<String>,
    /// The failed step's code (`Timeout`: the freeze deadline passed).
    pub code: Option<Code>,
}

struct Run<'a> {
    o: &'a Options,
    id: String,
    steps: Vec<Value>,
}

impl Run<'_> {
    fn say(&self, line: &str) {
        if self.o.human {
            println!("{line}");
        }
    }

    fn step(&mut self, name: &str, ms: f64, note: &str) {
        self.say(&format!("  {name:<40} {:>10}{note}", fmt_ms(ms)));
        self.steps.push(json!({ "step": name, "ms": ms }));
    }

    /// The steps an agent reported.
    fn agent_steps(&mut self, steps: &[Step]) {
        for s in steps {
            self.step(&s.step, s.ms, "");
        }
    }

    /// The backup is stored: the database host's tracking counts from it from now on.
    /// If that fails the next incremental copies from the previous base (more, never
    /// less), so it is a warning.
    fn complete(&mut self) -> Value {
        let t = Instant::now();
        match super::tracking::complete(&self.o.db, &self.o.vlus, &self.id) {
            Ok(v) => {
                // A later backup's cut may have superseded this one: the host then keeps
                // its base and answers ok, so the base it reports is what is checked.
                let other: Vec<String> = self
                    .o
                    .vlus
                    .iter()
                    .filter(|n| {
                        let base = v.vlus.get(n.as_str()).and_then(|b| b.base.as_deref());
                        base != Some(self.id.as_str())
                    })
                    .cloned()
                    .collect();
                if other.is_empty() {
                    self.step("complete (tracking base)", ms(t), "");
                } else {
                    self.say(&format!("  warning: the database host's tracking base of {} is not this backup (a later backup's snapshot superseded it); the next incremental copies from that base", other.join(", ")));
                }
                json!(v)
            }
            Err(f) => {
                self.say(&format!("  warning: the database host did not record the backup as the tracking's base: {f}"));
                json!({ "error": f.to_string() })
            }
        }
    }

    /// Delete the snapshots: what every failure after a snapshot does. The tracking's
    /// ranges of this backup count as written again.
    fn cleanup(&mut self) -> Result<String, String> {
        if let Err(f) = super::tracking::abort(&self.o.db, &self.o.vlus, &self.id) {
            tracing::warn!(error = %f, "the database host did not abort the backup's tracking cut (its next cut merges it)");
        }
        let t = Instant::now();
        match self.o.db.call(
            &format!("{}-delete", self.id),
            &Op::Delete { vlus: self.o.vlus.clone() },
            3,
            &mut |_, _| {},
        ) {
            Ok(_) => {
                self.step("delete snapshot (cleanup)", ms(t), "  resync started");
                Ok("the snapshots were deleted and resync started".into())
            }
            Err(e) => Err(format!(
                "the snapshots could not be deleted ({e}); finish by hand with `hvmctl backup delete --db {} --ca CA --token-file TOKEN {}` or, on the database host, `hvmctl snapshot delete NAME` for each of {}",
                self.o.db.address,
                self.o.vlus.iter().map(|v| format!("--vlu {v}")).collect::<Vec<_>>().join(" "),
                self.o.vlus.join(", ")
            )),
        }
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

pub fn fmt_ms(ms: f64) -> String {
    if ms >= 10_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{ms:.1} ms")
    }
}

/// What the backup host is to copy of each snapshot the database host took: where to
/// read it and, from the tracking, what changed since which backup.
fn copy_lus(
    o: &Options,
    snap: &SnapshotTaken,
    nbd_address: Option<&str>,
) -> Result<Vec<CopyLu>, Failure> {
    let snapshots = &snap.snapshots;
    // Per backend what the array offers: its own copy to a device when every snapshot
    // is a split pair secondary it can CCOPY (one kind of backup for the whole group).
    let by_array = !snapshots.is_empty() && snapshots.iter().all(|s| s.array_ccopy);
    match o.via {
        Via::ArrayDevice if !by_array => {
            return Err(Failure::new(
                Code::BadRequest,
                "--via array-device: not every snapshot is a split pair secondary of an array that offers CCOPY (EP 1 058 190); use --via auto",
            ))
        }
        Via::ArrayDevice | Via::Auto if by_array => return Ok(device_lus(snapshots)),
        _ => {}
    }
    let mut lus = Vec::new();
    for s in snapshots {
        let vlu = s.vlu.clone();
        let array = s.array_lu.map(|lu| Source::Array {
            backend: s.backend.clone(),
            lu,
        });
        let nbd = nbd_address.map(|a| Source::Nbd {
            address: a.to_string(),
            export: s.export.clone(),
        });
        let source = match o.via {
            Via::Array => array,
            Via::Nbd => nbd,
            Via::Auto | Via::ArrayDevice => array.or(nbd),
        };
        let Some(source) = source else {
            return Err(Failure::new(
                Code::BadRequest,
                format!(
                    "no way to read the snapshot of {vlu} with --via {:?}: {}",
                    o.via,
                    if s.array_lu.is_none() {
                        "its snapshot is kept by the database host (pre-update array); use --via nbd with an NBD TCP listener"
                    } else {
                        "the database host has no listen.tcp; give --db-nbd HOST:PORT"
                    }
                ),
            ));
        };
        let (base, ranges, written) = match changes(snap, &vlu) {
            Some((b, r, w)) if !o.full => (b, Some(r), w),
            Some((_, _, w)) => (None, None, w),
            None => (None, None, None),
        };
        lus.push(CopyLu {
            vlu,
            size: s.size,
            source,
            changes: ranges.filter(|_| base.is_some()),
            base,
            written_bytes: written,
        });
    }
    Ok(lus)
}

/// A step that failed: its name, why, and what the clean-up did (`Ok`: the system is
/// clean, with what was done; `Err`: what is left to do by hand).
struct Failed {
    step: &'static str,
    failure: Failure,
    cleanup: Result<String, String>,
}

impl Failed {
    fn new(step: &'static str, failure: Failure, cleanup: Result<String, String>) -> Self {
        Failed {
            step,
            failure,
            cleanup,
        }
    }
}

/// Run one backup.
pub fn run(o: &Options) -> Report {
    let mut r = Run {
        o,
        id: new_id(),
        steps: Vec::new(),
    };
    let mut out = json!({ "id": r.id, "db": o.db.address, "backup": o.backup.address,
        "vlus": o.vlus, "consistency": o.consistency });
    r.say(&format!(
        "backup {}: database host {}, backup host {}, virtual LUs {}, {}-consistent",
        r.id,
        o.db.address,
        o.backup.address,
        o.vlus.join(", "),
        o.consistency.as_str()
    ));
    let result = r.stages(&mut out);
    out["ok"] = json!(result.is_ok());
    out["steps"] = json!(r.steps);
    let Err(Failed {
        step,
        failure: f,
        cleanup,
    }) = result
    else {
        return Report {
            value: out,
            error: None,
            code: None,
        };
    };
    let (cleaned, msg) = match cleanup {
        Ok(m) => (true, m),
        Err(m) => (false, m),
    };
    out["error"] = json!({ "step": step, "code": f.code, "message": f.message, "detail": f.detail, "clean": cleaned, "cleanup": msg });
    Report {
        value: out,
        error: Some(format!("{step} failed: {f}; {msg}")),
        code: Some(f.code),
    }
}

impl Run<'_> {
    /// Every step in order; `out` gathers what each reports.
    fn stages(&mut self, out: &mut Value) -> Result<(), Failed> {
        // 1. Quiesce, snapshot, resume: one request, inside the database host's deadline.
        let snap = self.snapshot()?;
        out["freeze_ms"] = json!(snap.freeze_ms);
        out["instant_unix_ms"] = json!(snap.instant_unix_ms);
        // 2. The copy, on the backup host.
        let copied = self.copy(&snap)?;
        out["copy"] = json!(copied);
        out["tracking"] = self.complete();
        // 3. Delete the snapshots; resync starts.
        self.delete(&copied)?;
        // 4. Optionally wait for the resync, then compare the legs.
        if self.o.wait_resync {
            out["resync"] = json!(self.wait_resync()?);
            self.verify_legs(out)?;
        }
        self.say(&format!(
            "backup {} ({}) stored in {}",
            self.id,
            copied.kind,
            opt(copied.location.as_deref())
        ));
        Ok(())
    }

    fn snapshot(&mut self) -> Result<SnapshotTaken, Failed> {
        let o = self.o;
        let snap = o.db.ask::<SnapshotTaken>(
            &format!("{}-snapshot", self.id),
            &Op::Snapshot {
                vlus: o.vlus.clone(),
                deadline_ms: o.deadline_ms,
                backup: Some(self.id.clone()),
                consistency: o.consistency,
                vars: [
                    ("target".to_string(), o.target.clone()),
                    ("backup_host".to_string(), o.backup.address.clone()),
                ]
                .into_iter()
                .collect(),
            },
            2,
            &mut |_, _| {},
        );
        let snap = match snap {
            Ok(v) => v,
            Err(f) => {
                // The database host rolled back what it did; if no answer came at all, a
                // snapshot may exist: delete to be sure.
                let cleanup = match &f.detail {
                    FailureDetail::Snapshot(d) => {
                        self.agent_steps(&d.steps);
                        Ok(format!(
                            "the database host thawed {:?} and rolled back {:?}",
                            d.thawed, d.rolled_back
                        ))
                    }
                    FailureDetail::None => self.cleanup(),
                    other => Ok(format!("the database host answered {other:?}")),
                };
                return Err(Failed::new("snapshot", f, cleanup));
            }
        };
        self.agent_steps(&snap.steps);
        self.say(&format!(
            "  {:<40} {:>10}  (deadline {} ms)",
            "freeze window (quiesce to resume)",
            fmt_ms(snap.freeze_ms),
            snap.deadline_ms
        ));
        Ok(snap)
    }

    /// What the backup host is asked to copy.
    fn copy_request(&self, snap: &SnapshotTaken) -> Result<CopyRequest, Failure> {
        let o = self.o;
        let nbd_address = o.db_nbd.clone().or_else(|| {
            snap.nbd_tcp.as_deref().map(|a| match a.rsplit_once(':') {
                Some((h, p)) if h == "0.0.0.0" || h == "[::]" => format!("{}:{p}", o.db.host()),
                _ => a.to_string(),
            })
        });
        let lus = copy_lus(o, snap, nbd_address.as_deref())?;
        Ok(CopyRequest {
            target: o.target.clone(),
            lus,
            files: snap.files.clone(),
            info: json!({
                "database_host": o.db.address,
                "instant_unix_ms": snap.instant_unix_ms,
                "freeze_ms": snap.freeze_ms,
                "consistency": o.consistency,
                "snapshots": snap.snapshots,
            }),
            rate: o.rate,
            backup: Some(self.id.clone()),
        })
    }

    fn copy(&mut self, snap: &SnapshotTaken) -> Result<Copied, Failed> {
        let req = match self.copy_request(snap) {
            Ok(r) => r,
            Err(f) => return Err(Failed::new("copy", f, self.cleanup())),
        };
        let t = Instant::now();
        let bars = self.o.human && ctl::bars();
        let copied = self.o.backup.ask::<Copied>(
            &format!("{}-copy", self.id),
            &Op::Copy(req),
            2,
            &mut |d, total| {
                if bars {
                    ctl::progress("  copy", d, total, "bytes");
                }
            },
        );
        if bars {
            eprintln!();
        }
        let copied = match copied {
            Ok(v) => v,
            Err(f) => return Err(Failed::new("copy", f, self.cleanup())),
        };
        let secs = t.elapsed().as_secs_f64();
        self.step("copy", secs * 1000.0, &copy_note(&copied, secs));
        for l in &copied.lus {
            self.say(&lu_line(l));
        }
        Ok(copied)
    }

    /// Delete the snapshots once the backup is stored; resync starts.
    fn delete(&mut self, copied: &Copied) -> Result<(), Failed> {
        let (o, t) = (self.o, Instant::now());
        let vlus = o.vlus.clone();
        if let Err(f) = o.db.call(
            &format!("{}-delete", self.id),
            &Op::Delete { vlus },
            3,
            &mut |_, _| {},
        ) {
            let cleanup = Err(format!(
                "backup {} in {} is complete; finish by hand with `hvmctl backup delete --db {} --ca CA --token-file TOKEN {}`",
                self.id,
                opt(copied.location.as_deref()),
                o.db.address,
                o.vlus.iter().map(|v| format!("--vlu {v}")).collect::<Vec<_>>().join(" ")
            ));
            return Err(Failed::new("delete", f, cleanup));
        }
        self.step("delete snapshot", ms(t), "  resync started");
        Ok(())
    }

    /// Poll the database host until every virtual LU's resync is done; its last answer.
    fn wait_resync(&mut self) -> Result<ResyncProgress, Failed> {
        let (o, t) = (self.o, Instant::now());
        let bars = o.human && ctl::bars();
        loop {
            let vlus = o.vlus.clone();
            let v: ResyncProgress =
                o.db.ask(&new_id(), &Op::Resync { vlus }, 3, &mut |_, _| {})
                    .map_err(|f| {
                        Failed::new(
                            "resync",
                            f,
                            Ok("the backup is complete; the resync goes on".into()),
                        )
                    })?;
            let remaining: u64 = v.vlus.iter().map(|x| x.remaining_lbas).sum();
            if bars {
                eprint!("\r  resync: {remaining} LBAs to copy        ");
            }
            if v.vlus.iter().all(|x| x.done) {
                if bars {
                    eprintln!();
                }
                self.step("resync", ms(t), "");
                return Ok(v);
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Compared, not assumed: each pair's legs are read and compared.
    fn verify_legs(&mut self, out: &mut Value) -> Result<(), Failed> {
        let (o, t) = (self.o, Instant::now());
        let complete = || Ok("the backup is complete".to_string());
        let vlus = o.vlus.clone();
        let v: LegsCompared =
            o.db.ask(&new_id(), &Op::Verify { vlus }, 3, &mut |_, _| {})
                .map_err(|f| Failed::new("verify", f, complete()))?;
        out["verify"] = json!(v);
        let differ: Vec<String> = v
            .vlus
            .iter()
            .filter(|x| !x.identical)
            .map(|x| format!("{} differs in {} LBAs", x.name, x.differing_lbas))
            .collect();
        if !differ.is_empty() {
            let f = Failure::new(
                Code::Failed,
                format!(
                    "{}; `hvmctl verify VLU` on the database host lists the ranges, --repair writes them again from the origin",
                    differ.join(", ")
                ),
            );
            return Err(Failed::new("verify", f, complete()));
        }
        let mib: u64 = v.vlus.iter().map(|x| x.compared_bytes).sum::<u64>() >> 20;
        let note = format!("  legs compared: identical ({mib} MiB)");
        self.step("verify legs", ms(t), &note);
        Ok(())
    }
}

/// `hvmctl backup delete`: delete the snapshots by hand.
pub fn delete(db: &Peer, vlus: &[String]) -> Result<Deleted, Failure> {
    db.ask(
        &new_id(),
        &Op::Delete {
            vlus: vlus.to_vec(),
        },
        3,
        &mut |_, _| {},
    )
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

/// The copy step's note: bytes read, rate, source.
fn copy_note(copied: &Copied, secs: f64) -> String {
    if copied.kind == crate::pairs::medium::KIND {
        let array: u64 = copied
            .lus
            .iter()
            .map(|l| match l.by {
                CopiedBy::Array {
                    array_copied_bytes, ..
                } => array_copied_bytes,
                CopiedBy::Host { .. } => 0,
            })
            .sum();
        return format!(
            "  {} copied by the array to its backup device at {:.0} MiB/s; 0 bytes read by hosts",
            mib(array),
            array as f64 / 1048576.0 / secs.max(1e-9)
        );
    }
    let bytes: u64 = copied.lus.iter().map(|l| l.copied_bytes).sum();
    format!(
        "  {} at {:.0} MiB/s from {}; {} new in the repository",
        mib(bytes),
        bytes as f64 / 1048576.0 / secs.max(1e-9),
        copied.lus.first().map_or("?", |l| l.source.as_str()),
        mib(copied.stored_bytes),
    )
}

/// One LU of the copy: full or incremental (and why not), bytes copied vs written.
pub fn lu_line(l: &CopiedLu) -> String {
    let written = match &l.by {
        CopiedBy::Array { medium: m, .. } => {
            return format!(
                "    {}: full, by the array: LU {} to device {} ({}), medium SHA-256 {}",
                l.vlu, m.lu, m.device, m.path, m.sha256,
            );
        }
        CopiedBy::Host { written_bytes, .. } => *written_bytes,
    };
    let kind = match (l.kind.as_str(), &l.base, &l.reason) {
        ("incremental", Some(b), _) => format!("incremental from {b}"),
        (_, _, Some(why)) => format!("full ({why})"),
        _ => "full".to_string(),
    };
    let written = match written {
        Some(w) => format!(
            ", {} written since the last backup per tracking ({:.2}x)",
            mib(w),
            l.copied_bytes as f64 / (w.max(1)) as f64
        ),
        None => String::new(),
    };
    format!(
        "    {}: {kind}: {} copied of {}{written}",
        l.vlu,
        mib(l.copied_bytes),
        mib(l.size),
    )
}

fn bar(human: bool, label: &'static str, unit: &'static str) -> impl FnMut(u64, u64) {
    let draw = human && ctl::bars();
    move |d, t| {
        if draw {
            ctl::progress(label, d, t, unit);
        }
    }
}

pub fn list(
    bk: &Peer,
    target: Option<String>,
    vlu: Option<String>,
    rebuild: bool,
) -> Result<BackupList, Failure> {
    bk.ask(
        &new_id(),
        &Op::BackupList {
            target,
            vlu,
            rebuild,
        },
        3,
        &mut |_, _| {},
    )
}

pub fn verify(bk: &Peer, id: &str, human: bool) -> Result<Verified, Failure> {
    let op = Op::BackupVerify {
        backup: id.to_string(),
    };
    let r = bk.ask(&new_id(), &op, 3, &mut bar(human, "  verify", "chunks"));
    if human && ctl::bars() {
        eprintln!();
    }
    r
}

pub fn prune(
    bk: &Peer,
    target: &str,
    keep: Option<Keep>,
    dry_run: bool,
) -> Result<Pruned, Failure> {
    let op = Op::BackupPrune {
        target: target.to_string(),
        keep,
        dry_run,
    };
    bk.ask(&new_id(), &op, 3, &mut |_, _| {})
}

/// A restore to `to`, a new file or a block device on the backup host. In place onto
/// the live virtual LU is [`super::inplace::restore`], behind the database host's fence.
pub fn restore(
    bk: &Peer,
    id: &str,
    vlu: Option<String>,
    to: &std::path::Path,
    human: bool,
) -> Result<Restored, Failure> {
    let op = Op::BackupRestore(RestoreRequest {
        backup: id.to_string(),
        vlu,
        to: RestoreTo::Path(to.display().to_string()),
    });
    let r = bk.ask(&new_id(), &op, 3, &mut bar(human, "  restore", "bytes"));
    if human && ctl::bars() {
        eprintln!();
    }
    r
}

fn opt(x: Option<&str>) -> &str {
    x.unwrap_or("-")
}

/// `hvmctl backup list` as a table.
pub fn list_table(v: &BackupList) -> String {
    let mut out = format!(
        "{:<30} {:<20} {:<11} {:<30} {:>10} {:>10} {:<20} {}\n",
        "ID", "CREATED", "KIND", "PARENT", "STORED", "LOGICAL", "VERIFIED", "VLUS"
    );
    for b in &v.backups {
        let verified = match (b.verified_unix_ms, &b.verify_error) {
            (Some(ms), None) => super::rfc3339(ms / 1000),
            (Some(_), Some(_)) => "FAILED".into(),
            (None, _) => "-".into(),
        };
        out.push_str(&format!(
            "{:<30} {:<20} {:<11} {:<30} {:>10} {:>10} {:<20} {}\n",
            b.id,
            b.created,
            b.kind,
            opt(b.parent.as_deref()),
            mib(b.stored_bytes),
            mib(b.logical_bytes),
            verified,
            b.vlus.join(","),
        ));
    }
    for e in &v.errors {
        out.push_str(&format!("error: {e}\n"));
    }
    out
}

/// `hvmctl backup verify`'s line.
pub fn verified_line(v: &Verified) -> String {
    match &v.media {
        Some(media) if v.kind.as_deref() == Some(crate::pairs::medium::KIND) => format!(
            "backup {} of {}: on the array's device; its media check out (records, CRCs, SHA-256): {}\n",
            v.id,
            v.created,
            media
                .iter()
                .map(|m| format!("{} {}", m.device, m.path))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => format!(
            "backup {} of {}: all {} chunks check out\n",
            v.id, v.created, v.chunks
        ),
    }
}

/// `hvmctl backup restore`'s line.
pub fn restored_line(v: &Restored) -> String {
    match v.written_bytes {
        Some(w) => format!(
            "restored {} at backup {} onto the live virtual LU: {} compared, {} written\n",
            v.vlu,
            v.backup,
            mib(v.compared_bytes.unwrap_or(0)),
            mib(w)
        ),
        None => format!(
            "restored {} at backup {} ({} bytes, SHA-256 {}) to {}\n",
            v.vlu,
            v.backup,
            v.size,
            v.sha256,
            opt(v.to.as_deref())
        ),
    }
}

/// `hvmctl backup prune`'s line.
pub fn pruned_line(v: &Pruned) -> String {
    let ids = |x: &[String]| serde_json::to_string(x).unwrap_or_default();
    format!(
        "{}keep {}; delete {}{}\n",
        if v.dry_run { "dry run: " } else { "" },
        ids(&v.keep),
        ids(&v.delete),
        match (v.chunks_deleted, v.bytes_freed) {
            (Some(c), Some(b)) => format!("; {c} unused chunks removed ({})", mib(b)),
            _ => String::new(),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arrays_copy_is_reported_as_the_arrays() {
        let copied: Copied = serde_json::from_value(json!({
            "location": null, "id": "b", "created": "c", "kind": "array-ccopy", "parent": null,
            "stored_bytes": 0, "files": [], "replaced": [],
            "lus": [{
                "vlu": "pg", "size": 1 << 20, "kind": "full", "base": null, "reason": null,
                "source": "s", "copied_bytes": 0, "seconds": 1.0, "array_copied_bytes": 1 << 20,
                "medium": { "backend": "a", "array_lu_identity": null, "job": 1, "records": 1,
                    "blocks": 2048, "bytes": 1, "lu": 11, "device": "tape0",
                    "path": "/a/tape0.rec", "sha256": "ab" },
            }],
        }))
        .unwrap();
        let note = copy_note(&copied, 1.0);
        assert!(note.contains("1.0 MiB copied by the array"), "{note}");
        assert!(note.contains("0 bytes read by hosts"), "{note}");
        let line = lu_line(&copied.lus[0]);
        assert!(
            line.contains("pg: full, by the array: LU 11 to device tape0"),
            "{line}"
        );
        let host: CopiedLu = serde_json::from_value(json!({
            "vlu": "pg", "size": 1 << 20, "copied_bytes": 1 << 20, "kind": "full", "base": null,
            "reason": null, "source": "s", "seconds": 1.0, "written_bytes": null, "extents": 1,
            "mib_per_s": 1.0,
        }))
        .unwrap();
        assert_eq!(lu_line(&host), "    pg: full: 1.0 MiB copied of 1.0 MiB");
    }

    #[test]
    fn auto_takes_the_arrays_copy_only_when_every_snapshot_offers_it() {
        let lu = |vlu: &str, array_lu: u32, array_ccopy: bool| SnapshotLu {
            vlu: vlu.into(),
            export: format!("{vlu}-snap"),
            backend: "array0".into(),
            size: 512,
            strategy: Some("VirtualLuRouting".into()),
            array_lu: Some(array_lu),
            array_ccopy,
        };
        let snap = |ccopy: bool| SnapshotTaken {
            instant_unix_ms: 1,
            freeze_ms: 1.0,
            deadline_ms: 1,
            steps: vec![],
            snapshots: vec![lu("a", 11, true), lu("b", 13, ccopy)],
            files: Default::default(),
            nbd_tcp: None,
            changes: None,
        };
        let tls = std::sync::Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        );
        let peer = Peer {
            address: "127.0.0.1:1".into(),
            tls,
            token: String::new(),
        };
        let o = |via| Options {
            db: peer.clone(),
            backup: peer.clone(),
            vlus: vec![],
            target: "t".into(),
            via,
            db_nbd: None,
            deadline_ms: None,
            wait_resync: false,
            consistency: Consistency::Application,
            full: false,
            rate: None,
            human: false,
        };
        let lus = copy_lus(&o(Via::Auto), &snap(true), None).unwrap();
        assert!(lus
            .iter()
            .all(|l| matches!(l.source, Source::ArrayDevice { .. })));
        assert_eq!(
            lus[1].source,
            Source::ArrayDevice {
                backend: "array0".into(),
                lu: 13
            }
        );
        let lus = copy_lus(&o(Via::Auto), &snap(false), None).unwrap();
        assert!(lus.iter().all(|l| matches!(l.source, Source::Array { .. })));
        let lus = copy_lus(&o(Via::Array), &snap(true), None).unwrap();
        assert!(lus.iter().all(|l| matches!(l.source, Source::Array { .. })));
        let e = copy_lus(&o(Via::ArrayDevice), &snap(false), None).unwrap_err();
        assert!(e.message.contains("not every snapshot"), "{}", e.message);
    }
}

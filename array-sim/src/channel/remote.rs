//! Remote pairs (EP 1 058 190's fourth embodiment, Fig. 8, [0053]-[0057]): the user
//! volume is in this array, the secondary in the array at the other end of a channel
//! path (see [`crate::channel`]).
//!
//! - While the pair is duplex, a host write reaches the user volume here and is sent
//!   over the path before it is acknowledged ([0056]).
//! - A split freezes the secondary: writes only mark the difference bitmap, kept here on
//!   the primary side ([0020]); the other array may then copy the secondary to its
//!   backup device ([0057]).
//! - When the path fails (the other array is gone, or the path is disabled), the pair is
//!   *suspended*: the host goes on writing the user volume, and the writes mark the
//!   bitmap. A resync, once the path is back, copies only the marked units ([0031]).
//! - The bitmap survives a restart as a local pair's does ([`crate::bitmaps`]), in
//!   `remote-diff-PRIMARY.bits`; the pair table is `remote-pairs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvm_core::array_backup::{Area, BackupReply, JobState};
use serde::{Deserialize, Serialize};

use super::{param_err, refuse, state_err, Channel, Link, PortOp};
use crate::backup::Refusal;
use crate::bitmaps::{Bitmap, DiffFile};
use crate::engine::BLOCK_SIZE;
use crate::scsi::Sense;

/// The state of a remote pair, on its user volume's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteState {
    /// The initial copy is running over the path.
    Forming,
    Duplex,
    Split,
    /// The path failed: writes only mark the bitmap until a resync.
    Suspended,
    /// A resync is copying the marked units.
    Resyncing,
}

impl RemoteState {
    fn word(self) -> &'static str {
        match self {
            RemoteState::Forming => "forming",
            RemoteState::Duplex => "duplex",
            RemoteState::Split => "split",
            RemoteState::Suspended => "suspended",
            RemoteState::Resyncing => "resyncing",
        }
    }
}

/// Which volume of the pair is in the array that answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Primary,
    Secondary,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemotePairStatus {
    pub primary: u32,
    pub secondary: u32,
    /// The path (on the user volume's side).
    pub path: String,
    /// The other array.
    pub peer: String,
    pub here: Role,
    /// On the user volume's side.
    pub state: Option<RemoteState>,
    /// On the secondary's side: split by the user volume's array.
    pub frozen: bool,
    pub blocks_per_bit: u32,
    pub units: u64,
    pub diff_units: u64,
    /// Bytes copied over the path by the initial copy and resyncs.
    pub copied_bytes: u64,
    /// Why the pair is suspended.
    pub reason: Option<String>,
}

pub(crate) struct RemotePair {
    pub(crate) primary: u8,
    path: String,
    secondary: u8,
    state: RemoteState,
    diff: Bitmap,
    file: Arc<DiffFile>,
    copied: u64,
    reason: Option<String>,
    /// A copy over the path runs (one at a time).
    busy: bool,
}

const PAIRS_FILE: &str = "remote-pairs";
/// Blocks a resync copies under one range lock.
const BATCH_BLOCKS: u64 = 1024;

impl Channel {
    fn diff_path(&self, primary: u8) -> PathBuf {
        self.dir.join(format!("remote-diff-{primary}.bits"))
    }

    /// The pair table at a start. Bits of a clean file are exact; after a death of the
    /// array a pair that was not split counts every unit as different (an update may
    /// have been cut between the arrays). Every pair but a split one, or a duplex one
    /// with nothing to copy, starts suspended: a resync brings it back.
    pub(crate) fn load_pairs(&self) -> Result<Vec<RemotePair>, String> {
        let path = self.dir.join(PAIRS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let bad = || {
                format!(
                    "{}: line {}: expected \"PRIMARY PATH SECONDARY STATE\"",
                    path.display(),
                    i + 1
                )
            };
            let f: Vec<&str> = line.split_whitespace().collect();
            let [p, via, s, state] = f.as_slice() else {
                return Err(bad());
            };
            let primary: u8 = p.parse().map_err(|_| bad())?;
            let blocks = *self.plain.get(&primary).ok_or_else(bad)?;
            let units = blocks.div_ceil(self.n);
            let split = *state == "split";
            let dp = self.diff_path(primary);
            let (mut diff, clean) = match DiffFile::open(&dp, units)? {
                Some(f) => (f.bits, f.clean),
                None => (Bitmap::full(units), false),
            };
            if !clean && !split {
                diff = Bitmap::full(units);
            }
            let state = match (split, diff.count()) {
                (true, _) => RemoteState::Split,
                (false, 0) if *state == "duplex" => RemoteState::Duplex,
                _ => RemoteState::Suspended,
            };
            let file =
                DiffFile::create(&dp, &diff).map_err(|e| format!("{}: {e}", dp.display()))?;
            out.push(RemotePair {
                primary,
                path: (*via).to_string(),
                secondary: s.parse().map_err(|_| bad())?,
                state,
                diff,
                file: Arc::new(file),
                copied: 0,
                reason: (state == RemoteState::Suspended)
                    .then(|| "the array restarted".to_string()),
                busy: false,
            });
        }
        Ok(out)
    }

    fn save_pairs(&self, pairs: &[RemotePair]) -> Result<(), Refusal> {
        let text: String = pairs
            .iter()
            .map(|p| {
                format!(
                    "{} {} {} {}\n",
                    p.primary,
                    p.path,
                    p.secondary,
                    p.state.word()
                )
            })
            .collect();
        crate::backup::write_atomic(&self.dir.join(PAIRS_FILE), &text)
    }

    /// Run `f` on the pair of user volume `lun`, saving the table when `f` succeeds and
    /// changed it (returns `true`).
    fn with_pair<T>(
        &self,
        lun: u8,
        f: impl FnOnce(&mut RemotePair) -> Result<(T, bool), Refusal>,
    ) -> Result<T, Refusal> {
        let mut pairs = self.lock_pairs();
        let i = pairs.iter().position(|p| p.primary == lun).ok_or_else(|| {
            state_err(format!("LU {lun} is not the user volume of a remote pair"))
        })?;
        let (out, changed) = f(&mut pairs[i])?;
        if changed {
            self.save_pairs(&pairs)?;
        }
        Ok(out)
    }

    fn pair_link(&self, lun: u8) -> Result<(Arc<Link>, u8), Refusal> {
        let (path, secondary) =
            self.with_pair(lun, |p| Ok(((p.path.clone(), p.secondary), false)))?;
        Ok((self.link(&path)?, secondary))
    }

    pub(crate) fn remote_create(
        self: &Arc<Self>,
        primary: u8,
        path: &str,
        secondary: u8,
    ) -> Result<(), Refusal> {
        let link = self.link(path)?;
        let blocks = *self
            .plain
            .get(&primary)
            .ok_or_else(|| param_err(format!("LU {primary} is not a plain LU of this array")))?;
        if self.fw.paired(primary).is_some()
            || self.fw.is_work(primary)
            || self.attached(primary).is_some()
        {
            return Err(state_err(format!(
                "LU {primary} is already in a pair or a working volume"
            )));
        }
        if self.lock_pairs().iter().any(|p| p.primary == primary) {
            return Err(state_err(format!(
                "LU {primary} is already the user volume of a remote pair"
            )));
        }
        link.op(&PortOp::Attach {
            from: self.name.clone(),
            primary: u32::from(primary),
            lu: u32::from(secondary),
            blocks,
        })
        .map_err(|e| state_err(format!("the remote pair was not formed: {e}")))?;
        let all = Bitmap::full(blocks.div_ceil(self.n));
        let dp = self.diff_path(primary);
        let file = DiffFile::create(&dp, &all)
            .map_err(|e| refuse(Sense::INTERNAL_FAILURE, format!("{}: {e}", dp.display())))?;
        {
            let mut pairs = self.lock_pairs();
            pairs.push(RemotePair {
                primary,
                path: path.to_string(),
                secondary,
                state: RemoteState::Forming,
                diff: all,
                file: Arc::new(file),
                copied: 0,
                reason: None,
                busy: true,
            });
            if let Err(e) = self.save_pairs(&pairs) {
                pairs.pop();
                return Err(e);
            }
        }
        self.refresh_active();
        self.spawn_copy(primary, None);
        Ok(())
    }

    /// A host write to user volume `lun` ([0056]).
    pub(crate) fn remote_write(&self, lun: u8, lba: u64, data: &[u8]) -> Result<(), Refusal> {
        let blocks = (data.len() / BLOCK_SIZE as usize) as u64;
        let first = lba / self.n * self.n;
        let end = (lba + blocks).div_ceil(self.n) * self.n;
        let _locked = self.store.locks.lock(lun, first, end - first);
        // One look at the table per write: the path, the secondary and whether to send.
        let (link, secondary, send) = self.with_pair(lun, |p| {
            let send = matches!(
                p.state,
                RemoteState::Forming | RemoteState::Duplex | RemoteState::Resyncing
            );
            Ok(((self.link(&p.path)?, p.secondary, send), false))
        })?;
        if !send {
            self.mark(lun, lba, blocks)?;
        }
        self.store
            .write(lun, lba, data)
            .map_err(|s| refuse(s, "writing the user volume"))?;
        if send {
            if let Err(e) = link.write(secondary, lba, data) {
                self.suspend(lun, e)?;
                self.mark(lun, lba, blocks)?;
            }
        }
        Ok(())
    }

    /// Set the difference bits of blocks `lba..lba+blocks`, on disk before the write.
    fn mark(&self, lun: u8, lba: u64, blocks: u64) -> Result<(), Refusal> {
        let (file, changed) = self.with_pair(lun, |p| {
            let mut c = p
                .diff
                .set_span(lba / self.n, (lba + blocks).div_ceil(self.n));
            c.dedup();
            Ok(((p.file.clone(), c), false))
        })?;
        if changed.is_empty() {
            return Ok(());
        }
        file.persist(|| {
            let pairs = self.lock_pairs();
            pairs
                .iter()
                .find(|p| p.primary == lun)
                .map_or_else(Vec::new, |p| {
                    changed.iter().map(|w| (*w, p.diff.words[*w])).collect()
                })
        })
        .map_err(|e| {
            refuse(
                Sense::WRITE_ERROR,
                format!("{}: {e}", file.path().display()),
            )
        })
    }

    fn suspend(&self, lun: u8, reason: String) -> Result<(), Refusal> {
        self.with_pair(lun, |p| {
            let changed = p.state != RemoteState::Suspended;
            p.state = RemoteState::Suspended;
            p.reason = Some(reason);
            Ok(((), changed))
        })
    }

    pub(crate) fn remote_split(&self, lun: u8) -> Result<(), Refusal> {
        let (link, secondary) = self.pair_link(lun)?;
        {
            // Every write in flight ends first: the split is one instant.
            let _all = self.store.locks.lock(lun, 0, u64::MAX / 2);
            self.with_pair(lun, |p| {
                if p.state != RemoteState::Duplex || p.busy {
                    return Err(state_err(format!(
                        "the remote pair of LU {lun} is {}; a split needs it duplex",
                        p.state.word()
                    )));
                }
                p.state = RemoteState::Split;
                Ok(((), true))
            })?;
        }
        link.op(&PortOp::Freeze {
            from: self.name.clone(),
            lu: u32::from(secondary),
            frozen: true,
        })
        .map(drop)
        .or_else(|e| {
            self.suspend(lun, e.clone())?;
            Err(state_err(format!(
                "the split did not reach the secondary's array, the pair is suspended: {e}"
            )))
        })
    }

    pub(crate) fn remote_resync(self: &Arc<Self>, lun: u8) -> Result<(), Refusal> {
        let (link, secondary) = self.pair_link(lun)?;
        self.with_pair(lun, |p| match p.state {
            _ if p.busy => Err(state_err(format!(
                "a copy of the remote pair of LU {lun} is still running; try when it ends"
            ))),
            RemoteState::Split | RemoteState::Suspended => Ok(((), false)),
            s => Err(state_err(format!(
                "the remote pair of LU {lun} is {}; nothing to resync",
                s.word()
            ))),
        })?;
        link.op(&PortOp::Freeze {
            from: self.name.clone(),
            lu: u32::from(secondary),
            frozen: false,
        })
        .map_err(|e| state_err(format!("the resync cannot start: {e}")))?;
        self.with_pair(lun, |p| {
            if p.busy || p.state == RemoteState::Resyncing {
                return Err(state_err("another resync of the pair started first"));
            }
            p.state = RemoteState::Resyncing;
            p.reason = None;
            p.busy = true;
            Ok(((), true))
        })?;
        self.spawn_copy(lun, None);
        Ok(())
    }

    pub(crate) fn remote_delete(&self, lun: u8) -> Result<(), Refusal> {
        let (link, secondary) = self.pair_link(lun)?;
        self.with_pair(lun, |p| match p.state {
            _ if p.busy => Err(state_err("the remote pair is copying; wait for it")),
            RemoteState::Forming | RemoteState::Resyncing => {
                Err(state_err("the remote pair is copying; wait for it"))
            }
            _ => Ok(((), false)),
        })?;
        // The other array forgets its secondary when it can be told; a secondary left
        // attached there stays protected from hosts, which is the safe side.
        let _ = link.op(&PortOp::Detach {
            from: self.name.clone(),
            lu: u32::from(secondary),
        });
        let mut pairs = self.lock_pairs();
        if let Some(i) = pairs.iter().position(|p| p.primary == lun) {
            let p = pairs.remove(i);
            self.save_pairs(&pairs)?;
            let _ = std::fs::remove_file(p.file.path());
        }
        drop(pairs);
        self.refresh_active();
        Ok(())
    }

    pub(crate) fn remote_status(&self, lun: u8) -> Result<RemotePairStatus, Refusal> {
        if let Some(s) = self.attached_status(lun) {
            return Ok(s);
        }
        let peer = |path: &str| {
            self.links
                .get(path)
                .map(|l| l.peer.clone())
                .unwrap_or_default()
        };
        self.with_pair(lun, |p| {
            Ok((
                RemotePairStatus {
                    primary: u32::from(p.primary),
                    secondary: u32::from(p.secondary),
                    path: p.path.clone(),
                    peer: peer(&p.path),
                    here: Role::Primary,
                    state: Some(p.state),
                    frozen: p.state == RemoteState::Split,
                    blocks_per_bit: self.n as u32,
                    units: p.diff.units,
                    diff_units: p.diff.count(),
                    copied_bytes: p.copied,
                    reason: p.reason.clone(),
                },
                false,
            ))
        })
    }

    /// Copy the marked units over the path in the background, then the pair is duplex;
    /// a failure suspends it. With `after`, first wait for that job of the other array
    /// (a [0037] copy) to end.
    fn spawn_copy(self: &Arc<Self>, lun: u8, after: Option<u32>) {
        let ch = Arc::clone(self);
        std::thread::spawn(move || {
            if let Some(job) = after {
                if let Err(e) = ch.wait_remote_job(lun, job) {
                    let _ = ch.suspend(lun, e);
                    return;
                }
                if let Err(e) = ch.remote_resync(lun) {
                    eprintln!(
                        "array-sim: resync of the remote pair of LU {lun}: {}",
                        e.message
                    );
                }
                return;
            }
            let r = ch.copy_marked(lun);
            if r.is_ok() {
                ch.drop_stale_marks(lun);
            }
            let _ = ch.with_pair(lun, |p| {
                p.busy = false;
                match &r {
                    // A write that failed meanwhile suspended the pair and marked its
                    // units: it stays suspended.
                    Ok(()) if p.state == RemoteState::Suspended => {}
                    Ok(()) => p.state = RemoteState::Duplex,
                    Err(e) => {
                        p.reason = Some(e.clone());
                        p.state = RemoteState::Suspended;
                    }
                }
                Ok(((), true))
            });
        });
    }

    /// A copy of the difference bitmap of the pair of user volume `lun`.
    fn diff_of(&self, lun: u8) -> Option<Bitmap> {
        let pairs = self.lock_pairs();
        pairs
            .iter()
            .find(|p| p.primary == lun)
            .map(|p| p.diff.clone())
    }

    /// After a copy, write the bitmap whole: the copied units' marks leave the file.
    fn drop_stale_marks(&self, lun: u8) {
        let Ok(file) = self.with_pair(lun, |p| Ok((p.file.clone(), false))) else {
            return;
        };
        if let Err(e) = file.rewrite(|| self.diff_of(lun), false) {
            eprintln!("array-sim: {}: {e}", file.path().display());
        }
    }

    /// Copy the units marked now, in batches under the range lock; a unit's bit is
    /// cleared once it is on the other array ([0031]).
    fn copy_marked(&self, lun: u8) -> Result<(), String> {
        let (link, secondary) = self.pair_link(lun).map_err(|r| r.message)?;
        let todo = self
            .with_pair(lun, |p| Ok((p.diff.clone(), false)))
            .map_err(|r| r.message)?;
        let cap = self.plain.get(&lun).copied().unwrap_or(0);
        let batch = (BATCH_BLOCKS / self.n).max(1);
        let mut buf = Vec::new();
        for (run, len) in todo.runs() {
            let mut u0 = run;
            while u0 < run + len {
                let k = batch.min(run + len - u0);
                let _locked = self.store.locks.lock(lun, u0 * self.n, k * self.n);
                let dirty = self
                    .with_pair(lun, |p| Ok((p.diff.runs_in(u0, k), false)))
                    .map_err(|r| r.message)?;
                let mut copied = 0;
                for (d, dn) in dirty {
                    let lba = d * self.n;
                    let blocks = (dn * self.n).min(cap - lba);
                    buf.resize((blocks * u64::from(BLOCK_SIZE)) as usize, 0);
                    self.store
                        .read(lun, lba, &mut buf)
                        .map_err(|s| format!("reading the user volume: {s}"))?;
                    link.write(secondary, lba, &buf)?;
                    copied += buf.len() as u64;
                }
                self.with_pair(lun, |p| {
                    (u0..u0 + k).for_each(|u| p.diff.put(u, false));
                    p.copied += copied;
                    Ok(((), false))
                })
                .map_err(|r| r.message)?;
                u0 += k;
            }
        }
        Ok(())
    }

    /// [0037]-[0040] across the path ([0057]): split, start the copy of the secondary on
    /// the other array, and resync when it ends. Returns the other array's job.
    pub(crate) fn remote_auto(
        self: &Arc<Self>,
        lun: u8,
        device: &str,
        ranges: Vec<Area>,
    ) -> Result<u32, Refusal> {
        let (link, secondary) = self.pair_link(lun)?;
        self.remote_split(lun)?;
        let reply = link.op(&PortOp::Ccopy {
            from: self.name.clone(),
            lu: u32::from(secondary),
            device: device.to_string(),
            ranges,
        });
        let job = match reply {
            Ok(BackupReply::Started { job }) => job,
            Ok(r) => return Err(state_err(format!("array {} answered {r:?}", link.peer))),
            Err(e) => {
                return Err(state_err(format!(
                    "the pair is split but the copy did not start: {e}"
                )))
            }
        };
        self.spawn_copy(lun, Some(job));
        Ok(job)
    }

    fn wait_remote_job(&self, lun: u8, job: u32) -> Result<(), String> {
        let (link, _) = self.pair_link(lun).map_err(|r| r.message)?;
        let mut failures = 0;
        let started = Instant::now();
        loop {
            match link.op(&PortOp::Job { id: job }) {
                Ok(BackupReply::Job(j)) if j.state == JobState::Done => return Ok(()),
                Ok(BackupReply::Job(j)) if j.state == JobState::Failed => {
                    return Err(format!(
                        "the copy job {job} failed: {}",
                        j.message.unwrap_or_default()
                    ))
                }
                Ok(_) => failures = 0,
                Err(e) if failures >= 50 => return Err(e),
                Err(_) => failures += 1,
            }
            // A copy job ends or fails; one that never reports is given up after a day.
            if started.elapsed() > Duration::from_secs(86_400) {
                return Err(format!("the copy job {job} did not end"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Write each remote pair's bitmap whole and mark it clean (an orderly stop).
    pub(crate) fn shutdown_pairs(&self) -> Result<(), String> {
        // Each file's lock is taken before the table's, as everywhere.
        let files: Vec<(u8, Arc<DiffFile>)> = self
            .lock_pairs()
            .iter()
            .map(|p| (p.primary, p.file.clone()))
            .collect();
        for (lun, f) in files {
            f.rewrite(|| self.diff_of(lun), true)
                .map_err(|e| format!("{}: {e}", f.path().display()))?;
        }
        Ok(())
    }
}

//! The tables on disk: one journal file per backend in the state directory, in hvm-core's
//! journal format, so a crash of the host never loses a changed range.
//!
//! A range must be durably marked before the data write that creates it is issued (the
//! write-intent rule of md's bitmap, DRBD's activity log and dm-era). Doing that with one
//! `fdatasync` per new range would cost the database a disk flush per write, so two things
//! keep the flushes rare:
//!
//! - **Activity regions.** The first write into a region (`region_lbas` LBAs, 4 MiB by
//!   default) since the last checkpoint durably records the whole region; later writes
//!   into it append their exact ranges without waiting. After a crash, replay gives the
//!   exact ranges written plus, at worst, the rest of the regions that were active:
//!   resync copies a little more than needed, never less.
//! - **Group commit.** Appends that must be durable wait for one `fdatasync`; while it
//!   runs, other appends queue, and one of them flushes the whole queue next.
//!
//! Mode changes, E4 saves and invalidations are always durable before `append` returns;
//! removals and clears are written with the next flush (losing one costs a redundant
//! copy). Changed-block tracking (issue 19) works the same way: a client write's
//! `TrackAdd` marks its activity region of the tracking set durably on the first write
//! into it since the last cut (a cut empties the set the marks were for, so it unmarks
//! them all); cuts, completes and aborts are durable before `append` returns. The
//! journal keeps the exact state its records describe, and compacts itself into a
//! checkpoint of that state when the file grows past `compact_bytes`; a checkpoint is
//! exact, so the regions (the tables' and the tracking's) start afresh after it. That state repeats the manager's tables
//! on purpose: taken from the manager instead, a compaction under the journal's lock would
//! need the manager's locks, and would be consistent with the records only as long as no
//! manager path appends while holding one. The copy costs one table update per record that
//! is appended (a write to an already recorded range appends nothing). A failure to write the journal fails the
//! append, and every later one, until a retry (at most one per [`RETRY_EVERY`], by the
//! next append or [`FileJournal::retry`]) has written a whole checkpoint of the state
//! again, for example once a full disk has room: the data write that needed it fails
//! with it, and [`FileJournal::failure`] says why for the agent's health.
//!
//! The state's tables are bounded like the manager's: [`FileJournal::set_budgets`] gives
//! each pair's update-location table (unless it is an E4 pair's, which stays exact) and
//! changed-block sets the same [`TableBudget`], so past it they coarsen (cover more,
//! never less) instead of growing without bound.
//!
//! On start, [`recover`] replays the file, [`FileJournal::create`] opens the next one (the
//! manager writes its checkpoint there while it opens), and [`FileJournal::commit`]
//! atomically replaces the old file with it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Least time between two attempts to write a failed journal again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

use hvm_core::change_tracking::Pending;
use hvm_core::journal::{self, JournalError, JournalRecord, JournalState, PairKey, StateLog, Tail};
use hvm_core::{ChangedBlocks, Extent, TableBudget};

/// Tuning of a journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// LBAs per activity region.
    pub region_lbas: u64,
    /// Compact when the file grows past this many bytes (and past twice its last
    /// checkpoint).
    pub compact_bytes: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            region_lbas: 8192,
            compact_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Journal {
        path: PathBuf,
        #[source]
        source: JournalError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DurableError + '_ {
    move |source| DurableError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a journal file held.
#[derive(Debug)]
pub struct Recovered {
    pub state: JournalState,
    pub records: usize,
    pub tail: Tail,
}

/// Replay `path`; `None` when there is no journal yet. A torn or corrupt tail is dropped
/// (and reported); a file that is not an hvm journal is an error, never overwritten.
pub fn recover(path: &Path) -> Result<Option<Recovered>, DurableError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let r = journal::replay(&bytes).map_err(|source| DurableError::Journal {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Some(Recovered {
        state: r.state,
        records: r.records.len(),
        tail: r.tail,
    }))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Inner {
    file: Arc<File>,
    /// Encoded records not yet written.
    pending: Vec<u8>,
    /// Sequence numbers: of the last record appended, and of the last one on disk.
    appended: u64,
    durable: u64,
    /// A flush runs outside the lock.
    flushing: bool,
    failed: Option<String>,
    /// When the last checkpoint was attempted after a failure.
    retried: Option<Instant>,
    /// The file is the one `create` opened and not yet committed: nothing waits for disk.
    loading: bool,
    file_len: u64,
    checkpoint_len: u64,
    /// The exact state of everything appended (region marks excluded).
    state: JournalState,
    /// Regions durably marked since the last checkpoint, per pair.
    regions: BTreeMap<PairKey, BTreeSet<u64>>,
    /// Regions of the changed-block sets durably marked since the last checkpoint or cut.
    track_regions: BTreeMap<PairKey, BTreeSet<u64>>,
    /// Counters for status and tests.
    flushes: u64,
    compactions: u64,
}

/// A journal file written with group commit and activity regions.
pub struct FileJournal {
    path: PathBuf,
    tuning: Tuning,
    /// LBAs of each pair's LUs: region marks are clipped to it.
    capacity: BTreeMap<PairKey, u64>,
    inner: Mutex<Inner>,
    flushed: Condvar,
}

/// The memory budgets of one pair's tables in a journal's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    /// The update-location table's; `None`: exact (an E4 pair's table is the set of
    /// saved LBAs, which must not grow).
    pub table: Option<TableBudget>,
    /// Each changed-block set's.
    pub tracking: TableBudget,
}

/// Counters of a journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct JournalStats {
    pub file_bytes: u64,
    pub flushes: u64,
    pub compactions: u64,
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".new");
    PathBuf::from(p)
}

/// Write a whole journal (header and `records`) to `path` and make it durable.
fn write_file(path: &Path, records: &[JournalRecord]) -> Result<(File, u64), DurableError> {
    let mut bytes = journal::header().to_vec();
    for r in records {
        journal::encode_record(r, &mut bytes);
    }
    // 0600 whatever the umask: the tables say where a database's data changed.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    f.write_all(&bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok((f, bytes.len() as u64))
}

fn sync_dir(path: &Path) -> Result<(), DurableError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

impl FileJournal {
    /// Open the next journal for `path` (as `path.new`, empty); `capacity` gives each
    /// pair's LU size in LBAs. Records appended before [`Self::commit`] are only buffered.
    pub fn create(
        path: &Path,
        capacity: BTreeMap<PairKey, u64>,
        tuning: Tuning,
    ) -> Result<FileJournal, DurableError> {
        let tmp = tmp_path(path);
        let (file, len) = write_file(&tmp, &[])?;
        Ok(FileJournal {
            path: path.to_path_buf(),
            tuning,
            capacity,
            inner: Mutex::new(Inner {
                file: Arc::new(file),
                pending: Vec::new(),
                appended: 0,
                durable: 0,
                flushing: false,
                failed: None,
                retried: None,
                loading: true,
                file_len: len,
                checkpoint_len: len,
                state: JournalState::default(),
                regions: BTreeMap::new(),
                track_regions: BTreeMap::new(),
                flushes: 0,
                compactions: 0,
            }),
            flushed: Condvar::new(),
        })
    }

    /// Make what was appended since `create` durable and put the new file in place of
    /// the old one, atomically; from here on appends follow the durability rules.
    pub fn commit(&self) -> Result<(), DurableError> {
        let mut g = lock(&self.inner);
        let tmp = tmp_path(&self.path);
        let pending = std::mem::take(&mut g.pending);
        let res = (&*g.file)
            .write_all(&pending)
            .and_then(|()| g.file.sync_data())
            .map_err(io_err(&tmp))
            .and_then(|()| std::fs::rename(&tmp, &self.path).map_err(io_err(&self.path)))
            .and_then(|()| sync_dir(&self.path));
        if let Err(e) = &res {
            g.failed = Some(e.to_string());
        } else {
            g.file_len += pending.len() as u64;
            g.checkpoint_len = g.file_len;
            g.durable = g.appended;
            g.loading = false;
        }
        res
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bound the state's tables of each pair in `budgets` (call before appending).
    pub fn set_budgets(&self, budgets: &BTreeMap<PairKey, Budgets>) {
        let mut g = lock(&self.inner);
        for (&pair, b) in budgets {
            g.state.tables.entry(pair).or_default().set_budget(b.table);
            g.state
                .tracking
                .entry(pair)
                .or_default()
                .set_budget(Some(b.tracking));
        }
    }

    pub fn stats(&self) -> JournalStats {
        let g = lock(&self.inner);
        JournalStats {
            file_bytes: g.file_len + g.pending.len() as u64,
            flushes: g.flushes,
            compactions: g.compactions,
        }
    }

    /// The exact state the journal describes.
    pub fn state(&self) -> JournalState {
        lock(&self.inner).state.clone()
    }

    /// Write and flush everything appended so far.
    pub fn sync(&self) -> Result<(), JournalError> {
        let g = lock(&self.inner);
        let seq = g.appended;
        self.wait_durable(g, seq)
    }

    /// Rewrite the file as a checkpoint of the exact state (also what a clean shutdown
    /// does, so a restart after it needs no extra copying). After a failure this is the
    /// repair: the checkpoint holds everything appended, and appends work again.
    pub fn compact(&self) -> Result<(), JournalError> {
        let g = lock(&self.inner);
        self.compact_locked(g).map(drop)
    }

    /// Why the journal is out of service, if it is: data writes that need it fail.
    pub fn failure(&self) -> Option<String> {
        lock(&self.inner).failed.clone()
    }

    /// After a failure, write a checkpoint again if [`RETRY_EVERY`] has passed since the
    /// last attempt; `Ok` when the journal is in service (now or already).
    pub fn retry(&self) -> Result<(), JournalError> {
        let g = lock(&self.inner);
        self.retry_locked(g).map(drop)
    }

    fn retry_locked<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner>,
    ) -> Result<MutexGuard<'a, Inner>, JournalError> {
        let Some(reason) = g.failed.clone() else {
            return Ok(g);
        };
        if g.retried.is_some_and(|t| t.elapsed() < RETRY_EVERY) {
            return Err(closed(&reason));
        }
        g.retried = Some(Instant::now());
        self.compact_locked(g)
    }

    fn compact_locked<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner>,
    ) -> Result<MutexGuard<'a, Inner>, JournalError> {
        while g.flushing {
            g = self.flushed.wait(g).unwrap_or_else(PoisonError::into_inner);
        }
        let tmp = tmp_path(&self.path);
        let res = write_file(&tmp, &g.state.checkpoint()).and_then(|(f, len)| {
            std::fs::rename(&tmp, &self.path).map_err(io_err(&self.path))?;
            sync_dir(&self.path)?;
            Ok((f, len))
        });
        match res {
            Ok((f, len)) => {
                g.file = Arc::new(f);
                g.pending.clear();
                g.file_len = len;
                g.checkpoint_len = len;
                g.durable = g.appended;
                g.regions.clear();
                g.track_regions.clear();
                g.compactions += 1;
                if let Some(reason) = g.failed.take() {
                    tracing::warn!(journal = %self.path.display(), earlier = %reason, "journal written again; data writes that need it work again");
                }
                tracing::debug!(journal = %self.path.display(), bytes = len, "journal compacted");
                Ok(g)
            }
            Err(e) => {
                // Only the first failure is logged as an error; retries fail quietly.
                if g.failed.is_none() {
                    tracing::error!(journal = %self.path.display(), error = %e, "journal checkpoint failed; data writes that need it fail until it is written again");
                }
                let _ = std::fs::remove_file(&tmp);
                g.failed = Some(e.to_string());
                self.flushed.notify_all();
                Err(JournalError::Io(std::io::Error::other(e.to_string())))
            }
        }
    }

    /// Wait until record `seq` is on disk, flushing the queue if nobody else is.
    fn wait_durable<'a>(
        &'a self,
        mut g: MutexGuard<'a, Inner>,
        seq: u64,
    ) -> Result<(), JournalError> {
        loop {
            if g.durable >= seq || g.loading {
                return Ok(());
            }
            if let Some(e) = &g.failed {
                return Err(closed(e));
            }
            if g.flushing {
                g = self.flushed.wait(g).unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            g.flushing = true;
            let batch = std::mem::take(&mut g.pending);
            let target = g.appended;
            let file = g.file.clone();
            drop(g);
            let res = (&*file).write_all(&batch).and_then(|()| file.sync_data());
            g = lock(&self.inner);
            g.flushing = false;
            match res {
                Ok(()) => {
                    g.durable = target;
                    g.file_len += batch.len() as u64;
                    g.flushes += 1;
                }
                Err(e) => {
                    tracing::error!(journal = %self.path.display(), error = %e, "journal write failed; data writes that need it fail from now on");
                    g.failed = Some(e.to_string());
                    g.retried = Some(Instant::now());
                }
            }
            self.flushed.notify_all();
        }
    }

    /// For an `Add` or a `TrackAdd`: queue the region marks it needs that are not durable
    /// yet; true when there are some (the append then waits for them).
    fn mark_regions(&self, g: &mut Inner, rec: &JournalRecord) -> bool {
        let (pair, extent, track) = match *rec {
            JournalRecord::Add { pair, extent } => (pair, extent, false),
            JournalRecord::TrackAdd { pair, extent } => (pair, extent, true),
            _ => return false,
        };
        if g.loading {
            return false;
        }
        let marks = if track {
            &mut g.track_regions
        } else {
            &mut g.regions
        };
        let new = self.new_regions(marks, pair, extent);
        for &extent in &new {
            let mark = if track {
                JournalRecord::TrackAdd { pair, extent }
            } else {
                JournalRecord::Add { pair, extent }
            };
            journal::encode_record(&mark, &mut g.pending);
            g.appended += 1;
        }
        !new.is_empty()
    }

    /// The region marks `extent` of `pair` needs that are not durable yet, in `marks`
    /// (the update-location table's or the tracking's).
    fn new_regions(
        &self,
        marks: &mut BTreeMap<PairKey, BTreeSet<u64>>,
        pair: PairKey,
        extent: Extent,
    ) -> Vec<Extent> {
        let r = self.tuning.region_lbas.max(1);
        let cap = self.capacity.get(&pair).copied().unwrap_or(u64::MAX);
        let marked = marks.entry(pair).or_default();
        let mut out = Vec::new();
        for region in extent.first() / r..=extent.last() / r {
            if marked.insert(region) {
                let first = region * r;
                let last = (first + r - 1).min(cap.saturating_sub(1)).max(first);
                if let Some(e) = Extent::new(first, last) {
                    out.push(e);
                }
            }
        }
        out
    }
}

fn closed(reason: &str) -> JournalError {
    JournalError::Io(std::io::Error::other(format!(
        "the journal failed ({reason}); host-agent writes it again every {} s",
        RETRY_EVERY.as_secs()
    )))
}

impl StateLog for FileJournal {
    fn append(&self, rec: &JournalRecord) -> Result<(), JournalError> {
        self.append_all(std::slice::from_ref(rec))
    }

    /// All of `recs` under one lock, waiting at most once: a write's `TrackAdd` and
    /// `Add` share a flush.
    fn append_all(&self, recs: &[JournalRecord]) -> Result<(), JournalError> {
        let mut g = self.retry_locked(lock(&self.inner))?;
        // A mode change (or a complete) that does not reach the disk is not made by the
        // manager either: the state must not keep it, or a later checkpoint would write it.
        let mut undo = Vec::new();
        let mut durable = false;
        for rec in recs {
            match Undo::of(&g.state, rec) {
                Undo::Nothing => {}
                u => undo.push(u),
            }
            durable |= self.queue(&mut g, rec);
        }
        if !g.loading
            && g.file_len + g.pending.len() as u64
                > self.tuning.compact_bytes.max(2 * g.checkpoint_len)
        {
            // The checkpoint holds these records too.
            return self.compact_locked(g).map(drop);
        }
        if !durable {
            return Ok(());
        }
        let seq = g.appended;
        let res = self.wait_durable(g, seq);
        if res.is_err() {
            let state = &mut lock(&self.inner).state;
            for u in undo.into_iter().rev() {
                u.apply(state);
            }
        }
        res
    }
}

impl FileJournal {
    /// Apply `rec` to the state and queue it (with any region marks it needs); true when
    /// it must be durable before `append` returns.
    fn queue(&self, g: &mut Inner, rec: &JournalRecord) -> bool {
        g.state.apply(rec);
        let mut durable = true;
        match *rec {
            JournalRecord::TrackCut { pair, .. } => {
                // The marks were of the set the cut emptied.
                g.track_regions.remove(&pair);
            }
            JournalRecord::TrackReset { pair } => {
                durable = false;
                g.track_regions.remove(&pair);
            }
            JournalRecord::TrackComplete { .. } | JournalRecord::TrackAbort { .. } => {}
            JournalRecord::Add { .. } | JournalRecord::TrackAdd { .. } => {
                durable = self.mark_regions(g, rec);
            }
            JournalRecord::Remove { pair, extent } => {
                durable = false;
                // A removal may undo part of a region mark: mark the region again on its
                // next write.
                let r = self.tuning.region_lbas.max(1);
                if let Some(set) = g.regions.get_mut(&pair) {
                    let hit: Vec<u64> = set
                        .range(extent.first() / r..=extent.last() / r)
                        .copied()
                        .collect();
                    for x in hit {
                        set.remove(&x);
                    }
                }
            }
            JournalRecord::Clear { pair } => {
                durable = false;
                g.regions.remove(&pair);
            }
            JournalRecord::LuMode { .. }
            | JournalRecord::Save { .. }
            | JournalRecord::SnapshotInvalid { .. } => {}
        }
        journal::encode_record(rec, &mut g.pending);
        g.appended += 1;
        durable
    }
}

/// What a failed durable append takes back from the journal's state: a mode change, and
/// a complete (which drops a pending set). A cut or abort that failed needs nothing:
/// both keep the union of the sets, so the state then covers at least what the manager's
/// does.
enum Undo {
    Nothing,
    LuMode(hvm_core::VirtualLuId, hvm_core::LuModeEntry),
    Complete(PairKey, Option<hvm_core::BackupId>, Box<Pending>),
}

impl Undo {
    fn of(state: &JournalState, rec: &JournalRecord) -> Undo {
        match *rec {
            JournalRecord::LuMode { vlu, .. } => state
                .lu_mode
                .get(vlu)
                .map_or(Undo::Nothing, |e| Undo::LuMode(vlu, e)),
            JournalRecord::TrackComplete { pair, backup } => {
                let c = state.tracking.get(&pair);
                match c.and_then(|c| c.pending()).filter(|p| p.backup == backup) {
                    Some(p) => {
                        Undo::Complete(pair, c.and_then(ChangedBlocks::base), Box::new(p.clone()))
                    }
                    None => Undo::Nothing,
                }
            }
            _ => Undo::Nothing,
        }
    }

    fn apply(self, state: &mut JournalState) {
        match self {
            Undo::Nothing => {}
            Undo::LuMode(vlu, entry) => state.lu_mode.set(vlu, entry),
            Undo::Complete(pair, base, pending) => {
                state
                    .tracking
                    .entry(pair)
                    .or_default()
                    .reinstate(base, *pending);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hvm_core::{LuModeEntry, Mode, VirtualLuId};

    const P: PairKey = VirtualLuId(0);

    fn ext(f: u64, l: u64) -> Extent {
        Extent::new(f, l).unwrap()
    }

    fn tuning() -> Tuning {
        Tuning {
            region_lbas: 1024,
            compact_bytes: 1 << 20,
        }
    }

    fn open(path: &Path, t: Tuning) -> FileJournal {
        let j = FileJournal::create(path, BTreeMap::from([(P, 10_000)]), t).unwrap();
        j.commit().unwrap();
        j
    }

    fn on_disk(path: &Path) -> JournalState {
        recover(path).unwrap().unwrap().state
    }

    fn add(j: &FileJournal, e: Extent) {
        j.append(&JournalRecord::Add { pair: P, extent: e })
            .unwrap();
    }

    #[test]
    fn a_new_range_is_on_disk_before_append_returns() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.journal");
        let j = open(&path, tuning());
        add(&j, ext(10, 11));
        // The region is durable; the exact range rides along.
        assert!(on_disk(&path).tables[&P].covers(ext(0, 1023)));
        // A second write into the region waits for nothing: its exact range is queued.
        let flushes = j.stats().flushes;
        add(&j, ext(500, 507));
        assert_eq!(j.stats().flushes, flushes);
        j.sync().unwrap();
        // The last region is clipped to the LU.
        add(&j, ext(9_990, 9_999));
        let t = &on_disk(&path).tables[&P];
        assert_eq!(t.intersection(ext(9_216, 20_000)), vec![ext(9_216, 9_999)]);
        // The journal's own state stays exact.
        let exact = &j.state().tables[&P];
        assert_eq!(exact.total(), 2 + 8 + 10);
    }

    #[test]
    fn removals_wait_for_the_next_flush_and_unmark_regions() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.journal");
        let j = open(&path, tuning());
        add(&j, ext(0, 7));
        j.append(&JournalRecord::Remove {
            pair: P,
            extent: ext(0, 1023),
        })
        .unwrap();
        assert!(
            on_disk(&path).tables[&P].covers(ext(0, 7)),
            "a removal is not waited for"
        );
        // The region must be marked again by the next write into it.
        add(&j, ext(100, 100));
        let t = &on_disk(&path).tables[&P];
        assert!(t.covers(ext(0, 1023)), "{t:?}");
    }

    #[test]
    fn mode_changes_are_durable_and_a_clean_compaction_is_exact() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.journal");
        let j = open(&path, tuning());
        let entry = LuModeEntry {
            read: None,
            write: None,
            mode: Mode::Snapshot,
        };
        j.append(&JournalRecord::LuMode { vlu: P, entry }).unwrap();
        assert_eq!(on_disk(&path).lu_mode.get(P).unwrap().mode, Mode::Snapshot);
        add(&j, ext(3, 4));
        j.compact().unwrap();
        let st = on_disk(&path);
        assert_eq!(st.tables[&P].iter().collect::<Vec<_>>(), vec![ext(3, 4)]);
        assert_eq!(st, j.state());
    }

    #[test]
    fn the_file_stays_bounded_and_replays_to_the_same_state() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.journal");
        let t = Tuning {
            region_lbas: 1,
            compact_bytes: 64 << 10,
        };
        let j = FileJournal::create(&path, BTreeMap::from([(P, 1 << 30)]), t).unwrap();
        j.commit().unwrap();
        for i in 0..20_000u64 {
            add(&j, ext(i * 4, i * 4 + 1));
            j.append(&JournalRecord::Remove {
                pair: P,
                extent: ext(i * 4, i * 4),
            })
            .unwrap();
            j.append(&JournalRecord::Remove {
                pair: P,
                extent: ext(i * 4 + 1, i * 4 + 1),
            })
            .unwrap();
        }
        add(&j, ext(7, 7));
        let s = j.stats();
        assert!(s.compactions > 0 && s.file_bytes < 200 << 10, "{s:?}");
        j.sync().unwrap();
        assert_eq!(
            on_disk(&path).tables[&P].iter().collect::<Vec<_>>(),
            vec![ext(7, 7)]
        );
    }

    #[test]
    fn concurrent_appends_share_flushes() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.journal");
        let t = Tuning {
            region_lbas: 1,
            compact_bytes: 1 << 30,
        };
        let j = FileJournal::create(&path, BTreeMap::from([(P, 1 << 30)]), t).unwrap();
        j.commit().unwrap();
        std::thread::scope(|s| {
            for w in 0..8u64 {
                let j = &j;
                s.spawn(move || {
                    for i in 0..200u64 {
                        add(j, ext((i * 8 + w) * 2, (i * 8 + w) * 2));
                    }
                });
            }
        });
        let flushes = j.stats().flushes;
        assert!(flushes < 1600, "{flushes} flushes for 1600 durable appends");
        assert_eq!(on_disk(&path).tables[&P].total(), 1600);
    }

    #[test]
    fn a_failed_write_fails_the_append_and_later_ones_until_written_again() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.journal");
        let j = open(&path, tuning());
        // /dev/full: every write fails with ENOSPC.
        lock(&j.inner).file = Arc::new(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        );
        let e = j.append(&JournalRecord::Add {
            pair: P,
            extent: ext(0, 0),
        });
        assert!(e.is_err());
        let e = j
            .append(&JournalRecord::Remove {
                pair: P,
                extent: ext(0, 0),
            })
            .unwrap_err();
        let why = std::error::Error::source(&e).map(ToString::to_string);
        assert!(
            why.as_deref()
                .is_some_and(|w| w.contains("writes it again")),
            "{e}: {why:?}"
        );
        assert!(j.failure().is_some_and(|f| f.contains("No space left")));
        // The retry writes a whole checkpoint (a new file, not /dev/full): the failed
        // Add is in it (a range that may have been written is kept), appends work again.
        std::thread::sleep(RETRY_EVERY);
        j.append(&JournalRecord::Add {
            pair: P,
            extent: ext(50, 60),
        })
        .unwrap();
        assert_eq!(j.failure(), None);
        let t: Vec<Extent> = on_disk(&path).tables[&P].iter().collect();
        let has = |lba: u64| t.iter().any(|e| e.first() <= lba && lba <= e.last());
        assert!(has(0) && has(55), "{t:?}");
    }

    fn track(j: &FileJournal, e: Extent) {
        j.append(&JournalRecord::TrackAdd { pair: P, extent: e })
            .unwrap();
    }

    fn backup(s: &str) -> hvm_core::BackupId {
        hvm_core::BackupId::new(s).unwrap()
    }

    /// Changed-block tracking: a write's region is on disk before append returns; a cut
    /// unmarks the regions (their marks were of the set it emptied), so the next write
    /// into the same region is durable again and lands in the new current set; cuts and
    /// completes are durable at once.
    #[test]
    fn tracking_records_follow_the_durability_rule() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.journal");
        let j = open(&path, tuning());
        track(&j, ext(10, 11));
        assert!(on_disk(&path).tracking[&P].current().covers(ext(0, 1023)));
        let flushes = j.stats().flushes;
        track(&j, ext(500, 507));
        assert_eq!(
            j.stats().flushes,
            flushes,
            "same region: nothing waited for"
        );
        j.append(&JournalRecord::TrackCut {
            pair: P,
            backup: backup("b1"),
        })
        .unwrap();
        let st = on_disk(&path);
        assert!(st.tracking[&P].current().is_empty());
        assert!(st.tracking[&P]
            .pending()
            .unwrap()
            .blocks
            .covers(ext(500, 507)));
        track(&j, ext(600, 600));
        let st = on_disk(&path);
        assert!(st.tracking[&P].current().covers(ext(600, 600)), "{st:?}");
        j.append(&JournalRecord::TrackComplete {
            pair: P,
            backup: backup("b1"),
        })
        .unwrap();
        let st = on_disk(&path);
        assert_eq!(st.tracking[&P].base(), Some(backup("b1")));
        assert!(st.tracking[&P].pending().is_none());
        // The journal's own state stays exact, and a compaction keeps it.
        assert_eq!(j.state().tracking[&P].current().total(), 1);
        j.compact().unwrap();
        assert_eq!(on_disk(&path).tracking, j.state().tracking);
    }

    /// A compaction writes the exact sets, not the regions: a write after it into a
    /// region marked before it must mark that region again, durably.
    #[test]
    fn a_compaction_unmarks_the_tracking_regions() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.journal");
        let j = open(&path, tuning());
        track(&j, ext(10, 11));
        j.compact().unwrap();
        track(&j, ext(500, 507));
        assert!(on_disk(&path).tracking[&P].current().covers(ext(500, 507)));
    }

    /// A write's `TrackAdd` and `Add`, appended together, are both on disk after one
    /// flush.
    #[test]
    fn a_write_s_two_records_share_a_flush() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.journal");
        let j = open(&path, tuning());
        let flushes = j.stats().flushes;
        let (pair, extent) = (P, ext(2048, 2055));
        j.append_all(&[
            JournalRecord::TrackAdd { pair, extent },
            JournalRecord::Add { pair, extent },
        ])
        .unwrap();
        assert_eq!(j.stats().flushes, flushes + 1);
        let st = on_disk(&path);
        assert!(st.tracking[&P].current().covers(extent) && st.tables[&P].covers(extent));
    }

    /// With budgets the journal's copy of the tables stays bounded and covers every
    /// write; without, it would hold every range exactly.
    #[test]
    fn budgets_bound_the_journal_state() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.journal");
        let t = Tuning {
            region_lbas: 1 << 20,
            compact_bytes: 1 << 30,
        };
        let j = FileJournal::create(&path, BTreeMap::from([(P, 1 << 30)]), t).unwrap();
        let b = TableBudget::bytes(256 << 10);
        j.set_budgets(&BTreeMap::from([(
            P,
            Budgets {
                table: Some(b),
                tracking: b,
            },
        )]));
        j.commit().unwrap();
        for i in 0..40_000u64 {
            add(&j, ext(i * 64, i * 64));
            track(&j, ext(i * 64 + 1, i * 64 + 1));
        }
        let st = j.state();
        assert!(st.tables[&P].is_coarse() && st.tracking[&P].is_coarse());
        assert!(st.tables[&P].memory_bytes() <= 128 << 10);
        assert!(st.tracking[&P].memory_bytes() <= 128 << 10);
        assert!(
            (0..40_000u64).all(|i| st.tables[&P].covers(ext(i * 64, i * 64))
                && st.tracking[&P]
                    .current()
                    .covers(ext(i * 64 + 1, i * 64 + 1)))
        );
        j.compact().unwrap();
        let back = on_disk(&path);
        assert!((0..40_000u64).all(|i| back.tracking[&P]
            .current()
            .covers(ext(i * 64 + 1, i * 64 + 1))));
    }

    #[test]
    fn recovery_keeps_a_prefix_and_refuses_foreign_files() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.journal");
        assert!(recover(&path).unwrap().is_none());
        let j = open(&path, tuning());
        add(&j, ext(0, 0));
        drop(j);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[1, 2, 3]);
        std::fs::write(&path, &bytes).unwrap();
        let r = recover(&path).unwrap().unwrap();
        assert!(matches!(r.tail, Tail::Torn { .. }), "{:?}", r.tail);
        assert!(r.state.tables[&P].covers(ext(0, 0)));
        std::fs::write(&path, b"not a journal at all").unwrap();
        assert!(recover(&path).is_err());
    }
}

//! The array-side backup functions of EP 1 058 190, as firmware: they run inside the
//! array, so a backup's data goes from a volume to a backup device without passing
//! through any host.
//!
//! - **Pairs** ([0022]-[0031]): a user volume and a secondary volume hold the same data.
//!   Pair formation copies the user volume to the secondary in the background (step 40;
//!   state `forming`). A pair split freezes the secondary; a write to the user volume
//!   then sets a bit of the *difference bitmap* (one bit per `blocks_per_bit` blocks,
//!   [0020]) instead of reaching the secondary. A resync copies only the marked units
//!   ([0031]). The secondary is never writable by a host.
//! - **Area-unit split** ([0041]-[0051]): the split names areas (Fig. 5's parameters);
//!   the *pair split bitmap* marks them. A write inside a split area only marks the
//!   difference bitmap, outside it reaches both volumes (Fig. 6, steps 63-65). A resync
//!   names areas too (Fig. 7, steps 70-76), so different areas freeze and thaw at
//!   different times.
//! - **Cascade** ([0058]): a secondary may be the user volume of a second pair (a
//!   triplex). A write reaches every volume down the chain whose unit is not split.
//! - **CCOPY** ([0029]-[0030]): copies the listed ranges of a split secondary to a backup
//!   device; the array checks the volume is a split secondary (and, after an area split,
//!   that every range is inside the split areas) and refuses otherwise; it answers when
//!   the copy is checked and started, with a job to poll.
//! - **AUTO** ([0037]-[0040]): on the user volume: split the listed areas, answer, copy
//!   from the secondary, resync those areas; an unpaired volume is an error (step 94).
//! - **Working-volume copy-on-write** ([0062]-[0097], [0098]-[0122]): a copy request
//!   on a user volume marks its blocks "copy necessary & unsaved" (Fig. 10). A write to
//!   such a block first saves the old data to the request's working volume ("& saved");
//!   the copy process takes each block, in the request's order, from the user volume or
//!   the working volume and marks it "copied" (Figs. 12, 13). The working volume comes
//!   from the pool of volumes with the "work" attribute (Fig. 15) and goes back to it at
//!   the end; saving is compact (the next free block, [0122]) unless the request asks
//!   for the block's own number ([0081]). The attribute command is refused while the
//!   volume is under copying (Fig. 16), and hosts cannot access working volumes
//!   ([0123]). A request may instead ask for the prior art of [0005]-[0006]: no saving,
//!   and a write to a block still to be copied waits until the whole copy ends.
//!
//! Locking: every write, unit copy and split takes the range locks of the chain's first
//! user volume (see [`crate::mirror`]) over whole bitmap units, then the state mutex only
//! to read or flip bits; I/O is never done under the state mutex.
//!
//! What survives a restart of the array: the pair table with its split areas, the
//! attributes (files `pairs` and `attributes`), and each pair's difference bitmap (file
//! `diff-PRIMARY.bits`, see [`crate::bitmaps`]): after an orderly stop the resync copies
//! only the units marked before it; after a death of the array the split units keep
//! their marks and the units not split are copied again (`forming`), since a write to
//! both volumes may have been cut between them. Copy jobs in progress are lost; their
//! media have no trailer, so a restore of one refuses.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use hvm_core::array_backup::{
    Area, ArrayCounters, BackupOp, BackupReply, DeviceStatus, JobState, JobStatus, PairState,
    PairStatus,
};

use crate::bitmaps::{Bitmap, DiffFile};
use crate::config::BackupConfig;
use crate::geometry::BLOCK_SIZE;
use crate::scsi::Sense;
use crate::store::Store;
use crate::tape::TapeWriter;

/// A refused or failed function: the sense data and the reason for the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub sense: Sense,
    pub message: String,
}

fn refuse(sense: Sense, message: impl Into<String>) -> Refusal {
    Refusal {
        sense,
        message: message.into(),
    }
}

fn state_err(m: impl Into<String>) -> Refusal {
    refuse(Sense::BACKUP_STATE, m)
}

fn param_err(m: impl Into<String>) -> Refusal {
    refuse(Sense::BACKUP_PARAMETERS, m)
}

fn io_err(s: Sense, what: &str) -> Refusal {
    refuse(s, format!("{what}: {s}"))
}

/// Blocks copied or saved per step of a job: the range lock is held for one step.
const STEP_BLOCKS: u64 = 256;
/// Finished jobs remembered for status.
const KEPT_JOBS: usize = 256;
/// Blocks a resync or initial copy handles under one range lock (512 KiB).
const SYNC_BATCH_BLOCKS: u64 = 1024;

struct Pair {
    primary: u8,
    secondary: u8,
    state: PairState,
    /// The pair split bitmap ([0042]).
    split: Bitmap,
    /// The difference bitmap ([0020]).
    diff: Bitmap,
    /// Where `diff` survives a restart (see [`crate::bitmaps`]).
    diff_file: Arc<DiffFile>,
    copied_bytes: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CopyState {
    Unnecessary,
    Unsaved,
    Saved,
    Copied,
}

/// Fig. 14's copy state management information.
struct CopyInfo {
    job: u32,
    source: u8,
    /// The working volume; `None` for the prior art's waiting copy.
    work: Option<u8>,
    states: Vec<CopyState>,
    /// Where a saved block is in the working volume.
    slots: HashMap<u64, u64>,
    next_slot: u64,
    same_block: bool,
}

struct Job {
    status: JobStatus,
    started: Instant,
    ended: Option<Instant>,
}

#[derive(Default)]
struct State {
    pairs: Vec<Pair>,
    /// Volumes with the "work" attribute (Fig. 15's attribute flag 800).
    work: BTreeSet<u8>,
    /// Fig. 11's copy state flag 401: how many copies use the volume ("under copying").
    copying: BTreeMap<u8, u32>,
    infos: Vec<CopyInfo>,
    jobs: BTreeMap<u32, Job>,
    busy_devices: BTreeSet<String>,
    next_job: u32,
}

impl State {
    fn pair_of_primary(&self, lun: u8) -> Option<usize> {
        self.pairs.iter().position(|p| p.primary == lun)
    }

    fn pair_of_secondary(&self, lun: u8) -> Option<usize> {
        self.pairs.iter().position(|p| p.secondary == lun)
    }

    /// The first user volume of the chain `lun` is in: the key of its range locks.
    fn root(&self, mut lun: u8) -> u8 {
        for _ in 0..256 {
            match self.pair_of_secondary(lun) {
                Some(i) => lun = self.pairs[i].primary,
                None => break,
            }
        }
        lun
    }

    fn copying(&self, lun: u8) -> bool {
        self.copying.get(&lun).is_some_and(|n| *n > 0)
    }

    fn hold(&mut self, lun: u8) {
        *self.copying.entry(lun).or_default() += 1;
    }

    fn release(&mut self, lun: u8) {
        if let Some(n) = self.copying.get_mut(&lun) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.copying.remove(&lun);
            }
        }
    }
}

#[derive(Default)]
struct Counters {
    device_bytes: AtomicU64,
    saved_bytes: AtomicU64,
    pair_copy_bytes: AtomicU64,
}

/// The backup firmware of one array.
pub struct Firmware {
    n: u64,
    dir: PathBuf,
    devices: BTreeMap<String, PathBuf>,
    /// LUs outside the mirroring rows, with their capacities.
    plain: BTreeMap<u8, u64>,
    state: Mutex<State>,
    /// Signalled when a job ends (the prior art's waiting writes wait on it).
    ended: Condvar,
    counters: Counters,
    store: Arc<Store>,
}

impl std::fmt::Debug for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Firmware").finish_non_exhaustive()
    }
}

const PAIRS_FILE: &str = "pairs";
const ATTRIBUTES_FILE: &str = "attributes";

impl Firmware {
    /// Start the firmware over `store`; `plain` are the LUs outside mirroring rows.
    pub(crate) fn open(
        cfg: &BackupConfig,
        dir: &Path,
        plain: BTreeMap<u8, u64>,
        store: Arc<Store>,
    ) -> Result<Arc<Firmware>, String> {
        let devices = cfg
            .devices
            .iter()
            .map(|d| (d.name.clone(), dir.join(&d.file)))
            .collect();
        let mut st = State {
            work: cfg.work.iter().copied().collect(),
            next_job: 1,
            ..State::default()
        };
        let n = u64::from(cfg.blocks_per_bit);
        let attrs = dir.join(ATTRIBUTES_FILE);
        if let Ok(text) = std::fs::read_to_string(&attrs) {
            st.work.clear();
            for (i, line) in text.lines().enumerate() {
                let lun: u8 = line
                    .trim()
                    .parse()
                    .map_err(|_| format!("{}: line {}: expected a LUN", attrs.display(), i + 1))?;
                st.work.insert(lun);
            }
        }
        let pairs = dir.join(PAIRS_FILE);
        let mut restart = Vec::new();
        if let Ok(text) = std::fs::read_to_string(&pairs) {
            for (i, line) in text.lines().enumerate() {
                let bad = |m: &str| format!("{}: line {}: {m}", pairs.display(), i + 1);
                let mut f = line.split_whitespace();
                let (Some(p), Some(s)) = (f.next(), f.next()) else {
                    return Err(bad("expected \"PRIMARY SECONDARY [FIRST+UNITS ...]\""));
                };
                let p: u8 = p.parse().map_err(|_| bad("the primary is not a LUN"))?;
                let s: u8 = s.parse().map_err(|_| bad("the secondary is not a LUN"))?;
                let blocks = *plain
                    .get(&p)
                    .ok_or_else(|| bad("the primary is not a plain LU"))?;
                let units = blocks.div_ceil(n);
                let mut split = Bitmap::new(units);
                for run in f {
                    let a: Area = run.parse().map_err(|e: String| bad(&e))?;
                    if a.end() > units {
                        return Err(bad("a split run is past the end"));
                    }
                    (a.start..a.end()).for_each(|u| split.put(u, true));
                }
                let (diff, todo, file) = restored_diff(dir, p, &split)?;
                restart.push((p, todo));
                st.pairs.push(Pair {
                    primary: p,
                    secondary: s,
                    state: PairState::Forming,
                    split,
                    diff,
                    diff_file: Arc::new(file),
                    copied_bytes: 0,
                });
            }
        }
        let fw = Arc::new(Firmware {
            n,
            dir: dir.to_path_buf(),
            devices,
            plain,
            state: Mutex::new(st),
            ended: Condvar::new(),
            counters: Counters::default(),
            store,
        });
        for (p, todo) in restart {
            fw.spawn_sync(p, todo);
        }
        Ok(fw)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks `lba..lba+blocks` widened to whole units.
    fn unit_span(&self, lba: u64, blocks: u64) -> (u64, u64) {
        let first = lba / self.n * self.n;
        let end = (lba + blocks).div_ceil(self.n) * self.n;
        (first, end - first)
    }

    fn save_pairs(&self, st: &State) -> Result<(), Refusal> {
        let mut text = String::new();
        for p in &st.pairs {
            text.push_str(&format!("{} {}", p.primary, p.secondary));
            for (f, n) in p.split.runs() {
                text.push_str(&format!(" {f}+{n}"));
            }
            text.push('\n');
        }
        write_atomic(&self.dir.join(PAIRS_FILE), &text)
    }

    fn save_attributes(&self, st: &State) -> Result<(), Refusal> {
        let text: String = st.work.iter().map(|l| format!("{l}\n")).collect();
        write_atomic(&self.dir.join(ATTRIBUTES_FILE), &text)
    }

    // ---- the host's I/O ----

    /// Refuse host reads of a working volume ([0123]).
    pub(crate) fn check_read(&self, lun: u8) -> Result<(), Refusal> {
        if self.lock().work.contains(&lun) {
            return Err(working(lun));
        }
        Ok(())
    }

    /// A host write to `lun`: `Ok(false)` when no backup function is involved (the
    /// engine writes as usual).
    pub(crate) fn host_write(&self, lun: u8, lba: u64, data: &[u8]) -> Result<bool, Refusal> {
        let blocks = (data.len() / BLOCK_SIZE as usize) as u64;
        let root = {
            let mut st = self.lock();
            if st.work.contains(&lun) {
                return Err(working(lun));
            }
            if let Some(i) = st.pair_of_secondary(lun) {
                return Err(refuse(
                    Sense::WRITE_PROTECTED,
                    format!(
                        "LU {lun} is the secondary volume of LU {}; hosts cannot write it",
                        st.pairs[i].primary
                    ),
                ));
            }
            let cow = st.infos.iter().any(|c| c.source == lun);
            if !cow && st.pair_of_primary(lun).is_none() {
                return Ok(false);
            }
            // The prior art ([0006]): a write to a block still to be copied waits for the
            // whole copy to end.
            while st.infos.iter().any(|c| {
                c.source == lun
                    && c.work.is_none()
                    && (lba..lba + blocks).any(|b| c.states[b as usize] == CopyState::Unsaved)
            }) {
                st = self.ended.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            st.root(lun)
        };
        let (first, span) = self.unit_span(lba, blocks);
        let _locked = self.store.locks.lock(root, first, span);
        self.save_before_write(lun, lba, blocks)?;
        self.mark_split(lun, lba, blocks)?;
        self.store
            .write(lun, lba, data)
            .map_err(|s| io_err(s, "writing the user volume"))?;
        self.propagate(lun, lba, data)?;
        Ok(true)
    }

    /// Fig. 12 steps 501-503 (Fig. 17 steps 1100-1101): save the "copy necessary &
    /// unsaved" blocks of the write to each copy's working volume. Runs under the range
    /// lock, so neither the copy process nor another write can touch these blocks.
    fn save_before_write(&self, lun: u8, lba: u64, blocks: u64) -> Result<(), Refusal> {
        // Runs (job, work volume, first block, first slot, blocks) to save: consecutive
        // blocks of one job go to consecutive slots, in either saving mode, so a run is
        // one read and one write.
        let plan: Vec<(u32, u8, u64, u64, u64)> = {
            let mut st = self.lock();
            let mut plan: Vec<(u32, u8, u64, u64, u64)> = Vec::new();
            for c in st.infos.iter_mut().filter(|c| c.source == lun) {
                let Some(work) = c.work else { continue };
                for b in lba..lba + blocks {
                    if c.states[b as usize] != CopyState::Unsaved {
                        continue;
                    }
                    let slot = if c.same_block {
                        b
                    } else {
                        c.next_slot += 1;
                        c.next_slot - 1
                    };
                    match plan.last_mut() {
                        Some((job, _, first, at, n))
                            if *job == c.job && *first + *n == b && *at + *n == slot =>
                        {
                            *n += 1;
                        }
                        _ => plan.push((c.job, work, b, slot, 1)),
                    }
                }
            }
            plan
        };
        if plan.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        let mut saved = 0;
        for &(_, work, b, slot, n) in &plan {
            buf.resize((n * u64::from(BLOCK_SIZE)) as usize, 0);
            self.store
                .read(lun, b, &mut buf)
                .map_err(|s| io_err(s, "reading the blocks to save"))?;
            self.store
                .write(work, slot, &buf)
                .map_err(|s| io_err(s, "saving to the working volume"))?;
            saved += n;
        }
        self.counters
            .saved_bytes
            .fetch_add(saved * u64::from(BLOCK_SIZE), Ordering::Relaxed);
        let mut st = self.lock();
        for &(job, _, first, at, n) in &plan {
            if let Some(c) = st.infos.iter_mut().find(|c| c.job == job) {
                for i in 0..n {
                    c.states[(first + i) as usize] = CopyState::Saved;
                    c.slots.insert(first + i, at + i);
                }
            }
            if let Some(j) = st.jobs.get_mut(&job) {
                j.status.saved_blocks += n;
            }
        }
        Ok(())
    }

    /// Put on disk, before a write to `lun` lands, the difference bits it sets: the
    /// split units of the pair `lun` is the user volume of (see [`crate::bitmaps`]).
    fn mark_split(&self, lun: u8, lba: u64, blocks: u64) -> Result<(), Refusal> {
        let (file, changed) = {
            let mut st = self.lock();
            let Some(i) = st.pair_of_primary(lun) else {
                return Ok(());
            };
            let p = &mut st.pairs[i];
            let mut changed = Vec::new();
            for u in lba / self.n..(lba + blocks).div_ceil(self.n) {
                if p.split.get(u) && !p.diff.get(u) {
                    changed.extend(p.diff.set_span(u, u + 1));
                }
            }
            if changed.is_empty() {
                return Ok(());
            }
            changed.dedup();
            (p.diff_file.clone(), changed)
        };
        file.persist(|| {
            let st = self.lock();
            st.pair_of_primary(lun).map_or_else(Vec::new, |i| {
                let p = &st.pairs[i];
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

    /// An orderly stop: once every write in progress has ended, each pair's difference
    /// bitmap is written whole and marked clean, so the next start trusts it.
    pub(crate) fn shutdown(&self) -> Result<(), String> {
        let _all = self.store.locks.lock(0, 0, u64::MAX / 2);
        // Each file's lock is taken before the state's, as everywhere.
        let primaries: Vec<u8> = self.lock().pairs.iter().map(|p| p.primary).collect();
        for primary in primaries {
            let Some(f) = p_file(&self.lock(), primary) else {
                continue;
            };
            let read = || p_file_bits(&self.lock(), primary);
            f.rewrite(read, true)
                .map_err(|e| format!("{}: {e}", f.path().display()))?;
        }
        Ok(())
    }

    /// Fig. 6 steps 63-65, down a cascade: the units of the write that are split only
    /// mark the difference bitmap; the others reach the secondary, and its own pair.
    fn propagate(&self, lun: u8, lba: u64, data: &[u8]) -> Result<(), Refusal> {
        let blocks = (data.len() / BLOCK_SIZE as usize) as u64;
        let (secondary, runs) = {
            let mut st = self.lock();
            let Some(i) = st.pair_of_primary(lun) else {
                return Ok(());
            };
            let n = self.n;
            let p = &mut st.pairs[i];
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut b = lba;
            while b < lba + blocks {
                let u = b / n;
                let end = ((u + 1) * n).min(lba + blocks);
                if p.split.get(u) {
                    p.diff.put(u, true);
                } else {
                    match runs.last_mut() {
                        Some((s, e)) if *e == b => *e = end,
                        _ => runs.push((b, end)),
                    }
                }
                b = end;
            }
            (p.secondary, runs)
        };
        let bs = BLOCK_SIZE as usize;
        for (s, e) in runs {
            let part = &data[(s - lba) as usize * bs..(e - lba) as usize * bs];
            self.mark_split(secondary, s, e - s)?;
            self.store
                .write(secondary, s, part)
                .map_err(|x| io_err(x, "writing the secondary volume"))?;
            self.propagate(secondary, s, part)?;
        }
        Ok(())
    }
}

impl Firmware {
    // ---- pairs ----

    /// Copy the marked units of `todo` from the primary to the secondary in the
    /// background (step 40, Fig. 7), clearing their difference and split bits; then the
    /// pair is duplex, or split if split areas remain.
    fn spawn_sync(self: &Arc<Self>, primary: u8, todo: Bitmap) {
        let fw = Arc::clone(self);
        std::thread::spawn(move || {
            if let Err(e) = fw.sync_and_settle(primary, &todo) {
                eprintln!("array-sim: copy of the pair of LU {primary}: {}", e.message);
            }
        });
    }

    fn sync_and_settle(&self, primary: u8, todo: &Bitmap) -> Result<(), Refusal> {
        let r = self.sync(primary, todo);
        let mut st = self.lock();
        if let Some(i) = st.pair_of_primary(primary) {
            let p = &mut st.pairs[i];
            p.state = if p.split.count() > 0 {
                PairState::Split
            } else {
                PairState::Duplex
            };
            // The split bits cleared by the resync are durable with the next change; a
            // restart before it treats those units as split and different: a redundant
            // copy, never a lost one.
            let _ = self.save_pairs(&st);
            let file = p_file(&st, primary);
            drop(st);
            if let (Ok(()), Some(f)) = (&r, file) {
                // The copied units' marks leave the file too.
                let _ = f.rewrite(|| p_file_bits(&self.lock(), primary), false);
            }
        }
        r
    }

    /// Copy in batches of whole units (at most [`SYNC_BATCH_BLOCKS`] under one range
    /// lock): the marked units of a batch go in one read and one write per run of
    /// consecutive units, so a resync costs I/Os per run, not per unit. Only units whose
    /// difference bit is set are copied ([0031]).
    fn sync(&self, primary: u8, todo: &Bitmap) -> Result<(), Refusal> {
        let batch = (SYNC_BATCH_BLOCKS / self.n).max(1);
        let mut buf = Vec::new();
        for (run, len) in todo.runs() {
            let mut u0 = run;
            while u0 < run + len {
                let k = batch.min(run + len - u0);
                let (root, secondary, cap) = {
                    let st = self.lock();
                    let Some(i) = st.pair_of_primary(primary) else {
                        return Ok(()); // deleted meanwhile
                    };
                    let cap = self.plain.get(&primary).copied().unwrap_or(0);
                    (st.root(primary), st.pairs[i].secondary, cap)
                };
                let first = u0 * self.n;
                if first >= cap {
                    break;
                }
                let _locked = self.store.locks.lock(root, first, k * self.n);
                let dirty = {
                    let st = self.lock();
                    st.pair_of_primary(primary)
                        .map(|i| st.pairs[i].diff.runs_in(u0, k))
                        .unwrap_or_default()
                };
                let mut copied = 0u64;
                for (d, dn) in dirty {
                    let lba = d * self.n;
                    let blocks = (dn * self.n).min(cap - lba);
                    buf.resize((blocks * u64::from(BLOCK_SIZE)) as usize, 0);
                    self.store
                        .read(primary, lba, &mut buf)
                        .map_err(|s| io_err(s, "reading the user volume"))?;
                    self.mark_split(secondary, lba, blocks)?;
                    self.store
                        .write(secondary, lba, &buf)
                        .map_err(|s| io_err(s, "writing the secondary volume"))?;
                    self.propagate(secondary, lba, &buf)?;
                    copied += buf.len() as u64;
                }
                self.counters
                    .pair_copy_bytes
                    .fetch_add(copied, Ordering::Relaxed);
                let mut st = self.lock();
                if let Some(i) = st.pair_of_primary(primary) {
                    let p = &mut st.pairs[i];
                    for u in u0..u0 + k {
                        p.diff.put(u, false);
                        p.split.put(u, false);
                    }
                    p.copied_bytes += copied;
                }
                u0 += k;
            }
        }
        Ok(())
    }

    fn pair_create(self: &Arc<Self>, primary: u8, secondary: u8) -> Result<(), Refusal> {
        let mut st = self.lock();
        let cap = |l: u8| {
            self.plain.get(&l).copied().ok_or_else(|| {
                param_err(format!("LU {l} is not a plain LU of this array (an LU in a mirroring row cannot be paired)"))
            })
        };
        let (pc, sc) = (cap(primary)?, cap(secondary)?);
        if primary == secondary {
            return Err(param_err("a volume cannot be paired with itself"));
        }
        if pc != sc {
            return Err(param_err(format!(
                "LU {primary} has {pc} blocks and LU {secondary} {sc}; a pair needs equal sizes"
            )));
        }
        for l in [primary, secondary] {
            if st.work.contains(&l) {
                return Err(state_err(format!("LU {l} is a working volume")));
            }
        }
        if st.pair_of_primary(primary).is_some() {
            return Err(state_err(format!(
                "LU {primary} is already the user volume of a pair"
            )));
        }
        if st.pair_of_secondary(secondary).is_some() || st.pair_of_primary(secondary).is_some() {
            return Err(state_err(format!("LU {secondary} is already in a pair")));
        }
        if st.root(primary) == secondary {
            return Err(state_err("the pair would close a loop"));
        }
        if st.copying(secondary) {
            return Err(state_err(format!("LU {secondary} is under copying")));
        }
        let units = pc.div_ceil(self.n);
        let all = Bitmap::full(units);
        let path = diff_path(&self.dir, primary);
        let file = DiffFile::create(&path, &all)
            .map_err(|e| refuse(Sense::INTERNAL_FAILURE, format!("{}: {e}", path.display())))?;
        st.pairs.push(Pair {
            primary,
            secondary,
            state: PairState::Forming,
            split: Bitmap::new(units),
            diff: all.clone(),
            diff_file: Arc::new(file),
            copied_bytes: 0,
        });
        if let Err(e) = self.save_pairs(&st) {
            st.pairs.pop();
            return Err(e);
        }
        drop(st);
        self.spawn_sync(primary, all);
        Ok(())
    }

    /// The pair `lun` is the user volume of, or else the secondary of.
    fn find_pair(st: &State, lun: u8) -> Result<usize, Refusal> {
        st.pair_of_primary(lun)
            .or_else(|| st.pair_of_secondary(lun))
            .ok_or_else(|| state_err(format!("LU {lun} is not paired")))
    }

    fn units_of(&self, areas: &[Area], blocks: u64) -> Result<Bitmap, Refusal> {
        let units = blocks.div_ceil(self.n);
        let mut m = Bitmap::new(units);
        if areas.is_empty() {
            (0..units).for_each(|u| m.put(u, true));
        }
        for a in areas {
            if a.blocks == 0 || a.end() > blocks {
                return Err(param_err(format!(
                    "area {a} is empty or past the end of the volume ({blocks} blocks)"
                )));
            }
            (a.start / self.n..a.end().div_ceil(self.n)).for_each(|u| m.put(u, true));
        }
        Ok(m)
    }

    /// Fig. 6 step 60-61: set the pair split bits of the areas (all, when none).
    fn pair_split(&self, lun: u8, areas: &[Area]) -> Result<Vec<Area>, Refusal> {
        let (root, i, blocks) = {
            let st = self.lock();
            let i = Self::find_pair(&st, lun)?;
            let p = &st.pairs[i];
            if matches!(p.state, PairState::Forming | PairState::Resyncing) {
                return Err(state_err(format!(
                    "the pair of LU {} and LU {} is {}; wait for it to finish",
                    p.primary, p.secondary, p.state
                )));
            }
            (st.root(p.primary), i, self.plain[&p.primary])
        };
        let m = self.units_of(areas, blocks)?;
        // Every write in flight on the chain ends first: the split is one instant.
        let _all = self.store.locks.lock(root, 0, u64::MAX / 2);
        let mut st = self.lock();
        let p = st
            .pairs
            .get_mut(i)
            .ok_or_else(|| state_err("the pair was deleted"))?;
        for u in m.ones() {
            p.split.put(u, true);
        }
        p.state = PairState::Split;
        let split = units_to_areas(&m, self.n, blocks);
        self.save_pairs(&st)?;
        Ok(split)
    }

    /// Fig. 7: resync the split units inside the areas (all split units, when none).
    fn pair_resync(self: &Arc<Self>, lun: u8, areas: &[Area]) -> Result<(), Refusal> {
        let mut st = self.lock();
        let i = Self::find_pair(&st, lun)?;
        let blocks = self.plain[&st.pairs[i].primary];
        let m = self.units_of(areas, blocks)?;
        let p = &st.pairs[i];
        if matches!(p.state, PairState::Forming | PairState::Resyncing) {
            return Err(state_err(format!(
                "the pair is {}; wait for it to finish",
                p.state
            )));
        }
        if st.copying(p.secondary) {
            return Err(state_err(format!(
                "LU {} is under copying to a backup device; resync after the copy ends",
                p.secondary
            )));
        }
        let mut todo = Bitmap::new(m.units);
        m.ones()
            .filter(|u| p.split.get(*u))
            .for_each(|u| todo.put(u, true));
        let primary = p.primary;
        st.pairs[i].state = PairState::Resyncing;
        drop(st);
        self.spawn_sync(primary, todo);
        Ok(())
    }

    fn pair_delete(&self, lun: u8) -> Result<(), Refusal> {
        let mut st = self.lock();
        let i = Self::find_pair(&st, lun)?;
        let p = &st.pairs[i];
        if matches!(p.state, PairState::Forming | PairState::Resyncing) || st.copying(p.secondary) {
            return Err(state_err(format!(
                "the pair of LU {} and LU {} is busy; wait for it",
                p.primary, p.secondary
            )));
        }
        let removed = st.pairs.remove(i);
        if let Err(e) = self.save_pairs(&st) {
            st.pairs.insert(i, removed);
            return Err(e);
        }
        let _ = std::fs::remove_file(removed.diff_file.path());
        Ok(())
    }

    fn pair_status(&self, lun: u8) -> Result<PairStatus, Refusal> {
        let st = self.lock();
        let p = &st.pairs[Self::find_pair(&st, lun)?];
        let blocks = self.plain[&p.primary];
        Ok(PairStatus {
            primary: u32::from(p.primary),
            secondary: u32::from(p.secondary),
            state: p.state,
            blocks_per_bit: self.n as u32,
            units: p.split.units,
            split_units: p.split.count(),
            diff_units: p.diff.count(),
            split_areas: units_to_areas(&p.split, self.n, blocks),
            copied_bytes: p.copied_bytes,
        })
    }

    /// INQUIRY VPD page C1h (step 43).
    pub(crate) fn pair_page(&self, lun: u8) -> Vec<u8> {
        crate::scsi::encode_pair_page(lun, self.pair_status(lun).ok().as_ref())
    }
}

impl Firmware {
    // ---- copies to a backup device ----

    fn check_ranges(&self, lun: u8, ranges: &[Area]) -> Result<u64, Refusal> {
        let blocks = *self
            .plain
            .get(&lun)
            .ok_or_else(|| param_err(format!("LU {lun} is not a plain LU of this array")))?;
        if ranges.is_empty() {
            return Err(param_err("the copy request lists no blocks"));
        }
        let mut sorted: Vec<&Area> = ranges.iter().collect();
        sorted.sort_by_key(|a| a.start);
        for w in sorted.windows(2) {
            if w[0].end() > w[1].start {
                return Err(param_err(format!("ranges {} and {} overlap", w[0], w[1])));
            }
        }
        let mut total = 0;
        for a in ranges {
            if a.blocks == 0 || a.end() > blocks {
                return Err(param_err(format!(
                    "range {a} is empty or past the end of LU {lun} ({blocks} blocks)"
                )));
            }
            total += a.blocks;
        }
        Ok(total)
    }

    fn device(&self, st: &State, name: &str) -> Result<PathBuf, Refusal> {
        let path = self.devices.get(name).ok_or_else(|| {
            let known: Vec<&String> = self.devices.keys().collect();
            refuse(
                Sense::BACKUP_RESOURCE,
                format!("no backup device {name:?} (this array has {known:?})"),
            )
        })?;
        if st.busy_devices.contains(name) {
            return Err(refuse(
                Sense::BACKUP_RESOURCE,
                format!("backup device {name:?} is busy with another copy"),
            ));
        }
        Ok(path.clone())
    }

    fn new_job(&self, st: &mut State, kind: &str, lu: u8, device: &str, total: u64) -> u32 {
        let id = st.next_job;
        st.next_job = st.next_job.wrapping_add(1).max(1);
        st.busy_devices.insert(device.to_string());
        st.jobs.insert(
            id,
            Job {
                status: JobStatus {
                    id,
                    kind: kind.to_string(),
                    lu: u32::from(lu),
                    device: device.to_string(),
                    state: JobState::Running,
                    message: None,
                    total_blocks: total,
                    done_blocks: 0,
                    working_volume: None,
                    saved_blocks: 0,
                    elapsed_us: 0,
                },
                started: Instant::now(),
                ended: None,
            },
        );
        id
    }

    /// [0029]-[0030] (and [0037]-[0040] with `auto`).
    fn ccopy(
        self: &Arc<Self>,
        lun: u8,
        device: &str,
        ranges: Vec<Area>,
        auto: bool,
    ) -> Result<u32, Refusal> {
        let total = self.check_ranges(lun, &ranges)?;
        let (source, primary, job, path) = if auto {
            // Step 91: the user volume must have a secondary; step 94 otherwise.
            let (primary, secondary) = {
                let st = self.lock();
                self.device(&st, device)?;
                let i = st.pair_of_primary(lun).ok_or_else(|| {
                    state_err(format!("LU {lun} is not paired: AUTO mode needs a user volume with a secondary (step 94)"))
                })?;
                let p = &st.pairs[i];
                if p.state != PairState::Duplex {
                    return Err(state_err(format!(
                        "the pair of LU {lun} is {}; AUTO mode needs it duplex",
                        p.state
                    )));
                }
                (p.primary, p.secondary)
            };
            // Step 93: split the areas to back up ([0052]), then answer.
            self.pair_split(lun, &ranges)?;
            let mut st = self.lock();
            let path = self.device(&st, device)?;
            st.hold(secondary);
            let job = self.new_job(&mut st, "auto", lun, device, total);
            (secondary, Some(primary), job, path)
        } else {
            let mut st = self.lock();
            let path = self.device(&st, device)?;
            // [0030]: the volume must be a split secondary, and the ranges split.
            let i = st.pair_of_secondary(lun).ok_or_else(|| {
                state_err(format!(
                    "LU {lun} is not a secondary volume; CCOPY copies a split secondary ([0030])"
                ))
            })?;
            let p = &st.pairs[i];
            if p.state != PairState::Split {
                return Err(state_err(format!(
                    "the pair of LU {} and LU {lun} is {}, not split; split it first ([0030])",
                    p.primary, p.state
                )));
            }
            for a in &ranges {
                if (a.start / self.n..a.end().div_ceil(self.n)).any(|u| !p.split.get(u)) {
                    return Err(state_err(format!(
                        "range {a} of LU {lun} is not inside the split areas; its data is not frozen"
                    )));
                }
            }
            st.hold(lun);
            let job = self.new_job(&mut st, "ccopy", lun, device, total);
            (lun, None, job, path)
        };
        let fw = Arc::clone(self);
        let dev = device.to_string();
        std::thread::spawn(move || {
            let mut r = fw.copy_to_device(job, source, &ranges, &path, None);
            {
                let mut st = fw.lock();
                st.release(source);
                st.busy_devices.remove(&dev);
            }
            if let (Ok(()), Some(primary)) = (&r, primary) {
                // Step 95: resync the areas this job split.
                let blocks = fw.plain[&primary];
                r = fw.units_of(&ranges, blocks).and_then(|m| {
                    {
                        let mut st = fw.lock();
                        if let Some(i) = st.pair_of_primary(primary) {
                            st.pairs[i].state = PairState::Resyncing;
                        }
                    }
                    fw.sync_and_settle(primary, &m)
                });
            }
            let mut st = fw.lock();
            finish_job(&mut st, job, r.err());
            fw.ended.notify_all();
        });
        Ok(job)
    }

    /// CCOPY of a volume frozen by another function (the secondary of a remote pair,
    /// see [`crate::remote`]); the caller checked that it is split ([0030]).
    pub(crate) fn ccopy_frozen(
        self: &Arc<Self>,
        lun: u8,
        device: &str,
        ranges: Vec<Area>,
    ) -> Result<u32, Refusal> {
        let total = self.check_ranges(lun, &ranges)?;
        let (job, path) = {
            let mut st = self.lock();
            let path = self.device(&st, device)?;
            st.hold(lun);
            (self.new_job(&mut st, "ccopy", lun, device, total), path)
        };
        let fw = Arc::clone(self);
        let dev = device.to_string();
        std::thread::spawn(move || {
            let r = fw.copy_to_device(job, lun, &ranges, &path, None);
            let mut st = fw.lock();
            st.release(lun);
            st.busy_devices.remove(&dev);
            finish_job(&mut st, job, r.err());
            fw.ended.notify_all();
        });
        Ok(job)
    }

    /// Whether a copy job reads `lun` now.
    pub(crate) fn is_copying(&self, lun: u8) -> bool {
        self.lock().copying(lun)
    }

    /// Whether `lun` is in a pair of this array: as user volume (`Some(true)`) or
    /// secondary (`Some(false)`).
    pub(crate) fn paired(&self, lun: u8) -> Option<bool> {
        let st = self.lock();
        if st.pair_of_primary(lun).is_some() {
            Some(true)
        } else {
            st.pair_of_secondary(lun).map(|_| false)
        }
    }

    /// Whether `lun` has the "work" attribute.
    pub(crate) fn is_work(&self, lun: u8) -> bool {
        self.lock().work.contains(&lun)
    }

    /// The copy process: the ranges in the request's order, a step at a time, to the
    /// medium. With `cow`, each block comes from the user volume or the working volume
    /// by its copy state (Fig. 13 steps 603-606), under the range lock.
    fn copy_to_device(
        &self,
        job: u32,
        lun: u8,
        ranges: &[Area],
        path: &Path,
        cow: Option<u8>,
    ) -> Result<(), Refusal> {
        let tape_err = |e: crate::tape::TapeError| refuse(Sense::INTERNAL_FAILURE, e.to_string());
        let mut tape = TapeWriter::create(path, lun).map_err(tape_err)?;
        let bs = BLOCK_SIZE as usize;
        let mut buf = Vec::new();
        for a in ranges {
            let mut at = a.start;
            while at < a.end() {
                let n = STEP_BLOCKS.min(a.end() - at);
                buf.resize(n as usize * bs, 0);
                match cow {
                    None => self
                        .store
                        .read(lun, at, &mut buf)
                        .map_err(|s| io_err(s, "reading the volume to copy"))?,
                    Some(root) => {
                        let (first, span) = self.unit_span(at, n);
                        let _locked = self.store.locks.lock(root, first, span);
                        let from: Vec<(u64, Option<(u8, u64)>)> = {
                            let st = self.lock();
                            let c = st
                                .infos
                                .iter()
                                .find(|c| c.job == job)
                                .ok_or_else(|| state_err("the copy request vanished"))?;
                            (at..at + n)
                                .map(|b| match c.states[b as usize] {
                                    CopyState::Saved => (b, c.work.zip(c.slots.get(&b).copied())),
                                    _ => (b, None),
                                })
                                .collect()
                        };
                        if from.iter().all(|(_, w)| w.is_none()) {
                            self.store
                                .read(lun, at, &mut buf)
                                .map_err(|s| io_err(s, "reading the user volume"))?;
                        } else {
                            for (i, (b, w)) in from.iter().enumerate() {
                                let blk = &mut buf[i * bs..(i + 1) * bs];
                                let r = match w {
                                    Some((work, slot)) => self.store.read(*work, *slot, blk),
                                    None => self.store.read(lun, *b, blk),
                                };
                                r.map_err(|s| io_err(s, "reading a block to copy"))?;
                            }
                        }
                        let mut st = self.lock();
                        if let Some(c) = st.infos.iter_mut().find(|c| c.job == job) {
                            for b in at..at + n {
                                c.states[b as usize] = CopyState::Copied;
                            }
                        }
                    }
                }
                tape.record(at, &buf).map_err(tape_err)?;
                self.counters
                    .device_bytes
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                if let Some(j) = self.lock().jobs.get_mut(&job) {
                    j.status.done_blocks += n;
                }
                at += n;
            }
        }
        tape.finish().map_err(tape_err)?;
        Ok(())
    }

    /// [0062]-[0122]: a copy request on user volume `lun` with a working volume from
    /// the pool (or, with `wait_for_copy`, the prior art's waiting copy).
    fn cow(
        self: &Arc<Self>,
        lun: u8,
        device: &str,
        ranges: Vec<Area>,
        same_block: bool,
        wait_for_copy: bool,
    ) -> Result<u32, Refusal> {
        let total = self.check_ranges(lun, &ranges)?;
        let blocks = self.plain[&lun];
        let root = {
            let st = self.lock();
            if st.work.contains(&lun) {
                return Err(state_err(format!(
                    "LU {lun} is a working volume, not a user volume"
                )));
            }
            if st.pair_of_secondary(lun).is_some() {
                return Err(state_err(format!(
                    "LU {lun} is a secondary volume; a copy request names a user volume"
                )));
            }
            st.root(lun)
        };
        // The request's instant: no write is half-way on the volume while it is set up.
        let _all = self.store.locks.lock(root, 0, u64::MAX / 2);
        let mut st = self.lock();
        let path = self.device(&st, device)?;
        let work = if wait_for_copy {
            None
        } else {
            // Step 1200: a free working volume big enough ([0122]: compact saving needs
            // only as many blocks as the request names).
            let need = if same_block {
                ranges.iter().map(Area::end).max().unwrap_or(0)
            } else {
                total
            };
            let w = st
                .work
                .iter()
                .copied()
                .find(|w| !st.copying(*w) && self.plain.get(w).is_some_and(|c| *c >= need))
                .ok_or_else(|| {
                    refuse(
                        Sense::BACKUP_RESOURCE,
                        format!(
                            "no free working volume of {need} blocks or more (set one with `volume attribute LU work`)"
                        ),
                    )
                })?;
            Some(w)
        };
        let job = self.new_job(&mut st, "cow", lun, device, total);
        let mut states = vec![CopyState::Unnecessary; blocks as usize];
        for a in &ranges {
            for b in a.start..a.end() {
                states[b as usize] = CopyState::Unsaved;
            }
        }
        st.infos.push(CopyInfo {
            job,
            source: lun,
            work,
            states,
            slots: HashMap::new(),
            next_slot: 0,
            same_block,
        });
        st.hold(lun);
        if let Some(w) = work {
            st.hold(w);
            if let Some(j) = st.jobs.get_mut(&job) {
                j.status.working_volume = Some(u32::from(w));
            }
        }
        drop(st);
        let fw = Arc::clone(self);
        let dev = device.to_string();
        std::thread::spawn(move || {
            let r = fw.copy_to_device(job, lun, &ranges, &path, Some(root));
            let mut st = fw.lock();
            // Steps 609, 1203: the information and the working volume are free again.
            st.infos.retain(|c| c.job != job);
            st.release(lun);
            if let Some(w) = work {
                st.release(w);
            }
            st.busy_devices.remove(&dev);
            finish_job(&mut st, job, r.err());
            fw.ended.notify_all();
        });
        Ok(job)
    }

    /// Fig. 16.
    fn attribute(&self, lun: u8, work: bool) -> Result<(), Refusal> {
        let mut st = self.lock();
        if !self.plain.contains_key(&lun) {
            return Err(param_err(format!(
                "LU {lun} is not a plain LU of this array"
            )));
        }
        if st.copying(lun) {
            return Err(state_err(format!(
                "LU {lun} is under copying; its attribute cannot change now (step 1002)"
            )));
        }
        if work && (st.pair_of_primary(lun).is_some() || st.pair_of_secondary(lun).is_some()) {
            return Err(state_err(format!(
                "LU {lun} is in a pair; it cannot be a working volume"
            )));
        }
        let changed = if work {
            st.work.insert(lun)
        } else {
            st.work.remove(&lun)
        };
        if changed {
            if let Err(e) = self.save_attributes(&st) {
                if work {
                    st.work.remove(&lun);
                } else {
                    st.work.insert(lun);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn job(&self, id: u32) -> Result<JobStatus, Refusal> {
        let st = self.lock();
        let j = st.jobs.get(&id).ok_or_else(|| {
            param_err(format!(
                "no job {id} (the array keeps the last {KEPT_JOBS})"
            ))
        })?;
        let mut s = j.status.clone();
        s.elapsed_us = j
            .ended
            .unwrap_or_else(Instant::now)
            .duration_since(j.started)
            .as_micros() as u64;
        Ok(s)
    }

    /// Run one operation. `counters` are the engine's host-side counts.
    pub(crate) fn execute(
        self: &Arc<Self>,
        op: BackupOp,
        host: (u64, u64),
    ) -> Result<BackupReply, Refusal> {
        let lun = |l: u32| u8::try_from(l).map_err(|_| param_err(format!("LU {l} is beyond 255")));
        Ok(match op {
            BackupOp::PairCreate { primary, secondary } => {
                self.pair_create(lun(primary)?, lun(secondary)?)?;
                BackupReply::Done
            }
            BackupOp::PairSplit { lu, areas } => {
                self.pair_split(lun(lu)?, &areas)?;
                BackupReply::Done
            }
            BackupOp::PairResync { lu, areas } => {
                self.pair_resync(lun(lu)?, &areas)?;
                BackupReply::Done
            }
            BackupOp::PairDelete { lu } => {
                self.pair_delete(lun(lu)?)?;
                BackupReply::Done
            }
            BackupOp::PairStatus { lu } => BackupReply::Pair(self.pair_status(lun(lu)?)?),
            BackupOp::Ccopy {
                lu,
                device,
                ranges,
                auto,
            } => BackupReply::Started {
                job: self.ccopy(lun(lu)?, &device, ranges, auto)?,
            },
            BackupOp::Cow {
                lu,
                device,
                ranges,
                same_block,
                wait_for_copy,
            } => BackupReply::Started {
                job: self.cow(lun(lu)?, &device, ranges, same_block, wait_for_copy)?,
            },
            BackupOp::Job { id } => BackupReply::Job(self.job(id)?),
            BackupOp::Attribute { lu, work } => {
                self.attribute(lun(lu)?, work)?;
                BackupReply::Done
            }
            BackupOp::Counters => BackupReply::Counters(ArrayCounters {
                host_read_bytes: host.0,
                host_write_bytes: host.1,
                device_bytes: self.counters.device_bytes.load(Ordering::Relaxed),
                saved_bytes: self.counters.saved_bytes.load(Ordering::Relaxed),
                pair_copy_bytes: self.counters.pair_copy_bytes.load(Ordering::Relaxed),
            }),
            BackupOp::Devices => {
                let st = self.lock();
                BackupReply::Devices {
                    devices: self
                        .devices
                        .iter()
                        .map(|(name, path)| DeviceStatus {
                            name: name.clone(),
                            path: path.display().to_string(),
                            busy: st.busy_devices.contains(name),
                        })
                        .collect(),
                }
            }
        })
    }

    /// The Fig. 5 command: split (`split`) or resync the areas.
    pub(crate) fn fig5(
        self: &Arc<Self>,
        lun: u8,
        split: bool,
        areas: &[Area],
    ) -> Result<(), Refusal> {
        if split {
            self.pair_split(lun, areas).map(drop)
        } else {
            self.pair_resync(lun, areas)
        }
    }
}

/// Set units as block areas (the last clipped to the volume).
fn units_to_areas(m: &Bitmap, n: u64, blocks: u64) -> Vec<Area> {
    m.runs()
        .into_iter()
        .map(|(f, c)| Area {
            start: f * n,
            blocks: ((f + c) * n).min(blocks) - f * n,
        })
        .collect()
}

fn finish_job(st: &mut State, id: u32, err: Option<Refusal>) {
    if let Some(j) = st.jobs.get_mut(&id) {
        j.ended = Some(Instant::now());
        match err {
            None => j.status.state = JobState::Done,
            Some(e) => {
                j.status.state = JobState::Failed;
                j.status.message = Some(e.message);
            }
        }
    }
    while st.jobs.len() > KEPT_JOBS {
        let Some(&oldest) = st.jobs.keys().next() else {
            break;
        };
        if st.jobs[&oldest].ended.is_none() {
            break;
        }
        st.jobs.remove(&oldest);
    }
}

fn working(lun: u8) -> Refusal {
    refuse(
        Sense::WORKING_VOLUME,
        format!("LU {lun} is a working volume; hosts cannot access it ([0123])"),
    )
}

pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<(), Refusal> {
    let tmp = path.with_extension("tmp");
    let r = (|| {
        let mut f = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true),
            0o600,
        )
        .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    r.map_err(|e| refuse(Sense::INTERNAL_FAILURE, format!("{}: {e}", path.display())))
}

/// The file of the difference bitmap of the pair of user volume `primary`.
fn diff_path(dir: &Path, primary: u8) -> PathBuf {
    dir.join(format!("diff-{primary}.bits"))
}

/// At a start, the difference bitmap of a pair with split bitmap `split`, the units to
/// copy again, and its file. A clean file's bits are exact; after a death of the array
/// (a dirty file, or none from an older version) the units not split count as
/// different too, since a write to both volumes may have been cut between them; the
/// split units' bits were on disk before their writes.
fn restored_diff(dir: &Path, p: u8, split: &Bitmap) -> Result<(Bitmap, Bitmap, DiffFile), String> {
    let path = diff_path(dir, p);
    let units = split.units;
    let (mut diff, clean) = match DiffFile::open(&path, units)? {
        Some(f) => (f.bits, f.clean),
        None => (Bitmap::full(units), false),
    };
    let mut todo = Bitmap::new(units);
    for u in (0..units).filter(|u| !split.get(*u)) {
        if !clean {
            diff.put(u, true);
        }
        if diff.get(u) {
            todo.put(u, true);
        }
    }
    let file = DiffFile::create(&path, &diff).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((diff, todo, file))
}

/// The difference bitmap file of the pair of user volume `primary`.
fn p_file(st: &State, primary: u8) -> Option<Arc<DiffFile>> {
    st.pair_of_primary(primary)
        .map(|i| st.pairs[i].diff_file.clone())
}

/// A copy of the difference bitmap of the pair of user volume `primary`.
fn p_file_bits(st: &State, primary: u8) -> Option<Bitmap> {
    st.pair_of_primary(primary)
        .map(|i| st.pairs[i].diff.clone())
}

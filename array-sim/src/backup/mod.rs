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
//!
//! Parts: `pairs` (formation, split, resync, delete, status), `host` (the host's reads
//! and writes through the pairs), `copy` (CCOPY and AUTO to a backup device), `cow` (the
//! working-volume copy-on-write and the work attribute), `jobs` (copy jobs); this module
//! keeps the state they share, opening it from the array's directory, and the dispatch of
//! one operation.

mod copy;
mod cow;
mod host;
mod jobs;
mod pairs;

use std::collections::{BTreeMap, BTreeSet, HashMap};
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
}

impl Firmware {}

impl Firmware {
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

fn working(lun: u8) -> Refusal {
    refuse(
        Sense::WORKING_VOLUME,
        format!("LU {lun} is a working volume; hosts cannot access it ([0123])"),
    )
}

/// [`crate::store::replace_file`] with `text`, an error naming the file as a refusal.
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<(), Refusal> {
    crate::store::replace_file(path, text.as_bytes())
        .map_err(|e| refuse(Sense::INTERNAL_FAILURE, format!("{}: {e}", path.display())))
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

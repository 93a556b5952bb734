//! The snapshot manager: the host's "snapshot management program" (EP 1 148 416 [0021]).
//!
//! It owns the LU mode table, one update-location table per pair of virtual LUs, the E4
//! save areas, and turns client I/O on virtual LUs into block I/O on real LUs through a
//! [`Backend`]. State changes follow the patent:
//!
//! | strategy | acquire | delete | resync done |
//! |---|---|---|---|
//! | E1 Mode Select | table → Snapshot, then Mode Select Snapshot [0028] | Mode Select Re-synchronizing, then table [0031]-[0032] | Mode Select Synchronized, then table [0032] |
//! | E2 routing | origin VLU → origin LU, snapshot VLU → mate LU [0060] | snapshot VLU Undefined; origin writes → mirroring LU [0061] | origin reads → mirroring LU [0061] |
//! | E4 copy-on-write | snapshot VLU reads the mate, writes refused | save area released; no copy needed (the array never stopped mirroring) | — |
//!
//! Concurrency: each pair has a gate (`RwLock`): I/O and resync steps hold it shared, a
//! mode change holds it exclusively, so a mode change waits for in-flight I/O and the
//! snapshot instant is exact: every write acknowledged before `acquire` returns is in the
//! snapshot and none after. Writes and the resync's write-back hold a range lock on their
//! blocks (see [`crate::range_lock`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::backend::{errno, Backend, BackendDescription, BackendError, Capabilities};
use crate::change_tracking::{BackupId, ChangedBlocks, Cut, TrackingSummary};
use crate::journal::{JournalError, JournalRecord, JournalState, StateLog};
use crate::lba::{Extent, SECTOR_SIZE};
use crate::mode::{self, Mode, PageError};
use crate::range_lock::RangeLock;
use crate::router::{self, Bookkeeping, Op, Role, RouteError, Strategy, StrategyError};
use crate::save_area::{SaveArea, Source};
use crate::tables::{
    DefinitionError, LuId, LuModeEntry, LuModeTable, MirrorDefinition, MirroringDefinitionTable,
    VirtualLuId,
};
use crate::update_location::{TableBudget, UpdateLocationTable};

/// One pair of virtual LUs: the original data and its snapshot(s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairConfig {
    /// The virtual LU of the original data; also the pair's name in the journal.
    pub origin: VirtualLuId,
    /// The snapshot virtual LU(s): one per mate LU (a Mode Select array with a triple
    /// mirror has two), exactly one otherwise.
    pub snapshots: Vec<VirtualLuId>,
    pub definition: MirrorDefinition,
    /// E4 only: the LU that receives pre-update data.
    pub save_area: Option<LuId>,
}

/// Errors of the snapshot manager.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    #[error("{0} is not served by this host")]
    UnknownVirtualLu(VirtualLuId),
    #[error(
        "{0} is a snapshot; snapshots are acquired and deleted through their origin virtual LU"
    )]
    NotAnOrigin(VirtualLuId),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("{vlu}: {len} bytes at offset {offset} go past the end ({capacity} bytes)")]
    OutOfRange {
        vlu: VirtualLuId,
        offset: u64,
        len: u64,
        capacity: u64,
    },
    /// [0027]: a snapshot is acquired only from Synchronized.
    #[error("cannot acquire a snapshot of {vlu}: it is {found}, expected Synchronized")]
    NotSynchronized { vlu: VirtualLuId, found: Mode },
    /// [0031]: a snapshot is deleted only from Snapshot.
    #[error("cannot delete the snapshot of {vlu}: it is {found}, expected Snapshot")]
    NotSnapshot { vlu: VirtualLuId, found: Mode },
    #[error("cannot resynchronize {vlu}: it is {found}, expected Re-synchronizing")]
    NotResynchronizing { vlu: VirtualLuId, found: Mode },
    /// Something of the host's (a move to another backend) needs the pair to stay
    /// Synchronized for now.
    #[error("cannot acquire a snapshot of {vlu}: {reason}")]
    Held { vlu: VirtualLuId, reason: String },
    #[error("the snapshot of {0} was invalidated: its save area filled up")]
    SnapshotInvalidated(VirtualLuId),
    #[error("{op} on {lu} failed")]
    Backend {
        op: &'static str,
        lu: LuId,
        #[source]
        source: BackendError,
    },
    #[error("the array's Mode Sense page for {lu} is malformed")]
    Page {
        lu: LuId,
        #[source]
        source: PageError,
    },
    #[error("journal append failed; the write was not issued")]
    Journal(#[source] JournalError),
    #[error("{cause}; rolling back also failed: {rollback}")]
    Rollback {
        #[source]
        cause: Box<ManagerError>,
        rollback: Box<ManagerError>,
    },
    #[error("describing the array failed")]
    Describe(#[source] BackendError),
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    #[error(transparent)]
    Strategy(#[from] StrategyError),
    #[error("invalid pair configuration for {origin}: {reason}")]
    Config { origin: VirtualLuId, reason: String },
}

impl ManagerError {
    /// The errno a block client should see for a failed I/O.
    pub fn errno(&self) -> i32 {
        match self {
            ManagerError::Route(RouteError::ReadOnly(..)) => errno::EPERM,
            ManagerError::OutOfRange { .. } => errno::EINVAL,
            ManagerError::Backend { source, .. } => source.errno(),
            _ => errno::EIO,
        }
    }
}

type Result<T, E = ManagerError> = std::result::Result<T, E>;

/// What a write puts on the blocks: the client's bytes, or zeroes (whole blocks only).
#[derive(Clone, Copy)]
enum Payload<'a> {
    Data(&'a [u8]),
    Zeroes { unmap: bool },
}

/// The blocks of every LU of `def`, which must all be of one size.
fn pair_capacity(
    desc: &BackendDescription,
    def: &MirrorDefinition,
) -> std::result::Result<u64, String> {
    let mut capacity = None;
    for lu in def.lus() {
        let c = desc
            .capacity(lu)
            .ok_or_else(|| format!("the array has no {lu}"))?;
        if capacity.is_some_and(|prev| prev != c) {
            return Err(format!(
                "{lu} has {c} blocks but the other LUs of \"{def}\" have {}",
                capacity.unwrap_or_default()
            ));
        }
        capacity = Some(c);
    }
    Ok(capacity.unwrap_or_default())
}

/// One snapshot virtual LU per mate LU (one for the other definitions).
fn check_snapshot_count(cfg: &PairConfig) -> std::result::Result<(), String> {
    let want_snaps = match &cfg.definition {
        MirrorDefinition::Managed { mates, .. } => mates.len(),
        _ => 1,
    };
    if cfg.snapshots.len() != want_snaps {
        return Err(format!(
            "{} snapshot virtual LU(s) given, expected {want_snaps} (one per mate LU)",
            cfg.snapshots.len()
        ));
    }
    Ok(())
}

/// The save area of a copy-on-write pair, which needs one; no other strategy uses one.
fn save_area(
    strategy: Strategy,
    lu: Option<LuId>,
    definitions: &MirroringDefinitionTable,
    desc: &BackendDescription,
) -> std::result::Result<Option<Mutex<SaveArea>>, String> {
    match (strategy, lu) {
        (Strategy::CopyOnWrite, Some(lu)) => {
            if definitions.containing(lu).is_some() {
                return Err(format!("save area {lu} is part of a mirroring definition"));
            }
            let c = desc
                .capacity(lu)
                .ok_or_else(|| format!("the array has no save area {lu}"))?;
            Ok(Some(Mutex::new(SaveArea::new(lu, c))))
        }
        (Strategy::CopyOnWrite, None) => {
            Err("the copy-on-write strategy needs a save_area LU".into())
        }
        (_, Some(lu)) => Err(format!(
            "save area {lu} given, but {strategy} does not use one"
        )),
        (_, None) => Ok(None),
    }
}

/// A journal's routing of a pair's virtual LU must be this pair's. Virtual LU ids come
/// from the config's order: a journal written for another config would route this LU to
/// another pair's LUs, so it is refused rather than guessed at (the data on the array is
/// untouched either way).
fn check_journal_route(pair: &Pair, entry: LuModeEntry) -> Result<()> {
    let key = pair.key();
    let expected = pair
        .rows(entry.mode)
        .into_iter()
        .find(|(vlu, _)| *vlu == key)
        .map(|(_, e)| e);
    if entry.mode != Mode::Undefined && expected != Some(entry) {
        return Err(ManagerError::Config {
            origin: key,
            reason: format!(
                "the journal routes it as {entry:?}, but this pair ({}) would route it as \
                     {expected:?}: the virtual LUs changed since the journal was written. Put \
                     the config back, or move the journal aside to start again (pairs that \
                     were not Synchronized then need a full resync)",
                pair.cfg.definition
            ),
        });
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Tables are updated by single calls that cannot panic half-way; a panic elsewhere
    // while holding the lock leaves them consistent.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// Resync counters of one pair (Fig. 7), in LBAs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResyncProgress {
    /// LBAs still recorded in the update-location table.
    pub remaining: u64,
    /// LBAs written back (or copied by the array) since the snapshot was deleted.
    pub copied: u64,
    /// LBAs read but not written back, because a client write made them the same first
    /// (step 1004).
    pub skipped: u64,
    /// The pair is Synchronized again.
    pub done: bool,
}

#[derive(Default)]
struct ResyncState {
    cursor: u64,
    copied: u64,
    skipped: u64,
}

struct Pair {
    cfg: PairConfig,
    strategy: Strategy,
    capacity_lbas: u64,
    gate: RwLock<()>,
    table: Mutex<UpdateLocationTable>,
    locks: RangeLock,
    save: Option<Mutex<SaveArea>>,
    invalid: AtomicBool,
    resync: Mutex<ResyncState>,
    /// Why acquire is refused for now, when it is.
    hold: Mutex<Option<String>>,
    /// What was written to the origin since its last completed backup (issue 19).
    tracking: Mutex<ChangedBlocks>,
}

impl Pair {
    fn new(
        cfg: PairConfig,
        strategy: Strategy,
        capacity_lbas: u64,
        save: Option<Mutex<SaveArea>>,
        per_tib: u64,
    ) -> Pair {
        Pair {
            cfg,
            strategy,
            capacity_lbas,
            gate: RwLock::new(()),
            // Issue 20: a budget of 32 MiB per TiB, past which the table coarsens; a
            // pair with a host save area keeps it exact, since there the table is the
            // set of LBAs whose pre-update data was saved.
            table: Mutex::new(if save.is_some() {
                UpdateLocationTable::new()
            } else {
                let budget = TableBudget::for_lu_at(capacity_lbas, per_tib);
                UpdateLocationTable::with_budget(budget)
            }),
            locks: RangeLock::new(),
            save,
            invalid: AtomicBool::new(false),
            resync: Mutex::new(ResyncState::default()),
            hold: Mutex::new(None),
            tracking: Mutex::new(ChangedBlocks::with_budget(TableBudget::for_lu_at(
                capacity_lbas,
                per_tib,
            ))),
        }
    }

    fn key(&self) -> VirtualLuId {
        self.cfg.origin
    }

    /// The LU mode table rows for the pair in `mode` (Fig. 10 for E2).
    fn rows(&self, mode: Mode) -> Vec<(VirtualLuId, LuModeEntry)> {
        let mut rows = Vec::with_capacity(1 + self.cfg.snapshots.len());
        let origin = self.cfg.origin;
        let snaps = &self.cfg.snapshots;
        match (&self.cfg.definition, mode) {
            (MirrorDefinition::Managed { lu, mates }, _) => {
                rows.push((origin, LuModeEntry::both(*lu, mode)));
                for (vlu, mate) in snaps.iter().zip(mates) {
                    let e = if mode == Mode::Snapshot {
                        LuModeEntry::both(*mate, Mode::Snapshot)
                    } else {
                        LuModeEntry::UNDEFINED
                    };
                    rows.push((*vlu, e));
                }
            }
            (
                MirrorDefinition::Triple {
                    mirror,
                    origin: o,
                    mate,
                },
                _,
            ) => {
                let (orig, snap) = match mode {
                    // [0060]
                    Mode::Snapshot => (LuModeEntry::both(*o, mode), LuModeEntry::both(*mate, mode)),
                    // [0061]: read the origin, write back through the mirroring LU.
                    Mode::Resynchronizing => (
                        LuModeEntry {
                            read: Some(*o),
                            write: Some(*mirror),
                            mode,
                        },
                        LuModeEntry::UNDEFINED,
                    ),
                    // [0055]
                    _ => (LuModeEntry::both(*mirror, mode), LuModeEntry::UNDEFINED),
                };
                rows.push((origin, orig));
                rows.extend(snaps.first().map(|v| (*v, snap)));
            }
            (MirrorDefinition::Pair { mirror, mate }, _) => {
                rows.push((origin, LuModeEntry::both(*mirror, mode)));
                let snap = if mode == Mode::Snapshot {
                    LuModeEntry {
                        read: Some(*mate),
                        write: None,
                        mode,
                    }
                } else {
                    LuModeEntry::UNDEFINED
                };
                rows.extend(snaps.first().map(|v| (*v, snap)));
            }
        }
        rows
    }

    /// (source, destination) of the array-side copies that resynchronize the pair.
    fn copy_pairs(&self) -> Vec<(LuId, LuId)> {
        match &self.cfg.definition {
            MirrorDefinition::Managed { lu, mates } => mates.iter().map(|m| (*lu, *m)).collect(),
            MirrorDefinition::Triple { origin, mate, .. } => vec![(*origin, *mate)],
            MirrorDefinition::Pair { .. } => Vec::new(),
        }
    }
}

/// The host's snapshot state and I/O path over one backend.
pub struct SnapshotManager<B> {
    backend: B,
    caps: Capabilities,
    definitions: MirroringDefinitionTable,
    pairs: Vec<Pair>,
    vlus: HashMap<VirtualLuId, (usize, Role)>,
    lu_mode: RwLock<LuModeTable>,
    log: Arc<dyn StateLog>,
}

impl<B> std::fmt::Debug for SnapshotManager<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotManager")
            .field("lu_mode", &*read(&self.lu_mode))
            .finish_non_exhaustive()
    }
}

impl<B: Backend> SnapshotManager<B> {
    /// Build the tables for `pairs` on `backend`.
    ///
    /// Without a recovered journal state the modes come from the array: Mode Sense for
    /// the Mode Select array ([0022]); the initial modes of [0055] for the others. An E1
    /// LU that the array reports in Snapshot or Re-synchronizing with no recorded
    /// update-location table is marked dirty over its whole capacity, the full copy of
    /// [0045].
    ///
    /// With a recovered state: for E1 the array's mode wins (it is what the array does
    /// with writes) and the journal supplies the table, emptied if the array says
    /// Synchronized; for E2 and E4 the journal is the only state there is ([0062]).
    pub fn open(
        backend: B,
        pairs: Vec<PairConfig>,
        log: Arc<dyn StateLog>,
        recovered: Option<&JournalState>,
    ) -> Result<Self> {
        Self::open_budgeted(backend, pairs, log, recovered, TableBudget::PER_TIB)
    }

    /// [`Self::open`] with `per_tib` bytes of table memory per TiB of LU (the config's
    /// `tables.budget_mib_per_tib`) for the update-location tables (but an E4 pair's,
    /// which stays exact) and for each set of the changed-block record.
    pub fn open_budgeted(
        backend: B,
        pairs: Vec<PairConfig>,
        log: Arc<dyn StateLog>,
        recovered: Option<&JournalState>,
        per_tib: u64,
    ) -> Result<Self> {
        let desc = backend.describe().map_err(ManagerError::Describe)?;
        let caps = desc.capabilities;
        let mut definitions = MirroringDefinitionTable::new();
        let mut vlus = HashMap::new();
        let mut built = Vec::with_capacity(pairs.len());
        for cfg in pairs {
            let origin = cfg.origin;
            let bad = |reason: String| ManagerError::Config { origin, reason };
            definitions.insert(cfg.definition.clone())?;
            let strategy = Strategy::for_definition(&cfg.definition, &caps)?;
            let capacity_lbas = pair_capacity(&desc, &cfg.definition).map_err(bad)?;
            check_snapshot_count(&cfg).map_err(bad)?;
            let save = save_area(strategy, cfg.save_area, &definitions, &desc).map_err(bad)?;
            let index = built.len();
            for (i, vlu) in std::iter::once(origin)
                .chain(cfg.snapshots.iter().copied())
                .enumerate()
            {
                let role = if i == 0 {
                    Role::Origin
                } else {
                    Role::Snapshot(i - 1)
                };
                if vlus.insert(vlu, (index, role)).is_some() {
                    return Err(bad(format!("{vlu} is used by two pairs")));
                }
            }
            built.push(Pair::new(cfg, strategy, capacity_lbas, save, per_tib));
        }
        let mgr = SnapshotManager {
            backend,
            caps,
            definitions,
            pairs: built,
            vlus,
            lu_mode: RwLock::new(LuModeTable::new()),
            log,
        };
        mgr.restore(recovered)?;
        Ok(mgr)
    }

    /// The tables as a journal state: what a compacted journal must rebuild.
    pub fn state(&self) -> JournalState {
        let mut st = JournalState {
            lu_mode: self.lu_mode_table(),
            ..JournalState::default()
        };
        for pair in &self.pairs {
            let key = pair.key();
            st.tables.insert(key, lock(&pair.table).clone());
            st.tracking.insert(key, lock(&pair.tracking).clone());
            if let Some(save) = &pair.save {
                st.save_maps.insert(key, lock(save).clone());
                st.invalid.insert(key, pair.invalid.load(Ordering::SeqCst));
            }
        }
        st
    }

    /// Each pair's mode, tables and tracking as the array and the journal (`recovered`)
    /// say; then the journal describes the tables from here on, whatever it held before.
    fn restore(&self, recovered: Option<&JournalState>) -> Result<()> {
        for pair in &self.pairs {
            self.restore_pair(pair, recovered)?;
            // Tracking does not depend on the mode: the journal's record, whatever the
            // array says (none: no base, so the next backup is a full one).
            if let Some(t) = recovered.and_then(|s| s.tracking.get(&pair.key())) {
                lock(&pair.tracking).assign(t);
            }
        }
        for rec in self.state().checkpoint() {
            self.append(rec)?;
        }
        Ok(())
    }

    fn restore_pair(&self, pair: &Pair, recovered: Option<&JournalState>) -> Result<()> {
        let key = pair.key();
        let journal_entry = recovered.and_then(|s| s.lu_mode.get(key));
        if let Some(entry) = journal_entry {
            check_journal_route(pair, entry)?;
        }
        let journal_mode = journal_entry.map(|e| e.mode);
        let journal_table = recovered.and_then(|s| s.tables.get(&key));
        let mode = self.mode_at_start(pair, journal_mode)?;
        let mut table = lock(&pair.table);
        if mode != Mode::Synchronized {
            match journal_table {
                Some(t) if matches!(journal_mode, Some(Mode::Snapshot | Mode::Resynchronizing)) => {
                    table.assign(t)
                }
                // [0045]: nothing says what changed, so everything did.
                _ => {
                    if let Some(all) = Extent::from_count(0, pair.capacity_lbas) {
                        table.add(all);
                    }
                }
            }
        }
        if let (Some(save), Some(state)) = (&pair.save, recovered) {
            if mode == Mode::Snapshot {
                let mut save = lock(save);
                if let Some(map) = state.save_maps.get(&key) {
                    for (extent, save_lba) in map.iter() {
                        save.insert(extent, save_lba);
                    }
                }
                let invalid = state.invalid.get(&key).copied().unwrap_or(false);
                pair.invalid.store(invalid, Ordering::SeqCst);
            }
        }
        drop(table);
        let mut lu_mode = write(&self.lu_mode);
        for (vlu, entry) in pair.rows(mode) {
            lu_mode.set(vlu, entry);
        }
        Ok(())
    }

    /// A pair's mode at start: a Mode Select array's answer to Mode Sense; else the
    /// journal's Snapshot or Re-synchronizing, or Synchronized.
    fn mode_at_start(&self, pair: &Pair, journal_mode: Option<Mode>) -> Result<Mode> {
        let key = pair.key();
        let mode = match &pair.cfg.definition {
            MirrorDefinition::Managed { lu, .. } => {
                let page =
                    self.backend
                        .mode_sense(*lu)
                        .map_err(|source| ManagerError::Backend {
                            op: "Mode Sense",
                            lu: *lu,
                            source,
                        })?;
                let mode = mode::decode_mode_sense(&page)
                    .map_err(|source| ManagerError::Page { lu: *lu, source })?;
                if mode == Mode::Undefined {
                    return Err(ManagerError::Config {
                        origin: key,
                        reason: format!("the array reports {lu} as not duplicated (Mode Sense 4)"),
                    });
                }
                mode
            }
            _ => match journal_mode {
                Some(m @ (Mode::Snapshot | Mode::Resynchronizing)) => m,
                _ => Mode::Synchronized,
            },
        };
        Ok(mode)
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    pub fn definitions(&self) -> &MirroringDefinitionTable {
        &self.definitions
    }

    /// A copy of the LU mode table.
    pub fn lu_mode_table(&self) -> LuModeTable {
        read(&self.lu_mode).clone()
    }

    /// The LU mode table row of `vlu`, without copying the table.
    pub fn lu_mode_entry(&self, vlu: VirtualLuId) -> Option<LuModeEntry> {
        read(&self.lu_mode).get(vlu)
    }

    pub fn mode(&self, vlu: VirtualLuId) -> Mode {
        read(&self.lu_mode).mode(vlu)
    }

    /// A copy of the update-location table of the pair `vlu` belongs to.
    pub fn update_location_table(&self, vlu: VirtualLuId) -> Result<UpdateLocationTable> {
        let (pair, _) = self.pair(vlu)?;
        Ok(lock(&pair.table).clone())
    }

    /// LBAs recorded in the update-location table of the pair `vlu` belongs to.
    pub fn recorded_lbas(&self, vlu: VirtualLuId) -> Result<u64> {
        let (pair, _) = self.pair(vlu)?;
        Ok(lock(&pair.table).total())
    }

    /// The recorded parts of `ext` in the update-location table of the pair `vlu` belongs
    /// to (what `hvm:dirty` block status reports), without copying the whole table.
    pub fn recorded(&self, vlu: VirtualLuId, ext: Extent) -> Result<Vec<Extent>> {
        let (pair, _) = self.pair(vlu)?;
        Ok(lock(&pair.table).intersection(ext))
    }

    /// Capacity of a virtual LU in bytes.
    pub fn capacity_bytes(&self, vlu: VirtualLuId) -> Result<u64> {
        Ok(self.pair(vlu)?.0.capacity_lbas * SECTOR_SIZE)
    }

    pub fn strategy(&self, vlu: VirtualLuId) -> Result<Strategy> {
        Ok(self.pair(vlu)?.0.strategy)
    }

    /// The virtual LUs this manager serves, with their pair's origin.
    pub fn virtual_lus(&self) -> Vec<(VirtualLuId, VirtualLuId)> {
        let mut v: Vec<_> = self
            .vlus
            .iter()
            .map(|(vlu, (i, _))| (*vlu, self.pairs[*i].key()))
            .collect();
        v.sort();
        v
    }

    /// Save-area LBAs in use (E4), or `None` for other strategies.
    pub fn save_area_used(&self, vlu: VirtualLuId) -> Result<Option<u64>> {
        let (pair, _) = self.pair(vlu)?;
        Ok(pair.save.as_ref().map(|s| lock(s).used_lbas()))
    }

    fn pair(&self, vlu: VirtualLuId) -> Result<(&Pair, Role)> {
        let (i, role) = self
            .vlus
            .get(&vlu)
            .copied()
            .ok_or(ManagerError::UnknownVirtualLu(vlu))?;
        Ok((&self.pairs[i], role))
    }

    fn origin_pair(&self, vlu: VirtualLuId) -> Result<&Pair> {
        match self.pair(vlu)? {
            (p, Role::Origin) => Ok(p),
            _ => Err(ManagerError::NotAnOrigin(vlu)),
        }
    }

    fn append(&self, rec: JournalRecord) -> Result<()> {
        self.log.append(&rec).map_err(ManagerError::Journal)
    }

    /// Set the pair's rows in the LU mode table, journaled first. Call with the gate held
    /// exclusively.
    fn set_pair_mode(&self, pair: &Pair, mode: Mode) -> Result<()> {
        let rows = pair.rows(mode);
        for (vlu, entry) in &rows {
            self.append(JournalRecord::LuMode {
                vlu: *vlu,
                entry: *entry,
            })?;
        }
        let mut t = write(&self.lu_mode);
        for (vlu, entry) in rows {
            t.set(vlu, entry);
        }
        Ok(())
    }

    fn mode_select(&self, lu: LuId, mode: Mode) -> Result<()> {
        let page =
            mode::encode_mode_select(mode).map_err(|source| ManagerError::Page { lu, source })?;
        self.backend
            .mode_select(lu, &page)
            .map_err(|source| ManagerError::Backend {
                op: "Mode Select",
                lu,
                source,
            })
    }

    fn clear_tables(&self, pair: &Pair) -> Result<()> {
        self.append(JournalRecord::Clear { pair: pair.key() })?;
        lock(&pair.table).clear();
        if let Some(s) = &pair.save {
            lock(s).reset();
        }
        *lock(&pair.resync) = ResyncState::default();
        Ok(())
    }

    /// Acquire a snapshot of the origin virtual LU `vlu` ([0027]-[0029], [0060]).
    /// Waits for in-flight I/O on the pair; the snapshot holds every write acknowledged
    /// before this returns and none after.
    pub fn acquire(&self, vlu: VirtualLuId) -> Result<()> {
        let pair = self.origin_pair(vlu)?;
        let _gate = write(&pair.gate);
        self.acquire_locked(pair, vlu)
    }

    /// [`Self::acquire`] for backup `backup`, cutting the changed-block record of `vlu`
    /// at the same instant (under the same exclusive gate, no write between): what was
    /// written since the last cut becomes `backup`'s pending set (see
    /// [`crate::change_tracking`]). If the acquire fails the cut is aborted again.
    /// Returns the base and the pending set's size; [`Self::pending_extents`] has it.
    pub fn acquire_for_backup(&self, vlu: VirtualLuId, backup: BackupId) -> Result<Cut> {
        let pair = self.origin_pair(vlu)?;
        let _gate = write(&pair.gate);
        self.acquirable(pair, vlu)?;
        self.append(JournalRecord::TrackCut {
            pair: pair.key(),
            backup,
        })?;
        let cut = lock(&pair.tracking).cut(backup);
        if let Err(e) = self.acquire_locked(pair, vlu) {
            // A failed abort leaves the set pending; the next cut merges it.
            let _ = self.track_end(pair, &backup, false);
            return Err(e);
        }
        Ok(cut)
    }

    fn acquirable(&self, pair: &Pair, vlu: VirtualLuId) -> Result<()> {
        if let Some(reason) = lock(&pair.hold).clone() {
            return Err(ManagerError::Held { vlu, reason });
        }
        let found = self.mode(vlu);
        if found != Mode::Synchronized {
            return Err(ManagerError::NotSynchronized { vlu, found });
        }
        Ok(())
    }

    /// Acquire with the pair's gate held exclusively.
    fn acquire_locked(&self, pair: &Pair, vlu: VirtualLuId) -> Result<()> {
        self.acquirable(pair, vlu)?;
        self.clear_tables(pair)?;
        if pair.invalid.swap(false, Ordering::SeqCst) {
            self.append(JournalRecord::SnapshotInvalid {
                pair: pair.key(),
                invalid: false,
            })?;
        }
        // [0028]: the host starts recording before the array stops mirroring.
        self.set_pair_mode(pair, Mode::Snapshot)?;
        if let MirrorDefinition::Managed { lu, .. } = &pair.cfg.definition {
            if let Err(cause) = self.mode_select(*lu, Mode::Snapshot) {
                return Err(match self.set_pair_mode(pair, Mode::Synchronized) {
                    Ok(()) => cause,
                    Err(rb) => ManagerError::Rollback {
                        cause: Box::new(cause),
                        rollback: Box::new(rb),
                    },
                });
            }
        }
        Ok(())
    }

    /// Backup `backup` of origin `vlu` was copied: it becomes the base of the changed-block
    /// record. Idempotent (a backup that is not pending changes nothing). Returns the base.
    pub fn complete_backup(&self, vlu: VirtualLuId, backup: &BackupId) -> Result<Option<BackupId>> {
        let pair = self.origin_pair(vlu)?;
        self.track_end(pair, backup, true)?;
        Ok(lock(&pair.tracking).base())
    }

    /// Backup `backup` of origin `vlu` failed: its pending set is counted as written
    /// again, the base stays. Idempotent. Returns the base.
    pub fn abort_backup(&self, vlu: VirtualLuId, backup: &BackupId) -> Result<Option<BackupId>> {
        let pair = self.origin_pair(vlu)?;
        self.track_end(pair, backup, false)?;
        Ok(lock(&pair.tracking).base())
    }

    /// Complete (or abort) `backup` if it is the pending one: journaled first, so a
    /// failed append changes nothing.
    fn track_end(&self, pair: &Pair, backup: &BackupId, complete: bool) -> Result<()> {
        let is_pending = |p: &Pair| {
            lock(&p.tracking)
                .pending()
                .is_some_and(|p| p.backup == *backup)
        };
        if !is_pending(pair) {
            return Ok(());
        }
        let (key, backup) = (pair.key(), *backup);
        self.append(if complete {
            JournalRecord::TrackComplete { pair: key, backup }
        } else {
            JournalRecord::TrackAbort { pair: key, backup }
        })?;
        let mut t = lock(&pair.tracking);
        if complete {
            t.complete(&backup);
        } else {
            t.abort(&backup);
        }
        Ok(())
    }

    /// The LBA ranges of `backup`'s pending set on origin `vlu` (sorted, disjoint), or
    /// `None` when `backup` is not pending.
    pub fn pending_extents(
        &self,
        vlu: VirtualLuId,
        backup: &BackupId,
    ) -> Result<Option<Vec<Extent>>> {
        let pair = self.origin_pair(vlu)?;
        let t = lock(&pair.tracking);
        Ok(t.pending()
            .filter(|p| p.backup == *backup)
            .map(|p| p.blocks.iter().collect()))
    }

    /// The changed-block record of origin `vlu`, for status.
    pub fn tracking(&self, vlu: VirtualLuId) -> Result<TrackingSummary> {
        Ok(lock(&self.origin_pair(vlu)?.tracking).summary())
    }

    /// Roll the origin virtual LU `vlu` back to its snapshot (the resync of Fig. 7 in the
    /// other direction, an undo without a backup): every recorded range is read through
    /// the (first) snapshot virtual LU and written to the origin through the ordinary
    /// write path, then the snapshot is deleted as [`Self::delete`] does. The origin then
    /// equals the snapshot at its instant (with any writes made to the snapshot since),
    /// and the legs are made equal again by the resync that follows (E1, E2) or at once
    /// (E4). The caller keeps clients' writes out meanwhile (a client write during the
    /// rollback may be overwritten). The rollback's writes change the origin, so the
    /// changed-block record counts them as written. Returns the blocks rolled back.
    pub fn rollback(&self, vlu: VirtualLuId) -> Result<u64> {
        const CHUNK: u64 = 2048;
        let pair = self.origin_pair(vlu)?;
        let found = self.mode(vlu);
        if found != Mode::Snapshot {
            return Err(ManagerError::NotSnapshot { vlu, found });
        }
        if pair.invalid.load(Ordering::SeqCst) {
            return Err(ManagerError::SnapshotInvalidated(vlu));
        }
        let snap = *pair.cfg.snapshots.first().ok_or(ManagerError::Config {
            origin: vlu,
            reason: "no snapshot virtual LU to roll back to".into(),
        })?;
        let recorded: Vec<Extent> = lock(&pair.table).iter().collect();
        let mut buf = Vec::new();
        let mut blocks = 0;
        for ext in recorded {
            let mut lba = ext.first();
            while lba <= ext.last() {
                let n = (ext.last() - lba + 1).min(CHUNK);
                buf.resize((n * SECTOR_SIZE) as usize, 0);
                self.read(snap, lba * SECTOR_SIZE, &mut buf)?;
                self.write(vlu, lba * SECTOR_SIZE, &buf, false)?;
                lba += n;
                blocks += n;
            }
        }
        self.flush(vlu)?;
        self.delete(vlu)?;
        Ok(blocks)
    }

    /// Refuse acquire on the origin virtual LU `vlu` with `reason` from now on (`None`:
    /// allow it again). Succeeds only while the pair is Synchronized, so a holder knows
    /// the pair stays Synchronized until it lets go.
    pub fn hold(&self, vlu: VirtualLuId, reason: Option<String>) -> Result<()> {
        let pair = self.origin_pair(vlu)?;
        let _gate = write(&pair.gate);
        let found = self.mode(vlu);
        if reason.is_some() && found != Mode::Synchronized {
            return Err(ManagerError::NotSynchronized { vlu, found });
        }
        *lock(&pair.hold) = reason;
        Ok(())
    }

    /// Run `f` with every I/O on the pair of `vlu` done and none let in until it returns
    /// (the exact instant a snapshot is taken at, used here for any change of where the
    /// pair's data lives).
    pub fn quiesced<T>(&self, vlu: VirtualLuId, f: impl FnOnce() -> T) -> Result<T> {
        let (pair, _) = self.pair(vlu)?;
        let _gate = write(&pair.gate);
        Ok(f())
    }

    /// The mirroring definition, capacity and save area of the pair of `vlu`.
    pub fn pair_layout(&self, vlu: VirtualLuId) -> Result<(MirrorDefinition, u64, Option<LuId>)> {
        let (pair, _) = self.pair(vlu)?;
        Ok((
            pair.cfg.definition.clone(),
            pair.capacity_lbas,
            pair.cfg.save_area,
        ))
    }

    /// Delete the snapshot of the origin virtual LU `vlu` ([0031], [0061]). For E1 and E2
    /// the pair is then Re-synchronizing until [`Self::resync_step`] finishes; for E4 it
    /// is Synchronized at once.
    pub fn delete(&self, vlu: VirtualLuId) -> Result<()> {
        let pair = self.origin_pair(vlu)?;
        let _gate = write(&pair.gate);
        let found = self.mode(vlu);
        if found != Mode::Snapshot {
            return Err(ManagerError::NotSnapshot { vlu, found });
        }
        match &pair.cfg.definition {
            MirrorDefinition::Managed { lu, .. } => {
                // [0031]: the array mirrors again before the host stops recording.
                self.mode_select(*lu, Mode::Resynchronizing)?;
                self.set_pair_mode(pair, Mode::Resynchronizing)?;
            }
            MirrorDefinition::Triple { .. } => {
                self.set_pair_mode(pair, Mode::Resynchronizing)?;
            }
            MirrorDefinition::Pair { .. } => {
                self.set_pair_mode(pair, Mode::Synchronized)?;
                self.clear_tables(pair)?;
                return Ok(());
            }
        }
        *lock(&pair.resync) = ResyncState::default();
        Ok(())
    }

    fn check_range(&self, pair: &Pair, vlu: VirtualLuId, offset: u64, len: u64) -> Result<()> {
        let capacity = pair.capacity_lbas * SECTOR_SIZE;
        match offset.checked_add(len) {
            Some(end) if end <= capacity => Ok(()),
            _ => Err(ManagerError::OutOfRange {
                vlu,
                offset,
                len,
                capacity,
            }),
        }
    }

    fn backend_read(&self, lu: LuId, lba: u64, buf: &mut [u8]) -> Result<()> {
        self.backend
            .read(lu, lba, buf)
            .map_err(|source| ManagerError::Backend {
                op: "READ",
                lu,
                source,
            })
    }

    fn backend_write(&self, lu: LuId, lba: u64, data: &[u8], fua: bool) -> Result<()> {
        self.backend
            .write(lu, lba, data, fua && self.caps.fua)
            .map_err(|source| ManagerError::Backend {
                op: "WRITE",
                lu,
                source,
            })
    }

    /// Read `buf.len()` bytes of `vlu` at byte `offset`.
    pub fn read(&self, vlu: VirtualLuId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (pair, role) = self.pair(vlu)?;
        let _gate = read(&pair.gate);
        let entry = read(&self.lu_mode).get(vlu);
        let route = router::route(pair.strategy, vlu, role, entry, Op::Read)?;
        self.check_range(pair, vlu, offset, buf.len() as u64)?;
        let Some(ext) = Extent::covering_bytes(offset, buf.len() as u64) else {
            return Ok(());
        };
        let head = (offset % SECTOR_SIZE) as usize;
        if route.bookkeeping == Bookkeeping::SnapshotRead {
            let mut tmp = vec![0u8; ext.byte_len() as usize];
            self.snapshot_read(pair, vlu, route.lu, ext, &mut tmp)?;
            buf.copy_from_slice(&tmp[head..head + buf.len()]);
            return Ok(());
        }
        if head == 0 && buf.len() as u64 % SECTOR_SIZE == 0 {
            return self.backend_read(route.lu, ext.first(), buf);
        }
        let mut tmp = vec![0u8; ext.byte_len() as usize];
        self.backend_read(route.lu, ext.first(), &mut tmp)?;
        buf.copy_from_slice(&tmp[head..head + buf.len()]);
        Ok(())
    }

    /// E4 snapshot read ([0076]): saved blocks from the save area, the rest from the mate.
    fn snapshot_read(
        &self,
        pair: &Pair,
        vlu: VirtualLuId,
        mate: LuId,
        ext: Extent,
        out: &mut [u8],
    ) -> Result<()> {
        // Held so a concurrent copy-on-write cannot overwrite the mate between the lookup
        // and the read.
        let _range = pair.locks.lock(ext);
        if pair.invalid.load(Ordering::SeqCst) {
            return Err(ManagerError::SnapshotInvalidated(pair.key()));
        }
        let Some(save) = &pair.save else {
            return Err(ManagerError::Config {
                origin: vlu,
                reason: "snapshot read without a save area".into(),
            });
        };
        let (save_lu, pieces) = {
            let s = lock(save);
            (s.lu(), s.lookup(ext))
        };
        for (piece, source) in pieces {
            let at = ((piece.first() - ext.first()) * SECTOR_SIZE) as usize;
            let dst = &mut out[at..at + piece.byte_len() as usize];
            match source {
                Source::Saved(lba) => self.backend_read(save_lu, lba, dst)?,
                Source::Unchanged => self.backend_read(mate, piece.first(), dst)?,
            }
        }
        Ok(())
    }

    /// Write `data` to `vlu` at byte `offset` (Fig. 5). With `fua`, the data is stable
    /// when this returns.
    pub fn write(&self, vlu: VirtualLuId, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.write_payload(vlu, offset, data.len() as u64, Payload::Data(data), fua)
    }

    /// Write zeroes to `len` bytes of `vlu` at byte `offset` (NBD WRITE_ZEROES and TRIM),
    /// with the bookkeeping of any write. Whole blocks go to the backend as one
    /// `write_zeroes`, which with `unmap` may deallocate them; partial blocks at either
    /// end are written as zero bytes.
    pub fn write_zeroes(
        &self,
        vlu: VirtualLuId,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<()> {
        let (pair, _) = self.pair(vlu)?;
        self.check_range(pair, vlu, offset, len)?;
        let end = offset + len;
        let whole_first = offset.div_ceil(SECTOR_SIZE) * SECTOR_SIZE;
        let whole_end = end / SECTOR_SIZE * SECTOR_SIZE;
        if whole_first >= whole_end {
            return self.write(vlu, offset, &vec![0u8; len as usize], fua);
        }
        let zero = [0u8; SECTOR_SIZE as usize];
        if whole_first > offset {
            self.write(vlu, offset, &zero[..(whole_first - offset) as usize], fua)?;
        }
        let zeroes = Payload::Zeroes { unmap };
        self.write_payload(vlu, whole_first, whole_end - whole_first, zeroes, fua)?;
        if end > whole_end {
            self.write(vlu, whole_end, &zero[..(end - whole_end) as usize], fua)?;
        }
        Ok(())
    }

    fn write_payload(
        &self,
        vlu: VirtualLuId,
        offset: u64,
        len: u64,
        payload: Payload<'_>,
        fua: bool,
    ) -> Result<()> {
        let (pair, role) = self.pair(vlu)?;
        let _gate = read(&pair.gate);
        let entry = read(&self.lu_mode).get(vlu);
        let route = router::route(pair.strategy, vlu, role, entry, Op::Write)?;
        self.check_range(pair, vlu, offset, len)?;
        let Some(ext) = Extent::covering_bytes(offset, len) else {
            return Ok(());
        };
        let _range = pair.locks.lock(ext);
        // Changed-block tracking marks every write to the origin, in every mode.
        let track = role == Role::Origin && lock(&pair.tracking).mark(ext);
        // Steps 802-803: record, durably, before the WRITE is issued. A coarse table may
        // hold `ext` in a granule no journal record describes, so every write to it is
        // journaled.
        let add = matches!(route.bookkeeping, Bookkeeping::Record) && {
            let mut table = lock(&pair.table);
            table.add(ext) > 0 || table.is_coarse()
        };
        self.journal_write(pair, ext, track, add)?;
        match route.bookkeeping {
            Bookkeeping::Delete => {
                // Steps 805-806: the array mirrors this write, so the LBAs become equal.
                let removed = lock(&pair.table).remove(ext);
                if removed > 0 {
                    self.append(JournalRecord::Remove {
                        pair: pair.key(),
                        extent: ext,
                    })?;
                }
                let res = self.write_payload_blocks(entry, route.lu, offset, payload, ext, fua);
                if res.is_err() && removed > 0 {
                    // A failed mirrored write may have reached one leg only.
                    lock(&pair.table).add(ext);
                    let _ = self.append(JournalRecord::Add {
                        pair: pair.key(),
                        extent: ext,
                    });
                }
                return res;
            }
            Bookkeeping::CopyOnWrite => self.copy_on_write(pair, route.lu, ext)?,
            Bookkeeping::Record | Bookkeeping::None | Bookkeeping::SnapshotRead => {}
        }
        self.write_payload_blocks(entry, route.lu, offset, payload, ext, fua)
    }

    /// Journal a write of `ext` before its data write is issued: its changed-block mark
    /// (`track`) and its update-location table record (`add`), as one append when both
    /// (so a durable log waits once for the two).
    fn journal_write(&self, pair: &Pair, ext: Extent, track: bool, add: bool) -> Result<()> {
        let (pair, extent) = (pair.key(), ext);
        let t = JournalRecord::TrackAdd { pair, extent };
        let a = JournalRecord::Add { pair, extent };
        let res = match (track, add) {
            (true, true) => self.log.append_all(&[t, a]),
            (true, false) => self.log.append(&t),
            (false, true) => self.log.append(&a),
            (false, false) => Ok(()),
        };
        res.map_err(ManagerError::Journal)
    }

    fn write_payload_blocks(
        &self,
        entry: Option<LuModeEntry>,
        lu: LuId,
        offset: u64,
        payload: Payload<'_>,
        ext: Extent,
        fua: bool,
    ) -> Result<()> {
        match payload {
            Payload::Data(data) => self.write_blocks(entry, lu, offset, data, ext, fua),
            Payload::Zeroes { unmap } => self
                .backend
                .write_zeroes(lu, ext.first(), ext.count(), unmap, fua && self.caps.fua)
                .map_err(|source| ManagerError::Backend {
                    op: "WRITE ZEROES",
                    lu,
                    source,
                }),
        }
    }

    /// Issue the block write, merging partial first and last blocks with their current
    /// contents (read from the virtual LU's READ destination).
    fn write_blocks(
        &self,
        entry: Option<LuModeEntry>,
        lu: LuId,
        offset: u64,
        data: &[u8],
        ext: Extent,
        fua: bool,
    ) -> Result<()> {
        let head = (offset % SECTOR_SIZE) as usize;
        if head == 0 && data.len() as u64 % SECTOR_SIZE == 0 {
            return self.backend_write(lu, ext.first(), data, fua);
        }
        let src = entry.and_then(|e| e.read).unwrap_or(lu);
        let mut buf = vec![0u8; ext.byte_len() as usize];
        let sector = SECTOR_SIZE as usize;
        if head != 0 {
            self.backend_read(src, ext.first(), &mut buf[..sector])?;
        }
        let tail_end = head + data.len();
        if tail_end % sector != 0 && (ext.count() > 1 || head == 0) {
            let at = buf.len() - sector;
            self.backend_read(src, ext.last(), &mut buf[at..])?;
        }
        buf[head..tail_end].copy_from_slice(data);
        self.backend_write(lu, ext.first(), &buf, fua)
    }

    /// E4 ([0072]): save the pre-update data of blocks of `ext` not saved yet.
    fn copy_on_write(&self, pair: &Pair, mirror: LuId, ext: Extent) -> Result<()> {
        let Some(save) = &pair.save else {
            return Ok(());
        };
        if pair.invalid.load(Ordering::SeqCst) {
            return Ok(());
        }
        let unsaved = lock(&pair.table).uncovered(ext);
        for part in unsaved {
            let (save_lu, at) = {
                let mut s = lock(save);
                (s.lu(), s.allocate(part.count()))
            };
            let Some(save_lba) = at else {
                // Like an LVM snapshot that runs out of space: the snapshot is lost, the
                // database's write goes on.
                pair.invalid.store(true, Ordering::SeqCst);
                self.append(JournalRecord::SnapshotInvalid {
                    pair: pair.key(),
                    invalid: true,
                })?;
                return Ok(());
            };
            let mut old = vec![0u8; part.byte_len() as usize];
            self.backend_read(mirror, part.first(), &mut old)?;
            // FUA: the saved copy must be stable before the original is overwritten.
            self.backend_write(save_lu, save_lba, &old, true)?;
            self.append(JournalRecord::Save {
                pair: pair.key(),
                extent: part,
                lu: save_lu,
                save_lba,
            })?;
            lock(save).insert(part, save_lba);
            lock(&pair.table).add(part);
        }
        Ok(())
    }

    /// Make completed writes to `vlu` stable.
    pub fn flush(&self, vlu: VirtualLuId) -> Result<()> {
        let (pair, _) = self.pair(vlu)?;
        let entry = read(&self.lu_mode).get(vlu);
        let mut lus: Vec<LuId> = entry
            .map(|e| e.write.into_iter().chain(e.read).collect())
            .unwrap_or_default();
        if let Some(s) = &pair.save {
            lus.push(lock(s).lu());
        }
        lus.dedup();
        for lu in lus {
            self.backend
                .flush(lu)
                .map_err(|source| ManagerError::Backend {
                    op: "SYNCHRONIZE CACHE",
                    lu,
                    source,
                })?;
        }
        Ok(())
    }

    /// Resync counters of the pair of origin `vlu`.
    pub fn resync_progress(&self, vlu: VirtualLuId) -> Result<ResyncProgress> {
        let pair = self.origin_pair(vlu)?;
        let st = lock(&pair.resync);
        Ok(ResyncProgress {
            remaining: lock(&pair.table).total(),
            copied: st.copied,
            skipped: st.skipped,
            done: self.mode(vlu) == Mode::Synchronized,
        })
    }

    /// One step of the mirroring re-synchronizing function (Fig. 7) for origin `vlu`:
    /// copy up to `max_lbas` recorded LBAs back to the mate(s). Runs while writes go on.
    /// When the table is empty the pair becomes Synchronized ([0032], [0061]). Calling it
    /// again after stopping resumes where it left off.
    pub fn resync_step(&self, vlu: VirtualLuId, max_lbas: u64) -> Result<ResyncProgress> {
        let pair = self.origin_pair(vlu)?;
        let gate = read(&pair.gate);
        let found = self.mode(vlu);
        match found {
            Mode::Resynchronizing => {}
            Mode::Synchronized => return self.resync_progress(vlu),
            _ => return Err(ManagerError::NotResynchronizing { vlu, found }),
        }
        let cursor = lock(&pair.resync).cursor;
        // Step 1001-1002.
        let next = lock(&pair.table).next_range(cursor, max_lbas.max(1));
        let Some(ext) = next else {
            drop(gate);
            return self.finish_resync(pair, vlu);
        };
        let entry = read(&self.lu_mode).get(vlu);
        let (Some(src), Some(dst)) = (entry.and_then(|e| e.read), entry.and_then(|e| e.write))
        else {
            return Err(ManagerError::NotResynchronizing { vlu, found });
        };
        let copied = if self.caps.array_copy {
            // [0049]: the array copies; under the range lock nothing can race it.
            let _range = pair.locks.lock(ext);
            let still = lock(&pair.table).intersection(ext);
            for part in &still {
                for (from, to) in pair.copy_pairs() {
                    self.backend
                        .copy(from, to, *part)
                        .map_err(|source| ManagerError::Backend {
                            op: "COPY",
                            lu: from,
                            source,
                        })?;
                }
                self.forget(pair, *part)?;
            }
            still.iter().map(|e| e.count()).sum::<u64>()
        } else {
            // Step 1003: read without holding anything.
            let mut buf = vec![0u8; ext.byte_len() as usize];
            self.backend_read(src, ext.first(), &mut buf)?;
            // Step 1004: what is still recorded was not rewritten since the read.
            let _range = pair.locks.lock(ext);
            let still = lock(&pair.table).intersection(ext);
            for part in &still {
                // Step 1005: write back; the array mirrors it to the mate(s).
                let at = ((part.first() - ext.first()) * SECTOR_SIZE) as usize;
                let len = part.byte_len() as usize;
                self.backend_write(dst, part.first(), &buf[at..at + len], false)?;
                // Step 1006.
                self.forget(pair, *part)?;
            }
            still.iter().map(|e| e.count()).sum::<u64>()
        };
        let mut st = lock(&pair.resync);
        st.cursor = if ext.last() + 1 >= pair.capacity_lbas {
            0
        } else {
            ext.last() + 1
        };
        st.copied += copied;
        st.skipped += ext.count() - copied;
        let progress = ResyncProgress {
            remaining: lock(&pair.table).total(),
            copied: st.copied,
            skipped: st.skipped,
            done: false,
        };
        Ok(progress)
    }

    fn forget(&self, pair: &Pair, ext: Extent) -> Result<()> {
        lock(&pair.table).remove(ext);
        self.append(JournalRecord::Remove {
            pair: pair.key(),
            extent: ext,
        })
    }

    fn finish_resync(&self, pair: &Pair, vlu: VirtualLuId) -> Result<ResyncProgress> {
        {
            let _gate = write(&pair.gate);
            // Another step may have finished first; in Re-synchronizing nothing adds to
            // the table, so an empty table stays empty.
            if self.mode(vlu) == Mode::Resynchronizing && lock(&pair.table).is_empty() {
                if let MirrorDefinition::Managed { lu, .. } = &pair.cfg.definition {
                    self.mode_select(*lu, Mode::Synchronized)?;
                }
                self.set_pair_mode(pair, Mode::Synchronized)?;
            }
        }
        self.resync_progress(vlu)
    }

    /// Run resync steps of `max_lbas` until the pair is Synchronized or `stop` is set,
    /// calling `progress` after each step.
    pub fn resync(
        &self,
        vlu: VirtualLuId,
        max_lbas: u64,
        stop: &AtomicBool,
        mut progress: impl FnMut(&ResyncProgress),
    ) -> Result<ResyncProgress> {
        loop {
            let p = self.resync_step(vlu, max_lbas)?;
            progress(&p);
            if p.done || stop.load(Ordering::SeqCst) {
                return Ok(p);
            }
        }
    }

    /// Online verify: compare the legs of Synchronized pair `vlu` over LBAs `from` to
    /// `from + max_lbas - 1` (clipped to the capacity) and return the LBA to continue
    /// from (the capacity at the end) and the ranges where a leg differs from the
    /// origin's. The pair's gate is held shared (no mode change meanwhile) and the range
    /// lock over the chunk, so writes to it wait and writes elsewhere go on. With
    /// `repair`, each differing range is written again with the origin leg's data to
    /// the LU the origin writes to, which the array mirrors to every leg.
    pub fn verify_step(
        &self,
        vlu: VirtualLuId,
        from: u64,
        max_lbas: u64,
        repair: bool,
    ) -> Result<(u64, Vec<Extent>)> {
        let pair = self.origin_pair(vlu)?;
        let _gate = read(&pair.gate);
        let found = self.mode(vlu);
        if found != Mode::Synchronized {
            return Err(ManagerError::NotSynchronized { vlu, found });
        }
        let last = from
            .saturating_add(max_lbas.max(1) - 1)
            .min(pair.capacity_lbas.saturating_sub(1));
        let Some(ext) = Extent::new(from, last) else {
            return Ok((pair.capacity_lbas, Vec::new()));
        };
        let (origin, others) = match &pair.cfg.definition {
            MirrorDefinition::Triple { origin, mate, .. } => (*origin, vec![*mate]),
            MirrorDefinition::Managed { lu, mates } => (*lu, mates.clone()),
            MirrorDefinition::Pair { mirror, mate } => (*mirror, vec![*mate]),
        };
        let _range = pair.locks.lock(ext);
        let mut want = vec![0u8; ext.byte_len() as usize];
        self.backend_read(origin, ext.first(), &mut want)?;
        let mut differs = vec![false; ext.count() as usize];
        let mut leg = vec![0u8; want.len()];
        for lu in others {
            self.backend_read(lu, ext.first(), &mut leg)?;
            let sectors = want
                .chunks(SECTOR_SIZE as usize)
                .zip(leg.chunks(SECTOR_SIZE as usize));
            for (d, (a, b)) in differs.iter_mut().zip(sectors) {
                *d |= a != b;
            }
        }
        let mut ranges = Vec::new();
        let mut run: Option<u64> = None;
        for (i, d) in differs.iter().chain([&false]).enumerate() {
            let lba = ext.first() + i as u64;
            match (run, *d) {
                (None, true) => run = Some(lba),
                (Some(start), false) => {
                    ranges.extend(Extent::new(start, lba - 1));
                    run = None;
                }
                _ => {}
            }
        }
        let target = read(&self.lu_mode).get(vlu).and_then(|e| e.write);
        if let (true, Some(target)) = (repair, target) {
            for r in &ranges {
                let at = ((r.first() - ext.first()) * SECTOR_SIZE) as usize;
                let data = &want[at..at + r.byte_len() as usize];
                self.backend_write(target, r.first(), data, true)?;
            }
        }
        Ok((ext.last() + 1, ranges))
    }
}

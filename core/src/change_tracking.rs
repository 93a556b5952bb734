//! Changed-block tracking across backups (issue 19): per origin virtual LU, the LBAs
//! written since the last completed backup, so a backup can copy only those.
//!
//! A [`ChangedBlocks`] holds three things:
//!
//! - `current`: the LBAs written since the last cut (every client write and write-zeroes
//!   in every mode, and the writes of a rollback, which change the origin too; not the
//!   resync's write-back, which only makes the legs equal again);
//! - `pending`: at most one backup in progress, its id and the LBAs it has to copy: what
//!   was `current` when its snapshot was taken (the cut);
//! - `base`: the id of the last completed backup, or none (then a backup copies
//!   everything).
//!
//! [`ChangedBlocks::cut`] moves `current` into `pending` at the snapshot instant;
//! [`ChangedBlocks::complete`] drops `pending` and makes its backup the base;
//! [`ChangedBlocks::abort`] puts `pending` back into `current`. A cut while a pending
//! exists (its backup never completed nor aborted) merges it into the new pending, so
//! `current ∪ pending` always covers every LBA written since the base's cut: no range is
//! ever lost, whatever the order of cuts, completes, aborts and crashes (the journal
//! replays these as records, see [`crate::journal`]).
//!
//! The sets are [`UpdateLocationTable`]s, so they take a [`TableBudget`]: past it they
//! coarsen (cover more LBAs than were written, never fewer) and memory stays bounded.

use std::fmt;

use crate::lba::Extent;
use crate::update_location::{TableBudget, UpdateLocationTable};

/// Longest backup id, in bytes (it fits a journal record with room to spare).
pub const MAX_BACKUP_ID: usize = 128;

/// The id of a backup, chosen by the console: 1 to [`MAX_BACKUP_ID`] bytes of printable
/// ASCII without spaces. Kept inline so journal records stay `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackupId {
    len: u8,
    bytes: [u8; MAX_BACKUP_ID],
}

/// Why a string is not a [`BackupId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{found:?} is not a backup id: expected 1 to {MAX_BACKUP_ID} bytes of printable ASCII without spaces")]
pub struct BackupIdError {
    pub found: String,
}

impl BackupId {
    pub fn new(id: &str) -> Result<BackupId, BackupIdError> {
        let b = id.as_bytes();
        if b.is_empty() || b.len() > MAX_BACKUP_ID || !b.iter().all(|c| c.is_ascii_graphic()) {
            return Err(BackupIdError {
                found: id.chars().take(MAX_BACKUP_ID + 8).collect(),
            });
        }
        let mut bytes = [0u8; MAX_BACKUP_ID];
        bytes[..b.len()].copy_from_slice(b);
        Ok(BackupId {
            len: b.len() as u8,
            bytes,
        })
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever stored.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::str::FromStr for BackupId {
    type Err = BackupIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackupId::new(s)
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BackupId({:?})", self.as_str())
    }
}

/// A backup in progress: its id and the LBAs it copies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub backup: BackupId,
    pub blocks: UpdateLocationTable,
}

/// The changed-block record of one origin virtual LU. See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangedBlocks {
    current: UpdateLocationTable,
    pending: Option<Pending>,
    base: Option<BackupId>,
}

/// What a cut returns: the base the pending set is relative to, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    pub base: Option<BackupId>,
    pub lbas: u64,
}

/// What an admin sees of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackingSummary {
    pub base: Option<BackupId>,
    /// LBAs written since the last cut.
    pub current_lbas: u64,
    /// The backup in progress and its LBAs.
    pub pending: Option<(BackupId, u64)>,
    /// LBAs the sets are rounded out to (1: exact).
    pub granularity: u64,
}

fn empty_like(t: &UpdateLocationTable) -> UpdateLocationTable {
    match t.budget() {
        Some(b) => UpdateLocationTable::with_budget(b),
        None => UpdateLocationTable::new(),
    }
}

/// `a ∪ b`, in the larger of the two (so the fewer records are added).
fn union(a: UpdateLocationTable, b: UpdateLocationTable) -> UpdateLocationTable {
    let (mut big, small) = if a.total() >= b.total() {
        (a, b)
    } else {
        (b, a)
    };
    for e in small.iter() {
        big.add(e);
    }
    big
}

impl ChangedBlocks {
    /// An empty record (no base: the next backup is a full one) whose sets stay exact.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty record whose sets coarsen past `budget` each.
    pub fn with_budget(budget: TableBudget) -> Self {
        ChangedBlocks {
            current: UpdateLocationTable::with_budget(budget),
            ..Self::default()
        }
    }

    /// Set or lift the budget of both sets; a set past it coarsens now.
    pub fn set_budget(&mut self, budget: Option<TableBudget>) {
        self.current.set_budget(budget);
        if let Some(p) = &mut self.pending {
            p.blocks.set_budget(budget);
        }
    }

    pub fn budget(&self) -> Option<TableBudget> {
        self.current.budget()
    }

    /// Take the state of `other`, keeping this record's budget (coarsening now if it does
    /// not fit): how a record is restored from a journal.
    pub fn assign(&mut self, other: &ChangedBlocks) {
        let budget = self.budget();
        *self = other.clone();
        self.set_budget(budget);
    }

    /// Record a write of `ext`. Returns true when a journal record must describe it: the
    /// set grew, or it is coarse (a granule may have absorbed `ext` with no record
    /// describing that granule).
    pub fn mark(&mut self, ext: Extent) -> bool {
        self.current.add(ext) > 0 || self.current.is_coarse()
    }

    /// At the snapshot instant of `backup`: `pending := (backup, current ∪ old pending)`,
    /// `current := ∅`. Returns the base and the size of the new pending set.
    pub fn cut(&mut self, backup: BackupId) -> Cut {
        let fresh = empty_like(&self.current);
        let taken = std::mem::replace(&mut self.current, fresh);
        let blocks = match self.pending.take() {
            Some(old) => union(old.blocks, taken),
            None => taken,
        };
        let lbas = blocks.total();
        self.pending = Some(Pending { backup, blocks });
        Cut {
            base: self.base,
            lbas,
        }
    }

    /// `backup` was copied: it becomes the base and its pending set is dropped. Returns
    /// false (and changes nothing) when `backup` is not the pending one, as when it was
    /// completed already.
    pub fn complete(&mut self, backup: &BackupId) -> bool {
        if self.pending.as_ref().map(|p| &p.backup) != Some(backup) {
            return false;
        }
        self.pending = None;
        self.base = Some(*backup);
        true
    }

    /// `backup` failed: its pending set goes back into `current`, the base stays. Returns
    /// false (and changes nothing) when `backup` is not the pending one.
    pub fn abort(&mut self, backup: &BackupId) -> bool {
        if self.pending.as_ref().map(|p| &p.backup) != Some(backup) {
            return false;
        }
        let Some(p) = self.pending.take() else {
            return false;
        };
        let fresh = empty_like(&self.current);
        let current = std::mem::replace(&mut self.current, fresh);
        let mut merged = union(current, p.blocks);
        merged.set_budget(self.current.budget());
        self.current = merged;
        true
    }

    /// Take back a complete that did not reach the journal: `pending` is pending again
    /// (merged into one pending since) and `base` is the base.
    pub fn reinstate(&mut self, base: Option<BackupId>, pending: Pending) {
        self.base = base;
        match &mut self.pending {
            Some(p) => {
                for e in pending.blocks.iter() {
                    p.blocks.add(e);
                }
            }
            None => self.pending = Some(pending),
        }
    }

    /// Forget everything, base included (the budget stays).
    pub fn reset(&mut self) {
        self.current.clear();
        self.pending = None;
        self.base = None;
    }

    /// The id of the last completed backup.
    pub fn base(&self) -> Option<BackupId> {
        self.base
    }

    /// LBAs written since the last cut.
    pub fn current(&self) -> &UpdateLocationTable {
        &self.current
    }

    /// The backup in progress, if any.
    pub fn pending(&self) -> Option<&Pending> {
        self.pending.as_ref()
    }

    /// LBAs every range is rounded out to, in the coarser of the two sets.
    pub fn granularity(&self) -> u64 {
        let p = self.pending.as_ref().map_or(1, |p| p.blocks.granularity());
        self.current.granularity().max(p)
    }

    /// True when some set has coarsened.
    pub fn is_coarse(&self) -> bool {
        self.granularity() > 1
    }

    /// Bytes both sets hold.
    pub fn memory_bytes(&self) -> u64 {
        self.current.memory_bytes() + self.pending.as_ref().map_or(0, |p| p.blocks.memory_bytes())
    }

    pub fn summary(&self) -> TrackingSummary {
        TrackingSummary {
            base: self.base,
            current_lbas: self.current.total(),
            pending: self.pending.as_ref().map(|p| (p.backup, p.blocks.total())),
            granularity: self.granularity(),
        }
    }

    /// True when nothing is recorded and there is no base.
    pub fn is_empty(&self) -> bool {
        self.current.is_empty() && self.pending.is_none() && self.base.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn ext(f: u64, l: u64) -> Extent {
        Extent::new(f, l).unwrap()
    }

    fn id(s: &str) -> BackupId {
        BackupId::new(s).unwrap()
    }

    /// The LBAs of `t` in the first 8192 (where the tests write; a coarse table's
    /// granules reach far past it).
    fn lbas(t: &UpdateLocationTable) -> BTreeSet<u64> {
        t.intersection(ext(0, 8191))
            .into_iter()
            .flat_map(|e| e.first()..=e.last())
            .collect()
    }

    #[test]
    fn backup_ids() {
        assert_eq!(id("20261201T0300Z-1").as_str(), "20261201T0300Z-1");
        assert_eq!(id("x").to_string(), "x");
        assert!(BackupId::new("").is_err());
        assert!(BackupId::new("a b").is_err());
        assert!(BackupId::new("é").is_err());
        assert!(BackupId::new(&"a".repeat(MAX_BACKUP_ID)).is_ok());
        let e = BackupId::new(&"a".repeat(MAX_BACKUP_ID + 1)).unwrap_err();
        assert!(e.to_string().contains("1 to 128 bytes"), "{e}");
    }

    #[test]
    fn cut_complete_abort() {
        let mut c = ChangedBlocks::new();
        assert!(c.mark(ext(0, 7)));
        assert!(!c.mark(ext(2, 3)), "already recorded: nothing to journal");
        let cut = c.cut(id("b1"));
        assert_eq!(
            cut,
            Cut {
                base: None,
                lbas: 8
            }
        );
        assert!(c.current().is_empty());
        c.mark(ext(100, 100));
        assert!(c.complete(&id("b1")));
        assert!(!c.complete(&id("b1")), "idempotent");
        assert_eq!(c.base(), Some(id("b1")));
        assert_eq!(lbas(c.current()), BTreeSet::from([100]));
        // Abort merges back; the base stays.
        c.cut(id("b2"));
        c.mark(ext(200, 201));
        assert!(!c.abort(&id("other")));
        assert!(c.abort(&id("b2")));
        assert!(!c.abort(&id("b2")), "idempotent");
        assert_eq!(c.base(), Some(id("b1")));
        assert_eq!(lbas(c.current()), BTreeSet::from([100, 200, 201]));
        // A cut over a pending that never ended merges it.
        c.cut(id("b3"));
        c.mark(ext(5, 5));
        let cut = c.cut(id("b4"));
        assert_eq!(cut.base, Some(id("b1")));
        assert_eq!(cut.lbas, 4);
        assert!(!c.complete(&id("b3")), "b3 was superseded");
        assert!(c.complete(&id("b4")));
        assert_eq!(c.base(), Some(id("b4")));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, u64),
        Cut(u8),
        Complete(u8),
        Abort(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..3000, 1u64..40).prop_map(|(f, n)| Op::Write(f, f + n - 1)),
            1 => (0u8..4).prop_map(Op::Cut),
            1 => (0u8..4).prop_map(Op::Complete),
            1 => (0u8..4).prop_map(Op::Abort),
        ]
    }

    /// The model: every write with its time, the time of each id's last cut, and the
    /// time of the base's cut. What must be covered is every write after that.
    #[derive(Default)]
    struct Model {
        writes: Vec<(u64, Extent)>,
        cut_at: BTreeMap<u8, u64>,
        pending: Option<u8>,
        base: Option<(u8, u64)>,
    }

    impl Model {
        fn since_base(&self) -> BTreeSet<u64> {
            let from = self.base.map_or(0, |b| b.1);
            self.writes
                .iter()
                .filter(|(t, _)| *t >= from)
                .flat_map(|(_, e)| e.first()..=e.last())
                .collect()
        }
    }

    fn name(k: u8) -> BackupId {
        id(&format!("backup-{k}"))
    }

    fn budget() -> impl Strategy<Value = Option<u64>> {
        prop::sample::select(vec![None, Some(0), Some(40 << 10), Some(1 << 20)])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Random writes, cuts, completes and aborts against a model: `current ∪
        /// pending` always covers every LBA written since the cut of the last completed
        /// backup; a cut's set covers every LBA written since the base's cut, exactly so
        /// when no budget was passed; the sets only grow except at complete.
        #[test]
        fn never_loses_a_written_block(budget in budget(), ops in prop::collection::vec(op(), 1..150)) {
            let mut c = match budget {
                Some(b) => ChangedBlocks::with_budget(TableBudget::bytes(b)),
                None => ChangedBlocks::new(),
            };
            let mut m = Model::default();
            for (t, op) in ops.into_iter().enumerate() {
                let t = t as u64;
                let union = |c: &ChangedBlocks| {
                    let mut s = lbas(c.current());
                    s.extend(c.pending().map(|p| lbas(&p.blocks)).unwrap_or_default());
                    s
                };
                let before = union(&c);
                match op {
                    Op::Write(f, l) => {
                        m.writes.push((t, ext(f, l)));
                        c.mark(ext(f, l));
                    }
                    Op::Cut(k) => {
                        let cut = c.cut(name(k));
                        prop_assert_eq!(cut.base, m.base.map(|b| name(b.0)));
                        m.cut_at.insert(k, t);
                        m.pending = Some(k);
                        let p = c.pending().unwrap();
                        prop_assert_eq!(cut.lbas, p.blocks.total());
                        let got = lbas(&p.blocks);
                        let want = m.since_base();
                        if budget.is_none() {
                            prop_assert_eq!(&got, &want);
                        } else {
                            prop_assert!(want.is_subset(&got));
                        }
                        prop_assert!(c.current().is_empty());
                    }
                    Op::Complete(k) => {
                        let done = c.complete(&name(k));
                        prop_assert_eq!(done, m.pending == Some(k));
                        if done {
                            m.base = Some((k, m.cut_at[&k]));
                            m.pending = None;
                        }
                    }
                    Op::Abort(k) => {
                        let done = c.abort(&name(k));
                        prop_assert_eq!(done, m.pending == Some(k));
                        if done {
                            m.pending = None;
                        }
                    }
                }
                let after = union(&c);
                let since = m.since_base();
                prop_assert!(since.is_subset(&after), "lost a write after {:?}", op);
                if !matches!(op, Op::Complete(_)) {
                    prop_assert!(before.is_subset(&after), "shrank at {:?}", op);
                }
                prop_assert_eq!(c.base(), m.base.map(|b| name(b.0)));
                prop_assert_eq!(c.pending().map(|p| p.backup), m.pending.map(name));
                if let Some(b) = budget {
                    if b > 0 && c.current().granularity() < 1 << 24 {
                        prop_assert!(c.current().memory_bytes() <= b / 2);
                    }
                }
            }
        }
    }

    #[test]
    fn a_budget_bounds_both_sets() {
        let mut c = ChangedBlocks::with_budget(TableBudget::bytes(256 << 10));
        for i in 0..50_000u64 {
            c.mark(ext(i * 64, i * 64));
        }
        assert!(c.is_coarse());
        c.cut(id("b"));
        for i in 0..50_000u64 {
            c.mark(ext(i * 64 + 7, i * 64 + 7));
        }
        assert!(c.current().memory_bytes() <= 128 << 10);
        assert!(c.pending().unwrap().blocks.memory_bytes() <= 128 << 10);
        assert!((0..50_000u64).all(|i| c.pending().unwrap().blocks.covers(ext(i * 64, i * 64))));
        // Abort merges the two into one set within the budget.
        c.abort(&id("b"));
        assert!(c.current().memory_bytes() <= 128 << 10);
        assert!((0..50_000u64).all(|i| c.current().covers(ext(i * 64, i * 64 + 7))));
    }
}

//! The update-location table's memory budget with the journal (issue 20): the manager's
//! rule "journal a write when the table grew, or always once the table is coarse" means
//! a journal replayed and restored into a budgeted table (`assign`) covers every written
//! LBA, after any interleaving of resync removes; without the second half of the rule a
//! write is lost.
#![allow(clippy::unwrap_used)]

use hvm_core::journal::{JournalRecord, JournalState};
use hvm_core::{Extent, TableBudget, UpdateLocationTable, VirtualLuId};
use proptest::prelude::*;

const PAIR: VirtualLuId = VirtualLuId(0);
/// A budget a few thousand scattered writes go past (one chunk's directory is 32 KiB).
const BUDGET: u64 = 96 << 10;

#[derive(Debug, Clone)]
enum Op {
    /// A 4 KiB write at this 4 KiB block.
    Write(u64),
    /// Resync copies the next range from this LBA and removes it.
    Resync(u64),
    /// Resync copies these LBAs and removes them.
    Copy(Extent),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u64..1 << 18).prop_map(Op::Write),
        1 => (0u64..1 << 21).prop_map(Op::Resync),
    ]
}

/// Run `ops` as the manager does; `journal_coarse` is the rule's second half. Returns the
/// live table, the journal's records and the LBAs written and not copied since.
fn run(ops: &[Op], journal_coarse: bool) -> (UpdateLocationTable, Vec<JournalRecord>, Vec<Extent>) {
    let mut live = UpdateLocationTable::with_budget(TableBudget::bytes(BUDGET));
    let mut journal = Vec::new();
    let mut dirty: Vec<Extent> = Vec::new();
    for op in ops {
        match *op {
            Op::Write(block) => {
                let ext = Extent::new(block * 8, block * 8 + 7).unwrap();
                if live.add(ext) > 0 || (journal_coarse && live.is_coarse()) {
                    journal.push(JournalRecord::Add {
                        pair: PAIR,
                        extent: ext,
                    });
                }
                dirty.push(ext);
            }
            Op::Resync(_) | Op::Copy(_) => {
                let ext = match *op {
                    Op::Copy(ext) => ext,
                    Op::Resync(cursor) => match live.next_range(cursor, 128) {
                        Some(ext) => ext,
                        None => continue,
                    },
                    Op::Write(_) => continue,
                };
                if live.remove(ext) > 0 {
                    journal.push(JournalRecord::Remove {
                        pair: PAIR,
                        extent: ext,
                    });
                }
                // Copied: what is left of each write is what the resync did not copy.
                dirty = dirty.into_iter().flat_map(|d| outside(d, ext)).collect();
            }
        }
    }
    (live, journal, dirty)
}

/// The parts of `d` outside `cut`.
fn outside(d: Extent, cut: Extent) -> Vec<Extent> {
    let mut out = Vec::new();
    if d.first() < cut.first() {
        out.extend(Extent::new(d.first(), d.last().min(cut.first() - 1)));
    }
    if d.last() > cut.last() {
        out.extend(Extent::new(d.first().max(cut.last() + 1), d.last()));
    }
    if d.last() < cut.first() || d.first() > cut.last() {
        return vec![d];
    }
    out
}

/// The table a restart rebuilds: the journal replayed, then restored into a budgeted table.
fn restored(journal: &[JournalRecord]) -> UpdateLocationTable {
    let mut state = JournalState::default();
    for rec in journal {
        state.apply(rec);
    }
    let mut table = UpdateLocationTable::with_budget(TableBudget::bytes(BUDGET));
    if let Some(t) = state.tables.get(&PAIR) {
        table.assign(t);
    }
    table
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn a_restored_table_covers_every_write_not_copied(
        ops in prop::collection::vec(op(), 500..4000),
    ) {
        let (live, journal, dirty) = run(&ops, true);
        let back = restored(&journal);
        for d in &dirty {
            prop_assert!(live.covers(*d), "live table misses {:?}", d);
            prop_assert!(back.covers(*d), "restored table misses {:?}", d);
        }
        prop_assert!(back.memory_bytes() <= BUDGET / 2 || back.granularity() >= 1 << 20);
    }
}

/// Without journaling writes to a coarse table, a write absorbed by a granule that only
/// the coarsening created never reaches the journal, and a restart loses it (the replayed
/// table, smaller after the resync, is not coarsened as far as the live one was).
#[test]
fn without_the_coarse_rule_a_write_is_lost() {
    // Scattered writes past the budget.
    let mut ops: Vec<Op> = (0..20_000u64).map(|i| Op::Write(i * 13)).collect();
    let (live, _, _) = run(&ops, false);
    assert!(live.is_coarse());
    let g = live.granularity();
    assert!(g > 16 && g < 1 << 20, "granule of {g} LBAs");
    // Resync copies everything past block 0's granule; the table stays coarse. Then a
    // write of block 1: in block 0's granule, never written before.
    ops.push(Op::Copy(Extent::new(g, u64::MAX).unwrap()));
    ops.push(Op::Write(1));
    let (live, _, _) = run(&ops, false);
    assert!(live.is_coarse());
    let (_, journal, dirty) = run(&ops, false);
    let back = restored(&journal);
    assert!(
        !dirty.iter().all(|d| back.covers(*d)),
        "every write survived without the rule"
    );
    let (_, journal, dirty) = run(&ops, true);
    let back = restored(&journal);
    assert!(dirty.iter().all(|d| back.covers(*d)));
}

//! Changed-block tracking through the snapshot manager (issue 19), on the in-memory
//! array of each kind: client writes are marked in every mode, the resync's write-back is
//! not, a rollback's writes are; a backup's cut is taken at the acquire; a failed
//! acquire aborts it; the journal rebuilds the record after a restart.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use hvm_core::journal::{replay, MemoryLog};
use hvm_core::mem_array::{ArrayKind, MemArray};
use hvm_core::{
    BackupId, Extent, LuId, ManagerError, MirrorDefinition, PairConfig, SnapshotManager,
    VirtualLuId,
};

const ORIGIN: VirtualLuId = VirtualLuId(0);

fn id(s: &str) -> BackupId {
    BackupId::new(s).unwrap()
}

fn ext(f: u64, l: u64) -> Extent {
    Extent::new(f, l).unwrap()
}

fn open(
    kind: ArrayKind,
    log: Arc<MemoryLog>,
    recovered: Option<&hvm_core::journal::JournalState>,
    array: &Arc<MemArray>,
) -> SnapshotManager<Arc<MemArray>> {
    let (definition, save_area) = match kind {
        ArrayKind::Stateless => (
            MirrorDefinition::Triple {
                mirror: LuId(0),
                origin: LuId(1),
                mate: LuId(2),
            },
            None,
        ),
        ArrayKind::ModeSelect => (
            MirrorDefinition::Managed {
                lu: LuId(0),
                mates: vec![LuId(1)],
            },
            None,
        ),
        ArrayKind::PreUpdate => (
            MirrorDefinition::Pair {
                mirror: LuId(0),
                mate: LuId(1),
            },
            Some(LuId(9)),
        ),
    };
    let pairs = vec![PairConfig {
        origin: ORIGIN,
        snapshots: vec![VirtualLuId(1)],
        definition,
        save_area,
    }];
    SnapshotManager::open(array.clone(), pairs, log, recovered).unwrap()
}

fn array(kind: ArrayKind) -> Arc<MemArray> {
    let defs = match kind {
        ArrayKind::Stateless => vec![MirrorDefinition::Triple {
            mirror: LuId(0),
            origin: LuId(1),
            mate: LuId(2),
        }],
        ArrayKind::ModeSelect => vec![MirrorDefinition::Managed {
            lu: LuId(0),
            mates: vec![LuId(1)],
        }],
        ArrayKind::PreUpdate => vec![MirrorDefinition::Pair {
            mirror: LuId(0),
            mate: LuId(1),
        }],
    };
    let extra: &[(LuId, u64)] = if kind == ArrayKind::PreUpdate {
        &[(LuId(9), 256)]
    } else {
        &[]
    };
    Arc::new(MemArray::new(kind, defs, 256, extra))
}

fn pending(mgr: &SnapshotManager<Arc<MemArray>>, b: &str) -> Vec<Extent> {
    mgr.pending_extents(ORIGIN, &id(b)).unwrap().unwrap()
}

#[test]
fn every_mode_marks_client_writes_and_the_resync_does_not() {
    for kind in [
        ArrayKind::Stateless,
        ArrayKind::ModeSelect,
        ArrayKind::PreUpdate,
    ] {
        let log = Arc::new(MemoryLog::new());
        let a = array(kind);
        let mgr = open(kind, log.clone(), None, &a);
        // Synchronized.
        mgr.write(ORIGIN, 0, &[1; 1024], false).unwrap();
        let cut = mgr.acquire_for_backup(ORIGIN, id("b1")).unwrap();
        assert_eq!((cut.base, cut.lbas), (None, 2), "{kind:?}");
        assert_eq!(pending(&mgr, "b1"), vec![ext(0, 1)]);
        // Snapshot: a write, and write-zeroes.
        mgr.write(ORIGIN, 10 * 512, &[2; 512], false).unwrap();
        mgr.write_zeroes(ORIGIN, 20 * 512, 1024, false, false)
            .unwrap();
        mgr.delete(ORIGIN).unwrap();
        // Re-synchronizing (E1, E2): a write; the resync's write-back is not one.
        mgr.write(ORIGIN, 30 * 512, &[3; 512], false).unwrap();
        mgr.resync(ORIGIN, 8, &AtomicBool::new(false), |_| {})
            .unwrap();
        assert_eq!(
            mgr.complete_backup(ORIGIN, &id("b1")).unwrap(),
            Some(id("b1"))
        );
        let cut = mgr.acquire_for_backup(ORIGIN, id("b2")).unwrap();
        assert_eq!(cut.base, Some(id("b1")));
        assert_eq!(
            pending(&mgr, "b2"),
            vec![ext(10, 10), ext(20, 21), ext(30, 30)],
            "{kind:?}"
        );
        // The journal rebuilds it: a restart keeps the pending set and the base.
        let st = replay(&log.bytes()).unwrap().state;
        drop(mgr);
        let again = open(kind, Arc::new(MemoryLog::new()), Some(&st), &a);
        let t = again.tracking(ORIGIN).unwrap();
        assert_eq!(t.base, Some(id("b1")));
        assert_eq!(t.pending, Some((id("b2"), 4)), "{kind:?}");
        assert_eq!(
            pending(&again, "b2"),
            vec![ext(10, 10), ext(20, 21), ext(30, 30)]
        );
    }
}

#[test]
fn a_rollback_counts_and_a_failed_acquire_aborts_the_cut() {
    let a = array(ArrayKind::Stateless);
    let mgr = open(ArrayKind::Stateless, Arc::new(MemoryLog::new()), None, &a);
    mgr.write(ORIGIN, 0, &[1; 512], false).unwrap();
    mgr.acquire_for_backup(ORIGIN, id("b1")).unwrap();
    mgr.complete_backup(ORIGIN, &id("b1")).unwrap();
    mgr.write(ORIGIN, 40 * 512, &[2; 512], false).unwrap();
    // Rolled back to the snapshot: LBA 40 changed (back), so it counts.
    assert_eq!(mgr.rollback(ORIGIN).unwrap(), 1);
    mgr.resync(ORIGIN, 8, &AtomicBool::new(false), |_| {})
        .unwrap();
    // A second acquire while the first snapshot is held fails: the cut is aborted.
    mgr.acquire(ORIGIN).unwrap();
    let e = mgr.acquire_for_backup(ORIGIN, id("b2")).unwrap_err();
    assert!(matches!(e, ManagerError::NotSynchronized { .. }), "{e}");
    let t = mgr.tracking(ORIGIN).unwrap();
    assert_eq!(
        (t.base, t.pending, t.current_lbas),
        (Some(id("b1")), None, 1)
    );
    mgr.delete(ORIGIN).unwrap();
    mgr.resync(ORIGIN, 8, &AtomicBool::new(false), |_| {})
        .unwrap();
    mgr.acquire_for_backup(ORIGIN, id("b2")).unwrap();
    assert_eq!(pending(&mgr, "b2"), vec![ext(40, 40)]);
    // Abort: counted as written again; completing an aborted backup changes nothing.
    assert_eq!(mgr.abort_backup(ORIGIN, &id("b2")).unwrap(), Some(id("b1")));
    assert_eq!(
        mgr.complete_backup(ORIGIN, &id("b2")).unwrap(),
        Some(id("b1"))
    );
    assert_eq!(mgr.tracking(ORIGIN).unwrap().current_lbas, 1);
    // A snapshot virtual LU has no record of its own.
    assert!(mgr.tracking(VirtualLuId(1)).is_err());
}

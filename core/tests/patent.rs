//! The patent's worked examples and the E1 command sequence, end to end through the
//! snapshot manager: Fig. 10 reached by acquire/delete on Fig. 9, [0022]'s LU mode table
//! built from Fig. 2's modes, the Mode Select sequence of [0028]/[0031]/[0032] checked
//! with a mock array, and the error paths.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use hvm_core::backend::{BackendDescription, Capabilities, LuInfo, MockBackend};
use hvm_core::journal::{replay, JournalRecord, MemoryLog, NoLog};
use hvm_core::mem_array::{ArrayKind, MemArray};
use hvm_core::mode::{encode_mode_sense, PageError};
use hvm_core::{
    BackendError, BackendErrorKind, LuId, LuModeEntry, ManagerError, MirrorDefinition, Mode,
    PairConfig, SnapshotManager, VirtualLuId,
};
use mockall::predicate::{always, eq};
use mockall::Sequence;

fn v(n: u32) -> VirtualLuId {
    VirtualLuId(n)
}

fn triple(m: u32, o: u32, t: u32) -> MirrorDefinition {
    MirrorDefinition::Triple {
        mirror: LuId(m),
        origin: LuId(o),
        mate: LuId(t),
    }
}

/// Fig. 9's table on a stateless array, virtual LUs 0-5 as three pairs; acquire the
/// snapshot of virtual LU 2, acquire and delete that of virtual LU 4 with writes in
/// between: the LU mode table is then exactly Fig. 10. Finishing the resync completes
/// [0061]: virtual LU 4 reads LU 6 again and is Synchronized.
#[test]
fn fig10_reached_from_fig9() {
    let defs = vec![triple(0, 1, 2), triple(3, 4, 5), triple(6, 7, 8)];
    let array = Arc::new(MemArray::new(ArrayKind::Stateless, defs.clone(), 64, &[]));
    let pairs = defs
        .into_iter()
        .enumerate()
        .map(|(i, definition)| PairConfig {
            origin: v(2 * i as u32),
            snapshots: vec![v(2 * i as u32 + 1)],
            definition,
            save_area: None,
        })
        .collect();
    let mgr = SnapshotManager::open(array.clone(), pairs, Arc::new(NoLog), None).unwrap();
    mgr.acquire(v(2)).unwrap();
    mgr.acquire(v(4)).unwrap();
    mgr.write(v(4), 0, &[0xaa; 4096], false).unwrap();
    mgr.delete(v(4)).unwrap();

    let both = |lu| LuModeEntry::both(LuId(lu), Mode::Snapshot);
    let fig10 = vec![
        (v(0), LuModeEntry::both(LuId(0), Mode::Synchronized)),
        (v(1), LuModeEntry::UNDEFINED),
        (v(2), both(4)),
        (v(3), both(5)),
        (
            v(4),
            LuModeEntry {
                read: Some(LuId(7)),
                write: Some(LuId(6)),
                mode: Mode::Resynchronizing,
            },
        ),
        (v(5), LuModeEntry::UNDEFINED),
    ];
    assert_eq!(mgr.lu_mode_table().iter().collect::<Vec<_>>(), fig10);

    let stop = AtomicBool::new(false);
    let p = mgr.resync(v(4), 3, &stop, |_| {}).unwrap();
    assert!(p.done);
    assert_eq!(p.copied, 8);
    assert_eq!(
        mgr.lu_mode_table().get(v(4)),
        Some(LuModeEntry::both(LuId(6), Mode::Synchronized))
    );
    assert_eq!(array.leg(LuId(7)), array.leg(LuId(8)));
}

/// [0022] with Fig. 2: the LU mode table is built by Mode Sense of each LU; LU 2 (In
/// snapshot) and LU 3 (Re-synchronizing) have no recorded update locations after the
/// start-up, so they are marked over their whole capacity ([0045]), and resync makes LU 3
/// and its mate LU 6 identical.
#[test]
fn fig2_modes_by_mode_sense() {
    let defs: Vec<_> = [(1, 4), (2, 5), (3, 6)]
        .iter()
        .map(|&(lu, mate)| MirrorDefinition::Managed {
            lu: LuId(lu),
            mates: vec![LuId(mate)],
        })
        .collect();
    let array = Arc::new(MemArray::new(ArrayKind::ModeSelect, defs.clone(), 16, &[]));
    use hvm_core::Backend;
    array.mode_select(LuId(2), &[0, 1]).unwrap();
    array.mode_select(LuId(3), &[0, 2]).unwrap();
    // Make LU 3 and its mate differ, as a host crash mid-snapshot leaves them.
    array.mode_select(LuId(3), &[0, 1]).unwrap();
    array.write(LuId(3), 5, &[9; 512], false).unwrap();
    array.mode_select(LuId(3), &[0, 2]).unwrap();

    let pairs = defs
        .into_iter()
        .enumerate()
        .map(|(i, definition)| PairConfig {
            origin: v(10 + i as u32),
            snapshots: vec![v(20 + i as u32)],
            definition,
            save_area: None,
        })
        .collect();
    let mgr = SnapshotManager::open(array.clone(), pairs, Arc::new(NoLog), None).unwrap();
    assert_eq!(mgr.mode(v(10)), Mode::Synchronized);
    assert_eq!(mgr.mode(v(11)), Mode::Snapshot);
    assert_eq!(mgr.mode(v(12)), Mode::Resynchronizing);
    assert_eq!(
        mgr.mode(v(21)),
        Mode::Snapshot,
        "LU 5 is readable as the snapshot"
    );
    assert_eq!(mgr.update_location_table(v(10)).unwrap().total(), 0);
    assert_eq!(mgr.update_location_table(v(11)).unwrap().total(), 16);
    assert_ne!(array.leg(LuId(3)), array.leg(LuId(6)));
    let stop = AtomicBool::new(false);
    assert!(mgr.resync(v(12), 4, &stop, |_| {}).unwrap().done);
    assert_eq!(array.leg(LuId(3)), array.leg(LuId(6)));
    assert_eq!(array.array_mode(LuId(3)), Some(Mode::Synchronized));
}

fn mock_e1(mock: &mut MockBackend, mode_now: Mode) {
    mock.expect_describe().returning(|| {
        Ok(BackendDescription {
            lus: vec![
                LuInfo {
                    id: LuId(1),
                    capacity_lbas: 64,
                },
                LuInfo {
                    id: LuId(4),
                    capacity_lbas: 64,
                },
            ],
            mirroring: vec![],
            capabilities: Capabilities {
                mode_select: true,
                ..Capabilities::default()
            },
        })
    });
    mock.expect_mode_sense()
        .with(eq(LuId(1)))
        .returning(move |_| Ok(encode_mode_sense(mode_now).to_vec()));
}

fn e1_pair() -> PairConfig {
    PairConfig {
        origin: v(0),
        snapshots: vec![v(1)],
        definition: MirrorDefinition::Managed {
            lu: LuId(1),
            mates: vec![LuId(4)],
        },
        save_area: None,
    }
}

/// [0028], [0031], [0032]: one Mode Select per transition, in order, with the Fig. 4
/// pages 00h/01h, 00h/02h, 00h/00h; the host journals Snapshot before the array stops
/// mirroring, and the array mirrors again before the host journals Re-synchronizing.
#[test]
fn e1_mode_select_sequence() {
    let mut mock = MockBackend::new();
    mock_e1(&mut mock, Mode::Synchronized);
    let mut seq = Sequence::new();
    for page in [[0u8, 1], [0, 2], [0, 0]] {
        mock.expect_mode_select()
            .with(eq(LuId(1)), eq(page.to_vec()))
            .times(1)
            .in_sequence(&mut seq)
            .returning(|_, _| Ok(()));
    }
    mock.expect_write()
        .with(eq(LuId(1)), eq(2u64), always(), always())
        .times(1)
        .returning(|_, _, _, _| Ok(()));
    // Resync of LBA 2 without the array-side copy: read it back and write it back.
    mock.expect_read().returning(|_, _, _| Ok(()));
    mock.expect_write()
        .with(eq(LuId(1)), eq(2u64), always(), eq(false))
        .returning(|_, _, _, _| Ok(()));
    let log = Arc::new(MemoryLog::new());
    let mgr = SnapshotManager::open(mock, vec![e1_pair()], log.clone(), None).unwrap();
    mgr.acquire(v(0)).unwrap();
    mgr.write(v(0), 1024, &[1; 512], true).unwrap();
    mgr.delete(v(0)).unwrap();
    let stop = AtomicBool::new(false);
    assert!(mgr.resync(v(0), 64, &stop, |_| {}).unwrap().done);

    let modes: Vec<Mode> = replay(&log.bytes())
        .unwrap()
        .records
        .iter()
        .filter_map(|r| match r {
            JournalRecord::LuMode { vlu, entry } if *vlu == v(0) => Some(entry.mode),
            _ => None,
        })
        .collect();
    assert_eq!(
        modes,
        [
            Mode::Synchronized,
            Mode::Snapshot,
            Mode::Resynchronizing,
            Mode::Synchronized
        ]
    );
}

/// A failed Mode Select during acquire rolls the host back to Synchronized: writes are
/// not recorded and a later acquire can succeed.
#[test]
fn e1_acquire_rolls_back_when_mode_select_fails() {
    let mut mock = MockBackend::new();
    mock_e1(&mut mock, Mode::Synchronized);
    let mut seq = Sequence::new();
    mock.expect_mode_select()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Err(BackendError::new(BackendErrorKind::NotReady, "array busy")));
    mock.expect_mode_select()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(()));
    mock.expect_write().returning(|_, _, _, _| Ok(()));
    let mgr = SnapshotManager::open(mock, vec![e1_pair()], Arc::new(NoLog), None).unwrap();
    let err = mgr.acquire(v(0)).unwrap_err();
    assert!(
        matches!(
            err,
            ManagerError::Backend {
                op: "Mode Select",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(mgr.mode(v(0)), Mode::Synchronized);
    assert_eq!(mgr.mode(v(1)), Mode::Undefined);
    mgr.write(v(0), 0, &[1; 512], false).unwrap();
    assert!(mgr.update_location_table(v(0)).unwrap().is_empty());
    mgr.acquire(v(0)).unwrap();
    assert_eq!(mgr.mode(v(0)), Mode::Snapshot);
}

/// [0027], [0031]: the preconditions are typed errors that name what was found.
#[test]
fn preconditions_are_clear_errors() {
    let mut mock = MockBackend::new();
    mock_e1(&mut mock, Mode::Synchronized);
    mock.expect_mode_select().returning(|_, _| Ok(()));
    let mgr = SnapshotManager::open(mock, vec![e1_pair()], Arc::new(NoLog), None).unwrap();
    let err = mgr.delete(v(0)).unwrap_err();
    assert!(matches!(
        err,
        ManagerError::NotSnapshot {
            found: Mode::Synchronized,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        "cannot delete the snapshot of virtual LU 0: it is Synchronized, expected Snapshot"
    );
    mgr.acquire(v(0)).unwrap();
    let err = mgr.acquire(v(0)).unwrap_err();
    assert!(matches!(
        err,
        ManagerError::NotSynchronized {
            found: Mode::Snapshot,
            ..
        }
    ));
    let err = mgr.acquire(v(1)).unwrap_err();
    assert!(matches!(err, ManagerError::NotAnOrigin(_)), "{err}");
    let err = mgr.acquire(v(9)).unwrap_err();
    assert!(matches!(err, ManagerError::UnknownVirtualLu(_)), "{err}");
    let err = mgr.resync_step(v(0), 8).unwrap_err();
    assert!(
        matches!(err, ManagerError::NotResynchronizing { .. }),
        "{err}"
    );
    let mut buf = [0u8; 512];
    let err = mgr.read(v(0), 64 * 512 - 256, &mut buf).unwrap_err();
    assert!(matches!(err, ManagerError::OutOfRange { .. }), "{err}");
    assert_eq!(err.errno(), hvm_core::backend::errno::EINVAL);
}

/// A malformed Mode Sense page is an error at start-up, never a panic.
#[test]
fn malformed_mode_sense_page() {
    for (page, want) in [
        (
            vec![0u8],
            PageError::Length {
                expected: 2,
                found: 1,
            },
        ),
        (vec![0x3f, 0], PageError::PageCode { found: 0x3f }),
        (vec![0, 7], PageError::ModeCode { found: 7 }),
    ] {
        let mut mock = MockBackend::new();
        mock.expect_describe().returning(|| {
            Ok(BackendDescription {
                lus: vec![
                    LuInfo {
                        id: LuId(1),
                        capacity_lbas: 8,
                    },
                    LuInfo {
                        id: LuId(4),
                        capacity_lbas: 8,
                    },
                ],
                mirroring: vec![],
                capabilities: Capabilities {
                    mode_select: true,
                    ..Default::default()
                },
            })
        });
        mock.expect_mode_sense()
            .returning(move |_| Ok(page.clone()));
        let err = SnapshotManager::open(mock, vec![e1_pair()], Arc::new(NoLog), None).unwrap_err();
        match err {
            ManagerError::Page { lu, source } => {
                assert_eq!(lu, LuId(1));
                assert_eq!(source, want);
            }
            other => panic!("expected a page error, got {other}"),
        }
    }
}

/// A write that fails in Re-synchronizing may have reached one leg only; its LBAs go back
/// into the update-location table so resync still makes the legs equal.
#[test]
fn failed_write_while_resynchronizing_stays_recorded() {
    for kind in [common::Kind::E1, common::Kind::E2] {
        let s = common::setup(kind, 32, false);
        let o = common::ORIGIN;
        s.mgr.acquire(o).unwrap();
        s.mgr.write(o, 0, &[1; 8 * 512], false).unwrap();
        s.mgr.delete(o).unwrap();
        s.array.fail_next_writes(1);
        let err = s.mgr.write(o, 2048, &[2; 1024], false).unwrap_err();
        assert_eq!(err.errno(), hvm_core::backend::errno::EIO);
        let t = s.mgr.update_location_table(o).unwrap();
        assert!(
            t.covers(hvm_core::Extent::new(4, 5).unwrap()),
            "{kind:?}: {t:?}"
        );
        let stop = AtomicBool::new(false);
        assert!(s.mgr.resync(o, 8, &stop, |_| {}).unwrap().done);
        assert_eq!(
            s.array.leg(s.origin_leg),
            s.array.leg(s.mate_legs[0]),
            "{kind:?}"
        );
    }
}

/// E4: when the save area fills up the snapshot is invalidated and the database's writes
/// go on; deleting the snapshot and acquiring a new one works.
#[test]
fn e4_save_area_full_invalidates_snapshot_not_writes() {
    let array = Arc::new(common::array(common::Kind::E4, 64, 4, false));
    let s = common::setup_on(common::Kind::E4, array);
    let o = common::ORIGIN;
    s.mgr.acquire(o).unwrap();
    s.mgr.write(o, 0, &[1; 4 * 512], false).unwrap();
    assert_eq!(s.mgr.save_area_used(o).unwrap(), Some(4));
    s.mgr.write(o, 8 * 512, &[2; 512], false).unwrap();
    let mut buf = [0u8; 512];
    let err = s.mgr.read(v(1), 0, &mut buf).unwrap_err();
    assert!(matches!(err, ManagerError::SnapshotInvalidated(_)), "{err}");
    s.mgr.read(o, 8 * 512, &mut buf).unwrap();
    assert_eq!(buf, [2; 512]);
    s.mgr.delete(o).unwrap();
    s.mgr.acquire(o).unwrap();
    s.mgr.write(o, 0, &[3; 512], false).unwrap();
    s.mgr.read(v(1), 0, &mut buf).unwrap();
    assert_eq!(buf, [1; 512]);
}

/// [0077]: with the snapshot acquired, the backup's reads of unchanged data go to the mate
/// leg only; the database keeps using the mirroring LU.
#[test]
fn e4_snapshot_reads_of_unchanged_data_go_to_the_mate() {
    let s = common::setup(common::Kind::E4, 32, false);
    let o = common::ORIGIN;
    s.mgr.write(o, 0, &[5; 32 * 512], false).unwrap();
    s.mgr.acquire(o).unwrap();
    let before = s
        .array
        .counters
        .reads
        .load(std::sync::atomic::Ordering::SeqCst);
    let mut buf = vec![0u8; 32 * 512];
    s.mgr.read(v(1), 0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 5));
    // One read, of LU 1 (the mate), and nothing copied to the save area.
    assert_eq!(
        s.array
            .counters
            .reads
            .load(std::sync::atomic::Ordering::SeqCst),
        before + 1
    );
    assert_eq!(s.mgr.save_area_used(o).unwrap(), Some(0));
    assert_eq!(s.mgr.lu_mode_table().get(v(1)).unwrap().read, Some(LuId(1)));
}

/// A hold (a move under way) refuses acquire with its reason, only while it lasts; it can
/// only be taken on a Synchronized pair. `quiesced` runs with no I/O in flight and
/// returns what its closure returns; `pair_layout` names the pair's row and size.
#[test]
fn a_hold_refuses_acquire_and_is_taken_only_in_synchronized() {
    use common::{setup, Kind};
    let s = setup(Kind::E2, 64, false);
    let origin = s.pair.origin;
    s.mgr
        .hold(origin, Some("db is moving to legs0:0".into()))
        .unwrap();
    let e = s.mgr.acquire(origin).unwrap_err();
    assert!(matches!(e, ManagerError::Held { .. }), "{e}");
    assert!(e.to_string().ends_with("db is moving to legs0:0"), "{e}");
    s.mgr.write(origin, 0, &[7u8; 512], false).unwrap();
    assert_eq!(s.mgr.quiesced(origin, || 42).unwrap(), 42);
    s.mgr.hold(origin, None).unwrap();
    s.mgr.acquire(origin).unwrap();
    let e = s.mgr.hold(origin, Some("x".into())).unwrap_err();
    assert!(matches!(e, ManagerError::NotSynchronized { .. }), "{e}");
    let (def, lbas, save) = s.mgr.pair_layout(origin).unwrap();
    assert_eq!((def, lbas, save), (s.pair.definition.clone(), 64, None));
}

/// Rollback makes the origin equal to its snapshot on every array kind: data written
/// after the acquire is undone, the pair ends Synchronized (after the resync for E1 and
/// E2) and the legs are equal again.
#[test]
fn rollback_undoes_the_writes_since_the_snapshot_on_every_kind() {
    use common::{pattern, setup, Kind};
    use std::sync::atomic::AtomicBool;
    for kind in [Kind::E1, Kind::E1Triple, Kind::E2, Kind::E4] {
        let s = setup(kind, 256, false);
        let origin = s.pair.origin;
        let before = pattern(1, 256 * 512);
        s.mgr.write(origin, 0, &before, false).unwrap();
        s.mgr.acquire(origin).unwrap();
        s.mgr
            .write(origin, 512 * 10, &pattern(2, 512 * 20), false)
            .unwrap();
        s.mgr
            .write(origin, 512 * 200 + 7, &pattern(3, 1000), false)
            .unwrap();
        let e = s.mgr.rollback(s.pair.snapshots[0]).unwrap_err();
        assert!(matches!(e, ManagerError::NotAnOrigin(_)), "{kind:?}: {e}");
        let blocks = s.mgr.rollback(origin).unwrap();
        assert!(blocks >= 22, "{kind:?}: {blocks} blocks");
        let stop = AtomicBool::new(false);
        if s.mgr.mode(origin) == Mode::Resynchronizing {
            assert!(s.mgr.resync(origin, 64, &stop, |_| {}).unwrap().done);
        }
        assert_eq!(s.mgr.mode(origin), Mode::Synchronized, "{kind:?}");
        let mut now = vec![0u8; 256 * 512];
        s.mgr.read(origin, 0, &mut now).unwrap();
        assert!(
            now == before,
            "{kind:?}: the origin is not the snapshot's data"
        );
        let leg = s.array.leg(s.origin_leg);
        for mate in &s.mate_legs {
            assert!(s.array.leg(*mate) == leg, "{kind:?}: legs differ");
        }
        let e = s.mgr.rollback(origin).unwrap_err();
        assert!(
            matches!(e, ManagerError::NotSnapshot { .. }),
            "{kind:?}: {e}"
        );
    }
}

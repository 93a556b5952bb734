//! Each snapshot strategy as a state machine against the patent's rules: random sequences
//! of acquire, delete, write, read and resync steps on an in-memory array, checking after
//! every step the LU mode table rows (Fig. 10, [0022], [0055], [0060]-[0061], [0072]), the
//! update-location table (Fig. 5), what every virtual LU reads, and the physical legs:
//! outside the recorded LBAs the legs never differ, and when resync completes they are
//! identical byte for byte.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{pattern, setup, setup_on, Kind, Setup, ORIGIN};
use hvm_core::journal::{replay, Tail};
use hvm_core::router::RouteError;
use hvm_core::{
    Extent, LuId, LuModeEntry, ManagerError, MirrorDefinition, Mode, SnapshotManager, VirtualLuId,
    SECTOR_SIZE,
};
use proptest::prelude::*;

const CAP_LBAS: u64 = 48;
const CAP: u64 = CAP_LBAS * SECTOR_SIZE;

#[derive(Clone, Debug)]
enum Op {
    Acquire,
    Delete,
    /// Write to virtual LU `vlu` (0 = origin, 1.. = snapshots).
    Write {
        vlu: u32,
        offset: u64,
        len: u64,
        seed: u64,
    },
    Read {
        vlu: u32,
        offset: u64,
        len: u64,
    },
    ResyncStep {
        max: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..CAP, 1u64..1600).prop_map(|(o, l)| (o, l.min(CAP - o)));
    prop_oneof![
        1 => Just(Op::Acquire),
        1 => Just(Op::Delete),
        6 => (0u32..3, range.clone(), any::<u64>())
            .prop_map(|(vlu, (offset, len), seed)| Op::Write { vlu, offset, len, seed }),
        2 => (0u32..3, range).prop_map(|(vlu, (offset, len))| Op::Read { vlu, offset, len }),
        3 => (1u64..12).prop_map(|max| Op::ResyncStep { max }),
    ]
}

struct Model {
    mode: Mode,
    origin: Vec<u8>,
    snaps: Vec<Vec<u8>>,
    dirty: BTreeSet<u64>,
}

fn lbas(t: &hvm_core::UpdateLocationTable) -> BTreeSet<u64> {
    t.iter().flat_map(|e| e.first()..=e.last()).collect()
}

/// The LU mode table rows the patent prescribes for the pair in `mode`, written out
/// independently of the manager's code.
fn expected_rows(kind: Kind, mode: Mode) -> Vec<(VirtualLuId, LuModeEntry)> {
    let v = VirtualLuId;
    let both = |lu, m| LuModeEntry::both(LuId(lu), m);
    let undef = LuModeEntry::UNDEFINED;
    match (kind, mode) {
        // [0022], [0028], [0031]: E1 keeps the real LU; the mate is reachable only in Snapshot.
        (Kind::E1, Mode::Snapshot) => vec![(v(0), both(1, mode)), (v(1), both(4, mode))],
        (Kind::E1, _) => vec![(v(0), both(1, mode)), (v(1), undef)],
        (Kind::E1Triple, Mode::Snapshot) => vec![
            (v(0), both(1, mode)),
            (v(1), both(4, mode)),
            (v(2), both(5, mode)),
        ],
        (Kind::E1Triple, _) => vec![(v(0), both(1, mode)), (v(1), undef), (v(2), undef)],
        // [0055], [0060], [0061].
        (Kind::E2, Mode::Synchronized) => vec![(v(0), both(0, mode)), (v(1), undef)],
        (Kind::E2, Mode::Snapshot) => vec![(v(0), both(1, mode)), (v(1), both(2, mode))],
        (Kind::E2, _) => vec![
            (
                v(0),
                LuModeEntry {
                    read: Some(LuId(1)),
                    write: Some(LuId(0)),
                    mode,
                },
            ),
            (v(1), undef),
        ],
        // [0072]-[0077]: the database always uses the mirroring LU; the snapshot reads the
        // mate and is read-only.
        (Kind::E4, Mode::Snapshot) => vec![
            (v(0), both(0, mode)),
            (
                v(1),
                LuModeEntry {
                    read: Some(LuId(1)),
                    write: None,
                    mode,
                },
            ),
        ],
        (Kind::E4, _) => vec![(v(0), both(0, mode)), (v(1), undef)],
    }
}

fn sectors(offset: u64, len: u64) -> impl Iterator<Item = u64> {
    let e = Extent::covering_bytes(offset, len).expect("non-empty");
    e.first()..=e.last()
}

fn check_invariants(s: &Setup, m: &Model) -> Result<(), TestCaseError> {
    let n_snaps = s.pair.snapshots.len();
    // LU mode table.
    let table = s.mgr.lu_mode_table();
    let rows: Vec<_> = table.iter().collect();
    prop_assert_eq!(rows, expected_rows(s.kind, m.mode));
    // Update-location table.
    let ult = s.mgr.update_location_table(ORIGIN).unwrap();
    prop_assert_eq!(&lbas(&ult), &m.dirty, "update-location table");
    if m.mode == Mode::Synchronized {
        prop_assert!(ult.is_empty());
    }
    // What the virtual LUs read.
    let mut buf = vec![0u8; CAP as usize];
    s.mgr.read(ORIGIN, 0, &mut buf).unwrap();
    prop_assert!(buf == m.origin, "origin virtual LU differs from the model");
    for i in 0..n_snaps {
        let vlu = VirtualLuId(i as u32 + 1);
        let r = s.mgr.read(vlu, 0, &mut buf);
        if m.mode == Mode::Snapshot {
            r.unwrap();
            prop_assert!(buf == m.snaps[i], "snapshot {} differs from the model", i);
        } else {
            let undefined = matches!(r, Err(ManagerError::Route(RouteError::Undefined(_))));
            prop_assert!(undefined, "snapshot readable in {}", m.mode);
        }
    }
    // The legs: the origin leg holds the origin's data; outside the recorded LBAs every
    // mate equals it; Synchronized means identical.
    let origin_leg = s.array.leg(s.origin_leg);
    prop_assert!(origin_leg == m.origin, "origin leg differs from the model");
    for mate in &s.mate_legs {
        let leg = s.array.leg(*mate);
        for lba in 0..CAP_LBAS {
            let r = (lba * SECTOR_SIZE) as usize..((lba + 1) * SECTOR_SIZE) as usize;
            if leg[r.clone()] != origin_leg[r] {
                prop_assert!(
                    m.dirty.contains(&lba),
                    "{} differs from the origin at LBA {} which is not recorded (mode {})",
                    mate,
                    lba,
                    m.mode
                );
            }
        }
        if m.mode == Mode::Synchronized {
            prop_assert!(leg == origin_leg);
        }
    }
    // The array's own mode follows the host's (E1).
    if matches!(s.kind, Kind::E1 | Kind::E1Triple) {
        prop_assert_eq!(s.array.array_mode(LuId(1)), Some(m.mode));
    }
    Ok(())
}

fn run(kind: Kind, array_copy: bool, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let s = setup(kind, CAP_LBAS, array_copy);
    let n_snaps = s.pair.snapshots.len();
    let mut m = Model {
        mode: Mode::Synchronized,
        origin: vec![0; CAP as usize],
        snaps: vec![vec![0; CAP as usize]; n_snaps],
        dirty: BTreeSet::new(),
    };
    check_invariants(&s, &m)?;
    for op in ops {
        match op {
            Op::Acquire => {
                let r = s.mgr.acquire(ORIGIN);
                if m.mode == Mode::Synchronized {
                    r.unwrap();
                    m.mode = Mode::Snapshot;
                    m.snaps = vec![m.origin.clone(); n_snaps];
                    m.dirty.clear();
                } else {
                    let ok = matches!(r, Err(ManagerError::NotSynchronized { found, .. }) if found == m.mode);
                    prop_assert!(ok, "acquire in {}", m.mode);
                }
            }
            Op::Delete => {
                let r = s.mgr.delete(ORIGIN);
                if m.mode == Mode::Snapshot {
                    r.unwrap();
                    if kind == Kind::E4 {
                        m.mode = Mode::Synchronized;
                        m.dirty.clear();
                    } else {
                        m.mode = Mode::Resynchronizing;
                    }
                } else {
                    let ok = matches!(r, Err(ManagerError::NotSnapshot { found, .. }) if found == m.mode);
                    prop_assert!(ok, "delete in {}", m.mode);
                }
            }
            Op::Write {
                vlu,
                offset,
                len,
                seed,
            } => {
                let data = pattern(seed, len as usize);
                let vlu_id = VirtualLuId(vlu);
                let r = s.mgr.write(vlu_id, offset, &data, seed % 2 == 0);
                let range = offset as usize..(offset + len) as usize;
                if vlu == 0 {
                    r.unwrap();
                    m.origin[range].copy_from_slice(&data);
                    match m.mode {
                        Mode::Snapshot => m.dirty.extend(sectors(offset, len)),
                        Mode::Resynchronizing => {
                            for l in sectors(offset, len) {
                                m.dirty.remove(&l);
                            }
                        }
                        _ => {}
                    }
                } else if (vlu as usize) > n_snaps {
                    let ok = matches!(r, Err(ManagerError::UnknownVirtualLu(_)));
                    prop_assert!(ok);
                } else if m.mode != Mode::Snapshot {
                    let ok = matches!(r, Err(ManagerError::Route(RouteError::Undefined(_))));
                    prop_assert!(ok, "write to snapshot in {}", m.mode);
                } else if kind == Kind::E4 {
                    let ok = matches!(r, Err(ManagerError::Route(RouteError::ReadOnly(..))));
                    prop_assert!(ok, "E4 snapshot must be read-only");
                } else {
                    // A writable snapshot: recorded so resync undoes it.
                    r.unwrap();
                    m.snaps[vlu as usize - 1][range].copy_from_slice(&data);
                    m.dirty.extend(sectors(offset, len));
                }
            }
            Op::Read { vlu, offset, len } => {
                let mut buf = vec![0u8; len as usize];
                let r = s.mgr.read(VirtualLuId(vlu), offset, &mut buf);
                let range = offset as usize..(offset + len) as usize;
                if vlu == 0 {
                    r.unwrap();
                    prop_assert!(buf[..] == m.origin[range]);
                } else if (vlu as usize) <= n_snaps && m.mode == Mode::Snapshot {
                    r.unwrap();
                    prop_assert!(buf[..] == m.snaps[vlu as usize - 1][range]);
                } else {
                    prop_assert!(r.is_err());
                }
            }
            Op::ResyncStep { max } => {
                let r = s.mgr.resync_step(ORIGIN, max);
                match m.mode {
                    Mode::Resynchronizing => {
                        let p = r.unwrap();
                        let now = lbas(&s.mgr.update_location_table(ORIGIN).unwrap());
                        prop_assert!(now.is_subset(&m.dirty), "resync added LBAs");
                        prop_assert!(m.dirty.len() - now.len() <= max as usize);
                        m.dirty = now;
                        prop_assert_eq!(p.remaining, m.dirty.len() as u64);
                        if p.done {
                            prop_assert!(m.dirty.is_empty());
                            m.mode = Mode::Synchronized;
                        }
                    }
                    Mode::Synchronized => prop_assert!(r.unwrap().done),
                    _ => {
                        let ok = matches!(r, Err(ManagerError::NotResynchronizing { .. }));
                        prop_assert!(ok);
                    }
                }
            }
        }
        check_invariants(&s, &m)?;
    }

    // Finish: delete any snapshot, resync to the end; the legs are then identical.
    if m.mode == Mode::Snapshot {
        s.mgr.delete(ORIGIN).unwrap();
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let p = s.mgr.resync(ORIGIN, 7, &stop, |_| {}).unwrap();
    prop_assert!(p.done);
    let origin_leg = s.array.leg(s.origin_leg);
    for mate in &s.mate_legs {
        prop_assert!(
            s.array.leg(*mate) == origin_leg,
            "{} differs after resync",
            mate
        );
    }

    // The journal replays to the manager's tables, and a manager reopened on it (a host
    // restart) has the same state.
    let replayed = replay(&s.log.bytes()).unwrap();
    prop_assert_eq!(replayed.tail, Tail::Clean);
    let table = s.mgr.lu_mode_table();
    prop_assert_eq!(&replayed.state.lu_mode, &table);
    let ult = s.mgr.update_location_table(ORIGIN).unwrap();
    prop_assert_eq!(
        replayed
            .state
            .tables
            .get(&ORIGIN)
            .cloned()
            .unwrap_or_default(),
        ult
    );
    let reopened = SnapshotManager::open(
        s.array.clone(),
        vec![s.pair.clone()],
        Arc::new(hvm_core::journal::NoLog),
        Some(&replayed.state),
    )
    .unwrap();
    prop_assert_eq!(reopened.lu_mode_table(), table);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn e1_mode_select(ops in prop::collection::vec(op(), 1..40)) {
        run(Kind::E1, false, ops)?;
    }

    #[test]
    fn e1_mode_select_array_copy(ops in prop::collection::vec(op(), 1..40)) {
        run(Kind::E1, true, ops)?;
    }

    #[test]
    fn e1_triple_mirror(ops in prop::collection::vec(op(), 1..40)) {
        run(Kind::E1Triple, false, ops)?;
    }

    #[test]
    fn e2_virtual_lu_routing(ops in prop::collection::vec(op(), 1..40)) {
        run(Kind::E2, false, ops)?;
    }

    #[test]
    fn e2_virtual_lu_routing_array_copy(ops in prop::collection::vec(op(), 1..40)) {
        run(Kind::E2, true, ops)?;
    }

    #[test]
    fn e4_copy_on_write(ops in prop::collection::vec(op(), 1..40)) {
        run(Kind::E4, false, ops)?;
    }
}

/// The restarted manager of the state machine test reuses the journal; here the whole
/// set-up is reopened after a crash in Snapshot mode with writes recorded.
#[test]
fn restart_in_snapshot_keeps_recorded_ranges() {
    for kind in [Kind::E1, Kind::E2, Kind::E4] {
        let s = setup(kind, CAP_LBAS, false);
        s.mgr.acquire(ORIGIN).unwrap();
        s.mgr.write(ORIGIN, 1000, &[7; 3000], false).unwrap();
        let before = s.mgr.update_location_table(ORIGIN).unwrap();
        let state = replay(&s.log.bytes()).unwrap().state;
        let array = s.array.clone();
        drop(s);
        let again = setup_on(kind, array.clone());
        // setup_on opens without a journal: E1 trusts the array's mode and, knowing
        // nothing else, marks everything ([0045]); E2/E4 fall back to [0055].
        if kind == Kind::E1 {
            assert_eq!(again.mgr.mode(ORIGIN), Mode::Snapshot);
            assert_eq!(
                again.mgr.update_location_table(ORIGIN).unwrap().total(),
                CAP_LBAS
            );
        }
        drop(again);
        let pair = common::pair_config(kind);
        let mgr = SnapshotManager::open(
            array.clone(),
            vec![pair],
            Arc::new(hvm_core::journal::NoLog),
            Some(&state),
        )
        .unwrap();
        assert_eq!(mgr.mode(ORIGIN), Mode::Snapshot, "{kind:?}");
        assert_eq!(
            mgr.update_location_table(ORIGIN).unwrap(),
            before,
            "{kind:?}"
        );
        if kind == Kind::E4 {
            // The save map came back too: the snapshot still reads the old zeros.
            let mut buf = vec![1u8; 3000];
            mgr.read(VirtualLuId(1), 1000, &mut buf).unwrap();
            assert!(buf.iter().all(|b| *b == 0));
        } else {
            mgr.delete(ORIGIN).unwrap();
            let stop = std::sync::atomic::AtomicBool::new(false);
            assert!(mgr.resync(ORIGIN, 16, &stop, |_| {}).unwrap().done);
            let (o, mates) = common::legs(kind);
            assert_eq!(array.leg(mates[0]), array.leg(o));
        }
    }
}

/// A journal written for another pair (the config's virtual LUs reordered or remapped)
/// is refused rather than routing the LU to the wrong array LUs.
#[test]
fn a_journal_of_another_pair_is_refused() {
    let s = setup(Kind::E2, CAP_LBAS, false);
    s.mgr.acquire(ORIGIN).unwrap();
    s.mgr.write(ORIGIN, 0, &[1; 512], false).unwrap();
    let state = replay(&s.log.bytes()).unwrap().state;
    let array = s.array.clone();
    drop(s);
    let mut other = common::pair_config(Kind::E2);
    let MirrorDefinition::Triple { origin, mate, .. } = &mut other.definition else {
        panic!("E2 uses triples");
    };
    std::mem::swap(origin, mate);
    let err = SnapshotManager::open(
        array,
        vec![other],
        Arc::new(hvm_core::journal::NoLog),
        Some(&state),
    )
    .unwrap_err();
    assert!(
        matches!(err, ManagerError::Config { .. }) && err.to_string().contains("journal"),
        "{err}"
    );
}

#[test]
fn definitions_are_checked_against_the_array() {
    let array = Arc::new(common::array(Kind::E2, 8, 8, false));
    let mut bad = common::pair_config(Kind::E2);
    bad.definition = MirrorDefinition::Managed {
        lu: LuId(1),
        mates: vec![LuId(2)],
    };
    let err = SnapshotManager::open(
        array.clone(),
        vec![bad],
        Arc::new(hvm_core::journal::NoLog),
        None,
    )
    .unwrap_err();
    assert!(matches!(err, ManagerError::Strategy(_)), "{err}");
    let mut bad = common::pair_config(Kind::E2);
    bad.snapshots.push(VirtualLuId(7));
    let err = SnapshotManager::open(array, vec![bad], Arc::new(hvm_core::journal::NoLog), None)
        .unwrap_err();
    assert!(err.to_string().contains("expected 1"), "{err}");
}

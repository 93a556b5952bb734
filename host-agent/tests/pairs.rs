//! Issue 22: a virtual LU on a pair of EP 1 058 190 (`hvm_host_agent::pairs`). The pair's
//! user volume is the origin, the split secondary the snapshot; the array splits and
//! resyncs with its difference bitmap, and copies the snapshot to its backup device by
//! itself ([0029]-[0030]) while the origin is written through the snapshot manager.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use array_sim::client::ArrayClient;
use array_sim::config::ArrayConfig;
use array_sim::engine::Engine;
use array_sim::tape::Tape;
use hvm_core::array_backup::{BackupOp, BackupReply, PairState};
use hvm_core::backend::Backend;
use hvm_core::journal::NoLog;
use hvm_core::{LuId, MirrorDefinition, Mode, PairConfig, SnapshotManager, VirtualLuId};
use hvm_host_agent::pairs;

const BLOCKS: u64 = 4096;
const BS: usize = 512;

fn array(dir: &std::path::Path) -> Arc<dyn Backend> {
    let yaml = format!(
        "kind: mode-select
disks: [{{name: d0}}, {{name: d1}}]
lus:
  - {{lun: 10, blocks: {BLOCKS}, disk: d0}}
  - {{lun: 11, blocks: {BLOCKS}, disk: d1}}
backup:
  blocks_per_bit: 8
  devices: [{{name: tape0, file: tape0.rec}}]
"
    );
    let cfg = ArrayConfig::parse(&yaml, "pairs.yaml").unwrap();
    Arc::new(ArrayClient::new(Arc::new(
        Engine::open(&cfg, Some(dir)).unwrap(),
    )))
}

fn pair_state(b: &dyn Backend) -> (PairState, u64) {
    match b.backup(&BackupOp::PairStatus { lu: 10 }).unwrap() {
        BackupReply::Pair(p) => (p.state, p.diff_units),
        r => panic!("{r:?}"),
    }
}

fn counters(b: &dyn Backend) -> hvm_core::array_backup::ArrayCounters {
    match b.backup(&BackupOp::Counters).unwrap() {
        BackupReply::Counters(c) => c,
        r => panic!("{r:?}"),
    }
}

#[test]
fn a_virtual_lu_on_a_pair_snapshots_by_split_and_backs_up_by_ccopy() {
    let dir = tempfile::tempdir().unwrap();
    let raw = array(dir.path());
    raw.backup(&BackupOp::PairCreate {
        primary: 10,
        secondary: 11,
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pair_state(&*raw).0 != PairState::Duplex {
        assert!(Instant::now() < deadline, "the pair never became duplex");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Without the wrapper the array reports no mirroring definition for LU 10: the
    // error the agent gave ("no mirroring definition whose primary LU is 10").
    assert!(raw.describe().unwrap().mirroring.is_empty());
    let b = pairs::wrap(raw.clone());
    let want = MirrorDefinition::Managed {
        lu: LuId(10),
        mates: vec![LuId(11)],
    };
    assert_eq!(b.describe().unwrap().mirroring, vec![want.clone()]);
    let pair = PairConfig {
        origin: VirtualLuId(0),
        snapshots: vec![VirtualLuId(1)],
        definition: want,
        save_area: None,
    };
    let mgr = SnapshotManager::open(b.clone(), vec![pair], Arc::new(NoLog), None).unwrap();
    let (o, s) = (VirtualLuId(0), VirtualLuId(1));
    assert_eq!(mgr.mode(o), Mode::Synchronized);
    mgr.write(o, 0, &vec![1u8; BLOCKS as usize * BS], false)
        .unwrap();
    mgr.acquire(o).unwrap();
    assert_eq!(
        pair_state(&*raw).0,
        PairState::Split,
        "the snapshot is the array's split"
    );
    mgr.write(o, 4096, &[2u8; 8192], false).unwrap();
    let mut snap = vec![0u8; BLOCKS as usize * BS];
    mgr.read(s, 0, &mut snap).unwrap();
    assert!(snap.iter().all(|x| *x == 1), "the snapshot moved");
    // The array copies the snapshot to its device: no host reads it.
    let before = counters(&*raw);
    let job = pairs::ccopy_snapshot(&*b, LuId(11), BLOCKS, "tape0").unwrap();
    assert_eq!(job.done_blocks, BLOCKS);
    let after = counters(&*raw);
    assert_eq!(after.host_read_bytes, before.host_read_bytes);
    assert_eq!(after.device_bytes - before.device_bytes, BLOCKS * BS as u64);
    let out = dir.path().join("restored");
    let mut f = std::fs::File::create(&out).unwrap();
    Tape::open(&dir.path().join("tape0.rec"))
        .unwrap()
        .restore(&mut f)
        .unwrap();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        snap,
        "the medium is the snapshot"
    );
    // Delete: the array resyncs the marked units only ([0031]).
    let marked = pair_state(&*raw).1;
    assert_eq!(marked, 2, "8 KiB at 4 KiB touch two 4 KiB units");
    mgr.delete(o).unwrap();
    let p = mgr
        .resync(o, 1024, &AtomicBool::new(false), |_| {})
        .unwrap();
    assert!(p.done, "{p:?}");
    assert_eq!(mgr.mode(o), Mode::Synchronized);
    assert_eq!(pair_state(&*raw), (PairState::Duplex, 0));
    let (mut x, mut y) = (
        vec![0u8; BLOCKS as usize * BS],
        vec![0u8; BLOCKS as usize * BS],
    );
    raw.read(LuId(10), 0, &mut x).unwrap();
    raw.read(LuId(11), 0, &mut y).unwrap();
    assert!(x == y && x[4096..12288].iter().all(|v| *v == 2));
}

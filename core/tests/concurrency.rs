//! Writes racing the resync (Fig. 7, step 1004): several threads write random byte ranges
//! while resync steps run, over many seeds and every strategy that resyncs. At the end
//! the origin and every mate are identical byte for byte and no written byte was lost.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};

use common::{pattern, setup, Delayed, Kind, ORIGIN};
use hvm_core::journal::NoLog;
use hvm_core::{Mode, SnapshotManager, SECTOR_SIZE};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CAP_LBAS: u64 = 1024;
const STRIPE_LBAS: u64 = 16;
const WRITERS: u64 = 3;
const WRITES_PER_THREAD: usize = 150;

/// Thread `t` owns the stripes `s` with `s % WRITERS == t`; its writes stay inside one
/// stripe, so each byte's final value is known from that thread's own history.
fn random_write(rng: &mut StdRng, t: u64) -> (u64, usize) {
    let stripes = CAP_LBAS / STRIPE_LBAS;
    let stripe = rng.gen_range(0..stripes / WRITERS) * WRITERS + t;
    let start = stripe * STRIPE_LBAS * SECTOR_SIZE;
    let size = STRIPE_LBAS * SECTOR_SIZE;
    let off = rng.gen_range(0..size);
    let len = rng.gen_range(1..=(size - off).min(3 * SECTOR_SIZE));
    (start + off, len as usize)
}

struct Race {
    mgr: SnapshotManager<Delayed<Arc<hvm_core::mem_array::MemArray>>>,
}

fn race(kind: Kind, array_copy: bool, seed: u64) {
    let array = Arc::new(common::array(kind, CAP_LBAS, CAP_LBAS, array_copy));
    let (origin_leg, mate_legs) = common::legs(kind);
    let mgr = SnapshotManager::open(
        Delayed::new(array.clone(), seed),
        vec![common::pair_config(kind)],
        Arc::new(NoLog),
        None,
    )
    .unwrap();
    let s = Arc::new(Race { mgr });
    let cap = (CAP_LBAS * SECTOR_SIZE) as usize;
    let mut expected = vec![0u8; cap];
    let mut rng = StdRng::seed_from_u64(seed);

    // Synchronized content, then a snapshot and many recorded writes.
    let base = pattern(seed, cap);
    s.mgr.write(ORIGIN, 0, &base, false).unwrap();
    expected.copy_from_slice(&base);
    s.mgr.acquire(ORIGIN).unwrap();
    for _ in 0..200 {
        let t = rng.gen_range(0..WRITERS);
        let (off, len) = random_write(&mut rng, t);
        let data = pattern(rng.gen(), len);
        s.mgr.write(ORIGIN, off, &data, false).unwrap();
        expected[off as usize..off as usize + len].copy_from_slice(&data);
    }
    s.mgr.delete(ORIGIN).unwrap();
    assert_eq!(s.mgr.mode(ORIGIN), Mode::Resynchronizing);

    // Writers and the resync start together.
    let start = Arc::new(Barrier::new(WRITERS as usize + 1));
    let writers_done = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..WRITERS)
        .map(|t| {
            let (s, start) = (s.clone(), start.clone());
            let mut rng = StdRng::seed_from_u64(seed * 1000 + t);
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                start.wait();
                for i in 0..WRITES_PER_THREAD {
                    let (off, len) = random_write(&mut rng, t);
                    let data = pattern(rng.gen(), len);
                    s.mgr.write(ORIGIN, off, &data, i % 5 == 0).unwrap();
                    mine.push((off, data));
                    if i % 16 == 0 {
                        std::thread::yield_now();
                    }
                }
                mine
            })
        })
        .collect();
    let resync = {
        let (s, start, writers_done) = (s.clone(), start.clone(), writers_done.clone());
        let max = 1 + seed % 24;
        std::thread::spawn(move || {
            start.wait();
            loop {
                let p = s.mgr.resync_step(ORIGIN, max).unwrap();
                // Keep stepping until the writers finish, so the race lasts the whole run;
                // the pair may already be Synchronized by then.
                if p.done && writers_done.load(Ordering::SeqCst) {
                    return p;
                }
            }
        })
    };
    for h in handles {
        for (off, data) in h.join().unwrap() {
            expected[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
    writers_done.store(true, Ordering::SeqCst);
    let p = resync.join().unwrap();
    assert!(p.done);
    assert_eq!(s.mgr.mode(ORIGIN), Mode::Synchronized);

    let origin = array.leg(origin_leg);
    let first_diff = origin.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "{kind:?} copy={array_copy} seed {seed}: a written byte was lost"
    );
    for mate in &mate_legs {
        let leg = array.leg(*mate);
        let first_diff = leg.iter().zip(&origin).position(|(a, b)| a != b);
        assert_eq!(
            first_diff, None,
            "{kind:?} copy={array_copy} seed {seed}: {mate} differs from the origin"
        );
    }
    let mut buf = vec![0u8; cap];
    s.mgr.read(ORIGIN, 0, &mut buf).unwrap();
    assert!(buf == expected);
}

#[test]
fn writes_race_resync_e1() {
    for seed in 0..30 {
        race(Kind::E1, false, seed);
    }
}

#[test]
fn writes_race_resync_e1_array_copy() {
    for seed in 0..30 {
        race(Kind::E1, true, seed);
    }
}

#[test]
fn writes_race_resync_e1_triple_mirror() {
    for seed in 0..20 {
        race(Kind::E1Triple, false, seed);
    }
}

#[test]
fn writes_race_resync_e2() {
    for seed in 0..30 {
        race(Kind::E2, false, seed);
    }
}

#[test]
fn writes_race_resync_e2_array_copy() {
    for seed in 0..30 {
        race(Kind::E2, true, seed);
    }
}

/// Writes that race an acquire: every write acknowledged before `acquire` returned is in
/// the snapshot, none acknowledged after it started is ([0027]-[0028]; the gate drains
/// in-flight I/O).
#[test]
fn writes_race_acquire_snapshot_instant_is_exact() {
    for kind in [Kind::E1, Kind::E2, Kind::E4] {
        for seed in 0..15 {
            let s = Arc::new(setup(kind, 64, false));
            let stop = Arc::new(AtomicBool::new(false));
            // Each thread writes its own LBA with an increasing counter.
            let handles: Vec<_> = (0..3u64)
                .map(|t| {
                    let (s, stop) = (s.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let mut acked = Vec::new();
                        let mut n = 1u64;
                        while !stop.load(Ordering::SeqCst) {
                            let before = std::time::Instant::now();
                            s.mgr
                                .write(ORIGIN, t * 512, &n.to_le_bytes(), false)
                                .unwrap();
                            acked.push((n, before, std::time::Instant::now()));
                            n += 1;
                        }
                        acked
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(1 + seed % 3));
            let t0 = std::time::Instant::now();
            s.mgr.acquire(ORIGIN).unwrap();
            let t1 = std::time::Instant::now();
            std::thread::sleep(std::time::Duration::from_millis(2));
            stop.store(true, Ordering::SeqCst);
            for (t, h) in handles.into_iter().enumerate() {
                let acked = h.join().unwrap();
                let mut buf = [0u8; 8];
                s.mgr
                    .read(hvm_core::VirtualLuId(1), t as u64 * 512, &mut buf)
                    .unwrap();
                let in_snap = u64::from_le_bytes(buf);
                // Acknowledged before acquire started: must be in the snapshot.
                let must = acked
                    .iter()
                    .filter(|(_, _, done)| *done < t0)
                    .map(|a| a.0)
                    .max()
                    .unwrap_or(0);
                // Started after acquire returned: must not be.
                let must_not = acked
                    .iter()
                    .filter(|(_, start, _)| *start > t1)
                    .map(|a| a.0)
                    .min();
                assert!(
                    in_snap >= must,
                    "{kind:?}: snapshot lost acknowledged write {must} (has {in_snap})"
                );
                if let Some(m) = must_not {
                    assert!(
                        in_snap < m,
                        "{kind:?}: snapshot has write {in_snap} issued after acquire"
                    );
                }
            }
        }
    }
}

#![allow(clippy::unwrap_used)]

//! The `read_distribution` switch (issue 20): `least-busy` (the default, [0077]) sends a
//! read of a mirroring LU to the leg whose disk has fewer I/Os outstanding; `alternate`
//! takes the legs in turn whatever their load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use array_sim::config::{ArrayConfig, ReadDistribution};
use array_sim::engine::{Engine, Outcome};
use array_sim::scsi::{Command, GOOD};

const BLOCKS: u64 = 256;

fn pre_update(distribution: &str, dir: &std::path::Path) -> Engine {
    let yaml = format!(
        "kind: pre-update
disks: [{{name: d0, iops: 2000}}, {{name: d1, iops: 2000}}]
lus:
  - {{lun: 0, blocks: {BLOCKS}, disk: d0}}
  - {{lun: 1, blocks: {BLOCKS}, disk: d1}}
mirroring:
  - {{mirror: 0, mate: 1}}
{distribution}"
    );
    let cfg = ArrayConfig::parse(&yaml, "test.yaml").unwrap();
    Engine::open(&cfg, Some(dir)).unwrap()
}

fn read(e: &Engine, lun: u8, lba: u64) {
    let cmd = Command::Read16 {
        lba,
        blocks: 1,
        fua: false,
    };
    match e.execute(lun, &cmd.encode(), &[]) {
        Outcome::Reply(r) => assert_eq!(r.status, GOOD, "read LU {lun}"),
        Outcome::Drop => panic!("connection dropped"),
    }
}

/// Database reads of the mirroring LU while four backup readers keep the mate's disk
/// busy: how many of `n` went to the busy leg (d1).
fn db_reads_on_busy_leg(distribution: &str, n: u64) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let e = Arc::new(pre_update(distribution, dir.path()));
    let stop = Arc::new(AtomicBool::new(false));
    let backups: Vec<_> = (0..4)
        .map(|_| {
            let (e, stop) = (e.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    read(&e, 1, 7);
                }
            })
        })
        .collect();
    // Until the backup readers are all queued on d1.
    while e.lu_disk_stats(1).unwrap().outstanding < 2 {
        std::thread::yield_now();
    }
    let idle_before = e.lu_disk_stats(0).unwrap().reads;
    for i in 0..n {
        read(&e, 0, i % BLOCKS);
    }
    stop.store(true, Ordering::SeqCst);
    for b in backups {
        b.join().unwrap();
    }
    let on_idle = e.lu_disk_stats(0).unwrap().reads - idle_before;
    n - on_idle
}

#[test]
fn the_switch_parses_and_defaults_to_least_busy() {
    let parse = |extra: &str| {
        let yaml = format!("kind: pre-update\ndisks: [{{name: d0}}]\nlus: []\n{extra}");
        ArrayConfig::parse(&yaml, "t.yaml").map(|c| c.read_distribution)
    };
    assert_eq!(parse("").unwrap(), ReadDistribution::LeastBusy);
    assert_eq!(
        parse("read_distribution: least-busy").unwrap(),
        ReadDistribution::LeastBusy
    );
    assert_eq!(
        parse("read_distribution: alternate").unwrap(),
        ReadDistribution::Alternate
    );
    let err = parse("read_distribution: random").unwrap_err().to_string();
    assert!(err.contains("read_distribution"), "{err}");
}

/// [0077] on: at most a fifth of the database's reads wait behind the backup.
#[test]
fn least_busy_keeps_database_reads_off_the_busy_leg() {
    let n = 200;
    let busy = db_reads_on_busy_leg("read_distribution: least-busy", n);
    assert!(
        busy * 5 <= n,
        "{busy} of {n} database reads went to the busy leg"
    );
}

/// [0077] off: the legs in turn, so half the database's reads queue behind the backup.
#[test]
fn alternate_sends_half_the_reads_to_the_busy_leg() {
    let n = 200;
    let busy = db_reads_on_busy_leg("read_distribution: alternate", n);
    assert!((n / 2 - 1..=n / 2 + 1).contains(&busy), "{busy} of {n}");
}

//! iSCSI legs benchmark: fio's nbd engine against an hvm virtual LU whose two legs are
//! LUNs of a tgtd target, and a direct libiscsi client of ours (hvm-scsi's iSCSI
//! transport, its asynchronous event thread with QD commands in flight, no hvm in
//! between) against one LUN of the same target, at the same queue depth, in one run.
//! `db` stays Synchronized (every write goes to both LUNs); `db2` is put in Snapshot
//! mode (writes go to the origin LUN only). Ratios are to the direct client.
//!
//! Run: `cargo bench -p hvm-tests --bench iscsi_legs` (needs fio, tgt, libiscsi).
//! `HVM_BENCH_SECONDS` sets the time per workload (default 5). Each target runs every
//! workload `HVM_BENCH_ROUNDS` times (default 3), taking turns, and the table shows the
//! medians, so load from other programs falls on every target alike.
#![allow(clippy::unwrap_used)] // a benchmark: a failed unwrap is a failed run

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvm_core::backend::Backend;
use hvm_core::LuId;
use hvm_scsi::iscsi::{IscsiOptions, IscsiTransport, IscsiUrl};
use hvm_scsi::ArrayClient;
use hvm_tests::agent::Agent;
use hvm_tests::bench::{env_or, median};
use hvm_tests::tgt::Tgt;
use hvm_tests::{fio_fill, fio_nbd};

const SIZE: u64 = 256 << 20;

/// (name, rw, bs, iodepth)
const WORKLOADS: [(&str, &str, &str, u32); 4] = [
    ("4k random read, QD16 (IOPS)", "randread", "4k", 16),
    ("4k random write, QD16 (IOPS)", "randwrite", "4k", 16),
    ("1 MiB sequential read, QD4 (MB/s)", "read", "1m", 4),
    ("1 MiB sequential write, QD4 (MB/s)", "write", "1m", 4),
];

fn config(dir: &Path, tgt: &Tgt) -> PathBuf {
    let cfg = dir.join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: {{ unix: nbd.sock }}
backends:
  - name: tgt0
    plugin: stateless
    params:
      volumes:
        - {{ lu: 0, legs: [\"{}\", \"{}\"] }}
        - {{ lu: 3, legs: [\"{}\", \"{}\"] }}
virtual_lus:
  - {{ name: db, backend: tgt0, lu: 0, snapshots: [db-snap] }}
  - {{ name: db2, backend: tgt0, lu: 3, snapshots: [db2-snap] }}
",
            tgt.url(1),
            tgt.url(2),
            tgt.url(3),
            tgt.url(4)
        ),
    )
    .unwrap();
    cfg
}

/// The direct client: `qd` threads issuing commands on one session for `secs`; IOPS for
/// 4k, MB/s otherwise (as `fio_nbd` reports).
fn direct(url: &IscsiUrl, rw: &str, bs: &str, qd: u32, secs: f64) -> f64 {
    let t = IscsiTransport::connect(url, &IscsiOptions::default()).unwrap();
    let client = Arc::new(ArrayClient::new(t));
    let len: u64 = if bs == "4k" { 4096 } else { 1 << 20 };
    let blocks = SIZE / len;
    let done = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let lu = LuId(u32::from(url.lun));
    let threads: Vec<_> = (0..u64::from(qd))
        .map(|i| {
            let (client, done, rw) = (client.clone(), done.clone(), rw.to_string());
            std::thread::spawn(move || {
                let mut buf = vec![0x5au8; len as usize];
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i + 1);
                let mut k = i;
                while Instant::now() < end {
                    let n = if rw.starts_with("rand") {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x % blocks
                    } else {
                        k = (k + u64::from(qd)) % blocks;
                        k
                    };
                    let lba = n * len / 512;
                    if rw.contains("read") {
                        client.read(lu, lba, &mut buf).unwrap();
                    } else {
                        client.write(lu, lba, &buf, false).unwrap();
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let ops = done.load(Ordering::Relaxed) as f64 / secs;
    if bs == "4k" {
        ops
    } else {
        ops * len as f64 / 1e6
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = env_or("HVM_BENCH_SECONDS", 5.0);
    let rounds: usize = env_or("HVM_BENCH_ROUNDS", 3).max(1);
    hvm_tests::build_artifacts();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let tgt = Tgt::start(4, SIZE);
    let agent = Agent::start_config(&config(d, &tgt), &d.join("state"));
    let (db, db2) = (agent.uri("db"), agent.uri("db2"));
    // Every LUN written once, so no timed run pays for allocating its file.
    fio_fill(&db, SIZE);
    fio_fill(&db2, SIZE);
    agent.json(&["snapshot", "acquire", "db2"]);
    // A LUN of its own for the direct client, so it does not disturb the legs.
    let lun1: IscsiUrl = tgt.url(1).parse().unwrap();
    println!(
        "iSCSI legs: tgtd LUNs on 127.0.0.1, {} MiB, {secs} s per workload, medians of {rounds} rounds; hvm through fio's nbd engine, direct = hvm-scsi's libiscsi client on one LUN",
        SIZE >> 20
    );
    println!(
        "{:<36} {:>10} {:>10} {:>6} {:>10} {:>6}",
        "workload", "direct", "hvm sync", "ratio", "hvm snap", "ratio"
    );
    let mut missed = Vec::new();
    for (name, rw, bs, qd) in WORKLOADS {
        let mut runs = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..rounds {
            runs[0].push(direct(&lun1, rw, bs, qd, secs));
            runs[1].push(fio_nbd(&db, rw, bs, qd, SIZE, secs));
            runs[2].push(fio_nbd(&db2, rw, bs, qd, SIZE, secs));
        }
        let [k, sync, snap] = runs.each_ref().map(|r| median(r));
        let (rs, rn) = (sync / k, snap / k);
        println!("{name:<36} {k:>10.0} {sync:>10.0} {rs:>5.2}x {snap:>10.0} {rn:>5.2}x");
        if rs < 0.5 {
            missed.push(format!("{name}: Synchronized {rs:.2}x < 0.5x"));
        }
        if rn < 0.9 {
            missed.push(format!("{name}: Snapshot {rn:.2}x < 0.9x"));
        }
    }
    println!("targets: Snapshot >= 0.9x, Synchronized >= 0.5x");
    if missed.is_empty() {
        println!("all targets met");
    }
    for m in missed {
        println!("missed: {m}");
    }
    drop(agent);
    drop(tgt);
}

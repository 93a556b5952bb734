//! The [0077] claim measured (issue 20): a backup reading the snapshot does not slow the
//! database, because the pre-update array sends the database's reads to the less busy
//! leg.
//!
//! One host-agent with two embedded pre-update (E4) arrays, identical but for
//! `read_distribution` (`least-busy`, the default; `alternate`, the legs in turn whatever
//! their load). Each array's two legs and its save area are on their own disk units with
//! a service-time model (`iops`, `bandwidth_mb_s`). For each: a database-like reader
//! (fio, random 4 KiB reads, QD1, on the virtual LU) idle, then during a full-speed backup
//! (fio, 1 MiB sequential reads, QD4, on the snapshot export) after `hvmctl snapshot
//! acquire`. Prints the database's IOPS and the ratios to idle; target with distribution
//! >= 0.9x idle.
//!
//! Run: `cargo bench -p hvm-tests --bench read_distribution` (needs fio).
//! `HVM_BENCH_SECONDS` sets the time per measurement (default 8).

use std::path::Path;

use hvm_tests::agent::Agent;
use hvm_tests::fio_nbd;

/// 256 MiB virtual LUs.
const BLOCKS: u64 = 1 << 19;
const SIZE: u64 = BLOCKS * 512;
/// The disk model, a disk like a 7200 rpm one: 5 ms per I/O plus 200 MB/s, so a 4 KiB
/// read takes ~5 ms (slow enough that the disks, not the CPU of a shared 2-core machine,
/// decide the database's rate).
const DISK: &str = "iops: 200, bandwidth_mb_s: 200";

/// An embedded pre-update array: mirroring LU 0 (disk a) + mate LU 1 (disk b), save
/// area LU 9 (disk c).
fn backend(name: &str, distribution: &str) -> String {
    format!(
        "  - name: {name}
    plugin: pre-update
    params:
      array:
        embedded:
          kind: pre-update
          dir: {name}
          read_distribution: {distribution}
          disks: [{{ name: a, {DISK} }}, {{ name: b, {DISK} }}, {{ name: c, {DISK} }}]
          lus:
            - {{ lun: 0, blocks: {BLOCKS}, disk: a }}
            - {{ lun: 1, blocks: {BLOCKS}, disk: b }}
            - {{ lun: 9, blocks: {BLOCKS}, disk: c }}
          mirroring:
            - {{ mirror: 0, mate: 1 }}
"
    )
}

fn config(dir: &Path) -> std::path::PathBuf {
    let yaml = format!(
        "listen:\n  unix: nbd.sock\nbackends:\n{}{}virtual_lus:
  - {{ name: spread, backend: spread0, lu: 0, snapshots: [spread-snap], save_area: 9 }}
  - {{ name: turns, backend: turns0, lu: 0, snapshots: [turns-snap], save_area: 9 }}
",
        backend("spread0", "least-busy"),
        backend("turns0", "alternate"),
    );
    let p = dir.join("read-distribution.yaml");
    std::fs::write(&p, yaml).expect("write config");
    p
}

/// The database's random 4 KiB read IOPS on `vlu`, idle (the mean of a run before and a
/// run after, as other load on the machine drifts) and during a backup of its snapshot.
fn measure(a: &Agent, vlu: &str, secs: f64) -> (f64, f64) {
    let db = a.uri(vlu);
    let before = fio_nbd(&db, "randread", "4k", 1, SIZE, secs);
    assert_eq!(a.json(&["snapshot", "acquire", vlu])["changed"], true);
    let snap = a.uri(&format!("{vlu}-snap"));
    let (during, backup_mb_s) = std::thread::scope(|s| {
        // The backup starts first and runs past the database's measurement.
        let backup = s.spawn(|| fio_nbd(&snap, "read", "1m", 4, SIZE, secs + 2.0));
        std::thread::sleep(std::time::Duration::from_secs(1));
        let during = fio_nbd(&db, "randread", "4k", 1, SIZE, secs);
        (during, backup.join().expect("backup thread"))
    });
    println!("  {vlu}: backup read the snapshot at {backup_mb_s:.0} MB/s");
    let out = a.hvmctl(&["snapshot", "delete", vlu, "--wait"]);
    assert!(
        out.status.success(),
        "snapshot delete {vlu}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = fio_nbd(&db, "randread", "4k", 1, SIZE, secs);
    println!("  {vlu}: idle {before:.0} IOPS before the backup, {after:.0} after");
    ((before + after) / 2.0, during)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("HVM_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8.0);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("bench dir");
    let state = dir.path().join("state");
    let a = Agent::start_config(&config(dir.path()), &state);
    println!(
        "[0077] read distribution: database 4k random reads QD1 on an E4 virtual LU, a backup \
         reading its snapshot (1 MiB, QD4); disks: {DISK}; {secs} s per measurement"
    );
    let (idle_on, during_on) = measure(&a, "spread", secs);
    let (idle_off, during_off) = measure(&a, "turns", secs);
    println!(
        "{:<34} {:>10} {:>14} {:>8}",
        "read distribution", "idle IOPS", "backup IOPS", "ratio"
    );
    for (name, idle, during) in [
        ("least-busy leg ([0077], default)", idle_on, during_on),
        ("alternate (switched off)", idle_off, during_off),
    ] {
        println!(
            "{name:<34} {idle:>10.0} {during:>14.0} {:>7.2}x",
            during / idle
        );
    }
    let ratio = during_on / idle_on;
    println!(
        "target: with distribution >= 0.9x idle: {} ({ratio:.2}x); without it the database \
         keeps {:.2}x of idle ({:.0}% drop)",
        if ratio >= 0.9 { "met" } else { "MISSED" },
        during_off / idle_off,
        100.0 * (1.0 - during_off / idle_off)
    );
}

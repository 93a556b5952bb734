//! PostgreSQL during a backup, against the peer a DBA would use (issue 20): pgbench's TPS
//! idle, during back-to-back `hvmctl backup run`s of the cluster's virtual LU (freeze,
//! snapshot, copy by the backup host, delete, resync), and during back-to-back
//! `pg_basebackup`s of the same cluster (plain format, WAL streamed, fast checkpoint,
//! written to the same filesystem as hvm's backups), in one run. The phases take turns,
//! one pgbench round each (idle, hvm, hvm with a copy rate limit (`--rate R`),
//! pg_basebackup, idle, ...), so that load that comes and goes on the machine weighs on
//! all of them alike.
//!
//! `cargo bench -p hvm-tests --bench pg_during_backup` (root: loop devices, mounts).
//! `HVM_BENCH_ROUNDS` sets the turns (default 3; a pgbench round is 5 s), `HVM_BENCH_RATE`
//! the rate limit (default 50M: a full copy of the 512 MiB LU then takes about 11 s, so
//! at least one rate-limited backup finishes in each turn, the last one after the round).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use hvm_tests::pg::{Bench, Cluster, Deployment};

const LU: u64 = 512 << 20;
const SCALE: u32 = 5;
const CLIENTS: u32 = 4;
const ROUND_SECS: u32 = 5;

/// TPS of `rounds` pgbench rounds back to back, while `work` runs again and again (each
/// call gets its run number) until they are done; returns the TPS and the runs done.
fn during(c: &Cluster, rounds: usize, work: impl Fn(usize) + Sync) -> (f64, usize) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let runner = s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                work(n);
                n += 1;
            }
            n
        });
        let tps = idle(c, rounds);
        stop.store(true, Ordering::SeqCst);
        (tps, runner.join().expect("backup loop"))
    })
}

/// Mean TPS of `rounds` pgbench rounds.
fn idle(c: &Cluster, rounds: usize) -> f64 {
    let tps: Vec<f64> = (0..rounds)
        .map(|_| Bench::start(c, CLIENTS, ROUND_SECS).finish().1)
        .collect();
    tps.iter().sum::<f64>() / tps.len().max(1) as f64
}

/// One `pg_basebackup` of `c` into `to`, checked to have succeeded.
fn basebackup(c: &Cluster, to: &Path) {
    let out = std::process::Command::new(c.bin.join("pg_basebackup"))
        .arg("-h")
        .arg(&c.sock)
        .args(["-p", &c.port.to_string(), "-U", "postgres"])
        .args(["-F", "p", "-X", "stream", "-c", "fast", "-D"])
        .arg(to)
        .output()
        .expect("run pg_basebackup");
    assert!(
        out.status.success(),
        "pg_basebackup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds: usize = std::env::var("HVM_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let rate = std::env::var("HVM_BENCH_RATE").unwrap_or_else(|_| "50M".into());
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Deployment::start(dir.path(), LU, SCALE, 20_000);

    let base_root = d.hosts.target_root.join("basebackup");
    let (mut idles, mut hvms, mut pgbs, mut rated) = (vec![], vec![], vec![], vec![]);
    let (mut hvm_runs, mut pgb_runs, mut rated_runs) = (0, 0, 0);
    let hvm_backup = |name: &str, extra: &[&str]| {
        let mut args = vec!["--wait-resync"];
        args.extend(extra);
        let (o, v) = d.hosts.run(&["pg"], name, &args);
        assert!(
            o.status.success(),
            "backup run {name}: {}\n{v}",
            String::from_utf8_lossy(&o.stderr)
        );
        let _ = std::fs::remove_dir_all(d.hosts.target_root.join(name));
    };
    for round in 0..rounds {
        idles.push(idle(&d.cluster, 1));
        let (tps, n) = during(&d.cluster, 1, |i| {
            hvm_backup(&format!("hvm-{round}-{i}"), &[])
        });
        hvms.push(tps);
        hvm_runs += n;
        let (tps, n) = during(&d.cluster, 1, |i| {
            hvm_backup(&format!("rated-{round}-{i}"), &["--rate", &rate])
        });
        rated.push(tps);
        rated_runs += n;
        let (tps, n) = during(&d.cluster, 1, |i| {
            let to = base_root.join(format!("pg-{round}-{i}"));
            basebackup(&d.cluster, &to);
            let _ = std::fs::remove_dir_all(&to);
        });
        pgbs.push(tps);
        pgb_runs += n;
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (base, hvm, pgb, hvm_rated) = (mean(&idles), mean(&hvms), mean(&pgbs), mean(&rated));

    println!(
        "PostgreSQL during a backup: pgbench scale {SCALE}, {CLIENTS} clients, {rounds} rounds \
         of {ROUND_SECS} s per phase, LU {} MiB on array-sim",
        LU >> 20
    );
    let show = |v: &[f64]| {
        v.iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "per round: idle {} | hvm {} | hvm --rate {rate} {} | pg_basebackup {}",
        show(&idles),
        show(&hvms),
        show(&rated),
        show(&pgbs)
    );
    println!("idle TPS (mean of the idle rounds): {base:.0}");
    println!(
        "{:<44} {:>8} {:>8} {:>9}",
        "during", "TPS", "vs idle", "backups"
    );
    let rated_name = format!("hvmctl backup run --wait-resync --rate {rate}");
    for (name, tps, runs) in [
        ("hvmctl backup run --wait-resync", hvm, hvm_runs),
        (rated_name.as_str(), hvm_rated, rated_runs),
        ("pg_basebackup -X stream -c fast", pgb, pgb_runs),
    ] {
        println!("{name:<44} {tps:>8.0} {:>7.2}x {runs:>9}", tps / base);
    }
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    println!(
        "hvm / pg_basebackup: {:.2}x (target >= 1: {}); with --rate {rate}: {:.2}x idle (target >= 0.8: {})",
        hvm / pgb,
        verdict(hvm >= pgb),
        hvm_rated / base,
        verdict(hvm_rated >= 0.8 * base)
    );
}

//! The freeze window of an online backup of a real PostgreSQL, and what the backup costs
//! the database: 20 `hvmctl backup run`s (PostgreSQL + fsfreeze hooks, copy from the
//! array by the backup host, delete, resync) while pgbench runs; the freeze window
//! (quiesce start to resume end) p50/p99, and pgbench's TPS during the backups versus
//! without them, in the same run.
//!
//! `cargo bench -p hvm-tests --bench backup_freeze` (root: loop devices, mounts, FUSE).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use hvm_tests::pg::{Bench, Deployment};

const LU: u64 = 512 << 20;
const RUNS: usize = 20;
const ROUND_SECS: u32 = 5;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = Deployment::start(dir.path(), LU, 5, 20_000);

    // Without backups: three rounds of pgbench.
    let mut base = Vec::new();
    for _ in 0..3 {
        base.push(Bench::start(&d.cluster, 4, ROUND_SECS).finish().1);
    }

    // With backups: pgbench rounds back to back while the backups run.
    let done = Arc::new(AtomicBool::new(false));
    let mut freeze = Vec::new();
    let mut parts: Vec<(f64, f64, f64)> = Vec::new();
    let mut during = Vec::new();
    std::thread::scope(|s| {
        let flag = done.clone();
        let hosts = &d.hosts;
        let runner = s.spawn(move || {
            let mut out = Vec::new();
            for i in 0..RUNS {
                let target = format!("run-{i}");
                let (o, v) = hosts.run(&["pg"], &target, &["--wait-resync"]);
                assert!(
                    o.status.success(),
                    "backup run {i}: {}\n{v}",
                    String::from_utf8_lossy(&o.stderr)
                );
                let _ = std::fs::remove_dir_all(hosts.target_root.join(&target));
                out.push(v);
            }
            flag.store(true, Ordering::SeqCst);
            out
        });
        while !done.load(Ordering::SeqCst) {
            during.push(Bench::start(&d.cluster, 4, ROUND_SECS).finish().1);
        }
        for v in runner.join().expect("backup runner") {
            freeze.push(v["freeze_ms"].as_f64().unwrap_or(0.0));
            let all = hvm_tests::backup::steps(&v);
            let step = |name: &str| {
                all.iter()
                    .find(|(n, _)| n.starts_with(name))
                    .map_or(0.0, |(_, ms)| *ms)
            };
            parts.push((
                step("quiesce postgresql"),
                step("quiesce fsfreeze"),
                step("snapshot of"),
            ));
        }
    });
    // One more run as an operator sees it.
    let human = std::process::Command::new(hvm_tests::binary("hvmctl"))
        .args([
            "backup",
            "run",
            "--db",
            &d.hosts.db_addr,
            "--backup",
            &d.hosts.backup_addr,
        ])
        .args(["--vlu", "pg", "--target", "shown", "--wait-resync", "--ca"])
        .arg(d.hosts.tls.join("ca.pem"))
        .arg("--token-file")
        .arg(d.hosts.tls.join("token"))
        .output()
        .expect("hvmctl");
    println!("{}", String::from_utf8_lossy(&human.stdout));
    freeze.sort_by(f64::total_cmp);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (pg, fsf, snap): (Vec<f64>, Vec<f64>, Vec<f64>) = (
        parts.iter().map(|p| p.0).collect(),
        parts.iter().map(|p| p.1).collect(),
        parts.iter().map(|p| p.2).collect(),
    );
    println!(
        "online backup of PostgreSQL (pgbench scale 5, 4 clients), {RUNS} runs, LU {} MiB",
        LU >> 20
    );
    println!(
        "freeze window (quiesce start to resume end): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&freeze, 0.5),
        percentile(&freeze, 0.99),
        freeze.last().copied().unwrap_or(0.0)
    );
    println!(
        "  of which, mean: pg_backup_start {:.1} ms (transactions go on), writes frozen (fsfreeze to thaw) {:.1} ms, snapshot {:.2} ms",
        mean(&pg),
        mean(&fsf),
        mean(&snap)
    );
    let (b, w) = (mean(&base), mean(&during));
    println!(
        "pgbench TPS: without backups {b:.0} ({} rounds), during backups {w:.0} ({} rounds), ratio {:.2}",
        base.len(),
        during.len(),
        w / b.max(1e-9)
    );
}

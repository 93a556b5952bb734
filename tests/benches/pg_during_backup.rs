//! PostgreSQL during a backup, against the peer a DBA would use (issue 20): pgbench's TPS
//! idle, during back-to-back `hvmctl backup run`s of the cluster's virtual LU (freeze,
//! snapshot, copy by the backup host, delete, then waiting for the resync before the
//! next), and during back-to-back
//! `pg_basebackup`s of the same cluster (plain format, WAL streamed, fast checkpoint,
//! written to the same filesystem as hvm's backups), in one run. hvm runs four ways:
//! `--full` into a new repository each time (every byte read, hashed, compressed and
//! written, like pg_basebackup's whole copy), incremental (the default of `backup run`:
//! each backup copies what the database wrote since the one before, into one
//! repository), `--full --rate R`, and `--full --via nbd` (the backup host reads the
//! snapshot from the database host's NBD server instead of the array, and those reads
//! yield to the database's I/O: config `backup_reads`). The phases take turns, one
//! pgbench round each (idle, full, incremental, rated, via NBD, pg_basebackup, idle,
//! ...), so that load that comes and goes on the machine weighs on all of them alike.
//! The mean time of each backup step is printed for the full, incremental and NBD runs,
//! with the loop's wait for the resync after each. Back to back, a cheaper backup runs
//! more often; a last phase starts an incremental every pg_basebackup time (its mean
//! so far), so the two do the same number of backups, as a schedule would. A diagnostic
//! phase runs PostgreSQL's backup mode alone (`pg_backup_start` with a fast checkpoint,
//! `pg_backup_stop` with its WAL switch: what both hvm's hook and pg_basebackup do per
//! backup) as often as the incrementals ran: the part of their cost that is PostgreSQL's.
//! And a fifth way of hvm's, incrementals with `--consistency crash`: no hook runs, so
//! no backup mode and no checkpoint; the snapshot is one instant of the whole cluster, WAL
//! included, and a restore is PostgreSQL's crash recovery (tests/tests/postgres.rs
//! restores one), the "frozen snapshot" backup of PostgreSQL's manual.
//!
//! hvm's freeze hooks are PostgreSQL's alone by default (`HVM_BENCH_HOOKS=postgresql`):
//! the data directory, WAL included, is on the virtual LU and the write gate makes the
//! snapshot one instant, so a freeze of the filesystem adds nothing the restore needs
//! (tests/tests/postgres.rs restores such a backup); `HVM_BENCH_HOOKS=postgresql,fsfreeze`
//! adds fsfreeze of the mount after it, as the README's example config does.
//!
//! `cargo bench -p hvm-tests --bench pg_during_backup` (root: loop devices, mounts).
//! `HVM_BENCH_ROUNDS` sets the turns (default 3; a pgbench round is 5 s), `HVM_BENCH_RATE`
//! the rate limit (default 50M: a full copy of the 512 MiB LU then takes about 11 s, so
//! at least one rate-limited backup finishes in each turn, the last one after the round).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use hvm_tests::pg::{Bench, Cluster, Deployment, Hooks};

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

/// PostgreSQL's backup mode alone, as the hook runs it and pg_basebackup does too:
/// `pg_backup_start(fast)` (its checkpoint), then `pg_backup_stop` (its WAL switch), one
/// session; no snapshot and no copy.
fn backup_mode(c: &Cluster) {
    c.psql_session(&[
        "SELECT pg_backup_start('bench', true)",
        "SELECT labelfile FROM pg_backup_stop(false)",
    ]);
}

/// Mean milliseconds per step (freeze, snapshot, copy, ...) over the backups reported.
#[derive(Default)]
struct Steps(std::collections::BTreeMap<String, (f64, usize)>);

impl Steps {
    fn add(&mut self, report: &serde_json::Value) {
        for (name, ms) in hvm_tests::backup::steps(report) {
            self.one(name, ms);
        }
    }

    fn one(&mut self, name: &str, ms: f64) {
        let e = self.0.entry(name.to_string()).or_default();
        e.0 += ms;
        e.1 += 1;
    }

    fn show(&self) -> String {
        self.0
            .iter()
            .map(|(n, (ms, k))| format!("{n} {:.0}", ms / *k as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One phase of the table: its name, TPS per round, backups done.
struct Phase {
    name: String,
    tps: Vec<f64>,
    runs: usize,
}

impl Phase {
    fn new(name: impl Into<String>) -> Phase {
        Phase {
            name: name.into(),
            tps: Vec::new(),
            runs: 0,
        }
    }

    fn round(&mut self, (tps, runs): (f64, usize)) {
        self.tps.push(tps);
        self.runs += runs;
    }

    fn mean(&self) -> f64 {
        self.tps.iter().sum::<f64>() / self.tps.len().max(1) as f64
    }
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
    let hooks = match std::env::var("HVM_BENCH_HOOKS").as_deref() {
        Ok("postgresql,fsfreeze") => Hooks::PostgresFsfreeze,
        Ok("postgresql") | Err(_) => Hooks::Postgres,
        Ok(other) => panic!("HVM_BENCH_HOOKS={other}: postgresql or postgresql,fsfreeze"),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = hvm_tests::backup::Storage::ArraySim;
    let d = Deployment::start_with(dir.path(), LU, SCALE, (20_000, hooks), storage);

    let base_root = d.hosts.target_root.join("basebackup");
    let steps = std::sync::Mutex::new(<(Steps, Steps, Steps, Steps)>::default());
    // `full`: a new repository each time, so every byte is hashed, compressed and
    // written; otherwise the repository "inc", where each backup is an incremental of
    // the one before (as `hvmctl backup run` does by default).
    let hvm_backup = |name: &str, extra: &[&str], full: bool| {
        let via_nbd = extra.contains(&"nbd");
        let (o, v) = d.hosts.run(&["pg"], if full { name } else { "inc" }, extra);
        assert!(
            o.status.success(),
            "backup run {name}: {}\n{v}",
            String::from_utf8_lossy(&o.stderr)
        );
        // As a scheduled run (`backup policy run`) does: no --wait-resync (which also
        // reads and compares both legs whole); the resync still runs in the phase, as
        // the next backup needs the pair Synchronized.
        let t = std::time::Instant::now();
        while d.hosts.db.mode("pg") != "Synchronized" {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let resync = t.elapsed().as_secs_f64() * 1000.0;
        let mut s = steps.lock().expect("steps");
        let which = match (full, via_nbd, extra.contains(&"crash")) {
            (_, true, _) => &mut s.2,
            (_, _, true) => &mut s.3,
            (true, false, _) => &mut s.0,
            (false, false, _) => &mut s.1,
        };
        which.add(&v);
        which.one("resync (the loop's wait)", resync);
        if full {
            let _ = std::fs::remove_dir_all(d.hosts.target_root.join(name));
        }
    };
    // The incremental phase's base, before any round.
    hvm_backup("inc-base", &[], false);
    *steps.lock().expect("steps") = Default::default();
    let mut idle_p = Phase::new("idle");
    let mut full = Phase::new("hvmctl backup run --full");
    let mut inc = Phase::new("hvmctl backup run (incremental)");
    let mut crash = Phase::new("hvmctl backup run (incr.) --consistency crash");
    let mut rated = Phase::new(format!("hvmctl backup run --full --rate {rate}"));
    let mut nbd = Phase::new("hvmctl backup run --full --via nbd");
    let mut pgb = Phase::new("pg_basebackup -X stream -c fast");
    let mut paced = Phase::new("hvmctl backup run (incremental), paced");
    let mut mode = Phase::new("pg_backup_start/stop alone, incremental's pace");
    // The incremental's time per backup (seconds, backups), for the phase above.
    let inc_time = std::sync::Mutex::new((0.0f64, 0usize));
    // pg_basebackup's time per backup, for the paced phase: (seconds, backups).
    let pgb_time = std::sync::Mutex::new((0.0f64, 0usize));
    for round in 0..rounds {
        idle_p.round((idle(&d.cluster, 1), 0));
        full.round(during(&d.cluster, 1, |i| {
            hvm_backup(&format!("hvm-{round}-{i}"), &[], true)
        }));
        inc.round(during(&d.cluster, 1, |i| {
            let t = std::time::Instant::now();
            hvm_backup(&format!("inc-{round}-{i}"), &[], false);
            let mut m = inc_time.lock().expect("incremental time");
            m.0 += t.elapsed().as_secs_f64();
            m.1 += 1;
        }));
        crash.round(during(&d.cluster, 1, |i| {
            hvm_backup(
                &format!("crash-{round}-{i}"),
                &["--consistency", "crash"],
                false,
            )
        }));
        rated.round(during(&d.cluster, 1, |i| {
            hvm_backup(&format!("rated-{round}-{i}"), &["--rate", &rate], true)
        }));
        nbd.round(during(&d.cluster, 1, |i| {
            hvm_backup(&format!("nbd-{round}-{i}"), &["--via", "nbd"], true)
        }));
        pgb.round(during(&d.cluster, 1, |i| {
            let to = base_root.join(format!("pg-{round}-{i}"));
            let t = std::time::Instant::now();
            basebackup(&d.cluster, &to);
            let mut m = pgb_time.lock().expect("pg_basebackup time");
            m.0 += t.elapsed().as_secs_f64();
            m.1 += 1;
            drop(m);
            let _ = std::fs::remove_dir_all(&to);
        }));
        // The same backups as pg_basebackup's in number: an incremental started every
        // pg_basebackup time (its mean so far), as a schedule would start them.
        let every = {
            let m = pgb_time.lock().expect("pg_basebackup time");
            std::time::Duration::from_secs_f64(m.0 / m.1.max(1) as f64)
        };
        paced.round(during(&d.cluster, 1, |i| {
            let t = std::time::Instant::now();
            hvm_backup(&format!("paced-{round}-{i}"), &[], false);
            if let Some(rest) = every.checked_sub(t.elapsed()) {
                std::thread::sleep(rest);
            }
        }));
        // Where the incremental phase's TPS goes: PostgreSQL's own part of each backup,
        // as often as the incrementals ran back to back.
        let every = {
            let m = inc_time.lock().expect("incremental time");
            std::time::Duration::from_secs_f64(m.0 / m.1.max(1) as f64)
        };
        mode.round(during(&d.cluster, 1, |_| {
            let t = std::time::Instant::now();
            backup_mode(&d.cluster);
            if let Some(rest) = every.checked_sub(t.elapsed()) {
                std::thread::sleep(rest);
            }
        }));
    }
    let base = idle_p.mean();
    println!(
        "PostgreSQL during a backup: pgbench scale {SCALE}, {CLIENTS} clients, {rounds} rounds \
         of {ROUND_SECS} s per phase, LU {} MiB on array-sim, hvm's hooks {hooks:?}",
        LU >> 20
    );
    println!(
        "{:<46} {:>20} {:>7} {:>8} {:>8} {:>16}",
        "during", "TPS per round", "mean", "vs idle", "backups", "lost per backup"
    );
    let secs = f64::from(ROUND_SECS) * rounds as f64;
    for p in [
        &idle_p, &full, &inc, &crash, &rated, &nbd, &pgb, &paced, &mode,
    ] {
        let per: Vec<String> = p.tps.iter().map(|t| format!("{t:.0}")).collect();
        // Transactions the database did not do because of the backups, per backup.
        let lost = match p.runs {
            0 => "-".to_string(),
            _ if p.mean() >= base => "none".to_string(),
            n => format!("{:.0} tx", (base - p.mean()) * secs / n as f64),
        };
        println!(
            "{:<46} {:>20} {:>7.0} {:>7.2}x {:>8} {:>16}",
            p.name,
            per.join(" "),
            p.mean(),
            p.mean() / base,
            p.runs,
            lost
        );
    }
    let s = steps.lock().expect("steps");
    println!("hvm full, mean ms per step: {}", s.0.show());
    println!("hvm incremental, mean ms per step: {}", s.1.show());
    println!("hvm full --via nbd, mean ms per step: {}", s.2.show());
    println!(
        "hvm incremental --consistency crash, mean ms per step: {}",
        s.3.show()
    );
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    let (f, i, p, r, n) = (
        full.mean(),
        inc.mean(),
        pgb.mean(),
        rated.mean(),
        nbd.mean(),
    );
    println!(
        "hvm / pg_basebackup: incremental (the default) {:.2}x (target >= 1: {}), full {:.2}x ({}); \
         full with --rate {rate}: {:.2}x idle (target >= 0.8: {}); full --via nbd (the database \
         host serves the reads, yielding to the database): {:.2}x, {:.2}x idle",
        i / p,
        verdict(i >= p),
        f / p,
        verdict(f >= p),
        r / base,
        verdict(r >= 0.8 * base),
        n / p,
        n / base
    );
    let m = pgb_time.lock().expect("pg_basebackup time");
    println!(
        "at pg_basebackup's pace (an incremental started every {:.2} s, its mean time): \
         hvm / pg_basebackup {:.2}x",
        m.0 / m.1.max(1) as f64,
        paced.mean() / p
    );
    println!(
        "hvm / pg_basebackup, crash-consistent incremental (no hook, no backup mode): {:.2}x \
         ({:.2}x idle)",
        crash.mean() / p,
        crash.mean() / base
    );
    let m = inc_time.lock().expect("incremental time");
    println!(
        "PostgreSQL's backup mode alone (checkpoint, WAL switch) started every {:.2} s (the \
         incremental's mean time): {:.2}x idle, against the incremental's {:.2}x",
        m.0 / m.1.max(1) as f64,
        mode.mean() / base,
        i / base
    );
}

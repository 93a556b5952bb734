//! Durability benchmark: 4k random writes at queue depth 16 (fio, nbd engine) to a
//! virtual LU in Snapshot mode, with the update-location table kept only in memory
//! (`journal.durable: false`) versus durable in the journal file, with the default 4 MiB
//! activity regions and with 64 KiB regions. Each target runs in turn, several rounds,
//! in one run; ratios to memory-only. Target: durable (default) >= 0.9x.
//!
//! Run: `cargo bench -p hvm-tests --bench durable_tracking` (needs fio).
//! `HVM_BENCH_SECONDS` sets the time per run (default 5), `HVM_BENCH_ROUNDS` the rounds
//! (default 5); the IOPS printed is each target's median run.

use std::path::Path;
use std::sync::Arc;

use hvm_host_agent::config::Config;
use hvm_host_agent::host::Host;
use hvm_host_agent::{agent, service};
use hvm_tests::bench::median;

const BLOCKS: u64 = 1 << 20; // 512 MiB
const SIZE: u64 = BLOCKS * 512;

/// An agent with one pair on its own embedded stateless array, in `dir`.
fn agent(dir: &Path, durable: bool, region_kib: u64) -> Arc<Host> {
    let text = format!(
        "plugin_dir: {}
journal: {{ durable: {durable}, region_kib: {region_kib} }}
listen: {{ unix: nbd.sock }}
backends:
  - name: a
    plugin: stateless
    params: {{ array: {{ embedded: {{ kind: stateless, dir: array, disks: [{{ name: d0 }}],
      lus: [{{ lun: 1, blocks: {BLOCKS}, disk: d0 }}, {{ lun: 2, blocks: {BLOCKS}, disk: d0 }}],
      mirroring: [{{ mirror: 0, origin: 1, mate: 2 }}] }} }} }}
virtual_lus:
  - {{ name: db, backend: a, lu: 0, snapshots: [db-snap] }}
",
        hvm_tests::target_dir().display()
    );
    let cfg = Config::parse(&text, "bench.yaml").expect("config");
    std::fs::create_dir_all(dir).expect("dir");
    Arc::new(agent::build(&cfg, dir, Some(dir)).expect("agent"))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = |k: &str, d: f64| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let secs = env("HVM_BENCH_SECONDS", 5.0);
    let rounds = (env("HVM_BENCH_ROUNDS", 5.0) as usize).max(1);
    hvm_tests::build_artifacts();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("bench dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let targets = [
        ("in memory (durable: false)", false, 4096),
        ("durable, 4 MiB regions", true, 4096),
        ("durable, 64 KiB regions", true, 64),
    ];
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut agents = Vec::new();
    let mut tasks = Vec::new();
    for (i, (_, durable, region)) in targets.iter().enumerate() {
        let a = agent(&dir.path().join(format!("t{i}")), *durable, *region);
        let listeners = rt.block_on(service::listen(&a)).expect("listen");
        let (mgr, db) = a.virtual_lu("db").expect("db");
        // Snapshot mode: every write is recorded in the update-location table.
        mgr.acquire(db).expect("acquire");
        let mut stop = stop_tx.subscribe();
        let served = a.clone();
        tasks.push(rt.spawn(async move {
            service::serve(&served, listeners, async move {
                let _ = stop.recv().await;
            })
            .await
        }));
        agents.push(a);
    }
    let uris: Vec<String> = agents
        .iter()
        .map(|a| format!("nbd+unix:///db?socket={}", a.socket.display()))
        .collect();
    // Written once before timing, so no run pays for the files' block allocation.
    for u in &uris {
        hvm_tests::fio_fill(u, SIZE);
    }
    println!(
        "4k random write, QD16, Snapshot mode, {} MiB LU, {secs} s x {rounds} rounds per target (fio nbd engine)",
        SIZE >> 20
    );
    let mut iops = vec![Vec::new(); targets.len()];
    for r in 0..rounds {
        // Each round starts at another target, so no target always runs first.
        for i in (0..uris.len()).map(|k| (k + r) % uris.len()) {
            let u = &uris[i];
            // Each run starts with no dirty pages left by the one before.
            let _ = std::process::Command::new("sync").status();
            iops[i].push(hvm_tests::fio_nbd(u, "randwrite", "4k", 16, SIZE, secs));
        }
    }
    let base = median(&iops[0]);
    println!(
        "{:<28} {:>10} {:>7} {:>14} {:>10}",
        "tracking", "IOPS", "ratio", "journal syncs", "runs"
    );
    for (i, (name, _, _)) in targets.iter().enumerate() {
        let m = median(&iops[i]);
        let syncs = agents[i]
            .journals
            .get("a")
            .map(|j| j.stats().flushes.to_string())
            .unwrap_or_else(|| "-".into());
        let runs: Vec<String> = iops[i].iter().map(|x| format!("{x:.0}")).collect();
        println!(
            "{name:<28} {m:>10.0} {:>6.2}x {syncs:>14} {:>10}",
            m / base,
            runs.join(" ")
        );
    }
    println!("target: durable (4 MiB regions, the default) >= 0.9x in memory");
    let _ = stop_tx.send(());
    for t in tasks {
        let _ = rt.block_on(t);
    }
}

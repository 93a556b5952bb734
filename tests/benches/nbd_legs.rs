//! NBD legs benchmark: fio's nbd engine against an hvm virtual LU whose two legs are
//! nbdkit `file` exports, and straight against one of those nbdkit servers, in one run.
//! `db` stays Synchronized (every write goes to both legs' servers); `db2` is put in
//! Snapshot mode (writes go to the origin leg only). Ratios are to nbdkit alone. A peer
//! that makes the same hop is measured too: qemu-nbd serving the same nbdkit export
//! through QEMU's own NBD client (fio -> qemu-nbd -> nbdkit).
//!
//! Run: `cargo bench -p hvm-tests --bench nbd_legs` (needs fio, nbdkit, qemu-nbd).
//! `HVM_BENCH_SECONDS` sets the time per run (default 5), `HVM_BENCH_ROUNDS` how many
//! runs of each workload on each target (default 3; the targets take turns, and the
//! table shows each target's median), so that load from other programs on the machine
//! falls on every target alike.
#![allow(clippy::unwrap_used)] // a benchmark: a failed unwrap is a failed run

use std::path::{Path, PathBuf};
use std::time::Duration;

use hvm_tests::agent::Agent;
use hvm_tests::bench::median;
use hvm_tests::{fio_fill, fio_nbd, tool, Running};

const SIZE: u64 = 256 << 20;

/// (name, rw, bs, iodepth)
const WORKLOADS: [(&str, &str, &str, u32); 4] = [
    ("4k random read, QD16 (IOPS)", "randread", "4k", 16),
    ("4k random write, QD16 (IOPS)", "randwrite", "4k", 16),
    ("1 MiB sequential read, QD4 (MB/s)", "read", "1m", 4),
    ("1 MiB sequential write, QD4 (MB/s)", "write", "1m", 4),
];

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

/// nbdkit's file plugin on a new file of SIZE bytes, on socket `NAME.sock`.
fn nbdkit_file(dir: &Path, name: &str) -> (Running, PathBuf) {
    let file = dir.join(format!("{name}.img"));
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(SIZE))
        .unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let kit = Running(
        tool("nbdkit")
            .arg("-f")
            .arg("-U")
            .arg(&sock)
            .arg("file")
            .arg(&file)
            .spawn()
            .unwrap(),
    );
    wait_for(&sock);
    (kit, sock)
}

fn wait_for(sock: &Path) {
    for _ in 0..400 {
        if sock.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{} did not appear", sock.display());
}

fn config(dir: &Path, socks: &[PathBuf]) -> PathBuf {
    let leg = |i: usize| uri(&socks[i], &format!("leg{i}"));
    let cfg = dir.join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: {{ unix: nbd.sock }}
backends:
  - name: nbd0
    plugin: nbd
    params:
      volumes:
        - {{ lu: 0, legs: [\"{}\", \"{}\"] }}
        - {{ lu: 3, legs: [\"{}\", \"{}\"] }}
virtual_lus:
  - {{ name: db, backend: nbd0, lu: 0, snapshots: [db-snap] }}
  - {{ name: db2, backend: nbd0, lu: 3, snapshots: [db2-snap] }}
",
            leg(0),
            leg(1),
            leg(2),
            leg(3)
        ),
    )
    .unwrap();
    cfg
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("HVM_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let rounds: usize = std::env::var("HVM_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1);
    hvm_tests::build_artifacts();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let d = dir.path();
    let servers: Vec<(Running, PathBuf)> =
        (0..4).map(|i| nbdkit_file(d, &format!("k{i}"))).collect();
    let socks: Vec<PathBuf> = servers.iter().map(|(_, s)| s.clone()).collect();
    let agent = Agent::start_config(&config(d, &socks), &d.join("state"));
    let proxy_sock = d.join("qemu-proxy.sock");
    let _proxy = Running(
        tool("qemu-nbd")
            .args(["-f", "raw", "--persistent", "--shared=16", "-k"])
            .arg(&proxy_sock)
            .arg(uri(&socks[0], "leg0"))
            .spawn()
            .unwrap(),
    );
    wait_for(&proxy_sock);
    let proxy = uri(&proxy_sock, "");
    // Every target written once, so no timed run pays for allocating its files.
    let (db, db2, kit) = (agent.uri("db"), agent.uri("db2"), uri(&socks[0], "leg0"));
    fio_fill(&db, SIZE);
    fio_fill(&db2, SIZE);
    agent.json(&["snapshot", "acquire", "db2"]);
    println!(
        "NBD legs: nbdkit file exports over Unix sockets, {} MiB, fio nbd engine, median of {rounds} runs of {secs} s",
        SIZE >> 20
    );
    println!(
        "{:<36} {:>10} {:>10} {:>6} {:>10} {:>6} {:>10} {:>6}",
        "workload", "nbdkit", "hvm sync", "ratio", "hvm snap", "ratio", "qemu-nbd", "ratio"
    );
    let mut missed = Vec::new();
    for (name, rw, bs, qd) in WORKLOADS {
        let targets = [&kit, &db, &db2, &proxy];
        let mut runs: [Vec<f64>; 4] = Default::default();
        for round in 0..rounds {
            for i in 0..targets.len() {
                let t = (i + round) % targets.len();
                runs[t].push(fio_nbd(targets[t], rw, bs, qd, SIZE, secs));
            }
        }
        let [k, sync, snap, q] = runs.each_ref().map(|r| median(r));
        let (rs, rn) = (sync / k, snap / k);
        println!(
            "{name:<36} {k:>10.0} {sync:>10.0} {rs:>5.2}x {snap:>10.0} {rn:>5.2}x {q:>10.0} {:>5.2}x",
            q / k
        );
        let sync_target = if rw.contains("read") { 0.9 } else { 0.5 };
        if rs < sync_target {
            missed.push(format!("{name}: Synchronized {rs:.2}x < {sync_target}x"));
        }
        if rn < 0.9 {
            missed.push(format!("{name}: Snapshot {rn:.2}x < 0.9x"));
        }
    }
    println!("targets: Snapshot >= 0.9x; Synchronized >= 0.5x on writes, >= 0.9x on reads");
    if missed.is_empty() {
        println!("all targets met");
    }
    for m in missed {
        println!("missed: {m}");
    }
    drop(agent);
    drop(servers);
}

//! RBD benchmark on a throwaway Ceph cluster (memstore OSD, 127.0.0.1): fio's nbd engine
//! against hvm's virtual LU whose legs are two RBD images (in Synchronized mode both images
//! are written; in Snapshot mode the virtual LU writes the origin image only) and against
//! `qemu-nbd` serving an image of the same size in the same pool with QEMU's own rbd
//! driver, the peer a Ceph user would pick. Both sides run librbd without its cache (the
//! plugin's default, `--cache=none` for QEMU). Both servers stay up, and each hvm run comes
//! right after a peer run of the same workload, so load from other work on the machine
//! hits both alike. The peer has its own image: two librbd clients writing one image in
//! turn would pass its exclusive lock back and forth, which measures the lock, not the
//! client. One run; ratios to the peer run beside.
//!
//! Run: `cargo bench -p hvm-tests --bench rbd_legs` (needs ceph-mon, ceph-osd,
//! ceph-common, fio, qemu-utils, and QEMU's rbd driver: Debian's qemu-block-extra of the
//! same version as qemu-utils; without it qemu-nbd says "Unable to load module rbd").
//! `HVM_BENCH_SECONDS` sets the time per workload (default 5).
#![allow(clippy::unwrap_used)] // a benchmark: a failed unwrap is a failed run

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use hvm_tests::agent::Agent;
use hvm_tests::ceph::Ceph;
use hvm_tests::{fio_fill, fio_nbd, tool, Running};

/// Each image: small, because memstore keeps the data in the OSD's memory.
const SIZE: u64 = 128 << 20;

/// (name, rw, bs, iodepth)
const WORKLOADS: [(&str, &str, &str, u32); 4] = [
    ("4k random read, QD16 (IOPS)", "randread", "4k", 16),
    ("4k random write, QD16 (IOPS)", "randwrite", "4k", 16),
    ("1 MiB sequential read, QD16 (MB/s)", "read", "1m", 16),
    ("1 MiB sequential write, QD16 (MB/s)", "write", "1m", 16),
];

/// For each workload: a peer run, then a run on `uri`; (peer, hvm) per workload.
fn paired(peer: &str, uri: &str, secs: f64) -> Vec<(f64, f64)> {
    WORKLOADS
        .iter()
        .map(|(_, rw, bs, qd)| {
            let p = fio_nbd(peer, rw, bs, *qd, SIZE, secs);
            (p, fio_nbd(uri, rw, bs, *qd, SIZE, secs))
        })
        .collect()
}

fn agent_config(ceph: &Ceph, dir: &Path) -> std::path::PathBuf {
    let cfg = dir.join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: {{ unix: nbd.sock }}
backends:
  - name: ceph0
    plugin: rbd
    params:
      conf: {}
      volumes: [{{ lu: 0, legs: [rbd/bench-a, rbd/bench-b] }}]
virtual_lus:
  - {{ name: db, backend: ceph0, lu: 0, snapshots: [db-snap] }}
",
            ceph.conf().display()
        ),
    )
    .unwrap();
    cfg
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

/// qemu-nbd with QEMU's rbd driver on `rbd/bench-p`, export `peer` on `sock`.
fn start_peer(ceph: &Ceph, sock: &Path) -> Running {
    let mut qemu = Running(
        tool("qemu-nbd")
            .args(["-f", "raw", "--persistent", "--shared=16", "--cache=none"])
            .args(["-x", "peer", "-k"])
            .arg(sock)
            .arg(format!(
                "rbd:rbd/bench-p:conf={}:id=admin",
                ceph.conf().display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-nbd"),
    );
    wait_for(sock);
    std::thread::sleep(Duration::from_millis(300));
    if let Some(status) = qemu.0.try_wait().unwrap() {
        panic!("qemu-nbd exited ({status}): is qemu-block-extra (QEMU's rbd driver) installed?");
    }
    qemu
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("HVM_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    hvm_tests::build_artifacts();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ceph = Ceph::start();
    ceph.create_image("rbd/bench-a", SIZE);
    ceph.create_image("rbd/bench-b", SIZE);
    ceph.create_image("rbd/bench-p", SIZE);

    let sock = d.join("qemu.sock");
    let _qemu = start_peer(&ceph, &sock);
    let peer = format!("nbd+unix:///peer?socket={}", sock.display());
    let agent = Agent::start_config(&agent_config(&ceph, d), &d.join("state"));
    let db = agent.uri("db");
    // Every image written once: no timed run pays for allocation.
    fio_fill(&peer, SIZE);
    fio_fill(&db, SIZE);
    let sync = paired(&peer, &db, secs);
    agent.json(&["snapshot", "acquire", "db"]);
    let snap = paired(&peer, &db, secs);

    println!(
        "\nRBD legs on a memstore OSD, {} MiB images, {secs} s per workload, one run",
        SIZE >> 20
    );
    println!(
        "{:<36} {:>9} {:>9} {:>6} {:>9} {:>9} {:>6}",
        "workload", "peer", "hvm Sync", "ratio", "peer", "hvm Snap", "ratio"
    );
    for (i, (name, ..)) in WORKLOADS.iter().enumerate() {
        let ((p1, y), (p2, n)) = (sync[i], snap[i]);
        println!(
            "{name:<36} {p1:>9.0} {y:>9.0} {:>5.2}x {p2:>9.0} {n:>9.0} {:>5.2}x",
            y / p1,
            n / p2
        );
    }
    println!("targets: Snapshot >= 1.0x, Synchronized >= 0.5x the peer");
}

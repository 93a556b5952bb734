//! RBD benchmark on a throwaway Ceph cluster (memstore OSD, 127.0.0.1): fio's nbd engine
//! against hvm's virtual LU whose legs are two RBD images (in Synchronized mode both images
//! are written; in Snapshot mode the virtual LU writes the origin image only) and against
//! `qemu-nbd` serving the origin image with QEMU's own rbd driver, the peer a Ceph user
//! would pick. Both sides run librbd without its cache (the plugin's default,
//! `--cache=none` for QEMU). One run; ratios to qemu-nbd.
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

fn run_all(uri: &str, secs: f64) -> Vec<f64> {
    WORKLOADS
        .iter()
        .map(|(_, rw, bs, qd)| fio_nbd(uri, rw, bs, *qd, SIZE, secs))
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

/// qemu-nbd with QEMU's rbd driver on `rbd/bench-a`: filled once, then the workloads.
fn peer_run(ceph: &Ceph, d: &Path, secs: f64) -> Vec<f64> {
    let sock = d.join("qemu.sock");
    let mut qemu = Running(
        tool("qemu-nbd")
            .args(["-f", "raw", "--persistent", "--shared=16", "--cache=none"])
            .args(["-x", "peer", "-k"])
            .arg(&sock)
            .arg(format!(
                "rbd:rbd/bench-a:conf={}:id=admin",
                ceph.conf().display()
            ))
            .stdout(Stdio::null())
            .spawn()
            .expect("start qemu-nbd"),
    );
    wait_for(&sock);
    std::thread::sleep(Duration::from_millis(300));
    if let Some(status) = qemu.0.try_wait().unwrap() {
        panic!("qemu-nbd exited ({status}): is qemu-block-extra (QEMU's rbd driver) installed?");
    }
    let uri = format!("nbd+unix:///peer?socket={}", sock.display());
    fio_fill(&uri, SIZE);
    let results = run_all(&uri, secs);
    let pid = nix::unistd::Pid::from_raw(qemu.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = qemu.0.wait().unwrap();
    assert!(status.success(), "qemu-nbd on SIGTERM: {status}");
    results
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

    // The peer first, on the origin image; stopped with SIGTERM so that QEMU closes the
    // image and releases its exclusive lock (a killed client holds it until its watch
    // times out, and the next writer waits for that).
    let peer = peer_run(&ceph, d, secs);

    let agent = Agent::start_config(&agent_config(&ceph, d), &d.join("state"));
    let db = agent.uri("db");
    fio_fill(&db, SIZE); // both images written once: no timed run pays for allocation
    let sync = run_all(&db, secs);
    agent.json(&["snapshot", "acquire", "db"]);
    let snap = run_all(&db, secs);

    println!(
        "\nRBD legs on a memstore OSD, {} MiB images, {secs} s per workload, one run",
        SIZE >> 20
    );
    println!(
        "{:<38} {:>12} {:>12} {:>12} {:>9} {:>9}",
        "workload", "qemu-nbd rbd", "hvm Snapshot", "hvm Sync", "Snap/peer", "Sync/peer"
    );
    for (i, (name, ..)) in WORKLOADS.iter().enumerate() {
        println!(
            "{name:<38} {:>12.0} {:>12.0} {:>12.0} {:>8.2}x {:>8.2}x",
            peer[i],
            snap[i],
            sync[i],
            snap[i] / peer[i],
            sync[i] / peer[i]
        );
    }
    println!("targets: Snapshot >= 1.0x, Synchronized >= 0.5x the peer");
}

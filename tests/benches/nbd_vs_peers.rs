//! NBD benchmark: fio (nbd engine) over Unix sockets against hvm (two virtual LUs on an
//! embedded stateless array, one in Synchronized and one in Snapshot mode), nbdkit's file plugin
//! and qemu-nbd, all on files of the same size in the same directory, in one run; ratios
//! to nbdkit.
//!
//! Run: `cargo bench -p hvm-tests --bench nbd_vs_peers` (needs fio, nbdkit, qemu-nbd).
//! `HVM_BENCH_SECONDS` sets the time per workload (default 5).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hvm_host_agent::agent::Agent;
use hvm_host_agent::config::Config;
use hvm_tests::Running;

const BLOCKS: u64 = 1 << 20; // 512 MiB
const SIZE: u64 = BLOCKS * 512;

fn wait_for(sock: &Path) {
    for _ in 0..200 {
        if sock.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{} did not appear", sock.display());
}

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

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("HVM_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    hvm_tests::build_artifacts();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("bench dir");
    let d = dir.path();

    // Peers on plain files.
    let file = |n: &str| -> PathBuf {
        let p = d.join(n);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(SIZE))
            .expect("file");
        p
    };
    let (nbdkit_sock, qemu_sock) = (d.join("nbdkit.sock"), d.join("qemu.sock"));
    let _nbdkit = Running(
        Command::new("nbdkit")
            .args(["--foreground", "--unix"])
            .arg(&nbdkit_sock)
            .arg("file")
            .arg(file("nbdkit.img"))
            .stdout(Stdio::null())
            .spawn()
            .expect("nbdkit is required (apt-get install nbdkit)"),
    );
    let _qemu = Running(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "--persistent", "--shared=16", "-k"])
            .arg(&qemu_sock)
            .arg(file("qemu.img"))
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd is required (apt-get install qemu-utils)"),
    );

    // hvm: two pairs on an embedded stateless array, LUs in the same directory; `db`
    // stays Synchronized, `db2` is put in Snapshot mode, so every workload runs on all
    // four targets back to back under the same conditions.
    let cfg_text = format!(
        "plugin_dir: {}\nlisten: {{unix: hvm.sock}}\nbackends:\n  - name: a\n    plugin: stateless\n    params:\n      array:\n        embedded:\n          kind: stateless\n          dir: array\n          disks: [{{name: d0}}]\n          lus:\n            - {{lun: 1, blocks: {BLOCKS}, disk: d0}}\n            - {{lun: 2, blocks: {BLOCKS}, disk: d0}}\n            - {{lun: 4, blocks: {BLOCKS}, disk: d0}}\n            - {{lun: 5, blocks: {BLOCKS}, disk: d0}}\n          mirroring:\n            - {{mirror: 0, origin: 1, mate: 2}}\n            - {{mirror: 3, origin: 4, mate: 5}}\nvirtual_lus:\n  - {{name: db, backend: a, lu: 0, snapshots: [db-snap]}}\n  - {{name: db2, backend: a, lu: 3, snapshots: [db2-snap]}}\n",
        hvm_tests::target_dir().display()
    );
    let cfg = Config::parse(&cfg_text, "bench.yaml").expect("config");
    let agent = std::sync::Arc::new(Agent::build(&cfg, d, Some(d)).expect("agent"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let listeners = rt.block_on(agent.listen()).expect("listen");
    let hvm_sock = agent.socket.clone();
    let (mgr, db2) = agent.virtual_lu("db2").expect("db2");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::scope(|s| {
        let (agent, rt) = (&agent, &rt);
        s.spawn(move || {
            rt.block_on(agent.serve(listeners, async {
                let _ = stop_rx.await;
            }))
        });
        wait_for(&nbdkit_sock);
        wait_for(&qemu_sock);
        let targets = [
            uri(&nbdkit_sock, ""),
            uri(&qemu_sock, ""),
            uri(&hvm_sock, "db"),
            uri(&hvm_sock, "db2"),
        ];
        for u in &targets {
            hvm_tests::fio_fill(u, SIZE);
        }
        // Snapshot mode: writes are recorded in the update-location table.
        mgr.acquire(db2).expect("acquire");
        println!(
            "NBD over Unix sockets, {} MiB, {secs} s per workload, fio nbd engine",
            SIZE >> 20
        );
        println!(
            "{:<36} {:>10} {:>10} {:>10} {:>6} {:>10} {:>6}",
            "workload", "nbdkit", "qemu-nbd", "hvm sync", "ratio", "hvm snap", "ratio"
        );
        for (name, rw, bs, qd) in WORKLOADS {
            let [k, q, h, snap] = targets
                .each_ref()
                .map(|t| hvm_tests::fio_nbd(t, rw, bs, qd, SIZE, secs));
            println!(
                "{name:<36} {k:>10.0} {q:>10.0} {h:>10.0} {:>5.2}x {snap:>10.0} {:>5.2}x",
                h / k,
                snap / k
            );
        }
        println!("targets: reads >= 1.0x nbdkit; writes in Snapshot >= 0.9x; writes in Synchronized >= 0.6x");
        let _ = stop_tx.send(());
    });
}

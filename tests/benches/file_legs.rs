//! File legs benchmark (issue 14): fio's nbd engine on hvm virtual LUs whose legs are
//! files opened O_DIRECT, against fio's own io_uring engine with direct I/O on the same
//! kind of files, in one run; ratios to fio. Both of the file plugin's I/O engines are
//! measured (io_uring and threads), each with one virtual LU in Synchronized mode (both
//! legs written) and one in Snapshot mode (one leg written). qemu-nbd serving a file
//! with O_DIRECT is measured beside them: the NBD hop alone, ratio to fio too.
//!
//! Run: `cargo bench -p hvm-tests --bench file_legs` (needs fio). `HVM_BENCH_SECONDS`
//! sets the time per workload (default 5).

use std::path::{Path, PathBuf};

use hvm_host_agent::config::Config;
use hvm_host_agent::{agent, service};

const SIZE: u64 = 512 << 20;

/// (name, rw, bs, iodepth)
const WORKLOADS: [(&str, &str, &str, u32); 4] = [
    ("4k random read, QD16 (IOPS)", "randread", "4k", 16),
    ("4k random write, QD16 (IOPS)", "randwrite", "4k", 16),
    ("1 MiB sequential read, QD4 (MB/s)", "read", "1m", 4),
    ("1 MiB sequential write, QD4 (MB/s)", "write", "1m", 4),
];

/// fio with io_uring and O_DIRECT on `file`: IOPS for 4k, MB/s otherwise.
fn fio_direct(file: &Path, rw: &str, bs: &str, qd: u32, secs: f64) -> f64 {
    let out = hvm_tests::tool("fio")
        .args([
            "--name=b",
            "--ioengine=io_uring",
            "--direct=1",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--size={SIZE}"))
        .arg(format!("--runtime={secs}"))
        .output()
        .expect("run fio");
    assert!(
        out.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
    let j = &v["jobs"][0][if rw.contains("read") { "read" } else { "write" }];
    if bs == "4k" {
        j["iops"].as_f64().unwrap_or(0.0)
    } else {
        j["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6
    }
}

/// A backend `name` of the file plugin with I/O engine `io`: volumes at LU 0 (`db`) and
/// LU 3 (`snap`), legs in `dir`.
fn backend(name: &str, io: &str, dir: &Path) -> String {
    let leg = |n: &str| dir.join(format!("{name}-{n}.img")).display().to_string();
    format!(
        "  - name: {name}\n    plugin: file\n    params:\n      io: {io}\n      create: true\n      volumes:\n        - {{ lu: 0, legs: [{}, {}], size: {SIZE} }}\n        - {{ lu: 3, legs: [{}, {}], size: {SIZE} }}\n",
        leg("a"),
        leg("b"),
        leg("c"),
        leg("d")
    )
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
    let peer: PathBuf = d.join("fio.img");
    std::fs::write(&peer, vec![0x5a; SIZE as usize]).expect("peer file");
    // The NBD peer: qemu-nbd serving a file of the same kind with O_DIRECT, the hop an
    // NBD client pays whoever serves it.
    let qemu_img = d.join("qemu.img");
    std::fs::write(&qemu_img, vec![0x5a; SIZE as usize]).expect("qemu-nbd file");
    let qemu_sock = d.join("qemu.sock");
    let _qemu = hvm_tests::Running(
        hvm_tests::tool("qemu-nbd")
            .args([
                "-f",
                "raw",
                "--cache=none",
                "--aio=native",
                "--persistent",
                "--shared=16",
                "-k",
            ])
            .arg(&qemu_sock)
            .arg(&qemu_img)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd"),
    );
    let cfg_text = format!(
        "plugin_dir: {}\nlisten: {{unix: hvm.sock}}\nbackends:\n{}{}virtual_lus:\n  - {{name: u-sync, backend: uring, lu: 0, snapshots: [u-sync-s]}}\n  - {{name: u-snap, backend: uring, lu: 3, snapshots: [u-snap-s]}}\n  - {{name: t-sync, backend: threads, lu: 0, snapshots: [t-sync-s]}}\n  - {{name: t-snap, backend: threads, lu: 3, snapshots: [t-snap-s]}}\n",
        hvm_tests::target_dir().display(),
        backend("uring", "uring", d),
        backend("threads", "threads", d),
    );
    let cfg = Config::parse(&cfg_text, "bench.yaml").expect("config");
    let agent = std::sync::Arc::new(agent::build(&cfg, d, Some(d)).expect("agent"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let listeners = rt.block_on(service::listen(&agent)).expect("listen");
    let sock = agent.socket.clone();
    let uri = |e: &str| format!("nbd+unix:///{e}?socket={}", sock.display());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::scope(|s| {
        let (agent, rt) = (&agent, &rt);
        s.spawn(move || {
            rt.block_on(service::serve(agent, listeners, async {
                let _ = stop_rx.await;
            }))
        });
        let names = ["u-sync", "u-snap", "t-sync", "t-snap"];
        for n in names {
            hvm_tests::fio_fill(&uri(n), SIZE);
        }
        for n in ["u-snap", "t-snap"] {
            let (mgr, vlu) = agent.virtual_lu(n).expect("virtual LU");
            mgr.acquire(vlu).expect("acquire");
        }
        println!(
            "file legs, O_DIRECT, {} MiB, {secs} s per workload; peer: fio io_uring direct=1 on a file in the same directory",
            SIZE >> 20
        );
        println!(
            "{:<36} {:>9} {:>15} {:>15} {:>15} {:>15} {:>15}",
            "workload",
            "fio",
            "qemu-nbd O_DIRECT",
            "uring sync",
            "uring snap",
            "threads sync",
            "threads snap"
        );
        let qemu_uri = format!("nbd+unix:///?socket={}", qemu_sock.display());
        for (name, rw, bs, qd) in WORKLOADS {
            let f = fio_direct(&peer, rw, bs, qd, secs);
            let q = hvm_tests::fio_nbd(&qemu_uri, rw, bs, qd, SIZE, secs);
            let h = names.map(|n| hvm_tests::fio_nbd(&uri(n), rw, bs, qd, SIZE, secs));
            let cell = |x: f64| format!("{x:>8.0} {:>5.2}x", x / f);
            println!(
                "{name:<36} {f:>9.0} {:>15} {:>15} {:>15} {:>15} {:>15}",
                cell(q),
                cell(h[0]),
                cell(h[1]),
                cell(h[2]),
                cell(h[3])
            );
        }
        println!("targets: Snapshot (one leg written) >= 0.9x; Synchronized >= 0.5x on writes, >= 0.9x on reads");
        let _ = stop_tx.send(());
    });
}

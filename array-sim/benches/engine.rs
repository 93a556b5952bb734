//! array-sim benchmark: 4k random read/write IOPS and 1 MiB sequential MB/s of the engine
//! in-process and over a Unix socket, next to fio's `psync` engine on a plain file of the
//! same size in the same directory, all in one run. Queue depth 1, one thread, buffered
//! I/O everywhere (fio without `direct`), so the comparison is the array's own cost.
//!
//! Run: `cargo bench -p array-sim --bench engine`. Needs `fio` (Debian package `fio`).
//! `HVM_BENCH_SECONDS` sets the time per workload (default 3).

use std::path::Path;
use std::process::Command as Process;
use std::sync::Arc;
use std::time::{Duration, Instant};

use array_sim::client::{ArrayClient, SocketClient, Transport};
use array_sim::config::ArrayConfig;
use array_sim::engine::Engine;
use array_sim::server::{self, Address, Listener};
use hvm_core::backend::Backend;
use hvm_core::LuId;

const SIZE: u64 = 512 << 20;
const LBAS: u64 = SIZE / 512;

#[derive(Clone, Copy)]
enum Workload {
    RandRead4k,
    RandWrite4k,
    SeqRead1m,
    SeqWrite1m,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::RandRead4k => "4k random read (IOPS)",
            Workload::RandWrite4k => "4k random write (IOPS)",
            Workload::SeqRead1m => "1 MiB sequential read (MB/s)",
            Workload::SeqWrite1m => "1 MiB sequential write (MB/s)",
        }
    }
    fn fio(self) -> (&'static str, &'static str, bool) {
        match self {
            Workload::RandRead4k => ("randread", "4k", true),
            Workload::RandWrite4k => ("randwrite", "4k", true),
            Workload::SeqRead1m => ("read", "1m", false),
            Workload::SeqWrite1m => ("write", "1m", false),
        }
    }
    fn block(self) -> u64 {
        match self {
            Workload::RandRead4k | Workload::RandWrite4k => 4096,
            _ => 1 << 20,
        }
    }
}

fn seconds() -> Duration {
    Duration::from_secs_f64(
        std::env::var("HVM_BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3.0),
    )
}

/// IOPS for the 4k workloads, MB/s for the 1 MiB ones.
fn run_backend<B: Backend>(b: &B, w: Workload) -> f64 {
    let block = w.block();
    let mut buf = vec![0x5au8; block as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_seq = 0u64;
    let (t, limit) = (Instant::now(), seconds());
    let mut ops = 0u64;
    while t.elapsed() < limit {
        for _ in 0..64 {
            let off = match w {
                Workload::RandRead4k | Workload::RandWrite4k => {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % (SIZE / block)) * block
                }
                _ => {
                    let o = next_seq;
                    next_seq = (next_seq + block) % SIZE;
                    o
                }
            };
            let r = match w {
                Workload::RandRead4k | Workload::SeqRead1m => b.read(LuId(1), off / 512, &mut buf),
                _ => b.write(LuId(1), off / 512, &buf, false),
            };
            r.expect("I/O through the array");
            ops += 1;
        }
    }
    rate(w, ops, t.elapsed())
}

fn rate(w: Workload, ops: u64, d: Duration) -> f64 {
    match w {
        Workload::RandRead4k | Workload::RandWrite4k => ops as f64 / d.as_secs_f64(),
        _ => (ops * w.block()) as f64 / 1e6 / d.as_secs_f64(),
    }
}

fn run_fio(file: &Path, w: Workload) -> f64 {
    let (rw, bs, random) = w.fio();
    let out = Process::new("fio")
        .args([
            "--name=plain",
            "--ioengine=psync",
            "--iodepth=1",
            "--numjobs=1",
            "--time_based",
            "--output-format=json",
            "--randrepeat=0",
            // Keep the page cache, as the array's files keep theirs.
            "--invalidate=0",
        ])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={SIZE}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--runtime={}", seconds().as_secs_f64().max(1.0)))
        .output()
        .unwrap_or_else(|e| {
            eprintln!("fio is required for this benchmark (apt-get install fio): {e}");
            std::process::exit(2);
        });
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
    let job = &v["jobs"][0][if rw.contains("read") { "read" } else { "write" }];
    if random {
        job["iops"].as_f64().unwrap_or(0.0)
    } else {
        job["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("bench directory");
    let cfg = ArrayConfig::parse(
        &format!(
            "kind: stateless\ndisks: [{{name: d0}}]\nlus: [{{lun: 1, blocks: {LBAS}, disk: d0}}]\n"
        ),
        "bench.yaml",
    )
    .expect("config");
    let engine = Arc::new(Engine::open(&cfg, Some(&dir.path().join("array"))).expect("engine"));
    let in_process = ArrayClient::new(engine.clone());

    // The same engine behind the daemon's server, on a Unix socket.
    let sock = dir.path().join("array.sock");
    let addr = Address::Unix(sock.clone());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let listener = rt.block_on(Listener::bind(&addr)).expect("bind");
    rt.spawn(server::run(
        engine.clone(),
        listener,
        std::future::pending(),
    ));
    let socket = ArrayClient::new(SocketClient::connect(&addr).expect("connect"));
    socket
        .transport()
        .execute(1, &[0, 0, 0, 0, 0, 0], &[])
        .expect("TEST UNIT READY");

    let plain = dir.path().join("plain.img");
    println!(
        "array-sim vs a plain file, {} MiB, queue depth 1, {:?} per workload, in {}",
        SIZE >> 20,
        seconds(),
        dir.path().display()
    );
    println!(
        "{:<30} {:>12} {:>12} {:>7} {:>12} {:>7}",
        "workload", "fio psync", "in-process", "ratio", "unix socket", "ratio"
    );
    // Fill both files once, untimed, so neither side pays for allocating blocks or reads
    // sparse holes, and both start with the file in the page cache.
    let fill = std::fs::write(&plain, vec![0xa5u8; SIZE as usize]);
    fill.expect("fill the plain file");
    let chunk = vec![0xa5u8; 1 << 20];
    for off in (0..SIZE).step_by(chunk.len()) {
        in_process
            .write(LuId(1), off / 512, &chunk, false)
            .expect("fill the LU");
    }
    for w in [
        Workload::SeqWrite1m,
        Workload::RandWrite4k,
        Workload::SeqRead1m,
        Workload::RandRead4k,
    ] {
        let peer = run_fio(&plain, w);
        let a = run_backend(&in_process, w);
        let b = run_backend(&socket, w);
        println!(
            "{:<30} {:>12.0} {:>12.0} {:>6.2}x {:>12.0} {:>6.2}x",
            w.name(),
            peer,
            a,
            a / peer,
            b,
            b / peer
        );
    }
    println!("target: in-process >= 0.8x the plain file");
}

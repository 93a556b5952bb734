//! 4k random read and write IOPS through a loaded plugin (the stateless driver's `.so`,
//! embedded array) next to the same engine called directly, in one run; queue depth 1,
//! one thread, so the per-call cost of the plugin boundary is what differs.
//!
//! Run: `cargo bench -p hvm-tests --bench plugin_overhead` (target: plugin >= 0.95x).

use std::sync::Arc;
use std::time::{Duration, Instant};

use array_sim::client::ArrayClient;
use array_sim::config::ArrayConfig;
use array_sim::engine::Engine;
use hvm_core::backend::Backend;
use hvm_core::LuId;
use hvm_plugin_abi::host::Plugin;

const BLOCKS: u64 = 262_144; // 128 MiB

fn config(dir: &std::path::Path) -> String {
    format!(
        "kind: stateless\ndir: {}\ndisks: [{{name: d0}}]\nlus:\n  - {{lun: 1, blocks: {BLOCKS}, disk: d0}}\n  - {{lun: 2, blocks: {BLOCKS}, disk: d0}}\nmirroring:\n  - {{mirror: 0, origin: 1, mate: 2}}\n",
        dir.display()
    )
}

fn iops(b: &dyn Backend, write: bool, secs: f64) -> f64 {
    let mut buf = vec![0x5au8; 4096];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let (t, limit) = (Instant::now(), Duration::from_secs_f64(secs));
    let mut ops = 0u64;
    while t.elapsed() < limit {
        for _ in 0..256 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lba = (x % (BLOCKS / 8)) * 8;
            if write {
                b.write(LuId(0), lba, &buf, false).expect("write");
            } else {
                b.read(LuId(0), lba, &mut buf).expect("read");
            }
            ops += 1;
        }
    }
    ops as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: f64 = std::env::var("HVM_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("bench directory");
    // Both sides use the same LU files (never at the same time), so page cache and
    // writeback state are shared and only the call path differs.
    let lu_dir = dir.path().join("array");
    let cfg = ArrayConfig::parse(&config(&lu_dir), "direct.yaml").expect("config");
    let direct = ArrayClient::new(Arc::new(Engine::open(&cfg, None).expect("engine")));

    let plugin = Plugin::load(&hvm_tests::plugin_path("stateless")).expect("load plugin");
    let params = format!(
        "array:\n  embedded:\n{}",
        config(&lu_dir)
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    );
    let loaded = plugin.open(&params).expect("open plugin");

    // Fill both so reads find data, untimed.
    let chunk = vec![0xa5u8; 1 << 20];
    for lba in (0..BLOCKS).step_by(2048) {
        direct.write(LuId(0), lba, &chunk, false).expect("fill");
        loaded.write(LuId(0), lba, &chunk, false).expect("fill");
    }
    println!("4k random I/O, queue depth 1, {secs} s each, stateless array embedded");
    println!(
        "{:<12} {:>14} {:>14} {:>14}",
        "", "engine direct", "loaded plugin", "median ratio"
    );
    const SLICES: usize = 10;
    for (name, write) in [("read IOPS", false), ("write IOPS", true)] {
        // Paired short slices, alternating which goes first, so drift on a shared
        // machine hits both sides alike; the median of the pairs' ratios is reported.
        let slice = secs / SLICES as f64;
        let (mut a, mut b, mut ratios) = (0.0, 0.0, Vec::new());
        for i in 0..SLICES {
            let (x, y) = if i % 2 == 0 {
                let x = iops(&direct, write, slice);
                (x, iops(&loaded, write, slice))
            } else {
                let y = iops(&loaded, write, slice);
                (iops(&direct, write, slice), y)
            };
            a += x / SLICES as f64;
            b += y / SLICES as f64;
            ratios.push(y / x);
        }
        ratios.sort_by(f64::total_cmp);
        let median = (ratios[SLICES / 2 - 1] + ratios[SLICES / 2]) / 2.0;
        println!("{name:<12} {a:>14.0} {b:>14.0} {median:>13.3}x");
    }
    println!("target: loaded plugin >= 0.95x the engine called directly");
}

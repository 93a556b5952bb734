//! Live move benchmark (issue 17): a virtual LU moved from an embedded array to file
//! legs, against a raw copy of the same bytes between the same places (two `dd`s with
//! O_DIRECT writes, one per leg, at once, as the move writes both legs); and a client's
//! 4k write latency (fio's nbd engine, QD1) while idle and during the move.
//!
//! Run: `cargo bench -p hvm-tests --bench move` (needs fio, dd).

use std::path::Path;
use std::time::{Duration, Instant};

use hvm_tests::agent::Agent;
use hvm_tests::tool;

const SIZE: u64 = 1 << 30;

/// fio's nbd engine, 4k random writes at QD1 for `secs`: (IOPS, p50 µs, p99 µs).
fn fio_latency(uri: &str, secs: u32) -> (f64, f64, f64) {
    let out = tool("fio")
        .args([
            "--name=lat",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=1",
            "--time_based",
            "--output-format=json",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--size={SIZE}"))
        .arg(format!("--runtime={secs}"))
        .output()
        .expect("fio");
    assert!(
        out.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = out.stdout.iter().position(|b| *b == b'{').unwrap_or(0);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout[start..]).expect("fio JSON");
    let w = &v["jobs"][0]["write"];
    let pct = |p: &str| w["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1e3;
    (
        w["iops"].as_f64().unwrap_or(0.0),
        pct("50.000000"),
        pct("99.000000"),
    )
}

/// Seconds for two `dd`s at once, `src` to each of `dsts`, 1 MiB blocks, O_DIRECT writes.
fn raw_copy(src: &Path, dsts: [&Path; 2]) -> f64 {
    let t = Instant::now();
    let mut children: Vec<_> = dsts
        .iter()
        .map(|d| {
            tool("dd")
                .arg(format!("if={}", src.display()))
                .arg(format!("of={}", d.display()))
                .args(["bs=1M", "oflag=direct", "conv=notrunc,fsync", "status=none"])
                .spawn()
                .expect("dd")
        })
        .collect();
    for c in &mut children {
        assert!(c.wait().expect("dd").success());
    }
    t.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("bench dir");
    let d = dir.path();
    let blocks = SIZE / 512;
    let state = d.join("state");
    std::fs::create_dir_all(state.join("legs")).expect("legs dir");
    let cfg = d.join("agent.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen:\n  unix: nbd.sock\nbackends:\n  - name: array0\n    plugin: stateless\n    params:\n      array:\n        embedded:\n          kind: stateless\n          dir: array0\n          disks: [{{ name: d0 }}, {{ name: d1 }}]\n          lus:\n            - {{ lun: 1, blocks: {blocks}, disk: d0 }}\n            - {{ lun: 2, blocks: {blocks}, disk: d1 }}\n          mirroring:\n            - {{ mirror: 0, origin: 1, mate: 2 }}\n  - name: legs0\n    plugin: file\n    params:\n      create: true\n      volumes:\n        - {{ lu: 0, legs: [legs/a.img, legs/b.img], size: {SIZE} }}\nvirtual_lus:\n  - {{ name: db, backend: array0, lu: 0, snapshots: [db-snap] }}\n"
        ),
    )
    .expect("config");
    let a = Agent::start_config(&cfg, &state);
    let uri = a.uri("db");
    hvm_tests::fio_fill(&uri, SIZE);

    // The peer: the same bytes from the array's LU file to two files of the same kind.
    let (pa, pb) = (d.join("peer-a.img"), d.join("peer-b.img"));
    for p in [&pa, &pb] {
        std::fs::File::create(p)
            .and_then(|f| f.set_len(SIZE))
            .expect("peer file");
    }
    let src = state.join("array0/lu1.img");
    let peer_s = raw_copy(&src, [&pa, &pb]);

    let status = || {
        let all = a.json(&["lu", "list"]);
        let db = all
            .as_array()
            .and_then(|l| l.iter().find(|l| l["name"] == "db").cloned());
        db.map(|l| l["move"].clone()).unwrap_or_default()
    };
    let wait_done = || loop {
        let m = status();
        if m["phase"] != "copying" {
            assert_eq!(m["phase"], "done", "{m}");
            break m;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let start = |to: &str, rate: &str| {
        let m = a.json(&["lu", "move", "db", "--to", to, "--rate", rate]);
        assert_eq!(m["phase"], "copying", "{m}");
    };
    // Throughput, with no client I/O (as the raw copy had none); then back home.
    start("legs0", "0");
    let done = wait_done();
    start("array0", "0");
    wait_done();
    // Client latency: idle, during an unthrottled move (cancelled after), and during
    // a move limited to 100 MiB/s.
    let idle = fio_latency(&uri, 3);
    start("legs0", "0");
    let during = fio_latency(&uri, 2);
    let full_moving = status()["phase"] == "copying";
    a.json(&["lu", "move", "db", "--cancel"]);
    start("legs0", "100M");
    let limited = fio_latency(&uri, 2);
    let limited_moving = status()["phase"] == "copying";
    wait_done();
    let move_s = done["elapsed_ms"].as_f64().unwrap_or(0.0) / 1e3;
    let mib = (SIZE >> 20) as f64;
    println!(
        "move of a {} MiB virtual LU, embedded array -> file legs (O_DIRECT, both legs written)",
        SIZE >> 20
    );
    println!(
        "  hvm move     {move_s:>7.2} s  {:>7.1} MiB/s  (switch {:.2} ms)",
        mib / move_s,
        done["switch_ms"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  raw copy     {peer_s:>7.2} s  {:>7.1} MiB/s  (2 x dd bs=1M oflag=direct)",
        mib / peer_s
    );
    println!(
        "  ratio (throughput, hvm / raw): {:.2}x   target >= 0.8x",
        peer_s / move_s
    );
    println!("client 4k random writes, QD1 (fio nbd engine):");
    let row = |name: &str, x: (f64, f64, f64), moving: bool| {
        println!(
            "  {name:<26} {:>8.0} IOPS  p50 {:>8.1} us  p99 {:>8.1} us  p99 {:>6.2}x idle{}",
            x.0,
            x.1,
            x.2,
            x.2 / idle.2.max(1e-9),
            if moving {
                ""
            } else {
                "  (the move ended before fio did)"
            }
        );
    };
    row("idle", idle, true);
    row("during a move", during, full_moving);
    row("during a move at 100M/s", limited, limited_moving);
}

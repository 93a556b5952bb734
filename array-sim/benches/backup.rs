//! array-sim backup benchmark (EP 1 058 190), in one run:
//!
//! 1. Resync time after an area split of 1 %, 10 % and 100 % of a volume, with the same
//!    write load spread over the whole volume during the split; a raw copy of the whole
//!    volume file is the peer.
//! 2. The host's write latency (p50/p99) during a working-volume copy-on-write backup
//!    versus during the prior art's copy that makes writes to blocks not yet copied wait
//!    until the whole copy ends ([0006]).
//!
//! Disks have a service-time model (`iops`, `bandwidth_mb_s`) so copies take disk time.
//! Run: `cargo bench -p array-sim --bench backup`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use array_sim::client::ArrayClient;
use array_sim::config::ArrayConfig;
use array_sim::engine::Engine;
use hvm_core::array_backup::{Area, BackupOp, BackupReply, JobState, PairState};
use hvm_core::backend::Backend;
use hvm_core::LuId;

const BLOCKS: u64 = 65536; // 32 MiB
const BS: usize = 512;

type Client = ArrayClient<Arc<Engine>>;

fn array(dir: &std::path::Path) -> Client {
    let yaml = format!(
        "kind: mode-select
disks: [{{name: d0, iops: 20000, bandwidth_mb_s: 400}}, {{name: d1, iops: 20000, bandwidth_mb_s: 400}}, {{name: d2, iops: 20000, bandwidth_mb_s: 400}}]
lus:
  - {{lun: 10, blocks: {BLOCKS}, disk: d0}}
  - {{lun: 11, blocks: {BLOCKS}, disk: d1}}
  - {{lun: 20, blocks: {BLOCKS}, disk: d2}}
backup:
  blocks_per_bit: 8
  devices: [{{name: tape0, file: tape0.rec}}]
  work: [20]
"
    );
    let cfg = ArrayConfig::parse(&yaml, "bench.yaml").expect("config");
    ArrayClient::new(Arc::new(Engine::open(&cfg, Some(dir)).expect("engine")))
}

fn op(c: &Client, o: BackupOp) -> BackupReply {
    c.backup(&o).unwrap_or_else(|e| panic!("{o:?}: {e}"))
}

fn wait_state(c: &Client, want: PairState) {
    loop {
        if let BackupReply::Pair(p) = op(c, BackupOp::PairStatus { lu: 10 }) {
            if p.state == want {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// 4 KiB writes at random over `area` for `dur`; returns each write's latency.
fn write_load(c: &Client, lu: u32, area: Area, dur: Duration, seed: u64) -> Vec<Duration> {
    let mut x = seed | 1;
    let data = vec![0x5au8; 8 * BS];
    let mut lat = Vec::new();
    let end = Instant::now() + dur;
    while Instant::now() < end {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let lba = area.start + (x % (area.blocks / 8)) * 8;
        let t = Instant::now();
        c.write(LuId(lu), lba, &data, false).expect("write");
        lat.push(t.elapsed());
    }
    lat
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("bench directory");
    let whole = Area {
        start: 0,
        blocks: BLOCKS,
    };

    // The peer: a raw copy of a whole volume's file.
    let dir = base.path().join("raw");
    let c = array(&dir);
    c.write(LuId(10), 0, &vec![1u8; BLOCKS as usize * BS], false)
        .expect("fill");
    let t = Instant::now();
    std::fs::copy(dir.join("lu10.img"), dir.join("copy.img")).expect("raw copy");
    let raw = t.elapsed();

    println!("resync after an area split, {} MiB volume, 8 blocks per bit, the same 4 KiB random write load (0.5 s over the whole volume) during the split", (BLOCKS * BS as u64) >> 20);
    println!(
        "{:>8} {:>12} {:>12} {:>12} {:>10}",
        "split", "diff units", "copied MiB", "resync ms", "vs raw copy"
    );
    for p in [1u64, 10, 100] {
        let dir = base.path().join(format!("split{p}"));
        let c = array(&dir);
        op(
            &c,
            BackupOp::PairCreate {
                primary: 10,
                secondary: 11,
            },
        );
        wait_state(&c, PairState::Duplex);
        let split = Area {
            start: 0,
            blocks: BLOCKS * p / 100,
        };
        op(
            &c,
            BackupOp::PairSplit {
                lu: 10,
                areas: vec![split],
            },
        );
        write_load(&c, 10, whole, Duration::from_millis(500), 7);
        let before = match op(&c, BackupOp::PairStatus { lu: 10 }) {
            BackupReply::Pair(s) => s,
            r => panic!("{r:?}"),
        };
        let t = Instant::now();
        op(
            &c,
            BackupOp::PairResync {
                lu: 10,
                areas: vec![],
            },
        );
        wait_state(&c, PairState::Duplex);
        let took = t.elapsed();
        let after = match op(&c, BackupOp::PairStatus { lu: 10 }) {
            BackupReply::Pair(s) => s,
            r => panic!("{r:?}"),
        };
        println!(
            "{:>7}% {:>12} {:>12.1} {:>12.1} {:>9.2}x",
            p,
            before.diff_units,
            (after.copied_bytes - before.copied_bytes) as f64 / (1 << 20) as f64,
            took.as_secs_f64() * 1e3,
            took.as_secs_f64() / raw.as_secs_f64()
        );
    }
    println!(
        "raw copy of the whole volume file: {:.1} ms",
        raw.as_secs_f64() * 1e3
    );

    println!();
    println!(
        "host write latency during a backup of the whole {} MiB volume to a device",
        (BLOCKS * BS as u64) >> 20
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9} {:>8}",
        "copy", "writes", "p50 µs", "p99 µs", "copy ms"
    );
    let mut p50s = Vec::new();
    for (name, wait) in [
        ("working-volume COW ([0062]-[0097])", false),
        ("writes wait for the copy ([0006])", true),
    ] {
        let dir = base.path().join(format!("cow{wait}"));
        let c = array(&dir);
        let job = match op(
            &c,
            BackupOp::Cow {
                lu: 10,
                device: "tape0".into(),
                ranges: vec![whole],
                same_block: false,
                wait_for_copy: wait,
            },
        ) {
            BackupReply::Started { job } => job,
            r => panic!("{r:?}"),
        };
        let t = Instant::now();
        let mut lat = Vec::new();
        loop {
            lat.extend(write_load(
                &c,
                10,
                whole,
                Duration::from_millis(20),
                11 + lat.len() as u64,
            ));
            if let BackupReply::Job(j) = op(&c, BackupOp::Job { id: job }) {
                if j.state != JobState::Running {
                    break;
                }
            }
        }
        let took = t.elapsed();
        let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
        p50s.push((p50, p99));
        println!(
            "{name:<34} {:>9} {:>9.1} {:>9.1} {:>8.1}",
            lat.len(),
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            took.as_secs_f64() * 1e3
        );
    }
    if let [(c50, c99), (w50, w99)] = p50s[..] {
        println!(
            "the waiting copy's latency / COW's: p50 {:.1}x, p99 {:.1}x",
            w50.as_secs_f64() / c50.as_secs_f64(),
            w99.as_secs_f64() / c99.as_secs_f64()
        );
    }
}

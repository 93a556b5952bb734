//! Backups as a product (issue 19): a full backup's throughput against `nbdcopy` of the
//! same snapshot export to a file, and an incremental after 5 % random changes against
//! the full, in the same run.
//!
//! A virtual LU on an array-sim daemon, filled with data that compresses about 2:1 (half
//! of each 4 KiB block random, half a repeated text). Both copies read the database
//! host's snapshot export over the same Unix socket: `nbdcopy` writes a raw file;
//! `hvmctl backup run --full --via nbd` stores hashed, zstd-compressed chunks in a new
//! repository (a new one each round, so no round finds its chunks already stored) and
//! is durable when it ends (synced before its manifest); `nbdcopy --flush` is shown too,
//! as the peer that also syncs its output. A third row has the backup host read the
//! snapshot from the array itself (`--via array`, what `backup run` does by default when
//! the backup host reaches the array: the database host serves none of it [0071]).
//! The rounds take turns; medians are shown.
//! Last, hvm's per-piece work (BLAKE3, zstd, write) timed alone on one thread: the CPU
//! floor of a full backup on this machine.
//!
//! `cargo bench -p hvm-tests --bench backup_product` (HVM_BENCH_MIB, default 1024;
//! HVM_BENCH_ROUNDS, default 3).

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use hvm_host_agent::nbd::client::Client;
use hvm_tests::backup::{Hosts, Setup};
use hvm_tests::bench::{median, thread_cpu};
use serde_json::Value;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, b: &mut [u8]) {
        for w in b.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            w.copy_from_slice(&x[..w.len()]);
        }
    }
}

/// A 4 KiB block: 2 KiB random, 2 KiB of text.
fn block(rng: &mut Rng, out: &mut [u8]) {
    rng.fill(&mut out[..2048]);
    let text = b"INSERT INTO pgbench_history VALUES (1, 2, 3, 4, now()); ";
    for (i, b) in out[2048..].iter_mut().enumerate() {
        *b = text[i % text.len()];
    }
}

fn fill(sock: &Path, size: u64) {
    let mut c = Client::connect(sock, "a").expect("connect");
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        for b in buf[..n].chunks_mut(4096) {
            block(&mut rng, b);
        }
        c.write(at, &buf[..n], false).expect("write");
        at += n as u64;
    }
    c.flush().expect("flush");
}

/// 5 % of the 4 KiB blocks, at random, get new data.
fn change(sock: &Path, size: u64, seed: u64) -> u64 {
    let mut c = Client::connect(sock, "a").expect("connect");
    let mut rng = Rng(seed);
    let blocks = size / 4096;
    let n = blocks / 20;
    let mut b = vec![0u8; 4096];
    for _ in 0..n {
        block(&mut rng, &mut b);
        c.write((rng.next() % blocks) * 4096, &b, false)
            .expect("write");
    }
    c.flush().expect("flush");
    n * 4096
}

/// What hvm does per piece, each step alone on one thread over 64 MiB of the bench's
/// data in 4 MiB pieces: BLAKE3 (a new repository's chunk names), zstd, and storing
/// (hash, compress, stage, and the sync of a new repository). MiB per second of this
/// thread's CPU time.
fn chunk_work(dir: &Path) -> [f64; 3] {
    use hvm_host_agent::backups::format::{blake3, compress_with, Repo};
    use hvm_host_agent::backups::store::DirStore;
    let repo = Repo::create(Box::new(DirStore::open(&dir.join("floor")).expect("store")))
        .expect("repository");
    let mut rng = Rng(7);
    let mut pieces = vec![vec![0u8; 4 << 20]; 16];
    for p in &mut pieces {
        for b in p.chunks_mut(4096) {
            block(&mut rng, b);
        }
    }
    let cpu = || thread_cpu().as_secs_f64();
    let rate = |f: &dyn Fn(&[u8])| {
        let t = cpu();
        pieces.iter().for_each(|p| f(p));
        64.0 / (cpu() - t)
    };
    let hash = rate(&|p| drop(blake3(p)));
    let zstd = rate(&|p| compress_with(p, |_| ()).expect("zstd"));
    let store = rate(&|p| drop(repo.put_chunk(p).expect("put_chunk")));
    let t = cpu();
    repo.store().sync().expect("sync");
    let store = 64.0 / (64.0 / store + cpu() - t);
    [hash, zstd, store]
}

fn wait_synchronized(hosts: &Hosts) {
    while hosts.db.mode("a") != "Synchronized" {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// `nbdcopy` of the snapshot export to a new file (with `--flush`: synced at the end, as
/// a backup is): seconds.
fn nbdcopy(hosts: &Hosts, sock: &Path, out: &Path, flush: bool) -> f64 {
    let acquired = hosts.db.hvmctl(&["snapshot", "acquire", "a"]);
    assert!(acquired.status.success(), "{acquired:?}");
    let t = Instant::now();
    let st = Command::new("nbdcopy")
        .args(flush.then_some("--flush"))
        .arg(format!("nbd+unix:///a-snap?socket={}", sock.display()))
        .arg(out)
        .status()
        .expect("nbdcopy (Debian package libnbd-bin)");
    let secs = t.elapsed().as_secs_f64();
    assert!(st.success());
    let deleted = hosts.db.hvmctl(&["snapshot", "delete", "a", "--wait"]);
    assert!(deleted.status.success(), "{deleted:?}");
    let _ = std::fs::remove_file(out);
    secs
}

/// `hvmctl backup run --wait-resync` into `target`: the copy step's seconds and the
/// report.
fn hvm(hosts: &Hosts, target: &str, extra: &[&str]) -> (f64, Value) {
    let mut args = vec!["--wait-resync"];
    args.extend(extra);
    let (out, v) = hosts.run(&["a"], target, &args);
    assert!(
        out.status.success(),
        "{}\n{v}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ms = hvm_tests::backup::steps(&v)
        .into_iter()
        .find(|(n, _)| *n == "copy")
        .map_or(0.0, |(_, ms)| ms);
    wait_synchronized(hosts);
    (ms / 1000.0, v)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let size = env("HVM_BENCH_MIB", 1024) << 20;
    let rounds = env("HVM_BENCH_ROUNDS", 3) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = Hosts::start(
        dir.path(),
        &Setup {
            lu_bytes: size,
            names: &["a"],
            freeze: "    deadline_ms: 10000\n",
        },
    );
    let sock = hosts.db.state.join("nbd.sock");
    fill(&sock, size);
    let nbd = format!("unix:{}", sock.display());
    let via_nbd = ["--via", "nbd", "--db-nbd", &nbd];
    let (mut peer, mut flushed, mut ours, mut stored) = (Vec::new(), Vec::new(), Vec::new(), 0);
    let mut array = Vec::new();
    let mut last = String::new();
    let img = dir.path().join("nbdcopy.img");
    for round in 0..rounds {
        peer.push(nbdcopy(&hosts, &sock, &img, false));
        flushed.push(nbdcopy(&hosts, &sock, &img, true));
        let (secs, v) = hvm(
            &hosts,
            &format!("array-{round}"),
            &["--via", "array", "--full"],
        );
        assert!(
            v["copy"]["lus"][0]["source"]
                .as_str()
                .is_some_and(|s| s.starts_with("array:")),
            "{v}"
        );
        array.push(secs);
        // The full over NBD last: the incremental below is of it, in its repository.
        last = format!("full-{round}");
        let (secs, v) = hvm(&hosts, &last, &[&via_nbd[..], &["--full"]].concat());
        stored = v["copy"]["stored_bytes"].as_u64().unwrap_or(0);
        ours.push(secs);
    }
    let written = change(&sock, size, 42);
    let (inc_secs, inc) = hvm(&hosts, &last, &via_nbd);
    let l = &inc["copy"]["lus"][0];
    let (p, pf, o, a) = (
        median(&peer),
        median(&flushed),
        median(&ours),
        median(&array),
    );
    let work = chunk_work(dir.path());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mib = size as f64 / 1048576.0;
    println!(
        "backup_product: {mib:.0} MiB virtual LU, data ~2:1 compressible, {rounds} rounds, medians"
    );
    println!(
        "  nbdcopy snapshot export -> raw file        {p:>7.2} s  {:>6.0} MiB/s  {mib:.0} MiB written",
        mib / p
    );
    println!(
        "  nbdcopy --flush (synced at the end)        {pf:>7.2} s  {:>6.0} MiB/s",
        mib / pf
    );
    println!(
        "  hvm full backup (chunks, zstd, BLAKE3)     {o:>7.2} s  {:>6.0} MiB/s  {:.0} MiB stored   ratio {:.2}x (target >= 1.0), {:.2}x nbdcopy --flush",
        mib / o,
        stored as f64 / 1048576.0,
        p / o,
        pf / o
    );
    println!(
        "  hvm full backup reading the array          {a:>7.2} s  {:>6.0} MiB/s  (--via array, the default's source when the backup host reaches the array)   {:.2}x nbdcopy",
        mib / a,
        p / a
    );
    let [hash, zstd, all] = work;
    println!(
        "  hvm's work per byte, 1 thread, MiB per CPU second: BLAKE3 {hash:.0}, zstd {zstd:.0}, all of a chunk (both, write, sync) {all:.0}: {mib:.0} MiB need {:.2} s of CPU, at best {:.2} s on {cores} idle cores",
        mib / all,
        mib / all / cores as f64
    );
    println!(
        "  hvm incremental after 5 % random 4 KiB writes ({}): {inc_secs:.2} s ({:.3}x the full's time), {:.1} MiB copied ({:.3}x the full's), {:.1} MiB new in the repository; {:.1} MiB written per tracking, {:.1} MiB by the writer (with repeats)",
        l["kind"].as_str().unwrap_or("?"),
        inc_secs / o,
        l["copied_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0,
        l["copied_bytes"].as_u64().unwrap_or(0) as f64 / size as f64,
        inc["copy"]["stored_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0,
        l["written_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0,
        written as f64 / 1048576.0,
    );
}

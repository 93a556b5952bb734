//! Update-location table benchmark (issue: core model).
//!
//! 10 million random adds of 8-sector ranges over a 1 TiB LU, then the same 10 million
//! ranges removed in another random order; ns per operation and bytes per range, for our
//! table and for the `rangemap` crate's `RangeInclusiveSet` in the same run. Then a
//! criterion measurement of add+remove at a steady 1 million ranges.
//!
//! Then (issue 20) the memory budget: 1 M, 10 M and 100 M random 4 KiB writes over a
//! 16 TiB LU into a table with the default budget (32 MiB per TiB: 512 MiB), and into an
//! exact one while it fits in memory; add cost, bytes held (measured by a counting
//! allocator: after the last add, and the peak, which includes a coarsening's rebuild),
//! the granularity reached, and every write checked covered afterwards.
//!
//! Run: `cargo bench -p hvm-core --bench update_location`. Add `-- --quick` to skip the
//! criterion part, `-- --budget` to run only the budget table; `HVM_BENCH_WRITES=1000000,
//! 10000000` picks the write counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion};
use hvm_core::{Extent, TableBudget, UpdateLocationTable};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Counts live heap bytes, so bytes per range is measured, not estimated.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// The most `LIVE` has been since it was last reset.
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counted as the difference: a large block is grown by remapping its pages, so
        // the old and new sizes are not both held.
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        // SAFETY: as for dealloc; the new size is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Operations per phase; `HVM_BENCH_OPS` overrides it (to see how the cost grows with
/// the table's size).
fn ops() -> usize {
    std::env::var("HVM_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000)
}
const LU_LBAS: u64 = (1u64 << 40) / 512; // 1 TiB
const RANGE: u64 = 8;

trait RangeSet {
    const NAME: &'static str;
    fn new() -> Self;
    fn add(&mut self, first: u64, last: u64);
    fn remove(&mut self, first: u64, last: u64);
    fn ranges(&self) -> usize;
}

impl RangeSet for UpdateLocationTable {
    const NAME: &'static str = "hvm UpdateLocationTable";
    fn new() -> Self {
        UpdateLocationTable::new()
    }
    fn add(&mut self, first: u64, last: u64) {
        if let Some(e) = Extent::new(first, last) {
            UpdateLocationTable::add(self, e);
        }
    }
    fn remove(&mut self, first: u64, last: u64) {
        if let Some(e) = Extent::new(first, last) {
            UpdateLocationTable::remove(self, e);
        }
    }
    fn ranges(&self) -> usize {
        self.len()
    }
}

impl RangeSet for rangemap::RangeInclusiveSet<u64> {
    const NAME: &'static str = "rangemap RangeInclusiveSet";
    fn new() -> Self {
        rangemap::RangeInclusiveSet::new()
    }
    fn add(&mut self, first: u64, last: u64) {
        self.insert(first..=last);
    }
    fn remove(&mut self, first: u64, last: u64) {
        rangemap::RangeInclusiveSet::remove(self, first..=last);
    }
    fn ranges(&self) -> usize {
        self.iter().count()
    }
}

struct Result {
    add_ns: f64,
    remove_ns: f64,
    ranges: usize,
    bytes_per_range: f64,
}

fn run<S: RangeSet>(adds: &[u64], removes: &[u64]) -> Result {
    let base = LIVE.load(Ordering::Relaxed);
    let mut set = S::new();
    let t = Instant::now();
    for &f in adds {
        set.add(f, f + RANGE - 1);
    }
    let add = t.elapsed();
    let bytes = LIVE.load(Ordering::Relaxed) - base;
    let ranges = set.ranges();
    let t = Instant::now();
    for &f in removes {
        set.remove(f, f + RANGE - 1);
    }
    let remove = t.elapsed();
    assert_eq!(set.ranges(), 0, "{}: removes left ranges behind", S::NAME);
    black_box(&set);
    Result {
        add_ns: add.as_nanos() as f64 / adds.len() as f64,
        remove_ns: remove.as_nanos() as f64 / removes.len() as f64,
        ranges,
        bytes_per_range: bytes as f64 / ranges as f64,
    }
}

fn headline() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let n = ops();
    let adds: Vec<u64> = (0..n).map(|_| rng.gen_range(0..LU_LBAS - RANGE)).collect();
    let mut removes = adds.clone();
    removes.shuffle(&mut rng);
    println!(
        "update-location table: {n} random adds of {RANGE}-sector ranges over a 1 TiB LU, then {n} removes"
    );
    let ours = run::<UpdateLocationTable>(&adds, &removes);
    let peer = run::<rangemap::RangeInclusiveSet<u64>>(&adds, &removes);
    println!(
        "{:<28} {:>10} {:>12} {:>12} {:>14}",
        "", "ranges", "add ns/op", "remove ns/op", "bytes/range"
    );
    for (name, r) in [
        (<UpdateLocationTable as RangeSet>::NAME, &ours),
        (<rangemap::RangeInclusiveSet<u64> as RangeSet>::NAME, &peer),
    ] {
        println!(
            "{:<28} {:>10} {:>12.1} {:>12.1} {:>14.1}",
            name, r.ranges, r.add_ns, r.remove_ns, r.bytes_per_range
        );
    }
    println!(
        "ratio rangemap/hvm (higher = hvm faster or smaller): add {:.2}x, remove {:.2}x, memory {:.2}x",
        peer.add_ns / ours.add_ns,
        peer.remove_ns / ours.remove_ns,
        peer.bytes_per_range / ours.bytes_per_range
    );
    println!(
        "targets: add < 300 ns: {}; remove < 300 ns: {}; < 64 bytes/range: {}",
        verdict(ours.add_ns < 300.0),
        verdict(ours.remove_ns < 300.0),
        verdict(ours.bytes_per_range < 64.0)
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn steady_state(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut table = UpdateLocationTable::new();
    for _ in 0..1_000_000 {
        let f = rng.gen_range(0..LU_LBAS - RANGE);
        table.add(Extent::new(f, f + RANGE - 1).expect("range"));
    }
    c.bench_function("add then remove an 8-sector range, 1M-range table", |b| {
        b.iter_batched(
            || rng.gen_range(0..LU_LBAS - RANGE),
            |f| {
                let e = Extent::new(f, f + RANGE - 1).expect("range");
                table.add(e);
                table.remove(e);
            },
            BatchSize::SmallInput,
        )
    });
}

const LU_16TIB_LBAS: u64 = (16u64 << 40) / 512;
/// 4 KiB in LBAs: writes are 4 KiB aligned.
const WRITE_LBAS: u64 = 8;

fn write_counts() -> Vec<u64> {
    std::env::var("HVM_BENCH_WRITES")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000_000, 10_000_000, 100_000_000])
}

/// The `i`th write of a seeded sequence: a 4 KiB-aligned 4 KiB extent of the 16 TiB LU.
fn writes(n: u64) -> impl Iterator<Item = Extent> {
    let mut rng = StdRng::seed_from_u64(0x20);
    (0..n).map(move |_| {
        let f = rng.gen_range(0..LU_16TIB_LBAS / WRITE_LBAS) * WRITE_LBAS;
        Extent::new(f, f + WRITE_LBAS - 1).expect("4 KiB extent")
    })
}

struct BudgetRow {
    writes: u64,
    budget: Option<TableBudget>,
    add_ns: f64,
    live: usize,
    peak: usize,
    estimate: u64,
    granularity: u64,
    records: usize,
}

/// `n` writes into a table with `budget`; every write is checked covered afterwards.
fn budget_run(n: u64, budget: Option<TableBudget>) -> BudgetRow {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut table = UpdateLocationTable::new();
    table.set_budget(budget);
    let t = Instant::now();
    for e in writes(n) {
        table.add(e);
    }
    let add = t.elapsed();
    let live = LIVE.load(Ordering::Relaxed) - base;
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let missed = writes(n).filter(|&e| !table.covers(e)).count();
    assert_eq!(missed, 0, "{missed} writes not covered");
    BudgetRow {
        writes: n,
        budget,
        add_ns: add.as_nanos() as f64 / n as f64,
        live,
        peak,
        estimate: table.memory_bytes(),
        granularity: table.granularity(),
        records: table.len(),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn budget_table() {
    let budget = TableBudget::for_lu(LU_16TIB_LBAS);
    println!(
        "\nupdate-location table memory budget: random 4 KiB writes over a 16 TiB LU, default budget {:.0} MiB",
        mib(budget.get())
    );
    println!(
        "{:>11} {:>8} {:>9} {:>10} {:>10} {:>12} {:>8} {:>11} {:>11} {:>7}",
        "writes",
        "table",
        "add ns",
        "held MiB",
        "peak MiB",
        "estimate MiB",
        "granule",
        "records",
        "B/write",
        "budget"
    );
    let mut rows = Vec::new();
    for n in write_counts() {
        rows.push(budget_run(n, Some(budget)));
        // The exact table while it stays well inside this machine's memory.
        if n <= 10_000_000 {
            rows.push(budget_run(n, None));
        }
    }
    for r in &rows {
        let within = match r.budget {
            Some(b) => verdict(r.live.max(r.peak) as u64 <= b.get()),
            None => "-",
        };
        println!(
            "{:>11} {:>8} {:>9.0} {:>10.1} {:>10.1} {:>12.1} {:>8} {:>11} {:>11.1} {:>7}",
            r.writes,
            if r.budget.is_some() {
                "budget"
            } else {
                "exact"
            },
            r.add_ns,
            mib(r.live as u64),
            mib(r.peak as u64),
            mib(r.estimate),
            r.granularity,
            r.records,
            r.live as f64 / r.writes as f64,
            within
        );
    }
    println!(
        "granule: LBAs each record is rounded out to (1 = exact); budget: held and peak within it; every write was checked covered"
    );
}

fn main() {
    let budget_only = std::env::args().any(|a| a == "--budget");
    if budget_only {
        budget_table();
        return;
    }
    headline();
    budget_table();
    let quick = std::env::args().any(|a| a == "--quick");
    if !quick {
        let mut c = Criterion::default()
            .configure_from_args()
            .measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_secs(1));
        steady_state(&mut c);
        c.final_summary();
    }
}

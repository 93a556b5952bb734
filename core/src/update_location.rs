//! The update-location table (EP 1 148 416 Fig. 3, [0023], [0036]-[0038]).
//!
//! One table per LU (Fig. 3's "LU" column is the key of whatever map holds the tables).
//! A table is a set of disjoint, non-adjacent inclusive LBA ranges: adding merges with
//! overlapping and adjacent records, so "no multiple information including the same update
//! location exists" ([0038]); removing deletes exactly the given LBAs and splits a record
//! when needed ([0038]'s LBA 10-11 example).
//!
//! Layout, chosen by `cargo bench -p hvm-core --bench update_location`: a `BTreeMap` of
//! ranges (and the `rangemap` crate, which is one) takes about five dependent cache misses
//! per operation at 10 million ranges, ~900 ns on our machines. Here the LBA space is cut
//! into buckets of 4096 LBAs; a bucket's pieces are sorted `u16` offset pairs (4 bytes a
//! range) in a fixed-size block of a per-table pool, reached through a directory of
//! 8-byte slots per 2^24-LBA chunk (4 MiB of directory for a 1 TiB LU, which stays in
//! cache). The slot holds the bucket's length, so an operation is a binary search in a
//! short array it can start at once: about one miss, and no allocator on the path. A range that crosses a bucket
//! boundary is stored as one piece per bucket and reported as one record. A chunk that is
//! wholly recorded (the full copy of [0045]) is kept as a single "full" marker.
//!
//! Costs: search O(log k) in a bucket of k pieces (k <= 2048, so inserting shifts at most
//! 8 KiB); `add` visits every chunk an extent spans (8 GiB each); `total` is O(1); `len`
//! and `iter` walk the table.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use crate::lba::Extent;

const BUCKET_BITS: u32 = 12;
const BUCKET_LBAS: u64 = 1 << BUCKET_BITS;
const CHUNK_BITS: u32 = 12;
const CHUNK_BUCKETS: usize = 1 << CHUNK_BITS;
const CHUNK_SHIFT: u32 = BUCKET_BITS + CHUNK_BITS;
const CHUNK_LBAS: u64 = 1 << CHUNK_SHIFT;
const OFFSET_MASK: u64 = BUCKET_LBAS - 1;

/// A piece of one bucket: first offset in the high half, last offset in the low half.
type Piece = u32;

fn piece(first: u32, last: u32) -> Piece {
    (first << 16) | last
}

fn pf(p: Piece) -> u32 {
    p >> 16
}

fn pl(p: Piece) -> u32 {
    p & 0xffff
}

fn count(p: Piece) -> u64 {
    u64::from(pl(p) - pf(p) + 1)
}

// First offset 0 (high half), last offset 4095 (low half).
const FULL_BUCKET: [Piece; 1] = [BUCKET_LBAS as u32 - 1];

/// Bucket capacities are `4 << class` pieces: 4, 8, ..., 2048 (the most a 4096-LBA
/// bucket can hold, every other LBA recorded).
const CLASSES: usize = 10;

fn class_cap(class: u8) -> usize {
    4 << class
}

/// Add `[f, l]` to the `len` pieces at the front of `b`, which has room for one more;
/// returns the new length and the LBAs that were not there.
fn bucket_add(b: &mut [Piece], len: usize, f: u32, l: u32) -> (usize, u64) {
    // Pieces that start at or before l+1 and end at or after f-1 touch [f, l]; they are a
    // run ending just before `i`.
    let i = b[..len].partition_point(|&p| pf(p) <= l + 1);
    let mut j = i;
    while j > 0 && pl(b[j - 1]) + 1 >= f {
        j -= 1;
    }
    if j == i {
        b.copy_within(i..len, i + 1);
        b[i] = piece(f, l);
        return (len + 1, u64::from(l - f + 1));
    }
    let (nf, nl) = (f.min(pf(b[j])), l.max(pl(b[i - 1])));
    let had: u64 = b[j..i].iter().map(|&p| count(p)).sum();
    b[j] = piece(nf, nl);
    b.copy_within(i..len, j + 1);
    (len - (i - j - 1), u64::from(nl - nf + 1) - had)
}

/// Remove `[f, l]` from the `len` pieces at the front of `b`; returns the new length and
/// the LBAs that were there, or `None`, changing nothing, when the removal splits a piece
/// and `b` has no room for the extra one.
fn bucket_remove(b: &mut [Piece], len: usize, f: u32, l: u32) -> Option<(usize, u64)> {
    let i = b[..len].partition_point(|&p| pf(p) <= l);
    let mut j = i;
    while j > 0 && pl(b[j - 1]) >= f {
        j -= 1;
    }
    if j == i {
        return Some((len, 0));
    }
    let had: u64 = b[j..i].iter().map(|&p| count(p)).sum();
    let (first, last) = (b[j], b[i - 1]);
    let mut keep = [0; 2];
    let mut n = 0;
    if pf(first) < f {
        keep[n] = piece(pf(first), f - 1);
        n += 1;
    }
    if pl(last) > l {
        keep[n] = piece(l + 1, pl(last));
        n += 1;
    }
    let new_len = len - (i - j) + n;
    if new_len > b.len() {
        return None;
    }
    let kept: u64 = keep[..n].iter().map(|&p| count(p)).sum();
    // Replace the run b[j..i] with keep[..n]; n is at most one more than the run.
    b.copy_within(i..len, j + n);
    b[j..j + n].copy_from_slice(&keep[..n]);
    Some((new_len, had - kept))
}

/// A directory slot: where one bucket's pieces are. Packed into 8 bytes so a chunk's
/// directory stays small enough to live in cache: block index (32 bits), number of
/// pieces (16 bits), size class (8 bits). No pieces means no block.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Slot(u64);

impl Slot {
    fn new(block: u32, len: usize, class: u8) -> Slot {
        Slot(u64::from(block) | (len as u64) << 32 | u64::from(class) << 48)
    }
    fn block(self) -> u32 {
        self.0 as u32
    }
    fn len(self) -> usize {
        ((self.0 >> 32) & 0xffff) as usize
    }
    fn class(self) -> u8 {
        (self.0 >> 48) as u8
    }
}

/// The most pieces a pool grows by at once (4 MiB).
const MAX_GROWTH_PIECES: usize = 1 << 20;

/// Fixed-size blocks of pieces, one pool per size class, each a single vector with a
/// stack of free block indexes. Buckets come and go at the rate of writes; the system
/// allocator, with its per-allocation headers and cold free lists, cost more than the
/// table's own work.
#[derive(Clone, Default)]
struct Pools {
    data: [Vec<Piece>; CLASSES],
    free: [Vec<u32>; CLASSES],
}

impl Pools {
    fn alloc(&mut self, class: u8) -> u32 {
        let c = usize::from(class);
        if let Some(i) = self.free[c].pop() {
            return i;
        }
        let cap = class_cap(class);
        let data = &mut self.data[c];
        let i = (data.len() / cap) as u32;
        if data.len() + cap > data.capacity() {
            // Grow by half rather than double, and by at most 4 MiB: less idle memory in a
            // big table, a budget overshot by at most one step, and a large vector is
            // moved by remapping pages, not by copying.
            data.reserve_exact(cap.max((data.len() / 2).min(MAX_GROWTH_PIECES)));
        }
        data.resize(data.len() + cap, 0);
        i
    }

    fn release(&mut self, class: u8, block: u32) {
        self.free[usize::from(class)].push(block);
    }

    fn block(&self, slot: Slot) -> &[Piece] {
        let cap = class_cap(slot.class());
        let at = slot.block() as usize * cap;
        &self.data[usize::from(slot.class())][at..at + slot.len()]
    }

    /// The whole block of `slot` (its capacity, not just its pieces).
    fn block_mut(&mut self, slot: Slot) -> &mut [Piece] {
        let cap = class_cap(slot.class());
        let at = slot.block() as usize * cap;
        &mut self.data[usize::from(slot.class())][at..at + cap]
    }

    /// A slot whose block has room for one more piece: a new block for an empty slot, a
    /// block of the next class for a full one.
    fn with_room(&mut self, slot: Slot) -> Slot {
        let len = slot.len();
        if len == 0 {
            return Slot::new(self.alloc(0), 0, 0);
        }
        if len < class_cap(slot.class()) {
            return slot;
        }
        let class = slot.class() + 1;
        let grown = Slot::new(self.alloc(class), len, class);
        let (old_c, new_c) = (usize::from(slot.class()), usize::from(class));
        let from = slot.block() as usize * class_cap(slot.class());
        let to = grown.block() as usize * class_cap(class);
        // Two different pools (old_c < new_c), so both can be borrowed at once.
        let (lo, hi) = self.data.split_at_mut(new_c);
        hi[0][to..to + len].copy_from_slice(&lo[old_c][from..from + len]);
        self.release(slot.class(), slot.block());
        grown
    }

    /// Store a bucket's new length; an empty bucket gives its block back.
    fn settle(&mut self, slot: Slot, len: usize) -> Slot {
        if len == 0 {
            self.release(slot.class(), slot.block());
            Slot::default()
        } else {
            Slot::new(slot.block(), len, slot.class())
        }
    }

    fn clear(&mut self) {
        *self = Pools::default();
    }

    /// Bytes held by the blocks (used or free) and the free lists.
    fn bytes(&self) -> u64 {
        let pieces: usize = self.data.iter().map(Vec::capacity).sum();
        let free: usize = self.free.iter().map(Vec::capacity).sum();
        (pieces * std::mem::size_of::<Piece>() + free * std::mem::size_of::<u32>()) as u64
    }
}

const WORDS: usize = CHUNK_BUCKETS / 64;

/// Set or clear bucket `slot`'s occupancy bit.
fn mark(occupied: &mut [u64; WORDS], slot: usize, nonempty: bool) {
    let (w, bit) = (slot / 64, 1u64 << (slot % 64));
    if nonempty {
        occupied[w] |= bit;
    } else {
        occupied[w] &= !bit;
    }
}

#[derive(Clone)]
struct Chunk {
    /// `None`: every LBA of the chunk is recorded.
    slots: Option<Box<[Slot]>>,
    /// Bit per bucket: set when the bucket holds pieces, so walks skip empty buckets.
    occupied: Box<[u64; WORDS]>,
    /// LBAs recorded in this chunk.
    lbas: u64,
}

impl Chunk {
    fn empty() -> Self {
        Chunk {
            slots: Some(vec![Slot::default(); CHUNK_BUCKETS].into_boxed_slice()),
            occupied: Box::new([0; WORDS]),
            lbas: 0,
        }
    }

    /// The occupancy bits of word `w` that fall in slots `lo..=hi`.
    fn bits(&self, w: usize, lo: usize, hi: usize) -> u64 {
        let mut bits = if self.slots.is_none() {
            u64::MAX
        } else {
            self.occupied[w]
        };
        if w == lo / 64 {
            bits &= u64::MAX << (lo % 64);
        }
        if w == hi / 64 && hi % 64 != 63 {
            bits &= (1u64 << (hi % 64 + 1)) - 1;
        }
        bits
    }

    /// Occupied slots in `lo..=hi`, in order.
    fn occupied_slots(&self, lo: usize, hi: usize) -> impl Iterator<Item = usize> + '_ {
        (lo / 64..=hi / 64).flat_map(move |w| {
            let mut bits = self.bits(w, lo, hi);
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    w * 64 + b
                })
            })
        })
    }

    fn pieces<'a>(&self, pools: &'a Pools, slot: usize) -> &'a [Piece] {
        match &self.slots {
            Some(s) => pools.block(s[slot]),
            None => &FULL_BUCKET,
        }
    }

    /// The slots, turning a full chunk into explicit full buckets first.
    fn slots_mut(&mut self, pools: &mut Pools) -> &mut [Slot] {
        if self.slots.is_none() {
            *self.occupied = [u64::MAX; WORDS];
            let slots = (0..CHUNK_BUCKETS)
                .map(|_| {
                    let s = pools.with_room(Slot::default());
                    pools.block_mut(s)[0] = FULL_BUCKET[0];
                    pools.settle(s, 1)
                })
                .collect();
            self.slots = Some(slots);
        }
        self.slots.get_or_insert_with(|| Box::new([]))
    }
}

/// Chunk indexes below this (LBAs below 512 TiB) are looked up in a vector; the rest of
/// the 64-bit LBA space in a `BTreeMap`.
const DENSE_CHUNKS: u64 = 1 << 16;

/// chunk index (LBA >> 24) -> chunk; chunks with nothing recorded are removed.
#[derive(Clone, Default)]
struct ChunkMap {
    dense: Vec<Option<Chunk>>,
    sparse: BTreeMap<u64, Chunk>,
    /// Chunks held, for the memory estimate.
    live: usize,
}

impl ChunkMap {
    fn get(&self, ci: u64) -> Option<&Chunk> {
        if ci < DENSE_CHUNKS {
            self.dense.get(ci as usize).and_then(Option::as_ref)
        } else {
            self.sparse.get(&ci)
        }
    }

    fn get_mut(&mut self, ci: u64) -> Option<&mut Chunk> {
        if ci < DENSE_CHUNKS {
            self.dense.get_mut(ci as usize).and_then(Option::as_mut)
        } else {
            self.sparse.get_mut(&ci)
        }
    }

    fn get_or_insert(&mut self, ci: u64) -> &mut Chunk {
        if ci < DENSE_CHUNKS {
            let i = ci as usize;
            if self.dense.len() <= i {
                self.dense.resize_with(i + 1, || None);
            }
            if self.dense[i].is_none() {
                self.live += 1;
            }
            self.dense[i].get_or_insert_with(Chunk::empty)
        } else {
            if !self.sparse.contains_key(&ci) {
                self.live += 1;
            }
            self.sparse.entry(ci).or_insert_with(Chunk::empty)
        }
    }

    /// Take chunk `ci` out; returns it.
    fn remove(&mut self, ci: u64) -> Option<Chunk> {
        let gone = if ci < DENSE_CHUNKS {
            self.dense.get_mut(ci as usize).and_then(Option::take)
        } else {
            self.sparse.remove(&ci)
        };
        if gone.is_some() {
            self.live -= 1;
        }
        gone
    }

    /// The first chunk index in `lo..=hi` that holds a chunk.
    fn next(&self, lo: u64, hi: u64) -> Option<u64> {
        if lo < DENSE_CHUNKS && !self.dense.is_empty() {
            let last = hi.min(self.dense.len() as u64 - 1);
            if let Some(i) = (lo..=last).find(|&i| self.dense[i as usize].is_some()) {
                return Some(i);
            }
        }
        let from = lo.max(DENSE_CHUNKS);
        if from > hi {
            return None;
        }
        self.sparse.range(from..=hi).next().map(|(k, _)| *k)
    }

    fn clear(&mut self) {
        self.dense.clear();
        self.sparse.clear();
        self.live = 0;
    }

    /// Bytes held: the dense vector, each chunk's occupancy bits, and the directory of
    /// each chunk that is not `full` (a full chunk has none).
    fn bytes(&self, full: usize) -> u64 {
        let directory = CHUNK_BUCKETS * std::mem::size_of::<Slot>();
        let sparse_entry = std::mem::size_of::<(u64, Chunk)>() + 16;
        (self.dense.capacity() * std::mem::size_of::<Option<Chunk>>()
            + self.live * WORDS * 8
            + self.live.saturating_sub(full) * directory
            + self.sparse.len() * sparse_entry) as u64
    }
}

/// How many bytes an update-location table may hold before it coarsens its ranges
/// (issue 20): a table past its budget rounds every range out to a granularity that
/// doubles until it fits, so it covers more LBAs than were written, never fewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableBudget {
    bytes: u64,
}

impl TableBudget {
    /// Bytes per TiB of LU in [`TableBudget::for_lu`]: DRBD's bound, a bit per 4 KiB.
    pub const PER_TIB: u64 = 32 << 20;
    /// The least [`TableBudget::for_lu`] gives: a small LU keeps an exact table, and
    /// the 32 KiB directory of its chunk is not most of its budget.
    pub const FLOOR: u64 = 4 << 20;

    /// A budget of `bytes`.
    pub fn bytes(bytes: u64) -> Self {
        TableBudget { bytes }
    }

    /// The default budget for an LU of `lbas` 512-byte LBAs: [`Self::PER_TIB`] per TiB
    /// (one byte per 64 LBAs), at least [`Self::FLOOR`].
    pub fn for_lu(lbas: u64) -> Self {
        Self::for_lu_at(lbas, Self::PER_TIB)
    }

    /// The budget for an LU of `lbas` LBAs at `per_tib` bytes per TiB (the config's
    /// `tables.budget_mib_per_tib`), at least [`Self::FLOOR`].
    pub fn for_lu_at(lbas: u64, per_tib: u64) -> Self {
        let tib_lbas = (1u64 << 40) / crate::lba::SECTOR_SIZE;
        let per_lba = (lbas as u128 * u128::from(per_tib)) / u128::from(tib_lbas);
        TableBudget::bytes(u64::try_from(per_lba).unwrap_or(u64::MAX).max(Self::FLOOR))
    }

    /// The budget in bytes.
    pub fn get(self) -> u64 {
        self.bytes
    }
}

/// The coarsest granularity: a whole chunk, which is then held as one "full" marker.
const MAX_COARSE_BITS: u32 = CHUNK_SHIFT;

/// The set of LBAs of one LU written since its snapshot was acquired.
///
/// Without a budget ([`UpdateLocationTable::new`]) the table is exact. With one
/// ([`UpdateLocationTable::with_budget`]) it stays exact while its memory is within half
/// the budget; an `add` that takes it past that doubles the table's granularity and
/// rounds every record out to it (repeating until the table fits; the rebuild holds the
/// old and the new table at once, which is what the other half is for), and later adds
/// are rounded out too. So the table only ever grows past what was written: resync copies,
/// and `hvm:dirty` reports, whole granules. `remove` stays exact (resync removes what it
/// copied) and does not coarsen; the next `add` does. An empty table is exact again.
#[derive(Clone, Default)]
pub struct UpdateLocationTable {
    chunks: ChunkMap,
    pools: Pools,
    /// Number of LBAs covered, kept so `total` is O(1).
    total: u64,
    /// Chunks held as one "full" marker (no directory), for the memory estimate.
    full_chunks: usize,
    budget: Option<TableBudget>,
    /// log2 of the granularity adds are rounded out to: 0 while the table is exact.
    coarse_bits: u32,
}

impl PartialEq for UpdateLocationTable {
    fn eq(&self, other: &Self) -> bool {
        self.total == other.total && self.iter().eq(other.iter())
    }
}

impl Eq for UpdateLocationTable {}

impl std::fmt::Debug for UpdateLocationTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// The part of `[lo, hi]` inside `[base, base + span - 1]`.
fn clip(lo: u64, hi: u64, base: u64, span: u64) -> (u64, u64) {
    (lo.max(base), hi.min(base + (span - 1)))
}

impl UpdateLocationTable {
    /// An exact table with no memory budget.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table that coarsens past `budget`.
    pub fn with_budget(budget: TableBudget) -> Self {
        UpdateLocationTable {
            budget: Some(budget),
            ..Self::default()
        }
    }

    /// Set or lift the budget; a table already past the new budget coarsens now.
    pub fn set_budget(&mut self, budget: Option<TableBudget>) {
        self.budget = budget;
        self.enforce_budget();
    }

    pub fn budget(&self) -> Option<TableBudget> {
        self.budget
    }

    /// Take the records of `other`, keeping this table's budget (coarsening now if they
    /// do not fit): how a table is restored from a journal.
    pub fn assign(&mut self, other: &UpdateLocationTable) {
        let budget = self.budget;
        *self = other.clone();
        self.set_budget(budget);
    }

    /// LBAs every record is rounded out to: 1 while the table is exact.
    pub fn granularity(&self) -> u64 {
        1 << self.coarse_bits
    }

    /// True once the table has coarsened: it may cover LBAs that were never added, and an
    /// `add` that returns 0 may still have been absorbed by a granule that no journal
    /// record describes (so the caller journals every add of a coarse table).
    pub fn is_coarse(&self) -> bool {
        self.coarse_bits > 0
    }

    /// Bytes the table holds: its blocks (used and free), directories, occupancy bits
    /// and chunk index. What the budget is compared with after each `add`.
    pub fn memory_bytes(&self) -> u64 {
        self.pools.bytes() + self.chunks.bytes(self.full_chunks)
    }

    /// `ext` rounded out to the table's granularity.
    fn round_out(&self, ext: Extent) -> Extent {
        let mask = self.granularity() - 1;
        Extent::new(ext.first() & !mask, ext.last() | mask).unwrap_or(ext)
    }

    /// Record `ext` as updated (rounded out to the granularity, and coarsening the table
    /// if that takes it past its budget). Returns how many LBAs were not recorded before
    /// (0 means the table did not change).
    pub fn add(&mut self, ext: Extent) -> u64 {
        let before = self.total;
        self.insert(self.round_out(ext));
        self.enforce_budget();
        self.total - before
    }

    /// Coarsen until the table holds at most half its budget (or is at the coarsest
    /// granularity). Half: a coarsening builds the coarser table beside the old one, and
    /// the two together must stay within the budget too.
    fn enforce_budget(&mut self) {
        let Some(budget) = self.budget else {
            return;
        };
        while self.memory_bytes() > budget.get() / 2 && self.coarse_bits < MAX_COARSE_BITS {
            self.coarse_bits += 1;
            self.regranulate();
        }
    }

    /// Rebuild the table with every record rounded out to the current granularity, in
    /// fresh pools (so the memory of the finer table is given back).
    fn regranulate(&mut self) {
        let mut fresh = UpdateLocationTable {
            budget: self.budget,
            coarse_bits: self.coarse_bits,
            ..Self::default()
        };
        let mut done: Option<u64> = None;
        self.pieces_in(0, u64::MAX, |f, l| {
            let Some(e) = Extent::new(f, l).map(|e| self.round_out(e)) else {
                return ControlFlow::Continue(());
            };
            // Pieces in a granule already inserted add nothing: skip or clip them.
            let first = match done {
                Some(d) if e.last() <= d => return ControlFlow::Continue(()),
                Some(d) => e.first().max(d + 1),
                None => e.first(),
            };
            fresh.insert(Extent::new(first, e.last()).unwrap_or(e));
            done = Some(e.last());
            ControlFlow::Continue(())
        });
        *self = fresh;
    }

    /// Add exactly `ext`; returns the LBAs that were not recorded before.
    fn insert(&mut self, ext: Extent) -> u64 {
        let mut added = 0;
        for ci in (ext.first() >> CHUNK_SHIFT)..=(ext.last() >> CHUNK_SHIFT) {
            let base = ci << CHUNK_SHIFT;
            let (lo, hi) = clip(ext.first(), ext.last(), base, CHUNK_LBAS);
            let chunk = self.chunks.get_or_insert(ci);
            let Some(slots) = chunk.slots.as_mut() else {
                continue; // already full
            };
            if lo == base && hi - lo + 1 == CHUNK_LBAS {
                for s in slots.iter().filter(|s| s.len() > 0) {
                    self.pools.release(s.class(), s.block());
                }
                added += CHUNK_LBAS - chunk.lbas;
                chunk.slots = None;
                self.full_chunks += 1;
                *chunk.occupied = [u64::MAX; WORDS];
                chunk.lbas = CHUNK_LBAS;
                continue;
            }
            let mut n = 0;
            for bi in (lo >> BUCKET_BITS)..=(hi >> BUCKET_BITS) {
                let (f, l) = clip(lo, hi, bi << BUCKET_BITS, BUCKET_LBAS);
                let i = (bi as usize) & (CHUNK_BUCKETS - 1);
                let slot = self.pools.with_room(slots[i]);
                let (len, more) = bucket_add(
                    self.pools.block_mut(slot),
                    slot.len(),
                    (f & OFFSET_MASK) as u32,
                    (l & OFFSET_MASK) as u32,
                );
                slots[i] = self.pools.settle(slot, len);
                n += more;
                mark(&mut chunk.occupied, i, true);
            }
            chunk.lbas += n;
            added += n;
        }
        self.total += added;
        added
    }

    /// Delete exactly the LBAs of `ext`; returns how many were recorded. Records that
    /// straddle an end of `ext` are cut, one that covers both ends is split ([0038]).
    pub fn remove(&mut self, ext: Extent) -> u64 {
        let (lo_ci, hi_ci) = (ext.first() >> CHUNK_SHIFT, ext.last() >> CHUNK_SHIFT);
        let mut removed = 0;
        let mut from = Some(lo_ci);
        while let Some(ci) = from.and_then(|c| self.chunks.next(c, hi_ci)) {
            from = (ci < hi_ci).then_some(ci + 1);
            let base = ci << CHUNK_SHIFT;
            let (lo, hi) = clip(ext.first(), ext.last(), base, CHUNK_LBAS);
            let Some(chunk) = self.chunks.get_mut(ci) else {
                break;
            };
            let whole = lo == base && hi - lo + 1 == CHUNK_LBAS;
            let n = if whole {
                for s in chunk
                    .slots
                    .iter()
                    .flat_map(|s| s.iter())
                    .filter(|s| s.len() > 0)
                {
                    self.pools.release(s.class(), s.block());
                }
                chunk.lbas
            } else {
                if chunk.slots.is_none() {
                    self.full_chunks -= 1;
                }
                chunk.slots_mut(&mut self.pools);
                let first = ((lo >> BUCKET_BITS) as usize) & (CHUNK_BUCKETS - 1);
                let last = ((hi >> BUCKET_BITS) as usize) & (CHUNK_BUCKETS - 1);
                let mut n = 0;
                for w in first / 64..=last / 64 {
                    let mut bits = chunk.bits(w, first, last);
                    while bits != 0 {
                        let i = w * 64 + bits.trailing_zeros() as usize;
                        bits &= bits - 1;
                        let bbase = base + ((i as u64) << BUCKET_BITS);
                        let (f, l) = clip(lo, hi, bbase, BUCKET_LBAS);
                        let Some(slots) = chunk.slots.as_mut() else {
                            break;
                        };
                        let (f, l) = ((f & OFFSET_MASK) as u32, (l & OFFSET_MASK) as u32);
                        let mut slot = slots[i];
                        let (len, gone) = loop {
                            let len = slot.len();
                            if let Some(r) = bucket_remove(self.pools.block_mut(slot), len, f, l) {
                                break r;
                            }
                            // A split of a full bucket: grow it, then remove.
                            slot = self.pools.with_room(slot);
                        };
                        slots[i] = self.pools.settle(slot, len);
                        if len == 0 {
                            mark(&mut chunk.occupied, i, false);
                        }
                        n += gone;
                    }
                }
                n
            };
            chunk.lbas -= n;
            let gone = (chunk.lbas == 0 || whole)
                .then(|| self.chunks.remove(ci))
                .flatten();
            if gone.is_some_and(|c| c.slots.is_none()) {
                self.full_chunks -= 1;
            }
            removed += n;
        }
        self.total -= removed;
        if self.total == 0 {
            // Nothing recorded: give the pools' memory back (resync just finished).
            self.clear();
        }
        removed
    }

    /// Visit the stored pieces that overlap `[lo, hi]`, clipped to it, in LBA order.
    /// Adjacent pieces of neighbouring buckets are visited separately.
    fn pieces_in(&self, lo: u64, hi: u64, mut f: impl FnMut(u64, u64) -> ControlFlow<()>) {
        let hi_ci = hi >> CHUNK_SHIFT;
        let mut from = Some(lo >> CHUNK_SHIFT);
        while let Some(ci) = from.and_then(|c| self.chunks.next(c, hi_ci)) {
            from = (ci < hi_ci).then_some(ci + 1);
            let Some(chunk) = self.chunks.get(ci) else {
                return;
            };
            let base = ci << CHUNK_SHIFT;
            let (clo, chi) = clip(lo, hi, base, CHUNK_LBAS);
            if chunk.slots.is_none() {
                if f(clo, chi).is_break() {
                    return;
                }
                continue;
            }
            let first = ((clo >> BUCKET_BITS) as usize) & (CHUNK_BUCKETS - 1);
            let last = ((chi >> BUCKET_BITS) as usize) & (CHUNK_BUCKETS - 1);
            for slot in chunk.occupied_slots(first, last) {
                let bbase = base + ((slot as u64) << BUCKET_BITS);
                let pieces = chunk.pieces(&self.pools, slot);
                let start_off = (clo.max(bbase) - bbase) as u32;
                let start = pieces.partition_point(|&p| pl(p) < start_off);
                for &p in &pieces[start..] {
                    let (pf_abs, pl_abs) = (bbase + u64::from(pf(p)), bbase + u64::from(pl(p)));
                    if pf_abs > chi {
                        break;
                    }
                    if f(pf_abs.max(clo), pl_abs.min(chi)).is_break() {
                        return;
                    }
                }
            }
        }
    }

    /// Pieces of `[lo, hi]` merged into maximal records, in LBA order; stops after `max`.
    fn records_in(&self, lo: u64, hi: u64, max: usize) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        self.pieces_in(lo, hi, |f, l| {
            if let Some(last) = out.last_mut() {
                if last.last().checked_add(1) == Some(f) {
                    *last = Extent::new(last.first(), l).unwrap_or(*last);
                    return ControlFlow::Continue(());
                }
            }
            if out.len() == max {
                return ControlFlow::Break(());
            }
            out.extend(Extent::new(f, l));
            ControlFlow::Continue(())
        });
        out
    }

    /// True when every LBA of `ext` is recorded.
    pub fn covers(&self, ext: Extent) -> bool {
        self.records_in(ext.first(), ext.last(), 1) == [ext]
    }

    /// True when some LBA of `ext` is recorded.
    pub fn overlaps(&self, ext: Extent) -> bool {
        let mut any = false;
        self.pieces_in(ext.first(), ext.last(), |_, _| {
            any = true;
            ControlFlow::Break(())
        });
        any
    }

    /// The recorded parts of `ext`, in LBA order.
    pub fn intersection(&self, ext: Extent) -> Vec<Extent> {
        self.records_in(ext.first(), ext.last(), usize::MAX)
    }

    /// The parts of `ext` that are not recorded, in LBA order.
    pub fn uncovered(&self, ext: Extent) -> Vec<Extent> {
        let mut out = Vec::new();
        let mut next = Some(ext.first());
        for part in self.intersection(ext) {
            if let Some(n) = next {
                if part.first() > n {
                    out.extend(Extent::new(n, part.first() - 1));
                }
            }
            next = part.last().checked_add(1);
        }
        if let Some(n) = next {
            out.extend(Extent::new(n, ext.last()));
        }
        out
    }

    /// Number of LBAs recorded.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Number of records (maximal disjoint ranges). Walks the table.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Forget every record; the table is exact again (its budget stays).
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.pools.clear();
        self.total = 0;
        self.full_chunks = 0;
        self.coarse_bits = 0;
    }

    /// The records in LBA order, found one at a time (a table of 100 million records is
    /// not copied into a vector to be walked).
    pub fn iter(&self) -> impl Iterator<Item = Extent> + '_ {
        let mut cursor = Some(0u64);
        std::iter::from_fn(move || {
            let rec = self.records_in(cursor?, u64::MAX, 1).pop();
            // A record is maximal, so the LBA after it is not recorded.
            cursor = rec.and_then(|e| e.last().checked_add(1));
            rec
        })
    }

    /// The next range for resync (Fig. 7 step 1002): the first recorded LBAs at or after
    /// `cursor`, wrapping to the start of the LU, at most `max_count` of them.
    pub fn next_range(&self, cursor: u64, max_count: u64) -> Option<Extent> {
        let max_count = max_count.max(1);
        let first = |lo: u64| -> Option<Extent> {
            let mut found: Option<Extent> = None;
            self.pieces_in(lo, u64::MAX, |f, l| match found {
                None => {
                    found = Extent::new(f, l.min(f.saturating_add(max_count - 1)));
                    ControlFlow::Continue(())
                }
                Some(e) if e.last().checked_add(1) == Some(f) && e.count() < max_count => {
                    let last = l.min(e.first().saturating_add(max_count - 1));
                    found = Extent::new(e.first(), last);
                    ControlFlow::Continue(())
                }
                Some(_) => ControlFlow::Break(()),
            });
            found
        };
        first(cursor).or_else(|| first(0))
    }
}

impl FromIterator<Extent> for UpdateLocationTable {
    fn from_iter<I: IntoIterator<Item = Extent>>(iter: I) -> Self {
        let mut t = UpdateLocationTable::new();
        for e in iter {
            t.add(e);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn ext(f: u64, l: u64) -> Extent {
        Extent::new(f, l).unwrap()
    }

    fn records(t: &UpdateLocationTable) -> Vec<(u64, u64)> {
        t.iter().map(|e| (e.first(), e.last())).collect()
    }

    /// Fig. 3's LU 3 row, and [0038]: deleting LBA 10-11 from LBA 8-31 leaves 8-9 and
    /// 12-31.
    #[test]
    fn paragraph_0038_delete_splits_record() {
        let mut lu3 = UpdateLocationTable::new();
        lu3.add(ext(8, 31));
        assert_eq!(lu3.remove(ext(10, 11)), 2);
        assert_eq!(records(&lu3), vec![(8, 9), (12, 31)]);
        assert_eq!(lu3.total(), 2 + 20);
    }

    /// Fig. 3's LU 2 rows: two updates far apart stay two records.
    #[test]
    fn fig3_lu2_rows() {
        let mut lu2 = UpdateLocationTable::new();
        lu2.add(ext(0, 15));
        lu2.add(ext(256, 511));
        assert_eq!(records(&lu2), vec![(0, 15), (256, 511)]);
        assert!(lu2.covers(ext(300, 400)));
        assert!(!lu2.covers(ext(10, 20)));
        assert!(lu2.overlaps(ext(10, 20)));
        assert!(!lu2.overlaps(ext(16, 255)));
    }

    #[test]
    fn add_merges_overlapping_and_adjacent() {
        let mut t = UpdateLocationTable::new();
        assert_eq!(t.add(ext(10, 19)), 10);
        assert_eq!(t.add(ext(20, 29)), 10); // adjacent on the right
        assert_eq!(t.add(ext(0, 9)), 10); // adjacent on the left
        assert_eq!(records(&t), vec![(0, 29)]);
        assert_eq!(t.add(ext(5, 25)), 0); // already covered
        t.add(ext(40, 49));
        t.add(ext(60, 69));
        assert_eq!(t.add(ext(25, 65)), 20); // spans three records and two gaps
        assert_eq!(records(&t), vec![(0, 69)]);
        assert_eq!(t.total(), 70);
    }

    #[test]
    fn remove_across_many_records_and_edges() {
        let mut t: UpdateLocationTable =
            [ext(0, 9), ext(20, 29), ext(40, 49)].into_iter().collect();
        assert_eq!(t.remove(ext(5, 44)), 5 + 10 + 5);
        assert_eq!(records(&t), vec![(0, 4), (45, 49)]);
        assert_eq!(t.remove(ext(100, 200)), 0);
        assert_eq!(t.remove(ext(0, u64::MAX)), 10);
        assert!(t.is_empty());
        assert_eq!(t.total(), 0);
    }

    #[test]
    fn extremes_of_the_lba_space() {
        let mut t = UpdateLocationTable::new();
        t.add(ext(u64::MAX - 1, u64::MAX));
        t.add(ext(0, 0));
        assert_eq!(t.uncovered(ext(0, u64::MAX)), vec![ext(1, u64::MAX - 2)]);
        t.remove(ext(u64::MAX, u64::MAX));
        assert_eq!(records(&t), vec![(0, 0), (u64::MAX - 1, u64::MAX - 1)]);
    }

    #[test]
    fn next_range_walks_forward_and_wraps() {
        let t: UpdateLocationTable = [ext(0, 15), ext(256, 511)].into_iter().collect();
        assert_eq!(t.next_range(0, 8), Some(ext(0, 7)));
        assert_eq!(t.next_range(8, 100), Some(ext(8, 15)));
        assert_eq!(t.next_range(16, 100), Some(ext(256, 355)));
        assert_eq!(t.next_range(300, 1000), Some(ext(300, 511)));
        assert_eq!(t.next_range(512, 4), Some(ext(0, 3)));
        assert_eq!(UpdateLocationTable::new().next_range(0, 4), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add(u64, u64),
        Remove(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // A small LBA space so operations collide, merge and split often.
        (any::<bool>(), 0u64..200, 1u64..24).prop_map(|(add, first, n)| {
            if add {
                Op::Add(first, first + n - 1)
            } else {
                Op::Remove(first, first + n - 1)
            }
        })
    }

    /// Where the model's small LBA space is placed: inside one bucket, across a bucket
    /// boundary, across a chunk boundary, and at the top of the LBA space.
    fn placement() -> impl Strategy<Value = u64> {
        prop::sample::select(vec![
            0,
            4096 - 100,
            (1 << 24) - 120,
            5 << 24,
            u64::MAX - 240,
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// The table against a plain set of LBAs, after every add and remove.
        #[test]
        fn matches_a_set_of_lbas(base in placement(), ops in prop::collection::vec(op(), 1..120)) {
            let mut t = UpdateLocationTable::new();
            let mut model = BTreeSet::new();
            let at = |x: u64| base + x;
            for op in ops {
                match op {
                    Op::Add(f, l) => {
                        let new = (f..=l).filter(|x| model.insert(at(*x))).count() as u64;
                        prop_assert_eq!(t.add(ext(at(f), at(l))), new);
                    }
                    Op::Remove(f, l) => {
                        let gone = (f..=l).filter(|x| model.remove(&at(*x))).count() as u64;
                        prop_assert_eq!(t.remove(ext(at(f), at(l))), gone);
                    }
                }
                // Same LBAs, records disjoint and never adjacent, total right.
                let lbas: BTreeSet<u64> = t.iter().flat_map(|e| e.first()..=e.last()).collect();
                prop_assert_eq!(&lbas, &model);
                let recs = records(&t);
                for w in recs.windows(2) {
                    prop_assert!(w[0].1 + 1 < w[1].0, "records {:?} touch", w);
                }
                prop_assert_eq!(t.total(), model.len() as u64);
                prop_assert_eq!(t.len(), recs.len());
            }
            // Queries against the model on windows of the space.
            for f in (0u64..230).step_by(7) {
                let q = ext(at(f), at(f + 9));
                let window: Vec<u64> = (f..=f + 9).map(at).collect();
                let inside: Vec<u64> = window.iter().copied().filter(|x| model.contains(x)).collect();
                prop_assert_eq!(t.covers(q), inside.len() == 10);
                prop_assert_eq!(t.overlaps(q), !inside.is_empty());
                let got: Vec<u64> = t.intersection(q).iter().flat_map(|e| e.first()..=e.last()).collect();
                prop_assert_eq!(got, inside);
                let outside: Vec<u64> = window.iter().copied().filter(|x| !model.contains(x)).collect();
                let got: Vec<u64> = t.uncovered(q).iter().flat_map(|e| e.first()..=e.last()).collect();
                prop_assert_eq!(got, outside);
            }
            // next_range from several cursors: the first recorded LBAs at or after it.
            for c in (0u64..240).step_by(13) {
                let cursor = at(c);
                let want = model.range(cursor..).next().or_else(|| model.iter().next()).copied();
                let got = t.next_range(cursor, 5);
                prop_assert_eq!(got.map(|e| e.first()), want);
                if let Some(e) = got {
                    prop_assert!(e.count() <= 5);
                    prop_assert!((e.first()..=e.last()).all(|x| model.contains(&x)));
                }
            }
        }

    }

    /// `recs` with the LBAs `[f, l]` taken out: the model of an exact remove.
    fn subtract(recs: &[(u64, u64)], f: u64, l: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for &(a, b) in recs {
            if b < f || a > l {
                out.push((a, b));
                continue;
            }
            if a < f {
                out.push((a, f - 1));
            }
            if b > l {
                out.push((l + 1, b));
            }
        }
        out
    }

    /// Budgets from "coarsen as far as it goes at the first add" (0) to "never" (1 MiB:
    /// the model's LBA space cannot fill it).
    fn small_budget() -> impl Strategy<Value = u64> {
        prop::sample::select(vec![0, 34 << 10, 36 << 10, 40 << 10, 72 << 10, 1 << 20])
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// A budgeted table against the set of LBAs added and not removed since: an add
        /// only ever grows the table, and every added LBA stays covered; a remove takes
        /// out exactly its LBAs; after an add the table holds at most half its budget (or
        /// is as coarse as it goes); a budget the table never reaches leaves it exact.
        #[test]
        fn coarsening_only_grows_and_never_misses(
            base in placement(),
            budget in small_budget(),
            ops in prop::collection::vec(op(), 1..120),
        ) {
            let mut t = UpdateLocationTable::with_budget(TableBudget::bytes(budget));
            let mut model = BTreeSet::new();
            let at = |x: u64| base + x;
            for op in ops {
                let prev = records(&t);
                match op {
                    Op::Add(f, l) => {
                        model.extend((f..=l).map(at));
                        let added = t.add(ext(at(f), at(l)));
                        for &(a, b) in &prev {
                            prop_assert!(t.covers(ext(a, b)), "lost {}-{} of {:?}", a, b, prev);
                        }
                        let grown: u64 = prev.iter().map(|(a, b)| b - a + 1).sum();
                        prop_assert_eq!(t.total() - grown, added);
                        prop_assert!(
                            t.memory_bytes() <= budget / 2 || t.granularity() == 1 << MAX_COARSE_BITS,
                            "{} bytes over a budget of {}", t.memory_bytes(), budget
                        );
                    }
                    Op::Remove(f, l) => {
                        for x in f..=l {
                            model.remove(&at(x));
                        }
                        t.remove(ext(at(f), at(l)));
                        prop_assert_eq!(records(&t), subtract(&prev, at(f), at(l)));
                    }
                }
                for &x in &model {
                    prop_assert!(t.covers(ext(x, x)), "LBA {} added and not covered", x);
                }
                let recs = records(&t);
                prop_assert_eq!(t.total(), recs.iter().map(|(a, b)| b - a + 1).sum::<u64>());
                for w in recs.windows(2) {
                    prop_assert!(w[0].1 + 1 < w[1].0, "records {:?} touch", w);
                }
                if budget == 1 << 20 {
                    prop_assert_eq!(t.granularity(), 1);
                    let lbas: BTreeSet<u64> = recs.iter().flat_map(|&(a, b)| a..=b).collect();
                    prop_assert_eq!(&lbas, &model);
                }
            }
        }
    }

    #[test]
    fn default_budget_is_32_mib_per_tib_with_a_floor() {
        let tib = (1u64 << 40) / 512;
        assert_eq!(TableBudget::for_lu(16 * tib).get(), 512 << 20);
        assert_eq!(TableBudget::for_lu(tib).get(), 32 << 20);
        assert_eq!(TableBudget::for_lu(tib / 1024).get(), TableBudget::FLOOR);
        assert_eq!(TableBudget::for_lu(u64::MAX).get(), u64::MAX >> 6);
    }

    /// Random 4 KiB writes over 64 GiB with a 1 MiB budget: the table coarsens, stays
    /// within its budget, covers every write; resync's walk (next_range, remove) empties
    /// it and it is exact again.
    #[test]
    fn random_writes_past_the_budget_coarsen_and_resync_empties() {
        let lu = (64u64 << 30) / 512;
        let mut t = UpdateLocationTable::with_budget(TableBudget::bytes(1 << 20));
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut writes = Vec::new();
        for _ in 0..200_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let f = (rng % (lu / 8)) * 8;
            writes.push(ext(f, f + 7));
            t.add(ext(f, f + 7));
            assert!(t.memory_bytes() <= 1 << 19);
        }
        assert!(t.is_coarse(), "200k ranges fit in 1 MiB?");
        assert!(writes.iter().all(|&w| t.covers(w)));
        let g = t.granularity();
        assert!(t
            .iter()
            .all(|e| e.first() % g == 0 && (e.last() + 1) % g == 0));
        let mut cursor = 0;
        while let Some(e) = t.next_range(cursor, 2048) {
            assert_eq!(t.remove(e), e.count());
            cursor = e.last() + 1;
        }
        assert!(t.is_empty());
        assert_eq!(t.granularity(), 1);
        t.add(ext(3, 3));
        assert_eq!(records(&t), vec![(3, 3)]);
    }

    #[test]
    fn assign_keeps_the_budget_and_coarsens() {
        let exact: UpdateLocationTable = (0..20_000u64).map(|i| ext(i * 64, i * 64)).collect();
        assert_eq!(exact.granularity(), 1);
        let mut t = UpdateLocationTable::with_budget(TableBudget::bytes(64 << 10));
        t.assign(&exact);
        assert_eq!(t.budget(), Some(TableBudget::bytes(64 << 10)));
        assert!(t.is_coarse());
        assert!(t.memory_bytes() <= 32 << 10);
        assert!(exact.iter().all(|e| t.covers(e)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Large extents in coarse units (whole buckets and whole chunks), against a list
        /// of intervals: full chunks, their materialisation and splitting.
        #[test]
        fn large_extents_match_an_interval_list(
            unit in prop::sample::select(vec![1u64 << 12, 1 << 22, 1 << 24]),
            ops in prop::collection::vec((any::<bool>(), 0u64..40, 1u64..20, 0u64..3), 1..40),
        ) {
            let mut t = UpdateLocationTable::new();
            let mut model: Vec<(u64, u64)> = Vec::new();
            for (add, k, n, jitter) in ops {
                let (f, l) = (k * unit + jitter, (k + n) * unit - 1 + jitter);
                let before: u64 = model.iter().map(|(a, b)| b - a + 1).sum();
                if add {
                    model.push((f, l));
                    model.sort();
                    let mut merged: Vec<(u64, u64)> = Vec::new();
                    for (a, b) in model.drain(..) {
                        match merged.last_mut() {
                            Some(last) if a <= last.1 + 1 => last.1 = last.1.max(b),
                            _ => merged.push((a, b)),
                        }
                    }
                    model = merged;
                } else {
                    model = model
                        .into_iter()
                        .flat_map(|(a, b)| {
                            let mut keep = Vec::new();
                            if a < f { keep.push((a, b.min(f - 1))); }
                            if b > l { keep.push((a.max(l + 1), b)); }
                            if b < f || a > l { keep = vec![(a, b)]; }
                            keep
                        })
                        .collect();
                }
                let after: u64 = model.iter().map(|(a, b)| b - a + 1).sum();
                let changed = if add { t.add(ext(f, l)) } else { t.remove(ext(f, l)) };
                prop_assert_eq!(changed, after.abs_diff(before));
                prop_assert_eq!(&records(&t), &model);
                prop_assert_eq!(t.total(), after);
            }
        }
    }
}

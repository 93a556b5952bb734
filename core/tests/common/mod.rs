//! Fixtures shared by hvm-core's integration tests: a snapshot manager over an in-memory
//! array of each kind, and the physical legs to compare.
#![allow(dead_code, clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;

use hvm_core::journal::MemoryLog;
use hvm_core::mem_array::{ArrayKind, MemArray};
use hvm_core::{LuId, MirrorDefinition, PairConfig, SnapshotManager, VirtualLuId};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Mode Select array, one mate.
    E1,
    /// Mode Select array, two mates (triple mirror, [0020]).
    E1Triple,
    /// Stateless array, Fig. 9 triple.
    E2,
    /// Pre-update array, Fig. 14 pair, save area LU 9.
    E4,
}

pub const ORIGIN: VirtualLuId = VirtualLuId(0);
pub const SAVE_LU: LuId = LuId(9);

pub struct Setup {
    pub kind: Kind,
    pub array: Arc<MemArray>,
    pub log: Arc<MemoryLog>,
    pub mgr: SnapshotManager<Arc<MemArray>>,
    pub pair: PairConfig,
    /// The physical LU that holds the origin's data.
    pub origin_leg: LuId,
    /// The physical LUs that must equal it when Synchronized.
    pub mate_legs: Vec<LuId>,
}

pub fn pair_config(kind: Kind) -> PairConfig {
    let (definition, snapshots, save_area) = match kind {
        Kind::E1 => (
            MirrorDefinition::Managed {
                lu: LuId(1),
                mates: vec![LuId(4)],
            },
            vec![VirtualLuId(1)],
            None,
        ),
        Kind::E1Triple => (
            MirrorDefinition::Managed {
                lu: LuId(1),
                mates: vec![LuId(4), LuId(5)],
            },
            vec![VirtualLuId(1), VirtualLuId(2)],
            None,
        ),
        Kind::E2 => (
            MirrorDefinition::Triple {
                mirror: LuId(0),
                origin: LuId(1),
                mate: LuId(2),
            },
            vec![VirtualLuId(1)],
            None,
        ),
        Kind::E4 => (
            MirrorDefinition::Pair {
                mirror: LuId(0),
                mate: LuId(1),
            },
            vec![VirtualLuId(1)],
            Some(SAVE_LU),
        ),
    };
    PairConfig {
        origin: ORIGIN,
        snapshots,
        definition,
        save_area,
    }
}

pub fn array(kind: Kind, capacity_lbas: u64, save_lbas: u64, array_copy: bool) -> MemArray {
    let pair = pair_config(kind);
    let array_kind = match kind {
        Kind::E1 | Kind::E1Triple => ArrayKind::ModeSelect,
        Kind::E2 => ArrayKind::Stateless,
        Kind::E4 => ArrayKind::PreUpdate,
    };
    let extra: Vec<(LuId, u64)> = pair
        .save_area
        .map(|lu| (lu, save_lbas))
        .into_iter()
        .collect();
    MemArray::new(array_kind, vec![pair.definition], capacity_lbas, &extra)
        .with_array_copy(array_copy)
}

pub fn setup(kind: Kind, capacity_lbas: u64, array_copy: bool) -> Setup {
    setup_on(
        kind,
        Arc::new(array(kind, capacity_lbas, capacity_lbas, array_copy)),
    )
}

pub fn setup_on(kind: Kind, array: Arc<MemArray>) -> Setup {
    let pair = pair_config(kind);
    let log = Arc::new(MemoryLog::new());
    let mgr = SnapshotManager::open(array.clone(), vec![pair.clone()], log.clone(), None)
        .expect("open snapshot manager");
    let (origin_leg, mate_legs) = legs(kind);
    Setup {
        kind,
        array,
        log,
        mgr,
        pair,
        origin_leg,
        mate_legs,
    }
}

pub fn legs(kind: Kind) -> (LuId, Vec<LuId>) {
    match kind {
        Kind::E1 => (LuId(1), vec![LuId(4)]),
        Kind::E1Triple => (LuId(1), vec![LuId(4), LuId(5)]),
        Kind::E2 => (LuId(1), vec![LuId(2)]),
        Kind::E4 => (LuId(0), vec![LuId(1)]),
    }
}

/// Deterministic bytes for a write: the seed in every byte, mixed with the position.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8 + 1)
        .collect()
}

/// A backend that adds a random delay (0-150 µs, on about half the calls) before reads
/// and writes, as a real array's service time does, so races have room to happen.
pub struct Delayed<B> {
    pub inner: B,
    seed: std::sync::atomic::AtomicU64,
}

impl<B> Delayed<B> {
    pub fn new(inner: B, seed: u64) -> Self {
        Delayed {
            inner,
            seed: std::sync::atomic::AtomicU64::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
        }
    }

    fn pause(&self) {
        // xorshift on a shared counter: cheap and good enough for jitter.
        let mut x = self
            .seed
            .fetch_add(0x9e37_79b9, std::sync::atomic::Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 2 == 0 {
            std::thread::sleep(std::time::Duration::from_micros(x % 150));
        }
    }
}

impl<B: hvm_core::Backend> hvm_core::Backend for Delayed<B> {
    fn describe(&self) -> Result<hvm_core::BackendDescription, hvm_core::BackendError> {
        self.inner.describe()
    }
    fn read(&self, lu: LuId, lba: u64, buf: &mut [u8]) -> Result<(), hvm_core::BackendError> {
        self.pause();
        self.inner.read(lu, lba, buf)
    }
    fn write(
        &self,
        lu: LuId,
        lba: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<(), hvm_core::BackendError> {
        self.pause();
        self.inner.write(lu, lba, data, fua)
    }
    fn flush(&self, lu: LuId) -> Result<(), hvm_core::BackendError> {
        self.inner.flush(lu)
    }
    fn mode_sense(&self, lu: LuId) -> Result<Vec<u8>, hvm_core::BackendError> {
        self.inner.mode_sense(lu)
    }
    fn mode_select(&self, lu: LuId, page: &[u8]) -> Result<(), hvm_core::BackendError> {
        self.inner.mode_select(lu, page)
    }
    fn copy(
        &self,
        src: LuId,
        dst: LuId,
        extent: hvm_core::Extent,
    ) -> Result<(), hvm_core::BackendError> {
        self.pause();
        self.inner.copy(src, dst, extent)
    }
}

//! An in-memory disk array of the three kinds, for tests (feature `mem-array`).
//!
//! It follows the array rules of DESIGN.md §4 closely enough that the snapshot manager
//! can be proven against it: in Synchronized mode reads alternate between the legs, so a
//! host that believes two legs are equal when they are not reads wrong data and fails its
//! test. array-sim is the full simulator; this is the smallest array that is still honest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use crate::backend::{
    Backend, BackendDescription, BackendError, BackendErrorKind, Capabilities, LuInfo,
};
use crate::lba::{Extent, SECTOR_SIZE};
use crate::mode::{self, MirrorPage, Mode};
use crate::tables::{LuId, MirrorDefinition};

/// Which firmware the array runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArrayKind {
    /// 1st embodiment: mirroring management table with modes (Fig. 2).
    ModeSelect,
    /// 2nd embodiment: Fig. 9 triples, no state.
    Stateless,
    /// 4th embodiment: Fig. 14 pairs with a read-only mate.
    PreUpdate,
}

/// Counters of what the array did.
#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub copies: AtomicU64,
    pub mode_selects: AtomicU64,
}

pub struct MemArray {
    kind: ArrayKind,
    capacity: HashMap<LuId, u64>,
    storage: HashMap<LuId, RwLock<Vec<u8>>>,
    defs: Vec<MirrorDefinition>,
    modes: Mutex<HashMap<LuId, Mode>>,
    array_copy: bool,
    /// Reads alternate between legs; a counter keeps it deterministic.
    turn: AtomicU64,
    fail_writes: AtomicU64,
    pub counters: Counters,
}

impl std::fmt::Debug for MemArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemArray")
            .field("kind", &self.kind)
            .field("defs", &self.defs)
            .finish_non_exhaustive()
    }
}

fn err(kind: BackendErrorKind, msg: impl Into<String>) -> BackendError {
    BackendError::new(kind, msg)
}

impl MemArray {
    /// An array of `kind` with the given mirroring definitions (whose variant must match
    /// the kind), each LU of them `capacity_lbas` long, and `extra` plain LUs (E4 save
    /// areas) with their own capacities.
    pub fn new(
        kind: ArrayKind,
        defs: Vec<MirrorDefinition>,
        capacity_lbas: u64,
        extra: &[(LuId, u64)],
    ) -> Self {
        let mut storage = HashMap::new();
        let mut capacity = HashMap::new();
        let mut modes = HashMap::new();
        for d in &defs {
            let ok = matches!(
                (kind, d),
                (ArrayKind::ModeSelect, MirrorDefinition::Managed { .. })
                    | (ArrayKind::Stateless, MirrorDefinition::Triple { .. })
                    | (ArrayKind::PreUpdate, MirrorDefinition::Pair { .. })
            );
            assert!(ok, "{d} does not belong on a {kind:?} array");
            for lu in d.lus() {
                capacity.insert(lu, capacity_lbas);
                // The mirroring LU of a triple has no storage of its own.
                if !matches!(d, MirrorDefinition::Triple { mirror, .. } if *mirror == lu) {
                    storage.insert(
                        lu,
                        RwLock::new(vec![0u8; (capacity_lbas * SECTOR_SIZE) as usize]),
                    );
                }
            }
            if let MirrorDefinition::Managed { lu, .. } = d {
                modes.insert(*lu, Mode::Synchronized);
            }
        }
        for &(lu, lbas) in extra {
            capacity.insert(lu, lbas);
            storage.insert(lu, RwLock::new(vec![0u8; (lbas * SECTOR_SIZE) as usize]));
        }
        MemArray {
            kind,
            capacity,
            storage,
            defs,
            modes: Mutex::new(modes),
            array_copy: false,
            turn: AtomicU64::new(0),
            fail_writes: AtomicU64::new(0),
            counters: Counters::default(),
        }
    }

    /// Offer the array-side copy of [0049].
    pub fn with_array_copy(mut self, on: bool) -> Self {
        self.array_copy = on;
        self
    }

    /// Fail the next `n` writes with a medium error.
    pub fn fail_next_writes(&self, n: u64) {
        self.fail_writes.store(n, Ordering::SeqCst);
    }

    /// The raw bytes of one physical LU (a leg), bypassing every rule.
    pub fn leg(&self, lu: LuId) -> Vec<u8> {
        self.storage
            .get(&lu)
            .map(|s| s.read().unwrap_or_else(PoisonError::into_inner).clone())
            .unwrap_or_default()
    }

    /// The mode the array holds for `lu` (Mode Select array only).
    pub fn array_mode(&self, lu: LuId) -> Option<Mode> {
        self.modes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&lu)
            .copied()
    }

    fn mode_of(&self, lu: LuId) -> Mode {
        self.array_mode(lu).unwrap_or(Mode::Undefined)
    }

    fn check(&self, lu: LuId, lba: u64, len: usize) -> Result<(), BackendError> {
        if len as u64 % SECTOR_SIZE != 0 {
            return Err(err(
                BackendErrorKind::InvalidRequest,
                format!("{len} bytes is not whole blocks"),
            ));
        }
        let blocks = len as u64 / SECTOR_SIZE;
        let cap = self
            .capacity
            .get(&lu)
            .copied()
            .ok_or_else(|| err(BackendErrorKind::InvalidRequest, format!("no {lu}")))?;
        if lba.checked_add(blocks).is_none_or(|end| end > cap) {
            return Err(err(
                BackendErrorKind::OutOfRange,
                format!("{lu}: {blocks} blocks at LBA {lba} past {cap} blocks"),
            ));
        }
        Ok(())
    }

    fn raw_read(&self, lu: LuId, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let s = self
            .storage
            .get(&lu)
            .ok_or_else(|| err(BackendErrorKind::InvalidRequest, format!("no {lu}")))?;
        let s = s.read().unwrap_or_else(PoisonError::into_inner);
        let at = (lba * SECTOR_SIZE) as usize;
        buf.copy_from_slice(&s[at..at + buf.len()]);
        Ok(())
    }

    fn raw_write(&self, lu: LuId, lba: u64, data: &[u8]) -> Result<(), BackendError> {
        let s = self
            .storage
            .get(&lu)
            .ok_or_else(|| err(BackendErrorKind::InvalidRequest, format!("no {lu}")))?;
        let mut s = s.write().unwrap_or_else(PoisonError::into_inner);
        let at = (lba * SECTOR_SIZE) as usize;
        s[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn pick(&self, legs: &[LuId]) -> LuId {
        let i = self.turn.fetch_add(1, Ordering::Relaxed) as usize % legs.len();
        legs[i]
    }

    fn def_of(&self, lu: LuId) -> Option<&MirrorDefinition> {
        self.defs.iter().find(|d| d.lus().contains(&lu))
    }

    /// The physical legs a read of `lu` may use, or an error if `lu` may not be read now.
    fn read_legs(&self, lu: LuId) -> Result<Vec<LuId>, BackendError> {
        match self.def_of(lu) {
            Some(MirrorDefinition::Managed { lu: primary, mates }) => {
                let mode = self.mode_of(*primary);
                if lu == *primary {
                    // [0034]: spread over both legs only while they are the same.
                    if mode == Mode::Synchronized {
                        Ok(std::iter::once(lu).chain(mates.iter().copied()).collect())
                    } else {
                        Ok(vec![lu])
                    }
                } else if mode == Mode::Snapshot {
                    Ok(vec![lu])
                } else {
                    Err(err(
                        BackendErrorKind::NotReady,
                        format!("mate {lu} is not accessible in {mode}"),
                    ))
                }
            }
            Some(MirrorDefinition::Triple {
                mirror,
                origin,
                mate,
            }) if lu == *mirror => Ok(vec![*origin, *mate]),
            Some(MirrorDefinition::Pair { mirror, mate }) if lu == *mirror => {
                Ok(vec![*mirror, *mate])
            }
            _ => Ok(vec![lu]),
        }
    }

    /// The physical legs a write of `lu` goes to, or an error.
    fn write_legs(&self, lu: LuId) -> Result<Vec<LuId>, BackendError> {
        match self.def_of(lu) {
            Some(MirrorDefinition::Managed { lu: primary, mates }) => {
                let mode = self.mode_of(*primary);
                if lu == *primary {
                    // Fig. 6 steps 902-904.
                    if mode == Mode::Snapshot {
                        Ok(vec![lu])
                    } else {
                        Ok(std::iter::once(lu).chain(mates.iter().copied()).collect())
                    }
                } else if mode == Mode::Snapshot {
                    // Steps 901, 905, 904.
                    Ok(vec![lu])
                } else {
                    Err(err(
                        BackendErrorKind::NotReady,
                        format!("mate {lu} is not accessible in {mode}"),
                    ))
                }
            }
            Some(MirrorDefinition::Triple {
                mirror,
                origin,
                mate,
            }) if lu == *mirror => Ok(vec![*origin, *mate]),
            Some(MirrorDefinition::Pair { mirror, mate }) => {
                if lu == *mirror {
                    Ok(vec![*mirror, *mate])
                } else {
                    Err(err(
                        BackendErrorKind::DataProtect,
                        format!("mate {lu} is read-only"),
                    ))
                }
            }
            _ => Ok(vec![lu]),
        }
    }
}

impl Backend for MemArray {
    fn describe(&self) -> Result<BackendDescription, BackendError> {
        let mut lus: Vec<LuInfo> = self
            .capacity
            .iter()
            .map(|(&id, &capacity_lbas)| LuInfo { id, capacity_lbas })
            .collect();
        lus.sort_by_key(|l| l.id);
        Ok(BackendDescription {
            lus,
            mirroring: self.defs.clone(),
            capabilities: Capabilities {
                mode_select: self.kind == ArrayKind::ModeSelect,
                virtual_lu_forming: self.kind == ArrayKind::Stateless,
                read_only_mate: self.kind == ArrayKind::PreUpdate,
                array_copy: self.array_copy,
                fua: true,
            },
        })
    }

    fn read(&self, lu: LuId, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.check(lu, lba, buf.len())?;
        let legs = self.read_legs(lu)?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.raw_read(self.pick(&legs), lba, buf)
    }

    fn write(&self, lu: LuId, lba: u64, data: &[u8], _fua: bool) -> Result<(), BackendError> {
        self.check(lu, lba, data.len())?;
        let legs = self.write_legs(lu)?;
        if self
            .fail_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            // A medium error after the first leg was written: the worst case for a host.
            self.raw_write(legs[0], lba, data)?;
            return Err(err(BackendErrorKind::Io, "injected write failure"));
        }
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        for leg in legs {
            self.raw_write(leg, lba, data)?;
        }
        Ok(())
    }

    fn flush(&self, _lu: LuId) -> Result<(), BackendError> {
        Ok(())
    }

    fn mode_sense(&self, lu: LuId) -> Result<Vec<u8>, BackendError> {
        match self.kind {
            ArrayKind::ModeSelect => Ok(mode::encode_mode_sense(self.mode_of(lu)).to_vec()),
            ArrayKind::Stateless | ArrayKind::PreUpdate => {
                let page = match self.def_of(lu) {
                    Some(MirrorDefinition::Triple {
                        mirror,
                        origin,
                        mate,
                    }) if lu == *mirror => MirrorPage::Mirror {
                        origin: *origin,
                        mate: *mate,
                    },
                    Some(MirrorDefinition::Pair { mirror, mate }) if lu == *mirror => {
                        MirrorPage::PreUpdate { mate: *mate }
                    }
                    _ => MirrorPage::Other,
                };
                mode::encode_mirror_page(page)
                    .map(|p| p.to_vec())
                    .map_err(|e| err(BackendErrorKind::InvalidRequest, e.to_string()))
            }
        }
    }

    fn mode_select(&self, lu: LuId, page: &[u8]) -> Result<(), BackendError> {
        if self.kind != ArrayKind::ModeSelect {
            return Err(err(
                BackendErrorKind::Unsupported,
                "this array keeps no modes",
            ));
        }
        let mode = mode::decode_mode_select(page)
            .map_err(|e| err(BackendErrorKind::InvalidRequest, e.to_string()))?;
        let mut modes = self.modes.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = modes.get_mut(&lu).ok_or_else(|| {
            err(
                BackendErrorKind::InvalidRequest,
                format!("{lu} is not duplicated"),
            )
        })?;
        *slot = mode;
        self.counters.mode_selects.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn copy(&self, src: LuId, dst: LuId, extent: Extent) -> Result<(), BackendError> {
        if !self.array_copy {
            return Err(err(BackendErrorKind::Unsupported, "no array-side copy"));
        }
        let len = extent.byte_len() as usize;
        self.check(src, extent.first(), len)?;
        let mut buf = vec![0u8; len];
        self.raw_read(src, extent.first(), &mut buf)?;
        self.raw_write(dst, extent.first(), &buf)?;
        self.counters.copies.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

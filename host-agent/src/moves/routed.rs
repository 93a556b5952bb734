//! Where each LU's data lives. The backend a snapshot manager drives is a [`Routed`] view
//! of its home backend: an LU is where the home backend has it, or routed to an LU of
//! another backend (after a move), or moving there: written to both, read from where it
//! was, and copied underneath by the move, as LVM's pvmove does with a temporary mirror.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use hvm_core::array_backup::{BackupCapabilities, BackupOp, BackupReply};
use hvm_core::backend::{Backend, BackendDescription, BackendError, BackendErrorKind};
use hvm_core::range_lock::RangeLock;
use hvm_core::{Extent, LuId, SECTOR_SIZE};
use hvm_legs::Companion;

/// An opened backend, shared by every view that routes to it.
pub type Shared = Arc<dyn Backend>;

pub use hvm_api::Place;

/// A place and the backend that serves it.
#[derive(Clone)]
pub struct Target {
    pub place: Place,
    pub backend: Shared,
}

impl Target {
    fn lu(&self) -> LuId {
        LuId(self.place.lu)
    }
}

/// An LU being moved: reads go to `from`, writes to both (under `locks`, which the move's
/// copier holds on the range it copies, so a write and the copy of its range never
/// interleave).
pub struct Mirror {
    pub from: Target,
    pub to: Target,
    pub locks: RangeLock,
    /// Why a write to `to` failed, once one has: the move is then abandoned (`from`,
    /// which every write reached, stays where the data is).
    pub broken: Mutex<Option<String>>,
}

impl Mirror {
    pub fn new(from: Target, to: Target) -> Mirror {
        Mirror {
            from,
            to,
            locks: RangeLock::new(),
            broken: Mutex::new(None),
        }
    }

    pub fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Note the first failure on `to`; later writes go to `from` only.
    fn break_with(&self, e: &BackendError) {
        let mut b = self.broken.lock().unwrap_or_else(PoisonError::into_inner);
        if b.is_none() {
            *b = Some(format!("{}: {e}", self.to.place));
        }
    }

    /// Run `op` on `from` and (while not broken) on `to` at once, `to`'s on a companion
    /// thread; the result is `from`'s, which holds the data until the switch.
    fn both(
        &self,
        companion: &Companion,
        op: impl Fn(&dyn Backend, LuId) -> Result<(), BackendError> + Sync,
    ) -> Result<(), BackendError> {
        let on = |t: &Target| op(&*t.backend, t.lu());
        if self.broken().is_some() {
            return on(&self.from);
        }
        let (from, to) = companion.join(|| on(&self.from), || on(&self.to));
        if let Err(e) = to {
            tracing::warn!(to = %self.to.place, error = %e, "move: writing the new place failed; the move is abandoned");
            self.break_with(&e);
        }
        from
    }
}

#[derive(Clone)]
enum Route {
    At(Target),
    Moving(Arc<Mirror>),
}

/// A backend as its snapshot manager sees it, with some of its LUs elsewhere.
pub struct Routed {
    home: Target,
    routes: RwLock<HashMap<u32, Route>>,
    /// Runs the new place's half of a mirrored write beside the old place's.
    companion: Companion,
}

impl Routed {
    pub fn new(name: &str, backend: Shared) -> Routed {
        Routed {
            home: Target {
                place: Place {
                    backend: name.to_string(),
                    lu: 0,
                },
                backend,
            },
            routes: RwLock::new(HashMap::new()),
            companion: Companion::new(64),
        }
    }

    pub fn name(&self) -> &str {
        &self.home.place.backend
    }

    /// Where home LU `lu` is routed; `None`: at home, where nearly every LU is (no copy
    /// of anything on the I/O path then).
    fn routed(&self, lu: LuId) -> Option<Route> {
        let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        routes.get(&lu.0).cloned()
    }

    fn route(&self, lu: LuId) -> Route {
        self.routed(lu).unwrap_or_else(|| {
            Route::At(Target {
                place: Place {
                    backend: self.home.place.backend.clone(),
                    lu: lu.0,
                },
                backend: self.home.backend.clone(),
            })
        })
    }

    /// Where home LU `lu`'s data is now (the source, while it moves).
    pub fn place(&self, lu: LuId) -> Target {
        match self.route(lu) {
            Route::At(t) => t,
            Route::Moving(m) => m.from.clone(),
        }
    }

    /// Route home LU `lu` to `to` (the home LU itself: no route).
    pub fn set(&self, lu: LuId, to: Target) {
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        if to.place.backend == self.home.place.backend && to.place.lu == lu.0 {
            routes.remove(&lu.0);
        } else {
            routes.insert(lu.0, Route::At(to));
        }
    }

    /// Start writing home LU `lu` to both its place and `mirror.to`.
    pub fn begin_move(&self, lu: LuId, mirror: Arc<Mirror>) {
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        routes.insert(lu.0, Route::Moving(mirror));
    }

    fn each<T>(
        &self,
        lu: LuId,
        op: impl FnOnce(&dyn Backend, LuId) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        match self.routed(lu) {
            None => op(&*self.home.backend, lu),
            Some(Route::At(t)) => op(&*t.backend, t.lu()),
            Some(Route::Moving(m)) => op(&*m.from.backend, m.from.lu()),
        }
    }

    fn write_op(
        &self,
        lu: LuId,
        range: Option<Extent>,
        op: impl Fn(&dyn Backend, LuId) -> Result<(), BackendError> + Sync,
    ) -> Result<(), BackendError> {
        match self.routed(lu) {
            None => op(&*self.home.backend, lu),
            Some(Route::At(t)) => op(&*t.backend, t.lu()),
            Some(Route::Moving(m)) => {
                let _held = range.map(|r| m.locks.lock(r));
                m.both(&self.companion, op)
            }
        }
    }

    /// Copy by reading and writing, for LUs on different backends (or a backend that has
    /// no copy of its own).
    fn copy_by_host(&self, src: LuId, dst: LuId, extent: Extent) -> Result<(), BackendError> {
        const CHUNK: u64 = 2048;
        let mut buf = vec![0u8; (extent.count().min(CHUNK) * SECTOR_SIZE) as usize];
        let mut lba = extent.first();
        while lba <= extent.last() {
            let n = (extent.last() - lba + 1).min(CHUNK);
            let b = &mut buf[..(n * SECTOR_SIZE) as usize];
            self.read(src, lba, b)?;
            self.write(dst, lba, b, false)?;
            lba += n;
        }
        Ok(())
    }
}

/// The identity the driver reports for `t`, or its backend name and LU number when the
/// driver does not say (still enough to notice a config pointed elsewhere).
pub fn identity_of(t: &Target) -> String {
    match t.backend.identity(t.lu()) {
        Ok(Some(id)) => id,
        _ => format!("backend {} LU {}", t.place.backend, t.place.lu),
    }
}

fn extent(lba: u64, bytes: usize) -> Option<Extent> {
    let blocks = (bytes as u64).div_ceil(SECTOR_SIZE);
    Extent::new(lba, lba + blocks.max(1) - 1)
}

impl Backend for Routed {
    fn describe(&self) -> Result<BackendDescription, BackendError> {
        // The home backend's LUs, capacities and definitions: the manager's view does not
        // change when data moves.
        self.home.backend.describe()
    }

    fn read(&self, lu: LuId, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.each(lu, |b, l| b.read(l, lba, buf))
    }

    fn write(&self, lu: LuId, lba: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.write_op(lu, extent(lba, data.len()), |b, l| {
            b.write(l, lba, data, fua)
        })
    }

    fn flush(&self, lu: LuId) -> Result<(), BackendError> {
        self.write_op(lu, None, |b, l| b.flush(l))
    }

    fn mode_sense(&self, lu: LuId) -> Result<Vec<u8>, BackendError> {
        self.each(lu, |b, l| b.mode_sense(l))
    }

    fn mode_select(&self, lu: LuId, page: &[u8]) -> Result<(), BackendError> {
        self.write_op(lu, None, |b, l| b.mode_select(l, page))
    }

    fn copy(&self, src: LuId, dst: LuId, extent: Extent) -> Result<(), BackendError> {
        match (self.route(src), self.route(dst)) {
            (Route::At(s), Route::At(d)) if s.place.backend == d.place.backend => {
                match s.backend.copy(s.lu(), d.lu(), extent) {
                    Err(e) if e.kind == BackendErrorKind::Unsupported => {
                        self.copy_by_host(src, dst, extent)
                    }
                    other => other,
                }
            }
            _ => self.copy_by_host(src, dst, extent),
        }
    }

    fn write_zeroes(
        &self,
        lu: LuId,
        lba: u64,
        blocks: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        let range = Extent::new(lba, lba + blocks.max(1) - 1);
        self.write_op(lu, range, |b, l| b.write_zeroes(l, lba, blocks, unmap, fua))
    }

    fn identity(&self, lu: LuId) -> Result<Option<String>, BackendError> {
        Ok(Some(identity_of(&self.place(lu))))
    }

    fn backup_capabilities(&self) -> BackupCapabilities {
        self.home.backend.backup_capabilities()
    }

    fn backup(&self, op: &BackupOp) -> Result<BackupReply, BackendError> {
        self.home.backend.backup(op)
    }
}

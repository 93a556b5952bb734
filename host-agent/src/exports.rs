//! Virtual LUs as NBD exports: every request goes through hvm-core's snapshot manager
//! (the LU mode table picks the real LU, the update-location table is kept, E4 copies on
//! write), and `hvm:dirty` block status reports the update-location table.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use hvm_core::backend::Backend;
use hvm_core::{Extent, ManagerError, Mode, SnapshotManager, VirtualLuId, SECTOR_SIZE};

use crate::gate::Gate;
use crate::nbd::export::{Clients, Export, ExportError, Exports, Peer, BASE_ALLOCATION, HVM_DIRTY};
use crate::nbd::proto::STATE_DIRTY;

/// The snapshot manager of one backend.
pub type Manager = SnapshotManager<Box<dyn Backend>>;

fn export_error(e: ManagerError) -> ExportError {
    ExportError::new(e.errno(), e.to_string())
}

/// Who may open an export: nobody listed means everybody who can reach the socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub read_only: bool,
}

impl Access {
    fn allows(&self, peer: Option<&Peer>) -> bool {
        if self.uids.is_empty() && self.gids.is_empty() {
            return true;
        }
        // Without credentials (TCP) a restricted export is not offered.
        peer.is_some_and(|p| self.uids.contains(&p.uid) || self.gids.contains(&p.gid))
    }
}

/// One virtual LU served as an export.
pub struct VluExport {
    mgr: Arc<Manager>,
    vlu: VirtualLuId,
    /// Replaced by a config reload; a connection reads it when it opens the export.
    access: RwLock<Access>,
    /// `access.read_only`, read on every write request without taking the lock; a
    /// reload that sets it refuses writes on open connections too.
    read_only: AtomicBool,
    /// Every write passes it; closing it holds writes for a consistency group's instant.
    pub gate: Gate,
    /// Bytes read through this export, when it is a snapshot export: what the database
    /// host did for a backup that pulled the snapshot over NBD.
    snapshot_reads: Option<Arc<AtomicU64>>,
    /// Its NBD connections on every listener, and the fence of a restore in place.
    clients: Arc<Clients>,
    /// Shared by a virtual LU and its snapshot exports: the snapshot's reads (a backup's)
    /// yield to the virtual LU's requests (the database's); `true`: this is the snapshot.
    yields: Option<(Arc<crate::nbd::export::Yield>, bool)>,
}

impl VluExport {
    pub fn new(mgr: Arc<Manager>, vlu: VirtualLuId, access: Access) -> Self {
        VluExport {
            mgr,
            vlu,
            read_only: AtomicBool::new(access.read_only),
            access: RwLock::new(access),
            gate: Gate::default(),
            snapshot_reads: None,
            clients: Arc::default(),
            yields: None,
        }
    }

    /// Count the bytes read through this (snapshot) export in `counter`.
    pub fn counting_reads(mut self, counter: Arc<AtomicU64>) -> Self {
        self.snapshot_reads = Some(counter);
        self
    }

    /// Share `y` with the virtual LU and its snapshot exports; `background`: this is a
    /// snapshot export, whose reads yield (see [`crate::nbd::export::Yield`]).
    pub fn yielding(mut self, y: Arc<crate::nbd::export::Yield>, background: bool) -> Self {
        self.yields = Some((y, background));
        self
    }

    /// A request on this export: a foreground one is noted, a background read waits as
    /// the pacing says.
    fn pace(&self, read_bytes: u64) {
        match &self.yields {
            Some((y, true)) => y.background(read_bytes),
            Some((y, false)) => y.foreground(),
            None => {}
        }
    }

    fn access(&self) -> std::sync::RwLockReadGuard<'_, Access> {
        self.access.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn allows(&self, peer: Option<&Peer>) -> bool {
        self.available() && self.access().allows(peer)
    }

    /// Its NBD connections and restore fence.
    pub fn nbd_clients(&self) -> &Arc<Clients> {
        &self.clients
    }

    /// Accessible now: a virtual LU in Undefined mode is neither listed nor opened.
    pub fn available(&self) -> bool {
        self.mgr.mode(self.vlu) != Mode::Undefined
    }
}

impl Export for VluExport {
    fn size(&self) -> u64 {
        self.mgr.capacity_bytes(self.vlu).unwrap_or(0)
    }

    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::Relaxed)
            || self
                .mgr
                .lu_mode_entry(self.vlu)
                .is_some_and(|e| e.write.is_none())
    }

    fn multi_conn(&self) -> bool {
        // One manager serves every connection and a flush reaches the array's LUs, so
        // a flush on any connection covers writes completed on all of them.
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        self.pace(buf.len() as u64);
        self.mgr.read(self.vlu, offset, buf).map_err(export_error)?;
        if let Some(c) = &self.snapshot_reads {
            c.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.pace(0);
        let _pass = self.gate.enter();
        self.mgr
            .write(self.vlu, offset, data, fua)
            .map_err(export_error)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), ExportError> {
        self.pace(0);
        let _pass = self.gate.enter();
        self.mgr
            .write_zeroes(self.vlu, offset, len, unmap, fua)
            .map_err(export_error)
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.pace(0);
        self.mgr.flush(self.vlu).map_err(export_error)
    }

    fn meta_contexts(&self) -> Vec<&'static str> {
        vec![BASE_ALLOCATION, HVM_DIRTY]
    }

    fn clients(&self) -> Option<&Arc<Clients>> {
        Some(&self.clients)
    }

    fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u32, u32)>, ExportError> {
        if context != HVM_DIRTY || len == 0 {
            // base:allocation: every block of an array LU is allocated data.
            return Ok(vec![(len, 0)]);
        }
        let end = offset + u64::from(len);
        let Some(sectors) = Extent::covering_bytes(offset, u64::from(len)) else {
            return Ok(Vec::new());
        };
        let recorded = self.mgr.recorded(self.vlu, sectors).map_err(export_error)?;
        // Runs of clean and dirty bytes covering exactly offset..end.
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut at = offset;
        let mut push = |from: u64, to: u64, flags: u32| {
            if to > from {
                out.push(((to - from) as u32, flags));
            }
        };
        for r in recorded {
            let (s, e) = (
                (r.first() * SECTOR_SIZE).max(offset),
                ((r.last() + 1) * SECTOR_SIZE).min(end),
            );
            push(at, s, 0);
            push(s, e, STATE_DIRTY);
            at = e;
        }
        push(at, end, 0);
        Ok(out)
    }
}

/// Every virtual LU of every backend, by export name.
#[derive(Default)]
pub struct VluExports {
    exports: BTreeMap<String, Arc<VluExport>>,
}

impl VluExports {
    pub fn insert(&mut self, name: String, export: VluExport) {
        self.exports.insert(name, Arc::new(export));
    }

    /// The export named `name`.
    pub fn export(&self, name: &str) -> Option<&Arc<VluExport>> {
        self.exports.get(name)
    }

    /// New access rules for export `name`, for connections opened from now on. False if
    /// there is no such export.
    pub fn set_access(&self, name: &str, access: Access) -> bool {
        let Some(e) = self.exports.get(name) else {
            return false;
        };
        e.read_only.store(access.read_only, Ordering::Relaxed);
        *e.access.write().unwrap_or_else(PoisonError::into_inner) = access;
        true
    }
}

impl Exports for VluExports {
    fn names(&self, peer: Option<&Peer>) -> Vec<String> {
        self.exports
            .iter()
            .filter(|(_, e)| e.allows(peer))
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn get(&self, name: &str, peer: Option<&Peer>) -> Option<Arc<dyn Export>> {
        let e = self.exports.get(name)?;
        e.allows(peer).then(|| e.clone() as Arc<dyn Export>)
    }
}

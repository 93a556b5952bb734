//! Pair volumes of EP 1 058 190 as virtual LUs (issue 22): the two patents joined.
//!
//! A virtual LU sits on a mirroring definition (EP 1 148 416's Fig. 9 table). An array
//! with the array-side backup functions of EP 1 058 190 has *pairs* instead: a user
//! volume the array duplicates to a secondary volume, split and resynchronised with
//! difference bitmaps. [`PairBackend`] wraps such an array's backend so that each pair
//! is reported as a mirroring definition of the Mode Select kind (E1): the user volume
//! is the origin LU, the secondary the mate ([0054]: the array reports its rows). The
//! snapshot manager then drives the pair through the Mode Select page, which this
//! wrapper turns into the pair commands:
//!
//! | manager (EP 1 148 416) | array (EP 1 058 190) |
//! |---|---|
//! | Mode Sense of the origin | pair status: duplex/forming → Synchronized, split → Snapshot, resyncing → Re-synchronizing |
//! | Mode Select Snapshot ([0028]) | pair split (step 44): the secondary is frozen |
//! | Mode Select Re-synchronizing ([0031]) | pair resync: the array copies the units its difference bitmap marked ([0031] of EP 1 058 190) |
//! | COPY of a recorded extent ([0049]) | nothing more: the array's resync copies every marked unit, a superset of the extents the host recorded |
//! | Mode Select Synchronized | wait until the pair is duplex |
//!
//! So a snapshot of the virtual LU is the split secondary, read through the snapshot
//! virtual LU (the array lets hosts read a secondary), and it can be copied to a backup
//! device by the array itself ([`ccopy_snapshot`], [0029]-[0030]) instead of by a host.
//! LUs in the array's own mirroring rows, and every other command, pass through.
//!
//! [`medium`] is the backup host's side of `hvmctl backup run` on such a virtual LU: the
//! array copies the split secondary to its backup device and the backup host records
//! the medium in its catalog, restores and checks it.

pub mod medium;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hvm_core::array_backup::{
    Area, BackupCapabilities, BackupOp, BackupReply, JobState, JobStatus, PairState, PairStatus,
};
use hvm_core::backend::{Backend, BackendDescription, BackendError, BackendErrorKind};
use hvm_core::lba::Extent;
use hvm_core::mode::{self, Mode};
use hvm_core::{LuId, MirrorDefinition};

/// How long a Mode Select Synchronized waits for the array's resync.
const RESYNC_WAIT: Duration = Duration::from_secs(3600);

/// A backend whose EP 1 058 190 pairs are reported as Mode Select mirroring definitions.
pub struct PairBackend {
    inner: Arc<dyn Backend>,
}

/// `inner` with its pairs as mirroring definitions when its array has pairs; `inner`
/// itself otherwise.
pub fn wrap(inner: Arc<dyn Backend>) -> Arc<dyn Backend> {
    if inner.backup_capabilities().pairs {
        Arc::new(PairBackend { inner })
    } else {
        inner
    }
}

fn mode_of(state: PairState) -> Mode {
    match state {
        PairState::Forming | PairState::Duplex => Mode::Synchronized,
        PairState::Split => Mode::Snapshot,
        PairState::Resyncing => Mode::Resynchronizing,
    }
}

fn invalid(m: String) -> BackendError {
    BackendError::new(BackendErrorKind::InvalidRequest, m)
}

impl PairBackend {
    /// The pair whose user volume is `lu`, if any.
    fn pair_of(&self, lu: LuId) -> Option<PairStatus> {
        match self.inner.backup(&BackupOp::PairStatus { lu: lu.0 }) {
            Ok(BackupReply::Pair(p)) if p.primary == lu.0 => Some(p),
            _ => None,
        }
    }

    /// Wait until the pair of `lu` is duplex (a resync ended).
    fn wait_duplex(&self, lu: LuId) -> Result<(), BackendError> {
        let start = Instant::now();
        loop {
            let p = self
                .pair_of(lu)
                .ok_or_else(|| invalid(format!("{lu} is no longer the user volume of a pair")))?;
            match p.state {
                PairState::Duplex => return Ok(()),
                PairState::Split => {
                    self.inner.backup(&BackupOp::PairResync {
                        lu: lu.0,
                        areas: vec![],
                    })?;
                }
                PairState::Forming | PairState::Resyncing => {}
            }
            if start.elapsed() > RESYNC_WAIT {
                return Err(BackendError::new(
                    BackendErrorKind::Io,
                    format!("the pair of {lu} did not become duplex in {RESYNC_WAIT:?}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The Mode Select of the manager on a pair's user volume, as pair commands.
    fn select(&self, p: &PairStatus, mode: Mode) -> Result<(), BackendError> {
        let lu = p.primary;
        match (mode, p.state) {
            (Mode::Snapshot, PairState::Split) => Ok(()),
            (Mode::Snapshot, _) => self
                .inner
                .backup(&BackupOp::PairSplit { lu, areas: vec![] })
                .map(drop),
            (Mode::Resynchronizing, PairState::Split) => self
                .inner
                .backup(&BackupOp::PairResync { lu, areas: vec![] })
                .map(drop),
            (Mode::Resynchronizing, _) => Ok(()),
            (Mode::Synchronized, _) => self.wait_duplex(LuId(lu)),
            (Mode::Undefined, _) => Err(invalid(format!(
                "LU {lu}: a pair cannot be made Undefined; delete it on the array"
            ))),
        }
    }
}

impl Backend for PairBackend {
    fn describe(&self) -> Result<BackendDescription, BackendError> {
        let mut d = self.inner.describe()?;
        let in_rows: Vec<LuId> = d.mirroring.iter().flat_map(MirrorDefinition::lus).collect();
        let pairs: Vec<PairStatus> = d
            .lus
            .iter()
            .filter(|l| !in_rows.contains(&l.id))
            .filter_map(|l| self.pair_of(l.id))
            .collect();
        for p in &pairs {
            d.mirroring.push(MirrorDefinition::Managed {
                lu: LuId(p.primary),
                mates: vec![LuId(p.secondary)],
            });
        }
        if !pairs.is_empty() {
            // The array keeps each pair's state (E1) and copies between its volumes.
            d.capabilities.mode_select = true;
            d.capabilities.array_copy = true;
        }
        Ok(d)
    }

    fn read(&self, lu: LuId, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.inner.read(lu, lba, buf)
    }

    fn write(&self, lu: LuId, lba: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.inner.write(lu, lba, data, fua)
    }

    fn flush(&self, lu: LuId) -> Result<(), BackendError> {
        self.inner.flush(lu)
    }

    fn mode_sense(&self, lu: LuId) -> Result<Vec<u8>, BackendError> {
        match self.pair_of(lu) {
            Some(p) => Ok(mode::encode_mode_sense(mode_of(p.state)).to_vec()),
            None => self.inner.mode_sense(lu),
        }
    }

    fn mode_select(&self, lu: LuId, page: &[u8]) -> Result<(), BackendError> {
        match self.pair_of(lu) {
            Some(p) => {
                let m = mode::decode_mode_select(page).map_err(|e| invalid(e.to_string()))?;
                self.select(&p, m)
            }
            None => self.inner.mode_select(lu, page),
        }
    }

    fn copy(&self, src: LuId, dst: LuId, extent: Extent) -> Result<(), BackendError> {
        match self.pair_of(src) {
            // The array's resync copies every unit its difference bitmap marked, and a
            // write the host recorded since the split marked its units.
            Some(p) if p.secondary == dst.0 => Ok(()),
            _ => self.inner.copy(src, dst, extent),
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
        self.inner.write_zeroes(lu, lba, blocks, unmap, fua)
    }

    fn identity(&self, lu: LuId) -> Result<Option<String>, BackendError> {
        self.inner.identity(lu)
    }

    fn backup_capabilities(&self) -> BackupCapabilities {
        self.inner.backup_capabilities()
    }

    fn backup(&self, op: &BackupOp) -> Result<BackupReply, BackendError> {
        self.inner.backup(op)
    }
}

/// The pair whose split secondary is `lu`, if `lu` is one.
pub fn split_secondary(backend: &dyn Backend, lu: LuId) -> Option<PairStatus> {
    match backend.backup(&BackupOp::PairStatus { lu: lu.0 }) {
        Ok(BackupReply::Pair(p)) if p.secondary == lu.0 && p.state == PairState::Split => Some(p),
        _ => None,
    }
}

/// Whether the array can copy `lu` to a backup device by itself: it offers CCOPY and
/// `lu` is a split pair secondary ([0030]: CCOPY reads only those).
pub fn offers_ccopy(backend: &dyn Backend, lu: LuId) -> bool {
    backend.backup_capabilities().ccopy && split_secondary(backend, lu).is_some()
}

/// [0029]-[0030]: the array copies the split secondary `mate` (a snapshot virtual LU's
/// real LU) to its backup device `device`, without the data passing through a host;
/// returns the finished job. `blocks` is the volume's size.
pub fn ccopy_snapshot(
    backend: &dyn Backend,
    mate: LuId,
    blocks: u64,
    device: &str,
) -> Result<JobStatus, BackendError> {
    let job = start_ccopy(backend, mate, blocks, device)?;
    wait_job(backend, job, &mut |_, _| {})
}

/// Start the array's CCOPY of all of `mate` to `device`; the job, once the array
/// accepted it (it answers at the start, [0030]).
pub fn start_ccopy(
    backend: &dyn Backend,
    mate: LuId,
    blocks: u64,
    device: &str,
) -> Result<u32, BackendError> {
    let op = BackupOp::Ccopy {
        lu: mate.0,
        device: device.to_string(),
        ranges: vec![Area { start: 0, blocks }],
        auto: false,
    };
    match backend.backup(&op)? {
        BackupReply::Started { job } => Ok(job),
        r => Err(invalid(format!("the array answered {r:?} to CCOPY"))),
    }
}

/// Poll the array's copy job until it ends; `progress(done, total)` in blocks.
pub fn wait_job(
    backend: &dyn Backend,
    job: u32,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<JobStatus, BackendError> {
    loop {
        match backend.backup(&BackupOp::Job { id: job })? {
            BackupReply::Job(j) if j.state == JobState::Done => return Ok(j),
            BackupReply::Job(j) if j.state == JobState::Failed => {
                return Err(BackendError::new(
                    BackendErrorKind::Io,
                    format!("CCOPY job {job} failed: {}", j.message.unwrap_or_default()),
                ))
            }
            BackupReply::Job(j) => {
                progress(j.done_blocks, j.total_blocks);
                std::thread::sleep(Duration::from_millis(5));
            }
            r => return Err(invalid(format!("the array answered {r:?} to a job query"))),
        }
    }
}

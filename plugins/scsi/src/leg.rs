//! A LUN of a SCSI target as one leg of a stateless volume (hvm-legs): hvm mirrors,
//! routes and resyncs on the host, so this works on any target that reads and writes.

use std::sync::Arc;

use hvm_core::backend::{Backend, BackendDescription, BackendError, BackendErrorKind};
use hvm_core::{Extent, LuId};
use hvm_legs::{Leg, Mirrored};

use crate::cdb::Command;
use crate::client::{ArrayClient, BLOCK_SIZE, MAX_TRANSFER_BLOCKS};
use crate::transport::{Submission, Transport};

/// One LUN reached through a (possibly shared) transport.
pub struct ScsiLeg {
    client: ArrayClient<Arc<dyn Transport>>,
    lu: LuId,
    name: String,
    size: u64,
    identity: String,
}

impl std::fmt::Debug for ScsiLeg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiLeg")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl ScsiLeg {
    /// Open LUN `lun` of `transport`: READ CAPACITY(16) (512-byte blocks only) and VPD
    /// 83h for its identity (the URL when the target has none).
    pub fn open(transport: Arc<dyn Transport>, lun: u8, name: &str) -> Result<ScsiLeg, String> {
        let client = ArrayClient::new(transport);
        let blocks = client.capacity(lun).map_err(|e| format!("{name}: {e}"))?;
        let identity = client
            .identity_of(lun)
            .map_err(|e| format!("{name}: {e}"))?
            .unwrap_or_else(|| name.to_string());
        Ok(ScsiLeg {
            client,
            lu: LuId(u32::from(lun)),
            name: name.to_string(),
            size: blocks * u64::from(BLOCK_SIZE),
            identity,
        })
    }
}

fn lba(offset: u64) -> Result<u64, BackendError> {
    if offset % u64::from(BLOCK_SIZE) != 0 {
        return Err(BackendError::new(
            BackendErrorKind::InvalidRequest,
            format!("offset {offset} is not a multiple of {BLOCK_SIZE}"),
        ));
    }
    Ok(offset / u64::from(BLOCK_SIZE))
}

impl Leg for ScsiLeg {
    fn size(&self) -> u64 {
        self.size
    }
    fn identity(&self) -> String {
        self.identity.clone()
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.client.read(self.lu, lba(offset)?, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.client.write(self.lu, lba(offset)?, data, fua)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.client.flush(self.lu)
    }
    /// Legs on one session (LUNs of one target) write both at once from this thread.
    fn write_both(
        &self,
        other: &Self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Option<Result<(), BackendError>> {
        let (t, o) = (self.client.transport(), other.client.transport());
        let blocks = u32::try_from(data.len() / BLOCK_SIZE as usize).ok()?;
        if !std::ptr::addr_eq(Arc::as_ptr(t), Arc::as_ptr(o)) || blocks > MAX_TRANSFER_BLOCKS {
            return None;
        }
        let lba = match lba(offset) {
            Ok(l) => l,
            Err(e) => return Some(Err(e)),
        };
        let cmd = Command::Write16 { lba, blocks, fua };
        let cdb = cmd.encode();
        let legs = [self, other];
        let subs = legs.map(|l| Submission {
            lun: l.lun(),
            cdb: &cdb,
            data_out: data,
        });
        let results = t.execute_two(subs[0], subs[1])?;
        let mut outcome = Ok(());
        for (leg, r) in legs.into_iter().zip(results) {
            // A UNIT ATTENTION is answered again on its own, as the client does.
            let r = match r {
                Ok(resp) if resp.sense.is_some_and(crate::Sense::retryable) => {
                    leg.write(offset, data, fua)
                }
                r => ArrayClient::<Arc<dyn Transport>>::checked(leg.lun(), &cmd, r).map(drop),
            };
            outcome = outcome.and(r);
        }
        Some(outcome)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _unmap: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        let blocks = len / u64::from(BLOCK_SIZE);
        hvm_core::backend::write_zeroes_by_writing(&self.client, self.lu, lba(offset)?, blocks, fua)
    }
}

impl ScsiLeg {
    fn lun(&self) -> u8 {
        self.lu.0 as u8
    }

    /// TEST UNIT READY: does the target answer now?
    pub fn check(&self) -> Result<(), BackendError> {
        self.client
            .command(self.lun(), Command::TestUnitReady, &[])
            .map(drop)
            .map_err(|e| BackendError::new(e.kind, format!("{}: {}", self.name, e.message)))
    }
}

/// The stateless array of LUN legs: hvm-legs' [`Mirrored`], whose `describe` also asks
/// every leg TEST UNIT READY, so a target that is down or stalled shows as failing in
/// `hvmctl backends` (and as ok again once it answers).
pub struct LunArray(pub Mirrored<ScsiLeg>);

impl Backend for LunArray {
    fn describe(&self) -> Result<BackendDescription, BackendError> {
        for v in self.0.volumes() {
            v.origin.check()?;
            v.mate.check()?;
        }
        self.0.describe()
    }
    fn read(&self, lu: LuId, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.0.read(lu, lba, buf)
    }
    fn write(&self, lu: LuId, lba: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.0.write(lu, lba, data, fua)
    }
    fn flush(&self, lu: LuId) -> Result<(), BackendError> {
        self.0.flush(lu)
    }
    fn mode_sense(&self, lu: LuId) -> Result<Vec<u8>, BackendError> {
        self.0.mode_sense(lu)
    }
    fn mode_select(&self, lu: LuId, page: &[u8]) -> Result<(), BackendError> {
        self.0.mode_select(lu, page)
    }
    fn copy(&self, src: LuId, dst: LuId, extent: Extent) -> Result<(), BackendError> {
        self.0.copy(src, dst, extent)
    }
    fn write_zeroes(
        &self,
        lu: LuId,
        lba: u64,
        blocks: u64,
        unmap: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        self.0.write_zeroes(lu, lba, blocks, unmap, fua)
    }
    fn identity(&self, lu: LuId) -> Result<Option<String>, BackendError> {
        self.0.identity(lu)
    }
}

//! The generic array client: typed SCSI commands over any [`Transport`], and hvm-core's
//! [`Backend`] on top of them. Discovery is REPORT LUNS, READ CAPACITY(16) and INQUIRY
//! (VPD 83h for a LU's identity, hvm's pairing page C0h for the mirroring rows); I/O is
//! READ/WRITE(16) with FUA and SYNCHRONIZE CACHE(16); snapshots use MODE SENSE/SELECT(6)
//! and the array copy. A command answered with UNIT ATTENTION is sent again, as
//! initiators do.

use hvm_core::array_backup::{BackupCapabilities, BackupOp, BackupReply};
use hvm_core::backend::{
    Backend, BackendDescription, BackendError, BackendErrorKind, Capabilities, LuInfo,
};
use hvm_core::{Extent, LuId, MirrorDefinition};

use crate::cdb::Command;
use crate::format as scsi;
use crate::sense::{Sense, GOOD};
use crate::transport::{Response, Transport, TransportError};

/// The block size the client works in.
pub const BLOCK_SIZE: u32 = 512;
/// Most blocks one READ or WRITE carries (32 MiB, array-sim's limit); longer transfers
/// are cut.
pub const MAX_TRANSFER_BLOCKS: u32 = 65536;
/// How often a command answered with UNIT ATTENTION is sent again.
const UNIT_ATTENTION_RETRIES: usize = 8;

/// Typed SCSI commands over a transport, and hvm-core's `Backend` on top of them.
#[derive(Debug)]
pub struct ArrayClient<T> {
    transport: T,
}

/// `blocks` blocks from `lba` cut into commands of at most [`MAX_TRANSFER_BLOCKS`]: each
/// command's LBA, block count, and byte range within the whole transfer.
fn transfers(lba: u64, blocks: u64) -> impl Iterator<Item = (u64, u32, std::ops::Range<usize>)> {
    let max = u64::from(MAX_TRANSFER_BLOCKS);
    let bs = BLOCK_SIZE as usize;
    (0..blocks.div_ceil(max)).map(move |i| {
        let first = i * max;
        let n = (blocks - first).min(max);
        let start = first as usize * bs;
        (lba + first, n as u32, start..start + n as usize * bs)
    })
}

fn lun_of(lu: LuId) -> Result<u8, BackendError> {
    u8::try_from(lu.0).map_err(|_| {
        BackendError::new(
            BackendErrorKind::InvalidRequest,
            format!("{lu} is beyond the array's 256 LUNs"),
        )
    })
}

/// Run `f` again while it answers UNIT ATTENTION (or NOT READY, becoming ready).
fn retry_unit_attention(
    mut f: impl FnMut() -> Result<Response, TransportError>,
) -> Result<Response, TransportError> {
    let mut r = f();
    for _ in 0..UNIT_ATTENTION_RETRIES {
        match &r {
            Ok(resp) if resp.sense.is_some_and(Sense::retryable) => r = f(),
            _ => break,
        }
    }
    r
}

impl<T: Transport> ArrayClient<T> {
    pub fn new(transport: T) -> Self {
        ArrayClient { transport }
    }

    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Run `cmd`, turning CHECK CONDITION and transport failures into typed errors.
    pub fn command(&self, lun: u8, cmd: Command, data_out: &[u8]) -> Result<Vec<u8>, BackendError> {
        let cdb = cmd.encode();
        let r = retry_unit_attention(|| self.transport.execute(lun, &cdb, data_out));
        Self::checked(lun, &cmd, r)
    }

    /// Run a command whose data-in fills `data_in` exactly.
    pub fn command_into(
        &self,
        lun: u8,
        cmd: Command,
        data_in: &mut [u8],
    ) -> Result<(), BackendError> {
        let cdb = cmd.encode();
        let r = retry_unit_attention(|| self.transport.execute_into(lun, &cdb, &[], data_in));
        Self::checked(lun, &cmd, r).map(drop)
    }

    /// The result of `cmd` on `lun` as the client reports it: data-in, or CHECK CONDITION
    /// and transport failures as typed errors.
    pub fn checked(
        lun: u8,
        cmd: &Command,
        r: Result<Response, TransportError>,
    ) -> Result<Vec<u8>, BackendError> {
        let what = || format!("{cmd:?} on LUN {lun}");
        let r =
            r.map_err(|e| BackendError::new(BackendErrorKind::Io, format!("{}: {e}", what())))?;
        if r.status == GOOD {
            return Ok(r.data);
        }
        // A backup function's refusal carries its reason as text.
        let reason = match std::str::from_utf8(&r.data) {
            Ok(t) if !t.is_empty() => format!(": {t}"),
            _ => String::new(),
        };
        Err(match r.sense {
            Some(s) => {
                BackendError::new(s.backend_error_kind(), format!("{}: {s}{reason}", what()))
            }
            None => BackendError::new(
                BackendErrorKind::Io,
                format!("{}: status {:#04x} without sense data", what(), r.status),
            ),
        })
    }

    pub fn report_luns(&self) -> Result<Vec<u8>, BackendError> {
        let d = self.command(0, Command::ReportLuns { alloc_len: 4096 }, &[])?;
        scsi::decode_report_luns(&d)
            .ok_or_else(|| BackendError::new(BackendErrorKind::Io, "malformed REPORT LUNS data"))
    }

    pub fn capacity(&self, lun: u8) -> Result<u64, BackendError> {
        let d = self.command(lun, Command::ReadCapacity16 { alloc_len: 32 }, &[])?;
        match scsi::decode_read_capacity_16(&d) {
            Some((blocks, BLOCK_SIZE)) => Ok(blocks),
            other => Err(BackendError::new(
                BackendErrorKind::Io,
                format!("LUN {lun}: READ CAPACITY answered {other:?}, expected 512-byte blocks"),
            )),
        }
    }

    /// The pairing VPD page body: kind, role, related LUNs.
    pub fn pairing(&self, lun: u8) -> Result<(u8, u8, Vec<u8>), BackendError> {
        let cmd = Command::Inquiry {
            evpd: true,
            page: scsi::VPD_PAIRING,
            alloc_len: 512,
        };
        let d = self.command(lun, cmd, &[])?;
        let bad = || {
            BackendError::new(
                BackendErrorKind::Io,
                format!("LUN {lun}: malformed pairing page"),
            )
        };
        let body = d.get(4..).ok_or_else(bad)?;
        let (&kind, &role, &n) = match body {
            [k, r, n, ..] => (k, r, n),
            _ => return Err(bad()),
        };
        let related = body.get(3..3 + usize::from(n)).ok_or_else(bad)?.to_vec();
        Ok((kind, role, related))
    }

    /// The LU's name from VPD page 83h, or `None` if the array does not have the page.
    pub fn identity_of(&self, lun: u8) -> Result<Option<String>, BackendError> {
        let cmd = Command::Inquiry {
            evpd: true,
            page: scsi::VPD_DEVICE_ID,
            alloc_len: 1024,
        };
        match self.command(lun, cmd, &[]) {
            Ok(d) => Ok(scsi::decode_identity(&d)),
            Err(e) if e.kind == BackendErrorKind::InvalidRequest => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl<T: Transport> Backend for ArrayClient<T> {
    fn describe(&self) -> Result<BackendDescription, BackendError> {
        let mut lus = Vec::new();
        let mut mirroring = Vec::new();
        let mut kind = None;
        for lun in self.report_luns()? {
            lus.push(LuInfo {
                id: LuId(u32::from(lun)),
                capacity_lbas: self.capacity(lun)?,
            });
            let (k, role, related) = self.pairing(lun)?;
            kind = Some(k);
            let id = |l: u8| LuId(u32::from(l));
            if role != 1 {
                continue;
            }
            mirroring.push(match (k, related.as_slice()) {
                (0, mates) => MirrorDefinition::Managed {
                    lu: id(lun),
                    mates: mates.iter().copied().map(id).collect(),
                },
                (1, [origin, mate]) => MirrorDefinition::Triple {
                    mirror: id(lun),
                    origin: id(*origin),
                    mate: id(*mate),
                },
                (2, [mate]) => MirrorDefinition::Pair {
                    mirror: id(lun),
                    mate: id(*mate),
                },
                _ => {
                    return Err(BackendError::new(
                        BackendErrorKind::Io,
                        format!("LUN {lun}: pairing page of kind {k} lists {related:?}"),
                    ))
                }
            });
        }
        let capabilities = Capabilities {
            mode_select: kind == Some(0),
            virtual_lu_forming: kind == Some(1),
            read_only_mate: kind == Some(2),
            array_copy: matches!(kind, Some(0 | 1)),
            fua: true,
        };
        Ok(BackendDescription {
            lus,
            mirroring,
            capabilities,
        })
    }

    fn read(&self, lu: LuId, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let lun = lun_of(lu)?;
        for (at, blocks, bytes) in transfers(lba, buf.len() as u64 / u64::from(BLOCK_SIZE)) {
            let cmd = Command::Read16 {
                lba: at,
                blocks,
                fua: false,
            };
            self.command_into(lun, cmd, &mut buf[bytes])?;
        }
        Ok(())
    }

    fn write(&self, lu: LuId, lba: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        let lun = lun_of(lu)?;
        for (at, blocks, bytes) in transfers(lba, data.len() as u64 / u64::from(BLOCK_SIZE)) {
            let cmd = Command::Write16 {
                lba: at,
                blocks,
                fua,
            };
            self.command(lun, cmd, &data[bytes])?;
        }
        Ok(())
    }

    fn flush(&self, lu: LuId) -> Result<(), BackendError> {
        self.command(
            lun_of(lu)?,
            Command::SynchronizeCache16 { lba: 0, blocks: 0 },
            &[],
        )
        .map(drop)
    }

    fn mode_sense(&self, lu: LuId) -> Result<Vec<u8>, BackendError> {
        let d = self.command(
            lun_of(lu)?,
            Command::ModeSense6 {
                page: 0,
                alloc_len: 255,
            },
            &[],
        )?;
        scsi::mode_page_6(&d).map(<[u8]>::to_vec).map_err(|s| {
            BackendError::new(
                BackendErrorKind::Io,
                format!("malformed MODE SENSE data: {s}"),
            )
        })
    }

    fn mode_select(&self, lu: LuId, page: &[u8]) -> Result<(), BackendError> {
        let data = scsi::encode_mode_select_6(page);
        let param_len = u8::try_from(data.len()).map_err(|_| {
            BackendError::new(BackendErrorKind::InvalidRequest, "mode page too long")
        })?;
        self.command(lun_of(lu)?, Command::ModeSelect6 { param_len }, &data)
            .map(drop)
    }

    fn identity(&self, lu: LuId) -> Result<Option<String>, BackendError> {
        self.identity_of(lun_of(lu)?)
    }

    fn copy(&self, src: LuId, dst: LuId, extent: Extent) -> Result<(), BackendError> {
        let (lun, dest_lun) = (lun_of(src)?, lun_of(dst)?);
        for (at, blocks, _) in transfers(extent.first(), extent.count()) {
            let cmd = Command::ArrayCopy {
                lba: at,
                blocks,
                dest_lun,
            };
            self.command(lun, cmd, &[])?;
        }
        Ok(())
    }

    /// The array offers the backup functions when INQUIRY lists the pair page (C1h).
    fn backup_capabilities(&self) -> BackupCapabilities {
        let cmd = Command::Inquiry {
            evpd: true,
            page: 0,
            alloc_len: 64,
        };
        let luns = self.report_luns().unwrap_or_default();
        let Some(&lun) = luns.first() else {
            return BackupCapabilities::default();
        };
        match self.command(lun, cmd, &[]) {
            Ok(d) if d.len() > 4 && d[4..].contains(&scsi::VPD_PAIR) => BackupCapabilities::ALL,
            _ => BackupCapabilities::default(),
        }
    }

    fn backup(&self, op: &BackupOp) -> Result<BackupReply, BackendError> {
        let bad = |what: &str| BackendError::new(BackendErrorKind::Io, what.to_string());
        match op {
            // Fig. 5: command code, split bit, parameter count, parameters.
            BackupOp::PairSplit { lu, areas } | BackupOp::PairResync { lu, areas } => {
                let split = matches!(op, BackupOp::PairSplit { .. });
                let params = u16::try_from(areas.len())
                    .map_err(|_| bad("more than 65535 areas in one pair split command"))?;
                let mut data = Vec::with_capacity(areas.len() * scsi::PAIR_SPLIT_PARAM_LEN);
                scsi::encode_areas(&mut data, areas);
                self.command(
                    lun_of(LuId(*lu))?,
                    Command::PairSplit { split, params },
                    &data,
                )?;
                Ok(BackupReply::Done)
            }
            // Step 43: the Inquiry of pairing.
            BackupOp::PairStatus { lu } => {
                let lun = lun_of(LuId(*lu))?;
                let cmd = Command::Inquiry {
                    evpd: true,
                    page: scsi::VPD_PAIR,
                    alloc_len: u16::MAX,
                };
                let d = self.command(lun, cmd, &[])?;
                scsi::decode_pair_page(lun, d.get(4..).unwrap_or(&[]))
                    .ok_or_else(|| bad("malformed pair page (VPD C1h)"))?
                    .map(BackupReply::Pair)
                    .ok_or_else(|| {
                        BackendError::new(
                            BackendErrorKind::InvalidRequest,
                            format!("LU {lun} is not paired"),
                        )
                    })
            }
            _ => {
                let body = serde_json::to_vec(op).map_err(|e| bad(&e.to_string()))?;
                let param_len = u32::try_from(body.len()).map_err(|_| bad("request too long"))?;
                // Addressed to the operation's LU when it names one.
                let lun = match op {
                    BackupOp::PairCreate { primary: l, .. }
                    | BackupOp::PairDelete { lu: l }
                    | BackupOp::Ccopy { lu: l, .. }
                    | BackupOp::Cow { lu: l, .. }
                    | BackupOp::Attribute { lu: l, .. } => lun_of(LuId(*l))?,
                    _ => 0,
                };
                let d = self.command(lun, Command::Backup { param_len }, &body)?;
                serde_json::from_slice(&d)
                    .map_err(|e| bad(&format!("malformed backup function answer: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transfers are cut at MAX_TRANSFER_BLOCKS; LBAs and byte ranges line up.
    #[test]
    fn transfers_cover_the_whole_range() {
        let max = u64::from(MAX_TRANSFER_BLOCKS);
        let t: Vec<_> = transfers(10, 2 * max + 3).collect();
        let bs = BLOCK_SIZE as usize;
        let m = MAX_TRANSFER_BLOCKS as usize;
        assert_eq!(
            t,
            vec![
                (10, MAX_TRANSFER_BLOCKS, 0..m * bs),
                (10 + max, MAX_TRANSFER_BLOCKS, m * bs..2 * m * bs),
                (10 + 2 * max, 3, 2 * m * bs..(2 * m + 3) * bs),
            ]
        );
        assert_eq!(transfers(0, 0).count(), 0);
        assert_eq!(transfers(5, 1).collect::<Vec<_>>(), vec![(5, 1, 0..bs)]);
    }
}

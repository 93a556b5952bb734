//! The SCSI command set array-sim speaks: CDB layouts, status and fixed-format sense data.
//!
//! Both sides use this module: the array parses CDBs and builds sense data, the drivers
//! build CDBs and read sense data back into typed errors. Layouts follow SBC/SPC for the
//! standard commands; vendor-specific operation codes (C0h-FFh) carry hvm's extra
//! functions.
//!
//! | command | opcode | CDB | data |
//! |---|---|---|---|
//! | TEST UNIT READY | 00h | 6 | — |
//! | INQUIRY | 12h | 6: EVPD bit 0 of byte 1, page byte 2, allocation length bytes 3-4 | in |
//! | MODE SELECT(6) | 15h | 6: parameter list length byte 4 | out: 4-byte header + page |
//! | MODE SENSE(6) | 1Ah | 6: page code byte 2 (bits 5-0), allocation length byte 4 | in: 4-byte header + page |
//! | READ(16) | 88h | 16: FUA bit 3 of byte 1, LBA bytes 2-9, blocks bytes 10-13 | in |
//! | WRITE(16) | 8Ah | 16: as READ(16) | out |
//! | SYNCHRONIZE CACHE(16) | 91h | 16: LBA bytes 2-9, blocks bytes 10-13 (0: to the end) | — |
//! | READ CAPACITY(16) | 9Eh/10h | 16: service action byte 1, allocation length bytes 10-13 | in: 32 bytes |
//! | REPORT LUNS | A0h | 12: allocation length bytes 6-9 | in: 8-byte header, 8 bytes a LUN |
//! | ARRAY COPY (vendor) | C1h | 16: LBA bytes 2-9, blocks bytes 10-13, destination LUN byte 14 | — |
//! | SET FAULT (vendor) | C2h | 16: parameter list length bytes 10-13 | out: fault rule |
//! | BACKUP FUNCTION (vendor) | C3h | 16: parameter list length bytes 10-13 | out: a JSON `BackupOp`; in: a JSON `BackupReply`, or on CHECK CONDITION the reason as text |
//! | PAIR SPLIT / RESYNC (vendor, EP 1 058 190 Fig. 5) | C4h | 16: split request bit 0 of byte 1 (1 split, 0 resync), parameter list number bytes 2-3 | out: per parameter, head block address (8 bytes) and block number (8 bytes) |
//!
//! INQUIRY VPD page C1h (pair, step 43 of EP 1 058 190): role (0 none, 1 user volume,
//! 2 secondary volume), partner LUN, state (0 forming, 1 duplex, 2 split, 3 resyncing), a
//! reserved byte, blocks per bit (4 bytes), units, split units, difference units and bytes
//! copied between the volumes (8 bytes each), the number of split areas (2 bytes) and the
//! areas (start and blocks, 8 bytes each).
//!
//! Sense codes used (fixed format, response code 70h):
//!
//! | condition | key | ASC/ASCQ |
//! |---|---|---|
//! | unknown operation code | ILLEGAL REQUEST (5h) | 20h/00h |
//! | CDB too short, bad field, unknown page | ILLEGAL REQUEST | 24h/00h |
//! | LBA range past the end of the LU | ILLEGAL REQUEST | 21h/00h |
//! | LUN that does not exist | ILLEGAL REQUEST | 25h/00h |
//! | data-out length differs from the CDB's | ILLEGAL REQUEST | 1Ah/00h |
//! | bad mode page or fault rule | ILLEGAL REQUEST | 26h/00h |
//! | write to a protected (mate) LU | DATA PROTECT (7h) | 27h/00h |
//! | LU not accessible in its current mode | NOT READY (2h) | 04h/0Ch |
//! | read error (also injected) | MEDIUM ERROR (3h) | 11h/00h |
//! | write error (also injected) | MEDIUM ERROR | 0Ch/00h |
//! | internal failure (a file I/O error) | HARDWARE ERROR (4h) | 44h/00h |
//! | backup function refused (the reason follows as data-in text) | ILLEGAL REQUEST, or NOT READY for a working volume | 80h/01h-0Ah |

use std::fmt;

use hvm_core::array_backup::{Area, PairState, PairStatus};
use hvm_core::BackendErrorKind;

/// SCSI status GOOD.
pub const GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION: sense data follows.
pub const CHECK_CONDITION: u8 = 0x02;

pub const TEST_UNIT_READY: u8 = 0x00;
pub const INQUIRY: u8 = 0x12;
pub const MODE_SELECT_6: u8 = 0x15;
pub const MODE_SENSE_6: u8 = 0x1a;
pub const READ_16: u8 = 0x88;
pub const WRITE_16: u8 = 0x8a;
pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
pub const SA_READ_CAPACITY_16: u8 = 0x10;
pub const REPORT_LUNS: u8 = 0xa0;
pub const VENDOR_ARRAY_COPY: u8 = 0xc1;
pub const VENDOR_SET_FAULT: u8 = 0xc2;
pub const VENDOR_BACKUP: u8 = 0xc3;
pub const VENDOR_PAIR_SPLIT: u8 = 0xc4;

/// Bytes of a READ CAPACITY(16) answer.
pub const READ_CAPACITY_16_LEN: usize = 32;
/// Bytes of the mode parameter header before a MODE SENSE(6)/SELECT(6) page.
pub const MODE_HEADER_6_LEN: usize = 4;
/// Vendor VPD page of INQUIRY that describes the array's mirroring (pairing).
pub const VPD_PAIRING: u8 = 0xc0;
/// Vendor VPD page of INQUIRY that describes the pair of a volume (EP 1 058 190).
pub const VPD_PAIR: u8 = 0xc1;
/// Bytes of one Fig. 5 parameter.
pub const PAIR_SPLIT_PARAM_LEN: usize = 16;

/// Sense keys used by array-sim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    AbortedCommand = 0xb,
}

impl SenseKey {
    pub fn from_u8(v: u8) -> Option<SenseKey> {
        Some(match v {
            0x0 => SenseKey::NoSense,
            0x2 => SenseKey::NotReady,
            0x3 => SenseKey::MediumError,
            0x4 => SenseKey::HardwareError,
            0x5 => SenseKey::IllegalRequest,
            0x6 => SenseKey::UnitAttention,
            0x7 => SenseKey::DataProtect,
            0xb => SenseKey::AbortedCommand,
            _ => return None,
        })
    }
}

/// Sense key, additional sense code and qualifier of a CHECK CONDITION.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Sense {
        Sense { key, asc, ascq }
    }

    pub const INVALID_OPCODE: Sense = Sense::new(SenseKey::IllegalRequest, 0x20, 0x00);
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(SenseKey::IllegalRequest, 0x24, 0x00);
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(SenseKey::IllegalRequest, 0x21, 0x00);
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(SenseKey::IllegalRequest, 0x25, 0x00);
    pub const PARAMETER_LIST_LENGTH: Sense = Sense::new(SenseKey::IllegalRequest, 0x1a, 0x00);
    pub const INVALID_FIELD_IN_PARAMETERS: Sense = Sense::new(SenseKey::IllegalRequest, 0x26, 0x00);
    pub const WRITE_PROTECTED: Sense = Sense::new(SenseKey::DataProtect, 0x27, 0x00);
    pub const NOT_ACCESSIBLE: Sense = Sense::new(SenseKey::NotReady, 0x04, 0x0c);
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(SenseKey::MediumError, 0x11, 0x00);
    pub const WRITE_ERROR: Sense = Sense::new(SenseKey::MediumError, 0x0c, 0x00);
    pub const INTERNAL_FAILURE: Sense = Sense::new(SenseKey::HardwareError, 0x44, 0x00);
    /// A backup function refused: the volume is not in a state for it.
    pub const BACKUP_STATE: Sense = Sense::new(SenseKey::IllegalRequest, 0x80, 0x01);
    /// A backup function refused: its parameters are wrong.
    pub const BACKUP_PARAMETERS: Sense = Sense::new(SenseKey::IllegalRequest, 0x80, 0x02);
    /// A backup function refused: a resource (device, working volume) is busy or missing.
    pub const BACKUP_RESOURCE: Sense = Sense::new(SenseKey::IllegalRequest, 0x80, 0x03);
    /// Host access to a working volume ([0123]).
    pub const WORKING_VOLUME: Sense = Sense::new(SenseKey::NotReady, 0x80, 0x04);

    /// Fixed-format sense data, 18 bytes.
    pub fn encode(self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = self.key as u8;
        s[7] = 10; // additional sense length: bytes 8..18
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }

    /// Read fixed-format sense data (response code 70h or 71h).
    pub fn parse(data: &[u8]) -> Result<Sense, SenseError> {
        if data.len() < 14 {
            return Err(SenseError::Short(data.len()));
        }
        let code = data[0] & 0x7f;
        if code != 0x70 && code != 0x71 {
            return Err(SenseError::ResponseCode(data[0]));
        }
        let key = SenseKey::from_u8(data[2] & 0x0f).ok_or(SenseError::Key(data[2] & 0x0f))?;
        Ok(Sense::new(key, data[12], data[13]))
    }

    /// What a driver reports for this sense to hvm-core.
    pub fn backend_error_kind(self) -> BackendErrorKind {
        match (self.key, self.asc) {
            (SenseKey::IllegalRequest, 0x21) => BackendErrorKind::OutOfRange,
            (SenseKey::IllegalRequest, 0x20) => BackendErrorKind::Unsupported,
            (SenseKey::IllegalRequest, _) => BackendErrorKind::InvalidRequest,
            (SenseKey::DataProtect, _) => BackendErrorKind::DataProtect,
            (SenseKey::NotReady, _) => BackendErrorKind::NotReady,
            _ => BackendErrorKind::Io,
        }
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = match self.key {
            SenseKey::NoSense => "NO SENSE",
            SenseKey::NotReady => "NOT READY",
            SenseKey::MediumError => "MEDIUM ERROR",
            SenseKey::HardwareError => "HARDWARE ERROR",
            SenseKey::IllegalRequest => "ILLEGAL REQUEST",
            SenseKey::UnitAttention => "UNIT ATTENTION",
            SenseKey::DataProtect => "DATA PROTECT",
            SenseKey::AbortedCommand => "ABORTED COMMAND",
        };
        write!(f, "{key} {:02X}h/{:02X}h", self.asc, self.ascq)
    }
}

/// Sense data that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SenseError {
    #[error("sense data is {0} bytes, expected at least 14")]
    Short(usize),
    #[error("sense response code is {0:#04x}, expected 70h or 71h (fixed format)")]
    ResponseCode(u8),
    #[error("sense key {0:#x} is not one array-sim uses")]
    Key(u8),
}

/// A decoded CDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    TestUnitReady,
    Inquiry {
        evpd: bool,
        page: u8,
        alloc_len: u16,
    },
    ModeSelect6 {
        param_len: u8,
    },
    ModeSense6 {
        page: u8,
        alloc_len: u8,
    },
    Read16 {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    Write16 {
        lba: u64,
        blocks: u32,
        fua: bool,
    },
    SynchronizeCache16 {
        lba: u64,
        blocks: u32,
    },
    ReadCapacity16 {
        alloc_len: u32,
    },
    ReportLuns {
        alloc_len: u32,
    },
    /// Copy `blocks` blocks at `lba` of the addressed LU to the same LBAs of `dest_lun`
    /// inside the array (EP 1 148 416 [0049]).
    ArrayCopy {
        lba: u64,
        blocks: u32,
        dest_lun: u8,
    },
    /// Install a fault-injection rule sent as `param_len` bytes of data-out.
    SetFault {
        param_len: u32,
    },
    /// An array-side backup function; its JSON request is `param_len` bytes of data-out.
    Backup {
        param_len: u32,
    },
    /// EP 1 058 190 Fig. 5: split (`split`) or resync the areas that follow as `params`
    /// parameters of data-out; none means the whole volume.
    PairSplit {
        split: bool,
        params: u16,
    },
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// CDB length of an operation code, or `None` for one array-sim does not know.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode {
        TEST_UNIT_READY | INQUIRY | MODE_SELECT_6 | MODE_SENSE_6 => Some(6),
        REPORT_LUNS => Some(12),
        READ_16 | WRITE_16 | SYNCHRONIZE_CACHE_16 | SERVICE_ACTION_IN_16 | VENDOR_ARRAY_COPY
        | VENDOR_SET_FAULT | VENDOR_BACKUP | VENDOR_PAIR_SPLIT => Some(16),
        _ => None,
    }
}

impl Command {
    /// Decode a CDB. Errors are the sense data the array answers with.
    pub fn parse(cdb: &[u8]) -> Result<Command, Sense> {
        let &opcode = cdb.first().ok_or(Sense::INVALID_FIELD_IN_CDB)?;
        let len = cdb_len(opcode).ok_or(Sense::INVALID_OPCODE)?;
        if cdb.len() < len {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let c = &cdb[..len];
        Ok(match opcode {
            TEST_UNIT_READY => Command::TestUnitReady,
            INQUIRY => Command::Inquiry {
                evpd: c[1] & 1 != 0,
                page: c[2],
                alloc_len: u16::from_be_bytes([c[3], c[4]]),
            },
            MODE_SELECT_6 => Command::ModeSelect6 { param_len: c[4] },
            MODE_SENSE_6 => Command::ModeSense6 {
                page: c[2] & 0x3f,
                alloc_len: c[4],
            },
            READ_16 | WRITE_16 => {
                let (lba, blocks, fua) = (be64(&c[2..]), be32(&c[10..]), c[1] & 0x08 != 0);
                if opcode == READ_16 {
                    Command::Read16 { lba, blocks, fua }
                } else {
                    Command::Write16 { lba, blocks, fua }
                }
            }
            SYNCHRONIZE_CACHE_16 => Command::SynchronizeCache16 {
                lba: be64(&c[2..]),
                blocks: be32(&c[10..]),
            },
            SERVICE_ACTION_IN_16 => {
                if c[1] & 0x1f != SA_READ_CAPACITY_16 {
                    return Err(Sense::INVALID_FIELD_IN_CDB);
                }
                Command::ReadCapacity16 {
                    alloc_len: be32(&c[10..]),
                }
            }
            REPORT_LUNS => Command::ReportLuns {
                alloc_len: be32(&c[6..]),
            },
            VENDOR_ARRAY_COPY => Command::ArrayCopy {
                lba: be64(&c[2..]),
                blocks: be32(&c[10..]),
                dest_lun: c[14],
            },
            VENDOR_SET_FAULT => Command::SetFault {
                param_len: be32(&c[10..]),
            },
            VENDOR_BACKUP => Command::Backup {
                param_len: be32(&c[10..]),
            },
            VENDOR_PAIR_SPLIT => Command::PairSplit {
                split: c[1] & 1 == 1,
                params: u16::from_be_bytes([c[2], c[3]]),
            },
            _ => return Err(Sense::INVALID_OPCODE),
        })
    }

    /// The CDB bytes of this command.
    pub fn encode(&self) -> Vec<u8> {
        let sixteen = |op: u8, b1: u8, lba: u64, n: u32, b14: u8| {
            let mut c = vec![0u8; 16];
            c[0] = op;
            c[1] = b1;
            c[2..10].copy_from_slice(&lba.to_be_bytes());
            c[10..14].copy_from_slice(&n.to_be_bytes());
            c[14] = b14;
            c
        };
        match *self {
            Command::TestUnitReady => vec![TEST_UNIT_READY, 0, 0, 0, 0, 0],
            Command::Inquiry {
                evpd,
                page,
                alloc_len,
            } => {
                let l = alloc_len.to_be_bytes();
                vec![INQUIRY, u8::from(evpd), page, l[0], l[1], 0]
            }
            Command::ModeSelect6 { param_len } => vec![MODE_SELECT_6, 0, 0, 0, param_len, 0],
            Command::ModeSense6 { page, alloc_len } => {
                vec![MODE_SENSE_6, 0x08, page & 0x3f, 0, alloc_len, 0]
            }
            Command::Read16 { lba, blocks, fua } => {
                sixteen(READ_16, if fua { 0x08 } else { 0 }, lba, blocks, 0)
            }
            Command::Write16 { lba, blocks, fua } => {
                sixteen(WRITE_16, if fua { 0x08 } else { 0 }, lba, blocks, 0)
            }
            Command::SynchronizeCache16 { lba, blocks } => {
                sixteen(SYNCHRONIZE_CACHE_16, 0, lba, blocks, 0)
            }
            Command::ReadCapacity16 { alloc_len } => {
                sixteen(SERVICE_ACTION_IN_16, SA_READ_CAPACITY_16, 0, alloc_len, 0)
            }
            Command::ReportLuns { alloc_len } => {
                let mut c = vec![0u8; 12];
                c[0] = REPORT_LUNS;
                c[6..10].copy_from_slice(&alloc_len.to_be_bytes());
                c
            }
            Command::ArrayCopy {
                lba,
                blocks,
                dest_lun,
            } => sixteen(VENDOR_ARRAY_COPY, 0, lba, blocks, dest_lun),
            Command::SetFault { param_len } => sixteen(VENDOR_SET_FAULT, 0, 0, param_len, 0),
            Command::Backup { param_len } => sixteen(VENDOR_BACKUP, 0, 0, param_len, 0),
            Command::PairSplit { split, params } => {
                let mut c = vec![0u8; 16];
                c[0] = VENDOR_PAIR_SPLIT;
                c[1] = u8::from(split);
                c[2..4].copy_from_slice(&params.to_be_bytes());
                c
            }
        }
    }

    /// Bytes of data-out the command carries, for `block_size`-byte blocks.
    pub fn data_out_len(&self, block_size: u32) -> u64 {
        match *self {
            Command::Write16 { blocks, .. } => u64::from(blocks) * u64::from(block_size),
            Command::ModeSelect6 { param_len } => u64::from(param_len),
            Command::SetFault { param_len } => u64::from(param_len),
            Command::Backup { param_len } => u64::from(param_len),
            Command::PairSplit { params, .. } => u64::from(params) * PAIR_SPLIT_PARAM_LEN as u64,
            _ => 0,
        }
    }
}

/// The READ CAPACITY(16) answer: last LBA and block length.
pub fn encode_read_capacity_16(blocks: u64, block_size: u32) -> [u8; READ_CAPACITY_16_LEN] {
    let mut d = [0u8; READ_CAPACITY_16_LEN];
    d[..8].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&block_size.to_be_bytes());
    d
}

/// (number of blocks, block length) from a READ CAPACITY(16) answer.
pub fn decode_read_capacity_16(d: &[u8]) -> Option<(u64, u32)> {
    if d.len() < 12 {
        return None;
    }
    Some((be64(d).checked_add(1)?, be32(&d[8..])))
}

/// REPORT LUNS data: list length, 4 reserved bytes, then each LUN in single-level
/// peripheral addressing (8 bytes, the LUN in byte 1).
pub fn encode_report_luns(luns: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; 8 + 8 * luns.len()];
    d[..4].copy_from_slice(&((8 * luns.len()) as u32).to_be_bytes());
    for (i, lun) in luns.iter().enumerate() {
        d[8 + 8 * i + 1] = *lun;
    }
    d
}

pub fn decode_report_luns(d: &[u8]) -> Option<Vec<u8>> {
    let len = be32(d.get(..4)?) as usize;
    let body = d.get(8..8 + len)?;
    Some(body.chunks_exact(8).map(|e| e[1]).collect())
}

/// MODE SENSE(6) data: the 4-byte mode parameter header, then `page`.
pub fn encode_mode_sense_6(page: &[u8], write_protected: bool) -> Vec<u8> {
    let mut d = Vec::with_capacity(MODE_HEADER_6_LEN + page.len());
    // Mode data length counts the bytes after itself.
    d.push((MODE_HEADER_6_LEN - 1 + page.len()) as u8);
    d.push(0); // medium type
    d.push(if write_protected { 0x80 } else { 0 });
    d.push(0); // no block descriptors
    d.extend_from_slice(page);
    d
}

/// The page of MODE SENSE(6) or MODE SELECT(6) data, after its header and any block
/// descriptors.
pub fn mode_page_6(data: &[u8]) -> Result<&[u8], Sense> {
    if data.len() < MODE_HEADER_6_LEN {
        return Err(Sense::PARAMETER_LIST_LENGTH);
    }
    let start = MODE_HEADER_6_LEN + usize::from(data[3]);
    data.get(start..).ok_or(Sense::INVALID_FIELD_IN_PARAMETERS)
}

/// MODE SELECT(6) data-out: a zeroed header, then `page`.
pub fn encode_mode_select_6(page: &[u8]) -> Vec<u8> {
    let mut d = vec![0u8; MODE_HEADER_6_LEN];
    d.extend_from_slice(page);
    d
}

/// Fig. 5's parameters, and the split areas of the pair page: per area the start block
/// and the number of blocks, 8 bytes each, big-endian.
pub fn encode_areas(d: &mut Vec<u8>, areas: &[Area]) {
    for a in areas {
        d.extend_from_slice(&a.start.to_be_bytes());
        d.extend_from_slice(&a.blocks.to_be_bytes());
    }
}

/// The whole areas in `d` (a trailing partial one is ignored).
pub fn decode_areas(d: &[u8]) -> Vec<Area> {
    d.chunks_exact(PAIR_SPLIT_PARAM_LEN)
        .map(|p| Area {
            start: be64(p),
            blocks: be64(&p[8..]),
        })
        .collect()
}

/// Split areas listed at most by the pair page.
const PAIR_PAGE_AREAS: usize = 1000;
/// Bytes of the pair page before its areas.
const PAIR_PAGE_HEADER: usize = 42;

/// The body of VPD page C1h for `lun` (step 43): role (0 unpaired, 1 user volume, 2
/// secondary), the other volume, state (0 forming, 1 duplex, 2 split, 3 resyncing), a
/// reserved byte, blocks per bit (4 bytes), then units, split units, different units and
/// copied bytes (8 each), the number of split areas (2) and the areas.
pub fn encode_pair_page(lun: u8, pair: Option<&PairStatus>) -> Vec<u8> {
    let mut d = vec![0u8; 4];
    let Some(s) = pair else {
        d.resize(PAIR_PAGE_HEADER + 2, 0);
        return d;
    };
    let primary = s.primary == u32::from(lun);
    d[0] = if primary { 1 } else { 2 };
    d[1] = if primary { s.secondary } else { s.primary } as u8;
    d[2] = match s.state {
        PairState::Forming => 0,
        PairState::Duplex => 1,
        PairState::Split => 2,
        PairState::Resyncing => 3,
    };
    d.extend_from_slice(&s.blocks_per_bit.to_be_bytes());
    for v in [s.units, s.split_units, s.diff_units, s.copied_bytes] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    let areas = &s.split_areas[..s.split_areas.len().min(PAIR_PAGE_AREAS)];
    d.extend_from_slice(&(areas.len() as u16).to_be_bytes());
    encode_areas(&mut d, areas);
    d
}

/// A pair page body of `lun`: `None` if malformed, `Some(None)` for an unpaired LU.
pub fn decode_pair_page(lun: u8, d: &[u8]) -> Option<Option<PairStatus>> {
    if d.len() < PAIR_PAGE_HEADER {
        return None;
    }
    if d[0] == 0 {
        return Some(None);
    }
    let (primary, secondary) = if d[0] == 1 { (lun, d[1]) } else { (d[1], lun) };
    let state = match d[2] {
        0 => PairState::Forming,
        1 => PairState::Duplex,
        2 => PairState::Split,
        3 => PairState::Resyncing,
        _ => return None,
    };
    let n = usize::from(u16::from_be_bytes([d[40], d[41]]));
    let areas = d.get(PAIR_PAGE_HEADER..PAIR_PAGE_HEADER + n * PAIR_SPLIT_PARAM_LEN)?;
    Some(Some(PairStatus {
        primary: u32::from(primary),
        secondary: u32::from(secondary),
        state,
        blocks_per_bit: be32(&d[4..]),
        units: be64(&d[8..]),
        split_units: be64(&d[16..]),
        diff_units: be64(&d[24..]),
        copied_bytes: be64(&d[32..]),
        split_areas: decode_areas(areas),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pair_pages_round_trip() {
        let s = PairStatus {
            primary: 10,
            secondary: 11,
            state: PairState::Split,
            blocks_per_bit: 8,
            units: 4096,
            split_units: 2048,
            diff_units: 3,
            split_areas: vec![
                Area {
                    start: 0,
                    blocks: 16384,
                },
                Area {
                    start: 20000,
                    blocks: 8,
                },
            ],
            copied_bytes: 1 << 24,
        };
        for lun in [10, 11] {
            let d = encode_pair_page(lun, Some(&s));
            assert_eq!(decode_pair_page(lun, &d), Some(Some(s.clone())));
            assert_eq!(decode_pair_page(lun, &d[..d.len() - 1]), None, "cut area");
        }
        assert_eq!(decode_pair_page(3, &encode_pair_page(3, None)), Some(None));
        let mut bad = encode_pair_page(10, Some(&s));
        bad[2] = 9;
        assert_eq!(decode_pair_page(10, &bad), None, "unknown state");
    }

    #[test]
    fn sense_round_trip_and_layout() {
        let s = Sense::WRITE_PROTECTED.encode();
        assert_eq!(
            (s[0], s[2], s[7], s[12], s[13]),
            (0x70, 0x07, 10, 0x27, 0x00)
        );
        assert_eq!(Sense::parse(&s), Ok(Sense::WRITE_PROTECTED));
        assert_eq!(Sense::parse(&s[..10]), Err(SenseError::Short(10)));
        assert_eq!(
            Sense::LBA_OUT_OF_RANGE.to_string(),
            "ILLEGAL REQUEST 21h/00h"
        );
        assert_eq!(
            Sense::WRITE_PROTECTED.backend_error_kind(),
            BackendErrorKind::DataProtect
        );
        assert_eq!(
            Sense::LBA_OUT_OF_RANGE.backend_error_kind(),
            BackendErrorKind::OutOfRange
        );
        assert_eq!(
            Sense::NOT_ACCESSIBLE.backend_error_kind(),
            BackendErrorKind::NotReady
        );
    }

    /// READ(16) as a driver sends it, byte for byte.
    #[test]
    fn read16_layout() {
        let cdb = Command::Read16 {
            lba: 0x0102_0304_0506_0708,
            blocks: 0x0a0b_0c0d,
            fua: true,
        }
        .encode();
        assert_eq!(
            cdb,
            [0x88, 0x08, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b, 0x0c, 0x0d, 0, 0]
        );
    }

    #[test]
    fn bad_cdbs_are_sense_not_panics() {
        assert_eq!(Command::parse(&[]), Err(Sense::INVALID_FIELD_IN_CDB));
        assert_eq!(Command::parse(&[0x28, 0, 0]), Err(Sense::INVALID_OPCODE));
        assert_eq!(
            Command::parse(&[READ_16, 0, 0, 0]),
            Err(Sense::INVALID_FIELD_IN_CDB)
        );
        let mut rc = Command::ReadCapacity16 { alloc_len: 32 }.encode();
        rc[1] = 0x11;
        assert_eq!(Command::parse(&rc), Err(Sense::INVALID_FIELD_IN_CDB));
    }

    #[test]
    fn capacity_and_mode_data() {
        let d = encode_read_capacity_16(2048, 512);
        assert_eq!(decode_read_capacity_16(&d), Some((2048, 512)));
        let sense = encode_mode_sense_6(&[0x00, 0x01], false);
        assert_eq!(sense, [5, 0, 0, 0, 0x00, 0x01]);
        assert_eq!(mode_page_6(&sense), Ok(&[0x00u8, 0x01][..]));
        assert_eq!(mode_page_6(&[0, 0]), Err(Sense::PARAMETER_LIST_LENGTH));
        assert_eq!(
            mode_page_6(&[0, 0, 0, 9, 1]),
            Err(Sense::INVALID_FIELD_IN_PARAMETERS)
        );
    }

    fn command() -> impl Strategy<Value = Command> {
        prop_oneof![
            Just(Command::TestUnitReady),
            (any::<bool>(), any::<u8>(), any::<u16>()).prop_map(|(evpd, page, alloc_len)| {
                Command::Inquiry {
                    evpd,
                    page,
                    alloc_len,
                }
            }),
            any::<u8>().prop_map(|param_len| Command::ModeSelect6 { param_len }),
            (0u8..64, any::<u8>())
                .prop_map(|(page, alloc_len)| Command::ModeSense6 { page, alloc_len }),
            (any::<u64>(), any::<u32>(), any::<bool>())
                .prop_map(|(lba, blocks, fua)| Command::Read16 { lba, blocks, fua }),
            (any::<u64>(), any::<u32>(), any::<bool>())
                .prop_map(|(lba, blocks, fua)| Command::Write16 { lba, blocks, fua }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(lba, blocks)| Command::SynchronizeCache16 { lba, blocks }),
            any::<u32>().prop_map(|alloc_len| Command::ReadCapacity16 { alloc_len }),
            any::<u32>().prop_map(|alloc_len| Command::ReportLuns { alloc_len }),
            (any::<u64>(), any::<u32>(), any::<u8>()).prop_map(|(lba, blocks, dest_lun)| {
                Command::ArrayCopy {
                    lba,
                    blocks,
                    dest_lun,
                }
            }),
            any::<u32>().prop_map(|param_len| Command::SetFault { param_len }),
            any::<u32>().prop_map(|param_len| Command::Backup { param_len }),
            (any::<bool>(), any::<u16>())
                .prop_map(|(split, params)| Command::PairSplit { split, params }),
        ]
    }

    proptest! {
        #[test]
        fn encode_parse_round_trip(cmd in command()) {
            prop_assert_eq!(Command::parse(&cmd.encode()), Ok(cmd));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
            let _ = Command::parse(&bytes);
            let _ = Sense::parse(&bytes);
            let _ = mode_page_6(&bytes);
            let _ = decode_read_capacity_16(&bytes);
            let _ = decode_report_luns(&bytes);
        }
    }
}

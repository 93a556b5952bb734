//! The SCSI command set hvm speaks: CDB layouts of the standard commands an array
//! driver needs, and the vendor commands (C0h-FFh) of array-sim's extra functions.
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
//! | MODE SELECT(6) | 15h | 6: PF bit 4 of byte 1 (set: SPC page format), parameter list length byte 4 | out: 4-byte header + page |
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

use crate::format::{be32, be64, PAIR_SPLIT_PARAM_LEN};
use crate::sense::Sense;

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
            Command::ModeSelect6 { param_len } => vec![MODE_SELECT_6, 0x10, 0, 0, param_len, 0],
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

    /// Bytes of data-in the command asks for at most, for `block_size`-byte blocks (what
    /// an initiator announces as its expected transfer length).
    pub fn data_in_len(&self, block_size: u32) -> u64 {
        match *self {
            Command::Inquiry { alloc_len, .. } => u64::from(alloc_len),
            Command::ModeSense6 { alloc_len, .. } => u64::from(alloc_len),
            Command::Read16 { blocks, .. } => u64::from(blocks) * u64::from(block_size),
            Command::ReadCapacity16 { alloc_len } | Command::ReportLuns { alloc_len } => {
                u64::from(alloc_len)
            }
            _ => 0,
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
            let _ = crate::sense::Sense::parse(&bytes);
            let _ = crate::format::mode_page_6(&bytes);
            let _ = crate::format::decode_read_capacity_16(&bytes);
            let _ = crate::format::decode_report_luns(&bytes);
            let _ = crate::format::decode_identity(&bytes);
            let _ = crate::format::decode_standard_inquiry(&bytes);
        }
    }
}

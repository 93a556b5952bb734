//! The journal that persists hvm's tables: the LU mode table, the update-location tables
//! and the E4 save maps.
//!
//! File layout: a 16-byte header (`HVMJRNL1`, version u32 LE, CRC32C of the first 12
//! bytes as u32 LE), then records. A record is `len: u32 LE`, `crc: u32 LE`, then `len`
//! bytes of payload; `crc` is CRC32C over the length bytes and the payload, so a torn
//! length is caught as surely as a torn payload. Replay applies records in order and stops
//! at the first record that is incomplete, longer than [`MAX_RECORD`], fails its CRC or
//! does not decode: that tail is reported and never applied, so what replay rebuilds is
//! always the state after a prefix of the appended records.
//!
//! Durability contract for a [`StateLog`]: records that grow what must be copied
//! (`Add`, `Save`) and mode changes (`LuMode`, `SnapshotInvalid`) must be on stable
//! storage before `append` returns, because the data write they describe is issued next.
//! Records that only shrink the tables (`Remove`, `Clear`) may be deferred: losing one in a
//! crash costs a redundant copy, never a lost range.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::lba::Extent;
use crate::mode::Mode;
use crate::save_area::SaveArea;
use crate::tables::{LuId, LuModeEntry, LuModeTable, VirtualLuId};
use crate::update_location::UpdateLocationTable;

pub const MAGIC: &[u8; 8] = b"HVMJRNL1";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 16;
/// Largest payload a record may have; anything longer is corruption.
pub const MAX_RECORD: u32 = 256;
const FRAME_LEN: usize = 8;

/// Pairs are named in the journal by their origin virtual LU.
pub type PairKey = VirtualLuId;

/// One change to the tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalRecord {
    /// A row of the LU mode table was set.
    LuMode {
        vlu: VirtualLuId,
        entry: LuModeEntry,
    },
    /// LBAs were added to a pair's update-location table.
    Add { pair: PairKey, extent: Extent },
    /// LBAs were deleted from a pair's update-location table.
    Remove { pair: PairKey, extent: Extent },
    /// A pair's update-location table and save map were emptied.
    Clear { pair: PairKey },
    /// E4: the pre-update data of `extent` was saved at `save_lba` of the save area `lu`;
    /// implies `Add` of the same extent.
    Save {
        pair: PairKey,
        extent: Extent,
        lu: LuId,
        save_lba: u64,
    },
    /// E4: the save area filled up and the snapshot was invalidated (or made valid again
    /// by a new acquire).
    SnapshotInvalid { pair: PairKey, invalid: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "not an hvm journal: the header is {found:02x?}, expected it to start with \"HVMJRNL1\""
    )]
    BadMagic { found: Vec<u8> },
    #[error("journal version {found} is not supported (this build reads version {VERSION})")]
    Version { found: u32 },
    #[error("journal header checksum mismatch")]
    HeaderChecksum,
    #[error("journal I/O failed")]
    Io(#[source] std::io::Error),
    #[error("journal is closed after an earlier failure; restart to recover")]
    Closed,
}

/// Where appended records go. See the module docs for the durability contract.
pub trait StateLog: Send + Sync {
    fn append(&self, rec: &JournalRecord) -> Result<(), JournalError>;
}

/// A log that keeps nothing (tables only in memory).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLog;

impl StateLog for NoLog {
    fn append(&self, _: &JournalRecord) -> Result<(), JournalError> {
        Ok(())
    }
}

/// A journal in memory, in the file format; for tests and tools.
#[derive(Debug)]
pub struct MemoryLog {
    bytes: Mutex<Vec<u8>>,
}

impl Default for MemoryLog {
    fn default() -> Self {
        MemoryLog {
            bytes: Mutex::new(header().to_vec()),
        }
    }
}

impl MemoryLog {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.bytes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl StateLog for MemoryLog {
    fn append(&self, rec: &JournalRecord) -> Result<(), JournalError> {
        let mut b = self
            .bytes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        encode_record(rec, &mut b);
        Ok(())
    }
}

/// The file header.
pub fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

const TAG_LU_MODE: u8 = 1;
const TAG_ADD: u8 = 2;
const TAG_REMOVE: u8 = 3;
const TAG_CLEAR: u8 = 4;
const TAG_SAVE: u8 = 5;
const TAG_INVALID: u8 = 6;

fn put_lu(p: &mut Vec<u8>, lu: Option<LuId>) {
    match lu {
        Some(l) => {
            p.push(1);
            p.extend_from_slice(&l.0.to_le_bytes());
        }
        None => {
            p.push(0);
            p.extend_from_slice(&0u32.to_le_bytes());
        }
    }
}

fn put_extent(p: &mut Vec<u8>, e: Extent) {
    p.extend_from_slice(&e.first().to_le_bytes());
    p.extend_from_slice(&e.last().to_le_bytes());
}

fn encode_payload(rec: &JournalRecord, p: &mut Vec<u8>) {
    match *rec {
        JournalRecord::LuMode { vlu, entry } => {
            p.push(TAG_LU_MODE);
            p.extend_from_slice(&vlu.0.to_le_bytes());
            p.push(entry.mode.code());
            put_lu(p, entry.read);
            put_lu(p, entry.write);
        }
        JournalRecord::Add { pair, extent } | JournalRecord::Remove { pair, extent } => {
            let tag = if matches!(rec, JournalRecord::Add { .. }) {
                TAG_ADD
            } else {
                TAG_REMOVE
            };
            p.push(tag);
            p.extend_from_slice(&pair.0.to_le_bytes());
            put_extent(p, extent);
        }
        JournalRecord::Clear { pair } => {
            p.push(TAG_CLEAR);
            p.extend_from_slice(&pair.0.to_le_bytes());
        }
        JournalRecord::Save {
            pair,
            extent,
            lu,
            save_lba,
        } => {
            p.push(TAG_SAVE);
            p.extend_from_slice(&pair.0.to_le_bytes());
            put_extent(p, extent);
            p.extend_from_slice(&lu.0.to_le_bytes());
            p.extend_from_slice(&save_lba.to_le_bytes());
        }
        JournalRecord::SnapshotInvalid { pair, invalid } => {
            p.push(TAG_INVALID);
            p.extend_from_slice(&pair.0.to_le_bytes());
            p.push(u8::from(invalid));
        }
    }
}

/// Append one framed record to `out`.
pub fn encode_record(rec: &JournalRecord, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_LEN]);
    encode_payload(rec, out);
    let len = (out.len() - start - FRAME_LEN) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32c::crc32c(&out[start..start + 4]);
    crc = crc32c::crc32c_append(crc, &out[start + FRAME_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }
    fn lu(&mut self) -> Option<Option<LuId>> {
        let present = self.u8()?;
        let id = self.u32()?;
        match present {
            0 => Some(None),
            1 => Some(Some(LuId(id))),
            _ => None,
        }
    }
    fn extent(&mut self) -> Option<Extent> {
        let f = self.u64()?;
        let l = self.u64()?;
        Extent::new(f, l)
    }
}

fn decode_payload(p: &[u8]) -> Option<JournalRecord> {
    let mut r = Reader(p);
    let rec = match r.u8()? {
        TAG_LU_MODE => {
            let vlu = VirtualLuId(r.u32()?);
            let mode = Mode::from_code(r.u8()?)?;
            let read = r.lu()?;
            let write = r.lu()?;
            JournalRecord::LuMode {
                vlu,
                entry: LuModeEntry { read, write, mode },
            }
        }
        TAG_ADD => JournalRecord::Add {
            pair: VirtualLuId(r.u32()?),
            extent: r.extent()?,
        },
        TAG_REMOVE => JournalRecord::Remove {
            pair: VirtualLuId(r.u32()?),
            extent: r.extent()?,
        },
        TAG_CLEAR => JournalRecord::Clear {
            pair: VirtualLuId(r.u32()?),
        },
        TAG_SAVE => JournalRecord::Save {
            pair: VirtualLuId(r.u32()?),
            extent: r.extent()?,
            lu: LuId(r.u32()?),
            save_lba: r.u64()?,
        },
        TAG_INVALID => JournalRecord::SnapshotInvalid {
            pair: VirtualLuId(r.u32()?),
            invalid: match r.u8()? {
                0 => false,
                1 => true,
                _ => return None,
            },
        },
        _ => return None,
    };
    r.0.is_empty().then_some(rec)
}

/// How the journal ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belonged to a whole, valid record.
    Clean,
    /// The last record (or the header) is incomplete: a torn append.
    Torn { offset: u64 },
    /// A record failed its checksum or did not decode; it and everything after it were
    /// dropped.
    Corrupt { offset: u64 },
}

/// What replay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub records: Vec<JournalRecord>,
    pub state: JournalState,
    /// Bytes of the journal that hold the header and the applied records; a writer
    /// truncates the file here before appending.
    pub valid_len: u64,
    pub tail: Tail,
}

/// Read a journal. Errors only for a file that is not an hvm journal of this version;
/// torn and corrupt tails are reported in [`Replay::tail`].
pub fn replay(bytes: &[u8]) -> Result<Replay, JournalError> {
    let mut out = Replay {
        records: Vec::new(),
        state: JournalState::default(),
        valid_len: 0,
        tail: Tail::Clean,
    };
    if bytes.len() < HEADER_LEN {
        // A header torn while the journal was created; anything else is not ours.
        let expect = header();
        if bytes != &expect[..bytes.len()] {
            return Err(JournalError::BadMagic {
                found: bytes.to_vec(),
            });
        }
        if !bytes.is_empty() {
            out.tail = Tail::Torn { offset: 0 };
        }
        return Ok(out);
    }
    if &bytes[..8] != MAGIC {
        return Err(JournalError::BadMagic {
            found: bytes[..8].to_vec(),
        });
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != VERSION {
        return Err(JournalError::Version { found: version });
    }
    if crc32c::crc32c(&bytes[..12]).to_le_bytes() != bytes[12..16] {
        return Err(JournalError::HeaderChecksum);
    }
    let mut pos = HEADER_LEN;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest.len() < FRAME_LEN {
            out.tail = Tail::Torn { offset: pos as u64 };
            break;
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        if len > MAX_RECORD {
            out.tail = Tail::Corrupt { offset: pos as u64 };
            break;
        }
        let end = FRAME_LEN + len as usize;
        if rest.len() < end {
            out.tail = Tail::Torn { offset: pos as u64 };
            break;
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&rest[..4]), &rest[FRAME_LEN..end]);
        let rec = (crc.to_le_bytes() == rest[4..8])
            .then(|| decode_payload(&rest[FRAME_LEN..end]))
            .flatten();
        let Some(rec) = rec else {
            out.tail = Tail::Corrupt { offset: pos as u64 };
            break;
        };
        out.state.apply(&rec);
        out.records.push(rec);
        pos += end;
    }
    out.valid_len = match out.tail {
        Tail::Clean => bytes.len() as u64,
        Tail::Torn { offset } | Tail::Corrupt { offset } => offset,
    };
    Ok(out)
}

/// The tables a journal rebuilds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalState {
    pub lu_mode: LuModeTable,
    pub tables: BTreeMap<PairKey, UpdateLocationTable>,
    /// E4 save maps, keyed by pair; the save area LU comes from the records.
    pub save_maps: BTreeMap<PairKey, SaveArea>,
    pub invalid: BTreeMap<PairKey, bool>,
}

impl JournalState {
    pub fn apply(&mut self, rec: &JournalRecord) {
        match *rec {
            JournalRecord::LuMode { vlu, entry } => self.lu_mode.set(vlu, entry),
            JournalRecord::Add { pair, extent } => {
                self.tables.entry(pair).or_default().add(extent);
            }
            JournalRecord::Remove { pair, extent } => {
                self.tables.entry(pair).or_default().remove(extent);
            }
            JournalRecord::Clear { pair } => {
                self.tables.entry(pair).or_default().clear();
                if let Some(s) = self.save_maps.get_mut(&pair) {
                    s.reset();
                }
            }
            JournalRecord::Save {
                pair,
                extent,
                lu,
                save_lba,
            } => {
                self.tables.entry(pair).or_default().add(extent);
                self.save_maps
                    .entry(pair)
                    .or_insert_with(|| SaveArea::new(lu, u64::MAX))
                    .insert(extent, save_lba);
            }
            JournalRecord::SnapshotInvalid { pair, invalid } => {
                self.invalid.insert(pair, invalid);
            }
        }
    }

    /// The fewest records that rebuild this state: what a compacted journal holds.
    pub fn checkpoint(&self) -> Vec<JournalRecord> {
        let mut recs: Vec<JournalRecord> = self
            .lu_mode
            .iter()
            .map(|(vlu, entry)| JournalRecord::LuMode { vlu, entry })
            .collect();
        for (&pair, &invalid) in &self.invalid {
            recs.push(JournalRecord::SnapshotInvalid { pair, invalid });
        }
        for (&pair, table) in &self.tables {
            // Clear first, so an entry that exists but is empty is rebuilt too.
            recs.push(JournalRecord::Clear { pair });
            let mut saved = UpdateLocationTable::new();
            if let Some(area) = self.save_maps.get(&pair) {
                for (extent, save_lba) in area.iter() {
                    recs.push(JournalRecord::Save {
                        pair,
                        extent,
                        lu: area.lu(),
                        save_lba,
                    });
                    saved.add(extent);
                }
            }
            // A Save implies an Add; take back what the table does not hold, then add
            // what no Save covered.
            for extent in saved.iter() {
                for extent in table.uncovered(extent) {
                    recs.push(JournalRecord::Remove { pair, extent });
                }
            }
            for extent in table.iter() {
                for extent in saved.uncovered(extent) {
                    recs.push(JournalRecord::Add { pair, extent });
                }
            }
        }
        recs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(f: u64, l: u64) -> Extent {
        Extent::new(f, l).unwrap()
    }

    fn record() -> impl Strategy<Value = JournalRecord> {
        let pair = (0u32..3).prop_map(VirtualLuId);
        let extent = (0u64..500, 1u64..40).prop_map(|(f, n)| ext(f, f + n - 1));
        let lu = prop::option::of((0u32..9).prop_map(LuId));
        let mode = prop::sample::select(vec![
            Mode::Synchronized,
            Mode::Snapshot,
            Mode::Resynchronizing,
            Mode::Undefined,
        ]);
        prop_oneof![
            (0u32..6, mode, lu.clone(), lu).prop_map(|(v, mode, read, write)| {
                JournalRecord::LuMode {
                    vlu: VirtualLuId(v),
                    entry: LuModeEntry { read, write, mode },
                }
            }),
            (pair.clone(), extent.clone())
                .prop_map(|(pair, extent)| JournalRecord::Add { pair, extent }),
            (pair.clone(), extent.clone())
                .prop_map(|(pair, extent)| JournalRecord::Remove { pair, extent }),
            pair.clone().prop_map(|pair| JournalRecord::Clear { pair }),
            (pair.clone(), any::<bool>())
                .prop_map(|(pair, invalid)| JournalRecord::SnapshotInvalid { pair, invalid }),
            // Saves of distinct blocks, as copy-on-write makes them.
            (pair, 0u64..50, 1u64..8).prop_map(|(pair, k, n)| JournalRecord::Save {
                pair,
                extent: ext(1000 + k * 10, 1000 + k * 10 + n - 1),
                lu: LuId(9),
                save_lba: k * 10,
            }),
        ]
    }

    fn state_of(recs: &[JournalRecord]) -> JournalState {
        let mut s = JournalState::default();
        for r in recs {
            s.apply(r);
        }
        s
    }

    fn journal_of(recs: &[JournalRecord]) -> Vec<u8> {
        let mut b = header().to_vec();
        for r in recs {
            encode_record(r, &mut b);
        }
        b
    }

    #[test]
    fn empty_and_foreign_files() {
        let r = replay(&[]).unwrap();
        assert_eq!((r.records.len(), r.tail), (0, Tail::Clean));
        assert!(matches!(
            replay(b"hello world, not a journal"),
            Err(JournalError::BadMagic { .. })
        ));
        let mut h = header();
        h[8] = 9;
        assert!(matches!(
            replay(&h),
            Err(JournalError::Version { found: 9 })
        ));
    }

    #[test]
    fn oversized_length_is_corruption() {
        let mut b = header().to_vec();
        encode_record(
            &JournalRecord::Clear {
                pair: VirtualLuId(1),
            },
            &mut b,
        );
        let at = b.len();
        b.extend_from_slice(&(MAX_RECORD + 1).to_le_bytes());
        b.extend_from_slice(&[0; 300]);
        let r = replay(&b).unwrap();
        assert_eq!(r.records.len(), 1);
        assert_eq!(r.tail, Tail::Corrupt { offset: at as u64 });
        assert_eq!(r.valid_len, at as u64);
    }

    #[test]
    fn memory_log_replays() {
        let log = MemoryLog::new();
        let rec = JournalRecord::Add {
            pair: VirtualLuId(2),
            extent: ext(8, 31),
        };
        log.append(&rec).unwrap();
        let r = replay(&log.bytes()).unwrap();
        assert_eq!(r.records, vec![rec]);
        assert_eq!(r.state.tables[&VirtualLuId(2)].total(), 24);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Truncating a journal at every byte offset replays exactly a prefix of the
        /// records, and the state equals applying that prefix directly.
        #[test]
        fn truncation_at_every_offset_gives_a_prefix(recs in prop::collection::vec(record(), 0..24)) {
            let bytes = journal_of(&recs);
            let full = replay(&bytes).unwrap();
            prop_assert_eq!(&full.records, &recs);
            prop_assert_eq!(full.tail, Tail::Clean);
            for cut in 0..bytes.len() {
                let r = replay(&bytes[..cut]).unwrap();
                let n = r.records.len();
                prop_assert_eq!(&r.records[..], &recs[..n]);
                prop_assert_eq!(&r.state, &state_of(&recs[..n]));
                prop_assert!(r.valid_len <= cut as u64);
                if cut < HEADER_LEN {
                    // A torn header: the writer starts the file again.
                    prop_assert_eq!(r.valid_len, 0);
                } else {
                    prop_assert_eq!(&journal_of(&recs[..n])[..], &bytes[..r.valid_len as usize]);
                }
                if cut >= HEADER_LEN && (cut as u64) != r.valid_len {
                    prop_assert!(matches!(r.tail, Tail::Torn { .. }), "cut {} gave {:?}", cut, r.tail);
                }
            }
        }

        /// A flipped bit anywhere after the header drops that record and all after it.
        #[test]
        fn corruption_drops_the_tail(recs in prop::collection::vec(record(), 1..16), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = journal_of(&recs);
            let pos = HEADER_LEN + at.index(bytes.len() - HEADER_LEN);
            bytes[pos] ^= 1 << bit;
            let r = replay(&bytes).unwrap();
            let n = r.records.len();
            prop_assert_eq!(&r.records[..], &recs[..n]);
            prop_assert!(n < recs.len());
            let dropped = matches!(r.tail, Tail::Corrupt { .. } | Tail::Torn { .. });
            prop_assert!(dropped, "tail {:?}", r.tail);
        }

        /// A checkpoint rebuilds an identical state.
        #[test]
        fn checkpoint_rebuilds_identical_tables(recs in prop::collection::vec(record(), 0..40)) {
            let state = state_of(&recs);
            let rebuilt = replay(&journal_of(&state.checkpoint())).unwrap().state;
            prop_assert_eq!(&rebuilt.lu_mode, &state.lu_mode);
            prop_assert_eq!(&rebuilt.tables, &state.tables);
            prop_assert_eq!(&rebuilt.invalid, &state.invalid);
            let maps = |s: &JournalState| s.save_maps.iter()
                .map(|(k, v)| (*k, v.iter().collect::<Vec<_>>()))
                .filter(|(_, v)| !v.is_empty())
                .collect::<Vec<_>>();
            prop_assert_eq!(maps(&rebuilt), maps(&state));
        }
    }
}

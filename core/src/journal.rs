//! The journal that persists hvm's tables: the LU mode table, the update-location tables,
//! the E4 save maps and the changed-block records of [`crate::change_tracking`].
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
//!
//! Changed-block tracking follows the same rule: `TrackAdd` (a client write's extent) is
//! durable before the data write; `TrackCut` moves the written set to a backup's pending
//! set without shrinking their union, and `TrackAbort` moves it back; `TrackComplete`
//! drops a completed backup's pending set. Losing any of them in a crash leaves a record
//! that covers more, never less. Version 2 of the format added these records; version 1
//! files (which have none) replay as before, and a version-1 reader refuses a version-2
//! file instead of dropping its tail.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::change_tracking::{BackupId, ChangedBlocks};
use crate::lba::Extent;
use crate::mode::Mode;
use crate::save_area::SaveArea;
use crate::tables::{LuId, LuModeEntry, LuModeTable, VirtualLuId};
use crate::update_location::UpdateLocationTable;

pub const MAGIC: &[u8; 8] = b"HVMJRNL1";
pub const VERSION: u32 = 2;
/// The oldest version replay reads.
pub const OLDEST_VERSION: u32 = 1;
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
    /// Changed-block tracking: a client write of `extent` to the pair's origin.
    TrackAdd { pair: PairKey, extent: Extent },
    /// Changed-block tracking: the snapshot of `backup` was taken; what was written
    /// since the last cut is now its pending set.
    TrackCut { pair: PairKey, backup: BackupId },
    /// Changed-block tracking: `backup` was copied; it is the base from now on.
    TrackComplete { pair: PairKey, backup: BackupId },
    /// Changed-block tracking: `backup` failed; its pending set is written again.
    TrackAbort { pair: PairKey, backup: BackupId },
    /// Changed-block tracking: start the pair's record afresh (a checkpoint's first
    /// record for it).
    TrackReset { pair: PairKey },
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "not an hvm journal: the header is {found:02x?}, expected it to start with \"HVMJRNL1\""
    )]
    BadMagic { found: Vec<u8> },
    #[error("journal version {found} is not supported (this build reads versions {OLDEST_VERSION} to {VERSION})")]
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

    /// Append `recs` in order, each as durable as [`Self::append`] makes it; a log may
    /// wait once for all of them (a write's `TrackAdd` and `Add` then share a flush).
    fn append_all(&self, recs: &[JournalRecord]) -> Result<(), JournalError> {
        recs.iter().try_for_each(|r| self.append(r))
    }
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
const TAG_TRACK_ADD: u8 = 7;
const TAG_TRACK_CUT: u8 = 8;
const TAG_TRACK_COMPLETE: u8 = 9;
const TAG_TRACK_ABORT: u8 = 10;
const TAG_TRACK_RESET: u8 = 11;

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

fn put_backup(p: &mut Vec<u8>, b: &BackupId) {
    let s = b.as_str().as_bytes();
    p.push(s.len() as u8);
    p.extend_from_slice(s);
}

fn encode_tracking(rec: &JournalRecord, p: &mut Vec<u8>) {
    let (tag, pair, extent, backup) = match rec {
        JournalRecord::TrackAdd { pair, extent } => (TAG_TRACK_ADD, pair, Some(extent), None),
        JournalRecord::TrackCut { pair, backup } => (TAG_TRACK_CUT, pair, None, Some(backup)),
        JournalRecord::TrackComplete { pair, backup } => {
            (TAG_TRACK_COMPLETE, pair, None, Some(backup))
        }
        JournalRecord::TrackAbort { pair, backup } => (TAG_TRACK_ABORT, pair, None, Some(backup)),
        JournalRecord::TrackReset { pair } => (TAG_TRACK_RESET, pair, None, None),
        _ => return,
    };
    p.push(tag);
    p.extend_from_slice(&pair.0.to_le_bytes());
    if let Some(e) = extent {
        put_extent(p, *e);
    }
    if let Some(b) = backup {
        put_backup(p, b);
    }
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
        JournalRecord::TrackAdd { .. }
        | JournalRecord::TrackCut { .. }
        | JournalRecord::TrackComplete { .. }
        | JournalRecord::TrackAbort { .. }
        | JournalRecord::TrackReset { .. } => encode_tracking(rec, p),
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
    fn backup(&mut self) -> Option<BackupId> {
        let n = usize::from(self.u8()?);
        if self.0.len() < n {
            return None;
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        BackupId::new(std::str::from_utf8(s).ok()?).ok()
    }
}

fn decode_tracking(tag: u8, r: &mut Reader<'_>) -> Option<JournalRecord> {
    let pair = VirtualLuId(r.u32()?);
    Some(match tag {
        TAG_TRACK_ADD => JournalRecord::TrackAdd {
            pair,
            extent: r.extent()?,
        },
        TAG_TRACK_CUT => JournalRecord::TrackCut {
            pair,
            backup: r.backup()?,
        },
        TAG_TRACK_COMPLETE => JournalRecord::TrackComplete {
            pair,
            backup: r.backup()?,
        },
        TAG_TRACK_ABORT => JournalRecord::TrackAbort {
            pair,
            backup: r.backup()?,
        },
        TAG_TRACK_RESET => JournalRecord::TrackReset { pair },
        _ => return None,
    })
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
        tag @ TAG_TRACK_ADD..=TAG_TRACK_RESET => decode_tracking(tag, &mut r)?,
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
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
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
    /// Changed-block records, keyed by pair (the origin virtual LU). A writer that keeps
    /// a state may put budgeted empty records here first: replay keeps their budget.
    pub tracking: BTreeMap<PairKey, ChangedBlocks>,
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
            JournalRecord::TrackAdd { pair, extent } => {
                self.tracking.entry(pair).or_default().mark(extent);
            }
            JournalRecord::TrackCut { pair, backup } => {
                self.tracking.entry(pair).or_default().cut(backup);
            }
            JournalRecord::TrackComplete { pair, backup } => {
                self.tracking.entry(pair).or_default().complete(&backup);
            }
            JournalRecord::TrackAbort { pair, backup } => {
                self.tracking.entry(pair).or_default().abort(&backup);
            }
            JournalRecord::TrackReset { pair } => {
                self.tracking.entry(pair).or_default().reset();
            }
        }
    }

    /// The records that rebuild `pair`'s changed-block record from nothing: the base
    /// (a cut and complete of an empty set), the pending set, then the current one.
    fn tracking_checkpoint(pair: PairKey, c: &ChangedBlocks, recs: &mut Vec<JournalRecord>) {
        recs.push(JournalRecord::TrackReset { pair });
        if let Some(backup) = c.base() {
            recs.push(JournalRecord::TrackCut { pair, backup });
            recs.push(JournalRecord::TrackComplete { pair, backup });
        }
        if let Some(p) = c.pending() {
            for extent in p.blocks.iter() {
                recs.push(JournalRecord::TrackAdd { pair, extent });
            }
            recs.push(JournalRecord::TrackCut {
                pair,
                backup: p.backup,
            });
        }
        for extent in c.current().iter() {
            recs.push(JournalRecord::TrackAdd { pair, extent });
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
        for (&pair, c) in &self.tracking {
            Self::tracking_checkpoint(pair, c, &mut recs);
        }
        recs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

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
            (pair.clone(), 0u64..50, 1u64..8).prop_map(|(pair, k, n)| JournalRecord::Save {
                pair,
                extent: ext(1000 + k * 10, 1000 + k * 10 + n - 1),
                lu: LuId(9),
                save_lba: k * 10,
            }),
            tracking_record(pair),
        ]
    }

    fn backup(k: u8) -> BackupId {
        BackupId::new(&format!("backup-{k}")).unwrap()
    }

    fn tracking_record(
        pair: impl Strategy<Value = VirtualLuId> + Clone,
    ) -> impl Strategy<Value = JournalRecord> {
        let extent = (0u64..500, 1u64..40).prop_map(|(f, n)| ext(f, f + n - 1));
        prop_oneof![
            4 => (pair.clone(), extent).prop_map(|(pair, extent)| JournalRecord::TrackAdd { pair, extent }),
            1 => (pair.clone(), 0u8..3).prop_map(|(pair, k)| JournalRecord::TrackCut { pair, backup: backup(k) }),
            1 => (pair.clone(), 0u8..3).prop_map(|(pair, k)| JournalRecord::TrackComplete { pair, backup: backup(k) }),
            1 => (pair.clone(), 0u8..3).prop_map(|(pair, k)| JournalRecord::TrackAbort { pair, backup: backup(k) }),
            1 => pair.prop_map(|pair| JournalRecord::TrackReset { pair }),
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

    /// A journal written before changed-block tracking (version 1, no tracking records)
    /// replays to the same tables; a record too long for the frame never fits.
    #[test]
    fn version_1_journals_replay_and_tracking_records_fit() {
        let recs = [
            JournalRecord::Add {
                pair: VirtualLuId(1),
                extent: ext(8, 15),
            },
            JournalRecord::Clear {
                pair: VirtualLuId(2),
            },
        ];
        let mut b = journal_of(&recs);
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..12]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        let r = replay(&b).unwrap();
        assert_eq!((r.records.len(), r.tail), (2, Tail::Clean));
        assert_eq!(r.state.tables[&VirtualLuId(1)].total(), 8);
        assert!(r.state.tracking.is_empty());
        let longest = JournalRecord::TrackComplete {
            pair: VirtualLuId(u32::MAX),
            backup: BackupId::new(&"z".repeat(crate::change_tracking::MAX_BACKUP_ID)).unwrap(),
        };
        let mut one = Vec::new();
        encode_record(&longest, &mut one);
        assert!(
            one.len() - FRAME_LEN <= MAX_RECORD as usize,
            "{} bytes",
            one.len()
        );
        assert_eq!(
            replay(&journal_of(&[longest])).unwrap().records,
            vec![longest]
        );
    }

    #[derive(Debug, Clone)]
    enum TrackOp {
        Write(u64, u64),
        Cut(u8),
        Complete(u8),
        Abort(u8),
    }

    fn track_op() -> impl Strategy<Value = TrackOp> {
        prop_oneof![
            6 => (0u64..2000, 1u64..30).prop_map(|(f, n)| TrackOp::Write(f, f + n - 1)),
            1 => (0u8..3).prop_map(TrackOp::Cut),
            1 => (0u8..3).prop_map(TrackOp::Complete),
            1 => (0u8..3).prop_map(TrackOp::Abort),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Tracking ops journaled as the manager does (a write's record, when it needs
        /// one, before its data write; a compaction to a checkpoint somewhere, written
        /// whole): a crash after any prefix of the records replays to a record whose
        /// current and pending sets cover every write issued in that prefix after the cut
        /// of the last backup whose complete is in it, with that backup as base.
        #[test]
        fn a_crash_at_any_prefix_keeps_every_write_since_the_last_complete(
            ops in prop::collection::vec(track_op(), 1..80),
            checkpoint_at in any::<prop::sample::Index>(),
        ) {
            let p = VirtualLuId(0);
            let mut live = ChangedBlocks::new();
            let mut recs: Vec<JournalRecord> = Vec::new();
            let cp = checkpoint_at.index(ops.len());
            // Per op: the records durable once it was done, and what it was.
            let mut done: Vec<(usize, TrackOp)> = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                if i == cp {
                    let mut st = JournalState::default();
                    st.tracking.insert(p, live.clone());
                    recs = st.checkpoint();
                    for d in done.iter_mut() {
                        d.0 = recs.len();
                    }
                }
                match *op {
                    TrackOp::Write(f, l) => {
                        if live.mark(ext(f, l)) {
                            recs.push(JournalRecord::TrackAdd { pair: p, extent: ext(f, l) });
                        }
                    }
                    TrackOp::Cut(k) => {
                        live.cut(backup(k));
                        recs.push(JournalRecord::TrackCut { pair: p, backup: backup(k) });
                    }
                    TrackOp::Complete(k) => {
                        if live.complete(&backup(k)) {
                            recs.push(JournalRecord::TrackComplete { pair: p, backup: backup(k) });
                        }
                    }
                    TrackOp::Abort(k) => {
                        if live.abort(&backup(k)) {
                            recs.push(JournalRecord::TrackAbort { pair: p, backup: backup(k) });
                        }
                    }
                }
                done.push((recs.len(), op.clone()));
            }
            let full = replay(&journal_of(&recs)).unwrap().state;
            prop_assert_eq!(full.tracking.get(&p).cloned().unwrap_or_default(), live.clone());
            let first = if cp == 0 { 0 } else { done[cp - 1].0 };
            for n in first..=recs.len() {
                let st = replay(&journal_of(&recs[..n])).unwrap().state;
                let got = st.tracking.get(&p).cloned().unwrap_or_default();
                let mut covered: BTreeSet<u64> = got.current().iter().flat_map(|e| e.first()..=e.last()).collect();
                if let Some(pd) = got.pending() {
                    covered.extend(pd.blocks.iter().flat_map(|e| e.first()..=e.last()));
                }
                // The model over the ops done within the prefix.
                let mut model = ChangedBlocks::new();
                let mut cut_at = BTreeMap::new();
                let mut since = 0;
                for (t, (pos, op)) in done.iter().enumerate() {
                    if *pos > n {
                        break;
                    }
                    match *op {
                        TrackOp::Cut(k) => {
                            model.cut(backup(k));
                            cut_at.insert(k, t);
                        }
                        TrackOp::Complete(k) => {
                            if model.complete(&backup(k)) {
                                since = cut_at[&k];
                            }
                        }
                        TrackOp::Abort(k) => {
                            model.abort(&backup(k));
                        }
                        TrackOp::Write(..) => {}
                    }
                }
                prop_assert_eq!(got.base(), model.base(), "prefix {}", n);
                for (t, (pos, op)) in done.iter().enumerate() {
                    if let (true, true, TrackOp::Write(f, l)) = (*pos <= n, t >= since, op) {
                        prop_assert!((*f..=*l).all(|x| covered.contains(&x)),
                            "prefix {}: write {}-{} (op {}) lost: {:?}", n, f, l, t, got);
                    }
                }
            }
        }
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
            prop_assert_eq!(&rebuilt.tracking, &state.tracking);
            let maps = |s: &JournalState| s.save_maps.iter()
                .map(|(k, v)| (*k, v.iter().collect::<Vec<_>>()))
                .filter(|(_, v)| !v.is_empty())
                .collect::<Vec<_>>();
            prop_assert_eq!(maps(&rebuilt), maps(&state));
        }
    }
}

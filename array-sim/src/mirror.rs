//! What keeps a mirror's legs identical: a write to several legs is one unit.
//!
//! - [`RangeLocks`]: two writes to the same blocks of a mirrored LU are applied to every
//!   leg in the same order (a real array serialises them in its cache; without this, two
//!   overlapping writes in flight could land in one order on one leg and in the other
//!   order on the other). An array-side copy between the legs takes the same locks.
//! - [`WriteIntents`]: the array's non-volatile memory. Before a mirrored write touches
//!   a leg, its LBA range and legs are written to a slot of the file `mirror-intent` in
//!   the array's directory, and the slot is cleared when every leg has it. If the array
//!   process dies between the legs, the next start copies the first leg's blocks to the
//!   others for every slot still in use, so the legs agree again (the write was never
//!   acknowledged, so either content is allowed). The slots live in the page cache: they
//!   survive the death of the process, which is what the simulator models; a power loss
//!   of the machine is not modelled.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::geometry::MAX_LEGS;

/// Blocks per lock stripe unit (64 KiB).
const LOCK_CHUNK_BLOCKS: u64 = 128;
/// Stripes: a write locks the stripes its chunks hash to, in ascending order.
const STRIPES: usize = 64;

/// Striped locks over (LU, chunk of blocks).
pub struct RangeLocks {
    stripes: Vec<Mutex<()>>,
}

impl Default for RangeLocks {
    fn default() -> Self {
        RangeLocks {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl RangeLocks {
    fn stripe(lun: u8, chunk: u64) -> usize {
        let h = (chunk ^ (u64::from(lun) << 56)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (h >> 58) as usize
    }

    /// Lock blocks `lba..lba+blocks` of `lun`; the guards release them.
    pub fn lock(&self, lun: u8, lba: u64, blocks: u64) -> Vec<MutexGuard<'_, ()>> {
        let first = lba / LOCK_CHUNK_BLOCKS;
        let last = (lba + blocks.max(1) - 1) / LOCK_CHUNK_BLOCKS;
        let mut set = 0u64;
        if last - first >= STRIPES as u64 {
            set = u64::MAX;
        } else {
            for chunk in first..=last {
                set |= 1 << Self::stripe(lun, chunk);
            }
        }
        (0..STRIPES)
            .filter(|i| set & (1 << i) != 0)
            .map(|i| {
                self.stripes[i]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
            })
            .collect()
    }
}

/// Name of the intent file in the array's directory.
pub const INTENT_FILE: &str = "mirror-intent";
const SLOTS: usize = 256;
const SLOT_BYTES: usize = 64;
const MAGIC: &[u8; 4] = b"MWI1";

/// One mirrored write that may not have reached every leg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    pub legs: Vec<u8>,
    pub lba: u64,
    pub blocks: u32,
}

impl Intent {
    fn encode(&self) -> [u8; SLOT_BYTES] {
        let mut b = [0u8; SLOT_BYTES];
        b[0..4].copy_from_slice(MAGIC);
        b[4] = self.legs.len() as u8;
        b[8..16].copy_from_slice(&self.lba.to_le_bytes());
        b[16..20].copy_from_slice(&self.blocks.to_le_bytes());
        b[24..24 + self.legs.len()].copy_from_slice(&self.legs);
        b
    }

    /// `None` for a free slot; an error says what is wrong with a used one.
    fn decode(b: &[u8]) -> Result<Option<Intent>, String> {
        if b.iter().all(|x| *x == 0) {
            return Ok(None);
        }
        if &b[0..4] != MAGIC {
            return Err(format!("expected the marker {MAGIC:?} or a free slot"));
        }
        let n = usize::from(b[4]);
        if !(2..=MAX_LEGS).contains(&n) {
            return Err(format!("{n} legs; a mirrored write has 2 to {MAX_LEGS}"));
        }
        let mut lba = [0u8; 8];
        lba.copy_from_slice(&b[8..16]);
        let mut blocks = [0u8; 4];
        blocks.copy_from_slice(&b[16..20]);
        Ok(Some(Intent {
            legs: b[24..24 + n].to_vec(),
            lba: u64::from_le_bytes(lba),
            blocks: u32::from_le_bytes(blocks),
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IntentError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: slot {slot}: {message}", path.display())]
    Corrupt {
        path: PathBuf,
        slot: usize,
        message: String,
    },
}

/// The slots of mirrored writes in progress.
pub struct WriteIntents {
    file: File,
    free: Mutex<Vec<usize>>,
    freed: Condvar,
}

impl std::fmt::Debug for WriteIntents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteIntents").finish_non_exhaustive()
    }
}

/// A slot in use; dropping it clears the slot.
pub struct InFlight<'a> {
    intents: &'a WriteIntents,
    slot: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        // A slot that cannot be cleared only costs a redundant copy at the next start.
        let _ = self
            .intents
            .file
            .write_all_at(&[0u8; SLOT_BYTES], (self.slot * SLOT_BYTES) as u64);
        self.intents
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(self.slot);
        self.intents.freed.notify_one();
    }
}

impl WriteIntents {
    /// Open the intent file in `dir` and return the writes a previous process left
    /// unfinished, with their slots; the caller repairs them and then calls [`WriteIntents::clear`].
    pub fn open(dir: &Path) -> Result<(WriteIntents, Vec<(usize, Intent)>), IntentError> {
        let path = dir.join(INTENT_FILE);
        let io = |source| IntentError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len() as usize;
        let mut bytes = vec![0u8; len.min(SLOTS * SLOT_BYTES)];
        file.read_exact_at(&mut bytes, 0).map_err(io)?;
        let mut pending = Vec::new();
        for (slot, b) in bytes.chunks(SLOT_BYTES).enumerate() {
            if b.len() < SLOT_BYTES {
                // A file cut inside a slot: the slot was being written, so its write had
                // not started on any leg.
                break;
            }
            match Intent::decode(b) {
                Ok(Some(i)) => pending.push((slot, i)),
                Ok(None) => {}
                Err(message) => {
                    return Err(IntentError::Corrupt {
                        path: path.clone(),
                        slot,
                        message,
                    })
                }
            }
        }
        let intents = WriteIntents {
            file,
            free: Mutex::new((0..SLOTS).rev().collect()),
            freed: Condvar::new(),
        };
        Ok((intents, pending))
    }

    /// Forget every slot: the repairs are done.
    pub fn clear(&self, dir: &Path) -> Result<(), IntentError> {
        let io = |source| IntentError::Io {
            path: dir.join(INTENT_FILE),
            source,
        };
        self.file
            .write_all_at(&[0u8; SLOTS * SLOT_BYTES], 0)
            .map_err(io)?;
        self.file.set_len((SLOTS * SLOT_BYTES) as u64).map_err(io)
    }

    /// Record a mirrored write before its first leg is written.
    pub fn begin(&self, legs: &[u8], lba: u64, blocks: u32) -> std::io::Result<InFlight<'_>> {
        let slot = {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            loop {
                if let Some(s) = free.pop() {
                    break s;
                }
                free = self
                    .freed
                    .wait(free)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let guard = InFlight {
            intents: self,
            slot,
        };
        let rec = Intent {
            legs: legs.to_vec(),
            lba,
            blocks,
        };
        self.file
            .write_all_at(&rec.encode(), (slot * SLOT_BYTES) as u64)?;
        Ok(guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unfinished_write_is_returned_after_a_restart_and_a_finished_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let (w, pending) = WriteIntents::open(dir.path()).unwrap();
        assert!(pending.is_empty());
        w.clear(dir.path()).unwrap();
        // A finished write frees its slot, and the next one reuses it.
        drop(w.begin(&[1, 2], 100, 8).unwrap());
        let left = w.begin(&[3, 4, 5], 7, 1).unwrap();
        // The process dies here: the guard is never dropped.
        std::mem::forget(left);
        drop(w);
        let (_w, pending) = WriteIntents::open(dir.path()).unwrap();
        assert_eq!(
            pending,
            vec![(
                0,
                Intent {
                    legs: vec![3, 4, 5],
                    lba: 7,
                    blocks: 1
                }
            )]
        );
    }

    #[test]
    fn a_corrupt_slot_is_an_error_naming_the_file_and_slot() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = vec![0u8; 3 * SLOT_BYTES];
        bytes[2 * SLOT_BYTES] = b'X';
        std::fs::write(dir.path().join(INTENT_FILE), bytes).unwrap();
        let e = WriteIntents::open(dir.path()).unwrap_err().to_string();
        assert!(
            e.contains("mirror-intent: slot 2: expected the marker"),
            "{e}"
        );
    }

    #[test]
    fn slots_are_reused_and_a_full_table_waits_for_a_free_slot() {
        let dir = tempfile::tempdir().unwrap();
        let (w, _) = WriteIntents::open(dir.path()).unwrap();
        let held: Vec<_> = (0..SLOTS)
            .map(|i| w.begin(&[0, 1], i as u64, 1).unwrap())
            .collect();
        std::thread::scope(|s| {
            let t = s.spawn(|| drop(w.begin(&[0, 1], 9999, 1).unwrap()));
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!t.is_finished(), "a slot was handed out twice");
            drop(held);
            t.join().unwrap();
        });
    }

    #[test]
    fn an_overlapping_range_waits_and_a_disjoint_one_does_not() {
        let l = &RangeLocks::default();
        let held = l.lock(1, 0, 8);
        std::thread::scope(|s| {
            // Another LU's blocks, or blocks of another chunk that hashes elsewhere, go on.
            let other = (1..1000u64)
                .find(|c| RangeLocks::stripe(1, *c) != RangeLocks::stripe(1, 0))
                .unwrap();
            s.spawn(move || drop(l.lock(1, other * LOCK_CHUNK_BLOCKS, 8)))
                .join()
                .unwrap();
            let t = s.spawn(|| drop(l.lock(1, 4, 8)));
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!t.is_finished(), "an overlapping write did not wait");
            drop(held);
            t.join().unwrap();
        });
    }

    #[test]
    fn overlapping_ranges_share_a_stripe_and_locking_is_in_order() {
        let l = RangeLocks::default();
        let a = RangeLocks::stripe(3, 5);
        assert_eq!(a, RangeLocks::stripe(3, 5));
        // A 32 MiB write locks every stripe, in ascending order, without deadlock
        // against a small one on another thread.
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let l = &l;
                s.spawn(move || {
                    for i in 0..200 {
                        let g = if i % 2 == 0 {
                            l.lock(1, 0, 65536)
                        } else {
                            l.lock(1, (t * 977 + i) % 60_000, 300)
                        };
                        assert!(!g.is_empty());
                    }
                });
            }
        });
    }
}

//! Bitmaps of units (EP 1 058 190's difference bitmap [0020] and pair split bitmap
//! [0042]), and the file that keeps a difference bitmap across a restart of the array.
//!
//! A [`DiffFile`] is written like the mode table is kept: a bit that goes from 0 to 1 is
//! on disk (its 8-byte word written and `fdatasync`ed) before the write that set it
//! reaches the volume, so after any death of the array every unit that differs has its
//! bit. Bits going back to 0 (a resync copied the unit) are written lazily: a stale 1
//! only costs a redundant copy. An orderly stop writes the whole bitmap and marks the
//! file *clean*; a file found *dirty* at start means the array died, and then the units
//! that were not frozen (whose writes went to both volumes and may have been cut
//! between them) count as different too.
//!
//! Layout (little-endian): `HVMDIFF1`, units (8 bytes), clean flag (1 byte), 7 reserved
//! bytes, then the bitmap's words.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

/// A bitmap with one bit per unit.
#[derive(Clone, Debug)]
pub(crate) struct Bitmap {
    pub(crate) words: Vec<u64>,
    pub(crate) units: u64,
}

impl Bitmap {
    pub(crate) fn new(units: u64) -> Bitmap {
        Bitmap {
            words: vec![0; units.div_ceil(64) as usize],
            units,
        }
    }

    /// Every unit set.
    pub(crate) fn full(units: u64) -> Bitmap {
        let mut m = Bitmap::new(units);
        (0..units).for_each(|u| m.put(u, true));
        m
    }

    pub(crate) fn get(&self, u: u64) -> bool {
        self.words[(u / 64) as usize] & (1 << (u % 64)) != 0
    }

    pub(crate) fn put(&mut self, u: u64, on: bool) {
        let w = &mut self.words[(u / 64) as usize];
        if on {
            *w |= 1 << (u % 64);
        } else {
            *w &= !(1 << (u % 64));
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub(crate) fn ones(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.units).filter(|u| self.get(*u))
    }

    /// The set units among `first..first + count` as runs `(first, count)`.
    pub(crate) fn runs_in(&self, first: u64, count: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for u in (first..(first + count).min(self.units)).filter(|u| self.get(*u)) {
            match out.last_mut() {
                Some((f, n)) if *f + *n == u => *n += 1,
                _ => out.push((u, 1)),
            }
        }
        out
    }

    /// The set units as runs `(first, count)`.
    pub(crate) fn runs(&self) -> Vec<(u64, u64)> {
        self.runs_in(0, self.units)
    }

    /// Set units `first..end` (clipped); returns the indexes of the words that changed.
    pub(crate) fn set_span(&mut self, first: u64, end: u64) -> Vec<usize> {
        let mut changed = Vec::new();
        for u in first..end.min(self.units) {
            if !self.get(u) {
                self.put(u, true);
                let w = (u / 64) as usize;
                if changed.last() != Some(&w) {
                    changed.push(w);
                }
            }
        }
        changed
    }
}

const MAGIC: &[u8; 8] = b"HVMDIFF1";
const HEADER: u64 = 24;

/// A difference bitmap on disk (see the module's comment).
#[derive(Debug)]
pub(crate) struct DiffFile {
    path: PathBuf,
    units: u64,
    /// Held while a word is read from memory and written, so the last write of a word is
    /// always its newest value.
    file: Mutex<File>,
}

/// What [`DiffFile::open`] found.
#[derive(Debug)]
pub(crate) struct Found {
    pub(crate) bits: Bitmap,
    /// The array stopped in order: `bits` are exact.
    pub(crate) clean: bool,
}

impl DiffFile {
    /// A new file holding `bits`, marked dirty (the array is running).
    pub(crate) fn create(path: &Path, bits: &Bitmap) -> std::io::Result<DiffFile> {
        let f = crate::store::open_private(path)?;
        f.set_len(0)?;
        let d = DiffFile {
            path: path.to_path_buf(),
            units: bits.units,
            file: Mutex::new(f),
        };
        d.write_all(bits, false)?;
        Ok(d)
    }

    /// The bits of the file at `path`, if there is one; a file for another number of
    /// units or a damaged one is an error naming the file. The caller then makes the
    /// file anew ([`DiffFile::create`]), marked dirty while the array runs.
    pub(crate) fn open(path: &Path, units: u64) -> Result<Option<Found>, String> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let bad = |m: &str| format!("{}: {m}", path.display());
        let words = units.div_ceil(64) as usize;
        if bytes.len() != HEADER as usize + 8 * words || &bytes[..8] != MAGIC {
            return Err(bad("not a difference bitmap of this pair's size"));
        }
        let at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
        if at(8) != units {
            return Err(bad("its number of units differs from the pair's"));
        }
        let mut bits = Bitmap::new(units);
        for (i, w) in bits.words.iter_mut().enumerate() {
            *w = at(HEADER as usize + 8 * i);
        }
        Ok(Some(Found {
            bits,
            clean: bytes[16] == 1,
        }))
    }

    /// Write the whole bitmap and the clean flag, durably.
    pub(crate) fn write_all(&self, bits: &Bitmap, clean: bool) -> std::io::Result<()> {
        self.rewrite(|| Some(bits.clone()), clean)
    }

    /// Write the whole bitmap `read` returns (none: nothing to write) and the clean
    /// flag, durably; `read` runs under this file's lock, so a mark persisted meanwhile
    /// is never overwritten by an older copy. After a resync this drops the stale marks
    /// of the units it copied.
    pub(crate) fn rewrite(
        &self,
        read: impl FnOnce() -> Option<Bitmap>,
        clean: bool,
    ) -> std::io::Result<()> {
        let f = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(bits) = read() else {
            return Ok(());
        };
        let mut buf = Vec::with_capacity(HEADER as usize + 8 * bits.words.len());
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&self.units.to_le_bytes());
        buf.push(u8::from(clean));
        buf.extend_from_slice(&[0; 7]);
        for w in &bits.words {
            buf.extend_from_slice(&w.to_le_bytes());
        }
        f.write_all_at(&buf, 0)?;
        f.sync_data()
    }

    /// Write the words `read` returns (index, value), durably. `read` runs under this
    /// file's lock, so it must take the newest values from memory.
    pub(crate) fn persist(&self, read: impl FnOnce() -> Vec<(usize, u64)>) -> std::io::Result<()> {
        let f = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let words = read();
        if words.is_empty() {
            return Ok(());
        }
        for (i, w) in words {
            f.write_all_at(&w.to_le_bytes(), HEADER + 8 * i as u64)?;
        }
        f.sync_data()
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_survive_and_damage_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.bits");
        let mut m = Bitmap::new(130);
        assert_eq!(m.set_span(3, 5), vec![0]);
        let d = DiffFile::create(&p, &m).unwrap();
        assert_eq!(m.set_span(64, 70), vec![1]);
        d.persist(|| vec![(1, m.words[1])]).unwrap();
        let f = DiffFile::open(&p, 130).unwrap().unwrap();
        assert!(!f.clean);
        assert_eq!(
            f.bits.ones().collect::<Vec<_>>(),
            vec![3, 4, 64, 65, 66, 67, 68, 69]
        );
        d.write_all(&m, true).unwrap();
        assert!(DiffFile::open(&p, 130).unwrap().unwrap().clean);
        assert!(DiffFile::open(&p, 131).unwrap_err().contains("d.bits"));
        assert!(DiffFile::open(&dir.path().join("none"), 1)
            .unwrap()
            .is_none());
    }
}

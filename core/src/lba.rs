//! Logical block addresses and inclusive extents of them.
//!
//! An LBA is a 512-byte sector, as in the patent's Fig. 3 and in SCSI. Extents are
//! inclusive `[first, last]` pairs because that is how the update-location table records
//! them ([0023]); an extent is never empty.

use std::fmt;

/// Bytes in one logical block.
pub const SECTOR_SIZE: u64 = 512;

/// An inclusive, non-empty range of LBAs `[first, last]`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Extent {
    first: u64,
    last: u64,
}

impl Extent {
    /// `[first, last]`; `None` when `last < first`.
    pub fn new(first: u64, last: u64) -> Option<Extent> {
        (first <= last).then_some(Extent { first, last })
    }

    /// `count` LBAs starting at `first`; `None` for zero or an overflow.
    pub fn from_count(first: u64, count: u64) -> Option<Extent> {
        let last = first.checked_add(count.checked_sub(1)?)?;
        Some(Extent { first, last })
    }

    /// The sectors touched by `len` bytes at byte `offset`. A write that covers part of
    /// a sector marks the whole sector (DESIGN.md §3). `None` for `len == 0` or overflow.
    pub fn covering_bytes(offset: u64, len: u64) -> Option<Extent> {
        let end = offset.checked_add(len)?;
        if len == 0 {
            return None;
        }
        Some(Extent {
            first: offset / SECTOR_SIZE,
            last: (end - 1) / SECTOR_SIZE,
        })
    }

    pub fn first(self) -> u64 {
        self.first
    }

    pub fn last(self) -> u64 {
        self.last
    }

    /// Number of LBAs; at least 1. Saturates only for the full u64 range.
    pub fn count(self) -> u64 {
        (self.last - self.first).saturating_add(1)
    }

    /// Byte offset of the first LBA.
    pub fn byte_offset(self) -> u64 {
        self.first * SECTOR_SIZE
    }

    /// Length in bytes.
    pub fn byte_len(self) -> u64 {
        self.count() * SECTOR_SIZE
    }

    pub fn contains(self, lba: u64) -> bool {
        self.first <= lba && lba <= self.last
    }

    pub fn overlaps(self, other: Extent) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    pub fn intersection(self, other: Extent) -> Option<Extent> {
        Extent::new(self.first.max(other.first), self.last.min(other.last))
    }
}

impl fmt::Debug for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}..={}]", self.first, self.last)
    }
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LBA {}-{}", self.first, self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covering_bytes_marks_partial_sectors_whole() {
        assert_eq!(Extent::covering_bytes(0, 512), Extent::new(0, 0));
        assert_eq!(Extent::covering_bytes(1, 1), Extent::new(0, 0));
        assert_eq!(Extent::covering_bytes(511, 2), Extent::new(0, 1));
        assert_eq!(Extent::covering_bytes(1024, 4096), Extent::new(2, 9));
        assert_eq!(Extent::covering_bytes(5, 0), None);
        assert_eq!(Extent::covering_bytes(u64::MAX, 2), None);
    }

    #[test]
    fn constructors_refuse_empty_and_overflow() {
        assert_eq!(Extent::new(3, 2), None);
        assert_eq!(Extent::from_count(7, 0), None);
        assert_eq!(Extent::from_count(u64::MAX, 2), None);
        let e = Extent::from_count(8, 24).unwrap();
        assert_eq!((e.first(), e.last(), e.count()), (8, 31, 24));
        assert_eq!((e.byte_offset(), e.byte_len()), (4096, 24 * 512));
    }

    #[test]
    fn intersection_and_overlap() {
        let a = Extent::new(8, 31).unwrap();
        assert_eq!(
            a.intersection(Extent::new(10, 11).unwrap()),
            Extent::new(10, 11)
        );
        assert_eq!(a.intersection(Extent::new(32, 40).unwrap()), None);
        assert!(!a.overlaps(Extent::new(32, 40).unwrap()));
        assert!(a.overlaps(Extent::new(31, 40).unwrap()));
    }
}

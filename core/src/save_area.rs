//! The save area of the copy-on-write strategy (E4, [0072]): pre-update data of the
//! mirroring LU, saved before the first write to a block after the snapshot.
//!
//! Saved data is packed sequentially into the save area's LU (a bump allocator: nothing
//! is freed until the snapshot is deleted, when the whole area is released at once). The
//! map from origin LBAs to save-area LBAs holds disjoint extents.

use std::collections::BTreeMap;

use crate::lba::Extent;
use crate::tables::LuId;

/// Where one piece of a snapshot read comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Saved pre-update data at this LBA of the save area.
    Saved(u64),
    /// Not updated since the snapshot: read the mate LU at the same LBA ([0076]).
    Unchanged,
}

/// Save-area allocations of one pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveArea {
    lu: LuId,
    capacity_lbas: u64,
    next_free: u64,
    /// origin first LBA -> (origin last LBA, save-area LBA of the first)
    map: BTreeMap<u64, (u64, u64)>,
}

impl SaveArea {
    pub fn new(lu: LuId, capacity_lbas: u64) -> Self {
        SaveArea {
            lu,
            capacity_lbas,
            next_free: 0,
            map: BTreeMap::new(),
        }
    }

    pub fn lu(&self) -> LuId {
        self.lu
    }

    pub fn capacity_lbas(&self) -> u64 {
        self.capacity_lbas
    }

    /// LBAs of the save area in use.
    pub fn used_lbas(&self) -> u64 {
        self.next_free
    }

    /// Reserve `count` sequential LBAs; `None` when the area is full.
    pub fn allocate(&mut self, count: u64) -> Option<u64> {
        let start = self.next_free;
        let end = start.checked_add(count)?;
        if end > self.capacity_lbas {
            return None;
        }
        self.next_free = end;
        Some(start)
    }

    /// Record that `origin`'s pre-update data is at `save_lba`. The caller saves only
    /// blocks that are not saved yet, so records never overlap.
    pub fn insert(&mut self, origin: Extent, save_lba: u64) {
        self.map.insert(origin.first(), (origin.last(), save_lba));
        self.next_free = self.next_free.max(save_lba + origin.count());
    }

    /// Split `ext` into saved and unchanged pieces, in LBA order.
    pub fn lookup(&self, ext: Extent) -> Vec<(Extent, Source)> {
        let mut out = Vec::new();
        let mut next = ext.first();
        let start = match self.map.range(..=ext.first()).next_back() {
            Some((&s, &(e, _))) if e >= ext.first() => s,
            _ => ext.first(),
        };
        for (&s, &(e, save)) in self.map.range(start..=ext.last()) {
            let Some(part) = Extent::new(s, e).and_then(|r| r.intersection(ext)) else {
                continue;
            };
            if part.first() > next {
                out.extend(Extent::new(next, part.first() - 1).map(|g| (g, Source::Unchanged)));
            }
            out.push((part, Source::Saved(save + (part.first() - s))));
            next = part.last() + 1;
        }
        if next <= ext.last() {
            out.extend(Extent::new(next, ext.last()).map(|g| (g, Source::Unchanged)));
        }
        out
    }

    /// All saved extents with their save-area LBAs, in origin LBA order.
    pub fn iter(&self) -> impl Iterator<Item = (Extent, u64)> + '_ {
        self.map
            .iter()
            .filter_map(|(&s, &(e, save))| Extent::new(s, e).map(|x| (x, save)))
    }

    /// Release everything (snapshot deleted).
    pub fn reset(&mut self) {
        self.map.clear();
        self.next_free = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(f: u64, l: u64) -> Extent {
        Extent::new(f, l).unwrap()
    }

    #[test]
    fn compact_allocation_and_lookup() {
        let mut a = SaveArea::new(LuId(9), 100);
        let s1 = a.allocate(8).unwrap();
        a.insert(ext(40, 47), s1);
        let s2 = a.allocate(4).unwrap();
        a.insert(ext(10, 13), s2);
        assert_eq!((s1, s2, a.used_lbas()), (0, 8, 12));
        assert_eq!(
            a.lookup(ext(8, 45)),
            vec![
                (ext(8, 9), Source::Unchanged),
                (ext(10, 13), Source::Saved(8)),
                (ext(14, 39), Source::Unchanged),
                (ext(40, 45), Source::Saved(0)),
            ]
        );
        assert_eq!(a.lookup(ext(42, 50))[0], (ext(42, 47), Source::Saved(2)));
        assert_eq!(a.allocate(89), None);
        a.reset();
        assert_eq!(
            a.lookup(ext(40, 41)),
            vec![(ext(40, 41), Source::Unchanged)]
        );
        assert_eq!(a.allocate(100), Some(0));
    }
}

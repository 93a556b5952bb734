//! The host's I/O while pairs and copies run: reads refused on working volumes, writes
//! that reach every volume of the chain whose unit is not split, and mark the rest.

use super::*;

impl Firmware {
    /// Refuse host reads of a working volume ([0123]).
    pub(crate) fn check_read(&self, lun: u8) -> Result<(), Refusal> {
        if self.lock().work.contains(&lun) {
            return Err(working(lun));
        }
        Ok(())
    }

    /// A host write to `lun`: `Ok(false)` when no backup function is involved (the
    /// engine writes as usual).
    pub(crate) fn host_write(&self, lun: u8, lba: u64, data: &[u8]) -> Result<bool, Refusal> {
        let blocks = (data.len() / BLOCK_SIZE as usize) as u64;
        let root = {
            let mut st = self.lock();
            if st.work.contains(&lun) {
                return Err(working(lun));
            }
            if let Some(i) = st.pair_of_secondary(lun) {
                return Err(refuse(
                    Sense::WRITE_PROTECTED,
                    format!(
                        "LU {lun} is the secondary volume of LU {}; hosts cannot write it",
                        st.pairs[i].primary
                    ),
                ));
            }
            let cow = st.infos.iter().any(|c| c.source == lun);
            if !cow && st.pair_of_primary(lun).is_none() {
                return Ok(false);
            }
            // The prior art ([0006]): a write to a block still to be copied waits for the
            // whole copy to end.
            while st.infos.iter().any(|c| {
                c.source == lun
                    && c.work.is_none()
                    && (lba..lba + blocks).any(|b| c.states[b as usize] == CopyState::Unsaved)
            }) {
                st = self.ended.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            st.root(lun)
        };
        let (first, span) = self.unit_span(lba, blocks);
        let _locked = self.store.locks.lock(root, first, span);
        self.save_before_write(lun, lba, blocks)?;
        self.mark_split(lun, lba, blocks)?;
        self.store
            .write(lun, lba, data)
            .map_err(|s| io_err(s, "writing the user volume"))?;
        self.propagate(lun, lba, data)?;
        Ok(true)
    }

    /// Put on disk, before a write to `lun` lands, the difference bits it sets: the
    /// split units of the pair `lun` is the user volume of (see [`crate::bitmaps`]).
    pub(super) fn mark_split(&self, lun: u8, lba: u64, blocks: u64) -> Result<(), Refusal> {
        let (file, changed) = {
            let mut st = self.lock();
            let Some(i) = st.pair_of_primary(lun) else {
                return Ok(());
            };
            let p = &mut st.pairs[i];
            let mut changed = Vec::new();
            for u in lba / self.n..(lba + blocks).div_ceil(self.n) {
                if p.split.get(u) && !p.diff.get(u) {
                    changed.extend(p.diff.set_span(u, u + 1));
                }
            }
            if changed.is_empty() {
                return Ok(());
            }
            changed.dedup();
            (p.diff_file.clone(), changed)
        };
        file.persist(|| {
            let st = self.lock();
            st.pair_of_primary(lun).map_or_else(Vec::new, |i| {
                let p = &st.pairs[i];
                changed.iter().map(|w| (*w, p.diff.words[*w])).collect()
            })
        })
        .map_err(|e| {
            refuse(
                Sense::WRITE_ERROR,
                format!("{}: {e}", file.path().display()),
            )
        })
    }

    /// Fig. 6 steps 63-65, down a cascade: the units of the write that are split only
    /// mark the difference bitmap; the others reach the secondary, and its own pair.
    pub(super) fn propagate(&self, lun: u8, lba: u64, data: &[u8]) -> Result<(), Refusal> {
        let blocks = (data.len() / BLOCK_SIZE as usize) as u64;
        let (secondary, runs) = {
            let mut st = self.lock();
            let Some(i) = st.pair_of_primary(lun) else {
                return Ok(());
            };
            let n = self.n;
            let p = &mut st.pairs[i];
            let mut runs: Vec<(u64, u64)> = Vec::new();
            let mut b = lba;
            while b < lba + blocks {
                let u = b / n;
                let end = ((u + 1) * n).min(lba + blocks);
                if p.split.get(u) {
                    p.diff.put(u, true);
                } else {
                    match runs.last_mut() {
                        Some((s, e)) if *e == b => *e = end,
                        _ => runs.push((b, end)),
                    }
                }
                b = end;
            }
            (p.secondary, runs)
        };
        let bs = BLOCK_SIZE as usize;
        for (s, e) in runs {
            let part = &data[(s - lba) as usize * bs..(e - lba) as usize * bs];
            self.mark_split(secondary, s, e - s)?;
            self.store
                .write(secondary, s, part)
                .map_err(|x| io_err(x, "writing the secondary volume"))?;
            self.propagate(secondary, s, part)?;
        }
        Ok(())
    }
}

//! Pairs ([0022]-[0031], [0041]-[0051]): formation, split by areas, resync of the marked
//! units, delete, status.

use super::*;

impl Firmware {
    /// Copy the marked units of `todo` from the primary to the secondary in the
    /// background (step 40, Fig. 7), clearing their difference and split bits; then the
    /// pair is duplex, or split if split areas remain.
    pub(super) fn spawn_sync(self: &Arc<Self>, primary: u8, todo: Bitmap) {
        let fw = Arc::clone(self);
        std::thread::spawn(move || {
            if let Err(e) = fw.sync_and_settle(primary, &todo) {
                eprintln!("array-sim: copy of the pair of LU {primary}: {}", e.message);
            }
        });
    }

    pub(super) fn sync_and_settle(&self, primary: u8, todo: &Bitmap) -> Result<(), Refusal> {
        let r = self.sync(primary, todo);
        let mut st = self.lock();
        if let Some(i) = st.pair_of_primary(primary) {
            let p = &mut st.pairs[i];
            p.state = if p.split.count() > 0 {
                PairState::Split
            } else {
                PairState::Duplex
            };
            // The split bits cleared by the resync are durable with the next change; a
            // restart before it treats those units as split and different: a redundant
            // copy, never a lost one.
            let _ = self.save_pairs(&st);
            let file = p_file(&st, primary);
            drop(st);
            if let (Ok(()), Some(f)) = (&r, file) {
                // The copied units' marks leave the file too.
                let _ = f.rewrite(|| p_file_bits(&self.lock(), primary), false);
            }
        }
        r
    }

    /// Copy in batches of whole units (at most [`SYNC_BATCH_BLOCKS`] under one range
    /// lock): the marked units of a batch go in one read and one write per run of
    /// consecutive units, so a resync costs I/Os per run, not per unit. Only units whose
    /// difference bit is set are copied ([0031]).
    pub(super) fn sync(&self, primary: u8, todo: &Bitmap) -> Result<(), Refusal> {
        let batch = (SYNC_BATCH_BLOCKS / self.n).max(1);
        let mut buf = Vec::new();
        for (run, len) in todo.runs() {
            let mut u0 = run;
            while u0 < run + len {
                let k = batch.min(run + len - u0);
                let (root, secondary, cap) = {
                    let st = self.lock();
                    let Some(i) = st.pair_of_primary(primary) else {
                        return Ok(()); // deleted meanwhile
                    };
                    let cap = self.plain.get(&primary).copied().unwrap_or(0);
                    (st.root(primary), st.pairs[i].secondary, cap)
                };
                let first = u0 * self.n;
                if first >= cap {
                    break;
                }
                let _locked = self.store.locks.lock(root, first, k * self.n);
                let dirty = {
                    let st = self.lock();
                    st.pair_of_primary(primary)
                        .map(|i| st.pairs[i].diff.runs_in(u0, k))
                        .unwrap_or_default()
                };
                let mut copied = 0u64;
                for (d, dn) in dirty {
                    let lba = d * self.n;
                    let blocks = (dn * self.n).min(cap - lba);
                    buf.resize((blocks * u64::from(BLOCK_SIZE)) as usize, 0);
                    self.store
                        .read(primary, lba, &mut buf)
                        .map_err(|s| io_err(s, "reading the user volume"))?;
                    self.mark_split(secondary, lba, blocks)?;
                    self.store
                        .write(secondary, lba, &buf)
                        .map_err(|s| io_err(s, "writing the secondary volume"))?;
                    self.propagate(secondary, lba, &buf)?;
                    copied += buf.len() as u64;
                }
                self.counters
                    .pair_copy_bytes
                    .fetch_add(copied, Ordering::Relaxed);
                let mut st = self.lock();
                if let Some(i) = st.pair_of_primary(primary) {
                    let p = &mut st.pairs[i];
                    for u in u0..u0 + k {
                        p.diff.put(u, false);
                        p.split.put(u, false);
                    }
                    p.copied_bytes += copied;
                }
                u0 += k;
            }
        }
        Ok(())
    }

    pub(super) fn pair_create(self: &Arc<Self>, primary: u8, secondary: u8) -> Result<(), Refusal> {
        let mut st = self.lock();
        let cap = |l: u8| {
            self.plain.get(&l).copied().ok_or_else(|| {
                param_err(format!("LU {l} is not a plain LU of this array (an LU in a mirroring row cannot be paired)"))
            })
        };
        let (pc, sc) = (cap(primary)?, cap(secondary)?);
        if primary == secondary {
            return Err(param_err("a volume cannot be paired with itself"));
        }
        if pc != sc {
            return Err(param_err(format!(
                "LU {primary} has {pc} blocks and LU {secondary} {sc}; a pair needs equal sizes"
            )));
        }
        for l in [primary, secondary] {
            if st.work.contains(&l) {
                return Err(state_err(format!("LU {l} is a working volume")));
            }
        }
        if st.pair_of_primary(primary).is_some() {
            return Err(state_err(format!(
                "LU {primary} is already the user volume of a pair"
            )));
        }
        if st.pair_of_secondary(secondary).is_some() || st.pair_of_primary(secondary).is_some() {
            return Err(state_err(format!("LU {secondary} is already in a pair")));
        }
        if st.root(primary) == secondary {
            return Err(state_err("the pair would close a loop"));
        }
        if st.copying(secondary) {
            return Err(state_err(format!("LU {secondary} is under copying")));
        }
        let units = pc.div_ceil(self.n);
        let all = Bitmap::full(units);
        let path = diff_path(&self.dir, primary);
        let file = DiffFile::create(&path, &all)
            .map_err(|e| refuse(Sense::INTERNAL_FAILURE, format!("{}: {e}", path.display())))?;
        st.pairs.push(Pair {
            primary,
            secondary,
            state: PairState::Forming,
            split: Bitmap::new(units),
            diff: all.clone(),
            diff_file: Arc::new(file),
            copied_bytes: 0,
        });
        if let Err(e) = self.save_pairs(&st) {
            st.pairs.pop();
            return Err(e);
        }
        drop(st);
        self.spawn_sync(primary, all);
        Ok(())
    }

    /// The pair `lun` is the user volume of, or else the secondary of.
    pub(super) fn find_pair(st: &State, lun: u8) -> Result<usize, Refusal> {
        st.pair_of_primary(lun)
            .or_else(|| st.pair_of_secondary(lun))
            .ok_or_else(|| state_err(format!("LU {lun} is not paired")))
    }

    pub(super) fn units_of(&self, areas: &[Area], blocks: u64) -> Result<Bitmap, Refusal> {
        let units = blocks.div_ceil(self.n);
        let mut m = Bitmap::new(units);
        if areas.is_empty() {
            (0..units).for_each(|u| m.put(u, true));
        }
        for a in areas {
            if a.blocks == 0 || a.end() > blocks {
                return Err(param_err(format!(
                    "area {a} is empty or past the end of the volume ({blocks} blocks)"
                )));
            }
            (a.start / self.n..a.end().div_ceil(self.n)).for_each(|u| m.put(u, true));
        }
        Ok(m)
    }

    /// Fig. 6 step 60-61: set the pair split bits of the areas (all, when none).
    pub(super) fn pair_split(&self, lun: u8, areas: &[Area]) -> Result<Vec<Area>, Refusal> {
        let (root, i, blocks) = {
            let st = self.lock();
            let i = Self::find_pair(&st, lun)?;
            let p = &st.pairs[i];
            if matches!(p.state, PairState::Forming | PairState::Resyncing) {
                return Err(state_err(format!(
                    "the pair of LU {} and LU {} is {}; wait for it to finish",
                    p.primary, p.secondary, p.state
                )));
            }
            (st.root(p.primary), i, self.plain[&p.primary])
        };
        let m = self.units_of(areas, blocks)?;
        // Every write in flight on the chain ends first: the split is one instant.
        let _all = self.store.locks.lock(root, 0, u64::MAX / 2);
        let mut st = self.lock();
        let p = st
            .pairs
            .get_mut(i)
            .ok_or_else(|| state_err("the pair was deleted"))?;
        for u in m.ones() {
            p.split.put(u, true);
        }
        p.state = PairState::Split;
        let split = units_to_areas(&m, self.n, blocks);
        self.save_pairs(&st)?;
        Ok(split)
    }

    /// Fig. 7: resync the split units inside the areas (all split units, when none).
    pub(super) fn pair_resync(self: &Arc<Self>, lun: u8, areas: &[Area]) -> Result<(), Refusal> {
        let mut st = self.lock();
        let i = Self::find_pair(&st, lun)?;
        let blocks = self.plain[&st.pairs[i].primary];
        let m = self.units_of(areas, blocks)?;
        let p = &st.pairs[i];
        if matches!(p.state, PairState::Forming | PairState::Resyncing) {
            return Err(state_err(format!(
                "the pair is {}; wait for it to finish",
                p.state
            )));
        }
        if st.copying(p.secondary) {
            return Err(state_err(format!(
                "LU {} is under copying to a backup device; resync after the copy ends",
                p.secondary
            )));
        }
        let mut todo = Bitmap::new(m.units);
        m.ones()
            .filter(|u| p.split.get(*u))
            .for_each(|u| todo.put(u, true));
        let primary = p.primary;
        st.pairs[i].state = PairState::Resyncing;
        drop(st);
        self.spawn_sync(primary, todo);
        Ok(())
    }

    pub(super) fn pair_delete(&self, lun: u8) -> Result<(), Refusal> {
        let mut st = self.lock();
        let i = Self::find_pair(&st, lun)?;
        let p = &st.pairs[i];
        if matches!(p.state, PairState::Forming | PairState::Resyncing) || st.copying(p.secondary) {
            return Err(state_err(format!(
                "the pair of LU {} and LU {} is busy; wait for it",
                p.primary, p.secondary
            )));
        }
        let removed = st.pairs.remove(i);
        if let Err(e) = self.save_pairs(&st) {
            st.pairs.insert(i, removed);
            return Err(e);
        }
        let _ = std::fs::remove_file(removed.diff_file.path());
        Ok(())
    }

    pub(super) fn pair_status(&self, lun: u8) -> Result<PairStatus, Refusal> {
        let st = self.lock();
        let p = &st.pairs[Self::find_pair(&st, lun)?];
        let blocks = self.plain[&p.primary];
        Ok(PairStatus {
            primary: u32::from(p.primary),
            secondary: u32::from(p.secondary),
            state: p.state,
            blocks_per_bit: self.n as u32,
            units: p.split.units,
            split_units: p.split.count(),
            diff_units: p.diff.count(),
            split_areas: units_to_areas(&p.split, self.n, blocks),
            copied_bytes: p.copied_bytes,
        })
    }

    /// INQUIRY VPD page C1h (step 43).
    pub(crate) fn pair_page(&self, lun: u8) -> Vec<u8> {
        crate::scsi::encode_pair_page(lun, self.pair_status(lun).ok().as_ref())
    }
}

/// Set units as block areas (the last clipped to the volume).
pub(super) fn units_to_areas(m: &Bitmap, n: u64, blocks: u64) -> Vec<Area> {
    m.runs()
        .into_iter()
        .map(|(f, c)| Area {
            start: f * n,
            blocks: ((f + c) * n).min(blocks) - f * n,
        })
        .collect()
}

//! Working-volume copy-on-write ([0062]-[0122]): the copy request, the saving of old
//! data before a host write, and the "work" attribute (Fig. 15, 16).

use super::jobs::finish_job;
use super::*;

impl Firmware {
    /// Fig. 12 steps 501-503 (Fig. 17 steps 1100-1101): save the "copy necessary &
    /// unsaved" blocks of the write to each copy's working volume. Runs under the range
    /// lock, so neither the copy process nor another write can touch these blocks.
    pub(super) fn save_before_write(&self, lun: u8, lba: u64, blocks: u64) -> Result<(), Refusal> {
        // Runs (job, work volume, first block, first slot, blocks) to save: consecutive
        // blocks of one job go to consecutive slots, in either saving mode, so a run is
        // one read and one write.
        let plan: Vec<(u32, u8, u64, u64, u64)> = {
            let mut st = self.lock();
            let mut plan: Vec<(u32, u8, u64, u64, u64)> = Vec::new();
            for c in st.infos.iter_mut().filter(|c| c.source == lun) {
                let Some(work) = c.work else { continue };
                for b in lba..lba + blocks {
                    if c.states[b as usize] != CopyState::Unsaved {
                        continue;
                    }
                    let slot = if c.same_block {
                        b
                    } else {
                        c.next_slot += 1;
                        c.next_slot - 1
                    };
                    match plan.last_mut() {
                        Some((job, _, first, at, n))
                            if *job == c.job && *first + *n == b && *at + *n == slot =>
                        {
                            *n += 1;
                        }
                        _ => plan.push((c.job, work, b, slot, 1)),
                    }
                }
            }
            plan
        };
        if plan.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        let mut saved = 0;
        for &(_, work, b, slot, n) in &plan {
            buf.resize((n * u64::from(BLOCK_SIZE)) as usize, 0);
            self.store
                .read(lun, b, &mut buf)
                .map_err(|s| io_err(s, "reading the blocks to save"))?;
            self.store
                .write(work, slot, &buf)
                .map_err(|s| io_err(s, "saving to the working volume"))?;
            saved += n;
        }
        self.counters
            .saved_bytes
            .fetch_add(saved * u64::from(BLOCK_SIZE), Ordering::Relaxed);
        let mut st = self.lock();
        for &(job, _, first, at, n) in &plan {
            if let Some(c) = st.infos.iter_mut().find(|c| c.job == job) {
                for i in 0..n {
                    c.states[(first + i) as usize] = CopyState::Saved;
                    c.slots.insert(first + i, at + i);
                }
            }
            if let Some(j) = st.jobs.get_mut(&job) {
                j.status.saved_blocks += n;
            }
        }
        Ok(())
    }

    /// [0062]-[0122]: a copy request on user volume `lun` with a working volume from
    /// the pool (or, with `wait_for_copy`, the prior art's waiting copy).
    pub(super) fn cow(
        self: &Arc<Self>,
        lun: u8,
        device: &str,
        ranges: Vec<Area>,
        same_block: bool,
        wait_for_copy: bool,
    ) -> Result<u32, Refusal> {
        let total = self.check_ranges(lun, &ranges)?;
        let blocks = self.plain[&lun];
        let root = self.user_volume_root(lun)?;
        // The request's instant: no write is half-way on the volume while it is set up.
        let _all = self.store.locks.lock(root, 0, u64::MAX / 2);
        let mut st = self.lock();
        let path = self.device(&st, device)?;
        let work = if wait_for_copy {
            None
        } else {
            Some(self.free_working_volume(&st, &ranges, same_block, total)?)
        };
        let job = self.new_job(&mut st, "cow", lun, device, total);
        st.infos
            .push(copy_info(job, lun, work, blocks, &ranges, same_block));
        st.hold(lun);
        if let Some(w) = work {
            st.hold(w);
            if let Some(j) = st.jobs.get_mut(&job) {
                j.status.working_volume = Some(u32::from(w));
            }
        }
        drop(st);
        let fw = Arc::clone(self);
        let dev = device.to_string();
        std::thread::spawn(move || {
            let r = fw.copy_to_device(job, lun, &ranges, &path, Some(root));
            let mut st = fw.lock();
            // Steps 609, 1203: the information and the working volume are free again.
            st.infos.retain(|c| c.job != job);
            st.release(lun);
            if let Some(w) = work {
                st.release(w);
            }
            st.busy_devices.remove(&dev);
            finish_job(&mut st, job, r.err());
            fw.ended.notify_all();
        });
        Ok(job)
    }

    /// The chain's first user volume of `lun`, which must be a user volume (not a working
    /// or secondary one).
    fn user_volume_root(&self, lun: u8) -> Result<u8, Refusal> {
        let st = self.lock();
        if st.work.contains(&lun) {
            return Err(state_err(format!(
                "LU {lun} is a working volume, not a user volume"
            )));
        }
        if st.pair_of_secondary(lun).is_some() {
            return Err(state_err(format!(
                "LU {lun} is a secondary volume; a copy request names a user volume"
            )));
        }
        Ok(st.root(lun))
    }

    /// Step 1200: a free working volume big enough for the request.
    fn free_working_volume(
        &self,
        st: &State,
        ranges: &[Area],
        same_block: bool,
        total: u64,
    ) -> Result<u8, Refusal> {
        // [0122]: compact saving needs only as many blocks as the request names.
        let need = if same_block {
            ranges.iter().map(Area::end).max().unwrap_or(0)
        } else {
            total
        };
        st.work
            .iter()
            .copied()
            .find(|w| !st.copying(*w) && self.plain.get(w).is_some_and(|c| *c >= need))
            .ok_or_else(|| {
                refuse(
                    Sense::BACKUP_RESOURCE,
                    format!(
                        "no free working volume of {need} blocks or more (set one with `volume attribute LU work`)"
                    ),
                )
            })
    }

    /// Fig. 16.
    pub(super) fn attribute(&self, lun: u8, work: bool) -> Result<(), Refusal> {
        let mut st = self.lock();
        if !self.plain.contains_key(&lun) {
            return Err(param_err(format!(
                "LU {lun} is not a plain LU of this array"
            )));
        }
        if st.copying(lun) {
            return Err(state_err(format!(
                "LU {lun} is under copying; its attribute cannot change now (step 1002)"
            )));
        }
        if work && (st.pair_of_primary(lun).is_some() || st.pair_of_secondary(lun).is_some()) {
            return Err(state_err(format!(
                "LU {lun} is in a pair; it cannot be a working volume"
            )));
        }
        let changed = if work {
            st.work.insert(lun)
        } else {
            st.work.remove(&lun)
        };
        if changed {
            if let Err(e) = self.save_attributes(&st) {
                if work {
                    st.work.remove(&lun);
                } else {
                    st.work.insert(lun);
                }
                return Err(e);
            }
        }
        Ok(())
    }
}

/// The copy information of a request (Fig. 10): its blocks "copy necessary & unsaved".
fn copy_info(
    job: u32,
    source: u8,
    work: Option<u8>,
    blocks: u64,
    ranges: &[Area],
    same_block: bool,
) -> CopyInfo {
    let mut states = vec![CopyState::Unnecessary; blocks as usize];
    for a in ranges {
        for b in a.start..a.end() {
            states[b as usize] = CopyState::Unsaved;
        }
    }
    CopyInfo {
        job,
        source,
        work,
        states,
        slots: HashMap::new(),
        next_slot: 0,
        same_block,
    }
}

//! Copies to a backup device: CCOPY and AUTO ([0029]-[0030], [0037]-[0040]).

use super::jobs::finish_job;
use super::*;

/// A started copy: the volume to copy, the primary to resync after it (AUTO), the job and
/// the backup device's path.
type Started = (u8, Option<u8>, u32, PathBuf);

impl Firmware {
    pub(super) fn check_ranges(&self, lun: u8, ranges: &[Area]) -> Result<u64, Refusal> {
        let blocks = *self
            .plain
            .get(&lun)
            .ok_or_else(|| param_err(format!("LU {lun} is not a plain LU of this array")))?;
        if ranges.is_empty() {
            return Err(param_err("the copy request lists no blocks"));
        }
        let mut sorted: Vec<&Area> = ranges.iter().collect();
        sorted.sort_by_key(|a| a.start);
        for w in sorted.windows(2) {
            if w[0].end() > w[1].start {
                return Err(param_err(format!("ranges {} and {} overlap", w[0], w[1])));
            }
        }
        let mut total = 0;
        for a in ranges {
            if a.blocks == 0 || a.end() > blocks {
                return Err(param_err(format!(
                    "range {a} is empty or past the end of LU {lun} ({blocks} blocks)"
                )));
            }
            total += a.blocks;
        }
        Ok(total)
    }

    pub(super) fn device(&self, st: &State, name: &str) -> Result<PathBuf, Refusal> {
        let path = self.devices.get(name).ok_or_else(|| {
            let known: Vec<&String> = self.devices.keys().collect();
            refuse(
                Sense::BACKUP_RESOURCE,
                format!("no backup device {name:?} (this array has {known:?})"),
            )
        })?;
        if st.busy_devices.contains(name) {
            return Err(refuse(
                Sense::BACKUP_RESOURCE,
                format!("backup device {name:?} is busy with another copy"),
            ));
        }
        Ok(path.clone())
    }

    /// [0029]-[0030] (and [0037]-[0040] with `auto`).
    pub(super) fn ccopy(
        self: &Arc<Self>,
        lun: u8,
        device: &str,
        ranges: Vec<Area>,
        auto: bool,
    ) -> Result<u32, Refusal> {
        let total = self.check_ranges(lun, &ranges)?;
        let (source, primary, job, path) = if auto {
            self.start_auto(lun, device, &ranges, total)?
        } else {
            self.start_ccopy(lun, device, &ranges, total)?
        };
        let fw = Arc::clone(self);
        let dev = device.to_string();
        std::thread::spawn(move || {
            let mut r = fw.copy_to_device(job, source, &ranges, &path, None);
            {
                let mut st = fw.lock();
                st.release(source);
                st.busy_devices.remove(&dev);
            }
            if let (Ok(()), Some(primary)) = (&r, primary) {
                // Step 95: resync the areas this job split.
                let blocks = fw.plain[&primary];
                r = fw.units_of(&ranges, blocks).and_then(|m| {
                    {
                        let mut st = fw.lock();
                        if let Some(i) = st.pair_of_primary(primary) {
                            st.pairs[i].state = PairState::Resyncing;
                        }
                    }
                    fw.sync_and_settle(primary, &m)
                });
            }
            let mut st = fw.lock();
            finish_job(&mut st, job, r.err());
            fw.ended.notify_all();
        });
        Ok(job)
    }

    /// AUTO's start (steps 91-93): the user volume must be in a duplex pair; split the
    /// areas, hold the secondary and open the job. Gives the volume to copy, the primary
    /// to resync afterwards, the job and the device's path.
    fn start_auto(
        &self,
        lun: u8,
        device: &str,
        ranges: &[Area],
        total: u64,
    ) -> Result<Started, Refusal> {
        // Step 91: the user volume must have a secondary; step 94 otherwise.
        let (primary, secondary) = {
            let st = self.lock();
            self.device(&st, device)?;
            let i = st.pair_of_primary(lun).ok_or_else(|| {
                state_err(format!("LU {lun} is not paired: AUTO mode needs a user volume with a secondary (step 94)"))
            })?;
            let p = &st.pairs[i];
            if p.state != PairState::Duplex {
                return Err(state_err(format!(
                    "the pair of LU {lun} is {}; AUTO mode needs it duplex",
                    p.state
                )));
            }
            (p.primary, p.secondary)
        };
        // Step 93: split the areas to back up ([0052]), then answer.
        self.pair_split(lun, ranges)?;
        let mut st = self.lock();
        let path = self.device(&st, device)?;
        st.hold(secondary);
        let job = self.new_job(&mut st, "auto", lun, device, total);
        Ok((secondary, Some(primary), job, path))
    }

    /// CCOPY's start ([0030]): the volume must be a split secondary and the ranges inside
    /// the split areas; hold it and open the job.
    fn start_ccopy(
        &self,
        lun: u8,
        device: &str,
        ranges: &[Area],
        total: u64,
    ) -> Result<Started, Refusal> {
        let mut st = self.lock();
        let path = self.device(&st, device)?;
        // [0030]: the volume must be a split secondary, and the ranges split.
        let i = st.pair_of_secondary(lun).ok_or_else(|| {
            state_err(format!(
                "LU {lun} is not a secondary volume; CCOPY copies a split secondary ([0030])"
            ))
        })?;
        let p = &st.pairs[i];
        if p.state != PairState::Split {
            return Err(state_err(format!(
                "the pair of LU {} and LU {lun} is {}, not split; split it first ([0030])",
                p.primary, p.state
            )));
        }
        for a in ranges {
            if (a.start / self.n..a.end().div_ceil(self.n)).any(|u| !p.split.get(u)) {
                return Err(state_err(format!(
                    "range {a} of LU {lun} is not inside the split areas; its data is not frozen"
                )));
            }
        }
        st.hold(lun);
        let job = self.new_job(&mut st, "ccopy", lun, device, total);
        Ok((lun, None, job, path))
    }

    /// CCOPY of a volume frozen by another function (the secondary of a remote pair,
    /// see [`crate::remote`]); the caller checked that it is split ([0030]).
    pub(crate) fn ccopy_frozen(
        self: &Arc<Self>,
        lun: u8,
        device: &str,
        ranges: Vec<Area>,
    ) -> Result<u32, Refusal> {
        let total = self.check_ranges(lun, &ranges)?;
        let (job, path) = {
            let mut st = self.lock();
            let path = self.device(&st, device)?;
            st.hold(lun);
            (self.new_job(&mut st, "ccopy", lun, device, total), path)
        };
        let fw = Arc::clone(self);
        let dev = device.to_string();
        std::thread::spawn(move || {
            let r = fw.copy_to_device(job, lun, &ranges, &path, None);
            let mut st = fw.lock();
            st.release(lun);
            st.busy_devices.remove(&dev);
            finish_job(&mut st, job, r.err());
            fw.ended.notify_all();
        });
        Ok(job)
    }

    /// Whether a copy job reads `lun` now.
    pub(crate) fn is_copying(&self, lun: u8) -> bool {
        self.lock().copying(lun)
    }

    /// Whether `lun` is in a pair of this array: as user volume (`Some(true)`) or
    /// secondary (`Some(false)`).
    pub(crate) fn paired(&self, lun: u8) -> Option<bool> {
        let st = self.lock();
        if st.pair_of_primary(lun).is_some() {
            Some(true)
        } else {
            st.pair_of_secondary(lun).map(|_| false)
        }
    }

    /// Whether `lun` has the "work" attribute.
    pub(crate) fn is_work(&self, lun: u8) -> bool {
        self.lock().work.contains(&lun)
    }

    /// The copy process: the ranges in the request's order, a step at a time, to the
    /// medium. With `cow`, each block comes from the user volume or the working volume
    /// by its copy state (Fig. 13 steps 603-606), under the range lock.
    pub(super) fn copy_to_device(
        &self,
        job: u32,
        lun: u8,
        ranges: &[Area],
        path: &Path,
        cow: Option<u8>,
    ) -> Result<(), Refusal> {
        let tape_err = |e: crate::tape::TapeError| refuse(Sense::INTERNAL_FAILURE, e.to_string());
        let mut tape = TapeWriter::create(path, lun).map_err(tape_err)?;
        let bs = BLOCK_SIZE as usize;
        let mut buf = Vec::new();
        for a in ranges {
            let mut at = a.start;
            while at < a.end() {
                let n = STEP_BLOCKS.min(a.end() - at);
                buf.resize(n as usize * bs, 0);
                match cow {
                    None => self
                        .store
                        .read(lun, at, &mut buf)
                        .map_err(|s| io_err(s, "reading the volume to copy"))?,
                    Some(root) => {
                        let (first, span) = self.unit_span(at, n);
                        let _locked = self.store.locks.lock(root, first, span);
                        let from: Vec<(u64, Option<(u8, u64)>)> = {
                            let st = self.lock();
                            let c = st
                                .infos
                                .iter()
                                .find(|c| c.job == job)
                                .ok_or_else(|| state_err("the copy request vanished"))?;
                            (at..at + n)
                                .map(|b| match c.states[b as usize] {
                                    CopyState::Saved => (b, c.work.zip(c.slots.get(&b).copied())),
                                    _ => (b, None),
                                })
                                .collect()
                        };
                        if from.iter().all(|(_, w)| w.is_none()) {
                            self.store
                                .read(lun, at, &mut buf)
                                .map_err(|s| io_err(s, "reading the user volume"))?;
                        } else {
                            for (i, (b, w)) in from.iter().enumerate() {
                                let blk = &mut buf[i * bs..(i + 1) * bs];
                                let r = match w {
                                    Some((work, slot)) => self.store.read(*work, *slot, blk),
                                    None => self.store.read(lun, *b, blk),
                                };
                                r.map_err(|s| io_err(s, "reading a block to copy"))?;
                            }
                        }
                        let mut st = self.lock();
                        if let Some(c) = st.infos.iter_mut().find(|c| c.job == job) {
                            for b in at..at + n {
                                c.states[b as usize] = CopyState::Copied;
                            }
                        }
                    }
                }
                tape.record(at, &buf).map_err(tape_err)?;
                self.counters
                    .device_bytes
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                if let Some(j) = self.lock().jobs.get_mut(&job) {
                    j.status.done_blocks += n;
                }
                at += n;
            }
        }
        tape.finish().map_err(tape_err)?;
        Ok(())
    }
}

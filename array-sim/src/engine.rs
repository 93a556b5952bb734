//! The array's firmware: LUs as sparse files on disk units, and the rules of the three
//! kinds (DESIGN.md §4), executed per SCSI command.
//!
//! - `mode-select` ([0019]-[0041]): a mirroring management table (LU, mates, mode; Fig. 2)
//!   kept in `modes` in the array's directory across restarts. Writes follow Fig. 6: to
//!   the LU and its mates unless the LU is in Snapshot; a mate is accessible only in
//!   Snapshot ([0034], [0040], claims 13-14). Reads in Synchronized are spread over the
//!   legs ([0034]).
//! - `stateless` ([0051], [0058]): Fig. 9 triples; the mirroring LU writes both the origin
//!   and the mate and reads either; the origin and mate are plain LUs. No snapshot state.
//! - `pre-update` ([0073]): Fig. 14 pairs; the mirroring LU writes both legs and reads
//!   either; the mate is a read-only view of one leg.
//!
//! A read that may use several legs goes to the one whose disk has the fewest outstanding
//! I/Os, alternating on a tie ([0077]); `read_distribution: alternate` makes it take the
//! legs in turn whatever their load, to measure what that buys.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hvm_core::mode::{self, MirrorPage, Mode};
use hvm_core::LuId;

use crate::backup::{Firmware, Refusal};
use crate::channel::{Channel, ChannelPort};
use crate::config::{ArrayConfig, FirmwareKind, MirrorConfig, ReadDistribution};
use crate::disk::{Disk, DiskStats};
use crate::fault::{FaultOp, FaultRule, Faults, Injected};
use crate::mirror::{Intent, IntentError, RangeLocks, WriteIntents};
use crate::scsi::{self, Command, Sense, CHECK_CONDITION};
use crate::store::{Lu, Store};

pub use crate::geometry::{BLOCK_SIZE, MAX_LEGS, MAX_TRANSFER_BLOCKS};
pub use crate::outcome::{EngineCounters, Outcome, Response};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: line {line}: {message}")]
    ModeTable {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("fault rule: {0}")]
    Fault(String),
    #[error("the array config names no directory for its LU files")]
    NoDirectory,
    #[error(transparent)]
    Intent(#[from] IntentError),
}

pub struct Engine {
    kind: FirmwareKind,
    dir: PathBuf,
    /// LUs with storage, and their locks.
    store: Arc<Store>,
    disks: Vec<Arc<Disk>>,
    rows: Vec<MirrorConfig>,
    /// Mode Select kind: the mode of each mirrored LU (Fig. 2).
    modes: Mutex<BTreeMap<u8, Mode>>,
    turn: AtomicU64,
    distribution: ReadDistribution,
    faults: Faults,
    /// Mirrored writes not yet on every leg, kept across the death of the process.
    intents: WriteIntents,
    /// The array-side backup functions, when the config turns them on.
    backup: Option<Arc<Firmware>>,
    /// Channel paths, remote pairs and the channel port (with the backup functions).
    channel: Option<Arc<Channel>>,
    pub counters: EngineCounters,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("kind", &self.kind)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// The physical legs of one access, inline: the read path allocates nothing for them.
#[derive(Clone, Copy)]
struct Legs {
    lus: [u8; MAX_LEGS],
    n: usize,
}

impl Legs {
    fn of(lus: &[u8]) -> Legs {
        let mut l = Legs {
            lus: [0; MAX_LEGS],
            n: lus.len().min(MAX_LEGS),
        };
        l.lus[..l.n].copy_from_slice(&lus[..l.n]);
        l
    }

    fn with_mates(lu: u8, mates: &[u8]) -> Legs {
        let mut l = Legs::of(&[lu]);
        for m in mates.iter().take(MAX_LEGS - 1) {
            l.lus[l.n] = *m;
            l.n += 1;
        }
        l
    }

    fn as_slice(&self) -> &[u8] {
        &self.lus[..self.n]
    }
}

const MODES_FILE: &str = "modes";

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            eprintln!("array-sim: {e}");
        }
    }
}

impl Engine {
    /// Open (creating as needed) the LU files in `dir`, or the config's own directory.
    pub fn open(cfg: &ArrayConfig, dir: Option<&Path>) -> Result<Engine, EngineError> {
        let dir = dir
            .map(Path::to_path_buf)
            .or_else(|| cfg.dir.clone())
            .ok_or(EngineError::NoDirectory)?;
        // The array's files are its disks: readable by its owner only, whatever the umask.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&dir)
            .map_err(io_error(&dir))?;
        let disks: BTreeMap<&str, Arc<Disk>> = cfg
            .disks
            .iter()
            .map(|d| (d.name.as_str(), Arc::new(Disk::new(d))))
            .collect();
        let lus = open_lus(cfg, &dir, &disks)?;
        let modes = open_modes(cfg, &dir)?;
        let intents = open_intents(&dir, &lus)?;
        let store = Arc::new(Store {
            lus,
            locks: RangeLocks::default(),
        });
        let (backup, channel) = open_backup(cfg, &dir, &store)?;
        Ok(Engine {
            kind: cfg.kind,
            dir,
            disks: disks.into_values().collect(),
            rows: cfg.mirroring.clone(),
            modes: Mutex::new(modes),
            turn: AtomicU64::new(0),
            distribution: cfg.read_distribution,
            faults: Faults::new(&cfg.faults).map_err(EngineError::Fault)?,
            store,
            intents,
            backup,
            channel,
            counters: EngineCounters::default(),
        })
    }

    /// The array's channel port (arrays with backup functions have one).
    pub fn channel_port(&self) -> Option<ChannelPort> {
        self.channel.clone().map(ChannelPort)
    }

    /// An orderly stop: the difference bitmaps are written whole and marked clean, so
    /// the next start trusts them. Call it when no command runs any more (dropping the
    /// engine does it).
    pub fn shutdown(&self) -> Result<(), String> {
        if let Some(ch) = &self.channel {
            ch.shutdown()?;
        }
        match &self.backup {
            Some(fw) => fw.shutdown(),
            None => Ok(()),
        }
    }

    pub fn kind(&self) -> FirmwareKind {
        self.kind
    }

    /// Every LUN a host can address: LUs with storage and the stateless kind's mirroring
    /// LUs.
    pub fn luns(&self) -> Vec<u8> {
        let mut v: Vec<u8> = self.store.lus.keys().copied().collect();
        for row in &self.rows {
            if let MirrorConfig::Triple { mirror, .. } = row {
                v.push(*mirror);
            }
        }
        v.sort_unstable();
        v
    }

    /// Capacity of `lun` in blocks.
    pub fn capacity(&self, lun: u8) -> Option<u64> {
        if let Some(lu) = self.store.lus.get(&lun) {
            return Some(lu.blocks);
        }
        self.rows.iter().find_map(|row| match row {
            MirrorConfig::Triple { mirror, origin, .. } if *mirror == lun => {
                self.store.lus.get(origin).map(|l| l.blocks)
            }
            _ => None,
        })
    }

    pub fn disk_stats(&self) -> Vec<(String, DiskStats)> {
        self.disks
            .iter()
            .map(|d| (d.name.clone(), d.stats()))
            .collect()
    }

    /// Disk statistics of the disk `lun` lives on.
    pub fn lu_disk_stats(&self, lun: u8) -> Option<DiskStats> {
        self.store.lus.get(&lun).map(|l| l.disk.stats())
    }

    /// The mode the array holds for `lun` (Mode Select kind).
    pub fn mode(&self, lun: u8) -> Option<Mode> {
        self.modes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&lun)
            .copied()
    }

    fn row_of(&self, lun: u8) -> Option<&MirrorConfig> {
        self.rows.iter().find(|row| match row {
            MirrorConfig::Managed { lu, mates } => *lu == lun || mates.contains(&lun),
            MirrorConfig::Triple {
                mirror,
                origin,
                mate,
            } => [*mirror, *origin, *mate].contains(&lun),
            MirrorConfig::Pair { mirror, mate } => *mirror == lun || *mate == lun,
        })
    }

    /// The legs a read (spread over them) or a write (to all of them) of `lun` uses now,
    /// or the sense data that refuses it.
    fn legs(&self, lun: u8, write: bool) -> Result<Legs, Sense> {
        match self.row_of(lun) {
            Some(MirrorConfig::Managed { lu, mates }) => {
                let mode = self.mode(*lu).unwrap_or(Mode::Synchronized);
                if lun == *lu {
                    // Writes: Fig. 6 steps 902-904, mirrored unless in Snapshot. Reads:
                    // spread over the legs only while they are the same ([0034]).
                    let spread = if write {
                        mode != Mode::Snapshot
                    } else {
                        mode == Mode::Synchronized
                    };
                    Ok(if spread {
                        Legs::with_mates(lun, mates)
                    } else {
                        Legs::of(&[lun])
                    })
                } else if mode == Mode::Snapshot {
                    // Steps 901, 905, 904.
                    Ok(Legs::of(&[lun]))
                } else {
                    // Step 906, [0034], claim 13: a mate is not an independent LU
                    // outside Snapshot.
                    Err(Sense::NOT_ACCESSIBLE)
                }
            }
            Some(MirrorConfig::Triple {
                mirror,
                origin,
                mate,
            }) if lun == *mirror => Ok(Legs::of(&[*origin, *mate])),
            Some(MirrorConfig::Pair { mirror, mate }) => {
                if lun == *mirror {
                    Ok(Legs::of(&[*mirror, *mate]))
                } else if write {
                    // [0073]: the mate is read-only.
                    Err(Sense::WRITE_PROTECTED)
                } else {
                    Ok(Legs::of(&[lun]))
                }
            }
            _ => Ok(Legs::of(&[lun])),
        }
    }

    /// The leg with the fewest outstanding I/Os; ties alternate.
    fn pick(&self, legs: &[u8]) -> u8 {
        if legs.len() == 1 {
            return legs[0];
        }
        if self.distribution == ReadDistribution::Alternate {
            return legs[self.turn.fetch_add(1, Ordering::Relaxed) as usize % legs.len()];
        }
        // Read each leg's load once: the counts move under concurrent I/O, and judging
        // the minimum and the ties from different readings could leave no leg at all.
        let mut loads = [0u64; MAX_LEGS];
        for (slot, l) in loads.iter_mut().zip(legs) {
            *slot = self
                .store
                .lus
                .get(l)
                .map_or(u64::MAX, |lu| lu.disk.outstanding());
        }
        let loads = &loads[..legs.len()];
        let min = loads.iter().copied().min().unwrap_or(0);
        let ties = loads.iter().filter(|n| **n == min).count().max(1);
        let k = self.turn.fetch_add(1, Ordering::Relaxed) as usize % ties;
        legs.iter()
            .zip(loads)
            .filter(|(_, n)| **n == min)
            .nth(k)
            .map_or(legs[0], |(l, _)| *l)
    }

    /// Execute one command addressed to `lun`.
    pub fn execute(&self, lun: u8, cdb: &[u8], data_out: &[u8]) -> Outcome {
        self.execute_inner(lun, cdb, data_out, None)
    }

    /// As [`Engine::execute`], but a READ whose transfer is exactly `data_in.len()` bytes
    /// lands in `data_in` (the response then carries no data): no allocation and no copy
    /// on the in-process read path.
    pub fn execute_into(
        &self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        data_in: &mut [u8],
    ) -> Outcome {
        self.execute_inner(lun, cdb, data_out, Some(data_in))
    }

    fn execute_inner(
        &self,
        lun: u8,
        cdb: &[u8],
        data_out: &[u8],
        data_in: Option<&mut [u8]>,
    ) -> Outcome {
        self.counters.commands.fetch_add(1, Ordering::Relaxed);
        let cmd = match Command::parse(cdb) {
            Ok(c) => c,
            Err(s) => return Outcome::Reply(Response::check(s)),
        };
        if !matches!(
            cmd,
            Command::ReportLuns { .. } | Command::Inquiry { .. } | Command::Backup { .. }
        ) && self.capacity(lun).is_none()
        {
            return Outcome::Reply(Response::check(Sense::LUN_NOT_SUPPORTED));
        }
        if cmd.data_out_len(BLOCK_SIZE) != data_out.len() as u64 {
            return Outcome::Reply(Response::check(Sense::PARAMETER_LIST_LENGTH));
        }
        let op = match cmd {
            Command::Read16 { .. } => FaultOp::Read,
            Command::Write16 { .. } => FaultOp::Write,
            Command::SynchronizeCache16 { .. } => FaultOp::Flush,
            Command::ArrayCopy { .. } => FaultOp::Copy,
            _ => FaultOp::Any,
        };
        match self.faults.check(lun, op) {
            Injected::None => {}
            Injected::Error(s) => return Outcome::Reply(Response::check(s)),
            Injected::Delay(d) => std::thread::sleep(d),
            Injected::Drop => return Outcome::Drop,
        }
        if let Some(r) = self.backup_command(lun, cmd, data_out) {
            return Outcome::Reply(r);
        }
        Outcome::Reply(match self.dispatch(lun, cmd, data_out, data_in) {
            Ok(data) => Response::good(data),
            Err(s) => Response::check(s),
        })
    }

    /// The backup commands, and the host I/O the backup functions take part in: their
    /// refusals carry the reason as data-in text.
    fn backup_command(&self, lun: u8, cmd: Command, data_out: &[u8]) -> Option<Response> {
        let refused = |r: Refusal| Response {
            status: CHECK_CONDITION,
            sense: Some(r.sense),
            data: r.message.into_bytes(),
        };
        let Some(fw) = &self.backup else {
            return match cmd {
                Command::Backup { .. } | Command::PairSplit { .. } => Some(refused(Refusal {
                    sense: Sense::INVALID_OPCODE,
                    message:
                        "this array has no backup functions (its config has no `backup` section)"
                            .into(),
                })),
                _ => None,
            };
        };
        if let Some(ch) = &self.channel {
            // Remote pairs and channel paths (crate::channel).
            if let Some(r) = ch.on_host(lun, cmd, data_out, &self.counters) {
                return Some(r.map_or_else(refused, Response::good));
            }
        }
        match cmd {
            Command::Backup { .. } => {
                let op = match serde_json::from_slice(data_out) {
                    Ok(op) => op,
                    Err(e) => {
                        return Some(refused(Refusal {
                            sense: Sense::INVALID_FIELD_IN_PARAMETERS,
                            message: format!("the backup function's parameters: {e}"),
                        }))
                    }
                };
                let host = (
                    self.counters.host_read_bytes.load(Ordering::Relaxed),
                    self.counters.host_write_bytes.load(Ordering::Relaxed),
                );
                Some(match fw.execute(op, host) {
                    Ok(reply) => Response::good(serde_json::to_vec(&reply).unwrap_or_default()),
                    Err(r) => refused(r),
                })
            }
            Command::PairSplit { split, .. } => {
                Some(match fw.fig5(lun, split, &scsi::decode_areas(data_out)) {
                    Ok(()) => Response::good(Vec::new()),
                    Err(r) => refused(r),
                })
            }
            Command::Read16 { .. } => fw.check_read(lun).err().map(refused),
            Command::Write16 { lba, blocks, fua } => {
                if self.check_range(lun, lba, blocks).is_err() {
                    return None; // the usual path answers
                }
                match fw.host_write(lun, lba, data_out) {
                    Ok(false) => None,
                    Ok(true) => {
                        self.counters
                            .host_write_bytes
                            .fetch_add(data_out.len() as u64, Ordering::Relaxed);
                        if fua {
                            if let Err(s) = self.sync(lun) {
                                return Some(Response::check(s));
                            }
                        }
                        Some(Response::good(Vec::new()))
                    }
                    Err(r) => Some(refused(r)),
                }
            }
            _ => None,
        }
    }

    fn dispatch(
        &self,
        lun: u8,
        cmd: Command,
        data_out: &[u8],
        data_in: Option<&mut [u8]>,
    ) -> Result<Vec<u8>, Sense> {
        match cmd {
            Command::TestUnitReady => Ok(Vec::new()),
            Command::Inquiry {
                evpd,
                page,
                alloc_len,
            } => {
                let mut d = self.inquiry(lun, evpd, page)?;
                d.truncate(usize::from(alloc_len));
                Ok(d)
            }
            Command::ReportLuns { alloc_len } => {
                let mut d = scsi::encode_report_luns(&self.luns());
                d.truncate(alloc_len as usize);
                Ok(d)
            }
            Command::ReadCapacity16 { alloc_len } => {
                let blocks = self.capacity(lun).ok_or(Sense::LUN_NOT_SUPPORTED)?;
                let mut d = scsi::encode_read_capacity_16(blocks, BLOCK_SIZE).to_vec();
                d.truncate(alloc_len as usize);
                Ok(d)
            }
            Command::Read16 { lba, blocks, .. } => self.read(lun, lba, blocks, data_in),
            Command::Write16 { lba, blocks, fua } => {
                self.write(lun, lba, blocks, fua, data_out)?;
                Ok(Vec::new())
            }
            Command::SynchronizeCache16 { .. } => {
                // Whole-LU flush: fdatasync of every leg file behind the LUN.
                let legs = self.legs(lun, true).or_else(|_| self.legs(lun, false))?;
                self.on_legs(legs.as_slice(), true, |leg| self.sync(leg))?;
                Ok(Vec::new())
            }
            Command::ModeSense6 { page, alloc_len } => self.mode_sense(lun, page, alloc_len),
            Command::ModeSelect6 { .. } => {
                self.mode_select(lun, scsi::mode_page_6(data_out)?)?;
                Ok(Vec::new())
            }
            Command::ArrayCopy {
                lba,
                blocks,
                dest_lun,
            } => {
                self.array_copy(lun, dest_lun, lba, blocks)?;
                Ok(Vec::new())
            }
            Command::SetFault { .. } => {
                self.set_fault(data_out)?;
                Ok(Vec::new())
            }
            // Answered by `backup_command`.
            Command::Backup { .. } | Command::PairSplit { .. } => Err(Sense::INVALID_OPCODE),
        }
    }

    /// READ (16): from one leg, the least busy ([0077]), into `data_in` when it fits.
    fn read(
        &self,
        lun: u8,
        lba: u64,
        blocks: u32,
        data_in: Option<&mut [u8]>,
    ) -> Result<Vec<u8>, Sense> {
        let len = self.check_range(lun, lba, blocks)?;
        self.counters
            .host_read_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        let legs = self.legs(lun, false)?;
        let leg = self.pick(legs.as_slice());
        let mut own = Vec::new();
        let buf: &mut [u8] = match data_in {
            Some(b) if b.len() == len => b,
            _ => {
                own.resize(len, 0);
                &mut own
            }
        };
        self.store.read(leg, lba, buf)?;
        Ok(own)
    }

    /// WRITE (16): to every leg the LU's mode sends it to.
    fn write(
        &self,
        lun: u8,
        lba: u64,
        blocks: u32,
        fua: bool,
        data_out: &[u8],
    ) -> Result<(), Sense> {
        self.check_range(lun, lba, blocks)?;
        self.counters
            .host_write_bytes
            .fetch_add(data_out.len() as u64, Ordering::Relaxed);
        let legs = self.legs(lun, true)?;
        let legs = legs.as_slice();
        // A write to several legs is one unit: see `mirror`.
        let (_locked, _in_flight) = if legs.len() > 1 {
            let locked = self.store.locks.lock(legs[0], lba, u64::from(blocks));
            let slot = self
                .intents
                .begin(legs, lba, blocks)
                .map_err(|_| Sense::WRITE_ERROR)?;
            (locked, Some(slot))
        } else {
            (Vec::new(), None)
        };
        self.on_legs(legs, fua, |leg| {
            self.store.write(leg, lba, data_out)?;
            if fua {
                self.sync(leg)?;
            }
            Ok(())
        })?;
        Ok(())
    }

    fn mode_sense(&self, lun: u8, page: u8, alloc_len: u8) -> Result<Vec<u8>, Sense> {
        if page != mode::PAGE_CODE {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let page = self.mode_page(lun)?;
        let protected = matches!(self.legs(lun, true), Err(s) if s == Sense::WRITE_PROTECTED);
        let mut d = scsi::encode_mode_sense_6(&page, protected);
        d.truncate(usize::from(alloc_len));
        Ok(d)
    }

    /// SET FAULT: install the rule, or clear them all.
    fn set_fault(&self, data_out: &[u8]) -> Result<(), Sense> {
        match FaultRule::decode(data_out)? {
            Some(rule) => self
                .faults
                .add(rule)
                .map_err(|_| Sense::INVALID_FIELD_IN_PARAMETERS)?,
            None => self.faults.clear(),
        }
        Ok(())
    }

    /// Run `io` on every leg: one after the other, or with `at_once` each leg but the
    /// first on a thread of its own, so that a flush (or a FUA write) waits for its
    /// slowest leg's fdatasync rather than for the sum of them. Plain writes stay on one
    /// thread: they are CPU (page-cache copies), and on 2 cores a thread per 1 MiB write
    /// made them slower. The first error is returned after every leg has ended.
    fn on_legs(
        &self,
        legs: &[u8],
        at_once: bool,
        io: impl Fn(u8) -> Result<(), Sense> + Sync,
    ) -> Result<(), Sense> {
        if !at_once || legs.len() < 2 {
            return legs.iter().try_for_each(|&leg| io(leg));
        }
        std::thread::scope(|s| {
            let io = &io;
            let others: Vec<_> = legs[1..]
                .iter()
                .map(|&leg| s.spawn(move || io(leg)))
                .collect();
            others.into_iter().fold(io(legs[0]), |acc, h| {
                let r = h.join().unwrap_or(Err(Sense::INTERNAL_FAILURE));
                acc.and(r)
            })
        })
    }

    /// Bytes of the transfer, after checking it fits the LU and the transfer cap.
    fn check_range(&self, lun: u8, lba: u64, blocks: u32) -> Result<usize, Sense> {
        let cap = self.capacity(lun).ok_or(Sense::LUN_NOT_SUPPORTED)?;
        if lba
            .checked_add(u64::from(blocks))
            .is_none_or(|end| end > cap)
        {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        if blocks > MAX_TRANSFER_BLOCKS {
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        Ok(blocks as usize * BLOCK_SIZE as usize)
    }

    fn sync(&self, leg: u8) -> Result<(), Sense> {
        let lu = self.store.lus.get(&leg).ok_or(Sense::INTERNAL_FAILURE)?;
        lu.file.sync_data().map_err(|_| Sense::INTERNAL_FAILURE)
    }

    fn mode_page(&self, lun: u8) -> Result<Vec<u8>, Sense> {
        Ok(match self.kind {
            // Fig. 4; 4 (Undefined) for a mate or an LU that is not duplicated ([0025]).
            FirmwareKind::ModeSelect => {
                mode::encode_mode_sense(self.mode(lun).unwrap_or(Mode::Undefined)).to_vec()
            }
            // Fig. 11.
            FirmwareKind::Stateless | FirmwareKind::PreUpdate => {
                let page = match self.row_of(lun) {
                    Some(MirrorConfig::Triple {
                        mirror,
                        origin,
                        mate,
                    }) if *mirror == lun => MirrorPage::Mirror {
                        origin: LuId(u32::from(*origin)),
                        mate: LuId(u32::from(*mate)),
                    },
                    Some(MirrorConfig::Pair { mirror, mate }) if *mirror == lun => {
                        MirrorPage::PreUpdate {
                            mate: LuId(u32::from(*mate)),
                        }
                    }
                    _ => MirrorPage::Other,
                };
                mode::encode_mirror_page(page)
                    .map_err(|_| Sense::INTERNAL_FAILURE)?
                    .to_vec()
            }
        })
    }

    fn mode_select(&self, lun: u8, page: &[u8]) -> Result<(), Sense> {
        if self.kind != FirmwareKind::ModeSelect {
            // This firmware keeps no modes.
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        let new = mode::decode_mode_select(page).map_err(|_| Sense::INVALID_FIELD_IN_PARAMETERS)?;
        let mut modes = self.modes.lock().unwrap_or_else(|e| e.into_inner());
        // Only a duplicated LU has a mode (not a mate, not an unmirrored LU).
        let Some(&old) = modes.get(&lun) else {
            return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
        };
        modes.insert(lun, new);
        if self.save_modes(&modes).is_err() {
            modes.insert(lun, old);
            return Err(Sense::INTERNAL_FAILURE);
        }
        Ok(())
    }

    /// Write the mode table durably ([`crate::store::replace_file`]).
    fn save_modes(&self, modes: &BTreeMap<u8, Mode>) -> std::io::Result<()> {
        let text: String = modes
            .iter()
            .map(|(lu, m)| format!("{lu} {}\n", m.code()))
            .collect();
        crate::store::replace_file(&self.dir.join(MODES_FILE), text.as_bytes())
    }

    /// [0049]: copy between the duplicated LUs of one mirroring row, inside the array.
    fn array_copy(&self, src: u8, dst: u8, lba: u64, blocks: u32) -> Result<(), Sense> {
        let (from, to) = match self.row_of(src) {
            Some(MirrorConfig::Managed { lu, mates }) if src == *lu && mates.contains(&dst) => {
                (src, dst)
            }
            Some(MirrorConfig::Triple { origin, mate, .. }) if src == *origin && dst == *mate => {
                (src, dst)
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        };
        self.check_range(src, lba, blocks)?;
        let chunk = 2048u64; // 1 MiB at a time
        let mut at = lba;
        let end = lba + u64::from(blocks);
        let mut buf = vec![0u8; (chunk * u64::from(BLOCK_SIZE)) as usize];
        while at < end {
            let n = (end - at).min(chunk);
            let b = &mut buf[..(n * u64::from(BLOCK_SIZE)) as usize];
            // A mirrored write to these blocks lands either before the read or after the
            // write, never between them.
            let _locked = self.store.locks.lock(from, at, n);
            self.store.read(from, at, b)?;
            self.store.write(to, at, b)?;
            self.counters
                .copied_bytes
                .fetch_add(b.len() as u64, Ordering::Relaxed);
            at += n;
        }
        Ok(())
    }

    /// Standard INQUIRY data, or a VPD page: 00h (supported pages) and C0h (pairing).
    fn inquiry(&self, lun: u8, evpd: bool, page: u8) -> Result<Vec<u8>, Sense> {
        let exists = self.capacity(lun).is_some();
        if !evpd {
            if page != 0 {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            let mut d = vec![0u8; 36];
            // Peripheral qualifier 3 (no LU here) or a direct-access block device.
            d[0] = if exists { 0x00 } else { 0x7f };
            d[2] = 0x06; // SPC-4
            d[3] = 0x02; // response data format
            d[4] = 31;
            d[8..16].copy_from_slice(b"HVM     ");
            let product = match self.kind {
                FirmwareKind::ModeSelect => b"ARRAY-SIM MODESEL",
                FirmwareKind::Stateless => b"ARRAY-SIM STATELS",
                FirmwareKind::PreUpdate => b"ARRAY-SIM PREUPDT",
            };
            d[16..32].copy_from_slice(&product[..16]);
            d[32..36].copy_from_slice(b"0.1 ");
            return Ok(d);
        }
        if !exists {
            return Err(Sense::LUN_NOT_SUPPORTED);
        }
        let body = match page {
            0x00 if self.backup.is_some() => vec![0x00, scsi::VPD_PAIRING, scsi::VPD_PAIR],
            0x00 => vec![0x00, scsi::VPD_PAIRING],
            scsi::VPD_PAIRING => self.pairing(lun),
            scsi::VPD_PAIR => match &self.backup {
                Some(fw) => fw.pair_page(lun),
                None => return Err(Sense::INVALID_FIELD_IN_CDB),
            },
            _ => return Err(Sense::INVALID_FIELD_IN_CDB),
        };
        let mut d = vec![0x00, page];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        Ok(d)
    }

    /// VPD C0h body: kind (0 mode-select, 1 stateless, 2 pre-update), role of this LU
    /// (0 not mirrored, 1 mirrored LU / mirroring LU, 2 origin, 3 mate), then the number
    /// of related LUNs and the LUNs: the mates of a Mode Select LU; origin then mate of a
    /// stateless mirroring LU; the mate of a pre-update mirroring LU; the owning LU of an
    /// origin or mate.
    fn pairing(&self, lun: u8) -> Vec<u8> {
        let kind = match self.kind {
            FirmwareKind::ModeSelect => 0,
            FirmwareKind::Stateless => 1,
            FirmwareKind::PreUpdate => 2,
        };
        let (role, related): (u8, Vec<u8>) = match self.row_of(lun) {
            Some(MirrorConfig::Managed { lu, mates }) if *lu == lun => (1, mates.clone()),
            Some(MirrorConfig::Managed { lu, .. }) => (3, vec![*lu]),
            Some(MirrorConfig::Triple {
                mirror,
                origin,
                mate,
            }) if *mirror == lun => (1, vec![*origin, *mate]),
            Some(MirrorConfig::Triple { mirror, origin, .. }) if *origin == lun => {
                (2, vec![*mirror])
            }
            Some(MirrorConfig::Triple { mirror, .. }) => (3, vec![*mirror]),
            Some(MirrorConfig::Pair { mirror, mate }) if *mirror == lun => (1, vec![*mate]),
            Some(MirrorConfig::Pair { mirror, .. }) => (3, vec![*mirror]),
            None => (0, Vec::new()),
        };
        let mut d = vec![kind, role, related.len() as u8];
        d.extend_from_slice(&related);
        d
    }
}

/// The backup functions and the channel functions of an array.
type Functions = (Option<Arc<Firmware>>, Option<Arc<Channel>>);

/// `EngineError::Io` for `path`.
fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> EngineError {
    let path = path.to_path_buf();
    move |source| EngineError::Io { path, source }
}

/// Open (creating as needed, sparse) each LU's file on its disk.
fn open_lus(
    cfg: &ArrayConfig,
    dir: &Path,
    disks: &BTreeMap<&str, Arc<Disk>>,
) -> Result<BTreeMap<u8, Lu>, EngineError> {
    let mut lus = BTreeMap::new();
    for lu in &cfg.lus {
        let path = dir.join(format!("lu{}.img", lu.lun));
        let file = crate::store::open_private(&path).map_err(io_error(&path))?;
        // Sparse: only written blocks take space.
        file.set_len(lu.blocks * u64::from(BLOCK_SIZE))
            .map_err(io_error(&path))?;
        let disk = disks
            .get(lu.disk.as_str())
            .cloned()
            .ok_or_else(|| EngineError::Fault(format!("LU {}: no disk {}", lu.lun, lu.disk)))?;
        lus.insert(
            lu.lun,
            Lu {
                blocks: lu.blocks,
                file,
                disk,
            },
        );
    }
    Ok(lus)
}

/// The Mode Select kind's mode table: every managed LU Synchronized, then the saved modes.
fn open_modes(cfg: &ArrayConfig, dir: &Path) -> Result<BTreeMap<u8, Mode>, EngineError> {
    let mut modes = BTreeMap::new();
    if cfg.kind == FirmwareKind::ModeSelect {
        for row in &cfg.mirroring {
            if let MirrorConfig::Managed { lu, .. } = row {
                modes.insert(*lu, Mode::Synchronized);
            }
        }
        let path = dir.join(MODES_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => load_modes(&text, &path, &mut modes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(EngineError::Io { path, source }),
        }
    }
    Ok(modes)
}

/// The write intents, after repairing the legs of the writes a death left half-done.
fn open_intents(dir: &Path, lus: &BTreeMap<u8, Lu>) -> Result<WriteIntents, EngineError> {
    let (intents, pending) = WriteIntents::open(dir)?;
    for (slot, i) in &pending {
        repair(lus, i).map_err(|message| {
            EngineError::Intent(IntentError::Corrupt {
                path: dir.join(crate::mirror::INTENT_FILE),
                slot: *slot,
                message,
            })
        })?;
    }
    intents.clear(dir)?;
    Ok(intents)
}

/// The backup functions and the channel functions over `store`, when the config has a
/// `backup` section.
fn open_backup(
    cfg: &ArrayConfig,
    dir: &Path,
    store: &Arc<Store>,
) -> Result<Functions, EngineError> {
    let in_rows: std::collections::BTreeSet<u8> =
        cfg.mirroring.iter().flat_map(MirrorConfig::lus).collect();
    let plain: BTreeMap<u8, u64> = store
        .lus
        .iter()
        .filter(|(l, _)| !in_rows.contains(l))
        .map(|(l, lu)| (*l, lu.blocks))
        .collect();
    let (backup, channel) = match &cfg.backup {
        None => (None, None),
        Some(b) => {
            let fw =
                Firmware::open(b, dir, plain.clone(), store.clone()).map_err(EngineError::Fault)?;
            let n = u64::from(b.blocks_per_bit);
            let ch = Channel::open(
                cfg.channel.as_ref(),
                n,
                dir,
                plain,
                store.clone(),
                fw.clone(),
            )
            .map_err(EngineError::Fault)?;
            (Some(fw), Some(ch))
        }
    };
    Ok((backup, channel))
}

/// Make the legs of an unfinished mirrored write agree: its first leg's blocks are copied
/// to the others.
fn repair(lus: &BTreeMap<u8, Lu>, i: &Intent) -> Result<(), String> {
    let end = i.lba.checked_add(u64::from(i.blocks));
    let mut files = Vec::new();
    for leg in &i.legs {
        let lu = lus
            .get(leg)
            .ok_or_else(|| format!("leg LU {leg} is not an LU of this array"))?;
        if end.is_none_or(|e| e > lu.blocks) || i.blocks > MAX_TRANSFER_BLOCKS {
            return Err(format!(
                "blocks {}+{} are outside LU {leg} ({} blocks)",
                i.lba, i.blocks, lu.blocks
            ));
        }
        files.push(&lu.file);
    }
    let mut buf = vec![0u8; i.blocks as usize * BLOCK_SIZE as usize];
    let off = i.lba * u64::from(BLOCK_SIZE);
    let failed = |e: std::io::Error| format!("repairing blocks {}+{}: {e}", i.lba, i.blocks);
    files[0].read_exact_at(&mut buf, off).map_err(failed)?;
    for f in &files[1..] {
        f.write_all_at(&buf, off).map_err(failed)?;
        f.sync_data().map_err(failed)?;
    }
    Ok(())
}

fn load_modes(text: &str, path: &Path, modes: &mut BTreeMap<u8, Mode>) -> Result<(), EngineError> {
    for (i, line) in text.lines().enumerate() {
        let bad = |message: String| EngineError::ModeTable {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let mut parts = line.split_whitespace();
        let (Some(lu), Some(code), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(format!("expected \"LU MODE\", found {line:?}")));
        };
        let lu: u8 = lu
            .parse()
            .map_err(|_| bad(format!("LU {lu:?} is not a number 0-255")))?;
        let mode = code
            .parse::<u8>()
            .ok()
            .and_then(Mode::from_code)
            .filter(|m| *m != Mode::Undefined)
            .ok_or_else(|| bad(format!("mode {code:?} is not 0, 1 or 2")))?;
        match modes.get_mut(&lu) {
            Some(m) => *m = mode,
            None => return Err(bad(format!("LU {lu} is not a mirrored LU of this array"))),
        }
    }
    Ok(())
}

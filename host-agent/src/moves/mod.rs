//! Moving a virtual LU to another backend while it serves I/O (`hvmctl lu move`).
//!
//! The anchors are LVM's pvmove and QEMU's blockdev-mirror: the virtual LU keeps its name,
//! its NBD clients keep their connections, and its data moves underneath.
//!
//! 1. The pair must be Synchronized, and is held so (a snapshot is refused during the
//!    move): with one copy of the data, the mirror LU is all there is to copy.
//! 2. The move is recorded in the placement file, then each LU of the pair is routed to
//!    its new place as a [`routed::Mirror`]: reads from the old place, writes to both.
//! 3. A copier thread copies the mirror LU, chunk by chunk under the mirror's range lock
//!    (so a client write and the copy of its range never interleave), at a rate that can
//!    change while it runs.
//! 4. The switch: with the pair quiesced (no I/O in flight, none let in; milliseconds),
//!    the new routes are written to the placement file and then take effect. Every later
//!    request goes to the new place.
//!
//! A crash before the switch leaves the placement file naming the old place, which every
//! acknowledged write reached: the move is rolled back at start (and can be run again).
//! A crash after it leaves the new place, which every write since reached. A failed write
//! to the new place, or `--cancel`, abandons the move the same way.

pub mod placement;
pub mod routed;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hvm_core::range_lock::RangeGuard;
use hvm_core::{Extent, LuId, MirrorDefinition, VirtualLuId, SECTOR_SIZE};

use crate::exports::Manager;
use placement::{MoveRecord, Placement};
use routed::{Mirror, Place, Routed, Shared, Target};

/// Bytes copied per step; each step holds the range lock of its chunk only.
const CHUNK: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{0}")]
    Refused(String),
    #[error("no move of {0} is under way")]
    NotMoving(String),
    #[error("placement file: {0}")]
    Placement(String),
}

pub use hvm_api::{Move, MoveRequest, Phase};

/// One move of a virtual LU.
pub struct MoveJob {
    vlu: String,
    from: Vec<Place>,
    to: Vec<Place>,
    total: u64,
    copied: AtomicU64,
    rate: AtomicU64,
    cancel: AtomicBool,
    phase: Mutex<Phase>,
    changed: Condvar,
    started: Instant,
    /// Milliseconds the pair was quiesced for the switch.
    switch_ms: Mutex<Option<f64>>,
}

impl MoveJob {
    pub fn status(&self) -> Move {
        Move {
            vlu: self.vlu.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            phase: lock(&self.phase).clone(),
            copied_bytes: self.copied.load(Ordering::Relaxed),
            total_bytes: self.total,
            rate_bytes: self.rate.load(Ordering::Relaxed),
            elapsed_ms: self.started.elapsed().as_secs_f64() * 1e3,
            switch_ms: *lock(&self.switch_ms),
        }
    }

    fn finish(&self, phase: Phase) {
        *lock(&self.phase) = phase;
        self.changed.notify_all();
    }

    /// Wait until the move has ended, or `timeout` passed.
    pub fn wait(&self, timeout: Duration) -> Phase {
        let g = lock(&self.phase);
        let (g, _) = self
            .changed
            .wait_timeout_while(g, timeout, |p| *p == Phase::Copying)
            .unwrap_or_else(PoisonError::into_inner);
        g.clone()
    }
}

/// A virtual LU as the moves see it.
pub struct Subject<'a> {
    pub name: &'a str,
    pub home: &'a str,
    pub mgr: &'a Arc<Manager>,
    pub vlu: VirtualLuId,
}

/// The placement file and its contents, shared by the moves that change it.
pub struct Ledger {
    path: std::path::PathBuf,
    placement: Mutex<Placement>,
}

impl Ledger {
    pub fn new(path: std::path::PathBuf, placement: Placement) -> Ledger {
        Ledger {
            path,
            placement: Mutex::new(placement),
        }
    }

    pub fn get(&self) -> Placement {
        lock(&self.placement).clone()
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Apply `change` to a copy, write it durably, then keep it; on a failed write the
    /// placement stays as it was.
    pub fn update(&self, change: impl FnOnce(&mut Placement)) -> std::io::Result<()> {
        let mut pl = lock(&self.placement);
        let mut next = pl.clone();
        change(&mut next);
        next.save(&self.path)?;
        *pl = next;
        Ok(())
    }
}

/// Every move of this agent, and the placement they change.
pub struct Moves {
    ledger: Arc<Ledger>,
    backends: BTreeMap<String, Shared>,
    routed: BTreeMap<String, Arc<Routed>>,
    jobs: Mutex<BTreeMap<String, Arc<MoveJob>>>,
}

impl Moves {
    pub fn new(
        ledger: Arc<Ledger>,
        backends: BTreeMap<String, Shared>,
        routed: BTreeMap<String, Arc<Routed>>,
    ) -> Moves {
        Moves {
            ledger,
            backends,
            routed,
            jobs: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    /// The identities of the LUs `s` uses now, primary first.
    pub fn identities(&self, s: &Subject<'_>) -> Result<Vec<String>, MoveError> {
        let (def, _, _) = s
            .mgr
            .pair_layout(s.vlu)
            .map_err(|e| MoveError::Refused(e.to_string()))?;
        let routed = self.routed(s.home)?;
        Ok(def
            .lus()
            .into_iter()
            .map(|lu| routed::identity_of(&routed.place(lu)))
            .collect())
    }

    pub fn job(&self, vlu: &str) -> Option<Arc<MoveJob>> {
        lock(&self.jobs).get(vlu).cloned()
    }

    pub fn list(&self) -> Vec<Move> {
        lock(&self.jobs).values().map(|j| j.status()).collect()
    }

    fn target(&self, place: &Place) -> Result<Target, MoveError> {
        let backend =
            self.backends.get(&place.backend).cloned().ok_or_else(|| {
                MoveError::Refused(format!("no backend named {:?}", place.backend))
            })?;
        Ok(Target {
            place: place.clone(),
            backend,
        })
    }

    /// Where the LUs of `s`'s pair are now, primary first.
    pub fn places(&self, s: &Subject<'_>) -> Result<Vec<Place>, MoveError> {
        let (def, _, _) = s
            .mgr
            .pair_layout(s.vlu)
            .map_err(|e| MoveError::Refused(e.to_string()))?;
        let routed = self.routed(s.home)?;
        Ok(def
            .lus()
            .into_iter()
            .map(|lu| routed.place(lu).place)
            .collect())
    }

    fn routed(&self, home: &str) -> Result<&Arc<Routed>, MoveError> {
        self.routed
            .get(home)
            .ok_or_else(|| MoveError::Refused(format!("no backend named {home:?}")))
    }

    /// Start moving `s` as `req` asks; `in_use` are the places of every virtual LU.
    pub fn start(
        &self,
        s: &Subject<'_>,
        req: &MoveRequest,
        in_use: &BTreeSet<Place>,
    ) -> Result<Arc<MoveJob>, MoveError> {
        if let Some(j) = self.job(s.name) {
            if lock(&j.phase).clone() == Phase::Copying {
                if j.to.first().map(|p| &p.backend) == Some(&req.to) {
                    if let Some(r) = req.rate {
                        j.rate.store(r, Ordering::Relaxed);
                    }
                    return Ok(j);
                }
                return Err(MoveError::Refused(format!(
                    "{} is already moving to {}; cancel that move first",
                    s.name, j.to[0]
                )));
            }
        }
        let plan = self.plan(s, req, in_use)?;
        let reason = format!("{} is moving to {}", s.name, plan.to[0].place);
        s.mgr.hold(s.vlu, Some(reason)).map_err(|e| {
            MoveError::Refused(format!(
                "{e}; a move needs the virtual LU Synchronized (delete its snapshot and wait for the resync first)"
            ))
        })?;
        match self.launch(s, plan, req.rate.unwrap_or(0)) {
            Ok(job) => Ok(job),
            Err(e) => {
                let _ = s.mgr.hold(s.vlu, None);
                Err(e)
            }
        }
    }

    fn launch(&self, s: &Subject<'_>, plan: Plan, rate: u64) -> Result<Arc<MoveJob>, MoveError> {
        let record = MoveRecord {
            vlu: s.name.to_string(),
            to: plan.to.iter().map(|t| t.place.clone()).collect(),
        };
        self.ledger
            .update(|pl| pl.moving = Some(record))
            .map_err(|e| MoveError::Placement(e.to_string()))?;
        let routed = self.routed(s.home)?.clone();
        let mirrors: Vec<Arc<Mirror>> = plan
            .from
            .iter()
            .zip(&plan.to)
            .map(|(f, t)| Arc::new(Mirror::new(f.clone(), t.clone())))
            .collect();
        for (lu, m) in plan.lus.iter().zip(&mirrors) {
            routed.begin_move(*lu, m.clone());
        }
        let job = Arc::new(MoveJob {
            vlu: s.name.to_string(),
            from: plan.from.iter().map(|t| t.place.clone()).collect(),
            to: plan.to.iter().map(|t| t.place.clone()).collect(),
            total: plan.capacity_lbas * SECTOR_SIZE,
            copied: AtomicU64::new(0),
            rate: AtomicU64::new(rate),
            cancel: AtomicBool::new(false),
            phase: Mutex::new(Phase::Copying),
            changed: Condvar::new(),
            started: Instant::now(),
            switch_ms: Mutex::new(None),
        });
        lock(&self.jobs).insert(s.name.to_string(), job.clone());
        tracing::info!(vlu = s.name, from = %job.from[0], to = %job.to[0], bytes = job.total, "move started");
        let run = Run {
            job: job.clone(),
            mgr: s.mgr.clone(),
            vlu: s.vlu,
            home: s.home.to_string(),
            lus: plan.lus,
            mirrors,
            routed,
            ledger: self.ledger.clone(),
        };
        std::thread::Builder::new()
            .name(format!("move-{}", s.name))
            .spawn(move || run.run())
            .map_err(|e| MoveError::Refused(format!("cannot start the copier: {e}")))?;
        Ok(job)
    }

    /// Stop the move of `vlu` and wait (a chunk's copy at most) until it has: it ends
    /// Cancelled with the data where it was (or Done, when the switch came first).
    pub fn cancel(&self, vlu: &str) -> Result<Arc<MoveJob>, MoveError> {
        let job = self
            .job(vlu)
            .filter(|j| *lock(&j.phase) == Phase::Copying)
            .ok_or_else(|| MoveError::NotMoving(vlu.to_string()))?;
        job.cancel.store(true, Ordering::SeqCst);
        job.wait(Duration::from_secs(60));
        Ok(job)
    }

    /// Work out the target places and check them.
    fn plan(
        &self,
        s: &Subject<'_>,
        req: &MoveRequest,
        in_use: &BTreeSet<Place>,
    ) -> Result<Plan, MoveError> {
        let refuse = |m: String| MoveError::Refused(format!("cannot move {}: {m}", s.name));
        let (def, capacity_lbas, save) = s
            .mgr
            .pair_layout(s.vlu)
            .map_err(|e| refuse(e.to_string()))?;
        if save.is_some() {
            return Err(refuse(
                "it has a save area (a pre-update array); moving one is not supported".into(),
            ));
        }
        let to_backend = self.backends.get(&req.to).ok_or_else(|| {
            refuse(format!(
                "no backend named {:?} (the config's backends: {})",
                req.to,
                self.backends.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let desc = to_backend
            .describe()
            .map_err(|e| refuse(format!("backend {}: {e}", req.to)))?;
        let lus = def.lus();
        let from: Vec<Target> = lus
            .iter()
            .map(|lu| self.routed(s.home).map(|r| r.place(*lu)))
            .collect::<Result<_, _>>()?;
        let target = choose_target(&desc.mirroring, req, &def, in_use, &from[0], &refuse)?;
        let cap = desc.capacity(target.primary()).unwrap_or(0);
        if cap < capacity_lbas {
            return Err(refuse(format!(
                "{target} on backend {} holds {cap} blocks; the virtual LU has {capacity_lbas}",
                req.to
            )));
        }
        let to: Vec<Target> = target
            .lus()
            .iter()
            .map(|lu| {
                self.target(&Place {
                    backend: req.to.clone(),
                    lu: lu.0,
                })
            })
            .collect::<Result<_, _>>()?;
        if from.iter().zip(&to).any(|(f, t)| f.place == t.place) {
            return Err(refuse(format!("it is already on {}", to[0].place)));
        }
        Ok(Plan {
            lus,
            from,
            to,
            capacity_lbas,
        })
    }
}

/// The mirroring definition of the target backend a move goes to: the one asked for
/// (`--lus`), or the first free one of the same kind as `def`.
fn choose_target<'d>(
    mirroring: &'d [MirrorDefinition],
    req: &MoveRequest,
    def: &MirrorDefinition,
    in_use: &BTreeSet<Place>,
    from: &Target,
    refuse: &dyn Fn(String) -> MoveError,
) -> Result<&'d MirrorDefinition, MoveError> {
    let fits = |d: &MirrorDefinition| {
        same_kind(d, def)
            && d.lus().iter().all(|lu| {
                !in_use.contains(&Place {
                    backend: req.to.clone(),
                    lu: lu.0,
                })
            })
    };
    let target = match req.lus {
        Some(p) => mirroring
            .iter()
            .find(|d| d.primary() == LuId(p))
            .ok_or_else(|| refuse(format!("backend {} has no mirroring definition whose primary LU is {p}", req.to)))?,
        None => mirroring.iter().find(|d| fits(d)).ok_or_else(|| {
            refuse(format!(
                "backend {} has no free mirroring definition of the same kind as {def} (its data is on {})",
                req.to, from.place
            ))
        })?,
    };
    if !fits(target) {
        return Err(refuse(format!(
            "{target} on backend {} is of another kind than {def}, or a virtual LU uses it",
            req.to
        )));
    }
    Ok(target)
}

/// A move worked out: home LUs and their old and new places, in the same order.
struct Plan {
    lus: Vec<LuId>,
    from: Vec<Target>,
    to: Vec<Target>,
    capacity_lbas: u64,
}

fn same_kind(a: &MirrorDefinition, b: &MirrorDefinition) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b) && a.lus().len() == b.lus().len()
}

/// A running copier.
struct Run {
    job: Arc<MoveJob>,
    mgr: Arc<Manager>,
    vlu: VirtualLuId,
    home: String,
    lus: Vec<LuId>,
    mirrors: Vec<Arc<Mirror>>,
    routed: Arc<Routed>,
    ledger: Arc<Ledger>,
}

/// A chunk read from the old place, its range still locked, on its way to the new one.
struct Chunk<'m> {
    held: RangeGuard<'m>,
    buf: Vec<u8>,
    lba: u64,
}

/// Why a copier stopped before the switch.
enum Stop {
    Cancelled,
    Failed(String),
}

impl Run {
    fn run(self) {
        let phase = match self.copy().and_then(|()| self.switch()) {
            Ok(()) => Phase::Done,
            Err(stop) => {
                self.revert();
                match stop {
                    Stop::Cancelled => Phase::Cancelled,
                    Stop::Failed(reason) => Phase::Failed(reason),
                }
            }
        };
        if let Err(e) = self.mgr.hold(self.vlu, None) {
            tracing::warn!(vlu = %self.job.vlu, error = %e, "move: releasing the snapshot hold failed");
        }
        tracing::info!(vlu = %self.job.vlu, ?phase, ms = self.job.started.elapsed().as_millis() as u64, "move ended");
        self.job.finish(phase);
    }

    fn check(&self) -> Result<(), Stop> {
        if self.job.cancel.load(Ordering::SeqCst) {
            return Err(Stop::Cancelled);
        }
        match self.mirrors.iter().find_map(|m| m.broken()) {
            Some(reason) => Err(Stop::Failed(reason)),
            None => Ok(()),
        }
    }

    /// Copy the mirror LU from its old place to its new one. This thread reads and a
    /// writer thread writes, with two chunks between them, so reading a chunk overlaps
    /// writing the one before; each chunk's range stays locked from its read until its
    /// write is done, so no client write to it can land in between.
    fn copy(&self) -> Result<(), Stop> {
        let m = &self.mirrors[0];
        let (full_tx, full_rx) = mpsc::sync_channel::<Chunk<'_>>(1);
        let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(2);
        for _ in 0..2 {
            let _ = empty_tx.send(vec![0u8; CHUNK as usize]);
        }
        let copied = std::thread::scope(|s| {
            let writer = s.spawn(move || self.write_chunks(m, full_rx, empty_tx));
            let read = self.read_chunks(m, full_tx, empty_rx);
            let written = writer
                .join()
                .unwrap_or_else(|_| Err(Stop::Failed("the copy's writer panicked".into())));
            // A writer's failure is the cause of the reader's stop: report it first.
            written.and(read)
        });
        copied?;
        for m in &self.mirrors {
            m.to.backend
                .flush(LuId(m.to.place.lu))
                .map_err(|e| Stop::Failed(format!("flushing {}: {e}", m.to.place)))?;
        }
        Ok(())
    }

    /// Lock and read each chunk in turn and hand it to the writer.
    fn read_chunks<'m>(
        &self,
        m: &'m Mirror,
        full: mpsc::SyncSender<Chunk<'m>>,
        empty: mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), Stop> {
        let total = self.job.total / SECTOR_SIZE;
        let step = CHUNK / SECTOR_SIZE;
        let mut lba = 0;
        while lba < total {
            self.check()?;
            // The writer stopped (it failed): its result says why.
            let Ok(mut buf) = empty.recv() else {
                return Ok(());
            };
            let n = (total - lba).min(step);
            buf.truncate((n * SECTOR_SIZE) as usize);
            let ext = Extent::new(lba, lba + n - 1).ok_or(Stop::Cancelled)?;
            let held = m.locks.lock(ext);
            m.from
                .backend
                .read(LuId(m.from.place.lu), lba, &mut buf)
                .map_err(|e| {
                    Stop::Failed(format!("reading {} at block {lba}: {e}", m.from.place))
                })?;
            if full.send(Chunk { held, buf, lba }).is_err() {
                return Ok(());
            }
            lba += n;
            self.throttle()?;
        }
        Ok(())
    }

    /// Write each chunk to the new place, then unlock it and count it.
    fn write_chunks(
        &self,
        m: &Mirror,
        full: mpsc::Receiver<Chunk<'_>>,
        empty: mpsc::SyncSender<Vec<u8>>,
    ) -> Result<(), Stop> {
        for Chunk { held, mut buf, lba } in full {
            m.to.backend
                .write(LuId(m.to.place.lu), lba, &buf, false)
                .map_err(|e| Stop::Failed(format!("writing {} at block {lba}: {e}", m.to.place)))?;
            drop(held);
            self.job
                .copied
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            buf.resize(CHUNK as usize, 0);
            let _ = empty.send(buf);
        }
        Ok(())
    }

    /// Sleep while the copy is ahead of its rate, watching for a cancel.
    fn throttle(&self) -> Result<(), Stop> {
        loop {
            let rate = self.job.rate.load(Ordering::Relaxed);
            if rate == 0 {
                return Ok(());
            }
            let due = self.job.copied.load(Ordering::Relaxed) as f64 / rate as f64;
            let ahead = due - self.job.started.elapsed().as_secs_f64();
            if ahead <= 0.0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_secs_f64(ahead.min(0.1)));
            self.check()?;
        }
    }

    /// With the pair quiesced: record the new places, then route every LU there.
    fn switch(&self) -> Result<(), Stop> {
        let t0 = Instant::now();
        let r = self
            .mgr
            .quiesced(self.vlu, || {
                self.check()?;
                let ids = self
                    .mirrors
                    .iter()
                    .map(|m| routed::identity_of(&m.to))
                    .collect();
                self.ledger
                    .update(|pl| {
                        for (lu, m) in self.lus.iter().zip(&self.mirrors) {
                            pl.route(&self.home, lu.0, m.to.place.clone());
                        }
                        pl.moving = None;
                        pl.identities.insert(self.job.vlu.clone(), ids);
                    })
                    .map_err(|e| Stop::Failed(format!("writing the placement file: {e}")))?;
                for (lu, m) in self.lus.iter().zip(&self.mirrors) {
                    self.routed.set(*lu, m.to.clone());
                }
                Ok(())
            })
            .map_err(|e| Stop::Failed(e.to_string()))?;
        *lock(&self.job.switch_ms) = Some(t0.elapsed().as_secs_f64() * 1e3);
        r
    }

    /// Route every LU back to its old place, where every write went.
    fn revert(&self) {
        for (lu, m) in self.lus.iter().zip(&self.mirrors) {
            self.routed.set(*lu, m.from.clone());
        }
        if let Err(e) = self.ledger.update(|pl| pl.moving = None) {
            tracing::warn!(vlu = %self.job.vlu, error = %e, "move: clearing the placement file's move failed; it is rolled back at the next start");
        }
    }
}

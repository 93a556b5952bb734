//! The resync service: copies back what the update-location tables recorded (Fig. 7) for
//! every pair in Re-synchronizing mode, while the database keeps writing; also what a
//! restart finds Re-synchronizing, so an interrupted resync goes on where it stopped.
//! It can be paused and rate-limited, and it flushes the journals' queued records about
//! once a second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hvm_core::{Mode, VirtualLuId, SECTOR_SIZE};

use crate::durable::FileJournal;
use crate::exports::Manager;

/// Shared controls of the service.
#[derive(Debug)]
pub struct ResyncControl {
    paused: AtomicBool,
    /// Bytes per second per backend; 0: unlimited.
    rate: AtomicU64,
    chunk_lbas: AtomicU64,
    stop: AtomicBool,
    wake: (Mutex<u64>, Condvar),
}

impl ResyncControl {
    pub fn new(chunk_bytes: u64, rate: u64) -> Self {
        ResyncControl {
            paused: AtomicBool::new(false),
            rate: AtomicU64::new(rate),
            chunk_lbas: AtomicU64::new((chunk_bytes / SECTOR_SIZE).max(1)),
            stop: AtomicBool::new(false),
            wake: (Mutex::new(0), Condvar::new()),
        }
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.wake();
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::SeqCst)
    }

    pub fn set_rate(&self, bytes_per_second: u64) {
        self.rate.store(bytes_per_second, Ordering::SeqCst);
        self.wake();
    }

    /// Bytes copied per resync step.
    pub fn chunk(&self) -> u64 {
        self.chunk_lbas.load(Ordering::SeqCst) * SECTOR_SIZE
    }

    pub fn set_chunk(&self, bytes: u64) {
        self.chunk_lbas
            .store((bytes / SECTOR_SIZE).max(1), Ordering::SeqCst);
    }

    /// Look for work now (a snapshot was just deleted).
    pub fn wake(&self) {
        let (m, c) = &self.wake;
        *m.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        c.notify_all();
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    fn sleep(&self, d: Duration) {
        let (m, c) = &self.wake;
        let g = m.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = *g;
        let _ = c
            .wait_timeout_while(g, d, |n| *n == seen)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// One backend as the service sees it.
pub struct Backend {
    pub name: String,
    pub mgr: Arc<Manager>,
    pub journal: Option<Arc<FileJournal>>,
}

fn origins(mgr: &Manager) -> Vec<VirtualLuId> {
    mgr.virtual_lus()
        .into_iter()
        .filter(|(vlu, key)| vlu == key)
        .map(|(vlu, _)| vlu)
        .collect()
}

/// Run until [`ResyncControl::stop`].
pub fn run(backends: &[Backend], ctl: &ResyncControl) {
    let mut last_sync = Instant::now();
    // Pairs whose last step failed, as (backend index, origin): logged once per streak.
    let mut failing: std::collections::BTreeSet<(usize, VirtualLuId)> = Default::default();
    while !ctl.stop.load(Ordering::SeqCst) {
        if last_sync.elapsed() >= Duration::from_secs(1) {
            for b in backends {
                if let Some(j) = &b.journal {
                    if let Err(e) = j.sync() {
                        tracing::error!(backend = %b.name, error = %e, "journal flush failed");
                    }
                }
            }
            last_sync = Instant::now();
        }
        if ctl.paused() {
            ctl.sleep(Duration::from_secs(1));
            continue;
        }
        let mut busy = false;
        for (i, b) in backends.iter().enumerate() {
            for vlu in origins(&b.mgr) {
                if b.mgr.mode(vlu) != Mode::Resynchronizing {
                    continue;
                }
                let started = Instant::now();
                let before = b.mgr.resync_progress(vlu).map(|p| p.copied).unwrap_or(0);
                match b
                    .mgr
                    .resync_step(vlu, ctl.chunk_lbas.load(Ordering::SeqCst))
                {
                    Ok(p) => {
                        failing.remove(&(i, vlu));
                        busy |= !p.done;
                        if p.done {
                            tracing::info!(backend = %b.name, vlu = vlu.0, copied_lbas = p.copied, skipped_lbas = p.skipped, "resync finished; Synchronized");
                        }
                        let bytes = p.copied.saturating_sub(before) * SECTOR_SIZE;
                        let rate = ctl.rate();
                        if rate > 0 && bytes > 0 {
                            let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
                            if let Some(wait) = due.checked_sub(started.elapsed()) {
                                ctl.sleep(wait);
                            }
                        }
                    }
                    Err(e) => {
                        // Logged once per failure streak; retried after a pause.
                        if failing.insert((i, vlu)) {
                            tracing::warn!(backend = %b.name, vlu = vlu.0, error = %e, "resync step failed; retrying");
                        }
                    }
                }
            }
        }
        if !busy {
            ctl.sleep(Duration::from_secs(1));
        }
    }
}

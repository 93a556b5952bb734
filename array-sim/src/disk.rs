//! Disk units: where LUs live, what load they carry, and how long they take.
//!
//! Each disk counts outstanding I/Os, operations and bytes. With a service-time model
//! (`iops`, `bandwidth_mb_s`) it serves one I/O at a time in arrival order, each taking
//! `1/iops + bytes/bandwidth`: a queue forms under load, and a busy disk is slower, which
//! is what the read distribution of [0034]/[0077] is for. Without a model it is
//! unthrottled.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::DiskConfig;

/// Counters of one disk unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    pub outstanding: u64,
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

#[derive(Debug)]
pub struct Disk {
    pub name: String,
    per_op: Option<Duration>,
    per_byte_ns: Option<f64>,
    /// When the disk is free to start the next I/O.
    free_at: Mutex<Instant>,
    outstanding: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

/// Held while an I/O is outstanding on a disk.
pub struct InFlight<'a>(&'a Disk);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Disk {
    pub fn new(cfg: &DiskConfig) -> Disk {
        Disk {
            name: cfg.name.clone(),
            per_op: cfg.iops.map(|iops| Duration::from_secs_f64(1.0 / iops)),
            per_byte_ns: cfg.bandwidth_mb_s.map(|mb| 1e9 / (mb * 1e6)),
            free_at: Mutex::new(Instant::now()),
            outstanding: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
        }
    }

    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// Start an I/O of `bytes`: counts it, and with a model waits for its turn and its
    /// service time. The caller does the transfer while holding the returned guard.
    pub fn begin(&self, write: bool, bytes: u64) -> InFlight<'_> {
        self.outstanding.fetch_add(1, Ordering::SeqCst);
        let guard = InFlight(self);
        if write {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.bytes_written.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
        }
        if self.per_op.is_some() || self.per_byte_ns.is_some() {
            let service = self.per_op.unwrap_or_default()
                + Duration::from_nanos(self.per_byte_ns.map_or(0.0, |ns| ns * bytes as f64) as u64);
            let done = {
                let mut free_at = self.free_at.lock().unwrap_or_else(|e| e.into_inner());
                let start = (*free_at).max(Instant::now());
                *free_at = start + service;
                *free_at
            };
            if let Some(wait) = done.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        guard
    }

    pub fn stats(&self) -> DiskStats {
        DiskStats {
            outstanding: self.outstanding(),
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_time_queues_io() {
        let d = Disk::new(&DiskConfig {
            name: "d".into(),
            iops: Some(1000.0),
            bandwidth_mb_s: None,
        });
        let t = Instant::now();
        for _ in 0..20 {
            drop(d.begin(false, 4096));
        }
        // 20 I/Os at 1 ms each take at least 20 ms.
        assert!(
            t.elapsed() >= Duration::from_millis(19),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(d.stats().reads, 20);
        assert_eq!(d.outstanding(), 0);
    }

    #[test]
    fn unthrottled_counts_only() {
        let d = Disk::new(&DiskConfig {
            name: "d".into(),
            iops: None,
            bandwidth_mb_s: None,
        });
        let g = d.begin(true, 512);
        assert_eq!(d.outstanding(), 1);
        drop(g);
        assert_eq!(d.stats().bytes_written, 512);
    }
}

//! A write gate: what makes a consistency group's snapshots one instant.
//!
//! Every write to a virtual LU passes through its gate. Closing the gates of a group holds
//! new writes at the gate and waits for the writes already past it to complete; with all
//! gates closed, no write has been acknowledged that is not in every snapshot of the group
//! and none is in flight, so acquiring them one by one gives a single instant across them.
//! A write completes before its client can send a write that depends on it, so the
//! dependent-write order a database relies on is kept. Writes hold the gate only for the
//! length of one request; the fast path is one atomic add and one atomic subtract.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Instant;

const CLOSED: u64 = 1 << 63;

#[derive(Default)]
pub struct Gate {
    /// The CLOSED bit and the number of writes past the gate.
    state: AtomicU64,
    lock: Mutex<()>,
    changed: Condvar,
}

/// A write past the gate; dropping it lets a waiting close go on.
pub struct Pass<'a>(&'a Gate);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let before = self.0.state.fetch_sub(1, Ordering::AcqRel);
        if before & CLOSED != 0 && before & !CLOSED == 1 {
            // The last write a closer waits for.
            let _g = self.0.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.0.changed.notify_all();
        }
    }
}

impl Gate {
    /// Pass the gate, waiting while it is closed.
    pub fn enter(&self) -> Pass<'_> {
        loop {
            let before = self.state.fetch_add(1, Ordering::AcqRel);
            if before & CLOSED == 0 {
                return Pass(self);
            }
            // Closed: step back (waking a closer if we were the last count) and wait.
            drop(Pass(self));
            let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            while self.state.load(Ordering::Acquire) & CLOSED != 0 {
                g = self.changed.wait(g).unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    /// Close the gate and wait, until `deadline`, for the writes past it to complete.
    /// False (and the gate open again) if they did not complete in time.
    pub fn close(&self, deadline: Instant) -> bool {
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
        let mut g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        while self.state.load(Ordering::Acquire) & !CLOSED != 0 {
            let now = Instant::now();
            if now >= deadline {
                drop(g);
                self.open();
                return false;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }

    /// Open the gate and let the held writes go.
    pub fn open(&self) {
        self.state.fetch_and(!CLOSED, Ordering::AcqRel);
        let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        self.changed.notify_all();
    }

    /// Writes past the gate now.
    pub fn in_flight(&self) -> u64 {
        self.state.load(Ordering::Acquire) & !CLOSED
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn close_waits_for_writes_in_flight_and_holds_new_ones() {
        let gate = Arc::new(Gate::default());
        let pass = gate.enter();
        assert_eq!(gate.in_flight(), 1);
        // One write in flight: the close times out and leaves the gate open.
        assert!(!gate.close(Instant::now() + Duration::from_millis(20)));
        drop(gate.enter());
        let g2 = gate.clone();
        let closer = std::thread::spawn(move || g2.close(Instant::now() + Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        drop(pass);
        assert!(closer.join().unwrap());
        // Closed: a writer waits until it opens.
        let passed = Arc::new(AtomicBool::new(false));
        let (g3, p3) = (gate.clone(), passed.clone());
        let writer = std::thread::spawn(move || {
            let _p = g3.enter();
            p3.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !passed.load(Ordering::SeqCst),
            "a write passed a closed gate"
        );
        gate.open();
        writer.join().unwrap();
        assert!(passed.load(Ordering::SeqCst));
        assert_eq!(gate.in_flight(), 0);
    }

    #[test]
    fn many_writers_and_closers_never_overlap() {
        let gate = Arc::new(Gate::default());
        let inside = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let (g, i, s) = (gate.clone(), inside.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !s.load(Ordering::SeqCst) {
                        let _p = g.enter();
                        i.fetch_add(1, Ordering::SeqCst);
                        i.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for _ in 0..200 {
            assert!(gate.close(Instant::now() + Duration::from_secs(10)));
            assert_eq!(
                inside.load(Ordering::SeqCst),
                0,
                "a write inside a closed gate"
            );
            gate.open();
        }
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
    }
}

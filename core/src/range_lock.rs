//! A lock on LBA ranges.
//!
//! Fig. 7's re-check (step 1004) only closes the race between a client write and the
//! resync's write-back if the two cannot interleave between the re-check and the
//! write-back: a write that deletes its range from the update-location table after the
//! re-check, and lands before the write-back, would be overwritten with stale data. Writes
//! and the resync's check-and-write-back therefore hold this lock on their LBAs. The
//! resync's read is done without it, as the patent's step 1003 is.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use crate::lba::Extent;

#[derive(Default)]
struct State {
    held: Vec<Extent>,
    waiters: usize,
}

/// Exclusive locks on overlapping LBA ranges; disjoint ranges do not wait for each other.
#[derive(Default)]
pub struct RangeLock {
    state: Mutex<State>,
    released: Condvar,
}

impl std::fmt::Debug for RangeLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeLock")
            .field("held", &self.state().held)
            .finish()
    }
}

/// Held until dropped.
#[must_use = "the range is unlocked when the guard is dropped"]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    extent: Extent,
}

impl RangeLock {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is a list of ranges; a panic elsewhere cannot leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wait until no held range overlaps `extent`, then hold it.
    pub fn lock(&self, extent: Extent) -> RangeGuard<'_> {
        let mut st = self.state();
        while st.held.iter().any(|h| h.overlaps(extent)) {
            st.waiters += 1;
            st = self
                .released
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
            st.waiters -= 1;
        }
        st.held.push(extent);
        RangeGuard { lock: self, extent }
    }

    /// Number of ranges held now.
    pub fn held(&self) -> usize {
        self.state().held.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.lock.state();
        if let Some(i) = st.held.iter().position(|h| *h == self.extent) {
            st.held.swap_remove(i);
        }
        // Waking costs a system call; only pay it when somebody waits.
        if st.waiters > 0 {
            self.lock.released.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    fn ext(f: u64, l: u64) -> Extent {
        Extent::new(f, l).unwrap()
    }

    #[test]
    fn disjoint_ranges_do_not_block() {
        let l = RangeLock::new();
        let _a = l.lock(ext(0, 7));
        let _b = l.lock(ext(8, 15));
        assert_eq!(l.held(), 2);
    }

    #[test]
    fn overlapping_range_waits_for_release() {
        let l = Arc::new(RangeLock::new());
        let g = l.lock(ext(0, 15));
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, got) = (l.clone(), got.clone());
            std::thread::spawn(move || {
                let _g = l.lock(ext(15, 20));
                got.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!got.load(Ordering::SeqCst), "overlapping lock was granted");
        drop(g);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        assert_eq!(l.held(), 0);
    }
}

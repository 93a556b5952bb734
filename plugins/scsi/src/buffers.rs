//! Buffers for READ data kept for the next READ, on both ends of array-sim's socket: a
//! reply's data is written whole by the read that fills it, so a buffer used before
//! needs neither the zero-filling nor the fresh pages (page faults, the kernel's
//! clearing) that a new allocation of megabytes costs on every read.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Buffers under this size are not kept: small replies cost little to allocate.
const SMALLEST: usize = 64 << 10;

/// At most `count` buffers of at most `largest` bytes each.
pub struct ReadBuffers {
    kept: Mutex<Vec<Vec<u8>>>,
    count: usize,
    largest: usize,
}

impl ReadBuffers {
    pub const fn new(count: usize, largest: usize) -> ReadBuffers {
        ReadBuffers {
            kept: Mutex::new(Vec::new()),
            count,
            largest,
        }
    }

    /// A buffer of `n` bytes for a read to overwrite whole (only what no earlier reply
    /// filled is zeroed).
    pub fn filled(&self, n: usize) -> Vec<u8> {
        let mut v = self.take(n);
        v.resize(n, 0);
        v
    }

    /// An empty buffer with room for `n` bytes, for `Read::read_to_end`.
    pub fn empty(&self, n: usize) -> Vec<u8> {
        let mut v = self.take(n);
        v.clear();
        v.reserve_exact(n);
        v
    }

    /// A kept buffer for `n` bytes if it is worth one; a small reply (a WRITE's, a
    /// status) gets a new one, so that replies which are never given back do not drain
    /// the kept ones.
    fn take(&self, n: usize) -> Vec<u8> {
        if n < SMALLEST {
            return Vec::with_capacity(n);
        }
        self.lock().pop().unwrap_or_default()
    }

    /// A buffer whose data was used, kept if there is room.
    pub fn give(&self, v: Vec<u8>) {
        if v.capacity() >= SMALLEST && v.capacity() <= self.largest {
            let mut kept = self.lock();
            if kept.len() < self.count {
                kept.push(v);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Vec<u8>>> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_within_bounds_and_sized_as_asked() {
        let b = ReadBuffers::new(2, 1 << 20);
        for n in [100 << 10, 200 << 10, 300 << 10] {
            let mut v = b.filled(n);
            assert_eq!(v.len(), n);
            v.fill(7);
            b.give(v);
        }
        // Too small, too large: not kept.
        b.give(Vec::with_capacity(1 << 10));
        b.give(Vec::with_capacity(2 << 20));
        assert_eq!(b.lock().len(), 1);
        b.give(vec![1; 128 << 10]);
        b.give(vec![1; 128 << 10]);
        assert_eq!(b.lock().len(), 2, "at most `count`");
        let v = b.empty(512 << 10);
        assert!(v.is_empty() && v.capacity() >= 512 << 10);
        assert_eq!(b.lock().len(), 1);
        // Small buffers are made afresh: the kept one stays.
        assert_eq!(b.filled(1000).len(), 1000);
        assert_eq!(b.empty(0).capacity(), 0);
        assert_eq!(b.lock().len(), 1);
    }
}

//! The copy's pipeline: one thread reads the snapshot range by range (at most a rate);
//! a bounded pool hashes, compresses and stores the pieces in parallel. At most
//! `2 × threads` pieces of [`EXTENT_MAX`] wait between the reader and the pool, so
//! memory stays bounded whatever the LU's size.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::extents::Stored;
use super::format::{is_zeros, Repo, EXTENT_MAX};

/// A token bucket: at most `bytes_per_s` on average, bursts of one piece.
pub struct Rate {
    bytes_per_s: u64,
    start: Instant,
    taken: u64,
}

impl Rate {
    /// `0`: unlimited.
    pub fn new(bytes_per_s: u64) -> Rate {
        Rate {
            bytes_per_s,
            start: Instant::now(),
            taken: 0,
        }
    }

    /// Account `n` bytes, sleeping first if they would exceed the rate.
    pub fn take(&mut self, n: u64) {
        if self.bytes_per_s == 0 {
            return;
        }
        // The bucket holds one extent: a burst of one piece is allowed.
        let allowed_at = self.taken.saturating_sub(EXTENT_MAX) as f64 / self.bytes_per_s as f64;
        let now = self.start.elapsed().as_secs_f64();
        if allowed_at > now {
            std::thread::sleep(Duration::from_secs_f64(allowed_at - now));
        }
        self.taken += n;
    }
}

/// Reads `buf.len()` bytes at an offset of the source.
pub type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), String> + 'a;

/// What the pipeline did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Sorted by offset.
    pub stored: Vec<Stored>,
    pub read_bytes: u64,
    /// Compressed bytes of new chunks.
    pub new_bytes: u64,
}

/// Threads for hashing and compressing: the machine's cores, at most 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

/// Read each `(offset, length)` of `ranges` with `read` and store it in `repo`; all-zero
/// pieces are stored as nothing. `progress` sees bytes read.
pub fn store_ranges(
    repo: &Repo,
    ranges: &[(u64, u64)],
    threads: usize,
    rate: &mut Rate,
    read: &mut ReadAt<'_>,
    progress: &mut dyn FnMut(u64),
) -> Result<Outcome, String> {
    let failed = AtomicBool::new(false);
    let (tx, rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(threads * 2);
    let rx = Arc::new(Mutex::new(rx));
    let (done_tx, done_rx) = mpsc::channel::<Result<(Stored, u64), String>>();
    // Buffers go back to the reader: at most the pipeline's pieces are ever allocated,
    // and a piece does not cost a fresh 4 MiB mapping (and its page faults).
    let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            let (rx, done_tx, free_tx, failed) =
                (rx.clone(), done_tx.clone(), free_tx.clone(), &failed);
            scope.spawn(move || loop {
                let next = rx.lock().map(|r| r.recv());
                let Ok(Ok((offset, data))) = next else { break };
                let r = store_one(repo, offset, &data);
                let _ = free_tx.send(data);
                if r.is_err() {
                    failed.store(true, Ordering::SeqCst);
                }
                if done_tx.send(r).is_err() {
                    break;
                }
            });
        }
        drop(done_tx);
        let mut read_bytes = 0u64;
        let mut result = Ok(());
        for &(offset, length) in ranges {
            if failed.load(Ordering::SeqCst) {
                break;
            }
            rate.take(length);
            let mut buf = free_rx.try_recv().unwrap_or_default();
            buf.resize(length as usize, 0);
            if let Err(e) = read(offset, &mut buf) {
                result = Err(format!("reading at {offset}: {e}"));
                break;
            }
            read_bytes += length;
            progress(read_bytes);
            if tx.send((offset, buf)).is_err() {
                break;
            }
        }
        drop(tx);
        let mut out = Outcome {
            read_bytes,
            ..Outcome::default()
        };
        for r in done_rx {
            match r {
                Ok((s, n)) => {
                    out.new_bytes += n;
                    out.stored.push(s);
                }
                Err(e) if result.is_ok() => result = Err(e),
                Err(_) => {}
            }
        }
        result?;
        out.stored.sort_unstable_by_key(|s| s.offset);
        Ok(out)
    })
}

fn store_one(repo: &Repo, offset: u64, data: &[u8]) -> Result<(Stored, u64), String> {
    let length = data.len() as u64;
    if is_zeros(data) {
        return Ok((
            Stored {
                offset,
                length,
                chunk: None,
            },
            0,
        ));
    }
    let (hash, n) = repo.put_chunk(data).map_err(|e| e.to_string())?;
    Ok((
        Stored {
            offset,
            length,
            chunk: Some(hash),
        },
        n,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backups::extents::pieces;
    use crate::backups::store::DirStore;

    #[test]
    fn pipeline_stores_every_piece_and_skips_zeros() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::create(Box::new(DirStore::open(d.path()).unwrap())).unwrap();
        let size = EXTENT_MAX * 3 + 4096;
        let image: Vec<u8> = (0..size)
            .map(|i| {
                if (EXTENT_MAX..2 * EXTENT_MAX).contains(&i) {
                    0
                } else {
                    (i % 251) as u8
                }
            })
            .collect();
        let out = store_ranges(
            &repo,
            &pieces(&[(0, size)], size),
            3,
            &mut Rate::new(0),
            &mut |o, b| {
                b.copy_from_slice(&image[o as usize..o as usize + b.len()]);
                Ok(())
            },
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(out.read_bytes, size);
        assert_eq!(out.stored.len(), 4);
        assert!(out.stored[1].chunk.is_none());
        let c = out.stored[3].chunk.as_ref().unwrap();
        assert_eq!(
            repo.get_chunk(c).unwrap(),
            &image[3 * EXTENT_MAX as usize..]
        );
        // A read error ends the copy with it.
        let e = store_ranges(
            &repo,
            &pieces(&[(0, size)], size),
            2,
            &mut Rate::new(0),
            &mut |o, _| if o > 0 { Err("gone".into()) } else { Ok(()) },
            &mut |_| {},
        )
        .unwrap_err();
        assert!(e.contains("gone"), "{e}");
    }

    #[test]
    fn the_rate_holds() {
        let mut r = Rate::new(EXTENT_MAX * 20);
        let t = Instant::now();
        for _ in 0..6 {
            r.take(EXTENT_MAX);
        }
        // The sixth waits until the four after the one-extent burst have had their
        // time at 20 per second: at least 0.2 s.
        assert!(
            t.elapsed() >= Duration::from_millis(195),
            "{:?}",
            t.elapsed()
        );
    }
}

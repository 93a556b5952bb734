//! The copy's pipeline: a few streams (each its own connection to the snapshot) take
//! the next pack of ranges, read it (at most a rate, all streams together), then hash,
//! compress and store it as one chunk. While one stream waits for the source, the
//! others compute: reads overlap each other and the hashing. Each stream holds one
//! piece of at most [`EXTENT_MAX`], so memory stays bounded whatever the LU's size.
//! The streams run at a low CPU priority: a backup gives way to the database.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::extents::{packs, Stored};
use super::format::{is_zeros, Repo, EXTENT_MAX};

/// A token bucket: at most `bytes_per_s` on average, bursts of one piece, counted from
/// the first piece taken (not from its making: opening the sources may take a while, and
/// that time must not become a burst).
pub struct Rate {
    bytes_per_s: u64,
    start: Option<Instant>,
    taken: u64,
}

impl Rate {
    /// `0`: unlimited.
    pub fn new(bytes_per_s: u64) -> Rate {
        Rate {
            bytes_per_s,
            start: None,
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
        let now = self
            .start
            .get_or_insert_with(Instant::now)
            .elapsed()
            .as_secs_f64();
        if allowed_at > now {
            std::thread::sleep(Duration::from_secs_f64(allowed_at - now));
        }
        self.taken += n;
    }
}

/// Reads the `(offset, length)` ranges of the source into the buffer, back to back (the
/// buffer is as long as they are together): one per stream. A reader may keep all of
/// them in flight at once.
pub type ReadAt<'a> = dyn FnMut(&[(u64, u64)], &mut [u8]) -> Result<(), String> + Send + 'a;

/// What the pipeline did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Sorted by offset.
    pub stored: Vec<Stored>,
    pub read_bytes: u64,
    /// Compressed bytes of new chunks.
    pub new_bytes: u64,
}

/// Threads for CPU-bound work on chunks (verify): the machine's cores, 2 to 8.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

/// Streams of a copy: three per core (a stream waiting for its read or its chunk write
/// leaves the core to another), 2 to 8. On the 2-core VM, 6 streams took a full
/// backup of 1 GiB in 0.96-1.04 s where 4 took 1.00-1.14 s (backup_product, two A/B pairs).
pub fn default_streams() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get() * 3)
        .unwrap_or(6)
        .clamp(2, 8)
}

/// Niceness of the copy's streams: the lowest CPU priority short of SCHED_IDLE, so a
/// backup host that is also a database host (or shares its cores) serves the database
/// first; an idle machine still gives the copy all its cores.
const NICE: libc::c_int = 19;

/// Lower the calling thread's CPU priority (Linux: a thread id is a `PRIO_PROCESS`
/// target of its own). Best effort: a refusal leaves the copy at normal priority.
fn background() {
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    unsafe {
        let tid = libc::gettid();
        if libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE) != 0 {
            tracing::debug!(
                "copy stream keeps its CPU priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// One pack's result: what it stored, bytes read, new compressed bytes.
type Done = Result<(Vec<Stored>, u64, u64), String>;

/// Read each `(offset, length)` of `ranges` (sorted, disjoint, as
/// [`super::extents::pieces`] makes them) and store it in `repo`, one stream per reader
/// of `readers`; short ranges are packed several to a chunk
/// ([`super::extents::packs`]), all-zero ranges are stored as nothing. `progress` sees
/// bytes read.
pub fn store_ranges(
    repo: &Repo,
    ranges: &[(u64, u64)],
    readers: Vec<Box<ReadAt<'_>>>,
    rate: &mut Rate,
    progress: &mut dyn FnMut(u64),
) -> Result<Outcome, String> {
    let work = packs(ranges);
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let rate = Mutex::new(rate);
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    std::thread::scope(|scope| {
        for mut read in readers {
            let tx = done_tx.clone();
            let (work, next, failed, rate) = (&work, &next, &failed, &rate);
            let stream = std::thread::Builder::new().name("backup-copy".into());
            let spawned = stream.spawn_scoped(scope, move || {
                background();
                let mut buf = Vec::new();
                while !failed.load(Ordering::SeqCst) {
                    let Some(pack) = work.get(next.fetch_add(1, Ordering::SeqCst)) else {
                        break;
                    };
                    let r = copy_pack(repo, pack, &mut buf, rate, &mut *read);
                    if r.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    if tx.send(r).is_err() {
                        break;
                    }
                }
            });
            if let Err(e) = spawned {
                failed.store(true, Ordering::SeqCst);
                let _ = done_tx.send(Err(format!("starting a copy stream: {e}")));
            }
        }
        drop(done_tx);
        collect(done_rx, progress)
    })
}

/// Gather the streams' results: the first error, or everything stored, sorted.
fn collect(done: mpsc::Receiver<Done>, progress: &mut dyn FnMut(u64)) -> Result<Outcome, String> {
    let mut out = Outcome::default();
    let mut result = Ok(());
    for r in done {
        match r {
            Ok((stored, read, new)) => {
                out.read_bytes += read;
                out.new_bytes += new;
                out.stored.extend(stored);
                progress(out.read_bytes);
            }
            Err(e) if result.is_ok() => result = Err(e),
            Err(_) => {}
        }
    }
    result?;
    out.stored.sort_unstable_by_key(|s| s.offset);
    Ok(out)
}

/// Read one pack's ranges into `buf` back to back and store them as one chunk.
fn copy_pack(
    repo: &Repo,
    pack: &[(u64, u64)],
    buf: &mut Vec<u8>,
    rate: &Mutex<&mut Rate>,
    read: &mut ReadAt<'_>,
) -> Done {
    let total: u64 = pack.iter().map(|r| r.1).sum();
    rate.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take(total);
    // The stream's buffer is reused: it grows to the largest pack once.
    buf.resize(total as usize, 0);
    read(pack, &mut buf[..]).map_err(|e| {
        let end = pack.last().map_or(0, |r| r.0 + r.1);
        format!("reading {}..{end}: {e}", pack[0].0)
    })?;
    let (stored, new) = store_pack(repo, pack, buf)?;
    Ok((stored, total, new))
}

/// Store the ranges of `pack`, read into `data` back to back: the ones not all zeros
/// moved together and stored as one chunk, each at its place in it.
fn store_pack(
    repo: &Repo,
    pack: &[(u64, u64)],
    data: &mut [u8],
) -> Result<(Vec<Stored>, u64), String> {
    let mut stored = Vec::with_capacity(pack.len());
    let mut kept = 0usize;
    let mut at = 0usize;
    for &(offset, length) in pack {
        let n = length as usize;
        let zeros = is_zeros(&data[at..at + n]);
        if !zeros {
            data.copy_within(at..at + n, kept);
        }
        stored.push(Stored {
            offset,
            length,
            chunk: (!zeros).then(String::new),
            skip: kept as u64,
        });
        if !zeros {
            kept += n;
        }
        at += n;
    }
    if kept == 0 {
        return Ok((stored, 0));
    }
    let (hash, new) = repo.put_chunk(&data[..kept]).map_err(|e| e.to_string())?;
    for s in &mut stored {
        match &mut s.chunk {
            Some(c) => c.clone_from(&hash),
            None => s.skip = 0,
        }
    }
    Ok((stored, new))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backups::extents::pieces;
    use crate::backups::store::DirStore;

    fn reader(image: &[u8]) -> Box<ReadAt<'_>> {
        Box::new(|ranges, b| {
            let mut at = 0;
            for &(o, n) in ranges {
                let (o, n) = (o as usize, n as usize);
                b[at..at + n].copy_from_slice(&image[o..o + n]);
                at += n;
            }
            assert_eq!(at, b.len());
            Ok(())
        })
    }

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
            vec![reader(&image), reader(&image), reader(&image)],
            &mut Rate::new(0),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(out.read_bytes, size);
        assert_eq!(out.stored.len(), 4);
        assert!(out.stored[1].chunk.is_none());
        repo.store().sync().unwrap();
        let c = out.stored[3].chunk.as_ref().unwrap();
        assert_eq!(
            repo.get_chunk(c).unwrap(),
            &image[3 * EXTENT_MAX as usize..]
        );
        // A read error ends the copy with it.
        let gone = || -> Box<ReadAt<'_>> {
            Box::new(|r, _| {
                if r[0].0 > 0 {
                    Err("gone".into())
                } else {
                    Ok(())
                }
            })
        };
        let e = store_ranges(
            &repo,
            &pieces(&[(0, size)], size),
            vec![gone(), gone()],
            &mut Rate::new(0),
            &mut |_| {},
        )
        .unwrap_err();
        assert!(e.contains("gone"), "{e}");
    }

    #[test]
    fn short_ranges_share_a_chunk_and_zeros_are_left_out() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::create(Box::new(DirStore::open(d.path()).unwrap())).unwrap();
        let size = 1u64 << 20;
        let mut image: Vec<u8> = (0..size).map(|i| (i % 253) as u8 | 1).collect();
        image[32768..36864].fill(0);
        // Every fourth 4 KiB block, the third all zeros.
        let ranges: Vec<(u64, u64)> = (0..64).map(|i| (i * 16384, 4096)).collect();
        let mut seen = 0;
        let out = store_ranges(
            &repo,
            &ranges,
            vec![reader(&image), reader(&image)],
            &mut Rate::new(0),
            &mut |n| seen = n,
        )
        .unwrap();
        assert_eq!((out.read_bytes, seen), (64 * 4096, 64 * 4096));
        repo.store().sync().unwrap();
        let chunks: std::collections::BTreeSet<_> =
            out.stored.iter().filter_map(|s| s.chunk.clone()).collect();
        assert_eq!(
            chunks.len(),
            (64 * 4096 / crate::backups::extents::PACK_MAX) as usize
        );
        for s in &out.stored {
            let want = &image[s.offset as usize..(s.offset + s.length) as usize];
            match &s.chunk {
                None => assert!(is_zeros(want) && s.offset == 32768, "{s:?}"),
                Some(c) => {
                    let data = repo.get_chunk(c).unwrap();
                    assert_eq!(&data[s.skip as usize..(s.skip + s.length) as usize], want);
                }
            }
        }
        assert_eq!(out.stored.len(), 64);
        assert!(out.stored.windows(2).all(|w| w[0].offset < w[1].offset));
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

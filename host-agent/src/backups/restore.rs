//! Restore: a virtual LU's image at one backup, rebuilt from its map window by window
//! (every chunk checked against its name as it is read), written to a file or block
//! device and read back, or onto the live virtual LU over NBD writing only the blocks
//! that differ.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use hvm_api::coord::Restored;
use sha2::{Digest, Sha256};

use super::format::{is_zeros, LuMap, Manifest, Repo, EXTENT_MAX};

/// Bytes produced per window.
const WINDOW: u64 = EXTENT_MAX;
/// Compare-and-write granularity of an in-place restore.
const BLOCK: usize = 64 << 10;

/// Takes one window of the image at its offset.
pub type Each<'a> = dyn FnMut(u64, &[u8]) -> Result<(), String> + 'a;

/// Produces the image: `each(offset, window)` for consecutive windows of `lu`.
pub fn windows(repo: &Repo, lu: &LuMap, each: &mut Each<'_>) -> Result<(), String> {
    let mut cache: Vec<(String, Vec<u8>)> = Vec::new();
    let mut next = 0usize;
    let mut buf = vec![0u8; WINDOW as usize];
    let mut at = 0u64;
    while at < lu.size {
        let n = (lu.size - at).min(WINDOW) as usize;
        let w = &mut buf[..n];
        w.fill(0);
        let end = at + n as u64;
        // Extents are sorted: skip those ending before the window.
        while next < lu.extents.len() && lu.extents[next].offset + lu.extents[next].length <= at {
            next += 1;
        }
        let mut i = next;
        while i < lu.extents.len() && lu.extents[i].offset < end {
            let e = &lu.extents[i];
            if !cache.iter().any(|(c, _)| c == &e.chunk) {
                let data = repo.get_chunk(&e.chunk).map_err(|x| x.to_string())?;
                if cache.len() >= 2 {
                    cache.remove(0);
                }
                cache.push((e.chunk.clone(), data));
            }
            let data = &cache
                .iter()
                .find(|(c, _)| c == &e.chunk)
                .map(|(_, d)| d)
                .ok_or("cache")?;
            let (s, t) = (e.offset.max(at), (e.offset + e.length).min(end));
            let from = (e.skip + s - e.offset) as usize;
            let len = (t - s) as usize;
            let src = data.get(from..from + len).ok_or_else(|| {
                format!(
                    "chunk {} is shorter than its extent at {} needs",
                    e.chunk, e.offset
                )
            })?;
            w[(s - at) as usize..(t - at) as usize].copy_from_slice(src);
            i += 1;
        }
        each(at, w)?;
        at = end;
    }
    Ok(())
}

/// The report of a restore of `lu` at backup `m` with the image's SHA-256.
fn restored(m: &Manifest, lu: &LuMap, sha256: String) -> Restored {
    Restored {
        backup: m.id.clone(),
        created: m.created.clone(),
        vlu: lu.vlu.clone(),
        size: lu.size,
        sha256,
        to: None,
        compared_bytes: None,
        written_bytes: None,
        medium: None,
        clients_stopped: None,
        fence: None,
    }
}

/// Write `lu` (of backup `m`)'s image to `to`: a regular file (created or replaced) or
/// a block device at least as large. Synced, evicted from the page cache, then read
/// back and compared by SHA-256.
pub fn to_path(
    repo: &Repo,
    m: &Manifest,
    lu: &LuMap,
    to: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Restored, String> {
    let io = |e: std::io::Error| format!("{}: {e}", to.display());
    let device = std::fs::metadata(to)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    let out = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(!device)
            .mode(0o600)
            .open(to)
            .map_err(io)?
    };
    if device {
        let mut f = &out;
        let size = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).map_err(io)?;
        if size < lu.size {
            return Err(format!(
                "{}: {size} bytes, the image has {}",
                to.display(),
                lu.size
            ));
        }
    } else {
        out.set_len(lu.size).map_err(io)?;
    }
    let mut hash = Sha256::new();
    windows(repo, lu, &mut |at, w| {
        hash.update(w);
        // A new file reads as zeros already: only a device gets its zeros written.
        if device || !is_zeros(w) {
            out.write_all_at(w, at).map_err(io)?;
        }
        progress(at + w.len() as u64, lu.size);
        Ok(())
    })?;
    out.sync_all().map_err(io)?;
    drop_cache(&out).map_err(io)?;
    let want = hex::encode(hash.finalize());
    let mut back = Sha256::new();
    let mut r = std::fs::File::open(to).map_err(io)?.take(lu.size);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        back.update(&buf[..n]);
    }
    let got = hex::encode(back.finalize());
    if got != want {
        return Err(format!(
            "{}: what was written reads back as SHA-256 {got}, not {want}",
            to.display()
        ));
    }
    Ok(Restored {
        to: Some(to.display().to_string()),
        ..restored(m, lu, want)
    })
}

/// Evict `f`'s (synced, so clean) pages from the page cache, so that reading it back
/// reads the medium, not the memory the write left behind.
pub fn drop_cache(f: &std::fs::File) -> std::io::Result<()> {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    posix_fadvise(f, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED).map_err(std::io::Error::from)
}

/// A live virtual LU to restore onto.
pub trait Target {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String>;
    fn flush(&mut self) -> Result<(), String>;
}

/// Make `target` equal to `lu` (of backup `m`)'s image: read each window of the live LU, write only
/// the blocks that differ, flush. Returns bytes compared and written, and the image's
/// SHA-256.
pub fn onto(
    repo: &Repo,
    m: &Manifest,
    lu: &LuMap,
    target: &mut dyn Target,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Restored, String> {
    let mut live = vec![0u8; WINDOW as usize];
    let mut written = 0u64;
    let mut hash = Sha256::new();
    windows(repo, lu, &mut |at, w| {
        hash.update(w);
        let l = &mut live[..w.len()];
        target.read(at, l)?;
        for (i, (want, have)) in w.chunks(BLOCK).zip(l.chunks(BLOCK)).enumerate() {
            if want != have {
                target.write(at + (i * BLOCK) as u64, want)?;
                written += want.len() as u64;
            }
        }
        progress(at + w.len() as u64, lu.size);
        Ok(())
    })?;
    target.flush()?;
    Ok(Restored {
        compared_bytes: Some(lu.size),
        written_bytes: Some(written),
        ..restored(m, lu, hex::encode(hash.finalize()))
    })
}

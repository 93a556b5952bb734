//! Where backups live: a [`Store`] of named objects. A directory today; an object store
//! (`s3://BUCKET/PREFIX`) is another implementation of the same trait.
//!
//! Keys are relative, `/`-separated names made of `[A-Za-z0-9._-]` parts (no empty part,
//! none starting with `.`). Every write is all-or-nothing: a reader sees the whole object
//! or no object, also after a crash. That is what lets the backup format write its chunks
//! first and its manifest last, so a half-written backup is never listed.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{location}: no object {key}")]
    NotFound { location: String, key: String },
    #[error("{location}: object key {key:?} is not a plain relative name")]
    BadKey { location: String, key: String },
    #[error("{location}: {key}: {source}")]
    Io {
        location: String,
        key: String,
        source: std::io::Error,
    },
    /// A remote store's error, already one line.
    #[error("{location}: {message}")]
    Remote { location: String, message: String },
}

/// Named objects, written whole.
pub trait Store: Send + Sync {
    /// Where this is, as a user would write it: a path or `s3://bucket/prefix`.
    fn location(&self) -> String;
    /// Write `key` whole, replacing any old object; durable once this returns.
    fn put(&self, key: &str, data: &[u8]) -> Result<(), StoreError>;
    /// Write `key` unless it exists (content-addressed chunks); `true` if written. Whole
    /// or absent; a store may keep it absent until the next [`Store::sync`], and it is
    /// durable only after that sync.
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool, StoreError> {
        if self.exists(key)? {
            return Ok(false);
        }
        self.put(key, data)?;
        Ok(true)
    }
    /// Make every `put_if_absent` so far present and durable (a store whose writes are
    /// durable at once has nothing to do).
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Remove what the writes of processes that died left behind (staged files that
    /// never got their sync); how many. A store without such files has nothing to do.
    fn sweep(&self) -> Result<u64, StoreError> {
        Ok(0)
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError>;
    fn exists(&self, key: &str) -> Result<bool, StoreError>;
    /// The stored size of `key` in bytes, without reading it where the store can.
    fn size(&self, key: &str) -> Result<u64, StoreError> {
        self.get(key).map(|d| d.len() as u64)
    }
    /// Every key that starts with `prefix`, sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Remove `key`; removing what is not there is not an error.
    fn delete(&self, key: &str) -> Result<(), StoreError>;
}

/// The store a user names: `s3://BUCKET/PREFIX`, or a directory path (created if
/// missing).
pub fn open(url_or_path: &str) -> Result<Box<dyn Store>, StoreError> {
    if url_or_path.starts_with("s3://") {
        return Err(StoreError::Remote {
            location: url_or_path.to_string(),
            message: "S3 targets are not supported here: open them with backups::open".into(),
        });
    }
    if let Some((scheme, _)) = url_or_path.split_once("://") {
        return Err(StoreError::Remote {
            location: url_or_path.to_string(),
            message: format!(
                "unknown store scheme {scheme}:// (a directory path or s3://BUCKET/PREFIX)"
            ),
        });
    }
    Ok(Box::new(DirStore::open(Path::new(url_or_path))?))
}

/// Sync the directory `path` is in, so its name survives a crash.
/// A plain relative key, checked before it is joined to anything.
pub fn check_key(location: &str, key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.len() <= 1024
        && key.split('/').all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadKey {
            location: location.to_string(),
            key: key.to_string(),
        })
    }
}

/// A directory on the backup host. Objects are files (0600) under it. `put` writes a
/// synced temporary file beside the object and renames it into place, then syncs the
/// directory. `put_if_absent` (chunks) only stages: it writes a temporary file, not
/// synced, and asks the kernel to start writing it back; the next [`Store::sync`] makes
/// every staged file durable at once (`syncfs`), then links each into place (a link
/// never replaces) and makes the links durable (`syncfs` again). So a chunk's name never
/// exists before its data is on disk: a crash cannot leave a named chunk with lost data
/// for a later backup to share. Staged files are placed early once [`STAGE_FILES`] or
/// [`STAGE_BYTES`] wait; a store dropped without `sync` removes its staged files.
pub struct DirStore {
    root: PathBuf,
    staged: Mutex<Staged>,
}

/// At most this many staged chunk files wait for the next sync.
pub const STAGE_FILES: usize = 4096;
/// At most this many staged bytes wait for the next sync.
pub const STAGE_BYTES: u64 = 1 << 30;

/// Chunk files written but not yet in place: the object's path and its temporary file.
#[derive(Default)]
struct Staged {
    files: BTreeMap<PathBuf, PathBuf>,
    bytes: u64,
}

impl DirStore {
    /// `root` is created (0700) if missing.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .map_err(|source| StoreError::Io {
                location: root.display().to_string(),
                key: String::new(),
                source,
            })?;
        Ok(DirStore {
            root: root.to_path_buf(),
            staged: Mutex::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(&self.location(), key)?;
        Ok(self.root.join(key))
    }

    fn io(&self, key: &str, source: std::io::Error) -> StoreError {
        if source.kind() == ErrorKind::NotFound {
            StoreError::NotFound {
                location: self.location(),
                key: key.to_string(),
            }
        } else {
            StoreError::Io {
                location: self.location(),
                key: key.to_string(),
                source,
            }
        }
    }

    fn lock_staged(&self) -> std::sync::MutexGuard<'_, Staged> {
        self.staged.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Make the staged files durable, link them into place, make the links durable.
    fn place(&self, staged: &mut Staged) -> Result<(), StoreError> {
        if staged.files.is_empty() {
            return Ok(());
        }
        let fail = |what: &str, e: std::io::Error| self.io(what, e);
        let root = File::open(&self.root).map_err(|e| fail("", e))?;
        nix::unistd::syncfs(&root).map_err(|e| fail("syncfs", e.into()))?;
        for (p, tmp) in std::mem::take(&mut staged.files) {
            let linked = match fs::hard_link(&tmp, &p) {
                Err(e) if e.kind() != ErrorKind::AlreadyExists => Err(e),
                _ => Ok(()),
            };
            let _ = fs::remove_file(&tmp);
            linked.map_err(|e| fail(&p.display().to_string(), e))?;
        }
        staged.bytes = 0;
        nix::unistd::syncfs(&root).map_err(|e| fail("syncfs", e.into()))
    }

    fn walk(&self, dir: &Path, rel: &str, out: &mut Vec<String>) -> std::io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // temporary files of writes in progress
            }
            let key = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if e.file_type()?.is_dir() {
                self.walk(&e.path(), &key, out)?;
            } else {
                out.push(key);
            }
        }
        Ok(())
    }
}

impl Store for DirStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        let p = self.path(key)?;
        crate::files::replace_file(&p, data).map_err(|e| self.io(key, e))
    }

    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool, StoreError> {
        let p = self.path(key)?;
        // No stat of `p` (the repository looks before it compresses): the link in
        // `place` never replaces, so two writers of one name (the same content) race
        // safely.
        if self.lock_staged().files.contains_key(&p) {
            return Ok(false);
        }
        let tmp = write_staged(&p, data).map_err(|e| self.io(key, e))?;
        let mut staged = self.lock_staged();
        if staged.files.contains_key(&p) {
            drop(staged);
            let _ = fs::remove_file(&tmp);
            return Ok(false);
        }
        staged.files.insert(p, tmp);
        staged.bytes += data.len() as u64;
        if staged.files.len() >= STAGE_FILES || staged.bytes >= STAGE_BYTES {
            self.place(&mut staged)?;
        }
        Ok(true)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.place(&mut self.lock_staged())
    }

    fn sweep(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        sweep_dir(&self.root, &mut n).map_err(|e| self.io("sweep", e))?;
        Ok(n)
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let p = self.path(key)?;
        fs::read(p).map_err(|e| self.io(key, e))
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let p = self.path(key)?;
        match fs::symlink_metadata(p) {
            Ok(m) => Ok(m.is_file()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(self.io(key, e)),
        }
    }

    fn size(&self, key: &str) -> Result<u64, StoreError> {
        let p = self.path(key)?;
        fs::metadata(p)
            .map(|m| m.len())
            .map_err(|e| self.io(key, e))
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        // Walk only the directory the prefix names up to its last `/` (`chunks/`
        // lists the chunks, not the manifests too).
        let dir = match prefix.rsplit_once('/') {
            Some((d, _)) if check_key(&self.location(), d).is_ok() => d,
            _ => "",
        };
        self.walk(&self.root.join(dir), dir, &mut out)
            .map_err(|e| self.io(prefix, e))?;
        out.retain(|k| k.starts_with(prefix));
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let p = self.path(key)?;
        match fs::remove_file(p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(key, e)),
        }
    }
}

impl Drop for DirStore {
    /// A copy that failed before its sync leaves no staged file behind.
    fn drop(&mut self) {
        for tmp in self.lock_staged().files.values() {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Alignment of the memory, offset and length of a direct (`O_DIRECT`) write.
pub const DIRECT_ALIGN: usize = 4096;

/// Write `data` to a new temporary file beside `path` (`.NAME.PID.N.staged`), not
/// synced; the temporary file's path. When `data` starts at a [`DIRECT_ALIGN`] address,
/// its whole blocks are written with `O_DIRECT`, straight from that memory to the disk:
/// a backup's chunks are not read again soon, and copying them into the page cache
/// cost more CPU than compressing them (a virtual machine's first touch of each page
/// frame). The tail (less than a block) and data at other addresses go through the page
/// cache, their write-back started at once. Either way nothing is durable before the
/// store's `syncfs` (`O_DIRECT` skips the cache, not the disk's cache or the file's
/// metadata). A filesystem that refuses `O_DIRECT` gets the buffered write.
fn write_staged(path: &Path, data: &[u8]) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::FileExt;
    crate::files::write_beside(path, "staged", |tmp| {
        let blocks = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        let aligned = blocks > 0 && (data.as_ptr() as usize) % DIRECT_ALIGN == 0;
        let (f, direct) = open_staged(tmp, aligned)?;
        let mut done = 0;
        if direct {
            match f.write_all_at(&data[..blocks], 0) {
                Ok(()) => done = blocks,
                // Refused here after all: the whole file through the page cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
            nix::fcntl::fcntl(
                &f,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
            )?;
        }
        if done < data.len() {
            f.write_all_at(&data[done..], done as u64)?;
            start_writeback(&f);
        }
        Ok(())
    })
}

/// Create the staged file, with `O_DIRECT` if `direct` and the filesystem takes it; the
/// file and whether it is direct.
fn open_staged(tmp: &Path, direct: bool) -> std::io::Result<(File, bool)> {
    if direct {
        match crate::files::create_new(tmp, libc::O_DIRECT) {
            Ok(f) => return Ok((f, true)),
            // A filesystem without O_DIRECT may have made the file before refusing.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let _ = fs::remove_file(tmp);
            }
            Err(e) => return Err(e),
        }
    }
    Ok((crate::files::create_new(tmp, 0)?, false))
}

/// Remove, under `dir`, the staged files (`.NAME.PID.N.staged`) of processes that no
/// longer run; a live process's (this one's included) are its copy in progress. A PID
/// reused since only keeps a dead file longer, never removes a live one.
fn sweep_dir(dir: &Path, n: &mut u64) -> std::io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        if e.file_type()?.is_dir() {
            sweep_dir(&e.path(), n)?;
        } else if staged_by_dead_process(&e.file_name().to_string_lossy()) {
            fs::remove_file(e.path())?;
            *n += 1;
        }
    }
    Ok(())
}

/// True for a staged file's name whose writer's PID runs no process.
fn staged_by_dead_process(name: &str) -> bool {
    if !name.starts_with('.') {
        return false;
    }
    let mut parts = name.rsplitn(4, '.');
    let (Some("staged"), Some(_), Some(pid)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    match pid.parse::<u32>() {
        Ok(pid) => !Path::new("/proc").join(pid.to_string()).exists(),
        Err(_) => false,
    }
}

/// Ask the kernel to start writing `f` back now, without waiting, so the sync at the end
/// of a backup finds little left to write. Advice only: an error changes nothing.
fn start_writeback(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range reads no memory of ours; the descriptor is open.
    let _ = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    /// Data at a block-aligned address goes to disk directly, its tail through the page
    /// cache; at any other address all of it through the cache. Either way the object
    /// is exactly the data, and it has no name before the sync.
    #[test]
    fn staged_writes_direct_or_not_hold_exactly_the_data() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(d.path()).unwrap();
        let mut mem = vec![0u8; 3 * DIRECT_ALIGN + 100 + DIRECT_ALIGN];
        let at = mem.as_ptr().align_offset(DIRECT_ALIGN);
        for (i, b) in mem.iter_mut().enumerate() {
            *b = (i % 253) as u8;
        }
        let cases = [
            ("aligned-with-tail", &mem[at..at + 3 * DIRECT_ALIGN + 100]),
            ("aligned-whole", &mem[at..at + 2 * DIRECT_ALIGN]),
            ("aligned-short", &mem[at..at + 100]),
            ("unaligned", &mem[at + 1..at + 1 + 2 * DIRECT_ALIGN + 7]),
        ];
        for (name, data) in cases {
            let key = format!("chunks/ab/{name}");
            assert!(s.put_if_absent(&key, data).unwrap());
            assert!(!s.exists(&key).unwrap(), "{name} named before the sync");
        }
        s.sync().unwrap();
        for (name, data) in cases {
            assert!(
                s.get(&format!("chunks/ab/{name}")).unwrap() == data,
                "{name}"
            );
        }
        // Nothing staged is left beside them.
        let left: Vec<_> = fs::read_dir(d.path().join("chunks/ab"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn sweep_removes_only_the_staged_files_of_dead_processes() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(d.path()).unwrap();
        // A copy in progress in this process: its staged file stays.
        assert!(s.put_if_absent("chunks/ab/live", b"x").unwrap());
        // A crashed copy's: PID 0 is no process's (/proc/0 does not exist).
        let dead = d.path().join("chunks/ab/.dead.0.7.staged");
        fs::write(&dead, b"y").unwrap();
        // Not staged files: kept.
        fs::write(d.path().join("chunks/ab/.other.0.tmp"), b"z").unwrap();
        assert_eq!(s.sweep().unwrap(), 1);
        assert!(!dead.exists());
        assert!(d.path().join("chunks/ab/.other.0.tmp").exists());
        s.sync().unwrap();
        assert_eq!(s.get("chunks/ab/live").unwrap(), b"x");
    }
    use super::*;

    #[test]
    fn directory_store_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(&d.path().join("repo")).unwrap();
        s.put("backups/b1/manifest.json", b"{}").unwrap();
        assert!(s.put_if_absent("chunks/ab/abcd", b"x").unwrap());
        assert!(!s.put_if_absent("chunks/ab/abcd", b"y").unwrap());
        // Staged: no name until the sync has made the data durable.
        assert!(!s.exists("chunks/ab/abcd").unwrap());
        assert!(s.list("").unwrap() == vec!["backups/b1/manifest.json"]);
        s.sync().unwrap();
        assert_eq!(s.get("chunks/ab/abcd").unwrap(), b"x");
        assert_eq!(s.size("chunks/ab/abcd").unwrap(), 1);
        // Present now: a second writer's link finds the name taken, and no temporary
        // file stays behind.
        assert!(s.put_if_absent("chunks/ab/abcd", b"z").unwrap());
        s.sync().unwrap();
        assert_eq!(s.get("chunks/ab/abcd").unwrap(), b"x");
        let left: Vec<_> = fs::read_dir(s.root().join("chunks/ab"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec!["abcd"]);
        assert_eq!(
            s.list("").unwrap(),
            vec!["backups/b1/manifest.json", "chunks/ab/abcd"]
        );
        assert_eq!(s.list("chunks/").unwrap(), vec!["chunks/ab/abcd"]);
        s.delete("chunks/ab/abcd").unwrap();
        s.delete("chunks/ab/abcd").unwrap();
        assert!(matches!(
            s.get("chunks/ab/abcd"),
            Err(StoreError::NotFound { .. })
        ));
        assert!(!s.exists("chunks/ab/abcd").unwrap());
    }

    #[test]
    fn a_store_dropped_before_its_sync_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(d.path()).unwrap();
        for i in 0..3 {
            assert!(s.put_if_absent(&format!("chunks/a{i}/x"), b"data").unwrap());
        }
        drop(s);
        for i in 0..3 {
            let dir = d.path().join(format!("chunks/a{i}"));
            assert_eq!(fs::read_dir(dir).unwrap().count(), 0);
        }
    }

    #[test]
    fn keys_must_be_plain() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(d.path()).unwrap();
        for bad in ["", "/abs", "a/../b", "a//b", ".hidden", "a/.tmp", "sp ace"] {
            assert!(
                matches!(s.put(bad, b""), Err(StoreError::BadKey { .. })),
                "{bad:?}"
            );
        }
    }
}

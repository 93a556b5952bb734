//! Whole-file writes that a crash leaves old or new, never half: the data goes to a
//! temporary file beside the target (0600, in a directory made 0700 if missing), synced
//! and renamed into place, then the directory synced. Used for the backup repository's
//! objects, the placement file and the backup policy's state; the repository's chunks
//! use the same temporary files unsynced (`write_beside`) and sync them in one go.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Replace `path` with `data` atomically and durably.
pub fn replace_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = write_beside(path, "tmp", |tmp| {
        let mut f = create_new(tmp, 0)?;
        f.write_all(data)?;
        f.sync_all()
    })?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_parent(path)
}

/// Sync the directory that holds `path`, so a rename or link into it is durable.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    File::open(parent(path))?.sync_all()
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Make a new temporary file `.NAME.PID.N.SUFFIX` beside `path` (its directory made 0700
/// if missing) with `write`, which creates it ([`create_new`]) and fills it, and return
/// its path; on any failure the temporary file is gone. Unique per write: two threads may
/// write one name at once.
pub fn write_beside(
    path: &Path,
    suffix: &str,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<PathBuf> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let dir = parent(path);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.{suffix}", std::process::id()));
    match write(&tmp) {
        Ok(()) => Ok(tmp),
        Err(e) => {
            // A full disk must not keep the half-written file.
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Create `tmp`, which must not exist, for writing (0600), with open `flags` (`O_DIRECT`,
/// or 0).
pub fn create_new(tmp: &Path, flags: i32) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(flags)
        .open(tmp)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/state.json");
        replace_file(&p, b"one").unwrap();
        replace_file(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}

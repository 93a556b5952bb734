//! Whole-file writes that a crash leaves old or new, never half: the data goes to a synced
//! temporary file beside the target (0600, in a directory made 0700 if missing), which is
//! then renamed (or linked) into place and the directory synced. Used for the backup
//! repository's objects, the placement file and the backup policy's state.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Replace `path` with `data` atomically and durably.
pub fn replace_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_synced_then(path, data, |tmp, p| fs::rename(tmp, p))?;
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

/// Write `data` to a synced temporary file beside `path` and hand it to `place`
/// (rename or link); the temporary name is gone afterwards.
pub fn write_synced_then<T>(
    path: &Path,
    data: &[u8],
    place: impl FnOnce(&Path, &Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let dir = parent(path);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    // Unique per write: two threads may put the same chunk at once.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        place(&tmp, path)
    })();
    // A full disk must not keep the half-written file; after a link, the temporary
    // name goes too.
    let _ = fs::remove_file(&tmp);
    written
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

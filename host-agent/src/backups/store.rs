//! Where backups live: a [`Store`] of named objects. A directory today; an object store
//! (`s3://BUCKET/PREFIX`) is another implementation of the same trait.
//!
//! Keys are relative, `/`-separated names made of `[A-Za-z0-9._-]` parts (no empty part,
//! none starting with `.`). Every write is all-or-nothing: a reader sees the whole object
//! or no object, also after a crash. That is what lets the backup format write its chunks
//! first and its manifest last, so a half-written backup is never listed.

use std::collections::BTreeSet;
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
    /// or absent at once, but durable only after the next [`Store::sync`] (or `put`).
    fn put_if_absent(&self, key: &str, data: &[u8]) -> Result<bool, StoreError> {
        if self.exists(key)? {
            return Ok(false);
        }
        self.put(key, data)?;
        Ok(true)
    }
    /// Make every `put_if_absent` so far durable (a store whose writes are durable at
    /// once has nothing to do).
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
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

/// A directory on the backup host. Objects are files (0600) under it; a write goes to a
/// temporary file that is synced and renamed (`put`) or linked if the name is free
/// (`put_if_absent`), then the directory is synced: at once for `put`, at the next
/// [`Store::sync`] for `put_if_absent` (one fsync per directory, not per chunk).
pub struct DirStore {
    root: PathBuf,
    /// Directories with links not yet synced.
    unsynced: Mutex<BTreeSet<PathBuf>>,
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
            unsynced: Mutex::default(),
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
        // No stat first (the repository looks before it compresses): a link never
        // replaces, so two writers of one name (the same content) race safely.
        let linked =
            crate::files::write_synced_then(&p, data, |tmp, p| match fs::hard_link(tmp, p) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            })
            .map_err(|e| self.io(key, e))?;
        if linked {
            if let Some(dir) = p.parent() {
                let mut u = self.unsynced.lock().unwrap_or_else(PoisonError::into_inner);
                u.insert(dir.to_path_buf());
            }
        }
        Ok(linked)
    }

    fn sync(&self) -> Result<(), StoreError> {
        let linked =
            std::mem::take(&mut *self.unsynced.lock().unwrap_or_else(PoisonError::into_inner));
        // Their parents up to the root too: a first link may have created them.
        let mut dirs = BTreeSet::new();
        for d in &linked {
            dirs.extend(d.ancestors().take_while(|a| a.starts_with(&self.root)));
        }
        for dir in dirs {
            File::open(dir)
                .and_then(|f| f.sync_all())
                .map_err(|e| self.io(&dir.display().to_string(), e))?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn directory_store_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let s = DirStore::open(&d.path().join("repo")).unwrap();
        s.put("backups/b1/manifest.json", b"{}").unwrap();
        assert!(s.put_if_absent("chunks/ab/abcd", b"x").unwrap());
        assert!(!s.put_if_absent("chunks/ab/abcd", b"y").unwrap());
        assert_eq!(s.get("chunks/ab/abcd").unwrap(), b"x");
        assert_eq!(s.size("chunks/ab/abcd").unwrap(), 1);
        s.sync().unwrap();
        // The temporary files are gone, also after a link that found the name taken.
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

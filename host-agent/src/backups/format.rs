//! The repository format, `hvm-backup/3`: what a repository on a [`Store`] holds.
//!
//! ```text
//! hvm-repository.json            {"format": "hvm-backup/3", "compression": "zstd", "hash": "blake3"}
//! chunks/<aa>/<blake3>           one zstd frame; the name is the BLAKE3 of the uncompressed data
//! backups/<id>/manifest.json     written last: a backup without a manifest does not exist
//! ```
//!
//! `hvm-backup/2` is the same with SHA-256 names (`"hash": "sha256"`): such a repository
//! is still read, verified, restored, pruned and backed up into (with SHA-256, so that
//! equal data keeps one name there); new repositories are `hvm-backup/3`, whose hash
//! costs a fraction of SHA-256's (the copy hashes every byte it stores).
//!
//! A manifest holds each virtual LU's complete map at that point: sorted, disjoint
//! extents `{offset, length, chunk, skip}` (the extent's bytes are the chunk's
//! uncompressed bytes `skip..skip+length`); every byte no extent covers is zero. An
//! incremental backup copies only the changed ranges, but its manifest starts from its
//! parent's map with those ranges replaced, so restoring any point reads one manifest,
//! and deleting any backup never breaks another (chunks are shared by name and are
//! removed only when no manifest names them). `parent` records the lineage.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::store::{Store, StoreError};

/// The format of new repositories (BLAKE3 chunk names).
pub const FORMAT: &str = "hvm-backup/3";
/// The format before it (SHA-256 chunk names), still read and written into.
pub const FORMAT_V2: &str = "hvm-backup/2";
pub const MARKER: &str = "hvm-repository.json";
/// Longest extent, and so the largest chunk (uncompressed).
pub const EXTENT_MAX: u64 = 4 << 20;
/// zstd level: -1, the first of zstd's fast (negative) levels. A backup is bound by
/// the copy's CPU, and at level 1 zstd was its largest cost (half of the copy streams'
/// CPU in `perf`: match finding and Huffman-coding literals that are often random);
/// -1 stores literals as they are, which on the benchmark's data (half random, half
/// repeated text) compresses as well at about 1.7x the speed, and on other data (a
/// machine's shared libraries) stores about 15 % more bytes. Any level makes a plain
/// zstd frame: `zstd -dc` reads it.
pub const LEVEL: i32 = -1;

/// What names a repository's chunks: the hash of their uncompressed data, as lowercase
/// hex. Fixed per repository by its marker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hash {
    /// `hvm-backup/2`.
    Sha256,
    /// `hvm-backup/3`.
    Blake3,
}

impl Hash {
    /// The marker's `"hash"`.
    pub fn name(self) -> &'static str {
        match self {
            Hash::Sha256 => "sha256",
            Hash::Blake3 => "blake3",
        }
    }

    /// The repository format that names chunks with this hash.
    pub fn format(self) -> &'static str {
        match self {
            Hash::Sha256 => FORMAT_V2,
            Hash::Blake3 => FORMAT,
        }
    }

    /// The hash of `data`, lowercase hex.
    pub fn of(self, data: &[u8]) -> String {
        match self {
            Hash::Sha256 => sha256(data),
            Hash::Blake3 => blake3(data),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Full,
    Incremental,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Full => "full",
            Kind::Incremental => "incremental",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// The repository's hash (BLAKE3, or SHA-256 in `hvm-backup/2`), hex, of the
    /// chunk's uncompressed data.
    pub chunk: String,
    /// Where in the chunk's uncompressed data this extent starts.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skip: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LuMap {
    pub vlu: String,
    pub size: u64,
    pub kind: Kind,
    /// The backup whose map this one started from (incremental).
    #[serde(default)]
    pub base: Option<String>,
    /// Where the data was read from.
    pub source: String,
    /// Bytes read from the snapshot for this backup.
    pub copied_bytes: u64,
    /// Bytes written since the base, as the database host's tracking reported them.
    #[serde(default)]
    pub written_bytes: Option<u64>,
    /// Why this is a full copy when an incremental one was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long the copy took.
    #[serde(default)]
    pub seconds: f64,
    pub extents: Vec<Extent>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileRef {
    pub name: String,
    pub size: u64,
    pub chunk: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub id: String,
    pub created: String,
    pub created_unix_ms: u64,
    pub kind: Kind,
    #[serde(default)]
    pub parent: Option<String>,
    /// What the console passed on: database host, instant, freeze window.
    #[serde(default)]
    pub info: Value,
    pub lus: Vec<LuMap>,
    #[serde(default)]
    pub files: Vec<FileRef>,
    /// Compressed bytes of the chunks this backup added to the repository.
    pub stored_bytes: u64,
}

impl Manifest {
    pub fn lu(&self, vlu: &str) -> Option<&LuMap> {
        self.lus.iter().find(|l| l.vlu == vlu)
    }

    /// Every chunk it names, sorted, once each.
    pub fn chunks(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .lus
            .iter()
            .flat_map(|l| l.extents.iter().map(|e| e.chunk.as_str()))
            .chain(self.files.iter().map(|f| f.chunk.as_str()))
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Every chunk it names, sorted, with the uncompressed length its extents and files
    /// need from it: a chunk that hashes to its name but is shorter cannot be restored.
    pub fn chunk_needs(&self) -> Vec<(&str, u64)> {
        let mut need: BTreeMap<&str, u64> = BTreeMap::new();
        let uses = self.lus.iter().flat_map(|l| {
            l.extents
                .iter()
                .map(|e| (e.chunk.as_str(), e.skip + e.length))
        });
        for (c, n) in uses.chain(self.files.iter().map(|f| (f.chunk.as_str(), f.size))) {
            let v = need.entry(c).or_default();
            *v = (*v).max(n);
        }
        need.into_iter().collect()
    }

    pub fn vlus(&self) -> Vec<String> {
        self.lus.iter().map(|l| l.vlu.clone()).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{location}: {message}")]
    Corrupt { location: String, message: String },
    #[error("{location}: chunk {chunk}: {message}")]
    BadChunk {
        location: String,
        chunk: String,
        message: String,
    },
}

pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// BLAKE3 (32 bytes, hex) of `data`: what `b3sum` prints.
pub fn blake3(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

thread_local! {
    /// Each thread's zstd context and output buffer, kept between chunks: a new
    /// context per chunk allocates and clears megabytes of tables, a new buffer is
    /// fresh memory to fault in.
    static COMPRESSOR: std::cell::RefCell<Option<(zstd::bulk::Compressor<'static>, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// A chunk's stored form, one zstd frame at [`LEVEL`], made in this thread's reused
/// buffer and handed to `then`.
pub fn compress_with<T>(data: &[u8], then: impl FnOnce(&[u8]) -> T) -> std::io::Result<T> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some((zstd::bulk::Compressor::new(LEVEL)?, Vec::new()));
        }
        let Some((z, out)) = c.as_mut() else {
            unreachable!("set above")
        };
        // The frame starts at a block-aligned address, so that a directory store can
        // write it to disk directly (see `store::write_staged`).
        let align = super::store::DIRECT_ALIGN;
        let bound = zstd::zstd_safe::compress_bound(data.len());
        if out.len() < bound + align {
            *out = vec![0; bound + align];
        }
        let at = out.as_ptr().align_offset(align);
        let frame = &mut out[at..at + bound];
        let n = z.compress_to_buffer(data, frame)?;
        Ok(then(&frame[..n]))
    })
}

/// True if every byte is zero (vectorised: no early exit inside a block).
pub fn is_zeros(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

pub fn chunk_key(hash: &str) -> String {
    format!("chunks/{}/{hash}", &hash[..2.min(hash.len())])
}

pub fn manifest_key(id: &str) -> String {
    format!("backups/{id}/manifest.json")
}

/// A plain backup id or file name: it becomes part of a key.
pub fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// This process's lock of the repository at `location`: backups into it hold it shared,
/// a prune holds it alone (it must not delete a chunk a backup under way relies on).
pub fn lock(location: &str) -> Arc<RwLock<()>> {
    static LOCKS: Mutex<BTreeMap<String, Arc<RwLock<()>>>> = Mutex::new(BTreeMap::new());
    let mut m = LOCKS.lock().unwrap_or_else(PoisonError::into_inner);
    m.entry(location.to_string()).or_default().clone()
}

/// Read a repository's marker: its format, and the hash that implies (which `"hash"`,
/// if given, must agree with).
fn marker_hash(store: &dyn Store) -> Result<Hash, RepoError> {
    let corrupt = |message: String| RepoError::Corrupt {
        location: store.location(),
        message,
    };
    let raw = store.get(MARKER)?;
    let v: Value = serde_json::from_slice(&raw).map_err(|e| corrupt(format!("{MARKER}: {e}")))?;
    let hash = match v["format"].as_str() {
        Some(FORMAT) => Hash::Blake3,
        Some(FORMAT_V2) => Hash::Sha256,
        _ => {
            return Err(corrupt(format!(
                "{MARKER}: format {}, this hvm reads {FORMAT} and {FORMAT_V2}",
                v["format"]
            )))
        }
    };
    if !(v["hash"].is_null() || v["hash"] == hash.name()) {
        return Err(corrupt(format!(
            "{MARKER}: format {} names chunks by {}, the marker says hash {}",
            hash.format(),
            hash.name(),
            v["hash"]
        )));
    }
    if !(v["compression"].is_null() || v["compression"] == "zstd") {
        return Err(corrupt(format!(
            "{MARKER}: compression {}, this hvm reads zstd",
            v["compression"]
        )));
    }
    Ok(hash)
}

/// A repository on a store.
pub struct Repo {
    store: Box<dyn Store>,
    /// What names its chunks, per its marker.
    hash: Hash,
}

impl Repo {
    /// A repository on `store`; one that is new gets its marker ([`FORMAT`]).
    pub fn create(store: Box<dyn Store>) -> Result<Repo, RepoError> {
        Repo::create_with(store, Hash::Blake3)
    }

    /// A repository on `store`; one that is new gets the marker of the format `hash`
    /// names (`Hash::Sha256`: `hvm-backup/2`, as older hvm made them). An existing one
    /// keeps its own.
    pub fn create_with(store: Box<dyn Store>, hash: Hash) -> Result<Repo, RepoError> {
        if !store.exists(MARKER)? {
            let m = serde_json::json!({ "format": hash.format(), "compression": "zstd", "hash": hash.name(), "extent_max": EXTENT_MAX });
            store.put(MARKER, m.to_string().as_bytes())?;
        }
        Repo::open(store)
    }

    /// An existing repository.
    pub fn open(store: Box<dyn Store>) -> Result<Repo, RepoError> {
        let hash = marker_hash(store.as_ref())?;
        Ok(Repo { store, hash })
    }

    /// What names this repository's chunks.
    pub fn hash(&self) -> Hash {
        self.hash
    }

    /// This repository's format (its manifests carry it too).
    pub fn format(&self) -> &'static str {
        self.hash.format()
    }

    fn corrupt(&self, message: String) -> RepoError {
        RepoError::Corrupt {
            location: self.location(),
            message,
        }
    }

    pub fn location(&self) -> String {
        self.store.location()
    }

    pub fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Hash, compress and store `data` unless the repository has it; returns its name
    /// and the compressed bytes written (0 if it was there).
    pub fn put_chunk(&self, data: &[u8]) -> Result<(String, u64), RepoError> {
        let hash = self.hash.of(data);
        let key = chunk_key(&hash);
        if self.store.exists(&key)? {
            return Ok((hash, 0));
        }
        let written = compress_with(data, |z| {
            self.store
                .put_if_absent(&key, z)
                .map(|w| if w { z.len() as u64 } else { 0 })
        })
        .map_err(|e| self.corrupt(format!("zstd: {e}")))??;
        Ok((hash, written))
    }

    /// A chunk's data, decompressed and checked against its name.
    pub fn get_chunk(&self, hash: &str) -> Result<Vec<u8>, RepoError> {
        let bad = |message: String| RepoError::BadChunk {
            location: self.location(),
            chunk: chunk_key(hash),
            message,
        };
        if !is_hash(hash) {
            return Err(bad(format!("not a {} name", self.hash.name())));
        }
        let z = self.store.get(&chunk_key(hash)).map_err(|e| match e {
            StoreError::NotFound { .. } => bad("missing".into()),
            e => RepoError::Store(e),
        })?;
        let data = zstd::bulk::decompress(&z, EXTENT_MAX as usize)
            .map_err(|e| bad(format!("does not decompress: {e}")))?;
        let got = self.hash.of(&data);
        if got != hash {
            return Err(bad(format!("its data hashes to {got}")));
        }
        Ok(data)
    }

    /// Write `m`, after making the chunks stored so far durable: a manifest never names
    /// a chunk a crash could lose.
    pub fn put_manifest(&self, m: &Manifest) -> Result<(), RepoError> {
        let text = serde_json::to_vec_pretty(m).map_err(|e| self.corrupt(e.to_string()))?;
        self.store.sync()?;
        self.store.put(&manifest_key(&m.id), &text)?;
        Ok(())
    }

    pub fn manifest(&self, id: &str) -> Result<Manifest, RepoError> {
        if !plain(id) {
            return Err(self.corrupt(format!("{id:?} is not a backup id")));
        }
        let raw = self.store.get(&manifest_key(id))?;
        let m: Manifest = serde_json::from_slice(&raw)
            .map_err(|e| self.corrupt(format!("{}: {e}", manifest_key(id))))?;
        self.check(&m, id)?;
        Ok(m)
    }

    /// A manifest read back must say what it is and hold only plain names and sorted,
    /// disjoint extents inside its LU.
    fn check(&self, m: &Manifest, id: &str) -> Result<(), RepoError> {
        let bad = |what: String| self.corrupt(format!("{}: {what}", manifest_key(id)));
        if m.format != self.format() || m.id != id {
            return Err(bad(format!("format {:?}, id {:?}", m.format, m.id)));
        }
        for l in &m.lus {
            if !plain(&l.vlu) {
                return Err(bad(format!("{:?} is not a virtual LU name", l.vlu)));
            }
            let mut end = 0u64;
            for e in &l.extents {
                let ok = e.offset >= end
                    && e.length > 0
                    && e.length <= EXTENT_MAX
                    && e.skip + e.length <= EXTENT_MAX
                    && e.offset.checked_add(e.length).is_some_and(|x| x <= l.size)
                    && is_hash(&e.chunk);
                if !ok {
                    return Err(bad(format!(
                        "{}: extent at {} is out of order or range",
                        l.vlu, e.offset
                    )));
                }
                end = e.offset + e.length;
            }
        }
        for f in &m.files {
            if !plain(&f.name) || !is_hash(&f.chunk) {
                return Err(bad(format!("file {:?}", f.name)));
            }
        }
        Ok(())
    }

    /// The ids of every backup that has a manifest, sorted.
    pub fn backup_ids(&self) -> Result<Vec<String>, RepoError> {
        Ok(self
            .store
            .list("backups/")?
            .into_iter()
            .filter_map(|k| {
                k.strip_prefix("backups/")
                    .and_then(|r| r.strip_suffix("/manifest.json"))
                    .filter(|id| !id.contains('/'))
                    .map(str::to_string)
            })
            .collect())
    }

    /// Remove a backup: its manifest first (then it no longer exists), then whatever
    /// else is under its name. Its chunks stay until a prune finds them unreferenced.
    pub fn delete_backup(&self, id: &str) -> Result<(), RepoError> {
        self.store.delete(&manifest_key(id))?;
        for k in self.store.list(&format!("backups/{id}/"))? {
            self.store.delete(&k)?;
        }
        Ok(())
    }

    /// Every chunk name in the repository.
    pub fn chunk_names(&self) -> Result<Vec<String>, RepoError> {
        Ok(self
            .store
            .list("chunks/")?
            .into_iter()
            .filter_map(|k| k.rsplit('/').next().map(str::to_string))
            .filter(|h| is_hash(h))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backups::store::DirStore;

    #[test]
    fn chunks_round_trip_and_corruption_is_named() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::create(Box::new(DirStore::open(d.path()).unwrap())).unwrap();
        let data = vec![7u8; 100_000];
        let (h, n) = repo.put_chunk(&data).unwrap();
        assert!(n > 0 && n < 1000, "{n}");
        assert_eq!(repo.put_chunk(&data).unwrap(), (h.clone(), 0));
        repo.store().sync().unwrap();
        assert_eq!(repo.put_chunk(&data).unwrap(), (h.clone(), 0));
        assert_eq!(repo.get_chunk(&h).unwrap(), data);
        let p = d.path().join(chunk_key(&h));
        std::fs::write(&p, zstd::bulk::compress(&[8u8; 10], 1).unwrap()).unwrap();
        let e = repo.get_chunk(&h).unwrap_err().to_string();
        assert!(e.contains(&chunk_key(&h)) && e.contains("hashes to"), "{e}");
        std::fs::remove_file(&p).unwrap();
        assert!(repo
            .get_chunk(&h)
            .unwrap_err()
            .to_string()
            .contains("missing"));
        assert!(is_zeros(&[0; 9000]) && !is_zeros(&[0, 0, 1]));
    }
}

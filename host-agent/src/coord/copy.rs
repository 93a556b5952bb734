//! The backup role: copy a snapshot into a backup directory, and the manifest that
//! `hvmctl backup verify` and `hvmctl backup restore` check.
//!
//! A backup directory holds one raw image per virtual LU (`<vlu>.img`), the small files
//! the freeze produced (PostgreSQL's `backup_label`), and `manifest.json`: format, id,
//! time, what the database host reported (instant, freeze), and each file's size and
//! SHA-256. Images are written as `.partial` and renamed once complete and synced; the
//! manifest is written last, so a directory with a manifest is a complete backup.

use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use hvm_core::{LuId, SECTOR_SIZE};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{rfc3339, unix_ms, Code, CopyRequest, Failure, Source};
use crate::agent::Agent;
use crate::nbd::client::Client;

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "hvm-backup/1";
const CHUNK: usize = 1 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub id: String,
    pub created: String,
    pub created_unix_ms: u64,
    /// What the console passed on: database host, instant, freeze window.
    pub info: Value,
    pub lus: Vec<LuEntry>,
    pub files: Vec<FileEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LuEntry {
    pub vlu: String,
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub source: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

fn hex(d: impl AsRef<[u8]>) -> String {
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn failed(m: impl Into<String>) -> Failure {
    Failure::new(Code::Failed, m)
}

/// A plain name for a file in a backup directory.
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `target` under `root`: relative, no `..`, no absolute parts.
pub fn target_dir(root: &Path, target: &str) -> Result<PathBuf, Failure> {
    let p = Path::new(target);
    if target.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(Failure::new(
            Code::BadRequest,
            format!("target {target:?} must be a relative path with no `..` (it is placed under the backup host's target_root)"),
        ));
    }
    Ok(root.join(p))
}

enum Reader<'a> {
    Array(&'a dyn hvm_core::backend::Backend, LuId),
    Nbd(Client),
}

impl Reader<'_> {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        match self {
            Reader::Array(b, lu) => b
                .read(*lu, offset / SECTOR_SIZE, buf)
                .map_err(|e| e.to_string()),
            Reader::Nbd(c) => c.read(offset, buf).map_err(|e| e.to_string()),
        }
    }
}

fn open_source<'a>(
    agent: &'a Agent,
    source: &Source,
    size: u64,
) -> Result<(Reader<'a>, String), Failure> {
    match source {
        Source::Array { backend, lu } => {
            let mgr = agent.managers.get(backend).ok_or_else(|| {
                Failure::new(
                    Code::BadRequest,
                    format!("this backup host has no backend named {backend}; configure one that reaches the same array"),
                )
            })?;
            let b: &dyn hvm_core::backend::Backend = mgr.backend();
            let desc = b
                .describe()
                .map_err(|e| failed(format!("backend {backend}: {e}")))?;
            let lbas = desc
                .capacity(LuId(*lu))
                .ok_or_else(|| failed(format!("backend {backend} has no LU {lu}")))?;
            if lbas * SECTOR_SIZE != size {
                return Err(failed(format!(
                    "backend {backend} LU {lu} has {} bytes here, the database host reports {size}: is it the same array?",
                    lbas * SECTOR_SIZE
                )));
            }
            Ok((
                Reader::Array(b, LuId(*lu)),
                format!("array: backend {backend}, LU {lu}"),
            ))
        }
        Source::Nbd { address, export } => {
            let c = match address.strip_prefix("unix:") {
                Some(p) => Client::connect(Path::new(p), export),
                None => Client::connect_tls(address, export, nbd_tls(agent)?),
            }
            .map_err(|e| failed(format!("NBD {address} export {export}: {e}")))?;
            if c.size() != size {
                return Err(failed(format!(
                    "NBD export {export} has {} bytes, the database host reports {size}",
                    c.size()
                )));
            }
            Ok((Reader::Nbd(c), format!("nbd: {address} export {export}")))
        }
    }
}

/// TLS for pulling a snapshot over TCP: this agent's coordination certificate, key and
/// CA, which the database host's `listen.tls` (made by the same `hvmctl tls init`)
/// accepts.
fn nbd_tls(agent: &Agent) -> Result<std::sync::Arc<super::tls::ClientConfig>, Failure> {
    let c = agent.coordination.as_ref().ok_or_else(|| {
        failed("this agent has no coordination TLS files to reach the database host's NBD listener with")
    })?;
    super::tls::client_config(&c.ca_file(), Some((&c.cert, &c.key)))
        .map_err(|e| failed(format!("TLS for the NBD copy: {e}")))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), Failure> {
    let tmp = path.with_extension("partial");
    let io = |e: std::io::Error| failed(format!("{}: {e}", path.display()));
    let mut f = private_file(&tmp).map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// A new file only its owner reads (0600 whatever the umask): a backup holds a
/// database's data.
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// The `copy` operation: read each snapshot, write the images, then the manifest.
/// `progress(done, total)` sees bytes copied.
pub fn copy(
    agent: &Agent,
    root: &Path,
    id: &str,
    req: &CopyRequest,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Value, Failure> {
    let dir = target_dir(root, &req.target)?;
    for lu in &req.lus {
        if !plain(&lu.vlu) {
            return Err(Failure::new(
                Code::BadRequest,
                format!("{:?} cannot name a file", lu.vlu),
            ));
        }
    }
    for name in req.files.keys() {
        if !plain(name) || name == MANIFEST || name.ends_with(".img") {
            return Err(Failure::new(
                Code::BadRequest,
                format!("{name:?} cannot name a file here"),
            ));
        }
    }
    std::fs::create_dir_all(root).map_err(|e| failed(format!("{}: {e}", root.display())))?;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| failed(format!("{}: {e}", parent.display())))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| {
            failed(format!(
                "{}: {e}{}",
                dir.display(),
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    " (a backup is never written over another)"
                } else {
                    ""
                }
            ))
        })?;
    // The directory is this call's own from here: a copy that fails removes it, so a
    // retry of the same target is not refused as a backup that exists.
    let written = fill(agent, &dir, id, req, progress);
    if written.is_err() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the failed backup's directory");
        }
    }
    written
}

/// Write the images, the files and last the manifest into the new directory `dir`.
fn fill(
    agent: &Agent,
    dir: &Path,
    id: &str,
    req: &CopyRequest,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Value, Failure> {
    let total: u64 = req.lus.iter().map(|l| l.size).sum();
    let mut done = 0u64;
    let mut entries = Vec::new();
    let mut reports = Vec::new();
    for lu in &req.lus {
        let (mut reader, source) = open_source(agent, &lu.source, lu.size)?;
        let file = format!("{}.img", lu.vlu);
        let path = dir.join(&file);
        let tmp = dir.join(format!("{file}.partial"));
        let io = |e: std::io::Error| failed(format!("{}: {e}", tmp.display()));
        let out = private_file(&tmp).map_err(io)?;
        let t = Instant::now();
        // Read on this thread; hash and write on another, so the two overlap.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let hashed = std::thread::scope(|scope| {
            let writer = scope.spawn(move || {
                let mut out = out;
                let mut hash = Sha256::new();
                for chunk in rx {
                    hash.update(&chunk);
                    out.write_all(&chunk)?;
                    let _ = back_tx.send(chunk);
                }
                out.sync_all()?;
                Ok::<_, std::io::Error>(hash)
            });
            let mut at = 0u64;
            let mut read_result = Ok(());
            while at < lu.size {
                let n = (lu.size - at).min(CHUNK as u64) as usize;
                let mut buf = back_rx.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
                buf.resize(n, 0);
                if let Err(e) = reader.read(at, &mut buf) {
                    read_result = Err(failed(format!("reading {} at {at}: {e}", lu.vlu)));
                    break;
                }
                if tx.send(buf).is_err() {
                    break; // the writer failed; its error is reported below
                }
                at += n as u64;
                done += n as u64;
                progress(done, total);
            }
            drop(tx);
            let written = writer
                .join()
                .map_err(|_| failed("the image writer panicked"))?
                .map_err(io);
            read_result?;
            written
        })?;
        if let Reader::Nbd(c) = reader {
            c.disconnect();
        }
        std::fs::rename(&tmp, &path).map_err(|e| failed(format!("{}: {e}", path.display())))?;
        let secs = t.elapsed().as_secs_f64();
        let sha = hex(hashed.finalize());
        reports.push(json!({
            "vlu": lu.vlu, "file": file, "size": lu.size, "sha256": sha, "source": source,
            "seconds": secs, "mib_per_s": lu.size as f64 / (1 << 20) as f64 / secs.max(1e-9),
        }));
        entries.push(LuEntry {
            vlu: lu.vlu.clone(),
            file,
            size: lu.size,
            sha256: sha,
            source,
        });
    }
    let mut files = Vec::new();
    for (name, text) in &req.files {
        write_synced(&dir.join(name), text.as_bytes())?;
        files.push(FileEntry {
            name: name.clone(),
            size: text.len() as u64,
            sha256: hex(Sha256::digest(text.as_bytes())),
        });
    }
    let now = unix_ms();
    let manifest = Manifest {
        format: FORMAT.into(),
        id: id.into(),
        created: rfc3339(now / 1000),
        created_unix_ms: now,
        info: req.info.clone(),
        lus: entries,
        files,
    };
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| failed(e.to_string()))?;
    write_synced(&dir.join(MANIFEST), text.as_bytes())?;
    sync_dir(dir);
    tracing::info!(backup = %id, dir = %dir.display(), bytes = total, "backup written");
    Ok(json!({ "dir": dir, "lus": reports, "manifest": manifest }))
}

/// Read and check a backup directory's manifest.
pub fn load(dir: &Path) -> Result<Manifest, String> {
    let p = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?;
    if m.format != FORMAT {
        return Err(format!(
            "{}: format {:?}, expected {FORMAT:?}",
            p.display(),
            m.format
        ));
    }
    for name in m
        .lus
        .iter()
        .map(|l| &l.file)
        .chain(m.files.iter().map(|f| &f.name))
    {
        if !plain(name) {
            return Err(format!(
                "{}: {name:?} is not a plain file name",
                p.display()
            ));
        }
    }
    Ok(m)
}

/// Size and SHA-256 of `path`'s first `size` bytes (all of it if `None`), calling
/// `progress` as it reads.
pub fn digest(
    path: &Path,
    size: Option<u64>,
    progress: &mut dyn FnMut(u64),
) -> Result<(u64, String), String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let want = match size {
            Some(s) => (s - n).min(CHUNK as u64) as usize,
            None => CHUNK,
        };
        if want == 0 {
            break;
        }
        let r = f
            .read(&mut buf[..want])
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if r == 0 {
            break;
        }
        hash.update(&buf[..r]);
        n += r as u64;
        progress(n);
    }
    Ok((n, hex(hash.finalize())))
}

/// `hvmctl backup verify DIR`: every file's size and checksum against the manifest.
/// Returns the report, or the list of what does not match.
pub fn verify(dir: &Path, progress: &mut dyn FnMut(&str, u64, u64)) -> Result<Value, String> {
    let m = load(dir)?;
    let mut bad = Vec::new();
    let mut checked = Vec::new();
    let items = m
        .lus
        .iter()
        .map(|l| (&l.file, l.size, &l.sha256))
        .chain(m.files.iter().map(|f| (&f.name, f.size, &f.sha256)));
    for (name, size, sha) in items {
        let path = dir.join(name);
        let actual_size = std::fs::metadata(&path).map(|md| md.len());
        match actual_size {
            Err(e) => bad.push(format!("{name}: {e}")),
            Ok(s) if s != size => bad.push(format!("{name}: {s} bytes, the manifest says {size}")),
            Ok(_) => {
                let (_, got) = digest(&path, None, &mut |n| progress(name, n, size))?;
                if &got != sha {
                    bad.push(format!("{name}: SHA-256 {got}, the manifest says {sha}"));
                } else {
                    checked.push(json!({ "file": name, "size": size, "sha256": sha }));
                }
            }
        }
    }
    if bad.is_empty() {
        Ok(json!({ "dir": dir, "id": m.id, "created": m.created, "ok": true, "files": checked }))
    } else {
        Err(format!(
            "{} does not match its manifest: {}",
            dir.display(),
            bad.join("; ")
        ))
    }
}

/// `hvmctl backup restore DIR --vlu NAME --to PATH`: check the image against the
/// manifest, then write it to PATH (a file, created or replaced, or a block device), sync
/// it and check what was written.
pub fn restore(
    dir: &Path,
    vlu: Option<&str>,
    to: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Value, String> {
    let m = load(dir)?;
    let lu = match vlu {
        Some(v) => m.lus.iter().find(|l| l.vlu == v).ok_or_else(|| {
            format!(
                "the backup has no virtual LU {v} (it has {})",
                m.lus
                    .iter()
                    .map(|l| l.vlu.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?,
        None if m.lus.len() == 1 => &m.lus[0],
        None => {
            return Err(format!(
                "the backup has several virtual LUs; name one with --vlu ({})",
                m.lus
                    .iter()
                    .map(|l| l.vlu.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    };
    let src = dir.join(&lu.file);
    let (n, sha) = digest(&src, None, &mut |n| progress("verify", n, lu.size))?;
    if n != lu.size || sha != lu.sha256 {
        return Err(format!(
            "{}: does not match the manifest (size {n}, SHA-256 {sha}); nothing was written to {}",
            src.display(),
            to.display()
        ));
    }
    let is_block = std::fs::metadata(to)
        .map(|md| std::os::unix::fs::FileTypeExt::is_block_device(&md.file_type()))
        .unwrap_or(false);
    let io = |e: std::io::Error| format!("{}: {e}", to.display());
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(!is_block)
        .truncate(!is_block)
        .open(to)
        .map_err(io)?;
    let mut input = std::fs::File::open(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    while at < lu.size {
        let want = (lu.size - at).min(CHUNK as u64) as usize;
        input
            .read_exact(&mut buf[..want])
            .map_err(|e| format!("{}: {e}", src.display()))?;
        out.write_all(&buf[..want]).map_err(io)?;
        at += want as u64;
        progress("restore", at, lu.size);
    }
    out.sync_all().map_err(io)?;
    drop(out);
    let (_, back) = digest(to, Some(lu.size), &mut |n| progress("check", n, lu.size))?;
    if back != lu.sha256 {
        return Err(format!(
            "{}: what was written reads back as SHA-256 {back}, not {}",
            to.display(),
            lu.sha256
        ));
    }
    Ok(json!({ "vlu": lu.vlu, "to": to, "size": lu.size, "sha256": lu.sha256 }))
}

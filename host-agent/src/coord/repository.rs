//! The backup role's repositories and catalog: the copy stores backups through it, and
//! `hvmctl backup list`, `verify`, `prune` and `restore` reach it over the coordination
//! service, since the catalog, the repositories (and later the object store's
//! credentials) live on the backup host.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::tls::ClientConfig;
use super::{
    unix_ms, BackupList, Code, Failure, FailureDetail, Pruned, RestoreCheck, RestoreRequest,
    RestoreTo, Restored, Verified,
};
use crate::backups::catalog::Catalog;
use crate::backups::chunks::default_threads;
use crate::backups::format::{chunk_key, LuMap, Manifest, Repo, MARKER};
use crate::backups::retention::{self, Keep};
use crate::backups::{restore, store};
use crate::nbd::client::Client;
use crate::nbd::export::split_ticket;
use crate::pairs::medium;
use hvm_api::coord::BackupRow;

fn failed(m: impl Into<String>) -> Failure {
    Failure::new(Code::Failed, m)
}

fn bad(m: impl Into<String>) -> Failure {
    Failure::new(Code::BadRequest, m)
}

/// Why a backup on the array's device is not restored in place.
fn not_in_place(id: &str) -> Failure {
    bad(format!(
        "backup {id} is on the array's backup device, not in a repository: restore it --to a new file on the backup host"
    ))
}

/// The backup host's side: where repositories go and where its catalog is.
pub struct BackupRole {
    /// `coordination.backup.target_root`: repositories named by a path live under it.
    pub root: PathBuf,
    /// The SQLite catalog (in the agent's state directory).
    pub catalog: PathBuf,
    /// The configured retention (`coordination.backup.keep`).
    pub keep: Option<Keep>,
}

/// `target` under `root`: relative, no `..`, no absolute parts.
pub fn target_dir(root: &Path, target: &str) -> Result<PathBuf, Failure> {
    let p = Path::new(target);
    if target.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad(format!(
            "target {target:?} must be a relative path with no `..` (it is placed under the backup host's target_root)"
        )));
    }
    Ok(root.join(p))
}

impl BackupRole {
    pub fn catalog(&self) -> Result<Catalog, Failure> {
        Catalog::open(&self.catalog).map_err(failed)
    }

    /// The repository `target` names: a directory under the root, or a store URL.
    pub fn open_repo(&self, target: &str, create: bool) -> Result<Repo, Failure> {
        let s = if target.contains("://") {
            crate::backups::open(target).map_err(|e| bad(e.to_string()))?
        } else {
            let dir = target_dir(&self.root, target)?;
            if !create && !dir.join(MARKER).exists() {
                return Err(bad(format!("{} is not a backup repository", dir.display())));
            }
            store::open(&dir.display().to_string()).map_err(|e| failed(e.to_string()))?
        };
        let r = if create {
            Repo::create(s)
        } else {
            Repo::open(s)
        };
        r.map_err(|e| failed(e.to_string()))
    }
}

/// Directories under `root` (at most 4 levels down) that hold a repository.
fn repositories_under(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, depth: u32, out: &mut Vec<String>) {
        if dir.join(MARKER).is_file() {
            out.push(dir.display().to_string());
            return;
        }
        if depth == 0 {
            return;
        }
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&e.path(), depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, 4, &mut out);
    out
}

fn open_location(location: &str) -> Result<Repo, Failure> {
    let s = crate::backups::open(location).map_err(|e| failed(e.to_string()))?;
    Repo::open(s).map_err(|e| failed(e.to_string()))
}

/// Synchronise the catalog with every repository it knows or finds under `root`;
/// returns the errors of those that could not be read.
fn sync_all(cat: &Catalog, root: &Path) -> Result<Vec<String>, Failure> {
    let mut locations = repositories_under(root);
    for l in cat.locations().map_err(failed)? {
        if !locations.contains(&l) {
            locations.push(l);
        }
    }
    let mut errors = Vec::new();
    for l in locations {
        if let Err(e) = open_location(&l).and_then(|r| cat.sync(&r).map_err(failed)) {
            errors.push(format!("{l}: {}", e.message));
        }
    }
    Ok(errors)
}

/// `backup_list`.
pub fn list(
    role: &BackupRole,
    target: Option<&str>,
    vlu: Option<&str>,
    rebuild: bool,
) -> Result<BackupList, Failure> {
    let cat = role.catalog()?;
    if rebuild {
        cat.clear().map_err(failed)?;
    }
    let (rows, errors) = match target {
        Some(t) => {
            let repo = role.open_repo(t, false)?;
            cat.sync(&repo).map_err(failed)?;
            (
                cat.list(Some(&repo.location())).map_err(failed)?,
                Vec::new(),
            )
        }
        None => {
            let errors = sync_all(&cat, &role.root)?;
            (cat.list(None).map_err(failed)?, errors)
        }
    };
    let rows: Vec<BackupRow> = rows
        .into_iter()
        .filter(|r| vlu.is_none_or(|v| r.vlus.iter().any(|x| x == v)))
        .collect();
    // And the backups the arrays copied to their devices (issue 22).
    let media = medium::list_rows(&cat, target, vlu).map_err(failed)?;
    Ok(BackupList {
        backups: medium::merged(rows, media),
        errors,
    })
}

/// The catalog row of `id` (looking through the repositories once if it is not there),
/// its repository and manifest.
fn find(role: &BackupRole, id: &str) -> Result<(Catalog, Repo, Manifest), Failure> {
    let root = &role.root;
    let cat = role.catalog()?;
    let row = match cat.get(id).map_err(failed)? {
        Some(r) => r,
        None => {
            sync_all(&cat, root)?;
            cat.get(id).map_err(failed)?.ok_or_else(|| {
                bad(format!(
                    "no backup {id} in the catalog or under {}",
                    root.display()
                ))
            })?
        }
    };
    let repo = open_location(row.location.as_deref().unwrap_or_default())?;
    let m = repo.manifest(&row.id).map_err(|e| failed(e.to_string()))?;
    Ok((cat, repo, m))
}

/// `backup_verify`: every chunk the backup names, read, decompressed, hashed and
/// measured against what its extents need, in parallel; the result goes into the catalog.
pub fn verify(
    role: &BackupRole,
    id: &str,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Verified, Failure> {
    let cat = role.catalog()?;
    if let Some(b) = medium::find(&cat, id).map_err(failed)? {
        return medium::verify(&cat, b, unix_ms()).map_err(failed);
    }
    let (cat, repo, m) = find(role, id)?;
    let chunks = m.chunk_needs();
    let next = AtomicUsize::new(0);
    let bad_chunks = Mutex::new(Vec::new());
    let checked = AtomicUsize::new(0);
    let progress = Mutex::new(progress);
    std::thread::scope(|s| {
        for _ in 0..default_threads() {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&(c, need)) = chunks.get(i) else {
                    break;
                };
                let problem = match repo.get_chunk(c) {
                    Err(e) => Some(e.to_string()),
                    Ok(d) if (d.len() as u64) < need => Some(format!(
                        "{}: {} bytes, the manifest needs {need}",
                        chunk_key(c),
                        d.len()
                    )),
                    Ok(_) => None,
                };
                if let Some(p) = problem {
                    bad_chunks.lock().map(|mut b| b.push(p)).ok();
                }
                let n = checked.fetch_add(1, Ordering::SeqCst) + 1;
                if let Ok(mut p) = progress.lock() {
                    p(n as u64, chunks.len() as u64);
                }
            });
        }
    });
    let mut bad_chunks = bad_chunks.into_inner().unwrap_or_default();
    bad_chunks.sort();
    let now = unix_ms();
    if bad_chunks.is_empty() {
        cat.verified(id, now, None).map_err(failed)?;
        Ok(Verified {
            id: id.to_string(),
            created: m.created.clone(),
            ok: true,
            chunks: chunks.len() as u64,
            vlus: m.vlus(),
            location: Some(repo.location()),
            kind: None,
            media: None,
        })
    } else {
        let msg = format!(
            "backup {id}: {} of {} chunks are bad: {}",
            bad_chunks.len(),
            chunks.len(),
            bad_chunks
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        );
        cat.verified(id, now, Some(&msg)).map_err(failed)?;
        Err(failed(msg).with(FailureDetail::BadChunks { bad_chunks }))
    }
}

/// `backup_prune`, with the request's policy or else the configured one.
pub fn prune(
    role: &BackupRole,
    target: &str,
    keep: Option<Keep>,
    dry_run: bool,
) -> Result<Pruned, Failure> {
    let keep = keep.or(role.keep).ok_or_else(|| {
        bad("no retention policy: give --keep-last/--keep-daily/--keep-weekly or set coordination.backup.keep")
    })?;
    let repo = role.open_repo(target, false)?;
    let cat = role.catalog()?;
    let lock = crate::backups::format::lock(&repo.location());
    let _alone = lock
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let report = retention::prune(&repo, &keep, dry_run, &mut |id| {
        if let Err(e) = cat.remove(id) {
            tracing::warn!(backup = %id, error = %e, "catalog row not removed (the next list drops it)");
        }
    })
    .map_err(failed)?;
    cat.sync(&repo).map_err(failed)?;
    Ok(report)
}

fn pick<'a>(m: &'a Manifest, vlu: Option<&str>) -> Result<&'a LuMap, Failure> {
    let names = || m.vlus().join(", ");
    match vlu {
        Some(v) => m.lu(v).ok_or_else(|| {
            bad(format!(
                "backup {} has no virtual LU {v} (it has {})",
                m.id,
                names()
            ))
        }),
        None if m.lus.len() == 1 => Ok(&m.lus[0]),
        None => Err(bad(format!(
            "backup {} has several virtual LUs; name one with --vlu ({})",
            m.id,
            names()
        ))),
    }
}

/// `backup_restore`; `tls` is how this host reaches the database host's NBD listener.
pub fn restore(
    role: &BackupRole,
    req: &RestoreRequest,
    tls: &dyn Fn() -> Result<Arc<ClientConfig>, Failure>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Restored, Failure> {
    if let Some(v) = on_medium(role, req)? {
        return Ok(v);
    }
    let (_, repo, m) = find(role, &req.backup)?;
    let lu = pick(&m, req.vlu.as_deref())?;
    Ok(match &req.to {
        RestoreTo::Path(p) => to_path(&repo, &m, lu, Path::new(p), progress)?,
        RestoreTo::Nbd { address, export } => {
            // The name may carry the database host's fence ticket: not for messages.
            let shown = split_ticket(export).0;
            let mut c = Client::connect_tls(address, export, tls()?)
                .map_err(|e| failed(format!("NBD {address} export {shown}: {e}")))?;
            if c.size() != lu.size {
                return Err(failed(format!(
                    "export {shown} has {} bytes, the backup's {} has {}",
                    c.size(),
                    lu.vlu,
                    lu.size
                )));
            }
            let r =
                restore::onto(&repo, &m, lu, &mut NbdTarget(&mut c), progress).map_err(failed)?;
            c.disconnect();
            r
        }
    })
}

/// `backup_restore_check`: the refusals [`restore`] would give before it writes
/// anything (no such backup or virtual LU; in place, a backup on the array's device).
pub fn check(
    role: &BackupRole,
    backup: &str,
    vlu: Option<&str>,
    in_place: bool,
) -> Result<RestoreCheck, Failure> {
    let cat = role.catalog()?;
    if let Some(b) = medium::find(&cat, backup).map_err(failed)? {
        if in_place {
            return Err(not_in_place(&b.id));
        }
        let lu = match vlu {
            Some(v) => b.lus.iter().find(|l| l.vlu == v),
            None if b.lus.len() == 1 => b.lus.first(),
            None => None,
        }
        .ok_or_else(|| {
            bad(format!(
                "backup {} has no such virtual LU; name one with --vlu",
                b.id
            ))
        })?;
        return Ok(RestoreCheck {
            backup: b.id.clone(),
            created: b.created.clone(),
            kind: medium::KIND.to_string(),
            vlu: lu.vlu.clone(),
            size: lu.size,
        });
    }
    let (_, _, m) = find(role, backup)?;
    let lu = pick(&m, vlu)?;
    Ok(RestoreCheck {
        backup: m.id.clone(),
        created: m.created.clone(),
        kind: lu.kind.to_string(),
        vlu: lu.vlu.clone(),
        size: lu.size,
    })
}

/// A new file (removed again if the restore fails), or a block device opened
/// exclusively: the kernel refuses that while it is mounted or held.
fn to_path(
    repo: &Repo,
    m: &Manifest,
    lu: &LuMap,
    to: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Restored, Failure> {
    if !to.is_absolute() {
        return Err(bad(format!(
            "--to {}: an absolute path on the backup host",
            to.display()
        )));
    }
    let device = match std::fs::metadata(to) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => true,
        Ok(_) => {
            return Err(bad(format!(
                "{} exists; a restore writes a new file or a block device, never over a file",
                to.display()
            )))
        }
        Err(_) => false,
    };
    let _exclusive = if device {
        use std::os::unix::fs::OpenOptionsExt;
        Some(
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc_o_excl())
                .open(to)
                .map_err(|e| bad(format!("{}: {e} (mounted or in use?)", to.display())))?,
        )
    } else {
        None
    };
    restore::to_path(repo, m, lu, to, progress).map_err(|e| {
        if !device {
            let _ = std::fs::remove_file(to);
        }
        failed(e)
    })
}

/// `O_EXCL`: on a block device, an exclusive open.
fn libc_o_excl() -> i32 {
    nix::fcntl::OFlag::O_EXCL.bits()
}

struct NbdTarget<'a>(&'a mut Client);

impl restore::Target for NbdTarget<'_> {
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read(offset, buf).map_err(|e| e.to_string())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.0.write(offset, data, false).map_err(|e| e.to_string())
    }

    fn flush(&mut self) -> Result<(), String> {
        self.0.flush().map_err(|e| e.to_string())
    }
}

/// The restore of a backup the array copied to its device ([`medium`]): the medium read
/// into a new file; not in place. `None`: not such a backup.
fn on_medium(role: &BackupRole, req: &RestoreRequest) -> Result<Option<Restored>, Failure> {
    let cat = role.catalog()?;
    let Some(b) = medium::find(&cat, &req.backup).map_err(failed)? else {
        return Ok(None);
    };
    match &req.to {
        RestoreTo::Path(p) => medium::restore(&b, req.vlu.as_deref(), Path::new(p))
            .map(Some)
            .map_err(failed),
        _ => Err(not_in_place(&b.id)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backups::format::{Extent, Hash, Kind, FORMAT, FORMAT_V2};
    use serde_json::Value;

    /// A backup role with its root and catalog in `dir`.
    fn role_in(dir: &Path) -> BackupRole {
        BackupRole {
            root: dir.join("root"),
            catalog: dir.join("c.sqlite"),
            keep: None,
        }
    }

    fn backup(repo: &Repo, id: &str, chunk: &str, skip: u64) {
        let m = Manifest {
            format: repo.format().into(),
            id: id.into(),
            created: "2026-12-01T00:00:00Z".into(),
            created_unix_ms: 1,
            kind: Kind::Full,
            parent: None,
            info: Value::Null,
            lus: vec![LuMap {
                vlu: "pg".into(),
                size: 8192,
                kind: Kind::Full,
                base: None,
                source: "test".into(),
                copied_bytes: 8192,
                written_bytes: None,
                reason: None,
                seconds: 0.0,
                extents: vec![Extent {
                    offset: 0,
                    length: 4096,
                    chunk: chunk.into(),
                    skip,
                }],
            }],
            files: Vec::new(),
            stored_bytes: 0,
        };
        repo.put_manifest(&m).unwrap();
    }

    /// A repository made by an older hvm (`hvm-backup/2`, SHA-256 chunk names) is still
    /// verified, restored, pruned and written into with SHA-256 names; a new one is
    /// `hvm-backup/3` with BLAKE3 names.
    #[test]
    fn an_hvm_backup_2_repository_still_restores() {
        let d = tempfile::tempdir().unwrap();
        let role = role_in(d.path());
        let dir = target_dir(&role.root, "old").unwrap();
        let old = Repo::create_with(
            store::open(&dir.display().to_string()).unwrap(),
            Hash::Sha256,
        )
        .unwrap();
        let marker: Value =
            serde_json::from_slice(&std::fs::read(dir.join(MARKER)).unwrap()).unwrap();
        assert_eq!(
            (marker["format"].as_str(), marker["hash"].as_str()),
            (Some(FORMAT_V2), Some("sha256"))
        );
        let (a, _) = old.put_chunk(&[1u8; 4096]).unwrap();
        assert_eq!(a, crate::backups::format::sha256(&[1u8; 4096]));
        backup(&old, "b1", &a, 0);
        drop(old);
        // Opened (and "created") again by this hvm: it stays hvm-backup/2.
        let repo = role.open_repo("old", true).unwrap();
        assert_eq!((repo.format(), repo.hash()), (FORMAT_V2, Hash::Sha256));
        let (b, _) = repo.put_chunk(&[2u8; 4096]).unwrap();
        assert_eq!(b, crate::backups::format::sha256(&[2u8; 4096]));
        backup(&repo, "b2", &b, 0);
        let mut m = repo.manifest("b2").unwrap();
        m.created_unix_ms = 2;
        repo.put_manifest(&m).unwrap();
        for (id, byte) in [("b1", 1u8), ("b2", 2)] {
            assert_eq!(verify(&role, id, &mut |_, _| {}).unwrap().chunks, 1);
            let to = d.path().join(format!("{id}.img"));
            let req = RestoreRequest {
                backup: id.into(),
                vlu: None,
                to: RestoreTo::Path(to.display().to_string()),
            };
            let tls = || -> Result<Arc<ClientConfig>, Failure> { Err(failed("no TLS")) };
            restore(&role, &req, &tls, &mut |_, _| {}).unwrap();
            let mut want = vec![byte; 4096];
            want.resize(8192, 0);
            assert_eq!(std::fs::read(&to).unwrap(), want);
        }
        // A chunk whose data does not hash (SHA-256) to its name is named by verify.
        std::fs::write(
            dir.join(chunk_key(&b)),
            zstd::bulk::compress(&[3u8; 4096], 1).unwrap(),
        )
        .unwrap();
        let e = verify(&role, "b2", &mut |_, _| {}).unwrap_err();
        assert!(e.message.contains("hashes to"), "{}", e.message);
        std::fs::write(
            dir.join(chunk_key(&b)),
            zstd::bulk::compress(&[2u8; 4096], 1).unwrap(),
        )
        .unwrap();
        // Prune keeping the newest: b1 and its chunk go, b2 stays restorable.
        let keep = Keep {
            last: 1,
            daily: 0,
            weekly: 0,
        };
        let p = prune(&role, "old", Some(keep), false).unwrap();
        assert_eq!(
            (p.delete, p.chunks_deleted),
            (vec!["b1".to_string()], Some(1))
        );
        assert!(verify(&role, "b2", &mut |_, _| {}).unwrap().ok);
        // A manifest claiming the other format is refused in it.
        let mut m = repo.manifest("b2").unwrap();
        m.format = FORMAT.into();
        m.id = "b3".into();
        repo.put_manifest(&m).unwrap();
        assert!(repo.manifest("b3").is_err());
        // A new repository is hvm-backup/3, its chunks named by BLAKE3.
        let new = role.open_repo("new", true).unwrap();
        assert_eq!((new.format(), new.hash()), (FORMAT, Hash::Blake3));
        let (c, _) = new.put_chunk(&[1u8; 4096]).unwrap();
        assert_eq!(c, crate::backups::format::blake3(&[1u8; 4096]));
        assert_ne!(c, a);
    }

    #[test]
    fn verify_checks_what_restore_needs_and_restore_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let role = role_in(d.path());
        let repo = role.open_repo("t", true).unwrap();
        let (c, _) = repo.put_chunk(&[9u8; 4096]).unwrap();
        backup(&repo, "good", &c, 0);
        // The chunk hashes to its name, but the extent reads past its end.
        backup(&repo, "short", &c, 1);
        let v = verify(&role, "good", &mut |_, _| {}).unwrap();
        assert_eq!(v.chunks, 1);
        let e = verify(&role, "short", &mut |_, _| {}).unwrap_err();
        assert!(
            e.message.contains("4096 bytes, the manifest needs 4097"),
            "{}",
            e.message
        );
        let to = d.path().join("out.img");
        let req = RestoreRequest {
            backup: "good".into(),
            vlu: None,
            to: RestoreTo::Path(to.display().to_string()),
        };
        let tls = || -> Result<Arc<ClientConfig>, Failure> { Err(failed("no TLS")) };
        let v = restore(&role, &req, &tls, &mut |_, _| {}).unwrap();
        let mut want = vec![9u8; 4096];
        want.resize(8192, 0);
        assert_eq!(std::fs::read(&to).unwrap(), want);
        assert_eq!(v.sha256, crate::backups::format::sha256(&want));
        assert_eq!(check(&role, "good", None, true).unwrap().kind, "full");
        // Never over an existing file.
        assert!(restore(&role, &req, &tls, &mut |_, _| {}).is_err());
    }
}

//! The backup role's copy: read each snapshot (from the array, or the database host's
//! snapshot export over NBD) and store it in a repository (`hvm-backup/3`, or `/2` if
//! it is one of those; see [`crate::backups::format`]) under `target_root`: the whole LU for a full backup, only
//! the ranges the database host's tracking reports for an incremental one. Chunks first,
//! the manifest last, then the catalog row. Or, when the console chose it (a snapshot
//! that is a split pair secondary of an array offering CCOPY), the array copies each
//! snapshot to its own backup device and the catalog records the media
//! ([`crate::pairs::medium`]).

use std::path::Path;
use std::time::Instant;

use hvm_core::{LuId, SECTOR_SIZE};

use super::repository::BackupRole;
use super::{
    rfc3339, unix_ms, Code, Copied, CopiedBy, CopiedLu, CopyLu, CopyRequest, Failure, Source,
};
use crate::backups::catalog;
use crate::backups::chunks::{default_streams, store_ranges, Rate, ReadAt};
use crate::backups::extents::{overlay, pieces};
use crate::backups::format::{plain, FileRef, Kind, LuMap, Manifest, Repo};
use crate::host::Host;
use crate::nbd::client::Client;
use crate::pairs::medium;

fn failed(m: impl Into<String>) -> Failure {
    Failure::new(Code::Failed, m)
}

fn bad(m: impl Into<String>) -> Failure {
    Failure::new(Code::BadRequest, m)
}

enum Reader<'a> {
    Array(&'a dyn hvm_core::backend::Backend, LuId),
    Nbd(Client),
}

/// The longest NBD read request of a copy: a piece is read as a few requests in flight,
/// so the server reads the next part while it sends one.
const NBD_READ_MAX: usize = 1 << 20;

impl Reader<'_> {
    /// Read `ranges` back to back into `buf`: from the array one after the other, over
    /// NBD all in flight at once (a pack of short ranges costs one round trip, not one
    /// each).
    fn read(&mut self, ranges: &[(u64, u64)], buf: &mut [u8]) -> Result<(), String> {
        match self {
            Reader::Array(b, lu) => {
                let mut rest = buf;
                for &(offset, length) in ranges {
                    let (this, tail) = std::mem::take(&mut rest).split_at_mut(length as usize);
                    b.read(*lu, offset / SECTOR_SIZE, this)
                        .map_err(|e| e.to_string())?;
                    rest = tail;
                }
                Ok(())
            }
            Reader::Nbd(c) => {
                let mut reads = Vec::with_capacity(ranges.len());
                let mut rest = buf;
                for &(offset, length) in ranges {
                    let (mut this, tail) = std::mem::take(&mut rest).split_at_mut(length as usize);
                    let mut at = offset;
                    while !this.is_empty() {
                        let n = this.len().min(NBD_READ_MAX);
                        let (part, more) = std::mem::take(&mut this).split_at_mut(n);
                        reads.push((at, part));
                        at += n as u64;
                        this = more;
                    }
                    rest = tail;
                }
                c.read_many(&mut reads).map_err(|e| e.to_string())
            }
        }
    }
}

/// The backup host's backend `backend` and its LU `lu`, checked to have `size` bytes
/// (the database host's view of the same array).
fn array_lu<'a>(
    agent: &'a Host,
    backend: &str,
    lu: u32,
    size: u64,
) -> Result<&'a dyn hvm_core::backend::Backend, Failure> {
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
        .capacity(LuId(lu))
        .ok_or_else(|| failed(format!("backend {backend} has no LU {lu}")))?;
    if lbas * SECTOR_SIZE != size {
        return Err(failed(format!(
            "backend {backend} LU {lu} has {} bytes here, the database host reports {size}: is it the same array?",
            lbas * SECTOR_SIZE
        )));
    }
    Ok(b)
}

fn open_source<'a>(
    agent: &'a Host,
    source: &Source,
    size: u64,
) -> Result<(Reader<'a>, String), Failure> {
    match source {
        Source::Array { backend, lu } => Ok((
            Reader::Array(array_lu(agent, backend, *lu, size)?, LuId(*lu)),
            format!("array: backend {backend}, LU {lu}"),
        )),
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
        Source::ArrayDevice { .. } => Err(bad(
            "a backup is copied either by the array to its devices or by this host, not both",
        )),
    }
}

/// TLS for pulling a snapshot over TCP: this agent's coordination certificate, key and
/// CA, which the database host's `listen.tls` (made by the same `hvmctl tls init`)
/// accepts.
pub(super) fn nbd_tls(agent: &Host) -> Result<std::sync::Arc<super::tls::ClientConfig>, Failure> {
    let c = agent.coordination.as_ref().ok_or_else(|| {
        failed("this agent has no coordination TLS files to reach the database host's NBD listener with")
    })?;
    super::tls::client_config(&c.ca_file(), Some((&c.cert, &c.key)))
        .map_err(|e| failed(format!("TLS for the NBD copy: {e}")))
}

/// One virtual LU's part of the copy: what to read and the map it starts from.
struct Plan {
    kind: Kind,
    base: Option<String>,
    /// Why this is a full backup when an incremental was asked for.
    reason: Option<String>,
    ranges: Vec<(u64, u64)>,
    base_extents: Vec<crate::backups::format::Extent>,
}

/// Incremental if the request has changes from a base that this repository holds for
/// this LU at this size; otherwise full, and why.
fn plan(repo: &Repo, lu: &CopyLu) -> Plan {
    let full = |reason: Option<String>| Plan {
        kind: Kind::Full,
        base: None,
        reason,
        ranges: pieces(&[(0, lu.size)], lu.size),
        base_extents: Vec::new(),
    };
    let (Some(base), Some(changes)) = (&lu.base, &lu.changes) else {
        return full(None);
    };
    let parent = match repo.manifest(base) {
        Ok(m) => m,
        Err(e) => return full(Some(format!("base {base} is not in this repository ({e})"))),
    };
    match parent.lu(&lu.vlu) {
        Some(p) if p.size == lu.size => Plan {
            kind: Kind::Incremental,
            base: Some(base.clone()),
            reason: None,
            ranges: pieces(changes, lu.size),
            base_extents: p.extents.clone(),
        },
        Some(p) => full(Some(format!(
            "{} was {} bytes in base {base}, is {} now",
            lu.vlu, p.size, lu.size
        ))),
        None => full(Some(format!("base {base} has no {}", lu.vlu))),
    }
}

/// Check names before anything is written.
fn check_request(id: &str, req: &CopyRequest) -> Result<(), Failure> {
    if !plain(id) {
        return Err(bad(format!("{id:?} cannot name a backup")));
    }
    for lu in &req.lus {
        if !plain(&lu.vlu) {
            return Err(bad(format!("{:?} cannot name a virtual LU here", lu.vlu)));
        }
    }
    for name in req.files.keys() {
        if !plain(name) {
            return Err(bad(format!("{name:?} cannot name a file here")));
        }
    }
    if req.lus.is_empty() {
        return Err(bad("no virtual LU to copy"));
    }
    Ok(())
}

/// The `copy` operation: store each snapshot in the repository `req.target`, then the
/// files, then the manifest; then the catalog row. `progress(done, total)` sees bytes
/// read. A retry of a backup whose manifest exists answers from the manifest.
pub fn copy(
    agent: &Host,
    role: &BackupRole,
    id: &str,
    req: &CopyRequest,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Copied, Failure> {
    let id = req.backup.as_deref().unwrap_or(id);
    check_request(id, req)?;
    if req
        .lus
        .iter()
        .any(|l| matches!(l.source, Source::ArrayDevice { .. }))
    {
        return array_copy(agent, role, id, req, progress);
    }
    let repo = role.open_repo(&req.target, true)?;
    let lock = crate::backups::format::lock(&repo.location());
    let _shared = lock
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let manifest = match repo.manifest(id) {
        Ok(m) => m,
        Err(_) => write_backup(agent, &repo, id, req, progress)?,
    };
    let cat = role.catalog()?;
    cat.put(&catalog::row(&repo.location(), &manifest))
        .map_err(failed)?;
    Ok(report(&repo, &manifest))
}

/// The copy by the array (issue 22): each snapshot, a split pair secondary, copied by
/// its array to a free backup device (CCOPY); the media recorded in the catalog. No host
/// reads the LUs. A retry of a backup already recorded answers from the catalog.
fn array_copy(
    agent: &Host,
    role: &BackupRole,
    id: &str,
    req: &CopyRequest,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Copied, Failure> {
    let cat = role.catalog()?;
    if let Some(b) = medium::find(&cat, id).map_err(failed)? {
        return Ok(medium::report(&b, &[]));
    }
    // The target's repository exists from now on (empty until a host-side copy), so
    // `backup list --target` finds the target.
    role.open_repo(&req.target, true)?;
    let total: u64 = req.lus.iter().map(|l| l.size).sum();
    let (mut lus, mut replaced, mut taken, mut done) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for lu in &req.lus {
        let Source::ArrayDevice { backend, lu: real } = &lu.source else {
            return Err(bad(
                "a backup is copied either by the array to its devices or by hosts, not both",
            ));
        };
        let b = array_lu(agent, backend, *real, lu.size)?;
        if crate::pairs::split_secondary(b, LuId(*real)).is_none() {
            return Err(failed(format!("LU {real} of backend {backend} is not a split pair secondary: the array copies only those to a device (CCOPY, [0030])")));
        }
        let devices = medium::devices(b).map_err(failed)?;
        let device = medium::pick_device(&cat, &devices, &taken).map_err(failed)?;
        taken.push(device.path.clone());
        let t = Instant::now();
        // Once the array started the copy, the device's former medium is gone.
        let mut started = || {
            replaced.extend(medium::forget_on(&cat, &device.path)?);
            Ok(())
        };
        let m = medium::copy(
            b,
            backend,
            (*real, lu.size / SECTOR_SIZE),
            &device,
            &mut started,
            &mut |d, _| progress(done + d, total),
        )
        .map_err(|e| failed(format!("backup {id}: {}: {e}", lu.vlu)))?;
        done += lu.size;
        tracing::info!(backup = %id, vlu = %lu.vlu, device = %m.device, blocks = m.blocks, "the array copied the snapshot to its device");
        let seconds = t.elapsed().as_secs_f64();
        lus.push(medium::MediumLu {
            vlu: lu.vlu.clone(),
            size: lu.size,
            medium: m,
            seconds,
        });
    }
    let now = unix_ms();
    let b = medium::MediumBackup {
        id: id.to_string(),
        created: rfc3339(now / 1000),
        created_unix_ms: now,
        target: req.target.clone(),
        info: req.info.clone(),
        lus,
        files: req.files.clone(),
        verified_unix_ms: None,
        verify_error: None,
    };
    medium::put(&cat, &b).map_err(failed)?;
    Ok(medium::report(&b, &replaced))
}

/// Read one snapshot's planned ranges and store them; its map and the new bytes.
fn store_lu(
    agent: &Host,
    repo: &Repo,
    lu: &CopyLu,
    p: Plan,
    rate: &mut Rate,
    progress: &mut dyn FnMut(u64),
) -> Result<(LuMap, u64), Failure> {
    // Several streams, each its own connection, so reads overlap (see chunks).
    let mut readers = Vec::new();
    let mut source = String::new();
    for _ in 0..default_streams() {
        let (r, s) = open_source(agent, &lu.source, lu.size)?;
        readers.push(r);
        source = s;
    }
    let t = Instant::now();
    let out = store_ranges(
        repo,
        &p.ranges,
        readers
            .iter_mut()
            .map(|r| {
                Box::new(|ranges: &[(u64, u64)], b: &mut [u8]| r.read(ranges, b)) as Box<ReadAt<'_>>
            })
            .collect(),
        rate,
        progress,
    )
    .map_err(|e| failed(format!("{}: {e}", lu.vlu)))?;
    for r in readers {
        if let Reader::Nbd(c) = r {
            c.disconnect();
        }
    }
    tracing::info!(vlu = %lu.vlu, kind = %p.kind, bytes = out.read_bytes,
        seconds = t.elapsed().as_secs_f64(), reason = ?p.reason, "virtual LU stored");
    let map = LuMap {
        vlu: lu.vlu.clone(),
        size: lu.size,
        kind: p.kind,
        base: p.base,
        source,
        copied_bytes: out.read_bytes,
        written_bytes: lu.written_bytes,
        extents: overlay(&p.base_extents, &out.stored),
        reason: p.reason,
        seconds: t.elapsed().as_secs_f64(),
    };
    Ok((map, out.new_bytes))
}

fn write_backup(
    agent: &Host,
    repo: &Repo,
    id: &str,
    req: &CopyRequest,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Manifest, Failure> {
    let plans: Vec<Plan> = req.lus.iter().map(|l| plan(repo, l)).collect();
    let total: u64 = plans
        .iter()
        .flat_map(|p| p.ranges.iter().map(|r| r.1))
        .sum();
    let mut done = 0u64;
    let mut rate = Rate::new(req.rate.unwrap_or(0));
    let mut lus = Vec::new();
    let mut stored_bytes = 0u64;
    for (lu, p) in req.lus.iter().zip(plans) {
        let (map, new_bytes) = store_lu(agent, repo, lu, p, &mut rate, &mut |n| {
            progress(done + n, total)
        })
        .map_err(|f| Failure::new(f.code, format!("backup {id}: {}", f.message)))?;
        done += map.copied_bytes;
        stored_bytes += new_bytes;
        lus.push(map);
    }
    let mut files = Vec::new();
    for (name, text) in &req.files {
        let (chunk, n) = repo
            .put_chunk(text.as_bytes())
            .map_err(|e| failed(e.to_string()))?;
        stored_bytes += n;
        files.push(FileRef {
            name: name.clone(),
            size: text.len() as u64,
            chunk,
        });
    }
    let incremental = lus.iter().all(|l| l.kind == Kind::Incremental);
    let parent = lus.first().and_then(|l| l.base.clone());
    let now = unix_ms();
    let m = Manifest {
        format: repo.format().into(),
        id: id.into(),
        created: rfc3339(now / 1000),
        created_unix_ms: now,
        kind: if incremental {
            Kind::Incremental
        } else {
            Kind::Full
        },
        parent: parent.filter(|p| lus.iter().all(|l| l.base.as_ref() == Some(p))),
        info: req.info.clone(),
        lus,
        files,
        stored_bytes,
    };
    repo.put_manifest(&m).map_err(|e| failed(e.to_string()))?;
    tracing::info!(backup = %id, repository = %repo.location(), kind = %m.kind, stored_bytes, "backup written");
    Ok(m)
}

/// What `copy` answers: the manifest without the extents (they can be many).
fn report(repo: &Repo, m: &Manifest) -> Copied {
    let lus = m
        .lus
        .iter()
        .map(|l| CopiedLu {
            vlu: l.vlu.clone(),
            size: l.size,
            kind: l.kind.to_string(),
            base: l.base.clone(),
            reason: l.reason.clone(),
            source: l.source.clone(),
            copied_bytes: l.copied_bytes,
            seconds: l.seconds,
            by: CopiedBy::Host {
                written_bytes: l.written_bytes,
                extents: l.extents.len() as u64,
                mib_per_s: l.copied_bytes as f64 / f64::from(1 << 20) / l.seconds.max(1e-9),
            },
        })
        .collect();
    Copied {
        location: Some(repo.location()),
        id: m.id.clone(),
        created: m.created.clone(),
        kind: m.kind.to_string(),
        parent: m.parent.clone(),
        stored_bytes: m.stored_bytes,
        lus,
        files: m.files.iter().map(|f| f.name.clone()).collect(),
        replaced: None,
    }
}

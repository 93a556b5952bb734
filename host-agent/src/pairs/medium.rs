//! A backup the array made by itself (issue 22): `hvmctl backup run` on a virtual LU that
//! sits on an EP 1 058 190 pair splits the pair (the snapshot) and the backup host has
//! the array copy the split secondary to one of its backup devices (CCOPY, [0029]-[0030]),
//! so no host reads the LU. The backup is then a medium on the array's device, not a
//! repository's chunks: the backup host records the medium's identity (array, device,
//! file, job, records, blocks, SHA-256) in its catalog (kind [`KIND`]), and `backup list`,
//! `verify` and `restore` read it from there. A restore reads the medium (the emulated
//! tape's records, each checked against its CRC) into a new file.
//!
//! A device holds one medium: a later copy to the same device replaces it. The copy picks
//! a device no catalogued backup is on, else the one with the oldest (rotation), and the
//! replaced backup leaves the catalog; a medium that no longer has the SHA-256 its
//! backup recorded is refused by verify and restore.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use hvm_core::array_backup::{BackupOp, BackupReply, DeviceStatus};
use hvm_core::backend::Backend;
use hvm_core::LuId;

use crate::backups::catalog::Catalog;
use hvm_api::coord::{BackupRow, Copied, CopiedBy, CopiedLu, Restored, Verified};

/// The catalog's kind of such a backup.
pub const KIND: &str = "array-ccopy";

/// One medium: where it is and what it holds, as the copy found it (the API's type: the
/// catalog keeps it in the same shape).
pub use hvm_api::coord::Medium;

/// One virtual LU of such a backup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MediumLu {
    pub vlu: String,
    pub size: u64,
    pub medium: Medium,
    /// How long the array's copy took.
    pub seconds: f64,
}

/// The whole backup, as the catalog keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MediumBackup {
    pub id: String,
    pub created: String,
    pub created_unix_ms: u64,
    /// The target the console named (the repository the host-side copy would use).
    pub target: String,
    pub info: Value,
    pub lus: Vec<MediumLu>,
    /// Small files from the hooks (the PostgreSQL backup label), as text.
    pub files: BTreeMap<String, String>,
    #[serde(default)]
    pub verified_unix_ms: Option<u64>,
    #[serde(default)]
    pub verify_error: Option<String>,
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", p.display())
}

/// The SHA-256 and length of a file, read in 1 MiB pieces.
fn file_sha256(p: &Path) -> Result<(String, u64), String> {
    let mut f = std::fs::File::open(p).map_err(io(p))?;
    let (mut hash, mut buf, mut n) = (Sha256::new(), vec![0u8; 1 << 20], 0u64);
    loop {
        let k = f.read(&mut buf).map_err(io(p))?;
        if k == 0 {
            return Ok((hex::encode(hash.finalize()), n));
        }
        hash.update(&buf[..k]);
        n += k as u64;
    }
}

/// Read and check a medium: every record's CRC and the trailer, then its SHA-256.
fn identify(path: &Path) -> Result<(array_sim::tape::Tape, String, u64), String> {
    let tape = array_sim::tape::Tape::open(path).map_err(|e| e.to_string())?;
    let (sha, bytes) = file_sha256(path)?;
    Ok((tape, sha, bytes))
}

/// The array's backup devices.
pub fn devices(b: &dyn Backend) -> Result<Vec<DeviceStatus>, String> {
    match b.backup(&BackupOp::Devices).map_err(|e| e.to_string())? {
        BackupReply::Devices { devices } => Ok(devices),
        r => Err(format!("the array answered {r:?} to a device query")),
    }
}

/// The catalogued backups on media, oldest first; rows that do not parse are skipped
/// with a warning.
pub fn backups(cat: &Catalog) -> Result<Vec<MediumBackup>, String> {
    let mut out = Vec::new();
    for (id, text) in cat.media()? {
        match serde_json::from_str::<MediumBackup>(&text) {
            Ok(b) => out.push(b),
            Err(e) => {
                tracing::warn!(backup = %id, error = %e, "a medium's catalog row does not parse")
            }
        }
    }
    Ok(out)
}

pub fn find(cat: &Catalog, id: &str) -> Result<Option<MediumBackup>, String> {
    Ok(backups(cat)?.into_iter().find(|b| b.id == id))
}

pub fn put(cat: &Catalog, b: &MediumBackup) -> Result<(), String> {
    let text = serde_json::to_string(b).map_err(|e| e.to_string())?;
    cat.put_medium(&b.id, b.created_unix_ms, &text)
}

/// A free device of `devices` for a new medium, not one of `taken`: one no catalogued
/// backup is on, else the one holding the oldest.
pub fn pick_device(
    cat: &Catalog,
    devices: &[DeviceStatus],
    taken: &[String],
) -> Result<DeviceStatus, String> {
    let held = backups(cat)?;
    let oldest_on = |d: &DeviceStatus| {
        held.iter()
            .filter(|b| b.lus.iter().any(|l| l.medium.path == d.path))
            .map(|b| b.created_unix_ms)
            .min()
    };
    devices
        .iter()
        .filter(|d| !d.busy && !taken.contains(&d.path))
        .min_by_key(|d| oldest_on(d).map_or((0, 0), |t| (1, t)))
        .cloned()
        .ok_or_else(|| {
            let names: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
            format!("the array has no free backup device (devices: {names:?}, busy or taken by this backup)")
        })
}

/// Drop the catalogued backups on the medium at `path` (a copy to its device is about
/// to replace it); returns their ids.
pub fn forget_on(cat: &Catalog, path: &str) -> Result<Vec<String>, String> {
    let mut gone = Vec::new();
    for b in backups(cat)? {
        if b.lus.iter().any(|l| l.medium.path == path) {
            cat.remove_medium(&b.id)?;
            tracing::warn!(backup = %b.id, medium = %path, "a new copy replaces this backup's medium");
            gone.push(b.id);
        }
    }
    Ok(gone)
}

/// The array copies its LU `lu` (a split pair secondary, `blocks` long) to `device`;
/// the medium checked and identified. `started` runs once the array accepted the job
/// (from then on the device's former medium is being replaced); `progress` sees bytes.
pub fn copy(
    b: &dyn Backend,
    backend: &str,
    (lu, blocks): (u32, u64),
    device: &DeviceStatus,
    started: &mut dyn FnMut() -> Result<(), String>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Medium, String> {
    let bs = hvm_core::SECTOR_SIZE;
    let what = |e: &dyn std::fmt::Display| format!("CCOPY of LU {lu} to {}: {e}", device.name);
    let job = super::start_ccopy(b, LuId(lu), blocks, &device.name).map_err(|e| what(&e))?;
    started()?;
    let job =
        super::wait_job(b, job, &mut |d, t| progress(d * bs, t * bs)).map_err(|e| what(&e))?;
    let (tape, sha256, bytes) = identify(Path::new(&device.path))?;
    let copied: u64 = tape.records.iter().map(|r| u64::from(r.blocks)).sum();
    if copied != blocks {
        return Err(format!(
            "the medium in {} holds {copied} blocks, the array was asked for {blocks}",
            device.name
        ));
    }
    Ok(Medium {
        backend: backend.to_string(),
        array_lu_identity: b.identity(LuId(lu)).ok().flatten(),
        device: device.name.clone(),
        path: device.path.clone(),
        job: job.id,
        lu,
        records: tape.records.len() as u64,
        blocks: copied,
        bytes,
        sha256,
    })
}

/// The medium is still the one the backup recorded: checked records, the same SHA-256.
fn check(m: &Medium) -> Result<array_sim::tape::Tape, String> {
    let (tape, sha, _) = identify(Path::new(&m.path))
        .map_err(|e| format!("the medium in device {}: {e}", m.device))?;
    if sha != m.sha256 {
        return Err(format!(
            "the medium in device {} ({}) is no longer this backup's: its SHA-256 is {sha}, the backup's was {} (a later copy to the device replaced it)",
            m.device, m.path, m.sha256
        ));
    }
    Ok(tape)
}

/// `backup verify` of a backup on media: every medium checked; the result goes into the
/// catalog.
pub fn verify(cat: &Catalog, mut b: MediumBackup, now_ms: u64) -> Result<Verified, String> {
    let problem = b.lus.iter().find_map(|l| check(&l.medium).err());
    b.verified_unix_ms = Some(now_ms);
    b.verify_error = problem.clone();
    put(cat, &b)?;
    match problem {
        Some(p) => Err(format!("backup {}: {p}", b.id)),
        None => Ok(Verified {
            ok: true,
            chunks: 0,
            vlus: b.lus.iter().map(|l| l.vlu.clone()).collect(),
            location: None,
            kind: Some(KIND.into()),
            media: Some(b.lus.iter().map(|l| l.medium.clone()).collect()),
            id: b.id,
            created: b.created,
        }),
    }
}

/// `backup restore` of a backup on media: the medium's records (checked) written into a
/// new file `to` of the virtual LU's size; the file is removed again on failure.
pub fn restore(b: &MediumBackup, vlu: Option<&str>, to: &Path) -> Result<Restored, String> {
    let lu = match vlu {
        Some(v) => b.lus.iter().find(|l| l.vlu == v),
        None if b.lus.len() == 1 => b.lus.first(),
        None => None,
    }
    .ok_or_else(|| {
        let names: Vec<&str> = b.lus.iter().map(|l| l.vlu.as_str()).collect();
        format!(
            "backup {} has virtual LUs {names:?}; name one with --vlu",
            b.id
        )
    })?;
    if !to.is_absolute() {
        return Err(format!(
            "--to {}: an absolute path on the backup host",
            to.display()
        ));
    }
    let tape = check(&lu.medium)?;
    let written = write_image(&tape, lu.size, to);
    if written.is_err() {
        let _ = std::fs::remove_file(to);
    }
    let sha256 = written?;
    Ok(Restored {
        backup: b.id.clone(),
        created: b.created.clone(),
        vlu: lu.vlu.clone(),
        size: lu.size,
        sha256,
        to: Some(to.display().to_string()),
        compared_bytes: None,
        written_bytes: None,
        medium: Some(lu.medium.clone()),
        clients_stopped: None,
        fence: None,
    })
}

/// A new file of `size` bytes with the medium's records at their places; its SHA-256.
fn write_image(tape: &array_sim::tape::Tape, size: u64, to: &Path) -> Result<String, String> {
    let end = tape
        .records
        .iter()
        .map(|r| (r.lba + u64::from(r.blocks)) * hvm_core::SECTOR_SIZE)
        .max()
        .unwrap_or(0);
    if end > size {
        return Err(format!(
            "the medium reaches byte {end}, past the virtual LU's {size}"
        ));
    }
    let mut f = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to)
            .map_err(|e| format!("{}: {e} (a restore writes a new file)", to.display()))?
    };
    f.set_len(size).map_err(io(to))?;
    tape.restore(&mut f).map_err(|e| e.to_string())?;
    Ok(file_sha256(to)?.0)
}

/// `backup list`'s rows of the backups on media, with their media; of one target or
/// virtual LU if given.
pub fn list_rows(
    cat: &Catalog,
    target: Option<&str>,
    vlu: Option<&str>,
) -> Result<Vec<BackupRow>, String> {
    Ok(backups(cat)?
        .into_iter()
        .filter(|b| target.is_none_or(|t| b.target == t))
        .filter(|b| vlu.is_none_or(|v| b.lus.iter().any(|l| l.vlu == v)))
        .map(row)
        .collect())
}

/// A backup on media as a `backup list` row: its location is the first medium's device.
fn row(b: MediumBackup) -> BackupRow {
    let first = b.lus.first().map(|l| &l.medium);
    BackupRow {
        location: first.map(|m| format!("array {}: device {} ({})", m.backend, m.device, m.path)),
        created_unix_ms: b.created_unix_ms,
        kind: KIND.into(),
        parent: None,
        vlus: b.lus.iter().map(|l| l.vlu.clone()).collect(),
        stored_bytes: b.lus.iter().map(|l| l.medium.bytes).sum(),
        logical_bytes: b.lus.iter().map(|l| l.size).sum(),
        copied_bytes: 0,
        verified_unix_ms: b.verified_unix_ms,
        verify_error: b.verify_error,
        target: Some(b.target),
        media: Some(b.lus.into_iter().map(|l| l.medium).collect()),
        id: b.id,
        created: b.created,
    }
}

/// The catalog's rows of repository backups and `media`'s rows, oldest first.
pub fn merged(mut rows: Vec<BackupRow>, media: Vec<BackupRow>) -> Vec<BackupRow> {
    rows.extend(media);
    rows.sort_by_key(|r| r.created_unix_ms);
    rows
}

/// What the copy answers for a backup on media (the shape of a repository copy's
/// answer): bytes through hosts 0, the array's bytes and each medium.
pub fn report(b: &MediumBackup, replaced: &[String]) -> Copied {
    let lus = b
        .lus
        .iter()
        .map(|l| {
            let m = &l.medium;
            CopiedLu {
                vlu: l.vlu.clone(),
                size: l.size,
                kind: "full".into(),
                base: None,
                reason: None,
                source: format!(
                    "array-ccopy: backend {}, LU {} to device {}",
                    m.backend, m.lu, m.device
                ),
                copied_bytes: 0,
                seconds: l.seconds,
                by: CopiedBy::Array {
                    array_copied_bytes: m.blocks * hvm_core::SECTOR_SIZE,
                    medium: m.clone(),
                },
            }
        })
        .collect();
    let first = b.lus.first().map(|l| &l.medium);
    Copied {
        location: first.map(|m| format!("array {}: device {} ({})", m.backend, m.device, m.path)),
        id: b.id.clone(),
        created: b.created.clone(),
        kind: KIND.into(),
        parent: None,
        stored_bytes: b.lus.iter().map(|l| l.medium.bytes).sum(),
        lus,
        files: b.files.keys().cloned().collect(),
        replaced: Some(replaced.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use array_sim::tape::TapeWriter;

    fn device(name: &str, path: &Path, busy: bool) -> DeviceStatus {
        DeviceStatus {
            name: name.into(),
            path: path.display().to_string(),
            busy,
        }
    }

    /// A medium of LU 11 with `fill` in blocks 0..8 of a 16-block LU, and its backup.
    fn backup_on(id: &str, dev: &DeviceStatus, fill: u8, at: u64) -> MediumBackup {
        let path = Path::new(&dev.path);
        let mut w = TapeWriter::create(path, 11).unwrap();
        w.record(0, &[fill; 8 * 512]).unwrap();
        w.finish().unwrap();
        let (sha256, bytes) = file_sha256(path).unwrap();
        MediumBackup {
            id: id.into(),
            created: "2026-12-01T00:00:00Z".into(),
            created_unix_ms: at,
            target: "pg".into(),
            info: Value::Null,
            lus: vec![MediumLu {
                vlu: "pg".into(),
                size: 16 * 512,
                medium: Medium {
                    backend: "array0".into(),
                    array_lu_identity: None,
                    device: dev.name.clone(),
                    path: dev.path.clone(),
                    job: 1,
                    lu: 11,
                    records: 1,
                    blocks: 8,
                    bytes,
                    sha256,
                },
                seconds: 0.0,
            }],
            files: BTreeMap::new(),
            verified_unix_ms: None,
            verify_error: None,
        }
    }

    #[test]
    fn devices_rotate_and_a_replaced_medium_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&d.path().join("c.sqlite")).unwrap();
        let t0 = device("tape0", &d.path().join("tape0.rec"), false);
        let t1 = device("tape1", &d.path().join("tape1.rec"), false);
        let devs = vec![t0.clone(), t1.clone()];
        // Nothing catalogued: the first free device; a busy or taken one is skipped.
        assert_eq!(pick_device(&cat, &devs, &[]).unwrap().name, "tape0");
        let busy = vec![
            device("tape0", &d.path().join("tape0.rec"), true),
            t1.clone(),
        ];
        assert_eq!(pick_device(&cat, &busy, &[]).unwrap().name, "tape1");
        assert!(pick_device(&cat, &busy, std::slice::from_ref(&t1.path)).is_err());
        // A device no backup is on before one that holds a backup; then the oldest.
        put(&cat, &backup_on("b1", &t0, 0x11, 1)).unwrap();
        assert_eq!(pick_device(&cat, &devs, &[]).unwrap().name, "tape1");
        put(&cat, &backup_on("b2", &t1, 0x22, 2)).unwrap();
        assert_eq!(pick_device(&cat, &devs, &[]).unwrap().name, "tape0");
        let rows = list_rows(&cat, Some("pg"), Some("pg")).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].kind, KIND);
        assert!(list_rows(&cat, Some("other"), None).unwrap().is_empty());

        // Restore: the medium's blocks at their place in a new file of the LU's size.
        let b1 = find(&cat, "b1").unwrap().unwrap();
        let to = d.path().join("r1.img");
        let v = restore(&b1, None, &to).unwrap();
        let mut want = vec![0x11u8; 8 * 512];
        want.resize(16 * 512, 0);
        assert_eq!(std::fs::read(&to).unwrap(), want);
        assert_eq!(v.sha256, crate::backups::format::sha256(&want));
        assert!(restore(&b1, None, &to).is_err(), "never over a file");
        assert!(verify(&cat, b1.clone(), 5).is_ok());

        // A new copy to tape0 replaces b1's medium: b1 leaves the catalog, and a backup
        // whose medium changed is refused by verify and restore (the file not left).
        assert_eq!(forget_on(&cat, &t0.path).unwrap(), vec!["b1".to_string()]);
        assert!(find(&cat, "b1").unwrap().is_none());
        backup_on("b3", &t0, 0x33, 3);
        let e = verify(&cat, b1.clone(), 6).unwrap_err();
        assert!(e.contains("no longer this backup's"), "{e}");
        let to = d.path().join("r2.img");
        assert!(restore(&b1, None, &to).unwrap_err().contains("SHA-256"));
        assert!(!to.exists());
    }
}

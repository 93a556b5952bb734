//! The backup host's catalog: one SQLite row per backup, for `hvmctl backup list` and
//! for finding a backup's repository by its id.
//!
//! The manifests in the repositories are the truth; the catalog is an index of them.
//! [`Catalog::sync`] compares a repository's manifests with its rows and adds or drops
//! rows to match (every `list` does it for the repositories it shows), and
//! [`Catalog::rebuild`] starts from nothing (`hvmctl backup list --rebuild`). Only the
//! verification times live in the catalog alone.
//!
//! Backups an array copied to its own backup device (EP 1 058 190's CCOPY, issue 22) are
//! in no repository: the `media` table holds their records ([`crate::pairs::medium`]),
//! and there the catalog is the record beside the medium, so `clear` keeps them.

use std::path::Path;

use hvm_api::coord::BackupRow;
use rusqlite::{params, Connection};

use super::format::{Manifest, Repo, RepoError};

pub struct Catalog {
    db: Connection,
}

fn sql(e: rusqlite::Error) -> String {
    format!("catalog: {e}")
}

/// The catalog row of backup `m` in the repository at `location` (not verified yet).
pub fn row(location: &str, m: &Manifest) -> BackupRow {
    BackupRow {
        id: m.id.clone(),
        location: Some(location.to_string()),
        created_unix_ms: m.created_unix_ms,
        created: m.created.clone(),
        kind: m.kind.to_string(),
        parent: m.parent.clone(),
        vlus: m.vlus(),
        stored_bytes: m.stored_bytes,
        logical_bytes: m.lus.iter().map(|l| l.size).sum(),
        copied_bytes: m.lus.iter().map(|l| l.copied_bytes).sum(),
        verified_unix_ms: None,
        verify_error: None,
        target: None,
        media: None,
    }
}

impl Catalog {
    pub fn open(path: &Path) -> Result<Catalog, String> {
        let db = Connection::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA busy_timeout=10000;
             CREATE TABLE IF NOT EXISTS backups (
               id TEXT PRIMARY KEY, location TEXT NOT NULL, created_unix_ms INTEGER NOT NULL,
               created TEXT NOT NULL, kind TEXT NOT NULL, parent TEXT, vlus TEXT NOT NULL,
               stored_bytes INTEGER NOT NULL, logical_bytes INTEGER NOT NULL,
               copied_bytes INTEGER NOT NULL, verified_unix_ms INTEGER, verify_error TEXT);
             CREATE INDEX IF NOT EXISTS backups_location ON backups(location, created_unix_ms);
             CREATE TABLE IF NOT EXISTS media (
               id TEXT PRIMARY KEY, created_unix_ms INTEGER NOT NULL, record TEXT NOT NULL);",
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        Ok(Catalog { db })
    }

    /// Add or replace the row of a backup (its verification is kept).
    pub fn put(&self, r: &BackupRow) -> Result<(), String> {
        self.db
            .execute(
                "INSERT INTO backups (id, location, created_unix_ms, created, kind, parent, vlus,
                   stored_bytes, logical_bytes, copied_bytes)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                 ON CONFLICT(id) DO UPDATE SET location=?2, created_unix_ms=?3, created=?4,
                   kind=?5, parent=?6, vlus=?7, stored_bytes=?8, logical_bytes=?9, copied_bytes=?10",
                params![
                    r.id,
                    r.location,
                    r.created_unix_ms as i64,
                    r.created,
                    r.kind,
                    r.parent,
                    serde_json::to_string(&r.vlus).unwrap_or_default(),
                    r.stored_bytes as i64,
                    r.logical_bytes as i64,
                    r.copied_bytes as i64,
                ],
            )
            .map_err(sql)?;
        Ok(())
    }

    pub fn remove(&self, id: &str) -> Result<(), String> {
        self.db
            .execute("DELETE FROM backups WHERE id = ?1", params![id])
            .map_err(sql)?;
        Ok(())
    }

    /// Record a verification: `error` is `None` when every chunk checked out.
    pub fn verified(&self, id: &str, at_ms: u64, error: Option<&str>) -> Result<(), String> {
        self.db
            .execute(
                "UPDATE backups SET verified_unix_ms = ?2, verify_error = ?3 WHERE id = ?1",
                params![id, at_ms as i64, error],
            )
            .map_err(sql)?;
        Ok(())
    }

    fn rows(&self, filter: &str, args: &[&dyn rusqlite::ToSql]) -> Result<Vec<BackupRow>, String> {
        let q = format!(
            "SELECT id, location, created_unix_ms, created, kind, parent, vlus, stored_bytes,
               logical_bytes, copied_bytes, verified_unix_ms, verify_error
             FROM backups {filter} ORDER BY created_unix_ms, id"
        );
        let mut st = self.db.prepare(&q).map_err(sql)?;
        let rows = st
            .query_map(args, |r| {
                let vlus: String = r.get(6)?;
                Ok(BackupRow {
                    id: r.get(0)?,
                    location: Some(r.get(1)?),
                    created_unix_ms: r.get::<_, i64>(2)? as u64,
                    created: r.get(3)?,
                    kind: r.get(4)?,
                    parent: r.get(5)?,
                    vlus: serde_json::from_str(&vlus).unwrap_or_default(),
                    stored_bytes: r.get::<_, i64>(7)? as u64,
                    logical_bytes: r.get::<_, i64>(8)? as u64,
                    copied_bytes: r.get::<_, i64>(9)? as u64,
                    verified_unix_ms: r.get::<_, Option<i64>>(10)?.map(|v| v as u64),
                    verify_error: r.get(11)?,
                    target: None,
                    media: None,
                })
            })
            .map_err(sql)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(sql)
    }

    /// Every backup, oldest first; of one repository if `location` is given.
    pub fn list(&self, location: Option<&str>) -> Result<Vec<BackupRow>, String> {
        match location {
            Some(l) => self.rows("WHERE location = ?1", &[&l]),
            None => self.rows("", &[]),
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<BackupRow>, String> {
        Ok(self.rows("WHERE id = ?1", &[&id])?.into_iter().next())
    }

    pub fn locations(&self) -> Result<Vec<String>, String> {
        let mut st = self
            .db
            .prepare("SELECT DISTINCT location FROM backups ORDER BY location")
            .map_err(sql)?;
        let v = st
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        Ok(v)
    }

    /// Make the rows of `repo` match its manifests; returns (added, dropped).
    pub fn sync(&self, repo: &Repo) -> Result<(usize, usize), String> {
        let loc = repo.location();
        let ids = repo.backup_ids().map_err(|e| e.to_string())?;
        let known: Vec<String> = self.list(Some(&loc))?.into_iter().map(|r| r.id).collect();
        let mut added = 0;
        for id in ids.iter().filter(|i| !known.contains(i)) {
            match repo.manifest(id) {
                Ok(m) => {
                    self.put(&row(&loc, &m))?;
                    added += 1;
                }
                Err(RepoError::Store(e)) => return Err(e.to_string()),
                Err(e) => {
                    tracing::warn!(backup = %id, error = %e, "a manifest that does not read is left out of the catalog")
                }
            }
        }
        let mut dropped = 0;
        for id in known.iter().filter(|i| !ids.contains(i)) {
            self.remove(id)?;
            dropped += 1;
        }
        Ok((added, dropped))
    }

    /// Add or replace a backup that is on an array's medium, not in a repository
    /// ([`crate::pairs::medium`]): `record` is its JSON. The catalog is its record (beside
    /// the medium itself), so [`Catalog::clear`] and [`Catalog::sync`] leave it alone.
    pub fn put_medium(&self, id: &str, created_unix_ms: u64, record: &str) -> Result<(), String> {
        self.db
            .execute(
                "INSERT INTO media (id, created_unix_ms, record) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET created_unix_ms=?2, record=?3",
                params![id, created_unix_ms as i64, record],
            )
            .map_err(sql)?;
        Ok(())
    }

    /// Every backup on a medium, oldest first: (id, record).
    pub fn media(&self) -> Result<Vec<(String, String)>, String> {
        let mut st = self
            .db
            .prepare("SELECT id, record FROM media ORDER BY created_unix_ms, id")
            .map_err(sql)?;
        let v = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(sql)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql)?;
        Ok(v)
    }

    pub fn remove_medium(&self, id: &str) -> Result<(), String> {
        self.db
            .execute("DELETE FROM media WHERE id = ?1", params![id])
            .map_err(sql)?;
        Ok(())
    }

    /// Forget everything (the next syncs fill the catalog again from the manifests).
    pub fn clear(&self) -> Result<(), String> {
        self.db.execute("DELETE FROM backups", []).map_err(sql)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::backups::format::{Kind, LuMap, FORMAT};
    use crate::backups::store::DirStore;

    fn manifest(id: &str, ms: u64) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            id: id.into(),
            created: "2026-12-01T00:00:00Z".into(),
            created_unix_ms: ms,
            kind: Kind::Full,
            parent: None,
            info: serde_json::Value::Null,
            lus: vec![LuMap {
                vlu: "pg".into(),
                size: 4096,
                kind: Kind::Full,
                base: None,
                source: "test".into(),
                copied_bytes: 4096,
                written_bytes: None,
                reason: None,
                seconds: 0.0,
                extents: Vec::new(),
            }],
            files: Vec::new(),
            stored_bytes: 7,
        }
    }

    #[test]
    fn the_catalog_follows_the_manifests() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repo::create(Box::new(DirStore::open(&d.path().join("r")).unwrap())).unwrap();
        let cat = Catalog::open(&d.path().join("c.sqlite")).unwrap();
        repo.put_manifest(&manifest("b1", 1)).unwrap();
        repo.put_manifest(&manifest("b2", 2)).unwrap();
        assert_eq!(cat.sync(&repo).unwrap(), (2, 0));
        assert_eq!(cat.sync(&repo).unwrap(), (0, 0));
        cat.verified("b1", 5, None).unwrap();
        repo.delete_backup("b2").unwrap();
        assert_eq!(cat.sync(&repo).unwrap(), (0, 1));
        let rows = cat.list(Some(&repo.location())).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].verified_unix_ms, rows[0].stored_bytes),
            (Some(5), 7)
        );
        assert_eq!(rows[0].vlus, vec!["pg".to_string()]);
        // Rebuilt from nothing: the same rows, less what only the catalog knew.
        cat.clear().unwrap();
        assert_eq!(cat.sync(&repo).unwrap(), (1, 0));
        assert_eq!(cat.get("b1").unwrap().unwrap().verified_unix_ms, None);
        assert_eq!(cat.locations().unwrap(), vec![repo.location()]);
    }

    #[test]
    fn media_rows_outlive_a_rebuild() {
        let d = tempfile::tempdir().unwrap();
        let cat = Catalog::open(&d.path().join("c.sqlite")).unwrap();
        cat.put_medium("m2", 2, "{\"b\":2}").unwrap();
        cat.put_medium("m1", 1, "{\"a\":1}").unwrap();
        cat.put_medium("m1", 1, "{\"a\":3}").unwrap();
        cat.clear().unwrap();
        let ids: Vec<(String, String)> = cat.media().unwrap();
        assert_eq!(
            ids,
            vec![
                ("m1".into(), "{\"a\":3}".into()),
                ("m2".into(), "{\"b\":2}".into())
            ]
        );
        cat.remove_medium("m1").unwrap();
        assert_eq!(cat.media().unwrap().len(), 1);
        assert!(cat.get("m2").unwrap().is_none(), "not a repository backup");
    }
}
